//! The Rust transcription of the gntdev/evtchn UAPI and of the grant-table ABI, checked
//! against the C headers: a C program built with gcc from `/usr/include/xen/gntdev.h`,
//! `/usr/include/xen/evtchn.h` (linux-libc-dev) and `/usr/include/xen/grant_table.h`
//! (libxen-dev) prints sizes, offsets, ioctl numbers and constants; every one must match.
//! Missing gcc or headers fail the test: an unchecked ABI is not a pass.

use std::collections::HashMap;
use std::mem::{offset_of, size_of};
use std::process::Command;

use platform::grant_table as gt;
use platform::linux::abi;
use platform::GrantStatus;

const C_PROGRAM: &str = r#"
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/event_channel.h>
#include <xen/gntdev.h>
#include <xen/evtchn.h>
#include <xen/gntalloc.h>

#define P(name, expr) printf("%s %lld\n", name, (long long)(expr))

int main(void) {
    P("sizeof ioctl_gntdev_grant_ref", sizeof(struct ioctl_gntdev_grant_ref));
    P("offsetof ioctl_gntdev_grant_ref.ref", offsetof(struct ioctl_gntdev_grant_ref, ref));
    P("sizeof ioctl_gntdev_map_grant_ref", sizeof(struct ioctl_gntdev_map_grant_ref));
    P("offsetof ioctl_gntdev_map_grant_ref.index", offsetof(struct ioctl_gntdev_map_grant_ref, index));
    P("offsetof ioctl_gntdev_map_grant_ref.refs", offsetof(struct ioctl_gntdev_map_grant_ref, refs));
    P("sizeof ioctl_gntdev_unmap_grant_ref", sizeof(struct ioctl_gntdev_unmap_grant_ref));
    P("offsetof ioctl_gntdev_unmap_grant_ref.count", offsetof(struct ioctl_gntdev_unmap_grant_ref, count));
    P("sizeof ioctl_gntdev_get_offset_for_vaddr", sizeof(struct ioctl_gntdev_get_offset_for_vaddr));
    P("offsetof ioctl_gntdev_get_offset_for_vaddr.offset", offsetof(struct ioctl_gntdev_get_offset_for_vaddr, offset));
    P("offsetof ioctl_gntdev_get_offset_for_vaddr.count", offsetof(struct ioctl_gntdev_get_offset_for_vaddr, count));
    P("sizeof ioctl_gntdev_unmap_notify", sizeof(struct ioctl_gntdev_unmap_notify));
    P("offsetof ioctl_gntdev_unmap_notify.action", offsetof(struct ioctl_gntdev_unmap_notify, action));
    P("offsetof ioctl_gntdev_unmap_notify.event_channel_port", offsetof(struct ioctl_gntdev_unmap_notify, event_channel_port));
    P("sizeof gntdev_grant_copy_segment", sizeof(struct gntdev_grant_copy_segment));
    P("offsetof gntdev_grant_copy_segment.dest", offsetof(struct gntdev_grant_copy_segment, dest));
    P("offsetof gntdev_grant_copy_segment.len", offsetof(struct gntdev_grant_copy_segment, len));
    P("offsetof gntdev_grant_copy_segment.flags", offsetof(struct gntdev_grant_copy_segment, flags));
    P("offsetof gntdev_grant_copy_segment.status", offsetof(struct gntdev_grant_copy_segment, status));
    P("offsetof gntdev_grant_copy_segment.source.foreign.offset", offsetof(struct gntdev_grant_copy_segment, source.foreign.offset));
    P("offsetof gntdev_grant_copy_segment.source.foreign.domid", offsetof(struct gntdev_grant_copy_segment, source.foreign.domid));
    P("sizeof ioctl_gntdev_grant_copy", sizeof(struct ioctl_gntdev_grant_copy));
    P("offsetof ioctl_gntdev_grant_copy.segments", offsetof(struct ioctl_gntdev_grant_copy, segments));
    P("IOCTL_GNTDEV_MAP_GRANT_REF", IOCTL_GNTDEV_MAP_GRANT_REF);
    P("IOCTL_GNTDEV_UNMAP_GRANT_REF", IOCTL_GNTDEV_UNMAP_GRANT_REF);
    P("IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR", IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR);
    P("IOCTL_GNTDEV_SET_MAX_GRANTS", IOCTL_GNTDEV_SET_MAX_GRANTS);
    P("IOCTL_GNTDEV_SET_UNMAP_NOTIFY", IOCTL_GNTDEV_SET_UNMAP_NOTIFY);
    P("IOCTL_GNTDEV_GRANT_COPY", IOCTL_GNTDEV_GRANT_COPY);
    P("UNMAP_NOTIFY_CLEAR_BYTE", UNMAP_NOTIFY_CLEAR_BYTE);
    P("UNMAP_NOTIFY_SEND_EVENT", UNMAP_NOTIFY_SEND_EVENT);
    P("GNTCOPY_source_gref", GNTCOPY_source_gref);
    P("GNTCOPY_dest_gref", GNTCOPY_dest_gref);

    P("sizeof ioctl_evtchn_bind_interdomain", sizeof(struct ioctl_evtchn_bind_interdomain));
    P("offsetof ioctl_evtchn_bind_interdomain.remote_port", offsetof(struct ioctl_evtchn_bind_interdomain, remote_port));
    P("sizeof ioctl_evtchn_unbind", sizeof(struct ioctl_evtchn_unbind));
    P("sizeof ioctl_evtchn_notify", sizeof(struct ioctl_evtchn_notify));
    P("IOCTL_EVTCHN_BIND_INTERDOMAIN", IOCTL_EVTCHN_BIND_INTERDOMAIN);
    P("IOCTL_EVTCHN_UNBIND", IOCTL_EVTCHN_UNBIND);
    P("IOCTL_EVTCHN_NOTIFY", IOCTL_EVTCHN_NOTIFY);
    P("IOCTL_EVTCHN_RESET", IOCTL_EVTCHN_RESET);
    P("sizeof evtchn_port_t", sizeof(evtchn_port_t));
    P("sizeof ioctl_evtchn_bind_unbound_port", sizeof(struct ioctl_evtchn_bind_unbound_port));
    P("IOCTL_EVTCHN_BIND_UNBOUND_PORT", IOCTL_EVTCHN_BIND_UNBOUND_PORT);
    P("sizeof ioctl_gntalloc_alloc_gref", sizeof(struct ioctl_gntalloc_alloc_gref));
    P("offsetof ioctl_gntalloc_alloc_gref.flags", offsetof(struct ioctl_gntalloc_alloc_gref, flags));
    P("offsetof ioctl_gntalloc_alloc_gref.count", offsetof(struct ioctl_gntalloc_alloc_gref, count));
    P("offsetof ioctl_gntalloc_alloc_gref.index", offsetof(struct ioctl_gntalloc_alloc_gref, index));
    P("offsetof ioctl_gntalloc_alloc_gref.gref_ids", offsetof(struct ioctl_gntalloc_alloc_gref, gref_ids));
    P("sizeof ioctl_gntalloc_dealloc_gref", sizeof(struct ioctl_gntalloc_dealloc_gref));
    P("offsetof ioctl_gntalloc_dealloc_gref.count", offsetof(struct ioctl_gntalloc_dealloc_gref, count));
    P("GNTALLOC_FLAG_WRITABLE", GNTALLOC_FLAG_WRITABLE);
    P("IOCTL_GNTALLOC_ALLOC_GREF", IOCTL_GNTALLOC_ALLOC_GREF);
    P("IOCTL_GNTALLOC_DEALLOC_GREF", IOCTL_GNTALLOC_DEALLOC_GREF);

    P("sizeof grant_entry_v1", sizeof(struct grant_entry_v1));
    P("offsetof grant_entry_v1.domid", offsetof(struct grant_entry_v1, domid));
    P("offsetof grant_entry_v1.frame", offsetof(struct grant_entry_v1, frame));
    P("GTF_invalid", GTF_invalid);
    P("GTF_permit_access", GTF_permit_access);
    P("GTF_accept_transfer", GTF_accept_transfer);
    P("GTF_transitive", GTF_transitive);
    P("GTF_type_mask", GTF_type_mask);
    P("GTF_readonly", GTF_readonly);
    P("GTF_reading", GTF_reading);
    P("GTF_writing", GTF_writing);
    P("GTF_PWT", GTF_PWT);
    P("GTF_PCD", GTF_PCD);
    P("GTF_PAT", GTF_PAT);
    P("GTF_sub_page", GTF_sub_page);
    P("GNTTAB_NR_RESERVED_ENTRIES", GNTTAB_NR_RESERVED_ENTRIES);
    P("DOMID_FIRST_RESERVED", DOMID_FIRST_RESERVED);
    P("GNTST_okay", GNTST_okay);
    P("GNTST_general_error", GNTST_general_error);
    P("GNTST_bad_domain", GNTST_bad_domain);
    P("GNTST_bad_gntref", GNTST_bad_gntref);
    P("GNTST_bad_handle", GNTST_bad_handle);
    P("GNTST_bad_virt_addr", GNTST_bad_virt_addr);
    P("GNTST_bad_dev_addr", GNTST_bad_dev_addr);
    P("GNTST_no_device_space", GNTST_no_device_space);
    P("GNTST_permission_denied", GNTST_permission_denied);
    P("GNTST_bad_page", GNTST_bad_page);
    P("GNTST_bad_copy_arg", GNTST_bad_copy_arg);
    P("GNTST_address_too_big", GNTST_address_too_big);
    P("GNTST_eagain", GNTST_eagain);
    P("GNTST_no_space", GNTST_no_space);
    return 0;
}
"#;

