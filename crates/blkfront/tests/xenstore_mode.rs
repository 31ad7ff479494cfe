//! The xenstore handshake: blkfront connects through the in-memory xenstore server to a
//! backend whose xenbus side the test plays (as blkback's xenbus.c would), with the real
//! engine behind it. Covers the node layout Linux writes, resize, backend-initiated close,
//! reconnect after the backend closed, and guest-initiated close.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use backend::{Engine, EngineConfig, Features, GrantMode, RingSpec, VbdHandle, VbdLimits, VbdSpec};
use blkfront::sim::SimGuestServices;
use blkfront::{FrontendConfig, Protocol, XenbusFrontend, XenbusState};
use platform::sim::{DomainHandle, GuestConfig, SimGuest, SimPlatform};
use platform::{GrantMapper, Platform};
use storage::{DirectIo, OpenOptions};
use xenstore::{
    Access, ClientConfig, Perm, ServerConfig, Transport, XenstoreServer, XsClient, XsOps,
};

const GUEST: u16 = 3;
const DEVID: u32 = 51712;
const PAGES: u32 = 8192;

fn client(server: &XenstoreServer, domid: u32) -> XsClient {
    XsClient::new(
        Transport::Unix(server.connect_as(domid).unwrap()),
        ClientConfig::default(),
    )
    .unwrap()
}

fn fe_path() -> String {
    format!("/local/domain/{GUEST}/device/vbd/{DEVID}")
}

fn be_path() -> String {
    format!("/local/domain/0/backend/vbd/{GUEST}/{DEVID}")
}

fn read(xs: &XsClient, p: &str) -> Option<String> {
    xs.read_opt(p)
        .unwrap()
        .map(|v| String::from_utf8(v).unwrap())
}

