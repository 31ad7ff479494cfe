//! In-process tests of the simulated hypervisor: a guest and the backend platform in one
//! process, through the same handshake another process would use.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::*;
use crate::grant_table::{GrantEntryV1, GTF_PERMIT_ACCESS, GTF_READING, GTF_READONLY, GTF_WRITING};
use crate::*;

const GUEST: DomId = 3;

fn setup(pages: u32) -> (SimPlatform, SimGuest, DomainHandle) {
    let platform = SimPlatform::new();
    let guest = SimGuest::new(
        GUEST,
        GuestConfig {
            pages,
            grant_entries: 64,
        },
    )
    .unwrap();
    let handle = platform.attach_local(&guest).unwrap();
    (platform, guest, handle)
}

fn grant_err(r: Result<GrantMapping, MapError>) -> (Option<usize>, GrantStatus) {
    let e = r.unwrap_err();
    (e.index(), e.status())
}

#[test]
fn attach_local_registers_the_domain() {
    let (platform, guest, handle) = setup(16);
    assert_eq!(handle.domid(), GUEST);
    assert_eq!(handle.nr_frames(), 16);
    assert_eq!(handle.nr_grant_entries(), 64);
    assert_eq!(platform.domains(), vec![GUEST]);
    assert_eq!(guest.backend_domid(), Some(0));
    assert!(handle.is_alive());
    // The same domid twice is refused; so is the backend's own.
    let again = SimGuest::new(GUEST, GuestConfig::default()).unwrap();
    assert!(platform.attach_local(&again).is_err());
    let own = SimGuest::new(0, GuestConfig::default()).unwrap();
    assert!(platform.attach_local(&own).is_err());
    assert_eq!(platform.domains(), vec![GUEST]);
}

#[test]
fn map_reports_xen_statuses_and_fails_the_whole_batch() {
    let (platform, guest, _h) = setup(16);
    let rw = guest.grant_access(0, 1, false).unwrap();
    let ro = guest.grant_access(0, 2, true).unwrap();
    let other = guest.grant_access(9, 3, false).unwrap();
    let oob = guest.grant_access(0, 16, false).unwrap();
    let never = 40;
    let m = |refs: &[GrantRef], a| grant_err(platform.map(GUEST, refs, a));
    assert_eq!(
        m(&[rw, never], Access::ReadOnly),
        (Some(1), GrantStatus::GENERAL_ERROR)
    );
    assert_eq!(
        m(&[rw, ro], Access::ReadWrite),
        (Some(1), GrantStatus::GENERAL_ERROR)
    );
    assert_eq!(
        m(&[other], Access::ReadOnly),
        (Some(0), GrantStatus::GENERAL_ERROR)
    );
    assert_eq!(
        m(&[rw, ro, oob], Access::ReadOnly),
        (Some(2), GrantStatus::BAD_PAGE)
    );
    assert_eq!(
        m(&[64], Access::ReadOnly),
        (Some(0), GrantStatus::BAD_GNTREF)
    );
    assert_eq!(
        grant_err(platform.map(77, &[rw], Access::ReadOnly)),
        (Some(0), GrantStatus::BAD_DOMAIN)
    );
    assert!(matches!(
        platform.map(GUEST, &[], Access::ReadOnly),
        Err(MapError::BadBatchSize { .. })
    ));
    // Failed batches leave nothing pinned or mapped.
    for g in [rw, ro] {
        assert_eq!(
            guest.grant_entry(g).unwrap().flags & (GTF_READING | GTF_WRITING),
            0
        );
    }
    assert_eq!(platform.live_mappings(), 0);
    // The good ones map.
    let a = platform.map(GUEST, &[rw, ro], Access::ReadOnly).unwrap();
    assert_eq!(a.pages(), 2);
    assert_eq!(platform.live_mappings(), 1);
    assert_eq!(platform.mapped_pages(), 2);
    drop(a);
    assert_eq!(platform.live_mappings(), 0);
    assert_eq!(platform.mapped_pages(), 0);
}

