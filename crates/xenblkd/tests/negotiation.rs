//! Multi-process: xenstored, `xenblkd serve` and simulated guests each in their own
//! process; the test plays the toolstack. Guests connect over xenstore and do verified
//! I/O for combinations of features offered or not by each side, every ring ABI, the
//! legacy single `ring-ref`, a missing `protocol`, libxl's `vbd` route with its hotplug
//! handshake; fatal negotiation cases close only their own device.

mod common;

use std::fs;

use common::{connect_facts, disk, guest_store, node_u64, Host};
use xenbus::store::{join, StoreExt};
use xenbus::toolstack::Removal;
use xenbus::XenbusState;

/// Every ABI and feature combination against a backend offering everything.
#[test]
fn feature_and_protocol_matrix_full_backend() {
    let host = Host::start(&["--max-queues", "4", "--max-ring-page-order", "2"]);
    let release = host.dir.path().join("release");
    let hold = format!("wait-file:{}", release.display());
    // (domid, guest flags, expected negotiation)
    let cases: &[(u32, &[&str], &str)] = &[
        (
            1,
            &[
                "--protocol",
                "x86-64",
                "--max-queues",
                "2",
                "--max-ring-order",
                "2",
                "--persistent",
                "true",
            ],
            "queues=2 order=2 persistent=1 indirect=32",
        ),
        (
            2,
            &[
                "--protocol",
                "x86-32",
                "--max-ring-order",
                "0",
                "--persistent",
                "false",
                "--max-indirect-segments",
                "0",
            ],
            "queues=1 order=0 persistent=0 indirect=0",
        ),
        (
            3,
            &["--protocol", "none", "--max-ring-order", "1"],
            "queues=1 order=1 persistent=1 indirect=32",
        ),
        (
            4,
            &["--protocol", "native", "--barrier", "--max-queues", "3"],
            "queues=3 order=0 persistent=1 indirect=32",
        ),
    ];
    let mut guests = Vec::new();
    for (domid, flags, _) in cases {
        host.create_domain(*domid);
        let spec = disk("xenblkd", *domid, 51712, &img_for(&host, *domid));
        assert_eq!(host.attach(&spec), XenbusState::InitWait);
        let script = format!("connect,io:24,flush,discard,{hold},io:8,close");
        guests.push((spec, host.guest(*domid, 51712, flags, &script)));
    }
    for ((spec, guest), (domid, _, expect)) in guests.iter_mut().zip(cases) {
        let line = guest.expect("ok connect");
        let facts = connect_facts(line.trim_start_matches("ok connect"));
        for kv in expect.split_whitespace() {
            let (k, v) = kv.split_once('=').unwrap();
            assert_eq!(
                facts.get(k).map(String::as_str),
                Some(v),
                "d{domid} {k}: {line}"
            );
        }
        guest.expect("ok discard");
        let be = spec.backend_path();
        let fe = spec.frontend_path();
        assert_eq!(host.state(&be), XenbusState::Connected);
        // What the backend published.
        assert_eq!(
            host.read(&join(&be, "feature-flush-cache")).as_deref(),
            Some("1")
        );
        assert_eq!(
            host.read(&join(&be, "feature-barrier")).as_deref(),
            Some("1")
        );
        assert_eq!(
            host.read(&join(&be, "feature-discard")).as_deref(),
            Some("1")
        );
        assert_eq!(
            host.read(&join(&be, "feature-persistent")).as_deref(),
            Some("1")
        );
        assert_eq!(node_u64(&host, &be, "sectors"), Some(64 << 11));
        assert_eq!(node_u64(&host, &be, "sector-size"), Some(512));
        // The ring layout the frontend chose.
        match domid {
            2 => {
                assert!(
                    host.read(&join(&fe, "ring-ref")).is_some(),
                    "legacy single ring-ref"
                );
                assert!(host.read(&join(&fe, "ring-ref0")).is_none());
                assert_eq!(
                    host.read(&join(&fe, "protocol")).as_deref(),
                    Some("x86_32-abi")
                );
            }
            3 => assert!(
                host.read(&join(&fe, "protocol")).is_none(),
                "no protocol node"
            ),
            _ => {}
        }
        let st = host.device_status("xenblkd", *domid, 51712).unwrap();
        let fe = st.frontend.as_ref().expect("connected");
        let protocol = format!("{:?}", fe.protocol);
        let protocol = protocol.as_str();
        let want = match domid {
            // The host's own name is native, as in Linux blkback's `connect_ring`.
            1 if cfg!(target_arch = "x86_64") => "Native",
            1 => "X86_64",
            2 => "X86_32",
            // Missing protocol means native (blkif.h's default).
            3 => "Native",
            _ => protocol,
        };
        assert_eq!(protocol, want, "d{domid}");
        assert_eq!(fe.protocol_specified, *domid != 3);
        assert!(st.stats["wr_req"] >= 24, "{st:?}");
        assert!(st.stats["ds_req"] >= 1, "{st:?}");
        assert!(st.stats["f_req"] >= 1, "{st:?}");
        // Requests grant-copied because their guest's share of the mapping budget was
        // spent: reported per device, none here.
        assert_eq!(st.stats.get("map_fallbacks"), Some(&0), "{st:?}");
    }
    // `xenblkd status`, as an operator reads it, while everything is connected.
    let text = host.status_text();
    println!("{text}");
    assert!(text.contains("map_fallbacks 0"), "{text}");
    // One share of the grant-mapping budget per guest domain.
    assert!(
        text.contains(&format!("grant_map_guests {}", cases.len())),
        "{text}"
    );
    assert!(
        text.contains("xenblkd/2/51712 (xvda): backend Connected, frontend Connected"),
        "{text}"
    );
    assert!(
        text.contains("protocol X86_32, 1 queue(s), ring-page-order 0, persistent grants no"),
        "{text}"
    );
    assert!(text.contains("protocol Native (not specified)"), "{text}");
    assert!(
        text.contains("2 queue(s), ring-page-order 2, persistent grants yes"),
        "{text}"
    );
    assert!(
        text.contains("advertised: flush-cache barrier persistent discard(granularity"),
        "{text}"
    );
    assert!(text.contains("stats: ds_req"), "{text}");
    fs::write(&release, b"").unwrap();
    for (spec, guest) in guests {
        let seen = guest.finish();
        assert!(
            seen.iter().any(|l| l.starts_with("ok close grants_ended=")),
            "{seen:?}"
        );
        assert_eq!(host.state(&spec.backend_path()), XenbusState::Closed);
        assert_eq!(host.detach(&spec), Removal::Clean);
    }
    assert_eq!(host.metric("grant_mappings"), 0);
}

