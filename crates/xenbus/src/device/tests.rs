//! The transition table row by row, and the classification of the frontend's `state`.

use super::*;

use Frontend as F;
use PhaseKind as P;
use XenbusState as S;

const PHASES: [PhaseKind; 10] = [
    P::Setup,
    P::InitWait,
    P::Adopting,
    P::Connected,
    P::Disconnecting,
    P::Closed,
    P::Failed,
    P::Unregistering,
    P::Unregistered,
    P::HandedOver,
];

fn frontends() -> Vec<Frontend> {
    vec![
        F::Absent,
        F::Gone,
        F::Unknown("0".into()),
        F::Invalid(9),
        F::State(S::Initialising),
        F::State(S::InitWait),
        F::State(S::Initialised),
        F::State(S::Connected),
        F::State(S::Closing),
        F::State(S::Closed),
    ]
}

#[test]
fn transition_table() {
    let conn = Arm::AwaitFrontend { connect: true };
    let wait_fe = Arm::AwaitFrontend { connect: false };
    // (phase, frontend, close requested) -> arm. Every (phase, frontend) pair is listed
    // for both values of `close` below, by the loop that checks completeness.
    #[rustfmt::skip]
    let rows: &[(PhaseKind, Frontend, bool, Arm)] = &[
        // A device just found: set up unless the frontend is closing or a close is asked.
        (P::Setup, F::Absent, false, Arm::SetUp),
        (P::Setup, F::Absent, true, Arm::Publish(S::Closed)),
        (P::Setup, F::State(S::Initialising), false, Arm::SetUp),
        (P::Setup, F::State(S::Connected), false, Arm::SetUp),
        (P::Setup, F::State(S::Connected), true, Arm::Publish(S::Closed)),
        (P::Setup, F::State(S::Closing), false, Arm::Publish(S::Closing)),
        (P::Setup, F::State(S::Closing), true, Arm::Publish(S::Closed)),
        (P::Setup, F::State(S::Closed), false, Arm::Closed),
        (P::Setup, F::Gone, false, Arm::Gone),
        (P::Setup, F::Unknown("0".into()), false, Arm::FrontendUnknown),
        (P::Setup, F::Invalid(9), false, Arm::Fatal),
        // Waiting for the frontend: open the storage, connect on Initialised/Connected.
        (P::InitWait, F::Absent, false, wait_fe),
        (P::InitWait, F::State(S::Initialising), false, wait_fe),
        (P::InitWait, F::State(S::InitWait), false, wait_fe),
        (P::InitWait, F::State(S::Initialised), false, conn),
        (P::InitWait, F::State(S::Connected), false, conn),
        (P::InitWait, F::State(S::Connected), true, Arm::Publish(S::Closed)),
        (P::InitWait, F::State(S::Closing), false, Arm::Publish(S::Closing)),
        (P::InitWait, F::State(S::Closed), false, Arm::Closed),
        (P::InitWait, F::Gone, false, Arm::Gone),
        // Adopting: found Connected with no rings of ours. Adopted while the frontend uses
        // its rings; anything else is what a device without rings does.
        (P::Adopting, F::State(S::Connected), false, Arm::Adopt),
        (P::Adopting, F::State(S::Initialised), false, Arm::Adopt),
        (P::Adopting, F::State(S::Connected), true, Arm::Publish(S::Closing)),
        (P::Adopting, F::State(S::Initialised), true, Arm::Publish(S::Closing)),
        (P::Adopting, F::State(S::Initialising), false, Arm::PrepareReconnect),
        (P::Adopting, F::State(S::InitWait), false, Arm::PrepareReconnect),
        (P::Adopting, F::State(S::Initialising), true, Arm::Publish(S::Closed)),
        (P::Adopting, F::State(S::Closing), false, Arm::Publish(S::Closing)),
        (P::Adopting, F::State(S::Closing), true, Arm::Publish(S::Closed)),
        (P::Adopting, F::State(S::Closed), false, Arm::Closed),
        (P::Adopting, F::Absent, false, Arm::Wait),
        (P::Adopting, F::Absent, true, Arm::Publish(S::Closed)),
        (P::Adopting, F::Gone, false, Arm::Gone),
        (P::Adopting, F::Unknown("0".into()), false, Arm::FrontendUnknown),
        (P::Adopting, F::Invalid(9), false, Arm::Fatal),
        // Handed over: this daemon is leaving; nothing is done.
        (P::HandedOver, F::State(S::Connected), false, Arm::Wait),
        (P::HandedOver, F::State(S::Closed), true, Arm::Wait),
        (P::HandedOver, F::Gone, false, Arm::Wait),
        // Connected: every way out goes through a disconnect.
        (P::Connected, F::Absent, false, Arm::DisconnectGone),
        (P::Connected, F::Gone, false, Arm::DisconnectGone),
        (P::Connected, F::Gone, true, Arm::DisconnectGone),
        (P::Connected, F::Unknown("0".into()), false, Arm::FrontendUnknown),
        (P::Connected, F::Invalid(9), false, Arm::Fatal),
        (P::Connected, F::State(S::Initialising), false, Arm::Restarted),
        (P::Connected, F::State(S::InitWait), true, Arm::Restarted),
        (P::Connected, F::State(S::Initialised), false, Arm::Wait),
        (P::Connected, F::State(S::Connected), false, Arm::Wait),
        (P::Connected, F::State(S::Connected), true, Arm::AskToClose),
        (P::Connected, F::State(S::Closing), false, Arm::Publish(S::Closing)),
        (P::Connected, F::State(S::Closing), true, Arm::Publish(S::Closing)),
        (P::Connected, F::State(S::Closed), false, Arm::DisconnectClosed),
        (P::Connected, F::State(S::Closed), true, Arm::DisconnectClosed),
        // A worker holds the rings: nothing until it reports.
        (P::Disconnecting, F::Gone, false, Arm::Wait),
        (P::Disconnecting, F::State(S::Closed), true, Arm::Wait),
        (P::Disconnecting, F::Unknown("0".into()), false, Arm::Wait),
        // Closed: the frontend's Initialising brings it back.
        (P::Closed, F::State(S::Initialising), false, Arm::PrepareReconnect),
        (P::Closed, F::State(S::InitWait), false, Arm::PrepareReconnect),
        (P::Closed, F::State(S::Initialising), true, Arm::Publish(S::Closed)),
        (P::Closed, F::State(S::Connected), false, Arm::Wait),
        (P::Closed, F::Absent, false, Arm::Wait),
        (P::Closed, F::State(S::Closed), false, Arm::Closed),
        (P::Closed, F::Gone, false, Arm::Gone),
        // Failed: only the frontend's Closed clears it; never set up or connect.
        (P::Failed, F::State(S::Initialising), false, Arm::Wait),
        (P::Failed, F::State(S::Connected), false, Arm::Wait),
        (P::Failed, F::State(S::Connected), true, Arm::Publish(S::Closed)),
        (P::Failed, F::State(S::Closing), false, Arm::Publish(S::Closing)),
        (P::Failed, F::State(S::Closed), false, Arm::Closed),
        (P::Failed, F::Invalid(9), false, Arm::Wait),
        (P::Failed, F::Unknown("0".into()), false, Arm::FrontendUnknown),
        (P::Failed, F::Gone, false, Arm::Gone),
        // Unregistering finishes whatever the frontend says, unless it is gone.
        (P::Unregistering, F::State(S::Connected), false, Arm::Unregister),
        (P::Unregistering, F::Invalid(9), false, Arm::Unregister),
        (P::Unregistering, F::Gone, false, Arm::Gone),
        // Unregistered ignores the frontend.
        (P::Unregistered, F::State(S::Initialising), false, Arm::Wait),
        (P::Unregistered, F::Gone, true, Arm::Wait),
    ];
    for (phase, fe, close, want) in rows {
        assert_eq!(
            decide(*phase, fe, *close),
            *want,
            "{phase:?} {fe:?} close={close}"
        );
    }
}

