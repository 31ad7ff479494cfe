//! The io_uring queue of the raw backend: one ring per [`crate::StorageQueue`].
//!
//! This module owns the life of an operation from `submit` to `reap`:
//! - **Slots.** A queue has `depth` slots; an operation occupies one from submission until
//!   its completion is delivered. The slot index is the SQE's `user_data`. Each slot owns a
//!   copy of the caller's iovec array, so the array the kernel reads stays valid until the
//!   operation completes, whatever the caller does with its own slice. A slot has at most
//!   one SQE in the kernel at a time, and the ring has at least `depth` SQ entries, so a
//!   push never finds the SQ full.
//! - **Ops.** Read/write are `IORING_OP_READV`/`WRITEV`; a FUA write carries `RWF_DSYNC`, so
//!   the kernel makes it durable before completing it (a device FUA write under O_DIRECT,
//!   a ranged data sync otherwise) in one SQE, with no ordering to manage. Flush is
//!   `IORING_OP_FSYNC` with `DATASYNC` (fdatasync). Discard on a file is
//!   `IORING_OP_FALLOCATE(PUNCH_HOLE | KEEP_SIZE)`, which io_uring runs on its own worker
//!   threads. Discard on a block device is the `BLKDISCARD`/`BLKSECDISCARD` ioctl, which has
//!   no io_uring op on the kernels we target and blocks until the device is done, so it
//!   runs on a helper thread per queue (started at the first discard), which posts its
//!   result and writes the queue's wake eventfd: the reactor never blocks on it.
//! - **Short transfers** are resubmitted for the remainder (the slot's iovec copy is advanced
//!   in place). A read that returns 0 bytes has hit end-of-file: if that is still inside
//!   the storage's size (the file shrank under us, or a sparse tail), the rest of the
//!   buffers is zero-filled, as a block device reads unwritten sectors; beyond the size it
//!   fails with `UnexpectedEof`. A write that makes no progress fails with `WriteZero`.
//!   Neither can loop.
//! - **Completion fd.** The ring's own descriptor, readable (level-triggered) while CQEs
//!   wait, so `reap` needs no system call to clear it and the kernel signals nothing extra
//!   per CQE. (It was an eventfd registered with the ring: one signal per CQE in the
//!   kernel and one `read` per reap, 0.18 system calls per 4 KiB I/O in `xenblkd bench`.)
//!   Wake-ups with no CQE of their own — the discard helper's results, [`StorageQueue::wake`]
//!   — write the queue's wake eventfd, on which a multishot `IORING_OP_POLL_ADD` waits in
//!   the ring, so they arrive as a CQE too; that eventfd is read only when its CQE came.
//! - **Drop** waits until the kernel has finished with every submitted SQE (disk I/O cannot
//!   be reliably cancelled), so guest memory is never written after the queue is gone.
//!   Block-device discards on the helper thread touch no caller memory and are not waited
//!   for.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use io_uring::{opcode, squeue, types, IoUring};

use crate::error::completion_error;
use crate::iovec::IoVec;
use crate::pacer::{Pushed, SubmitPacer};
use crate::sys;
use crate::{
    validate, Completion, OpKind, StorageError, StorageInfo, StorageKind, StorageOp, StorageQueue,
    SubmitError,
};
use eventfd::EventFd;

/// How often an operation that failed with EAGAIN/EINTR is resubmitted before the error is
/// reported.
const MAX_RETRIES: u8 = 3;

/// iovecs reserved per slot up front: a direct blkif request has at most 11 segments.
const INITIAL_IOVS_PER_SLOT: usize = 16;

