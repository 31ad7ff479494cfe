//! The control loop: watches the backend directories of the types we serve, keeps the
//! device table, routes events to devices, answers status queries and shuts down cleanly.
//!
//! Everything arrives on one channel ([`Event`]): xenstore watch events (forwarded by
//! whoever owns the connection), engine reports, finished disconnects, status queries and
//! the shutdown request. One thread runs [`Manager::run`]; devices are reconciled in
//! batches: all pending events are drained first and each affected device is reconciled
//! once, so the burst of watch events a transaction causes costs one pass per device.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

pub use crate::event::{DeviceOp, Event, EventSender};

use crate::config::Config;
use crate::device::{Ctx, Device, DeviceKey, Effect, SessionSinks};
use crate::devmodel;
use crate::error::{DeviceError, StoreError};
use crate::event::{spawn_disconnect, spawn_open};
use crate::status::{DaemonStatus, DeviceStatus};
use crate::store::{Store, StoreExt};
use crate::vbd::{VbdEventSink, VbdFactory};

mod watch;

use watch::{fe_token, Found};

const TOKEN_PREFIX: &str = "xenblkd:";
const RELEASE_DOMAIN: &str = "@releaseDomain";
/// How often the loop wakes without events (shutdown deadline, retries).
const TICK: Duration = Duration::from_millis(100);
/// How often an adoption waiting for its frontend's domain is retried, for its first
/// [`ADOPTION_FAST_RETRY_FOR`]: a handover's pause includes the wait, so it is retried
/// sooner than every tick (in the simulator the guest attaches to the new daemon, and
/// offers its ports, a few milliseconds after it started; one tick lost there was part of
/// a 353 ms handover pause). Later, every tick.
const ADOPTION_RETRY: Duration = Duration::from_millis(5);
const ADOPTION_FAST_RETRY_FOR: Duration = Duration::from_secs(2);
/// How often devices are asked for the counts of warnings they suppressed.
const SUPPRESSED_REPORT_PERIOD: Duration = Duration::from_secs(1);
/// Backend nodes whose change can move a device; writes to any other node (most of them
/// ours: features, sectors) are ignored instead of re-reading the whole device.
const RELEVANT_BACKEND_NODES: &[&str] = &[
    "state",
    "online",
    "physical-device",
    "physical-device-path",
    "params",
    "mode",
    "frontend",
    "frontend-id",
];

/// The device manager.
pub struct Manager {
    store: Arc<dyn Store>,
    factory: Arc<dyn VbdFactory>,
    config: Config,
    home: String,
    devices: BTreeMap<DeviceKey, Device>,
    tx: Sender<Event>,
    rx: Receiver<Event>,
    /// Set when shutdown was requested: the deadline after which devices are forced.
    shutdown_deadline: Option<Instant>,
    /// Set when a handover was asked for: no device is reconciled any more (nothing is
    /// written), connected rings are drained and released, then `run` returns.
    handing_over: bool,
    /// Devices whose reconcile hit a transient store error, retried on the next tick.
    retry: BTreeSet<DeviceKey>,
    /// Adoptions waiting for their frontend's domain, since when: retried every
    /// [`ADOPTION_RETRY`] at first.
    adoption_waits: BTreeMap<DeviceKey, Instant>,
    /// Daemon-wide gauges for status replies.
    metrics: Option<Metrics>,
    /// A scan failed transiently; scan every type again on the next tick.
    rescan_pending: bool,
    /// When devices last reported their suppressed warnings.
    suppressed_reported: Instant,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("home", &self.home)
            .field("devices", &self.devices)
            .field("shutting_down", &self.shutdown_deadline.is_some())
            .finish_non_exhaustive()
    }
}

/// Produces the daemon-wide gauges of a status reply.
pub type Metrics = Box<dyn Fn() -> BTreeMap<String, u64> + Send>;

