//! qcow2 metadata (header, header extensions, backing names, L1/L2 tables, refcount
//! tables and blocks, compressed-cluster descriptors) as the storage layer reaches it:
//! the fuzzer's bytes become an image file on tmpfs, opened with `Qcow2Storage::open`
//! (our header checks, then imago) and read, written, discarded and flushed through a
//! real queue (the mapped io_uring path and the worker path).
//!
//! Layout of the input: one flag byte (bit 0: read-only), then four operations of 8 bytes
//! (kind, sector, length in sectors), then the image.
//!
//! Checked: no panic, every operation completes (no hang), a read or write that succeeds
//! transfers exactly its length, and nothing outside the image's virtual size succeeds.

#![no_main]

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use storage::{AlignedBuf, DirectIo, OpenOptions, Qcow2Storage, Storage, StorageOp, StorageQueue};

const OPS: usize = 4;

fn image_path() -> PathBuf {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("xenblkd-fuzz-qcow2-{}.img", std::process::id()))
}

/// Waits for every operation in flight; panics if the queue stops making progress.
fn drain(q: &mut dyn StorageQueue, done: &mut Vec<(u64, std::io::Result<u64>)>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while q.in_flight() > 0 {
        assert!(Instant::now() < deadline, "the queue hung");
        let mut pfd = libc::pollfd {
            fd: q.completion_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        q.reap(&mut |tag, res| done.push((tag, res)));
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 1 + OPS * 8 {
        return;
    }
    let (head, image) = data.split_at(1 + OPS * 8);
    let path = image_path();
    std::fs::write(&path, image).expect("tmpfs write");
    let options = OpenOptions {
        read_only: head[0] & 1 != 0,
        direct_io: DirectIo::Off,
        exclusive: false,
    };
    let Ok(storage) = Qcow2Storage::open(&path, options) else {
        return;
    };
    let info = storage.info();
    let Ok(mut q) = storage.open_queue(8) else {
        return;
    };
    let mut bufs: Vec<AlignedBuf> = Vec::new();
    let mut expect: Vec<(u64, u64, bool)> = Vec::new();
    for (i, op) in head[1..].chunks_exact(8).enumerate() {
        let sector = u64::from(u32::from_le_bytes([op[1], op[2], op[3], op[4]]));
        let offset = sector * 512;
        let len = (u64::from(u16::from_le_bytes([op[5], op[6]])) % 256 + 1) * 512;
        let inside = offset
            .checked_add(len)
            .is_some_and(|e| e <= info.size_bytes);
        let tag = i as u64;
        // SAFETY: every buffer lives in `bufs` until `drain` has seen all completions.
        let submitted = unsafe {
            match op[0] % 5 {
                0..=2 => {
                    let mut b = AlignedBuf::page_aligned(len as usize);
                    let iov = [b.full_iovec()];
                    bufs.push(b);
                    let op = if op[0] % 5 == 2 {
                        StorageOp::Write {
                            offset,
                            iov: &iov,
                            fua: op[7] & 1 != 0,
                        }
                    } else {
                        StorageOp::Read { offset, iov: &iov }
                    };
                    expect.push((tag, len, inside));
                    q.submit(op, tag)
                }
                3 => q.submit(
                    StorageOp::Discard {
                        offset,
                        len,
                        secure: false,
                    },
                    tag,
                ),
                _ => q.submit(StorageOp::Flush, tag),
            }
        };
        if submitted.is_err() {
            expect.retain(|e| e.0 != tag);
        }
    }
    let _ = q.commit();
    let mut done = Vec::new();
    drain(q.as_mut(), &mut done);
    for (tag, res) in &done {
        if let (Some(&(_, len, inside)), Ok(n)) = (expect.iter().find(|e| e.0 == *tag), res) {
            assert_eq!(*n, len, "short transfer");
            assert!(inside, "I/O past the end succeeded");
        }
    }
    drop(q);
    drop(bufs);
    drop(storage);
    let _ = std::fs::remove_file(&path);
});
