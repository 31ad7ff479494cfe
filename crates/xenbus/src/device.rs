//! One device's state machine.
//!
//! `Device::reconcile` is *level-triggered*: whatever event woke it, it re-reads the
//! backend directory and the frontend's `state` and moves the device toward what they
//! ask for. Watch events only say "something changed here"; they can be coalesced,
//! reordered with our own writes, or dropped by a full queue, and Linux blkback carries
//! comments about exactly that ("Ensure we connect even when two watches fire in close
//! succession"). Re-reading makes every such race harmless.
//!
//! The transitions follow blkback's `frontend_changed` and libxl's expectations:
//!
//! | frontend | backend does |
//! |---|---|
//! | (device appears) | open storage (unless waiting for the hotplug script), publish limits, InitWait |
//! | Initialising, InitWait | if we are Closed: InitWait again (guest reboot, resume) |
//! | Initialised, Connected | read rings (fatal on bad values), connect VBD, publish, Connected |
//! | Closing | Closing |
//! | Closed | disconnect (drain, unmap, unbind), Closed |
//! | Unknown (written: `0`, or not a number) | disconnect, Closed, release the storage, stop following the frontend (blkback's `device_unregister`) |
//! | a number xenbus.h does not define | fatal, as Reconfiguring/Reconfigured |
//! | gone / domain gone | disconnect, Closed |
//!
//! and from the toolstack: `online` = 0 (libxl's destroy also writes `state` = Closing)
//! asks for a clean close; removal of the backend directory tears down at once. A fatal
//! error writes `error` and goes to Closing, touching no other device. A device whose type
//! needs a device-model claim (`qdisk`) and whose claim is gone is let go at once: rings
//! disconnected, Closed, forgotten (see [`crate::devmodel`]).
//!
//! Disconnecting can wait for storage, so it runs on a worker thread; the device is
//! `disconnecting` meanwhile and the manager re-reconciles it when the worker reports.
//!
//! Every warning its guest can repeat at will goes through the device's
//! [`Warnings`](crate::ratelimit::Warnings): one line per kind per interval.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::config::{BackendType, Config};
use crate::error::{DeviceError, NegotiationError};
use crate::negotiate::{self, BackendNodes, IgnoredValue};
use crate::ratelimit::{self, Kind, Warnings};
use crate::state::XenbusState;
use crate::status::DeviceStatus;
use crate::store::{join, Store, StoreExt};
use crate::toolstack;
use crate::vbd::{
    BackendFeatures, ConnectRequest, ConnectedVbd, DeviceConfig, DisconnectReport, Disk, DiskInfo,
    Feature, FrontendParams, VbdEvent, VbdFactory,
};
use crate::vdev::vdev_name;

/// Identifies a device: `backend/<backend_type>/<domid>/<devid>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceKey {
    /// Backend directory type.
    pub backend_type: String,
    /// Frontend domain.
    pub domid: u32,
    /// Virtual device number.
    pub devid: u32,
}

impl fmt::Display for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.backend_type, self.domid, self.devid)
    }
}

/// What the manager gives a device to act with.
pub(crate) struct Ctx<'a> {
    pub store: &'a Arc<dyn Store>,
    pub factory: &'a Arc<dyn VbdFactory>,
    pub config: &'a Config,
    pub backend_type: &'a BackendType,
    /// True while the daemon shuts down: every device is asked to close.
    pub shutting_down: bool,
    /// The manager's event channel (engine reports, disconnect results).
    pub events: &'a std::sync::mpsc::Sender<crate::manager::Event>,
    /// How long a disconnect may wait for in-flight I/O.
    pub drain_timeout: Duration,
}

/// What the manager must do after a reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Nothing more.
    Idle,
    /// Watch the frontend's `state` at this path (first sight of the frontend path).
    WatchFrontend,
    /// Stop watching the frontend (the device no longer follows it).
    UnwatchFrontend,
    /// The backend directory is gone and nothing is left running: forget the device.
    Forget,
}

/// A connected session.
struct Session {
    vbd: Box<dyn ConnectedVbd>,
    frontend: FrontendParams,
    features: BackendFeatures,
}

