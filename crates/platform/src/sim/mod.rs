//! A simulated hypervisor: Xen's grant and event-channel semantics without Xen.
//!
//! A simulated guest ([`SimGuest`]) owns its memory (a memfd of N pages) and a grant
//! table of real `grant_entry_v1` records (another memfd), and allocates event channels
//! (an eventfd per direction). The backend side ([`SimPlatform`]) is a [`Platform`]: it
//! keeps a registry of attached domains and plays the hypervisor for them — a grant map
//! checks the entry the way Xen does ([`crate::grant_table`]), flags it
//! `GTF_reading`/`GTF_writing` while mapped and maps the guest's own pages into one
//! contiguous range (zero copy, like gntdev); grant copy checks the same and copies
//! through the memfd.
//!
//! A guest attaches from the same process ([`SimPlatform::attach_local`]) or from another
//! one ([`SimGuest::connect`] + [`SimPlatform::accept`], or [`SimAcceptor`] where many
//! guests, some hostile, share one socket): all go through the same handshake on a unix
//! socket ([`wire`]), which passes the memfds, a liveness pipe and, later, each event
//! channel's eventfds by SCM_RIGHTS.
//!
//! **A guest that dies.** The guest keeps the write end of the liveness pipe; when its
//! process exits or is killed the backend's read end ([`DomainHandle::liveness_fd`])
//! turns readable/HUP, which the daemon polls like any other fd. Nothing else changes by
//! itself: the memfds stay valid (the backend holds its own descriptors and they are
//! sealed against shrinking), so existing mappings, maps and copies keep working on the
//! dead guest's memory and event-channel notifies go nowhere — no fault, no hang. When the
//! daemon tears the domain down it calls [`SimPlatform::detach`], as Xen destroys a dead
//! domain: from then on maps, copies and binds for it fail with `GNTST_bad_domain` /
//! [`PlatformError::UnknownDomain`], while mappings still held stay valid until dropped.
//!
//! **A backend process that dies.** The guest side plays the hypervisor for it. The
//! platform's record of a domain owns the backend's end of the attach socket, and every
//! grant mapping, copy in progress and bound event channel owns that record, so the
//! socket closes exactly when the process dies (the kernel closes its descriptors,
//! whatever killed it) or holds nothing of the guest's any more. The guest notices
//! ([`SimGuest::wait_backend_death`]) and does what Xen does for a dead process: every
//! pin the process held is released (`GTF_reading`/`GTF_writing` cleared in the guest's
//! grant table, so `end_access` succeeds again), its event-channel ends are gone (the
//! guest's ports stay the guest's, unbound: a notify goes nowhere, a kick sent meanwhile
//! is lost), and memory, grant entries, rings and xenstore are untouched. The guest then
//! attaches to the next process listening on the same socket ([`SimGuest::reattach`];
//! [`Reattacher`] does both in a thread, retrying with a short backoff) with the same
//! handshake, and offers every live port again with its eventfds, so the new process's
//! [`SimPlatform`] knows the domain and can bind an interdomain channel to the port the
//! frontend published, as a new backend does on Xen. Until the guest has attached, the
//! new process does not know the domain (maps fail with `GNTST_bad_domain`, binds with
//! [`PlatformError::UnknownDomain`]): a daemon adopting devices at start waits for it.

mod acceptor;
mod evtchn;
mod grant;
mod guest;
mod reattach;
mod vm;
mod wire;

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use rustix::fs::{FileType, SealFlags};
use shmem::{SharedMemory, PAGE_SIZE};

use crate::grant_table::{self, ActiveTable};
use crate::{DomId, Platform, PlatformError, Port, XenstoreEndpoint, DOMID_FIRST_RESERVED};
use grant::Counters;

pub use acceptor::{AcceptorStats, GuestHello, SimAcceptor, MAX_PENDING_HANDSHAKES};
pub use guest::{BackendDeath, GuestConfig, GuestError, GuestEventChannel, SimGuest};
pub use reattach::{ReattachStats, Reattacher};

