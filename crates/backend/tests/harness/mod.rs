//! A minimal frontend for engine tests: a simulated guest (platform `sim`) with
//! `FrontRing`s from blkif, driving the real engine over real rings, real simulated grant
//! mappings and real temp-file I/O, with an in-memory model of the disk to check reads.
//!
//! Deliberately small; the full simulated frontend lives in `crates/blkfront`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use backend::persistent_grants::PersistentGrantLimits;
use backend::{
    BudgetSize, Engine, EngineConfig, Features, GrantMode, MapLimits, RingSpec, VbdEvent,
    VbdHandle, VbdId, VbdLimits, VbdSpec,
};
use blkif::abi::{
    BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER,
    SEGMENTS_PER_INDIRECT_PAGE,
};
use blkif::{FrontRing, Protocol, RawRequest, Response, Segment};
use platform::sim::{DomainHandle, GuestConfig, GuestEventChannel, SimGuest, SimPlatform};
use platform::{
    Access, CopyBuffer, CopySegment, DomId, EventChannel, EventChannelBinder, GrantCopyOp,
    GrantMapper, GrantMapping, GrantRef, MapError, Platform, PlatformError, Port, XenstoreEndpoint,
};
use std::sync::atomic::{AtomicU64, Ordering};
use storage::testing::{FaultInjector, FaultyStorage};
use storage::{DirectIo, OpenOptions, Storage};

pub const SECTOR: usize = 512;
pub const GUEST_DOMID: u16 = 7;

pub use backend::testing::FdTable;

/// Tests share the process's fd table and the leak checks compare it, so they run one at
/// a time, each after the previous test's thread has exited (see [`backend::testing`]).
pub fn serial() -> MutexGuard<'static, Option<i32>> {
    backend::testing::serial()
}

#[derive(Debug, Clone)]
pub struct Opts {
    pub rings: usize,
    pub order: u32,
    pub protocol: Protocol,
    pub persistent: bool,
    pub mode: GrantMode,
    pub max_indirect: u32,
    pub read_only: bool,
    pub disk_bytes: u64,
    pub faults: Option<FaultInjector>,
    pub max_buffer_pages: usize,
    pub features: Features,
    pub reactors: usize,
    pub persistent_limits: PersistentGrantLimits,
    /// `VbdLimits::poll`.
    pub poll: Duration,
    /// The engine's grant-mapping budget in VMAs, without ring reserves
    /// ([`BudgetSize::Vmas`]); `None`: sized from `vm.max_map_count`.
    pub persistent_budget: Option<usize>,
    /// The `vm.max_map_count` the engine sizes its budget from ([`BudgetSize::MaxMapCount`])
    /// instead of this process's, unless `persistent_budget` is given.
    pub max_map_count: Option<usize>,
    /// Grant pages the engine maps at most at once ([`MapLimits::max_mapped_pages`]);
    /// `None`: the default.
    pub max_mapped_pages: Option<usize>,
    /// Guest memory, in pages.
    pub guest_pages: u32,
}

impl Default for Opts {
    fn default() -> Self {
        Self {
            rings: 1,
            order: 0,
            protocol: Protocol::Native,
            persistent: false,
            mode: GrantMode::Map,
            max_indirect: 256,
            read_only: false,
            disk_bytes: 4 << 20,
            faults: None,
            max_buffer_pages: 1024,
            features: Features {
                flush: true,
                barrier: true,
                discard: true,
                secure_discard: false,
            },
            reactors: 2,
            persistent_limits: PersistentGrantLimits::default(),
            poll: Duration::ZERO,
            persistent_budget: None,
            max_map_count: None,
            max_mapped_pages: None,
            guest_pages: 8192,
        }
    }
}

/// Grant calls the engine made, counted by [`CountingPlatform`].
#[derive(Debug, Default)]
pub struct GrantCalls {
    /// `map` and `map_each` calls (each one gntdev ioctl + mmap on real Xen, or more).
    pub map_calls: AtomicU64,
    /// Pages those calls asked for.
    pub pages: AtomicU64,
    /// Map calls that failed.
    pub failed: AtomicU64,
    /// Writable map calls.
    pub writable: AtomicU64,
    /// `copy` and `copy_segments` calls.
    pub copy_calls: AtomicU64,
}

