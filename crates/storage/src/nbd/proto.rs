//! The NBD wire protocol (the `proto.md` of the NBD project): constants, encoders and
//! pure parsers.
//!
//! Everything a server sends is untrusted. The parsers here take the bytes received so
//! far and either decode one message, say how many more bytes they need, or reject it;
//! they never panic, never allocate more than the bounds below, and never trust a length
//! field beyond them. They are plain functions over byte slices, so a fuzz target can
//! drive them directly.

use std::fmt;

/// `NBDMAGIC`, the first eight bytes a newstyle server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation follows (and prefixes every client option).
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The old-style handshake's second magic; we do not speak old style.
pub const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_INFO: u32 = 3;
const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

/// Information types of `NBD_REP_INFO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Transmission phase magics.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;

/// Size of a request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Size of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// Longest export name the protocol allows (and we send).
pub const MAX_EXPORT_NAME: usize = 4096;
/// Longest option reply payload we accept. The protocol's strings are at most 4 KiB, the
/// fixed replies far smaller; anything longer is a hostile or broken server.
pub const MAX_OPTION_REPLY_LEN: u32 = 16 * 1024;
/// Longest structured reply chunk payload we would accept (the protocol's 32 MiB payload
/// limit plus the 8-byte offset).
pub const MAX_STRUCTURED_CHUNK_LEN: u32 = 32 * 1024 * 1024 + 8;

/// A violation of the protocol by the server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("the server speaks the old-style handshake, which is not supported")]
    OldStyle,
    #[error("the server does not support fixed newstyle negotiation")]
    NotFixedNewstyle,
    #[error("option reply for option {got}, expected {expected}")]
    WrongOption { expected: u32, got: u32 },
    #[error("option reply of {0} bytes is longer than {MAX_OPTION_REPLY_LEN}")]
    OptionReplyTooLong(u32),
    #[error("malformed {what}: {len} bytes")]
    BadLength { what: &'static str, len: usize },
    #[error("unexpected option reply type {0:#x}")]
    UnexpectedReply(u32),
    #[error("the server did not describe the export (no NBD_INFO_EXPORT)")]
    NoExportInfo,
    #[error("structured reply chunk of {0} bytes is too long")]
    ChunkTooLong(u32),
    #[error("block size constraints {min}/{preferred}/{max} are invalid")]
    BadBlockSize { min: u32, preferred: u32, max: u32 },
    #[error("transmission flags {0:#x} lack NBD_FLAG_HAS_FLAGS")]
    NoHasFlags(u16),
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags (18 bytes). Returns the
/// handshake flags.
pub fn parse_greeting(b: &[u8; 18]) -> Result<u16, ProtocolError> {
    let magic = be64(b, 0);
    if magic != NBD_MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    let second = be64(b, 8);
    if second == OLDSTYLE_MAGIC {
        return Err(ProtocolError::OldStyle);
    }
    if second != IHAVEOPT {
        return Err(ProtocolError::BadMagic(second));
    }
    let flags = be16(b, 16);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ProtocolError::NotFixedNewstyle);
    }
    Ok(flags)
}

/// Header of a client option: `IHAVEOPT`, option, data length.
pub fn encode_option_header(option: u32, len: u32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    h[8..12].copy_from_slice(&option.to_be_bytes());
    h[12..16].copy_from_slice(&len.to_be_bytes());
    h
}

/// Data of `NBD_OPT_GO` / `NBD_OPT_INFO`: the export name and the information requests
/// (we ask for the block size constraints; the export's size and flags always come).
pub fn encode_go_data(export: &str, out: &mut Vec<u8>) {
    out.clear();
    // Export names are at most MAX_EXPORT_NAME bytes (checked when the URI is parsed);
    // a longer one is sent with a length the server refuses rather than truncated.
    let len = u32::try_from(export.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
}

/// The fixed part of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    /// Payload length, already checked against [`MAX_OPTION_REPLY_LEN`].
    pub len: u32,
}

impl OptionReplyHeader {
    pub fn is_error(&self) -> bool {
        self.reply_type & REP_FLAG_ERROR != 0
    }
}

/// Parses an option reply header and checks it answers `expected_option`.
pub fn parse_option_reply_header(
    b: &[u8; OPTION_REPLY_HEADER_LEN],
    expected_option: u32,
) -> Result<OptionReplyHeader, ProtocolError> {
    let magic = be64(b, 0);
    if magic != OPTION_REPLY_MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    let h = OptionReplyHeader {
        option: be32(b, 8),
        reply_type: be32(b, 12),
        len: be32(b, 16),
    };
    if h.option != expected_option {
        return Err(ProtocolError::WrongOption {
            expected: expected_option,
            got: h.option,
        });
    }
    if h.len > MAX_OPTION_REPLY_LEN {
        return Err(ProtocolError::OptionReplyTooLong(h.len));
    }
    Ok(h)
}