/// Largest guest the backend accepts (pages): 16 GiB.
pub const MAX_GUEST_FRAMES: u32 = 1 << 22;
/// Largest grant table the backend accepts (entries): 128 frames of v1 entries.
pub const MAX_GRANT_ENTRIES: u32 = 128 * grant_table::ENTRIES_PER_FRAME_U32;
/// Most event channels one guest may announce; more are refused (the guest cannot make
/// the backend hold unbounded descriptors).
pub const MAX_PORTS_PER_DOMAIN: usize = 1024;
/// How long the backend waits for a connecting guest's hello, and a guest for the answer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long after a guest attached a bind to a port it has not offered yet is "not yet"
/// ([`PlatformError::PortNotYetOffered`]) rather than a bad port: a reattaching guest
/// sends its ports right after the welcome, within milliseconds.
pub const PORT_OFFER_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct GuestPort {
    remote_domid: DomId,
    /// Guest → backend notifications (the backend polls it).
    to_backend: OwnedFd,
    /// Backend → guest notifications.
    to_guest: OwnedFd,
    bound: bool,
}

#[derive(Debug, Default)]
struct Control {
    /// The attach socket; `None` once the guest closed it or broke the protocol.
    stream: Option<UnixStream>,
    ports: HashMap<Port, GuestPort>,
}

/// The hypervisor's record of one attached guest.
#[derive(Debug)]
struct SimDomain {
    domid: DomId,
    /// Guest memory (memfd, sealed against shrinking, `nr_frames` pages).
    memory: File,
    /// All of guest memory mapped once, where the simulated hypervisor does its grant
    /// copies (Xen copies through its own mapping of the frames too).
    memory_map: SharedMemory,
    nr_frames: u32,
    /// The guest's grant table, mapped shared: we read entries and set pin flags in it.
    table: SharedMemory,
    active: ActiveTable,
    liveness: OwnedFd,
    control: Mutex<Control>,
    /// When the domain attached to this process (for [`PORT_OFFER_GRACE`]).
    attached_at: Instant,
}

impl SimDomain {
    fn control(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the port announcements the guest sent since last time (non-blocking).
    fn drain_control(&self, ctl: &mut Control) {
        while let Some(stream) = ctl.stream.as_ref() {
            match wire::recv(stream) {
                Ok(wire::Recv::WouldBlock) => return,
                Ok(wire::Recv::Eof) => {
                    tracing::debug!(domid = self.domid, "guest closed its attach socket");
                    ctl.stream = None;
                }
                Ok(wire::Recv::Msg(wire::Msg::PortAlloc { port, remote_domid }, fds)) => {
                    let Ok::<[OwnedFd; 2], _>([to_backend, to_guest]) = fds.try_into() else {
                        tracing::warn!(
                            domid = self.domid,
                            port,
                            "port announcement without its two eventfds"
                        );
                        ctl.stream = None;
                        continue;
                    };
                    if ctl.ports.len() >= MAX_PORTS_PER_DOMAIN || ctl.ports.contains_key(&port) {
                        tracing::warn!(
                            domid = self.domid,
                            port,
                            "port announcement refused (duplicate or over the limit)"
                        );
                        continue;
                    }
                    ctl.ports.insert(
                        port,
                        GuestPort {
                            remote_domid,
                            to_backend,
                            to_guest,
                            bound: false,
                        },
                    );
                }
                Ok(wire::Recv::Msg(wire::Msg::PortClose { port }, _)) => {
                    ctl.ports.remove(&port);
                }
                Ok(wire::Recv::Msg(other, _)) => {
                    tracing::warn!(
                        domid = self.domid,
                        ?other,
                        "unexpected message; closing the attach socket"
                    );
                    ctl.stream = None;
                }
                Err(e) => {
                    tracing::warn!(domid = self.domid, error = %e, "attach protocol violation; closing the attach socket");
                    ctl.stream = None;
                }
            }
        }
    }

    fn is_alive(&self) -> bool {
        !wire::wait_readable(self.liveness.as_fd(), Duration::ZERO)
    }
}

/// What the platform knows about one attached guest; cheap to clone.
#[derive(Debug, Clone)]
pub struct DomainHandle {
    dom: Arc<SimDomain>,
}

impl DomainHandle {
    pub fn domid(&self) -> DomId {
        self.dom.domid
    }

