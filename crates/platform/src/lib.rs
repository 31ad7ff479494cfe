//! The hypervisor seam: everything xenblkd needs from Xen, behind a few traits.
//!
//! A userspace blkback needs four things from the hypervisor, and this crate owns all of
//! them and nothing else (no block logic, no ring layout, no xenstore protocol):
//!
//! * **grant mapping** ([`GrantMapper::map`]): a batch of grant references becomes one
//!   virtually contiguous [`GrantMapping`] that unmaps itself on drop. A batch is one
//!   request's segments, a ring (1..16 pages), one indirect page or one persistent
//!   grant; persistent grants are mapped one per call so each can be purged on its own;
//! * **grant copy** ([`GrantMapper::copy`]): the qdisk-style alternative, per-op status;
//! * **event channels** ([`EventChannelBinder::bind_interdomain`], [`EventChannel`]): one
//!   pollable fd per ring, `notify` to kick the frontend, `ack` to consume and unmask;
//! * **where xenstore is** ([`Platform::xenstore_endpoint`]): the daemon connects with the
//!   `xenstore` crate's client, which speaks the same protocol on a socket and on
//!   `/dev/xen/xenbus`.
//!
//! Two implementations: [`linux`] (the real thing on a dom0 or driver domain:
//! `/dev/xen/gntdev`, `/dev/xen/evtchn`) and [`sim`] (a simulated hypervisor whose guests
//! own memfd memory and a real `grant_entry_v1` table, in the same process or another
//! one). [`grant_table`] holds the grant-table ABI and the checks Xen performs, shared by
//! the simulator and its tests.
//!
//! Error statuses are Xen's own `GNTST_*` codes ([`GrantStatus`]) so that a test on the
//! simulator asserts exactly what a real hypervisor would answer.

#![warn(clippy::cast_possible_truncation)]

use std::fmt;
use std::io;
use std::os::fd::BorrowedFd;
use std::path::PathBuf;

pub mod grant_table;
pub mod linux;
mod mapping;
pub mod sim;

pub use mapping::{
    CopyBuffer, CopyDirection, CopySegment, GrantCopyOp, GrantMapping, ReadOnlyMapping,
};
pub use shmem::{OutOfBounds, SharedMemory, PAGE_SIZE};

/// A Xen domain id (`domid_t`).
pub type DomId = u16;
/// A grant reference (`grant_ref_t`): an index into the granting domain's grant table.
pub type GrantRef = u32;
/// An event-channel port (`evtchn_port_t`).
pub type Port = u32;

/// Domain ids at and above this value are reserved by Xen (`DOMID_FIRST_RESERVED`).
pub const DOMID_FIRST_RESERVED: DomId = 0x7ff0;

/// Most grant references one [`GrantMapper::map`] call accepts. Bounds the address space
/// and the per-call work a frontend can make us spend: the largest legitimate batch is an
/// indirect request's data pages (blkback caps indirect segments at 256) or a 16-page ring.
pub const MAX_MAP_BATCH: usize = 1024;

/// How a grant is mapped: blkback maps read-only for requests that only read guest
/// memory (WRITE, indirect descriptor pages) and read-write for those that fill it (READ)
/// and for rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

impl Access {
    pub fn is_writable(self) -> bool {
        matches!(self, Access::ReadWrite)
    }
}

/// A grant-operation status, Xen's `GNTST_*` (`xen/grant_table.h`).
///
/// A newtype rather than an enum because the kernel writes it back for grant copy and may
/// one day return a code this crate does not know; unknown codes still print.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
#[repr(transparent)]
pub struct GrantStatus(pub i16);

impl GrantStatus {
    pub const OKAY: Self = Self(0);
    pub const GENERAL_ERROR: Self = Self(-1);
    pub const BAD_DOMAIN: Self = Self(-2);
    pub const BAD_GNTREF: Self = Self(-3);
    pub const BAD_HANDLE: Self = Self(-4);
    pub const BAD_VIRT_ADDR: Self = Self(-5);
    pub const BAD_DEV_ADDR: Self = Self(-6);
    pub const NO_DEVICE_SPACE: Self = Self(-7);
    pub const PERMISSION_DENIED: Self = Self(-8);
    pub const BAD_PAGE: Self = Self(-9);
    pub const BAD_COPY_ARG: Self = Self(-10);
    pub const ADDRESS_TOO_BIG: Self = Self(-11);
    pub const EAGAIN: Self = Self(-12);
    pub const NO_SPACE: Self = Self(-13);

    pub fn is_ok(self) -> bool {
        self == Self::OKAY
    }

