//! Bounce buffers for the grant-copy data path (qdisk style).
//!
//! In copy mode the backend never maps guest pages: a write's data is grant-copied from
//! the guest into backend-owned pages before the storage write, a read's data is
//! grant-copied out to the guest after the storage read. Those pages come from this
//! pool, one per ring.
//!
//! The pool is one page-aligned anonymous mapping reserved up front and backed by the
//! kernel lazily, so an idle ring costs address space only. Its size is the hard bound on
//! bounce memory a frontend can make the ring hold: blkback's `max_buffer_pages` (1024)
//! by default, raised to one maximal request when the VBD advertises more indirect
//! segments than that (a request must always fit when the ring is otherwise idle). A
//! request that does not fit waits, like one that finds no free request slot. Every page
//! is 4 KiB-aligned, so O_DIRECT storage accepts them as they are.

use shmem::{SharedMemory, PAGE_SIZE};

/// blkback's default `max_buffer_pages`.
pub const DEFAULT_MAX_BUFFER_PAGES: usize = 1024;

pub(crate) struct BouncePool {
    region: SharedMemory,
    free: Vec<u32>,
}

impl BouncePool {
    pub(crate) fn new(pages: usize) -> std::io::Result<Self> {
        let pages = pages.max(1);
        Ok(Self {
            region: SharedMemory::anonymous(pages * PAGE_SIZE)?,
            free: (0..pages as u32).rev().collect(),
        })
    }

    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.region.len() / PAGE_SIZE
    }

    #[cfg(test)]
    pub(crate) fn available(&self) -> usize {
        self.free.len()
    }

    /// Takes `n` pages into `out` (appending), all or none.
    pub(crate) fn alloc(&mut self, n: usize, out: &mut Vec<u32>) -> bool {
        if n > self.free.len() {
            return false;
        }
        let at = self.free.len() - n;
        out.extend(self.free.drain(at..));
        true
    }

    /// Returns pages taken by [`alloc`](Self::alloc).
    pub(crate) fn free(&mut self, pages: &[u32]) {
        self.free.extend_from_slice(pages);
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
}
