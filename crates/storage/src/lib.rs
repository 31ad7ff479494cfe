//! Storage backends of xenblkd behind one pair of traits.
//!
//! A VBD owns one [`Storage`] (the disk image, block device or null disk). Every ring of the
//! VBD opens its own [`StorageQueue`] on it, and the reactor thread that owns the ring owns
//! that queue: no lock is taken on the data path.
//!
//! # The queue model
//! The engine runs reactors that wait, each in its own io_uring (a multishot poll per fd),
//! on event-channel fds and on each queue's [`StorageQueue::completion_fd`]. Per wake-up it
//! 1. calls [`StorageQueue::reap`] to drain every ready completion (this also clears the
//!    completion fd; the reactor's polls are edge-like, one report per signal, so an
//!    undrained fd costs a spurious pass, never a hang),
//! 2. [`StorageQueue::submit`]s the new requests of its rings, each under an opaque `tag`,
//! 3. calls [`StorageQueue::commit`] once, which hands the whole batch to the kernel in one
//!    syscall.
//!
//! Properties every backend keeps:
//! - **Zero copy.** Read/write buffers are `libc::iovec`s that point straight into mapped
//!   guest pages. The storage never forms a Rust reference to that memory; it passes the
//!   iovecs to the kernel (the only exceptions are the documented zero-fills of a read that
//!   hits end-of-file, of a null disk's read and of qcow2's unallocated clusters, done
//!   with raw-pointer writes).
//! - **The iovec array is copied** at submission into storage owned by the queue, so the
//!   caller's slice may be reused as soon as `submit` returns; the *memory* the iovecs point
//!   to must stay valid until the completion is reaped, or until the queue is dropped —
//!   dropping a queue blocks until the kernel has finished with every submitted operation.
//! - **Bounded.** A queue has a fixed depth; `submit` returns [`SubmitError::Full`] when that
//!   many operations are in flight. A guest cannot make the storage allocate more.
//! - **Whole transfers.** A successful read or write completes with its full length: short
//!   transfers are resubmitted for the remainder inside the queue. An engine should still
//!   treat `Ok(n)` shorter than requested as an I/O error (the fault injector produces it).
//! - **Unsupported operations** complete with an error of kind
//!   [`std::io::ErrorKind::Unsupported`] ([`is_unsupported`]), so the engine can answer
//!   `BLKIF_RSP_EOPNOTSUPP` and stop advertising the feature.
//! - **Same path for every backend.** Even the null backend delivers its (immediate)
//!   completions through the completion fd and `reap`.
//!
//! # Backends
//! - [`raw`]: a regular file or a block device on io_uring, with O_DIRECT where the file
//!   system or device allows it ([`open`] picks file or block device by `fstat`). Note that
//!   tmpfs accepts O_DIRECT since Linux 6.6; ramfs and some FUSE file systems do not, and
//!   get buffered I/O.
//! - [`nbd`]: an export of an NBD server, over TCP or a unix socket, with the transmission
//!   phase on the queue's io_uring (reads and writes straight between the socket and the
//!   guest's pages; the one other exception to "never write through the iovecs": read
//!   data that arrived together with a reply header is copied from the receive buffer).
//! - [`qcow2`]: a qcow2 image and its backing chain through the `imago` library: mapped
//!   reads and writes on the reactor's io_uring, allocation, copy-on-write, compressed
//!   clusters, discard and flush on a worker thread per queue (see the module).
//! - [`rbd`]: an image of a Ceph cluster through librbd's asynchronous C API (loaded at
//!   run time), completing into the reactor through the queue's eventfd from librbd's
//!   callback thread.
//! - [`null`]: no I/O at all, to measure the protocol cost (the daemon's `null:SIZE`).
//! - `testing` (feature `testing`, and in this crate's tests): a fault-injection wrapper.
//!
//! [`lock`] takes QEMU's image locks (OFD locks on the image and its backing files), so
//! xenblkd and QEMU see each other's use of an image.
//!
//! [`baseline`] holds the benchmark runners: the same workload driven through a
//! [`StorageQueue`] and through a bare io_uring loop, so the cost of the abstraction is
//! measured side by side.

#![warn(clippy::cast_possible_truncation)]

use std::io;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::Arc;

pub mod baseline;
mod buffer;
mod error;
mod iovec;
pub mod lock;
pub mod nbd;
pub mod null;
mod pacer;
pub mod qcow2;
pub mod raw;
pub mod rbd;
mod sys;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod uring;

