//! One ring of a VBD, run by its reactor: blkback's `xen_blkif_ring` and everything that
//! happens to a request between the frontend's notification and its response.
//!
//! Per wake-up ([`RingRunner::run`]), in passes until one makes no progress:
//! 1. acknowledge the event channel (consume and unmask; first pass only);
//! 2. reap storage completions and finish the requests whose last operation completed:
//!    copy read data out (copy mode), release grants (persistent ones go back to the
//!    cache, the others are unmapped), write the response;
//! 3. publish those responses, and notify the frontend if it asked (blkback's
//!    per-response check: the frontend re-arms only when it runs dry, so this is one
//!    kick per frontend wake-up), before spending time on new requests;
//! 4. consume requests while a request slot is free: copy each out of the ring once,
//!    validate it (blkif), read indirect descriptors once, map or bounce its data pages,
//!    and queue its storage operations;
//! 5. commit the storage queue once (one syscall for the whole batch), publish again.
//!
//! A request is a slot running through phases: `Data` (the vectored read or write,
//! split into chunks of at most [`storage::MAX_SEGMENTS`] iovecs), `Flush`, `Discard`.
//! FLUSH_DISKCACHE with data is `Data` then `Flush`; WRITE_BARRIER first waits until it
//! is the only request in flight (consumption stops meanwhile, as blkback's
//! `xen_blk_drain_io`), then runs `Data` (if any) and `Flush`, and consumption resumes
//! only after it completed. A response is written only after every storage operation of
//! the request completed, so a write is acknowledged only once the storage completed it
//! and a flush only once the data is durable.
//!
//! Failures stay with their request: a request that fails validation, whose grants the
//! hypervisor refuses, or whose storage operation fails gets `BLKIF_RSP_ERROR` (or
//! `BLKIF_RSP_EOPNOTSUPP`) and nothing else changes. A frontend that overflows the ring
//! halts this ring only; requests already in flight still complete and are answered.
//!
//! What a request maps is first taken from its guest's share of the daemon-wide
//! grant-mapping budget ([`crate::grant_budget`]). A request whose mapping the share has
//! no room for, or whose map fails for want of resources (not because a grant was
//! refused), is served by grant copy through the ring's bounce pages instead, as a
//! map-or-copy ring serves what its persistent-grant cache cannot hold: a valid request
//! never fails because another guest, or its own guest, took the daemon's mappings. Those
//! fallbacks are counted (`map_fallbacks`) and logged at warn, at most one line per
//! [`FALLBACK_LOG_INTERVAL`] per VBD.

use std::collections::VecDeque;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkif::abi::{BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, PAGE_SIZE, SECTOR_SIZE};
use blkif::{
    BackRing, DescriptorPage, DeviceLimits, IndirectRequest, Operation, RawRequest, Request,
    Response, Segment, Segments, Validated,
};
use platform::{
    Access, CopyBuffer, CopyDirection, CopySegment, DomId, EventChannel, GrantMapping, GrantRef,
    MapError, OutOfBounds, Platform, MAX_MAP_BATCH,
};
use storage::{is_unsupported, StorageOp, StorageQueue, SubmitError};

use crate::bounce::BouncePool;
use crate::grant_budget::{GuestBudget, MapCost, MapReservation, MapShare};
use crate::persistent_grants::{PersistentGrantCache, PersistentGrantLimits};
use crate::reactor::{RingTask, VbdId};
use crate::slots::SlotPool;
use crate::stats::{RingStats, Stats};
use crate::vbd::{LostFeature, ResolvedGrantMode, VbdEvent, VbdShared};

/// How long a bounce pool goes unused before its memory is given back.
const BOUNCE_IDLE: Duration = Duration::from_secs(1);

/// Most one warning line per VBD about requests grant-copied instead of mapped, each
/// with the count since the last.
pub(crate) const FALLBACK_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A grant mapping made for one request (or one indirect request's descriptor pages),
/// with what it cost of the guest's budget. Field order: the mapping goes first, then its
/// share is given back, so the budget never counts fewer mappings than exist.
struct HeldMapping {
    mapping: GrantMapping,
    _share: MapShare,
}

/// Why a mapping for a request was not made.
enum NotMapped {
    /// The guest's share of the budget has no room for it.
    Budget,
    /// The platform refused the map.
    Map(MapError),
}

impl NotMapped {
    /// Whether the request can be served by grant copy instead: yes unless the hypervisor
    /// refused a grant itself (then a copy is refused too, and the request fails as in
    /// blkback).
    fn copy_instead(&self) -> bool {
        match self {
            NotMapped::Budget => true,
            NotMapped::Map(e) => !e.grant_refused(),
        }
    }
}

/// How a request's data pages were made addressable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Acquired {
    /// Mapped (or taken from the persistent-grant cache).
    Mapped,
    /// Map-or-copy: the persistent-grant cache cannot hold the request, which is
    /// grant-copied by design.
    Copy,
    /// The mapping could not be had (budget, resources): grant-copied instead.
    Fallback,
}

/// Most iovecs in one storage operation.
const MAX_IOV: usize = storage::MAX_SEGMENTS;

/// Data queued for the storage beyond which `consume` commits before taking the next
/// request: a batch of small requests still goes to the kernel in one syscall, while a
/// batch of large ones (each with a copy or map to set up first) starts the storage on
/// the first instead of after the last.
const COMMIT_BYTES: usize = 256 << 10;

/// What a ring is doing with new requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    /// The frontend overflowed the ring: nothing more is consumed.
    Halted,
    /// Detach or shutdown: nothing more is consumed; in-flight requests finish.
    Closing,
}

/// The step of a request being executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Accepted, nothing submitted yet (a barrier waiting for the drain, a request
    /// waiting for bounce pages or for room in the storage queue).
    Idle,
    Data,
    Flush,
    Discard,
}

/// A request in flight: blkback's `pending_req`. Its vectors keep their capacity from
/// one request to the next.
struct Slot {
    id: u64,
    op: Operation,
    sector: u64,
    nr_sectors: u64,
    status: i16,
    /// The failing operation was refused as unsupported (EOPNOTSUPP).
    unsupported: bool,
    phase: Phase,
    /// Storage operations of the current phase not yet completed.
    pending: u32,
    /// Next data chunk to submit (a phase may be submitted in several go's when the
    /// storage queue is full).
    next_chunk: usize,
    segs: Vec<Segment>,
    /// Per segment: address of its page (mapped grant or bounce page).
    addrs: Vec<usize>,
    /// Grant refs taken from the persistent cache, returned at completion.
    persistent: Vec<u32>,
    /// Grants mapped for this request only, unmapped at completion.
    mappings: Vec<HeldMapping>,
    /// Bounce pages (copy mode).
    bounce: Vec<u32>,
    /// The request's data goes through bounce pages (copy mode, or a request the
    /// persistent-grant cache could not hold in map-or-copy mode).
    copied: bool,
}

impl Slot {
    fn new() -> Self {
        Self {
            id: 0,
            op: Operation::Read,
            sector: 0,
            nr_sectors: 0,
            status: BLKIF_RSP_OKAY,
            unsupported: false,
            phase: Phase::Idle,
            pending: 0,
            next_chunk: 0,
            segs: Vec::new(),
            addrs: Vec::new(),
            persistent: Vec::new(),
            mappings: Vec::new(),
            bounce: Vec::new(),
            copied: false,
        }
    }

    fn reset(&mut self, req: &Request) {
        self.id = req.id;
        self.op = req.operation;
        self.sector = req.sector;
        self.nr_sectors = req.nr_sectors;
        self.status = BLKIF_RSP_OKAY;
        self.unsupported = false;
        self.phase = Phase::Idle;
        self.pending = 0;
        self.next_chunk = 0;
        self.addrs.clear();
        self.persistent.clear();
        self.mappings.clear();
        self.bounce.clear();
        self.copied = false;
    }

    fn has_data(&self) -> bool {
        !self.segs.is_empty()
    }

    fn chunks(&self) -> usize {
        self.segs.len().div_ceil(MAX_IOV)
    }

    /// The phase after `self.phase`, `None` when the request is complete.
    fn next_phase(&self) -> Option<Phase> {
        match (self.op, self.phase) {
            (Operation::Read | Operation::Write, Phase::Idle) => Some(Phase::Data),
            (Operation::Flush | Operation::Barrier, Phase::Idle) if self.has_data() => {
                Some(Phase::Data)
            }
            (Operation::Flush | Operation::Barrier, Phase::Idle | Phase::Data) => {
                Some(Phase::Flush)
            }
            (Operation::Discard { .. }, Phase::Idle) if self.nr_sectors > 0 => Some(Phase::Discard),
            _ => None,
        }
    }

