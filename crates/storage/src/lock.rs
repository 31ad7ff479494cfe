//! Image locking as QEMU does it, so that xenblkd and QEMU (a VM, `qemu-img`, `qemu-io`,
//! `qemu-nbd`) see each other's use of an image, and two xenblkd devices never write one
//! image at once.
//!
//! QEMU's `block/file-posix.c` (`raw_apply_lock_bytes`, `raw_check_lock_bytes`) expresses
//! what a user does with an image as *permissions* (`BLK_PERM_CONSISTENT_READ` 0x1,
//! `BLK_PERM_WRITE` 0x2, `BLK_PERM_WRITE_UNCHANGED` 0x4, `BLK_PERM_RESIZE` 0x8) and
//! which of them it lets others have (*shared* permissions), and publishes both as
//! open-file-description locks (`F_OFD_SETLK`, shared read locks of one byte each) on the
//! image itself: byte `100 + bit` for each permission it holds, byte `200 + bit` for each
//! permission it does *not* share. Before using an image it tests (`F_OFD_GETLK` with a
//! write lock) byte `200 + bit` for each permission it wants (someone refuses to share
//! it) and byte `100 + bit` for each one it refuses to share (someone holds it). Nothing
//! ever takes a write lock, so the locks never block anyone: they only describe. We take
//! the same bytes with the same meaning ([`Permissions`]), plus one byte of our own,
//! [`XENBLKD_MARKER`], far from QEMU's, which says "xenblkd" to another xenblkd reading
//! the locks. A conflict names the image and what the bytes tell about the holder
//! ([`Holder`]): QEMU or xenblkd (this daemon's device, named, or another process), and
//! whether it writes.
//!
//! The locks live on a descriptor of their own, opened read-only for nothing else: an
//! OFD lock belongs to its open file description, so neither the storage's own
//! descriptors nor anything else in the process can drop it by closing a file (what makes
//! classic POSIX locks unusable here), and two devices of this daemon conflict with each
//! other exactly as two processes do. The kernel drops them when the descriptor closes:
//! when the storage is closed, or the process dies (`kill -9` included).

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::{Storage, StorageError, StorageInfo, StorageKind, StorageQueue};

/// `BLK_PERM_CONSISTENT_READ`: reads see consistent data.
pub const PERM_CONSISTENT_READ: u8 = 0x1;
/// `BLK_PERM_WRITE`: changes what the image contains.
pub const PERM_WRITE: u8 = 0x2;
/// `BLK_PERM_WRITE_UNCHANGED`: writes that leave the contents as they are.
pub const PERM_WRITE_UNCHANGED: u8 = 0x4;
/// `BLK_PERM_RESIZE`: changes the image's size.
pub const PERM_RESIZE: u8 = 0x8;
/// `BLK_PERM_ALL` of QEMU 6.2 and later.
const PERM_ALL: u8 = 0xf;
/// Bits read when describing a holder: QEMU 6.1 and earlier may still lock byte 104/204
/// for the removed `BLK_PERM_GRAPH_MOD` (0x10).
const PERM_BITS_SEEN: u32 = 5;

/// QEMU's `RAW_LOCK_PERM_BASE`: byte `100 + bit` is locked by every holder of permission
/// `1 << bit`.
pub const LOCK_PERM_BASE: i64 = 100;
/// QEMU's `RAW_LOCK_SHARED_BASE`: byte `200 + bit` is locked by every user that does not
/// share permission `1 << bit`.
pub const LOCK_SHARED_BASE: i64 = 200;
/// The byte every xenblkd holding an image locks besides QEMU's ("xenb"): QEMU never
/// touches it, so its lock says the holder is a xenblkd.
pub const XENBLKD_MARKER: i64 = 0x7865_6e62;

/// What a user of an image does with it and lets others do, in QEMU's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permissions {
    /// Permissions held (`BLK_PERM_*`).
    pub perm: u8,
    /// Permissions others may hold at the same time.
    pub shared: u8,
}

