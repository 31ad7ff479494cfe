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

use shmem::{SharedMemory, PAGE_SIZE};

/// Default bound on a ring's bounce pages: 32 MiB, 32 requests of 1 MiB in flight.
///
/// blkback's `max_buffer_pages` (1 024) bounds a cache of free pages; here the pool bounds
/// the data in flight through copies, and 1 024 pages held only four 1 MiB requests: with
/// a device faster than ~1 GB/s, 1 MiB I/O through copies ran at half the device's speed
/// waiting for pages. The memory is used only while requests hold it and is reclaimed
/// after the pool goes idle.
pub const DEFAULT_MAX_BUFFER_PAGES: usize = 8192;

pub(crate) struct BouncePool {
    region: SharedMemory,
    /// Pages freed and not yet reused (the most recently freed last).
    free: Vec<u32>,
    /// Pages `fresh..capacity` have never been handed out since the last reclaim.
    fresh: u32,
    capacity: u32,
}

impl BouncePool {
    pub(crate) fn new(pages: usize) -> std::io::Result<Self> {
        let pages = pages.clamp(1, u32::MAX as usize);
        Ok(Self {
            region: SharedMemory::anonymous(pages * PAGE_SIZE)?,
            free: Vec::new(),
            fresh: 0,
            capacity: pages as u32,
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

    /// Takes `n` pages into `out` (appending), all or none: freed pages first (warm in
    /// cache, backed already), then never-used ones.
    pub(crate) fn alloc(&mut self, n: usize, out: &mut Vec<u32>) -> bool {
        if n > self.available() {
            return false;
        }
        let reuse = n.min(self.free.len());
        out.extend(self.free.drain(self.free.len() - reuse..));
        let more = (n - reuse) as u32;
        out.extend(self.fresh..self.fresh + more);
        self.fresh += more;
        true
    }

    /// Returns pages taken by [`alloc`](Self::alloc).
    pub(crate) fn free(&mut self, pages: &[u32]) {
        self.free.extend_from_slice(pages);
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

    /// The memory of the pool (for grant copies and iovecs into page `i`).
    pub(crate) fn region(&self) -> &SharedMemory {
        &self.region
    }

    /// Byte offset of page `i` in [`region`](Self::region).
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
        let mut a = vec![];
        assert!(p.alloc(3, &mut a));
        assert_eq!(a.len(), 3);
        let mut b = vec![];
        assert!(!p.alloc(2, &mut b));
        assert!(b.is_empty());
        assert_eq!(p.available(), 1);
        for &pg in &a {
            let ptr = p
                .region()
                .ptr_at(BouncePool::offset(pg), PAGE_SIZE)
                .unwrap();
            assert_eq!(ptr as usize % PAGE_SIZE, 0);
        }
        p.free(&a);
        assert_eq!(p.available(), 4);
        assert_eq!(p.capacity(), 4);
    }

    #[test]
    fn pages_are_reused_before_fresh_ones_and_reclaimed_when_idle() {
        let mut p = BouncePool::new(8).unwrap();
        let mut a = vec![];
        assert!(p.alloc(3, &mut a));
        assert_eq!(a, vec![0, 1, 2]);
        p.region().write(BouncePool::offset(1), b"data").unwrap();
        p.free(&a[1..2]);
        let mut b = vec![];
        assert!(p.alloc(2, &mut b));
        assert_eq!(b, vec![1, 3], "the freed page first, then a fresh one");
        assert_eq!(p.in_use(), 4);
        assert_eq!(p.reclaim(), 0, "pages in use: nothing released");
        p.free(&a[..1]);
        p.free(&a[2..]);
        p.free(&b);
        assert_eq!(p.in_use(), 0);
        assert_eq!(p.reclaim(), 4 * PAGE_SIZE);
        let mut back = [1u8; 4];
        p.region().read(BouncePool::offset(1), &mut back).unwrap();
        assert_eq!(back, [0; 4], "released pages read as zeros");
        let mut c = vec![];
        assert!(p.alloc(8, &mut c));
        assert_eq!(c, (0..8).collect::<Vec<_>>());
        assert!(!p.alloc(1, &mut vec![]));
    }
}
