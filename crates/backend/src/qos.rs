//! Per-VBD and per-group I/O limits (QoS): IOPS and bandwidth with bursts, as QEMU's
//! throttle groups and tapdisk3's rate limiting offer.
//!
//! A [`Throttle`] holds up to six leaky buckets (total, read and write; requests and bytes),
//! each with a sustained rate and a burst (the bucket's size). A request may start when
//! every bucket it draws on is below its burst; it then adds its cost to them, even past
//! the burst (debt, as QEMU's `throttle_compute_wait` allows), so a request larger than the
//! burst still goes, and the next one waits until the debt has leaked away. Over any long
//! window a bucket therefore passes its rate times the window plus at most one burst and
//! one request: the rate is exact in the long run whatever the request sizes, and the
//! tokens are time-based, so a late timer loses nothing that the burst does not hold.
//!
//! A VBD has a throttle of its own when it is limited, and may belong to a named group
//! ([`QosGroups`]) whose throttle every member's rings draw on too; rings of one VBD and
//! members of a group may run on different reactors, so a throttle is an `Arc` with a
//! small mutex, taken once or twice per request of a limited VBD only (an unlimited VBD
//! outside any group never touches one).
//!
//! Enforcement is the ring's (`ring::RingRunner`): a request that may not start yet is
//! held in its slot and the ring stops consuming (everything behind it stays on the
//! shared ring: the guest sees latency, never an error), and the reactor arms a timer for
//! the moment the buckets allow it. Nothing sleeps; other rings go on.
//!
//! Every function takes the time as an argument: the buckets are pure arithmetic on a
//! clock the caller gives (tests inject one), in integers (units x 10^9 per bucket level,
//! nanoseconds), so nothing drifts.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One limit: a sustained `rate` (units per second; 0: no limit) and the `burst` the
/// bucket holds (units; 0: a tenth of a second's worth, at least one unit, QEMU's default
/// bucket size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Limit {
    pub rate: u64,
    pub burst: u64,
}

impl Limit {
    /// A limit of `rate` with the default burst.
    pub const fn rate(rate: u64) -> Limit {
        Limit { rate, burst: 0 }
    }

    /// The burst in force: as given, or a tenth of a second's worth (at least 1).
    pub fn effective_burst(&self) -> u64 {
        if self.burst > 0 {
            self.burst
        } else {
            (self.rate / 10).max(1)
        }
    }
}

/// The limits of one VBD or group. A request draws on `iops` and `bps` (all requests), and
/// on `read_*` or `write_*` by its direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QosLimits {
    pub iops: Limit,
    pub bps: Limit,
    pub read_iops: Limit,
    pub write_iops: Limit,
    pub read_bps: Limit,
    pub write_bps: Limit,
}

impl QosLimits {
    /// No limit at all.
    pub fn is_unlimited(&self) -> bool {
        self.limits().iter().all(|l| l.rate == 0)
    }

    /// In bucket order (see [`BucketKind`]).
    fn limits(&self) -> [Limit; 6] {
        [
            self.iops,
            self.bps,
            self.read_iops,
            self.write_iops,
            self.read_bps,
            self.write_bps,
        ]
    }
}

/// Which way a request moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Read,
    /// Writes, and discards (one write request, no bytes: a discard costs the storage too,
    /// and must not be a way around a write limit).
    Write,
}

/// What one request costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    pub direction: Direction,
    pub bytes: u64,
}

/// The buckets, in the order of [`QosLimits::limits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BucketKind {
    Iops,
    Bps,
    ReadIops,
    WriteIops,
    ReadBps,
    WriteBps,
}

const KINDS: [BucketKind; 6] = [
    BucketKind::Iops,
    BucketKind::Bps,
    BucketKind::ReadIops,
    BucketKind::WriteIops,
    BucketKind::ReadBps,
    BucketKind::WriteBps,
];

impl BucketKind {
    /// What `cost` adds to this bucket (`None`: it does not draw on it).
    fn units(self, cost: Cost) -> Option<u64> {
        match (self, cost.direction) {
            (BucketKind::Iops, _)
            | (BucketKind::ReadIops, Direction::Read)
            | (BucketKind::WriteIops, Direction::Write) => Some(1),
            (BucketKind::Bps, _)
            | (BucketKind::ReadBps, Direction::Read)
            | (BucketKind::WriteBps, Direction::Write) => Some(cost.bytes),
            _ => None,
        }
    }
}

const NS_PER_SEC: u128 = 1_000_000_000;

/// A leaky bucket: `level` (units x 10^9) leaks at `rate` units per second; a request may
/// start while it is below `capacity` (the burst).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    rate: u64,
    capacity: u128,
    level: u128,
    last: Instant,
}

