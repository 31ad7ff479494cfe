//! `xenblkd qemu-dm`: the device-model stand-in of the `backendtype=qdisk` route.
//!
//! libxl (4.17) gives a PV guest's `backendtype=qdisk` disks to a device model it starts
//! itself (`libxl__spawn_local_dm`): the program named by `device_model_override`, else
//! QEMU, with QEMU's argv (`-xen-domid N -chardev socket,id=libxl-cmd,path=
//! /var/run/xen/qmp-libxl-N,server=on,wait=off -mon chardev=libxl-cmd,mode=control ...
//! -xen-attach -machine xenpv`). It records the process in
//! `/local/domain/N/image/device-model-pid`, waits (`LIBXL_DEVICE_MODEL_START_TIMEOUT`)
//! for `/local/domain/0/device-model/N/state` to read `running`, then asks
//! `query-chardev` over QMP; `xl create` fails if either does not happen. On destroy it
//! removes `/local/domain/0/device-model/N` and sends SIGHUP to the recorded pid.
//!
//! Pointed at `scripts/xenblkd-qemu-dm`, libxl runs this instead: it claims the domain for
//! `xenblkd serve --type qdisk` (see `xenbus::devmodel`), reports `running`, answers QMP
//! (see [`crate::qmp`]) and waits. It serves nothing itself, and nothing but disks: a
//! guest's vfb, vkbd, 9pfs, qusb and secondary consoles (QEMU's other PV backends) stay
//! unserved, which it logs. It exits on SIGTERM, SIGINT, SIGHUP, QMP `quit`, the domain's
//! death or the removal of its claim, removing its claim and sockets; a SIGKILL leaves the
//! claim to libxl's destroy, which removes the whole directory.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use anyhow::Context;
use tracing::{debug, error, info, warn};
use xenbus::devmodel;
use xenbus::store::{join, Store, StoreExt, StoreOps};
use xenbus::xs::XsStore;
use xenstore::XsClient;

use crate::qmp::{self, ChardevInfo, DeviceModel, RunState};
use crate::signals::TerminationSignals;

/// The domain libxl runs in and writes `device-model/` under (`LIBXL_TOOLSTACK_DOMID`);
/// QEMU hard-codes it the same way.
const TOOLSTACK_DOMID: u32 = 0;
/// Xen's `DOMID_FIRST_RESERVED`: ids from here on are not guests.
const DOMID_FIRST_RESERVED: u32 = 0x7ff0;
/// The PV backends QEMU serves besides disks, which a guest of this route goes without.
const OTHER_QEMU_BACKENDS: &[&str] = &["vfb", "vkbd", "9pfs", "qusb"];

#[derive(Debug, clap::Args)]
#[command(disable_help_flag = true)]
pub struct QemuDmArgs {
    /// QEMU's command line, as libxl passes it.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    pub qemu_args: Vec<String>,
}

/// What in QEMU's argv could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ArgsError {
    /// No `-xen-domid`.
    #[error("-xen-domid is missing: only libxl's device-model command line is understood")]
    NoDomid,
    /// `-xen-domid` is not a guest's id.
    #[error("-xen-domid {0:?} is not a guest domain id")]
    BadDomid(String),
    /// An option at the end of the line without its value.
    #[error("{0} needs a value")]
    MissingValue(String),
    /// Not a PV guest: an HVM guest's device model emulates hardware we cannot.
    #[error("machine {0:?} is not supported: only PV guests (machine xenpv)")]
    Machine(String),
    /// The QMP socket handed over as a descriptor (libxl does it with `dm_restrict`).
    #[error("chardev {0:?}: a socket passed as fd= (dm_restrict) is not supported")]
    InheritedSocket(String),
    /// A QMP monitor on a chardev that is not a unix server socket, or not defined.
    #[error("-mon {0:?}: the chardev is not a unix server socket given with -chardev")]
    BadMonitor(String),
    /// `-xen-domid-restrict` (dm_restrict): we cannot drop privileges as QEMU does.
    #[error("-xen-domid-restrict (dm_restrict) is not supported")]
    Restricted,
}

/// A `-chardev socket,...,server=on` QMP can be served on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketChardev {
    pub id: String,
    pub path: PathBuf,
}

