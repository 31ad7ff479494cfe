//! Backend/frontend negotiation from arbitrary xenstore contents: rounds of node writes
//! and removals (backend nodes as a toolstack or hotplug script writes them, frontend
//! nodes as a guest does, any value, known names or made-up ones) into the in-memory
//! store, each round followed by the real `Manager` handling the watch events it caused
//! and reconciling its devices (`Device::reconcile`, `negotiate::read_backend`,
//! `read_frontend`, the publish functions), with a fake engine.
//!
//! Checked: no panic; every connect the manager asks for carries parameters inside what
//! was advertised (ring order, queue count, one ring reference per page); removing the
//! backend directories at the end disconnects every session; and once the manager is
//! gone every storage it opened has been released.

#![no_main]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use storage::{NullConfig, NullStorage};
use xenbus::config::Config;
use xenbus::memstore::MemStore;
use xenbus::store::Store;
use xenbus::vbd::{
    ConnectRequest, ConnectedVbd, DeviceConfig, DisconnectReport, Storage, VbdFactory,
};
use xenbus::{Manager, VbdError};

#[derive(Default)]
struct Counts {
    live: AtomicUsize,
    opened: AtomicUsize,
}

struct Fake(Arc<Counts>);
struct FakeVbd(Arc<Counts>);

impl ConnectedVbd for FakeVbd {
    fn stats(&self) -> BTreeMap<String, u64> {
        BTreeMap::new()
    }
    fn disconnect(self: Box<Self>, _timeout: Duration) -> Result<DisconnectReport, VbdError> {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
        Ok(DisconnectReport {
            drained: true,
            abandoned_requests: 0,
            detail: String::new(),
        })
    }
}

impl VbdFactory for Fake {
    fn open(&self, config: &DeviceConfig) -> Result<Arc<dyn Storage>, VbdError> {
        if config.target.path.as_os_str().len().is_multiple_of(5) {
            return Err(VbdError::new("opening", "No such file or directory", 2));
        }
        self.0.opened.fetch_add(1, Ordering::SeqCst);
        let null = NullStorage::new(NullConfig {
            size_bytes: 1 << 20,
            logical_block_size: 512,
            read_only: config.read_only,
            read_zeroes: false,
        })
        .map_err(|e| VbdError::new("opening", e.to_string(), 22))?;
        Ok(Arc::new(null))
    }

    fn connect(&self, req: ConnectRequest<'_>) -> Result<Box<dyn ConnectedVbd>, VbdError> {
        let s = &req.config.settings;
        let f = req.frontend;
        assert!(
            f.ring_page_order <= s.max_ring_page_order,
            "ring order over the limit"
        );
        assert!(
            !f.queues.is_empty() && f.queues.len() as u32 <= s.max_queues,
            "queue count"
        );
        for q in &f.queues {
            assert_eq!(
                q.ring_refs.len(),
                1 << f.ring_page_order,
                "one ref per ring page"
            );
        }
        assert!(!f.persistent || f.frontend_persistent);
        if f.queues[0].ring_refs[0] % 7 == 3 {
            return Err(VbdError::new("mapping", "grant map failed", 22));
        }
        self.0.live.fetch_add(1, Ordering::SeqCst);
        Ok(Box::new(FakeVbd(self.0.clone())))
    }
}

#[derive(Debug, Arbitrary)]
enum Dir {
    Backend,
    Frontend,
    /// `/local/domain/<domid>` itself (domain gone when removed).
    Domain,
    /// Another backend type's directory, or the device model's.
    Other(u8),
}

const NAMES: &[&str] = &[
    "state",
    "frontend",
    "frontend-id",
    "backend",
    "backend-id",
    "params",
    "type",
    "mode",
    "online",
    "physical-device",
    "physical-device-path",
    "hotplug-status",
    "device-type",
    "removable",
    "discard-enable",
    "direct-io-safe",
    "ring-ref",
    "ring-ref0",
    "ring-ref1",
    "ring-ref2",
    "ring-ref3",
    "ring-page-order",
    "num-ring-pages",
    "event-channel",
    "multi-queue-num-queues",
    "queue-0/ring-ref",
    "queue-0/event-channel",
    "queue-1/ring-ref",
    "queue-1/event-channel",
    "queue-0/ring-ref0",
    "queue-0/ring-ref1",
    "protocol",
    "feature-persistent",
    "feature-large-sector-size",
    "cdrom",
    "error",
    "sectors",
];

