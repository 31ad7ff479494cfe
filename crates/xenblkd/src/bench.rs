//! `xenblkd bench`: a fio-like load generator driving the real engine through a
//! simulated xen-blkfront, with an optional io_uring baseline on the same image in the
//! same run, so every figure is a ratio against what the storage does on its own.
//!
//! One driver thread per queue keeps `iodepth` requests in flight on its ring. Latency
//! is submit-to-completion as the guest sees it, in an HDR histogram. Backend CPU time is
//! the on-CPU time of the engine's reactor threads (from /proc schedstat), divided by the
//! completed I/Os.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use backend::GrantMode;
use blkfront::{FrontendConfig, QueuePolicy, ReadData};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use storage::baseline::{BaselineConfig, Workload};
use storage::{DirectIo, NullConfig, NullStorage, OpenOptions, Storage};

use crate::simstack::{SimStack, StackOptions};

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
    /// The engine's ring polling after a batch (`VbdLimits::poll`), microseconds.
    #[arg(long, default_value_t = 0)]
    pub poll_us: u64,
    /// The simulated guest polls its ring this long before it sleeps, microseconds.
    #[arg(long, default_value_t = 0)]
    pub guest_poll_us: u64,
    /// Also run io_uring straight on the same image and print the ratio.
    #[arg(long)]
    pub baseline: bool,
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

/// Parses `4096`, `4k`, `1M`, `1G` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (s, 1u64),
        Some((i, _)) => {
            let mult = match s[i..].to_ascii_lowercase().trim_end_matches(['b', 'i']) {
                "k" => 1 << 10,
                "m" => 1 << 20,
                "g" => 1 << 30,
                "t" => 1 << 40,
                "" => 1,
                other => return Err(format!("unknown size suffix {other:?}")),
            };
            (&s[..i], mult)
        }
    };
    let n: u64 = digits.parse().map_err(|e| format!("{s:?}: {e}"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} overflows"))
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    #[serde(rename = "p99.9")]
    pub p999: f64,
    pub mean: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BaselineFigures {
    pub iops: f64,
    pub bw_mib_s: f64,
    pub lat_us: Latency,
    pub cpu_us_per_io: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Negotiated {
    pub protocol: String,
    pub queues: u32,
    pub ring_order: u32,
    pub persistent: bool,
    pub indirect_segments: u32,
    pub grant_mode: String,
    pub flush: String,
    pub discard: bool,
}

/// What one bench run measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub rw: Rw,
    pub bs: u64,
    pub iodepth: u32,
    pub queues: u32,
    pub storage: StorageArg,
    pub image: Option<String>,
    /// `raw` or `qcow2` for file storage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// For qcow2: requests served on the reactor's io_uring and by the worker thread.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qcow2_mapped_requests: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qcow2_worker_requests: Option<u64>,
    pub direct: bool,
    pub runtime_s: f64,
    pub ios: u64,
    pub errors: u64,
    pub iops: f64,
    pub bw_mib_s: f64,
    pub lat_us: Latency,
    /// On-CPU time of the reactor threads per completed I/O.
    pub backend_cpu_us_per_io: f64,
    /// Fraction of one core the reactors used.
    pub backend_cpu_util: f64,
    pub negotiated: Negotiated,
    pub backend_stats: BackendCounters,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<BaselineFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_iops: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_bw: Option<f64>,
    /// Each round of xenblkd then baseline (`--rounds`); the ratios above are their
    /// medians, the xenblkd figures the totals, the baseline's those of the median round.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rounds: Vec<Round>,
}

/// One round: a xenblkd phase and, with `--baseline`, the io_uring phase right after it.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub iops: f64,
    pub bw_mib_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_iops: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_bw_mib_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio_bw: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackendCounters {
    pub rd_req: u64,
    pub wr_req: u64,
    pub oo_req: u64,
    pub errors: u64,
    pub notifications: u64,
    pub persistent_grants_mapped: u64,
    pub persistent_hits: u64,
    pub persistent_misses: u64,
    pub indirect_page_hits: u64,
    pub indirect_page_misses: u64,
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

/// On-CPU nanoseconds of this process's engine reactor threads.
fn reactor_cpu_ns() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .map(|c| c.starts_with("xenblkd-reactor"))
                .unwrap_or(false)
        })
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn latency_of(h: &Histogram<u64>) -> Latency {
    let us = |ns: u64| ns as f64 / 1000.0;
    Latency {
        p50: us(h.value_at_quantile(0.50)),
        p90: us(h.value_at_quantile(0.90)),
        p99: us(h.value_at_quantile(0.99)),
        p999: us(h.value_at_quantile(0.999)),
        mean: h.mean() / 1000.0,
        max: us(h.max()),
    }
}