impl Manager {
    /// A manager serving `config.backend_types` under `/local/domain/<backend_domid>`.
    pub fn new(store: Arc<dyn Store>, factory: Arc<dyn VbdFactory>, config: Config) -> Manager {
        let (tx, rx) = mpsc::channel();
        let home = format!("/local/domain/{}", config.backend_domid);
        crate::qos::apply_groups(&config.qos.groups, factory.as_ref());
        Manager {
            store,
            factory,
            config,
            home,
            devices: BTreeMap::new(),
            tx,
            rx,
            shutdown_deadline: None,
            handing_over: false,
            retry: BTreeSet::new(),
            adoption_waits: BTreeMap::new(),
            metrics: None,
            rescan_pending: false,
            suppressed_reported: Instant::now(),
        }
    }

    /// Adds daemon-wide gauges (grant mappings, fds, threads) to status replies.
    pub fn set_metrics(&mut self, metrics: Metrics) {
        self.metrics = Some(metrics);
    }

    /// A handle to send events (watch events, shutdown, status queries).
    pub fn sender(&self) -> EventSender {
        EventSender::new(self.tx.clone())
    }

    /// The backend directory of a type: `/local/domain/<id>/backend/<type>`.
    pub fn backend_dir(&self, backend_type: &str) -> String {
        format!("{}/backend/{backend_type}", self.home)
    }

    /// Registers the watches. Each fires once right away, which triggers the initial scan.
    pub fn start(&mut self) -> Result<(), StoreError> {
        for t in self.config.backend_types.clone() {
            let dir = self.backend_dir(&t.name);
            info!(path = %dir, wait_for_hotplug = t.wait_for_hotplug, "serving backend type");
            self.store
                .watch(&dir, &format!("{TOKEN_PREFIX}be:{}", t.name))?;
        }
        if self.serves_claimed_types() {
            let root = devmodel::device_model_root(self.config.backend_domid);
            info!(path = %root, "serving qdisk devices only of domains claimed by `xenblkd qemu-dm`");
            self.store.watch(&root, &format!("{TOKEN_PREFIX}dm"))?;
        }
        self.store
            .watch(RELEASE_DOMAIN, &format!("{TOKEN_PREFIX}release"))?;
        Ok(())
    }

    fn serves_claimed_types(&self) -> bool {
        self.config
            .backend_types
            .iter()
            .any(|t| t.requires_device_model_claim())
    }

    fn claimed_type_names(&self) -> Vec<String> {
        self.config
            .backend_types
            .iter()
            .filter(|t| t.requires_device_model_claim())
            .map(|t| t.name.clone())
            .collect()
    }

    /// Runs until shutdown completes (every device closed and disconnected), or the
    /// xenstore connection is lost.
    pub fn run(&mut self) -> Result<(), StoreError> {
        loop {
            if self.handing_over && !self.devices.values().any(Device::busy) {
                info!("every device is handed over");
                return Ok(());
            }
            if let Some(deadline) = self.shutdown_deadline {
                if !self.devices.values().any(Device::busy) {
                    info!("every device is closed");
                    return Ok(());
                }
                if Instant::now() >= deadline {
                    warn!("shutdown deadline passed; forcing the remaining devices down");
                    self.force_all();
                    return Ok(());
                }
            }
            let wait = if self
                .adoption_waits
                .values()
                .any(|since| since.elapsed() < ADOPTION_FAST_RETRY_FOR)
            {
                ADOPTION_RETRY
            } else {
                TICK
            };
            self.step(wait)?;
        }
    }

