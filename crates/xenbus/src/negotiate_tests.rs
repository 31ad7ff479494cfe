//! Tests of the negotiation functions.
use super::*;
use crate::memstore::MemStore;
use crate::parse::DiskFormat;

const BE: &str = "/local/domain/0/backend/vbd/5/51712";
const FE: &str = "/local/domain/5/device/vbd/51712";

fn settings() -> DeviceSettings {
    DeviceSettings {
        max_queues: 4,
        max_ring_page_order: 2,
        ..DeviceSettings::default()
    }
}

fn store_with(nodes: &[(&str, &str)]) -> MemStore {
    let s = MemStore::new();
    for (k, v) in nodes {
        s.write(k, v.as_bytes()).unwrap();
    }
    s
}

fn backend_store() -> MemStore {
    store_with(&[
        (&join(BE, "frontend"), FE),
        (&join(BE, "frontend-id"), "5"),
        (&join(BE, "params"), "aio:/images/disk.img"),
        (&join(BE, "mode"), "w"),
        (&join(BE, "online"), "1"),
        (&join(BE, "state"), "1"),
        (&join(BE, "device-type"), "disk"),
        (&join(BE, "removable"), "0"),
        (&join(BE, "dev"), "xvda"),
    ])
}

#[test]
fn backend_nodes() {
    let s = backend_store();
    let n = read_backend(&s, BE).unwrap().unwrap();
    assert_eq!(n.frontend, FE);
    assert_eq!(n.frontend_id, 5);
    assert!(!n.read_only && !n.cdrom && !n.removable && n.discard_enable && !n.direct_io_safe);
    assert_eq!(n.online, Some(true));
    assert_eq!(n.state, Some(XenbusState::Initialising));
    assert!(!n.hotplug_done());
    let t = n.target(BE).unwrap();
    assert_eq!(
        (t.format, t.path.to_str().unwrap()),
        (DiskFormat::Raw, "/images/disk.img")
    );

    s.write(&join(BE, "physical-device"), b"fd:3").unwrap();
    s.write(&join(BE, "physical-device-path"), b"/dev/loop3")
        .unwrap();
    s.write(&join(BE, "mode"), b"r").unwrap();
    s.write(&join(BE, "discard-enable"), b"0").unwrap();
    s.write(&join(BE, "removable"), b"maybe").unwrap();
    let n = read_backend(&s, BE).unwrap().unwrap();
    assert!(n.hotplug_done() && n.read_only && !n.discard_enable && !n.removable);
    assert_eq!(n.ignored.len(), 1);
    assert_eq!(n.ignored[0].path, join(BE, "removable"));
    assert_eq!(n.physical_device, Some((0xfd, 3)));
    assert_eq!(n.target(BE).unwrap().path.to_str().unwrap(), "/dev/loop3");
    // Only a device number: its /dev/block node (blkback opens by number too).
    s.rm(&join(BE, "physical-device-path")).unwrap();
    let n = read_backend(&s, BE).unwrap().unwrap();
    assert_eq!(
        n.target(BE).unwrap().path.to_str().unwrap(),
        "/dev/block/253:3"
    );
}

#[test]
fn rbd_targets_come_from_params_or_the_script() {
    let s = backend_store();
    s.write(&join(BE, "params"), b"aio:rbd:rbd/vm5:id=xen")
        .unwrap();
    let t = read_backend(&s, BE).unwrap().unwrap().target(BE).unwrap();
    assert_eq!(
        (t.format, t.path.to_str().unwrap()),
        (DiskFormat::Rbd, "rbd:rbd/vm5:id=xen")
    );
    s.write(
        &join(BE, "physical-device-path"),
        b"rbd:rbd/vm5:id=xen:conf=/etc/ceph/ceph.conf",
    )
    .unwrap();
    let n = read_backend(&s, BE).unwrap().unwrap();
    assert!(n.hotplug_done());
    assert_eq!(
        n.target(BE).unwrap().path.to_str().unwrap(),
        "rbd:rbd/vm5:id=xen:conf=/etc/ceph/ceph.conf"
    );
    // Neither a path nor an NBD URI replaces an image.
    for other in [&b"/dev/rbd0"[..], b"nbd://h/e"] {
        s.write(&join(BE, "physical-device-path"), other).unwrap();
        let t = read_backend(&s, BE).unwrap().unwrap().target(BE).unwrap();
        assert_eq!(
            (t.format, t.path.to_str().unwrap()),
            (DiskFormat::Rbd, "rbd:rbd/vm5:id=xen")
        );
    }
}

