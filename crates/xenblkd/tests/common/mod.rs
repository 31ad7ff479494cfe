//! A simulated Xen host made of processes: `xenblkd xenstored` (the in-memory xenstored,
//! one socket per domain), `xenblkd serve` (the daemon under test, simulator mode) and
//! `xenblkd-sim-guest` processes (blkfront over xenstore). The test itself plays the
//! toolstack through its own dom0 xenstore connection, with libxl's node layout and
//! timeouts (10 s for InitWait on attach and for Closed on removal).

#![allow(dead_code)]

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use xenbus::status::{ControlReply, DeviceStatus, StatusReport};
use xenbus::store::{join, StoreExt, StoreOps};
use xenbus::toolstack::{self, DiskSpec, Removal};
use xenbus::xs::XsStore;
use xenbus::XenbusState;
use xenstore::XsClient;

pub const XENBLKD: &str = env!("CARGO_BIN_EXE_xenblkd");
pub const SIM_GUEST: &str = env!("CARGO_BIN_EXE_xenblkd-sim-guest");

/// How long any single wait in these tests may take before it is a failure.
pub const WAIT: Duration = Duration::from_secs(20);

/// Kills a child on drop (a failing test must not leave processes behind).
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: Signal) {
        // The child is not reaped before `Proc` is dropped, so the pid is still ours.
        let _ = kill(Pid::from_raw(self.pid()), sig);
    }

    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Collects a child's stdout lines.
fn line_reader(child: &mut Child) -> Receiver<String> {
    let out = child.stdout.take().expect("stdout piped");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A simulated guest process.
pub struct Guest {
    pub proc: Proc,
    lines: Receiver<String>,
    pub seen: Vec<String>,
    pub domid: u32,
    pub devid: u32,
}

impl Guest {
    /// Waits for a stdout line starting with `prefix` (failing on `err ...`).
    pub fn expect(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                    assert!(
                        !line.starts_with("err "),
                        "guest d{} failed waiting for {prefix:?}: {line}\n{:?}",
                        self.domid,
                        self.seen
                    );
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "guest d{}: no {prefix:?} within {WAIT:?}; saw {:?}",
                        self.domid, self.seen
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "guest d{} exited before {prefix:?}; saw {:?}",
                        self.domid, self.seen
                    )
                }
            }
        }
    }

    /// Waits for the process to exit successfully, having printed every step's `ok`.
    pub fn finish(mut self) -> Vec<String> {
        let status = self.proc.wait_timeout(WAIT);
        self.seen.extend(self.lines.try_iter());
        let Some(status) = status else {
            panic!(
                "guest d{} did not exit within {WAIT:?}; it printed {:?} (its log is on stderr)",
                self.domid, self.seen
            );
        };
        assert!(
            status.success(),
            "guest d{} failed: {status}\n{:?}",
            self.domid,
            self.seen
        );
        self.seen
    }

    pub fn kill(&mut self) {
        self.proc.signal(Signal::SIGKILL);
        let _ = self.proc.wait_timeout(WAIT);
    }
}

/// The whole simulated host.
pub struct Host {
    pub dir: tempfile::TempDir,
    pub xenstored: Proc,
    pub daemon: Option<Proc>,
    pub xs: Arc<XsStore>,
    pub control: PathBuf,
    pub sim_socket: PathBuf,
    /// The domain the daemon runs in (0, or a driver domain).
    pub backend_domid: u32,
    /// Extra environment of every daemon started.
    pub daemon_env: Vec<(String, String)>,
}

impl Host {
    /// Starts xenstored and the daemon (extra `serve` flags in `serve_args`).
    pub fn start(serve_args: &[&str]) -> Host {
        Host::start_in(0, serve_args)
    }

    /// Starts the daemon in domain `backend_domid`: a driver domain when not 0, talking to
    /// xenstored through that domain's (unprivileged) socket.
    pub fn start_in(backend_domid: u32, serve_args: &[&str]) -> Host {
        Host::start_with_env(backend_domid, &[], serve_args)
    }