impl Permissions {
    /// A raw file or block device as a guest disk, as QEMU's virtio-blk over `file` takes
    /// it: reads, writes unless read-only; shares reads, unchanging writes and resizes (a
    /// raw disk can grow under us: the resize path), never writes.
    pub fn raw(read_only: bool) -> Permissions {
        Permissions {
            perm: PERM_CONSISTENT_READ | if read_only { 0 } else { PERM_WRITE },
            shared: PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED | PERM_RESIZE,
        }
    }

    /// The top image of a qcow2 chain, as QEMU's qcow2 driver takes its file: a writable
    /// image is also resized (clusters are allocated at its end); nobody else may write or
    /// resize a file whose metadata we cache.
    pub fn qcow2(read_only: bool) -> Permissions {
        Permissions {
            perm: PERM_CONSISTENT_READ
                | if read_only {
                    0
                } else {
                    PERM_WRITE | PERM_RESIZE
                },
            shared: PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
        }
    }

    /// A backing file, as QEMU takes a COW child: read only, and nobody may write or
    /// resize it while an overlay depends on it.
    pub fn backing() -> Permissions {
        Permissions {
            perm: PERM_CONSISTENT_READ,
            shared: PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
        }
    }
}

/// QEMU's name of one permission bit (`bdrv_perm_names`).
fn perm_name(bit: u8) -> &'static str {
    match bit {
        PERM_CONSISTENT_READ => "consistent read",
        PERM_WRITE => "write",
        PERM_WRITE_UNCHANGED => "write unchanged",
        PERM_RESIZE => "resize",
        _ => "graph modification",
    }
}

/// Who holds an image, as far as its lock bytes (and this process's own table) say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HolderKind {
    /// A device of this daemon, named by the owner it locked the image for.
    ThisDaemon(String),
    /// A xenblkd in another process (its marker byte is locked).
    OtherXenblkd,
    /// Something using QEMU's locking without our marker: a VM, `qemu-img`, `qemu-io`,
    /// `qemu-nbd`, or libvirt's tools.
    Qemu,
}

/// What the lock bytes of an image say about the users other than us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Which kind of program.
    pub kind: HolderKind,
    /// Permissions some other user holds.
    pub perm: u8,
    /// Permissions some other user refuses to share.
    pub unshared: u8,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            HolderKind::ThisDaemon(owner) => write!(f, "this xenblkd's device {owner}")?,
            HolderKind::OtherXenblkd => f.write_str("another xenblkd process")?,
            HolderKind::Qemu => f.write_str("QEMU or a QEMU tool (qemu-img, qemu-io, qemu-nbd)")?,
        }
        if self.perm & PERM_WRITE != 0 {
            f.write_str(", which writes it")
        } else if self.unshared & PERM_WRITE != 0 {
            f.write_str(", which reads it and lets nobody write it")
        } else {
            f.write_str(", which reads it")
        }
    }
}

/// Locking an image failed.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The image could not be opened or examined for locking.
    #[error("{path}: opening it to lock it: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `fcntl` failed for another reason than a conflict.
    #[error("{path}: locking byte {byte}: {source}")]
    Os {
        path: PathBuf,
        byte: i64,
        #[source]
        source: io::Error,
    },
    /// Another user holds the image in a way that excludes ours.
    #[error(
        "image {path} is in use by {holder}: cannot get the {what} lock (QEMU's image locking)"
    )]
    Conflict {
        path: PathBuf,
        holder: Holder,
        /// The lock refused, in QEMU's words (`"write"`, `shared "write"`).
        what: String,
    },
}

impl LockError {
    /// The holder, when the image is in use by someone else.
    pub fn holder(&self) -> Option<&Holder> {
        match self {
            LockError::Conflict { holder, .. } => Some(holder),
            _ => None,
        }
    }