#[test]
fn null_targets_come_from_params_or_the_script() {
    let s = backend_store();
    s.write(&join(BE, "params"), b"null:1G").unwrap();
    let t = read_backend(&s, BE).unwrap().unwrap().target(BE).unwrap();
    assert_eq!(
        (t.format, t.path.to_str().unwrap()),
        (DiskFormat::Null, "null:1G")
    );
    // The hotplug script passes it on; a path or device number never replaces it.
    s.write(&join(BE, "physical-device-path"), b"null:1G")
        .unwrap();
    s.write(&join(BE, "physical-device"), b"fd:3").unwrap();
    let n = read_backend(&s, BE).unwrap().unwrap();
    assert!(n.hotplug_done());
    assert_eq!(n.target(BE).unwrap().path.to_str().unwrap(), "null:1G");
    s.write(&join(BE, "physical-device-path"), b"/dev/loop3")
        .unwrap();
    let t = read_backend(&s, BE).unwrap().unwrap().target(BE).unwrap();
    assert_eq!(
        (t.format, t.path.to_str().unwrap()),
        (DiskFormat::Null, "null:1G")
    );
}

#[test]
fn nbd_targets_come_from_a_uri() {
    let s = backend_store();
    s.write(&join(BE, "params"), b"nbd://store.example:10810/vm5")
        .unwrap();
    let t = read_backend(&s, BE).unwrap().unwrap().target(BE).unwrap();
    assert_eq!(
        (t.format, t.path.to_str().unwrap()),
        (DiskFormat::Nbd, "nbd://store.example:10810/vm5")
    );
    // The hotplug script passed it on, resolved: that one is used.
    s.write(
        &join(BE, "physical-device-path"),
        b"nbd://192.0.2.7:10810/vm5",
    )
    .unwrap();
    s.write(&join(BE, "physical-device"), b"fd:3").unwrap();
    let n = read_backend(&s, BE).unwrap().unwrap();
    assert!(n.hotplug_done());
    assert_eq!(
        n.target(BE).unwrap().path.to_str().unwrap(),
        "nbd://192.0.2.7:10810/vm5"
    );
    // A path or device number never replaces an export.
    s.write(&join(BE, "physical-device-path"), b"/dev/loop3")
        .unwrap();
    let t = read_backend(&s, BE).unwrap().unwrap().target(BE).unwrap();
    assert_eq!(
        (t.format, t.path.to_str().unwrap()),
        (DiskFormat::Nbd, "nbd://store.example:10810/vm5")
    );
}

#[test]
fn backend_nodes_refused() {
    let s = backend_store();
    s.write(&join(BE, "frontend"), b"/local/domain/6/device/vbd/51712")
        .unwrap();
    assert!(matches!(
        read_backend(&s, BE),
        Err(DeviceError::Negotiation(NegotiationError::Backend(_)))
    ));
    let s = backend_store();
    s.rm(&join(BE, "mode")).unwrap();
    assert!(matches!(
        read_backend(&s, BE),
        Err(DeviceError::Negotiation(NegotiationError::Missing { .. }))
    ));
    let s = backend_store();
    s.write(&join(BE, "physical-device"), b"zz").unwrap();
    assert!(read_backend(&s, BE).is_err());
    let s = backend_store();
    s.rm(&join(BE, "frontend-id")).unwrap();
    assert_eq!(read_backend(&s, BE).unwrap(), None);
    let s = backend_store();
    s.write(&join(BE, "params"), b"vhd:/x").unwrap();
    assert!(read_backend(&s, BE).unwrap().unwrap().target(BE).is_err());
}

