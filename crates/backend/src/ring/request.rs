//! A request in flight and its storage operations: the [`Slot`] (blkback's `pending_req`)
//! with its phases, and [`InFlight`], the storage queue together with the slots whose
//! pages its operations point into.
//!
//! A request runs through phases: `Data` (the vectored read or write, split into chunks
//! of at most [`storage::MAX_SEGMENTS`] iovecs), `Flush`, `Discard`. FLUSH_DISKCACHE with
//! data is `Data` then `Flush`; so is WRITE_BARRIER, once the ring drained. The next phase
//! starts when every operation of the current one completed.
//!
//! Why handing guest pages to the kernel is sound: a slot's [`DataPages`] can be changed
//! or released only while none of its operations is pending ([`Slot::pages_mut`]), every
//! iovec is made from them ([`InFlight::submit_phase`]), and dropping an [`InFlight`]
//! drops its queue (which waits until the kernel is done with every operation) before the
//! slots.

use std::io;
use std::mem::ManuallyDrop;
use std::time::{Duration, Instant};

use blkif::abi::{BLKIF_RSP_OKAY, SECTOR_SIZE};
use blkif::{Operation, Request, Segment};
use storage::{is_unsupported, StorageOp, StorageQueue, SubmitError};

use super::pages::DataPages;
use super::Who;
use crate::slots::SlotPool;

/// Most iovecs in one storage operation.
pub(super) const MAX_IOV: usize = storage::MAX_SEGMENTS;

/// The step of a request being executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Accepted, nothing submitted yet (a barrier waiting for the drain, a request
    /// waiting for bounce pages or for room in the storage queue).
    Idle,
    Data,
    Flush,
    Discard,
}

/// A request in flight: blkback's `pending_req`. Its vectors keep their capacity from
/// one request to the next.
#[derive(Debug)]
pub(super) struct Slot {
    pub(super) id: u64,
    /// The ring's ticket for the request (its journal entry), given back with the answer.
    pub(super) ticket: blkif::Ticket,
    pub(super) op: Operation,
    pub(super) sector: u64,
    pub(super) nr_sectors: u64,
    pub(super) status: i16,
    /// The start of the pass that took the request off the ring (its latency's origin).
    pub(super) started: std::time::Instant,
    /// The failing operation was refused as unsupported (EOPNOTSUPP).
    pub(super) unsupported: bool,
    pub(super) phase: Phase,
    /// Storage operations of the current phase submitted and not yet reaped.
    pending: u32,
    /// Next data chunk to submit (a phase may be submitted in several goes when the
    /// storage queue is full).
    next_chunk: usize,
    pub(super) segs: Vec<Segment>,
    /// Where the segments' data is, held until the last operation was reaped.
    pages: DataPages,
}

impl Slot {
    fn new() -> Self {
        Self {
            id: 0,
            ticket: blkif::Ticket::UNJOURNALED,
            op: Operation::Read,
            sector: 0,
            nr_sectors: 0,
            status: BLKIF_RSP_OKAY,
            started: std::time::Instant::now(),
            unsupported: false,
            phase: Phase::Idle,
            pending: 0,
            next_chunk: 0,
            segs: Vec::new(),
            pages: DataPages::default(),
        }
    }

    /// Takes on a new request (its segments are already in `segs`).
    #[inline]
    pub(super) fn reset(&mut self, req: &Request) {
        debug_assert!(self.pending == 0 && self.pages.is_empty());
        self.id = req.id;
        self.op = req.operation;
        self.sector = req.sector;
        self.nr_sectors = req.nr_sectors;
        self.status = BLKIF_RSP_OKAY;
        self.unsupported = false;
        self.phase = Phase::Idle;
        self.pending = 0;
        self.next_chunk = 0;
    }

    pub(super) fn has_data(&self) -> bool {
        !self.segs.is_empty()
    }

    fn chunks(&self) -> usize {
        self.segs.len().div_ceil(MAX_IOV)
    }

    /// Whether the guest's pages are written by this request (READ fills them).
    #[inline]
    pub(super) fn fills_guest(&self) -> bool {
        self.op == Operation::Read
    }

    #[inline]
    pub(super) fn pages(&self) -> &DataPages {
        &self.pages
    }

    /// The segments and their pages, to acquire or release; `None` while a storage
    /// operation of the request may still use the pages.
    #[inline]
    pub(super) fn pages_mut(&mut self) -> Option<(&[Segment], &mut DataPages)> {
        (self.pending == 0).then_some((&self.segs, &mut self.pages))
    }

