//! Run-time statistics of rings and VBDs: the counters blkback prints with `log_stats`
//! and exposes in sysfs (`oo_req`, `rd_req`, `wr_req`, `f_req`, `ds_req`, `rd_sect`,
//! `wr_sect`), plus persistent-grant occupancy, error counts and ring health.
//!
//! Each ring owns one `RingStats`. Its reactor thread is the only writer, so a counter
//! is bumped with a relaxed load and store (no locked read-modify-write on the
//! per-request path); any other thread may read at any time and sees each counter
//! monotonically, though not a consistent cut across counters. [`Stats`] is the plain
//! snapshot handed out to callers.

use std::ops::AddAssign;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::latency::{Latency, LatencyCounters};

/// A counter written by exactly one thread and read by any.
#[derive(Debug, Default)]
pub(crate) struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`. Must only be called from the owning reactor thread.
    #[inline]
    pub(crate) fn add(&self, n: u64) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.wrapping_add(n), Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn inc(&self) {
        self.add(1);
    }

    /// Sets a gauge (a level, not a count). Owning thread only.
    #[inline]
    pub(crate) fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The live counters of one ring.
#[derive(Debug, Default)]
pub(crate) struct RingStats {
    pub(crate) oo_req: Counter,
    pub(crate) rd_req: Counter,
    pub(crate) wr_req: Counter,
    pub(crate) f_req: Counter,
    pub(crate) ds_req: Counter,
    pub(crate) ds_sect: Counter,
    pub(crate) rd_sect: Counter,
    pub(crate) wr_sect: Counter,
    pub(crate) errors: Counter,
    pub(crate) unsupported: Counter,
    pub(crate) in_flight: Counter,
    pub(crate) persistent_in_use: Counter,
    pub(crate) persistent_mapped: Counter,
    /// The cache's own count, copied with the gauges.
    pub(crate) persistent_budget_refusals: Counter,
    pub(crate) persistent_hits: Counter,
    pub(crate) persistent_misses: Counter,
    pub(crate) indirect_hits: Counter,
    pub(crate) indirect_misses: Counter,
    pub(crate) notifications: Counter,
    pub(crate) map_fallbacks: Counter,
    pub(crate) throttled: Counter,
    pub(crate) throttled_ns: Counter,
    pub(crate) halted: AtomicBool,
    /// Request latency per operation.
    pub(crate) latency: LatencyCounters,
}

impl RingStats {
    pub(crate) fn snapshot(&self) -> Stats {
        Stats {
            oo_req: self.oo_req.get(),
            rd_req: self.rd_req.get(),
            wr_req: self.wr_req.get(),
            f_req: self.f_req.get(),
            ds_req: self.ds_req.get(),
            ds_sect: self.ds_sect.get(),
            rd_sect: self.rd_sect.get(),
            wr_sect: self.wr_sect.get(),
            errors: self.errors.get(),
            unsupported: self.unsupported.get(),
            in_flight: self.in_flight.get(),
            persistent_grants_in_use: self.persistent_in_use.get(),
            persistent_grants_mapped: self.persistent_mapped.get(),
            persistent_budget_refusals: self.persistent_budget_refusals.get(),
            persistent_hits: self.persistent_hits.get(),
            persistent_misses: self.persistent_misses.get(),
            indirect_page_hits: self.indirect_hits.get(),
            indirect_page_misses: self.indirect_misses.get(),
            notifications: self.notifications.get(),
            map_fallbacks: self.map_fallbacks.get(),
            throttled: self.throttled.get(),
            throttled_ns: self.throttled_ns.get(),
            halted_rings: u64::from(self.halted.load(Ordering::Relaxed)),
        }
    }
}

/// A snapshot of counters, for one ring or summed over the rings of a VBD.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Times the ring had requests waiting but every request slot was busy (blkback's
    /// `st_oo_req`), or the bounce-buffer pool was exhausted.
    pub oo_req: u64,
    /// READ requests (direct and indirect) accepted.
    pub rd_req: u64,
    /// WRITE requests accepted.
    pub wr_req: u64,
    /// FLUSH_DISKCACHE and WRITE_BARRIER requests accepted.
    pub f_req: u64,
    /// DISCARD requests accepted.
    pub ds_req: u64,
    /// 512-byte sectors discarded (asked to be).
    pub ds_sect: u64,
    /// 512-byte sectors read.
    pub rd_sect: u64,
    /// 512-byte sectors written (including barrier/flush payloads).
    pub wr_sect: u64,
    /// Requests answered `BLKIF_RSP_ERROR` (invalid, unmappable, or failed in storage).
    pub errors: u64,
    /// Requests answered `BLKIF_RSP_EOPNOTSUPP`.
    pub unsupported: u64,
    /// Requests taken off the ring and not yet answered.
    pub in_flight: u64,
    /// Persistent grants used by in-flight requests.
    pub persistent_grants_in_use: u64,
    /// Persistent grants currently mapped.
    pub persistent_grants_mapped: u64,
    /// Grants the ring wanted to keep persistently and the engine-wide budget refused
    /// (they were used for their request only).
    pub persistent_budget_refusals: u64,
    /// Grants (data pages and indirect descriptor pages) found in the persistent-grant
    /// cache: used without a map.
    pub persistent_hits: u64,
    /// Grants looked up in the persistent-grant cache and not found there (mapped for the
    /// cache, or for their request only, or copied).
    pub persistent_misses: u64,
    /// Of `persistent_hits`, indirect descriptor pages: read straight from the cache, as
    /// blkback's `xen_blkbk_parse_indirect` does, no map per indirect request.
    pub indirect_page_hits: u64,
    /// Of `persistent_misses`, indirect descriptor pages.
    pub indirect_page_misses: u64,
    /// Event-channel notifications sent to the frontend.
    pub notifications: u64,
    /// Requests grant-copied through bounce pages although the ring maps (map and
    /// map-or-copy modes): their guest's share of the daemon-wide grant-mapping budget
    /// had no room for what they would map, or a map failed for want of resources.
    pub map_fallbacks: u64,
    /// Requests held back by the VBD's or its group's QoS limits (see [`crate::qos`]).
    pub throttled: u64,
    /// Time the ring spent with a request held back by QoS limits, in nanoseconds.
    pub throttled_ns: u64,
    /// Rings halted because the frontend overflowed them (0 or 1 for one ring).
    pub halted_rings: u64,
}

impl AddAssign for Stats {
    fn add_assign(&mut self, o: Self) {
        self.oo_req += o.oo_req;
        self.rd_req += o.rd_req;
        self.wr_req += o.wr_req;
        self.f_req += o.f_req;
        self.ds_req += o.ds_req;
        self.ds_sect += o.ds_sect;
        self.rd_sect += o.rd_sect;
        self.wr_sect += o.wr_sect;
        self.errors += o.errors;
        self.unsupported += o.unsupported;
        self.in_flight += o.in_flight;
        self.persistent_grants_in_use += o.persistent_grants_in_use;
        self.persistent_grants_mapped += o.persistent_grants_mapped;
        self.persistent_budget_refusals += o.persistent_budget_refusals;
        self.persistent_hits += o.persistent_hits;
        self.persistent_misses += o.persistent_misses;
        self.indirect_page_hits += o.indirect_page_hits;
        self.indirect_page_misses += o.indirect_page_misses;
        self.notifications += o.notifications;
        self.map_fallbacks += o.map_fallbacks;
        self.throttled += o.throttled;
        self.throttled_ns += o.throttled_ns;
        self.halted_rings += o.halted_rings;
    }
}

/// Events counted by several threads and reported (logged) at most once per interval,
/// each report with the count since the previous one.
#[derive(Debug)]
pub(crate) struct RateLimitedCount {
    epoch: Instant,
    /// Milliseconds from `epoch` to the last report, plus one (0: never reported).
    last_ms: AtomicU64,
    pending: AtomicU64,
}

impl RateLimitedCount {
    pub(crate) fn new(epoch: Instant) -> Self {
        Self {
            epoch,
            last_ms: AtomicU64::new(0),
            pending: AtomicU64::new(0),
        }
    }

    pub(crate) fn add(&self, n: u64) {
        self.pending.fetch_add(n, Ordering::Relaxed);
    }

    /// The count to report now, if any is pending and no report was made within
    /// `interval` (the first report is due at once). Only one caller gets it.
    pub(crate) fn due(&self, now: Instant, interval: Duration) -> Option<u64> {
        if self.pending.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let now_ms = u64::try_from(now.saturating_duration_since(self.epoch).as_millis())
            .unwrap_or(u64::MAX - 1)
            + 1;
        let last = self.last_ms.load(Ordering::Relaxed);
        let interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        if last != 0 && now_ms.saturating_sub(last) < interval_ms {
            return None;
        }
        self.last_ms
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .ok()?;
        Some(self.pending.swap(0, Ordering::Relaxed)).filter(|&n| n > 0)
    }
}

/// The live counters of one reactor thread (its only writer).
#[derive(Debug, Default)]
pub(crate) struct ReactorCounters {
    pub(crate) sleeps: Counter,
    pub(crate) wakeups: Counter,
    pub(crate) timeouts: Counter,
    pub(crate) poll_hits: Counter,
    pub(crate) poll_misses: Counter,
    pub(crate) poll_ns: Counter,
    pub(crate) busy_ns: Counter,
}

impl ReactorCounters {
    pub(crate) fn snapshot(&self) -> ReactorStats {
        ReactorStats {
            sleeps: self.sleeps.get(),
            wakeups: self.wakeups.get(),
            timeouts: self.timeouts.get(),
            poll_hits: self.poll_hits.get(),
            poll_misses: self.poll_misses.get(),
            poll_ns: self.poll_ns.get(),
            busy_ns: self.busy_ns.get(),
        }
    }
}

/// What one reactor thread did, since it started: how often it slept and why it woke,
/// and what its adaptive polling caught. Wake-ups per I/O is the load-independent measure
/// of the event loop's cost (a sleep and a wake-up cost tens of microseconds on an idle
/// CPU, nothing a busy shared machine shows).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReactorStats {
    /// Blocking waits (`io_uring_enter` with `GETEVENTS`) that put the thread to sleep.
    pub sleeps: u64,
    /// Sleeps ended by an event: a guest notification, a storage completion, a command.
    pub wakeups: u64,
    /// Sleeps ended by the housekeeping deadline, or a ring's QoS timer, with nothing to
    /// report.
    pub timeouts: u64,
    /// Polls after a batch that found work (a request, a completion) before the budget
    /// ran out: each is a sleep and a wake-up saved.
    pub poll_hits: u64,
    /// Polls that ran their whole budget and then slept.
    pub poll_misses: u64,
    /// Time spent polling, hits and misses.
    pub poll_ns: u64,
    /// Time the thread was not asleep in its wait: running rings, handling commands,
    /// housekeeping and polling (`poll_ns` is part of it). Its rate is the reactor's
    /// utilisation.
    pub busy_ns: u64,
}

impl ReactorStats {
    /// The counts since `earlier` (a snapshot of the same reactor).
    pub fn since(&self, earlier: &ReactorStats) -> ReactorStats {
        ReactorStats {
            sleeps: self.sleeps.saturating_sub(earlier.sleeps),
            wakeups: self.wakeups.saturating_sub(earlier.wakeups),
            timeouts: self.timeouts.saturating_sub(earlier.timeouts),
            poll_hits: self.poll_hits.saturating_sub(earlier.poll_hits),
            poll_misses: self.poll_misses.saturating_sub(earlier.poll_misses),
            poll_ns: self.poll_ns.saturating_sub(earlier.poll_ns),
            busy_ns: self.busy_ns.saturating_sub(earlier.busy_ns),
        }
    }
}

/// Reads the counters of an engine's reactors (`Engine::reactor_stats_reader`).
#[derive(Debug, Clone)]
pub struct ReactorStatsReader(pub(crate) Vec<std::sync::Arc<ReactorCounters>>);

impl ReactorStatsReader {
    /// Each reactor's counts, in reactor order.
    pub fn read(&self) -> Vec<ReactorStats> {
        self.0.iter().map(|c| c.snapshot()).collect()
    }

    /// All reactors' counts summed.
    pub fn total(&self) -> ReactorStats {
        let mut t = ReactorStats::default();
        for s in self.read() {
            t += s;
        }
        t
    }
}

impl AddAssign for ReactorStats {
    fn add_assign(&mut self, o: Self) {
        self.sleeps += o.sleeps;
        self.wakeups += o.wakeups;
        self.timeouts += o.timeouts;
        self.poll_hits += o.poll_hits;
        self.poll_misses += o.poll_misses;
        self.poll_ns += o.poll_ns;
        self.busy_ns += o.busy_ns;
    }
}

/// Statistics of a VBD: the sum and each ring.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VbdStats {
    /// Every ring's counters summed.
    pub total: Stats,
    /// Each ring's.
    pub rings: Vec<Stats>,
    /// Request latency per operation, over every ring.
    pub latency: Latency,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn snapshot_and_sum() {
        let a = Arc::new(RingStats::default());
        a.rd_req.inc();
        a.rd_sect.add(8);
        a.in_flight.set(3);
        a.halted.store(true, Ordering::Relaxed);
        let reader = {
            let a = a.clone();
            std::thread::spawn(move || a.snapshot())
        };
        let s = reader.join().unwrap();
        assert_eq!(s.rd_req, 1);
        assert_eq!(s.rd_sect, 8);
        assert_eq!(s.in_flight, 3);
        let mut t = Stats::default();
        t += s;
        t += s;
        assert_eq!(t.rd_sect, 16);
        assert_eq!(t.halted_rings, 2);
    }

    #[test]
    fn rate_limited_count_reports_at_most_once_per_interval_with_the_count() {
        let t0 = Instant::now();
        let interval = Duration::from_secs(10);
        let c = RateLimitedCount::new(t0);
        assert_eq!(c.due(t0, interval), None, "nothing to report");
        c.add(1);
        assert_eq!(c.due(t0, interval), Some(1), "the first report is at once");
        c.add(5);
        c.add(2);
        assert_eq!(c.due(t0 + Duration::from_secs(9), interval), None);
        assert_eq!(c.due(t0 + Duration::from_secs(10), interval), Some(7));
        assert_eq!(c.due(t0 + Duration::from_secs(30), interval), None);
        c.add(1);
        assert_eq!(c.due(t0 + Duration::from_secs(31), interval), Some(1));
        // Many threads, one report per interval between them.
        for _ in 0..100 {
            c.add(1);
        }
        let t = t0 + Duration::from_secs(45);
        let reports: Vec<u64> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4).map(|_| s.spawn(|| c.due(t, interval))).collect();
            hs.into_iter().filter_map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(reports, vec![100]);
    }
}
