//! The QEMU Machine Protocol as far as libxl needs it from a device model, for
//! `xenblkd qemu-dm`.
//!
//! What libxl 4.17 does on a device model's QMP socket (`libxl_qmp.c`, `libxl_dm.c`): it
//! connects, reads the greeting (it records `QMP.version.qemu.{major,minor,micro}`), sends
//! `qmp_capabilities`, then one command at a time, each with an integer `id` it checks in the
//! reply. Messages end with `"\r\n"`: libxl looks for that to split its input. After a
//! device model reports `running` it sends `query-chardev` (serial ptys to publish) and,
//! with VNC configured, `query-vnc`; with `dm_restrict` it would first poll `query-status`.
//! Any failure there fails `xl create`. libxenstat (`xentop`) connects to the second
//! monitor libxl gives QEMU (`qmp-libxenstat-<domid>`) and asks `query-blockstats`, then
//! `query-block` to tell which xenstore device each entry is (by image path): both are
//! answered from the daemon's counters, in QEMU's schema. Everything else a QEMU answers
//! is refused with QEMU's own error classes, so a caller learns it is talking to something
//! that cannot do it rather than getting a fake success.

use std::io::{Read, Write};

use serde_json::{json, Map, Value};

/// The QEMU version the greeting claims: the one Debian 12 pairs with Xen 4.17 (7.2), whose
/// QMP replies libxl is known to parse. libxl only compares versions for HVM features.
const QEMU_VERSION: (u64, u64, u64) = (7, 2, 0);
/// The most a client may send without completing a command (libxl's are under 1 KiB).
const MAX_PENDING_INPUT: usize = 64 * 1024;
/// How many command names one connection's record keeps (for the log).
const MAX_RECORDED: usize = 32;

/// What the device model is doing, as `query-status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Started with `-S`, waiting for `cont`.
    Prelaunch,
    /// Serving.
    Running,
}

/// A chardev as `query-chardev` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChardevInfo {
    /// Its `id=`.
    pub label: String,
    /// QEMU's description (`unix:/path,server=on`).
    pub filename: String,
}

/// What the protocol asks of the device model behind it.
pub trait DeviceModel: Send + Sync {
    /// Current run state.
    fn run_state(&self) -> RunState;
    /// `cont`: leave `Prelaunch` (announce `running` to the toolstack). An error message
    /// is sent back as a `GenericError`.
    fn cont(&self) -> Result<(), String>;
    /// The guest's name (`-name`), if any.
    fn name(&self) -> Option<String>;
    /// The chardevs it was given.
    fn chardevs(&self) -> Vec<ChardevInfo>;
    /// The domain's disks served by the daemon, with their counters (an error message is
    /// sent back as a `GenericError`).
    fn block_devices(&self) -> Result<Vec<BlockDevice>, String>;
}

/// A disk as `query-block` and `query-blockstats` describe it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockDevice {
    /// Virtual device name (`xvda`): QEMU's drive id.
    pub device: String,
    /// Virtual device number (the xenstore device id).
    pub devid: u32,
    /// The image or device path, once opened.
    pub file: Option<String>,
    /// Its format (`raw`, `qcow2`, ...).
    pub format: Option<String>,
    /// Read-only.
    pub read_only: bool,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Counters since the frontend connected.
    pub stats: BlockCounters,
}

/// The counters of QEMU's `BlockDeviceStats` the daemon keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockCounters {
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub unmap_bytes: u64,
    pub rd_operations: u64,
    pub wr_operations: u64,
    pub flush_operations: u64,
    pub unmap_operations: u64,
    pub rd_total_time_ns: u64,
    pub wr_total_time_ns: u64,
    pub flush_total_time_ns: u64,
    pub unmap_total_time_ns: u64,
}

