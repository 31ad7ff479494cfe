//! The xenblkd binary: `serve`, `attach`, `detach`, `status`, `qemu-dm`, `demo`, `bench`.
//! Each subcommand lives in its own module; this file only dispatches.

#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};

mod attach;
mod bench;
mod demo;
mod engine_glue;
mod qemu_dm;
mod qmp;
mod serve;
mod signals;
mod simstack;
mod status;
mod xenstore_cli;
mod xenstored;

#[derive(Parser)]
#[command(name = "xenblkd", version, about = "Userspace Xen PV block backend")]
struct Cli {
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
    /// Device model libxl runs instead of QEMU for backendtype=qdisk disks (QEMU's argv).
    QemuDm(qemu_dm::QemuDmArgs),
    /// Open a target as `serve` would and say why it cannot be served (for hotplug scripts).
    CheckTarget(attach::CheckTargetArgs),
    /// Run the in-memory xenstored (one socket per domain) for simulations.
    Xenstored(xenstored::XenstoredArgs),
    /// Read, write, remove or list xenstore nodes (the simulator has no xenstore-utils).
    Xenstore(xenstore_cli::XenstoreArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // RUST_LOG overrides; without it the daemon's side (serve, the device model, the
    // toolstack commands) says what it does at info: an operator must see devices reach
    // InitWait and Connected, and warnings such as the vm.max_map_count budget. The
    // commands that print a report of their own (demo, bench, status) show warnings only,
    // so their output stays readable.
    let default_level = match cli.command {
        Command::Demo(_)
        | Command::Bench(_)
        | Command::Status(_)
        | Command::Xenstore(_)
        | Command::CheckTarget(_) => "warn",
        Command::Serve(_)
        | Command::Attach(_)
        | Command::Detach(_)
        | Command::QemuDm(_)
        | Command::Xenstored(_) => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only for a person at a terminal: logs usually go to files (the
        // lab's, libxl's qemu-dm-<guest>.log), where they break grep.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Demo(args) => demo::run(&args)?,
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
        Command::QemuDm(args) => qemu_dm::run(&args)?,
        Command::Xenstored(args) => xenstored::run(&args)?,
        Command::Xenstore(args) => xenstore_cli::run(&args)?,
    }
    Ok(())
}
