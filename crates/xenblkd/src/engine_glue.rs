//! Glue between the xenbus layer and the engine: [`xenbus::vbd::VbdFactory`] implemented
//! with `storage::open` and `backend::Engine::attach`, translating between the two crates'
//! vocabularies (and nothing more: decisions stay in the layers).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backend::{DetachError, Engine, Features, MapBudget, RingSpec, VbdHandle, VbdLimits, VbdSpec};
use platform::Platform;
use storage::{DirectIo, OpenOptions, Storage};
use xenbus::config::{DirectIo as DirectIoSetting, GrantMode as GrantModeSetting};
use xenbus::parse::{DiskFormat, DiskTarget};
use xenbus::status::LatencyHistogram;
use xenbus::vbd::{
    ConnectRequest, ConnectedVbd, DeviceConfig, DisconnectReport, Feature, VbdEvent, VbdEventSink,
    VbdFactory,
};
use xenbus::VbdError;

const EINVAL: i32 = 22;
const EOPNOTSUPP: i32 = 95;

/// The storage open options for a device.
///
/// O_DIRECT policy `auto` follows QEMU's qdisk: the page cache is bypassed only when the
/// toolstack says O_DIRECT is safe for this storage (`direct-io-safe`, see blkif.h and the
/// 2012 xen-devel thread on grant pages still referenced by network storage after an
/// O_DIRECT write completed). `on`/`off` override.
pub fn open_options(config: &DeviceConfig) -> OpenOptions {
    storage_options(
        config.settings.direct_io,
        config.direct_io_safe,
        config.read_only,
    )
}

/// [`open_options`] from its parts, for entry points that have no [`DeviceConfig`] yet.
pub fn storage_options(
    setting: DirectIoSetting,
    direct_io_safe: bool,
    read_only: bool,
) -> OpenOptions {
    let direct_io = match setting {
        DirectIoSetting::On => DirectIo::On,
        DirectIoSetting::Off => DirectIo::Off,
        DirectIoSetting::Auto if direct_io_safe => DirectIo::Auto,
        DirectIoSetting::Auto => DirectIo::Off,
    };
    OpenOptions {
        read_only,
        direct_io,
        // Claim block devices exclusively, as kernel blkback does: a device mounted in
        // dom0 (or served twice) must fail to attach rather than be corrupted.
        exclusive: true,
    }
}

/// Opens what a device's `params` names, as `serve` does when the device is added: the
/// one place every entry point (`serve`, `attach`, `demo`, `check-target` for the hotplug
/// script) opens storage, so that each refuses a target for the same reason, naming the
/// file and the OS error. `physical_device` is what the hotplug script published
/// (`MAJOR:MINOR`), checked against a block device's real number.
///
/// A file or device (and a qcow2 image's backing files) is then locked as QEMU locks
/// images (`storage::lock`), for `owner` (the device, in this process's messages): an
/// image another program or device writes, or reads refusing writers, is refused, naming
/// the image and what its lock bytes say about the holder.
pub fn open_target(
    target: &DiskTarget,
    options: OpenOptions,
    physical_device: Option<(u32, u32)>,
    nbd: storage::NbdConfig,
    rbd: storage::RbdConfig,
    owner: &str,
) -> Result<Arc<dyn Storage>, VbdError> {
    let path = &target.path;
    let context = || format!("opening {}", path.display());
    match target.format {
        DiskFormat::Nbd => return open_nbd(target, nbd),
        DiskFormat::Rbd => {
            let rbd = storage::RbdConfig {
                read_only: options.read_only,
                ..rbd
            };
            return open_rbd(target, rbd);
        }
        DiskFormat::Null => return open_null(target, options.read_only),
        DiskFormat::Raw | DiskFormat::Qcow2 => {}
    }
    if let Some(expected) = physical_device {
        check_device_number(path, expected).map_err(|m| VbdError::new(context(), m, EINVAL))?;
    }
    let opened: Result<Arc<dyn Storage>, _> = match target.format {
        DiskFormat::Raw | DiskFormat::Nbd | DiskFormat::Rbd | DiskFormat::Null => {
            storage::open(path, options)
        }
        DiskFormat::Qcow2 => {
            storage::Qcow2Storage::open(path, options).map(|s| Arc::new(s) as Arc<dyn Storage>)
        }
    };
    let opened = opened.map_err(|e| {
        let errno = match &e {
            storage::StorageError::Open { source, .. }
            | storage::StorageError::Probe { source, .. } => source.raw_os_error().unwrap_or(5),
            storage::StorageError::UnsupportedImage { .. } => EOPNOTSUPP,
            storage::StorageError::InvalidImage { .. } => EINVAL,
            _ => 5,
        };
        VbdError::new(context(), e, errno)
    })?;
    lock_images(opened, path, owner).map_err(|e| VbdError::new(context(), &e, e.errno()))
}