/// Block size constraints (`NBD_INFO_BLOCK_SIZE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

/// One `NBD_REP_INFO` payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info {
    Export {
        size: u64,
        flags: u16,
    },
    BlockSize(BlockSize),
    /// A type we did not ask for or do not use (name, description, future ones).
    Other(u16),
}

/// Parses the payload of an `NBD_REP_INFO` reply.
pub fn parse_info(b: &[u8]) -> Result<Info, ProtocolError> {
    if b.len() < 2 {
        return Err(ProtocolError::BadLength {
            what: "NBD_REP_INFO",
            len: b.len(),
        });
    }
    match be16(b, 0) {
        INFO_EXPORT => {
            if b.len() != 12 {
                return Err(ProtocolError::BadLength {
                    what: "NBD_INFO_EXPORT",
                    len: b.len(),
                });
            }
            Ok(Info::Export {
                size: be64(b, 2),
                flags: be16(b, 10),
            })
        }
        INFO_BLOCK_SIZE => {
            if b.len() != 14 {
                return Err(ProtocolError::BadLength {
                    what: "NBD_INFO_BLOCK_SIZE",
                    len: b.len(),
                });
            }
            let bs = BlockSize {
                minimum: be32(b, 2),
                preferred: be32(b, 6),
                maximum: be32(b, 10),
            };
            // The protocol: minimum a power of two in 1..=64 KiB, preferred a power of
            // two >= minimum (and >= 512), maximum a multiple of minimum >= preferred (or
            // 0xffffffff). We check what we rely on.
            let valid = bs.minimum.is_power_of_two()
                && bs.minimum <= 65536
                && bs.preferred.is_power_of_two()
                && bs.preferred >= bs.minimum
                && bs.maximum >= bs.minimum;
            if !valid {
                return Err(ProtocolError::BadBlockSize {
                    min: bs.minimum,
                    preferred: bs.preferred,
                    max: bs.maximum,
                });
            }
            Ok(Info::BlockSize(bs))
        }
        other => Ok(Info::Other(other)),
    }
}

/// The reply of `NBD_OPT_EXPORT_NAME` (size, flags, optional 124 zero bytes): the first
/// ten bytes.
pub fn parse_export_name_reply(b: &[u8; 10]) -> (u64, u16) {
    (be64(b, 0), be16(b, 8))
}

/// What a server's option error reply means, for messages.
pub fn option_error_name(reply_type: u32) -> &'static str {
    match reply_type {
        REP_ERR_UNSUP => "unsupported option",
        REP_ERR_POLICY => "refused by policy",
        REP_ERR_INVALID => "invalid request",
        REP_ERR_PLATFORM => "not supported on this platform",
        REP_ERR_TLS_REQD => "TLS required (not supported by xenblkd)",
        REP_ERR_UNKNOWN => "no such export",
        REP_ERR_SHUTDOWN => "server shutting down",
        REP_ERR_BLOCK_SIZE_REQD => "block size negotiation required",
        REP_ERR_TOO_BIG => "request too big",
        _ => "unknown error",
    }
}

/// Encodes a request header into `out`.
pub fn encode_request(
    out: &mut [u8; REQUEST_LEN],
    flags: u16,
    command: u16,
    handle: u64,
    offset: u64,
    len: u32,
) {
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&command.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out[16..24].copy_from_slice(&offset.to_be_bytes());
    out[24..28].copy_from_slice(&len.to_be_bytes());
}

/// The header of a transmission-phase reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply: `error` is an NBD errno (0 = success); a successful read's data
    /// follows.
    Simple { error: u32, handle: u64 },
    /// A structured reply chunk; `len` payload bytes follow (bounded by
    /// [`MAX_STRUCTURED_CHUNK_LEN`]).
    Structured {
        flags: u16,
        chunk_type: u16,
        handle: u64,
        len: u32,
    },
}

impl ReplyHeader {
    /// Bytes the header itself occupies.
    pub fn header_len(&self) -> usize {
        match self {
            ReplyHeader::Simple { .. } => SIMPLE_REPLY_LEN,
            ReplyHeader::Structured { .. } => STRUCTURED_REPLY_LEN,
        }
    }
}

