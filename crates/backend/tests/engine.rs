//! Engine-level tests: the real engine against a minimal frontend on the simulator.

mod harness;

use std::time::Duration;

use backend::persistent_grants::PersistentGrantLimits;
use backend::{GrantMode, ResolvedGrantMode, VbdEvent};
use blkif::abi::{
    BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY,
};
use blkif::Protocol;
use harness::{serial, GrantCallCounts, Harness, Opts, Rng, GUEST_DOMID, SECTOR};
use storage::testing::{FaultInjector, FaultKind, FaultRule};
use storage::OpKind;

/// Random writes and reads of random shapes (segment sizes, offsets inside pages,
/// direct and indirect), each read checked against the model, then the whole disk.
fn random_io(h: &mut Harness, ring: usize, seed: u64, rounds: usize) {
    let mut rng = Rng::new(seed);
    let disk_sectors = (h.model.len() / SECTOR) as u64;
    for _ in 0..rounds {
        let seg_sectors = 1 + rng.below(8) as usize;
        let first = rng.below((8 - seg_sectors + 1) as u64) as u8;
        let max_segs = if h.opts.max_indirect > 0 { 40 } else { 11 };
        let nsegs = 1 + rng.below(max_segs) as usize;
        let len = nsegs * seg_sectors * SECTOR;
        let sector = rng.below(disk_sectors - (len / SECTOR) as u64);
        let indirect = h.opts.max_indirect > 0 && rng.below(4) == 0;
        if rng.below(2) == 0 {
            let data = rng.bytes(len);
            let b = h.build(BLKIF_OP_WRITE, sector, &data, seg_sectors, first, indirect);
            h.push(ring, &[&b]);
            let (rsp, _) = h.complete(ring, b);
            assert_eq!(rsp.status, BLKIF_RSP_OKAY);
            assert_eq!(rsp.operation, BLKIF_OP_WRITE);
        } else {
            let b = h.build(
                BLKIF_OP_READ,
                sector,
                &vec![0; len],
                seg_sectors,
                first,
                indirect,
            );
            h.push(ring, &[&b]);
            let (rsp, data) = h.complete(ring, b);
            assert_eq!(rsp.status, BLKIF_RSP_OKAY);
            let at = sector as usize * SECTOR;
            assert!(
                data.as_deref() == Some(&h.model[at..at + len]),
                "read mismatch"
            );
        }
    }
}

#[test]
fn read_write_against_model_in_every_data_path() {
    let _g = serial();
    for (persistent, mode, expect) in [
        (false, GrantMode::Map, ResolvedGrantMode::Map),
        (true, GrantMode::Map, ResolvedGrantMode::Map),
        (false, GrantMode::Copy, ResolvedGrantMode::Copy),
        (true, GrantMode::Copy, ResolvedGrantMode::Copy),
        (true, GrantMode::Auto, ResolvedGrantMode::MapOrCopy),
        (false, GrantMode::Auto, ResolvedGrantMode::Copy),
    ] {
        let mut h = Harness::new(Opts {
            persistent,
            mode,
            disk_bytes: 1 << 20,
            ..Opts::default()
        });
        assert_eq!(h.vbd().grant_mode(), expect);
        random_io(&mut h, 0, 0x5eed + persistent as u64, 60);
        h.verify_disk(0);
        let s = h.vbd().stats().total;
        assert!(s.rd_req > 0 && s.wr_req > 0 && s.rd_sect > 0 && s.wr_sect > 0);
        assert_eq!(s.errors, 0);
        if persistent && expect != ResolvedGrantMode::Copy {
            assert!(s.persistent_grants_mapped > 0, "persistent grants cached");
            assert_eq!(s.persistent_grants_in_use, 0);
        } else {
            assert_eq!(s.persistent_grants_mapped, 0);
            // Only the ring stays mapped between requests.
            assert_eq!(h.live_mappings(), 1);
        }
        h.teardown();
    }
}

#[test]
fn ring_orders_queues_and_protocols() {
    let _g = serial();
    for (order, rings, protocol) in [
        (0, 1, Protocol::X86_32),
        (1, 1, Protocol::X86_64),
        (2, 4, Protocol::Native),
        (3, 1, Protocol::X86_32),
        (4, 4, Protocol::X86_64),
    ] {
        let mut h = Harness::new(Opts {
            order,
            rings,
            protocol,
            disk_bytes: 1 << 20,
            ..Opts::default()
        });
        for r in 0..rings {
            random_io(&mut h, r, 7 + r as u64, 12);
        }
        // A full ring's worth of requests in one batch, on the last ring.
        let size = h.fronts[rings - 1].ring.size() as usize;
        let batch: Vec<_> = (0..size)
            .map(|i| {
                h.build(
                    BLKIF_OP_WRITE,
                    (i * 8) as u64 % 2040,
                    &[i as u8; 4096],
                    8,
                    0,
                    false,
                )
            })
            .collect();
        h.push(rings - 1, &batch.iter().collect::<Vec<_>>());
        for b in batch {
            assert_eq!(h.complete(rings - 1, b).0.status, BLKIF_RSP_OKAY);
        }
        h.verify_disk(0);
        let st = h.vbd().stats();
        assert_eq!(st.rings.len(), rings);
        assert!(st.rings.iter().all(|s| s.wr_req > 0));
        let loads = h.engine.as_ref().unwrap().reactor_loads();
        if rings == 4 {
            assert_eq!(loads, vec![2, 2], "rings spread across reactors");
        }
        h.teardown();
    }
}

/// VBDs with as many rings as there are reactors: the counts stay balanced and each
/// VBD's first ring (the one a guest driving one queue loads) goes to another reactor
/// than the previous VBD's, instead of every first ring to reactor 0.
#[test]
fn first_rings_of_vbds_rotate_over_the_reactors() {
    let _g = serial();
    let opts = Opts {
        rings: 2,
        reactors: 2,
        disk_bytes: 1 << 20,
        ..Opts::default()
    };
    let first = Harness::new(opts.clone());
    let others: Vec<Harness> = (0..3)
        .map(|i| first.another_guest(GUEST_DOMID + 1 + i, opts.clone()))
        .collect();
    let placements: Vec<Vec<usize>> = std::iter::once(&first)
        .chain(&others)
        .map(|h| h.vbd().ring_reactors().to_vec())
        .collect();
    assert_eq!(first.engine.as_ref().unwrap().reactor_loads(), vec![4, 4]);
    for p in &placements {
        assert_eq!(p.len(), 2);
        assert_ne!(
            p[0], p[1],
            "a VBD's two rings share a reactor: {placements:?}"
        );
    }
    let on_first = placements.iter().filter(|p| p[0] == 0).count();
    assert_eq!(on_first, 2, "first rings by reactor: {placements:?}");
    for h in others {
        h.teardown();
    }
    first.teardown();
}

#[test]
fn large_indirect_requests_are_split_and_bounded() {
    let _g = serial();
    for mode in [GrantMode::Map, GrantMode::Copy] {
        let mut h = Harness::new(Opts {
            mode,
            max_indirect: 4096,
            disk_bytes: 32 << 20,
            ..Opts::default()
        });
        assert_eq!(h.vbd().max_indirect_segments(), 4096);
        let mut rng = Rng::new(99);
        // 4096 one-page segments: 16 MiB in one request, more iovecs than one storage op
        // takes.
        let data = rng.bytes(4096 * 4096);
        let b = h.build(BLKIF_OP_WRITE, 16, &data, 8, 0, true);
        h.push(0, &[&b]);
        assert_eq!(h.complete(0, b).0.status, BLKIF_RSP_OKAY);
        let b = h.build(BLKIF_OP_READ, 16, &vec![0; data.len()], 8, 0, true);
        h.push(0, &[&b]);
        let (rsp, back) = h.complete(0, b);
        assert_eq!(rsp.status, BLKIF_RSP_OKAY);
        assert!(back.as_deref() == Some(&data[..]));
        // More segments than the protocol allows: refused before anything is mapped.
        let id = h.id();
        h.push_raw(
            0,
            &blkif::RawRequest::Indirect {
                indirect_op: BLKIF_OP_READ,
                nr_segments: 4097,
                handle: 0,
                id,
                sector_number: 0,
                indirect_grefs: [0; 8],
            },
        );
        assert_eq!(h.wait(0, id).status, BLKIF_RSP_ERROR);
        h.teardown();
    }
}

