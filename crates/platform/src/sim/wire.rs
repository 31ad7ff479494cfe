//! The simulator's attach protocol: fixed-size messages with file descriptors
//! (SCM_RIGHTS) over a unix stream socket between a guest and the backend's platform.
//!
//! ```text
//! guest                                   backend (SimPlatform)
//!   Hello{domid, frames, entries}  ──────►  validates, maps the grant table
//!     + [memory memfd, grant-table memfd, liveness pipe (read end)]
//!                                  ◄──────  Welcome{status, backend domid}
//!   PortAlloc{port, remote domid}  ──────►  read lazily, on bind_interdomain
//!     + [eventfd guest→backend, eventfd backend→guest]
//!   PortClose{port}                ──────►
//! ```
//!
//! Messages are 32 bytes, little endian: `magic u32, kind u32, payload`. A stream socket
//! keeps the descriptors attached to the first byte of their message, and a message is
//! sent with one `sendmsg`, so a reader gets a message and its descriptors together.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

use crate::{DomId, Port};

pub(crate) const MAGIC: u32 = u32::from_le_bytes(*b"XSIM");
pub(crate) const VERSION: u32 = 1;
pub(crate) const MSG_LEN: usize = 32;
/// Most descriptors any message carries; more is a protocol violation.
pub(crate) const MAX_FDS: usize = 3;

const HELLO: u32 = 1;
const WELCOME: u32 = 2;
const PORT_ALLOC: u32 = 3;
const PORT_CLOSE: u32 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Msg {
    /// fds: guest memory, grant table, liveness pipe read end.
    Hello {
        version: u32,
        domid: DomId,
        nr_frames: u32,
        nr_entries: u32,
    },
    /// `status` 0: attached; otherwise refused (the backend logs why).
    Welcome {
        status: i32,
        backend_domid: DomId,
    },
    /// fds: eventfd the guest writes (backend polls), eventfd the backend writes.
    PortAlloc {
        port: Port,
        remote_domid: DomId,
    },
    PortClose {
        port: Port,
    },
}

fn put_u32(b: &mut [u8; MSG_LEN], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn get_u32(b: &[u8; MSG_LEN], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Msg {
    pub(crate) fn encode(self) -> [u8; MSG_LEN] {
        let mut b = [0u8; MSG_LEN];
        put_u32(&mut b, 0, MAGIC);
        match self {
            Msg::Hello {
                version,
                domid,
                nr_frames,
                nr_entries,
            } => {
                put_u32(&mut b, 4, HELLO);
                put_u32(&mut b, 8, version);
                put_u32(&mut b, 12, domid.into());
                put_u32(&mut b, 16, nr_frames);
                put_u32(&mut b, 20, nr_entries);
            }
            Msg::Welcome {
                status,
                backend_domid,
            } => {
                put_u32(&mut b, 4, WELCOME);
                put_u32(&mut b, 8, status as u32);
                put_u32(&mut b, 12, backend_domid.into());
            }
            Msg::PortAlloc { port, remote_domid } => {
                put_u32(&mut b, 4, PORT_ALLOC);
                put_u32(&mut b, 8, port);
                put_u32(&mut b, 12, remote_domid.into());
            }
            Msg::PortClose { port } => {
                put_u32(&mut b, 4, PORT_CLOSE);
                put_u32(&mut b, 8, port);
            }
        }
        b
    }

    /// Decodes a message from the other side; every field is checked, nothing trusted.
    pub(crate) fn decode(b: &[u8; MSG_LEN]) -> Result<Msg, String> {
        if get_u32(b, 0) != MAGIC {
            return Err(format!("bad magic {:#x}", get_u32(b, 0)));
        }
        let domid = |at| {
            DomId::try_from(get_u32(b, at))
                .map_err(|_| format!("domid {} out of range", get_u32(b, at)))
        };
        Ok(match get_u32(b, 4) {
            HELLO => Msg::Hello {
                version: get_u32(b, 8),
                domid: domid(12)?,
                nr_frames: get_u32(b, 16),
                nr_entries: get_u32(b, 20),
            },
            WELCOME => Msg::Welcome {
                status: get_u32(b, 8) as i32,
                backend_domid: domid(12)?,
            },
            PORT_ALLOC => Msg::PortAlloc {
                port: get_u32(b, 8),
                remote_domid: domid(12)?,
            },
            PORT_CLOSE => Msg::PortClose {
                port: get_u32(b, 8),
            },
            k => return Err(format!("unknown message kind {k}")),
        })
    }
}

/// Sends `msg` with `fds` attached. `MSG_NOSIGNAL`: a dead peer is an `EPIPE`, not a
/// SIGPIPE.
pub(crate) fn send(sock: &UnixStream, msg: Msg, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let bytes = msg.encode();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many fds for one message",
        ));
    }
    let mut sent = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(&bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    // The descriptors went with the first byte; finish a (never observed) short write.
    while sent < MSG_LEN {
        let mut none = SendAncillaryBuffer::default();
        sent += rustix::net::sendmsg(
            sock,
            &[IoSlice::new(&bytes[sent..])],
            &mut none,
            SendFlags::NOSIGNAL,
        )?;
    }
    Ok(())
}