/// How long a lock held by a xenblkd is waited for before the conflict is reported.
/// Across a handover the previous daemon releases its images as it exits, and a thread
/// of it may still be closing one when this daemon (which waited for its daemon lock)
/// opens it; within one daemon, a device the toolstack just removed releases its storage
/// when the daemon sees the removal, which can come after the toolstack added a device
/// for the same image (a detach and re-attach).
const XENBLKD_LOCK_GRACE: Duration = Duration::from_secs(2);

/// Takes QEMU's image locks for `storage`, waiting [`XENBLKD_LOCK_GRACE`] for a xenblkd
/// (this one or another) to let go.
fn lock_images(
    storage: Arc<dyn Storage>,
    path: &std::path::Path,
    owner: &str,
) -> Result<Arc<dyn Storage>, storage::lock::LockError> {
    let start = std::time::Instant::now();
    loop {
        match storage::lock::lock_storage(storage.clone(), path, owner) {
            // A xenblkd holds it, or the holder let go between our attempt and our look
            // at the bytes (nothing is held any more): try again.
            Err(e)
                if e.holder().is_some_and(|h| {
                    matches!(
                        h.kind,
                        storage::lock::HolderKind::OtherXenblkd
                            | storage::lock::HolderKind::ThisDaemon(_)
                    ) || (h.perm == 0 && h.unshared == 0)
                }) && start.elapsed() < XENBLKD_LOCK_GRACE =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// How an NBD export is opened for a device: the toolstack's read-only, the operator's
/// reconnect bound.
pub fn nbd_config(config: &DeviceConfig) -> storage::NbdConfig {
    storage::NbdConfig {
        read_only: config.read_only,
        reconnect_timeout: Duration::from_secs(config.settings.nbd_reconnect_secs),
        ..storage::NbdConfig::default()
    }
}

/// How an RBD image is opened for a device: the toolstack's read-only, the operator's
/// request bound.
pub fn rbd_config(config: &DeviceConfig) -> storage::RbdConfig {
    storage::RbdConfig {
        read_only: config.read_only,
        op_timeout: Duration::from_secs(config.settings.rbd_op_timeout_secs),
        ..storage::RbdConfig::default()
    }
}

/// Opens the NBD export a target names.
fn open_nbd(target: &DiskTarget, nbd: storage::NbdConfig) -> Result<Arc<dyn Storage>, VbdError> {
    let uri = target.path.to_string_lossy();
    let storage = storage::NbdStorage::open(&uri, nbd).map_err(|e| {
        let errno = match &e {
            storage::nbd::NbdOpenError::Uri(_) => EINVAL,
            storage::nbd::NbdOpenError::Handshake {
                source: storage::nbd::handshake::HandshakeError::Io(io),
                ..
            } => io.raw_os_error().unwrap_or(5),
            _ => 5,
        };
        VbdError::new(format!("opening {uri}"), e, errno)
    })?;
    Ok(Arc::new(storage))
}

/// A `null:SIZE` disk (a benchmark and test target): nothing to open, lock or check.
fn open_null(target: &DiskTarget, read_only: bool) -> Result<Arc<dyn Storage>, VbdError> {
    let text = target.path.to_string_lossy();
    let context = || format!("opening {text}");
    let config =
        storage::NullConfig::from_target(&text).map_err(|e| VbdError::new(context(), e, EINVAL))?;
    let storage = storage::NullStorage::new(storage::NullConfig {
        read_only,
        ..config
    })
    .map_err(|e| VbdError::new(context(), e, EINVAL))?;
    Ok(Arc::new(storage))
}

/// Opens the Ceph RBD image a target names. The timeouts are librbd's, bounded by
/// `config`'s unless ceph.conf or the target's options set them.
fn open_rbd(target: &DiskTarget, config: storage::RbdConfig) -> Result<Arc<dyn Storage>, VbdError> {
    let text = target.path.to_string_lossy();
    // Named without its options, which may carry monitors, users or keys.
    let shown = storage::rbd::RbdTarget::parse(&text)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| "an rbd: target".to_string());
    let storage = storage::RbdStorage::open(&text, config)
        .map_err(|e| VbdError::new(format!("opening {shown}"), e.to_string(), e.errno()))?;
    Ok(Arc::new(storage))
}

/// [`VbdFactory`] over the engine and a platform.
pub struct EngineFactory {
    engine: Engine,
    platform: Arc<dyn Platform>,
    /// Where rings keep their crash-recovery journals (the daemon's run directory).
    journal_dir: Option<std::path::PathBuf>,
}

impl EngineFactory {
    /// A factory attaching VBDs to `engine`, mapping grants through `platform`.
    pub fn new(engine: Engine, platform: Arc<dyn Platform>) -> EngineFactory {
        EngineFactory {
            engine,
            platform,
            journal_dir: None,
        }
    }

    /// Rings keep their crash-recovery journals in `dir` (the daemon's run directory, a
    /// tmpfs), so a daemon killed mid-I/O can be replaced without answering a request
    /// twice or losing one.
    pub fn with_journal_dir(mut self, dir: std::path::PathBuf) -> EngineFactory {
        self.journal_dir = Some(dir);
        self
    }

    /// The engine's daemon-wide gauges, readable from any thread after the factory has
    /// been handed to the xenbus manager.
    pub fn gauges(&self) -> EngineGauges {
        EngineGauges {
            budget: self.engine.map_budget().clone(),
            reactors: self.engine.reactor_stats_reader(),
        }
    }
}

/// Daemon-wide gauges of the engine for `xenblkd status`, next to the process's own
/// (grant mappings, fds, threads): the grant-mapping budget every guest has a share of.
#[derive(Clone)]
pub struct EngineGauges {
    budget: MapBudget,
    reactors: backend::ReactorStatsReader,
}

impl EngineGauges {
    /// `persistent_grant_budget_used` (persistent grants mapped by all devices),
    /// `persistent_grant_budget_limit` (most there may be with the rings attached now),
    /// `persistent_grant_budget_refusals` (takes of the budget refused, since start: a
    /// grant used for its request only, or a request grant-copied instead of mapped),
    /// `grant_map_vmas` / `grant_map_vma_capacity` (VMAs held by guests' grant mappings,
    /// and what `vm.max_map_count` leaves them with the rings' own reserves),
    /// `grant_map_pages` / `grant_map_page_capacity` (grant pages mapped, and the limit),
    /// `grant_map_guests` (domains sharing the budget) and `grant_map_guest_share_vmas` /
    /// `_pages` (most one of them may hold now); and, summed over the reactors since
    /// start, `reactor_sleeps`, `reactor_wakeups`, `reactor_timeouts`,
    /// `reactor_poll_hits`, `reactor_poll_misses`, `reactor_poll_us` and
    /// `reactor_busy_us` (see `backend::ReactorStats`).
    pub fn read(&self) -> BTreeMap<String, u64> {
        let u = self.budget.usage();
        let share = u.share();
        let r = self.reactors.total();
        BTreeMap::from([
            ("reactor_sleeps".to_string(), r.sleeps),
            ("reactor_wakeups".to_string(), r.wakeups),
            ("reactor_timeouts".to_string(), r.timeouts),
            ("reactor_poll_hits".to_string(), r.poll_hits),
            ("reactor_poll_misses".to_string(), r.poll_misses),
            ("reactor_poll_us".to_string(), r.poll_ns / 1000),
            ("reactor_busy_us".to_string(), r.busy_ns / 1000),
            ("persistent_grant_budget_used".to_string(), u.grants as u64),
            (
                "persistent_grant_budget_limit".to_string(),
                u.limit() as u64,
            ),
            ("persistent_grant_budget_refusals".to_string(), u.refusals),
            ("grant_map_vmas".to_string(), u.held.vmas as u64),
            (
                "grant_map_vma_capacity".to_string(),
                u.capacity.vmas.saturating_sub(u.reserved.vmas) as u64,
            ),
            ("grant_map_pages".to_string(), u.held.pages as u64),
            (
                "grant_map_page_capacity".to_string(),
                u.capacity.pages.saturating_sub(u.reserved.pages) as u64,
            ),
            ("grant_map_guests".to_string(), u.guests as u64),
            ("grant_map_guest_share_vmas".to_string(), share.vmas as u64),
            (
                "grant_map_guest_share_pages".to_string(),
                share.pages as u64,
            ),
        ])
    }
}

impl EngineGauges {
    /// Each reactor's counters, in reactor order (the metrics endpoint labels them).
    pub fn reactors(&self) -> Vec<backend::ReactorStats> {
        self.reactors.read()
    }
}

fn grant_mode(m: GrantModeSetting) -> backend::GrantMode {
    match m {
        GrantModeSetting::Map => backend::GrantMode::Map,
        GrantModeSetting::Copy => backend::GrantMode::Copy,
        GrantModeSetting::Auto => backend::GrantMode::Auto,
    }
}

/// The stem of a device's ring journal files (`<stem>-q<ring>.journal` in the run
/// directory): unique per device among the daemon's devices.
pub fn journal_name(backend_type: &str, domid: u32, devid: u32) -> String {
    format!("{backend_type}-{domid}-{devid}")
}

/// The device a ring journal file belongs to: `(backend type, domid, devid)` from
/// `<type>-<domid>-<devid>-q<ring>.journal`; `None` for any other name.
pub fn journal_device(file_name: &str) -> Option<(&str, u32, u32)> {
    let stem = file_name.strip_suffix(".journal")?;
    let (device, ring) = stem.rsplit_once("-q")?;
    ring.parse::<u32>().ok()?;
    let (rest, devid) = device.rsplit_once('-')?;
    let (backend_type, domid) = rest.rsplit_once('-')?;
    if backend_type.is_empty() {
        return None;
    }
    Some((backend_type, domid.parse().ok()?, devid.parse().ok()?))
}

/// The engine's limits from the configuration's.
pub fn qos_limits(q: &xenbus::qos::QosLimits) -> backend::qos::QosLimits {
    let l = |rate, burst| backend::qos::Limit { rate, burst };
    backend::qos::QosLimits {
        iops: l(q.iops, q.iops_burst),
        bps: l(q.bps, q.bps_burst),
        read_iops: l(q.read_iops, q.read_iops_burst),
        write_iops: l(q.write_iops, q.write_iops_burst),
        read_bps: l(q.read_bps, q.read_bps_burst),
        write_bps: l(q.write_bps, q.write_bps_burst),
    }
}

impl VbdFactory for EngineFactory {
    fn handing_over(&self) {
        self.engine.hand_over();
    }

    fn set_qos_group(&self, name: &str, limits: &xenbus::qos::QosLimits) {
        self.engine.set_qos_group(name, qos_limits(limits));
    }

    fn open(&self, config: &DeviceConfig) -> Result<Arc<dyn Storage>, VbdError> {
        open_target(
            &config.target,
            open_options(config),
            config.physical_device,
            nbd_config(config),
            rbd_config(config),
            &format!(
                "{}/{}/{}",
                config.backend_type, config.frontend_id, config.devid
            ),
        )
    }

    fn connect(&self, req: ConnectRequest<'_>) -> Result<Box<dyn ConnectedVbd>, VbdError> {
        let domid = u16::try_from(req.config.frontend_id)
            .ok()
            .filter(|&d| d < platform::DOMID_FIRST_RESERVED)
            .ok_or_else(|| {
                VbdError::new(
                    "connecting",
                    format!("domain id {} out of range", req.config.frontend_id),
                    EINVAL,
                )
            })?;
        let settings = &req.config.settings;
        let advertised = Features {
            flush: req.features.flush,
            barrier: req.features.barrier,
            discard: req.features.discard,
            secure_discard: req.features.secure_discard,
        };
        let events = event_forwarder(advertised, req.events.clone());
        let spec = VbdSpec {
            domid,
            storage: req.storage.clone(),
            read_only: req.features.read_only,
            rings: req
                .frontend
                .queues
                .iter()
                .map(|q| RingSpec {
                    ring_refs: q.ring_refs.clone(),
                    event_channel: q.event_channel,
                })
                .collect(),
            protocol: req.frontend.protocol,
            persistent: req.frontend.persistent,
            grant_mode: grant_mode(settings.grant_mode),
            features: advertised,
            limits: VbdLimits {
                // What was advertised (an adopted device keeps what the previous
                // daemon advertised, whatever this one's settings say).
                max_indirect_segments: req.features.max_indirect_segments,
                persistent: backend::persistent_grants::PersistentGrantLimits {
                    max_grants: settings.max_persistent_grants as usize,
                    unused_timeout: Duration::from_secs(settings.persistent_grant_unused_secs),
                },
                ..VbdLimits::default()
            },
            events: Some(events),
            journal: self.journal_dir.as_ref().map(|dir| backend::JournalSpec {
                dir: dir.clone(),
                name: journal_name(
                    &req.config.backend_type,
                    req.config.frontend_id,
                    req.config.devid,
                ),
                recover: req.adopting,
            }),
            qos: backend::QosSpec {
                limits: qos_limits(&settings.qos),
                group: settings.qos_group.clone(),
            },
        };
        let handle = self
            .engine
            .attach(spec, self.platform.clone())
            .map_err(|e| {
                let err = VbdError::new("connecting the rings", &e, attach_errno(&e));
                if domain_unknown(&e) {
                    err.with_domain_unreachable()
                } else {
                    err
                }
            })?;
        #[cfg(feature = "fault-injection")]
        fault::arm(req.config, handle.id());
        Ok(Box::new(EngineVbd { handle }))
    }
}

/// Test-only (the `fault-injection` feature, never in a daemon build): makes a chosen
/// ring of a running `serve` panic, to test end to end that a bug in one ring fails only
/// its device (issue 14, item 4). `XENBLKD_FAULT_PANIC=<type>/<domid>/<devid>/<ring>@<ms>`
/// in the daemon's environment: that ring panics at its first pass `ms` milliseconds
/// after its device connected. Nothing a guest sends reaches it.
#[cfg(feature = "fault-injection")]
mod fault {
    use std::time::Duration;

    use xenbus::vbd::DeviceConfig;

    pub(super) fn arm(config: &DeviceConfig, vbd: backend::VbdId) {
        let Ok(spec) = std::env::var("XENBLKD_FAULT_PANIC") else {
            return;
        };
        let Some((target, after)) = spec.split_once('@') else {
            return;
        };
        let Some((device, ring)) = target.rsplit_once('/') else {
            return;
        };
        let this = format!(
            "{}/{}/{}",
            config.backend_type, config.frontend_id, config.devid
        );
        let (Ok(ring), Ok(after)) = (ring.parse::<usize>(), after.parse::<u64>()) else {
            return;
        };
        if device != this {
            return;
        }
        tracing::warn!(
            device,
            ring,
            after_ms = after,
            "fault injection: this ring will panic"
        );
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(after));
            backend::fault::panic_next_pass(vbd, ring);
        });
    }
}