/// One device.
pub(crate) struct Device {
    pub key: DeviceKey,
    pub backend_path: String,
    /// The frontend directory, once read from the backend's `frontend` node.
    pub frontend_path: Option<String>,
    /// The frontend `state` path we watch, if any.
    pub watched_frontend: Option<String>,
    config: Option<DeviceConfig>,
    disk: Option<Arc<dyn Disk>>,
    disk_info: Option<DiskInfo>,
    /// What we last wrote in `state`.
    published: XenbusState,
    frontend_state: XenbusState,
    /// The frontend's `state` existed at some point (so its absence now means it is gone).
    frontend_seen: bool,
    /// The frontend's domain is gone (`@releaseDomain` and no `/local/domain/<id>`).
    pub domain_gone: bool,
    /// We may serve the device: its type needs no device-model claim, or the claim is there.
    pub claimed: bool,
    /// The fatal error that put us in Closing; cleared when the frontend closes.
    failed: Option<String>,
    session: Option<Session>,
    /// Incremented per connect; events of older sessions are stale.
    session_id: u64,
    /// The storage is being opened on a worker thread.
    opening: bool,
    /// Incremented per open; results of older opens are stale.
    open_id: u64,
    sessions: u64,
    pub disconnecting: bool,
    last_disconnect: Option<DisconnectReport>,
    /// We wrote Linux's `error/...` node and must remove it when the device goes.
    wrote_linux_error: bool,
    /// Features the storage refused after we advertised them: withdrawn for as long as
    /// this storage is open, so a reconnecting frontend is not offered them again.
    withdrawn: Withdrawn,
    /// The frontend's state read Unknown: unregistering (waiting for the disconnect).
    unregistering: bool,
    /// Unregistered (blkback's `device_unregister`): the device ignores its frontend until
    /// the toolstack re-creates or removes it.
    unregistered: bool,
    /// Rate limits of the warnings the guest can cause.
    pub warnings: Warnings,
}

/// Features withdrawn after the storage refused them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Withdrawn {
    flush: bool,
    barrier: bool,
    discard: bool,
    secure_discard: bool,
}

impl Withdrawn {
    fn apply(self, f: &mut BackendFeatures) {
        f.flush &= !self.flush;
        f.barrier &= !self.barrier;
        f.discard &= !self.discard;
        f.secure_discard &= !self.secure_discard && f.discard;
    }
}

impl Device {
    pub fn new(key: DeviceKey, backend_path: String) -> Device {
        Device {
            key,
            backend_path,
            frontend_path: None,
            watched_frontend: None,
            config: None,
            disk: None,
            disk_info: None,
            published: XenbusState::Unknown,
            frontend_state: XenbusState::Unknown,
            frontend_seen: false,
            domain_gone: false,
            claimed: true,
            failed: None,
            session: None,
            session_id: 0,
            opening: false,
            open_id: 0,
            sessions: 0,
            disconnecting: false,
            last_disconnect: None,
            wrote_linux_error: false,
            withdrawn: Withdrawn::default(),
            unregistering: false,
            unregistered: false,
            warnings: Warnings::new(),
        }
    }

    /// Logs a rate-limited warning of `kind`; `log` gets the device and the count of
    /// earlier occurrences the line stands for, and is called only when a line is due.
    fn warn_limited(&mut self, kind: Kind, log: impl FnOnce(&DeviceKey, u64)) {
        if let Some(suppressed) = self.warnings.admit(kind, Instant::now()) {
            log(&self.key, suppressed);
        }
    }

    /// Logs a line of the state machine, which the frontend drives: rate-limited as
    /// [`Kind::Lifecycle`], a line that follows suppressed ones preceded by their count.
    fn info_limited(&mut self, log: impl FnOnce(&DeviceKey)) {
        if let Some(suppressed) = self.warnings.admit(Kind::Lifecycle, Instant::now()) {
            if suppressed > 0 {
                ratelimit::log_suppressed(&self.key, Kind::Lifecycle, suppressed);
            }
            log(&self.key);
        }
    }

    fn warn_ignored(&mut self, ignored: &[IgnoredValue]) {
        for i in ignored {
            let key = &self.key;
            if let Some(suppressed) = self.warnings.admit(Kind::UnparsableFlag, Instant::now()) {
                warn!(device = %key, path = %i.path, value = %i.value, suppressed,
                    "ignoring unparsable flag");
            }
        }
    }

