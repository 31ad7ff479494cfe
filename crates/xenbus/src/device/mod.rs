//! One device's state machine: a [`Phase`] and the frontend's `state`, matched.
//!
//! `Device::reconcile` is *level-triggered*: whatever event woke it, it re-reads the
//! backend directory and the frontend's `state` and moves the device toward what they
//! ask for. Watch events only say "something changed here"; they can be coalesced,
//! reordered with our own writes, or dropped by a full queue, and Linux blkback carries
//! comments about exactly that ("Ensure we connect even when two watches fire in close
//! succession"). Re-reading makes every such race harmless.
//!
//! A device is in one [`Phase`]; what it holds lives in the phase that needs it (the
//! connected rings only in [`Phase::Connected`], the fatal error only in
//! [`Phase::Failed`]). The storage is the one thing that outlives phases (blkback opens
//! its VBD once per device and keeps it across frontend reconnects), so it is a state of
//! its own ([`Storage`]). [`decide`] is the transition table, a pure function of (phase,
//! frontend, close requested) unit-tested row by row; each [`Arm`] is one small method
//! (in `arms`). The table follows blkback's `frontend_changed` and libxl's expectations:
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
//! The device never calls back into the manager: what needs a thread or the manager's
//! tables (opening storage, disconnecting rings, watching the frontend, forgetting the
//! device) it pushes as an [`Effect`], which the manager applies after the call. Opening and
//! disconnecting can wait for storage, so the manager runs them on worker threads and
//! their reports come back as [`Device::opened`] and [`Device::disconnected`].
//!
//! Every warning its guest can repeat at will goes through the device's
//! [`Warnings`](crate::ratelimit::Warnings): one line per kind per interval.

mod arms;
mod events;
mod pause;
mod phase;
mod qos;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::qos::DeviceQos;
pub use pause::DeviceReply;
#[cfg(test)]
use phase::PhaseKind;
use phase::MAX_STEPS;
pub(crate) use phase::{adopts, decide, AfterDisconnect, Arm, Frontend, Phase, Step};

use crate::config::{BackendType, Config};
use crate::error::DeviceError;
use crate::negotiate::{self, BackendNodes, IgnoredValue};
use crate::ratelimit::{self, Kind, Warnings};
use crate::state::XenbusState;
use crate::store::{join, Store, StoreExt};
use crate::vbd::{
    BackendFeatures, ConnectedVbd, DeviceConfig, DisconnectReport, Feature, FrontendParams,
    StorageInfo, VbdEventSink, VbdFactory,
};

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
    /// Makes the sinks of sessions' engine reports.
    pub session_sink: &'a dyn SessionSinks,
}

/// Where the engine's reports about a session go: the manager tags them with the device
/// and the session id and routes them back to [`Device::vbd_event`].
pub(crate) trait SessionSinks {
    /// The sink for session `session` of device `key`.
    fn sink(&self, key: &DeviceKey, session: u64) -> VbdEventSink;
}

impl fmt::Debug for Ctx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ctx")
            .field("backend_type", &self.backend_type.name)
            .field("shutting_down", &self.shutting_down)
            .finish_non_exhaustive()
    }
}

/// What a device asks the manager to do once the call returns.
pub(crate) enum Effect {
    /// Watch the frontend's `state` node at this path (dropping an older watch).
    WatchFrontend(String),
    /// Stop watching the frontend (the device no longer follows it).
    UnwatchFrontend,
    /// Open the storage on a worker thread; its report is [`Device::opened`] with `open_id`.
    Open {
        /// Which open this is (reports of older ones are stale).
        open_id: u64,
        /// What to open.
        config: Box<DeviceConfig>,
    },
    /// Disconnect the rings on a worker thread (a drain can wait for storage); its report
    /// is [`Device::disconnected`] with `session`.
    Disconnect {
        /// The session being disconnected.
        session: u64,
        /// Its rings.
        vbd: Box<dyn ConnectedVbd>,
    },
    /// The backend directory is gone and nothing is left running: forget the device.
    Forget,
    /// Reconcile again on the next tick (an adoption waits for its frontend's domain).
    RetryLater,
}

