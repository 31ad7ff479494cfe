//! What `xenblkd status` shows: a serializable snapshot of every device, and the
//! line-delimited JSON control protocol the daemon speaks on its control socket.
//!
//! The protocol is one JSON object per line in each direction: a request
//! `{"cmd":"status"}` is answered by `{"ok":true,"devices":[...]}`; errors are
//! `{"ok":false,"error":"..."}`. Status is read-only; nothing on the socket can change a
//! device (the socket is root-only anyway, but a read-only surface is easy to audit).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::state::XenbusState;
use crate::vbd::{BackendFeatures, DisconnectReport, DiskInfo, FrontendParams};

/// One device as the daemon sees it.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceStatus {
    /// Backend type (`vbd`, `xenblkd`).
    pub backend_type: String,
    /// Frontend domain.
    pub domid: u32,
    /// Virtual device number.
    pub devid: u32,
    /// Virtual device name (`xvdb`).
    pub vdev: String,
    /// Backend directory.
    pub backend_path: String,
    /// Frontend directory (once known).
    pub frontend_path: Option<String>,
    /// What we last published in `state`.
    pub state: XenbusState,
    /// What the frontend last published.
    pub frontend_state: XenbusState,
    /// The opened storage (path and format), once opened.
    pub target: Option<String>,
    /// Image format.
    pub format: Option<String>,
    /// Storage properties, once opened.
    pub disk: Option<DiskInfo>,
    /// The image and its backing chain, top first, as `format:path` (empty for a disk
    /// that is one file or device).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<String>,
    /// The frontend's negotiated transport parameters, while connected.
    pub frontend: Option<FrontendParams>,
    /// What we advertised at connect, while connected.
    pub features: Option<BackendFeatures>,
    /// Engine counters, while connected.
    pub stats: BTreeMap<String, u64>,
    /// The fatal error that closed the device, if any.
    pub error: Option<String>,
    /// Frontend sessions served since the device appeared.
    pub sessions: u64,
    /// Outcome of the last disconnect.
    pub last_disconnect: Option<DisconnectReport>,
    /// A disconnect is in progress.
    pub disconnecting: bool,
}

/// A control-socket request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum ControlRequest {
    /// List every device.
    Status,
}

/// A control-socket reply.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum ControlReply {
    /// Answer to [`ControlRequest::Status`].
    Status {
        /// Always true.
        ok: bool,
        /// Daemon-wide facts (types served, device count, pid).
        daemon: DaemonStatus,
        /// Every device.
        devices: Vec<DeviceStatus>,
    },
    /// Any failure.
    Error {
        /// Always false.
        ok: bool,
        /// What went wrong.
        error: String,
    },
}

/// Daemon-wide facts in a status reply.
#[derive(Debug, Clone, Serialize)]
pub struct DaemonStatus {
    /// Backend types served.
    pub backend_types: Vec<String>,
    /// Our domain's home.
    pub home: String,
    /// True once SIGTERM (or a shutdown request) was received.
    pub shutting_down: bool,
    /// Process-wide gauges the daemon adds (grant mappings alive, open fds, threads), so
    /// leaks are measurable from outside.
    pub metrics: BTreeMap<String, u64>,
}

impl ControlReply {
    /// An error reply.
    pub fn error(message: impl Into<String>) -> ControlReply {
        ControlReply::Error {
            ok: false,
            error: message.into(),
        }
    }
}