    /// Logs the counts of suppressed warnings whose interval is over (`all`: every count,
    /// the device is going away).
    pub fn report_suppressed(&mut self, now: Instant, all: bool) {
        let due = if all {
            self.warnings.drain()
        } else {
            self.warnings.overdue(now)
        };
        for (kind, count) in due {
            ratelimit::log_suppressed(&self.key, kind, count);
        }
    }

    /// True while rings are connected or being disconnected.
    pub fn busy(&self) -> bool {
        self.session.is_some() || self.disconnecting
    }

    /// Moves the device toward what xenstore asks for.
    pub fn reconcile(&mut self, ctx: &Ctx<'_>) -> Result<Outcome, DeviceError> {
        if self.disconnecting {
            // The worker's report triggers the next reconcile.
            return Ok(Outcome::Idle);
        }
        let store: &dyn Store = ctx.store.as_ref();
        if !self.claimed {
            return self.let_go(ctx);
        }
        let nodes = match negotiate::read_backend(store, &self.backend_path) {
            Ok(n) => n,
            Err(DeviceError::Negotiation(_)) if self.unregistered => return Ok(Outcome::Idle),
            Err(DeviceError::Negotiation(e)) => {
                // The toolstack wrote something unusable; report it like any fatal error.
                self.fail(ctx, &DeviceError::Negotiation(e))?;
                return Ok(Outcome::Idle);
            }
            Err(e) => return Err(e),
        };
        let Some(nodes) = nodes else {
            if store.exists(&self.backend_path)? {
                // Still being written (no `frontend` yet); the next write wakes us.
                return Ok(Outcome::Idle);
            }
            info!(device = %self.key, "backend directory removed");
            if self.session.is_some() {
                self.start_disconnect(ctx);
                return Ok(Outcome::Idle);
            }
            self.cleanup(ctx);
            return Ok(Outcome::Forget);
        };

        if nodes.state == Some(XenbusState::Initialising) && self.published != XenbusState::Unknown
        {
            // Only the toolstack writes Initialising, when it creates a device: this is a
            // new device under the same name (detach and attach faster than we saw the
            // removal). Nothing of the old one may survive, least of all its storage.
            if self.session.is_some() {
                info!(device = %self.key, "device re-created; tearing down the old one first");
                self.start_disconnect(ctx);
                return Ok(Outcome::Idle);
            }
            info!(device = %self.key, "device re-created");
            let (key, path) = (self.key.clone(), self.backend_path.clone());
            let watched = self.watched_frontend.take();
            let frontend_path = self.frontend_path.take();
            let sessions = self.sessions;
            let session_id = self.session_id;
            let open_id = self.open_id;
            let warnings = std::mem::take(&mut self.warnings);
            *self = Device::new(key, path);
            self.watched_frontend = watched;
            self.frontend_path = frontend_path;
            self.sessions = sessions;
            self.session_id = session_id;
            // An open still running for the old device reports a stale id.
            self.open_id = open_id;
            self.warnings = warnings;
        }
        if self.unregistered {
            // Like a Linux backend device after `device_unregister`: nothing follows the
            // frontend any more; only re-creation (above) or removal brings us back.
            return Ok(Outcome::Idle);
        }
        self.warn_ignored(&nodes.ignored);

        let mut outcome = Outcome::Idle;
        if self.frontend_path.as_deref() != Some(nodes.frontend.as_str()) {
            if self.frontend_path.is_some() {
                warn!(device = %self.key, frontend = %nodes.frontend, "frontend path changed; following it");
            }
            self.frontend_path = Some(nodes.frontend.clone());
            outcome = Outcome::WatchFrontend;
        }
        let frontend = nodes.frontend.clone();

        let fe_raw = store.read(&join(&frontend, "state"))?;
        // Linux reads the node with `%d` (`xenbus_read_driver_state`): a value that is no
        // number is Unknown; a number xenbus.h does not define reaches `frontend_changed`'s
        // `default:` case, which is fatal.
        let undefined_state = fe_raw
            .as_deref()
            .filter(|v| XenbusState::parse(v).is_none())
            .and_then(crate::parse::parse_u32);
        let fe_state = fe_raw
            .as_deref()
            .and_then(XenbusState::parse)
            .unwrap_or(XenbusState::Unknown);
        let written_unknown =
            fe_raw.is_some() && fe_state == XenbusState::Unknown && undefined_state.is_none();
        if fe_raw.is_some() {
            self.frontend_seen = true;
        }
        if fe_state != self.frontend_state {
            debug!(device = %self.key, from = %self.frontend_state, to = %fe_state, "frontend state");
            self.frontend_state = fe_state;
        }
        let frontend_gone = self.domain_gone || (fe_raw.is_none() && self.frontend_seen);
        let close_requested = ctx.shutting_down || nodes.online == Some(false);

        if !frontend_gone && (self.unregistering || written_unknown) {
            if let Some(raw) = fe_raw.as_deref().filter(|_| !self.unregistering) {
                let value = crate::error::sanitize(raw);
                self.warn_limited(Kind::FrontendState, |key, suppressed| {
                    warn!(device = %key, %value, suppressed,
                        "frontend state is Unknown: closing the device and leaving it closed \
                         until the toolstack re-creates or removes it, as Linux blkback does");
                });
            }
            return self.unregister(ctx, &nodes);
        }
        if let Some(n) = undefined_state {
            if self.failed.is_none() {
                let e = NegotiationError::BadFrontendState(n.to_string());
                self.fail(ctx, &e.into())?;
            }
            return Ok(outcome);
        }

        // Device setup: blkback's probe (limits, InitWait) and backend_changed (open the
        // storage once the hotplug script has run).
        if self.published == XenbusState::Unknown && self.failed.is_none() {
            if close_requested
                || frontend_gone
                || matches!(fe_state, XenbusState::Closing | XenbusState::Closed)
            {
                // Nothing to set up for a device that is going away.
            } else {
                if !ctx.backend_type.wait_for_hotplug {
                    // Our own backend type has no hotplug script: open first, so a bad
                    // image fails the device before the frontend starts. InitWait follows
                    // when the open completes (it runs on a worker thread).
                    match self.ensure_disk(ctx, &nodes) {
                        Ok(true) => {}
                        Ok(false) => return Ok(outcome),
                        Err(e) => {
                            self.fail(ctx, &e)?;
                            return Ok(outcome);
                        }
                    }
                }
                let settings = self.settings(ctx);
                if negotiate::publish_initwait(store, &self.backend_path, &settings)? {
                    info!(device = %self.key, "InitWait");
                    self.published = XenbusState::InitWait;
                }
            }
        }
        // Open the storage once the device is waiting for its frontend and may be opened:
        // right away for our own type, after the hotplug script for `vbd`. (Also covers a
        // device found Closed at start-up, which reaches InitWait only when its frontend
        // comes back.)
        let may_open = !ctx.backend_type.wait_for_hotplug || nodes.hotplug_done();
        if self.published == XenbusState::InitWait
            && self.disk.is_none()
            && self.failed.is_none()
            && may_open
        {
            if let Err(e) = self.ensure_disk(ctx, &nodes) {
                self.fail(ctx, &e)?;
                return Ok(outcome);
            }
        }

        if frontend_gone {
            if self.session.is_some() {
                self.info_limited(|key| info!(device = %key, "frontend gone; tearing down"));
                self.start_disconnect(ctx);
                return Ok(outcome);
            }
            self.publish(ctx, &nodes, XenbusState::Closed)?;
            if self.domain_gone && ctx.backend_type.is_owned() {
                // No toolstack knows this device (`xenblkd attach` wrote it): its guest
                // is dead, so the directory is ours to remove, or it lingers forever.
                info!(device = %self.key, "guest domain is gone; removing the device");
                toolstack::remove_backend_dir(store, &self.backend_path)?;
                self.cleanup(ctx);
                return Ok(Outcome::Forget);
            }
            return Ok(outcome);
        }

        match fe_state {
            XenbusState::Unknown => {
                // No `state` node yet (one that reads Unknown was handled above): the
                // frontend directory is not written yet, wait in InitWait, unless asked to
                // close. Linux would take this for Unknown too, but only because its
                // toolstack always writes the frontend first; ours may not.
                if close_requested {
                    self.publish(ctx, &nodes, XenbusState::Closed)?;
                }
            }
            XenbusState::Initialising | XenbusState::InitWait => {
                if self.session.is_some() {
                    // A frontend that restarts without closing (crash + kexec): its old
                    // rings are gone, ours must go too before it reconnects.
                    self.info_limited(|key| info!(device = %key, "frontend restarted without closing; disconnecting"));
                    self.start_disconnect(ctx);
                    return Ok(outcome);
                }
                if close_requested {
                    self.publish(ctx, &nodes, XenbusState::Closed)?;
                } else if self.published != XenbusState::InitWait && self.failed.is_none() {
                    // Closed (or torn down above): blkback's "prepare for reconnect".
                    self.info_limited(
                        |key| info!(device = %key, "frontend is back: prepare for reconnect"),
                    );
                    let settings = self.settings(ctx);
                    if negotiate::publish_initwait(store, &self.backend_path, &settings)? {
                        self.published = XenbusState::InitWait;
                    }
                }
            }
            XenbusState::Initialised | XenbusState::Connected => {
                if close_requested {
                    // With rings connected, ask the frontend to finish and close (it
                    // answers Closed, then we disconnect); with nothing connected there is
                    // nothing to wait for.
                    let state = if self.session.is_some() {
                        XenbusState::Closing
                    } else {
                        XenbusState::Closed
                    };
                    self.publish(ctx, &nodes, state)?;
                } else if self.session.is_none()
                    && self.failed.is_none()
                    && self.published == XenbusState::InitWait
                    && self.disk.is_some()
                {
                    if let Err(e) = self.connect(ctx, &frontend) {
                        self.fail(ctx, &e)?;
                    }
                }
            }
            XenbusState::Closing => {
                let state = if close_requested && self.session.is_none() {
                    XenbusState::Closed
                } else {
                    XenbusState::Closing
                };
                self.publish(ctx, &nodes, state)?;
            }
            XenbusState::Closed => {
                if self.session.is_some() {
                    self.start_disconnect(ctx);
                    return Ok(outcome);
                }
                self.publish(ctx, &nodes, XenbusState::Closed)?;
                // A later Initialising may retry what failed.
                self.failed = None;
            }
            XenbusState::Reconfiguring | XenbusState::Reconfigured => {
                if self.failed.is_none() {
                    let e = NegotiationError::BadFrontendState(fe_state.as_u32().to_string());
                    self.fail(ctx, &e.into())?;
                }
            }
        }
        Ok(outcome)
    }