fn img_for(host: &Host, domid: u32) -> std::path::PathBuf {
    host.image(&format!("d{domid}.img"), 64)
}

/// A backend offering little: the frontend's wishes are capped, I/O still verified.
#[test]
fn feature_matrix_minimal_backend() {
    let host = Host::start(&[
        "--max-queues",
        "1",
        "--max-ring-page-order",
        "0",
        "--max-indirect-segments",
        "0",
        "--persistent-grants",
        "false",
        "--grant-mode",
        "copy",
    ]);
    host.create_domain(7);
    let spec = disk("xenblkd", 7, 51728, &host.image("m.img", 32));
    host.attach(&spec);
    let be = spec.backend_path();
    assert_eq!(node_u64(&host, &be, "multi-queue-max-queues"), Some(1));
    assert_eq!(node_u64(&host, &be, "max-ring-page-order"), Some(0));
    assert_eq!(host.read(&join(&be, "feature-max-indirect-segments")), None);
    let mut g = host.guest(
        7,
        51728,
        &[
            "--max-queues",
            "4",
            "--max-ring-order",
            "3",
            "--persistent",
            "true",
            "--max-indirect-segments",
            "64",
        ],
        "connect,io:32,flush,discard,close",
    );
    let line = g.expect("ok connect");
    let facts = connect_facts(line.trim_start_matches("ok connect"));
    assert_eq!(facts["queues"], "1");
    assert_eq!(facts["order"], "0");
    assert_eq!(
        facts["persistent"], "0",
        "the frontend offered persistent grants, we did not"
    );
    assert_eq!(facts["indirect"], "0");
    assert_eq!(
        host.read(&join(&be, "feature-persistent")).as_deref(),
        Some("0")
    );
    g.finish();
    assert_eq!(host.detach(&spec), Removal::Clean);

    // A read-only disk whose toolstack line said no-discard: the backend says VDISK_READONLY
    // and no discard, and refuses the writes a frontend sends anyway.
    host.create_domain(8);
    let mut ro = disk("xenblkd", 8, 51712, &host.image("ro.img", 8));
    ro.writable = false;
    ro.discard_enable = false;
    host.attach(&ro);
    let g = host.guest(
        8,
        51712,
        &["--no-honour-read-only"],
        "connect,ro-check,close",
    );
    let seen = g.finish();
    assert!(
        seen.iter()
            .any(|l| l.starts_with("ok ro-check write refused")),
        "{seen:?}"
    );
    let be = ro.backend_path();
    assert_eq!(host.read(&join(&be, "info")).as_deref(), Some("4"));
    assert_eq!(
        host.read(&join(&be, "feature-discard")).as_deref(),
        Some("0")
    );
    let st = host.device_status("xenblkd", 8, 51712).unwrap();
    println!("read-only device: {:?}", st.last_disconnect);
    assert_eq!(host.detach(&ro), Removal::Clean);
}

