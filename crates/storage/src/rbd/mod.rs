//! The RBD backend: an image of a Ceph cluster (RADOS block device) through librbd's C
//! API, named as QEMU and libxl name it: `rbd:pool[/namespace]/image[@snap][:id=NAME]
//! [:conf=PATH][:key=value...]` ([`target`]).
//!
//! One [`RbdStorage`] per VBD holds one cluster connection and one open image; each ring's
//! [`RbdQueue`](queue) submits to that image with librbd's asynchronous calls
//! (`rbd_aio_readv`, `rbd_aio_writev`, `rbd_aio_discard`, `rbd_aio_flush`). librbd runs
//! the completion callback on one of its own threads; the callback puts the finished slot
//! in the queue's bounded completion list and writes the queue's completion eventfd, and
//! the reactor's `reap` drains the list (see [`queue`]). No thread and no allocation of
//! ours per request; librbd allocates its own request state.
//!
//! What the image offers: read-only when the toolstack says so or a snapshot is opened
//! (then opened with `rbd_open_read_only`: no watch, no lock); discard (librbd frees whole
//! objects and zeroes or skips the rest, so the granularity advertised is librbd's
//! `rbd_discard_granularity_bytes` when it skips partial discards); flush; size and
//! online resize through `rbd_get_size` (librbd refreshes the image after the header
//! watch reported a resize). 512-byte logical blocks; physical 4096: RADOS writes any
//! byte range without a read-modify-write, so the object size is no sector size, and
//! 4096 keeps guests writing whole pages. Secure discard is not offered.
//!
//! Settings xenblkd makes: `client_mount_timeout` ([`RbdConfig::connect_timeout`]) bounds
//! the connect, `rados_osd_op_timeout` and `rados_mon_op_timeout`
//! ([`RbdConfig::op_timeout`]) bound every request, so a stopped OSD fails requests
//! instead of holding them forever (and a queue's drop, which waits for its requests,
//! is bounded too); a ceph.conf or the target's options may change them. librbd's cache
//! is always off (`rbd_cache = false`): its write-back cache gave seconds-long latency
//! spikes, the guest has a page cache of its own, and without it a completed write is on
//! the OSDs, which is what FUA asks. librbd's default copy of write data at submission
//! (`rbd_disable_zero_copy_writes`) stays: a guest changing a page under an in-flight
//! write cannot make the OSDs see a checksum mismatch.

mod ffi;
mod queue;
pub mod target;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::ffi::{c_char, CString};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::{Storage, StorageError, StorageInfo, StorageKind, StorageQueue, MAX_QUEUE_DEPTH};
pub use target::{is_rbd_target, RbdTarget, TargetError};

/// Default bound of connecting to the cluster (`client_mount_timeout`).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default bound of one request to an OSD or monitor (`rados_osd_op_timeout`,
/// `rados_mon_op_timeout`).
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(30);

/// How to open an RBD image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RbdConfig {
    /// Serve it read-only (opened with `rbd_open_read_only`).
    pub read_only: bool,
    /// `client_mount_timeout`: how long opening may wait for the monitors.
    pub connect_timeout: Duration,
    /// `rados_osd_op_timeout` and `rados_mon_op_timeout`: after this a request fails
    /// (ETIMEDOUT) instead of waiting for the cluster.
    pub op_timeout: Duration,
}

impl Default for RbdConfig {
    fn default() -> Self {
        RbdConfig {
            read_only: false,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            op_timeout: DEFAULT_OP_TIMEOUT,
        }
    }
}

