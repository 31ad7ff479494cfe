//! The guest's side of `/dev/xen`, for a frontend in userspace inside a domU (the
//! `conform` crate's real-Xen target): pages granted to another domain through
//! `/dev/xen/gntalloc`, and unbound event channels through `/dev/xen/evtchn`.
//!
//! * `IOCTL_GNTALLOC_ALLOC_GREF` allocates `count` zeroed pages in the kernel, grants each
//!   to `domid` (writable or read-only, fixed at allocation) and returns one grant
//!   reference per page and an offset; `mmap` of the gntalloc fd at that offset gives
//!   the pages. Freeing is `munmap` then `IOCTL_GNTALLOC_DEALLOC_GREF`; the kernel ends
//!   foreign access then, and keeps a page the remote still maps until it unmaps it
//!   (the guest cannot observe that from userspace).
//! * `IOCTL_EVTCHN_BIND_UNBOUND_PORT` allocates a port for a remote domain to bind
//!   (`xenbus_alloc_evtchn`); notifications arrive as ports read from the fd, each
//!   masked until written back; `IOCTL_EVTCHN_UNBIND` closes it.
//!
//! **Untested until the real-Xen lab**, like the rest of this module: here only the ABI
//! (`tests/linux_abi.rs`) and the typed error without Xen are checked.

use std::ffi::c_void;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

use shmem::{SharedMemory, PAGE_SIZE};

use super::{abi, open_dev};
use crate::{DomId, GrantRef, PlatformError, Port};

/// Most pages one gntalloc call allocates here (the driver's own limit is its `limit`
/// module parameter, 1024 by default, for all of the process's grants).
pub const MAX_ALLOC_BATCH: usize = 256;

/// `/dev/xen/gntalloc`, opened once.
#[derive(Debug, Clone)]
pub struct Gntalloc {
    fd: Arc<OwnedFd>,
}

/// Pages allocated and granted by one `IOCTL_GNTALLOC_ALLOC_GREF`, mapped here. Dropping
/// them unmaps and deallocates (the kernel ends the grants).
#[derive(Debug)]
pub struct GrantedPages {
    grefs: Vec<GrantRef>,
    mem: SharedMemory,
}

impl GrantedPages {
    /// One grant reference per page, in page order.
    pub fn grefs(&self) -> &[GrantRef] {
        &self.grefs
    }

    /// The pages, contiguous in this process.
    pub fn memory(&self) -> &SharedMemory {
        &self.mem
    }

    /// Another handle on all of the pages (a shared ring's pages for the ring code),
    /// which keeps them allocated and mapped until it is dropped too.
    pub fn view(self: &Arc<Self>) -> SharedMemory {
        let keep = Arc::clone(self);
        let release = Box::new(move |_: NonNull<u8>, _: usize| drop(keep));
        let ptr = NonNull::new(self.mem.as_ptr()).unwrap_or(NonNull::dangling());
        // SAFETY: the region is `self.mem`'s mapping, valid for reads and writes of its
        // length and page aligned; the release callback holds an `Arc` on the pages, so
        // the mapping outlives this handle.
        unsafe { SharedMemory::from_raw_parts(ptr, self.mem.len(), Some(release)) }
    }
}

impl Gntalloc {
    /// Opens `/dev/xen/gntalloc`.
    pub fn open() -> Result<Self, PlatformError> {
        Self::open_in(Path::new(super::DEFAULT_DEV_DIR))
    }

    /// Opens `gntalloc` in `dev_dir`.
    pub fn open_in(dev_dir: &Path) -> Result<Self, PlatformError> {
        let file = open_dev(&dev_dir.join("gntalloc"))?;
        Ok(Self {
            fd: Arc::new(OwnedFd::from(file)),
        })
    }

