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
mod store;
mod watch;

use std::collections::{BTreeSet, HashMap};
use std::io::{self, BufReader};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};

use tracing::{debug, info, warn};

use crate::error::Errno;
use crate::perms::{Access, Perm};
use crate::wire::{self, Header, Message, MsgType, ReadError};

use conn::{Conn, MAX_PENDING_REPLIES};
use path::{canonicalize, domain_path};
use store::{Caller, Change, Limits, Nodes, Tx, TxView, View};
use watch::{Watch, Watches};

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

/// Everything behind the server's one lock.
#[derive(Debug)]
struct State {
    nodes: Nodes,
    txs: HashMap<u32, Tx>,
    next_tx_id: u32,
    watches: Watches,
    conns: HashMap<u64, Arc<Conn>>,
    introduced: BTreeSet<u32>,
}

/// The reply to one request, and what to do after queuing it.
#[derive(Debug, Default)]
struct Outcome {
    payload: Vec<u8>,
    changes: Vec<Change>,
    /// `XS_WATCH` fires once right after its acknowledgement.
    initial_fire: Option<(String, String)>,
}

impl Outcome {
    fn ok() -> Outcome {
        Outcome {
            payload: b"OK\0".to_vec(),
            ..Outcome::default()
        }
    }

    fn data(payload: Vec<u8>) -> Outcome {
        Outcome {
            payload,
            ..Outcome::default()
        }
    }

    fn ok_with(changes: impl IntoIterator<Item = Change>) -> Outcome {
        Outcome {
            changes: changes.into_iter().collect(),
            ..Outcome::ok()
        }
    }
}

fn parse_u32(arg: &[u8]) -> Result<u32, Errno> {
    std::str::from_utf8(arg)
        .ok()
        .filter(|s| !s.is_empty() && s.len() <= 10 && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse().ok())
        .ok_or(Errno::Einval)
}

fn one_arg(payload: &[u8]) -> Result<&[u8], Errno> {
    Ok(wire::split_exact(payload, 1).ok_or(Errno::Einval)?[0])
}

fn special_change(path: &str) -> Change {
    Change {
        path: path.to_owned(),
        recursive: false,
        // Only privileged connections may see domain lifecycle events.
        perms: vec![Perm::new(0, Access::None)],
    }
}

impl State {
    fn new() -> State {
        State {
            nodes: Nodes::new(),
            txs: HashMap::new(),
            next_tx_id: 1,
            watches: Watches::default(),
            conns: HashMap::new(),
            // Dom0 exists from the start, as with a real xenstored.
            introduced: BTreeSet::from([0]),
        }
    }

    fn fire(&self, changes: &[Change]) {
        for c in changes {
            self.watches.fire(c);
        }
    }

    /// Forgets a connection: its watches, transactions and registration.
    fn remove_conn(&mut self, conn_id: u64) {
        self.watches.remove_conn(conn_id);
        self.txs.retain(|_, tx| tx.conn_id != conn_id);
        self.conns.remove(&conn_id);
    }

    fn introduce(&mut self, domid: u32) -> Vec<Change> {
        if self.introduced.insert(domid) {
            vec![special_change(INTRODUCE_DOMAIN)]
        } else {
            Vec::new()
        }
    }

    /// Closes the domain's connections and drops their watches and
    /// transactions; fires `@releaseDomain` if the domain was known.
    fn release(&mut self, domid: u32) -> Vec<Change> {
        let doomed: Vec<Arc<Conn>> = self
            .conns
            .values()
            .filter(|c| c.domid == domid)
            .cloned()
            .collect();
        for c in &doomed {
            self.remove_conn(c.id);
            c.close();
        }
        if self.introduced.remove(&domid) || !doomed.is_empty() {
            vec![special_change(RELEASE_DOMAIN)]
        } else {
            Vec::new()
        }
    }

    /// Runs a tree operation directly, or in the caller's transaction.
    fn in_context<R>(
        &mut self,
        conn: &Conn,
        tx_id: u32,
        op: impl FnOnce(&mut dyn View) -> Result<(R, Option<Change>), Errno>,
    ) -> Result<(R, Vec<Change>), Errno> {
        if tx_id == 0 {
            let (r, change) = op(&mut self.nodes)?;
            return Ok((r, change.into_iter().collect()));
        }
        let tx = self
            .txs
            .get_mut(&tx_id)
            .filter(|t| t.conn_id == conn.id)
            .ok_or(Errno::Enoent)?;
        let (r, change) = op(&mut TxView {
            nodes: &self.nodes,
            tx: &mut *tx,
        })?;
        if let Some(c) = change {
            tx.add_change(c);
        }
        // Watches fire when (if) the transaction commits.
        Ok((r, Vec::new()))
    }

