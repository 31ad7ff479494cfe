//! The qcow2 backend under the concurrency a multi-queue guest produces: several queues,
//! each driven by its own thread as the engine's reactors drive them, each with many
//! requests in flight, all writing and reading small pieces of the same few clusters while
//! those clusters are still unallocated (so allocation and copy-on-write from the backing
//! file race with each other, with mapped writes and with reads). Requests in flight never
//! overlap each other (a guest's block layer does not issue overlapping I/O at once), so
//! every byte has one right answer, kept in a model and checked on every read, then by
//! `qemu-img check` and `qemu-img compare` against a raw reference.

mod common;

use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use common::qcow2::{check_clean, compare_identical, create_overlay, p, qemu_img, qemu_io, Rng};
use common::readable;
use storage::{AlignedBuf, DirectIo, OpenOptions, Qcow2Storage, Storage, StorageOp, StorageQueue};

const CLUSTER: u64 = 64 * 1024;
/// Clusters every round writes into (all unallocated in the top image at its start).
const HOT_CLUSTERS: u64 = 6;
const QUEUES: usize = 3;
const DEPTH: usize = 12;
const OPS_PER_QUEUE: usize = 150;

/// What the guest has been told, and which ranges are in flight.
struct Shared {
    model: Vec<u8>,
    /// The image's contents before the round.
    initial: Vec<u8>,

    /// (range, is_write) of every request in flight on any queue.
    busy: Vec<(Range<u64>, bool)>,
}

impl Shared {
    /// Claims `r` unless it overlaps a write in flight (or, for a write, anything in
    /// flight).
    fn claim(&mut self, r: &Range<u64>, write: bool) -> bool {
        let clash = self
            .busy
            .iter()
            .any(|(b, w)| (write || *w) && b.start < r.end && r.start < b.end);
        if !clash {
            self.busy.push((r.clone(), write));
        }
        !clash
    }

    fn release(&mut self, r: &Range<u64>) {
        let i = self.busy.iter().position(|(b, _)| b == r).unwrap();
        self.busy.swap_remove(i);
    }
}

struct InFlight {
    range: Range<u64>,
    write: bool,
    buf: AlignedBuf,
    iov: Vec<libc::iovec>,
}

/// One queue's thread: keeps `DEPTH` small requests in flight over the hot clusters.
fn drive(mut q: Box<dyn StorageQueue>, shared: &Mutex<Shared>, seed: u64, sector: u64) {
    let mut rng = Rng(seed | 1);
    let hot = HOT_CLUSTERS * CLUSTER;
    let mut slots: Vec<Option<InFlight>> = (0..DEPTH).map(|_| None).collect();
    let (mut issued, mut done) = (0usize, 0usize);
    let deadline = Instant::now() + Duration::from_secs(60);
    while done < OPS_PER_QUEUE {
        assert!(Instant::now() < deadline, "queue {seed}: stuck");
        let mut submitted = false;
        for (tag, slot) in slots.iter_mut().enumerate() {
            if slot.is_some() || issued == OPS_PER_QUEUE {
                continue;
            }
            // Mostly small pieces inside one cluster, sometimes across a boundary.
            let len = (rng.below(24) + 1) * sector;
            let start = rng.below((hot - len) / sector + 1) * sector;
            let range = start..start + len;
            let write = rng.below(10) < 7;
            if !shared
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .claim(&range, write)
            {
                continue;
            }
            let mut buf = AlignedBuf::page_aligned(len as usize);
            if write {
                rng.fill(buf.as_mut_slice());
            } else {
                buf.as_mut_slice().fill(0xEE);
            }
            // Two iovecs when possible, as a guest's segments come.
            let half = (len as usize / 2) & !(sector as usize - 1);
            let iov = if half > 0 {
                vec![buf.iovec(0..half), buf.iovec(half..len as usize)]
            } else {
                vec![buf.full_iovec()]
            };
            let inflight = slot.insert(InFlight {
                range: range.clone(),
                write,
                buf,
                iov,
            });
            let op = if write {
                StorageOp::Write {
                    offset: start,
                    iov: &inflight.iov,
                    fua: false,
                }
            } else {
                StorageOp::Read {
                    offset: start,
                    iov: &inflight.iov,
                }
            };
            // SAFETY: the buffer stays in its slot until the completion has been reaped.
            unsafe { q.submit(op, tag as u64) }.unwrap();
            issued += 1;
            submitted = true;
        }
        if submitted {
            q.commit().unwrap();
        }
        readable(q.completion_fd(), Duration::from_millis(2));
        let mut completions = Vec::new();
        q.reap(&mut |tag, res| completions.push((tag, res)));
        for (tag, res) in completions {
            let f = slots[tag as usize]
                .take()
                .expect("completion of a free slot");
            let n = res.unwrap_or_else(|e| panic!("{:?} failed: {e}", f.range));
            assert_eq!(n, f.range.end - f.range.start);
            let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
            let (a, b) = (f.range.start as usize, f.range.end as usize);
            if f.write {
                s.model[a..b].copy_from_slice(f.buf.as_slice());
            } else if f.buf.as_slice() != &s.model[a..b] {
                let got = f.buf.as_slice();
                let wrong: Vec<usize> = (0..got.len())
                    .filter(|&i| got[i] != s.model[a + i])
                    .collect();
                // A lost update reads as what the bytes held before: the backing file's
                // bytes, or an older write's.
                let stale = wrong
                    .iter()
                    .filter(|&&i| got[i] == s.initial[a + i])
                    .count();
                panic!(
                    "read {a}+{} differs from what was written: {} bytes from {} \
                     ({stale} of them the backing file's)",
                    b - a,
                    wrong.len(),
                    a + wrong[0]
                );
            }
            s.release(&f.range);
            done += 1;
        }
    }
}

