//! The simulated guest: its memory, its grant table and its event channels — the part of
//! a Xen guest a block frontend uses, with Linux `gnttab`-like calls.
//!
//! The guest is the hostile side of every test, so besides the well-behaved calls
//! ([`SimGuest::grant_access`], [`SimGuest::end_access`]) it can write any raw grant
//! entry ([`SimGuest::write_raw_entry`]).

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use eventfd::EventFd;
use rustix::fs::{MemfdFlags, SealFlags};
use rustix::pipe::PipeFlags;
use shmem::{OutOfBounds, SharedMemory, PAGE_SIZE};

use super::{vm, wire, HANDSHAKE_TIMEOUT, MAX_PORTS_PER_DOMAIN};
use crate::grant_table::{self, EndAccessError, GrantEntryV1};
use crate::{DomId, GrantRef, Port};

/// Size of a simulated guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestConfig {
    /// Guest memory in 4 KiB pages (frames `0..pages`).
    pub pages: u32,
    /// Grant-table entries (refs `0..grant_entries`; 0..8 are reserved).
    pub grant_entries: u32,
}

impl Default for GuestConfig {
    /// 1 MiB of memory, 4 grant frames (2048 entries).
    fn default() -> Self {
        Self {
            pages: 256,
            grant_entries: 4 * grant_table::ENTRIES_PER_FRAME_U32,
        }
    }
}