    /// One turn of [`Manager::run`]: waits up to `wait` for an event, then handles it and
    /// everything else already queued as one batch. Returns how many events it handled.
    /// Lets a caller that owns the thread (a test, a fuzz target) drive the manager
    /// deterministically, without the shutdown logic of `run`.
    pub fn step(&mut self, wait: Duration) -> Result<usize, StoreError> {
        let first = match self.rx.recv_timeout(wait) {
            Ok(ev) => Some(ev),
            Err(RecvTimeoutError::Timeout) => None,
            // Impossible while we hold `tx`; treat as shutdown.
            Err(RecvTimeoutError::Disconnected) => Some(Event::Shutdown),
        };
        let mut batch: Vec<Event> = first.into_iter().collect();
        batch.extend(self.rx.try_iter());
        let handled = batch.len();
        self.process(batch)?;
        let now = Instant::now();
        if now.saturating_duration_since(self.suppressed_reported) >= SUPPRESSED_REPORT_PERIOD {
            self.suppressed_reported = now;
            for dev in self.devices.values_mut() {
                dev.report_suppressed(now, false);
            }
        }
        Ok(handled)
    }

    /// Handles a batch of events, then reconciles every device they touched once.
    pub fn process(&mut self, batch: Vec<Event>) -> Result<(), StoreError> {
        let mut dirty: BTreeSet<DeviceKey> = std::mem::take(&mut self.retry);
        let mut rescan: BTreeSet<String> = BTreeSet::new();
        let mut claims: BTreeSet<u32> = BTreeSet::new();
        if std::mem::take(&mut self.rescan_pending) {
            rescan.extend(self.config.backend_types.iter().map(|t| t.name.clone()));
        }
        for ev in batch {
            let mut found = Found {
                dirty: &mut dirty,
                rescan: &mut rescan,
                released: &mut BTreeSet::new(),
                claims: &mut claims,
            };
            self.handle(ev, &mut found);
        }
        if self.handing_over {
            // Nothing is read or written for any device any more: the next daemon takes
            // them as xenstore and the rings show them.
            self.adoption_waits.clear();
            return Ok(());
        }
        for domid in claims {
            // A claim came or went: every device of that domain under a claimed type, known
            // or not (unclaimed ones were never taken into the table).
            for t in self.claimed_type_names() {
                if let Err(e) = self.scan_domain(&t, domid, &mut dirty) {
                    if e.is_disconnected() {
                        return Err(e);
                    }
                    warn!(backend_type = %t, domid, error = %e, "scanning a claimed domain");
                    self.rescan_pending = true;
                }
            }
        }
        for t in rescan {
            if let Err(e) = self.scan_type(&t, &mut dirty) {
                if e.is_disconnected() {
                    return Err(e);
                }
                // Transient: try the whole type again on the next tick.
                warn!(backend_type = %t, error = %e, "scanning backend directory");
                self.rescan_pending = true;
            }
        }
        for key in dirty {
            if let Err(e) = self.reconcile(&key) {
                if e.is_disconnected() {
                    return Err(e);
                }
                self.reconcile_failed(&key, &e);
            }
        }
        // An adoption that went through (or became something else) waits no more.
        let retry = &self.retry;
        self.adoption_waits.retain(|key, _| retry.contains(key));
        Ok(())
    }

