//! The end-to-end rig: the real engine serving a temp-file disk to a blkfront over the
//! simulator, with a byte-for-byte model of the disk and leak checks at teardown.

#![allow(dead_code)]

use std::sync::{Arc, MutexGuard};
use std::time::Duration;

use backend::testing::FdTable;
use backend::{
    BudgetSize, Engine, EngineConfig, Features, GrantMode, RingSpec, VbdHandle, VbdLimits, VbdSpec,
};
use blkfront::sim::SimGuestServices;
use blkfront::{BackendFeatures, DiscardParams, Frontend, FrontendConfig};
use platform::sim::{DomainHandle, GuestConfig, SimGuest, SimPlatform};
use platform::{GrantMapper, Platform};
use storage::{DirectIo, OpenOptions, Storage};

pub const GUEST_DOMID: u16 = 9;

/// The leak checks compare the process's fd table, so rigs run one at a time, each after
/// the previous test's thread has exited (see [`backend::testing`]).
pub fn serial() -> MutexGuard<'static, Option<i32>> {
    backend::testing::serial()
}

#[derive(Debug, Clone)]
pub struct RigOpts {
    pub frontend: FrontendConfig,
    /// Rings the backend accepts (`multi-queue-max-queues`).
    pub backend_queues: u32,
    pub backend_order: u32,
    pub backend_persistent: bool,
    pub backend_indirect: u32,
    pub mode: GrantMode,
    pub features: Features,
    pub read_only: bool,
    pub disk_bytes: u64,
    pub guest_pages: u32,
    /// The engine's grant-mapping budget in VMAs, without ring reserves
    /// (`BudgetSize::Vmas`); `None`: sized from `vm.max_map_count`.
    pub persistent_budget: Option<usize>,
}

impl Default for RigOpts {
    fn default() -> Self {
        Self {
            frontend: FrontendConfig {
                io_timeout: Duration::from_secs(20),
                ..FrontendConfig::default()
            },
            backend_queues: 4,
            backend_order: 4,
            backend_persistent: true,
            backend_indirect: 256,
            mode: GrantMode::Map,
            features: Features {
                flush: true,
                barrier: true,
                discard: true,
                secure_discard: false,
            },
            read_only: false,
            disk_bytes: 4 << 20,
            guest_pages: 16384,
            persistent_budget: None,
        }
    }
}

pub struct Rig {
    pub fe: Option<Frontend>,
    pub vbd: Option<VbdHandle>,
    pub engine: Option<Engine>,
    pub services: Arc<SimGuestServices>,
    pub platform: SimPlatform,
    domain: Option<DomainHandle>,
    pub disk: tempfile::NamedTempFile,
    pub model: Vec<u8>,
    pub opts: RigOpts,
    fds_before: FdTable,
}

pub fn open_storage(path: &std::path::Path, read_only: bool) -> Arc<dyn Storage> {
    storage::open(
        path,
        OpenOptions {
            read_only,
            direct_io: DirectIo::Off,
            exclusive: false,
        },
    )
    .unwrap()
}

