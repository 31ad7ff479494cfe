//! The per-ring cache of persistently mapped grants, managed exactly as Linux blkback
//! manages its `persistent_gnts` tree.
//!
//! When both ends negotiate `feature-persistent`, the frontend reuses a fixed pool of
//! granted pages and the backend keeps each one mapped after first use, so the
//! steady state maps nothing per request. The cache is bounded (`max_persistent_grants`,
//! default 1056); a grant that does not fit is used non-persistently and the VBD's
//! overflow flag is raised. Every 100 ms the owning reactor calls [`purge`], which
//! reproduces blkback's `purge_persistent_gnt` arithmetic:
//!
//! * nothing is forced out while `count < max`, or `count == max` without an overflow;
//! * otherwise at least `count - max + (max / 100) * 5` entries go (5 % of the limit, in
//!   integer arithmetic as the kernel computes it), capped at `count`;
//! * the first pass drops every inactive entry unused for `unused_timeout` (0 = never),
//!   whatever the target; if that is not enough, a second pass drops further inactive
//!   entries in grant-reference order (the kernel walks its rb-tree) until the target is met;
//! * active entries (in use by an in-flight request) are never dropped;
//! * if anything was dropped the overflow flag is cleared.
//!
//! Time is passed in by the caller, so tests pin the timeout behaviour with a
//! controllable clock. The cache owns the mappings: dropping one unmaps it.
//!
//! [`purge`]: PersistentGrantCache::purge

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// blkback's `LRU_PERCENT_CLEAN`.
pub const LRU_PERCENT_CLEAN: usize = 5;
/// blkback's `LRU_INTERVAL`: how often the owning reactor calls [`PersistentGrantCache::purge`].
pub const LRU_INTERVAL: Duration = Duration::from_millis(100);
/// blkback's default `max_persistent_grants`.
pub const DEFAULT_MAX_PERSISTENT_GRANTS: usize = 1056;
/// blkback's default `persistent_grant_unused_seconds`.
pub const DEFAULT_UNUSED_TIMEOUT: Duration = Duration::from_secs(60);

/// Limits of one ring's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PersistentGrantLimits {
    /// Most grants kept mapped per ring.
    pub max_grants: usize,
    /// An inactive grant unused this long is dropped at the next purge; zero keeps
    /// grants forever (blkback's `persistent_grant_unused_seconds = 0`).
    pub unused_timeout: Duration,
}

impl Default for PersistentGrantLimits {
    fn default() -> Self {
        Self {
            max_grants: DEFAULT_MAX_PERSISTENT_GRANTS,
            unused_timeout: DEFAULT_UNUSED_TIMEOUT,
        }
    }
}

/// Why a grant could not be added to the cache; the caller keeps the mapping and uses
/// it for this request only.
#[derive(Debug, PartialEq, Eq)]
pub enum AddRejected {
    /// The cache holds `max_grants` entries; the VBD's overflow flag is now set.
    Full,
    /// The reference is already cached (a frontend using one gref twice at once).
    Duplicate,
}

struct Entry<M> {
    mapping: M,
    active: bool,
    last_used: Instant,
}

/// One ring's persistent grants, keyed by grant reference.
pub struct PersistentGrantCache<M> {
    entries: BTreeMap<u32, Entry<M>>,
    in_use: usize,
    limits: PersistentGrantLimits,
    /// blkback keeps `overflow_max_grants` per VBD, shared by all of its rings.
    overflow: Arc<AtomicBool>,
}

impl<M> PersistentGrantCache<M> {
    /// A cache for one ring; `overflow` is shared by all rings of the VBD.
    pub fn new(limits: PersistentGrantLimits, overflow: Arc<AtomicBool>) -> Self {
        Self {
            entries: BTreeMap::new(),
            in_use: 0,
            limits,
            overflow,
        }
    }

    /// Number of grants mapped persistently.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Number of grants currently used by in-flight requests.
    pub fn in_use(&self) -> usize {
        self.in_use
    }

    pub fn limits(&self) -> PersistentGrantLimits {
        self.limits
    }

    /// Whether a new grant would fit.
    pub fn has_room(&self) -> bool {
        self.entries.len() < self.limits.max_grants
    }

    /// Takes a cached grant for a request: marks it active and returns its mapping.
    /// `None` if the grant is not cached, or is already active (blkback refuses a grant
    /// "already in use" and the request maps it afresh).
    pub fn get(&mut self, gref: u32) -> Option<&M> {
        let entry = self.entries.get_mut(&gref)?;
        if entry.active {
            tracing::debug!(gref, "persistent grant requested while already in use");
            return None;
        }
        entry.active = true;
        self.in_use += 1;
        Some(&entry.mapping)
    }

    /// Adds a freshly mapped grant, active for the request that mapped it.
    pub fn add(&mut self, gref: u32, mapping: M, now: Instant) -> Result<&M, (AddRejected, M)> {
        if self.entries.len() >= self.limits.max_grants {
            self.overflow.store(true, Ordering::Relaxed);
            return Err((AddRejected::Full, mapping));
        }
        if self.entries.contains_key(&gref) {
            return Err((AddRejected::Duplicate, mapping));
        }
        self.in_use += 1;
        let entry = self.entries.entry(gref).or_insert(Entry {
            mapping,
            active: true,
            last_used: now,
        });
        Ok(&entry.mapping)
    }