    /// Xen's name for the code, `None` for a code this crate does not know.
    pub fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0 => "GNTST_okay",
            -1 => "GNTST_general_error",
            -2 => "GNTST_bad_domain",
            -3 => "GNTST_bad_gntref",
            -4 => "GNTST_bad_handle",
            -5 => "GNTST_bad_virt_addr",
            -6 => "GNTST_bad_dev_addr",
            -7 => "GNTST_no_device_space",
            -8 => "GNTST_permission_denied",
            -9 => "GNTST_bad_page",
            -10 => "GNTST_bad_copy_arg",
            -11 => "GNTST_address_too_big",
            -12 => "GNTST_eagain",
            -13 => "GNTST_no_space",
            _ => return None,
        })
    }
}

impl fmt::Display for GrantStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} ({})", self.0),
            None => write!(f, "GNTST_unknown ({})", self.0),
        }
    }
}

impl fmt::Debug for GrantStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a [`GrantMapper::map`] batch failed. Nothing of the batch stays mapped.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The hypervisor refused one entry, which fails the whole batch (its request).
    #[error("mapping {count} grant(s) of d{domid}: entry {index} (gref {gref}) failed: {status}")]
    Grant {
        domid: DomId,
        /// Index of the failing entry in the batch.
        index: usize,
        gref: GrantRef,
        count: usize,
        status: GrantStatus,
    },
    /// The kernel refused the batch without saying which entry failed (gntdev reports a
    /// failed hypercall entry only as an errno from `mmap`).
    #[error("mapping {count} grant(s) of d{domid} refused by the kernel ({status}): {source}")]
    Kernel {
        domid: DomId,
        count: usize,
        status: GrantStatus,
        #[source]
        source: io::Error,
    },
    /// Empty or oversized batch: a caller bug, never sent to the hypervisor.
    #[error("a grant batch must hold 1..={max} refs, got {count}")]
    BadBatchSize { count: usize, max: usize },
    /// No virtual address space for the mapping.
    #[error("no address space for {pages} page(s): {source}")]
    AddressSpace {
        pages: usize,
        #[source]
        source: io::Error,
    },
}

impl MapError {
    /// The `GNTST_*` code that best describes the failure (what a response to the
    /// frontend or a test asserts on).
    pub fn status(&self) -> GrantStatus {
        match self {
            MapError::Grant { status, .. } | MapError::Kernel { status, .. } => *status,
            MapError::BadBatchSize { .. } => GrantStatus::GENERAL_ERROR,
            MapError::AddressSpace { .. } => GrantStatus::NO_SPACE,
        }
    }

    /// Whether the hypervisor refused the grant itself (no such reference, not granted
    /// to us, read-only, another domain): a grant copy of it would be refused too.
    /// `false` for a map that failed for want of resources (address space, the process's
    /// `vm.max_map_count`, the hypervisor's map-tracking table) or for an unknown reason:
    /// gntdev reports a refused entry only as an errno from `mmap`, so on Linux a failed
    /// map never says which it was. The engine serves those requests by grant copy
    /// instead, which uses none of these resources and reports each refused grant
    /// precisely.
    pub fn grant_refused(&self) -> bool {
        match self {
            MapError::Grant { status, .. } => !matches!(
                *status,
                GrantStatus::NO_SPACE | GrantStatus::EAGAIN | GrantStatus::NO_DEVICE_SPACE
            ),
            MapError::BadBatchSize { .. } => true,
            MapError::Kernel { .. } | MapError::AddressSpace { .. } => false,
        }
    }

    /// Whether the map is known to have failed for want of resources (address space,
    /// `vm.max_map_count`, a full map-tracking table, a transient shortage): the grants
    /// themselves may be fine. `false` when a grant was refused, and when the kernel did
    /// not say ([`MapError::Kernel`] with an errno other than ENOMEM, ENOSPC or EAGAIN).
    pub fn lacks_resources(&self) -> bool {
        match self {
            MapError::AddressSpace { .. } => true,
            MapError::Grant { status, .. } | MapError::Kernel { status, .. } => matches!(
                *status,
                GrantStatus::NO_SPACE | GrantStatus::EAGAIN | GrantStatus::NO_DEVICE_SPACE
            ),
            MapError::BadBatchSize { .. } => false,
        }
    }

    /// Index of the failing entry in the batch, when the platform knows it.
    pub fn index(&self) -> Option<usize> {
        match self {
            MapError::Grant { index, .. } => Some(*index),
            _ => None,
        }
    }

    /// Re-bases an error from a sub-batch starting at `offset` of a batch of `count`.
    fn rebase(self, offset: usize, count: usize) -> Self {
        match self {
            MapError::Grant {
                domid,
                index,
                gref,
                status,
                ..
            } => MapError::Grant {
                domid,
                index: index + offset,
                gref,
                count,
                status,
            },
            other => other,
        }
    }
}