    /// Guest memory size in pages.
    pub fn nr_frames(&self) -> u32 {
        self.dom.nr_frames
    }

    pub fn nr_grant_entries(&self) -> u32 {
        self.dom.active.nr_entries()
    }

    /// Readable (EOF) / HUP once the guest is gone: poll it with the rings' fds.
    pub fn liveness_fd(&self) -> BorrowedFd<'_> {
        self.dom.liveness.as_fd()
    }

    /// Whether the guest still holds its end (a zero-timeout poll of the liveness fd).
    pub fn is_alive(&self) -> bool {
        self.dom.is_alive()
    }

    /// Waits up to `timeout` for the guest to go away; `true` if it did.
    pub fn wait_for_exit(&self, timeout: Duration) -> bool {
        wire::wait_readable(self.dom.liveness.as_fd(), timeout)
    }
}

#[derive(Debug)]
struct Inner {
    backend_domid: DomId,
    domains: RwLock<HashMap<DomId, Arc<SimDomain>>>,
    counters: Arc<Counters>,
    next_port: AtomicU32,
    xenstore: RwLock<Option<PathBuf>>,
}

/// The backend side of the simulated hypervisor; a [`Platform`]. Clones share state.
#[derive(Debug, Clone)]
pub struct SimPlatform {
    inner: Arc<Inner>,
}

impl Default for SimPlatform {
    fn default() -> Self {
        Self::new()
    }
}

impl SimPlatform {
    /// A hypervisor whose backend runs in dom0.
    pub fn new() -> Self {
        Self::with_backend_domid(0)
    }

    /// A hypervisor whose backend runs in driver domain `domid`: guests must grant to it.
    pub fn with_backend_domid(domid: DomId) -> Self {
        Self {
            inner: Arc::new(Inner {
                backend_domid: domid,
                domains: RwLock::new(HashMap::new()),
                counters: Arc::default(),
                next_port: AtomicU32::new(1),
                xenstore: RwLock::new(None),
            }),
        }
    }

    pub fn backend_domid(&self) -> DomId {
        self.inner.backend_domid
    }

    /// Where [`Platform::xenstore_endpoint`] points: the `xenstore` crate's in-memory
    /// server's socket.
    pub fn set_xenstore_socket(&self, path: impl Into<PathBuf>) {
        *self
            .inner
            .xenstore
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(path.into());
    }

    /// Attaches a guest living in this process (same handshake as another process, over
    /// a socketpair).
    pub fn attach_local(&self, guest: &SimGuest) -> Result<DomainHandle, PlatformError> {
        let (guest_end, backend_end) =
            UnixStream::pair().map_err(|e| PlatformError::io("socketpair", e))?;
        guest
            .send_hello(&guest_end)
            .map_err(|e| PlatformError::Protocol(format!("local guest hello: {e}")))?;
        let handle = self.attach_stream(backend_end)?;
        guest
            .finish_connect(guest_end)
            .map_err(|e| PlatformError::Protocol(format!("local guest welcome: {e}")))?;
        Ok(handle)
    }

    /// Accepts one guest connecting on `listener` (blocks until one connects) and runs
    /// its handshake, waiting for that one peer: for tests that expect a single guest.
    /// Where anyone may connect, [`SimAcceptor`] waits on no one.
    pub fn accept(&self, listener: &UnixListener) -> Result<DomainHandle, PlatformError> {
        let (stream, _) = listener
            .accept()
            .map_err(|e| PlatformError::io("accept", e))?;
        self.attach_stream(stream)
    }

    /// Like [`SimPlatform::accept`], giving up after `timeout` without a connection.
    pub fn accept_timeout(
        &self,
        listener: &UnixListener,
        timeout: Duration,
    ) -> Result<DomainHandle, PlatformError> {
        if !wire::wait_readable(listener.as_fd(), timeout) {
            return Err(PlatformError::io(
                "accept",
                std::io::Error::from(std::io::ErrorKind::TimedOut),
            ));
        }
        self.accept(listener)
    }

