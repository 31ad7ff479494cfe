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
//! Every entry also holds a share of the engine's [`PersistentGrantBudget`], the
//! daemon-wide bound on persistent mappings (each is a VMA; see [`crate::grant_budget`]).
//! A grant the budget refuses is treated like one that does not fit a full cache: used for
//! its request only, overflow flag raised. And since blkback's arithmetic above frees
//! nothing from a cache below its own limit, the budget adds one rule: when a grant was
//! refused anywhere since a ring's last purge (or the rings' reserves exceed the
//! budget), that purge drops at least `(max / 100) * 5` inactive entries too (at least one),
//! so grants flow from the rings that hold them to the rings that want them.
//!
//! Time is passed in by the caller, so tests pin the timeout behaviour with a
//! controllable clock. The cache owns the mappings: dropping one unmaps it, then gives its
//! share back.
//!
//! [`purge`]: PersistentGrantCache::purge

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::grant_budget::{GrantShare, PersistentGrantBudget};

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
    /// The daemon-wide budget is spent; the VBD's overflow flag is now set.
    Budget,
}

/// A persistently mapped grant and its share of the budget. Dropping it unmaps the grant
/// first, then gives the share back, so the budget never counts fewer mappings than exist.
#[derive(Debug)]
pub struct KeptGrant<M> {
    mapping: M,
    _share: GrantShare,
}

impl<M> KeptGrant<M> {
    pub fn mapping(&self) -> &M {
        &self.mapping
    }
}

struct Entry<M> {
    kept: KeptGrant<M>,
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
    budget: PersistentGrantBudget,
    /// The budget's refusal count at the last purge.
    refusals_seen: u64,
    /// Grants this cache wanted to keep and the budget refused.
    budget_refusals: u64,
}

impl<M> PersistentGrantCache<M> {
    /// A cache for one ring; `overflow` is shared by all rings of the VBD, `budget` by
    /// every ring of the engine.
    pub fn new(
        limits: PersistentGrantLimits,
        overflow: Arc<AtomicBool>,
        budget: PersistentGrantBudget,
    ) -> Self {
        Self {
            entries: BTreeMap::new(),
            in_use: 0,
            limits,
            overflow,
            refusals_seen: budget.refusals(),
            budget,
            budget_refusals: 0,
        }
    }

    /// Number of grants mapped persistently.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `gref` is cached (in use or not).
    pub fn contains(&self, gref: u32) -> bool {
        self.entries.contains_key(&gref)
    }

    /// Number of grants currently used by in-flight requests.
    pub fn in_use(&self) -> usize {
        self.in_use
    }

    pub fn limits(&self) -> PersistentGrantLimits {
        self.limits
    }

    /// Entries free under this cache's own limit (the budget may allow fewer).
    pub fn free_entries(&self) -> usize {
        self.limits.max_grants.saturating_sub(self.entries.len())
    }

    /// How many of `wanted` new grants to map for keeping: bounded by the free entries
    /// and by what is left of the daemon-wide budget (which another ring may still take
    /// first: [`add`](Self::add) has the last word). Those the budget alone refuses are
    /// counted and raise the overflow flag.
    pub fn room_for(&mut self, wanted: usize) -> usize {
        let own = self.free_entries().min(wanted);
        let room = own.min(self.budget.available());
        if room < own {
            self.refused(own - room);
        }
        room
    }

    fn refused(&mut self, n: usize) {
        self.budget.note_refused(n);
        self.budget_refusals += n as u64;
        self.overflow.store(true, Ordering::Relaxed);
    }

    /// Grants this cache wanted to keep and the daemon-wide budget refused.
    pub fn budget_refusals(&self) -> u64 {
        self.budget_refusals
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
        Some(&entry.kept.mapping)
    }

    /// The mapping of a cached grant, active or not, without taking it. For reading an
    /// indirect descriptor page whose grant another in-flight request holds as a data page:
    /// the entry cannot go while it is active, and the caller is done with the mapping
    /// before it touches the cache again (the borrow says so).
    pub fn peek(&self, gref: u32) -> Option<&M> {
        self.entries.get(&gref).map(|e| &e.kept.mapping)
    }

