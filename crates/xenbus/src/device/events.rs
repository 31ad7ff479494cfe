//! What reaches a device besides reconciles: worker reports (storage opened, rings
//! disconnected), the engine's reports about a session, size checks, and status.

use std::sync::Arc;

use tracing::{info, warn};

use super::{AfterDisconnect, Ctx, Device, Effect, OpenStorage, Phase, Rings, Storage, Withdrawn};
use crate::error::{DeviceError, VbdError};
use crate::negotiate;
use crate::ratelimit::Kind;
use crate::status::DeviceStatus;
use crate::vbd::{DeviceConfig, DisconnectReport, Storage as OpenedStorage, VbdEvent};
use crate::vdev::vdev_name;

impl Device {
    /// The worker finished opening the storage.
    pub fn opened(
        &mut self,
        ctx: &Ctx<'_>,
        open_id: u64,
        config: DeviceConfig,
        result: Result<Arc<dyn OpenedStorage>, VbdError>,
        fx: &mut Vec<Effect>,
    ) -> Result<(), DeviceError> {
        if !matches!(self.storage, Storage::Opening { open_id: awaited } if awaited == open_id) {
            // A device re-created or unregistered meanwhile: this storage belongs to
            // nobody now.
            return Ok(());
        }
        self.storage = Storage::Closed;
        let reopened = self.waiters.take_reopen();
        match result {
            Ok(disk) => {
                let info = disk.info();
                info!(
                    device = %self.key, domid = self.key.domid,
                    path = %config.target.path.display(),
                    format = config.target.format.name(),
                    size = info.size_bytes,
                    sector_size = info.logical_block_size,
                    read_only = config.read_only || info.read_only,
                    "storage opened"
                );
                // A new storage: what the old one refused says nothing about it.
                let path = config.target.path.display().to_string();
                self.storage = Storage::Open(Box::new(OpenStorage {
                    config,
                    disk,
                    info,
                    withdrawn: Withdrawn::default(),
                }));
                if let Some(reopen) = reopened {
                    // The size the frontend was told may have changed: the resize path.
                    self.resized(ctx, info.size_bytes)?;
                    let before = reopen.size_before;
                    reopen.answer(Ok(format!(
                        "reopened {path}: {} bytes (was {before})",
                        info.size_bytes
                    )));
                }
                Ok(())
            }
            Err(e) => {
                if let Some(reopen) = reopened {
                    reopen.answer(Err(format!("reopen failed: {e}; the device fails")));
                }
                self.fail(ctx, &DeviceError::Vbd(e), fx)
            }
        }
    }

    /// The worker finished a disconnect.
    pub fn disconnected(&mut self, session: u64, result: Result<DisconnectReport, VbdError>) {
        if let Phase::Connected(s) = &mut self.phase {
            if s.id == session && matches!(s.rings, Rings::Draining) {
                self.pause_drained(result);
            }
            return;
        }
        let Phase::Disconnecting { session: id, then } = &self.phase else {
            return;
        };
        if *id != session {
            return;
        }
        self.phase = then.clone().phase();
        let report = match result {
            Ok(report) => {
                if report.drained {
                    self.info_limited(
                        |key| info!(device = %key, domid = key.domid, "disconnected"),
                    );
                } else {
                    self.warn_limited(Kind::Disconnect, |key, suppressed| {
                        warn!(device = %key, domid = key.domid, abandoned = report.abandoned_requests,
                            detail = %report.detail, suppressed, "disconnected without draining");
                    });
                }
                report
            }
            Err(e) => {
                self.warn_limited(Kind::Disconnect, |key, suppressed| {
                    warn!(device = %key, domid = key.domid, error = %e, suppressed, "disconnect failed");
                });
                DisconnectReport {
                    drained: false,
                    abandoned_requests: 0,
                    detail: e.to_string(),
                }
            }
        };
        self.waiters.answer_pause(if report.drained {
            Ok("paused; the device is disconnecting".to_string())
        } else {
            Err(format!(
                "the device disconnected undrained: {}",
                report.detail
            ))
        });
        self.last_disconnect = Some(report);
    }

