//! A simulated guest in its own process, for multi-process tests of `xenblkd serve`: a
//! `platform::sim` guest attached over the daemon's `--sim-socket`, running the simulated
//! xen-blkfront over xenstore (its own domain's socket of `xenblkd xenstored`), then a
//! script of steps. Each step prints one line on stdout (`ok <step> ...` or
//! `err <step>: ...`), so a test can follow and synchronise with it; the attach to the
//! simulated hypervisor comes first and prints `ok attach ms=N` (how long it took).
//!
//! Steps (comma separated): `connect`, `io:N` (N verified write/read-back rounds),
//! `flush`, `discard`, `writes:N` / `reads:N` (N one-page requests, at pages 0..N),
//! `expect-read-error` (a write succeeds, a read fails), `expect-write-error`, `ro-check` (the disk is read-only: reads work, a write fails), `loop` (verified I/O until the backend goes away; ends `ok loop`),
//! `close` (guest-initiated, checks every grant came back), `reconnect`, `wait-close`
//! (until the backend closes the device), `wait-capacity:BYTES` (until an online resize
//! reached the frontend), `wait-file:PATH` (until the test creates PATH),
//! `sleep:MS`, `rw-until:PATH` (the verified random read/write workload of
//! `blkfront::workload` on every disk at once until the test creates PATH; prints a
//! `slow ...` line for each request slower than `--slow-ms` and ends with its counts,
//! the backend state changes it saw and its own descriptors and mappings before and
//! after), `bench-until:PATH` (the unverified fixed-depth load of `blkfront::load` on
//! every disk at once, `--depth` requests of `--bench-bs` bytes in flight per disk, until
//! PATH appears; prints `ok bench-until ops=N,N,... errors=0 secs=S,S,...`, per disk in
//! `--devid` order, and fails, with the same counts, if any request failed),
//! `bench-bs:BYTES` (the request size of the `bench-until` steps after it), `expect-zeros`
//! (a write succeeds and the same range reads back as zeros: a null disk).
//!
//! Several `--devid`s make a guest with several disks: `connect` and `close` take them
//! all, `rw-until` runs on all, the other steps use the first. With `--reattach` the
//! guest outlives its backend process: when the daemon dies (or hands over) the guest
//! releases what it held, as Xen does, and attaches to the next daemon on the same
//! socket, its frontends untouched (`platform::sim::Reattacher`).

#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{bail, Context};
use blkfront::load::{self, LoadConfig};
use blkfront::sim::SimGuestServices;
use blkfront::workload::{self, WorkloadConfig, WorkloadReport};
use blkfront::{FlushPreference, FrontendConfig, Protocol, XenbusFrontend, XenbusState};
use clap::Parser;
use platform::sim::{GuestConfig, Reattacher, SimGuest};
use xenstore::XsClient;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ProtocolArg {
    /// Write no `protocol` node (the backend must assume native).
    None,
    Native,
    X86_32,
    X86_64,
}