    /// Allocates `count` pages granted to `domid`, writable by it unless `readonly`.
    pub fn alloc(
        &self,
        domid: DomId,
        count: usize,
        readonly: bool,
    ) -> Result<Arc<GrantedPages>, PlatformError> {
        if count == 0 || count > MAX_ALLOC_BATCH {
            return Err(PlatformError::Protocol(format!(
                "gntalloc batch of {count} pages (1..={MAX_ALLOC_BATCH})"
            )));
        }
        // Header (domid, flags, count: one u64 word; index: one word) then `count` u32
        // grant refs, in u64 words so the buffer is aligned like the C struct.
        let words = 2 + count.div_ceil(2);
        let mut buf = vec![0u64; words];
        let flags = if readonly {
            0
        } else {
            abi::GNTALLOC_FLAG_WRITABLE
        };
        #[allow(clippy::cast_possible_truncation)]
        let count32 = count as u32;
        let mut head = [0u8; 8];
        head[..2].copy_from_slice(&domid.to_ne_bytes());
        head[2..4].copy_from_slice(&flags.to_ne_bytes());
        head[4..].copy_from_slice(&count32.to_ne_bytes());
        buf[0] = u64::from_ne_bytes(head);
        // SAFETY: the buffer holds `struct ioctl_gntalloc_alloc_gref` (domid, flags, count
        // in the first word, index in the second) followed by room for `count` u32 grant
        // refs, which is exactly what IOCTL_GNTALLOC_ALLOC_GREF reads and writes.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                abi::IOCTL_GNTALLOC_ALLOC_GREF as _,
                buf.as_mut_ptr(),
            )
        };
        if rc < 0 {
            return Err(PlatformError::io(
                "IOCTL_GNTALLOC_ALLOC_GREF",
                io::Error::last_os_error(),
            ));
        }
        let index = buf[1];
        let grefs: Vec<GrantRef> = buf[2..]
            .iter()
            .flat_map(|w| {
                let b = w.to_ne_bytes();
                [
                    u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
                    u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
                ]
            })
            .take(count)
            .collect();
        let len = count * PAGE_SIZE;
        // SAFETY: a fresh shared mapping of the gntalloc range `index` allocated above, at
        // a kernel-chosen address; the result is checked. The pages are ours: always
        // mapped read-write, whatever the remote domain may do with them.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.fd.as_raw_fd(),
                index as libc::off_t,
            )
        };
        let ptr = match NonNull::new(ptr.cast::<u8>()) {
            Some(p) if ptr != libc::MAP_FAILED => p,
            _ => {
                let e = io::Error::last_os_error();
                dealloc(&self.fd, index, count32);
                return Err(PlatformError::io("mmap /dev/xen/gntalloc", e));
            }
        };
        let fd = self.fd.clone();
        let release = Box::new(move |p: NonNull<u8>, len: usize| {
            // SAFETY: unmaps exactly the mapping created above, once.
            if unsafe { libc::munmap(p.as_ptr().cast::<c_void>(), len) } != 0 {
                tracing::error!(error = %io::Error::last_os_error(), "munmap of gntalloc pages failed");
            }
            dealloc(&fd, index, count32);
        });
        // SAFETY: the mapping is `len` bytes, page aligned, readable and writable, and
        // valid until `release` runs when the SharedMemory is dropped.
        let mem = unsafe { SharedMemory::from_raw_parts(ptr, len, Some(release)) };
        Ok(Arc::new(GrantedPages { grefs, mem }))
    }
}

fn dealloc(fd: &OwnedFd, index: u64, count: u32) {
    let d = abi::ioctl_gntalloc_dealloc_gref { index, count };
    // SAFETY: IOCTL_GNTALLOC_DEALLOC_GREF only reads this struct.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), abi::IOCTL_GNTALLOC_DEALLOC_GREF as _, &d) };
    if rc < 0 {
        tracing::warn!(index, count, error = %io::Error::last_os_error(), "IOCTL_GNTALLOC_DEALLOC_GREF failed");
    }
}

/// An unbound event channel offered to a remote domain (`xenbus_alloc_evtchn`), on an
/// evtchn fd of its own. Unbound on drop.
#[derive(Debug)]
pub struct UnboundEventChannel {
    fd: OwnedFd,
    port: Port,
}

