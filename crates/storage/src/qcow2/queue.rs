//! The queue of the qcow2 backend: one per ring, owned by the ring's reactor.
//!
//! Two paths, both ending at the queue's completion eventfd:
//! - **Mapped I/O (the reactor, io_uring).** A read or write enters the image's gate
//!   shared (never waiting), then asks imago where its guest range lives, with storage I/O
//!   forbidden on this thread (`host_file::lookup_only`): a hit in imago's L2 cache answers
//!   at once, a miss fails the lookup. If every piece is data already allocated (for a write:
//!   in the top image and not shared, imago's `writable`), or reads as zeros, the request
//!   becomes up to [`MAX_EXTENTS`] `READV`/`WRITEV` SQEs on the files' own descriptors,
//!   zero pieces are filled in place, and the ring's CQEs signal the eventfd as in the raw
//!   backend. This is every read and write of an allocated image: no thread hop, no copy.
//! - **The worker.** Everything else — an uncached L2 table, allocation, copy-on-write from
//!   a backing file, compressed clusters, zero clusters being written, discard, flush,
//!   requests split into more than [`MAX_EXTENTS`] pieces — goes to the queue's worker
//!   thread (started at the first such request) through a bounded channel of `depth`
//!   entries. The worker runs imago's synchronous `read`/`write`/`flush`/`sync`/discard
//!   with the data bounced through a 1 MiB buffer of its own (imago needs Rust slices; the
//!   guest's pages are only ever touched through raw pointers), appends the result to the
//!   queue's result list and writes the eventfd.
//!
//! Nothing on the mapped path allocates once the slot's vectors have grown to the
//! request's size (they are reused); the worker path allocates inside imago, which is
//! allocation and metadata I/O anyway.
//!
//! Waiting: a reactor may wait on imago's internal locks while a worker holds them across
//! a metadata read or write of the same image (an L2 table being loaded or updated); it
//! never performs I/O itself and never waits on the gate.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use imago::Mapping;
use io_uring::{opcode, types, IoUring};

use super::host_file::lookup_only;
use super::worker::{Job, JobOp, Port, Worker};
use super::Image;
use crate::iovec::IoVec;
use crate::pacer::{Pushed, SubmitPacer};
use crate::{
    validate, Completion, StorageError, StorageInfo, StorageOp, StorageQueue, SubmitError,
};
use eventfd::EventFd;

/// Most pieces a request is split into on the mapped path (more go to the worker).
pub(crate) const MAX_EXTENTS: usize = 32;
/// Resubmissions of an SQE that failed with EAGAIN/EINTR.
const MAX_RETRIES: u8 = 3;
/// iovecs reserved per slot up front: a direct blkif request has at most 11 segments.
const INITIAL_IOVS_PER_SLOT: usize = 16;
/// `Extent::fd` of a piece that reads as zeros.
const ZERO_FD: RawFd = -1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Free,
    /// Its pieces are in the io_uring.
    Ring,
    /// Handed to the worker.
    Worker,
    /// Completed at submission (every piece read as zeros), delivered at the next reap.
    Ready,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Read,
    Write { fua: bool },
}

/// One contiguous piece of a request on the mapped path.
struct Extent {
    /// File to read or write ([`ZERO_FD`]: reads as zeros, filled at submission).
    fd: RawFd,
    host_offset: u64,
    len: u64,
    done: u64,
    /// This piece's iovecs in `Slot::pieces`; `first` advances as it completes short.
    first: usize,
    end: usize,
    retries: u8,
}

struct Slot {
    tag: u64,
    state: SlotState,
    direction: Direction,
    total: u64,
    /// The queue's copy of the caller's iovecs.
    iovs: Vec<IoVec>,
    /// The same memory cut along extent boundaries (mapped path only).
    pieces: Vec<IoVec>,
    extents: Vec<Extent>,
    /// SQEs of this slot not yet completed.
    pending: u32,
    error: Option<io::Error>,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            tag: 0,
            state: SlotState::Free,
            direction: Direction::Read,
            total: 0,
            iovs: Vec::with_capacity(INITIAL_IOVS_PER_SLOT),
            pieces: Vec::with_capacity(INITIAL_IOVS_PER_SLOT + 2),
            extents: Vec::with_capacity(4),
            pending: 0,
            error: None,
        }
    }
}