/// Parses the reply header at the start of `b`. `Ok(None)` when more bytes are needed.
pub fn parse_reply_header(b: &[u8]) -> Result<Option<ReplyHeader>, ProtocolError> {
    if b.len() < 4 {
        return Ok(None);
    }
    match be32(b, 0) {
        SIMPLE_REPLY_MAGIC => {
            if b.len() < SIMPLE_REPLY_LEN {
                return Ok(None);
            }
            Ok(Some(ReplyHeader::Simple {
                error: be32(b, 4),
                handle: be64(b, 8),
            }))
        }
        STRUCTURED_REPLY_MAGIC => {
            if b.len() < STRUCTURED_REPLY_LEN {
                return Ok(None);
            }
            let len = be32(b, 16);
            if len > MAX_STRUCTURED_CHUNK_LEN {
                return Err(ProtocolError::ChunkTooLong(len));
            }
            Ok(Some(ReplyHeader::Structured {
                flags: be16(b, 4),
                chunk_type: be16(b, 6),
                handle: be64(b, 8),
                len,
            }))
        }
        other => Err(ProtocolError::BadMagic(u64::from(other))),
    }
}

/// The Linux errno for an NBD error value. The protocol's values are Linux's own for the
/// errors it names; anything else becomes EIO, as the protocol asks clients to treat
/// unknown values.
pub fn errno_of(nbd_error: u32) -> i32 {
    match nbd_error {
        1 => libc::EPERM,
        5 => libc::EIO,
        12 => libc::ENOMEM,
        22 => libc::EINVAL,
        28 => libc::ENOSPC,
        75 => libc::EOVERFLOW,
        95 => libc::EOPNOTSUPP,
        108 => libc::ESHUTDOWN,
        _ => libc::EIO,
    }
}

/// Names a command, for logs.
#[derive(Debug, Clone, Copy)]
pub struct CommandName(pub u16);

