//! The xenstore wire format of `xen/io/xs_wire.h`: message types, the 16-byte
//! header, payload limits, encoding, and a strict bounded decoder.
//!
//! Every message is `struct xsd_sockmsg { u32 type, req_id, tx_id, len; }` in
//! little-endian (x86 Xen is little-endian only; the C code uses host order),
//! followed by `len <= XENSTORE_PAYLOAD_MAX` bytes of NUL-separated strings.
//! The decoder checks `len` *before* allocating, so a peer can never make us
//! allocate more than [`PAYLOAD_MAX`] bytes per message, and it never panics
//! on any byte sequence.

use std::io::{self, Read, Write};

use crate::error::ProtocolError;

/// Size of `struct xsd_sockmsg`.
pub const HEADER_LEN: usize = 16;
/// `XENSTORE_PAYLOAD_MAX`: the largest payload either side may send.
pub const PAYLOAD_MAX: usize = 4096;
/// `XENSTORE_ABS_PATH_MAX`: the longest absolute path.
pub const ABS_PATH_MAX: usize = 3072;
/// `XENSTORE_REL_PATH_MAX`: the longest relative path.
pub const REL_PATH_MAX: usize = 2048;

/// `enum xsd_sockmsg_type`, with the numbers of xs_wire.h.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum MsgType {
    /// `XS_CONTROL` (alias `XS_DEBUG`).
    Control = 0,
    /// `XS_DIRECTORY`: list a node's children.
    Directory = 1,
    /// `XS_READ`: read a node's value.
    Read = 2,
    /// `XS_GET_PERMS`: read a node's permissions.
    GetPerms = 3,
    /// `XS_WATCH`: register a watch.
    Watch = 4,
    /// `XS_UNWATCH`: remove a watch.
    Unwatch = 5,
    /// `XS_TRANSACTION_START`.
    TransactionStart = 6,
    /// `XS_TRANSACTION_END` ("T" commits, "F" aborts).
    TransactionEnd = 7,
    /// `XS_INTRODUCE`: the toolstack announces a domain.
    Introduce = 8,
    /// `XS_RELEASE`: the toolstack announces a domain is gone.
    Release = 9,
    /// `XS_GET_DOMAIN_PATH`: `/local/domain/<domid>`.
    GetDomainPath = 10,
    /// `XS_WRITE`: write a node's value, creating it and missing parents.
    Write = 11,
    /// `XS_MKDIR`: create a node with an empty value.
    Mkdir = 12,
    /// `XS_RM`: remove a node and its subtree.
    Rm = 13,
    /// `XS_SET_PERMS`: replace a node's permissions.
    SetPerms = 14,
    /// `XS_WATCH_EVENT`: asynchronous watch notification (req_id 0).
    WatchEvent = 15,
    /// `XS_ERROR`: an error reply; payload is the errno name.
    Error = 16,
    /// `XS_IS_DOMAIN_INTRODUCED`.
    IsDomainIntroduced = 17,
    /// `XS_RESUME`.
    Resume = 18,
    /// `XS_SET_TARGET`.
    SetTarget = 19,
    /// `XS_RESET_WATCHES` (`XS_SET_TARGET + 2`; 20 was `XS_RESTRICT`, removed).
    ResetWatches = 21,
    /// `XS_DIRECTORY_PART`: a slice of a long children list.
    DirectoryPart = 22,
}

/// `XS_TYPE_COUNT`: one more than the largest valid type number.
pub const TYPE_COUNT: u32 = 23;

impl MsgType {
    /// The type for a wire number, if xs_wire.h defines one.
    pub fn from_u32(v: u32) -> Option<MsgType> {
        use MsgType::*;
        Some(match v {
            0 => Control,
            1 => Directory,
            2 => Read,
            3 => GetPerms,
            4 => Watch,
            5 => Unwatch,
            6 => TransactionStart,
            7 => TransactionEnd,
            8 => Introduce,
            9 => Release,
            10 => GetDomainPath,
            11 => Write,
            12 => Mkdir,
            13 => Rm,
            14 => SetPerms,
            15 => WatchEvent,
            16 => Error,
            17 => IsDomainIntroduced,
            18 => Resume,
            19 => SetTarget,
            21 => ResetWatches,
            22 => DirectoryPart,
            _ => return None,
        })
    }

    /// The wire number.
    pub fn as_u32(self) -> u32 {
        self as u32
    }
}

/// `struct xsd_sockmsg`. `ty` stays a raw number so that a server can answer
/// an unknown type with `EINVAL` instead of dropping the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Message type number (see [`MsgType`]).
    pub ty: u32,
    /// Request id, echoed in the reply; 0 for watch events.
    pub req_id: u32,
    /// Transaction id, 0 outside a transaction.
    pub tx_id: u32,
    /// Payload length in bytes.
    pub len: u32,
}

