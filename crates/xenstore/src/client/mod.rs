//! A blocking, thread-safe xenstore client.
//!
//! [`XsClient`] owns one connection (unix socket or `/dev/xen/xenbus`). A
//! reader thread demultiplexes what the daemon sends: replies are routed by
//! `req_id` to the thread waiting for them, and `XS_WATCH_EVENT`s (which
//! arrive at any time, interleaved with replies) go to a bounded queue read
//! through [`WatchEvents`]. Any number of threads may issue requests at once;
//! each waits only for its own reply.
//!
//! The operations themselves live in the [`XsOps`] trait, implemented both by
//! the client (outside any transaction) and by [`Transaction`], so code that
//! reads and writes the store can be written once and run in either context.

mod events;
mod transport;

pub use events::{WatchEvent, WatchEvents};
pub use transport::{Transport, DEFAULT_SOCKET_PATH, DEFAULT_XENBUS_DEVICE};

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use tracing::{debug, warn};

use crate::error::{Errno, Error, ProtocolError, Result};
use crate::perms::Perm;
use crate::wire::{self, Message, MsgType, ReadError, ABS_PATH_MAX};
use events::WatchQueue;
use transport::{Closer, TransportReader, TransportWriter};

/// Client tuning knobs.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Watch events buffered before new ones are dropped (and counted).
    pub watch_queue_capacity: usize,
    /// How long a request waits for its reply; `None` waits forever, as
    /// Linux's xenbus does. A timed-out request's late reply is discarded.
    pub request_timeout: Option<Duration>,
    /// How many times [`XsClient::transaction`] retries after `EAGAIN`.
    pub transaction_retries: u32,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            watch_queue_capacity: 1024,
            request_timeout: None,
            transaction_retries: 32,
        }
    }
}

/// Waiters for replies, keyed by request id.
#[derive(Debug, Default)]
struct Pending {
    waiters: HashMap<u32, SyncSender<Message>>,
    /// Set once the reader thread has stopped: no reply will ever come.
    dead: bool,
}

#[derive(Debug)]
struct Shared {
    writer: Mutex<TransportWriter>,
    pending: Mutex<Pending>,
    next_req_id: AtomicU32,
    events: Arc<WatchQueue>,
    closing: AtomicBool,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // The map stays consistent across a panic in another thread (single
        // insert/remove calls), so a poisoned lock is still usable.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A connection to a xenstore daemon. `Send + Sync`: share it with `Arc` and
/// call it from as many threads as you like.
#[derive(Debug)]
pub struct XsClient {
    shared: Arc<Shared>,
    closer: Closer,
    reader: Option<JoinHandle<()>>,
    config: ClientConfig,
}

impl XsClient {
    /// Connects to a xenstored unix socket with the default configuration.
    pub fn connect_unix(path: impl AsRef<Path>) -> Result<XsClient> {
        XsClient::new(Transport::connect_unix(path)?, ClientConfig::default())
    }

    /// Opens the xenbus device (normally [`DEFAULT_XENBUS_DEVICE`]).
    pub fn open_xenbus_device(path: impl AsRef<Path>) -> Result<XsClient> {
        XsClient::new(
            Transport::open_xenbus_device(path)?,
            ClientConfig::default(),
        )
    }

    /// Starts a client on an already-open transport.
    pub fn new(transport: Transport, config: ClientConfig) -> Result<XsClient> {
        let (reader, writer, closer) = transport.split()?;
        let shared = Arc::new(Shared {
            writer: Mutex::new(writer),
            pending: Mutex::new(Pending::default()),
            next_req_id: AtomicU32::new(1),
            events: Arc::new(WatchQueue::new(config.watch_queue_capacity)?),
            closing: AtomicBool::new(false),
        });
        let reader = thread::Builder::new()
            .name("xenstore-reader".into())
            .spawn({
                let shared = shared.clone();
                move || reader_loop(&shared, reader)
            })?;
        Ok(XsClient {
            shared,
            closer,
            reader: Some(reader),
            config,
        })
    }

    /// The handle on this connection's watch events. Block on it with
    /// [`WatchEvents::recv_timeout`], or poll its file descriptor.
    pub fn watch_events(&self) -> WatchEvents {
        WatchEvents::new(self.shared.events.clone())
    }

    /// False once the connection has failed or been closed by the daemon.
    pub fn is_connected(&self) -> bool {
        !self.shared.pending().dead
    }

