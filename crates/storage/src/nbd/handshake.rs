//! Connecting and the fixed-newstyle handshake, done with blocking socket calls under a
//! timeout: at open, on the reconnect helper thread and for size probes, never on a
//! reactor. The transmission phase that follows runs on the queue's io_uring.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::proto::{self, BlockSize, Info, ProtocolError};
use super::uri::NbdAddress;

/// Most option replies one option may produce before we give up on the server (a hostile
/// server could otherwise stream `NBD_REP_INFO` for ever).
const MAX_REPLIES_PER_OPTION: usize = 64;

/// Why connecting or negotiating failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the server refused: {reason}{}", if message.is_empty() { String::new() } else { format!(" ({message})") })]
    Refused {
        reply_type: u32,
        reason: &'static str,
        message: String,
    },
    #[error("{0}")]
    Unusable(String),
}

/// What the server told us about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
    /// Block size constraints, when the server sent them.
    pub block: Option<BlockSize>,
}

impl Negotiated {
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// A connected socket of either family.
pub(crate) enum NbdStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for NbdStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            NbdStream::Tcp(s) => s.read(buf),
            NbdStream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for NbdStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            NbdStream::Tcp(s) => s.write(buf),
            NbdStream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl NbdStream {
    fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            NbdStream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            NbdStream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }

    /// The descriptor for the transmission phase: blocking, no timeouts (io_uring waits
    /// on readiness itself).
    pub(crate) fn into_fd(self) -> io::Result<OwnedFd> {
        self.set_timeouts(None)?;
        Ok(match self {
            NbdStream::Tcp(s) => s.into(),
            NbdStream::Unix(s) => s.into(),
        })
    }
}

/// Connects to `address`, each step bounded by `timeout`.
pub(crate) fn connect(address: &NbdAddress, timeout: Duration) -> io::Result<NbdStream> {
    let stream = match address {
        NbdAddress::Unix { path } => NbdStream::Unix(UnixStream::connect(path)?),
        NbdAddress::Tcp { host, port } => {
            let mut last = io::Error::new(io::ErrorKind::NotFound, "no address for host");
            let mut connected = None;
            for addr in (host.as_str(), *port).to_socket_addrs()? {
                match TcpStream::connect_timeout(&addr, timeout) {
                    Ok(s) => {
                        connected = Some(s);
                        break;
                    }
                    Err(e) => last = e,
                }
            }
            let s = connected.ok_or(last)?;
            // Requests are small and latency-bound; Nagle would hold them back.
            s.set_nodelay(true)?;
            NbdStream::Tcp(s)
        }
    };
    stream.set_timeouts(Some(timeout))?;
    Ok(stream)
}

/// Which option ends the negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    /// `NBD_OPT_GO`: enter the transmission phase.
    Go,
    /// `NBD_OPT_INFO` then `NBD_OPT_ABORT`: only learn size and flags (size refresh).
    Info,
}

fn read_exact<const N: usize>(s: &mut impl Read) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)?;
    Ok(b)
}

