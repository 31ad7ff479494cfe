//! The io_uring raw backend against real files (and a loop device when run as root).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{direct_io_dir, pattern_byte, pattern_file, readable, run_one, wait_for};
use storage::{
    is_unsupported, AlignedBuf, DirectIo, OpKind, OpenOptions, RawStorage, Storage, StorageError,
    StorageKind, StorageOp, SubmitError,
};

fn opts(direct_io: DirectIo) -> OpenOptions {
    OpenOptions {
        direct_io,
        ..OpenOptions::default()
    }
}

/// Buffers of the given lengths carved out of one page-aligned allocation with gaps
/// between them, so the iovecs are not contiguous.
struct Scattered {
    buf: AlignedBuf,
    ranges: Vec<std::ops::Range<usize>>,
}

impl Scattered {
    /// Segment `i` of `lens[i]` bytes starts at `i * stride` (page-aligned when `stride` is
    /// a multiple of 4096, as a guest page would be).
    fn strided(lens: &[usize], stride: usize) -> Self {
        assert!(lens.iter().all(|&l| l <= stride));
        Scattered {
            buf: AlignedBuf::page_aligned(lens.len() * stride),
            ranges: lens
                .iter()
                .enumerate()
                .map(|(i, &l)| i * stride..i * stride + l)
                .collect(),
        }
    }

    fn iovecs(&mut self) -> Vec<libc::iovec> {
        let ranges = self.ranges.clone();
        ranges.into_iter().map(|r| self.buf.iovec(r)).collect()
    }

    fn fill(&mut self, f: impl Fn(usize) -> u8) {
        let mut i = 0;
        for r in self.ranges.clone() {
            for b in &mut self.buf.as_mut_slice()[r] {
                *b = f(i);
                i += 1;
            }
        }
    }

    fn gather(&self) -> Vec<u8> {
        self.ranges
            .iter()
            .flat_map(|r| self.buf.as_slice()[r.clone()].iter().copied())
            .collect()
    }
}

fn roundtrip(dir: &Path, direct: DirectIo, expect_direct: bool) {
    let (path, _) = pattern_file(dir, "disk.img", 1 << 20);
    let storage = RawStorage::open(&path, opts(direct)).unwrap();
    let info = storage.info();
    assert_eq!(info.kind, StorageKind::File);
    assert_eq!(info.direct_io, expect_direct);
    assert_eq!(info.size_bytes, 1 << 20);
    let mut q = storage.open_queue(8).unwrap();

    // Segment sizes like blkif's (multiples of 512 within a 4 KiB page), page-spaced so
    // every segment starts on a page boundary as a guest page would.
    let lens = [4096, 512, 1024, 3584, 4096, 1536];
    let total: usize = lens.iter().sum();
    let mut w = Scattered::strided(&lens, 8192);
    w.fill(|i| (i as u8).wrapping_mul(7) ^ 0x5A);
    let offset = 64 * 1024;
    let iov = w.iovecs();
    // SAFETY: `w` outlives run_one, which waits for completion.
    let res = unsafe {
        run_one(
            &mut *q,
            StorageOp::Write {
                offset,
                iov: &iov,
                fua: false,
            },
        )
    };
    assert_eq!(res.unwrap().unwrap(), total as u64);

    let mut r = Scattered::strided(&lens, 8192);
    let iov = r.iovecs();
    // SAFETY: `r` outlives run_one, which waits for completion.
    let res = unsafe { run_one(&mut *q, StorageOp::Read { offset, iov: &iov }) };
    assert_eq!(res.unwrap().unwrap(), total as u64);
    assert_eq!(r.gather(), w.gather());

    // The bytes around the write are untouched.
    drop(q);
    let disk = std::fs::read(&path).unwrap();
    assert_eq!(disk[offset as usize - 1], pattern_byte(offset - 1));
    assert_eq!(
        disk[offset as usize + total],
        pattern_byte(offset + total as u64)
    );
    assert_eq!(
        &disk[offset as usize..offset as usize + total],
        &w.gather()[..]
    );
}

#[test]
fn vectored_roundtrip_buffered() {
    let dir = tempfile::tempdir().unwrap();
    roundtrip(dir.path(), DirectIo::Off, false);
}