#[test]
fn initwait_publishes_limits_atomically() {
    let s = backend_store();
    assert!(publish_initwait(&s, BE, &settings()).unwrap());
    let get = |n: &str| s.read_string(&join(BE, n)).unwrap();
    assert_eq!(get("state").as_deref(), Some("2"));
    assert_eq!(get("multi-queue-max-queues").as_deref(), Some("4"));
    assert_eq!(get("max-ring-page-order").as_deref(), Some("2"));
    assert_eq!(get("max-ring-pages").as_deref(), Some("4"));
    assert_eq!(get("feature-max-indirect-segments").as_deref(), Some("256"));
    let no_indirect = DeviceSettings {
        max_indirect_segments: 0,
        ..settings()
    };
    publish_initwait(&s, BE, &no_indirect).unwrap();
    assert_eq!(get("feature-max-indirect-segments"), None);
    // A removed device is not resurrected.
    s.rm(BE).unwrap();
    assert!(!publish_initwait(&s, BE, &settings()).unwrap());
    assert!(s.dump(BE).is_empty());
}

fn fe_store(nodes: &[(&str, &str)]) -> MemStore {
    let owned: Vec<(String, &str)> = nodes.iter().map(|(k, v)| (join(FE, k), *v)).collect();
    let refs: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    store_with(&refs)
}

#[test]
fn frontend_single_page_legacy() {
    let s = fe_store(&[("ring-ref", "8"), ("event-channel", "5")]);
    let p = read_frontend(&s, FE, &settings()).unwrap();
    assert_eq!(p.protocol, Protocol::Native);
    assert!(!p.protocol_specified && !p.persistent && !p.large_sector_size);
    assert_eq!(p.ring_page_order, 0);
    assert_eq!(
        p.queues,
        vec![RingParams {
            ring_refs: vec![8],
            event_channel: 5
        }]
    );
}

#[test]
fn frontend_multi_page_multi_queue() {
    let s = fe_store(&[
        ("protocol", "x86_32-abi"),
        ("feature-persistent", "1"),
        ("multi-queue-num-queues", "2"),
        ("ring-page-order", "1"),
        ("queue-0/ring-ref0", "10"),
        ("queue-0/ring-ref1", "11"),
        ("queue-0/event-channel", "7"),
        ("queue-1/ring-ref0", "12"),
        ("queue-1/ring-ref1", "13"),
        ("queue-1/event-channel", "8"),
    ]);
    let p = read_frontend(&s, FE, &settings()).unwrap();
    assert_eq!(p.protocol, Protocol::X86_32);
    assert!(p.persistent && p.frontend_persistent);
    assert_eq!(p.ring_page_order, 1);
    assert_eq!(p.queues.len(), 2);
    assert_eq!(p.queues[1].ring_refs, vec![12, 13]);
    assert_eq!(p.queues[1].event_channel, 8);
    // Persistent grants need both sides.
    let off = DeviceSettings {
        persistent_grants: false,
        ..settings()
    };
    let p = read_frontend(&s, FE, &off).unwrap();
    assert!(!p.persistent && p.frontend_persistent);
}

#[test]
fn frontend_order_zero_and_legacy_pages() {
    let s = fe_store(&[
        ("ring-page-order", "0"),
        ("ring-ref", "9"),
        ("event-channel", "3"),
    ]);
    assert_eq!(
        read_frontend(&s, FE, &settings()).unwrap().queues[0].ring_refs,
        vec![9]
    );
    let s = fe_store(&[
        ("num-ring-pages", "2"),
        ("ring-ref0", "20"),
        ("ring-ref1", "21"),
        ("event-channel", "3"),
        ("protocol", "x86_64-abi"),
    ]);
    let p = read_frontend(&s, FE, &settings()).unwrap();
    // The host's own name is native, as in Linux blkback's `connect_ring`.
    let want = if cfg!(target_arch = "x86_64") {
        Protocol::Native
    } else {
        Protocol::X86_64
    };
    assert_eq!((p.ring_page_order, p.protocol), (1, want));
    assert_eq!(p.queues[0].ring_refs, vec![20, 21]);
    // A single explicit queue uses the top-level keys.
    let s = fe_store(&[
        ("multi-queue-num-queues", "1"),
        ("ring-ref", "9"),
        ("event-channel", "3"),
    ]);
    assert_eq!(read_frontend(&s, FE, &settings()).unwrap().queues.len(), 1);
}

