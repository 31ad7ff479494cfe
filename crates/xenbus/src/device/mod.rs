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
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::config::{BackendType, Config};
use crate::error::{sanitize, DeviceError};
use crate::negotiate::{self, BackendNodes, IgnoredValue};
use crate::ratelimit::{self, Kind, Warnings};
use crate::state::XenbusState;
use crate::store::{join, Store, StoreExt};
use crate::vbd::{
    BackendFeatures, ConnectedVbd, DeviceConfig, DisconnectReport, Disk, DiskInfo, Feature,
    FrontendParams, VbdEventSink, VbdFactory,
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
        config: DeviceConfig,
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
        }
    }
}

/// Where a device is in its life with its frontend.
#[derive(Debug)]
pub(crate) enum Phase {
    /// Nothing published yet: the device just appeared (blkback's `xen_blkbk_probe`).
    Setup,
    /// InitWait published: waiting for the hotplug script, the storage and then the
    /// frontend's rings.
    InitWait,
    /// Rings connected (Connected published, or Closing when asked to close).
    Connected(Session),
    /// A worker disconnects the rings; its report moves the device to `then`.
    Disconnecting {
        /// The session being disconnected.
        session: u64,
        /// Where the device goes when the rings are down.
        then: AfterDisconnect,
    },
    /// No rings and not waiting for any: the frontend closed (we published Closing or
    /// Closed), went away, or restarted and must come back through Initialising.
    Closed,
    /// A fatal error was reported (`error`, Closing); cleared when the frontend closes.
    Failed {
        /// `<errno> <message>`, as written in `error`.
        error: String,
    },
    /// The frontend's state read Unknown while rings were up: once they are down, the
    /// device unregisters (unless the frontend is gone by then).
    Unregistering,
    /// Unregistered (blkback's `device_unregister`): the device ignores its frontend until
    /// the toolstack re-creates or removes it.
    Unregistered,
}

/// Where a disconnect leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AfterDisconnect {
    /// The ordinary way: the frontend closed, restarted or went away.
    Closed,
    /// The device failed while connected.
    Failed(String),
    /// The frontend's state read Unknown.
    Unregister,
}

impl AfterDisconnect {
    fn phase(self) -> Phase {
        match self {
            AfterDisconnect::Closed => Phase::Closed,
            AfterDisconnect::Failed(error) => Phase::Failed { error },
            AfterDisconnect::Unregister => Phase::Unregistering,
        }
    }
}

/// A connected session.
pub(crate) struct Session {
    /// Tags the engine's reports; reports of older sessions are stale.
    id: u64,
    vbd: Box<dyn ConnectedVbd>,
    frontend: FrontendParams,
    features: BackendFeatures,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("features", &self.features)
            .finish_non_exhaustive()
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
    disk: Arc<dyn Disk>,
    /// The storage's properties, kept current on resize.
    info: DiskInfo,
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

/// What the frontend's `state` node says, classified the way Linux blkback reacts to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frontend {
    /// No `state` node, and there never was one: the frontend is not written yet.
    Absent,
    /// The node went away after we saw it, or the frontend's domain is gone.
    Gone,
    /// Written, but `0` or not a number: Linux reads it with `%d` as Unknown, which
    /// unregisters the device. Holds the value, escaped for logs.
    Unknown(String),
    /// A number xenbus.h does not define, Reconfiguring or Reconfigured: `frontend_changed`'s
    /// `default:` case, fatal.
    Invalid(u32),
    /// Initialising, InitWait, Initialised, Connected, Closing or Closed.
    State(XenbusState),
}

