//! One ring's queue on an RBD image: librbd's asynchronous calls, completing into the
//! reactor through the queue's eventfd.
//!
//! Each of the `depth` slots owns its state up front: the tag, the length, and its copy
//! of the caller's iovec array (librbd keeps a pointer to the array of a read until the
//! read completes, to scatter the data into it). A slot's callback argument is its entry
//! in `ctx`, allocated once with the queue. `submit` hands the operation to librbd at once
//! (`rbd_aio_*` only queue it: with `rbd_non_blocking_aio`, librbd's default, they never
//! wait for the cluster); librbd has no batch call, so `commit` has nothing left to do.
//! librbd calls [`on_complete`] on one of its threads: it pushes `(slot, result)` onto the
//! completion list (capacity `depth`, so never reallocated: at most `depth` slots are in
//! flight) and counts the operation as finished. The eventfd is written only by the push
//! that finds the list empty, under the mutex, and `reap` takes the whole list and drains
//! the eventfd under the same mutex: so the eventfd is readable exactly while the list is
//! not empty. Completions that arrive while the reactor has not reaped yet cost librbd's
//! thread no system call and the reactor no extra wake-up, and a `reap` that finds the
//! list empty (the engine reaps on every pass) makes no system call either.
//!
//! Guest memory: the iovecs point into guest pages that must stay mapped until the
//! completion is reaped or the queue dropped. Dropping the queue waits until librbd has
//! called back for every operation it was given (each bounded by the storage's
//! `rados_osd_op_timeout`), so no read can scatter into unmapped pages afterwards.

use std::ffi::{c_int, c_void};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use super::ffi;
use super::Handles;
use crate::error::completion_error;
use crate::iovec::IoVec;
use crate::{
    validate, Completion, OpKind, StorageError, StorageInfo, StorageOp, StorageQueue, SubmitError,
};
use eventfd::EventFd;

/// iovecs reserved per slot up front: a direct blkif request has at most 11 segments; a
/// slot's array grows (at most to [`crate::MAX_SEGMENTS`]) only for larger requests.
const INITIAL_IOVS_PER_SLOT: usize = 11;

struct Slot {
    tag: u64,
    len: u64,
    kind: OpKind,
    iovs: Vec<IoVec>,
}

/// What the callback and the queue share.
struct Shared {
    state: Mutex<Done>,
    /// Signalled when `outstanding` drops to zero (a dropping queue waits for it).
    idle: Condvar,
    efd: EventFd,
}

struct Done {
    /// Finished `(slot, librbd result)`, capacity `depth`.
    list: Vec<(u32, isize)>,
    /// Operations librbd has and has not called back for yet.
    outstanding: u32,
}

/// A slot's callback argument.
struct SlotCtx {
    shared: Arc<Shared>,
    index: u32,
}

pub(super) struct RbdQueue {
    handles: Arc<Handles>,
    info: StorageInfo,
    size: Arc<AtomicU64>,
    depth: u32,
    slots: Box<[Slot]>,
    free: Vec<u32>,
    shared: Arc<Shared>,
    /// Callback arguments, one per slot, at stable addresses until the queue is dropped
    /// (after every callback).
    ctx: Box<[SlotCtx]>,
    /// The other half of the completion list, swapped in by `reap`.
    spare: Vec<(u32, isize)>,
    in_flight: u32,
}