#[test]
fn vectored_roundtrip_o_direct() {
    let Some(dir) = direct_io_dir() else { return };
    roundtrip(dir.path(), DirectIo::On, true);
    let s = RawStorage::open(&dir.path().join("disk.img"), opts(DirectIo::Auto)).unwrap();
    assert!(s.info().direct_io, "Auto must pick O_DIRECT where it works");
    assert!(s.info().buffer_alignment >= 1);
}

/// A ramfs mounted on a temp dir (ramfs has no direct-I/O support at all; tmpfs gained
/// O_DIRECT in Linux 6.6, so it no longer exercises the fallback), unmounted on drop.
struct Ramfs {
    dir: tempfile::TempDir,
}

impl Ramfs {
    fn mount() -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: mounting a ramfs needs root");
            return None;
        }
        let dir = tempfile::tempdir().ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "ramfs", "-o", "size=16m", "storage-test"])
            .arg(dir.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("SKIP: cannot mount a ramfs here");
            return None;
        }
        Some(Ramfs { dir })
    }
}

impl Drop for Ramfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn o_direct_falls_back_where_refused() {
    let Some(fs) = Ramfs::mount() else { return };
    let dir = fs.dir.path();
    let (path, _) = pattern_file(dir, "disk.img", 64 * 1024);
    let s = RawStorage::open(&path, opts(DirectIo::Auto)).unwrap();
    assert!(!s.info().direct_io);
    assert_eq!(s.info().buffer_alignment, 1);
    match RawStorage::open(&path, opts(DirectIo::On)) {
        Err(StorageError::DirectIoUnsupported { .. }) => {}
        other => panic!("expected DirectIoUnsupported, got {other:?}"),
    }
    drop(s);
    // And the buffered fallback works.
    roundtrip(dir, DirectIo::Auto, false);
}

#[test]
fn flush_and_fua_write_complete() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = pattern_file(dir.path(), "disk.img", 64 * 1024);
    let s = RawStorage::open(&path, opts(DirectIo::Auto)).unwrap();
    assert!(s.info().flush);
    let mut q = s.open_queue(4).unwrap();
    let mut b = AlignedBuf::page_aligned(4096);
    b.as_mut_slice().fill(0xEE);
    let iov = [b.full_iovec()];
    // SAFETY: `b` outlives run_one.
    let res = unsafe {
        run_one(
            &mut *q,
            StorageOp::Write {
                offset: 4096,
                iov: &iov,
                fua: true,
            },
        )
    };
    assert_eq!(res.unwrap().unwrap(), 4096);
    // SAFETY: no buffers.
    let res = unsafe { run_one(&mut *q, StorageOp::Flush) };
    assert_eq!(res.unwrap().unwrap(), 0);
    drop(q);
    assert!(std::fs::read(&path).unwrap()[4096..8192]
        .iter()
        .all(|&x| x == 0xEE));
}

#[test]
fn punch_hole_reads_back_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = pattern_file(dir.path(), "disk.img", 256 * 1024);
    let s = RawStorage::open(&path, opts(DirectIo::Auto)).unwrap();
    let info = s.info();
    if !info.discard {
        eprintln!("SKIP: file system of the temp dir cannot punch holes");
        return;
    }
    assert!(!info.secure_discard, "files never offer secure discard");
    assert!(info.discard_granularity >= 512);
    let mut q = s.open_queue(4).unwrap();
    let (off, len) = (64 * 1024u64, 64 * 1024u64);
    // SAFETY: no buffers.
    let res = unsafe {
        run_one(
            &mut *q,
            StorageOp::Discard {
                offset: off,
                len,
                secure: false,
            },
        )
    };
    assert_eq!(res.unwrap().unwrap(), len);

    let mut b = AlignedBuf::page_aligned(256 * 1024);
    let iov = [b.full_iovec()];
    // SAFETY: `b` outlives run_one.
    let res = unsafe {
        run_one(
            &mut *q,
            StorageOp::Read {
                offset: 0,
                iov: &iov,
            },
        )
    };
    assert_eq!(res.unwrap().unwrap(), 256 * 1024);
    let got = b.as_slice();
    let (o, l) = (off as usize, len as usize);
    assert_eq!(&got[..o], &data[..o]);
    assert!(got[o..o + l].iter().all(|&x| x == 0));
    assert_eq!(&got[o + l..], &data[o + l..]);

    // Secure discard is refused up front; misaligned discard is invalid.
    // SAFETY: no buffers.
    let err = unsafe {
        q.submit(
            StorageOp::Discard {
                offset: 0,
                len: 4096,
                secure: true,
            },
            1,
        )
    };
    assert_eq!(err, Err(SubmitError::Unsupported(OpKind::SecureDiscard)));
    // SAFETY: no buffers.
    let err = unsafe {
        q.submit(
            StorageOp::Discard {
                offset: 100,
                len: 4096,
                secure: false,
            },
            1,
        )
    };
    assert!(matches!(err, Err(SubmitError::Invalid(_))));
    assert_eq!(q.in_flight(), 0);
}