/// What the raw storage hands a new queue.
pub(crate) struct UringTarget {
    pub file: Arc<File>,
    pub info: StorageInfo,
    /// Live size, updated by `refresh_size`.
    pub size: Arc<AtomicU64>,
    /// Test hook: cap on bytes per SQE, to force short transfers.
    pub max_transfer: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotOp {
    Free,
    Read,
    Write {
        fua: bool,
    },
    Flush,
    /// File discard through io_uring.
    Punch,
    /// Block-device discard on the helper thread.
    BlkDiscard {
        secure: bool,
    },
}

struct Slot {
    tag: u64,
    op: SlotOp,
    /// Start offset of the whole operation.
    offset: u64,
    /// Bytes requested (range length for discards).
    total: u64,
    /// Bytes transferred so far (reads/writes).
    done: u64,
    /// The queue's copy of the caller's iovecs; entries before `first` are consumed, and
    /// `iovs[first]` may have been advanced past its transferred prefix.
    iovs: Vec<IoVec>,
    first: usize,
    /// Test hook bookkeeping: iovec shortened for this SQE and its real length.
    clip: Option<(usize, usize)>,
    retries: u8,
}

impl Slot {
    fn new() -> Self {
        Slot {
            tag: 0,
            op: SlotOp::Free,
            offset: 0,
            total: 0,
            done: 0,
            iovs: Vec::with_capacity(INITIAL_IOVS_PER_SLOT),
            first: 0,
            clip: None,
            retries: 0,
        }
    }

    /// Drops `n` transferred bytes from the front of the remaining iovecs.
    fn advance(&mut self, n: u64) {
        crate::iovec::advance(&mut self.iovs, &mut self.first, n);
    }

    fn kind(&self) -> OpKind {
        match self.op {
            SlotOp::Read => OpKind::Read,
            SlotOp::Write { .. } => OpKind::Write,
            SlotOp::Flush => OpKind::Flush,
            SlotOp::Punch | SlotOp::BlkDiscard { secure: false } => OpKind::Discard,
            SlotOp::BlkDiscard { secure: true } => OpKind::SecureDiscard,
            SlotOp::Free => OpKind::Flush,
        }
    }
}

struct DiscardJob {
    slot: u32,
    offset: u64,
    len: u64,
    secure: bool,
}

/// `user_data` of the multishot poll on the wake eventfd; slots use `0..depth`.
const UD_WAKE: u64 = u64::MAX;

/// Results the discard helper posts back: `(slot, 0 or -errno)`.
type WorkerResults = Arc<Mutex<Vec<(u32, i32)>>>;

pub(crate) struct UringQueue {
    ring: IoUring,
    target: UringTarget,
    fd: RawFd,
    /// Written by whoever completes an operation outside the ring (see the module docs).
    wake_fd: Arc<EventFd>,
    /// The multishot poll on `wake_fd` is in the ring.
    wake_armed: bool,
    slots: Vec<Slot>,
    free: Vec<u32>,
    depth: u32,
    /// Occupied slots.
    in_flight: u32,
    /// SQEs pushed whose CQE has not been seen (submitted or still in the SQ).
    in_ring: u32,
    /// Reused buffer for draining the CQ.
    cqes: Vec<(u64, i32)>,
    discard_tx: Option<mpsc::Sender<DiscardJob>>,
    worker_results: WorkerResults,
    /// Whether a new operation sends what is queued to the kernel first (module `pacer`).
    pacer: SubmitPacer,
}

impl UringQueue {
    pub(crate) fn new(target: UringTarget, depth: u32) -> Result<Self, StorageError> {
        // One SQ entry beyond the slots for the wake poll, so a slot's push never finds
        // the SQ full.
        let entries = (depth + 1).next_power_of_two();
        // dontfork: the daemon forks hotplug scripts; the ring mappings must not follow.
        let ring = IoUring::builder()
            .dontfork()
            .build(entries)
            .map_err(StorageError::Ring)?;
        let wake_fd = Arc::new(EventFd::new().map_err(StorageError::EventFd)?);
        let fd = target.file.as_raw_fd();
        let mut queue = UringQueue {
            ring,
            target,
            fd,
            wake_fd,
            wake_armed: false,
            slots: (0..depth).map(|_| Slot::new()).collect(),
            free: (0..depth).rev().collect(),
            depth,
            in_flight: 0,
            in_ring: 0,
            cqes: Vec::with_capacity(entries as usize * 2),
            discard_tx: None,
            worker_results: Arc::new(Mutex::new(Vec::new())),
            pacer: SubmitPacer::default(),
        };
        // Armed before anyone can write the eventfd, so no wake-up is missed.
        queue.arm_wake();
        queue.submit_queued().map_err(StorageError::Ring)?;
        Ok(queue)
    }