#[derive(Debug, Parser)]
#[command(
    name = "xenblkd-sim-guest",
    about = "A simulated Xen guest running blkfront, for tests"
)]
struct Args {
    /// The guest's own socket of `xenblkd xenstored`.
    #[arg(long)]
    xenstore_socket: PathBuf,
    /// The daemon's `--sim-socket`.
    #[arg(long)]
    sim_socket: PathBuf,
    #[arg(long)]
    domid: u16,
    /// Virtual device number (51712 = xvda); several, comma separated or repeated, for
    /// a guest with several disks.
    #[arg(long, default_value = "51712", value_delimiter = ',')]
    devid: Vec<u32>,
    /// Outlive the daemon: attach to the next one when it dies or hands over.
    #[arg(long)]
    reattach: bool,
    /// Requests in flight per disk in `rw-until` and `bench-until`.
    #[arg(long, default_value_t = 8)]
    depth: usize,
    /// Bytes per request in `bench-until`.
    #[arg(long, default_value_t = 4096)]
    bench_bs: usize,
    /// Share of writes in `bench-until`, 0..=100.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    bench_write_percent: u8,
    /// How long `connect` waits for each backend (Linux blkfront waits for ever; a daemon
    /// setting up a thousand disks at once takes longer than the default).
    #[arg(long, default_value_t = 15)]
    connect_timeout_secs: u64,
    /// How long `wait-file` waits.
    #[arg(long, default_value_t = 30)]
    wait_secs: u64,
    /// `rw-until` reports requests slower than this.
    #[arg(long, default_value_t = 50)]
    slow_ms: u64,
    /// Guest memory in 4 KiB pages.
    #[arg(long, default_value_t = 4096)]
    pages: u32,
    #[arg(long, value_enum, default_value = "x86-64")]
    protocol: ProtocolArg,
    #[arg(long, default_value_t = 1)]
    max_queues: u32,
    #[arg(long, default_value_t = 0)]
    max_ring_order: u32,
    #[arg(long, action = clap::ArgAction::Set, default_value_t = true)]
    persistent: bool,
    /// 0 disables indirect requests.
    #[arg(long, default_value_t = 32)]
    max_indirect_segments: u32,
    /// Use BLKIF_OP_WRITE_BARRIER for flushes when offered.
    #[arg(long)]
    barrier: bool,
    /// Send writes to a read-only disk anyway (to test the backend's refusal).
    #[arg(long)]
    no_honour_read_only: bool,
    /// The script.
    #[arg(long, default_value = "connect,io:16,close")]
    script: String,
    /// Seed of the data patterns.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// A raw file that receives every write (and zeros for every discard) the guest makes,
    /// so a test can compare the backend's image with it (`qemu-img compare`).
    #[arg(long)]
    mirror: Option<PathBuf>,
}

/// A small deterministic generator (xorshift64*), so data is reproducible per seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

struct Guest {
    args: Args,
    services: Arc<SimGuestServices>,
    xenbus: Vec<XenbusFrontend>,
    reattacher: Option<Reattacher>,
    rng: Rng,
    ops: u64,
}

impl Guest {
    fn frontend_path(&self, devid: u32) -> String {
        format!("/local/domain/{}/device/vbd/{}", self.args.domid, devid)
    }

    fn config(&self) -> FrontendConfig {
        let a = &self.args;
        let (protocol, write_protocol) = match a.protocol {
            ProtocolArg::None => (Protocol::Native, false),
            ProtocolArg::Native => (Protocol::Native, true),
            ProtocolArg::X86_32 => (Protocol::X86_32, true),
            ProtocolArg::X86_64 => (Protocol::X86_64, true),
        };
        FrontendConfig {
            protocol,
            write_protocol,
            max_queues: a.max_queues,
            max_ring_order: a.max_ring_order,
            persistent: a.persistent,
            max_indirect_segments: a.max_indirect_segments,
            flush: if a.barrier {
                FlushPreference::PreferBarrier
            } else {
                FlushPreference::PreferFlush
            },
            connect_timeout: Duration::from_secs(a.connect_timeout_secs),
            honour_read_only: !a.no_honour_read_only,
            ..FrontendConfig::default()
        }
    }

    fn frontend(&self) -> anyhow::Result<Arc<blkfront::Frontend>> {
        self.xenbus
            .first()
            .and_then(|x| x.frontend().cloned())
            .context("not connected")
    }

