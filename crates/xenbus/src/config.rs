//! Daemon and per-device settings: what `xenblkd serve` reads from its TOML configuration
//! file (and flags), with validation and per-device overrides.
//!
//! ```toml
//! backend_domid = 0
//! control_socket = "/run/xenblkd/control"
//! reactor_threads = 0            # 0: one per core
//! reactor_cpus = []              # CPUs for the reactors (round robin); []: unpinned
//! drain_timeout_ms = 5000
//! log_level = "info"             # RUST_LOG's syntax; --log-level and RUST_LOG win
//!
//! [metrics]                      # the Prometheus endpoint; off without `listen`
//! listen = "127.0.0.1:9477"      # address:port, or an absolute unix socket path
//!
//! [[backend_type]]               # default: vbd (waits for the hotplug script) and xenblkd
//! name = "vbd"
//! wait_for_hotplug = true
//! # owned = false               # remove dead guests' devices (default: only for "xenblkd")
//! # [[backend_type]]             # opt-in: libxl's backendtype=qdisk disks, served only for
//! # name = "qdisk"               # domains whose device model is `xenblkd qemu-dm`
//!
//! [defaults]
//! max_queues = 4
//! max_ring_page_order = 4
//! max_indirect_segments = 256
//! persistent_grants = true
//! max_persistent_grants = 0     # 0: what a ring can have in flight; 1056: Linux blkback's
//! persistent_grant_unused_secs = 60
//! grant_mode = "auto"            # map | copy | auto
//! discard = true
//! direct_io = "auto"             # auto | on | off
//! nbd_reconnect_secs = 30        # NBD targets: how long requests wait for a lost server
//! rbd_op_timeout_secs = 30       # RBD targets: how long a request waits for the cluster
//!
//! [[device]]                     # overrides, matched on any of type/domid/vdev
//! domid = 5
//! vdev = "xvdb"
//! max_queues = 1
//! persistent_grants = false
//! qos = { iops = 500, bps = 50_000_000 }   # I/O limits (see `crate::qos`)
//! qos_group = "tenant-a"
//!
//! [qos.groups.tenant-a]          # limits shared by every device of the group
//! iops = 2000
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::ConfigError;
use crate::qos::{check_group_name, DeviceQos, QosConfig, QosLimits};
use crate::vdev;

/// `XENBUS_MAX_RING_GRANT_ORDER`: Linux's (and our) ceiling for `max-ring-page-order`.
pub const MAX_RING_PAGE_ORDER: u32 = 4;
/// Ceiling for `multi-queue-max-queues`: every queue costs a ring, an event channel and a
/// reactor slot, so an operator typo must not let a guest make us allocate thousands.
pub const MAX_QUEUES: u32 = 64;
/// Ceiling for `feature-max-indirect-segments`: `BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST` (8)
/// indirect pages of 512 segment descriptors each.
pub const MAX_INDIRECT_SEGMENTS: u32 = 4096;
/// Segments of a direct request (`BLKIF_MAX_SEGMENTS_PER_REQUEST`); advertising fewer
/// indirect segments than this is pointless, so such a setting means "no indirect".
pub const DIRECT_SEGMENTS: u32 = 11;

/// Default of [`DeviceSettings::nbd_reconnect_secs`].
pub const DEFAULT_NBD_RECONNECT_SECS: u64 = 30;
/// Ceiling of [`DeviceSettings::nbd_reconnect_secs`] (a day): a guest's requests must
/// not be held for ever.
pub const MAX_NBD_RECONNECT_SECS: u64 = 86_400;

/// Default of [`DeviceSettings::rbd_op_timeout_secs`] (librbd's request bound as xenblkd
/// sets it).
pub const DEFAULT_RBD_OP_TIMEOUT_SECS: u64 = 30;
/// Ceiling of [`DeviceSettings::rbd_op_timeout_secs`] (a day). Its floor is 1: librados
/// reads 0 as "no timeout", which would let a stopped OSD hold a guest's requests for ever.
pub const MAX_RBD_OP_TIMEOUT_SECS: u64 = 86_400;