pub(crate) struct Qcow2Queue {
    image: Arc<Image>,
    info: StorageInfo,
    ring: IoUring,
    port: Arc<Port>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    depth: u32,
    /// SQEs pushed whose CQE has not been seen.
    in_ring: u32,
    /// Completed at submission, not yet delivered.
    ready: Vec<(u32, io::Result<u64>)>,
    ready_unsignalled: bool,
    worker: Option<Worker>,
    /// Reused buffers for draining the CQ and the worker's results.
    cqes: Vec<(u64, i32)>,
    results: Vec<(u32, io::Result<u64>)>,
    /// Whether a new extent sends what is queued to the kernel first (module `pacer`).
    pacer: SubmitPacer,
}

/// Cuts a request's iovecs along its extents: extent `e` gets pieces `e.first..e.end`.
/// The pieces of a zero extent are filled with zeros now (and the extent done), not
/// queued.
///
/// # Safety
/// For a read with zero extents, `iovs` must describe memory writable until the read
/// completes (the `submit` contract), with no Rust reference to it.
unsafe fn cut_along_extents(extents: &mut [Extent], iovs: &[IoVec], pieces: &mut Vec<IoVec>) {
    let (mut iov_idx, mut iov_off) = (0usize, 0usize);
    for e in extents.iter_mut() {
        e.first = pieces.len();
        let mut left = e.len;
        while left > 0 {
            let Some(v) = iovs.get(iov_idx) else {
                break;
            };
            let avail = v.0.iov_len - iov_off;
            let take = avail.min(usize::try_from(left).unwrap_or(usize::MAX));
            let piece = libc::iovec {
                iov_base: v.0.iov_base.cast::<u8>().wrapping_add(iov_off).cast(),
                iov_len: take,
            };
            if e.fd == ZERO_FD {
                // SAFETY: the piece lies inside an iovec the caller guarantees writable
                // for this read until its completion, with no Rust reference to it.
                unsafe { std::ptr::write_bytes(piece.iov_base.cast::<u8>(), 0, take) };
            } else {
                pieces.push(IoVec(piece));
            }
            left -= take as u64;
            iov_off += take;
            if iov_off == v.0.iov_len {
                iov_idx += 1;
                iov_off = 0;
            }
        }
        e.end = pieces.len();
        if e.fd == ZERO_FD {
            e.done = e.len;
        }
    }
}

impl Qcow2Queue {
    pub(crate) fn new(
        image: Arc<Image>,
        info: StorageInfo,
        depth: u32,
    ) -> Result<Qcow2Queue, StorageError> {
        let entries = depth.next_power_of_two().max(8);
        let ring = IoUring::builder()
            .dontfork()
            .build(entries)
            .map_err(StorageError::Ring)?;
        let port = Arc::new(Port {
            results: Mutex::new(Vec::with_capacity(depth as usize)),
            eventfd: EventFd::new().map_err(StorageError::EventFd)?,
        });
        ring.submitter()
            .register_eventfd(port.eventfd.as_raw_fd())
            .map_err(StorageError::Ring)?;
        Ok(Qcow2Queue {
            image,
            info,
            ring,
            port,
            slots: (0..depth).map(|_| Slot::new()).collect(),
            free: (0..depth).rev().collect(),
            depth,
            in_ring: 0,
            ready: Vec::with_capacity(depth as usize),
            ready_unsignalled: false,
            worker: None,
            cqes: Vec::with_capacity(entries as usize * 2),
            results: Vec::with_capacity(depth as usize),
            pacer: SubmitPacer::default(),
        })
    }

    fn release(&mut self, idx: u32) -> u64 {
        let slot = &mut self.slots[idx as usize];
        slot.state = SlotState::Free;
        slot.iovs.clear();
        slot.pieces.clear();
        slot.extents.clear();
        slot.error = None;
        self.free.push(idx);
        slot.tag
    }

