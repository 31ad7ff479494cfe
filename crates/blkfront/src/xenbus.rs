//! The xenstore handshake and device lifecycle of a frontend, as Linux's blkfront runs it.
//!
//! This module owns what `blkfront_probe`, `talk_to_blkback`, `blkfront_connect`,
//! `blkback_changed` and `blkfront_closing` do over xenbus:
//!
//! 1. read `backend` / `backend-id` from the frontend directory, write state
//!    Initialising, wait for the backend's InitWait;
//! 2. read `multi-queue-max-queues` and `max-ring-page-order`, build the rings, and write
//!    in one transaction `ring-page-order` (only for multi-page rings), `ring-ref` or
//!    `ring-ref%u`, `event-channel` (under `queue-%u/` with `multi-queue-num-queues` when
//!    there are several queues), `protocol` and `feature-persistent`; state Initialised;
//! 3. wait for the backend's Connected, read `sectors`, `info`, `sector-size`,
//!    `physical-sector-size`, `feature-flush-cache`, `feature-barrier`,
//!    `feature-discard` (+ `discard-granularity`, `discard-alignment`, `discard-secure`),
//!    `feature-persistent`, `feature-max-indirect-segments`; state Connected;
//! 4. afterwards a watcher thread follows the backend: Connected again means a resize
//!    (re-read `sectors`); Closing means stop and switch to Closed; Closed means the
//!    backend let go of everything, so the grants are ended.
//!
//! [`XenbusFrontend::reconnect`] runs the handshake again after the backend went Closed
//! (a guest reboot or a backend restart), with fresh rings.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};
use xenstore::{XsClient, XsOps};

use crate::config::FrontendConfig;
use crate::error::{Error, TeardownReport};
use crate::features::{self, parse_flag, parse_unsigned, BackendFeatures, DiscardParams};
use crate::frontend::{build_queue, release_resources, Frontend};
use crate::guest::Guest;
use crate::queue::QueueResources;

pub use xenstore::XenbusState;

const WATCH_TOKEN: &str = "blkfront-backend-state";

fn xs_err(what: &str, e: xenstore::Error) -> Error {
    Error::Xenbus(format!("{what}: {e}"))
}

/// What the watcher thread shares with the owner.
#[derive(Default)]
struct Lifecycle {
    state: Mutex<LifecycleState>,
    changed: Condvar,
}

#[derive(Default)]
struct LifecycleState {
    backend: Option<XenbusState>,
    /// The report of a teardown the watcher did when the backend closed.
    teardown: Option<TeardownReport>,
}

struct Watcher {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// A frontend connected through xenstore, with the thread that follows the backend.
pub struct XenbusFrontend {
    xs: Arc<XsClient>,
    guest: Arc<dyn Guest>,
    config: FrontendConfig,
    frontend_path: String,
    backend_path: String,
    handle: u16,
    frontend: Option<Arc<Frontend>>,
    lifecycle: Arc<Lifecycle>,
    watcher: Option<Watcher>,
}

impl std::fmt::Debug for XenbusFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenbusFrontend")
            .field("frontend_path", &self.frontend_path)
            .field("backend_path", &self.backend_path)
            .field("frontend", &self.frontend)
            .finish_non_exhaustive()
    }
}

impl XenbusFrontend {
    /// Connects the device whose frontend directory is `frontend_path`
    /// (`/local/domain/<domid>/device/vbd/<devid>`), over `xs`, which this frontend uses
    /// alone (its watch events are consumed here). Blocks until Connected or
    /// `config.connect_timeout` passes in one of the waits.
    pub fn connect(
        guest: Arc<dyn Guest>,
        mut config: FrontendConfig,
        xs: XsClient,
        frontend_path: &str,
    ) -> Result<XenbusFrontend, Error> {
        let xs = Arc::new(xs);
        let fe = frontend_path.trim_end_matches('/').to_owned();
        let backend_path = read_str(&xs, &format!("{fe}/backend"))?
            .ok_or_else(|| Error::Xenbus(format!("{fe}/backend is missing")))?;
        if let Some(id) = parse_unsigned(read_str(&xs, &format!("{fe}/backend-id"))?.as_deref()) {
            config.backend_domid = u16::try_from(id)
                .map_err(|_| Error::Xenbus(format!("backend-id {id} is not a domain id")))?;
        }
        let handle = fe
            .rsplit('/')
            .next()
            .and_then(|d| d.parse::<u16>().ok())
            .unwrap_or(0);
        xs.watch(&format!("{backend_path}/state"), WATCH_TOKEN)
            .map_err(|e| xs_err("watching the backend state", e))?;
        let mut this = XenbusFrontend {
            xs,
            guest,
            config,
            frontend_path: fe,
            backend_path,
            handle,
            frontend: None,
            lifecycle: Arc::new(Lifecycle::default()),
            watcher: None,
        };
        this.handshake()?;
        Ok(this)
    }

