//! Page acquisition: how a request's data pages become addressable, and everything that
//! policy owns ([`PageSource`]): the persistent-grant cache, the guest's share of the
//! grant-mapping budget, the bounce pool, and the grant copies in and out.
//!
//! In map mode a segment's page is a persistent grant (cache hit, or a miss the cache and
//! the budget take, mapped for keeping) or is mapped for the request only, in batches.
//! In map-or-copy mode a request the cache cannot hold is grant-copied through bounce
//! pages instead; in copy mode every request is. What a request maps is first taken from
//! its guest's share of the daemon-wide budget ([`crate::grant_budget`]): a request whose
//! mapping the share has no room for, or whose map fails for want of resources (not
//! because a grant was refused), is grant-copied too, never failed. Those fallbacks are
//! counted (`map_fallbacks`) and logged at warn, at most one line per
//! [`FALLBACK_LOG_INTERVAL`] per VBD. Whatever is acquired is held by the request's
//! [`DataPages`](super::pages::DataPages) until it is released at completion.

use std::sync::Arc;
use std::time::{Duration, Instant};

use blkif::abi::{BLKIF_RSP_ERROR, PAGE_SIZE};
use blkif::Segment;
use platform::{
    Access, CopyBuffer, CopyDirection, CopySegment, DomId, GrantMapping, GrantRef, MapError,
    Platform, MAX_MAP_BATCH,
};

use super::indirect::IndirectLeases;
use super::pages::{DataPages, HeldMapping};
use super::request::Slot;
use super::Who;
use crate::bounce::BouncePool;
use crate::grant_budget::{GuestBudget, MapCost, MapShare};
use crate::persistent_grants::PersistentGrantCache;
use crate::stats::RingStats;
use crate::vbd::{ResolvedGrantMode, VbdShared};

/// How long a bounce pool goes unused before its memory is given back.
const BOUNCE_IDLE: Duration = Duration::from_secs(1);

/// Most one warning line per VBD about requests grant-copied instead of mapped, each
/// with the count since the last.
pub(crate) const FALLBACK_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Why a mapping for a request was not made.
#[derive(Debug)]
pub(super) enum NotMapped {
    /// The guest's share of the budget has no room for it.
    Budget,
    /// The platform refused the map.
    Map(MapError),
}

impl NotMapped {
    /// Whether the request can be served by grant copy instead: yes unless the hypervisor
    /// refused a grant itself (then a copy is refused too, and the request fails as in
    /// blkback).
    fn copy_instead(&self) -> bool {
        match self {
            NotMapped::Budget => true,
            NotMapped::Map(e) => !e.grant_refused(),
        }
    }
}

/// How mapping a request's data pages went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mapped {
    /// Mapped (or taken from the persistent-grant cache).
    Yes,
    /// Map-or-copy: the persistent-grant cache cannot hold the request, which is
    /// grant-copied by design. Nothing is held.
    Copy,
    /// The mapping could not be had (budget, resources): grant-copied instead. Nothing is
    /// held.
    Fallback,
}

/// The outcome of acquiring a request's pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Acquired {
    /// The pages are held (and a write's data copied in): run the request.
    Ready,
    /// The bounce pool has too few free pages: retry after completions.
    Wait,
    /// The request fails with this status.
    Failed(i16),
}

