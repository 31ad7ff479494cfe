//! Validation: the rules of Linux blkback's `dispatch_rw_block_io`,
//! `dispatch_discard_io`, `dispatch_other_io` and `xen_vbd_translate`, applied to a
//! [`RawRequest`] against the device's [`DeviceLimits`], and the typed [`Request`] they
//! yield.

use crate::abi::{
    indirect_pages, BLKIF_DISCARD_SECURE, BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
    BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT,
    BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, SECTOR_SIZE,
};
use crate::response::Response;

use super::{IndirectRequest, RawRequest, RequestError, Segment};

impl RawRequest {
    /// Applies the seed's sanity checks to this private copy.
    ///
    /// Returns [`Validated::Ready`] with a request the engine can execute, or
    /// [`Validated::Indirect`] when descriptor pages must be mapped and passed to
    /// [`IndirectRequest::parse_segments`] and [`IndirectRequest::finish`] first.
    pub fn validate(&self, limits: &DeviceLimits) -> Result<Validated, RequestError> {
        match *self {
            RawRequest::ReadWrite {
                operation,
                nr_segments,
                handle,
                id,
                sector_number,
                ref segments,
            } => {
                let op = match operation {
                    BLKIF_OP_READ => Operation::Read,
                    BLKIF_OP_WRITE => Operation::Write,
                    BLKIF_OP_WRITE_BARRIER => Operation::Barrier,
                    BLKIF_OP_FLUSH_DISKCACHE => Operation::Flush,
                    other => return Err(RequestError::UnsupportedOperation(other)),
                };
                let n = usize::from(nr_segments);
                // dispatch_rw_block_io: only flush and barrier (REQ_PREFLUSH) may be empty.
                if n == 0 && !matches!(op, Operation::Flush | Operation::Barrier) {
                    return Err(RequestError::NoSegments { operation });
                }
                if n > BLKIF_MAX_SEGMENTS_PER_REQUEST {
                    return Err(RequestError::TooManySegments { nr_segments });
                }
                let segs = &segments[..n];
                let nr_sectors = check_segments(segs)?;
                limits.check_access(op, sector_number, nr_sectors)?;
                limits.check_alignment(sector_number, segs.iter().map(Segment::nr_sectors))?;
                limits.check_supported(op)?;
                let mut direct = DirectSegments {
                    len: nr_segments,
                    segments: [Segment::default(); BLKIF_MAX_SEGMENTS_PER_REQUEST],
                };
                direct.segments[..n].copy_from_slice(segs);
                Ok(Validated::Ready(Request {
                    id,
                    operation: op,
                    handle,
                    sector: sector_number,
                    nr_sectors,
                    segments: if n == 0 {
                        Segments::None
                    } else {
                        Segments::Direct(direct)
                    },
                }))
            }
            RawRequest::Indirect {
                indirect_op,
                nr_segments,
                handle,
                id,
                sector_number,
                indirect_grefs,
            } => {
                let op = match indirect_op {
                    BLKIF_OP_READ => Operation::Read,
                    BLKIF_OP_WRITE => Operation::Write,
                    other => return Err(RequestError::InvalidIndirectOperation(other)),
                };
                if nr_segments == 0 {
                    return Err(RequestError::NoSegments {
                        operation: BLKIF_OP_INDIRECT,
                    });
                }
                if u32::from(nr_segments) > limits.max_indirect_segments {
                    return Err(RequestError::TooManyIndirectSegments {
                        nr_segments,
                        max: limits.max_indirect_segments,
                    });
                }
                // blkback BUG_ON()s here; a limit above 4096 would reach it, so check.
                let nr_pages = indirect_pages(usize::from(nr_segments));
                let Some(nr_pages) = u8::try_from(nr_pages)
                    .ok()
                    .filter(|&n| usize::from(n) <= BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST)
                else {
                    return Err(RequestError::TooManyIndirectPages { nr_pages });
                };
                // Refuse a write to a read-only device before anything gets mapped; the
                // range check needs the descriptors and runs in `finish`.
                limits.check_access(op, sector_number, 0)?;
                Ok(Validated::Indirect(IndirectRequest {
                    id,
                    operation: op,
                    handle,
                    sector: sector_number,
                    nr_segments,
                    nr_pages,
                    grefs: indirect_grefs,
                }))
            }
            RawRequest::Discard {
                flag,
                handle,
                id,
                sector_number,
                nr_sectors,
            } => {
                // dispatch_discard_io: xen_vbd_translate as a write, then the block
                // layer's discard, which refuses misaligned ranges (-EINVAL) and answers
                // -EOPNOTSUPP when the device cannot discard.
                let secure = flag & BLKIF_DISCARD_SECURE != 0 && limits.secure_discard;
                let op = Operation::Discard { secure };
                limits.check_access(op, sector_number, nr_sectors)?;
                limits.check_alignment(sector_number, std::iter::once(nr_sectors))?;
                limits.check_supported(op)?;
                Ok(Validated::Ready(Request {
                    id,
                    operation: op,
                    handle,
                    sector: sector_number,
                    nr_sectors,
                    segments: Segments::None,
                }))
            }
            RawRequest::Other { operation, .. } => {
                Err(RequestError::UnsupportedOperation(operation))
            }
        }
    }
}

