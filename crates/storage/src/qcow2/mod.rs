//! The qcow2 backend: QEMU's image format through the `imago` library (MIT, by a QEMU
//! block-layer maintainer), not a parser of our own.
//!
//! What it serves: qcow2 version 2 and 3 images with cluster allocation on write, backing
//! chains of qcow2 and raw layers (every backing file opened read-only, at most
//! [`MAX_CHAIN`] layers, each backing format recorded in its overlay's header), compressed
//! clusters (read; a write reallocates the cluster), discard on version 3 images (unmaps
//! whole clusters, writes zeros for partial ones: a discarded range reads back as zeros;
//! version 2 images offer no discard), flush (imago writes its
//! cached L2 tables and refcount blocks in dependency order, then `fsync`).
//!
//! Refused when the disk is added, with the image and the feature named (see `header`):
//! encryption (AES or LUKS), external data files, the dirty and corrupt bits, non-zlib
//! compression, extended L2 entries, unknown incompatible features, backing files without a
//! recorded format (probing a format is how a guest that once wrote a raw image can make
//! us read host files), backing files named by protocol (`nbd://`, `json:`), chains deeper
//! than [`MAX_CHAIN`] or with a loop.
//!
//! The size is the image's virtual size, read at open: an image that another program
//! resizes while we serve it is being corrupted (QEMU locks images against that), so
//! [`Storage::refresh_size`] re-reports it unchanged.
//!
//! How I/O runs is the queue's business (module `queue`): reads and writes whose clusters
//! are already mapped go to io_uring from the reactor; everything that needs imago to
//! allocate, copy on write, decompress, discard or flush goes to the queue's worker thread
//! (module `worker`).

mod gate;
mod header;
mod host_file;
mod queue;
mod refcheck;
mod worker;

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{DenyImplicitOpenGate, FormatAccess, FormatDriverBuilder};

use crate::{
    DirectIo, OpenOptions, Storage, StorageError, StorageInfo, StorageKind, StorageQueue,
    MAX_QUEUE_DEPTH,
};
use gate::Gate;
use header::HeaderError;
use host_file::HostFile;

/// Most layers in a chain (the image itself included).
pub const MAX_CHAIN: usize = 16;

/// True if the file at `path` starts with the qcow2 magic (for tools that take an image of
/// either format from their operator; the daemon never probes, it takes `qcow2:`).
pub fn is_qcow2(path: &Path) -> io::Result<bool> {
    header::has_qcow2_magic(&File::open(path)?)
}

/// The image as every queue shares it.
pub(crate) struct Image {
    pub(crate) access: FormatAccess<HostFile>,
    pub(crate) gate: Gate,
    pub(crate) path: PathBuf,
    pub(crate) writable: bool,
    /// Reads and writes served on the reactor's io_uring / handed to a worker.
    pub(crate) mapped: AtomicU64,
    pub(crate) worker: AtomicU64,
}

impl Drop for Image {
    fn drop(&mut self) {
        if self.writable {
            // imago's synchronous FormatAccess also flushes on drop, but cannot say when
            // that failed; a failure here means metadata may be lost.
            if let Err(e) = self.access.flush() {
                tracing::error!(path = %self.path.display(), error = %e,
                    "flushing qcow2 metadata at close failed");
            }
        }
    }
}

/// A qcow2 image (and its backing chain) served through imago.
pub struct Qcow2Storage {
    image: Arc<Image>,
    info: StorageInfo,
    layers: Vec<String>,
}

impl std::fmt::Debug for Qcow2Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Storage")
            .field("layers", &self.layers)
            .field("info", &self.info)
            .finish()
    }
}

/// One layer found while walking the chain from the top.
struct Layer {
    path: PathBuf,
    file: File,
    direct: bool,
    /// `None` for a raw layer.
    header: Option<header::Header>,
}

