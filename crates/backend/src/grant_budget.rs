//! The daemon-wide budget of grant mappings, and every guest's bounded share of it.
//!
//! Two things a grant mapping consumes are limited for the whole daemon, and whatever one
//! guest holds of them another cannot have:
//!
//! * **VMAs.** Linux caps the VMAs of a process at `vm.max_map_count` (65530 by default);
//!   past it every `mmap` of the process fails with ENOMEM: grant maps of every ring,
//!   io_uring rings, thread stacks. What a mapping costs depends on the platform
//!   ([`platform::GrantMapper::max_vmas`], [`platform::GrantMapping::vmas`]): on gntdev one
//!   `IOCTL_GNTDEV_MAP_GRANT_REF` and one `mmap` of the batch, one VMA whatever its size;
//!   in the simulator one per run of consecutive guest frames, so a request whose pages
//!   are scattered costs one per page. A persistent grant is one VMA on both (it is
//!   mapped alone so that the purge can unmap it alone).
//! * **Mapped pages.** On Xen every mapped grant page takes an entry of dom0's
//!   map-tracking table (`gnttab_max_maptrack_frames`, 1024 frames of 256 entries by
//!   default in Xen 4.17), shared with dom0's kernel backends; past it maps fail. A
//!   daemon that maps a 256-page request with one VMA is bounded by this, not by VMAs.
//!
//! Hence one [`MapBudget`] per engine, sized from the process limit ([`BudgetSize`]) and
//! a page limit ([`MapLimits::max_mapped_pages`]), and one [`GuestBudget`] per guest
//! domain, shared by all its rings and VBDs. Everything a ring maps is taken from its
//! guest's budget *before* it is mapped ([`MapShare`]): persistent grants (kept in the
//! cache entry, after the mapping, so given back only once the grant is unmapped),
//! per-request batches and indirect descriptor pages (kept in the request until it
//! completes; the part of the worst case a mapping did not take is given back at once).
//! A ring's fixed mappings (its ring pages, io_uring, bounce pool) are reserved on attach
//! ([`MapBudget::reserve`]); they are bounded by the toolstack's configuration, not by
//! the guest.
//!
//! **Per guest.** A guest may hold at most an equal share of what the ring reserves
//! leave: `(capacity - reserved) / guests` of each resource, `guests` being the domains
//! with a ring attached now. Per domain, not per VBD or ring: the guest chooses how many
//! rings it opens (up to the advertised queues), so a share per ring would let it
//! multiply its share, and all the VBDs of one domain are one trust domain. A share per
//! VBD would favour the domain with the most disks, which is the toolstack's doing, not
//! the guest's, but it is still no reason for that domain's guest to starve another.
//! Within its share a guest always finds room once every guest is within its own (the
//! shares add up to the capacity); after a guest attaches the others may hold more than
//! their new share for a moment: their persistent grants are shed by the next purge
//! (see [`crate::persistent_grants`]) and their request mappings end with the requests.
//!
//! A take the budget refuses is never an error for the guest: a grant that cannot be
//! kept is used for its request only, a request whose mapping cannot be had is served by
//! grant copy through the ring's bounce pages ([`crate::ring`]), which costs neither a
//! VMA nor a map-tracking entry.
//!
//! Everything here is atomics, touched only when something is mapped or unmapped (which
//! costs a system call anyway); a persistent-grant cache hit does not touch it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use platform::DomId;

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

/// VMAs a ring maps besides its ring pages and the grants it maps for requests: the
/// storage queue's io_uring (SQ/CQ ring and SQE array: 2, or 3 on kernels without
/// IORING_FEAT_SINGLE_MMAP) and the bounce pool (1).
pub const RING_FIXED_MAPS: usize = 4;

/// Grant pages the daemon maps at most at once, by default: half of what Xen 4.17 lets
/// dom0 map (`gnttab_max_maptrack_frames` 1024 x 256 entries), the other half left to
/// dom0's kernel backends (netback, blkback).
pub const DEFAULT_MAX_MAPPED_PAGES: usize = 131_072;

/// What a mapping costs: VMAs in this process and grant pages mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MapCost {
    pub vmas: usize,
    pub pages: usize,
}

