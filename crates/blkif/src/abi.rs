//! The wire format: constants, the three struct layouts and ring geometry.
//!
//! This module owns every number that comes from Xen's `xen/io/blkif.h`,
//! `xen/io/ring.h` and `xen/io/protocols.h`, and the byte offsets of every field in
//! every request/response variant for each protocol a frontend may choose with its
//! `protocol` xenstore key. Nothing here touches shared memory; `request`, `response`
//! and `ring` encode and decode private byte buffers with these offsets.
//!
//! Two layouts exist. `x86_64-abi` (and every 64-bit or ARM host's native layout)
//! aligns `uint64_t` to 8 bytes, so the 64-bit `id` of a request sits at offset 8
//! after 4 bytes of padding. `x86_32-abi` is the i386 layout, where `uint64_t` is only
//! 4-byte aligned: `id` sits at offset 4 and the request is 108 bytes instead of 112.
//! The C cross-check test (`tests/abi_cross_check.rs`) compiles `tests/c/blkif_abi.c`
//! against the real headers with and without `-m32` and compares every offset below.

#[cfg(target_endian = "big")]
compile_error!("the Xen ring protocols are little-endian; big-endian hosts are not supported");

/// Size of a Xen page (`XEN_PAGE_SIZE`): ring pages, data pages, indirect pages.
pub const PAGE_SIZE: usize = 4096;

/// Unit of `sector_number`, `nr_sectors`, `first_sect`/`last_sect`: always 512 bytes,
/// whatever the device's `sector-size` (blkif.h: "sector numbers are in 512-byte units").
pub const SECTOR_SIZE: u64 = 512;

/// Sectors in one page: `first_sect`/`last_sect` must be below this (the seed's
/// `last_sect >= (XEN_PAGE_SIZE >> 9)` check).
#[allow(clippy::cast_possible_truncation)] // 4096 / 512 = 8
pub const SECTORS_PER_PAGE: u8 = (PAGE_SIZE as u64 / SECTOR_SIZE) as u8;

// Operations (`BLKIF_OP_*`).
/// `BLKIF_OP_READ`.
pub const BLKIF_OP_READ: u8 = 0;
/// `BLKIF_OP_WRITE`.
pub const BLKIF_OP_WRITE: u8 = 1;
/// `BLKIF_OP_WRITE_BARRIER`: drain, then write (optionally with data).
pub const BLKIF_OP_WRITE_BARRIER: u8 = 2;
/// `BLKIF_OP_FLUSH_DISKCACHE`: flush the device cache (optionally after writing data).
pub const BLKIF_OP_FLUSH_DISKCACHE: u8 = 3;
/// `BLKIF_OP_RESERVED_1`: used by an old, never upstreamed trim interface; unsupported.
pub const BLKIF_OP_RESERVED_1: u8 = 4;
/// `BLKIF_OP_DISCARD`: `struct blkif_request_discard`.
pub const BLKIF_OP_DISCARD: u8 = 5;
/// `BLKIF_OP_INDIRECT`: `struct blkif_request_indirect`.
pub const BLKIF_OP_INDIRECT: u8 = 6;

// Response status (`BLKIF_RSP_*`).
/// `BLKIF_RSP_EOPNOTSUPP`: operation not supported (unknown opcode, feature off).
pub const BLKIF_RSP_EOPNOTSUPP: i16 = -2;
/// `BLKIF_RSP_ERROR`: the request was malformed or failed.
pub const BLKIF_RSP_ERROR: i16 = -1;
/// `BLKIF_RSP_OKAY`.
pub const BLKIF_RSP_OKAY: i16 = 0;

/// `BLKIF_DISCARD_SECURE`, in `blkif_request_discard.flag`; ignored unless the backend
/// advertised `discard-secure`.
pub const BLKIF_DISCARD_SECURE: u8 = 1 << 0;

/// `BLKIF_MAX_SEGMENTS_PER_REQUEST`: segments in a direct request.
pub const BLKIF_MAX_SEGMENTS_PER_REQUEST: usize = 11;
/// `BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST`: grefs of indirect pages in one request.
pub const BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST: usize = 8;
/// Segment descriptors in one indirect page (`SEGS_PER_INDIRECT_FRAME` in blkback).
pub const SEGMENTS_PER_INDIRECT_PAGE: usize = PAGE_SIZE / SEGMENT_SIZE;
/// The most segments an indirect request can describe at all (8 pages of 512).
pub const MAX_INDIRECT_SEGMENTS: usize =
    BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST * SEGMENTS_PER_INDIRECT_PAGE;

