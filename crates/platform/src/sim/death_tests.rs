//! A backend process that dies under a simulated guest: the backend runs in a child
//! process (this test binary again, running [`daemon_child`]) that maps grants and binds
//! an event channel, and is killed with SIGKILL, so nothing of it is torn down in order.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::grant_table::{GTF_READING, GTF_WRITING};
use crate::*;

const GUEST: DomId = 5;
const READY: &str = "DAEMON-READY";
const CONFIG: GuestConfig = GuestConfig {
    pages: 16,
    grant_entries: 64,
};

/// Not a test of its own: the backend process of the tests below (they run this binary
/// with `--ignored --exact`). It accepts one guest on `SIM_DEATH_SOCKET`, maps the grants
/// in `SIM_DEATH_GREFS` writable, binds `SIM_DEATH_PORT`, kicks the guest, says
/// [`READY`] and waits to be killed.
#[test]
#[ignore = "the backend process of the sim death tests, started by them"]
fn daemon_child() {
    let socket = std::env::var("SIM_DEATH_SOCKET").expect("started by a death test");
    let grefs: Vec<GrantRef> = std::env::var("SIM_DEATH_GREFS")
        .unwrap()
        .split(',')
        .map(|g| g.parse().unwrap())
        .collect();
    let port: Port = std::env::var("SIM_DEATH_PORT").unwrap().parse().unwrap();
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).unwrap();
    let platform = SimPlatform::new();
    let _handle = platform
        .accept_timeout(&listener, Duration::from_secs(10))
        .unwrap();
    let mapping = platform.map(GUEST, &grefs, Access::ReadWrite).unwrap();
    mapping.write(0, b"from the backend").unwrap();
    // The guest announces its port after attaching: it may not be here yet.
    let deadline = Instant::now() + Duration::from_secs(10);
    let channel = loop {
        match platform.bind_interdomain(GUEST, port) {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("bind: {e}"),
        }
    };
    channel.notify().unwrap();
    println!("{READY} {}", channel.local_port());
    std::thread::sleep(Duration::from_secs(60));
    drop((mapping, channel));
}

struct Daemon(Child);

