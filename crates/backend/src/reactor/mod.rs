//! Reactor threads: each owns any number of rings and runs them from one io_uring event
//! loop.
//!
//! A reactor watches, with one multishot poll each on its own io_uring, every file
//! descriptor its rings hand it (the ring's event channel and its storage queue's
//! completion fd) and a control doorbell; the 100 ms housekeeping (persistent-grant
//! purge, resize check) is the timeout of its one blocking call. Whatever wakes it costs
//! that one `io_uring_enter`: the readiness of everything is then read from the
//! completion queue, and after a ring answered a batch the reactor polls the rings and
//! that queue for a budget adapted to the frontend's measured turnaround before it
//! sleeps again (see [`PollEstimate`] and ARCHITECTURE.md, "Reactor"). Nothing on the
//! per-request path takes a lock: a ring is touched only by the thread that owns it. The
//! only shared structure is the control queue (a mutex-protected deque plus an eventfd),
//! used to add rings, remove the rings of a VBD, and shut down.
//!
//! Removal is a drain, as blkback's `xen_blkif_disconnect` waits for `inflight == 0`: the
//! ring stops consuming requests, keeps reaping completions until none is in flight,
//! then is dropped (which unmaps its grants and ring, unbinds its event channel and
//! closes its storage queue) and reported back on the channel given with the command.
//! The waiter bounds its own wait; the reactor keeps draining in the background.
//!
//! A panic inside one ring (a bug: nothing a guest sends may cause one) is caught at the
//! reactor's call into that ring: the ring is halted (its fds leave the event loop, it is
//! never run again), reported through [`RingTask::panicked`] so its device fails as a
//! halted ring does, and dropped when its VBD is removed. The reactor and every other ring
//! carry on.

mod poll;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use eventfd::EventFd;

use self::poll::PollEstimate;
use crate::stats::{ReactorCounters, Stats};
use crate::sys::{EventLoop, Token, Woken};

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
    /// When the ring wants to be run again whatever happens meanwhile (a request held by
    /// its QoS limits until then); asked after each call that does work.
    fn wake_at(&self) -> Option<Instant> {
        None
    }
    /// Periodic housekeeping, every [`TICK`].
    fn tick(&mut self, now: Instant);
    /// Stops consuming requests; in-flight ones still complete and get responses.
    fn close(&mut self);
    /// True once closed and nothing is in flight: the ring can be dropped.
    fn drained(&self) -> bool;
    /// Final statistics, reported on removal.
    fn stats(&self) -> Stats;
    /// A call into this ring panicked with `message`: it is never run again; report it.
    fn panicked(&mut self, message: &str);
}

/// The text of a caught panic.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-text payload".to_string()
    }
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
    doorbell: EventFd,
}

/// The engine's handle on one reactor thread.
pub(crate) struct ReactorHandle {
    control: Arc<Control>,
    rings: Arc<AtomicUsize>,
    counters: Arc<ReactorCounters>,
    thread: Mutex<Option<JoinHandle<()>>>,
    id: usize,
}

/// Binds the calling thread to `cpu`.
fn pin_current_thread(cpu: usize) -> io::Result<()> {
    if cpu >= rustix::thread::CpuSet::MAX_CPU {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("CPU {cpu} is beyond what the kernel's CPU sets hold"),
        ));
    }
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    rustix::thread::sched_setaffinity(None, &set).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("cannot run a reactor on CPU {cpu}: {e}"),
        )
    })
}