/// Largest `ring-page-order` (16 pages), as `XENBUS_MAX_RING_GRANT_ORDER` in Linux.
pub const MAX_RING_PAGE_ORDER: u32 = 4;

/// `sizeof(struct blkif_request_segment)`: `gref` (u32) at 0, `first_sect` at 4,
/// `last_sect` at 5, two bytes of tail padding.
pub const SEGMENT_SIZE: usize = 8;
/// Offset of `blkif_request_segment.gref`.
pub const SEGMENT_GREF: usize = 0;
/// Offset of `blkif_request_segment.first_sect`.
pub const SEGMENT_FIRST_SECT: usize = 4;
/// Offset of `blkif_request_segment.last_sect`.
pub const SEGMENT_LAST_SECT: usize = 5;

/// Largest request slot of any protocol (112 bytes); private slot buffers have this size.
pub const MAX_REQUEST_SIZE: usize = 112;
/// Largest response of any protocol (16 bytes).
pub const MAX_RESPONSE_SIZE: usize = 16;

/// Offsets inside `struct blkif_sring` (ring.h `DEFINE_RING_TYPES`).
pub mod sring {
    /// `req_prod`: written by the frontend.
    pub const REQ_PROD: usize = 0;
    /// `req_event`: written by the backend ("notify me when req_prod passes this").
    pub const REQ_EVENT: usize = 4;
    /// `rsp_prod`: written by the backend.
    pub const RSP_PROD: usize = 8;
    /// `rsp_event`: written by the frontend.
    pub const RSP_EVENT: usize = 12;
    /// `pvt` (4 bytes, unused by blkif), then `__pad[44]`.
    pub const PVT: usize = 16;
    /// `offsetof(struct blkif_sring, ring)`: the header is 64 bytes in every ABI.
    pub const RING: usize = 64;
}

/// Byte offsets of `struct blkif_request` (READ, WRITE, WRITE_BARRIER, FLUSH_DISKCACHE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadWriteLayout {
    pub operation: usize,
    pub nr_segments: usize,
    pub handle: usize,
    pub id: usize,
    pub sector_number: usize,
    pub seg: usize,
    pub size: usize,
}

/// Byte offsets of `struct blkif_request_discard`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscardLayout {
    pub operation: usize,
    pub flag: usize,
    pub handle: usize,
    pub id: usize,
    pub sector_number: usize,
    pub nr_sectors: usize,
    pub size: usize,
}

/// Byte offsets of `struct blkif_request_indirect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndirectLayout {
    pub operation: usize,
    pub indirect_op: usize,
    pub nr_segments: usize,
    pub id: usize,
    pub sector_number: usize,
    pub handle: usize,
    pub indirect_grefs: usize,
    pub size: usize,
}

/// Byte offsets of the generic request (Linux's `blkif_request_other`): every request
/// starts with `operation` and carries `id` at the same offset, which is what an
/// EOPNOTSUPP answer to an unknown opcode needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OtherLayout {
    pub operation: usize,
    pub id: usize,
}

/// Byte offsets of `struct blkif_response`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseLayout {
    pub id: usize,
    pub operation: usize,
    pub status: usize,
    pub size: usize,
}

/// Every offset of one ABI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub read_write: ReadWriteLayout,
    pub discard: DiscardLayout,
    pub indirect: IndirectLayout,
    pub other: OtherLayout,
    pub response: ResponseLayout,
    /// `sizeof(union blkif_sring_entry)`: the stride of ring slots (the request size;
    /// responses are smaller).
    pub slot_size: usize,
}

/// The i386 layout (`x86_32-abi`): `uint64_t` is 4-byte aligned.
pub const LAYOUT_X86_32: Layout = Layout {
    read_write: ReadWriteLayout {
        operation: 0,
        nr_segments: 1,
        handle: 2,
        id: 4,
        sector_number: 12,
        seg: 20,
        size: 20 + BLKIF_MAX_SEGMENTS_PER_REQUEST * SEGMENT_SIZE, // 108
    },
    discard: DiscardLayout {
        operation: 0,
        flag: 1,
        handle: 2,
        id: 4,
        sector_number: 12,
        nr_sectors: 20,
        size: 28,
    },
    indirect: IndirectLayout {
        operation: 0,
        indirect_op: 1,
        nr_segments: 2,
        id: 4,
        sector_number: 12,
        handle: 20,
        // 2 bytes of padding after `handle`, so the grant references are 4-aligned.
        indirect_grefs: 24,
        // blkif.h adds an explicit `uint64_t pad` on i386 to reach 64 bytes.
        size: 64,
    },
    other: OtherLayout {
        operation: 0,
        id: 4,
    },
    response: ResponseLayout {
        id: 0,
        operation: 8,
        status: 10,
        size: 12,
    },
    slot_size: 108,
};