impl UnboundEventChannel {
    /// Allocates a port that `remote` may bind, using the evtchn device at `path`
    /// (`/dev/xen/evtchn`).
    pub fn alloc(path: &Path, remote: DomId) -> Result<Self, PlatformError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path)
            .map_err(|source| PlatformError::DeviceMissing {
                path: PathBuf::from(path),
                source,
            })?;
        let fd = OwnedFd::from(file);
        let b = abi::ioctl_evtchn_bind_unbound_port {
            remote_domain: remote.into(),
        };
        // SAFETY: IOCTL_EVTCHN_BIND_UNBOUND_PORT only reads this struct; the new port is
        // the return value.
        let rc =
            unsafe { libc::ioctl(fd.as_raw_fd(), abi::IOCTL_EVTCHN_BIND_UNBOUND_PORT as _, &b) };
        if rc < 0 {
            return Err(PlatformError::io(
                "IOCTL_EVTCHN_BIND_UNBOUND_PORT",
                io::Error::last_os_error(),
            ));
        }
        #[allow(clippy::cast_sign_loss)]
        let port = rc as Port;
        Ok(Self { fd, port })
    }

    /// Our port: what the frontend publishes as `event-channel`.
    pub fn port(&self) -> Port {
        self.port
    }

    /// Kicks the remote end.
    pub fn notify(&self) -> Result<(), PlatformError> {
        let n = abi::ioctl_evtchn_notify { port: self.port };
        // SAFETY: IOCTL_EVTCHN_NOTIFY only reads this struct.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), abi::IOCTL_EVTCHN_NOTIFY as _, &n) };
        if rc < 0 {
            return Err(PlatformError::io(
                "IOCTL_EVTCHN_NOTIFY",
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Waits up to `timeout` for a notification, consumes every one queued and unmasks
    /// the port. `Ok(true)` if one came.
    pub fn wait(&self, timeout: Duration) -> Result<bool, PlatformError> {
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        let mut fds = [rustix::event::PollFd::new(
            &self.fd,
            rustix::event::PollFlags::IN,
        )];
        let ts = rustix::event::Timespec {
            tv_sec: i64::from(ms / 1000),
            tv_nsec: i64::from(ms % 1000) * 1_000_000,
        };
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(PlatformError::io("poll /dev/xen/evtchn", e)),
        }
        let mut pending = [0u8; 4 * 16];
        let mut fired = false;
        loop {
            match rustix::io::read(&self.fd, &mut pending) {
                Ok(n) if n >= 4 => fired = true,
                Ok(_) | Err(rustix::io::Errno::AGAIN) => break,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(PlatformError::io("read /dev/xen/evtchn", e)),
            }
        }
        if fired {
            // One port on this fd: unmask it once, whatever was queued.
            loop {
                match rustix::io::write(&self.fd, &self.port.to_ne_bytes()) {
                    Ok(_) => break,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(PlatformError::io("unmask /dev/xen/evtchn", e)),
                }
            }
        }
        Ok(fired)
    }

    /// The pollable fd.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for UnboundEventChannel {
    fn drop(&mut self) {
        let u = abi::ioctl_evtchn_unbind { port: self.port };
        // SAFETY: IOCTL_EVTCHN_UNBIND only reads this struct.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), abi::IOCTL_EVTCHN_UNBIND as _, &u) };
        if rc < 0 {
            tracing::warn!(port = self.port, error = %io::Error::last_os_error(), "IOCTL_EVTCHN_UNBIND failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_xen_the_devices_are_a_typed_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            Gntalloc::open_in(dir.path()),
            Err(PlatformError::DeviceMissing { .. })
        ));
        assert!(matches!(
            UnboundEventChannel::alloc(&dir.path().join("evtchn"), 0),
            Err(PlatformError::DeviceMissing { .. })
        ));
    }

    #[test]
    fn batch_sizes_are_checked_before_any_ioctl() {
        // A regular file stands in for the device: the size check must refuse first.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("gntalloc"), b"").expect("file");
        let g = Gntalloc::open_in(dir.path()).expect("open");
        assert!(matches!(
            g.alloc(0, 0, false),
            Err(PlatformError::Protocol(_))
        ));
        assert!(matches!(
            g.alloc(0, MAX_ALLOC_BATCH + 1, false),
            Err(PlatformError::Protocol(_))
        ));
        // The ioctl on a regular file fails: a typed error, nothing mapped.
        assert!(matches!(
            g.alloc(0, 1, false),
            Err(PlatformError::Io { .. })
        ));
    }
}
