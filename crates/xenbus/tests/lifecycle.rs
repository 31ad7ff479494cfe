//! The device state machine end to end with a fake engine: the test plays the toolstack
//! (libxl's nodes and timeouts) and the frontend (blkfront's nodes), the manager runs on its
//! own thread as in the daemon. Every scenario runs twice: over [`MemStore`] and over the
//! `xenstore` crate's real in-memory server, where the manager is dom0 and each frontend
//! writes through its own connection as its guest domain (so Xen's permission rules apply).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use xenbus::config::{BackendType, Config, DeviceSettings};
use xenbus::devmodel;
use xenbus::memstore::MemStore;
use xenbus::store::{join, Store, StoreExt};
use xenbus::toolstack::{self, DiskSpec, Removal};
use xenbus::vbd::{
    BackendFeatures, ConnectRequest, ConnectedVbd, DeviceConfig, DisconnectReport, Feature,
    FrontendParams, Storage, StorageInfo, VbdEvent, VbdEventSink, VbdFactory,
};
use xenbus::xs::{spawn_watch_forwarder, XsStore};
use xenbus::{EventSender, Manager, StoreError, VbdError, XenbusState};
use xenstore::{ClientConfig, Transport, XenstoreServer, XsClient};

const WAIT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Shared {
    live: AtomicUsize,
    opened: Mutex<Vec<PathBuf>>,
    fail_open: Mutex<HashSet<PathBuf>>,
    sizes: Mutex<BTreeMap<PathBuf, u64>>,
    connects: Mutex<Vec<(DeviceConfig, FrontendParams)>>,
    /// The features each connect was asked to serve.
    features: Mutex<Vec<BackendFeatures>>,
    /// Disks report secure discard.
    secure_discard: AtomicBool,
    sinks: Mutex<Vec<VbdEventSink>>,
    disconnect_delay: Mutex<Duration>,
    open_delay: Mutex<BTreeMap<PathBuf, Duration>>,
    /// Connects to fail as a platform fails for a domain it does not know (yet).
    unreachable_connects: AtomicUsize,
}

struct FakeDisk {
    shared: Arc<Shared>,
    path: PathBuf,
}

impl Storage for FakeDisk {
    fn info(&self) -> StorageInfo {
        StorageInfo {
            size_bytes: self.size(),
            logical_block_size: 512,
            physical_block_size: 4096,
            read_only: false,
            flush: true,
            discard: true,
            secure_discard: self.shared.secure_discard.load(Ordering::SeqCst),
            discard_granularity: 4096,
            discard_alignment: 0,
            buffer_alignment: 1,
            direct_io: false,
            kind: storage::StorageKind::Null,
        }
    }

    fn refresh_size(&self) -> std::io::Result<u64> {
        Ok(self.size())
    }

    fn open_queue(
        &self,
        _depth: u32,
    ) -> Result<Box<dyn storage::StorageQueue>, storage::StorageError> {
        // The fake engine serves no I/O: xenbus never opens queues itself.
        Err(storage::StorageError::InvalidConfig(
            "the lifecycle tests' fake storage has no queues".into(),
        ))
    }
}

impl FakeDisk {
    fn size(&self) -> u64 {
        *self
            .shared
            .sizes
            .lock()
            .unwrap()
            .get(&self.path)
            .unwrap_or(&(64 << 20))
    }
}

struct FakeVbd {
    shared: Arc<Shared>,
}

impl ConnectedVbd for FakeVbd {
    fn stats(&self) -> BTreeMap<String, u64> {
        BTreeMap::from([("rd_req".to_string(), 3)])
    }

    fn disconnect(self: Box<Self>, _timeout: Duration) -> Result<DisconnectReport, VbdError> {
        let delay = *self.shared.disconnect_delay.lock().unwrap();
        thread::sleep(delay);
        self.shared.live.fetch_sub(1, Ordering::SeqCst);
        Ok(DisconnectReport {
            drained: true,
            abandoned_requests: 0,
            detail: String::new(),
        })
    }
}

struct FakeFactory(Arc<Shared>);

impl VbdFactory for FakeFactory {
    fn open(&self, config: &DeviceConfig) -> Result<Arc<dyn Storage>, VbdError> {
        let path = config.target.path.clone();
        let delay = self.0.open_delay.lock().unwrap().get(&path).copied();
        if let Some(d) = delay {
            thread::sleep(d);
        }
        if self.0.fail_open.lock().unwrap().contains(&path) {
            return Err(VbdError::new(
                format!("opening {}", path.display()),
                "No such file or directory",
                2,
            ));
        }
        self.0.opened.lock().unwrap().push(path.clone());
        Ok(Arc::new(FakeDisk {
            shared: self.0.clone(),
            path,
        }))
    }

    fn connect(&self, req: ConnectRequest<'_>) -> Result<Box<dyn ConnectedVbd>, VbdError> {
        if self
            .0
            .unreachable_connects
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(VbdError::new("connecting the rings", "unknown domain", 22)
                .with_domain_unreachable());
        }
        if let Some(bad) = req
            .frontend
            .queues
            .iter()
            .flat_map(|q| q.ring_refs.iter())
            .find(|&&r| r == 0xbad)
        {
            return Err(VbdError::new(
                format!("mapping ring-ref {bad}"),
                "grant map failed",
                22,
            ));
        }
        self.0.live.fetch_add(1, Ordering::SeqCst);
        self.0
            .connects
            .lock()
            .unwrap()
            .push((req.config.clone(), req.frontend.clone()));
        self.0.features.lock().unwrap().push(*req.features);
        self.0.sinks.lock().unwrap().push(req.events.clone());
        Ok(Box::new(FakeVbd {
            shared: self.0.clone(),
        }))
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Mem,
    Server,
}

struct Harness {
    /// The toolstack's view (dom0).
    store: Arc<dyn Store>,
    mem: Option<MemStore>,
    server: Option<Arc<XenstoreServer>>,
    guests: Mutex<BTreeMap<u32, Arc<dyn Store>>>,
    shared: Arc<Shared>,
    sender: EventSender,
    thread: Option<JoinHandle<Result<(), StoreError>>>,
}

fn client(server: &XenstoreServer, domid: u32) -> Arc<XsClient> {
    let stream = server.connect_as(domid).unwrap();
    Arc::new(XsClient::new(Transport::Unix(stream), ClientConfig::default()).unwrap())
}

impl Harness {
    fn start(kind: Kind, config: Config) -> Harness {
        Harness::start_prepared(kind, config, |_| {})
    }

    /// Like [`Harness::start`], with `prepare` writing to the store before the manager
    /// starts: what a restarted daemon finds.
    fn start_prepared(kind: Kind, config: Config, prepare: impl FnOnce(&dyn Store)) -> Harness {
        let shared = Arc::new(Shared::default());
        let factory = Arc::new(FakeFactory(shared.clone()));
        let (store, mem, server, manager) = match kind {
            Kind::Mem => {
                let mem = MemStore::new();
                let manager = Manager::new(Arc::new(mem.clone()), factory, config);
                let sender = manager.sender();
                mem.set_watch_sink(Box::new(move |p, t| sender.watch_fired(p, t)));
                (
                    Arc::new(mem.clone()) as Arc<dyn Store>,
                    Some(mem),
                    None,
                    manager,
                )
            }
            Kind::Server => {
                let server = Arc::new(XenstoreServer::default());
                let daemon = client(&server, 0);
                let manager = Manager::new(Arc::new(XsStore::new(daemon.clone())), factory, config);
                spawn_watch_forwarder(&daemon, manager.sender()).unwrap();
                let toolstack = Arc::new(XsStore::new(client(&server, 0))) as Arc<dyn Store>;
                (toolstack, None, Some(server), manager)
            }
        };
        prepare(store.as_ref());
        let mut manager = manager;
        let sender = manager.sender();
        let thread = thread::spawn(move || {
            manager.start()?;
            manager.run()
        });
        Harness {
            store,
            mem,
            server,
            guests: Mutex::new(BTreeMap::new()),
            shared,
            sender,
            thread: Some(thread),
        }
    }