    /// Whether `gref` is cached and taken by a request.
    pub fn is_active(&self, gref: u32) -> bool {
        self.entries.get(&gref).is_some_and(|e| e.active)
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
        let Some(share) = self.budget.try_take() else {
            // `try_take` counted it daemon-wide.
            self.budget_refusals += 1;
            self.overflow.store(true, Ordering::Relaxed);
            return Err((AddRejected::Budget, mapping));
        };
        self.in_use += 1;
        let entry = self.entries.entry(gref).or_insert(Entry {
            kept: KeptGrant {
                mapping,
                _share: share,
            },
            active: true,
            last_used: now,
        });
        Ok(&entry.kept.mapping)
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

    /// blkback's `purge_persistent_gnt`, plus the budget's rule (module docs). Returns the
    /// grants removed; dropping them unmaps and gives their shares back.
    pub fn purge(&mut self, now: Instant) -> Vec<KeptGrant<M>> {
        let count = self.entries.len();
        let max = self.limits.max_grants;
        let mut num_clean = if count < max || (count == max && !self.overflowed()) {
            0
        } else {
            let target = count - max + (max / 100) * LRU_PERCENT_CLEAN;
            target.min(count)
        };
        let refusals = self.budget.refusals();
        let budget_pressure = std::mem::replace(&mut self.refusals_seen, refusals) != refusals
            || self.budget.over_committed();
        if budget_pressure {
            let share = ((max / 100) * LRU_PERCENT_CLEAN).max(1);
            num_clean = num_clean.max(share.min(count));
        }

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

        let removed: Vec<KeptGrant<M>> = doomed
            .into_iter()
            .filter_map(|gref| self.entries.remove(&gref).map(|e| e.kept))
            .collect();
        if !removed.is_empty() {
            self.overflow.store(false, Ordering::Relaxed);
            tracing::debug!(
                num_clean,
                budget_pressure,
                purged = removed.len(),
                "purged persistent grants"
            );
        }
        removed
    }

    /// Removes every grant (ring teardown). Active grants are a caller bug at teardown
    /// time: in-flight requests must have completed first. Dropping the cache does the
    /// same without the check.
    pub fn drain(&mut self) -> Vec<KeptGrant<M>> {
        if self.in_use != 0 {
            tracing::warn!(
                in_use = self.in_use,
                "draining persistent grants still in use"
            );
        }
        self.in_use = 0;
        std::mem::take(&mut self.entries)
            .into_values()
            .map(|e| e.kept)
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
            PersistentGrantBudget::unlimited(),
        )
    }

    /// The mappings of removed grants (dropping them gives their shares back).
    fn maps(removed: Vec<KeptGrant<u32>>) -> Vec<u32> {
        maps_of(&removed)
    }