    /// Puts the multishot poll on the wake eventfd into the SQ if it is not in the ring.
    fn arm_wake(&mut self) {
        if self.wake_armed {
            return;
        }
        let entry = opcode::PollAdd::new(types::Fd(self.wake_fd.as_raw_fd()), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(UD_WAKE);
        // SAFETY: a poll refers to no memory, only to the eventfd, which this queue keeps
        // open for its whole life (the ring is dropped first, being declared first).
        self.wake_armed = unsafe { self.ring.submission().push(&entry) }.is_ok();
    }

    /// Builds the SQE for the current state of slot `idx`.
    fn build_entry(&mut self, idx: u32) -> squeue::Entry {
        let fd = types::Fd(self.fd);
        let max_transfer = self.target.max_transfer;
        let slot = &mut self.slots[idx as usize];
        let entry = match slot.op {
            SlotOp::Read | SlotOp::Write { .. } => {
                let remaining = &mut slot.iovs[slot.first..];
                let mut count = remaining.len();
                if let Some(max) = max_transfer {
                    let mut acc = 0usize;
                    for (i, v) in remaining.iter_mut().enumerate() {
                        if acc + v.0.iov_len >= max as usize {
                            let keep = max as usize - acc;
                            if keep < v.0.iov_len {
                                slot.clip = Some((slot.first + i, v.0.iov_len));
                                v.0.iov_len = keep;
                            }
                            count = i + 1;
                            break;
                        }
                        acc += v.0.iov_len;
                    }
                }
                // IoVec is repr(transparent) over libc::iovec.
                let iov = slot.iovs[slot.first..].as_ptr().cast::<libc::iovec>();
                let offset = slot.offset + slot.done;
                // `count <= MAX_SEGMENTS` (checked at submit), so it fits in u32.
                #[allow(clippy::cast_possible_truncation)]
                let count = count as u32;
                match slot.op {
                    SlotOp::Write { fua } => opcode::Writev::new(fd, iov, count)
                        .offset(offset)
                        .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
                        .build(),
                    _ => opcode::Readv::new(fd, iov, count).offset(offset).build(),
                }
            }
            SlotOp::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            SlotOp::Punch => opcode::Fallocate::new(fd, slot.total)
                .offset(slot.offset)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            // Never built: these run on the helper thread / are not in use.
            SlotOp::BlkDiscard { .. } | SlotOp::Free => opcode::Nop::new().build(),
        };
        entry.user_data(u64::from(idx))
    }

    /// Pushes the SQE for slot `idx` onto the SQ (it reaches the kernel at the next
    /// `io_uring_enter`).
    fn push(&mut self, idx: u32) -> Result<(), squeue::PushError> {
        let entry = self.build_entry(idx);
        // SAFETY: the SQE refers to (a) the slot's iovec array, owned by this queue and
        // neither reallocated nor freed while the slot is occupied — the slot is released
        // only after this SQE's CQE has been reaped, and Drop waits for all CQEs; (b) the
        // buffers those iovecs describe, which the caller of `submit` guarantees valid until
        // the completion is delivered or the queue dropped; (c) `self.fd`, kept open by
        // `self.target.file` for the queue's whole life.
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_ok() {
            self.in_ring += 1;
        } else if let Some((i, len)) = self.slots[idx as usize].clip.take() {
            self.slots[idx as usize].iovs[i].0.iov_len = len;
        }
        pushed
    }

    /// `io_uring_enter` for everything in the SQ, retrying on EINTR.
    fn submit_queued(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn release(&mut self, idx: u32) -> u64 {
        let slot = &mut self.slots[idx as usize];
        slot.op = SlotOp::Free;
        slot.iovs.clear();
        self.free.push(idx);
        self.in_flight -= 1;
        slot.tag
    }

    fn send_to_worker(&mut self, job: DiscardJob) -> io::Result<()> {
        if self.discard_tx.is_none() {
            let (tx, rx) = mpsc::channel::<DiscardJob>();
            let file = Arc::clone(&self.target.file);
            let results = Arc::clone(&self.worker_results);
            let eventfd = Arc::clone(&self.wake_fd);
            std::thread::Builder::new()
                .name("storage-discard".into())
                .spawn(move || {
                    // Ends when the queue drops its sender.
                    for job in rx {
                        let res = match sys::blk_discard(
                            file.as_raw_fd(),
                            job.offset,
                            job.len,
                            job.secure,
                        ) {
                            Ok(()) => 0,
                            Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
                        };
                        results
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((job.slot, res));
                        if let Err(e) = eventfd.signal() {
                            tracing::error!(error = %e, "discard helper cannot signal completion");
                        }
                    }
                })?;
            self.discard_tx = Some(tx);
        }
        match &self.discard_tx {
            Some(tx) => tx
                .send(job)
                .map_err(|_| io::Error::other("discard helper thread is gone")),
            None => Err(io::Error::other("discard helper thread not started")),
        }
    }

    /// Handles one CQE. Returns true if it completed an operation (delivered through `f`).
    fn on_cqe(&mut self, idx: u32, res: i32, f: Completion<'_>) -> bool {
        let size = self.target.size.load(Ordering::Acquire);
        let Some(slot) = self.slots.get_mut(idx as usize) else {
            tracing::error!(user_data = idx, "CQE for an unknown slot");
            return false;
        };
        if let Some((i, len)) = slot.clip.take() {
            slot.iovs[i].0.iov_len = len;
        }
        let kind = slot.kind();
        let result: io::Result<u64> = match slot.op {
            SlotOp::Free | SlotOp::BlkDiscard { .. } => {
                tracing::error!(slot = idx, "CQE for a slot without a ring operation");
                return false;
            }
            SlotOp::Flush => {
                if res < 0 {
                    Err(completion_error(kind, -res))
                } else {
                    Ok(0)
                }
            }
            SlotOp::Punch => {
                if res < 0 {
                    Err(completion_error(kind, -res))
                } else {
                    Ok(slot.total)
                }
            }
            SlotOp::Read | SlotOp::Write { .. } => {
                let remaining = slot.total - slot.done;
                if res < 0 {
                    let errno = -res;
                    if (errno == libc::EAGAIN || errno == libc::EINTR) && slot.retries < MAX_RETRIES
                    {
                        slot.retries += 1;
                        return self.resubmit(idx, f);
                    }
                    Err(completion_error(kind, errno))
                } else if res == 0 {
                    let at = slot.offset + slot.done;
                    if kind == OpKind::Write {
                        Err(io::Error::new(
                            io::ErrorKind::WriteZero,
                            format!("write at {at} made no progress"),
                        ))
                    } else if at < size {
                        tracing::warn!(
                            offset = at,
                            remaining,
                            size,
                            "read hit end-of-file inside the storage size; zero-filling"
                        );
                        for v in &slot.iovs[slot.first..] {
                            // SAFETY: this is a read, so by `submit`'s contract every iovec
                            // describes memory valid for writing until this completion is
                            // delivered, which happens just below. Raw writes only: no
                            // reference to the caller's memory is formed.
                            unsafe {
                                std::ptr::write_bytes(v.0.iov_base.cast::<u8>(), 0, v.0.iov_len)
                            };
                        }
                        Ok(slot.total)
                    } else {
                        Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("read at {at} is past end-of-file"),
                        ))
                    }
                } else {
                    let n = (res as u64).min(remaining);
                    slot.done += n;
                    if slot.done == slot.total {
                        Ok(slot.total)
                    } else {
                        slot.advance(n);
                        slot.retries = 0;
                        tracing::trace!(
                            slot = idx,
                            done = slot.done,
                            total = slot.total,
                            "short transfer; resubmitting the remainder"
                        );
                        return self.resubmit(idx, f);
                    }
                }
            }
        };
        let tag = self.release(idx);
        f(tag, result);
        true
    }