    /// Whether the guest's pages are written by this request (READ fills them).
    fn fills_guest(&self) -> bool {
        self.op == Operation::Read
    }
}

/// The iovec array handed to the storage. `libc::iovec` holds raw pointers, so it is not
/// `Send`; this buffer is always empty between uses (the storage copies the array at
/// submission), which is what makes moving the ring to its reactor thread sound.
struct IovScratch(Vec<libc::iovec>);

// SAFETY: the vector is cleared after every submission, so it never carries a pointer
// across threads; only its allocation moves.
unsafe impl Send for IovScratch {}

/// Most indirect descriptor pages of one request.
const MAX_INDIRECT_PAGES: usize = blkif::abi::BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST;

/// A page of a grant mapping, read as indirect descriptors.
#[derive(Clone, Copy)]
struct MappedPage<'a> {
    mapping: &'a GrantMapping,
    page: usize,
}

/// An indirect descriptor page as the parser reads it (once, into a private copy).
#[derive(Clone, Copy)]
enum IndirectPage<'a> {
    Mapped(MappedPage<'a>),
    /// Grant-copied into the ring's private pages.
    Copied(&'a [u8; PAGE_SIZE]),
}

impl DescriptorPage for IndirectPage<'_> {
    fn copy_descriptors(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        match self {
            IndirectPage::Mapped(m) => m.copy_descriptors(offset, dst),
            IndirectPage::Copied(page) => page.copy_descriptors(offset, dst),
        }
    }
}

/// Fills the unused tail of a request's page array; never read (the parser reads as many
/// pages as the request names).
static NO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Where an indirect descriptor page of a request is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IndirectSource {
    /// Not in the persistent-grant cache (or no cache): mapped or copied below.
    Miss,
    /// The gref of earlier page `j` of the request: read through that page's source, so
    /// a gref repeated by the frontend costs one mapping and one cache entry.
    SameAs(usize),
    /// Taken from the persistent-grant cache: active until the descriptors are copied
    /// out, returned right after.
    Taken,
    /// In the cache but taken by another request in flight (as its data page): read
    /// through the cached mapping without taking it. Its entry cannot go meanwhile (the
    /// purge keeps active entries, and only this thread touches the cache).
    InUse,
    /// Mapped by this request and kept: active until parsed, like `Taken`.
    Added,
    /// Mapped writable for the cache, which then refused it: mapping `k` of the
    /// request's own.
    Single(usize),
    /// Page `k` of what this request mapped read-only (map mode) or copied (map-or-copy
    /// and copy modes) for itself only.
    Local(usize),
}

/// blkback's lookup in `xen_blkbk_map` for indirect pages: takes each page's grant from
/// `cache` when it is there (`None`: persistent grants are off) and says how every page is
/// read. Returns (cache hits, misses); the misses are left [`IndirectSource::Miss`].
fn plan_indirect<M>(
    grefs: &[u32],
    mut cache: Option<&mut PersistentGrantCache<M>>,
    sources: &mut [IndirectSource],
) -> (usize, usize) {
    let (mut hits, mut misses) = (0, 0);
    for (i, &gref) in grefs.iter().enumerate() {
        sources[i] = if let Some(j) = grefs[..i].iter().position(|&g| g == gref) {
            IndirectSource::SameAs(j)
        } else {
            match cache.as_deref_mut() {
                Some(c) => {
                    if c.get(gref).is_some() {
                        IndirectSource::Taken
                    } else if c.is_active(gref) {
                        IndirectSource::InUse
                    } else {
                        IndirectSource::Miss
                    }
                }
                None => IndirectSource::Miss,
            }
        };
        match sources[i] {
            IndirectSource::Taken | IndirectSource::InUse => hits += 1,
            IndirectSource::Miss => misses += 1,
            _ => {}
        }
    }
    (hits, misses)
}

impl DescriptorPage for MappedPage<'_> {
    fn copy_descriptors(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        if offset + dst.len() > PAGE_SIZE {
            return Err(OutOfBounds {
                offset,
                len: dst.len(),
                region_len: PAGE_SIZE,
            });
        }
        self.mapping.read(self.page * PAGE_SIZE + offset, dst)
    }
}

/// Everything needed to build a ring, prepared by the attaching thread.
pub(crate) struct RingParts {
    pub(crate) index: usize,
    pub(crate) ring: BackRing,
    pub(crate) evtchn: Box<dyn EventChannel>,
    pub(crate) queue: Box<dyn StorageQueue>,
}

/// One ring and all it owns.
///
/// Field order is drop order, and it matters: the storage queue goes first (dropping it
/// waits until the kernel is done with every submitted operation), then the slots
/// (their grant mappings and the bounce pages that operations pointed into), the
/// persistent grants, the bounce pool, the ring mapping and finally the event channel.
pub(crate) struct RingRunner {
    queue: Box<dyn StorageQueue>,
    slots: SlotPool<Slot>,
    cache: PersistentGrantCache<GrantMapping>,
    /// Copy mode: made at start; map-or-copy: made when a request first needs it.
    bounce: Option<BouncePool>,
    ring: BackRing,
    evtchn: Box<dyn EventChannel>,

    vbd: Arc<VbdShared>,
    platform: Arc<dyn Platform>,
    stats: Arc<RingStats>,
    index: usize,
    domid: DomId,
    /// The guest's share of the daemon-wide grant-mapping budget (the cache holds it too).
    budget: GuestBudget,
    persistent: bool,
    mode: ResolvedGrantMode,
    /// Size of the bounce pool, in pages.
    bounce_pages: usize,
    limits: DeviceLimits,
    limits_generation: u64,
    state: State,
    /// A barrier that was accepted: while set, nothing more is consumed.
    barrier: Option<u32>,
    /// A request waiting for bounce pages: while set, nothing more is consumed.
    stalled: Option<u32>,
    /// Requests with operations the storage queue had no room for.
    retry: VecDeque<u32>,
    completions: Vec<(u64, io::Result<u64>)>,
    iov: IovScratch,
    /// Scratch for persistent-grant misses: indices into the request's segments.
    misses: Vec<usize>,
    /// Scratch for [`distinct_first`].
    dedup: Vec<(u32, u32)>,
    reordered: Vec<usize>,
    grefs: Vec<u32>,
    /// Private copies of indirect descriptor pages (copy and map-or-copy modes).
    indirect_pages: Vec<[u8; PAGE_SIZE]>,
    /// The frontend grants its indirect pages read-only: a writable map of one for the
    /// cache failed where a read-only map (or copy) of it then worked. From then on, this
    /// ring's indirect pages missing the cache are not offered to it (one failed map per
    /// request for nothing); they are mapped or copied for their request only.
    indirect_read_only: bool,
    /// Grant-copy segments of the request being copied, reused (copy mode).
    copy_segs: Vec<CopySegment>,
    evtchn_fired: bool,
    /// Responses were published since the last `run`.
    answered: bool,
    /// See [`crate::VbdLimits::poll`].
    poll: Duration,
    /// Bounce pages were taken since the last tick.
    bounce_used: bool,
    /// The bounce pool has been unused since then.
    bounce_idle_since: Option<Instant>,
    /// Data bytes submitted to the storage queue since the last commit.
    uncommitted_bytes: usize,
    /// Responses written since the last publication.
    responses_unpublished: bool,
    resize_poll: Option<std::time::Duration>,
    next_resize: Option<Instant>,
    /// What this ring maps besides its guest's grant mappings (`None` when the budget
    /// was sized by hand); given back when the ring is dropped.
    _map_reserve: Option<MapReservation>,
}

pub(crate) struct RingConfig {
    pub(crate) vbd: Arc<VbdShared>,
    pub(crate) platform: Arc<dyn Platform>,
    pub(crate) domid: DomId,
    pub(crate) persistent: bool,
    pub(crate) persistent_limits: PersistentGrantLimits,
    pub(crate) mode: ResolvedGrantMode,
    pub(crate) max_buffer_pages: usize,
    pub(crate) resize_poll: Option<std::time::Duration>,
    pub(crate) poll: Duration,
    pub(crate) budget: GuestBudget,
    pub(crate) map_reserve: Option<MapReservation>,
}

