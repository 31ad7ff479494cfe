//! Reactor threads: each owns any number of rings and runs them from one epoll loop.
//!
//! A reactor watches, in one epoll set, every file descriptor its rings hand it (the
//! ring's event channel and its storage queue's completion fd), a periodic 100 ms timer
//! (persistent-grant purge, resize check) and a control doorbell. Nothing on the
//! per-request path takes a lock: a ring is touched only by the thread that owns it. The
//! only shared structure is the control queue (a mutex-protected deque plus an eventfd),
//! used to add rings, remove the rings of a VBD, and shut down.
//!
//! Removal is a drain, as blkback's `xen_blkif_disconnect` waits for `inflight == 0`: the
//! ring stops consuming requests, keeps reaping completions until none is in flight,
//! then is dropped (which unmaps its grants and ring, unbinds its event channel and
//! closes its storage queue) and reported back on the channel given with the command.
//! The waiter bounds its own wait; the reactor keeps draining in the background.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::stats::Stats;
use crate::sys::{Doorbell, Events, Poller, Timer, Token};

/// Identifies a VBD inside one engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VbdId(pub u64);

/// How often a reactor runs housekeeping (blkback's `LRU_INTERVAL`).
pub(crate) const TICK: Duration = crate::persistent_grants::LRU_INTERVAL;

/// How long a shutting-down reactor waits for its rings' in-flight I/O before it drops
/// them anyway. Dropping is still safe then (the storage queue, dropped first, waits for
/// the kernel to finish with every operation before any mapping goes); this only bounds
/// how long shutdown waits for answers the frontend will never read.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A ring as seen by its reactor.
pub(crate) trait RingTask: Send {
    /// The VBD this ring belongs to.
    fn vbd(&self) -> VbdId;
    /// Index of the ring in its VBD.
    fn index(&self) -> usize;
    /// Every file descriptor whose readiness should run this ring; fixed for its lifetime.
    fn fds(&self) -> Vec<BorrowedFd<'_>>;
    /// `fds()[which]` became readable; called before [`run`](Self::run).
    fn ready(&mut self, which: usize);
    /// Does all the work that is possible now (reap, consume, submit, respond, notify).
    /// Returns how long the reactor should keep polling this ring for new requests
    /// before it sleeps ([`RingTask::has_requests`]); `None`: no reason to expect any.
    fn run(&mut self) -> Option<Duration>;
    /// Whether requests wait on the ring that [`run`](Self::run) would take now: checked
    /// without a system call while the reactor polls.
    fn has_requests(&self) -> bool {
        false
    }
    /// Periodic housekeeping, every [`TICK`].
    fn tick(&mut self, now: Instant);
    /// Stops consuming requests; in-flight ones still complete and get responses.
    fn close(&mut self);
    /// True once closed and nothing is in flight: the ring can be dropped.
    fn drained(&self) -> bool;
    /// Final statistics, reported on removal.
    fn stats(&self) -> Stats;
}

/// What a reactor reports when it has dropped a ring.
#[derive(Debug, Clone)]
pub(crate) struct RingClosed {
    pub(crate) vbd: VbdId,
    pub(crate) index: usize,
    pub(crate) stats: Stats,
}

pub(crate) enum Command {
    Add(Box<dyn RingTask>),
    RemoveVbd {
        vbd: VbdId,
        reply: mpsc::Sender<RingClosed>,
    },
    Shutdown,
}

struct Control {
    queue: Mutex<VecDeque<Command>>,
    doorbell: Doorbell,
}

/// The engine's handle on one reactor thread.
pub(crate) struct ReactorHandle {
    control: Arc<Control>,
    rings: Arc<AtomicUsize>,
    thread: Mutex<Option<JoinHandle<()>>>,
    id: usize,
}

impl ReactorHandle {
    pub(crate) fn spawn(id: usize) -> io::Result<Self> {
        let control = Arc::new(Control {
            queue: Mutex::new(VecDeque::new()),
            doorbell: Doorbell::new()?,
        });
        let rings = Arc::new(AtomicUsize::new(0));
        let mut reactor = Reactor::new(control.clone(), rings.clone())?;
        let thread = std::thread::Builder::new()
            .name(format!("xenblkd-reactor-{id}"))
            .spawn(move || reactor.run())?;
        Ok(Self {
            control,
            rings,
            thread: Mutex::new(Some(thread)),
            id,
        })
    }

    pub(crate) fn id(&self) -> usize {
        self.id
    }

    /// Rings currently owned (for placement).
    pub(crate) fn load(&self) -> usize {
        self.rings.load(Ordering::Relaxed)
    }

    pub(crate) fn send(&self, cmd: Command) -> io::Result<()> {
        if matches!(cmd, Command::Add(_)) {
            // Counted now so several rings attached back to back spread out.
            self.rings.fetch_add(1, Ordering::Relaxed);
        }
        self.control
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(cmd);
        self.control.doorbell.ring()
    }

