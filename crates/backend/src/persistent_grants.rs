//! The per-ring cache of persistently mapped grants, managed exactly as Linux blkback
//! manages its `persistent_gnts` tree.
//!
//! When both ends negotiate `feature-persistent`, the frontend reuses a fixed pool of
//! granted pages and the backend keeps each one mapped after first use, so the
//! steady state maps nothing per request. The cache is bounded (`max_persistent_grants`);
//! a grant that does not fit is used non-persistently and the VBD's overflow flag is
//! raised. By default the bound is not blkback's fixed 1056 but what the frontend can have
//! in flight on the ring ([`PersistentGrantLimits::for_ring`]: every slot holding a
//! maximal request, as Linux blkfront sizes its own persistent pool), so a frontend whose
//! requests are large and deep (1 MiB at depth 8 is 2 056 grants) keeps every page mapped
//! instead of cycling them through a cache that is too small; the guest's share of the
//! daemon-wide budget (below) is what bounds it against a hostile frontend. Every 100 ms
//! the owning reactor calls [`purge`], which reproduces blkback's `purge_persistent_gnt`
//! arithmetic:
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
//! Every entry also holds a share of its guest's [`GuestBudget`], the guest's bounded part
//! of the daemon-wide budget of grant mappings (each grant is a VMA and a mapped page;
//! see [`crate::grant_budget`]), taken before the grant is mapped
//! ([`reserve`](PersistentGrantCache::reserve)). A grant the budget has no room for is
//! treated like one that does not fit a full cache: used for its request only, overflow
//! flag raised. And since blkback's arithmetic above frees nothing from a cache below its
//! own limit, the budget adds rules: a purge drops at least `(max / 100) * 5` inactive
//! entries (at least one) when the guest was refused anything since the ring's last purge
//! (so grants flow between the guest's rings, to the ones that want them) or the
//! daemon-wide budget is over its capacity (ring reserves beyond it), and at least the
//! guest's excess over its share when it holds more than that (another guest attached):
//! one guest's refusals never make another guest's caches shrink.
//!
//! Time is passed in by the caller, so tests pin the timeout behaviour with a
//! controllable clock. The cache owns the mappings, and a request that takes one holds a
//! [`Lease`] on it: the mapping lives while either holds it (dropping the last unmaps it,
//! then gives its share back), and the grant is back in the cache when the lease is gone.
//! A request's pages stay mapped while the request owns its leases, whatever happens to
//! the cache.
//!
//! [`purge`]: PersistentGrantCache::purge

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::grant_budget::{GuestBudget, MapShare};

/// blkback's `LRU_PERCENT_CLEAN`.
pub const LRU_PERCENT_CLEAN: usize = 5;
/// blkback's `LRU_INTERVAL`: how often the owning reactor calls [`PersistentGrantCache::purge`].
pub const LRU_INTERVAL: Duration = Duration::from_millis(100);
/// Linux blkback's default `max_persistent_grants`; a ring sized to what it can have in
/// flight never keeps fewer.
pub const BLKBACK_MAX_PERSISTENT_GRANTS: usize = 1056;
/// [`PersistentGrantLimits::max_grants`] that means "what the ring can have in flight"
/// (the default; see [`PersistentGrantLimits::for_ring`]).
pub const SIZED_TO_RING: usize = 0;
/// blkback's default `persistent_grant_unused_seconds`.
pub const DEFAULT_UNUSED_TIMEOUT: Duration = Duration::from_secs(60);

/// Limits of one ring's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PersistentGrantLimits {
    /// Most grants kept mapped per ring; [`SIZED_TO_RING`] (the default): what the ring
    /// can have in flight, resolved by [`for_ring`](Self::for_ring) when the ring is made.
    pub max_grants: usize,
    /// An inactive grant unused this long is dropped at the next purge; zero keeps
    /// grants forever (blkback's `persistent_grant_unused_seconds = 0`).
    pub unused_timeout: Duration,
}

impl Default for PersistentGrantLimits {
    fn default() -> Self {
        Self {
            max_grants: SIZED_TO_RING,
            unused_timeout: DEFAULT_UNUSED_TIMEOUT,
        }
    }
}