/// The backend type our own `xenblkd attach` writes under, which no stock driver binds.
pub const XENBLKD_BACKEND_TYPE: &str = "xenblkd";

/// CPU numbers `reactor_cpus` accepts (the kernel's default `CPU_SETSIZE`).
pub const MAX_CPU: u32 = 1024;
/// The backend type libxl writes for `backendtype=phy` disks (kernel blkback's).
pub const VBD_BACKEND_TYPE: &str = "vbd";
/// The backend type libxl writes for `backendtype=qdisk` disks, normally QEMU's: served only
/// for domains claimed by our device-model stand-in (see [`crate::devmodel`]).
pub const QDISK_BACKEND_TYPE: &str = "qdisk";

/// How grant pages are accessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GrantMode {
    /// Map the guest pages (blkback's way): zero copy.
    Map,
    /// Grant-copy to and from private buffers (qdisk's way).
    Copy,
    /// Let the engine pick.
    #[default]
    Auto,
}

/// Whether to bypass the page cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DirectIo {
    /// O_DIRECT where the storage supports it.
    #[default]
    Auto,
    /// Require O_DIRECT (opening fails where it is unusable).
    On,
    /// Always use the page cache.
    Off,
}

/// Settings that apply to one device.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceSettings {
    /// `multi-queue-max-queues`.
    pub max_queues: u32,
    /// `max-ring-page-order` (0..=4).
    pub max_ring_page_order: u32,
    /// `feature-max-indirect-segments`; 0 disables indirect requests.
    pub max_indirect_segments: u32,
    /// Advertise `feature-persistent`.
    pub persistent_grants: bool,
    /// Persistent grants kept mapped per ring before LRU purging; 0 (the default): what
    /// the ring can have in flight (its slots x the advertised indirect segments and
    /// their indirect pages, at least Linux blkback's 1056), bounded by the guest's share
    /// of the daemon's grant-mapping budget.
    pub max_persistent_grants: u32,
    /// A persistent grant unused this long is unmapped at the next purge (0: never).
    pub persistent_grant_unused_secs: u64,
    /// Map or copy grants.
    pub grant_mode: GrantMode,
    /// Offer discard when the storage supports it (and the toolstack's `discard-enable`
    /// does not say otherwise).
    pub discard: bool,
    /// Page cache policy.
    pub direct_io: DirectIo,
    /// NBD targets: how long a request waits for a lost connection to come back (the
    /// daemon reconnects and resends meanwhile) before it fails with an error.
    pub nbd_reconnect_secs: u64,
    /// RBD targets: librbd's `rados_osd_op_timeout` and `rados_mon_op_timeout`, after
    /// which a request the cluster has not answered fails with an error (a ceph.conf or
    /// the target's own options still override it).
    pub rbd_op_timeout_secs: u64,
    /// The device's own I/O limits (none by default).
    pub qos: QosLimits,
    /// The QoS group whose limits the device shares (`[qos.groups.NAME]`).
    pub qos_group: Option<String>,
}

impl Default for DeviceSettings {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        DeviceSettings {
            // blkback's default is one queue per online CPU.
            max_queues: cpus.clamp(1, MAX_QUEUES),
            max_ring_page_order: MAX_RING_PAGE_ORDER,
            // blkback's MAX_INDIRECT_SEGMENTS.
            max_indirect_segments: 256,
            persistent_grants: true,
            // Sized to the ring (`backend::persistent_grants::SIZED_TO_RING`), not
            // blkback's 1056: a deep stream of 1 MiB requests outgrows that.
            max_persistent_grants: 0,
            // blkback's persistent_grant_unused_seconds.
            persistent_grant_unused_secs: 60,
            grant_mode: GrantMode::Auto,
            discard: true,
            direct_io: DirectIo::Auto,
            nbd_reconnect_secs: DEFAULT_NBD_RECONNECT_SECS,
            rbd_op_timeout_secs: DEFAULT_RBD_OP_TIMEOUT_SECS,
            qos: QosLimits::default(),
            qos_group: None,
        }
    }
}