impl Bucket {
    fn new(limit: Limit, now: Instant) -> Option<Bucket> {
        (limit.rate > 0).then(|| Bucket {
            rate: limit.rate,
            capacity: u128::from(limit.effective_burst()) * NS_PER_SEC,
            level: 0,
            last: now,
        })
    }

    /// Lets the time since the last call leak away.
    fn leak(&mut self, now: Instant) {
        if now > self.last {
            let ns = now.duration_since(self.last).as_nanos();
            self.level = self
                .level
                .saturating_sub(ns.saturating_mul(u128::from(self.rate)));
            self.last = now;
        }
    }

    /// How long until a request may draw on the bucket (after [`leak`](Self::leak)).
    fn wait(&self) -> Option<Duration> {
        if self.level < self.capacity {
            return None;
        }
        // The first nanosecond at which the level is below the capacity.
        let ns = (self.level - self.capacity) / u128::from(self.rate) + 1;
        Some(Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX)))
    }

    fn charge(&mut self, units: u64) {
        self.level = self.level.saturating_add(u128::from(units) * NS_PER_SEC);
    }
}

#[derive(Debug)]
struct State {
    limits: QosLimits,
    buckets: [Option<Bucket>; 6],
}

impl State {
    /// When a request of `cost` may start: `None` now.
    fn wait(&mut self, cost: Cost, now: Instant) -> Option<Instant> {
        let mut wait: Option<Duration> = None;
        for (kind, bucket) in KINDS.iter().zip(self.buckets.iter_mut()) {
            let Some(b) = bucket else { continue };
            if kind.units(cost).is_none() {
                continue;
            }
            b.leak(now);
            if let Some(w) = b.wait() {
                wait = Some(wait.map_or(w, |x| x.max(w)));
            }
        }
        wait.map(|w| now + w)
    }

    fn charge(&mut self, cost: Cost) {
        for (kind, bucket) in KINDS.iter().zip(self.buckets.iter_mut()) {
            if let (Some(b), Some(units)) = (bucket, kind.units(cost)) {
                b.charge(units);
            }
        }
    }
}

/// The buckets of one VBD or group, shared by every ring that draws on them.
#[derive(Debug)]
pub struct Throttle {
    state: Mutex<State>,
}

