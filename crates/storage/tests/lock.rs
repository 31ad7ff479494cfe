//! Image locking against real QEMU tools (`qemu-img`, `qemu-io`, `qemu-nbd`; Debian:
//! qemu-utils): QEMU sees our locks and we see QEMU's.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use storage::lock::{lock_storage, HolderKind, ImageLock, LockError, Permissions, PERM_WRITE};
use storage::{DirectIo, OpenOptions, Qcow2Storage, Storage};

fn options(read_only: bool) -> OpenOptions {
    OpenOptions {
        read_only,
        direct_io: DirectIo::Off,
        exclusive: false,
    }
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} (Debian package qemu-utils): {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn raw_image(dir: &Path, name: &str) -> PathBuf {
    let img = dir.join(name);
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    img
}

/// Whether /proc/locks lists an OFD lock on `image`'s inode.
fn ofd_locked(image: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = format!(":{} ", std::fs::metadata(image).unwrap().ino());
    std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .any(|l| l.contains("OFDLCK") && l.contains(&ino))
}

/// `qemu-nbd` serving `image` on a unix socket until dropped.
struct QemuNbd {
    child: Child,
}

impl QemuNbd {
    fn start(image: &Path, format: &str, read_only: bool, socket: &Path) -> QemuNbd {
        let mut cmd = Command::new("qemu-nbd");
        cmd.args(["-f", format, "-t", "-k", p(socket)]);
        if read_only {
            cmd.arg("-r");
        }
        let child = cmd
            .arg(image)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-nbd (Debian package qemu-utils)");
        // qemu-nbd creates its socket before it sets its permissions on the image: wait
        // for its lock bytes, as the kernel lists them.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(socket.exists() && ofd_locked(image)) {
            assert!(Instant::now() < deadline, "qemu-nbd did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        QemuNbd { child }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn qemu_sees_a_writer() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "disk.raw");
    let disk: Arc<dyn Storage> = storage::open(&img, options(false)).unwrap();
    let locked = lock_storage(disk, &img, "xenblkd/5/51712").unwrap();

    let out = run("qemu-io", &["-f", "raw", "-c", "write 0 512", p(&img)]);
    assert!(
        !out.status.success() && text(&out).contains("Failed to get \"write\" lock"),
        "qemu-io wrote beside us: {}",
        text(&out)
    );
    // QEMU's raw driver passes its user's shared permissions through, and its tools
    // share writes when they only read: they may look.
    let out = run("qemu-img", &["info", "-f", "raw", p(&img)]);
    assert!(out.status.success(), "{}", text(&out));
    let out = run("qemu-io", &["-r", "-f", "raw", "-c", "read 0 512", p(&img)]);
    assert!(out.status.success(), "{}", text(&out));

    drop(locked);
    let out = run("qemu-io", &["-f", "raw", "-c", "write 0 512", p(&img)]);
    assert!(out.status.success(), "after release: {}", text(&out));
}

#[test]
fn a_qemu_writer_shuts_us_out_and_names_itself() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "disk.raw");
    let nbd = QemuNbd::start(&img, "raw", false, &dir.path().join("nbd.sock"));

    let disk: Arc<dyn Storage> = storage::open(&img, options(false)).unwrap();
    let Err(e) = lock_storage(disk, &img, "xenblkd/5/51712") else {
        panic!("locked an image qemu-nbd writes")
    };
    let msg = e.to_string();
    assert!(msg.contains(p(&img)), "{msg}");
    assert!(msg.contains("QEMU or a QEMU tool"), "{msg}");
    assert!(msg.contains("which writes it"), "{msg}");
    let holder = e.holder().unwrap();
    assert_eq!(holder.kind, HolderKind::Qemu);
    assert_ne!(holder.perm & PERM_WRITE, 0);
    // Read-only is refused too: a writer does not share writes with readers either.
    assert!(matches!(
        ImageLock::acquire(&img, Permissions::raw(true), "ro"),
        Err(LockError::Conflict { .. })
    ));
    drop(nbd);
    ImageLock::acquire(&img, Permissions::raw(false), "after").unwrap();
}

#[test]
fn read_only_users_share_and_a_writer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = raw_image(dir.path(), "disk.raw");
    let _nbd = QemuNbd::start(&img, "raw", true, &dir.path().join("nbd.sock"));

    let ro: Arc<dyn Storage> = storage::open(&img, options(true)).unwrap();
    let _ro = lock_storage(ro, &img, "xenblkd/5/51713").expect("readers share");
    // qemu-img as a reader shares with both of us.
    let out = run("qemu-img", &["info", "-f", "raw", p(&img)]);
    assert!(out.status.success(), "{}", text(&out));
    // A writer (ours) is refused: our own reader refuses to share writes.
    let rw: Arc<dyn Storage> = storage::open(&img, options(false)).unwrap();
    let Err(e) = lock_storage(rw, &img, "xenblkd/6/51712") else {
        panic!("a writer beside readers")
    };
    assert!(
        e.to_string().contains("cannot get the \"write\" lock"),
        "{e}"
    );
}

#[test]
fn a_qcow2_chain_locks_its_backing_files_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    let out = run("qemu-img", &["create", "-q", "-f", "qcow2", p(&base), "4M"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            p(&top),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));

    let disk: Arc<dyn Storage> = Arc::new(Qcow2Storage::open(&top, options(false)).unwrap());
    let locked = lock_storage(disk, &top, "xenblkd/7/51712").unwrap();

    // Nobody writes the backing file under us...
    let out = run("qemu-io", &["-f", "qcow2", "-c", "write 0 512", p(&base)]);
    assert!(
        !out.status.success() && text(&out).contains("Failed to get \"write\" lock"),
        "{}",
        text(&out)
    );
    // ...but it may be read (another overlay over the same base, qemu-img info).
    let out = run("qemu-img", &["info", "-f", "qcow2", p(&base)]);
    assert!(out.status.success(), "{}", text(&out));
    // The overlay itself is ours alone.
    let out = run("qemu-img", &["info", "-f", "qcow2", p(&top)]);
    assert!(!out.status.success(), "{}", text(&out));
    // A second overlay over the same base, by another of our devices, is fine.
    let top2 = dir.path().join("top2.qcow2");
    let out = run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            p(&top2),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let disk2: Arc<dyn Storage> = Arc::new(Qcow2Storage::open(&top2, options(false)).unwrap());
    let _locked2 = lock_storage(disk2, &top2, "xenblkd/8/51712").unwrap();

    drop(locked);
    let out = run("qemu-img", &["info", "-f", "qcow2", p(&top)]);
    assert!(out.status.success(), "{}", text(&out));
}
