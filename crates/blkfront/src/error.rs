//! Errors of the frontend: refusals a block layer makes itself, failures the backend
//! reported, and misbehaviour of the backend or the guest services.

use crate::guest::{GrantRef, GuestError};

/// How one I/O ended badly on the backend's side.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    /// `BLKIF_RSP_ERROR`.
    #[error("the backend failed the request (BLKIF_RSP_ERROR)")]
    Failed,
    /// `BLKIF_RSP_EOPNOTSUPP`.
    #[error("the backend does not support the operation (BLKIF_RSP_EOPNOTSUPP)")]
    NotSupported,
    /// A status blkif.h does not define; treated as an error like Linux does.
    #[error("the backend answered with unknown status {0}")]
    UnknownStatus(i16),
    /// The response answered with the wrong operation; the request is failed.
    #[error("the backend answered operation {got} to a request of operation {expected}")]
    WrongOperation { expected: u8, got: u8 },
    /// The request was still in flight when the frontend was torn down.
    #[error("the request was aborted by teardown")]
    Aborted,
}

/// Frontend errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Offset or length not a multiple of the logical block size (or the length is 0).
    #[error("I/O at {offset}+{len} is not aligned to the {block_size}-byte logical block size")]
    Unaligned {
        offset: u64,
        len: u64,
        block_size: u32,
    },
    /// The I/O ends past the end of the disk.
    #[error("I/O at {offset}+{len} is beyond the end of the {capacity}-byte disk")]
    OutOfRange {
        offset: u64,
        len: u64,
        capacity: u64,
    },
    /// A write to a disk the backend exports read-only.
    #[error("the disk is read-only")]
    ReadOnly,
    /// The operation was not negotiated (discard, secure discard).
    #[error("{0} is not supported by the backend")]
    NotSupported(&'static str),
    /// Not enough free ring slots for an asynchronous submission; reap completions first.
    #[error("queue {queue} has {free} free slot(s), {needed} needed")]
    QueueFull {
        queue: usize,
        free: usize,
        needed: usize,
    },
    /// No such queue.
    #[error("queue {0} does not exist")]
    NoSuchQueue(usize),
    /// The backend answered the I/O with an error.
    #[error(transparent)]
    Io(#[from] IoError),
    /// A synchronous call's responses did not all come within the configured timeout.
    #[error("no response from the backend within {0:?}")]
    Timeout(std::time::Duration),
    /// The backend broke the ring protocol badly enough that the ring was halted.
    #[error("queue {queue} halted: {source}")]
    RingHalted {
        queue: usize,
        #[source]
        source: blkif::RingError,
    },
    /// A guest service (memory, grants, event channels) failed.
    #[error(transparent)]
    Guest(#[from] GuestError),
    /// The frontend is closed.
    #[error("the frontend is closed")]
    Closed,
    /// The xenstore handshake failed.
    #[error("xenbus: {0}")]
    Xenbus(String),
}

/// What teardown found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TeardownReport {
    /// Grants revoked.
    pub grants_ended: usize,
    /// Grants the backend still mapped: their pages are leaked rather than reused, as
    /// Linux does, and a test fails on them.
    pub still_mapped: Vec<GrantRef>,
    /// Requests that were still in flight and were aborted.
    pub aborted_requests: usize,
}

impl TeardownReport {
    /// No grant was left mapped by the backend.
    pub fn is_clean(&self) -> bool {
        self.still_mapped.is_empty()
    }
}
