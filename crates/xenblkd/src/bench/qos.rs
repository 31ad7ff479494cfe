//! `xenblkd bench --limit-iops N [--limit-bps N] [--neighbour]`: issue 16's QoS
//! measurement. A guest whose VBD is limited runs the benchmark's pattern for `--runtime`
//! seconds; with `--neighbour`, a second, unlimited guest on the same engine (one reactor
//! by default, so the same reactor) runs it first alone, then beside the limited one. The
//! report is the limited VBD's rate against its limit (the issue asks ±5 % over 10 s) and
//! the neighbour's throughput beside it against alone (the issue asks ≥ 0.9).

use std::sync::atomic::AtomicBool;

use anyhow::Context;
use backend::qos::{Limit, QosLimits};
use backend::{Engine, EngineConfig, QosSpec};
use serde::Serialize;

use super::measure::{measure_frontend, Measured};
use super::{open_storage, stack_options, BenchArgs, ImageFormatArg};
use crate::simstack::SimStack;

/// What the QoS run measured.
#[derive(Debug, Serialize)]
pub struct QosReport {
    pub limit_iops: u64,
    pub limit_bps: u64,
    pub runtime_s: f64,
    /// The limited VBD, beside the neighbour if there is one.
    pub limited_iops: f64,
    pub limited_bps: f64,
    /// Its rate against the limit it is held to, in percent (0: exact).
    pub limited_deviation_pct: f64,
    pub limited_throttled: u64,
    pub neighbour_alone_iops: Option<f64>,
    pub neighbour_beside_iops: Option<f64>,
    /// Beside / alone.
    pub neighbour_ratio: Option<f64>,
    pub errors: u64,
}

fn connect(args: &BenchArgs, engine: &Engine, domid: u16) -> anyhow::Result<SimStack> {
    let image = match (args.storage, &args.image) {
        (super::StorageArg::Null, _) => None,
        (super::StorageArg::File, Some(p)) => Some(p.clone()),
        (super::StorageArg::File, None) => Some(super::default_image(args.size)?),
    };
    let (storage, _) = open_storage(args, image.as_deref(), ImageFormatArg::Raw)?;
    SimStack::connect_on(storage, &stack_options(args), engine, domid)
}

fn run_for(stack: &SimStack, args: &BenchArgs) -> anyhow::Result<Measured> {
    let size = args.size.min(stack.vbd().sectors() * 512);
    measure_frontend(&stack.frontend, args, size, &AtomicBool::new(false))
}

/// Runs the measurement (see the module's comment).
pub fn run(args: &BenchArgs) -> anyhow::Result<QosReport> {
    let (limit_iops, limit_bps) = (args.limit_iops.unwrap_or(0), args.limit_bps.unwrap_or(0));
    let engine = Engine::start(EngineConfig {
        reactors: args.reactors,
    })
    .context("starting the engine")?;
    let limited = connect(args, &engine, 1)?;
    limited.vbd().set_qos(&QosSpec {
        limits: QosLimits {
            iops: Limit::rate(limit_iops),
            bps: Limit::rate(limit_bps),
            ..QosLimits::default()
        },
        group: None,
    });
    let neighbour = args
        .neighbour
        .then(|| connect(args, &engine, 2))
        .transpose()?;
    let alone = neighbour.as_ref().map(|n| run_for(n, args)).transpose()?;
    let (lim, beside) = std::thread::scope(|s| {
        let n = neighbour.as_ref().map(|n| s.spawn(|| run_for(n, args)));
        let lim = run_for(&limited, args);
        let beside = n.map(|h| {
            h.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("driver panicked")))
        });
        (lim, beside.transpose())
    });
    let (lim, beside) = (lim?, beside?);
    let throttled = limited.vbd().stats().total.throttled;
    limited.teardown()?;
    if let Some(n) = neighbour {
        n.teardown()?;
    }
    engine.shutdown();
    let secs = lim.elapsed.as_secs_f64();
    let bps = lim.bytes as f64 / secs;
    // The limit the VBD is held to: the tighter of the two for this block size.
    let deviation = match (limit_iops, limit_bps) {
        (0, 0) => 0.0,
        (i, 0) => (lim.iops / i as f64 - 1.0) * 100.0,
        (0, b) => (bps / b as f64 - 1.0) * 100.0,
        (i, b) => {
            let held = (i as f64).min(b as f64 / args.bs as f64);
            (lim.iops / held - 1.0) * 100.0
        }
    };
    let ratio = match (&alone, &beside) {
        (Some(a), Some(b)) if a.iops > 0.0 => Some(b.iops / a.iops),
        _ => None,
    };
    Ok(QosReport {
        limit_iops,
        limit_bps,
        runtime_s: secs,
        limited_iops: lim.iops,
        limited_bps: bps,
        limited_deviation_pct: deviation,
        limited_throttled: throttled,
        neighbour_alone_iops: alone.as_ref().map(|a| a.iops),
        neighbour_beside_iops: beside.as_ref().map(|b| b.iops),
        neighbour_ratio: ratio,
        errors: lim.errors
            + alone.as_ref().map_or(0, |a| a.errors)
            + beside.as_ref().map_or(0, |b| b.errors),
    })
}

/// The report for a person.
pub fn print_text(r: &QosReport) {
    println!(
        "limited VBD: {:.0} IOPS, {:.1} MiB/s over {:.1} s (limits: iops {}, bps {}); {:+.2} % \
         from its limit, {} request(s) held",
        r.limited_iops,
        r.limited_bps / super::MIB,
        r.runtime_s,
        r.limit_iops,
        r.limit_bps,
        r.limited_deviation_pct,
        r.limited_throttled
    );
    if let (Some(a), Some(b), Some(ratio)) = (
        r.neighbour_alone_iops,
        r.neighbour_beside_iops,
        r.neighbour_ratio,
    ) {
        println!(
            "unlimited neighbour on the same reactor: {a:.0} IOPS alone, {b:.0} IOPS beside \
             it (ratio {ratio:.3})"
        );
    }
    if r.errors > 0 {
        println!("errors: {}", r.errors);
    }
}