impl DeviceSettings {
    /// Checks ranges; `key` prefixes error messages.
    pub fn validate(&self, key: &str) -> Result<(), ConfigError> {
        let bad = |field: &str, message: String| ConfigError::Invalid {
            key: format!("{key}.{field}"),
            message,
        };
        if self.max_queues == 0 || self.max_queues > MAX_QUEUES {
            return Err(bad("max_queues", format!("must be 1..={MAX_QUEUES}")));
        }
        if self.max_ring_page_order > MAX_RING_PAGE_ORDER {
            return Err(bad(
                "max_ring_page_order",
                format!("must be 0..={MAX_RING_PAGE_ORDER}"),
            ));
        }
        if self.max_indirect_segments != 0
            && !(DIRECT_SEGMENTS + 1..=MAX_INDIRECT_SEGMENTS).contains(&self.max_indirect_segments)
        {
            return Err(bad(
                "max_indirect_segments",
                format!(
                    "must be 0 (off) or {}..={MAX_INDIRECT_SEGMENTS}",
                    DIRECT_SEGMENTS + 1
                ),
            ));
        }
        if self.nbd_reconnect_secs > MAX_NBD_RECONNECT_SECS {
            return Err(bad(
                "nbd_reconnect_secs",
                format!("must be 0..={MAX_NBD_RECONNECT_SECS}"),
            ));
        }
        if !(1..=MAX_RBD_OP_TIMEOUT_SECS).contains(&self.rbd_op_timeout_secs) {
            return Err(bad(
                "rbd_op_timeout_secs",
                format!("must be 1..={MAX_RBD_OP_TIMEOUT_SECS}"),
            ));
        }
        self.qos.validate(&format!("{key}.qos"))?;
        if let Some(g) = &self.qos_group {
            check_group_name(g).map_err(|m| bad("qos_group", m))?;
        }
        Ok(())
    }

    /// The device's QoS as configured.
    pub fn device_qos(&self) -> DeviceQos {
        DeviceQos {
            limits: self.qos,
            group: self.qos_group.clone(),
        }
    }
}

/// A per-device override: every field present replaces the default for the devices it
/// matches. Match fields that are absent match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceOverride {
    /// Match: backend type (`vbd`, `xenblkd`).
    pub backend_type: Option<String>,
    /// Match: frontend domain id.
    pub domid: Option<u32>,
    /// Match: virtual device, by name (`xvdb`) or number (`51728`).
    pub vdev: Option<String>,
    /// See [`DeviceSettings::max_queues`].
    pub max_queues: Option<u32>,
    /// See [`DeviceSettings::max_ring_page_order`].
    pub max_ring_page_order: Option<u32>,
    /// See [`DeviceSettings::max_indirect_segments`].
    pub max_indirect_segments: Option<u32>,
    /// See [`DeviceSettings::persistent_grants`].
    pub persistent_grants: Option<bool>,
    /// See [`DeviceSettings::max_persistent_grants`].
    pub max_persistent_grants: Option<u32>,
    /// See [`DeviceSettings::persistent_grant_unused_secs`].
    pub persistent_grant_unused_secs: Option<u64>,
    /// See [`DeviceSettings::grant_mode`].
    pub grant_mode: Option<GrantMode>,
    /// See [`DeviceSettings::discard`].
    pub discard: Option<bool>,
    /// See [`DeviceSettings::direct_io`].
    pub direct_io: Option<DirectIo>,
    /// See [`DeviceSettings::nbd_reconnect_secs`].
    pub nbd_reconnect_secs: Option<u64>,
    /// See [`DeviceSettings::rbd_op_timeout_secs`].
    pub rbd_op_timeout_secs: Option<u64>,
    /// See [`DeviceSettings::qos`] (replaces all of the limits).
    pub qos: Option<QosLimits>,
    /// See [`DeviceSettings::qos_group`].
    pub qos_group: Option<String>,
}

impl DeviceOverride {
    fn matches(&self, backend_type: &str, domid: u32, devid: u32) -> bool {
        self.backend_type
            .as_deref()
            .is_none_or(|t| t == backend_type)
            && self.domid.is_none_or(|d| d == domid)
            && self
                .vdev
                .as_deref()
                .is_none_or(|v| vdev::parse_vdev(v).ok() == Some(devid))
    }

