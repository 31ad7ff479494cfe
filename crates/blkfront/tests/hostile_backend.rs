//! blkfront against a backend played by the test: requests are decoded straight from the
//! ring and responses written into it by hand, so the backend can lie (invented ids,
//! duplicate completions, wrong operations, impossible indices, grants kept mapped).
//! The frontend must count each lie, never panic, and still end every grant.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use blkfront::sim::SimGuestServices;
use blkfront::{
    BackendFeatures, BufferPlacement, CacheControl, Completion, Error, Frontend, FrontendConfig,
    IoError, IoOp, Protocol,
};
use blkif::abi::{
    sring, BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_READ, BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER, BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_OKAY, MAX_REQUEST_SIZE, PAGE_SIZE,
};
use blkif::{RawRequest, Response, Segment};
use platform::grant_table::{GTF_PERMIT_ACCESS, GTF_READONLY};
use platform::sim::{DomainHandle, GuestConfig, SimGuest, SimPlatform};
use platform::{Access, EventChannel, EventChannelBinder, GrantMapper, GrantMapping};
use shmem::SharedMemory;

const DOMID: u16 = 5;
const PAGES: u32 = 2048;

/// A backend the test drives by hand.
struct Hand {
    ring: SharedMemory,
    evt: Box<dyn EventChannel>,
    protocol: Protocol,
    size: u32,
    req_cons: u32,
    rsp_prod: u32,
}

impl Hand {
    /// Every request published since the last call, decoded from private copies.
    fn pop(&mut self) -> Vec<RawRequest> {
        let _ = self.evt.ack();
        let prod = self
            .ring
            .load_u32(sring::REQ_PROD, Ordering::Acquire)
            .unwrap();
        let mut out = Vec::new();
        while self.req_cons != prod {
            let mut slot = [0u8; MAX_REQUEST_SIZE];
            let off = sring::RING
                + (self.req_cons & (self.size - 1)) as usize * self.protocol.slot_size();
            self.ring
                .read(off, &mut slot[..self.protocol.request_size()])
                .unwrap();
            out.push(RawRequest::decode(self.protocol, &slot));
            self.req_cons = self.req_cons.wrapping_add(1);
        }
        out
    }

    /// Writes responses into the next response slots, publishes them and kicks.
    fn respond(&mut self, rsps: &[Response]) {
        for r in rsps {
            let off = sring::RING
                + (self.rsp_prod & (self.size - 1)) as usize * self.protocol.slot_size();
            self.ring
                .write(
                    off,
                    &r.encode(self.protocol)[..self.protocol.response_size()],
                )
                .unwrap();
            self.rsp_prod = self.rsp_prod.wrapping_add(1);
        }
        self.ring
            .store_u32(sring::RSP_PROD, self.rsp_prod, Ordering::Release)
            .unwrap();
        self.evt.notify().unwrap();
    }
}

/// The fd leak check compares the whole process's fd table: one bench at a time, each
/// after the previous test's thread has exited (see [`backend::testing`]).
struct Bench {
    fds_before: backend::testing::FdTable,
    fe: Frontend,
    hand: Hand,
    platform: SimPlatform,
    services: Arc<SimGuestServices>,
    _domain: DomainHandle,
    /// Last: fields drop in order, and the next bench must not start before the rest
    /// of this one is gone.
    _serial: std::sync::MutexGuard<'static, Option<i32>>,
}

fn offer() -> BackendFeatures {
    BackendFeatures {
        max_queues: 1,
        max_ring_page_order: 0,
        persistent: false,
        max_indirect_segments: 0,
        discard: Some(blkfront::DiscardParams {
            granularity: 4096,
            alignment: 0,
            secure: true,
        }),
        sectors: 1 << 16,
        ..BackendFeatures::default()
    }
}

