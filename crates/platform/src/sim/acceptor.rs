//! Accepting simulated guests on a listening socket without waiting on any one of them.
//!
//! Anyone who can reach the socket can connect and then say nothing, send garbage or stop
//! half way through a hello. Reading each peer's hello in turn would let every such
//! connection stall the guests behind it for the whole handshake timeout (and a guest's
//! own wait for its welcome is that long too, so one silent peer ahead of it is enough to
//! fail its attach). So [`SimAcceptor`] is a poll loop: the listening socket and every
//! connection still owing its hello, each with its own deadline, read only as far as
//! they have sent. A hello that arrives is handed back at once ([`GuestHello`]) for
//! [`SimPlatform::attach_hello`](super::SimPlatform::attach_hello).
//!
//! A flood of connections costs a bounded amount: at most `max_pending` connections
//! wait for their hello, each holding its socket and at most the 3 descriptors of a hello.
//! Beyond that the acceptor closes one, choosing the oldest of the peer process that has
//! the most waiting (`SO_PEERCRED`): a flooding process only ever evicts its own
//! connections, and an honest guest, with one connection, is evicted only if every
//! waiting connection comes from a different process. No thread per connection.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags};

use super::wire::{self, PartialMsg, Progress};
use super::HANDSHAKE_TIMEOUT;
use crate::DomId;

/// Connections the daemon lets wait for their hello at once.
pub const MAX_PENDING_HANDSHAKES: usize = 64;
/// Connections taken off the listening socket per turn, so that during a flood the
/// connections already waiting still get read every turn.
const ACCEPT_BURST: usize = 32;
/// How long accepting pauses after `accept` failed for want of resources (`EMFILE`): the
/// listening socket stays readable, and polling it again at once would spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Connections dropped before their hello are logged as a sum, at most this often: one
/// line per connection would let a flood fill the log.
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// A connection whose hello arrived (read, not yet validated): attach it with
/// [`SimPlatform::attach_hello`](super::SimPlatform::attach_hello).
#[derive(Debug)]
pub struct GuestHello {
    pub(crate) stream: UnixStream,
    pub(crate) hello: wire::Msg,
    pub(crate) fds: Vec<OwnedFd>,
    peer_pid: Option<i32>,
}

impl GuestHello {
    /// The domain id the guest claims (checked by the attach).
    pub fn domid(&self) -> Option<DomId> {
        match self.hello {
            wire::Msg::Hello { domid, .. } => Some(domid),
            _ => None,
        }
    }

    /// The process that connected, as the kernel saw it at `connect`.
    pub fn peer_pid(&self) -> Option<i32> {
        self.peer_pid
    }
}

/// What the acceptor did since it started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AcceptorStats {
    /// Connections taken off the listening socket.
    pub accepted: u64,
    /// Hellos handed back by [`SimAcceptor::poll`].
    pub hellos: u64,
    /// Connections closed for saying no hello within the handshake timeout.
    pub timed_out: u64,
    /// Connections closed to make room for newer ones.
    pub evicted: u64,
    /// Connections closed for breaking the protocol or hanging up before their hello.
    pub broken: u64,
}

#[derive(Debug)]
struct Pending {
    stream: UnixStream,
    partial: PartialMsg,
    deadline: Instant,
    peer_pid: Option<i32>,
    /// Accept order: lower is older.
    seq: u64,
}

enum Step {
    Wait(Pending),
    Hello(GuestHello),
    Drop(Option<i32>, String),
}

/// Reads what `p` has sent; never waits.
fn step(mut p: Pending) -> Step {
    match p.partial.read_available(&p.stream) {
        Ok(Progress::Pending) => Step::Wait(p),
        Ok(Progress::Msg(hello @ wire::Msg::Hello { .. }, fds)) => Step::Hello(GuestHello {
            stream: p.stream,
            hello,
            fds,
            peer_pid: p.peer_pid,
        }),
        Ok(Progress::Msg(other, _)) => {
            Step::Drop(p.peer_pid, format!("expected hello, got {other:?}"))
        }
        Ok(Progress::Eof) => Step::Drop(p.peer_pid, "hung up before its hello".into()),
        Err(e) => Step::Drop(p.peer_pid, e),
    }
}

/// Which waiting connection to close to make room: the oldest of the peer process with
/// the most connections waiting (among equals, the one whose oldest is oldest).
fn eviction_victim(peers: impl Iterator<Item = (Option<i32>, u64)> + Clone) -> Option<u64> {
    let mut per_pid: HashMap<Option<i32>, usize> = HashMap::new();
    for (pid, _) in peers.clone() {
        *per_pid.entry(pid).or_default() += 1;
    }
    let most = per_pid.values().copied().max()?;
    peers
        .filter(|(pid, _)| per_pid[pid] == most)
        .map(|(_, seq)| seq)
        .min()
}