#[test]
fn frontend_fatal_cases() {
    let neg = |nodes: &[(&str, &str)]| match read_frontend(&fe_store(nodes), FE, &settings()) {
        Err(DeviceError::Negotiation(e)) => e,
        other => panic!("{nodes:?}: {other:?}"),
    };
    let ok = [("ring-ref", "8"), ("event-channel", "5")];
    let with = |extra: (&'static str, &'static str)| {
        let mut v = ok.to_vec();
        v.retain(|(k, _)| *k != extra.0);
        v.push(extra);
        v
    };
    assert!(matches!(
        neg(&with(("protocol", "sparc-abi"))),
        NegotiationError::UnknownProtocol(_)
    ));
    assert!(matches!(
        neg(&with(("multi-queue-num-queues", "0"))),
        NegotiationError::BadQueueCount { requested: 0, .. }
    ));
    assert!(matches!(
        neg(&with(("multi-queue-num-queues", "5"))),
        NegotiationError::BadQueueCount {
            requested: 5,
            max: 4
        }
    ));
    assert!(matches!(
        neg(&with(("multi-queue-num-queues", "99999999999999999999999"))),
        NegotiationError::Invalid { .. }
    ));
    assert!(matches!(
        neg(&with(("ring-page-order", "3"))),
        NegotiationError::RingOrderTooLarge {
            requested: 3,
            max: 2
        }
    ));
    assert!(matches!(
        neg(&with(("num-ring-pages", "3"))),
        NegotiationError::RingPagesNotPowerOfTwo(3)
    ));
    assert!(matches!(
        neg(&with(("num-ring-pages", "8"))),
        NegotiationError::RingOrderTooLarge { requested: 3, .. }
    ));
    assert!(matches!(
        neg(&with(("ring-ref", "-1"))),
        NegotiationError::Invalid { .. }
    ));
    assert!(matches!(
        neg(&with(("ring-ref", "4294967296"))),
        NegotiationError::Invalid { .. }
    ));
    assert!(matches!(
        neg(&with(("event-channel", "0"))),
        NegotiationError::Invalid { .. }
    ));
    assert!(matches!(
        neg(&[("event-channel", "5")]),
        NegotiationError::Missing { .. }
    ));
    assert!(matches!(
        neg(&[("ring-ref", "5")]),
        NegotiationError::Missing { .. }
    ));
    // Multi-page ring with a missing page.
    assert!(matches!(
        neg(&[
            ("ring-page-order", "1"),
            ("ring-ref0", "1"),
            ("event-channel", "5")
        ]),
        NegotiationError::Missing { .. }
    ));
    // Two queues but only one described.
    assert!(matches!(
        neg(&[
            ("multi-queue-num-queues", "2"),
            ("queue-0/ring-ref", "1"),
            ("queue-0/event-channel", "5")
        ]),
        NegotiationError::Missing { .. }
    ));
    // Garbage in an optional flag is not fatal.
    let s = fe_store(&[
        ("ring-ref", "8"),
        ("event-channel", "5"),
        ("feature-persistent", "yes"),
    ]);
    let p = read_frontend(&s, FE, &settings()).unwrap();
    assert!(!p.frontend_persistent);
    // Noted for the caller to report (rate-limited), not logged here.
    assert_eq!(
        p.ignored_flags,
        vec![IgnoredValue {
            path: join(FE, "feature-persistent"),
            value: "yes".into()
        }]
    );
}

fn config() -> DeviceConfig {
    DeviceConfig {
        backend_type: "vbd".into(),
        frontend_id: 5,
        devid: 51712,
        backend_path: BE.into(),
        frontend_path: FE.into(),
        target: DiskTarget {
            format: DiskFormat::Raw,
            path: "/x".into(),
        },
        physical_device: None,
        read_only: false,
        cdrom: false,
        removable: false,
        direct_io_safe: false,
        discard_enable: true,
        settings: settings(),
    }
}

fn info() -> StorageInfo {
    StorageInfo {
        size_bytes: 1 << 30,
        logical_block_size: 512,
        physical_block_size: 4096,
        read_only: false,
        flush: true,
        discard: true,
        secure_discard: false,
        discard_granularity: 4096,
        discard_alignment: 0,
        buffer_alignment: 1,
        direct_io: false,
        kind: storage::StorageKind::File,
    }
}

