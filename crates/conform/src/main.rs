//! `blkif-conform`: runs the catalogue against xenblkd on the simulator (default) or,
//! inside a domU, against whatever backend serves one of its vbds.

#![forbid(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use conform::sim::{SimOptions, SimTarget};
use conform::xen::XenTarget;
use conform::Target;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TargetKind {
    /// xenblkd on the simulator, in this process.
    Sim,
    /// Real Xen, from inside a domU.
    Xen,
}

#[derive(Debug, Parser)]
#[command(
    name = "blkif-conform",
    version,
    about = "Conformance and hostile-frontend suite for Xen PV block backends"
)]
struct Args {
    /// Where the backend under test runs.
    #[arg(long, value_enum, default_value = "sim")]
    target: TargetKind,
    /// Only cases whose name contains one of these comma-separated patterns (`*` globs).
    #[arg(long)]
    filter: Option<String>,
    /// One JSON document on stdout instead of text lines (the case lines go to stderr,
    /// as progress).
    #[arg(long)]
    json: bool,
    /// List the cases and their sources; run nothing.
    #[arg(long)]
    list: bool,
    /// xen: the vbd (`device/vbd/<id>`) to use.
    #[arg(long, default_value_t = 51712)]
    vbd: u32,
    /// xen: a vbd attached read-only, for the read-only cases.
    #[arg(long)]
    ro_vbd: Option<u32>,
    /// xen: the backend's name in the report (blkback, qdisk, xenblkd).
    #[arg(long, default_value = "backend")]
    label: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cases = conform::catalogue();
    if args.list {
        for c in cases
            .iter()
            .filter(|c| conform::runner::matches(args.filter.as_deref(), &c.name))
        {
            println!("{}\t{}", c.name, c.source);
        }
        return ExitCode::SUCCESS;
    }
    let mut target: Box<dyn Target> = match args.target {
        TargetKind::Sim => match SimTarget::start(SimOptions::default()) {
            Ok(t) => Box::new(t),
            Err(e) => {
                eprintln!("blkif-conform: {e:#}");
                return ExitCode::from(2);
            }
        },
        TargetKind::Xen => match XenTarget::open(args.vbd, args.ro_vbd, &args.label) {
            Ok(t) => Box::new(t),
            Err(e) => {
                eprintln!("blkif-conform: {e:#}");
                return ExitCode::from(2);
            }
        },
    };
    let json = args.json;
    let summary = conform::run(target.as_mut(), &cases, args.filter.as_deref(), |r| {
        if json {
            // Progress for a watcher (the lab streams it from the guest's console); the
            // document itself comes at the end, on stdout.
            eprintln!("{}", r.line());
        } else {
            println!("{}", r.line());
            let _ = std::io::stdout().flush();
        }
    });
    if json {
        match serde_json::to_string_pretty(&summary) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("blkif-conform: {e}"),
        }
    } else {
        println!("{}", summary.line());
    }
    if summary.failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
