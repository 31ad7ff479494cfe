//! The engine's public face: start reactors, attach and detach VBDs, shut down.
//!
//! [`Engine::attach`] does the fallible setup on the caller's thread, so errors come back
//! synchronously and nothing half-attached is left behind: it maps every ring, binds
//! every event channel and opens a storage queue per ring, and only when all rings of
//! the VBD are ready hands each to the least-loaded reactor (ties broken so that the
//! VBDs' first rings, the busiest when a guest drives one queue, rotate over the
//! reactors: see [`place`]). [`VbdHandle::detach`] asks
//! the reactors to drain and drop the VBD's rings and waits (bounded) for their reports.
//!
//! The engine owns the daemon-wide [`MapBudget`] of grant mappings, sized from
//! `vm.max_map_count` and a page limit at start ([`MapLimits`]). Every VBD's rings draw on
//! their guest domain's share of it ([`crate::grant_budget::GuestBudget`]); each ring
//! reserves its own mappings (ring pages, io_uring, bounce pool) on attach and gives them
//! back when dropped.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use blkif::{BackRing, JournalStart, RingError};
use platform::{Access, MapError, Platform, PlatformError};
use shmem::SharedMemory;
use storage::StorageError;

use crate::grant_budget::{ring_map_reserve, BudgetSize, GuestBudget, MapBudget, MapLimits};
use crate::qos::{QosGroups, QosLimits};
use crate::reactor::{Command, ReactorHandle, RingClosed, VbdId};
use crate::ring::{RingConfig, RingParts, RingRunner};
use crate::stats::VbdStats;
use crate::vbd::{
    Features, ResolvedGrantMode, RingSpec, VbdShared, VbdSpec, MAX_INDIRECT_SEGMENTS,
};

/// Engine-wide settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EngineConfig {
    /// Reactor threads; 0 means one per available CPU.
    pub reactors: usize,
    /// CPUs the reactors run on, reactor `i` on `reactor_cpus[i % len]`; empty: wherever
    /// the scheduler puts them. Pinning a reactor to the CPU that takes its disk's
    /// completion interrupt saves an inter-processor wake-up per completion (ARCHITECTURE.md,
    /// "Reactor placement").
    pub reactor_cpus: Vec<usize>,
}

/// Starting the engine failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot start reactor {index}: {source}")]
    Reactor {
        index: usize,
        #[source]
        source: std::io::Error,
    },
}

/// Attaching a VBD failed; nothing of it stays mapped or bound.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("a VBD needs at least one ring")]
    NoRings,
    #[error("ring {ring}: {count} ring pages; must be 1, 2, 4, 8 or 16")]
    BadRingPages { ring: usize, count: usize },
    #[error("max_indirect_segments {0} exceeds {MAX_INDIRECT_SEGMENTS}")]
    TooManyIndirectSegments(u32),
    #[error("ring {ring}: mapping the ring pages failed: {source}")]
    MapRing {
        ring: usize,
        #[source]
        source: MapError,
    },
    #[error("ring {ring}: the ring mapping is not writable")]
    RingNotWritable { ring: usize },
    #[error("ring {ring}: {source}")]
    Ring {
        ring: usize,
        #[source]
        source: RingError,
    },
    #[error("ring {ring}: binding event channel {port}: {source}")]
    EventChannel {
        ring: usize,
        port: u32,
        #[source]
        source: PlatformError,
    },
    #[error("ring {ring}: journal {}: {source}", path.display())]
    Journal {
        ring: usize,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ring {ring}: opening a storage queue: {source}")]
    StorageQueue {
        ring: usize,
        #[source]
        source: StorageError,
    },
    #[error("ring {ring}: {source}")]
    Io {
        ring: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("the engine has shut down")]
    EngineStopped,
}

