//! What `xenblkd bench` reports: the report types (serialised as the JSON output) and
//! their human-readable rendering.

use serde::Serialize;

use super::{BaselineArg, Rw, StorageArg};
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

/// The reactors' event loop during the xenblkd phases, per completed I/O.
#[derive(Debug, Clone, Serialize)]
pub struct ReactorFigures {
    /// Sleeps ended by an event (notification, completion, command) per I/O.
    pub wakeups_per_io: f64,
    /// Blocking waits per I/O (wake-ups plus housekeeping timeouts).
    pub sleeps_per_io: f64,
    /// Adaptive polls that found work, and that ran out, in all.
    pub poll_hits: u64,
    pub poll_misses: u64,
    /// Time spent polling per I/O.
    pub poll_us_per_io: f64,
}

impl ReactorFigures {
    pub(super) fn of(s: &backend::ReactorStats, ios: u64) -> Self {
        let per = |n: u64| n as f64 / ios.max(1) as f64;
        Self {
            wakeups_per_io: per(s.wakeups),
            sleeps_per_io: per(s.sleeps),
            poll_hits: s.poll_hits,
            poll_misses: s.poll_misses,
            poll_us_per_io: per(s.poll_ns) / 1000.0,
        }
    }
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
    pub reactor: ReactorFigures,
    pub negotiated: Negotiated,
    pub backend_stats: BackendCounters,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<BaselineFigures>,
    /// What the baseline was: the built-in io_uring loop or fio.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_kind: Option<BaselineArg>,
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
    let l = &r.reactor;
    println!(
        "  reactor : {:.3} wake-ups/IO, {:.3} sleeps/IO, polls {} hit {} missed ({:.2} us/IO polling)",
        l.wakeups_per_io, l.sleeps_per_io, l.poll_hits, l.poll_misses, l.poll_us_per_io
    );
    if let Some(b) = &r.baseline {
        let what = match r.baseline_kind {
            Some(BaselineArg::Fio) => "fio --ioengine=io_uring on the same image",
            _ => "io_uring on the same image",
        };
        println!(
            "  baseline: {:>10.0} IOPS {:>9.1} MiB/s  lat us p50={:.1} p90={:.1} p99={:.1} p99.9={:.1}  ({what})",
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
