//! `xenblkd bench`: a fio-like load generator driving the real engine through a
//! simulated xen-blkfront, with an optional baseline on the same image in the same run —
//! the built-in io_uring loop, or Debian's fio with the same pattern — so every figure is
//! a ratio against what the storage does on its own.
//!
//! One driver thread per queue keeps `iodepth` requests in flight on its ring. Latency
//! is submit-to-completion as the guest sees it, in an HDR histogram. Backend CPU time is
//! the on-CPU time of the engine's reactor threads (from /proc schedstat), divided by the
//! completed I/Os. The reactors' own counters (sleeps, wake-ups, adaptive polls) are
//! reported per I/O: wake-ups per I/O is the event loop's cost independent of how loaded
//! the machine is.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use backend::GrantMode;
use blkfront::{FrontendConfig, QueuePolicy};
use hdrhistogram::Histogram;
use serde::Serialize;
use storage::baseline::{BaselineConfig, Workload};
use storage::{DirectIo, NullConfig, NullStorage, OpenOptions, Storage};

use crate::simstack::{SimStack, StackOptions};

mod measure;
pub mod qos;
mod report;

pub use measure::measure_frontend;
use measure::{baseline_figures, latency_of, reactor_cpu_ns, FioJob};
pub use report::{print_text, BenchReport};
use report::{BackendCounters, BaselineFigures, Negotiated, ReactorFigures, Round};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rw {
    Read,
    Write,
    Randread,
    Randwrite,
    Randrw,
}

impl Rw {
    fn random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite | Rw::Randrw)
    }

    fn baseline_workload(self) -> Option<Workload> {
        match self {
            Rw::Read => Some(Workload::SeqRead),
            Rw::Write => Some(Workload::SeqWrite),
            Rw::Randread => Some(Workload::RandRead),
            Rw::Randwrite => Some(Workload::RandWrite),
            Rw::Randrw => None,
        }
    }
}

/// What `--baseline` runs on the same image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BaselineArg {
    /// The built-in io_uring loop (storage::baseline): no dependency, same process.
    Uring,
    /// Debian's `fio` (`--ioengine=io_uring`), the comparison users make: one job per
    /// queue with the same pattern, block size, depth, region, O_DIRECT and runtime.
    Fio,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantModeArg {
    Map,
    Copy,
    Auto,
}

