//! What a VBD is to the engine: its specification ([`VbdSpec`], [`RingSpec`]), the
//! choices it was attached with ([`GrantMode`], [`VbdLimits`]), and the state its rings
//! share (`VbdShared`): size, still-supported features, the persistent-grant overflow
//! flag, per-ring statistics, and the callback through which the xenbus layer learns
//! about resizes, lost features and halted rings.
//!
//! Everything shared is atomic: rings of one VBD run on different reactor threads and
//! never lock each other out; the control thread reads statistics and triggers resizes
//! concurrently.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blkif::{DeviceLimits, Protocol};
use platform::{DomId, GrantRef, Port};
use storage::Storage;

use crate::persistent_grants::PersistentGrantLimits;
use crate::qos::{QosLimits, Throttle};
use crate::reactor::VbdId;
use crate::stats::{RateLimitedCount, RingStats, VbdStats};

/// blkback's default `max_indirect_segments` advertised as
/// `feature-max-indirect-segments`.
pub const DEFAULT_MAX_INDIRECT_SEGMENTS: u32 = 256;
/// Most indirect segments a VBD may advertise: 8 descriptor pages of 512 descriptors.
pub const MAX_INDIRECT_SEGMENTS: u32 = 4096;
/// Most pages in one ring (`ring-page-order` 4).
pub const MAX_RING_PAGES: usize = 16;

/// How the data of READ/WRITE requests moves between guest pages and storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GrantMode {
    /// Map the guest's pages and let storage do I/O straight into them (blkback).
    Map,
    /// Grant-copy between guest pages and backend-owned bounce buffers (qdisk).
    Copy,
    /// Let the engine choose: with persistent grants, map what the persistent-grant
    /// cache can keep and grant-copy a request whose grants it cannot
    /// ([`ResolvedGrantMode::MapOrCopy`]); without, copy (one copy call per request
    /// instead of a map and an unmap). Decided from measurements, see BENCHMARKS.md.
    #[default]
    Auto,
}

impl GrantMode {
    /// The mode a VBD actually uses.
    pub fn resolve(self, persistent: bool) -> ResolvedGrantMode {
        match self {
            GrantMode::Map => ResolvedGrantMode::Map,
            GrantMode::Copy => ResolvedGrantMode::Copy,
            GrantMode::Auto if persistent => ResolvedGrantMode::MapOrCopy,
            GrantMode::Auto => ResolvedGrantMode::Copy,
        }
    }
}

/// [`GrantMode`] after `Auto` was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedGrantMode {
    Map,
    Copy,
    /// Persistent grants are mapped and kept (the steady state maps nothing); a request
    /// whose grants would overflow the persistent-grant cache is grant-copied through
    /// bounce buffers rather than mapped and unmapped around its I/O. A frontend whose
    /// working set exceeds the cache (large requests at depth: 32 x 1 MiB is 8 224
    /// grants against blkback's 1 056; the default cache is sized to hold that, but a
    /// fixed `max_persistent_grants` or a full grant budget may not) then costs a copy
    /// per request instead of a map, an unmap (and its TLB shootdown on Xen) per page.
    MapOrCopy,
}

/// One ring ("queue") of a VBD, as the frontend published it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingSpec {
    /// `ring-ref` or `ring-ref0..N`: 1, 2, 4, 8 or 16 grant references.
    pub ring_refs: Vec<GrantRef>,
    /// The frontend's unbound `event-channel` port.
    pub event_channel: Port,
}

/// Tunables of a VBD, the module parameters of blkback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VbdLimits {
    /// `feature-max-indirect-segments` to advertise (0 disables indirect requests).
    pub max_indirect_segments: u32,
    /// Persistent-grant cache limits per ring.
    pub persistent: PersistentGrantLimits,
    /// Most bounce pages one ring may hold in copy mode (blkback's `max_buffer_pages`);
    /// raised to one maximal request if smaller.
    pub max_buffer_pages: usize,
    /// How often ring 0 of the VBD re-reads the storage size (online resize). `None`
    /// only on request ([`crate::VbdHandle::refresh_size`]).
    pub resize_poll: Option<Duration>,
    /// After a ring answered a batch, its reactor polls the ring and its completion
    /// queue (no system call) for the frontend's next requests before it sleeps, for
    /// about twice the frontend's measured turnaround and at most this long (not at all
    /// when the frontend is usually slower). Catching them saves a sleep and a wake-up
    /// per batch, at the cost of up to this much CPU per batch answered; an idle ring
    /// never polls. Zero: never poll. Default [`DEFAULT_POLL`].
    pub poll: Duration,
}

