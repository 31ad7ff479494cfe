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

pub use crate::event::{Event, EventSender};

use crate::config::Config;
use crate::device::{Ctx, Device, DeviceKey, Effect, SessionSinks};
use crate::devmodel::{self, ClaimChange};
use crate::error::{DeviceError, StoreError};
use crate::event::{spawn_disconnect, spawn_open};
use crate::parse::parse_u32;
use crate::status::{DaemonStatus, DeviceStatus};
use crate::store::{join, Store, StoreExt};
use crate::vbd::{VbdEventSink, VbdFactory};

const TOKEN_PREFIX: &str = "xenblkd:";
const RELEASE_DOMAIN: &str = "@releaseDomain";
/// How often the loop wakes without events (shutdown deadline, retries).
const TICK: Duration = Duration::from_millis(100);
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
    /// Devices whose reconcile hit a transient store error, retried on the next tick.
    retry: BTreeSet<DeviceKey>,
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
        Manager {
            store,
            factory,
            config,
            home,
            devices: BTreeMap::new(),
            tx,
            rx,
            shutdown_deadline: None,
            retry: BTreeSet::new(),
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
            let first = match self.rx.recv_timeout(TICK) {
                Ok(ev) => Some(ev),
                Err(RecvTimeoutError::Timeout) => None,
                // Impossible while we hold `tx`; treat as shutdown.
                Err(RecvTimeoutError::Disconnected) => Some(Event::Shutdown),
            };
            let mut batch: Vec<Event> = first.into_iter().collect();
            batch.extend(self.rx.try_iter());
            self.process(batch)?;
            let now = Instant::now();
            if now.saturating_duration_since(self.suppressed_reported) >= SUPPRESSED_REPORT_PERIOD {
                self.suppressed_reported = now;
                for dev in self.devices.values_mut() {
                    dev.report_suppressed(now, false);
                }
            }
        }
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
        Ok(())
    }

    /// Handles one event: applies what it reports, and notes in `found` what it asks the
    /// batch to look at.
    fn handle(&mut self, ev: Event, found: &mut Found<'_>) {
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
                    warn!(device = %key, error = %e, "handling engine event");
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
                    warn!(device = %key, error = %e, "handling an opened storage");
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
            Event::RefreshSizes => {
                let ctx_parts = self.ctx_parts();
                for (key, dev) in self.devices.iter_mut() {
                    let Some(bt) = self.config.backend_type(&key.backend_type) else {
                        continue;
                    };
                    let ctx = ctx_parts.ctx(&self.store, &self.factory, &self.config, bt);
                    if let Err(e) = dev.refresh_size(&ctx) {
                        warn!(device = %key, error = %e, "size refresh");
                    }
                }
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
                    warn!(device = %key, error = %e, suppressed, "reconcile failed; will retry");
                }
            }
            None => warn!(device = %key, error = %e, "reconcile failed; will retry"),
        }
    }

    /// Maps a watch event to the devices (or backend types, domains) it concerns.
    fn route_watch(&self, path: &str, token: &str, found: &mut Found<'_>) {
        let Found {
            dirty,
            rescan,
            released,
            claims,
        } = found;
        let Some(what) = token.strip_prefix(TOKEN_PREFIX) else {
            debug!(%path, %token, "foreign watch token ignored");
            return;
        };
        if let Some(t) = what.strip_prefix("be:") {
            let dir = self.backend_dir(t);
            let Some(rest) = path.strip_prefix(&dir) else {
                return;
            };
            let mut parts = rest
                .trim_start_matches('/')
                .split('/')
                .filter(|s| !s.is_empty());
            let (Some(domid), Some(devid)) = (parts.next(), parts.next()) else {
                // The type or a domain directory itself changed: rescan it.
                rescan.insert(t.to_string());
                return;
            };
            let (Some(domid), Some(devid)) =
                (parse_u32(domid.as_bytes()), parse_u32(devid.as_bytes()))
            else {
                debug!(%path, "ignoring non-numeric backend entry");
                return;
            };
            if let Some(node) = parts.next() {
                if !RELEVANT_BACKEND_NODES.contains(&node) {
                    return;
                }
            }
            dirty.insert(DeviceKey {
                backend_type: t.to_string(),
                domid,
                devid,
            });
        } else if let Some(k) = what.strip_prefix("fe:") {
            if let Some(key) = parse_fe_token(k) {
                dirty.insert(key);
            }
        } else if what == "dm" {
            let root = devmodel::device_model_root(self.config.backend_domid);
            match devmodel::claim_change(&root, path) {
                Some(ClaimChange::All) => rescan.extend(self.claimed_type_names()),
                Some(ClaimChange::Domain(domid)) => {
                    claims.insert(domid);
                }
                None => {}
            }
        } else if what == "release" {
            // Which domain died is not said; check every domain we serve.
            let domids: BTreeSet<u32> = self.devices.keys().map(|k| k.domid).collect();
            for domid in domids {
                match self.domain_alive(domid) {
                    Ok(true) => {}
                    Ok(false) => {
                        info!(domid, "domain is gone");
                        released.insert(domid);
                        dirty.extend(self.devices.keys().filter(|k| k.domid == domid).cloned());
                    }
                    Err(e) => warn!(domid, error = %e, "checking domain"),
                }
            }
        }
    }

    /// Whether a domain still exists: xenstored still has it introduced (when the store
    /// can tell) and its home directory is still there.
    fn domain_alive(&self, domid: u32) -> Result<bool, StoreError> {
        if self.store.domain_introduced(domid)? == Some(false) {
            return Ok(false);
        }
        self.domain_exists(domid)
    }

    fn domain_exists(&self, domid: u32) -> Result<bool, StoreError> {
        match self.store.exists(&format!("/local/domain/{domid}")) {
            // A driver domain may not read other domains' homes: it cannot tell, so the
            // domain counts as alive (its frontend directory vanishing still tears down).
            Err(StoreError::Daemon { errno, .. }) if errno == "EACCES" => Ok(true),
            other => other,
        }
    }

    /// Lists `backend/<type>/*/*` and marks every device found (new or known) and every
    /// known device not found (removed) dirty.
    fn scan_type(&mut self, t: &str, dirty: &mut BTreeSet<DeviceKey>) -> Result<(), StoreError> {
        let dir = self.backend_dir(t);
        let mut found = BTreeSet::new();
        for domid in self.store.directory(&dir)?.unwrap_or_default() {
            let Some(domid_n) = parse_u32(domid.as_bytes()) else {
                continue;
            };
            for devid in self
                .store
                .directory(&join(&dir, &domid))?
                .unwrap_or_default()
            {
                let Some(devid_n) = parse_u32(devid.as_bytes()) else {
                    continue;
                };
                found.insert(DeviceKey {
                    backend_type: t.to_string(),
                    domid: domid_n,
                    devid: devid_n,
                });
            }
        }
        dirty.extend(
            self.devices
                .keys()
                .filter(|k| k.backend_type == t && !found.contains(k))
                .cloned(),
        );
        dirty.extend(found);
        Ok(())
    }

    /// Lists `backend/<type>/<domid>/*` and marks every device found and every known device
    /// of that domain and type dirty.
    fn scan_domain(
        &self,
        t: &str,
        domid: u32,
        dirty: &mut BTreeSet<DeviceKey>,
    ) -> Result<(), StoreError> {
        let dir = join(&self.backend_dir(t), &domid.to_string());
        for devid in self.store.directory(&dir)?.unwrap_or_default() {
            if let Some(devid) = parse_u32(devid.as_bytes()) {
                dirty.insert(DeviceKey {
                    backend_type: t.to_string(),
                    domid,
                    devid,
                });
            }
        }
        dirty.extend(
            self.devices
                .keys()
                .filter(|k| k.backend_type == t && k.domid == domid)
                .cloned(),
        );
        Ok(())
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
            // A device left behind by a domain that died while we were not running (or
            // before we saw it): never open its storage; tear down what is ours.
            if !self.domain_alive(key.domid)? {
                info!(device = %key, "device of a domain that no longer exists");
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
            info!(device = %key, "the device-model claim is gone: letting the device go");
        }
        dev.claimed = claimed;
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
                            warn!(device = %key, error = %e, "watching frontend state");
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
                    spawn_open(&self.tx, key, open_id, self.factory.clone(), config);
                }
                Effect::Disconnect { session, vbd } => {
                    let timeout = Duration::from_millis(self.config.drain_timeout_ms);
                    spawn_disconnect(&self.tx, key, session, vbd, timeout);
                }
                Effect::Forget => {
                    if let Some(mut dev) = self.devices.remove(key) {
                        if let Some(w) = dev.watched_frontend.take() {
                            let _ = self.store.unwatch(&w, &fe_token(key));
                        }
                        dev.report_suppressed(Instant::now(), true);
                    }
                    info!(device = %key, "device removed");
                }
            }
        }
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
            metrics: self.metrics.as_ref().map(|m| m()).unwrap_or_default(),
        }
    }
}

