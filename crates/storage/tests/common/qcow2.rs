//! qcow2 test helpers: QEMU's own tools (`qemu-img`, `qemu-io`; Debian: qemu-utils) as
//! the judge of images, a synchronous disk over one queue, and a raw reference file.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::run_one;

const MIB: u64 = 1 << 20;
use storage::{AlignedBuf, DirectIo, OpenOptions, Storage, StorageOp, StorageQueue};

pub fn qemu_img(args: &[&str]) -> std::process::Output {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (Debian package qemu-utils) must be installed");
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn qemu_io(image: &Path, format: &str, cmd: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", format, "-c", cmd])
        .arg(image)
        .output()
        .expect("qemu-io (Debian package qemu-utils)");
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"),
        "qemu-io {cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img check`: exit 0 means no corruption and no leaked clusters.
pub fn check_clean(image: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.code() == Some(0),
        "qemu-img check {}: exit {:?}\n{}{}",
        image.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img compare`: exit 0 means the guest-visible contents are identical.
pub fn compare_identical(image: &Path, reference: &Path) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", "raw"])
        .arg(image)
        .arg(reference)
        .output()
        .unwrap();
    assert!(
        out.status.code() == Some(0),
        "qemu-img compare {} {}: exit {:?}\n{}{}",
        image.display(),
        reference.display(),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Creates `image`, a qcow2 (64 KiB clusters) of `size` over `backing` (a path as
/// qemu-img takes it: relative ones are relative to the image's directory).
pub fn create_overlay(image: &Path, backing: &str, backing_fmt: &str, size: &str) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=65536",
        "-b",
        backing,
        "-F",
        backing_fmt,
        p(image),
        size,
    ]);
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

pub fn buffered() -> OpenOptions {
    OpenOptions {
        direct_io: DirectIo::Off,
        ..OpenOptions::default()
    }
}

/// A deterministic xorshift generator (tests must be reproducible).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// One queue on a storage, with synchronous helpers over page-aligned buffers.
pub struct Disk {
    pub queue: Box<dyn StorageQueue>,
}

impl Disk {
    pub fn open(storage: &dyn Storage) -> Disk {
        Disk {
            queue: storage.open_queue(32).unwrap(),
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<u64> {
        let mut buf = AlignedBuf::page_aligned(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        // Two iovecs when possible, so the mapped path cuts a vector, not one buffer.
        let half = (data.len() / 2) & !511;
        let iov = if half > 0 {
            vec![buf.iovec(0..half), buf.iovec(half..data.len())]
        } else {
            vec![buf.full_iovec()]
        };
        // SAFETY: `buf` outlives the operation (run_one waits for the completion).
        unsafe {
            run_one(
                self.queue.as_mut(),
                StorageOp::Write {
                    offset,
                    iov: &iov,
                    fua: false,
                },
            )
        }
        .expect("submit")
    }

    pub fn read(&mut self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = AlignedBuf::page_aligned(len);
        buf.as_mut_slice().fill(0xEE);
        let iov = [buf.full_iovec()];
        // SAFETY: as in `write`.
        unsafe { run_one(self.queue.as_mut(), StorageOp::Read { offset, iov: &iov }) }
            .expect("submit")
            .map(|_| buf.as_slice().to_vec())
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> io::Result<u64> {
        // SAFETY: no buffers.
        unsafe {
            run_one(
                self.queue.as_mut(),
                StorageOp::Discard {
                    offset,
                    len,
                    secure: false,
                },
            )
        }
        .expect("submit")
    }

    pub fn flush(&mut self) -> io::Result<u64> {
        // SAFETY: no buffers.
        unsafe { run_one(self.queue.as_mut(), StorageOp::Flush) }.expect("submit")
    }
}

/// The guest's view kept in a raw file that receives the same writes.
pub struct Reference {
    pub file: File,
    pub path: PathBuf,
}

impl Reference {
    /// Starts from the image's current contents (QEMU's own reading of the chain).
    pub fn of(image: &Path, path: PathBuf) -> Reference {
        qemu_img(&["convert", "-O", "raw", p(image), p(&path)]);
        Reference {
            file: std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap(),
            path,
        }
    }

    pub fn write(&self, offset: u64, data: &[u8]) {
        self.file.write_all_at(data, offset).unwrap();
    }

    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.file.read_exact_at(&mut v, offset).unwrap();
        v
    }
}

/// Random writes (cluster-crossing, partial-cluster, over backing data), reads checked
/// against the reference, discards (aligned and not), flushes.
pub fn random_workload(disk: &mut Disk, reference: &Reference, size: u64, rounds: u32, seed: u64) {
    let mut rng = Rng(seed | 1);
    for round in 0..rounds {
        let offset = rng.below(size / 512) * 512;
        let max = (size - offset).min(256 * 1024);
        let len = ((rng.below(max / 512) + 1) * 512) as usize;
        match rng.below(10) {
            0..=4 => {
                let mut data = vec![0u8; len];
                rng.fill(&mut data);
                disk.write(offset, &data)
                    .unwrap_or_else(|e| panic!("round {round}: write {offset}+{len}: {e}"));
                reference.write(offset, &data);
            }
            5..=7 => {
                let got = disk
                    .read(offset, len)
                    .unwrap_or_else(|e| panic!("round {round}: read {offset}+{len}: {e}"));
                assert!(
                    got == reference.read(offset, len),
                    "round {round}: read {offset}+{len} differs from the reference"
                );
            }
            8 => {
                disk.discard(offset, len as u64)
                    .unwrap_or_else(|e| panic!("round {round}: discard {offset}+{len}: {e}"));
                reference.write(offset, &vec![0u8; len]);
            }
            _ => {
                disk.flush().unwrap();
            }
        }
    }
}

/// base.raw <- mid.qcow2 <- top.qcow2, each layer with data of its own.
pub fn make_chain(dir: &Path, size_mib: u64) -> (PathBuf, PathBuf, PathBuf) {
    let base = dir.join("base.raw");
    let mut data = vec![0u8; (size_mib * MIB) as usize];
    Rng(7).fill(&mut data);
    // A hole at the end of the base: raw files shorter than their overlay read as zeros.
    data.truncate(data.len() - 3 * 512);
    std::fs::write(&base, &data).unwrap();
    let mid = dir.join("mid.qcow2");
    create_overlay(&mid, "base.raw", "raw", &format!("{size_mib}M"));
    qemu_io(&mid, "qcow2", "write -P 0x5a 1M 300k");
    let top = dir.join("top.qcow2");
    create_overlay(&top, p(&mid), "qcow2", &format!("{size_mib}M"));
    qemu_io(&top, "qcow2", "write -P 0xa5 3M 64k");
    (base, mid, top)
}