#[test]
fn mapping_is_zero_copy_and_contiguous() {
    let (platform, guest, _h) = setup(16);
    // Frames out of order and with a gap, to exercise the per-run mmap.
    let frames = [5u32, 6, 7, 2, 9];
    let refs: Vec<_> = frames
        .iter()
        .map(|&f| guest.grant_access(0, f, false).unwrap())
        .collect();
    for &f in &frames {
        guest.fill_page(f, f.to_le_bytes()[0]).unwrap();
    }
    let m = platform.map(GUEST, &refs, Access::ReadWrite).unwrap();
    for (i, &f) in frames.iter().enumerate() {
        let mut b = [0u8; 2];
        m.read(i * PAGE_SIZE + 100, &mut b).unwrap();
        assert_eq!(b, [f.to_le_bytes()[0]; 2], "page {i} holds frame {f}");
        assert_eq!(
            m.page_ptr(i).unwrap() as usize,
            m.as_ptr() as usize + i * PAGE_SIZE
        );
    }
    // Backend writes show up in guest memory at once, and the other way round.
    m.write(3 * PAGE_SIZE + 7, b"hello").unwrap();
    let mut b = [0u8; 5];
    guest.read_page(2, 7, &mut b).unwrap();
    assert_eq!(&b, b"hello");
    guest.write_page(9, 0, b"guest").unwrap();
    m.read(4 * PAGE_SIZE, &mut b).unwrap();
    assert_eq!(&b, b"guest");
    // A ring kept as SharedMemory still unmaps and unpins on drop.
    let shared = m.into_shared().unwrap();
    assert_eq!(
        shared
            .load_u32(3 * PAGE_SIZE + 8, std::sync::atomic::Ordering::Acquire)
            .unwrap(),
        u32::from_ne_bytes(*b"ello")
    );
    assert_eq!(platform.live_mappings(), 1);
    drop(shared);
    assert_eq!(platform.live_mappings(), 0);
    for &r in &refs {
        guest.end_access(r).unwrap();
    }
}

#[test]
fn guest_views_of_frames_alias_guest_memory_and_backend_maps() {
    let (platform, guest, _h) = setup(8);
    let view = guest.map_frames(2, 3).unwrap();
    assert_eq!(view.len(), 3 * PAGE_SIZE);
    view.write(PAGE_SIZE + 7, b"ring").unwrap();
    let mut back = [0u8; 4];
    guest.read_page(3, 7, &mut back).unwrap();
    assert_eq!(&back, b"ring", "the view is guest memory");
    // The backend's grant mapping of the same frame sees the same bytes, both ways.
    let g = guest.grant_access(0, 3, false).unwrap();
    let m = platform.map(GUEST, &[g], Access::ReadWrite).unwrap();
    m.read(7, &mut back).unwrap();
    assert_eq!(&back, b"ring");
    m.write(100, b"back").unwrap();
    view.read(PAGE_SIZE + 100, &mut back).unwrap();
    assert_eq!(&back, b"back");
    drop(m);
    guest.end_access(g).unwrap();
    // Out of range or empty: refused.
    assert!(matches!(
        guest.map_frames(6, 3),
        Err(GuestError::OutOfRange { .. })
    ));
    assert!(matches!(
        guest.map_frames(0, 0),
        Err(GuestError::OutOfRange { .. })
    ));
    assert!(matches!(
        guest.map_frames(u32::MAX, 2),
        Err(GuestError::OutOfRange { .. })
    ));
    // The view is a mapping of its own: it outlives the guest.
    drop(guest);
    view.read(PAGE_SIZE + 7, &mut back).unwrap();
    assert_eq!(&back, b"ring");
}

#[test]
fn read_only_mapping_is_really_read_only() {
    let (platform, guest, _h) = setup(4);
    let g = guest.grant_access(0, 1, true).unwrap();
    let m = platform.map(GUEST, &[g], Access::ReadOnly).unwrap();
    assert_eq!(m.write(0, b"x"), Err(crate::ReadOnlyMapping::ReadOnly));
    // The kernel agrees: the pages are mapped shared and without write permission.
    let start = format!("{:x}-", m.as_ptr() as usize);
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let line = maps
        .lines()
        .find(|l| l.starts_with(&start))
        .expect("mapping listed");
    assert_eq!(line.split_whitespace().nth(1), Some("r--s"), "{line}");
    let w = platform.map(GUEST, &[g], Access::ReadOnly).unwrap();
    drop((m, w));
    guest.end_access(g).unwrap();
}