    /// The errno an operator's tools expect: `EBUSY` for an image in use.
    pub fn errno(&self) -> i32 {
        match self {
            LockError::Conflict { .. } => libc::EBUSY,
            LockError::Open { source, .. } | LockError::Os { source, .. } => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
        }
    }
}

/// This process's locked images, so a conflict between two of our devices names the one
/// holding the image: (device, inode) -> (lock id, owner).
type Table = HashMap<(u64, u64), Vec<(u64, String)>>;

fn table() -> &'static Mutex<Table> {
    static TABLE: OnceLock<Mutex<Table>> = OnceLock::new();
    TABLE.get_or_init(Mutex::default)
}

static NEXT_LOCK_ID: AtomicU64 = AtomicU64::new(1);

/// One image locked by us: QEMU's bytes for [`Permissions`] and our marker, held on a
/// descriptor of its own until dropped.
#[derive(Debug)]
pub struct ImageLock {
    file: File,
    path: PathBuf,
    permissions: Permissions,
    key: (u64, u64),
    id: u64,
}

/// One `F_OFD_*` call on one byte.
// `struct flock` keeps its type and whence in shorts: F_RDLCK, F_WRLCK, F_UNLCK (0..=2)
// and SEEK_SET (0) fit.
#[allow(clippy::cast_possible_truncation)]
fn ofd(file: &File, cmd: libc::c_int, kind: libc::c_int, byte: i64) -> io::Result<libc::c_int> {
    let mut fl = libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte as libc::off_t,
        l_len: 1,
        // Must be 0 for OFD locks.
        l_pid: 0,
    };
    // SAFETY: F_OFD_SETLK and F_OFD_GETLK read (and GETLK writes) one `struct flock`
    // through the pointer, which points to a live local; the descriptor is open for the
    // call's duration (borrowed from `file`).
    let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(libc::c_int::from(fl.l_type))
}

/// Whether a user other than this open file description holds a lock on `byte`.
fn held_by_others(file: &File, path: &Path, byte: i64) -> Result<bool, LockError> {
    let kind =
        ofd(file, libc::F_OFD_GETLK, libc::F_WRLCK, byte).map_err(|source| LockError::Os {
            path: path.to_path_buf(),
            byte,
            source,
        })?;
    Ok(kind != libc::F_UNLCK)
}

