//! The daemon-wide budget of persistently mapped grants.
//!
//! Every persistent grant is a mapping of its own (one `mmap`, so one VMA), so that the
//! purge can unmap it alone. Linux caps the VMAs of a process at `vm.max_map_count`
//! (65530 by default); past it every `mmap` of the process fails with ENOMEM: the grant
//! maps of requests, io_uring rings, thread stacks, anything. With blkback's 1056 grants
//! per ring, about 30 busy two-queue devices would get there, and from then on every
//! other device fails too. Kernel blkback has no such limit, so neither may we.
//!
//! Hence one [`PersistentGrantBudget`] per engine, shared by the persistent-grant cache
//! of every ring. A cache takes a [`GrantShare`] for each grant it keeps and the share
//! goes back when the entry is dropped, whichever way (purge, ring teardown, a cache
//! dropped whole): the share lives inside the entry, after the mapping, so it is returned
//! only once the grant is unmapped. A grant the budget refuses is used for its request
//! only, exactly like one that does not fit a full cache.
//!
//! Sizing ([`BudgetSize::FromMapCount`]): `vm.max_map_count` minus a fixed reserve for
//! what every process maps (binary, libraries, heap arenas, thread stacks: an idle
//! `xenblkd serve` holds about 85 VMAs, see [`BASE_MAP_RESERVE`]), and each attached ring
//! reserves what it maps besides persistent grants ([`ring_map_reserve`]): its ring
//! pages, its io_uring, its bounce pool and, in map mode, one batch mapping per request
//! in flight. The persistent grants get the rest. Rings attached beyond what the limit
//! holds push the budget over: no new persistent grant is admitted, and the purge sheds
//! existing ones (see [`PersistentGrantCache::purge`]) until the rings' reserves fit.
//!
//! Everything here is atomics: a cache touches the budget only when it adds a grant (a
//! map miss, which costs an `mmap` and an ioctl anyway) or drops one; a cache hit does not.
//!
//! [`PersistentGrantCache::purge`]: crate::persistent_grants::PersistentGrantCache::purge

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Linux's default `vm.max_map_count` (`DEFAULT_MAX_MAP_COUNT`), used when
/// `/proc/sys/vm/max_map_count` cannot be read.
pub const DEFAULT_MAX_MAP_COUNT: usize = 65530;

/// VMAs kept back for what the process maps whatever it serves: the binary and its
/// libraries, heap, the main and control threads' stacks, the xenstore connection.
/// Measured: an idle `xenblkd serve` (2 reactors, 9 threads) holds 83 VMAs, an in-process
/// `xenblkd bench` 53 to 74 besides its grant maps and io_urings; this leaves ten times that.
pub const BASE_MAP_RESERVE: usize = 1024;

/// VMAs kept back per reactor thread: its stack and guard page (2), its malloc arena
/// (heap and guard, 2), with as much again to spare.
pub const MAPS_PER_REACTOR: usize = 8;

/// VMAs a ring maps besides persistent grants and per-request batches: the ring pages
/// (1), the storage queue's io_uring (SQ/CQ ring and SQE array: 2, or 3 on kernels
/// without IORING_FEAT_SINGLE_MMAP), the bounce pool (1), an indirect descriptor page
/// mapped while it is parsed (1).
pub const RING_FIXED_MAPS: usize = 6;

/// How big the persistent-grant budget of an engine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BudgetSize {
    /// From this process's `vm.max_map_count`, less [`BASE_MAP_RESERVE`], less
    /// [`MAPS_PER_REACTOR`] per reactor; each ring reserves its own mappings on attach.
    #[default]
    FromMapCount,
    /// At most this many persistent grants in total, whatever the process limit, and no
    /// per-ring reserve (tests, or an operator who knows better).
    Grants(usize),
}

/// VMAs a ring reserves on attach: [`RING_FIXED_MAPS`], plus in map mode one batch
/// mapping per request in flight (`slots` requests of up to `max_segments` grants, one
/// mapping per [`platform::MAX_MAP_BATCH`] of them). Copy and map-or-copy rings map no
/// request data outside the cache.
pub fn ring_map_reserve(slots: usize, max_segments: usize, maps_request_data: bool) -> usize {
    let per_request = if maps_request_data {
        max_segments.max(1).div_ceil(platform::MAX_MAP_BATCH)
    } else {
        0
    };
    RING_FIXED_MAPS + slots * per_request
}