/// A snapshot of [`GrantCalls`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GrantCallCounts {
    pub map_calls: u64,
    pub pages: u64,
    pub failed: u64,
    pub writable: u64,
    pub copy_calls: u64,
}

impl std::ops::Sub for GrantCallCounts {
    type Output = GrantCallCounts;
    fn sub(self, o: Self) -> Self {
        GrantCallCounts {
            map_calls: self.map_calls - o.map_calls,
            pages: self.pages - o.pages,
            failed: self.failed - o.failed,
            writable: self.writable - o.writable,
            copy_calls: self.copy_calls - o.copy_calls,
        }
    }
}

impl GrantCalls {
    pub fn snapshot(&self) -> GrantCallCounts {
        GrantCallCounts {
            map_calls: self.map_calls.load(Ordering::SeqCst),
            pages: self.pages.load(Ordering::SeqCst),
            failed: self.failed.load(Ordering::SeqCst),
            writable: self.writable.load(Ordering::SeqCst),
            copy_calls: self.copy_calls.load(Ordering::SeqCst),
        }
    }

    fn mapped<T>(&self, refs: &[GrantRef], access: Access, r: &Result<T, MapError>) {
        self.map_calls.fetch_add(1, Ordering::SeqCst);
        self.pages.fetch_add(refs.len() as u64, Ordering::SeqCst);
        if access.is_writable() {
            self.writable.fetch_add(1, Ordering::SeqCst);
        }
        if r.is_err() {
            self.failed.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// The simulated platform, counting the engine's grant calls: the simulator's gauges
/// (live mappings, mapped pages) say what is mapped, not how often it was mapped.
pub struct CountingPlatform {
    inner: SimPlatform,
    calls: Arc<GrantCalls>,
}

impl GrantMapper for CountingPlatform {
    fn map(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        access: Access,
    ) -> Result<GrantMapping, MapError> {
        let r = self.inner.map(domid, refs, access);
        self.calls.mapped(refs, access, &r);
        r
    }

    fn max_vmas(&self, pages: usize) -> usize {
        self.inner.max_vmas(pages)
    }

    fn map_each(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        access: Access,
    ) -> Result<Vec<GrantMapping>, MapError> {
        let r = self.inner.map_each(domid, refs, access);
        self.calls.mapped(refs, access, &r);
        r
    }

    fn copy(&self, ops: &mut [GrantCopyOp<'_>]) -> Result<(), PlatformError> {
        self.calls.copy_calls.fetch_add(1, Ordering::SeqCst);
        self.inner.copy(ops)
    }

    fn copy_segments(
        &self,
        buffer: CopyBuffer<'_>,
        segs: &mut [CopySegment],
    ) -> Result<(), PlatformError> {
        self.calls.copy_calls.fetch_add(1, Ordering::SeqCst);
        self.inner.copy_segments(buffer, segs)
    }

    fn live_mappings(&self) -> usize {
        self.inner.live_mappings()
    }

    fn mapped_pages(&self) -> usize {
        self.inner.mapped_pages()
    }
}

impl EventChannelBinder for CountingPlatform {
    fn bind_interdomain(
        &self,
        domid: DomId,
        remote_port: Port,
    ) -> Result<Box<dyn EventChannel>, PlatformError> {
        self.inner.bind_interdomain(domid, remote_port)
    }
}

impl Platform for CountingPlatform {
    fn xenstore_endpoint(&self) -> Result<XenstoreEndpoint, PlatformError> {
        self.inner.xenstore_endpoint()
    }

    fn name(&self) -> &'static str {
        self.inner.name()
    }
}

pub struct Front {
    pub ring: FrontRing,
    pub evtchn: GuestEventChannel,
    ring_grefs: Vec<GrantRef>,
    /// The ring's first guest frame and its page count (for a second backend view).
    ring_frames: (u32, u32),
    /// Responses popped but not yet claimed.
    pending: HashMap<u64, Response>,
    /// Order in which responses arrived.
    pub arrival: Vec<u64>,
}

/// One data page the frontend uses for a request.
#[derive(Debug, Clone, Copy)]
struct Page {
    frame: u32,
    gref: GrantRef,
}

pub struct Harness {
    // Drop order: engine state first, then the guest it maps.
    pub vbd: Option<VbdHandle>,
    pub engine: Option<Engine>,
    pub fronts: Vec<Front>,
    pub platform: SimPlatform,
    /// Grant calls the engine made through `platform`.
    pub grant_calls: Arc<GrantCalls>,
    pub guest: SimGuest,
    _domain: DomainHandle,
    pub disk: tempfile::NamedTempFile,
    pub model: Vec<u8>,
    pub events: Arc<Mutex<Vec<VbdEvent>>>,
    pub opts: Opts,
    free_frames: Vec<u32>,
    /// Persistent mode: pages granted once and reused, as blkfront does.
    persistent_pool: Vec<Page>,
    next_id: u64,
    pub fds_before: FdTable,
    /// What the VBD was attached with, to attach it again (a restarted daemon).
    spec: Option<(VbdSpec, Arc<dyn Platform>)>,
}

impl Harness {
    pub fn new(opts: Opts) -> Harness {
        Self::new_with_storage(opts, |s| s)
    }

    /// Like [`Harness::new`], with the storage wrapped by `wrap`.
    pub fn new_with_storage(
        opts: Opts,
        wrap: impl FnOnce(Arc<dyn Storage>) -> Arc<dyn Storage>,
    ) -> Harness {
        let fds_before = FdTable::now();
        let engine = Engine::start_with_limits(
            EngineConfig {
                reactors: opts.reactors,
                ..Default::default()
            },
            MapLimits {
                size: match (opts.persistent_budget, opts.max_map_count) {
                    (Some(vmas), _) => BudgetSize::Vmas(vmas),
                    (None, Some(n)) => BudgetSize::MaxMapCount(n),
                    (None, None) => BudgetSize::FromMapCount,
                },
                max_mapped_pages: opts
                    .max_mapped_pages
                    .unwrap_or(MapLimits::default().max_mapped_pages),
            },
        )
        .unwrap();
        let mut h = Self::guest(
            opts,
            GUEST_DOMID,
            SimPlatform::new(),
            &engine,
            fds_before,
            wrap,
        );
        h.engine = Some(engine);
        h
    }

    /// Another guest, domain `domid`, with a VBD of its own on this harness's engine and
    /// simulated hypervisor. Tear it down before this one.
    pub fn another_guest(&self, domid: DomId, opts: Opts) -> Harness {
        Self::guest(
            opts,
            domid,
            self.platform.clone(),
            self.engine.as_ref().expect("the harness owning the engine"),
            FdTable::default(),
            |s| s,
        )
    }

    /// Like [`Harness::another_guest`], with the storage wrapped by `wrap`.
    pub fn another_guest_with_storage(
        &self,
        domid: DomId,
        opts: Opts,
        wrap: impl FnOnce(Arc<dyn Storage>) -> Arc<dyn Storage>,
    ) -> Harness {
        Self::guest(
            opts,
            domid,
            self.platform.clone(),
            self.engine.as_ref().expect("the harness owning the engine"),
            FdTable::default(),
            wrap,
        )
    }

    fn guest(
        opts: Opts,
        domid: DomId,
        platform: SimPlatform,
        engine: &Engine,
        fds_before: FdTable,
        wrap: impl FnOnce(Arc<dyn Storage>) -> Arc<dyn Storage>,
    ) -> Harness {
        let pages = opts.guest_pages;
        let guest = SimGuest::new(
            domid,
            GuestConfig {
                pages,
                // Enough to grant every page, and the rings.
                grant_entries: (pages + 1024).max(16 * 512),
            },
        )
        .unwrap();
        let domain = platform.attach_local(&guest).unwrap();

        let disk = tempfile::NamedTempFile::new().unwrap();
        disk.as_file().set_len(opts.disk_bytes).unwrap();
        let raw = storage::open(
            disk.path(),
            OpenOptions {
                read_only: opts.read_only,
                direct_io: DirectIo::Off,
                exclusive: false,
            },
        )
        .unwrap();
        let storage: Arc<dyn Storage> = match &opts.faults {
            Some(inj) => Arc::new(FaultyStorage::new(raw, inj.clone())),
            None => raw,
        };
        let storage = wrap(storage);

        let mut h = Harness {
            vbd: None,
            engine: None,
            fronts: Vec::new(),
            platform,
            grant_calls: Arc::default(),
            guest,
            _domain: domain,
            disk,
            model: vec![0; opts.disk_bytes as usize],
            events: Arc::new(Mutex::new(Vec::new())),
            opts: opts.clone(),
            free_frames: (0..pages).rev().collect(),
            persistent_pool: Vec::new(),
            next_id: 1,
            fds_before,
            spec: None,
        };

        let mut specs = Vec::new();
        for _ in 0..opts.rings {
            let n = 1usize << opts.order;
            // Ring pages must be contiguous: the guest maps them as one region.
            let first = h.alloc_contiguous(n);
            let ring_grefs: Vec<GrantRef> = (0..n as u32)
                .map(|i| h.guest.grant_access(0, first + i, false).unwrap())
                .collect();
            let mem = h.guest.map_frames(first, n as u32).unwrap();
            let ring = FrontRing::new(mem, opts.protocol).unwrap();
            let evtchn = h.guest.alloc_event_channel(0).unwrap();
            specs.push(RingSpec {
                ring_refs: ring_grefs.clone(),
                event_channel: evtchn.port(),
            });
            h.fronts.push(Front {
                ring,
                evtchn,
                ring_grefs,
                ring_frames: (first, n as u32),
                pending: HashMap::new(),
                arrival: Vec::new(),
            });
        }
        let events = h.events.clone();
        let spec = VbdSpec {
            domid,
            storage,
            read_only: opts.read_only,
            rings: specs,
            protocol: opts.protocol,
            persistent: opts.persistent,
            grant_mode: opts.mode,
            features: opts.features,
            limits: VbdLimits {
                max_indirect_segments: opts.max_indirect,
                max_buffer_pages: opts.max_buffer_pages,
                persistent: opts.persistent_limits,
                poll: opts.poll,
                ..VbdLimits::default()
            },
            events: Some(Arc::new(move |_id: VbdId, e: VbdEvent| {
                events.lock().unwrap().push(e)
            })),
            journal: None,
            qos: Default::default(),
        };
        let platform: Arc<dyn Platform> = Arc::new(CountingPlatform {
            inner: h.platform.clone(),
            calls: h.grant_calls.clone(),
        });
        h.vbd = Some(engine.attach(spec.clone(), platform.clone()).unwrap());
        h.spec = Some((spec, platform));
        h
    }

    /// The daemon hands over: the VBD is detached (in-flight requests answered, the rest
    /// left on the rings) and the engine stopped.
    pub fn stop_engine(&mut self) {
        let vbd = self.vbd.take().expect("a VBD attached");
        vbd.detach(Duration::from_secs(10)).unwrap();
        self.engine
            .take()
            .expect("the harness owning the engine")
            .shutdown();
    }

    /// What a backend process killed mid-I/O leaves: it consumed the next `n` requests of
    /// ring `r` (copied them out, advanced its private `req_cons`) and answered none.
    pub fn consume_as_dead_backend(&mut self, r: usize, n: usize) {
        let (first, pages) = self.fronts[r].ring_frames;
        let mem = self.guest.map_frames(first, pages).unwrap();
        let mut dead = blkif::BackRing::new(mem, self.opts.protocol).unwrap();
        for _ in 0..n {
            dead.pop_request().unwrap().expect("a request to consume");
        }
    }

    /// A new daemon: a new engine, and the VBD attached to the same rings, as an adoption
    /// does.
    pub fn start_engine(&mut self) {
        assert!(self.vbd.is_none() && self.engine.is_none());
        let engine = Engine::start(EngineConfig {
            reactors: self.opts.reactors,
            ..Default::default()
        })
        .unwrap();
        let (spec, platform) = self.spec.clone().expect("attached once");
        self.vbd = Some(engine.attach(spec, platform).unwrap());
        self.engine = Some(engine);
    }

    pub fn vbd(&self) -> &VbdHandle {
        self.vbd.as_ref().unwrap()
    }

    fn alloc_contiguous(&mut self, n: usize) -> u32 {
        // Frames are handed out from the low end, so n pops are contiguous.
        let first = *self.free_frames.last().unwrap();
        for i in 0..n as u32 {
            assert_eq!(self.free_frames.pop(), Some(first + i));
        }
        first
    }

    fn take_page(&mut self, writable_by_backend: bool) -> Page {
        if self.opts.persistent {
            if let Some(p) = self.persistent_pool.pop() {
                return p;
            }
            let frame = self.free_frames.pop().expect("guest out of frames");
            // Persistent grants are granted read-write: the backend keeps them mapped and
            // may serve a later READ with them.
            let gref = self.guest.grant_access(0, frame, false).unwrap();
            return Page { frame, gref };
        }
        let frame = self.free_frames.pop().expect("guest out of frames");
        let gref = self
            .guest
            .grant_access(0, frame, !writable_by_backend)
            .unwrap();
        Page { frame, gref }
    }

    fn give_back(&mut self, page: Page) {
        if self.opts.persistent {
            self.persistent_pool.push(page);
        } else {
            // Fails (and is counted) if the backend still has the grant mapped after
            // answering: the check that non-persistent grants are unmapped on completion.
            self.guest.end_access(page.gref).unwrap();
            self.free_frames.push(page.frame);
        }
    }

    pub fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Builds a READ/WRITE/FLUSH/BARRIER of `data.len()` bytes (a multiple of 512) at
    /// `sector`, cutting it into segments of `seg_sectors` sectors starting at sector
    /// `first` of their pages; indirect when `indirect` or when it needs more than 11
    /// segments.
    pub fn build(
        &mut self,
        op: u8,
        sector: u64,
        data: &[u8],
        seg_sectors: usize,
        first: u8,
        indirect: bool,
    ) -> Built {
        assert_eq!(data.len() % SECTOR, 0);
        assert!(usize::from(first) + seg_sectors <= 8);
        let fills_guest = op == BLKIF_OP_READ;
        let mut segs = Vec::new();
        let mut pages = Vec::new();
        for chunk in data.chunks(seg_sectors * SECTOR) {
            let page = self.take_page(fills_guest);
            let off = usize::from(first) * SECTOR;
            if fills_guest {
                self.guest.fill_page(page.frame, 0xEE).unwrap();
            } else {
                self.guest.write_page(page.frame, off, chunk).unwrap();
            }
            let n = chunk.len() / SECTOR;
            segs.push(Segment {
                gref: page.gref,
                first_sect: first,
                last_sect: first + n as u8 - 1,
            });
            pages.push((page, off, chunk.len()));
        }
        let id = self.id();
        let mut indirect_pages = Vec::new();
        let raw = if indirect || segs.len() > 11 {
            let mut grefs = Vec::new();
            for chunk in segs.chunks(SEGMENTS_PER_INDIRECT_PAGE) {
                let mut bytes = Vec::with_capacity(chunk.len() * 8);
                for s in chunk {
                    bytes.extend_from_slice(&s.encode());
                }
                // With persistent grants from the same pool as data pages, writable, as
                // Linux blkfront's get_indirect_grant; without, read-only for this request.
                let page = if self.opts.persistent {
                    self.take_page(false)
                } else {
                    let frame = self.free_frames.pop().unwrap();
                    let gref = self.guest.grant_access(0, frame, true).unwrap();
                    Page { frame, gref }
                };
                self.guest.write_page(page.frame, 0, &bytes).unwrap();
                grefs.push(page.gref);
                indirect_pages.push(page);
            }
            RawRequest::indirect(op, id, 0, sector, segs.len() as u16, &grefs).unwrap()
        } else {
            RawRequest::direct(op, id, 0, sector, &segs).unwrap()
        };
        Built {
            id,
            op,
            raw,
            pages,
            indirect_pages,
            sector,
            len: data.len(),
            write_data: (!fills_guest).then(|| data.to_vec()),
        }
    }

    /// Puts requests on ring `r` and notifies once.
    pub fn push(&mut self, r: usize, reqs: &[&Built]) {
        let f = &mut self.fronts[r];
        for b in reqs {
            f.ring.push_request(&b.raw).unwrap();
        }
        if f.ring.push_requests_and_check_notify() {
            f.evtchn.notify().unwrap();
        }
    }

    pub fn push_raw(&mut self, r: usize, raw: &RawRequest) {
        let f = &mut self.fronts[r];
        f.ring.push_request(raw).unwrap();
        if f.ring.push_requests_and_check_notify() {
            f.evtchn.notify().unwrap();
        }
    }

    /// Waits for the response to `id` on ring `r`.
    pub fn wait(&mut self, r: usize, id: u64) -> Response {
        let f = &mut self.fronts[r];
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(rsp) = f.pending.remove(&id) {
                return rsp;
            }
            while let Some(rsp) = f.ring.pop_response().unwrap() {
                f.arrival.push(rsp.id);
                f.pending.insert(rsp.id, rsp);
            }
            if f.pending.contains_key(&id) {
                continue;
            }
            if f.ring.final_check_for_responses().unwrap() {
                continue;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no response to {id} on ring {r}"
            );
            f.evtchn.wait(Duration::from_millis(50)).unwrap();
        }
    }

    /// Every response on ring `r` not yet claimed, waiting up to `timeout` for the first.
    pub fn responses(&mut self, r: usize, timeout: Duration) -> Vec<Response> {
        let f = &mut self.fronts[r];
        let mut out: Vec<Response> = f.pending.drain().map(|(_, rsp)| rsp).collect();
        loop {
            while let Some(rsp) = f.ring.pop_response().unwrap() {
                out.push(rsp);
            }
            if f.ring.final_check_for_responses().unwrap() {
                continue;
            }
            if !out.is_empty() || !f.evtchn.wait(timeout).unwrap() {
                return out;
            }
        }
    }

    /// Collects a request's outcome: for a successful READ the data the guest got. Releases
    /// its pages. Updates the model for successful writes.
    pub fn complete(&mut self, r: usize, b: Built) -> (Response, Option<Vec<u8>>) {
        let rsp = self.wait(r, b.id);
        assert_eq!(rsp.id, b.id);
        let mut data = None;
        if b.op == BLKIF_OP_READ && rsp.status == 0 {
            let mut out = Vec::with_capacity(b.len);
            for &(page, off, len) in &b.pages {
                let mut buf = vec![0u8; len];
                self.guest.read_page(page.frame, off, &mut buf).unwrap();
                out.extend_from_slice(&buf);
            }
            data = Some(out);
        }
        if rsp.status == 0 {
            if let Some(w) = &b.write_data {
                let at = b.sector as usize * SECTOR;
                self.model[at..at + w.len()].copy_from_slice(w);
            }
        }
        for (page, _, _) in b.pages {
            self.give_back(page);
        }
        for p in b.indirect_pages {
            self.give_back(p);
        }
        (rsp, data)
    }

    pub fn write(&mut self, r: usize, sector: u64, data: &[u8]) -> Response {
        let b = self.build(BLKIF_OP_WRITE, sector, data, 8, 0, false);
        self.push(r, &[&b]);
        self.complete(r, b).0
    }

    pub fn read(&mut self, r: usize, sector: u64, len: usize) -> (Response, Option<Vec<u8>>) {
        let buf = vec![0u8; len];
        let b = self.build(BLKIF_OP_READ, sector, &buf, 8, 0, false);
        self.push(r, &[&b]);
        self.complete(r, b)
    }

    pub fn flush(&mut self, r: usize) -> Response {
        let b = self.build(BLKIF_OP_FLUSH_DISKCACHE, 0, &[], 8, 0, false);
        self.push(r, &[&b]);
        self.complete(r, b).0
    }

    pub fn barrier(&mut self, sector: u64, data: &[u8]) -> Built {
        self.build(BLKIF_OP_WRITE_BARRIER, sector, data, 8, 0, false)
    }

    pub fn discard(&mut self, r: usize, sector: u64, sectors: u64, secure: bool) -> Response {
        let id = self.id();
        self.push_raw(r, &RawRequest::discard(id, 0, sector, sectors, secure));
        let rsp = self.wait(r, id);
        if rsp.status == 0 {
            let at = sector as usize * SECTOR;
            self.model[at..at + sectors as usize * SECTOR].fill(0);
        }
        rsp
    }

    /// Reads the whole disk back in 64 KiB indirect-or-direct reads and compares it with
    /// the model.
    pub fn verify_disk(&mut self, r: usize) {
        let total = self.model.len();
        let step = 44 * 1024; // 11 segments of 4 KiB
        let mut at = 0;
        while at < total {
            let len = step.min(total - at);
            let (rsp, data) = self.read(r, (at / SECTOR) as u64, len);
            assert_eq!(rsp.status, 0, "read at {at}");
            assert!(
                data.as_deref() == Some(&self.model[at..at + len]),
                "disk differs from the model at byte {at}"
            );
            at += len;
        }
    }

    pub fn live_mappings(&self) -> usize {
        self.platform.live_mappings()
    }

    /// Detaches and checks that nothing is left: no grant mapped, no ring on a reactor, no
    /// grant revoke that failed, no fd leaked once everything is dropped.
    pub fn teardown(mut self) {
        let vbd = self.vbd.take().unwrap();
        let stats = vbd.detach(Duration::from_secs(10)).unwrap();
        assert_eq!(stats.total.in_flight, 0);
        if self.engine.is_none() {
            // Another guest on a shared engine: the owner's teardown checks the rest.
            for p in std::mem::take(&mut self.persistent_pool) {
                self.guest.end_access(p.gref).unwrap();
            }
            assert_eq!(self.guest.end_access_failures(), 0);
            return;
        }
        assert_eq!(self.live_mappings(), 0, "grant mappings left after detach");
        assert_eq!(self.platform.mapped_pages(), 0);
        let engine = self.engine.take().unwrap();
        let budget = engine.map_budget().usage();
        assert_eq!(
            (budget.grants, budget.reserved, budget.held, budget.guests),
            (0, backend::MapCost::ZERO, backend::MapCost::ZERO, 0),
            "grant-mapping budget not given back after detach"
        );
        assert!(
            engine.reactor_loads().iter().all(|&l| l == 0),
            "rings left on reactors"
        );
        engine.shutdown();
        for f in &self.fronts {
            let _ = &f.ring_grefs;
        }
        for p in std::mem::take(&mut self.persistent_pool) {
            self.guest.end_access(p.gref).unwrap();
        }
        assert_eq!(
            self.guest.end_access_failures(),
            0,
            "grant revoked while mapped"
        );
        let fds_before = std::mem::take(&mut self.fds_before);
        drop(self);
        fds_before.assert_unchanged("after teardown");
    }
}

pub struct Built {
    pub id: u64,
    pub op: u8,
    pub raw: RawRequest,
    pages: Vec<(Page, usize, usize)>,
    indirect_pages: Vec<Page>,
    pub sector: u64,
    pub len: usize,
    write_data: Option<Vec<u8>>,
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}