impl Header {
    /// Encodes the header in wire (little-endian) order.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.ty.to_le_bytes());
        b[4..8].copy_from_slice(&self.req_id.to_le_bytes());
        b[8..12].copy_from_slice(&self.tx_id.to_le_bytes());
        b[12..16].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Decodes and validates a header: `len` must not exceed [`PAYLOAD_MAX`].
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, ProtocolError> {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let h = Header {
            ty: word(0),
            req_id: word(4),
            tx_id: word(8),
            len: word(12),
        };
        if h.len as usize > PAYLOAD_MAX {
            return Err(ProtocolError::PayloadTooLarge(h.len));
        }
        Ok(h)
    }

    /// The message type, if the number is a known one.
    pub fn msg_type(&self) -> Option<MsgType> {
        MsgType::from_u32(self.ty)
    }
}

/// A whole message: header fields plus its (bounded) payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The header; `header.len == payload.len()`.
    pub header: Header,
    /// The payload, at most [`PAYLOAD_MAX`] bytes.
    pub payload: Vec<u8>,
}

/// Why [`read_message`] returned no message.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The stream ended cleanly between two messages.
    #[error("end of stream")]
    Eof,
    /// The peer broke the framing; the stream cannot be resynchronised.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The transport failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads exactly one message. Allocates at most `header.len <= PAYLOAD_MAX`
/// bytes, and only after the header was validated.
pub fn read_message<R: Read + ?Sized>(r: &mut R) -> Result<Message, ReadError> {
    let mut hdr = [0u8; HEADER_LEN];
    let got = read_full(r, &mut hdr)?;
    if got == 0 {
        return Err(ReadError::Eof);
    }
    if got < HEADER_LEN {
        return Err(ProtocolError::Truncated.into());
    }
    let header = Header::decode(&hdr)?;
    let mut payload = vec![0u8; header.len as usize];
    if read_full(r, &mut payload)? < payload.len() {
        return Err(ProtocolError::Truncated.into());
    }
    Ok(Message { header, payload })
}

/// Like `read_exact`, but reports how much was read before EOF so the caller
/// can tell a clean end of stream from a truncated message.
fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Builds a complete message (header + payload) in one buffer, so it can be
/// sent with a single `write`: the Linux xenbus device and a shared socket
/// both want a message to go out in one piece.
///
/// Fails with `None` if the payload would exceed [`PAYLOAD_MAX`].
pub fn encode(ty: MsgType, req_id: u32, tx_id: u32, payload: &[u8]) -> Option<Vec<u8>> {
    encode_raw(ty.as_u32(), req_id, tx_id, payload)
}

/// [`encode`] for a raw type number (used to answer unknown types).
pub fn encode_raw(ty: u32, req_id: u32, tx_id: u32, payload: &[u8]) -> Option<Vec<u8>> {
    if payload.len() > PAYLOAD_MAX {
        return None;
    }
    let header = Header {
        ty,
        req_id,
        tx_id,
        // Cannot truncate: checked against PAYLOAD_MAX above.
        len: payload.len() as u32,
    };
    let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
    buf.extend_from_slice(&header.to_bytes());
    buf.extend_from_slice(payload);
    Some(buf)
}

/// Writes a pre-encoded message in one call.
pub fn write_message<W: Write + ?Sized>(w: &mut W, encoded: &[u8]) -> io::Result<()> {
    w.write_all(encoded)
}

/// Joins arguments into a payload, each followed by a NUL terminator (the
/// common xenstore shape: `path\0`, `path\0token\0`, `n0\0r1\0`).
pub fn nul_terminated(args: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(args.iter().map(|a| a.len() + 1).sum());
    for a in args {
        out.extend_from_slice(a);
        out.push(0);
    }
    out
}

/// Splits a payload into exactly `n` NUL-terminated strings. Returns `None`
/// if the count differs or the last string is not terminated: xenstored
/// answers such requests with `EINVAL`.
pub fn split_exact(payload: &[u8], n: usize) -> Option<Vec<&[u8]>> {
    let parts = split_terminated(payload)?;
    (parts.len() == n).then_some(parts)
}

/// Splits a payload made of NUL-terminated strings. Returns `None` if the
/// payload does not end with NUL (an empty payload is zero strings).
pub fn split_terminated(payload: &[u8]) -> Option<Vec<&[u8]>> {
    if payload.is_empty() {
        return Some(Vec::new());
    }
    let body = payload.strip_suffix(&[0])?;
    Some(body.split(|&b| b == 0).collect())
}