    /// Handles one request from `conn`.
    fn handle(
        &mut self,
        conn: &Conn,
        limits: Limits,
        config: &ServerConfig,
        msg: &Message,
    ) -> Result<Outcome, Errno> {
        let caller = Caller {
            domid: conn.domid,
            privileged: conn.privileged,
        };
        let tx_id = msg.header.tx_id;
        let payload = msg.payload.as_slice();
        let node_path = |raw: &[u8]| canonicalize(caller.domid, raw, false).map(|c| c.path);
        let Some(ty) = msg.header.msg_type() else {
            return Err(Errno::Einval);
        };
        match ty {
            MsgType::Read => {
                let path = node_path(one_arg(payload)?)?;
                let (value, _) =
                    self.in_context(conn, tx_id, |v| Ok((store::read(v, caller, &path)?, None)))?;
                Ok(Outcome::data(value))
            }
            MsgType::Write => {
                let (raw, value) = wire::split_write(payload).ok_or(Errno::Einval)?;
                let path = node_path(raw)?;
                let ((), changes) = self.in_context(conn, tx_id, |v| {
                    Ok(((), Some(store::write(v, caller, limits, &path, value)?)))
                })?;
                Ok(Outcome::ok_with(changes))
            }
            MsgType::Mkdir => {
                let path = node_path(one_arg(payload)?)?;
                let ((), changes) = self.in_context(conn, tx_id, |v| {
                    Ok(((), store::mkdir(v, caller, limits, &path)?))
                })?;
                Ok(Outcome::ok_with(changes))
            }
            MsgType::Rm => {
                let path = node_path(one_arg(payload)?)?;
                let ((), changes) =
                    self.in_context(conn, tx_id, |v| Ok(((), store::rm(v, caller, &path)?)))?;
                Ok(Outcome::ok_with(changes))
            }
            MsgType::Directory => {
                let path = node_path(one_arg(payload)?)?;
                let (list, _) = self.in_context(conn, tx_id, |v| {
                    Ok((store::directory(v, caller, &path)?, None))
                })?;
                Ok(Outcome::data(list))
            }
            MsgType::DirectoryPart => {
                let args = wire::split_exact(payload, 2).ok_or(Errno::Einval)?;
                let path = node_path(args[0])?;
                let offset = parse_u32(args[1])? as usize;
                let (list, _) = self.in_context(conn, tx_id, |v| {
                    Ok((store::directory_part(v, caller, &path, offset)?, None))
                })?;
                Ok(Outcome::data(list))
            }
            MsgType::GetPerms => {
                let path = node_path(one_arg(payload)?)?;
                let (perms, _) = self.in_context(conn, tx_id, |v| {
                    Ok((store::get_perms(v, caller, &path)?, None))
                })?;
                Ok(Outcome::data(perms))
            }
            MsgType::SetPerms => {
                let args = wire::split_terminated(payload).ok_or(Errno::Einval)?;
                let (raw, entries) = args.split_first().ok_or(Errno::Einval)?;
                let path = node_path(raw)?;
                let perms = entries
                    .iter()
                    .map(|e| Perm::from_wire(e).ok_or(Errno::Einval))
                    .collect::<Result<Vec<_>, _>>()?;
                let ((), changes) = self.in_context(conn, tx_id, |v| {
                    Ok(((), Some(store::set_perms(v, caller, &path, perms)?)))
                })?;
                Ok(Outcome::ok_with(changes))
            }
            MsgType::Watch => self.watch(conn, config, payload),
            MsgType::Unwatch => {
                let args = wire::split_exact(payload, 2).ok_or(Errno::Einval)?;
                let c = canonicalize(caller.domid, args[0], true)?;
                let token = std::str::from_utf8(args[1]).map_err(|_| Errno::Einval)?;
                if self.watches.remove(conn.id, &c.path, token) {
                    Ok(Outcome::ok())
                } else {
                    Err(Errno::Enoent)
                }
            }
            MsgType::TransactionStart => {
                if tx_id != 0 {
                    return Err(Errno::Ebusy);
                }
                let open = self.txs.values().filter(|t| t.conn_id == conn.id).count();
                if !caller.privileged && open >= config.max_transactions_per_connection {
                    return Err(Errno::Enospc);
                }
                let id = self.alloc_tx_id();
                self.txs.insert(id, Tx::new(conn.id));
                Ok(Outcome::data(format!("{id}\0").into_bytes()))
            }
            MsgType::TransactionEnd => {
                let commit = match one_arg(payload)? {
                    b"T" => true,
                    b"F" => false,
                    _ => return Err(Errno::Einval),
                };
                if !matches!(self.txs.get(&tx_id), Some(t) if t.conn_id == conn.id) {
                    return Err(Errno::Enoent);
                }
                let Some(tx) = self.txs.remove(&tx_id) else {
                    return Err(Errno::Enoent);
                };
                if !commit {
                    return Ok(Outcome::ok());
                }
                let changes = tx.commit(&mut self.nodes, caller, limits)?;
                Ok(Outcome::ok_with(changes))
            }
            MsgType::GetDomainPath => {
                let domid = parse_u32(one_arg(payload)?)?;
                Ok(Outcome::data(
                    format!("{}\0", domain_path(domid)).into_bytes(),
                ))
            }
            MsgType::IsDomainIntroduced => {
                let domid = parse_u32(one_arg(payload)?)?;
                let answer: &[u8] = if self.introduced.contains(&domid) {
                    b"T\0"
                } else {
                    b"F\0"
                };
                Ok(Outcome::data(answer.to_vec()))
            }
            MsgType::Introduce => {
                // `domid\0mfn\0port\0`: there is no ring to map here; the
                // domain is simply marked introduced.
                if !caller.privileged {
                    return Err(Errno::Eacces);
                }
                let args = wire::split_exact(payload, 3).ok_or(Errno::Einval)?;
                let domid = parse_u32(args[0])?;
                Ok(Outcome::ok_with(self.introduce(domid)))
            }
            MsgType::Release => {
                if !caller.privileged {
                    return Err(Errno::Eacces);
                }
                let domid = parse_u32(one_arg(payload)?)?;
                Ok(Outcome::ok_with(self.release(domid)))
            }
            MsgType::ResetWatches => {
                self.watches.remove_conn(conn.id);
                self.txs.retain(|_, t| t.conn_id != conn.id);
                Ok(Outcome::ok())
            }
            MsgType::Control | MsgType::Resume | MsgType::SetTarget => Err(Errno::Enosys),
            // Only the daemon sends these.
            MsgType::WatchEvent | MsgType::Error => Err(Errno::Einval),
        }
    }