    /// The phase after `self.phase`, `None` when the request is complete.
    fn next_phase(&self) -> Option<Phase> {
        match (self.op, self.phase) {
            (Operation::Read | Operation::Write, Phase::Idle) => Some(Phase::Data),
            (Operation::Flush | Operation::Barrier, Phase::Idle) if self.has_data() => {
                Some(Phase::Data)
            }
            (Operation::Flush | Operation::Barrier, Phase::Idle | Phase::Data) => {
                Some(Phase::Flush)
            }
            (Operation::Discard { .. }, Phase::Idle) if self.nr_sectors > 0 => Some(Phase::Discard),
            _ => None,
        }
    }

    /// Moves to the next phase; `false` when the request is complete.
    #[inline]
    pub(super) fn advance(&mut self) -> bool {
        match self.next_phase() {
            Some(phase) => {
                self.phase = phase;
                self.next_chunk = 0;
                true
            }
            None => false,
        }
    }

    /// Stops submitting after a failure; the request finishes once what is in flight
    /// completed. Returns whether nothing is.
    pub(super) fn fail(&mut self, status: i16) -> bool {
        self.status = status;
        self.next_chunk = usize::MAX;
        self.pending == 0
    }

    /// Bytes a completed operation must report: the chunk's length for data, the range
    /// for discards; `None` for flushes.
    fn expected_len(&self, chunk: usize) -> Option<u64> {
        match self.phase {
            Phase::Data => Some(chunk_bytes(&self.segs, chunk * MAX_IOV) as u64),
            Phase::Discard => Some(self.nr_sectors * SECTOR_SIZE),
            Phase::Flush | Phase::Idle => None,
        }
    }
}

/// What a reaped completion means for its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// More of the phase is in flight or waits for queue room.
    Wait,
    /// The phase is done and the next one was entered: submit it.
    Next,
    /// Every operation completed (or one failed and the rest are done): answer.
    Done,
}

/// The iovec array handed to the storage. `libc::iovec` holds raw pointers, so it is not
/// `Send`; this buffer is always empty between uses (the storage copies the array at
/// submission), which is what makes moving the ring to its reactor thread sound.
struct IovScratch(Vec<libc::iovec>);

// SAFETY: the vector is cleared after every submission, so it never carries a pointer
// across threads; only its allocation moves.
unsafe impl Send for IovScratch {}

/// The storage queue and the request slots whose pages its operations point into.
pub(super) struct InFlight {
    /// Dropped first, by `Drop`: dropping the queue waits for the kernel.
    queue: ManuallyDrop<Box<dyn StorageQueue>>,
    slots: SlotPool<Slot>,
    iov: IovScratch,
    /// Data bytes submitted since the last commit.
    uncommitted_bytes: usize,
    who: Who,
    failures: FailureLog,
}

/// Storage failures are the operator's business (a full host file system, a lost NBD
/// server, an OSD down), so they are logged at `warn`; but a guest can repeat a failing
/// request at will, so one ring logs at most one line per [`FailureLog::INTERVAL`],
/// saying how many it stands for.
#[derive(Debug, Default)]
struct FailureLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl FailureLog {
    const INTERVAL: Duration = Duration::from_secs(10);

    fn record(&mut self, who: Who, op: Phase, error: &io::Error) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < Self::INTERVAL)
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(
            vbd = who.vbd,
            ring = who.ring,
            phase = ?op,
            %error,
            suppressed = self.suppressed,
            "storage operation failed; the guest gets an error response"
        );
        self.last = Some(now);
        self.suppressed = 0;
    }
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight")
            .field("in_use", &self.slots.in_use())
            .field("queue_in_flight", &self.queue.in_flight())
            .finish_non_exhaustive()
    }
}

impl InFlight {
    pub(super) fn new(queue: Box<dyn StorageQueue>, size: u32, who: Who) -> Self {
        Self {
            queue: ManuallyDrop::new(queue),
            slots: SlotPool::new(size, Slot::new),
            // Grows with the largest chunk the frontend sends: preallocated for MAX_IOV
            // iovecs it cost every ring 16 KiB whether or not it ever saw a big request.
            iov: IovScratch(Vec::with_capacity(
                blkif::abi::BLKIF_MAX_SEGMENTS_PER_REQUEST,
            )),
            uncommitted_bytes: 0,
            who,
            failures: FailureLog::default(),
        }
    }

    pub(super) fn slots(&self) -> &SlotPool<Slot> {
        &self.slots
    }

    pub(super) fn slots_mut(&mut self) -> &mut SlotPool<Slot> {
        &mut self.slots
    }

    pub(super) fn queue(&self) -> &dyn StorageQueue {
        &**self.queue
    }

    pub(super) fn uncommitted_bytes(&self) -> usize {
        self.uncommitted_bytes
    }

    /// Hands the queued operations to the kernel.
    pub(super) fn commit(&mut self) -> io::Result<()> {
        self.uncommitted_bytes = 0;
        self.queue.commit()
    }

