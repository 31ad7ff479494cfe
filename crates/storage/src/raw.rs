//! The raw backend: a regular file or a block device, used as-is (no image format).
//!
//! This module owns opening and probing: O_DIRECT negotiation, geometry (size, logical and
//! physical block size, DMA alignment), and which of flush / discard / secure discard the
//! target supports. The I/O itself runs on io_uring (module `uring`).
//!
//! Probing rules:
//! - **O_DIRECT** ([`DirectIo`]): `Auto` tries O_DIRECT and falls back to buffered I/O with
//!   a `tracing` note when the open or a probe read is refused (tmpfs, some FUSE file
//!   systems); `On` fails instead; `Off` never tries. Alignment comes from
//!   `statx(STATX_DIOALIGN)` where the kernel reports it, else from probe reads at 512 and
//!   4096 bytes alignment (block devices: `BLKSSZGET`).
//! - **Size**: `fstat` for files, `BLKGETSIZE64` for block devices, rounded down to the
//!   logical block size.
//! - **Discard** on a file is `fallocate(PUNCH_HOLE | KEEP_SIZE)`, advertised when a punch
//!   beyond end-of-file (which changes nothing) succeeds; granularity is the file system
//!   block size; secure discard is never offered for files. On a block device it is
//!   `BLKDISCARD`, advertised when `queue/discard_max_bytes` is non-zero, and
//!   `BLKSECDISCARD` when the non-destructive probe (module `sys`) says the device can
//!   securely erase.
//! - **Read-only** opens `O_RDONLY` and offers neither writes nor discards.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use crate::uring::{UringQueue, UringTarget};
use crate::{
    sys, AlignedBuf, Storage, StorageError, StorageInfo, StorageKind, StorageQueue, MAX_QUEUE_DEPTH,
};

/// Whether to bypass the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirectIo {
    /// O_DIRECT when the file system or device accepts it, buffered otherwise.
    #[default]
    Auto,
    /// O_DIRECT or fail.
    On,
    /// Buffered I/O through the page cache.
    Off,
}

/// How [`crate::open`] / [`RawStorage::open`] opens a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenOptions {
    pub read_only: bool,
    pub direct_io: DirectIo,
    /// Open a block device with O_EXCL, so it fails while the device is mounted or claimed
    /// by another exclusive user (as kernel blkback claims its devices). Ignored for files.
    pub exclusive: bool,
}

/// A regular file or block device served through io_uring queues.
#[derive(Debug)]
pub struct RawStorage {
    file: Arc<File>,
    path: PathBuf,
    /// Capabilities; `size_bytes` here is the size at open, the live one is `size`.
    info: StorageInfo,
    size: Arc<AtomicU64>,
    /// Test hook: cap on bytes per kernel submission, to force short transfers (0 = none).
    max_transfer: AtomicU32,
}

/// Opens `path` as `options` ask, with O_DIRECT when asked or (auto) when the file system
/// or device takes it; returns whether it did.
fn open_file(path: &Path, options: OpenOptions) -> Result<(File, bool), StorageError> {
    let open_err = |source: io::Error| StorageError::Open {
        path: path.to_path_buf(),
        source,
    };
    let pre = std::fs::metadata(path).map_err(open_err)?;
    let exclusive = options.exclusive && pre.file_type().is_block_device();
    let open_with = |direct: bool| {
        let mut flags = libc::O_CLOEXEC;
        if direct {
            flags |= libc::O_DIRECT;
        }
        if exclusive {
            flags |= libc::O_EXCL;
        }
        std::fs::OpenOptions::new()
            .read(true)
            .write(!options.read_only)
            .custom_flags(flags)
            .open(path)
    };

    let (file, direct) = match options.direct_io {
        DirectIo::Off => (open_with(false).map_err(open_err)?, false),
        DirectIo::On => {
            let file = open_with(true).map_err(|e| direct_refused(path, e))?;
            probe_direct_read(&file).map_err(|e| direct_refused(path, e))?;
            (file, true)
        }
        DirectIo::Auto => match open_with(true) {
            Ok(file) => match probe_direct_read(&file) {
                Ok(()) => (file, true),
                Err(e) => {
                    tracing::info!(path = %path.display(), error = %e,
                        "O_DIRECT reads refused; falling back to buffered I/O");
                    drop(file);
                    (open_with(false).map_err(open_err)?, false)
                }
            },
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(path = %path.display(),
                    "O_DIRECT open refused (EINVAL); falling back to buffered I/O");
                (open_with(false).map_err(open_err)?, false)
            }
            Err(e) => return Err(open_err(e)),
        },
    };
    Ok((file, direct))
}