impl ReactorHandle {
    /// Starts reactor `id`, on `cpu` only if given (the thread pins itself before it
    /// serves anything; a CPU that cannot be used fails the start).
    pub(crate) fn spawn(id: usize, cpu: Option<usize>) -> io::Result<Self> {
        let control = Arc::new(Control {
            queue: Mutex::new(VecDeque::new()),
            doorbell: EventFd::new()?,
        });
        let rings = Arc::new(AtomicUsize::new(0));
        let counters = Arc::new(ReactorCounters::default());
        let mut reactor = Reactor::new(control.clone(), rings.clone(), counters.clone())?;
        let (pinned_tx, pinned_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(format!("xenblkd-reactor-{id}"))
            .spawn(move || {
                let pinned = cpu.map_or(Ok(()), pin_current_thread);
                let ok = pinned.is_ok();
                let _ = pinned_tx.send(pinned);
                if ok {
                    reactor.run();
                }
            })?;
        match pinned_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => return Err(io::Error::other("the reactor thread ended at its start")),
        }
        if let Some(cpu) = cpu {
            tracing::info!(reactor = id, cpu, "reactor pinned");
        }
        Ok(Self {
            control,
            rings,
            counters,
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

    /// The live counters of the thread's event loop.
    pub(crate) fn counters(&self) -> Arc<ReactorCounters> {
        self.counters.clone()
    }

    #[cfg(test)]
    fn stats(&self) -> crate::stats::ReactorStats {
        self.counters.snapshot()
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
        self.control.doorbell.signal()
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

const TOKEN_CONTROL: Token = u64::MAX - 1;
/// A ring's token: the generation of its entry (so a report still queued for a dropped
/// ring never reaches the ring that reused its key), the entry's key, and the index of
/// the fd in the ring's `fds()`.
const FD_BITS: u32 = 8;
const KEY_BITS: u32 = 32;
const GEN_BITS: u32 = 23;

fn ring_token(generation: u32, key: usize, which: usize) -> Token {
    (u64::from(generation) << (KEY_BITS + FD_BITS)) | ((key as u64) << FD_BITS) | which as u64
}

/// `(generation, key, which)` of a ring token.
fn split_token(t: Token) -> (u32, usize, usize) {
    let which = (t & ((1 << FD_BITS) - 1)) as usize;
    let key = ((t >> FD_BITS) & ((1 << KEY_BITS) - 1)) as usize;
    #[allow(clippy::cast_possible_truncation)] // masked to GEN_BITS
    let generation = ((t >> (KEY_BITS + FD_BITS)) & ((1 << GEN_BITS) - 1)) as u32;
    (generation, key, which)
}

struct Entry {
    task: Box<dyn RingTask>,
    /// Generation of this entry's key, part of its tokens.
    generation: u32,
    /// The tokens of the ring's fds that are watched.
    tokens: Vec<Token>,
    /// Replies owed when the ring has drained.
    reply: Option<mpsc::Sender<RingClosed>>,
    closing: bool,
    dirty: bool,
    /// A call into the ring panicked: it is halted and only waits to be dropped.
    panicked: bool,
    poll: PollEstimate,
    /// The poll cap the ring gave with its last answer.
    poll_cap: Duration,
    /// The ring's timer, as armed in the reactor's heap (see [`Entry::arm`]).
    timer: Option<Instant>,
}

impl Entry {
    /// Calls into the ring, catching a panic: the ring is then halted for good, its fds
    /// leave the event loop, and its owner hears of it. `None` if it panicked (now or
    /// before).
    fn guarded<R>(
        &mut self,
        events: &mut EventLoop,
        f: impl FnOnce(&mut dyn RingTask) -> R,
    ) -> Option<R> {
        if self.panicked {
            return None;
        }
        let task = &mut *self.task;
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(task))) {
            Ok(r) => Some(r),
            Err(payload) => {
                self.panicked = true;
                let message = panic_message(payload.as_ref());
                tracing::error!(
                    vbd = self.task.vbd().0,
                    ring = self.task.index(),
                    %message,
                    "ring panicked: halting it; every other ring goes on"
                );
                self.unwatch(events);
                let task = &mut *self.task;
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    task.panicked(&message)
                }))
                .is_err()
                {
                    tracing::error!("reporting a ring's panic panicked too");
                }
                None
            }
        }
    }

    /// Arms the timer the ring asks for (`want`, from [`RingTask::wake_at`]). Only an
    /// earlier deadline is pushed: a later one waits for the armed one, whose run asks
    /// again, so a ring re-evaluating its wait on every completion adds nothing to the
    /// heap. A timer no longer wanted stays in the heap and is skipped when it comes up.
    fn arm(&mut self, want: Option<Instant>, key: usize, timers: &mut Timers) {
        match want {
            None => self.timer = None,
            Some(at) if self.timer.is_none_or(|cur| at < cur) => {
                self.timer = Some(at);
                timers.push(Reverse((at, key, self.generation)));
            }
            Some(_) => {}
        }
    }

