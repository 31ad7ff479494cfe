//! Requests: copy-once decoding, frontend-side encoding, and validation.
//!
//! This module owns the path from the bytes of one request slot to a request the engine
//! may execute:
//!
//! 1. The ring copies the slot into a private buffer with one read ([`crate::ring`]).
//! 2. [`RawRequest::decode`] turns that private copy into a [`RawRequest`], an enum by
//!    opcode that keeps every field exactly as the guest wrote it. Decoding is total:
//!    every byte pattern is some `RawRequest`. Because only the private copy is read,
//!    a guest rewriting the slot meanwhile cannot make us see two different values of
//!    one field (XSA-155, the double fetch in blkback's `blkif_get_x86_32_req`).
//! 3. [`RawRequest::validate`] applies every rule of the seed's `dispatch_rw_block_io`,
//!    `dispatch_discard_io`, `dispatch_other_io` and `xen_vbd_translate` against the
//!    device's [`DeviceLimits`] and yields a typed [`Request`], or an
//!    [`IndirectRequest`] whose descriptor pages the engine must map first, or a
//!    [`RequestError`] that says which status to answer with.
//! 4. For indirect requests, [`IndirectRequest::parse_segments`] copies each descriptor
//!    page once and checks every descriptor (`xen_blkbk_parse_indirect`), and
//!    [`IndirectRequest::finish`] runs the checks that need the total sector count.
//!
//! Whatever the outcome, [`RawRequest::id`] and [`RawRequest::response_operation`]
//! give what an answer needs, so a malformed request still gets its response.
//!
//! No allocation happens here: direct segments live in a fixed array, indirect segments
//! in a buffer the caller owns and reuses.

use shmem::{OutOfBounds, SharedMemory};

use crate::abi::{
    indirect_pages, Protocol, BLKIF_DISCARD_SECURE, BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
    BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT,
    BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR,
    MAX_REQUEST_SIZE, PAGE_SIZE, SECTORS_PER_PAGE, SECTOR_SIZE, SEGMENTS_PER_INDIRECT_PAGE,
    SEGMENT_FIRST_SECT, SEGMENT_GREF, SEGMENT_LAST_SECT, SEGMENT_SIZE,
};
use crate::response::Response;

pub(crate) fn le_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

pub(crate) fn le_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

pub(crate) fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(v)
}

fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// One `struct blkif_request_segment`: a granted page and the sectors
/// `first_sect..=last_sect` of it that the I/O covers.
///
/// A `Segment` inside a [`Request`] has passed [`Segment::check`]; one inside a
/// [`RawRequest`] is as the guest wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Segment {
    /// Grant reference of the data page.
    pub gref: u32,
    /// First 512-byte sector of the page that takes part in the I/O.
    pub first_sect: u8,
    /// Last sector (inclusive).
    pub last_sect: u8,
}

/// [`SECTOR_SIZE`] in memory units.
const SECTOR_BYTES: usize = 512;
const _: () = assert!(SECTOR_BYTES as u64 == SECTOR_SIZE);

impl Segment {
    /// Decodes one 8-byte descriptor from a private buffer.
    pub fn decode(bytes: &[u8; SEGMENT_SIZE]) -> Self {
        Segment {
            gref: le_u32(bytes, SEGMENT_GREF),
            first_sect: bytes[SEGMENT_FIRST_SECT],
            last_sect: bytes[SEGMENT_LAST_SECT],
        }
    }

    /// The 8-byte descriptor, padding zeroed.
    pub fn encode(&self) -> [u8; SEGMENT_SIZE] {
        let mut b = [0u8; SEGMENT_SIZE];
        put_u32(&mut b, SEGMENT_GREF, self.gref);
        b[SEGMENT_FIRST_SECT] = self.first_sect;
        b[SEGMENT_LAST_SECT] = self.last_sect;
        b
    }

    /// The seed's per-segment rule: `last_sect` inside the page and not before
    /// `first_sect`. `index` is the segment's position, for the error.
    pub fn check(&self, index: usize) -> Result<(), RequestError> {
        if self.last_sect >= SECTORS_PER_PAGE {
            return Err(RequestError::LastSectorOutsidePage {
                index,
                last_sect: self.last_sect,
            });
        }
        if self.last_sect < self.first_sect {
            return Err(RequestError::LastSectorBeforeFirst {
                index,
                first_sect: self.first_sect,
                last_sect: self.last_sect,
            });
        }
        Ok(())
    }

