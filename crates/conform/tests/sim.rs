//! The whole catalogue against xenblkd on the simulator: every case must pass or be
//! skipped for a stated reason, and the report must be well formed. Also: the runner
//! can fail (a case with a wrong expectation fails with the backend's answer), and
//! `blkif-conform` prints one line per case, the summary and JSON, and exits non-zero
//! on a failure.

use std::process::Command;

use blkif::abi::{BLKIF_OP_READ, BLKIF_RSP_OKAY};
use conform::cases::Case;
use conform::front::{page_segs, RawFront, Setup};
use conform::runner::{run, Outcome};
use conform::sim::{SimOptions, SimTarget};
use conform::target::DeviceRequest;
use conform::verdict::Verdict;

#[test]
fn the_whole_catalogue_passes_against_xenblkd_on_the_simulator() {
    let cases = conform::catalogue();
    assert!(cases.len() >= 60, "only {} cases", cases.len());
    let mut names: Vec<&str> = cases.iter().map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), cases.len(), "case names must be unique");
    for c in &cases {
        assert!(!c.source.is_empty(), "{} has no source", c.name);
    }
    let mut target = SimTarget::start(SimOptions::default()).expect("simulated host");
    let summary = run(&mut target, &cases, None, |r| println!("{}", r.line()));
    println!("{}", summary.line());
    let failed: Vec<String> = summary
        .cases
        .iter()
        .filter(|r| r.outcome == Outcome::Fail)
        .map(|r| r.line())
        .collect();
    assert!(failed.is_empty(), "failed:\n{}", failed.join("\n"));
    // On the simulator every case applies: nothing may be skipped.
    let skipped: Vec<String> = summary
        .cases
        .iter()
        .filter(|r| r.outcome == Outcome::Skip)
        .map(|r| r.line())
        .collect();
    assert!(skipped.is_empty(), "skipped:\n{}", skipped.join("\n"));
    assert_eq!(summary.passed, cases.len());
    target.stop().expect("stopping the daemon");
}

#[test]
fn a_case_with_a_wrong_expectation_fails_with_the_backends_answer() {
    // Expects OKAY for a read past the end of the disk: the backend answers ERROR.
    let wrong = conform::cases::Case {
        name: "selftest.wrong-expectation".into(),
        group: "selftest",
        source: "none",
        run: Box::new(|ctx| {
            let mut f = RawFront::open(ctx, DeviceRequest::default())?;
            f.connect_ok(&Setup::default())?;
            let b = f.buffer(1, false)?;
            let r = blkif::RawRequest::direct(
                BLKIF_OP_READ,
                1,
                f.handle,
                f.adv.sectors,
                &page_segs(&b.grefs),
            )
            .ok_or_else(|| Verdict::fail("encoding"))?;
            f.expect(&r, BLKIF_RSP_OKAY)?;
            f.close()
        }),
    };
    let skip = Case {
        name: "selftest.skip".into(),
        group: "selftest",
        source: "none",
        run: Box::new(|_| Err(Verdict::skip("not here"))),
    };
    let mut target = SimTarget::start(SimOptions::default()).expect("simulated host");
    let s = run(&mut target, &[wrong, skip], None, |_| {});
    assert_eq!((s.passed, s.failed, s.skipped), (0, 1, 1));
    let line = s.cases[0].line();
    assert!(
        line.starts_with("FAIL selftest.wrong-expectation (status -1 (ERROR), expected 0"),
        "{line}"
    );
    assert_eq!(s.cases[1].line(), "SKIP selftest.skip (not here)");
    target.stop().expect("stopping the daemon");
}

#[test]
fn the_binary_reports_lines_summary_json_and_filters() {
    let bin = env!("CARGO_BIN_EXE_blkif-conform");
    let out = Command::new(bin)
        .args(["--filter", "ops.request-id,integrity.native-order-0"])
        .output()
        .expect("running blkif-conform");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "PASS ops.request-id-reuse",
            "PASS ops.request-id-echo",
            "PASS integrity.native-order-0",
            "3 passed, 0 failed, 0 skipped"
        ]
    );
    let out = Command::new(bin)
        .args(["--json", "--filter", "negotiation.abi-garbage"])
        .output()
        .expect("running blkif-conform");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(v["target"], "xenblkd-sim");
    assert_eq!(v["passed"], 1);
    assert_eq!(v["cases"][0]["name"], "negotiation.abi-garbage");
    assert_eq!(v["cases"][0]["outcome"], "PASS");
    assert!(v["cases"][0]["source"]
        .as_str()
        .is_some_and(|s| s.contains("connect_ring")));
    let list = Command::new(bin)
        .args(["--list"])
        .output()
        .expect("running blkif-conform");
    assert!(String::from_utf8_lossy(&list.stdout).lines().count() >= 60);
}

#[test]
fn without_xen_the_xen_target_exits_non_zero() {
    // Outside a domU there is no /dev/xen: the target cannot start (exit 2).
    let bin = env!("CARGO_BIN_EXE_blkif-conform");
    let out = Command::new(bin)
        .args(["--target", "xen"])
        .output()
        .expect("running blkif-conform");
    assert!(!out.status.success());
}

/// On real Xen the suite reuses one frontend directory for every case: a case's
/// negotiation nodes must not survive into the next connection (they refused every
/// later connection in the first lab run). `clear_frontend_nodes` removes what a
/// frontend wrote and keeps what the toolstack wrote; checked on the simulator's
/// xenstore, where the toolstack wrote the same nodes.
#[test]
fn clearing_a_frontend_directory_keeps_only_the_toolstack_nodes() {
    use conform::target::Target;
    use xenstore::XsOps;
    let mut target = SimTarget::start(SimOptions::default()).expect("simulated host");
    let dev = target
        .open_device(&DeviceRequest::default())
        .expect("device");
    let fe = &dev.frontend_path;
    let before = dev.xs.directory(fe).expect("directory");
    assert!(before.iter().any(|k| k == "backend"), "{before:?}");
    for (k, v) in [
        ("multi-queue-num-queues", "0"),
        ("ring-page-order", "two"),
        ("queue-0/ring-ref0", "8"),
        ("protocol", "x86_32-abi"),
    ] {
        dev.xs.write(&format!("{fe}/{k}"), v).expect("write");
    }
    conform::xen::clear_frontend_nodes(&dev.xs, fe).expect("clear");
    let mut after = dev.xs.directory(fe).expect("directory");
    after.sort();
    let mut kept = before.clone();
    kept.sort();
    assert_eq!(after, kept, "only the toolstack's nodes remain");
    assert!(dev
        .xs
        .read_opt(&format!("{fe}/backend"))
        .expect("read")
        .is_some());
}