impl BlockDevice {
    /// A device of `xenblkd status`, with its counters (zero while not connected).
    pub fn from_status(d: &xenbus::status::DeviceStatus) -> BlockDevice {
        let stat = |k: &str| d.stats.get(k).copied().unwrap_or(0);
        let time = |op: &str| d.latency.get(op).map_or(0, |h| h.sum_ns);
        BlockDevice {
            device: d.vdev.clone(),
            devid: d.devid,
            file: d.target.clone(),
            format: d.format.clone(),
            read_only: d.disk.is_some_and(|i| i.read_only),
            size_bytes: d.disk.map_or(0, |i| i.size_bytes),
            stats: BlockCounters {
                rd_bytes: stat("rd_sect").saturating_mul(512),
                wr_bytes: stat("wr_sect").saturating_mul(512),
                unmap_bytes: stat("ds_sect").saturating_mul(512),
                rd_operations: stat("rd_req"),
                wr_operations: stat("wr_req"),
                flush_operations: stat("f_req"),
                unmap_operations: stat("ds_req"),
                rd_total_time_ns: time("read"),
                wr_total_time_ns: time("write"),
                flush_total_time_ns: time("flush"),
                unmap_total_time_ns: time("discard"),
            },
        }
    }
}

/// `query-blockstats`' entry: QEMU 7.2's `BlockStats` with its `BlockDeviceStats`. What the
/// daemon does not count (merges, the highest offset written, failed and invalid requests
/// per operation) is 0, and `account_failed`/`account_invalid` say those are not counted.
fn block_stats(d: &BlockDevice, node_names: bool) -> Value {
    let c = &d.stats;
    let stats = json!({
        "rd_bytes": c.rd_bytes,
        "wr_bytes": c.wr_bytes,
        "unmap_bytes": c.unmap_bytes,
        "rd_operations": c.rd_operations,
        "wr_operations": c.wr_operations,
        "flush_operations": c.flush_operations,
        "unmap_operations": c.unmap_operations,
        "rd_total_time_ns": c.rd_total_time_ns,
        "wr_total_time_ns": c.wr_total_time_ns,
        "flush_total_time_ns": c.flush_total_time_ns,
        "unmap_total_time_ns": c.unmap_total_time_ns,
        "wr_highest_offset": 0,
        "rd_merged": 0,
        "wr_merged": 0,
        "unmap_merged": 0,
        "failed_rd_operations": 0,
        "failed_wr_operations": 0,
        "failed_flush_operations": 0,
        "failed_unmap_operations": 0,
        "invalid_rd_operations": 0,
        "invalid_wr_operations": 0,
        "invalid_flush_operations": 0,
        "invalid_unmap_operations": 0,
        "account_invalid": false,
        "account_failed": false,
        "timed_stats": [],
    });
    if node_names {
        json!({ "node-name": node_name(d), "stats": stats })
    } else {
        json!({ "device": d.device, "qdev": qdev(d), "node-name": node_name(d), "stats": stats })
    }
}

/// The disk's block-node name (any unique name does: QEMU's are generated).
fn node_name(d: &BlockDevice) -> String {
    format!("xenblkd-{}", d.device)
}

fn qdev(d: &BlockDevice) -> String {
    format!("xen-qdisk-{}", d.devid)
}

/// `query-block`'s entry (QEMU's `BlockInfo`): libxenstat matches `inserted.file` against
/// the device's `params` node to find its xenstore device.
fn block_info(d: &BlockDevice) -> Value {
    let mut info = json!({
        "device": d.device,
        "qdev": qdev(d),
        "type": "unknown",
        "removable": false,
        "locked": false,
    });
    if let (Some(file), Some(obj)) = (&d.file, info.as_object_mut()) {
        let format = d.format.clone().unwrap_or_else(|| "raw".into());
        obj.insert(
            "inserted".into(),
            json!({
                "file": file,
                "node-name": node_name(d),
                "ro": d.read_only,
                "drv": format,
                "backing_file_depth": 0,
                "encrypted": false,
                "detect_zeroes": "off",
                "bps": 0, "bps_rd": 0, "bps_wr": 0,
                "iops": 0, "iops_rd": 0, "iops_wr": 0,
                "write_threshold": 0,
                "cache": {"writeback": true, "direct": false, "no-flush": false},
                "image": {"filename": file, "format": format, "virtual-size": d.size_bytes},
            }),
        );
    }
    info
}