/// `/proc/sys/vm/max_map_count`.
pub fn read_max_map_count() -> std::io::Result<usize> {
    let text = std::fs::read_to_string("/proc/sys/vm/max_map_count")?;
    text.trim()
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[derive(Debug)]
struct Inner {
    /// Most persistent grants plus ring reserves.
    capacity: usize,
    /// Persistent grants held plus ring reserves. Raised by a grant only while it stays
    /// within `capacity`; ring reserves may push it over.
    committed: AtomicUsize,
    /// Persistent grants held.
    grants: AtomicUsize,
    /// Maps reserved by attached rings.
    reserved: AtomicUsize,
    /// Grants refused, ever.
    refusals: AtomicU64,
    /// The first refusal was logged.
    warned: AtomicBool,
}

impl Inner {
    fn release(&self, n: usize) {
        self.committed.fetch_sub(n, Ordering::Relaxed);
    }
}

/// Usage of a budget, as of now (each number read on its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BudgetUsage {
    /// Persistent grants plus ring reserves the budget admits.
    pub capacity: usize,
    /// Maps reserved by attached rings.
    pub reserved: usize,
    /// Persistent grants held by every ring.
    pub grants: usize,
    /// Persistent grants refused since the engine started.
    pub refusals: u64,
}

impl BudgetUsage {
    /// Most persistent grants with the rings attached now.
    pub fn limit(&self) -> usize {
        self.capacity.saturating_sub(self.reserved)
    }
}

/// The daemon-wide budget of persistent grants; clones share it.
#[derive(Debug, Clone)]
pub struct PersistentGrantBudget {
    inner: Arc<Inner>,
}

impl PersistentGrantBudget {
    /// A budget of `capacity` persistent grants plus ring reserves.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                capacity,
                committed: AtomicUsize::new(0),
                grants: AtomicUsize::new(0),
                reserved: AtomicUsize::new(0),
                refusals: AtomicU64::new(0),
                warned: AtomicBool::new(false),
            }),
        }
    }

    /// No limit beyond each cache's own.
    pub fn unlimited() -> Self {
        Self::new(usize::MAX)
    }

    /// The budget left by a process limit of `max_map_count` VMAs for `reactors` threads.
    pub fn from_max_map_count(max_map_count: usize, reactors: usize) -> Self {
        let reserve = BASE_MAP_RESERVE + MAPS_PER_REACTOR * reactors;
        Self::new(max_map_count.saturating_sub(reserve))
    }

    /// Sized as `size` says, for an engine of `reactors` threads.
    pub fn sized(size: BudgetSize, reactors: usize) -> Self {
        match size {
            BudgetSize::Grants(n) => Self::new(n),
            BudgetSize::FromMapCount => {
                let max_map_count = read_max_map_count().unwrap_or_else(|e| {
                    tracing::warn!(error = %e, assumed = DEFAULT_MAX_MAP_COUNT, "cannot read vm.max_map_count");
                    DEFAULT_MAX_MAP_COUNT
                });
                let budget = Self::from_max_map_count(max_map_count, reactors);
                tracing::info!(
                    max_map_count,
                    capacity = budget.inner.capacity,
                    "persistent-grant budget"
                );
                budget
            }
        }
    }

    /// Takes one grant's share; `None` (counted as a refusal) when the budget is spent.
    pub fn try_take(&self) -> Option<GrantShare> {
        let inner = &self.inner;
        let mut committed = inner.committed.load(Ordering::Relaxed);
        loop {
            if committed >= inner.capacity {
                self.note_refused(1);
                return None;
            }
            match inner.committed.compare_exchange_weak(
                committed,
                committed + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => committed = now,
            }
        }
        inner.grants.fetch_add(1, Ordering::Relaxed);
        Some(GrantShare {
            inner: inner.clone(),
        })
    }

    /// Grants that could be taken now (another ring may take them first).
    pub fn available(&self) -> usize {
        self.inner
            .capacity
            .saturating_sub(self.inner.committed.load(Ordering::Relaxed))
    }

    /// Counts `n` grants a cache did not even try to take because the budget had no
    /// room for them.
    pub fn note_refused(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.inner.refusals.fetch_add(n as u64, Ordering::Relaxed);
        if !self.inner.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                capacity = self.inner.capacity,
                "persistent-grant budget exhausted: further grants are mapped per request \
                 and caches shrink (raise vm.max_map_count to keep more)"
            );
        }
    }

    /// Grants refused since the budget was made: a cache that sees this move knows
    /// another ring wants grants it holds.
    pub fn refusals(&self) -> u64 {
        self.inner.refusals.load(Ordering::Relaxed)
    }

    /// Ring reserves and grants exceed the capacity: caches must shed grants.
    pub fn over_committed(&self) -> bool {
        self.inner.committed.load(Ordering::Relaxed) > self.inner.capacity
    }

    /// Reserves `maps` VMAs for a ring's own mappings until the reservation is dropped.
    /// Never refused: a ring is attached whatever the budget says, and persistent grants
    /// make way for it.
    pub fn reserve(&self, maps: usize) -> MapReservation {
        self.inner.reserved.fetch_add(maps, Ordering::Relaxed);
        self.inner.committed.fetch_add(maps, Ordering::Relaxed);
        MapReservation {
            inner: self.inner.clone(),
            maps,
        }
    }

    pub fn usage(&self) -> BudgetUsage {
        let inner = &self.inner;
        BudgetUsage {
            capacity: inner.capacity,
            reserved: inner.reserved.load(Ordering::Relaxed),
            grants: inner.grants.load(Ordering::Relaxed),
            refusals: inner.refusals.load(Ordering::Relaxed),
        }
    }
}

