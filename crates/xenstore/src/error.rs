//! Error types: the errno-like strings xenstored sends in `XS_ERROR` replies
//! ([`Errno`]), and everything else that can go wrong talking to a daemon
//! ([`Error`]).
//!
//! xenstored reports failures as the *name* of a POSIX errno ("ENOENT\0"),
//! not its number, "for portability" (xs_wire.h). We keep the name as the
//! primary identity and offer [`Errno::raw_os_error`] for callers that want a
//! Linux errno value.

use std::io;

/// An error reported by the xenstore daemon in an `XS_ERROR` reply.
///
/// The first sixteen variants are the `xsd_errors` table of xs_wire.h, in its
/// order. `EQUOTA` is what oxenstored sends for quota violations; C xenstored
/// sends `ENOSPC`/`E2BIG` instead, so callers must treat all three as "over
/// quota". Anything else a peer sends is kept (bounded) in [`Errno::Other`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Errno {
    /// Invalid argument (bad path, malformed request, unknown message type).
    #[error("EINVAL: invalid argument")]
    Einval,
    /// Permission denied by the node's permissions.
    #[error("EACCES: permission denied")]
    Eacces,
    /// Already exists (e.g. a duplicate watch).
    #[error("EEXIST: already exists")]
    Eexist,
    /// Is a directory.
    #[error("EISDIR: is a directory")]
    Eisdir,
    /// No such node, transaction or watch.
    #[error("ENOENT: no such entry")]
    Enoent,
    /// Out of memory in the daemon.
    #[error("ENOMEM: out of memory")]
    Enomem,
    /// Quota exceeded (C xenstored: transactions, node size).
    #[error("ENOSPC: no space (quota)")]
    Enospc,
    /// I/O error in the daemon.
    #[error("EIO: i/o error")]
    Eio,
    /// Directory not empty.
    #[error("ENOTEMPTY: not empty")]
    Enotempty,
    /// Operation not implemented by the daemon.
    #[error("ENOSYS: not implemented")]
    Enosys,
    /// Read-only.
    #[error("EROFS: read-only")]
    Erofs,
    /// Busy (e.g. a nested transaction).
    #[error("EBUSY: busy")]
    Ebusy,
    /// Transaction conflict: retry the whole transaction.
    #[error("EAGAIN: transaction conflict, retry")]
    Eagain,
    /// Already connected / introduced.
    #[error("EISCONN: already connected")]
    Eisconn,
    /// Too big: reply would exceed the payload limit, or value/watch quota.
    #[error("E2BIG: too big")]
    E2big,
    /// Operation not permitted (e.g. a guest changing a node's owner).
    #[error("EPERM: not permitted")]
    Eperm,
    /// Quota exceeded (oxenstored's spelling).
    #[error("EQUOTA: quota exceeded")]
    Equota,
    /// An error string not in the table above (at most [`Errno::MAX_OTHER_LEN`] bytes kept).
    #[error("unknown xenstore error {0:?}")]
    Other(String),
}

impl Errno {
    /// Longest unknown error string we keep, so a hostile peer cannot make an
    /// error value hold its whole 4 KiB payload.
    pub const MAX_OTHER_LEN: usize = 32;