impl From<GrantModeArg> for GrantMode {
    fn from(m: GrantModeArg) -> Self {
        match m {
            GrantModeArg::Map => GrantMode::Map,
            GrantModeArg::Copy => GrantMode::Copy,
            GrantModeArg::Auto => GrantMode::Auto,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnOff {
    On,
    Off,
}

impl OnOff {
    fn on(self) -> bool {
        self == OnOff::On
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageArg {
    /// The image (or block device) on io_uring.
    File,
    /// No I/O at all: the protocol's own cost.
    Null,
}

/// The format of an `--image` given to `demo` or `bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormatArg {
    /// qcow2 if the file starts with the qcow2 magic, else raw (the operator's own file:
    /// the daemon itself never probes, it takes the format from `params`).
    Auto,
    Raw,
    Qcow2,
}

/// An NBD URI or an `rbd:` target: network storage, never probed for a format.
fn is_network_target(s: &str) -> bool {
    storage::nbd::is_nbd_uri(s) || storage::rbd::is_rbd_target(s)
}

impl ImageFormatArg {
    /// Resolves `auto` by looking at the file.
    pub fn resolve(self, image: &Path) -> anyhow::Result<ImageFormatArg> {
        Ok(match self {
            ImageFormatArg::Auto => {
                if storage::qcow2::is_qcow2(image)
                    .with_context(|| format!("reading {}", image.display()))?
                {
                    ImageFormatArg::Qcow2
                } else {
                    ImageFormatArg::Raw
                }
            }
            other => other,
        })
    }
}

/// `xenblkd bench` options.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// I/O pattern.
    #[arg(long, value_enum, default_value = "randread")]
    pub rw: Rw,
    /// Bytes per I/O (k, M suffixes).
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    pub bs: u64,
    /// Requests in flight per queue.
    #[arg(long, default_value_t = 32)]
    pub iodepth: u32,
    /// Rings (one driver thread each).
    #[arg(long, default_value_t = 1)]
    pub queues: u32,
    /// Seconds to run each phase.
    #[arg(long, default_value_t = 10.0)]
    pub runtime: f64,
    /// Size of the region I/O goes to (and of the default image).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub size: u64,
    /// Image, block device, NBD export (`nbd://host[:port]/export`,
    /// `nbd+unix:///export?socket=PATH`) or Ceph RBD image (`rbd:pool/image[:conf=PATH]`);
    /// default: a prepared file under /var/tmp/xenblkd.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Format of `--image`.
    #[arg(long, value_enum, default_value = "auto")]
    pub format: ImageFormatArg,
    #[arg(long, value_enum, default_value = "auto")]
    pub grant_mode: GrantModeArg,
    #[arg(long, value_enum, default_value = "on")]
    pub persistent: OnOff,
    #[arg(long, value_enum, default_value = "file")]
    pub storage: StorageArg,
    /// O_DIRECT on the image (and in the baseline).
    #[arg(long, value_enum, default_value = "on")]
    pub direct: OnOff,
    /// Ring page order (0..4) both sides allow.
    #[arg(long, default_value_t = 4)]
    pub ring_order: u32,
    /// `feature-max-indirect-segments` the backend advertises (the frontend uses up to it).
    #[arg(long, default_value_t = 256)]
    pub indirect: u32,
    /// Reactor threads.
    #[arg(long, default_value_t = 1)]
    pub reactors: usize,
    /// The guest copies data like a real one (read data out of, write data into the
    /// granted pages). Off: reads leave their data in the pages and writes send what the
    /// pages hold, so the figures are the backend's and not the simulated guest's memcpy.
    #[arg(long, value_enum, default_value = "off")]
    pub guest_copy: OnOff,
    /// Persistent grants kept per ring; 0: what the ring can have in flight (the
    /// daemon's default), 1056: Linux blkback's `max_persistent_grants`.
    #[arg(long, default_value_t = 0)]
    pub max_persistent_grants: usize,
    /// Cap of the engine's adaptive polling after a batch (`VbdLimits::poll`),
    /// microseconds; 0: never poll.
    #[arg(long, default_value_t = backend::vbd::DEFAULT_POLL.as_micros() as u64)]
    pub poll_us: u64,
    /// The simulated guest polls its ring this long before it sleeps, microseconds.
    #[arg(long, default_value_t = 0)]
    pub guest_poll_us: u64,
    /// Also run a baseline on the same image and print the ratio: `uring` (the default
    /// when no value is given) is the built-in io_uring loop, `fio` runs Debian's fio
    /// with the same pattern (it must be installed: `apt-get install fio`).
    #[arg(long, value_enum, num_args = 0..=1, default_missing_value = "uring")]
    pub baseline: Option<BaselineArg>,
    /// Alternate xenblkd and baseline phases this many times (each `--runtime` long,
    /// xenblkd first in odd rounds, the baseline first in even ones) and report the
    /// median ratio: the disk and a shared machine drift by more than the difference
    /// measured, and alternating exposes both sides to the same drift.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// QoS run: limit the benchmarked VBD to this many requests per second (see
    /// `--neighbour`); reports its rate against the limit.
    #[arg(long, value_name = "IOPS")]
    pub limit_iops: Option<u64>,
    /// QoS run: limit the benchmarked VBD to this many bytes per second.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub limit_bps: Option<u64>,
    /// QoS run: an unlimited second guest on the same engine (one reactor by default),
    /// measured alone and then beside the limited one.
    #[arg(long)]
    pub neighbour: bool,
    /// Run everything — reactors, the simulated guest and the baseline (fio or the
    /// built-in loop) — on these CPUs only, as `taskset -c` would (e.g. `1` or `0,1`), so
    /// that xenblkd and its baseline are compared on the same CPUs. Default: unpinned.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub cpus: Vec<usize>,
}

impl Default for BenchArgs {
    fn default() -> Self {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: BenchArgs,
        }
        Wrapper::parse_from(["bench"]).args
    }
}

pub use storage::null::parse_size;

/// Restricts this thread, and so every thread and process it starts later, to `cpus`
/// (nothing if empty).
fn pin_to(cpus: &[usize]) -> anyhow::Result<()> {
    if cpus.is_empty() {
        return Ok(());
    }
    let mut set = rustix::thread::CpuSet::new();
    for &cpu in cpus {
        if cpu >= rustix::thread::CpuSet::MAX_CPU {
            bail!("--cpus: CPU {cpu} is out of range");
        }
        set.set(cpu);
    }
    rustix::thread::sched_setaffinity(None, &set)
        .with_context(|| format!("--cpus {cpus:?}: cannot run on these CPUs"))?;
    Ok(())
}

const MIB: f64 = (1u64 << 20) as f64;

/// The default bench image, created and filled once (sparse files read as holes would
/// not touch the disk), reused by later runs.
pub fn default_image(size: u64) -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from("/var/tmp/xenblkd");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("bench-{size}.img"));
    storage::baseline::prepare_file(&path, size)
        .with_context(|| format!("preparing {}", path.display()))?;
    Ok(path)
}

