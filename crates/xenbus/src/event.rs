//! What reaches the control loop ([`Event`]), the handle other threads send it through
//! ([`EventSender`]), and the worker threads whose reports come back as events (storage
//! opens and disconnects, which can wait for storage and must not stall other devices).

use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::Duration;

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
            Event::RefreshSizes => f.write_str("RefreshSizes"),
            Event::Shutdown => f.write_str("Shutdown"),
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
    /// Re-read every device's storage size (operator-triggered resize check).
    RefreshSizes,
    /// Close every device and stop.
    Shutdown,
}

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
