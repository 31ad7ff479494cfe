//! libxl's route end to end, multi-process: the test writes a `backendtype=phy` disk with
//! `script=` the way libxl does, waits for InitWait (libxl's 10 s), then runs the shipped
//! `scripts/xenblkd-hotplug add` exactly as libxl would (XENBUS_PATH, `add`), the guest
//! connects and does verified I/O; on removal the script runs with `remove`.
//!
//! The script talks to xenstore with xenstore-read/-write/-rm. Here those are thin shims
//! over `xenblkd xenstore` (the simulator's xenstored speaks the same protocol as the real
//! one; Debian's xenstore-utils work against it too, through XENSTORED_PATH).

mod common;

use std::path::Path;
use std::process::Command;

use common::{disk, hotplug_script as script, run_hotplug as run_script, Host};
use xenbus::store::{join, Store};
use xenbus::toolstack::Removal;
use xenbus::XenbusState;

/// A loop device over a file, detached on drop.
struct Loop(String);

impl Loop {
    fn new(file: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(String::from_utf8(out.stdout).unwrap().trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn libxl_phy_route_with_the_hotplug_script() {
    let host = Host::start(&[]);
    let file_img = host.image("file.img", 16);
    let dev_img = host.image("dev.img", 16);
    let lo = Loop::new(&dev_img);
    let (qcow2_img, _, qcow2_ref) = common::qcow2_chain(&host, "hotplug", 16);
    // (domid, params as the xl disk line's target gives it)
    let cases = [
        (1u32, format!("aio:{}", file_img.display())),
        (2, lo.0.clone()),
        (5, format!("qcow2:{}", qcow2_img.display())),
    ];
    for (domid, params) in cases {
        host.create_domain(domid);
        let mut spec = disk("vbd", domid, 51712, Path::new("/unused"));
        spec.params = params.clone();
        spec.script = Some(script().display().to_string());
        assert_eq!(host.attach(&spec), XenbusState::InitWait);
        let be = spec.backend_path();
        let xenbus_path = format!("backend/vbd/{domid}/51712");
        let (ok, err) = run_script(&host, "add", &xenbus_path);
        assert!(ok, "hotplug add failed: {err}");
        assert_eq!(
            host.read(&join(&be, "hotplug-status")).as_deref(),
            Some("connected")
        );
        let resolved = host.read(&join(&be, "physical-device-path")).unwrap();
        if domid == 2 {
            assert_eq!(resolved, lo.0);
            let devnum = host.read(&join(&be, "physical-device")).unwrap();
            assert!(
                devnum.starts_with("7:"),
                "loop devices are major 7: {devnum}"
            );
        } else {
            let img = if domid == 5 { &qcow2_img } else { &file_img };
            assert_eq!(Path::new(&resolved), std::fs::canonicalize(img).unwrap());
            assert_eq!(host.read(&join(&be, "physical-device")), None);
        }
        let mut args = vec!["--max-queues", "2"];
        if domid == 5 {
            args.extend(["--mirror", qcow2_ref.to_str().unwrap()]);
        }
        let g = host.guest(domid, 51712, &args, "connect,io:16,flush,close");
        g.finish();
        if domid == 5 {
            let dev = host.device_status("vbd", domid, 51712).unwrap();
            assert_eq!(dev.format.as_deref(), Some("qcow2"), "{dev:?}");
        }
        assert_eq!(host.detach(&spec), Removal::Clean);
        let (ok, err) = run_script(&host, "remove", &xenbus_path);
        assert!(ok, "hotplug remove failed: {err}");
        if domid == 5 {
            // The device is gone, so the image is closed (and flushed).
            common::qcow2_consistent(&qcow2_img, &qcow2_ref);
        }
    }
    // An NBD export: the script passes the URI on; the guest is served from qemu-nbd.
    let nbd_img = host.image("nbd.img", 16);
    let sock = nbd_img.with_extension("sock");
    let server = storage::nbd::testing::NbdServer::qemu_nbd(
        &nbd_img,
        storage::nbd::testing::Listen::Unix(sock.clone()),
        &[],
    )
    .unwrap();
    host.create_domain(5);
    let mut spec = disk("vbd", 5, 51712, Path::new("/unused"));
    spec.params = format!("aio:{}", server.uri(""));
    spec.script = Some(script().display().to_string());
    assert_eq!(host.attach(&spec), XenbusState::InitWait);
    let be = spec.backend_path();
    let (ok, err) = run_script(&host, "add", "backend/vbd/5/51712");
    assert!(ok, "hotplug add failed: {err}");
    assert_eq!(
        host.read(&join(&be, "physical-device-path")),
        Some(server.uri(""))
    );
    host.guest(5, 51712, &[], "connect,io:16,flush,close")
        .finish();
    assert_eq!(host.detach(&spec), Removal::Clean);
    // No server behind the socket: the attach fails with the reason.
    host.create_domain(6);
    let mut spec = disk("vbd", 6, 51712, Path::new("/unused"));
    spec.params = format!(
        "nbd+unix:///x?socket={}",
        sock.with_extension("none").display()
    );
    spec.script = Some(script().display().to_string());
    host.attach(&spec);
    let (ok, _) = run_script(&host, "add", "backend/vbd/6/51712");
    assert!(!ok);
    assert!(host
        .read(&join(&spec.backend_path(), "hotplug-error"))
        .unwrap()
        .contains("does not exist"));
    assert_eq!(host.detach(&spec), Removal::Clean);

    // A target the script refuses: libxl reads hotplug-error and fails the attach.
    host.create_domain(3);
    let mut spec = disk("vbd", 3, 51712, Path::new("/unused"));
    spec.params = "vhd:/images/x.vhd".into();
    spec.script = Some(script().display().to_string());
    host.attach(&spec);
    let (ok, _) = run_script(&host, "add", "backend/vbd/3/51712");
    assert!(!ok);
    let be = spec.backend_path();
    assert!(host
        .read(&join(&be, "hotplug-error"))
        .unwrap()
        .contains("unsupported target"));
    assert_eq!(
        host.read(&join(&be, "hotplug-status")).as_deref(),
        Some("error")
    );
    // The device never opened anything and is removed cleanly.
    assert_eq!(host.detach(&spec), Removal::Clean);

    // A block device someone else holds exclusively (O_EXCL, as a mounted file system
    // does): the script opens it as the daemon would and refuses at once, with the OS error.
    {
        use std::os::unix::fs::OpenOptionsExt;
        let _held = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(&lo.0)
            .expect("holding the loop device exclusively");
        host.create_domain(5);
        let mut spec = disk("vbd", 5, 51712, Path::new("/unused"));
        spec.params = lo.0.clone();
        spec.script = Some(script().display().to_string());
        host.attach(&spec);
        let (ok, err) = run_script(&host, "add", "backend/vbd/5/51712");
        assert!(!ok, "the script accepted a busy device: {err}");
        let be = spec.backend_path();
        let why = host.read(&join(&be, "hotplug-error")).unwrap();
        assert!(
            why.contains(&lo.0) && why.contains("busy"),
            "hotplug-error: {why}"
        );
        assert_eq!(host.read(&join(&be, "physical-device-path")), None);
        assert_eq!(host.detach(&spec), Removal::Clean);
    }

    // A script that publishes a path and a device number that disagree: refused.
    host.create_domain(4);
    let mut spec = disk("vbd", 4, 51712, Path::new("/unused"));
    spec.params = lo.0.clone();
    host.attach(&spec);
    let be = spec.backend_path();
    host.xs
        .transaction(&mut |tx| {
            tx.write(&join(&be, "physical-device-path"), lo.0.as_bytes())?;
            tx.write(&join(&be, "physical-device"), b"1:3")
        })
        .unwrap();
    host.wait_state(&be, XenbusState::Closing);
    let err = host.read(&join(&be, "error")).unwrap();
    assert!(err.contains("but physical-device says 1:3"), "{err}");
    assert_eq!(host.detach(&spec), Removal::Clean);
}
