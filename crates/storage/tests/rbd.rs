//! The RBD backend against a real single-node Ceph cluster (scripts/ceph-cluster: one
//! monitor, one memstore OSD), started once for this test binary.

mod common;

use std::time::{Duration, Instant};

use common::{filled, read_back, run_one, wait_for};
use storage::rbd::testing::{fault_guard, io_guard, Cluster};
use storage::rbd::RbdOpenError;
use storage::{
    AlignedBuf, RbdConfig, RbdStorage, Storage, StorageKind, StorageOp, StorageQueue, SubmitError,
};

const MIB: usize = 1 << 20;

fn open(target: &str) -> RbdStorage {
    RbdStorage::open(target, RbdConfig::default()).unwrap_or_else(|e| panic!("{target}: {e}"))
}

fn write_at(q: &mut dyn StorageQueue, offset: u64, data: &mut AlignedBuf) {
    let iov = [data.full_iovec()];
    // SAFETY: `data` outlives the operation.
    let res = unsafe {
        run_one(
            q,
            StorageOp::Write {
                offset,
                iov: &iov,
                fua: false,
            },
        )
    }
    .unwrap();
    assert_eq!(res.unwrap(), data.len() as u64);
}

/// The image's bytes as the cluster has them (`rbd export`), not through our client.
fn exported(c: &Cluster, name: &str, offset: usize, len: usize) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("img");
    c.rbd(&["export", &format!("rbd/{name}"), out.to_str().unwrap()])
        .unwrap();
    std::fs::read(out).unwrap()[offset..offset + len].to_vec()
}

#[test]
fn reads_writes_flushes_and_discards() {
    let _g = io_guard();
    let c = Cluster::shared();
    let name = c.unique_name("rw");
    let s = open(&c.create_image(&name, 64).unwrap());
    let info = s.info();
    assert_eq!(info.kind, StorageKind::Rbd);
    assert_eq!(info.size_bytes, 64 * MIB as u64);
    assert_eq!(
        (info.logical_block_size, info.physical_block_size),
        (512, 4096)
    );
    assert!(info.flush && info.discard && !info.read_only && !info.secure_discard);
    // librbd's default: partial discards below rbd_discard_granularity_bytes are skipped.
    assert_eq!(info.discard_granularity, 65536);
    assert_eq!(s.object_size(), 4 * MIB as u64);
    let mut q = s.open_queue(32).unwrap();

    // A never-written image reads as zeros.
    assert!(read_back(&mut *q, 0, 8192).iter().all(|&b| b == 0));

    // A write from three buffers lands in order, across an object boundary.
    let offset = 4 * MIB as u64 - 4096;
    let mut a = filled(4096, 1);
    let mut b = filled(8192, 2);
    let mut d = filled(512, 3);
    let iov = [a.full_iovec(), b.full_iovec(), d.full_iovec()];
    // SAFETY: the buffers outlive the operation.
    let res = unsafe {
        run_one(
            &mut *q,
            StorageOp::Write {
                offset,
                iov: &iov,
                fua: true,
            },
        )
    };
    assert_eq!(res.unwrap().unwrap(), 12800);
    let expected: Vec<u8> = [a.as_slice(), b.as_slice(), d.as_slice()].concat();
    // Read back scattered into two buffers split elsewhere.
    let mut r1 = AlignedBuf::page_aligned(5120);
    let mut r2 = AlignedBuf::page_aligned(7680);
    let iov = [r1.full_iovec(), r2.full_iovec()];
    // SAFETY: the buffers outlive the operation.
    let res = unsafe { run_one(&mut *q, StorageOp::Read { offset, iov: &iov }) };
    assert_eq!(res.unwrap().unwrap(), 12800);
    assert_eq!([r1.as_slice(), r2.as_slice()].concat(), expected);
    assert_eq!(
        // SAFETY: a flush or discard names no guest memory.
        unsafe { run_one(&mut *q, StorageOp::Flush) }
            .unwrap()
            .unwrap(),
        0
    );
    assert_eq!(
        exported(c, &name, offset as usize, expected.len()),
        expected
    );

    // Discard of a granularity-aligned range reads back as zeros; the data around it stays.
    let mut big = filled(3 * MIB, 9);
    write_at(&mut *q, 8 * MIB as u64, &mut big);
    let discard = StorageOp::Discard {
        offset: 9 * MIB as u64,
        len: MIB as u64,
        secure: false,
    };
    assert_eq!(
        // SAFETY: a flush or discard names no guest memory.
        unsafe { run_one(&mut *q, discard) }.unwrap().unwrap(),
        MIB as u64
    );
    let back = read_back(&mut *q, 8 * MIB as u64, 3 * MIB);
    assert_eq!(back[..MIB], big.as_slice()[..MIB]);
    assert!(back[MIB..2 * MIB].iter().all(|&b| b == 0));
    assert_eq!(back[2 * MIB..], big.as_slice()[2 * MIB..]);

    // Secure discard is not offered; out-of-range and misaligned operations are refused.
    let mut one = AlignedBuf::page_aligned(4096);
    let iov = [one.full_iovec()];
    // SAFETY: refused at submission: nothing reaches librbd.
    unsafe {
        assert!(matches!(
            q.submit(
                StorageOp::Discard {
                    offset: 0,
                    len: 4096,
                    secure: true
                },
                1
            ),
            Err(SubmitError::Unsupported(_))
        ));
        assert!(matches!(
            q.submit(
                StorageOp::Read {
                    offset: 64 * MIB as u64,
                    iov: &iov
                },
                2
            ),
            Err(SubmitError::OutOfRange { .. })
        ));
        assert!(matches!(
            q.submit(
                StorageOp::Read {
                    offset: 7,
                    iov: &iov
                },
                3
            ),
            Err(SubmitError::Invalid(_))
        ));
    }
    assert_eq!(q.in_flight(), 0);
}