#[test]
fn flush_barrier_discard_and_ordering() {
    let _g = serial();
    for mode in [GrantMode::Map, GrantMode::Copy] {
        let mut h = Harness::new(Opts {
            mode,
            ..Opts::default()
        });
        let mut rng = Rng::new(3);
        assert_eq!(h.flush(0).status, BLKIF_RSP_OKAY);

        // Writes, a barrier with data, then a write, all in one batch: the barrier is
        // answered after every earlier request and before the later one.
        let before: Vec<_> = (0..6)
            .map(|i| {
                let d = rng.bytes(8192);
                h.build(BLKIF_OP_WRITE, i * 16, &d, 8, 0, false)
            })
            .collect();
        let bd = rng.bytes(4096);
        let barrier = h.barrier(200, &bd);
        let after = h.build(BLKIF_OP_WRITE, 300, &rng.bytes(4096), 8, 0, false);
        let mut all: Vec<&harness::Built> = before.iter().collect();
        all.push(&barrier);
        all.push(&after);
        h.push(0, &all);
        let ids_before: Vec<u64> = before.iter().map(|b| b.id).collect();
        let (barrier_id, after_id) = (barrier.id, after.id);
        for b in before {
            assert_eq!(h.complete(0, b).0.status, BLKIF_RSP_OKAY);
        }
        assert_eq!(h.complete(0, barrier).0.status, BLKIF_RSP_OKAY);
        assert_eq!(h.complete(0, after).0.status, BLKIF_RSP_OKAY);
        let arrival = &h.fronts[0].arrival;
        let pos = |id| arrival.iter().position(|&x| x == id).unwrap();
        for id in ids_before {
            assert!(
                pos(id) < pos(barrier_id),
                "barrier answered before an earlier write"
            );
        }
        assert!(
            pos(barrier_id) < pos(after_id),
            "later write overtook the barrier"
        );

        // Empty barrier.
        let b = h.barrier(0, &[]);
        h.push(0, &[&b]);
        assert_eq!(h.complete(0, b).0.status, BLKIF_RSP_OKAY);

        // Discard zeroes the range (punched hole) when the file system can.
        let r = h.write(0, 64, &rng.bytes(8192));
        assert_eq!(r.status, BLKIF_RSP_OKAY);
        if h.vbd().features().discard {
            assert_eq!(h.discard(0, 64, 16, false).status, BLKIF_RSP_OKAY);
            // Zero-length discard: nothing to do, answered OKAY like blkback.
            assert_eq!(h.discard(0, 0, 0, false).status, BLKIF_RSP_OKAY);
        } else {
            assert_eq!(h.discard(0, 64, 16, false).status, BLKIF_RSP_EOPNOTSUPP);
        }
        h.verify_disk(0);
        let s = h.vbd().stats().total;
        assert!(s.f_req >= 3);
        h.teardown();
    }
}

#[test]
fn read_only_vbd_refuses_writes() {
    let _g = serial();
    let mut h = Harness::new(Opts {
        read_only: true,
        ..Opts::default()
    });
    assert!(h.vbd().read_only());
    let (r, data) = h.read(0, 0, 4096);
    assert_eq!(r.status, BLKIF_RSP_OKAY);
    assert_eq!(data.unwrap(), vec![0; 4096]);
    let w = h.write(0, 0, &[1; 4096]);
    assert_eq!(w.status, BLKIF_RSP_ERROR);
    assert_ne!(h.flush(0).status, BLKIF_RSP_OKAY);
    assert_ne!(h.discard(0, 0, 8, false).status, BLKIF_RSP_OKAY);
    let b = h.build(BLKIF_OP_WRITE, 0, &[1; 4096 * 12], 8, 0, true);
    h.push(0, &[&b]);
    assert_eq!(h.complete(0, b).0.status, BLKIF_RSP_ERROR);
    assert!(h.vbd().stats().total.errors >= 2);
    h.verify_disk(0);
    h.teardown();
}

#[test]
fn storage_errors_fail_only_their_request() {
    let _g = serial();
    for mode in [GrantMode::Map, GrantMode::Copy] {
        let faults = FaultInjector::new();
        let mut h = Harness::new(Opts {
            mode,
            faults: Some(faults.clone()),
            ..Opts::default()
        });
        let mut rng = Rng::new(11);
        faults.add(FaultRule::once(OpKind::Write, FaultKind::Error(libc::EIO)).at_offset(8 * 512));
        let good = h.build(BLKIF_OP_WRITE, 0, &rng.bytes(4096), 8, 0, false);
        let bad = h.build(BLKIF_OP_WRITE, 8, &rng.bytes(4096), 8, 0, false);
        let good2 = h.build(BLKIF_OP_WRITE, 16, &rng.bytes(4096), 8, 0, false);
        h.push(0, &[&good, &bad, &good2]);
        assert_eq!(h.complete(0, good).0.status, BLKIF_RSP_OKAY);
        assert_eq!(h.complete(0, bad).0.status, BLKIF_RSP_ERROR);
        assert_eq!(h.complete(0, good2).0.status, BLKIF_RSP_OKAY);

        faults.add(FaultRule::once(
            OpKind::Write,
            FaultKind::Error(libc::ENOSPC),
        ));
        assert_eq!(h.write(0, 100, &rng.bytes(4096)).status, BLKIF_RSP_ERROR);
        faults.add(FaultRule::once(
            OpKind::Read,
            FaultKind::Short { bytes: 512 },
        ));
        assert_eq!(h.read(0, 0, 8192).0.status, BLKIF_RSP_ERROR);

        // A flush the storage turns out not to support: EOPNOTSUPP, and the feature goes.
        faults.add(FaultRule::once(
            OpKind::Flush,
            FaultKind::Error(libc::EOPNOTSUPP),
        ));
        assert_eq!(h.flush(0).status, BLKIF_RSP_EOPNOTSUPP);
        assert!(!h.vbd().features().flush);
        assert!(h
            .events
            .lock()
            .unwrap()
            .iter()
            .any(|e| matches!(e, VbdEvent::FeaturesChanged(f) if !f.flush)));
        // From then on flushes are refused by validation, as an unadvertised feature.
        assert_eq!(h.flush(0).status, BLKIF_RSP_EOPNOTSUPP);

        let s = h.vbd().stats().total;
        assert_eq!(s.errors, 3);
        assert_eq!(s.unsupported, 2);
        faults.clear();
        h.verify_disk(0);
        h.teardown();
    }
}

