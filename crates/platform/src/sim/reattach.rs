//! A simulated guest that outlives its backend process: a thread that notices the
//! backend's death ([`SimGuest::wait_backend_death`], which releases what the dead
//! process held, as Xen does) and offers the guest to the next process that listens on
//! the same socket ([`SimGuest::reattach`]), retrying with a short backoff until one
//! accepts. Nothing else of the guest changes: its frontends keep their rings, grants,
//! outstanding requests and xenstore nodes, and wait for the new process to answer.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::SimGuest;

/// How long one wait for the backend's death lasts before the thread checks whether it
/// should stop.
const WATCH_SLICE: Duration = Duration::from_millis(100);
/// First and longest pause between attempts to attach to the next backend process. The
/// longest pause adds to the guest's pause whenever the next daemon binds just after an
/// attempt (a guest on Xen waits for nothing of the kind), and an attempt costs a failed
/// `connect`: so it stays short (it was 100 ms, a part of a 353 ms handover pause).
const BACKOFF_MIN: Duration = Duration::from_millis(2);
const BACKOFF_MAX: Duration = Duration::from_millis(10);

/// What the reattach thread saw.
#[derive(Debug, Default)]
pub struct ReattachStats {
    deaths: AtomicU64,
    reattaches: AtomicU64,
    pins_released: AtomicU64,
    /// Longest time from a death noticed to the next attach, in microseconds.
    longest_outage_us: AtomicU64,
}

impl ReattachStats {
    /// Backend processes seen to die (or let go).
    pub fn deaths(&self) -> u64 {
        self.deaths.load(Ordering::Acquire)
    }

    /// Successful attaches to a following backend process.
    pub fn reattaches(&self) -> u64 {
        self.reattaches.load(Ordering::Acquire)
    }

    /// Grant pins released on behalf of dead processes, summed.
    pub fn pins_released(&self) -> u64 {
        self.pins_released.load(Ordering::Acquire)
    }

    /// Longest time the guest spent without a backend process.
    pub fn longest_outage(&self) -> Duration {
        Duration::from_micros(self.longest_outage_us.load(Ordering::Acquire))
    }
}

/// The thread keeping a guest attached; stops (and is joined) when dropped, or by itself
/// when the guest is dropped.
#[derive(Debug)]
pub struct Reattacher {
    stop: Arc<AtomicBool>,
    stats: Arc<ReattachStats>,
    thread: Option<JoinHandle<()>>,
}

impl Reattacher {
    /// Starts keeping `guest` attached to whichever backend process listens on `socket`.
    /// The guest is attached already (or is being attached by its owner): the thread
    /// waits for that backend's death first.
    pub fn spawn(guest: &Arc<SimGuest>, socket: PathBuf) -> io::Result<Reattacher> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ReattachStats::default());
        let thread = {
            let (stop, stats) = (stop.clone(), stats.clone());
            let weak = Arc::downgrade(guest);
            std::thread::Builder::new()
                .name(format!("sim-reattach-d{}", guest.domid()))
                .spawn(move || run(&weak, &socket, &stop, &stats))?
        };
        Ok(Reattacher {
            stop,
            stats,
            thread: Some(thread),
        })
    }

    pub fn stats(&self) -> &Arc<ReattachStats> {
        &self.stats
    }
}

impl Drop for Reattacher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(guest: &Weak<SimGuest>, socket: &PathBuf, stop: &AtomicBool, stats: &ReattachStats) {
    let mut gone_since: Option<Instant> = None;
    let mut backoff = BACKOFF_MIN;
    while !stop.load(Ordering::Acquire) {
        let Some(g) = guest.upgrade() else {
            return;
        };
        if g.is_attached() {
            if let Some(death) = g.wait_backend_death(WATCH_SLICE) {
                stats.deaths.fetch_add(1, Ordering::AcqRel);
                stats
                    .pins_released
                    .fetch_add(death.pins_released as u64, Ordering::AcqRel);
                gone_since = Some(Instant::now());
                backoff = BACKOFF_MIN;
            }
            continue;
        }
        match g.reattach(socket) {
            Ok(()) => {
                stats.reattaches.fetch_add(1, Ordering::AcqRel);
                if let Some(t) = gone_since.take() {
                    let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
                    stats.longest_outage_us.fetch_max(us, Ordering::AcqRel);
                    tracing::info!(
                        domid = g.domid(),
                        outage_ms = us / 1000,
                        "attached to the next backend process"
                    );
                }
            }
            Err(e) => {
                // No one listening yet (ECONNREFUSED, ENOENT), or a process still
                // starting: keep trying.
                tracing::debug!(domid = g.domid(), error = %e, "reattach");
                drop(g);
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}
