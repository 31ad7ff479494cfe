//! Connection loss and reconnection: shutting a failed socket down, the helper thread that
//! connects and negotiates again with backoff (off the reactor), adopting its socket and
//! resending every unfinished operation in submission order, and failing what has waited
//! out the reconnect bound.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::slot::Op;
use super::wire::RecvState;
use super::{ConnTarget, NbdQueue};
use crate::nbd::handshake::{self, Negotiated};
use crate::nbd::proto;
use eventfd::EventFd;

/// A lost connection being replaced.
pub(super) struct Outage {
    pub(super) since: Instant,
}

/// The mailbox between a queue and its reconnect helper thread.
pub(crate) struct Reconnect {
    pub(super) result: Mutex<Option<(OwnedFd, Negotiated)>>,
    pub(super) stop: AtomicBool,
    pub(super) running: AtomicBool,
}

impl Reconnect {
    pub(super) fn new() -> Arc<Reconnect> {
        Arc::new(Reconnect {
            result: Mutex::new(None),
            stop: AtomicBool::new(false),
            running: AtomicBool::new(false),
        })
    }

    pub(super) fn take(&self) -> Option<(OwnedFd, Negotiated)> {
        self.result.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Starts the helper that reconnects with backoff until it succeeds or is stopped. It
/// signals `eventfd` after every attempt, so the queue can fail operations whose bound has
/// passed even while the server stays away.
pub(super) fn spawn_reconnect(target: &ConnTarget, mailbox: Arc<Reconnect>, eventfd: Arc<EventFd>) {
    if mailbox.running.swap(true, Ordering::AcqRel) {
        return;
    }
    let uri = Arc::clone(&target.uri);
    let timeout = target.connect_timeout;
    let thread_mailbox = Arc::clone(&mailbox);
    let cap =
        (target.reconnect_timeout / 8).clamp(Duration::from_millis(50), Duration::from_millis(500));
    let spawned = std::thread::Builder::new()
        .name("nbd-reconnect".into())
        .spawn(move || {
            let mailbox = thread_mailbox;
            let mut backoff = Duration::from_millis(20);
            let mut attempts = 0u64;
            while !mailbox.stop.load(Ordering::Acquire) {
                attempts += 1;
                match handshake::open(&uri.address, &uri.export, timeout) {
                    Ok(conn) => {
                        tracing::info!(uri = %uri, attempts, "NBD connection re-established");
                        *mailbox.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn);
                        break;
                    }
                    Err(e) => {
                        if attempts == 1 || attempts.is_power_of_two() {
                            tracing::warn!(uri = %uri, attempts, error = %e, "NBD reconnect failed; retrying");
                        }
                    }
                }
                let _ = eventfd.signal();
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(cap);
            }
            mailbox.running.store(false, Ordering::Release);
            let _ = eventfd.signal();
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the NBD reconnect thread");
        mailbox.running.store(false, Ordering::Release);
    }
}

impl NbdQueue {
    /// Connection trouble: shut the socket down; the rest happens once the kernel has
    /// returned our operations on it ([`Self::service`]).
    pub(super) fn lose(&mut self, why: &dyn std::fmt::Display) {
        if self.lost.is_some() {
            return;
        }
        tracing::warn!(uri = %self.target.uri, reason = %why,
            in_flight = self.depth - u32::try_from(self.free.len()).unwrap_or(self.depth),
            "NBD connection lost; reconnecting");
        if let Some(s) = &self.socket {
            // SAFETY: shutdown takes only integers; the descriptor is open (owned by us).
            unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_RDWR) };
        }
        let now = Instant::now();
        for slot in self.slots.iter_mut().filter(|s| s.op != Op::Free) {
            slot.waiting_since.get_or_insert(now);
        }
        self.lost = Some(Outage { since: now });
    }

    /// The old socket is quiet: close it, forget partial transfers, start reconnecting.
    pub(super) fn finish_loss(&mut self) {
        self.socket = None;
        self.send_queue.clear();
        self.send_skip = 0;
        self.rstart = 0;
        self.rend = 0;
        self.rstate = RecvState::Header;
        for slot in self.slots.iter_mut() {
            slot.sent = false;
            slot.awaiting = false;
            slot.reply = None;
        }
        spawn_reconnect(
            &self.target,
            Arc::clone(&self.reconnect),
            Arc::clone(&self.eventfd),
        );
    }

    /// Takes the helper's new connection and resends every unfinished operation.
    pub(super) fn adopt(&mut self, socket: OwnedFd, negotiated: Negotiated) {
        let old = self.target.size.load(Ordering::Acquire);
        let lbs = u64::from(self.target.info.logical_block_size);
        let size = negotiated.size - negotiated.size % lbs;
        if size != old {
            tracing::warn!(uri = %self.target.uri, old, new = size, "export size changed across reconnect");
            self.target.size.store(size, Ordering::Release);
        }
        if negotiated.has(proto::TFLAG_READ_ONLY) && !self.target.info.read_only {
            tracing::warn!(uri = %self.target.uri, "export became read-only across reconnect");
        }
        self.socket = Some(socket);
        self.flags = negotiated.flags;
        self.lost = None;
        let mut resend = std::mem::take(&mut self.resend);
        resend.clear();
        resend.extend((0..self.depth).filter(|&i| self.slots[i as usize].op != Op::Free));
        resend.sort_unstable_by_key(|&i| self.slots[i as usize].order);
        tracing::info!(uri = %self.target.uri, resent = resend.len(), "resending unfinished NBD commands");
        for &idx in &resend {
            self.start_command(idx);
        }
        self.resend = resend;
    }

    /// Fails the operations that have waited out the reconnect bound.
    pub(super) fn expire(&mut self, outage_since: Instant) {
        let now = Instant::now();
        let bound = self.target.reconnect_timeout;
        for idx in 0..self.depth {
            let slot = &self.slots[idx as usize];
            if slot.op == Op::Free {
                continue;
            }
            // Submitted during this outage: it waits from its submission.
            let waiting_since = slot
                .waiting_since
                .unwrap_or_else(|| slot.submitted.max(outage_since));
            if now.duration_since(waiting_since) >= bound {
                tracing::warn!(uri = %self.target.uri, ?bound, op = %slot.kind(),
                    "NBD server unreachable for the reconnect bound; failing the operation");
                self.complete(idx, Err(io::Error::from_raw_os_error(libc::EIO)));
            }
        }
    }
}