    /// Registers a watch on `path` (and its whole subtree). The daemon fires
    /// it once right away, then on every change. `path` may be relative to
    /// the caller's `/local/domain/<domid>`, or a special `@...` path.
    pub fn watch(&self, path: &str, token: &str) -> Result<()> {
        let payload = args(&[path, token])?;
        self.request(MsgType::Watch, 0, &payload).map(drop)
    }

    /// Removes a watch registered with the same path and token.
    pub fn unwatch(&self, path: &str, token: &str) -> Result<()> {
        let payload = args(&[path, token])?;
        self.request(MsgType::Unwatch, 0, &payload).map(drop)
    }

    /// `XS_GET_DOMAIN_PATH`: the home path of `domid` (`/local/domain/<domid>`).
    pub fn get_domain_path(&self, domid: u32) -> Result<String> {
        let payload = args(&[&domid.to_string()])?;
        let reply = self.request(MsgType::GetDomainPath, 0, &payload)?;
        string_reply(&reply)
    }

    /// `XS_IS_DOMAIN_INTRODUCED`: whether the daemon knows `domid`.
    pub fn is_domain_introduced(&self, domid: u32) -> Result<bool> {
        let payload = args(&[&domid.to_string()])?;
        let reply = self.request(MsgType::IsDomainIntroduced, 0, &payload)?;
        match string_reply(&reply)?.as_str() {
            "T" => Ok(true),
            "F" => Ok(false),
            _ => Err(ProtocolError::Malformed("IS_DOMAIN_INTRODUCED reply").into()),
        }
    }

    /// `XS_INTRODUCE` (toolstack only): tells the daemon about a new domain
    /// whose xenstore ring is at guest frame `mfn`, bound to event channel
    /// `port`. Fires `@introduceDomain`.
    pub fn introduce_domain(&self, domid: u32, mfn: u64, port: u32) -> Result<()> {
        let payload = args(&[&domid.to_string(), &mfn.to_string(), &port.to_string()])?;
        self.request(MsgType::Introduce, 0, &payload).map(drop)
    }

    /// `XS_RELEASE` (toolstack only): the domain is gone. Fires `@releaseDomain`.
    pub fn release_domain(&self, domid: u32) -> Result<()> {
        let payload = args(&[&domid.to_string()])?;
        self.request(MsgType::Release, 0, &payload).map(drop)
    }

    /// Starts a transaction. Prefer [`XsClient::transaction`], which retries
    /// on conflict; a `Transaction` dropped without commit is aborted.
    pub fn transaction_start(&self) -> Result<Transaction<'_>> {
        let reply = self.request(MsgType::TransactionStart, 0, b"\0")?;
        let text = string_reply(&reply)?;
        let id = text
            .parse::<u32>()
            .ok()
            .filter(|&id| id != 0)
            .ok_or(ProtocolError::Malformed("transaction id"))?;
        Ok(Transaction {
            client: self,
            id,
            finished: false,
        })
    }

    /// Runs `f` in a transaction and commits it, retrying the whole thing on
    /// `EAGAIN` (a conflict with another writer) up to
    /// [`ClientConfig::transaction_retries`] times, like Linux's xenbus
    /// drivers do. `f` may run several times, so it must not have side
    /// effects outside the store. If `f` fails, the transaction is aborted and
    /// its error returned.
    pub fn transaction<T, F>(&self, mut f: F) -> Result<T>
    where
        F: FnMut(&Transaction<'_>) -> Result<T>,
    {
        let mut attempt = 0;
        loop {
            let tx = self.transaction_start()?;
            let outcome = match f(&tx) {
                Ok(v) => tx.commit().map(|()| v),
                Err(e) => {
                    // Abort errors are secondary: report what `f` said.
                    let _ = tx.abort();
                    Err(e)
                }
            };
            match outcome {
                Err(e) if e.is_again() && attempt < self.config.transaction_retries => {
                    attempt += 1;
                    debug!(attempt, "xenstore transaction conflict, retrying");
                }
                other => return other,
            }
        }
    }

    /// Sends one request and waits for its reply payload. An `XS_ERROR`
    /// reply becomes `Err(Error::Xs(..))`.
    fn request(&self, ty: MsgType, tx_id: u32, payload: &[u8]) -> Result<Vec<u8>> {
        let (tx, rx) = mpsc::sync_channel(1);
        let req_id = self.register(tx)?;
        let Some(msg) = wire::encode(ty, req_id, tx_id, payload) else {
            self.unregister(req_id);
            return Err(Error::InvalidArgument(
                "request exceeds XENSTORE_PAYLOAD_MAX",
            ));
        };
        let written = {
            let mut w = self.shared.writer.lock().unwrap_or_else(|p| p.into_inner());
            w.write_all(&msg)
        };
        if let Err(e) = written {
            self.unregister(req_id);
            return Err(e.into());
        }
        let reply = match self.config.request_timeout {
            None => rx.recv().map_err(|_| Error::Disconnected)?,
            Some(t) => match rx.recv_timeout(t) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => {
                    self.unregister(req_id);
                    return Err(Error::Timeout);
                }
                Err(RecvTimeoutError::Disconnected) => return Err(Error::Disconnected),
            },
        };
        match MsgType::from_u32(reply.header.ty) {
            Some(t) if t == ty => Ok(reply.payload),
            Some(MsgType::Error) => Err(Errno::from_wire(&reply.payload).into()),
            _ => Err(ProtocolError::UnexpectedReply {
                expected: ty.as_u32(),
                got: reply.header.ty,
            }
            .into()),
        }
    }