#[test]
fn pins_are_counted_per_entry_and_end_access_sees_them() {
    let (platform, guest, _h) = setup(8);
    let g = guest.grant_access(0, 4, false).unwrap();
    let flags = |g| guest.grant_entry(g).unwrap().flags;
    let r1 = platform.map(GUEST, &[g], Access::ReadOnly).unwrap();
    assert_eq!(flags(g), GTF_PERMIT_ACCESS | GTF_READING);
    let w1 = platform.map(GUEST, &[g], Access::ReadWrite).unwrap();
    let w2 = platform.map(GUEST, &[g, g], Access::ReadWrite).unwrap();
    assert_eq!(flags(g), GTF_PERMIT_ACCESS | GTF_READING | GTF_WRITING);
    assert!(matches!(
        guest.end_access(g),
        Err(GuestError::EndAccess(
            grant_table::EndAccessError::StillInUse { .. }
        ))
    ));
    drop(w1);
    assert_eq!(flags(g) & GTF_WRITING, GTF_WRITING, "w2 still writes");
    drop(w2);
    assert_eq!(flags(g), GTF_PERMIT_ACCESS | GTF_READING);
    assert!(guest.end_access(g).is_err());
    drop(r1);
    assert_eq!(flags(g), GTF_PERMIT_ACCESS);
    assert_eq!(guest.end_access_failures(), 2);
    guest.end_access(g).unwrap();
    assert_eq!(flags(g), 0);
    assert!(matches!(
        guest.end_access(g),
        Err(GuestError::NotGranted(_))
    ));
    assert_eq!(
        grant_err(platform.map(GUEST, &[g], Access::ReadOnly)).1,
        GrantStatus::GENERAL_ERROR
    );
}

/// Number of VMAs (lines of /proc/self/maps) in this process.
fn process_vmas() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count()
}

#[test]
fn a_mapping_costs_one_vma_per_run_of_frames_and_the_limit_refuses_like_mmap() {
    let (platform, guest, _h) = setup(32);
    // Frames 0..4 consecutive, then 10, 12, 13: three runs.
    let refs: Vec<GrantRef> = [0u32, 1, 2, 3, 10, 12, 13]
        .iter()
        .map(|&f| guest.grant_access(0, f, false).unwrap())
        .collect();
    assert_eq!(platform.max_vmas(refs.len()), refs.len(), "worst case");
    let before = process_vmas();
    let m = platform.map(GUEST, &refs, Access::ReadWrite).unwrap();
    assert_eq!(m.vmas(), 3);
    assert_eq!(platform.live_vmas(), 3);
    // What the kernel sees (other threads of the test binary may map meanwhile, but
    // this test's own mappings are what moved).
    assert!(process_vmas() >= before + 3);
    let single = platform.map(GUEST, &refs[4..5], Access::ReadOnly).unwrap();
    assert_eq!(single.vmas(), 1);
    let each = platform
        .map_each(GUEST, &refs[..3], Access::ReadOnly)
        .unwrap();
    assert!(each.iter().all(|m| m.vmas() == 1));
    assert_eq!(platform.live_vmas(), 3 + 1 + 3);

    // A limit at what is held: the next map is refused before anything is mapped or
    // pinned, with ENOMEM as from mmap, and counted.
    platform.set_grant_vma_limit(Some(7));
    let spare = guest.grant_access(0, 20, false).unwrap();
    let e = platform
        .map(GUEST, &[spare, refs[0]], Access::ReadOnly)
        .unwrap_err();
    assert!(
        matches!(&e, MapError::AddressSpace { source, .. } if source.raw_os_error() == Some(libc::ENOMEM)),
        "{e}"
    );
    assert!(!e.grant_refused());
    assert!(platform
        .map_each(GUEST, &refs[..1], Access::ReadOnly)
        .is_err());
    assert_eq!(platform.vma_limit_refusals(), 2);
    assert_eq!(platform.live_vmas(), 7);
    assert_eq!(guest.grant_entry(spare).unwrap().flags & GTF_READING, 0);
    // Dropping gives the VMAs back: a batch of one run fits where it did not.
    drop(each);
    assert_eq!(platform.live_vmas(), 4);
    let contiguous = platform.map(GUEST, &refs[..4], Access::ReadOnly).unwrap();
    assert_eq!(contiguous.vmas(), 1);
    assert_eq!(platform.live_vmas(), 5);
    // Frames 10, 12, 13 are two runs: two VMAs, one more than the limit now leaves.
    platform.set_grant_vma_limit(Some(6));
    assert!(platform.map(GUEST, &refs[4..7], Access::ReadOnly).is_err());
    platform.set_grant_vma_limit(Some(7));
    assert_eq!(
        platform
            .map(GUEST, &refs[4..7], Access::ReadOnly)
            .unwrap()
            .vmas(),
        2
    );
    platform.set_grant_vma_limit(None);
    drop((m, single, contiguous));
    assert_eq!(platform.live_vmas(), 0);
    assert_eq!(platform.live_mappings(), 0);
}