    fn watch(
        &mut self,
        conn: &Conn,
        config: &ServerConfig,
        payload: &[u8],
    ) -> Result<Outcome, Errno> {
        let args = wire::split_exact(payload, 2).ok_or(Errno::Einval)?;
        let c = canonicalize(conn.domid, args[0], true)?;
        let token = std::str::from_utf8(args[1]).map_err(|_| Errno::Einval)?;
        if self.watches.exists(conn.id, &c.path, token) {
            return Err(Errno::Eexist);
        }
        if !conn.privileged && self.watches.count_for(conn.id) >= config.max_watches_per_connection
        {
            return Err(Errno::E2big);
        }
        let Some(conn_arc) = self.conns.get(&conn.id).cloned() else {
            return Err(Errno::Enoent);
        };
        let initial_path = c.path.clone();
        self.watches.add(Watch {
            conn: conn_arc,
            path: c.path,
            token: token.to_owned(),
            relative_prefix: c.relative_prefix,
        });
        Ok(Outcome {
            initial_fire: Some((initial_path, token.to_owned())),
            ..Outcome::ok()
        })
    }

    fn alloc_tx_id(&mut self) -> u32 {
        loop {
            let id = self.next_tx_id;
            self.next_tx_id = self.next_tx_id.wrapping_add(1);
            if id != 0 && !self.txs.contains_key(&id) {
                return id;
            }
        }
    }
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
        info!(domid, path = %path.display(), "xenstore server listening");
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

/// The reply message for a handled request: same type, req_id and tx_id, or
/// `XS_ERROR` with the errno name.
fn encode_reply(h: &Header, result: &Result<Outcome, Errno>) -> Vec<u8> {
    let error = |e: &Errno| {
        let payload = wire::nul_terminated(&[e.as_str().as_bytes()]);
        wire::encode(MsgType::Error, h.req_id, h.tx_id, &payload).unwrap_or_default()
    };
    match result {
        Ok(o) => match wire::encode_raw(h.ty, h.req_id, h.tx_id, &o.payload) {
            Some(m) => m,
            None => error(&Errno::E2big),
        },
        Err(e) => error(e),
    }
}