impl Throttle {
    pub fn new(limits: QosLimits, now: Instant) -> Throttle {
        Throttle {
            state: Mutex::new(State {
                limits,
                buckets: limits.limits().map(|l| Bucket::new(l, now)),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Nothing in a critical section can panic but arithmetic already saturated.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The limits in force.
    pub fn limits(&self) -> QosLimits {
        self.lock().limits
    }

    /// Changes the limits. A bucket that stays limited keeps its level (its debt: a new
    /// limit is no way around one), clipped to the new burst when it was not in debt.
    pub fn set_limits(&self, limits: QosLimits, now: Instant) {
        let mut s = self.lock();
        let mut buckets = limits.limits().map(|l| Bucket::new(l, now));
        for (new, old) in buckets.iter_mut().zip(s.buckets.iter_mut()) {
            if let (Some(n), Some(o)) = (new.as_mut(), old.as_mut()) {
                o.leak(now);
                n.level = if o.level > o.capacity {
                    o.level
                } else {
                    o.level.min(n.capacity)
                };
            }
        }
        *s = State { limits, buckets };
    }

    /// When a request of `cost` may start (`None`: now), without taking anything.
    pub fn wait(&self, cost: Cost, now: Instant) -> Option<Instant> {
        self.lock().wait(cost, now)
    }

    /// Takes `cost` from every bucket it draws on.
    pub fn charge(&self, cost: Cost) {
        self.lock().charge(cost);
    }

    /// Starts a request of `cost` if the buckets allow it now (and takes its cost);
    /// otherwise says when to try again.
    pub fn try_admit(&self, cost: Cost, now: Instant) -> Result<(), Instant> {
        let mut s = self.lock();
        match s.wait(cost, now) {
            Some(at) => Err(at),
            None => {
                s.charge(cost);
                Ok(())
            }
        }
    }
}

/// Admits a request of `cost` through a VBD's own throttle and its group's: both must
/// allow it, and then both are charged. Checked one after the other without holding both
/// locks: a race with another ring only lets one request into the debt it then repays.
pub fn admit(
    own: Option<&Throttle>,
    group: Option<&Throttle>,
    cost: Cost,
    now: Instant,
) -> Result<(), Instant> {
    match (own, group) {
        (None, None) => Ok(()),
        (Some(t), None) | (None, Some(t)) => t.try_admit(cost, now),
        (Some(own), Some(group)) => {
            if let Some(at) = group.wait(cost, now) {
                return Err(at);
            }
            own.try_admit(cost, now)?;
            group.charge(cost);
            Ok(())
        }
    }
}

/// Named groups of VBDs sharing one set of limits (QEMU's throttle groups). A group exists
/// from its first mention (configuration, `xenblkd limit`, a member) for the engine's
/// lifetime.
#[derive(Debug, Default)]
pub struct QosGroups {
    groups: Mutex<BTreeMap<String, Arc<Throttle>>>,
}

impl QosGroups {
    /// The group `name`, created unlimited if new.
    pub fn get(&self, name: &str) -> Arc<Throttle> {
        self.groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(Throttle::new(QosLimits::default(), Instant::now())))
            .clone()
    }

    /// Sets the limits of group `name` (created if new).
    pub fn set(&self, name: &str, limits: QosLimits) {
        self.get(name).set_limits(limits, Instant::now());
    }

    /// Every group and its limits.
    pub fn list(&self) -> Vec<(String, QosLimits)> {
        self.groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(n, t)| (n.clone(), t.limits()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: u64) -> Cost {
        Cost {
            direction: Direction::Read,
            bytes,
        }
    }

    fn write(bytes: u64) -> Cost {
        Cost {
            direction: Direction::Write,
            bytes,
        }
    }

    /// Admits requests of `cost` as fast as the throttle allows from `t0` for `window`,
    /// jumping the clock to each retry time; returns how many started.
    fn saturate(t: &Throttle, cost: Cost, t0: Instant, window: Duration) -> u64 {
        let mut now = t0;
        let mut n = 0;
        while now < t0 + window {
            match t.try_admit(cost, now) {
                Ok(()) => n += 1,
                Err(at) => {
                    assert!(at > now, "a retry time in the past");
                    now = at;
                }
            }
        }
        n
    }

    #[test]
    fn the_rate_is_exact_after_the_burst() {
        let t0 = Instant::now();
        let limits = QosLimits {
            iops: Limit {
                rate: 1000,
                burst: 50,
            },
            ..QosLimits::default()
        };
        let t = Throttle::new(limits, t0);
        // The burst goes at once, then one request per millisecond.
        let first = saturate(&t, read(4096), t0, Duration::from_nanos(1));
        assert_eq!(first, 50);
        let n = saturate(&t, read(4096), t0, Duration::from_secs(10));
        // 50 of burst + 10 000 at the rate (the last boundary may or may not count).
        assert!((10_049..=10_051).contains(&(n + first)), "{}", n + first);
    }

    #[test]
    fn a_request_larger_than_the_burst_goes_and_the_next_pays_its_debt() {
        let t0 = Instant::now();
        let limits = QosLimits {
            bps: Limit {
                rate: 1 << 20,
                burst: 64 << 10,
            },
            ..QosLimits::default()
        };
        let t = Throttle::new(limits, t0);
        // 4 MiB against a 64 KiB burst: it goes (debt).
        assert_eq!(t.try_admit(write(4 << 20), t0), Ok(()));
        // The next waits until the level is back under the burst: (4 MiB) / (1 MiB/s),
        // minus the burst's 1/16 s.
        let at = t.try_admit(write(4096), t0).unwrap_err();
        let waited = at - t0;
        let expected =
            Duration::from_secs(4) - Duration::from_millis(62) - Duration::from_micros(500);
        assert!(
            waited >= expected && waited <= expected + Duration::from_millis(1),
            "{waited:?}"
        );
        assert!(t
            .try_admit(write(4096), at - Duration::from_nanos(1))
            .is_err());
        assert_eq!(t.try_admit(write(4096), at), Ok(()));
        // Bandwidth over a long window: exact whatever the request size.
        let t = Throttle::new(limits, t0);
        let n = saturate(&t, read(1 << 20), t0, Duration::from_secs(20));
        assert!((20..=21).contains(&n), "{n}");
    }

    #[test]
    fn read_and_write_limits_apply_by_direction() {
        let t0 = Instant::now();
        let limits = QosLimits {
            read_iops: Limit {
                rate: 100,
                burst: 1,
            },
            write_bps: Limit {
                rate: 1000,
                burst: 1000,
            },
            ..QosLimits::default()
        };
        let t = Throttle::new(limits, t0);
        assert_eq!(t.try_admit(read(1 << 30), t0), Ok(()));
        assert_eq!(t.try_admit(read(0), t0 + Duration::from_nanos(1)), Ok(()));
        // Reads wait for the read bucket (2 requests in a 1-request bucket at 100/s, as of
        // the later clock); writes do not draw on it.
        let at = t.try_admit(read(0), t0).unwrap_err();
        assert_eq!(at - t0, Duration::from_nanos(10_000_000));
        assert_eq!(t.try_admit(write(999), t0), Ok(()));
        assert_eq!(t.try_admit(write(1000), t0), Ok(()));
        // 1999 bytes in a 1000-byte bucket leaking 1000 bytes/s.
        let at = t.try_admit(write(1), t0).unwrap_err();
        assert_eq!(at - t0, Duration::from_nanos(999_000_001));
        // A read is allowed again after its bucket's 1/100 s.
        assert_eq!(t.try_admit(read(0), t0 + Duration::from_millis(11)), Ok(()));
    }

    #[test]
    fn idle_time_fills_no_more_than_the_burst() {
        let t0 = Instant::now();
        let t = Throttle::new(
            QosLimits {
                iops: Limit { rate: 10, burst: 3 },
                ..QosLimits::default()
            },
            t0,
        );
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(saturate(&t, read(0), later, Duration::from_nanos(1)), 3);
    }

    fn bps(rate: u64, burst: u64) -> QosLimits {
        QosLimits {
            bps: Limit { rate, burst },
            ..QosLimits::default()
        }
    }

    #[test]
    fn a_group_and_a_vbd_both_limit_and_both_are_charged() {
        let t0 = Instant::now();
        let own = Throttle::new(bps(1000, 100), t0);
        let group = Throttle::new(bps(100, 100), t0);
        assert_eq!(admit(Some(&own), Some(&group), read(1000), t0), Ok(()));
        // The group is the tighter: 900 bytes over its burst at 100 bytes/s.
        let at = admit(Some(&own), Some(&group), read(1), t0).unwrap_err();
        assert_eq!(at - t0, Duration::from_nanos(9_000_000_001));
        // The VBD's own bucket was charged too: 900 bytes over at 1000 bytes/s.
        let at = admit(Some(&own), None, read(1), t0).unwrap_err();
        assert_eq!(at - t0, Duration::from_nanos(900_000_001));

        // Another member's use of the group delays a VBD whose own bucket is empty, and a
        // refused request takes nothing from the VBD's own bucket.
        let own = Throttle::new(bps(1000, 100), t0);
        let group = Throttle::new(bps(100, 100), t0);
        assert_eq!(admit(None, Some(&group), read(1000), t0), Ok(()));
        let at = admit(Some(&own), Some(&group), read(50), t0).unwrap_err();
        assert_eq!(at - t0, Duration::from_nanos(9_000_000_001));
        assert_eq!(own.try_admit(read(99), t0), Ok(()));
        assert_eq!(own.try_admit(read(1), t0 + Duration::from_nanos(1)), Ok(()));
        assert_eq!(admit(None, None, read(1 << 40), t0), Ok(()));
    }

    #[test]
    fn changing_limits_keeps_debt_and_lifting_them_frees_at_once() {
        let t0 = Instant::now();
        let slow = QosLimits {
            iops: Limit { rate: 1, burst: 1 },
            ..QosLimits::default()
        };
        let t = Throttle::new(slow, t0);
        t.charge(read(0));
        t.charge(read(0));
        assert!(t.try_admit(read(0), t0).is_err());
        // Another rate: the debt stays, repaid faster.
        t.set_limits(
            QosLimits {
                iops: Limit {
                    rate: 1000,
                    burst: 1,
                },
                ..QosLimits::default()
            },
            t0,
        );
        assert!(t.try_admit(read(0), t0).is_err());
        assert_eq!(t.try_admit(read(0), t0 + Duration::from_millis(2)), Ok(()));
        // No limit: everything goes.
        t.set_limits(QosLimits::default(), t0);
        assert!(t.limits().is_unlimited());
        assert_eq!(t.try_admit(read(1 << 40), t0), Ok(()));
        assert_eq!(t.try_admit(read(1 << 40), t0), Ok(()));
    }

    #[test]
    fn default_burst_is_a_tenth_of_a_second() {
        assert_eq!(Limit::rate(1000).effective_burst(), 100);
        assert_eq!(Limit::rate(5).effective_burst(), 1);
        assert_eq!(Limit { rate: 5, burst: 7 }.effective_burst(), 7);
    }

    #[test]
    fn groups_are_created_on_first_mention() {
        let g = QosGroups::default();
        let a = g.get("a");
        assert!(a.limits().is_unlimited());
        g.set(
            "a",
            QosLimits {
                iops: Limit::rate(5),
                ..QosLimits::default()
            },
        );
        assert_eq!(a.limits().iops.rate, 5);
        assert_eq!(g.list().len(), 1);
    }
}