#[test]
fn a_full_map_tracking_table_refuses_maps_like_xen() {
    let (platform, guest, _h) = setup(32);
    let refs: Vec<GrantRef> = (0..8)
        .map(|f| guest.grant_access(0, f, false).unwrap())
        .collect();
    platform.set_grant_page_limit(Some(6));
    // Four consecutive frames: one VMA, four pages.
    let m = platform.map(GUEST, &refs[..4], Access::ReadWrite).unwrap();
    assert_eq!((m.vmas(), platform.mapped_pages()), (1, 4));
    let e = platform
        .map(GUEST, &refs[4..7], Access::ReadOnly)
        .unwrap_err();
    assert_eq!(e.status(), GrantStatus::NO_DEVICE_SPACE);
    assert!(!e.grant_refused(), "a copy would do");
    assert!(platform
        .map_each(GUEST, &refs[4..7], Access::ReadOnly)
        .is_err());
    assert_eq!(platform.page_limit_refusals(), 2);
    assert_eq!(platform.mapped_pages(), 4, "the refused maps took nothing");
    assert_eq!(guest.grant_entry(refs[4]).unwrap().flags & GTF_READING, 0);
    let two = platform.map(GUEST, &refs[4..6], Access::ReadOnly).unwrap();
    drop(m);
    assert_eq!(platform.mapped_pages(), 2);
    platform.set_grant_page_limit(None);
    drop(two);
    assert_eq!((platform.mapped_pages(), platform.live_vmas()), (0, 0));
}

#[test]
fn runs_of_frames() {
    assert_eq!(vm::runs(&[]), 0);
    assert_eq!(vm::runs(&[5]), 1);
    assert_eq!(vm::runs(&[5, 6, 7]), 1);
    assert_eq!(vm::runs(&[5, 7, 9]), 3);
    assert_eq!(vm::runs(&[7, 6]), 2, "descending frames are not one mmap");
    assert_eq!(vm::runs(&[1, 2, 4, 5, 5]), 3);
    assert_eq!(vm::runs(&[u32::MAX, 0]), 2);
}

#[test]
fn map_each_maps_individually_and_is_all_or_nothing() {
    let (platform, guest, _h) = setup(8);
    let a = guest.grant_access(0, 1, false).unwrap();
    let b = guest.grant_access(0, 2, false).unwrap();
    let ms = platform
        .map_each(GUEST, &[a, b], Access::ReadWrite)
        .unwrap();
    assert_eq!(platform.live_mappings(), 2);
    let mut it = ms.into_iter();
    drop(it.next());
    // One persistent grant purged alone: a is free again, b still pinned.
    guest.end_access(a).unwrap();
    assert!(guest.end_access(b).is_err());
    drop(it);
    guest.end_access(b).unwrap();
    let c = guest.grant_access(0, 3, true).unwrap();
    let e = platform
        .map_each(GUEST, &[c, 50], Access::ReadOnly)
        .unwrap_err();
    assert_eq!(
        (e.index(), e.status()),
        (Some(1), GrantStatus::GENERAL_ERROR)
    );
    assert_eq!(platform.live_mappings(), 0);
    guest.end_access(c).unwrap();
}

