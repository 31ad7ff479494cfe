//! Image locking end to end (issue 16, item 6): the daemon locks every image it serves as
//! QEMU does, so a second read-write device of the same image, or an image QEMU's tools
//! hold, is refused with the image and the holder named; QEMU's tools see the daemon's
//! locks; and a handover passes them from one daemon to the next.

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{disk, Host, XENBLKD};
use xenbus::XenbusState;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `qemu-io` writing one sector of a raw image: refused while someone holds its write
/// permission or refuses to share it.
fn qemu_io_write(image: &Path) -> Output {
    Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 512"])
        .arg(image)
        .output()
        .expect("qemu-io (Debian package qemu-utils)")
}

/// Waits until `f` returns `Some`.
fn wait_for<T>(what: &str, host: &Host, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + common::WAIT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            host.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The error the daemon reports for a device, once it failed.
fn device_error(host: &Host, domid: u32, devid: u32) -> String {
    wait_for("the device to fail", host, || {
        host.try_status()?
            .device("xenblkd", domid, devid)?
            .error
            .clone()
    })
}

#[test]
fn a_second_read_write_device_of_one_image_is_refused() {
    let host = Host::start(&[]);
    let image = host.image("shared.img", 8);
    host.create_domain(1);
    host.create_domain(2);
    assert_eq!(
        host.attach(&disk("xenblkd", 1, 51712, &image)),
        XenbusState::InitWait
    );
    host.attach(&disk("xenblkd", 2, 51712, &image));
    let error = device_error(&host, 2, 51712);
    assert!(error.contains(&image.display().to_string()), "{error}");
    assert!(
        error.contains("in use by this xenblkd's device xenblkd/1/51712, which writes it"),
        "{error}"
    );
    // The frontend learns it as from blkback: the error node and Closing.
    let be2 = "/local/domain/0/backend/xenblkd/2/51712";
    assert_eq!(host.state(be2), XenbusState::Closing);
    // The first device is unharmed, and QEMU sees it.
    let first = host.device_status("xenblkd", 1, 51712).unwrap();
    assert!(first.error.is_none(), "{first:?}");
    let out = qemu_io_write(&image);
    assert!(
        !out.status.success() && text(&out).contains("Failed to get \"write\" lock"),
        "qemu-io wrote an image the daemon serves: {}",
        text(&out)
    );

    // Read-only devices of one image share it.
    let ro = host.image("ro.img", 8);
    for domid in 3..=4 {
        host.create_domain(domid);
        let mut spec = disk("xenblkd", domid, 51712, &ro);
        spec.writable = false;
        assert_eq!(host.attach(&spec), XenbusState::InitWait);
    }
    for domid in 3..=4 {
        let d = host.device_status("xenblkd", domid, 51712).unwrap();
        assert!(d.error.is_none(), "{d:?}");
    }
}

/// `qemu-nbd` exporting an image read-write until dropped.
struct QemuNbd(Child);

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_image_qemu_writes_is_refused_naming_qemu() {
    let host = Host::start(&[]);
    let image = host.image("qemu.img", 8);
    let socket = host.dir.path().join("nbd.sock");
    let nbd = QemuNbd(
        Command::new("qemu-nbd")
            .args(["-f", "raw", "-t", "-k"])
            .arg(&socket)
            .arg(&image)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-nbd (Debian package qemu-utils)"),
    );
    // qemu-nbd takes its locks once it runs its export: until then the hotplug check may
    // pass; ask until it is refused.
    let refusal = wait_for("check-target to see qemu-nbd", &host, || {
        let out = Command::new(XENBLKD)
            .args(["check-target"])
            .arg(format!("raw:{}", image.display()))
            .output()
            .unwrap();
        (!out.status.success()).then(|| text(&out))
    });
    assert!(refusal.contains("QEMU or a QEMU tool"), "{refusal}");
    assert!(refusal.contains("which writes it"), "{refusal}");
    assert!(refusal.contains(&image.display().to_string()), "{refusal}");

    host.create_domain(1);
    host.attach(&disk("xenblkd", 1, 51712, &image));
    let error = device_error(&host, 1, 51712);
    assert!(error.contains("QEMU or a QEMU tool"), "{error}");

    // Once QEMU let go, the same image is served.
    drop(nbd);
    host.create_domain(2);
    assert_eq!(
        host.attach(&disk("xenblkd", 2, 51712, &image)),
        XenbusState::InitWait
    );
}

#[test]
fn a_handover_passes_the_locks_to_the_next_daemon() {
    let mut host = Host::start(&[]);
    let image = host.image("handed.img", 8);
    host.create_domain(1);
    assert_eq!(
        host.attach(&disk("xenblkd", 1, 51712, &image)),
        XenbusState::InitWait
    );
    assert!(!qemu_io_write(&image).status.success());
    host.handover(&[]);
    // The new daemon holds the image: it opened it without a conflict once the old one
    // had exited, and QEMU still finds it locked.
    let d = wait_for("the new daemon to open the image", &host, || {
        host.device_status("xenblkd", 1, 51712)
            .filter(|d| d.disk.is_some())
    });
    assert!(d.error.is_none(), "{d:?}\n{}", host.log());
    let out = qemu_io_write(&image);
    assert!(
        !out.status.success() && text(&out).contains("Failed to get \"write\" lock"),
        "{}",
        text(&out)
    );
    // A daemon that stops releases them.
    assert!(host.stop_daemon().success());
    let out = qemu_io_write(&image);
    assert!(out.status.success(), "{}", text(&out));
}
