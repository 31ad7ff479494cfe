//! Per-disk QoS settings: IOPS and bandwidth limits with bursts, for one device
//! (`[defaults] qos = {...}`, `[[device]] qos = {...}`, `qos_group = "name"`) or a named
//! group of devices (`[qos.groups.NAME]`), and the live changes `xenblkd limit` asks for.
//! The engine enforces them (`backend::qos`); this is what the operator says and sees.
//!
//! ```toml
//! [qos.groups.tenant-a]          # shared by every device with qos_group = "tenant-a"
//! iops = 2000
//! bps = 200_000_000
//!
//! [[device]]
//! domid = 5
//! vdev = "xvdb"
//! qos = { iops = 500, iops_burst = 1000, write_bps = 50_000_000 }
//! qos_group = "tenant-a"
//! ```

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::vbd::VbdFactory;

/// Limits of one device or group. Rates are per second (0: no limit); a burst is how much
/// may go at once after an idle period (requests or bytes; 0: a tenth of a second's worth
/// of the rate). `iops` and `bps` count every read and write (a discard is a write
/// without bytes, a flush is free); `read_*` and `write_*` only their direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QosLimits {
    pub iops: u64,
    pub iops_burst: u64,
    pub bps: u64,
    pub bps_burst: u64,
    pub read_iops: u64,
    pub read_iops_burst: u64,
    pub write_iops: u64,
    pub write_iops_burst: u64,
    pub read_bps: u64,
    pub read_bps_burst: u64,
    pub write_bps: u64,
    pub write_bps_burst: u64,
}

impl QosLimits {
    /// `(name, rate, burst)` of each limit.
    pub fn entries(&self) -> [(&'static str, u64, u64); 6] {
        [
            ("iops", self.iops, self.iops_burst),
            ("bps", self.bps, self.bps_burst),
            ("read_iops", self.read_iops, self.read_iops_burst),
            ("write_iops", self.write_iops, self.write_iops_burst),
            ("read_bps", self.read_bps, self.read_bps_burst),
            ("write_bps", self.write_bps, self.write_bps_burst),
        ]
    }

    /// No limit set.
    pub fn is_unlimited(&self) -> bool {
        self.entries().iter().all(|(_, rate, _)| *rate == 0)
    }

    /// A burst without its rate is meaningless: refused, so a typo does not pass for a
    /// limit.
    pub fn validate(&self, key: &str) -> Result<(), ConfigError> {
        for (name, rate, burst) in self.entries() {
            if rate == 0 && burst != 0 {
                return Err(ConfigError::Invalid {
                    key: format!("{key}.{name}_burst"),
                    message: format!("a burst needs a rate: set {name} too"),
                });
            }
        }
        Ok(())
    }
}

impl fmt::Display for QosLimits {
    /// `iops=500/1000 bps=50000000` (rate/burst where a burst is set), or `unlimited`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (name, rate, burst) in self.entries() {
            if rate == 0 {
                continue;
            }
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            write!(f, "{name}={rate}")?;
            if burst != 0 {
                write!(f, "/{burst}")?;
            }
        }
        if first {
            f.write_str("unlimited")?;
        }
        Ok(())
    }
}

/// A device's QoS: its own limits and its group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceQos {
    /// The device's own limits.
    #[serde(default)]
    pub limits: QosLimits,
    /// The group it shares limits with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl DeviceQos {
    /// Neither limits nor a group.
    pub fn is_none(&self) -> bool {
        self.limits.is_unlimited() && self.group.is_none()
    }
}

impl fmt::Display for DeviceQos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.limits)?;
        if let Some(g) = &self.group {
            write!(f, ", group {g}")?;
        }
        Ok(())
    }
}

/// `[qos]`: the named groups.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QosConfig {
    /// `[qos.groups.NAME]`: the limits every member of group NAME shares.
    pub groups: BTreeMap<String, QosLimits>,
}

impl QosConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, limits) in &self.groups {
            check_group_name(name).map_err(|message| ConfigError::Invalid {
                key: format!("qos.groups.{name}"),
                message,
            })?;
            limits.validate(&format!("qos.groups.{name}"))?;
        }
        Ok(())
    }
}

/// Group names: what an operator types and a log line shows (1..=64 of `[A-Za-z0-9_.-]`).
pub fn check_group_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a group name (1 to 64 letters, digits, '-', '_', '.')"
        ))
    }
}

