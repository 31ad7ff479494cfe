//! An in-process simulated Xen host for `bench`: the real engine serving a storage to a
//! simulated xen-blkfront, joined directly (no xenstore round), with teardown that
//! checks nothing leaked.
//!
//! The demo goes through xenstore and the xenbus layer instead; the benchmark wants the
//! data path alone and every knob (ring order, queues, modes) set explicitly.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use backend::{Engine, EngineConfig, Features, GrantMode, RingSpec, VbdHandle, VbdLimits, VbdSpec};
use blkfront::sim::SimGuestServices;
use blkfront::{BackendFeatures, DiscardParams, Frontend, FrontendConfig};
use platform::sim::{DomainHandle, GuestConfig, SimGuest, SimPlatform};
use platform::{GrantMapper, Platform};
use storage::Storage;

/// The simulated guest's domain id.
pub const GUEST_DOMID: u16 = 1;

/// What to build.
#[derive(Debug, Clone)]
pub struct StackOptions {
    pub frontend: FrontendConfig,
    pub backend_queues: u32,
    pub backend_ring_order: u32,
    pub backend_persistent: bool,
    pub backend_indirect: u32,
    pub grant_mode: GrantMode,
    pub reactors: usize,
    /// Guest memory, in 4 KiB pages.
    pub guest_pages: u32,
    /// `VbdLimits::poll`.
    pub poll: Duration,
    /// Persistent grants kept per ring (`PersistentGrantLimits::max_grants`; 0: sized to
    /// the ring).
    pub max_persistent_grants: usize,
}

/// Engine + simulated guest + frontend, connected.
pub struct SimStack {
    pub frontend: Frontend,
    vbd: Option<VbdHandle>,
    engine: Option<Engine>,
    services: Arc<SimGuestServices>,
    platform: SimPlatform,
    domain: Option<DomainHandle>,
    guest_pages: u32,
    domid: u16,
}

impl SimStack {
    /// The engine's reactors' event-loop counts, summed.
    pub fn reactor_stats(&self) -> backend::ReactorStats {
        let mut total = backend::ReactorStats::default();
        for s in self.engine.iter().flat_map(|e| e.reactor_stats()) {
            total += s;
        }
        total
    }

    pub fn connect(storage: Arc<dyn Storage>, opts: &StackOptions) -> anyhow::Result<SimStack> {
        let engine = Engine::start(EngineConfig {
            reactors: opts.reactors,
            ..Default::default()
        })
        .context("starting the engine")?;
        let mut stack = Self::connect_on(storage, opts, &engine, GUEST_DOMID)?;
        stack.engine = Some(engine);
        Ok(stack)
    }

    /// A guest `domid` with its disk on `storage`, served by `engine` (which the caller
    /// owns and shuts down after [`teardown`](Self::teardown)): several stacks on one
    /// engine share its reactors.
    pub fn connect_on(
        storage: Arc<dyn Storage>,
        opts: &StackOptions,
        engine: &Engine,
        domid: u16,
    ) -> anyhow::Result<SimStack> {
        let info = storage.info();
        let platform = SimPlatform::new();
        let guest = Arc::new(
            SimGuest::new(
                domid,
                GuestConfig {
                    pages: opts.guest_pages,
                    grant_entries: 64 * 1024,
                },
            )
            .context("creating the simulated guest")?,
        );
        let domain = platform
            .attach_local(&guest)
            .context("attaching the guest")?;
        let services = Arc::new(SimGuestServices::new(guest));
        let features = Features {
            flush: info.flush,
            barrier: info.flush,
            discard: info.discard,
            secure_discard: info.secure_discard,
        };
        let offer = BackendFeatures {
            max_queues: opts.backend_queues,
            max_ring_page_order: opts.backend_ring_order,
            persistent: opts.backend_persistent,
            max_indirect_segments: opts.backend_indirect,
            flush_cache: features.flush,
            barrier: features.barrier,
            discard: features.discard.then_some(DiscardParams {
                granularity: info.discard_granularity.max(512),
                alignment: info.discard_alignment,
                secure: features.secure_discard,
            }),
            sectors: info.size_bytes / 512,
            info: if info.read_only {
                blkfront::features::VDISK_READONLY
            } else {
                0
            },
            sector_size: info.logical_block_size,
            physical_sector_size: info.physical_block_size,
        };
        let (frontend, connect) =
            Frontend::connect_direct(services.clone(), opts.frontend.clone(), &offer)
                .context("frontend setup")?;
        let spec = VbdSpec {
            domid,
            storage,
            read_only: info.read_only,
            rings: connect
                .queues
                .iter()
                .map(|q| RingSpec {
                    ring_refs: q.ring_refs.clone(),
                    event_channel: q.event_channel,
                })
                .collect(),
            protocol: connect.protocol,
            persistent: connect.persistent,
            grant_mode: opts.grant_mode,
            features,
            limits: VbdLimits {
                max_indirect_segments: opts.backend_indirect,
                resize_poll: None,
                poll: opts.poll,
                persistent: backend::persistent_grants::PersistentGrantLimits {
                    max_grants: opts.max_persistent_grants,
                    ..Default::default()
                },
                ..VbdLimits::default()
            },
            events: None,
            journal: None,
            qos: Default::default(),
        };
        let p: Arc<dyn Platform> = Arc::new(platform.clone());
        let vbd = engine.attach(spec, p).context("attaching the VBD")?;
        Ok(SimStack {
            frontend,
            vbd: Some(vbd),
            engine: None,
            services,
            platform,
            domain: Some(domain),
            guest_pages: opts.guest_pages,
            domid,
        })
    }

    pub fn vbd(&self) -> &VbdHandle {
        self.vbd.as_ref().expect("attached until teardown")
    }

    /// Detaches, closes and checks that no grant stayed mapped and no guest page leaked.
    pub fn teardown(mut self) -> anyhow::Result<backend::VbdStats> {
        let stats = self
            .vbd
            .take()
            .expect("attached until teardown")
            .detach(Duration::from_secs(10))
            .context("detaching the VBD")?;
        if let Some(engine) = self.engine.take() {
            engine.shutdown();
        }
        let report = self.frontend.close();
        if !report.is_clean() {
            bail!("grants still mapped at teardown: {report:?}");
        }
        let free = self.services.free_frames_count();
        if free != self.guest_pages as usize {
            bail!("guest frames leaked: {free} of {} free", self.guest_pages);
        }
        if self.platform.live_mappings() != 0 {
            bail!("{} grant mappings leaked", self.platform.live_mappings());
        }
        self.domain.take();
        let _ = self.platform.detach(self.domid);
        Ok(stats)
    }
}