    /// Puts slot `idx` back on the SQ; the caller submits. Returns true if instead the
    /// operation had to be completed (with an error).
    fn resubmit(&mut self, idx: u32, f: Completion<'_>) -> bool {
        if self.push(idx).is_ok() {
            return false;
        }
        // Cannot happen (one SQE per slot, SQ >= depth), but never hang an operation.
        let tag = self.release(idx);
        f(
            tag,
            Err(io::Error::other("submission queue full on resubmission")),
        );
        true
    }
}

impl StorageQueue for UringQueue {
    unsafe fn submit(&mut self, op: StorageOp<'_>, tag: u64) -> Result<(), SubmitError> {
        let size = self.target.size.load(Ordering::Acquire);
        let total = validate(&op, &self.target.info, size)?;
        let idx = self.free.pop().ok_or(SubmitError::Full)?;
        self.in_flight += 1;
        let is_blk = self.target.info.kind == StorageKind::BlockDevice;
        let slot = &mut self.slots[idx as usize];
        slot.tag = tag;
        slot.total = total;
        slot.done = 0;
        slot.first = 0;
        slot.clip = None;
        slot.retries = 0;
        slot.iovs.clear();
        match op {
            StorageOp::Read { offset, iov } | StorageOp::Write { offset, iov, .. } => {
                slot.op = match op {
                    StorageOp::Write { fua, .. } => SlotOp::Write { fua },
                    _ => SlotOp::Read,
                };
                slot.offset = offset;
                slot.iovs.extend(iov.iter().map(|v| IoVec(*v)));
            }
            StorageOp::Flush => {
                slot.op = SlotOp::Flush;
                slot.offset = 0;
            }
            StorageOp::Discard {
                offset,
                len,
                secure,
            } => {
                slot.offset = offset;
                if is_blk {
                    slot.op = SlotOp::BlkDiscard { secure };
                    let job = DiscardJob {
                        slot: idx,
                        offset,
                        len,
                        secure,
                    };
                    if let Err(e) = self.send_to_worker(job) {
                        // Deliver the failure as this operation's completion, like any other
                        // I/O error, rather than refusing it at submission.
                        tracing::error!(error = %e, "cannot run block-device discard");
                        let errno = e.raw_os_error().unwrap_or(libc::EIO);
                        self.worker_results
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((idx, -errno));
                        let _ = self.wake_fd.signal();
                    }
                    return Ok(());
                }
                slot.op = SlotOp::Punch;
            }
        }
        let slot = &self.slots[idx as usize];
        let pushed = match slot.op {
            SlotOp::Read | SlotOp::Write { .. } => Pushed::Data {
                fd: self.fd,
                write: matches!(slot.op, SlotOp::Write { .. }),
                offset: slot.offset,
                len: slot.total,
            },
            _ => Pushed::Other,
        };
        let queued = u32::try_from(self.ring.submission().len()).unwrap_or(u32::MAX);
        if self
            .pacer
            .submit_first(pushed, queued, self.in_ring.saturating_sub(queued))
        {
            // A failure here leaves the SQEs queued: the pass's `commit` submits them
            // again and reports the error.
            let _ = self.submit_queued();
        }
        if self.push(idx).is_err() {
            self.release(idx);
            return Err(SubmitError::Full);
        }
        Ok(())
    }

