//! `xenblkd pause|resume|reopen <device>`: one device request on the daemon's control
//! socket, as tapdisk's `tap-ctl pause/unpause` (see ARCHITECTURE.md, "Pause, resume and
//! reopen"); `xenblkd limit`: a device's or a group's I/O limits (ARCHITECTURE.md, "QoS").

use std::path::PathBuf;

use anyhow::Context;
use xenbus::qos::QosLimits;
use xenbus::status::{ControlReply, ControlRequest};

use crate::status::{query_line, DEFAULT_CONTROL_SOCKET};

#[derive(Debug, clap::Args)]
pub struct DeviceCtlArgs {
    /// The device: `<type>/<domid>/<devid>`, or `<domid>/<devid>`; the devid may be a
    /// virtual device name (`5/xvdb`).
    pub device: String,
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
    pub control_socket: PathBuf,
}

/// Which request.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    Pause,
    Resume,
    Reopen,
}

/// Sends the request and prints the daemon's answer; an error answer fails the command.
pub fn run(op: Op, args: &DeviceCtlArgs) -> anyhow::Result<()> {
    let device = args.device.clone();
    let request = match op {
        Op::Pause => ControlRequest::Pause { device },
        Op::Resume => ControlRequest::Resume { device },
        Op::Reopen => ControlRequest::Reopen { device },
    };
    let line = query_line(&args.control_socket, &serde_json::to_string(&request)?)?;
    match ControlReply::parse(&line).context("parsing the daemon's reply")? {
        ControlReply::Accepted { accepted, .. } => {
            println!("{}: {accepted}", args.device);
            Ok(())
        }
        ControlReply::Error { error, .. } => anyhow::bail!("{}: {error}", args.device),
        ControlReply::Status { .. } => anyhow::bail!("unexpected reply: {}", line.trim()),
    }
}

/// `xenblkd limit`: a device's or a group's I/O limits, shown or changed live.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("limits").multiple(true)))]
pub struct LimitArgs {
    /// The device (as for `pause`); omitted: the limits of the group named by --group.
    pub device: Option<String>,
    /// Requests per second (reads and writes).
    #[arg(long, value_parser = parse_amount, group = "limits")]
    pub iops: Option<u64>,
    /// Requests that may go at once after an idle time (default: 0.1 s of --iops).
    #[arg(long, value_parser = parse_amount, group = "limits")]
    pub iops_burst: Option<u64>,
    /// Bytes per second (reads and writes); k, M, G (1000s) or Ki, Mi, Gi (1024s).
    #[arg(long, value_parser = parse_amount, group = "limits")]
    pub bps: Option<u64>,
    /// Bytes that may go at once after an idle time (default: 0.1 s of --bps).
    #[arg(long, value_parser = parse_amount, group = "limits")]
    pub bps_burst: Option<u64>,
    /// Read requests per second.
    #[arg(long, value_parser = parse_amount, group = "limits")]
    pub read_iops: Option<u64>,
    #[arg(long, value_parser = parse_amount, group = "limits", hide_short_help = true)]
    pub read_iops_burst: Option<u64>,
    /// Write requests per second (discards count as writes).
    #[arg(long, value_parser = parse_amount, group = "limits")]
    pub write_iops: Option<u64>,
    #[arg(long, value_parser = parse_amount, group = "limits", hide_short_help = true)]
    pub write_iops_burst: Option<u64>,
    /// Bytes read per second.
    #[arg(long, value_parser = parse_amount, group = "limits")]
    pub read_bps: Option<u64>,
    #[arg(long, value_parser = parse_amount, group = "limits", hide_short_help = true)]
    pub read_bps_burst: Option<u64>,
    /// Bytes written per second.
    #[arg(long, value_parser = parse_amount, group = "limits")]
    pub write_bps: Option<u64>,
    #[arg(long, value_parser = parse_amount, group = "limits", hide_short_help = true)]
    pub write_bps_burst: Option<u64>,
    /// The device joins this QoS group (or, without a device, the group to set).
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
    /// The device leaves its QoS group.
    #[arg(long, conflicts_with = "group")]
    pub no_group: bool,
    /// Lift every limit (and leave the group) before the rest applies.
    #[arg(long)]
    pub clear: bool,
    /// The daemon's control socket.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
    pub control_socket: PathBuf,
}