    /// Resolves a read or write into extents and queues its SQEs. False (with nothing
    /// queued and the gate left) when the request needs the worker.
    fn try_mapped(&mut self, idx: u32, offset: u64) -> bool {
        let Qcow2Queue { image, slots, .. } = self;
        if !image.gate.try_enter_shared() {
            return false;
        }
        let slot = &mut slots[idx as usize];
        let (direction, total) = (slot.direction, slot.total);
        let resolved = lookup_only(|| {
            let mut pos = 0u64;
            while pos < total {
                let Ok((mapping, len)) = image.access.get_mapping(offset + pos, total - pos) else {
                    return false;
                };
                let len = len.min(total - pos);
                if len == 0 {
                    return false;
                }
                let (fd, host_offset) = match mapping {
                    Mapping::Raw {
                        storage,
                        offset: host,
                        writable,
                        ..
                    } => {
                        if matches!(direction, Direction::Write { .. }) && !writable {
                            return false;
                        }
                        (storage.io_fd(), host)
                    }
                    Mapping::Zero { .. } if direction == Direction::Read => (ZERO_FD, 0),
                    _ => return false,
                };
                let full = slot.extents.len() == MAX_EXTENTS;
                match slot.extents.last_mut() {
                    Some(last)
                        if last.fd == fd
                            && (fd == ZERO_FD || last.host_offset + last.len == host_offset) =>
                    {
                        last.len += len
                    }
                    _ if full => return false,
                    _ => slot.extents.push(Extent {
                        fd,
                        host_offset,
                        len,
                        done: 0,
                        first: 0,
                        end: 0,
                        retries: 0,
                    }),
                }
                pos += len;
            }
            true
        });
        if !resolved {
            slot.extents.clear();
            image.gate.leave_shared();
            return false;
        }

        // SAFETY: the iovecs are the submitter's, valid for this operation (the `submit`
        // contract); zero extents exist only for reads.
        unsafe { cut_along_extents(&mut slot.extents, &slot.iovs, &mut slot.pieces) };

        slot.pending = 0;
        slot.state = SlotState::Ring;
        let extents = slot.extents.len();
        for j in 0..extents {
            if self.slots[idx as usize].extents[j].fd == ZERO_FD {
                continue;
            }
            self.slots[idx as usize].pending += 1;
            let e = &self.slots[idx as usize].extents[j];
            let pushed = Pushed::Data {
                fd: e.fd,
                write: matches!(self.slots[idx as usize].direction, Direction::Write { .. }),
                offset: e.host_offset,
                len: e.len,
            };
            let queued = u32::try_from(self.ring.submission().len()).unwrap_or(u32::MAX);
            if self
                .pacer
                .submit_first(pushed, queued, self.in_ring.saturating_sub(queued))
            {
                // A failure leaves the SQEs queued for `commit`, which reports it.
                let _ = self.submit_queued();
            }
            if let Err(e) = self.push(idx, j) {
                // Cannot happen after a successful submit-to-make-room; fail the piece
                // rather than lose it.
                let slot = &mut self.slots[idx as usize];
                slot.pending -= 1;
                slot.error.get_or_insert(e);
            }
        }
        let slot = &mut self.slots[idx as usize];
        if slot.pending == 0 {
            slot.state = SlotState::Ready;
            let result = match slot.error.take() {
                Some(e) => Err(e),
                None => Ok(slot.total),
            };
            self.image.gate.leave_shared();
            self.ready.push((idx, result));
            self.ready_unsignalled = true;
        }
        true
    }