    /// A new manager on the same store, as a daemon started after this one stopped
    /// (handed over, or killed: xenstore looks the same), sharing the fake engine's
    /// records. `prepare` runs between the two (the test plays what happened meanwhile).
    fn successor(&mut self, config: Config, prepare: impl FnOnce(&Harness)) {
        assert!(
            self.thread.as_ref().is_none_or(|t| t.is_finished()),
            "the previous manager still runs"
        );
        if let Some(t) = self.thread.take() {
            t.join().unwrap().unwrap();
        }
        prepare(self);
        let factory = Arc::new(FakeFactory(self.shared.clone()));
        let manager = match (&self.mem, &self.server) {
            (Some(mem), _) => {
                mem.drop_watches();
                let manager = Manager::new(Arc::new(mem.clone()), factory, config);
                let sender = manager.sender();
                mem.set_watch_sink(Box::new(move |p, t| sender.watch_fired(p, t)));
                manager
            }
            (_, Some(server)) => {
                let daemon = client(server, 0);
                let manager = Manager::new(Arc::new(XsStore::new(daemon.clone())), factory, config);
                spawn_watch_forwarder(&daemon, manager.sender()).unwrap();
                manager
            }
            _ => unreachable!(),
        };
        let mut manager = manager;
        self.sender = manager.sender();
        self.thread = Some(thread::spawn(move || {
            manager.start()?;
            manager.run()
        }));
    }

    /// Asks the manager to hand its devices over and waits for it to return.
    fn hand_over(&mut self) {
        self.sender.handover();
        let t = self.thread.take().unwrap();
        let deadline = Instant::now() + WAIT;
        while !t.is_finished() {
            assert!(Instant::now() < deadline, "handover did not finish");
            thread::sleep(Duration::from_millis(5));
        }
        t.join().unwrap().unwrap();
    }

    /// Writes and removals of `dir` and below so far (MemStore only).
    fn changes_below(&self, dir: &str) -> Option<u64> {
        self.mem.as_ref().map(|m| m.changes_below(dir))
    }

    /// The frontend's connection: as the guest domain on the real server.
    fn guest(&self, domid: u32) -> Arc<dyn Store> {
        let Some(server) = &self.server else {
            return self.store.clone();
        };
        self.guests
            .lock()
            .unwrap()
            .entry(domid)
            .or_insert_with(|| {
                server.introduce_domain(domid);
                Arc::new(XsStore::new(client(server, domid))) as Arc<dyn Store>
            })
            .clone()
    }

    fn domid_of(fe: &str) -> u32 {
        fe.strip_prefix("/local/domain/")
            .and_then(|r| r.split('/').next())
            .and_then(|d| d.parse().ok())
            .unwrap()
    }

    /// libxl's attach. The guest exists (is introduced to xenstored) before its devices,
    /// as on real Xen.
    fn attach(&self, spec: &DiskSpec) -> XenbusState {
        self.guest(spec.domid);
        toolstack::attach_disk(self.store.as_ref(), spec, toolstack::INIT_TIMEOUT).unwrap()
    }

    /// Every node under `dir`, for failure messages.
    fn dump(&self, dir: &str) -> Vec<(String, String)> {
        fn walk(s: &dyn Store, path: &str, out: &mut Vec<(String, String)>) {
            if let Ok(Some(v)) = s.read_string(path) {
                out.push((path.to_string(), v));
            }
            for child in s.directory(path).ok().flatten().unwrap_or_default() {
                walk(s, &join(path, &child), out);
            }
        }
        let mut out = Vec::new();
        walk(self.store.as_ref(), dir, &mut out);
        out
    }

    fn force_conflicts(&self, n: u32) {
        if let Some(m) = &self.mem {
            m.force_conflicts(n);
        }
    }

    fn release_domain(&self, domid: u32) {
        match (&self.mem, &self.server) {
            (Some(m), _) => m.release_domain(),
            (_, Some(s)) => s.release_domain(domid),
            _ => unreachable!(),
        }
    }

    fn default(kind: Kind) -> Harness {
        let config = Config {
            defaults: DeviceSettings {
                max_queues: 4,
                max_ring_page_order: 2,
                ..DeviceSettings::default()
            },
            drain_timeout_ms: 1000,
            ..Config::default()
        };
        Harness::start(kind, config)
    }

    fn state(&self, dir: &str) -> XenbusState {
        toolstack::read_state(self.store.as_ref(), dir).unwrap()
    }

    fn wait_state(&self, dir: &str, want: XenbusState) {
        toolstack::wait_state(
            self.store.as_ref(),
            dir,
            WAIT,
            &format!("{dir} {want}"),
            |s| s == want,
        )
        .unwrap_or_else(|e| panic!("{e}\n{:#?}", self.dump("/local")));
    }

    fn get(&self, path: &str) -> Option<String> {
        self.store.read_string(path).unwrap()
    }

    /// What blkfront writes for a single-page, single-queue ring, then Initialised.
    fn frontend_connect(&self, fe: &str, extra: &[(&str, &str)]) {
        let mut nodes: Vec<(&str, &str)> = vec![("ring-ref", "8"), ("event-channel", "5")];
        nodes.extend_from_slice(extra);
        self.guest(Harness::domid_of(fe))
            .transaction(&mut |tx| {
                for (k, v) in &nodes {
                    tx.write(&join(fe, k), v.as_bytes())?;
                }
                tx.write(&join(fe, "state"), b"3")
            })
            .unwrap();
    }

    fn set_frontend_state(&self, fe: &str, state: XenbusState) {
        self.store
            .write(&join(fe, "state"), state.node_value().as_bytes())
            .unwrap();
    }

    fn live(&self) -> usize {
        self.shared.live.load(Ordering::SeqCst)
    }

