//! The seam between device lifecycle and the engine.
//!
//! xenbus decides *when* a VBD's storage is opened, its rings connected and disconnected;
//! the engine (the `backend` crate, wired in by the `xenblkd` binary) decides *how*. Keeping
//! the engine behind [`VbdFactory`] lets the whole negotiation be unit-tested with a fake,
//! and keeps this crate free of ring memory, as the architecture requires.
//!
//! Lifecycle, mirroring blkback: the storage is opened once per device ([`VbdFactory::open`],
//! blkback's `xen_vbd_create`) and kept across frontend reconnects; rings are connected per
//! frontend session ([`VbdFactory::connect`], blkback's `connect_ring` + `xen_blkif_map`)
//! and disconnected when the frontend closes ([`ConnectedVbd::disconnect`],
//! `xen_blkif_disconnect`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::config::DeviceSettings;
use crate::error::VbdError;
use crate::parse::DiskTarget;

/// Everything the toolstack and the operator said about one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// Backend directory type (`vbd`, `xenblkd`).
    pub backend_type: String,
    /// The frontend's domain.
    pub frontend_id: u32,
    /// The virtual device number.
    pub devid: u32,
    /// Absolute backend directory.
    pub backend_path: String,
    /// Absolute frontend directory.
    pub frontend_path: String,
    /// What to open: `physical-device-path` when the hotplug script wrote one, else the
    /// `/dev/block` node of `physical-device`, else `params`.
    pub target: DiskTarget,
    /// `physical-device` (major, minor), if the hotplug script wrote it: the opened block
    /// device must be that one.
    pub physical_device: Option<(u32, u32)>,
    /// `mode` is `r`.
    pub read_only: bool,
    /// `device-type` is `cdrom`.
    pub cdrom: bool,
    /// `removable` is 1.
    pub removable: bool,
    /// `direct-io-safe` is 1: O_DIRECT is safe even where it normally is avoided.
    pub direct_io_safe: bool,
    /// `discard-enable` (default 1): the toolstack allows offering discard.
    pub discard_enable: bool,
    /// Operator settings for this device.
    pub settings: DeviceSettings,
}

/// An opened storage, shared by the control thread and the engine: the `storage` crate's
/// own trait object, passed through as it is (the backend's xenstore nodes are derived
/// from its [`StorageInfo`]).
pub use storage::{Storage, StorageInfo};

/// The request/response layout the frontend uses (its `protocol` node), as blkif defines
/// and parses it.
pub use blkif::abi::Protocol;

/// One ring (queue) as the frontend published it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RingParams {
    /// Grant references of the ring pages, in page order (1, 2, 4, 8 or 16 of them).
    pub ring_refs: Vec<u32>,
    /// The frontend's event channel port.
    pub event_channel: u32,
}

/// The frontend's transport parameters, validated.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FrontendParams {
    /// Ring layout.
    pub protocol: Protocol,
    /// Whether the frontend wrote a `protocol` node at all (for status and logs).
    pub protocol_specified: bool,
    /// One entry per queue (`multi-queue-num-queues`, default 1).
    pub queues: Vec<RingParams>,
    /// log2 of the pages per ring.
    pub ring_page_order: u32,
    /// The frontend's `feature-persistent` value.
    pub frontend_persistent: bool,
    /// Persistent grants in use: we advertised them *and* the frontend wrote 1.
    pub persistent: bool,
    /// The frontend's `feature-large-sector-size`.
    pub large_sector_size: bool,
    /// Optional flags the frontend filled with something other than a number (read as
    /// absent).
    pub ignored_flags: Vec<crate::negotiate::IgnoredValue>,
}

/// What we publish in the backend directory at connect (and what the engine must honour:
/// a request for a feature not advertised gets `BLKIF_RSP_EOPNOTSUPP`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackendFeatures {
    /// `feature-flush-cache`.
    pub flush: bool,
    /// `feature-barrier`.
    pub barrier: bool,
    /// `feature-discard`.
    pub discard: bool,
    /// `discard-secure`.
    pub secure_discard: bool,
    /// `discard-granularity` in bytes.
    pub discard_granularity: u32,
    /// `discard-alignment` in bytes.
    pub discard_alignment: u32,
    /// `feature-persistent` as advertised (the operator's setting).
    pub persistent: bool,
    /// `feature-max-indirect-segments` as advertised at InitWait (0: none).
    pub max_indirect_segments: u32,
    /// `sector-size`.
    pub sector_size: u32,
    /// `physical-sector-size`.
    pub physical_sector_size: u32,
    /// `sectors`, in the unit the frontend expects (see [`sectors_for`]).
    pub sectors: u64,
    /// `info` bitmap (VDISK_CDROM 1, VDISK_REMOVABLE 2, VDISK_READONLY 4).
    pub info: u32,
    /// The VBD is read-only (a write gets `BLKIF_RSP_ERROR`).
    pub read_only: bool,
}

/// `VDISK_CDROM`.
pub const VDISK_CDROM: u32 = 1;
/// `VDISK_REMOVABLE`.
pub const VDISK_REMOVABLE: u32 = 2;
/// `VDISK_READONLY`.
pub const VDISK_READONLY: u32 = 4;