/// What the stand-in takes from QEMU's argv.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmConfig {
    pub domid: u32,
    pub name: Option<String>,
    /// Unix server sockets that carry a QMP monitor (`-mon chardev=ID,mode=control`).
    pub qmp_sockets: Vec<SocketChardev>,
    /// Every socket chardev, for `query-chardev`.
    pub chardevs: Vec<SocketChardev>,
    /// `-S`: report `prelaunch` until QMP `cont`.
    pub start_paused: bool,
    /// Options understood but not acted on, and unknown ones (logged).
    pub ignored: Vec<String>,
}

/// QEMU options that take no value.
const FLAGS: &[&str] = &[
    "-S",
    "-xen-attach",
    "-nodefaults",
    "-no-user-config",
    "-nographic",
    "-no-shutdown",
    "-no-acpi",
    "-no-reboot",
    "-daemonize",
    "-snapshot",
    "-sdl",
];

/// `key=value,...` after the first field of a QEMU option value, plus bare `flag` fields.
fn opts(spec: &str) -> Vec<(&str, Option<&str>)> {
    spec.split(',')
        .map(|f| match f.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (f, None),
        })
        .collect()
}

fn opt<'a>(fields: &[(&'a str, Option<&'a str>)], key: &str) -> Option<&'a str> {
    fields.iter().find(|(k, _)| *k == key).and_then(|(_, v)| *v)
}

/// Whether a boolean QEMU option field is on (`server`, `server=on`, `server=yes`).
fn on(fields: &[(&str, Option<&str>)], key: &str) -> bool {
    fields
        .iter()
        .any(|&(k, v)| k == key && matches!(v, None | Some("on" | "yes" | "true")))
}