    fn wait_until(&self, what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !f() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n{:#?}",
                self.dump("/local")
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the manager (SIGTERM's path) and waits for it; the store stays usable.
    fn shutdown(&mut self) {
        self.sender.shutdown();
        self.thread.take().unwrap().join().unwrap().unwrap();
    }

    fn stop(mut self) {
        self.shutdown();
    }
}

/// Attaches a disk under our own type and takes it to Connected.
fn connected_disk(h: &Harness, domid: u32, devid: u32, image: &str) -> (String, String) {
    let spec = DiskSpec::new("xenblkd", domid, devid, image);
    h.attach(&spec);
    let (be, fe) = (spec.backend_path(), spec.frontend_path());
    h.frontend_connect(&fe, &[("protocol", "x86_64-abi")]);
    h.wait_state(&be, XenbusState::Connected);
    h.set_frontend_state(&fe, XenbusState::Connected);
    (be, fe)
}

fn connect_publishes_features_and_status(kind: Kind) {
    let h = Harness::default(kind);
    let spec = DiskSpec::new("xenblkd", 5, 51728, "raw:/images/a.img");
    let (be, fe) = (spec.backend_path(), spec.frontend_path());
    assert_eq!(h.attach(&spec), XenbusState::InitWait);
    assert_eq!(
        h.get(&join(&be, "multi-queue-max-queues")).as_deref(),
        Some("4")
    );
    assert_eq!(
        h.get(&join(&be, "max-ring-page-order")).as_deref(),
        Some("2")
    );
    assert_eq!(h.get(&join(&be, "max-ring-pages")).as_deref(), Some("4"));
    assert_eq!(
        h.get(&join(&be, "feature-max-indirect-segments"))
            .as_deref(),
        Some("256")
    );
    // Our own type opens the storage before InitWait.
    assert_eq!(
        h.shared.opened.lock().unwrap().as_slice(),
        &[PathBuf::from("/images/a.img")]
    );

    h.frontend_connect(
        &fe,
        &[
            ("protocol", "x86_32-abi"),
            ("feature-persistent", "1"),
            ("multi-queue-num-queues", "2"),
            ("ring-page-order", "1"),
            ("queue-0/ring-ref0", "10"),
            ("queue-0/ring-ref1", "11"),
            ("queue-0/event-channel", "7"),
            ("queue-1/ring-ref0", "12"),
            ("queue-1/ring-ref1", "13"),
            ("queue-1/event-channel", "9"),
        ],
    );
    h.wait_state(&be, XenbusState::Connected);
    for (node, value) in [
        ("sectors", "131072"),
        ("sector-size", "512"),
        ("physical-sector-size", "4096"),
        ("info", "0"),
        ("feature-flush-cache", "1"),
        ("feature-barrier", "1"),
        ("feature-discard", "1"),
        ("discard-granularity", "4096"),
        ("discard-alignment", "0"),
        ("discard-secure", "0"),
        ("feature-persistent", "1"),
    ] {
        assert_eq!(h.get(&join(&be, node)).as_deref(), Some(value), "{node}");
    }
    let connects = h.shared.connects.lock().unwrap().clone();
    assert_eq!(connects.len(), 1);
    let p = &connects[0].1;
    assert_eq!(p.queues.len(), 2);
    assert_eq!(p.queues[1].ring_refs, vec![12, 13]);
    assert!(p.persistent);

    let (daemon, devices) = h.sender.status(WAIT).unwrap();
    assert_eq!(daemon.backend_types, vec!["vbd", "xenblkd"]);
    assert_eq!(devices.len(), 1);
    let d = &devices[0];
    assert_eq!(
        (d.domid, d.devid, d.vdev.as_str(), d.state),
        (5, 51728, "xvdb", XenbusState::Connected)
    );
    assert_eq!(d.frontend.as_ref().unwrap().queues.len(), 2);
    assert!(d.features.unwrap().persistent);
    assert_eq!(d.stats.get("rd_req"), Some(&3));
    h.stop();
}

fn vbd_type_waits_for_the_hotplug_script(kind: Kind) {
    let h = Harness::default(kind);
    let mut spec = DiskSpec::new("vbd", 3, 51712, "/dev/vg/guest");
    spec.script = Some("/etc/xen/scripts/xenblkd-hotplug".into());
    let (be, fe) = (spec.backend_path(), spec.frontend_path());
    // libxl: write the nodes, wait (10 s at most) for InitWait, then run the script.
    h.attach(&spec);
    assert!(
        h.shared.opened.lock().unwrap().is_empty(),
        "opened before the hotplug script ran"
    );
    // The frontend may be ready before the script: nothing connects without storage.
    h.frontend_connect(&fe, &[]);
    thread::sleep(Duration::from_millis(100));
    assert_eq!(h.state(&be), XenbusState::InitWait);
    // The script resolves the device.
    h.store
        .write(&join(&be, "physical-device-path"), b"/dev/dm-3")
        .unwrap();
    h.store
        .write(&join(&be, "physical-device"), b"fd:3")
        .unwrap();
    h.wait_state(&be, XenbusState::Connected);
    assert_eq!(
        h.shared.opened.lock().unwrap().as_slice(),
        &[PathBuf::from("/dev/dm-3")]
    );
    // Missing protocol means native.
    let connects = h.shared.connects.lock().unwrap().clone();
    assert_eq!(connects[0].1.protocol, xenbus::vbd::Protocol::Native);
    assert!(!connects[0].1.protocol_specified);
    h.stop();
}

fn fatal_cases_write_error_and_close_only_that_device(kind: Kind) {
    let h = Harness::default(kind);
    let (good_be, _) = connected_disk(&h, 5, 51712, "/images/good.img");
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("protocol", "ppc-abi")], "38 unknown fe protocol ppc-abi"),
        (
            &[("multi-queue-num-queues", "0")],
            "38 guest requested 0 queues",
        ),
        (
            &[("multi-queue-num-queues", "9")],
            "38 guest requested 9 queues, exceeding the maximum of 4.",
        ),
        (
            &[("ring-page-order", "7")],
            "22 requested ring page order 7 exceed max:2",
        ),
        (&[("ring-ref", "banana")], "22 reading"),
        (&[("ring-ref", "2989")], "22 mapping ring-ref 2989"),
        (&[("event-channel", "")], "22 reading"),
    ];
    for (i, (nodes, expect)) in cases.iter().enumerate() {
        let devid = 51728 + 16 * i as u32;
        let spec = DiskSpec::new("xenblkd", 6, devid, "/images/bad.img");
        h.attach(&spec);
        let (be, fe) = (spec.backend_path(), spec.frontend_path());
        h.frontend_connect(&fe, nodes);
        h.wait_state(&be, XenbusState::Closing);
        let err = h.get(&join(&be, "error")).unwrap();
        assert!(
            err.starts_with(expect),
            "{err:?} does not start with {expect:?}"
        );
        let linux = format!("/local/domain/0/error/backend/xenblkd/6/{devid}/error");
        // Written right after the transaction that wrote `error` and Closing (best
        // effort, outside it: a driver domain may not be allowed to write there).
        h.wait_until("Linux's error node", || h.get(&linux).is_some());
        assert_eq!(h.get(&linux), Some(err));
        // blkfront answers Closing with Closed; the device stays Closed (online).
        h.set_frontend_state(&fe, XenbusState::Closed);
        h.wait_state(&be, XenbusState::Closed);
        assert_eq!(h.state(&good_be), XenbusState::Connected);
    }
    // "2989" is 0xbad: the fake engine's mapping failure.
    assert_eq!(h.live(), 1);
    // A storage that cannot be opened fails that device only.
    h.shared
        .fail_open
        .lock()
        .unwrap()
        .insert(PathBuf::from("/images/missing.img"));
    let spec = DiskSpec::new("xenblkd", 7, 51712, "/images/missing.img");
    h.guest(spec.domid);
    toolstack::add_disk(h.store.as_ref(), &spec).unwrap();
    h.wait_state(&spec.backend_path(), XenbusState::Closing);
    assert!(h
        .get(&join(&spec.backend_path(), "error"))
        .unwrap()
        .starts_with("2 opening /images/missing.img"));
    assert_eq!(h.state(&good_be), XenbusState::Connected);
    h.stop();
}

fn frontend_close_and_reconnect(kind: Kind) {
    let h = Harness::default(kind);
    let (be, fe) = connected_disk(&h, 5, 51712, "/images/a.img");
    assert_eq!(h.live(), 1);
    // Guest shutdown of the device: Closing, then Closed.
    h.set_frontend_state(&fe, XenbusState::Closing);
    h.wait_state(&be, XenbusState::Closing);
    h.set_frontend_state(&fe, XenbusState::Closed);
    h.wait_state(&be, XenbusState::Closed);
    h.wait_until("disconnect", || h.live() == 0);
    // Guest reboot: the frontend comes back; served again without a daemon restart.
    for round in 2..=4 {
        h.set_frontend_state(&fe, XenbusState::Initialising);
        h.wait_state(&be, XenbusState::InitWait);
        h.frontend_connect(&fe, &[]);
        h.wait_state(&be, XenbusState::Connected);
        assert_eq!(h.live(), 1);
        assert_eq!(h.shared.connects.lock().unwrap().len(), round);
        h.set_frontend_state(&fe, XenbusState::Closed);
        h.wait_state(&be, XenbusState::Closed);
        h.wait_until("disconnect", || h.live() == 0);
    }
    // The storage was opened once for all sessions.
    assert_eq!(h.shared.opened.lock().unwrap().len(), 1);
    let (_, devices) = h.sender.status(WAIT).unwrap();
    assert_eq!(devices[0].sessions, 4);
    h.stop();
}

fn frontend_restart_without_closing_reconnects(kind: Kind) {
    let h = Harness::default(kind);
    let (be, fe) = connected_disk(&h, 5, 51712, "/images/a.img");
    h.set_frontend_state(&fe, XenbusState::Initialising);
    h.wait_state(&be, XenbusState::InitWait);
    assert_eq!(h.live(), 0);
    h.frontend_connect(&fe, &[]);
    h.wait_state(&be, XenbusState::Connected);
    assert_eq!(h.live(), 1);
    h.stop();
}