impl fmt::Debug for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Effect::WatchFrontend(p) => f.debug_tuple("WatchFrontend").field(p).finish(),
            Effect::UnwatchFrontend => f.write_str("UnwatchFrontend"),
            Effect::Open { open_id, .. } => {
                f.debug_struct("Open").field("open_id", open_id).finish()
            }
            Effect::Disconnect { session, .. } => f
                .debug_struct("Disconnect")
                .field("session", session)
                .finish(),
            Effect::Forget => f.write_str("Forget"),
            Effect::RetryLater => f.write_str("RetryLater"),
        }
    }
}

/// A connected session.
pub(crate) struct Session {
    /// Tags the engine's reports; reports of older sessions are stale.
    id: u64,
    rings: Rings,
    frontend: FrontendParams,
    features: BackendFeatures,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("rings", &self.rings)
            .field("features", &self.features)
            .finish_non_exhaustive()
    }
}

/// Where a session's rings are: served, or released by a pause (`xenblkd pause`) while
/// the frontend stays Connected and queues its requests on them.
pub(crate) enum Rings {
    /// Served by the engine.
    Up(Box<dyn ConnectedVbd>),
    /// A disconnect worker drains and releases them for a pause; its report says when.
    Draining,
    /// Drained and released: nothing of the guest's is mapped or bound.
    Released,
    /// The pause's drain timed out: the engine releases them once the storage completes
    /// what is in flight; until the frontend reconnects they are never served again (two
    /// consumers of one ring would answer requests twice).
    Abandoned,
}

impl fmt::Debug for Rings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rings::Up(_) => "Up",
            Rings::Draining => "Draining",
            Rings::Released => "Released",
            Rings::Abandoned => "Abandoned",
        })
    }
}

/// The device's storage: opened once per device and kept across frontend sessions.
#[derive(Default)]
pub(crate) enum Storage {
    /// Not opened (yet, or released when the device unregistered).
    #[default]
    Closed,
    /// A worker opens it; the report with this id is the one awaited.
    Opening {
        /// Which open.
        open_id: u64,
    },
    /// Open.
    Open(Box<OpenStorage>),
}

impl fmt::Debug for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Storage::Closed => f.write_str("Closed"),
            Storage::Opening { open_id } => {
                f.debug_struct("Opening").field("open_id", open_id).finish()
            }
            Storage::Open(o) => f.debug_tuple("Open").field(&o.info).finish(),
        }
    }
}

/// An opened storage and what is known about it.
pub(crate) struct OpenStorage {
    config: DeviceConfig,
    disk: Arc<dyn crate::vbd::Storage>,
    /// The storage's properties, kept current on resize.
    info: StorageInfo,
    /// Features the storage refused after we advertised them: withdrawn for as long as
    /// this storage is open, so a reconnecting frontend is not offered them again.
    withdrawn: Withdrawn,
}

/// Features withdrawn after the storage refused them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Withdrawn {
    flush: bool,
    barrier: bool,
    discard: bool,
    secure_discard: bool,
}

impl Withdrawn {
    /// Records `lost` and what goes with it (flush takes barrier, discard takes secure
    /// discard), and returns the nodes that stop advertising them: the one path from a
    /// lost feature to xenstore, for every feature.
    pub(crate) fn withdraw(&mut self, lost: Feature) -> &'static [&'static str] {
        match lost {
            Feature::Flush => {
                (self.flush, self.barrier) = (true, true);
                &["feature-flush-cache", "feature-barrier"]
            }
            Feature::Barrier => {
                self.barrier = true;
                &["feature-barrier"]
            }
            Feature::Discard => {
                (self.discard, self.secure_discard) = (true, true);
                &["feature-discard", "discard-secure"]
            }
            Feature::SecureDiscard => {
                self.secure_discard = true;
                &["discard-secure"]
            }
        }
    }

    /// Removes what is withdrawn from what would be advertised.
    pub(crate) fn apply(self, f: &mut BackendFeatures) {
        f.flush &= !self.flush;
        f.barrier &= !self.barrier;
        f.discard &= !self.discard;
        f.secure_discard &= !self.secure_discard && f.discard;
    }
}

