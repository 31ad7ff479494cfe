//! When an io_uring queue hands what it has queued to the kernel: at the end of the
//! reactor's pass (`commit`), or earlier, one operation at a time, while the device is
//! nearly idle and nothing queued could merge with what comes next.
//!
//! Why: `io_uring_enter` with several SQEs runs them under one block-layer plug, so the
//! device sees the first request only when the whole batch has been built and the plug is
//! flushed (perf trace on a virtio disk: 30 µs of bio preparation for 30 requests before
//! the first `block_rq_issue`). A backend whose device completes in bursts (every virtio
//! disk coalesces interrupts) then leaves it idle for that time on every burst: 4 KiB
//! random reads at QD32 ran at 0.78-0.83 of fio, which enters the kernel once per request.
//! Handing each request over as it is parsed while the kernel holds fewer than
//! [`EAGER_BELOW`] operations brought it to 0.95-1.03 at the same CPU per I/O (BENCHMARKS,
//! "Eager submission"). A plug is still worth having when its requests merge: sequential
//! 4 KiB reads run 1.2-1.4x faster batched than one by one, so an operation contiguous
//! with the one queued before it (same file, same direction, starting where it ended)
//! keeps the batch together.

use std::os::fd::RawFd;

/// While the kernel holds fewer operations than this, the device may drain before the
/// pass ends: queued operations go to the kernel at once. Above it, the device has work
/// for longer than a pass takes to build, and the pass's operations go in one
/// `io_uring_enter` (fewer system calls at high depth).
pub(crate) const EAGER_BELOW: u32 = 16;

/// The last read or write pushed onto a queue's SQ, to tell whether the next one continues
/// it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tail {
    fd: RawFd,
    write: bool,
    end: u64,
}

/// One queue's submission policy (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct SubmitPacer {
    tail: Option<Tail>,
}

/// An SQE about to be pushed, as the pacer sees it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Pushed {
    /// A read or write of `len` bytes at `offset` of `fd`.
    Data {
        fd: RawFd,
        write: bool,
        offset: u64,
        len: u64,
    },
    /// Anything else (flush, discard): merges with nothing.
    Other,
}

impl SubmitPacer {
    /// Called before `op` is pushed, with the SQEs already `queued` in the SQ and the
    /// operations the kernel holds (`in_kernel`, submitted and not yet completed). True
    /// if the queued SQEs should be submitted first.
    pub(crate) fn submit_first(&mut self, op: Pushed, queued: u32, in_kernel: u32) -> bool {
        let (next, continues) = match op {
            Pushed::Data {
                fd,
                write,
                offset,
                len,
            } => {
                let continues = self
                    .tail
                    .is_some_and(|t| t.fd == fd && t.write == write && t.end == offset);
                (
                    Some(Tail {
                        fd,
                        write,
                        end: offset.saturating_add(len),
                    }),
                    continues,
                )
            }
            Pushed::Other => (None, false),
        };
        self.tail = next;
        queued > 0 && !continues && in_kernel < EAGER_BELOW
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(offset: u64) -> Pushed {
        Pushed::Data {
            fd: 3,
            write: false,
            offset,
            len: 4096,
        }
    }

    #[test]
    fn random_requests_go_to_an_idle_device_one_by_one() {
        let mut p = SubmitPacer::default();
        // Nothing queued yet: nothing to submit.
        assert!(!p.submit_first(read(8 << 20), 0, 0));
        // The next one does not continue it and the device is idle: submit the first now.
        assert!(p.submit_first(read(4096), 1, 0));
        assert!(p.submit_first(read(1 << 30), 1, 1));
    }

    #[test]
    fn a_busy_device_gets_the_pass_in_one_batch() {
        let mut p = SubmitPacer::default();
        p.submit_first(read(0), 0, EAGER_BELOW);
        assert!(!p.submit_first(read(1 << 20), 1, EAGER_BELOW));
        assert!(!p.submit_first(read(3 << 20), 2, EAGER_BELOW + 10));
        assert!(p.submit_first(read(5 << 20), 3, EAGER_BELOW - 1));
    }

    #[test]
    fn contiguous_requests_stay_together_to_merge_under_the_plug() {
        let mut p = SubmitPacer::default();
        p.submit_first(read(0), 0, 0);
        for i in 1..64 {
            assert!(!p.submit_first(read(i * 4096), 1, 0), "request {i}");
        }
        // A write where the reads ended does not continue them, nor does another file.
        let w = Pushed::Data {
            fd: 3,
            write: true,
            offset: 64 * 4096,
            len: 4096,
        };
        assert!(p.submit_first(w, 5, 0));
        let other_file = Pushed::Data {
            fd: 4,
            write: true,
            offset: 65 * 4096,
            len: 4096,
        };
        assert!(p.submit_first(other_file, 1, 0));
        // A flush continues nothing and nothing continues it.
        assert!(p.submit_first(Pushed::Other, 1, 0));
        assert!(p.submit_first(read(0), 1, 0));
    }

    #[test]
    fn an_offset_at_the_end_of_u64_does_not_wrap_into_a_match() {
        let mut p = SubmitPacer::default();
        p.submit_first(
            Pushed::Data {
                fd: 3,
                write: false,
                offset: u64::MAX - 10,
                len: 4096,
            },
            0,
            0,
        );
        assert!(p.submit_first(read(4085), 1, 0));
    }
}
