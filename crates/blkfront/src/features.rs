//! Feature negotiation: what the backend offers, what the frontend uses.
//!
//! This module owns the decisions Linux's xen-blkfront makes in `negotiate_mq`,
//! `talk_to_blkback` (queues, ring order), `blkfront_gather_backend_features` (flush vs
//! barrier, discard, persistent grants, indirect segments) and `blkfront_connect` (disk
//! size and geometry), as pure functions of the backend's advertised values and the
//! [`FrontendConfig`]. The xenstore handshake reads the values; the direct connection
//! takes them from the test.

use crate::config::{FlushPreference, FrontendConfig, Protocol};
use crate::layout::negotiate_indirect_segments;

/// `VDISK_CDROM` in the backend's `info`.
pub const VDISK_CDROM: u32 = 0x1;
/// `VDISK_REMOVABLE`.
pub const VDISK_REMOVABLE: u32 = 0x2;
/// `VDISK_READONLY`.
pub const VDISK_READONLY: u32 = 0x4;

/// Discard parameters the backend advertises with `feature-discard`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiscardParams {
    /// `discard-granularity` in bytes (0: not given).
    pub granularity: u32,
    /// `discard-alignment` in bytes.
    pub alignment: u32,
    /// `discard-secure`: `BLKIF_DISCARD_SECURE` is honoured.
    pub secure: bool,
}

/// Everything a backend advertises about itself and its disk.
///
/// In xenstore mode the ring-shaping values (`max_queues`, `max_ring_page_order`) are read
/// at InitWait and the rest at Connected, as Linux does; in direct mode a test fills the
/// whole struct to describe the engine it is about to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendFeatures {
    /// `multi-queue-max-queues` (absent: 1).
    pub max_queues: u32,
    /// `max-ring-page-order` (absent: 0).
    pub max_ring_page_order: u32,
    /// `feature-persistent`.
    pub persistent: bool,
    /// `feature-max-indirect-segments` (absent: 0).
    pub max_indirect_segments: u32,
    /// `feature-flush-cache`.
    pub flush_cache: bool,
    /// `feature-barrier`.
    pub barrier: bool,
    /// `feature-discard` and its parameters.
    pub discard: Option<DiscardParams>,
    /// `sectors`: disk size in 512-byte sectors.
    pub sectors: u64,
    /// `info`: `VDISK_*` flags.
    pub info: u32,
    /// `sector-size`: logical block size in bytes.
    pub sector_size: u32,
    /// `physical-sector-size` (absent: the logical size).
    pub physical_sector_size: u32,
}

impl Default for BackendFeatures {
    /// What xenblkd's engine advertises by default: like blkback (persistent grants,
    /// 256 indirect segments, flush, barrier), 4 queues, order 4 rings, no disk yet.
    fn default() -> Self {
        Self {
            max_queues: 4,
            max_ring_page_order: 4,
            persistent: true,
            max_indirect_segments: 256,
            flush_cache: true,
            barrier: true,
            discard: None,
            sectors: 0,
            info: 0,
            sector_size: 512,
            physical_sector_size: 512,
        }
    }
}

/// The cache-control operation in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheControl {
    /// Neither is available: the disk has no volatile cache as far as the guest knows.
    None,
    /// `BLKIF_OP_FLUSH_DISKCACHE`.
    Flush,
    /// `BLKIF_OP_WRITE_BARRIER`.
    Barrier,
}

/// The disk as the guest sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskInfo {
    /// Size in 512-byte sectors.
    pub sectors: u64,
    /// Logical block size in bytes: I/O offsets and lengths must be multiples of it.
    pub sector_size: u32,
    /// Physical block size in bytes.
    pub physical_sector_size: u32,
    /// `VDISK_*` flags.
    pub info: u32,
}

impl DiskInfo {
    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.sectors.saturating_mul(512)
    }

    /// The backend exports the disk read-only.
    pub fn read_only(&self) -> bool {
        self.info & VDISK_READONLY != 0
    }
}

/// What frontend and backend agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// The ABI of the rings.
    pub protocol: Protocol,
    /// Number of rings.
    pub queues: u32,
    /// Each ring is `2^ring_order` pages.
    pub ring_order: u32,
    /// Persistent grants in use (both sides want them).
    pub persistent: bool,
    /// Segments per indirect request; 0: indirect descriptors off.
    pub max_indirect_segments: u32,
    /// What `flush()` sends.
    pub cache: CacheControl,
    /// Discard in use, with the backend's parameters.
    pub discard: Option<DiscardParams>,
}

/// Parses a xenstore number the way `xenbus_read_unsigned` does: decimal, surrounding
/// whitespace ignored; anything unparsable counts as absent.
pub fn parse_unsigned(value: Option<&str>) -> Option<u64> {
    value.and_then(|v| v.trim().trim_end_matches('\0').parse::<u64>().ok())
}

/// Parses a boolean feature flag (`"1"`/`"0"`; absent or garbage: false).
pub fn parse_flag(value: Option<&str>) -> bool {
    parse_unsigned(value).is_some_and(|v| v != 0)
}

/// `negotiate_mq`: the backend's maximum capped by ours, and at least one.
pub fn negotiate_queues(config: &FrontendConfig, backend_max_queues: u32) -> u32 {
    backend_max_queues.min(config.max_queues).max(1)
}

/// `talk_to_blkback`: `min(xen_blkif_max_ring_order, max-ring-page-order)`, never above
/// what ring.h allows.
pub fn negotiate_ring_order(config: &FrontendConfig, backend_max_order: u32) -> u32 {
    config
        .max_ring_order
        .min(backend_max_order)
        .min(blkif::abi::MAX_RING_PAGE_ORDER)
}