    /// Pushes the SQE for extent `j` of slot `idx`, handing the SQ to the kernel first if
    /// it is full (a slot may need up to [`MAX_EXTENTS`] entries).
    fn push(&mut self, idx: u32, j: usize) -> io::Result<()> {
        let entry = {
            let slot = &self.slots[idx as usize];
            let e = &slot.extents[j];
            let iov = slot.pieces[e.first..e.end].as_ptr().cast::<libc::iovec>();
            // At most MAX_SEGMENTS + MAX_EXTENTS pieces: fits u32.
            #[allow(clippy::cast_possible_truncation)]
            let count = (e.end - e.first) as u32;
            let fd = types::Fd(e.fd);
            let at = e.host_offset + e.done;
            let user_data = (u64::from(idx) << 32) | j as u64;
            match slot.direction {
                Direction::Read => opcode::Readv::new(fd, iov, count).offset(at).build(),
                Direction::Write { fua } => opcode::Writev::new(fd, iov, count)
                    .offset(at)
                    .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                    .build(),
            }
            .user_data(user_data)
        };
        for _ in 0..2 {
            // SAFETY: the SQE refers to (a) the slot's `pieces`, owned by this queue and
            // neither reallocated nor freed while the slot is in state `Ring` (released only
            // after its last CQE was reaped; Drop waits for every CQE); (b) the caller's
            // buffers, valid until the completion is delivered or the queue dropped (the
            // `submit` contract); (c) a descriptor owned by a `HostFile` of `self.image`,
            // which this queue keeps alive.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.in_ring += 1;
                return Ok(());
            }
            self.submit_queued()?;
        }
        Err(io::Error::other("io_uring submission queue full"))
    }

    fn submit_queued(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn hand_to_worker(&mut self, idx: u32, op: JobOp) {
        let slot = &mut self.slots[idx as usize];
        slot.state = SlotState::Worker;
        let job = Job {
            slot: idx,
            op,
            iov: slot.iovs.as_ptr(),
            iov_count: slot.iovs.len(),
        };
        if let Err(e) = self.send(job) {
            tracing::error!(path = %self.image.path.display(), error = %e,
                "qcow2 worker unavailable");
            self.slots[idx as usize].state = SlotState::Ready;
            self.ready.push((idx, Err(e)));
            self.ready_unsignalled = true;
        }
    }

    fn send(&mut self, job: Job) -> io::Result<()> {
        if self.worker.is_none() {
            self.worker = Some(Worker::start(&self.image, &self.port, self.depth)?);
        }
        match &self.worker {
            Some(w) => w.send(job),
            None => Err(io::Error::other("qcow2 worker thread not started")),
        }
    }

    /// Handles one CQE; returns the completed slot's tag and result when it finished.
    fn on_cqe(
        &mut self,
        user_data: u64,
        res: i32,
        resubmit: &mut bool,
    ) -> Option<(u64, io::Result<u64>)> {
        let idx = (user_data >> 32) as u32;
        let j = (user_data & 0xffff_ffff) as usize;
        let slot = self.slots.get_mut(idx as usize)?;
        if slot.state != SlotState::Ring || j >= slot.extents.len() {
            tracing::error!(user_data, "CQE for no operation in flight");
            return None;
        }
        self.in_ring = self.in_ring.saturating_sub(1);
        let direction = slot.direction;
        let e = &mut slot.extents[j];
        let mut finished = true;
        if res < 0 {
            let errno = -res;
            if (errno == libc::EAGAIN || errno == libc::EINTR) && e.retries < MAX_RETRIES {
                e.retries += 1;
                finished = false;
            } else {
                slot.error
                    .get_or_insert(io::Error::from_raw_os_error(errno));
            }
        } else if res == 0 {
            match direction {
                Direction::Read => {
                    // End of a file inside the image's size (a raw backing file shorter
                    // than its overlay, a data cluster at the end of the file): zeros.
                    for piece in &slot.pieces[e.first..e.end] {
                        // SAFETY: as for the zero extents at submission: caller-guaranteed
                        // writable memory for this read, no Rust reference to it.
                        unsafe {
                            std::ptr::write_bytes(piece.0.iov_base.cast::<u8>(), 0, piece.0.iov_len)
                        };
                    }
                    e.done = e.len;
                }
                Direction::Write { .. } => {
                    slot.error
                        .get_or_insert(io::Error::from(io::ErrorKind::WriteZero));
                }
            }
        } else {
            let mut n = res as u64;
            e.done += n;
            if e.done < e.len {
                // Drop the transferred prefix from this extent's pieces and go on.
                while n > 0 && e.first < e.end {
                    let v = &mut slot.pieces[e.first].0;
                    let len = v.iov_len as u64;
                    if len <= n {
                        n -= len;
                        e.first += 1;
                    } else {
                        // `n < len <= usize::MAX`, so the cast is lossless.
                        #[allow(clippy::cast_possible_truncation)]
                        let n_bytes = n as usize;
                        v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n_bytes).cast();
                        v.iov_len -= n_bytes;
                        n = 0;
                    }
                }
                finished = e.first == e.end;
                if finished {
                    slot.error
                        .get_or_insert(io::Error::other("transfer longer than its buffers"));
                }
            }
        }
        if !finished {
            match self.push(idx, j) {
                Ok(()) => {
                    *resubmit = true;
                    return None;
                }
                Err(e) => {
                    self.slots[idx as usize].error.get_or_insert(e);
                }
            }
        }
        let slot = &mut self.slots[idx as usize];
        slot.pending -= 1;
        if slot.pending > 0 {
            return None;
        }
        let result = match slot.error.take() {
            Some(e) => Err(e),
            None => Ok(slot.total),
        };
        self.image.gate.leave_shared();
        let tag = self.release(idx);
        Some((tag, result))
    }
}