    /// One verified round: write a pattern at a random place, read it back, compare.
    fn io_round(&mut self) -> anyhow::Result<()> {
        let fe = self.frontend()?;
        let sector = fe.disk().sector_size.max(512) as u64;
        let capacity = fe.capacity();
        let max_len = (fe.max_request_bytes() as u64 * 2).clamp(sector, 256 << 10);
        let len = (self.rng.next() % (max_len / sector) + 1) * sector;
        if capacity < len {
            bail!("disk of {capacity} bytes too small");
        }
        let offset = (self.rng.next() % ((capacity - len) / sector + 1)) * sector;
        let tag = self.rng.next();
        let data: Vec<u8> = (0..len as usize)
            .map(|i| ((i as u64).wrapping_mul(0x9e37_79b9).wrapping_add(tag) >> 7) as u8)
            .collect();
        fe.write(offset, &data)
            .with_context(|| format!("write {len} at {offset}"))?;
        self.mirror(offset, &data)?;
        let mut back = vec![0u8; len as usize];
        fe.read(offset, &mut back)
            .with_context(|| format!("read {len} at {offset}"))?;
        if back != data {
            bail!("data mismatch: {len} bytes at {offset}");
        }
        self.ops += 1;
        Ok(())
    }

    /// Applies a completed write to the `--mirror` file.
    fn mirror(&self, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        if let Some(path) = &self.args.mirror {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .with_context(|| format!("opening the mirror {}", path.display()))?;
            std::os::unix::fs::FileExt::write_all_at(&f, data, offset)
                .context("writing the mirror")?;
        }
        Ok(())
    }

