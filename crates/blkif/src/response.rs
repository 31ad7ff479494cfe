//! Responses: `struct blkif_response` encoding (backend) and decoding (frontend).
//!
//! This module owns the byte image of a response. Encoding always starts from a zeroed
//! private buffer of the full response size, so the padding bytes between `operation`
//! and `status` and after `status` are zero rather than whatever was in memory
//! (XSA-216: blkback leaked kernel stack through exactly those bytes). The ring writes
//! the buffer to the slot with one copy.

use crate::abi::{
    Protocol, BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, MAX_RESPONSE_SIZE,
};

/// A response as both sides see it, independent of the ABI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Response {
    /// The request's `id`, echoed.
    pub id: u64,
    /// The request's operation, echoed. For `BLKIF_OP_INDIRECT` requests this is the
    /// inner `indirect_op` (READ or WRITE), as blkback answers and blkfront checks.
    pub operation: u8,
    /// `BLKIF_RSP_OKAY`, `BLKIF_RSP_ERROR` or `BLKIF_RSP_EOPNOTSUPP`.
    pub status: i16,
}

impl Response {
    /// A response with status `BLKIF_RSP_OKAY`.
    pub const fn okay(id: u64, operation: u8) -> Self {
        Response {
            id,
            operation,
            status: BLKIF_RSP_OKAY,
        }
    }

    /// A response with status `BLKIF_RSP_ERROR`.
    pub const fn error(id: u64, operation: u8) -> Self {
        Response {
            id,
            operation,
            status: BLKIF_RSP_ERROR,
        }
    }

    /// A response with status `BLKIF_RSP_EOPNOTSUPP`.
    pub const fn not_supported(id: u64, operation: u8) -> Self {
        Response {
            id,
            operation,
            status: BLKIF_RSP_EOPNOTSUPP,
        }
    }

    /// The complete byte image of this response in `protocol`'s layout. Only the first
    /// [`Protocol::response_size`] bytes are meaningful; every byte, padding included,
    /// is initialised (zero where no field lives).
    pub fn encode(&self, protocol: Protocol) -> [u8; MAX_RESPONSE_SIZE] {
        let l = protocol.layout().response;
        let mut buf = [0u8; MAX_RESPONSE_SIZE];
        buf[l.id..l.id + 8].copy_from_slice(&self.id.to_le_bytes());
        buf[l.operation] = self.operation;
        buf[l.status..l.status + 2].copy_from_slice(&self.status.to_le_bytes());
        buf
    }

    /// Decodes a private copy of a response slot (frontend side). Total: any bytes
    /// decode to some response; deciding whether it answers a request is the caller's job.
    pub fn decode(protocol: Protocol, slot: &[u8; MAX_RESPONSE_SIZE]) -> Self {
        let l = protocol.layout().response;
        Response {
            id: crate::request::le_u64(slot, l.id),
            operation: slot[l.operation],
            status: i16::from_le_bytes([slot[l.status], slot[l.status + 1]]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_is_zero() {
        let r = Response {
            id: u64::MAX,
            operation: 0xff,
            status: -1,
        };
        let b = r.encode(Protocol::X86_64);
        assert_eq!(&b[..8], &[0xff; 8]);
        assert_eq!(b[8], 0xff);
        assert_eq!(b[9], 0, "padding between operation and status");
        assert_eq!(&b[10..12], &[0xff, 0xff]);
        assert_eq!(&b[12..16], &[0; 4], "tail padding");
        let b = r.encode(Protocol::X86_32);
        assert_eq!(b[9], 0);
        assert_eq!(&b[12..], &[0; 4], "beyond the 12-byte x86_32 response");
    }

    #[test]
    fn round_trip() {
        for p in [Protocol::Native, Protocol::X86_32, Protocol::X86_64] {
            for r in [
                Response::okay(1, 0),
                Response::error(u64::MAX, 6),
                Response::not_supported(0x1234_5678_9abc_def0, 4),
            ] {
                assert_eq!(Response::decode(p, &r.encode(p)), r);
            }
        }
    }
}