impl MapCost {
    pub const ZERO: MapCost = MapCost { vmas: 0, pages: 0 };

    pub fn new(vmas: usize, pages: usize) -> Self {
        Self { vmas, pages }
    }

    /// `n` persistent grants: one VMA and one page each.
    pub fn grants(n: usize) -> Self {
        Self { vmas: n, pages: n }
    }

    fn fits_in(self, other: MapCost) -> bool {
        self.vmas <= other.vmas && self.pages <= other.pages
    }
}

/// How big the VMA side of an engine's budget is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BudgetSize {
    /// From this process's `vm.max_map_count`, less [`BASE_MAP_RESERVE`], less
    /// [`MAPS_PER_REACTOR`] per reactor; each ring reserves its own mappings on attach.
    #[default]
    FromMapCount,
    /// As [`BudgetSize::FromMapCount`] with this `vm.max_map_count` (tests that want
    /// the limit reached quickly, or an operator who knows better).
    MaxMapCount(usize),
    /// At most this many VMAs of grant mappings (persistent grants, request and indirect
    /// mappings) in total, whatever the process limit, and no per-ring reserve (tests of
    /// the persistent-grant cache).
    Vmas(usize),
}

/// Everything that sizes an engine's [`MapBudget`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapLimits {
    pub size: BudgetSize,
    /// Grant pages mapped at once by the whole daemon.
    pub max_mapped_pages: usize,
}

impl Default for MapLimits {
    fn default() -> Self {
        Self {
            size: BudgetSize::FromMapCount,
            max_mapped_pages: DEFAULT_MAX_MAPPED_PAGES,
        }
    }
}

/// What a ring reserves on attach: [`RING_FIXED_MAPS`] VMAs plus those of its ring
/// mapping (`ring_vmas`, what the platform says it took), and its `ring_pages`.
pub fn ring_map_reserve(ring_vmas: usize, ring_pages: usize) -> MapCost {
    MapCost::new(RING_FIXED_MAPS + ring_vmas, ring_pages)
}

