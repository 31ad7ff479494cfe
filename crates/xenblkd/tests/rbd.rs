//! Ceph RBD images end to end, on a real single-node cluster (scripts/ceph-cluster, one
//! per test binary): the daemon serving a simulated guest's blkfront from an `rbd:` disk
//! beside a file-backed one, an OSD stopped mid-I/O, the libxl phy route through the
//! hotplug script, `xenblkd attach` refusals, `xenblkd demo` and `xenblkd bench` on an
//! image.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{disk, run_hotplug, Host, XENBLKD};
use storage::rbd::testing::{fault_guard, io_guard, Cluster};
use xenbus::store::join;
use xenbus::toolstack::Removal;
use xenbus::XenbusState;

fn text(out: &std::process::Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Guest 6 runs verified I/O, flush and discard on an RBD image while guest 7 does the
/// same on a file; status names the format; `rbd resize` reaches the guest online.
#[test]
fn guest_io_on_an_rbd_disk_beside_a_file_disk() {
    let _g = io_guard();
    let c = Cluster::shared();
    let host = Host::start(&[]);
    host.create_domain(6);
    host.create_domain(7);
    let name = c.unique_name("guest");
    let target = c.create_image(&name, 64).unwrap();
    let spec = disk("xenblkd", 6, 51712, Path::new(&target));
    assert_eq!(host.attach(&spec), XenbusState::InitWait);
    let other = disk("xenblkd", 7, 51712, &host.image("file.img", 16));
    assert_eq!(host.attach(&other), XenbusState::InitWait);
    let mut guest = host.guest(
        6,
        51712,
        &[],
        &format!(
            "connect,io:24,flush,discard,io:8,wait-capacity:{},io:4,close",
            80 << 20
        ),
    );
    let mut bystander = host.guest(7, 51712, &[], "connect,io:24,close");
    let connected = guest.expect("ok connect");
    assert!(
        connected.contains(&format!("capacity={}", 64 << 20)),
        "{connected}"
    );
    guest.expect("ok io:24");
    let dev = host
        .device_status("xenblkd", 6, 51712)
        .expect("device status");
    assert_eq!(dev.format.as_deref(), Some("rbd"), "{dev:?}");
    assert!(host.status_text().contains("rbd"), "{}", host.status_text());
    guest.expect("ok discard");
    guest.expect("ok io:8");
    c.resize_image(&name, 80).unwrap();
    guest.expect("ok wait-capacity");
    guest.expect("ok close");
    bystander.expect("ok close");
    guest.finish();
    bystander.finish();
    assert_eq!(host.detach(&spec), Removal::Clean);
}

/// The OSD stops while guest 6 writes: its write fails within the op timeout (3 s, set in
/// the target), guest 7's file disk keeps working meanwhile, and after the OSD is back
/// guest 6's verified I/O succeeds again on the same connection.
#[test]
fn a_stopped_osd_fails_only_that_disks_requests() {
    let _g = fault_guard();
    let c = Cluster::shared();
    let host = Host::start(&[]);
    host.create_domain(6);
    host.create_domain(7);
    let target = format!(
        "{}:rados_osd_op_timeout=3",
        c.create_image(&c.unique_name("fault"), 32).unwrap()
    );
    let spec = disk("xenblkd", 6, 51712, Path::new(&target));
    assert_eq!(host.attach(&spec), XenbusState::InitWait);
    let other = disk("xenblkd", 7, 51712, &host.image("file.img", 16));
    assert_eq!(host.attach(&other), XenbusState::InitWait);
    let dir = tempfile::tempdir().unwrap();
    let (stopped, back) = (dir.path().join("stopped"), dir.path().join("back"));
    let mut guest = host.guest(
        6,
        51712,
        &[],
        &format!(
            "connect,io:8,wait-file:{},expect-write-error,wait-file:{},io:8,flush,close",
            stopped.display(),
            back.display()
        ),
    );
    guest.expect("ok io:8");
    c.stop_osd().unwrap();
    let start = Instant::now();
    std::fs::write(&stopped, b"").unwrap();
    let mut bystander = host.guest(7, 51712, &[], "connect,io:16,close");
    guest.expect("ok expect-write-error");
    let failed_after = start.elapsed();
    bystander.expect("ok close");
    c.start_osd().unwrap();
    std::fs::write(&back, b"").unwrap();
    guest.expect("ok io:8");
    guest.expect("ok close");
    bystander.finish();
    guest.finish();
    assert!(
        failed_after < Duration::from_secs(15),
        "the write failed after {failed_after:?}"
    );
    assert!(host.try_status().is_some(), "the daemon must keep running");
}

/// libxl's phy route: `target=rbd:pool/image` becomes params `aio:rbd:...`; the hotplug
/// script opens it once and passes it on; a missing image fails the attach with the image
/// and the error named.
#[test]
fn hotplug_script_passes_rbd_targets_on() {
    let _g = io_guard();
    let c = Cluster::shared();
    let host = Host::start(&[]);
    host.create_domain(5);
    let target = c.create_image(&c.unique_name("phy"), 16).unwrap();
    let mut spec = disk("vbd", 5, 51712, Path::new("/unused"));
    spec.params = format!("aio:{target}");
    spec.script = Some(common::hotplug_script().display().to_string());
    assert_eq!(host.attach(&spec), XenbusState::InitWait);
    let (ok, err) = run_hotplug(&host, "add", "backend/vbd/5/51712");
    assert!(ok, "hotplug add failed: {err}");
    assert_eq!(
        host.read(&join(&spec.backend_path(), "physical-device-path")),
        Some(target.clone())
    );
    host.guest(5, 51712, &[], "connect,io:8,flush,close")
        .finish();
    assert_eq!(host.detach(&spec), Removal::Clean);

    host.create_domain(6);
    let mut spec = disk("vbd", 6, 51712, Path::new("/unused"));
    spec.params = c.target("no-such-image");
    spec.script = Some(common::hotplug_script().display().to_string());
    host.attach(&spec);
    let (ok, _) = run_hotplug(&host, "add", "backend/vbd/6/51712");
    assert!(!ok);
    let why = host
        .read(&join(&spec.backend_path(), "hotplug-error"))
        .unwrap_or_default();
    assert!(
        why.contains("rbd:rbd/no-such-image") && why.contains("No such file"),
        "{why}"
    );
    assert_eq!(host.detach(&spec), Removal::Clean);
}

/// `xenblkd attach` serves an image, and refuses a missing one before writing anything.
#[test]
fn xenblkd_attach_serves_rbd_and_refuses_missing_images() {
    let _g = io_guard();
    let c = Cluster::shared();
    let host = Host::start(&[]);
    host.create_domain(6);
    let attach = |target: &str, vdev: &str| {
        Command::new(XENBLKD)
            .args(["attach", "6", target, vdev, "--no-wait-connect"])
            .arg("--xenstore-socket")
            .arg(host.xs_socket(0))
            .output()
            .unwrap()
    };
    let target = c.create_image(&c.unique_name("attach"), 16).unwrap();
    let out = attach(&target, "xvda");
    assert!(out.status.success(), "{}", text(&out));
    host.guest(6, 51712, &[], "connect,io:8,close").finish();

    let out = attach(&c.target("missing"), "xvdb");
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(
        msg.contains("rbd:rbd/missing") && msg.contains("No such file"),
        "{msg}"
    );
    assert_eq!(host.read("/local/domain/6/device/vbd/51728/backend"), None);
    let out = attach(&format!("rbd:nopool/x:conf={}", c.conf().display()), "xvdb");
    assert!(!out.status.success());
    assert!(text(&out).contains("opening pool nopool"), "{}", text(&out));
    let out = Command::new(XENBLKD)
        .args(["attach", "6", &target, "xvdb", "--format", "qcow2"])
        .arg("--xenstore-socket")
        .arg(host.xs_socket(0))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("served as raw"), "{}", text(&out));
}

#[test]
fn demo_and_bench_take_an_rbd_image() {
    let _g = io_guard();
    let c = Cluster::shared();
    let target = c.create_image(&c.unique_name("demo"), 64).unwrap();
    let out = Command::new(XENBLKD)
        .args([
            "demo",
            "--data",
            "16M",
            "--bench-secs",
            "0.3",
            "--image",
            &target,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{}", text(&out));
    assert!(stdout.contains("verified 16 MiB"), "{stdout}");

    let out = Command::new(XENBLKD)
        .args([
            "bench",
            "--runtime",
            "0.3",
            "--json",
            "--size",
            "32M",
            "--image",
            &target,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "bench failed:\n{}", text(&out));
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert!(v["iops"].as_f64().unwrap_or(0.0) > 0.0, "{v}");
}
