//! An unverified load at a fixed queue depth on one queue of a [`Frontend`]: what a guest
//! runs to measure throughput (many disks at once, each reporting what it completed), as
//! opposed to [`crate::workload`], which checks every byte and so measures its own
//! bookkeeping as much as the backend.
//!
//! Requests are one block each, at random block-aligned offsets, reads or writes in a
//! set proportion; nothing is copied on the guest side (reads are discarded, writes send
//! whatever the granted pages hold). Submissions and completions go in batches, one
//! producer-index update and at most one notification per round, as Linux's blk-mq drives
//! blkfront. Every completion's status is checked: an error response, a refused
//! submission or a request never answered is counted as an error, never as an operation.

use std::time::{Duration, Instant};

use crate::{Completion, Error, Frontend, ReadData};

/// How the load runs.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Requests kept in flight (fewer if the ring has fewer slots).
    pub depth: usize,
    /// Bytes per request, a multiple of the disk's sector size.
    pub block_size: usize,
    /// Share of writes among requests, 0..=100.
    pub write_percent: u8,
    pub seed: u64,
    /// No completion at all for this long, with requests in flight, fails them.
    pub stall_timeout: Duration,
    /// The queue used.
    pub queue: usize,
}

impl Default for LoadConfig {
    fn default() -> Self {
        Self {
            depth: 8,
            block_size: 4096,
            write_percent: 0,
            seed: 1,
            stall_timeout: Duration::from_secs(30),
            queue: 0,
        }
    }
}

/// What the load completed.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub reads: u64,
    pub writes: u64,
    /// Requests answered with an error, refused at submission, or never answered.
    pub errors: u64,
    /// From the first submission until `stop` said so (the drain after it excluded).
    pub elapsed: Duration,
    /// The first error, for the log.
    pub first_problem: Option<String>,
}

impl LoadReport {
    /// Requests completed successfully.
    pub fn ops(&self) -> u64 {
        self.reads + self.writes
    }

    fn problem(&mut self, what: String) {
        self.errors += 1;
        if self.first_problem.is_none() {
            self.first_problem = Some(what);
        }
    }
}

/// Runs the load on `fe` until `stop` says so, then lets what is in flight finish.
pub fn run_load(fe: &Frontend, cfg: &LoadConfig, stop: &mut dyn FnMut() -> bool) -> LoadReport {
    let mut report = LoadReport::default();
    let bs = cfg.block_size.max(1) as u64;
    let blocks = fe.capacity() / bs;
    if blocks == 0 {
        report.problem(format!(
            "disk of {} bytes smaller than one block",
            fe.capacity()
        ));
        return report;
    }
    let mut rng = Rng(cfg.seed.max(1));
    let mut in_flight = 0usize;
    let mut stopping = false;
    let mut token = 0u64;
    let mut out: Vec<Completion> = Vec::with_capacity(cfg.depth);
    let start = Instant::now();
    let mut last_progress = start;
    // Submits up to `n` requests in `b`; a full ring just means fewer in flight. A
    // submission refused for another reason (a closed or halted ring) ends the load.
    let mut submit_failed = false;
    let mut fill = |b: &mut crate::Batch<'_>, n: usize, report: &mut LoadReport| -> (usize, bool) {
        let mut submitted = 0;
        while submitted < n {
            let offset = (rng.next() % blocks) * bs;
            let write = rng.next() % 100 < u64::from(cfg.write_percent);
            token += 1;
            let r = if write {
                b.write_in_place(offset, bs as usize, token)
            } else {
                b.read(offset, bs as usize, token, ReadData::Discard)
            };
            match r {
                Ok(()) => submitted += 1,
                Err(Error::QueueFull { .. }) => break,
                Err(e) => {
                    report.problem(format!("submitting at {offset}: {e}"));
                    return (submitted, true);
                }
            }
        }
        (submitted, false)
    };
    match fe.batch(cfg.queue) {
        Ok(mut b) => {
            let (n, failed) = fill(&mut b, cfg.depth, &mut report);
            in_flight += n;
            submit_failed = failed;
            if let Err(e) = b.commit() {
                report.problem(format!("publishing requests: {e}"));
            }
        }
        Err(e) => report.problem(format!("opening a batch: {e}")),
    }
    if report.errors > 0 || in_flight == 0 {
        report.elapsed = start.elapsed();
        if in_flight == 0 && report.errors == 0 {
            report.problem("no request fits the ring".to_string());
        }
        return report;
    }
    while in_flight > 0 {
        out.clear();
        if let Err(e) = fe.wait_completions(cfg.queue, &mut out, Duration::from_millis(100)) {
            report.errors += in_flight as u64 - 1;
            report.problem(format!("waiting for completions: {e}"));
            break;
        }
        if !stopping && stop() {
            stopping = true;
            report.elapsed = start.elapsed();
        }
        if out.is_empty() {
            if last_progress.elapsed() >= cfg.stall_timeout {
                report.errors += in_flight as u64 - 1;
                report.problem(format!(
                    "{in_flight} request(s) unanswered for {:?}",
                    cfg.stall_timeout
                ));
                break;
            }
            continue;
        }
        last_progress = Instant::now();
        let mut b = match fe.batch(cfg.queue) {
            Ok(b) => b,
            Err(e) => {
                report.errors += in_flight as u64 - 1;
                report.problem(format!("opening a batch: {e}"));
                break;
            }
        };
        // Whatever else completed meanwhile joins this round.
        if let Err(e) = b.reap(&mut out) {
            report.problem(format!("reaping: {e}"));
        }
        let done = out.len();
        in_flight -= done;
        for c in out.drain(..) {
            match (c.result, c.op) {
                (Ok(()), crate::IoOp::Write) => report.writes += 1,
                (Ok(()), _) => report.reads += 1,
                (Err(e), op) => report.problem(format!("{op:?}: {e}")),
            }
        }
        if !stopping && !submit_failed {
            let (n, failed) = fill(&mut b, done, &mut report);
            in_flight += n;
            submit_failed = failed;
        }
        if let Err(e) = b.commit() {
            report.problem(format!("publishing requests: {e}"));
        }
    }
    if !stopping {
        report.elapsed = start.elapsed();
    }
    report
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}
