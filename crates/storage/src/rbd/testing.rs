//! A real single-node Ceph cluster for tests (feature `testing`): `scripts/ceph-cluster`
//! started once per test binary on a free port pair, shared by its tests (each works on
//! images of its own), and stopped when the process exits (an `atexit` handler, and the
//! script's watcher of our pid should the process be killed).

use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A running cluster.
#[derive(Debug)]
pub struct Cluster {
    dir: PathBuf,
    conf: PathBuf,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
static NEXT_IMAGE: AtomicU32 = AtomicU32::new(0);
/// Tests doing I/O share the cluster; a test stopping its OSD has it to itself.
static USE: RwLock<()> = RwLock::new(());

/// Held by a test that does I/O on the cluster (many at once).
pub fn io_guard() -> RwLockReadGuard<'static, ()> {
    USE.read().unwrap_or_else(PoisonError::into_inner)
}

/// Held by a test that stops the OSD (alone).
pub fn fault_guard() -> RwLockWriteGuard<'static, ()> {
    USE.write().unwrap_or_else(PoisonError::into_inner)
}

/// The repository's `scripts/ceph-cluster`.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/ceph-cluster")
}

extern "C" fn stop_at_exit() {
    if let Some(Ok(c)) = CLUSTER.get() {
        let _ = Command::new(script()).arg("stop").arg(&c.dir).status();
    }
}

/// Two consecutive free loopback ports (the monitor's msgr2 and msgr1).
fn free_port_pair() -> io::Result<u16> {
    for _ in 0..50 {
        let a = TcpListener::bind("127.0.0.1:0")?;
        let port = a.local_addr()?.port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return Ok(port);
        }
    }
    Err(io::Error::other("no free port pair"))
}

impl Cluster {
    /// The cluster of this test binary, started on first use.
    ///
    /// # Panics
    /// When the cluster cannot be started (the tests need it).
    pub fn shared() -> &'static Cluster {
        match CLUSTER.get_or_init(Cluster::start) {
            Ok(c) => c,
            Err(e) => panic!("cannot start the test Ceph cluster: {e}"),
        }
    }

    fn start() -> Result<Cluster, String> {
        let dir = std::env::temp_dir().join(format!("xenblkd-ceph-{}", std::process::id()));
        let port = free_port_pair().map_err(|e| e.to_string())?;
        let out = Command::new(script())
            .arg("start")
            .arg(&dir)
            .args(["--port", &port.to_string()])
            .args(["--exit-with", &std::process::id().to_string()])
            .output()
            .map_err(|e| format!("{}: {e}", script().display()))?;
        if !out.status.success() {
            let _ = Command::new(script()).arg("stop").arg(&dir).status();
            return Err(format!(
                "{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        // SAFETY: registers a plain function with no arguments, as atexit expects.
        unsafe { libc::atexit(stop_at_exit) };
        Ok(Cluster {
            conf: dir.join("ceph.conf"),
            dir,
        })
    }

    /// The cluster's ceph.conf (its keyring is the admin's).
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// `rbd:rbd/NAME:conf=...`: the target of image `name`.
    pub fn target(&self, name: &str) -> String {
        format!("rbd:rbd/{name}:conf={}", self.conf.display())
    }

    /// A unique image name starting with `prefix`.
    pub fn unique_name(&self, prefix: &str) -> String {
        format!(
            "{prefix}-{}-{}",
            std::process::id(),
            NEXT_IMAGE.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Runs `rbd ARGS` against the cluster.
    pub fn rbd(&self, args: &[&str]) -> io::Result<String> {
        let out = Command::new("rbd")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "rbd {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates image `name` of `mib` MiB in pool `rbd`; returns its target.
    pub fn create_image(&self, name: &str, mib: u64) -> io::Result<String> {
        self.rbd(&[
            "create",
            "--size",
            &format!("{mib}M"),
            &format!("rbd/{name}"),
        ])?;
        Ok(self.target(name))
    }

    /// Resizes image `name` to `mib` MiB.
    pub fn resize_image(&self, name: &str, mib: u64) -> io::Result<()> {
        self.rbd(&[
            "resize",
            "--allow-shrink",
            "--size",
            &format!("{mib}M"),
            &format!("rbd/{name}"),
        ])
        .map(drop)
    }

    /// Stops the OSD (requests then wait for it, up to the clients' op timeout).
    pub fn stop_osd(&self) -> io::Result<()> {
        self.script("osd-stop")
    }

    /// Starts the OSD again and waits until it is up.
    pub fn start_osd(&self) -> io::Result<()> {
        self.script("osd-start")
    }

    fn script(&self, what: &str) -> io::Result<()> {
        let out = Command::new(script()).arg(what).arg(&self.dir).output()?;
        if out.status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "ceph-cluster {what}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }
}