    fn apply(&self, s: &mut DeviceSettings) {
        if let Some(v) = self.max_queues {
            s.max_queues = v;
        }
        if let Some(v) = self.max_ring_page_order {
            s.max_ring_page_order = v;
        }
        if let Some(v) = self.max_indirect_segments {
            s.max_indirect_segments = v;
        }
        if let Some(v) = self.persistent_grants {
            s.persistent_grants = v;
        }
        if let Some(v) = self.max_persistent_grants {
            s.max_persistent_grants = v;
        }
        if let Some(v) = self.persistent_grant_unused_secs {
            s.persistent_grant_unused_secs = v;
        }
        if let Some(v) = self.grant_mode {
            s.grant_mode = v;
        }
        if let Some(v) = self.discard {
            s.discard = v;
        }
        if let Some(v) = self.direct_io {
            s.direct_io = v;
        }
        if let Some(v) = self.nbd_reconnect_secs {
            s.nbd_reconnect_secs = v;
        }
        if let Some(v) = self.rbd_op_timeout_secs {
            s.rbd_op_timeout_secs = v;
        }
        if let Some(v) = self.qos {
            s.qos = v;
        }
        if let Some(v) = &self.qos_group {
            s.qos_group = Some(v.clone());
        }
    }
}

/// A backend directory type to serve (`backend/<name>/...`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendType {
    /// The directory name.
    pub name: String,
    /// Open the storage only after the hotplug script wrote `physical-device` (or
    /// `physical-device-path`), as blkback does: libxl runs the script once the backend is
    /// in InitWait, and the script may be what makes the storage exist (loop, iSCSI...).
    #[serde(default)]
    pub wait_for_hotplug: bool,
    /// xenblkd itself plays the toolstack for this type (`xenblkd attach` writes its
    /// devices), so nobody else removes a device whose guest died: the daemon removes the
    /// backend directory once the device is Closed and the domain is gone. Defaults to true
    /// for the `xenblkd` type only; libxl cleans up after its own types.
    #[serde(default)]
    pub owned: Option<bool>,
}

impl BackendType {
    /// A type with the default ownership (see [`BackendType::owned`]).
    pub fn new(name: &str, wait_for_hotplug: bool) -> BackendType {
        BackendType {
            name: name.to_string(),
            wait_for_hotplug,
            owned: None,
        }
    }

    /// Whether the daemon removes dead domains' devices of this type.
    pub fn is_owned(&self) -> bool {
        self.owned.unwrap_or(self.name == XENBLKD_BACKEND_TYPE)
    }

    /// Whether a device of this type may be served only while its domain's device model is
    /// our stand-in: `qdisk` devices belong to QEMU otherwise, and two backends on one ring
    /// corrupt the guest's disk. Not configurable, for that reason.
    pub fn requires_device_model_claim(&self) -> bool {
        self.name == QDISK_BACKEND_TYPE
    }

    /// The types served by default: libxl's `vbd` (with the hotplug handshake) and our own
    /// `xenblkd` (written by `xenblkd attach`, no hotplug script).
    pub fn defaults() -> Vec<BackendType> {
        vec![
            BackendType::new(VBD_BACKEND_TYPE, true),
            BackendType::new(XENBLKD_BACKEND_TYPE, false),
        ]
    }
}

/// The `[metrics]` section: the OpenMetrics/Prometheus endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// Where the endpoint listens: `address:port` (TCP, e.g. `127.0.0.1:9477` or
    /// `[::1]:9477`) or an absolute path (a unix socket). None (the default): no endpoint.
    pub listen: Option<String>,
}

/// Where the metrics endpoint listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsListen {
    /// A TCP address (port 0: any free port, which the log names).
    Tcp(std::net::SocketAddr),
    /// A unix socket path.
    Unix(PathBuf),
}