/// `/proc/sys/vm/max_map_count`.
pub fn read_max_map_count() -> std::io::Result<usize> {
    let text = std::fs::read_to_string("/proc/sys/vm/max_map_count")?;
    text.trim()
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Adds `n` to `counter` if the sum stays within `limit`.
fn add_within(counter: &AtomicUsize, n: usize, limit: usize) -> bool {
    if n == 0 {
        return true;
    }
    let mut now = counter.load(Ordering::Relaxed);
    loop {
        match now.checked_add(n) {
            Some(sum) if sum <= limit => {}
            _ => return false,
        }
        match counter.compare_exchange_weak(now, now + n, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return true,
            Err(seen) => now = seen,
        }
    }
}

#[derive(Debug)]
struct Inner {
    capacity: MapCost,
    /// VMAs held by guests plus ring reserves. Raised by a guest only while it stays
    /// within the capacity; ring reserves may push it over.
    vmas: AtomicUsize,
    /// Pages, likewise.
    pages: AtomicUsize,
    reserved_vmas: AtomicUsize,
    reserved_pages: AtomicUsize,
    /// Persistent grants held by every guest.
    grants: AtomicUsize,
    /// Guests with a budget alive (a ring attached).
    guests: AtomicUsize,
    /// Takes refused, ever.
    refusals: AtomicU64,
    /// The first refusal was logged.
    warned: AtomicBool,
    registry: Mutex<HashMap<DomId, Weak<GuestInner>>>,
}

impl Inner {
    fn reserved(&self) -> MapCost {
        MapCost::new(
            self.reserved_vmas.load(Ordering::Relaxed),
            self.reserved_pages.load(Ordering::Relaxed),
        )
    }

    /// What the ring reserves leave.
    fn limit(&self) -> MapCost {
        let r = self.reserved();
        MapCost::new(
            self.capacity.vmas.saturating_sub(r.vmas),
            self.capacity.pages.saturating_sub(r.pages),
        )
    }

    /// Most one guest may hold now.
    fn share(&self) -> MapCost {
        let n = self.guests.load(Ordering::Relaxed).max(1);
        let l = self.limit();
        MapCost::new(l.vmas / n, l.pages / n)
    }

    fn take(&self, cost: MapCost) -> bool {
        if !add_within(&self.vmas, cost.vmas, self.capacity.vmas) {
            return false;
        }
        if !add_within(&self.pages, cost.pages, self.capacity.pages) {
            self.vmas.fetch_sub(cost.vmas, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn release(&self, cost: MapCost) {
        self.vmas.fetch_sub(cost.vmas, Ordering::Relaxed);
        self.pages.fetch_sub(cost.pages, Ordering::Relaxed);
    }

    fn refused(&self, domid: DomId) {
        self.refusals.fetch_add(1, Ordering::Relaxed);
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                domid,
                capacity = ?self.capacity,
                guests = self.guests.load(Ordering::Relaxed),
                share = ?self.share(),
                "a guest reached its share of the grant-mapping budget: what it cannot map \
                 is kept for its request only or grant-copied (raise vm.max_map_count to \
                 map more)"
            );
        }
    }
}

/// Usage of a budget, as of now (each number read on its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BudgetUsage {
    /// What the budget admits: ring reserves and guests' mappings.
    pub capacity: MapCost,
    /// Reserved by attached rings.
    pub reserved: MapCost,
    /// Held by guests' mappings (persistent grants, requests, indirect pages).
    pub held: MapCost,
    /// Persistent grants held by every ring.
    pub grants: usize,
    /// Guests with a ring attached.
    pub guests: usize,
    /// Takes refused since the engine started.
    pub refusals: u64,
}

impl BudgetUsage {
    /// Most VMAs the guests may map with the rings attached now: at most this many
    /// persistent grants.
    pub fn limit(&self) -> usize {
        self.capacity
            .vmas
            .saturating_sub(self.reserved.vmas)
            .min(self.capacity.pages.saturating_sub(self.reserved.pages))
    }

    /// Most one guest may hold now.
    pub fn share(&self) -> MapCost {
        let n = self.guests.max(1);
        MapCost::new(
            self.capacity.vmas.saturating_sub(self.reserved.vmas) / n,
            self.capacity.pages.saturating_sub(self.reserved.pages) / n,
        )
    }
}

/// The daemon-wide budget of grant mappings; clones share it.
#[derive(Debug, Clone)]
pub struct MapBudget {
    inner: Arc<Inner>,
}

impl MapBudget {
    /// A budget of `capacity` (ring reserves plus guests' mappings).
    pub fn new(capacity: MapCost) -> Self {
        Self {
            inner: Arc::new(Inner {
                capacity,
                vmas: AtomicUsize::new(0),
                pages: AtomicUsize::new(0),
                reserved_vmas: AtomicUsize::new(0),
                reserved_pages: AtomicUsize::new(0),
                grants: AtomicUsize::new(0),
                guests: AtomicUsize::new(0),
                refusals: AtomicU64::new(0),
                warned: AtomicBool::new(false),
                registry: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// No limit beyond each cache's own.
    pub fn unlimited() -> Self {
        Self::new(MapCost::new(usize::MAX, usize::MAX))
    }

    /// The VMA budget a process limit of `max_map_count` leaves with `reactors` threads.
    pub fn vmas_from_max_map_count(max_map_count: usize, reactors: usize) -> usize {
        let reserve = BASE_MAP_RESERVE + MAPS_PER_REACTOR * reactors;
        max_map_count.saturating_sub(reserve)
    }

    /// Sized as `limits` says, for an engine of `reactors` threads. Returns the budget and
    /// whether rings reserve their own mappings from it.
    pub fn sized(limits: MapLimits, reactors: usize) -> (Self, bool) {
        let (vmas, rings_reserve) = match limits.size {
            BudgetSize::Vmas(n) => (n, false),
            BudgetSize::MaxMapCount(n) => (Self::vmas_from_max_map_count(n, reactors), true),
            BudgetSize::FromMapCount => {
                let max_map_count = read_max_map_count().unwrap_or_else(|e| {
                    tracing::warn!(error = %e, assumed = DEFAULT_MAX_MAP_COUNT, "cannot read vm.max_map_count");
                    DEFAULT_MAX_MAP_COUNT
                });
                (Self::vmas_from_max_map_count(max_map_count, reactors), true)
            }
        };
        let capacity = MapCost::new(vmas, limits.max_mapped_pages);
        tracing::info!(?limits, ?capacity, "grant-mapping budget");
        (Self::new(capacity), rings_reserve)
    }

    /// The budget of guest `domid`, shared by all its rings: the one already alive, or a
    /// new one (the guest then counts in everyone's share until its last ring drops it).
    pub fn guest(&self, domid: DomId) -> GuestBudget {
        let mut registry = self
            .inner
            .registry
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(inner) = registry.get(&domid).and_then(Weak::upgrade) {
            return GuestBudget { inner };
        }
        self.inner.guests.fetch_add(1, Ordering::Relaxed);
        let inner = Arc::new(GuestInner {
            domid,
            budget: self.inner.clone(),
            vmas: AtomicUsize::new(0),
            pages: AtomicUsize::new(0),
            grants: AtomicUsize::new(0),
            refusals: AtomicU64::new(0),
        });
        registry.insert(domid, Arc::downgrade(&inner));
        GuestBudget { inner }
    }

    /// Takes refused since the budget was made.
    pub fn refusals(&self) -> u64 {
        self.inner.refusals.load(Ordering::Relaxed)
    }

    /// Ring reserves and mappings exceed the capacity: caches must shed grants.
    pub fn over_committed(&self) -> bool {
        self.inner.vmas.load(Ordering::Relaxed) > self.inner.capacity.vmas
            || self.inner.pages.load(Ordering::Relaxed) > self.inner.capacity.pages
    }

    /// Reserves `cost` for a ring's own mappings until the reservation is dropped. Never
    /// refused: a ring is attached whatever the budget says, and guests' mappings make way
    /// for it.
    pub fn reserve(&self, cost: MapCost) -> MapReservation {
        let inner = &self.inner;
        inner.reserved_vmas.fetch_add(cost.vmas, Ordering::Relaxed);
        inner
            .reserved_pages
            .fetch_add(cost.pages, Ordering::Relaxed);
        inner.vmas.fetch_add(cost.vmas, Ordering::Relaxed);
        inner.pages.fetch_add(cost.pages, Ordering::Relaxed);
        MapReservation {
            inner: inner.clone(),
            cost,
        }
    }

    pub fn usage(&self) -> BudgetUsage {
        let inner = &self.inner;
        let reserved = inner.reserved();
        BudgetUsage {
            capacity: inner.capacity,
            reserved,
            held: MapCost::new(
                inner
                    .vmas
                    .load(Ordering::Relaxed)
                    .saturating_sub(reserved.vmas),
                inner
                    .pages
                    .load(Ordering::Relaxed)
                    .saturating_sub(reserved.pages),
            ),
            grants: inner.grants.load(Ordering::Relaxed),
            guests: inner.guests.load(Ordering::Relaxed),
            refusals: inner.refusals.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug)]
struct GuestInner {
    domid: DomId,
    budget: Arc<Inner>,
    vmas: AtomicUsize,
    pages: AtomicUsize,
    grants: AtomicUsize,
    refusals: AtomicU64,
}

impl GuestInner {
    fn held(&self) -> MapCost {
        MapCost::new(
            self.vmas.load(Ordering::Relaxed),
            self.pages.load(Ordering::Relaxed),
        )
    }

    fn release(&self, cost: MapCost) {
        self.vmas.fetch_sub(cost.vmas, Ordering::Relaxed);
        self.pages.fetch_sub(cost.pages, Ordering::Relaxed);
        self.budget.release(cost);
    }
}

impl Drop for GuestInner {
    fn drop(&mut self) {
        let mut registry = self
            .budget
            .registry
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // A new budget for the same domain may have replaced this one's entry already.
        if registry
            .get(&self.domid)
            .is_some_and(|w| std::ptr::eq(w.as_ptr(), self))
        {
            registry.remove(&self.domid);
        }
        self.budget.guests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Usage of one guest's budget, as of now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestUsage {
    pub held: MapCost,
    /// Most it may hold now.
    pub share: MapCost,
    pub grants: usize,
    pub refusals: u64,
}

/// One guest's share of the [`MapBudget`]; clones (one per ring of the guest) share it.
#[derive(Debug, Clone)]
pub struct GuestBudget {
    inner: Arc<GuestInner>,
}

impl GuestBudget {
    pub fn domid(&self) -> DomId {
        self.inner.domid
    }

    /// Takes `cost` if it fits both the guest's share and the daemon-wide budget; `None`
    /// (counted as a refusal) when it does not.
    pub fn try_take(&self, cost: MapCost) -> Option<MapShare> {
        let g = &self.inner;
        let share = g.budget.share();
        let taken = if !add_within(&g.vmas, cost.vmas, share.vmas) {
            false
        } else if !add_within(&g.pages, cost.pages, share.pages) {
            g.vmas.fetch_sub(cost.vmas, Ordering::Relaxed);
            false
        } else if !g.budget.take(cost) {
            g.vmas.fetch_sub(cost.vmas, Ordering::Relaxed);
            g.pages.fetch_sub(cost.pages, Ordering::Relaxed);
            false
        } else {
            true
        };
        if !taken {
            self.note_refused();
            return None;
        }
        Some(MapShare {
            guest: g.clone(),
            cost,
            grant: false,
        })
    }

    /// What could be taken now (another ring may take it first).
    pub fn available(&self) -> MapCost {
        let g = &self.inner;
        let share = g.budget.share();
        let held = g.held();
        let b = &g.budget;
        MapCost::new(
            share.vmas.saturating_sub(held.vmas).min(
                b.capacity
                    .vmas
                    .saturating_sub(b.vmas.load(Ordering::Relaxed)),
            ),
            share.pages.saturating_sub(held.pages).min(
                b.capacity
                    .pages
                    .saturating_sub(b.pages.load(Ordering::Relaxed)),
            ),
        )
    }

    /// Takes as many of `wanted` persistent grants' shares as there is room for (one VMA
    /// and one page each). `None` when there is room for none; the refused ones are
    /// counted by the caller.
    pub fn try_take_grants(&self, wanted: usize) -> Option<MapShare> {
        // Another ring of the guest or another guest may take between the look and the
        // take: a few tries, then give up (the grants are used for their request only).
        for _ in 0..4 {
            let room = self.available();
            let n = wanted.min(room.vmas).min(room.pages);
            if n == 0 {
                return None;
            }
            let g = &self.inner;
            let cost = MapCost::grants(n);
            let share = g.budget.share();
            if add_within(&g.vmas, n, share.vmas) {
                if add_within(&g.pages, n, share.pages) {
                    if g.budget.take(cost) {
                        return Some(MapShare {
                            guest: g.clone(),
                            cost,
                            grant: false,
                        });
                    }
                    g.pages.fetch_sub(n, Ordering::Relaxed);
                }
                g.vmas.fetch_sub(n, Ordering::Relaxed);
            }
        }
        None
    }

    /// Counts a take refused, or not even tried because [`available`](Self::available)
    /// said there was no room.
    pub fn note_refused(&self) {
        self.inner.refusals.fetch_add(1, Ordering::Relaxed);
        self.inner.budget.refused(self.inner.domid);
    }

    /// Takes refused to this guest since its budget was made: a cache of the guest that
    /// sees this move knows another of its rings wants grants it holds.
    pub fn refusals(&self) -> u64 {
        self.inner.refusals.load(Ordering::Relaxed)
    }

    /// How far the guest is above its share (another guest attached since it took it,
    /// or ring reserves grew): what its caches must shed.
    pub fn excess(&self) -> MapCost {
        let share = self.inner.budget.share();
        let held = self.inner.held();
        MapCost::new(
            held.vmas.saturating_sub(share.vmas),
            held.pages.saturating_sub(share.pages),
        )
    }

    /// The daemon-wide budget is over its capacity (ring reserves beyond it).
    pub fn budget_over_committed(&self) -> bool {
        let b = &self.inner.budget;
        b.vmas.load(Ordering::Relaxed) > b.capacity.vmas
            || b.pages.load(Ordering::Relaxed) > b.capacity.pages
    }

    pub fn usage(&self) -> GuestUsage {
        GuestUsage {
            held: self.inner.held(),
            share: self.inner.budget.share(),
            grants: self.inner.grants.load(Ordering::Relaxed),
            refusals: self.inner.refusals.load(Ordering::Relaxed),
        }
    }
}

/// A part of a guest's budget, given back on drop. Held next to the mapping it paid
/// for, after it, so that it is given back only once the mapping is gone.
#[derive(Debug)]
#[must_use = "dropping the share gives it back at once"]
pub struct MapShare {
    guest: Arc<GuestInner>,
    cost: MapCost,
    /// One persistent grant's share (counted in the grants gauges).
    grant: bool,
}

impl MapShare {
    pub fn cost(&self) -> MapCost {
        self.cost
    }

    /// Gives back what the mapping turned out not to need (the platform's worst case was
    /// taken; the mapping says what it took). Never grows the share.
    pub fn shrink_to(&mut self, cost: MapCost) {
        let keep = MapCost::new(
            cost.vmas.min(self.cost.vmas),
            cost.pages.min(self.cost.pages),
        );
        let give = MapCost::new(self.cost.vmas - keep.vmas, self.cost.pages - keep.pages);
        self.guest.release(give);
        self.cost = keep;
    }

    /// Splits one persistent grant's share (one VMA, one page) off a share taken by
    /// [`GuestBudget::try_take_grants`]; `None` when less than that is left.
    pub fn split_grant(&mut self) -> Option<MapShare> {
        let one = MapCost::grants(1);
        if !one.fits_in(self.cost) {
            return None;
        }
        self.cost = MapCost::new(self.cost.vmas - 1, self.cost.pages - 1);
        Some(MapShare {
            guest: self.guest.clone(),
            cost: one,
            grant: false,
        })
    }

    /// Marks a one-grant share as a persistent grant's, for the gauges.
    pub(crate) fn keep_as_grant(&mut self) {
        if !self.grant {
            self.grant = true;
            self.guest.grants.fetch_add(1, Ordering::Relaxed);
            self.guest.budget.grants.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for MapShare {
    fn drop(&mut self) {
        if self.grant {
            self.guest.grants.fetch_sub(1, Ordering::Relaxed);
            self.guest.budget.grants.fetch_sub(1, Ordering::Relaxed);
        }
        self.guest.release(self.cost);
    }
}

/// A ring's reserve of mappings, given back on drop.
#[derive(Debug)]
#[must_use = "dropping the reservation gives it back at once"]
pub struct MapReservation {
    inner: Arc<Inner>,
    cost: MapCost,
}

impl MapReservation {
    pub fn cost(&self) -> MapCost {
        self.cost
    }
}

impl Drop for MapReservation {
    fn drop(&mut self) {
        let inner = &self.inner;
        inner
            .reserved_vmas
            .fetch_sub(self.cost.vmas, Ordering::Relaxed);
        inner
            .reserved_pages
            .fetch_sub(self.cost.pages, Ordering::Relaxed);
        inner.release(self.cost);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vmas(n: usize) -> MapCost {
        MapCost::new(n, usize::MAX / 2)
    }

    #[test]
    fn shares_are_refused_at_capacity_and_come_back_on_drop() {
        let b = MapBudget::new(MapCost::grants(2));
        let g = b.guest(1);
        let x = g.try_take(MapCost::grants(1)).unwrap();
        let y = g.try_take(MapCost::grants(1)).unwrap();
        assert_eq!(g.available(), MapCost::ZERO);
        assert!(g.try_take(MapCost::grants(1)).is_none());
        assert_eq!(b.refusals(), 1);
        assert_eq!(g.refusals(), 1);
        assert_eq!(b.usage().held, MapCost::grants(2));
        drop(x);
        assert_eq!(g.available(), MapCost::grants(1));
        let z = g.clone().try_take(MapCost::grants(1)).unwrap();
        drop((y, z));
        assert_eq!(
            b.usage(),
            BudgetUsage {
                capacity: MapCost::grants(2),
                reserved: MapCost::ZERO,
                held: MapCost::ZERO,
                grants: 0,
                guests: 1,
                refusals: 1
            }
        );
        drop(g);
        assert_eq!(b.usage().guests, 0);
    }

    #[test]
    fn each_resource_is_bounded_on_its_own() {
        // Many pages in one VMA (gntdev) run out of pages; one page per VMA (the
        // simulator's scattered frames) runs out of VMAs.
        let b = MapBudget::new(MapCost::new(10, 300));
        let g = b.guest(1);
        let big = g.try_take(MapCost::new(1, 256)).unwrap();
        assert!(g.try_take(MapCost::new(1, 256)).is_none());
        let small = g.try_take(MapCost::new(9, 9)).unwrap();
        assert!(g.try_take(MapCost::new(1, 1)).is_none());
        assert_eq!(b.usage().held, MapCost::new(10, 265));
        drop((big, small));
        assert_eq!(b.usage().held, MapCost::ZERO);
    }

    #[test]
    fn every_guest_gets_an_equal_share_whatever_another_holds() {
        let b = MapBudget::new(vmas(1000));
        let hostile = b.guest(7);
        // Alone, a guest may take everything.
        let all = hostile.try_take(MapCost::new(1000, 0)).unwrap();
        drop(all);
        let good = b.guest(8);
        assert_eq!(b.usage().guests, 2);
        assert_eq!(b.usage().share().vmas, 500);
        // The hostile guest takes what it can, request by request (256 scattered pages
        // cost 256 VMAs in the simulator): its share stops it at 500.
        let mut held = Vec::new();
        while let Some(s) = hostile.try_take(MapCost::new(256, 256)) {
            held.push(s);
        }
        while let Some(s) = hostile.try_take(MapCost::new(1, 1)) {
            held.push(s);
        }
        assert_eq!(hostile.usage().held.vmas, 500);
        assert!(hostile.refusals() >= 2);
        // The other guest's whole share is still there, and no more.
        let mine: Vec<_> = (0..500)
            .map(|_| good.try_take(MapCost::new(1, 1)).unwrap())
            .collect();
        assert!(good.try_take(MapCost::new(1, 1)).is_none());
        assert_eq!(b.usage().held.vmas, 1000);
        drop((held, mine));
        // One budget per domain, whichever ring asks.
        let again = b.guest(7);
        assert_eq!(b.usage().guests, 2);
        let s = again.try_take(MapCost::new(5, 5)).unwrap();
        assert_eq!(hostile.usage().held.vmas, 5);
        drop(s);
    }

    #[test]
    fn a_new_guest_shrinks_the_others_shares_and_they_must_shed() {
        let b = MapBudget::new(vmas(100));
        let first = b.guest(1);
        let mut kept = first.try_take_grants(90).unwrap();
        assert_eq!(kept.cost(), MapCost::grants(90));
        assert_eq!(first.excess(), MapCost::ZERO);
        let second = b.guest(2);
        // The first now holds 40 over its share of 50; the second finds only the 10 left
        // globally until the first sheds.
        assert_eq!(first.excess().vmas, 40);
        assert_eq!(second.available().vmas, 10);
        assert!(second.try_take(MapCost::new(11, 11)).is_none());
        let shed: Vec<_> = (0..40).map(|_| kept.split_grant().unwrap()).collect();
        drop(shed);
        assert_eq!(first.excess(), MapCost::ZERO);
        assert_eq!(second.available().vmas, 50);
        // The last ring of the second guest gone: the first may take everything again.
        drop(second);
        assert_eq!(first.available().vmas, 50);
        drop(kept);
    }

    #[test]
    fn grant_shares_split_one_by_one_and_count_as_grants() {
        let b = MapBudget::new(MapCost::grants(8));
        let g = b.guest(3);
        let mut batch = g.try_take_grants(20).unwrap();
        assert_eq!(
            batch.cost(),
            MapCost::grants(8),
            "only what there is room for"
        );
        assert!(g.try_take_grants(1).is_none());
        let mut one = batch.split_grant().unwrap();
        one.keep_as_grant();
        one.keep_as_grant();
        assert_eq!((b.usage().grants, g.usage().grants), (1, 1));
        assert_eq!(batch.cost(), MapCost::grants(7));
        drop(batch);
        assert_eq!(b.usage().held, MapCost::grants(1));
        drop(one);
        assert_eq!(b.usage().grants, 0);
        assert_eq!(b.usage().held, MapCost::ZERO);
    }

    #[test]
    fn a_share_shrinks_to_what_the_mapping_took() {
        let b = MapBudget::new(vmas(300));
        let g = b.guest(3);
        // Worst case of 256 scattered frames; they were consecutive: one VMA.
        let mut s = g.try_take(MapCost::new(256, 256)).unwrap();
        s.shrink_to(MapCost::new(1, 256));
        assert_eq!(s.cost(), MapCost::new(1, 256));
        assert_eq!(b.usage().held.vmas, 1);
        s.shrink_to(MapCost::new(5, 300));
        assert_eq!(s.cost(), MapCost::new(1, 256), "never grows");
        drop(s);
        assert_eq!(b.usage().held, MapCost::ZERO);
    }

    #[test]
    fn ring_reserves_shrink_the_limit_and_may_overcommit() {
        let b = MapBudget::new(vmas(10));
        let g = b.guest(1);
        let share = g.try_take(MapCost::new(1, 1)).unwrap();
        let r = b.reserve(MapCost::new(6, 1));
        assert_eq!(b.usage().limit(), 4);
        assert_eq!(g.available().vmas, 3);
        let r2 = b.reserve(MapCost::new(6, 1));
        assert!(b.over_committed());
        assert!(g.budget_over_committed());
        assert!(g.try_take(MapCost::new(1, 1)).is_none());
        drop(r2);
        assert!(!b.over_committed());
        drop((r, share));
        assert_eq!(g.available().vmas, 10);
        assert_eq!(b.usage().reserved, MapCost::ZERO);
    }

    #[test]
    fn sized_from_the_map_count_leaves_the_reserve() {
        assert_eq!(
            MapBudget::vmas_from_max_map_count(DEFAULT_MAX_MAP_COUNT, 4),
            DEFAULT_MAX_MAP_COUNT - BASE_MAP_RESERVE - 4 * MAPS_PER_REACTOR
        );
        assert_eq!(MapBudget::vmas_from_max_map_count(100, 1), 0);
        let (b, rings_reserve) = MapBudget::sized(
            MapLimits {
                size: BudgetSize::Vmas(7),
                max_mapped_pages: 99,
            },
            2,
        );
        assert_eq!(b.usage().capacity, MapCost::new(7, 99));
        assert!(!rings_reserve);
        let (b, rings_reserve) = MapBudget::sized(
            MapLimits {
                size: BudgetSize::MaxMapCount(5000),
                ..MapLimits::default()
            },
            2,
        );
        assert_eq!(
            b.usage().capacity,
            MapCost::new(
                5000 - BASE_MAP_RESERVE - 2 * MAPS_PER_REACTOR,
                DEFAULT_MAX_MAPPED_PAGES
            )
        );
        assert!(rings_reserve);
        // This machine's limit is readable and above the reserve.
        assert!(read_max_map_count().unwrap() > BASE_MAP_RESERVE);
        assert_eq!(ring_map_reserve(1, 4), MapCost::new(RING_FIXED_MAPS + 1, 4));
    }

    #[test]
    fn concurrent_takers_never_exceed_their_shares() {
        let b = MapBudget::new(vmas(64));
        let guests = [b.guest(1), b.guest(2)];
        let peak = [AtomicUsize::new(0), AtomicUsize::new(0)];
        std::thread::scope(|s| {
            for t in 0..4 {
                let (g, peak) = (&guests[t % 2], &peak[t % 2]);
                s.spawn(move || {
                    let mut held = Vec::new();
                    for i in 0..20_000 {
                        let take = if i % 2 == 0 {
                            g.try_take(MapCost::new(1 + i % 5, 1))
                        } else {
                            g.try_take_grants(3)
                        };
                        if let Some(share) = take {
                            held.push(share);
                        }
                        peak.fetch_max(g.usage().held.vmas, Ordering::Relaxed);
                        if i % 3 == 0 {
                            held.pop();
                        }
                    }
                });
            }
        });
        for (g, p) in guests.iter().zip(&peak) {
            assert!(p.load(Ordering::Relaxed) <= 32, "{p:?}");
            assert_eq!(g.usage().held, MapCost::ZERO);
            assert!(g.refusals() > 0);
        }
        assert_eq!(b.usage().held, MapCost::ZERO);
    }
}
