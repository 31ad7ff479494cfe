//! The adaptive poll's estimate of a frontend's turnaround (see ARCHITECTURE.md,
//! "Reactor"): split from `reactor` to keep it readable.

use std::time::{Duration, Instant};

/// Added to twice the measured gap, so a poll outlasts a frontend that answers a little
/// slower than its average.
const POLL_SLACK: Duration = Duration::from_micros(2);

/// The adaptive poll of one ring (NAPI / NVMe hybrid polling): after the ring answered a
/// batch, how long its frontend takes to send the next work is measured, averaged, and
/// the reactor polls for about twice that — or not at all when the frontend is usually
/// slower than the ring's cap (then a sleep is cheaper than a poll that misses).
#[derive(Debug, Default)]
pub(super) struct PollEstimate {
    /// Moving average (weight 1/8) of answer-to-next-work gaps, each clipped to four
    /// caps so one long idle period is forgotten after a few batches.
    gap_ns: u64,
    /// When the ring last answered, until work arrives.
    answered_at: Option<Instant>,
}

impl PollEstimate {
    /// The ring answered at `now`; its VBD allows polling for up to `cap`. Returns how
    /// long to poll.
    pub(super) fn answered(&mut self, now: Instant, cap: Duration) -> Duration {
        self.answered_at = Some(now);
        let cap_ns = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        if self.gap_ns > cap_ns {
            return Duration::ZERO;
        }
        (Duration::from_nanos(self.gap_ns.saturating_mul(2)) + POLL_SLACK).min(cap)
    }

    /// Work for the ring arrived at `now` (found by a poll or by a wake-up).
    pub(super) fn arrived(&mut self, now: Instant, cap: Duration) {
        if let Some(t) = self.answered_at.take() {
            let clip = u64::try_from(cap.as_nanos())
                .unwrap_or(u64::MAX)
                .saturating_mul(4);
            let gap = u64::try_from(now.saturating_duration_since(t).as_nanos())
                .unwrap_or(u64::MAX)
                .min(clip);
            self.gap_ns = (self.gap_ns.saturating_mul(7) / 8).saturating_add(gap / 8);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_follows_the_measured_gap_within_the_cap() {
        let cap = Duration::from_micros(50);
        let mut p = PollEstimate::default();
        let t0 = Instant::now();
        // Nothing measured yet: the slack only.
        assert_eq!(p.answered(t0, cap), POLL_SLACK);
        // A frontend answering in 10 µs, many times: the budget goes to about 2 × 10.
        let mut t = t0;
        for _ in 0..64 {
            p.arrived(t + Duration::from_micros(10), cap);
            t += Duration::from_micros(20);
            p.answered(t, cap);
        }
        let b = p.answered(t, cap);
        assert!(
            b >= Duration::from_micros(19) && b <= Duration::from_micros(23),
            "{b:?}"
        );
        // Never beyond the cap.
        assert!(p.answered(t, Duration::from_micros(5)) <= Duration::from_micros(5));
    }

    #[test]
    fn a_slow_frontend_is_not_polled_for_and_a_long_idle_is_forgotten() {
        let cap = Duration::from_micros(50);
        let mut p = PollEstimate::default();
        let mut t = Instant::now();
        // Gaps of a second (clipped to four caps): polling would only miss.
        for _ in 0..32 {
            p.answered(t, cap);
            t += Duration::from_secs(1);
            p.arrived(t, cap);
        }
        assert_eq!(p.answered(t, cap), Duration::ZERO);
        // Back to a fast frontend: polling resumes within a few dozen batches, not
        // after the thousands an unclipped second-long gap would take to decay.
        let mut batches = 0;
        while p.answered(t, cap).is_zero() {
            t += Duration::from_micros(5);
            p.arrived(t, cap);
            batches += 1;
            assert!(batches < 40, "still not polling");
        }
    }
}