#[test]
fn resize_is_seen_by_refresh_size() {
    let _g = io_guard();
    let c = Cluster::shared();
    let name = c.unique_name("resize");
    let s = open(&c.create_image(&name, 16).unwrap());
    let mut q = s.open_queue(8).unwrap();
    assert_eq!(s.refresh_size().unwrap(), 16 * MIB as u64);
    c.resize_image(&name, 24).unwrap();
    // librbd learns of it through the header watch, asynchronously.
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.refresh_size().unwrap() != 24 * MIB as u64 {
        assert!(Instant::now() < deadline, "resize not seen");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(s.info().size_bytes, 24 * MIB as u64);
    // The queue takes I/O in the new range at once.
    let mut data = filled(4096, 5);
    write_at(&mut *q, 20 * MIB as u64, &mut data);
    assert_eq!(
        read_back(&mut *q, 20 * MIB as u64, 4096),
        data.as_slice().to_vec()
    );
}

#[test]
fn read_only_images_and_snapshots_refuse_writes() {
    let _g = io_guard();
    let c = Cluster::shared();
    let name = c.unique_name("ro");
    let target = c.create_image(&name, 8).unwrap();
    let mut data = filled(8192, 7);
    {
        let s = open(&target);
        let mut q = s.open_queue(4).unwrap();
        write_at(&mut *q, 0, &mut data);
    }
    c.rbd(&["snap", "create", &format!("rbd/{name}@s1")])
        .unwrap();
    let ro = RbdStorage::open(
        &target,
        RbdConfig {
            read_only: true,
            ..RbdConfig::default()
        },
    )
    .unwrap();
    let snap_target = target.replacen(&name, &format!("{name}@s1"), 1);
    let snap = open(&snap_target);
    for s in [&ro, &snap] {
        let info = s.info();
        assert!(info.read_only && !info.discard && !info.flush, "{info:?}");
        let mut q = s.open_queue(4).unwrap();
        assert_eq!(read_back(&mut *q, 0, 8192), data.as_slice().to_vec());
        let iov = [data.full_iovec()];
        // SAFETY: refused at submission.
        let r = unsafe {
            q.submit(
                StorageOp::Write {
                    offset: 0,
                    iov: &iov,
                    fua: false,
                },
                1,
            )
        };
        assert_eq!(r, Err(SubmitError::ReadOnly));
        // A flush on a read-only disk succeeds (nothing to write back).
        // SAFETY: no buffers.
        assert_eq!(
            // SAFETY: a flush or discard names no guest memory.
            unsafe { run_one(&mut *q, StorageOp::Flush) }
                .unwrap()
                .unwrap(),
            0
        );
    }
    assert!(snap.target().snapshot.is_some());
}

#[test]
fn many_in_flight_and_full_beyond_depth() {
    let _g = io_guard();
    let c = Cluster::shared();
    let s = open(&c.create_image(&c.unique_name("depth"), 16).unwrap());
    const DEPTH: u32 = 48;
    let mut q = s.open_queue(DEPTH).unwrap();
    let mut bufs: Vec<AlignedBuf> = (0..DEPTH).map(|i| filled(65536, i as u8)).collect();
    for (i, b) in bufs.iter_mut().enumerate() {
        let iov = [b.full_iovec()];
        // SAFETY: `bufs` outlives every operation (we wait for all below).
        unsafe {
            q.submit(
                StorageOp::Write {
                    offset: i as u64 * 65536 * 3,
                    iov: &iov,
                    fua: false,
                },
                i as u64,
            )
        }
        .unwrap();
    }
    assert_eq!(q.in_flight(), DEPTH);
    // SAFETY: refused at submission.
    assert_eq!(
        // SAFETY: a flush or discard names no guest memory.
        unsafe { q.submit(StorageOp::Flush, 999) },
        Err(SubmitError::Full)
    );
    q.commit().unwrap();
    let mut done = wait_for(&mut *q, DEPTH as usize);
    done.sort_by_key(|(t, _)| *t);
    for (i, (tag, r)) in done.into_iter().enumerate() {
        assert_eq!(tag, i as u64);
        assert_eq!(r.unwrap(), 65536);
    }
    assert_eq!(q.in_flight(), 0);
    // All of them read back, again all in flight at once.
    let mut reads: Vec<AlignedBuf> = (0..DEPTH)
        .map(|_| AlignedBuf::page_aligned(65536))
        .collect();
    for (i, b) in reads.iter_mut().enumerate() {
        let iov = [b.full_iovec()];
        // SAFETY: `reads` outlives every operation.
        unsafe {
            q.submit(
                StorageOp::Read {
                    offset: i as u64 * 65536 * 3,
                    iov: &iov,
                },
                i as u64,
            )
        }
        .unwrap();
    }
    q.commit().unwrap();
    for (_, r) in wait_for(&mut *q, DEPTH as usize) {
        assert_eq!(r.unwrap(), 65536);
    }
    for (w, r) in bufs.iter().zip(&reads) {
        assert_eq!(w.as_slice(), r.as_slice());
    }
}

#[test]
fn dropping_a_queue_waits_for_its_reads() {
    let _g = io_guard();
    let c = Cluster::shared();
    let s = open(&c.create_image(&c.unique_name("drop"), 16).unwrap());
    let mut data = filled(MIB, 3);
    {
        let mut q = s.open_queue(4).unwrap();
        write_at(&mut *q, 0, &mut data);
    }
    let mut q = s.open_queue(16).unwrap();
    let mut reads: Vec<AlignedBuf> = (0..16).map(|_| AlignedBuf::page_aligned(MIB)).collect();
    for (i, b) in reads.iter_mut().enumerate() {
        let iov = [b.full_iovec()];
        // SAFETY: `reads` outlives the queue, whose drop waits for every operation.
        unsafe {
            q.submit(
                StorageOp::Read {
                    offset: 0,
                    iov: &iov,
                },
                i as u64,
            )
        }
        .unwrap();
    }
    q.commit().unwrap();
    drop(q);
    // Nothing was reaped, yet every read has scattered its data before drop returned.
    for b in &reads {
        assert_eq!(b.as_slice(), data.as_slice());
    }
}

#[test]
fn refusals_name_the_image_and_the_error() {
    let _g = io_guard();
    let c = Cluster::shared();
    let err = |target: &str, config: RbdConfig| -> RbdOpenError {
        match RbdStorage::open(target, config) {
            Ok(_) => panic!("{target} opened"),
            Err(e) => e,
        }
    };
    let e = err(&c.target("no-such-image"), RbdConfig::default());
    assert_eq!(e.errno(), libc::ENOENT);
    let msg = e.to_string();
    assert!(
        msg.contains("rbd:rbd/no-such-image") && msg.contains("No such file"),
        "{msg}"
    );
    let e = err(
        &format!("rbd:nopool/x:conf={}", c.conf().display()),
        RbdConfig::default(),
    );
    assert!(
        e.to_string().contains("opening pool nopool") && e.errno() == libc::ENOENT,
        "{e}"
    );
    assert!(matches!(
        err("rbd:justpool", RbdConfig::default()),
        RbdOpenError::Target(_)
    ));
    let e = err(
        "rbd:rbd/x:conf=/nonexistent/ceph.conf",
        RbdConfig::default(),
    );
    assert!(e.to_string().contains("/nonexistent/ceph.conf"), "{e}");
    // No monitor there: refused within the connect bound, not after librados' 300 s.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let start = Instant::now();
    let e = err(
        &format!(
            "rbd:rbd/x:conf={}:mon_host=127.0.0.1\\:{port}",
            c.conf().display()
        ),
        RbdConfig {
            connect_timeout: Duration::from_secs(2),
            ..RbdConfig::default()
        },
    );
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "{:?}",
        start.elapsed()
    );
    assert!(e.to_string().contains("connecting to the cluster"), "{e}");
}