fn bench(config: FrontendConfig, offer: BackendFeatures) -> Bench {
    let serial = backend::testing::serial();
    let fds_before = backend::testing::FdTable::now();
    let platform = SimPlatform::new();
    let guest = Arc::new(
        SimGuest::new(
            DOMID,
            GuestConfig {
                pages: PAGES,
                grant_entries: 4096,
            },
        )
        .unwrap(),
    );
    let domain = platform.attach_local(&guest).unwrap();
    let services = Arc::new(SimGuestServices::new(guest));
    let config = FrontendConfig {
        io_timeout: Duration::from_millis(300),
        ..config
    };
    let (fe, info) = Frontend::connect_direct(services.clone(), config, &offer).unwrap();
    let q = &info.queues[0];
    let ring = platform
        .map(DOMID, &q.ring_refs, Access::ReadWrite)
        .unwrap()
        .into_shared()
        .unwrap();
    let evt = platform.bind_interdomain(DOMID, q.event_channel).unwrap();
    let size = blkif::ring_size(info.protocol, info.ring_order).unwrap();
    Bench {
        _serial: serial,
        fds_before,
        fe,
        hand: Hand {
            ring,
            evt,
            protocol: info.protocol,
            size,
            req_cons: 0,
            rsp_prod: 0,
        },
        platform,
        services,
        _domain: domain,
    }
}

fn simple() -> Bench {
    bench(FrontendConfig::default(), offer())
}

impl Bench {
    fn poll(&self) -> Vec<Completion> {
        let mut out = Vec::new();
        self.fe.poll_completions(0, &mut out).unwrap();
        out
    }

    fn segments(&self, r: &RawRequest) -> Vec<Segment> {
        match *r {
            RawRequest::ReadWrite {
                nr_segments,
                segments,
                ..
            } => segments[..nr_segments as usize].to_vec(),
            RawRequest::Indirect {
                nr_segments,
                indirect_grefs,
                ..
            } => {
                let pages = (nr_segments as usize).div_ceil(512);
                let m = self
                    .platform
                    .map(DOMID, &indirect_grefs[..pages], Access::ReadOnly)
                    .unwrap();
                (0..nr_segments as usize)
                    .map(|i| {
                        let mut b = [0u8; 8];
                        m.read(i * 8, &mut b).unwrap();
                        Segment::decode(&b)
                    })
                    .collect()
            }
            _ => Vec::new(),
        }
    }

    /// Maps a request's data pages, as the backend would.
    fn map_data(&self, r: &RawRequest, access: Access) -> GrantMapping {
        let grefs: Vec<u32> = self.segments(r).iter().map(|s| s.gref).collect();
        self.platform.map(DOMID, &grefs, access).unwrap()
    }

    fn flags(&self, gref: u32) -> u16 {
        self.services.sim_guest().grant_entry(gref).unwrap().flags
    }

    /// Closes the frontend and checks it ended every grant and freed every page.
    /// Then drops everything and checks no fd is left open.
    fn finish(self) -> blkfront::FrontendStats {
        let Bench {
            _serial,
            fds_before,
            fe,
            hand,
            platform,
            services,
            _domain,
        } = self;
        let stats = fe.stats();
        drop(hand);
        let report = fe.close();
        assert!(report.is_clean(), "{report:?}");
        drop(fe);
        assert_eq!(services.free_frames_count(), PAGES as usize);
        assert_eq!(platform.live_mappings(), 0);
        drop(_domain);
        drop(services);
        let _ = platform.detach(DOMID);
        drop(platform);
        fds_before.assert_unchanged("after teardown");
        stats
    }
}

fn id_of(r: &RawRequest) -> u64 {
    r.id()
}

#[test]
fn a_well_behaved_read_completes_with_the_backends_data() {
    let mut b = simple();
    b.fe.submit_read(0, 8192, 4096, 77).unwrap();
    let reqs = b.hand.pop();
    assert_eq!(reqs.len(), 1);
    let RawRequest::ReadWrite {
        operation,
        nr_segments,
        sector_number,
        segments,
        ..
    } = reqs[0]
    else {
        panic!("expected a direct request, got {:?}", reqs[0]);
    };
    assert_eq!(
        (operation, nr_segments, sector_number),
        (BLKIF_OP_READ, 1, 16)
    );
    assert_eq!((segments[0].first_sect, segments[0].last_sect), (0, 7));
    // A READ's page is granted writable (the backend fills it).
    assert_eq!(b.flags(segments[0].gref) & GTF_READONLY, 0);
    let m = b.map_data(&reqs[0], Access::ReadWrite);
    m.write(0, &[0x5a; PAGE_SIZE]).unwrap();
    drop(m);
    b.hand
        .respond(&[Response::okay(id_of(&reqs[0]), BLKIF_OP_READ)]);
    let done = b.poll();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].token, 77);
    assert_eq!(done[0].result, Ok(()));
    assert_eq!(done[0].data, vec![0x5a; 4096]);
    // Non-persistent: the grant was ended at completion.
    assert_eq!(b.flags(segments[0].gref) & GTF_PERMIT_ACCESS, 0);
    let s = b.finish();
    assert_eq!(s.protocol_errors(), 0);
}

