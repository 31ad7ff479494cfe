//! Error types of the storage layer.
//!
//! Three families, because the engine reacts to each differently:
//! - [`StorageError`]: opening a storage or a queue failed (the VBD cannot connect);
//! - [`SubmitError`]: one operation was refused before it reached the kernel (the engine
//!   retries on [`SubmitError::Full`], otherwise fails only that request);
//! - completion errors are plain [`std::io::Error`]s delivered through
//!   [`crate::StorageQueue::reap`]; an operation the storage turned out not to support has
//!   kind [`std::io::ErrorKind::Unsupported`] (see [`crate::is_unsupported`]).

use std::fmt;
use std::io;
use std::path::PathBuf;

/// The kind of a storage operation, for errors, statistics and fault injection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    Read,
    Write,
    Flush,
    Discard,
    SecureDiscard,
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Flush => "flush",
            OpKind::Discard => "discard",
            OpKind::SecureDiscard => "secure discard",
        })
    }
}

/// Opening a storage or one of its queues failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: O_DIRECT was required but is not usable: {reason}")]
    DirectIoUnsupported { path: PathBuf, reason: String },
    #[error("{path}: not a regular file or a block device")]
    UnsupportedFileType { path: PathBuf },
    #[error("{what} on {path}: {source}")]
    Probe {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("queue depth {depth} out of range 1..={max}")]
    InvalidDepth { depth: u32, max: u32 },
    #[error("io_uring setup: {0}")]
    Ring(#[source] io::Error),
    #[error("eventfd: {0}")]
    EventFd(#[source] io::Error),
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// Connecting to or negotiating with an NBD server failed.
    #[error("NBD: {0}")]
    Nbd(String),
    /// The image uses a feature this build does not serve (named for the operator).
    #[error("{path}: {feature} is not supported")]
    UnsupportedImage { path: PathBuf, feature: String },
    /// The image is malformed or not of the format it was declared as.
    #[error("{path}: {reason}")]
    InvalidImage { path: PathBuf, reason: String },
}

/// An operation was refused at submission; nothing was queued and no completion will be
/// delivered for its tag.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    /// `depth` operations are already in flight; reap completions and retry.
    #[error("queue full")]
    Full,
    /// A write or discard on a read-only storage.
    #[error("storage is read-only")]
    ReadOnly,
    /// The storage does not offer this operation (see [`crate::StorageInfo`]).
    #[error("{0} is not supported by this storage")]
    Unsupported(OpKind),
    /// The operation extends past the end of the storage (`size_bytes`).
    #[error("operation [{offset}, +{len}) is beyond the end of the storage ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// More iovecs than one vectored syscall accepts.
    #[error("too many segments: {count} > {max}")]
    TooManySegments { count: usize, max: usize },
    /// A malformed operation (zero length, misaligned offset, length overflow).
    #[error("invalid operation: {0}")]
    Invalid(&'static str),
}

/// Error payload of completions that failed because the storage does not support the
/// operation. Its [`io::Error`] has kind [`io::ErrorKind::Unsupported`].
#[derive(Debug, thiserror::Error)]
#[error("{op} not supported by the storage (errno {errno})")]
pub struct UnsupportedOp {
    pub op: OpKind,
    pub errno: i32,
}

/// Builds the completion error for an operation the kernel refused as unsupported.
pub(crate) fn unsupported(op: OpKind, errno: i32) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, UnsupportedOp { op, errno })
}

/// True when a completion error means "this storage does not support the operation":
/// the engine answers `BLKIF_RSP_EOPNOTSUPP` and stops advertising the feature.
pub fn is_unsupported(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::Unsupported || err.raw_os_error() == Some(libc::EOPNOTSUPP)
}

/// Maps a negative io_uring / syscall result to the completion error the engine sees.
pub(crate) fn completion_error(op: OpKind, errno: i32) -> io::Error {
    let discard = matches!(op, OpKind::Discard | OpKind::SecureDiscard);
    // EOPNOTSUPP == ENOTSUP on Linux. For discards, EINVAL is what older kernels and some
    // filesystems return for "no such capability"; the queue rejects misaligned or
    // out-of-range discards before submission, so EINVAL here does mean "unsupported".
    if errno == libc::EOPNOTSUPP || (discard && errno == libc::EINVAL) {
        unsupported(op, errno)
    } else {
        io::Error::from_raw_os_error(errno)
    }
}