/// Detaching did not complete in time.
#[derive(Debug, thiserror::Error)]
pub enum DetachError {
    /// Some rings still had I/O in flight at the deadline. Their reactors keep draining
    /// them and release everything when the storage completes.
    #[error(
        "{pending} ring(s) still draining ({in_flight} request(s) in flight) after {waited:?}"
    )]
    Timeout {
        /// Rings not yet released.
        pending: usize,
        /// Requests still in flight on the VBD at the deadline.
        in_flight: u64,
        waited: Duration,
    },
}

struct Inner {
    reactors: Vec<ReactorHandle>,
    next_vbd: AtomicU64,
    budget: MapBudget,
    /// Rings reserve their own mappings from the budget (it was sized from the process
    /// limit, which they count against too).
    reserve_ring_maps: bool,
    /// See [`Engine::hand_over`].
    handing_over: Arc<AtomicBool>,
    /// Named QoS groups, shared by their members' rings on every reactor.
    qos_groups: QosGroups,
}

impl Inner {
    fn running(&self) -> bool {
        self.reactors.iter().any(ReactorHandle::is_running)
    }
}

/// The running engine: a set of reactor threads serving VBDs.
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("reactor_loads", &self.reactor_loads())
            .finish_non_exhaustive()
    }
}

/// What every ring of a VBD being attached is built from.
struct RingSetup<'a> {
    spec: &'a VbdSpec,
    platform: &'a Arc<dyn Platform>,
    shared: &'a Arc<VbdShared>,
    mode: ResolvedGrantMode,
    guest: &'a GuestBudget,
}

impl Engine {
    /// Starts the reactor threads, with a grant-mapping budget sized from this process's
    /// `vm.max_map_count`.
    pub fn start(config: EngineConfig) -> Result<Engine, EngineError> {
        Self::start_with_limits(config, MapLimits::default())
    }

    /// Starts the reactor threads with a grant-mapping budget of `size` VMAs (tests give a
    /// small one) and the default page limit.
    pub fn start_with_budget(
        config: EngineConfig,
        size: BudgetSize,
    ) -> Result<Engine, EngineError> {
        Self::start_with_limits(
            config,
            MapLimits {
                size,
                ..MapLimits::default()
            },
        )
    }