#[test]
fn writes_are_granted_read_only_without_persistent_grants() {
    let mut b = simple();
    let data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
    b.fe.submit_write(0, 0, &data, 1).unwrap();
    let reqs = b.hand.pop();
    let segs = b.segments(&reqs[0]);
    assert_eq!(reqs[0].operation(), BLKIF_OP_WRITE);
    assert_ne!(b.flags(segs[0].gref) & GTF_READONLY, 0);
    assert!(b
        .platform
        .map(DOMID, &[segs[0].gref], Access::ReadWrite)
        .is_err());
    let m = b.map_data(&reqs[0], Access::ReadOnly);
    let mut got = vec![0u8; 4096];
    m.read(0, &mut got).unwrap();
    assert_eq!(got, data);
    drop(m);
    b.hand
        .respond(&[Response::okay(reqs[0].id(), BLKIF_OP_WRITE)]);
    assert_eq!(b.poll()[0].result, Ok(()));
    b.finish();
}

#[test]
fn invented_and_duplicate_ids_are_counted_and_ignored() {
    let mut b = simple();
    for t in 0..4 {
        b.fe.submit_read(0, 0, 512, t).unwrap();
    }
    let reqs = b.hand.pop();
    let id = reqs[0].id();
    let idle = (0..32).find(|i| reqs.iter().all(|r| r.id() != *i)).unwrap();
    // An id far outside the shadow table, then one inside it but idle.
    b.hand.respond(&[
        Response::okay(u64::MAX, BLKIF_OP_READ),
        Response::okay(idle, BLKIF_OP_READ),
    ]);
    assert!(b.poll().is_empty());
    let s = b.fe.stats();
    assert_eq!((s.bad_id, s.not_in_flight), (1, 1));
    assert_eq!(
        b.fe.in_flight(0).unwrap(),
        4,
        "the real requests are still pending"
    );
    // Now a real answer, then the same answer again.
    b.hand.respond(&[Response::okay(id, BLKIF_OP_READ)]);
    assert_eq!(b.poll().len(), 1);
    b.hand.respond(&[Response::okay(id, BLKIF_OP_READ)]);
    assert!(b.poll().is_empty());
    let s = b.fe.stats();
    assert_eq!(
        s.not_in_flight, 2,
        "the duplicate completion is a protocol error"
    );
    assert_eq!(s.bad_id, 1);
    drop(b.hand);
    let report = b.fe.close();
    assert!(report.is_clean());
    assert_eq!(report.aborted_requests, 3);
}

#[test]
fn a_response_with_the_wrong_operation_fails_the_request() {
    let mut b = simple();
    b.fe.submit_write(0, 0, &[1u8; 1024], 9).unwrap();
    let reqs = b.hand.pop();
    b.hand
        .respond(&[Response::okay(reqs[0].id(), BLKIF_OP_READ)]);
    let done = b.poll();
    assert_eq!(
        done[0].result,
        Err(IoError::WrongOperation {
            expected: BLKIF_OP_WRITE,
            got: BLKIF_OP_READ
        })
    );
    let s = b.finish();
    assert_eq!(s.wrong_operation, 1);
}

#[test]
fn responses_out_of_order_complete_the_right_requests() {
    let mut b = simple();
    for t in 0..4u64 {
        b.fe.submit_read(0, t * 4096, 4096, t).unwrap();
    }
    let reqs = b.hand.pop();
    assert_eq!(reqs.len(), 4);
    for (i, r) in reqs.iter().enumerate() {
        let m = b.map_data(r, Access::ReadWrite);
        m.write(0, &[i as u8 + 1; PAGE_SIZE]).unwrap();
    }
    let rsps: Vec<Response> = reqs
        .iter()
        .rev()
        .map(|r| Response::okay(r.id(), BLKIF_OP_READ))
        .collect();
    b.hand.respond(&rsps);
    let mut done = b.poll();
    assert_eq!(done.len(), 4);
    assert_eq!(done[0].token, 3, "completions come in response order");
    done.sort_by_key(|c| c.token);
    for (t, c) in done.iter().enumerate() {
        assert_eq!(c.data, vec![t as u8 + 1; 4096]);
    }
    b.finish();
}