impl RingRunner {
    pub(crate) fn new(parts: RingParts, cfg: RingConfig) -> io::Result<Self> {
        let size = parts.ring.size() as usize;
        let max_segs = (cfg.vbd.max_indirect_segments as usize)
            .max(blkif::abi::BLKIF_MAX_SEGMENTS_PER_REQUEST);
        let bounce_pages = cfg.max_buffer_pages.max(max_segs);
        let bounce = match cfg.mode {
            ResolvedGrantMode::Copy => Some(BouncePool::new(bounce_pages)?),
            ResolvedGrantMode::Map | ResolvedGrantMode::MapOrCopy => None,
        };
        let stats = cfg.vbd.ring_stats[parts.index].clone();
        let limits = cfg.vbd.device_limits();
        let limits_generation = cfg.vbd.generation();
        let next_resize = (parts.index == 0)
            .then(|| cfg.resize_poll.map(|p| Instant::now() + p))
            .flatten();
        Ok(Self {
            queue: parts.queue,
            slots: SlotPool::new(size, Slot::new),
            cache: PersistentGrantCache::new(
                cfg.persistent_limits,
                cfg.vbd.persistent_overflow.clone(),
                cfg.budget.clone(),
            ),
            bounce,
            ring: parts.ring,
            evtchn: parts.evtchn,
            platform: cfg.platform,
            stats,
            index: parts.index,
            domid: cfg.domid,
            budget: cfg.budget,
            persistent: cfg.persistent,
            mode: cfg.mode,
            bounce_pages,
            limits,
            limits_generation,
            state: State::Running,
            barrier: None,
            stalled: None,
            retry: VecDeque::with_capacity(size),
            completions: Vec::with_capacity(size),
            // Grows with the largest chunk the frontend sends: preallocated for MAX_IOV
            // iovecs it cost every ring 16 KiB whether or not it ever saw a big request.
            iov: IovScratch(Vec::with_capacity(
                blkif::abi::BLKIF_MAX_SEGMENTS_PER_REQUEST,
            )),
            misses: Vec::new(),
            dedup: Vec::new(),
            reordered: Vec::new(),
            grefs: Vec::new(),
            indirect_pages: Vec::new(),
            indirect_read_only: false,
            copy_segs: Vec::new(),
            evtchn_fired: true,
            answered: false,
            poll: cfg.poll,
            bounce_used: false,
            bounce_idle_since: None,
            uncommitted_bytes: 0,
            responses_unpublished: false,
            resize_poll: cfg.resize_poll,
            next_resize,
            _map_reserve: cfg.map_reserve,
            vbd: cfg.vbd,
        })
    }

    /// Storage queue depth a ring of `ring_size` slots needs: every slot may have all the
    /// chunks of a maximal request in flight.
    pub(crate) fn queue_depth(ring_size: u32, max_indirect_segments: u32) -> u32 {
        let max_segs = (max_indirect_segments as usize).max(1);
        let chunks = max_segs.div_ceil(MAX_IOV) as u32;
        (ring_size * chunks).clamp(1, storage::MAX_QUEUE_DEPTH)
    }

    /// Picks up a resize or a lost feature published by another thread.
    fn refresh_limits(&mut self) {
        let g = self.vbd.generation();
        if g != self.limits_generation {
            self.limits = self.vbd.device_limits();
            self.limits_generation = g;
        }
    }

    fn consuming(&self) -> bool {
        self.state == State::Running && self.barrier.is_none() && self.stalled.is_none()
    }

    fn process(&mut self) {
        if std::mem::take(&mut self.evtchn_fired) {
            if let Err(e) = self.evtchn.ack() {
                tracing::warn!(vbd = self.vbd.id.0, ring = self.index, error = %e, "event channel ack failed");
            }
        }
        self.refresh_limits();
        let now = Instant::now();

        // Bounded: each pass either consumes requests or finishes some, and the ring holds
        // at most `size` of them; the loop ends when a pass made no progress.
        //
        // Responses are published as soon as a pass produced them, before new requests
        // are consumed, and the frontend is notified at once if it asked (it re-arms
        // `rsp_event` only when it ran out of responses, so this is at most one kick per
        // frontend wake-up, as blkback's per-response RING_PUSH_RESPONSES_AND_CHECK_NOTIFY
        // gives): a frontend that went to sleep starts on the completions while this ring
        // is still consuming, instead of after it.
        loop {
            let mut progress = self.reap(now);
            progress |= self.resume(now);
            self.publish();
            progress |= self.consume(now);
            self.commit();
            self.publish();
            if !progress {
                break;
            }
        }

        self.update_gauges();
    }

    /// Publishes the responses written since the last call and kicks the frontend if it
    /// asked for it.
    fn publish(&mut self) {
        if !std::mem::take(&mut self.responses_unpublished) {
            return;
        }
        // Gauges first, so a frontend that sees a response sees its effect in the
        // statistics too.
        self.update_gauges();
        self.answered = true;
        if self.ring.push_responses_and_check_notify() {
            self.stats.notifications.inc();
            if let Err(e) = self.evtchn.notify() {
                tracing::warn!(vbd = self.vbd.id.0, ring = self.index, error = %e, "event channel notify failed");
            }
        }
    }

    fn update_gauges(&self) {
        self.stats.in_flight.set(self.slots.in_use() as u64);
        self.stats.persistent_in_use.set(self.cache.in_use() as u64);
        self.stats.persistent_mapped.set(self.cache.len() as u64);
        self.stats
            .persistent_budget_refusals
            .set(self.cache.budget_refusals());
    }

    /// Reaps storage completions. Returns whether any arrived.
    fn reap(&mut self, now: Instant) -> bool {
        let completions = &mut self.completions;
        let n = self
            .queue
            .reap(&mut |tag, result| completions.push((tag, result)));
        if n == 0 {
            return false;
        }
        let mut done = std::mem::take(&mut self.completions);
        for (tag, result) in done.drain(..) {
            self.complete_op(tag, result, now);
        }
        self.completions = done;
        true
    }

    /// Restarts work that was waiting: storage-queue room, bounce pages, a barrier's
    /// drain. Returns whether anything moved.
    fn resume(&mut self, now: Instant) -> bool {
        let mut progress = false;
        while let Some(slot) = self.retry.pop_front() {
            self.submit_phase(slot, now);
            if self.retry.back() == Some(&slot) {
                // Still no room: back to the head of the line; completions will wake us.
                self.retry.pop_back();
                self.retry.push_front(slot);
                break;
            }
            progress = true;
        }
        if let Some(slot) = self.stalled {
            let n = self.slots.get(slot).segs.len();
            let pool = self
                .bounce
                .as_mut()
                .expect("a request waits for bounce pages only once the pool exists");
            let mut pages = std::mem::take(&mut self.slots.get_mut(slot).bounce);
            if pool.alloc(n, &mut pages) {
                self.slots.get_mut(slot).bounce = pages;
                self.stalled = None;
                progress = true;
                self.start_copy_mode(slot, now);
            } else {
                self.slots.get_mut(slot).bounce = pages;
            }
        }
        if let Some(slot) = self.barrier {
            if self.slots.get(slot).phase == Phase::Idle && self.slots.in_use() == 1 {
                progress = true;
                self.begin(slot, now);
            }
        }
        progress
    }