impl MetricsListen {
    /// Parses `address:port` or an absolute path.
    pub fn parse(s: &str) -> Result<MetricsListen, String> {
        if s.starts_with('/') {
            return Ok(MetricsListen::Unix(PathBuf::from(s)));
        }
        s.parse().map(MetricsListen::Tcp).map_err(|_| {
            format!("{s:?} is neither an IP address with a port (127.0.0.1:9477) nor an absolute socket path")
        })
    }
}

impl std::fmt::Display for MetricsListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsListen::Tcp(a) => write!(f, "{a}"),
            MetricsListen::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

impl MetricsSettings {
    /// The endpoint, if one is configured.
    pub fn endpoint(&self) -> Result<Option<MetricsListen>, ConfigError> {
        self.listen
            .as_deref()
            .map(|l| {
                MetricsListen::parse(l).map_err(|message| ConfigError::Invalid {
                    key: "metrics.listen".into(),
                    message,
                })
            })
            .transpose()
    }
}

/// What [`Config::reload_from`] took and left, by configuration key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Changed, and in force from now on.
    pub applied: Vec<&'static str>,
    /// Changed in the file, but kept as they were until a restart.
    pub ignored: Vec<&'static str>,
}

/// The daemon's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Our domain id (0 on dom0; a driver domain's id otherwise). Backend directories are
    /// under `/local/domain/<backend_domid>/backend/`.
    pub backend_domid: u32,
    /// Backend types to serve.
    #[serde(rename = "backend_type")]
    pub backend_types: Vec<BackendType>,
    /// Where the JSON control socket listens.
    pub control_socket: PathBuf,
    /// Reactor threads of the engine; 0 means one per core.
    pub reactor_threads: u32,
    /// CPUs the reactors are pinned to, round robin; empty: not pinned.
    pub reactor_cpus: Vec<u32>,
    /// How long a disconnect may wait for in-flight I/O before it gives up.
    pub drain_timeout_ms: u64,
    /// Settings of every device...
    pub defaults: DeviceSettings,
    /// ...unless overridden here (later entries win).
    #[serde(rename = "device")]
    pub overrides: Vec<DeviceOverride>,
    /// The log level or filter (`info`, `xenbus=debug,info`: `RUST_LOG`'s syntax, which
    /// the binary checks); `--log-level` and `RUST_LOG` take precedence. None: `info`.
    pub log_level: Option<String>,
    /// The metrics endpoint (off by default).
    pub metrics: MetricsSettings,
    /// `[qos]`: named groups of devices sharing I/O limits.
    pub qos: QosConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            backend_domid: 0,
            backend_types: BackendType::defaults(),
            control_socket: PathBuf::from("/run/xenblkd/control"),
            reactor_threads: 0,
            reactor_cpus: Vec::new(),
            drain_timeout_ms: 5000,
            defaults: DeviceSettings::default(),
            overrides: Vec::new(),
            log_level: None,
            metrics: MetricsSettings::default(),
            qos: QosConfig::default(),
        }
    }
}