/// Parses QEMU's argv as libxl builds it (`libxl__build_device_model_args_new`). Unknown
/// options are skipped, with the following word taken as their value unless it is an
/// option itself.
pub fn parse(args: &[String]) -> Result<DmConfig, ArgsError> {
    let mut domid = None;
    let mut name = None;
    let mut start_paused = false;
    let mut chardevs: Vec<SocketChardev> = Vec::new();
    let mut monitors: Vec<String> = Vec::new();
    let mut ignored = Vec::new();
    let mut it = args.iter().peekable();
    while let Some(arg) = it.next() {
        let option = arg.as_str();
        if !option.starts_with('-') {
            ignored.push(arg.clone());
            continue;
        }
        if FLAGS.contains(&option) {
            match option {
                "-S" => start_paused = true,
                "-xen-attach" | "-nodefaults" | "-no-user-config" | "-nographic"
                | "-no-shutdown" => {}
                _ => ignored.push(arg.clone()),
            }
            continue;
        }
        if option == "-xen-domid-restrict" {
            return Err(ArgsError::Restricted);
        }
        let known_with_value = matches!(
            option,
            "-xen-domid" | "-name" | "-chardev" | "-mon" | "-machine" | "-M"
        );
        let value = match it.peek() {
            Some(v) if known_with_value || !v.starts_with('-') => it.next().cloned(),
            _ => None,
        };
        let Some(value) = value else {
            if known_with_value {
                return Err(ArgsError::MissingValue(arg.clone()));
            }
            ignored.push(arg.clone());
            continue;
        };
        match option {
            "-xen-domid" => {
                let d = value
                    .parse::<u32>()
                    .ok()
                    .filter(|d| (1..DOMID_FIRST_RESERVED).contains(d))
                    .ok_or_else(|| ArgsError::BadDomid(value.clone()))?;
                domid = Some(d);
            }
            "-name" => {
                // `-name guest=NAME,debug-threads=on` or a plain name (libxl's form).
                let fields = opts(&value);
                let plain = fields.first().and_then(|&(k, v)| v.is_none().then_some(k));
                name = opt(&fields, "guest")
                    .or(plain)
                    .map(str::to_string)
                    .or(Some(value.clone()));
            }
            "-machine" | "-M" => {
                let fields = opts(&value);
                let machine = opt(&fields, "type")
                    .or_else(|| fields.first().and_then(|&(k, v)| v.is_none().then_some(k)))
                    .unwrap_or_default();
                if machine != "xenpv" {
                    return Err(ArgsError::Machine(machine.to_string()));
                }
            }
            "-chardev" => {
                let fields = opts(&value);
                let backend = fields.first().map(|&(k, _)| k).unwrap_or_default();
                let id = opt(&fields, "id").unwrap_or_default();
                if backend == "socket" && opt(&fields, "fd").is_some() {
                    return Err(ArgsError::InheritedSocket(id.to_string()));
                }
                match (backend, opt(&fields, "path")) {
                    (_, Some(path)) if backend == "socket" && on(&fields, "server") => chardevs
                        .push(SocketChardev {
                            id: id.to_string(),
                            path: PathBuf::from(path),
                        }),
                    _ => ignored.push(format!("{option} {value}")),
                }
            }
            "-mon" => {
                let fields = opts(&value);
                if opt(&fields, "mode") == Some("control") {
                    monitors.push(opt(&fields, "chardev").unwrap_or_default().to_string());
                } else {
                    ignored.push(format!("{option} {value}"));
                }
            }
            _ => ignored.push(format!("{option} {value}")),
        }
    }
    let domid = domid.ok_or(ArgsError::NoDomid)?;
    let qmp_sockets = monitors
        .iter()
        .map(|id| {
            chardevs
                .iter()
                .find(|c| &c.id == id)
                .cloned()
                .ok_or_else(|| ArgsError::BadMonitor(id.clone()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(DmConfig {
        domid,
        name,
        qmp_sockets,
        chardevs,
        start_paused,
        ignored,
    })
}

/// Why the stand-in stops.
#[derive(Debug)]
enum Exit {
    Signal(nix::sys::signal::Signal),
    Quit,
    DomainGone,
    ClaimGone,
    Failed(anyhow::Error),
}

/// The running stand-in, as QMP sees it.
struct StandIn {
    config: DmConfig,
    store: Arc<XsStore>,
    running: AtomicBool,
    /// The control socket of `xenblkd serve`, for the disks' counters.
    control: PathBuf,
}

/// The control socket of the daemon serving our disks: `XENBLKD_CONTROL_SOCKET` (libxl
/// passes its environment on), else the configuration file's, else the default.
fn control_socket() -> PathBuf {
    if let Some(p) = std::env::var_os("XENBLKD_CONTROL_SOCKET") {
        return PathBuf::from(p);
    }
    xenbus::config::Config::from_file(Path::new(crate::serve::DEFAULT_CONFIG))
        .map(|c| c.control_socket)
        .unwrap_or_else(|_| PathBuf::from(crate::status::DEFAULT_CONTROL_SOCKET))
}

impl StandIn {
    fn state_path(&self) -> String {
        join(
            &devmodel::device_model_dir(TOOLSTACK_DOMID, self.config.domid),
            "state",
        )
    }

    /// Tells libxl the device model is up: what QEMU writes once it runs.
    fn announce_running(&self) -> anyhow::Result<()> {
        if !self.running.swap(true, Ordering::SeqCst) {
            self.store
                .write_str(&self.state_path(), "running")
                .context("writing the device-model state")?;
            info!(domid = self.config.domid, "device-model state: running");
        }
        Ok(())
    }
}

impl DeviceModel for StandIn {
    fn run_state(&self) -> RunState {
        if self.running.load(Ordering::SeqCst) {
            RunState::Running
        } else {
            RunState::Prelaunch
        }
    }

    fn cont(&self) -> Result<(), String> {
        self.announce_running().map_err(|e| format!("{e:#}"))
    }

    fn name(&self) -> Option<String> {
        self.config.name.clone()
    }

    fn block_devices(&self) -> Result<Vec<qmp::BlockDevice>, String> {
        let (_, report) = crate::status::query(&self.control).map_err(|e| format!("{e:#}"))?;
        Ok(report
            .devices
            .iter()
            .filter(|d| {
                d.backend_type == xenbus::config::QDISK_BACKEND_TYPE && d.domid == self.config.domid
            })
            .map(qmp::BlockDevice::from_status)
            .collect())
    }

    fn chardevs(&self) -> Vec<ChardevInfo> {
        self.config
            .chardevs
            .iter()
            .map(|c| ChardevInfo {
                label: c.id.clone(),
                filename: format!("unix:{},server=on", c.path.display()),
            })
            .collect()
    }
}

fn connect_xenstore() -> anyhow::Result<XsClient> {
    // XENSTORED_PATH: libxenstore's override, which QEMU honours too (and the tests use).
    match platform::linux::detect_xenstore(
        Path::new("/"),
        std::env::var_os("XENSTORED_PATH").map(PathBuf::from),
    )
    .context("finding xenstore")?
    {
        platform::XenstoreEndpoint::UnixSocket(p) => XsClient::connect_unix(&p)
            .with_context(|| format!("connecting to xenstored at {}", p.display())),
        platform::XenstoreEndpoint::XenbusDevice(p) => {
            XsClient::open_xenbus_device(&p).with_context(|| format!("opening {}", p.display()))
        }
    }
}

/// A bound QMP socket, and the inode that tells ours from a successor's at cleanup.
struct Bound {
    listener: UnixListener,
    path: PathBuf,
    inode: (u64, u64),
}

/// Binds a QMP socket as QEMU would, except that a stale socket file (nobody accepting) is
/// replaced; a live one means another device model serves this domain, so we refuse.
fn bind(path: &Path) -> anyhow::Result<Bound> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            anyhow::bail!("{} exists and is not a socket", path.display());
        }
        if UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "{} is in use: another device model serves this domain",
                path.display()
            );
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    let meta = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok(Bound {
        listener,
        path: path.to_path_buf(),
        inode: (meta.dev(), meta.ino()),
    })
}

/// Answers QMP on one socket, one connection at a time (as a QEMU socket chardev does).
fn spawn_qmp_server(
    listener: UnixListener,
    path: PathBuf,
    dm: Arc<StandIn>,
    exit: Sender<Exit>,
) -> anyhow::Result<()> {
    thread::Builder::new()
        .name("qmp".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let mut stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        warn!(socket = %path.display(), error = %e, "QMP accept");
                        thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                let mut record = Vec::new();
                let result = qmp::serve(&mut stream, dm.as_ref(), &mut record);
                let commands = record.join(" ");
                match result {
                    Ok(qmp::Ended::Quit) => {
                        info!(socket = %path.display(), %commands, "QMP conversation ended with quit");
                        let _ = exit.send(Exit::Quit);
                        return;
                    }
                    // xentop asks for block statistics every few seconds: not worth a line
                    // each at the default level.
                    Ok(ended)
                        if record.iter().all(|c| {
                            matches!(c.as_str(), "qmp_capabilities" | "query-blockstats" | "query-block")
                        }) =>
                    {
                        debug!(socket = %path.display(), ?ended, %commands, "QMP conversation")
                    }
                    Ok(ended) => {
                        info!(socket = %path.display(), ?ended, %commands, "QMP conversation")
                    }
                    Err(e) => {
                        info!(socket = %path.display(), error = %e, %commands, "QMP conversation failed")
                    }
                }
            }
        })
        .context("spawning a QMP thread")?;
    Ok(())
}