impl StorageQueue for Qcow2Queue {
    unsafe fn submit(&mut self, op: StorageOp<'_>, tag: u64) -> Result<(), SubmitError> {
        let total = validate(&op, &self.info, self.info.size_bytes)?;
        let idx = self.free.pop().ok_or(SubmitError::Full)?;
        let slot = &mut self.slots[idx as usize];
        slot.tag = tag;
        slot.total = total;
        slot.error = None;
        slot.iovs.clear();
        slot.pieces.clear();
        slot.extents.clear();
        match op {
            StorageOp::Read { offset, iov } | StorageOp::Write { offset, iov, .. } => {
                let (direction, job) = match op {
                    StorageOp::Write { fua, .. } => (
                        Direction::Write { fua },
                        JobOp::Write {
                            offset,
                            len: total,
                            fua,
                        },
                    ),
                    _ => (Direction::Read, JobOp::Read { offset, len: total }),
                };
                slot.direction = direction;
                slot.iovs.extend(iov.iter().map(|v| IoVec(*v)));
                if self.try_mapped(idx, offset) {
                    self.image.mapped.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.image.worker.fetch_add(1, Ordering::Relaxed);
                    self.hand_to_worker(idx, job);
                }
            }
            StorageOp::Flush => self.hand_to_worker(idx, JobOp::Flush),
            StorageOp::Discard { offset, len, .. } => {
                self.hand_to_worker(idx, JobOp::Discard { offset, len })
            }
        }
        Ok(())
    }

    fn commit(&mut self) -> io::Result<()> {
        if self.ready_unsignalled {
            self.ready_unsignalled = false;
            self.port.eventfd.signal()?;
        }
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        self.submit_queued()
    }

    fn completion_fd(&self) -> BorrowedFd<'_> {
        self.port.eventfd.as_fd()
    }

    fn wake(&self) -> io::Result<()> {
        self.port.eventfd.signal()
    }

    fn reap(&mut self, f: Completion<'_>) -> usize {
        // Clear the fd first: a completion posted after this point signals it again.
        self.port.eventfd.drain();
        let mut delivered = 0;
        let mut resubmitted = false;

        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        for &(user_data, res) in &cqes {
            if let Some((tag, result)) = self.on_cqe(user_data, res, &mut resubmitted) {
                f(tag, result);
                delivered += 1;
            }
        }
        cqes.clear();
        self.cqes = cqes;

        let mut results = std::mem::take(&mut self.results);
        results.append(&mut self.port.results.lock().unwrap_or_else(|p| p.into_inner()));
        let mut ready = std::mem::take(&mut self.ready);
        for (idx, result) in results.drain(..).chain(ready.drain(..)) {
            let tag = self.release(idx);
            f(tag, result);
            delivered += 1;
        }
        self.results = results;
        self.ready = ready;

        if resubmitted {
            if let Err(e) = self.submit_queued() {
                tracing::warn!(error = %e, "resubmitting short transfers failed; will retry");
                let _ = self.port.eventfd.signal();
            }
        }
        delivered
    }

    fn in_flight(&self) -> u32 {
        // The free list holds at most `depth` slots.
        self.depth - u32::try_from(self.free.len()).unwrap_or(self.depth)
    }

    fn depth(&self) -> u32 {
        self.depth
    }
}

impl Drop for Qcow2Queue {
    fn drop(&mut self) {
        // The worker finishes the jobs it was given (their memory is valid until we return):
        // dropping it joins it.
        drop(self.worker.take());
        if let Err(e) = self.submit_queued() {
            tracing::warn!(error = %e, "submitting queued operations at queue drop failed");
        }
        loop {
            let unsubmitted = u32::try_from(self.ring.submission().len()).unwrap_or(u32::MAX);
            if self.in_ring <= unsubmitted {
                break;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "waiting for in-flight operations at queue drop");
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            let seen = u32::try_from(self.ring.completion().count()).unwrap_or(u32::MAX);
            self.in_ring = self.in_ring.saturating_sub(seen);
        }
        // Requests that were on the ring held the gate; give it back so a later discard on
        // the image (through another queue) does not wait for them for ever.
        for slot in &self.slots {
            if slot.state == SlotState::Ring {
                self.image.gate.leave_shared();
            }
        }
    }
}
