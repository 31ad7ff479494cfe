//! The file behind a ring's journal (`blkif::journal`): one per ring in the daemon's run
//! directory, mapped `MAP_SHARED`, so what a killed process recorded is still there for
//! the process that adopts the ring. The run directory is a tmpfs (`/run/xenblkd`): the
//! journal costs page-cache memory only and never outlives a host reboot, after which
//! no ring it could describe exists.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::ptr::NonNull;

use shmem::SharedMemory;

/// Creates (or empties) the journal file at `path`, sizes it to `len` and maps it: the
/// mapping reads as a blank journal.
pub(crate) fn map_fresh(path: &Path, len: usize) -> io::Result<SharedMemory> {
    let file = open(path, true)?;
    file.set_len(u64::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?)?;
    map_file(&file, len)
}

/// Maps the journal a previous process left at `path` for recovery, at the file's own
/// length when it is not `len` (another build's format or geometry, or a damaged file:
/// `blkif::journal` judges it from its header), at most [`MAX_FOREIGN_LEN`] bytes of it.
/// A missing or empty file is created at `len` and reads as blank.
pub(crate) fn map_existing(path: &Path, len: usize) -> io::Result<SharedMemory> {
    let file = open(path, false)?;
    let found = usize::try_from(file.metadata()?.len()).unwrap_or(usize::MAX);
    if found == 0 {
        let want = u64::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        file.set_len(want)?;
        return map_file(&file, len);
    }
    map_file(&file, found.min(MAX_FOREIGN_LEN))
}

/// The most of a journal of unexpected length that is mapped to read its header (the
/// largest this build writes is 64 + 2048 * 128 bytes).
const MAX_FOREIGN_LEN: usize = 1 << 20;

fn open(path: &Path, fresh: bool) -> io::Result<std::fs::File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(fresh)
        .mode(0o600)
        .open(path)
}

/// Maps the first `len` bytes of `file` (at most its length).
fn map_file(file: &std::fs::File, len: usize) -> io::Result<SharedMemory> {
    // SAFETY: a fresh shared mapping of `len` bytes of a file at least that long (sized
    // or measured by the caller); no address hint; the result is checked. Nothing else
    // in this process maps the file, and the memory is only ever accessed through
    // `SharedMemory`'s volatile accessors, never through Rust references.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
    let release = Box::new(move |p: NonNull<u8>, l: usize| {
        // SAFETY: unmapping exactly the mapping made above, once, on drop.
        unsafe { libc::munmap(p.as_ptr().cast(), l) };
    });
    // SAFETY: the mapping is valid for `len` bytes until the release callback unmaps it
    // (the descriptor may close: a mapping keeps its file), and mmap returns page-aligned
    // addresses.
    Ok(unsafe { SharedMemory::from_raw_parts(ptr, len, Some(release)) })
}