#[test]
fn table_invariants_hold_for_every_pair() {
    for phase in PHASES {
        for fe in frontends() {
            for close in [false, true] {
                let arm = decide(phase, &fe, close);
                let why = format!("{phase:?} {fe:?} close={close} -> {arm:?}");
                // Rings are only ever connected from InitWait, and never on a close.
                if matches!(arm, Arm::AwaitFrontend { connect: true }) {
                    assert!(phase == P::InitWait && !close, "{why}");
                }
                // Rings are adopted only from Adopting, while the frontend uses them, and
                // never on a close.
                if arm == Arm::Adopt {
                    assert!(phase == P::Adopting && !close, "{why}");
                    assert!(
                        matches!(fe, F::State(S::Initialised | S::Connected)),
                        "{why}"
                    );
                }
                // Only a phase holding rings disconnects them.
                if matches!(
                    arm,
                    Arm::DisconnectGone | Arm::DisconnectClosed | Arm::Restarted | Arm::AskToClose
                ) {
                    assert_eq!(phase, P::Connected, "{why}");
                }
                // A worker's phase, an unregistered and a handed-over device do nothing.
                if matches!(phase, P::Disconnecting | P::Unregistered | P::HandedOver) {
                    assert_eq!(arm, Arm::Wait, "{why}");
                }
                // A failed device is never set up again without the frontend closing.
                if phase == P::Failed {
                    assert!(
                        !matches!(
                            arm,
                            Arm::SetUp | Arm::AwaitFrontend { .. } | Arm::PrepareReconnect
                        ),
                        "{why}"
                    );
                }
                // A close request never (re)starts anything.
                if close {
                    assert!(
                        !matches!(
                            arm,
                            Arm::SetUp
                                | Arm::AwaitFrontend { .. }
                                | Arm::PrepareReconnect
                                | Arm::Adopt
                        ),
                        "{why}"
                    );
                }
            }
        }
    }
}

