//! The arms of the transition table ([`super::decide`]), one method each, and the actions
//! they share (publish a state, open the storage, connect, fail, disconnect).

use tracing::{debug, info, warn};

use super::{
    AfterDisconnect, Ctx, Device, Effect, Frontend, OpenStorage, Phase, Rings, Session, Step,
    Storage,
};
use crate::config::DeviceSettings;
use crate::error::{DeviceError, NegotiationError};
use crate::negotiate::{self, BackendNodes};
use crate::ratelimit::Kind;
use crate::state::XenbusState;
use crate::toolstack;
use crate::vbd::{BackendFeatures, ConnectRequest, ConnectedVbd, DeviceConfig, FrontendParams};

/// Where the storage is after [`Device::ensure_storage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opened {
    Yes,
    /// A worker is opening it; its report wakes the device.
    Pending,
}

impl Device {
    /// Device setup: blkback's probe (limits, InitWait), the storage opened first for our
    /// own type, which has no hotplug script: a bad image fails the device before the
    /// frontend starts. InitWait follows when the open completes (on a worker thread).
    pub(super) fn set_up(
        &mut self,
        ctx: &Ctx<'_>,
        nodes: &BackendNodes,
        fx: &mut Vec<Effect>,
    ) -> Result<Step, DeviceError> {
        if !ctx.backend_type.wait_for_hotplug {
            match self.ensure_storage(ctx, nodes, fx) {
                Ok(Opened::Yes) => {}
                Ok(Opened::Pending) => return Ok(Step::Done),
                Err(e) => {
                    self.fail(ctx, &e, fx)?;
                    return Ok(Step::Done);
                }
            }
        }
        let settings = self.settings(ctx);
        if negotiate::publish_initwait(ctx.store.as_ref(), &self.backend_path, &settings)? {
            info!(device = %self.key, domid = self.key.domid, "InitWait");
            self.published = XenbusState::InitWait;
            self.phase = Phase::InitWait;
            return Ok(Step::Again);
        }
        Ok(Step::Done)
    }

    /// Waiting for the frontend: open the storage once it may be opened (right away for
    /// our own type, after the hotplug script for `vbd`; this also covers a device found
    /// Closed at start-up, which reaches InitWait only when its frontend comes back), and
    /// connect once the frontend published its rings (`connect`).
    pub(super) fn await_frontend(
        &mut self,
        ctx: &Ctx<'_>,
        nodes: &BackendNodes,
        connect: bool,
        fx: &mut Vec<Effect>,
    ) -> Result<Step, DeviceError> {
        let may_open = !ctx.backend_type.wait_for_hotplug || nodes.hotplug_done();
        if !may_open && matches!(self.storage, Storage::Closed) {
            return Ok(Step::Done);
        }
        match self.ensure_storage(ctx, nodes, fx) {
            Ok(Opened::Yes) if connect => {
                if let Err(e) = self.connect(ctx, &nodes.frontend, fx) {
                    self.fail(ctx, &e, fx)?;
                }
            }
            Ok(_) => {}
            Err(e) => self.fail(ctx, &e, fx)?,
        }
        Ok(Step::Done)
    }

    /// Adoption: a device found Connected on both ends, whose rings a previous process
    /// served. Opens the storage from the backend's nodes, reads the rings and what the
    /// frontend was told ([`negotiate::read_adopted`]), and connects the rings without a
    /// single xenstore write: the frontend must see nothing. A frontend whose domain is
    /// not reachable yet (in the simulator, a guest that has not yet come back to this
    /// daemon's socket) is retried on the next tick; anything inconsistent fails the
    /// device as a bad connect does.
    pub(super) fn adopt(
        &mut self,
        ctx: &Ctx<'_>,
        nodes: &BackendNodes,
        fx: &mut Vec<Effect>,
    ) -> Result<Step, DeviceError> {
        match self.ensure_storage(ctx, nodes, fx) {
            Ok(Opened::Yes) => {}
            Ok(Opened::Pending) => return Ok(Step::Done),
            Err(e) => {
                self.fail(ctx, &e, fx)?;
                return Ok(Step::Done);
            }
        }
        match self.connect_adopted(ctx, &nodes.frontend) {
            Ok(()) => {}
            Err(DeviceError::Vbd(e)) if e.domain_unreachable() => {
                self.warn_limited(Kind::Adoption, |key, suppressed| {
                    info!(device = %key, domid = key.domid, error = %e, suppressed,
                        "frontend domain not reachable yet; adoption retried");
                });
                fx.push(Effect::RetryLater);
            }
            Err(e @ DeviceError::Store(_)) => return Err(e),
            Err(e) => self.fail(ctx, &e, fx)?,
        }
        Ok(Step::Done)
    }