impl Default for VbdLimits {
    fn default() -> Self {
        Self {
            max_indirect_segments: DEFAULT_MAX_INDIRECT_SEGMENTS,
            persistent: PersistentGrantLimits::default(),
            max_buffer_pages: crate::bounce::DEFAULT_MAX_BUFFER_PAGES,
            resize_poll: Some(Duration::from_secs(1)),
            poll: DEFAULT_POLL,
        }
    }
}

/// The default cap of a ring's adaptive polling ([`VbdLimits::poll`]): about what a
/// sleep and a wake-up of an idle CPU cost, so polling for a batch that then does not
/// come costs at most what the wake-up it tried to save would have.
pub const DEFAULT_POLL: Duration = Duration::from_micros(50);

/// Features the backend advertises that a storage can turn out not to support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    /// `feature-flush-cache`.
    pub flush: bool,
    /// `feature-barrier`.
    pub barrier: bool,
    /// `feature-discard`.
    pub discard: bool,
    /// `discard-secure`.
    pub secure_discard: bool,
}

/// Something the xenbus layer must reflect in xenstore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VbdEvent {
    /// The storage changed size: write `sectors` (and the state node, as
    /// `xen_vbd_resize` does, so the frontend notices).
    Resized { sectors: u64 },
    /// The storage refused an operation as unsupported: rewrite the feature nodes, as
    /// blkback's `xen_blkbk_flush_diskcache` / `xen_blkbk_barrier` do.
    FeaturesChanged(Features),
    /// The frontend overflowed ring `ring`, which no longer consumes requests; `reason`
    /// says how. The engine does not log this beyond debug: a guest can make it happen on
    /// every ring of every session, so the owner, who knows the device across sessions,
    /// reports it (rate-limited).
    RingHalted { ring: usize, reason: String },
}

/// Receives [`VbdEvent`]s. Called from reactor threads: must not block (send on a
/// channel, set a flag).
pub type EventCallback = Arc<dyn Fn(VbdId, VbdEvent) + Send + Sync>;

/// Everything [`crate::Engine::attach`] needs to serve one VBD.
#[derive(Clone)]
pub struct VbdSpec {
    /// The frontend's domain.
    pub domid: DomId,
    pub storage: Arc<dyn Storage>,
    /// `mode = r`: writes, flushes, barriers and discards are refused.
    pub read_only: bool,
    /// 1..N rings (multi-queue); ring `i` is `queue-i`.
    pub rings: Vec<RingSpec>,
    /// The frontend's `protocol`.
    pub protocol: Protocol,
    /// Both ends negotiated `feature-persistent`.
    pub persistent: bool,
    pub grant_mode: GrantMode,
    /// Features advertised; each is also limited by what the storage offers.
    pub features: Features,
    pub limits: VbdLimits,
    /// Where resizes, lost features and halted rings are reported.
    pub events: Option<EventCallback>,
    /// Where the rings keep their crash-recovery journals; `None`: no journal (a daemon
    /// killed mid-I/O then leaves these rings unrecoverable at queue depth > 1).
    pub journal: Option<JournalSpec>,
    /// I/O limits ([`crate::qos`]); the default limits nothing.
    pub qos: QosSpec,
}

/// A VBD's I/O limits: its own, and the named group it shares limits with
/// ([`crate::Engine::set_qos_group`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QosSpec {
    pub limits: QosLimits,
    pub group: Option<String>,
}

/// The journals of a VBD's rings: `<dir>/<name>-q<ring>.journal`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalSpec {
    /// The daemon's run directory (a tmpfs: `/run/xenblkd`).
    pub dir: std::path::PathBuf,
    /// Unique per device among the daemon's devices (backend type, domain, devid).
    pub name: String,
    /// The rings are adopted from a previous process: recover from the journals it left
    /// (none: it left nothing consumed and unanswered). Otherwise they start afresh.
    pub recover: bool,
}

