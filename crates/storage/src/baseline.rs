//! Benchmark runners: one fio-like workload, driven two ways.
//!
//! - [`run`] is the **baseline**: a bare io_uring loop on the file, no abstraction — one
//!   `IORING_OP_READV`/`WRITEV` with one iovec per I/O, `submit_and_wait(1)` per iteration,
//!   refilling each completed slot at once (what fio's io_uring engine does). It is what
//!   `xenblkd bench --baseline` reports and what the project compares against.
//! - [`run_queue`] drives the same workload through a [`StorageQueue`], the way the engine
//!   does: submit a batch, `commit`, wait for the completion fd (`poll` here, epoll in the
//!   engine), `reap`, refill.
//!
//! The difference between the two is the cost of the storage layer (and of the eventfd
//! wake-up model the reactor needs to multiplex many rings on one thread).
//!
//! Both keep every buffer alive until every submitted I/O has completed, also on error.

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};

use crate::{sys, AlignedBuf, StorageOp, StorageQueue, SubmitError};

/// A latency in nanoseconds (saturating: 584 years).
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The I/O pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    RandRead,
    SeqRead,
    RandWrite,
    SeqWrite,
}

impl Workload {
    pub fn is_write(self) -> bool {
        matches!(self, Workload::RandWrite | Workload::SeqWrite)
    }
}

impl FromStr for Workload {
    type Err = String;
    /// fio's names: `randread`, `read`, `randwrite`, `write`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "randread" => Ok(Workload::RandRead),
            "read" | "seqread" => Ok(Workload::SeqRead),
            "randwrite" => Ok(Workload::RandWrite),
            "write" | "seqwrite" => Ok(Workload::SeqWrite),
            _ => Err(format!(
                "unknown workload {s:?} (randread, read, randwrite, write)"
            )),
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Workload::RandRead => "randread",
            Workload::SeqRead => "read",
            Workload::RandWrite => "randwrite",
            Workload::SeqWrite => "write",
        })
    }
}

/// One benchmark job.
#[derive(Debug, Clone)]
pub struct BaselineConfig {
    /// The file (or block device) to run on; [`run_queue`] ignores it.
    pub path: PathBuf,
    pub workload: Workload,
    /// Bytes per I/O; a multiple of 512 (of 4096 to be safe with O_DIRECT).
    pub block_size: u32,
    pub iodepth: u32,
    pub runtime: Duration,
    /// O_DIRECT (bare baseline only; a queue uses what its storage negotiated).
    pub direct: bool,
    /// Restrict I/O to the first this-many bytes (default: the whole file).
    pub region_bytes: Option<u64>,
    /// Seed of the random offsets.
    pub seed: u64,
}

impl BaselineConfig {
    pub fn new(
        path: impl Into<PathBuf>,
        workload: Workload,
        block_size: u32,
        iodepth: u32,
    ) -> Self {
        BaselineConfig {
            path: path.into(),
            workload,
            block_size,
            iodepth,
            runtime: Duration::from_secs(5),
            direct: true,
            region_bytes: None,
            seed: 0x9E37_79B9_7F4A_7C15,
        }
    }
}

/// Latency percentiles, in nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LatencySummary {
    pub min_ns: u64,
    pub mean_ns: u64,
    pub p50_ns: u64,
    pub p90_ns: u64,
    pub p99_ns: u64,
    pub p999_ns: u64,
    pub max_ns: u64,
}

/// What a run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct BaselineResult {
    pub ops: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    /// CPU time (user + system) of the driving thread: when the device is the bottleneck,
    /// IOPS tie and this is where the cost of the storage layer shows.
    pub cpu: Duration,
    pub latency: LatencySummary,
}

impl BaselineResult {
    pub fn iops(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    pub fn bytes_per_sec(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    /// CPU microseconds spent by the driving thread per completed I/O.
    pub fn cpu_us_per_op(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / (self.ops.max(1) as f64)
    }
}

impl fmt::Display for BaselineResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = |ns: u64| ns as f64 / 1000.0;
        write!(
            f,
            "iops={:.0} bw={:.1}MiB/s cpu_us/op={:.2} lat_us mean={:.1} p50={:.1} p90={:.1} p99={:.1} p99.9={:.1} max={:.1} ({} ops in {:.2}s)",
            self.iops(),
            self.bytes_per_sec() / (1024.0 * 1024.0),
            self.cpu_us_per_op(),
            us(self.latency.mean_ns),
            us(self.latency.p50_ns),
            us(self.latency.p90_ns),
            us(self.latency.p99_ns),
            us(self.latency.p999_ns),
            us(self.latency.max_ns),
            self.ops,
            self.elapsed.as_secs_f64(),
        )
    }
}

