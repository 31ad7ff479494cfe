//! Pause, resume and reopen through the control socket and the CLI (issue 16, item 7), on
//! the simulator under verified random I/O: a pause answers what is in flight and holds
//! (the guest sees latency, never an error, and nothing reaches the image meanwhile),
//! resume continues, and a reopen after an external snapshot (a qcow2 overlay created by
//! `qemu-img` over the image, `params` switched to it) serves the overlay with the new
//! size published, the old image now a read-only, locked backing file.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::thread;
use std::time::Duration;

use common::{line_numbers, start_rw_guest, Host, XENBLKD};
use xenbus::store::StoreExt;
use xenbus::XenbusState;

const DEV: &str = "xenblkd/1/51712";
const BACKEND: &str = "/local/domain/0/backend/xenblkd/1/51712";
/// I/O between two steps.
const RUN: Duration = Duration::from_millis(500);
/// How long a pause is held.
const HOLD: Duration = Duration::from_millis(1500);

fn ctl(host: &Host, cmd: &str, device: &str) -> Output {
    Command::new(XENBLKD)
        .args([cmd, device, "--control-socket"])
        .arg(&host.control)
        .output()
        .unwrap()
}

/// Runs `xenblkd <cmd> <device>`, which must succeed; returns what it printed.
fn ok(host: &Host, cmd: &str, device: &str) -> String {
    let out = ctl(host, cmd, device);
    assert!(
        out.status.success(),
        "xenblkd {cmd} {device}: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        host.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `xenblkd <cmd> <device>`, which must fail; returns its error.
fn refused(host: &Host, cmd: &str, device: &str) -> String {
    let out = ctl(host, cmd, device);
    assert!(
        !out.status.success(),
        "xenblkd {cmd} {device} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn contents(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn a_pause_holds_without_errors_and_resume_continues() {
    let host = Host::start(&[]);
    let stop = host.dir.path().join("stop");
    let mut guest = start_rw_guest(&host, 1, &[51712], 16, &stop);
    let image = host.dir.path().join("d1-51712.img");

    assert!(refused(&host, "reopen", DEV).contains("only while paused"));
    assert!(ok(&host, "resume", DEV).contains("not paused"));
    assert!(refused(&host, "pause", "xenblkd/9/51712").contains("no device"));

    thread::sleep(RUN);
    let answer = ok(&host, "pause", DEV);
    assert!(answer.contains("paused ("), "{answer}");
    let d = host.device_status("xenblkd", 1, 51712).unwrap();
    assert!(d.paused, "{d:?}");
    assert_eq!(d.state, XenbusState::Connected);
    assert!(host.status_text().contains("PAUSED"));
    assert!(ok(&host, "pause", "1/xvda").contains("already paused"));

    // Held: the guest keeps its requests queued, and nothing reaches the image.
    let before = contents(&image);
    thread::sleep(HOLD);
    assert!(contents(&image) == before, "the image changed while paused");
    assert_eq!(host.state(BACKEND), XenbusState::Connected);

    assert!(ok(&host, "resume", "1/xvda").contains("resumed"));
    assert!(!host.device_status("xenblkd", 1, 51712).unwrap().paused);
    thread::sleep(RUN);
    // And once more, short.
    ok(&host, "pause", DEV);
    ok(&host, "resume", DEV);
    thread::sleep(RUN);

    std::fs::write(&stop, b"").unwrap();
    let done = guest.expect("ok rw-until");
    let n = line_numbers(&done);
    println!("{done}");
    assert_eq!(n["errors"], 0, "{done}");
    assert_eq!(n["mismatches"], 0, "{done}");
    assert_eq!(n["state_events"], 0, "{done}");
    assert!(n["reads"] > 0 && n["writes"] > 0, "{done}");
    // The guest saw the pause as latency.
    assert!(
        n["max_ms"] >= HOLD.as_millis() as u64 - 100,
        "no request waited out the pause: {done}"
    );
    guest.expect("ok close");
    guest.finish();
}

#[test]
fn reopen_after_an_external_snapshot_serves_the_overlay() {
    let mut host = Host::start(&[]);
    let stop = host.dir.path().join("stop");
    let mut guest = start_rw_guest(&host, 1, &[51712], 16, &stop);
    let base = host.dir.path().join("d1-51712.img");
    thread::sleep(RUN);

    ok(&host, "pause", DEV);
    // The snapshot tool's part: a qcow2 overlay over the paused image, 8 MiB larger, and
    // the device pointed at it.
    let overlay = host.dir.path().join("snap.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(&base)
        .args(["-F", "raw"])
        .arg(&overlay)
        .arg("24M")
        .output()
        .expect("qemu-img (Debian package qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img create beside the paused daemon: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    host.xs
        .write_str(
            &format!("{BACKEND}/params"),
            &format!("qcow2:{}", overlay.display()),
        )
        .unwrap();
    let answer = ok(&host, "reopen", DEV);
    assert!(answer.contains("25165824 bytes (was 16777216)"), "{answer}");
    let d = host.device_status("xenblkd", 1, 51712).unwrap();
    assert_eq!(d.format.as_deref(), Some("qcow2"), "{d:?}");
    assert_eq!(d.layers.len(), 2, "{d:?}");
    assert_eq!(
        host.read(&format!("{BACKEND}/sectors")).as_deref(),
        Some("49152")
    );
    let base_then = contents(&base);

    ok(&host, "resume", DEV);
    thread::sleep(RUN);
    std::fs::write(&stop, b"").unwrap();
    let done = guest.expect("ok rw-until");
    let n = line_numbers(&done);
    println!("{done}");
    assert_eq!(n["errors"], 0, "{done}");
    // What the guest wrote before the snapshot reads back through the overlay.
    assert_eq!(n["mismatches"], 0, "{done}");
    assert!(n["reads"] > 0 && n["writes"] > 0, "{done}");

    // Every write since went to the overlay; the base is a backing file now, which nobody
    // may write while we serve it.
    assert!(contents(&base) == base_then, "the base image was written");
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512"])
        .arg(&base)
        .output()
        .unwrap();
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("Failed to get \"write\" lock"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    guest.expect("ok close");
    guest.finish();
    // Closed by the daemon (metadata written, locks released), the overlay is sound.
    assert!(host.stop_daemon().success());
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&overlay)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