    fn unwatch(&mut self, events: &mut EventLoop) {
        for t in self.tokens.drain(..) {
            if let Err(e) = events.unwatch(t) {
                tracing::error!(error = %e, "cannot stop watching a ring's fd");
            }
        }
    }
}

/// Deadlines of rings' timers: (when, entry key, entry generation), earliest first.
type Timers = BinaryHeap<Reverse<(Instant, usize, u32)>>;

struct Reactor {
    events: EventLoop,
    timers: Timers,
    control: Arc<Control>,
    rings: Arc<AtomicUsize>,
    counters: Arc<ReactorCounters>,
    entries: Vec<Option<Entry>>,
    free_keys: Vec<usize>,
    generation: u32,
    /// Reused by `collect`: (key, fd index, the watch's error) of each report.
    reports: Vec<(usize, usize, Option<io::Error>)>,
    shutting_down: bool,
    shutdown_deadline: Option<Instant>,
}

impl Reactor {
    fn new(
        control: Arc<Control>,
        rings: Arc<AtomicUsize>,
        counters: Arc<ReactorCounters>,
    ) -> io::Result<Self> {
        let mut events = EventLoop::new()?;
        events.watch(control.doorbell.as_fd(), TOKEN_CONTROL)?;
        Ok(Self {
            events,
            timers: BinaryHeap::new(),
            control,
            rings,
            counters,
            entries: Vec::new(),
            free_keys: Vec::new(),
            generation: 0,
            reports: Vec::with_capacity(64),
            shutting_down: false,
            shutdown_deadline: None,
        })
    }

