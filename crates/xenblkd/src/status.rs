//! `xenblkd status`: asks the daemon's control socket for every device and prints one
//! line per device (80 columns), what was negotiated and every counter with `--verbose`,
//! the raw JSON with `--json` (its schema: docs/status.md), or, with `--watch`, a table
//! refreshed every interval with request and byte rates as `xentop` shows them.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use anyhow::Context;
use xenbus::status::{ControlReply, DeviceStatus, StatusReport};
use xenbus::vbd::BackendFeatures;

/// Default control socket of `xenblkd serve`.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/xenblkd/control";

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
    pub control_socket: PathBuf,
    /// Print the daemon's JSON reply as is (schema: docs/status-schema.json).
    #[arg(long, conflicts_with_all = ["verbose", "watch"])]
    pub json: bool,
    /// Every device in full: storage, backing chain, negotiated parameters, counters.
    #[arg(long, short)]
    pub verbose: bool,
    /// Refresh every SECS seconds with per-second rates, as xentop does.
    #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
    pub watch: Option<f64>,
    /// With --watch: stop after this many refreshes (0: until interrupted).
    #[arg(long, default_value_t = 0, requires = "watch")]
    pub iterations: u64,
}

/// Sends one request and returns the reply line as the daemon wrote it.
pub fn query_line(socket: &Path, request: &str) -> anyhow::Result<String> {
    let stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to {} (is `xenblkd serve` running?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    (&stream).write_all(format!("{request}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    Ok(line)
}

/// Asks for the status and reads it back as the types the daemon wrote it from.
pub fn query(socket: &Path) -> anyhow::Result<(String, StatusReport)> {
    let line = query_line(socket, r#"{"cmd":"status"}"#)?;
    let report = ControlReply::parse(&line)
        .context("parsing the daemon's reply")?
        .into_report()
        .map_err(|e| anyhow::anyhow!("daemon error: {e}"))?;
    Ok((line, report))
}

#[derive(Debug, clap::Args)]
pub struct HandoverArgs {
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
    pub control_socket: PathBuf,
    /// Return only once the daemon has released every device and exited (its lock is free).
    #[arg(long)]
    pub wait: bool,
    /// Longest wait with `--wait`, in seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout_secs: u64,
}

/// `xenblkd handover`: asks the daemon to hand every device over to the next one (an
/// in-place upgrade: run it, then start the new binary; or start the new `serve`, which
/// asks by itself).
pub fn run_handover(args: &HandoverArgs) -> anyhow::Result<()> {
    let line = query_line(&args.control_socket, r#"{"cmd":"handover"}"#)?;
    match ControlReply::parse(&line).context("parsing the daemon's reply")? {
        ControlReply::Accepted { accepted, .. } => println!("{accepted}"),
        ControlReply::Error { error, .. } => anyhow::bail!("daemon error: {error}"),
        ControlReply::Status { .. } => anyhow::bail!("unexpected reply: {}", line.trim()),
    }
    if args.wait {
        let lock = crate::serve::lock_path(&args.control_socket);
        let deadline = std::time::Instant::now() + Duration::from_secs(args.timeout_secs);
        loop {
            let file = std::fs::File::open(&lock)
                .with_context(|| format!("opening {}", lock.display()))?;
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock) {
                Ok(_free) => break,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {}
                Err((_, e)) => return Err(e).context(format!("locking {}", lock.display())),
            }
            if std::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "the daemon still holds {} after {}s",
                    lock.display(),
                    args.timeout_secs
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        println!("handed over: the daemon has exited");
    }
    Ok(())
}

pub fn run(args: &StatusArgs) -> anyhow::Result<()> {
    if let Some(secs) = args.watch {
        return watch(args, secs);
    }
    let (line, report) = query(&args.control_socket)?;
    if args.json {
        print!("{line}");
    } else if args.verbose {
        print!("{}", render(&report));
    } else {
        print!("{}", render_table(&report, None));
    }
    Ok(())
}

/// `--watch`: a table every `secs` seconds, rates computed from the previous sample.
fn watch(args: &StatusArgs, secs: f64) -> anyhow::Result<()> {
    if !(secs.is_finite() && (0.05..=3600.0).contains(&secs)) {
        anyhow::bail!("--watch {secs}: the interval must be 0.05..=3600 seconds");
    }
    let clear = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut previous: Option<(Instant, StatusReport)> = None;
    let mut shown = 0u64;
    loop {
        let (_, report) = query(&args.control_socket)?;
        let now = Instant::now();
        // The first frame has no rates yet: `-` under the rate headers, as xentop starts.
        let rates = previous
            .as_ref()
            .map_or_else(Rates::default, |(at, before)| {
                Rates::between(before, &report, now.duration_since(*at))
            });
        let frame = render_table(&report, Some(&rates));
        let mut out = std::io::stdout().lock();
        if clear {
            // Home and clear, as top and xentop redraw.
            write!(out, "\x1b[H\x1b[2J")?;
        } else if shown > 0 {
            writeln!(out)?;
        }
        out.write_all(frame.as_bytes())?;
        out.flush()?;
        shown += 1;
        if args.iterations != 0 && shown >= args.iterations {
            return Ok(());
        }
        previous = Some((now, report));
        std::thread::sleep(Duration::from_secs_f64(secs));
    }
}

/// Which device a line is: backend type, domain, device number.
type DeviceId = (String, u32, u32);

fn device_id(d: &DeviceStatus) -> DeviceId {
    (d.backend_type.clone(), d.domid, d.devid)
}

/// Per-second rates of each device between two samples.
#[derive(Debug, Default)]
pub struct Rates {
    per_device: BTreeMap<DeviceId, DeviceRates>,
}

/// Requests and bytes per second of one device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceRates {
    pub rd_req: f64,
    pub wr_req: f64,
    pub rd_bytes: f64,
    pub wr_bytes: f64,
}

impl Rates {
    /// Rates of the devices present in both samples in the same session (a reconnect
    /// starts the counters again: such a device has no rate until the next sample).
    pub fn between(before: &StatusReport, after: &StatusReport, elapsed: Duration) -> Rates {
        let secs = elapsed.as_secs_f64().max(1e-3);
        let old: BTreeMap<DeviceId, &DeviceStatus> =
            before.devices.iter().map(|d| (device_id(d), d)).collect();
        let mut per_device = BTreeMap::new();
        for d in &after.devices {
            let Some(o) = old.get(&device_id(d)) else {
                continue;
            };
            if o.sessions != d.sessions || o.stats.is_empty() || d.stats.is_empty() {
                continue;
            }
            let delta = |k: &str| {
                let (a, b) = (o.stats.get(k).copied(), d.stats.get(k).copied());
                b.unwrap_or(0).saturating_sub(a.unwrap_or(0)) as f64 / secs
            };
            per_device.insert(
                device_id(d),
                DeviceRates {
                    rd_req: delta("rd_req"),
                    wr_req: delta("wr_req"),
                    rd_bytes: delta("rd_sect") * 512.0,
                    wr_bytes: delta("wr_sect") * 512.0,
                },
            );
        }
        Rates { per_device }
    }

    pub fn get(&self, d: &DeviceStatus) -> Option<&DeviceRates> {
        self.per_device.get(&device_id(d))
    }
}

/// `s` cut or padded to `width` characters.
fn fit(s: &str, width: usize) -> String {
    let cut: String = s.chars().take(width).collect();
    format!("{cut:<width$}")
}

/// A count in at most 7 characters: 1234567, 12.3M, 123.4G.
fn compact(v: f64) -> String {
    if v < 9_999_999.5 {
        return format!("{v:.0}");
    }
    let mut v = v / 1000.0;
    for unit in ["k", "M", "G", "T", "P", "E", "Z"] {
        if v < 99_999.5 {
            return format!("{v:.0}{unit}");
        }
        v /= 1000.0;
    }
    // Past 10^26 per second nothing is being measured any more.
    format!("{:.0}Y", v.min(99_999.0))
}

/// Bytes in at most 7 characters, binary units: 512B, 1023K, 12.5M, 1.0T.
fn compact_bytes(v: f64) -> String {
    const UNITS: [&str; 9] = ["B", "K", "M", "G", "T", "P", "E", "Z", "Y"];
    let mut v = v;
    let mut u = 0;
    while v >= 1023.95 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 || v >= 99.95 {
        format!("{:.0}{}", v.min(999_999.0), UNITS[u])
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

/// The one-line-per-device view (never wider than 80 columns): totals, or with `rates`
/// (from `--watch`) per-second figures; `-` where a rate needs another sample.
pub fn render_table(report: &StatusReport, rates: Option<&Rates>) -> String {
    let daemon = &report.daemon;
    let mut head = format!(
        "xenblkd: {} device(s), serving {}{}",
        report.devices.len(),
        daemon.backend_types.join(","),
        if daemon.handing_over {
            ", handing over"
        } else if daemon.shutting_down {
            ", shutting down"
        } else {
            ""
        }
    );
    for (key, label) in [
        ("open_fds", "fds"),
        ("threads", "threads"),
        ("grant_mappings", "mappings"),
    ] {
        if let Some(v) = daemon.metrics.get(key) {
            head.push_str(&format!(", {label} {v}"));
        }
    }
    let mut out = fit(&head, 80).trim_end().to_string();
    out.push('\n');
    let (rd, wr, rdb, wrb) = if rates.is_some() {
        ("RD/s", "WR/s", "RDB/s", "WRB/s")
    } else {
        ("RD", "WR", "RD_B", "WR_B")
    };
    out.push_str(&format!(
        "{:>5} {:<7} {:<6} {:<10} {:>7} {:>7} {:>7} {:>7} {:>7} {:>5}\n",
        "DOMID", "TYPE", "VDEV", "STATE", "SIZE", rd, wr, rdb, wrb, "ERR"
    ));
    for d in &report.devices {
        let stat = |k: &str| d.stats.get(k).copied();
        let state = if d.error.is_some() {
            format!("{}!", d.state)
        } else if d.paused {
            "Paused".to_string()
        } else {
            d.state.to_string()
        };
        let size = d.disk.as_ref().map_or_else(
            || "-".to_string(),
            |disk| compact_bytes(disk.size_bytes as f64),
        );
        let figures: [String; 4] = match rates {
            Some(r) => match r.get(d) {
                Some(r) => [
                    compact(r.rd_req),
                    compact(r.wr_req),
                    compact_bytes(r.rd_bytes),
                    compact_bytes(r.wr_bytes),
                ],
                None => std::array::from_fn(|_| "-".to_string()),
            },
            None if d.stats.is_empty() => std::array::from_fn(|_| "-".to_string()),
            None => [
                compact(stat("rd_req").unwrap_or(0) as f64),
                compact(stat("wr_req").unwrap_or(0) as f64),
                compact_bytes(stat("rd_sect").unwrap_or(0) as f64 * 512.0),
                compact_bytes(stat("wr_sect").unwrap_or(0) as f64 * 512.0),
            ],
        };
        let errors = stat("errors").map_or_else(|| "-".to_string(), |e| compact(e as f64));
        out.push_str(&format!(
            "{:>5} {} {} {} {:>7} {:>7} {:>7} {:>7} {:>7} {:>5}\n",
            d.domid,
            fit(&d.backend_type, 7),
            fit(&d.vdev, 6),
            fit(&state, 10),
            size,
            figures[0],
            figures[1],
            figures[2],
            figures[3],
            fit(&errors, 5).trim_end(),
        ));
    }
    out
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn counters(m: &BTreeMap<String, u64>) -> String {
    let line: Vec<String> = m.iter().map(|(k, v)| format!("{k} {v}")).collect();
    line.join(", ")
}

/// The human-readable report.
pub fn render(report: &StatusReport) -> String {
    let daemon = &report.daemon;
    let mut out = format!(
        "xenblkd: serving {} under {}, {} device(s){}\n",
        daemon.backend_types.join(", "),
        daemon.home,
        report.devices.len(),
        if daemon.shutting_down {
            ", shutting down"
        } else {
            ""
        }
    );
    if !daemon.metrics.is_empty() {
        out.push_str(&format!("  daemon: {}\n", counters(&daemon.metrics)));
    }
    for (name, limits) in &daemon.qos_groups {
        out.push_str(&format!("  qos group {name}: {limits}\n"));
    }
    for d in &report.devices {
        render_device(&mut out, d);
    }
    out
}

fn render_device(out: &mut String, d: &DeviceStatus) {
    out.push_str(&format!(
        "\n{}/{}/{} ({}): backend {}, frontend {}{}\n",
        d.backend_type,
        d.domid,
        d.devid,
        d.vdev,
        d.state,
        d.frontend_state,
        if d.paused { ", PAUSED" } else { "" },
    ));
    if let (Some(t), Some(disk)) = (&d.target, &d.disk) {
        out.push_str(&format!(
            "  storage: {} ({}), {}, sector {} / physical {}{}\n",
            t,
            d.format.as_deref().unwrap_or("-"),
            human_size(disk.size_bytes),
            disk.logical_block_size,
            disk.physical_block_size,
            if disk.read_only { ", read-only" } else { "" }
        ));
    }
    if d.layers.len() > 1 {
        out.push_str(&format!("  backing chain: {}\n", d.layers.join(" -> ")));
    }
    if let Some(fe) = &d.frontend {
        let proto = if fe.protocol_specified {
            format!("{:?}", fe.protocol)
        } else {
            format!("{:?} (not specified)", fe.protocol)
        };
        out.push_str(&format!(
            "  negotiated: protocol {proto}, {} queue(s), ring-page-order {}, persistent grants {}{}\n",
            fe.queues.len(),
            fe.ring_page_order,
            if fe.persistent { "yes" } else { "no" },
            if fe.large_sector_size { ", large sectors" } else { "" }
        ));
    }
    if let Some(f) = &d.features {
        out.push_str(&format!(
            "  advertised: {}; sectors {}, info {}\n",
            advertised(f),
            f.sectors,
            f.info
        ));
    }
    if let Some(q) = &d.qos {
        let held = |k: &str| d.stats.get(k).copied().unwrap_or(0);
        out.push_str(&format!(
            "  qos: {q}; held {} request(s), {} ms\n",
            held("throttled"),
            held("throttled_us") / 1000
        ));
    }
    if !d.stats.is_empty() {
        out.push_str(&format!("  stats: {}\n", counters(&d.stats)));
    }
    out.push_str(&format!("  sessions: {}", d.sessions));
    if d.disconnecting {
        out.push_str(", disconnecting");
    }
    if let Some(r) = &d.last_disconnect {
        out.push_str(&format!(
            ", last disconnect {}",
            if r.drained { "drained" } else { "NOT drained" }
        ));
    }
    out.push('\n');
    if let Some(e) = &d.error {
        out.push_str(&format!("  error: {e}\n"));
    }
}

fn advertised(f: &BackendFeatures) -> String {
    let mut feats = Vec::new();
    for (on, name) in [
        (f.flush, "flush-cache"),
        (f.barrier, "barrier"),
        (f.persistent, "persistent"),
    ] {
        if on {
            feats.push(name.to_string());
        }
    }
    if f.discard {
        feats.push(format!(
            "discard(granularity {}, alignment {}{})",
            f.discard_granularity,
            f.discard_alignment,
            if f.secure_discard { ", secure" } else { "" }
        ));
    }
    if f.max_indirect_segments > 0 {
        feats.push(format!("indirect {}", f.max_indirect_segments));
    }
    if feats.is_empty() {
        "-".to_string()
    } else {
        feats.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_connected_device() {
        let reply = ControlReply::parse(
            r#"{"ok":true,"daemon":{"backend_types":["vbd","xenblkd"],"home":"/local/domain/0","shutting_down":false,"metrics":{}},
            "devices":[{"backend_type":"xenblkd","domid":5,"devid":51728,"vdev":"xvdb",
            "backend_path":"/local/domain/0/backend/xenblkd/5/51728","state":"Connected",
            "frontend_state":"Connected","target":"/img/a.qcow2","format":"qcow2",
            "layers":["qcow2:/img/a.qcow2","qcow2:/img/b.qcow2","raw:/img/c.raw"],
            "disk":{"size_bytes":1073741824,"logical_block_size":512,"physical_block_size":4096,"read_only":false,
            "flush":true,"discard":true,"secure_discard":false,"discard_granularity":4096,"discard_alignment":0,
            "buffer_alignment":512,"direct_io":true,"kind":"Qcow2"},
            "frontend":{"protocol":"X86_64","protocol_specified":true,
            "queues":[{"ring_refs":[8],"event_channel":3},{"ring_refs":[9],"event_channel":4}],"ring_page_order":1,
            "frontend_persistent":true,"persistent":true,"large_sector_size":false,"ignored_flags":[]},
            "features":{"flush":true,"barrier":true,"discard":true,"discard_granularity":4096,"discard_alignment":0,
            "secure_discard":false,"persistent":true,"max_indirect_segments":256,"sector_size":512,
            "physical_sector_size":4096,"sectors":2097152,"info":0,"read_only":false},
            "stats":{"rd_req":3,"wr_req":4},"sessions":1,"error":null,"last_disconnect":null,"disconnecting":false}]}"#,
        )
        .unwrap()
        .into_report()
        .unwrap();
        let text = render(&reply);
        assert!(
            text.contains("xenblkd/5/51728 (xvdb): backend Connected, frontend Connected"),
            "{text}"
        );
        assert!(text.contains("1.0 GiB"), "{text}");
        assert!(text.contains("storage: /img/a.qcow2 (qcow2)"), "{text}");
        assert!(
            text.contains(
                "backing chain: qcow2:/img/a.qcow2 -> qcow2:/img/b.qcow2 -> raw:/img/c.raw"
            ),
            "{text}"
        );
        assert!(
            text.contains("protocol X86_64, 2 queue(s), ring-page-order 1, persistent grants yes"),
            "{text}"
        );
        assert!(
            text.contains("discard(granularity 4096, alignment 0)"),
            "{text}"
        );
        assert!(text.contains("indirect 256"), "{text}");
        assert!(text.contains("rd_req 3, wr_req 4"), "{text}");
    }

    /// A report of `n` connected devices with counters as large as they get.
    fn many_devices(n: u32, counters: u64) -> StatusReport {
        let one = ControlReply::parse(&sample_reply())
            .unwrap()
            .into_report()
            .unwrap();
        let template = one.devices[0].clone();
        let devices = (0..n)
            .map(|i| {
                let mut d = template.clone();
                d.domid = 60000 + i;
                d.devid = 51712 + i * 16;
                d.backend_type = if i % 2 == 0 {
                    "vbd"
                } else {
                    "a-very-long-type"
                }
                .into();
                d.vdev = format!("xvd{}", i);
                if i % 7 == 0 {
                    d.error = Some("the storage failed".into());
                    d.state = xenbus::XenbusState::Initialising;
                }
                d.disk.as_mut().unwrap().size_bytes = u64::MAX >> (i % 64);
                for k in ["rd_req", "wr_req", "rd_sect", "wr_sect", "errors"] {
                    d.stats.insert(k.into(), counters >> (i % 64));
                }
                d
            })
            .collect();
        StatusReport {
            daemon: one.daemon,
            devices,
        }
    }

    fn sample_reply() -> String {
        r#"{"ok":true,"version":1,"daemon":{"backend_types":["vbd","xenblkd","qdisk"],"home":"/local/domain/0","shutting_down":false,
        "metrics":{"open_fds":123456,"threads":999,"grant_mappings":4294967296}},
        "devices":[{"backend_type":"xenblkd","domid":5,"devid":51728,"vdev":"xvdb",
        "backend_path":"/local/domain/0/backend/xenblkd/5/51728","state":"Connected",
        "frontend_state":"Connected","target":"/img/a.raw","format":"raw",
        "disk":{"size_bytes":1073741824,"logical_block_size":512,"physical_block_size":4096,"read_only":false,
        "flush":true,"discard":true,"secure_discard":false,"discard_granularity":4096,"discard_alignment":0,
        "buffer_alignment":512,"direct_io":true,"kind":"File"},
        "frontend":null,"features":null,
        "stats":{"rd_req":3,"wr_req":4,"rd_sect":24,"wr_sect":32,"errors":0},"sessions":1,"error":null,"last_disconnect":null,"disconnecting":false}]}"#
            .to_string()
    }

    #[test]
    fn fifty_devices_fit_80_columns() {
        for counters in [0, 12_345, u64::MAX] {
            let report = many_devices(50, counters);
            let rates = Rates::between(&many_devices(50, 0), &report, Duration::from_millis(1));
            for text in [
                render_table(&report, None),
                render_table(&report, Some(&rates)),
            ] {
                let lines: Vec<&str> = text.lines().collect();
                assert_eq!(lines.len(), 52, "{text}");
                for l in &lines {
                    assert!(
                        l.chars().count() <= 80,
                        "{} columns: {l:?}",
                        l.chars().count()
                    );
                }
                // Every device has its line, in the order the daemon gave them.
                assert!(lines[2].trim_start().starts_with("60000 vbd"), "{text}");
                assert!(lines[3].contains("a-very-"), "{text}");
                assert!(lines[2].contains("Initialisi"), "{text}");
            }
        }
    }

    #[test]
    fn table_shows_totals_and_rates() {
        let before = ControlReply::parse(&sample_reply())
            .unwrap()
            .into_report()
            .unwrap();
        let text = render_table(&before, None);
        assert!(
            text.starts_with("xenblkd: 1 device(s), serving vbd,xenblkd,qdisk, fds 123456"),
            "{text}"
        );
        let line = text.lines().nth(2).unwrap();
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            cols,
            [
                "5",
                "xenblkd",
                "xvdb",
                "Connected",
                "1.0G",
                "3",
                "4",
                "12.0K",
                "16.0K",
                "0"
            ],
            "{text}"
        );
        // Two seconds later: 200 more reads of 8 sectors, 20 more writes.
        let mut after = before.clone();
        let stats = &mut after.devices[0].stats;
        *stats.get_mut("rd_req").unwrap() += 200;
        *stats.get_mut("rd_sect").unwrap() += 1600;
        *stats.get_mut("wr_req").unwrap() += 20;
        *stats.get_mut("wr_sect").unwrap() += 160;
        let rates = Rates::between(&before, &after, Duration::from_secs(2));
        let r = rates.get(&after.devices[0]).unwrap();
        assert_eq!(
            *r,
            DeviceRates {
                rd_req: 100.0,
                wr_req: 10.0,
                rd_bytes: 400.0 * 1024.0,
                wr_bytes: 40.0 * 1024.0
            }
        );
        let text = render_table(&after, Some(&rates));
        assert!(text.contains("RD/s"), "{text}");
        let cols: Vec<&str> = text.lines().nth(2).unwrap().split_whitespace().collect();
        assert_eq!(&cols[5..9], ["100", "10", "400K", "40.0K"], "{text}");
        // A reconnect restarts the counters: no rate until the next sample.
        after.devices[0].sessions += 1;
        let rates = Rates::between(&before, &after, Duration::from_secs(2));
        assert!(rates.get(&after.devices[0]).is_none());
        let cols: Vec<String> = render_table(&after, Some(&rates))
            .lines()
            .nth(2)
            .unwrap()
            .split_whitespace()
            .map(String::from)
            .collect();
        assert_eq!(&cols[5..9], ["-", "-", "-", "-"]);
    }

    #[test]
    fn compact_figures_stay_narrow() {
        assert_eq!(compact(0.0), "0");
        assert_eq!(compact(9_999_999.0), "9999999");
        assert_eq!(compact(12_345_678.0), "12346k");
        assert_eq!(compact(u64::MAX as f64), "18447P");
        assert_eq!(compact_bytes(512.0), "512B");
        assert_eq!(compact_bytes(1536.0), "1.5K");
        assert_eq!(compact_bytes(u64::MAX as f64), "16.0E");
        for v in [
            0.0,
            1.0,
            999.0,
            1023.9,
            1024.0,
            1e6,
            1e9,
            1e12,
            1e15,
            1e18,
            u64::MAX as f64,
        ] {
            assert!(compact(v).len() <= 7, "{v}: {}", compact(v));
            assert!(compact_bytes(v).len() <= 7, "{v}: {}", compact_bytes(v));
        }
    }
}