#[test]
fn grant_copy_checks_like_xen_and_moves_bytes() {
    let (platform, guest, _h) = setup(8);
    guest.write_page(1, 100, b"from the guest").unwrap();
    let src = guest.grant_access(0, 1, true).unwrap();
    let dst = guest.grant_access(0, 2, false).unwrap();
    let other = guest.grant_access(5, 3, false).unwrap();
    let oob = guest.grant_access(0, 99, false).unwrap();
    let mut got = [0u8; 14];
    let mut junk = [0u8; 8];
    let mut junk2 = [0u8; 8];
    let mut junk3 = [0u8; 8];
    let mut long = [0u8; 200];
    let bounce = SharedMemory::anonymous(PAGE_SIZE).unwrap();
    bounce.write(10, b"bounced").unwrap();
    {
        let mut ops = [
            GrantCopyOp::from_guest(GUEST, src, 100, &mut got),
            GrantCopyOp::to_guest(GUEST, dst, 4000, b"to the guest"),
            GrantCopyOp::to_guest(GUEST, src, 0, b"nope"), // read-only grant
            GrantCopyOp::from_guest(GUEST, other, 0, &mut junk),
            GrantCopyOp::from_guest(GUEST, oob, 0, &mut junk2),
            GrantCopyOp::from_guest(GUEST, 63, 0, &mut junk3),
            GrantCopyOp::from_guest(GUEST, src, 4000, &mut long),
            GrantCopyOp::from_guest(42, src, 0, &mut []),
            GrantCopyOp::with_shared(CopyDirection::ToGuest, GUEST, dst, 10, &bounce, 10, 7)
                .unwrap(),
        ];
        platform.copy(&mut ops).unwrap();
        let st: Vec<_> = ops.iter().map(|o| o.status()).collect();
        assert_eq!(
            st,
            vec![
                GrantStatus::OKAY,
                GrantStatus::OKAY,
                GrantStatus::GENERAL_ERROR,
                GrantStatus::GENERAL_ERROR,
                GrantStatus::BAD_PAGE,
                GrantStatus::GENERAL_ERROR,
                GrantStatus::BAD_COPY_ARG,
                GrantStatus::BAD_DOMAIN,
                GrantStatus::OKAY,
            ]
        );
    }
    assert_eq!(&got, b"from the guest");
    let mut b = [0u8; 12];
    guest.read_page(2, 4000, &mut b).unwrap();
    assert_eq!(&b, b"to the guest");
    let mut b = [0u8; 7];
    guest.read_page(2, 10, &mut b).unwrap();
    assert_eq!(&b, b"bounced");
    // Copies pin only for their duration.
    for g in [src, dst] {
        assert_eq!(
            guest.grant_entry(g).unwrap().flags & (GTF_READING | GTF_WRITING),
            0
        );
        guest.end_access(g).unwrap();
    }
}

#[test]
fn copy_segments_check_like_xen_and_reuse_their_vector() {
    let (platform, guest, _h) = setup(8);
    guest.write_page(1, 100, b"from the guest").unwrap();
    let src = guest.grant_access(0, 1, true).unwrap();
    let dst = guest.grant_access(0, 2, false).unwrap();
    let other = guest.grant_access(5, 3, false).unwrap();
    let oob = guest.grant_access(0, 99, false).unwrap();
    let bounce = SharedMemory::anonymous(2 * PAGE_SIZE).unwrap();
    bounce.write(PAGE_SIZE + 10, b"bounced").unwrap();
    use CopyDirection::{FromGuest, ToGuest};
    let mut segs = vec![
        CopySegment::new(FromGuest, GUEST, src, 100, 14, 0),
        CopySegment::new(ToGuest, GUEST, dst, 10, 7, PAGE_SIZE + 10),
        CopySegment::new(ToGuest, GUEST, src, 0, 4, 0), // read-only grant
        CopySegment::new(FromGuest, GUEST, other, 0, 8, 0),
        CopySegment::new(FromGuest, GUEST, oob, 0, 8, 0),
        CopySegment::new(FromGuest, GUEST, 63, 0, 8, 0),
        CopySegment::new(FromGuest, GUEST, src, 4000, 200, 0), // crosses the page
        CopySegment::new(FromGuest, GUEST, src, 0, 8, 2 * PAGE_SIZE - 4), // local oob
        CopySegment::new(FromGuest, 42, src, 0, 8, 0),
    ];
    platform
        .copy_segments(CopyBuffer::Shared(&bounce), &mut segs)
        .unwrap();
    let st: Vec<_> = segs.iter().map(|s| s.status).collect();
    assert_eq!(
        st,
        vec![
            GrantStatus::OKAY,
            GrantStatus::OKAY,
            GrantStatus::GENERAL_ERROR,
            GrantStatus::GENERAL_ERROR,
            GrantStatus::BAD_PAGE,
            GrantStatus::GENERAL_ERROR,
            GrantStatus::BAD_COPY_ARG,
            GrantStatus::BAD_COPY_ARG,
            GrantStatus::BAD_DOMAIN,
        ]
    );
    let mut b = [0u8; 14];
    bounce.read(0, &mut b).unwrap();
    assert_eq!(&b, b"from the guest");
    let mut b = [0u8; 7];
    guest.read_page(2, 10, &mut b).unwrap();
    assert_eq!(&b, b"bounced");
    // The same vector, refilled, against private memory.
    let mut private = [0u8; 64];
    segs.clear();
    segs.push(CopySegment::new(FromGuest, GUEST, src, 100, 14, 50));
    segs.push(CopySegment::new(FromGuest, GUEST, src, 100, 14, 51)); // past the end
    platform
        .copy_segments(CopyBuffer::Private(&mut private), &mut segs)
        .unwrap();
    assert_eq!(segs[0].status, GrantStatus::OKAY);
    assert_eq!(segs[1].status, GrantStatus::BAD_COPY_ARG);
    assert_eq!(&private[50..], b"from the guest");
    // Copies pin only for their duration.
    for g in [src, dst] {
        assert_eq!(
            guest.grant_entry(g).unwrap().flags & (GTF_READING | GTF_WRITING),
            0
        );
        guest.end_access(g).unwrap();
    }
}