/// One persistent grant's share of the budget, given back on drop.
#[derive(Debug)]
#[must_use = "dropping the share gives it back at once"]
pub struct GrantShare {
    inner: Arc<Inner>,
}

impl Drop for GrantShare {
    fn drop(&mut self) {
        self.inner.grants.fetch_sub(1, Ordering::Relaxed);
        self.inner.release(1);
    }
}

/// A ring's reserve of maps, given back on drop.
#[derive(Debug)]
#[must_use = "dropping the reservation gives it back at once"]
pub struct MapReservation {
    inner: Arc<Inner>,
    maps: usize,
}

impl MapReservation {
    pub fn maps(&self) -> usize {
        self.maps
    }
}

impl Drop for MapReservation {
    fn drop(&mut self) {
        self.inner.reserved.fetch_sub(self.maps, Ordering::Relaxed);
        self.inner.release(self.maps);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_refused_at_capacity_and_come_back_on_drop() {
        let b = PersistentGrantBudget::new(2);
        let x = b.try_take().unwrap();
        let y = b.try_take().unwrap();
        assert_eq!(b.available(), 0);
        assert!(b.try_take().is_none());
        assert_eq!(b.refusals(), 1);
        assert_eq!(b.usage().grants, 2);
        drop(x);
        assert_eq!(b.available(), 1);
        let z = b.clone().try_take().unwrap();
        drop((y, z));
        assert_eq!(
            b.usage(),
            BudgetUsage {
                capacity: 2,
                reserved: 0,
                grants: 0,
                refusals: 1
            }
        );
    }

    #[test]
    fn ring_reserves_shrink_the_limit_and_may_overcommit() {
        let b = PersistentGrantBudget::new(10);
        let share = b.try_take().unwrap();
        let r = b.reserve(6);
        assert_eq!(b.usage().limit(), 4);
        assert_eq!(b.available(), 3);
        let r2 = b.reserve(6);
        assert!(b.over_committed());
        assert!(b.try_take().is_none());
        drop(r2);
        assert!(!b.over_committed());
        drop((r, share));
        assert_eq!(b.available(), 10);
        assert_eq!(b.usage().reserved, 0);
    }

    #[test]
    fn sized_from_the_map_count_leaves_the_reserve() {
        let b = PersistentGrantBudget::from_max_map_count(DEFAULT_MAX_MAP_COUNT, 4);
        assert_eq!(
            b.usage().capacity,
            DEFAULT_MAX_MAP_COUNT - BASE_MAP_RESERVE - 4 * MAPS_PER_REACTOR
        );
        assert_eq!(
            PersistentGrantBudget::from_max_map_count(100, 1)
                .usage()
                .capacity,
            0
        );
        assert_eq!(
            PersistentGrantBudget::sized(BudgetSize::Grants(7), 2)
                .usage()
                .capacity,
            7
        );
        // This machine's limit is readable and above the reserve.
        assert!(read_max_map_count().unwrap() > BASE_MAP_RESERVE);
        // An order-0 ring (32 slots) in map mode with 256 indirect segments, and the same
        // ring copying.
        assert_eq!(ring_map_reserve(32, 256, true), RING_FIXED_MAPS + 32);
        assert_eq!(ring_map_reserve(32, 4096, true), RING_FIXED_MAPS + 32 * 4);
        assert_eq!(ring_map_reserve(32, 256, false), RING_FIXED_MAPS);
    }

    #[test]
    fn concurrent_takers_never_exceed_the_capacity() {
        let b = PersistentGrantBudget::new(16);
        let peak = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    let mut held = Vec::new();
                    for i in 0..20_000 {
                        if let Some(share) = b.try_take() {
                            held.push(share);
                        }
                        peak.fetch_max(b.usage().grants, Ordering::Relaxed);
                        if i % 3 == 0 {
                            held.pop();
                        }
                    }
                });
            }
        });
        assert!(peak.load(Ordering::Relaxed) <= 16);
        assert_eq!(b.usage().grants, 0);
        assert_eq!(b.available(), 16);
        assert!(b.refusals() > 0);
    }
}
