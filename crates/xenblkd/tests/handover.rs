//! Graceful handover between two `serve` processes (issue 14): guests with two disks run
//! verified random read/write I/O while a second daemon is started on the same control
//! socket. It asks the running one to hand over; that one answers what is in flight,
//! releases every ring, leaves xenstore as it is and exits 0; the new one adopts every
//! device. The guests must see a pause and nothing else: no I/O error, no data mismatch,
//! no xenstore state change. Then the same once more with `xenblkd handover --wait` and a
//! daemon started after it.

mod common;

use std::process::Command;
use std::thread;
use std::time::Duration;

use common::{line_numbers, start_rw_guest, Guest, Host, XENBLKD};

const DEVIDS: [u32; 2] = [51712, 51728];
/// I/O between two handovers.
const RUN: Duration = Duration::from_millis(600);

#[test]
fn guests_see_only_a_pause_across_handovers() {
    let mut host = Host::start(&[]);
    let stop = host.dir.path().join("stop");
    let guests: Vec<Guest> = (1..=2)
        .map(|d| start_rw_guest(&host, d, &DEVIDS, 16, &stop))
        .collect();

    // A second `serve` on the same control socket replaces the running one.
    thread::sleep(RUN);
    let mut old = host.daemon.take().expect("daemon running");
    host.start_daemon(&[]);
    let status = old
        .wait_timeout(common::WAIT)
        .unwrap_or_else(|| panic!("the old daemon did not hand over\n{}", host.log()));
    assert!(
        status.success(),
        "old daemon exited with {status}\n{}",
        host.log()
    );
    assert!(
        host.log().contains("every device is handed over"),
        "{}",
        host.log()
    );

    // An explicit handover, then a new daemon (an in-place upgrade).
    thread::sleep(RUN);
    let out = Command::new(XENBLKD)
        .args(["handover", "--wait", "--control-socket"])
        .arg(&host.control)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut old = host.daemon.take().expect("daemon running");
    let status = old.wait_timeout(common::WAIT).expect("handed over");
    assert!(status.success(), "{status}");
    host.start_daemon(&[]);
    thread::sleep(RUN);

    std::fs::write(&stop, b"").unwrap();
    for mut g in guests {
        let done = g.expect("ok rw-until");
        let n = line_numbers(&done);
        println!("guest d{}: {done}", g.domid);
        assert_eq!(n["errors"], 0, "{done}");
        assert_eq!(n["mismatches"], 0, "{done}");
        assert_eq!(n["state_events"], 0, "{done}");
        assert!(n["reads"] > 0 && n["writes"] > 0, "{done}");
        assert_eq!(n["deaths"], 2, "{done}");
        assert_eq!(n["reattaches"], 2, "{done}");
        let closed = g.expect("ok close");
        assert!(closed.contains("grants_ended="), "{closed}");
        g.finish();
    }
    let report = host.status();
    assert!(
        report.devices.iter().all(|d| d.error.is_none()),
        "{report:?}"
    );
}