#[test]
fn size_and_refresh_after_growing() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = pattern_file(dir.path(), "disk.img", 64 * 1024 + 100);
    let s = RawStorage::open(&path, opts(DirectIo::Auto)).unwrap();
    // The unaligned tail is not exposed.
    assert_eq!(s.info().size_bytes, 64 * 1024);
    let mut q = s.open_queue(4).unwrap();
    let mut b = AlignedBuf::page_aligned(4096);
    let iov = [b.full_iovec()];
    let beyond = StorageOp::Read {
        offset: 128 * 1024,
        iov: &iov,
    };
    // SAFETY: refused at submission, the buffer is never used.
    let err = unsafe { q.submit(beyond, 1) };
    assert!(
        matches!(err, Err(SubmitError::OutOfRange { .. })),
        "{err:?}"
    );

    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    assert_eq!(s.refresh_size().unwrap(), 1 << 20);
    assert_eq!(s.info().size_bytes, 1 << 20);
    // The open queue sees the new size: the grown (sparse) area reads as zeros.
    b.as_mut_slice().fill(0xFF);
    // SAFETY: `b` outlives run_one.
    let res = unsafe { run_one(&mut *q, beyond) };
    assert_eq!(res.unwrap().unwrap(), 4096);
    assert!(b.as_slice().iter().all(|&x| x == 0));
}

