//! An in-memory xenstore daemon speaking the xs_wire.h protocol over unix
//! sockets, for the simulator and tests.
//!
//! Connections are identified by domain: [`XenstoreServer::listen_as`] opens
//! one listening socket per domain, and whoever connects to it *is* that
//! domain (a simulated guest in another process connects to "its" socket).
//! Domain 0 is privileged and bypasses permissions and quotas.
//!
//! Semantics follow C xenstored / oxenstored:
//! - permissions: owner + ACL ([`crate::perms`]); new nodes inherit the
//!   nearest existing ancestor's permissions, an unprivileged creator becomes
//!   the owner; writing creates missing parents; a missing node under an
//!   unreadable ancestor reads as `EACCES`, not `ENOENT`;
//! - watches fire on the node and its subtree, once right after registration,
//!   relative paths are reported relative; `@introduceDomain` and
//!   `@releaseDomain` fire from [`XenstoreServer::introduce_domain`] /
//!   [`XenstoreServer::release_domain`] (and `XS_INTRODUCE` / `XS_RELEASE`);
//! - transactions detect conflicts by generation (see `store`); a connection
//!   that goes away loses its transactions and watches;
//! - quotas for unprivileged domains: nodes owned per domain (`EQUOTA`, the
//!   oxenstored spelling), value size (`E2BIG`), watches per connection
//!   (`E2BIG`, as C xenstored), transactions per connection (`ENOSPC`, as C
//!   xenstored), connections per domain (refused);
//! - each connection's watch-event queue is bounded for every domain, dom0
//!   included; overflow drops and counts ([`ConnectionStats::dropped_events`]);
//! - a malformed frame (length over 4096, truncated) closes the connection;
//!   a malformed request in a good frame gets `EINVAL`.
//!
//! Threads: an accept thread per listening socket, a reader and a writer
//! thread per connection, and one mutex over the whole state. Nothing blocks
//! while holding that mutex (see `conn` for why).

mod conn;
mod path;
mod state;
mod store;
mod watch;

use std::io::{self, BufReader};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};

use tracing::{debug, warn};

use crate::perms::Perm;
use crate::wire::{self, ReadError};

use conn::{Conn, MAX_PENDING_REPLIES};
use state::{encode_reply, State};
use store::Limits;

/// Special watch path fired when a domain is introduced.
pub const INTRODUCE_DOMAIN: &str = "@introduceDomain";
/// Special watch path fired when a domain is released.
pub const RELEASE_DOMAIN: &str = "@releaseDomain";

/// Server limits. The defaults are C xenstored's defaults where it has one.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Nodes an unprivileged domain may own (xenstored `-E`, default 1000).
    pub max_nodes_per_domain: usize,
    /// Largest value an unprivileged domain may write (xenstored `-S`, 2048).
    pub max_value_size: usize,
    /// Watches per unprivileged connection (xenstored `-W`, 128).
    pub max_watches_per_connection: usize,
    /// Open transactions per unprivileged connection (xenstored `-t`, 10).
    pub max_transactions_per_connection: usize,
    /// Watch events queued per connection before dropping (any domain).
    pub max_queued_watch_events: usize,
    /// Concurrent connections per unprivileged domain.
    pub max_connections_per_domain: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_nodes_per_domain: 1000,
            max_value_size: 2048,
            max_watches_per_connection: 128,
            max_transactions_per_connection: 10,
            max_queued_watch_events: 1024,
            max_connections_per_domain: 64,
        }
    }
}

impl ServerConfig {
    fn limits(&self) -> Limits {
        Limits {
            max_nodes_per_domain: self.max_nodes_per_domain,
            max_value_size: self.max_value_size,
        }
    }
}

/// A snapshot of one connection's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionStats {
    /// Server-assigned connection id.
    pub conn_id: u64,
    /// The domain the connection speaks for.
    pub domid: u32,
    /// Registered watches.
    pub watches: usize,
    /// Open transactions.
    pub transactions: usize,
    /// Watch events waiting to be written.
    pub queued_events: usize,
    /// Watch events dropped because the queue was full.
    pub dropped_events: u64,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    config: ServerConfig,
    next_conn_id: AtomicU64,
    shutting_down: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // Request handling validates before it mutates, so a panic (a bug)
        // in one handler leaves the tree consistent; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn track(&self, handle: JoinHandle<()>) {
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        threads.retain(|h| !h.is_finished());
        threads.push(handle);
    }
}

#[derive(Debug)]
struct Listener {
    path: PathBuf,
    thread: Option<JoinHandle<()>>,
}

