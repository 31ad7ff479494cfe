//! Bounce buffers for the grant-copy data path (qdisk style).
//!
//! In copy mode the backend never maps guest pages: a write's data is grant-copied from
//! the guest into backend-owned pages before the storage write, a read's data is
//! grant-copied out to the guest after the storage read. Those pages come from this
//! pool, one per ring (in map-or-copy mode, made when a request first needs it).
//!
//! The pool is one page-aligned anonymous mapping reserved up front and backed by the
//! kernel lazily, so an idle ring costs address space only; pages are handed out lowest
//! first and reused most-recently-freed first, so a ring touches no more of it than its
//! peak of data in flight, and [`BouncePool::reclaim`] gives that memory back once the
//! pool has gone unused. Its size is the hard bound on bounce memory a frontend can make
//! the ring hold: [`DEFAULT_MAX_BUFFER_PAGES`] by default, raised to one maximal request
//! when the VBD advertises more indirect segments than that (a request must always fit
//! when the ring is otherwise idle). A request that does not fit waits, like one that
//! finds no free request slot. Every page is 4 KiB-aligned, so O_DIRECT storage accepts
//! them as they are.

use std::sync::Arc;

use shmem::{SharedMemory, PAGE_SIZE};

/// Default bound on a ring's bounce pages: 32 MiB, 32 requests of 1 MiB in flight.
///
/// blkback's `max_buffer_pages` (1 024) bounds a cache of free pages; here the pool bounds
/// the data in flight through copies, and 1 024 pages held only four 1 MiB requests: with
/// a device faster than ~1 GB/s, 1 MiB I/O through copies ran at half the device's speed
/// waiting for pages. The memory is used only while requests hold it and is reclaimed
/// after the pool goes idle.
pub const DEFAULT_MAX_BUFFER_PAGES: usize = 8192;

/// The bounce pages one request holds. They keep the pool's memory mapped while the
/// request holds them, whatever happens to the pool; [`BouncePool::free`] gives them
/// back. The page list keeps its capacity from one request to the next.
#[derive(Debug, Default)]
pub(crate) struct BouncePages {
    region: Option<Arc<SharedMemory>>,
    pages: Vec<u32>,
}

impl BouncePages {
    /// The pool's memory and the pages in it, `None` when nothing is held.
    pub(crate) fn held(&self) -> Option<(&SharedMemory, &[u32])> {
        self.region.as_deref().map(|r| (r, self.pages.as_slice()))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.region.is_none()
    }
}

#[derive(Debug)]
pub(crate) struct BouncePool {
    region: Arc<SharedMemory>,
    /// Pages freed and not yet reused (the most recently freed last).
    free: Vec<u32>,
    /// Pages `fresh..capacity` have never been handed out since the last reclaim.
    fresh: u32,
    capacity: u32,
}

