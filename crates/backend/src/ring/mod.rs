//! One ring of a VBD, run by its reactor: blkback's `xen_blkif_ring`. This module owns
//! the pass loop, from the frontend's notification to the responses; the request's life
//! is in the submodules, in the order a request meets them:
//! - [`indirect`]: an indirect request's descriptor pages, read once;
//! - [`acquire`]: its data pages made addressable (persistent grant, mapping, or bounce
//!   pages and grant copy), within the guest's grant-mapping budget;
//! - [`pages`]: [`DataPages`](pages::DataPages), what the request holds of them until
//!   its last storage operation was reaped;
//! - [`request`]: the request's slot, its phases and storage operations;
//! - [`lifecycle`]: the steps above in order, from the slot a request is accepted into to
//!   its response.
//!
//! Per wake-up ([`RingRunner::run`]), in passes until one makes no progress:
//! 1. acknowledge the event channel (consume and unmask; first pass only);
//! 2. reap storage completions and finish the requests whose last operation completed:
//!    copy read data out (bounce pages), release the pages (persistent grants go back to
//!    the cache, the others are unmapped), write the response;
//! 3. publish those responses, and notify the frontend if it asked (blkback's
//!    per-response check: the frontend re-arms only when it runs dry, so this is one
//!    kick per frontend wake-up), before spending time on new requests;
//! 4. consume requests while a request slot is free: copy each out of the ring once,
//!    validate it (blkif), read indirect descriptors once, acquire its data pages, and
//!    queue its storage operations;
//! 5. commit the storage queue once (one syscall for the whole batch), publish again.
//!
//! WRITE_BARRIER first waits until it is the only request in flight (consumption stops
//! meanwhile, as blkback's `xen_blk_drain_io`), then runs, and consumption resumes only
//! after it completed. A response is written only after every storage operation of the
//! request completed, so a write is acknowledged only once the storage completed it and a
//! flush only once the data is durable.
//!
//! Failures stay with their request: a request that fails validation, whose grants the
//! hypervisor refuses, or whose storage operation fails gets `BLKIF_RSP_ERROR` (or
//! `BLKIF_RSP_EOPNOTSUPP`) and nothing else changes. A frontend that overflows the ring
//! halts this ring only; requests already in flight still complete and are answered.
//!
//! The small per-request steps the submodules call in each other carry `#[inline]`:
//! once `ring.rs` was split into these modules they landed in different codegen units,
//! LLVM stopped inlining them, and a 4 KiB request cost 10 % more instructions than with
//! the single file (callgrind, issue 13; BENCHMARKS.md).

mod acquire;
mod indirect;
mod lifecycle;
mod pages;
mod request;

use std::collections::VecDeque;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkif::abi::{BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_OKAY};
use blkif::{BackRing, DeviceLimits, Response};
use platform::{DomId, EventChannel, Platform};
use storage::StorageQueue;

use self::acquire::{Acquired, PageSource, PageSourceParts};
use self::request::{InFlight, Phase, Step, MAX_IOV};
use crate::grant_budget::{GuestBudget, MapReservation};
use crate::persistent_grants::{PersistentGrantCache, PersistentGrantLimits};
use crate::qos::Cost;
use crate::reactor::{RingTask, VbdId};
use crate::stats::{RingStats, Stats};
use crate::vbd::{QosBinding, ResolvedGrantMode, VbdEvent, VbdShared};

/// Data queued for the storage beyond which `consume` commits before taking the next
/// request: a batch of small requests still goes to the kernel in one syscall, while a
/// batch of large ones (each with a copy or map to set up first) starts the storage on
/// the first instead of after the last.
const COMMIT_BYTES: usize = 256 << 10;

/// Which ring, for log lines.
#[derive(Debug, Clone, Copy)]
struct Who {
    vbd: u64,
    ring: usize,
}

/// What a ring is doing with new requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    /// The frontend overflowed the ring: nothing more is consumed.
    Halted,
    /// Detach or shutdown: nothing more is consumed; in-flight requests finish.
    Closing,
}