/// The opened storage, and the qcow2 backend behind it when it is one (for its counters).
type Opened = (Arc<dyn Storage>, Option<Arc<storage::Qcow2Storage>>);

fn open_storage(
    args: &BenchArgs,
    image: Option<&Path>,
    format: ImageFormatArg,
) -> anyhow::Result<Opened> {
    let options = OpenOptions {
        read_only: false,
        direct_io: if args.direct.on() {
            DirectIo::Auto
        } else {
            DirectIo::Off
        },
        exclusive: false,
    };
    if let (StorageArg::File, Some(path), ImageFormatArg::Qcow2) = (args.storage, image, format) {
        let q = Arc::new(
            storage::Qcow2Storage::open(path, options)
                .with_context(|| format!("opening {}", path.display()))?,
        );
        return Ok((q.clone(), Some(q)));
    }
    let storage: Arc<dyn Storage> = match (args.storage, image) {
        (StorageArg::Null, _) => Arc::new(
            NullStorage::new(NullConfig {
                size_bytes: args.size,
                logical_block_size: 512,
                read_only: false,
                read_zeroes: false,
            })
            .context("null storage")?,
        ),
        (StorageArg::File, Some(uri)) if uri.to_str().is_some_and(storage::nbd::is_nbd_uri) => {
            let uri = uri.to_str().unwrap_or_default();
            Arc::new(
                storage::NbdStorage::open(uri, storage::NbdConfig::default())
                    .with_context(|| format!("opening {uri}"))?,
            )
        }
        (StorageArg::File, Some(target))
            if target.to_str().is_some_and(storage::rbd::is_rbd_target) =>
        {
            let target = target.to_str().unwrap_or_default();
            let storage = storage::RbdStorage::open(target, storage::RbdConfig::default())
                .with_context(|| "opening the RBD image".to_string())?;
            Arc::new(storage)
        }
        (StorageArg::File, Some(path)) => {
            storage::open(path, options).with_context(|| format!("opening {}", path.display()))?
        }
        (StorageArg::File, None) => bail!("file storage needs an image"),
    };
    Ok((storage, None))
}