/// Runs the fixed-newstyle handshake for `export` on a fresh connection. Public so that
/// the handshake can be driven over any stream (the fuzz targets script the server).
pub fn negotiate(
    s: &mut (impl Read + Write),
    export: &str,
    goal: Goal,
) -> Result<Negotiated, HandshakeError> {
    let server_flags = proto::parse_greeting(&read_exact::<18>(s)?)?;
    let no_zeroes = server_flags & proto::FLAG_NO_ZEROES != 0;
    let mut client_flags = proto::FLAG_C_FIXED_NEWSTYLE;
    if no_zeroes {
        client_flags |= proto::FLAG_C_NO_ZEROES;
    }
    s.write_all(&client_flags.to_be_bytes())?;

    let option = match goal {
        Goal::Go => proto::OPT_GO,
        Goal::Info => proto::OPT_INFO,
    };
    let mut data = Vec::with_capacity(export.len() + 8);
    proto::encode_go_data(export, &mut data);
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    let mut msg = proto::encode_option_header(option, len).to_vec();
    msg.extend_from_slice(&data);
    s.write_all(&msg)?;

    let mut export_info: Option<(u64, u16)> = None;
    let mut block = None;
    let mut payload = Vec::new();
    for _ in 0..MAX_REPLIES_PER_OPTION {
        let header = proto::parse_option_reply_header(&read_exact(s)?, option)?;
        payload.clear();
        payload.resize(header.len as usize, 0);
        s.read_exact(&mut payload)?;
        if header.is_error() {
            if header.reply_type == proto::REP_ERR_UNSUP && goal == Goal::Go {
                // A server older than NBD_OPT_GO: the legacy way in.
                return export_name(s, export, no_zeroes);
            }
            return Err(HandshakeError::Refused {
                reply_type: header.reply_type,
                reason: proto::option_error_name(header.reply_type),
                message: printable(&payload),
            });
        }
        match header.reply_type {
            proto::REP_INFO => match proto::parse_info(&payload)? {
                Info::Export { size, flags } => export_info = Some((size, flags)),
                Info::BlockSize(b) => block = Some(b),
                Info::Other(_) => {}
            },
            proto::REP_ACK => {
                let (size, flags) = export_info.ok_or(ProtocolError::NoExportInfo)?;
                if flags & proto::TFLAG_HAS_FLAGS == 0 {
                    return Err(ProtocolError::NoHasFlags(flags).into());
                }
                if goal == Goal::Info {
                    // Polite goodbye; the reply does not matter.
                    let _ = s.write_all(&proto::encode_option_header(proto::OPT_ABORT, 0));
                }
                return Ok(Negotiated { size, flags, block });
            }
            other => return Err(ProtocolError::UnexpectedReply(other).into()),
        }
    }
    Err(HandshakeError::Unusable(format!(
        "more than {MAX_REPLIES_PER_OPTION} replies to one option"
    )))
}

/// `NBD_OPT_EXPORT_NAME`: no error reply exists; an unknown export closes the connection.
fn export_name(
    s: &mut (impl Read + Write),
    export: &str,
    no_zeroes: bool,
) -> Result<Negotiated, HandshakeError> {
    let len = u32::try_from(export.len()).unwrap_or(u32::MAX);
    let mut msg = proto::encode_option_header(proto::OPT_EXPORT_NAME, len).to_vec();
    msg.extend_from_slice(export.as_bytes());
    s.write_all(&msg)?;
    let (size, flags) = proto::parse_export_name_reply(&read_exact(s)?);
    if !no_zeroes {
        read_exact::<124>(s)?;
    }
    if flags & proto::TFLAG_HAS_FLAGS == 0 {
        return Err(ProtocolError::NoHasFlags(flags).into());
    }
    Ok(Negotiated {
        size,
        flags,
        block: None,
    })
}

/// A server's message, safe to log: printable ASCII only, bounded.
fn printable(b: &[u8]) -> String {
    b.iter()
        .take(256)
        .map(|&c| {
            if (0x20..0x7f).contains(&c) {
                c as char
            } else {
                '?'
            }
        })
        .collect()
}

/// Connects and negotiates; returns the transmission-phase socket.
pub(crate) fn open(
    address: &NbdAddress,
    export: &str,
    timeout: Duration,
) -> Result<(OwnedFd, Negotiated), HandshakeError> {
    let mut stream = connect(address, timeout)?;
    let negotiated = negotiate(&mut stream, export, Goal::Go)?;
    Ok((stream.into_fd()?, negotiated))
}