/// A request accepted into its slot and held there by the VBD's (or its group's) QoS
/// limits: nothing more is consumed until it may start.
#[derive(Debug, Clone, Copy)]
struct Held {
    slot: u32,
    cost: Cost,
    /// When it was held (for `throttled_ns`).
    since: Instant,
    /// When the buckets allow it, as of the last check: the reactor's timer.
    until: Instant,
}

/// Everything needed to build a ring, prepared by the attaching thread.
pub(crate) struct RingParts {
    pub(crate) index: usize,
    pub(crate) ring: BackRing,
    pub(crate) evtchn: Box<dyn EventChannel>,
    pub(crate) queue: Box<dyn StorageQueue>,
    /// The ring's journal file, removed once the ring closed with nothing in flight.
    pub(crate) journal_path: Option<std::path::PathBuf>,
}

/// How often a ring the reactor has not run since its last housekeeping is looked after
/// (persistent-grant purge, bounce reclaim, fallback log, gauges): a ring that ran gets it
/// at every tick (100 ms).
pub(crate) const IDLE_HOUSEKEEPING: Duration = Duration::from_secs(1);

/// One ring and all it owns. Nothing here depends on the order its fields are dropped
/// in: every page a storage operation points into is held by the operation's request in
/// `io`, which drops its queue (waiting for the kernel) before its requests.
pub(crate) struct RingRunner {
    /// The storage queue and the requests in flight.
    io: InFlight,
    /// The page-acquisition policy: persistent grants, mappings, bounce pages.
    pages: PageSource,
    ring: BackRing,
    evtchn: Box<dyn EventChannel>,
    vbd: Arc<VbdShared>,
    stats: Arc<RingStats>,
    index: usize,
    limits: DeviceLimits,
    limits_generation: u64,
    state: State,
    /// A barrier that was accepted: while set, nothing more is consumed.
    barrier: Option<u32>,
    /// A request waiting for bounce pages: while set, nothing more is consumed.
    stalled: Option<u32>,
    /// The VBD's throttles, as of `limits_generation`.
    qos: QosBinding,
    /// A request waiting for its QoS limits: while set, nothing more is consumed.
    held: Option<Held>,
    /// Requests with operations the storage queue had no room for.
    retry: VecDeque<u32>,
    completions: Vec<(u64, io::Result<u64>)>,
    evtchn_fired: bool,
    /// Responses were published since the last `run`.
    answered: bool,
    /// See [`crate::VbdLimits::poll`].
    poll: Duration,
    /// Responses written since the last publication.
    responses_unpublished: bool,
    resize_poll: Option<Duration>,
    next_resize: Option<Instant>,
    /// The reactor ran this ring since its last housekeeping.
    ran_since_housekeeping: bool,
    /// When an idle ring's housekeeping is due next ([`IDLE_HOUSEKEEPING`]).
    next_idle_housekeeping: Instant,
    /// What this ring maps besides its guest's grant mappings (`None` when the budget
    /// was sized by hand); given back when the ring is dropped.
    _map_reserve: Option<MapReservation>,
    journal_path: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for RingRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingRunner")
            .field("vbd", &self.vbd.id)
            .field("index", &self.index)
            .field("state", &self.state)
            .field("io", &self.io)
            .field("pages", &self.pages)
            .finish_non_exhaustive()
    }
}

pub(crate) struct RingConfig {
    pub(crate) vbd: Arc<VbdShared>,
    pub(crate) platform: Arc<dyn Platform>,
    pub(crate) domid: DomId,
    pub(crate) persistent: bool,
    pub(crate) persistent_limits: PersistentGrantLimits,
    pub(crate) mode: ResolvedGrantMode,
    pub(crate) max_buffer_pages: usize,
    pub(crate) resize_poll: Option<Duration>,
    pub(crate) poll: Duration,
    pub(crate) budget: GuestBudget,
    pub(crate) map_reserve: Option<MapReservation>,
}