/// Errors of the platform outside a grant map.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// A Xen device node is absent: not a Xen domain, or xen-gntdev / xen-evtchn not loaded.
    #[error("{path} is unavailable ({source}); is this a Xen dom0 or driver domain with the xen-gntdev and xen-evtchn drivers loaded?")]
    DeviceMissing {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// The domain is not known to the platform (never attached, detached, or destroyed).
    #[error("domain {0} is not attached")]
    UnknownDomain(DomId),
    #[error("domain {0} is already attached")]
    DomainExists(DomId),
    /// `bind_interdomain` on a port that is not an unbound port offered to us.
    #[error("d{domid} port {port}: {reason}")]
    BadPort {
        domid: DomId,
        port: Port,
        reason: &'static str,
    },
    /// The simulator only: a guest that attached moments ago ([`sim::PORT_OFFER_GRACE`])
    /// has not offered this port yet. A guest reattaching to a new backend process
    /// re-offers its ports right after the welcome, so a daemon adopting devices at start
    /// can ask before they arrive; it waits, as for an unknown domain. After the grace the
    /// same bind is a [`PlatformError::BadPort`].
    #[error("d{domid} port {port}: not offered yet (the guest attached moments ago)")]
    PortNotYetOffered { domid: DomId, port: Port },
    /// A simulated domain broke the attach protocol (bad sizes, unsealed memory, ...).
    #[error("simulated domain protocol: {0}")]
    Protocol(String),
    #[error("no xenstore endpoint found (tried {tried:?})")]
    NoXenstore { tried: Vec<PathBuf> },
}

impl PlatformError {
    pub(crate) fn io(op: &'static str, source: impl Into<io::Error>) -> Self {
        PlatformError::Io {
            op,
            source: source.into(),
        }
    }
}

/// How the daemon reaches xenstore; it connects with the `xenstore` crate's client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XenstoreEndpoint {
    /// xenstored's (or the simulator's) unix socket.
    UnixSocket(PathBuf),
    /// The kernel's xenbus device, in a domain without a local xenstored.
    XenbusDevice(PathBuf),
}

/// Grant mapping and grant copy; shared by all reactor threads.
pub trait GrantMapper: Send + Sync {
    /// Maps `refs` of domain `domid` as one virtually contiguous region of
    /// `refs.len()` pages, page `i` holding `refs[i]`.
    ///
    /// A failing entry fails the whole batch and leaves nothing mapped, as blkback fails
    /// the request whose segment did not map.
    fn map(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        access: Access,
    ) -> Result<GrantMapping, MapError>;

    /// Most VMAs one [`map`](Self::map) of `pages` grants may occupy in this process
    /// (what it costs against `vm.max_map_count`), known before mapping so that the cost
    /// can be reserved first; the mapping made says what it really took
    /// ([`GrantMapping::vmas`]). The default, one per page, is the worst case of a
    /// platform that maps each guest frame on its own (the simulator, whose guest frames
    /// are file pages: frames that are not consecutive cannot share an `mmap`); gntdev
    /// maps any batch as one VMA.
    fn max_vmas(&self, pages: usize) -> usize {
        pages
    }

    /// Maps each ref on its own (persistent grants, which the LRU purge unmaps one by
    /// one). All or nothing: on failure the ones already mapped are unmapped and the error
    /// names the failing index in `refs`.
    fn map_each(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        access: Access,
    ) -> Result<Vec<GrantMapping>, MapError> {
        if refs.is_empty() || refs.len() > MAX_MAP_BATCH {
            return Err(MapError::BadBatchSize {
                count: refs.len(),
                max: MAX_MAP_BATCH,
            });
        }
        let mut out = Vec::with_capacity(refs.len());
        for (i, gref) in refs.iter().enumerate() {
            let m = self
                .map(domid, std::slice::from_ref(gref), access)
                .map_err(|e| e.rebase(i, refs.len()))?;
            out.push(m);
        }
        Ok(out)
    }

