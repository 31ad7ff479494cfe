//! `xenblkd serve`: the daemon. Wires the layers together and runs the xenbus manager on
//! the main thread until SIGTERM/SIGINT, then closes every device and exits; or until a
//! handover (SIGUSR2, `xenblkd handover`, or another `serve` starting on the same control
//! socket), then leaves every device as it is for the next daemon and exits.
//!
//! One daemon per control socket: `serve` holds an exclusive `flock` on
//! `<control socket>.lock` from before it touches any device until after it released the
//! last one (the kernel drops it when the process dies, `kill -9` included). A `serve` that
//! finds the lock held asks the holder to hand over and waits for the lock.
//!
//! Threads: the manager (main), the xenstore client's reader and the watch forwarder, the
//! engine's reactors, the control socket, the signal waiter and, in simulator mode, the
//! thread accepting simulated guests.
//!
//! On real Xen the platform is `platform::linux` and xenstore is found where libxenstore
//! looks; with `--sim-socket` the platform is `platform::sim`, guests attach over that
//! socket, and `--xenstore-socket` names the in-memory xenstored's dom0 socket.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context};
use backend::{Engine, EngineConfig};
use platform::sim::{DomainHandle, SimAcceptor, SimPlatform};
use platform::{Platform, XenstoreEndpoint};
use tracing::{error, info, warn};
use xenbus::config::{BackendType, Config, DirectIo, GrantMode, VBD_BACKEND_TYPE};
use xenbus::manager::DeviceOp;
use xenbus::status::{ControlReply, ControlRequest};
use xenbus::xs::{spawn_watch_forwarder, XsStore};
use xenbus::{EventSender, Manager};
use xenstore::XsClient;

use crate::engine_glue::EngineFactory;
use crate::sd_notify::Notifier;
use crate::signals::TerminationSignals;
use nix::sys::signal::Signal;

mod daemon_lock;
pub use daemon_lock::lock_path;
use daemon_lock::take_daemon_lock;

/// Where a kernel blkback shows itself; serving `vbd` beside it would race it for every
/// device.
const BLKBACK_MARKERS: &[&str] = &[
    "/sys/module/xen_blkback",
    "/sys/bus/xen-backend/drivers/vbd",
];

/// Longest control request line accepted.
const MAX_REQUEST: u64 = 4096;