    /// Allocates a request id and registers the waiter under it.
    fn register(&self, tx: SyncSender<Message>) -> Result<u32> {
        let mut p = self.shared.pending();
        if p.dead {
            return Err(Error::Disconnected);
        }
        loop {
            let id = self.shared.next_req_id.fetch_add(1, Ordering::Relaxed);
            // 0 is what watch events carry; skip it and any id still waiting
            // after a wrap-around.
            if id != 0 && !p.waiters.contains_key(&id) {
                p.waiters.insert(id, tx);
                return Ok(id);
            }
        }
    }

    fn unregister(&self, req_id: u32) {
        self.shared.pending().waiters.remove(&req_id);
    }
}

impl Drop for XsClient {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Relaxed);
        if self.closer.shutdown() {
            if let Some(h) = self.reader.take() {
                let _ = h.join();
            }
        } else {
            // The xenbus device cannot be shut down under a blocked reader.
            // Send one harmless request: its reply wakes the reader, which
            // sees `closing` and exits. The thread is detached either way.
            if let Some(msg) = wire::encode(MsgType::GetDomainPath, 0, 0, b"0\0") {
                let mut w = self.shared.writer.lock().unwrap_or_else(|p| p.into_inner());
                let _ = w.write_all(&msg);
            }
            self.shared.events.close();
        }
    }
}

/// The reader thread: routes replies and watch events until the stream ends.
fn reader_loop(shared: &Shared, reader: TransportReader) {
    // Buffered: a header and its payload usually arrive in one read(2).
    let mut reader = BufReader::with_capacity(2 * (wire::HEADER_LEN + wire::PAYLOAD_MAX), reader);
    loop {
        let msg = match wire::read_message(&mut reader) {
            Ok(m) => m,
            Err(ReadError::Eof) => {
                debug!("xenstore connection closed by peer");
                break;
            }
            Err(e) => {
                if !shared.closing.load(Ordering::Relaxed) {
                    warn!(error = %e, "xenstore connection failed");
                }
                break;
            }
        };
        if shared.closing.load(Ordering::Relaxed) {
            break;
        }
        if msg.header.ty == MsgType::WatchEvent.as_u32() {
            match parse_watch_event(&msg.payload) {
                Some(ev) => shared.events.push(ev),
                None => warn!(
                    len = msg.payload.len(),
                    "malformed xenstore watch event ignored"
                ),
            }
            continue;
        }
        let waiter = shared.pending().waiters.remove(&msg.header.req_id);
        match waiter {
            // The channel has room for exactly this reply; if the waiter gave
            // up (timeout) the send fails harmlessly.
            Some(w) => {
                let _ = w.try_send(msg);
            }
            None => debug!(
                req_id = msg.header.req_id,
                "xenstore reply with no waiter dropped"
            ),
        }
    }
    let mut p = shared.pending();
    p.dead = true;
    // Dropping the senders wakes every waiter with "disconnected".
    p.waiters.clear();
    drop(p);
    shared.events.close();
}

/// `XS_WATCH_EVENT` payload: `path\0token\0` (later fields, if any, ignored).
fn parse_watch_event(payload: &[u8]) -> Option<WatchEvent> {
    let parts = wire::split_terminated(payload)?;
    match parts.as_slice() {
        [path, token, ..] => Some(WatchEvent {
            path: String::from_utf8_lossy(path).into_owned(),
            token: String::from_utf8_lossy(token).into_owned(),
        }),
        _ => None,
    }
}

