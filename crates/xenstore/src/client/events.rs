//! The client's watch-event queue: a bounded FIFO between the connection's
//! reader thread (producer) and the daemon's control loop (consumer).
//!
//! Bounded on purpose (the CVE-2020-29568 / XSA-349 class): a daemon that
//! falls behind, or a peer that floods events, must not make the client grow
//! without limit. When full, new events are dropped and counted; callers that
//! see [`WatchEvents::dropped`] move should rescan the paths they watch, as
//! events are only hints to re-read state anyway.
//!
//! The consumer can block ([`WatchEvents::recv`], [`WatchEvents::recv_timeout`])
//! or poll: [`WatchEvents`] implements [`AsFd`], and that descriptor is
//! readable exactly while events are queued or the connection has closed, so
//! it fits in an epoll/poll loop beside eventfds.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{RecvError, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::warn;

/// One `XS_WATCH_EVENT`: the path that changed (relative if the watch was
/// registered with a relative path) and the token given to `watch`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WatchEvent {
    /// The node that changed, or the watched path for the initial event.
    pub path: String,
    /// The token the watch was registered with.
    pub token: String,
}

#[derive(Debug)]
struct State {
    events: VecDeque<WatchEvent>,
    closed: bool,
    /// Whether a byte sits in the notification socket.
    signalled: bool,
}

/// The queue shared by the reader thread and every [`WatchEvents`] handle.
#[derive(Debug)]
pub(crate) struct WatchQueue {
    state: Mutex<State>,
    cv: Condvar,
    capacity: usize,
    dropped: AtomicU64,
    /// Readiness signal: one byte is pending in `notify_rx` iff the queue is
    /// non-empty or closed. Sockets rather than an eventfd keep this crate
    /// free of `unsafe`.
    notify_tx: UnixStream,
    notify_rx: UnixStream,
}

impl WatchQueue {
    pub(crate) fn new(capacity: usize) -> io::Result<WatchQueue> {
        let (notify_tx, notify_rx) = UnixStream::pair()?;
        notify_tx.set_nonblocking(true)?;
        notify_rx.set_nonblocking(true)?;
        Ok(WatchQueue {
            state: Mutex::new(State {
                events: VecDeque::new(),
                closed: false,
                signalled: false,
            }),
            cv: Condvar::new(),
            capacity: capacity.max(1),
            dropped: AtomicU64::new(0),
            notify_tx,
            notify_rx,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue inconsistent
        // (every mutation is a single VecDeque call), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn signal(&self, st: &mut State) {
        if !st.signalled {
            // At most one byte is ever pending, so this cannot block or fill.
            let _ = (&self.notify_tx).write(&[1]);
            st.signalled = true;
        }
    }

    /// Queues an event, or drops and counts it when the queue is full.
    pub(crate) fn push(&self, ev: WatchEvent) {
        let mut st = self.lock();
        if st.closed {
            return;
        }
        if st.events.len() >= self.capacity {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            // Log the first drop and then at powers of two, not every event.
            if n.is_power_of_two() {
                warn!(
                    dropped = n,
                    capacity = self.capacity,
                    "xenstore watch queue full, dropping events"
                );
            }
            return;
        }
        st.events.push_back(ev);
        self.signal(&mut st);
        drop(st);
        self.cv.notify_one();
    }

    /// Marks the queue closed: consumers drain what is left, then see
    /// "disconnected".
    pub(crate) fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        self.signal(&mut st);
        drop(st);
        self.cv.notify_all();
    }

    fn pop(&self, st: &mut State) -> Option<WatchEvent> {
        let ev = st.events.pop_front();
        if st.events.is_empty() && !st.closed && st.signalled {
            let mut buf = [0u8; 8];
            while matches!((&self.notify_rx).read(&mut buf), Ok(n) if n > 0) {}
            st.signalled = false;
        }
        ev
    }
}

/// A handle on a client's watch events. Cloning gives another handle on the
/// *same* queue (each event is received once, by whichever handle asks first).
#[derive(Debug, Clone)]
pub struct WatchEvents {
    q: Arc<WatchQueue>,
}

impl WatchEvents {
    pub(crate) fn new(q: Arc<WatchQueue>) -> WatchEvents {
        WatchEvents { q }
    }

