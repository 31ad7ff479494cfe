//! Error types of the xenbus layer.
//!
//! Three families, because the device state machine reacts to each differently:
//! - [`StoreError`]: talking to xenstore failed. Transient for one device (we retry on the
//!   next event), fatal for the daemon only when the connection itself is gone.
//! - [`NegotiationError`]: the frontend (guest-controlled, hence hostile) or the toolstack
//!   wrote something we refuse. Linux's `xenbus_dev_fatal` cases: the device gets an
//!   `error` node and goes to Closing; other devices are untouched.
//! - [`VbdError`]: the engine or the storage could not open, connect or disconnect a VBD.

use std::fmt;

/// A xenstore operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The daemon answered with an error (`"EACCES"`, `"EINVAL"`, ...). `ENOENT` on reads is
    /// not an error at this layer: reads return `None`.
    #[error("xenstore {op} {path}: {errno}")]
    Daemon {
        /// The operation (`read`, `write`, ...).
        op: &'static str,
        /// The path it was applied to.
        path: String,
        /// The daemon's error name.
        errno: String,
    },
    /// A transaction kept conflicting with other writers (EAGAIN) beyond the retry budget.
    #[error("xenstore transaction still conflicting after {0} attempts")]
    Conflict(u32),
    /// The connection to the daemon is gone; nothing more can be done through it.
    #[error("xenstore connection lost: {0}")]
    Disconnected(String),
    /// Any other client-side failure (timeout, protocol error, bad argument).
    #[error("xenstore: {0}")]
    Other(String),
}

impl StoreError {
    /// True if retrying the whole transaction may succeed (xenstored's `EAGAIN`).
    pub fn is_again(&self) -> bool {
        matches!(self, StoreError::Daemon { errno, .. } if errno == "EAGAIN")
    }

    /// True if the node did not exist (only for operations where absence is an error).
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::Daemon { errno, .. } if errno == "ENOENT")
    }

    /// True if the connection is unusable.
    pub fn is_disconnected(&self) -> bool {
        matches!(self, StoreError::Disconnected(_))
    }
}

/// What the other end wrote that we refuse. Every variant maps to a Linux errno for the
/// `error` node ("`<errno> <message>`", as `xenbus_dev_fatal` writes it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiationError {
    /// A node that must exist is missing.
    #[error("reading {path}: missing")]
    Missing {
        /// Absolute path of the node.
        path: String,
    },
    /// A node's value does not parse (or is out of its type's range).
    #[error("reading {path}: invalid value {value:?}")]
    Invalid {
        /// Absolute path of the node.
        path: String,
        /// The offending value, truncated and escaped for logs.
        value: String,
    },
    /// `protocol` names an ABI we do not implement.
    #[error("unknown fe protocol {0}")]
    UnknownProtocol(String),
    /// `multi-queue-num-queues` is 0 or above what we advertised.
    #[error("guest requested {requested} queues, exceeding the maximum of {max}.")]
    BadQueueCount {
        /// What the frontend asked for.
        requested: u64,
        /// `multi-queue-max-queues`.
        max: u32,
    },
    /// `ring-page-order` (or `num-ring-pages`) above what we advertised.
    #[error("requested ring page order {requested} exceed max:{max}")]
    RingOrderTooLarge {
        /// The order the frontend asked for.
        requested: u64,
        /// `max-ring-page-order`.
        max: u32,
    },
    /// `num-ring-pages` is not a power of two.
    #[error("num-ring-pages {0} is not a power of two")]
    RingPagesNotPowerOfTwo(u64),
    /// The frontend is in a state the protocol does not allow here.
    #[error("saw state {0} at frontend")]
    BadFrontendState(String),
    /// Toolstack-written backend configuration we cannot use.
    #[error("backend configuration: {0}")]
    Backend(String),
}

impl NegotiationError {
    /// The (positive) Linux errno written in front of the message in the `error` node,
    /// chosen as blkback chooses it.
    pub fn errno(&self) -> i32 {
        match self {
            // blkback: connect_ring returns -ENOSYS for an unknown protocol and bad queue
            // counts, -EINVAL for the rest.
            NegotiationError::UnknownProtocol(_) | NegotiationError::BadQueueCount { .. } => 38,
            NegotiationError::Missing { .. } => 2,
            _ => 22,
        }
    }
}

