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

mod acceptor;
mod guest;
mod vm;
mod wire;

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use rustix::fs::{FileType, SealFlags};
use shmem::{SharedMemory, PAGE_SIZE};

use crate::grant_table::{self, ActiveTable, PinKind};
use crate::{
    Access, CopyBuffer, CopyDirection, CopySegment, DomId, EventChannel, EventChannelBinder,
    GrantCopyOp, GrantMapper, GrantMapping, GrantRef, GrantStatus, MapError, Platform,
    PlatformError, Port, XenstoreEndpoint, DOMID_FIRST_RESERVED, MAX_MAP_BATCH,
};

pub use acceptor::{AcceptorStats, GuestHello, SimAcceptor, MAX_PENDING_HANDSHAKES};
pub use guest::{GuestConfig, GuestError, GuestEventChannel, SimGuest};

/// Largest guest the backend accepts (pages): 16 GiB.
pub const MAX_GUEST_FRAMES: u32 = 1 << 22;
/// Largest grant table the backend accepts (entries): 128 frames of v1 entries.
pub const MAX_GRANT_ENTRIES: u32 = 128 * grant_table::ENTRIES_PER_FRAME_U32;
/// Most event channels one guest may announce; more are refused (the guest cannot make
/// the backend hold unbounded descriptors).
pub const MAX_PORTS_PER_DOMAIN: usize = 1024;
/// How long the backend waits for a connecting guest's hello, and a guest for the answer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A count of something held, with a limit the simulated platform enforces.
#[derive(Debug)]
struct Limited {
    held: AtomicUsize,
    limit: AtomicUsize,
    /// Takes refused because they would have gone past `limit`.
    refusals: AtomicU64,
}

impl Default for Limited {
    fn default() -> Self {
        Self {
            held: AtomicUsize::new(0),
            limit: AtomicUsize::new(usize::MAX),
            refusals: AtomicU64::new(0),
        }
    }
}

impl Limited {
    /// Takes `n` if the total stays within the limit; counts a refusal otherwise.
    fn take(&self, n: usize) -> bool {
        let limit = self.limit.load(Ordering::Acquire);
        let mut held = self.held.load(Ordering::Acquire);
        loop {
            if held.saturating_add(n) > limit {
                self.refusals.fetch_add(1, Ordering::AcqRel);
                return false;
            }
            match self.held.compare_exchange_weak(
                held,
                held + n,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => held = now,
            }
        }
    }