/// Errors of the simulated guest's own calls.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("guest memory access outside frames 0..{nr_frames}: frame {frame}, offset {offset}, {len} bytes")]
    OutOfRange {
        frame: u32,
        offset: usize,
        len: usize,
        nr_frames: u32,
    },
    #[error("grant table is full")]
    GrantTableFull,
    #[error("grant {0} is not granted by this guest")]
    NotGranted(GrantRef),
    #[error(transparent)]
    EndAccess(#[from] EndAccessError),
    #[error("the guest is not connected to a backend")]
    NotConnected,
    #[error("too many event channels")]
    TooManyPorts,
    #[error("the backend refused the guest (status {0})")]
    Refused(i32),
    #[error("attach protocol: {0}")]
    Protocol(String),
    #[error("invalid guest configuration: {0}")]
    Config(&'static str),
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn io(op: &'static str) -> impl FnOnce(rustix::io::Errno) -> GuestError {
    move |e| GuestError::Io {
        op,
        source: e.into(),
    }
}

#[derive(Debug)]
struct GrefAlloc {
    free: Vec<GrantRef>,
    in_use: Vec<bool>,
}

/// The guest's side of its attachment to one backend process, shared with its event
/// channels (which announce and withdraw ports on it) and with whoever watches for the
/// backend's death ([`SimGuest::wait_backend_death`]).
#[derive(Debug, Default)]
struct Link {
    /// The attach socket to the current backend; `None` while no backend process holds
    /// us. An `Arc` so the death watch polls it without holding the lock.
    stream: Option<Arc<UnixStream>>,
    /// Every live port with its own copies of its eventfds: what the guest offers again
    /// to the next backend process (on Xen the port stays the guest's when the backend's
    /// end closes, and a new backend binds an interdomain channel to it).
    ports: HashMap<Port, OfferedPort>,
}

#[derive(Debug)]
struct OfferedPort {
    remote_domid: DomId,
    to_backend: EventFd,
    to_guest: EventFd,
}

type SharedControl = Arc<Mutex<Link>>;

/// What the simulated hypervisor released when the guest's backend process died.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendDeath {
    /// Grant entries the dead process had pinned (`GTF_reading`/`GTF_writing` cleared).
    pub pins_released: usize,
    /// Ports whose backend end closed; each is the guest's still, unbound.
    pub ports_unbound: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A simulated guest domain.
#[derive(Debug)]
pub struct SimGuest {
    domid: DomId,
    nr_frames: u32,
    nr_entries: u32,
    memory_fd: OwnedFd,
    memory: SharedMemory,
    table_fd: OwnedFd,
    table: SharedMemory,
    /// Sent to the backend; its write twin below is never written: when this process
    /// dies the kernel closes it and the backend's copy of the read end hangs up.
    liveness_read: OwnedFd,
    _liveness_write: OwnedFd,
    grefs: Mutex<GrefAlloc>,
    end_access_failures: AtomicU64,
    control: SharedControl,
    backend_domid: Mutex<Option<DomId>>,
    next_port: AtomicU32,
}

impl SimGuest {
    /// A guest with zeroed memory and an empty grant table, not yet attached.
    pub fn new(domid: DomId, config: GuestConfig) -> Result<Self, GuestError> {
        if config.pages == 0 || config.pages > super::MAX_GUEST_FRAMES {
            return Err(GuestError::Config("pages must be 1..=MAX_GUEST_FRAMES"));
        }
        if config.grant_entries <= grant_table::NR_RESERVED_ENTRIES
            || config.grant_entries > super::MAX_GRANT_ENTRIES
        {
            return Err(GuestError::Config(
                "grant_entries must be 9..=MAX_GRANT_ENTRIES",
            ));
        }
        let mem_len = config.pages as usize * PAGE_SIZE;
        let table_len = config.grant_entries as usize * grant_table::ENTRY_SIZE;
        let memory_fd = sealed_memfd("xenblkd-sim-guest-memory", mem_len)?;
        let table_fd = sealed_memfd(
            "xenblkd-sim-grant-table",
            table_len.div_ceil(PAGE_SIZE) * PAGE_SIZE,
        )?;
        let memory = vm::map_file(memory_fd.as_fd(), mem_len).map_err(|e| GuestError::Io {
            op: "mmap guest memory",
            source: e,
        })?;
        let table = vm::map_file(table_fd.as_fd(), table_len).map_err(|e| GuestError::Io {
            op: "mmap grant table",
            source: e,
        })?;
        let (liveness_read, liveness_write) =
            rustix::pipe::pipe_with(PipeFlags::CLOEXEC).map_err(io("pipe"))?;
        // Hand out high refs last, like a fresh Linux free list; reserved entries never.
        let free = (grant_table::NR_RESERVED_ENTRIES..config.grant_entries)
            .rev()
            .collect();
        Ok(Self {
            domid,
            nr_frames: config.pages,
            nr_entries: config.grant_entries,
            memory_fd,
            memory,
            table_fd,
            table,
            liveness_read,
            _liveness_write: liveness_write,
            grefs: Mutex::new(GrefAlloc {
                free,
                in_use: vec![false; config.grant_entries as usize],
            }),
            end_access_failures: AtomicU64::new(0),
            control: Arc::default(),
            backend_domid: Mutex::new(None),
            next_port: AtomicU32::new(1),
        })
    }

    /// Creates a guest and attaches it to the backend listening on `socket`
    /// (`SimPlatform::accept`), typically from another process.
    pub fn connect(
        socket: impl AsRef<Path>,
        domid: DomId,
        config: GuestConfig,
    ) -> Result<Self, GuestError> {
        let guest = Self::new(domid, config)?;
        let stream = UnixStream::connect(socket.as_ref()).map_err(|e| GuestError::Io {
            op: "connect",
            source: e,
        })?;
        guest.connect_stream(stream)?;
        Ok(guest)
    }

    /// Attaches over an already connected stream.
    pub fn connect_stream(&self, stream: UnixStream) -> Result<(), GuestError> {
        self.send_hello(&stream)?;
        self.finish_connect(stream)
    }

    pub(crate) fn send_hello(&self, stream: &UnixStream) -> Result<(), GuestError> {
        if lock(&self.control).stream.is_some() {
            return Err(GuestError::Protocol("already connected".into()));
        }
        let hello = wire::Msg::Hello {
            version: wire::VERSION,
            domid: self.domid,
            nr_frames: self.nr_frames,
            nr_entries: self.nr_entries,
        };
        wire::send(
            stream,
            hello,
            &[
                self.memory_fd.as_fd(),
                self.table_fd.as_fd(),
                self.liveness_read.as_fd(),
            ],
        )
        .map_err(|e| GuestError::Io {
            op: "send hello",
            source: e,
        })
    }

    pub(crate) fn finish_connect(&self, stream: UnixStream) -> Result<(), GuestError> {
        stream
            .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(|e| GuestError::Io {
                op: "set_read_timeout",
                source: e,
            })?;
        match wire::recv(&stream).map_err(GuestError::Protocol)? {
            wire::Recv::Msg(
                wire::Msg::Welcome {
                    status: 0,
                    backend_domid,
                },
                _,
            ) => {
                *lock(&self.backend_domid) = Some(backend_domid);
                let mut link = lock(&self.control);
                // A backend process that replaces a dead one learns the ports it may
                // bind again, with their eventfds: read lazily, like any announcement.
                for (&port, p) in &link.ports {
                    // Kicks the dead process never read, and those sent since, went to
                    // a port nobody bound: lost, as on Xen. The new backend must look
                    // at the ring by itself.
                    p.to_backend.drain();
                    wire::send(
                        &stream,
                        wire::Msg::PortAlloc {
                            port,
                            remote_domid: p.remote_domid,
                        },
                        &[p.to_backend.as_fd(), p.to_guest.as_fd()],
                    )
                    .map_err(|e| GuestError::Io {
                        op: "offer event channel again",
                        source: e,
                    })?;
                }
                link.stream = Some(Arc::new(stream));
                Ok(())
            }
            wire::Recv::Msg(wire::Msg::Welcome { status, .. }, _) => {
                Err(GuestError::Refused(status))
            }
            other => Err(GuestError::Protocol(format!(
                "expected welcome, got {other:?}"
            ))),
        }
    }

    pub fn domid(&self) -> DomId {
        self.domid
    }

    #[cfg(test)]
    pub(crate) fn memory_fd_for_test(&self) -> std::os::fd::BorrowedFd<'_> {
        self.memory_fd.as_fd()
    }

    #[cfg(test)]
    pub(crate) fn table_fd_for_test(&self) -> std::os::fd::BorrowedFd<'_> {
        self.table_fd.as_fd()
    }

    #[cfg(test)]
    pub(crate) fn liveness_fd_for_test(&self) -> std::os::fd::BorrowedFd<'_> {
        self.liveness_read.as_fd()
    }

    /// The backend's domid, once attached.
    pub fn backend_domid(&self) -> Option<DomId> {
        *lock(&self.backend_domid)
    }

    /// Guest memory size in pages.
    pub fn pages(&self) -> u32 {
        self.nr_frames
    }

    pub fn grant_entries(&self) -> u32 {
        self.nr_entries
    }

    /// All of guest memory (frame `f` at offset `f * PAGE_SIZE`), for a simulated
    /// frontend's rings and buffers.
    pub fn memory(&self) -> &SharedMemory {
        &self.memory
    }

    /// Maps guest frames `first..first + count` as one region of `count` pages: the
    /// guest's own view of them (a frontend's multi-page ring), shared with every other
    /// view of guest memory and with the backend's grant mappings of those frames. The
    /// region is a mapping of its own, unmapped when the value is dropped, so it may
    /// outlive this `SimGuest`.
    pub fn map_frames(&self, first: u32, count: u32) -> Result<SharedMemory, GuestError> {
        let oob = GuestError::OutOfRange {
            frame: first,
            offset: 0,
            len: count as usize * PAGE_SIZE,
            nr_frames: self.nr_frames,
        };
        match first.checked_add(count) {
            Some(end) if count > 0 && end <= self.nr_frames => {}
            _ => return Err(oob),
        }
        let frames: Vec<u32> = (first..first + count).collect();
        // The memfd is sealed against shrinking and holds `nr_frames` pages (checked
        // above), which is what `map_frames` requires.
        vm::map_frames(self.memory_fd.as_fd(), &frames, true, Box::new(|| {})).map_err(|e| {
            GuestError::Io {
                op: "mmap guest frames",
                source: e,
            }
        })
    }

    fn page_offset(&self, frame: u32, offset: usize, len: usize) -> Result<usize, GuestError> {
        let oob = GuestError::OutOfRange {
            frame,
            offset,
            len,
            nr_frames: self.nr_frames,
        };
        match offset.checked_add(len) {
            Some(end) if frame < self.nr_frames && end <= PAGE_SIZE => {
                Ok(frame as usize * PAGE_SIZE + offset)
            }
            _ => Err(oob),
        }
    }

    /// Writes `data` at `offset` of page `frame`.
    pub fn write_page(&self, frame: u32, offset: usize, data: &[u8]) -> Result<(), GuestError> {
        let at = self.page_offset(frame, offset, data.len())?;
        self.memory.write(at, data).map_err(oob_bug)
    }

    /// Reads `buf.len()` bytes at `offset` of page `frame`.
    pub fn read_page(&self, frame: u32, offset: usize, buf: &mut [u8]) -> Result<(), GuestError> {
        let at = self.page_offset(frame, offset, buf.len())?;
        self.memory.read(at, buf).map_err(oob_bug)
    }

    /// Fills page `frame` with `byte`.
    pub fn fill_page(&self, frame: u32, byte: u8) -> Result<(), GuestError> {
        let at = self.page_offset(frame, 0, PAGE_SIZE)?;
        self.memory.fill(at, PAGE_SIZE, byte).map_err(oob_bug)
    }

    /// Grants `domid` access to page `frame` (`gnttab_grant_foreign_access`). The frame is
    /// not checked against guest memory: a hostile guest may grant anything, and the
    /// hypervisor's map check is what must catch it.
    pub fn grant_access(
        &self,
        domid: DomId,
        frame: u32,
        readonly: bool,
    ) -> Result<GrantRef, GuestError> {
        let gref = {
            let mut a = lock(&self.grefs);
            let gref = a.free.pop().ok_or(GuestError::GrantTableFull)?;
            a.in_use[gref as usize] = true;
            gref
        };
        grant_table::grant_access(&self.table, gref, domid, frame, readonly).map_err(oob_bug)?;
        Ok(gref)
    }

    /// Revokes a grant (`gnttab_end_foreign_access_ref`): fails, and is counted, while
    /// the backend still has it mapped. The ref is reusable only after success.
    pub fn end_access(&self, gref: GrantRef) -> Result<(), GuestError> {
        let mut a = lock(&self.grefs);
        if !a.in_use.get(gref as usize).copied().unwrap_or(false) {
            return Err(GuestError::NotGranted(gref));
        }
        match grant_table::end_access(&self.table, gref) {
            Ok(()) => {
                a.in_use[gref as usize] = false;
                a.free.push(gref);
                Ok(())
            }
            Err(e) => {
                self.end_access_failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(domid = self.domid, gref, "end_access while still in use");
                Err(e.into())
            }
        }
    }

    /// How many `end_access` calls failed because the grant was still in use.
    pub fn end_access_failures(&self) -> u64 {
        self.end_access_failures.load(Ordering::Relaxed)
    }

    /// Reads grant entry `gref` as it is now (flags show `GTF_reading`/`GTF_writing`).
    pub fn grant_entry(&self, gref: GrantRef) -> Result<GrantEntryV1, OutOfBounds> {
        grant_table::read_entry(&self.table, gref)
    }

    /// Writes a raw grant entry, bypassing the allocator: the hostile guest's tool.
    pub fn write_raw_entry(&self, gref: GrantRef, entry: GrantEntryV1) -> Result<(), OutOfBounds> {
        self.table
            .write(gref as usize * grant_table::ENTRY_SIZE, &entry.to_bytes())
    }

    /// Whether a backend process holds the guest (attached, and not seen to die since).
    pub fn is_attached(&self) -> bool {
        lock(&self.control).stream.is_some()
    }

    /// Waits up to `timeout` for the backend process to let go of the guest, and if it
    /// did, releases what it held as Xen does ([`BackendDeath`]); `None` if it is still
    /// there (or the guest is not attached).
    ///
    /// The backend's end of the attach socket is the signal: the kernel closes it when
    /// the process dies, however it dies (`kill -9` included), and a live process keeps
    /// it as long as it holds anything of the guest's (the platform's record of the
    /// domain owns the socket, and every grant mapping, copy in progress and bound event
    /// channel owns that record). So when it closes, no pin in the grant table can belong
    /// to a live mapping of that process.
    ///
    /// What Xen does for a dead process, the guest does here for the simulated
    /// hypervisor: every pin the process held is released (`GTF_reading`/`GTF_writing`
    /// cleared, so `end_access` succeeds again), and its event-channel ends are gone, so
    /// the guest's ports are unbound: a notify goes nowhere (not an error), a kick sent
    /// before the next backend binds is lost, and the port numbers stay the guest's for
    /// the next backend to bind. Memory, grant entries, rings and xenstore are untouched.
    ///
    /// The pins released are those on entries granted to the backend's domain. They are
    /// exactly the dead process's: the guest is attached to one backend process at a time
    /// and attaches to the next only after this release ([`SimGuest::reattach`]), so no
    /// other process can have pinned anything yet.
    pub fn wait_backend_death(&self, timeout: Duration) -> Option<BackendDeath> {
        let stream = lock(&self.control).stream.clone()?;
        if !wire::wait_readable(stream.as_fd(), timeout) || !wire::peer_closed(&stream) {
            return None;
        }
        Some(self.release_backend(&stream))
    }

    fn release_backend(&self, dead: &Arc<UnixStream>) -> BackendDeath {
        let mut link = lock(&self.control);
        if !link.stream.as_ref().is_some_and(|s| Arc::ptr_eq(s, dead)) {
            return BackendDeath::default();
        }
        link.stream = None;
        let pins_released = match *lock(&self.backend_domid) {
            Some(backend) => grant_table::release_pins(&self.table, self.nr_entries, backend),
            None => 0,
        };
        tracing::info!(
            domid = self.domid,
            pins_released,
            ports = link.ports.len(),
            "backend process gone; its pins are released and the ports unbound"
        );
        BackendDeath {
            pins_released,
            ports_unbound: link.ports.len(),
        }
    }

    /// Attaches again, to whichever backend process now listens on `socket`, after the
    /// previous one died ([`SimGuest::wait_backend_death`]): the same handshake, the same
    /// memory and grant table, and every live port offered again with its eventfds, for
    /// the new process to bind to the port number the frontend published.
    pub fn reattach(&self, socket: impl AsRef<Path>) -> Result<(), GuestError> {
        let stream = UnixStream::connect(socket.as_ref()).map_err(|e| GuestError::Io {
            op: "connect",
            source: e,
        })?;
        self.connect_stream(stream)
    }

    /// Allocates an unbound event-channel port for `remote_domid` to bind
    /// (`EVTCHNOP_alloc_unbound`). Needs an attached guest: the port's eventfds travel to
    /// the backend over the attach socket.
    pub fn alloc_event_channel(
        &self,
        remote_domid: DomId,
    ) -> Result<GuestEventChannel, GuestError> {
        let mut ctl = lock(&self.control);
        let stream = ctl.stream.clone().ok_or(GuestError::NotConnected)?;
        let port = self.next_port.fetch_add(1, Ordering::Relaxed);
        if port as usize > MAX_PORTS_PER_DOMAIN {
            return Err(GuestError::TooManyPorts);
        }
        let eventfd = || {
            EventFd::new().map_err(|source| GuestError::Io {
                op: "eventfd",
                source,
            })
        };
        let to_backend = eventfd()?;
        let to_guest = eventfd()?;
        wire::send(
            &stream,
            wire::Msg::PortAlloc { port, remote_domid },
            &[to_backend.as_fd(), to_guest.as_fd()],
        )
        .map_err(|e| GuestError::Io {
            op: "announce event channel",
            source: e,
        })?;
        let dup = |fd: &EventFd| {
            fd.try_clone().map_err(|e| GuestError::Io {
                op: "dup eventfd",
                source: e,
            })
        };
        ctl.ports.insert(
            port,
            OfferedPort {
                remote_domid,
                to_backend: dup(&to_backend)?,
                to_guest: dup(&to_guest)?,
            },
        );
        drop(ctl);
        Ok(GuestEventChannel {
            port,
            remote_domid,
            to_backend,
            to_guest,
            control: self.control.clone(),
        })
    }
}