/// Runs the benchmark and returns its report.
pub fn run(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    check_args(args)?;
    pin_to(&args.cpus)?;
    let image = match (args.storage, &args.image) {
        (StorageArg::Null, _) => None,
        (StorageArg::File, Some(p)) => Some(p.clone()),
        (StorageArg::File, None) => Some(default_image(args.size)?),
    };
    let format = match &image {
        Some(p) if !p.to_str().is_some_and(is_network_target) => args.format.resolve(p)?,
        _ => ImageFormatArg::Raw,
    };
    if format == ImageFormatArg::Qcow2 && args.baseline.is_some() {
        bail!("--baseline runs io_uring straight on the file, which for a qcow2 image is not the guest's disk; compare with `qemu-img bench` (scripts/bench-qcow2)");
    }
    let (storage, qcow2) = open_storage(args, image.as_deref(), format)?;
    let info = storage.info();
    let size = args.size.min(info.size_bytes);

    let stack = SimStack::connect(storage, &stack_options(args))?;
    let negotiated = negotiated_of(&stack);
    if stack.frontend.max_request_bytes() < args.bs as usize {
        bail!(
            "--bs {} exceeds the largest request ({} bytes) with the negotiated segments",
            args.bs,
            stack.frontend.max_request_bytes()
        );
    }

    let baseline_cfg = baseline_config(args, image.as_deref(), info.direct_io, size)?;
    let rounds = run_rounds(&stack, args, size, baseline_cfg.as_ref())?;
    let vbd_stats = stack.vbd().stats().total;
    stack
        .teardown()
        .context("tearing the simulated stack down")?;
    if let Some(e) = rounds.failure {
        return Err(e);
    }
    let Rounds {
        rounds,
        baselines,
        hist,
        ios,
        errors,
        bytes,
        elapsed,
        backend_cpu,
        reactor,
        ..
    } = rounds;
    let secs = elapsed.as_secs_f64();
    let mut report = BenchReport {
        rw: args.rw,
        bs: args.bs,
        iodepth: args.iodepth,
        queues: args.queues,
        storage: args.storage,
        image: image.as_ref().map(|p| p.display().to_string()),
        format: image.as_ref().map(|_| {
            if format == ImageFormatArg::Qcow2 {
                "qcow2".to_string()
            } else {
                "raw".to_string()
            }
        }),
        qcow2_mapped_requests: qcow2.as_ref().map(|q| q.request_paths().0),
        qcow2_worker_requests: qcow2.as_ref().map(|q| q.request_paths().1),
        direct: info.direct_io,
        runtime_s: secs,
        ios,
        errors,
        iops: ios as f64 / secs,
        bw_mib_s: bytes as f64 / MIB / secs,
        lat_us: latency_of(&hist),
        backend_cpu_us_per_io: backend_cpu as f64 / 1000.0 / ios.max(1) as f64,
        backend_cpu_util: backend_cpu as f64 / 1e9 / secs,
        reactor: ReactorFigures::of(&reactor, ios),
        negotiated,
        backend_stats: BackendCounters {
            rd_req: vbd_stats.rd_req,
            wr_req: vbd_stats.wr_req,
            oo_req: vbd_stats.oo_req,
            errors: vbd_stats.errors,
            notifications: vbd_stats.notifications,
            persistent_grants_mapped: vbd_stats.persistent_grants_mapped,
            persistent_hits: vbd_stats.persistent_hits,
            persistent_misses: vbd_stats.persistent_misses,
            indirect_page_hits: vbd_stats.indirect_page_hits,
            indirect_page_misses: vbd_stats.indirect_page_misses,
        },
        baseline: None,
        baseline_kind: args.baseline,
        ratio_iops: None,
        ratio_bw: None,
        rounds: Vec::new(),
    };
    if !baselines.is_empty() {
        set_median_ratio(&mut report, &rounds, baselines);
    }
    if rounds.len() > 1 {
        report.rounds = rounds;
    }
    if errors > 0 {
        bail!("{errors} I/Os failed during the benchmark");
    }
    Ok(report)
}