#[test]
fn read_only_refuses_writes_and_discards() {
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = pattern_file(dir.path(), "disk.img", 64 * 1024);
    let s = storage::open(
        &path,
        OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let info = s.info();
    assert!(info.read_only && !info.discard && !info.secure_discard);
    let mut q = s.open_queue(4).unwrap();
    let mut b = AlignedBuf::page_aligned(4096);
    let iov = [b.full_iovec()];
    // SAFETY: refused at submission.
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
    // SAFETY: no buffers.
    let err = unsafe {
        q.submit(
            StorageOp::Discard {
                offset: 0,
                len: 4096,
                secure: false,
            },
            1,
        )
    };
    assert_eq!(err, Err(SubmitError::ReadOnly));
    // Reads still work.
    // SAFETY: `b` outlives run_one.
    let res = unsafe {
        run_one(
            &mut *q,
            StorageOp::Read {
                offset: 0,
                iov: &iov,
            },
        )
    };
    assert_eq!(res.unwrap().unwrap(), 4096);
    assert_eq!(b.as_slice(), &data[..4096]);
    // The file descriptor itself is read-only: even the kernel would refuse.
    drop(q);
    assert!(std::fs::read(&path).unwrap() == data);
}

fn short_io(dir: &Path, direct: DirectIo, cap: u32, lens: &[usize]) {
    let (path, data) = pattern_file(dir, "disk.img", 1 << 20);
    let s = RawStorage::open(&path, opts(direct)).unwrap();
    s.set_max_transfer_for_testing(cap);
    let mut q = s.open_queue(4).unwrap();
    let total: usize = lens.iter().sum();

    // Read across the capped boundary: the queue must resubmit until all is in.
    let mut r = Scattered::strided(lens, 16384);
    let iov = r.iovecs();
    let offset = 8192u64;
    // SAFETY: `r` outlives run_one.
    let res = unsafe { run_one(&mut *q, StorageOp::Read { offset, iov: &iov }) };
    assert_eq!(res.unwrap().unwrap(), total as u64);
    assert_eq!(r.gather(), &data[offset as usize..offset as usize + total]);

    // And a write, read back through a fresh uncapped view of the file.
    let mut w = Scattered::strided(lens, 16384);
    w.fill(|i| (i % 253) as u8);
    let iov = w.iovecs();
    // SAFETY: `w` outlives run_one.
    let res = unsafe {
        run_one(
            &mut *q,
            StorageOp::Write {
                offset,
                iov: &iov,
                fua: false,
            },
        )
    };
    assert_eq!(res.unwrap().unwrap(), total as u64);
    drop(q);
    let disk = std::fs::read(&path).unwrap();
    assert_eq!(
        &disk[offset as usize..offset as usize + total],
        &w.gather()[..]
    );
}

#[test]
fn short_transfers_are_resubmitted_buffered() {
    let dir = tempfile::tempdir().unwrap();
    // A cap that splits inside iovecs and across them, at odd byte counts.
    short_io(
        dir.path(),
        DirectIo::Off,
        700,
        &[4096, 512, 1024, 4096, 1536],
    );
}

#[test]
fn short_transfers_are_resubmitted_o_direct() {
    let Some(dir) = direct_io_dir() else { return };
    short_io(dir.path(), DirectIo::On, 4096, &[8192, 4096, 12288]);
}

#[test]
fn read_hitting_eof_inside_size_is_zero_filled() {
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = pattern_file(dir.path(), "disk.img", 16 * 1024);
    let s = RawStorage::open(&path, opts(DirectIo::Off)).unwrap();
    let mut q = s.open_queue(2).unwrap();
    // The file shrinks under the storage (no refresh): the storage still believes 16 KiB.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(6 * 1024)
        .unwrap();
    let mut b = AlignedBuf::page_aligned(16 * 1024);
    b.as_mut_slice().fill(0xFF);
    let iov = [b.full_iovec()];
    // SAFETY: `b` outlives run_one.
    let res = unsafe {
        run_one(
            &mut *q,
            StorageOp::Read {
                offset: 0,
                iov: &iov,
            },
        )
    };
    assert_eq!(res.unwrap().unwrap(), 16 * 1024);
    assert_eq!(&b.as_slice()[..6 * 1024], &data[..6 * 1024]);
    assert!(b.as_slice()[6 * 1024..].iter().all(|&x| x == 0));
}

#[test]
fn queue_full_and_completion_fd() {
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = pattern_file(dir.path(), "disk.img", 64 * 1024);
    let s = RawStorage::open(&path, opts(DirectIo::Auto)).unwrap();
    let mut q = s.open_queue(4).unwrap();
    assert_eq!(q.depth(), 4);
    let mut bufs: Vec<AlignedBuf> = (0..5).map(|_| AlignedBuf::page_aligned(4096)).collect();
    let iovs: Vec<[libc::iovec; 1]> = bufs.iter_mut().map(|b| [b.full_iovec()]).collect();

    assert!(!readable(q.completion_fd(), Duration::ZERO));
    for (i, iov) in iovs.iter().take(4).enumerate() {
        let op = StorageOp::Read {
            offset: i as u64 * 4096,
            iov,
        };
        // SAFETY: `bufs` outlives the queue's use (we reap all four below).
        unsafe { q.submit(op, i as u64) }.unwrap();
    }
    let op = StorageOp::Read {
        offset: 0,
        iov: &iovs[4],
    };
    // SAFETY: refused.
    assert_eq!(unsafe { q.submit(op, 4) }, Err(SubmitError::Full));
    assert_eq!(q.in_flight(), 4);
    q.commit().unwrap();

    assert!(
        readable(q.completion_fd(), Duration::from_secs(10)),
        "completion fd never became readable"
    );
    let mut done = wait_for(&mut *q, 4);
    done.sort_by_key(|d| d.0);
    for (i, (tag, res)) in done.into_iter().enumerate() {
        assert_eq!(tag, i as u64);
        assert_eq!(res.unwrap(), 4096);
        assert_eq!(bufs[i].as_slice(), &data[i * 4096..(i + 1) * 4096]);
    }
    assert_eq!(q.in_flight(), 0);
    // reap cleared the fd.
    assert!(!readable(q.completion_fd(), Duration::ZERO));
    // Room again.
    // SAFETY: `bufs` outlives run_one.
    let res = unsafe { run_one(&mut *q, op) };
    assert_eq!(res.unwrap().unwrap(), 4096);
}

/// An idle device gets a random read as soon as the next one is queued, not at the end of
/// the pass (`commit`): a batch would hold it under the block layer's plug (module
/// `pacer`). Contiguous reads stay queued together so that they can merge.
#[test]
fn an_idle_device_gets_random_reads_before_the_pass_commits() {
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = pattern_file(dir.path(), "disk.img", 64 * 1024);
    let s = RawStorage::open(&path, opts(DirectIo::Auto)).unwrap();
    let mut q = s.open_queue(8).unwrap();
    let mut bufs: Vec<AlignedBuf> = (0..4).map(|_| AlignedBuf::page_aligned(4096)).collect();
    let iovs: Vec<[libc::iovec; 1]> = bufs.iter_mut().map(|b| [b.full_iovec()]).collect();
    let offsets = [8 * 4096u64, 2 * 4096, 3 * 4096, 4 * 4096];
    for (i, iov) in iovs.iter().enumerate() {
        let op = StorageOp::Read {
            offset: offsets[i],
            iov,
        };
        // SAFETY: `bufs` outlives the queue's use (every read is reaped below).
        unsafe { q.submit(op, i as u64) }.unwrap();
    }
    // No commit yet: the first read went to the kernel when the second (elsewhere) came.
    let first = wait_for(&mut *q, 1);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].0, 0);
    assert_eq!(first[0].1.as_ref().unwrap(), &4096);
    // The other three are contiguous: still queued together, they go with the commit.
    assert!(!readable(q.completion_fd(), Duration::from_millis(200)));
    q.commit().unwrap();
    let mut rest = wait_for(&mut *q, 3);
    rest.sort_by_key(|d| d.0);
    assert_eq!(rest.iter().map(|d| d.0).collect::<Vec<_>>(), [1, 2, 3]);
    for (i, b) in bufs.iter().enumerate() {
        let at = offsets[i] as usize;
        assert_eq!(b.as_slice(), &data[at..at + 4096], "read {i}");
    }
}