/// Connects, asks for the export's current size and flags, and disconnects.
pub(crate) fn probe(
    address: &NbdAddress,
    export: &str,
    timeout: Duration,
) -> Result<Negotiated, HandshakeError> {
    let mut stream = connect(address, timeout)?;
    negotiate(&mut stream, export, Goal::Info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A scripted server: what it sends, and a sink for what the client writes.
    struct Script {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }
    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn greeting() -> Vec<u8> {
        let mut g = proto::NBD_MAGIC.to_be_bytes().to_vec();
        g.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        g.extend_from_slice(&3u16.to_be_bytes());
        g
    }

    fn reply(option: u32, ty: u32, payload: &[u8]) -> Vec<u8> {
        let mut r = proto::OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&option.to_be_bytes());
        r.extend_from_slice(&ty.to_be_bytes());
        r.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        r.extend_from_slice(payload);
        r
    }

    fn export_info(size: u64, flags: u16) -> Vec<u8> {
        let mut p = vec![0, 0];
        p.extend_from_slice(&size.to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
        p
    }

    fn run(input: Vec<u8>) -> (Result<Negotiated, HandshakeError>, Vec<u8>) {
        let mut s = Script {
            input: Cursor::new(input),
            output: Vec::new(),
        };
        let r = negotiate(&mut s, "disk", Goal::Go);
        (r, s.output)
    }

    #[test]
    fn go_with_block_size() {
        let mut input = greeting();
        input.extend(reply(
            proto::OPT_GO,
            proto::REP_INFO,
            &export_info(1 << 20, 0x1ed),
        ));
        input.extend(reply(
            proto::OPT_GO,
            proto::REP_INFO,
            &[0, 3, 0, 0, 2, 0, 0, 0, 16, 0, 2, 0, 0, 0],
        ));
        input.extend(reply(proto::OPT_GO, proto::REP_ACK, &[]));
        let (r, out) = run(input);
        let n = r.unwrap();
        assert_eq!((n.size, n.flags), (1 << 20, 0x1ed));
        assert_eq!(
            n.block,
            Some(BlockSize {
                minimum: 512,
                preferred: 4096,
                maximum: 1 << 25
            })
        );
        // Client flags, then IHAVEOPT / GO / len / name len / "disk" / 1 request / BLOCK_SIZE.
        assert_eq!(&out[0..4], &[0, 0, 0, 3]);
        assert_eq!(&out[4..12], &proto::IHAVEOPT.to_be_bytes());
        assert_eq!(&out[12..16], &proto::OPT_GO.to_be_bytes());
        assert_eq!(&out[16..20], &12u32.to_be_bytes());
        assert_eq!(&out[20..28], &[0, 0, 0, 4, b'd', b'i', b's', b'k']);
        assert_eq!(&out[28..32], &[0, 1, 0, 3]);
    }

    #[test]
    fn refusals_and_violations() {
        let mut input = greeting();
        input.extend(reply(proto::OPT_GO, proto::REP_ERR_UNKNOWN, b"no \x01such"));
        let (r, _) = run(input);
        match r {
            Err(HandshakeError::Refused { message, .. }) => assert_eq!(message, "no ?such"),
            other => panic!("{other:?}"),
        }
        // ACK without the export's size.
        let mut input = greeting();
        input.extend(reply(proto::OPT_GO, proto::REP_ACK, &[]));
        assert!(matches!(
            run(input).0,
            Err(HandshakeError::Protocol(ProtocolError::NoExportInfo))
        ));
        // Flags without HAS_FLAGS.
        let mut input = greeting();
        input.extend(reply(proto::OPT_GO, proto::REP_INFO, &export_info(512, 0)));
        input.extend(reply(proto::OPT_GO, proto::REP_ACK, &[]));
        assert!(matches!(
            run(input).0,
            Err(HandshakeError::Protocol(ProtocolError::NoHasFlags(0)))
        ));
        // An endless stream of replies is cut off.
        let mut input = greeting();
        for _ in 0..100 {
            input.extend(reply(proto::OPT_GO, proto::REP_INFO, &[0, 2, b'x']));
        }
        assert!(matches!(run(input).0, Err(HandshakeError::Unusable(_))));
        // A truncated stream is an I/O error, not a panic.
        let mut input = greeting();
        input.extend(reply(proto::OPT_GO, proto::REP_INFO, &export_info(512, 1)));
        for cut in 0..input.len() {
            assert!(run(input[..cut].to_vec()).0.is_err());
        }
        // A huge announced length is refused before anything is allocated.
        let mut input = greeting();
        let mut r = reply(proto::OPT_GO, proto::REP_INFO, &[]);
        r[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        input.extend(r);
        assert!(matches!(
            run(input).0,
            Err(HandshakeError::Protocol(ProtocolError::OptionReplyTooLong(
                _
            )))
        ));
    }

    #[test]
    fn falls_back_to_export_name() {
        let mut input = greeting();
        input.extend(reply(proto::OPT_GO, proto::REP_ERR_UNSUP, &[]));
        input.extend_from_slice(&(4096u64).to_be_bytes());
        input.extend_from_slice(&(proto::TFLAG_HAS_FLAGS | proto::TFLAG_READ_ONLY).to_be_bytes());
        let (r, out) = run(input);
        let n = r.unwrap();
        assert_eq!((n.size, n.block), (4096, None));
        assert!(n.has(proto::TFLAG_READ_ONLY));
        let tail = &out[out.len() - 20..];
        assert_eq!(&tail[8..12], &proto::OPT_EXPORT_NAME.to_be_bytes());
        assert_eq!(&tail[16..], b"disk");
    }
}