#[test]
fn hostile_raw_entries_are_refused() {
    let (platform, guest, _h) = setup(8);
    // Readonly flag with an otherwise valid entry; transfer type; garbage flags.
    guest
        .write_raw_entry(
            20,
            GrantEntryV1 {
                flags: GTF_PERMIT_ACCESS | GTF_READONLY,
                domid: 0,
                frame: 1,
            },
        )
        .unwrap();
    guest
        .write_raw_entry(
            21,
            GrantEntryV1 {
                flags: 2,
                domid: 0,
                frame: 1,
            },
        )
        .unwrap();
    guest
        .write_raw_entry(
            22,
            GrantEntryV1 {
                flags: 0xffff,
                domid: 0,
                frame: 1,
            },
        )
        .unwrap();
    guest
        .write_raw_entry(
            23,
            GrantEntryV1 {
                flags: GTF_PERMIT_ACCESS,
                domid: 0,
                frame: u32::MAX,
            },
        )
        .unwrap();
    assert_eq!(
        grant_err(platform.map(GUEST, &[20], Access::ReadWrite)).1,
        GrantStatus::GENERAL_ERROR
    );
    assert_eq!(
        grant_err(platform.map(GUEST, &[21], Access::ReadOnly)).1,
        GrantStatus::GENERAL_ERROR
    );
    assert_eq!(
        grant_err(platform.map(GUEST, &[22], Access::ReadOnly)).1,
        GrantStatus::GENERAL_ERROR
    );
    assert_eq!(
        grant_err(platform.map(GUEST, &[23], Access::ReadOnly)).1,
        GrantStatus::BAD_PAGE
    );
    assert!(platform.map(GUEST, &[20], Access::ReadOnly).is_ok());
    assert_eq!(platform.live_mappings(), 0);
}