/// Translates the engine's reports into the xenbus layer's. The engine reports feature
/// changes as the new set; the xenbus layer wants each feature lost, so this remembers
/// what is still advertised.
fn event_forwarder(advertised: Features, sink: VbdEventSink) -> backend::EventCallback {
    let still = Arc::new(Mutex::new(advertised));
    Arc::new(move |_id, event| match event {
        backend::VbdEvent::Resized { sectors } => {
            sink.send(VbdEvent::Resized(sectors.saturating_mul(512)))
        }
        backend::VbdEvent::FeaturesChanged(now) => {
            let mut was = still.lock().unwrap_or_else(|p| p.into_inner());
            for feature in lost_features(*was, now) {
                sink.send(VbdEvent::FeatureLost(feature));
            }
            *was = now;
        }
        backend::VbdEvent::RingHalted { ring, reason } => {
            sink.send(VbdEvent::Fatal(format!("ring {ring} halted: {reason}")))
        }
    })
}

/// What went from `was` to `now`, each feature once: losing flush takes barrier with it
/// and losing discard takes secure discard (the xenbus layer withdraws both nodes).
fn lost_features(was: Features, now: Features) -> Vec<Feature> {
    let mut lost = Vec::new();
    if was.flush && !now.flush {
        lost.push(Feature::Flush);
    } else if was.barrier && !now.barrier {
        lost.push(Feature::Barrier);
    }
    if was.discard && !now.discard {
        lost.push(Feature::Discard);
    } else if was.secure_discard && !now.secure_discard {
        lost.push(Feature::SecureDiscard);
    }
    lost
}