impl ImageLock {
    /// Opens `path` for locking and takes QEMU's lock bytes for `permissions`, refusing
    /// when another user (another process, or another device of this one) holds the image
    /// in a way that excludes ours. `owner` names the user in this process's table.
    pub fn acquire(
        path: &Path,
        permissions: Permissions,
        owner: &str,
    ) -> Result<ImageLock, LockError> {
        let file = File::open(path).map_err(|source| LockError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let meta = file.metadata().map_err(|source| LockError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let key = (meta.dev(), meta.ino());
        // Registered before the bytes are taken, so that a device racing us for the same
        // image finds our name if it finds our bytes.
        let id = NEXT_LOCK_ID.fetch_add(1, Ordering::Relaxed);
        let mut lock = ImageLock {
            file,
            path: path.to_path_buf(),
            permissions,
            key,
            id,
        };
        table()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .push((id, owner.to_string()));
        lock.apply()?;
        lock.check()?;
        Ok(lock)
    }

    /// The permissions held.
    pub fn permissions(&self) -> Permissions {
        self.permissions
    }

    /// The image locked.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `raw_apply_lock_bytes`: a shared lock on each byte that says what we do and what
    /// we do not share, and on our marker.
    fn apply(&mut self) -> Result<(), LockError> {
        let p = self.permissions;
        let mut bytes = Vec::with_capacity(2 * PERM_BITS_SEEN as usize + 1);
        for bit in 0..4 {
            let mask = 1u8 << bit;
            if p.perm & mask != 0 {
                bytes.push(LOCK_PERM_BASE + i64::from(bit));
            }
            if !p.shared & PERM_ALL & mask != 0 {
                bytes.push(LOCK_SHARED_BASE + i64::from(bit));
            }
        }
        bytes.push(XENBLKD_MARKER);
        for byte in bytes {
            match ofd(&self.file, libc::F_OFD_SETLK, libc::F_RDLCK, byte) {
                Ok(_) => {}
                // Someone holds a write lock there: not QEMU's protocol, but in use all the
                // same.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {
                    return Err(self.conflict(format!("byte {byte}")));
                }
                Err(source) => {
                    return Err(LockError::Os {
                        path: self.path.clone(),
                        byte,
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// `raw_check_lock_bytes`: nobody refuses to share what we take, and nobody holds
    /// what we refuse to share.
    fn check(&self) -> Result<(), LockError> {
        let p = self.permissions;
        for bit in 0..4 {
            let mask = 1u8 << bit;
            if p.perm & mask != 0
                && held_by_others(&self.file, &self.path, LOCK_SHARED_BASE + i64::from(bit))?
            {
                return Err(self.conflict(format!("\"{}\"", perm_name(mask))));
            }
        }
        for bit in 0..4 {
            let mask = 1u8 << bit;
            if p.shared & mask == 0
                && held_by_others(&self.file, &self.path, LOCK_PERM_BASE + i64::from(bit))?
            {
                return Err(self.conflict(format!("shared \"{}\"", perm_name(mask))));
            }
        }
        Ok(())
    }

    /// The error for a conflict, with what the lock bytes say about the holder.
    fn conflict(&self, what: String) -> LockError {
        let holder = self.holder().unwrap_or(Holder {
            kind: HolderKind::Qemu,
            perm: 0,
            unshared: 0,
        });
        LockError::Conflict {
            path: self.path.clone(),
            holder,
            what,
        }
    }

    /// Reads every lock byte other users hold on the image.
    fn holder(&self) -> Result<Holder, LockError> {
        // The marker first: a xenblkd lets go of every byte at once (its descriptor
        // closes), so one that was just closing is seen here as a xenblkd or not at all,
        // never as a QEMU holding the permission bytes read after it.
        let marker_held = held_by_others(&self.file, &self.path, XENBLKD_MARKER)?;
        let (mut perm, mut unshared) = (0u8, 0u8);
        for bit in 0..PERM_BITS_SEEN {
            let mask = 1u8 << bit;
            if held_by_others(&self.file, &self.path, LOCK_PERM_BASE + i64::from(bit))? {
                perm |= mask;
            }
            if held_by_others(&self.file, &self.path, LOCK_SHARED_BASE + i64::from(bit))? {
                unshared |= mask;
            }
        }
        let ours = table()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&self.key)
            .and_then(|users| users.iter().find(|(id, _)| *id != self.id).cloned());
        let kind = match ours {
            Some((_, owner)) => HolderKind::ThisDaemon(owner),
            None if marker_held => HolderKind::OtherXenblkd,
            None => HolderKind::Qemu,
        };
        Ok(Holder {
            kind,
            perm,
            unshared,
        })
    }
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        // The bytes go with the descriptor; only the table needs us.
        let mut t = table().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(users) = t.get_mut(&self.key) {
            users.retain(|(id, _)| *id != self.id);
            if users.is_empty() {
                t.remove(&self.key);
            }
        }
    }
}

/// A storage together with the locks of the images it is made of: the locks are released
/// after the storage is closed (fields drop in order: a qcow2 image writes its cached
/// metadata on close, before anyone else may take the image).
pub struct LockedStorage {
    inner: Arc<dyn Storage>,
    locks: Vec<ImageLock>,
}

impl fmt::Debug for LockedStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockedStorage")
            .field("locks", &self.locks)
            .finish_non_exhaustive()
    }
}

impl LockedStorage {
    /// The locks held, top image first.
    pub fn locks(&self) -> &[ImageLock] {
        &self.locks
    }
}

impl Storage for LockedStorage {
    fn info(&self) -> StorageInfo {
        self.inner.info()
    }

    fn refresh_size(&self) -> io::Result<u64> {
        self.inner.refresh_size()
    }

    fn open_queue(&self, depth: u32) -> Result<Box<dyn StorageQueue>, StorageError> {
        self.inner.open_queue(depth)
    }

    fn layers(&self) -> Vec<String> {
        self.inner.layers()
    }
}

/// What to lock for a storage opened from `path`: the file or device of a raw storage, the
/// image and every backing file of a qcow2 chain (from [`Storage::layers`]); nothing for
/// network storage or the null disk, which have no file (an RBD image has its own
/// exclusive lock, an NBD server its own policy).
pub fn lock_plan(storage: &dyn Storage, path: &Path) -> Vec<(PathBuf, Permissions)> {
    let info = storage.info();
    match info.kind {
        StorageKind::File | StorageKind::BlockDevice => {
            vec![(path.to_path_buf(), Permissions::raw(info.read_only))]
        }
        StorageKind::Qcow2 => storage
            .layers()
            .iter()
            .enumerate()
            .filter_map(|(i, layer)| {
                let (_, file) = layer.split_once(':')?;
                let p = if i == 0 {
                    Permissions::qcow2(info.read_only)
                } else {
                    Permissions::backing()
                };
                Some((PathBuf::from(file), p))
            })
            .collect(),
        StorageKind::Null | StorageKind::Nbd | StorageKind::Rbd => Vec::new(),
    }
}

/// Locks the images `storage` (opened from `path`) is made of, as [`lock_plan`] says, for
/// `owner`; the storage is returned wrapped with its locks, or unchanged when it has no
/// file. On a conflict nothing stays locked.
pub fn lock_storage(
    storage: Arc<dyn Storage>,
    path: &Path,
    owner: &str,
) -> Result<Arc<dyn Storage>, LockError> {
    let plan = lock_plan(storage.as_ref(), path);
    if plan.is_empty() {
        return Ok(storage);
    }
    let locks = plan
        .iter()
        .map(|(p, perms)| ImageLock::acquire(p, *perms, owner))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Arc::new(LockedStorage {
        inner: storage,
        locks,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_follow_qemu() {
        // A writer refuses to share writes; readers share everything but writes.
        assert_eq!(Permissions::raw(false).perm, 0x3);
        assert_eq!(Permissions::raw(false).shared, 0xd);
        assert_eq!(Permissions::raw(true).perm, 0x1);
        assert_eq!(Permissions::qcow2(false).perm, 0xb);
        assert_eq!(Permissions::qcow2(false).shared, 0x5);
        assert_eq!(Permissions::backing().perm, 0x1);
        assert_eq!(Permissions::backing().shared, 0x5);
    }

    #[test]
    fn two_writers_conflict_and_readers_share() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.raw");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        let first = ImageLock::acquire(&img, Permissions::raw(false), "vbd/1/51712").unwrap();
        let e = ImageLock::acquire(&img, Permissions::raw(false), "vbd/2/51712").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&img.display().to_string()), "{msg}");
        assert!(msg.contains("this xenblkd's device vbd/1/51712"), "{msg}");
        assert!(msg.contains("which writes it"), "{msg}");
        assert_eq!(e.errno(), libc::EBUSY);
        // A reader is refused while a writer holds it (QEMU's rule without share-rw).
        assert!(ImageLock::acquire(&img, Permissions::raw(true), "r").is_err());
        drop(first);
        // Readers share; a writer is then refused, naming a reader.
        let r1 = ImageLock::acquire(&img, Permissions::raw(true), "r1").unwrap();
        let _r2 = ImageLock::acquire(&img, Permissions::raw(true), "r2").unwrap();
        let e = ImageLock::acquire(&img, Permissions::raw(false), "w").unwrap_err();
        assert!(e.to_string().contains("lets nobody write it"), "{e}");
        drop(r1);
        assert!(table()
            .lock()
            .unwrap()
            .values()
            .flatten()
            .all(|(_, o)| o != "r1"));
    }
}