fn toolstack_detach_with_cooperative_frontend(kind: Kind) {
    let h = Harness::default(kind);
    let (be, fe) = connected_disk(&h, 5, 51712, "/images/a.img");
    // A frontend that follows the backend's Closing, as blkfront does.
    let store = h.store.clone();
    let fe2 = fe.clone();
    let be2 = be.clone();
    let guest = thread::spawn(move || {
        toolstack::wait_state(store.as_ref(), &be2, WAIT, "Closing", |s| {
            s == XenbusState::Closing
        })
        .unwrap();
        store.write(&join(&fe2, "state"), b"6").unwrap();
    });
    let start = Instant::now();
    assert_eq!(
        toolstack::remove_disk(h.store.as_ref(), &be, &fe, toolstack::DESTROY_TIMEOUT).unwrap(),
        Removal::Clean
    );
    assert!(start.elapsed() < Duration::from_secs(2));
    guest.join().unwrap();
    h.wait_until("device forgotten", || {
        h.sender.status(WAIT).unwrap().1.is_empty()
    });
    assert_eq!(h.live(), 0);
    h.stop();
}

fn unresponsive_frontend_is_torn_down_by_forced_removal(kind: Kind) {
    let h = Harness::default(kind);
    let (be, fe) = connected_disk(&h, 5, 51712, "/images/a.img");
    // The guest ignores Closing (hung kernel). libxl times out, removes the frontend
    // directory and waits again: the backend must then tear down and reach Closed.
    let timeout = Duration::from_secs(1);
    let start = Instant::now();
    let r = toolstack::remove_disk(h.store.as_ref(), &be, &fe, timeout).unwrap();
    assert_eq!(
        r,
        Removal::Clean,
        "Closed after the forced frontend removal"
    );
    assert!(start.elapsed() < timeout * 2);
    h.wait_until("disconnect", || h.live() == 0);
    h.wait_until("device forgotten", || {
        h.sender.status(WAIT).unwrap().1.is_empty()
    });
    h.stop();
}

fn toolstack_junk_is_reported_once(kind: Kind) {
    let h = Harness::default(kind);
    let mut spec = DiskSpec::new("xenblkd", 5, 51712, "vhd:/images/a.vhd");
    spec.backend_domid = 0;
    h.guest(5);
    toolstack::add_disk(h.store.as_ref(), &spec).unwrap();
    let be = spec.backend_path();
    h.wait_state(&be, XenbusState::Closing);
    assert!(h
        .get(&join(&be, "error"))
        .unwrap()
        .contains("unsupported image format"));
    // The toolstack now writes a `frontend` outside the guest's domain: also refused,
    // and neither error makes the daemon rewrite its nodes in a loop.
    h.store
        .write(&join(&be, "frontend"), b"/local/domain/9/device/vbd/51712")
        .unwrap();
    let commits = h.mem.as_ref().map(|m| m.commits());
    thread::sleep(Duration::from_millis(300));
    if let (Some(m), Some(before)) = (&h.mem, commits) {
        assert!(
            m.commits() <= before + 1,
            "{} commits in 300 ms",
            m.commits() - before
        );
    }
    assert_eq!(h.state(&be), XenbusState::Closing);
    let (_, devices) = h.sender.status(WAIT).unwrap();
    assert!(devices[0]
        .error
        .as_ref()
        .unwrap()
        .contains("unsupported image format"));
    h.stop();
}

fn recreated_device_does_not_inherit_the_old_storage(kind: Kind) {
    let h = Harness::default(kind);
    let (be, fe) = connected_disk(&h, 5, 51712, "/images/old.img");
    // The toolstack replaces the device in one transaction (no removal seen in between).
    let spec = DiskSpec::new("xenblkd", 5, 51712, "/images/new.img");
    h.store
        .transaction(&mut |tx| {
            tx.rm(&be)?;
            tx.rm(&fe)
        })
        .unwrap();
    toolstack::add_disk(h.store.as_ref(), &spec).unwrap();
    h.wait_state(&be, XenbusState::InitWait);
    h.frontend_connect(&fe, &[]);
    h.wait_state(&be, XenbusState::Connected);
    let connects = h.shared.connects.lock().unwrap().clone();
    assert_eq!(
        connects.last().unwrap().0.target.path,
        PathBuf::from("/images/new.img")
    );
    assert_eq!(h.live(), 1);
    h.stop();
}

fn slow_storage_open_stalls_no_other_device(kind: Kind) {
    let h = Harness::default(kind);
    h.shared.open_delay.lock().unwrap().insert(
        PathBuf::from("/images/nfs-hung.img"),
        Duration::from_millis(1500),
    );
    let slow = DiskSpec::new("xenblkd", 5, 51712, "/images/nfs-hung.img");
    h.guest(5);
    toolstack::add_disk(h.store.as_ref(), &slow).unwrap();
    // Another device comes and connects while the first one's storage is still opening.
    let start = Instant::now();
    let (fast_be, _) = connected_disk(&h, 6, 51712, "/images/fast.img");
    assert!(
        start.elapsed() < Duration::from_millis(1000),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(h.state(&slow.backend_path()), XenbusState::Initialising);
    // The slow one gets there when its open completes.
    h.wait_state(&slow.backend_path(), XenbusState::InitWait);
    h.frontend_connect(&slow.frontend_path(), &[]);
    h.wait_state(&slow.backend_path(), XenbusState::Connected);
    assert_eq!(h.state(&fast_be), XenbusState::Connected);
    h.stop();
}

/// Linux blkback on a frontend `state` that reads Unknown (`0`, or no number at all):
/// disconnect, Closed, and the device is left alone until the toolstack re-creates it. A
/// number xenbus.h does not define is fatal instead, as in blkback's `default:` case.
fn frontend_writing_unknown_is_disconnected_and_left_closed(kind: Kind) {
    let h = Harness::default(kind);
    let (good_be, _) = connected_disk(&h, 6, 51712, "/images/good.img");
    for (domid, value) in [(5u32, &b"0"[..]), (7, b"connected!")] {
        let (be, fe) = connected_disk(&h, domid, 51712, "/images/a.img");
        let guest = h.guest(domid);
        guest.write(&join(&fe, "state"), value).unwrap();
        h.wait_state(&be, XenbusState::Closed);
        h.wait_until("disconnect", || h.live() == 1);
        let device = |h: &Harness| {
            h.sender
                .status(WAIT)
                .unwrap()
                .1
                .into_iter()
                .find(|d| d.domid == domid)
                .unwrap()
        };
        // The storage is released and the frontend no longer followed.
        let d = device(&h);
        assert!(d.disk.is_none() && d.frontend.is_none() && d.frontend_path.is_none());
        // A frontend starting over is not served: the device is gone as far as it is
        // concerned (Linux has unregistered it).
        guest.write(&join(&fe, "state"), b"1").unwrap();
        h.frontend_connect(&fe, &[]);
        thread::sleep(Duration::from_millis(200));
        assert_eq!(h.state(&be), XenbusState::Closed);
        assert_eq!(h.live(), 1);
        // The toolstack's removal is clean (nothing to wait for)...
        assert_eq!(
            toolstack::remove_disk(h.store.as_ref(), &be, &fe, Duration::from_secs(1)).unwrap(),
            Removal::Clean
        );
        // ...and a device added again under the same name is served again.
        let spec = DiskSpec::new("xenblkd", domid, 51712, "/images/again.img");
        assert_eq!(h.attach(&spec), XenbusState::InitWait);
        h.frontend_connect(&fe, &[]);
        h.wait_state(&be, XenbusState::Connected);
        assert_eq!(h.live(), 2);
        h.set_frontend_state(&fe, XenbusState::Closed);
        h.wait_state(&be, XenbusState::Closed);
        h.wait_until("disconnect", || h.live() == 1);
    }
    // An undefined state number is a fatal error, not Unknown.
    let (be, fe) = connected_disk(&h, 8, 51712, "/images/b.img");
    h.guest(8).write(&join(&fe, "state"), b"9").unwrap();
    h.wait_state(&be, XenbusState::Closing);
    assert_eq!(
        h.get(&join(&be, "error")).as_deref(),
        Some("22 saw state 9 at frontend")
    );
    h.wait_until("disconnect", || h.live() == 1);
    assert_eq!(h.state(&good_be), XenbusState::Connected);
    h.stop();
}

/// A feature the storage refused is withdrawn from xenstore (secure discard included),
/// and stays withdrawn when the frontend reconnects: the storage has not changed.
fn refused_features_stay_withdrawn_across_reconnects(kind: Kind) {
    let h = Harness::default(kind);
    h.shared.secure_discard.store(true, Ordering::SeqCst);
    let (be, fe) = connected_disk(&h, 5, 51712, "/images/a.img");
    assert_eq!(h.get(&join(&be, "discard-secure")).as_deref(), Some("1"));
    let sink = h.shared.sinks.lock().unwrap()[0].clone();
    sink.send(VbdEvent::FeatureLost(Feature::SecureDiscard));
    h.wait_until("secure discard withdrawn", || {
        h.get(&join(&be, "discard-secure")).as_deref() == Some("0")
    });
    assert_eq!(h.get(&join(&be, "feature-discard")).as_deref(), Some("1"));
    sink.send(VbdEvent::FeatureLost(Feature::Flush));
    h.wait_until("flush withdrawn", || {
        h.get(&join(&be, "feature-flush-cache")).as_deref() == Some("0")
    });
    let (_, devices) = h.sender.status(WAIT).unwrap();
    let f = devices[0].features.unwrap();
    assert!(!f.secure_discard && !f.flush && !f.barrier && f.discard);

    // The frontend closes and reconnects: what it reads is still the truth, and the engine
    // is not asked to serve what the storage refused.
    h.set_frontend_state(&fe, XenbusState::Closed);
    h.wait_state(&be, XenbusState::Closed);
    h.wait_until("disconnect", || h.live() == 0);
    h.set_frontend_state(&fe, XenbusState::Initialising);
    h.wait_state(&be, XenbusState::InitWait);
    h.frontend_connect(&fe, &[]);
    h.wait_state(&be, XenbusState::Connected);
    for (node, value) in [
        ("feature-flush-cache", "0"),
        ("feature-barrier", "0"),
        ("feature-discard", "1"),
        ("discard-secure", "0"),
    ] {
        assert_eq!(h.get(&join(&be, node)).as_deref(), Some(value), "{node}");
    }
    let served = *h.shared.features.lock().unwrap().last().unwrap();
    assert!(!served.secure_discard && !served.flush && !served.barrier && served.discard);
    // Discard lost takes its secure variant's node with it.
    let sink = h.shared.sinks.lock().unwrap()[1].clone();
    sink.send(VbdEvent::FeatureLost(Feature::Discard));
    h.wait_until("discard withdrawn", || {
        h.get(&join(&be, "feature-discard")).as_deref() == Some("0")
    });
    assert_eq!(h.get(&join(&be, "discard-secure")).as_deref(), Some("0"));
    h.stop();
}

/// What the test's tracing layer saw: (level, every field as `name=value`).
type Seen = Mutex<Vec<(tracing::Level, String)>>;

struct Capture(&'static Seen);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        struct Fields(String);
        impl tracing::field::Visit for Fields {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0.push_str(&format!("{}={:?} ", field.name(), value));
            }
        }
        let mut f = Fields(String::new());
        event.record(&mut f);
        self.0
            .lock()
            .unwrap()
            .push((*event.metadata().level(), f.0));
    }
}