/// One ring's page-acquisition policy and what it draws on.
pub(super) struct PageSource {
    pub(super) cache: PersistentGrantCache<GrantMapping>,
    /// Copy mode: made at start; map-or-copy: made when a request first needs it.
    bounce: Option<BouncePool>,
    pub(super) platform: Arc<dyn Platform>,
    pub(super) domid: DomId,
    /// The guest's share of the daemon-wide grant-mapping budget (the cache holds it too).
    pub(super) budget: GuestBudget,
    pub(super) persistent: bool,
    pub(super) mode: ResolvedGrantMode,
    /// Size of the bounce pool, in pages.
    bounce_pages: usize,
    pub(super) stats: Arc<RingStats>,
    pub(super) vbd: Arc<VbdShared>,
    pub(super) who: Who,
    /// Scratch for persistent-grant misses: indices into the request's segments.
    misses: Vec<usize>,
    /// Scratch for [`distinct_first`].
    dedup: Vec<(u32, u32)>,
    reordered: Vec<usize>,
    pub(super) grefs: Vec<u32>,
    /// Private copies of indirect descriptor pages (copy and map-or-copy modes).
    pub(super) indirect_pages: Vec<[u8; PAGE_SIZE]>,
    /// The frontend grants its indirect pages read-only: a writable map of one for the
    /// cache failed where a read-only map (or copy) of it then worked. From then on, this
    /// ring's indirect pages missing the cache are not offered to it (one failed map per
    /// request for nothing); they are mapped or copied for their request only.
    pub(super) indirect_read_only: bool,
    /// Grant-copy segments of the request being copied, reused.
    pub(super) copy_segs: Vec<CopySegment>,
    /// The grants an indirect request's descriptor pages are read through, reused.
    pub(super) indirect_leases: IndirectLeases,
    /// Bounce pages were taken since the last tick.
    bounce_used: bool,
    /// The bounce pool has been unused since then.
    bounce_idle_since: Option<Instant>,
}

impl std::fmt::Debug for PageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageSource")
            .field("who", &self.who)
            .field("mode", &self.mode)
            .field("persistent", &self.persistent)
            .field("cache", &self.cache)
            .field("bounce", &self.bounce)
            .finish_non_exhaustive()
    }
}

/// What a [`PageSource`] is made of.
pub(super) struct PageSourceParts {
    pub(super) cache: PersistentGrantCache<GrantMapping>,
    pub(super) platform: Arc<dyn Platform>,
    pub(super) domid: DomId,
    pub(super) budget: GuestBudget,
    pub(super) persistent: bool,
    pub(super) mode: ResolvedGrantMode,
    pub(super) bounce_pages: usize,
    pub(super) stats: Arc<RingStats>,
    pub(super) vbd: Arc<VbdShared>,
    pub(super) who: Who,
}

impl PageSource {
    pub(super) fn new(p: PageSourceParts) -> std::io::Result<Self> {
        let bounce = match p.mode {
            ResolvedGrantMode::Copy => Some(BouncePool::new(p.bounce_pages)?),
            ResolvedGrantMode::Map | ResolvedGrantMode::MapOrCopy => None,
        };
        Ok(Self {
            cache: p.cache,
            bounce,
            platform: p.platform,
            domid: p.domid,
            budget: p.budget,
            persistent: p.persistent,
            mode: p.mode,
            bounce_pages: p.bounce_pages,
            stats: p.stats,
            vbd: p.vbd,
            who: p.who,
            misses: Vec::new(),
            dedup: Vec::new(),
            reordered: Vec::new(),
            grefs: Vec::new(),
            indirect_pages: Vec::new(),
            indirect_read_only: false,
            copy_segs: Vec::new(),
            indirect_leases: IndirectLeases::new(),
            bounce_used: false,
            bounce_idle_since: None,
        })
    }

    /// Makes a newly accepted request's data pages addressable: mapped, or bounce pages
    /// (a write's data copied in).
    pub(super) fn acquire(&mut self, slot: &mut Slot, now: Instant) -> Acquired {
        if self.mode != ResolvedGrantMode::Copy {
            let fills_guest = slot.fills_guest();
            let Some((segs, pages)) = slot.pages_mut() else {
                return Acquired::Failed(BLKIF_RSP_ERROR);
            };
            match self.map_segments(segs, pages, fills_guest, now) {
                Ok(Mapped::Yes) => return Acquired::Ready,
                Err(status) => return Acquired::Failed(status),
                // Map-or-copy, and the persistent-grant cache cannot hold the request: as
                // blkback when a grant does not fit, the next purge makes room by dropping
                // the least recently used, so the cache follows the working set (small
                // requests map into it again; large ones keep being copied).
                Ok(Mapped::Copy) => self.cache.note_overflow(),
                Ok(Mapped::Fallback) => self.note_fallback(now),
            }
        }
        if self.bounce.is_none() {
            match BouncePool::new(self.bounce_pages) {
                Ok(pool) => self.bounce = Some(pool),
                Err(e) => {
                    tracing::warn!(vbd = self.who.vbd, ring = self.who.ring, error = %e, "no bounce pool");
                    return Acquired::Failed(BLKIF_RSP_ERROR);
                }
            }
        }
        self.bounce_in(slot)
    }