    fn commit(&mut self) -> io::Result<()> {
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        self.submit_queued()
    }

    fn completion_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }

    fn wake(&self) -> io::Result<()> {
        self.wake_fd.signal()
    }

    fn reap(&mut self, f: Completion<'_>) -> usize {
        let mut delivered = 0;
        let mut resubmitted = false;

        let mut cqes = std::mem::take(&mut self.cqes);
        let (mut woken, mut rearm) = (false, false);
        cqes.extend(self.ring.completion().filter_map(|cqe| {
            if cqe.user_data() == UD_WAKE {
                woken = true;
                rearm |= !io_uring::cqueue::more(cqe.flags());
                None
            } else {
                Some((cqe.user_data(), cqe.result()))
            }
        }));
        if woken {
            // Consumed, so the armed poll does not fire again for the same writes; a write
            // after this fires it again.
            self.wake_fd.drain();
        }
        if rearm {
            self.wake_armed = false;
        }
        for &(user_data, res) in &cqes {
            self.in_ring = self.in_ring.saturating_sub(1);
            let Ok(idx) = u32::try_from(user_data) else {
                tracing::error!(user_data, "CQE with a foreign user_data");
                continue;
            };
            if self.on_cqe(idx, res, &mut *f) {
                delivered += 1;
            } else {
                resubmitted = true;
            }
        }
        cqes.clear();
        self.cqes = cqes;

        // The helper posts its results before writing the wake eventfd, so results come
        // with (or before) a wake CQE; without one there is nothing to take.
        let worker_done: Vec<(u32, i32)> = if woken {
            std::mem::take(
                &mut *self
                    .worker_results
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            )
        } else {
            Vec::new()
        };
        for (idx, res) in worker_done {
            let Some(slot) = self.slots.get(idx as usize) else {
                continue;
            };
            let kind = slot.kind();
            let result = if res < 0 {
                Err(completion_error(kind, -res))
            } else {
                Ok(slot.total)
            };
            let tag = self.release(idx);
            f(tag, result);
            delivered += 1;
        }

        if !self.wake_armed {
            self.arm_wake();
            resubmitted = true;
        }
        if resubmitted {
            if let Err(e) = self.submit_queued() {
                // The SQEs stay queued; make the fd readable so the reactor comes back
                // (its next reap or commit submits them).
                tracing::warn!(error = %e, "resubmitting short transfers failed; will retry");
                let _ = self.wake_fd.signal();
            }
        }
        delivered
    }