    /// Starts the reactor threads with a grant-mapping budget sized by `limits`.
    pub fn start_with_limits(
        config: EngineConfig,
        limits: MapLimits,
    ) -> Result<Engine, EngineError> {
        let n = if config.reactors == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            config.reactors
        };
        let reactors = (0..n)
            .map(|index| {
                let cpu = (!config.reactor_cpus.is_empty())
                    .then(|| config.reactor_cpus[index % config.reactor_cpus.len()]);
                ReactorHandle::spawn(index, cpu)
                    .map_err(|source| EngineError::Reactor { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        tracing::info!(reactors = n, "engine started");
        let (budget, reserve_ring_maps) = MapBudget::sized(limits, n);
        Ok(Engine {
            inner: Arc::new(Inner {
                reactors,
                next_vbd: AtomicU64::new(1),
                budget,
                reserve_ring_maps,
                handing_over: Arc::new(AtomicBool::new(false)),
                qos_groups: QosGroups::default(),
            }),
        })
    }

    /// The grant-mapping budget shared by every ring (for gauges and tests; clones share
    /// it).
    pub fn map_budget(&self) -> &MapBudget {
        &self.inner.budget
    }

    /// Number of reactor threads.
    pub fn reactors(&self) -> usize {
        self.inner.reactors.len()
    }

    /// Rings each reactor currently runs.
    pub fn reactor_loads(&self) -> Vec<usize> {
        self.inner
            .reactors
            .iter()
            .map(ReactorHandle::load)
            .collect()
    }

    /// What each reactor's event loop did since the engine started (sleeps, wake-ups,
    /// adaptive polls), in reactor order.
    pub fn reactor_stats(&self) -> Vec<crate::ReactorStats> {
        self.reactor_stats_reader().read()
    }

    /// A handle that reads [`reactor_stats`](Self::reactor_stats) without the engine
    /// (for a status thread).
    pub fn reactor_stats_reader(&self) -> crate::stats::ReactorStatsReader {
        crate::stats::ReactorStatsReader(
            self.inner
                .reactors
                .iter()
                .map(ReactorHandle::counters)
                .collect(),
        )
    }

    /// Sets the limits of the QoS group `name`, shared by every VBD in it (created if new;
    /// its members' rings see the new limits with their next request).
    pub fn set_qos_group(&self, name: &str, limits: QosLimits) {
        self.inner.qos_groups.set(name, limits);
    }

    /// Every QoS group and its limits.
    pub fn qos_groups(&self) -> Vec<(String, QosLimits)> {
        self.inner.qos_groups.list()
    }

    /// Maps the VBD's rings, binds their event channels, opens a storage queue per ring
    /// and starts serving it.
    pub fn attach(
        &self,
        spec: VbdSpec,
        platform: Arc<dyn Platform>,
    ) -> Result<VbdHandle, AttachError> {
        if !self.inner.running() {
            return Err(AttachError::EngineStopped);
        }
        if spec.rings.is_empty() {
            return Err(AttachError::NoRings);
        }
        if spec.limits.max_indirect_segments > MAX_INDIRECT_SEGMENTS {
            return Err(AttachError::TooManyIndirectSegments(
                spec.limits.max_indirect_segments,
            ));
        }
        let id = VbdId(self.inner.next_vbd.fetch_add(1, Ordering::Relaxed));
        let shared = Arc::new(VbdShared::new(id, &spec, self.inner.handing_over.clone()));
        let group = spec
            .qos
            .group
            .as_deref()
            .map(|g| (g.to_string(), self.inner.qos_groups.get(g)));
        shared.set_qos(spec.qos.limits, group);
        let mode = spec.grant_mode.resolve(spec.persistent);
        // The guest's share, held by its rings: the guest counts in everyone's share
        // until its last ring is dropped.
        let guest = self.inner.budget.guest(spec.domid);

        let mut runners = Vec::with_capacity(spec.rings.len());
        for (index, rs) in spec.rings.iter().enumerate() {
            let ring = RingSetup {
                spec: &spec,
                platform: &platform,
                shared: &shared,
                mode,
                guest: &guest,
            };
            let runner = self.build_ring(&ring, index, rs)?;
            runners.push(runner);
        }

        let mut placement = BTreeMap::new();
        let mut ring_reactors = Vec::with_capacity(runners.len());
        for (index, runner) in runners.into_iter().enumerate() {
            let reactor =
                place(&self.inner.reactors, id.0, index).ok_or(AttachError::EngineStopped)?;
            *placement.entry(reactor.id()).or_insert(0usize) += 1;
            ring_reactors.push(reactor.id());
            reactor
                .send(Command::Add(Box::new(runner)))
                .map_err(|_| AttachError::EngineStopped)?;
        }
        tracing::info!(
            vbd = id.0,
            domid = spec.domid,
            rings = spec.rings.len(),
            ?mode,
            persistent = spec.persistent,
            read_only = shared.read_only,
            "VBD attached"
        );
        Ok(VbdHandle {
            engine: self.inner.clone(),
            shared,
            placement,
            ring_reactors,
            mode,
            detached: false,
        })
    }

    /// Maps ring `index` of a VBD being attached, binds its event channel and opens its
    /// storage queue.
    fn build_ring(
        &self,
        setup: &RingSetup<'_>,
        index: usize,
        rs: &RingSpec,
    ) -> Result<RingRunner, AttachError> {
        let RingSetup {
            spec,
            platform,
            shared,
            mode,
            guest,
        } = *setup;
        let count = rs.ring_refs.len();
        if !(1..=crate::vbd::MAX_RING_PAGES).contains(&count) || !count.is_power_of_two() {
            return Err(AttachError::BadRingPages { ring: index, count });
        }
        let mapping = platform
            .map(spec.domid, &rs.ring_refs, Access::ReadWrite)
            .map_err(|source| AttachError::MapRing {
                ring: index,
                source,
            })?;
        let ring_vmas = mapping.vmas();
        let mem = mapping
            .into_shared()
            .map_err(|_| AttachError::RingNotWritable { ring: index })?;
        let journal_path = spec.journal.as_ref().map(|j| j.path(index));
        let ring = attach_back_ring(spec, index, mem, journal_path.as_deref())?;
        if ring.replayed_at_attach() > 0 {
            tracing::info!(
                ring = index,
                requests = ring.replayed_at_attach(),
                "journal: re-executing requests a previous process consumed and did not answer"
            );
        }
        // If the rest of the setup fails, a journal that owes nothing says no more than no
        // journal at all: it goes, so a device that never gets its rings leaves no file.
        // One that owes requests stays for the next attempt.
        let mut unused_journal = JournalCleanup(
            journal_path
                .clone()
                .filter(|_| ring.replayed_at_attach() == 0),
        );
        let evtchn = platform
            .bind_interdomain(spec.domid, rs.event_channel)
            .map_err(|source| AttachError::EventChannel {
                ring: index,
                port: rs.event_channel,
                source,
            })?;
        let depth = RingRunner::queue_depth(ring.size(), shared.max_indirect_segments);
        let map_reserve = self.inner.reserve_ring_maps.then(|| {
            let reservation = self
                .inner
                .budget
                .reserve(ring_map_reserve(ring_vmas, count));
            if self.inner.budget.over_committed() {
                tracing::warn!(
                    ring = index,
                    usage = ?self.inner.budget.usage(),
                    "the rings attached reserve more mappings than vm.max_map_count \
                     leaves: persistent grants are being shed to make room"
                );
            }
            reservation
        });
        let queue = spec
            .storage
            .open_queue(depth)
            .map_err(|source| AttachError::StorageQueue {
                ring: index,
                source,
            })?;
        RingRunner::new(
            RingParts {
                index,
                ring,
                evtchn,
                queue,
                journal_path,
            },
            RingConfig {
                vbd: shared.clone(),
                platform: platform.clone(),
                domid: spec.domid,
                persistent: spec.persistent,
                persistent_limits: spec.limits.persistent,
                mode,
                max_buffer_pages: spec.limits.max_buffer_pages,
                resize_poll: spec.limits.resize_poll,
                poll: spec.limits.poll,
                budget: guest.clone(),
                map_reserve,
            },
        )
        .map_err(|source| AttachError::Io {
            ring: index,
            source,
        })
        .inspect(|_| unused_journal.0 = None)
    }

    /// The devices are being handed over to the next daemon: from now on a ring dropped
    /// with requests in flight (a drain that timed out) keeps its journal, which the next
    /// process reads to re-execute them. Before, a ring of a VBD detached or dropped
    /// removes its journal whatever it had in flight: its device ends with it.
    pub fn hand_over(&self) {
        self.inner.handing_over.store(true, Ordering::SeqCst);
    }

    /// Drains and drops every ring, then stops the reactor threads.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Handles may still hold `inner`; stop the threads now regardless.
        for r in &self.inner.reactors {
            r.shutdown();
        }
        tracing::info!("engine stopped");
    }
}

/// Removes a ring's journal file when dropped still holding its path (a failed attach).
struct JournalCleanup(Option<std::path::PathBuf>);

impl Drop for JournalCleanup {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The reactor for ring `index` of VBD `vbd`: the running reactor with the fewest rings
/// and, among those, the first at or after `(vbd + index) % reactors`, cyclically.
///
/// Ring counts alone put every VBD's ring 0 on reactor 0 whenever all VBDs have as many
/// rings as there are reactors (ring 0 takes the first of the equally loaded reactors,
/// ring 1 the next, and so on for each VBD): found with 1,000 VBDs of 2 rings on 2
/// reactors, each guest driving its disks' first queue, where one reactor did all the
/// work and the other slept. Starting each VBD one reactor further keeps the counts as
/// balanced and spreads the first rings (and second, ...) evenly.
fn place(reactors: &[ReactorHandle], vbd: u64, index: usize) -> Option<&ReactorHandle> {
    let n = reactors.len().max(1);
    let start = usize::try_from(vbd % n as u64).unwrap_or(0);
    let preferred = (start + index % n) % n;
    reactors
        .iter()
        .enumerate()
        .filter(|(_, r)| r.is_running())
        .min_by_key(|&(k, r)| (r.load(), (k + n - preferred) % n))
        .map(|(_, r)| r)
}

/// A VBD being served.
pub struct VbdHandle {
    engine: Arc<Inner>,
    shared: Arc<VbdShared>,
    /// Reactor id -> number of this VBD's rings it runs.
    placement: BTreeMap<usize, usize>,
    /// The reactor of each ring, in ring order.
    ring_reactors: Vec<usize>,
    mode: ResolvedGrantMode,
    detached: bool,
}

impl std::fmt::Debug for VbdHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VbdHandle")
            .field("id", &self.shared.id)
            .field("mode", &self.mode)
            .field("placement", &self.placement)
            .field("detached", &self.detached)
            .finish_non_exhaustive()
    }
}

impl VbdHandle {
    pub fn id(&self) -> VbdId {
        self.shared.id
    }