impl JournalSpec {
    /// The journal file of ring `index`.
    pub fn path(&self, index: usize) -> std::path::PathBuf {
        self.dir.join(format!("{}-q{index}.journal", self.name))
    }
}

impl std::fmt::Debug for VbdSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VbdSpec")
            .field("domid", &self.domid)
            .field("read_only", &self.read_only)
            .field("rings", &self.rings)
            .field("protocol", &self.protocol)
            .field("persistent", &self.persistent)
            .field("grant_mode", &self.grant_mode)
            .field("features", &self.features)
            .field("limits", &self.limits)
            .field("journal", &self.journal)
            .field("qos", &self.qos)
            .finish_non_exhaustive()
    }
}

/// State shared by the rings of one VBD and its handle.
pub(crate) struct VbdShared {
    pub(crate) id: VbdId,
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) read_only: bool,
    pub(crate) logical_block_size: u32,
    pub(crate) max_indirect_segments: u32,
    /// Capacity in 512-byte sectors; rings reload their limits when it changes.
    sectors: AtomicU64,
    flush: AtomicBool,
    barrier: AtomicBool,
    discard: AtomicBool,
    secure_discard: AtomicBool,
    /// Bumped whenever `sectors` or a feature changes, so a ring compares one number.
    generation: AtomicU64,
    /// blkback's VBD-wide `overflow_max_grants`.
    pub(crate) persistent_overflow: Arc<AtomicBool>,
    pub(crate) ring_stats: Vec<Arc<RingStats>>,
    /// Requests grant-copied because they could not be mapped, not yet logged.
    pub(crate) map_fallbacks: RateLimitedCount,
    events: Option<EventCallback>,
    /// Serialises resize checks (ring 0's tick and on-request refreshes).
    resize_lock: Mutex<()>,
    /// Set when the VBD is detached or dropped: its device ends here, so no next process
    /// will adopt its rings and their journals have no reader (unless `handing_over`).
    pub(crate) removed: AtomicBool,
    /// The engine's handover flag ([`crate::Engine::hand_over`]): the devices go to the
    /// next daemon, which re-executes what the journals of rings dropped mid-I/O owe.
    pub(crate) handing_over: Arc<AtomicBool>,
    /// The throttles the rings draw on; a change bumps `generation`, so a ring picks it up
    /// with its next request.
    qos: Mutex<QosBinding>,
}

/// The throttles of a VBD: its own (only while it has limits, so an unlimited VBD takes
/// no lock per request) and its group's.
#[derive(Debug, Clone, Default)]
pub(crate) struct QosBinding {
    pub(crate) own: Option<Arc<Throttle>>,
    pub(crate) group: Option<(String, Arc<Throttle>)>,
}

impl VbdShared {
    pub(crate) fn new(id: VbdId, spec: &VbdSpec, handing_over: Arc<AtomicBool>) -> Self {
        let info = spec.storage.info();
        let read_only = spec.read_only || info.read_only;
        // A feature is advertised only if asked for and the storage can do it; a read-only
        // VBD refuses every write-class operation in validation anyway.
        let flush = spec.features.flush && info.flush;
        let barrier = spec.features.barrier && info.flush;
        let discard = spec.features.discard && info.discard && !read_only;
        let secure = discard && spec.features.secure_discard && info.secure_discard;
        Self {
            id,
            storage: spec.storage.clone(),
            read_only,
            logical_block_size: info.logical_block_size.max(512),
            max_indirect_segments: spec.limits.max_indirect_segments.min(MAX_INDIRECT_SEGMENTS),
            sectors: AtomicU64::new(info.size_bytes / 512),
            flush: AtomicBool::new(flush),
            barrier: AtomicBool::new(barrier),
            discard: AtomicBool::new(discard),
            secure_discard: AtomicBool::new(secure),
            generation: AtomicU64::new(0),
            persistent_overflow: Arc::new(AtomicBool::new(false)),
            ring_stats: (0..spec.rings.len())
                .map(|_| Arc::new(RingStats::default()))
                .collect(),
            map_fallbacks: RateLimitedCount::new(std::time::Instant::now()),
            events: spec.events.clone(),
            resize_lock: Mutex::new(()),
            removed: AtomicBool::new(false),
            handing_over,
            qos: Mutex::new(QosBinding::default()),
        }
    }