impl RingRunner {
    pub(crate) fn new(parts: RingParts, cfg: RingConfig) -> io::Result<Self> {
        let ring_size = parts.ring.size();
        let size = ring_size as usize;
        let max_segs = (cfg.vbd.max_indirect_segments as usize)
            .max(blkif::abi::BLKIF_MAX_SEGMENTS_PER_REQUEST);
        let stats = cfg.vbd.ring_stats[parts.index].clone();
        let who = Who {
            vbd: cfg.vbd.id.0,
            ring: parts.index,
        };
        let pages = PageSource::new(PageSourceParts {
            cache: PersistentGrantCache::new(
                cfg.persistent_limits
                    .for_ring(ring_size, cfg.vbd.max_indirect_segments),
                cfg.vbd.persistent_overflow.clone(),
                cfg.budget.clone(),
            ),
            platform: cfg.platform,
            domid: cfg.domid,
            budget: cfg.budget,
            persistent: cfg.persistent,
            mode: cfg.mode,
            bounce_pages: cfg.max_buffer_pages.max(max_segs),
            stats: stats.clone(),
            vbd: cfg.vbd.clone(),
            who,
        })?;
        let next_resize = (parts.index == 0)
            .then(|| cfg.resize_poll.map(|p| Instant::now() + p))
            .flatten();
        Ok(Self {
            io: InFlight::new(parts.queue, ring_size, who),
            pages,
            ring: parts.ring,
            evtchn: parts.evtchn,
            stats,
            index: parts.index,
            limits: cfg.vbd.device_limits(),
            limits_generation: cfg.vbd.generation(),
            state: State::Running,
            barrier: None,
            stalled: None,
            qos: cfg.vbd.qos(),
            held: None,
            retry: VecDeque::with_capacity(size),
            completions: Vec::with_capacity(size),
            evtchn_fired: true,
            answered: false,
            poll: cfg.poll,
            responses_unpublished: false,
            resize_poll: cfg.resize_poll,
            next_resize,
            ran_since_housekeeping: true,
            next_idle_housekeeping: Instant::now(),
            _map_reserve: cfg.map_reserve,
            journal_path: parts.journal_path,
            vbd: cfg.vbd,
        })
    }

    /// Storage queue depth a ring of `ring_size` slots needs: every slot may have all the
    /// chunks of a maximal request in flight.
    pub(crate) fn queue_depth(ring_size: u32, max_indirect_segments: u32) -> u32 {
        let max_segs = (max_indirect_segments as usize).max(1);
        let chunks = u32::try_from(max_segs.div_ceil(MAX_IOV)).unwrap_or(u32::MAX);
        ring_size
            .saturating_mul(chunks)
            .clamp(1, storage::MAX_QUEUE_DEPTH)
    }

    fn who(&self) -> Who {
        self.pages.who
    }

    /// Picks up a resize, a lost feature or new QoS limits published by another thread.
    fn refresh_limits(&mut self) {
        let g = self.vbd.generation();
        if g != self.limits_generation {
            self.limits = self.vbd.device_limits();
            self.qos = self.vbd.qos();
            self.limits_generation = g;
        }
    }

    fn consuming(&self) -> bool {
        self.state == State::Running
            && self.barrier.is_none()
            && self.stalled.is_none()
            && self.held.is_none()
    }

    fn process(&mut self) {
        #[cfg(feature = "fault-injection")]
        if crate::fault::take_panic(self.vbd.id, self.index) {
            panic!("injected fault (fault-injection feature)");
        }
        if std::mem::take(&mut self.evtchn_fired) {
            if let Err(e) = self.evtchn.ack() {
                tracing::warn!(vbd = self.vbd.id.0, ring = self.index, error = %e, "event channel ack failed");
            }
        }
        self.refresh_limits();

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
            // One clock reading per pass (not per request): the time of the requests'
            // latency (`crate::latency`), of persistent-grant use and of bounce pages.
            let now = Instant::now();
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
        let cache = &self.pages.cache;
        self.stats.in_flight.set(self.io.slots().in_use() as u64);
        self.stats.persistent_in_use.set(cache.in_use() as u64);
        self.stats.persistent_mapped.set(cache.len() as u64);
        self.stats
            .persistent_budget_refusals
            .set(cache.budget_refusals());
    }