/// How long a starting `serve` waits for the daemon it replaces beyond that daemon's
/// drain timeout (its exit: storage closed, process gone).
const HANDOVER_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum GrantModeArg {
    Map,
    Copy,
    Auto,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum DirectIoArg {
    Auto,
    On,
    Off,
}

/// The configuration `serve` reads when `--config` is not given (if it exists).
pub const DEFAULT_CONFIG: &str = "/etc/xenblkd/xenblkd.toml";

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file (flags override it) [default: /etc/xenblkd/xenblkd.toml,
    /// if it exists]. Re-read on SIGHUP (`systemctl reload`).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// xenstored's unix socket (default: where libxenstore looks, else /dev/xen/xenbus).
    #[arg(long, value_name = "PATH")]
    pub xenstore_socket: Option<PathBuf>,
    /// Simulator mode: accept simulated guests on this unix socket (platform::sim).
    #[arg(long, value_name = "PATH")]
    pub sim_socket: Option<PathBuf>,
    /// Control socket answering `xenblkd status`.
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Our domain id (0 on dom0, the driver domain's otherwise).
    #[arg(long)]
    pub backend_domid: Option<u32>,
    /// Backend type to serve, repeatable; `NAME:hotplug` waits for the hotplug script.
    /// Default: `vbd:hotplug` and `xenblkd`. `qdisk` (never by default) serves libxl's
    /// backendtype=qdisk disks of the domains whose device model is `xenblkd qemu-dm`.
    #[arg(long = "type", value_name = "NAME[:hotplug]")]
    pub types: Vec<String>,
    /// multi-queue-max-queues.
    #[arg(long)]
    pub max_queues: Option<u32>,
    /// max-ring-page-order (0..=4).
    #[arg(long)]
    pub max_ring_page_order: Option<u32>,
    /// feature-max-indirect-segments (0 disables).
    #[arg(long)]
    pub max_indirect_segments: Option<u32>,
    /// Advertise feature-persistent.
    #[arg(long, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub persistent_grants: Option<bool>,
    /// Persistent grants kept mapped per ring (0: what the ring can have in flight).
    #[arg(long)]
    pub max_persistent_grants: Option<u32>,
    /// Unmap a persistent grant unused this long (0: never).
    #[arg(long, value_name = "SECS")]
    pub persistent_grant_unused_secs: Option<u64>,
    /// Grant data path.
    #[arg(long, value_enum)]
    pub grant_mode: Option<GrantModeArg>,
    /// Page-cache policy.
    #[arg(long, value_enum)]
    pub direct_io: Option<DirectIoArg>,
    /// Reactor threads (0: one per core).
    #[arg(long)]
    pub reactor_threads: Option<u32>,
    /// How long shutdown and disconnects wait for in-flight I/O.
    #[arg(long)]
    pub drain_timeout_ms: Option<u64>,
    /// Serve Prometheus/OpenMetrics metrics at /metrics on ADDR (`127.0.0.1:9477`) or a
    /// unix socket path; off by default (`[metrics] listen` in the configuration).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// Serve `vbd` even though the kernel's xen-blkback is loaded.
    #[arg(long)]
    pub force: bool,
}

/// The configuration file to read: `--config`, else the default one if it exists.
fn config_path(args: &ServeArgs) -> Option<PathBuf> {
    args.config.clone().or_else(|| {
        let default = PathBuf::from(DEFAULT_CONFIG);
        default.exists().then_some(default)
    })
}

/// Builds the configuration from the file and the flags.
fn build_config(args: &ServeArgs) -> anyhow::Result<(Config, bool)> {
    let mut config = match config_path(args) {
        Some(p) => Config::from_file(&p)?,
        None => Config::default(),
    };
    if let Some(level) = &config.log_level {
        crate::logging::parse_filter(level).context("log_level")?;
    }
    let mut types_explicit = config.backend_types != BackendType::defaults();
    if !args.types.is_empty() {
        types_explicit = true;
        config.backend_types = args
            .types
            .iter()
            .map(|t| match t.split_once(':') {
                Some((name, "hotplug")) => Ok(BackendType::new(name, true)),
                Some((_, other)) => {
                    bail!("--type {t}: unknown option {other:?} (expected `hotplug`)")
                }
                None => Ok(BackendType::new(t, false)),
            })
            .collect::<anyhow::Result<_>>()?;
    }
    if let Some(v) = &args.control_socket {
        config.control_socket = v.clone();
    }
    if let Some(v) = args.backend_domid {
        config.backend_domid = v;
    }
    if let Some(v) = args.reactor_threads {
        config.reactor_threads = v;
    }
    if let Some(v) = args.drain_timeout_ms {
        config.drain_timeout_ms = v;
    }
    if let Some(v) = &args.metrics {
        config.metrics.listen = Some(v.clone());
    }
    let d = &mut config.defaults;
    if let Some(v) = args.max_queues {
        d.max_queues = v;
    }
    if let Some(v) = args.max_ring_page_order {
        d.max_ring_page_order = v;
    }
    if let Some(v) = args.max_indirect_segments {
        d.max_indirect_segments = v;
    }
    if let Some(v) = args.persistent_grants {
        d.persistent_grants = v;
    }
    if let Some(v) = args.max_persistent_grants {
        d.max_persistent_grants = v;
    }
    if let Some(v) = args.persistent_grant_unused_secs {
        d.persistent_grant_unused_secs = v;
    }
    if let Some(v) = args.grant_mode {
        d.grant_mode = match v {
            GrantModeArg::Map => GrantMode::Map,
            GrantModeArg::Copy => GrantMode::Copy,
            GrantModeArg::Auto => GrantMode::Auto,
        };
    }
    if let Some(v) = args.direct_io {
        d.direct_io = match v {
            DirectIoArg::Auto => DirectIo::Auto,
            DirectIoArg::On => DirectIo::On,
            DirectIoArg::Off => DirectIo::Off,
        };
    }
    config.validate()?;
    Ok((config, types_explicit))
}

/// The kernel blkback marker present on this host, if any.
pub fn kernel_blkback() -> Option<&'static str> {
    BLKBACK_MARKERS
        .iter()
        .copied()
        .find(|p| Path::new(p).exists())
}

/// Refuses to race a loaded blkback for `vbd` devices: an explicit request is an error
/// (unless forced), the default quietly serves only our own type.
fn avoid_blkback(config: &mut Config, explicit: bool, force: bool) -> anyhow::Result<()> {
    avoid_blkback_marker(config, explicit, force, kernel_blkback())
}

/// [`avoid_blkback`] with the detection result given (testable without a kernel).
fn avoid_blkback_marker(
    config: &mut Config,
    explicit: bool,
    force: bool,
    marker: Option<&str>,
) -> anyhow::Result<()> {
    let Some(marker) = marker else {
        return Ok(());
    };
    if config.backend_type(VBD_BACKEND_TYPE).is_none() || force {
        if force {
            warn!(%marker, "kernel xen-blkback is loaded; serving vbd anyway (--force): both will race for every vbd device");
        }
        return Ok(());
    }
    if explicit {
        bail!(
            "the kernel's xen-blkback is loaded ({marker} exists): it serves backend/vbd itself and \
             xenblkd would race it for every device. Unload it (rmmod xen-blkback), or use \
             `xenblkd attach` (backend type `xenblkd`) for the disks xenblkd should serve, \
             or pass --force."
        );
    }
    warn!(
        %marker,
        "the kernel's xen-blkback is loaded: not serving backend/vbd (it would race blkback); \
         serving only the xenblkd backend type written by `xenblkd attach`"
    );
    config.backend_types.retain(|t| t.name != VBD_BACKEND_TYPE);
    Ok(())
}

/// Waits for SIGTERM/SIGINT and asks the manager to shut down, for SIGUSR2 and asks it
/// to hand over (a second signal is logged; the manager's shutdown deadline bounds how
/// long the first one takes), or for SIGHUP and reloads the configuration.
fn spawn_signal_thread(
    signals: TerminationSignals,
    sender: EventSender,
    args: ServeArgs,
    notifier: Arc<Notifier>,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            match signals.wait() {
                Ok(Signal::SIGUSR2) => {
                    info!("SIGUSR2: handing every device over to the next daemon");
                    notifier.stopping("handing every device over to the next daemon");
                    sender.handover();
                }
                Ok(Signal::SIGHUP) => {
                    notifier.reloading();
                    let status = reload(&args, &sender);
                    notifier.ready(&status);
                }
                Ok(sig) => {
                    info!(signal = %sig, "termination signal: closing every device");
                    notifier.stopping("closing every device");
                    sender.shutdown();
                }
                Err(e) => {
                    error!(error = %format!("{e:#}"), "waiting for signals");
                    return;
                }
            }
        })
        .context("spawning the signal thread")?;
    Ok(())
}

