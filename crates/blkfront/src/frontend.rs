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

use crate::config::{BufferPlacement, FrontendConfig, Protocol, QueuePolicy};
use crate::error::{Error, TeardownReport};
use crate::features::{self, BackendFeatures, CacheControl, DiscardParams, DiskInfo, Negotiated};
use crate::guest::{GrantRef, Guest, Port};
use crate::layout::{self, PAGE_SIZE, SECTOR_SIZE};
use crate::queue::{
    AtomicStats, Completion, FrontendStats, IoOp, Queue, QueueResources, ReadData, Shared,
    WriteData,
};

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

    // ----- asynchronous API --------------------------------------------------------

    /// Queues a read of `len` bytes at `offset` on `queue`; its [`Completion`] carries
    /// the data. Fails with [`Error::QueueFull`] when the ring lacks the slots it needs
    /// (one per [`Frontend::max_request_bytes`]).
    pub fn submit_read(
        &self,
        queue: usize,
        offset: u64,
        len: usize,
        token: u64,
    ) -> Result<(), Error> {
        let chunks = self.plan(offset, len as u64)?;
        self.submit(
            queue,
            token,
            IoOp::Read,
            len,
            chunks.len(),
            |q, sh, join, i| q.push_rw(sh, join, false, chunks[i], WriteData::InPlace),
        )
    }

    /// Queues a write of `data` at `offset` on `queue` (the data is copied at once).
    pub fn submit_write(
        &self,
        queue: usize,
        offset: u64,
        data: &[u8],
        token: u64,
    ) -> Result<(), Error> {
        self.check_writable()?;
        let chunks = self.plan(offset, data.len() as u64)?;
        self.submit(
            queue,
            token,
            IoOp::Write,
            0,
            chunks.len(),
            |q, sh, join, i| {
                let c = chunks[i];
                q.push_rw(
                    sh,
                    join,
                    true,
                    c,
                    WriteData::Bytes(&data[c.buf_offset..c.buf_offset + c.len]),
                )
            },
        )
    }

    /// Queues a cache flush on `queue`. Without cache control it completes at once.
    pub fn submit_flush(&self, queue: usize, token: u64) -> Result<(), Error> {
        let barrier = match self.shared.cache() {
            CacheControl::None => {
                self.lock(queue)?.push_ready(Completion {
                    token,
                    op: IoOp::Flush,
                    result: Ok(()),
                    data: Vec::new(),
                });
                return Ok(());
            }
            CacheControl::Flush => false,
            CacheControl::Barrier => true,
        };
        self.submit(queue, token, IoOp::Flush, 0, 1, |q, sh, join, _| {
            q.push_flush(sh, join, barrier)
        })
    }

    /// Queues a discard on `queue`.
    pub fn submit_discard(
        &self,
        queue: usize,
        offset: u64,
        len: u64,
        secure: bool,
        token: u64,
    ) -> Result<(), Error> {
        let (sector, nr) = self.plan_discard(offset, len, secure)?;
        self.submit(queue, token, IoOp::Discard, 0, 1, |q, sh, join, _| {
            q.push_discard(sh, join, sector, nr, secure)
        })
    }

    /// Moves the completions `queue` has so far into `out` without blocking.
    pub fn poll_completions(
        &self,
        queue: usize,
        out: &mut Vec<Completion>,
    ) -> Result<usize, Error> {
        let mut q = self.lock(queue)?;
        let reaped = q.reap(&self.shared);
        let n = q.drain_ready(out);
        match reaped {
            Err(e) if n == 0 => Err(e),
            _ => Ok(n),
        }
    }

    /// Like [`Frontend::poll_completions`], but waits up to `timeout` for at least one.
    pub fn wait_completions(
        &self,
        queue: usize,
        out: &mut Vec<Completion>,
        timeout: Duration,
    ) -> Result<usize, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.poll_completions(queue, out)?;
            let now = Instant::now();
            if n > 0 || now >= deadline {
                return Ok(n);
            }
            // Wait without holding the queue, so other threads may submit meanwhile.
            let evtchn = self.lock(queue)?.event_channel();
            evtchn.wait((deadline - now).min(WAIT_SLICE))?;
        }
    }

    /// Like [`Frontend::wait_completions`], but first polls the ring for up to `poll`
    /// (no system call) before sleeping on the event channel: a load generator with a
    /// core of its own trades that core's time for the wake-up latency.
    pub fn wait_completions_polling(
        &self,
        queue: usize,
        out: &mut Vec<Completion>,
        timeout: Duration,
        poll: Duration,
    ) -> Result<usize, Error> {
        let n = self.poll_completions(queue, out)?;
        if n > 0 {
            return Ok(n);
        }
        if !poll.is_zero() {
            let until = Instant::now() + poll;
            while !self.lock(queue)?.has_responses() && Instant::now() < until {
                std::hint::spin_loop();
            }
        }
        self.wait_completions(queue, out, timeout)
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

    fn pick_queue(&self) -> usize {
        let n = self.queues.len().max(1);
        match self.config.queue_policy {
            QueuePolicy::RoundRobin => self.round_robin.fetch_add(1, Ordering::Relaxed) % n,
            QueuePolicy::PerThread => THREAD_SLOT.with(|slot| {
                let s = slot.get().unwrap_or_else(|| {
                    let s = NEXT_THREAD_SLOT.fetch_add(1, Ordering::Relaxed);
                    slot.set(Some(s));
                    s
                });
                s % n
            }),
        }
    }

    fn check_writable(&self) -> Result<(), Error> {
        if self.config.honour_read_only && self.disk.read_only() {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    /// Checks an I/O like the block layer does and splits it into ring requests.
    fn plan(&self, offset: u64, len: u64) -> Result<Vec<layout::Chunk>, Error> {
        let mut chunks = Vec::new();
        self.plan_into(offset, len, &mut chunks)?;
        Ok(chunks)
    }

    /// [`Frontend::plan`] into a reused vector.
    fn plan_into(
        &self,
        offset: u64,
        len: u64,
        chunks: &mut Vec<layout::Chunk>,
    ) -> Result<(), Error> {
        self.check_range(offset, len)?;
        let page_offset = match self.config.placement {
            BufferPlacement::PageAligned => 0,
            BufferPlacement::FollowDiskOffset => (offset % PAGE_SIZE as u64) as usize,
            BufferPlacement::SectorOffset(n) => (usize::from(n) % 8) * SECTOR_SIZE as usize,
        };
        layout::split_into(
            offset / SECTOR_SIZE,
            len as usize,
            page_offset,
            self.shared.max_segments,
            chunks,
        );
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), Error> {
        let block = u64::from(self.disk.sector_size);
        if len == 0 || !offset.is_multiple_of(block) || !len.is_multiple_of(block) {
            return Err(Error::Unaligned {
                offset,
                len,
                block_size: self.disk.sector_size,
            });
        }
        let capacity = self.capacity();
        if offset.checked_add(len).is_none_or(|end| end > capacity) {
            return Err(Error::OutOfRange {
                offset,
                len,
                capacity,
            });
        }
        Ok(())
    }

    fn plan_discard(&self, offset: u64, len: u64, secure: bool) -> Result<(u64, u64), Error> {
        let Some(params) = self.discard_params() else {
            return Err(Error::NotSupported("discard"));
        };
        if secure && !params.secure {
            return Err(Error::NotSupported("secure discard"));
        }
        if self.config.honour_read_only && self.disk.read_only() {
            return Err(Error::ReadOnly);
        }
        self.check_range(offset, len)?;
        Ok((offset / SECTOR_SIZE, len / SECTOR_SIZE))
    }

    fn discard_params(&self) -> Option<DiscardParams> {
        if self.shared.discard.load(Ordering::Relaxed) {
            self.negotiated.discard
        } else {
            None
        }
    }

    /// Submits an asynchronous join of `parts` ring requests, all or nothing.
    fn submit(
        &self,
        queue: usize,
        token: u64,
        op: IoOp,
        read_len: usize,
        parts: usize,
        push: impl FnMut(&mut Queue, &Shared, u64, usize) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let mut q = self.lock(queue)?;
        let pushed = self.submit_locked(
            &mut q,
            queue,
            token,
            op,
            (read_len, ReadData::Copy),
            parts,
            push,
        );
        // Publish whatever was pushed (all of it, or the parts of a failed submission,
        // which complete unreported); a closed or halted ring has nothing to publish.
        let kicked = match q.check_usable() {
            Ok(()) => q.kick(&self.shared),
            Err(_) => Ok(()),
        };
        pushed.and(kicked)
    }

    /// The body of an asynchronous submission on a held queue: all parts or none (parts
    /// pushed before a failure are abandoned: they complete, unreported). The caller
    /// kicks.
    #[allow(clippy::too_many_arguments)]
    fn submit_locked(
        &self,
        q: &mut Queue,
        queue: usize,
        token: u64,
        op: IoOp,
        (read_len, read_data): (usize, ReadData),
        parts: usize,
        mut push: impl FnMut(&mut Queue, &Shared, u64, usize) -> Result<(), Error>,
    ) -> Result<(), Error> {
        if self.stopped.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        q.check_usable()?;
        if q.free_slots() < parts {
            return Err(Error::QueueFull {
                queue,
                free: q.free_slots(),
                needed: parts,
            });
        }
        let join = q.begin(token, op, false, parts, read_len, read_data);
        for i in 0..parts {
            if let Err(e) = push(q, &self.shared, join, i) {
                q.abandon(join, i);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Opens a batch of submissions on `queue` (see [`Batch`]).
    pub fn batch(&self, queue: usize) -> Result<Batch<'_>, Error> {
        Ok(Batch {
            fe: self,
            queue,
            q: self.lock(queue)?,
            committed: false,
        })
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

/// Submissions on one queue published together, as Linux's blk-mq hands blkfront a
/// batch and blkfront notifies once per commit (`blkif_commit_rqs`): the queue is held
/// from [`Frontend::batch`] until the batch is committed or dropped, requests are pushed
/// on the ring as they come, and the ring's producer index is published — and the
/// backend notified if it asked — once, at the end. Completions can be reaped under the
/// same hold ([`Batch::reap`]), so a load generator reaps and refills with one lock.
pub struct Batch<'a> {
    fe: &'a Frontend,
    queue: usize,
    q: MutexGuard<'a, Queue>,
    committed: bool,
}

impl std::fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl Batch<'_> {
    /// Ring slots free for more requests.
    pub fn free_slots(&self) -> usize {
        self.q.free_slots()
    }

    /// Moves the completions the queue has into `out` (see
    /// [`Frontend::poll_completions`]).
    pub fn reap(&mut self, out: &mut Vec<Completion>) -> Result<usize, Error> {
        let reaped = self.q.reap(&self.fe.shared);
        let n = self.q.drain_ready(out);
        match reaped {
            Err(e) if n == 0 => Err(e),
            _ => Ok(n),
        }
    }

    /// Queues a read of `len` bytes at `offset`; with [`ReadData::Discard`] its
    /// completion carries no data and nothing is copied out of the granted pages.
    pub fn read(
        &mut self,
        offset: u64,
        len: usize,
        token: u64,
        data: ReadData,
    ) -> Result<(), Error> {
        self.rw(offset, len, token, None, data)
    }

    /// Queues a write of `data` at `offset` (copied into the granted pages now).
    pub fn write(&mut self, offset: u64, data: &[u8], token: u64) -> Result<(), Error> {
        self.rw(
            offset,
            data.len(),
            token,
            Some(WriteData::Bytes(data)),
            ReadData::Copy,
        )
    }

    /// Queues a write of `len` bytes at `offset` of whatever the granted pages hold
    /// ([`WriteData::InPlace`]): a load generator's write, with no copy on the guest side.
    pub fn write_in_place(&mut self, offset: u64, len: usize, token: u64) -> Result<(), Error> {
        self.rw(offset, len, token, Some(WriteData::InPlace), ReadData::Copy)
    }

    fn rw(
        &mut self,
        offset: u64,
        len: usize,
        token: u64,
        write: Option<WriteData<'_>>,
        read_data: ReadData,
    ) -> Result<(), Error> {
        if write.is_some() {
            self.fe.check_writable()?;
        }
        let mut chunks = std::mem::take(&mut self.q.chunks);
        let result = self
            .fe
            .plan_into(offset, len as u64, &mut chunks)
            .and_then(|()| {
                let (op, read_len) = match write {
                    Some(_) => (IoOp::Write, 0),
                    None => (IoOp::Read, len),
                };
                self.fe.submit_locked(
                    &mut self.q,
                    self.queue,
                    token,
                    op,
                    (read_len, read_data),
                    chunks.len(),
                    |q, sh, join, i| {
                        let c = chunks[i];
                        let data = match write {
                            Some(WriteData::Bytes(d)) => {
                                WriteData::Bytes(&d[c.buf_offset..c.buf_offset + c.len])
                            }
                            Some(WriteData::InPlace) | None => WriteData::InPlace,
                        };
                        q.push_rw(sh, join, write.is_some(), c, data)
                    },
                )
            });
        self.q.chunks = chunks;
        result
    }

    /// Publishes the batch: one producer-index update, one notification if the backend
    /// asked for one. Dropping the batch does the same, ignoring errors.
    pub fn commit(mut self) -> Result<(), Error> {
        self.committed = true;
        self.kick()
    }

    fn kick(&mut self) -> Result<(), Error> {
        // A queue torn down or halted meanwhile has nothing to publish.
        self.q.check_usable()?;
        self.q.kick(&self.fe.shared)
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if !self.committed {
            let _ = self.kick();
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