    /// The device-model claim is gone: another device model may own the ring next, so
    /// nothing of ours may stay on it. Disconnects, tells the frontend (Closed) if we ever
    /// spoke to it, and asks to be forgotten.
    fn let_go(&mut self, ctx: &Ctx<'_>) -> Result<Outcome, DeviceError> {
        if self.session.is_some() {
            info!(device = %self.key, "device-model claim withdrawn; disconnecting");
            self.start_disconnect(ctx);
            return Ok(Outcome::Idle);
        }
        if self.opening {
            // Its report wakes us; dropping the storage it opened closes it.
            return Ok(Outcome::Idle);
        }
        if self.published != XenbusState::Unknown
            && negotiate::write_state(ctx.store.as_ref(), &self.backend_path, XenbusState::Closed)?
        {
            info!(device = %self.key, state = %XenbusState::Closed, "backend state");
        }
        self.cleanup(ctx);
        Ok(Outcome::Forget)
    }

    /// The frontend's `state` reads Unknown: what Linux blkback's `frontend_changed` does
    /// for `XenbusStateUnknown` (drivers/block/xen-blkback/xenbus.c), `device_unregister`:
    /// `xen_blkbk_remove` disconnects the rings and releases the VBD, `xenbus_dev_remove`
    /// switches to Closed and drops the watch on the frontend, and the device is not
    /// probed again, since `xenbus_probe_node` ignores a backend whose state is not
    /// Initialising, until the toolstack re-creates it. Here likewise: rings
    /// disconnected, Closed, storage released, the frontend no longer followed, until
    /// re-creation (`state` Initialising) or removal.
    fn unregister(&mut self, ctx: &Ctx<'_>, nodes: &BackendNodes) -> Result<Outcome, DeviceError> {
        self.unregistering = true;
        if self.session.is_some() {
            // Finished when the disconnect reports, whatever the frontend writes meanwhile.
            self.start_disconnect(ctx);
            return Ok(Outcome::Idle);
        }
        self.publish(ctx, nodes, XenbusState::Closed)?;
        // An open still running delivers to nobody: its storage is dropped on arrival.
        self.opening = false;
        self.disk = None;
        self.disk_info = None;
        self.withdrawn = Withdrawn::default();
        self.unregistering = false;
        self.unregistered = true;
        self.frontend_path = None;
        info!(device = %self.key, "unregistered: not following the frontend any more");
        Ok(Outcome::UnwatchFrontend)
    }