/// Linux's `dev_t` encoding (glibc's `gnu_dev_major`/`gnu_dev_minor`).
fn major_minor(rdev: u64) -> (u32, u32) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// When the hotplug script published both `physical-device` and a path, they must name
/// the same block device: a stale or tampered path must not make us serve another disk.
fn check_device_number(path: &std::path::Path, expected: (u32, u32)) -> Result<(), String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.file_type().is_block_device() {
        // A regular file has no device number to compare (our script writes none for it).
        return Ok(());
    }
    let actual = major_minor(meta.rdev());
    if actual != expected {
        return Err(format!(
            "is device {:x}:{:x}, but physical-device says {:x}:{:x}",
            actual.0, actual.1, expected.0, expected.1
        ));
    }
    Ok(())
}

/// Whether the platform refused the attach because it does not know the frontend's domain
/// (yet): an adoption waits for it (in the simulator, a guest that has not reattached, or
/// has reattached and not yet offered its ports again).
fn domain_unknown(e: &backend::AttachError) -> bool {
    use backend::AttachError as A;
    match e {
        A::MapRing { source, .. } => source.status() == platform::GrantStatus::BAD_DOMAIN,
        A::EventChannel { source, .. } => {
            matches!(
                source,
                platform::PlatformError::UnknownDomain(_)
                    | platform::PlatformError::PortNotYetOffered { .. }
            )
        }
        _ => false,
    }
}

