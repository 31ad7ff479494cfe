//! A verified random read/write workload on one [`Frontend`]: what a guest runs while its
//! backend is restarted, crashed or handed over under it.
//!
//! The disk is split into regions; each request stays inside one region and no two
//! requests in flight share a region, so what a read must return is known exactly: the
//! model keeps, per 4 KiB block, the tag of the last write that *completed* (0: never
//! written, zeros, as a fresh sparse image reads). Every block of a write carries a
//! pattern derived from its block number and its tag, so a block written to the wrong
//! place, a stale block and a torn block all read back as a mismatch. Several requests
//! are kept in flight at once (the asynchronous API), so a backend that dies always has
//! some outstanding. Every latency is measured; those over a threshold are reported as
//! they complete, with their start time, for whoever correlates them with restarts.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use crate::{Completion, Error, Frontend, IoOp};

/// The unit of the model: every request is a whole number of these.
pub const BLOCK: usize = 4096;

/// How the workload runs.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// Requests kept in flight.
    pub depth: usize,
    /// Largest request, in blocks.
    pub max_blocks: usize,
    /// Blocks per region (at least `max_blocks`).
    pub region_blocks: usize,
    /// Share of writes among requests, 0..=100.
    pub write_percent: u8,
    pub seed: u64,
    /// Requests slower than this are reported ([`SlowRequest`]).
    pub slow: Duration,
    /// No completion at all for this long, with requests in flight, fails them: the
    /// backend never came back.
    pub stall_timeout: Duration,
    /// The queue used.
    pub queue: usize,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            depth: 8,
            max_blocks: 16,
            region_blocks: 16,
            write_percent: 50,
            seed: 1,
            slow: Duration::from_millis(50),
            stall_timeout: Duration::from_secs(30),
            queue: 0,
        }
    }
}

/// A request that took longer than [`WorkloadConfig::slow`].
#[derive(Debug, Clone, Copy)]
pub struct SlowRequest {
    pub op: IoOp,
    pub started: SystemTime,
    pub latency: Duration,
}

/// What the workload saw.
#[derive(Debug, Clone, Default)]
pub struct WorkloadReport {
    pub reads: u64,
    pub writes: u64,
    /// Requests answered with an error, refused at submission, or never answered.
    pub errors: u64,
    /// Blocks read back different from what the model says.
    pub mismatches: u64,
    pub max_latency: Duration,
    /// The first error or mismatch, for the log.
    pub first_problem: Option<String>,
}

impl WorkloadReport {
    fn problem(&mut self, what: String) {
        if self.first_problem.is_none() {
            self.first_problem = Some(what);
        }
    }
}

/// A small deterministic generator (xorshift64*).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Tag of a block whose content is unknown (a write to it failed): not verified.
const UNKNOWN: u64 = u64::MAX;

/// The content of block `block` written with `tag` (zeros for tag 0).
fn fill_block(out: &mut [u8], block: u64, tag: u64) {
    if tag == 0 {
        out.fill(0);
        return;
    }
    for (i, w) in out.chunks_exact_mut(8).enumerate() {
        let v = tag
            .wrapping_add(block.wrapping_mul(BLOCK as u64) + i as u64)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        w.copy_from_slice(&v.to_le_bytes());
    }
}

struct Pending {
    op: IoOp,
    region: usize,
    first: usize,
    /// Tags a write puts in its blocks.
    tags: Vec<u64>,
    start: Instant,
    started: SystemTime,
}

/// Runs the workload on `fe` until `stop` says so, then lets what is in flight finish.
/// `on_slow` hears of every request slower than [`WorkloadConfig::slow`].
pub fn run_verified(
    fe: &Frontend,
    cfg: &WorkloadConfig,
    stop: &mut dyn FnMut() -> bool,
    on_slow: &mut dyn FnMut(SlowRequest),
) -> WorkloadReport {
    let mut report = WorkloadReport::default();
    let region_blocks = cfg.region_blocks.max(cfg.max_blocks).max(1);
    let blocks = (fe.capacity() / BLOCK as u64) as usize;
    let regions = blocks / region_blocks;
    if regions == 0 {
        report.errors += 1;
        report.problem(format!("disk of {} bytes too small", fe.capacity()));
        return report;
    }
    let mut run = Run {
        fe,
        cfg,
        report,
        region_blocks,
        regions,
        tags: vec![0u64; regions * region_blocks],
        busy: vec![false; regions],
        rng: Rng(cfg.seed.max(1)),
        pending: HashMap::new(),
        next_token: 0,
        buf: vec![0u8; BLOCK],
        stopping: false,
    };
    let mut out: Vec<Completion> = Vec::new();
    let mut last_progress = Instant::now();
    loop {
        if !run.stopping && stop() {
            run.stopping = true;
        }
        if run.stopping && run.pending.is_empty() {
            return run.report;
        }
        run.fill();
        out.clear();
        match fe.wait_completions(cfg.queue, &mut out, Duration::from_millis(100)) {
            Ok(_) => {}
            Err(e) => {
                run.report.errors += run.pending.len() as u64;
                run.report.problem(format!("waiting for completions: {e}"));
                return run.report;
            }
        }
        if out.is_empty() {
            if !run.pending.is_empty() && last_progress.elapsed() >= cfg.stall_timeout {
                run.report.errors += run.pending.len() as u64;
                run.report.problem(format!(
                    "{} request(s) unanswered for {:?}",
                    run.pending.len(),
                    cfg.stall_timeout
                ));
                return run.report;
            }
            continue;
        }
        last_progress = Instant::now();
        for c in out.drain(..) {
            run.complete(c, on_slow);
        }
    }
}