    /// Sectors covered (`last_sect - first_sect + 1`); 0 for an unchecked segment with
    /// `last_sect < first_sect`.
    pub fn nr_sectors(&self) -> u64 {
        (u64::from(self.last_sect) + 1).saturating_sub(u64::from(self.first_sect))
    }

    /// Byte offset of the I/O inside the page.
    pub fn offset_bytes(&self) -> usize {
        usize::from(self.first_sect) * SECTOR_BYTES
    }

    /// Byte length of the I/O.
    pub fn len_bytes(&self) -> usize {
        (usize::from(self.last_sect) + 1).saturating_sub(usize::from(self.first_sect))
            * SECTOR_BYTES
    }
}

/// The private, decoded copy of one request slot, fields exactly as the guest wrote
/// them. Produced by [`crate::BackRing::pop_request`]; encoded by a frontend with
/// [`RawRequest::encode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RawRequest {
    /// `struct blkif_request`: READ, WRITE, WRITE_BARRIER or FLUSH_DISKCACHE.
    ReadWrite {
        /// One of `BLKIF_OP_READ`, `_WRITE`, `_WRITE_BARRIER`, `_FLUSH_DISKCACHE`.
        operation: u8,
        nr_segments: u8,
        handle: u16,
        id: u64,
        sector_number: u64,
        /// All 11 descriptors of the slot; only the first `nr_segments` mean anything.
        segments: [Segment; BLKIF_MAX_SEGMENTS_PER_REQUEST],
    },
    /// `struct blkif_request_discard`.
    Discard {
        flag: u8,
        handle: u16,
        id: u64,
        sector_number: u64,
        nr_sectors: u64,
    },
    /// `struct blkif_request_indirect`.
    Indirect {
        /// The operation the descriptors are for; only READ and WRITE are valid.
        indirect_op: u8,
        nr_segments: u16,
        handle: u16,
        id: u64,
        sector_number: u64,
        indirect_grefs: [u32; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST],
    },
    /// Any other opcode (`BLKIF_OP_RESERVED_1`, unknown values): only `operation` and
    /// `id` are read (Linux's `blkif_request_other`), to answer EOPNOTSUPP.
    Other { operation: u8, id: u64 },
}