pub use buffer::AlignedBuf;
pub use error::{is_unsupported, OpKind, StorageError, SubmitError, UnsupportedOp};
pub use nbd::{NbdConfig, NbdStorage};
pub use null::{is_null_target, NullConfig, NullStorage, NullTargetError};
pub use qcow2::Qcow2Storage;
pub use raw::{DirectIo, OpenOptions, RawStorage};
pub use rbd::{RbdConfig, RbdStorage};

/// Largest number of iovecs in one read or write (the kernel's `UIO_MAXIOV`).
pub const MAX_SEGMENTS: usize = 1024;

/// Largest queue depth [`Storage::open_queue`] accepts.
pub const MAX_QUEUE_DEPTH: u32 = 4096;

/// What backs a storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum StorageKind {
    File,
    BlockDevice,
    Null,
    /// An export of an NBD server.
    Nbd,
    /// A qcow2 image (and its backing chain) through imago.
    Qcow2,
    /// An image of a Ceph cluster through librbd.
    Rbd,
}

/// What a storage is and what it can do; the engine derives the xenstore features
/// (`sectors`, `sector-size`, `physical-sector-size`, `feature-flush-cache`,
/// `feature-discard`, `discard-secure`, `discard-granularity`, `discard-alignment`, `mode`)
/// from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct StorageInfo {
    /// Usable size, rounded down to a multiple of `logical_block_size`.
    pub size_bytes: u64,
    /// Smallest addressable unit: offsets and lengths of I/O must be multiples of it.
    pub logical_block_size: u32,
    /// Unit below which writes cost a read-modify-write (a hint for the guest).
    pub physical_block_size: u32,
    /// Required alignment of buffer addresses and lengths (1 when buffered, the device's
    /// DMA alignment when O_DIRECT is in use).
    pub buffer_alignment: u32,
    pub read_only: bool,
    /// There is a volatile cache to flush (page cache or device write cache).
    pub flush: bool,
    pub discard: bool,
    pub secure_discard: bool,
    /// Discard granularity in bytes (0 when `discard` is false).
    pub discard_granularity: u32,
    /// Offset of the first granularity-aligned byte, in bytes.
    pub discard_alignment: u32,
    /// I/O bypasses the page cache (O_DIRECT).
    pub direct_io: bool,
    pub kind: StorageKind,
}

/// One storage per VBD. Shared (`Arc`) by the control thread and every reactor that owns one
/// of the VBD's rings.
pub trait Storage: Send + Sync {
    /// Current capabilities and size.
    fn info(&self) -> StorageInfo;

    /// Re-reads the size (online resize: the file grew, or `BLKGETSIZE64` changed) and
    /// returns it, rounded down to the logical block size. Queues see the new size for
    /// their range checks from then on.
    fn refresh_size(&self) -> io::Result<u64>;

    /// Opens a queue with room for `depth` operations in flight (one per ring).
    fn open_queue(&self, depth: u32) -> Result<Box<dyn StorageQueue>, StorageError>;

    /// What the storage is made of, top first, as `format:path` (an image and its backing
    /// files); empty for storage that is one thing (a raw file, a device, the null disk).
    fn layers(&self) -> Vec<String> {
        Vec::new()
    }
}

/// One storage operation. `offset` and `len` are in bytes.
#[derive(Debug, Clone, Copy)]
pub enum StorageOp<'a> {
    /// Read into the buffers, in order, starting at `offset`.
    Read { offset: u64, iov: &'a [libc::iovec] },
    /// Write the buffers, in order, at `offset`. With `fua` the data is durable (as by
    /// `fdatasync`) when the write completes.
    Write {
        offset: u64,
        iov: &'a [libc::iovec],
        fua: bool,
    },
    /// Make every write completed before this flush was submitted durable.
    Flush,
    /// The range's contents become unspecified (zeros for files); `secure` asks the device
    /// to erase it (only if [`StorageInfo::secure_discard`]).
    Discard { offset: u64, len: u64, secure: bool },
}

impl StorageOp<'_> {
    pub fn kind(&self) -> OpKind {
        match self {
            StorageOp::Read { .. } => OpKind::Read,
            StorageOp::Write { .. } => OpKind::Write,
            StorageOp::Flush => OpKind::Flush,
            StorageOp::Discard { secure: false, .. } => OpKind::Discard,
            StorageOp::Discard { secure: true, .. } => OpKind::SecureDiscard,
        }
    }
}

/// The completion callback of [`StorageQueue::reap`]: the operation's tag and either the
/// number of bytes transferred (see [`StorageQueue::reap`]) or the error.
pub type Completion<'a> = &'a mut dyn FnMut(u64, io::Result<u64>);