    /// Handles one event: applies what it reports, and notes in `found` what it asks the
    /// batch to look at.
    fn handle(&mut self, ev: Event, found: &mut Found<'_>) {
        if self.handing_over
            && matches!(
                ev,
                Event::Vbd { .. } | Event::Opened { .. } | Event::RefreshSizes
            )
        {
            // Each of these may write to xenstore; the next daemon sees for itself.
            return;
        }
        match ev {
            Event::Watch { path, token } => {
                self.route_watch(&path, &token, found);
                let released = &*found.released;
                for dev in self
                    .devices
                    .values_mut()
                    .filter(|d| released.contains(&d.key.domid))
                {
                    dev.domain_gone = true;
                }
            }
            Event::Rescan => {
                found
                    .rescan
                    .extend(self.config.backend_types.iter().map(|t| t.name.clone()));
                found.dirty.extend(self.devices.keys().cloned());
            }
            Event::Vbd {
                key,
                session,
                event,
            } => {
                let r = self.with_device(&key, found, |dev, ctx, fx| {
                    dev.vbd_event(ctx, session, event, fx)
                });
                if let Some(Err(e)) = r {
                    warn!(device = %key, domid = key.domid, error = %e, "handling engine event");
                }
            }
            Event::Opened {
                key,
                open_id,
                config,
                result,
            } => {
                let r = self.with_device(&key, found, |dev, ctx, fx| {
                    dev.opened(ctx, open_id, *config, result, fx)
                });
                if let Some(Err(e)) = r {
                    warn!(device = %key, domid = key.domid, error = %e, "handling an opened storage");
                    self.retry.insert(key);
                }
            }
            Event::Disconnected {
                key,
                session,
                result,
            } => {
                if let Some(dev) = self.devices.get_mut(&key) {
                    dev.disconnected(session, result);
                    found.dirty.insert(key);
                }
            }
            Event::Status(reply) => {
                let _ = reply.send((self.daemon_status(), self.status()));
            }
            Event::Device { device, op, reply } => self.device_op(&device, op, reply, found),
            Event::QosGroup {
                name,
                limits,
                reply,
            } => {
                let groups = &mut self.config.qos.groups;
                let answer = crate::qos::group_op(groups, self.factory.as_ref(), &name, limits);
                let _ = reply.send(answer);
            }
            Event::RefreshSizes => {
                let ctx_parts = self.ctx_parts();
                for (key, dev) in self.devices.iter_mut() {
                    let Some(bt) = self.config.backend_type(&key.backend_type) else {
                        continue;
                    };
                    let ctx = ctx_parts.ctx(&self.store, &self.factory, &self.config, bt);
                    if let Err(e) = dev.refresh_size(&ctx) {
                        warn!(device = %key, domid = key.domid, error = %e, "size refresh");
                    }
                }
            }
            Event::Handover => self.hand_over(),
            Event::Reload(config, reply) => {
                let report = self.config.reload_from(*config);
                // Groups apply at once: the file's limits, for every group it names.
                crate::qos::apply_groups(&self.config.qos.groups, self.factory.as_ref());
                let _ = reply.send(report);
            }
            Event::Shutdown if self.handing_over => {
                info!("shutdown asked during a handover: the handover goes on");
            }
            Event::Shutdown => {
                if self.shutdown_deadline.is_none() {
                    info!(
                        devices = self.devices.len(),
                        "shutting down: closing every device"
                    );
                    self.shutdown_deadline = Some(
                        Instant::now() + Duration::from_millis(self.config.drain_timeout_ms.max(1)),
                    );
                    found.dirty.extend(self.devices.keys().cloned());
                }
            }
        }
    }