    /// Takes requests off the ring while slots are free. Returns whether any was taken.
    fn consume(&mut self, now: Instant) -> bool {
        let mut progress = false;
        while self.consuming() {
            // One atomic load: a resize or a withdrawn feature applies from the very next
            // request, even within one wake-up.
            self.refresh_limits();
            if !self.slots.has_free() {
                if self.ring.unconsumed_requests() > 0 {
                    // blkback's st_oo_req: a request waits and no pending_req is free. A
                    // completion frees a slot and runs the ring again.
                    self.stats.oo_req.inc();
                }
                break;
            }
            let raw = match self.ring.pop_request() {
                Ok(Some(raw)) => raw,
                Ok(None) => match self.ring.final_check_for_requests() {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        self.halt(e);
                        break;
                    }
                },
                Err(e) => {
                    self.halt(e);
                    break;
                }
            };
            progress = true;
            self.dispatch(raw, now);
            if self.uncommitted_bytes >= COMMIT_BYTES {
                // Large requests cost time to set up (copies, maps): start the storage
                // on what is ready instead of holding it until the whole batch is.
                self.commit();
            }
        }
        progress
    }

    /// Hands the queued storage operations to the kernel.
    fn commit(&mut self) {
        self.uncommitted_bytes = 0;
        if let Err(e) = self.queue.commit() {
            // The operations stay queued; the next wake-up retries.
            tracing::warn!(vbd = self.vbd.id.0, ring = self.index, error = %e, "storage commit failed");
        }
    }

    fn halt(&mut self, e: blkif::RingError) {
        // Debug only: the guest decides how often this happens (every ring, every
        // session); the event carries the reason to the owner, which reports it.
        tracing::debug!(vbd = self.vbd.id.0, ring = self.index, error = %e, "frontend misbehaved; halting ring");
        self.state = State::Halted;
        self.stats
            .halted
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.vbd.emit(VbdEvent::RingHalted {
            ring: self.index,
            reason: e.to_string(),
        });
    }

    /// Answers a request that never got a slot's worth of work.
    fn respond_now(&mut self, response: Response) {
        if response.status == BLKIF_RSP_EOPNOTSUPP {
            self.stats.unsupported.inc();
        } else if response.status != BLKIF_RSP_OKAY {
            self.stats.errors.inc();
        }
        match self.ring.push_response(&response) {
            Ok(()) => self.responses_unpublished = true,
            Err(e) => {
                tracing::error!(vbd = self.vbd.id.0, ring = self.index, error = %e, "cannot push response")
            }
        }
    }

    /// Validates a request and starts it.
    fn dispatch(&mut self, raw: RawRequest, now: Instant) {
        let request = match raw.validate(&self.limits) {
            Ok(Validated::Ready(req)) => {
                let Some(slot) = self.slots.alloc() else {
                    // consume() checked for a free slot.
                    self.respond_now(raw.response(BLKIF_RSP_ERROR));
                    return;
                };
                let s = self.slots.get_mut(slot);
                s.segs.clear();
                if let Segments::Direct(d) = &req.segments {
                    s.segs.extend_from_slice(d.as_slice());
                }
                s.reset(&req);
                (slot, req)
            }
            Ok(Validated::Indirect(ind)) => {
                let Some(slot) = self.slots.alloc() else {
                    self.respond_now(raw.response(BLKIF_RSP_ERROR));
                    return;
                };
                match self.read_indirect(slot, &ind, now) {
                    Ok(req) => {
                        self.slots.get_mut(slot).reset(&req);
                        (slot, req)
                    }
                    Err(status) => {
                        let response = ind.response(status);
                        tracing::debug!(
                            vbd = self.vbd.id.0,
                            ring = self.index,
                            id = response.id,
                            "indirect request refused"
                        );
                        self.slots.free(slot);
                        self.respond_now(response);
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::debug!(vbd = self.vbd.id.0, ring = self.index, error = %e, "request refused");
                self.respond_now(raw.response(e.status()));
                return;
            }
        };
        let (slot, req) = request;
        self.count_accepted(&req);

        if self.mode != ResolvedGrantMode::Copy {
            match self.map_segments(slot, now) {
                Ok(Acquired::Mapped) => {
                    self.after_acquire(slot, now);
                    return;
                }
                Err(status) => {
                    self.finish_with(slot, status, now);
                    return;
                }
                // Map-or-copy, and the persistent-grant cache cannot hold the request: as
                // blkback when a grant does not fit, the next purge makes room by dropping
                // the least recently used, so the cache follows the working set (small
                // requests map into it again; large ones keep being copied).
                Ok(Acquired::Copy) => self.cache.note_overflow(),
                Ok(Acquired::Fallback) => self.note_fallback(now),
            }
        }
        if self.bounce.is_none() {
            match BouncePool::new(self.bounce_pages) {
                Ok(pool) => self.bounce = Some(pool),
                Err(e) => {
                    tracing::warn!(vbd = self.vbd.id.0, ring = self.index, error = %e, "no bounce pool");
                    self.finish_with(slot, BLKIF_RSP_ERROR, now);
                    return;
                }
            }
        }
        let Some(pool) = self.bounce.as_mut() else {
            return;
        };
        let s = self.slots.get_mut(slot);
        let n = s.segs.len();
        if n > 0 && !pool.alloc(n, &mut s.bounce) {
            // Wait for completions to return pages; consumption stops meanwhile.
            self.stats.oo_req.inc();
            self.stalled = Some(slot);
            return;
        }
        self.start_copy_mode(slot, now);
    }

    fn count_accepted(&self, req: &Request) {
        match req.operation {
            Operation::Read => {
                self.stats.rd_req.inc();
                self.stats.rd_sect.add(req.nr_sectors);
            }
            Operation::Write => {
                self.stats.wr_req.inc();
                self.stats.wr_sect.add(req.nr_sectors);
            }
            Operation::Flush | Operation::Barrier => {
                self.stats.f_req.inc();
                self.stats.wr_sect.add(req.nr_sectors);
            }
            Operation::Discard { .. } => self.stats.ds_req.inc(),
        }
    }

    /// Copy mode, bounce pages held: grant-copy a write's data in, then go on.
    fn start_copy_mode(&mut self, slot: u32, now: Instant) {
        let pool = self
            .bounce
            .as_ref()
            .expect("a copied request has a bounce pool");
        let base = pool.region().as_ptr() as usize;
        self.bounce_used = true;
        let s = self.slots.get_mut(slot);
        s.copied = true;
        s.addrs.clear();
        s.addrs
            .extend(s.bounce.iter().map(|&p| base + BouncePool::offset(p)));
        if s.has_data() && !s.fills_guest() {
            if let Err(status) = self.copy_data(slot, CopyDirection::FromGuest) {
                self.finish_with(slot, status, now);
                return;
            }
        }
        self.after_acquire(slot, now);
    }

    /// Data pages are ready: run the request, or park a barrier until the ring drained.
    fn after_acquire(&mut self, slot: u32, now: Instant) {
        if self.slots.get(slot).op == Operation::Barrier {
            self.barrier = Some(slot);
            if self.slots.in_use() > 1 {
                tracing::trace!(
                    vbd = self.vbd.id.0,
                    ring = self.index,
                    "barrier waits for in-flight I/O"
                );
                return;
            }
        }
        self.begin(slot, now);
    }

    /// Starts the first phase of an accepted request.
    fn begin(&mut self, slot: u32, now: Instant) {
        match self.slots.get(slot).next_phase() {
            Some(phase) => {
                let s = self.slots.get_mut(slot);
                s.phase = phase;
                s.next_chunk = 0;
                self.submit_phase(slot, now);
            }
            None => self.finish(slot, now),
        }
    }

    /// Submits what remains of the slot's current phase.
    fn submit_phase(&mut self, slot: u32, now: Instant) {
        let s = self.slots.get(slot);
        let phase = s.phase;
        let result = match phase {
            Phase::Idle => return,
            Phase::Flush => self.submit(slot, 0, StorageOp::Flush),
            Phase::Discard => {
                let op = StorageOp::Discard {
                    offset: s.sector * SECTOR_SIZE,
                    len: s.nr_sectors * SECTOR_SIZE,
                    secure: matches!(s.op, Operation::Discard { secure: true }),
                };
                self.submit(slot, 0, op)
            }
            Phase::Data => self.submit_data(slot),
        };
        match result {
            Ok(()) => {}
            Err(SubmitError::Full) => {
                // Completions will make room; keep the request's place in line.
                if !self.retry.contains(&slot) {
                    self.retry.push_back(slot);
                }
            }
            Err(e) => {
                tracing::debug!(vbd = self.vbd.id.0, ring = self.index, error = %e, "storage refused an operation");
                let s = self.slots.get_mut(slot);
                if matches!(e, SubmitError::Unsupported(_)) && phase != Phase::Data {
                    s.unsupported = true;
                }
                s.status = BLKIF_RSP_ERROR;
                // Stop submitting further chunks; finish when what is in flight is done.
                s.next_chunk = usize::MAX;
                if s.pending == 0 {
                    self.finish(slot, now);
                }
            }
        }
    }

    /// Submits the remaining data chunks of a slot.
    fn submit_data(&mut self, slot: u32) -> Result<(), SubmitError> {
        let chunks = self.slots.get(slot).chunks();
        while self.slots.get(slot).next_chunk < chunks {
            let s = self.slots.get(slot);
            let chunk = s.next_chunk;
            let first = chunk * MAX_IOV;
            let segs = &s.segs[first..(first + MAX_IOV).min(s.segs.len())];
            let sectors_before: u64 = s.segs[..first].iter().map(Segment::nr_sectors).sum();
            let offset = (s.sector + sectors_before) * SECTOR_SIZE;
            self.iov.0.clear();
            for (seg, &addr) in segs.iter().zip(&s.addrs[first..]) {
                self.iov.0.push(libc::iovec {
                    iov_base: (addr + seg.offset_bytes()) as *mut libc::c_void,
                    iov_len: seg.len_bytes(),
                });
            }
            let op = match s.op {
                Operation::Read => StorageOp::Read {
                    offset,
                    iov: &self.iov.0,
                },
                _ => StorageOp::Write {
                    offset,
                    iov: &self.iov.0,
                    fua: false,
                },
            };
            let tag = tag(slot, chunk);
            // SAFETY: every iovec points into a page this slot holds until all of its
            // operations completed: a grant mapping in `slot.mappings`, a persistent
            // grant the cache keeps mapped while it is active (it is returned only in
            // `finish`, after the last completion, and the cache is drained only after
            // the queue has been dropped), or a bounce page owned by the slot. The
            // ranges stay inside their pages (blkif checked first/last sector). For a
            // READ the pages are mapped writable (map mode) or are private bounce pages;
            // no Rust reference to any of them exists. If the ring is torn down early,
            // `RingRunner`'s field order drops the queue (which waits for the kernel)
            // before any of that memory.
            let r = unsafe { self.queue.submit(op, tag) };
            self.iov.0.clear();
            r?;
            let s = self.slots.get_mut(slot);
            s.pending += 1;
            s.next_chunk += 1;
            self.uncommitted_bytes += segs_bytes(&s.segs, first);
        }
        Ok(())
    }

    fn submit(&mut self, slot: u32, chunk: usize, op: StorageOp<'_>) -> Result<(), SubmitError> {
        // SAFETY: flush and discard carry no buffers.
        unsafe { self.queue.submit(op, tag(slot, chunk)) }?;
        self.slots.get_mut(slot).pending += 1;
        Ok(())
    }

    /// One storage operation completed.
    fn complete_op(&mut self, tag: u64, result: io::Result<u64>, now: Instant) {
        let (slot, chunk) = untag(tag);
        if !self.slots.is_busy(slot) || self.slots.get(slot).pending == 0 {
            tracing::error!(
                vbd = self.vbd.id.0,
                ring = self.index,
                tag,
                "completion for no request"
            );
            return;
        }
        let expected = self.expected_len(slot, chunk);
        let phase = self.slots.get(slot).phase;
        let s = self.slots.get_mut(slot);
        s.pending -= 1;
        match result {
            Ok(n) if expected.is_none_or(|e| n == e) => {}
            Ok(n) => {
                tracing::warn!(
                    vbd = self.vbd.id.0,
                    ring = self.index,
                    transferred = n,
                    ?expected,
                    "short storage transfer"
                );
                s.status = BLKIF_RSP_ERROR;
            }
            Err(e) => {
                if is_unsupported(&e) && phase != Phase::Data {
                    s.unsupported = true;
                } else {
                    tracing::debug!(vbd = self.vbd.id.0, ring = self.index, error = %e, "storage operation failed");
                }
                s.status = BLKIF_RSP_ERROR;
            }
        }
        if s.pending > 0 || (phase == Phase::Data && s.next_chunk < s.chunks()) {
            return; // more of this phase outstanding (or queued for retry)
        }
        if s.status != BLKIF_RSP_OKAY {
            self.finish(slot, now);
            return;
        }
        match s.next_phase() {
            Some(next) => {
                s.phase = next;
                s.next_chunk = 0;
                self.submit_phase(slot, now);
            }
            None => self.finish(slot, now),
        }
    }

    /// Bytes a completed operation must report: the chunk's length for data, the range
    /// for discards; `None` for flushes.
    fn expected_len(&self, slot: u32, chunk: usize) -> Option<u64> {
        let s = self.slots.get(slot);
        match s.phase {
            Phase::Data => {
                let first = chunk * MAX_IOV;
                let segs = s.segs.get(first..(first + MAX_IOV).min(s.segs.len()))?;
                Some(segs.iter().map(|g| g.len_bytes() as u64).sum())
            }
            Phase::Discard => Some(s.nr_sectors * SECTOR_SIZE),
            Phase::Flush | Phase::Idle => None,
        }
    }

    fn finish_with(&mut self, slot: u32, status: i16, now: Instant) {
        self.slots.get_mut(slot).status = status;
        self.finish(slot, now);
    }

    /// The request is over: deliver read data (copy mode), release its pages, answer.
    fn finish(&mut self, slot: u32, now: Instant) {
        let s = self.slots.get(slot);
        if s.status == BLKIF_RSP_OKAY && s.fills_guest() && s.copied && s.has_data() {
            if let Err(status) = self.copy_data(slot, CopyDirection::ToGuest) {
                self.slots.get_mut(slot).status = status;
            }
        }
        let s = self.slots.get_mut(slot);
        let mut status = s.status;
        if s.unsupported {
            status = BLKIF_RSP_EOPNOTSUPP;
            let lost = match s.op {
                Operation::Flush => Some(LostFeature::Flush),
                Operation::Barrier => Some(LostFeature::Barrier),
                Operation::Discard { secure: true } => Some(LostFeature::SecureDiscard),
                Operation::Discard { secure: false } => Some(LostFeature::Discard),
                _ => None,
            };
            if let Some(lost) = lost {
                if self.vbd.drop_feature(lost) {
                    tracing::info!(
                        vbd = self.vbd.id.0,
                        ?lost,
                        "storage does not support it; feature withdrawn"
                    );
                }
            }
        }
        for gref in s.persistent.drain(..) {
            self.cache.put(gref, now);
        }
        // Dropping a mapping unmaps it; the storage is done with it.
        s.mappings.clear();
        if let Some(pool) = self.bounce.as_mut() {
            pool.free(&s.bounce);
        }
        s.bounce.clear();
        let response = Response {
            id: s.id,
            operation: s.op.blkif_op(),
            status,
        };
        s.phase = Phase::Idle;
        self.slots.free(slot);
        if self.barrier == Some(slot) {
            self.barrier = None;
        }
        self.respond_now(response);
    }

    /// Reads an indirect request's descriptors into the slot's segment list, then runs
    /// the checks that need them.
    ///
    /// With persistent grants (map and map-or-copy modes) the descriptor pages go through
    /// the persistent-grant cache as blkback's `xen_blkbk_parse_indirect` does: Linux
    /// blkfront takes its indirect pages from the same pool of persistently granted pages
    /// as its data pages, so in steady state they are all cached and an indirect request
    /// maps nothing. A page's entry is active only while its descriptors are copied out
    /// (once, into private memory, before any check), so a data segment of the same
    /// request naming the same grant finds it free and uses the same mapping. Pages the
    /// cache does not hold and cannot take are read as without persistent grants: mapped
    /// read-only for the request in map mode, grant-copied into private pages otherwise.
    fn read_indirect(
        &mut self,
        slot: u32,
        ind: &IndirectRequest,
        now: Instant,
    ) -> Result<Request, i16> {
        let grefs = ind.indirect_grefs();
        let n = grefs.len();
        // Room for every descriptor the pages can hold (bounded by the advertised
        // maximum); parsing fills the request's `nr_segments` of them.
        let room = (n * blkif::abi::SEGMENTS_PER_INDIRECT_PAGE)
            .min(self.limits.max_indirect_segments as usize);
        let s = self.slots.get_mut(slot);
        s.segs.clear();
        s.segs.resize(room, Segment::default());

        let cached = self.persistent && self.mode != ResolvedGrantMode::Copy;
        let mut sources = [IndirectSource::Miss; MAX_INDIRECT_PAGES];
        let sources = &mut sources[..n];
        let (hits, misses) = plan_indirect(grefs, cached.then_some(&mut self.cache), sources);
        if cached {
            self.stats.persistent_hits.add(hits as u64);
            self.stats.persistent_misses.add(misses as u64);
            self.stats.indirect_hits.add(hits as u64);
            self.stats.indirect_misses.add(misses as u64);
        }
        let parsed = self.parse_indirect(slot, ind, sources, now);
        // Whatever happened, the entries this request took are free again: the
        // descriptors were copied out, nothing reads the pages any more.
        for (&gref, source) in grefs.iter().zip(sources.iter()) {
            if matches!(source, IndirectSource::Taken | IndirectSource::Added) {
                self.cache.put(gref, now);
            }
        }
        let n = parsed?;
        let s = self.slots.get_mut(slot);
        s.segs.truncate(n);
        ind.finish(&s.segs, &self.limits).map_err(|e| e.status())
    }

    /// Makes the pages [`plan_indirect`] left as misses readable (kept in the cache when
    /// it takes them, else for this request only) and parses the descriptors. Returns how
    /// many were read.
    fn parse_indirect(
        &mut self,
        slot: u32,
        ind: &IndirectRequest,
        sources: &mut [IndirectSource],
        now: Instant,
    ) -> Result<usize, i16> {
        let grefs = ind.indirect_grefs();
        let mut misses = [0usize; MAX_INDIRECT_PAGES];
        let mut nr_misses = 0;
        for (i, source) in sources.iter().enumerate() {
            if *source == IndirectSource::Miss {
                misses[nr_misses] = i;
                nr_misses += 1;
            }
        }
        let misses = &misses[..nr_misses];

        // Misses the cache takes: mapped writable, one mapping each, as blkback maps
        // them (no GNTMAP_readonly with persistent grants) and as every kept grant is, so
        // the entry can serve a data page of a READ later. Their shares of the guest's
        // budget are taken first.
        let mut singles: Vec<HeldMapping> = Vec::new();
        let mut writable_refused = false;
        let kept_shares = if !self.persistent
            || self.mode == ResolvedGrantMode::Copy
            || self.indirect_read_only
            || misses.is_empty()
        {
            None
        } else {
            let shares = self.cache.reserve(misses.len());
            if shares.as_ref().map_or(0, |s| s.cost().vmas) < misses.len() {
                // As blkback when a grant does not fit: the next purge makes room.
                self.cache.note_overflow();
            }
            shares
        };
        if let Some(mut shares) = kept_shares {
            let keep = shares.cost().vmas;
            self.grefs.clear();
            self.grefs.extend(misses[..keep].iter().map(|&i| grefs[i]));
            match self
                .platform
                .map_each(self.domid, &self.grefs, Access::ReadWrite)
            {
                Ok(maps) => {
                    for (&i, m) in misses[..keep].iter().zip(maps) {
                        let Some(one) = shares.split_grant() else {
                            // `reserve` took one share per grant: not reached.
                            tracing::error!(
                                gref = grefs[i],
                                "indirect page mapped without its share"
                            );
                            return Err(BLKIF_RSP_ERROR);
                        };
                        sources[i] = match self.cache.add(grefs[i], m, one, now) {
                            Ok(_) => IndirectSource::Added,
                            Err(rejected) => {
                                singles.push(HeldMapping {
                                    mapping: rejected.mapping,
                                    _share: rejected.share,
                                });
                                IndirectSource::Single(singles.len() - 1)
                            }
                        };
                    }
                }
                Err(e) => {
                    // Granted read-only, or not at all: find out below. A map known to
                    // have failed for want of resources says nothing about the grants.
                    tracing::debug!(error = %e, "indirect pages do not map writable");
                    writable_refused = !e.lacks_resources();
                }
            }
        }

        // The rest, for this request only.
        self.grefs.clear();
        for (i, source) in sources.iter_mut().enumerate() {
            if *source == IndirectSource::Miss {
                *source = IndirectSource::Local(self.grefs.len());
                self.grefs.push(grefs[i]);
            }
        }
        let mut batch = None;
        if !self.grefs.is_empty() {
            if self.mode == ResolvedGrantMode::Map {
                // Only read: mapped read-only, unmapped right after parsing; copied like
                // in the other modes when the guest's budget has no room for the mapping
                // or it fails for want of resources.
                match self.map_budgeted(&self.grefs, Access::ReadOnly) {
                    Ok(held) => batch = Some(held),
                    Err(NotMapped::Map(e)) if e.grant_refused() => {
                        tracing::debug!(error = %e, "indirect pages do not map");
                        return Err(BLKIF_RSP_ERROR);
                    }
                    Err(_) => {}
                }
            }
            if batch.is_none() {
                // Copy and map-or-copy modes copy them into private memory (one small
                // copy instead of a read-only map and unmap), and so does map mode when it
                // could not map them.
                let local = self.grefs.len();
                if self.indirect_pages.len() < local {
                    self.indirect_pages.resize(local, [0; PAGE_SIZE]);
                }
                self.copy_segs.clear();
                self.copy_segs
                    .extend(self.grefs.iter().enumerate().map(|(k, &gref)| {
                        CopySegment::new(
                            CopyDirection::FromGuest,
                            self.domid,
                            gref,
                            0,
                            PAGE_SIZE as u16,
                            k * PAGE_SIZE,
                        )
                    }));
                let copied = self.platform.copy_segments(
                    CopyBuffer::Private(self.indirect_pages.as_flattened_mut()),
                    &mut self.copy_segs,
                );
                check_copied(copied, &self.copy_segs)?;
            }
            if writable_refused {
                tracing::debug!(
                    vbd = self.vbd.id.0,
                    ring = self.index,
                    "indirect pages granted read-only: not kept persistently on this ring"
                );
                self.indirect_read_only = true;
            }
        }

        let mut pages = [IndirectPage::Copied(&NO_PAGE); MAX_INDIRECT_PAGES];
        for (i, source) in sources.iter().enumerate() {
            pages[i] = match *source {
                IndirectSource::SameAs(j) => pages[j],
                IndirectSource::Taken | IndirectSource::InUse | IndirectSource::Added => {
                    let Some(mapping) = self.cache.peek(grefs[i]) else {
                        tracing::error!(gref = grefs[i], "indirect page left the cache");
                        return Err(BLKIF_RSP_ERROR);
                    };
                    IndirectPage::Mapped(MappedPage { mapping, page: 0 })
                }
                IndirectSource::Single(k) => IndirectPage::Mapped(MappedPage {
                    mapping: &singles[k].mapping,
                    page: 0,
                }),
                IndirectSource::Local(k) => match &batch {
                    Some(held) => IndirectPage::Mapped(MappedPage {
                        mapping: &held.mapping,
                        page: k,
                    }),
                    None => IndirectPage::Copied(&self.indirect_pages[k]),
                },
                IndirectSource::Miss => unreachable!("every miss was given a source"),
            };
        }
        let s = self.slots.get_mut(slot);
        ind.parse_segments(&pages[..grefs.len()], &mut s.segs)
            .map(<[Segment]>::len)
            .map_err(|e| e.status())
    }

    /// Map mode: makes every data segment's page addressable, from the persistent cache
    /// when possible. Returns [`Acquired::Copy`] in map-or-copy mode, with nothing taken,
    /// when the cache cannot hold the request's grants (all free in it, or room for the
    /// others), and [`Acquired::Fallback`], with nothing taken either, when what the
    /// request would map does not fit its guest's share of the budget or a map failed for
    /// want of resources: the request then goes through bounce buffers instead.
    fn map_segments(&mut self, slot: u32, now: Instant) -> Result<Acquired, i16> {
        let s = self.slots.get_mut(slot);
        s.addrs.clear();
        if !s.has_data() {
            return Ok(Acquired::Mapped);
        }
        self.misses.clear();
        for (i, seg) in s.segs.iter().enumerate() {
            let hit = if self.persistent {
                self.cache.get(seg.gref).map(|m| m.as_ptr() as usize)
            } else {
                None
            };
            match hit {
                Some(addr) => {
                    s.addrs.push(addr);
                    s.persistent.push(seg.gref);
                }
                None => {
                    s.addrs.push(0);
                    self.misses.push(i);
                }
            }
        }
        if self.misses.is_empty() {
            if self.persistent {
                self.stats.persistent_hits.add(s.segs.len() as u64);
            }
            return Ok(Acquired::Mapped);
        }
        // How many misses become persistent: as many as the cache has free entries for,
        // the guest's budget has shares for, and one map call takes; of a gref the
        // request names twice, only the first, and none the cache holds already (it keeps
        // one entry per gref: the others, mapped one VMA each, would be unmapped at
        // completion, and a hostile frontend repeating a gref 4096 times per request
        // would make that many). The shares are taken before anything is mapped.
        let kept_shares = if !self.persistent
            || (self.mode == ResolvedGrantMode::MapOrCopy
                && self.cache.free_entries() < self.misses.len())
        {
            // Map-or-copy: copied whatever the budget says, not counted as its refusal.
            None
        } else {
            let cache = &self.cache;
            let distinct = distinct_first(
                &mut self.misses,
                &s.segs,
                |gref| cache.contains(gref),
                &mut self.dedup,
                &mut self.reordered,
            );
            self.cache.reserve(distinct.min(MAX_MAP_BATCH))
        };
        let room = kept_shares.as_ref().map_or(0, |sh| sh.cost().vmas);
        if self.mode == ResolvedGrantMode::MapOrCopy && self.misses.len() > room {
            // Copied whole: its hits were not used either.
            self.stats.persistent_misses.add(s.segs.len() as u64);
            self.abandon_mapping(slot);
            return Ok(Acquired::Copy);
        }
        if room < self.misses.len() && self.persistent {
            self.cache.note_overflow();
        }
        // The rest is mapped for this request only, in batches: each batch's worst case
        // is taken from the guest's share before anything is mapped, so the request
        // either gets all it needs or maps nothing and is copied.
        let mut batch_shares: Vec<MapShare> = Vec::new();
        for batch in self.misses[room..].chunks(MAX_MAP_BATCH) {
            let cost = MapCost::new(self.platform.max_vmas(batch.len()), batch.len());
            match self.budget.try_take(cost) {
                Some(share) => batch_shares.push(share),
                None => {
                    drop(kept_shares);
                    if self.persistent {
                        // Copied whole: its hits were not used either.
                        let segs = self.slots.get(slot).segs.len();
                        self.stats.persistent_misses.add(segs as u64);
                    }
                    self.abandon_mapping(slot);
                    return Ok(Acquired::Fallback);
                }
            }
        }
        if self.persistent {
            let misses = self.misses.len();
            let s = self.slots.get(slot);
            self.stats
                .persistent_hits
                .add((s.segs.len() - misses) as u64);
            self.stats.persistent_misses.add(misses as u64);
        }
        // The seed maps read-only for requests that only read guest memory, except with
        // persistent grants, whose mappings outlive the request and may serve a READ later.
        let access = if self.persistent || self.slots.get(slot).fills_guest() {
            Access::ReadWrite
        } else {
            Access::ReadOnly
        };
        if let Some(mut shares) = kept_shares {
            // Mapped one grant per mapping so the purge can drop them one by one.
            let s = self.slots.get(slot);
            self.grefs.clear();
            self.grefs
                .extend(self.misses[..room].iter().map(|&i| s.segs[i].gref));
            let maps = match self
                .platform
                .map_each(self.domid, &self.grefs, Access::ReadWrite)
            {
                Ok(maps) => maps,
                Err(e) => return self.map_failed(slot, NotMapped::Map(e)),
            };
            let s = self.slots.get_mut(slot);
            for (&i, m) in self.misses[..room].iter().zip(maps) {
                let gref = s.segs[i].gref;
                let Some(one) = shares.split_grant() else {
                    // `reserve` took one share per grant: not reached.
                    tracing::error!(gref, "persistent grant mapped without its share");
                    return self.map_failed(slot, NotMapped::Budget);
                };
                match self.cache.add(gref, m, one, now) {
                    Ok(m) => {
                        s.addrs[i] = m.as_ptr() as usize;
                        s.persistent.push(gref);
                    }
                    // Not kept after all: used for this request only, with its share.
                    Err(rejected) => {
                        s.addrs[i] = rejected.mapping.as_ptr() as usize;
                        s.mappings.push(HeldMapping {
                            mapping: rejected.mapping,
                            _share: rejected.share,
                        });
                    }
                }
            }
        }
        for (batch, share) in self.misses[room..].chunks(MAX_MAP_BATCH).zip(batch_shares) {
            let s = self.slots.get(slot);
            self.grefs.clear();
            self.grefs.extend(batch.iter().map(|&i| s.segs[i].gref));
            let held = match self.map_with(&self.grefs, access, share) {
                Ok(held) => held,
                Err(e) => return self.map_failed(slot, e),
            };
            let base = held.mapping.as_ptr() as usize;
            let s = self.slots.get_mut(slot);
            for (k, &i) in batch.iter().enumerate() {
                s.addrs[i] = base + k * PAGE_SIZE;
            }
            s.mappings.push(held);
        }
        Ok(Acquired::Mapped)
    }

    /// Maps `refs` of the guest for one request with `share`, taken from the guest's
    /// budget for the platform's worst case; what the mapping did not take is given back.
    fn map_with(
        &self,
        refs: &[GrantRef],
        access: Access,
        mut share: MapShare,
    ) -> Result<HeldMapping, NotMapped> {
        let mapping = self
            .platform
            .map(self.domid, refs, access)
            .map_err(NotMapped::Map)?;
        share.shrink_to(MapCost::new(mapping.vmas(), mapping.pages()));
        Ok(HeldMapping {
            mapping,
            _share: share,
        })
    }

    /// Like [`map_with`](Self::map_with), taking the share first.
    fn map_budgeted(&self, refs: &[GrantRef], access: Access) -> Result<HeldMapping, NotMapped> {
        let cost = MapCost::new(self.platform.max_vmas(refs.len()), refs.len());
        let share = self.budget.try_take(cost).ok_or(NotMapped::Budget)?;
        self.map_with(refs, access, share)
    }

    /// A map of the request's data failed: undoes what it took, and says whether the
    /// request is copied instead or fails.
    fn map_failed(&mut self, slot: u32, why: NotMapped) -> Result<Acquired, i16> {
        self.abandon_mapping(slot);
        let copy = why.copy_instead();
        if let NotMapped::Map(e) = &why {
            tracing::debug!(
                vbd = self.vbd.id.0,
                ring = self.index,
                error = %e,
                copy,
                "grant map failed"
            );
        }
        if copy {
            Ok(Acquired::Fallback)
        } else {
            Err(BLKIF_RSP_ERROR)
        }
    }

    /// Gives back whatever a request took towards mapping its data: persistent grants
    /// (hits and grants just added, free again; their last use unchanged) and mappings
    /// of its own.
    fn abandon_mapping(&mut self, slot: u32) {
        let s = self.slots.get_mut(slot);
        for gref in s.persistent.drain(..) {
            self.cache.unget(gref);
        }
        s.mappings.clear();
        s.addrs.clear();
    }

    /// Counts a request grant-copied because it could not be mapped, and logs the count
    /// when a line is due.
    fn note_fallback(&mut self, now: Instant) {
        self.stats.map_fallbacks.inc();
        self.vbd.map_fallbacks.add(1);
        self.log_fallbacks(now);
    }

    /// At most one warning per [`FALLBACK_LOG_INTERVAL`] per VBD (whichever ring is
    /// first), with the count since the last one.
    fn log_fallbacks(&self, now: Instant) {
        if let Some(count) = self.vbd.map_fallbacks.due(now, FALLBACK_LOG_INTERVAL) {
            let usage = self.budget.usage();
            tracing::warn!(
                vbd = self.vbd.id.0,
                domid = self.domid,
                count,
                held = ?usage.held,
                share = ?usage.share,
                "requests grant-copied instead of mapped: the guest reached its share of \
                 the daemon's grant mappings, or a map failed for want of resources"
            );
        }
    }

    /// Copy mode: moves a request's data between the guest's granted pages and its
    /// bounce pages.
    fn copy_data(&mut self, slot: u32, direction: CopyDirection) -> Result<(), i16> {
        let pool = self
            .bounce
            .as_ref()
            .expect("a copied request has a bounce pool");
        let s = self.slots.get(slot);
        self.copy_segs.clear();
        self.copy_segs
            .extend(s.segs.iter().zip(&s.bounce).map(|(seg, &page)| {
                CopySegment::new(
                    direction,
                    self.domid,
                    seg.gref,
                    seg.offset_bytes() as u16,
                    seg.len_bytes() as u16,
                    BouncePool::offset(page) + seg.offset_bytes(),
                )
            }));
        let copied = self
            .platform
            .copy_segments(CopyBuffer::Shared(pool.region()), &mut self.copy_segs);
        check_copied(copied, &self.copy_segs)
    }

    /// Gives an idle bounce pool's memory back after [`BOUNCE_IDLE`] without use.
    fn reclaim_bounce(&mut self, now: Instant) {
        let Some(pool) = self.bounce.as_mut() else {
            return;
        };
        if std::mem::take(&mut self.bounce_used) || pool.in_use() > 0 {
            self.bounce_idle_since = None;
            return;
        }
        let since = *self.bounce_idle_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= BOUNCE_IDLE {
            let bytes = pool.reclaim();
            if bytes > 0 {
                tracing::debug!(
                    vbd = self.vbd.id.0,
                    ring = self.index,
                    bytes,
                    "idle bounce pages released"
                );
            }
        }
    }

    fn purge(&mut self, now: Instant) {
        if !self.persistent {
            return;
        }
        let purged = self.cache.purge(now);
        if !purged.is_empty() {
            tracing::trace!(
                vbd = self.vbd.id.0,
                ring = self.index,
                n = purged.len(),
                "unmapping purged persistent grants"
            );
        }
        drop(purged);
    }
}

/// Reorders `misses` (indices into `segs`) so that those not worth mapping for the cache
/// come last, the order otherwise kept: a gref an earlier miss already names, or one the
/// cache already holds (in use by another request: only a mapping for this request will
/// do). Returns how many come first. The scratch vectors keep their capacity.
fn distinct_first(
    misses: &mut Vec<usize>,
    segs: &[Segment],
    kept: impl Fn(u32) -> bool,
    scratch: &mut Vec<(u32, u32)>,
    reordered: &mut Vec<usize>,
) -> usize {
    scratch.clear();
    scratch.extend(
        misses
            .iter()
            .enumerate()
            .map(|(pos, &i)| (segs[i].gref, pos as u32)),
    );
    scratch.sort_unstable();
    if scratch.windows(2).all(|w| w[0].0 != w[1].0) && !scratch.iter().any(|&(g, _)| kept(g)) {
        return misses.len();
    }
    // Within a run of one gref the first position is the original. The key becomes
    // "goes last", walking backwards so each comparison still sees the grefs.
    for k in (0..scratch.len()).rev() {
        let gref = scratch[k].0;
        let repeat = k > 0 && gref == scratch[k - 1].0;
        scratch[k].0 = u32::from(repeat || kept(gref));
    }
    scratch.sort_unstable();
    reordered.clear();
    reordered.extend(scratch.iter().map(|&(_, pos)| misses[pos as usize]));
    std::mem::swap(misses, reordered);
    scratch.iter().filter(|&&(last, _)| last == 0).count()
}

/// The outcome of a grant copy as a response status.
fn check_copied(
    copied: Result<(), platform::PlatformError>,
    segs: &[CopySegment],
) -> Result<(), i16> {
    if let Err(e) = copied {
        tracing::debug!(error = %e, "grant copy failed");
        return Err(BLKIF_RSP_ERROR);
    }
    if let Some(seg) = segs.iter().find(|s| !s.status.is_ok()) {
        tracing::debug!(gref = seg.gref, status = %seg.status, "grant copy refused");
        return Err(BLKIF_RSP_ERROR);
    }
    Ok(())
}

/// Bytes of a data chunk starting at segment `first`.
fn segs_bytes(segs: &[Segment], first: usize) -> usize {
    segs.get(first..(first + MAX_IOV).min(segs.len()))
        .map_or(0, |c| c.iter().map(|g| g.len_bytes()).sum())
}

/// Storage tags: the slot in the low half, the data chunk in the high half.
fn tag(slot: u32, chunk: usize) -> u64 {
    u64::from(slot) | ((chunk as u64) << 32)
}

fn untag(tag: u64) -> (u32, usize) {
    (tag as u32, (tag >> 32) as usize)
}

impl RingTask for RingRunner {
    fn vbd(&self) -> VbdId {
        self.vbd.id
    }

    fn index(&self) -> usize {
        self.index
    }

    fn fds(&self) -> Vec<BorrowedFd<'_>> {
        vec![self.evtchn.fd(), self.queue.completion_fd()]
    }

    fn ready(&mut self, which: usize) {
        if which == 0 {
            self.evtchn_fired = true;
        }
    }

    fn run(&mut self) -> Option<Duration> {
        self.process();
        // Responses went out: the frontend refills the ring right after it reads them.
        std::mem::take(&mut self.answered)
            .then_some(self.poll)
            .filter(|p| !p.is_zero())
    }

    fn has_requests(&self) -> bool {
        self.consuming() && self.slots.has_free() && self.ring.unconsumed_requests() > 0
    }

    fn tick(&mut self, now: Instant) {
        self.purge(now);
        self.reclaim_bounce(now);
        // Fallbacks counted since the last line are logged once the interval is over,
        // even if no further one comes to trigger it.
        self.log_fallbacks(now);
        if let Some(at) = self.next_resize {
            if now >= at {
                if let Err(e) = self.vbd.refresh_size() {
                    tracing::warn!(vbd = self.vbd.id.0, error = %e, "cannot re-read storage size");
                }
                self.next_resize = self.resize_poll.map(|p| now + p);
            }
        }
        // Waiting work, and rings being drained, are also driven by the tick: a lost
        // wake-up then costs at most one tick, never a hang of detach.
        let draining = self.state == State::Closing && self.slots.in_use() > 0;
        if draining || !self.retry.is_empty() || self.stalled.is_some() || self.barrier.is_some() {
            self.process();
        } else {
            self.update_gauges();
        }
    }

    fn close(&mut self) {
        if self.state != State::Closing {
            tracing::debug!(
                vbd = self.vbd.id.0,
                ring = self.index,
                in_flight = self.slots.in_use(),
                "ring closing"
            );
        }
        self.state = State::Closing;
        self.process();
    }

    fn drained(&self) -> bool {
        self.state == State::Closing && self.slots.in_use() == 0
    }

    fn stats(&self) -> Stats {
        self.stats.snapshot()
    }
}

