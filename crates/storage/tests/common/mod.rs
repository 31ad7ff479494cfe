//! Helpers shared by the storage integration tests.
#![allow(dead_code)]

pub mod qcow2;

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use storage::{AlignedBuf, StorageOp, StorageQueue, SubmitError};

/// Polls `fd` for readability for up to `timeout`.
pub fn readable(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd, nfds = 1.
    let ret = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    ret > 0 && pfd.revents & libc::POLLIN != 0
}

/// Waits (via the completion fd, as the engine does) until `n` completions were reaped.
pub fn wait_for(q: &mut dyn StorageQueue, n: usize) -> Vec<(u64, io::Result<u64>)> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "timed out: {} of {n} completions",
            out.len()
        );
        readable(q.completion_fd(), Duration::from_millis(500));
        q.reap(&mut |tag, res| out.push((tag, res)));
    }
    out
}

/// Submits one operation, commits, and waits for its completion.
///
/// # Safety
/// The iovecs in `op` must be valid for the operation until this returns.
pub unsafe fn run_one(
    q: &mut dyn StorageQueue,
    op: StorageOp<'_>,
) -> Result<io::Result<u64>, SubmitError> {
    // SAFETY: forwarded from the caller; we wait for the completion before returning.
    unsafe { q.submit(op, 0xABCD) }?;
    q.commit().expect("commit");
    let mut done = wait_for(q, 1);
    let (tag, res) = done.pop().unwrap();
    assert_eq!(tag, 0xABCD);
    Ok(res)
}

/// A directory whose file system accepts O_DIRECT, or None (with the reason printed).
pub fn direct_io_dir() -> Option<tempfile::TempDir> {
    let candidates: Vec<PathBuf> = vec![
        std::env::temp_dir(),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"),
    ];
    for base in candidates {
        let Ok(dir) = tempfile::Builder::new()
            .prefix("storage-dio")
            .tempdir_in(&base)
        else {
            continue;
        };
        let p = dir.path().join("probe");
        if std::fs::write(&p, vec![1u8; 8192]).is_err() {
            continue;
        }
        let ok = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&p)
            .and_then(|f| {
                let mut b = AlignedBuf::page_aligned(4096);
                std::os::unix::fs::FileExt::read_at(&f, b.as_mut_slice(), 0)
            })
            .is_ok();
        if ok {
            return Some(dir);
        }
        eprintln!(
            "{}: O_DIRECT not supported, trying the next candidate",
            base.display()
        );
    }
    eprintln!("SKIP: no directory supporting O_DIRECT found");
    None
}

/// A file filled with a position-dependent pattern.
pub fn pattern_file(dir: &Path, name: &str, len: usize) -> (PathBuf, Vec<u8>) {
    let data: Vec<u8> = (0..len).map(|i| pattern_byte(i as u64)).collect();
    let p = dir.join(name);
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

pub fn pattern_byte(pos: u64) -> u8 {
    ((pos / 512) as u8).wrapping_mul(31) ^ (pos as u8) | 1
}

/// A page-aligned buffer of `len` bytes of a pattern that depends on `seed` and never
/// holds a zero byte, so a range that reads back as zeros was discarded, not written.
pub fn filled(len: usize, seed: u8) -> AlignedBuf {
    let mut b = AlignedBuf::page_aligned(len);
    for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
        #[allow(clippy::cast_possible_truncation)] // the pattern wraps on purpose
        let step = (i / 7) as u8;
        *x = seed.wrapping_add(step) | 1;
    }
    b
}

/// Reads `len` bytes at `offset` through the queue.
pub fn read_back(q: &mut dyn StorageQueue, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = AlignedBuf::page_aligned(len);
    let iov = [buf.full_iovec()];
    // SAFETY: `buf` outlives the operation (run_one waits for it).
    let res = unsafe { run_one(q, StorageOp::Read { offset, iov: &iov }) }.unwrap();
    assert_eq!(res.unwrap(), len as u64);
    buf.as_slice().to_vec()
}
