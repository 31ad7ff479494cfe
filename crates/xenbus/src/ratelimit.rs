//! Rate-limited log lines, for what a guest can cause at will.
//!
//! A frontend decides when its nodes change and what they hold, and every change wakes the
//! device; a line per occurrence lets a guest write the daemon's log for it (a frontend
//! rewriting a garbage `state` in a loop made 600 warnings a second, for as long as it
//! liked; one cycling through connect, Closed and Initialising made two state-machine lines
//! per round). So each such line goes through the [`Warnings`] of the device it is about:
//!
//! - the first occurrences of a kind in an interval ([`INTERVAL`]) are logged in full, what
//!   the guest did: one for a warning, a few for the state machine's own lines
//!   ([`Kind::burst`]), so a normal session is logged whole;
//! - later ones in the same interval are only counted;
//! - the first line of a later interval says how many it follows (`suppressed`);
//! - a kind that went quiet with occurrences still counted gets one summary line from
//!   [`Warnings::overdue`] once its interval is over (the manager asks on its tick), so a
//!   burst is never under-reported.
//!
//! A device thus costs a bounded number of lines per interval, whatever its guest does.
//! The state is a counter and an instant per kind of a closed set: nothing a guest can grow.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The interval over which each kind's lines are counted.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// What a rate-limited line is about. One budget per kind, so a flood of one kind never
/// hides the first occurrence of another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// The frontend's `state` holds something that is not a state.
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
    /// The state machine's informational lines (state switches, connects, disconnects),
    /// which the frontend drives.
    Lifecycle,
    /// An adoption waits for its frontend's domain (retried every tick).
    Adoption,
}