    /// Takes bounce pages for a request to be copied and copies a write's data in.
    /// [`Acquired::Wait`] (nothing taken) when the pool has too few free.
    pub(super) fn bounce_in(&mut self, slot: &mut Slot) -> Acquired {
        let (Some(pool), Some((segs, pages))) = (self.bounce.as_mut(), slot.pages_mut()) else {
            return Acquired::Failed(BLKIF_RSP_ERROR);
        };
        let n = segs.len();
        if n == 0 {
            return Acquired::Ready;
        }
        if !pages.hold_bounce(pool, n) {
            return Acquired::Wait;
        }
        self.bounce_used = true;
        if !slot.fills_guest() {
            if let Err(status) = self.copy_data(slot, CopyDirection::FromGuest) {
                return Acquired::Failed(status);
            }
        }
        Acquired::Ready
    }

    /// The request is over: delivers read data (bounce pages), then lets go of its pages.
    #[inline]
    pub(super) fn release(&mut self, slot: &mut Slot, now: Instant) {
        let ok = slot.status == blkif::abi::BLKIF_RSP_OKAY;
        if ok && slot.fills_guest() && slot.pages().bounce().is_some() {
            if let Err(status) = self.copy_data(slot, CopyDirection::ToGuest) {
                slot.status = status;
            }
        }
        match slot.pages_mut() {
            Some((_, pages)) => pages.release(&mut self.cache, self.bounce.as_mut(), now),
            None => tracing::error!(
                vbd = self.who.vbd,
                ring = self.who.ring,
                "request finished with operations in flight: pages kept"
            ),
        }
    }

    /// Map mode: makes every data segment's page addressable, from the persistent cache
    /// when possible. Returns [`Mapped::Copy`] in map-or-copy mode, with nothing taken,
    /// when the cache cannot hold the request's grants (all free in it, or room for the
    /// others), and [`Mapped::Fallback`], with nothing taken either, when what the
    /// request would map does not fit its guest's share of the budget or a map failed for
    /// want of resources: the request then goes through bounce buffers instead.
    fn map_segments(
        &mut self,
        segs: &[Segment],
        pages: &mut DataPages,
        fills_guest: bool,
        now: Instant,
    ) -> Result<Mapped, i16> {
        pages.begin_mapped(segs.len());
        if segs.is_empty() {
            return Ok(Mapped::Yes);
        }
        self.take_hits(segs, pages);
        if self.misses.is_empty() {
            if self.persistent {
                self.stats.persistent_hits.add(segs.len() as u64);
            }
            return Ok(Mapped::Yes);
        }
        // How many misses become persistent: as many as the cache has free entries for,
        // the guest's budget has shares for, and one map call takes; of a gref the
        // request names twice, only the first, and none the cache holds already (it keeps
        // one entry per gref: the others, mapped one VMA each, would be unmapped at
        // completion, and a hostile frontend repeating a gref 4096 times per request
        // would make that many). The shares are taken before anything is mapped.
        let kept_shares = if !self.persistent
            || (self.mode == ResolvedGrantMode::MapOrCopy
                && self.cache.free_entries() < self.misses.len())
        {
            // Map-or-copy: copied whatever the budget says, not counted as its refusal.
            None
        } else {
            let cache = &self.cache;
            let distinct = distinct_first(
                &mut self.misses,
                segs,
                |gref| cache.contains(gref),
                &mut self.dedup,
                &mut self.reordered,
            );
            self.cache.reserve(distinct.min(MAX_MAP_BATCH))
        };
        let room = kept_shares.as_ref().map_or(0, |sh| sh.cost().vmas);
        if self.mode == ResolvedGrantMode::MapOrCopy && self.misses.len() > room {
            // Copied whole: its hits were not used either.
            self.stats.persistent_misses.add(segs.len() as u64);
            pages.abandon_mapping();
            return Ok(Mapped::Copy);
        }
        if room < self.misses.len() && self.persistent {
            self.cache.note_overflow();
        }
        // The rest is mapped for this request only, in batches: each batch's worst case
        // is taken from the guest's share before anything is mapped, so the request
        // either gets all it needs or maps nothing and is copied.
        let mut batch_shares: Vec<MapShare> = Vec::new();
        for batch in self.misses[room..].chunks(MAX_MAP_BATCH) {
            let cost = MapCost::new(self.platform.max_vmas(batch.len()), batch.len());
            match self.budget.try_take(cost) {
                Some(share) => batch_shares.push(share),
                None => {
                    drop(kept_shares);
                    if self.persistent {
                        // Copied whole: its hits were not used either.
                        self.stats.persistent_misses.add(segs.len() as u64);
                    }
                    pages.abandon_mapping();
                    return Ok(Mapped::Fallback);
                }
            }
        }
        if self.persistent {
            let misses = self.misses.len();
            self.stats.persistent_hits.add((segs.len() - misses) as u64);
            self.stats.persistent_misses.add(misses as u64);
        }
        if let Some(shares) = kept_shares {
            if let Err(why) = self.map_kept(segs, pages, room, shares, now) {
                return self.map_failed(pages, why);
            }
        }
        // The seed maps read-only for requests that only read guest memory, except with
        // persistent grants, whose mappings outlive the request and may serve a READ later.
        let access = if self.persistent || fills_guest {
            Access::ReadWrite
        } else {
            Access::ReadOnly
        };
        for (batch, share) in self.misses[room..].chunks(MAX_MAP_BATCH).zip(batch_shares) {
            self.grefs.clear();
            self.grefs.extend(batch.iter().map(|&i| segs[i].gref));
            match self.map_with(&self.grefs, access, share) {
                Ok(held) => pages.hold_mapping(batch, held),
                Err(e) => return self.map_failed(pages, e),
            }
        }
        Ok(Mapped::Yes)
    }