    fn release(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::AcqRel);
    }

    fn get(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

/// Live grant-mapping accounting shared with every mapping's release callback.
#[derive(Debug, Default)]
struct Counters {
    mappings: AtomicUsize,
    /// Grant pages mapped: on Xen, entries of the backend domain's map-tracking table
    /// ([`SimPlatform::set_grant_page_limit`]).
    pages: Limited,
    /// VMAs the grant mappings occupy (one per `mmap`: per run of consecutive frames;
    /// [`SimPlatform::set_grant_vma_limit`]).
    vmas: Limited,
}

impl Counters {
    /// Takes what a mapping of `pages` pages in `vmas` VMAs costs before it is made:
    /// refused with the status Xen gives when the backend's map-tracking table is full
    /// (`GNTST_no_device_space`), or with ENOMEM as from `mmap` once a process holds
    /// `vm.max_map_count` VMAs.
    fn take(&self, domid: DomId, refs: &[GrantRef], vmas: usize) -> Result<(), MapError> {
        let pages = refs.len();
        if !self.pages.take(pages) {
            return Err(MapError::Grant {
                domid,
                index: 0,
                gref: refs[0],
                count: pages,
                status: GrantStatus::NO_DEVICE_SPACE,
            });
        }
        if !self.vmas.take(vmas) {
            self.pages.release(pages);
            return Err(MapError::AddressSpace {
                pages,
                source: std::io::Error::from_raw_os_error(libc::ENOMEM),
            });
        }
        Ok(())
    }

    fn release(&self, pages: usize, vmas: usize) {
        self.pages.release(pages);
        self.vmas.release(vmas);
    }
}

/// An event channel a guest offered (an unbound port on Xen).
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

    /// Simulates `vm.max_map_count` for the grant mappings: from now on a map that would
    /// make them occupy more than `limit` VMAs fails with ENOMEM, as `mmap` does in a
    /// process at its limit (`None`: no limit but the real one). The VMAs counted are
    /// those of grant mappings only (see [`SimPlatform::live_vmas`]); the rest of the
    /// process is what a backend's own reserve stands for.
    pub fn set_grant_vma_limit(&self, limit: Option<usize>) {
        self.inner
            .counters
            .vmas
            .limit
            .store(limit.unwrap_or(usize::MAX), Ordering::Release);
    }

    /// Simulates the size of the backend domain's map-tracking table (Xen's
    /// `gnttab_max_maptrack_frames` x 256 entries): from now on a map that would make
    /// more than `limit` grant pages mapped at once fails with `GNTST_no_device_space`, as
    /// Xen answers when the table is full (`None`: no limit).
    pub fn set_grant_page_limit(&self, limit: Option<usize>) {
        self.inner
            .counters
            .pages
            .limit
            .store(limit.unwrap_or(usize::MAX), Ordering::Release);
    }

    /// VMAs the live grant mappings occupy: one per `mmap`, so one per run of consecutive
    /// guest frames of a batch, and one per single grant.
    pub fn live_vmas(&self) -> usize {
        self.inner.counters.vmas.get()
    }

    /// Maps refused (ENOMEM) because of [`SimPlatform::set_grant_vma_limit`].
    pub fn vma_limit_refusals(&self) -> u64 {
        self.inner.counters.vmas.refusals.load(Ordering::Acquire)
    }

    /// Maps refused (`GNTST_no_device_space`) because of
    /// [`SimPlatform::set_grant_page_limit`].
    pub fn page_limit_refusals(&self) -> u64 {
        self.inner.counters.pages.refusals.load(Ordering::Acquire)
    }

    fn lookup(&self, domid: DomId) -> Option<Arc<SimDomain>> {
        self.inner
            .domains
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&domid)
            .cloned()
    }

    /// Maps one grant as a mapping of its own: one pin, one mmap (persistent grants and
    /// single indirect pages take this path).
    fn map_one(
        &self,
        dom: &Arc<SimDomain>,
        gref: GrantRef,
        access: Access,
    ) -> Result<GrantMapping, MapError> {
        let domid = dom.domid;
        let readonly = !access.is_writable();
        let frame = dom
            .active
            .pin(
                &dom.table,
                gref,
                self.inner.backend_domid,
                readonly,
                dom.nr_frames,
                PinKind::Map,
            )
            .map_err(|status| {
                tracing::debug!(domid, gref, %status, "grant map failed");
                MapError::Grant {
                    domid,
                    index: 0,
                    gref,
                    count: 1,
                    status,
                }
            })?;
        if let Err(e) = self.inner.counters.take(domid, &[gref], 1) {
            dom.active.unpin(&dom.table, gref, readonly);
            return Err(e);
        }
        let release = {
            let dom = dom.clone();
            let counters = self.inner.counters.clone();
            Box::new(move || {
                dom.active.unpin(&dom.table, gref, readonly);
                counters.mappings.fetch_sub(1, Ordering::AcqRel);
                counters.release(1, 1);
            })
        };
        match vm::map_frame(dom.memory.as_fd(), frame, access.is_writable(), release) {
            Ok(mem) => {
                self.inner.counters.mappings.fetch_add(1, Ordering::AcqRel);
                Ok(GrantMapping::new(mem, access, domid, 1, 1))
            }
            Err(source) => {
                // `release` was dropped unrun: undo the pin and the counts here.
                dom.active.unpin(&dom.table, gref, readonly);
                self.inner.counters.release(1, 1);
                Err(MapError::AddressSpace { pages: 1, source })
            }
        }
    }

    /// One grant copy, in Xen's order of checks: domain, entry (pin), page bounds.
    fn copy_one(&self, op: &mut GrantCopyOp<'_>) -> GrantStatus {
        let Some(dom) = self.lookup(op.domid()) else {
            return GrantStatus::BAD_DOMAIN;
        };
        let readonly = op.direction() == CopyDirection::FromGuest;
        let frame = match dom.active.pin(
            &dom.table,
            op.gref(),
            self.inner.backend_domid,
            readonly,
            dom.nr_frames,
            PinKind::Copy,
        ) {
            Ok(frame) => frame,
            Err(status) => return status,
        };
        let status = if op.fits_page() {
            let pos = frame as usize * PAGE_SIZE + usize::from(op.offset());
            match copy_bytes(&dom.memory_map, pos, op) {
                Ok(()) => GrantStatus::OKAY,
                Err(e) => {
                    tracing::error!(domid = dom.domid, gref = op.gref(), error = %e, "grant copy out of bounds");
                    GrantStatus::GENERAL_ERROR
                }
            }
        } else {
            GrantStatus::BAD_COPY_ARG
        };
        dom.active.unpin(&dom.table, op.gref(), readonly);
        status
    }

    /// One segment of [`GrantMapper::copy_segments`], checked like [`Self::copy_one`].
    fn copy_segment(
        &self,
        dom: &SimDomain,
        buffer: &mut CopyBuffer<'_>,
        seg: &CopySegment,
    ) -> GrantStatus {
        let readonly = seg.direction == CopyDirection::FromGuest;
        let frame = match dom.active.pin(
            &dom.table,
            seg.gref,
            self.inner.backend_domid,
            readonly,
            dom.nr_frames,
            PinKind::Copy,
        ) {
            Ok(frame) => frame,
            Err(status) => return status,
        };
        let len = usize::from(seg.len);
        let status = if !seg.fits_page() || !buffer.contains(seg.local, len) {
            GrantStatus::BAD_COPY_ARG
        } else {
            let pos = frame as usize * PAGE_SIZE + usize::from(seg.offset);
            let guest = &dom.memory_map;
            let done = match (seg.direction, buffer) {
                (CopyDirection::FromGuest, CopyBuffer::Shared(m)) => {
                    guest.copy_to(pos, m, seg.local, len)
                }
                (CopyDirection::ToGuest, CopyBuffer::Shared(m)) => {
                    m.copy_to(seg.local, guest, pos, len)
                }
                (CopyDirection::FromGuest, CopyBuffer::Private(b)) => {
                    guest.read(pos, &mut b[seg.local..seg.local + len])
                }
                (CopyDirection::ToGuest, CopyBuffer::Private(b)) => {
                    guest.write(pos, &b[seg.local..seg.local + len])
                }
            };
            match done {
                Ok(()) => GrantStatus::OKAY,
                Err(e) => {
                    tracing::error!(domid = dom.domid, gref = seg.gref, error = %e, "grant copy out of bounds");
                    GrantStatus::GENERAL_ERROR
                }
            }
        };
        dom.active.unpin(&dom.table, seg.gref, readonly);
        status
    }
}