/// A queue of operations on one storage, owned by one reactor (one per ring).
pub trait StorageQueue: Send {
    /// Queues `op` under `tag`; it reaches the kernel at the next [`commit`](Self::commit).
    /// The iovec slice is copied; the caller may reuse it when this returns.
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for the operation (writable for a
    /// read, readable for a write) from now until its completion has been delivered by
    /// [`reap`](Self::reap), or until the queue has been dropped (drop waits for the kernel
    /// to finish with all submitted operations). The memory must not be accessed through
    /// Rust references meanwhile.
    unsafe fn submit(&mut self, op: StorageOp<'_>, tag: u64) -> Result<(), SubmitError>;

    /// Hands every queued operation to the kernel in one syscall (none if nothing is
    /// queued). On error the operations stay queued and a later `commit` retries them.
    fn commit(&mut self) -> io::Result<()>;

    /// A descriptor, owned by the queue, that becomes readable when completions are ready:
    /// an eventfd, or an io_uring's own descriptor (readable while CQEs wait). Only
    /// [`wake`](Self::wake) may make it readable from outside.
    fn completion_fd(&self) -> BorrowedFd<'_>;

    /// Makes the completion fd readable, so that its owner's next wait returns and calls
    /// [`reap`](Self::reap) even with no completion of the queue's own (wrappers that
    /// complete operations themselves, such as the fault injector, use it).
    fn wake(&self) -> io::Result<()>;

    /// Delivers every completion that is ready, each exactly once, and clears the
    /// completion fd. Returns the number delivered. `Ok(n)` carries the bytes transferred
    /// (the full length for reads and writes, the range length for discards, 0 for
    /// flushes).
    fn reap(&mut self, f: Completion<'_>) -> usize;

    /// Operations submitted and not yet reaped (queued ones included).
    fn in_flight(&self) -> u32;

    /// The depth the queue was opened with.
    fn depth(&self) -> u32;
}

/// Opens a regular file or block device (chosen by `fstat`) as an io_uring-backed storage.
pub fn open(
    path: impl AsRef<Path>,
    options: OpenOptions,
) -> Result<Arc<dyn Storage>, StorageError> {
    Ok(Arc::new(RawStorage::open(path.as_ref(), options)?))
}

/// Checks an operation against the storage's capabilities and size, the way every backend
/// must before accepting it, and returns the transfer length (sum of iovec lengths for
/// reads/writes, the range length for discards, 0 for flush).
pub(crate) fn validate(
    op: &StorageOp<'_>,
    info: &StorageInfo,
    size: u64,
) -> Result<u64, SubmitError> {
    let lbs = u64::from(info.logical_block_size.max(1));
    let check_range = |offset: u64, len: u64| -> Result<(), SubmitError> {
        if len == 0 {
            return Err(SubmitError::Invalid("zero-length operation"));
        }
        if !offset.is_multiple_of(lbs) || !len.is_multiple_of(lbs) {
            return Err(SubmitError::Invalid(
                "not aligned to the logical block size",
            ));
        }
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(SubmitError::OutOfRange { offset, len, size }),
        }
    };
    let iov_len = |iov: &[libc::iovec]| -> Result<u64, SubmitError> {
        if iov.len() > MAX_SEGMENTS {
            return Err(SubmitError::TooManySegments {
                count: iov.len(),
                max: MAX_SEGMENTS,
            });
        }
        iov.iter()
            .try_fold(0u64, |acc, v| acc.checked_add(v.iov_len as u64))
            .ok_or(SubmitError::Invalid("total length overflows"))
    };
    match *op {
        StorageOp::Read { offset, iov } => {
            let len = iov_len(iov)?;
            check_range(offset, len)?;
            Ok(len)
        }
        StorageOp::Write { offset, iov, .. } => {
            if info.read_only {
                return Err(SubmitError::ReadOnly);
            }
            let len = iov_len(iov)?;
            check_range(offset, len)?;
            Ok(len)
        }
        StorageOp::Flush => {
            if info.flush || info.read_only {
                Ok(0)
            } else {
                Err(SubmitError::Unsupported(OpKind::Flush))
            }
        }
        StorageOp::Discard {
            offset,
            len,
            secure,
        } => {
            if info.read_only {
                return Err(SubmitError::ReadOnly);
            }
            if !info.discard || (secure && !info.secure_discard) {
                return Err(SubmitError::Unsupported(op.kind()));
            }
            check_range(offset, len)?;
            Ok(len)
        }
    }
}
