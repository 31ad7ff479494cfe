//! Zero-downtime restarts (issue 14): guests with several disks run verified random
//! read/write I/O while the daemon is killed with SIGKILL and started again, and handed
//! over to a new process. The guests (`--reattach`) outlive each daemon as a Xen guest
//! outlives its backend process: the simulator releases the dead process's grant pins and
//! leaves the guest's ports unbound, the guest attaches to the next daemon, which adopts
//! the Connected devices from xenstore and the shared rings. The guests must see a pause
//! and nothing else: no I/O error, no data mismatch, no xenstore state change, and after
//! it all every grant comes back and no process holds what it should not.
//!
//! The full measurement (8 disks in 4 guests, 20 handovers and 20 crashes) is
//! `scripts/bench-restart`, not a test.

mod common;

use std::path::Path;
use std::thread;
use std::time::Duration;

use common::{line_numbers, sim_guest_holdings, start_rw_guest, Guest, Host};
use xenbus::store::StoreOps;

const DEVIDS: [u32; 2] = [51712, 51728];
/// I/O between two restarts.
const RUN: Duration = Duration::from_millis(700);

/// The rings' crash-recovery journals in the daemon's run directory.
fn journals(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| {
        d.filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".journal"))
            .count()
    })
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Restarts the daemon `times` over under the guests' I/O with `restart`, and checks that
/// xenstored, which outlives every daemon, is left with as many descriptors as before
/// (each dead daemon's connection is gone, not kept).
fn restart_under_io(host: &mut Host, times: usize, mut restart: impl FnMut(&mut Host)) {
    let xenstored = host.xenstored.pid();
    thread::sleep(RUN);
    // One journal per ring, beside the daemon lock.
    let rings = journals(host.dir.path());
    assert!(rings >= 4, "{rings} ring journals for 2 guests x 2 disks");
    let before = fd_count(xenstored);
    for _ in 0..times {
        restart(host);
        thread::sleep(RUN);
    }
    let deadline = std::time::Instant::now() + common::WAIT;
    while fd_count(xenstored) != before {
        assert!(
            std::time::Instant::now() < deadline,
            "xenstored has {} fds, {before} before the restarts",
            fd_count(xenstored)
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Ends the workload and checks what each guest saw across `restarts` daemon deaths
/// (`None`: at least one, as many reattaches as deaths).
fn finish(host: &Host, guests: Vec<Guest>, stop: &Path, restarts: impl Into<Option<u64>>) {
    let restarts = restarts.into();
    std::fs::write(stop, b"").unwrap();
    for mut g in guests {
        let done = g.expect("ok rw-until");
        let n = line_numbers(&done);
        println!("guest d{}: {done}", g.domid);
        assert_eq!(n["errors"], 0, "{done}");
        assert_eq!(n["mismatches"], 0, "{done}");
        assert_eq!(n["state_events"], 0, "{done}");
        assert!(n["reads"] > 0 && n["writes"] > 0, "{done}");
        match restarts {
            Some(r) => {
                assert_eq!(n["deaths"], r, "{done}");
                assert_eq!(n["reattaches"], r, "{done}");
            }
            None => {
                assert!(n["deaths"] > 0, "{done}");
                assert_eq!(n["reattaches"], n["deaths"], "{done}");
            }
        }
        // The guest's own descriptors and mappings are what they were before the
        // restarts (the attach socket is replaced, nothing piles up).
        assert_eq!(n["fds.0"], n["fds.1"], "{done}");
        assert_eq!(n["maps.0"], n["maps.1"], "{done}");
        // Closing ends every grant: none is left pinned by a dead daemon or the last.
        let closed = g.expect("ok close");
        assert!(closed.contains("grants_ended="), "{closed}");
        g.finish();
    }
    // The surviving daemon lets go of the guests once they are gone.
    let pid = host.daemon_pid();
    let deadline = std::time::Instant::now() + common::WAIT;
    loop {
        let held = sim_guest_holdings(pid);
        if held == (0, 0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon still holds {held:?} (fds, maps) of the gone guests\n{}",
            host.log()
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(host.metric("grant_mappings"), 0);
    // Every device closed: their rings closed drained and removed their journals.
    let deadline = std::time::Instant::now() + common::WAIT;
    while journals(host.dir.path()) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} ring journals left after every device closed",
            journals(host.dir.path())
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn handovers_by_a_second_serve_leave_nothing_behind() {
    let mut host = Host::start(&[]);
    let stop = host.dir.path().join("stop");
    let guests: Vec<Guest> = (1..=2)
        .map(|d| start_rw_guest(&host, d, &DEVIDS, 32, &stop))
        .collect();
    restart_under_io(&mut host, 2, |h| h.handover(&[]));
    finish(&host, guests, &stop, 2);
}

#[test]
fn guests_see_only_a_pause_across_kill_9_and_restart() {
    let mut host = Host::start(&[]);
    let stop = host.dir.path().join("stop");
    let guests: Vec<Guest> = (1..=2)
        .map(|d| start_rw_guest(&host, d, &DEVIDS, 32, &stop))
        .collect();
    restart_under_io(&mut host, 2, |h| {
        h.kill_daemon();
        h.start_daemon(&[]);
    });
    finish(&host, guests, &stop, 2);
}

/// A crash during recovery: the daemon is killed with SIGKILL under I/O, and each of the
/// next daemons is killed again while it adopts and re-executes what the journals owe
/// (right after it printed that it does, or at fixed delays after its start, before or
/// while it adopts), several times in a row, before one is left to run. Each recovery
/// leaves the journal describing what is still owed, so the next one re-executes it
/// again: every request is answered once and every byte read back is the last written.
#[test]
fn kill_9_during_recovery_again_and_again() {
    let mut host = Host::start(&[]);
    let stop = host.dir.path().join("stop");
    let guests: Vec<Guest> = (1..=2)
        .map(|d| start_rw_guest(&host, d, &DEVIDS, 32, &stop))
        .collect();
    let log_path = host.dir.path().join("serve.log");
    let mut interrupted = 0;
    restart_under_io(&mut host, 2, |h| {
        h.kill_daemon();
        for delay_ms in [None, Some(40), None, Some(120), None, Some(250)] {
            let from = std::fs::metadata(&log_path).map_or(0, |m| m.len() as usize);
            h.spawn_daemon(&[], Some("info"));
            let start = std::time::Instant::now();
            match delay_ms {
                Some(ms) => thread::sleep(Duration::from_millis(ms)),
                // Until this daemon says it re-executes (or it plainly has nothing to).
                None => {
                    while !h.log()[from..].contains("journal: re-executing")
                        && start.elapsed() < Duration::from_secs(3)
                    {
                        thread::sleep(Duration::from_millis(1));
                    }
                }
            }
            h.kill_daemon();
            interrupted += usize::from(h.log()[from..].contains("journal: re-executing"));
        }
        h.start_daemon(&[]);
    });
    println!("{interrupted} recoveries killed after they started re-executing");
    assert!(
        interrupted > 0,
        "no kill landed during a recovery\n{}",
        host.log()
    );
    finish(&host, guests, &stop, None);
}

/// Journals whose device went away while no daemon ran (the guest died, the toolstack
/// removed the device) are removed by the next daemon at start; a device still there
/// keeps its journals and is adopted from them; other files are left alone.
#[test]
fn journals_of_devices_removed_while_no_daemon_ran_are_removed_at_start() {
    let mut host = Host::start(&[]);
    let stop = host.dir.path().join("stop");
    let mut gone = start_rw_guest(&host, 1, &DEVIDS[..1], 16, &host.dir.path().join("never"));
    let stays = start_rw_guest(&host, 2, &DEVIDS, 16, &stop);
    thread::sleep(RUN);
    let dir = host.dir.path().to_path_buf();
    let gone_journal = dir.join("xenblkd-1-51712-q0.journal");
    assert!(gone_journal.exists());
    host.kill_daemon();
    gone.kill();
    host.xs
        .rm("/local/domain/0/backend/xenblkd/1/51712")
        .unwrap();
    host.xs.rm("/local/domain/1/device/vbd/51712").unwrap();
    // Left by a daemon of another device that is gone too, of a type not served, and
    // something else in the run directory.
    let planted = [
        dir.join("xenblkd-7-51728-q1.journal"),
        dir.join("vbd-9-768-q0.journal"),
    ];
    for p in &planted {
        std::fs::write(p, vec![0x5a; 4096]).unwrap();
    }
    let other = dir.join("notes-q0.journal.txt");
    std::fs::write(&other, b"kept").unwrap();

    host.start_daemon(&[]);
    assert!(!gone_journal.exists(), "{}", host.log());
    for p in &planted {
        assert!(!p.exists(), "{} left\n{}", p.display(), host.log());
    }
    assert!(other.exists());
    assert!(dir.join("xenblkd-2-51712-q0.journal").exists());
    assert!(dir.join("xenblkd-2-51728-q0.journal").exists());
    thread::sleep(RUN);
    finish(&host, vec![stays], &stop, 1);
}