    fn settings(&self, ctx: &Ctx<'_>) -> crate::config::DeviceSettings {
        ctx.config
            .settings_for(&self.key.backend_type, self.key.domid, self.key.devid)
    }

    /// Writes `state` unless it already holds `state` (or the device is being removed).
    fn publish(
        &mut self,
        ctx: &Ctx<'_>,
        nodes: &BackendNodes,
        state: XenbusState,
    ) -> Result<(), DeviceError> {
        if nodes.state == Some(state) && self.published == state {
            return Ok(());
        }
        if negotiate::write_state(ctx.store.as_ref(), &self.backend_path, state)? {
            if self.published != state {
                self.info_limited(|key| info!(device = %key, %state, "backend state"));
            }
            self.published = state;
        }
        Ok(())
    }

    /// Opens the storage once per device, on a worker thread: opening can block (a block
    /// device claimed elsewhere, network storage), and must not stall other devices.
    /// `Ok(true)` once the storage is open; `Ok(false)` while the open is in progress.
    fn ensure_disk(&mut self, ctx: &Ctx<'_>, nodes: &BackendNodes) -> Result<bool, DeviceError> {
        if self.disk.is_some() {
            return Ok(true);
        }
        if self.opening {
            return Ok(false);
        }
        let config = negotiate::device_config(
            &self.key.backend_type,
            self.key.devid,
            &self.backend_path,
            nodes,
            self.settings(ctx),
        )?;
        self.open_id += 1;
        self.opening = true;
        crate::manager::spawn_open(
            ctx.events,
            &self.key,
            self.open_id,
            ctx.factory.clone(),
            config,
        );
        Ok(false)
    }