fn invalid(path: &Path, reason: impl Into<String>) -> StorageError {
    StorageError::InvalidImage {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn header_error(path: &Path, e: HeaderError) -> StorageError {
    match e {
        HeaderError::Invalid(reason) => invalid(path, reason),
        HeaderError::Unsupported(feature) => StorageError::UnsupportedImage {
            path: path.to_path_buf(),
            feature,
        },
    }
}

/// Opens `path` the way the options ask; returns the file and whether O_DIRECT is on.
fn open_file(
    path: &Path,
    writable: bool,
    direct_io: DirectIo,
) -> Result<(File, bool), StorageError> {
    let open_err = |source: io::Error| StorageError::Open {
        path: path.to_path_buf(),
        source,
    };
    let open_with = |direct: bool| {
        let mut flags = libc::O_CLOEXEC;
        if direct {
            flags |= libc::O_DIRECT;
        }
        std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(flags)
            .open(path)
    };
    let direct_refused = |e: io::Error| StorageError::DirectIoUnsupported {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let (file, direct) = match direct_io {
        DirectIo::Off => (open_with(false).map_err(open_err)?, false),
        DirectIo::On => {
            let file = open_with(true).map_err(direct_refused)?;
            crate::raw::probe_direct_read(&file).map_err(direct_refused)?;
            (file, true)
        }
        DirectIo::Auto => match open_with(true) {
            Ok(file) if crate::raw::probe_direct_read(&file).is_ok() => (file, true),
            Ok(_) => (open_with(false).map_err(open_err)?, false),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                (open_with(false).map_err(open_err)?, false)
            }
            Err(e) => return Err(open_err(e)),
        },
    };
    let ft = file
        .metadata()
        .map_err(|source| StorageError::Probe {
            path: path.to_path_buf(),
            what: "fstat",
            source,
        })?
        .file_type();
    if !ft.is_file() && !ft.is_block_device() {
        return Err(StorageError::UnsupportedFileType {
            path: path.to_path_buf(),
        });
    }
    Ok((file, direct))
}

/// Where a backing file name in `overlay`'s header points (QEMU resolves relative names
/// against the overlay's directory).
fn resolve_backing(overlay: &Path, name: &str) -> Result<PathBuf, StorageError> {
    if name.starts_with("json:") || name.contains("://") {
        return Err(StorageError::UnsupportedImage {
            path: overlay.to_path_buf(),
            feature: format!("a backing file named by protocol ({name:?})"),
        });
    }
    let named = Path::new(name);
    Ok(if named.is_absolute() {
        named.to_path_buf()
    } else {
        overlay
            .parent()
            .unwrap_or_else(|| Path::new("/"))
            .join(named)
    })
}

/// Walks the chain from `top` down, checking every header before anything is opened with
/// imago.
fn walk_chain(top: &Path, options: &OpenOptions) -> Result<Vec<Layer>, StorageError> {
    let mut layers = Vec::new();
    let mut seen = HashSet::new();
    let mut next = Some((top.to_path_buf(), true));
    while let Some((path, is_qcow2)) = next.take() {
        if layers.len() == MAX_CHAIN {
            return Err(StorageError::UnsupportedImage {
                path: top.to_path_buf(),
                feature: format!("a backing chain deeper than {MAX_CHAIN} images"),
            });
        }
        let canonical = std::fs::canonicalize(&path).map_err(|source| StorageError::Open {
            path: path.clone(),
            source,
        })?;
        if !seen.insert(canonical) {
            return Err(invalid(&path, "the backing chain loops back to this image"));
        }
        let writable = layers.is_empty() && !options.read_only;
        let (file, direct) = open_file(&path, writable, options.direct_io)?;
        let header = if is_qcow2 {
            let h = header::read(&file).map_err(|e| header_error(&path, e))?;
            if writable {
                // Only a writable image allocates (see `refcheck`).
                refcheck::check(&file, &h).map_err(|e| header_error(&path, e))?;
            }
            if let Some(name) = &h.backing_file {
                let backing = resolve_backing(&path, name)?;
                let backing_is_qcow2 = match h.backing_format.as_deref() {
                    Some("qcow2") => true,
                    Some("raw") | Some("file") => false,
                    Some(other) => {
                        return Err(StorageError::UnsupportedImage {
                            path: path.clone(),
                            feature: format!("backing format {other:?} (only qcow2 and raw)"),
                        })
                    }
                    None => {
                        return Err(StorageError::UnsupportedImage {
                            path: path.clone(),
                            feature: format!(
                                "a backing file ({name}) without a recorded format; record it with `qemu-img rebase -u -F raw|qcow2 -b {name} {}`",
                                path.display()
                            ),
                        })
                    }
                };
                next = Some((backing, backing_is_qcow2));
            }
            Some(h)
        } else {
            None
        };
        layers.push(Layer {
            path,
            file,
            direct,
            header,
        });
    }
    Ok(layers)
}

impl Qcow2Storage {
    /// Opens the qcow2 image at `path` and its backing chain. `options.exclusive` does not
    /// apply (it is about block devices claimed by the kernel).
    pub fn open(path: &Path, options: OpenOptions) -> Result<Qcow2Storage, StorageError> {
        let layers = walk_chain(path, &options)?;
        let top_header = layers
            .first()
            .and_then(|l| l.header.clone())
            .ok_or_else(|| invalid(path, "no image"))?;
        let top_meta = layers[0]
            .file
            .metadata()
            .map_err(|source| StorageError::Probe {
                path: path.to_path_buf(),
                what: "fstat",
                source,
            })?;
        let direct = layers.iter().any(|l| l.direct);
        let names: Vec<String> = layers
            .iter()
            .map(|l| {
                format!(
                    "{}:{}",
                    if l.header.is_some() { "qcow2" } else { "raw" },
                    l.path.display()
                )
            })
            .collect();

        // Build imago's layers from the bottom up, each one the backing of the next.
        let mut below: Option<FormatAccess<HostFile>> = None;
        let depth = layers.len();
        for (i, layer) in layers.into_iter().enumerate().rev() {
            let writable = i == 0 && !options.read_only;
            let imago_err = |e: io::Error| invalid(&layer.path, format!("imago: {e}"));
            let host = HostFile::new(layer.file, &layer.path, writable, layer.direct)
                .map_err(imago_err)?;
            let access = if layer.header.is_some() {
                let qcow2 = Qcow2::<HostFile, FormatAccess<HostFile>>::builder(host)
                    .write(writable)
                    .backing(below.take())
                    .data_file(None)
                    .open(DenyImplicitOpenGate::default())
                    .map_err(imago_err)?;
                FormatAccess::new(qcow2)
            } else {
                let raw = Raw::builder(host)
                    .write(false)
                    .open(DenyImplicitOpenGate::default())
                    .map_err(imago_err)?;
                FormatAccess::new(raw)
            };
            below = Some(access);
        }
        let access = below.ok_or_else(|| invalid(path, "no image"))?;
        debug_assert_eq!(access.size(), top_header.size);

        let read_only = options.read_only;
        let discard_offered = !read_only && top_header.version >= 3;
        // The guest's sector is at least every layer's request *and* memory alignment:
        // a write the worker hands imago that is not aligned to both becomes imago's
        // read-modify-write of whole blocks, which loses a mapped write into the same
        // block (see `host_file`).
        let logical_block_size = if direct {
            u32::try_from(access.req_align().max(access.mem_align()))
                .unwrap_or(4096)
                .max(512)
        } else {
            512
        };
        let size_bytes = access.size() - access.size() % u64::from(logical_block_size);
        let cluster = u32::try_from(top_header.cluster_size()).unwrap_or(u32::MAX);
        let info = StorageInfo {
            size_bytes,
            logical_block_size,
            physical_block_size: u32::try_from(top_meta.blksize())
                .unwrap_or(4096)
                .max(512)
                .max(logical_block_size),
            buffer_alignment: if direct {
                u32::try_from(access.mem_align()).unwrap_or(4096).max(1)
            } else {
                1
            },
            read_only,
            flush: !read_only,
            // imago unmaps whole clusters (and zeroes partial ones): a discard frees space
            // in any version 3 image, whatever the host file system can do. Version 2 has
            // no zero clusters, and imago does not discard there (its maintainer: "safely
            // discarding on them is a hairy affair"): no discard offered.
            discard: discard_offered,
            secure_discard: false,
            discard_granularity: if discard_offered { cluster } else { 0 },
            discard_alignment: 0,
            direct_io: direct,
            kind: StorageKind::Qcow2,
        };
        tracing::info!(path = %path.display(), version = top_header.version,
            cluster_size = cluster, size = size_bytes, layers = depth, chain = ?names,
            direct, read_only, "qcow2 image opened");
        Ok(Qcow2Storage {
            image: Arc::new(Image {
                access,
                gate: Gate::default(),
                path: path.to_path_buf(),
                writable: !read_only,
                mapped: AtomicU64::new(0),
                worker: AtomicU64::new(0),
            }),
            info,
            layers: names,
        })
    }
}

impl Qcow2Storage {
    /// Reads and writes served so far on the reactors' io_uring (`.0`) and by the workers
    /// through imago (`.1`): a fully allocated image should see almost only the first.
    pub fn request_paths(&self) -> (u64, u64) {
        (
            self.image.mapped.load(Ordering::Relaxed),
            self.image.worker.load(Ordering::Relaxed),
        )
    }
}

impl Storage for Qcow2Storage {
    fn info(&self) -> StorageInfo {
        self.info
    }

    fn refresh_size(&self) -> io::Result<u64> {
        Ok(self.info.size_bytes)
    }

    fn open_queue(&self, depth: u32) -> Result<Box<dyn StorageQueue>, StorageError> {
        if depth == 0 || depth > MAX_QUEUE_DEPTH {
            return Err(StorageError::InvalidDepth {
                depth,
                max: MAX_QUEUE_DEPTH,
            });
        }
        Ok(Box::new(queue::Qcow2Queue::new(
            Arc::clone(&self.image),
            self.info,
            depth,
        )?))
    }

    fn layers(&self) -> Vec<String> {
        self.layers.clone()
    }
}