/// One verified run: what every block should hold (the tag of its last successful
/// write), which regions have a request in flight, and those requests.
struct Run<'a> {
    fe: &'a Frontend,
    cfg: &'a WorkloadConfig,
    report: WorkloadReport,
    region_blocks: usize,
    regions: usize,
    tags: Vec<u64>,
    busy: Vec<bool>,
    rng: Rng,
    pending: HashMap<u64, Pending>,
    next_token: u64,
    /// The expected content of one block, for comparing a read.
    buf: Vec<u8>,
    stopping: bool,
}

impl Run<'_> {
    /// Submits reads and writes on idle regions until `depth` are in flight.
    fn fill(&mut self) {
        let (fe, cfg) = (self.fe, self.cfg);
        while !self.stopping && self.pending.len() < cfg.depth {
            let Some(region) = (0..8)
                .map(|_| self.rng.below(self.regions))
                .find(|&r| !self.busy[r])
            else {
                break;
            };
            let len = 1 + self.rng.below(cfg.max_blocks.max(1));
            let first = region * self.region_blocks + self.rng.below(self.region_blocks - len + 1);
            let write = self.rng.below(100) < usize::from(cfg.write_percent);
            let token = self.next_token;
            self.next_token += 1;
            let offset = (first * BLOCK) as u64;
            let (op, new_tags, submitted) = if write {
                let new_tags: Vec<u64> = (0..len).map(|_| self.rng.next() | 1).collect();
                let mut data = vec![0u8; len * BLOCK];
                for (i, chunk) in data.chunks_exact_mut(BLOCK).enumerate() {
                    fill_block(chunk, (first + i) as u64, new_tags[i]);
                }
                let r = fe.submit_write(cfg.queue, offset, &data, token);
                (IoOp::Write, new_tags, r)
            } else {
                let r = fe.submit_read(cfg.queue, offset, len * BLOCK, token);
                (IoOp::Read, Vec::new(), r)
            };
            match submitted {
                Ok(()) => {
                    self.busy[region] = true;
                    self.pending.insert(
                        token,
                        Pending {
                            op,
                            region,
                            first,
                            tags: new_tags,
                            start: Instant::now(),
                            started: SystemTime::now(),
                        },
                    );
                }
                Err(Error::QueueFull { .. }) => break,
                Err(e) => {
                    self.report.errors += 1;
                    self.report
                        .problem(format!("submitting a {op:?} at {offset}: {e}"));
                    self.stopping = true;
                }
            }
        }
    }

    /// Accounts one completion: its latency, then the tags a write gave its blocks or
    /// the data a read must match.
    fn complete(&mut self, c: Completion, on_slow: &mut dyn FnMut(SlowRequest)) {
        let report = &mut self.report;
        let tags = &mut self.tags;
        let Some(p) = self.pending.remove(&c.token) else {
            report.errors += 1;
            report.problem(format!("completion of unknown token {}", c.token));
            return;
        };
        self.busy[p.region] = false;
        let latency = p.start.elapsed();
        report.max_latency = report.max_latency.max(latency);
        if latency >= self.cfg.slow {
            on_slow(SlowRequest {
                op: p.op,
                started: p.started,
                latency,
            });
        }
        let offset = p.first * BLOCK;
        match (&c.result, p.op) {
            (Err(e), op) => {
                report.errors += 1;
                report.problem(format!("{op:?} at {offset}: {e}"));
                if op == IoOp::Write {
                    for t in &mut tags[p.first..p.first + p.tags.len()] {
                        *t = UNKNOWN;
                    }
                }
            }
            (Ok(()), IoOp::Write) => {
                report.writes += 1;
                tags[p.first..p.first + p.tags.len()].copy_from_slice(&p.tags);
            }
            (Ok(()), _) => {
                report.reads += 1;
                for (i, got) in c.data.chunks(BLOCK).enumerate() {
                    let block = p.first + i;
                    let tag = tags[block];
                    if tag == UNKNOWN {
                        continue;
                    }
                    fill_block(&mut self.buf, block as u64, tag);
                    if got != &self.buf[..got.len()] {
                        report.mismatches += 1;
                        report.problem(format!(
                            "block {block} (byte {}) read back wrong",
                            block * BLOCK
                        ));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_differ_per_block_and_tag_and_tag_zero_is_zeros() {
        let (mut a, mut b) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
        fill_block(&mut a, 7, 3);
        fill_block(&mut b, 8, 3);
        assert_ne!(a, b);
        fill_block(&mut b, 7, 5);
        assert_ne!(a, b);
        fill_block(&mut b, 7, 3);
        assert_eq!(a, b);
        fill_block(&mut a, 7, 0);
        assert!(a.iter().all(|&x| x == 0));
    }
}