    /// The worker finished opening the storage.
    pub fn opened(
        &mut self,
        ctx: &Ctx<'_>,
        open_id: u64,
        config: DeviceConfig,
        result: Result<Arc<dyn Disk>, crate::VbdError>,
    ) -> Result<(), DeviceError> {
        if open_id != self.open_id || !self.opening {
            // A device re-created meanwhile: this storage belongs to nobody now.
            return Ok(());
        }
        self.opening = false;
        match result {
            Ok(disk) => {
                let info = disk.info();
                info!(
                    device = %self.key,
                    path = %config.target.path.display(),
                    format = config.target.format.name(),
                    size = info.size_bytes,
                    sector_size = info.logical_block_size,
                    read_only = config.read_only || info.read_only,
                    "storage opened"
                );
                self.disk_info = Some(info);
                self.disk = Some(disk);
                self.config = Some(config);
                // A new storage: what the old one refused says nothing about it.
                self.withdrawn = Withdrawn::default();
                Ok(())
            }
            Err(e) => self.fail(ctx, &DeviceError::Vbd(e)),
        }
    }

    /// blkback's `connect_ring` + `connect`.
    fn connect(&mut self, ctx: &Ctx<'_>, frontend: &str) -> Result<(), DeviceError> {
        let (Some(config), Some(disk)) = (self.config.as_ref(), self.disk.as_ref()) else {
            return Ok(());
        };
        let params = negotiate::read_frontend(ctx.store.as_ref(), frontend, &config.settings)?;
        let info = disk.info();
        let mut features = negotiate::backend_features(config, &info, params.large_sector_size);
        self.withdrawn.apply(&mut features);
        let (config, disk) = (config.clone(), disk.clone());
        self.warn_ignored(&params.ignored_flags);
        if info.logical_block_size > 512 && !params.large_sector_size {
            // What Linux blkback does too; Linux blkfront copes, others may not.
            self.warn_limited(Kind::LargeSectorSize, |key, suppressed| {
                warn!(
                    device = %key,
                    sector_size = info.logical_block_size,
                    suppressed,
                    "frontend did not advertise feature-large-sector-size"
                );
            });
        }
        self.session_id += 1;
        let vbd = ctx.factory.connect(ConnectRequest {
            config: &config,
            disk: &disk,
            frontend: &params,
            features: &features,
            events: crate::manager::session_sink(ctx.events, &self.key, self.session_id),
        })?;
        self.sessions += 1;
        self.info_limited(|key| {
            info!(
                device = %key,
                protocol = ?params.protocol,
                queues = params.queues.len(),
                ring_page_order = params.ring_page_order,
                persistent = params.persistent,
                "rings connected"
            )
        });
        self.disk_info = Some(info);
        self.session = Some(Session {
            vbd,
            frontend: params,
            features,
        });
        match negotiate::publish_connected(ctx.store.as_ref(), &self.backend_path, &features) {
            Ok(true) => {
                self.published = XenbusState::Connected;
                self.info_limited(
                    |key| info!(device = %key, sectors = features.sectors, "Connected"),
                );
                Ok(())
            }
            Ok(false) => {
                // Removed under us: the next reconcile tears down.
                self.start_disconnect(ctx);
                Ok(())
            }
            Err(e) => {
                self.start_disconnect(ctx);
                Err(e.into())
            }
        }
    }

