//! The request handler: everything behind the server's one lock (tree,
//! transactions, watches, connections, introduced domains) and the mapping
//! of each xs_wire.h request onto the tree operations of `store`.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::error::Errno;
use crate::perms::{Access, Perm};
use crate::wire::{self, Header, Message, MsgType};

use super::conn::Conn;
use super::path::{canonicalize, domain_path};
use super::store::{self, Caller, Change, Limits, Nodes, Tx, TxView, View};
use super::watch::{Watch, Watches};
use super::{ServerConfig, INTRODUCE_DOMAIN, RELEASE_DOMAIN};

/// Everything behind the server's one lock.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) nodes: Nodes,
    pub(crate) txs: HashMap<u32, Tx>,
    pub(crate) next_tx_id: u32,
    pub(crate) watches: Watches,
    pub(crate) conns: HashMap<u64, Arc<Conn>>,
    pub(crate) introduced: BTreeSet<u32>,
}

/// The reply to one request, and what to do after queuing it.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub(crate) payload: Vec<u8>,
    pub(crate) changes: Vec<Change>,
    /// `XS_WATCH` fires once right after its acknowledgement.
    pub(crate) initial_fire: Option<(String, String)>,
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
    pub(crate) fn new() -> State {
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

    pub(crate) fn fire(&self, changes: &[Change]) {
        for c in changes {
            self.watches.fire(c);
        }
    }

    /// Forgets a connection: its watches, transactions and registration.
    pub(crate) fn remove_conn(&mut self, conn_id: u64) {
        self.watches.remove_conn(conn_id);
        self.txs.retain(|_, tx| tx.conn_id != conn_id);
        self.conns.remove(&conn_id);
    }

    pub(crate) fn introduce(&mut self, domid: u32) -> Vec<Change> {
        if self.introduced.insert(domid) {
            vec![special_change(INTRODUCE_DOMAIN)]
        } else {
            Vec::new()
        }
    }

    /// Closes the domain's connections and drops their watches and
    /// transactions; fires `@releaseDomain` if the domain was known.
    pub(crate) fn release(&mut self, domid: u32) -> Vec<Change> {
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
    pub(crate) fn handle(
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
            MsgType::SetPerms => self.set_perms(conn, caller, tx_id, payload),
            MsgType::Watch => self.watch(conn, config, payload),
            MsgType::Unwatch => self.unwatch(conn, caller, payload),
            MsgType::TransactionStart => self.transaction_start(conn, caller, config, tx_id),
            MsgType::TransactionEnd => self.transaction_end(conn, caller, limits, tx_id, payload),
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
            MsgType::Introduce => self.handle_introduce(caller, payload),
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

    fn set_perms(
        &mut self,
        conn: &Conn,
        caller: Caller,
        tx_id: u32,
        payload: &[u8],
    ) -> Result<Outcome, Errno> {
        let args = wire::split_terminated(payload).ok_or(Errno::Einval)?;
        let (raw, entries) = args.split_first().ok_or(Errno::Einval)?;
        let path = canonicalize(caller.domid, raw, false)?.path;
        let perms = entries
            .iter()
            .map(|e| Perm::from_wire(e).ok_or(Errno::Einval))
            .collect::<Result<Vec<_>, _>>()?;
        let ((), changes) = self.in_context(conn, tx_id, |v| {
            Ok(((), Some(store::set_perms(v, caller, &path, perms)?)))
        })?;
        Ok(Outcome::ok_with(changes))
    }

    fn unwatch(&mut self, conn: &Conn, caller: Caller, payload: &[u8]) -> Result<Outcome, Errno> {
        let args = wire::split_exact(payload, 2).ok_or(Errno::Einval)?;
        let c = canonicalize(caller.domid, args[0], true)?;
        let token = std::str::from_utf8(args[1]).map_err(|_| Errno::Einval)?;
        if self.watches.remove(conn.id, &c.path, token) {
            Ok(Outcome::ok())
        } else {
            Err(Errno::Enoent)
        }
    }

    fn transaction_start(
        &mut self,
        conn: &Conn,
        caller: Caller,
        config: &ServerConfig,
        tx_id: u32,
    ) -> Result<Outcome, Errno> {
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

    fn transaction_end(
        &mut self,
        conn: &Conn,
        caller: Caller,
        limits: Limits,
        tx_id: u32,
        payload: &[u8],
    ) -> Result<Outcome, Errno> {
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

    fn handle_introduce(&mut self, caller: Caller, payload: &[u8]) -> Result<Outcome, Errno> {
        // `domid\0mfn\0port\0`: there is no ring to map here; the
        // domain is simply marked introduced.
        if !caller.privileged {
            return Err(Errno::Eacces);
        }
        let args = wire::split_exact(payload, 3).ok_or(Errno::Einval)?;
        let domid = parse_u32(args[0])?;
        let mfn_ok = std::str::from_utf8(args[1]).is_ok_and(|m| m.parse::<u64>().is_ok());
        if !mfn_ok {
            return Err(Errno::Einval);
        }
        parse_u32(args[2])?;
        Ok(Outcome::ok_with(self.introduce(domid)))
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

/// The reply message for a handled request: same type, req_id and tx_id, or
/// `XS_ERROR` with the errno name.
pub(crate) fn encode_reply(h: &Header, result: &Result<Outcome, Errno>) -> Vec<u8> {
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