    /// Leases the segments' grants the cache holds; the others go to `self.misses`.
    fn take_hits(&mut self, segs: &[Segment], pages: &mut DataPages) {
        self.misses.clear();
        for (i, seg) in segs.iter().enumerate() {
            let lease = if self.persistent {
                self.cache.get(seg.gref)
            } else {
                None
            };
            match lease {
                Some(lease) => pages.hold_lease(i, lease),
                None => self.misses.push(i),
            }
        }
    }

    /// Maps the first `room` misses one grant per mapping (so the purge can drop them
    /// one by one) and offers each to the cache with its share.
    fn map_kept(
        &mut self,
        segs: &[Segment],
        pages: &mut DataPages,
        room: usize,
        mut shares: MapShare,
        now: Instant,
    ) -> Result<(), NotMapped> {
        self.grefs.clear();
        self.grefs
            .extend(self.misses[..room].iter().map(|&i| segs[i].gref));
        let maps = self
            .platform
            .map_each(self.domid, &self.grefs, Access::ReadWrite)
            .map_err(NotMapped::Map)?;
        for (&i, m) in self.misses[..room].iter().zip(maps) {
            let gref = segs[i].gref;
            let Some(one) = shares.split_grant() else {
                // `reserve` took one share per grant: not reached.
                tracing::error!(gref, "persistent grant mapped without its share");
                return Err(NotMapped::Budget);
            };
            match self.cache.add(gref, m, one, now) {
                Ok(lease) => pages.hold_lease(i, lease),
                // Not kept after all: used for this request only, with its share.
                Err(rejected) => pages.hold_mapping(
                    &[i],
                    HeldMapping {
                        mapping: rejected.mapping,
                        _share: rejected.share,
                    },
                ),
            }
        }
        Ok(())
    }

    /// Maps `refs` of the guest for one request with `share`, taken from the guest's
    /// budget for the platform's worst case; what the mapping did not take is given back.
    pub(super) fn map_with(
        &self,
        refs: &[GrantRef],
        access: Access,
        mut share: MapShare,
    ) -> Result<HeldMapping, NotMapped> {
        let mapping = self
            .platform
            .map(self.domid, refs, access)
            .map_err(NotMapped::Map)?;
        share.shrink_to(MapCost::new(mapping.vmas(), mapping.pages()));
        Ok(HeldMapping {
            mapping,
            _share: share,
        })
    }