impl PersistentGrantLimits {
    /// The limits of the cache of one ring of `ring_size` slots on a VBD that advertised
    /// `max_indirect_segments`: a fixed `max_grants` as it is (blkback's
    /// `max_persistent_grants`), [`SIZED_TO_RING`] as [`in_flight_grants`], and never
    /// fewer than blkback's 1056.
    ///
    /// Both inputs are the backend's own (the ring's size is checked against the
    /// `max-ring-page-order` we advertised before the ring is mapped; the segments are
    /// what we advertised, at most 4096), so the largest a frontend can make this is
    /// 512 slots x 4 104 grants per ring. What it can actually keep mapped is bounded
    /// by its guest's share of the daemon-wide budget ([`GuestBudget`]), which every
    /// grant is taken from before it is mapped, whatever this limit says.
    pub fn for_ring(self, ring_size: u32, max_indirect_segments: u32) -> Self {
        if self.max_grants != SIZED_TO_RING {
            return self;
        }
        Self {
            max_grants: in_flight_grants(ring_size, max_indirect_segments)
                .max(BLKBACK_MAX_PERSISTENT_GRANTS),
            ..self
        }
    }
}

/// The grants a frontend can have in flight on a ring of `ring_size` slots when the VBD
/// advertised `max_indirect_segments` (0: no indirect requests): every slot holding a
/// request of the most segments, plus its indirect pages, which blkfront also takes from
/// its persistent pool. Linux blkfront sizes its pool of persistent grants the same way
/// (`(segs + INDIRECT_GREFS(segs)) * BLK_RING_SIZE`, `blkfront_setup_indirect`), so a
/// cache of this size holds the whole pool of an honest frontend.
pub fn in_flight_grants(ring_size: u32, max_indirect_segments: u32) -> usize {
    let direct = blkif::abi::BLKIF_MAX_SEGMENTS_PER_REQUEST;
    let segments = max_indirect_segments as usize;
    let per_request = if segments > direct {
        segments + blkif::abi::indirect_pages(segments)
    } else {
        direct
    };
    (ring_size as usize).saturating_mul(per_request)
}

/// Why a grant could not be added to the cache; the caller keeps the mapping and its
/// share and uses them for this request only.
#[derive(Debug, PartialEq, Eq)]
pub enum AddRejected {
    /// The cache holds `max_grants` entries; the VBD's overflow flag is now set.
    Full,
    /// The reference is already cached (a frontend using one gref twice at once).
    Duplicate,
}

/// A grant [`add`](PersistentGrantCache::add) refused, handed back with its share.
#[derive(Debug)]
pub struct Rejected<M> {
    pub reason: AddRejected,
    pub mapping: M,
    pub share: MapShare,
}

/// A persistently mapped grant and its share of the budget. Dropping it unmaps the grant
/// first, then gives the share back, so the budget never counts fewer mappings than exist.
/// The cache holds one reference to it, and a [`Lease`] one more while a request uses it:
/// the grant stays mapped while either holds it, so a purge or a cache torn down under a
/// request in flight cannot unmap the request's page.
#[derive(Debug)]
pub struct KeptGrant<M> {
    mapping: M,
    _share: MapShare,
    /// The cache's count of leases out.
    leased: Arc<AtomicUsize>,
}

impl<M> KeptGrant<M> {
    pub fn mapping(&self) -> &M {
        &self.mapping
    }
}

/// A cached grant taken by one request ([`PersistentGrantCache::get`] or
/// [`add`](PersistentGrantCache::add)). While it exists the entry is in use: no other
/// request takes it and no purge removes it, and the mapping stays valid even if the
/// cache is dropped. Dropping the lease returns the grant to the cache with its last use
/// unchanged (blkback's "not used after all"); [`PersistentGrantCache::put`] returns it
/// with a new last use (the request completed).
#[derive(Debug)]
#[must_use = "dropping a lease returns the grant at once"]
pub struct Lease<M> {
    kept: Arc<KeptGrant<M>>,
    gref: u32,
}

impl<M> Lease<M> {
    pub fn mapping(&self) -> &M {
        &self.kept.mapping
    }
}