/// One device.
pub(crate) struct Device {
    pub key: DeviceKey,
    pub backend_path: String,
    /// The frontend directory, once read from the backend's `frontend` node.
    pub frontend_path: Option<String>,
    /// The frontend `state` path the manager watches, if any.
    pub watched_frontend: Option<String>,
    phase: Phase,
    storage: Storage,
    /// What we last wrote in `state`.
    published: XenbusState,
    /// What the frontend's `state` last said (for status).
    frontend_state: XenbusState,
    /// The frontend's `state` existed at some point (so its absence now means it is gone).
    frontend_seen: bool,
    /// The frontend's domain is gone (`@releaseDomain` and no `/local/domain/<id>`).
    pub domain_gone: bool,
    /// We may serve the device: its type needs no device-model claim, or the claim is there.
    pub claimed: bool,
    /// The toolstack's name of the guest, read when the device was first seen; lifecycle
    /// log lines carry it.
    pub guest: Option<String>,
    /// The id of the last session connected; reports of older ones are stale.
    session_id: u64,
    /// The id of the last open started; reports of older ones are stale.
    open_id: u64,
    /// Frontend sessions served.
    sessions: u64,
    last_disconnect: Option<DisconnectReport>,
    /// We wrote Linux's `error/...` node and must remove it when the device goes.
    wrote_linux_error: bool,
    /// Rate limits of the warnings the guest can cause.
    pub warnings: Warnings,
    /// Paused by the operator: no rings are served until resumed (see `pause`).
    paused: bool,
    /// Control requests answered when a pause's drain, or a reopen's open, reports.
    waiters: pause::Waiters,
    /// QoS set by the operator (`xenblkd limit`), over the configuration's.
    qos_live: Option<DeviceQos>,
    /// The QoS last given to the engine (for status).
    qos_shown: DeviceQos,
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Device")
            .field("key", &self.key)
            .field("phase", &self.phase)
            .field("storage", &self.storage)
            .field("published", &self.published)
            .field("frontend_state", &self.frontend_state)
            .finish_non_exhaustive()
    }
}

impl Device {
    pub fn new(key: DeviceKey, backend_path: String) -> Device {
        Device {
            key,
            backend_path,
            frontend_path: None,
            watched_frontend: None,
            phase: Phase::Setup,
            storage: Storage::Closed,
            published: XenbusState::Unknown,
            frontend_state: XenbusState::Unknown,
            frontend_seen: false,
            domain_gone: false,
            claimed: true,
            guest: None,
            session_id: 0,
            open_id: 0,
            sessions: 0,
            last_disconnect: None,
            wrote_linux_error: false,
            warnings: Warnings::new(),
            paused: false,
            waiters: pause::Waiters::default(),
            qos_live: None,
            qos_shown: DeviceQos::default(),
        }
    }

    /// True while rings are connected or being disconnected.
    pub fn busy(&self) -> bool {
        matches!(
            self.phase,
            Phase::Connected(_) | Phase::Disconnecting { .. }
        )
    }

