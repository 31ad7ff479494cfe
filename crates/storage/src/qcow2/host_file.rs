//! The files under a qcow2 image, as imago sees them.
//!
//! [`HostFile`] is imago's own `file::File` (which does the metadata I/O, with its alignment
//! handling for O_DIRECT) plus a duplicate descriptor of the same open file that the queues
//! hand to io_uring when a data mapping resolves to this file. Every I/O method also checks
//! [`lookup_only`]: a reactor thread looks mappings up with I/O forbidden, so an L2 table
//! that is not cached fails the lookup at once (`WouldBlock`) instead of blocking the
//! reactor, and the request goes to the queue's worker, which loads it.
//!
//! [`HostFile::mem_align`] is the kernel's direct-I/O memory alignment, not imago's probed
//! one: imago probes it by reads whose length is the alignment too, so on a file that
//! takes 512-byte requests it skips from 4 to the page size and reports 4096. imago pads
//! any write whose buffers are not aligned to that into a read-modify-write of whole
//! 4 KiB blocks, under its own range locks only; a write a reactor submits to io_uring
//! meanwhile into the same block (another piece of the same page, from this queue or
//! another) is then overwritten with the stale bytes imago read. With the real alignment
//! (and the image's logical block size at least that, see `Qcow2Storage::open`) every
//! write the worker hands imago is aligned and imago never pads a data write.

use std::cell::Cell;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use imago::io_buffers::{IoVector, IoVectorMut};
use imago::storage::drivers::CommonStorageHelper;
use imago::storage::PreallocateMode;
use imago::{Storage, StorageOpenOptions};

thread_local! {
    static LOOKUP_ONLY: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with storage I/O forbidden on this thread (see the module doc).
pub(crate) fn lookup_only<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            LOOKUP_ONLY.with(|c| c.set(self.0));
        }
    }
    let _reset = Reset(LOOKUP_ONLY.with(|c| c.replace(true)));
    f()
}

fn check_io_allowed() -> io::Result<()> {
    if LOOKUP_ONLY.with(Cell::get) {
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            "qcow2 metadata I/O is not done on a reactor thread",
        ))
    } else {
        Ok(())
    }
}

/// One file of a qcow2 chain: imago's file plus the descriptor io_uring uses.
pub(crate) struct HostFile {
    inner: imago::file::File,
    io_fd: OwnedFd,
    path: PathBuf,
    /// See the module doc.
    mem_align: usize,
}

impl HostFile {
    /// Wraps an open file; `writable` and `direct` must match how it was opened.
    pub(crate) fn new(
        file: std::fs::File,
        path: &Path,
        writable: bool,
        direct: bool,
    ) -> io::Result<HostFile> {
        let io_fd = OwnedFd::from(file.try_clone()?);
        let opts = StorageOpenOptions::new()
            .write(writable)
            .direct(direct)
            .filename(path);
        let inner = imago::file::File::from_open_file(file, opts)?;
        let mem_align = if direct {
            direct_mem_align(&io_fd, inner.req_align(), inner.mem_align())
        } else {
            inner.mem_align()
        };
        Ok(HostFile {
            inner,
            io_fd,
            path: path.to_path_buf(),
            mem_align,
        })
    }

    /// The descriptor the queues submit data I/O on (same open file description).
    pub(crate) fn io_fd(&self) -> RawFd {
        self.io_fd.as_raw_fd()
    }
}

/// The memory alignment (of addresses and of lengths, as imago uses it) direct I/O on `fd`
/// needs, at least `req_align` and at most imago's `probed`: the kernel's
/// `STATX_DIOALIGN`, else a probe read; imago's value when neither tells.
fn direct_mem_align(fd: &OwnedFd, req_align: usize, probed: usize) -> usize {
    if probed <= req_align {
        return probed;
    }
    if let Some((mem, offset)) = crate::sys::statx_dio_align(fd.as_raw_fd()) {
        return (mem as usize)
            .max(offset as usize)
            .max(req_align)
            .min(probed);
    }
    let Ok(fd) = fd.try_clone() else {
        return probed;
    };
    if reads_at_alignment(&std::fs::File::from(fd), req_align) {
        req_align
    } else {
        probed
    }
}