/// The engine or the storage failed to open, connect or disconnect a VBD.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{context}: {message}")]
pub struct VbdError {
    /// What was being done ("opening /var/img.raw", "mapping ring-ref 8 port 5").
    pub context: String,
    /// Why it failed.
    pub message: String,
    /// Linux errno for the `error` node.
    pub errno: i32,
    /// The platform does not know the frontend's domain (yet): see
    /// [`VbdError::domain_unreachable`].
    pub unreachable: bool,
}

impl VbdError {
    /// A VBD error with an explicit errno.
    pub fn new(context: impl Into<String>, message: impl fmt::Display, errno: i32) -> VbdError {
        VbdError {
            context: context.into(),
            message: message.to_string(),
            errno,
            unreachable: false,
        }
    }

    /// Marks the error as the platform not knowing the frontend's domain (yet).
    pub fn with_domain_unreachable(mut self) -> VbdError {
        self.unreachable = true;
        self
    }

    /// The frontend's domain is not reachable: it does not exist (yet) for the platform
    /// (in the simulator, a guest not yet attached to this daemon). An adoption waits for
    /// it instead of failing the device; an ordinary connect fails as before.
    pub fn domain_unreachable(&self) -> bool {
        self.unreachable
    }

    /// A VBD error from an I/O error (errno taken from it, EIO otherwise).
    pub fn io(context: impl Into<String>, err: &std::io::Error) -> VbdError {
        VbdError::new(context, err, err.raw_os_error().unwrap_or(5))
    }
}

/// Anything that can stop one device from making progress.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// xenstore failed; retried on the next event.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The other end wrote something we refuse: fatal for this device.
    #[error(transparent)]
    Negotiation(#[from] NegotiationError),
    /// The engine or the storage failed: fatal for this device.
    #[error(transparent)]
    Vbd(#[from] VbdError),
}

impl DeviceError {
    /// The errno and message for the `error` node, `None` for transient store errors.
    pub fn fatal_report(&self) -> Option<(i32, String)> {
        match self {
            DeviceError::Store(_) => None,
            DeviceError::Negotiation(e) => Some((e.errno(), e.to_string())),
            DeviceError::Vbd(e) => Some((e.errno, e.to_string())),
        }
    }
}

/// Errors of the configuration file and flags.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TOML did not parse or has unknown keys.
    #[error("parsing {path}: {message}")]
    Parse {
        /// The file (or `<string>`).
        path: String,
        /// The parser's message.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid setting {key}: {message}")]
    Invalid {
        /// The key (`max_ring_page_order`, `device[2].vdev`, ...).
        key: String,
        /// Why it is refused.
        message: String,
    },
}

/// Errors of the daemon-level operations of this crate (start-up, attach, detach).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A xenstore operation failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A device name or argument is invalid.
    #[error("{0}")]
    InvalidArgument(String),
    /// The device already exists in xenstore.
    #[error("device {0} already exists")]
    DeviceExists(String),
    /// The device does not exist in xenstore.
    #[error("device {0} not found")]
    DeviceNotFound(String),
    /// Waiting for a xenstore state timed out.
    #[error("timed out after {timeout_ms} ms waiting for {what}")]
    Timeout {
        /// What we waited for.
        what: String,
        /// How long.
        timeout_ms: u64,
    },
}

/// Result alias of this crate's daemon-level operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Escapes and truncates a guest-written value for logs and error nodes, so a hostile
/// frontend can neither flood the log nor inject control characters into it.
pub(crate) fn sanitize(value: &[u8]) -> String {
    const MAX: usize = 64;
    let mut s: String = value
        .iter()
        .take(MAX)
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect();
    if value.len() > MAX {
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_bounds_and_escapes() {
        assert_eq!(sanitize(b"abc"), "abc");
        assert_eq!(sanitize(b"a\nb\0"), "a\\nb\\x00");
        let long = vec![b'x'; 1000];
        assert_eq!(sanitize(&long).len(), 64 + 3);
    }

    #[test]
    fn errnos_follow_blkback() {
        assert_eq!(NegotiationError::UnknownProtocol("x".into()).errno(), 38);
        assert_eq!(
            NegotiationError::BadQueueCount {
                requested: 0,
                max: 4
            }
            .errno(),
            38
        );
        assert_eq!(
            NegotiationError::RingOrderTooLarge {
                requested: 9,
                max: 4
            }
            .errno(),
            22
        );
        assert!(StoreError::Daemon {
            op: "x",
            path: "/".into(),
            errno: "EAGAIN".into()
        }
        .is_again());
    }
}