/// Validates string arguments and joins them NUL-terminated. An embedded NUL
/// would silently split an argument in two on the wire, so it is refused.
fn args(items: &[&str]) -> Result<Vec<u8>> {
    for s in items {
        if s.as_bytes().contains(&0) {
            return Err(Error::InvalidArgument("embedded NUL"));
        }
        if s.len() > ABS_PATH_MAX {
            return Err(Error::InvalidArgument(
                "argument longer than XENSTORE_ABS_PATH_MAX",
            ));
        }
    }
    let parts: Vec<&[u8]> = items.iter().map(|s| s.as_bytes()).collect();
    Ok(wire::nul_terminated(&parts))
}

/// A reply holding one string, usually NUL-terminated.
fn string_reply(reply: &[u8]) -> Result<String> {
    let body = reply.strip_suffix(&[0]).unwrap_or(reply);
    String::from_utf8(body.to_vec())
        .map_err(|_| ProtocolError::Malformed("non-UTF-8 string").into())
}

/// A reply holding a list of NUL-terminated strings.
fn list_reply(reply: &[u8]) -> Result<Vec<String>> {
    let parts =
        wire::split_terminated(reply).ok_or(ProtocolError::Malformed("unterminated list"))?;
    parts
        .into_iter()
        .map(|p| {
            String::from_utf8(p.to_vec())
                .map_err(|_| ProtocolError::Malformed("non-UTF-8 string").into())
        })
        .collect()
}

/// The store operations, available outside ([`XsClient`]) and inside
/// ([`Transaction`]) a transaction.
pub trait XsOps {
    /// Sends a raw request in this context (the transaction id, if any, is
    /// filled in) and returns the reply payload.
    fn raw_request(&self, ty: MsgType, payload: &[u8]) -> Result<Vec<u8>>;

    /// `XS_READ`: a node's value.
    fn read(&self, path: &str) -> Result<Vec<u8>> {
        self.raw_request(MsgType::Read, &args(&[path])?)
    }

    /// `XS_READ`, `None` if the node does not exist.
    fn read_opt(&self, path: &str) -> Result<Option<Vec<u8>>> {
        match self.read(path) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `XS_READ` of a UTF-8 value.
    fn read_string(&self, path: &str) -> Result<String> {
        String::from_utf8(self.read(path)?).map_err(|_| Error::NotUtf8 { path: path.into() })
    }

    /// True if the node exists (and is readable).
    fn exists(&self, path: &str) -> Result<bool> {
        Ok(self.read_opt(path)?.is_some())
    }

    /// `XS_WRITE`: sets a node's value, creating it and any missing parents.
    fn write(&self, path: &str, value: impl AsRef<[u8]>) -> Result<()>
    where
        Self: Sized,
    {
        let mut payload = args(&[path])?;
        payload.extend_from_slice(value.as_ref());
        self.raw_request(MsgType::Write, &payload).map(drop)
    }

    /// `XS_MKDIR`: creates a node with an empty value (no-op if it exists).
    fn mkdir(&self, path: &str) -> Result<()> {
        self.raw_request(MsgType::Mkdir, &args(&[path])?).map(drop)
    }

    /// `XS_RM`: removes a node and everything below it.
    fn rm(&self, path: &str) -> Result<()> {
        self.raw_request(MsgType::Rm, &args(&[path])?).map(drop)
    }

    /// `XS_DIRECTORY`: the names of a node's children. Falls back to
    /// `XS_DIRECTORY_PART` when the list does not fit one message.
    fn directory(&self, path: &str) -> Result<Vec<String>> {
        match self.raw_request(MsgType::Directory, &args(&[path])?) {
            Ok(reply) => list_reply(&reply),
            Err(Error::Xs(Errno::E2big)) => directory_parts(self, path),
            Err(e) => Err(e),
        }
    }

    /// `XS_GET_PERMS`: owner entry first, then the ACL.
    fn get_perms(&self, path: &str) -> Result<Vec<Perm>> {
        let reply = self.raw_request(MsgType::GetPerms, &args(&[path])?)?;
        let parts =
            wire::split_terminated(&reply).ok_or(ProtocolError::Malformed("unterminated perms"))?;
        parts
            .into_iter()
            .map(|p| Perm::from_wire(p).ok_or(ProtocolError::Malformed("permission entry").into()))
            .collect()
    }

    /// `XS_SET_PERMS`: `perms[0]` is the owner and default access.
    fn set_perms(&self, path: &str, perms: &[Perm]) -> Result<()> {
        if perms.is_empty() {
            return Err(Error::InvalidArgument(
                "at least one permission entry is required",
            ));
        }
        let strings: Vec<String> = perms.iter().map(Perm::to_string).collect();
        let mut items = vec![path];
        items.extend(strings.iter().map(String::as_str));
        self.raw_request(MsgType::SetPerms, &args(&items)?)
            .map(drop)
    }
}

/// Reads a long children list with `XS_DIRECTORY_PART`, restarting (a bounded
/// number of times) if the node changes between two parts.
fn directory_parts<X: XsOps + ?Sized>(xs: &X, path: &str) -> Result<Vec<String>> {
    const RESTARTS: usize = 8;
    'restart: for _ in 0..RESTARTS {
        let mut names = Vec::new();
        let mut offset = 0usize;
        let mut generation: Option<String> = None;
        loop {
            let reply =
                xs.raw_request(MsgType::DirectoryPart, &args(&[path, &offset.to_string()])?)?;
            let mut parts = list_reply(&reply)?.into_iter();
            let gen = parts
                .next()
                .ok_or(ProtocolError::Malformed("directory part"))?;
            match &generation {
                Some(g) if *g != gen => continue 'restart,
                _ => generation = Some(gen),
            }
            let mut progressed = false;
            for name in parts {
                if name.is_empty() {
                    return Ok(names);
                }
                offset += name.len() + 1;
                names.push(name);
                progressed = true;
            }
            if !progressed {
                return Err(ProtocolError::Malformed("directory part made no progress").into());
            }
        }
    }
    Err(Errno::Eagain.into())
}

