//! What `xenblkd status` shows: a serializable snapshot of every device, and the
//! line-delimited JSON control protocol the daemon speaks on its control socket.
//!
//! The protocol is one JSON object per line in each direction: a request
//! `{"cmd":"status"}` is answered by `{"ok":true,"devices":[...]}`; errors are
//! `{"ok":false,"error":"..."}`. Besides status, the socket (root-only) takes `handover`
//! and, per device, `{"cmd":"pause"|"resume"|"reopen","device":"xenblkd/5/51712"}`,
//! answered `{"ok":true,"accepted":"..."}` once done (a pause once drained), and
//! `{"cmd":"limit","device":...,"limits":{"iops":500},"group":...,"leave_group":false,
//! "clear":false}` (without `device`: the limits of `group`), answered the same way with
//! the limits now in force.
//!
//! The types serialise and deserialise: the daemon writes them, and `xenblkd status` and
//! the tests read them back as the same types ([`ControlReply::into_report`]), so the
//! format has one definition.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::qos::{DeviceQos, QosLimits};
use crate::state::XenbusState;
use crate::vbd::{BackendFeatures, DisconnectReport, FrontendParams, StorageInfo};

/// One device as the daemon sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    pub disk: Option<StorageInfo>,
    /// The image and its backing chain, top first, as `format:path` (empty for a disk
    /// that is one file or device).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
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
    /// Paused by the operator (`xenblkd pause`): no request is taken until `resume`.
    #[serde(default)]
    pub paused: bool,
    /// Request latency per operation (`read`, `write`, `flush`, `discard`), while
    /// connected.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub latency: BTreeMap<String, LatencyHistogram>,
    /// The device's I/O limits and group, when it has any (`xenblkd limit`, or the
    /// configuration's `qos`/`qos_group`); the time it was held by them is in `stats`
    /// (`throttled`, `throttled_us`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<DeviceQos>,
}

/// How long one operation's requests took: a histogram, from the engine's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyHistogram {
    /// Upper bounds of the buckets, in microseconds, increasing.
    pub bounds_us: Vec<u64>,
    /// Requests per bucket, not cumulative: one count per bound, then the requests
    /// above the last bound.
    pub counts: Vec<u64>,
    /// Sum of the requests' latencies, in nanoseconds.
    pub sum_ns: u64,
}

impl LatencyHistogram {
    /// Requests counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// A control-socket request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum ControlRequest {
    /// List every device.
    Status,
    /// Hand every device over to the next daemon and exit (ARCHITECTURE.md, "Restart,
    /// handover and crash recovery"): stop consuming, answer what is in flight, leave
    /// xenstore as it is.
    Handover,
    /// Stop taking the device's requests, answer those in flight, hold (answered once
    /// drained).
    Pause {
        /// `[<type>/]<domid>/<devid or vdev>`.
        device: String,
    },
    /// Serve a paused device again.
    Resume {
        /// As for [`ControlRequest::Pause`].
        device: String,
    },
    /// While paused: close the device's storage and open what its backend nodes name now.
    Reopen {
        /// As for [`ControlRequest::Pause`].
        device: String,
    },
    /// Shows or changes I/O limits: a device's (its own limits and its group), or with no
    /// device a group's.
    Limit {
        /// As for [`ControlRequest::Pause`]; none: the group named by `group`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<String>,
        /// New limits, replacing all of the device's (or the group's); none: kept.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limits: Option<QosLimits>,
        /// The device joins this group (or, without a device, the group to set).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<String>,
        /// The device leaves its group.
        #[serde(default)]
        leave_group: bool,
        /// No limits (and, for a device, no group) before the rest applies.
        #[serde(default)]
        clear: bool,
    },
}

/// The version of the status reply's schema (docs/status-schema.json, docs/status.md).
/// Within a version fields are only added; anything else (a field removed, renamed or
/// retyped, a meaning changed) bumps it.
pub const STATUS_SCHEMA_VERSION: u32 = 1;

/// A control-socket reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ControlReply {
    /// Answer to [`ControlRequest::Status`].
    Status {
        /// Always true.
        ok: bool,
        /// [`STATUS_SCHEMA_VERSION`] of the daemon that wrote it (0: a daemon from before
        /// the schema was versioned).
        #[serde(default)]
        version: u32,
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
    /// A command was accepted ([`ControlRequest::Handover`]).
    Accepted {
        /// Always true.
        ok: bool,
        /// What the daemon does now.
        accepted: String,
    },
}

/// Daemon-wide facts in a status reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// Backend types served.
    pub backend_types: Vec<String>,
    /// Our domain's home.
    pub home: String,
    /// True once SIGTERM (or a shutdown request) was received.
    pub shutting_down: bool,
    /// True once a handover was asked for: devices are being handed to the next daemon.
    #[serde(default)]
    pub handing_over: bool,
    /// Process-wide gauges the daemon adds (grant mappings alive, open fds, threads), so
    /// leaks are measurable from outside.
    pub metrics: BTreeMap<String, u64>,
    /// QoS groups and the limits their members share.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub qos_groups: BTreeMap<String, QosLimits>,
}

/// A status reply as its readers use it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// Daemon-wide facts.
    pub daemon: DaemonStatus,
    /// Every device.
    pub devices: Vec<DeviceStatus>,
}

impl StatusReport {
    /// The device `backend/<backend_type>/<domid>/<devid>`, if the daemon has it.
    pub fn device(&self, backend_type: &str, domid: u32, devid: u32) -> Option<&DeviceStatus> {
        self.devices
            .iter()
            .find(|d| d.backend_type == backend_type && d.domid == domid && d.devid == devid)
    }
}

impl ControlReply {
    /// Parses one reply line.
    pub fn parse(line: &str) -> Result<ControlReply, serde_json::Error> {
        serde_json::from_str(line)
    }