    /// The reactor (its index) that runs each ring, in ring order.
    pub fn ring_reactors(&self) -> &[usize] {
        &self.ring_reactors
    }

    /// Counters of every ring and their sum, as of now.
    pub fn stats(&self) -> VbdStats {
        self.shared.stats()
    }

    /// Features still supported (a storage that refused an operation as unsupported
    /// loses the matching one).
    pub fn features(&self) -> Features {
        self.shared.features()
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.shared.sectors()
    }

    /// Whether the VBD refuses writes.
    pub fn read_only(&self) -> bool {
        self.shared.read_only
    }

    /// The data path in use (after resolving [`crate::GrantMode::Auto`]).
    pub fn grant_mode(&self) -> ResolvedGrantMode {
        self.mode
    }

    /// `feature-max-indirect-segments` to advertise.
    pub fn max_indirect_segments(&self) -> u32 {
        self.shared.max_indirect_segments
    }

    /// Changes the VBD's QoS limits and group live: its rings apply them from their next
    /// request (a request held by the old limits is re-checked against the new ones at
    /// the latest by the next housekeeping tick).
    pub fn set_qos(&self, qos: &crate::QosSpec) {
        let group = qos
            .group
            .as_deref()
            .map(|g| (g.to_string(), self.engine.qos_groups.get(g)));
        self.shared.set_qos(qos.limits, group);
        tracing::info!(vbd = self.shared.id.0, ?qos, "QoS limits set");
    }

