//! Aligned byte buffers for O_DIRECT I/O (tests, benchmarks, bounce buffers).
//!
//! Built on an over-allocated `Vec<u8>` and an offset, so no `unsafe` is needed: the heap
//! allocation never moves while the buffer lives, so the aligned window stays aligned.

/// A zero-initialised byte buffer whose start is aligned to `align` bytes.
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl AlignedBuf {
    /// Allocates `len` zero bytes aligned to `align` (a power of two).
    pub fn new(len: usize, align: usize) -> Self {
        assert!(align.is_power_of_two(), "alignment must be a power of two");
        let storage = vec![0u8; len + align];
        let start = storage.as_ptr().align_offset(align);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }

    /// Allocates `len` zero bytes aligned to the 4 KiB page size.
    pub fn page_aligned(len: usize) -> Self {
        Self::new(len, 4096)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.as_mut_slice().as_mut_ptr()
    }

    /// An iovec covering `range` of the buffer. The iovec borrows nothing: the caller keeps
    /// the buffer alive (and unaccessed) while an operation uses it.
    pub fn iovec(&mut self, range: std::ops::Range<usize>) -> libc::iovec {
        let slice = &mut self.as_mut_slice()[range];
        libc::iovec {
            iov_base: slice.as_mut_ptr().cast(),
            iov_len: slice.len(),
        }
    }

    /// An iovec covering the whole buffer.
    pub fn full_iovec(&mut self) -> libc::iovec {
        let len = self.len;
        self.iovec(0..len)
    }
}

#[cfg(test)]
mod tests {
    use super::AlignedBuf;

    #[test]
    fn alignment_holds() {
        for align in [512usize, 4096, 65536] {
            let mut b = AlignedBuf::new(3 * align, align);
            assert_eq!(b.as_mut_ptr() as usize % align, 0);
            assert_eq!(b.len(), 3 * align);
            assert!(b.as_slice().iter().all(|&x| x == 0));
        }
    }
}
