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
pub fn open_target(
    target: &DiskTarget,
    options: OpenOptions,
    physical_device: Option<(u32, u32)>,
    nbd: storage::NbdConfig,
) -> Result<Arc<dyn Storage>, VbdError> {
    let path = &target.path;
    let context = || format!("opening {}", path.display());
    match target.format {
        DiskFormat::Nbd => return open_nbd(target, nbd),
        DiskFormat::Rbd => return open_rbd(target, options.read_only),
        DiskFormat::Raw | DiskFormat::Qcow2 => {}
    }
    if let Some(expected) = physical_device {
        check_device_number(path, expected).map_err(|m| VbdError::new(context(), m, EINVAL))?;
    }
    let opened: Result<Arc<dyn Storage>, _> = match target.format {
        DiskFormat::Raw | DiskFormat::Nbd | DiskFormat::Rbd => storage::open(path, options),
        DiskFormat::Qcow2 => {
            storage::Qcow2Storage::open(path, options).map(|s| Arc::new(s) as Arc<dyn Storage>)
        }
    };
    opened.map_err(|e| {
        let errno = match &e {
            storage::StorageError::Open { source, .. }
            | storage::StorageError::Probe { source, .. } => source.raw_os_error().unwrap_or(5),
            storage::StorageError::UnsupportedImage { .. } => EOPNOTSUPP,
            storage::StorageError::InvalidImage { .. } => EINVAL,
            _ => 5,
        };
        VbdError::new(context(), e, errno)
    })
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

/// Opens the Ceph RBD image a target names. The timeouts are librbd's, bounded by
/// xenblkd's defaults unless ceph.conf or the target's options set them.
fn open_rbd(target: &DiskTarget, read_only: bool) -> Result<Arc<dyn Storage>, VbdError> {
    let text = target.path.to_string_lossy();
    // Named without its options, which may carry monitors, users or keys.
    let shown = storage::rbd::RbdTarget::parse(&text)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| "an rbd: target".to_string());
    let config = storage::RbdConfig {
        read_only,
        ..storage::RbdConfig::default()
    };
    let storage = storage::RbdStorage::open(&text, config)
        .map_err(|e| VbdError::new(format!("opening {shown}"), e.to_string(), e.errno()))?;
    Ok(Arc::new(storage))
}

/// [`VbdFactory`] over the engine and a platform.
pub struct EngineFactory {
    engine: Engine,
    platform: Arc<dyn Platform>,
}

impl EngineFactory {
    /// A factory attaching VBDs to `engine`, mapping grants through `platform`.
    pub fn new(engine: Engine, platform: Arc<dyn Platform>) -> EngineFactory {
        EngineFactory { engine, platform }
    }

    /// The engine's daemon-wide gauges, readable from any thread after the factory has
    /// been handed to the xenbus manager.
    pub fn gauges(&self) -> EngineGauges {
        EngineGauges {
            budget: self.engine.map_budget().clone(),
        }
    }
}

/// Daemon-wide gauges of the engine for `xenblkd status`, next to the process's own
/// (grant mappings, fds, threads): the grant-mapping budget every guest has a share of.
#[derive(Clone)]
pub struct EngineGauges {
    budget: MapBudget,
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
    /// `_pages` (most one of them may hold now).
    pub fn read(&self) -> BTreeMap<String, u64> {
        let u = self.budget.usage();
        let share = u.share();
        BTreeMap::from([
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

fn grant_mode(m: GrantModeSetting) -> backend::GrantMode {
    match m {
        GrantModeSetting::Map => backend::GrantMode::Map,
        GrantModeSetting::Copy => backend::GrantMode::Copy,
        GrantModeSetting::Auto => backend::GrantMode::Auto,
    }
}

impl VbdFactory for EngineFactory {
    fn open(&self, config: &DeviceConfig) -> Result<Arc<dyn Storage>, VbdError> {
        open_target(
            &config.target,
            open_options(config),
            config.physical_device,
            nbd_config(config),
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
                max_indirect_segments: settings.max_indirect_segments,
                persistent: backend::persistent_grants::PersistentGrantLimits {
                    max_grants: settings.max_persistent_grants as usize,
                    unused_timeout: Duration::from_secs(settings.persistent_grant_unused_secs),
                },
                ..VbdLimits::default()
            },
            events: Some(events),
        };
        let handle = self
            .engine
            .attach(spec, self.platform.clone())
            .map_err(|e| VbdError::new("connecting the rings", &e, attach_errno(&e)))?;
        Ok(Box::new(EngineVbd { handle }))
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
            ("halted_rings".to_string(), t.halted_rings),
            ("rings".to_string(), s.rings.len() as u64),
        ]);
        m.insert(
            "grant_copy".to_string(),
            u64::from(self.handle.grant_mode() == backend::ResolvedGrantMode::Copy),
        );
        m
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

#[cfg(test)]
mod tests {
    use super::*;

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
            backend::EngineConfig { reactors: 1 },
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
