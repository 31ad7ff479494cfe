//! qcow2 images through every entry point of the daemon, multi-process: a disk under our
//! own backend type with `params` `qcow2:/img` (what `xenblkd attach --format qcow2` and
//! an xl disk line's `target=qcow2:/img` write), `xenblkd attach` itself, refusals of
//! images the daemon does not serve, and a full host file system under one image while
//! another disk keeps working. The guests mirror their writes into a raw reference, and
//! every image ends `qemu-img check` clean and `qemu-img compare` identical to it.

mod common;

use std::path::Path;
use std::process::Command;

use common::{disk, qcow2_chain, qcow2_consistent, qemu_img, Host, XENBLKD};
use xenbus::store::join;
use xenbus::toolstack::Removal;
use xenbus::XenbusState;

#[test]
fn a_qcow2_disk_with_a_backing_chain_end_to_end() {
    let mut host = Host::start(&[]);
    host.create_domain(5);
    let (top, base, reference) = qcow2_chain(&host, "chain", 16);
    let base_before = std::fs::read(&base).unwrap();
    let mut spec = disk("xenblkd", 5, 51712, Path::new("/unused"));
    spec.params = format!("qcow2:{}", top.display());
    assert_eq!(host.attach(&spec), XenbusState::InitWait);
    let be = spec.backend_path();

    let dev = host.device_status("xenblkd", 5, 51712).unwrap();
    assert_eq!(dev.format.as_deref(), Some("qcow2"));
    assert_eq!(
        dev.layers,
        [
            format!("qcow2:{}", top.display()),
            format!("raw:{}", base.display())
        ]
    );
    let text = host.status_text();
    assert!(
        text.contains(&format!(
            "backing chain: qcow2:{} -> raw:{}",
            top.display(),
            base.display()
        )),
        "{text}"
    );
    let mut g = host.guest(
        5,
        51712,
        &["--max-queues", "2", "--mirror", reference.to_str().unwrap()],
        "connect,io:48,discard,flush,io:24,flush,close",
    );
    g.expect("ok connect");
    // Discard is a qcow2 feature (clusters unmapped), whatever the file system can do.
    assert_eq!(
        host.read(&join(&be, "feature-discard")).as_deref(),
        Some("1")
    );
    assert_eq!(
        host.read(&join(&be, "discard-granularity")).as_deref(),
        Some("65536")
    );
    g.finish();
    assert_eq!(host.detach(&spec), Removal::Clean);
    assert_eq!(host.stop_daemon().code(), Some(0));
    qcow2_consistent(&top, &reference);
    assert!(
        std::fs::read(&base).unwrap() == base_before,
        "the backing file changed"
    );
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn xenblkd_attach_serves_qcow2_and_reports_refusals() {
    let mut host = Host::start(&[]);
    host.create_domain(6);
    let (top, _, reference) = qcow2_chain(&host, "attach", 8);
    let attach = |image: &Path, vdev: &str| {
        Command::new(XENBLKD)
            .args(["attach", "6"])
            .arg(image)
            .args([
                vdev,
                "--format",
                "qcow2",
                "--no-wait-connect",
                "--direct-io-safe",
            ])
            .arg("--xenstore-socket")
            .arg(host.xs_socket(0))
            .output()
            .unwrap()
    };
    let out = attach(&top, "xvda");
    assert!(out.status.success(), "{}", text(&out));
    host.guest(
        6,
        51712,
        &["--mirror", reference.to_str().unwrap()],
        "connect,io:16,flush,close",
    )
    .finish();

    // An encrypted image: refused when the disk is added, image and feature named.
    let luks = host.dir.path().join("luks.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "--object",
        "secret,id=sec0,data=123456",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        luks.to_str().unwrap(),
        "4M",
    ]);
    let out = attach(&luks, "xvdb");
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(
        msg.contains(luks.to_str().unwrap()) && msg.contains("encryption (LUKS) is not supported"),
        "{msg}"
    );
    assert!(host
        .read("/local/domain/6/device/vbd/51728/state")
        .is_none());
    // A raw file declared qcow2.
    let raw = host.image("plain.img", 4);
    let out = attach(&raw, "xvdc");
    assert!(!out.status.success());
    assert!(text(&out).contains("not a qcow2 image"), "{}", text(&out));

    let out = Command::new(XENBLKD)
        .args(["detach", "6", "xvda", "--xenstore-socket"])
        .arg(host.xs_socket(0))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(host.stop_daemon().code(), Some(0));
    qcow2_consistent(&top, &reference);
}

/// A small tmpfs, unmounted on drop.
struct SmallFs(tempfile::TempDir);

impl SmallFs {
    fn mount(bytes: u64) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "mounting a tmpfs (the tests run as root)");
        SmallFs(dir)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn a_full_host_file_system_fails_only_that_disks_writes() {
    let mut host = Host::start(&[]);
    host.create_domain(7);
    host.create_domain(8);
    let fs = SmallFs::mount(3 << 20);
    let full = fs.0.path().join("full.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", full.to_str().unwrap(), "64M"]);
    let mut spec = disk("xenblkd", 7, 51712, Path::new("/unused"));
    spec.params = format!("qcow2:{}", full.display());
    assert_eq!(host.attach(&spec), XenbusState::InitWait);
    let other = disk("xenblkd", 8, 51712, &host.image("other.img", 16));
    assert_eq!(host.attach(&other), XenbusState::InitWait);

    // The guest writes at random over 64 MiB: the file system fills up, writes that need
    // a new cluster fail and the `loop` step ends on the first failed one.
    let go_on = host.dir.path().join("go-on");
    let mut g = host.guest(
        7,
        51712,
        &[],
        &format!("connect,loop,flush,wait-file:{},close", go_on.display()),
    );
    let line = g.expect("ok loop");
    assert!(line.contains("write"), "{line}");
    g.expect("ok flush");
    // Only that disk's failed writes were errors; it stays connected, and the other disk
    // and the daemon are unaffected.
    let dev = host.device_status("xenblkd", 7, 51712).unwrap();
    assert_eq!(dev.state, XenbusState::Connected, "{dev:?}");
    assert!(dev.stats["errors"] >= 1, "{dev:?}");
    host.guest(8, 51712, &[], "connect,io:16,flush,close")
        .finish();
    std::fs::write(&go_on, b"").unwrap();
    g.finish();
    assert_eq!(host.detach(&spec), Removal::Clean);
    assert_eq!(host.detach(&other), Removal::Clean);
    assert_eq!(host.stop_daemon().code(), Some(0));
    qemu_img(&["check", "-q", "-f", "qcow2", full.to_str().unwrap()]);
}
