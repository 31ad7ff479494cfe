//! Request latency per operation, as a histogram: how long each request took from the
//! pass that took it off the ring to the pass that answered it.
//!
//! Like the other ring counters ([`crate::stats`]), a ring's histogram is written by its
//! reactor thread only (a relaxed load and store per request, no read-modify-write, no
//! lock) and read by anyone; the times come from the clock reading each pass of the ring
//! already takes, so a request costs no extra system call or `clock_gettime`. A
//! request's latency is therefore measured in passes: from the start of the pass that
//! consumed it to the start of the pass that reaped its last completion (a request
//! answered within the pass that took it counts as 0, the first bucket).

use std::ops::AddAssign;
use std::time::Duration;

use blkif::Operation;

use crate::stats::Counter;

/// Upper bounds of the histogram's buckets, in microseconds (1-2.5-5 per decade, from
/// 10 µs to 10 s: a local NVMe read to a lost network server). A last bucket, without an
/// upper bound, takes the rest.
pub const LATENCY_BOUNDS_US: [u64; 19] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Buckets of one histogram: one per bound and the unbounded one.
pub const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_US.len() + 1;

/// The operations latency is kept for (barriers count as flushes, as in `f_req`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LatencyOp {
    /// READ.
    Read,
    /// WRITE.
    Write,
    /// FLUSH_DISKCACHE and WRITE_BARRIER.
    Flush,
    /// DISCARD (secure or not).
    Discard,
}

impl LatencyOp {
    /// Every operation, in the order of [`Latency::ops`].
    pub const ALL: [LatencyOp; 4] = [
        LatencyOp::Read,
        LatencyOp::Write,
        LatencyOp::Flush,
        LatencyOp::Discard,
    ];

    /// `read`, `write`, `flush`, `discard`.
    pub fn name(self) -> &'static str {
        match self {
            LatencyOp::Read => "read",
            LatencyOp::Write => "write",
            LatencyOp::Flush => "flush",
            LatencyOp::Discard => "discard",
        }
    }

    fn of(op: Operation) -> LatencyOp {
        match op {
            Operation::Read => LatencyOp::Read,
            Operation::Write => LatencyOp::Write,
            Operation::Flush | Operation::Barrier => LatencyOp::Flush,
            Operation::Discard { .. } => LatencyOp::Discard,
        }
    }
}

/// The bucket a latency falls in: the first whose bound is at least `d`.
fn bucket(d: Duration) -> usize {
    let ns = d.as_nanos();
    LATENCY_BOUNDS_US.partition_point(|&b| u128::from(b) * 1000 < ns)
}

/// The live histograms of one ring (its reactor thread is the only writer).
#[derive(Debug, Default)]
pub(crate) struct LatencyCounters {
    buckets: [[Counter; LATENCY_BUCKETS]; 4],
    sum_ns: [Counter; 4],
}

impl LatencyCounters {
    /// Counts one answered request of `op` that took `d`. Owning thread only.
    #[inline]
    pub(crate) fn record(&self, op: Operation, d: Duration) {
        let i = LatencyOp::of(op) as usize;
        self.buckets[i][bucket(d)].inc();
        self.sum_ns[i].add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    pub(crate) fn snapshot(&self) -> Latency {
        let mut l = Latency::default();
        for (i, op) in l.ops.iter_mut().enumerate() {
            for (b, c) in op.buckets.iter_mut().zip(&self.buckets[i]) {
                *b = c.get();
            }
            op.sum_ns = self.sum_ns[i].get();
        }
        l
    }
}

/// One operation's histogram: requests per bucket (not cumulative) and their total time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpLatency {
    /// Requests per bucket of [`LATENCY_BOUNDS_US`], then above the last bound.
    pub buckets: [u64; LATENCY_BUCKETS],
    /// Sum of the requests' latencies, in nanoseconds.
    pub sum_ns: u64,
}

impl OpLatency {
    /// Requests counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// Latency histograms of a ring, or summed over a VBD's rings, indexed by [`LatencyOp`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latency {
    /// In the order of [`LatencyOp::ALL`].
    pub ops: [OpLatency; 4],
}

impl Latency {
    /// The histogram of `op`.
    pub fn op(&self, op: LatencyOp) -> &OpLatency {
        &self.ops[op as usize]
    }
}

impl AddAssign for Latency {
    fn add_assign(&mut self, o: Self) {
        for (a, b) in self.ops.iter_mut().zip(o.ops) {
            for (x, y) in a.buckets.iter_mut().zip(b.buckets) {
                *x += y;
            }
            a.sum_ns += b.sum_ns;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_upper_inclusive() {
        assert_eq!(bucket(Duration::ZERO), 0);
        assert_eq!(bucket(Duration::from_micros(10)), 0);
        assert_eq!(bucket(Duration::from_nanos(10_001)), 1);
        assert_eq!(bucket(Duration::from_micros(1_000)), 6);
        assert_eq!(bucket(Duration::from_secs(10)), LATENCY_BUCKETS - 2);
        assert_eq!(bucket(Duration::from_secs(11)), LATENCY_BUCKETS - 1);
        assert_eq!(bucket(Duration::MAX), LATENCY_BUCKETS - 1);
        assert!(LATENCY_BOUNDS_US.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn record_snapshot_and_sum() {
        let c = LatencyCounters::default();
        c.record(Operation::Read, Duration::from_micros(30));
        c.record(Operation::Read, Duration::from_micros(40));
        c.record(Operation::Barrier, Duration::from_millis(3));
        c.record(Operation::Discard { secure: true }, Duration::from_secs(20));
        let s = c.snapshot();
        let read = s.op(LatencyOp::Read);
        assert_eq!(read.count(), 2);
        assert_eq!(read.buckets[2], 2);
        assert_eq!(read.sum_ns, 70_000);
        assert_eq!(s.op(LatencyOp::Flush).buckets[8], 1);
        assert_eq!(s.op(LatencyOp::Discard).buckets[LATENCY_BUCKETS - 1], 1);
        assert_eq!(s.op(LatencyOp::Write).count(), 0);
        let mut t = s;
        t += s;
        assert_eq!(t.op(LatencyOp::Read).count(), 4);
        assert_eq!(t.op(LatencyOp::Read).sum_ns, 140_000);
    }
}