    fn maps_of(removed: &[KeptGrant<u32>]) -> Vec<u32> {
        removed.iter().map(|k| *k.mapping()).collect()
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
    fn peek_reads_an_entry_without_taking_it() {
        let t = Instant::now();
        let mut c = cache(4, 1);
        assert_eq!(c.peek(5), None);
        assert!(!c.is_active(5));
        c.add(5, 50, t).unwrap();
        assert!(c.is_active(5));
        // Taken by one request, read by another (an indirect page that is also a data
        // page in flight): neither takes it twice nor frees it.
        assert_eq!(c.peek(5), Some(&50));
        assert_eq!(c.in_use(), 1);
        c.put(5, t);
        assert!(!c.is_active(5));
        assert_eq!(c.peek(5), Some(&50));
        assert_eq!(c.in_use(), 0);
        // Peeking is no use: last used at `t`, it expires a second later.
        assert_eq!(maps(c.purge(t + Duration::from_secs(1))), vec![50]);
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
        assert_eq!(maps(c.purge(t + Duration::from_secs(1))), vec![50]);
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
        let removed = maps(c.purge(t0 + Duration::from_secs(1)));
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
        let removed = maps(c.purge(t0 + Duration::from_secs(3601)));
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
        let budget = PersistentGrantBudget::unlimited();
        let mut a: PersistentGrantCache<u32> =
            PersistentGrantCache::new(limits, flag.clone(), budget.clone());
        let mut b: PersistentGrantCache<u32> = PersistentGrantCache::new(limits, flag, budget);
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

    fn limits(max: usize) -> PersistentGrantLimits {
        PersistentGrantLimits {
            max_grants: max,
            unused_timeout: Duration::from_secs(60),
        }
    }

    /// A cache of VBD-wide flag `flag` drawing on `budget`.
    fn budget_cache(
        max: usize,
        budget: &PersistentGrantBudget,
    ) -> (PersistentGrantCache<u32>, Arc<AtomicBool>) {
        let flag = Arc::new(AtomicBool::new(false));
        let c = PersistentGrantCache::new(limits(max), flag.clone(), budget.clone());
        (c, flag)
    }

    #[test]
    fn two_caches_share_a_tiny_budget() {
        let t0 = Instant::now();
        let budget = PersistentGrantBudget::new(3);
        let (mut a, a_flag) = budget_cache(10, &budget);
        let (mut b, b_flag) = budget_cache(10, &budget);
        fill(&mut a, 2, t0);
        b.add(10, 100, t0).unwrap();
        b.put(10, t0);
        assert_eq!(budget.usage().grants, 3);
        // The budget is spent although both caches have room of their own: refused like
        // a full cache, mapping handed back, overflow raised on b's VBD only.
        assert_eq!(b.add(11, 110, t0).unwrap_err(), (AddRejected::Budget, 110));
        assert!(b_flag.load(Ordering::Relaxed));
        assert!(!a_flag.load(Ordering::Relaxed));
        assert_eq!(b.budget_refusals(), 1);
        assert_eq!(a.free_entries(), 8);
        assert_eq!(a.room_for(5), 0, "no budget left");
        assert_eq!(a.budget_refusals(), 5);
        assert_eq!(budget.refusals(), 6);
        assert_eq!(budget.usage().grants, 3, "refusals take nothing");
        // a's purge sheds a grant (below its own limit) because the budget refused some.
        let removed = a.purge(t0);
        assert_eq!(maps_of(&removed), vec![0]);
        // Not given back while the mapping is alive: the purged grant is still mapped.
        assert_eq!(budget.available(), 0);
        drop(removed);
        assert_eq!(budget.available(), 1);
        assert_eq!(b.room_for(5), 1);
        assert_eq!(*b.add(11, 110, t0).unwrap(), 110);
        assert!(b.add(12, 120, t0).is_err());
        b.put(11, t0);
        drop((a, b));
        assert_eq!(
            budget.usage().grants,
            0,
            "dropped caches give everything back"
        );
        assert_eq!(budget.available(), 3);
    }

    #[test]
    fn every_way_out_of_the_cache_gives_the_share_back() {
        let t0 = Instant::now();
        let budget = PersistentGrantBudget::new(100);
        let (mut c, _) = budget_cache(100, &budget);
        fill(&mut c, 40, t0);
        assert_eq!(budget.usage().grants, 40);
        // Timed out.
        for g in 0..10 {
            c.get(g).unwrap();
            c.put(g, t0 + Duration::from_secs(30));
        }
        drop(c.purge(t0 + Duration::from_secs(61)));
        assert_eq!(budget.usage().grants, 10);
        // Refused adds and duplicates take nothing.
        assert!(c.add(3, 3, t0).is_err());
        assert_eq!(budget.usage().grants, 10);
        // Drained at teardown.
        let drained = c.drain();
        assert_eq!(drained.len(), 10);
        assert_eq!(budget.usage().grants, 10, "still mapped");
        drop(drained);
        assert_eq!(budget.usage().grants, 0);
        // Dropped whole, with grants still active (a ring dropped mid-request).
        fill(&mut c, 5, t0);
        c.get(0).unwrap();
        drop(c);
        assert_eq!(budget.usage().grants, 0);
        assert_eq!(budget.available(), 100);
    }

    #[test]
    fn budget_pressure_sheds_five_percent_per_purge_and_stops_when_it_ends() {
        let t0 = Instant::now();
        let budget = PersistentGrantBudget::new(200);
        let (mut holder, _) = budget_cache(1056, &budget);
        let (mut starved, _) = budget_cache(1056, &budget);
        fill(&mut holder, 200, t0);
        // Below its own limit, without overflow: blkback's arithmetic frees nothing.
        assert!(holder.purge(t0).is_empty());
        assert_eq!(starved.room_for(8), 0);
        // The refusal moves the budget: (1056 / 100) * 5 = 50 inactive grants go, in
        // grant-reference order; the active ones stay.
        for g in 0..10 {
            holder.get(g).unwrap();
        }
        assert_eq!(maps(holder.purge(t0)), (10..60).collect::<Vec<_>>());
        // No refusal since: nothing more.
        assert!(holder.purge(t0).is_empty());
        assert_eq!(starved.room_for(8), 8);
        // Ring reserves beyond the budget shed grants on every purge while they last.
        let reserve = budget.reserve(100);
        assert!(budget.over_committed());
        assert_eq!(holder.purge(t0).len(), 50);
        assert_eq!(holder.len(), 100);
        drop(reserve);
        assert!(holder.purge(t0).is_empty());
    }
}