impl Rig {
    pub fn new(opts: RigOpts) -> Rig {
        let fds_before = FdTable::now();
        let platform = SimPlatform::new();
        let guest = Arc::new(
            SimGuest::new(
                GUEST_DOMID,
                GuestConfig {
                    pages: opts.guest_pages,
                    grant_entries: 64 * 512,
                },
            )
            .unwrap(),
        );
        let domain = platform.attach_local(&guest).unwrap();
        let services = Arc::new(SimGuestServices::new(guest));

        let disk = tempfile::NamedTempFile::new().unwrap();
        disk.as_file().set_len(opts.disk_bytes).unwrap();
        let storage = open_storage(disk.path(), opts.read_only);

        let offer = BackendFeatures {
            max_queues: opts.backend_queues,
            max_ring_page_order: opts.backend_order,
            persistent: opts.backend_persistent,
            max_indirect_segments: opts.backend_indirect,
            flush_cache: opts.features.flush,
            barrier: opts.features.barrier,
            discard: opts.features.discard.then_some(DiscardParams {
                granularity: 512,
                alignment: 0,
                secure: opts.features.secure_discard,
            }),
            sectors: opts.disk_bytes / 512,
            info: if opts.read_only {
                blkfront::features::VDISK_READONLY
            } else {
                0
            },
            sector_size: 512,
            physical_sector_size: 512,
        };
        let (fe, info) =
            Frontend::connect_direct(services.clone(), opts.frontend.clone(), &offer).unwrap();
        let engine = Engine::start_with_budget(
            EngineConfig {
                reactors: 2,
                ..Default::default()
            },
            opts.persistent_budget
                .map_or(BudgetSize::FromMapCount, BudgetSize::Vmas),
        )
        .unwrap();
        let spec = VbdSpec {
            domid: GUEST_DOMID,
            storage,
            read_only: opts.read_only,
            rings: info
                .queues
                .iter()
                .map(|q| RingSpec {
                    ring_refs: q.ring_refs.clone(),
                    event_channel: q.event_channel,
                })
                .collect(),
            protocol: info.protocol,
            persistent: info.persistent,
            grant_mode: opts.mode,
            features: opts.features,
            limits: VbdLimits {
                max_indirect_segments: opts.backend_indirect,
                resize_poll: None,
                ..VbdLimits::default()
            },
            events: None,
            journal: None,
            qos: Default::default(),
        };
        let p: Arc<dyn Platform> = Arc::new(platform.clone());
        let vbd = engine.attach(spec, p).unwrap();
        Rig {
            fe: Some(fe),
            vbd: Some(vbd),
            engine: Some(engine),
            services,
            platform,
            domain: Some(domain),
            disk,
            model: vec![0; opts.disk_bytes as usize],
            opts,
            fds_before,
        }
    }

    pub fn fe(&self) -> &Frontend {
        self.fe.as_ref().unwrap()
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        self.fe().write(offset, data).unwrap();
        self.model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }

    pub fn check(&self, offset: u64, len: usize) {
        let mut buf = vec![0xA5u8; len];
        self.fe().read(offset, &mut buf).unwrap();
        let want = &self.model[offset as usize..offset as usize + len];
        if buf != want {
            let first = buf.iter().zip(want).position(|(a, b)| a != b).unwrap();
            panic!("read at {offset}+{len} differs from the model at byte {first}");
        }
    }

    /// Detaches the backend, closes the frontend and checks nothing leaked: no grant still
    /// mapped, every guest frame back, no mapping alive in the platform, no fd left open.
    pub fn finish(mut self) -> blkfront::FrontendStats {
        let vbd = self.vbd.take().unwrap();
        vbd.detach(Duration::from_secs(10)).unwrap();
        let engine = self.engine.take().unwrap();
        let budget = engine.map_budget().usage();
        assert_eq!(
            (budget.grants, budget.reserved, budget.held, budget.guests),
            (0, backend::MapCost::ZERO, backend::MapCost::ZERO, 0),
            "grant-mapping budget not given back after detach"
        );
        engine.shutdown();
        let fe = self.fe.take().unwrap();
        let stats = fe.stats();
        let report = fe.close();
        assert!(
            report.is_clean(),
            "grants still mapped at teardown: {report:?}"
        );
        assert_eq!(report.aborted_requests, 0);
        drop(fe);
        assert_eq!(
            self.services.free_frames_count(),
            self.opts.guest_pages as usize,
            "guest frames leaked"
        );
        assert_eq!(self.platform.live_mappings(), 0, "grant mappings leaked");
        assert_eq!(
            stats.protocol_errors(),
            0,
            "backend protocol errors: {stats:?}"
        );
        assert_eq!(
            stats.end_access_failures, 0,
            "grants still mapped at completion: {stats:?}"
        );
        self.domain.take();
        let _ = self.platform.detach(GUEST_DOMID);
        let fds_before = std::mem::take(&mut self.fds_before);
        drop(self);
        fds_before.assert_unchanged("after teardown");
        stats
    }
}
