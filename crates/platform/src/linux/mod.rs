//! The real platform, for a dom0 or driver domain running Linux:
//!
//! * grant maps through `/dev/xen/gntdev`: `IOCTL_GNTDEV_MAP_GRANT_REF` reserves the refs
//!   in the device's table, `mmap` at the returned index performs the hypercall and gives
//!   one contiguous region; on drop `munmap` then `IOCTL_GNTDEV_UNMAP_GRANT_REF`. One
//!   gntdev fd serves every reactor thread (the driver serialises internally);
//! * grant copy through `IOCTL_GNTDEV_GRANT_COPY`;
//! * one open of `/dev/xen/evtchn` per ring, so each ring has its own pollable fd:
//!   `IOCTL_EVTCHN_BIND_INTERDOMAIN`, `IOCTL_EVTCHN_NOTIFY`, pending ports read as `u32`s,
//!   a port written back to unmask it, `IOCTL_EVTCHN_UNBIND` on drop;
//! * xenstore: `$XENSTORED_PATH`, `/run/xenstored/socket`, `/var/run/xenstored/socket`,
//!   then `/dev/xen/xenbus`.
//!
//! **Untested until the real-Xen lab** (no Xen here): every ioctl and mmap against the
//! live devices — mapping, the errno gntdev returns for a refused grant, unmap ordering,
//! grant copy statuses, event delivery and unmasking, unmap notify. What is tested here:
//! the ABI (sizes, offsets, ioctl numbers against the C headers), the typed error when
//! the devices are absent, batch validation and xenstore endpoint detection.

pub mod abi;
pub mod guest;

use std::ffi::c_void;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use shmem::{SharedMemory, PAGE_SIZE};

use crate::{
    Access, CopyBuffer, CopySegment, DomId, EventChannel, EventChannelBinder, GrantCopyOp,
    GrantMapper, GrantMapping, GrantRef, GrantStatus, MapError, Platform, PlatformError, Port,
    XenstoreEndpoint, MAX_MAP_BATCH,
};

/// Where the Xen device nodes live.
pub const DEFAULT_DEV_DIR: &str = "/dev/xen";

#[derive(Debug, Default)]
struct Counters {
    mappings: AtomicUsize,
    pages: AtomicUsize,
}

/// The Linux `/dev/xen` platform.
#[derive(Debug)]
pub struct LinuxPlatform {
    gntdev: Arc<OwnedFd>,
    evtchn_path: PathBuf,
    counters: Arc<Counters>,
    xenstore_root: PathBuf,
}

fn open_dev(path: &Path) -> Result<File, PlatformError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| PlatformError::DeviceMissing {
            path: path.to_path_buf(),
            source,
        })
}

impl LinuxPlatform {
    /// Opens `/dev/xen/gntdev` and checks `/dev/xen/evtchn`; a clear
    /// [`PlatformError::DeviceMissing`] when not on Xen or the drivers are not loaded.
    pub fn open() -> Result<Self, PlatformError> {
        Self::open_in(Path::new(DEFAULT_DEV_DIR))
    }

    /// Like [`LinuxPlatform::open`] with the device nodes in `dev_dir`.
    pub fn open_in(dev_dir: &Path) -> Result<Self, PlatformError> {
        let gntdev = open_dev(&dev_dir.join("gntdev"))?;
        let evtchn_path = dev_dir.join("evtchn");
        // Fail now, not at the first bind, when event channels are unavailable.
        drop(open_dev(&evtchn_path)?);
        Ok(Self {
            gntdev: Arc::new(OwnedFd::from(gntdev)),
            evtchn_path,
            counters: Arc::default(),
            xenstore_root: PathBuf::from("/"),
        })
    }