/// The acceptor of the simulator socket; see the module documentation.
#[derive(Debug)]
pub struct SimAcceptor {
    listener: UnixListener,
    pending: Vec<Pending>,
    max_pending: usize,
    handshake_timeout: Duration,
    next_seq: u64,
    accept_paused_until: Option<Instant>,
    stats: AcceptorStats,
    reported: AcceptorStats,
    last_report: Option<Instant>,
}

impl SimAcceptor {
    /// An acceptor with the daemon's limits: [`MAX_PENDING_HANDSHAKES`] and
    /// [`HANDSHAKE_TIMEOUT`].
    pub fn new(listener: UnixListener) -> io::Result<Self> {
        Self::with_limits(listener, MAX_PENDING_HANDSHAKES, HANDSHAKE_TIMEOUT)
    }

    /// An acceptor letting at most `max_pending` (at least 1) connections wait, each up
    /// to `handshake_timeout` for its hello.
    pub fn with_limits(
        listener: UnixListener,
        max_pending: usize,
        handshake_timeout: Duration,
    ) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener,
            pending: Vec::new(),
            max_pending: max_pending.max(1),
            handshake_timeout,
            next_seq: 0,
            accept_paused_until: None,
            stats: AcceptorStats::default(),
            reported: AcceptorStats::default(),
            last_report: None,
        })
    }

    /// Connections waiting for their hello.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    pub fn stats(&self) -> AcceptorStats {
        self.stats
    }

    /// Waits up to `timeout` for connections and hellos (less if a waiting connection's
    /// deadline comes first), then accepts, reads and times out what is due. Returns the
    /// hellos that arrived, in no particular order; usually empty.
    pub fn poll(&mut self, timeout: Duration) -> Vec<GuestHello> {
        let now = Instant::now();
        let mut wait = timeout;
        for p in &self.pending {
            wait = wait.min(p.deadline.saturating_duration_since(now));
        }
        let listening = match self.accept_paused_until {
            Some(until) if until > now => {
                wait = wait.min(until - now);
                false
            }
            _ => {
                self.accept_paused_until = None;
                true
            }
        };
        let (listener_ready, peers_ready) = self.wait_ready(listening, wait);

        let mut hellos = Vec::new();
        // Waiting connections first, so a newcomer cannot evict one whose hello is in.
        let pending = std::mem::take(&mut self.pending);
        for (p, ready) in pending.into_iter().zip(peers_ready) {
            if ready {
                self.settle(step(p), &mut hellos);
            } else {
                self.pending.push(p);
            }
        }
        let now = Instant::now();
        let stats = &mut self.stats;
        self.pending.retain(|p| {
            if p.deadline > now {
                return true;
            }
            stats.timed_out += 1;
            tracing::debug!(peer_pid = ?p.peer_pid, "simulated guest said no hello within the handshake timeout");
            false
        });
        if listener_ready {
            self.accept_burst(&mut hellos);
        }
        self.report();
        hellos
    }

    /// Polls the listening socket (if `listening`) and every waiting connection; returns
    /// which are readable (or hung up).
    fn wait_ready(&self, listening: bool, wait: Duration) -> (bool, Vec<bool>) {
        let mut fds = Vec::with_capacity(self.pending.len() + 1);
        fds.push(PollFd::new(&self.listener, PollFlags::IN));
        fds.extend(
            self.pending
                .iter()
                .map(|p| PollFd::new(&p.stream, PollFlags::IN)),
        );
        let watched = if listening {
            &mut fds[..]
        } else {
            &mut fds[1..]
        };
        let ts = wire::timespec(wait);
        match poll(watched, Some(&ts)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                // Not seen in practice (poll fails only for bad arguments or ENOMEM);
                // sleep the wait out so a persistent failure cannot spin.
                tracing::warn!(error = %e, "poll on the simulator socket failed");
                std::thread::sleep(wait);
            }
        }
        let ready = |f: &PollFd<'_>| !f.revents().is_empty();
        let listener_ready = listening && ready(&fds[0]);
        (listener_ready, fds[1..].iter().map(ready).collect())
    }

    fn settle(&mut self, step: Step, hellos: &mut Vec<GuestHello>) {
        match step {
            Step::Wait(p) => self.pending.push(p),
            Step::Hello(h) => {
                self.stats.hellos += 1;
                hellos.push(h);
            }
            Step::Drop(peer_pid, why) => {
                self.stats.broken += 1;
                tracing::debug!(?peer_pid, %why, "dropped a simulated-guest connection");
            }
        }
    }

    fn accept_burst(&mut self, hellos: &mut Vec<GuestHello>) {
        for _ in 0..ACCEPT_BURST {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // A peer that gave up while queued, or a signal: try the next.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept on the simulator socket failed; pausing");
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_RETRY);
                    return;
                }
            };
            self.stats.accepted += 1;
            if let Err(e) = stream.set_nonblocking(true) {
                tracing::warn!(error = %e, "simulator socket: set_nonblocking");
                continue;
            }
            let peer_pid = rustix::net::sockopt::socket_peercred(&stream)
                .ok()
                .map(|c| c.pid.as_raw_pid());
            let seq = self.next_seq;
            self.next_seq += 1;
            let p = Pending {
                stream,
                partial: PartialMsg::default(),
                deadline: Instant::now() + self.handshake_timeout,
                peer_pid,
                seq,
            };
            // A guest sends its hello right after connecting: it is usually here already.
            self.settle(step(p), hellos);
            while self.pending.len() > self.max_pending {
                self.evict();
            }
        }
    }

    fn evict(&mut self) {
        let victim = eviction_victim(self.pending.iter().map(|p| (p.peer_pid, p.seq)));
        if let Some(pos) = self.pending.iter().position(|p| Some(p.seq) == victim) {
            let p = self.pending.swap_remove(pos);
            self.stats.evicted += 1;
            tracing::debug!(peer_pid = ?p.peer_pid, "closed a waiting simulated-guest connection to make room");
        }
    }

    /// Sums up the connections dropped since the last report, at most every
    /// [`REPORT_EVERY`].
    fn report(&mut self) {
        if self
            .last_report
            .is_some_and(|at| at.elapsed() < REPORT_EVERY)
        {
            return;
        }
        let (s, r) = (self.stats, self.reported);
        let (timed_out, evicted, broken) = (
            s.timed_out - r.timed_out,
            s.evicted - r.evicted,
            s.broken - r.broken,
        );
        if timed_out + evicted + broken == 0 {
            return;
        }
        tracing::warn!(
            timed_out,
            evicted,
            broken,
            waiting = self.pending.len(),
            "simulator socket: closed connections that did not complete a handshake"
        );
        self.reported = s;
        self.last_report = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::path::{Path, PathBuf};
    use std::thread;

    use super::*;
    use crate::sim::{GuestConfig, SimGuest, SimPlatform};

    const CONFIG: GuestConfig = GuestConfig {
        pages: 4,
        grant_entries: 64,
    };

    fn listen(dir: &Path, max_pending: usize, timeout: Duration) -> (PathBuf, SimAcceptor) {
        let sock = dir.join("sim.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let acceptor = SimAcceptor::with_limits(listener, max_pending, timeout).unwrap();
        (sock, acceptor)
    }

    fn hello_bytes(domid: DomId) -> [u8; wire::MSG_LEN] {
        wire::Msg::Hello {
            version: wire::VERSION,
            domid,
            nr_frames: CONFIG.pages,
            nr_entries: CONFIG.grant_entries,
        }
        .encode()
    }

    /// Whether the acceptor closed `s` (EOF within a second).
    fn closed_by_acceptor(mut s: &UnixStream) -> bool {
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut b = [0u8; 1];
        matches!(s.read(&mut b), Ok(0))
    }

    /// Polls until one hello arrives; fails after `limit`.
    fn next_hello(acceptor: &mut SimAcceptor, limit: Duration) -> GuestHello {
        let start = Instant::now();
        loop {
            assert!(start.elapsed() < limit, "no hello within {limit:?}");
            if let Some(h) = acceptor.poll(Duration::from_millis(50)).pop() {
                return h;
            }
        }
    }

    #[test]
    fn a_guest_behind_silent_and_hostile_peers_attaches_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (sock, mut acceptor) = listen(dir.path(), 8, HANDSHAKE_TIMEOUT);
        let hostile: Vec<UnixStream> = (0..21)
            .map(|i| {
                let mut s = UnixStream::connect(&sock).unwrap();
                match i % 3 {
                    0 => {}
                    1 => s.write_all(&hello_bytes(9)[..16]).unwrap(),
                    _ => s.write_all(&[0xa5; 32]).unwrap(),
                }
                s
            })
            .collect();
        let start = Instant::now();
        let guest = thread::spawn(move || SimGuest::connect(sock, 7, CONFIG));
        let hello = next_hello(&mut acceptor, Duration::from_secs(3));
        assert_eq!(hello.domid(), Some(7));
        assert_eq!(hello.peer_pid(), Some(std::process::id() as i32));
        let platform = SimPlatform::new();
        let handle = platform.attach_hello(hello).unwrap();
        let guest = guest.join().unwrap().unwrap();
        let took = start.elapsed();
        // Read in turn, each of the 14 silent or half-spoken peers ahead of it would have
        // cost the guest the 5 s handshake timeout.
        assert!(took < Duration::from_secs(1), "{took:?}");
        assert_eq!(handle.domid(), 7);
        assert_eq!(guest.backend_domid(), Some(0));
        let stats = acceptor.stats();
        assert_eq!(stats.accepted, 22, "{stats:?}");
        assert_eq!(stats.hellos, 1, "{stats:?}");
        assert_eq!(stats.broken, 7, "{stats:?}");
        // 14 peers wait (the guest too, if it was accepted before it spoke): room for 8.
        assert!(stats.evicted >= 14 - 8, "{stats:?}");
        assert_eq!(
            usize::try_from(stats.evicted).unwrap() + acceptor.pending(),
            14,
            "{stats:?}"
        );
        // Garbage and the oldest waiting peers are closed; the newest still wait.
        assert!(closed_by_acceptor(&hostile[0]));
        assert!(closed_by_acceptor(&hostile[2]));
        assert!(!closed_by_acceptor(&hostile[19]));
    }

    #[test]
    fn a_peer_without_hello_is_closed_at_its_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let timeout = Duration::from_millis(200);
        let (sock, mut acceptor) = listen(dir.path(), 8, timeout);
        let silent = UnixStream::connect(&sock).unwrap();
        let mut half = UnixStream::connect(&sock).unwrap();
        half.write_all(&hello_bytes(9)[..16]).unwrap();
        let start = Instant::now();
        while acceptor.stats().timed_out < 2 {
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "{:?}",
                acceptor.stats()
            );
            // Longer than the deadlines: the acceptor must wake for them by itself.
            assert!(acceptor.poll(Duration::from_secs(10)).is_empty());
        }
        let took = start.elapsed();
        assert!(took >= timeout && took < timeout * 4, "{took:?}");
        assert_eq!(acceptor.pending(), 0);
        assert!(closed_by_acceptor(&silent));
        assert!(closed_by_acceptor(&half));
    }

    #[test]
    fn a_hello_in_pieces_is_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let (sock, mut acceptor) = listen(dir.path(), 8, HANDSHAKE_TIMEOUT);
        let guest = SimGuest::new(5, CONFIG).unwrap();
        let s = UnixStream::connect(&sock).unwrap();
        let bytes = hello_bytes(5);
        wire::send_piece(
            &s,
            &bytes[..10],
            &[
                guest.memory_fd_for_test(),
                guest.table_fd_for_test(),
                guest.liveness_fd_for_test(),
            ],
        );
        assert!(acceptor.poll(Duration::from_millis(100)).is_empty());
        assert_eq!(acceptor.pending(), 1);
        wire::send_piece(&s, &bytes[10..], &[]);
        let hello = next_hello(&mut acceptor, Duration::from_secs(2));
        let platform = SimPlatform::new();
        let handle = platform.attach_hello(hello).unwrap();
        assert_eq!(handle.domid(), 5);
        match wire::recv(&s).unwrap() {
            wire::Recv::Msg(wire::Msg::Welcome { status: 0, .. }, _) => {}
            other => panic!("{other:?}"),
        }
        assert!(handle.is_alive());
    }

    #[test]
    fn a_wrong_first_message_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (sock, mut acceptor) = listen(dir.path(), 8, HANDSHAKE_TIMEOUT);
        let s = UnixStream::connect(&sock).unwrap();
        wire::send(&s, wire::Msg::PortClose { port: 1 }, &[]).unwrap();
        let start = Instant::now();
        while acceptor.stats().broken == 0 {
            assert!(start.elapsed() < Duration::from_secs(2));
            assert!(acceptor.poll(Duration::from_millis(50)).is_empty());
        }
        assert_eq!(acceptor.pending(), 0);
        assert!(closed_by_acceptor(&s));
    }

    #[test]
    fn eviction_takes_the_oldest_of_the_biggest_peer() {
        let peers = [
            (Some(10), 0),
            (Some(20), 1),
            (Some(20), 2),
            (Some(30), 3),
            (Some(20), 4),
        ];
        assert_eq!(eviction_victim(peers.iter().copied()), Some(1));
        // Equals: the oldest connection among the biggest.
        let peers = [(Some(10), 5), (Some(20), 1), (Some(10), 2), (Some(20), 3)];
        assert_eq!(eviction_victim(peers.iter().copied()), Some(1));
        // Unknown peers count as one peer.
        let peers = [(None, 7), (Some(1), 0), (None, 8)];
        assert_eq!(eviction_victim(peers.iter().copied()), Some(7));
        assert_eq!(eviction_victim(std::iter::empty()), None);
    }
}