    /// Like [`map_with`](Self::map_with), taking the share first.
    pub(super) fn map_budgeted(
        &self,
        refs: &[GrantRef],
        access: Access,
    ) -> Result<HeldMapping, NotMapped> {
        let cost = MapCost::new(self.platform.max_vmas(refs.len()), refs.len());
        let share = self.budget.try_take(cost).ok_or(NotMapped::Budget)?;
        self.map_with(refs, access, share)
    }

    /// A map of the request's data failed: undoes what it took, and says whether the
    /// request is copied instead or fails.
    fn map_failed(&mut self, pages: &mut DataPages, why: NotMapped) -> Result<Mapped, i16> {
        pages.abandon_mapping();
        let copy = why.copy_instead();
        if let NotMapped::Map(e) = &why {
            tracing::debug!(
                vbd = self.who.vbd,
                ring = self.who.ring,
                error = %e,
                copy,
                "grant map failed"
            );
        }
        if copy {
            Ok(Mapped::Fallback)
        } else {
            Err(BLKIF_RSP_ERROR)
        }
    }

    /// Counts a request grant-copied because it could not be mapped, and logs the count
    /// when a line is due.
    fn note_fallback(&mut self, now: Instant) {
        self.stats.map_fallbacks.inc();
        self.vbd.map_fallbacks.add(1);
        self.log_fallbacks(now);
    }

    /// At most one warning per [`FALLBACK_LOG_INTERVAL`] per VBD (whichever ring is
    /// first), with the count since the last one.
    pub(super) fn log_fallbacks(&self, now: Instant) {
        if let Some(count) = self.vbd.map_fallbacks.due(now, FALLBACK_LOG_INTERVAL) {
            let usage = self.budget.usage();
            tracing::warn!(
                vbd = self.who.vbd,
                domid = self.domid,
                count,
                held = ?usage.held,
                share = ?usage.share,
                "requests grant-copied instead of mapped: the guest reached its share of \
                 the daemon's grant mappings, or a map failed for want of resources"
            );
        }
    }

    /// Moves a request's data between the guest's granted pages and its bounce pages.
    fn copy_data(&mut self, slot: &Slot, direction: CopyDirection) -> Result<(), i16> {
        let Some((region, bounce)) = slot.pages().bounce() else {
            return Err(BLKIF_RSP_ERROR);
        };
        self.copy_segs.clear();
        for (seg, &page) in slot.segs.iter().zip(bounce) {
            // Inside one page (blkif checked first/last sector): both fit a u16.
            let (offset, len) = (seg.offset_bytes(), seg.len_bytes());
            let (Ok(offset16), Ok(len16)) = (u16::try_from(offset), u16::try_from(len)) else {
                return Err(BLKIF_RSP_ERROR);
            };
            self.copy_segs.push(CopySegment::new(
                direction,
                self.domid,
                seg.gref,
                offset16,
                len16,
                BouncePool::offset(page) + offset,
            ));
        }
        let copied = self
            .platform
            .copy_segments(CopyBuffer::Shared(region), &mut self.copy_segs);
        check_copied(copied, &self.copy_segs)
    }

    /// Gives an idle bounce pool's memory back after [`BOUNCE_IDLE`] without use.
    pub(super) fn reclaim_bounce(&mut self, now: Instant) {
        let Some(pool) = self.bounce.as_mut() else {
            return;
        };
        if std::mem::take(&mut self.bounce_used) || pool.in_use() > 0 {
            self.bounce_idle_since = None;
            return;
        }
        let since = *self.bounce_idle_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= BOUNCE_IDLE {
            let bytes = pool.reclaim();
            if bytes > 0 {
                tracing::debug!(
                    vbd = self.who.vbd,
                    ring = self.who.ring,
                    bytes,
                    "idle bounce pages released"
                );
            }
        }
    }