/// Checks every segment and sums their sectors (at most 4096 * 8, no overflow).
pub(super) fn check_segments(segments: &[Segment]) -> Result<u64, RequestError> {
    let mut total = 0u64;
    for (index, s) in segments.iter().enumerate() {
        s.check(index)?;
        total += s.nr_sectors();
    }
    Ok(total)
}

/// What the backend advertised and what the device is: the facts validation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLimits {
    /// Capacity in 512-byte sectors (the `sectors` node), whatever the sector size.
    pub sectors: u64,
    /// The VBD is read-only (`mode = r`): writes, flushes, barriers and discards fail.
    pub read_only: bool,
    /// Logical block size in bytes (`sector-size`): a power of two, at least 512. I/O
    /// must start and every segment must be sized in whole blocks.
    pub logical_block_size: u32,
    /// `feature-max-indirect-segments` as advertised; 0 disables indirect requests.
    pub max_indirect_segments: u32,
    /// `feature-discard`.
    pub discard: bool,
    /// `discard-secure`; without it `BLKIF_DISCARD_SECURE` is ignored (blkif.h).
    pub secure_discard: bool,
    /// `feature-flush-cache`.
    pub flush: bool,
    /// `feature-barrier`.
    pub barrier: bool,
}

impl DeviceLimits {
    /// 512-byte sectors per logical block (1 for anything at or below 512).
    pub fn sectors_per_block(&self) -> u64 {
        (u64::from(self.logical_block_size) / SECTOR_SIZE).max(1)
    }

    /// `xen_vbd_translate`: no write-class operation on a read-only device, and a
    /// non-empty range must neither wrap around `u64` nor end past the disk.
    pub(super) fn check_access(
        &self,
        op: Operation,
        sector: u64,
        nr_sectors: u64,
    ) -> Result<(), RequestError> {
        if op.writes() && self.read_only {
            return Err(RequestError::ReadOnly {
                operation: op.blkif_op(),
            });
        }
        if nr_sectors != 0 {
            let end = sector
                .checked_add(nr_sectors)
                .ok_or(RequestError::SectorOverflow { sector, nr_sectors })?;
            if end > self.sectors {
                return Err(RequestError::BeyondEnd {
                    sector,
                    nr_sectors,
                    capacity: self.sectors,
                });
            }
        }
        Ok(())
    }