#[derive(Debug)]
pub(crate) enum Recv {
    Msg(Msg, Vec<OwnedFd>),
    /// Nothing to read (non-blocking socket) or the read timeout expired.
    WouldBlock,
    /// The peer closed the socket (or died).
    Eof,
}

/// What [`PartialMsg::read_available`] got.
#[derive(Debug)]
pub(crate) enum Progress {
    Msg(Msg, Vec<OwnedFd>),
    /// The message is not complete yet (possibly not begun); nothing more to read now.
    Pending,
    /// The peer closed the socket before a message began.
    Eof,
}

/// One message being received, possibly over several reads: what lets a reader that
/// must not wait on one peer (the simulator's acceptor) keep half a message and come
/// back when the rest arrives.
#[derive(Debug, Default)]
pub(crate) struct PartialMsg {
    buf: [u8; MSG_LEN],
    got: usize,
    fds: Vec<OwnedFd>,
}

impl PartialMsg {
    /// Whether any byte or descriptor of the message has arrived.
    pub(crate) fn is_begun(&self) -> bool {
        self.got > 0 || !self.fds.is_empty()
    }

    /// Reads what the socket holds, up to the end of the message. Waits only as a
    /// blocking socket does (its read timeout); on a non-blocking one, never.
    ///
    /// `Err` means the peer broke the protocol (bad message, too many descriptors, EOF in
    /// the middle of a message) or the socket failed; descriptors received so far are
    /// closed.
    pub(crate) fn read_available(&mut self, sock: &UnixStream) -> Result<Progress, String> {
        while self.got < MSG_LEN {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let res = rustix::net::recvmsg(
                sock,
                &mut [IoSliceMut::new(&mut self.buf[self.got..])],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            );
            // Take ownership of whatever arrived before judging the result, so nothing
            // leaks.
            for m in control.drain() {
                if let RecvAncillaryMessage::ScmRights(received) = m {
                    self.fds.extend(received);
                }
            }
            // Checked on every read, not once at the end: a peer sending its message a
            // byte at a time must not make us hold 3 descriptors per byte.
            if self.fds.len() > MAX_FDS {
                return Err(format!("{} descriptors with one message", self.fds.len()));
            }
            match res {
                Ok(r) if r.flags.contains(ReturnFlags::CTRUNC) => {
                    return Err("descriptors truncated (too many sent)".into())
                }
                Ok(r) if r.bytes == 0 => {
                    return if self.is_begun() {
                        Err("connection closed in the middle of a message".into())
                    } else {
                        Ok(Progress::Eof)
                    };
                }
                Ok(r) => self.got += r.bytes,
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => return Ok(Progress::Pending),
                Err(e) => return Err(format!("recvmsg: {e}")),
            }
        }
        let msg = Msg::decode(&self.buf)?;
        self.got = 0;
        Ok(Progress::Msg(msg, std::mem::take(&mut self.fds)))
    }
}

/// Receives one message and the descriptors sent with it (close-on-exec).
///
/// `Err` means the peer broke the protocol (bad message, truncated descriptors, EOF in
/// the middle of a message) or the socket failed; descriptors received so far are closed.
pub(crate) fn recv(sock: &UnixStream) -> Result<Recv, String> {
    let mut partial = PartialMsg::default();
    loop {
        match partial.read_available(sock)? {
            Progress::Msg(msg, fds) => return Ok(Recv::Msg(msg, fds)),
            Progress::Eof => return Ok(Recv::Eof),
            Progress::Pending if !partial.is_begun() => return Ok(Recv::WouldBlock),
            Progress::Pending => {
                // The rest of a message already begun is in flight; wait for it briefly.
                if !wait_readable(sock.as_fd(), Duration::from_secs(1)) {
                    return Err("message cut short".into());
                }
            }
        }
    }
}

/// A poll timeout.
pub(crate) fn timespec(d: Duration) -> rustix::event::Timespec {
    rustix::event::Timespec {
        tv_sec: d.as_secs().try_into().unwrap_or(i64::MAX),
        tv_nsec: d.subsec_nanos().into(),
    }
}

/// Waits until `fd` is readable or hung up; `false` on timeout.
pub(crate) fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
    use rustix::event::{poll, PollFd, PollFlags};
    let ts = timespec(timeout);
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    loop {
        match poll(&mut fds, Some(&ts)) {
            Ok(n) => return n > 0,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return false,
        }
    }
}

