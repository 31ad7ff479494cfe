//! End-to-end: blkfront against the real engine on the simulator, a temp file as the
//! disk, every read checked byte for byte against a model, every teardown checked for
//! leaks (grants, guest pages, mappings, fds).

mod common;

use std::time::{Duration, Instant};

use backend::{Features, GrantMode};
use blkfront::{
    BufferPlacement, CacheControl, Completion, Error, FlushPreference, FrontendConfig, IoError,
    Protocol, QueuePolicy,
};
use common::{serial, Rig, RigOpts};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[test]
fn smoke_write_read() {
    let _g = serial();
    let mut rig = Rig::new(RigOpts::default());
    let data: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    rig.write(4096, &data);
    rig.check(0, 512 * 1024);
    rig.fe().flush().unwrap();
    rig.finish();
}

/// Random reads and writes of random sizes and alignments, synchronous and asynchronous.
fn workload(rig: &mut Rig, rng: &mut StdRng, ops: usize) {
    let disk = rig.model.len() as u64;
    let max_sectors = (rig.fe().max_request_bytes() / 512) * 3;
    for _ in 0..ops {
        let sectors = match rng.gen_range(0..10) {
            0..=5 => rng.gen_range(1..=16),
            6..=8 => rng.gen_range(1..=max_sectors as u64),
            _ => rng.gen_range(1..=8) * 8,
        };
        let len = sectors * 512;
        let offset = rng.gen_range(0..(disk - len) / 512) * 512;
        match rng.gen_range(0..10) {
            0..=3 => {
                let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                rig.write(offset, &data);
            }
            4..=7 => rig.check(offset, len as usize),
            8 => rig.fe().flush().unwrap(),
            _ => async_burst(rig, rng),
        }
    }
    // A final full verification.
    rig.check(0, disk as usize);
}