#[test]
fn dropping_a_queue_with_ops_in_flight_waits_for_them() {
    let dir = direct_io_dir().unwrap_or_else(|| tempfile::tempdir().unwrap());
    const N: usize = 64;
    const BS: usize = 256 * 1024;
    let (path, data) = pattern_file(dir.path(), "disk.img", N * BS);
    let s = RawStorage::open(&path, opts(DirectIo::Auto)).unwrap();
    for round in 0..3 {
        let mut bufs: Vec<AlignedBuf> = (0..N).map(|_| AlignedBuf::page_aligned(BS)).collect();
        let iovs: Vec<[libc::iovec; 1]> = bufs.iter_mut().map(|b| [b.full_iovec()]).collect();
        let mut q = s.open_queue(N as u32).unwrap();
        for (i, iov) in iovs.iter().enumerate() {
            let op = StorageOp::Read {
                offset: (i * BS) as u64,
                iov,
            };
            // SAFETY: `bufs` outlives `q`, whose drop waits for every submitted read.
            unsafe { q.submit(op, i as u64) }.unwrap();
        }
        // Round 0 drops with everything queued but not committed; the others mid-flight.
        if round > 0 {
            q.commit().unwrap();
        }
        drop(q);
        // After drop, every read has landed: no DMA into freed memory is possible.
        for (i, b) in bufs.iter().enumerate() {
            assert_eq!(
                b.as_slice(),
                &data[i * BS..(i + 1) * BS],
                "round {round} buf {i}"
            );
        }
    }
}

#[test]
fn invalid_ops_are_refused_without_consuming_slots() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = pattern_file(dir.path(), "disk.img", 64 * 1024);
    let s = RawStorage::open(&path, opts(DirectIo::Off)).unwrap();
    let mut q = s.open_queue(2).unwrap();
    let mut b = AlignedBuf::page_aligned(4096);
    let iov = [b.full_iovec()];
    let too_many = vec![iov[0]; storage::MAX_SEGMENTS + 1];
    // SAFETY: all refused at submission; no buffer is used.
    unsafe {
        assert!(matches!(
            q.submit(
                StorageOp::Read {
                    offset: 0,
                    iov: &[]
                },
                1
            ),
            Err(SubmitError::Invalid(_))
        ));
        assert!(matches!(
            q.submit(
                StorageOp::Read {
                    offset: 100,
                    iov: &iov
                },
                1
            ),
            Err(SubmitError::Invalid(_))
        ));
        assert!(matches!(
            q.submit(
                StorageOp::Read {
                    offset: u64::MAX - 511,
                    iov: &iov
                },
                1
            ),
            Err(SubmitError::OutOfRange { .. })
        ));
        assert!(matches!(
            q.submit(
                StorageOp::Read {
                    offset: 0,
                    iov: &too_many
                },
                1
            ),
            Err(SubmitError::TooManySegments { .. })
        ));
    }
    assert_eq!(q.in_flight(), 0);
    assert!(matches!(
        s.open_queue(0),
        Err(StorageError::InvalidDepth { .. })
    ));
    assert!(matches!(
        s.open_queue(storage::MAX_QUEUE_DEPTH + 1),
        Err(StorageError::InvalidDepth { .. })
    ));
}