#[test]
fn impossible_response_index_halts_the_ring() {
    let mut b = simple();
    b.fe.submit_read(0, 0, 512, 1).unwrap();
    let _ = b.hand.pop();
    // Claims 20 responses for one request.
    b.hand.rsp_prod = 20;
    b.hand.respond(&[]);
    let mut out = Vec::new();
    assert!(matches!(
        b.fe.poll_completions(0, &mut out),
        Err(Error::RingHalted { queue: 0, .. })
    ));
    assert!(matches!(
        b.fe.submit_read(0, 0, 512, 2),
        Err(Error::RingHalted { .. })
    ));
    // Teardown still ends every grant, including the stuck request's.
    let stats = b.fe.stats();
    assert_eq!(stats.rings_halted, 1);
    drop(b.hand);
    let report = b.fe.close();
    assert!(report.is_clean());
    assert_eq!(report.aborted_requests, 1);
}

#[test]
fn a_grant_still_mapped_at_completion_is_reported_and_not_reused() {
    let mut b = simple();
    b.fe.submit_read(0, 0, 4096, 1).unwrap();
    let reqs = b.hand.pop();
    let gref = b.segments(&reqs[0])[0].gref;
    // The backend answers but keeps the page mapped.
    let held = b.map_data(&reqs[0], Access::ReadWrite);
    b.hand
        .respond(&[Response::okay(reqs[0].id(), BLKIF_OP_READ)]);
    assert_eq!(b.poll()[0].result, Ok(()));
    assert_eq!(b.fe.stats().end_access_failures, 1);
    assert_ne!(b.flags(gref) & GTF_PERMIT_ACCESS, 0, "still granted");
    let free_before = b.services.free_frames_count();
    // Once it lets go, the next reap ends the grant and frees the page.
    drop(held);
    b.poll();
    assert_eq!(b.flags(gref) & GTF_PERMIT_ACCESS, 0);
    assert_eq!(b.services.free_frames_count(), free_before + 1);
    b.finish();
}

#[test]
fn teardown_reports_grants_the_backend_still_maps() {
    let mut b = simple();
    b.fe.submit_write(0, 0, &[3u8; 4096], 1).unwrap();
    let reqs = b.hand.pop();
    let held = b.map_data(&reqs[0], Access::ReadOnly);
    let data_gref = b.segments(&reqs[0])[0].gref;
    let report = b.fe.close();
    assert_eq!(report.aborted_requests, 1);
    // The data page and the ring page (the hand still maps the ring).
    assert_eq!(report.still_mapped.len(), 2, "{report:?}");
    assert!(report.still_mapped.contains(&data_gref));
    // The aborted request is still reported to its submitter, then the queue is gone.
    let mut out = Vec::new();
    assert_eq!(b.fe.poll_completions(0, &mut out).unwrap(), 1);
    assert_eq!(out[0].result, Err(IoError::Aborted));
    assert!(matches!(
        b.fe.poll_completions(0, &mut out),
        Err(Error::Closed)
    ));
    drop(held);
}

