//! The block device a guest program sees: synchronous and asynchronous I/O over the queues.
//!
//! This module owns what Linux's block layer and blk-mq glue do around xen-blkfront:
//! checking offsets and lengths against the logical block size and the disk size, refusing
//! writes to a read-only disk, splitting an I/O into ring requests
//! ([`crate::layout::split`]), choosing a queue, and waiting for completions. It also
//! owns building the queues' rings, grants and event channels, and the direct connection
//! (no xenstore) that tests hand to the engine.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use blkif::FrontRing;
use tracing::{debug, info, warn};

use crate::config::{FrontendConfig, Protocol};
use crate::error::{Error, TeardownReport};
use crate::features::{self, BackendFeatures, CacheControl, DiskInfo, Negotiated};
use crate::guest::{GrantRef, Guest, Port};
use crate::layout::{self, PAGE_SIZE};
use crate::queue::{
    AtomicStats, Completion, FrontendStats, IoOp, Queue, QueueResources, ReadData, Shared,
    WriteData,
};

mod batch;
mod plan;
mod submit;

pub use batch::Batch;

/// What the backend engine needs to serve one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConnectInfo {
    /// Grant references of the ring pages, in order (`ring-ref` / `ring-ref%u`).
    pub ring_refs: Vec<GrantRef>,
    /// The unbound port the backend binds (`event-channel`).
    pub event_channel: Port,
}

/// What the frontend tells the backend when connecting: the contents of its xenstore
/// nodes, handed straight to the engine in direct mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectInfo {
    /// The ABI requests are encoded in (`protocol`).
    pub protocol: Protocol,
    /// `ring-page-order`.
    pub ring_order: u32,
    /// The frontend uses persistent grants (`feature-persistent`).
    pub persistent: bool,
    /// One entry per queue (`multi-queue-num-queues` of them).
    pub queues: Vec<QueueConnectInfo>,
}

/// A connected virtual block device, seen from the guest.
///
/// Synchronous calls (`read`, `write`, `flush`, `discard`) may come from many threads;
/// each picks a queue by [`QueuePolicy`] and holds it while its requests are in flight.
/// The asynchronous calls name their queue, so a benchmark thread per queue keeps its own
/// queue depth without contention.
pub struct Frontend {
    shared: Arc<Shared>,
    config: FrontendConfig,
    negotiated: Negotiated,
    disk: DiskInfo,
    sectors: AtomicU64,
    queues: Vec<Mutex<Queue>>,
    round_robin: AtomicUsize,
    /// No new requests (the backend is closing); completions are still reaped.
    stopped: AtomicBool,
    closed: AtomicBool,
}

/// Longest single wait on an event channel; see [`Frontend::wait_completions`].
const WAIT_SLICE: Duration = Duration::from_millis(10);

thread_local! {
    static THREAD_SLOT: Cell<Option<usize>> = const { Cell::new(None) };
}
static NEXT_THREAD_SLOT: AtomicUsize = AtomicUsize::new(0);

impl std::fmt::Debug for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frontend")
            .field("negotiated", &self.negotiated)
            .field("disk", &self.disk())
            .finish_non_exhaustive()
    }
}

/// Builds one queue's ring, grants and event channel (`setup_blkring`).
pub(crate) fn build_queue(
    guest: &Arc<dyn Guest>,
    config: &FrontendConfig,
    ring_order: u32,
) -> Result<QueueResources, Error> {
    let pages = 1usize << ring_order;
    let frames = guest.alloc_frames(pages)?;
    let mut grefs = Vec::with_capacity(pages);
    let cleanup = |grefs: &[GrantRef]| {
        for &g in grefs {
            let _ = guest.end_access(g);
        }
        guest.free_frames(&frames);
    };
    let ring = match guest
        .map_frames(&frames)
        .map_err(Error::from)
        .and_then(|mem| {
            FrontRing::new(mem, config.protocol)
                .map_err(|source| Error::RingHalted { queue: 0, source })
        }) {
        Ok(r) => r,
        Err(e) => {
            cleanup(&grefs);
            return Err(e);
        }
    };
    for &f in &frames {
        match guest.grant_access(config.backend_domid, f, false) {
            Ok(g) => grefs.push(g),
            Err(e) => {
                drop(ring);
                cleanup(&grefs);
                return Err(e.into());
            }
        }
    }
    let evtchn = match guest.alloc_event_channel(config.backend_domid) {
        Ok(c) => c,
        Err(e) => {
            drop(ring);
            cleanup(&grefs);
            return Err(e.into());
        }
    };
    Ok(QueueResources {
        ring,
        ring_frames: frames,
        ring_grefs: grefs,
        evtchn: Arc::from(evtchn),
    })
}