fn rust_values() -> Vec<(&'static str, i64)> {
    use abi::*;
    let z = |v: usize| v as i64;
    vec![
        (
            "sizeof ioctl_gntdev_grant_ref",
            z(size_of::<ioctl_gntdev_grant_ref>()),
        ),
        (
            "offsetof ioctl_gntdev_grant_ref.ref",
            z(offset_of!(ioctl_gntdev_grant_ref, r#ref)),
        ),
        (
            "sizeof ioctl_gntdev_map_grant_ref",
            z(size_of::<ioctl_gntdev_map_grant_ref>()),
        ),
        (
            "offsetof ioctl_gntdev_map_grant_ref.index",
            z(offset_of!(ioctl_gntdev_map_grant_ref, index)),
        ),
        (
            "offsetof ioctl_gntdev_map_grant_ref.refs",
            z(offset_of!(ioctl_gntdev_map_grant_ref, refs)),
        ),
        (
            "sizeof ioctl_gntdev_unmap_grant_ref",
            z(size_of::<ioctl_gntdev_unmap_grant_ref>()),
        ),
        (
            "offsetof ioctl_gntdev_unmap_grant_ref.count",
            z(offset_of!(ioctl_gntdev_unmap_grant_ref, count)),
        ),
        (
            "sizeof ioctl_gntdev_get_offset_for_vaddr",
            z(size_of::<ioctl_gntdev_get_offset_for_vaddr>()),
        ),
        (
            "offsetof ioctl_gntdev_get_offset_for_vaddr.offset",
            z(offset_of!(ioctl_gntdev_get_offset_for_vaddr, offset)),
        ),
        (
            "offsetof ioctl_gntdev_get_offset_for_vaddr.count",
            z(offset_of!(ioctl_gntdev_get_offset_for_vaddr, count)),
        ),
        (
            "sizeof ioctl_gntdev_unmap_notify",
            z(size_of::<ioctl_gntdev_unmap_notify>()),
        ),
        (
            "offsetof ioctl_gntdev_unmap_notify.action",
            z(offset_of!(ioctl_gntdev_unmap_notify, action)),
        ),
        (
            "offsetof ioctl_gntdev_unmap_notify.event_channel_port",
            z(offset_of!(ioctl_gntdev_unmap_notify, event_channel_port)),
        ),
        (
            "sizeof gntdev_grant_copy_segment",
            z(size_of::<gntdev_grant_copy_segment>()),
        ),
        (
            "offsetof gntdev_grant_copy_segment.dest",
            z(offset_of!(gntdev_grant_copy_segment, dest)),
        ),
        (
            "offsetof gntdev_grant_copy_segment.len",
            z(offset_of!(gntdev_grant_copy_segment, len)),
        ),
        (
            "offsetof gntdev_grant_copy_segment.flags",
            z(offset_of!(gntdev_grant_copy_segment, flags)),
        ),
        (
            "offsetof gntdev_grant_copy_segment.status",
            z(offset_of!(gntdev_grant_copy_segment, status)),
        ),
        (
            "offsetof gntdev_grant_copy_segment.source.foreign.offset",
            z(offset_of!(gntdev_grant_copy_segment, source)
                + offset_of!(gntdev_copy_foreign, offset)),
        ),
        (
            "offsetof gntdev_grant_copy_segment.source.foreign.domid",
            z(offset_of!(gntdev_grant_copy_segment, source)
                + offset_of!(gntdev_copy_foreign, domid)),
        ),
        (
            "sizeof ioctl_gntdev_grant_copy",
            z(size_of::<ioctl_gntdev_grant_copy>()),
        ),
        (
            "offsetof ioctl_gntdev_grant_copy.segments",
            z(offset_of!(ioctl_gntdev_grant_copy, segments)),
        ),
        (
            "IOCTL_GNTDEV_MAP_GRANT_REF",
            IOCTL_GNTDEV_MAP_GRANT_REF.into(),
        ),
        (
            "IOCTL_GNTDEV_UNMAP_GRANT_REF",
            IOCTL_GNTDEV_UNMAP_GRANT_REF.into(),
        ),
        (
            "IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR",
            IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR.into(),
        ),
        (
            "IOCTL_GNTDEV_SET_MAX_GRANTS",
            IOCTL_GNTDEV_SET_MAX_GRANTS.into(),
        ),
        (
            "IOCTL_GNTDEV_SET_UNMAP_NOTIFY",
            IOCTL_GNTDEV_SET_UNMAP_NOTIFY.into(),
        ),
        ("IOCTL_GNTDEV_GRANT_COPY", IOCTL_GNTDEV_GRANT_COPY.into()),
        ("UNMAP_NOTIFY_CLEAR_BYTE", UNMAP_NOTIFY_CLEAR_BYTE.into()),
        ("UNMAP_NOTIFY_SEND_EVENT", UNMAP_NOTIFY_SEND_EVENT.into()),
        ("GNTCOPY_source_gref", GNTCOPY_SOURCE_GREF.into()),
        ("GNTCOPY_dest_gref", GNTCOPY_DEST_GREF.into()),
        (
            "sizeof ioctl_evtchn_bind_interdomain",
            z(size_of::<ioctl_evtchn_bind_interdomain>()),
        ),
        (
            "offsetof ioctl_evtchn_bind_interdomain.remote_port",
            z(offset_of!(ioctl_evtchn_bind_interdomain, remote_port)),
        ),
        (
            "sizeof ioctl_evtchn_unbind",
            z(size_of::<ioctl_evtchn_unbind>()),
        ),
        (
            "sizeof ioctl_evtchn_notify",
            z(size_of::<ioctl_evtchn_notify>()),
        ),
        (
            "IOCTL_EVTCHN_BIND_INTERDOMAIN",
            IOCTL_EVTCHN_BIND_INTERDOMAIN.into(),
        ),
        ("IOCTL_EVTCHN_UNBIND", IOCTL_EVTCHN_UNBIND.into()),
        ("IOCTL_EVTCHN_NOTIFY", IOCTL_EVTCHN_NOTIFY.into()),
        ("IOCTL_EVTCHN_RESET", IOCTL_EVTCHN_RESET.into()),
        ("sizeof evtchn_port_t", z(size_of::<platform::Port>())),
        (
            "sizeof ioctl_evtchn_bind_unbound_port",
            z(size_of::<ioctl_evtchn_bind_unbound_port>()),
        ),
        (
            "IOCTL_EVTCHN_BIND_UNBOUND_PORT",
            IOCTL_EVTCHN_BIND_UNBOUND_PORT.into(),
        ),
        (
            "sizeof ioctl_gntalloc_alloc_gref",
            z(size_of::<ioctl_gntalloc_alloc_gref>()),
        ),
        (
            "offsetof ioctl_gntalloc_alloc_gref.flags",
            z(offset_of!(ioctl_gntalloc_alloc_gref, flags)),
        ),
        (
            "offsetof ioctl_gntalloc_alloc_gref.count",
            z(offset_of!(ioctl_gntalloc_alloc_gref, count)),
        ),
        (
            "offsetof ioctl_gntalloc_alloc_gref.index",
            z(offset_of!(ioctl_gntalloc_alloc_gref, index)),
        ),
        (
            "offsetof ioctl_gntalloc_alloc_gref.gref_ids",
            z(offset_of!(ioctl_gntalloc_alloc_gref, gref_ids)),
        ),
        (
            "sizeof ioctl_gntalloc_dealloc_gref",
            z(size_of::<ioctl_gntalloc_dealloc_gref>()),
        ),
        (
            "offsetof ioctl_gntalloc_dealloc_gref.count",
            z(offset_of!(ioctl_gntalloc_dealloc_gref, count)),
        ),
        ("GNTALLOC_FLAG_WRITABLE", GNTALLOC_FLAG_WRITABLE.into()),
        (
            "IOCTL_GNTALLOC_ALLOC_GREF",
            IOCTL_GNTALLOC_ALLOC_GREF.into(),
        ),
        (
            "IOCTL_GNTALLOC_DEALLOC_GREF",
            IOCTL_GNTALLOC_DEALLOC_GREF.into(),
        ),
        ("sizeof grant_entry_v1", z(gt::ENTRY_SIZE)),
        ("offsetof grant_entry_v1.domid", 2),
        ("offsetof grant_entry_v1.frame", 4),
        ("GTF_invalid", gt::GTF_INVALID.into()),
        ("GTF_permit_access", gt::GTF_PERMIT_ACCESS.into()),
        ("GTF_accept_transfer", gt::GTF_ACCEPT_TRANSFER.into()),
        ("GTF_transitive", gt::GTF_TRANSITIVE.into()),
        ("GTF_type_mask", gt::GTF_TYPE_MASK.into()),
        ("GTF_readonly", gt::GTF_READONLY.into()),
        ("GTF_reading", gt::GTF_READING.into()),
        ("GTF_writing", gt::GTF_WRITING.into()),
        ("GTF_PWT", gt::GTF_PWT.into()),
        ("GTF_PCD", gt::GTF_PCD.into()),
        ("GTF_PAT", gt::GTF_PAT.into()),
        ("GTF_sub_page", gt::GTF_SUB_PAGE.into()),
        ("GNTTAB_NR_RESERVED_ENTRIES", gt::NR_RESERVED_ENTRIES.into()),
        (
            "DOMID_FIRST_RESERVED",
            platform::DOMID_FIRST_RESERVED.into(),
        ),
        ("GNTST_okay", GrantStatus::OKAY.0.into()),
        ("GNTST_general_error", GrantStatus::GENERAL_ERROR.0.into()),
        ("GNTST_bad_domain", GrantStatus::BAD_DOMAIN.0.into()),
        ("GNTST_bad_gntref", GrantStatus::BAD_GNTREF.0.into()),
        ("GNTST_bad_handle", GrantStatus::BAD_HANDLE.0.into()),
        ("GNTST_bad_virt_addr", GrantStatus::BAD_VIRT_ADDR.0.into()),
        ("GNTST_bad_dev_addr", GrantStatus::BAD_DEV_ADDR.0.into()),
        (
            "GNTST_no_device_space",
            GrantStatus::NO_DEVICE_SPACE.0.into(),
        ),
        (
            "GNTST_permission_denied",
            GrantStatus::PERMISSION_DENIED.0.into(),
        ),
        ("GNTST_bad_page", GrantStatus::BAD_PAGE.0.into()),
        ("GNTST_bad_copy_arg", GrantStatus::BAD_COPY_ARG.0.into()),
        (
            "GNTST_address_too_big",
            GrantStatus::ADDRESS_TOO_BIG.0.into(),
        ),
        ("GNTST_eagain", GrantStatus::EAGAIN.0.into()),
        ("GNTST_no_space", GrantStatus::NO_SPACE.0.into()),
    ]
}

#[test]
fn rust_abi_matches_the_c_headers() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("abi.c");
    let exe = dir.path().join("abi");
    std::fs::write(&src, C_PROGRAM).unwrap();
    let out = Command::new("gcc")
        .args(["-std=gnu11", "-Wall", "-Werror", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("gcc must be installed to check the gntdev/evtchn ABI (apt-get install gcc)");
    assert!(
        out.status.success(),
        "compiling the ABI probe against /usr/include/xen failed (needs linux-libc-dev and libxen-dev):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&exe).output().unwrap();
    assert!(out.status.success());
    let c: HashMap<String, i64> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect();
    let rust = rust_values();
    assert_eq!(
        c.len(),
        rust.len(),
        "probe and Rust list disagree on what is checked"
    );
    let mismatches: Vec<String> = rust
        .iter()
        .filter(|(k, v)| c.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: rust {v} (0x{v:x}), C {:?}", c.get(*k)))
        .collect();
    assert!(
        mismatches.is_empty(),
        "ABI mismatches:\n{}",
        mismatches.join("\n")
    );
}
