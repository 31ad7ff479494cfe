//! Thin wrappers over the Linux interfaces the backends need: block-device ioctls,
//! statx, fallocate and sysfs. Every `unsafe` FFI call of the crate outside the io_uring
//! submission paths lives here.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};

// Block-device ioctl numbers (<linux/fs.h>), in the asm-generic encoding used by x86 and
// arm. `_IO(0x12, nr)` and `_IOR(0x12, nr, size_t)`.
const fn io(nr: u32) -> u32 {
    (0x12 << 8) | nr
}
const fn ior_u64(nr: u32) -> u32 {
    (2 << 30) | (8 << 16) | (0x12 << 8) | nr
}
const BLKSSZGET: u32 = io(104);
const BLKDISCARD: u32 = io(119);
const BLKPBSZGET: u32 = io(123);
const BLKSECDISCARD: u32 = io(125);
const BLKGETSIZE64: u32 = ior_u64(114);

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Size in bytes of a block device.
pub(crate) fn blk_size(fd: RawFd) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live local.
    cvt(unsafe { libc::ioctl(fd, BLKGETSIZE64 as libc::Ioctl, &mut size as *mut u64) })?;
    Ok(size)
}

/// Logical block size of a block device.
pub(crate) fn blk_logical_block_size(fd: RawFd) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points to a live local.
    cvt(unsafe { libc::ioctl(fd, BLKSSZGET as libc::Ioctl, &mut v as *mut libc::c_int) })?;
    u32::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Physical block size of a block device.
pub(crate) fn blk_physical_block_size(fd: RawFd) -> io::Result<u32> {
    let mut v: libc::c_uint = 0;
    // SAFETY: BLKPBSZGET writes one unsigned int through the pointer (a live local).
    cvt(unsafe { libc::ioctl(fd, BLKPBSZGET as libc::Ioctl, &mut v as *mut libc::c_uint) })?;
    Ok(v)
}

/// `BLKDISCARD` / `BLKSECDISCARD` on `[offset, offset + len)`. Blocks until the device is
/// done, which is why the raw backend runs it on a helper thread.
pub(crate) fn blk_discard(fd: RawFd, offset: u64, len: u64, secure: bool) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    let req = if secure { BLKSECDISCARD } else { BLKDISCARD };
    // SAFETY: both ioctls read a `u64[2]` range through the pointer, which points to a live
    // local array; they touch no other memory of ours.
    cvt(unsafe { libc::ioctl(fd, req as libc::Ioctl, range.as_ptr()) })?;
    Ok(())
}

/// Non-destructive probe for secure-erase support (there is no sysfs attribute for it).
/// Since Linux 5.19 `BLKSECDISCARD` checks `bdev_max_secure_erase_sectors` *before* it copies
/// the range from user memory, so a NULL range yields EOPNOTSUPP when unsupported and EFAULT
/// when supported, and nothing is erased either way. Older kernels check later, so they
/// are reported as unsupported.
pub(crate) fn blk_probe_secure_discard(fd: RawFd) -> bool {
    if kernel_version() < (5, 19) {
        return false;
    }
    // SAFETY: the NULL argument is never dereferenced by us; the kernel validates it with
    // copy_from_user and fails with EFAULT.
    let ret = unsafe { libc::ioctl(fd, BLKSECDISCARD as libc::Ioctl, std::ptr::null::<u64>()) };
    ret < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EFAULT)
}

/// `(major, minor)` of the running kernel, `(0, 0)` if unknown.
pub(crate) fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Direct-I/O alignment reported by `statx(STATX_DIOALIGN)` (Linux 6.1+):
/// `(memory alignment, offset alignment)`, or `None` when the kernel or file system does
/// not report it (or reports that direct I/O is unsupported).
pub(crate) fn statx_dio_align(fd: RawFd) -> Option<(u32, u32)> {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid NUL-terminated empty string (AT_EMPTY_PATH makes statx
    // operate on `fd`), and `stx` is a live, correctly typed out-buffer.
    let ret = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if ret != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

/// Synchronous `fallocate(2)`.
pub(crate) fn fallocate(fd: RawFd, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    let len = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: fallocate takes only integers; `fd` is open for the duration of the call.
    cvt(unsafe { libc::fallocate(fd, mode, off, len) })?;
    Ok(())
}

/// The sysfs directory of a block device: `/sys/dev/block/MAJ:MIN`.
pub(crate) fn sysfs_dev_dir(rdev: u64) -> PathBuf {
    PathBuf::from(format!(
        "/sys/dev/block/{}:{}",
        libc::major(rdev),
        libc::minor(rdev)
    ))
}

/// The `queue/` directory for a device: its own for a whole disk, the parent disk's for a
/// partition (`MAJ:MIN` links into the disk's directory, so `..` is the disk).
pub(crate) fn sysfs_queue_dir(dev_dir: &Path) -> PathBuf {
    let own = dev_dir.join("queue");
    if own.is_dir() {
        own
    } else {
        dev_dir.join("../queue")
    }
}

/// Reads a decimal number from a sysfs attribute.
pub(crate) fn sysfs_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Waits until `fd` is readable or `timeout_ms` passes (benchmark driver; the engine uses
/// epoll). Returns whether it is readable.
pub(crate) fn poll_readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one live, correctly typed pollfd; nfds is 1.
        let ret = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if ret >= 0 {
            return Ok(ret > 0 && pfd.revents & libc::POLLIN != 0);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// CPU time (user + system) consumed so far by the calling thread.
pub(crate) fn thread_cpu_time() -> std::time::Duration {
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a live, correctly typed out-buffer.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return std::time::Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        std::time::Duration::from_secs(t.tv_sec as u64)
            + std::time::Duration::from_micros(t.tv_usec as u64)
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}
