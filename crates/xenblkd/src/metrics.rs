//! The Prometheus / OpenMetrics exposition of `serve --metrics`: rendered from the same
//! snapshot `xenblkd status` shows (the manager's [`DeviceStatus`] list and daemon
//! gauges) plus each reactor's counters, so the endpoint reads what the engine already
//! counts and adds nothing to the data path. The HTTP side is [`crate::metrics_server`].
//!
//! Names follow Prometheus' conventions: a `xenblkd_` prefix, base units (seconds,
//! bytes-free counts are `_total`), and per-VBD series labelled `type`, `domid`, `device`
//! (the virtual device name, `xvda`) and `guest` (the domain's name). Counters restart
//! with each frontend session, as Linux blkback's do; Prometheus' `rate()` takes such
//! resets in its stride. Two formats: the text format 0.0.4, and OpenMetrics 1.0.0 (with
//! its `# EOF`) when the scraper's `Accept` asks for `application/openmetrics-text`.

use std::collections::BTreeMap;
use std::fmt::Write;

use backend::ReactorStats;
use xenbus::status::{DaemonStatus, DeviceStatus, LatencyHistogram};

/// Content type of the text format.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Content type of OpenMetrics.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Which exposition format to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus' text format, version 0.0.4.
    Text,
    /// OpenMetrics 1.0.0.
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics when it names it (Prometheus
    /// sends it first, with a higher q-value), else the text format.
    pub fn negotiate(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    /// The response's `Content-Type`.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => TEXT_CONTENT_TYPE,
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
        }
    }
}

/// What one scrape shows.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot<'a> {
    /// Daemon-wide gauges (`xenblkd status`'s `daemon`).
    pub daemon: &'a DaemonStatus,
    /// Every device.
    pub devices: &'a [DeviceStatus],
    /// Each reactor's counters, in reactor order.
    pub reactors: &'a [ReactorStats],
    /// Guests' names by domain id (`/local/domain/<domid>/name`).
    pub guests: &'a BTreeMap<u32, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
    /// A constant 1 whose labels carry facts (OpenMetrics' `info`; a gauge in the text
    /// format).
    Info,
}

/// Writes families: HELP and TYPE once, then their samples.
struct Writer {
    out: String,
    format: Format,
}

impl Writer {
    /// Starts family `name` (without `_total` / `_info`).
    fn family(&mut self, name: &str, kind: Kind, help: &str) {
        let (exposed, ty) = match (self.format, kind) {
            (Format::Text, Kind::Counter) => (format!("{name}_total"), "counter"),
            (Format::Text, Kind::Info) => (format!("{name}_info"), "gauge"),
            (Format::OpenMetrics, Kind::Counter) => (name.to_string(), "counter"),
            (Format::OpenMetrics, Kind::Info) => (name.to_string(), "info"),
            (_, Kind::Gauge) => (name.to_string(), "gauge"),
            (_, Kind::Histogram) => (name.to_string(), "histogram"),
        };
        let _ = writeln!(self.out, "# HELP {exposed} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {exposed} {ty}");
    }