impl BouncePool {
    pub(crate) fn new(pages: usize) -> std::io::Result<Self> {
        let pages = u32::try_from(pages.max(1)).unwrap_or(u32::MAX);
        Ok(Self {
            region: Arc::new(SharedMemory::anonymous(pages as usize * PAGE_SIZE)?),
            free: Vec::new(),
            fresh: 0,
            capacity: pages,
        })
    }

    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.capacity as usize
    }

    /// Pages that can be taken now.
    pub(crate) fn available(&self) -> usize {
        self.free.len() + (self.capacity - self.fresh) as usize
    }

    /// Pages held by requests.
    pub(crate) fn in_use(&self) -> usize {
        self.capacity as usize - self.available()
    }

    /// Gives `n` pages to `out` (which holds none), all or none: freed pages first (warm
    /// in cache, backed already), then never-used ones.
    pub(crate) fn alloc(&mut self, n: usize, out: &mut BouncePages) -> bool {
        if n > self.available() || !out.is_empty() {
            return false;
        }
        out.pages.clear();
        let reuse = n.min(self.free.len());
        out.pages.extend(self.free.drain(self.free.len() - reuse..));
        // Bounded by `available`, so by `capacity`, a u32.
        let more = u32::try_from(n - reuse).unwrap_or(0);
        out.pages.extend(self.fresh..self.fresh + more);
        self.fresh += more;
        out.region = Some(self.region.clone());
        true
    }

    /// Takes back pages given by [`alloc`](Self::alloc); `held` keeps its capacity.
    pub(crate) fn free(&mut self, held: &mut BouncePages) {
        match held.region.take() {
            Some(region) if Arc::ptr_eq(&region, &self.region) => {
                self.free.append(&mut held.pages);
            }
            // Another pool's pages (there is one pool per ring): just let go of them.
            Some(_) => held.pages.clear(),
            None => {}
        }
    }

    /// When no page is in use: gives the memory of every page used so far back to the
    /// kernel and forgets the free list. Returns the bytes released.
    pub(crate) fn reclaim(&mut self) -> usize {
        if self.in_use() > 0 || self.fresh == 0 {
            return 0;
        }
        let bytes = self.fresh as usize * PAGE_SIZE;
        if let Err(e) = self.region.discard(0, bytes) {
            tracing::warn!(error = %e, "cannot release idle bounce pages");
            return 0;
        }
        self.fresh = 0;
        self.free = Vec::new();
        bytes
    }

    /// The memory of the pool.
    #[cfg(test)]
    pub(crate) fn region(&self) -> &SharedMemory {
        &self.region
    }

    /// Byte offset of page `i` in the pool's memory.
    pub(crate) fn offset(page: u32) -> usize {
        page as usize * PAGE_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_or_nothing_and_aligned() {
        let mut p = BouncePool::new(4).unwrap();
        let mut a = BouncePages::default();
        assert!(p.alloc(3, &mut a));
        let (_, pages) = a.held().unwrap();
        assert_eq!(pages.len(), 3);
        let mut b = BouncePages::default();
        assert!(!p.alloc(2, &mut b));
        assert!(b.is_empty());
        assert_eq!(p.available(), 1);
        for &pg in a.held().unwrap().1 {
            let ptr = p
                .region()
                .ptr_at(BouncePool::offset(pg), PAGE_SIZE)
                .unwrap();
            assert_eq!(ptr as usize % PAGE_SIZE, 0);
        }
        p.free(&mut a);
        assert!(a.is_empty());
        assert_eq!(p.available(), 4);
        assert_eq!(p.capacity(), 4);
    }

    fn pages(a: &BouncePages) -> Vec<u32> {
        a.held().map_or(vec![], |(_, p)| p.to_vec())
    }

    #[test]
    fn pages_are_reused_before_fresh_ones_and_reclaimed_when_idle() {
        let mut p = BouncePool::new(8).unwrap();
        let (mut a0, mut a1, mut a2) = Default::default();
        assert!(p.alloc(1, &mut a0));
        assert!(p.alloc(1, &mut a1));
        assert!(p.alloc(1, &mut a2));
        assert_eq!(
            (pages(&a0), pages(&a1), pages(&a2)),
            (vec![0], vec![1], vec![2])
        );
        p.region().write(BouncePool::offset(1), b"data").unwrap();
        p.free(&mut a1);
        let mut b = BouncePages::default();
        assert!(p.alloc(2, &mut b));
        assert_eq!(
            pages(&b),
            vec![1, 3],
            "the freed page first, then a fresh one"
        );
        assert_eq!(p.in_use(), 4);
        assert_eq!(p.reclaim(), 0, "pages in use: nothing released");
        p.free(&mut a0);
        p.free(&mut a2);
        p.free(&mut b);
        assert_eq!(p.in_use(), 0);
        assert_eq!(p.reclaim(), 4 * PAGE_SIZE);
        let mut back = [1u8; 4];
        p.region().read(BouncePool::offset(1), &mut back).unwrap();
        assert_eq!(back, [0; 4], "released pages read as zeros");
        let mut c = BouncePages::default();
        assert!(p.alloc(8, &mut c));
        assert_eq!(pages(&c), (0..8).collect::<Vec<_>>());
        assert!(!p.alloc(1, &mut BouncePages::default()));
    }

    #[test]
    fn held_pages_outlive_their_pool() {
        let mut p = BouncePool::new(2).unwrap();
        let mut a = BouncePages::default();
        assert!(p.alloc(1, &mut a));
        assert!(!p.alloc(1, &mut a), "a request holds one set of pages");
        drop(p);
        // A ring torn down under a request in flight: the memory is still there.
        let (region, pages) = a.held().unwrap();
        region.write(BouncePool::offset(pages[0]), b"late").unwrap();
    }
}