/// Opening an RBD image failed.
#[derive(Debug, thiserror::Error)]
pub enum RbdOpenError {
    #[error("{0}")]
    Target(#[from] TargetError),
    #[error("{target}: {reason}")]
    Library { target: String, reason: String },
    /// A librados or librbd call failed; `errno` is positive.
    #[error("{target}: {step}: {}", io::Error::from_raw_os_error(*.errno))]
    Ceph {
        target: String,
        step: String,
        errno: i32,
    },
    #[error("{target}: {reason}")]
    Unusable { target: String, reason: String },
}

impl RbdOpenError {
    /// The errno that best says why (EINVAL for a malformed target).
    pub fn errno(&self) -> i32 {
        match self {
            RbdOpenError::Target(_) => libc::EINVAL,
            RbdOpenError::Library { .. } => libc::ELIBACC,
            RbdOpenError::Ceph { errno, .. } => *errno,
            RbdOpenError::Unusable { .. } => libc::EINVAL,
        }
    }
}

/// The cluster connection, I/O context and image of one storage; closed in reverse order
/// when the storage and its last queue are gone.
struct Handles {
    lib: &'static ffi::Lib,
    cluster: ffi::RadosT,
    ioctx: ffi::RadosIoctxT,
    image: ffi::RbdImageT,
}

// SAFETY: librados and librbd handles may be used from any thread (librbd serialises
// inside an image; the aio calls and rbd_get_size are documented thread-safe and QEMU
// calls them from its I/O threads). The pointers are only freed by Drop, once.
unsafe impl Send for Handles {}
// SAFETY: see Send: concurrent calls on one image are what librbd's aio API is made for.
unsafe impl Sync for Handles {}

impl Drop for Handles {
    fn drop(&mut self) {
        // SAFETY: each pointer is either null or a live handle this struct created and
        // nothing else frees; every queue (which waits for its requests on drop) holds an
        // Arc of this, so no request is in flight on the image any more.
        unsafe {
            if !self.image.is_null() {
                (self.lib.rbd_close)(self.image);
            }
            if !self.ioctx.is_null() {
                (self.lib.rados_ioctx_destroy)(self.ioctx);
            }
            if !self.cluster.is_null() {
                (self.lib.rados_shutdown)(self.cluster);
            }
        }
    }
}

/// An RBD image.
pub struct RbdStorage {
    target: RbdTarget,
    handles: Arc<Handles>,
    info: StorageInfo,
    /// Shared with the queues, which check ranges against it.
    size: Arc<AtomicU64>,
    object_size: u64,
}

impl std::fmt::Debug for RbdStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdStorage")
            .field("target", &self.target.to_string())
            .field("info", &self.info)
            .finish()
    }
}

fn cstring(target: &RbdTarget, what: &str, s: &str) -> Result<CString, RbdOpenError> {
    CString::new(s).map_err(|_| RbdOpenError::Unusable {
        target: target.to_string(),
        reason: format!("{what} contains a NUL byte"),
    })
}

/// The steps of [`RbdStorage::open`], each failing with the target and the step named.
struct Opening<'a> {
    lib: &'static ffi::Lib,
    target: &'a RbdTarget,
    shown: String,
}

