//! The null backend and the fault-injection wrapper.

mod common;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use common::{pattern_file, readable, run_one, wait_for};
use storage::testing::{FaultInjector, FaultKind, FaultRule, FaultyStorage};
use storage::{
    is_unsupported, AlignedBuf, NullConfig, NullStorage, OpKind, OpenOptions, Storage,
    StorageError, StorageKind, StorageOp, SubmitError,
};

#[test]
fn null_completes_through_the_fd_without_touching_memory() {
    let s = NullStorage::new(NullConfig {
        size_bytes: (8 << 20) + 100,
        logical_block_size: 512,
        read_only: false,
        read_zeroes: false,
    })
    .unwrap();
    let info = s.info();
    assert_eq!(info.kind, StorageKind::Null);
    assert_eq!(info.size_bytes, 8 << 20);
    assert!(info.flush && info.discard && info.secure_discard);

    let mut q = s.open_queue(4).unwrap();
    let mut b = AlignedBuf::page_aligned(8192);
    b.as_mut_slice().fill(0xAB);
    let iov = [b.iovec(0..4096), b.iovec(4096..8192)];
    let ops = [
        StorageOp::Read {
            offset: 0,
            iov: &iov,
        },
        StorageOp::Write {
            offset: 8192,
            iov: &iov,
            fua: true,
        },
        StorageOp::Flush,
        StorageOp::Discard {
            offset: 0,
            len: 1 << 20,
            secure: true,
        },
    ];
    for (i, op) in ops.iter().enumerate() {
        // SAFETY: the null backend never touches the buffers.
        unsafe { q.submit(*op, i as u64) }.unwrap();
    }
    // SAFETY: refused.
    let refused = unsafe { q.submit(StorageOp::Flush, 9) };
    assert_eq!(refused, Err(SubmitError::Full));
    // Nothing is ready before commit: completions are batched per commit like io_uring's.
    assert!(!readable(q.completion_fd(), Duration::ZERO));
    q.commit().unwrap();
    assert!(readable(q.completion_fd(), Duration::ZERO));
    let mut done = wait_for(&mut *q, 4);
    done.sort_by_key(|d| d.0);
    let bytes: Vec<u64> = done.into_iter().map(|(_, r)| r.unwrap()).collect();
    assert_eq!(bytes, vec![8192, 8192, 0, 1 << 20]);
    assert!(!readable(q.completion_fd(), Duration::ZERO));
    assert_eq!(q.in_flight(), 0);
    // "null" measures protocol cost: the read left the buffer as it was.
    assert!(b.as_slice().iter().all(|&x| x == 0xAB));

    // Range checks are the same as for real storage.
    // SAFETY: refused.
    let err = unsafe {
        q.submit(
            StorageOp::Read {
                offset: 8 << 20,
                iov: &iov,
            },
            1,
        )
    };
    assert!(matches!(err, Err(SubmitError::OutOfRange { .. })));
}

#[test]
fn null_read_only_and_config_checks() {
    let s = NullStorage::new(NullConfig {
        read_only: true,
        read_zeroes: false,
        ..NullConfig::default()
    })
    .unwrap();
    assert!(!s.info().discard);
    let mut q = s.open_queue(1).unwrap();
    let mut b = AlignedBuf::page_aligned(4096);
    let iov = [b.full_iovec()];
    // SAFETY: refused.
    let err = unsafe {
        q.submit(
            StorageOp::Write {
                offset: 0,
                iov: &iov,
                fua: false,
            },
            1,
        )
    };
    assert_eq!(err, Err(SubmitError::ReadOnly));
    assert!(matches!(
        NullStorage::new(NullConfig {
            logical_block_size: 1000,
            ..NullConfig::default()
        }),
        Err(StorageError::InvalidConfig(_))
    ));
}

#[test]
fn null_target_reads_zeros_and_forgets_writes() {
    let cfg = NullConfig::from_target("null:8M").unwrap();
    assert_eq!(cfg.size_bytes, 8 << 20);
    assert!(cfg.read_zeroes && !cfg.read_only);
    let s = NullStorage::new(cfg).unwrap();
    assert_eq!(s.info().size_bytes, 8 << 20);
    let mut q = s.open_queue(2).unwrap();
    let mut b = AlignedBuf::page_aligned(8192);
    b.as_mut_slice().fill(0xAB);
    let (first, second) = (b.iovec(0..4096), b.iovec(4096..8192));
    // SAFETY: the buffer outlives the queue's use of it (reaped below).
    unsafe {
        q.submit(
            StorageOp::Write {
                offset: 0,
                iov: &[second],
                fua: false,
            },
            1,
        )
        .unwrap();
        q.submit(
            StorageOp::Read {
                offset: 0,
                iov: &[first],
            },
            2,
        )
        .unwrap();
    }
    q.commit().unwrap();
    let mut done = wait_for(&mut *q, 2);
    done.sort_by_key(|d| d.0);
    assert_eq!(
        done.into_iter()
            .map(|(_, r)| r.unwrap())
            .collect::<Vec<_>>(),
        vec![4096, 4096]
    );
    // The read zeroed its own buffer (the write before it was forgotten), and only it.
    assert!(b.as_slice()[..4096].iter().all(|&x| x == 0));
    assert!(b.as_slice()[4096..].iter().all(|&x| x == 0xAB));
}