    /// Reaps storage completions. Returns whether any arrived.
    fn reap(&mut self, now: Instant) -> bool {
        let mut done = std::mem::take(&mut self.completions);
        let n = self.io.reap(&mut done);
        for (tag, result) in done.drain(..) {
            match self.io.complete(tag, result) {
                Some((slot, Step::Next)) => self.submit_phase(slot, now),
                Some((slot, Step::Done)) => self.finish(slot, now),
                Some((_, Step::Wait)) | None => {}
            }
        }
        self.completions = done;
        n > 0
    }

    /// Restarts work that was waiting: storage-queue room, QoS limits, bounce pages, a
    /// barrier's drain. Returns whether anything moved.
    fn resume(&mut self, now: Instant) -> bool {
        let mut progress = false;
        if let Some(held) = self.held {
            // A closing ring answers what it took without waiting for the limits: a
            // detach, pause or handover must not wait for them.
            let admitted = if self.state == State::Running {
                self.admit(held.cost, now)
            } else {
                Ok(())
            };
            match admitted {
                Ok(()) => {
                    self.held = None;
                    let waited = now.saturating_duration_since(held.since);
                    self.stats
                        .throttled_ns
                        .add(u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX));
                    progress = true;
                    self.start(held.slot, now);
                }
                Err(until) => self.held = Some(Held { until, ..held }),
            }
        }
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
            let acquired = self.pages.bounce_in(self.io.slots_mut().get_mut(slot));
            if acquired != Acquired::Wait {
                self.stalled = None;
                progress = true;
                self.acquired(slot, acquired, now);
            }
        }
        if let Some(slot) = self.barrier {
            let slots = self.io.slots();
            if slots.get(slot).phase == Phase::Idle && slots.in_use() == 1 {
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
            if !self.io.slots().has_free() {
                if self.ring.unconsumed_requests() > 0 {
                    // blkback's st_oo_req: a request waits and no pending_req is free. A
                    // completion frees a slot and runs the ring again.
                    self.stats.oo_req.inc();
                }
                break;
            }
            let popped = match self.ring.pop() {
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
            self.dispatch(popped, now);
            if self.io.uncommitted_bytes() >= COMMIT_BYTES {
                // Large requests cost time to set up (copies, maps): start the storage
                // on what is ready instead of holding it until the whole batch is.
                self.commit();
            }
        }
        progress
    }

    /// Hands the queued storage operations to the kernel.
    fn commit(&mut self) {
        if let Err(e) = self.io.commit() {
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
    fn respond_now(&mut self, ticket: blkif::Ticket, response: Response) {
        if response.status == BLKIF_RSP_EOPNOTSUPP {
            self.stats.unsupported.inc();
        } else if response.status != BLKIF_RSP_OKAY {
            self.stats.errors.inc();
        }
        match self.ring.answer(ticket, &response) {
            Ok(()) => self.responses_unpublished = true,
            Err(e) => {
                tracing::error!(vbd = self.vbd.id.0, ring = self.index, error = %e, "cannot push response")
            }
        }
    }
}

impl RingTask for RingRunner {
    fn vbd(&self) -> VbdId {
        self.vbd.id
    }

    fn index(&self) -> usize {
        self.index
    }

    fn fds(&self) -> Vec<BorrowedFd<'_>> {
        vec![self.evtchn.fd(), self.io.queue().completion_fd()]
    }

    fn ready(&mut self, which: usize) {
        if which == 0 {
            self.evtchn_fired = true;
        }
    }

    fn run(&mut self) -> Option<Duration> {
        self.ran_since_housekeeping = true;
        self.process();
        // Responses went out: the frontend refills the ring right after it reads them.
        // Unless a request is held by the QoS limits: nothing more is taken before its
        // timer, so polling for the next batch would only spin.
        std::mem::take(&mut self.answered)
            .then_some(self.poll)
            .filter(|p| !p.is_zero() && self.held.is_none())
    }

    fn wake_at(&self) -> Option<Instant> {
        self.held.map(|h| h.until)
    }

    fn has_requests(&self) -> bool {
        self.consuming() && self.io.slots().has_free() && self.ring.unconsumed_requests() > 0
    }

    fn tick(&mut self, now: Instant) {
        // Waiting work, and rings being drained, are also driven by the tick: a lost
        // wake-up then costs at most one tick, never a hang of detach. A request held by
        // QoS has the reactor's timer; the tick also picks up limits lifted meanwhile.
        let draining = self.state == State::Closing && self.io.slots().in_use() > 0;
        let waiting = draining
            || !self.retry.is_empty()
            || self.stalled.is_some()
            || self.barrier.is_some()
            || self.held.is_some();
        // A ring that has not run since its last housekeeping has only expiries to look
        // for (grants unused too long, a share another guest shrank, bounce pages, the
        // fallback log's interval): it is looked after once a second, not at every tick.
        // With 2,002 idle rings (scripts/many-vbds) visiting each at every tick was most
        // of an idle daemon's CPU (perf: purge, fallback log, gauges).
        let resize_due = self.next_resize.is_some_and(|at| now >= at);
        if !waiting
            && !resize_due
            && !std::mem::take(&mut self.ran_since_housekeeping)
            && now < self.next_idle_housekeeping
        {
            return;
        }
        self.next_idle_housekeeping = now + IDLE_HOUSEKEEPING;
        self.pages.purge(now);
        self.pages.reclaim_bounce(now);
        // Fallbacks counted since the last line are logged once the interval is over,
        // even if no further one comes to trigger it.
        self.pages.log_fallbacks(now);
        if let Some(at) = self.next_resize {
            if now >= at {
                if let Err(e) = self.vbd.refresh_size() {
                    tracing::warn!(vbd = self.vbd.id.0, error = %e, "cannot re-read storage size");
                }
                self.next_resize = self.resize_poll.map(|p| now + p);
            }
        }
        if waiting {
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
                in_flight = self.io.slots().in_use(),
                "ring closing"
            );
        }
        self.state = State::Closing;
        self.process();
    }

    fn drained(&self) -> bool {
        self.state == State::Closing && self.io.slots().in_use() == 0
    }

    fn stats(&self) -> Stats {
        self.stats.snapshot()
    }

    fn panicked(&mut self, message: &str) {
        self.state = State::Halted;
        self.stats
            .halted
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.vbd.emit(VbdEvent::RingHalted {
            ring: self.index,
            reason: format!("internal error (panic: {message}); this ring is stopped"),
        });
    }
}