    /// Moves the device toward what xenstore asks for.
    pub fn reconcile(&mut self, ctx: &Ctx<'_>, fx: &mut Vec<Effect>) -> Result<(), DeviceError> {
        if let Phase::Disconnecting { .. } = self.phase {
            // The worker's report triggers the next reconcile.
            return Ok(());
        }
        if !self.claimed {
            return self.let_go(ctx, fx);
        }
        let Some(nodes) = self.read_backend(ctx, fx)? else {
            return Ok(());
        };
        if self.recreated(&nodes, fx) {
            return Ok(());
        }
        if let Phase::Unregistered = self.phase {
            // Like a Linux backend device after `device_unregister`: nothing follows the
            // frontend any more; only re-creation (above) or removal brings us back.
            return Ok(());
        }
        self.warn_ignored(&nodes.ignored);
        if self.frontend_path.as_deref() != Some(nodes.frontend.as_str()) {
            if self.frontend_path.is_some() {
                warn!(device = %self.key, domid = self.key.domid, frontend = %nodes.frontend, "frontend path changed; following it");
            }
            self.frontend_path = Some(nodes.frontend.clone());
            fx.push(Effect::WatchFrontend(join(&nodes.frontend, "state")));
        }
        let raw = ctx.store.read(&join(&nodes.frontend, "state"))?;
        let frontend = Frontend::classify(raw.as_deref(), self.frontend_seen, self.domain_gone);
        self.frontend_seen |= raw.is_some();
        let shown = frontend.shown(self.frontend_state);
        if shown != self.frontend_state {
            debug!(device = %self.key, from = %self.frontend_state, to = %shown, "frontend state");
            self.frontend_state = shown;
        }
        let close = ctx.shutting_down || nodes.online == Some(false);
        if matches!(self.phase, Phase::Setup)
            && self.published == XenbusState::Unknown
            && !close
            && adopts(nodes.state, &frontend)
        {
            // Connected by a process before us: its state is ours now, unwritten.
            info!(device = %self.key, domid = self.key.domid, "found Connected: adopting its rings");
            self.published = XenbusState::Connected;
            self.phase = Phase::Adopting;
        }
        for _ in 0..MAX_STEPS {
            if self.step(ctx, &nodes, &frontend, close, fx)? == Step::Done {
                break;
            }
        }
        Ok(())
    }

    /// Runs the arm the transition table picks.
    fn step(
        &mut self,
        ctx: &Ctx<'_>,
        nodes: &BackendNodes,
        frontend: &Frontend,
        close: bool,
        fx: &mut Vec<Effect>,
    ) -> Result<Step, DeviceError> {
        match decide(self.phase.kind(), frontend, close) {
            Arm::Wait => Ok(Step::Done),
            Arm::DisconnectGone => {
                self.info_limited(
                    |key| info!(device = %key, domid = key.domid, "frontend gone; tearing down"),
                );
                self.disconnect(AfterDisconnect::Closed, fx);
                Ok(Step::Done)
            }
            Arm::Gone => self.gone(ctx, nodes, fx),
            Arm::Unregister => self.unregister(ctx, nodes, fx),
            Arm::FrontendUnknown => self.frontend_unknown(ctx, nodes, frontend, fx),
            Arm::Fatal => self.frontend_invalid(ctx, frontend, fx),
            Arm::SetUp => self.set_up(ctx, nodes, fx),
            Arm::AwaitFrontend { connect } => self.await_frontend(ctx, nodes, connect, fx),
            Arm::Adopt => self.adopt(ctx, nodes, fx),
            Arm::PrepareReconnect => self.prepare_reconnect(ctx, nodes),
            Arm::Restarted => {
                // A frontend that restarts without closing (crash + kexec): its old rings
                // are gone, ours must go too before it reconnects.
                self.info_limited(
                    |key| info!(device = %key, domid = key.domid, "frontend restarted without closing; disconnecting"),
                );
                self.disconnect(AfterDisconnect::Closed, fx);
                Ok(Step::Done)
            }
            Arm::AskToClose => {
                // With rings connected, ask the frontend to finish and close (it answers
                // Closed, then we disconnect).
                self.publish(ctx, nodes, XenbusState::Closing)?;
                Ok(Step::Done)
            }
            Arm::Publish(state) => {
                self.publish(ctx, nodes, state)?;
                self.rest();
                Ok(Step::Done)
            }
            Arm::DisconnectClosed => {
                self.disconnect(AfterDisconnect::Closed, fx);
                Ok(Step::Done)
            }
            Arm::Closed => {
                self.publish(ctx, nodes, XenbusState::Closed)?;
                self.phase = Phase::Closed;
                Ok(Step::Done)
            }
        }
    }

    /// After publishing Closing or Closed with no rings: a device being set up or waiting
    /// for its frontend is now closed; a failure (or an unregistering) stays what it is.
    fn rest(&mut self) {
        if matches!(self.phase, Phase::Setup | Phase::InitWait | Phase::Adopting) {
            self.phase = Phase::Closed;
        }
    }