    /// blkback's LRU purge of the persistent-grant cache; what goes is unmapped here.
    pub(super) fn purge(&mut self, now: Instant) {
        if !self.persistent {
            return;
        }
        let purged = self.cache.purge(now);
        if !purged.is_empty() {
            tracing::trace!(
                vbd = self.who.vbd,
                ring = self.who.ring,
                n = purged.len(),
                "unmapping purged persistent grants"
            );
        }
        drop(purged);
    }
}

/// Reorders `misses` (indices into `segs`) so that those not worth mapping for the cache
/// come last, the order otherwise kept: a gref an earlier miss already names, or one the
/// cache already holds (in use by another request: only a mapping for this request will
/// do). Returns how many come first. The scratch vectors keep their capacity.
fn distinct_first(
    misses: &mut Vec<usize>,
    segs: &[Segment],
    kept: impl Fn(u32) -> bool,
    scratch: &mut Vec<(u32, u32)>,
    reordered: &mut Vec<usize>,
) -> usize {
    scratch.clear();
    // A request has at most `max_indirect_segments` (a u32) segments.
    scratch.extend(
        misses
            .iter()
            .enumerate()
            .map(|(pos, &i)| (segs[i].gref, u32::try_from(pos).unwrap_or(u32::MAX))),
    );
    scratch.sort_unstable();
    if scratch.windows(2).all(|w| w[0].0 != w[1].0) && !scratch.iter().any(|&(g, _)| kept(g)) {
        return misses.len();
    }
    // Within a run of one gref the first position is the original. The key becomes
    // "goes last", walking backwards so each comparison still sees the grefs.
    for k in (0..scratch.len()).rev() {
        let gref = scratch[k].0;
        let repeat = k > 0 && gref == scratch[k - 1].0;
        scratch[k].0 = u32::from(repeat || kept(gref));
    }
    scratch.sort_unstable();
    reordered.clear();
    reordered.extend(scratch.iter().map(|&(_, pos)| misses[pos as usize]));
    std::mem::swap(misses, reordered);
    scratch.iter().filter(|&&(last, _)| last == 0).count()
}

/// The outcome of a grant copy as a response status.
pub(super) fn check_copied(
    copied: Result<(), platform::PlatformError>,
    segs: &[CopySegment],
) -> Result<(), i16> {
    if let Err(e) = copied {
        tracing::debug!(error = %e, "grant copy failed");
        return Err(BLKIF_RSP_ERROR);
    }
    if let Some(seg) = segs.iter().find(|s| !s.status.is_ok()) {
        tracing::debug!(gref = seg.gref, status = %seg.status, "grant copy refused");
        return Err(BLKIF_RSP_ERROR);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_grefs_go_last_in_order() {
        let segs: Vec<Segment> = [5, 9, 5, 3, 9, 5, 7]
            .into_iter()
            .map(|gref| Segment {
                gref,
                first_sect: 0,
                last_sect: 7,
            })
            .collect();
        let (mut scratch, mut reordered) = (Vec::new(), Vec::new());
        // Misses are segment indices; here every segment but the last one missed.
        let none = |_| false;
        let mut misses = vec![0, 1, 2, 3, 4, 5];
        let distinct = distinct_first(&mut misses, &segs, none, &mut scratch, &mut reordered);
        assert_eq!(distinct, 3);
        assert_eq!(misses, vec![0, 1, 3, 2, 4, 5]);
        // No repeat: untouched.
        let mut misses = vec![3, 6, 0];
        assert_eq!(
            distinct_first(&mut misses, &segs, none, &mut scratch, &mut reordered),
            3
        );
        assert_eq!(misses, vec![3, 6, 0]);
        // Grefs the cache holds go last too, repeated or not.
        let mut misses = vec![0, 1, 2, 3, 6];
        let kept = |gref| gref == 5 || gref == 7;
        assert_eq!(
            distinct_first(&mut misses, &segs, kept, &mut scratch, &mut reordered),
            2
        );
        assert_eq!(misses, vec![1, 3, 0, 2, 6]);
        let mut misses = Vec::new();
        assert_eq!(
            distinct_first(&mut misses, &segs, none, &mut scratch, &mut reordered),
            0
        );
    }
}