/// libxl's route: backendtype=phy with our hotplug script. The backend reaches InitWait
/// before the script runs (libxl runs it only then) and opens the storage only once the
/// script wrote `physical-device`/`physical-device-path`.
#[test]
fn vbd_backend_type_waits_for_the_hotplug_script() {
    let host = Host::start(&[]);
    host.create_domain(9);
    let img = host.image("phy.img", 16);
    let mut spec = disk("vbd", 9, 51712, &host.dir.path().join("not-yet-resolved"));
    spec.params = "aio:/dev/vg0/guest9".into();
    spec.script = Some("/etc/xen/scripts/xenblkd-hotplug".into());
    assert_eq!(host.attach(&spec), XenbusState::InitWait);
    let mut g = host.guest(9, 51712, &[], "connect,io:16,close");
    // The frontend publishes its rings, but without storage nothing connects.
    let fe = spec.frontend_path();
    common_wait(|| host.state(&fe) == XenbusState::Initialised);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(host.state(&spec.backend_path()), XenbusState::InitWait);
    // The hotplug script resolves the target and says so.
    let be = spec.backend_path();
    host.xs
        .write_str(
            &join(&be, "physical-device-path"),
            &img.display().to_string(),
        )
        .unwrap();
    host.xs
        .write_str(&join(&be, "hotplug-status"), "connected")
        .unwrap();
    g.expect("ok connect");
    g.finish();
    let st = host.status();
    assert!(
        st.devices[0]
            .target
            .as_deref()
            .unwrap()
            .ends_with("phy.img"),
        "{st:?}"
    );
    assert_eq!(host.detach(&spec), Removal::Clean);
}

fn common_wait(f: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + common::WAIT;
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "condition not reached"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Each of Linux's fatal cases writes `error` and goes to Closing; a second device on the
/// same daemon keeps doing verified I/O throughout.
#[test]
fn fatal_cases_close_only_their_device() {
    let host = Host::start(&["--max-queues", "4", "--max-ring-page-order", "2"]);
    host.create_domain(1);
    let good = disk("xenblkd", 1, 51712, &host.image("good.img", 32));
    host.attach(&good);
    let mut g = host.guest(1, 51712, &["--max-queues", "2"], "connect,loop");
    g.expect("ok connect");
    g.expect("progress");

    // (frontend nodes, expected start of the error node)
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[
                ("protocol", "sparc64-abi"),
                ("ring-ref", "8"),
                ("event-channel", "3"),
            ],
            "38 unknown fe protocol sparc64-abi",
        ),
        (
            &[
                ("multi-queue-num-queues", "0"),
                ("ring-ref", "8"),
                ("event-channel", "3"),
            ],
            "38 guest requested 0 queues",
        ),
        (
            &[
                ("multi-queue-num-queues", "5"),
                ("ring-ref", "8"),
                ("event-channel", "3"),
            ],
            "38 guest requested 5 queues",
        ),
        (
            &[
                ("ring-page-order", "3"),
                ("ring-ref0", "8"),
                ("event-channel", "3"),
            ],
            "22 requested ring page order 3 exceed max:2",
        ),
        (
            &[("ring-ref", "eight"), ("event-channel", "3")],
            "22 reading",
        ),
        (&[("ring-ref", "8")], "2 reading"),
        // Well-formed, but nothing is granted: the map fails.
        (
            &[("ring-ref", "8"), ("event-channel", "3")],
            "22 connecting the rings",
        ),
    ];
    let wr_before = host.device_status("xenblkd", 1, 51712).unwrap().stats["wr_req"];
    for (i, (nodes, expect)) in cases.iter().enumerate() {
        let domid = 20 + i as u32;
        host.create_domain(domid);
        let spec = disk(
            "xenblkd",
            domid,
            51712,
            &host.image(&format!("bad{i}.img"), 1),
        );
        host.attach(&spec);
        // A hostile frontend, writing as its own domain.
        let gs = guest_store(&host, domid);
        let fe = spec.frontend_path();
        for (k, v) in *nodes {
            gs.write_str(&join(&fe, k), v).unwrap();
        }
        gs.write_str(&join(&fe, "state"), "3").unwrap();
        let be = spec.backend_path();
        host.wait_state(&be, XenbusState::Closing);
        let err = host.read(&join(&be, "error")).unwrap();
        assert!(
            err.starts_with(expect),
            "case {i}: {err:?} should start with {expect:?}"
        );
        // The guest can read why (the backend directory is readable by it).
        assert_eq!(
            gs.read_string(&join(&be, "error")).unwrap().as_deref(),
            Some(err.as_str())
        );
        // Linux's location too.
        let linux = format!("/local/domain/0/error/backend/xenblkd/{domid}/51712/error");
        assert_eq!(host.read(&linux).as_deref(), Some(err.as_str()));
        // Removal is still clean: nothing was connected.
        assert_eq!(host.detach(&spec), Removal::Clean);
        assert_eq!(host.state(&good.backend_path()), XenbusState::Connected);
    }
    // The good device kept serving.
    g.expect("progress");
    let wr_after = host.device_status("xenblkd", 1, 51712).unwrap().stats["wr_req"];
    assert!(wr_after > wr_before, "{wr_before} -> {wr_after}");
    assert_eq!(host.detach(&good), Removal::Clean);
    let seen = g.finish();
    let last = seen
        .iter()
        .rev()
        .find(|l| l.starts_with("ok loop"))
        .unwrap();
    println!("good device: {last}");
    assert_eq!(host.metric("grant_mappings"), 0);
}