#[test]
fn only_devices_connected_on_both_ends_are_adopted() {
    let all_backend = [
        None,
        Some(S::Unknown),
        Some(S::Initialising),
        Some(S::InitWait),
        Some(S::Initialised),
        Some(S::Connected),
        Some(S::Closing),
        Some(S::Closed),
    ];
    for backend in all_backend {
        for fe in frontends() {
            let want = backend == Some(S::Connected)
                && matches!(fe, F::State(S::Initialised | S::Connected));
            assert_eq!(adopts(backend, &fe), want, "{backend:?} {fe:?}");
        }
    }
}

#[test]
fn frontend_state_classification() {
    let c = |raw: Option<&[u8]>, seen, gone| Frontend::classify(raw, seen, gone);
    assert_eq!(c(None, false, false), F::Absent);
    assert_eq!(c(None, true, false), F::Gone);
    assert_eq!(c(Some(b"4"), true, true), F::Gone);
    assert_eq!(c(Some(b"4"), false, false), F::State(S::Connected));
    assert_eq!(c(Some(b"0"), false, false), F::Unknown("0".into()));
    assert!(matches!(c(Some(b"garbage"), false, false), F::Unknown(_)));
    assert_eq!(c(Some(b"7"), false, false), F::Invalid(7));
    assert_eq!(c(Some(b"8"), false, false), F::Invalid(8));
    assert_eq!(c(Some(b"99"), false, false), F::Invalid(99));
    // An undefined number is fatal even once the domain is gone; a garbage one is not.
    assert_eq!(c(Some(b"99"), true, true), F::Invalid(99));
    assert_eq!(c(Some(b"garbage"), true, true), F::Gone);
    assert_eq!(c(Some(b"7"), true, true), F::Gone);
}

#[test]
fn withdrawing_a_feature_takes_what_depends_on_it() {
    let all = BackendFeatures {
        flush: true,
        barrier: true,
        discard: true,
        secure_discard: true,
        discard_granularity: 4096,
        discard_alignment: 0,
        persistent: true,
        max_indirect_segments: 32,
        sector_size: 512,
        physical_sector_size: 4096,
        sectors: 1 << 20,
        info: 0,
        read_only: false,
    };
    // (lost, nodes withdrawn, what stays advertised: flush, barrier, discard, secure)
    type Case = (Feature, &'static [&'static str], (bool, bool, bool, bool));
    let cases: [Case; 4] = [
        (
            Feature::Flush,
            &["feature-flush-cache", "feature-barrier"],
            (false, false, true, true),
        ),
        (
            Feature::Barrier,
            &["feature-barrier"],
            (true, false, true, true),
        ),
        (
            Feature::Discard,
            &["feature-discard", "discard-secure"],
            (true, true, false, false),
        ),
        (
            Feature::SecureDiscard,
            &["discard-secure"],
            (true, true, true, false),
        ),
    ];
    for (lost, nodes, (flush, barrier, discard, secure)) in cases {
        let mut w = Withdrawn::default();
        assert_eq!(w.withdraw(lost), nodes, "{lost:?}");
        let mut f = all;
        w.apply(&mut f);
        assert_eq!(
            (f.flush, f.barrier, f.discard, f.secure_discard),
            (flush, barrier, discard, secure),
            "{lost:?}"
        );
        // Every node withdrawn is one the connect would otherwise write as 1.
        let written = negotiate::connect_nodes(&all);
        for n in nodes {
            assert!(
                written
                    .iter()
                    .any(|(name, v)| name == n && v.as_deref() == Some("1")),
                "{n}"
            );
        }
    }
}
