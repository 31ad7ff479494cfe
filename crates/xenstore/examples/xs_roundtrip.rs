//! Round trips per second against the in-memory server over a unix socket.
//!
//! ```sh
//! cargo run --release -p xenstore --example xs_roundtrip -- [--secs N]
//! ```
//!
//! Measures, each for `--secs` seconds (default 1) and repeated `--rounds`
//! times (default 5, interleaved so background load hits all alike; the
//! median is reported with the range):
//! - baseline: a bare request/response ping-pong of the same size over a unix
//!   socket to an echo thread (the floor any xenstore round trip pays);
//! - READ and WRITE of a 64-byte value from one thread;
//! - READ from 2 threads sharing one client (requests pipelined on one
//!   connection, replies routed by req_id);
//! - a transaction (start, read, write, commit = 4 round trips) per iteration.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use xenstore::wire::{self, MsgType};
use xenstore::{XenstoreServer, XsClient, XsOps};

/// CPU time (user + system) of the whole process so far, threads that have
/// exited included, from /proc/self/stat (USER_HZ is 100 on Linux).
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // utime and stime are fields 14 and 15 of the line, i.e. the 12th and
    // 13th after the parenthesised command name.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: u64 = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

/// One measurement: operations per second, and process CPU per operation
/// (client and server threads together: the cost, whatever the load).
#[derive(Clone, Copy)]
struct Sample {
    per_sec: f64,
    cpu_us: f64,
}

fn measure(f: impl FnOnce() -> (u64, Duration)) -> Sample {
    let cpu0 = process_cpu();
    let (n, t) = f();
    let cpu = process_cpu().saturating_sub(cpu0);
    Sample {
        per_sec: n as f64 / t.as_secs_f64(),
        cpu_us: cpu.as_secs_f64() * 1e6 / n as f64,
    }
}

fn run_for(secs: Duration, mut op: impl FnMut()) -> (u64, Duration) {
    // Warm up (allocator, page faults, thread wake-up paths).
    for _ in 0..200 {
        op();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < secs {
        for _ in 0..64 {
            op();
        }
        n += 64;
    }
    (n, start.elapsed())
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1)?.parse().ok()
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs = Duration::from_secs_f64(arg(&args, "--secs").unwrap_or(1.0));
    let rounds: usize = arg(&args, "--rounds").unwrap_or(5).max(1);

    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("xenstored.sock");
    let server = XenstoreServer::default();
    server.listen_as(0, &sock).expect("listen");
    let xs = Arc::new(XsClient::connect_unix(&sock).expect("connect"));
    let path = "/local/domain/1/device/vbd/51712/state";
    let value = [b'v'; 64];
    xs.write(path, value).unwrap();

    // Baseline: the same bytes bounced by an echo thread that reads a whole
    // request and writes a whole reply, like a minimal daemon.
    let read_req = wire::encode(MsgType::Read, 1, 0, format!("{path}\0").as_bytes()).unwrap();
    let read_reply = wire::encode(MsgType::Read, 1, 0, &value).unwrap();
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let req_len = read_req.len();
    let echo = std::thread::spawn(move || {
        let mut buf = vec![0u8; req_len];
        while b.read_exact(&mut buf).is_ok() {
            if b.write_all(&read_reply).is_err() {
                break;
            }
        }
    });
    let mut rbuf = vec![0u8; wire::HEADER_LEN + value.len()];

    let names = [
        "baseline: raw unix-socket ping-pong",
        "XS_READ  (1 thread)",
        "XS_WRITE (1 thread)",
        "XS_READ  (2 threads, one connection, total)",
        "transaction: start+read+write+commit",
    ];
    let mut results: Vec<Vec<Sample>> = vec![Vec::new(); names.len()];
    for _ in 0..rounds {
        results[0].push(measure(|| {
            run_for(secs, || {
                a.write_all(&read_req).unwrap();
                a.read_exact(&mut rbuf).unwrap();
            })
        }));
        results[1].push(measure(|| run_for(secs, || drop(xs.read(path).unwrap()))));
        results[2].push(measure(|| run_for(secs, || xs.write(path, value).unwrap())));
        results[3].push(measure(|| {
            let start = Instant::now();
            let workers: Vec<_> = (0..2)
                .map(|_| {
                    let xs = xs.clone();
                    std::thread::spawn(move || run_for(secs, || drop(xs.read(path).unwrap())).0)
                })
                .collect();
            let n: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
            (n, start.elapsed())
        }));
        results[4].push(measure(|| {
            run_for(secs, || {
                xs.transaction(|tx| {
                    tx.read(path)?;
                    tx.write(path, value)
                })
                .unwrap()
            })
        }));
    }
    drop(a);
    echo.join().unwrap();

    println!(
        "{rounds} rounds x {:.1} s each; median (min..max); cpu = whole-process CPU per op",
        secs.as_secs_f64()
    );
    let mut medians = Vec::new();
    for (name, r) in names.iter().zip(results) {
        let (rate, lo, hi) = median(r.iter().map(|s| s.per_sec).collect());
        let (cpu, _, _) = median(r.iter().map(|s| s.cpu_us).collect());
        medians.push(rate);
        println!(
            "{name:<44} {rate:>9.0} ops/s {:>7.1} µs/op ({lo:.0}..{hi:.0})  cpu {cpu:>5.1} µs/op",
            1e6 / rate
        );
    }
    println!();
    println!("XS_READ / baseline  = {:.2}", medians[1] / medians[0]);
    println!("XS_WRITE / baseline = {:.2}", medians[2] / medians[0]);
    println!("transaction round trips/s (x4) = {:.0}", medians[4] * 4.0);
}