/// `systemctl reload` (SIGHUP): reads the configuration again (same file, same flags on
/// top) and applies what can change at run time: the log level, device settings and
/// overrides (from each device's next setup), the drain timeout. What needs a restart is
/// named in a warning and left as it is; a file that does not parse changes nothing.
/// Returns the status line for systemd.
fn reload(args: &ServeArgs, sender: &EventSender) -> String {
    let file =
        config_path(args).map_or_else(|| "defaults".to_string(), |p| p.display().to_string());
    let config = match build_config(args) {
        Ok((config, _)) => config,
        Err(e) => {
            error!(config = %file, error = %format!("{e:#}"), "reload refused: the configuration is unchanged");
            return format!("serving; reload of {file} refused: {e:#}");
        }
    };
    let level = config.log_level.clone();
    let Some(report) = sender.reload(config, Duration::from_secs(5)) else {
        error!("reload: the device manager did not answer");
        return "serving; reload not answered".into();
    };
    let log_level = match crate::logging::control().map(|c| c.apply_config(level.as_deref())) {
        Some(Ok(crate::logging::ConfigLevel::Applied(l))) => l,
        Some(Ok(crate::logging::ConfigLevel::Overridden(by))) => format!("kept (set by {by})"),
        Some(Err(e)) => format!("unchanged ({e:#})"),
        None => "unchanged".into(),
    };
    info!(
        config = %file,
        applied = ?report.applied,
        log_level = %log_level,
        "configuration reloaded"
    );
    if !report.ignored.is_empty() {
        warn!(
            config = %file,
            ignored = ?report.ignored,
            "reload: these settings change only at a restart (`systemctl restart` hands the devices over)"
        );
    }
    format!("serving; reloaded {file}")
}