/// Every event of the process from the first call on (tests run in parallel: filter by
/// what is yours).
fn captured() -> &'static Seen {
    static SEEN: std::sync::OnceLock<&'static Seen> = std::sync::OnceLock::new();
    SEEN.get_or_init(|| {
        use tracing_subscriber::layer::SubscriberExt;
        let seen: &'static Seen = Box::leak(Box::default());
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Capture(seen)))
            .expect("no other subscriber in this test binary");
        seen
    })
}

/// A guest failing its device in a loop (a connect with a ring it never granted and a
/// garbage optional flag, then Closed, Initialising, again) gets each warning logged once
/// per interval, not once per round; its device still fails every round, and the other
/// device is untouched.
fn a_guest_repeating_warnings_gets_one_line_per_interval(kind: Kind) {
    let seen = captured();
    let h = Harness::default(kind);
    let (good_be, _) = connected_disk(&h, 6, 51712, "/images/good.img");
    // Its own domain per store kind: both run at once in this process.
    let domid = match kind {
        Kind::Mem => 31,
        Kind::Server => 32,
    };
    let spec = DiskSpec::new("xenblkd", domid, 51712, "/images/bad.img");
    h.attach(&spec);
    let (be, fe) = (spec.backend_path(), spec.frontend_path());
    let guest = h.guest(domid);
    const ROUNDS: usize = 40;
    for round in 0..ROUNDS {
        h.frontend_connect(&fe, &[("ring-ref", "2989"), ("feature-persistent", "yes")]);
        h.wait_state(&be, XenbusState::Closing);
        assert!(
            h.get(&join(&be, "error"))
                .unwrap()
                .starts_with("22 mapping ring-ref 2989"),
            "round {round}"
        );
        guest.write(&join(&fe, "state"), b"6").unwrap();
        h.wait_state(&be, XenbusState::Closed);
        guest.write(&join(&fe, "state"), b"1").unwrap();
        h.wait_state(&be, XenbusState::InitWait);
    }
    let device = format!("device=xenblkd/{domid}/51712 ");
    let lines = |level: tracing::Level| -> Vec<String> {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|(l, fields)| *l == level && fields.contains(&device))
            .map(|(_, fields)| fields.clone())
            .collect()
    };
    let warnings = lines(tracing::Level::WARN);
    let count = |what: &str| warnings.iter().filter(|l| l.contains(what)).count();
    // One of each per 10 s interval (the test takes less than one, on a quiet machine).
    assert!((1..=2).contains(&count("device failed")), "{warnings:#?}");
    assert!(
        (1..=2).contains(&count("ignoring unparsable flag")),
        "{warnings:#?}"
    );
    assert_eq!(
        warnings.len(),
        count("device failed")
            + count("ignoring unparsable flag")
            + count("repeated log lines were suppressed"),
        "{warnings:#?}"
    );
    // The state machine's own lines (three a round) are capped per interval too.
    let infos = lines(tracing::Level::INFO);
    let cap = 2 * xenbus::ratelimit::Kind::Lifecycle.burst() as usize + 4;
    assert!(infos.len() <= cap, "{} lines: {infos:#?}", infos.len());
    assert_eq!(h.state(&good_be), XenbusState::Connected);
    h.stop();
}

fn online_zero_closes_an_idle_device_at_once(kind: Kind) {
    let h = Harness::default(kind);
    let spec = DiskSpec::new("xenblkd", 5, 51712, "/images/a.img");
    h.attach(&spec);
    let (be, fe) = (spec.backend_path(), spec.frontend_path());
    // The frontend never connected (no blkfront in the guest): no 10 s wait.
    let start = Instant::now();
    assert_eq!(
        toolstack::remove_disk(h.store.as_ref(), &be, &fe, toolstack::DESTROY_TIMEOUT).unwrap(),
        Removal::Clean
    );
    assert!(start.elapsed() < Duration::from_secs(2));
    h.stop();
}

fn backend_removal_and_domain_death_tear_down(kind: Kind) {
    let h = Harness::default(kind);
    let (be, _fe) = connected_disk(&h, 5, 51712, "/images/a.img");
    let (be2, _fe2) = connected_disk(&h, 6, 51712, "/images/b.img");
    // A libxl `vbd` disk of domain 6 too: libxl removes those, we must not.
    let vbd = DiskSpec::new("vbd", 6, 51728, "/images/c.img");
    h.attach(&vbd);
    h.store
        .write(
            &join(&vbd.backend_path(), "physical-device-path"),
            b"/images/c.img",
        )
        .unwrap();
    h.frontend_connect(&vbd.frontend_path(), &[]);
    h.wait_state(&vbd.backend_path(), XenbusState::Connected);
    assert_eq!(h.live(), 3);
    // Forced removal of the backend directory.
    h.store.rm(&be).unwrap();
    h.wait_until("disconnect after rm", || h.live() == 2);
    assert!(h.dump(&be).is_empty(), "backend directory resurrected");
    // Domain 6 dies: its home goes, xenstored fires @releaseDomain.
    h.store.rm("/local/domain/6").unwrap();
    h.release_domain(6);
    h.wait_until("disconnect after domain death", || h.live() == 0);
    h.wait_state(&vbd.backend_path(), XenbusState::Closed);
    // Our own type has no toolstack to clean up after a dead guest: the daemon removes
    // the device and the then-empty domain directory (the lab found both left behind).
    h.wait_until("own device of the dead domain removed", || {
        h.dump(&be2).is_empty() && h.dump("/local/domain/0/backend/xenblkd/6").is_empty()
    });
    h.wait_until("only the vbd device is left", || {
        let devices = h.sender.status(WAIT).unwrap().1;
        devices.len() == 1 && devices[0].backend_type == "vbd"
    });
    h.stop();
}