    /// An engine report about session `session`.
    pub fn vbd_event(
        &mut self,
        ctx: &Ctx<'_>,
        session: u64,
        event: VbdEvent,
        fx: &mut Vec<Effect>,
    ) -> Result<(), DeviceError> {
        if !matches!(&self.phase, Phase::Connected(s) if s.id == session) {
            return Ok(());
        }
        match event {
            VbdEvent::Resized(size_bytes) => self.resized(ctx, size_bytes),
            VbdEvent::FeatureLost(feature) => {
                // Linux blkback rewrites `feature-flush-cache` / `feature-barrier` to 0
                // when the storage refuses them, and never withdraws discard; and on a
                // reconnect it advertises all of them again. We withdraw every feature
                // the engine can lose, secure discard included (a frontend reading
                // `discard-secure` 1 would keep sending what fails), and keep them
                // withdrawn for as long as this storage is open: a frontend reconnecting
                // reads our nodes again, and the storage has not changed its mind.
                let (Phase::Connected(s), Storage::Open(open)) =
                    (&mut self.phase, &mut self.storage)
                else {
                    return Ok(());
                };
                let nodes = open.withdrawn.withdraw(feature);
                open.withdrawn.apply(&mut s.features);
                if negotiate::publish_withdrawn(ctx.store.as_ref(), &self.backend_path, nodes)? {
                    self.info_limited(|key| info!(device = %key, domid = key.domid, ?feature, "feature withdrawn"));
                }
                Ok(())
            }
            VbdEvent::Fatal(message) => {
                let e = DeviceError::Vbd(VbdError::new("engine", message, 5));
                self.fail(ctx, &e, fx)
            }
        }
    }

    /// The storage has a new size: publish `sectors` (blkback's `xen_vbd_resize`).
    pub(super) fn resized(&mut self, ctx: &Ctx<'_>, size_bytes: u64) -> Result<(), DeviceError> {
        let Phase::Connected(s) = &mut self.phase else {
            return Ok(());
        };
        let sectors = crate::vbd::sectors_for(
            size_bytes,
            s.features.sector_size,
            s.frontend.large_sector_size,
        );
        if sectors == s.features.sectors {
            return Ok(());
        }
        if negotiate::publish_resize(ctx.store.as_ref(), &self.backend_path, sectors)? {
            info!(device = %self.key, domid = self.key.domid, from = s.features.sectors, to = sectors, "resized");
            s.features.sectors = sectors;
            if let Storage::Open(open) = &mut self.storage {
                open.info.size_bytes = size_bytes;
            }
        }
        Ok(())
    }

    /// Asks the storage for its size and publishes it if it changed.
    pub fn refresh_size(&mut self, ctx: &Ctx<'_>) -> Result<(), DeviceError> {
        let Storage::Open(open) = &mut self.storage else {
            return Ok(());
        };
        let size = open
            .disk
            .refresh_size()
            .map_err(|e| VbdError::io("re-reading the storage size", &e))?;
        if let Phase::Connected(_) = self.phase {
            self.resized(ctx, size)
        } else {
            open.info.size_bytes = size;
            Ok(())
        }
    }

    /// The status snapshot.
    pub fn status(&self) -> DeviceStatus {
        let open = match &self.storage {
            Storage::Open(o) => Some(o),
            _ => None,
        };
        let session = match &self.phase {
            Phase::Connected(s) => Some(s),
            _ => None,
        };
        DeviceStatus {
            backend_type: self.key.backend_type.clone(),
            domid: self.key.domid,
            devid: self.key.devid,
            vdev: vdev_name(self.key.devid),
            backend_path: self.backend_path.clone(),
            frontend_path: self.frontend_path.clone(),
            state: self.published,
            frontend_state: self.frontend_state,
            target: open.map(|o| o.config.target.path.display().to_string()),
            format: open.map(|o| o.config.target.format.name().to_string()),
            disk: open.map(|o| o.info),
            layers: open.map(|o| o.disk.layers()).unwrap_or_default(),
            frontend: session.map(|s| s.frontend.clone()),
            features: session.map(|s| s.features),
            stats: match session.map(|s| &s.rings) {
                Some(Rings::Up(vbd)) => vbd.stats(),
                _ => Default::default(),
            },
            latency: match session.map(|s| &s.rings) {
                Some(Rings::Up(vbd)) => vbd.latency(),
                _ => Default::default(),
            },
            error: match &self.phase {
                Phase::Failed { error }
                | Phase::Disconnecting {
                    then: AfterDisconnect::Failed(error),
                    ..
                } => Some(error.clone()),
                _ => None,
            },
            sessions: self.sessions,
            last_disconnect: self.last_disconnect.clone(),
            disconnecting: matches!(self.phase, Phase::Disconnecting { .. }),
            paused: self.paused,
            qos: (!self.qos_shown.is_none()).then(|| self.qos_shown.clone()),
        }
    }
}
