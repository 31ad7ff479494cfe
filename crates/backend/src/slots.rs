//! The per-ring pool of request slots: blkback's `pending_req` free list, without the lock.
//!
//! A ring accepts at most as many requests as it has slots (one per ring entry, since a
//! well-behaved frontend never has more outstanding); when none is free the consumer
//! stops and counts `oo_req`, and resumes once a completion returns a slot. Slots are
//! allocated once when the ring is attached and reused: their buffers (segment lists,
//! iovecs) keep their capacity, so the steady state allocates nothing per request. The
//! slot index is the tag handed to the storage queue.

/// A fixed set of `T`s with a LIFO free list (recently used slots stay cache-warm).
pub(crate) struct SlotPool<T> {
    slots: Vec<T>,
    free: Vec<u32>,
    busy: Vec<bool>,
}

impl<T> SlotPool<T> {
    pub(crate) fn new(n: u32, mut make: impl FnMut() -> T) -> Self {
        Self {
            slots: (0..n).map(|_| make()).collect(),
            // Pop order 0, 1, 2, ...
            free: (0..n).rev().collect(),
            busy: vec![false; n as usize],
        }
    }

    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn in_use(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    pub(crate) fn has_free(&self) -> bool {
        !self.free.is_empty()
    }

    /// Takes a free slot.
    pub(crate) fn alloc(&mut self) -> Option<u32> {
        let i = self.free.pop()?;
        self.busy[i as usize] = true;
        Some(i)
    }

    /// Returns a slot. Freeing a slot that is not in use is ignored (and logged): it would
    /// otherwise let two requests share one slot.
    pub(crate) fn free(&mut self, i: u32) {
        match self.busy.get_mut(i as usize) {
            Some(b) if *b => {
                *b = false;
                self.free.push(i);
            }
            _ => tracing::error!(slot = i, "freeing a request slot that is not in use"),
        }
    }

    /// Whether `i` names a slot currently in use (tags coming back from storage are
    /// checked before they are trusted).
    pub(crate) fn is_busy(&self, i: u32) -> bool {
        self.busy.get(i as usize).copied().unwrap_or(false)
    }

    pub(crate) fn get(&self, i: u32) -> &T {
        &self.slots[i as usize]
    }

    pub(crate) fn get_mut(&mut self, i: u32) -> &mut T {
        &mut self.slots[i as usize]
    }

    /// Indices of the slots in use.
    #[cfg(test)]
    pub(crate) fn busy_indices(&self) -> impl Iterator<Item = u32> + '_ {
        self.busy
            .iter()
            .enumerate()
            .filter(|(_, b)| **b)
            .filter_map(|(i, _)| u32::try_from(i).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_until_empty_then_reuse() {
        let mut p = SlotPool::new(3, || 0u8);
        assert_eq!(p.capacity(), 3);
        let a = p.alloc().unwrap();
        let b = p.alloc().unwrap();
        let c = p.alloc().unwrap();
        assert_eq!((a, b, c), (0, 1, 2));
        assert!(p.alloc().is_none());
        assert_eq!(p.in_use(), 3);
        p.free(b);
        assert!(!p.is_busy(b));
        assert_eq!(p.alloc(), Some(b));
        p.free(7);
        p.free(a);
        p.free(a);
        assert_eq!(p.in_use(), 2);
        assert_eq!(p.busy_indices().collect::<Vec<_>>(), vec![1, 2]);
    }
}