/// The x86_64 layout (`x86_64-abi`, and the native layout of 64-bit and ARM hosts).
pub const LAYOUT_X86_64: Layout = Layout {
    read_write: ReadWriteLayout {
        operation: 0,
        nr_segments: 1,
        handle: 2,
        id: 8,
        sector_number: 16,
        seg: 24,
        size: 24 + BLKIF_MAX_SEGMENTS_PER_REQUEST * SEGMENT_SIZE, // 112
    },
    discard: DiscardLayout {
        operation: 0,
        flag: 1,
        handle: 2,
        id: 8,
        sector_number: 16,
        nr_sectors: 24,
        size: 32,
    },
    indirect: IndirectLayout {
        operation: 0,
        indirect_op: 1,
        nr_segments: 2,
        id: 8,
        sector_number: 16,
        handle: 24,
        indirect_grefs: 28,
        // 28 + 8 * 4 = 60, rounded up to the 8-byte alignment of the struct.
        size: 64,
    },
    other: OtherLayout {
        operation: 0,
        id: 8,
    },
    response: ResponseLayout {
        id: 0,
        operation: 8,
        status: 10,
        size: 16,
    },
    slot_size: 112,
};

#[cfg(target_arch = "x86")]
const NATIVE_LAYOUT: &Layout = &LAYOUT_X86_32;
#[cfg(not(target_arch = "x86"))]
const NATIVE_LAYOUT: &Layout = &LAYOUT_X86_64;

/// `XEN_IO_PROTO_ABI_X86_32`.
pub const XEN_IO_PROTO_ABI_X86_32: &str = "x86_32-abi";
/// `XEN_IO_PROTO_ABI_X86_64`.
pub const XEN_IO_PROTO_ABI_X86_64: &str = "x86_64-abi";
/// `XEN_IO_PROTO_ABI_ARM`.
pub const XEN_IO_PROTO_ABI_ARM: &str = "arm-abi";

/// `XEN_IO_PROTO_ABI_NATIVE`: this host's protocol name.
#[cfg(target_arch = "x86")]
pub const XEN_IO_PROTO_ABI_NATIVE: &str = XEN_IO_PROTO_ABI_X86_32;
/// `XEN_IO_PROTO_ABI_NATIVE`: this host's protocol name.
#[cfg(target_arch = "x86_64")]
pub const XEN_IO_PROTO_ABI_NATIVE: &str = XEN_IO_PROTO_ABI_X86_64;
/// `XEN_IO_PROTO_ABI_NATIVE`: this host's protocol name.
#[cfg(any(target_arch = "arm", target_arch = "aarch64"))]
pub const XEN_IO_PROTO_ABI_NATIVE: &str = XEN_IO_PROTO_ABI_ARM;
#[cfg(not(any(
    target_arch = "x86",
    target_arch = "x86_64",
    target_arch = "arm",
    target_arch = "aarch64"
)))]
compile_error!("Xen defines ring protocols only for x86 and ARM hosts");

/// The struct layout a frontend chose with its `protocol` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Protocol {
    /// The host's own layout (the frontend wrote no `protocol` key, or the host's name).
    Native,
    /// `x86_32-abi`: a 32-bit x86 guest on a host of another layout.
    X86_32,
    /// `x86_64-abi`.
    X86_64,
}

/// A `protocol` value that names no known ABI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown ring protocol {0:?} (expected x86_32-abi, x86_64-abi or {native})", native = XEN_IO_PROTO_ABI_NATIVE)]
pub struct UnknownProtocol(pub String);

impl Protocol {
    /// The protocol to use when the frontend wrote no `protocol` key.
    pub const fn native() -> Self {
        Protocol::Native
    }

    /// Parses the frontend's `protocol` xenstore value.
    ///
    /// As Linux's xenbus.c does, the host's own name is checked first and maps to
    /// [`Protocol::Native`] (so on x86_64 `"x86_64-abi"` is `Native`; the layouts are
    /// identical anyway). An absent key means native and is the caller's business.
    pub fn from_xenstore(name: &str) -> Result<Self, UnknownProtocol> {
        if name == XEN_IO_PROTO_ABI_NATIVE {
            Ok(Protocol::Native)
        } else if name == XEN_IO_PROTO_ABI_X86_32 {
            Ok(Protocol::X86_32)
        } else if name == XEN_IO_PROTO_ABI_X86_64 {
            Ok(Protocol::X86_64)
        } else {
            Err(UnknownProtocol(name.to_owned()))
        }
    }

