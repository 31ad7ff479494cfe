//! A bug in one ring does not take the host's disks down (issue 14, item 4), end to end:
//! a real `xenblkd serve` (built with the test-only `fault-injection` feature, which
//! `XENBLKD_FAULT_PANIC` arms) where one ring panics under verified I/O. That device is
//! reported failed, in `xenblkd status` and in xenstore's `error` node, and its ring
//! journal goes with it; the daemon, and another guest's two disks, keep doing verified
//! I/O with no error, no mismatch and no state change.
//!
//! Run with `cargo test -p xenblkd --features fault-injection --test fault`.
#![cfg(feature = "fault-injection")]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use common::{disk, line_numbers, start_rw_guest, Host};
use xenbus::status::{ControlReply, StatusReport};
use xenbus::XenbusState;

fn written(host: &Host, domid: u32, devid: u32) -> u64 {
    host.device_status("xenblkd", domid, devid)
        .map_or(0, |d| d.stats.get("wr_req").copied().unwrap_or(0))
}

/// `xenblkd status`'s report, read from the control socket by this process.
fn status_now(host: &Host) -> StatusReport {
    let mut stream = UnixStream::connect(&host.control).unwrap();
    stream.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    ControlReply::parse(&line).unwrap().into_report().unwrap()
}

#[test]
fn a_panicking_ring_fails_only_its_device() {
    let host = Host::start_with_env(0, &[("XENBLKD_FAULT_PANIC", "xenblkd/1/51712/0@800")], &[]);
    let stop = host.dir.path().join("stop");
    let mut victim = start_rw_guest(&host, 1, &[51712], 16, &stop);
    let mut other = start_rw_guest(&host, 2, &[51712, 51728], 16, &stop);
    let failed_journal = host.dir.path().join("xenblkd-1-51712-q0.journal");
    let other_journal = host.dir.path().join("xenblkd-2-51712-q0.journal");
    assert!(failed_journal.exists() && other_journal.exists());

    // The failure shows in `status` from the panic until the frontend, told Closing,
    // closes the device (which clears it, as blkback's does): asked straight on the
    // control socket, often, so that window is not missed.
    let deadline = Instant::now() + common::WAIT;
    let error = loop {
        if let Some(e) = status_now(&host)
            .device("xenblkd", 1, 51712)
            .and_then(|d| d.error.clone())
        {
            break e;
        }
        assert!(
            Instant::now() < deadline,
            "the device never failed\n{}",
            host.log()
        );
        thread::sleep(Duration::from_millis(2));
    };
    assert!(error.contains("panic"), "{error}");
    let node = disk("xenblkd", 1, 51712, &host.dir.path().join("x")).backend_path() + "/error";
    let deadline = Instant::now() + common::WAIT;
    loop {
        if let Some(e) = host.read(&node) {
            assert!(e.contains("panic"), "{e}");
            break;
        }
        assert!(Instant::now() < deadline, "no {node}\n{}", host.log());
        thread::sleep(Duration::from_millis(50));
    }
    // The failed device ends: its journal has no reader and goes, whatever the halted
    // ring had in flight. The other guest's stay while its rings run.
    let deadline = Instant::now() + common::WAIT;
    while failed_journal.exists() {
        assert!(
            Instant::now() < deadline,
            "the failed device's journal stayed\n{}",
            host.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert!(other_journal.exists());

    // The failed device is down (its frontend, told Closing, closes it and the error is
    // cleared with that); the other guest's are Connected with no error.
    let report = host.status();
    for d in &report.devices {
        if d.domid == 1 {
            assert_ne!(d.state, XenbusState::Connected, "{d:?}");
        } else {
            assert_eq!(d.state, XenbusState::Connected, "{d:?}");
            assert!(d.error.is_none(), "{d:?}");
        }
    }
    // The other guest's disks go on after the failure.
    let before = [written(&host, 2, 51712), written(&host, 2, 51728)];
    thread::sleep(Duration::from_millis(800));
    let after = [written(&host, 2, 51712), written(&host, 2, 51728)];
    assert!(
        after[0] > before[0] && after[1] > before[1],
        "{before:?} -> {after:?}"
    );

    std::fs::write(&stop, b"").unwrap();
    let done = other.expect("ok rw-until");
    let n = line_numbers(&done);
    println!("guest d2: {done}");
    assert_eq!(n["errors"], 0, "{done}");
    assert_eq!(n["mismatches"], 0, "{done}");
    assert_eq!(n["state_events"], 0, "{done}");
    assert!(n["reads"] > 0 && n["writes"] > 0, "{done}");
    let closed = other.expect("ok close");
    assert!(closed.contains("grants_ended="), "{closed}");
    other.finish();
    victim.kill();

    assert!(host.log().contains("panic"), "{}", host.log());
}
