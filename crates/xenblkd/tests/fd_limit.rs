//! `serve` (and the simulator's `xenstored`) raises its soft open-file limit to the hard limit: a daemon started from a shell
//! with the usual 1,024 would otherwise refuse disks past about the hundredth (each VBD
//! holds ~11 descriptors). Its own test binary: it lowers this process's soft limit, which
//! the daemon inherits.

mod common;

use common::Host;
use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// `Max open files` of a process: (soft, hard).
fn nofile(pid: i32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (v[0], v[1])
}

#[test]
fn serve_raises_its_soft_open_file_limit_to_the_hard_limit() {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(hard > 256, "hard limit {hard} leaves nothing to raise");
    setrlimit(Resource::RLIMIT_NOFILE, 256, hard).unwrap();
    let host = Host::start(&[]);
    // Ready (the control socket answers) means the limit was handled at start.
    host.status();
    assert_eq!(nofile(host.daemon_pid()), (hard, hard), "{}", host.log());
    // So does the simulator's xenstored: a connection per disk being set up.
    assert_eq!(nofile(host.xenstored.pid()), (hard, hard));
}
