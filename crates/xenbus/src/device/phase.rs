//! The phases of a device and the transition table: what to do for each (phase, frontend
//! state) pair, as a pure function ([`decide`]) the tests check row by row.

use super::Session;
use crate::error::sanitize;
use crate::state::XenbusState;

/// Where a device is in its life with its frontend.
#[derive(Debug)]
pub(crate) enum Phase {
    /// Nothing published yet: the device just appeared (blkback's `xen_blkbk_probe`).
    Setup,
    /// InitWait published: waiting for the hotplug script, the storage and then the
    /// frontend's rings.
    InitWait,
    /// Found Connected (backend and frontend) with no rings of ours: another process
    /// served it (a handover or a crash). Its rings are taken over as they are, with no
    /// write to xenstore; retried while the frontend's domain is not reachable yet.
    Adopting,
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
    /// Handed over to the next daemon: rings down, nothing written, nothing more done.
    HandedOver,
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
    /// The daemon hands its devices over to its successor: nothing is written, and the
    /// device is dropped once its rings are down.
    HandedOver,
}

impl AfterDisconnect {
    pub(super) fn phase(self) -> Phase {
        match self {
            AfterDisconnect::Closed => Phase::Closed,
            AfterDisconnect::Failed(error) => Phase::Failed { error },
            AfterDisconnect::Unregister => Phase::Unregistering,
            AfterDisconnect::HandedOver => Phase::HandedOver,
        }
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
        if let Some(n) = raw.and_then(XenbusState::undefined_number) {
            // Fatal even for a frontend found gone, as before the phase split.
            return Frontend::Invalid(n);
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
    pub(super) fn shown(&self, previous: XenbusState) -> XenbusState {
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
    Adopting,
    Connected,
    Disconnecting,
    Closed,
    Failed,
    Unregistering,
    Unregistered,
    HandedOver,
}

impl Phase {
    pub(crate) fn kind(&self) -> PhaseKind {
        match self {
            Phase::Setup => PhaseKind::Setup,
            Phase::InitWait => PhaseKind::InitWait,
            Phase::Adopting => PhaseKind::Adopting,
            Phase::Connected(_) => PhaseKind::Connected,
            Phase::Disconnecting { .. } => PhaseKind::Disconnecting,
            Phase::Closed => PhaseKind::Closed,
            Phase::Failed { .. } => PhaseKind::Failed,
            Phase::Unregistering => PhaseKind::Unregistering,
            Phase::Unregistered => PhaseKind::Unregistered,
            Phase::HandedOver => PhaseKind::HandedOver,
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
    /// Take over the rings another process connected: storage, rings, no xenstore write.
    Adopt,
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
        (P::Disconnecting | P::Unregistered | P::HandedOver, _) => Arm::Wait,
        (P::Connected, F::Gone | F::Absent) => Arm::DisconnectGone,
        (_, F::Gone) => Arm::Gone,
        (P::Unregistering, _) => Arm::Unregister,
        (_, F::Unknown(_)) => Arm::FrontendUnknown,
        (P::Failed, F::Invalid(_)) => Arm::Wait,
        (_, F::Invalid(_)) => Arm::Fatal,
        (P::Setup, _) if alive && !close => Arm::SetUp,
        // Nothing of ours is on the rings yet: a close asks the frontend to close, a
        // frontend that restarted meanwhile is set up again, one that is Absent is waited for.
        (P::Adopting, F::State(S::Initialised | S::Connected)) if close => Arm::Publish(S::Closing),
        (P::Adopting, F::State(S::Initialised | S::Connected)) => Arm::Adopt,
        (P::Adopting, F::State(S::Initialising | S::InitWait)) if !close => Arm::PrepareReconnect,
        (P::Adopting, F::Absent) if !close => Arm::Wait,
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

/// Whether a device just found (phase Setup, nothing written by us) is adopted: its
/// backend `state` says Connected, so a previous process connected its rings, and the
/// frontend is still using them (Initialised or Connected; it reads Connected once it has
/// seen ours). A device found in any other state is set up as before (InitWait is
/// published again; a Closing or Closed frontend is followed).
pub(crate) fn adopts(backend: Option<XenbusState>, frontend: &Frontend) -> bool {
    backend == Some(XenbusState::Connected)
        && matches!(
            frontend,
            Frontend::State(XenbusState::Initialised | XenbusState::Connected)
        )
}

/// Whether [`Device::step`] is done or the new phase has something to do right away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Done,
    Again,
}

/// Steps one reconcile may take: Setup -> InitWait -> Connected is the longest chain.
pub(super) const MAX_STEPS: usize = 4;
