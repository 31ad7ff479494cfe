//! The NBD backend: an export of a Network Block Device server (qemu-nbd, nbdkit,
//! nbd-server...) as a storage.
//!
//! Our own client, not libnbd or the `nbd` crate: the handshake is a few blocking
//! exchanges ([`handshake`], at open and on reconnect, never on a reactor), and the
//! transmission phase runs on the queue's own io_uring ([`conn`]), with write payloads sent
//! and read data received straight from and into the guest's pages, completions signalled
//! by the ring's own descriptor, no thread and no allocation per request.
//! libnbd would bring its own state machine and poll loop per handle and copy nothing
//! less; the `nbd` crate is a synchronous client. Neither reconnects.
//!
//! What the export offers decides what the guest is offered: read-only from
//! `NBD_FLAG_READ_ONLY` (or the toolstack), flush from `NBD_FLAG_SEND_FLUSH`, discard from
//! `NBD_FLAG_SEND_TRIM` or, failing it, `NBD_FLAG_SEND_WRITE_ZEROES` (zeroing is a valid
//! discard), FUA writes as `NBD_CMD_FLAG_FUA` or else write + flush, block sizes from
//! `NBD_INFO_BLOCK_SIZE`. Secure discard is never offered.
//!
//! Queues: when the server advertises `NBD_FLAG_CAN_MULTI_CONN` every queue (ring) has a
//! connection of its own. Otherwise the protocol asks clients not to spread one export
//! over several connections (flush would not cover the other connections' writes), and
//! qemu-nbd serves one client at a time by default: the queues then share one
//! connection ([`shared`]).
//!
//! Size: NBD has no resize notification. [`NbdStorage::refresh_size`] returns the size
//! known now and, at most every [`SIZE_PROBE_INTERVAL`], asks the server again on a short
//! connection of its own (`NBD_OPT_INFO`) in the background, so a reactor never waits on
//! the network; a reconnect also brings the current size.

mod conn;
pub mod handshake;
pub mod proto;
mod shared;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod uri;

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::{Storage, StorageError, StorageInfo, StorageKind, StorageQueue, MAX_QUEUE_DEPTH};
use conn::{ConnTarget, NbdQueue};
use handshake::{HandshakeError, Negotiated};
pub use uri::{is_nbd_uri, NbdAddress, NbdUri, UriError};

/// Default bound of one connect + handshake.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time an operation may wait for a lost connection to come back.
pub const DEFAULT_RECONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Least time between two background size probes.
pub const SIZE_PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// Largest read/write command when the server names no maximum (the protocol's advice).
const DEFAULT_MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// How to open an NBD export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdConfig {
    /// Serve it read-only even if the server allows writes.
    pub read_only: bool,
    /// Bound of one connect + handshake attempt.
    pub connect_timeout: Duration,
    /// How long an operation may wait for a lost connection to come back before it fails
    /// with EIO.
    pub reconnect_timeout: Duration,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            read_only: false,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            reconnect_timeout: DEFAULT_RECONNECT_TIMEOUT,
        }
    }
}

/// Opening an NBD export failed.
#[derive(Debug, thiserror::Error)]
pub enum NbdOpenError {
    #[error("{0}")]
    Uri(#[from] UriError),
    #[error("{uri}: {source}")]
    Handshake {
        uri: String,
        #[source]
        source: HandshakeError,
    },
    #[error("{uri}: {reason}")]
    Unusable { uri: String, reason: String },
}

/// State of the background size probe.
struct SizeProbe {
    running: AtomicBool,
    last: Mutex<Option<Instant>>,
}

/// An NBD export.
pub struct NbdStorage {
    uri: Arc<NbdUri>,
    config: NbdConfig,
    info: StorageInfo,
    size: Arc<AtomicU64>,
    flags: u16,
    max_payload: u32,
    max_discard: u64,
    /// The connection opened to probe the export, kept for the first queue.
    spare: Mutex<Option<(OwnedFd, Negotiated)>>,
    /// The connection the queues share when the server does not allow several.
    shared: Mutex<Weak<shared::Shared>>,
    probe: Arc<SizeProbe>,
}

impl std::fmt::Debug for NbdStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdStorage")
            .field("uri", &self.uri.to_string())
            .field("info", &self.info)
            .field("flags", &self.flags)
            .finish()
    }
}