impl RbdQueue {
    pub(super) fn new(
        handles: Arc<Handles>,
        info: StorageInfo,
        size: Arc<AtomicU64>,
        depth: u32,
    ) -> Result<RbdQueue, StorageError> {
        let shared = Arc::new(Shared {
            state: Mutex::new(Done {
                list: Vec::with_capacity(depth as usize),
                outstanding: 0,
            }),
            idle: Condvar::new(),
            efd: EventFd::new().map_err(StorageError::EventFd)?,
        });
        Ok(RbdQueue {
            handles,
            info,
            size,
            depth,
            slots: (0..depth)
                .map(|_| Slot {
                    tag: 0,
                    len: 0,
                    kind: OpKind::Read,
                    iovs: Vec::with_capacity(INITIAL_IOVS_PER_SLOT),
                })
                .collect(),
            free: (0..depth).rev().collect(),
            ctx: (0..depth)
                .map(|index| SlotCtx {
                    shared: Arc::clone(&shared),
                    index,
                })
                .collect(),
            shared,
            spare: Vec::with_capacity(depth as usize),
            in_flight: 0,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Done> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Completes slot `idx` without librbd (a refusal at submission, a read-only flush).
    fn complete_now(&self, idx: u32, result: isize) {
        self.lock().push(idx, result, &self.shared.efd);
    }
}

impl Done {
    /// Queues a completion; the push that makes the list non-empty writes the eventfd
    /// (under the mutex, see the module comment).
    fn push(&mut self, idx: u32, result: isize, efd: &EventFd) {
        // Never full: a slot is on the list at most once and there are `depth` slots.
        if self.list.len() < self.list.capacity() {
            self.list.push((idx, result));
        }
        if self.list.len() == 1 {
            if let Err(e) = efd.signal() {
                // Cannot happen on an eventfd counted by ones, far from its maximum.
                tracing::error!(error = %e, "cannot signal an RBD queue's eventfd");
            }
        }
    }
}

/// librbd's completion callback, on one of librbd's threads.
///
/// # Safety
/// `arg` is the `SlotCtx` the operation was submitted with, alive until this returns the
/// queue's mutex (the queue's drop waits for that).
unsafe extern "C" fn on_complete(c: ffi::RbdCompletionT, arg: *mut c_void) {
    // A completion exists only for a library that was loaded.
    let Ok(lib) = ffi::lib() else { return };
    // SAFETY: `c` is the completion librbd is calling back for; it is released here and
    // never used again (no one else holds it).
    let result = unsafe {
        let r = (lib.rbd_aio_get_return_value)(c);
        (lib.rbd_aio_release)(c);
        r
    };
    // SAFETY: see the function's contract: the SlotCtx is alive until we release the
    // mutex below; what is needed after that is cloned out first.
    let ctx = unsafe { &*arg.cast::<SlotCtx>() };
    let shared = Arc::clone(&ctx.shared);
    let index = ctx.index;
    let mut done = shared.state.lock().unwrap_or_else(PoisonError::into_inner);
    done.push(index, result, &shared.efd);
    done.outstanding = done.outstanding.saturating_sub(1);
    if done.outstanding == 0 {
        shared.idle.notify_all();
    }
}

impl StorageQueue for RbdQueue {
    unsafe fn submit(&mut self, op: StorageOp<'_>, tag: u64) -> Result<(), SubmitError> {
        let len = validate(&op, &self.info, self.size.load(Ordering::Acquire))?;
        let idx = self.free.pop().ok_or(SubmitError::Full)?;
        self.in_flight += 1;
        let slot = &mut self.slots[idx as usize];
        slot.tag = tag;
        slot.len = len;
        slot.kind = op.kind();
        slot.iovs.clear();
        if let StorageOp::Read { iov, .. } | StorageOp::Write { iov, .. } = op {
            slot.iovs.extend(iov.iter().map(|v| IoVec(*v)));
        }
        if matches!(op, StorageOp::Flush) && self.info.read_only {
            // Nothing was written through this image.
            self.complete_now(idx, 0);
            return Ok(());
        }
        let lib = self.handles.lib;
        let image = self.handles.image;
        let arg = std::ptr::from_ref(&self.ctx[idx as usize])
            .cast_mut()
            .cast();
        let mut c: ffi::RbdCompletionT = std::ptr::null_mut();
        // SAFETY: `arg` is this slot's SlotCtx, alive until after its callback (see
        // Drop); `on_complete` matches rbd_callback_t; `c` is a valid out-pointer.
        let r = unsafe { (lib.rbd_aio_create_completion)(arg, on_complete, &mut c) };
        if r < 0 {
            self.complete_now(idx, r as isize);
            return Ok(());
        }
        // Counted before librbd may call back (it can, before the call below returns).
        self.lock().outstanding += 1;
        let slot = &self.slots[idx as usize];
        let iov = slot.iovs.as_ptr().cast::<libc::iovec>();
        // validate() bounded the count by MAX_SEGMENTS (1024), far inside c_int.
        #[allow(clippy::cast_possible_truncation)]
        let count = slot.iovs.len() as c_int;
        // SAFETY: a live image and completion. The iovec array is the slot's own copy,
        // untouched until the slot is reaped (after the callback); the memory it
        // describes is valid until then by this function's contract. validate() bounded
        // the count by MAX_SEGMENTS (librbd's IOV_MAX) and the range by the image size.
        let r = unsafe {
            match op {
                StorageOp::Read { offset, .. } => (lib.rbd_aio_readv)(image, iov, count, offset, c),
                StorageOp::Write { offset, .. } => {
                    (lib.rbd_aio_writev)(image, iov, count, offset, c)
                }
                StorageOp::Discard { offset, len, .. } => {
                    (lib.rbd_aio_discard)(image, offset, len, c)
                }
                StorageOp::Flush => (lib.rbd_aio_flush)(image, c),
            }
        };
        if r < 0 {
            // Refused before it was queued: librbd will not call back for it.
            // SAFETY: the completion was never handed over; released once, here.
            unsafe { (lib.rbd_aio_release)(c) };
            let mut done = self.lock();
            done.outstanding -= 1;
            done.push(idx, r as isize, &self.shared.efd);
            if done.outstanding == 0 {
                self.shared.idle.notify_all();
            }
        }
        Ok(())
    }

    fn commit(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn completion_fd(&self) -> BorrowedFd<'_> {
        self.shared.efd.as_fd()
    }

    fn wake(&self) -> io::Result<()> {
        self.shared.efd.signal()
    }

    fn reap(&mut self, f: Completion<'_>) -> usize {
        {
            let mut done = self
                .shared
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if done.list.is_empty() {
                // Nothing was pushed since the last reap, so nothing wrote the eventfd.
                return 0;
            }
            std::mem::swap(&mut done.list, &mut self.spare);
            self.shared.efd.drain();
        }
        let mut n = 0;
        for (idx, r) in self.spare.drain(..) {
            let Some(slot) = self.slots.get(idx as usize) else {
                continue;
            };
            let result = if r < 0 {
                let errno = i32::try_from(-r).unwrap_or(libc::EIO);
                Err(completion_error(slot.kind, errno))
            } else {
                match slot.kind {
                    // librbd returns the bytes read; anything short is the engine's error.
                    OpKind::Read => Ok((r as u64).min(slot.len)),
                    _ => Ok(slot.len),
                }
            };
            self.free.push(idx);
            self.in_flight -= 1;
            n += 1;
            f(slot.tag, result);
        }
        n
    }

    fn in_flight(&self) -> u32 {
        self.in_flight
    }

    fn depth(&self) -> u32 {
        self.depth
    }
}

impl Drop for RbdQueue {
    fn drop(&mut self) {
        let mut done = self
            .shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if done.outstanding > 0 {
            tracing::debug!(
                outstanding = done.outstanding,
                "RBD queue closing: waiting for librbd to finish its requests"
            );
        }
        while done.outstanding > 0 {
            done = self
                .shared
                .idle
                .wait(done)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}