#[test]
fn ring_overflow_halts_only_that_ring() {
    let _g = serial();
    let mut h = Harness::new(Opts {
        rings: 2,
        ..Opts::default()
    });
    assert_eq!(h.write(0, 0, &[5; 4096]).status, BLKIF_RSP_OKAY);
    // The frontend of ring 0 claims far more requests than the ring holds.
    let size = h.fronts[0].ring.size();
    h.fronts[0]
        .ring
        .memory()
        .store_u32(0, size * 3, std::sync::atomic::Ordering::Release)
        .unwrap();
    h.fronts[0].evtchn.notify().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while h.vbd().stats().rings[0].halted_rings == 0 {
        assert!(std::time::Instant::now() < deadline, "ring 0 not halted");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The owner learns which ring and why (the engine itself logs it at debug only: the
    // guest decides how often it happens).
    let events = h.events.lock().unwrap().clone();
    let reason = events
        .iter()
        .find_map(|e| match e {
            VbdEvent::RingHalted { ring: 0, reason } => Some(reason.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no halt of ring 0 in {events:?}"));
    assert!(
        reason.contains("outstanding requests") && reason.contains(&format!("{size}")),
        "{reason}"
    );
    // Ring 1 carries on.
    assert_eq!(h.write(1, 8, &[6; 4096]).status, BLKIF_RSP_OKAY);
    h.verify_disk(1);
    assert_eq!(h.vbd().stats().total.halted_rings, 1);
    h.teardown();
}

#[test]
fn bounce_pool_exhaustion_waits_instead_of_failing() {
    let _g = serial();
    let mut h = Harness::new(Opts {
        mode: GrantMode::Copy,
        max_buffer_pages: 16,
        max_indirect: 64,
        ..Opts::default()
    });
    let mut rng = Rng::new(5);
    // Pool = max(16, 64) pages; three 40-page writes cannot all hold pages at once.
    let reqs: Vec<_> = (0..3)
        .map(|i| h.build(BLKIF_OP_WRITE, i * 400, &rng.bytes(40 * 4096), 8, 0, true))
        .collect();
    h.push(0, &reqs.iter().collect::<Vec<_>>());
    for b in reqs {
        assert_eq!(h.complete(0, b).0.status, BLKIF_RSP_OKAY);
    }
    assert!(h.vbd().stats().total.oo_req > 0);
    h.verify_disk(0);
    h.teardown();
}

#[test]
fn online_resize_is_seen_by_every_ring() {
    let _g = serial();
    let mut h = Harness::new(Opts {
        rings: 2,
        disk_bytes: 1 << 20,
        ..Opts::default()
    });
    let old = h.vbd().sectors();
    assert_eq!(old, 2048);
    // Beyond the end: refused.
    assert_eq!(h.write(1, 2048, &[1; 4096]).status, BLKIF_RSP_ERROR);
    h.disk.as_file().set_len(2 << 20).unwrap();
    assert_eq!(h.vbd().refresh_size().unwrap(), 4096);
    assert!(h
        .events
        .lock()
        .unwrap()
        .contains(&VbdEvent::Resized { sectors: 4096 }));
    h.model.resize(2 << 20, 0);
    assert_eq!(h.write(1, 2048, &[1; 4096]).status, BLKIF_RSP_OKAY);
    assert_eq!(h.write(0, 4000, &[2; 4096]).status, BLKIF_RSP_OKAY);
    h.verify_disk(0);
    h.teardown();
}

#[test]
fn detach_with_requests_outstanding_answers_them_first() {
    let _g = serial();
    let mut h = Harness::new(Opts {
        persistent: true,
        ..Opts::default()
    });
    let mut rng = Rng::new(8);
    let reqs: Vec<_> = (0..16)
        .map(|i| h.build(BLKIF_OP_WRITE, i * 8, &rng.bytes(4096), 8, 0, false))
        .collect();
    h.push(0, &reqs.iter().collect::<Vec<_>>());
    // Detach right away: whatever was consumed completes and is answered; nothing leaks.
    let vbd = h.vbd.take().unwrap();
    vbd.detach(Duration::from_secs(10)).unwrap();
    assert_eq!(h.live_mappings(), 0);
    drop(reqs);
    h.vbd = None;
    let engine = h.engine.take().unwrap();
    assert!(engine.reactor_loads().iter().all(|&l| l == 0));
    engine.shutdown();
}

#[test]
fn persistent_grants_overflow_and_purge() {
    let _g = serial();
    let mut h = Harness::new(Opts {
        persistent: true,
        persistent_limits: PersistentGrantLimits {
            max_grants: 4,
            unused_timeout: Duration::from_millis(300),
        },
        ..Opts::default()
    });
    let mut rng = Rng::new(21);
    // 11 grants per request, 4 fit in the cache: the rest are mapped for the request
    // and unmapped when it completes.
    for i in 0..4 {
        assert_eq!(
            h.write(0, i * 88, &rng.bytes(11 * 4096)).status,
            BLKIF_RSP_OKAY
        );
    }
    let s = h.vbd().stats().total;
    assert_eq!(s.persistent_grants_mapped, 4);
    assert_eq!(s.persistent_grants_in_use, 0);
    assert_eq!(h.live_mappings(), 1 + 4, "ring + cached grants");
    // Unused for longer than the timeout: the 100 ms purge unmaps them.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while h.live_mappings() > 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "persistent grants not purged"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(h.vbd().stats().total.persistent_grants_mapped, 0);
    h.verify_disk(0);
    h.teardown();
}

#[test]
fn a_deep_stream_of_1mib_requests_keeps_every_page_mapped() {
    let _g = serial();
    // Eight 1 MiB requests at once: 2 056 grants (256 data pages and an indirect page
    // each), twice blkback's 1 056. The default cache is sized to what the ring can have
    // in flight (32 x 257), so after the first round every page is a cache hit: nothing
    // mapped again, nothing copied.
    let mut h = Harness::new(Opts {
        persistent: true,
        mode: GrantMode::Auto,
        disk_bytes: 8 << 20,
        ..Opts::default()
    });
    assert_eq!(h.vbd().grant_mode(), ResolvedGrantMode::MapOrCopy);
    let mut rng = Rng::new(0x1f);
    const DEPTH: u64 = 8;
    const MIB_SECTORS: u64 = (1 << 20) / SECTOR as u64;
    let mut round = |h: &mut Harness, op: u8| {
        let batch: Vec<_> = (0..DEPTH)
            .map(|i| {
                let data = if op == BLKIF_OP_WRITE {
                    rng.bytes(1 << 20)
                } else {
                    vec![0; 1 << 20]
                };
                h.build(op, i * MIB_SECTORS, &data, 8, 0, false)
            })
            .collect();
        h.push(0, &batch.iter().collect::<Vec<_>>());
        for b in batch {
            let (sector, len) = (b.sector as usize, b.len);
            let (rsp, data) = h.complete(0, b);
            assert_eq!(rsp.status, BLKIF_RSP_OKAY);
            if op == BLKIF_OP_READ {
                let at = sector * SECTOR;
                assert!(data.as_deref() == Some(&h.model[at..at + len]));
            }
        }
    };
    round(&mut h, BLKIF_OP_WRITE);
    let warm = h.vbd().stats().total;
    assert_eq!(warm.persistent_grants_mapped, DEPTH * 257);
    for op in [BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_READ] {
        round(&mut h, op);
    }
    let s = h.vbd().stats().total;
    assert_eq!(s.persistent_grants_mapped, DEPTH * 257);
    assert_eq!(
        s.persistent_misses, warm.persistent_misses,
        "a warm cache maps nothing"
    );
    assert_eq!(
        s.persistent_hits - warm.persistent_hits,
        3 * DEPTH * 257,
        "every page of the later rounds (data and indirect) was a hit"
    );
    assert_eq!(
        h.live_mappings(),
        1 + DEPTH as usize * 257,
        "ring + cached grants"
    );
    h.verify_disk(0);
    h.teardown();
}

#[test]
fn map_or_copy_maps_what_the_cache_holds_and_copies_the_rest() {
    let _g = serial();
    let mut h = Harness::new(Opts {
        persistent: true,
        mode: GrantMode::Auto,
        persistent_limits: PersistentGrantLimits {
            max_grants: 4,
            unused_timeout: Duration::from_secs(60),
        },
        ..Opts::default()
    });
    assert_eq!(h.vbd().grant_mode(), ResolvedGrantMode::MapOrCopy);
    let mut rng = Rng::new(34);
    // Four one-page requests at once fit the cache: mapped and kept.
    let reqs: Vec<_> = (0..4)
        .map(|i| h.build(BLKIF_OP_WRITE, i * 8, &rng.bytes(4096), 8, 0, false))
        .collect();
    h.push(0, &reqs.iter().collect::<Vec<_>>());
    for b in reqs {
        assert_eq!(h.complete(0, b).0.status, BLKIF_RSP_OKAY);
    }
    let s = h.vbd().stats().total;
    assert_eq!(s.persistent_grants_mapped, 4);
    // Eleven grants do not fit a full cache of four: copied, nothing mapped for them,
    // the cache untouched. Reads and writes, direct and indirect.
    for i in 0..6 {
        let len = if i % 2 == 0 { 11 * 4096 } else { 20 * 4096 };
        assert_eq!(
            h.write(0, 64 + i * 160, &rng.bytes(len)).status,
            BLKIF_RSP_OKAY
        );
        let (rsp, data) = h.read(0, 64 + i * 160, len);
        assert_eq!(rsp.status, BLKIF_RSP_OKAY);
        let at = (64 + i as usize * 160) * 512;
        assert!(data.as_deref() == Some(&h.model[at..at + len]));
    }
    assert_eq!(h.live_mappings(), 1 + 4, "ring + cached grants only");
    let s = h.vbd().stats().total;
    assert_eq!(s.persistent_grants_mapped, 4);
    assert_eq!(s.errors, 0);
    h.verify_disk(0);
    h.teardown();
}

/// Samples the engine's persistent-grant budget from another thread until dropped, as a
/// status query would: the peak number of grants held.
struct BudgetSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl BudgetSampler {
    fn start(budget: backend::MapBudget) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut peak = 0;
                while !stop.load(Ordering::Relaxed) {
                    let u = budget.usage();
                    assert!(u.grants <= u.limit(), "budget exceeded: {u:?}");
                    peak = peak.max(u.grants);
                    std::thread::sleep(Duration::from_micros(50));
                }
                peak
            }
        });
        BudgetSampler {
            stop,
            thread: Some(thread),
        }
    }

    fn peak(mut self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for BudgetSampler {
    fn drop(&mut self) {
        // A test that failed before `peak` must not leave the thread running.
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn many_rings_share_a_tiny_persistent_grant_budget() {
    let _g = serial();
    const RINGS: usize = 8;
    const BUDGET: usize = 24;
    for mode in [GrantMode::Map, GrantMode::Auto] {
        // Eight rings of blkback's default cache (1056 each) on two reactors, and a
        // budget of 24 grants for all of them: most grants cannot be kept, and every
        // request must still complete with the right data.
        let mut h = Harness::new(Opts {
            rings: RINGS,
            reactors: 2,
            persistent: true,
            mode,
            persistent_budget: Some(BUDGET),
            disk_bytes: 2 << 20,
            ..Opts::default()
        });
        let budget = h.engine.as_ref().unwrap().map_budget().clone();
        assert_eq!(budget.usage().limit(), BUDGET);
        let sampler = BudgetSampler::start(budget.clone());
        let mut rng = Rng::new(0xb0d9e7 + mode as u64);
        // Each ring owns 512 sectors of the disk; a round puts four requests of up to 11
        // pages on every ring at once, writes in even rounds, reads of the same ranges
        // (checked against the model) in odd ones.
        let region = (h.model.len() / SECTOR / RINGS) as u64;
        let mut shapes: Vec<Vec<(u64, usize, usize)>> = vec![Vec::new(); RINGS];
        for round in 0..8 {
            let mut batches = Vec::new();
            for (r, ring_shapes) in shapes.iter_mut().enumerate() {
                if round % 2 == 0 {
                    ring_shapes.clear();
                    for k in 0..4u64 {
                        let seg_sectors = 1 + rng.below(8) as usize;
                        let nsegs = 1 + rng.below(11) as usize;
                        ring_shapes.push((r as u64 * region + k * 88, nsegs, seg_sectors));
                    }
                }
                let batch: Vec<_> = ring_shapes
                    .iter()
                    .map(|&(sector, nsegs, seg_sectors)| {
                        let len = nsegs * seg_sectors * SECTOR;
                        if round % 2 == 0 {
                            let data = rng.bytes(len);
                            h.build(BLKIF_OP_WRITE, sector, &data, seg_sectors, 0, false)
                        } else {
                            h.build(BLKIF_OP_READ, sector, &vec![0; len], seg_sectors, 0, false)
                        }
                    })
                    .collect();
                h.push(r, &batch.iter().collect::<Vec<_>>());
                batches.push(batch);
            }
            for (r, batch) in batches.into_iter().enumerate() {
                for b in batch {
                    let (sector, len, op) = (b.sector as usize, b.len, b.op);
                    let (rsp, data) = h.complete(r, b);
                    assert_eq!(rsp.status, BLKIF_RSP_OKAY, "{mode:?} ring {r}");
                    if op == BLKIF_OP_READ {
                        let at = sector * SECTOR;
                        assert!(
                            data.as_deref() == Some(&h.model[at..at + len]),
                            "{mode:?} ring {r}: read mismatch at sector {sector}"
                        );
                    }
                }
            }
            // Between rounds only the rings and the kept grants stay mapped.
            assert!(h.live_mappings() <= RINGS + BUDGET, "{}", h.live_mappings());
        }
        h.verify_disk(0);
        let peak = sampler.peak();
        let usage = budget.usage();
        let s = h.vbd().stats().total;
        assert_eq!(s.errors, 0);
        assert!(peak > 0 && peak <= BUDGET, "peak {peak}");
        assert!(s.persistent_grants_mapped as usize <= BUDGET);
        assert_eq!(s.persistent_grants_mapped as usize, usage.grants);
        assert!(usage.refusals > 0, "the budget never refused: {usage:?}");
        assert!(s.persistent_budget_refusals > 0);
        // Teardown checks that the budget is back to zero after the detach.
        h.teardown();
        assert_eq!(budget.usage().grants, 0);
    }
}

#[test]
fn rings_reserve_their_own_mappings_from_the_process_budget() {
    use backend::grant_budget::{ring_map_reserve, RING_FIXED_MAPS};
    use backend::MapCost;
    let _g = serial();
    // Sized from vm.max_map_count: each ring holds back what it maps besides its guest's
    // grant mappings (its ring pages, io_uring, bounce pool), until it is detached,
    // whatever the mode: what requests map is taken from the guest's share as they map.
    for (mode, rings, order) in [
        (GrantMode::Map, 1, 0),
        (GrantMode::Map, 2, 2),
        (GrantMode::Copy, 2, 0),
        (GrantMode::Auto, 1, 0),
    ] {
        let h = Harness::new(Opts {
            mode,
            rings,
            order,
            persistent: true,
            ..Opts::default()
        });
        let u = h.engine.as_ref().unwrap().map_budget().usage();
        let max_map_count = backend::grant_budget::read_max_map_count().unwrap();
        // The harness grants ring pages contiguous: one VMA per ring mapping.
        let one = ring_map_reserve(1, 1 << order);
        assert_eq!(one, MapCost::new(RING_FIXED_MAPS + 1, 1 << order));
        let expect = MapCost::new(rings * one.vmas, rings * one.pages);
        assert_eq!(u.reserved, expect, "{mode:?} x{rings} order {order}");
        assert!(u.capacity.vmas < max_map_count);
        assert_eq!(u.limit(), u.capacity.vmas - expect.vmas);
        assert_eq!(u.guests, 1);
        assert_eq!(
            u.share(),
            MapCost::new(
                u.capacity.vmas - expect.vmas,
                u.capacity.pages - expect.pages
            )
        );
        // `teardown` checks the reserve is given back.
        h.teardown();
    }
}

#[test]
fn a_map_that_fails_for_want_of_resources_is_served_by_grant_copy() {
    let _g = serial();
    // The engine's budget thinks there is room (sized from this process's limit), but
    // the platform runs out: of VMAs (ENOMEM from mmap), or of map-tracking entries
    // (GNTST_no_device_space) as when dom0's kernel backends took them. Each request is
    // still served, by grant copy, and counted; refused grants still fail.
    for (vmas, pages, persistent) in [
        (Some(2), None, false),
        (None, Some(2), false),
        (Some(2), None, true),
    ] {
        let mut h = Harness::new(Opts {
            mode: GrantMode::Map,
            persistent,
            ..Opts::default()
        });
        // The ring holds one VMA and one page; one more of each is left.
        h.platform.set_grant_vma_limit(vmas);
        h.platform.set_grant_page_limit(pages);
        random_io(&mut h, 0, 0xe0e0, 40);
        let s = h.vbd().stats().total;
        assert_eq!(s.errors, 0);
        assert!(s.map_fallbacks > 0, "{s:?}");
        assert!(
            h.platform.vma_limit_refusals() + h.platform.page_limit_refusals() > 0,
            "the platform never refused"
        );
        let bogus = blkif::Segment {
            gref: 9000,
            first_sect: 0,
            last_sect: 7,
        };
        let id = h.id();
        h.push_raw(
            0,
            &blkif::RawRequest::direct(BLKIF_OP_WRITE, id, 0, 0, &[bogus]).unwrap(),
        );
        assert_eq!(h.wait(0, id).status, BLKIF_RSP_ERROR);
        h.platform.set_grant_vma_limit(None);
        h.platform.set_grant_page_limit(None);
        h.verify_disk(0);
        h.teardown();
    }
}

#[test]
fn budget_pressure_moves_grants_to_the_ring_that_needs_them() {
    let _g = serial();
    let mut h = Harness::new(Opts {
        rings: 3,
        persistent: true,
        persistent_budget: Some(16),
        ..Opts::default()
    });
    let mut rng = Rng::new(77);
    // Rings 0 and 1 each keep the same eight pages (the guest's persistent pool): the
    // budget is full, with both caches far below their own limit of 1056.
    for r in 0..2 {
        for i in 0..3 {
            assert_eq!(
                h.write(r, i * 64, &rng.bytes(8 * 4096)).status,
                BLKIF_RSP_OKAY
            );
        }
    }
    let rings = |h: &Harness| -> Vec<u64> {
        h.vbd()
            .stats()
            .rings
            .iter()
            .map(|r| r.persistent_grants_mapped)
            .collect()
    };
    assert_eq!(rings(&h), vec![8, 8, 0]);
    // Ring 2 is refused, and the purge of the idle rings hands their grants over.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while rings(&h)[2] < 8 {
        assert!(
            std::time::Instant::now() < deadline,
            "ring 2 never got grants: {:?}",
            rings(&h)
        );
        let (rsp, _) = h.read(2, 0, 8 * 4096);
        assert_eq!(rsp.status, BLKIF_RSP_OKAY);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(h.vbd().stats().rings[2].persistent_budget_refusals > 0);
    let budget = h.engine.as_ref().unwrap().map_budget().usage();
    assert!(budget.grants <= 16);
    h.verify_disk(0);
    h.teardown();
}

#[test]
fn polling_reactors_serve_rings_and_detach() {
    let _g = serial();
    // Two rings on one reactor that polls after each answered batch: requests pushed
    // while it polls are taken without a notification's wake-up, and detach and
    // shutdown still go through.
    let mut h = Harness::new(Opts {
        rings: 2,
        reactors: 1,
        persistent: true,
        mode: GrantMode::Auto,
        poll: Duration::from_millis(2),
        disk_bytes: 1 << 20,
        ..Opts::default()
    });
    random_io(&mut h, 0, 0xb0b, 40);
    random_io(&mut h, 1, 0xb0c, 40);
    h.verify_disk(0);
    let s = h.vbd().stats().total;
    assert_eq!(s.errors, 0);
    assert!(s.rd_req > 0 && s.wr_req > 0);
    h.teardown();
}

#[test]
fn unsupported_discard_withdraws_the_feature() {
    let _g = serial();
    let faults = FaultInjector::new();
    let mut h = Harness::new(Opts {
        faults: Some(faults.clone()),
        ..Opts::default()
    });
    if !h.vbd().features().discard {
        // The temp directory's file system cannot punch holes: validation already
        // answers EOPNOTSUPP.
        assert_eq!(h.discard(0, 0, 8, false).status, BLKIF_RSP_EOPNOTSUPP);
        h.teardown();
        return;
    }
    faults.add(FaultRule::once(
        OpKind::Discard,
        FaultKind::Error(libc::EOPNOTSUPP),
    ));
    assert_eq!(h.discard(0, 0, 8, false).status, BLKIF_RSP_EOPNOTSUPP);
    assert!(!h.vbd().features().discard);
    assert_eq!(h.discard(0, 0, 8, false).status, BLKIF_RSP_EOPNOTSUPP);
    assert_eq!(h.write(0, 0, &[9; 4096]).status, BLKIF_RSP_OKAY);
    h.verify_disk(0);
    h.teardown();
}

#[test]
fn bad_grants_fail_only_their_request() {
    let _g = serial();
    for (mode, persistent) in [
        (GrantMode::Map, false),
        (GrantMode::Map, true),
        (GrantMode::Copy, false),
    ] {
        let mut h = Harness::new(Opts {
            mode,
            persistent,
            ..Opts::default()
        });
        let bogus = blkif::Segment {
            gref: 9000,
            first_sect: 0,
            last_sect: 7,
        };
        for op in [BLKIF_OP_READ, BLKIF_OP_WRITE] {
            let id = h.id();
            h.push_raw(
                0,
                &blkif::RawRequest::direct(op, id, 0, 0, &[bogus]).unwrap(),
            );
            assert_eq!(h.wait(0, id).status, BLKIF_RSP_ERROR);
        }
        // An indirect request whose descriptor page is not granted.
        let id = h.id();
        h.push_raw(
            0,
            &blkif::RawRequest::indirect(BLKIF_OP_READ, id, 0, 0, 20, &[9001]).unwrap(),
        );
        assert_eq!(h.wait(0, id).status, BLKIF_RSP_ERROR);
        // A READ into a page granted read-only cannot be served.
        let frame = 8000;
        let gref = h.guest.grant_access(0, frame, true).unwrap();
        let seg = blkif::Segment {
            gref,
            first_sect: 0,
            last_sect: 7,
        };
        let id = h.id();
        h.push_raw(
            0,
            &blkif::RawRequest::direct(BLKIF_OP_READ, id, 0, 0, &[seg]).unwrap(),
        );
        assert_eq!(h.wait(0, id).status, BLKIF_RSP_ERROR);
        h.guest.end_access(gref).unwrap();
        // Everything else still works, and nothing stayed mapped.
        assert_eq!(h.write(0, 8, &[3; 8192]).status, BLKIF_RSP_OKAY);
        h.verify_disk(0);
        assert!(h.vbd().stats().total.errors >= 4);
        h.teardown();
    }
}

mod gated {
    //! A storage whose completions are held back until the test opens a gate.
    use std::io;
    use std::os::fd::BorrowedFd;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use storage::{
        Completion, Storage, StorageError, StorageInfo, StorageOp, StorageQueue, SubmitError,
    };

    pub struct Gated {
        pub inner: Arc<dyn Storage>,
        pub open: Arc<AtomicBool>,
    }

    impl Storage for Gated {
        fn info(&self) -> StorageInfo {
            self.inner.info()
        }
        fn refresh_size(&self) -> io::Result<u64> {
            self.inner.refresh_size()
        }
        fn open_queue(&self, depth: u32) -> Result<Box<dyn StorageQueue>, StorageError> {
            Ok(Box::new(GatedQueue {
                inner: self.inner.open_queue(depth)?,
                open: self.open.clone(),
                held: Vec::new(),
            }))
        }
    }

    struct GatedQueue {
        inner: Box<dyn StorageQueue>,
        open: Arc<AtomicBool>,
        held: Vec<(u64, io::Result<u64>)>,
    }

    impl StorageQueue for GatedQueue {
        unsafe fn submit(&mut self, op: StorageOp<'_>, tag: u64) -> Result<(), SubmitError> {
            // SAFETY: forwarded with the caller's guarantees.
            unsafe { self.inner.submit(op, tag) }
        }
        fn commit(&mut self) -> io::Result<()> {
            self.inner.commit()
        }
        fn completion_fd(&self) -> BorrowedFd<'_> {
            self.inner.completion_fd()
        }
        fn wake(&self) -> std::io::Result<()> {
            self.inner.wake()
        }
        fn reap(&mut self, f: Completion<'_>) -> usize {
            let held = &mut self.held;
            self.inner.reap(&mut |t, r| held.push((t, r)));
            if !self.open.load(Ordering::SeqCst) {
                return 0;
            }
            let n = self.held.len();
            for (t, r) in self.held.drain(..) {
                f(t, r);
            }
            n
        }
        fn in_flight(&self) -> u32 {
            self.inner.in_flight() + self.held.len() as u32
        }
        fn depth(&self) -> u32 {
            self.inner.depth()
        }
    }
}

#[test]
fn a_gref_repeated_in_a_request_costs_one_mapping() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let _g = serial();
    // The cache keeps one entry per gref, so mapping a repeated gref once per segment for
    // the cache would make one VMA per segment for nothing: 255 per indirect request, a
    // ring's worth of which would eat the process's map count.
    let open = Arc::new(AtomicBool::new(false));
    let mut h = Harness::new_with_storage(
        Opts {
            persistent: true,
            ..Opts::default()
        },
        |inner| {
            Arc::new(gated::Gated {
                inner,
                open: open.clone(),
            })
        },
    );
    let page: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 253) as u8).collect();
    h.guest.write_page(8000, 0, &page).unwrap();
    let gref = h.guest.grant_access(0, 8000, false).unwrap();
    let seg = blkif::Segment {
        gref,
        first_sect: 0,
        last_sect: 7,
    };
    let direct_id = h.id();
    h.push_raw(
        0,
        &blkif::RawRequest::direct(BLKIF_OP_WRITE, direct_id, 0, 0, &[seg; 11]).unwrap(),
    );
    let descriptors: Vec<u8> = (0..200).flat_map(|_| seg.encode()).collect();
    h.guest.write_page(8001, 0, &descriptors).unwrap();
    let indirect_page = h.guest.grant_access(0, 8001, true).unwrap();
    let indirect_id = h.id();
    h.push_raw(
        0,
        &blkif::RawRequest::indirect(BLKIF_OP_WRITE, indirect_id, 0, 1024, 200, &[indirect_page])
            .unwrap(),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while h.vbd().stats().total.in_flight < 2 {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    // The ring, the kept grant, one batch mapping per request.
    assert!(h.live_mappings() <= 4, "{} mappings", h.live_mappings());
    open.store(true, Ordering::SeqCst);
    // The held completions were signalled already: wake the ring to reap them.
    h.fronts[0].evtchn.notify().unwrap();
    assert_eq!(h.wait(0, direct_id).status, BLKIF_RSP_OKAY);
    assert_eq!(h.wait(0, indirect_id).status, BLKIF_RSP_OKAY);
    h.guest.end_access(indirect_page).unwrap();
    assert_eq!(h.live_mappings(), 2, "the ring and the kept grant");
    for (sector, n) in [(0usize, 11), (1024, 200)] {
        for k in 0..n {
            let at = (sector + k * 8) * SECTOR;
            h.model[at..at + 4096].copy_from_slice(&page);
        }
    }
    h.verify_disk(0);
    h.teardown();
}

#[test]
fn detach_waits_boundedly_and_drains_in_the_background() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let _g = serial();
    let open = Arc::new(AtomicBool::new(false));
    let opts = Opts::default();
    let mut h = Harness::new_with_storage(opts, |inner| {
        Arc::new(gated::Gated {
            inner,
            open: open.clone(),
        })
    });
    let b = h.build(BLKIF_OP_WRITE, 0, &[1; 8192], 8, 0, false);
    h.push(0, &[&b]);
    // Wait until the engine took the request.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while h.vbd().stats().total.in_flight == 0 {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    let vbd = h.vbd.take().unwrap();
    let err = vbd.detach(Duration::from_millis(200)).unwrap_err();
    assert!(matches!(
        err,
        backend::DetachError::Timeout { pending: 1, .. }
    ));
    assert!(
        h.live_mappings() >= 1,
        "nothing unmapped under in-flight I/O"
    );
    // The storage completes: the ring answers, then is dropped.
    open.store(true, Ordering::SeqCst);
    let (rsp, _) = h.complete(0, b);
    assert_eq!(rsp.status, BLKIF_RSP_OKAY);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while h.live_mappings() > 0 {
        assert!(std::time::Instant::now() < deadline, "ring not released");
        std::thread::sleep(Duration::from_millis(10));
    }
    let engine = h.engine.take().unwrap();
    assert!(engine.reactor_loads().iter().all(|&l| l == 0));
    engine.shutdown();
}

#[test]
fn failed_attach_leaves_nothing_behind() {
    use std::sync::Arc;

    use backend::{AttachError, Engine, EngineConfig, RingSpec, VbdSpec};
    use platform::sim::{GuestConfig, SimGuest, SimPlatform};
    use platform::{GrantMapper, Platform};

    let _g = serial();
    let fds_before = harness::FdTable::now();
    {
        let sim = SimPlatform::new();
        let guest = SimGuest::new(harness::GUEST_DOMID, GuestConfig::default()).unwrap();
        let _dom = sim.attach_local(&guest).unwrap();
        let engine = Engine::start(EngineConfig {
            reactors: 1,
            ..Default::default()
        })
        .unwrap();
        let storage: Arc<dyn storage::Storage> =
            Arc::new(storage::NullStorage::new(storage::NullConfig::default()).unwrap());
        let good = guest.grant_access(0, 0, false).unwrap();
        let chan0 = guest.alloc_event_channel(0).unwrap();
        let chan1 = guest.alloc_event_channel(0).unwrap();
        let spec = |rings: Vec<RingSpec>| VbdSpec {
            domid: harness::GUEST_DOMID,
            storage: storage.clone(),
            read_only: false,
            rings,
            protocol: Protocol::Native,
            persistent: false,
            grant_mode: GrantMode::Map,
            features: backend::Features::default(),
            limits: backend::VbdLimits::default(),
            events: None,
            journal: None,
            qos: Default::default(),
        };
        let platform: Arc<dyn Platform> = Arc::new(sim.clone());
        // Ring 0 is fine, ring 1 names a grant that does not exist.
        let err = engine
            .attach(
                spec(vec![
                    RingSpec {
                        ring_refs: vec![good],
                        event_channel: chan0.port(),
                    },
                    RingSpec {
                        ring_refs: vec![4000],
                        event_channel: chan1.port(),
                    },
                ]),
                platform.clone(),
            )
            .err()
            .unwrap();
        assert!(matches!(err, AttachError::MapRing { ring: 1, .. }), "{err}");
        // Three ring pages is not a ring.
        let err = engine
            .attach(
                spec(vec![RingSpec {
                    ring_refs: vec![good, good, good],
                    event_channel: chan0.port(),
                }]),
                platform.clone(),
            )
            .err()
            .unwrap();
        assert!(matches!(
            err,
            AttachError::BadRingPages { ring: 0, count: 3 }
        ));
        assert_eq!(sim.live_mappings(), 0);
        assert_eq!(engine.reactor_loads(), vec![0]);
        // The event channel of ring 0 was unbound: it can be bound again.
        let h = engine
            .attach(
                spec(vec![RingSpec {
                    ring_refs: vec![good],
                    event_channel: chan0.port(),
                }]),
                platform,
            )
            .unwrap();
        h.detach(Duration::from_secs(5)).unwrap();
        assert_eq!(sim.live_mappings(), 0);
        engine.shutdown();
        guest.end_access(good).unwrap();
    }
    fds_before.assert_unchanged("after a failed attach");
}

/// `batches` batches of `depth` indirect requests in flight at once on ring 0, each of
/// 32 pages (128 KiB, Linux blkfront's request size with `max_sectors_kb` 128), writes and
/// reads alternating, each in a 128 KiB region of its own within the batch; reads are
/// checked against the model. After every batch no persistent grant is in use.
fn indirect_batches(h: &mut Harness, rng: &mut Rng, first_batch: usize, batches: usize) {
    const DEPTH: usize = 8;
    const LEN: usize = 32 * 4096;
    let regions = h.model.len() / LEN;
    for batch in first_batch..first_batch + batches {
        let reqs: Vec<_> = (0..DEPTH)
            .map(|k| {
                // Step 5 is coprime with the 32 regions of the 4 MiB disk: distinct.
                let sector = (((batch * 7 + k * 5) % regions) * LEN / SECTOR) as u64;
                if k % 2 == 0 {
                    h.build(BLKIF_OP_WRITE, sector, &rng.bytes(LEN), 8, 0, true)
                } else {
                    h.build(BLKIF_OP_READ, sector, &vec![0; LEN], 8, 0, true)
                }
            })
            .collect();
        h.push(0, &reqs.iter().collect::<Vec<_>>());
        for b in reqs {
            let at = b.sector as usize * SECTOR;
            let (rsp, data) = h.complete(0, b);
            assert_eq!(rsp.status, BLKIF_RSP_OKAY);
            if let Some(data) = data {
                assert!(data == h.model[at..at + LEN], "read mismatch at {at}");
            }
        }
        assert_eq!(
            h.vbd().stats().total.persistent_grants_in_use,
            0,
            "cache entries active between requests"
        );
    }
}

#[test]
fn indirect_pages_come_from_the_persistent_grant_cache() {
    let _g = serial();
    // Linux blkfront with persistent grants takes indirect pages from its pool of
    // persistently granted pages, like data pages: once warm, an indirect request maps
    // (or copies) nothing, as with blkback.
    for mode in [GrantMode::Map, GrantMode::Auto] {
        let mut h = Harness::new(Opts {
            persistent: true,
            mode,
            persistent_budget: Some(4096),
            ..Opts::default()
        });
        let mut rng = Rng::new(0x1d1);
        // Warm-up: the pool's pages are granted and mapped once.
        indirect_batches(&mut h, &mut rng, 0, 1);
        let warm = h.grant_calls.snapshot();
        let before = h.vbd().stats().total;
        assert_eq!(before.indirect_page_misses, 8, "{mode:?}");
        assert_eq!(before.indirect_page_hits, 0);
        let kept = h.live_mappings();
        assert_eq!(kept, 1 + 8 * 33, "the ring and every pool page, once");
        // Steady state: pages move between indirect and data use from one batch to the
        // next (the pool is a stack), and nothing is mapped.
        indirect_batches(&mut h, &mut rng, 1, 20);
        let calls = h.grant_calls.snapshot() - warm;
        assert_eq!(calls, GrantCallCounts::default(), "{mode:?}: grant calls");
        let s = h.vbd().stats().total;
        assert_eq!(s.indirect_page_hits - before.indirect_page_hits, 20 * 8);
        assert_eq!(s.indirect_page_misses, before.indirect_page_misses);
        assert_eq!(
            s.persistent_hits - before.persistent_hits,
            20 * 8 * 33,
            "data and indirect pages"
        );
        assert_eq!(s.persistent_misses, before.persistent_misses);
        assert_eq!(s.persistent_grants_mapped as usize, 8 * 33);
        assert_eq!(h.live_mappings(), kept);
        assert_eq!(s.errors, 0);
        h.verify_disk(0);
        h.teardown();
    }
}

#[test]
fn an_indirect_page_named_as_data_or_twice_is_mapped_once() {
    use blkif::RawRequest;
    let _g = serial();
    let mut h = Harness::new(Opts {
        persistent: true,
        max_indirect: 1024,
        ..Opts::default()
    });
    let seg = |gref, first, last| blkif::Segment {
        gref,
        first_sect: first,
        last_sect: last,
    };
    let page_of = |h: &Harness, frame: u32| {
        let mut b = vec![0u8; 4096];
        h.guest.read_page(frame, 0, &mut b).unwrap();
        b
    };

    // The indirect page is also the request's second data page (hostile, or a frontend
    // reusing its pool): parsed first, free again, then used as data through the same
    // kept mapping.
    let (p_frame, q_frame) = (8000, 8001);
    h.guest.fill_page(p_frame, 0x5a).unwrap();
    let q: Vec<u8> = (0..4096u32).map(|i| (i * 13 % 251) as u8).collect();
    h.guest.write_page(q_frame, 0, &q).unwrap();
    let p = h.guest.grant_access(0, p_frame, false).unwrap();
    let qg = h.guest.grant_access(0, q_frame, false).unwrap();
    let descriptors: Vec<u8> = [seg(qg, 0, 7), seg(p, 0, 7)]
        .iter()
        .flat_map(|s| s.encode())
        .collect();
    h.guest.write_page(p_frame, 0, &descriptors).unwrap();
    let p_bytes = page_of(&h, p_frame);
    let calls = h.grant_calls.snapshot();
    let id = h.id();
    h.push_raw(
        0,
        &RawRequest::indirect(BLKIF_OP_WRITE, id, 0, 0, 2, &[p]).unwrap(),
    );
    assert_eq!(h.wait(0, id).status, BLKIF_RSP_OKAY);
    let d = h.grant_calls.snapshot() - calls;
    assert_eq!((d.map_calls, d.pages), (2, 2), "p once (indirect), q once");
    assert_eq!(h.live_mappings(), 1 + 2);
    h.model[..4096].copy_from_slice(&q);
    h.model[4096..8192].copy_from_slice(&p_bytes);
    let s = h.vbd().stats().total;
    assert_eq!((s.indirect_page_hits, s.indirect_page_misses), (0, 1));
    assert_eq!(s.persistent_grants_in_use, 0);

    // A READ through the same page: the descriptors are read once, before the storage
    // overwrites the page with disk data (a data page of a READ must be writable: the
    // kept mapping is).
    let calls = h.grant_calls.snapshot();
    let id = h.id();
    h.push_raw(
        0,
        &RawRequest::indirect(BLKIF_OP_READ, id, 0, 8, 2, &[p]).unwrap(),
    );
    assert_eq!(h.wait(0, id).status, BLKIF_RSP_OKAY);
    assert_eq!(h.grant_calls.snapshot() - calls, GrantCallCounts::default());
    assert!(
        page_of(&h, q_frame) == p_bytes,
        "q got sectors 8..16 (p's data)"
    );
    assert!(
        page_of(&h, p_frame) == [0; 4096],
        "p got sectors 16..24 (never written)"
    );
    let s = h.vbd().stats().total;
    assert_eq!((s.indirect_page_hits, s.indirect_page_misses), (1, 1));
    assert_eq!(s.persistent_grants_in_use, 0);

    // One gref named as both indirect pages of a 600-segment request: one lookup, one
    // mapping, each page still read once (the second page's descriptors are the first
    // page's first 88).
    let i_frame = 8002;
    let data_frames = [8003, 8004, 8005, 8006];
    let data_grefs: Vec<u32> = data_frames
        .iter()
        .map(|&f| {
            h.guest.fill_page(f, f as u8).unwrap();
            h.guest.grant_access(0, f, false).unwrap()
        })
        .collect();
    let descs: Vec<blkif::Segment> = (0..512)
        .map(|k| {
            let sect = ((k / 4) % 8) as u8;
            seg(data_grefs[k % 4], sect, sect)
        })
        .collect();
    let bytes: Vec<u8> = descs.iter().flat_map(|s| s.encode()).collect();
    h.guest.write_page(i_frame, 0, &bytes).unwrap();
    let i = h.guest.grant_access(0, i_frame, false).unwrap();
    let before = h.live_mappings();
    let id = h.id();
    let sector = 1024u64;
    h.push_raw(
        0,
        &RawRequest::indirect(BLKIF_OP_WRITE, id, 0, sector, 600, &[i, i]).unwrap(),
    );
    assert_eq!(h.wait(0, id).status, BLKIF_RSP_OKAY);
    let s = h.vbd().stats().total;
    assert_eq!((s.indirect_page_hits, s.indirect_page_misses), (1, 2));
    assert_eq!(s.persistent_grants_in_use, 0);
    assert_eq!(
        h.live_mappings(),
        before + 1 + 4,
        "i and the four data pages, kept"
    );
    for k in 0..600 {
        let d = descs[k % 512];
        let at = (sector as usize + k) * SECTOR;
        h.model[at..at + SECTOR].fill(data_frames[k % 512 % 4] as u8);
        assert_eq!(d.first_sect, ((k % 512 / 4) % 8) as u8);
    }
    h.verify_disk(0);
    h.teardown();
}

#[test]
fn read_only_indirect_pages_are_read_for_their_request_only() {
    use blkif::RawRequest;
    let _g = serial();
    // A frontend granting its indirect pages read-only although persistent grants are
    // on: blkback's writable map would fail the request; here the first refusal moves the
    // ring's indirect pages to per-request read-only maps (or copies), so later requests
    // do not pay a failing map each.
    for mode in [GrantMode::Map, GrantMode::Auto] {
        let mut h = Harness::new(Opts {
            persistent: true,
            mode,
            ..Opts::default()
        });
        let data_frame = 8000;
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 3 % 241) as u8).collect();
        h.guest.write_page(data_frame, 0, &data).unwrap();
        let d = h.guest.grant_access(0, data_frame, false).unwrap();
        let descs: Vec<u8> = (0..12)
            .flat_map(|_| {
                blkif::Segment {
                    gref: d,
                    first_sect: 0,
                    last_sect: 7,
                }
                .encode()
            })
            .collect();
        h.guest.write_page(8001, 0, &descs).unwrap();
        let ind = h.guest.grant_access(0, 8001, true).unwrap();
        let mut failed = Vec::new();
        for round in 0..3u64 {
            let calls = h.grant_calls.snapshot();
            let id = h.id();
            h.push_raw(
                0,
                &RawRequest::indirect(BLKIF_OP_WRITE, id, 0, round * 96, 12, &[ind]).unwrap(),
            );
            assert_eq!(h.wait(0, id).status, BLKIF_RSP_OKAY, "{mode:?}");
            failed.push((h.grant_calls.snapshot() - calls).failed);
            for k in 0..12 {
                let at = (round as usize * 96 + k * 8) * SECTOR;
                h.model[at..at + 4096].copy_from_slice(&data);
            }
        }
        assert_eq!(
            failed,
            [1, 0, 0],
            "{mode:?}: one refused writable map, then none"
        );
        let s = h.vbd().stats().total;
        assert_eq!(s.errors, 0);
        assert_eq!(s.persistent_grants_in_use, 0);
        h.guest.end_access(ind).unwrap();
        h.verify_disk(0);
        h.teardown();
    }
}