struct QueueResult {
    ios: u64,
    errors: u64,
    bytes: u64,
    hist: Histogram<u64>,
}

/// Keeps `iodepth` requests in flight on one queue until `stop`, then drains.
fn drive_queue(
    fe: &blkfront::Frontend,
    queue: usize,
    args: &BenchArgs,
    region: (u64, u64),
    stop: &AtomicBool,
) -> anyhow::Result<QueueResult> {
    let bs = args.bs;
    let blocks = ((region.1 - region.0) / bs).max(1);
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed ^ (queue as u64) << 32);
    let data: Vec<u8> = (0..bs).map(|i| (i as u8) ^ 0x5a).collect();
    let guest_copy = args.guest_copy.on();
    let mut next_seq = 0u64;
    let mut started = vec![Instant::now(); args.iodepth as usize];
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
    let mut out = Vec::with_capacity(args.iodepth as usize);
    let (mut ios, mut errors, mut bytes, mut in_flight) = (0u64, 0u64, 0u64, 0u32);

    // Submissions go in batches, one per round of completions, published with one
    // producer-index update and at most one notification, as blk-mq drives blkfront.
    // Every I/O of a batch is stamped with the batch's start time.
    let mut submit = |b: &mut blkfront::Batch<'_>, slot: u64| -> anyhow::Result<()> {
        let block = if args.rw.random() {
            rng.gen_range(0..blocks)
        } else {
            let b = next_seq % blocks;
            next_seq += 1;
            b
        };
        let offset = region.0 + block * bs;
        let write = match args.rw {
            Rw::Write | Rw::Randwrite => true,
            Rw::Randrw => rng.gen_bool(0.5),
            Rw::Read | Rw::Randread => false,
        };
        match (write, guest_copy) {
            (true, true) => b.write(offset, &data, slot),
            (true, false) => b.write_in_place(offset, bs as usize, slot),
            (false, true) => b.read(offset, bs as usize, slot, ReadData::Copy),
            (false, false) => b.read(offset, bs as usize, slot, ReadData::Discard),
        }
        .with_context(|| format!("submitting on queue {queue}"))
    };

    {
        let mut b = fe.batch(queue)?;
        let now = Instant::now();
        for slot in 0..args.iodepth as u64 {
            started[slot as usize] = now;
            submit(&mut b, slot)?;
            in_flight += 1;
        }
        b.commit()?;
    }
    while in_flight > 0 {
        out.clear();
        fe.wait_completions_polling(
            queue,
            &mut out,
            Duration::from_secs(5),
            Duration::from_micros(args.guest_poll_us),
        )
        .context("waiting for completions")?;
        if out.is_empty() {
            bail!("queue {queue}: no completion for 5 s with {in_flight} in flight");
        }
        let stopping = stop.load(Ordering::Relaxed);
        let mut b = fe.batch(queue)?;
        // Whatever else completed meanwhile joins this round.
        b.reap(&mut out)?;
        let now = Instant::now();
        for c in out.drain(..) {
            in_flight -= 1;
            let slot = c.token;
            let ns = now.duration_since(started[slot as usize]).as_nanos() as u64;
            hist.saturating_record(ns.max(1));
            match c.result {
                Ok(()) => {
                    ios += 1;
                    bytes += bs;
                }
                Err(_) => errors += 1,
            }
            if !stopping {
                started[slot as usize] = now;
                submit(&mut b, slot)?;
                in_flight += 1;
            }
        }
        b.commit()?;
    }
    Ok(QueueResult {
        ios,
        errors,
        bytes,
        hist,
    })
}

/// What driving a connected frontend measured.
pub struct Measured {
    pub ios: u64,
    pub errors: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    pub iops: f64,
    pub bw_mib_s: f64,
    pub lat_us: Latency,
    pub hist: Histogram<u64>,
}

