//! The backend under test: the seam between the cases and where the backend runs.
//!
//! A case sees a guest (memory, grants, event channels: [`blkfront::Guest`]), xenstore
//! as the guest sees it, and devices to connect to. Two implementations:
//! [`crate::sim::SimTarget`] (xenblkd's daemon in this process on the simulator, a fresh
//! disk per case, leaks observable) and [`crate::xen::XenTarget`] (any backend, from
//! inside a domU on real Xen, on the vbd the toolstack attached).

use std::sync::Arc;
use std::time::Duration;

use blkfront::Guest;
use xenstore::XsClient;

/// Why a case could not run or failed outside its own checks.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// This target cannot provide what the case needs (the case is skipped).
    #[error("{0}")]
    Unsupported(String),
    /// The target failed (the case fails).
    #[error("{0}")]
    Failed(String),
}

impl TargetError {
    pub fn failed(what: impl std::fmt::Display) -> Self {
        TargetError::Failed(what.to_string())
    }
}

/// What a case needs from its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceRequest {
    /// A device the toolstack attached read-only (`mode` r).
    pub read_only: bool,
    /// A device whose backend must not offer discard (`discard-enable` 0 on the
    /// simulator; on real Xen, skipped unless the lab's device does not offer it).
    pub no_discard: bool,
}

/// A device ready for a new frontend: the frontend directory in state Initialising
/// (or Closed, for a reused device) and the backend in InitWait.
#[derive(Debug)]
pub struct Device {
    pub frontend_path: String,
    pub backend_path: String,
    /// The backend's domain (grants and event channels are for it).
    pub backend_domid: u16,
    /// A xenstore connection as the guest, for this device's frontend alone.
    pub xs: XsClient,
    /// The `virtual-device` number (the requests' `handle`).
    pub handle: u16,
}

/// What a target can see of the backend's resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Leaks {
    /// Grant mappings the backend holds.
    pub grant_mappings: usize,
    /// Event channels the backend holds bound.
    pub event_channels: usize,
}

impl Leaks {
    pub fn is_clean(&self) -> bool {
        self.grant_mappings == 0 && self.event_channels == 0
    }
}

/// Where the backend under test runs.
pub trait Target {
    /// The column name in reports (`xenblkd-sim`, `xen:<backend>`).
    fn name(&self) -> String;
    /// The guest's memory, grants and event channels.
    fn guest(&self) -> Arc<dyn Guest>;
    /// A device for one connection. Each call on the simulator is a fresh disk; on real
    /// Xen the same vbd, reset to a new connection.
    fn open_device(&mut self, req: &DeviceRequest) -> Result<Device, TargetError>;
    /// Gives a device back once its frontend is done (simulator: the toolstack removes
    /// it as `xl block-detach` does; real Xen: nothing, the next open resets it).
    fn release_device(
        &mut self,
        frontend_path: &str,
        backend_path: &str,
    ) -> Result<(), TargetError>;
    /// The guest dies while the device is in use: the toolstack tears the device down
    /// without the frontend's cooperation (simulator only).
    fn kill_guest_device(
        &mut self,
        frontend_path: &str,
        backend_path: &str,
    ) -> Result<(), TargetError>;
    /// The backend's resources held now, or `None` if this target cannot see them.
    fn leaks(&self) -> Option<Leaks>;
    /// How long a case waits for an answer the backend owes.
    fn io_timeout(&self) -> Duration {
        Duration::from_secs(5)
    }
    /// How long a case waits for a state change.
    fn state_timeout(&self) -> Duration {
        Duration::from_secs(5)
    }
}