impl NbdStorage {
    /// Parses `uri`, connects and negotiates.
    pub fn open(uri: &str, config: NbdConfig) -> Result<NbdStorage, NbdOpenError> {
        let parsed = NbdUri::parse(uri)?;
        let shown = parsed.to_string();
        let (socket, negotiated) =
            handshake::open(&parsed.address, &parsed.export, config.connect_timeout).map_err(
                |source| NbdOpenError::Handshake {
                    uri: shown.clone(),
                    source,
                },
            )?;
        let unusable = |reason: String| NbdOpenError::Unusable {
            uri: shown.clone(),
            reason,
        };
        let (min, preferred, max) = match negotiated.block {
            Some(b) => (b.minimum, b.preferred, Some(b.maximum)),
            None => (1, 4096, None),
        };
        // The guest addresses 512-byte sectors; a larger minimum becomes the logical
        // block size (`sector-size`).
        let lbs = min.max(512);
        if lbs > 65536 {
            return Err(unusable(format!("minimum block size {min} above 64 KiB")));
        }
        let pbs = preferred.clamp(lbs, 65536);
        let round = |v: u64| v - v % u64::from(lbs);
        // At most DEFAULT_MAX_PAYLOAD, a u32.
        #[allow(clippy::cast_possible_truncation)]
        let max_payload = round(u64::from(
            max.unwrap_or(DEFAULT_MAX_PAYLOAD).min(DEFAULT_MAX_PAYLOAD),
        )) as u32;
        if max_payload < lbs {
            return Err(unusable(format!("maximum block size {max:?} below {lbs}")));
        }
        let max_discard = round(max.map_or(conn::DISCARD_CHUNK, |m| {
            u64::from(m).min(conn::DISCARD_CHUNK)
        }));
        let f = |flag| negotiated.has(flag);
        let read_only = config.read_only || f(proto::TFLAG_READ_ONLY);
        let discard =
            !read_only && (f(proto::TFLAG_SEND_TRIM) || f(proto::TFLAG_SEND_WRITE_ZEROES));
        let size = round(negotiated.size);
        let info = StorageInfo {
            size_bytes: size,
            logical_block_size: lbs,
            physical_block_size: pbs,
            buffer_alignment: 1,
            read_only,
            flush: !read_only && f(proto::TFLAG_SEND_FLUSH),
            discard,
            secure_discard: false,
            discard_granularity: if discard { lbs } else { 0 },
            discard_alignment: 0,
            direct_io: false,
            kind: StorageKind::Nbd,
        };
        tracing::info!(uri = %shown, size, lbs, flags = format_args!("{:#x}", negotiated.flags),
            multi_conn = f(proto::TFLAG_CAN_MULTI_CONN), flush = info.flush, discard,
            read_only, "NBD export opened");
        Ok(NbdStorage {
            uri: Arc::new(parsed),
            config,
            info,
            size: Arc::new(AtomicU64::new(size)),
            flags: negotiated.flags,
            max_payload,
            max_discard,
            spare: Mutex::new(Some((socket, negotiated))),
            shared: Mutex::new(Weak::new()),
            probe: Arc::new(SizeProbe {
                running: AtomicBool::new(false),
                last: Mutex::new(None),
            }),
        })
    }

    /// The export's URI.
    pub fn uri(&self) -> &NbdUri {
        &self.uri
    }

    /// Whether each queue gets its own connection (`NBD_FLAG_CAN_MULTI_CONN`).
    pub fn multi_conn(&self) -> bool {
        self.flags & proto::TFLAG_CAN_MULTI_CONN != 0
    }