    /// Parses the frontend's `protocol` node as read from xenstore: the one parser both
    /// sides use. `Ok(None)` when there is no node or it is empty, which means native:
    /// blkif.h says so ("Default Value: XEN_IO_PROTO_ABI_NATIVE") and QEMU's qdisk
    /// follows it. (Linux blkback instead assumes x86_32 on x86 hosts, a relic of the
    /// first 32-bit PV guests on 64-bit dom0s; libxl writes `protocol` for every PV guest
    /// anyway, so only frontends that never heard of the node omit it — native ones.) A
    /// value is what [`Protocol::from_xenstore`] makes of it, the host's own name first,
    /// as blkback's `connect_ring`; one trailing NUL is tolerated (some writers include
    /// the terminator).
    pub fn from_node(value: Option<&[u8]>) -> Result<Option<Self>, UnknownProtocol> {
        let Some(raw) = value else {
            return Ok(None);
        };
        let v = raw.strip_suffix(&[0]).unwrap_or(raw);
        if v.is_empty() {
            return Ok(None);
        }
        match std::str::from_utf8(v) {
            Ok(name) => Protocol::from_xenstore(name).map(Some),
            Err(_) => Err(UnknownProtocol(String::from_utf8_lossy(v).into_owned())),
        }
    }

    /// The name a frontend writes for this protocol.
    pub const fn xenstore_name(self) -> &'static str {
        match self {
            Protocol::Native => XEN_IO_PROTO_ABI_NATIVE,
            Protocol::X86_32 => XEN_IO_PROTO_ABI_X86_32,
            Protocol::X86_64 => XEN_IO_PROTO_ABI_X86_64,
        }
    }

    /// Every field offset of this protocol.
    pub const fn layout(self) -> &'static Layout {
        match self {
            Protocol::Native => NATIVE_LAYOUT,
            Protocol::X86_32 => &LAYOUT_X86_32,
            Protocol::X86_64 => &LAYOUT_X86_64,
        }
    }

    /// `sizeof(union blkif_sring_entry)`: 112 (native on 64-bit, x86_64) or 108 (x86_32).
    pub const fn slot_size(self) -> usize {
        self.layout().slot_size
    }

    /// `sizeof(struct blkif_request)`: same as [`Protocol::slot_size`].
    pub const fn request_size(self) -> usize {
        self.layout().read_write.size
    }

    /// `sizeof(struct blkif_response)`: 16 or 12 (x86_32).
    pub const fn response_size(self) -> usize {
        self.layout().response.size
    }
}

/// Rounds down to a power of two, as ring.h's `__RD32` (0 stays 0).
const fn round_down_pow2(x: usize) -> usize {
    if x == 0 {
        0
    } else {
        1 << (usize::BITS - 1 - x.leading_zeros())
    }
}

/// `__RING_SIZE`: slots in a shared ring of `ring_bytes` bytes for `protocol`: the room
/// after the 64-byte header divided by the slot size, rounded down to a power of two.
/// 0 if the region cannot even hold the header and one slot.
pub const fn ring_size_for_len(protocol: Protocol, ring_bytes: usize) -> u32 {
    if ring_bytes < sring::RING {
        return 0;
    }
    let slots = round_down_pow2((ring_bytes - sring::RING) / protocol.slot_size());
    if slots > 1 << 31 {
        return 1 << 31;
    }
    #[allow(clippy::cast_possible_truncation)] // at most 2^31, checked above
    let slots = slots as u32;
    slots
}

/// Slots in a ring of `2^order` pages (`ring-page-order`), or `None` when `order`
/// exceeds [`MAX_RING_PAGE_ORDER`]. 32, 64, 128, 256, 512 for orders 0..=4 in every
/// protocol (108-byte x86_32 slots round down to the same powers of two).
pub const fn ring_size(protocol: Protocol, order: u32) -> Option<u32> {
    if order > MAX_RING_PAGE_ORDER {
        return None;
    }
    Some(ring_size_for_len(protocol, PAGE_SIZE << order))
}