    /// Blocks until an event arrives; `Err` once the connection has closed
    /// and every queued event was received.
    pub fn recv(&self) -> Result<WatchEvent, RecvError> {
        let mut st = self.q.lock();
        loop {
            if let Some(ev) = self.q.pop(&mut st) {
                return Ok(ev);
            }
            if st.closed {
                return Err(RecvError);
            }
            st = self.q.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Like [`recv`](Self::recv), giving up after `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<WatchEvent, RecvTimeoutError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.q.lock();
        loop {
            if let Some(ev) = self.q.pop(&mut st) {
                return Ok(ev);
            }
            if st.closed {
                return Err(RecvTimeoutError::Disconnected);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(RecvTimeoutError::Timeout);
            }
            st = self
                .q
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Returns a queued event without blocking.
    pub fn try_recv(&self) -> Result<WatchEvent, TryRecvError> {
        let mut st = self.q.lock();
        match self.q.pop(&mut st) {
            Some(ev) => Ok(ev),
            None if st.closed => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
        }
    }

    /// Events dropped because the queue was full, since the client started.
    pub fn dropped(&self) -> u64 {
        self.q.dropped.load(Ordering::Relaxed)
    }

    /// Events currently queued.
    pub fn len(&self) -> usize {
        self.q.lock().events.len()
    }

    /// True if no event is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most events the queue holds before dropping.
    pub fn capacity(&self) -> usize {
        self.q.capacity
    }
}

impl AsFd for WatchEvents {
    /// A descriptor that polls readable while events are queued or the
    /// connection has closed. Do not read from it: receiving events clears it.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.q.notify_rx.as_fd()
    }
}

impl AsRawFd for WatchEvents {
    fn as_raw_fd(&self) -> RawFd {
        self.q.notify_rx.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(i: usize) -> WatchEvent {
        WatchEvent {
            path: format!("/p/{i}"),
            token: "t".into(),
        }
    }

    fn fd_readable(q: &WatchQueue) -> bool {
        // std has no stable non-blocking peek on a UnixStream: read the byte
        // and put it back.
        let mut b = [0u8; 1];
        let readable = matches!((&q.notify_rx).read(&mut b), Ok(1));
        if readable {
            (&q.notify_tx).write_all(&b).unwrap();
        }
        readable
    }

    #[test]
    fn bounded_and_counted() {
        let q = Arc::new(WatchQueue::new(4).unwrap());
        let h = WatchEvents::new(q.clone());
        for i in 0..10 {
            q.push(ev(i));
        }
        assert_eq!(h.len(), 4);
        assert_eq!(h.dropped(), 6);
        for i in 0..4 {
            assert_eq!(h.try_recv().unwrap(), ev(i));
        }
        assert_eq!(h.try_recv(), Err(TryRecvError::Empty));
    }

    #[test]
    fn fd_tracks_readiness() {
        let q = Arc::new(WatchQueue::new(8).unwrap());
        let h = WatchEvents::new(q.clone());
        assert!(!fd_readable(&q));
        q.push(ev(1));
        q.push(ev(2));
        assert!(fd_readable(&q));
        h.try_recv().unwrap();
        assert!(fd_readable(&q));
        h.try_recv().unwrap();
        assert!(!fd_readable(&q));
        q.close();
        assert!(fd_readable(&q));
        assert_eq!(h.try_recv(), Err(TryRecvError::Disconnected));
        assert_eq!(h.recv(), Err(RecvError));
    }

    #[test]
    fn recv_timeout_bounds_and_wakes() {
        let q = Arc::new(WatchQueue::new(8).unwrap());
        let h = WatchEvents::new(q.clone());
        assert_eq!(
            h.recv_timeout(Duration::from_millis(10)),
            Err(RecvTimeoutError::Timeout)
        );
        let producer = std::thread::spawn({
            let q = q.clone();
            move || q.push(ev(3))
        });
        assert_eq!(h.recv_timeout(Duration::from_secs(10)), Ok(ev(3)));
        producer.join().unwrap();
    }
}
