//! The main job and the benchmark as a user runs them: `xenblkd demo` exits 0 after
//! verifying its data set, and `xenblkd bench --json` prints one JSON object of the
//! documented shape.

use std::process::Command;

fn xenblkd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_xenblkd"))
}

fn sparse_image(dir: &tempfile::TempDir, name: &str, size: u64) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path
}

#[test]
fn demo_verifies_its_data_set_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_image(&dir, "demo.img", 64 << 20);
    let out = xenblkd()
        .args(["demo", "--data", "16M", "--bench-secs", "0.3", "--image"])
        .arg(&image)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for needle in [
        "negotiated over xenstore",
        "persistent grants",
        "indirect segments",
        "verified 16 MiB",
        "byte for byte",
        "reads back as zeros",
        "randread",
        "detached cleanly: 0 grants mapped",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
}

fn bench_json(extra: &[&str]) -> serde_json::Value {
    let out = xenblkd()
        .args(["bench", "--runtime", "0.3", "--json"])
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("not one JSON object ({e}): {stdout}"))
}

fn positive(v: &serde_json::Value, path: &[&str]) -> f64 {
    let mut cur = v;
    for p in path {
        cur = cur
            .get(p)
            .unwrap_or_else(|| panic!("missing {path:?} in {v}"));
    }
    let x = cur
        .as_f64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in {v}"));
    assert!(x > 0.0, "{path:?} = {x}");
    x
}

#[test]
fn bench_json_has_the_documented_shape() {
    let v = bench_json(&["--storage", "null", "--size", "64M", "--iodepth", "16"]);
    positive(&v, &["iops"]);
    positive(&v, &["bw_mib_s"]);
    positive(&v, &["lat_us", "p50"]);
    positive(&v, &["lat_us", "p99"]);
    assert_eq!(v["errors"], 0);
    assert!(v.get("baseline").is_none());
}

#[test]
fn bench_baseline_reports_ratios_on_the_same_image() {
    let dir = tempfile::tempdir().unwrap();
    let image = sparse_image(&dir, "bench.img", 32 << 20);
    let image = image.to_str().unwrap();
    let v = bench_json(&[
        "--image",
        image,
        "--size",
        "32M",
        "--rw",
        "randread",
        "--baseline",
        "--direct",
        "off",
    ]);
    let iops = positive(&v, &["iops"]);
    let base = positive(&v, &["baseline", "iops"]);
    positive(&v, &["baseline", "bw_mib_s"]);
    let ratio = positive(&v, &["ratio_iops"]);
    positive(&v, &["ratio_bw"]);
    assert!((ratio - iops / base).abs() < 1e-6 * ratio.max(1.0));
    assert_eq!(v["image"], image);
}

/// A missing image is reported as what it is (the path and the OS error), by the demo and
/// the benchmark alike, not as a guest that failed to connect.
#[test]
fn a_missing_image_is_named_with_the_os_error() {
    for args in [
        &["demo", "--image", "/nonexistent/disk.img"][..],
        &[
            "bench",
            "--runtime",
            "0.1",
            "--image",
            "/nonexistent/disk.img",
        ][..],
    ] {
        let out = xenblkd()
            .args(args)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            stderr.contains("/nonexistent/disk.img")
                && stderr.contains("No such file or directory")
                && !stderr.contains("not waiting for us"),
            "{args:?}:\n{stderr}"
        );
    }
}

#[test]
fn bench_takes_a_qcow2_image() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("bench.qcow2");
    let image = image.to_str().unwrap();
    let out = std::process::Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "preallocation=metadata",
            image,
            "32M",
        ])
        .output()
        .expect("qemu-img (Debian package qemu-utils)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = bench_json(&[
        "--image", image, "--size", "32M", "--rw", "randread", "--direct", "off",
    ]);
    positive(&v, &["iops"]);
    assert_eq!(v["format"], "qcow2");
    assert_eq!(v["errors"], 0);
    // Every cluster is allocated: reads go to io_uring, the worker only loads L2 tables.
    let mapped = positive(&v, &["qcow2_mapped_requests"]);
    let worker = v["qcow2_worker_requests"].as_f64().unwrap();
    assert!(worker < mapped / 100.0, "mapped {mapped}, worker {worker}");
    // The io_uring baseline is not the guest's disk for a qcow2 image.
    let out = xenblkd()
        .args(["bench", "--runtime", "0.1", "--image", image, "--baseline"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("qemu-img bench"));
}

#[test]
fn demo_runs_on_a_qcow2_image_with_a_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = sparse_image(&dir, "base.img", 64 << 20);
    let top = dir.path().join("demo.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(&top)
        .output()
        .expect("qemu-img (Debian package qemu-utils)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = xenblkd()
        .args(["demo", "--data", "16M", "--bench-secs", "0.3", "--image"])
        .arg(&top)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let chain = format!(
        "({}), backing chain qcow2:{} -> raw:{}",
        "qcow2",
        top.canonicalize().unwrap().display(),
        base.canonicalize().unwrap().display()
    );
    for needle in [
        chain.as_str(),
        "verified 16 MiB",
        "reads back as zeros",
        "detached cleanly",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
    let check = Command::new("qemu-img")
        .arg("check")
        .arg(&top)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}