    /// Collects the completions that are ready into `out`; returns how many.
    pub(super) fn reap(&mut self, out: &mut Vec<(u64, io::Result<u64>)>) -> usize {
        self.queue.reap(&mut |tag, result| out.push((tag, result)))
    }

    /// Submits what remains of the slot's current phase.
    #[inline]
    pub(super) fn submit_phase(&mut self, slot: u32) -> Result<(), SubmitError> {
        let s = self.slots.get(slot);
        let op = match s.phase {
            Phase::Idle => return Ok(()),
            Phase::Data => return self.submit_data(slot),
            Phase::Flush => StorageOp::Flush,
            Phase::Discard => StorageOp::Discard {
                offset: s.sector * SECTOR_SIZE,
                len: s.nr_sectors * SECTOR_SIZE,
                secure: matches!(s.op, Operation::Discard { secure: true }),
            },
        };
        // SAFETY: flush and discard carry no buffers.
        unsafe { self.queue.submit(op, tag(slot, 0)) }?;
        self.slots.get_mut(slot).pending += 1;
        Ok(())
    }

    /// Submits the remaining data chunks of a slot.
    #[inline]
    fn submit_data(&mut self, slot: u32) -> Result<(), SubmitError> {
        let chunks = self.slots.get(slot).chunks();
        while self.slots.get(slot).next_chunk < chunks {
            let s = self.slots.get(slot);
            let chunk = s.next_chunk;
            let first = chunk * MAX_IOV;
            let segs = &s.segs[first..(first + MAX_IOV).min(s.segs.len())];
            let sectors_before: u64 = s.segs[..first].iter().map(Segment::nr_sectors).sum();
            let offset = (s.sector + sectors_before) * SECTOR_SIZE;
            self.iov.0.clear();
            s.pages.iovecs(segs, first, &mut self.iov.0);
            let op = match s.op {
                Operation::Read => StorageOp::Read {
                    offset,
                    iov: &self.iov.0,
                },
                _ => StorageOp::Write {
                    offset,
                    iov: &self.iov.0,
                    fua: false,
                },
            };
            // SAFETY: the iovecs point into pages the slot's `DataPages` holds, inside
            // them (blkif checked first/last sector), writable for a READ (mapped
            // read-write, or bounce pages). The pages stay held until this operation is
            // reaped (`pending` counts it; `pages_mut` refuses meanwhile) or the queue is
            // dropped, which `InFlight::drop` does before dropping the slots. No Rust
            // reference to that memory exists.
            let r = unsafe { self.queue.submit(op, tag(slot, chunk)) };
            self.iov.0.clear();
            r?;
            let s = self.slots.get_mut(slot);
            s.pending += 1;
            s.next_chunk += 1;
            self.uncommitted_bytes += chunk_bytes(&s.segs, first);
        }
        Ok(())
    }

    /// One storage operation completed: records its outcome in its request. `None` for
    /// a tag that names no operation in flight.
    #[inline]
    pub(super) fn complete(&mut self, tag: u64, result: io::Result<u64>) -> Option<(u32, Step)> {
        let (slot, chunk) = untag(tag);
        let who = self.who;
        if !self.slots.is_busy(slot) || self.slots.get(slot).pending == 0 {
            tracing::error!(
                vbd = who.vbd,
                ring = who.ring,
                tag,
                "completion for no request"
            );
            return None;
        }
        let s = self.slots.get_mut(slot);
        let expected = s.expected_len(chunk);
        s.pending -= 1;
        match result {
            Ok(n) if expected.is_none_or(|e| n == e) => {}
            Ok(n) => {
                tracing::warn!(
                    vbd = who.vbd,
                    ring = who.ring,
                    transferred = n,
                    ?expected,
                    "short storage transfer"
                );
                s.status = blkif::abi::BLKIF_RSP_ERROR;
            }
            Err(e) => {
                if is_unsupported(&e) && s.phase != Phase::Data {
                    s.unsupported = true;
                } else {
                    self.failures.record(who, s.phase, &e);
                }
                s.status = blkif::abi::BLKIF_RSP_ERROR;
            }
        }
        let step = if s.pending > 0 || (s.phase == Phase::Data && s.next_chunk < s.chunks()) {
            Step::Wait
        } else if s.status != BLKIF_RSP_OKAY || !s.advance() {
            Step::Done
        } else {
            Step::Next
        };
        Some((slot, step))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // SAFETY: `queue` is not used again: this is the last use of `self` but for
        // the drop of the other fields. It goes before the slots so that the kernel has
        // finished with every operation before their pages are let go.
        unsafe { ManuallyDrop::drop(&mut self.queue) };
    }
}