impl Frontend {
    /// Classifies the raw `state` node (`seen`: the node existed before).
    pub(crate) fn classify(raw: Option<&[u8]>, seen: bool, domain_gone: bool) -> Frontend {
        let parsed = raw.and_then(XenbusState::parse);
        if let (Some(v), None) = (raw, parsed) {
            if let Some(n) = crate::parse::parse_u32(v) {
                // Fatal even for a frontend found gone, as before the phase split.
                return Frontend::Invalid(n);
            }
        }
        if domain_gone || (raw.is_none() && seen) {
            return Frontend::Gone;
        }
        let Some(raw) = raw else {
            return Frontend::Absent;
        };
        match parsed.unwrap_or(XenbusState::Unknown) {
            XenbusState::Unknown => Frontend::Unknown(sanitize(raw)),
            s @ (XenbusState::Reconfiguring | XenbusState::Reconfigured) => {
                Frontend::Invalid(s.as_u32())
            }
            s => Frontend::State(s),
        }
    }

    /// The state shown in status.
    fn shown(&self, previous: XenbusState) -> XenbusState {
        match self {
            Frontend::State(s) => *s,
            Frontend::Invalid(n) => XenbusState::from_u32(*n).unwrap_or(XenbusState::Unknown),
            Frontend::Gone => previous,
            Frontend::Absent | Frontend::Unknown(_) => XenbusState::Unknown,
        }
    }
}

/// The phase without its contents, for the transition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PhaseKind {
    Setup,
    InitWait,
    Connected,
    Disconnecting,
    Closed,
    Failed,
    Unregistering,
    Unregistered,
}

impl Phase {
    pub(crate) fn kind(&self) -> PhaseKind {
        match self {
            Phase::Setup => PhaseKind::Setup,
            Phase::InitWait => PhaseKind::InitWait,
            Phase::Connected(_) => PhaseKind::Connected,
            Phase::Disconnecting { .. } => PhaseKind::Disconnecting,
            Phase::Closed => PhaseKind::Closed,
            Phase::Failed { .. } => PhaseKind::Failed,
            Phase::Unregistering => PhaseKind::Unregistering,
            Phase::Unregistered => PhaseKind::Unregistered,
        }
    }
}

/// What one step of the state machine does: the rows of the transition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arm {
    /// Nothing to do (waiting for a worker, or unregistered).
    Wait,
    /// Rings up and the frontend gone: disconnect.
    DisconnectGone,
    /// No rings and the frontend gone: Closed; remove the device if its guest is dead and
    /// nobody else knows it.
    Gone,
    /// The rings are down after an Unknown: unregister.
    Unregister,
    /// The frontend's state reads Unknown: warn, disconnect if needed, unregister.
    FrontendUnknown,
    /// Reconfiguring, Reconfigured or an undefined number: fatal.
    Fatal,
    /// Open the storage (first, for our own type) and publish InitWait.
    SetUp,
    /// Open the storage once the hotplug script ran; connect when the frontend is ready.
    AwaitFrontend { connect: bool },
    /// The frontend came back (Initialising) after we closed: InitWait again.
    PrepareReconnect,
    /// The frontend restarted without closing: its rings are gone, ours go too.
    Restarted,
    /// Rings up, asked to close: Closing, so the frontend finishes and closes.
    AskToClose,
    /// Publish this state (no rings to wait for).
    Publish(XenbusState),
    /// Rings up and the frontend closed: disconnect.
    DisconnectClosed,
    /// The frontend closed: Closed, and a failure is forgotten (a later Initialising may
    /// retry what failed).
    Closed,
}