#[test]
fn indirect_requests_describe_segments_in_read_only_pages() {
    let cfg = FrontendConfig::default();
    let mut b = bench(
        cfg,
        BackendFeatures {
            max_indirect_segments: 256,
            ..offer()
        },
    );
    // 32 segments (Linux's default cap): one indirect page.
    assert_eq!(b.fe.max_request_bytes(), 32 * 4096);
    let data: Vec<u8> = (0..32 * 4096u32).map(|i| (i / 7) as u8).collect();
    b.fe.submit_write(0, 0, &data, 5).unwrap();
    let reqs = b.hand.pop();
    assert_eq!(reqs.len(), 1);
    let RawRequest::Indirect {
        indirect_op,
        nr_segments,
        indirect_grefs,
        ..
    } = reqs[0]
    else {
        panic!("expected an indirect request");
    };
    assert_eq!((indirect_op, nr_segments), (BLKIF_OP_WRITE, 32));
    assert_ne!(b.flags(indirect_grefs[0]) & GTF_READONLY, 0);
    assert_eq!(indirect_grefs[1], 0);
    let m = b.map_data(&reqs[0], Access::ReadOnly);
    let mut got = vec![0u8; data.len()];
    m.read(0, &mut got).unwrap();
    assert_eq!(got, data);
    drop(m);
    // A short I/O stays direct even with indirect descriptors negotiated.
    b.fe.submit_read(0, 0, 11 * 4096, 6).unwrap();
    let more = b.hand.pop();
    assert!(matches!(
        more[0],
        RawRequest::ReadWrite {
            nr_segments: 11,
            ..
        }
    ));
    b.hand.respond(&[
        Response::okay(reqs[0].id(), BLKIF_OP_WRITE),
        Response::okay(more[0].id(), BLKIF_OP_READ),
    ]);
    assert_eq!(b.poll().len(), 2);
    b.finish();
}

#[test]
fn persistent_grants_are_writable_and_reused() {
    let cfg = FrontendConfig::default();
    let mut b = bench(
        cfg,
        BackendFeatures {
            persistent: true,
            ..offer()
        },
    );
    assert!(b.fe.negotiated().persistent);
    let mut seen = Vec::new();
    for round in 0..3u64 {
        b.fe.submit_write(0, 0, &[round as u8; 4096], round)
            .unwrap();
        let reqs = b.hand.pop();
        let g = b.segments(&reqs[0])[0].gref;
        assert_eq!(
            b.flags(g) & GTF_READONLY,
            0,
            "persistent grants are writable"
        );
        seen.push(g);
        b.hand
            .respond(&[Response::okay(reqs[0].id(), BLKIF_OP_WRITE)]);
        assert_eq!(b.poll().len(), 1);
        assert_ne!(
            b.flags(g) & GTF_PERMIT_ACCESS,
            0,
            "kept granted after completion"
        );
    }
    assert!(
        seen.windows(2).all(|w| w[0] == w[1]),
        "the same grant is reused: {seen:?}"
    );
    assert_eq!(b.fe.stats().persistent_grants, 1);
    let s = b.finish();
    assert_eq!(s.persistent_grants, 1);
}

#[test]
fn x86_32_requests_use_the_i386_layout() {
    let cfg = FrontendConfig {
        protocol: Protocol::X86_32,
        placement: BufferPlacement::SectorOffset(3),
        ..FrontendConfig::default()
    };
    let mut b = bench(cfg, offer());
    b.fe.submit_read(0, 512 * 100, 1024, 1).unwrap();
    let reqs = b.hand.pop();
    let RawRequest::ReadWrite {
        sector_number,
        segments,
        nr_segments,
        ..
    } = reqs[0]
    else {
        panic!()
    };
    assert_eq!((sector_number, nr_segments), (100, 1));
    assert_eq!((segments[0].first_sect, segments[0].last_sect), (3, 4));
    b.hand
        .respond(&[Response::okay(reqs[0].id(), BLKIF_OP_READ)]);
    assert_eq!(b.poll()[0].result, Ok(()));
    b.finish();
}

#[test]
fn flush_barrier_and_discard_encoding_and_refusals() {
    let cfg = FrontendConfig {
        flush: blkfront::FlushPreference::PreferBarrier,
        ..FrontendConfig::default()
    };
    let mut b = bench(cfg, offer());
    assert_eq!(b.fe.negotiated().cache, CacheControl::Barrier);
    b.fe.submit_flush(0, 1).unwrap();
    b.fe.submit_discard(0, 4096, 8192, true, 2).unwrap();
    let reqs = b.hand.pop();
    assert!(matches!(
        reqs[0],
        RawRequest::ReadWrite {
            operation: BLKIF_OP_WRITE_BARRIER,
            nr_segments: 0,
            ..
        }
    ));
    assert!(matches!(
        reqs[1],
        RawRequest::Discard {
            flag: 1,
            sector_number: 8,
            nr_sectors: 16,
            ..
        }
    ));
    // The backend refuses both: Linux stops sending them.
    b.hand.respond(&[
        Response::not_supported(reqs[0].id(), BLKIF_OP_WRITE_BARRIER),
        Response::not_supported(reqs[1].id(), BLKIF_OP_DISCARD),
    ]);
    let done = b.poll();
    assert!(done.iter().all(|c| c.result == Err(IoError::NotSupported)));
    assert_eq!(b.fe.negotiated().cache, CacheControl::None);
    assert!(b.fe.negotiated().discard.is_none());
    assert!(matches!(
        b.fe.discard(0, 4096, false),
        Err(Error::NotSupported("discard"))
    ));
    // Flush without cache control completes at once, with no request.
    b.fe.flush().unwrap();
    assert!(b.hand.pop().is_empty());
    let _ = BLKIF_OP_FLUSH_DISKCACHE;
    let _ = BLKIF_RSP_EOPNOTSUPP;
    let _ = BLKIF_RSP_OKAY;
    b.finish();
}