/// The errno blkback would report for an attach failure.
fn attach_errno(e: &backend::AttachError) -> i32 {
    use backend::AttachError as A;
    match e {
        A::MapRing { .. } | A::RingNotWritable { .. } | A::BadRingPages { .. } | A::Ring { .. } => {
            EINVAL
        }
        A::EventChannel { .. } => EINVAL,
        A::NoRings | A::TooManyIndirectSegments(_) => EINVAL,
        A::StorageQueue { .. } | A::Io { .. } => 12,
        A::Journal { .. } => 5,
        A::EngineStopped => 108,
    }
}

/// A VBD served by the engine.
pub struct EngineVbd {
    handle: VbdHandle,
}

impl ConnectedVbd for EngineVbd {
    fn stats(&self) -> BTreeMap<String, u64> {
        let s = self.handle.stats();
        let t = s.total;
        let mut m = BTreeMap::from([
            ("oo_req".to_string(), t.oo_req),
            ("rd_req".to_string(), t.rd_req),
            ("wr_req".to_string(), t.wr_req),
            ("f_req".to_string(), t.f_req),
            ("ds_req".to_string(), t.ds_req),
            ("ds_sect".to_string(), t.ds_sect),
            ("rd_sect".to_string(), t.rd_sect),
            ("wr_sect".to_string(), t.wr_sect),
            ("errors".to_string(), t.errors),
            ("unsupported".to_string(), t.unsupported),
            ("in_flight".to_string(), t.in_flight),
            (
                "persistent_grants_in_use".to_string(),
                t.persistent_grants_in_use,
            ),
            (
                "persistent_grants_mapped".to_string(),
                t.persistent_grants_mapped,
            ),
            (
                "persistent_budget_refusals".to_string(),
                t.persistent_budget_refusals,
            ),
            ("persistent_hits".to_string(), t.persistent_hits),
            ("persistent_misses".to_string(), t.persistent_misses),
            ("indirect_page_hits".to_string(), t.indirect_page_hits),
            ("indirect_page_misses".to_string(), t.indirect_page_misses),
            ("notifications".to_string(), t.notifications),
            ("map_fallbacks".to_string(), t.map_fallbacks),
            ("throttled".to_string(), t.throttled),
            ("throttled_us".to_string(), t.throttled_ns / 1000),
            ("halted_rings".to_string(), t.halted_rings),
            ("rings".to_string(), s.rings.len() as u64),
        ]);
        m.insert(
            "grant_copy".to_string(),
            u64::from(self.handle.grant_mode() == backend::ResolvedGrantMode::Copy),
        );
        m
    }