#[test]
fn open_rejects_non_files() {
    let dir = tempfile::tempdir().unwrap();
    match storage::open(dir.path(), OpenOptions::default()) {
        Err(StorageError::Open { .. } | StorageError::UnsupportedFileType { .. }) => {}
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a directory opened as storage"),
    }
    assert!(matches!(
        storage::open(dir.path().join("missing"), OpenOptions::default()),
        Err(StorageError::Open { .. })
    ));
}

#[test]
fn queue_moves_between_threads() {
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = pattern_file(dir.path(), "disk.img", 64 * 1024);
    let s: Arc<dyn Storage> = storage::open(&path, OpenOptions::default()).unwrap();
    let handles: Vec<_> = (0..2)
        .map(|t| {
            let s = Arc::clone(&s);
            let data = data.clone();
            std::thread::spawn(move || {
                let mut q = s.open_queue(8).unwrap();
                let mut b = AlignedBuf::page_aligned(4096);
                let iov = [b.full_iovec()];
                let offset = t * 8192;
                // SAFETY: `b` outlives run_one.
                let res = unsafe { run_one(&mut *q, StorageOp::Read { offset, iov: &iov }) };
                assert_eq!(res.unwrap().unwrap(), 4096);
                assert_eq!(b.as_slice(), &data[offset as usize..offset as usize + 4096]);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// A loop device over a temp file, detached on drop.
struct LoopDev {
    dev: String,
}

impl LoopDev {
    fn attach(file: &Path) -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP: loop device tests need root");
            return None;
        }
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(LoopDev {
                dev: String::from_utf8_lossy(&o.stdout).trim().to_string(),
            }),
            Ok(o) => {
                eprintln!(
                    "SKIP: losetup failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                None
            }
            Err(e) => {
                eprintln!("SKIP: losetup unavailable: {e}");
                None
            }
        }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.dev])
            .status();
    }
}

#[test]
fn block_device_via_loop() {
    let dir = tempfile::tempdir().unwrap();
    let (path, data) = pattern_file(dir.path(), "backing.img", 4 << 20);
    let Some(lo) = LoopDev::attach(&path) else {
        return;
    };
    let s = storage::open(&lo.dev, OpenOptions::default()).unwrap();
    let info = s.info();
    eprintln!("loop device {}: {info:?}", lo.dev);
    assert_eq!(info.kind, StorageKind::BlockDevice);
    assert_eq!(info.size_bytes, 4 << 20);
    assert!(info.logical_block_size >= 512);
    let mut q = s.open_queue(8).unwrap();

    let mut b = AlignedBuf::page_aligned(64 * 1024);
    let iov = [b.full_iovec()];
    // SAFETY: `b` outlives run_one.
    let res = unsafe {
        run_one(
            &mut *q,
            StorageOp::Read {
                offset: 1 << 20,
                iov: &iov,
            },
        )
    };
    assert_eq!(res.unwrap().unwrap(), 64 * 1024);
    assert_eq!(b.as_slice(), &data[1 << 20..(1 << 20) + 64 * 1024]);

    if info.discard {
        // BLKDISCARD runs on the helper thread and completes through the same fd.
        // SAFETY: no buffers.
        let res = unsafe {
            run_one(
                &mut *q,
                StorageOp::Discard {
                    offset: 1 << 20,
                    len: 64 * 1024,
                    secure: false,
                },
            )
        };
        match res.unwrap() {
            Ok(n) => {
                assert_eq!(n, 64 * 1024);
                b.as_mut_slice().fill(0xFF);
                // SAFETY: `b` outlives run_one.
                let res = unsafe {
                    run_one(
                        &mut *q,
                        StorageOp::Read {
                            offset: 1 << 20,
                            iov: &iov,
                        },
                    )
                };
                assert_eq!(res.unwrap().unwrap(), 64 * 1024);
                // The loop driver punches holes in the backing file: zeros.
                assert!(b.as_slice().iter().all(|&x| x == 0));
            }
            Err(e) => assert!(is_unsupported(&e), "discard failed: {e}"),
        }
    } else {
        eprintln!("loop device does not advertise discard here");
    }
    if !info.secure_discard {
        // SAFETY: no buffers.
        let err = unsafe {
            q.submit(
                StorageOp::Discard {
                    offset: 0,
                    len: 4096,
                    secure: true,
                },
                9,
            )
        };
        assert!(matches!(
            err,
            Err(SubmitError::Unsupported(_)) | Err(SubmitError::ReadOnly)
        ));
    }

    // Online resize: grow the backing file and tell the loop driver.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let ok = std::process::Command::new("losetup")
        .args(["-c", &lo.dev])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        assert_eq!(s.refresh_size().unwrap(), 8 << 20);
    }
}