    /// Performs grant copies. Each op's status is written back (`GNTST_okay` or why it
    /// failed); `Err` only when the whole call failed, in which case every status is
    /// `GNTST_general_error`.
    fn copy(&self, ops: &mut [GrantCopyOp<'_>]) -> Result<(), PlatformError>;

    /// Performs grant copies between guest pages and one local `buffer`, each segment
    /// naming its local range by offset. Like [`copy`](Self::copy), each status is
    /// written back; a segment whose local range is outside `buffer`, or that crosses the
    /// guest page, gets `GNTST_bad_copy_arg`. `Err` when the hypervisor refused a whole
    /// batch: the segments from that batch on read `GNTST_general_error`. The segments
    /// are plain data, so a caller reuses one vector of them: no allocation per copy.
    fn copy_segments(
        &self,
        buffer: CopyBuffer<'_>,
        segs: &mut [CopySegment],
    ) -> Result<(), PlatformError>;

    /// Grant mappings currently alive (each [`GrantMapping`], however many pages), for
    /// leak checks.
    fn live_mappings(&self) -> usize;

    /// Pages currently mapped through this mapper.
    fn mapped_pages(&self) -> usize;
}

/// One bound interdomain event channel: one per ring. Unbinds on drop.
pub trait EventChannel: Send + Sync {
    /// Pollable fd, readable when the other side notified. Owned by the channel, so the
    /// borrow cannot outlive it.
    fn fd(&self) -> BorrowedFd<'_>;
    /// Kicks the other side.
    fn notify(&self) -> Result<(), PlatformError>;
    /// Consumes pending notifications and re-enables delivery. `true` if one was
    /// pending. Call after `fd()` polled readable, before looking at the ring.
    fn ack(&self) -> Result<bool, PlatformError>;
    /// Our port number.
    fn local_port(&self) -> Port;
    /// The frontend's end: (domain, port).
    fn remote(&self) -> (DomId, Port);
}

/// Binds event channels.
pub trait EventChannelBinder: Send + Sync {
    /// Binds to the unbound port `remote_port` that `domid` offered us (the frontend's
    /// `event-channel` node), like `IOCTL_EVTCHN_BIND_INTERDOMAIN`.
    fn bind_interdomain(
        &self,
        domid: DomId,
        remote_port: Port,
    ) -> Result<Box<dyn EventChannel>, PlatformError>;
}

/// A whole hypervisor: what the daemon holds, as `Arc<dyn Platform>` or a generic.
pub trait Platform: GrantMapper + EventChannelBinder {
    /// Where xenstore is.
    fn xenstore_endpoint(&self) -> Result<XenstoreEndpoint, PlatformError>;
    /// Short name for logs ("linux", "sim").
    fn name(&self) -> &'static str;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_match_xen() {
        assert_eq!(GrantStatus::BAD_GNTREF.to_string(), "GNTST_bad_gntref (-3)");
        assert_eq!(GrantStatus(-99).to_string(), "GNTST_unknown (-99)");
        assert!(GrantStatus::OKAY.is_ok());
        assert!(!GrantStatus::GENERAL_ERROR.is_ok());
    }

    #[test]
    fn only_refused_grants_are_not_worth_a_copy() {
        let grant = |status| MapError::Grant {
            domid: 1,
            index: 0,
            gref: 9,
            count: 1,
            status,
        };
        assert!(grant(GrantStatus::BAD_GNTREF).grant_refused());
        assert!(grant(GrantStatus::PERMISSION_DENIED).grant_refused());
        assert!(grant(GrantStatus::BAD_DOMAIN).grant_refused());
        assert!(!grant(GrantStatus::NO_DEVICE_SPACE).grant_refused());
        assert!(!grant(GrantStatus::NO_SPACE).grant_refused());
        assert!(!grant(GrantStatus::EAGAIN).grant_refused());
        let enomem = || io::Error::from_raw_os_error(libc::ENOMEM);
        assert!(!MapError::AddressSpace {
            pages: 1,
            source: enomem()
        }
        .grant_refused());
        assert!(!MapError::Kernel {
            domid: 1,
            count: 1,
            status: GrantStatus::GENERAL_ERROR,
            source: io::Error::from_raw_os_error(libc::EINVAL)
        }
        .grant_refused());
        assert!(MapError::BadBatchSize { count: 0, max: 1 }.grant_refused());
        // Known shortages, as opposed to failures whose cause the kernel did not give.
        assert!(grant(GrantStatus::NO_DEVICE_SPACE).lacks_resources());
        assert!(!grant(GrantStatus::BAD_GNTREF).lacks_resources());
        assert!(MapError::Kernel {
            domid: 1,
            count: 1,
            status: GrantStatus::NO_SPACE,
            source: enomem()
        }
        .lacks_resources());
        assert!(!MapError::Kernel {
            domid: 1,
            count: 1,
            status: GrantStatus::GENERAL_ERROR,
            source: io::Error::from_raw_os_error(libc::EINVAL)
        }
        .lacks_resources());
    }

    #[test]
    fn rebase_moves_index() {
        let e = MapError::Grant {
            domid: 1,
            index: 0,
            gref: 9,
            count: 1,
            status: GrantStatus::BAD_PAGE,
        }
        .rebase(3, 5);
        assert_eq!(e.index(), Some(3));
        assert_eq!(e.status(), GrantStatus::BAD_PAGE);
    }
}
