//! [`Store`] over the `xenstore` crate's [`XsClient`]: the adapter used by the daemon on real
//! Xen (`/dev/xen/xenbus`, `/run/xenstored/socket`) and in the simulator (the in-memory
//! server's unix socket), and the thread that forwards its watch events to the manager.

use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Instant;

use tracing::{debug, warn};
use xenstore::{Errno, XsClient, XsOps};

use crate::error::StoreError;
use crate::manager::{Event, EventSender};
use crate::ratelimit::{Kind, Warnings};
use crate::store::{Access, Perm, Store, StoreOps};

/// Retries of a conflicting transaction (Linux's xenbus drivers retry forever; a bound
/// keeps a pathological writer from pinning the control thread).
const TX_RETRIES: u32 = 64;

/// A [`Store`] on an [`XsClient`].
#[derive(Debug, Clone)]
pub struct XsStore {
    client: Arc<XsClient>,
}

impl XsStore {
    /// Wraps a connected client.
    pub fn new(client: Arc<XsClient>) -> XsStore {
        XsStore { client }
    }

    /// The underlying client.
    pub fn client(&self) -> &Arc<XsClient> {
        &self.client
    }
}

fn convert(op: &'static str, path: &str, e: xenstore::Error) -> StoreError {
    match e {
        xenstore::Error::Xs(errno) => StoreError::Daemon {
            op,
            path: path.to_string(),
            errno: errno.as_str().to_string(),
        },
        xenstore::Error::Disconnected | xenstore::Error::Io(_) | xenstore::Error::Protocol(_) => {
            StoreError::Disconnected(e.to_string())
        }
        other => StoreError::Other(format!("{op} {path}: {other}")),
    }
}

fn to_xs_perm(p: &Perm) -> xenstore::Perm {
    let access = match p.access {
        Access::None => xenstore::Access::None,
        Access::Read => xenstore::Access::Read,
        Access::Write => xenstore::Access::Write,
        Access::Both => xenstore::Access::Both,
    };
    xenstore::Perm::new(p.domid, access)
}

/// [`StoreOps`] over anything implementing the client's [`XsOps`] (the client itself, or a
/// transaction).
struct Ops<'a, X: XsOps>(&'a X);

impl<X: XsOps> StoreOps for Ops<'_, X> {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.read_opt(path).map_err(|e| convert("read", path, e))
    }

    fn write(&self, path: &str, value: &[u8]) -> Result<(), StoreError> {
        self.0
            .write(path, value)
            .map_err(|e| convert("write", path, e))
    }

    fn mkdir(&self, path: &str) -> Result<(), StoreError> {
        self.0.mkdir(path).map_err(|e| convert("mkdir", path, e))
    }

    fn rm(&self, path: &str) -> Result<(), StoreError> {
        match self.0.rm(path) {
            Err(e) if e.is_not_found() => Ok(()),
            other => other.map_err(|e| convert("rm", path, e)),
        }
    }

    fn directory(&self, path: &str) -> Result<Option<Vec<String>>, StoreError> {
        match self.0.directory(path) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(convert("directory", path, e)),
        }
    }

    fn set_perms(&self, path: &str, perms: &[Perm]) -> Result<(), StoreError> {
        let perms: Vec<xenstore::Perm> = perms.iter().map(to_xs_perm).collect();
        self.0
            .set_perms(path, &perms)
            .map_err(|e| convert("set_perms", path, e))
    }
}

impl StoreOps for XsStore {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ops(self.client.as_ref()).read(path)
    }

    fn write(&self, path: &str, value: &[u8]) -> Result<(), StoreError> {
        Ops(self.client.as_ref()).write(path, value)
    }

    fn mkdir(&self, path: &str) -> Result<(), StoreError> {
        Ops(self.client.as_ref()).mkdir(path)
    }

    fn rm(&self, path: &str) -> Result<(), StoreError> {
        Ops(self.client.as_ref()).rm(path)
    }

    fn directory(&self, path: &str) -> Result<Option<Vec<String>>, StoreError> {
        Ops(self.client.as_ref()).directory(path)
    }

    fn set_perms(&self, path: &str, perms: &[Perm]) -> Result<(), StoreError> {
        Ops(self.client.as_ref()).set_perms(path, perms)
    }
}

impl Store for XsStore {
    fn watch(&self, path: &str, token: &str) -> Result<(), StoreError> {
        self.client
            .watch(path, token)
            .map_err(|e| convert("watch", path, e))
    }

    fn unwatch(&self, path: &str, token: &str) -> Result<(), StoreError> {
        self.client
            .unwatch(path, token)
            .map_err(|e| convert("unwatch", path, e))
    }

    fn transaction(
        &self,
        f: &mut dyn FnMut(&dyn StoreOps) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        for attempt in 0..=TX_RETRIES {
            let tx = self
                .client
                .transaction_start()
                .map_err(|e| convert("transaction_start", "", e))?;
            if let Err(e) = f(&Ops(&tx)) {
                let _ = tx.abort();
                if e.is_again() {
                    continue;
                }
                return Err(e);
            }
            match tx.commit() {
                Ok(()) => return Ok(()),
                Err(e) if e.is_again() => {
                    debug!(attempt, "xenstore transaction conflict, retrying");
                }
                Err(e) => return Err(convert("transaction_end", "", e)),
            }
        }
        Err(StoreError::Conflict(TX_RETRIES + 1))
    }

    fn domain_introduced(&self, domid: u32) -> Result<Option<bool>, StoreError> {
        match self.client.is_domain_introduced(domid) {
            Ok(v) => Ok(Some(v)),
            // A daemon that does not implement the request cannot tell.
            Err(xenstore::Error::Xs(Errno::Enosys | Errno::Einval | Errno::Eacces)) => Ok(None),
            Err(e) => Err(convert("is_domain_introduced", "", e)),
        }
    }
}

/// Forwards the client's watch events to the manager until the connection closes. Lost
/// events (a full queue) become one [`Event::Rescan`]; a closed connection also sends a
/// rescan, whose first store operation then reports the disconnection.
pub fn spawn_watch_forwarder(
    client: &XsClient,
    sender: EventSender,
) -> std::io::Result<JoinHandle<()>> {
    let events = client.watch_events();
    thread::Builder::new()
        .name("xenstore-watches".into())
        .spawn(move || {
            let mut dropped = events.dropped();
            // A guest flooding a node we watch can overflow the queue again and again: one
            // line per interval, counting every event lost since the last one.
            let mut warnings = Warnings::new();
            let mut lost_unreported = 0u64;
            while let Ok(ev) = events.recv() {
                let now = events.dropped();
                if now != dropped {
                    lost_unreported = lost_unreported.saturating_add(now.wrapping_sub(dropped));
                    if let Some(suppressed) = warnings.admit(Kind::WatchEventsLost, Instant::now())
                    {
                        warn!(
                            lost = lost_unreported,
                            suppressed, "xenstore watch events were lost; rescanning"
                        );
                        lost_unreported = 0;
                    }
                    dropped = now;
                    if !sender.send(Event::Rescan) {
                        return;
                    }
                }
                sender.watch_fired(&ev.path, &ev.token);
            }
            debug!("xenstore watch queue closed");
            sender.send(Event::Rescan);
        })
}
