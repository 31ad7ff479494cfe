//! What reaches the control loop ([`Event`]), the handle other threads send it through
//! ([`EventSender`]), and the worker threads whose reports come back as events (storage
//! opens and disconnects, which can wait for storage and must not stall other devices).

use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, ReloadReport};
use crate::device::DeviceKey;
use crate::error::VbdError;
use crate::status::{DaemonStatus, DeviceStatus};
use crate::vbd::{ConnectedVbd, DeviceConfig, DisconnectReport, Storage, VbdEvent, VbdFactory};

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Watch { path, token } => f
                .debug_struct("Watch")
                .field("path", path)
                .field("token", token)
                .finish(),
            Event::Rescan => f.write_str("Rescan"),
            Event::Vbd {
                key,
                session,
                event,
            } => f
                .debug_struct("Vbd")
                .field("key", key)
                .field("session", session)
                .field("event", event)
                .finish(),
            Event::Disconnected {
                key,
                session,
                result,
            } => f
                .debug_struct("Disconnected")
                .field("key", key)
                .field("session", session)
                .field("result", result)
                .finish(),
            Event::Opened { key, open_id, .. } => f
                .debug_struct("Opened")
                .field("key", key)
                .field("open_id", open_id)
                .finish_non_exhaustive(),
            Event::Status(_) => f.write_str("Status"),
            Event::QosGroup { name, limits, .. } => f
                .debug_struct("QosGroup")
                .field("name", name)
                .field("limits", limits)
                .finish_non_exhaustive(),
            Event::Device { device, op, .. } => f
                .debug_struct("Device")
                .field("device", device)
                .field("op", op)
                .finish_non_exhaustive(),
            Event::RefreshSizes => f.write_str("RefreshSizes"),
            Event::Reload(..) => f.write_str("Reload"),
            Event::Shutdown => f.write_str("Shutdown"),
            Event::Handover => f.write_str("Handover"),
        }
    }
}

/// Something for the control loop.
pub enum Event {
    /// A xenstore watch fired.
    Watch {
        /// The path that changed.
        path: String,
        /// The watch's token.
        token: String,
    },
    /// Watch events were lost (queue overflow, reconnect): rescan everything.
    Rescan,
    /// An engine report about a device's session.
    Vbd {
        /// The device.
        key: DeviceKey,
        /// The session it is about.
        session: u64,
        /// What happened.
        event: VbdEvent,
    },
    /// A disconnect worker finished.
    Disconnected {
        /// The device.
        key: DeviceKey,
        /// The session that was disconnected.
        session: u64,
        /// How it went.
        result: Result<DisconnectReport, VbdError>,
    },
    /// A storage open finished on its worker thread.
    Opened {
        /// The device.
        key: DeviceKey,
        /// Which open it was.
        open_id: u64,
        /// The configuration it opened.
        config: Box<DeviceConfig>,
        /// The storage, or why not.
        result: Result<Arc<dyn Storage>, VbdError>,
    },
    /// A status query.
    Status(Sender<(DaemonStatus, Vec<DeviceStatus>)>),
    /// An operator's request about one device (`xenblkd pause|resume|reopen`).
    Device {
        /// The device as the operator named it: `[<type>/]<domid>/<devid or vdev>`.
        device: String,
        /// What to do.
        op: DeviceOp,
        /// Where the answer goes (a pause answers once drained).
        reply: DeviceReply,
    },
    /// Set (`Some`) or show (`None`) the limits of a QoS group (`xenblkd limit --group`).
    QosGroup {
        /// The group.
        name: String,
        /// Its new limits.
        limits: Option<crate::qos::QosLimits>,
        /// Where the answer goes.
        reply: DeviceReply,
    },
    /// Re-read every device's storage size (operator-triggered resize check).
    RefreshSizes,
    /// A re-read configuration (`systemctl reload`): takes what can change at run time
    /// ([`Config::reload_from`]) and answers what it took and left.
    Reload(Box<Config>, Sender<ReloadReport>),
    /// Close every device and stop.
    Shutdown,
    /// Hand every device over to the next daemon and stop: rings drained and released,
    /// nothing written to xenstore.
    Handover,
}

/// What an operator asks of one device (see `device::pause`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceOp {
    /// Stop taking requests, answer those in flight, release the rings; hold.
    Pause,
    /// Serve the rings again.
    Resume,
    /// While paused: close the storage and open what the backend's nodes name now.
    Reopen,
    /// Change (or show) the device's QoS limits and group.
    Limit(crate::qos::LimitChange),
}

pub use crate::device::DeviceReply;

/// A cloneable handle to send events to a [`Manager`] from any thread.
#[derive(Clone, Debug)]
pub struct EventSender(Sender<Event>);

