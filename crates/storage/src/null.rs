//! The null backend: a disk of a configured size that performs no I/O.
//!
//! It exists to measure the cost of the protocol and the engine alone. A write is dropped;
//! a read leaves the buffers as they were, or with [`NullConfig::read_zeroes`] fills them
//! with zeros (QEMU's `null-co` and its `read-zeroes` option). Flush, discard and secure
//! discard succeed. Completions are immediate but still go through the completion eventfd
//! and `reap`, batched per `commit`, so the engine's code path is exactly the one it runs
//! on real storage.
//!
//! The daemon serves it as the target `null:SIZE` ([`NullConfig::from_target`]), a
//! benchmark and test target: a disk that reads zeros and forgets every write.

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
    /// Reads fill their buffers with zeros (a disk that reads as a fresh sparse image);
    /// off, a read leaves them untouched, which measures the protocol alone.
    pub read_zeroes: bool,
}

impl Default for NullConfig {
    fn default() -> Self {
        NullConfig {
            size_bytes: 1 << 30,
            logical_block_size: 512,
            read_only: false,
            read_zeroes: false,
        }
    }
}

/// The prefix of a null target: `null:SIZE`.
pub const NULL_TARGET_PREFIX: &str = "null:";

/// Whether `v` names a null disk (`null:` prefix).
pub fn is_null_target(v: &str) -> bool {
    v.starts_with(NULL_TARGET_PREFIX)
}

/// Why a `null:SIZE` target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NullTargetError {
    #[error("not a null target (expected null:SIZE)")]
    NotNull,
    #[error("null target size {0:?}: {1}")]
    BadSize(String, String),
    #[error("null target size {0} is smaller than one 512-byte sector")]
    TooSmall(u64),
}

impl NullConfig {
    /// The disk a `null:SIZE` target names (SIZE in bytes, or with a binary suffix `k`,
    /// `M`, `G`, `T`, as `qemu-img` takes it): 512-byte sectors, reads return zeros.
    pub fn from_target(target: &str) -> Result<NullConfig, NullTargetError> {
        let size = target
            .strip_prefix(NULL_TARGET_PREFIX)
            .ok_or(NullTargetError::NotNull)?;
        let size_bytes =
            parse_size(size).map_err(|e| NullTargetError::BadSize(size.to_string(), e))?;
        if size_bytes < 512 {
            return Err(NullTargetError::TooSmall(size_bytes));
        }
        Ok(NullConfig {
            size_bytes,
            logical_block_size: 512,
            read_only: false,
            read_zeroes: true,
        })
    }
}

/// Parses `4096`, `4k`, `1M`, `1G`, `1T` (binary units; `KiB`, `MB` and the like are
/// read the same way).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (s, 1u64),
        Some((i, _)) => {
            let mult = match s[i..].to_ascii_lowercase().trim_end_matches(['b', 'i']) {
                "k" => 1 << 10,
                "m" => 1 << 20,
                "g" => 1 << 30,
                "t" => 1 << 40,
                "" => 1,
                other => return Err(format!("unknown size suffix {other:?}")),
            };
            (&s[..i], mult)
        }
    };
    let n: u64 = digits.parse().map_err(|e| format!("{s:?}: {e}"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} overflows"))
}

#[derive(Debug)]
pub struct NullStorage {
    info: StorageInfo,
    read_zeroes: bool,
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
            read_zeroes: config.read_zeroes,
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
            read_zeroes: self.read_zeroes,
            depth,
            queued: Vec::with_capacity(depth as usize),
            ready: VecDeque::with_capacity(depth as usize),
            eventfd: EventFd::new().map_err(StorageError::EventFd)?,
        }))
    }
}

struct NullQueue {
    info: StorageInfo,
    read_zeroes: bool,
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
            StorageOp::Read { iov, .. } if self.read_zeroes => {
                for v in iov {
                    // SAFETY: this is a read, so by `submit`'s contract every iovec
                    // describes memory valid for writing until its completion is reaped,
                    // which comes after this. Raw writes only: no reference to the
                    // caller's memory is formed.
                    unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
                }
                bytes
            }
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
