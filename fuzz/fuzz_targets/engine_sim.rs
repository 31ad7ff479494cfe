//! The real engine on the simulated hypervisor against a hostile guest.
//!
//! The fuzzer's bytes (through `arbitrary`) choose the VBD (protocol, ring order,
//! persistent grants, grant mode, indirect limit, read-only, features) and a script of
//! guest actions: requests of every kind put on the ring (direct and indirect with
//! segments naming valid, read-only, revoked or made-up grants; discards; raw slot
//! bytes), notifications or none, `req_prod` moved anywhere, ring bytes rewritten after
//! publication, grant-table entries rewritten raw, grants revoked while in flight,
//! descriptor and data pages rewritten, and waits of various lengths for the engine.
//!
//! The disk is a window in the middle of a larger file whose head and tail are filled
//! with a canary pattern; the storage the engine gets forwards offsets into the window
//! without checking them, so only the engine's own bounds checks protect the canaries.
//!
//! Checked after each input: nothing panicked (any thread), the VBD detaches, every
//! grant mapping is released (simulator gauges, the engine's map budget, no ring left on
//! a reactor), every grant can be revoked afterwards, and the canaries are intact.

#![no_main]

use std::io;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::Arbitrary;
use backend::{Engine, EngineConfig, Features, GrantMode, QosSpec, RingSpec, VbdLimits, VbdSpec};
use blkif::abi::MAX_REQUEST_SIZE;
use blkif::{FrontRing, Protocol, RawRequest, Segment};
use libfuzzer_sys::fuzz_target;
use platform::grant_table::GrantEntryV1;
use platform::sim::{GuestConfig, SimGuest, SimPlatform};
use platform::{GrantMapper, Platform};
use storage::{
    Completion, DirectIo, OpenOptions, Storage, StorageError, StorageInfo, StorageOp, StorageQueue,
    SubmitError,
};

const DOMID: u16 = 7;
/// The VBD: 64 KiB.
const WINDOW: u64 = 64 << 10;
/// Canary bytes before and after the window.
const GUARD: u64 = 16 << 10;
const CANARY: u8 = 0xC5;
/// Data pages granted up front (frames 16..16+POOL).
const POOL: u32 = 48;

/// A window of a larger storage: offsets are shifted, never checked.
struct Window(Arc<dyn Storage>);
struct WindowQueue(Box<dyn StorageQueue>);

impl Storage for Window {
    fn info(&self) -> StorageInfo {
        StorageInfo {
            size_bytes: WINDOW,
            ..self.0.info()
        }
    }
    fn refresh_size(&self) -> io::Result<u64> {
        Ok(WINDOW)
    }
    fn open_queue(&self, depth: u32) -> Result<Box<dyn StorageQueue>, StorageError> {
        Ok(Box::new(WindowQueue(self.0.open_queue(depth)?)))
    }
}

impl StorageQueue for WindowQueue {
    unsafe fn submit(&mut self, op: StorageOp<'_>, tag: u64) -> Result<(), SubmitError> {
        let op = match op {
            StorageOp::Read { offset, iov } => StorageOp::Read {
                offset: offset.wrapping_add(GUARD),
                iov,
            },
            StorageOp::Write { offset, iov, fua } => StorageOp::Write {
                offset: offset.wrapping_add(GUARD),
                iov,
                fua,
            },
            StorageOp::Discard {
                offset,
                len,
                secure,
            } => StorageOp::Discard {
                offset: offset.wrapping_add(GUARD),
                len,
                secure,
            },
            StorageOp::Flush => StorageOp::Flush,
        };
        // SAFETY: forwarded; the engine gave the same guarantees for the same buffers.
        unsafe { self.0.submit(op, tag) }
    }
    fn commit(&mut self) -> io::Result<()> {
        self.0.commit()
    }
    fn completion_fd(&self) -> BorrowedFd<'_> {
        self.0.completion_fd()
    }
    fn wake(&self) -> io::Result<()> {
        self.0.wake()
    }
    fn reap(&mut self, f: Completion<'_>) -> usize {
        self.0.reap(f)
    }
    fn in_flight(&self) -> u32 {
        self.0.in_flight()
    }
    fn depth(&self) -> u32 {
        self.0.depth()
    }
}

#[derive(Debug, Arbitrary)]
enum Gref {
    /// Pool page `n % POOL` (granted read-write).
    Pool(u8),
    /// Anything.
    Raw(u32),
}

#[derive(Debug, Arbitrary)]
struct Seg {
    gref: Gref,
    first: u8,
    last: u8,
}