#[derive(Debug, Arbitrary)]
enum Name {
    Known(u8),
    Raw(String),
}

#[derive(Debug, Arbitrary)]
enum Value {
    Num(u32),
    State(u8),
    Path,
    Str(String),
    Raw(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
enum Op {
    Write(Dir, Name, Value),
    Rm(Dir, Option<Name>),
    Release,
    Rescan,
}

#[derive(Debug, Arbitrary)]
struct Input {
    domid: u8,
    devid: u32,
    xenblkd: bool,
    rounds: Vec<Vec<Op>>,
}

/// Handles events until the manager has nothing left to do.
fn settle(m: &mut Manager) {
    for _ in 0..64 {
        match m.step(Duration::from_micros(400)) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fuzz_target!(|input: Input| {
    let domid = 1 + u32::from(input.domid % 4);
    let devid = match input.devid % 4 {
        0 => 51712,
        1 => 51728,
        _ => input.devid,
    };
    let ty = if input.xenblkd { "xenblkd" } else { "vbd" };
    let be = format!("/local/domain/0/backend/{ty}/{domid}/{devid}");
    let fe = format!("/local/domain/{domid}/device/vbd/{devid}");
    let dom = format!("/local/domain/{domid}");

    let counts = Arc::new(Counts::default());
    let mem = MemStore::new();
    let store: Arc<dyn Store> = Arc::new(mem.clone());
    let mut m = Manager::new(
        store.clone(),
        Arc::new(Fake(counts.clone())),
        Config::default(),
    );
    let sender = m.sender();
    mem.set_watch_sink(Box::new(move |p, t| sender.watch_fired(p, t)));
    if m.start().is_err() {
        return;
    }
    settle(&mut m);

    for round in input.rounds.iter().take(12) {
        for op in round.iter().take(24) {
            let dir = |d: &Dir| match d {
                Dir::Backend => be.clone(),
                Dir::Frontend => fe.clone(),
                Dir::Domain => dom.clone(),
                Dir::Other(n) => format!(
                    "/local/domain/0/backend/{}/{domid}/{n}",
                    if n % 2 == 0 { ty } else { "qdisk" }
                ),
            };
            let name = |n: &Name| match n {
                Name::Known(k) => NAMES[usize::from(*k) % NAMES.len()].to_string(),
                Name::Raw(s) => s.chars().take(64).collect(),
            };
            let _ = match op {
                Op::Write(d, n, v) => {
                    let path = format!("{}/{}", dir(d), name(n));
                    let value: Vec<u8> = match v {
                        Value::Num(x) => x.to_string().into_bytes(),
                        Value::State(s) => (s % 10).to_string().into_bytes(),
                        Value::Path => if matches!(d, Dir::Backend) {
                            fe.clone()
                        } else {
                            be.clone()
                        }
                        .into_bytes(),
                        Value::Str(s) => s.clone().into_bytes(),
                        Value::Raw(b) => b.clone(),
                    };
                    store.write(&path, &value)
                }
                Op::Rm(d, n) => match n {
                    Some(n) => store.rm(&format!("{}/{}", dir(d), name(n))),
                    None => store.rm(&dir(d)),
                },
                Op::Release => {
                    m.sender().watch_fired("@releaseDomain", "xenblkd:release");
                    Ok(())
                }
                Op::Rescan => {
                    m.sender().send(xenbus::Event::Rescan);
                    Ok(())
                }
            };
        }
        settle(&mut m);
    }

    // The toolstack removes every device: every session must end.
    let _ = store.rm("/local/domain/0/backend");
    // Disconnects run on worker threads: give them time on a loaded machine.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while counts.live.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
        let _ = m.step(Duration::from_millis(10));
    }
    assert_eq!(
        counts.live.load(Ordering::SeqCst),
        0,
        "a session outlived its device"
    );
    drop(m);
});