/// The OSD stops mid-I/O: the requests in flight fail within the op timeout (or complete
/// once the OSD is back), nothing hangs, and I/O works again after the restart.
#[test]
fn a_stopped_osd_fails_requests_within_the_op_timeout() {
    let _g = fault_guard();
    let c = Cluster::shared();
    let name = c.unique_name("osd");
    let target = format!(
        "{}:rados_osd_op_timeout=3",
        c.create_image(&name, 16).unwrap()
    );
    let s = open(&target);
    let mut q = s.open_queue(16).unwrap();
    let mut data = filled(65536, 4);
    write_at(&mut *q, 0, &mut data);

    c.stop_osd().unwrap();
    let start = Instant::now();
    let mut w = filled(65536, 8);
    let mut r = AlignedBuf::page_aligned(65536);
    let wiov = [w.full_iovec()];
    let riov = [r.full_iovec()];
    // SAFETY: the buffers outlive the operations (waited for below).
    unsafe {
        q.submit(
            StorageOp::Write {
                offset: MIB as u64,
                iov: &wiov,
                fua: false,
            },
            1,
        )
        .unwrap();
        q.submit(
            StorageOp::Read {
                offset: 0,
                iov: &riov,
            },
            2,
        )
        .unwrap();
    }
    q.commit().unwrap();
    let done = wait_for(&mut *q, 2);
    let elapsed = start.elapsed();
    c.start_osd().unwrap();
    assert!(elapsed < Duration::from_secs(15), "{elapsed:?}");
    for (tag, res) in &done {
        match res {
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ETIMEDOUT), "{tag}: {e}"),
            Ok(n) => assert_eq!(*n, 65536),
        }
    }
    assert!(done.iter().any(|(_, r)| r.is_err()), "{done:?}");
    // Back: the same queue serves again.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut buf = AlignedBuf::page_aligned(65536);
        let iov = [buf.full_iovec()];
        // SAFETY: `buf` outlives the operation.
        let res = unsafe {
            run_one(
                &mut *q,
                StorageOp::Read {
                    offset: 0,
                    iov: &iov,
                },
            )
        }
        .unwrap();
        if res.is_ok() {
            assert_eq!(buf.as_slice(), data.as_slice());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no I/O after the restart: {res:?}"
        );
    }
}