/// A log-linear latency histogram: 32 linear sub-buckets per power of two, so any
/// recorded value is reported within ~3 %. Fixed size (1920 buckets), no allocation per
/// sample.
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    buckets: Vec<u64>,
    count: u64,
    sum: u128,
    min: u64,
    max: u64,
}

const SUB_BITS: u32 = 5;
const SUB: u64 = 1 << SUB_BITS;

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    pub fn new() -> Self {
        LatencyHistogram {
            buckets: vec![0; ((64 - SUB_BITS as usize) + 1) << SUB_BITS],
            count: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    // Bucket numbers are below 64 << SUB_BITS: they fit any usize.
    #[allow(clippy::cast_possible_truncation)]
    fn index(v: u64) -> usize {
        if v < SUB {
            return v as usize;
        }
        let exp = 63 - v.leading_zeros();
        let sub = (v >> (exp - SUB_BITS)) & (SUB - 1);
        (((exp - SUB_BITS + 1) as u64) << SUB_BITS | sub) as usize
    }

    /// Midpoint of bucket `i`.
    fn value(i: usize) -> u64 {
        let i = i as u64;
        if i < SUB {
            return i;
        }
        let e = i >> SUB_BITS;
        let sub = i & (SUB - 1);
        let shift = e - 1;
        ((SUB + sub) << shift) + ((1u64 << shift) >> 1)
    }

    pub fn record(&mut self, ns: u64) {
        self.buckets[Self::index(ns)] += 1;
        self.count += 1;
        self.sum += u128::from(ns);
        self.min = self.min.min(ns);
        self.max = self.max.max(ns);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The value at quantile `q` (0.0..=1.0), clamped to the recorded min and max.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        // At most `count`: q is clamped to 0..=1.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let target = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= target {
                return Self::value(i).clamp(self.min, self.max);
            }
        }
        self.max
    }

    pub fn summary(&self) -> LatencySummary {
        if self.count == 0 {
            return LatencySummary::default();
        }
        LatencySummary {
            min_ns: self.min,
            mean_ns: u64::try_from(self.sum / u128::from(self.count)).unwrap_or(u64::MAX),
            p50_ns: self.quantile(0.50),
            p90_ns: self.quantile(0.90),
            p99_ns: self.quantile(0.99),
            p999_ns: self.quantile(0.999),
            max_ns: self.max,
        }
    }
}

/// Offsets of a workload: block-aligned, inside the region.
struct Offsets {
    workload: Workload,
    bs: u64,
    blocks: u64,
    next: u64,
    rng: u64,
}

impl Offsets {
    fn new(workload: Workload, bs: u64, region: u64, seed: u64) -> io::Result<Self> {
        let blocks = region / bs;
        if blocks == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("region of {region} bytes holds no {bs}-byte block"),
            ));
        }
        Ok(Offsets {
            workload,
            bs,
            blocks,
            next: 0,
            rng: seed | 1,
        })
    }

    fn next(&mut self) -> u64 {
        let block = match self.workload {
            Workload::RandRead | Workload::RandWrite => {
                // xorshift64*: cheap and good enough to spread offsets.
                self.rng ^= self.rng >> 12;
                self.rng ^= self.rng << 25;
                self.rng ^= self.rng >> 27;
                self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) % self.blocks
            }
            Workload::SeqRead | Workload::SeqWrite => {
                let b = self.next;
                self.next = (self.next + 1) % self.blocks;
                b
            }
        };
        block * self.bs
    }
}

fn check_config(cfg: &BaselineConfig) -> io::Result<()> {
    if cfg.block_size == 0
        || !cfg.block_size.is_multiple_of(512)
        || cfg.iodepth == 0
        || cfg.iodepth > 4096
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "block size must be a non-zero multiple of 512 and iodepth in 1..=4096",
        ));
    }
    Ok(())
}

/// Buffers for `depth` in-flight I/Os of `bs` bytes, page aligned, with a non-zero pattern
/// (so written data is not all zeros).
fn make_buffers(depth: u32, bs: u32) -> Vec<AlignedBuf> {
    (0..depth)
        .map(|i| {
            let mut b = AlignedBuf::page_aligned(bs as usize);
            for (j, x) in b.as_mut_slice().iter_mut().enumerate() {
                *x = (i as usize + j).to_le_bytes()[0] | 1;
            }
            b
        })
        .collect()
}

