//! fio-like benchmark: the same workload through a `StorageQueue` and through a bare
//! io_uring loop (`storage::baseline::run`), side by side.
//!
//! ```text
//! cargo run --release -p storage --example uring_baseline -- \
//!     --file /var/tmp/xenblkd-bench.img --size 1G --rw randread --bs 4k --iodepth 32 \
//!     --runtime 10 --mode both
//! ```
//! `--mode` is `baseline`, `queue`, `both` (default) or `null` (the queue path on the null
//! backend: the storage layer's own cost with no I/O). The file is created and filled
//! (non-sparse) up to `--size` if it is smaller.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use storage::baseline::{self, BaselineConfig, BaselineResult, Workload};
use storage::{DirectIo, NullConfig, NullStorage, OpenOptions, Storage};

struct Args {
    file: PathBuf,
    size: u64,
    workload: Workload,
    bs: u32,
    iodepth: u32,
    runtime: Duration,
    mode: String,
    direct: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult = match c.to_ascii_lowercase() {
                'k' => 1u64 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                't' => 1 << 40,
                _ => return Err(format!("bad size suffix in {s:?}")),
            };
            (&s[..i], mult)
        }
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|e| format!("bad size {s:?}: {e}"))
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        file: PathBuf::from("/var/tmp/xenblkd-bench.img"),
        size: 1 << 30,
        workload: Workload::RandRead,
        bs: 4096,
        iodepth: 32,
        runtime: Duration::from_secs(10),
        mode: "both".into(),
        direct: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--file" => a.file = PathBuf::from(val()?),
            "--size" => a.size = parse_size(&val()?)?,
            "--rw" => a.workload = val()?.parse()?,
            "--bs" => {
                a.bs = u32::try_from(parse_size(&val()?)?).map_err(|e| e.to_string())?;
            }
            "--iodepth" => a.iodepth = val()?.parse().map_err(|e| format!("--iodepth: {e}"))?,
            "--runtime" => {
                let secs: f64 = val()?.parse().map_err(|e| format!("--runtime: {e}"))?;
                a.runtime = Duration::from_secs_f64(secs);
            }
            "--mode" => a.mode = val()?,
            "--direct" => a.direct = val()? != "0",
            "-h" | "--help" => {
                return Err("usage: uring_baseline [--file PATH] [--size 1G] [--rw randread|read|randwrite|write] \
                     [--bs 4k] [--iodepth 32] [--runtime SECS] [--mode both|baseline|queue|null] [--direct 1|0]"
                    .into())
            }
            _ => return Err(format!("unknown argument {flag:?} (try --help)")),
        }
    }
    Ok(a)
}

fn report(label: &str, args: &Args, r: &BaselineResult) {
    println!(
        "{label:<9} {} bs={} qd={}: {r}",
        args.workload, args.bs, args.iodepth
    );
}

fn run(args: &Args) -> Result<(), String> {
    let mut cfg = BaselineConfig::new(&args.file, args.workload, args.bs, args.iodepth);
    cfg.runtime = args.runtime;
    cfg.direct = args.direct;
    cfg.region_bytes = Some(args.size);

    if args.mode == "null" {
        let s = NullStorage::new(NullConfig {
            size_bytes: args.size,
            ..NullConfig::default()
        })
        .map_err(|e| e.to_string())?;
        let mut q = s.open_queue(args.iodepth).map_err(|e| e.to_string())?;
        let r =
            baseline::run_queue(&mut *q, s.info().size_bytes, &cfg).map_err(|e| e.to_string())?;
        report("null", args, &r);
        return Ok(());
    }

    baseline::prepare_file(&args.file, args.size).map_err(|e| format!("prepare: {e}"))?;
    if matches!(args.mode.as_str(), "baseline" | "both") {
        let r = baseline::run(&cfg).map_err(|e| format!("baseline: {e}"))?;
        report("baseline", args, &r);
    }
    if matches!(args.mode.as_str(), "queue" | "both") {
        let s = storage::open(
            &args.file,
            OpenOptions {
                direct_io: if args.direct {
                    DirectIo::On
                } else {
                    DirectIo::Off
                },
                read_only: !args.workload.is_write(),
                ..OpenOptions::default()
            },
        )
        .map_err(|e| e.to_string())?;
        let mut q = s.open_queue(args.iodepth).map_err(|e| e.to_string())?;
        let r = baseline::run_queue(&mut *q, s.info().size_bytes, &cfg)
            .map_err(|e| format!("queue: {e}"))?;
        report("queue", args, &r);
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