/// Many concurrent reads and writes with scattered iovecs, some split into short
/// transfers, checked against an in-memory model of the disk. Operations in flight never
/// overlap, so the model is exact.
#[test]
fn concurrent_mixed_io_matches_a_model_buffered() {
    let dir = tempfile::tempdir().unwrap();
    mixed_io(dir.path(), DirectIo::Off, 3000, 512);
}

#[test]
fn concurrent_mixed_io_matches_a_model_o_direct() {
    let Some(dir) = direct_io_dir() else { return };
    mixed_io(dir.path(), DirectIo::On, 8192, 4096);
}

/// `unit`: segment length granularity (and offset alignment); `cap`: bytes per SQE.
fn mixed_io(dir: &Path, direct: DirectIo, cap: u32, unit: usize) {
    const DISK: usize = 4 << 20;
    const DEPTH: usize = 16;
    let (path, data) = pattern_file(dir, "disk.img", DISK);
    let s = RawStorage::open(&path, opts(direct)).unwrap();
    s.set_max_transfer_for_testing(cap);
    let mut q = s.open_queue(DEPTH as u32).unwrap();
    let mut model = data;
    let mut rng = 0x1234_5678_9ABC_DEF1u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };

    struct InFlight {
        offset: usize,
        len: usize,
        write: bool,
        buf: Scattered,
    }
    let mut slots: Vec<Option<InFlight>> = (0..DEPTH).map(|_| None).collect();
    let mut submitted = 0;
    let mut completed = 0;
    while completed < 2000 {
        // Fill free slots with non-overlapping operations.
        for tag in 0..DEPTH {
            if slots[tag].is_some() || submitted >= 2000 {
                continue;
            }
            let nseg = 1 + (next() % 6) as usize;
            let lens: Vec<usize> = (0..nseg)
                .map(|_| unit * (1 + next() as usize % (4096 / unit).max(2)))
                .collect();
            let len: usize = lens.iter().sum();
            let offset = unit * (next() as usize % ((DISK - len) / unit));
            let busy = slots
                .iter()
                .flatten()
                .any(|o| offset < o.offset + o.len && o.offset < offset + len);
            if busy {
                continue;
            }
            let write = next() % 2 == 0;
            let mut buf = Scattered::strided(&lens, 8192);
            let iov = if write {
                let seed = next() as u8;
                buf.fill(|i| (i as u8).wrapping_add(seed));
                let bytes = buf.gather();
                model[offset..offset + len].copy_from_slice(&bytes);
                buf.iovecs()
            } else {
                buf.iovecs()
            };
            let op = if write {
                StorageOp::Write {
                    offset: offset as u64,
                    iov: &iov,
                    fua: false,
                }
            } else {
                StorageOp::Read {
                    offset: offset as u64,
                    iov: &iov,
                }
            };
            // SAFETY: `buf` moves into `slots` (its heap allocation does not move) and is
            // only dropped after this tag's completion has been reaped.
            unsafe { q.submit(op, tag as u64) }.unwrap();
            slots[tag] = Some(InFlight {
                offset,
                len,
                write,
                buf,
            });
            submitted += 1;
        }
        q.commit().unwrap();
        readable(q.completion_fd(), Duration::from_secs(5));
        let mut done = Vec::new();
        q.reap(&mut |tag, res| done.push((tag, res)));
        for (tag, res) in done {
            let op = slots[tag as usize]
                .take()
                .expect("completion for an idle tag");
            assert_eq!(res.unwrap(), op.len as u64);
            if !op.write {
                assert_eq!(op.buf.gather(), &model[op.offset..op.offset + op.len]);
            }
            completed += 1;
        }
    }
    assert_eq!(q.in_flight(), 0);
    drop(q);
    assert!(std::fs::read(&path).unwrap() == model);
}
