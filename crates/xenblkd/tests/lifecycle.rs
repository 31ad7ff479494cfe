//! Multi-process lifecycle: detach under I/O, a guest killed mid-I/O, a guest reconnecting
//! after Closed, SIGTERM draining every device, and 200 attach/detach cycles with the
//! daemon's grant mappings, descriptors and threads measured before and after.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::{disk, Host};
use xenbus::toolstack::{Removal, DESTROY_TIMEOUT};
use xenbus::XenbusState;

fn rounds(line: &str) -> u64 {
    // "ok loop after N verified rounds: ..."
    line.split_whitespace()
        .nth(3)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected loop line {line:?}"))
}

#[test]
fn detach_under_io() {
    let host = Host::start(&[]);
    host.create_domain(1);
    let spec = disk("xenblkd", 1, 51712, &host.image("a.img", 32));
    host.attach(&spec);
    let mut g = host.guest(
        1,
        51712,
        &["--max-queues", "2", "--max-ring-order", "1"],
        "connect,loop",
    );
    g.expect("ok connect");
    g.expect("progress");
    // libxl's block-detach while the guest is busy: Closing, the frontend finishes and
    // closes, the backend drains and reaches Closed well inside libxl's 10 s.
    let start = Instant::now();
    assert_eq!(host.detach(&spec), Removal::Clean);
    let took = start.elapsed();
    println!("detach under I/O took {took:?}");
    assert!(took < DESTROY_TIMEOUT);
    let seen = g.finish();
    let last = seen
        .iter()
        .find(|l| l.starts_with("ok loop"))
        .expect("loop ended cleanly");
    assert!(rounds(last) > 0, "{last}");
    wait_metric(&host, "grant_mappings", 0);
    assert!(host.status().devices.is_empty());
}

#[test]
fn guest_killed_mid_io() {
    let host = Host::start(&[]);
    host.create_domain(2);
    host.create_domain(3);
    let victim = disk("xenblkd", 2, 51712, &host.image("v.img", 32));
    let bystander = disk("xenblkd", 3, 51712, &host.image("b.img", 32));
    host.attach(&victim);
    host.attach(&bystander);
    let mut v = host.guest(2, 51712, &["--max-queues", "2"], "connect,loop");
    let mut b = host.guest(3, 51712, &[], "connect,loop");
    v.expect("progress");
    b.expect("progress");
    assert!(host.metric("grant_mappings") > 0);
    v.kill();
    // libxl destroys the dead domain: release, remove its devices (10 s each at most),
    // remove its home. The backend must not hang on the dead guest.
    let start = Instant::now();
    host.destroy_domain(2, &[&victim]);
    println!("destroy of the killed guest took {:?}", start.elapsed());
    assert!(start.elapsed() < DESTROY_TIMEOUT);
    let devices = host.status().devices;
    assert_eq!(devices.len(), 1, "{devices:?}");
    assert_eq!(devices[0].domid, 3);
    // The bystander kept going.
    b.expect("progress");
    assert_eq!(
        host.state(&bystander.backend_path()),
        XenbusState::Connected
    );
    assert_eq!(host.detach(&bystander), Removal::Clean);
    b.finish();
    wait_metric(&host, "grant_mappings", 0);
    assert_eq!(host.metric("mapped_pages"), 0);
}

#[test]
fn guest_reconnects_after_closed() {
    let host = Host::start(&[]);
    host.create_domain(4);
    let spec = disk("xenblkd", 4, 51728, &host.image("r.img", 32));
    host.attach(&spec);
    let g = host.guest(
        4,
        51728,
        &["--max-queues", "2"],
        "connect,io:8,close,reconnect,io:8,close,reconnect,io:8,close",
    );
    let seen = g.finish();
    assert_eq!(
        seen.iter()
            .filter(|l| l.starts_with("ok reconnect"))
            .count(),
        2,
        "{seen:?}"
    );
    let st = host.device_status("xenblkd", 4, 51728).unwrap();
    assert_eq!(st.sessions, 3, "{st:?}");
    assert_eq!(st.state, XenbusState::Closed);
    assert_eq!(host.detach(&spec), Removal::Clean);
    wait_metric(&host, "grant_mappings", 0);
}

#[test]
fn sigterm_drains_and_closes_every_device() {
    let mut host = Host::start(&["--drain-timeout-ms", "5000"]);
    let mut specs = Vec::new();
    let mut guests = Vec::new();
    for domid in 5..8 {
        host.create_domain(domid);
        let spec = disk(
            "xenblkd",
            domid,
            51712,
            &host.image(&format!("s{domid}.img"), 32),
        );
        host.attach(&spec);
        let mut g = host.guest(domid, 51712, &["--max-queues", "2"], "connect,loop");
        g.expect("progress");
        specs.push(spec);
        guests.push(g);
    }
    // An attached device whose guest never connected closes at once.
    host.create_domain(8);
    let idle = disk("xenblkd", 8, 51712, &host.image("idle.img", 8));
    host.attach(&idle);
    let start = Instant::now();
    let status = host.stop_daemon();
    println!("SIGTERM to exit: {:?}", start.elapsed());
    assert!(status.success(), "{status}\n{}", host.log());
    for g in guests {
        let seen = g.finish();
        assert!(seen.iter().any(|l| l.starts_with("ok loop")), "{seen:?}");
    }
    for spec in specs.iter().chain([&idle]) {
        assert_eq!(
            host.state(&spec.backend_path()),
            XenbusState::Closed,
            "{}",
            spec.backend_path()
        );
    }
    assert!(
        host.log().contains("every device is closed"),
        "{}",
        host.log()
    );
}