    /// Runs the backend side of the handshake on a connected stream: reads the guest's
    /// hello and descriptors (waiting up to [`HANDSHAKE_TIMEOUT`]), validates them,
    /// registers the domain, answers.
    pub fn attach_stream(&self, stream: UnixStream) -> Result<DomainHandle, PlatformError> {
        stream
            .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(|e| PlatformError::io("set_read_timeout", e))?;
        let (hello, fds) = match wire::recv(&stream) {
            Ok(wire::Recv::Msg(hello @ wire::Msg::Hello { .. }, fds)) => (hello, fds),
            Ok(wire::Recv::Msg(other, _)) => {
                return Err(PlatformError::Protocol(format!(
                    "expected hello, got {other:?}"
                )))
            }
            Ok(wire::Recv::WouldBlock) => {
                return Err(PlatformError::Protocol(
                    "no hello within the handshake timeout".into(),
                ))
            }
            Ok(wire::Recv::Eof) => {
                return Err(PlatformError::Protocol(
                    "guest hung up before its hello".into(),
                ))
            }
            Err(e) => return Err(PlatformError::Protocol(e)),
        };
        self.finish_attach(stream, hello, fds)
    }

    /// The rest of the handshake for a hello [`SimAcceptor`] received: validates it,
    /// registers the domain, answers. Waits on nothing (the welcome is the first thing
    /// ever sent on the socket, so it fits its buffer).
    pub fn attach_hello(&self, hello: GuestHello) -> Result<DomainHandle, PlatformError> {
        let GuestHello {
            stream, hello, fds, ..
        } = hello;
        self.finish_attach(stream, hello, fds)
    }

    fn finish_attach(
        &self,
        stream: UnixStream,
        hello: wire::Msg,
        fds: Vec<OwnedFd>,
    ) -> Result<DomainHandle, PlatformError> {
        let admitted = self.admit(hello, fds);
        let status = match &admitted {
            Ok(_) => 0,
            Err(_) => -libc::EINVAL,
        };
        let welcome = wire::Msg::Welcome {
            status,
            backend_domid: self.inner.backend_domid,
        };
        let sent = wire::send(&stream, welcome, &[]);
        let dom = match admitted {
            Ok(dom) => dom,
            Err(e) => {
                tracing::warn!(error = %e, "refused a simulated guest");
                return Err(e);
            }
        };
        if let Err(e) = sent.and_then(|_| stream.set_nonblocking(true)) {
            self.remove(dom.domid);
            return Err(PlatformError::io("welcome", e));
        }
        dom.control().stream = Some(stream);
        tracing::info!(
            domid = dom.domid,
            frames = dom.nr_frames,
            "simulated guest attached"
        );
        Ok(DomainHandle { dom })
    }