fn state(xs: &XsClient, dir: &str) -> u32 {
    read(xs, &format!("{dir}/state"))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// What the toolstack does before the guest boots: both directories, with permissions
/// letting each side read the other's.
fn toolstack(xs: &XsClient) {
    let (fe, be) = (fe_path(), be_path());
    // Directories first, so every node created in them inherits their permissions.
    xs.mkdir(&fe).unwrap();
    xs.set_perms(
        &fe,
        &[
            Perm::new(GUEST as u32, Access::None),
            Perm::new(0, Access::Read),
        ],
    )
    .unwrap();
    xs.mkdir(&be).unwrap();
    xs.set_perms(
        &be,
        &[
            Perm::new(0, Access::None),
            Perm::new(GUEST as u32, Access::Read),
        ],
    )
    .unwrap();
    xs.write(&format!("{fe}/backend"), &be).unwrap();
    xs.write(&format!("{fe}/backend-id"), "0").unwrap();
    xs.write(&format!("{fe}/virtual-device"), DEVID.to_string())
        .unwrap();
    xs.write(&format!("{fe}/state"), "1").unwrap();
    xs.write(&format!("{be}/frontend"), &fe).unwrap();
    xs.write(&format!("{be}/frontend-id"), GUEST.to_string())
        .unwrap();
    xs.write(&format!("{be}/state"), "1").unwrap();
}

/// The backend's xenbus side, hand-rolled: advertises, waits for the frontend, attaches
/// the engine, follows the frontend through closing.
struct ToyBackend {
    xs: XsClient,
    engine: Engine,
    platform: SimPlatform,
    disk: tempfile::NamedTempFile,
    vbd: Mutex<Option<VbdHandle>>,
    /// Every frontend node layout seen at connect time, for the test to inspect.
    seen: Mutex<Vec<Vec<(String, String)>>>,
    stop: AtomicBool,
}

impl ToyBackend {
    fn advertise(&self) {
        let be = be_path();
        for (k, v) in [
            ("multi-queue-max-queues", "4"),
            ("max-ring-page-order", "4"),
            ("feature-persistent", "1"),
            ("feature-max-indirect-segments", "256"),
            ("feature-flush-cache", "1"),
            ("feature-barrier", "1"),
            ("feature-discard", "1"),
            ("discard-granularity", "4096"),
            ("discard-alignment", "0"),
            ("discard-secure", "0"),
        ] {
            self.xs.write(&format!("{be}/{k}"), v).unwrap();
        }
        self.xs.write(&format!("{be}/state"), "2").unwrap();
    }

    fn connect(&self) {
        let fe = fe_path();
        let rd = |k: &str| read(&self.xs, &format!("{fe}/{k}"));
        let mut layout = Vec::new();
        for k in self.xs.directory(&fe).unwrap() {
            if let Some(v) = rd(&k) {
                layout.push((k, v));
            }
        }
        let nq: usize = rd("multi-queue-num-queues").map_or(1, |v| v.parse().unwrap());
        let order: u32 = rd("ring-page-order").map_or(0, |v| v.parse().unwrap());
        let mut rings = Vec::new();
        for q in 0..nq {
            let dir = if nq == 1 {
                fe.clone()
            } else {
                format!("{fe}/queue-{q}")
            };
            let r = |k: &str| read(&self.xs, &format!("{dir}/{k}"));
            let ring_refs = match r("ring-ref") {
                Some(v) if order == 0 => vec![v.parse().unwrap()],
                _ => (0..1u32 << order)
                    .map(|i| r(&format!("ring-ref{i}")).unwrap().parse().unwrap())
                    .collect(),
            };
            rings.push(RingSpec {
                ring_refs,
                event_channel: r("event-channel").unwrap().parse().unwrap(),
            });
        }
        let protocol =
            rd("protocol").map_or(Protocol::Native, |p| Protocol::from_xenstore(&p).unwrap());
        let persistent = rd("feature-persistent").as_deref() == Some("1");
        let storage = storage::open(
            self.disk.path(),
            OpenOptions {
                read_only: false,
                direct_io: DirectIo::Off,
                exclusive: false,
            },
        )
        .unwrap();
        let sectors = self.disk.as_file().metadata().unwrap().len() / 512;
        let spec = VbdSpec {
            domid: GUEST,
            storage,
            read_only: false,
            rings,
            protocol,
            persistent,
            grant_mode: GrantMode::Auto,
            features: Features {
                flush: true,
                barrier: true,
                discard: true,
                secure_discard: false,
            },
            limits: VbdLimits {
                resize_poll: None,
                ..VbdLimits::default()
            },
            events: None,
            journal: None,
            qos: Default::default(),
        };
        let p: Arc<dyn Platform> = Arc::new(self.platform.clone());
        *self.vbd.lock().unwrap() = Some(self.engine.attach(spec, p).unwrap());
        self.seen.lock().unwrap().push(layout);
        let be = be_path();
        self.xs
            .write(&format!("{be}/sectors"), sectors.to_string())
            .unwrap();
        self.xs.write(&format!("{be}/info"), "0").unwrap();
        self.xs.write(&format!("{be}/sector-size"), "512").unwrap();
        self.xs
            .write(&format!("{be}/physical-sector-size"), "4096")
            .unwrap();
        self.xs.write(&format!("{be}/state"), "4").unwrap();
    }

    fn disconnect(&self) {
        if let Some(vbd) = self.vbd.lock().unwrap().take() {
            vbd.detach(Duration::from_secs(10)).unwrap();
        }
        self.xs.write(&format!("{}/state", be_path()), "6").unwrap();
    }

    /// blkback's `frontend_changed`, polled.
    fn run(&self) {
        let (fe, be) = (fe_path(), be_path());
        while !self.stop.load(Ordering::Acquire) {
            let f = state(&self.xs, &fe);
            let b = state(&self.xs, &be);
            match (b, f) {
                (2, 3) => self.connect(),
                (4, 5) => self.xs.write(&format!("{be}/state"), "5").unwrap(),
                (4 | 5, 6) => self.disconnect(),
                _ => {}
            }
            thread::sleep(Duration::from_millis(2));
        }
    }
}

struct World {
    serial: Option<std::sync::MutexGuard<'static, Option<i32>>>,
    fds_before: backend::testing::FdTable,
    server: XenstoreServer,
    dom0: XsClient,
    backend: Arc<ToyBackend>,
    thread: Option<thread::JoinHandle<()>>,
    services: Arc<SimGuestServices>,
    platform: SimPlatform,
    _domain: DomainHandle,
}

impl World {
    fn new() -> World {
        // The leak check compares the process's fd table: one world at a time, each
        // after the previous test's thread has exited (see `backend::testing`).
        let serial = backend::testing::serial();
        let fds_before = backend::testing::FdTable::now();
        let server = XenstoreServer::new(ServerConfig::default());
        server.introduce_domain(GUEST as u32);
        let dom0 = client(&server, 0);
        toolstack(&dom0);
        let platform = SimPlatform::new();
        let guest = Arc::new(
            SimGuest::new(
                GUEST,
                GuestConfig {
                    pages: PAGES,
                    grant_entries: 16 * 512,
                },
            )
            .unwrap(),
        );
        let domain = platform.attach_local(&guest).unwrap();
        let services = Arc::new(SimGuestServices::new(guest));
        let disk = tempfile::NamedTempFile::new().unwrap();
        disk.as_file().set_len(2 << 20).unwrap();
        let backend = Arc::new(ToyBackend {
            xs: client(&server, 0),
            engine: Engine::start(EngineConfig {
                reactors: 1,
                ..Default::default()
            })
            .unwrap(),
            platform: platform.clone(),
            disk,
            vbd: Mutex::new(None),
            seen: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        backend.advertise();
        let b = backend.clone();
        let thread = thread::spawn(move || b.run());
        World {
            serial: Some(serial),
            fds_before,
            server,
            dom0,
            backend,
            thread: Some(thread),
            services,
            platform,
            _domain: domain,
        }
    }

    fn connect(&self, config: FrontendConfig) -> XenbusFrontend {
        XenbusFrontend::connect(
            self.services.clone(),
            config,
            client(&self.server, GUEST as u32),
            &fe_path(),
        )
        .unwrap()
    }

    /// Stops everything and checks no fd is left open.
    fn finish(mut self) {
        self.stop_backend();
        let fds_before = std::mem::take(&mut self.fds_before);
        let serial = self.serial.take();
        drop(self);
        fds_before.assert_unchanged("after the world stopped");
        drop(serial);
    }

    fn stop_backend(&mut self) {
        self.backend.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn layout(&self) -> Vec<(String, String)> {
        self.backend.seen.lock().unwrap().last().unwrap().clone()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop_backend();
        self.server.shutdown();
        let _ = self.platform.detach(GUEST);
    }
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

fn has(layout: &[(String, String)], k: &str) -> Option<String> {
    layout.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
}

#[test]
fn linux_layout_single_queue_single_page() {
    let w = World::new();
    let config = FrontendConfig {
        max_queues: 1,
        ..FrontendConfig::default()
    };
    let mut x = w.connect(config);
    let l = w.layout();
    // Exactly what Linux writes for one queue and one page.
    assert!(has(&l, "ring-ref").is_some());
    assert!(has(&l, "ring-ref0").is_none());
    assert!(has(&l, "ring-page-order").is_none());
    assert!(has(&l, "multi-queue-num-queues").is_none());
    assert!(has(&l, "event-channel").is_some());
    assert_eq!(
        has(&l, "protocol").as_deref(),
        Some(blkif::abi::XEN_IO_PROTO_ABI_NATIVE)
    );
    assert_eq!(has(&l, "feature-persistent").as_deref(), Some("1"));
    assert_eq!(has(&l, "state").as_deref(), Some("3"));
    assert_eq!(state(&w.dom0, &fe_path()), 4, "Connected after the backend");

    let fe = x.frontend().unwrap().clone();
    let n = fe.negotiated();
    assert!(n.persistent);
    assert_eq!(n.max_indirect_segments, 32);
    assert_eq!(fe.disk().physical_sector_size, 4096);
    assert_eq!(fe.capacity(), 2 << 20);
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let len = data.len() / 512 * 512;
    fe.write(8192, &data[..len]).unwrap();
    let mut back = vec![0u8; len];
    fe.read(8192, &mut back).unwrap();
    assert_eq!(back, data[..len]);
    fe.flush().unwrap();
    fe.discard(1 << 20, 65536, false).unwrap();
    drop(fe);

    // Guest-initiated close: Closing, Closed, the backend disconnects, grants end.
    let report = x.close().unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(state(&w.dom0, &be_path()), 6);
    assert_eq!(w.services.free_frames_count(), PAGES as usize);
    assert_eq!(w.platform.live_mappings(), 0);
    drop(x);
    w.finish();
}

#[test]
fn multi_queue_multi_page_layout() {
    let w = World::new();
    let config = FrontendConfig {
        max_queues: 2,
        max_ring_order: 2,
        protocol: Protocol::X86_32,
        ..FrontendConfig::default()
    };
    let mut x = w.connect(config);
    let l = w.layout();
    assert_eq!(has(&l, "multi-queue-num-queues").as_deref(), Some("2"));
    assert_eq!(has(&l, "ring-page-order").as_deref(), Some("2"));
    assert_eq!(has(&l, "protocol").as_deref(), Some("x86_32-abi"));
    assert!(has(&l, "ring-ref").is_none());
    for q in 0..2 {
        let dir = format!("{}/queue-{q}", fe_path());
        for i in 0..4 {
            assert!(read(&w.dom0, &format!("{dir}/ring-ref{i}")).is_some());
        }
        assert!(read(&w.dom0, &format!("{dir}/event-channel")).is_some());
    }
    let fe = x.frontend().unwrap().clone();
    assert_eq!(fe.num_queues(), 2);
    assert_eq!(fe.queue_depth(), 128);
    for q in 0..2 {
        fe.submit_write(q, q as u64 * 4096, &[q as u8 + 1; 4096], q as u64)
            .unwrap();
    }
    let mut out = Vec::new();
    eventually("async writes", || {
        for q in 0..2 {
            fe.poll_completions(q, &mut out).unwrap();
        }
        out.len() == 2
    });
    drop(fe);
    assert!(x.close().unwrap().is_clean());
    drop(x);
    w.finish();
}

#[test]
fn odd_frontends_omit_protocol_and_use_ring_ref0() {
    let w = World::new();
    let config = FrontendConfig {
        max_queues: 1,
        write_protocol: false,
        legacy_single_ring_ref: false,
        persistent: false,
        ..FrontendConfig::default()
    };
    let mut x = w.connect(config);
    let l = w.layout();
    assert!(has(&l, "protocol").is_none());
    assert_eq!(has(&l, "ring-page-order").as_deref(), Some("0"));
    assert!(has(&l, "ring-ref0").is_some());
    assert_eq!(has(&l, "feature-persistent").as_deref(), Some("0"));
    let fe = x.frontend().unwrap().clone();
    assert!(!fe.negotiated().persistent);
    fe.write(0, &[5u8; 4096]).unwrap();
    let mut b = [0u8; 4096];
    fe.read(0, &mut b).unwrap();
    assert_eq!(b, [5u8; 4096]);
    drop(fe);
    assert!(x.close().unwrap().is_clean());
    drop(x);
    w.finish();
}

#[test]
fn resize_backend_close_and_reconnect() {
    let w = World::new();
    let mut x = w.connect(FrontendConfig::default());
    let fe = x.frontend().unwrap().clone();
    fe.write(0, &[0x11; 4096]).unwrap();

    // Resize: the backend writes `sectors` and rewrites its state, as blkback does.
    let be = be_path();
    w.backend.disk.as_file().set_len(4 << 20).unwrap();
    w.dom0
        .write(&format!("{be}/sectors"), (8192u64).to_string())
        .unwrap();
    w.dom0.write(&format!("{be}/state"), "4").unwrap();
    eventually("resize seen", || fe.capacity() == 4 << 20);
    fe.write((3 << 20) + 4096, &[0x22; 4096]).ok();

    // Backend-initiated close (xl block-detach): Closing -> frontend Closed -> backend
    // disconnects -> Closed -> the frontend ends its grants.
    w.dom0.write(&format!("{be}/state"), "5").unwrap();
    eventually("frontend closed", || state(&w.dom0, &fe_path()) == 6);
    x.wait_backend_state(XenbusState::Closed, Duration::from_secs(10))
        .unwrap();
    eventually("teardown", || {
        x.frontend()
            .is_some_and(|f| matches!(f.write(0, &[0u8; 512]), Err(blkfront::Error::Closed)))
    });
    let mut report = None;
    eventually("teardown report", || {
        report = x.take_teardown_report();
        report.is_some()
    });
    assert!(report.unwrap().is_clean());
    drop(fe);
    assert_eq!(w.services.free_frames_count(), PAGES as usize);

    // The backend comes back (guest reboot / backend restart): InitWait again.
    w.backend.advertise();
    x.reconnect().unwrap();
    let fe = x.frontend().unwrap().clone();
    let mut b = [0u8; 4096];
    fe.read(0, &mut b).unwrap();
    assert_eq!(b, [0x11; 4096], "data survived the reconnect");
    assert_eq!(fe.capacity(), 4 << 20);
    drop(fe);
    assert!(x.close().unwrap().is_clean());
    assert_eq!(w.services.free_frames_count(), PAGES as usize);
    assert_eq!(w.platform.live_mappings(), 0);
    drop(x);
    w.finish();
}

#[test]
fn a_backend_that_never_answers_times_out_cleanly() {
    let w = World::new();
    // Nobody advertises InitWait this time.
    w.backend.stop.store(true, Ordering::Release);
    w.dom0.write(&format!("{}/state", be_path()), "1").unwrap();
    let err = XenbusFrontend::connect(
        w.services.clone(),
        FrontendConfig {
            connect_timeout: Duration::from_millis(300),
            ..FrontendConfig::default()
        },
        client(&w.server, GUEST as u32),
        &fe_path(),
    )
    .unwrap_err();
    assert!(matches!(err, blkfront::Error::Xenbus(_)), "{err:?}");
    assert_eq!(w.services.free_frames_count(), PAGES as usize);
    w.finish();
}
