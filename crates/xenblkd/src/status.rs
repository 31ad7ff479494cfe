//! `xenblkd status`: asks the daemon's control socket for every device and prints what
//! was negotiated and the statistics (or the raw JSON with `--json`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

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

/// Sends one request and returns the parsed reply.
pub fn query(socket: &Path, request: &str) -> anyhow::Result<Value> {
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
    let reply: Value = serde_json::from_str(&line).context("parsing the daemon's reply")?;
    if reply.get("ok") != Some(&Value::Bool(true)) {
        bail!(
            "daemon error: {}",
            reply
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("(no message)")
        );
    }
    Ok(reply)
}

pub fn run(args: &StatusArgs) -> anyhow::Result<()> {
    let reply = query(&args.control_socket, r#"{"cmd":"status"}"#)?;
    if args.json {
        println!("{reply}");
    } else {
        print!("{}", render(&reply));
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

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("-")
}

fn u64_of(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

fn flag(v: &Value, key: &str) -> bool {
    v.get(key).and_then(Value::as_bool).unwrap_or(false)
}

/// The human-readable report.
pub fn render(reply: &Value) -> String {
    let mut out = String::new();
    let daemon = &reply["daemon"];
    let types: Vec<&str> = daemon["backend_types"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let devices = reply["devices"].as_array().cloned().unwrap_or_default();
    out.push_str(&format!(
        "xenblkd: serving {} under {}, {} device(s){}\n",
        types.join(", "),
        str_of(daemon, "home"),
        devices.len(),
        if flag(daemon, "shutting_down") {
            ", shutting down"
        } else {
            ""
        }
    ));
    if let Some(m) = daemon
        .get("metrics")
        .and_then(Value::as_object)
        .filter(|m| !m.is_empty())
    {
        let line: Vec<String> = m
            .iter()
            .map(|(k, v)| format!("{k} {}", v.as_u64().unwrap_or(0)))
            .collect();
        out.push_str(&format!("  daemon: {}\n", line.join(", ")));
    }
    for d in &devices {
        out.push_str(&format!(
            "\n{}/{}/{} ({}): backend {}, frontend {}\n",
            str_of(d, "backend_type"),
            u64_of(d, "domid"),
            u64_of(d, "devid"),
            str_of(d, "vdev"),
            str_of(d, "state"),
            str_of(d, "frontend_state"),
        ));
        if let Some(t) = d.get("target").and_then(Value::as_str) {
            let disk = &d["disk"];
            out.push_str(&format!(
                "  storage: {} ({}), {}, sector {} / physical {}{}\n",
                t,
                str_of(d, "format"),
                human_size(u64_of(disk, "size_bytes")),
                u64_of(disk, "logical_block_size"),
                u64_of(disk, "physical_block_size"),
                if flag(disk, "read_only") {
                    ", read-only"
                } else {
                    ""
                }
            ));
        }
        if let Some(layers) = d.get("layers").and_then(Value::as_array) {
            let chain: Vec<&str> = layers.iter().filter_map(Value::as_str).collect();
            if chain.len() > 1 {
                out.push_str(&format!("  backing chain: {}\n", chain.join(" -> ")));
            }
        }
        if let Some(fe) = d.get("frontend").filter(|v| !v.is_null()) {
            let queues = fe["queues"].as_array().map_or(0, Vec::len);
            let proto = match str_of(fe, "protocol") {
                p if flag(fe, "protocol_specified") => p.to_string(),
                p => format!("{p} (not specified)"),
            };
            out.push_str(&format!(
                "  negotiated: protocol {proto}, {queues} queue(s), ring-page-order {}, persistent grants {}{}\n",
                u64_of(fe, "ring_page_order"),
                if flag(fe, "persistent") { "yes" } else { "no" },
                if flag(fe, "large_sector_size") { ", large sectors" } else { "" }
            ));
        }
        if let Some(f) = d.get("features").filter(|v| !v.is_null()) {
            let mut feats = Vec::new();
            for (k, name) in [
                ("flush", "flush-cache"),
                ("barrier", "barrier"),
                ("persistent", "persistent"),
            ] {
                if flag(f, k) {
                    feats.push(name.to_string());
                }
            }
            if flag(f, "discard") {
                feats.push(format!(
                    "discard(granularity {}, alignment {}{})",
                    u64_of(f, "discard_granularity"),
                    u64_of(f, "discard_alignment"),
                    if flag(f, "secure_discard") {
                        ", secure"
                    } else {
                        ""
                    }
                ));
            }
            let indirect = u64_of(f, "max_indirect_segments");
            if indirect > 0 {
                feats.push(format!("indirect {indirect}"));
            }
            out.push_str(&format!(
                "  advertised: {}; sectors {}, info {}\n",
                if feats.is_empty() {
                    "-".to_string()
                } else {
                    feats.join(" ")
                },
                u64_of(f, "sectors"),
                u64_of(f, "info")
            ));
        }
        if let Some(stats) = d
            .get("stats")
            .and_then(Value::as_object)
            .filter(|m| !m.is_empty())
        {
            let line: Vec<String> = stats
                .iter()
                .map(|(k, v)| format!("{k} {}", v.as_u64().unwrap_or(0)))
                .collect();
            out.push_str(&format!("  stats: {}\n", line.join(", ")));
        }
        out.push_str(&format!("  sessions: {}", u64_of(d, "sessions")));
        if flag(d, "disconnecting") {
            out.push_str(", disconnecting");
        }
        if let Some(r) = d.get("last_disconnect").filter(|v| !v.is_null()) {
            out.push_str(&format!(
                ", last disconnect {}",
                if flag(r, "drained") {
                    "drained"
                } else {
                    "NOT drained"
                }
            ));
        }
        out.push('\n');
        if let Some(e) = d.get("error").and_then(Value::as_str) {
            out.push_str(&format!("  error: {e}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_connected_device() {
        let reply: Value = serde_json::from_str(
            r#"{"ok":true,"daemon":{"backend_types":["vbd","xenblkd"],"home":"/local/domain/0","shutting_down":false},
            "devices":[{"backend_type":"xenblkd","domid":5,"devid":51728,"vdev":"xvdb","state":"Connected",
            "frontend_state":"Connected","target":"/img/a.qcow2","format":"qcow2",
            "layers":["qcow2:/img/a.qcow2","qcow2:/img/b.qcow2","raw:/img/c.raw"],
            "disk":{"size_bytes":1073741824,"logical_block_size":512,"physical_block_size":4096,"read_only":false},
            "frontend":{"protocol":"X86_64","protocol_specified":true,"queues":[{},{}],"ring_page_order":1,"persistent":true},
            "features":{"flush":true,"barrier":true,"discard":true,"discard_granularity":4096,"discard_alignment":0,
            "secure_discard":false,"persistent":true,"max_indirect_segments":256,"sectors":2097152,"info":0},
            "stats":{"rd_req":3,"wr_req":4},"sessions":1,"error":null,"last_disconnect":null,"disconnecting":false}]}"#,
        )
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
