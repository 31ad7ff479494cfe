//! What the frontend offers: the knobs a Linux guest sets with xen-blkfront's module
//! parameters, plus the odd behaviours tests need from a frontend.
//!
//! The defaults are Linux's: `max_queues` 4, `max_ring_page_order` 0,
//! `max_indirect_segments` 32, `feature_persistent` on, native protocol, flush preferred
//! over barrier.

use std::time::Duration;

pub use blkif::abi::Protocol;

use crate::layout::DEFAULT_MAX_INDIRECT_SEGMENTS;

/// Which cache-control operation `flush()` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FlushPreference {
    /// Linux: `BLKIF_OP_FLUSH_DISKCACHE` when the backend advertises
    /// `feature-flush-cache`, else `BLKIF_OP_WRITE_BARRIER` when it advertises
    /// `feature-barrier`, else no cache control at all (`flush()` is a no-op, as for a
    /// disk without a volatile write cache).
    #[default]
    PreferFlush,
    /// Barrier whenever the backend advertises it, flush otherwise: exercises the
    /// backend's barrier drain.
    PreferBarrier,
    /// Never send either; `flush()` is a no-op.
    Disabled,
}

/// Which queue a synchronous request goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueuePolicy {
    /// Each calling thread sticks to one queue (threads are spread round-robin the first
    /// time they submit), like blk-mq's per-CPU software queues mapping onto hardware
    /// queues.
    #[default]
    PerThread,
    /// Every synchronous call takes the next queue in turn.
    RoundRobin,
}

/// Where a request's data starts inside its first page.
///
/// Linux's page-cache I/O is page aligned; O_DIRECT I/O from a sector-aligned user buffer
/// is not, and then the first segment starts mid-page (`first_sect > 0`) and the last
/// ends mid-page. The backend must handle both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BufferPlacement {
    /// Data starts at the beginning of a page.
    #[default]
    PageAligned,
    /// Data starts at the disk offset's position within a 4 KiB page (sector aligned),
    /// as an O_DIRECT buffer at the same alignment as the file offset would.
    FollowDiskOffset,
    /// Data always starts this many sectors (0..=7) into the page.
    SectorOffset(u8),
}

/// What the frontend offers and how it behaves.
#[derive(Debug, Clone)]
pub struct FrontendConfig {
    /// Domain id of the backend (granted pages and event channels are for it).
    pub backend_domid: u16,
    /// The ABI requests are encoded in.
    pub protocol: Protocol,
    /// Most queues (rings) to use; the backend's `multi-queue-max-queues` caps it.
    pub max_queues: u32,
    /// Largest ring-page-order to use (0..=4); the backend's `max-ring-page-order` caps it.
    pub max_ring_order: u32,
    /// Offer and use persistent grants (Linux's `feature_persistent` parameter).
    pub persistent: bool,
    /// Most segments per indirect request (Linux's `max_indirect_segments`, default 32);
    /// 0 or anything up to 11 disables indirect descriptors.
    pub max_indirect_segments: u32,
    /// Cache-control operation used by `flush()`.
    pub flush: FlushPreference,
    /// Use `feature-discard` when the backend offers it.
    pub discard: bool,
    /// How synchronous calls pick a queue.
    pub queue_policy: QueuePolicy,
    /// Where data starts in the first page of a request.
    pub placement: BufferPlacement,
    /// Refuse writes locally on a device the backend reports read-only (as the Linux block
    /// layer does). Off: send them anyway, to test the backend's refusal.
    pub honour_read_only: bool,
    /// Write the `protocol` key (xenstore mode). Linux always does; a frontend that omits
    /// it gets the backend's native layout.
    pub write_protocol: bool,
    /// Use the legacy single `ring-ref` / `event-channel` keys for a one-page,
    /// one-queue ring (as Linux does); off: `ring-ref0` even for one page.
    pub legacy_single_ring_ref: bool,
    /// How long a synchronous call waits for its responses before giving up with
    /// [`crate::Error::Timeout`] (a stuck backend must not hang a test forever).
    pub io_timeout: Duration,
    /// How long the xenstore handshake waits for each backend state change.
    pub connect_timeout: Duration,
}

impl Default for FrontendConfig {
    fn default() -> Self {
        Self {
            backend_domid: 0,
            protocol: Protocol::Native,
            max_queues: 4,
            max_ring_order: 0,
            persistent: true,
            max_indirect_segments: DEFAULT_MAX_INDIRECT_SEGMENTS,
            flush: FlushPreference::PreferFlush,
            discard: true,
            queue_policy: QueuePolicy::PerThread,
            placement: BufferPlacement::PageAligned,
            honour_read_only: true,
            write_protocol: true,
            legacy_single_ring_ref: true,
            io_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
        }
    }
}