impl XsOps for XsClient {
    fn raw_request(&self, ty: MsgType, payload: &[u8]) -> Result<Vec<u8>> {
        self.request(ty, 0, payload)
    }
}

/// An open transaction. Operations through it see a consistent snapshot and
/// take effect together at [`commit`](Transaction::commit); dropping it
/// without committing aborts it.
#[derive(Debug)]
pub struct Transaction<'c> {
    client: &'c XsClient,
    id: u32,
    finished: bool,
}

impl Transaction<'_> {
    /// The daemon's transaction id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Commits. `Err` with [`Errno::Eagain`] means another writer changed
    /// something this transaction touched: start over.
    pub fn commit(mut self) -> Result<()> {
        self.end(true)
    }

    /// Discards every change made in the transaction.
    pub fn abort(mut self) -> Result<()> {
        self.end(false)
    }

    fn end(&mut self, commit: bool) -> Result<()> {
        self.finished = true;
        let flag: &[u8] = if commit { b"T\0" } else { b"F\0" };
        self.client
            .request(MsgType::TransactionEnd, self.id, flag)
            .map(drop)
    }
}

impl XsOps for Transaction<'_> {
    fn raw_request(&self, ty: MsgType, payload: &[u8]) -> Result<Vec<u8>> {
        self.client.request(ty, self.id, payload)
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.finished {
            if let Err(e) = self.end(false) {
                debug!(error = %e, tx = self.id, "abort of dropped transaction failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn client_is_send_sync() {
        assert_send_sync::<XsClient>();
        assert_send_sync::<WatchEvents>();
    }

    #[test]
    fn argument_checks() {
        assert!(matches!(args(&["a\0b"]), Err(Error::InvalidArgument(_))));
        assert!(matches!(
            args(&[&"x".repeat(ABS_PATH_MAX + 1)]),
            Err(Error::InvalidArgument(_))
        ));
        assert_eq!(args(&["a", "b"]).unwrap(), b"a\0b\0");
    }

    #[test]
    fn watch_event_parsing() {
        assert_eq!(
            parse_watch_event(b"/a/b\0tok\0"),
            Some(WatchEvent {
                path: "/a/b".into(),
                token: "tok".into()
            })
        );
        assert_eq!(parse_watch_event(b"/a/b\0"), None);
        assert_eq!(parse_watch_event(b"/a/b\0tok"), None);
        assert_eq!(parse_watch_event(b""), None);
    }

    #[test]
    fn reply_parsing() {
        assert_eq!(string_reply(b"12\0").unwrap(), "12");
        assert_eq!(string_reply(b"12").unwrap(), "12");
        assert_eq!(list_reply(b"a\0b\0").unwrap(), vec!["a", "b"]);
        assert_eq!(list_reply(b"").unwrap(), Vec::<String>::new());
        assert!(list_reply(b"a\0b").is_err());
    }
}