    /// An operator's request about one device.
    fn device_op(
        &mut self,
        device: &str,
        op: DeviceOp,
        reply: crate::event::DeviceReply,
        found: &mut Found<'_>,
    ) {
        if self.handing_over || self.shutdown_deadline.is_some() {
            let _ = reply.send(Err("the daemon is handing over or shutting down".into()));
            return;
        }
        let key = match self.find_device(device) {
            Ok(key) => key,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        info!(device = %key, ?op, "operator request");
        let done = self.with_device(&key, found, |dev, ctx, fx| match op {
            DeviceOp::Pause => dev.pause(reply, fx),
            DeviceOp::Resume => dev.resume(ctx, reply, fx),
            DeviceOp::Reopen => dev.reopen(ctx, reply, fx),
            DeviceOp::Limit(change) => dev.limit(ctx, &change, reply),
        });
        if done.is_none() {
            warn!(device = %key, "the device or its type went away during the request");
        }
    }

    /// The device an operator names: `<type>/<domid>/<devid>`, or `<domid>/<devid>` when
    /// one type has it; `devid` may be a virtual device name (`xvdb`).
    fn find_device(&self, spec: &str) -> Result<DeviceKey, String> {
        let parts: Vec<&str> = spec.split('/').collect();
        let (backend_type, domid, dev) = match parts.as_slice() {
            [t, d, v] => (Some(*t), *d, *v),
            [d, v] => (None, *d, *v),
            _ => {
                return Err(format!(
                    "{spec:?}: expected [<type>/]<domid>/<devid or vdev>"
                ))
            }
        };
        let domid: u32 = domid
            .parse()
            .map_err(|_| format!("{spec:?}: bad domain id {domid:?}"))?;
        let devid = match dev.parse::<u32>() {
            Ok(n) => n,
            Err(_) => crate::vdev::parse_vdev(dev).map_err(|e| format!("{spec:?}: {e}"))?,
        };
        let mut matching = self.devices.keys().filter(|k| {
            k.domid == domid && k.devid == devid && backend_type.is_none_or(|t| k.backend_type == t)
        });
        match (matching.next(), matching.next()) {
            (Some(key), None) => Ok(key.clone()),
            (None, _) => Err(format!("no device {spec}")),
            (Some(_), Some(_)) => Err(format!(
                "{spec}: several backend types have this device; name the type"
            )),
        }
    }

    /// A device's reconcile failed on a store error: retried on the next tick, reported
    /// rate-limited (a guest can make its own nodes unreadable to a driver domain, and
    /// the retry comes every tick).
    fn reconcile_failed(&mut self, key: &DeviceKey, e: &dyn std::fmt::Display) {
        self.retry.insert(key.clone());
        match self.devices.get_mut(key) {
            Some(dev) => {
                if let Some(suppressed) = dev
                    .warnings
                    .admit(crate::ratelimit::Kind::ReconcileFailed, Instant::now())
                {
                    warn!(device = %key, domid = key.domid, error = %e, suppressed, "reconcile failed; will retry");
                }
            }
            None => {
                warn!(device = %key, domid = key.domid, error = %e, "reconcile failed; will retry")
            }
        }
    }

    /// Runs `f` on the device `key` with its context, applies the effects it pushed and
    /// marks the device for reconciling; `None` when the device or its type is gone.
    fn with_device<R>(
        &mut self,
        key: &DeviceKey,
        found: &mut Found<'_>,
        f: impl FnOnce(&mut Device, &Ctx<'_>, &mut Vec<Effect>) -> R,
    ) -> Option<R> {
        let ctx_parts = self.ctx_parts();
        let mut fx = Vec::new();
        let dev = self.devices.get_mut(key)?;
        let _guest = guest_span(dev.guest.as_deref()).entered();
        let bt = self.config.backend_type(&key.backend_type)?;
        let ctx = ctx_parts.ctx(&self.store, &self.factory, &self.config, bt);
        let r = f(dev, &ctx, &mut fx);
        self.apply(key, fx);
        found.dirty.insert(key.clone());
        Some(r)
    }

    fn ctx_parts(&self) -> CtxParts {
        CtxParts {
            tx: self.tx.clone(),
            shutting_down: self.shutdown_deadline.is_some(),
        }
    }

    /// The toolstack's name for domain `domid` (`/local/domain/<domid>/name`, which
    /// libxl writes and the guest cannot), made safe for a log line: printable
    /// characters only, at most [`MAX_GUEST_NAME`] of them. None when there is none.
    fn guest_name(&self, domid: u32) -> Option<String> {
        let raw = self
            .store
            .read_string(&format!("/local/domain/{domid}/name"))
            .ok()
            .flatten()?;
        let name: String = raw
            .chars()
            .filter(|c| !c.is_control())
            .take(MAX_GUEST_NAME)
            .collect();
        (!name.is_empty()).then_some(name)
    }

    /// Reconciles one device, creating it on first sight and forgetting it when done.
    fn reconcile(&mut self, key: &DeviceKey) -> Result<(), StoreError> {
        let Some(bt) = self.config.backend_type(&key.backend_type).cloned() else {
            return Ok(());
        };
        let claimed = !bt.requires_device_model_claim()
            || devmodel::is_claimed(self.store.as_ref(), self.config.backend_domid, key.domid)?;
        if !self.devices.contains_key(key) {
            let backend_path = format!(
                "{}/{}/{}",
                self.backend_dir(&key.backend_type),
                key.domid,
                key.devid
            );
            if !self.store.exists(&backend_path)? {
                return Ok(());
            }
            if self.shutdown_deadline.is_some() {
                // Not the time to start serving new devices.
                return Ok(());
            }
            if !claimed {
                // QEMU's device (or nobody's yet): not a node read beyond this, not a write.
                debug!(device = %key, "no `xenblkd qemu-dm` claims this domain; not ours");
                return Ok(());
            }
            debug!(device = %key, "new device");
            let mut dev = Device::new(key.clone(), backend_path);
            dev.guest = self.guest_name(key.domid);
            // A device left behind by a domain that died while we were not running (or
            // before we saw it): never open its storage; tear down what is ours.
            if !self.domain_alive(key.domid)? {
                info!(device = %key, domid = key.domid, "device of a domain that no longer exists");
                dev.domain_gone = true;
            }
            self.devices.insert(key.clone(), dev);
        }
        let parts = self.ctx_parts();
        // A domain found dead on @releaseDomain stays dead until it is seen alive again
        // (a new domain reusing the id).
        let still_gone = match self.devices.get(key) {
            Some(d) if d.domain_gone => !self.domain_alive(key.domid)?,
            _ => false,
        };
        let Some(dev) = self.devices.get_mut(key) else {
            return Ok(());
        };
        dev.domain_gone = still_gone;
        if dev.claimed && !claimed {
            info!(device = %key, domid = key.domid, "the device-model claim is gone: letting the device go");
        }
        dev.claimed = claimed;
        let _guest = guest_span(dev.guest.as_deref()).entered();
        let ctx = parts.ctx(&self.store, &self.factory, &self.config, &bt);
        let mut fx = Vec::new();
        let result = dev.reconcile(&ctx, &mut fx);
        self.apply(key, fx);
        match result {
            Ok(()) => {}
            Err(DeviceError::Store(e)) if e.is_disconnected() => return Err(e),
            Err(e) => self.reconcile_failed(key, &e),
        }
        Ok(())
    }

    /// Does what a device asked for in its last call.
    fn apply(&mut self, key: &DeviceKey, effects: Vec<Effect>) {
        for effect in effects {
            let Some(dev) = self.devices.get_mut(key) else {
                return;
            };
            match effect {
                Effect::WatchFrontend(state) => {
                    if let Some(old) = dev.watched_frontend.take() {
                        let _ = self.store.unwatch(&old, &fe_token(key));
                    }
                    match self.store.watch(&state, &fe_token(key)) {
                        Ok(()) => dev.watched_frontend = Some(state),
                        Err(e) => {
                            warn!(device = %key, domid = key.domid, error = %e, "watching frontend state");
                            self.retry.insert(key.clone());
                        }
                    }
                }
                Effect::UnwatchFrontend => {
                    if let Some(w) = dev.watched_frontend.take() {
                        let _ = self.store.unwatch(&w, &fe_token(key));
                    }
                }
                Effect::Open { open_id, config } => {
                    spawn_open(&self.tx, key, open_id, self.factory.clone(), *config);
                }
                Effect::Disconnect { session, vbd } => {
                    let timeout = Duration::from_millis(self.config.drain_timeout_ms);
                    spawn_disconnect(&self.tx, key, session, vbd, timeout);
                }
                Effect::RetryLater => {
                    self.retry.insert(key.clone());
                    self.adoption_waits
                        .entry(key.clone())
                        .or_insert_with(Instant::now);
                }
                Effect::Forget => {
                    if let Some(mut dev) = self.devices.remove(key) {
                        if let Some(w) = dev.watched_frontend.take() {
                            let _ = self.store.unwatch(&w, &fe_token(key));
                        }
                        dev.report_suppressed(Instant::now(), true);
                    }
                    info!(device = %key, domid = key.domid, "device removed");
                }
            }
        }
    }

    /// Starts the handover: every connected device's rings are drained and released
    /// (their in-flight requests answered, the rest left on the ring for the next daemon),
    /// and nothing is written to xenstore from now on.
    fn hand_over(&mut self) {
        if self.handing_over {
            return;
        }
        if self.shutdown_deadline.is_some() {
            warn!("handover asked during a shutdown: devices are being closed already");
            return;
        }
        self.handing_over = true;
        self.factory.handing_over();
        let mut draining = 0;
        for key in self.devices.keys().cloned().collect::<Vec<_>>() {
            let mut fx = Vec::new();
            if let Some(dev) = self.devices.get_mut(&key) {
                draining += usize::from(dev.hand_over(&mut fx));
            }
            // Only disconnects: no watch changes, opens or retries any more.
            fx.retain(|e| matches!(e, Effect::Disconnect { .. }));
            self.apply(&key, fx);
        }
        info!(
            devices = self.devices.len(),
            draining, "handing over: answering in-flight requests, leaving xenstore as it is"
        );
    }

    /// Disconnects every device synchronously and writes Closed (shutdown deadline).
    fn force_all(&mut self) {
        let timeout = Duration::from_millis(self.config.drain_timeout_ms);
        for dev in self.devices.values_mut() {
            dev.force_disconnect(timeout);
            let _ = crate::negotiate::write_state(
                self.store.as_ref(),
                &dev.backend_path,
                crate::XenbusState::Closed,
            );
        }
    }

    /// Every device's status.
    pub fn status(&self) -> Vec<DeviceStatus> {
        self.devices.values().map(Device::status).collect()
    }

    fn daemon_status(&self) -> DaemonStatus {
        DaemonStatus {
            backend_types: self
                .config
                .backend_types
                .iter()
                .map(|t| t.name.clone())
                .collect(),
            home: self.home.clone(),
            shutting_down: self.shutdown_deadline.is_some(),
            handing_over: self.handing_over,
            metrics: self.metrics.as_ref().map(|m| m()).unwrap_or_default(),
            qos_groups: self.config.qos.groups.clone(),
        }
    }
}

/// The pieces of a [`Ctx`] that do not borrow the manager's device table.
struct CtxParts {
    tx: Sender<Event>,
    shutting_down: bool,
}

impl CtxParts {
    fn ctx<'a>(
        &'a self,
        store: &'a Arc<dyn Store>,
        factory: &'a Arc<dyn VbdFactory>,
        config: &'a Config,
        backend_type: &'a crate::config::BackendType,
    ) -> Ctx<'a> {
        Ctx {
            store,
            factory,
            config,
            backend_type,
            shutting_down: self.shutting_down,
            session_sink: self,
        }
    }
}

impl SessionSinks for CtxParts {
    /// The event sink of one session of one device.
    fn sink(&self, key: &DeviceKey, session: u64) -> VbdEventSink {
        let tx = self.tx.clone();
        let key = key.clone();
        VbdEventSink::new(move |event| {
            let _ = tx.send(Event::Vbd {
                key: key.clone(),
                session,
                event,
            });
        })
    }
}

/// The longest guest name a log line carries (libxl allows any length).
const MAX_GUEST_NAME: usize = 64;

/// A span naming the guest, entered while a device's events are handled, so that every
/// lifecycle line names the guest as well as the device: `guest{name=web01}:` on
/// stderr, a `GUEST_NAME` field in the journal.
fn guest_span(name: Option<&str>) -> tracing::Span {
    match name {
        Some(name) => tracing::info_span!("guest", name),
        None => tracing::Span::none(),
    }
}
