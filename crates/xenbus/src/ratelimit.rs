//! Rate-limited warnings, for conditions a guest can cause at will.
//!
//! A frontend decides when its nodes change and what they hold, and every change wakes the
//! device; a warning per occurrence lets a guest write the daemon's log for it (a frontend
//! rewriting a garbage `state` in a loop made 600 lines a second, for as long as it liked).
//! So each such warning goes through the [`Warnings`] of the device it is about:
//!
//! - the first occurrence of a kind is logged in full: what the guest did;
//! - later ones within [`INTERVAL`] of the last line are only counted;
//! - the first one after the interval is logged again, with `suppressed` saying how many
//!   it stands for;
//! - a kind that went quiet with occurrences still counted gets one summary line from
//!   [`Warnings::overdue`] once its interval is over (the manager asks on its tick), so a
//!   burst is never under-reported.
//!
//! A device thus costs at most one line per kind per interval, whatever its guest does.
//! The state is a counter and an instant per kind of a closed set: nothing a guest can grow.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// At most one line per kind of warning per device in this long.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// What a rate-limited warning is about. One budget per kind, so a flood of one kind never
/// hides the first occurrence of another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Warning {
    /// The frontend's `state` holds something that is not a number.
    FrontendState,
    /// An optional flag (frontend `feature-*`, toolstack `removable`...) is not a number.
    UnparsableFlag,
    /// A 4 KiB-sector disk and a frontend without `feature-large-sector-size`.
    LargeSectorSize,
    /// The device failed (the guest can fail it again after every close).
    DeviceFailed,
    /// A disconnect did not drain or failed.
    Disconnect,
    /// Reading the device's nodes failed (a guest can make its own nodes unreadable to a
    /// driver domain, and the manager retries every tick).
    ReconcileFailed,
    /// xenstore watch events were lost (a guest can flood the nodes we watch).
    WatchEventsLost,
}

impl Warning {
    /// The name in summary lines.
    pub fn name(self) -> &'static str {
        match self {
            Warning::FrontendState => "frontend-state",
            Warning::UnparsableFlag => "unparsable-flag",
            Warning::LargeSectorSize => "large-sector-size",
            Warning::DeviceFailed => "device-failed",
            Warning::Disconnect => "disconnect",
            Warning::ReconcileFailed => "reconcile-failed",
            Warning::WatchEventsLost => "watch-events-lost",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Budget {
    /// When the last line of this kind was logged.
    last_line: Instant,
    /// Occurrences since, not logged.
    suppressed: u64,
}

/// The rate limits of one source of warnings (a device, the watch forwarder).
#[derive(Debug, Clone)]
pub struct Warnings {
    interval: Duration,
    kinds: BTreeMap<Warning, Budget>,
}

impl Default for Warnings {
    fn default() -> Self {
        Warnings::new()
    }
}

impl Warnings {
    /// Limits of one line per kind per [`INTERVAL`].
    pub fn new() -> Warnings {
        Warnings::with_interval(INTERVAL)
    }

    /// Limits of one line per kind per `interval`.
    pub fn with_interval(interval: Duration) -> Warnings {
        Warnings {
            interval,
            kinds: BTreeMap::new(),
        }
    }

    /// An occurrence of `kind` at `now`. `Some(n)`: log it now, saying it stands for `n`
    /// earlier occurrences that were not logged; `None`: counted, do not log.
    pub fn admit(&mut self, kind: Warning, now: Instant) -> Option<u64> {
        match self.kinds.get_mut(&kind) {
            Some(b) if now.saturating_duration_since(b.last_line) < self.interval => {
                b.suppressed = b.suppressed.saturating_add(1);
                None
            }
            Some(b) => {
                b.last_line = now;
                Some(std::mem::take(&mut b.suppressed))
            }
            None => {
                self.kinds.insert(
                    kind,
                    Budget {
                        last_line: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }

    /// The kinds whose interval is over with occurrences counted and not logged, and how
    /// many: each is due one summary line, which starts its next interval.
    pub fn overdue(&mut self, now: Instant) -> Vec<(Warning, u64)> {
        let interval = self.interval;
        let mut due = Vec::new();
        for (&kind, b) in self.kinds.iter_mut() {
            if b.suppressed > 0 && now.saturating_duration_since(b.last_line) >= interval {
                due.push((kind, std::mem::take(&mut b.suppressed)));
                b.last_line = now;
            }
        }
        due
    }

    /// Every count not logged yet, whatever the interval (the source is going away).
    pub fn drain(&mut self) -> Vec<(Warning, u64)> {
        let due = self
            .kinds
            .iter()
            .filter(|(_, b)| b.suppressed > 0)
            .map(|(&k, b)| (k, b.suppressed))
            .collect();
        self.kinds.clear();
        due
    }
}

/// Logs the summary line of `count` suppressed warnings of `kind` about `source`.
pub fn log_suppressed(source: &dyn std::fmt::Display, kind: Warning, count: u64) {
    tracing::warn!(
        device = %source,
        warning = kind.name(),
        suppressed = count,
        "repeated warnings were suppressed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn first_logged_then_one_line_per_interval_with_the_count() {
        let t0 = Instant::now();
        let mut w = Warnings::with_interval(10 * S);
        assert_eq!(w.admit(Warning::FrontendState, t0), Some(0));
        // A storm within the interval: counted, not logged.
        for i in 1..=600 {
            assert_eq!(w.admit(Warning::FrontendState, t0 + i * S / 100), None);
        }
        // Another kind has its own budget.
        assert_eq!(w.admit(Warning::DeviceFailed, t0 + S), Some(0));
        // The first after the interval stands for the 600 before it.
        assert_eq!(w.admit(Warning::FrontendState, t0 + 10 * S), Some(600));
        assert_eq!(w.admit(Warning::FrontendState, t0 + 11 * S), None);
        assert_eq!(w.admit(Warning::FrontendState, t0 + 20 * S), Some(1));
    }

    #[test]
    fn a_quiet_kind_gets_one_summary_of_what_was_suppressed() {
        let t0 = Instant::now();
        let mut w = Warnings::with_interval(10 * S);
        assert_eq!(w.admit(Warning::ReconcileFailed, t0), Some(0));
        assert!(w.overdue(t0 + 5 * S).is_empty());
        assert_eq!(w.admit(Warning::ReconcileFailed, t0 + 6 * S), None);
        assert_eq!(w.admit(Warning::ReconcileFailed, t0 + 7 * S), None);
        // Not before the interval is over.
        assert!(w.overdue(t0 + 9 * S).is_empty());
        assert_eq!(
            w.overdue(t0 + 10 * S),
            vec![(Warning::ReconcileFailed, 2)]
        );
        // Reported once; the summary started a new interval.
        assert!(w.overdue(t0 + 30 * S).is_empty());
        assert_eq!(w.admit(Warning::ReconcileFailed, t0 + 15 * S), None);
        assert_eq!(w.drain(), vec![(Warning::ReconcileFailed, 1)]);
        assert!(w.drain().is_empty());
        // Drained means forgotten: the next occurrence is a first one again.
        assert_eq!(w.admit(Warning::ReconcileFailed, t0 + 16 * S), Some(0));
    }

    #[test]
    fn time_going_backwards_suppresses_rather_than_panics() {
        let t0 = Instant::now() + 100 * S;
        let mut w = Warnings::with_interval(10 * S);
        assert_eq!(w.admit(Warning::Disconnect, t0), Some(0));
        assert_eq!(w.admit(Warning::Disconnect, t0 - 50 * S), None);
        assert!(w.overdue(t0 - 60 * S).is_empty());
    }
}
