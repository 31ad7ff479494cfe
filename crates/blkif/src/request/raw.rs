//! The wire form of a request: [`RawRequest`], decoded from (and, for a frontend,
//! encoded into) a private copy of one slot, and its [`Segment`] descriptors. Nothing
//! here judges a value; that is `validate.rs`.

use crate::abi::{
    Protocol, BLKIF_DISCARD_SECURE, BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
    BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT,
    BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, MAX_REQUEST_SIZE, SECTORS_PER_PAGE,
    SECTOR_SIZE, SEGMENT_FIRST_SECT, SEGMENT_GREF, SEGMENT_LAST_SECT, SEGMENT_SIZE,
};
use crate::response::Response;

#[cfg(doc)]
use super::Request;
use super::{le_u16, le_u32, le_u64, put_u16, put_u32, put_u64, RequestError};

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
}
