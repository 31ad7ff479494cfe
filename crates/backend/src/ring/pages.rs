//! What keeps a request's data pages alive: [`DataPages`], owned by the request's slot
//! from the moment its pages are acquired until its last storage operation was reaped.
//!
//! A request's data is in one of three kinds of page, and `DataPages` holds what keeps
//! each mapped: a [`Lease`] on a persistent grant (the cache's mapping stays valid while
//! the lease exists, even if the cache purges or drops the grant meanwhile), a grant
//! mapping made for this request only ([`HeldMapping`], unmapped when dropped), or bounce
//! pages ([`BouncePages`], which hold the pool's memory). The addresses the storage gets
//! (the iovecs) are made here, from pages this value holds, so "the in-flight request
//! owns its `DataPages`" is the whole argument that the kernel never reads or writes a
//! page that was unmapped under it. The vectors keep their capacity from one request to
//! the next: nothing is allocated per request.

use blkif::abi::PAGE_SIZE;
use blkif::Segment;
use platform::GrantMapping;
use shmem::SharedMemory;

use crate::bounce::{BouncePages, BouncePool};
use crate::grant_budget::MapShare;
use crate::persistent_grants::{Lease, PersistentGrantCache};

/// A grant mapping made for one request (or one indirect request's descriptor pages),
/// with what it cost of the guest's budget. Field order: the mapping goes first, then its
/// share is given back, so the budget never counts fewer mappings than exist.
#[derive(Debug)]
pub(super) struct HeldMapping {
    pub(super) mapping: GrantMapping,
    pub(super) _share: MapShare,
}

/// The pages of one request's data segments and what keeps them mapped.
#[derive(Debug, Default)]
pub(super) struct DataPages {
    /// Per segment: the address of its page, inside one of the holds below.
    addrs: Vec<usize>,
    /// Persistent grants leased from the ring's cache.
    leases: Vec<Lease<GrantMapping>>,
    /// Grants mapped for this request only.
    mappings: Vec<HeldMapping>,
    /// Bounce pages: the data is grant-copied between them and the guest.
    bounce: BouncePages,
}

impl DataPages {
    /// Starts mapping `n` segments: every one is then given its page by one of the
    /// `hold_*` calls below.
    #[inline]
    pub(super) fn begin_mapped(&mut self, n: usize) {
        debug_assert!(self.is_empty(), "pages of an earlier request still held");
        self.addrs.clear();
        self.addrs.resize(n, 0);
    }

    /// Segment `seg` is in the page of a leased persistent grant.
    #[inline(always)]
    pub(super) fn hold_lease(&mut self, seg: usize, lease: Lease<GrantMapping>) {
        self.addrs[seg] = lease.mapping().as_ptr() as usize;
        self.leases.push(lease);
    }

    /// Segments `segs` are in the consecutive pages of `held`, in that order.
    pub(super) fn hold_mapping(&mut self, segs: &[usize], held: HeldMapping) {
        let base = held.mapping.as_ptr() as usize;
        for (k, &i) in segs.iter().enumerate() {
            self.addrs[i] = base + k * PAGE_SIZE;
        }
        self.mappings.push(held);
    }

    /// Takes `n` bounce pages from `pool`, one per segment; `false` (nothing taken) when
    /// the pool has too few free.
    pub(super) fn hold_bounce(&mut self, pool: &mut BouncePool, n: usize) -> bool {
        debug_assert!(self.is_empty(), "pages of an earlier request still held");
        if !pool.alloc(n, &mut self.bounce) {
            return false;
        }
        self.addrs.clear();
        if let Some((region, pages)) = self.bounce.held() {
            let base = region.as_ptr() as usize;
            self.addrs
                .extend(pages.iter().map(|&p| base + BouncePool::offset(p)));
        }
        true
    }

    /// The data goes through bounce pages: the pool's memory and the request's pages in
    /// it, one per segment.
    pub(super) fn bounce(&self) -> Option<(&SharedMemory, &[u32])> {
        self.bounce.held()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.addrs.is_empty()
            && self.leases.is_empty()
            && self.mappings.is_empty()
            && self.bounce.is_empty()
    }

    /// Gives back what was held towards mapping the request that was not used after all:
    /// leased grants return to the cache with their last use unchanged, the request's own
    /// mappings are unmapped.
    pub(super) fn abandon_mapping(&mut self) {
        self.leases.clear();
        self.mappings.clear();
        self.addrs.clear();
    }

    /// The request is over: its persistent grants go back to the cache (used `now`), its
    /// own mappings are unmapped, its bounce pages go back to the pool.
    #[inline]
    pub(super) fn release(
        &mut self,
        cache: &mut PersistentGrantCache<GrantMapping>,
        pool: Option<&mut BouncePool>,
        now: std::time::Instant,
    ) {
        // Popped rather than drained: the order does not matter and `Drain`'s drop costs
        // more than the loop on a one-segment request.
        while let Some(lease) = self.leases.pop() {
            cache.put(lease, now);
        }
        self.mappings.clear();
        // Bounce pages are held only once the pool exists.
        if let Some(pool) = pool {
            pool.free(&mut self.bounce);
        }
        self.addrs.clear();
    }

    /// Appends the iovecs of `segs`, segments `first..` of the request, to `out`.
    #[inline]
    pub(super) fn iovecs(&self, segs: &[Segment], first: usize, out: &mut Vec<libc::iovec>) {
        let addrs = self.addrs.get(first..).unwrap_or_default();
        // A plain loop: `extend` over the zip was an out-of-line fold call per chunk.
        for (seg, &addr) in segs.iter().zip(addrs) {
            out.push(libc::iovec {
                iov_base: (addr + seg.offset_bytes()) as *mut libc::c_void,
                iov_len: seg.len_bytes(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;
    use crate::grant_budget::MapBudget;
    use crate::persistent_grants::PersistentGrantLimits;

    #[test]
    fn bounce_pages_of_a_finished_request_return_to_the_pool() {
        let mut pool = BouncePool::new(4).unwrap();
        let mut cache = PersistentGrantCache::new(
            PersistentGrantLimits::default(),
            Arc::new(AtomicBool::new(false)),
            MapBudget::unlimited().guest(1),
        );
        let seg = Segment {
            gref: 8,
            first_sect: 1,
            last_sect: 2,
        };
        let mut pages = DataPages::default();
        assert!(pages.hold_bounce(&mut pool, 3));
        assert_eq!(pool.available(), 1);
        let mut other = DataPages::default();
        assert!(!other.hold_bounce(&mut pool, 2), "all or nothing");
        assert!(other.is_empty());
        // The iovecs point into the held pages, at the segment's offset.
        let (region, held) = pages.bounce().unwrap();
        let mut iov = Vec::new();
        pages.iovecs(&[seg, seg], 1, &mut iov);
        assert_eq!(iov.len(), 2);
        let first = region.as_ptr() as usize + BouncePool::offset(held[1]) + 512;
        assert_eq!(iov[0].iov_base as usize, first);
        assert_eq!(iov[0].iov_len, 1024);

        pages.release(&mut cache, Some(&mut pool), Instant::now());
        assert!(pages.is_empty());
        assert_eq!(pool.available(), 4, "every page is back");
        assert!(other.hold_bounce(&mut pool, 4));
    }
}
