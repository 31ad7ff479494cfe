//! The files under a qcow2 image, as imago sees them.
//!
//! [`HostFile`] is imago's own `file::File` (which does the metadata I/O, with its alignment
//! handling for O_DIRECT) plus a duplicate descriptor of the same open file that the queues
//! hand to io_uring when a data mapping resolves to this file. Every I/O method also checks
//! [`lookup_only`]: a reactor thread looks mappings up with I/O forbidden, so an L2 table
//! that is not cached fails the lookup at once (`WouldBlock`) instead of blocking the
//! reactor, and the request goes to the queue's worker, which loads it.

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
        Ok(HostFile {
            inner: imago::file::File::from_open_file(file, opts)?,
            io_fd,
            path: path.to_path_buf(),
        })
    }

    /// The descriptor the queues submit data I/O on (same open file description).
    pub(crate) fn io_fd(&self) -> RawFd {
        self.io_fd.as_raw_fd()
    }
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
        self.inner.mem_align()
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