/// Binds the control socket: root-only, refusing to steal the socket of a live daemon.
fn bind_control_socket(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!("{} is in use: another xenblkd is running", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(listener)
}

/// The reply to a device request.
fn device_reply(result: Result<String, String>) -> ControlReply {
    match result {
        Ok(accepted) => ControlReply::Accepted { ok: true, accepted },
        Err(e) => ControlReply::error(e),
    }
}

/// Answers one control connection: one request line, one reply line. A device request
/// waits at most `op_timeout` (a pause drains, a reopen opens storage).
fn serve_control_connection(
    stream: UnixStream,
    sender: &EventSender,
    op_timeout: Duration,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(std::io::Read::take(&stream, MAX_REQUEST)).read_line(&mut line)?;
    let reply = match serde_json::from_str::<ControlRequest>(line.trim()) {
        Ok(ControlRequest::Handover) => {
            info!("handover requested on the control socket");
            sender.handover();
            ControlReply::Accepted {
                ok: true,
                accepted: "handing every device over; the daemon exits when they are released"
                    .into(),
            }
        }
        Ok(ControlRequest::Pause { device }) => {
            device_reply(sender.device_op(&device, DeviceOp::Pause, op_timeout))
        }
        Ok(ControlRequest::Resume { device }) => {
            device_reply(sender.device_op(&device, DeviceOp::Resume, op_timeout))
        }
        Ok(ControlRequest::Reopen { device }) => {
            device_reply(sender.device_op(&device, DeviceOp::Reopen, op_timeout))
        }
        Ok(ControlRequest::Limit {
            device,
            limits,
            group,
            leave_group,
            clear,
        }) => device_reply(match (device, group) {
            (Some(device), group) => {
                let change = xenbus::qos::LimitChange {
                    limits,
                    group,
                    leave_group,
                    clear,
                };
                sender.device_op(&device, DeviceOp::Limit(change), op_timeout)
            }
            // A group's own limits: `--clear` lifts them.
            (None, Some(group)) => {
                let limits = if clear {
                    Some(limits.unwrap_or_default())
                } else {
                    limits
                };
                sender.qos_group(&group, limits, op_timeout)
            }
            (None, None) => Err("limit: name a device, or a group with --group".into()),
        }),
        Ok(ControlRequest::Status) => match sender.status(Duration::from_secs(5)) {
            Some((daemon, devices)) => ControlReply::status(daemon, devices),
            None => ControlReply::error("the device manager did not answer"),
        },
        Err(e) => ControlReply::error(format!("bad request: {e}")),
    };
    let mut out = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    out.push(b'\n');
    (&stream).write_all(&out)
}

fn spawn_control_server(
    listener: UnixListener,
    sender: EventSender,
    op_timeout: Duration,
) -> anyhow::Result<()> {
    thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => {
                        if let Err(e) = serve_control_connection(s, &sender, op_timeout) {
                            warn!(error = %e, "control connection");
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "control socket accept");
                        thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
        .context("spawning the control thread")?;
    Ok(())
}

/// Simulator mode: accepts simulated guests and forgets those whose process died (as
/// Xen forgets a destroyed domain), so a rebooted guest with the same id can attach again.
fn spawn_sim_acceptor(platform: SimPlatform, listener: UnixListener) -> anyhow::Result<()> {
    let handles: Arc<Mutex<HashMap<u16, DomainHandle>>> = Arc::default();
    let reap = {
        let platform = platform.clone();
        let handles = handles.clone();
        move || {
            let mut h = handles.lock().unwrap_or_else(|p| p.into_inner());
            h.retain(|&domid, handle| {
                if handle.is_alive() {
                    return true;
                }
                info!(
                    domid,
                    "simulated guest process exited; destroying the domain"
                );
                let _ = platform.detach(domid);
                false
            });
        }
    };
    let reap2 = reap.clone();
    thread::Builder::new()
        .name("sim-reaper".into())
        .spawn(move || loop {
            thread::sleep(Duration::from_millis(50));
            reap2();
        })
        .context("spawning the simulator reaper")?;
    // Handshakes never run inline: a connection that says nothing must not hold up the
    // guests behind it (see `SimAcceptor`).
    let mut acceptor = SimAcceptor::new(listener).context("setting up the simulator socket")?;
    thread::Builder::new()
        .name("sim-accept".into())
        .spawn(move || loop {
            for hello in acceptor.poll(Duration::from_secs(1)) {
                // A guest reconnecting under the id of one that just died must not find
                // the dead one still registered.
                reap();
                // A refusal is logged by the platform, with its reason.
                if let Ok(handle) = platform.attach_hello(hello) {
                    handles
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(handle.domid(), handle);
                }
            }
        })
        .context("spawning the simulator acceptor")?;
    Ok(())
}

fn connect_xenstore(args: &ServeArgs, platform: &dyn Platform) -> anyhow::Result<XsClient> {
    if let Some(p) = &args.xenstore_socket {
        return XsClient::connect_unix(p)
            .with_context(|| format!("connecting to xenstored at {}", p.display()));
    }
    match platform.xenstore_endpoint().context("finding xenstore")? {
        XenstoreEndpoint::UnixSocket(p) => XsClient::connect_unix(&p)
            .with_context(|| format!("connecting to xenstored at {}", p.display())),
        XenstoreEndpoint::XenbusDevice(p) => {
            XsClient::open_xenbus_device(&p).with_context(|| format!("opening {}", p.display()))
        }
    }
}

/// Threads of this process (`/proc/self/task`).
/// The daemon's own threads. io_uring's `iou-wrk-*` workers are left out: the kernel starts
/// them for a submitting thread's blocking operations (an fsync, a punch) and ends them
/// after 5 s idle, so their number says nothing about a leak of ours.
fn thread_count() -> u64 {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| {
        d.flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .map_or(true, |c| !c.starts_with("iou-wrk"))
            })
            .count() as u64
    })
}