#[derive(Debug, Arbitrary)]
enum Req {
    Direct {
        op: u8,
        sector: u16,
        segs: Vec<Seg>,
    },
    Indirect {
        op: u8,
        sector: u16,
        nr_segments: u16,
        pages: Vec<Gref>,
    },
    Discard {
        sector: u16,
        sectors: u16,
        secure: bool,
    },
    Raw(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
enum Step {
    Push(Req),
    Notify,
    SetReqProd(u32),
    Scribble {
        at: u16,
        bytes: Vec<u8>,
    },
    GrantEntry {
        n: u8,
        flags: u16,
        domid: u16,
        frame: u32,
    },
    Revoke(u8),
    WritePage {
        n: u8,
        offset: u16,
        bytes: Vec<u8>,
    },
    Descriptors {
        n: u8,
        segs: Vec<Seg>,
    },
    Wait(u8),
}

#[derive(Debug, Arbitrary)]
struct Input {
    protocol: u8,
    order: u8,
    persistent: bool,
    mode: u8,
    max_indirect: u16,
    read_only: bool,
    features: u8,
    steps: Vec<Step>,
}

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        Engine::start(EngineConfig {
            reactors: 1,
            ..Default::default()
        })
        .expect("engine")
    })
}

fn disk_path() -> PathBuf {
    PathBuf::from(format!(
        "/dev/shm/xenblkd-fuzz-engine-{}.img",
        std::process::id()
    ))
}

fn gref_of(g: &Gref, pool: &[u32]) -> u32 {
    match *g {
        Gref::Pool(n) => pool[usize::from(n) % pool.len()],
        Gref::Raw(r) => r,
    }
}

fn segment(s: &Seg, pool: &[u32]) -> Segment {
    Segment {
        gref: gref_of(&s.gref, pool),
        first_sect: s.first % 9,
        last_sect: s.last % 9,
    }
}

fn request(req: &Req, id: u64, pool: &[u32], protocol: Protocol) -> Option<RawRequest> {
    match req {
        Req::Direct { op, sector, segs } => {
            let segs: Vec<Segment> = segs.iter().take(11).map(|s| segment(s, pool)).collect();
            RawRequest::direct(op % 4, id, 0, u64::from(*sector), &segs)
        }
        Req::Indirect {
            op,
            sector,
            nr_segments,
            pages,
        } => {
            let grefs: Vec<u32> = pages.iter().take(8).map(|g| gref_of(g, pool)).collect();
            RawRequest::indirect(
                op % 4,
                id,
                0,
                u64::from(*sector),
                *nr_segments % 600,
                &grefs,
            )
        }
        Req::Discard {
            sector,
            sectors,
            secure,
        } => Some(RawRequest::discard(
            id,
            0,
            u64::from(*sector),
            u64::from(*sectors),
            *secure,
        )),
        Req::Raw(bytes) => {
            let mut slot = [0u8; MAX_REQUEST_SIZE];
            let n = bytes.len().min(slot.len());
            slot[..n].copy_from_slice(&bytes[..n]);
            Some(RawRequest::decode(protocol, &slot))
        }
    }
}