#[test]
fn event_channels_wake_both_ways_and_rebind_after_drop() {
    let (platform, guest, _h) = setup(4);
    let gch = guest.alloc_event_channel(0).unwrap();
    let other = guest.alloc_event_channel(8).unwrap();
    assert!(matches!(guest.alloc_event_channel(0).map(|c| c.port()), Ok(p) if p != gch.port()));
    assert_eq!(platform.bound_event_channels(), 0);
    let ch = platform.bind_interdomain(GUEST, gch.port()).unwrap();
    assert_eq!(ch.remote(), (GUEST, gch.port()));
    assert_eq!(platform.bound_event_channels(), 1);
    assert!(matches!(
        platform.bind_interdomain(GUEST, gch.port()),
        Err(PlatformError::BadPort {
            reason: "port is already bound",
            ..
        })
    ));
    assert!(matches!(
        platform.bind_interdomain(GUEST, other.port()),
        Err(PlatformError::BadPort {
            reason: "port is offered to another domain",
            ..
        })
    ));
    // A port the guest never offered: "not yet" while it may still be on its way (a
    // reattaching guest re-offers its ports just after the welcome), then a bad port.
    assert!(matches!(
        platform.bind_interdomain(GUEST, 999),
        Err(PlatformError::PortNotYetOffered { port: 999, .. })
    ));
    std::thread::sleep(super::PORT_OFFER_GRACE);
    assert!(matches!(
        platform.bind_interdomain(GUEST, 999),
        Err(PlatformError::BadPort {
            reason: "no such unbound port",
            ..
        })
    ));
    assert!(matches!(
        platform.bind_interdomain(55, 1),
        Err(PlatformError::UnknownDomain(55))
    ));

    assert!(!ch.ack().unwrap());
    gch.notify().unwrap();
    gch.notify().unwrap();
    assert!(wire::wait_readable(ch.fd(), Duration::from_secs(1)));
    assert!(ch.ack().unwrap(), "coalesced notifications read once");
    assert!(!ch.ack().unwrap());
    assert!(!gch.wait(Duration::from_millis(10)).unwrap());
    ch.notify().unwrap();
    assert!(gch.wait(Duration::from_secs(1)).unwrap());
    assert!(!gch.try_ack().unwrap());

    drop(ch);
    assert_eq!(
        platform.bound_event_channels(),
        0,
        "a dropped channel is unbound"
    );
    let ch = platform.bind_interdomain(GUEST, gch.port()).unwrap();
    assert_eq!(platform.bound_event_channels(), 1);
    gch.notify().unwrap();
    assert!(ch.ack().unwrap());
    // A closed guest port can no longer be bound.
    let p = other.port();
    drop(other);
    assert!(platform.bind_interdomain(GUEST, p).is_err());
}

/// Borrows a raw fd owned by a value that outlives the borrow (test helper).
#[test]
fn alloc_event_channel_needs_a_backend() {
    let guest = SimGuest::new(4, GuestConfig::default()).unwrap();
    assert!(matches!(
        guest.alloc_event_channel(0),
        Err(GuestError::NotConnected)
    ));
}

#[test]
fn dropping_a_local_guest_is_noticed_and_detach_fails_maps() {
    let (platform, guest, handle) = setup(4);
    let g = guest.grant_access(0, 1, false).unwrap();
    guest.write_page(1, 0, b"still here").unwrap();
    let m = platform.map(GUEST, &[g], Access::ReadWrite).unwrap();
    assert!(!handle.wait_for_exit(Duration::from_millis(20)));
    drop(guest);
    assert!(handle.wait_for_exit(Duration::from_secs(1)));
    assert!(!handle.is_alive());
    // The memory outlives the guest's own handles: no fault, data intact.
    let mut b = [0u8; 10];
    m.read(0, &mut b).unwrap();
    assert_eq!(&b, b"still here");
    assert!(
        platform.map(GUEST, &[g], Access::ReadOnly).is_ok(),
        "maps work until detach"
    );
    platform.detach(GUEST).unwrap();
    assert_eq!(
        grant_err(platform.map(GUEST, &[g], Access::ReadOnly)).1,
        GrantStatus::BAD_DOMAIN
    );
    assert!(matches!(
        platform.detach(GUEST),
        Err(PlatformError::UnknownDomain(_))
    ));
    m.write(0, b"x").unwrap();
    drop(m);
    assert_eq!(platform.live_mappings(), 0);
}