fn spawn_signal_thread(signals: TerminationSignals, exit: Sender<Exit>) -> anyhow::Result<()> {
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let event = match signals.wait() {
                Ok(sig) => Exit::Signal(sig),
                Err(e) => Exit::Failed(e),
            };
            let _ = exit.send(event);
        })
        .context("spawning the signal thread")?;
    Ok(())
}

/// Watches for the domain's death and for our claim's removal.
fn spawn_watcher(
    client: Arc<XsClient>,
    store: Arc<XsStore>,
    domid: u32,
    exit: Sender<Exit>,
) -> anyhow::Result<()> {
    let events = client.watch_events();
    let claim = devmodel::claim_path(TOOLSTACK_DOMID, domid);
    client
        .watch("@releaseDomain", "release")
        .context("watching @releaseDomain")?;
    client
        .watch(&claim, "claim")
        .context("watching our claim")?;
    thread::Builder::new()
        .name("watch".into())
        .spawn(move || loop {
            if events.recv().is_err() {
                let _ = exit.send(Exit::Failed(anyhow::anyhow!("xenstore connection lost")));
                return;
            }
            match client.is_domain_introduced(domid) {
                Ok(false) => {
                    let _ = exit.send(Exit::DomainGone);
                    return;
                }
                Ok(true) => {}
                Err(e) => {
                    let _ = exit.send(Exit::Failed(
                        anyhow::Error::new(e).context("checking the domain"),
                    ));
                    return;
                }
            }
            match store.exists(&claim) {
                Ok(true) => {}
                Ok(false) => {
                    let _ = exit.send(Exit::ClaimGone);
                    return;
                }
                Err(e) => {
                    let _ = exit.send(Exit::Failed(
                        anyhow::Error::new(e).context("reading our claim"),
                    ));
                    return;
                }
            }
        })
        .context("spawning the watch thread")?;
    Ok(())
}

