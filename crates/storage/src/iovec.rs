//! The iovec the queues keep: one `Send` wrapper for every format, and the one routine
//! that advances an array of them past a partial transfer.

/// A `libc::iovec` that may move between threads with its queue or a worker job.
#[repr(transparent)]
#[derive(Clone, Copy)]
pub(crate) struct IoVec(pub(crate) libc::iovec);

// SAFETY: the pointer inside is only an address handed to the kernel or to librbd, or
// written through by the queue (or qcow2 worker) that owns it for the documented copies and
// zero-fills; whoever holds it uses it from one thread at a time, and the validity of the
// memory is the submitter's contract (`StorageQueue::submit`), independent of the thread.
unsafe impl Send for IoVec {}

/// Drops `n` transferred bytes from the front of `iovs[*first..]`: whole iovecs by moving
/// `first` on, a partial one by moving its base. Only the copy is changed, never memory.
pub(crate) fn advance(iovs: &mut [IoVec], first: &mut usize, mut n: u64) {
    while n > 0 && *first < iovs.len() {
        let v = &mut iovs[*first].0;
        let len = v.iov_len as u64;
        if len <= n {
            n -= len;
            *first += 1;
        } else {
            // `n < len <= usize::MAX`, so the cast is lossless.
            #[allow(clippy::cast_possible_truncation)]
            let n_bytes = n as usize;
            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n_bytes).cast();
            v.iov_len -= n_bytes;
            n = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iov(base: usize, len: usize) -> IoVec {
        IoVec(libc::iovec {
            iov_base: base as *mut libc::c_void,
            iov_len: len,
        })
    }

    #[test]
    fn advance_skips_whole_iovecs_and_cuts_into_the_next() {
        let mut v = [iov(0x1000, 512), iov(0x2000, 4096), iov(0x4000, 100)];
        let mut first = 0;
        advance(&mut v, &mut first, 512 + 96);
        assert_eq!(first, 1);
        assert_eq!(v[1].0.iov_base as usize, 0x2000 + 96);
        assert_eq!(v[1].0.iov_len, 4000);
        advance(&mut v, &mut first, 4000 + 100 + 7);
        assert_eq!(first, 3, "past the end stops there");
    }
}