/// Splits a `XS_WRITE` payload: a NUL-terminated path followed by the raw
/// value (which may contain anything, including NULs, and is not terminated).
pub fn split_write(payload: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = payload.iter().position(|&b| b == 0)?;
    Some((&payload[..nul], &payload[nul + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn type_numbers_match_xs_wire_h() {
        assert_eq!(MsgType::Directory.as_u32(), 1);
        assert_eq!(MsgType::Write.as_u32(), 11);
        assert_eq!(MsgType::WatchEvent.as_u32(), 15);
        assert_eq!(MsgType::Error.as_u32(), 16);
        assert_eq!(MsgType::SetTarget.as_u32(), 19);
        assert_eq!(MsgType::ResetWatches.as_u32(), 21);
        assert_eq!(MsgType::DirectoryPart.as_u32(), 22);
        assert_eq!(MsgType::from_u32(20), None);
        assert_eq!(MsgType::from_u32(TYPE_COUNT), None);
        for v in 0..TYPE_COUNT {
            if let Some(t) = MsgType::from_u32(v) {
                assert_eq!(t.as_u32(), v);
            }
        }
    }

    #[test]
    fn header_is_little_endian() {
        let h = Header {
            ty: 2,
            req_id: 0x0102_0304,
            tx_id: 7,
            len: 5,
        };
        let b = h.to_bytes();
        assert_eq!(&b[..8], &[2, 0, 0, 0, 4, 3, 2, 1]);
        assert_eq!(Header::decode(&b).unwrap(), h);
    }

    #[test]
    fn oversized_len_is_rejected_before_allocating() {
        let h = Header {
            ty: 2,
            req_id: 1,
            tx_id: 0,
            len: u32::MAX,
        };
        let mut r: &[u8] = &h.to_bytes();
        assert!(matches!(
            read_message(&mut r),
            Err(ReadError::Protocol(ProtocolError::PayloadTooLarge(
                u32::MAX
            )))
        ));
        let h = Header { len: 4097, ..h };
        assert!(Header::decode(&h.to_bytes()).is_err());
        let h = Header { len: 4096, ..h };
        assert!(Header::decode(&h.to_bytes()).is_ok());
    }

    #[test]
    fn eof_and_truncation() {
        let mut empty: &[u8] = &[];
        assert!(matches!(read_message(&mut empty), Err(ReadError::Eof)));
        let mut short: &[u8] = &[1, 2, 3];
        assert!(matches!(
            read_message(&mut short),
            Err(ReadError::Protocol(ProtocolError::Truncated))
        ));
        let msg = encode(MsgType::Read, 1, 0, b"abc\0").unwrap();
        let mut cut: &[u8] = &msg[..msg.len() - 1];
        assert!(matches!(
            read_message(&mut cut),
            Err(ReadError::Protocol(ProtocolError::Truncated))
        ));
    }

    #[test]
    fn splitting() {
        assert_eq!(split_exact(b"a\0", 1), Some(vec![&b"a"[..]]));
        assert_eq!(split_exact(b"a", 1), None);
        assert_eq!(split_exact(b"a\0b\0", 1), None);
        assert_eq!(split_exact(b"a\0b\0", 2), Some(vec![&b"a"[..], &b"b"[..]]));
        assert_eq!(split_exact(b"\0", 1), Some(vec![&b""[..]]));
        assert_eq!(split_terminated(b""), Some(vec![]));
        assert_eq!(split_write(b"p\0v\0x"), Some((&b"p"[..], &b"v\0x"[..])));
        assert_eq!(split_write(b"p"), None);
        assert_eq!(nul_terminated(&[b"a", b"bc"]), b"a\0bc\0");
        assert!(encode(MsgType::Write, 1, 0, &[0; PAYLOAD_MAX + 1]).is_none());
    }

    proptest! {
        #[test]
        fn decoder_never_panics_or_overallocates(bytes in proptest::collection::vec(any::<u8>(), 0..9000)) {
            let mut r: &[u8] = &bytes;
            // Decode until the stream is exhausted or broken.
            while let Ok(m) = read_message(&mut r) {
                prop_assert!(m.payload.len() <= PAYLOAD_MAX);
            }
        }

        #[test]
        fn encode_decode_round_trip(ty in 0u32..TYPE_COUNT, req in any::<u32>(), tx in any::<u32>(),
                                    payload in proptest::collection::vec(any::<u8>(), 0..=PAYLOAD_MAX)) {
            let buf = encode_raw(ty, req, tx, &payload).unwrap();
            let mut r: &[u8] = &buf;
            let m = read_message(&mut r).unwrap();
            prop_assert_eq!(m.header, Header { ty, req_id: req, tx_id: tx, len: payload.len() as u32 });
            prop_assert_eq!(m.payload, payload);
        }
    }
}