#[test]
fn the_block_layer_checks_come_first() {
    let b = simple();
    let mut buf = vec![0u8; 1000];
    assert!(matches!(
        b.fe.read(0, &mut buf),
        Err(Error::Unaligned { .. })
    ));
    assert!(matches!(
        b.fe.read(100, &mut buf[..512]),
        Err(Error::Unaligned { .. })
    ));
    let cap = b.fe.capacity();
    assert!(matches!(
        b.fe.write(cap - 512, &[0u8; 1024]),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        b.fe.write(u64::MAX - 511, &[0u8; 512]),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        b.fe.submit_read(3, 0, 512, 0),
        Err(Error::NoSuchQueue(3))
    ));
    // Nothing reached the ring.
    assert_eq!(b.fe.stats().requests, 0);
    b.finish();
}

#[test]
fn read_only_disks_refuse_writes_locally_unless_told_otherwise() {
    let ro = BackendFeatures {
        info: blkfront::features::VDISK_READONLY,
        ..offer()
    };
    let b = bench(FrontendConfig::default(), ro.clone());
    assert!(matches!(b.fe.write(0, &[0u8; 512]), Err(Error::ReadOnly)));
    assert!(matches!(b.fe.discard(0, 512, false), Err(Error::ReadOnly)));
    b.finish();
    let mut b = bench(
        FrontendConfig {
            honour_read_only: false,
            ..FrontendConfig::default()
        },
        ro,
    );
    b.fe.submit_write(0, 0, &[0u8; 512], 1).unwrap();
    assert_eq!(b.hand.pop().len(), 1, "the write reaches the backend");
    let r = b.fe.close();
    assert_eq!(r.aborted_requests, 1);
}

#[test]
fn a_silent_backend_times_out_synchronous_io_without_leaking() {
    let mut b = simple();
    let mut buf = vec![0u8; 4096];
    assert!(matches!(b.fe.read(0, &mut buf), Err(Error::Timeout(_))));
    let reqs = b.hand.pop();
    assert_eq!(reqs.len(), 1);
    // The late answer is consumed and dropped; the grant is ended.
    b.hand
        .respond(&[Response::okay(reqs[0].id(), BLKIF_OP_READ)]);
    assert!(b.poll().is_empty());
    assert_eq!(b.fe.in_flight(0).unwrap(), 0);
    let s = b.finish();
    assert_eq!(s.protocol_errors(), 0);
}

#[test]
fn a_full_ring_refuses_asynchronous_submissions() {
    let mut b = simple();
    let depth = b.fe.queue_depth();
    assert_eq!(depth, 32);
    for t in 0..depth as u64 {
        b.fe.submit_read(0, 0, 512, t).unwrap();
    }
    assert!(matches!(
        b.fe.submit_read(0, 0, 512, 99),
        Err(Error::QueueFull {
            needed: 1,
            free: 0,
            ..
        })
    ));
    let reqs = b.hand.pop();
    let rsps: Vec<_> = reqs
        .iter()
        .map(|r| Response::okay(r.id(), BLKIF_OP_READ))
        .collect();
    b.hand.respond(&rsps);
    let done = b.poll();
    assert_eq!(done.len(), depth);
    assert!(done.iter().all(|c| c.op == IoOp::Read && c.result.is_ok()));
    b.finish();
}