/// Issue 14, item 4: a panic inside one ring (injected: the `fault-injection` feature,
/// which no daemon build has) halts that ring only. Its owner hears of it as a halted ring
/// (which fails the device), the reactor goes on, and another guest's VBD on the same
/// reactor keeps doing verified I/O; the panicked ring is still released on detach.
#[test]
fn a_panic_in_one_ring_halts_only_that_ring() {
    let _g = serial();
    let mut good = Harness::new(Opts {
        reactors: 1,
        rings: 2,
        ..Opts::default()
    });
    let mut bad = good.another_guest(
        9,
        Opts {
            reactors: 1,
            ..Opts::default()
        },
    );
    assert_eq!(bad.write(0, 0, &[1; 4096]).status, BLKIF_RSP_OKAY);
    random_io(&mut good, 0, 1, 20);

    backend::fault::panic_next_pass(bad.vbd().id(), 0);
    // Wake the ring: a request it will never take.
    let b = bad.build(BLKIF_OP_WRITE, 8, &[2; 4096], 8, 0, false);
    bad.push(0, &[&b]);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while bad.vbd().stats().rings[0].halted_rings == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "panicked ring not halted"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let reason = bad
        .events
        .lock()
        .unwrap()
        .iter()
        .find_map(|e| match e {
            VbdEvent::RingHalted { ring: 0, reason } => Some(reason.clone()),
            _ => None,
        })
        .expect("the owner hears of the panic");
    assert!(
        reason.contains("panic") && reason.contains("injected"),
        "{reason}"
    );

    // The reactor and the other guest's rings carry on.
    random_io(&mut good, 0, 2, 40);
    random_io(&mut good, 1, 3, 40);
    good.verify_disk(0);
    assert_eq!(good.vbd().stats().total.halted_rings, 0);

    // The panicked ring is dropped on detach like any other: mappings released.
    let vbd = bad.vbd.take().unwrap();
    vbd.detach(Duration::from_secs(10)).unwrap();
    drop(bad);
    good.teardown();
}