    /// Undoes a [`get`](Self::get) whose request did not use the grant after all: it is
    /// free again and keeps its last-use time.
    pub fn unget(&mut self, gref: u32) {
        match self.entries.get_mut(&gref) {
            Some(entry) if entry.active => {
                entry.active = false;
                self.in_use -= 1;
            }
            _ => tracing::warn!(gref, "ungetting a persistent grant that is not in use"),
        }
    }

    /// Returns a grant when its request completes.
    pub fn put(&mut self, gref: u32, now: Instant) {
        match self.entries.get_mut(&gref) {
            Some(entry) if entry.active => {
                entry.active = false;
                entry.last_used = now;
                self.in_use -= 1;
            }
            _ => tracing::warn!(gref, "returning a persistent grant that is not in use"),
        }
    }

    /// Notes that a grant could not be kept persistently although the frontend wanted it
    /// (blkback sets `overflow_max_grants` in that case too).
    pub fn note_overflow(&self) {
        self.overflow.store(true, Ordering::Relaxed);
    }

    pub fn overflowed(&self) -> bool {
        self.overflow.load(Ordering::Relaxed)
    }

    /// blkback's `purge_persistent_gnt`. Returns the mappings removed; dropping them unmaps.
    pub fn purge(&mut self, now: Instant) -> Vec<M> {
        let count = self.entries.len();
        let max = self.limits.max_grants;
        let num_clean = if count < max || (count == max && !self.overflowed()) {
            0
        } else {
            let target = count - max + (max / 100) * LRU_PERCENT_CLEAN;
            target.min(count)
        };

        let timeout = self.limits.unused_timeout;
        let expired = |e: &Entry<M>| {
            !timeout.is_zero() && now.saturating_duration_since(e.last_used) >= timeout
        };

        let mut doomed: Vec<u32> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.active && expired(e))
            .map(|(&gref, _)| gref)
            .collect();
        if doomed.len() < num_clean {
            let missing = num_clean - doomed.len();
            let extra: Vec<u32> = self
                .entries
                .iter()
                .filter(|(_, e)| !e.active && !expired(e))
                .map(|(&gref, _)| gref)
                .take(missing)
                .collect();
            doomed.extend(extra);
        }