/// Whether the peer of a socket we only write to has closed it (EOF or reset). Anything
/// it sent instead is read and dropped: the backend sends nothing after its welcome, and
/// stray bytes must not make a closed socket look open.
pub(crate) fn peer_closed(sock: &UnixStream) -> bool {
    let mut buf = [0u8; MSG_LEN];
    // Bounded: a peer streaming bytes is not closed, and is not read forever.
    for _ in 0..64 {
        match rustix::net::recv(sock, &mut buf, RecvFlags::DONTWAIT) {
            Ok((0, _)) => return true,
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::AGAIN) => return false,
            Err(_) => return true,
        }
    }
    false
}

/// Sends `bytes` (part of a message) with `fds`, as a peer that splits its message.
#[cfg(test)]
pub(crate) fn send_piece(sock: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    assert!(fds.is_empty() || control.push(SendAncillaryMessage::ScmRights(fds)));
    let sent = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .unwrap();
    assert_eq!(sent, bytes.len());
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn messages_round_trip() {
        for m in [
            Msg::Hello {
                version: VERSION,
                domid: 7,
                nr_frames: 64,
                nr_entries: 1024,
            },
            Msg::Welcome {
                status: -22,
                backend_domid: 0,
            },
            Msg::PortAlloc {
                port: 5,
                remote_domid: 0,
            },
            Msg::PortClose { port: 5 },
        ] {
            assert_eq!(Msg::decode(&m.encode()), Ok(m));
        }
        let mut bad = Msg::PortClose { port: 1 }.encode();
        bad[0] ^= 1;
        assert!(Msg::decode(&bad).is_err());
        let mut bad = Msg::PortClose { port: 1 }.encode();
        bad[4] = 99;
        assert!(Msg::decode(&bad).is_err());
        let mut bad = Msg::PortAlloc {
            port: 1,
            remote_domid: 0,
        }
        .encode();
        bad[14] = 1; // domid 0x10000
        assert!(Msg::decode(&bad).is_err());
    }

    #[test]
    fn fds_travel_with_their_message() {
        let (a, b) = UnixStream::pair().unwrap();
        let (r, w) = rustix::pipe::pipe().unwrap();
        send(&a, Msg::PortClose { port: 3 }, &[r.as_fd(), w.as_fd()]).unwrap();
        send(&a, Msg::PortClose { port: 4 }, &[]).unwrap();
        match recv(&b).unwrap() {
            Recv::Msg(Msg::PortClose { port: 3 }, fds) => {
                assert_eq!(fds.len(), 2);
                assert_ne!(fds[0].as_raw_fd(), r.as_raw_fd());
            }
            other => panic!("{other:?}"),
        }
        match recv(&b).unwrap() {
            Recv::Msg(Msg::PortClose { port: 4 }, fds) => assert!(fds.is_empty()),
            other => panic!("{other:?}"),
        }
        b.set_nonblocking(true).unwrap();
        assert!(matches!(recv(&b).unwrap(), Recv::WouldBlock));
        drop(a);
        assert!(matches!(recv(&b).unwrap(), Recv::Eof));
    }

    #[test]
    fn a_message_in_pieces_is_kept_until_complete() {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let (r, w) = rustix::pipe::pipe().unwrap();
        let bytes = Msg::PortClose { port: 9 }.encode();
        let mut partial = PartialMsg::default();
        assert!(matches!(
            partial.read_available(&b).unwrap(),
            Progress::Pending
        ));
        assert!(!partial.is_begun());
        send_piece(&a, &bytes[..10], &[r.as_fd(), w.as_fd()]);
        assert!(matches!(
            partial.read_available(&b).unwrap(),
            Progress::Pending
        ));
        assert!(partial.is_begun());
        send_piece(&a, &bytes[10..], &[]);
        match partial.read_available(&b).unwrap() {
            Progress::Msg(Msg::PortClose { port: 9 }, fds) => assert_eq!(fds.len(), 2),
            other => panic!("{other:?}"),
        }
        // Ready for the next message.
        assert!(!partial.is_begun());
        drop(a);
        assert!(matches!(partial.read_available(&b).unwrap(), Progress::Eof));
    }

    #[test]
    fn descriptors_are_counted_across_pieces() {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let (r, w) = rustix::pipe::pipe().unwrap();
        let fds = [r.as_fd(), w.as_fd(), r.as_fd()];
        let bytes = Msg::PortClose { port: 9 }.encode();
        let mut partial = PartialMsg::default();
        send_piece(&a, &bytes[..1], &fds);
        assert!(matches!(
            partial.read_available(&b).unwrap(),
            Progress::Pending
        ));
        send_piece(&a, &bytes[1..2], &fds[..1]);
        let err = partial.read_available(&b).unwrap_err();
        assert!(err.contains("4 descriptors"), "{err}");
    }

    #[test]
    fn truncated_message_is_an_error() {
        use std::io::Write;
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(&Msg::PortClose { port: 3 }.encode()[..10])
            .unwrap();
        drop(a);
        assert!(recv(&b).is_err());
    }
}