    /// blkback's `xenbus_dev_fatal`: `error` node, Closing; rings (if any) disconnected.
    fn fail(&mut self, ctx: &Ctx<'_>, err: &DeviceError) -> Result<(), DeviceError> {
        let Some((errno, message)) = err.fatal_report() else {
            return Err(err.clone());
        };
        if self.failed.is_some() {
            // Already reported and Closing. Writing again would fire our own watch on
            // `state` and, with a toolstack error that persists, loop forever.
            if self.session.is_some() {
                self.start_disconnect(ctx);
            }
            return Ok(());
        }
        self.warn_limited(Kind::DeviceFailed, |key, suppressed| {
            warn!(device = %key, errno, %message, suppressed, "device failed");
        });
        negotiate::publish_fatal(ctx.store.as_ref(), &self.backend_path, errno, &message)?;
        self.wrote_linux_error = true;
        self.failed = Some(format!("{errno} {message}"));
        self.published = XenbusState::Closing;
        if self.session.is_some() {
            self.start_disconnect(ctx);
        }
        Ok(())
    }

    fn start_disconnect(&mut self, ctx: &Ctx<'_>) {
        if let Some(s) = self.session.take() {
            self.info_limited(|key| info!(device = %key, "disconnecting"));
            self.disconnecting = true;
            crate::manager::spawn_disconnect(
                ctx.events,
                &self.key,
                self.session_id,
                s.vbd,
                ctx.drain_timeout,
            );
        }
    }

    /// The worker finished a disconnect.
    pub fn disconnected(
        &mut self,
        session: u64,
        result: Result<DisconnectReport, crate::VbdError>,
    ) {
        if session != self.session_id {
            return;
        }
        self.disconnecting = false;
        match result {
            Ok(report) => {
                if report.drained {
                    self.info_limited(|key| info!(device = %key, "disconnected"));
                } else {
                    self.warn_limited(Kind::Disconnect, |key, suppressed| {
                        warn!(device = %key, abandoned = report.abandoned_requests,
                            detail = %report.detail, suppressed, "disconnected without draining");
                    });
                }
                self.last_disconnect = Some(report);
            }
            Err(e) => {
                self.warn_limited(Kind::Disconnect, |key, suppressed| {
                    warn!(device = %key, error = %e, suppressed, "disconnect failed");
                });
                self.last_disconnect = Some(DisconnectReport {
                    drained: false,
                    abandoned_requests: 0,
                    detail: e.to_string(),
                });
            }
        }
    }