impl RawStorage {
    /// Opens and probes `path`.
    pub fn open(path: &Path, options: OpenOptions) -> Result<Self, StorageError> {
        let probe_err = |what: &'static str| {
            move |source: io::Error| StorageError::Probe {
                path: path.to_path_buf(),
                what,
                source,
            }
        };

        let (file, direct) = open_file(path, options)?;

        // The open file is the authority on what we are serving (the path may have changed
        // between the metadata lookup and the open).
        let meta = file.metadata().map_err(probe_err("fstat"))?;
        let fd = file.as_raw_fd();
        let ft = meta.file_type();
        let kind = if ft.is_file() {
            StorageKind::File
        } else if ft.is_block_device() {
            StorageKind::BlockDevice
        } else {
            return Err(StorageError::UnsupportedFileType {
                path: path.to_path_buf(),
            });
        };

        let mut info = StorageInfo {
            size_bytes: 0,
            logical_block_size: 512,
            physical_block_size: 512,
            buffer_alignment: 1,
            read_only: options.read_only,
            flush: !options.read_only,
            discard: false,
            secure_discard: false,
            discard_granularity: 0,
            discard_alignment: 0,
            direct_io: direct,
            kind,
        };

        let raw_size = match kind {
            StorageKind::BlockDevice => {
                info.logical_block_size =
                    sys::blk_logical_block_size(fd).map_err(probe_err("BLKSSZGET"))?;
                info.physical_block_size = sys::blk_physical_block_size(fd)
                    .map_err(probe_err("BLKPBSZGET"))?
                    .max(info.logical_block_size);
                sys::blk_size(fd).map_err(probe_err("BLKGETSIZE64"))?
            }
            _ => {
                info.physical_block_size = u32::try_from(meta.blksize()).unwrap_or(4096).max(512);
                meta.len()
            }
        };

        if direct {
            let (mem_align, offset_align) = sys::statx_dio_align(fd)
                .or_else(|| probed_dio_align(&file, kind, info.logical_block_size))
                .unwrap_or((info.logical_block_size, info.logical_block_size));
            info.logical_block_size = info.logical_block_size.max(offset_align);
            info.physical_block_size = info.physical_block_size.max(info.logical_block_size);
            info.buffer_alignment = mem_align.max(1);
        }

        if !options.read_only {
            match kind {
                StorageKind::BlockDevice => probe_blk_discard(&mut info, &meta, fd),
                _ => probe_file_discard(&mut info, raw_size, fd, path),
            }
        }

        let lbs = u64::from(info.logical_block_size);
        info.size_bytes = raw_size - raw_size % lbs;
        if info.size_bytes != raw_size {
            tracing::warn!(path = %path.display(), raw_size, usable = info.size_bytes,
                "size is not a multiple of the logical block size; the tail is not exposed");
        }
        tracing::info!(path = %path.display(), ?kind, size = info.size_bytes,
            lbs = info.logical_block_size, direct, discard = info.discard,
            secure_discard = info.secure_discard, read_only = info.read_only, "storage opened");