    fn latency(&self) -> BTreeMap<String, LatencyHistogram> {
        let latency = self.handle.stats().latency;
        backend::LatencyOp::ALL
            .iter()
            .map(|&op| {
                let l = latency.op(op);
                (
                    op.name().to_string(),
                    LatencyHistogram {
                        bounds_us: backend::LATENCY_BOUNDS_US.to_vec(),
                        counts: l.buckets.to_vec(),
                        sum_ns: l.sum_ns,
                    },
                )
            })
            .collect()
    }

    fn set_qos(&self, qos: &xenbus::qos::DeviceQos) {
        self.handle.set_qos(&backend::QosSpec {
            limits: qos_limits(&qos.limits),
            group: qos.group.clone(),
        });
    }

    fn disconnect(self: Box<Self>, timeout: Duration) -> Result<DisconnectReport, VbdError> {
        match self.handle.detach(timeout) {
            Ok(stats) => Ok(DisconnectReport {
                drained: true,
                abandoned_requests: 0,
                detail: format!(
                    "{} reads, {} writes, {} errors served",
                    stats.total.rd_req, stats.total.wr_req, stats.total.errors
                ),
            }),
            Err(DetachError::Timeout {
                pending,
                in_flight,
                waited,
            }) => Ok(DisconnectReport {
                drained: false,
                abandoned_requests: in_flight,
                detail: format!(
                    "{pending} ring(s) still draining after {waited:?}; the engine releases them when the storage completes"
                ),
            }),
        }
    }
}