    fn run(&mut self) {
        let mut next_tick = Instant::now() + TICK;
        // Busy time is everything outside the one wait: two clock readings per wake-up
        // (the wait's timeout needs the first anyway).
        let mut woke = Instant::now();
        loop {
            let before_wait = Instant::now();
            self.counters.busy_ns.add(
                u64::try_from(before_wait.saturating_duration_since(woke).as_nanos())
                    .unwrap_or(u64::MAX),
            );
            // One deadline for the wait: the tick or the earliest ring timer (QoS).
            let deadline = match self.timers.peek() {
                Some(Reverse((at, _, _))) => next_tick.min(*at),
                None => next_tick,
            };
            let timeout = deadline.saturating_duration_since(before_wait);
            let woken = self.events.wait(Some(timeout));
            woke = Instant::now();
            match woken {
                Ok(Woken::NoWait) => {}
                Ok(Woken::Event) => {
                    self.counters.sleeps.inc();
                    self.counters.wakeups.inc();
                }
                Ok(Woken::Timeout) => {
                    self.counters.sleeps.inc();
                    self.counters.timeouts.inc();
                }
                Err(e) => {
                    tracing::error!(error = %e, "io_uring_enter failed; reactor stops");
                    break;
                }
            }
            let mut control = false;
            if let Err(e) = self.collect(&mut control) {
                tracing::error!(error = %e, "re-arming a watch failed; reactor stops");
                break;
            }
            self.fire_timers(Instant::now());
            if let Err(e) = self.work(&mut control) {
                tracing::error!(error = %e, "re-arming a watch failed; reactor stops");
                break;
            }
            let now = Instant::now();
            if now >= next_tick {
                // Missed ticks are not made up: housekeeping is by elapsed time.
                next_tick = now + TICK;
                for (key, e) in self.entries.iter_mut().enumerate() {
                    let Some(e) = e else { continue };
                    if let Some(want) = e.guarded(&mut self.events, |t| {
                        t.tick(now);
                        t.wake_at()
                    }) {
                        e.arm(want, key, &mut self.timers);
                    }
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
        // Whatever is left (a failed io_uring) is dropped here, which still unmaps and
        // closes.
        for key in 0..self.entries.len() {
            self.remove(key);
        }
    }

    /// Marks the rings whose timer is due to be run.
    fn fire_timers(&mut self, now: Instant) {
        while let Some(Reverse((at, key, generation))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            if let Some(Some(e)) = self.entries.get_mut(key) {
                // Skipped: a ring that reused the key, or a timer replaced or withdrawn.
                if e.generation == generation && e.timer == Some(at) {
                    e.timer = None;
                    e.dirty = true;
                }
            }
        }
    }

    /// Hands the readiness reports in the completion queue to their rings.
    fn collect(&mut self, control: &mut bool) -> io::Result<()> {
        let now = Instant::now();
        let entries = &mut self.entries;
        let mut reports = std::mem::take(&mut self.reports);
        reports.clear();
        let drained = self.events.drain(|token, res| {
            if token == TOKEN_CONTROL {
                *control = true;
                return;
            }
            let (generation, key, which) = split_token(token);
            match entries.get_mut(key) {
                Some(Some(e)) if e.generation == generation => {
                    if res.is_ok() {
                        e.poll.arrived(now, e.poll_cap);
                        e.dirty = true;
                    }
                    reports.push((key, which, res.err()));
                }
                // A dropped ring's last report.
                _ => {}
            }
        });
        for (key, which, err) in reports.drain(..) {
            let Some(Some(e)) = self.entries.get_mut(key) else {
                continue;
            };
            match err {
                None => {
                    e.guarded(&mut self.events, |t| t.ready(which));
                }
                Some(err) => {
                    // The watch is gone: the ring can no longer hear its frontend or its
                    // storage. It is closed like one whose fds could not be watched.
                    tracing::error!(
                        vbd = e.task.vbd().0,
                        ring = e.task.index(),
                        error = %err,
                        "watching a ring's fd failed; closing the ring"
                    );
                    e.unwatch(&mut self.events);
                    if !e.closing {
                        e.closing = true;
                        e.guarded(&mut self.events, |t| t.close());
                    }
                }
            }
        }
        self.reports = reports;
        drained
    }

    /// Runs the rings that have work, then polls (adaptively, within the budget their
    /// answers earned) for more before the caller sleeps.
    fn work(&mut self, control: &mut bool) -> io::Result<()> {
        let mut poll_until: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let mut budget = Duration::ZERO;
            for (key, e) in self.entries.iter_mut().enumerate() {
                let Some(e) = e else { continue };
                if std::mem::take(&mut e.dirty) {
                    let ran = e.guarded(&mut self.events, |t| (t.run(), t.wake_at()));
                    if let Some((poll, want)) = ran {
                        e.arm(want, key, &mut self.timers);
                        if let Some(cap) = poll {
                            e.poll_cap = cap;
                            budget = budget.max(e.poll.answered(now, cap));
                        }
                    }
                }
            }
            if !budget.is_zero() {
                let until = now + budget;
                poll_until = Some(poll_until.map_or(until, |u| u.max(until)));
            }
            // A ring that just answered a batch expects the frontend's next one soon:
            // look for it, and for completions, before paying a sleep and a wake-up.
            let Some(until) = poll_until else {
                return Ok(());
            };
            // Past the budget, even if the last look found work: only a new answer (work
            // done) extends it, never a ring that merely says it has requests.
            let start = Instant::now();
            if start >= until {
                return Ok(());
            }
            let mut found = false;
            let mut events = false;
            loop {
                let now = Instant::now();
                for e in self.entries.iter_mut().flatten() {
                    if !e.closing && e.guarded(&mut self.events, |t| t.has_requests()) == Some(true)
                    {
                        e.poll.arrived(now, e.poll_cap);
                        e.dirty = true;
                        found = true;
                    }
                }
                if self.events.has_events() {
                    events = true;
                }
                if found || events || now >= until {
                    break;
                }
                std::hint::spin_loop();
            }
            self.counters
                .poll_ns
                .add(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
            if !(found || events) {
                self.counters.poll_misses.inc();
                return Ok(());
            }
            self.counters.poll_hits.inc();
            if events {
                self.collect(control)?;
            }
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
                            e.guarded(&mut self.events, |t| t.close());
                        }
                    }
                }
                Command::Shutdown => {
                    self.shutting_down = true;
                    self.shutdown_deadline = Some(Instant::now() + SHUTDOWN_GRACE);
                    for e in self.entries.iter_mut().flatten() {
                        if !e.closing {
                            e.closing = true;
                            e.guarded(&mut self.events, |t| t.close());
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
        self.generation = (self.generation + 1) & ((1 << GEN_BITS) - 1);
        let generation = self.generation;
        let mut registered = Ok(());
        let mut tokens = Vec::new();
        if key >= (1 << KEY_BITS) {
            registered = Err(io::Error::other("too many rings on one reactor"));
        }
        for (i, fd) in task.fds().into_iter().enumerate() {
            if i >= (1 << FD_BITS) {
                registered = Err(io::Error::other("too many fds for one ring"));
            }
            let token = ring_token(generation, key, i);
            registered = registered.and_then(|()| self.events.watch(fd, token));
            if registered.is_ok() {
                tokens.push(token);
            }
        }
        let closing = self.shutting_down;
        let mut entry = Entry {
            task,
            generation,
            tokens,
            reply: None,
            closing,
            dirty: true,
            panicked: false,
            poll: PollEstimate::default(),
            poll_cap: Duration::ZERO,
            timer: None,
        };
        if let Err(e) = registered {
            tracing::error!(error = %e, "cannot watch a ring's fds; closing it");
            entry.closing = true;
        }
        if entry.closing {
            entry.guarded(&mut self.events, |t| t.close());
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
            let events = &mut self.events;
            let done = match &mut self.entries[key] {
                // A panicked ring is not asked: it goes as soon as its VBD is removed.
                Some(e) if e.closing => e.guarded(events, |t| t.drained()).unwrap_or(true),
                _ => false,
            };
            if done {
                self.remove(key);
            }
        }
    }

    fn remove(&mut self, key: usize) {
        let Some(mut entry) = self.entries[key].take() else {
            return;
        };
        // Out of the kernel before the fds close (with the task, below).
        entry.unwatch(&mut self.events);
        let closed = RingClosed {
            vbd: entry.task.vbd(),
            index: entry.task.index(),
            stats: entry.task.stats(),
        };
        // Dropping waits for the storage to finish with every page, then releases them;
        // a ring that panicked is dropped the same way (a request owns its pages, so no
        // half-updated ring state can free one under the kernel).
        let task = entry.task;
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(task))).is_err() {
            tracing::error!(
                vbd = closed.vbd.0,
                ring = closed.index,
                "dropping a ring panicked; what it still held is leaked"
            );
        }
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

    /// A ring stand-in: eventfds to wake it (a "notification" and a "completion" fd),
    /// counters of runs and ticks, a number of "in-flight" operations that complete one
    /// per tick once closed, and switches for what `run` answers.
    struct FakeRing {
        vbd: VbdId,
        kick: EventFd,
        completion: EventFd,
        runs: Arc<AtomicUsize>,
        ticks: Arc<AtomicUsize>,
        in_flight: usize,
        closed: bool,
        dropped: Arc<AtomicBool>,
        /// `run` answers with this poll cap (as a ring that published responses).
        answer: Option<Duration>,
        /// `has_requests`, as the frontend's next batch.
        requests: Arc<AtomicBool>,
        /// `run` leaves `requests` set (a ring that says it has requests it cannot take).
        sticky_requests: bool,
        /// Answers `run` gives before it returns `None` (`usize::MAX`: always).
        answers_left: usize,
        panic_in_run: Arc<AtomicBool>,
        /// What `wake_at` answers (a ring holding a request for its QoS limits).
        wake: Arc<Mutex<Option<Instant>>>,
    }

    impl FakeRing {
        fn new(vbd: u64) -> Self {
            Self {
                vbd: VbdId(vbd),
                kick: EventFd::new().unwrap(),
                completion: EventFd::new().unwrap(),
                runs: Arc::new(AtomicUsize::new(0)),
                ticks: Arc::new(AtomicUsize::new(0)),
                in_flight: 0,
                closed: false,
                dropped: Arc::new(AtomicBool::new(false)),
                answer: None,
                requests: Arc::new(AtomicBool::new(false)),
                sticky_requests: false,
                answers_left: usize::MAX,
                panic_in_run: Arc::new(AtomicBool::new(false)),
                wake: Arc::new(Mutex::new(None)),
            }
        }
    }

    impl RingTask for FakeRing {
        fn vbd(&self) -> VbdId {
            self.vbd
        }
        fn index(&self) -> usize {
            0
        }
        fn fds(&self) -> Vec<BorrowedFd<'_>> {
            vec![self.kick.as_fd(), self.completion.as_fd()]
        }
        fn ready(&mut self, which: usize) {
            match which {
                0 => self.kick.drain(),
                1 => self.completion.drain(),
                _ => panic!("no fd {which}"),
            };
        }
        fn run(&mut self) -> Option<Duration> {
            assert!(!self.panic_in_run.load(Ordering::SeqCst), "ring bug");
            self.runs.fetch_add(1, Ordering::SeqCst);
            // A held request whose time has come goes.
            let mut wake = self.wake.lock().unwrap();
            if wake.is_some_and(|at| Instant::now() >= at) {
                *wake = None;
            }
            drop(wake);
            // Taking the requests, as a ring consumes them.
            if !self.sticky_requests {
                self.requests.store(false, Ordering::SeqCst);
            }
            if self.answers_left == 0 {
                return None;
            }
            self.answers_left -= 1;
            self.answer
        }
        fn has_requests(&self) -> bool {
            self.requests.load(Ordering::SeqCst)
        }
        fn wake_at(&self) -> Option<Instant> {
            *self.wake.lock().unwrap()
        }
        fn tick(&mut self, _now: Instant) {
            self.ticks.fetch_add(1, Ordering::SeqCst);
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
        fn panicked(&mut self, _message: &str) {
            self.closed = true;
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

    /// Lets the reactor finish what it does and go to sleep.
    fn settle() {
        std::thread::sleep(Duration::from_millis(30));
    }

    #[test]
    fn add_wake_drain_remove_and_shutdown() {
        let r = ReactorHandle::spawn(0, None).unwrap();
        let mut ring = FakeRing::new(1);
        ring.in_flight = 2;
        let runs = ring.runs.clone();
        let dropped = ring.dropped.clone();
        // A second handle on the same eventfd to poke the ring from the test.
        let poke = ring.kick.try_clone().unwrap();
        r.send(Command::Add(Box::new(ring))).unwrap();
        assert_eq!(r.load(), 1);
        wait_for(|| runs.load(Ordering::SeqCst) >= 1);
        let before = runs.load(Ordering::SeqCst);
        poke.signal().unwrap();
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
        let r = ReactorHandle::spawn(1, None).unwrap();
        let mut ring = FakeRing::new(2);
        ring.in_flight = 3;
        let dropped = ring.dropped.clone();
        r.send(Command::Add(Box::new(ring))).unwrap();
        r.shutdown();
        assert!(dropped.load(Ordering::SeqCst));
    }

    #[test]
    fn a_notification_and_a_completion_each_wake_the_reactor_once() {
        let r = ReactorHandle::spawn(2, None).unwrap();
        let ring = FakeRing::new(3);
        let runs = ring.runs.clone();
        let notify = ring.kick.try_clone().unwrap();
        let complete = ring.completion.try_clone().unwrap();
        r.send(Command::Add(Box::new(ring))).unwrap();
        wait_for(|| runs.load(Ordering::SeqCst) >= 1);
        for fd in [&notify, &complete] {
            settle();
            let (before, runs_before) = (r.stats(), runs.load(Ordering::SeqCst));
            fd.signal().unwrap();
            wait_for(|| runs.load(Ordering::SeqCst) > runs_before);
            settle();
            let d = r.stats().since(&before);
            // Ticks may end sleeps meanwhile; they are counted apart.
            assert_eq!(d.wakeups, 1, "{d:?}");
            assert_eq!(d.sleeps, d.wakeups + d.timeouts, "{d:?}");
            assert_eq!(runs.load(Ordering::SeqCst), runs_before + 1);
        }
        r.shutdown();
    }

    #[test]
    fn the_housekeeping_timeout_fires_on_an_idle_reactor() {
        let r = ReactorHandle::spawn(3, None).unwrap();
        let ring = FakeRing::new(4);
        let ticks = ring.ticks.clone();
        r.send(Command::Add(Box::new(ring))).unwrap();
        wait_for(|| ticks.load(Ordering::SeqCst) >= 2);
        let s = r.stats();
        assert!(s.timeouts >= 1, "{s:?}");
        r.shutdown();
    }

    #[test]
    fn a_ring_timer_runs_the_ring_at_its_deadline_only() {
        let r = ReactorHandle::spawn(8, None).unwrap();
        let ring = FakeRing::new(12);
        let (runs, wake) = (ring.runs.clone(), ring.wake.clone());
        let poke = ring.kick.try_clone().unwrap();
        r.send(Command::Add(Box::new(ring))).unwrap();
        wait_for(|| runs.load(Ordering::SeqCst) >= 1);
        // The ring holds a request until 30 ms from now, and says so after its next run.
        let t0 = Instant::now();
        *wake.lock().unwrap() = Some(t0 + Duration::from_millis(30));
        poke.signal().unwrap();
        wait_for(|| runs.load(Ordering::SeqCst) >= 2);
        // One more run at the deadline, by the wait's timeout, not earlier; there the
        // ring lets its request go and asks for no timer.
        wait_for(|| runs.load(Ordering::SeqCst) >= 3);
        assert!(
            t0.elapsed() >= Duration::from_millis(30),
            "{:?}",
            t0.elapsed()
        );
        assert!(wake.lock().unwrap().is_none());
        // Nothing runs the ring again without an event (ticks do not run it).
        settle();
        settle();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        r.shutdown();
    }

    #[test]
    fn a_halted_ring_leaves_the_loop() {
        let r = ReactorHandle::spawn(4, None).unwrap();
        let ring = FakeRing::new(5);
        let (runs, panic_in_run) = (ring.runs.clone(), ring.panic_in_run.clone());
        let notify = ring.kick.try_clone().unwrap();
        let complete = ring.completion.try_clone().unwrap();
        r.send(Command::Add(Box::new(ring))).unwrap();
        wait_for(|| runs.load(Ordering::SeqCst) >= 1);
        panic_in_run.store(true, Ordering::SeqCst);
        notify.signal().unwrap();
        settle();
        // Halted: its fds are watched no more, so neither wakes the reactor.
        let before = r.stats();
        notify.signal().unwrap();
        complete.signal().unwrap();
        settle();
        assert_eq!(r.stats().since(&before).wakeups, 0);
        // The rest of the reactor still works: a new ring is run.
        let other = FakeRing::new(6);
        let other_runs = other.runs.clone();
        r.send(Command::Add(Box::new(other))).unwrap();
        wait_for(|| other_runs.load(Ordering::SeqCst) >= 1);
        let (tx, rx) = mpsc::channel();
        r.send(Command::RemoveVbd {
            vbd: VbdId(5),
            reply: tx,
        })
        .unwrap();
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        r.shutdown();
    }

    /// On-CPU nanoseconds of the reactor thread named `name`.
    fn thread_cpu_ns(name: &str) -> u64 {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
            })
            .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }

    #[test]
    fn an_idle_reactor_sleeps() {
        let r = ReactorHandle::spawn(5, None).unwrap();
        let mut ring = FakeRing::new(7);
        // Even a ring that would allow polling: nothing was answered, so nothing polls.
        ring.answer = Some(Duration::from_millis(1));
        let runs = ring.runs.clone();
        r.send(Command::Add(Box::new(ring))).unwrap();
        wait_for(|| runs.load(Ordering::SeqCst) >= 1);
        settle();
        let (before, cpu) = (r.stats(), thread_cpu_ns("xenblkd-reactor-5"));
        std::thread::sleep(Duration::from_millis(500));
        let d = r.stats().since(&before);
        let cpu = thread_cpu_ns("xenblkd-reactor-5") - cpu;
        // Five ticks in 500 ms, and nothing else.
        assert!(d.sleeps <= 7 && d.wakeups == 0, "{d:?}");
        assert_eq!(d.poll_ns, 0, "{d:?}");
        // Generous for a loaded test machine; a spinning thread would show ~500 ms.
        assert!(cpu < 20_000_000, "{cpu} ns on CPU in 500 ms idle");
        // Asleep, not busy, for nearly all of it (wall-clock, so a preempted tick may
        // count a little more than its CPU time).
        assert!(d.busy_ns < 100_000_000, "{d:?}");
        r.shutdown();
    }

    #[test]
    fn a_ring_that_has_requests_it_does_not_take_is_polled_within_the_budget_only() {
        let r = ReactorHandle::spawn(7, None).unwrap();
        let mut ring = FakeRing::new(11);
        let cap = Duration::from_millis(5);
        ring.answer = Some(cap);
        ring.answers_left = 1;
        ring.sticky_requests = true;
        ring.requests.store(true, Ordering::SeqCst);
        let runs = ring.runs.clone();
        r.send(Command::Add(Box::new(ring))).unwrap();
        wait_for(|| runs.load(Ordering::SeqCst) >= 1);
        settle();
        // One answer, one budget: the reactor re-ran the ring while the budget lasted,
        // then slept although `has_requests` still says yes.
        let (before, runs_before) = (r.stats(), runs.load(Ordering::SeqCst));
        settle();
        assert_eq!(runs.load(Ordering::SeqCst), runs_before);
        assert_eq!(r.stats().since(&before).poll_ns, 0);
        assert!(
            u128::from(before.poll_ns) <= cap.as_nanos() * 3,
            "{before:?}"
        );
        r.shutdown();
    }

    #[test]
    fn polling_catches_the_next_batch_and_stops_at_the_budget() {
        let r = ReactorHandle::spawn(6, None).unwrap();
        let mut ring = FakeRing::new(8);
        let cap = Duration::from_millis(200);
        ring.answer = Some(cap);
        let (runs, requests) = (ring.runs.clone(), ring.requests.clone());
        let notify = ring.kick.try_clone().unwrap();
        r.send(Command::Add(Box::new(ring))).unwrap();
        wait_for(|| runs.load(Ordering::SeqCst) >= 1);
        settle();
        // The ring answered at add and no batch followed: at most one poll, missed,
        // bounded by the budget (the estimate starts at zero: the slack only, which the
        // pass itself may outlast).
        let s = r.stats();
        assert!(s.poll_hits == 0 && s.poll_misses <= 1, "{s:?}");
        // Polling is busy time.
        assert!(s.busy_ns >= s.poll_ns, "{s:?}");
        assert!(u128::from(s.poll_ns) < cap.as_nanos(), "{s:?}");
        // A hostile frontend that never sends anything cannot make it poll again: each
        // poll needs an answer, and an answer needs a run.
        settle();
        assert_eq!(r.stats().poll_misses, s.poll_misses);

        // Now a frontend that sends its next batch while the reactor polls: wake the
        // ring, and raise `requests` as soon as it ran (a thread scheduled late on a
        // loaded machine can miss a poll: a few tries).
        let mut hit = false;
        for _ in 0..10 {
            let before = r.stats();
            let runs_before = runs.load(Ordering::SeqCst);
            let raiser = {
                let (requests, runs) = (requests.clone(), runs.clone());
                std::thread::spawn(move || {
                    wait_for(|| runs.load(Ordering::SeqCst) > runs_before);
                    requests.store(true, Ordering::SeqCst);
                })
            };
            notify.signal().unwrap();
            raiser.join().unwrap();
            settle();
            let d = r.stats().since(&before);
            if d.poll_hits >= 1 {
                // Caught without a wake-up: the batch after the hit ran too.
                assert!(runs.load(Ordering::SeqCst) >= runs_before + 2, "{d:?}");
                hit = true;
                break;
            }
        }
        assert!(hit, "no poll ever caught the next batch");
        // Every poll ends: a miss after the last answer, and no spinning after it.
        settle();
        let s = r.stats();
        settle();
        assert_eq!(r.stats().since(&s).poll_ns, 0);
        r.shutdown();
    }
}

#[cfg(test)]
mod token_tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        let t = ring_token((1 << GEN_BITS) - 1, (1 << KEY_BITS) - 1, 255);
        assert_ne!(t, TOKEN_CONTROL);
        assert_eq!(
            split_token(t),
            ((1 << GEN_BITS) - 1, (1 << KEY_BITS) - 1, 255)
        );
        assert_eq!(split_token(ring_token(3, 17, 1)), (3, 17, 1));
    }
}