    /// A new session: the engine maps the rings (afresh, or `adopting` what a previous
    /// process left) under the next session id.
    pub(super) fn connect_rings(
        &mut self,
        ctx: &Ctx<'_>,
        config: &DeviceConfig,
        disk: &std::sync::Arc<dyn crate::vbd::Storage>,
        params: &FrontendParams,
        features: &BackendFeatures,
        adopting: bool,
    ) -> Result<Box<dyn ConnectedVbd>, DeviceError> {
        self.session_id += 1;
        // The QoS in force now: the operator's, or the configuration as it is now (a
        // reload applies from the next connection).
        let qos = self.qos(ctx);
        let mut config = config.clone();
        config.settings.qos = qos.limits;
        config.settings.qos_group = qos.group.clone();
        let config = &config;
        self.qos_shown = qos;
        let vbd = ctx.factory.connect(ConnectRequest {
            config,
            storage: disk,
            frontend: params,
            features,
            events: ctx.session_sink.sink(&self.key, self.session_id),
            adopting,
        })?;
        Ok(vbd)
    }

    /// The rings of a new session (connect or adoption): connected, or left unserved
    /// while the device is paused (the frontend sees Connected, queues its requests and
    /// waits, as behind a slow disk, until `resume`).
    fn session_rings(
        &mut self,
        ctx: &Ctx<'_>,
        config: &DeviceConfig,
        disk: &std::sync::Arc<dyn crate::vbd::Storage>,
        params: &FrontendParams,
        features: &BackendFeatures,
        adopting: bool,
    ) -> Result<Rings, DeviceError> {
        let rings = if self.paused {
            Rings::Released
        } else {
            Rings::Up(self.connect_rings(ctx, config, disk, params, features, adopting)?)
        };
        self.sessions += 1;
        Ok(rings)
    }

    /// Hands the storage open to a worker (its report wakes the device); a later report
    /// of an earlier open is recognised by its older `open_id` and dropped.
    pub(super) fn start_open(&mut self, config: DeviceConfig, fx: &mut Vec<Effect>) {
        self.open_id += 1;
        self.storage = Storage::Opening {
            open_id: self.open_id,
        };
        fx.push(Effect::Open {
            open_id: self.open_id,
            config: Box::new(config),
        });
    }

    /// The connect half of [`Device::adopt`].
    fn connect_adopted(&mut self, ctx: &Ctx<'_>, frontend: &str) -> Result<(), DeviceError> {
        let Storage::Open(open) = &self.storage else {
            return Ok(());
        };
        let (config, disk, withdrawn) = (open.config.clone(), open.disk.clone(), open.withdrawn);
        let info = disk.info();
        let adopted = negotiate::read_adopted(
            ctx.store.as_ref(),
            &self.backend_path,
            frontend,
            &config,
            &info,
        )?;
        let mut features = adopted.features;
        withdrawn.apply(&mut features);
        let params = adopted.frontend;
        let rings = self.session_rings(ctx, &config, &disk, &params, &features, true)?;
        info!(
            device = %self.key, domid = self.key.domid,
            protocol = ?params.protocol,
            queues = params.queues.len(),
            ring_page_order = params.ring_page_order,
            persistent = params.persistent,
            "adopted: rings connected, Connected as found"
        );
        if let Storage::Open(open) = &mut self.storage {
            open.info = info;
        }
        self.published = XenbusState::Connected;
        self.phase = Phase::Connected(Session {
            id: self.session_id,
            rings,
            frontend: params,
            features,
        });
        Ok(())
    }