    fn in_flight(&self) -> u32 {
        self.in_flight
    }

    fn depth(&self) -> u32 {
        self.depth
    }
}

impl Drop for UringQueue {
    fn drop(&mut self) {
        // Hand queued SQEs to the kernel so they complete; waiting for them below is what
        // makes dropping a queue with operations in flight safe for the caller's memory.
        if let Err(e) = self.submit_queued() {
            tracing::warn!(error = %e, "submitting queued operations at queue drop failed");
        }
        if self.in_ring > 0 {
            tracing::debug!(
                in_ring = self.in_ring,
                "queue dropped with operations in flight; waiting"
            );
        }
        loop {
            // SQEs the kernel never consumed will never complete and never touch memory. The
            // wake poll is not in `in_ring`; discounting it errs on the side of waiting.
            let unsubmitted = u32::try_from(self.ring.submission().len())
                .unwrap_or(u32::MAX)
                .saturating_sub(u32::from(self.wake_armed));
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
            let seen = self
                .ring
                .completion()
                .filter(|cqe| cqe.user_data() != UD_WAKE)
                .count();
            let seen = u32::try_from(seen).unwrap_or(u32::MAX);
            self.in_ring = self.in_ring.saturating_sub(seen);
        }
        // Dropping `discard_tx` ends the helper thread after its current ioctl.
    }
}