impl<M> Drop for Lease<M> {
    fn drop(&mut self) {
        self.kept.leased.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Entry<M> {
    kept: Arc<KeptGrant<M>>,
    last_used: Instant,
}

impl<M> Entry<M> {
    /// Taken by a request: a lease holds the other reference.
    fn active(&self) -> bool {
        Arc::strong_count(&self.kept) > 1
    }
}

/// One ring's persistent grants, keyed by grant reference.
pub struct PersistentGrantCache<M> {
    entries: BTreeMap<u32, Entry<M>>,
    /// Leases out (shared with every entry, so a lease dropped anywhere is counted).
    leased: Arc<AtomicUsize>,
    limits: PersistentGrantLimits,
    /// blkback keeps `overflow_max_grants` per VBD, shared by all of its rings.
    overflow: Arc<AtomicBool>,
    budget: GuestBudget,
    /// The guest's refusal count at the last purge.
    refusals_seen: u64,
    /// Grants this cache wanted to keep and the budget refused.
    budget_refusals: u64,
}

impl<M> std::fmt::Debug for PersistentGrantCache<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistentGrantCache")
            .field("len", &self.entries.len())
            .field("in_use", &self.in_use())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl<M> PersistentGrantCache<M> {
    /// A cache for one ring; `overflow` is shared by all rings of the VBD, `budget` by
    /// every ring of the guest.
    pub fn new(
        limits: PersistentGrantLimits,
        overflow: Arc<AtomicBool>,
        budget: GuestBudget,
    ) -> Self {
        Self {
            entries: BTreeMap::new(),
            leased: Arc::new(AtomicUsize::new(0)),
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

    /// Number of grants currently leased to in-flight requests.
    pub fn in_use(&self) -> usize {
        self.leased.load(Ordering::Relaxed)
    }

    pub fn limits(&self) -> PersistentGrantLimits {
        self.limits
    }

    /// Entries free under this cache's own limit (the budget may allow fewer).
    pub fn free_entries(&self) -> usize {
        self.limits.max_grants.saturating_sub(self.entries.len())
    }

    /// The shares of as many of `wanted` new grants as to map for keeping (one each, split
    /// off with [`MapShare::split_grant`]): bounded by the free entries and by what the
    /// guest's budget has room for; `None` for none. Those the budget alone refuses are
    /// counted and raise the overflow flag.
    pub fn reserve(&mut self, wanted: usize) -> Option<MapShare> {
        let own = self.free_entries().min(wanted);
        if own == 0 {
            return None;
        }
        let shares = self.budget.try_take_grants(own);
        let room = shares.as_ref().map_or(0, |s| s.cost().vmas);
        if room < own {
            self.refused(own - room);
        }
        shares
    }

    fn refused(&mut self, n: usize) {
        self.budget.note_refused();
        self.budget_refusals += n as u64;
        self.overflow.store(true, Ordering::Relaxed);
    }

    /// Grants this cache wanted to keep and the daemon-wide budget refused.
    pub fn budget_refusals(&self) -> u64 {
        self.budget_refusals
    }

    fn lease(&self, gref: u32, kept: &Arc<KeptGrant<M>>) -> Lease<M> {
        self.leased.fetch_add(1, Ordering::Relaxed);
        Lease {
            kept: kept.clone(),
            gref,
        }
    }

    /// Takes a cached grant for a request. `None` if the grant is not cached, or is
    /// already leased (blkback refuses a grant "already in use" and the request maps it
    /// afresh).
    pub fn get(&mut self, gref: u32) -> Option<Lease<M>> {
        let entry = self.entries.get(&gref)?;
        if entry.active() {
            tracing::debug!(gref, "persistent grant requested while already in use");
            return None;
        }
        Some(self.lease(gref, &entry.kept))
    }

    /// The mapping of a cached grant, leased or not, without taking it. For reading an
    /// indirect descriptor page whose grant another in-flight request holds as a data page:
    /// the caller is done with the mapping before it touches the cache again (the borrow
    /// says so).
    pub fn peek(&self, gref: u32) -> Option<&M> {
        self.entries.get(&gref).map(|e| &e.kept.mapping)
    }

    /// Whether `gref` is cached and leased to a request.
    pub fn is_active(&self, gref: u32) -> bool {
        self.entries.get(&gref).is_some_and(Entry::active)
    }

    /// Adds a freshly mapped grant with its share of the budget, leased to the request
    /// that mapped it.
    pub fn add(
        &mut self,
        gref: u32,
        mapping: M,
        mut share: MapShare,
        now: Instant,
    ) -> Result<Lease<M>, Rejected<M>> {
        let reason = if self.entries.len() >= self.limits.max_grants {
            self.overflow.store(true, Ordering::Relaxed);
            AddRejected::Full
        } else if self.entries.contains_key(&gref) {
            AddRejected::Duplicate
        } else {
            share.keep_as_grant();
            let kept = Arc::new(KeptGrant {
                mapping,
                _share: share,
                leased: self.leased.clone(),
            });
            let lease = self.lease(gref, &kept);
            self.entries.insert(
                gref,
                Entry {
                    kept,
                    last_used: now,
                },
            );
            return Ok(lease);
        };
        Err(Rejected {
            reason,
            mapping,
            share,
        })
    }

    /// Returns a grant when its request completes: last used `now`.
    pub fn put(&mut self, lease: Lease<M>, now: Instant) {
        match self.entries.get_mut(&lease.gref) {
            Some(entry) if Arc::ptr_eq(&entry.kept, &lease.kept) => entry.last_used = now,
            // Purged while leased: it goes when the lease does.
            _ => {}
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
    pub fn purge(&mut self, now: Instant) -> Vec<Arc<KeptGrant<M>>> {
        let count = self.entries.len();
        let max = self.limits.max_grants;
        let mut num_clean = if count < max || (count == max && !self.overflowed()) {
            0
        } else {
            let target = count - max + (max / 100) * LRU_PERCENT_CLEAN;
            target.min(count)
        };
        let refusals = self.budget.refusals();
        let excess = self.budget.excess();
        let budget_pressure = std::mem::replace(&mut self.refusals_seen, refusals) != refusals
            || self.budget.budget_over_committed()
            || excess != crate::grant_budget::MapCost::ZERO;
        if budget_pressure {
            let share = ((max / 100) * LRU_PERCENT_CLEAN).max(1);
            // Over its share, the guest gives back at least the excess (each grant is a
            // VMA and a page) as soon as possible: another guest is owed it.
            let share = share.max(excess.vmas.max(excess.pages));
            num_clean = num_clean.max(share.min(count));
        }

        let timeout = self.limits.unused_timeout;
        let expired = |e: &Entry<M>| {
            !timeout.is_zero() && now.saturating_duration_since(e.last_used) >= timeout
        };

        let mut doomed: Vec<u32> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.active() && expired(e))
            .map(|(&gref, _)| gref)
            .collect();
        if doomed.len() < num_clean {
            let missing = num_clean - doomed.len();
            let extra: Vec<u32> = self
                .entries
                .iter()
                .filter(|(_, e)| !e.active() && !expired(e))
                .map(|(&gref, _)| gref)
                .take(missing)
                .collect();
            doomed.extend(extra);
        }

        let removed: Vec<Arc<KeptGrant<M>>> = doomed
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

    /// Removes every grant (ring teardown). A grant still leased stays mapped until its
    /// lease is dropped.
    pub fn drain(&mut self) -> Vec<Arc<KeptGrant<M>>> {
        let leased = self.in_use();
        if leased != 0 {
            tracing::debug!(leased, "draining persistent grants still leased");
        }
        std::mem::take(&mut self.entries)
            .into_values()
            .map(|e| e.kept)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grant_budget::{MapBudget, MapCost};

    fn cache(max: usize, timeout_s: u64) -> PersistentGrantCache<u32> {
        PersistentGrantCache::new(
            PersistentGrantLimits {
                max_grants: max,
                unused_timeout: Duration::from_secs(timeout_s),
            },
            Arc::new(AtomicBool::new(false)),
            MapBudget::unlimited().guest(1),
        )
    }

    /// One grant's share of the cache's guest budget, taken as a ring takes it before
    /// mapping.
    fn share(c: &PersistentGrantCache<u32>) -> MapShare {
        c.budget.try_take(MapCost::grants(1)).expect("budget room")
    }

    /// Adds `gref` (mapped as `m`) with a share of its own.
    fn add(
        c: &mut PersistentGrantCache<u32>,
        gref: u32,
        m: u32,
        t: Instant,
    ) -> Result<Lease<u32>, (AddRejected, u32)> {
        let s = share(c);
        c.add(gref, m, s, t).map_err(|r| (r.reason, r.mapping))
    }

    /// The mappings of removed grants (dropping them gives their shares back).
    fn maps(removed: Vec<Arc<KeptGrant<u32>>>) -> Vec<u32> {
        maps_of(&removed)
    }

    fn maps_of(removed: &[Arc<KeptGrant<u32>>]) -> Vec<u32> {
        removed.iter().map(|k| *k.mapping()).collect()
    }

    /// Fills the cache with grefs 0..n, all returned (inactive) at `t`.
    fn fill(c: &mut PersistentGrantCache<u32>, n: u32, t: Instant) {
        for g in 0..n {
            let lease = add(c, g, g, t).unwrap();
            c.put(lease, t);
        }
    }

    fn got(c: &mut PersistentGrantCache<u32>, gref: u32) -> Option<u32> {
        c.get(gref).map(|l| *l.mapping())
    }

    #[test]
    fn get_marks_active_and_refuses_a_second_user() {
        let t = Instant::now();
        let mut c = cache(10, 60);
        assert!(c.get(7).is_none());
        let lease = add(&mut c, 7, 70, t).unwrap();
        assert_eq!(*lease.mapping(), 70);
        assert_eq!(c.in_use(), 1);
        assert!(c.get(7).is_none(), "already active");
        c.put(lease, t);
        assert_eq!(c.in_use(), 0);
        let lease = c.get(7).unwrap();
        assert_eq!(*lease.mapping(), 70);
        assert_eq!(c.in_use(), 1);
    }

    #[test]
    fn peek_reads_an_entry_without_taking_it() {
        let t = Instant::now();
        let mut c = cache(4, 1);
        assert_eq!(c.peek(5), None);
        assert!(!c.is_active(5));
        let lease = add(&mut c, 5, 50, t).unwrap();
        assert!(c.is_active(5));
        // Taken by one request, read by another (an indirect page that is also a data
        // page in flight): neither takes it twice nor frees it.
        assert_eq!(c.peek(5), Some(&50));
        assert_eq!(c.in_use(), 1);
        c.put(lease, t);
        assert!(!c.is_active(5));
        assert_eq!(c.peek(5), Some(&50));
        assert_eq!(c.in_use(), 0);
        // Peeking is no use: last used at `t`, it expires a second later.
        assert_eq!(maps(c.purge(t + Duration::from_secs(1))), vec![50]);
    }

    #[test]
    fn a_dropped_lease_frees_its_grant_and_keeps_its_last_use() {
        let t = Instant::now();
        let mut c = cache(4, 1);
        fill(&mut c, 1, t);
        let lease = c.get(0).unwrap();
        assert!(c.is_active(0));
        drop(lease);
        assert_eq!(c.in_use(), 0);
        assert!(!c.is_active(0));
        assert_eq!(got(&mut c, 0), Some(0), "back in the cache, free to take");
        // Mapped 50 at gref 5 for the purge check below.
        let lease = add(&mut c, 5, 50, t).unwrap();
        c.put(lease, t);
        drop(c.get(5).unwrap());
        assert_eq!(c.in_use(), 0);
        // Still last used at `t`: expired a second later, as if never taken again.
        assert_eq!(maps(c.purge(t + Duration::from_secs(1))), vec![0, 50]);
    }

    #[test]
    fn a_leased_grant_outlives_a_purge_and_the_cache() {
        let t = Instant::now();
        let budget = MapBudget::new(MapCost::grants(4));
        let (mut c, _) = budget_cache(4, &budget.guest(1));
        fill(&mut c, 2, t);
        let lease = c.get(1).unwrap();
        // Everything inactive expires; the leased grant stays.
        assert_eq!(maps(c.purge(t + Duration::from_secs(3600))), vec![0]);
        assert_eq!(c.len(), 1);
        // Teardown drops the cache under a request in flight: the lease keeps the
        // mapping and its share until the request lets go.
        drop(c);
        assert_eq!(*lease.mapping(), 1);
        assert_eq!(budget.usage().grants, 1);
        drop(lease);
        assert_eq!(budget.usage().grants, 0);
        assert_eq!(budget.usage().held, MapCost::ZERO);
    }

    #[test]
    fn add_beyond_limit_sets_overflow_and_hands_mapping_back() {
        let t = Instant::now();
        let mut c = cache(2, 60);
        fill(&mut c, 2, t);
        assert!(!c.overflowed());
        assert_eq!(add(&mut c, 9, 90, t).unwrap_err(), (AddRejected::Full, 90));
        assert!(c.overflowed());
        assert_eq!(add(&mut c, 1, 10, t).unwrap_err().0, AddRejected::Full);
    }

    #[test]
    fn duplicate_add_is_rejected() {
        let t = Instant::now();
        let mut c = cache(4, 60);
        let _lease = add(&mut c, 3, 30, t).unwrap();
        assert_eq!(
            add(&mut c, 3, 31, t).unwrap_err(),
            (AddRejected::Duplicate, 31)
        );
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
        assert!(add(&mut c, 5000, 0, t0).is_err());
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
            let lease = c.get(g).unwrap();
            c.put(lease, t1);
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
        let mut leases: Vec<_> = (0..100).map(|g| c.get(g).unwrap()).collect();
        c.note_overflow();
        assert!(c.purge(t0 + Duration::from_secs(3600)).is_empty());
        assert_eq!(c.in_use(), 100);
        // Half come back: the target (5) is met from the inactive ones, timed-out first.
        for lease in leases.drain(50..) {
            c.put(lease, t0 + Duration::from_secs(3600));
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
        let budget = MapBudget::unlimited().guest(1);
        let mut a: PersistentGrantCache<u32> =
            PersistentGrantCache::new(limits, flag.clone(), budget.clone());
        let mut b: PersistentGrantCache<u32> = PersistentGrantCache::new(limits, flag, budget);
        fill(&mut a, 100, t0);
        fill(&mut b, 100, t0);
        assert!(add(&mut a, 1000, 0, t0).is_err());
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

    /// A cache of VBD-wide flag `flag` drawing on `budget` (a guest's).
    fn budget_cache(
        max: usize,
        budget: &GuestBudget,
    ) -> (PersistentGrantCache<u32>, Arc<AtomicBool>) {
        let flag = Arc::new(AtomicBool::new(false));
        let c = PersistentGrantCache::new(limits(max), flag.clone(), budget.clone());
        (c, flag)
    }

    /// Keeps `gref` as a ring does: shares first (`None`: no room, nothing mapped),
    /// then the add.
    fn keep(c: &mut PersistentGrantCache<u32>, gref: u32, t: Instant) -> Option<u32> {
        let mut shares = c.reserve(1)?;
        let one = shares.split_grant().unwrap();
        c.add(gref, gref * 10, one, t).ok().map(|l| *l.mapping())
    }

    #[test]
    fn two_rings_of_a_guest_share_its_tiny_budget() {
        let t0 = Instant::now();
        let budget = MapBudget::new(MapCost::grants(3));
        let guest = budget.guest(1);
        let (mut a, a_flag) = budget_cache(10, &guest);
        let (mut b, b_flag) = budget_cache(10, &guest);
        fill(&mut a, 2, t0);
        assert_eq!(keep(&mut b, 10, t0), Some(100));
        assert_eq!(budget.usage().grants, 3);
        // The budget is spent although both caches have room of their own: nothing to
        // map for keeping, overflow raised on b's VBD only.
        assert_eq!(keep(&mut b, 11, t0), None);
        assert!(b_flag.load(Ordering::Relaxed));
        assert!(!a_flag.load(Ordering::Relaxed));
        assert_eq!(b.budget_refusals(), 1);
        assert_eq!(a.free_entries(), 8);
        assert!(a.reserve(5).is_none(), "no budget left");
        assert_eq!(a.budget_refusals(), 5);
        assert_eq!(guest.refusals(), 2);
        assert_eq!(budget.usage().grants, 3, "refusals take nothing");
        // a's purge sheds a grant (below its own limit) because its guest was refused.
        let removed = a.purge(t0);
        assert_eq!(maps_of(&removed), vec![0]);
        // Not given back while the mapping is alive: the purged grant is still mapped.
        assert_eq!(guest.available(), MapCost::ZERO);
        drop(removed);
        assert_eq!(guest.available(), MapCost::grants(1));
        let two = b.reserve(5).unwrap();
        assert_eq!(
            two.cost(),
            MapCost::grants(1),
            "only what there is room for"
        );
        drop(two);
        assert_eq!(keep(&mut b, 11, t0), Some(110));
        assert_eq!(keep(&mut b, 12, t0), None);
        drop((a, b));
        assert_eq!(
            budget.usage().grants,
            0,
            "dropped caches give everything back"
        );
        assert_eq!(guest.available(), MapCost::grants(3));
    }

    #[test]
    fn a_refused_add_hands_the_share_back_with_the_mapping() {
        let t0 = Instant::now();
        let budget = MapBudget::new(MapCost::grants(8));
        let guest = budget.guest(1);
        let (mut c, _) = budget_cache(1, &guest);
        assert_eq!(keep(&mut c, 1, t0), Some(10));
        let extra = guest.try_take(MapCost::grants(1)).unwrap();
        let r = c.add(2, 20, extra, t0).unwrap_err();
        assert_eq!((r.reason, r.mapping), (AddRejected::Full, 20));
        // Still counted: the caller uses the mapping for its request, then drops both.
        assert_eq!(budget.usage().held, MapCost::grants(2));
        assert_eq!(budget.usage().grants, 1, "not a kept grant");
        drop(r.share);
        assert_eq!(budget.usage().held, MapCost::grants(1));
    }

    #[test]
    fn every_way_out_of_the_cache_gives_the_share_back() {
        let t0 = Instant::now();
        let budget = MapBudget::new(MapCost::grants(100));
        let (mut c, _) = budget_cache(100, &budget.guest(1));
        fill(&mut c, 40, t0);
        assert_eq!(budget.usage().grants, 40);
        // Timed out.
        for g in 0..10 {
            let lease = c.get(g).unwrap();
            c.put(lease, t0 + Duration::from_secs(30));
        }
        drop(c.purge(t0 + Duration::from_secs(61)));
        assert_eq!(budget.usage().grants, 10);
        // Refused adds and duplicates keep nothing.
        assert!(add(&mut c, 3, 3, t0).is_err());
        assert_eq!(budget.usage().grants, 10);
        assert_eq!(budget.usage().held, MapCost::grants(10));
        // Drained at teardown.
        let drained = c.drain();
        assert_eq!(drained.len(), 10);
        assert_eq!(budget.usage().grants, 10, "still mapped");
        drop(drained);
        assert_eq!(budget.usage().grants, 0);
        // Dropped whole, with grants still active (a ring dropped mid-request).
        fill(&mut c, 5, t0);
        let lease = c.get(0).unwrap();
        drop(c);
        assert_eq!(budget.usage().grants, 1, "the leased grant is still mapped");
        drop(lease);
        assert_eq!(budget.usage().grants, 0);
        assert_eq!(budget.usage().held, MapCost::ZERO);
    }

    #[test]
    fn budget_pressure_sheds_five_percent_per_purge_and_stops_when_it_ends() {
        let t0 = Instant::now();
        let budget = MapBudget::new(MapCost::grants(200));
        let guest = budget.guest(1);
        let (mut holder, _) = budget_cache(1056, &guest);
        let (mut starved, _) = budget_cache(1056, &guest);
        fill(&mut holder, 200, t0);
        // Below its own limit, without overflow: blkback's arithmetic frees nothing.
        assert!(holder.purge(t0).is_empty());
        assert!(starved.reserve(8).is_none());
        // The refusal moves the guest's count: (1056 / 100) * 5 = 50 inactive grants go,
        // in grant-reference order; the active ones stay.
        let _leases: Vec<_> = (0..10).map(|g| holder.get(g).unwrap()).collect();
        assert_eq!(maps(holder.purge(t0)), (10..60).collect::<Vec<_>>());
        // No refusal since: nothing more.
        assert!(holder.purge(t0).is_empty());
        assert_eq!(starved.reserve(8).unwrap().cost(), MapCost::grants(8));
        // Ring reserves beyond the budget shed grants on every purge while they last.
        let reserve = budget.reserve(MapCost::grants(100));
        assert!(budget.over_committed());
        assert_eq!(holder.purge(t0).len(), 50);
        assert_eq!(holder.len(), 100);
        drop(reserve);
        assert!(holder.purge(t0).is_empty());
    }

    #[test]
    fn another_guests_refusals_do_not_shrink_this_guests_cache() {
        let t0 = Instant::now();
        let budget = MapBudget::new(MapCost::grants(200));
        let (good, hostile) = (budget.guest(1), budget.guest(2));
        let (mut kept, _) = budget_cache(1056, &good);
        let (mut greedy, _) = budget_cache(1056, &hostile);
        fill(&mut kept, 100, t0);
        // The hostile guest takes its share, then is refused over and over.
        for g in 0..100 {
            assert!(keep(&mut greedy, g, t0).is_some());
        }
        for g in 100..200 {
            assert!(keep(&mut greedy, g, t0).is_none());
        }
        assert!(hostile.refusals() > 0);
        assert!(
            kept.purge(t0).is_empty(),
            "the well-behaved guest keeps its grants"
        );
        assert_eq!(kept.len(), 100);
    }

    #[test]
    fn a_guest_over_its_share_sheds_the_excess_at_once() {
        let t0 = Instant::now();
        let budget = MapBudget::new(MapCost::grants(200));
        let first = budget.guest(1);
        let (mut c, _) = budget_cache(1056, &first);
        fill(&mut c, 180, t0);
        // A second guest: the first's share halves to 100, 80 over it.
        let second = budget.guest(2);
        assert_eq!(first.excess(), MapCost::grants(80));
        assert_eq!(second.available(), MapCost::grants(20));
        assert_eq!(c.purge(t0).len(), 80);
        assert_eq!(first.excess(), MapCost::ZERO);
        assert_eq!(second.available(), MapCost::grants(100));
        // Within its share again: nothing more goes.
        assert!(c.purge(t0).is_empty());
    }

    #[test]
    fn a_ring_keeps_what_its_frontend_can_have_in_flight() {
        let sized = PersistentGrantLimits::default();
        assert_eq!(sized.max_grants, SIZED_TO_RING);
        // 32 slots of 256-segment requests and their indirect page: Linux blkfront's pool.
        assert_eq!(sized.for_ring(32, 256).max_grants, 32 * 257);
        assert_eq!(sized.for_ring(32, 512).max_grants, 32 * 513);
        assert_eq!(sized.for_ring(32, 513).max_grants, 32 * (513 + 2));
        // Small rings and direct requests only: never fewer than blkback keeps.
        assert_eq!(
            sized.for_ring(32, 0).max_grants,
            BLKBACK_MAX_PERSISTENT_GRANTS
        );
        assert_eq!(
            sized.for_ring(32, 11).max_grants,
            BLKBACK_MAX_PERSISTENT_GRANTS
        );
        assert_eq!(sized.for_ring(256, 0).max_grants, 256 * 11);
        // A fixed limit (blkback's module parameter) is kept as it is.
        let fixed = PersistentGrantLimits {
            max_grants: 4,
            ..sized
        };
        assert_eq!(fixed.for_ring(512, 4096), fixed);
        // The largest the inputs can be, and beyond: no overflow.
        assert_eq!(sized.for_ring(512, 4096).max_grants, 512 * (4096 + 8));
        assert_eq!(
            sized.for_ring(u32::MAX, u32::MAX).max_grants,
            (u32::MAX as usize).saturating_mul(u32::MAX as usize + 8_388_608)
        );
    }

    #[test]
    fn a_hostile_frontend_on_the_largest_ring_keeps_no_more_than_its_share() {
        let t0 = Instant::now();
        let budget = MapBudget::new(MapCost::grants(1000));
        let (good, hostile) = (budget.guest(1), budget.guest(2));
        let big = PersistentGrantLimits::default().for_ring(512, 4096);
        let flag = Arc::new(AtomicBool::new(false));
        // Sixteen rings of the largest size, each with room for two million grants by its
        // own limit, cycling through fresh grant references.
        let mut rings: Vec<PersistentGrantCache<u32>> = (0..16)
            .map(|_| PersistentGrantCache::new(big, flag.clone(), hostile.clone()))
            .collect();
        let mut kept = 0;
        for (r, ring) in (0u32..).zip(rings.iter_mut()) {
            for g in 0..200 {
                kept += usize::from(keep(ring, r * 200 + g, t0).is_some());
            }
        }
        assert_eq!(kept, 500, "half of the budget: two guests");
        assert_eq!(rings.iter().map(|c| c.len()).sum::<usize>(), 500);
        assert_eq!(hostile.usage().held, MapCost::grants(500));
        // The other guest still gets its whole share.
        let (mut honest, _) = budget_cache(big.max_grants, &good);
        for g in 0..500 {
            assert!(keep(&mut honest, g, t0).is_some());
        }
        assert!(keep(&mut honest, 500, t0).is_none());
        assert_eq!(budget.usage().grants, 1000);
    }
}