impl Frontend {
    /// Connects without xenstore: negotiates against `backend` (what the test is about to
    /// start the engine with), builds the rings, and returns the frontend together with
    /// the [`ConnectInfo`] the engine needs.
    pub fn connect_direct(
        guest: Arc<dyn Guest>,
        config: FrontendConfig,
        backend: &BackendFeatures,
    ) -> Result<(Frontend, ConnectInfo), Error> {
        let queues = features::negotiate_queues(&config, backend.max_queues);
        let order = features::negotiate_ring_order(&config, backend.max_ring_page_order);
        let mut built = Vec::with_capacity(queues as usize);
        for _ in 0..queues {
            match build_queue(&guest, &config, order) {
                Ok(q) => built.push(q),
                Err(e) => {
                    release_resources(&guest, built);
                    return Err(e);
                }
            }
        }
        let negotiated = features::negotiate(&config, backend, queues, order);
        let disk = features::disk_info(backend)
            .ok_or_else(|| Error::Xenbus(format!("bad sector-size {}", backend.sector_size)))?;
        let info = connect_info(&negotiated, &built);
        let fe = Frontend::assemble(guest, config, negotiated, disk, built, 0);
        Ok((fe, info))
    }

    /// Puts a frontend together from built queues and the negotiation's outcome.
    pub(crate) fn assemble(
        guest: Arc<dyn Guest>,
        config: FrontendConfig,
        negotiated: Negotiated,
        disk: DiskInfo,
        queues: Vec<QueueResources>,
        handle: u16,
    ) -> Frontend {
        let shared = Arc::new(Shared {
            guest,
            backend_domid: config.backend_domid,
            handle,
            persistent: negotiated.persistent,
            max_segments: layout::segments_per_request(negotiated.max_indirect_segments),
            cache: AtomicU8::new(0),
            discard: AtomicBool::new(negotiated.discard.is_some()),
            stats: AtomicStats::default(),
        });
        shared.set_cache(negotiated.cache);
        info!(
            queues = negotiated.queues,
            ring_order = negotiated.ring_order,
            persistent = negotiated.persistent,
            indirect = negotiated.max_indirect_segments,
            cache = ?negotiated.cache,
            discard = negotiated.discard.is_some(),
            sectors = disk.sectors,
            "blkfront connected"
        );
        let queues = queues
            .into_iter()
            .enumerate()
            .map(|(i, r)| Mutex::new(Queue::new(i, r)))
            .collect();
        Frontend {
            shared,
            sectors: AtomicU64::new(disk.sectors),
            config,
            negotiated,
            disk,
            queues,
            round_robin: AtomicUsize::new(0),
            stopped: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }
    }

    // ----- what was negotiated ---------------------------------------------------

    /// The features in use (flush and discard reflect a backend's later refusals).
    pub fn negotiated(&self) -> Negotiated {
        let mut n = self.negotiated;
        n.cache = self.shared.cache();
        if !self.shared.discard.load(Ordering::Relaxed) {
            n.discard = None;
        }
        n
    }

    /// The disk, with its current size.
    pub fn disk(&self) -> DiskInfo {
        DiskInfo {
            sectors: self.sectors.load(Ordering::Acquire),
            ..self.disk
        }
    }

    /// Disk size in bytes.
    pub fn capacity(&self) -> u64 {
        self.disk().size_bytes()
    }

    /// Takes a new disk size (the backend's `sectors` after a resize).
    pub fn set_capacity_sectors(&self, sectors: u64) {
        let old = self.sectors.swap(sectors, Ordering::AcqRel);
        if old != sectors {
            info!(old, new = sectors, "blkfront: disk resized");
        }
    }