/// Moves the bytes of one checked copy op through the backend's mapping of guest memory.
fn copy_bytes(
    memory: &SharedMemory,
    pos: usize,
    op: &mut GrantCopyOp<'_>,
) -> Result<(), shmem::OutOfBounds> {
    use crate::mapping::Local;
    let len = op.len();
    let direction = op.direction();
    match &mut op.local {
        Local::Dst(dst) => memory.read(pos, dst),
        Local::Src(src) => memory.write(pos, src),
        Local::Shared { mem, offset } => match direction {
            CopyDirection::FromGuest => memory.copy_to(pos, mem, *offset, len),
            CopyDirection::ToGuest => mem.copy_to(*offset, memory, pos, len),
        },
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

impl GrantMapper for SimPlatform {
    fn map(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        access: Access,
    ) -> Result<GrantMapping, MapError> {
        let count = refs.len();
        if count == 0 || count > MAX_MAP_BATCH {
            return Err(MapError::BadBatchSize {
                count,
                max: MAX_MAP_BATCH,
            });
        }
        let Some(dom) = self.lookup(domid) else {
            return Err(MapError::Grant {
                domid,
                index: 0,
                gref: refs[0],
                count,
                status: GrantStatus::BAD_DOMAIN,
            });
        };
        if count == 1 {
            return self.map_one(&dom, refs[0], access);
        }
        let readonly = !access.is_writable();
        let mut frames = Vec::with_capacity(count);
        for (index, &gref) in refs.iter().enumerate() {
            match dom.active.pin(
                &dom.table,
                gref,
                self.inner.backend_domid,
                readonly,
                dom.nr_frames,
                PinKind::Map,
            ) {
                Ok(frame) => frames.push(frame),
                Err(status) => {
                    for &g in &refs[..index] {
                        dom.active.unpin(&dom.table, g, readonly);
                    }
                    tracing::debug!(domid, index, gref, %status, "grant map failed");
                    return Err(MapError::Grant {
                        domid,
                        index,
                        gref,
                        count,
                        status,
                    });
                }
            }
        }
        // The frames were read once, by the pins: what the mapping costs is known before
        // any mmap, and cannot change under us.
        let vmas = vm::runs(&frames);
        let unpin_all = || {
            for &g in refs {
                dom.active.unpin(&dom.table, g, readonly);
            }
        };
        if let Err(e) = self.inner.counters.take(domid, refs, vmas) {
            unpin_all();
            return Err(e);
        }
        let release = {
            let dom = dom.clone();
            let refs = refs.to_vec();
            let counters = self.inner.counters.clone();
            Box::new(move || {
                for &g in &refs {
                    dom.active.unpin(&dom.table, g, readonly);
                }
                counters.mappings.fetch_sub(1, Ordering::AcqRel);
                counters.release(refs.len(), vmas);
            })
        };
        match vm::map_frames(dom.memory.as_fd(), &frames, access.is_writable(), release) {
            Ok(mem) => {
                self.inner.counters.mappings.fetch_add(1, Ordering::AcqRel);
                Ok(GrantMapping::new(mem, access, domid, count, vmas))
            }
            Err(source) => {
                // `release` was dropped unrun: undo the pins and the counts here.
                unpin_all();
                self.inner.counters.release(count, vmas);
                Err(MapError::AddressSpace {
                    pages: count,
                    source,
                })
            }
        }
    }

    fn copy(&self, ops: &mut [GrantCopyOp<'_>]) -> Result<(), PlatformError> {
        for op in ops.iter_mut() {
            let status = self.copy_one(op);
            op.set_status(status);
        }
        Ok(())
    }

    fn copy_segments(
        &self,
        mut buffer: CopyBuffer<'_>,
        segs: &mut [CopySegment],
    ) -> Result<(), PlatformError> {
        // One registry lookup per run of segments of the same domain (a request's
        // segments all name the frontend's domain).
        let mut dom: Option<Arc<SimDomain>> = None;
        for seg in segs.iter_mut() {
            if dom.as_ref().is_none_or(|d| d.domid != seg.domid) {
                dom = self.lookup(seg.domid);
            }
            seg.status = match &dom {
                Some(d) => self.copy_segment(d, &mut buffer, seg),
                None => GrantStatus::BAD_DOMAIN,
            };
        }
        Ok(())
    }

    fn map_each(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        access: Access,
    ) -> Result<Vec<GrantMapping>, MapError> {
        let count = refs.len();
        if count == 0 || count > MAX_MAP_BATCH {
            return Err(MapError::BadBatchSize {
                count,
                max: MAX_MAP_BATCH,
            });
        }
        // One registry lookup for the batch, then one mmap per page: each page is a
        // mapping of its own, which the persistent-grant purge unmaps on its own.
        let Some(dom) = self.lookup(domid) else {
            return Err(MapError::Grant {
                domid,
                index: 0,
                gref: refs[0],
                count,
                status: GrantStatus::BAD_DOMAIN,
            });
        };
        let mut out = Vec::with_capacity(count);
        for (index, &gref) in refs.iter().enumerate() {
            match self.map_one(&dom, gref, access) {
                Ok(m) => out.push(m),
                Err(e) => {
                    // Dropping `out` unmaps what was mapped: all or nothing.
                    return Err(e.rebase(index, count));
                }
            }
        }
        Ok(out)
    }

    fn live_mappings(&self) -> usize {
        self.inner.counters.mappings.load(Ordering::Acquire)
    }

    fn mapped_pages(&self) -> usize {
        self.inner.counters.pages.get()
    }
}

/// A bound simulated event channel: two eventfds shared with the guest.
#[derive(Debug)]
struct SimEventChannel {
    local_port: Port,
    remote_port: Port,
    to_backend: OwnedFd,
    to_guest: OwnedFd,
    dom: Arc<SimDomain>,
}

impl EventChannel for SimEventChannel {
    fn fd(&self) -> BorrowedFd<'_> {
        self.to_backend.as_fd()
    }

    fn notify(&self) -> Result<(), PlatformError> {
        signal_eventfd(&self.to_guest).map_err(|e| PlatformError::io("evtchn notify", e))
    }

    fn ack(&self) -> Result<bool, PlatformError> {
        drain_eventfd(&self.to_backend).map_err(|e| PlatformError::io("evtchn ack", e))
    }

    fn local_port(&self) -> Port {
        self.local_port
    }

    fn remote(&self) -> (DomId, Port) {
        (self.dom.domid, self.remote_port)
    }
}

impl Drop for SimEventChannel {
    fn drop(&mut self) {
        // Back to "unbound": the frontend may be bound again after a reconnect.
        if let Some(p) = self.dom.control().ports.get_mut(&self.remote_port) {
            p.bound = false;
        }
    }
}

/// Adds 1 to an eventfd. A full counter (2^64-2 pending) already reads as pending.
pub(crate) fn signal_eventfd(fd: &OwnedFd) -> std::io::Result<()> {
    match rustix::io::write(fd, &1u64.to_ne_bytes()) {
        Ok(_) | Err(rustix::io::Errno::AGAIN) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Reads (and so resets) a non-blocking eventfd; `true` if it was signalled.
pub(crate) fn drain_eventfd(fd: &OwnedFd) -> std::io::Result<bool> {
    let mut b = [0u8; 8];
    loop {
        return match rustix::io::read(fd, &mut b) {
            Ok(_) => Ok(true),
            Err(rustix::io::Errno::AGAIN) => Ok(false),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => Err(e.into()),
        };
    }
}

impl EventChannelBinder for SimPlatform {
    fn bind_interdomain(
        &self,
        domid: DomId,
        remote_port: Port,
    ) -> Result<Box<dyn EventChannel>, PlatformError> {
        let dom = self
            .lookup(domid)
            .ok_or(PlatformError::UnknownDomain(domid))?;
        let bad = |reason| PlatformError::BadPort {
            domid,
            port: remote_port,
            reason,
        };
        let mut ctl = dom.control();
        if !ctl.ports.contains_key(&remote_port) {
            dom.drain_control(&mut ctl);
        }
        let p = ctl
            .ports
            .get_mut(&remote_port)
            .ok_or_else(|| bad("no such unbound port"))?;
        if p.remote_domid != self.inner.backend_domid {
            return Err(bad("port is offered to another domain"));
        }
        if p.bound {
            return Err(bad("port is already bound"));
        }
        let to_backend = p
            .to_backend
            .try_clone()
            .map_err(|e| PlatformError::io("dup eventfd", e))?;
        let to_guest = p
            .to_guest
            .try_clone()
            .map_err(|e| PlatformError::io("dup eventfd", e))?;
        p.bound = true;
        drop(ctl);
        let local_port = self.inner.next_port.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(domid, remote_port, local_port, "event channel bound");
        Ok(Box::new(SimEventChannel {
            local_port,
            remote_port,
            to_backend,
            to_guest,
            dom,
        }))
    }
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
mod tests;