/// A restarted daemon finds devices whose guests died while it was not running: it must
/// not open their storage, and removes those of its own type (the lab saw a restarted
/// `serve` open a dead guest's image).
fn devices_of_dead_domains_found_at_start_are_not_opened(kind: Kind) {
    let own = DiskSpec::new("xenblkd", 9, 51712, "/images/stale.img");
    let vbd = DiskSpec::new("vbd", 9, 51728, "/images/stale-vbd.img");
    let h = Harness::start_prepared(kind, Config::default(), |store| {
        for spec in [&own, &vbd] {
            toolstack::add_disk(store, spec).unwrap();
            // As the previous daemon left them: connected, hotplug done.
            let be = spec.backend_path();
            store
                .write(&join(&be, "physical-device-path"), spec.params.as_bytes())
                .unwrap();
            store.write(&join(&be, "state"), b"4").unwrap();
        }
        // Domain 9 is gone: never introduced to this xenstored, home removed.
        store.rm("/local/domain/9").unwrap();
    });
    // A live guest attached afterwards is served as usual.
    let (live_be, _) = connected_disk(&h, 5, 51712, "/images/live.img");
    h.wait_until("own stale device removed", || {
        h.dump(&own.backend_path()).is_empty()
            && h.dump("/local/domain/0/backend/xenblkd/9").is_empty()
    });
    h.wait_state(&vbd.backend_path(), XenbusState::Closed);
    let opened = h.shared.opened.lock().unwrap().clone();
    assert_eq!(
        opened,
        vec![PathBuf::from("/images/live.img")],
        "opened {opened:?}"
    );
    assert_eq!(h.state(&live_be), XenbusState::Connected);
    h.stop();
}

/// A config serving the defaults and libxl's `qdisk` type.
fn with_qdisk() -> Config {
    let mut c = Config {
        drain_timeout_ms: 1000,
        ..Config::default()
    };
    c.backend_types.push(BackendType::new("qdisk", false));
    c
}

/// What `xenblkd qemu-dm` writes for its domain, and what QEMU writes (no claim).
fn claim(h: &Harness, domid: u32) {
    h.store
        .write(&devmodel::claim_path(0, domid), b"4242")
        .unwrap();
}

fn qemu_running(h: &Harness, domid: u32) {
    h.store
        .write(
            &join(&devmodel::device_model_dir(0, domid), "state"),
            b"running",
        )
        .unwrap();
}

/// libxl adds a qdisk disk without waiting for any backend state (QEMU_BACKEND).
fn qdisk(h: &Harness, domid: u32, image: &str) -> DiskSpec {
    let spec = DiskSpec::new("qdisk", domid, 51712, &format!("aio:{image}"));
    h.guest(domid);
    toolstack::add_disk(h.store.as_ref(), &spec).unwrap();
    spec
}

/// Nothing of ours in a backend directory: libxl's nodes only, `state` as libxl wrote it.
fn untouched(h: &Harness, spec: &DiskSpec) {
    let be = spec.backend_path();
    assert_eq!(
        h.state(&be),
        XenbusState::Initialising,
        "{:#?}",
        h.dump(&be)
    );
    for node in [
        "multi-queue-max-queues",
        "max-ring-page-order",
        "error",
        "sectors",
    ] {
        assert_eq!(h.get(&join(&be, node)), None, "{node} written");
    }
    let opened = h.shared.opened.lock().unwrap().clone();
    let image = spec.params.trim_start_matches("aio:");
    assert!(
        !opened.contains(&PathBuf::from(image)),
        "{image} opened: {opened:?}"
    );
    let devices = h.sender.status(WAIT).unwrap().1;
    assert!(
        !devices
            .iter()
            .any(|d| d.backend_type == "qdisk" && d.domid == spec.domid),
        "{devices:?}"
    );
}

/// A `qdisk` device is QEMU's unless `xenblkd qemu-dm` claims its domain: unclaimed, not a
/// node is written nor the image opened; claimed, it connects; the claim withdrawn, it is
/// let go at once.
fn qdisk_devices_are_served_only_while_claimed(kind: Kind) {
    let h = Harness::start(kind, with_qdisk());
    // Domain 5 runs a real QEMU: its state node, no claim.
    let q5 = qdisk(&h, 5, "/images/q5.img");
    qemu_running(&h, 5);
    // Domain 6 runs our stand-in, which starts after libxl wrote the disk.
    let q6 = qdisk(&h, 6, "/images/q6.img");
    // A device of another type attached afterwards: once it is in InitWait, the manager
    // has seen the qdisk devices' events too.
    let (own, _) = connected_disk(&h, 7, 51712, "/images/own.img");
    untouched(&h, &q5);
    untouched(&h, &q6);

    qemu_running(&h, 6);
    claim(&h, 6);
    let (be6, fe6) = (q6.backend_path(), q6.frontend_path());
    h.wait_state(&be6, XenbusState::InitWait);
    h.frontend_connect(&fe6, &[("protocol", "x86_64-abi")]);
    h.wait_state(&be6, XenbusState::Connected);
    h.set_frontend_state(&fe6, XenbusState::Connected);
    assert_eq!(h.live(), 2);
    assert!(h
        .shared
        .opened
        .lock()
        .unwrap()
        .contains(&PathBuf::from("/images/q6.img")));
    // Domain 5 is still QEMU's, whatever happens next door.
    untouched(&h, &q5);

    // The stand-in exits (its claim goes): rings disconnected, Closed, device forgotten;
    // the directory stays for libxl.
    h.store.rm(&devmodel::claim_path(0, 6)).unwrap();
    h.wait_until("qdisk rings disconnected", || h.live() == 1);
    h.wait_state(&be6, XenbusState::Closed);
    h.wait_until("qdisk device forgotten", || {
        h.sender
            .status(WAIT)
            .unwrap()
            .1
            .iter()
            .all(|d| d.backend_type != "qdisk")
    });
    assert!(h.get(&join(&be6, "frontend")).is_some(), "backend removed");
    assert_eq!(h.state(&own), XenbusState::Connected);

    // Claimed again (a new stand-in): served again.
    h.set_frontend_state(&fe6, XenbusState::Initialising);
    claim(&h, 6);
    h.wait_state(&be6, XenbusState::InitWait);
    h.frontend_connect(&fe6, &[("protocol", "x86_64-abi")]);
    h.wait_state(&be6, XenbusState::Connected);
    untouched(&h, &q5);
    h.stop();
}

/// libxl's destroy of a stand-in's domain: the device-model directory goes first (the
/// claim with it), the domain dies, libxl removes the devices. The daemon lets go at the
/// first step and leaves libxl's directories to libxl.
fn qdisk_device_of_a_destroyed_domain_is_let_go(kind: Kind) {
    let h = Harness::start(kind, with_qdisk());
    claim(&h, 6);
    let q6 = qdisk(&h, 6, "/images/q6.img");
    let (be, fe) = (q6.backend_path(), q6.frontend_path());
    h.wait_state(&be, XenbusState::InitWait);
    h.frontend_connect(&fe, &[]);
    h.wait_state(&be, XenbusState::Connected);
    h.store.rm(&devmodel::device_model_dir(0, 6)).unwrap();
    h.wait_until("disconnected", || h.live() == 0);
    h.store.rm("/local/domain/6").unwrap();
    h.release_domain(6);
    h.wait_state(&be, XenbusState::Closed);
    assert!(
        h.get(&join(&be, "frontend")).is_some(),
        "qdisk is libxl's to remove"
    );
    h.store.rm(&be).unwrap();
    h.wait_until("no device left", || {
        h.sender.status(WAIT).unwrap().1.is_empty()
    });
    // A later domain with the same id and a real QEMU is not ours.
    let again = qdisk(&h, 6, "/images/q6b.img");
    qemu_running(&h, 6);
    let _ = connected_disk(&h, 8, 51712, "/images/own.img");
    untouched(&h, &again);
    h.stop();
}