    /// The device. After the backend closed it, it refuses I/O with [`Error::Closed`]
    /// until [`XenbusFrontend::reconnect`]; `None` after [`XenbusFrontend::close`].
    pub fn frontend(&self) -> Option<&Arc<Frontend>> {
        self.frontend.as_ref()
    }

    /// The frontend's xenstore directory.
    pub fn frontend_path(&self) -> &str {
        &self.frontend_path
    }

    /// The backend's xenstore directory.
    pub fn backend_path(&self) -> &str {
        &self.backend_path
    }

    /// The backend's state as the watcher last saw it.
    pub fn backend_state(&self) -> Option<XenbusState> {
        lock(&self.lifecycle.state).backend
    }

    /// Waits until the backend reaches `want` (as seen by the watcher).
    pub fn wait_backend_state(&self, want: XenbusState, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.lifecycle.state);
        while st.backend != Some(want) {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Xenbus(format!(
                    "backend did not reach {want:?} (is {:?})",
                    st.backend
                )));
            }
            st = self
                .lifecycle
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// The teardown the watcher performed when the backend went Closed, if it did.
    pub fn take_teardown_report(&self) -> Option<TeardownReport> {
        lock(&self.lifecycle.state).teardown.take()
    }

    /// Guest-initiated disconnect (device removal, shutdown): state Closing, then Closed
    /// once the backend acknowledged, then — after the backend went Closed and unmapped
    /// everything, or after the timeout — every grant is ended.
    pub fn close(&mut self) -> Result<TeardownReport, Error> {
        let timeout = self.config.connect_timeout;
        self.write_state(XenbusState::Closing)?;
        // The backend answers Closing; blkback then disconnects when we write Closed.
        let _ = self.wait_backend_at_least(XenbusState::Closing, timeout);
        self.write_state(XenbusState::Closed)?;
        let _ = self.wait_backend_at_least(XenbusState::Closed, timeout);
        self.stop_watcher();
        let mut report = self.take_teardown_report().unwrap_or_default();
        if let Some(fe) = self.frontend.take() {
            let r = fe.close();
            report.grants_ended += r.grants_ended;
            report.aborted_requests += r.aborted_requests;
            report.still_mapped.extend(r.still_mapped);
        }
        Ok(report)
    }

    /// Connects again after the backend closed (guest reboot, backend restart): ends
    /// whatever grants are left, writes Initialising and runs the whole handshake with
    /// new rings.
    pub fn reconnect(&mut self) -> Result<(), Error> {
        self.stop_watcher();
        if let Some(fe) = self.frontend.take() {
            let r = fe.close();
            if !r.is_clean() {
                warn!(?r, "reconnecting while the backend still maps old grants");
            }
        }
        lock(&self.lifecycle.state).teardown = None;
        self.handshake()
    }

    // ----- the handshake -----------------------------------------------------------

    fn handshake(&mut self) -> Result<(), Error> {
        let timeout = self.config.connect_timeout;
        self.write_state(XenbusState::Initialising)?;
        let st = self.wait_backend(timeout, |s| {
            matches!(
                s,
                XenbusState::InitWait
                    | XenbusState::Connected
                    | XenbusState::Closing
                    | XenbusState::Closed
            )
        })?;
        if st >= XenbusState::Closing {
            // A backend that gives up says why in its `error` node ("<errno> <message>",
            // xenbus_dev_fatal); pass the cause on rather than only the state.
            let why = read_str(&self.xs, &format!("{}/error", self.backend_path))
                .ok()
                .flatten()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            return Err(Error::Xenbus(format!(
                "backend is {st:?}, not waiting for us{why}"
            )));
        }
        let be = self.backend_path.clone();
        let max_queues = self
            .read_u64(&format!("{be}/multi-queue-max-queues"))?
            .unwrap_or(1);
        let max_order = self
            .read_u64(&format!("{be}/max-ring-page-order"))?
            .unwrap_or(0);
        let queues = features::negotiate_queues(&self.config, clamp_u32(max_queues));
        let order = features::negotiate_ring_order(&self.config, clamp_u32(max_order));
        let mut built: Vec<QueueResources> = Vec::with_capacity(queues as usize);
        for _ in 0..queues {
            match build_queue(&self.guest, &self.config, order) {
                Ok(q) => built.push(q),
                Err(e) => {
                    release_resources(&self.guest, built);
                    return Err(e);
                }
            }
        }
        if let Err(e) = self.publish_rings(&built, order) {
            release_resources(&self.guest, built);
            return Err(e);
        }
        if let Err(e) = self.write_state(XenbusState::Initialised) {
            release_resources(&self.guest, built);
            return Err(e);
        }
        let st = match self.wait_backend(timeout, |s| s >= XenbusState::Connected) {
            Ok(s) => s,
            Err(e) => {
                release_resources(&self.guest, built);
                return Err(e);
            }
        };
        if st != XenbusState::Connected {
            release_resources(&self.guest, built);
            return Err(Error::Xenbus(format!(
                "backend went {st:?} instead of Connected"
            )));
        }
        let offer = match self.read_backend_features(max_queues, max_order) {
            Ok(o) => o,
            Err(e) => {
                release_resources(&self.guest, built);
                return Err(e);
            }
        };
        let Some(disk) = features::disk_info(&offer) else {
            release_resources(&self.guest, built);
            return Err(Error::Xenbus(format!(
                "bad sector-size {}",
                offer.sector_size
            )));
        };
        let negotiated = features::negotiate(&self.config, &offer, queues, order);
        let fe = Arc::new(Frontend::assemble(
            self.guest.clone(),
            self.config.clone(),
            negotiated,
            disk,
            built,
            self.handle,
        ));
        self.write_state(XenbusState::Connected)?;
        info!(frontend = %self.frontend_path, backend = %self.backend_path, "xenbus: connected");
        lock(&self.lifecycle.state).backend = Some(XenbusState::Connected);
        self.frontend = Some(fe.clone());
        self.start_watcher(fe);
        Ok(())
    }

    /// `talk_to_blkback`'s transaction.
    fn publish_rings(&self, queues: &[QueueResources], order: u32) -> Result<(), Error> {
        let fe = &self.frontend_path;
        let cfg = &self.config;
        let multi_page = order > 0 || !cfg.legacy_single_ring_ref;
        self.xs
            .transaction(|tx| {
                if multi_page {
                    tx.write(&format!("{fe}/ring-page-order"), order.to_string())?;
                }
                let dirs: Vec<String> = if queues.len() == 1 {
                    vec![fe.clone()]
                } else {
                    tx.write(
                        &format!("{fe}/multi-queue-num-queues"),
                        queues.len().to_string(),
                    )?;
                    (0..queues.len())
                        .map(|i| format!("{fe}/queue-{i}"))
                        .collect()
                };
                for (dir, q) in dirs.iter().zip(queues) {
                    if multi_page {
                        for (i, g) in q.ring_grefs.iter().enumerate() {
                            tx.write(&format!("{dir}/ring-ref{i}"), g.to_string())?;
                        }
                    } else {
                        tx.write(&format!("{dir}/ring-ref"), q.ring_grefs[0].to_string())?;
                    }
                    tx.write(&format!("{dir}/event-channel"), q.evtchn.port().to_string())?;
                }
                if cfg.write_protocol {
                    tx.write(&format!("{fe}/protocol"), cfg.protocol.xenstore_name())?;
                }
                tx.write(
                    &format!("{fe}/feature-persistent"),
                    if cfg.persistent { "1" } else { "0" },
                )?;
                Ok(())
            })
            .map_err(|e| xs_err("publishing the rings", e))
    }

    /// `blkfront_connect` + `blkfront_gather_backend_features`.
    fn read_backend_features(
        &self,
        max_queues: u64,
        max_order: u64,
    ) -> Result<BackendFeatures, Error> {
        let be = self.backend_path.clone();
        let rd = |k: &str| read_str(&self.xs, &format!("{be}/{k}"));
        let sectors = parse_unsigned(rd("sectors")?.as_deref())
            .ok_or_else(|| Error::Xenbus(format!("{be}/sectors is missing or bad")))?;
        let sector_size = parse_unsigned(rd("sector-size")?.as_deref())
            .ok_or_else(|| Error::Xenbus(format!("{be}/sector-size is missing or bad")))?;
        let discard = if parse_flag(rd("feature-discard")?.as_deref()) {
            Some(DiscardParams {
                granularity: clamp_u32(
                    parse_unsigned(rd("discard-granularity")?.as_deref()).unwrap_or(0),
                ),
                alignment: clamp_u32(
                    parse_unsigned(rd("discard-alignment")?.as_deref()).unwrap_or(0),
                ),
                secure: parse_flag(rd("discard-secure")?.as_deref()),
            })
        } else {
            None
        };
        Ok(BackendFeatures {
            max_queues: clamp_u32(max_queues),
            max_ring_page_order: clamp_u32(max_order),
            persistent: parse_flag(rd("feature-persistent")?.as_deref()),
            max_indirect_segments: clamp_u32(
                parse_unsigned(rd("feature-max-indirect-segments")?.as_deref()).unwrap_or(0),
            ),
            flush_cache: parse_flag(rd("feature-flush-cache")?.as_deref()),
            barrier: parse_flag(rd("feature-barrier")?.as_deref()),
            discard,
            sectors,
            info: clamp_u32(parse_unsigned(rd("info")?.as_deref()).unwrap_or(0)),
            sector_size: clamp_u32(sector_size),
            physical_sector_size: clamp_u32(
                parse_unsigned(rd("physical-sector-size")?.as_deref()).unwrap_or(0),
            ),
        })
    }

    // ----- helpers ---------------------------------------------------------------

    fn read_u64(&self, path: &str) -> Result<Option<u64>, Error> {
        Ok(parse_unsigned(read_str(&self.xs, path)?.as_deref()))
    }

    fn write_state(&self, s: XenbusState) -> Result<(), Error> {
        debug!(frontend = %self.frontend_path, state = ?s, "xenbus: switching state");
        self.xs
            .write(
                &format!("{}/state", self.frontend_path),
                s.as_u32().to_string(),
            )
            .map_err(|e| xs_err("writing the frontend state", e))
    }

    /// Waits (consuming watch events in this thread: the watcher is not running) until
    /// the backend state satisfies `pred`.
    fn wait_backend(
        &self,
        timeout: Duration,
        pred: impl Fn(XenbusState) -> bool,
    ) -> Result<XenbusState, Error> {
        let deadline = Instant::now() + timeout;
        let events = self.xs.watch_events();
        let state_path = format!("{}/state", self.backend_path);
        loop {
            let s = XenbusState::read(
                read_str(&self.xs, &state_path)?
                    .as_deref()
                    .map(str::as_bytes),
            );
            if pred(s) {
                return Ok(s);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Xenbus(format!(
                    "timed out waiting for the backend (state {s:?})"
                )));
            }
            // Any event (or a timeout slice) is a reason to look again.
            let _ = events.recv_timeout((deadline - now).min(WATCH_SLICE));
        }
    }

    fn wait_backend_at_least(&self, want: XenbusState, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.lifecycle.state);
        loop {
            if st.backend.is_some_and(|s| s >= want) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline || self.watcher.is_none() {
                drop(st);
                // No watcher (or it missed it): read directly.
                let s = XenbusState::read(
                    read_str(&self.xs, &format!("{}/state", self.backend_path))?
                        .as_deref()
                        .map(str::as_bytes),
                );
                return if s >= want {
                    Ok(())
                } else {
                    Err(Error::Xenbus(format!(
                        "backend stayed {s:?}, wanted {want:?}"
                    )))
                };
            }
            st = self
                .lifecycle
                .changed
                .wait_timeout(st, (deadline - now).min(Duration::from_millis(100)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn start_watcher(&mut self, fe: Arc<Frontend>) {
        let stop = Arc::new(AtomicBool::new(false));
        let ctx = WatchCtx {
            xs: self.xs.clone(),
            frontend_path: self.frontend_path.clone(),
            backend_path: self.backend_path.clone(),
            lifecycle: self.lifecycle.clone(),
            stop: stop.clone(),
            fe,
        };
        let thread = std::thread::Builder::new()
            .name("blkfront-xenbus".into())
            .spawn(move || ctx.run())
            .expect("spawning the blkfront xenbus watcher");
        self.watcher = Some(Watcher { stop, thread });
    }

    fn stop_watcher(&mut self) {
        if let Some(w) = self.watcher.take() {
            w.stop.store(true, Ordering::Release);
            // A watch fires once when registered: the watcher wakes now instead of at the
            // end of its slice. Best effort: on a dead connection the slice ends it.
            let path = format!("{}/state", self.backend_path);
            let nudged = self.xs.watch(&path, STOP_TOKEN).is_ok();
            let _ = w.thread.join();
            if nudged {
                let _ = self.xs.unwatch(&path, STOP_TOKEN);
            }
        }
    }
}

impl Drop for XenbusFrontend {
    fn drop(&mut self) {
        self.stop_watcher();
        let _ = self
            .xs
            .unwatch(&format!("{}/state", self.backend_path), WATCH_TOKEN);
    }
}

/// How often the watch thread re-reads the backend's state without an event.
const WATCH_SLICE: Duration = Duration::from_secs(1);

/// The token of the watch that wakes the watch thread to stop.
const STOP_TOKEN: &str = "blkfront-stop";

struct WatchCtx {
    xs: Arc<XsClient>,
    frontend_path: String,
    backend_path: String,
    lifecycle: Arc<Lifecycle>,
    stop: Arc<AtomicBool>,
    fe: Arc<Frontend>,
}

impl WatchCtx {
    /// `blkback_changed`, in a loop.
    fn run(self) {
        let events = self.xs.watch_events();
        let state_path = format!("{}/state", self.backend_path);
        let mut closed_done = false;
        while !self.stop.load(Ordering::Acquire) {
            // Re-read on every event, and once a slice without one: a missed event costs a
            // slice only. Stopping sends an event of its own (`stop_watcher`). The slice
            // was 50 ms: with 1,000 disks connected (scripts/many-vbds) that was 20,000
            // wake-ups and xenstore reads a second, which slowed the simulated xenstored
            // (connecting 1,000 disks took minutes) and took a sixth of two CPUs under load.
            let _ = events.recv_timeout(WATCH_SLICE);
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            let Ok(v) = read_str(&self.xs, &state_path) else {
                continue;
            };
            let s = XenbusState::read(v.as_deref().map(str::as_bytes));
            let prev = {
                let mut st = lock(&self.lifecycle.state);
                let prev = st.backend.replace(s);
                self.lifecycle.changed.notify_all();
                prev
            };
            match s {
                XenbusState::Connected => {
                    // blkback rewrites its state after a resize: re-read `sectors`.
                    if let Ok(Some(n)) =
                        read_str(&self.xs, &format!("{}/sectors", self.backend_path))
                            .map(|v| parse_unsigned(v.as_deref()))
                    {
                        self.fe.set_capacity_sectors(n);
                    }
                }
                XenbusState::Closing if prev != Some(XenbusState::Closing) => {
                    // `blkfront_closing`: no more requests, then Closed so the backend
                    // disconnects.
                    info!(frontend = %self.frontend_path, "xenbus: backend closing");
                    self.fe.stop();
                    let _ = self.xs.write(
                        &format!("{}/state", self.frontend_path),
                        XenbusState::Closed.as_u32().to_string(),
                    );
                }
                XenbusState::Closed if !closed_done => {
                    // The backend unmapped everything: end the grants now.
                    self.fe.stop();
                    let report = self.fe.close();
                    closed_done = true;
                    let _ = self.xs.write(
                        &format!("{}/state", self.frontend_path),
                        XenbusState::Closed.as_u32().to_string(),
                    );
                    lock(&self.lifecycle.state).teardown = Some(report);
                    self.lifecycle.changed.notify_all();
                }
                _ => {}
            }
        }
    }
}

fn read_str(xs: &XsClient, path: &str) -> Result<Option<String>, Error> {
    xs.read_opt(path)
        .map(|o| o.map(|v| String::from_utf8_lossy(&v).into_owned()))
        .map_err(|e| xs_err(&format!("reading {path}"), e))
}

fn clamp_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