fn check_args(args: &BenchArgs) -> anyhow::Result<()> {
    if args.bs == 0 || !args.bs.is_multiple_of(512) {
        bail!("--bs must be a non-zero multiple of 512");
    }
    if args.iodepth == 0 || args.queues == 0 {
        bail!("--iodepth and --queues must be at least 1");
    }
    if args.size < args.bs * args.queues as u64 {
        bail!("--size is smaller than one block per queue");
    }
    Ok(())
}

/// The simulated stack the arguments ask for.
fn stack_options(args: &BenchArgs) -> StackOptions {
    let max_request_pages = args.bs.div_ceil(4096) as u32 + 1;
    let frontend = FrontendConfig {
        max_queues: args.queues,
        max_ring_order: args.ring_order,
        persistent: args.persistent.on(),
        max_indirect_segments: args.indirect.max(max_request_pages.min(4096)),
        queue_policy: QueuePolicy::PerThread,
        io_timeout: Duration::from_secs(30),
        ..FrontendConfig::default()
    };
    // Enough guest memory for every in-flight request's pages plus rings and pools.
    let guest_pages = (args.queues * args.iodepth * (max_request_pages + 2) + 4096).max(16384);
    StackOptions {
        frontend,
        backend_queues: args.queues,
        backend_ring_order: args.ring_order,
        backend_persistent: true,
        backend_indirect: args.indirect,
        grant_mode: args.grant_mode.into(),
        reactors: args.reactors,
        guest_pages,
        poll: Duration::from_micros(args.poll_us),
        max_persistent_grants: args.max_persistent_grants,
    }
}

fn negotiated_of(stack: &SimStack) -> Negotiated {
    let n = stack.frontend.negotiated();
    Negotiated {
        protocol: format!("{:?}", n.protocol),
        queues: n.queues,
        ring_order: n.ring_order,
        persistent: n.persistent,
        indirect_segments: n.max_indirect_segments,
        grant_mode: format!("{:?}", stack.vbd().grant_mode()),
        flush: format!("{:?}", n.cache),
        discard: n.discard.is_some(),
    }
}

/// A baseline phase, as `--baseline` asked for it.
pub(crate) enum Baseline {
    Uring(BaselineConfig),
    Fio(FioJob),
}

/// The baseline on the same image, when `--baseline` asks for one.
fn baseline_config(
    args: &BenchArgs,
    image: Option<&Path>,
    direct: bool,
    size: u64,
) -> anyhow::Result<Option<Baseline>> {
    let Some(kind) = args.baseline else {
        return Ok(None);
    };
    if image
        .and_then(|p| p.to_str())
        .is_some_and(is_network_target)
    {
        bail!("--baseline runs on a file; for NBD the baseline is fio --ioengine=nbd (scripts/bench-nbd), for RBD fio --ioengine=rbd (scripts/bench-rbd)");
    }
    let path = image.context("--baseline needs file storage (the same image, without xenblkd)")?;
    if kind == BaselineArg::Fio {
        return Ok(Some(Baseline::Fio(FioJob::new(args, path, direct, size)?)));
    }
    let workload = args
        .rw
        .baseline_workload()
        .context("the io_uring baseline has no mixed read/write pattern (--baseline fio has)")?;
    let mut cfg = BaselineConfig::new(path, workload, args.bs as u32, args.iodepth * args.queues);
    cfg.runtime = Duration::from_secs_f64(args.runtime);
    cfg.direct = direct;
    cfg.region_bytes = Some(size);
    cfg.seed = args.seed;
    Ok(Some(Baseline::Uring(cfg)))
}

/// What the rounds measured, summed over the rounds run.
struct Rounds {
    rounds: Vec<Round>,
    baselines: Vec<BaselineFigures>,
    hist: Histogram<u64>,
    ios: u64,
    errors: u64,
    bytes: u64,
    elapsed: Duration,
    backend_cpu: u64,
    /// The reactors' event-loop counts during the xenblkd phases.
    reactor: backend::ReactorStats,
    /// The frontend failed: the rounds stopped there, and the stack is still to be torn
    /// down before the error is returned.
    failure: Option<anyhow::Error>,
}