/// Logs the domain's devices that only QEMU would have served.
fn warn_unserved(store: &dyn Store, domid: u32) {
    let backend = format!("/local/domain/{TOOLSTACK_DOMID}/backend");
    let dom = domid.to_string();
    let mut unserved: Vec<String> = OTHER_QEMU_BACKENDS
        .iter()
        .filter(|t| {
            store
                .directory(&join(&join(&backend, t), &dom))
                .ok()
                .flatten()
                .is_some_and(|d| !d.is_empty())
        })
        .map(|t| t.to_string())
        .collect();
    // Secondary consoles are QEMU's (`type` ioemu); the primary one is xenconsoled's.
    let consoles = join(&join(&backend, "console"), &dom);
    for devid in store
        .directory(&consoles)
        .ok()
        .flatten()
        .unwrap_or_default()
    {
        let ty = store
            .read_string(&join(&join(&consoles, &devid), "type"))
            .ok()
            .flatten();
        if ty.as_deref() == Some("ioemu") {
            unserved.push(format!("console {devid}"));
        }
    }
    if !unserved.is_empty() {
        warn!(
            domid,
            devices = %unserved.join(", "),
            "this guest has devices only QEMU serves; they stay unserved (xenblkd serves disks only)"
        );
    }
}

/// Removes our claim if it is still ours (a successor's is left alone).
fn remove_claim(store: &XsStore, domid: u32) {
    let path = devmodel::claim_path(TOOLSTACK_DOMID, domid);
    let me = std::process::id().to_string();
    match store.read_string(&path) {
        Ok(Some(v)) if v == me => match store.rm(&path) {
            Ok(()) => info!(path = %path, "claim removed"),
            Err(e) => warn!(path = %path, error = %e, "removing the claim"),
        },
        // libxl's destroy removes device-model/<domid> before it signals us.
        Ok(None) => info!(path = %path, "claim already removed"),
        Ok(Some(other)) => {
            info!(path = %path, owner = %other, "the claim is another process's now")
        }
        Err(e) => warn!(path = %path, error = %e, "reading the claim"),
    }
}

