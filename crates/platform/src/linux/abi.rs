//! The kernel UAPI of `/dev/xen/gntdev`, `/dev/xen/gntalloc` and `/dev/xen/evtchn`,
//! transcribed from `include/uapi/xen/{gntdev,gntalloc,evtchn}.h` (installed by
//! linux-libc-dev as `/usr/include/xen/{gntdev,gntalloc,evtchn}.h`).
//!
//! Every struct size, field offset and ioctl number here is checked against the C
//! headers by `tests/linux_abi.rs`, which compiles a C program with gcc.

#![allow(non_camel_case_types)]

use std::ffi::c_void;
use std::mem::size_of;

/// `_IOC(_IOC_NONE, type, nr, size)` on the generic (x86, arm) ioctl encoding:
/// dir << 30 | size << 16 | type << 8 | nr, with `_IOC_NONE` = 0.
/// `size` is an argument struct's size, far below the 14 bits `_IOC_SIZEBITS` leaves it.
pub const fn ioc_none(ty: u8, nr: u8, size: usize) -> u32 {
    #[allow(clippy::cast_possible_truncation)]
    let size = size as u32;
    (size << 16) | ((ty as u32) << 8) | nr as u32
}

/// `struct ioctl_gntdev_grant_ref`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ioctl_gntdev_grant_ref {
    pub domid: u32,
    pub r#ref: u32,
}

/// `struct ioctl_gntdev_map_grant_ref` with its one-element trailing array; the ioctl
/// takes `count` refs in a longer buffer.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ioctl_gntdev_map_grant_ref {
    pub count: u32,
    pub pad: u32,
    pub index: u64,
    pub refs: [ioctl_gntdev_grant_ref; 1],
}

/// `struct ioctl_gntdev_unmap_grant_ref`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ioctl_gntdev_unmap_grant_ref {
    pub index: u64,
    pub count: u32,
    pub pad: u32,
}

/// `struct ioctl_gntdev_get_offset_for_vaddr`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ioctl_gntdev_get_offset_for_vaddr {
    pub vaddr: u64,
    pub offset: u64,
    pub count: u32,
    pub pad: u32,
}

/// `struct ioctl_gntdev_set_max_grants`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ioctl_gntdev_set_max_grants {
    pub count: u32,
}

/// `struct ioctl_gntdev_unmap_notify`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ioctl_gntdev_unmap_notify {
    pub index: u64,
    pub action: u32,
    pub event_channel_port: u32,
}

/// The `foreign` member of `gntdev_grant_copy_segment`'s source/dest union.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct gntdev_copy_foreign {
    pub r#ref: u32,
    pub offset: u16,
    pub domid: u16,
}

/// `union { void *virt; struct { grant_ref_t ref; __u16 offset; domid_t domid; } foreign; }`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union gntdev_copy_ptr {
    pub virt: *mut c_void,
    pub foreign: gntdev_copy_foreign,
}

impl std::fmt::Debug for gntdev_copy_ptr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Which member is meant is in the segment's flags.
        f.write_str("gntdev_copy_ptr { .. }")
    }
}

/// `struct gntdev_grant_copy_segment`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct gntdev_grant_copy_segment {
    pub source: gntdev_copy_ptr,
    pub dest: gntdev_copy_ptr,
    pub len: u16,
    pub flags: u16,
    pub status: i16,
}

/// `struct ioctl_gntdev_grant_copy`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ioctl_gntdev_grant_copy {
    pub count: u32,
    pub segments: *mut gntdev_grant_copy_segment,
}

/// `GNTCOPY_source_gref`: the source is a grant (else a local address).
pub const GNTCOPY_SOURCE_GREF: u16 = 1 << 0;
/// `GNTCOPY_dest_gref`.
pub const GNTCOPY_DEST_GREF: u16 = 1 << 1;

/// `UNMAP_NOTIFY_CLEAR_BYTE`.
pub const UNMAP_NOTIFY_CLEAR_BYTE: u32 = 0x1;
/// `UNMAP_NOTIFY_SEND_EVENT`.
pub const UNMAP_NOTIFY_SEND_EVENT: u32 = 0x2;

pub const IOCTL_GNTDEV_MAP_GRANT_REF: u32 =
    ioc_none(b'G', 0, size_of::<ioctl_gntdev_map_grant_ref>());
pub const IOCTL_GNTDEV_UNMAP_GRANT_REF: u32 =
    ioc_none(b'G', 1, size_of::<ioctl_gntdev_unmap_grant_ref>());
pub const IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR: u32 =
    ioc_none(b'G', 2, size_of::<ioctl_gntdev_get_offset_for_vaddr>());
/// Handled by old kernels only; current gntdev answers ENOTTY and limits mappings with
/// its `limit` module parameter instead. Not used.
pub const IOCTL_GNTDEV_SET_MAX_GRANTS: u32 =
    ioc_none(b'G', 3, size_of::<ioctl_gntdev_set_max_grants>());
pub const IOCTL_GNTDEV_SET_UNMAP_NOTIFY: u32 =
    ioc_none(b'G', 7, size_of::<ioctl_gntdev_unmap_notify>());
pub const IOCTL_GNTDEV_GRANT_COPY: u32 = ioc_none(b'G', 8, size_of::<ioctl_gntdev_grant_copy>());

/// `struct ioctl_evtchn_bind_interdomain`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ioctl_evtchn_bind_interdomain {
    pub remote_domain: u32,
    pub remote_port: u32,
}

/// `struct ioctl_evtchn_unbind`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ioctl_evtchn_unbind {
    pub port: u32,
}

/// `struct ioctl_evtchn_notify`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ioctl_evtchn_notify {
    pub port: u32,
}

pub const IOCTL_EVTCHN_BIND_INTERDOMAIN: u32 =
    ioc_none(b'E', 1, size_of::<ioctl_evtchn_bind_interdomain>());
pub const IOCTL_EVTCHN_UNBIND: u32 = ioc_none(b'E', 3, size_of::<ioctl_evtchn_unbind>());
pub const IOCTL_EVTCHN_NOTIFY: u32 = ioc_none(b'E', 4, size_of::<ioctl_evtchn_notify>());
pub const IOCTL_EVTCHN_RESET: u32 = ioc_none(b'E', 5, 0);

/// `struct ioctl_evtchn_bind_unbound_port`: allocates a port for `remote_domain` to bind.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ioctl_evtchn_bind_unbound_port {
    pub remote_domain: u32,
}

pub const IOCTL_EVTCHN_BIND_UNBOUND_PORT: u32 =
    ioc_none(b'E', 2, size_of::<ioctl_evtchn_bind_unbound_port>());

/// `struct ioctl_gntalloc_alloc_gref` with its one-element trailing array; the ioctl
/// writes `count` grant references into a longer buffer.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ioctl_gntalloc_alloc_gref {
    pub domid: u16,
    pub flags: u16,
    pub count: u32,
    pub index: u64,
    pub gref_ids: [u32; 1],
}

/// `struct ioctl_gntalloc_dealloc_gref`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ioctl_gntalloc_dealloc_gref {
    pub index: u64,
    pub count: u32,
}

/// `GNTALLOC_FLAG_WRITABLE`: the grant lets the remote domain write.
pub const GNTALLOC_FLAG_WRITABLE: u16 = 1;

pub const IOCTL_GNTALLOC_ALLOC_GREF: u32 =
    ioc_none(b'G', 5, size_of::<ioctl_gntalloc_alloc_gref>());
pub const IOCTL_GNTALLOC_DEALLOC_GREF: u32 =
    ioc_none(b'G', 6, size_of::<ioctl_gntalloc_dealloc_gref>());