impl Config {
    /// Parses and validates a TOML configuration.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a TOML configuration file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// Checks every setting, including each override applied on top of the defaults.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.defaults.validate("defaults")?;
        self.metrics.endpoint()?;
        self.qos.validate()?;
        if let Some(&cpu) = self.reactor_cpus.iter().find(|&&c| c >= MAX_CPU) {
            return Err(ConfigError::Invalid {
                key: "reactor_cpus".into(),
                message: format!("CPU {cpu} is out of range (0..{MAX_CPU})"),
            });
        }
        if self.backend_types.is_empty() {
            return Err(ConfigError::Invalid {
                key: "backend_type".into(),
                message: "at least one backend type must be served".into(),
            });
        }
        for (i, t) in self.backend_types.iter().enumerate() {
            let valid = !t.name.is_empty()
                && t.name.len() <= 64
                && t.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !valid {
                return Err(ConfigError::Invalid {
                    key: format!("backend_type[{i}].name"),
                    message: format!("{:?} is not a valid xenstore directory name", t.name),
                });
            }
            if t.requires_device_model_claim() && t.wait_for_hotplug {
                // libxl runs no hotplug script for qdisk disks: the device would never open.
                return Err(ConfigError::Invalid {
                    key: format!("backend_type[{i}].wait_for_hotplug"),
                    message: format!("libxl runs no hotplug script for {:?} devices", t.name),
                });
            }
        }
        for (i, o) in self.overrides.iter().enumerate() {
            if let Some(v) = &o.vdev {
                vdev::parse_vdev(v).map_err(|e| ConfigError::Invalid {
                    key: format!("device[{i}].vdev"),
                    message: e.to_string(),
                })?;
            }
            let mut s = self.defaults.clone();
            o.apply(&mut s);
            s.validate(&format!("device[{i}]"))?;
        }
        Ok(())
    }

    /// The settings of one device: the defaults with every matching override applied in
    /// order.
    pub fn settings_for(&self, backend_type: &str, domid: u32, devid: u32) -> DeviceSettings {
        let mut s = self.defaults.clone();
        for o in self
            .overrides
            .iter()
            .filter(|o| o.matches(backend_type, domid, devid))
        {
            o.apply(&mut s);
        }
        s
    }

    /// Takes what a running daemon can change from `new` (a configuration re-read on
    /// `systemctl reload`) and says what it took and what it left. Device settings and
    /// overrides apply to every device from its next setup (a connected device keeps what
    /// it negotiated: the guest was told); the drain timeout to the next disconnect. The
    /// types served, the domain, the control socket and the reactor count shape the
    /// running process and need a restart (with `KillSignal=SIGUSR2`, a handover that
    /// keeps the guests running). `log_level` is the binary's, copied without comment.
    /// QoS groups apply at once (the manager hands them to the engine); a device's own
    /// `qos` and `qos_group` at its next connect, unless `xenblkd limit` set them.
    pub fn reload_from(&mut self, new: Config) -> ReloadReport {
        let mut report = ReloadReport::default();
        let mut take = |changed: bool, key: &'static str, runtime: bool| {
            if changed {
                if runtime {
                    report.applied.push(key);
                } else {
                    report.ignored.push(key);
                }
            }
        };
        take(self.defaults != new.defaults, "defaults", true);
        take(self.overrides != new.overrides, "device", true);
        take(
            self.drain_timeout_ms != new.drain_timeout_ms,
            "drain_timeout_ms",
            true,
        );
        take(self.qos != new.qos, "qos", true);
        take(
            self.backend_types != new.backend_types,
            "backend_type",
            false,
        );
        take(
            self.backend_domid != new.backend_domid,
            "backend_domid",
            false,
        );
        take(
            self.control_socket != new.control_socket,
            "control_socket",
            false,
        );
        take(
            self.reactor_threads != new.reactor_threads,
            "reactor_threads",
            false,
        );
        take(self.reactor_cpus != new.reactor_cpus, "reactor_cpus", false);
        take(self.metrics != new.metrics, "metrics", false);
        self.defaults = new.defaults;
        self.overrides = new.overrides;
        self.drain_timeout_ms = new.drain_timeout_ms;
        self.log_level = new.log_level;
        self.qos = new.qos;
        report
    }

    /// The served type called `name`.
    pub fn backend_type(&self, name: &str) -> Option<&BackendType> {
        self.backend_types.iter().find(|t| t.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.backend_types.len(), 2);
        assert!(c.backend_type("vbd").unwrap().wait_for_hotplug);
        assert!(!c.backend_type("xenblkd").unwrap().wait_for_hotplug);
        assert!(c.backend_type("xenblkd").unwrap().is_owned());
        assert!(!c.backend_type("vbd").unwrap().is_owned());
        assert_eq!(Config::from_toml("", "x").unwrap(), c);
        // qdisk is QEMU's unless claimed: never served by default.
        assert!(c.backend_type(QDISK_BACKEND_TYPE).is_none());
        let q = Config::from_toml("[[backend_type]]\nname = \"qdisk\"", "x").unwrap();
        let q = q.backend_type("qdisk").unwrap();
        assert!(q.requires_device_model_claim() && !q.is_owned() && !q.wait_for_hotplug);
        assert!(!c.backend_type("vbd").unwrap().requires_device_model_claim());
    }

    #[test]
    fn overrides_apply_in_order() {
        let c = Config::from_toml(
            r#"
            [defaults]
            max_queues = 4
            grant_mode = "copy"
            [[device]]
            domid = 5
            max_queues = 2
            [[device]]
            domid = 5
            vdev = "xvdb"
            max_queues = 1
            persistent_grants = false
            [[device]]
            backend_type = "xenblkd"
            direct_io = "off"
            nbd_reconnect_secs = 5
            rbd_op_timeout_secs = 120
            "#,
            "test",
        )
        .unwrap();
        assert_eq!(c.settings_for("vbd", 5, 51712).max_queues, 2);
        let s = c.settings_for("vbd", 5, 51728);
        assert_eq!((s.max_queues, s.persistent_grants), (1, false));
        assert_eq!(c.settings_for("vbd", 6, 51728).max_queues, 4);
        assert_eq!(c.settings_for("vbd", 6, 51728).grant_mode, GrantMode::Copy);
        assert_eq!(c.settings_for("xenblkd", 6, 1).direct_io, DirectIo::Off);
        assert_eq!(c.settings_for("xenblkd", 6, 1).nbd_reconnect_secs, 5);
        assert_eq!(c.settings_for("xenblkd", 6, 1).rbd_op_timeout_secs, 120);
        assert_eq!(
            c.settings_for("vbd", 6, 1).rbd_op_timeout_secs,
            DEFAULT_RBD_OP_TIMEOUT_SECS
        );
        assert_eq!(
            c.settings_for("vbd", 6, 1).nbd_reconnect_secs,
            DEFAULT_NBD_RECONNECT_SECS
        );
    }

    #[test]
    fn qos_limits_per_device_and_group() {
        let c = Config::from_toml(
            r#"
            [defaults]
            qos = { iops = 1000 }
            [[device]]
            domid = 5
            qos = { bps = 1_000_000, bps_burst = 4096 }
            qos_group = "tenant-a"
            [qos.groups.tenant-a]
            iops = 2000
            write_bps = 100
            "#,
            "t",
        )
        .unwrap();
        let s = c.settings_for("vbd", 5, 1);
        // An override replaces all of the limits.
        assert_eq!(
            (s.qos.iops, s.qos.bps, s.qos.bps_burst),
            (0, 1_000_000, 4096)
        );
        assert_eq!(s.qos_group.as_deref(), Some("tenant-a"));
        let s = c.settings_for("vbd", 6, 1);
        assert_eq!((s.qos.iops, s.qos_group), (1000, None));
        assert_eq!(c.qos.groups["tenant-a"].write_bps, 100);
        for (text, key) in [
            (
                "[defaults]\nqos = { iops_burst = 5 }",
                "defaults.qos.iops_burst",
            ),
            ("[[device]]\nqos_group = \"a b\"", "device[0].qos_group"),
            ("[qos.groups.x]\nbps_burst = 1", "qos.groups.x.bps_burst"),
            ("[qos.groups.\"a/b\"]\niops = 1", "qos.groups.a/b"),
        ] {
            match Config::from_toml(text, "t") {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(
            Config::from_toml("[qos.groups.x]\niopz = 1", "t"),
            Err(ConfigError::Parse { .. })
        ));
        // A reload takes the groups at once.
        let mut running = Config::default();
        assert_eq!(
            running.reload_from(c).applied,
            vec!["defaults", "device", "qos"]
        );
        assert_eq!(running.qos.groups["tenant-a"].iops, 2000);
    }

    #[test]
    fn reactor_cpus_are_checked() {
        let c = Config::from_toml("reactor_cpus = [0, 1]", "t").unwrap();
        assert_eq!(c.reactor_cpus, [0, 1]);
        let e = Config::from_toml("reactor_cpus = [1024]", "t").unwrap_err();
        assert!(e.to_string().contains("reactor_cpus"), "{e}");
    }

    #[test]
    fn reload_takes_what_can_change_at_run_time() {
        let mut running = Config::default();
        let new = Config::from_toml(
            r#"
            reactor_threads = 3
            reactor_cpus = [1]
            drain_timeout_ms = 100
            log_level = "debug"
            [metrics]
            listen = "127.0.0.1:9477"
            [defaults]
            max_queues = 1
            [[device]]
            domid = 5
            persistent_grants = false
            [[backend_type]]
            name = "xenblkd"
            "#,
            "t",
        )
        .unwrap();
        let report = running.reload_from(new);
        assert_eq!(
            report.applied,
            vec!["defaults", "device", "drain_timeout_ms"]
        );
        assert_eq!(
            report.ignored,
            vec!["backend_type", "reactor_threads", "reactor_cpus", "metrics"]
        );
        assert_eq!(running.defaults.max_queues, 1);
        assert!(!running.settings_for("vbd", 5, 1).persistent_grants);
        assert_eq!(running.drain_timeout_ms, 100);
        assert_eq!(running.log_level.as_deref(), Some("debug"));
        // What needs a restart stays as it was.
        assert_eq!(running.reactor_threads, 0);
        assert!(running.reactor_cpus.is_empty());
        assert_eq!(running.metrics.endpoint().unwrap(), None);
        assert_eq!(running.backend_types, BackendType::defaults());
        // The same file again: nothing changed.
        let again = running.clone();
        assert_eq!(running.reload_from(again), ReloadReport::default());
    }

    #[test]
    fn invalid_settings_are_refused() {
        for (text, key) in [
            ("[defaults]\nmax_queues = 0", "defaults.max_queues"),
            (
                "[defaults]\nmax_ring_page_order = 5",
                "defaults.max_ring_page_order",
            ),
            (
                "[defaults]\nmax_indirect_segments = 8",
                "defaults.max_indirect_segments",
            ),
            ("[[device]]\nvdev = \"floppy\"", "device[0].vdev"),
            ("[[device]]\nmax_queues = 1000", "device[0].max_queues"),
            (
                "[[device]]\nnbd_reconnect_secs = 86401",
                "device[0].nbd_reconnect_secs",
            ),
            (
                "[defaults]\nrbd_op_timeout_secs = 0",
                "defaults.rbd_op_timeout_secs",
            ),
            (
                "[[device]]\nrbd_op_timeout_secs = 86401",
                "device[0].rbd_op_timeout_secs",
            ),
            ("[[backend_type]]\nname = \"a/b\"", "backend_type[0].name"),
            ("[metrics]\nlisten = \"localhost\"", "metrics.listen"),
            ("[metrics]\nlisten = \"run/m.sock\"", "metrics.listen"),
            (
                "[[backend_type]]\nname = \"qdisk\"\nwait_for_hotplug = true",
                "backend_type[0].wait_for_hotplug",
            ),
        ] {
            match Config::from_toml(text, "t") {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(
            Config::from_toml("bogus = 1", "t"),
            Err(ConfigError::Parse { .. })
        ));
        assert!(matches!(
            Config::from_toml("[defaults]\nmax_queue = 1", "t"),
            Err(ConfigError::Parse { .. })
        ));
        Config::from_toml("[defaults]\nmax_indirect_segments = 0", "t").unwrap();
    }

    #[test]
    fn metrics_endpoint_is_off_by_default_and_tcp_or_unix() {
        assert_eq!(Config::default().metrics.endpoint().unwrap(), None);
        let c = Config::from_toml("[metrics]\nlisten = \"[::1]:9477\"", "t").unwrap();
        assert_eq!(
            c.metrics.endpoint().unwrap(),
            Some(MetricsListen::Tcp("[::1]:9477".parse().unwrap()))
        );
        let c = Config::from_toml("[metrics]\nlisten = \"/run/xenblkd/metrics\"", "t").unwrap();
        assert_eq!(
            c.metrics.endpoint().unwrap(),
            Some(MetricsListen::Unix("/run/xenblkd/metrics".into()))
        );
        assert!(Config::from_toml("[metrics]\nport = 1", "t").is_err());
    }
}