    /// Validates a hello: sizes in range, memfds large enough and sealed against
    /// shrinking (a guest shrinking its memory under our mappings would SIGBUS us), a
    /// pipe for liveness, a domid free and not ours.
    fn admit(&self, hello: wire::Msg, fds: Vec<OwnedFd>) -> Result<Arc<SimDomain>, PlatformError> {
        let proto = |m: String| Err(PlatformError::Protocol(m));
        let wire::Msg::Hello {
            version,
            domid,
            nr_frames,
            nr_entries,
        } = hello
        else {
            return proto("not a hello".into());
        };
        if version != wire::VERSION {
            return proto(format!(
                "protocol version {version}, expected {}",
                wire::VERSION
            ));
        }
        if domid >= DOMID_FIRST_RESERVED || domid == self.inner.backend_domid {
            return proto(format!("domid {domid} is reserved or the backend's own"));
        }
        if !(1..=MAX_GUEST_FRAMES).contains(&nr_frames) {
            return proto(format!("{nr_frames} guest frames (1..={MAX_GUEST_FRAMES})"));
        }
        if !(grant_table::NR_RESERVED_ENTRIES + 1..=MAX_GRANT_ENTRIES).contains(&nr_entries) {
            return proto(format!("{nr_entries} grant entries"));
        }
        let Ok::<[OwnedFd; 3], _>([memory, table, liveness]) = fds.try_into() else {
            return proto("hello must carry exactly 3 descriptors".into());
        };
        check_sealed_memfd(
            &memory,
            u64::from(nr_frames) * PAGE_SIZE as u64,
            "guest memory",
        )?;
        let table_len = nr_entries as usize * grant_table::ENTRY_SIZE;
        check_sealed_memfd(&table, table_len as u64, "grant table")?;
        let st =
            rustix::fs::fstat(&liveness).map_err(|e| PlatformError::io("fstat liveness", e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::Fifo {
            return proto("liveness descriptor is not a pipe".into());
        }
        let table = vm::map_file(table.as_fd(), table_len)
            .map_err(|e| PlatformError::io("mmap grant table", e))?;
        let memory_map = vm::map_file(memory.as_fd(), nr_frames as usize * PAGE_SIZE)
            .map_err(|e| PlatformError::io("mmap guest memory", e))?;
        let dom = Arc::new(SimDomain {
            domid,
            memory: File::from(memory),
            memory_map,
            nr_frames,
            table,
            active: ActiveTable::new(nr_entries),
            liveness,
            control: Mutex::new(Control::default()),
            attached_at: Instant::now(),
        });
        let mut domains = self
            .inner
            .domains
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if domains.contains_key(&domid) {
            return Err(PlatformError::DomainExists(domid));
        }
        domains.insert(domid, dom.clone());
        Ok(dom)
    }

    fn remove(&self, domid: DomId) -> Option<Arc<SimDomain>> {
        self.inner
            .domains
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&domid)
    }

    /// Forgets a domain, as Xen does when it destroys one: later maps, copies and binds
    /// for it fail (`GNTST_bad_domain`, [`PlatformError::UnknownDomain`]); mappings and
    /// event channels still held stay valid until dropped.
    pub fn detach(&self, domid: DomId) -> Result<(), PlatformError> {
        match self.remove(domid) {
            Some(_) => {
                tracing::info!(domid, "simulated guest detached");
                Ok(())
            }
            None => Err(PlatformError::UnknownDomain(domid)),
        }
    }

    /// Event channels the backend holds bound to a guest port, over every attached
    /// domain: zero once every ring is down (what a leak check reads).
    pub fn bound_event_channels(&self) -> usize {
        let domains: Vec<Arc<SimDomain>> = self
            .inner
            .domains
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        domains
            .iter()
            .map(|d| d.control().ports.values().filter(|p| p.bound).count())
            .sum()
    }

    /// The handle of an attached domain.
    pub fn domain(&self, domid: DomId) -> Option<DomainHandle> {
        self.lookup(domid).map(|dom| DomainHandle { dom })
    }

    /// Attached domain ids.
    pub fn domains(&self) -> Vec<DomId> {
        let mut v: Vec<DomId> = self
            .inner
            .domains
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        v.sort_unstable();
        v
    }

    fn lookup(&self, domid: DomId) -> Option<Arc<SimDomain>> {
        self.inner
            .domains
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&domid)
            .cloned()
    }
}

fn check_sealed_memfd(fd: &OwnedFd, min_len: u64, what: &str) -> Result<(), PlatformError> {
    let st = rustix::fs::fstat(fd).map_err(|e| PlatformError::io("fstat memfd", e))?;
    let size = u64::try_from(st.st_size).unwrap_or(0);
    if size < min_len {
        return Err(PlatformError::Protocol(format!(
            "{what}: {size} bytes, need {min_len}"
        )));
    }
    let seals = rustix::fs::fcntl_get_seals(fd)
        .map_err(|_| PlatformError::Protocol(format!("{what}: not a sealable memfd")))?;
    if !seals.contains(SealFlags::SHRINK) {
        return Err(PlatformError::Protocol(format!(
            "{what}: not sealed against shrinking"
        )));
    }
    Ok(())
}

impl Platform for SimPlatform {
    fn xenstore_endpoint(&self) -> Result<XenstoreEndpoint, PlatformError> {
        match &*self
            .inner
            .xenstore
            .read()
            .unwrap_or_else(|p| p.into_inner())
        {
            Some(p) => Ok(XenstoreEndpoint::UnixSocket(p.clone())),
            None => Err(PlatformError::NoXenstore { tried: Vec::new() }),
        }
    }

    fn name(&self) -> &'static str {
        "sim"
    }
}

#[cfg(test)]
mod death_tests;
#[cfg(test)]
mod tests;
