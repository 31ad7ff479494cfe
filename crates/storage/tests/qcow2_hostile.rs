//! qcow2 images whose metadata contradicts itself, as the `qcow2` fuzz target (fuzz/)
//! builds them: a writable open must refuse them instead of letting imago allocate over
//! the image's own metadata. Images made by `qemu-img` with every refcount width, both
//! versions and compressed clusters must still open writable, take writes and stay clean
//! for `qemu-img check` (no false refusals).

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::qcow2::{buffered, check_clean, p, qemu_img, qemu_io, Disk};
use storage::{OpenOptions, Qcow2Storage, StorageError};

fn refusal(path: &Path) -> String {
    match Qcow2Storage::open(path, buffered()) {
        Err(StorageError::InvalidImage { reason, .. }) => reason,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn read_only() -> OpenOptions {
    OpenOptions {
        read_only: true,
        ..buffered()
    }
}

fn be64_at(path: &Path, at: u64) -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    u64::from_be_bytes(b)
}

fn zero_at(path: &Path, at: u64, len: usize) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![0u8; len], at).unwrap();
}

/// Found by the fuzz target: a truncated image whose refcount table (past the end of the
/// file, so all zeros) covers nothing. imago's first allocating write made a refcount
/// block over the header and then recursed until the worker's stack overflowed.
#[test]
fn refcounts_missing_the_header_are_refused_for_writing() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("found.qcow2");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/qcow2-refcounts-miss-header.qcow2"),
        &image,
    )
    .unwrap();
    let reason = refusal(&image);
    assert!(
        reason.contains("the header") && reason.contains("qemu-img check -r all"),
        "{reason}"
    );
    // Read-only, nothing is allocated: it opens and reads.
    let storage = Qcow2Storage::open(&image, read_only()).unwrap();
    let mut disk = Disk::open(&storage);
    disk.read(0, 4096).unwrap();
}

#[test]
fn uncounted_tables_are_refused_for_writing() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("a.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        p(&image),
        "1M",
    ]);
    qemu_io(&image, "qcow2", "write -P 0x5a 0 64k");
    Qcow2Storage::open(&image, buffered()).unwrap();

    // The first refcount block's entry for the first L2 table, cleared: the image claims
    // its own L2 table is free.
    let broken = dir.path().join("l2.qcow2");
    std::fs::copy(&image, &broken).unwrap();
    let l1 = be64_at(&broken, 40);
    let l2 = be64_at(&broken, l1) & 0x00ff_ffff_ffff_fe00;
    let rt = be64_at(&broken, 48);
    let rb = be64_at(&broken, rt) & 0x00ff_ffff_ffff_fe00;
    zero_at(&broken, rb + 2 * (l2 / 512), 2);
    assert!(refusal(&broken).contains("an L2 table"));

    // The refcount table's first entry cleared: nothing below 128 KiB is counted.
    let broken = dir.path().join("rt.qcow2");
    std::fs::copy(&image, &broken).unwrap();
    zero_at(&broken, rt, 8);
    assert!(refusal(&broken).contains("the header"));
}

#[test]
fn images_qemu_makes_still_open_writable() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("c.raw");
    qemu_img(&["create", "-q", "-f", "raw", p(&raw), "256k"]);
    qemu_io(&raw, "raw", "write -P 7 0 128k");
    let compressed = dir.path().join("comp.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-c",
        "-O",
        "qcow2",
        p(&raw),
        p(&compressed),
    ]);
    let mut images = vec![compressed];
    for (i, opts) in [
        "compat=0.10",
        "refcount_bits=1",
        "refcount_bits=2,cluster_size=512",
        "refcount_bits=8",
        "refcount_bits=64,cluster_size=4096",
        "preallocation=metadata,cluster_size=512",
    ]
    .iter()
    .enumerate()
    {
        let image = dir.path().join(format!("{i}.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, p(&image), "1M"]);
        qemu_io(&image, "qcow2", "write -P 0x11 4k 8k");
        images.push(image);
    }
    for image in images {
        let storage = Qcow2Storage::open(&image, buffered())
            .unwrap_or_else(|e| panic!("{}: {e}", image.display()));
        let mut disk = Disk::open(&storage);
        disk.write(64 << 10, &[0xab; 4096]).unwrap();
        disk.flush().unwrap();
        drop(disk);
        drop(storage);
        check_clean(&image);
    }
}