    /// The seed's misalignment rule: the start sector and each segment's length are
    /// multiples of the logical block (in 512-byte sectors).
    pub(super) fn check_alignment(
        &self,
        sector: u64,
        lengths: impl Iterator<Item = u64>,
    ) -> Result<(), RequestError> {
        let per_block = self.sectors_per_block();
        for nr_sectors in lengths {
            if !sector.is_multiple_of(per_block) || !nr_sectors.is_multiple_of(per_block) {
                return Err(RequestError::Misaligned {
                    sector,
                    nr_sectors,
                    logical_block_size: self.logical_block_size,
                });
            }
        }
        Ok(())
    }

    /// Operations of features the backend did not advertise: EOPNOTSUPP, as blkback
    /// answers when the block layer says `BLK_STS_NOTSUPP` / `-EOPNOTSUPP`.
    fn check_supported(&self, op: Operation) -> Result<(), RequestError> {
        match op {
            Operation::Flush if !self.flush => Err(RequestError::FlushNotSupported),
            Operation::Barrier if !self.barrier => Err(RequestError::BarrierNotSupported),
            Operation::Discard { .. } if !self.discard => Err(RequestError::DiscardNotSupported),
            _ => Ok(()),
        }
    }
}

/// What a validated request asks the storage to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Read,
    Write,
    /// FLUSH_DISKCACHE: write the segments (if any), then make everything durable.
    Flush,
    /// WRITE_BARRIER: drain in-flight I/O, write the segments (if any), flush.
    Barrier,
    /// DISCARD; `secure` only if the guest asked and `discard-secure` was advertised.
    Discard {
        secure: bool,
    },
}

impl Operation {
    /// The opcode to echo in the response (READ or WRITE for indirect requests).
    pub const fn blkif_op(self) -> u8 {
        match self {
            Operation::Read => BLKIF_OP_READ,
            Operation::Write => BLKIF_OP_WRITE,
            Operation::Flush => BLKIF_OP_FLUSH_DISKCACHE,
            Operation::Barrier => BLKIF_OP_WRITE_BARRIER,
            Operation::Discard { .. } => BLKIF_OP_DISCARD,
        }
    }

    /// Whether the operation modifies the device (forbidden when read-only).
    pub const fn writes(self) -> bool {
        !matches!(self, Operation::Read)
    }
}

/// The up to 11 segments of a direct request, inline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DirectSegments {
    len: u8,
    segments: [Segment; BLKIF_MAX_SEGMENTS_PER_REQUEST],
}

impl DirectSegments {
    /// The checked segments.
    pub fn as_slice(&self) -> &[Segment] {
        &self.segments[..usize::from(self.len)]
    }
}

impl std::ops::Deref for DirectSegments {
    type Target = [Segment];
    fn deref(&self) -> &[Segment] {
        self.as_slice()
    }
}

/// Where a validated request's data segments are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Segments {
    /// No data: a flush or barrier without segments, or a discard.
    None,
    /// A direct request's segments, inline.
    Direct(DirectSegments),
    /// An indirect request's `count` segments: they are the slice the engine passed to
    /// [`IndirectRequest::finish`] (its own reusable buffer), all checked.
    Indirect { count: u16 },
}

/// A validated request, ready to execute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Request {
    /// Echoed in the response.
    pub id: u64,
    pub operation: Operation,
    /// The guest's `handle` (informational; blkback ignores it too).
    pub handle: u16,
    /// First 512-byte sector (meaningless when `nr_sectors` is 0).
    pub sector: u64,
    /// Total 512-byte sectors; `sector + nr_sectors <= DeviceLimits::sectors`.
    pub nr_sectors: u64,
    pub segments: Segments,
}

impl Request {
    /// The response answering this request with `status`.
    pub fn response(&self, status: i16) -> Response {
        Response {
            id: self.id,
            operation: self.operation.blkif_op(),
            status,
        }
    }
}

/// Outcome of [`RawRequest::validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Validated {
    /// Fully checked; execute it.
    Ready(Request),
    /// An indirect request: map [`IndirectRequest::indirect_grefs`] read-only, then
    /// call [`IndirectRequest::parse_segments`] and [`IndirectRequest::finish`].
    Indirect(IndirectRequest),
}