/// Hands every group's limits to the engine (at start and after a reload).
pub(crate) fn apply_groups(groups: &BTreeMap<String, QosLimits>, factory: &dyn VbdFactory) {
    for (name, limits) in groups {
        factory.set_qos_group(name, limits);
    }
}

/// `xenblkd limit --group NAME`: sets (`Some`) or shows a group's limits. New limits go to
/// the engine and into `groups` (the configuration held in memory, which `status` shows;
/// a reload puts the file's back).
pub(crate) fn group_op(
    groups: &mut BTreeMap<String, QosLimits>,
    factory: &dyn VbdFactory,
    name: &str,
    limits: Option<QosLimits>,
) -> Result<String, String> {
    check_group_name(name)?;
    let Some(limits) = limits else {
        return Ok(match groups.get(name) {
            Some(l) => format!("group {name}: {l}"),
            None => format!("group {name}: unlimited (not configured)"),
        });
    };
    limits
        .validate(&format!("qos.groups.{name}"))
        .map_err(|e| e.to_string())?;
    factory.set_qos_group(name, &limits);
    groups.insert(name.to_string(), limits);
    tracing::info!(group = name, %limits, "QoS group limits set");
    Ok(format!("group {name}: {limits}"))
}

/// What `xenblkd limit <device>` changes; each part absent keeps what is in force.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitChange {
    /// The device's own limits, replacing all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<QosLimits>,
    /// Join this group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Leave the group.
    #[serde(default)]
    pub leave_group: bool,
    /// No limits and no group (before the rest applies).
    #[serde(default)]
    pub clear: bool,
}

impl LimitChange {
    /// Changes nothing (a query).
    pub fn is_query(&self) -> bool {
        self.limits.is_none() && self.group.is_none() && !self.leave_group && !self.clear
    }

    /// `current` with the change applied.
    pub fn apply(&self, current: &DeviceQos) -> Result<DeviceQos, String> {
        if let Some(g) = &self.group {
            check_group_name(g)?;
            if self.leave_group {
                return Err("join a group or leave it, not both".into());
            }
        }
        if let Some(l) = &self.limits {
            l.validate("limit").map_err(|e| e.to_string())?;
        }
        let mut q = if self.clear {
            DeviceQos::default()
        } else {
            current.clone()
        };
        if let Some(l) = self.limits {
            q.limits = l;
        }
        if self.leave_group {
            q.group = None;
        }
        if let Some(g) = &self.group {
            q.group = Some(g.clone());
        }
        Ok(q)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_apply_in_order_and_are_checked() {
        let cur = DeviceQos {
            limits: QosLimits {
                iops: 10,
                ..QosLimits::default()
            },
            group: Some("a".into()),
        };
        // A query changes nothing.
        let q = LimitChange::default();
        assert!(q.is_query());
        assert_eq!(q.apply(&cur).unwrap(), cur);
        // New limits replace the old ones entirely; the group stays.
        let bps = QosLimits {
            bps: 1 << 20,
            bps_burst: 1 << 16,
            ..QosLimits::default()
        };
        let c = LimitChange {
            limits: Some(bps),
            ..LimitChange::default()
        };
        let q = c.apply(&cur).unwrap();
        assert_eq!((q.limits, q.group.as_deref()), (bps, Some("a")));
        assert_eq!(q.to_string(), "bps=1048576/65536, group a");
        // Clear, then join another group.
        let c = LimitChange {
            clear: true,
            group: Some("b".into()),
            ..LimitChange::default()
        };
        let q = c.apply(&cur).unwrap();
        assert!(q.limits.is_unlimited());
        assert_eq!(q.group.as_deref(), Some("b"));
        let c = LimitChange {
            leave_group: true,
            ..LimitChange::default()
        };
        assert!(!c.apply(&cur).unwrap().is_none());
        assert_eq!(c.apply(&cur).unwrap().group, None);
        assert_eq!(DeviceQos::default().to_string(), "unlimited");
        // Refused: a bad name, both join and leave, a burst without a rate.
        for bad in [
            LimitChange {
                group: Some("a b".into()),
                ..LimitChange::default()
            },
            LimitChange {
                group: Some("a".into()),
                leave_group: true,
                ..LimitChange::default()
            },
            LimitChange {
                limits: Some(QosLimits {
                    iops_burst: 5,
                    ..QosLimits::default()
                }),
                ..LimitChange::default()
            },
        ] {
            assert!(bad.apply(&cur).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn group_names_are_checked() {
        assert!(check_group_name("tenant-a.1_x").is_ok());
        for bad in ["", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_group_name(bad).is_err(), "{bad:?}");
        }
    }
}