/// The bare io_uring baseline: runs `cfg` on `cfg.path` without the storage layer.
pub fn run(cfg: &BaselineConfig) -> io::Result<BaselineResult> {
    check_config(cfg)?;
    let mut flags = libc::O_CLOEXEC;
    if cfg.direct {
        flags |= libc::O_DIRECT;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(cfg.workload.is_write())
        .custom_flags(flags)
        .open(&cfg.path)?;
    let len = match file.metadata()? {
        m if m.file_type().is_file() => m.len(),
        _ => sys::blk_size(file.as_raw_fd())?,
    };
    let region = cfg.region_bytes.unwrap_or(len).min(len);
    let bs = cfg.block_size;
    let mut offsets = Offsets::new(cfg.workload, u64::from(bs), region, cfg.seed)?;

    let depth = cfg.iodepth;
    let mut ring = IoUring::new(depth.next_power_of_two())?;
    let mut bufs = make_buffers(depth, bs);
    // One iovec per slot, in a Vec that is never resized: the kernel reads it after push.
    let iovs: Vec<libc::iovec> = bufs.iter_mut().map(|b| b.full_iovec()).collect();
    let mut started = vec![Instant::now(); depth as usize];
    let fd = types::Fd(file.as_raw_fd());
    let write = cfg.workload.is_write();

    let mut hist = LatencyHistogram::new();
    let mut ops = 0u64;
    let mut in_flight = 0u32;
    let mut first_error: Option<io::Error> = None;

    let push = |ring: &mut IoUring, slot: usize, offset: u64, started: &mut [Instant]| {
        let iov = &iovs[slot] as *const libc::iovec;
        let entry = if write {
            opcode::Writev::new(fd, iov, 1).offset(offset).build()
        } else {
            opcode::Readv::new(fd, iov, 1).offset(offset).build()
        }
        .user_data(slot as u64);
        started[slot] = Instant::now();
        // SAFETY: the iovec lives in `iovs` and the buffer in `bufs`, both kept alive and
        // unmoved until the loop below has reaped every submitted SQE; `file` outlives the
        // ring's use of its fd for the same reason. The SQ has room: at most `depth` SQEs
        // are ever outstanding and the ring has >= depth entries.
        unsafe { ring.submission().push(&entry) }.map_err(|_| io::Error::other("SQ full"))
    };

    let cpu_start = sys::thread_cpu_time();
    let start = Instant::now();
    let deadline = start + cfg.runtime;
    for slot in 0..depth as usize {
        push(&mut ring, slot, offsets.next(), &mut started)?;
        in_flight += 1;
    }
    while in_flight > 0 {
        if let Err(e) = ring.submit_and_wait(1) {
            if e.raw_os_error() != Some(libc::EINTR) {
                first_error.get_or_insert(e);
                // Keep waiting: the buffers must outlive every submitted I/O.
                std::thread::sleep(Duration::from_millis(1));
            }
            continue;
        }
        let now = Instant::now();
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (user_data, res) in done {
            in_flight -= 1;
            let Some(slot) = usize::try_from(user_data)
                .ok()
                .filter(|&s| s < started.len())
            else {
                continue;
            };
            hist.record(nanos(now.duration_since(started[slot])));
            if res < 0 {
                first_error.get_or_insert(io::Error::from_raw_os_error(-res));
            } else if res as u32 != bs {
                first_error.get_or_insert(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("short transfer: {res} of {bs} bytes"),
                ));
            } else {
                ops += 1;
            }
            if first_error.is_none() && now < deadline {
                match push(&mut ring, slot, offsets.next(), &mut started) {
                    Ok(()) => in_flight += 1,
                    // No early return: other I/Os still use the buffers.
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
    }
    let elapsed = start.elapsed();
    let cpu = sys::thread_cpu_time().saturating_sub(cpu_start);
    drop(bufs);
    if let Some(e) = first_error {
        return Err(e);
    }
    Ok(BaselineResult {
        ops,
        bytes: ops * u64::from(bs),
        elapsed,
        cpu,
        latency: hist.summary(),
    })
}

/// Runs `cfg` (path and `direct` ignored) through `queue`, on the first `size_bytes` of its
/// storage, the way the engine drives a queue.
pub fn run_queue(
    queue: &mut dyn StorageQueue,
    size_bytes: u64,
    cfg: &BaselineConfig,
) -> io::Result<BaselineResult> {
    check_config(cfg)?;
    let region = cfg.region_bytes.unwrap_or(size_bytes).min(size_bytes);
    let bs = cfg.block_size;
    let mut offsets = Offsets::new(cfg.workload, u64::from(bs), region, cfg.seed)?;
    let depth = cfg.iodepth.min(queue.depth());
    let mut bufs = make_buffers(depth, bs);
    let iovs: Vec<libc::iovec> = bufs.iter_mut().map(|b| b.full_iovec()).collect();
    let mut started = vec![Instant::now(); depth as usize];
    let write = cfg.workload.is_write();

    let mut hist = LatencyHistogram::new();
    let mut ops = 0u64;
    let mut first_error: Option<io::Error> = None;
    let mut done: Vec<(u64, io::Result<u64>)> = Vec::with_capacity(depth as usize);

    let submit =
        |queue: &mut dyn StorageQueue, slot: usize, offset: u64, started: &mut [Instant]| {
            let iov = std::slice::from_ref(&iovs[slot]);
            let op = if write {
                StorageOp::Write {
                    offset,
                    iov,
                    fua: false,
                }
            } else {
                StorageOp::Read { offset, iov }
            };
            started[slot] = Instant::now();
            // SAFETY: the buffer behind the iovec lives in `bufs`, which is neither touched nor
            // dropped until every submitted operation has been reaped (the loop below runs until
            // the queue has nothing in flight).
            unsafe { queue.submit(op, slot as u64) }
        };
    let submit_err = |e: SubmitError| io::Error::other(e.to_string());

    let cpu_start = sys::thread_cpu_time();
    let start = Instant::now();
    let deadline = start + cfg.runtime;
    for slot in 0..depth as usize {
        submit(queue, slot, offsets.next(), &mut started).map_err(submit_err)?;
    }
    queue.commit()?;
    while queue.in_flight() > 0 {
        match sys::poll_readable(queue.completion_fd(), 1000) {
            Ok(_) => {}
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
        queue.reap(&mut |tag, res| done.push((tag, res)));
        let now = Instant::now();
        for (tag, res) in done.drain(..) {
            let Some(slot) = usize::try_from(tag).ok().filter(|&s| s < started.len()) else {
                continue;
            };
            hist.record(nanos(now.duration_since(started[slot])));
            match res {
                Ok(n) if n == u64::from(bs) => ops += 1,
                Ok(n) => {
                    first_error.get_or_insert(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("short transfer: {n} of {bs} bytes"),
                    ));
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
            if first_error.is_none() && now < deadline {
                if let Err(e) = submit(queue, slot, offsets.next(), &mut started) {
                    first_error.get_or_insert(submit_err(e));
                }
            }
        }
        if let Err(e) = queue.commit() {
            first_error.get_or_insert(e);
        }
    }
    let elapsed = start.elapsed();
    let cpu = sys::thread_cpu_time().saturating_sub(cpu_start);
    drop(bufs);
    if let Some(e) = first_error {
        return Err(e);
    }
    Ok(BaselineResult {
        ops,
        bytes: ops * u64::from(bs),
        elapsed,
        cpu,
        latency: hist.summary(),
    })
}

/// Makes `path` a file of at least `size` bytes of non-zero data (so reads hit allocated
/// blocks, not holes), and syncs it. An existing file at least that large is left as is.
pub fn prepare_file(path: &Path, size: u64) -> io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)?;
    let len = file.metadata()?.len();
    if len >= size {
        return Ok(());
    }
    let chunk: Vec<u8> = (0..1usize << 20)
        .map(|i| (i % 251).to_le_bytes()[0] | 1)
        .collect();
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(len))?;
    let mut at = len;
    while at < size {
        // At most the chunk's length, a usize.
        #[allow(clippy::cast_possible_truncation)]
        let n = (size - at).min(chunk.len() as u64) as usize;
        file.write_all(&chunk[..n])?;
        at += n as u64;
    }
    file.sync_all()?;
    Ok(())
}

/// Size in bytes of a file or block device.
pub fn file_len(path: &Path) -> io::Result<u64> {
    let f = File::open(path)?;
    match f.metadata()? {
        m if m.file_type().is_file() => Ok(m.len()),
        _ => sys::blk_size(f.as_raw_fd()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_accurate_within_bucket_width() {
        let mut h = LatencyHistogram::new();
        for v in 1..=100_000u64 {
            h.record(v);
        }
        for (q, exact) in [(0.5, 50_000f64), (0.9, 90_000.0), (0.99, 99_000.0)] {
            let got = h.quantile(q) as f64;
            assert!((got - exact).abs() / exact < 0.04, "q{q}: {got} vs {exact}");
        }
        assert_eq!(h.summary().min_ns, 1);
        assert_eq!(h.summary().max_ns, 100_000);
        // Every index round-trips into its own bucket.
        for v in [0u64, 31, 32, 63, 64, 1000, 1 << 40, u64::MAX] {
            let i = LatencyHistogram::index(v);
            assert!(i < h.buckets.len());
            assert_eq!(
                LatencyHistogram::index(LatencyHistogram::value(i)),
                i,
                "v={v}"
            );
        }
    }

    #[test]
    fn offsets_stay_aligned_and_in_range() {
        let mut o = Offsets::new(Workload::RandRead, 4096, 1 << 20, 7).unwrap();
        for _ in 0..10_000 {
            let off = o.next();
            assert_eq!(off % 4096, 0);
            assert!(off + 4096 <= 1 << 20);
        }
        let mut s = Offsets::new(Workload::SeqRead, 4096, 3 * 4096, 7).unwrap();
        let seq: Vec<u64> = (0..4).map(|_| s.next()).collect();
        assert_eq!(seq, vec![0, 4096, 8192, 0]);
    }
}