/// Drives `args.queues` queues of a connected frontend for `args.runtime` seconds over
/// the first `size` bytes (one driver thread per queue, each over its own slice).
pub fn measure_frontend(
    fe: &blkfront::Frontend,
    args: &BenchArgs,
    size: u64,
    stop: &AtomicBool,
) -> anyhow::Result<Measured> {
    let per_queue = (size / args.queues as u64) / args.bs * args.bs;
    if per_queue == 0 {
        bail!("the region is smaller than one block per queue");
    }
    let t0 = Instant::now();
    let results: Vec<anyhow::Result<QueueResult>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.queues as usize)
            .map(|q| {
                let region = (q as u64 * per_queue, (q as u64 + 1) * per_queue);
                s.spawn(move || drive_queue(fe, q, args, region, stop))
            })
            .collect();
        let deadline = t0 + Duration::from_secs_f64(args.runtime);
        while Instant::now() < deadline && !handles.iter().any(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(10).min(deadline - Instant::now()));
        }
        stop.store(true, Ordering::Relaxed);
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("driver thread panicked")))
            })
            .collect()
    });
    let elapsed = t0.elapsed();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
    let (mut ios, mut errors, mut bytes) = (0, 0, 0);
    for r in results {
        let r = r?;
        ios += r.ios;
        errors += r.errors;
        bytes += r.bytes;
        hist.add(&r.hist).context("merging latency histograms")?;
    }
    let secs = elapsed.as_secs_f64();
    Ok(Measured {
        ios,
        errors,
        bytes,
        elapsed,
        iops: ios as f64 / secs,
        bw_mib_s: bytes as f64 / MIB / secs,
        lat_us: latency_of(&hist),
        hist,
    })
}