    /// An engine report.
    pub fn vbd_event(
        &mut self,
        ctx: &Ctx<'_>,
        session: u64,
        event: VbdEvent,
    ) -> Result<(), DeviceError> {
        if session != self.session_id {
            return Ok(());
        }
        let Some(s) = self.session.as_mut() else {
            return Ok(());
        };
        let store = ctx.store.as_ref();
        match event {
            VbdEvent::Resized(size_bytes) => {
                let sectors = crate::vbd::sectors_for(
                    size_bytes,
                    s.features.sector_size,
                    s.frontend.large_sector_size,
                );
                if sectors == s.features.sectors {
                    return Ok(());
                }
                if negotiate::publish_resize(store, &self.backend_path, sectors)? {
                    info!(device = %self.key, from = s.features.sectors, to = sectors, "resized");
                    s.features.sectors = sectors;
                    if let Some(i) = self.disk_info.as_mut() {
                        i.size_bytes = size_bytes;
                    }
                }
            }
            VbdEvent::FeatureLost(feature) => {
                // Linux blkback rewrites `feature-flush-cache` / `feature-barrier` to 0
                // when the storage refuses them, and never withdraws discard; and on a
                // reconnect it advertises all of them again. We withdraw every feature
                // the engine can lose, secure discard included (a frontend reading
                // `discard-secure` 1 would keep sending what fails), and keep them
                // withdrawn for as long as this storage is open: a frontend reconnecting
                // reads our nodes again, and the storage has not changed its mind.
                let w = &mut self.withdrawn;
                let f = &mut s.features;
                let nodes: &[&str] = match feature {
                    Feature::Flush => {
                        (w.flush, w.barrier) = (true, true);
                        (f.flush, f.barrier) = (false, false);
                        &["feature-flush-cache", "feature-barrier"]
                    }
                    Feature::Barrier => {
                        w.barrier = true;
                        f.barrier = false;
                        &["feature-barrier"]
                    }
                    Feature::Discard => {
                        (w.discard, w.secure_discard) = (true, true);
                        (f.discard, f.secure_discard) = (false, false);
                        &["feature-discard", "discard-secure"]
                    }
                    Feature::SecureDiscard => {
                        w.secure_discard = true;
                        f.secure_discard = false;
                        &["discard-secure"]
                    }
                };
                if negotiate::publish_withdrawn(ctx.store.as_ref(), &self.backend_path, nodes)? {
                    self.info_limited(|key| info!(device = %key, ?feature, "feature withdrawn"));
                }
            }
            VbdEvent::Fatal(message) => {
                let e = DeviceError::Vbd(crate::VbdError::new("engine", message, 5));
                self.fail(ctx, &e)?;
            }
        }
        Ok(())
    }

    /// Asks the storage for its size and publishes it if it changed.
    pub fn refresh_size(&mut self, ctx: &Ctx<'_>) -> Result<(), DeviceError> {
        let Some(disk) = self.disk.clone() else {
            return Ok(());
        };
        let size = disk.refresh_size()?;
        if self.session.is_some() {
            let id = self.session_id;
            self.vbd_event(ctx, id, VbdEvent::Resized(size))?;
        } else if let Some(i) = self.disk_info.as_mut() {
            i.size_bytes = size;
        }
        Ok(())
    }

    /// Removes what we wrote outside the backend directory.
    fn cleanup(&mut self, ctx: &Ctx<'_>) {
        if self.wrote_linux_error {
            if let Some(p) = negotiate::linux_error_path(&self.backend_path) {
                // The error directory of this device only.
                let dir = p.trim_end_matches("/error").to_string();
                if let Err(e) = ctx.store.rm(&dir) {
                    debug!(device = %self.key, error = %e, "removing error node");
                }
            }
        }
    }

    /// The status snapshot.
    pub fn status(&self) -> DeviceStatus {
        DeviceStatus {
            backend_type: self.key.backend_type.clone(),
            domid: self.key.domid,
            devid: self.key.devid,
            vdev: vdev_name(self.key.devid),
            backend_path: self.backend_path.clone(),
            frontend_path: self.frontend_path.clone(),
            state: self.published,
            frontend_state: self.frontend_state,
            target: self
                .config
                .as_ref()
                .map(|c| c.target.path.display().to_string()),
            format: self
                .config
                .as_ref()
                .map(|c| c.target.format.name().to_string()),
            disk: self.disk_info,
            layers: self.disk.as_ref().map(|d| d.layers()).unwrap_or_default(),
            frontend: self.session.as_ref().map(|s| s.frontend.clone()),
            features: self.session.as_ref().map(|s| s.features),
            stats: self
                .session
                .as_ref()
                .map(|s| s.vbd.stats())
                .unwrap_or_default(),
            error: self.failed.clone(),
            sessions: self.sessions,
            last_disconnect: self.last_disconnect.clone(),
            disconnecting: self.disconnecting,
        }
    }

    /// Disconnects synchronously (daemon exit after the shutdown deadline).
    pub fn force_disconnect(&mut self, timeout: Duration) {
        if let Some(s) = self.session.take() {
            let r = s.vbd.disconnect(timeout);
            let id = self.session_id;
            self.disconnecting = true;
            self.disconnected(id, r);
        }
    }
}
