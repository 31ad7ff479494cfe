//! One client connection of the server: its identity (domain), and its
//! outgoing queue, drained by a dedicated writer thread.
//!
//! Why a writer thread and a queue: watch events for a connection are
//! produced by *other* connections' requests while the tree lock is held. If
//! producing meant writing to this connection's socket, a client that stops
//! reading would block the writer, and with it the whole server. Instead,
//! events are appended to a bounded queue without blocking, and dropped and
//! counted when it is full (the XSA-349 / CVE-2020-29568 fix in xenstored);
//! only this connection's writer thread ever blocks on its socket.
//!
//! Replies are bounded differently: each connection's reader processes one
//! request at a time and waits (without holding the tree lock) while too many
//! of its own replies are unsent, so a client that writes requests but never
//! reads replies stalls only itself.

use std::collections::VecDeque;
use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use tracing::{debug, warn};

/// Replies a connection may have waiting before its reader pauses.
pub(crate) const MAX_PENDING_REPLIES: usize = 16;

#[derive(Debug)]
struct Outgoing {
    is_event: bool,
    bytes: Vec<u8>,
}

#[derive(Debug, Default)]
struct OutQueue {
    items: VecDeque<Outgoing>,
    replies: usize,
    events: usize,
    closed: bool,
    /// Someone (the writer thread, or the reader sending a reply directly)
    /// is writing to the socket; everyone else queues behind.
    busy: bool,
}

/// The part of a connection shared by its reader, its writer, and whoever
/// fires watches at it.
#[derive(Debug)]
pub(crate) struct Conn {
    pub id: u64,
    pub domid: u32,
    pub privileged: bool,
    /// A handle used only to shut the socket down, which wakes both threads.
    stream: UnixStream,
    out: Mutex<OutQueue>,
    cv: Condvar,
    event_limit: usize,
    dropped_events: AtomicU64,
}

impl Conn {
    pub fn new(
        id: u64,
        domid: u32,
        privileged: bool,
        stream: UnixStream,
        event_limit: usize,
    ) -> Conn {
        Conn {
            id,
            domid,
            privileged,
            stream,
            out: Mutex::new(OutQueue::default()),
            cv: Condvar::new(),
            event_limit: event_limit.max(1),
            dropped_events: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, OutQueue> {
        // Every critical section is a few field updates; a panic elsewhere
        // cannot leave the queue half-updated, so poisoning is ignored.
        self.out.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a reply, unless nothing is queued and nobody is writing: then
    /// the socket is claimed and the reply handed back, for the caller to
    /// send with [`Conn::write_claimed`] once it has released the tree lock.
    /// That fast path saves a thread hand-off per request; anything queued
    /// meanwhile (events fired after this reply) waits until the claim ends,
    /// so ordering is kept. Never blocks.
    pub fn reply_or_claim(&self, bytes: Vec<u8>) -> Option<Vec<u8>> {
        let mut q = self.lock();
        if q.closed {
            return None;
        }
        if q.items.is_empty() && !q.busy {
            q.busy = true;
            return Some(bytes);
        }
        q.replies += 1;
        q.items.push_back(Outgoing {
            is_event: false,
            bytes,
        });
        drop(q);
        self.cv.notify_all();
        None
    }

    /// Sends a reply claimed by [`Conn::reply_or_claim`] and releases the
    /// socket to the writer thread. May block, but only on this peer, and
    /// never with the tree lock held.
    pub fn write_claimed(&self, mut stream: &UnixStream, bytes: &[u8]) {
        let result = stream.write_all(bytes);
        let mut q = self.lock();
        q.busy = false;
        // Wake the writer thread only if something queued up meanwhile (a
        // reader waiting for reply room implies that too). An unconditional
        // notify would cost a context switch per request.
        let wake = !q.items.is_empty();
        drop(q);
        if wake {
            self.cv.notify_all();
        }
        if let Err(e) = result {
            debug!(conn = self.id, error = %e, "xenstore write failed");
            self.close();
        }
    }

    /// Queues a watch event, or drops and counts it if the queue is full.
    /// Never blocks: called with the tree lock held.
    pub fn push_event(&self, bytes: Vec<u8>) {
        let mut q = self.lock();
        if q.closed {
            return;
        }
        if q.events >= self.event_limit {
            drop(q);
            let n = self.dropped_events.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                warn!(
                    conn = self.id,
                    domid = self.domid,
                    dropped = n,
                    "watch event queue full, dropping events"
                );
            }
            return;
        }
        q.events += 1;
        q.items.push_back(Outgoing {
            is_event: true,
            bytes,
        });
        drop(q);
        self.cv.notify_all();
    }

    /// Waits until fewer than `max` replies are unsent. False if the
    /// connection closed meanwhile.
    pub fn wait_reply_room(&self, max: usize) -> bool {
        let mut q = self.lock();
        while !q.closed && q.replies >= max {
            q = self.cv.wait(q).unwrap_or_else(|p| p.into_inner());
        }
        !q.closed
    }

    /// The next message to send, claiming the socket; `None` once closed.
    fn next_outgoing(&self) -> Option<Vec<u8>> {
        let mut q = self.lock();
        loop {
            if q.closed {
                return None;
            }
            if !q.busy {
                if let Some(item) = q.items.pop_front() {
                    if item.is_event {
                        q.events -= 1;
                    } else {
                        q.replies -= 1;
                    }
                    q.busy = true;
                    drop(q);
                    // A reader may be waiting for reply room.
                    self.cv.notify_all();
                    return Some(item.bytes);
                }
            }
            q = self.cv.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Closes the connection: discards queued output and shuts the socket
    /// down so that a reader blocked in `read` and a writer blocked in
    /// `write` both return. Idempotent.
    pub fn close(&self) {
        let mut q = self.lock();
        if q.closed {
            return;
        }
        q.closed = true;
        q.items.clear();
        q.replies = 0;
        q.events = 0;
        q.busy = false;
        drop(q);
        self.cv.notify_all();
        let _ = self.stream.shutdown(Shutdown::Both);
        debug!(
            conn = self.id,
            domid = self.domid,
            "xenstore connection closed"
        );
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    pub fn queued_events(&self) -> usize {
        self.lock().events
    }

    pub fn dropped_events(&self) -> u64 {
        self.dropped_events.load(Ordering::Relaxed)
    }

    /// The writer thread: sends queued messages until the connection closes
    /// or the socket fails.
    pub fn writer_loop(&self, stream: UnixStream) {
        while let Some(bytes) = self.next_outgoing() {
            self.write_claimed(&stream, &bytes);
        }
    }
}
