//! A guest flooding its xenstore nodes for 10 s, while another guest does verified I/O:
//! the daemon's log stays a few lines long, and the other guest's I/O goes on.

mod common;

use std::thread;
use std::time::{Duration, Instant};

use common::{disk, guest_store, Host};
use xenbus::store::{join, StoreExt};
use xenbus::toolstack::Removal;
use xenbus::XenbusState;

const FLOOD: Duration = Duration::from_secs(10);

fn rounds(progress_line: &str) -> u64 {
    progress_line
        .strip_prefix("progress ")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected line {progress_line:?}"))
}

/// Domain 2 writes, as fast as xenstored takes them, an unparsable `state` on one device
/// (the flood Linux blkback answers by unregistering the device, and that once logged a
/// warning per write) and cycles another through a connect that fails (a ring it never
/// granted), Closed and Initialising (a warning per round without the rate limit).
#[test]
fn a_guest_flooding_its_state_nodes_does_not_flood_the_log() {
    let host = Host::start(&[]);
    host.create_domain(1);
    let good = disk("xenblkd", 1, 51712, &host.image("good.img", 16));
    host.attach(&good);
    let mut g = host.guest(1, 51712, &[], "connect,loop");
    g.expect("ok connect");
    // The honest guest's pace without the flood.
    let mut last = rounds(&g.expect("progress"));
    let (first, start) = (last, Instant::now());
    while start.elapsed() < Duration::from_secs(2) {
        last = rounds(&g.expect("progress"));
    }
    let quiet_rate = (last - first) as f64 / start.elapsed().as_secs_f64();

    host.create_domain(2);
    let garbage = disk("xenblkd", 2, 51712, &host.image("garbage.img", 1));
    let flapping = disk("xenblkd", 2, 51728, &host.image("flapping.img", 1));
    host.attach(&garbage);
    host.attach(&flapping);
    let gs = guest_store(&host, 2);
    let (garbage_fe, flapping_fe) = (garbage.frontend_path(), flapping.frontend_path());
    gs.write_str(&join(&flapping_fe, "ring-ref"), "77").unwrap();
    gs.write_str(&join(&flapping_fe, "event-channel"), "5")
        .unwrap();
    let log_before = host.log().lines().count();

    let flood = thread::spawn(move || {
        let start = Instant::now();
        let mut writes = 0u64;
        while start.elapsed() < FLOOD {
            let junk = ["banana", "4x", "", "\u{7f}\u{1b}[2J"][writes as usize % 4];
            gs.write_str(&join(&garbage_fe, "state"), junk).unwrap();
            let state = ["3", "6", "1"][writes as usize % 3];
            gs.write_str(&join(&flapping_fe, "state"), state).unwrap();
            writes += 2;
        }
        gs.write_str(&join(&flapping_fe, "state"), "6").unwrap();
        writes
    });
    let before_flood = last;
    let start = Instant::now();
    while !flood.is_finished() {
        last = rounds(&g.expect("progress"));
    }
    let writes = flood.join().unwrap();
    let flood_rate = (last - before_flood) as f64 / start.elapsed().as_secs_f64();
    println!(
        "flooding guest: {writes} state writes in {FLOOD:?}; honest guest: {quiet_rate:.0} \
         verified rounds/s before, {flood_rate:.0} during"
    );

    host.wait_state(&flapping.backend_path(), XenbusState::Closed);
    let log = host.log();
    let flood_lines: Vec<&str> = log
        .lines()
        .skip(log_before)
        .filter(|l| l.contains("xenblkd/2/"))
        .collect();
    let warnings: Vec<&str> = flood_lines
        .iter()
        .copied()
        .filter(|l| l.contains(" WARN "))
        .collect();
    let mut by_message = std::collections::BTreeMap::<&str, usize>::new();
    for l in &flood_lines {
        // "<time> <LEVEL> <target>: <message> <fields>"
        let message = l.split(": ").nth(1).unwrap_or(l);
        let message = message.split(" device=").next().unwrap_or(message);
        *by_message.entry(message).or_default() += 1;
    }
    println!("{by_message:#?}");
    println!(
        "{} log lines about the flooding guest's devices, {} of them warnings:\n{}",
        flood_lines.len(),
        warnings.len(),
        warnings.join("\n")
    );
    // The garbage device: one warning, then unregistered. The flapping one: one "device
    // failed" per 10 s interval, a few state-machine lines, and the summaries of the rest.
    assert!(
        warnings.len() <= 6,
        "{} warnings:\n{}",
        warnings.len(),
        warnings.join("\n")
    );
    assert!(
        flood_lines.len() <= 80,
        "{} lines: {by_message:#?}",
        flood_lines.len()
    );
    assert_eq!(
        warnings
            .iter()
            .filter(|l| l.contains("frontend state is Unknown"))
            .count(),
        1
    );
    assert!(warnings.iter().any(|l| l.contains("device failed")));
    // The device whose state read Unknown was closed and left so.
    assert_eq!(host.state(&garbage.backend_path()), XenbusState::Closed);

    // The honest guest kept doing verified I/O throughout, and still does.
    assert!(last > before_flood, "no progress during the flood");
    g.expect("progress");
    assert_eq!(host.detach(&garbage), Removal::Clean);
    assert_eq!(host.detach(&flapping), Removal::Clean);
    assert_eq!(host.detach(&good), Removal::Clean);
    let seen = g.finish();
    let end = seen
        .iter()
        .rev()
        .find(|l| l.starts_with("ok loop"))
        .unwrap();
    assert!(!end.contains("mismatch"), "{end}");
    assert_eq!(host.metric("grant_mappings"), 0);
}