impl Opening<'_> {
    fn fail(&self, step: String, r: i32) -> RbdOpenError {
        RbdOpenError::Ceph {
            target: self.shown.clone(),
            step,
            errno: r.checked_neg().filter(|e| *e > 0).unwrap_or(libc::EIO),
        }
    }

    fn set(&self, h: &Handles, key: &str, value: &str) -> Result<(), RbdOpenError> {
        let k = cstring(self.target, "option", key)?;
        let v = cstring(self.target, "option value", value)?;
        // SAFETY: a live, not yet connected cluster handle and two C strings that
        // outlive the call (librados copies them).
        let r = unsafe { (self.lib.rados_conf_set)(h.cluster, k.as_ptr(), v.as_ptr()) };
        if r < 0 {
            return Err(self.fail(format!("setting {key}={value}"), r));
        }
        Ok(())
    }

    /// Creates the cluster handle, configures it (our bounds first, then ceph.conf,
    /// CEPH_ARGS and the target's own options, which take precedence) and connects.
    fn connect(&self, h: &mut Handles, config: &RbdConfig) -> Result<(), RbdOpenError> {
        let lib = self.lib;
        let id = self
            .target
            .id
            .as_deref()
            .map(|i| cstring(self.target, "id", i))
            .transpose()?;
        // SAFETY: `h.cluster` is a valid out-pointer; `id` is NULL or a C string that
        // outlives the call. On failure the handle stays null and Drop skips it.
        let r = unsafe {
            (lib.rados_create)(
                &mut h.cluster,
                id.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            )
        };
        if r < 0 {
            return Err(self.fail("creating the cluster handle".into(), r));
        }
        let secs = |d: Duration| d.as_secs().max(1).to_string();
        self.set(h, "client_mount_timeout", &secs(config.connect_timeout))?;
        self.set(h, "rados_osd_op_timeout", &secs(config.op_timeout))?;
        self.set(h, "rados_mon_op_timeout", &secs(config.op_timeout))?;
        match &self.target.conf {
            Some(path) => {
                let p = cstring(self.target, "conf", path)?;
                // SAFETY: live handle, C string outliving the call.
                let r = unsafe { (lib.rados_conf_read_file)(h.cluster, p.as_ptr()) };
                if r < 0 {
                    return Err(self.fail(format!("reading {path}"), r));
                }
            }
            None => {
                // librados' own search ($CEPH_CONF, /etc/ceph/ceph.conf, ...); finding
                // none is fine when the options name the monitors (QEMU does the same).
                // SAFETY: live handle; NULL asks for the default search.
                let _ = unsafe { (lib.rados_conf_read_file)(h.cluster, std::ptr::null()) };
            }
        }
        // SAFETY: live handle; NULL means CEPH_ARGS.
        let r = unsafe { (lib.rados_conf_parse_env)(h.cluster, std::ptr::null()) };
        if r < 0 {
            return Err(self.fail("parsing CEPH_ARGS".into(), r));
        }
        for (k, v) in &self.target.options {
            self.set(h, k, v)?;
        }
        self.set(h, "rbd_cache", "false")?;
        // SAFETY: live, configured handle. Bounded by client_mount_timeout.
        let r = unsafe { (lib.rados_connect)(h.cluster) };
        if r < 0 {
            return Err(self.fail("connecting to the cluster".into(), r));
        }
        Ok(())
    }

    /// Opens the pool (and namespace) and the image, read-only when asked or when the
    /// target names a snapshot; returns whether it is read-only.
    fn open_image(&self, h: &mut Handles, read_only: bool) -> Result<bool, RbdOpenError> {
        let (lib, parsed) = (self.lib, self.target);
        let pool = cstring(parsed, "pool", &parsed.pool)?;
        // SAFETY: connected handle, C string, valid out-pointer.
        let r = unsafe { (lib.rados_ioctx_create)(h.cluster, pool.as_ptr(), &mut h.ioctx) };
        if r < 0 {
            return Err(self.fail(format!("opening pool {}", parsed.pool), r));
        }
        if !parsed.namespace.is_empty() {
            let ns = cstring(parsed, "namespace", &parsed.namespace)?;
            // SAFETY: live ioctx; librados copies the name.
            unsafe { (lib.rados_ioctx_set_namespace)(h.ioctx, ns.as_ptr()) };
        }
        let name = cstring(parsed, "image", &parsed.image)?;
        let snap = parsed
            .snapshot
            .as_deref()
            .map(|s| cstring(parsed, "snapshot", s))
            .transpose()?;
        let read_only = read_only || snap.is_some();
        let open = if read_only {
            lib.rbd_open_read_only
        } else {
            lib.rbd_open
        };
        // SAFETY: live ioctx, C strings outliving the call (snap may be NULL), valid
        // out-pointer.
        let r = unsafe {
            open(
                h.ioctx,
                name.as_ptr(),
                &mut h.image,
                snap.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            )
        };
        if r < 0 {
            h.image = std::ptr::null_mut();
            return Err(self.fail(format!("opening image {}", parsed.image_spec()), r));
        }
        Ok(read_only)
    }

    /// The open image's header: size and object size.
    fn stat(&self, h: &Handles) -> Result<ffi::RbdImageInfo, RbdOpenError> {
        let mut stat = std::mem::MaybeUninit::<ffi::RbdImageInfo>::zeroed();
        // SAFETY: open image; librbd fills at most `infosize` bytes of the buffer.
        let r = unsafe {
            (self.lib.rbd_stat)(
                h.image,
                stat.as_mut_ptr(),
                std::mem::size_of::<ffi::RbdImageInfo>(),
            )
        };
        if r < 0 {
            return Err(self.fail("reading the image's header".into(), r));
        }
        // SAFETY: zero-initialised (valid for this plain-data struct) and filled by librbd.
        Ok(unsafe { stat.assume_init() })
    }
}