/// One round on a fresh overlay over `backing`: queues on threads, then flush, close,
/// `qemu-img check` and `compare`.
fn round(dir: &Path, backing: &Path, backing_fmt: &str, direct: bool, seed: u64) {
    let top = dir.join("top.qcow2");
    let _ = std::fs::remove_file(&top);
    create_overlay(&top, p(backing), backing_fmt, "1M");
    // 1 MiB virtual: the hot clusters are all in the first L2 table.
    let reference = dir.join("ref.raw");
    qemu_img(&["convert", "-O", "raw", p(&top), p(&reference)]);
    let model = std::fs::read(&reference).unwrap();
    let storage = Qcow2Storage::open(
        &top,
        OpenOptions {
            direct_io: if direct { DirectIo::On } else { DirectIo::Off },
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let sector = u64::from(storage.info().logical_block_size);
    let shared = Arc::new(Mutex::new(Shared {
        initial: model.clone(),

        model,
        busy: Vec::new(),
    }));
    std::thread::scope(|s| {
        for qi in 0..QUEUES {
            let q = storage.open_queue(DEPTH as u32).unwrap();
            let shared = &shared;
            s.spawn(move || drive(q, shared, seed * 31 + qi as u64, sector));
        }
    });
    {
        let mut q = storage.open_queue(1).unwrap();
        // SAFETY: no buffers.
        let res = unsafe { common::run_one(q.as_mut(), StorageOp::Flush) }.unwrap();
        res.unwrap();
    }
    drop(storage);
    let model = std::mem::take(&mut shared.lock().unwrap_or_else(PoisonError::into_inner).model);
    std::fs::write(&reference, &model).unwrap();
    check_clean(&top);
    compare_identical(&top, &reference);
}

/// Runs rounds with fresh overlays over `backing` for about `budget` (at least two:
/// buffered and O_DIRECT alternate).
fn rounds(dir: &Path, backing: &Path, backing_fmt: &str, budget: Duration) -> u64 {
    let start = Instant::now();
    let mut n = 0;
    while n < 2 || start.elapsed() < budget {
        round(dir, backing, backing_fmt, n % 2 == 1, n + 1);
        n += 1;
    }
    n
}

fn raw_backing(dir: &Path) -> std::path::PathBuf {
    let base = dir.join("base.raw");
    let mut data = vec![0u8; 1 << 20];
    Rng(0x5eed).fill(&mut data);
    std::fs::write(&base, &data).unwrap();
    base
}

#[test]
fn partial_cluster_writes_from_many_queues_over_a_raw_backing_file() {
    let dir = common::direct_io_dir().expect("a directory accepting O_DIRECT");
    let base = raw_backing(dir.path());
    let n = rounds(dir.path(), &base, "raw", Duration::from_secs(4));
    eprintln!("{n} rounds");
}

#[test]
fn partial_cluster_writes_from_many_queues_over_a_qcow2_backing_file() {
    let dir = common::direct_io_dir().expect("a directory accepting O_DIRECT");
    let base = raw_backing(dir.path());
    let mid = dir.path().join("mid.qcow2");
    create_overlay(&mid, p(&base), "raw", "1M");
    // Some of the hot clusters have data in the middle layer, some come from the base.
    qemu_io(&mid, "qcow2", "write -P 0x5a 64k 100k");
    let n = rounds(dir.path(), &mid, "qcow2", Duration::from_secs(4));
    eprintln!("{n} rounds");
}