/// Issue 14: a daemon hands over (or is killed before it answered anything it took), the
/// guest keeps submitting meanwhile, and a new engine attached to the same rings (what an
/// adoption does) executes every request the frontend has not seen answered: those the
/// dead process had consumed and those it never saw. Each gets exactly one response, and
/// the data is right.
#[test]
fn a_new_engine_resumes_rings_left_mid_io() {
    let _g = serial();
    for persistent in [true, false] {
        let mut h = Harness::new(Opts {
            persistent,
            ..Opts::default()
        });
        random_io(&mut h, 0, 11, 10);
        h.stop_engine();

        // The guest goes on: writes to sectors 0..32 pages, reads of the rest (requests in
        // flight together never overlap, as the block layer guarantees).
        let mut rng = Rng::new(12);
        let mut built = Vec::new();
        for i in 0..12u64 {
            let b = if i % 2 == 0 {
                let data = rng.bytes(4096);
                h.build(BLKIF_OP_WRITE, i * 8, &data, 8, 0, false)
            } else {
                h.build(BLKIF_OP_READ, 256 + i * 8, &[0; 4096], 8, 0, false)
            };
            built.push(b);
        }
        let refs: Vec<&_> = built.iter().collect();
        h.push(0, &refs);
        // A process killed after taking the first five off the ring, before answering.
        h.consume_as_dead_backend(0, 5);

        h.start_engine();
        for b in built {
            let at = b.sector as usize * SECTOR;
            let (rsp, data) = h.complete(0, b);
            assert_eq!(rsp.status, BLKIF_RSP_OKAY);
            if let Some(d) = data {
                assert!(
                    d == h.model[at..at + 4096],
                    "read at {at} differs from the model"
                );
            }
        }
        assert!(
            h.responses(0, Duration::from_millis(200)).is_empty(),
            "a request was answered twice"
        );
        h.verify_disk(0);
        h.teardown();
    }
}