/// `blkfront_gather_backend_features`'s flush logic, with the preference of the config:
/// Linux sets flush+FUA for `feature-barrier`, then overrides with plain flush for
/// `feature-flush-cache`.
pub fn negotiate_cache(config: &FrontendConfig, backend: &BackendFeatures) -> CacheControl {
    match config.flush {
        FlushPreference::Disabled => CacheControl::None,
        FlushPreference::PreferFlush if backend.flush_cache => CacheControl::Flush,
        FlushPreference::PreferFlush if backend.barrier => CacheControl::Barrier,
        FlushPreference::PreferBarrier if backend.barrier => CacheControl::Barrier,
        FlushPreference::PreferBarrier if backend.flush_cache => CacheControl::Flush,
        _ => CacheControl::None,
    }
}

/// Everything at once, given the queues and ring order already fixed at InitWait.
pub fn negotiate(
    config: &FrontendConfig,
    backend: &BackendFeatures,
    queues: u32,
    ring_order: u32,
) -> Negotiated {
    Negotiated {
        protocol: config.protocol,
        queues,
        ring_order,
        persistent: config.persistent && backend.persistent,
        max_indirect_segments: negotiate_indirect_segments(
            backend.max_indirect_segments,
            config.max_indirect_segments,
        ),
        cache: negotiate_cache(config, backend),
        discard: if config.discard {
            backend.discard
        } else {
            None
        },
    }
}

/// The disk geometry from the backend's values; `physical-sector-size` defaults to the
/// logical size as in `blkfront_connect`. `None` if the logical size is not a power of
/// two multiple of 512 (Linux refuses such a disk too).
pub fn disk_info(backend: &BackendFeatures) -> Option<DiskInfo> {
    let ss = backend.sector_size;
    if ss < 512 || !ss.is_power_of_two() {
        return None;
    }
    let pss = if backend.physical_sector_size == 0 {
        ss
    } else {
        backend.physical_sector_size
    };
    Some(DiskInfo {
        sectors: backend.sectors,
        sector_size: ss,
        physical_sector_size: pss,
        info: backend.info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> BackendFeatures {
        BackendFeatures::default()
    }

    #[test]
    fn queues_and_order_follow_linux() {
        let cfg = FrontendConfig::default();
        assert_eq!(negotiate_queues(&cfg, 1), 1);
        assert_eq!(
            negotiate_queues(&cfg, 16),
            4,
            "Linux's max_queues default is 4"
        );
        assert_eq!(negotiate_queues(&cfg, 0), 1, "at least one ring");
        assert_eq!(
            negotiate_ring_order(&cfg, 4),
            0,
            "Linux's default order is 0"
        );
        let cfg = FrontendConfig {
            max_ring_order: 4,
            ..cfg
        };
        assert_eq!(negotiate_ring_order(&cfg, 2), 2);
        assert_eq!(negotiate_ring_order(&cfg, 9), 4);
    }

    #[test]
    fn flush_is_preferred_over_barrier() {
        let cfg = FrontendConfig::default();
        let mut b = backend();
        assert_eq!(negotiate_cache(&cfg, &b), CacheControl::Flush);
        b.flush_cache = false;
        assert_eq!(negotiate_cache(&cfg, &b), CacheControl::Barrier);
        b.barrier = false;
        assert_eq!(negotiate_cache(&cfg, &b), CacheControl::None);
        let cfg = FrontendConfig {
            flush: FlushPreference::PreferBarrier,
            ..cfg
        };
        b.flush_cache = true;
        assert_eq!(negotiate_cache(&cfg, &b), CacheControl::Flush);
        b.barrier = true;
        assert_eq!(negotiate_cache(&cfg, &b), CacheControl::Barrier);
    }

    #[test]
    fn persistent_needs_both_sides_and_indirect_is_capped() {
        let cfg = FrontendConfig::default();
        let mut b = backend();
        let n = negotiate(&cfg, &b, 1, 0);
        assert!(n.persistent);
        assert_eq!(n.max_indirect_segments, 32);
        b.persistent = false;
        b.max_indirect_segments = 0;
        let n = negotiate(&cfg, &b, 1, 0);
        assert!(!n.persistent);
        assert_eq!(n.max_indirect_segments, 0);
        let cfg = FrontendConfig {
            persistent: false,
            ..cfg
        };
        assert!(!negotiate(&cfg, &backend(), 1, 0).persistent);
    }

    #[test]
    fn xenstore_numbers_parse_like_xenbus_read_unsigned() {
        assert_eq!(parse_unsigned(Some("256")), Some(256));
        assert_eq!(parse_unsigned(Some(" 7\n")), Some(7));
        assert_eq!(parse_unsigned(Some("x")), None);
        assert_eq!(parse_unsigned(Some("-1")), None);
        assert_eq!(parse_unsigned(None), None);
        assert!(parse_flag(Some("1")));
        assert!(!parse_flag(Some("0")));
        assert!(!parse_flag(Some("yes")));
    }

    #[test]
    fn disk_geometry() {
        let mut b = backend();
        b.sectors = 2048;
        b.sector_size = 4096;
        b.physical_sector_size = 0;
        let d = disk_info(&b).unwrap();
        assert_eq!(d.physical_sector_size, 4096);
        assert_eq!(d.size_bytes(), 1 << 20);
        b.sector_size = 1000;
        assert!(disk_info(&b).is_none());
        b.sector_size = 512;
        b.info = VDISK_READONLY;
        assert!(disk_info(&b).unwrap().read_only());
    }
}
