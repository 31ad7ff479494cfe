//! The measurement side of `xenblkd bench`: driver threads keeping `iodepth` requests in
//! flight per queue with submit-to-completion latency in an HDR histogram, the engine
//! reactors' on-CPU time, and one io_uring baseline phase on the same image.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use blkfront::ReadData;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use storage::baseline::BaselineConfig;

use super::report::{BaselineFigures, Latency};
use super::{BenchArgs, Rw, MIB};
/// On-CPU nanoseconds of this process's engine reactor threads.
pub(super) fn reactor_cpu_ns() -> u64 {
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

pub(super) fn latency_of(h: &Histogram<u64>) -> Latency {
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

/// One baseline phase.
pub(super) fn baseline_figures(b: &super::Baseline) -> anyhow::Result<BaselineFigures> {
    match b {
        super::Baseline::Uring(cfg) => uring_figures(cfg),
        super::Baseline::Fio(job) => job.run(),
    }
}

fn uring_figures(cfg: &BaselineConfig) -> anyhow::Result<BaselineFigures> {
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

/// A fio run with the pattern of the xenblkd phase: one job per queue, each with the
/// queue's depth over the queue's slice of the region (as the driver threads split it),
/// io_uring, the same block size, O_DIRECT and runtime.
pub(crate) struct FioJob {
    args: Vec<String>,
}

impl FioJob {
    pub(super) fn new(
        args: &BenchArgs,
        image: &std::path::Path,
        direct: bool,
        size: u64,
    ) -> anyhow::Result<Self> {
        let per_queue = (size / u64::from(args.queues)) / args.bs * args.bs;
        if per_queue == 0 {
            bail!("the region is smaller than one block per queue");
        }
        let image = image
            .to_str()
            .context("fio needs a UTF-8 image path")?
            // fio splits --filename at ':'.
            .replace(':', "\\:");
        let rw = match args.rw {
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
            Rw::Randrw => "randrw",
        };
        let mut a = vec![
            "--name=xenblkd-baseline".to_string(),
            format!("--filename={image}"),
            "--ioengine=io_uring".into(),
            format!("--direct={}", u8::from(direct)),
            format!("--rw={rw}"),
            format!("--bs={}", args.bs),
            format!("--iodepth={}", args.iodepth),
            format!("--numjobs={}", args.queues),
            format!("--size={per_queue}"),
            format!("--offset_increment={per_queue}"),
            format!(
                "--runtime={}ms",
                (args.runtime * 1000.0).round().max(1.0) as u64
            ),
            "--time_based=1".into(),
            "--norandommap=1".into(),
            "--randrepeat=0".into(),
            format!("--randseed={}", args.seed),
            "--group_reporting=1".into(),
            "--lat_percentiles=1".into(),
            "--percentile_list=50:90:99:99.9".into(),
            "--output-format=json".into(),
        ];
        if args.rw == Rw::Randrw {
            a.push("--rwmixread=50".into());
        }
        Ok(Self { args: a })
    }

    fn run(&self) -> anyhow::Result<BaselineFigures> {
        let out = std::process::Command::new("fio")
            .args(&self.args)
            .output()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    anyhow::anyhow!("--baseline fio: fio is not installed (apt-get install fio)")
                } else {
                    anyhow::Error::new(e).context("running fio")
                }
            })?;
        if !out.status.success() {
            bail!(
                "fio failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        parse_fio_json(&out.stdout)
    }
}

/// The figures of fio's JSON output (`--group_reporting`, so one job entry): reads and
/// writes together, latency as submission to completion (`lat_ns`, what the bench's
/// driver measures too), CPU as fio's user + system share of its runtime.
fn parse_fio_json(out: &[u8]) -> anyhow::Result<BaselineFigures> {
    // fio may print notices before the JSON object.
    let start = out
        .iter()
        .position(|&b| b == b'{')
        .context("no JSON in fio's output")?;
    let v: serde_json::Value =
        serde_json::from_slice(&out[start..]).context("parsing fio's JSON output")?;
    let job = &v["jobs"][0];
    let f = |x: &serde_json::Value| x.as_f64().unwrap_or(0.0);
    let (read, write) = (&job["read"], &job["write"]);
    let ios = f(&read["total_ios"]) + f(&write["total_ios"]);
    let runtime_s = f(&job["job_runtime"]) / 1000.0;
    if ios == 0.0 || runtime_s == 0.0 {
        bail!("fio completed no I/O");
    }
    // The direction with the most I/O stands for the latency (both for randrw).
    let main = if f(&write["total_ios"]) > f(&read["total_ios"]) {
        write
    } else {
        read
    };
    let pct = |k: &str| f(&main["lat_ns"]["percentile"][k]) / 1000.0;
    let cpu_s = (f(&job["usr_cpu"]) + f(&job["sys_cpu"])) / 100.0 * runtime_s;
    Ok(BaselineFigures {
        iops: f(&read["iops"]) + f(&write["iops"]),
        bw_mib_s: (f(&read["bw_bytes"]) + f(&write["bw_bytes"])) / MIB,
        lat_us: Latency {
            p50: pct("50.000000"),
            p90: pct("90.000000"),
            p99: pct("99.000000"),
            p999: pct("99.900000"),
            mean: f(&main["lat_ns"]["mean"]) / 1000.0,
            max: f(&main["lat_ns"]["max"]) / 1000.0,
        },
        cpu_us_per_io: cpu_s * 1e6 / ios,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fio_json_is_read_with_notices_before_it() {
        let out = br#"note: both iodepth >= 1 and synchronous I/O engine are selected
{"fio version":"fio-3.33","jobs":[{"jobname":"xenblkd-baseline","job_runtime":2000,
"usr_cpu":10.0,"sys_cpu":40.0,
"read":{"total_ios":20000,"iops":10000.0,"bw_bytes":40960000,
 "lat_ns":{"mean":95000.0,"max":900000,"percentile":{"50.000000":90112,"90.000000":120832,
 "99.000000":250880,"99.900000":700416}}},
"write":{"total_ios":0,"iops":0.0,"bw_bytes":0,"lat_ns":{"mean":0.0,"max":0}}}]}"#;
        let b = parse_fio_json(out).unwrap();
        assert_eq!(b.iops, 10000.0);
        assert!((b.bw_mib_s - 40960000.0 / MIB).abs() < 1e-9);
        assert!((b.lat_us.p50 - 90.112).abs() < 1e-9);
        assert!((b.lat_us.p999 - 700.416).abs() < 1e-9);
        // 50 % of 2 s over 20,000 I/Os.
        assert!((b.cpu_us_per_io - 50.0).abs() < 1e-9);
        assert!(parse_fio_json(b"fio: no such file").is_err());
    }

    #[test]
    fn fio_gets_the_pattern_of_the_xenblkd_phase() {
        let args = BenchArgs {
            rw: Rw::Randread,
            bs: 4096,
            iodepth: 32,
            queues: 2,
            runtime: 1.5,
            ..BenchArgs::default()
        };
        let job = FioJob::new(&args, std::path::Path::new("/a:b.img"), true, 1 << 30).unwrap();
        for want in [
            "--filename=/a\\:b.img",
            "--ioengine=io_uring",
            "--direct=1",
            "--rw=randread",
            "--bs=4096",
            "--iodepth=32",
            "--numjobs=2",
            "--size=536870912",
            "--offset_increment=536870912",
            "--runtime=1500ms",
        ] {
            assert!(
                job.args.iter().any(|a| a == want),
                "{want} missing: {:?}",
                job.args
            );
        }
    }
}