/// The greeting QEMU sends first on every QMP connection.
pub fn greeting() -> Value {
    let (major, minor, micro) = QEMU_VERSION;
    json!({
        "QMP": {
            "version": {
                "qemu": {"major": major, "minor": minor, "micro": micro},
                "package": format!("xenblkd {} device-model stand-in", env!("CARGO_PKG_VERSION")),
            },
            // No out-of-band execution.
            "capabilities": [],
        }
    })
}

/// The commands answered after negotiation.
const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-commands",
    "query-status",
    "query-chardev",
    "query-vnc",
    "query-name",
    "query-version",
    "query-blockstats",
    "query-block",
    "cont",
    "quit",
];

/// One QMP connection's protocol state: replies to each command object.
pub struct Session<'a> {
    dm: &'a dyn DeviceModel,
    negotiated: bool,
    /// Set once `quit` was answered: the connection ends and the device model exits.
    pub quit: bool,
}

fn error(class: &str, desc: impl Into<String>) -> Value {
    json!({"error": {"class": class, "desc": desc.into()}})
}

impl<'a> Session<'a> {
    /// A connection that has been sent the greeting.
    pub fn new(dm: &'a dyn DeviceModel) -> Session<'a> {
        Session {
            dm,
            negotiated: false,
            quit: false,
        }
    }

    /// The reply to one input value, with the caller's `id` echoed when it gave one.
    pub fn handle(&mut self, input: &Value) -> Value {
        let id = input.as_object().and_then(|o| o.get("id")).cloned();
        let mut reply = self.reply(input);
        if let (Some(id), Some(obj)) = (id, reply.as_object_mut()) {
            obj.insert("id".into(), id);
        }
        reply
    }

    fn reply(&mut self, input: &Value) -> Value {
        let Some(obj) = input.as_object() else {
            return error("GenericError", "QMP input must be a JSON object");
        };
        if obj.contains_key("exec-oob") {
            return error(
                "GenericError",
                "QMP input member 'exec-oob' is not supported: no out-of-band execution",
            );
        }
        let Some(cmd) = obj.get("execute") else {
            return error("GenericError", "QMP input lacks member 'execute'");
        };
        let Some(cmd) = cmd.as_str() else {
            return error(
                "GenericError",
                "QMP input member 'execute' must be a string",
            );
        };
        let empty = Map::new();
        let args = match obj.get("arguments") {
            None => &empty,
            Some(Value::Object(a)) => a,
            Some(_) => {
                return error(
                    "GenericError",
                    "QMP input member 'arguments' must be an object",
                )
            }
        };
        if let Some(bad) = obj
            .keys()
            .find(|k| !matches!(k.as_str(), "execute" | "arguments" | "id"))
        {
            return error(
                "GenericError",
                format!("QMP input member '{bad}' is unexpected"),
            );
        }
        if !self.negotiated {
            if cmd != "qmp_capabilities" {
                return error(
                    "CommandNotFound",
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                );
            }
            return self.capabilities(args);
        }
        if !COMMANDS.contains(&cmd) {
            return error(
                "CommandNotFound",
                format!("The command {cmd} has not been found"),
            );
        }
        if cmd == "qmp_capabilities" {
            return error(
                "CommandNotFound",
                "Capabilities negotiation is already complete, command ignored",
            );
        }
        // `query-blockstats` takes `query-nodes`; nothing else takes arguments.
        let mut query_nodes = false;
        for (arg, value) in args {
            match (cmd, arg.as_str(), value) {
                ("query-blockstats", "query-nodes", Value::Bool(b)) => query_nodes = *b,
                ("query-blockstats", "query-nodes", _) => {
                    return error(
                        "GenericError",
                        "Invalid parameter type for 'query-nodes', expected: boolean",
                    )
                }
                _ => return error("GenericError", format!("Parameter '{arg}' is unexpected")),
            }
        }
        let ret = match cmd {
            "query-commands" => Value::Array(
                COMMANDS
                    .iter()
                    .map(|name| json!({ "name": name }))
                    .collect(),
            ),
            "query-status" => {
                let state = self.dm.run_state();
                json!({
                    "status": match state {
                        RunState::Prelaunch => "prelaunch",
                        RunState::Running => "running",
                    },
                    "singlestep": false,
                    "running": state == RunState::Running,
                })
            }
            "query-chardev" => Value::Array(
                self.dm
                    .chardevs()
                    .into_iter()
                    .map(|c| json!({"label": c.label, "filename": c.filename, "frontend-open": true}))
                    .collect(),
            ),
            // No display is served (see the module docs of qemu_dm).
            "query-vnc" => json!({ "enabled": false }),
            "query-name" => match self.dm.name() {
                Some(name) => json!({ "name": name }),
                None => json!({}),
            },
            "query-version" => greeting()["QMP"]["version"].clone(),
            "query-blockstats" | "query-block" => match self.dm.block_devices() {
                Ok(devices) => Value::Array(
                    devices
                        .iter()
                        .map(|d| {
                            if cmd == "query-block" {
                                block_info(d)
                            } else {
                                block_stats(d, query_nodes)
                            }
                        })
                        .collect(),
                ),
                Err(e) => return error("GenericError", e),
            },
            "cont" => {
                if let Err(e) = self.dm.cont() {
                    return error("GenericError", e);
                }
                json!({})
            }
            "quit" => {
                self.quit = true;
                json!({})
            }
            _ => unreachable!("every name in COMMANDS has an arm"),
        };
        json!({ "return": ret })
    }

    fn capabilities(&mut self, args: &Map<String, Value>) -> Value {
        for (key, value) in args {
            if key != "enable" {
                return error("GenericError", format!("Parameter '{key}' is unexpected"));
            }
            let Some(list) = value.as_array() else {
                return error(
                    "GenericError",
                    "Invalid parameter type for 'enable', expected: array",
                );
            };
            if let Some(cap) = list.first() {
                return error(
                    "GenericError",
                    format!("Capability {cap} is not available: no out-of-band execution"),
                );
            }
        }
        self.negotiated = true;
        json!({ "return": {} })
    }
}

/// Why a QMP connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The client closed it.
    Closed,
    /// `quit` was answered.
    Quit,
    /// The client sent more than [`MAX_PENDING_INPUT`] without finishing a command.
    Flooded,
}

