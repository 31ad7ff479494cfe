//! Test support: several `SharedMemory` views of one memory, as two domains have.
//!
//! `SharedMemory` owns its mapping, and a ring side takes ownership of one, so a test
//! that runs a frontend and a backend needs two handles to the same pages. These
//! helpers are the only `unsafe` in the tests; each block says why it is sound.

#![allow(dead_code)]

use std::fs::File;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::Arc;

use shmem::SharedMemory;

/// Two handles to one fresh zeroed anonymous mapping of `len` bytes: the first for the
/// frontend, the second for the backend. The mapping lives until both are dropped.
pub fn shared_pair(len: usize) -> (SharedMemory, SharedMemory) {
    let (a, b, _) = shared_triple(len);
    (a, b)
}

/// Three views of the same fresh pages: a frontend and two backends in turn (a ring one
/// backend process left and the next one resumes).
#[allow(dead_code)]
pub fn shared_triple(len: usize) -> (SharedMemory, SharedMemory, SharedMemory) {
    let owner = Arc::new(SharedMemory::anonymous(len).expect("anonymous mapping"));
    let view = |owner: Arc<SharedMemory>| {
        let ptr = NonNull::new(owner.as_ptr()).expect("mmap never returns null");
        // SAFETY: `ptr` is the page-aligned start of `owner`'s mapping, valid for `len`
        // bytes while `owner` lives; the release closure holds an `Arc` to `owner`, so
        // the mapping outlives this view. Access is volatile through SharedMemory only.
        unsafe { SharedMemory::from_raw_parts(ptr, len, Some(Box::new(move |_, _| drop(owner)))) }
    };
    (view(owner.clone()), view(owner.clone()), view(owner))
}

/// `n` views of the same fresh pages (a frontend, or an inspector, and backends that
/// replace each other).
pub fn shared_views(len: usize, n: usize) -> Vec<SharedMemory> {
    let owner = Arc::new(SharedMemory::anonymous(len).expect("anonymous mapping"));
    (0..n)
        .map(|_| {
            let owner = owner.clone();
            let ptr = NonNull::new(owner.as_ptr()).expect("mmap never returns null");
            // SAFETY: as in `shared_triple`: the view's release closure keeps the mapping
            // alive; access is volatile through SharedMemory only.
            unsafe {
                SharedMemory::from_raw_parts(ptr, len, Some(Box::new(move |_, _| drop(owner))))
            }
        })
        .collect()
}

/// Maps `len` bytes of `file` at `offset` (page aligned) shared, as the C frontend
/// maps the same file.
pub fn map_file(file: &File, offset: usize, len: usize) -> SharedMemory {
    assert_eq!(offset % 4096, 0);
    // SAFETY: a fresh shared mapping of an open file, no address hint; checked below.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            offset as libc::off_t,
        )
    };
    assert_ne!(
        ptr,
        libc::MAP_FAILED,
        "mmap: {}",
        std::io::Error::last_os_error()
    );
    let ptr = NonNull::new(ptr.cast::<u8>()).expect("mmap never returns null");
    let release = Box::new(move |p: NonNull<u8>, _| {
        // SAFETY: unmaps exactly the mapping created above, once, when its owner drops.
        unsafe { libc::munmap(p.as_ptr().cast(), len) };
    });
    // SAFETY: the mapping is valid for `len` bytes until `release` runs, page aligned.
    unsafe { SharedMemory::from_raw_parts(ptr, len, Some(release)) }
}