/// A hostile frontend flapping its state as fast as it can (connect attempts with refs it
/// never granted, closes, restarts) costs the daemon nothing lasting: the other device
/// keeps serving, the daemon stays responsive, nothing leaks.
#[test]
fn flapping_frontend_is_harmless() {
    let host = Host::start(&[]);
    host.create_domain(1);
    let good = disk("xenblkd", 1, 51712, &host.image("good.img", 16));
    host.attach(&good);
    let mut g = host.guest(1, 51712, &[], "connect,loop");
    g.expect("progress");
    let before = host.status().daemon.metrics;

    host.create_domain(2);
    let bad = disk("xenblkd", 2, 51712, &host.image("bad.img", 1));
    host.attach(&bad);
    let gs = guest_store(&host, 2);
    let fe = bad.frontend_path();
    gs.write_str(&join(&fe, "ring-ref"), "77").unwrap();
    gs.write_str(&join(&fe, "event-channel"), "5").unwrap();
    for round in 0..300 {
        let state = ["3", "5", "6", "1", "4", "2", "9", "garbage"][round % 8];
        gs.write_str(&join(&fe, "state"), state).unwrap();
    }
    gs.write_str(&join(&fe, "state"), "6").unwrap();
    let be = bad.backend_path();
    host.wait_state(&be, XenbusState::Closed);
    // Still serving the other guest, still answering.
    g.expect("progress");
    assert_eq!(host.state(&good.backend_path()), XenbusState::Connected);
    let after = host.status().daemon.metrics;
    println!("before flapping: {before:?}\nafter flapping:  {after:?}");
    assert_eq!(host.detach(&bad), Removal::Clean);
    assert_eq!(host.detach(&good), Removal::Clean);
    g.finish();
    assert_eq!(host.metric("grant_mappings"), 0);
    // Back to the descriptors of a daemon serving nothing (the good device's storage,
    // rings and event channels included in `before` are gone too).
    assert!(host.metric("open_fds") < before["open_fds"]);
}

/// A driver domain: the daemon runs as domain 40, unprivileged in xenstore (Xen's
/// permission rules apply to every node it touches), guests grant their pages to it and
/// the toolstack points their disks at it (`backend=<driver domain>` in the xl line).
#[test]
fn serves_from_a_driver_domain() {
    const DRIVER: u32 = 40;
    let host = Host::start_in(DRIVER, &[]);
    // libxl made the driver domain and the guest.
    host.create_domain(DRIVER);
    host.create_domain(3);
    let mut spec = disk("xenblkd", 3, 51712, &host.image("dd.img", 16));
    spec.backend_domid = DRIVER;
    assert_eq!(host.attach(&spec), XenbusState::InitWait);
    let be = spec.backend_path();
    assert!(
        be.starts_with("/local/domain/40/backend/xenblkd/3/"),
        "{be}"
    );
    let g = host.guest(
        3,
        51712,
        &["--max-queues", "2"],
        "connect,io:16,flush,discard,close",
    );
    g.finish();
    // A hostile frontend on the same driver domain still gets its error node.
    host.create_domain(4);
    let mut bad = disk("xenblkd", 4, 51712, &host.image("dd-bad.img", 1));
    bad.backend_domid = DRIVER;
    host.attach(&bad);
    let gs = guest_store(&host, 4);
    gs.write_str(&join(&bad.frontend_path(), "protocol"), "mips-abi")
        .unwrap();
    gs.write_str(&join(&bad.frontend_path(), "state"), "3")
        .unwrap();
    host.wait_state(&bad.backend_path(), XenbusState::Closing);
    assert!(host
        .read(&join(&bad.backend_path(), "error"))
        .unwrap()
        .starts_with("38 unknown fe protocol"));
    assert_eq!(host.detach(&bad), Removal::Clean);
    assert_eq!(host.detach(&spec), Removal::Clean);
    assert_eq!(host.metric("grant_mappings"), 0);
    assert_eq!(host.status().daemon.home, "/local/domain/40");
}