#[test]
fn null_targets_are_parsed_strictly() {
    use storage::NullTargetError as E;
    let size = |t: &str| NullConfig::from_target(t).map(|c| c.size_bytes);
    assert_eq!(size("null:4096"), Ok(4096));
    assert_eq!(size("null:64k"), Ok(64 << 10));
    assert_eq!(size("null:1G"), Ok(1 << 30));
    assert_eq!(size("null:2TiB"), Ok(2 << 40));
    assert!(storage::is_null_target("null:1G"));
    assert!(!storage::is_null_target("/srv/null:1G"));
    assert_eq!(size("/dev/null"), Err(E::NotNull));
    assert_eq!(size("null:100"), Err(E::TooSmall(100)));
    for bad in [
        "null:",
        "null:1X",
        "null:-1",
        "null:1G:ro",
        "null:99999999999T",
    ] {
        assert!(
            matches!(size(bad), Err(E::BadSize(..))),
            "{bad}: {:?}",
            size(bad)
        );
    }
}

#[test]
fn injected_errors_fail_only_their_request() {
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = pattern_file(dir.path(), "disk.img", 64 * 1024);
    let inner = storage::open(&path, OpenOptions::default()).unwrap();
    let injector = FaultInjector::new();
    // Let one write through, fail the second with EIO; fail the first flush with ENOSPC.
    injector.add(FaultRule {
        skip: 1,
        ..FaultRule::once(OpKind::Write, FaultKind::Error(libc::EIO))
    });
    injector.add(FaultRule::once(
        OpKind::Flush,
        FaultKind::Error(libc::ENOSPC),
    ));
    let s = FaultyStorage::new(inner, injector.clone());
    let mut q = s.open_queue(8).unwrap();

    let mut bufs: Vec<AlignedBuf> = (0..4).map(|_| AlignedBuf::page_aligned(4096)).collect();
    for (i, b) in bufs.iter_mut().enumerate() {
        b.as_mut_slice().fill(0x10 + i as u8);
    }
    let iovs: Vec<[libc::iovec; 1]> = bufs.iter_mut().map(|b| [b.full_iovec()]).collect();
    for (i, iov) in iovs.iter().take(3).enumerate() {
        let op = StorageOp::Write {
            offset: i as u64 * 4096,
            iov,
            fua: false,
        };
        // SAFETY: `bufs` outlives the queue's use; we wait for all completions below.
        unsafe { q.submit(op, i as u64) }.unwrap();
    }
    // SAFETY: no buffers.
    unsafe { q.submit(StorageOp::Flush, 3) }.unwrap();
    let read = StorageOp::Read {
        offset: 8192,
        iov: &iovs[3],
    };
    q.commit().unwrap();
    let mut done = wait_for(&mut *q, 4);
    done.sort_by_key(|d| d.0);
    assert_eq!(done[0].1.as_ref().unwrap(), &4096);
    assert_eq!(
        done[1].1.as_ref().unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
    assert_eq!(done[2].1.as_ref().unwrap(), &4096);
    assert_eq!(
        done[3].1.as_ref().unwrap_err().raw_os_error(),
        Some(libc::ENOSPC)
    );
    assert_eq!(injector.injected(), 2);
    assert_eq!(q.in_flight(), 0);

    // The failed write never reached the disk; the others did.
    // SAFETY: `bufs[3]` outlives run_one.
    let res = unsafe { run_one(&mut *q, read) };
    assert_eq!(res.unwrap().unwrap(), 4096);
    assert!(bufs[3].as_slice().iter().all(|&x| x == 0x12));
    drop(q);
    let disk = std::fs::read(&path).unwrap();
    assert!(disk[..4096].iter().all(|&x| x == 0x10));
    assert_eq!(&disk[4096..8192], &data[4096..8192]);
}

#[test]
fn injected_short_transfer_is_reported() {
    let inner: Arc<dyn Storage> = Arc::new(NullStorage::new(NullConfig::default()).unwrap());
    let injector = FaultInjector::new();
    injector.add(FaultRule::always(OpKind::Read, FaultKind::Short { bytes: 512 }).at_offset(4096));
    let s = FaultyStorage::new(inner, injector);
    let mut q = s.open_queue(4).unwrap();
    let mut b = AlignedBuf::page_aligned(8192);
    let iov = [b.full_iovec()];
    // SAFETY: null storage; `b` outlives run_one regardless.
    let hit = unsafe {
        run_one(
            &mut *q,
            StorageOp::Read {
                offset: 0,
                iov: &iov,
            },
        )
    };
    assert_eq!(hit.unwrap().unwrap(), 512);
    // SAFETY: as above.
    let miss = unsafe {
        run_one(
            &mut *q,
            StorageOp::Read {
                offset: 16384,
                iov: &iov,
            },
        )
    };
    assert_eq!(miss.unwrap().unwrap(), 8192);
}

#[test]
fn unsupported_classification() {
    let e = io::Error::from_raw_os_error(libc::EOPNOTSUPP);
    assert!(is_unsupported(&e));
    assert!(!is_unsupported(&io::Error::from_raw_os_error(libc::EIO)));
    let e = io::Error::new(io::ErrorKind::Unsupported, "x");
    assert!(is_unsupported(&e));
}
