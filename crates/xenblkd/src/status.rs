//! `xenblkd status`: asks the daemon's control socket for every device and prints what
//! was negotiated and the statistics (or the raw JSON with `--json`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    /// Print the daemon's JSON reply as is.
    #[arg(long)]
    pub json: bool,
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

pub fn run(args: &StatusArgs) -> anyhow::Result<()> {
    let (line, report) = query(&args.control_socket)?;
    if args.json {
        print!("{line}");
    } else {
        print!("{}", render(&report));
    }
    Ok(())
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
    for d in &report.devices {
        render_device(&mut out, d);
    }
    out
}

fn render_device(out: &mut String, d: &DeviceStatus) {
    out.push_str(&format!(
        "\n{}/{}/{} ({}): backend {}, frontend {}\n",
        d.backend_type, d.domid, d.devid, d.vdev, d.state, d.frontend_state,
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
}