impl Kind {
    /// The name in summary lines.
    pub fn name(self) -> &'static str {
        match self {
            Kind::FrontendState => "frontend-state",
            Kind::UnparsableFlag => "unparsable-flag",
            Kind::LargeSectorSize => "large-sector-size",
            Kind::DeviceFailed => "device-failed",
            Kind::Disconnect => "disconnect",
            Kind::ReconcileFailed => "reconcile-failed",
            Kind::WatchEventsLost => "watch-events-lost",
            Kind::Lifecycle => "lifecycle",
            Kind::Adoption => "adoption",
        }
    }

    /// Lines of this kind logged per interval before the rest are only counted: one for a
    /// warning; for the state machine, enough for a device to be attached, connected,
    /// closed and reconnected (a guest reboot) within one interval, every line logged.
    pub fn burst(self) -> u32 {
        match self {
            Kind::Lifecycle => 24,
            _ => 1,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Budget {
    /// When the current interval began.
    since: Instant,
    /// Lines logged in it.
    lines: u32,
    /// Occurrences not logged since the last line.
    suppressed: u64,
}

/// The rate limits of one source of log lines (a device, the watch forwarder).
#[derive(Debug, Clone)]
pub struct Warnings {
    interval: Duration,
    kinds: BTreeMap<Kind, Budget>,
}

impl Default for Warnings {
    fn default() -> Self {
        Warnings::new()
    }
}

impl Warnings {
    /// Limits of [`Kind::burst`] lines per kind per [`INTERVAL`].
    pub fn new() -> Warnings {
        Warnings::with_interval(INTERVAL)
    }

    /// Limits of [`Kind::burst`] lines per kind per `interval`.
    pub fn with_interval(interval: Duration) -> Warnings {
        Warnings {
            interval,
            kinds: BTreeMap::new(),
        }
    }

    /// An occurrence of `kind` at `now`. `Some(n)`: log it now, saying it follows `n`
    /// occurrences that were not logged; `None`: counted, do not log.
    pub fn admit(&mut self, kind: Kind, now: Instant) -> Option<u64> {
        let b = self.kinds.entry(kind).or_insert(Budget {
            since: now,
            lines: 0,
            suppressed: 0,
        });
        if now.saturating_duration_since(b.since) >= self.interval {
            b.since = now;
            b.lines = 0;
        }
        if b.lines < kind.burst() {
            b.lines += 1;
            Some(std::mem::take(&mut b.suppressed))
        } else {
            b.suppressed = b.suppressed.saturating_add(1);
            None
        }
    }

    /// The kinds whose interval is over with occurrences counted and not logged, and how
    /// many: each is due one summary line, which is the first line of its next interval.
    pub fn overdue(&mut self, now: Instant) -> Vec<(Kind, u64)> {
        let interval = self.interval;
        let mut due = Vec::new();
        for (&kind, b) in self.kinds.iter_mut() {
            if b.suppressed > 0 && now.saturating_duration_since(b.since) >= interval {
                due.push((kind, std::mem::take(&mut b.suppressed)));
                b.since = now;
                b.lines = 1;
            }
        }
        due
    }

    /// Every count not logged yet, whatever the interval (the source is going away).
    pub fn drain(&mut self) -> Vec<(Kind, u64)> {
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

/// Logs the summary line of `count` suppressed lines of `kind` about `device`.
pub fn log_suppressed(device: &dyn std::fmt::Display, kind: Kind, count: u64) {
    tracing::warn!(
        device = %device,
        kind = kind.name(),
        suppressed = count,
        "repeated log lines were suppressed"
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
        assert_eq!(w.admit(Kind::FrontendState, t0), Some(0));
        // A storm within the interval: counted, not logged.
        for i in 1..=600 {
            assert_eq!(w.admit(Kind::FrontendState, t0 + i * S / 100), None);
        }
        // Another kind has its own budget.
        assert_eq!(w.admit(Kind::DeviceFailed, t0 + S), Some(0));
        // The first after the interval follows the 600 before it.
        assert_eq!(w.admit(Kind::FrontendState, t0 + 10 * S), Some(600));
        assert_eq!(w.admit(Kind::FrontendState, t0 + 11 * S), None);
        assert_eq!(w.admit(Kind::FrontendState, t0 + 20 * S), Some(1));
    }

    #[test]
    fn lifecycle_lines_have_a_burst_per_interval() {
        let t0 = Instant::now();
        let mut w = Warnings::with_interval(10 * S);
        let burst = Kind::Lifecycle.burst();
        for i in 0..burst {
            assert_eq!(
                w.admit(Kind::Lifecycle, t0 + i * S / 10),
                Some(0),
                "line {i}"
            );
        }
        for i in 0..1000 {
            assert_eq!(w.admit(Kind::Lifecycle, t0 + 5 * S + i * S / 1000), None);
        }
        assert_eq!(w.admit(Kind::Lifecycle, t0 + 10 * S), Some(1000));
        for _ in 1..burst {
            assert_eq!(w.admit(Kind::Lifecycle, t0 + 11 * S), Some(0));
        }
        assert_eq!(w.admit(Kind::Lifecycle, t0 + 11 * S), None);
    }

    #[test]
    fn a_quiet_kind_gets_one_summary_of_what_was_suppressed() {
        let t0 = Instant::now();
        let mut w = Warnings::with_interval(10 * S);
        assert_eq!(w.admit(Kind::ReconcileFailed, t0), Some(0));
        assert!(w.overdue(t0 + 5 * S).is_empty());
        assert_eq!(w.admit(Kind::ReconcileFailed, t0 + 6 * S), None);
        assert_eq!(w.admit(Kind::ReconcileFailed, t0 + 7 * S), None);
        // Not before the interval is over.
        assert!(w.overdue(t0 + 9 * S).is_empty());
        assert_eq!(w.overdue(t0 + 10 * S), vec![(Kind::ReconcileFailed, 2)]);
        // Reported once; the summary was the first line of a new interval.
        assert!(w.overdue(t0 + 30 * S).is_empty());
        assert_eq!(w.admit(Kind::ReconcileFailed, t0 + 15 * S), None);
        assert_eq!(w.drain(), vec![(Kind::ReconcileFailed, 1)]);
        assert!(w.drain().is_empty());
        // Drained means forgotten: the next occurrence is a first one again.
        assert_eq!(w.admit(Kind::ReconcileFailed, t0 + 16 * S), Some(0));
    }

    #[test]
    fn time_going_backwards_suppresses_rather_than_panics() {
        let t0 = Instant::now() + 100 * S;
        let mut w = Warnings::with_interval(10 * S);
        assert_eq!(w.admit(Kind::Disconnect, t0), Some(0));
        assert_eq!(w.admit(Kind::Disconnect, t0 - 50 * S), None);
        assert!(w.overdue(t0 - 60 * S).is_empty());
    }
}