/// Whether a direct read of `align` bytes into memory aligned to `align` but not to
/// `2 * align` works. A file shorter than `align` answers at end-of-file before any
/// alignment check, so it tells nothing: false.
fn reads_at_alignment(file: &std::fs::File, align: usize) -> bool {
    if file.metadata().map(|m| m.len()).unwrap_or(0) < align as u64 {
        return false;
    }
    let mut buf = crate::AlignedBuf::page_aligned(2 * align.max(4096));
    let slice = &mut buf.as_mut_slice()[align..2 * align];
    std::os::unix::fs::FileExt::read_at(file, slice, 0).is_ok()
}

impl fmt::Debug for HostFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostFile")
            .field("path", &self.path)
            .finish()
    }
}

impl fmt::Display for HostFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())
    }
}

impl Storage for HostFile {
    fn mem_align(&self) -> usize {
        self.mem_align
    }

    fn req_align(&self) -> usize {
        self.inner.req_align()
    }

    fn zero_align(&self) -> usize {
        self.inner.zero_align()
    }

    fn discard_align(&self) -> usize {
        self.inner.discard_align()
    }

    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }

    fn resolve_relative_path<P: AsRef<Path>>(&self, relative: P) -> io::Result<PathBuf> {
        self.inner.resolve_relative_path(relative)
    }

    fn get_filename(&self) -> Option<PathBuf> {
        Some(self.path.clone())
    }

    unsafe fn pure_readv(&self, bufv: IoVectorMut<'_>, offset: u64) -> io::Result<()> {
        check_io_allowed()?;
        // SAFETY: forwarded unchanged; imago's caller gave the same guarantees.
        unsafe { self.inner.pure_readv(bufv, offset) }
    }

    unsafe fn pure_writev(&self, bufv: IoVector<'_>, offset: u64) -> io::Result<()> {
        check_io_allowed()?;
        // SAFETY: forwarded unchanged; imago's caller gave the same guarantees.
        unsafe { self.inner.pure_writev(bufv, offset) }
    }

    unsafe fn pure_write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        check_io_allowed()?;
        // SAFETY: forwarded unchanged; imago's caller gave the same guarantees.
        unsafe { self.inner.pure_write_zeroes(offset, length) }
    }

    unsafe fn pure_write_allocated_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        check_io_allowed()?;
        // SAFETY: forwarded unchanged; imago's caller gave the same guarantees.
        unsafe { self.inner.pure_write_allocated_zeroes(offset, length) }
    }

    unsafe fn pure_discard(&self, offset: u64, length: u64) -> io::Result<()> {
        check_io_allowed()?;
        // SAFETY: forwarded unchanged; imago's caller gave the same guarantees.
        unsafe { self.inner.pure_discard(offset, length) }
    }

    fn flush(&self) -> io::Result<()> {
        check_io_allowed()?;
        self.inner.flush()
    }

    fn sync(&self) -> io::Result<()> {
        check_io_allowed()?;
        self.inner.sync()
    }

    fn settle_writes(&self) -> io::Result<()> {
        check_io_allowed()?;
        self.inner.settle_writes()
    }

    unsafe fn invalidate_cache(&self) -> io::Result<()> {
        // SAFETY: forwarded unchanged; imago's caller gave the same guarantees.
        unsafe { self.inner.invalidate_cache() }
    }

    fn get_storage_helper(&self) -> &CommonStorageHelper {
        self.inner.get_storage_helper()
    }

    fn resize(&self, new_size: u64, prealloc_mode: PreallocateMode) -> io::Result<()> {
        check_io_allowed()?;
        self.inner.resize(new_size, prealloc_mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    fn direct_file(len: usize) -> Option<(tempfile::TempDir, PathBuf, std::fs::File)> {
        let dir = tempfile::tempdir().ok()?;
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; len]).ok()?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&path)
            .ok()?;
        Some((dir, path, file))
    }

    #[test]
    fn direct_memory_alignment_is_what_the_kernel_takes() {
        let Some((_dir, path, file)) = direct_file(1 << 16) else {
            eprintln!("SKIP: the temporary directory does not take O_DIRECT");
            return;
        };
        let probe = file.try_clone().unwrap();
        let host = HostFile::new(file, &path, true, true).unwrap();
        let (req, mem) = (host.req_align(), host.mem_align());
        assert!(mem >= req && mem <= host.inner.mem_align(), "{req} {mem}");
        // What we tell imago must hold: a read into memory aligned to `mem` only.
        assert!(reads_at_alignment(&probe, mem), "mem_align {mem} refused");
        // An empty file cannot tell.
        let (_dir2, _, empty) = direct_file(0).unwrap();
        assert!(!reads_at_alignment(&empty, mem));
    }
}