    /// The configuration the frontend runs with.
    pub fn config(&self) -> &FrontendConfig {
        &self.config
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Ring slots per queue: the most requests one queue has in flight.
    pub fn queue_depth(&self) -> usize {
        self.lock(0).map(|q| q.ring_size()).unwrap_or(0)
    }

    /// Bytes one page-aligned ring request carries (11 pages, or the indirect maximum).
    pub fn max_request_bytes(&self) -> usize {
        self.shared.max_segments * PAGE_SIZE
    }

    /// Counters, including every backend protocol violation seen.
    pub fn stats(&self) -> FrontendStats {
        self.shared.stats.snapshot()
    }

    /// Requests in flight on `queue`.
    pub fn in_flight(&self, queue: usize) -> Result<usize, Error> {
        Ok(self.lock(queue)?.in_flight())
    }

    /// What the engine needs to (re)attach to these queues.
    pub fn connect_info(&self) -> Result<ConnectInfo, Error> {
        let mut queues = Vec::with_capacity(self.queues.len());
        for i in 0..self.queues.len() {
            let q = self.lock(i)?;
            queues.push(QueueConnectInfo {
                ring_refs: q.ring_grefs().to_vec(),
                event_channel: q.port(),
            });
        }
        Ok(ConnectInfo {
            protocol: self.negotiated.protocol,
            ring_order: self.negotiated.ring_order,
            persistent: self.negotiated.persistent,
            queues,
        })
    }

    // ----- synchronous block API -------------------------------------------------

    /// Reads `buf.len()` bytes at `offset`; both must be multiples of the logical block
    /// size.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        if buf.is_empty() {
            return Ok(());
        }
        let chunks = self.plan(offset, buf.len() as u64)?;
        let q = self.pick_queue();
        let c = self.run_sync(q, IoOp::Read, buf.len(), chunks.len(), |q, sh, join, i| {
            q.push_rw(sh, join, false, chunks[i], WriteData::InPlace)
        })?;
        c.result?;
        buf.copy_from_slice(&c.data);
        Ok(())
    }

    /// Writes `data` at `offset`; both must be multiples of the logical block size.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        if data.is_empty() {
            return Ok(());
        }
        self.check_writable()?;
        let chunks = self.plan(offset, data.len() as u64)?;
        let q = self.pick_queue();
        let c = self.run_sync(q, IoOp::Write, 0, chunks.len(), |q, sh, join, i| {
            let c = chunks[i];
            q.push_rw(
                sh,
                join,
                true,
                c,
                WriteData::Bytes(&data[c.buf_offset..c.buf_offset + c.len]),
            )
        })?;
        Ok(c.result?)
    }

    /// Makes completed writes durable: `BLKIF_OP_FLUSH_DISKCACHE` or
    /// `BLKIF_OP_WRITE_BARRIER` as negotiated, nothing when the backend offers neither
    /// (a disk without a volatile cache). A backend answering EOPNOTSUPP gets the error
    /// reported once and cache control turned off, as Linux does.
    pub fn flush(&self) -> Result<(), Error> {
        let barrier = match self.shared.cache() {
            CacheControl::None => return Ok(()),
            CacheControl::Flush => false,
            CacheControl::Barrier => true,
        };
        let q = self.pick_queue();
        let c = self.run_sync(q, IoOp::Flush, 0, 1, |q, sh, join, _| {
            q.push_flush(sh, join, barrier)
        })?;
        Ok(c.result?)
    }

    /// Discards `len` bytes at `offset` (securely erases them with `secure`).
    pub fn discard(&self, offset: u64, len: u64, secure: bool) -> Result<(), Error> {
        let (sector, nr) = self.plan_discard(offset, len, secure)?;
        if nr == 0 {
            return Ok(());
        }
        let q = self.pick_queue();
        let c = self.run_sync(q, IoOp::Discard, 0, 1, |q, sh, join, _| {
            q.push_discard(sh, join, sector, nr, secure)
        })?;
        Ok(c.result?)
    }

    // ----- teardown ------------------------------------------------------------------

    /// Refuses new requests from now on ([`Error::Closed`]) while letting those in
    /// flight complete: what Linux does when the backend starts closing.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
    }

    /// Tears the queues down, ending every grant (`blkif_free`). Call after the backend
    /// disconnected; grants it still maps are reported and their pages never reused.
    pub fn close(&self) -> TeardownReport {
        self.stopped.store(true, Ordering::Release);
        if self.closed.swap(true, Ordering::AcqRel) {
            return TeardownReport::default();
        }
        let mut report = TeardownReport::default();
        for i in 0..self.queues.len() {
            let mut q = self.queues[i].lock().unwrap_or_else(|p| p.into_inner());
            let r = q.teardown(&self.shared);
            report.grants_ended += r.grants_ended;
            report.aborted_requests += r.aborted_requests;
            report.still_mapped.extend(r.still_mapped);
        }
        debug!(?report, "blkfront closed");
        report
    }

    // ----- internals -------------------------------------------------------------------

    fn lock(&self, queue: usize) -> Result<MutexGuard<'_, Queue>, Error> {
        let q = self.queues.get(queue).ok_or(Error::NoSuchQueue(queue))?;
        // A panic while a queue was held leaves it consistent enough to tear down; the
        // data path itself never panics on backend input.
        Ok(q.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Runs a join of `parts` ring requests to completion on `queue`, pushing parts as
    /// slots free up, waiting on the event channel in between.
    fn run_sync(
        &self,
        queue: usize,
        op: IoOp,
        read_len: usize,
        parts: usize,
        mut push: impl FnMut(&mut Queue, &Shared, u64, usize) -> Result<(), Error>,
    ) -> Result<Completion, Error> {
        let timeout = self.config.io_timeout;
        let deadline = Instant::now() + timeout;
        if self.stopped.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let mut q = self.lock(queue)?;
        q.check_usable()?;
        let join = q.begin(0, op, true, parts, read_len, ReadData::Copy);
        let mut next = 0;
        loop {
            while next < parts && q.free_slots() > 0 {
                if let Err(e) = push(&mut q, &self.shared, join, next) {
                    q.abandon(join, next);
                    let _ = q.kick(&self.shared);
                    return Err(e);
                }
                next += 1;
            }
            let step = q.kick(&self.shared).and_then(|()| q.reap(&self.shared));
            if let Err(e) = step {
                q.abandon(join, next);
                return Err(e);
            }
            if let Some(c) = q.take_sync(join) {
                return Ok(c);
            }
            let now = Instant::now();
            if now >= deadline {
                warn!(
                    queue,
                    ?op,
                    in_flight = q.in_flight(),
                    "synchronous I/O timed out"
                );
                q.abandon(join, next);
                return Err(Error::Timeout(timeout));
            }
            // In slices: another thread polling this queue may consume the notification
            // meant for us, which then costs one slice instead of the whole timeout.
            q.wait((deadline - now).min(WAIT_SLICE))?;
        }
    }
}

impl Drop for Frontend {
    fn drop(&mut self) {
        let report = self.close();
        if !report.is_clean() {
            warn!(
                ?report,
                "blkfront dropped while the backend still maps grants"
            );
        }
    }
}

fn connect_info(n: &Negotiated, queues: &[QueueResources]) -> ConnectInfo {
    ConnectInfo {
        protocol: n.protocol,
        ring_order: n.ring_order,
        persistent: n.persistent,
        queues: queues
            .iter()
            .map(|q| QueueConnectInfo {
                ring_refs: q.ring_grefs.clone(),
                event_channel: q.evtchn.port(),
            })
            .collect(),
    }
}

/// Undoes [`build_queue`] for queues never assembled into a frontend.
pub(crate) fn release_resources(guest: &Arc<dyn Guest>, queues: Vec<QueueResources>) {
    for q in queues {
        for &g in &q.ring_grefs {
            if guest.end_access(g).is_err() {
                warn!(
                    gref = g,
                    "ring grant still mapped while abandoning a connection"
                );
            }
        }
        drop(q.ring);
        guest.free_frames(&q.ring_frames);
    }
}