fn resize_and_lost_features_are_published(kind: Kind) {
    let h = Harness::default(kind);
    let (be, _fe) = connected_disk(&h, 5, 51712, "/images/a.img");
    assert_eq!(h.get(&join(&be, "sectors")).as_deref(), Some("131072"));
    let sink = h.shared.sinks.lock().unwrap()[0].clone();
    h.force_conflicts(2);
    sink.send(VbdEvent::Resized(128 << 20));
    h.wait_until("sectors", || {
        h.get(&join(&be, "sectors")).as_deref() == Some("262144")
    });
    assert_eq!(h.state(&be), XenbusState::Connected);
    sink.send(VbdEvent::FeatureLost(Feature::Flush));
    h.wait_until("flush withdrawn", || {
        h.get(&join(&be, "feature-flush-cache")).as_deref() == Some("0")
    });
    assert_eq!(h.get(&join(&be, "feature-barrier")).as_deref(), Some("0"));
    // An operator-triggered refresh picks up a grown file.
    h.shared
        .sizes
        .lock()
        .unwrap()
        .insert(PathBuf::from("/images/a.img"), 256 << 20);
    h.sender.send(xenbus::Event::RefreshSizes);
    h.wait_until("refreshed sectors", || {
        h.get(&join(&be, "sectors")).as_deref() == Some("524288")
    });
    // A fatal engine report closes the device with an error.
    sink.send(VbdEvent::Fatal("ring overflow".into()));
    h.wait_state(&be, XenbusState::Closing);
    assert_eq!(
        h.get(&join(&be, "error")).as_deref(),
        Some("5 engine: ring overflow")
    );
    h.wait_until("disconnect", || h.live() == 0);
    h.stop();
}

fn shutdown_closes_every_device(kind: Kind) {
    let h = Harness::default(kind);
    let devices: Vec<(String, String)> = (0..3)
        .map(|i| connected_disk(&h, 5 + i, 51712, "/images/a.img"))
        .collect();
    // Cooperative frontends follow Closing to Closed.
    let store = h.store.clone();
    let devs = devices.clone();
    let guests = thread::spawn(move || {
        for (be, fe) in devs {
            toolstack::wait_state(store.as_ref(), &be, WAIT, "Closing", |s| {
                s == XenbusState::Closing
            })
            .unwrap();
            store.write(&join(&fe, "state"), b"6").unwrap();
        }
    });
    *h.shared.disconnect_delay.lock().unwrap() = Duration::from_millis(50);
    let shared = h.shared.clone();
    let store = h.store.clone();
    let mut h = h;
    h.shutdown();
    guests.join().unwrap();
    assert_eq!(shared.live.load(Ordering::SeqCst), 0);
    for (be, _) in devices {
        assert_eq!(
            toolstack::read_state(store.as_ref(), &be).unwrap(),
            XenbusState::Closed
        );
    }
}

fn shutdown_forces_unresponsive_frontends_after_the_deadline(kind: Kind) {
    let config = Config {
        drain_timeout_ms: 300,
        backend_types: vec![BackendType::new("xenblkd", false)],
        ..Config::default()
    };
    let h = Harness::start(kind, config);
    let (be, _) = connected_disk(&h, 5, 51712, "/images/a.img");
    let shared = h.shared.clone();
    let store = h.store.clone();
    let start = Instant::now();
    let mut h = h;
    h.shutdown();
    assert!(start.elapsed() < Duration::from_secs(3));
    assert_eq!(shared.live.load(Ordering::SeqCst), 0);
    assert_eq!(
        toolstack::read_state(store.as_ref(), &be).unwrap(),
        XenbusState::Closed
    );
}

fn adoption_config() -> Config {
    Config {
        defaults: DeviceSettings {
            max_queues: 4,
            max_ring_page_order: 2,
            ..DeviceSettings::default()
        },
        drain_timeout_ms: 1000,
        ..Config::default()
    }
}

/// A multi-queue frontend with persistent grants, connected by the first manager.
fn connected_multiqueue_disk(h: &Harness, domid: u32, devid: u32) -> (String, String) {
    let spec = DiskSpec::new("xenblkd", domid, devid, "raw:/images/adopt.img");
    h.attach(&spec);
    let (be, fe) = (spec.backend_path(), spec.frontend_path());
    h.frontend_connect(
        &fe,
        &[
            ("protocol", "x86_32-abi"),
            ("feature-persistent", "1"),
            ("multi-queue-num-queues", "2"),
            ("ring-page-order", "1"),
            ("queue-0/ring-ref0", "10"),
            ("queue-0/ring-ref1", "11"),
            ("queue-0/event-channel", "7"),
            ("queue-1/ring-ref0", "12"),
            ("queue-1/ring-ref1", "13"),
            ("queue-1/event-channel", "8"),
        ],
    );
    h.wait_state(&be, XenbusState::Connected);
    h.set_frontend_state(&fe, XenbusState::Connected);
    (be, fe)
}

/// Handover, then a new manager with *different* settings: the device is adopted with
/// the rings and features the frontend negotiated with the first one, the storage is
/// reopened from the backend's nodes, and neither end's directory is written.
fn handover_then_adoption_writes_nothing(kind: Kind) {
    let mut h = Harness::start(kind, adoption_config());
    let (be, fe) = connected_multiqueue_disk(&h, 5, 51712);
    h.wait_until("connected", || h.live() == 1);
    let first = h.shared.connects.lock().unwrap()[0].clone();
    let first_features = h.shared.features.lock().unwrap()[0];
    let before = (h.dump(&be), h.dump(&fe));
    let changes = (h.changes_below(&be), h.changes_below(&fe));

    h.hand_over();
    assert_eq!(h.live(), 0, "the rings were released");
    assert_eq!(
        (h.dump(&be), h.dump(&fe)),
        before,
        "handover wrote to xenstore"
    );

    // The new daemon advertises less than the old one did: what the frontend uses wins.
    let mut config = adoption_config();
    config.defaults.max_queues = 1;
    config.defaults.max_ring_page_order = 0;
    config.defaults.persistent_grants = false;
    config.defaults.max_indirect_segments = 32;
    h.successor(config, |_| {});
    h.wait_until("adopted", || h.live() == 1);
    let (_, devices) = h.sender.status(WAIT).unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].state, XenbusState::Connected);
    assert_eq!(devices[0].sessions, 1);
    let connects = h.shared.connects.lock().unwrap().clone();
    assert_eq!(connects.len(), 2);
    assert_eq!(
        connects[1].1, first.1,
        "the same rings, protocol and persistence"
    );
    assert_eq!(connects[1].0.target, first.0.target);
    assert_eq!(
        h.shared.opened.lock().unwrap().as_slice(),
        &[
            PathBuf::from("/images/adopt.img"),
            PathBuf::from("/images/adopt.img")
        ]
    );
    let features = h.shared.features.lock().unwrap()[1];
    assert_eq!(
        features, first_features,
        "the features the frontend was told"
    );
    assert_eq!(
        (h.dump(&be), h.dump(&fe)),
        before,
        "adoption wrote to xenstore"
    );
    assert_eq!(
        (h.changes_below(&be), h.changes_below(&fe)),
        changes,
        "adoption rewrote a node"
    );

    // Adopted, the device lives on as any other: the frontend closes, we follow.
    h.set_frontend_state(&fe, XenbusState::Closing);
    h.wait_state(&be, XenbusState::Closing);
    h.set_frontend_state(&fe, XenbusState::Closed);
    h.wait_state(&be, XenbusState::Closed);
    h.wait_until("disconnected", || h.live() == 0);
    h.stop();
}