        let removed: Vec<M> = doomed
            .into_iter()
            .filter_map(|gref| self.entries.remove(&gref).map(|e| e.mapping))
            .collect();
        if !removed.is_empty() {
            self.overflow.store(false, Ordering::Relaxed);
            tracing::debug!(
                num_clean,
                purged = removed.len(),
                "purged persistent grants"
            );
        }
        removed
    }

    /// Removes every grant (ring teardown). Active grants are a caller bug at teardown
    /// time: in-flight requests must have completed first.
    pub fn drain(&mut self) -> Vec<M> {
        if self.in_use != 0 {
            tracing::warn!(
                in_use = self.in_use,
                "draining persistent grants still in use"
            );
        }
        self.in_use = 0;
        std::mem::take(&mut self.entries)
            .into_values()
            .map(|e| e.mapping)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(max: usize, timeout_s: u64) -> PersistentGrantCache<u32> {
        PersistentGrantCache::new(
            PersistentGrantLimits {
                max_grants: max,
                unused_timeout: Duration::from_secs(timeout_s),
            },
            Arc::new(AtomicBool::new(false)),
        )
    }

    /// Fills the cache with grefs 0..n, all returned (inactive) at `t`.
    fn fill(c: &mut PersistentGrantCache<u32>, n: u32, t: Instant) {
        for g in 0..n {
            c.add(g, g, t).unwrap();
            c.put(g, t);
        }
    }

    #[test]
    fn get_marks_active_and_refuses_a_second_user() {
        let t = Instant::now();
        let mut c = cache(10, 60);
        assert!(c.get(7).is_none());
        assert_eq!(*c.add(7, 70, t).unwrap(), 70);
        assert_eq!(c.in_use(), 1);
        assert!(c.get(7).is_none(), "already active");
        c.put(7, t);
        assert_eq!(c.in_use(), 0);
        assert_eq!(c.get(7), Some(&70));
        assert_eq!(c.in_use(), 1);
    }

    #[test]
    fn unget_frees_a_grant_and_keeps_its_last_use() {
        let t = Instant::now();
        let mut c = cache(4, 1);
        c.add(5, 50, t).unwrap();
        c.put(5, t);
        assert_eq!(c.get(5), Some(&50));
        c.unget(5);
        assert_eq!(c.in_use(), 0);
        // Still last used at `t`: expired a second later, as if never taken again.
        assert_eq!(c.purge(t + Duration::from_secs(1)), vec![50]);
    }

    #[test]
    fn add_beyond_limit_sets_overflow_and_hands_mapping_back() {
        let t = Instant::now();
        let mut c = cache(2, 60);
        fill(&mut c, 2, t);
        assert!(!c.overflowed());
        assert_eq!(c.add(9, 90, t).unwrap_err(), (AddRejected::Full, 90));
        assert!(c.overflowed());
        assert_eq!(c.add(1, 10, t).unwrap_err().0, AddRejected::Full);
    }

    #[test]
    fn duplicate_add_is_rejected() {
        let t = Instant::now();
        let mut c = cache(4, 60);
        c.add(3, 30, t).unwrap();
        assert_eq!(c.add(3, 31, t).unwrap_err(), (AddRejected::Duplicate, 31));
    }

    #[test]
    fn nothing_purged_below_limit_until_timeout() {
        let t0 = Instant::now();
        let mut c = cache(1056, 60);
        fill(&mut c, 100, t0);
        assert!(c.purge(t0 + Duration::from_secs(59)).is_empty());
        assert_eq!(c.len(), 100);
        // At the timeout every inactive entry goes, even with no pressure.
        assert_eq!(c.purge(t0 + Duration::from_secs(60)).len(), 100);
        assert!(c.is_empty());
    }

    #[test]
    fn full_without_overflow_is_left_alone() {
        let t0 = Instant::now();
        let mut c = cache(1056, 60);
        fill(&mut c, 1056, t0);
        assert!(c.purge(t0 + Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn full_with_overflow_cleans_five_percent_in_kernel_integer_arithmetic() {
        let t0 = Instant::now();
        let mut c = cache(1056, 60);
        fill(&mut c, 1056, t0);
        assert!(c.add(5000, 0, t0).is_err());
        let removed = c.purge(t0 + Duration::from_secs(1));
        // (1056 / 100) * 5 = 50, not 52.8.
        assert_eq!(removed.len(), 50);
        assert_eq!(c.len(), 1006);
        assert!(
            !c.overflowed(),
            "a purge that removed something clears the flag"
        );
        // Second pass walks grant-reference order, as the kernel walks its rb-tree.
        assert_eq!(removed, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn small_limit_rounds_five_percent_down_to_zero() {
        let t0 = Instant::now();
        let mut c = cache(99, 60);
        fill(&mut c, 99, t0);
        c.note_overflow();
        // count - max + (99/100)*5 = 0: nothing to force out, flag stays.
        assert!(c.purge(t0).is_empty());
        assert!(c.overflowed());
    }

    #[test]
    fn expired_entries_count_towards_the_target_and_all_go() {
        let t0 = Instant::now();
        let mut c = cache(200, 60);
        fill(&mut c, 200, t0);
        // 30 of them used again recently.
        let t1 = t0 + Duration::from_secs(50);
        for g in 0..30 {
            c.get(g).unwrap();
            c.put(g, t1);
        }
        c.note_overflow();
        let removed = c.purge(t0 + Duration::from_secs(61));
        // Target is 10; the 170 expired entries all go, fresh ones stay.
        assert_eq!(removed.len(), 170);
        assert_eq!(c.len(), 30);
    }

    #[test]
    fn active_entries_are_never_purged() {
        let t0 = Instant::now();
        let mut c = cache(100, 60);
        fill(&mut c, 100, t0);
        for g in 0..100 {
            c.get(g).unwrap();
        }
        c.note_overflow();
        assert!(c.purge(t0 + Duration::from_secs(3600)).is_empty());
        assert_eq!(c.in_use(), 100);
        // Half come back: the target (5) is met from the inactive ones, timed-out first.
        for g in 50..100 {
            c.put(g, t0 + Duration::from_secs(3600));
        }
        let removed = c.purge(t0 + Duration::from_secs(3601));
        assert_eq!(removed, (50..55).collect::<Vec<_>>());
    }

    #[test]
    fn zero_timeout_keeps_grants_forever() {
        let t0 = Instant::now();
        let mut c = cache(10, 0);
        fill(&mut c, 5, t0);
        assert!(c.purge(t0 + Duration::from_secs(1_000_000)).is_empty());
    }

    #[test]
    fn overflow_flag_is_shared_by_the_rings_of_a_vbd() {
        let t0 = Instant::now();
        let flag = Arc::new(AtomicBool::new(false));
        let limits = PersistentGrantLimits {
            max_grants: 100,
            unused_timeout: Duration::from_secs(60),
        };
        let mut a: PersistentGrantCache<u32> = PersistentGrantCache::new(limits, flag.clone());
        let mut b: PersistentGrantCache<u32> = PersistentGrantCache::new(limits, flag);
        fill(&mut a, 100, t0);
        fill(&mut b, 100, t0);
        assert!(a.add(1000, 0, t0).is_err());
        assert_eq!(
            b.purge(t0).len(),
            5,
            "ring b purges because ring a overflowed"
        );
        assert!(
            a.purge(t0).is_empty(),
            "b's purge cleared the VBD-wide flag"
        );
    }

    #[test]
    fn drain_returns_everything() {
        let t0 = Instant::now();
        let mut c = cache(10, 60);
        fill(&mut c, 7, t0);
        assert_eq!(c.drain().len(), 7);
        assert!(c.is_empty());
        assert_eq!(c.in_use(), 0);
    }
}