    /// Closed (or torn down) and the frontend is back: blkback's "prepare for reconnect".
    pub(super) fn prepare_reconnect(
        &mut self,
        ctx: &Ctx<'_>,
        _nodes: &BackendNodes,
    ) -> Result<Step, DeviceError> {
        self.info_limited(|key| info!(device = %key, domid = key.domid, "frontend is back: prepare for reconnect"));
        let settings = self.settings(ctx);
        if negotiate::publish_initwait(ctx.store.as_ref(), &self.backend_path, &settings)? {
            self.published = XenbusState::InitWait;
            self.phase = Phase::InitWait;
            return Ok(Step::Again);
        }
        Ok(Step::Done)
    }

    /// The frontend is gone (and no rings are up): Closed. A device `xenblkd attach` wrote
    /// is known to no toolstack: once its guest is dead, the directory is ours to remove,
    /// or it lingers forever.
    pub(super) fn gone(
        &mut self,
        ctx: &Ctx<'_>,
        nodes: &BackendNodes,
        fx: &mut Vec<Effect>,
    ) -> Result<Step, DeviceError> {
        self.publish(ctx, nodes, XenbusState::Closed)?;
        self.rest();
        if self.domain_gone && ctx.backend_type.is_owned() {
            info!(device = %self.key, domid = self.key.domid, "guest domain is gone; removing the device");
            toolstack::remove_backend_dir(ctx.store.as_ref(), &self.backend_path)?;
            self.cleanup(ctx);
            fx.push(Effect::Forget);
        }
        Ok(Step::Done)
    }

    /// The frontend's state reads Unknown (written `0`, or not a number).
    pub(super) fn frontend_unknown(
        &mut self,
        ctx: &Ctx<'_>,
        nodes: &BackendNodes,
        frontend: &Frontend,
        fx: &mut Vec<Effect>,
    ) -> Result<Step, DeviceError> {
        if let Frontend::Unknown(value) = frontend {
            self.warn_limited(Kind::FrontendState, |key, suppressed| {
                warn!(device = %key, domid = key.domid, %value, suppressed,
                    "frontend state is Unknown: closing the device and leaving it closed \
                     until the toolstack re-creates or removes it, as Linux blkback does");
            });
        }
        if let Phase::Connected(_) = self.phase {
            // Finished when the disconnect reports, whatever the frontend writes meanwhile.
            self.disconnect(AfterDisconnect::Unregister, fx);
            return Ok(Step::Done);
        }
        self.unregister(ctx, nodes, fx)
    }

    /// What Linux blkback's `frontend_changed` does for `XenbusStateUnknown`
    /// (drivers/block/xen-blkback/xenbus.c), `device_unregister`: `xen_blkbk_remove`
    /// disconnects the rings and releases the VBD, `xenbus_dev_remove` switches to Closed
    /// and drops the watch on the frontend, and the device is not probed again, since
    /// `xenbus_probe_node` ignores a backend whose state is not Initialising, until the
    /// toolstack re-creates it. Here likewise (the rings are down already): Closed,
    /// storage released, the frontend no longer followed, until re-creation (`state`
    /// Initialising) or removal.
    pub(super) fn unregister(
        &mut self,
        ctx: &Ctx<'_>,
        nodes: &BackendNodes,
        fx: &mut Vec<Effect>,
    ) -> Result<Step, DeviceError> {
        self.phase = Phase::Unregistering;
        self.publish(ctx, nodes, XenbusState::Closed)?;
        // An open still running delivers to nobody: its storage is dropped on arrival.
        self.storage = Storage::Closed;
        self.phase = Phase::Unregistered;
        self.frontend_path = None;
        info!(device = %self.key, domid = self.key.domid, "unregistered: not following the frontend any more");
        fx.push(Effect::UnwatchFrontend);
        Ok(Step::Done)
    }

    /// Linux reads `state` with `%d` (`xenbus_read_driver_state`): a number xenbus.h does
    /// not define (or Reconfiguring, Reconfigured) reaches `frontend_changed`'s `default:`
    /// case, which is fatal.
    pub(super) fn frontend_invalid(
        &mut self,
        ctx: &Ctx<'_>,
        frontend: &Frontend,
        fx: &mut Vec<Effect>,
    ) -> Result<Step, DeviceError> {
        if let Frontend::Invalid(n) = frontend {
            let e = NegotiationError::BadFrontendState(n.to_string());
            self.fail(ctx, &e.into(), fx)?;
        }
        Ok(Step::Done)
    }