/// Runs the stand-in until it is told to stop.
pub fn run(args: &QemuDmArgs) -> anyhow::Result<()> {
    if args.qemu_args.iter().any(|a| a == "--help" || a == "-help") {
        println!(
            "usage: xenblkd qemu-dm -xen-domid N -chardev socket,id=ID,path=P,server=on,wait=off \
             -mon chardev=ID,mode=control [QEMU options...]\n\n\
             The device model libxl starts for a PV guest with backendtype=qdisk disks when the \
             guest's config says device_model_override=\"/usr/local/lib/xenblkd/xenblkd-qemu-dm\": \
             claims the domain for `xenblkd serve --type qdisk`, reports `running`, answers QMP. \
             Serves no vfb, vkbd, 9pfs, qusb or secondary console."
        );
        return Ok(());
    }
    let config = parse(&args.qemu_args).context("QEMU's command line")?;
    let domid = config.domid;
    let signals = TerminationSignals::block_with_hangup()?;
    info!(
        domid,
        name = config.name.as_deref().unwrap_or(""),
        qmp = ?config.qmp_sockets.iter().map(|c| c.path.display().to_string()).collect::<Vec<_>>(),
        "xenblkd device-model stand-in starting"
    );
    if !config.ignored.is_empty() {
        info!(options = %config.ignored.join(" "), "QEMU options not acted on");
    }
    if config.qmp_sockets.is_empty() {
        warn!("no QMP monitor on the command line: libxl's query-chardev will fail");
    }

    let client = Arc::new(connect_xenstore()?);
    let store = Arc::new(XsStore::new(client.clone()));
    if !client
        .is_domain_introduced(domid)
        .context("checking the domain")?
    {
        anyhow::bail!("domain {domid} does not exist");
    }
    warn_unserved(store.as_ref(), domid);

    let bound = config
        .qmp_sockets
        .iter()
        .map(|c| bind(&c.path))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let start_paused = config.start_paused;
    let dm = Arc::new(StandIn {
        config,
        store: store.clone(),
        running: AtomicBool::new(false),
        control: control_socket(),
    });
    let (exit_tx, exit_rx) = mpsc::channel();
    spawn_signal_thread(signals, exit_tx.clone())?;
    let mut sockets = Vec::new();
    for b in bound {
        let listener = b.listener.try_clone().context("cloning a QMP listener")?;
        spawn_qmp_server(listener, b.path.clone(), dm.clone(), exit_tx.clone())?;
        sockets.push((b.path, b.inode));
    }

    // The claim first: `xenblkd serve` must see it no later than libxl sees `running`.
    let claim = devmodel::claim_path(TOOLSTACK_DOMID, domid);
    let state = dm.state_path();
    let me = std::process::id().to_string();
    store
        .transaction(&mut |tx: &dyn StoreOps| {
            tx.write(&claim, me.as_bytes())?;
            if !start_paused {
                tx.write(&state, b"running")?;
            }
            Ok(())
        })
        .context("writing the claim")?;
    dm.running.store(!start_paused, Ordering::SeqCst);
    info!(path = %claim, running = !start_paused, "domain claimed for xenblkd");
    spawn_watcher(client.clone(), store.clone(), domid, exit_tx)?;

    let why = exit_rx
        .recv()
        .unwrap_or_else(|_| Exit::Failed(anyhow::anyhow!("every event source is gone")));
    remove_claim(&store, domid);
    for (path, inode) in &sockets {
        let ours = std::fs::metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == *inode);
        if ours {
            let _ = std::fs::remove_file(path);
        }
    }
    match why {
        Exit::Signal(sig) => info!(signal = %sig, "exiting"),
        Exit::Quit => info!("exiting: QMP quit"),
        Exit::DomainGone => info!(domid, "exiting: the domain is gone"),
        Exit::ClaimGone => info!(path = %claim, "exiting: our claim was removed"),
        Exit::Failed(e) => {
            error!(error = %format!("{e:#}"), "exiting");
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_string).collect()
    }

    /// What libxl 4.17 passes for a PV guest without vfb (`libxl__build_device_model_args_new`).
    const LIBXL_PV: &str = "-xen-domid 7 -no-shutdown \
        -chardev socket,id=libxl-cmd,path=/var/run/xen/qmp-libxl-7,server=on,wait=off \
        -mon chardev=libxl-cmd,mode=control \
        -chardev socket,id=libxenstat-cmd,path=/var/run/xen/qmp-libxenstat-7,server=on,wait=off \
        -mon chardev=libxenstat-cmd,mode=control \
        -nodefaults -no-user-config -xen-attach -name guest7 -vnc none -display none \
        -nographic -machine xenpv -m 513";

    #[test]
    fn libxl_command_line() {
        let c = parse(&args(LIBXL_PV)).unwrap();
        assert_eq!(c.domid, 7);
        assert_eq!(c.name.as_deref(), Some("guest7"));
        assert!(!c.start_paused);
        let paths: Vec<_> = c.qmp_sockets.iter().map(|s| s.path.clone()).collect();
        assert_eq!(
            paths,
            vec![
                PathBuf::from("/var/run/xen/qmp-libxl-7"),
                PathBuf::from("/var/run/xen/qmp-libxenstat-7")
            ]
        );
        assert_eq!(c.ignored, vec!["-vnc none", "-display none", "-m 513"]);
    }

    #[test]
    fn old_syntax_paused_start_and_unknown_options() {
        let c = parse(&args(
            "-xen-domid 3 -S -chardev socket,id=m,path=/tmp/q,server,nowait -mon chardev=m,mode=control \
             -M xenpv -weird -other value -chardev pty,id=libxl-channel0 -name guest=g3,debug-threads=on stray",
        ))
        .unwrap();
        assert!(c.start_paused);
        assert_eq!(c.qmp_sockets[0].path, PathBuf::from("/tmp/q"));
        assert_eq!(c.name.as_deref(), Some("g3"));
        assert_eq!(
            c.ignored,
            vec![
                "-weird",
                "-other value",
                "-chardev pty,id=libxl-channel0",
                "stray"
            ]
        );
    }

    #[test]
    fn refused_command_lines() {
        for (line, want) in [
            ("-name x", ArgsError::NoDomid),
            ("-xen-domid 0", ArgsError::BadDomid("0".into())),
            ("-xen-domid 32752", ArgsError::BadDomid("32752".into())),
            ("-xen-domid x7", ArgsError::BadDomid("x7".into())),
            ("-xen-domid", ArgsError::MissingValue("-xen-domid".into())),
            (
                "-xen-domid 4 -machine xenfv,max-ram-below-4g=1",
                ArgsError::Machine("xenfv".into()),
            ),
            (
                "-xen-domid 4 -chardev socket,id=libxl-cmd,fd=9,server=on,wait=off",
                ArgsError::InheritedSocket("libxl-cmd".into()),
            ),
            (
                "-xen-domid 4 -mon chardev=nope,mode=control",
                ArgsError::BadMonitor("nope".into()),
            ),
            ("-xen-domid 4 -xen-domid-restrict", ArgsError::Restricted),
        ] {
            assert_eq!(parse(&args(line)), Err(want), "{line}");
        }
    }
}