#[test]
fn features_follow_storage_toolstack_and_operator() {
    let f = backend_features(&config(), &info(), false);
    assert!(f.flush && f.barrier && f.discard && !f.secure_discard && f.persistent);
    assert_eq!(
        (f.sectors, f.sector_size, f.physical_sector_size, f.info),
        (2 << 20, 512, 4096, 0)
    );
    let mut c = config();
    c.discard_enable = false;
    assert!(!backend_features(&c, &info(), false).discard);
    let mut c = config();
    c.settings.discard = false;
    c.settings.persistent_grants = false;
    let f = backend_features(&c, &info(), false);
    assert!(!f.discard && !f.persistent);
    let mut c = config();
    c.read_only = true;
    c.cdrom = true;
    c.removable = true;
    let f = backend_features(&c, &info(), false);
    assert!(f.read_only && !f.discard);
    assert_eq!(f.info, VDISK_CDROM | VDISK_REMOVABLE | VDISK_READONLY);
    let i = StorageInfo {
        logical_block_size: 4096,
        discard_granularity: 0,
        ..info()
    };
    let f = backend_features(&config(), &i, true);
    assert_eq!(
        (f.sectors, f.sector_size, f.discard_granularity),
        (1 << 18, 4096, 4096)
    );
    assert_eq!(backend_features(&config(), &i, false).sectors, 2 << 20);
}

#[test]
fn connect_resize_and_fatal_publishing() {
    let s = backend_store();
    let f = backend_features(&config(), &info(), false);
    s.write(&join(BE, "error"), b"old").unwrap();
    assert!(publish_connected(&s, BE, &f).unwrap());
    let get = |n: &str| s.read_string(&join(BE, n)).unwrap();
    assert_eq!(get("state").as_deref(), Some("4"));
    assert_eq!(get("sectors").as_deref(), Some("2097152"));
    assert_eq!(get("feature-flush-cache").as_deref(), Some("1"));
    assert_eq!(get("feature-barrier").as_deref(), Some("1"));
    assert_eq!(get("feature-discard").as_deref(), Some("1"));
    assert_eq!(get("discard-granularity").as_deref(), Some("4096"));
    assert_eq!(get("discard-alignment").as_deref(), Some("0"));
    assert_eq!(get("discard-secure").as_deref(), Some("0"));
    assert_eq!(get("feature-persistent").as_deref(), Some("1"));
    assert_eq!(get("info").as_deref(), Some("0"));
    assert_eq!(get("sector-size").as_deref(), Some("512"));
    assert_eq!(get("physical-sector-size").as_deref(), Some("4096"));
    assert_eq!(get("error"), None);

    s.force_conflicts(3);
    let commits = s.commits();
    assert!(publish_resize(&s, BE, 12345).unwrap());
    assert_eq!(s.commits(), commits + 1);
    assert_eq!(get("sectors").as_deref(), Some("12345"));
    assert_eq!(get("state").as_deref(), Some("4"));

    publish_fatal(&s, BE, 22, "requested ring page order 9 exceed max:4").unwrap();
    assert_eq!(get("state").as_deref(), Some("5"));
    assert_eq!(
        get("error").as_deref(),
        Some("22 requested ring page order 9 exceed max:4")
    );
    assert_eq!(
        s.read_string("/local/domain/0/error/backend/vbd/5/51712/error")
            .unwrap()
            .as_deref(),
        Some("22 requested ring page order 9 exceed max:4")
    );

    s.rm(BE).unwrap();
    assert!(!publish_connected(&s, BE, &f).unwrap());
    assert!(!publish_resize(&s, BE, 1).unwrap());
    publish_fatal(&s, BE, 22, "x").unwrap();
    assert!(s.dump(BE).is_empty());
    assert!(!write_state(&s, BE, XenbusState::Closed).unwrap());
}

#[test]
fn protocol_default_is_native() {
    assert_eq!(parse_protocol(None).unwrap(), (Protocol::Native, false));
    assert_eq!(
        parse_protocol(Some(b"")).unwrap(),
        (Protocol::Native, false)
    );
    assert_eq!(
        parse_protocol(Some(b"x86_32-abi\0")).unwrap(),
        (Protocol::X86_32, true)
    );
    assert!(parse_protocol(Some(b"X86_64-ABI")).is_err());
}