fuzz_target!(|input: Input| {
    let protocol = match input.protocol % 3 {
        0 => Protocol::Native,
        1 => Protocol::X86_32,
        _ => Protocol::X86_64,
    };
    let order = u32::from(input.order % 3);
    let path = disk_path();
    std::fs::write(&path, vec![CANARY; (GUARD + WINDOW + GUARD) as usize]).expect("tmpfs");
    let raw = storage::open(
        &path,
        OpenOptions {
            read_only: input.read_only,
            direct_io: DirectIo::Off,
            exclusive: false,
        },
    )
    .expect("open disk");
    let storage: Arc<dyn Storage> = Arc::new(Window(raw));

    let platform = SimPlatform::new();
    let guest = SimGuest::new(
        DOMID,
        GuestConfig {
            pages: 128,
            grant_entries: 512,
        },
    )
    .expect("guest");
    let domain = platform.attach_local(&guest).expect("attach guest");
    let n = 1u32 << order;
    let ring_grefs: Vec<u32> = (0..n)
        .map(|i| guest.grant_access(0, i, false).expect("grant ring"))
        .collect();
    let mut ring =
        FrontRing::new(guest.map_frames(0, n).expect("map ring"), protocol).expect("ring");
    let evtchn = guest.alloc_event_channel(0).expect("evtchn");
    let pool: Vec<u32> = (0..POOL)
        .map(|i| guest.grant_access(0, 16 + i, false).expect("grant pool"))
        .collect();

    let spec = VbdSpec {
        domid: DOMID,
        storage,
        read_only: input.read_only,
        rings: vec![RingSpec {
            ring_refs: ring_grefs.clone(),
            event_channel: evtchn.port(),
        }],
        protocol,
        persistent: input.persistent,
        grant_mode: match input.mode % 3 {
            0 => GrantMode::Map,
            1 => GrantMode::Copy,
            _ => GrantMode::Auto,
        },
        features: Features {
            flush: input.features & 1 != 0,
            barrier: input.features & 2 != 0,
            discard: input.features & 4 != 0,
            secure_discard: input.features & 8 != 0,
        },
        limits: VbdLimits {
            max_indirect_segments: u32::from(input.max_indirect % 1100),
            resize_poll: None,
            poll: Duration::ZERO,
            ..VbdLimits::default()
        },
        events: None,
        journal: None,
        qos: QosSpec::default(),
    };
    let shared: Arc<dyn Platform> = Arc::new(platform.clone());
    let Ok(vbd) = engine().attach(spec, shared) else {
        return;
    };

    let mut id = 0u64;
    let mut scribbled = std::collections::BTreeSet::new();
    for step in input.steps.iter().take(64) {
        match step {
            Step::Push(req) => {
                id += 1;
                if let Some(raw) = request(req, id, &pool, protocol) {
                    let _ = ring.push_request(&raw);
                }
            }
            Step::Notify => {
                let _ = ring.push_requests_and_check_notify();
                let _ = evtchn.notify();
            }
            Step::SetReqProd(v) => {
                let _ = ring
                    .memory()
                    .store_u32(0, *v, std::sync::atomic::Ordering::Release);
                let _ = evtchn.notify();
            }
            Step::Scribble { at, bytes } => {
                let len = ring.memory().len();
                let at = usize::from(*at) % len;
                let n = bytes.len().min(len - at).min(256);
                let _ = ring.memory().write(at, &bytes[..n]);
            }
            Step::GrantEntry {
                n,
                flags,
                domid,
                frame,
            } => {
                let gref = pool[usize::from(*n) % pool.len()];
                scribbled.insert(gref);
                let _ = guest.write_raw_entry(
                    gref,
                    GrantEntryV1 {
                        flags: *flags,
                        domid: *domid,
                        frame: *frame % 256,
                    },
                );
            }
            Step::Revoke(n) => {
                let _ = guest.end_access(pool[usize::from(*n) % pool.len()]);
            }
            Step::WritePage { n, offset, bytes } => {
                let offset = usize::from(*offset) % 4096;
                let len = bytes.len().min(4096 - offset);
                let _ = guest.write_page(16 + u32::from(*n) % POOL, offset, &bytes[..len]);
            }
            Step::Descriptors { n, segs } => {
                let bytes: Vec<u8> = segs
                    .iter()
                    .take(512)
                    .flat_map(|s| segment(s, &pool).encode())
                    .collect();
                let _ = guest.write_page(16 + u32::from(*n) % POOL, 0, &bytes);
            }
            Step::Wait(ms) => {
                let _ = evtchn.wait(Duration::from_micros(u64::from(*ms % 16) * 250));
                while let Ok(Some(_)) = ring.pop_response() {}
            }
        }
    }
    let _ = ring.push_requests_and_check_notify();
    let _ = evtchn.notify();

    let stats = vbd.detach(Duration::from_secs(20)).expect("detach");
    assert_eq!(stats.total.in_flight, 0, "requests in flight after detach");
    assert_eq!(
        platform.live_mappings(),
        0,
        "grant mappings left after detach"
    );
    assert_eq!(platform.mapped_pages(), 0, "pages left mapped after detach");
    let budget = engine().map_budget().usage();
    assert_eq!(budget.grants, 0, "map budget not given back");
    assert_eq!(budget.guests, 0, "map budget guest not released");
    assert!(
        engine().reactor_loads().iter().all(|&l| l == 0),
        "ring left on a reactor"
    );
    // Nothing the backend mapped is still in use: every grant the guest did not rewrite
    // by hand can be revoked (or was already).
    let failures = guest.end_access_failures();
    for &g in pool.iter().chain(&ring_grefs) {
        if !scribbled.contains(&g) {
            let _ = guest.end_access(g);
        }
    }
    assert_eq!(
        guest.end_access_failures(),
        failures,
        "a grant is still in use after detach"
    );
    drop(ring);
    drop(evtchn);
    drop(domain);
    drop(guest);

    let bytes = std::fs::read(&path).expect("read disk");
    let (head, rest) = bytes.split_at(GUARD as usize);
    let tail = &rest[WINDOW as usize..];
    assert!(
        head.iter().all(|&b| b == CANARY),
        "bytes before the VBD changed"
    );
    assert!(
        tail.iter().all(|&b| b == CANARY),
        "bytes after the VBD changed"
    );
    assert_eq!(
        bytes.len() as u64,
        GUARD + WINDOW + GUARD,
        "the disk file changed size"
    );
    let _ = std::fs::remove_file(&path);
});