/// What a batch of watch events asks the manager to look at.
struct Found<'a> {
    /// Devices to reconcile.
    dirty: &'a mut BTreeSet<DeviceKey>,
    /// Backend types to list again.
    rescan: &'a mut BTreeSet<String>,
    /// Domains found dead.
    released: &'a mut BTreeSet<u32>,
    /// Domains whose device-model claim may have changed.
    claims: &'a mut BTreeSet<u32>,
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

fn fe_token(key: &DeviceKey) -> String {
    format!(
        "{TOKEN_PREFIX}fe:{}/{}/{}",
        key.backend_type, key.domid, key.devid
    )
}

fn parse_fe_token(s: &str) -> Option<DeviceKey> {
    let mut it = s.rsplitn(3, '/');
    let devid = parse_u32(it.next()?.as_bytes())?;
    let domid = parse_u32(it.next()?.as_bytes())?;
    let backend_type = it.next()?.to_string();
    Some(DeviceKey {
        backend_type,
        domid,
        devid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fe_tokens_round_trip() {
        let k = DeviceKey {
            backend_type: "vbd".into(),
            domid: 7,
            devid: 51712,
        };
        let t = fe_token(&k);
        assert_eq!(
            parse_fe_token(t.strip_prefix("xenblkd:fe:").unwrap()),
            Some(k)
        );
        assert_eq!(parse_fe_token("x/y"), None);
    }
}
