//! No descriptor or mapping leaks through a whole simulator life cycle, failures
//! included. Alone in its binary: /proc/self/fd is process-wide, so no other test may
//! run concurrently.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use platform::sim::{GuestConfig, SimAcceptor, SimGuest, SimPlatform};
use platform::{Access, EventChannelBinder, GrantCopyOp, GrantMapper, PAGE_SIZE};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count()
}

fn life_cycle(dir: &std::path::Path, round: u32) {
    let platform = SimPlatform::new();
    // A local guest and a guest attached over a listening socket (as another process
    // would, here from a thread).
    let local = SimGuest::new(
        3,
        GuestConfig {
            pages: 16,
            grant_entries: 64,
        },
    )
    .unwrap();
    let h_local = platform.attach_local(&local).unwrap();
    let sock = dir.join(format!("g{round}.sock"));
    let listener = UnixListener::bind(&sock).unwrap();
    let remote = std::thread::spawn({
        let sock = sock.clone();
        move || {
            SimGuest::connect(
                sock,
                4,
                GuestConfig {
                    pages: 8,
                    grant_entries: 32,
                },
            )
            .unwrap()
        }
    });
    let h_remote = platform
        .accept_timeout(&listener, Duration::from_secs(5))
        .unwrap();
    let remote = remote.join().unwrap();
    drop(listener);
    std::fs::remove_file(&sock).unwrap();

    for (guest, domid) in [(&local, 3), (&remote, 4)] {
        let a = guest.grant_access(0, 1, false).unwrap();
        let b = guest.grant_access(0, 2, true).unwrap();
        let m = platform.map(domid, &[a, b], Access::ReadOnly).unwrap();
        let each = platform.map_each(domid, &[a, b], Access::ReadOnly).unwrap();
        assert!(platform.map(domid, &[a, b], Access::ReadWrite).is_err());
        assert!(platform.map(domid, &[a, 30], Access::ReadOnly).is_err());
        let mut buf = [0u8; 64];
        let mut ops = [
            GrantCopyOp::from_guest(domid, b, 0, &mut buf),
            GrantCopyOp::to_guest(domid, a, PAGE_SIZE as u16 - 8, b"12345678"),
        ];
        platform.copy(&mut ops).unwrap();
        assert!(ops.iter().all(|o| o.status().is_ok()));
        let gch = guest.alloc_event_channel(0).unwrap();
        let ch = platform.bind_interdomain(domid, gch.port()).unwrap();
        assert!(platform.bind_interdomain(domid, gch.port()).is_err());
        gch.notify().unwrap();
        assert!(ch.ack().unwrap());
        ch.notify().unwrap();
        assert!(gch.wait(Duration::from_secs(1)).unwrap());
        drop((m, each, ch, gch));
        guest.end_access(a).unwrap();
        guest.end_access(b).unwrap();
    }
    assert_eq!(platform.live_mappings(), 0);
    drop(local);
    assert!(h_local.wait_for_exit(Duration::from_secs(1)));
    drop(remote);
    assert!(h_remote.wait_for_exit(Duration::from_secs(1)));
    drop((h_local, h_remote));
    platform.detach(3).unwrap();
    platform.detach(4).unwrap();
}

fn send_with_fds(s: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    let sent = rustix::net::sendmsg(
        s,
        &[std::io::IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .unwrap();
    assert_eq!(sent, bytes.len());
}

/// A guest attached through a [`SimAcceptor`] amid peers that stay silent, send garbage,
/// stop half way through a hello (descriptors attached) or are evicted for room; the
/// waiting ones time out. Everything the acceptor held is closed.
fn acceptor_round(dir: &std::path::Path, round: u32) {
    let platform = SimPlatform::new();
    let sock = dir.join(format!("a{round}.sock"));
    let listener = UnixListener::bind(&sock).unwrap();
    let mut acceptor = SimAcceptor::with_limits(listener, 4, Duration::from_millis(100)).unwrap();
    let (pipe_r, pipe_w) = rustix::pipe::pipe().unwrap();
    let mut hostile = Vec::new();
    for i in 0..9 {
        let mut s = UnixStream::connect(&sock).unwrap();
        match i % 3 {
            0 => {}
            1 => s.write_all(&[0xa5; 32]).unwrap(),
            // The start of a message with descriptors attached, never finished.
            _ => send_with_fds(&s, b"XSIM\x01\x00", &[pipe_r.as_fd(), pipe_w.as_fd()]),
        }
        hostile.push(s);
    }
    let guest = std::thread::spawn({
        let sock = sock.clone();
        move || {
            SimGuest::connect(
                sock,
                4,
                GuestConfig {
                    pages: 8,
                    grant_entries: 32,
                },
            )
            .unwrap()
        }
    });
    let start = Instant::now();
    let handle = loop {
        assert!(start.elapsed() < Duration::from_secs(5), "no hello");
        if let Some(hello) = acceptor.poll(Duration::from_millis(20)).pop() {
            break platform.attach_hello(hello).unwrap();
        }
    };
    let guest = guest.join().unwrap();
    // The peers stay connected: the acceptor's deadlines close them.
    while acceptor.pending() > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "peers still waiting"
        );
        acceptor.poll(Duration::from_millis(20));
    }
    assert!(acceptor.stats().timed_out > 0, "{:?}", acceptor.stats());
    drop(hostile);
    drop(guest);
    assert!(handle.wait_for_exit(Duration::from_secs(1)));
    drop(handle);
    platform.detach(4).unwrap();
    drop(acceptor);
    std::fs::remove_file(&sock).unwrap();
}

#[test]
fn no_descriptor_or_mapping_leaks() {
    let dir = tempfile::tempdir().unwrap();
    // A first round warms up lazily initialised process state (thread stacks, tracing).
    life_cycle(dir.path(), 0);
    acceptor_round(dir.path(), 0);
    let fds = open_fds();
    let maps = mappings();
    for round in 1..=3 {
        life_cycle(dir.path(), round);
        acceptor_round(dir.path(), round);
    }
    assert_eq!(open_fds(), fds, "descriptors leaked");
    // Thread stacks may be cached by the allocator; grant and memfd mappings may not.
    let after = mappings();
    assert!(after <= maps + 2, "mappings leaked: {maps} -> {after}");
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let sim: Vec<_> = maps.lines().filter(|l| l.contains("xenblkd-sim")).collect();
    assert!(sim.is_empty(), "simulator memfds still mapped: {sim:#?}");
}