/// The gauges `xenblkd status` shows for the daemon: what a leak would make grow.
fn process_metrics(platform: &dyn Platform) -> std::collections::BTreeMap<String, u64> {
    std::collections::BTreeMap::from([
        (
            "grant_mappings".to_string(),
            platform.live_mappings() as u64,
        ),
        ("mapped_pages".to_string(), platform.mapped_pages() as u64),
        ("open_fds".to_string(), backend::open_fd_count() as u64),
        ("threads".to_string(), thread_count()),
    ])
}

/// Starts the metrics endpoint (after the daemon lock: a daemon handing over still holds
/// the address until it exits). A failure is logged and the daemon serves on without it:
/// the guests' disks come before their figures. Returns the unix socket to remove at exit.
fn start_metrics(
    listen: &xenbus::config::MetricsListen,
    manager: &Manager,
    gauges: crate::engine_glue::EngineGauges,
    store: Arc<XsStore>,
) -> Option<PathBuf> {
    let started = crate::metrics_server::Endpoint::bind(listen).and_then(|endpoint| {
        let socket = endpoint.socket_file();
        endpoint.spawn(crate::metrics_server::Source {
            sender: manager.sender(),
            gauges,
            store,
        })?;
        Ok(socket)
    });
    match started {
        Ok(socket) => socket,
        Err(e) => {
            error!(listen = %listen, error = %format!("{e:#}"), "metrics endpoint not started; serving without it");
            None
        }
    }
}

