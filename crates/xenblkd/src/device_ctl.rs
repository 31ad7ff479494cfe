//! `xenblkd pause|resume|reopen <device>`: one device request on the daemon's control
//! socket, as tapdisk's `tap-ctl pause/unpause` (see ARCHITECTURE.md, "Pause, resume and
//! reopen").

use std::path::PathBuf;

use anyhow::Context;
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