/// Number of indirect pages holding `nr_segments` descriptors (`INDIRECT_PAGES()`).
pub const fn indirect_pages(nr_segments: usize) -> usize {
    nr_segments.div_ceil(SEGMENTS_PER_INDIRECT_PAGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_blkif_h() {
        assert_eq!(LAYOUT_X86_64.read_write.size, 112);
        assert_eq!(LAYOUT_X86_32.read_write.size, 108);
        assert_eq!(LAYOUT_X86_64.response.size, 16);
        assert_eq!(LAYOUT_X86_32.response.size, 12);
        assert_eq!(SEGMENT_SIZE, 8);
        assert_eq!(SEGMENTS_PER_INDIRECT_PAGE, 512);
        assert_eq!(MAX_INDIRECT_SEGMENTS, 4096);
        assert_eq!(SECTORS_PER_PAGE, 8);
        for l in [LAYOUT_X86_32, LAYOUT_X86_64] {
            assert!(l.slot_size <= MAX_REQUEST_SIZE);
            assert!(l.response.size <= MAX_RESPONSE_SIZE);
            assert!(l.discard.size <= l.slot_size && l.indirect.size <= l.slot_size);
            assert_eq!(l.slot_size, l.read_write.size);
            // Every variant keeps `id` at the same offset: errors can always be answered.
            assert_eq!(l.read_write.id, l.other.id);
            assert_eq!(l.discard.id, l.other.id);
            assert_eq!(l.indirect.id, l.other.id);
            assert!(
                l.indirect.indirect_grefs + 4 * BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST
                    <= l.indirect.size
            );
        }
    }

    #[test]
    fn ring_sizes_per_order() {
        for p in [Protocol::Native, Protocol::X86_32, Protocol::X86_64] {
            let sizes: Vec<u32> = (0..=4).map(|o| ring_size(p, o).unwrap()).collect();
            assert_eq!(sizes, [32, 64, 128, 256, 512], "{p:?}");
            assert_eq!(ring_size(p, 5), None);
        }
        assert_eq!(ring_size_for_len(Protocol::X86_64, 63), 0);
        assert_eq!(ring_size_for_len(Protocol::X86_64, 64 + 112), 1);
        assert_eq!(ring_size_for_len(Protocol::X86_64, 64 + 3 * 112), 2);
    }

    #[test]
    fn protocol_names() {
        assert_eq!(Protocol::from_xenstore("x86_32-abi"), Ok(Protocol::X86_32));
        assert_eq!(
            Protocol::from_xenstore(XEN_IO_PROTO_ABI_NATIVE),
            Ok(Protocol::Native)
        );
        assert!(Protocol::from_xenstore("sparc-abi").is_err());
        // The host's own name is native (Linux blkback checks XEN_IO_PROTO_ABI_NATIVE
        // first); arm-abi exists only where it is the host's name.
        assert_eq!(
            Protocol::from_xenstore(XEN_IO_PROTO_ABI_ARM).is_ok(),
            XEN_IO_PROTO_ABI_NATIVE == XEN_IO_PROTO_ABI_ARM
        );
        assert_eq!(Protocol::from_node(None), Ok(None));
        assert_eq!(Protocol::from_node(Some(b"")), Ok(None));
        assert_eq!(Protocol::from_node(Some(b"\0")), Ok(None));
        assert_eq!(
            Protocol::from_node(Some(b"x86_32-abi\0")),
            Ok(Some(Protocol::X86_32))
        );
        assert_eq!(
            Protocol::from_node(Some(XEN_IO_PROTO_ABI_NATIVE.as_bytes())),
            Ok(Some(Protocol::Native))
        );
        assert!(Protocol::from_node(Some(b"X86_64-ABI")).is_err());
        assert!(Protocol::from_node(Some(b"x86_64-abi\0\0")).is_err());
        assert!(Protocol::from_node(Some(&[0xff, 0xfe])).is_err());
        assert!(Protocol::from_xenstore("").is_err());
        for p in [Protocol::Native, Protocol::X86_32, Protocol::X86_64] {
            let back = Protocol::from_xenstore(p.xenstore_name()).unwrap();
            assert_eq!(back.layout(), p.layout());
        }
    }

    #[test]
    fn indirect_page_count() {
        assert_eq!(indirect_pages(0), 0);
        assert_eq!(indirect_pages(1), 1);
        assert_eq!(indirect_pages(512), 1);
        assert_eq!(indirect_pages(513), 2);
        assert_eq!(indirect_pages(4096), 8);
        assert_eq!(indirect_pages(4097), 9);
    }
}