    /// The throttles in force (rings cache them until `generation` changes).
    pub(crate) fn qos(&self) -> QosBinding {
        self.qos.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sets the VBD's own limits and its group (`group`: the group's throttle, from the
    /// engine's registry).
    pub(crate) fn set_qos(&self, limits: QosLimits, group: Option<(String, Arc<Throttle>)>) {
        let now = std::time::Instant::now();
        let mut q = self.qos.lock().unwrap_or_else(|p| p.into_inner());
        q.own = match (q.own.take(), limits.is_unlimited()) {
            (_, true) => None,
            // The same throttle: a ring holding a request sees the new limits at once,
            // and the debt carries over.
            (Some(t), false) => {
                t.set_limits(limits, now);
                Some(t)
            }
            (None, false) => Some(Arc::new(Throttle::new(limits, now))),
        };
        q.group = group;
        drop(q);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn sectors(&self) -> u64 {
        self.sectors.load(Ordering::Acquire)
    }

    pub(crate) fn features(&self) -> Features {
        Features {
            flush: self.flush.load(Ordering::Acquire),
            barrier: self.barrier.load(Ordering::Acquire),
            discard: self.discard.load(Ordering::Acquire),
            secure_discard: self.secure_discard.load(Ordering::Acquire),
        }
    }

    /// The limits requests are validated against, as of now.
    pub(crate) fn device_limits(&self) -> DeviceLimits {
        let f = self.features();
        DeviceLimits {
            sectors: self.sectors(),
            read_only: self.read_only,
            logical_block_size: self.logical_block_size,
            max_indirect_segments: self.max_indirect_segments,
            discard: f.discard,
            secure_discard: f.secure_discard,
            flush: f.flush,
            barrier: f.barrier,
        }
    }

    pub(crate) fn emit(&self, event: VbdEvent) {
        // Resizes and lost features are logged where they are found; halted rings are the
        // owner's to report.
        tracing::debug!(vbd = self.id.0, ?event, "vbd event");
        if let Some(cb) = &self.events {
            cb(self.id, event);
        }
    }

    /// Stops advertising a feature the storage refused as unsupported. Returns whether
    /// anything changed (the event is emitted once, by the first ring to notice).
    pub(crate) fn drop_feature(&self, which: LostFeature) -> bool {
        let flag = match which {
            LostFeature::Flush => &self.flush,
            LostFeature::Barrier => &self.barrier,
            LostFeature::Discard => &self.discard,
            LostFeature::SecureDiscard => &self.secure_discard,
        };
        if !flag.swap(false, Ordering::AcqRel) {
            return false;
        }
        if which == LostFeature::Discard {
            self.secure_discard.store(false, Ordering::Release);
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.emit(VbdEvent::FeaturesChanged(self.features()));
        true
    }

    /// Re-reads the storage size; on a change updates every ring (through the
    /// generation) and reports it. Returns the size in sectors.
    pub(crate) fn refresh_size(&self) -> std::io::Result<u64> {
        let _guard = self.resize_lock.lock().unwrap_or_else(|p| p.into_inner());
        let sectors = self.storage.refresh_size()? / 512;
        let old = self.sectors.swap(sectors, Ordering::AcqRel);
        if old != sectors {
            self.generation.fetch_add(1, Ordering::AcqRel);
            tracing::info!(vbd = self.id.0, old, new = sectors, "VBD resized");
            self.emit(VbdEvent::Resized { sectors });
        }
        Ok(sectors)
    }

    pub(crate) fn stats(&self) -> VbdStats {
        let rings: Vec<_> = self.ring_stats.iter().map(|s| s.snapshot()).collect();
        let mut total = crate::stats::Stats::default();
        for r in &rings {
            total += *r;
        }
        let mut latency = crate::latency::Latency::default();
        for s in &self.ring_stats {
            latency += s.latency.snapshot();
        }
        VbdStats {
            total,
            rings,
            latency,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LostFeature {
    Flush,
    Barrier,
    Discard,
    SecureDiscard,
}