    /// Reads the backend directory; `None` when there is nothing more to do this time (the
    /// directory is being written, was removed, or holds something unusable).
    fn read_backend(
        &mut self,
        ctx: &Ctx<'_>,
        fx: &mut Vec<Effect>,
    ) -> Result<Option<BackendNodes>, DeviceError> {
        let store: &dyn Store = ctx.store.as_ref();
        let nodes = match negotiate::read_backend(store, &self.backend_path) {
            Ok(n) => n,
            Err(DeviceError::Negotiation(_)) if matches!(self.phase, Phase::Unregistered) => {
                return Ok(None)
            }
            Err(DeviceError::Negotiation(e)) => {
                // The toolstack wrote something unusable; report it like any fatal error.
                self.fail(ctx, &DeviceError::Negotiation(e), fx)?;
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        if nodes.is_some() {
            return Ok(nodes);
        }
        if store.exists(&self.backend_path)? {
            // Still being written (no `frontend` yet); the next write wakes us.
            return Ok(None);
        }
        info!(device = %self.key, domid = self.key.domid, "backend directory removed");
        if let Phase::Connected(_) = self.phase {
            self.disconnect(AfterDisconnect::Closed, fx);
        } else {
            self.cleanup(ctx);
            fx.push(Effect::Forget);
        }
        Ok(None)
    }

    /// Only the toolstack writes Initialising, when it creates a device: seen after we
    /// published anything, this is a new device under the same name (detach and attach
    /// faster than we saw the removal). Nothing of the old one may survive, least of all
    /// its storage. True if the reconcile is over for now.
    fn recreated(&mut self, nodes: &BackendNodes, fx: &mut Vec<Effect>) -> bool {
        if nodes.state != Some(XenbusState::Initialising) || self.published == XenbusState::Unknown
        {
            return false;
        }
        if let Phase::Connected(_) = self.phase {
            info!(device = %self.key, domid = self.key.domid, "device re-created; tearing down the old one first");
            self.disconnect(AfterDisconnect::Closed, fx);
            return true;
        }
        info!(device = %self.key, domid = self.key.domid, "device re-created");
        let mut fresh = Device::new(self.key.clone(), self.backend_path.clone());
        fresh.watched_frontend = self.watched_frontend.take();
        fresh.frontend_path = self.frontend_path.take();
        fresh.sessions = self.sessions;
        fresh.session_id = self.session_id;
        // An open still running for the old device reports a stale id.
        fresh.open_id = self.open_id;
        fresh.warnings = std::mem::take(&mut self.warnings);
        *self = fresh;
        false
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
                warn!(device = %key, domid = key.domid, path = %i.path, value = %i.value, suppressed,
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

    /// Hands the device over to the next daemon: rings (if any) drained and released by a
    /// disconnect worker, nothing written. Returns whether a disconnect was started.
    pub fn hand_over(&mut self, fx: &mut Vec<Effect>) -> bool {
        match self.phase {
            Phase::Connected(_) => {
                self.disconnect(AfterDisconnect::HandedOver, fx);
                true
            }
            Phase::Disconnecting { ref mut then, .. } => {
                // Rings already going down for another reason, which is the frontend's or
                // the toolstack's business; what it leads to is for the next daemon.
                *then = AfterDisconnect::HandedOver;
                true
            }
            _ => {
                self.phase = Phase::HandedOver;
                false
            }
        }
    }

    /// Disconnects synchronously (daemon exit after the shutdown deadline).
    pub fn force_disconnect(&mut self, timeout: Duration) {
        if !matches!(self.phase, Phase::Connected(_)) {
            return;
        }
        let Phase::Connected(s) = std::mem::replace(&mut self.phase, Phase::Closed) else {
            return;
        };
        let Rings::Up(vbd) = s.rings else {
            // Paused: released already, or a worker still drains (bounded by the same
            // timeout) and the process exits after this.
            return;
        };
        let r = vbd.disconnect(timeout);
        self.phase = Phase::Disconnecting {
            session: s.id,
            then: AfterDisconnect::Closed,
        };
        self.disconnected(s.id, r);
    }
}