    fn target(&self) -> ConnTarget {
        ConnTarget {
            uri: Arc::clone(&self.uri),
            info: self.info,
            size: Arc::clone(&self.size),
            max_payload: self.max_payload,
            max_discard: self.max_discard,
            connect_timeout: self.config.connect_timeout,
            reconnect_timeout: self.config.reconnect_timeout,
        }
    }

    /// A connection for a new queue: the spare one from open, else a fresh one.
    fn connection(&self) -> Result<(OwnedFd, u16), StorageError> {
        if let Some((fd, n)) = self.spare.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Ok((fd, n.flags));
        }
        let (fd, n) = handshake::open(
            &self.uri.address,
            &self.uri.export,
            self.config.connect_timeout,
        )
        .map_err(|e| StorageError::Nbd(format!("{}: {e}", self.uri)))?;
        if n.size != self.size.load(Ordering::Acquire) {
            tracing::info!(uri = %self.uri, size = n.size, "export size changed");
        }
        Ok((fd, n.flags))
    }

    fn open_exclusive(&self, depth: u32) -> Result<NbdQueue, StorageError> {
        let (fd, flags) = self.connection()?;
        NbdQueue::new(self.target(), fd, flags, depth)
    }
}

impl Storage for NbdStorage {
    fn info(&self) -> StorageInfo {
        StorageInfo {
            size_bytes: self.size.load(Ordering::Acquire),
            ..self.info
        }
    }

    fn refresh_size(&self) -> io::Result<u64> {
        let due = {
            let mut last = self.probe.last.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.is_none_or(|t| t.elapsed() >= SIZE_PROBE_INTERVAL);
            if due && !self.probe.running.swap(true, Ordering::AcqRel) {
                *last = Some(Instant::now());
                true
            } else {
                false
            }
        };
        if due {
            let uri = Arc::clone(&self.uri);
            let size = Arc::clone(&self.size);
            let probe = Arc::clone(&self.probe);
            let lbs = u64::from(self.info.logical_block_size);
            let timeout = self.config.connect_timeout;
            let spawned = std::thread::Builder::new()
                .name("nbd-size-probe".into())
                .spawn(move || {
                    match handshake::probe(&uri.address, &uri.export, timeout) {
                        Ok(n) => {
                            let new = n.size - n.size % lbs;
                            let old = size.swap(new, Ordering::AcqRel);
                            if old != new {
                                tracing::info!(uri = %uri, old, new, "NBD export size changed");
                            }
                        }
                        Err(e) => tracing::debug!(uri = %uri, error = %e, "NBD size probe failed"),
                    }
                    probe.running.store(false, Ordering::Release);
                });
            if let Err(e) = spawned {
                self.probe.running.store(false, Ordering::Release);
                return Err(e);
            }
        }
        Ok(self.size.load(Ordering::Acquire))
    }

    fn open_queue(&self, depth: u32) -> Result<Box<dyn StorageQueue>, StorageError> {
        if depth == 0 || depth > MAX_QUEUE_DEPTH {
            return Err(StorageError::InvalidDepth {
                depth,
                max: MAX_QUEUE_DEPTH,
            });
        }
        if self.multi_conn() {
            return Ok(Box::new(self.open_exclusive(depth)?));
        }
        let mut weak = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(shared) = weak.upgrade() {
            if let Some(queue) = shared::SharedQueue::new(shared, depth)? {
                return Ok(Box::new(queue));
            }
        }
        // Room for several rings' worth; a full queue is retried by the engine.
        let driver_depth = depth.saturating_mul(4).min(MAX_QUEUE_DEPTH);
        let shared = shared::Shared::start(self.open_exclusive(driver_depth)?)?;
        *weak = Arc::downgrade(&shared);
        let queue = shared::SharedQueue::new(shared, depth)?
            .ok_or_else(|| StorageError::Nbd("shared connection closed while opening".into()))?;
        Ok(Box::new(queue))
    }
}
