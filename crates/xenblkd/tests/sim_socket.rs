//! The simulator socket under a connection flood (issue 11, item 6): a hostile local
//! process keeps opening connections that never say hello, send garbage or stop half way
//! through a hello, for 10 s, while honest guests attach and do verified I/O. Their
//! attach must stay prompt (the acceptor once ran each handshake inline, so every
//! silent connection ahead of a guest cost it 5 s and its attach timed out), and the
//! daemon must not spend a descriptor or a thread per flooding connection.

mod common;

use std::collections::VecDeque;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use common::{disk, Guest, Host};
use xenbus::toolstack::Removal;

const FLOOD: Duration = Duration::from_secs(10);
/// Far under the 5 s one silent connection used to cost a guest queued behind it.
const PROMPT_ATTACH: Duration = Duration::from_secs(2);

/// The first 16 bytes of a well-formed hello (magic "XSIM", kind 1, version 1, domid 9):
/// a peer that then goes quiet leaves the backend holding half a message.
const HALF_HELLO: [u8; 16] = [b'X', b'S', b'I', b'M', 1, 0, 0, 0, 1, 0, 0, 0, 9, 0, 0, 0];

#[derive(Debug, Default)]
struct FloodCount {
    connections: u64,
    refused: u64,
}

/// The flooding guest: a stream of short-lived connections (silent, garbage, half a hello,
/// one byte) and, beside it, connections held silent or half-spoken for 6 s, longer than
/// the handshake timeout, renewed as they age out.
fn flood(socket: PathBuf, until: Instant) -> FloodCount {
    let mut count = FloodCount::default();
    let mut short_lived: VecDeque<UnixStream> = VecDeque::new();
    let mut held: VecDeque<(Instant, UnixStream)> = VecDeque::new();
    let mut last_held = Instant::now() - Duration::from_secs(1);
    while Instant::now() < until {
        if let Some(s) = open(&socket, &mut count) {
            let kind = count.connections % 4;
            let _ = match kind {
                0 => (&s).write_all(&[0xa5; 32]),
                1 => (&s).write_all(&HALF_HELLO),
                2 => (&s).write_all(b"X"),
                _ => Ok(()),
            };
            short_lived.push_back(s);
            if short_lived.len() > 16 {
                short_lived.pop_front();
            }
        }
        if last_held.elapsed() >= Duration::from_millis(40) {
            last_held = Instant::now();
            if let Some(s) = open(&socket, &mut count) {
                if count.connections % 3 == 0 {
                    let _ = (&s).write_all(&HALF_HELLO);
                }
                held.push_back((Instant::now(), s));
            }
        }
        while held
            .front()
            .is_some_and(|(at, _)| at.elapsed() > Duration::from_secs(6))
        {
            held.pop_front();
        }
        thread::sleep(Duration::from_millis(2));
    }
    count
}

fn open(socket: &Path, count: &mut FloodCount) -> Option<UnixStream> {
    match UnixStream::connect(socket) {
        Ok(s) => {
            count.connections += 1;
            Some(s)
        }
        Err(_) => {
            count.refused += 1;
            None
        }
    }
}

/// Waits for the guest's `ok attach ms=N` and returns N.
fn attach_time(g: &mut Guest) -> Duration {
    let line = g.expect("ok attach");
    let ms = line
        .strip_prefix("ok attach ms=")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected attach line {line:?}"));
    Duration::from_millis(ms)
}

#[test]
fn silent_connections_do_not_block_honest_guests() {
    let host = Host::start(&[]);
    host.create_domain(1);
    host.create_domain(2);
    let busy = disk("xenblkd", 1, 51712, &host.image("busy.img", 32));
    let late = disk("xenblkd", 2, 51712, &host.image("late.img", 32));
    host.attach(&busy);
    host.attach(&late);
    let fds_before = host.metric("open_fds");
    let threads_before = host.metric("threads");

    let start = Instant::now();
    let flooder = thread::spawn({
        let socket = host.sim_socket.clone();
        move || flood(socket, start + FLOOD)
    });
    // Let silent connections pile up ahead of the first honest guest.
    thread::sleep(Duration::from_millis(500));
    let mut busy_guest = host.guest(1, 51712, &[], "connect,loop");
    let busy_attach = attach_time(&mut busy_guest);
    println!("attach under the flood: {busy_attach:?}");
    busy_guest.expect("ok connect");
    busy_guest.expect("progress");

    // Past the handshake timeout of the first held connections: the backend is now
    // timing peers out while the flood goes on.
    thread::sleep(Duration::from_secs(5).saturating_sub(start.elapsed()));
    let mut max_fds = 0;
    let mut max_threads = 0;
    let mut late_guest = host.guest(2, 51712, &[], "connect,io:32,close");
    let late_attach = attach_time(&mut late_guest);
    println!("attach 5 s into the flood: {late_attach:?}");
    late_guest.expect("ok io");
    while start.elapsed() < FLOOD - Duration::from_millis(500) {
        max_fds = max_fds.max(host.metric("open_fds"));
        max_threads = max_threads.max(host.metric("threads"));
        thread::sleep(Duration::from_millis(200));
    }
    let late_seen = late_guest.finish();
    assert!(
        late_seen.iter().any(|l| l.starts_with("ok close")),
        "{late_seen:?}"
    );
    let count = flooder.join().unwrap();
    println!(
        "flood: {} connections ({} connect failures); daemon peaked at {max_fds} fds \
         (from {fds_before}) and {max_threads} threads (from {threads_before})",
        count.connections, count.refused
    );
    assert!(count.connections > 1000, "{count:?}");

    assert!(
        busy_attach < PROMPT_ATTACH,
        "attach took {busy_attach:?} under the flood\n{}",
        host.log()
    );
    assert!(
        late_attach < PROMPT_ATTACH,
        "attach took {late_attach:?} under the flood"
    );
    // The flood (150 connections open at a time) costs the daemon a bounded number of
    // descriptors, the handshakes it lets wait, and no threads. The margins are the two
    // honest guests' VBDs: their descriptors, and the io_uring workers the kernel starts
    // as threads of the daemon.
    assert!(
        max_fds < fds_before + platform::sim::MAX_PENDING_HANDSHAKES as u64 + 48,
        "{max_fds} fds (from {fds_before})"
    );
    assert!(
        max_threads < threads_before + 24,
        "{max_threads} threads (from {threads_before})"
    );

    // The busy guest's verified I/O ran through the whole flood.
    assert_eq!(host.detach(&busy), Removal::Clean);
    let seen = busy_guest.finish();
    let last = seen
        .iter()
        .find(|l| l.starts_with("ok loop"))
        .unwrap_or_else(|| panic!("{seen:?}"));
    let rounds: u64 = last
        .split_whitespace()
        .nth(3)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{last}"));
    assert!(rounds > 0, "{last}");
    assert!(!last.contains("mismatch"), "{last}");
    assert_eq!(host.detach(&late), Removal::Clean);
}