impl RawRequest {
    /// Decodes a private copy of a slot in `protocol`'s layout (only the first
    /// [`Protocol::request_size`] bytes are read). Total: never fails, never panics.
    pub fn decode(protocol: Protocol, slot: &[u8; MAX_REQUEST_SIZE]) -> Self {
        let l = protocol.layout();
        // The opcode is read once, from the private copy, and selects the variant.
        match slot[0] {
            op @ (BLKIF_OP_READ
            | BLKIF_OP_WRITE
            | BLKIF_OP_WRITE_BARRIER
            | BLKIF_OP_FLUSH_DISKCACHE) => {
                let rw = l.read_write;
                let mut segments = [Segment::default(); BLKIF_MAX_SEGMENTS_PER_REQUEST];
                for (i, s) in segments.iter_mut().enumerate() {
                    let at = rw.seg + i * SEGMENT_SIZE;
                    let mut d = [0u8; SEGMENT_SIZE];
                    d.copy_from_slice(&slot[at..at + SEGMENT_SIZE]);
                    *s = Segment::decode(&d);
                }
                RawRequest::ReadWrite {
                    operation: op,
                    nr_segments: slot[rw.nr_segments],
                    handle: le_u16(slot, rw.handle),
                    id: le_u64(slot, rw.id),
                    sector_number: le_u64(slot, rw.sector_number),
                    segments,
                }
            }
            BLKIF_OP_DISCARD => {
                let d = l.discard;
                RawRequest::Discard {
                    flag: slot[d.flag],
                    handle: le_u16(slot, d.handle),
                    id: le_u64(slot, d.id),
                    sector_number: le_u64(slot, d.sector_number),
                    nr_sectors: le_u64(slot, d.nr_sectors),
                }
            }
            BLKIF_OP_INDIRECT => {
                let ind = l.indirect;
                let mut indirect_grefs = [0u32; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
                for (i, g) in indirect_grefs.iter_mut().enumerate() {
                    *g = le_u32(slot, ind.indirect_grefs + 4 * i);
                }
                RawRequest::Indirect {
                    indirect_op: slot[ind.indirect_op],
                    nr_segments: le_u16(slot, ind.nr_segments),
                    handle: le_u16(slot, ind.handle),
                    id: le_u64(slot, ind.id),
                    sector_number: le_u64(slot, ind.sector_number),
                    indirect_grefs,
                }
            }
            operation => RawRequest::Other {
                operation,
                id: le_u64(slot, l.other.id),
            },
        }
    }

    /// The slot image of this request in `protocol`'s layout (frontend side). Starts
    /// from zeros, so padding and unused fields are zero. Only the first
    /// [`Protocol::request_size`] bytes belong to the slot.
    ///
    /// Fields are written as given, even nonsensical ones (a hostile test frontend
    /// needs that). A `ReadWrite` whose `operation` is not one of its four opcodes, or an
    /// `Other` whose `operation` is a known opcode, decodes as a different variant.
    pub fn encode(&self, protocol: Protocol) -> [u8; MAX_REQUEST_SIZE] {
        let l = protocol.layout();
        let mut b = [0u8; MAX_REQUEST_SIZE];
        match *self {
            RawRequest::ReadWrite {
                operation,
                nr_segments,
                handle,
                id,
                sector_number,
                segments,
            } => {
                let rw = l.read_write;
                b[rw.operation] = operation;
                b[rw.nr_segments] = nr_segments;
                put_u16(&mut b, rw.handle, handle);
                put_u64(&mut b, rw.id, id);
                put_u64(&mut b, rw.sector_number, sector_number);
                for (i, s) in segments.iter().enumerate() {
                    let at = rw.seg + i * SEGMENT_SIZE;
                    b[at..at + SEGMENT_SIZE].copy_from_slice(&s.encode());
                }
            }
            RawRequest::Discard {
                flag,
                handle,
                id,
                sector_number,
                nr_sectors,
            } => {
                let d = l.discard;
                b[d.operation] = BLKIF_OP_DISCARD;
                b[d.flag] = flag;
                put_u16(&mut b, d.handle, handle);
                put_u64(&mut b, d.id, id);
                put_u64(&mut b, d.sector_number, sector_number);
                put_u64(&mut b, d.nr_sectors, nr_sectors);
            }
            RawRequest::Indirect {
                indirect_op,
                nr_segments,
                handle,
                id,
                sector_number,
                indirect_grefs,
            } => {
                let ind = l.indirect;
                b[ind.operation] = BLKIF_OP_INDIRECT;
                b[ind.indirect_op] = indirect_op;
                put_u16(&mut b, ind.nr_segments, nr_segments);
                put_u64(&mut b, ind.id, id);
                put_u64(&mut b, ind.sector_number, sector_number);
                put_u16(&mut b, ind.handle, handle);
                for (i, g) in indirect_grefs.iter().enumerate() {
                    put_u32(&mut b, ind.indirect_grefs + 4 * i, *g);
                }
            }
            RawRequest::Other { operation, id } => {
                b[l.other.operation] = operation;
                put_u64(&mut b, l.other.id, id);
            }
        }
        b
    }

    /// A direct READ/WRITE/WRITE_BARRIER/FLUSH_DISKCACHE request with these segments,
    /// or `None` if `operation` is not one of those or there are more than 11 segments.
    pub fn direct(
        operation: u8,
        id: u64,
        handle: u16,
        sector_number: u64,
        segments: &[Segment],
    ) -> Option<Self> {
        if !matches!(
            operation,
            BLKIF_OP_READ | BLKIF_OP_WRITE | BLKIF_OP_WRITE_BARRIER | BLKIF_OP_FLUSH_DISKCACHE
        ) || segments.len() > BLKIF_MAX_SEGMENTS_PER_REQUEST
        {
            return None;
        }
        let nr_segments = u8::try_from(segments.len()).ok()?;
        let mut segs = [Segment::default(); BLKIF_MAX_SEGMENTS_PER_REQUEST];
        segs[..segments.len()].copy_from_slice(segments);
        Some(RawRequest::ReadWrite {
            operation,
            nr_segments,
            handle,
            id,
            sector_number,
            segments: segs,
        })
    }

    /// An indirect READ/WRITE request of `nr_segments` descriptors held in the pages
    /// `indirect_grefs` (at most 8; the rest are zero), or `None` if there are more.
    pub fn indirect(
        indirect_op: u8,
        id: u64,
        handle: u16,
        sector_number: u64,
        nr_segments: u16,
        indirect_grefs: &[u32],
    ) -> Option<Self> {
        if indirect_grefs.len() > BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST {
            return None;
        }
        let mut grefs = [0u32; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
        grefs[..indirect_grefs.len()].copy_from_slice(indirect_grefs);
        Some(RawRequest::Indirect {
            indirect_op,
            nr_segments,
            handle,
            id,
            sector_number,
            indirect_grefs: grefs,
        })
    }

    /// A DISCARD of `nr_sectors` sectors from `sector_number`.
    pub fn discard(
        id: u64,
        handle: u16,
        sector_number: u64,
        nr_sectors: u64,
        secure: bool,
    ) -> Self {
        RawRequest::Discard {
            flag: if secure { BLKIF_DISCARD_SECURE } else { 0 },
            handle,
            id,
            sector_number,
            nr_sectors,
        }
    }

    /// The opcode in the slot's first byte.
    pub fn operation(&self) -> u8 {
        match *self {
            RawRequest::ReadWrite { operation, .. } | RawRequest::Other { operation, .. } => {
                operation
            }
            RawRequest::Discard { .. } => BLKIF_OP_DISCARD,
            RawRequest::Indirect { .. } => BLKIF_OP_INDIRECT,
        }
    }

    /// The guest's `id`, to echo in the response. The same offset in every variant of
    /// an ABI, so it is known even for unknown opcodes.
    pub fn id(&self) -> u64 {
        match *self {
            RawRequest::ReadWrite { id, .. }
            | RawRequest::Discard { id, .. }
            | RawRequest::Indirect { id, .. }
            | RawRequest::Other { id, .. } => id,
        }
    }

    /// The `operation` to echo in the response: the inner `indirect_op` for indirect
    /// requests (the seed's `req_operation`, which blkfront checks against its shadow
    /// copy), the opcode otherwise.
    pub fn response_operation(&self) -> u8 {
        match *self {
            RawRequest::Indirect { indirect_op, .. } => indirect_op,
            _ => self.operation(),
        }
    }

    /// The response answering this request with `status` (typically
    /// [`RequestError::status`] of a failed validation).
    pub fn response(&self, status: i16) -> Response {
        Response {
            id: self.id(),
            operation: self.response_operation(),
            status,
        }
    }

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
fn check_segments(segments: &[Segment]) -> Result<u64, RequestError> {
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
    fn check_access(
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
    fn check_alignment(
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

/// An indirect READ/WRITE whose header passed validation; its descriptors have not
/// been read yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
///
/// Its fields are private so the invariants `validate` established (segment count
/// within the limits, page count at most 8) cannot be broken before `parse_segments`.
pub struct IndirectRequest {
    id: u64,
    operation: Operation,
    handle: u16,
    sector: u64,
    nr_segments: u16,
    nr_pages: u8,
    grefs: [u32; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST],
}

/// A page of indirect segment descriptors the engine has mapped (or copied).
///
/// Implemented for [`SharedMemory`] (a mapped grant: read with volatile copies) and for
/// private byte buffers (`[u8]`, `[u8; PAGE_SIZE]`, e.g. after a grant copy).
pub trait DescriptorPage {
    /// Copies `dst.len()` bytes from `offset` of the page into `dst`, once.
    fn copy_descriptors(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds>;
}

impl DescriptorPage for SharedMemory {
    fn copy_descriptors(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        self.read(offset, dst)
    }
}

impl DescriptorPage for [u8] {
    fn copy_descriptors(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        let src = offset
            .checked_add(dst.len())
            .and_then(|end| self.get(offset..end))
            .ok_or(OutOfBounds {
                offset,
                len: dst.len(),
                region_len: self.len(),
            })?;
        dst.copy_from_slice(src);
        Ok(())
    }
}

impl DescriptorPage for [u8; PAGE_SIZE] {
    fn copy_descriptors(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        self.as_slice().copy_descriptors(offset, dst)
    }
}

impl DescriptorPage for Vec<u8> {
    fn copy_descriptors(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        self.as_slice().copy_descriptors(offset, dst)
    }
}

impl<T: DescriptorPage + ?Sized> DescriptorPage for &T {
    fn copy_descriptors(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        (**self).copy_descriptors(offset, dst)
    }
}

impl IndirectRequest {
    /// The guest's `id`.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// [`Operation::Read`] or [`Operation::Write`].
    pub fn operation(&self) -> Operation {
        self.operation
    }

    /// The guest's `handle`.
    pub fn handle(&self) -> u16 {
        self.handle
    }

    /// First 512-byte sector.
    pub fn sector(&self) -> u64 {
        self.sector
    }

    /// Number of segment descriptors: 1..=`max_indirect_segments` (and at most 4096).
    pub fn nr_segments(&self) -> u16 {
        self.nr_segments
    }

    /// Grant references of the descriptor pages to map, in order (only as many as
    /// `nr_segments` needs: `ceil(nr_segments / 512)`).
    pub fn indirect_grefs(&self) -> &[u32] {
        &self.grefs[..usize::from(self.nr_pages)]
    }

    /// Number of descriptor pages (`indirect_grefs().len()`).
    pub fn nr_pages(&self) -> usize {
        usize::from(self.nr_pages)
    }

    /// `xen_blkbk_parse_indirect`: copies the descriptors out of `pages` (the mapped
    /// `indirect_grefs()`, in order), each page with one read, checks every descriptor
    /// and stores them in `out`, returning the filled prefix.
    ///
    /// `out` is the engine's reusable buffer (no allocation here) and must hold
    /// `nr_segments` entries; `pages` must hold at least [`IndirectRequest::nr_pages`].
    pub fn parse_segments<'o, P: DescriptorPage>(
        &self,
        pages: &[P],
        out: &'o mut [Segment],
    ) -> Result<&'o [Segment], RequestError> {
        let n = usize::from(self.nr_segments);
        let nr_pages = self.nr_pages();
        if pages.len() < nr_pages {
            return Err(RequestError::IndirectPagesMissing {
                needed: nr_pages,
                given: pages.len(),
            });
        }
        if out.len() < n {
            return Err(RequestError::SegmentBufferTooSmall {
                needed: n,
                capacity: out.len(),
            });
        }
        let out = &mut out[..n];
        let mut copy = [0u8; PAGE_SIZE];
        for (page_index, (page, chunk)) in pages
            .iter()
            .zip(out.chunks_mut(SEGMENTS_PER_INDIRECT_PAGE))
            .enumerate()
        {
            let bytes = &mut copy[..chunk.len() * SEGMENT_SIZE];
            page.copy_descriptors(0, bytes).map_err(|source| {
                RequestError::IndirectPageUnreadable {
                    page: page_index,
                    source,
                }
            })?;
            for (k, (seg, raw)) in chunk
                .iter_mut()
                .zip(bytes.chunks_exact(SEGMENT_SIZE))
                .enumerate()
            {
                let mut d = [0u8; SEGMENT_SIZE];
                d.copy_from_slice(raw);
                let s = Segment::decode(&d);
                s.check(page_index * SEGMENTS_PER_INDIRECT_PAGE + k)?;
                *seg = s;
            }
        }
        Ok(out)
    }

    /// The checks that need every descriptor: the total range inside the disk
    /// (`xen_vbd_translate`) and alignment to the logical block size. `segments` is
    /// what [`IndirectRequest::parse_segments`] returned (re-checked here, so a
    /// slice from elsewhere cannot smuggle a bad descriptor in).
    pub fn finish(
        &self,
        segments: &[Segment],
        limits: &DeviceLimits,
    ) -> Result<Request, RequestError> {
        if segments.len() != usize::from(self.nr_segments) {
            return Err(RequestError::SegmentCountMismatch {
                expected: self.nr_segments,
                given: segments.len(),
            });
        }
        let nr_sectors = check_segments(segments)?;
        limits.check_access(self.operation, self.sector, nr_sectors)?;
        limits.check_alignment(self.sector, segments.iter().map(Segment::nr_sectors))?;
        Ok(Request {
            id: self.id,
            operation: self.operation,
            handle: self.handle,
            sector: self.sector,
            nr_sectors,
            segments: Segments::Indirect {
                count: self.nr_segments,
            },
        })
    }

    /// The response answering this request with `status`.
    pub fn response(&self, status: i16) -> Response {
        Response {
            id: self.id,
            operation: self.operation.blkif_op(),
            status,
        }
    }
}

/// Writes up to 512 descriptors into an indirect page with one copy (frontend side).
pub fn write_indirect_page(page: &SharedMemory, segments: &[Segment]) -> Result<(), OutOfBounds> {
    let mut buf = [0u8; PAGE_SIZE];
    let n = segments.len().min(SEGMENTS_PER_INDIRECT_PAGE);
    for (chunk, s) in buf.chunks_exact_mut(SEGMENT_SIZE).zip(&segments[..n]) {
        chunk.copy_from_slice(&s.encode());
    }
    page.write(0, &buf[..n * SEGMENT_SIZE])
}

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