/// The `sectors` value for a disk of `size_bytes`.
///
/// blkif.h says `sectors` counts `sector-size` units, but Linux blkback has always written
/// 512-byte units and Linux blkfront reads it that way (it never sets
/// `feature-large-sector-size`). So: units of `sector-size` only for a frontend that
/// advertised `feature-large-sector-size`, 512-byte units otherwise, which is identical
/// whenever the sector size is 512.
pub fn sectors_for(size_bytes: u64, sector_size: u32, large_sector_size: bool) -> u64 {
    if large_sector_size {
        size_bytes / u64::from(sector_size.max(512))
    } else {
        size_bytes / 512
    }
}

/// Something the engine reports about a connected VBD, at any time, from any thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VbdEvent {
    /// The storage has a new size (bytes): publish `sectors` and re-write `state`.
    Resized(u64),
    /// The storage turned out not to support a feature we advertised: stop advertising it
    /// (blkback rewrites `feature-flush-cache`/`feature-barrier` 0 on EOPNOTSUPP; we do
    /// the same for discard and secure discard, and keep them withdrawn across frontend
    /// reconnects, see `Device::vbd_event`).
    FeatureLost(Feature),
    /// The VBD cannot go on (e.g. the frontend overflowed its ring): write `error` and
    /// close the device.
    Fatal(String),
}

/// A feature the engine may withdraw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    /// Flush (and with it, barrier).
    Flush,
    /// Barrier only.
    Barrier,
    /// Discard (and with it, secure discard).
    Discard,
    /// Secure discard only.
    SecureDiscard,
}

/// Where a connected VBD sends its [`VbdEvent`]s. Cheap to clone, `Send + Sync`; sending
/// after the device is gone is harmless (the event is ignored).
#[derive(Clone)]
pub struct VbdEventSink {
    send: Arc<dyn Fn(VbdEvent) + Send + Sync>,
}

impl VbdEventSink {
    /// A sink calling `f` for every event.
    pub fn new(f: impl Fn(VbdEvent) + Send + Sync + 'static) -> VbdEventSink {
        VbdEventSink { send: Arc::new(f) }
    }

    /// Reports an event.
    pub fn send(&self, event: VbdEvent) {
        (self.send)(event)
    }
}

impl std::fmt::Debug for VbdEventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VbdEventSink")
    }
}

/// What [`VbdFactory::connect`] gets.
pub struct ConnectRequest<'a> {
    /// The device.
    pub config: &'a DeviceConfig,
    /// Its opened storage.
    pub storage: &'a Arc<dyn Storage>,
    /// The frontend's validated transport parameters.
    pub frontend: &'a FrontendParams,
    /// What we are about to publish.
    pub features: &'a BackendFeatures,
    /// Where to report resizes, lost features and fatal errors.
    pub events: VbdEventSink,
    /// The rings were left Connected by a previous process (adoption): what it consumed
    /// and did not answer is recovered (its ring journals), instead of starting afresh.
    pub adopting: bool,
}

impl std::fmt::Debug for ConnectRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectRequest")
            .field("config", self.config)
            .field("frontend", self.frontend)
            .field("features", self.features)
            .field("adopting", &self.adopting)
            .finish_non_exhaustive()
    }
}

/// What a disconnect achieved.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DisconnectReport {
    /// In-flight I/O completed before the timeout.
    pub drained: bool,
    /// Requests still in flight when the timeout expired (their grants stay mapped until
    /// the storage completes them; the engine must not free memory under the kernel).
    pub abandoned_requests: u64,
    /// Free-form details for the log.
    pub detail: String,
}

/// A VBD with connected rings, served by the engine.
pub trait ConnectedVbd: Send {
    /// Counters (requests, sectors, errors, persistent grants in use, ...), by name.
    fn stats(&self) -> BTreeMap<String, u64>;

    /// Request latency histograms, by operation (`read`, `write`, `flush`, `discard`).
    fn latency(&self) -> BTreeMap<String, crate::status::LatencyHistogram> {
        BTreeMap::new()
    }

    /// Stops taking requests, waits up to `timeout` for in-flight I/O, unmaps every
    /// grant, unbinds the event channels.
    fn disconnect(self: Box<Self>, timeout: Duration) -> Result<DisconnectReport, VbdError>;

    /// Changes the VBD's QoS limits and group live (`xenblkd limit`).
    fn set_qos(&self, qos: &crate::qos::DeviceQos) {
        let _ = qos;
    }
}

/// Creates VBDs: the engine behind xenbus.
pub trait VbdFactory: Send + Sync {
    /// Opens the device's storage (called once per device, after the hotplug script when the
    /// backend type waits for it).
    fn open(&self, config: &DeviceConfig) -> Result<Arc<dyn Storage>, VbdError>;

    /// Maps the rings, binds the event channels and starts serving.
    fn connect(&self, request: ConnectRequest<'_>) -> Result<Box<dyn ConnectedVbd>, VbdError>;

    /// A handover started: the devices disconnected from now on go to the next daemon
    /// (which re-executes what their rings' journals owe), not to their end.
    fn handing_over(&self) {}

    /// Sets the limits every member of QoS group `name` shares (created if new).
    fn set_qos_group(&self, name: &str, limits: &crate::qos::QosLimits) {
        let _ = (name, limits);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sector_units() {
        assert_eq!(sectors_for(1 << 30, 512, false), 2 << 20);
        assert_eq!(sectors_for(1 << 30, 512, true), 2 << 20);
        assert_eq!(sectors_for(1 << 30, 4096, false), 2 << 20);
        assert_eq!(sectors_for(1 << 30, 4096, true), 1 << 18);
    }
}