/// Runs the benchmark and returns its report.
pub fn run(args: &BenchArgs) -> anyhow::Result<BenchReport> {
    if args.bs == 0 || !args.bs.is_multiple_of(512) {
        bail!("--bs must be a non-zero multiple of 512");
    }
    if args.iodepth == 0 || args.queues == 0 {
        bail!("--iodepth and --queues must be at least 1");
    }
    if args.size < args.bs * args.queues as u64 {
        bail!("--size is smaller than one block per queue");
    }
    let image = match (args.storage, &args.image) {
        (StorageArg::Null, _) => None,
        (StorageArg::File, Some(p)) => Some(p.clone()),
        (StorageArg::File, None) => Some(default_image(args.size)?),
    };
    let format = match &image {
        Some(p) if !p.to_str().is_some_and(is_network_target) => args.format.resolve(p)?,
        _ => ImageFormatArg::Raw,
    };
    if format == ImageFormatArg::Qcow2 && args.baseline {
        bail!("--baseline runs io_uring straight on the file, which for a qcow2 image is not the guest's disk; compare with `qemu-img bench` (scripts/bench-qcow2)");
    }
    let (storage, qcow2) = open_storage(args, image.as_deref(), format)?;
    let info = storage.info();
    let size = args.size.min(info.size_bytes);

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
    let opts = StackOptions {
        frontend,
        backend_queues: args.queues,
        backend_ring_order: args.ring_order,
        backend_persistent: true,
        backend_indirect: args.indirect,
        grant_mode: args.grant_mode.into(),
        reactors: args.reactors,
        guest_pages,
        poll: Duration::from_micros(args.poll_us),
    };
    let stack = SimStack::connect(storage, &opts)?;
    let negotiated = {
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
    };
    if stack.frontend.max_request_bytes() < args.bs as usize {
        bail!(
            "--bs {} exceeds the largest request ({} bytes) with the negotiated segments",
            args.bs,
            stack.frontend.max_request_bytes()
        );
    }

    let baseline_cfg = if args.baseline {
        if image
            .as_deref()
            .and_then(|p| p.to_str())
            .is_some_and(is_network_target)
        {
            bail!("--baseline runs io_uring on a file; for NBD the baseline is fio --ioengine=nbd (scripts/bench-nbd), for RBD fio --ioengine=rbd (scripts/bench-rbd)");
        }
        let path = image
            .as_ref()
            .context("--baseline needs file storage (io_uring straight on the image)")?;
        let workload = args
            .rw
            .baseline_workload()
            .context("the io_uring baseline has no mixed read/write pattern")?;
        let mut cfg =
            BaselineConfig::new(path, workload, args.bs as u32, args.iodepth * args.queues);
        cfg.runtime = Duration::from_secs_f64(args.runtime);
        cfg.direct = info.direct_io;
        cfg.region_bytes = Some(size);
        cfg.seed = args.seed;
        Some(cfg)
    } else {
        None
    };

    let mut rounds = Vec::new();
    let mut baselines = Vec::new();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds");
    let (mut ios, mut errors, mut bytes) = (0u64, 0u64, 0u64);
    let mut elapsed = Duration::ZERO;
    let mut backend_cpu = 0u64;
    let mut failure = None;
    for r in 0..args.rounds.max(1) {
        // Odd rounds run the baseline first: whichever side goes second finds the
        // host's caches warmer (a virtual disk's host page cache serves re-reads and
        // absorbs writes), so a fixed order would bias every round the same way.
        let baseline_first = match &baseline_cfg {
            Some(cfg) if r % 2 == 1 => Some(baseline_figures(cfg)?),
            _ => None,
        };
        let cpu0 = reactor_cpu_ns();
        let stop = AtomicBool::new(false);
        let measured = measure_frontend(&stack.frontend, args, size, &stop);
        backend_cpu += reactor_cpu_ns().saturating_sub(cpu0);
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
        if let Some(cfg) = &baseline_cfg {
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
    let vbd_stats = stack.vbd().stats().total;
    stack
        .teardown()
        .context("tearing the simulated stack down")?;
    if let Some(e) = failure {
        return Err(e);
    }
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
        ratio_iops: None,
        ratio_bw: None,
        rounds: Vec::new(),
    };
    if !baselines.is_empty() {
        // The median of the rounds' ratios (of the middle two for an even count); the
        // baseline of the (lower) median round is reported. With one round, simply the
        // ratio of the run.
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
    if rounds.len() > 1 {
        report.rounds = rounds;
    }
    if errors > 0 {
        bail!("{errors} I/Os failed during the benchmark");
    }
    Ok(report)
}

/// One io_uring baseline phase.
fn baseline_figures(cfg: &BaselineConfig) -> anyhow::Result<BaselineFigures> {
    let b = storage::baseline::run(cfg).context("io_uring baseline")?;
    let l = &b.latency;
    let us = |ns: u64| ns as f64 / 1000.0;
    Ok(BaselineFigures {
        iops: b.iops(),
        bw_mib_s: b.bytes_per_sec() / MIB,
        lat_us: Latency {
            p50: us(l.p50_ns),
            p90: us(l.p90_ns),
            p99: us(l.p99_ns),
            p999: us(l.p999_ns),
            mean: us(l.mean_ns),
            max: us(l.max_ns),
        },
        cpu_us_per_io: b.cpu_us_per_op(),
    })
}

/// Human-readable report.
pub fn print_text(r: &BenchReport) {
    let n = &r.negotiated;
    println!(
        "xenblkd bench: {:?} bs={} iodepth={} queues={} storage={:?}{} direct={}",
        r.rw,
        r.bs,
        r.iodepth,
        r.queues,
        r.storage,
        r.image
            .as_deref()
            .map(|p| format!(" image={p} format={}", r.format.as_deref().unwrap_or("raw")))
            .unwrap_or_default(),
        r.direct
    );
    if let (Some(mapped), Some(worker)) = (r.qcow2_mapped_requests, r.qcow2_worker_requests) {
        println!(
            "  qcow2: {mapped} requests on the reactor's io_uring, {worker} through the worker"
        );
    }
    println!(
        "  negotiated: protocol={} queues={} ring-order={} persistent={} indirect={} grant-mode={} flush={} discard={}",
        n.protocol, n.queues, n.ring_order, n.persistent, n.indirect_segments, n.grant_mode, n.flush, n.discard
    );
    println!(
        "  xenblkd : {:>10.0} IOPS {:>9.1} MiB/s  lat us p50={:.1} p90={:.1} p99={:.1} p99.9={:.1}  backend {:.2} us CPU/IO ({:.0}% of a core)",
        r.iops,
        r.bw_mib_s,
        r.lat_us.p50,
        r.lat_us.p90,
        r.lat_us.p99,
        r.lat_us.p999,
        r.backend_cpu_us_per_io,
        r.backend_cpu_util * 100.0
    );
    if let Some(b) = &r.baseline {
        println!(
            "  baseline: {:>10.0} IOPS {:>9.1} MiB/s  lat us p50={:.1} p90={:.1} p99={:.1} p99.9={:.1}  (io_uring on the same image)",
            b.iops, b.bw_mib_s, b.lat_us.p50, b.lat_us.p90, b.lat_us.p99, b.lat_us.p999
        );
        for (i, round) in r.rounds.iter().enumerate() {
            println!(
                "  round {:>2}: xenblkd {:>10.0} IOPS {:>9.1} MiB/s  baseline {:>10.0} IOPS {:>9.1} MiB/s  ratio {:.3}",
                i + 1,
                round.iops,
                round.bw_mib_s,
                round.baseline_iops.unwrap_or(0.0),
                round.baseline_bw_mib_s.unwrap_or(0.0),
                round.ratio_bw.unwrap_or(0.0)
            );
        }
        let of = if r.rounds.len() > 1 {
            format!(" (median of {} rounds)", r.rounds.len())
        } else {
            String::new()
        };
        println!(
            "  ratio   : IOPS {:.3}  bandwidth {:.3}{of}",
            r.ratio_iops.unwrap_or(0.0),
            r.ratio_bw.unwrap_or(0.0)
        );
    }
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