    /// Asks the thread to stop (after draining its rings) and waits for it.
    pub(crate) fn shutdown(&self) {
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            if self.send(Command::Shutdown).is_ok() {
                if t.join().is_err() {
                    tracing::error!(reactor = self.id, "reactor thread panicked");
                }
            } else {
                tracing::error!(reactor = self.id, "cannot signal reactor; leaving it");
            }
        }
    }

    pub(crate) fn is_running(&self) -> bool {
        self.thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|t| !t.is_finished())
    }
}

impl Drop for ReactorHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

const TOKEN_CONTROL: Token = u64::MAX;
const TOKEN_TIMER: Token = u64::MAX - 1;
/// Low bits of a ring token hold the index of the fd in the ring's `fds()`.
const FD_BITS: u32 = 8;

struct Entry {
    task: Box<dyn RingTask>,
    /// Replies owed when the ring has drained.
    reply: Option<mpsc::Sender<RingClosed>>,
    closing: bool,
    dirty: bool,
}

struct Reactor {
    poller: Poller,
    timer: Timer,
    control: Arc<Control>,
    rings: Arc<AtomicUsize>,
    entries: Vec<Option<Entry>>,
    free_keys: Vec<usize>,
    ready: Vec<Token>,
    shutting_down: bool,
    shutdown_deadline: Option<Instant>,
}