    /// Arms gntdev's unmap notification for a byte of `mapping` (at `offset`): when the
    /// mapping goes away — including when this process dies — the kernel clears that
    /// byte (`clear_byte`, writable mappings only) and/or notifies `port`
    /// (`IOCTL_GNTDEV_SET_UNMAP_NOTIFY`). Lets a frontend see a crashed backend.
    pub fn set_unmap_notify(
        &self,
        mapping: &GrantMapping,
        offset: usize,
        clear_byte: bool,
        port: Option<Port>,
    ) -> Result<(), PlatformError> {
        let ptr = mapping.ptr_at(offset, 1).map_err(|e| {
            PlatformError::io(
                "unmap notify",
                io::Error::new(io::ErrorKind::InvalidInput, e),
            )
        })?;
        let mut q = abi::ioctl_gntdev_get_offset_for_vaddr {
            vaddr: mapping.as_ptr() as u64,
            ..Default::default()
        };
        // SAFETY: IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR reads and writes exactly this struct,
        // which lives for the call.
        let rc = unsafe {
            libc::ioctl(
                self.gntdev.as_raw_fd(),
                abi::IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR as _,
                &mut q,
            )
        };
        if rc < 0 {
            return Err(PlatformError::io(
                "IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR",
                io::Error::last_os_error(),
            ));
        }
        let mut action = 0;
        if clear_byte && mapping.access().is_writable() {
            action |= abi::UNMAP_NOTIFY_CLEAR_BYTE;
        }
        if port.is_some() {
            action |= abi::UNMAP_NOTIFY_SEND_EVENT;
        }
        let n = abi::ioctl_gntdev_unmap_notify {
            index: q.offset + (ptr as u64 - mapping.as_ptr() as u64),
            action,
            event_channel_port: port.unwrap_or(0),
        };
        // SAFETY: IOCTL_GNTDEV_SET_UNMAP_NOTIFY only reads this struct.
        let rc = unsafe {
            libc::ioctl(
                self.gntdev.as_raw_fd(),
                abi::IOCTL_GNTDEV_SET_UNMAP_NOTIFY as _,
                &n,
            )
        };
        if rc < 0 {
            return Err(PlatformError::io(
                "IOCTL_GNTDEV_SET_UNMAP_NOTIFY",
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    fn unmap_grant_ref(gntdev: &OwnedFd, index: u64, count: u32) {
        let u = abi::ioctl_gntdev_unmap_grant_ref {
            index,
            count,
            pad: 0,
        };
        // SAFETY: IOCTL_GNTDEV_UNMAP_GRANT_REF only reads this struct.
        let rc = unsafe {
            libc::ioctl(
                gntdev.as_raw_fd(),
                abi::IOCTL_GNTDEV_UNMAP_GRANT_REF as _,
                &u,
            )
        };
        if rc < 0 {
            tracing::error!(index, count, error = %io::Error::last_os_error(), "IOCTL_GNTDEV_UNMAP_GRANT_REF failed");
        }
    }
}

/// Maps an errno from gntdev's `mmap` (where the grant hypercall happens) to the closest
/// `GNTST_*`: gntdev reports any failed entry as EINVAL/EFAULT without its status.
/// A count of grant operations for the kernel: of refs (at most `MAX_MAP_BATCH`) or of
/// copy segments (a slice of 2^32 of them would take over 100 GiB).
fn op_count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A copy segment's length, at most a page once `fits_page` held.
fn page_len(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

fn status_for_errno(e: &io::Error) -> GrantStatus {
    match e.raw_os_error() {
        Some(libc::ENOMEM) | Some(libc::ENOSPC) => GrantStatus::NO_SPACE,
        Some(libc::EAGAIN) => GrantStatus::EAGAIN,
        Some(libc::EPERM) | Some(libc::EACCES) => GrantStatus::PERMISSION_DENIED,
        _ => GrantStatus::GENERAL_ERROR,
    }
}

impl GrantMapper for LinuxPlatform {
    fn map(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        access: Access,
    ) -> Result<GrantMapping, MapError> {
        let count = refs.len();
        if count == 0 || count > MAX_MAP_BATCH {
            return Err(MapError::BadBatchSize {
                count,
                max: MAX_MAP_BATCH,
            });
        }
        // Header (count, pad, index) then `count` (domid, ref) pairs, in u64 words so the
        // buffer is aligned like the C struct.
        let words = |lo: u32, hi: u32| {
            let mut b = [0u8; 8];
            b[..4].copy_from_slice(&lo.to_ne_bytes());
            b[4..].copy_from_slice(&hi.to_ne_bytes());
            u64::from_ne_bytes(b)
        };
        let mut buf = vec![0u64; 2 + count];
        buf[0] = words(op_count(count), 0);
        for (i, &r) in refs.iter().enumerate() {
            let pair = abi::ioctl_gntdev_grant_ref {
                domid: domid.into(),
                r#ref: r,
            };
            buf[2 + i] = words(pair.domid, pair.r#ref);
        }
        // SAFETY: the buffer holds the header and exactly `count` grant refs laid out as
        // the C struct (each u64 word holds two native-endian u32 fields in order), which
        // is what IOCTL_GNTDEV_MAP_GRANT_REF reads; it writes back only `index`.
        let rc = unsafe {
            libc::ioctl(
                self.gntdev.as_raw_fd(),
                abi::IOCTL_GNTDEV_MAP_GRANT_REF as _,
                buf.as_mut_ptr(),
            )
        };
        if rc < 0 {
            let source = io::Error::last_os_error();
            return Err(MapError::Kernel {
                domid,
                count,
                status: status_for_errno(&source),
                source,
            });
        }
        let index = buf[1];
        let len = count * PAGE_SIZE;
        let prot = if access.is_writable() {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            // gntdev maps read-only (GNTMAP_readonly) exactly when VM_WRITE is absent.
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of the gntdev range `index` reserved above, at a
        // kernel-chosen address; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                self.gntdev.as_raw_fd(),
                index as libc::off_t,
            )
        };
        let ptr = match NonNull::new(ptr.cast::<u8>()) {
            Some(p) if ptr != libc::MAP_FAILED => p,
            _ => {
                let source = io::Error::last_os_error();
                Self::unmap_grant_ref(&self.gntdev, index, op_count(count));
                return Err(MapError::Kernel {
                    domid,
                    count,
                    status: status_for_errno(&source),
                    source,
                });
            }
        };
        let gntdev = self.gntdev.clone();
        let counters = self.counters.clone();
        let release = Box::new(move |p: NonNull<u8>, _len: usize| {
            // gntdev requires the munmap before the unmap ioctl.
            // SAFETY: unmaps exactly the mapping created above, once.
            if unsafe { libc::munmap(p.as_ptr().cast::<c_void>(), len) } != 0 {
                tracing::error!(error = %io::Error::last_os_error(), "munmap of a grant mapping failed");
            }
            LinuxPlatform::unmap_grant_ref(&gntdev, index, op_count(count));
            counters.mappings.fetch_sub(1, Ordering::AcqRel);
            counters.pages.fetch_sub(count, Ordering::AcqRel);
        });
        self.counters.mappings.fetch_add(1, Ordering::AcqRel);
        self.counters.pages.fetch_add(count, Ordering::AcqRel);
        // SAFETY: the mapping is `len` bytes, page aligned, valid until `release`; it is
        // writable when `access` is ReadWrite, and GrantMapping never writes through a
        // read-only one.
        let mem = unsafe { SharedMemory::from_raw_parts(ptr, len, Some(release)) };
        // One IOCTL_GNTDEV_MAP_GRANT_REF and one mmap of the whole range: one VMA
        // (gntdev's VMAs carry vm_ops with a close hook, so the kernel never merges them
        // with a neighbour either).
        Ok(GrantMapping::new(mem, access, domid, count, 1))
    }

    fn max_vmas(&self, pages: usize) -> usize {
        pages.min(1)
    }

    fn copy(&self, ops: &mut [GrantCopyOp<'_>]) -> Result<(), PlatformError> {
        use crate::CopyDirection;
        // gntdev fails the whole ioctl (EINVAL) for a segment crossing the foreign page;
        // Xen answers such an op GNTST_bad_copy_arg. Keep that per-op answer.
        let mut segs = Vec::with_capacity(ops.len());
        let mut which = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter_mut().enumerate() {
            if !op.fits_page() {
                op.set_status(GrantStatus::BAD_COPY_ARG);
                continue;
            }
            let foreign = abi::gntdev_copy_ptr {
                foreign: abi::gntdev_copy_foreign {
                    r#ref: op.gref(),
                    offset: op.offset(),
                    domid: op.domid(),
                },
            };
            let local = abi::gntdev_copy_ptr {
                virt: op.local_ptr().cast(),
            };
            let (source, dest, flags) = match op.direction() {
                CopyDirection::FromGuest => (foreign, local, abi::GNTCOPY_SOURCE_GREF),
                CopyDirection::ToGuest => (local, foreign, abi::GNTCOPY_DEST_GREF),
            };
            segs.push(abi::gntdev_grant_copy_segment {
                source,
                dest,
                len: page_len(op.len()),
                flags,
                status: GrantStatus::GENERAL_ERROR.0,
            });
            which.push(i);
        }
        if segs.is_empty() {
            return Ok(());
        }
        let mut req = abi::ioctl_gntdev_grant_copy {
            count: op_count(segs.len()),
            segments: segs.as_mut_ptr(),
        };
        // SAFETY: `req` points at `count` initialised segments; every local address in
        // them comes from a buffer the ops borrow (mutably for FromGuest) for at least
        // this call and is valid for `len` bytes; the kernel writes only `status` fields
        // and the FromGuest buffers.
        let rc = unsafe {
            libc::ioctl(
                self.gntdev.as_raw_fd(),
                abi::IOCTL_GNTDEV_GRANT_COPY as _,
                &mut req,
            )
        };
        if rc < 0 {
            for &i in &which {
                ops[i].set_status(GrantStatus::GENERAL_ERROR);
            }
            return Err(PlatformError::io(
                "IOCTL_GNTDEV_GRANT_COPY",
                io::Error::last_os_error(),
            ));
        }
        for (seg, &i) in segs.iter().zip(&which) {
            ops[i].set_status(GrantStatus(seg.status));
        }
        Ok(())
    }

    fn copy_segments(
        &self,
        mut buffer: CopyBuffer<'_>,
        segs: &mut [CopySegment],
    ) -> Result<(), PlatformError> {
        use crate::CopyDirection;
        // The kernel's segment array is built on the stack, a chunk at a time: one ioctl
        // per COPY_CHUNK segments (a 256-segment indirect request is one), no allocation.
        const COPY_CHUNK: usize = 256;
        let blank = abi::gntdev_grant_copy_segment {
            source: abi::gntdev_copy_ptr {
                virt: std::ptr::null_mut(),
            },
            dest: abi::gntdev_copy_ptr {
                virt: std::ptr::null_mut(),
            },
            len: 0,
            flags: 0,
            status: 0,
        };
        let mut kernel = [blank; COPY_CHUNK];
        let mut which = [0usize; COPY_CHUNK];
        let mut start = 0;
        while start < segs.len() {
            let mut n = 0;
            let mut next = start;
            while next < segs.len() && n < COPY_CHUNK {
                let i = next;
                next += 1;
                let seg = &mut segs[i];
                let local = match buffer.ptr_at(seg.local, seg.len.into()) {
                    Some(p) if seg.fits_page() => p,
                    // gntdev fails the whole ioctl (EINVAL) for a segment crossing the
                    // foreign page; Xen answers such an op GNTST_bad_copy_arg.
                    _ => {
                        seg.status = GrantStatus::BAD_COPY_ARG;
                        continue;
                    }
                };
                let foreign = abi::gntdev_copy_ptr {
                    foreign: abi::gntdev_copy_foreign {
                        r#ref: seg.gref,
                        offset: seg.offset,
                        domid: seg.domid,
                    },
                };
                let local = abi::gntdev_copy_ptr { virt: local.cast() };
                let (source, dest, flags) = match seg.direction {
                    CopyDirection::FromGuest => (foreign, local, abi::GNTCOPY_SOURCE_GREF),
                    CopyDirection::ToGuest => (local, foreign, abi::GNTCOPY_DEST_GREF),
                };
                kernel[n] = abi::gntdev_grant_copy_segment {
                    source,
                    dest,
                    len: seg.len,
                    flags,
                    status: GrantStatus::GENERAL_ERROR.0,
                };
                which[n] = i;
                n += 1;
            }
            if n > 0 {
                let mut req = abi::ioctl_gntdev_grant_copy {
                    count: op_count(n),
                    segments: kernel.as_mut_ptr(),
                };
                // SAFETY: `req` points at `n` initialised segments; every local address in
                // them lies inside `buffer` (bounds checked by `ptr_at`), which the caller
                // lends us (mutably for private memory; shared memory is meant to be
                // written behind Rust's back) for this call; the kernel writes only the
                // `status` fields and the FromGuest destinations.
                let rc = unsafe {
                    libc::ioctl(
                        self.gntdev.as_raw_fd(),
                        abi::IOCTL_GNTDEV_GRANT_COPY as _,
                        &mut req,
                    )
                };
                if rc < 0 {
                    // This chunk and the rest never ran; earlier chunks keep their answers.
                    for seg in &mut segs[start..] {
                        seg.status = GrantStatus::GENERAL_ERROR;
                    }
                    return Err(PlatformError::io(
                        "IOCTL_GNTDEV_GRANT_COPY",
                        io::Error::last_os_error(),
                    ));
                }
                for (k, &i) in kernel[..n].iter().zip(&which[..n]) {
                    segs[i].status = GrantStatus(k.status);
                }
            }
            start = next;
        }
        Ok(())
    }

    fn live_mappings(&self) -> usize {
        self.counters.mappings.load(Ordering::Acquire)
    }

    fn mapped_pages(&self) -> usize {
        self.counters.pages.load(Ordering::Acquire)
    }
}

/// An interdomain event channel on its own `/dev/xen/evtchn` instance.
#[derive(Debug)]
struct LinuxEventChannel {
    fd: OwnedFd,
    local_port: Port,
    remote: (DomId, Port),
}

impl EventChannel for LinuxEventChannel {
    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn notify(&self) -> Result<(), PlatformError> {
        let n = abi::ioctl_evtchn_notify {
            port: self.local_port,
        };
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

    fn ack(&self) -> Result<bool, PlatformError> {
        // The driver queues each fired port (u32) and masks it until written back.
        let mut pending = [0u8; 4 * 8];
        let n = loop {
            match rustix::io::read(&self.fd, &mut pending) {
                Ok(n) => break n,
                Err(rustix::io::Errno::AGAIN) => return Ok(false),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(PlatformError::io("read /dev/xen/evtchn", e)),
            }
        };
        if n < 4 {
            return Ok(false);
        }
        // This instance has exactly one port bound: unmask it once, whatever was queued.
        loop {
            match rustix::io::write(&self.fd, &self.local_port.to_ne_bytes()) {
                Ok(_) => return Ok(true),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(PlatformError::io("unmask /dev/xen/evtchn", e)),
            }
        }
    }

    fn local_port(&self) -> Port {
        self.local_port
    }

    fn remote(&self) -> (DomId, Port) {
        self.remote
    }
}

impl Drop for LinuxEventChannel {
    fn drop(&mut self) {
        let u = abi::ioctl_evtchn_unbind {
            port: self.local_port,
        };
        // SAFETY: IOCTL_EVTCHN_UNBIND only reads this struct.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), abi::IOCTL_EVTCHN_UNBIND as _, &u) };
        if rc < 0 {
            tracing::warn!(port = self.local_port, error = %io::Error::last_os_error(), "IOCTL_EVTCHN_UNBIND failed");
        }
    }
}

impl EventChannelBinder for LinuxPlatform {
    fn bind_interdomain(
        &self,
        domid: DomId,
        remote_port: Port,
    ) -> Result<Box<dyn EventChannel>, PlatformError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(&self.evtchn_path)
            .map_err(|source| PlatformError::DeviceMissing {
                path: self.evtchn_path.clone(),
                source,
            })?;
        let fd = OwnedFd::from(file);
        let mut b = abi::ioctl_evtchn_bind_interdomain {
            remote_domain: domid.into(),
            remote_port,
        };
        // SAFETY: IOCTL_EVTCHN_BIND_INTERDOMAIN reads this struct; the new local port is
        // the return value.
        let rc = unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                abi::IOCTL_EVTCHN_BIND_INTERDOMAIN as _,
                &mut b,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            tracing::warn!(domid, remote_port, error = %e, "IOCTL_EVTCHN_BIND_INTERDOMAIN failed");
            return Err(PlatformError::BadPort {
                domid,
                port: remote_port,
                reason: "bind_interdomain refused by the hypervisor",
            });
        }
        Ok(Box::new(LinuxEventChannel {
            fd,
            local_port: rc as Port,
            remote: (domid, remote_port),
        }))
    }
}

impl Platform for LinuxPlatform {
    fn xenstore_endpoint(&self) -> Result<XenstoreEndpoint, PlatformError> {
        detect_xenstore(
            &self.xenstore_root,
            std::env::var_os("XENSTORED_PATH").map(PathBuf::from),
        )
    }

    fn name(&self) -> &'static str {
        "linux"
    }
}

/// Finds xenstore under `root` ("/" on a real system): `override_path` (libxenstore's
/// `XENSTORED_PATH`) if it exists, xenstored's socket in its two usual places, then the
/// kernel's xenbus device.
pub fn detect_xenstore(
    root: &Path,
    override_path: Option<PathBuf>,
) -> Result<XenstoreEndpoint, PlatformError> {
    let mut tried = Vec::new();
    if let Some(p) = override_path {
        match std::fs::metadata(&p) {
            Ok(m) if m.file_type().is_socket() => return Ok(XenstoreEndpoint::UnixSocket(p)),
            Ok(m) if m.file_type().is_char_device() => {
                return Ok(XenstoreEndpoint::XenbusDevice(p))
            }
            _ => tried.push(p),
        }
    }
    for rel in ["run/xenstored/socket", "var/run/xenstored/socket"] {
        let p = root.join(rel);
        if std::fs::metadata(&p).is_ok_and(|m| m.file_type().is_socket()) {
            return Ok(XenstoreEndpoint::UnixSocket(p));
        }
        tried.push(p);
    }
    let p = root.join("dev/xen/xenbus");
    if std::fs::metadata(&p).is_ok() {
        return Ok(XenstoreEndpoint::XenbusDevice(p));
    }
    tried.push(p);
    Err(PlatformError::NoXenstore { tried })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_without_xen_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        match LinuxPlatform::open_in(dir.path()) {
            Err(PlatformError::DeviceMissing { path, source }) => {
                assert_eq!(path, dir.path().join("gntdev"));
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("expected DeviceMissing, got {other:?}"),
        }
        // gntdev present, evtchn missing: names evtchn.
        std::fs::write(dir.path().join("gntdev"), b"").unwrap();
        match LinuxPlatform::open_in(dir.path()) {
            Err(PlatformError::DeviceMissing { path, .. }) => {
                assert_eq!(path, dir.path().join("evtchn"))
            }
            other => panic!("expected DeviceMissing, got {other:?}"),
        }
        if !Path::new("/dev/xen/gntdev").exists() {
            let e = LinuxPlatform::open().unwrap_err();
            assert!(e.to_string().contains("/dev/xen/gntdev"), "{e}");
        }
    }

    #[test]
    fn map_validates_the_batch_before_any_ioctl() {
        // Regular files stand in for the devices: a batch error must come first.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("gntdev"), b"").unwrap();
        std::fs::write(dir.path().join("evtchn"), b"").unwrap();
        let p = LinuxPlatform::open_in(dir.path()).unwrap();
        assert!(matches!(
            p.map(1, &[], Access::ReadOnly),
            Err(MapError::BadBatchSize { count: 0, .. })
        ));
        // What a map costs against vm.max_map_count, known before the ioctl: one mmap,
        // whatever the batch.
        assert_eq!(p.max_vmas(1), 1);
        assert_eq!(p.max_vmas(MAX_MAP_BATCH), 1);
        let many = vec![8; MAX_MAP_BATCH + 1];
        assert!(matches!(
            p.map(1, &many, Access::ReadOnly),
            Err(MapError::BadBatchSize { .. })
        ));
        // The ioctl on a regular file fails (ENOTTY): a Kernel error, nothing mapped.
        let e = p.map(1, &[8], Access::ReadWrite).unwrap_err();
        assert!(matches!(e, MapError::Kernel { .. }), "{e:?}");
        assert_eq!(p.live_mappings(), 0);
        // Copies that cross the page never reach the kernel.
        let mut buf = [0u8; 16];
        let mut ops = [GrantCopyOp::from_guest(1, 8, 4090, &mut buf)];
        p.copy(&mut ops).unwrap();
        assert_eq!(ops[0].status(), GrantStatus::BAD_COPY_ARG);
    }

    #[test]
    fn xenstore_detection_order() {
        use std::os::unix::net::UnixListener;
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        assert!(
            matches!(detect_xenstore(r, None), Err(PlatformError::NoXenstore { tried }) if tried.len() == 3)
        );
        std::fs::create_dir_all(r.join("dev/xen")).unwrap();
        std::fs::write(r.join("dev/xen/xenbus"), b"").unwrap();
        assert_eq!(
            detect_xenstore(r, None).unwrap(),
            XenstoreEndpoint::XenbusDevice(r.join("dev/xen/xenbus"))
        );
        std::fs::create_dir_all(r.join("var/run/xenstored")).unwrap();
        let _l1 = UnixListener::bind(r.join("var/run/xenstored/socket")).unwrap();
        assert_eq!(
            detect_xenstore(r, None).unwrap(),
            XenstoreEndpoint::UnixSocket(r.join("var/run/xenstored/socket"))
        );
        std::fs::create_dir_all(r.join("run/xenstored")).unwrap();
        let _l2 = UnixListener::bind(r.join("run/xenstored/socket")).unwrap();
        assert_eq!(
            detect_xenstore(r, None).unwrap(),
            XenstoreEndpoint::UnixSocket(r.join("run/xenstored/socket"))
        );
        let custom = r.join("custom.sock");
        let _l3 = UnixListener::bind(&custom).unwrap();
        assert_eq!(
            detect_xenstore(r, Some(custom.clone())).unwrap(),
            XenstoreEndpoint::UnixSocket(custom)
        );
        // A missing override falls back to the usual places.
        assert_eq!(
            detect_xenstore(r, Some(r.join("nope"))).unwrap(),
            XenstoreEndpoint::UnixSocket(r.join("run/xenstored/socket"))
        );
    }
}
