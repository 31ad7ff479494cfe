//! Watch registrations and event delivery, with xenstored's matching rules:
//! a change to node P fires every watch on P or on an ancestor of P (event
//! path P); a removal of P also fires watches *below* P (event path = the
//! watch's own path); `@introduceDomain` / `@releaseDomain` fire only their
//! exact watches. Events go only to connections that may read the node, and
//! are reported relative to `/local/domain/<domid>/` if the watch was
//! registered with a relative path.

use std::sync::Arc;

use tracing::debug;

use crate::perms::effective_access;
use crate::wire::{self, MsgType};

use super::conn::Conn;
use super::path::is_self_or_ancestor;
use super::store::Change;

/// One registered watch.
#[derive(Debug)]
pub(crate) struct Watch {
    pub conn: Arc<Conn>,
    /// Canonical absolute path, or a special `@` path.
    pub path: String,
    pub token: String,
    /// Set when registered relative: strip it from reported paths.
    pub relative_prefix: Option<String>,
}

impl Watch {
    /// The path as the client registered it.
    pub fn client_path<'a>(&self, abs: &'a str) -> &'a str {
        match &self.relative_prefix {
            Some(prefix) => abs.strip_prefix(prefix.as_str()).unwrap_or(abs),
            None => abs,
        }
    }

    /// Queues an event for `abs_path` on the watch's connection.
    pub fn deliver(&self, abs_path: &str) {
        let path = self.client_path(abs_path);
        let payload = wire::nul_terminated(&[path.as_bytes(), self.token.as_bytes()]);
        match wire::encode(MsgType::WatchEvent, 0, 0, &payload) {
            Some(msg) => self.conn.push_event(msg),
            // A long token on a watch near the root plus a long changed path
            // can exceed the payload limit; such an event cannot be sent.
            None => debug!(
                conn = self.conn.id,
                "watch event too large to send, skipped"
            ),
        }
    }
}

/// All watches of the server.
#[derive(Debug, Default)]
pub(crate) struct Watches {
    list: Vec<Watch>,
}

impl Watches {
    pub fn count_for(&self, conn_id: u64) -> usize {
        self.list.iter().filter(|w| w.conn.id == conn_id).count()
    }

    pub fn exists(&self, conn_id: u64, path: &str, token: &str) -> bool {
        self.list
            .iter()
            .any(|w| w.conn.id == conn_id && w.path == path && w.token == token)
    }

    pub fn find(&self, conn_id: u64, path: &str, token: &str) -> Option<&Watch> {
        self.list
            .iter()
            .find(|w| w.conn.id == conn_id && w.path == path && w.token == token)
    }

    pub fn add(&mut self, w: Watch) {
        self.list.push(w);
    }

    /// Removes one watch; false if there was none.
    pub fn remove(&mut self, conn_id: u64, path: &str, token: &str) -> bool {
        let before = self.list.len();
        self.list
            .retain(|w| !(w.conn.id == conn_id && w.path == path && w.token == token));
        self.list.len() != before
    }

    /// Removes every watch of a connection.
    pub fn remove_conn(&mut self, conn_id: u64) {
        self.list.retain(|w| w.conn.id != conn_id);
    }

    /// Fires the watches a change matches.
    pub fn fire(&self, change: &Change) {
        for w in &self.list {
            let event_path = if is_self_or_ancestor(&w.path, &change.path) {
                &change.path
            } else if change.recursive && is_self_or_ancestor(&change.path, &w.path) {
                &w.path
            } else {
                continue;
            };
            let may_read = w.conn.privileged
                || effective_access(&change.perms, w.conn.domid, false).can_read();
            if may_read {
                w.deliver(event_path);
            }
        }
    }
}
