//! The xenblkd binary: `serve`, `attach`, `detach`, `status`, `handover`, `pause`,
//! `resume`, `reopen`, `limit`, `qemu-dm`, `demo`, `bench`.
//! Each subcommand lives in its own module; this file only dispatches.

#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

mod attach;
mod bench;
mod demo;
mod device_ctl;
mod fd_limit;
mod gen_docs;
mod logging;
mod metrics;
mod metrics_server;
mod qemu_dm;
mod qmp;
mod sd_notify;
mod serve;
mod signals;
mod simstack;
mod status;
mod xenstore_cli;
mod xenstored;

// Library modules, reached as `crate::engine_glue` and `crate::simhost` by the others.
use xenblkd::{engine_glue, simhost};

#[derive(Parser)]
#[command(name = "xenblkd", version, about = "Userspace Xen PV block backend")]
struct Cli {
    /// Log level or filter, in RUST_LOG's syntax (`info`, `xenbus=debug,info`); wins over
    /// RUST_LOG and the configuration's `log_level`.
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Where logs go: `journal` is systemd's native protocol (priorities and structured
    /// fields); `auto` uses it when systemd connected stderr to the journal.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    log_target: logging::LogTarget,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The main job: daemon, in-memory xenstore and a simulated guest on a default disk; write, verify, benchmark.
    Demo(demo::DemoArgs),
    /// fio-like benchmark through the simulated stack, optionally against io_uring on the same image.
    Bench(bench::BenchArgs),
    /// Run the daemon: serve the backend devices xenstore announces.
    Serve(serve::ServeArgs),
    /// Attach a disk to a guest under xenblkd's own backend type (the toolstack's part).
    Attach(attach::AttachArgs),
    /// Detach a disk attached with `attach`.
    Detach(attach::DetachArgs),
    /// List the daemon's devices, what they negotiated and their statistics.
    Status(status::StatusArgs),
    /// Ask the daemon to hand every device over to the next one and exit (in-place upgrade).
    Handover(status::HandoverArgs),
    /// Stop taking a device's requests: answer those in flight and hold (snapshot tools).
    Pause(device_ctl::DeviceCtlArgs),
    /// Serve a paused device again.
    Resume(device_ctl::DeviceCtlArgs),
    /// While paused: reopen a device's storage from its backend nodes (after a snapshot).
    Reopen(device_ctl::DeviceCtlArgs),
    /// Show or change a device's I/O limits (IOPS, bandwidth, bursts, group) live, or a group's.
    Limit(device_ctl::LimitArgs),
    /// Device model libxl runs instead of QEMU for backendtype=qdisk disks (QEMU's argv).
    QemuDm(qemu_dm::QemuDmArgs),
    /// Open a target as `serve` would and say why it cannot be served (for hotplug scripts).
    CheckTarget(attach::CheckTargetArgs),
    /// Run the in-memory xenstored (one socket per domain) for simulations.
    Xenstored(xenstored::XenstoredArgs),
    /// Read, write, remove or list xenstore nodes (the simulator has no xenstore-utils).
    Xenstore(xenstore_cli::XenstoreArgs),
    /// Write the man pages and shell completions generated from this CLI (packaging).
    #[command(hide = true)]
    GenerateDocs(gen_docs::GenerateDocsArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // --log-level, then RUST_LOG, then (serve) the configuration's log_level; without them
    // the daemon's side (serve, the device model, the
    // toolstack commands) says what it does at info: an operator must see devices reach
    // InitWait and Connected, and warnings such as the vm.max_map_count budget. The
    // commands that print a report of their own (demo, bench, status) show warnings only,
    // so their output stays readable.
    let default_level = match cli.command {
        Command::Demo(_)
        | Command::Bench(_)
        | Command::Status(_)
        | Command::Handover(_)
        | Command::Pause(_)
        | Command::Resume(_)
        | Command::Reopen(_)
        | Command::Limit(_)
        | Command::Xenstore(_)
        | Command::CheckTarget(_)
        | Command::GenerateDocs(_) => "warn",
        Command::Serve(_)
        | Command::Attach(_)
        | Command::Detach(_)
        | Command::QemuDm(_)
        | Command::Xenstored(_) => "info",
    };
    logging::init(cli.log_level.as_deref(), cli.log_target, default_level)?;
    match cli.command {
        Command::Demo(args) => demo::run(&args)?,
        Command::Bench(args) if args.limit_iops.is_some() || args.limit_bps.is_some() => {
            let report = bench::qos::run(&args)?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                bench::qos::print_text(&report);
            }
        }
        Command::Bench(args) => {
            let report = bench::run(&args)?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                bench::print_text(&report);
            }
        }
        Command::Serve(args) => serve::run(&args)?,
        Command::Attach(args) => attach::run_attach(&args)?,
        Command::Detach(args) => attach::run_detach(&args)?,
        Command::CheckTarget(args) => {
            attach::check_target(&args.params, !args.read_only, args.direct_io_safe)?
        }
        Command::Status(args) => status::run(&args)?,
        Command::Handover(args) => status::run_handover(&args)?,
        Command::Pause(args) => device_ctl::run(device_ctl::Op::Pause, &args)?,
        Command::Resume(args) => device_ctl::run(device_ctl::Op::Resume, &args)?,
        Command::Reopen(args) => device_ctl::run(device_ctl::Op::Reopen, &args)?,
        Command::Limit(args) => device_ctl::run_limit(&args)?,
        Command::QemuDm(args) => qemu_dm::run(&args)?,
        Command::Xenstored(args) => xenstored::run(&args)?,
        Command::Xenstore(args) => xenstore_cli::run(&args)?,
        Command::GenerateDocs(args) => gen_docs::run(&args)?,
    }
    Ok(())
}