/// The in-memory xenstore server. Dropping it shuts it down.
#[derive(Debug)]
pub struct XenstoreServer {
    shared: Arc<Shared>,
    listeners: Mutex<Vec<Listener>>,
}

impl Default for XenstoreServer {
    fn default() -> Self {
        XenstoreServer::new(ServerConfig::default())
    }
}

impl XenstoreServer {
    /// A server holding only the root node `/` (owner dom0, `n0`).
    pub fn new(config: ServerConfig) -> XenstoreServer {
        XenstoreServer {
            shared: Arc::new(Shared {
                state: Mutex::new(State::new()),
                config,
                next_conn_id: AtomicU64::new(1),
                shutting_down: AtomicBool::new(false),
                threads: Mutex::new(Vec::new()),
            }),
            listeners: Mutex::new(Vec::new()),
        }
    }

    /// Listens on a new unix socket at `path`; every connection accepted
    /// there speaks as domain `domid` (0 = privileged). The socket file is
    /// removed at shutdown.
    pub fn listen_as(&self, domid: u32, path: impl AsRef<Path>) -> io::Result<()> {
        let path = path.as_ref().to_path_buf();
        let listener = UnixListener::bind(&path)?;
        let shared = self.shared.clone();
        let thread = thread::Builder::new()
            .name(format!("xs-accept-{domid}"))
            .spawn(move || accept_loop(&shared, domid, listener))?;
        debug!(domid, path = %path.display(), "xenstore server listening");
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Listener {
                path,
                thread: Some(thread),
            });
        Ok(())
    }

    /// Opens an in-process connection speaking as `domid`, without a socket
    /// file. Hand the returned stream to [`crate::Transport::Unix`].
    pub fn connect_as(&self, domid: u32) -> io::Result<UnixStream> {
        let (ours, theirs) = UnixStream::pair()?;
        spawn_connection(&self.shared, domid, ours)?;
        Ok(theirs)
    }

    /// Marks a domain introduced and fires `@introduceDomain` (once).
    pub fn introduce_domain(&self, domid: u32) {
        let mut st = self.shared.state();
        let changes = st.introduce(domid);
        st.fire(&changes);
    }

    /// Marks a domain gone: closes its connections, drops their watches and
    /// transactions, and fires `@releaseDomain`. Its listening sockets stay,
    /// so a later domain with the same id can connect again. Its nodes stay
    /// too: removing `/local/domain/<domid>` is the toolstack's job.
    pub fn release_domain(&self, domid: u32) {
        let mut st = self.shared.state();
        let changes = st.release(domid);
        st.fire(&changes);
    }

    /// Whether `domid` is currently introduced.
    pub fn is_domain_introduced(&self, domid: u32) -> bool {
        self.shared.state().introduced.contains(&domid)
    }

    /// Counters of every live connection, ordered by connection id.
    pub fn connection_stats(&self) -> Vec<ConnectionStats> {
        let st = self.shared.state();
        let mut v: Vec<ConnectionStats> = st
            .conns
            .values()
            .map(|c| ConnectionStats {
                conn_id: c.id,
                domid: c.domid,
                watches: st.watches.count_for(c.id),
                transactions: st.txs.values().filter(|t| t.conn_id == c.id).count(),
                queued_events: c.queued_events(),
                dropped_events: c.dropped_events(),
            })
            .collect();
        v.sort_by_key(|s| s.conn_id);
        v
    }

    /// Number of nodes in the committed tree, root included.
    pub fn node_count(&self) -> usize {
        self.shared.state().nodes.len()
    }

    /// A node's value, bypassing permissions (for assertions and tooling).
    pub fn read(&self, path: &str) -> Option<Vec<u8>> {
        self.shared
            .state()
            .nodes
            .peek(path)
            .map(|n| n.value.clone())
    }

    /// A node's permissions, bypassing permissions.
    pub fn perms(&self, path: &str) -> Option<Vec<Perm>> {
        self.shared
            .state()
            .nodes
            .peek(path)
            .map(|n| n.perms.clone())
    }

    /// Stops accepting, closes every connection, removes the socket files
    /// and joins the server's threads. Idempotent.
    pub fn shutdown(&self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        let listeners: Vec<Listener> =
            std::mem::take(&mut *self.listeners.lock().unwrap_or_else(|p| p.into_inner()));
        for mut l in listeners {
            // Wake the blocked accept(); it sees the flag and exits.
            let woke = UnixStream::connect(&l.path).is_ok();
            if let Some(t) = l.thread.take() {
                if woke {
                    let _ = t.join();
                }
            }
            let _ = std::fs::remove_file(&l.path);
        }
        let conns: Vec<Arc<Conn>> = self.shared.state().conns.values().cloned().collect();
        for c in conns {
            c.close();
        }
        let threads = std::mem::take(
            &mut *self
                .shared
                .threads
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for XenstoreServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(shared: &Arc<Shared>, domid: u32, listener: UnixListener) {
    for stream in listener.incoming() {
        if shared.shutting_down.load(Ordering::SeqCst) {
            break;
        }
        match stream {
            Ok(s) => {
                if let Err(e) = spawn_connection(shared, domid, s) {
                    warn!(domid, error = %e, "could not start xenstore connection");
                }
            }
            Err(e) => {
                warn!(domid, error = %e, "xenstore accept failed");
                // Persistent failures (EMFILE) would otherwise spin this loop.
                thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
    debug!(domid, "xenstore accept loop stopped");
}

/// Registers a connection and starts its reader and writer threads.
fn spawn_connection(shared: &Arc<Shared>, domid: u32, stream: UnixStream) -> io::Result<()> {
    let privileged = domid == 0;
    let id = shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let conn = Arc::new(Conn::new(
        id,
        domid,
        privileged,
        stream.try_clone()?,
        shared.config.max_queued_watch_events,
    ));
    let writer_stream = stream.try_clone()?;
    {
        let mut st = shared.state();
        if shared.shutting_down.load(Ordering::SeqCst) {
            return Ok(());
        }
        let open = st.conns.values().filter(|c| c.domid == domid).count();
        if !privileged && open >= shared.config.max_connections_per_domain {
            warn!(
                domid,
                open, "too many xenstore connections for domain, refusing"
            );
            return Ok(());
        }
        st.conns.insert(id, conn.clone());
    }
    debug!(conn = id, domid, "xenstore connection opened");
    let spawned = thread::Builder::new().name(format!("xs-w-{id}")).spawn({
        let conn = conn.clone();
        move || conn.writer_loop(writer_stream)
    });
    let spawned = spawned.and_then(|w| {
        shared.track(w);
        thread::Builder::new().name(format!("xs-r-{id}")).spawn({
            let shared = shared.clone();
            let conn = conn.clone();
            move || reader_loop(&shared, &conn, stream)
        })
    });
    match spawned {
        Ok(r) => {
            shared.track(r);
            Ok(())
        }
        Err(e) => {
            shared.state().remove_conn(id);
            conn.close();
            Err(e)
        }
    }
}

/// The reader thread: one request at a time, until EOF, a framing error, or
/// the connection is closed from elsewhere.
fn reader_loop(shared: &Shared, conn: &Arc<Conn>, stream: UnixStream) {
    let limits = shared.config.limits();
    // Buffered: a header and its payload usually arrive in one read(2).
    let mut input = BufReader::with_capacity(2 * (wire::HEADER_LEN + wire::PAYLOAD_MAX), stream);
    loop {
        let msg = match wire::read_message(&mut input) {
            Ok(m) => m,
            Err(ReadError::Eof) => break,
            Err(ReadError::Protocol(e)) => {
                warn!(conn = conn.id, domid = conn.domid, error = %e, "protocol violation, closing connection");
                break;
            }
            Err(ReadError::Io(e)) => {
                debug!(conn = conn.id, error = %e, "xenstore read failed");
                break;
            }
        };
        if !conn.wait_reply_room(MAX_PENDING_REPLIES) {
            break;
        }
        let mut st = shared.state();
        if conn.is_closed() {
            break;
        }
        let result = st.handle(conn, limits, &shared.config, &msg);
        // The reply is ordered before the events this request fires (the
        // initial event of a watch must follow its acknowledgement).
        let direct = conn.reply_or_claim(encode_reply(&msg.header, &result));
        if let Ok(outcome) = result {
            st.fire(&outcome.changes);
            if let Some((path, token)) = outcome.initial_fire {
                if let Some(w) = st.watches.find(conn.id, &path, &token) {
                    w.deliver(&path);
                }
            }
        }
        drop(st);
        if let Some(reply) = direct {
            conn.write_claimed(input.get_ref(), &reply);
        }
    }
    // Whatever ended the loop, the connection and everything it owned go:
    // open transactions are discarded, watches removed.
    let mut st = shared.state();
    st.remove_conn(conn.id);
    drop(st);
    conn.close();
}
