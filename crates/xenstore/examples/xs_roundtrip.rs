//! Round trips per second against the in-memory server over a unix socket.
//!
//! ```sh
//! cargo run --release -p xenstore --example xs_roundtrip -- [--secs N]
//! ```
//!
//! Measures, each for `--secs` seconds (default 2):
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

fn rate(name: &str, ops: u64, elapsed: Duration) -> f64 {
    let per_sec = ops as f64 / elapsed.as_secs_f64();
    println!(
        "{name:<44} {per_sec:>12.0} ops/s  {:>8.2} µs/op  ({ops} ops)",
        1e6 / per_sec
    );
    per_sec
}

fn run_for(secs: Duration, mut op: impl FnMut()) -> (u64, Duration) {
    // Warm up (allocator, page faults, thread wake-up paths).
    for _ in 0..1000 {
        op();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < secs {
        for _ in 0..256 {
            op();
        }
        n += 256;
    }
    (n, start.elapsed())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let secs = args
        .iter()
        .position(|a| a == "--secs")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(2.0);
    let secs = Duration::from_secs_f64(secs);

    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("xenstored.sock");
    let server = XenstoreServer::default();
    server.listen_as(0, &sock).expect("listen");

    let value = [b'v'; 64];
    let read_req = wire::encode(MsgType::Read, 1, 0, b"/local/domain/1/device/vbd/51712/state\0").unwrap();
    let mut read_reply = wire::encode(MsgType::Read, 1, 0, &value).unwrap();

    // Baseline: the same bytes bounced by an echo thread that reads a whole
    // request and writes a whole reply, like a minimal daemon.
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let req_len = read_req.len();
    let reply = std::mem::take(&mut read_reply);
    let echo = std::thread::spawn(move || {
        let mut buf = vec![0u8; req_len];
        while b.read_exact(&mut buf).is_ok() {
            if b.write_all(&reply).is_err() {
                break;
            }
        }
    });
    let mut rbuf = vec![0u8; 16 + value.len()];
    let (n, t) = run_for(secs, || {
        a.write_all(&read_req).unwrap();
        a.read_exact(&mut rbuf).unwrap();
    });
    let baseline = rate("baseline: raw unix-socket ping-pong", n, t);
    drop(a);
    echo.join().unwrap();

    let xs = Arc::new(XsClient::connect_unix(&sock).expect("connect"));
    let path = "/local/domain/1/device/vbd/51712/state";
    xs.write(path, value).unwrap();

    let (n, t) = run_for(secs, || {
        xs.read(path).unwrap();
    });
    let read = rate("XS_READ  (1 thread)", n, t);

    let (n, t) = run_for(secs, || {
        xs.write(path, value).unwrap();
    });
    let write = rate("XS_WRITE (1 thread)", n, t);

    // Two threads on one client: total rate.
    let start = Instant::now();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let xs = xs.clone();
            std::thread::spawn(move || run_for(secs, || drop(xs.read(path).unwrap())).0)
        })
        .collect();
    let n: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
    let read2 = rate("XS_READ  (2 threads, one connection)", n, start.elapsed());

    let (n, t) = run_for(secs, || {
        xs.transaction(|tx| {
            tx.read(path)?;
            tx.write(path, value)
        })
        .unwrap();
    });
    let txs = rate("transaction start+read+write+commit", n, t);

    println!();
    println!("READ / baseline = {:.2}", read / baseline);
    println!("WRITE / baseline = {:.2}", write / baseline);
    println!("2-thread READ / 1-thread READ = {:.2}", read2 / read);
    println!("transactions/s x 4 round trips = {:.0} round trips/s", txs * 4.0);
}
