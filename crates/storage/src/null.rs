//! The null backend: a disk of a configured size that performs no I/O.
//!
//! It exists to measure the cost of the protocol and the engine alone, so it never touches
//! the buffers: a read leaves the guest's memory as it was (it does *not* zero-fill), a
//! write is dropped. Flush, discard and secure discard succeed. Completions are immediate
//! but still go through the completion eventfd and `reap`, batched per `commit`, so the
//! engine's code path is exactly the one it runs on real storage.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use crate::{
    validate, Completion, Storage, StorageError, StorageInfo, StorageKind, StorageOp, StorageQueue,
    SubmitError, MAX_QUEUE_DEPTH,
};
use eventfd::EventFd;

/// Geometry of a null disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NullConfig {
    pub size_bytes: u64,
    pub logical_block_size: u32,
    pub read_only: bool,
}

impl Default for NullConfig {
    fn default() -> Self {
        NullConfig {
            size_bytes: 1 << 30,
            logical_block_size: 512,
            read_only: false,
        }
    }
}

#[derive(Debug)]
pub struct NullStorage {
    info: StorageInfo,
}

impl NullStorage {
    pub fn new(config: NullConfig) -> Result<Self, StorageError> {
        let lbs = config.logical_block_size;
        if !lbs.is_power_of_two() || !(512..=65536).contains(&lbs) {
            return Err(StorageError::InvalidConfig(format!(
                "logical block size {lbs} is not a power of two in 512..=65536"
            )));
        }
        let size_bytes = config.size_bytes - config.size_bytes % u64::from(lbs);
        Ok(NullStorage {
            info: StorageInfo {
                size_bytes,
                logical_block_size: lbs,
                physical_block_size: lbs,
                buffer_alignment: 1,
                read_only: config.read_only,
                flush: !config.read_only,
                discard: !config.read_only,
                secure_discard: !config.read_only,
                discard_granularity: lbs,
                discard_alignment: 0,
                direct_io: false,
                kind: StorageKind::Null,
            },
        })
    }
}

impl Storage for NullStorage {
    fn info(&self) -> StorageInfo {
        self.info
    }

    fn refresh_size(&self) -> io::Result<u64> {
        Ok(self.info.size_bytes)
    }

    fn open_queue(&self, depth: u32) -> Result<Box<dyn StorageQueue>, StorageError> {
        if depth == 0 || depth > MAX_QUEUE_DEPTH {
            return Err(StorageError::InvalidDepth {
                depth,
                max: MAX_QUEUE_DEPTH,
            });
        }
        Ok(Box::new(NullQueue {
            info: self.info,
            depth,
            queued: Vec::with_capacity(depth as usize),
            ready: VecDeque::with_capacity(depth as usize),
            eventfd: EventFd::new().map_err(StorageError::EventFd)?,
        }))
    }
}

struct NullQueue {
    info: StorageInfo,
    depth: u32,
    /// Submitted, not yet committed: `(tag, bytes)`.
    queued: Vec<(u64, u64)>,
    /// Committed, not yet reaped.
    ready: VecDeque<(u64, u64)>,
    eventfd: EventFd,
}

impl StorageQueue for NullQueue {
    unsafe fn submit(&mut self, op: StorageOp<'_>, tag: u64) -> Result<(), SubmitError> {
        let bytes = validate(&op, &self.info, self.info.size_bytes)?;
        if self.in_flight() >= self.depth {
            return Err(SubmitError::Full);
        }
        let bytes = match op {
            StorageOp::Flush => 0,
            _ => bytes,
        };
        self.queued.push((tag, bytes));
        Ok(())
    }

    fn commit(&mut self) -> io::Result<()> {
        if self.queued.is_empty() {
            return Ok(());
        }
        self.ready.extend(self.queued.drain(..));
        // One eventfd write per batch, as the kernel signals the io_uring backend's fd.
        self.eventfd.signal()
    }

    fn completion_fd(&self) -> BorrowedFd<'_> {
        self.eventfd.as_fd()
    }

    fn wake(&self) -> io::Result<()> {
        self.eventfd.signal()
    }

    fn reap(&mut self, f: Completion<'_>) -> usize {
        self.eventfd.drain();
        let n = self.ready.len();
        for (tag, bytes) in self.ready.drain(..) {
            f(tag, Ok(bytes));
        }
        n
    }

    fn in_flight(&self) -> u32 {
        // Both hold at most `depth` operations.
        u32::try_from(self.queued.len() + self.ready.len()).unwrap_or(u32::MAX)
    }

    fn depth(&self) -> u32 {
        self.depth
    }
}