    /// The VBD's QoS limits and group.
    pub fn qos(&self) -> crate::QosSpec {
        let b = self.shared.qos();
        crate::QosSpec {
            limits: b.own.map(|t| t.limits()).unwrap_or_default(),
            group: b.group.map(|(name, _)| name),
        }
    }

    /// Re-reads the storage size now; on a change every ring validates against the new
    /// size and a [`crate::VbdEvent::Resized`] is emitted. Returns the size in sectors.
    pub fn refresh_size(&self) -> std::io::Result<u64> {
        self.shared.refresh_size()
    }

    /// Stops serving the VBD: each ring stops consuming, its in-flight requests complete
    /// and are answered, then its grants and ring are unmapped, its event channel
    /// unbound and its storage queue closed. Waits at most `timeout` for all of that.
    pub fn detach(mut self, timeout: Duration) -> Result<VbdStats, DetachError> {
        self.detached = true;
        self.remove(Some(timeout))
    }

    fn remove(&self, timeout: Option<Duration>) -> Result<VbdStats, DetachError> {
        self.shared.removed.store(true, Ordering::SeqCst);
        let (tx, rx) = mpsc::channel::<RingClosed>();
        let mut expected = 0;
        for (&reactor, &rings) in &self.placement {
            let Some(r) = self.engine.reactors.get(reactor) else {
                continue;
            };
            // A stopped reactor already dropped its rings.
            if r.is_running()
                && r.send(Command::RemoveVbd {
                    vbd: self.shared.id,
                    reply: tx.clone(),
                })
                .is_ok()
            {
                expected += rings;
            }
        }
        drop(tx);
        let Some(timeout) = timeout else {
            return Ok(self.shared.stats());
        };
        let start = Instant::now();
        let mut closed = 0;
        while closed < expected {
            let left = timeout.saturating_sub(start.elapsed());
            match rx.recv_timeout(left) {
                Ok(c) => {
                    tracing::debug!(vbd = c.vbd.0, ring = c.index, stats = ?c.stats, "ring detached");
                    closed += 1;
                }
                // Every sender is gone: the reactors stopped (and dropped the rings).
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(DetachError::Timeout {
                        pending: expected - closed,
                        in_flight: self.shared.stats().total.in_flight,
                        waited: start.elapsed(),
                    })
                }
            }
        }
        tracing::info!(vbd = self.shared.id.0, "VBD detached");
        Ok(self.shared.stats())
    }
}