/// Bytes of a data chunk starting at segment `first`.
fn chunk_bytes(segs: &[Segment], first: usize) -> usize {
    segs.get(first..(first + MAX_IOV).min(segs.len()))
        .map_or(0, |c| c.iter().map(Segment::len_bytes).sum())
}

/// Storage tags: the slot in the low half, the data chunk in the high half.
fn tag(slot: u32, chunk: usize) -> u64 {
    u64::from(slot) | ((chunk as u64) << 32)
}

fn untag(tag: u64) -> (u32, usize) {
    // Both halves fit by construction: the low 32 bits are the slot, the high the chunk.
    #[allow(clippy::cast_possible_truncation)]
    (tag as u32, (tag >> 32) as usize)
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, BorrowedFd};
    use std::sync::{Arc, Mutex};

    use blkif::abi::BLKIF_OP_WRITE;
    use platform::sim::{GuestConfig, SimGuest, SimPlatform};
    use platform::{Access, GrantMapper};
    use storage::Completion;

    use super::*;
    use crate::grant_budget::{MapBudget, MapCost};
    use crate::ring::pages::HeldMapping;

    /// A queue that keeps every operation in flight and, when dropped, notes how many
    /// grant mappings are still alive: what the kernel would see if it were still
    /// finishing them.
    struct Probe {
        fd: std::fs::File,
        platform: SimPlatform,
        live_at_drop: Arc<Mutex<Option<usize>>>,
        submitted: u32,
    }

    impl StorageQueue for Probe {
        unsafe fn submit(&mut self, _op: StorageOp<'_>, _tag: u64) -> Result<(), SubmitError> {
            self.submitted += 1;
            Ok(())
        }
        fn commit(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn completion_fd(&self) -> BorrowedFd<'_> {
            self.fd.as_fd()
        }
        fn wake(&self) -> io::Result<()> {
            Ok(())
        }
        fn reap(&mut self, _f: Completion<'_>) -> usize {
            0
        }
        fn in_flight(&self) -> u32 {
            self.submitted
        }
        fn depth(&self) -> u32 {
            16
        }
    }

    impl Drop for Probe {
        fn drop(&mut self) {
            *self.live_at_drop.lock().unwrap() = Some(self.platform.live_mappings());
        }
    }

    #[test]
    fn a_ring_torn_down_with_io_in_flight_unmaps_only_after_the_queue_is_gone() {
        let platform = SimPlatform::new();
        let guest = SimGuest::new(5, GuestConfig::default()).unwrap();
        let _domain = platform.attach_local(&guest).unwrap();
        let gref = guest.grant_access(0, 3, false).unwrap();
        let live_at_drop = Arc::new(Mutex::new(None));
        let queue = Probe {
            fd: std::fs::File::open("/dev/null").unwrap(),
            platform: platform.clone(),
            live_at_drop: live_at_drop.clone(),
            submitted: 0,
        };
        let who = Who { vbd: 1, ring: 0 };
        let mut io = InFlight::new(Box::new(queue), 4, who);

        // A one-segment write, its page mapped for the request only.
        let slot = io.slots_mut().alloc().unwrap();
        let seg = Segment {
            gref,
            first_sect: 0,
            last_sect: 7,
        };
        let raw = blkif::RawRequest::direct(BLKIF_OP_WRITE, 9, 0, 0, &[seg]).unwrap();
        let limits = blkif::DeviceLimits {
            sectors: 1 << 20,
            read_only: false,
            logical_block_size: 512,
            max_indirect_segments: 0,
            discard: false,
            secure_discard: false,
            flush: false,
            barrier: false,
        };
        let Ok(blkif::Validated::Ready(req)) = raw.validate(&limits) else {
            panic!("valid request refused");
        };
        let s = io.slots_mut().get_mut(slot);
        s.segs.clear();
        s.segs.push(seg);
        s.reset(&req);
        let share = MapBudget::unlimited()
            .guest(5)
            .try_take(MapCost::grants(1))
            .unwrap();
        let mapping = platform.map(5, &[gref], Access::ReadOnly).unwrap();
        let (_, pages) = s.pages_mut().unwrap();
        pages.begin_mapped(1);
        pages.hold_mapping(
            &[0],
            HeldMapping {
                mapping,
                _share: share,
            },
        );
        assert!(s.advance());
        io.submit_phase(slot).unwrap();
        assert!(
            io.slots_mut().get_mut(slot).pages_mut().is_none(),
            "pages cannot be let go while an operation is pending"
        );
        assert_eq!(platform.live_mappings(), 1);

        drop(io);
        assert_eq!(
            *live_at_drop.lock().unwrap(),
            Some(1),
            "the queue went first, with the page still mapped"
        );
        assert_eq!(platform.live_mappings(), 0, "then the page was unmapped");
    }
}
