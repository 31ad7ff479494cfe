//! Address-space plumbing of the simulator: mapping memfds, whole or frame by frame.
//!
//! This is the only `unsafe` of [`sim`](super): `mmap`/`munmap` and wrapping the result
//! in a [`SharedMemory`]. Every memfd reaching here is sealed against shrinking and was
//! checked to be at least as large as the range mapped (see `SimPlatform::admit` and
//! `SimGuest::new`), so no access through these mappings can fault with SIGBUS even if
//! the other process misbehaves or dies.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use shmem::{SharedMemory, PAGE_SIZE};

/// Maps `len` bytes (rounded up to pages) of `fd` from offset 0, shared and read-write:
/// guest memory on the guest side, the grant table on both sides.
///
/// The caller guarantees the file is at least `len` bytes and sealed against shrinking.
pub(crate) fn map_file(fd: BorrowedFd<'_>, len: usize) -> io::Result<SharedMemory> {
    let map_len = len.div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE;
    // SAFETY: a fresh shared mapping of a file we hold open, at an address the kernel
    // chooses; no existing memory is affected. The result is checked below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let ptr =
        NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
    let release = Box::new(move |p: NonNull<u8>, _len: usize| {
        // SAFETY: unmaps exactly the mapping created above, once (SharedMemory runs
        // `release` only on drop).
        if unsafe { libc::munmap(p.as_ptr().cast(), map_len) } != 0 {
            tracing::error!(error = %io::Error::last_os_error(), "munmap of a simulator mapping failed");
        }
    });
    // SAFETY: the mapping is readable and writable for `map_len >= len` bytes until
    // `release` unmaps it; it is page aligned; the file behind it cannot shrink (sealed),
    // so every byte stays backed.
    Ok(unsafe { SharedMemory::from_raw_parts(ptr, len, Some(release)) })
}

/// Maps one frame of `fd` on its own (one `mmap`): a single grant. `on_release` runs
/// after the page is unmapped. Same contract as [`map_frames`].
pub(crate) fn map_frame(
    fd: BorrowedFd<'_>,
    frame: u32,
    writable: bool,
    on_release: Box<dyn FnOnce() + Send + Sync>,
) -> io::Result<SharedMemory> {
    let prot = if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    // SAFETY: a fresh shared mapping of one page of a file we hold open, at a
    // kernel-chosen address; the offset is a page-aligned frame inside the file (the
    // caller's contract). The result is checked below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE_SIZE,
            prot,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            (u64::from(frame) * PAGE_SIZE as u64) as libc::off_t,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let ptr =
        NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
    let release = Box::new(move |p: NonNull<u8>, _len: usize| {
        // SAFETY: unmaps exactly the page mapped above, once, on drop of its owner.
        if unsafe { libc::munmap(p.as_ptr().cast(), PAGE_SIZE) } != 0 {
            tracing::error!(error = %io::Error::last_os_error(), "munmap of a grant mapping failed");
        }
        on_release();
    });
    // SAFETY: one page, page aligned, backed by a page of a file that cannot shrink, and
    // mapped until `release` runs. Writable when `writable`; when not, the only owner
    // (GrantMapping) never writes through it.
    Ok(unsafe { SharedMemory::from_raw_parts(ptr, PAGE_SIZE, Some(release)) })
}

/// How many runs of consecutive frames `frames` holds: the `mmap`s (VMAs)
/// [`map_frames`] makes for it. Adjacent runs never merge into one VMA: they map
/// non-consecutive offsets of the file.
pub(crate) fn runs(frames: &[u32]) -> usize {
    let breaks = frames
        .windows(2)
        .filter(|w| u64::from(w[1]) != u64::from(w[0]) + 1)
        .count();
    usize::from(!frames.is_empty()) + breaks
}

/// Maps `frames` (page indices into `fd`) as one virtually contiguous region, page `i`
/// backed by `frames[i]`, the way gntdev maps a grant batch: zero copy, the same pages
/// the guest sees. Runs of consecutive frames share one `mmap`. `on_release` runs after
/// the region is unmapped (the simulator unpins the grants there).
///
/// The caller guarantees every frame lies inside the file and the file cannot shrink.
/// A read-only region is mapped `PROT_READ` only; the [`SharedMemory`] returned for it
/// must then be used for reads only, which [`crate::GrantMapping`] enforces.
pub(crate) fn map_frames(
    fd: BorrowedFd<'_>,
    frames: &[u32],
    writable: bool,
    on_release: Box<dyn FnOnce() + Send + Sync>,
) -> io::Result<SharedMemory> {
    let len = frames
        .len()
        .checked_mul(PAGE_SIZE)
        .filter(|&l| l > 0)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    // Reserve the whole range first so the pages can be placed contiguously.
    // SAFETY: fresh anonymous reservation at a kernel-chosen address; checked below.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base = base.cast::<u8>();
    let prot = if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    let mut i = 0;
    while i < frames.len() {
        let mut run = 1;
        while i + run < frames.len()
            && u64::from(frames[i + run]) == u64::from(frames[i]) + run as u64
        {
            run += 1;
        }
        // SAFETY: `base + i*PAGE_SIZE .. + run*PAGE_SIZE` lies inside the reservation we
        // own (i + run <= frames.len()), so MAP_FIXED replaces only our own PROT_NONE
        // pages; the file offset is a page-aligned frame inside the file.
        let p = unsafe {
            libc::mmap(
                base.add(i * PAGE_SIZE).cast(),
                run * PAGE_SIZE,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                (u64::from(frames[i]) * PAGE_SIZE as u64) as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            let err = io::Error::last_os_error();
            // SAFETY: drops the reservation (and any pages placed in it) made above; no
            // reference into it escaped.
            unsafe { libc::munmap(base.cast(), len) };
            return Err(err);
        }
        i += run;
    }
    let ptr = NonNull::new(base).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
    let release = Box::new(move |p: NonNull<u8>, _len: usize| {
        // SAFETY: unmaps exactly the region built above, once, on drop of its owner.
        if unsafe { libc::munmap(p.as_ptr().cast(), len) } != 0 {
            tracing::error!(error = %io::Error::last_os_error(), "munmap of a grant mapping failed");
        }
        on_release();
    });
    // SAFETY: the region is `len` bytes, page aligned, fully backed by pages of a file
    // that cannot shrink, and stays mapped until `release` runs. It is writable when
    // `writable`; when not, the only owner (GrantMapping) never writes through it.
    Ok(unsafe { SharedMemory::from_raw_parts(ptr, len, Some(release)) })
}