impl EventSender {
    pub(crate) fn new(tx: Sender<Event>) -> EventSender {
        EventSender(tx)
    }

    /// Forwards a watch event.
    pub fn watch_fired(&self, path: &str, token: &str) {
        let _ = self.0.send(Event::Watch {
            path: path.to_string(),
            token: token.to_string(),
        });
    }

    /// Sends any event; false if the manager is gone.
    pub fn send(&self, event: Event) -> bool {
        self.0.send(event).is_ok()
    }

    /// Asks the manager to close every device and return from [`Manager::run`].
    pub fn shutdown(&self) {
        let _ = self.0.send(Event::Shutdown);
    }

    /// Asks the manager to hand every device over to the next daemon and stop.
    pub fn handover(&self) {
        let _ = self.0.send(Event::Handover);
    }

    /// Hands the manager a re-read configuration; `None` if it does not answer within
    /// `timeout`.
    pub fn reload(&self, config: Config, timeout: Duration) -> Option<ReloadReport> {
        let (tx, rx) = mpsc::channel();
        self.0.send(Event::Reload(Box::new(config), tx)).ok()?;
        rx.recv_timeout(timeout).ok()
    }

    /// Asks for `op` on `device` and waits at most `timeout` for the answer.
    pub fn device_op(
        &self,
        device: &str,
        op: DeviceOp,
        timeout: Duration,
    ) -> Result<String, String> {
        let (tx, rx) = mpsc::channel();
        self.0
            .send(Event::Device {
                device: device.to_string(),
                op,
                reply: tx,
            })
            .map_err(|_| "the device manager is gone".to_string())?;
        rx.recv_timeout(timeout)
            .map_err(|_| format!("no answer within {timeout:?}"))?
    }

    /// Sets (`Some`) or shows the limits of QoS group `name`.
    pub fn qos_group(
        &self,
        name: &str,
        limits: Option<crate::qos::QosLimits>,
        timeout: Duration,
    ) -> Result<String, String> {
        let (tx, rx) = mpsc::channel();
        self.0
            .send(Event::QosGroup {
                name: name.to_string(),
                limits,
                reply: tx,
            })
            .map_err(|_| "the device manager is gone".to_string())?;
        rx.recv_timeout(timeout)
            .map_err(|_| format!("no answer within {timeout:?}"))?
    }

    /// Queries the status (`None` if the manager does not answer within `timeout`).
    pub fn status(&self, timeout: Duration) -> Option<(DaemonStatus, Vec<DeviceStatus>)> {
        let (tx, rx) = mpsc::channel();
        self.0.send(Event::Status(tx)).ok()?;
        rx.recv_timeout(timeout).ok()
    }
}

/// Opens a device's storage on a worker thread and reports it as an event.
pub(crate) fn spawn_open(
    tx: &Sender<Event>,
    key: &DeviceKey,
    open_id: u64,
    factory: Arc<dyn VbdFactory>,
    config: DeviceConfig,
) {
    let name = format!("open-{}-{}", key.domid, key.devid);
    let failed = Event::Opened {
        key: key.clone(),
        open_id,
        config: Box::new(config.clone()),
        result: Err(VbdError::new("spawning the open thread", "no thread", 11)),
    };
    let spawned = std::thread::Builder::new().name(name).spawn({
        let key = key.clone();
        let tx = tx.clone();
        move || {
            let result = factory.open(&config);
            let _ = tx.send(Event::Opened {
                key,
                open_id,
                config: Box::new(config),
                result,
            });
        }
    });
    if spawned.is_err() {
        let _ = tx.send(failed);
    }
}

/// Disconnects a VBD on a worker thread and reports the result as an event, so a slow
/// drain never stalls other devices.
pub(crate) fn spawn_disconnect(
    tx: &Sender<Event>,
    key: &DeviceKey,
    session: u64,
    vbd: Box<dyn ConnectedVbd>,
    timeout: Duration,
) {
    let name = format!("disconnect-{}-{}", key.domid, key.devid);
    let spawned = std::thread::Builder::new().name(name).spawn({
        let key = key.clone();
        let tx = tx.clone();
        move || {
            let result = vbd.disconnect(timeout);
            let _ = tx.send(Event::Disconnected {
                key,
                session,
                result,
            });
        }
    });
    if let Err(e) = spawned {
        // No thread: the VBD was moved into the closure and dropped with it, which the
        // engine must treat as a disconnect; report the failure.
        let _ = tx.send(Event::Disconnected {
            key: key.clone(),
            session,
            result: Err(VbdError::new("spawning disconnect thread", e, 11)),
        });
    }
}