    const TABLE: [(Errno, &'static str, i32); 17] = [
        (Errno::Einval, "EINVAL", libc::EINVAL),
        (Errno::Eacces, "EACCES", libc::EACCES),
        (Errno::Eexist, "EEXIST", libc::EEXIST),
        (Errno::Eisdir, "EISDIR", libc::EISDIR),
        (Errno::Enoent, "ENOENT", libc::ENOENT),
        (Errno::Enomem, "ENOMEM", libc::ENOMEM),
        (Errno::Enospc, "ENOSPC", libc::ENOSPC),
        (Errno::Eio, "EIO", libc::EIO),
        (Errno::Enotempty, "ENOTEMPTY", libc::ENOTEMPTY),
        (Errno::Enosys, "ENOSYS", libc::ENOSYS),
        (Errno::Erofs, "EROFS", libc::EROFS),
        (Errno::Ebusy, "EBUSY", libc::EBUSY),
        (Errno::Eagain, "EAGAIN", libc::EAGAIN),
        (Errno::Eisconn, "EISCONN", libc::EISCONN),
        (Errno::E2big, "E2BIG", libc::E2BIG),
        (Errno::Eperm, "EPERM", libc::EPERM),
        (Errno::Equota, "EQUOTA", libc::EDQUOT),
    ];

    /// The wire spelling, e.g. `"ENOENT"` (without the NUL terminator).
    pub fn as_str(&self) -> &str {
        match self {
            Errno::Other(s) => s,
            known => Self::TABLE
                .iter()
                .find(|(e, _, _)| e == known)
                .map(|(_, s, _)| *s)
                .unwrap_or("EINVAL"),
        }
    }

    /// Parses an `XS_ERROR` payload: the error name, normally NUL-terminated.
    pub fn from_wire(payload: &[u8]) -> Errno {
        let name = payload.split(|&b| b == 0).next().unwrap_or_default();
        if let Some((e, _, _)) = Self::TABLE.iter().find(|(_, s, _)| s.as_bytes() == name) {
            return e.clone();
        }
        let kept = &name[..name.len().min(Self::MAX_OTHER_LEN)];
        Errno::Other(String::from_utf8_lossy(kept).into_owned())
    }

    /// The Linux errno value, for callers that bridge to C conventions.
    /// `EQUOTA` maps to `EDQUOT`; unknown strings map to `EINVAL`.
    pub fn raw_os_error(&self) -> i32 {
        Self::TABLE
            .iter()
            .find(|(e, _, _)| e == self)
            .map(|(_, _, n)| *n)
            .unwrap_or(libc::EINVAL)
    }

    /// True for the errors a daemon uses to say "over quota".
    pub fn is_quota(&self) -> bool {
        matches!(self, Errno::Equota | Errno::Enospc | Errno::E2big)
    }
}

/// A violation of the wire protocol by the peer, or a message we refuse to send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The header announced more than `XENSTORE_PAYLOAD_MAX` bytes.
    #[error("payload length {0} exceeds XENSTORE_PAYLOAD_MAX")]
    PayloadTooLarge(u32),
    /// The stream ended inside a message.
    #[error("connection closed in the middle of a message")]
    Truncated,
    /// A message type number outside the xs_wire.h enumeration.
    #[error("unknown message type {0}")]
    UnknownType(u32),
    /// A reply whose type is neither the request's nor `XS_ERROR`.
    #[error("reply type {got} does not match request type {expected}")]
    UnexpectedReply {
        /// The request's type number.
        expected: u32,
        /// The reply's type number.
        got: u32,
    },
    /// A payload that does not have the shape its type requires.
    #[error("malformed payload: {0}")]
    Malformed(&'static str),
}

/// Everything a client operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The daemon answered with `XS_ERROR`.
    #[error("xenstore error: {0}")]
    Xs(#[from] Errno),
    /// The transport failed.
    #[error("xenstore i/o error: {0}")]
    Io(#[from] io::Error),
    /// The peer broke the protocol; the connection is no longer usable.
    #[error("xenstore protocol error: {0}")]
    Protocol(#[from] ProtocolError),
    /// The connection is closed (the reader saw EOF or an error).
    #[error("xenstore connection closed")]
    Disconnected,
    /// No reply within the configured request timeout.
    #[error("xenstore request timed out")]
    Timeout,
    /// An argument we refuse to put on the wire (embedded NUL, too long).
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),
    /// A value that was expected to be UTF-8 text is not.
    #[error("value at {path} is not UTF-8")]
    NotUtf8 {
        /// The node whose value was read.
        path: String,
    },
}

impl Error {
    /// The daemon's error, if this is one.
    pub fn errno(&self) -> Option<&Errno> {
        match self {
            Error::Xs(e) => Some(e),
            _ => None,
        }
    }

    /// True if the daemon said the node (or transaction, or watch) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Xs(Errno::Enoent))
    }

    /// True if this is a transaction conflict that a retry may resolve.
    pub fn is_again(&self) -> bool {
        matches!(self, Error::Xs(Errno::Eagain))
    }
}

/// Result alias for client operations.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_round_trip() {
        for (e, s, _) in Errno::TABLE.iter() {
            assert_eq!(e.as_str(), *s);
            let mut wire = s.as_bytes().to_vec();
            wire.push(0);
            assert_eq!(&Errno::from_wire(&wire), e);
            assert_eq!(&Errno::from_wire(s.as_bytes()), e);
        }
    }

    #[test]
    fn unknown_error_is_bounded() {
        let long = vec![b'X'; 4096];
        match Errno::from_wire(&long) {
            Errno::Other(s) => assert_eq!(s.len(), Errno::MAX_OTHER_LEN),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(Errno::from_wire(b"").as_str(), "");
        assert_eq!(
            Errno::from_wire(&[0xff, 0xfe, 0]).raw_os_error(),
            libc::EINVAL
        );
    }

    #[test]
    fn os_errors() {
        assert_eq!(Errno::Enoent.raw_os_error(), libc::ENOENT);
        assert_eq!(Errno::Equota.raw_os_error(), libc::EDQUOT);
        assert!(Errno::Equota.is_quota() && Errno::Enospc.is_quota());
        assert!(!Errno::Eacces.is_quota());
    }
}