        Ok(RawStorage {
            file: Arc::new(file),
            path: path.to_path_buf(),
            size: Arc::new(AtomicU64::new(info.size_bytes)),
            info,
            max_transfer: AtomicU32::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Test hook: queues opened after this call hand at most `bytes` to the kernel per
    /// submission, so every larger transfer completes short and exercises the resubmission
    /// path against the real kernel. 0 removes the cap.
    #[cfg(any(test, feature = "testing"))]
    pub fn set_max_transfer_for_testing(&self, bytes: u32) {
        self.max_transfer.store(bytes, Ordering::Relaxed);
    }

    fn current_raw_size(&self) -> io::Result<u64> {
        match self.info.kind {
            StorageKind::BlockDevice => sys::blk_size(self.file.as_raw_fd()),
            _ => Ok(self.file.metadata()?.len()),
        }
    }
}

impl Storage for RawStorage {
    fn info(&self) -> StorageInfo {
        StorageInfo {
            size_bytes: self.size.load(Ordering::Acquire),
            ..self.info
        }
    }

    fn refresh_size(&self) -> io::Result<u64> {
        let raw = self.current_raw_size()?;
        let size = raw - raw % u64::from(self.info.logical_block_size);
        let old = self.size.swap(size, Ordering::AcqRel);
        if old != size {
            tracing::info!(path = %self.path.display(), old, new = size, "storage size changed");
        }
        Ok(size)
    }

    fn open_queue(&self, depth: u32) -> Result<Box<dyn StorageQueue>, StorageError> {
        if depth == 0 || depth > MAX_QUEUE_DEPTH {
            return Err(StorageError::InvalidDepth {
                depth,
                max: MAX_QUEUE_DEPTH,
            });
        }
        let max_transfer = self.max_transfer.load(Ordering::Relaxed);
        let queue = UringQueue::new(
            UringTarget {
                file: Arc::clone(&self.file),
                info: self.info,
                size: Arc::clone(&self.size),
                max_transfer: (max_transfer > 0).then_some(max_transfer),
            },
            depth,
        )?;
        Ok(Box::new(queue))
    }
}

fn direct_refused(path: &Path, e: io::Error) -> StorageError {
    StorageError::DirectIoUnsupported {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Some file systems accept O_DIRECT at open and refuse it at I/O time; one aligned read
/// at offset 0 tells. Tries the alignments a direct read can need.
pub(crate) fn probe_direct_read(file: &File) -> io::Result<()> {
    let mut last = io::Error::from_raw_os_error(libc::EINVAL);
    for align in [512usize, 4096] {
        let mut buf = AlignedBuf::new(align, align);
        match file.read_at(buf.as_mut_slice(), 0) {
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// Direct-I/O alignment for kernels without `STATX_DIOALIGN`: the smallest probe read
/// that works (files), or the logical block size (block devices).
fn probed_dio_align(file: &File, kind: StorageKind, lbs: u32) -> Option<(u32, u32)> {
    if kind == StorageKind::BlockDevice {
        return Some((lbs, lbs));
    }
    if file.metadata().ok()?.len() < 4096 {
        // A read at end-of-file returns 0 before any alignment check: nothing to learn.
        return None;
    }
    [512u32, 4096].into_iter().find_map(|align| {
        let mut buf = AlignedBuf::new(align as usize, align as usize);
        file.read_at(buf.as_mut_slice(), u64::from(align))
            .ok()
            .map(|_| (align, align))
    })
}

fn probe_file_discard(info: &mut StorageInfo, size: u64, fd: i32, path: &Path) {
    // Punching a hole beyond end-of-file with KEEP_SIZE changes nothing, but tells whether
    // the file system implements PUNCH_HOLE at all.
    const MIB: u64 = 1 << 20;
    let probe_at = size.div_ceil(MIB) * MIB + MIB;
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    match sys::fallocate(fd, mode, probe_at, 4096) {
        Ok(()) => {
            info.discard = true;
            info.discard_granularity = info.physical_block_size.max(info.logical_block_size);
            info.discard_alignment = 0;
        }
        Err(e) => {
            tracing::info!(path = %path.display(), error = %e,
                "file system cannot punch holes; discard not offered");
        }
    }
}

fn probe_blk_discard(info: &mut StorageInfo, meta: &std::fs::Metadata, fd: i32) {
    let dev_dir = sys::sysfs_dev_dir(meta.rdev());
    let queue = sys::sysfs_queue_dir(&dev_dir);
    let max = sys::sysfs_u64(&queue.join("discard_max_bytes")).unwrap_or(0);
    if max == 0 {
        return;
    }
    info.discard = true;
    let lbs = info.logical_block_size;
    info.discard_granularity = sys::sysfs_u64(&queue.join("discard_granularity"))
        .and_then(|g| u32::try_from(g).ok())
        .filter(|&g| g > 0)
        .unwrap_or(lbs)
        .max(lbs);
    info.discard_alignment = sys::sysfs_u64(&dev_dir.join("discard_alignment"))
        .and_then(|a| u32::try_from(a).ok())
        .unwrap_or(0);
    info.secure_discard = sys::blk_probe_secure_discard(fd);
}