    /// The status report, or the daemon's error message.
    pub fn into_report(self) -> Result<StatusReport, String> {
        match self {
            ControlReply::Status {
                daemon, devices, ..
            } => Ok(StatusReport { daemon, devices }),
            ControlReply::Error { error, .. } => Err(error),
            ControlReply::Accepted { accepted, .. } => {
                Err(format!("not a status reply: {accepted}"))
            }
        }
    }

    /// A status reply, with the current schema version.
    pub fn status(daemon: DaemonStatus, devices: Vec<DeviceStatus>) -> ControlReply {
        ControlReply::Status {
            ok: true,
            version: STATUS_SCHEMA_VERSION,
            daemon,
            devices,
        }
    }

    /// An error reply.
    pub fn error(message: impl Into<String>) -> ControlReply {
        ControlReply::Error {
            ok: false,
            error: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vbd::{BackendFeatures, FrontendParams, Protocol, RingParams, StorageInfo};

    fn device() -> DeviceStatus {
        DeviceStatus {
            backend_type: "xenblkd".into(),
            domid: 5,
            devid: 51728,
            vdev: "xvdb".into(),
            backend_path: "/local/domain/0/backend/xenblkd/5/51728".into(),
            frontend_path: Some("/local/domain/5/device/vbd/51728".into()),
            state: XenbusState::Connected,
            frontend_state: XenbusState::Connected,
            target: Some("/img/a.qcow2".into()),
            format: Some("qcow2".into()),
            disk: Some(StorageInfo {
                size_bytes: 1 << 30,
                logical_block_size: 512,
                physical_block_size: 4096,
                buffer_alignment: 512,
                read_only: false,
                flush: true,
                discard: false,
                secure_discard: false,
                discard_granularity: 0,
                discard_alignment: 0,
                direct_io: true,
                kind: storage::StorageKind::Qcow2,
            }),
            layers: vec!["qcow2:/img/a.qcow2".into(), "raw:/img/b.raw".into()],
            frontend: Some(FrontendParams {
                protocol: Protocol::X86_32,
                protocol_specified: true,
                queues: vec![RingParams {
                    ring_refs: vec![8, 9],
                    event_channel: 3,
                }],
                ring_page_order: 1,
                frontend_persistent: true,
                persistent: true,
                large_sector_size: false,
                ignored_flags: vec![],
            }),
            features: Some(BackendFeatures {
                flush: true,
                barrier: true,
                discard: true,
                secure_discard: false,
                discard_granularity: 4096,
                discard_alignment: 0,
                persistent: true,
                max_indirect_segments: 256,
                sector_size: 512,
                physical_sector_size: 4096,
                sectors: 2 << 20,
                info: 0,
                read_only: false,
            }),
            stats: BTreeMap::from([("rd_req".to_string(), 3)]),
            error: None,
            sessions: 1,
            last_disconnect: Some(DisconnectReport {
                drained: true,
                abandoned_requests: 0,
                detail: String::new(),
            }),
            disconnecting: false,
            paused: false,
            latency: BTreeMap::from([(
                "read".to_string(),
                LatencyHistogram {
                    bounds_us: vec![10, 100],
                    counts: vec![1, 2, 0],
                    sum_ns: 150_000,
                },
            )]),
            qos: Some(DeviceQos {
                limits: QosLimits {
                    iops: 500,
                    ..QosLimits::default()
                },
                group: Some("tenant".into()),
            }),
        }
    }

    #[test]
    fn replies_round_trip_through_json() {
        let reply = ControlReply::Status {
            ok: true,
            version: STATUS_SCHEMA_VERSION,
            daemon: DaemonStatus {
                backend_types: vec!["vbd".into(), "xenblkd".into()],
                home: "/local/domain/0".into(),
                shutting_down: false,
                handing_over: false,
                metrics: BTreeMap::from([("threads".to_string(), 7)]),
                qos_groups: BTreeMap::from([(
                    "tenant".to_string(),
                    QosLimits {
                        bps: 1 << 20,
                        ..QosLimits::default()
                    },
                )]),
            },
            devices: vec![device()],
        };
        let line = serde_json::to_string(&reply).unwrap();
        let back = ControlReply::parse(&line).unwrap();
        assert_eq!(back, reply);
        let report = back.into_report().unwrap();
        assert_eq!(report.device("xenblkd", 5, 51728), Some(&device()));
        assert_eq!(report.device("xenblkd", 5, 51729), None);

        let err = ControlReply::error("no such command");
        let line = serde_json::to_string(&err).unwrap();
        assert_eq!(
            ControlReply::parse(&line).unwrap().into_report(),
            Err("no such command".to_string())
        );
    }

    #[test]
    fn limit_requests_parse_with_their_defaults() {
        let r: ControlRequest =
            serde_json::from_str(r#"{"cmd":"limit","device":"5/xvda","limits":{"iops":500}}"#)
                .unwrap();
        assert_eq!(
            r,
            ControlRequest::Limit {
                device: Some("5/xvda".into()),
                limits: Some(QosLimits {
                    iops: 500,
                    ..QosLimits::default()
                }),
                group: None,
                leave_group: false,
                clear: false,
            }
        );
        let back: ControlRequest =
            serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        // A group's limits; unknown limit names are refused.
        let g: ControlRequest =
            serde_json::from_str(r#"{"cmd":"limit","group":"t","clear":true}"#).unwrap();
        assert!(matches!(
            g,
            ControlRequest::Limit {
                device: None,
                clear: true,
                ..
            }
        ));
        assert!(serde_json::from_str::<ControlRequest>(
            r#"{"cmd":"limit","device":"5/xvda","limits":{"iopz":1}}"#
        )
        .is_err());
    }
}