impl Daemon {
    /// Starts a backend process on `socket` that will map `grefs` and bind `port`, and
    /// runs `attach` (the guest's side) while it waits for the guest.
    fn start(socket: &Path, grefs: &[GrantRef], port: Port, attach: impl FnOnce()) -> Daemon {
        let _ = std::fs::remove_file(socket);
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "sim::death_tests::daemon_child",
                "--nocapture",
            ])
            .env("SIM_DEATH_SOCKET", socket)
            .env(
                "SIM_DEATH_GREFS",
                grefs
                    .iter()
                    .map(|g| g.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .env("SIM_DEATH_PORT", port.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // Owned at once: a failing wait below must not leave the process behind.
        let mut daemon = Daemon(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "the backend process never listened"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        attach();
        let out = BufReader::new(daemon.0.stdout.take().unwrap());
        for line in out.lines() {
            if line.unwrap().starts_with(READY) {
                return daemon;
            }
        }
        panic!("the backend process exited before it was ready");
    }

    fn kill9(mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn pinned(guest: &SimGuest, gref: GrantRef) -> u16 {
    guest.grant_entry(gref).unwrap().flags & (GTF_READING | GTF_WRITING)
}

/// Connects `guest` to `socket`, retrying while the listener is not up yet.
fn attach(guest: &SimGuest, socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = guest.reattach(socket) {
        assert!(Instant::now() < deadline, "attach: {e}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_killed_backend_releases_its_pins_and_leaves_the_ports_unbound_and_the_guest_reattaches() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("sim.sock");
    let guest = SimGuest::new(GUEST, CONFIG).unwrap();
    let a = guest.grant_access(0, 1, false).unwrap();
    let b = guest.grant_access(0, 2, false).unwrap();
    // Granted to another domain and pinned by no one: not the backend's to release.
    let other = guest.grant_access(9, 3, false).unwrap();
    let mut channel = None;
    let daemon = Daemon::start(&socket, &[a, b], 1, || {
        attach(&guest, &socket);
        channel = Some(guest.alloc_event_channel(0).unwrap());
    });
    let channel = channel.unwrap();
    assert_eq!(channel.port(), 1);
    assert!(channel.wait(Duration::from_secs(5)).unwrap(), "the kick");
    let mut seen = [0u8; 16];
    guest.read_page(1, 0, &mut seen).unwrap();
    assert_eq!(&seen, b"from the backend");
    assert_eq!(pinned(&guest, a), GTF_READING | GTF_WRITING);
    assert!(guest.end_access(a).is_err(), "mapped by a live backend");
    assert!(guest.wait_backend_death(Duration::ZERO).is_none());

    daemon.kill9();
    let death = guest
        .wait_backend_death(Duration::from_secs(5))
        .expect("the death is noticed");
    assert_eq!(
        death,
        BackendDeath {
            pins_released: 2,
            ports_unbound: 1
        }
    );
    assert!(!guest.is_attached());
    assert_eq!(pinned(&guest, a), 0);
    assert_eq!(pinned(&guest, b), 0);
    // The guest keeps its memory; a notify into the unbound port is no error.
    guest.read_page(1, 0, &mut seen).unwrap();
    assert_eq!(&seen, b"from the backend");
    channel.notify().unwrap();
    guest.end_access(a).unwrap();
    let c = guest.grant_access(0, 4, true).unwrap();

    // A fresh backend process (here, a platform of this one) learns the domain from the
    // same handshake and binds the same port, whose lost kick does not reach it.
    let listener = {
        let _ = std::fs::remove_file(&socket);
        UnixListener::bind(&socket).unwrap()
    };
    let platform = SimPlatform::new();
    let guest = Arc::new(guest);
    let g = guest.clone();
    let s = socket.clone();
    let reattach = std::thread::spawn(move || g.reattach(&s));
    let handle = platform
        .accept_timeout(&listener, Duration::from_secs(5))
        .unwrap();
    reattach.join().unwrap().unwrap();
    assert!(guest.is_attached());
    assert_eq!(handle.domid(), GUEST);
    let bound = platform.bind_interdomain(GUEST, channel.port()).unwrap();
    assert!(!bound.ack().unwrap(), "a kick into an unbound port is lost");
    channel.notify().unwrap();
    assert!(wire::wait_readable(bound.fd(), Duration::from_secs(5)));
    assert!(bound.ack().unwrap());
    bound.notify().unwrap();
    assert!(channel.wait(Duration::from_secs(5)).unwrap());
    // Its maps pin afresh, and what it unmaps can be revoked.
    let m = platform.map(GUEST, &[b, c], Access::ReadOnly).unwrap();
    assert_eq!(pinned(&guest, b), GTF_READING);
    assert!(guest.end_access(b).is_err());
    drop(m);
    guest.end_access(b).unwrap();
    guest.end_access(c).unwrap();
    assert_eq!(pinned(&guest, other), 0);
    guest.end_access(other).unwrap();
    assert_eq!(guest.end_access_failures(), 2);
}

#[test]
fn the_reattacher_follows_successive_backend_processes() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("sim.sock");
    let guest = Arc::new(SimGuest::new(GUEST, CONFIG).unwrap());
    let a = guest.grant_access(0, 1, false).unwrap();
    let mut channel = None;
    let first = Daemon::start(&socket, &[a], 1, || {
        attach(&guest, &socket);
        channel = Some(guest.alloc_event_channel(0).unwrap());
    });
    let channel = channel.unwrap();
    assert!(channel.wait(Duration::from_secs(5)).unwrap());
    let reattacher = Reattacher::spawn(&guest, socket.clone()).unwrap();
    let stats = reattacher.stats().clone();
    let wait_for = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let mut current = first;
    for round in 1..=2u64 {
        current.kill9();
        wait_for("death noticed", &|| stats.deaths() == round);
        assert_eq!(pinned(&guest, a), 0, "round {round}");
        current = Daemon::start(&socket, &[a], 1, || {});
        assert!(
            channel.wait(Duration::from_secs(5)).unwrap(),
            "round {round}: the next process's kick on the same port"
        );
        assert_eq!(stats.reattaches(), round);
        assert_eq!(pinned(&guest, a), GTF_READING | GTF_WRITING);
    }
    current.kill9();
    wait_for("last death", &|| stats.deaths() == 3);
    assert_eq!(stats.pins_released(), 3);
    assert!(stats.longest_outage() > Duration::ZERO);
    drop(reattacher);
    guest.end_access(a).unwrap();
}
