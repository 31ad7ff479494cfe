//! The guest-kernel services a frontend stands on: memory, the grant table, event channels.
//!
//! A Linux blkfront calls `alloc_page`, `gnttab_grant_foreign_access_ref`,
//! `gnttab_end_foreign_access_ref`, `xenbus_alloc_evtchn` and `notify_remote_via_irq`.
//! [`Guest`] is that seam: the simulator's guest implements it (see [`crate::sim`]), and
//! the unit tests implement it in memory so they can play a hostile backend without one.

use std::time::Duration;

use shmem::SharedMemory;

/// A guest page frame number.
pub type Frame = u32;
/// A grant reference in the guest's grant table.
pub type GrantRef = u32;
/// An event-channel port.
pub type Port = u32;

/// A guest service failed.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// No free page of guest memory.
    #[error("guest memory exhausted ({wanted} page(s) wanted)")]
    OutOfMemory { wanted: usize },
    /// No free grant-table entry.
    #[error("grant table exhausted")]
    OutOfGrants,
    /// A frame outside guest memory (a bug in the frontend).
    #[error("frame {0} is outside guest memory")]
    BadFrame(Frame),
    /// The platform underneath failed.
    #[error("{op}: {source}")]
    Platform {
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl GuestError {
    /// Wraps a platform error.
    pub fn platform(
        op: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        GuestError::Platform {
            op,
            source: source.into(),
        }
    }
}

/// Why a grant could not be revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EndAccessError {
    /// The backend still has the page mapped (`GTF_reading`/`GTF_writing` set): the
    /// page must not be reused until it lets go.
    #[error("grant {0} is still mapped by the backend")]
    StillMapped(GrantRef),
    /// Not a grant we hold.
    #[error("grant {0} is not active")]
    Invalid(GrantRef),
}

/// One event channel offered to the backend (an unbound port, `xenbus_alloc_evtchn`).
/// Closing happens on drop.
pub trait GuestEventChannel: Send + Sync {
    /// Our port: what `event-channel` in xenstore (or the direct connection) names.
    fn port(&self) -> Port;
    /// Kicks the backend.
    fn notify(&self) -> Result<(), GuestError>;
    /// Waits up to `timeout` for a notification from the backend and consumes every one
    /// pending. `Ok(true)` if one came.
    fn wait(&self, timeout: Duration) -> Result<bool, GuestError>;
}

/// Memory, grants and event channels of one guest domain.
///
/// Implementations are shared by every queue of every frontend of the guest, so all
/// methods take `&self`.
pub trait Guest: Send + Sync {
    /// Allocates `count` zeroed pages; the frames need not be contiguous.
    fn alloc_frames(&self, count: usize) -> Result<Vec<Frame>, GuestError>;
    /// Returns pages to the allocator. Their grants must have been ended.
    fn free_frames(&self, frames: &[Frame]);
    /// Copies out of a page.
    fn read_frame(&self, frame: Frame, offset: usize, dst: &mut [u8]) -> Result<(), GuestError>;
    /// Copies into a page.
    fn write_frame(&self, frame: Frame, offset: usize, src: &[u8]) -> Result<(), GuestError>;
    /// Maps `frames` as one virtually contiguous region (a shared ring of several pages).
    fn map_frames(&self, frames: &[Frame]) -> Result<SharedMemory, GuestError>;
    /// Grants `domid` access to `frame` (`gnttab_grant_foreign_access`).
    fn grant_access(
        &self,
        domid: u16,
        frame: Frame,
        readonly: bool,
    ) -> Result<GrantRef, GuestError>;
    /// Revokes a grant and frees its entry, unless the backend still maps it.
    fn end_access(&self, gref: GrantRef) -> Result<(), EndAccessError>;
    /// Allocates an unbound event channel for `remote` to bind.
    fn alloc_event_channel(&self, remote: u16) -> Result<Box<dyn GuestEventChannel>, GuestError>;
}