impl Drop for VbdHandle {
    fn drop(&mut self) {
        if !self.detached {
            // Dropped without `detach`: still release everything, without waiting.
            let _ = self.remove(None);
        }
    }
}

/// Attaches to ring `index`'s shared pages, with its journal when the VBD keeps one:
/// recovered (requests a previous process consumed and did not answer are re-executed)
/// or fresh.
fn attach_back_ring(
    spec: &VbdSpec,
    index: usize,
    mem: SharedMemory,
    journal_path: Option<&Path>,
) -> Result<BackRing, AttachError> {
    let ring_error = |source| AttachError::Ring {
        ring: index,
        source,
    };
    let ring = match (&spec.journal, journal_path) {
        (Some(j), Some(path)) => {
            let size = blkif::abi::ring_size_for_len(spec.protocol, mem.len());
            let len = blkif::journal::journal_len(size);
            let journal_error = |source| AttachError::Journal {
                ring: index,
                path: path.to_path_buf(),
                source,
            };
            let start = if j.recover {
                JournalStart::Recover(
                    crate::journal_file::map_existing(path, len).map_err(journal_error)?,
                )
            } else {
                JournalStart::Fresh(
                    crate::journal_file::map_fresh(path, len).map_err(journal_error)?,
                )
            };
            let mut ring = BackRing::with_journal(mem, spec.protocol, start).map_err(ring_error)?;
            if let Some(ignored) = ring.ignored_journal() {
                // Another build's format, or a corrupt file, that owes nothing: the
                // ring alone is exact (ARCHITECTURE.md, "Across versions").
                tracing::warn!(
                    ring = index,
                    path = %path.display(),
                    reason = %ignored,
                    "ignoring a ring journal this build cannot read (it owes no request): \
                     resuming from the shared ring, with a fresh journal"
                );
                let fresh = crate::journal_file::map_fresh(path, len).map_err(journal_error)?;
                ring.start_journal(fresh).map_err(ring_error)?;
            }
            ring
        }
        _ => BackRing::new(mem, spec.protocol).map_err(ring_error)?,
    };
    Ok(ring)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_sync<T: Send + Sync>() {}

    #[test]
    fn handles_can_be_shared_across_threads() {
        send_sync::<Engine>();
        send_sync::<VbdHandle>();
    }

    #[test]
    fn start_and_shutdown_with_default_reactor_count() {
        let e = Engine::start(EngineConfig::default()).unwrap();
        assert!(e.reactors() >= 1);
        assert!(e.reactor_loads().iter().all(|&l| l == 0));
        e.shutdown();
    }
}