impl fmt::Display for CommandName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            CMD_READ => "read",
            CMD_WRITE => "write",
            CMD_DISC => "disconnect",
            CMD_FLUSH => "flush",
            CMD_TRIM => "trim",
            CMD_WRITE_ZEROES => "write-zeroes",
            _ => "command",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greeting(flags: u16) -> [u8; 18] {
        let mut g = [0u8; 18];
        g[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
        g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        g[16..18].copy_from_slice(&flags.to_be_bytes());
        g
    }

    #[test]
    fn greetings() {
        assert_eq!(parse_greeting(&greeting(3)), Ok(3));
        assert_eq!(
            parse_greeting(&greeting(0)),
            Err(ProtocolError::NotFixedNewstyle)
        );
        let mut old = greeting(1);
        old[8..16].copy_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
        assert_eq!(parse_greeting(&old), Err(ProtocolError::OldStyle));
        let mut bad = greeting(1);
        bad[0] = 0;
        assert!(matches!(
            parse_greeting(&bad),
            Err(ProtocolError::BadMagic(_))
        ));
    }

    fn reply_header(option: u32, ty: u32, len: u32) -> [u8; 20] {
        let mut h = [0u8; 20];
        h[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        h[8..12].copy_from_slice(&option.to_be_bytes());
        h[12..16].copy_from_slice(&ty.to_be_bytes());
        h[16..20].copy_from_slice(&len.to_be_bytes());
        h
    }

    #[test]
    fn option_reply_headers_are_bounded_and_matched() {
        let h = parse_option_reply_header(&reply_header(OPT_GO, REP_INFO, 12), OPT_GO).unwrap();
        assert_eq!((h.reply_type, h.len, h.is_error()), (REP_INFO, 12, false));
        assert!(
            parse_option_reply_header(&reply_header(OPT_GO, REP_ERR_UNKNOWN, 0), OPT_GO)
                .unwrap()
                .is_error()
        );
        assert_eq!(
            parse_option_reply_header(&reply_header(OPT_INFO, REP_ACK, 0), OPT_GO),
            Err(ProtocolError::WrongOption {
                expected: OPT_GO,
                got: OPT_INFO
            })
        );
        assert_eq!(
            parse_option_reply_header(&reply_header(OPT_GO, REP_INFO, u32::MAX), OPT_GO),
            Err(ProtocolError::OptionReplyTooLong(u32::MAX))
        );
        let mut bad = reply_header(OPT_GO, REP_ACK, 0);
        bad[3] ^= 1;
        assert!(matches!(
            parse_option_reply_header(&bad, OPT_GO),
            Err(ProtocolError::BadMagic(_))
        ));
    }

    #[test]
    fn infos() {
        let mut e = vec![0u8, 0];
        e.extend_from_slice(&(1u64 << 30).to_be_bytes());
        e.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH).to_be_bytes());
        assert_eq!(
            parse_info(&e),
            Ok(Info::Export {
                size: 1 << 30,
                flags: TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH
            })
        );
        assert!(parse_info(&e[..11]).is_err());
        let bs = |min: u32, pref: u32, max: u32| {
            let mut b = vec![0u8, 3];
            b.extend_from_slice(&min.to_be_bytes());
            b.extend_from_slice(&pref.to_be_bytes());
            b.extend_from_slice(&max.to_be_bytes());
            b
        };
        assert_eq!(
            parse_info(&bs(512, 4096, 1 << 25)),
            Ok(Info::BlockSize(BlockSize {
                minimum: 512,
                preferred: 4096,
                maximum: 1 << 25
            }))
        );
        for (min, pref, max) in [
            (0, 4096, 4096),
            (3, 4096, 4096),
            (1 << 17, 1 << 17, 1 << 20),
            (512, 256, 4096),
            (4096, 4096, 512),
        ] {
            assert!(
                parse_info(&bs(min, pref, max)).is_err(),
                "{min} {pref} {max}"
            );
        }
        assert_eq!(parse_info(&[0, 1, b'x']), Ok(Info::Other(1)));
        assert!(parse_info(&[0]).is_err());
        assert!(parse_info(&[]).is_err());
    }

    #[test]
    fn reply_headers() {
        let mut s = [0u8; 16];
        s[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        s[4..8].copy_from_slice(&5u32.to_be_bytes());
        s[8..16].copy_from_slice(&0x1234u64.to_be_bytes());
        assert_eq!(parse_reply_header(&s[..15]), Ok(None));
        assert_eq!(parse_reply_header(&s[..3]), Ok(None));
        assert_eq!(
            parse_reply_header(&s),
            Ok(Some(ReplyHeader::Simple {
                error: 5,
                handle: 0x1234
            }))
        );
        let mut st = [0u8; 20];
        st[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        st[4..6].copy_from_slice(&1u16.to_be_bytes());
        st[6..8].copy_from_slice(&1u16.to_be_bytes());
        st[8..16].copy_from_slice(&7u64.to_be_bytes());
        st[16..20].copy_from_slice(&4104u32.to_be_bytes());
        assert_eq!(parse_reply_header(&st[..19]), Ok(None));
        let h = parse_reply_header(&st).unwrap().unwrap();
        assert_eq!(h.header_len(), 20);
        st[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            parse_reply_header(&st),
            Err(ProtocolError::ChunkTooLong(u32::MAX))
        );
        assert!(parse_reply_header(&[0xde, 0xad, 0xbe, 0xef]).is_err());
    }

    #[test]
    fn requests_encode_big_endian() {
        let mut r = [0u8; REQUEST_LEN];
        encode_request(&mut r, CMD_FLAG_FUA, CMD_WRITE, 0x0102, 4096, 512);
        assert_eq!(&r[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&r[4..8], &[0, 1, 0, 1]);
        assert_eq!(&r[8..16], &[0, 0, 0, 0, 0, 0, 1, 2]);
        assert_eq!(&r[16..24], &[0, 0, 0, 0, 0, 0, 0x10, 0]);
        assert_eq!(&r[24..28], &[0, 0, 2, 0]);
    }

    #[test]
    fn errnos() {
        assert_eq!(errno_of(5), libc::EIO);
        assert_eq!(errno_of(28), libc::ENOSPC);
        assert_eq!(errno_of(95), libc::EOPNOTSUPP);
        assert_eq!(errno_of(12345), libc::EIO);
    }

    /// Every prefix and every byte-flip of valid messages parses or fails cleanly.
    #[test]
    fn parsers_never_panic_on_mangled_input() {
        let mut seeds: Vec<Vec<u8>> = Vec::new();
        let mut s = vec![0u8; 16];
        s[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        seeds.push(s);
        let mut st = vec![0u8; 20];
        st[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        seeds.push(st);
        seeds.push(vec![0, 3, 0, 0, 2, 0, 0, 0, 16, 0, 0, 0, 32, 0]);
        seeds.push(vec![0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 1]);
        for seed in seeds {
            for cut in 0..=seed.len() {
                let _ = parse_reply_header(&seed[..cut]);
                let _ = parse_info(&seed[..cut]);
            }
            for i in 0..seed.len() {
                for bit in 0..8 {
                    let mut m = seed.clone();
                    m[i] ^= 1 << bit;
                    let _ = parse_reply_header(&m);
                    let _ = parse_info(&m);
                }
            }
        }
    }
}