/// Runs the daemon until a termination signal.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let signals = TerminationSignals::block_for_serve()?;
    let notifier = Arc::new(Notifier::from_env()?);
    let (mut config, types_explicit) = build_config(args)?;
    if let Some(log) = crate::logging::control() {
        log.apply_config(config.log_level.as_deref())?;
    }
    info!(
        config = %config_path(args).map_or_else(|| "none (defaults)".to_string(), |p| p.display().to_string()),
        log_target = ?crate::logging::control().map(|c| c.target()),
        "starting"
    );
    crate::fd_limit::raise_nofile_limit_logged();

    let mut sim_platform = None;
    let platform: Arc<dyn Platform> = match &args.sim_socket {
        Some(sim) => {
            if args.xenstore_socket.is_none() {
                bail!(
                    "--sim-socket needs --xenstore-socket (the simulated xenstored's dom0 socket)"
                );
            }
            let backend_domid =
                u16::try_from(config.backend_domid).context("backend domid out of range")?;
            let platform = SimPlatform::with_backend_domid(backend_domid);
            if let Some(xs) = &args.xenstore_socket {
                platform.set_xenstore_socket(xs);
            }
            sim_platform = Some((platform.clone(), sim.clone()));
            Arc::new(platform)
        }
        None => {
            avoid_blkback(&mut config, types_explicit, args.force)?;
            Arc::new(platform::linux::LinuxPlatform::open().context("opening the Xen devices")?)
        }
    };
    if config.backend_types.is_empty() {
        bail!("no backend type left to serve");
    }

    let client = Arc::new(connect_xenstore(args, platform.as_ref())?);
    let engine = Engine::start(EngineConfig {
        reactors: config.reactor_threads as usize,
        reactor_cpus: config.reactor_cpus.iter().map(|&c| c as usize).collect(),
    })
    .context("starting the engine")?;
    // The rings' crash-recovery journals live beside the daemon lock (the run directory,
    // a tmpfs: `/run/xenblkd`), which `take_daemon_lock` creates.
    let run_dir = lock_path(&config.control_socket)
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let factory =
        Arc::new(EngineFactory::new(engine, platform.clone()).with_journal_dir(run_dir.clone()));
    let engine_gauges = factory.gauges();
    let metrics_gauges = engine_gauges.clone();
    let metrics_listen = config.metrics.endpoint()?;
    let control_path = config.control_socket.clone();
    // Everything above touches no device; from here on this process serves them.
    let handover_wait = Duration::from_millis(config.drain_timeout_ms) + HANDOVER_GRACE;
    let lock = take_daemon_lock(&control_path, handover_wait)?;
    let control = bind_control_socket(&control_path)?;
    if let Some((platform, sim)) = sim_platform {
        // The previous daemon's guests come back here once its end of their socket closed.
        if sim.exists() {
            std::fs::remove_file(&sim)
                .with_context(|| format!("removing stale {}", sim.display()))?;
        }
        let listener =
            UnixListener::bind(&sim).with_context(|| format!("binding {}", sim.display()))?;
        spawn_sim_acceptor(platform, listener)?;
        info!(socket = %sim.display(), "simulator mode: accepting simulated guests");
    }

    let drain_timeout_ms = config.drain_timeout_ms;
    let store = Arc::new(XsStore::new(client.clone()));
    let mut manager = Manager::new(store.clone(), factory, config);
    // Under the lock, before any device is adopted: journals of devices removed while no
    // daemon ran have no reader any more.
    remove_orphan_journals(&run_dir, store.as_ref(), &manager);
    manager.set_metrics(Box::new(move || {
        let mut gauges = process_metrics(platform.as_ref());
        gauges.extend(engine_gauges.read());
        gauges
    }));
    spawn_watch_forwarder(&client, manager.sender()).context("spawning the watch forwarder")?;
    spawn_signal_thread(signals, manager.sender(), args.clone(), notifier.clone())?;
    // A pause waits for the drain (bounded by the drain timeout), a reopen for a storage
    // open (an NBD or RBD connect is bounded by its own timeouts, below this).
    let op_timeout = Duration::from_millis(drain_timeout_ms) + Duration::from_secs(60);
    spawn_control_server(control, manager.sender(), op_timeout)?;
    let metrics_socket = metrics_listen
        .and_then(|listen| start_metrics(&listen, &manager, metrics_gauges, store.clone()));
    manager.start().context("registering xenstore watches")?;
    info!(control = %control_path.display(), "xenblkd ready");
    // The control socket is bound and its thread accepts (a status query waits in the
    // manager's queue until `run` takes it, a few instructions from here), and every
    // watch is registered: what `Type=notify` waits for.
    notifier.ready(&format!(
        "serving; control socket {}",
        control_path.display()
    ));

    let result = manager.run();
    // Also reached by a handover asked on the control socket or by a starting daemon.
    notifier.stopping("releasing the devices");
    // Devices (and their storage) are released here; the lock only after the control
    // socket is gone, so the next daemon never finds this one's socket.
    drop(manager);
    let _ = std::fs::remove_file(&control_path);
    if let Some(p) = metrics_socket {
        let _ = std::fs::remove_file(p);
    }
    drop(lock);
    match result {
        Ok(()) => {
            info!("xenblkd stopped");
            Ok(())
        }
        Err(e) => Err(e).context("xenstore connection lost"),
    }
}