/// Non-overlapping asynchronous writes on every queue, then reads of the same ranges.
fn async_burst(rig: &mut Rig, rng: &mut StdRng) {
    let fe_queues = rig.fe().num_queues();
    let max = rig.fe().max_request_bytes().min(64 * 1024) / 512;
    let mut spans = Vec::new();
    let mut at = rng.gen_range(0..64u64) * 512;
    for i in 0..8u64 {
        let len = rng.gen_range(1..=max as u64) * 512;
        if at + len > rig.model.len() as u64 {
            break;
        }
        spans.push((i, at, len as usize));
        at += len + rng.gen_range(0..8u64) * 512;
    }
    for &(t, off, len) in &spans {
        let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        rig.fe()
            .submit_write(t as usize % fe_queues, off, &data, t)
            .unwrap();
        rig.model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    let done = collect(rig, spans.len());
    assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
    for &(t, off, len) in &spans {
        rig.fe()
            .submit_read(t as usize % fe_queues, off, len, t)
            .unwrap();
    }
    for c in collect(rig, spans.len()) {
        let (_, off, len) = spans[c.token as usize];
        assert_eq!(c.result, Ok(()));
        assert!(
            c.data == rig.model[off as usize..off as usize + len],
            "async read {c:?}"
        );
    }
}

fn collect(rig: &Rig, n: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.len() < n {
        assert!(Instant::now() < deadline, "completions missing");
        for q in 0..rig.fe().num_queues() {
            rig.fe().poll_completions(q, &mut out).unwrap();
        }
        if out.len() < n {
            rig.fe()
                .wait_completions(0, &mut out, Duration::from_millis(1))
                .unwrap();
        }
    }
    out
}

fn matrix_for(protocol: Protocol, seed: u64) {
    let _g = serial();
    let placements = [
        BufferPlacement::PageAligned,
        BufferPlacement::FollowDiskOffset,
        BufferPlacement::SectorOffset(5),
    ];
    let mut combo = 0u64;
    for order in 0..=4u32 {
        for queues in [1u32, 4] {
            for persistent in [false, true] {
                for mode in [GrantMode::Map, GrantMode::Copy] {
                    for indirect in [0u32, 64] {
                        combo += 1;
                        let opts = RigOpts {
                            frontend: FrontendConfig {
                                protocol,
                                max_queues: queues,
                                max_ring_order: order,
                                persistent,
                                max_indirect_segments: indirect,
                                placement: placements[combo as usize % 3],
                                queue_policy: QueuePolicy::RoundRobin,
                                ..RigOpts::default().frontend
                            },
                            mode,
                            disk_bytes: 1 << 20,
                            ..RigOpts::default()
                        };
                        let mut rig = Rig::new(opts);
                        let n = rig.fe().negotiated();
                        assert_eq!(n.ring_order, order);
                        assert_eq!(n.queues, queues);
                        assert_eq!(n.persistent, persistent);
                        assert_eq!(n.max_indirect_segments, indirect);
                        assert_eq!(rig.fe().queue_depth(), 32 << order);
                        let mut rng = StdRng::seed_from_u64(seed ^ combo);
                        workload(&mut rig, &mut rng, 25);
                        rig.finish();
                    }
                }
            }
        }
    }
}

#[test]
fn matrix_native() {
    matrix_for(Protocol::Native, 1);
}

#[test]
fn matrix_x86_32() {
    matrix_for(Protocol::X86_32, 2);
}

#[test]
fn matrix_x86_64() {
    matrix_for(Protocol::X86_64, 3);
}

#[test]
fn flush_and_barrier_reach_the_backend() {
    let _g = serial();
    for (pref, features, want) in [
        (
            FlushPreference::PreferFlush,
            (true, true),
            CacheControl::Flush,
        ),
        (
            FlushPreference::PreferBarrier,
            (true, true),
            CacheControl::Barrier,
        ),
        (
            FlushPreference::PreferFlush,
            (false, true),
            CacheControl::Barrier,
        ),
        (
            FlushPreference::PreferFlush,
            (false, false),
            CacheControl::None,
        ),
    ] {
        let mut rig = Rig::new(RigOpts {
            frontend: FrontendConfig {
                flush: pref,
                ..RigOpts::default().frontend
            },
            features: Features {
                flush: features.0,
                barrier: features.1,
                discard: false,
                secure_discard: false,
            },
            ..RigOpts::default()
        });
        assert_eq!(rig.fe().negotiated().cache, want);
        rig.write(0, &[7u8; 8192]);
        rig.fe().flush().unwrap();
        rig.fe().submit_flush(0, 1).unwrap();
        let c = collect(&rig, 1);
        assert_eq!(c[0].result, Ok(()));
        let f_req = rig.vbd.as_ref().unwrap().stats().total.f_req;
        let expected = if want == CacheControl::None { 0 } else { 2 };
        assert_eq!(f_req, expected, "{pref:?} {features:?}");
        rig.check(0, 8192);
        rig.finish();
    }
}

#[test]
fn discarded_ranges_read_back_as_zeros() {
    let _g = serial();
    let mut rig = Rig::new(RigOpts::default());
    if rig.fe().negotiated().discard.is_none() {
        // Discard needs storage support; the rig advertises it, so this is a failure.
        panic!("discard not negotiated");
    }
    let data = vec![0xABu8; 256 * 1024];
    rig.write(0, &data);
    rig.fe().discard(64 * 1024, 128 * 1024, false).unwrap();
    rig.model[64 * 1024..192 * 1024].fill(0);
    rig.check(0, 256 * 1024);
    assert!(matches!(
        rig.fe().discard(0, 4096, true),
        Err(Error::NotSupported("secure discard"))
    ));
    assert_eq!(rig.vbd.as_ref().unwrap().stats().total.ds_req, 1);
    rig.finish();
}

#[test]
fn a_read_only_disk_refuses_writes_at_the_backend() {
    let _g = serial();
    let rig = Rig::new(RigOpts {
        read_only: true,
        frontend: FrontendConfig {
            honour_read_only: false,
            ..RigOpts::default().frontend
        },
        ..RigOpts::default()
    });
    assert!(rig.fe().disk().read_only());
    let e = rig.fe().write(0, &[1u8; 4096]).unwrap_err();
    assert!(matches!(e, Error::Io(IoError::Failed)), "{e:?}");
    let mut buf = vec![1u8; 4096];
    rig.fe().read(0, &mut buf).unwrap();
    assert_eq!(buf, vec![0u8; 4096]);
    rig.finish();
}

#[test]
fn a_resize_is_seen_by_the_guest() {
    let _g = serial();
    let mut rig = Rig::new(RigOpts::default());
    let old = rig.fe().capacity();
    let mut buf = vec![0u8; 4096];
    assert!(matches!(
        rig.fe().read(old, &mut buf),
        Err(Error::OutOfRange { .. })
    ));
    rig.disk.as_file().set_len(old * 2).unwrap();
    let sectors = rig.vbd.as_ref().unwrap().refresh_size().unwrap();
    assert_eq!(sectors, old * 2 / 512);
    // In direct mode the test carries `sectors` to the guest; over xenstore the
    // backend-state watch does.
    rig.fe().set_capacity_sectors(sectors);
    rig.model.resize(old as usize * 2, 0);
    rig.write(old + 4096, &[9u8; 8192]);
    rig.check(old - 4096, 16384);
    rig.finish();
}

/// 100 random reads and writes of 1..=`max_sectors` sectors inside `region` bytes at
/// `base`, each read checked against what this thread wrote; `after_each` runs after every
/// request (invariants to hold throughout).
fn random_verified_io(
    fe: &blkfront::Frontend,
    seed: u64,
    base: u64,
    region: usize,
    max_sectors: usize,
    after_each: impl Fn(),
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = vec![0u8; region];
    for _ in 0..100 {
        let len = rng.gen_range(1..=max_sectors) * 512;
        let off = rng.gen_range(0..(region - len) / 512) * 512;
        if rng.gen_bool(0.5) {
            let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            fe.write(base + off as u64, &data).unwrap();
            model[off..off + len].copy_from_slice(&data);
        } else {
            let mut buf = vec![0u8; len];
            fe.read(base + off as u64, &mut buf).unwrap();
            assert!(
                buf == model[off..off + len],
                "read mismatch at {}",
                base + off as u64
            );
        }
        after_each();
    }
}

#[test]
fn many_threads_share_the_queues() {
    let _g = serial();
    for queues in [1u32, 4] {
        let rig = Rig::new(RigOpts {
            frontend: FrontendConfig {
                max_queues: queues,
                queue_policy: QueuePolicy::PerThread,
                ..RigOpts::default().frontend
            },
            ..RigOpts::default()
        });
        let region = rig.model.len() / 4;
        std::thread::scope(|s| {
            for t in 0..4usize {
                let fe = rig.fe();
                s.spawn(move || {
                    random_verified_io(fe, t as u64, (t * region) as u64, region, 64, || {})
                });
            }
        });
        rig.finish();
    }
}

#[test]
fn a_tiny_persistent_grant_budget_costs_persistence_not_requests() {
    let _g = serial();
    for mode in [GrantMode::Map, GrantMode::Auto] {
        // Four queues of blkfront's persistent pools against a budget of 32 grants for
        // the whole engine: every request still completes with the right data.
        let rig = Rig::new(RigOpts {
            frontend: FrontendConfig {
                max_queues: 4,
                queue_policy: QueuePolicy::PerThread,
                ..RigOpts::default().frontend
            },
            mode,
            persistent_budget: Some(32),
            ..RigOpts::default()
        });
        assert!(rig.fe().negotiated().persistent);
        let budget = rig.engine.as_ref().unwrap().map_budget().clone();
        let region = rig.model.len() / 4;
        std::thread::scope(|s| {
            for t in 0..4usize {
                let fe = rig.fe();
                let budget = &budget;
                s.spawn(move || {
                    let seed = 0xb0d + t as u64;
                    random_verified_io(fe, seed, (t * region) as u64, region, 128, || {
                        let u = budget.usage();
                        assert!(u.grants <= 32, "{mode:?}: budget exceeded: {u:?}");
                    })
                });
            }
        });
        let s = rig.vbd.as_ref().unwrap().stats().total;
        assert_eq!(s.errors, 0);
        assert!(s.persistent_grants_mapped <= 32);
        assert!(
            s.persistent_budget_refusals > 0,
            "{mode:?}: the budget never refused"
        );
        // `finish` checks that the budget is back to zero after the detach.
        rig.finish();
        assert_eq!(budget.usage().grants, 0);
    }
}

#[test]
fn queue_depth_32_per_queue_from_one_thread() {
    let _g = serial();
    let rig = Rig::new(RigOpts {
        frontend: FrontendConfig {
            max_queues: 4,
            ..RigOpts::default().frontend
        },
        ..RigOpts::default()
    });
    let fe = rig.fe();
    let qd = fe.queue_depth();
    assert_eq!(qd, 32);
    let mut submitted = 0u64;
    let mut done = 0u64;
    let total = 2000u64;
    let mut out = Vec::new();
    let mut inflight = [0usize; 4];
    let deadline = Instant::now() + Duration::from_secs(30);
    while done < total {
        assert!(Instant::now() < deadline);
        for (q, n) in inflight.iter_mut().enumerate() {
            while *n < qd && submitted < total {
                let off = (submitted % 1024) * 4096;
                fe.submit_read(q, off, 4096, submitted).unwrap();
                *n += 1;
                submitted += 1;
            }
        }
        for (q, n) in inflight.iter_mut().enumerate() {
            out.clear();
            let got = fe.poll_completions(q, &mut out).unwrap();
            assert!(out.iter().all(|c| c.result.is_ok() && c.data.len() == 4096));
            *n -= got;
            done += got as u64;
        }
        if done < total {
            out.clear();
            let _ = fe.wait_completions(0, &mut out, Duration::from_micros(200));
            if !out.is_empty() {
                inflight[0] -= out.len();
                done += out.len() as u64;
                out.clear();
            }
        }
    }
    let s = fe.stats();
    assert_eq!(s.requests, total);
    rig.finish();
}

#[test]
fn batches_publish_once_and_can_skip_the_guest_copies() {
    let _g = serial();
    let mut rig = Rig::new(RigOpts::default());
    let mut rng = StdRng::seed_from_u64(77);
    let spans: Vec<(u64, Vec<u8>)> = (0..16u64)
        .map(|i| (i * 12288, (0..8192).map(|_| rng.gen()).collect()))
        .collect();
    let requests_before = rig.fe().stats().requests;
    let notifications_before = rig.fe().stats().notifications;
    {
        let mut b = rig.fe().batch(0).unwrap();
        for (i, (off, data)) in spans.iter().enumerate() {
            b.write(*off, data, i as u64).unwrap();
        }
        // Nothing is published before the commit.
        assert_eq!(rig.fe().stats().notifications, notifications_before);
        b.commit().unwrap();
    }
    let stats = rig.fe().stats();
    assert_eq!(stats.requests - requests_before, 16);
    assert!(stats.notifications - notifications_before <= 1, "{stats:?}");
    let done = collect(&rig, 16);
    assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
    for (off, data) in &spans {
        rig.model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    // Reads in one batch: copied out, or discarded.
    {
        let mut b = rig.fe().batch(0).unwrap();
        for (i, (off, data)) in spans.iter().enumerate() {
            let mode = if i % 2 == 0 {
                blkfront::ReadData::Copy
            } else {
                blkfront::ReadData::Discard
            };
            b.read(*off, data.len(), i as u64, mode).unwrap();
        }
    }
    let mut done = collect(&rig, 16);
    done.sort_by_key(|c| c.token);
    for (c, (_, data)) in done.iter().zip(&spans) {
        assert!(c.result.is_ok(), "{c:?}");
        if c.token % 2 == 0 {
            assert_eq!(&c.data, data);
        } else {
            assert!(c.data.is_empty());
        }
    }
    // A write in place sends what the granted pages hold; the disk then has those bytes.
    {
        let mut b = rig.fe().batch(0).unwrap();
        b.write_in_place(1 << 20, 4096, 99).unwrap();
        b.commit().unwrap();
    }
    let done = collect(&rig, 1);
    assert!(done[0].result.is_ok() && done[0].data.is_empty());
    let mut now = vec![0u8; 4096];
    rig.fe().read(1 << 20, &mut now).unwrap();
    rig.model[1 << 20..(1 << 20) + 4096].copy_from_slice(&now);
    // Reaping inside a batch sees nothing more.
    {
        let mut b = rig.fe().batch(0).unwrap();
        let mut out = Vec::new();
        assert_eq!(b.reap(&mut out).unwrap(), 0);
        assert!(b.free_slots() > 0);
    }
    rig.check(0, 2 << 20);
    rig.finish();
}

/// The verified workload against the real engine: with nothing going wrong under it,
/// every request completes and every read matches what the model says was written.
#[test]
fn verified_workload_reads_back_what_it_wrote() {
    let _g = serial();
    let rig = Rig::new(RigOpts::default());
    let cfg = blkfront::workload::WorkloadConfig {
        seed: 7,
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut stop = || Instant::now() >= deadline;
    let report = blkfront::workload::run_verified(rig.fe(), &cfg, &mut stop, &mut |_| {});
    assert_eq!(report.errors, 0, "{:?}", report.first_problem);
    assert_eq!(report.mismatches, 0, "{:?}", report.first_problem);
    assert!(report.reads > 0 && report.writes > 0, "{report:?}");
    rig.finish();
}

/// The fixed-depth load against the real engine: requests complete, none fails, both
/// kinds are counted, and it stops when told.
#[test]
fn fixed_depth_load_counts_what_completed() {
    let _g = serial();
    let rig = Rig::new(RigOpts::default());
    let cfg = blkfront::load::LoadConfig {
        depth: 16,
        write_percent: 50,
        seed: 3,
        ..Default::default()
    };
    // The deadline starts at the first `stop()` call, which `run_load` makes after
    // taking its own start time: a deadline taken here could end a few microseconds
    // before `elapsed` reaches 300 ms.
    let mut deadline = None;
    let mut stop = || {
        let d = *deadline.get_or_insert_with(|| Instant::now() + Duration::from_millis(300));
        Instant::now() >= d
    };
    let report = blkfront::load::run_load(rig.fe(), &cfg, &mut stop);
    assert_eq!(report.errors, 0, "{:?}", report.first_problem);
    assert!(report.reads > 0 && report.writes > 0, "{report:?}");
    assert_eq!(report.ops(), report.reads + report.writes);
    assert!(
        report.elapsed >= Duration::from_millis(300) && report.elapsed < Duration::from_secs(5),
        "{report:?}"
    );
    // A request that does not fit the disk is refused at submission: counted, not hidden.
    let big = blkfront::load::LoadConfig {
        block_size: 8 << 20,
        ..cfg
    };
    let report = blkfront::load::run_load(rig.fe(), &big, &mut || true);
    assert_eq!(report.ops(), 0);
    assert_eq!(report.errors, 1, "{report:?}");
    rig.finish();
}