/// `reactor_cpus` pins each reactor to its CPU (round robin), and a CPU the machine does
/// not have fails the engine's start instead of leaving a reactor wherever it landed.
#[test]
fn reactors_run_on_the_cpus_they_are_given() {
    use backend::{Engine, EngineConfig};
    use std::collections::HashMap;
    // Reactor threads of this process (the kernel keeps 15 bytes of a thread's name) and
    // the CPUs each may run on.
    let reactors = || -> HashMap<String, String> {
        let mut found = HashMap::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim() != "xenblkd-reactor" {
                continue;
            }
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            if let Some(cpus) = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            {
                found.insert(
                    task.file_name().to_string_lossy().into_owned(),
                    cpus.trim().to_string(),
                );
            }
        }
        found
    };
    let _g = serial();
    let before = reactors();
    let engine = Engine::start(EngineConfig {
        reactors: 2,
        reactor_cpus: vec![0],
    })
    .unwrap();
    let ours: Vec<String> = reactors()
        .into_iter()
        .filter(|(tid, _)| !before.contains_key(tid))
        .map(|(_, cpus)| cpus)
        .collect();
    // Two reactors, the second back at the start of the list.
    assert_eq!(ours, ["0", "0"]);
    drop(engine);
    let Err(e) = Engine::start(EngineConfig {
        reactors: 1,
        reactor_cpus: vec![1023],
    }) else {
        panic!("CPU 1023 is not on this machine, yet the engine started");
    };
    assert!(e.to_string().contains("CPU 1023"), "{e}");
}