/// Removes the ring journals in the run directory `dir` whose device is no longer in
/// xenstore (removed while no daemon ran, or after the last one crashed): no process
/// will adopt its rings. A device still there keeps its files, whatever its state: a
/// Connected one is adopted from them, any other is connected afresh, which empties them.
fn remove_orphan_journals(dir: &Path, store: &dyn xenbus::store::Store, manager: &Manager) {
    use xenbus::store::StoreExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let Some((backend_type, domid, devid)) =
            name.to_str().and_then(crate::engine_glue::journal_device)
        else {
            continue;
        };
        let device = format!("{}/{domid}/{devid}", manager.backend_dir(backend_type));
        match store.exists(&device) {
            Ok(false) => match std::fs::remove_file(entry.path()) {
                Ok(()) => info!(
                    journal = %entry.path().display(),
                    device, "removed the ring journal of a device that is gone"
                ),
                Err(e) => {
                    warn!(journal = %entry.path().display(), error = %e, "cannot remove a stale ring journal")
                }
            },
            Ok(true) => {}
            Err(e) => {
                warn!(device, error = %e, "cannot tell whether a ring journal's device exists; keeping it")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARKER: Option<&str> = Some("/sys/module/xen_blkback");

    #[test]
    fn blkback_is_never_raced() {
        // Default types: vbd is dropped, our own type stays.
        let mut c = Config::default();
        avoid_blkback_marker(&mut c, false, false, MARKER).unwrap();
        let names: Vec<&str> = c.backend_types.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, vec!["xenblkd"]);
        // Asked for explicitly: a clear error naming the way out.
        let mut c = Config::default();
        let e = avoid_blkback_marker(&mut c, true, false, MARKER)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("xen-blkback is loaded") && e.contains("xenblkd attach"),
            "{e}"
        );
        // Forced: kept, with a warning.
        let mut c = Config::default();
        avoid_blkback_marker(&mut c, true, true, MARKER).unwrap();
        assert_eq!(c.backend_types.len(), 2);
        // No blkback: nothing changes.
        let mut c = Config::default();
        avoid_blkback_marker(&mut c, true, false, None).unwrap();
        assert_eq!(c.backend_types.len(), 2);
    }

    #[test]
    fn flags_override_the_file() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let t = T::parse_from([
            "t",
            "--type",
            "vbd:hotplug",
            "--type",
            "mine",
            "--max-queues",
            "3",
            "--persistent-grants",
            "false",
            "--grant-mode",
            "copy",
            "--backend-domid",
            "5",
        ]);
        let (c, explicit) = build_config(&t.serve).unwrap();
        assert!(explicit);
        assert_eq!(c.backend_types.len(), 2);
        assert!(c.backend_type("vbd").unwrap().wait_for_hotplug);
        assert!(!c.backend_type("mine").unwrap().wait_for_hotplug);
        assert_eq!(c.defaults.max_queues, 3);
        assert!(!c.defaults.persistent_grants);
        assert_eq!(c.defaults.grant_mode, GrantMode::Copy);
        assert_eq!(c.backend_domid, 5);
        let bad = T::parse_from(["t", "--type", "vbd:wait"]);
        assert!(build_config(&bad.serve).is_err());
        let bad = T::parse_from(["t", "--max-ring-page-order", "9"]);
        assert!(build_config(&bad.serve).is_err());
    }
}