/// The frontend's domain is not reachable when the new daemon starts (a simulated guest
/// has not yet come back to its socket): the device stays Adopting, nothing is written,
/// and it is adopted on a later tick.
fn adoption_waits_for_the_frontend_domain(kind: Kind) {
    let mut h = Harness::start(kind, adoption_config());
    let (be, fe) = connected_disk(&h, 5, 51712, "/images/a.img");
    h.hand_over();
    let before = (h.dump(&be), h.dump(&fe));
    h.successor(adoption_config(), |h| {
        h.shared.unreachable_connects.store(3, Ordering::SeqCst);
    });
    h.wait_until("adopted after retries", || h.live() == 1);
    assert_eq!(h.shared.unreachable_connects.load(Ordering::SeqCst), 0);
    assert_eq!((h.dump(&be), h.dump(&fe)), before);
    assert_eq!(h.state(&be), XenbusState::Connected);
    h.stop();
}

/// Inconsistent nodes (the frontend uses a ring order above what the backend directory
/// says was offered) fail the device as a bad connect does: `error` node and Closing.
fn inconsistent_nodes_fail_the_adoption(kind: Kind) {
    let mut h = Harness::start(kind, adoption_config());
    let (be, fe) = connected_multiqueue_disk(&h, 5, 51712);
    // And a second device that is fine: only the bad one fails.
    let (be2, _) = connected_disk(&h, 5, 51728, "/images/b.img");
    h.hand_over();
    h.successor(adoption_config(), |h| {
        h.store
            .write(&join(&be, "max-ring-page-order"), b"0")
            .unwrap();
    });
    h.wait_state(&be, XenbusState::Closing);
    let error = h.get(&join(&be, "error")).unwrap();
    assert!(error.contains("ring page order"), "{error}");
    assert_eq!(h.state(&be2), XenbusState::Connected);
    h.wait_until("the good one adopted", || h.live() == 1);
    let _ = fe;
    h.stop();
}

/// A device found with the backend InitWait (the old daemon never connected it) is set
/// up as before, and one whose frontend restarted while no daemon ran is set up again.
fn devices_not_connected_on_both_ends_are_not_adopted(kind: Kind) {
    let mut h = Harness::start(kind, adoption_config());
    let (be, fe) = connected_disk(&h, 5, 51712, "/images/a.img");
    let spec = DiskSpec::new("xenblkd", 5, 51728, "/images/b.img");
    h.attach(&spec);
    let (be2, fe2) = (spec.backend_path(), spec.frontend_path());
    h.hand_over();
    h.successor(adoption_config(), |h| {
        h.set_frontend_state(&fe, XenbusState::Initialising);
    });
    // The restarted frontend gets InitWait and connects afresh.
    h.wait_state(&be, XenbusState::InitWait);
    h.frontend_connect(&fe, &[]);
    h.wait_state(&be, XenbusState::Connected);
    // The device never connected is connected normally once its frontend is ready.
    assert_eq!(h.state(&be2), XenbusState::InitWait);
    h.frontend_connect(&fe2, &[]);
    h.wait_state(&be2, XenbusState::Connected);
    h.wait_until("both connected", || h.live() == 2);
    h.stop();
}

/// Runs each scenario over both stores.
macro_rules! over_both_stores {
    ($($name:ident),* $(,)?) => {
        mod mem {
            $(#[test] fn $name() { super::$name(super::Kind::Mem) })*
        }
        mod server {
            $(#[test] fn $name() { super::$name(super::Kind::Server) })*
        }
    };
}

/// Pause, resume and reopen at the edges the simulator tests do not reach: a frontend that
/// closes and reconnects while paused, a reopen of a new (larger) target, and the
/// operator's mistakes answered as errors.
fn pause_resume_reopen_follow_the_frontend(kind: Kind) {
    use xenbus::manager::DeviceOp::{Pause, Reopen, Resume};
    let h = Harness::default(kind);
    let (be, fe) = connected_disk(&h, 5, 51712, "raw:/images/a.img");
    let op = |device: &str, op| h.sender.device_op(device, op, WAIT);
    assert!(op("xenblkd/5/51712", Reopen)
        .unwrap_err()
        .contains("only while paused"));
    assert!(op("5/51799", Pause).unwrap_err().contains("no device"));
    assert!(op("5/xvda/x/y", Pause).is_err());

    // A pause releases the rings (a disconnect of the engine's VBD), the device stays
    // Connected, and the status says paused.
    assert!(op("5/xvda", Pause).unwrap().starts_with("paused"));
    assert_eq!(h.live(), 0);
    assert_eq!(h.state(&be), XenbusState::Connected);
    let (_, devices) = h.sender.status(WAIT).unwrap();
    assert!(devices[0].paused && devices[0].stats.is_empty());

    // Reopen reads `params` again; the new size is published as a resize.
    h.shared
        .sizes
        .lock()
        .unwrap()
        .insert(PathBuf::from("/images/b.img"), 128 << 20);
    h.store
        .write_str(&join(&be, "params"), "raw:/images/b.img")
        .unwrap();
    let answer = op("5/xvda", Reopen).unwrap();
    assert!(
        answer.contains("134217728 bytes (was 67108864)"),
        "{answer}"
    );
    assert_eq!(h.get(&join(&be, "sectors")).as_deref(), Some("262144"));
    assert_eq!(h.live(), 0, "a reopen serves nothing while paused");

    // Resume connects the same frontend's rings again, on the new storage.
    assert_eq!(op("5/xvda", Resume).unwrap(), "resumed");
    assert_eq!(h.live(), 1);
    {
        let connects = h.shared.connects.lock().unwrap();
        assert_eq!(connects.len(), 2);
        assert_eq!(connects[1].0.target.path, PathBuf::from("/images/b.img"));
    }

    // Paused, the frontend closes: Closed with nothing to disconnect; it comes back and
    // gets Connected, but no rings until resumed.
    op("5/xvda", Pause).unwrap();
    h.set_frontend_state(&fe, XenbusState::Closing);
    h.wait_state(&be, XenbusState::Closing);
    h.set_frontend_state(&fe, XenbusState::Closed);
    h.wait_state(&be, XenbusState::Closed);
    h.set_frontend_state(&fe, XenbusState::Initialising);
    h.wait_state(&be, XenbusState::InitWait);
    h.frontend_connect(&fe, &[]);
    h.wait_state(&be, XenbusState::Connected);
    assert_eq!(h.live(), 0);
    assert_eq!(h.shared.connects.lock().unwrap().len(), 2);
    op("5/xvda", Resume).unwrap();
    assert_eq!(h.live(), 1);
    assert_eq!(h.shared.connects.lock().unwrap().len(), 3);
    let (_, devices) = h.sender.status(WAIT).unwrap();
    assert!(!devices[0].paused);
    assert_eq!(
        devices[0].sessions, 2,
        "a resume is not a new frontend session"
    );
    h.stop();
}

over_both_stores!(
    connect_publishes_features_and_status,
    vbd_type_waits_for_the_hotplug_script,
    fatal_cases_write_error_and_close_only_that_device,
    frontend_close_and_reconnect,
    frontend_restart_without_closing_reconnects,
    toolstack_detach_with_cooperative_frontend,
    online_zero_closes_an_idle_device_at_once,
    unresponsive_frontend_is_torn_down_by_forced_removal,
    toolstack_junk_is_reported_once,
    recreated_device_does_not_inherit_the_old_storage,
    slow_storage_open_stalls_no_other_device,
    backend_removal_and_domain_death_tear_down,
    devices_of_dead_domains_found_at_start_are_not_opened,
    qdisk_devices_are_served_only_while_claimed,
    qdisk_device_of_a_destroyed_domain_is_let_go,
    resize_and_lost_features_are_published,
    shutdown_closes_every_device,
    shutdown_forces_unresponsive_frontends_after_the_deadline,
    frontend_writing_unknown_is_disconnected_and_left_closed,
    refused_features_stay_withdrawn_across_reconnects,
    a_guest_repeating_warnings_gets_one_line_per_interval,
    handover_then_adoption_writes_nothing,
    adoption_waits_for_the_frontend_domain,
    inconsistent_nodes_fail_the_adoption,
    devices_not_connected_on_both_ends_are_not_adopted,
    pause_resume_reopen_follow_the_frontend,
);