    /// The device-model claim is gone: another device model may own the ring next, so
    /// nothing of ours may stay on it. Disconnects, tells the frontend (Closed) if we ever
    /// spoke to it, and asks to be forgotten.
    pub(super) fn let_go(
        &mut self,
        ctx: &Ctx<'_>,
        fx: &mut Vec<Effect>,
    ) -> Result<(), DeviceError> {
        if let Phase::Connected(_) = self.phase {
            info!(device = %self.key, domid = self.key.domid, "device-model claim withdrawn; disconnecting");
            self.disconnect(AfterDisconnect::Closed, fx);
            return Ok(());
        }
        if let Storage::Opening { .. } = self.storage {
            // Its report wakes us; dropping the storage it opened closes it.
            return Ok(());
        }
        if self.published != XenbusState::Unknown
            && negotiate::write_state(ctx.store.as_ref(), &self.backend_path, XenbusState::Closed)?
        {
            info!(device = %self.key, domid = self.key.domid, state = %XenbusState::Closed, "backend state");
        }
        self.cleanup(ctx);
        fx.push(Effect::Forget);
        Ok(())
    }

    pub(super) fn settings(&self, ctx: &Ctx<'_>) -> DeviceSettings {
        ctx.config
            .settings_for(&self.key.backend_type, self.key.domid, self.key.devid)
    }

    /// Writes `state` unless it already holds `state` (or the device is being removed).
    pub(super) fn publish(
        &mut self,
        ctx: &Ctx<'_>,
        nodes: &BackendNodes,
        state: XenbusState,
    ) -> Result<(), DeviceError> {
        if nodes.state == Some(state) && self.published == state {
            return Ok(());
        }
        if negotiate::write_state(ctx.store.as_ref(), &self.backend_path, state)? {
            if self.published != state {
                self.info_limited(
                    |key| info!(device = %key, domid = key.domid, %state, "backend state"),
                );
            }
            self.published = state;
        }
        Ok(())
    }

    /// Opens the storage once per device, on a worker thread: opening can block (a block
    /// device claimed elsewhere, network storage), and must not stall other devices.
    fn ensure_storage(
        &mut self,
        ctx: &Ctx<'_>,
        nodes: &BackendNodes,
        fx: &mut Vec<Effect>,
    ) -> Result<Opened, DeviceError> {
        match self.storage {
            Storage::Open(_) => return Ok(Opened::Yes),
            Storage::Opening { .. } => return Ok(Opened::Pending),
            Storage::Closed => {}
        }
        let config = negotiate::device_config(
            &self.key.backend_type,
            self.key.devid,
            &self.backend_path,
            nodes,
            self.settings(ctx),
        )?;
        self.start_open(config, fx);
        Ok(Opened::Pending)
    }

    /// blkback's `connect_ring` + `connect`.
    fn connect(
        &mut self,
        ctx: &Ctx<'_>,
        frontend: &str,
        fx: &mut Vec<Effect>,
    ) -> Result<(), DeviceError> {
        let Storage::Open(open) = &self.storage else {
            return Ok(());
        };
        let OpenStorage {
            config,
            disk,
            withdrawn,
            ..
        } = open.as_ref();
        let (config, disk, withdrawn) = (config.clone(), disk.clone(), *withdrawn);
        let params = negotiate::read_frontend(ctx.store.as_ref(), frontend, &config.settings)?;
        let info = disk.info();
        let mut features = negotiate::backend_features(&config, &info, params.large_sector_size);
        withdrawn.apply(&mut features);
        self.warn_ignored(&params.ignored_flags);
        if info.logical_block_size > 512 && !params.large_sector_size {
            // What Linux blkback does too; Linux blkfront copes, others may not.
            self.warn_limited(Kind::LargeSectorSize, |key, suppressed| {
                warn!(
                    device = %key, domid = key.domid,
                    sector_size = info.logical_block_size,
                    suppressed,
                    "frontend did not advertise feature-large-sector-size"
                );
            });
        }
        let rings = self.session_rings(ctx, &config, &disk, &params, &features, false)?;
        self.info_limited(|key| {
            info!(
                device = %key, domid = key.domid,
                protocol = ?params.protocol,
                queues = params.queues.len(),
                ring_page_order = params.ring_page_order,
                persistent = params.persistent,
                "rings connected"
            )
        });
        if let Storage::Open(open) = &mut self.storage {
            open.info = info;
        }
        self.phase = Phase::Connected(Session {
            id: self.session_id,
            rings,
            frontend: params,
            features,
        });
        match negotiate::publish_connected(ctx.store.as_ref(), &self.backend_path, &features) {
            Ok(true) => {
                self.published = XenbusState::Connected;
                self.info_limited(
                    |key| info!(device = %key, domid = key.domid, sectors = features.sectors, "Connected"),
                );
                Ok(())
            }
            Ok(false) => {
                // Removed under us: the next reconcile tears down.
                self.disconnect(AfterDisconnect::Closed, fx);
                Ok(())
            }
            Err(e) => {
                self.disconnect(AfterDisconnect::Closed, fx);
                Err(e.into())
            }
        }
    }