fn oob_bug(e: OutOfBounds) -> GuestError {
    // Unreachable after the range checks above; reported, not panicked on.
    GuestError::Protocol(format!("internal bounds error: {e}"))
}

fn sealed_memfd(name: &str, len: usize) -> Result<OwnedFd, GuestError> {
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)
        .map_err(io("memfd_create"))?;
    rustix::fs::ftruncate(&fd, len as u64).map_err(io("ftruncate memfd"))?;
    // The backend maps this file: it must never shrink under its mappings.
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
        .map_err(io("seal memfd"))?;
    Ok(fd)
}

/// The guest's end of an event channel.
#[derive(Debug)]
pub struct GuestEventChannel {
    port: Port,
    remote_domid: DomId,
    to_backend: EventFd,
    to_guest: EventFd,
    control: SharedControl,
}

impl GuestEventChannel {
    /// The port number to publish (the frontend's `event-channel` node).
    pub fn port(&self) -> Port {
        self.port
    }

    pub fn remote_domid(&self) -> DomId {
        self.remote_domid
    }

    /// Kicks the backend.
    pub fn notify(&self) -> std::io::Result<()> {
        self.to_backend.signal()
    }

    /// Pollable fd, readable when the backend notified.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.to_guest.as_fd()
    }

    /// Consumes a pending notification; `true` if there was one.
    pub fn try_ack(&self) -> std::io::Result<bool> {
        self.to_guest.try_drain().map(|pending| pending > 0)
    }

    /// Waits up to `timeout` for a notification and consumes it; `false` on timeout.
    pub fn wait(&self, timeout: Duration) -> std::io::Result<bool> {
        // Poll first: a pending notification returns at once, and an idle channel costs
        // one poll and no failed read.
        if !wire::wait_readable(self.to_guest.as_fd(), timeout) {
            return Ok(false);
        }
        self.try_ack()
    }
}

impl Drop for GuestEventChannel {
    fn drop(&mut self) {
        let mut link = lock(&self.control);
        link.ports.remove(&self.port);
        if let Some(stream) = link.stream.as_ref() {
            // Best effort: a gone backend needs no notice.
            let _ = wire::send(stream, wire::Msg::PortClose { port: self.port }, &[]);
        }
    }
}