impl Reactor {
    fn new(control: Arc<Control>, rings: Arc<AtomicUsize>) -> io::Result<Self> {
        let poller = Poller::new()?;
        let timer = Timer::periodic(TICK)?;
        poller.add(control.doorbell.as_fd(), TOKEN_CONTROL)?;
        poller.add(timer.as_fd(), TOKEN_TIMER)?;
        Ok(Self {
            poller,
            timer,
            control,
            rings,
            entries: Vec::new(),
            free_keys: Vec::new(),
            ready: Vec::with_capacity(256),
            shutting_down: false,
            shutdown_deadline: None,
        })
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            let mut ready = std::mem::take(&mut self.ready);
            ready.clear();
            if let Err(e) = self.poller.wait(&mut events, None, |t| ready.push(t)) {
                tracing::error!(error = %e, "epoll_wait failed; reactor stops");
                break;
            }
            let mut control = false;
            let mut tick = false;
            for &t in &ready {
                match t {
                    TOKEN_CONTROL => control = true,
                    TOKEN_TIMER => tick = true,
                    t => {
                        let key = (t >> FD_BITS) as usize;
                        let which = (t & ((1 << FD_BITS) - 1)) as usize;
                        if let Some(Some(e)) = self.entries.get_mut(key) {
                            e.task.ready(which);
                            e.dirty = true;
                        }
                    }
                }
            }
            self.ready = ready;
            let mut poll_until: Option<Instant> = None;
            let mut work = true;
            while work {
                let mut poll = Duration::ZERO;
                for e in self.entries.iter_mut().flatten() {
                    if std::mem::take(&mut e.dirty) {
                        if let Some(p) = e.task.run() {
                            poll = poll.max(p);
                        }
                    }
                }
                if !poll.is_zero() {
                    poll_until = Some(Instant::now() + poll);
                }
                // A ring that just answered a batch expects the frontend's next one soon:
                // look for it before paying a sleep and a wake-up.
                work = false;
                while let Some(until) = poll_until {
                    for e in self.entries.iter_mut().flatten() {
                        if !e.closing && e.task.has_requests() {
                            e.dirty = true;
                            work = true;
                        }
                    }
                    if work {
                        break;
                    }
                    if Instant::now() >= until {
                        poll_until = None;
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
            if tick {
                self.timer.drain();
                let now = Instant::now();
                for e in self.entries.iter_mut().flatten() {
                    e.task.tick(now);
                }
            }
            if control {
                self.control.doorbell.drain();
                self.handle_control();
            }
            self.reap_drained();
            if self.shutting_down && self.entries.iter().all(Option::is_none) {
                break;
            }
            if self.shutdown_deadline.is_some_and(|d| Instant::now() >= d) {
                tracing::error!(
                    rings = self.entries.iter().flatten().count(),
                    "rings still have I/O in flight at the shutdown deadline; dropping them"
                );
                break;
            }
        }
        // Whatever is left (a failed epoll) is dropped here, which still unmaps and closes.
        for key in 0..self.entries.len() {
            self.remove(key);
        }
    }

    fn handle_control(&mut self) {
        loop {
            let cmd = self
                .control
                .queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front();
            let Some(cmd) = cmd else { break };
            match cmd {
                Command::Add(task) => self.add(task),
                Command::RemoveVbd { vbd, reply } => {
                    for e in self.entries.iter_mut().flatten() {
                        if e.task.vbd() == vbd && !e.closing {
                            e.closing = true;
                            e.reply = Some(reply.clone());
                            e.task.close();
                        }
                    }
                }
                Command::Shutdown => {
                    self.shutting_down = true;
                    self.shutdown_deadline = Some(Instant::now() + SHUTDOWN_GRACE);
                    for e in self.entries.iter_mut().flatten() {
                        if !e.closing {
                            e.closing = true;
                            e.task.close();
                        }
                    }
                }
            }
        }
    }

    fn add(&mut self, task: Box<dyn RingTask>) {
        let key = self.free_keys.pop().unwrap_or_else(|| {
            self.entries.push(None);
            self.entries.len() - 1
        });
        let mut registered = Ok(());
        for (i, fd) in task.fds().into_iter().enumerate() {
            let token = ((key as u64) << FD_BITS) | i as u64;
            if i >= (1 << FD_BITS) {
                registered = Err(io::Error::other("too many fds for one ring"));
            }
            registered = registered.and_then(|()| self.poller.add(fd, token));
        }
        let closing = self.shutting_down;
        let mut entry = Entry {
            task,
            reply: None,
            closing,
            dirty: true,
        };
        if let Err(e) = registered {
            tracing::error!(error = %e, "cannot watch a ring's fds; closing it");
            entry.closing = true;
        }
        if entry.closing {
            entry.task.close();
        }
        tracing::debug!(
            vbd = entry.task.vbd().0,
            ring = entry.task.index(),
            "ring added"
        );
        self.entries[key] = Some(entry);
    }

    fn reap_drained(&mut self) {
        for key in 0..self.entries.len() {
            let done = matches!(&self.entries[key], Some(e) if e.closing && e.task.drained());
            if done {
                self.remove(key);
            }
        }
    }

    fn remove(&mut self, key: usize) {
        let Some(entry) = self.entries[key].take() else {
            return;
        };
        for fd in entry.task.fds() {
            // The fd may already be gone from the set if registration failed half way.
            let _ = self.poller.delete(fd);
        }
        let closed = RingClosed {
            vbd: entry.task.vbd(),
            index: entry.task.index(),
            stats: entry.task.stats(),
        };
        drop(entry.task);
        self.free_keys.push(key);
        self.rings.fetch_sub(1, Ordering::Relaxed);
        tracing::debug!(vbd = closed.vbd.0, ring = closed.index, "ring removed");
        if let Some(reply) = entry.reply {
            // The waiter may have given up (bounded wait); nothing to do then.
            let _ = reply.send(closed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// A ring stand-in: an eventfd to wake it, a counter of runs, and a number of
    /// "in-flight" operations that complete one per tick once closed.
    struct FakeRing {
        vbd: VbdId,
        kick: Doorbell,
        runs: Arc<AtomicUsize>,
        in_flight: usize,
        closed: bool,
        dropped: Arc<AtomicBool>,
    }

    impl RingTask for FakeRing {
        fn vbd(&self) -> VbdId {
            self.vbd
        }
        fn index(&self) -> usize {
            0
        }
        fn fds(&self) -> Vec<BorrowedFd<'_>> {
            vec![self.kick.as_fd()]
        }
        fn ready(&mut self, which: usize) {
            assert_eq!(which, 0);
            self.kick.drain();
        }
        fn run(&mut self) -> Option<Duration> {
            self.runs.fetch_add(1, Ordering::SeqCst);
            None
        }
        fn tick(&mut self, _now: Instant) {
            if self.closed && self.in_flight > 0 {
                self.in_flight -= 1;
            }
        }
        fn close(&mut self) {
            self.closed = true;
        }
        fn drained(&self) -> bool {
            self.closed && self.in_flight == 0
        }
        fn stats(&self) -> Stats {
            Stats::default()
        }
    }

    impl Drop for FakeRing {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::SeqCst);
        }
    }

    fn wait_for(mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn add_wake_drain_remove_and_shutdown() {
        let r = ReactorHandle::spawn(0).unwrap();
        let runs = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicBool::new(false));
        let kick = Doorbell::new().unwrap();
        // A second handle on the same eventfd to poke the ring from the test.
        let poke = kick.fd_clone_for_tests();
        r.send(Command::Add(Box::new(FakeRing {
            vbd: VbdId(1),
            kick,
            runs: runs.clone(),
            in_flight: 2,
            closed: false,
            dropped: dropped.clone(),
        })))
        .unwrap();
        assert_eq!(r.load(), 1);
        wait_for(|| runs.load(Ordering::SeqCst) >= 1);
        let before = runs.load(Ordering::SeqCst);
        poke.ring().unwrap();
        wait_for(|| runs.load(Ordering::SeqCst) > before);

        let (tx, rx) = mpsc::channel();
        r.send(Command::RemoveVbd {
            vbd: VbdId(1),
            reply: tx,
        })
        .unwrap();
        let closed = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(closed.vbd, VbdId(1));
        assert!(dropped.load(Ordering::SeqCst));
        wait_for(|| r.load() == 0);
        assert!(r.is_running());
        r.shutdown();
        assert!(!r.is_running());
    }

    #[test]
    fn shutdown_drains_rings_first() {
        let r = ReactorHandle::spawn(1).unwrap();
        let dropped = Arc::new(AtomicBool::new(false));
        r.send(Command::Add(Box::new(FakeRing {
            vbd: VbdId(2),
            kick: Doorbell::new().unwrap(),
            runs: Arc::new(AtomicUsize::new(0)),
            in_flight: 3,
            closed: false,
            dropped: dropped.clone(),
        })))
        .unwrap();
        r.shutdown();
        assert!(dropped.load(Ordering::SeqCst));
    }
}