    /// [`Host::start_in`] with `env` added to every daemon's environment.
    pub fn start_with_env(backend_domid: u32, env: &[(&str, &str)], serve_args: &[&str]) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let xs_dir = dir.path().join("xs");
        let mut xenstored = Command::new(XENBLKD)
            .args(["xenstored", "--socket-dir"])
            .arg(&xs_dir)
            .args(["--domains", "1-64"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let ready = line_reader(&mut xenstored)
            .recv_timeout(WAIT)
            .expect("xenstored ready");
        assert!(ready.starts_with("xenstored ready"), "{ready}");
        let xenstored = Proc {
            child: xenstored,
            name: "xenstored".into(),
        };
        let client = XsClient::connect_unix(xs_dir.join("d0.sock")).unwrap();
        let xs = Arc::new(XsStore::new(Arc::new(client)));
        let mut host = Host {
            control: dir.path().join("control"),
            sim_socket: dir.path().join("sim.sock"),
            dir,
            xenstored,
            daemon: None,
            xs,
            backend_domid,
            daemon_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        host.start_daemon(serve_args);
        host
    }

    pub fn xs_socket(&self, domid: u32) -> PathBuf {
        self.dir.path().join("xs").join(format!("d{domid}.sock"))
    }

    pub fn start_daemon(&mut self, serve_args: &[&str]) {
        self.start_daemon_logging(serve_args, std::env::var("RUST_LOG").ok().as_deref());
    }

    /// Starts the daemon with `RUST_LOG` set to `rust_log`, or unset (the daemon's own
    /// default level) when `None`.
    pub fn start_daemon_logging(&mut self, serve_args: &[&str], rust_log: Option<&str>) {
        self.spawn_daemon(serve_args, rust_log);
        self.wait_daemon_ready();
    }

    /// A graceful handover: a new `serve` started on the same control socket asks the
    /// running one to hand its devices over, waits for it to exit, and adopts them.
    pub fn handover(&mut self, serve_args: &[&str]) {
        let mut old = self.daemon.take().expect("daemon running");
        self.spawn_daemon(serve_args, std::env::var("RUST_LOG").ok().as_deref());
        let status = old
            .wait_timeout(WAIT)
            .unwrap_or_else(|| panic!("the old daemon did not hand over\n{}", self.log()));
        assert!(status.success(), "the old daemon: {status}\n{}", self.log());
        self.wait_daemon_ready();
    }

    fn wait_daemon_ready(&self) {
        let deadline = Instant::now() + WAIT;
        while self.try_status().is_none() {
            assert!(
                Instant::now() < deadline,
                "daemon not ready\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a daemon without waiting for it to be ready.
    pub fn spawn_daemon(&mut self, serve_args: &[&str], rust_log: Option<&str>) {
        // Appended: a restarted daemon's log follows its predecessor's.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("serve.log"))
            .unwrap();
        let mut command = Command::new(XENBLKD);
        command.envs(self.daemon_env.iter().map(|(k, v)| (k, v)));
        match rust_log {
            Some(filter) => command.env("RUST_LOG", filter),
            None => command.env_remove("RUST_LOG"),
        };
        let child = command
            .arg("serve")
            .arg("--xenstore-socket")
            .arg(self.xs_socket(self.backend_domid))
            .args(["--backend-domid", &self.backend_domid.to_string()])
            .arg("--sim-socket")
            .arg(&self.sim_socket)
            .arg("--control-socket")
            .arg(&self.control)
            .args(["--reactor-threads", "2"])
            .args(serve_args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemon = Some(Proc {
            child,
            name: "xenblkd serve".into(),
        });
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    /// The daemon's status, read back as the types it is written from.
    pub fn try_status(&self) -> Option<StatusReport> {
        let out = Command::new(XENBLKD)
            .args(["status", "--json", "--control-socket"])
            .arg(&self.control)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        ControlReply::parse(std::str::from_utf8(&out.stdout).ok()?)
            .ok()?
            .into_report()
            .ok()
    }

    pub fn status(&self) -> StatusReport {
        self.try_status()
            .unwrap_or_else(|| panic!("status failed\n{}", self.log()))
    }

    /// `xenblkd status --verbose` as a person reads it.
    pub fn status_text(&self) -> String {
        let out = Command::new(XENBLKD)
            .args(["status", "--verbose", "--control-socket"])
            .arg(&self.control)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn device_status(
        &self,
        backend_type: &str,
        domid: u32,
        devid: u32,
    ) -> Option<DeviceStatus> {
        self.status().device(backend_type, domid, devid).cloned()
    }

    pub fn metric(&self, name: &str) -> u64 {
        self.status().daemon.metrics[name]
    }

    /// A sparse image of `mib` MiB in the host's directory.
    pub fn image(&self, name: &str, mib: u64) -> PathBuf {
        let p = self.dir.path().join(name);
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(mib << 20).unwrap();
        p
    }

    /// libxl creates a domain (and introduces it to xenstored) before its devices.
    pub fn create_domain(&self, domid: u32) {
        self.xs.client().introduce_domain(domid, 0, 0).unwrap();
        self.xs
            .write_str(
                &format!("/local/domain/{domid}/name"),
                &format!("guest{domid}"),
            )
            .unwrap();
    }

    /// libxl's disk add: write the nodes, then the backend has 10 s to reach InitWait.
    pub fn attach(&self, spec: &DiskSpec) -> XenbusState {
        toolstack::attach_disk(self.xs.as_ref(), spec, toolstack::INIT_TIMEOUT)
            .unwrap_or_else(|e| panic!("attach {}: {e}\n{}", spec.backend_path(), self.log()))
    }

    /// libxl's disk remove: online 0 + Closing, the backend has 10 s to reach Closed.
    pub fn detach(&self, spec: &DiskSpec) -> Removal {
        toolstack::remove_disk(
            self.xs.as_ref(),
            &spec.backend_path(),
            &spec.frontend_path(),
            toolstack::DESTROY_TIMEOUT,
        )
        .unwrap()
    }

    /// libxl's domain destroy after the guest died: devices removed (forced if need be),
    /// the domain's home removed, the domain released (`@releaseDomain`).
    pub fn destroy_domain(&self, domid: u32, specs: &[&DiskSpec]) {
        self.xs.client().release_domain(domid).unwrap();
        for spec in specs {
            self.detach(spec);
        }
        self.xs.rm(&format!("/local/domain/{domid}")).unwrap();
    }

    pub fn state(&self, dir: &str) -> XenbusState {
        toolstack::read_state(self.xs.as_ref(), dir).unwrap()
    }

    pub fn wait_state(&self, dir: &str, want: XenbusState) {
        toolstack::wait_state(self.xs.as_ref(), dir, WAIT, &format!("{dir} {want}"), |s| {
            s == want
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", self.log()));
    }

    pub fn read(&self, path: &str) -> Option<String> {
        self.xs.read_string(path).unwrap()
    }

    /// Starts a simulated guest process running `script` on device `devid` of `domid`.
    pub fn guest(&self, domid: u32, devid: u32, args: &[&str], script: &str) -> Guest {
        let mut child = Command::new(SIM_GUEST)
            .arg("--xenstore-socket")
            .arg(self.xs_socket(domid))
            .arg("--sim-socket")
            .arg(&self.sim_socket)
            .args(["--domid", &domid.to_string(), "--devid", &devid.to_string()])
            .args(["--script", script])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = line_reader(&mut child);
        Guest {
            proc: Proc {
                child,
                name: format!("guest d{domid}"),
            },
            lines,
            seen: Vec::new(),
            domid,
            devid,
        }
    }

    /// `kill -9` of the daemon, as a crash: nothing of it is torn down in order.
    pub fn kill_daemon(&mut self) {
        let mut d = self.daemon.take().expect("daemon running");
        d.signal(Signal::SIGKILL);
        d.wait_timeout(WAIT)
            .unwrap_or_else(|| panic!("daemon did not die\n{}", self.log()));
    }

    /// The daemon's pid.
    pub fn daemon_pid(&self) -> i32 {
        self.daemon.as_ref().expect("daemon running").pid()
    }

    /// Stops the daemon with SIGTERM and returns its exit status.
    pub fn stop_daemon(&mut self) -> ExitStatus {
        let mut d = self.daemon.take().expect("daemon running");
        d.signal(Signal::SIGTERM);
        d.wait_timeout(WAIT)
            .unwrap_or_else(|| panic!("daemon did not exit\n{}", self.log()))
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- xenblkd serve log -----\n{}", self.log());
        }
    }
}

/// Creates domain `domid` with a disk of `mib` MiB per entry of `devids`, and starts its
/// guest (`--reattach`, so it outlives each daemon) running the verified random
/// read/write workload on all of them until `stop` exists, then closing them.
pub fn start_rw_guest(host: &Host, domid: u32, devids: &[u32], mib: u64, stop: &Path) -> Guest {
    host.create_domain(domid);
    for &devid in devids {
        let image = host.image(&format!("d{domid}-{devid}.img"), mib);
        host.attach(&disk("xenblkd", domid, devid, &image));
    }
    let more: Vec<String> = devids[1..]
        .iter()
        .flat_map(|d| ["--devid".to_string(), d.to_string()])
        .collect();
    let mut args: Vec<&str> = more.iter().map(String::as_str).collect();
    args.extend(["--reattach", "--depth", "8"]);
    let mut guest = host.guest(
        domid,
        devids[0],
        &args,
        &format!("connect,rw-until:{},close", stop.display()),
    );
    guest.expect("ok connect");
    guest
}

/// A disk spec under our own backend type.
pub fn disk(backend_type: &str, domid: u32, devid: u32, image: &Path) -> DiskSpec {
    let mut spec = DiskSpec::new(backend_type, domid, devid, &image.display().to_string());
    spec.direct_io_safe = true;
    spec
}

/// Reads `<dir>/<node>` as a number.
pub fn node_u64(host: &Host, dir: &str, node: &str) -> Option<u64> {
    host.read(&join(dir, node)).and_then(|v| v.parse().ok())
}

/// What `ok connect ...` reported, as key → value.
pub fn connect_facts(line: &str) -> std::collections::BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Keeps a store alive for guest-side writes in hostile-frontend tests: a connection as
/// the guest domain.
pub fn guest_store(host: &Host, domid: u32) -> XsStore {
    XsStore::new(Arc::new(
        XsClient::connect_unix(host.xs_socket(domid)).unwrap(),
    ))
}

/// Runs `qemu-img` (Debian: qemu-utils), failing the test on error.
pub fn qemu_img(args: &[&str]) -> std::process::Output {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (Debian package qemu-utils) must be installed");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `base.raw` (random data, 3 sectors short of the disk) under `top.qcow2` in the host's
/// directory, and a raw reference of what the guest sees (`qemu-img convert`), which a
/// guest started with `--mirror` keeps up to date. Returns (top, base, reference).
pub fn qcow2_chain(host: &Host, name: &str, mib: u64) -> (PathBuf, PathBuf, PathBuf) {
    let dir = host.dir.path();
    let base = dir.join(format!("{name}-base.raw"));
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ mib;
    let data: Vec<u8> = (0..(mib << 20) - 3 * 512)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&base, data).unwrap();
    let top = dir.join(format!("{name}.qcow2"));
    let (b, t) = (base.to_str().unwrap(), top.to_str().unwrap());
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        b,
        "-F",
        "raw",
        t,
        &format!("{mib}M"),
    ]);
    let reference = dir.join(format!("{name}-ref.raw"));
    qemu_img(&["convert", "-O", "raw", t, reference.to_str().unwrap()]);
    (top, base, reference)
}

/// `qemu-img check` is clean and `qemu-img compare` finds the image identical to the
/// raw reference.
pub fn qcow2_consistent(image: &Path, reference: &Path) {
    for args in [
        vec!["check", "-q", "-f", "qcow2", image.to_str().unwrap()],
        vec![
            "compare",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            image.to_str().unwrap(),
            reference.to_str().unwrap(),
        ],
    ] {
        qemu_img(&args);
    }
}

/// The repository's disk hotplug script.
pub fn hotplug_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/xenblkd-hotplug")
}

/// A directory with xenstore-read/-write/-rm shims.
fn shims(dir: &Path) -> PathBuf {
    let bin = dir.join("shim-bin");
    std::fs::create_dir_all(&bin).unwrap();
    for (tool, op) in [
        ("xenstore-read", "read"),
        ("xenstore-write", "write"),
        ("xenstore-rm", "rm"),
    ] {
        let p = bin.join(tool);
        std::fs::write(
            &p,
            format!("#!/bin/sh\nexec '{XENBLKD}' xenstore {op} \"$@\"\n"),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    bin
}

/// Runs the hotplug script as libxl does; returns (success, stderr).
pub fn run_hotplug(host: &Host, action: &str, xenbus_path: &str) -> (bool, String) {
    let path = format!(
        "{}:{}",
        shims(host.dir.path()).display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .arg(hotplug_script())
        .arg(action)
        .env("XENBUS_PATH", xenbus_path)
        .env("XENBUS_TYPE", "vbd")
        .env("XENBUS_BASE_PATH", "backend")
        .env("XENSTORED_PATH", host.xs_socket(0))
        .env("XENBLKD", XENBLKD)
        .env("PATH", path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What of the simulated guests a process still holds: descriptors of their memory or
/// grant-table memfds, and mappings of them (`/proc/<pid>/fd`, `/proc/<pid>/maps`).
pub fn sim_guest_holdings(pid: i32) -> (usize, usize) {
    let is_guest =
        |s: &str| s.contains("xenblkd-sim-guest-memory") || s.contains("xenblkd-sim-grant-table");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|t| is_guest(&t.to_string_lossy()))
                .count()
        })
        .unwrap_or(0);
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map(|m| m.lines().filter(|l| is_guest(l)).count())
        .unwrap_or(0);
    (fds, maps)
}

/// The `key=value` pairs of a guest's output line, as numbers (`a/b` pairs as two keys,
/// `key.0` and `key.1`).
pub fn line_numbers(line: &str) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for (k, v) in line.split_whitespace().filter_map(|kv| kv.split_once('=')) {
        match v.split_once('/') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse(), b.parse()) {
                    out.insert(format!("{k}.0"), a);
                    out.insert(format!("{k}.1"), b);
                }
            }
            None => {
                if let Ok(n) = v.parse() {
                    out.insert(k.to_string(), n);
                }
            }
        }
    }
    out
}

/// Runs a `xenblkd` client command against `host`'s xenstore (dom0's socket).
pub fn xenblkd(host: &Host, args: &[&str]) -> std::process::Output {
    std::process::Command::new(XENBLKD)
        .args(args)
        .arg("--xenstore-socket")
        .arg(host.xs_socket(0))
        .output()
        .unwrap()
}

/// A command's stdout and stderr, as one text for assertions and messages.
pub fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