// Manual: the engine, platform and budget handles print nothing useful.
impl std::fmt::Debug for EngineFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineFactory")
            .field("journal_dir", &self.journal_dir)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for EngineGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineGauges").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for EngineVbd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineVbd").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_names_name_their_device() {
        let name = format!("{}-q3.journal", journal_name("vbd", 7, 51712));
        assert_eq!(journal_device(&name), Some(("vbd", 7, 51712)));
        assert_eq!(
            journal_device("xenblkd-12-768-q0.journal"),
            Some(("xenblkd", 12, 768))
        );
        for other in [
            "control.lock",
            "vbd-7-51712-q3.journal.tmp",
            "vbd-7-51712.journal",
            "vbd-x-51712-q0.journal",
            "-7-51712-q0.journal",
            "vbd-7-51712-qx.journal",
        ] {
            assert_eq!(journal_device(other), None, "{other}");
        }
    }

    #[test]
    fn device_numbers() {
        // makedev(7, 3) and makedev(259, 65536) in glibc's encoding.
        assert_eq!(major_minor(0x703), (7, 3));
        let dev = (259u64 << 8) | ((65536u64 & !0xff) << 12);
        assert_eq!(major_minor(dev), (259, 65536));
        assert!(check_device_number(std::path::Path::new("/dev/null"), (1, 3)).is_ok());
        assert!(check_device_number(std::path::Path::new("/etc/hostname"), (9, 9)).is_ok());
    }

    #[test]
    fn every_lost_feature_reaches_the_xenbus_layer() {
        let all = Features {
            flush: true,
            barrier: true,
            discard: true,
            secure_discard: true,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = Mutex::new(tx);
        let sink = VbdEventSink::new(move |e| {
            let _ = tx.lock().unwrap().send(e);
        });
        let forward = event_forwarder(all, sink);
        let id = backend::VbdId(1);
        let mut now = all;
        // The storage refuses a secure discard: only that goes (the engine's report of
        // `LostFeature::SecureDiscard`).
        now.secure_discard = false;
        forward(id, backend::VbdEvent::FeaturesChanged(now));
        assert_eq!(
            rx.try_recv().unwrap(),
            VbdEvent::FeatureLost(Feature::SecureDiscard)
        );
        // Then plain discard, and flush (the engine clears one flag per report).
        now.discard = false;
        forward(id, backend::VbdEvent::FeaturesChanged(now));
        now.flush = false;
        forward(id, backend::VbdEvent::FeaturesChanged(now));
        now.barrier = false;
        forward(id, backend::VbdEvent::FeaturesChanged(now));
        assert_eq!(
            rx.try_iter().collect::<Vec<_>>(),
            vec![
                VbdEvent::FeatureLost(Feature::Discard),
                VbdEvent::FeatureLost(Feature::Flush),
                VbdEvent::FeatureLost(Feature::Barrier),
            ]
        );
        // Discard lost at once with its secure variant: one report, which covers both.
        assert_eq!(
            lost_features(
                all,
                Features {
                    discard: false,
                    secure_discard: false,
                    ..all
                }
            ),
            vec![Feature::Discard]
        );
        let halted = backend::VbdEvent::RingHalted {
            ring: 2,
            reason: "frontend claims 99 outstanding requests".into(),
        };
        forward(id, halted);
        assert_eq!(
            rx.try_recv().unwrap(),
            VbdEvent::Fatal("ring 2 halted: frontend claims 99 outstanding requests".into())
        );
    }

    #[test]
    fn gauges_show_the_persistent_grant_budget() {
        let engine = Engine::start_with_limits(
            backend::EngineConfig {
                reactors: 1,
                ..Default::default()
            },
            backend::MapLimits {
                size: backend::BudgetSize::Vmas(5),
                max_mapped_pages: 64,
            },
        )
        .unwrap();
        let budget = engine.map_budget().clone();
        let factory = EngineFactory::new(engine, Arc::new(platform::sim::SimPlatform::new()));
        let gauges = factory.gauges();
        let m = gauges.read();
        assert_eq!(m["persistent_grant_budget_used"], 0);
        assert_eq!(m["persistent_grant_budget_limit"], 5);
        assert_eq!(m["persistent_grant_budget_refusals"], 0);
        assert_eq!(m["grant_map_vma_capacity"], 5);
        assert_eq!(m["grant_map_page_capacity"], 64);
        assert_eq!(m["grant_map_guests"], 0);
        // An engine with no rings: its reactor only sleeps (and may have timed out).
        assert_eq!(m["reactor_wakeups"], 0);
        assert_eq!(m["reactor_poll_hits"] + m["reactor_poll_misses"], 0);
        // Two guests with mappings: each may hold half.
        let (a, b) = (budget.guest(1), budget.guest(2));
        let held = a.try_take(backend::MapCost::new(2, 30)).unwrap();
        assert!(b.try_take(backend::MapCost::new(1, 33)).is_none());
        let m = gauges.read();
        assert_eq!((m["grant_map_vmas"], m["grant_map_pages"]), (2, 30));
        assert_eq!(m["grant_map_guests"], 2);
        assert_eq!(
            (
                m["grant_map_guest_share_vmas"],
                m["grant_map_guest_share_pages"]
            ),
            (2, 32)
        );
        assert_eq!(m["persistent_grant_budget_refusals"], 1);
        drop((held, a, b));
        drop(factory);
        // Still readable: the manager may outlive the factory's other users.
        assert_eq!(gauges.read()["grant_map_guests"], 0);
    }
}