#[test]
fn online_resize_reaches_the_guest() {
    let host = Host::start(&[]);
    host.create_domain(9);
    let img = host.image("grow.img", 16);
    let spec = disk("xenblkd", 9, 51712, &img);
    host.attach(&spec);
    let grown: u64 = 48 << 20;
    let mut g = host.guest(
        9,
        51712,
        &[],
        &format!("connect,io:4,wait-capacity:{grown},io:32,close"),
    );
    g.expect("ok io:4");
    // The image grows under the running guest; the engine notices (it polls the size),
    // the daemon publishes `sectors` and re-writes `state`, blkfront re-reads the size.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(grown)
        .unwrap();
    g.expect("ok wait-capacity");
    let be = spec.backend_path();
    assert_eq!(common::node_u64(&host, &be, "sectors"), Some(grown / 512));
    let st = host.device_status("xenblkd", 9, 51712).unwrap();
    assert_eq!(st.disk.map(|d| d.size_bytes), Some(grown));
    g.finish();
    assert_eq!(host.detach(&spec), Removal::Clean);
}

#[test]
fn daemon_restart_picks_up_existing_devices() {
    let mut host = Host::start(&[]);
    host.create_domain(1);
    let first = disk("xenblkd", 1, 51712, &host.image("one.img", 16));
    host.attach(&first);
    host.guest(1, 51712, &[], "connect,io:4,close").finish();
    assert!(host.stop_daemon().success());
    // While the daemon is down the toolstack adds a disk (nobody answers yet).
    host.create_domain(2);
    let second = disk("xenblkd", 2, 51712, &host.image("two.img", 16));
    xenbus::toolstack::add_disk(host.xs.as_ref(), &second).unwrap();
    host.start_daemon(&[]);
    // The new daemon finds both: the new one is set up, the closed one waits for its
    // frontend, and both guests (new processes) connect and do verified I/O.
    host.wait_state(&second.backend_path(), XenbusState::InitWait);
    host.guest(2, 51712, &[], "connect,io:8,close").finish();
    host.guest(1, 51712, &[], "connect,io:8,close").finish();
    assert_eq!(host.detach(&first), Removal::Clean);
    assert_eq!(host.detach(&second), Removal::Clean);
    wait_metric(&host, "grant_mappings", 0);
}

/// Waits for a daemon gauge to settle at `want` (disconnect threads finish after the
/// state is published).
fn wait_metric(host: &Host, name: &str, want: u64) {
    let deadline = Instant::now() + common::WAIT;
    loop {
        let v = host.metric(name);
        if v == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stays at {v}, expected {want}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn attach_detach_cycles_leak_nothing() {
    const CYCLES: u32 = 200;
    const LANES: u32 = 4;
    let host = Host::start(&[]);
    // One image per lane: lanes write concurrently and each verifies what it wrote.
    let images: Vec<_> = (0..LANES)
        .map(|l| host.image(&format!("c{l}.img"), 8))
        .collect();
    for lane in 0..LANES {
        host.create_domain(10 + lane);
    }
    let cycle = |domid: u32, i: u32| {
        let devid = 51712 + 16 * (i % 4);
        let spec = disk("xenblkd", domid, devid, &images[(domid - 10) as usize]);
        host.attach(&spec);
        let g = host.guest(
            domid,
            devid,
            &["--pages", "512", "--max-queues", "2"],
            "connect,io:2,close",
        );
        g.finish();
        assert_eq!(host.detach(&spec), Removal::Clean);
    };
    // Warm up (first use of the engine's reactors, lazily created state), then measure.
    cycle(10, 0);
    wait_metric(&host, "grant_mappings", 0);
    thread::sleep(Duration::from_millis(100));
    let before = host.status().daemon.metrics;
    let start = Instant::now();
    thread::scope(|s| {
        for lane in 0..LANES {
            let cycle = &cycle;
            s.spawn(move || {
                for i in 0..CYCLES / LANES {
                    cycle(10 + lane, i);
                }
            });
        }
    });
    let took = start.elapsed();
    wait_metric(&host, "grant_mappings", 0);
    wait_metric(&host, "threads", before["threads"]);
    wait_metric(&host, "open_fds", before["open_fds"]);
    let after = host.status().daemon.metrics;
    println!("{CYCLES} attach/detach cycles (each: attach, guest connects, verified I/O, guest closes, detach) in {took:?}");
    println!("daemon before: {before:?}");
    println!("daemon after:  {after:?}");
    assert_eq!(after["grant_mappings"], 0);
    assert_eq!(after["mapped_pages"], 0);
    assert_eq!(after["open_fds"], before["open_fds"]);
    assert_eq!(after["threads"], before["threads"]);
    assert!(host.status().devices.is_empty());
}