impl LimitArgs {
    /// The limits given (every one not given is none), or `None` if no limit was given.
    fn limits(&self) -> Option<QosLimits> {
        let given = [
            self.iops,
            self.iops_burst,
            self.bps,
            self.bps_burst,
            self.read_iops,
            self.read_iops_burst,
            self.write_iops,
            self.write_iops_burst,
            self.read_bps,
            self.read_bps_burst,
            self.write_bps,
            self.write_bps_burst,
        ];
        given.iter().any(Option::is_some).then(|| QosLimits {
            iops: self.iops.unwrap_or(0),
            iops_burst: self.iops_burst.unwrap_or(0),
            bps: self.bps.unwrap_or(0),
            bps_burst: self.bps_burst.unwrap_or(0),
            read_iops: self.read_iops.unwrap_or(0),
            read_iops_burst: self.read_iops_burst.unwrap_or(0),
            write_iops: self.write_iops.unwrap_or(0),
            write_iops_burst: self.write_iops_burst.unwrap_or(0),
            read_bps: self.read_bps.unwrap_or(0),
            read_bps_burst: self.read_bps_burst.unwrap_or(0),
            write_bps: self.write_bps.unwrap_or(0),
            write_bps_burst: self.write_bps_burst.unwrap_or(0),
        })
    }

    /// The control request.
    pub fn request(&self) -> ControlRequest {
        ControlRequest::Limit {
            device: self.device.clone(),
            limits: self.limits(),
            group: self.group.clone(),
            leave_group: self.no_group,
            clear: self.clear,
        }
    }
}

/// A count: digits, optionally followed by k, M, G (powers of 1000) or Ki, Mi, Gi (1024).
pub fn parse_amount(s: &str) -> Result<u64, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: expected a number, optionally with k, M, G, Ki, Mi, Gi"))?;
    let unit: u64 = match suffix {
        "" => 1,
        "k" | "K" => 1000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => return Err(format!("{s:?}: unknown unit {suffix:?}")),
    };
    n.checked_mul(unit)
        .ok_or_else(|| format!("{s:?}: too large"))
}

/// Sends a `limit` request and prints the daemon's answer.
pub fn run_limit(args: &LimitArgs) -> anyhow::Result<()> {
    if args.device.is_none() && args.group.is_none() {
        anyhow::bail!("name a device, or a group with --group");
    }
    let what = match (&args.device, &args.group) {
        (Some(d), _) => d.clone(),
        (None, Some(g)) => format!("group {g}"),
        (None, None) => unreachable!("checked above"),
    };
    let request = serde_json::to_string(&args.request())?;
    let line = query_line(&args.control_socket, &request)?;
    match ControlReply::parse(&line).context("parsing the daemon's reply")? {
        ControlReply::Accepted { accepted, .. } => {
            println!("{what}: {accepted}");
            Ok(())
        }
        ControlReply::Error { error, .. } => anyhow::bail!("{what}: {error}"),
        ControlReply::Status { .. } => anyhow::bail!("unexpected reply: {}", line.trim()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_take_units() {
        assert_eq!(parse_amount("1500"), Ok(1500));
        assert_eq!(parse_amount("100M"), Ok(100_000_000));
        assert_eq!(parse_amount("4Ki"), Ok(4096));
        assert_eq!(parse_amount("2Gi"), Ok(2 << 30));
        for bad in ["", "M", "1.5M", "10x", "99999999999999999999G", "-1"] {
            assert!(parse_amount(bad).is_err(), "{bad}");
        }
    }
}
