//! Queues sharing one NBD connection, for servers that do not advertise
//! `NBD_FLAG_CAN_MULTI_CONN`.
//!
//! The connection is an ordinary [`NbdQueue`] behind a mutex (the "driver"). Each ring's
//! [`SharedQueue`] submits into it and commits it directly from its reactor; a pump thread
//! per shared connection waits on the driver's completion fd, reaps it, and routes
//! each completion to the mailbox of the queue that submitted it (the driver's tag is
//! `queue id << 32 | queue slot`), signalling that queue's own eventfd. So completions
//! cost one thread hop here, where a multi-conn export's queues have none; a single NBD
//! connection is one ordered byte stream anyway.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::conn::NbdQueue;
use crate::sys::poll_readable;
use crate::{Completion, StorageError, StorageOp, StorageQueue, SubmitError};
use eventfd::EventFd;

/// Completions for one queue: `(queue slot, result)`.
type Done = Vec<(u32, io::Result<u64>)>;

struct Mailbox {
    done: Mutex<Done>,
    eventfd: EventFd,
}

pub(crate) struct Shared {
    driver: Mutex<NbdQueue>,
    /// A duplicate of the driver's completion fd, polled without the driver's mutex.
    driver_fd: OwnedFd,
    /// Wakes the driver's completion fd (to stop the pump).
    driver_eventfd: Arc<EventFd>,
    /// Indexed by queue id; `None` once that queue is gone.
    mailboxes: Mutex<Vec<Option<Arc<Mailbox>>>>,
    stop: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Takes over `driver` and starts its pump thread.
    pub(crate) fn start(driver: NbdQueue) -> Result<Arc<Shared>, StorageError> {
        let shared = Arc::new(Shared {
            driver_fd: driver
                .completion_fd()
                .try_clone_to_owned()
                .map_err(StorageError::Ring)?,
            driver_eventfd: driver.eventfd(),
            driver: Mutex::new(driver),
            mailboxes: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let pump = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("nbd-shared".into())
            .spawn(move || pump.pump())
            .map_err(StorageError::Ring)?;
        Ok(shared)
    }

    fn pump(&self) {
        let mut woken: Vec<usize> = Vec::new();
        while !self.stop.load(Ordering::Acquire) {
            match poll_readable(self.driver_fd.as_fd(), 200) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "NBD shared connection: poll failed");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                }
            }
            woken.clear();
            {
                let mut driver = lock(&self.driver);
                let boxes = lock(&self.mailboxes);
                driver.reap(&mut |tag, result| {
                    let id = (tag >> 32) as usize;
                    if let Some(Some(mailbox)) = boxes.get(id) {
                        // The low half is the ring's own tag (its shift is the id).
                        #[allow(clippy::cast_possible_truncation)]
                        let own = tag as u32;
                        lock(&mailbox.done).push((own, result));
                        if !woken.contains(&id) {
                            woken.push(id);
                        }
                    }
                });
                for &id in &woken {
                    if let Some(Some(mailbox)) = boxes.get(id) {
                        if let Err(e) = mailbox.eventfd.signal() {
                            tracing::error!(error = %e, "cannot signal an NBD queue");
                        }
                    }
                }
            }
        }
        // The last queue is gone; dropping the last reference closes the connection.
    }
}

/// One ring's queue on a shared connection.
pub(crate) struct SharedQueue {
    shared: Arc<Shared>,
    id: u32,
    depth: u32,
    free: Vec<u32>,
    tags: Vec<u64>,
    mailbox: Arc<Mailbox>,
    spare: Done,
}

impl SharedQueue {
    /// A new queue on `shared`, `None` if its last queue already closed it.
    pub(crate) fn new(
        shared: Arc<Shared>,
        depth: u32,
    ) -> Result<Option<SharedQueue>, StorageError> {
        let mailbox = Arc::new(Mailbox {
            done: Mutex::new(Vec::with_capacity(depth as usize)),
            eventfd: EventFd::new().map_err(StorageError::EventFd)?,
        });
        let id = {
            let mut boxes = lock(&shared.mailboxes);
            if shared.stop.load(Ordering::Acquire) {
                return Ok(None);
            }
            let id = boxes
                .iter()
                .position(Option::is_none)
                .unwrap_or(boxes.len());
            if id == boxes.len() {
                boxes.push(Some(Arc::clone(&mailbox)));
            } else {
                boxes[id] = Some(Arc::clone(&mailbox));
            }
            // One mailbox per open queue, each with an eventfd: far fewer than 2^32.
            #[allow(clippy::cast_possible_truncation)]
            let id = id as u32;
            id
        };
        Ok(Some(SharedQueue {
            shared,
            id,
            depth,
            free: (0..depth).rev().collect(),
            tags: vec![0; depth as usize],
            mailbox,
            spare: Vec::with_capacity(depth as usize),
        }))
    }
}

impl StorageQueue for SharedQueue {
    unsafe fn submit(&mut self, op: StorageOp<'_>, tag: u64) -> Result<(), SubmitError> {
        let local = self.free.pop().ok_or(SubmitError::Full)?;
        let driver_tag = (u64::from(self.id) << 32) | u64::from(local);
        // SAFETY: the caller's guarantee for `op` is passed on unchanged; the driver keeps
        // the memory's use within it (this queue's drop abandons its operations there
        // and waits for the kernel before returning).
        let result = unsafe { lock(&self.shared.driver).submit(op, driver_tag) };
        match result {
            Ok(()) => {
                self.tags[local as usize] = tag;
                Ok(())
            }
            Err(e) => {
                self.free.push(local);
                Err(e)
            }
        }
    }

    fn commit(&mut self) -> io::Result<()> {
        lock(&self.shared.driver).commit()
    }

    fn completion_fd(&self) -> BorrowedFd<'_> {
        self.mailbox.eventfd.as_fd()
    }

    fn wake(&self) -> io::Result<()> {
        self.mailbox.eventfd.signal()
    }

    fn reap(&mut self, f: Completion<'_>) -> usize {
        self.mailbox.eventfd.drain();
        std::mem::swap(&mut *lock(&self.mailbox.done), &mut self.spare);
        let n = self.spare.len();
        for (local, result) in self.spare.drain(..) {
            let Some(&tag) = self.tags.get(local as usize) else {
                continue;
            };
            self.free.push(local);
            f(tag, result);
        }
        n
    }

    fn in_flight(&self) -> u32 {
        // The free list holds at most `depth` slots.
        self.depth - u32::try_from(self.free.len()).unwrap_or(self.depth)
    }

    fn depth(&self) -> u32 {
        self.depth
    }
}

impl Drop for SharedQueue {
    fn drop(&mut self) {
        let id = u64::from(self.id);
        let mut driver = lock(&self.shared.driver);
        if self.free.len() < self.depth as usize {
            driver.abandon(|tag| tag >> 32 == id);
        }
        let mut boxes = lock(&self.shared.mailboxes);
        if let Some(slot) = boxes.get_mut(self.id as usize) {
            *slot = None;
        }
        if boxes.iter().all(Option::is_none) {
            self.shared.stop.store(true, Ordering::Release);
            let _ = self.shared.driver_eventfd.signal();
        }
    }
}