impl Drop for RingRunner {
    fn drop(&mut self) {
        let in_flight = self.io.slots().in_use();
        if in_flight > 0 {
            tracing::warn!(
                vbd = self.vbd.id.0,
                ring = self.index,
                in_flight,
                "dropping a ring with requests in flight"
            );
        }
        self.stats.in_flight.set(0);
        self.stats.persistent_in_use.set(0);
        self.stats.persistent_mapped.set(0);
        // Closed and drained (a detach, a handover): every request consumed was answered
        // and published, so the journal records nothing a next process needs. A ring of a
        // VBD that was removed (its device closed, failed or gone) has no next process
        // either, whatever it had in flight (a drain that timed out, a ring halted by a
        // panic). Only a ring dropped mid-I/O during a handover keeps it, for the next
        // daemon (and a killed process drops nothing).
        if let Some(path) = &self.journal_path {
            let drained = self.state == State::Closing && in_flight == 0;
            let device_ends = self.vbd.removed.load(Ordering::SeqCst)
                && !self.vbd.handing_over.load(Ordering::SeqCst);
            if drained || device_ends {
                if let Err(e) = std::fs::remove_file(path) {
                    tracing::warn!(vbd = self.vbd.id.0, ring = self.index, path = %path.display(), error = %e, "cannot remove the ring's journal");
                }
            }
        }
    }
}