#[test]
fn handshake_rejects_bad_guests() {
    let platform = SimPlatform::new();
    // Wrong message first.
    let (a, b) = UnixStream::pair().unwrap();
    wire::send(&a, wire::Msg::PortClose { port: 1 }, &[]).unwrap();
    assert!(matches!(
        platform.attach_stream(b),
        Err(PlatformError::Protocol(_))
    ));
    // Hello without descriptors.
    let (a, b) = UnixStream::pair().unwrap();
    let hello = wire::Msg::Hello {
        version: wire::VERSION,
        domid: 5,
        nr_frames: 4,
        nr_entries: 64,
    };
    wire::send(&a, hello, &[]).unwrap();
    assert!(matches!(
        platform.attach_stream(b),
        Err(PlatformError::Protocol(_))
    ));
    // Claimed sizes larger than the memfds: refused (would SIGBUS us later).
    let guest = SimGuest::new(
        5,
        GuestConfig {
            pages: 4,
            grant_entries: 64,
        },
    )
    .unwrap();
    let (a, b) = UnixStream::pair().unwrap();
    let big = wire::Msg::Hello {
        version: wire::VERSION,
        domid: 5,
        nr_frames: 400,
        nr_entries: 64,
    };
    wire::send(
        &a,
        big,
        &[
            guest.memory_fd_for_test(),
            guest.table_fd_for_test(),
            guest.liveness_fd_for_test(),
        ],
    )
    .unwrap();
    assert!(
        matches!(platform.attach_stream(b), Err(PlatformError::Protocol(m)) if m.contains("guest memory"))
    );
    // Unsealed memory: refused.
    let (a, b) = UnixStream::pair().unwrap();
    let unsealed = rustix::fs::memfd_create("unsealed", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&unsealed, 4 * PAGE_SIZE as u64).unwrap();
    wire::send(
        &a,
        hello,
        &[
            unsealed.as_fd(),
            guest.table_fd_for_test(),
            guest.liveness_fd_for_test(),
        ],
    )
    .unwrap();
    assert!(
        matches!(platform.attach_stream(b), Err(PlatformError::Protocol(m)) if m.contains("seal"))
    );
    // Peer gone before hello.
    let (a, b) = UnixStream::pair().unwrap();
    drop(a);
    assert!(platform.attach_stream(b).is_err());
    assert!(platform.domains().is_empty());
}

#[test]
fn xenstore_endpoint_is_configurable() {
    let platform = SimPlatform::new();
    assert!(matches!(
        platform.xenstore_endpoint(),
        Err(PlatformError::NoXenstore { .. })
    ));
    platform.set_xenstore_socket("/tmp/xs.sock");
    assert_eq!(
        platform.xenstore_endpoint().unwrap(),
        XenstoreEndpoint::UnixSocket("/tmp/xs.sock".into())
    );
    assert_eq!(platform.name(), "sim");
}

#[test]
fn concurrent_maps_from_reactor_threads_balance() {
    let (platform, guest, _h) = setup(32);
    let refs: Vec<_> = (0..32)
        .map(|f| guest.grant_access(0, f, f % 2 == 0).unwrap())
        .collect();
    std::thread::scope(|s| {
        for t in 0..4 {
            let platform = &platform;
            let refs = &refs;
            s.spawn(move || {
                for i in 0..300 {
                    let g = refs[(i * 7 + t) % 32];
                    let m = platform
                        .map(GUEST, &[g, refs[(i + t) % 32]], Access::ReadOnly)
                        .unwrap();
                    let mut b = [0u8; 1];
                    m.read(PAGE_SIZE, &mut b).unwrap();
                }
            });
        }
    });
    assert_eq!(platform.live_mappings(), 0);
    for &r in &refs {
        guest.end_access(r).unwrap();
    }
}

#[test]
fn revocation_races_maps_faithfully() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (platform, guest, _h) = setup(4);
    let stop = AtomicBool::new(false);
    let current = std::sync::Mutex::new(None::<GrantRef>);
    std::thread::scope(|s| {
        // Guest: grant, then revoke as soon as the backend lets go, over and over.
        s.spawn(|| {
            for _ in 0..500 {
                let g = guest.grant_access(0, 1, false).unwrap();
                *current.lock().unwrap() = Some(g);
                while guest.end_access(g).is_err() {
                    std::thread::yield_now();
                }
                // Revoked: from here on no map of it may succeed.
                let flags = guest.grant_entry(g).unwrap().flags;
                assert_eq!(flags, 0);
            }
            stop.store(true, Ordering::Relaxed);
        });
        // Backend: map whatever is current; a successful map must see the entry pinned.
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let Some(g) = *current.lock().unwrap() else {
                    continue;
                };
                if let Ok(m) = platform.map(GUEST, &[g], Access::ReadWrite) {
                    let f = guest.grant_entry(g).unwrap().flags;
                    assert_eq!(f & (GTF_READING | GTF_WRITING), GTF_READING | GTF_WRITING);
                    drop(m);
                }
            }
        });
    });
    assert_eq!(platform.live_mappings(), 0);
}