impl Drop for RingRunner {
    fn drop(&mut self) {
        let busy: Vec<u32> = self.slots.busy_indices().collect();
        if !busy.is_empty() {
            tracing::warn!(
                vbd = self.vbd.id.0,
                ring = self.index,
                in_flight = busy.len(),
                "dropping a ring with requests in flight"
            );
        }
        self.stats.in_flight.set(0);
        self.stats.persistent_in_use.set(0);
        self.stats.persistent_mapped.set(0);
        // The fields are dropped after this body, in declaration order: the storage queue
        // first (waiting for the kernel), then the memory its operations pointed into.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persistent_grants::PersistentGrantLimits;
    use std::sync::atomic::AtomicBool;

    fn cache(max: usize) -> PersistentGrantCache<u32> {
        PersistentGrantCache::new(
            PersistentGrantLimits {
                max_grants: max,
                unused_timeout: Duration::from_secs(60),
            },
            Arc::new(AtomicBool::new(false)),
            crate::grant_budget::MapBudget::unlimited().guest(1),
        )
    }

    #[test]
    fn indirect_pages_are_taken_from_the_cache_once_per_gref() {
        use IndirectSource::*;
        let t = Instant::now();
        let mut c = cache(16);
        for gref in [10, 11, 12] {
            let share = c.reserve(1).unwrap();
            c.add(gref, gref * 100, share, t).unwrap();
            c.put(gref, t);
        }
        // 12 is another in-flight request's data page.
        c.get(12).unwrap();
        let mut sources = [Miss; MAX_INDIRECT_PAGES];
        let grefs = [10, 20, 10, 12, 20, 11];
        let (hits, misses) = plan_indirect(&grefs, Some(&mut c), &mut sources[..grefs.len()]);
        assert_eq!(
            sources[..grefs.len()],
            [Taken, Miss, SameAs(0), InUse, SameAs(1), Taken]
        );
        // Repeats are neither: one lookup per distinct gref.
        assert_eq!((hits, misses), (3, 1));
        // Taken ones are active until returned; the one in use elsewhere was not taken
        // a second time.
        assert_eq!(c.in_use(), 3);
        assert!(c.is_active(10) && c.is_active(11) && c.is_active(12));
        assert_eq!(c.peek(12), Some(&1200));

        // Without persistent grants: every distinct gref is a miss, repeats still shared.
        let mut sources = [Miss; MAX_INDIRECT_PAGES];
        let (hits, misses) = plan_indirect::<u32>(&[7, 7, 8], None, &mut sources[..3]);
        assert_eq!(sources[..3], [Miss, SameAs(0), Miss]);
        assert_eq!((hits, misses), (0, 2));
    }

    #[test]
    fn repeated_grefs_go_last_in_order() {
        let segs: Vec<Segment> = [5, 9, 5, 3, 9, 5, 7]
            .into_iter()
            .map(|gref| Segment {
                gref,
                first_sect: 0,
                last_sect: 7,
            })
            .collect();
        let (mut scratch, mut reordered) = (Vec::new(), Vec::new());
        // Misses are segment indices; here every segment but the last one missed.
        let none = |_| false;
        let mut misses = vec![0, 1, 2, 3, 4, 5];
        let distinct = distinct_first(&mut misses, &segs, none, &mut scratch, &mut reordered);
        assert_eq!(distinct, 3);
        assert_eq!(misses, vec![0, 1, 3, 2, 4, 5]);
        // No repeat: untouched.
        let mut misses = vec![3, 6, 0];
        assert_eq!(
            distinct_first(&mut misses, &segs, none, &mut scratch, &mut reordered),
            3
        );
        assert_eq!(misses, vec![3, 6, 0]);
        // Grefs the cache holds go last too, repeated or not.
        let mut misses = vec![0, 1, 2, 3, 6];
        let kept = |gref| gref == 5 || gref == 7;
        assert_eq!(
            distinct_first(&mut misses, &segs, kept, &mut scratch, &mut reordered),
            2
        );
        assert_eq!(misses, vec![1, 3, 0, 2, 6]);
        let mut misses = Vec::new();
        assert_eq!(
            distinct_first(&mut misses, &segs, none, &mut scratch, &mut reordered),
            0
        );
    }
}