    /// One sample of the family just started (`sample` is its full name).
    fn sample(&mut self, sample: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(sample);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    fn finish(mut self) -> String {
        if self.format == Format::OpenMetrics {
            self.out.push_str("# EOF\n");
        }
        self.out
    }
}

/// Label values escape backslash, double quote and line feed (both formats).
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// HELP escapes backslash and line feed (our texts have no double quote, which
/// OpenMetrics would also escape and the text format would not).
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Seconds from microseconds, with a `.0` on whole numbers (OpenMetrics' canonical
/// float for `le`).
fn seconds_le(us: u64) -> String {
    let s = format!("{}", us as f64 / 1e6);
    if s.contains('.') || s.contains('e') {
        s
    } else {
        format!("{s}.0")
    }
}

/// The target as a label: an RBD target without its `:key=value` options, which may
/// carry a cephx secret (`:key=...`) that has no place on an endpoint other hosts may
/// scrape.
fn public_target(target: &str) -> String {
    match target.strip_prefix("rbd:") {
        Some(rest) => format!("rbd:{}", rest.split(':').next().unwrap_or("")),
        None => target.to_string(),
    }
}

/// A device's label values.
struct DeviceLabels {
    backend_type: String,
    domid: String,
    device: String,
    guest: String,
}

impl DeviceLabels {
    fn of(d: &DeviceStatus, guests: &BTreeMap<u32, String>) -> DeviceLabels {
        DeviceLabels {
            backend_type: d.backend_type.clone(),
            domid: d.domid.to_string(),
            device: d.vdev.clone(),
            guest: guests.get(&d.domid).cloned().unwrap_or_default(),
        }
    }

    fn with<'a>(&'a self, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        let mut l = vec![
            ("type", self.backend_type.as_str()),
            ("domid", self.domid.as_str()),
            ("device", self.device.as_str()),
            ("guest", self.guest.as_str()),
        ];
        l.extend_from_slice(extra);
        l
    }
}

/// A per-device counter or gauge read from the status `stats`: family, kind, help, and
/// the stats keys with the extra label each one gets.
struct StatFamily {
    name: &'static str,
    kind: Kind,
    help: &'static str,
    label: &'static str,
    keys: &'static [(&'static str, &'static str)],
}

const DEVICE_FAMILIES: &[StatFamily] = &[
    StatFamily {
        name: "xenblkd_requests",
        kind: Kind::Counter,
        help: "Requests taken off the ring, by operation (barriers count as flush), since the frontend connected.",
        label: "op",
        keys: &[
            ("rd_req", "read"),
            ("wr_req", "write"),
            ("f_req", "flush"),
            ("ds_req", "discard"),
        ],
    },
    StatFamily {
        name: "xenblkd_sectors",
        kind: Kind::Counter,
        help: "512-byte sectors read, written and discarded, since the frontend connected.",
        label: "op",
        keys: &[
            ("rd_sect", "read"),
            ("wr_sect", "write"),
            ("ds_sect", "discard"),
        ],
    },
    StatFamily {
        name: "xenblkd_errors",
        kind: Kind::Counter,
        help: "Requests answered BLKIF_RSP_ERROR (invalid, unmappable, or failed in storage).",
        label: "",
        keys: &[("errors", "")],
    },
    StatFamily {
        name: "xenblkd_unsupported_requests",
        kind: Kind::Counter,
        help: "Requests answered BLKIF_RSP_EOPNOTSUPP.",
        label: "",
        keys: &[("unsupported", "")],
    },
    StatFamily {
        name: "xenblkd_oo_requests",
        kind: Kind::Counter,
        help: "Times requests waited for a free request slot or bounce pages (blkback's oo_req).",
        label: "",
        keys: &[("oo_req", "")],
    },
    StatFamily {
        name: "xenblkd_inflight_requests",
        kind: Kind::Gauge,
        help: "Requests taken off the ring and not yet answered.",
        label: "",
        keys: &[("in_flight", "")],
    },
    StatFamily {
        name: "xenblkd_persistent_grants",
        kind: Kind::Gauge,
        help: "Persistent grants mapped by the device's rings.",
        label: "",
        keys: &[("persistent_grants_mapped", "")],
    },
    StatFamily {
        name: "xenblkd_persistent_grants_in_use",
        kind: Kind::Gauge,
        help: "Persistent grants used by requests in flight.",
        label: "",
        keys: &[("persistent_grants_in_use", "")],
    },
    StatFamily {
        name: "xenblkd_persistent_grant_lookups",
        kind: Kind::Counter,
        help: "Grants looked up in the persistent-grant cache, by result.",
        label: "result",
        keys: &[("persistent_hits", "hit"), ("persistent_misses", "miss")],
    },
    StatFamily {
        name: "xenblkd_persistent_grant_refusals",
        kind: Kind::Counter,
        help: "Grants the device wanted to keep persistently and the daemon-wide budget refused.",
        label: "",
        keys: &[("persistent_budget_refusals", "")],
    },
    StatFamily {
        name: "xenblkd_map_fallbacks",
        kind: Kind::Counter,
        help: "Requests grant-copied instead of mapped for want of grant-mapping budget.",
        label: "",
        keys: &[("map_fallbacks", "")],
    },
    StatFamily {
        name: "xenblkd_throttled_requests",
        kind: Kind::Counter,
        help: "Requests held back by the device's QoS limits (xenblkd limit, qos in the configuration).",
        label: "",
        keys: &[("throttled", "")],
    },
    StatFamily {
        name: "xenblkd_notifications",
        kind: Kind::Counter,
        help: "Event-channel notifications sent to the frontend.",
        label: "",
        keys: &[("notifications", "")],
    },
    StatFamily {
        name: "xenblkd_rings",
        kind: Kind::Gauge,
        help: "Rings (queues) connected.",
        label: "",
        keys: &[("rings", "")],
    },
    StatFamily {
        name: "xenblkd_halted_rings",
        kind: Kind::Gauge,
        help: "Rings halted because the frontend overflowed them.",
        label: "",
        keys: &[("halted_rings", "")],
    },
];

/// Daemon-wide gauges and counters from the status `daemon.metrics`.
const DAEMON_FAMILIES: &[(&str, &str, Kind, &str)] = &[
    (
        "persistent_grant_budget_used",
        "xenblkd_persistent_grant_budget_grants",
        Kind::Gauge,
        "Persistent grants mapped by all devices, against the daemon-wide budget.",
    ),
    (
        "persistent_grant_budget_limit",
        "xenblkd_persistent_grant_budget_limit_grants",
        Kind::Gauge,
        "Most persistent grants the budget allows with the rings attached now.",
    ),
    (
        "persistent_grant_budget_refusals",
        "xenblkd_persistent_grant_budget_refusals",
        Kind::Counter,
        "Takes of the grant-mapping budget refused since the daemon started.",
    ),
    (
        "grant_map_vmas",
        "xenblkd_grant_map_vmas",
        Kind::Gauge,
        "VMAs held by guests' grant mappings.",
    ),
    (
        "grant_map_vma_capacity",
        "xenblkd_grant_map_vmas_capacity",
        Kind::Gauge,
        "VMAs vm.max_map_count leaves guests' grant mappings.",
    ),
    (
        "grant_map_pages",
        "xenblkd_grant_map_pages",
        Kind::Gauge,
        "Grant pages mapped.",
    ),
    (
        "grant_map_page_capacity",
        "xenblkd_grant_map_pages_capacity",
        Kind::Gauge,
        "Most grant pages that may be mapped.",
    ),
    (
        "grant_map_guests",
        "xenblkd_grant_map_guests",
        Kind::Gauge,
        "Domains sharing the grant-mapping budget.",
    ),
    (
        "grant_map_guest_share_vmas",
        "xenblkd_grant_map_guest_share_vmas",
        Kind::Gauge,
        "Most VMAs one guest may hold now.",
    ),
    (
        "grant_map_guest_share_pages",
        "xenblkd_grant_map_guest_share_pages",
        Kind::Gauge,
        "Most grant pages one guest may hold now.",
    ),
    (
        "grant_mappings",
        "xenblkd_grant_mappings",
        Kind::Gauge,
        "Grant mappings alive in the process.",
    ),
    (
        "mapped_pages",
        "xenblkd_mapped_pages",
        Kind::Gauge,
        "Guest pages mapped by the process.",
    ),
    (
        "open_fds",
        "xenblkd_open_fds",
        Kind::Gauge,
        "File descriptors open.",
    ),
    (
        "threads",
        "xenblkd_threads",
        Kind::Gauge,
        "Threads of the daemon.",
    ),
];

/// Renders one scrape.
pub fn render(s: &Snapshot<'_>, format: Format) -> String {
    let mut w = Writer {
        out: String::with_capacity(4096 + s.devices.len() * 8192),
        format,
    };
    render_daemon(&mut w, s);
    render_reactors(&mut w, s.reactors);
    render_devices(&mut w, s);
    w.finish()
}

fn render_daemon(w: &mut Writer, s: &Snapshot<'_>) {
    w.family(
        "xenblkd_build",
        Kind::Info,
        "The daemon's version (always 1).",
    );
    // The sample is `_info` in both formats.
    w.sample(
        "xenblkd_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );
    w.family("xenblkd_devices", Kind::Gauge, "Devices the daemon knows.");
    w.sample("xenblkd_devices", &[], s.devices.len());
    let m = &s.daemon.metrics;
    for &(key, name, kind, help) in DAEMON_FAMILIES {
        let Some(v) = m.get(key) else { continue };
        w.family(name, kind, help);
        let sample = match kind {
            Kind::Counter => format!("{name}_total"),
            _ => name.to_string(),
        };
        w.sample(&sample, &[], v);
    }
    // A gauge the daemon gained after this table was written still shows, as a gauge.
    for (key, v) in m {
        let known = DAEMON_FAMILIES.iter().any(|f| f.0 == key) || key.starts_with("reactor_");
        let valid = key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if known || !valid {
            continue;
        }
        let name = format!("xenblkd_{key}");
        w.family(
            &name,
            Kind::Gauge,
            &format!("The daemon's {key} gauge (docs/status.md)."),
        );
        w.sample(&name, &[], v);
    }
}

fn render_reactors(w: &mut Writer, reactors: &[ReactorStats]) {
    type Field = fn(&ReactorStats) -> f64;
    let families: [(&str, &str, Field); 7] = [
        ("xenblkd_reactor_busy_seconds", "Time each reactor thread spent outside its wait (running rings, polling, housekeeping).", |r| r.busy_ns as f64 / 1e9),
        ("xenblkd_reactor_poll_seconds", "Time each reactor spent polling for more work after a batch (part of busy time).", |r| r.poll_ns as f64 / 1e9),
        ("xenblkd_reactor_sleeps", "Blocking waits of each reactor.", |r| r.sleeps as f64),
        ("xenblkd_reactor_wakeups", "Sleeps ended by an event (notification, completion, command).", |r| r.wakeups as f64),
        ("xenblkd_reactor_timeouts", "Sleeps ended by the housekeeping deadline.", |r| r.timeouts as f64),
        ("xenblkd_reactor_poll_hits", "Polls that found work before their budget ran out.", |r| r.poll_hits as f64),
        ("xenblkd_reactor_poll_misses", "Polls that ran their whole budget.", |r| r.poll_misses as f64),
    ];
    for (name, help, field) in families {
        w.family(name, Kind::Counter, help);
        let sample = format!("{name}_total");
        for (i, r) in reactors.iter().enumerate() {
            w.sample(&sample, &[("reactor", &i.to_string())], field(r));
        }
    }
}

fn render_devices(w: &mut Writer, s: &Snapshot<'_>) {
    let labels: Vec<DeviceLabels> = s
        .devices
        .iter()
        .map(|d| DeviceLabels::of(d, s.guests))
        .collect();
    w.family(
        "xenblkd_device",
        Kind::Info,
        "Each device: its xenbus states, storage and format.",
    );
    for (d, l) in s.devices.iter().zip(&labels) {
        let state = d.state.to_string();
        let frontend_state = d.frontend_state.to_string();
        let target = d.target.as_deref().map(public_target).unwrap_or_default();
        let format = d.format.clone().unwrap_or_default();
        w.sample(
            "xenblkd_device_info",
            &l.with(&[
                ("state", &state),
                ("frontend_state", &frontend_state),
                ("target", &target),
                ("format", &format),
            ]),
            1,
        );
    }
    w.family(
        "xenblkd_device_paused",
        Kind::Gauge,
        "1 while the device is paused by `xenblkd pause`.",
    );
    for (d, l) in s.devices.iter().zip(&labels) {
        w.sample("xenblkd_device_paused", &l.with(&[]), u8::from(d.paused));
    }
    w.family(
        "xenblkd_device_sessions",
        Kind::Counter,
        "Frontend sessions served since the device appeared.",
    );
    for (d, l) in s.devices.iter().zip(&labels) {
        w.sample("xenblkd_device_sessions_total", &l.with(&[]), d.sessions);
    }
    // The rest only while connected (the counters exist per session).
    let connected: Vec<(&DeviceStatus, &DeviceLabels)> = s
        .devices
        .iter()
        .zip(&labels)
        .filter(|(d, _)| !d.stats.is_empty())
        .collect();
    for f in DEVICE_FAMILIES {
        w.family(f.name, f.kind, f.help);
        let sample = match f.kind {
            Kind::Counter => format!("{}_total", f.name),
            _ => f.name.to_string(),
        };
        for (d, l) in &connected {
            for &(key, value) in f.keys {
                let Some(v) = d.stats.get(key) else { continue };
                let extra: Vec<(&str, &str)> = if f.label.is_empty() {
                    vec![]
                } else {
                    vec![(f.label, value)]
                };
                w.sample(&sample, &l.with(&extra), v);
            }
        }
    }
    w.family(
        "xenblkd_request_duration_seconds",
        Kind::Histogram,
        "Request latency by operation: from the reactor pass that took a request off the ring to the pass that answered it.",
    );
    for (d, l) in &connected {
        for (op, h) in &d.latency {
            histogram(
                w,
                "xenblkd_request_duration_seconds",
                &l.with(&[("op", op)]),
                h,
            );
        }
    }
}

/// One histogram's buckets (cumulative), sum and count.
fn histogram(w: &mut Writer, name: &str, labels: &[(&str, &str)], h: &LatencyHistogram) {
    let bucket = format!("{name}_bucket");
    let mut cumulative = 0u64;
    for (i, bound) in h.bounds_us.iter().enumerate() {
        cumulative += h.counts.get(i).copied().unwrap_or(0);
        let le = seconds_le(*bound);
        let mut l = labels.to_vec();
        l.push(("le", &le));
        w.sample(&bucket, &l, cumulative);
    }
    // +Inf is every request counted, so it equals _count by construction.
    let count = h.count();
    let mut l = labels.to_vec();
    l.push(("le", "+Inf"));
    w.sample(&bucket, &l, count);
    w.sample(&format!("{name}_sum"), labels, h.sum_ns as f64 / 1e9);
    w.sample(&format!("{name}_count"), labels, count);
}

#[cfg(test)]
#[path = "metrics_tests.rs"]
mod tests;