    /// The `rw-until:PATH` step: see the module documentation.
    fn rw_until(&mut self, stop_file: PathBuf) -> anyhow::Result<String> {
        if self.xenbus.is_empty() {
            bail!("not connected");
        }
        // Every state node of every disk, both ends: after the event each watch fires
        // when it is set, any event is a write the restarts should never make.
        let xs = Arc::new(
            XsClient::connect_unix(&self.args.xenstore_socket)
                .context("connecting to xenstored")?,
        );
        let mut tokens = HashSet::new();
        for xb in &self.xenbus {
            for dir in [xb.backend_path(), xb.frontend_path()] {
                let path = format!("{dir}/state");
                xs.watch(&path, &path).context("watching a state node")?;
                tokens.insert(path);
            }
        }
        let events = xs.watch_events();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut initial = HashSet::new();
        while initial.len() < tokens.len() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let ev = events
                .recv_timeout(left)
                .map_err(|_| anyhow::anyhow!("no initial watch event for every state node"))?;
            initial.insert(ev.token);
        }
        let state_events = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = {
            let (state_events, stop) = (state_events.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    if let Ok(ev) = events.recv_timeout(Duration::from_millis(100)) {
                        state_events.fetch_add(1, Ordering::AcqRel);
                        println!("state-event {}", ev.path);
                    }
                }
            })
        };
        let before = (count_fds(), count_maps());
        let workers: Vec<_> = self
            .xenbus
            .iter()
            .zip(self.args.devid.iter().copied())
            .map(|(xb, devid)| {
                let fe = xb.frontend().cloned().context("not connected")?;
                let cfg = WorkloadConfig {
                    depth: self.args.depth,
                    seed: self.args.seed ^ u64::from(devid) << 20,
                    slow: Duration::from_millis(self.args.slow_ms),
                    ..WorkloadConfig::default()
                };
                let stop_file = stop_file.clone();
                Ok(std::thread::spawn(move || {
                    let mut checked = std::time::Instant::now();
                    let mut stop = || {
                        if checked.elapsed() < Duration::from_millis(20) {
                            return false;
                        }
                        checked = std::time::Instant::now();
                        stop_file.exists()
                    };
                    workload::run_verified(&fe, &cfg, &mut stop, &mut |slow| {
                        let start_ms = slow
                            .started
                            .duration_since(UNIX_EPOCH)
                            .unwrap_or_default()
                            .as_millis();
                        println!(
                            "slow devid={devid} op={:?} start_ms={start_ms} ms={}",
                            slow.op,
                            slow.latency.as_millis()
                        );
                    })
                }))
            })
            .collect::<anyhow::Result<_>>()?;
        let mut total = WorkloadReport::default();
        for w in workers {
            let r = w
                .join()
                .map_err(|_| anyhow::anyhow!("workload thread panicked"))?;
            total.reads += r.reads;
            total.writes += r.writes;
            total.errors += r.errors;
            total.mismatches += r.mismatches;
            total.max_latency = total.max_latency.max(r.max_latency);
            if total.first_problem.is_none() {
                total.first_problem = r.first_problem;
            }
        }
        let after = (count_fds(), count_maps());
        stop.store(true, Ordering::Release);
        let _ = watcher.join();
        let (deaths, reattaches, pins) = self.reattacher.as_ref().map_or((0, 0, 0), |r| {
            let s = r.stats();
            (s.deaths(), s.reattaches(), s.pins_released())
        });
        let summary = format!(
            "reads={} writes={} errors={} mismatches={} state_events={} max_ms={} deaths={deaths} reattaches={reattaches} pins_released={pins} fds={}/{} maps={}/{}",
            total.reads,
            total.writes,
            total.errors,
            total.mismatches,
            state_events.load(Ordering::Acquire),
            total.max_latency.as_millis(),
            before.0,
            after.0,
            before.1,
            after.1,
        );
        if let Some(problem) = total.first_problem {
            bail!("{summary}: {problem}");
        }
        Ok(summary)
    }

    /// The `bench-until:PATH` step: see the module documentation.
    fn bench_until(&self, stop_file: PathBuf) -> anyhow::Result<String> {
        if self.xenbus.is_empty() {
            bail!("not connected");
        }
        let workers: Vec<_> = self
            .xenbus
            .iter()
            .zip(self.args.devid.iter().copied())
            .map(|(xb, devid)| {
                let fe = xb.frontend().cloned().context("not connected")?;
                let cfg = LoadConfig {
                    depth: self.args.depth,
                    block_size: self.args.bench_bs,
                    write_percent: self.args.bench_write_percent,
                    seed: self.args.seed ^ u64::from(devid) << 20,
                    ..LoadConfig::default()
                };
                let stop_file = stop_file.clone();
                Ok(std::thread::spawn(move || {
                    let mut checked = std::time::Instant::now();
                    let mut stop = || {
                        if checked.elapsed() < Duration::from_millis(20) {
                            return false;
                        }
                        checked = std::time::Instant::now();
                        stop_file.exists()
                    };
                    load::run_load(&fe, &cfg, &mut stop)
                }))
            })
            .collect::<anyhow::Result<_>>()?;
        let mut reports = Vec::new();
        for w in workers {
            reports.push(
                w.join()
                    .map_err(|_| anyhow::anyhow!("load thread panicked"))?,
            );
        }
        let list = |f: &dyn Fn(&load::LoadReport) -> String| {
            reports.iter().map(f).collect::<Vec<_>>().join(",")
        };
        let errors: u64 = reports.iter().map(|r| r.errors).sum();
        let summary = format!(
            "ops={} errors={errors} secs={}",
            list(&|r| r.ops().to_string()),
            list(&|r| format!("{:.3}", r.elapsed.as_secs_f64())),
        );
        if let Some(problem) = reports.iter().find_map(|r| r.first_problem.as_ref()) {
            bail!("{summary}: {problem}");
        }
        Ok(summary)
    }

    fn step(&mut self, step: &str) -> anyhow::Result<String> {
        let (name, arg) = step.split_once(':').unwrap_or((step, ""));
        match name {
            "connect" => {
                // A device the backend closed in an earlier session is still Closed when
                // blkfront writes Initialising; see `reconnect` below.
                for devid in self.args.devid.clone() {
                    let mut attempt = 0;
                    let xb = loop {
                        let xs = XsClient::connect_unix(&self.args.xenstore_socket)
                            .context("connecting to xenstored")?;
                        let services: Arc<dyn blkfront::Guest> = self.services.clone();
                        match XenbusFrontend::connect(
                            services,
                            self.config(),
                            xs,
                            &self.frontend_path(devid),
                        ) {
                            Ok(xb) => break xb,
                            Err(e)
                                if attempt < 50 && e.to_string().contains("backend is Closed") =>
                            {
                                attempt += 1;
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            Err(e) => {
                                return Err(anyhow::Error::from(e)
                                    .context(format!("xenbus handshake of {devid}")))
                            }
                        }
                    };
                    self.xenbus.push(xb);
                }
                let fe = self.frontend()?;
                let n = fe.negotiated();
                Ok(format!(
                    "queues={} order={} persistent={} indirect={} capacity={} sector={}",
                    fe.num_queues(),
                    n.ring_order,
                    u8::from(n.persistent),
                    n.max_indirect_segments,
                    fe.capacity(),
                    fe.disk().sector_size
                ))
            }
            "io" => {
                let n: u64 = arg.parse().context("io:N")?;
                for _ in 0..n {
                    self.io_round()?;
                }
                Ok(format!("{n}"))
            }
            "expect-read-error" => {
                // A write beside it must still succeed: a storage fault fails only its own
                // requests.
                let fe = self.frontend()?;
                let data = vec![0x5au8; 4096];
                fe.write(0, &data)
                    .context("the write beside the failing read")?;
                let mut buf = vec![0u8; 4096];
                match fe.read(0, &mut buf) {
                    Ok(()) => bail!("the read succeeded"),
                    Err(e) => Ok(format!("read failed: {e}")),
                }
            }
            "expect-write-error" => {
                let data = vec![0xa5u8; 4096];
                match self.frontend()?.write(0, &data) {
                    Ok(()) => bail!("the write succeeded"),
                    Err(e) => Ok(format!("write failed: {e}")),
                }
            }
            "flush" => {
                self.frontend()?.flush()?;
                Ok(String::new())
            }
            // Exactly N requests of one page each, at pages 0..N (counters a test checks).
            "writes" | "reads" => {
                let n: u64 = arg.parse().with_context(|| format!("{name}:N"))?;
                let fe = self.frontend()?;
                let mut page = vec![0u8; 4096];
                for i in 0..n {
                    if name == "writes" {
                        page.fill(i as u8);
                        fe.write(i * 4096, &page)?;
                        self.mirror(i * 4096, &page)?;
                    } else {
                        fe.read(i * 4096, &mut page)?;
                    }
                }
                Ok(format!("{n}"))
            }
            "discard" => {
                let fe = self.frontend()?;
                let secure = false;
                fe.discard(0, 1 << 20, secure)?;
                // What a discard leaves is unspecified, except where the backend says it
                // reads back as zeros (file punch holes, qcow2): the mirror follows the disk.
                let mut back = vec![0u8; 1 << 20];
                fe.read(0, &mut back)?;
                self.mirror(0, &back)?;
                Ok(String::new())
            }
            "loop" => {
                let err = loop {
                    if let Err(e) = self.io_round() {
                        break e;
                    }
                    if self.ops.is_multiple_of(64) {
                        println!("progress {}", self.ops);
                    }
                };
                Ok(format!("after {} verified rounds: {err:#}", self.ops))
            }
            "close" => {
                if self.xenbus.is_empty() {
                    bail!("not connected");
                }
                let mut ended = 0;
                for xb in &mut self.xenbus {
                    let report = xb.close()?;
                    if !report.is_clean() {
                        bail!("grants still mapped by the backend after close: {report:?}");
                    }
                    ended += report.grants_ended;
                }
                Ok(format!("grants_ended={ended}"))
            }
            "rw-until" => self.rw_until(PathBuf::from(arg)),
            "bench-until" => self.bench_until(PathBuf::from(arg)),
            "bench-bs" => {
                self.args.bench_bs = arg.parse().context("bench-bs:BYTES")?;
                Ok(String::new())
            }
            "expect-zeros" => {
                let fe = self.frontend()?;
                let data = vec![0x5au8; 64 << 10];
                fe.write(4096, &data).context("writing")?;
                let mut back = vec![0xffu8; data.len()];
                fe.read(4096, &mut back).context("reading back")?;
                if let Some(i) = back.iter().position(|&b| b != 0) {
                    bail!("byte {} reads {:#x}, not 0", 4096 + i, back[i]);
                }
                Ok(format!("bytes={}", data.len()))
            }
            "reconnect" => {
                let xb = self.xenbus.first_mut().context("not connected")?;
                // blkfront's handshake treats a backend still Closed right after it wrote
                // Initialising as final, but blkback (and xenblkd) only leave Closed when
                // they see that Initialising: give the backend a moment and retry.
                let mut attempt = 0;
                loop {
                    match xb.reconnect() {
                        Ok(()) => break,
                        Err(e) if attempt < 50 && e.to_string().contains("backend is Closed") => {
                            attempt += 1;
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(format!("capacity={}", self.frontend()?.capacity()))
            }
            "wait-close" => {
                let xb = self.xenbus.first().context("not connected")?;
                xb.wait_backend_state(XenbusState::Closed, Duration::from_secs(15))?;
                let report = xb.take_teardown_report().unwrap_or_default();
                if !report.is_clean() {
                    bail!("grants still mapped after the backend closed: {report:?}");
                }
                Ok(String::new())
            }
            "ro-check" => {
                let fe = self.frontend()?;
                if !fe.disk().read_only() {
                    bail!(
                        "the backend did not report the disk read-only (info {})",
                        fe.disk().info
                    );
                }
                let mut buf = vec![0u8; 4096];
                fe.read(0, &mut buf).context("reading a read-only disk")?;
                match fe.write(0, &buf) {
                    Ok(()) => bail!("a write to a read-only disk succeeded"),
                    Err(e) => Ok(format!("write refused: {e}")),
                }
            }
            "wait-capacity" => {
                let want: u64 = arg.parse().context("wait-capacity:BYTES")?;
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                let fe = self.frontend()?;
                while fe.capacity() != want {
                    if std::time::Instant::now() >= deadline {
                        bail!("capacity stayed {} (waiting for {want})", fe.capacity());
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(format!("{want}"))
            }
            "wait-file" => {
                let deadline = std::time::Instant::now() + Duration::from_secs(self.args.wait_secs);
                while !std::path::Path::new(arg).exists() {
                    if std::time::Instant::now() >= deadline {
                        bail!("{arg} did not appear");
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(String::new())
            }
            "sleep" => {
                std::thread::sleep(Duration::from_millis(arg.parse().context("sleep:MS")?));
                Ok(String::new())
            }
            other => bail!("unknown step {other:?}"),
        }
    }
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let attach_start = std::time::Instant::now();
    let sim = SimGuest::connect(
        &args.sim_socket,
        args.domid,
        GuestConfig {
            pages: args.pages,
            grant_entries: 16 * 512,
        },
    )
    .context("attaching to the simulated hypervisor")?;
    println!("ok attach ms={}", attach_start.elapsed().as_millis());
    let sim = Arc::new(sim);
    let reattacher = if args.reattach {
        Some(
            Reattacher::spawn(&sim, args.sim_socket.clone())
                .context("spawning the reattach thread")?,
        )
    } else {
        None
    };
    let services = Arc::new(SimGuestServices::new(sim));
    let script: Vec<String> = args
        .script
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    let seed = args.seed;
    let mut guest = Guest {
        args,
        services,
        xenbus: Vec::new(),
        reattacher,
        rng: Rng(seed.max(1)),
        ops: 0,
    };
    for step in &script {
        match guest.step(step) {
            Ok(detail) => println!("ok {step} {detail}"),
            Err(e) => {
                println!("err {step}: {e:#}");
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

fn count_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Mappings of the guest's own memory and grant table (ring views and the like): thread
/// stacks and malloc arenas come and go with the workload's threads and say nothing.
fn count_maps() -> usize {
    std::fs::read_to_string("/proc/self/maps").map_or(0, |m| {
        m.lines()
            .filter(|l| l.contains("memfd:xenblkd-sim-"))
            .count()
    })
}