/// Writes one message with the `"\r\n"` QMP ends every message with.
fn send(out: &mut impl Write, msg: &Value) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    bytes.extend_from_slice(b"\r\n");
    out.write_all(&bytes)?;
    out.flush()
}

/// The name of the command in an input, for the record.
fn command_name(input: &Value) -> String {
    match input.get("execute").and_then(Value::as_str) {
        Some(name) => name.chars().take(64).collect(),
        None => "(invalid)".into(),
    }
}

/// Serves one connection: greeting, then a reply per command until the client closes it,
/// `quit`, or an I/O error. The names of the commands it was sent go to `record` (the first
/// [`MAX_RECORDED`]): what the toolstack asked is worth a log line.
pub fn serve<S: Read + Write>(
    stream: &mut S,
    dm: &dyn DeviceModel,
    record: &mut Vec<String>,
) -> std::io::Result<Ended> {
    send(stream, &greeting())?;
    let mut session = Session::new(dm);
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Ok(Ended::Closed),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        pending.extend_from_slice(&chunk[..n]);
        let mut values = serde_json::Deserializer::from_slice(&pending).into_iter::<Value>();
        let mut consumed = 0;
        loop {
            match values.next() {
                None => {
                    consumed = pending.len();
                    break;
                }
                Some(Ok(value)) => {
                    consumed = values.byte_offset();
                    if record.len() < MAX_RECORDED {
                        record.push(command_name(&value));
                    }
                    let reply = session.handle(&value);
                    send(stream, &reply)?;
                    if session.quit {
                        return Ok(Ended::Quit);
                    }
                }
                // The rest of a command that is still arriving.
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => {
                    // QEMU answers a syntax error and drops what it had buffered.
                    send(
                        stream,
                        &error("GenericError", format!("JSON parse error, {e}")),
                    )?;
                    consumed = pending.len();
                    break;
                }
            }
        }
        pending.drain(..consumed);
        if pending.len() > MAX_PENDING_INPUT {
            send(
                stream,
                &error("GenericError", "JSON parse error, input too large"),
            )?;
            return Ok(Ended::Flooded);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    struct FakeDm {
        running: AtomicBool,
    }

    impl FakeDm {
        fn new(running: bool) -> FakeDm {
            FakeDm {
                running: AtomicBool::new(running),
            }
        }
    }

    impl DeviceModel for FakeDm {
        fn run_state(&self) -> RunState {
            if self.running.load(Ordering::SeqCst) {
                RunState::Running
            } else {
                RunState::Prelaunch
            }
        }
        fn cont(&self) -> Result<(), String> {
            self.running.store(true, Ordering::SeqCst);
            Ok(())
        }
        fn name(&self) -> Option<String> {
            Some("guest".into())
        }
        fn chardevs(&self) -> Vec<ChardevInfo> {
            vec![ChardevInfo {
                label: "libxl-cmd".into(),
                filename: "unix:/run/xen/qmp-libxl-5,server=on".into(),
            }]
        }
        fn block_devices(&self) -> Result<Vec<BlockDevice>, String> {
            if !self.running.load(Ordering::SeqCst) {
                return Err("xenblkd serve is not answering".into());
            }
            Ok(vec![
                BlockDevice {
                    device: "xvda".into(),
                    devid: 51712,
                    file: Some("/img/a.qcow2".into()),
                    format: Some("qcow2".into()),
                    read_only: false,
                    size_bytes: 1 << 30,
                    stats: BlockCounters {
                        rd_bytes: 4096,
                        wr_bytes: 8192,
                        rd_operations: 1,
                        wr_operations: 2,
                        flush_operations: 3,
                        rd_total_time_ns: 7,
                        ..Default::default()
                    },
                },
                BlockDevice {
                    device: "xvdb".into(),
                    devid: 51728,
                    ..Default::default()
                },
            ])
        }
    }

    /// A client: scripted input chunks, collected output.
    struct Pipe {
        input: VecDeque<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Pipe {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let Some(mut chunk) = self.input.pop_front() else {
                return Ok(0);
            };
            let n = chunk.len().min(buf.len());
            buf[..n].copy_from_slice(&chunk[..n]);
            if n < chunk.len() {
                self.input.push_front(chunk.split_off(n));
            }
            Ok(n)
        }
    }

    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn converse(dm: &FakeDm, chunks: &[&str]) -> (Ended, Vec<Value>) {
        converse_recorded(dm, chunks).0
    }

    fn converse_recorded(dm: &FakeDm, chunks: &[&str]) -> ((Ended, Vec<Value>), Vec<String>) {
        let mut pipe = Pipe {
            input: chunks.iter().map(|c| c.as_bytes().to_vec()).collect(),
            output: Vec::new(),
        };
        let mut record = Vec::new();
        let ended = serve(&mut pipe, dm, &mut record).unwrap();
        let text = String::from_utf8(pipe.output).unwrap();
        assert!(text.ends_with("\r\n"), "{text:?}");
        let msgs = text
            .split_terminator("\r\n")
            .map(|m| serde_json::from_str(m).unwrap())
            .collect();
        ((ended, msgs), record)
    }

    #[test]
    fn libxl_startup_conversation() {
        let dm = FakeDm::new(true);
        // As libxl_qmp.c sends them: one command at a time, integer ids from 0x786c7100.
        let ((ended, msgs), record) = converse_recorded(
            &dm,
            &[
                "{\"execute\":\"qmp_capabilities\",\"id\":2020370688}\r\n",
                "{\"execute\":\"query-chardev\",\"id\":2020370689}\r\n",
                "{\"execute\":\"query-vnc\",\"id\":2020370690}\r\n",
            ],
        );
        assert_eq!(ended, Ended::Closed);
        assert_eq!(msgs[0]["QMP"]["version"]["qemu"]["major"], 7);
        assert_eq!(msgs[1], json!({"return": {}, "id": 2020370688}));
        assert_eq!(msgs[2]["id"], 2020370689);
        let chardevs = msgs[2]["return"].as_array().unwrap();
        assert_eq!(chardevs[0]["label"], "libxl-cmd");
        // No "serial*" label: libxl publishes no tty.
        assert!(chardevs
            .iter()
            .all(|c| !c["label"].as_str().unwrap().starts_with("serial")));
        assert_eq!(
            msgs[3],
            json!({"return": {"enabled": false}, "id": 2020370690})
        );
        assert_eq!(msgs.len(), 4);
        assert_eq!(record, ["qmp_capabilities", "query-chardev", "query-vnc"]);
    }

    #[test]
    fn commands_before_negotiation_are_refused() {
        let dm = FakeDm::new(true);
        let (_, msgs) = converse(&dm, &["{\"execute\":\"query-status\",\"id\":\"a\"}"]);
        assert_eq!(msgs[1]["error"]["class"], "CommandNotFound");
        assert_eq!(msgs[1]["id"], "a");
        let (_, msgs) = converse(
            &dm,
            &["{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"oob\"]}}"],
        );
        assert_eq!(msgs[1]["error"]["class"], "GenericError");
    }

    #[test]
    fn split_and_batched_input_and_status() {
        let dm = FakeDm::new(false);
        let (_, msgs) = converse(
            &dm,
            &[
                "{\"execute\":\"qmp_capa",
                "bilities\"} {\"execute\":\"query-status\"}{\"execute\":\"cont\"}",
                "\n{\"execute\":\"query-status\",\"id\":7}",
            ],
        );
        assert_eq!(msgs[1], json!({"return": {}}));
        assert_eq!(msgs[2]["return"]["status"], "prelaunch");
        assert_eq!(msgs[2]["return"]["running"], false);
        assert_eq!(msgs[3], json!({"return": {}}));
        assert_eq!(
            msgs[4],
            json!({"return": {"status": "running", "singlestep": false, "running": true}, "id": 7})
        );
    }

    #[test]
    fn everything_else_gets_qemus_errors() {
        let dm = FakeDm::new(true);
        let (ended, msgs) = converse(
            &dm,
            &[
                "{\"execute\":\"qmp_capabilities\"}",
                "{\"execute\":\"xen-save-devices-state\",\"arguments\":{\"filename\":\"/x\"},\"id\":1}",
                "{\"execute\":\"qmp_capabilities\",\"id\":2}",
                "[1,2]",
                "{\"arguments\":{}}",
                "{\"execute\":\"query-status\",\"arguments\":{\"x\":1}}",
                "{\"execute\":\"query-status\",\"arguments\":[]}",
                "{\"execute\":7}",
                "{\"execute\":\"query-name\",\"bogus\":1}",
                "{\"exec-oob\":\"query-name\"}",
                "{\"execute\": nope}",
                "{\"execute\":\"query-name\"}",
                "{\"execute\":\"quit\",\"id\":9}",
                "{\"execute\":\"query-name\"}",
            ],
        );
        assert_eq!(ended, Ended::Quit);
        let class = |i: usize| msgs[i]["error"]["class"].as_str().unwrap_or("").to_string();
        assert_eq!(class(2), "CommandNotFound");
        assert_eq!(msgs[2]["id"], 1);
        assert_eq!(class(3), "CommandNotFound");
        for (i, msg) in msgs.iter().enumerate().take(12).skip(4) {
            assert_eq!(class(i), "GenericError", "{msg}");
        }
        assert_eq!(msgs[12], json!({"return": {"name": "guest"}}));
        assert_eq!(msgs[13], json!({"return": {}, "id": 9}));
        // Nothing answered after quit.
        assert_eq!(msgs.len(), 14);
    }

    /// libxenstat's conversation (`xenstat_qmp.c`): capabilities without reading the
    /// greeting first, `query-blockstats`, then `query-block` for the image paths.
    #[test]
    fn xentop_gets_blockstats_in_qemus_schema() {
        let dm = FakeDm::new(true);
        let (_, msgs) = converse(
            &dm,
            &[
                "{ \"execute\": \"qmp_capabilities\" }",
                "{ \"execute\": \"query-blockstats\" }",
                "{ \"execute\": \"query-block\" }",
                "{\"execute\":\"query-blockstats\",\"arguments\":{\"query-nodes\":true}}",
                "{\"execute\":\"query-blockstats\",\"arguments\":{\"query-nodes\":1}}",
                "{\"execute\":\"query-block\",\"arguments\":{\"query-nodes\":true}}",
            ],
        );
        let stats = msgs[2]["return"].as_array().unwrap();
        assert_eq!(stats.len(), 2);
        assert_eq!(stats[0]["device"], "xvda");
        let s = &stats[0]["stats"];
        assert_eq!(s["rd_bytes"], 4096);
        assert_eq!(s["wr_bytes"], 8192);
        assert_eq!(s["rd_operations"], 1);
        assert_eq!(s["wr_operations"], 2);
        assert_eq!(s["flush_operations"], 3);
        assert_eq!(s["rd_total_time_ns"], 7);
        assert_eq!(s["account_failed"], false);
        assert_eq!(stats[1]["stats"]["rd_bytes"], 0);
        let block = msgs[3]["return"].as_array().unwrap();
        assert_eq!(block[0]["device"], "xvda");
        assert_eq!(block[0]["inserted"]["file"], "/img/a.qcow2");
        assert_eq!(block[0]["inserted"]["drv"], "qcow2");
        assert_eq!(block[0]["inserted"]["image"]["virtual-size"], 1u64 << 30);
        // Not opened yet: no medium.
        assert!(block[1].get("inserted").is_none(), "{}", block[1]);
        let nodes = msgs[4]["return"].as_array().unwrap();
        assert!(nodes[0].get("device").is_none() && nodes[0]["node-name"] == "xenblkd-xvda");
        assert_eq!(msgs[5]["error"]["class"], "GenericError");
        assert_eq!(msgs[6]["error"]["class"], "GenericError");

        // Without the daemon: QEMU's error, not made-up figures.
        let dm = FakeDm::new(false);
        let (_, msgs) = converse(
            &dm,
            &["{\"execute\":\"qmp_capabilities\"}{\"execute\":\"query-blockstats\"}"],
        );
        assert_eq!(msgs[2]["error"]["class"], "GenericError");
    }

    #[test]
    fn a_flood_without_a_complete_command_ends_the_connection() {
        let dm = FakeDm::new(true);
        let open = format!("{{\"execute\":\"{}", "x".repeat(MAX_PENDING_INPUT + 10));
        let (ended, msgs) = converse(&dm, &[&open]);
        assert_eq!(ended, Ended::Flooded);
        assert_eq!(msgs[1]["error"]["class"], "GenericError");
    }
}
