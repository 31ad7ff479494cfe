//! The operator's commands against a running daemon, multi-process: `xenblkd attach`
//! (first free vdev, read-only, refusal reported and cleaned up), `xenblkd detach`, and
//! `xenblkd xenstore ls`.

mod common;

use std::process::Command;

use common::{text, xenblkd, Host, XENBLKD};
use xenbus::XenbusState;

#[test]
fn attach_and_detach_commands() {
    let host = Host::start(&[]);
    host.create_domain(6);
    let img = host.image("cli.img", 16);
    let img = img.to_str().unwrap();

    // First free name, guest not connected yet: returns after InitWait.
    let out = xenblkd(
        &host,
        &["attach", "6", img, "--no-wait-connect", "--direct-io-safe"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("as xvda (device 51712) of domain 6"),
        "{}",
        text(&out)
    );
    // The same image again, even read-only, is refused: the daemon writes it (QEMU's
    // image locking, issue 16).
    let out = xenblkd(
        &host,
        &["attach", "6", img, "--read-only", "--no-wait-connect"],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("is in use by another xenblkd process, which writes it"),
        "{}",
        text(&out)
    );
    let ro_img = host.image("cli-ro.img", 16);
    let out = xenblkd(
        &host,
        &[
            "attach",
            "6",
            ro_img.to_str().unwrap(),
            "--read-only",
            "--no-wait-connect",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("as xvdb"), "{}", text(&out));
    let be_b = "/local/domain/0/backend/xenblkd/6/51728";
    assert_eq!(host.read(&format!("{be_b}/mode")).as_deref(), Some("r"));
    assert_eq!(host.state(be_b), XenbusState::InitWait);

    // A guest uses both.
    host.guest(6, 51712, &[], "connect,io:8,close").finish();
    host.guest(
        6,
        51728,
        &["--no-honour-read-only"],
        "connect,ro-check,close",
    )
    .finish();

    // `xenstore ls` shows what attach wrote.
    let out = Command::new(XENBLKD)
        .args(["xenstore", "--socket"])
        .arg(host.xs_socket(0))
        .args(["ls", "/local/domain/6/device/vbd/51712"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(r#"/local/domain/6/device/vbd/51712/backend = "/local/domain/0/backend/xenblkd/6/51712""#),
        "{}",
        text(&out)
    );

    for vdev in ["xvda", "xvdb"] {
        let out = xenblkd(&host, &["detach", "6", vdev]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            text(&out).contains(&format!("detached {vdev} from domain 6")),
            "{}",
            text(&out)
        );
    }
    let out = xenblkd(&host, &["detach", "6", "xvda"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("no such device"), "{}", text(&out));

    // A disk the backend refuses (a raw file declared qcow2): the reason is printed and
    // nothing is left behind.
    let out = xenblkd(
        &host,
        &[
            "attach",
            "6",
            img,
            "xvdc",
            "--format",
            "qcow2",
            "--no-wait-connect",
        ],
    );
    assert!(!out.status.success());
    assert!(text(&out).contains("not a qcow2 image"), "{}", text(&out));
    assert!(host
        .read("/local/domain/0/backend/xenblkd/6/51744/state")
        .is_none());
    assert!(host
        .read("/local/domain/6/device/vbd/51744/state")
        .is_none());
    // A missing image never reaches xenstore, and the error names it and the OS error.
    let out = xenblkd(
        &host,
        &["attach", "6", "/nonexistent.img", "--no-wait-connect"],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("/nonexistent.img") && text(&out).contains("No such file"),
        "{}",
        text(&out)
    );
    assert!(host.status().devices.is_empty());
}

/// Without RUST_LOG the daemon logs at info: an operator sees devices reach InitWait and
/// Connected, and a device whose storage cannot be opened is reported with the file and
/// the OS error (in the log and in the `error` node the toolstack reads).
#[test]
fn serve_logs_lifecycle_and_storage_errors_by_default() {
    let mut host = Host::start(&[]);
    host.stop_daemon();
    host.start_daemon_logging(&[], None);
    host.create_domain(7);
    let img = host.image("log.img", 16);
    let spec = common::disk("xenblkd", 7, 51712, &img);
    assert_eq!(host.attach(&spec), XenbusState::InitWait);
    host.guest(7, 51712, &[], "connect,io:4,close").finish();

    let missing = common::disk(
        "xenblkd",
        7,
        51728,
        std::path::Path::new("/nonexistent/x.img"),
    );
    host.attach(&missing);
    let be = missing.backend_path();
    host.wait_state(&be, XenbusState::Closing);
    let error = host.read(&format!("{be}/error")).unwrap();
    assert!(
        error.starts_with("2 ") && error.contains("/nonexistent/x.img"),
        "{error}"
    );

    let log = host.log();
    for needle in [
        "InitWait",
        "Connected",
        "/nonexistent/x.img",
        "No such file or directory",
    ] {
        assert!(
            log.contains(needle),
            "{needle:?} missing from the default log:\n{log}"
        );
    }
    assert!(
        log.lines().any(|l| l.contains(" INFO ")),
        "no info line in the default log:\n{log}"
    );
}