impl RbdStorage {
    /// Parses `target`, connects to the cluster and opens the image.
    pub fn open(target: &str, config: RbdConfig) -> Result<RbdStorage, RbdOpenError> {
        let parsed = RbdTarget::parse(target)?;
        let shown = parsed.to_string();
        let lib = ffi::lib().map_err(|reason| RbdOpenError::Library {
            target: shown.clone(),
            reason,
        })?;
        let mut h = Handles {
            lib,
            cluster: std::ptr::null_mut(),
            ioctx: std::ptr::null_mut(),
            image: std::ptr::null_mut(),
        };
        let opening = Opening {
            lib,
            target: &parsed,
            shown,
        };
        opening.connect(&mut h, &config)?;
        let read_only = opening.open_image(&mut h, config.read_only)?;
        let stat = opening.stat(&h)?;
        let lbs = 512u32;
        let size = stat.size - stat.size % u64::from(lbs);
        let discard_granularity = if read_only {
            0
        } else {
            discard_granularity(lib, h.cluster, stat.obj_size, lbs)
        };
        let info = StorageInfo {
            size_bytes: size,
            logical_block_size: lbs,
            physical_block_size: 4096,
            buffer_alignment: 1,
            read_only,
            flush: !read_only,
            discard: !read_only,
            secure_discard: false,
            discard_granularity,
            discard_alignment: 0,
            direct_io: false,
            kind: StorageKind::Rbd,
        };
        tracing::info!(target = %opening.shown, size, object_size = stat.obj_size, read_only,
            discard_granularity, "RBD image opened");
        Ok(RbdStorage {
            target: parsed,
            handles: Arc::new(h),
            info,
            size: Arc::new(AtomicU64::new(size)),
            object_size: stat.obj_size,
        })
    }

    /// The parsed target.
    pub fn target(&self) -> &RbdTarget {
        &self.target
    }

    /// The image's object size (RADOS objects the image is striped over).
    pub fn object_size(&self) -> u64 {
        self.object_size
    }
}

/// Reads a librados setting as text.
fn conf_get(lib: &ffi::Lib, cluster: ffi::RadosT, key: &std::ffi::CStr) -> Option<String> {
    let mut buf = [0 as c_char; 64];
    // SAFETY: live handle; librados writes at most `len` bytes, NUL-terminated, and fails
    // with -ENAMETOOLONG rather than truncate.
    let r = unsafe { (lib.rados_conf_get)(cluster, key.as_ptr(), buf.as_mut_ptr(), buf.len()) };
    if r < 0 {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated string.
    let s = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(s.to_string_lossy().into_owned())
}

/// What a discard is guaranteed to act on: with `rbd_skip_partial_discard` (the default)
/// librbd leaves ranges smaller than `rbd_discard_granularity_bytes` as they are.
fn discard_granularity(lib: &ffi::Lib, cluster: ffi::RadosT, object_size: u64, lbs: u32) -> u32 {
    let skip = conf_get(lib, cluster, c"rbd_skip_partial_discard");
    if skip.as_deref() == Some("false") {
        return lbs;
    }
    let granularity = conf_get(lib, cluster, c"rbd_discard_granularity_bytes")
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|g| g.is_power_of_two())
        .unwrap_or(object_size);
    u32::try_from(granularity.clamp(u64::from(lbs), object_size.max(u64::from(lbs))))
        .unwrap_or(1 << 31)
}

impl Storage for RbdStorage {
    fn info(&self) -> StorageInfo {
        StorageInfo {
            size_bytes: self.size.load(Ordering::Acquire),
            ..self.info
        }
    }

    fn refresh_size(&self) -> io::Result<u64> {
        let mut size = 0u64;
        // SAFETY: open image, valid out-pointer. librbd answers from its image context;
        // it reads the header from the cluster only after a watch notification said the
        // image changed (bounded by rados_osd_op_timeout).
        let r = unsafe { (self.handles.lib.rbd_get_size)(self.handles.image, &mut size) };
        if r < 0 {
            return Err(io::Error::from_raw_os_error(-r));
        }
        let size = size - size % u64::from(self.info.logical_block_size);
        let old = self.size.swap(size, Ordering::AcqRel);
        if old != size {
            tracing::info!(target = %self.target, old, new = size, "RBD image size changed");
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
        Ok(Box::new(queue::RbdQueue::new(
            Arc::clone(&self.handles),
            self.info,
            Arc::clone(&self.size),
            depth,
        )?))
    }
}