    /// blkback's `xenbus_dev_fatal`: `error` node, Closing; rings (if any) disconnected.
    pub(super) fn fail(
        &mut self,
        ctx: &Ctx<'_>,
        err: &DeviceError,
        fx: &mut Vec<Effect>,
    ) -> Result<(), DeviceError> {
        let Some((errno, message)) = err.fatal_report() else {
            return Err(err.clone());
        };
        match &self.phase {
            // Already reported and Closing. Writing again would fire our own watch on
            // `state` and, with a toolstack error that persists, loop forever.
            Phase::Failed { .. } => return Ok(()),
            Phase::Disconnecting {
                then: AfterDisconnect::Failed(_),
                ..
            } => return Ok(()),
            _ => {}
        }
        self.warn_limited(Kind::DeviceFailed, |key, suppressed| {
            warn!(device = %key, domid = key.domid, errno, %message, suppressed, "device failed");
        });
        negotiate::publish_fatal(ctx.store.as_ref(), &self.backend_path, errno, &message)?;
        self.wrote_linux_error = true;
        self.published = XenbusState::Closing;
        let error = format!("{errno} {message}");
        match &mut self.phase {
            Phase::Connected(_) => self.disconnect(AfterDisconnect::Failed(error), fx),
            Phase::Disconnecting { then, .. } => *then = AfterDisconnect::Failed(error),
            _ => self.phase = Phase::Failed { error },
        }
        Ok(())
    }

    /// Hands the rings to a disconnect worker; the device goes to `then` when it reports.
    pub(super) fn disconnect(&mut self, then: AfterDisconnect, fx: &mut Vec<Effect>) {
        if !matches!(self.phase, Phase::Connected(_)) {
            return;
        }
        let Phase::Connected(s) = std::mem::replace(&mut self.phase, Phase::Closed) else {
            return;
        };
        self.info_limited(|key| info!(device = %key, domid = key.domid, "disconnecting"));
        match s.rings {
            Rings::Up(vbd) => {
                self.phase = Phase::Disconnecting {
                    session: s.id,
                    then,
                };
                fx.push(Effect::Disconnect { session: s.id, vbd });
            }
            // A pause's worker is draining them: its report finishes this disconnect.
            Rings::Draining => {
                self.phase = Phase::Disconnecting {
                    session: s.id,
                    then,
                }
            }
            // Paused and released (or abandoned to the engine by a drain that timed
            // out): nothing is left for us to take down.
            Rings::Released | Rings::Abandoned => {
                self.phase = then.phase();
                fx.push(Effect::RetryLater);
            }
        }
    }

    /// Removes what we wrote outside the backend directory.
    pub(super) fn cleanup(&mut self, ctx: &Ctx<'_>) {
        if self.wrote_linux_error {
            if let Some(p) = negotiate::linux_error_path(&self.backend_path) {
                // The error directory of this device only.
                let dir = p.trim_end_matches("/error").to_string();
                if let Err(e) = ctx.store.rm(&dir) {
                    debug!(device = %self.key, error = %e, "removing error node");
                }
            }
        }
    }
}