/// The transition table: what to do in `phase` when the frontend says `frontend` and the
/// toolstack or the daemon has (`close`) or has not asked for the device to close.
pub(crate) fn decide(phase: PhaseKind, frontend: &Frontend, close: bool) -> Arm {
    use Frontend as F;
    use PhaseKind as P;
    use XenbusState as S;
    let alive = matches!(
        frontend,
        F::Absent | F::State(S::Initialising | S::InitWait | S::Initialised | S::Connected)
    );
    match (phase, frontend) {
        (P::Disconnecting | P::Unregistered, _) => Arm::Wait,
        (P::Connected, F::Gone | F::Absent) => Arm::DisconnectGone,
        (_, F::Gone) => Arm::Gone,
        (P::Unregistering, _) => Arm::Unregister,
        (_, F::Unknown(_)) => Arm::FrontendUnknown,
        (P::Failed, F::Invalid(_)) => Arm::Wait,
        (_, F::Invalid(_)) => Arm::Fatal,
        (P::Setup, _) if alive && !close => Arm::SetUp,
        (P::Connected, F::State(S::Initialising | S::InitWait)) => Arm::Restarted,
        (P::Connected, F::State(S::Initialised | S::Connected)) if close => Arm::AskToClose,
        (P::Connected, F::State(S::Initialised | S::Connected)) => Arm::Wait,
        (P::Connected, F::State(S::Closing)) => Arm::Publish(S::Closing),
        (P::Connected, F::State(_)) => Arm::DisconnectClosed,
        (_, F::State(S::Closed)) => Arm::Closed,
        (_, F::State(S::Closing)) if close => Arm::Publish(S::Closed),
        (_, F::State(S::Closing)) => Arm::Publish(S::Closing),
        (_, _) if close => Arm::Publish(S::Closed),
        (P::InitWait, F::State(S::Initialised | S::Connected)) => {
            Arm::AwaitFrontend { connect: true }
        }
        (P::InitWait, _) => Arm::AwaitFrontend { connect: false },
        (P::Closed, F::State(S::Initialising | S::InitWait)) => Arm::PrepareReconnect,
        (_, _) => Arm::Wait,
    }
}

/// Whether [`Device::step`] is done or the new phase has something to do right away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Done,
    Again,
}

/// Steps one reconcile may take: Setup -> InitWait -> Connected is the longest chain.
const MAX_STEPS: usize = 4;

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
            session_id: 0,
            open_id: 0,
            sessions: 0,
            last_disconnect: None,
            wrote_linux_error: false,
            warnings: Warnings::new(),
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
                warn!(device = %self.key, frontend = %nodes.frontend, "frontend path changed; following it");
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
                self.info_limited(|key| info!(device = %key, "frontend gone; tearing down"));
                self.disconnect(AfterDisconnect::Closed, fx);
                Ok(Step::Done)
            }
            Arm::Gone => self.gone(ctx, nodes, fx),
            Arm::Unregister => self.unregister(ctx, nodes, fx),
            Arm::FrontendUnknown => self.frontend_unknown(ctx, nodes, frontend, fx),
            Arm::Fatal => self.frontend_invalid(ctx, frontend, fx),
            Arm::SetUp => self.set_up(ctx, nodes, fx),
            Arm::AwaitFrontend { connect } => self.await_frontend(ctx, nodes, connect, fx),
            Arm::PrepareReconnect => self.prepare_reconnect(ctx, nodes),
            Arm::Restarted => {
                // A frontend that restarts without closing (crash + kexec): its old rings
                // are gone, ours must go too before it reconnects.
                self.info_limited(
                    |key| info!(device = %key, "frontend restarted without closing; disconnecting"),
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
        if matches!(self.phase, Phase::Setup | Phase::InitWait) {
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
        info!(device = %self.key, "backend directory removed");
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
            info!(device = %self.key, "device re-created; tearing down the old one first");
            self.disconnect(AfterDisconnect::Closed, fx);
            return true;
        }
        info!(device = %self.key, "device re-created");
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

    /// Disconnects synchronously (daemon exit after the shutdown deadline).
    pub fn force_disconnect(&mut self, timeout: Duration) {
        if !matches!(self.phase, Phase::Connected(_)) {
            return;
        }
        let Phase::Connected(s) = std::mem::replace(&mut self.phase, Phase::Closed) else {
            return;
        };
        let r = s.vbd.disconnect(timeout);
        self.phase = Phase::Disconnecting {
            session: s.id,
            then: AfterDisconnect::Closed,
        };
        self.disconnected(s.id, r);
    }
}