/// Runs `args.rounds` rounds of the engine, each with its baseline phase when there is one.
fn run_rounds(
    stack: &SimStack,
    args: &BenchArgs,
    size: u64,
    baseline_cfg: Option<&Baseline>,
) -> anyhow::Result<Rounds> {
    let mut rounds = Vec::new();
    let mut baselines = Vec::new();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
    let (mut ios, mut errors, mut bytes) = (0u64, 0u64, 0u64);
    let mut elapsed = Duration::ZERO;
    let mut backend_cpu = 0u64;
    let mut reactor = backend::ReactorStats::default();
    let mut failure = None;
    for r in 0..args.rounds.max(1) {
        // Odd rounds run the baseline first: whichever side goes second finds the
        // host's caches warmer (a virtual disk's host page cache serves re-reads and
        // absorbs writes), so a fixed order would bias every round the same way.
        let baseline_first = match baseline_cfg {
            Some(cfg) if r % 2 == 1 => Some(baseline_figures(cfg)?),
            _ => None,
        };
        let cpu0 = reactor_cpu_ns();
        let loop0 = stack.reactor_stats();
        let stop = AtomicBool::new(false);
        let measured = measure_frontend(&stack.frontend, args, size, &stop);
        backend_cpu += reactor_cpu_ns().saturating_sub(cpu0);
        reactor += stack.reactor_stats().since(&loop0);
        let m = match measured {
            Ok(m) => m,
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        ios += m.ios;
        errors += m.errors;
        bytes += m.bytes;
        elapsed += m.elapsed;
        hist.add(&m.hist).context("merging latency histograms")?;
        let mut round = Round {
            iops: m.iops,
            bw_mib_s: m.bw_mib_s,
            baseline_iops: None,
            baseline_bw_mib_s: None,
            ratio_bw: None,
        };
        if let Some(cfg) = baseline_cfg {
            // The engine idles meanwhile: its ring stays connected, nothing is in flight.
            let b = match baseline_first {
                Some(b) => b,
                None => baseline_figures(cfg)?,
            };
            round.baseline_iops = Some(b.iops);
            round.baseline_bw_mib_s = Some(b.bw_mib_s);
            round.ratio_bw = Some(m.bw_mib_s / b.bw_mib_s.max(f64::MIN_POSITIVE));
            baselines.push(b);
        }
        rounds.push(round);
    }
    Ok(Rounds {
        rounds,
        baselines,
        hist,
        ios,
        errors,
        bytes,
        elapsed,
        backend_cpu,
        reactor,
        failure,
    })
}

/// Reports the median of the rounds' ratios (of the middle two for an even count) and
/// the baseline of the (lower) median round. With one round, simply the ratio of the run.
fn set_median_ratio(
    report: &mut BenchReport,
    rounds: &[Round],
    mut baselines: Vec<BaselineFigures>,
) {
    let ratio_of = |i: usize| rounds[i].ratio_bw.unwrap_or(0.0);
    let mut order: Vec<usize> = (0..rounds.len()).collect();
    order.sort_by(|&a, &b| ratio_of(a).total_cmp(&ratio_of(b)));
    let n = order.len();
    let mid = order[(n - 1) / 2];
    let ratio = if n.is_multiple_of(2) {
        (ratio_of(order[n / 2 - 1]) + ratio_of(order[n / 2])) / 2.0
    } else {
        ratio_of(mid)
    };
    report.ratio_bw = Some(ratio);
    // Same size per I/O on both sides: the IOPS ratio is the bandwidth ratio.
    report.ratio_iops = Some(ratio);
    report.baseline = Some(baselines.swap_remove(mid));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert!(parse_size("12q").is_err());
        assert!(parse_size("99999999999999999999").is_err());
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let a = BenchArgs::default();
        assert_eq!(a.rw, Rw::Randread);
        assert_eq!(a.bs, 4096);
        assert_eq!(a.iodepth, 32);
        assert_eq!(a.queues, 1);
    }
}
