//! [`RequestError`]: why a request is refused, one variant per rule, and the response
//! status each refusal gets.

use shmem::OutOfBounds;

use crate::abi::{BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR};

/// Why a request is refused. Each variant is one rule of the seed; [`RequestError::status`]
/// gives the response status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// `dispatch_other_io`: opcode not known (including `BLKIF_OP_RESERVED_1`).
    #[error("unsupported operation {0}")]
    UnsupportedOperation(u8),
    /// `dispatch_rw_block_io`: an indirect request's inner op must be READ or WRITE.
    #[error("indirect request with inner operation {0} (only READ and WRITE may be indirect)")]
    InvalidIndirectOperation(u8),
    /// Zero segments, allowed only for FLUSH_DISKCACHE and WRITE_BARRIER.
    #[error("operation {operation} with no segments")]
    NoSegments { operation: u8 },
    /// More than `BLKIF_MAX_SEGMENTS_PER_REQUEST` (11) segments in a direct request.
    #[error("{nr_segments} segments in a direct request (at most 11)")]
    TooManySegments { nr_segments: u8 },
    /// More segments than `feature-max-indirect-segments`.
    #[error("{nr_segments} segments in an indirect request (at most {max})")]
    TooManyIndirectSegments { nr_segments: u16, max: u32 },
    /// More than `BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST` (8) descriptor pages.
    #[error("indirect request needs {nr_pages} descriptor pages (at most 8)")]
    TooManyIndirectPages { nr_pages: usize },
    /// `last_sect >= 8`: past the end of the 4 KiB page.
    #[error("segment {index}: last_sect {last_sect} is outside the page")]
    LastSectorOutsidePage { index: usize, last_sect: u8 },
    /// `last_sect < first_sect`.
    #[error("segment {index}: last_sect {last_sect} < first_sect {first_sect}")]
    LastSectorBeforeFirst {
        index: usize,
        first_sect: u8,
        last_sect: u8,
    },
    /// `sector + nr_sectors` wraps around `u64`.
    #[error("sector range {sector}+{nr_sectors} overflows")]
    SectorOverflow { sector: u64, nr_sectors: u64 },
    /// The range ends past the disk.
    #[error("sector range {sector}+{nr_sectors} ends past the disk ({capacity} sectors)")]
    BeyondEnd {
        sector: u64,
        nr_sectors: u64,
        capacity: u64,
    },
    /// A write, flush, barrier or discard on a read-only device.
    #[error("operation {operation} on a read-only device")]
    ReadOnly { operation: u8 },
    /// Start or segment length not a multiple of the logical block size.
    #[error(
        "sector {sector} / length {nr_sectors} not aligned to {logical_block_size}-byte blocks"
    )]
    Misaligned {
        sector: u64,
        nr_sectors: u64,
        logical_block_size: u32,
    },
    /// DISCARD without `feature-discard`.
    #[error("discard is not supported by this device")]
    DiscardNotSupported,
    /// FLUSH_DISKCACHE without `feature-flush-cache`.
    #[error("cache flush is not supported by this device")]
    FlushNotSupported,
    /// WRITE_BARRIER without `feature-barrier`.
    #[error("write barrier is not supported by this device")]
    BarrierNotSupported,
    /// Engine error: fewer mapped descriptor pages than the request needs.
    #[error("{given} descriptor pages given, {needed} needed")]
    IndirectPagesMissing { needed: usize, given: usize },
    /// Engine error: a descriptor page is smaller than its descriptors.
    #[error("descriptor page {page} unreadable: {source}")]
    IndirectPageUnreadable {
        page: usize,
        #[source]
        source: OutOfBounds,
    },
    /// Engine error: the segment buffer is smaller than `nr_segments`.
    #[error("segment buffer holds {capacity}, {needed} needed")]
    SegmentBufferTooSmall { needed: usize, capacity: usize },
    /// Engine error: `finish` got a different number of segments than the request has.
    #[error("{given} segments given for a request of {expected}")]
    SegmentCountMismatch { expected: u16, given: usize },
}

impl RequestError {
    /// The response status for this refusal: `BLKIF_RSP_EOPNOTSUPP` for unknown
    /// opcodes and unadvertised features, `BLKIF_RSP_ERROR` for everything else.
    pub const fn status(&self) -> i16 {
        match self {
            RequestError::UnsupportedOperation(_)
            | RequestError::DiscardNotSupported
            | RequestError::FlushNotSupported
            | RequestError::BarrierNotSupported => BLKIF_RSP_EOPNOTSUPP,
            _ => BLKIF_RSP_ERROR,
        }
    }
}
