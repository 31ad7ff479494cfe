//! A simulated guest in its own process, for multi-process tests of `xenblkd serve`: a
//! `platform::sim` guest attached over the daemon's `--sim-socket`, running the simulated
//! xen-blkfront over xenstore (its own domain's socket of `xenblkd xenstored`), then a
//! script of steps. Each step prints one line on stdout (`ok <step> ...` or
//! `err <step>: ...`), so a test can follow and synchronise with it; the attach to the
//! simulated hypervisor comes first and prints `ok attach ms=N` (how long it took).
//!
//! Steps (comma separated): `connect`, `io:N` (N verified write/read-back rounds),
//! `flush`, `discard`, `expect-read-error` (a write succeeds, a read fails), `expect-write-error`, `ro-check` (the disk is read-only: reads work, a write fails), `loop` (verified I/O until the backend goes away; ends `ok loop`),
//! `close` (guest-initiated, checks every grant came back), `reconnect`, `wait-close`
//! (until the backend closes the device), `wait-capacity:BYTES` (until an online resize
//! reached the frontend), `wait-file:PATH` (until the test creates PATH),
//! `sleep:MS`.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use blkfront::sim::SimGuestServices;
use blkfront::{FlushPreference, FrontendConfig, Protocol, XenbusFrontend, XenbusState};
use clap::Parser;
use platform::sim::{GuestConfig, SimGuest};
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
    /// Virtual device number (51712 = xvda).
    #[arg(long, default_value_t = 51712)]
    devid: u32,
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
    xenbus: Option<XenbusFrontend>,
    rng: Rng,
    ops: u64,
}

impl Guest {
    fn frontend_path(&self) -> String {
        format!(
            "/local/domain/{}/device/vbd/{}",
            self.args.domid, self.args.devid
        )
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
            connect_timeout: Duration::from_secs(15),
            honour_read_only: !a.no_honour_read_only,
            ..FrontendConfig::default()
        }
    }

    fn frontend(&self) -> anyhow::Result<Arc<blkfront::Frontend>> {
        self.xenbus
            .as_ref()
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

    fn step(&mut self, step: &str) -> anyhow::Result<String> {
        let (name, arg) = step.split_once(':').unwrap_or((step, ""));
        match name {
            "connect" => {
                // A device the backend closed in an earlier session is still Closed when
                // blkfront writes Initialising; see `reconnect` below.
                let mut attempt = 0;
                let xb = loop {
                    let xs = XsClient::connect_unix(&self.args.xenstore_socket)
                        .context("connecting to xenstored")?;
                    let services: Arc<dyn blkfront::Guest> = self.services.clone();
                    match XenbusFrontend::connect(
                        services,
                        self.config(),
                        xs,
                        &self.frontend_path(),
                    ) {
                        Ok(xb) => break xb,
                        Err(e) if attempt < 50 && e.to_string().contains("backend is Closed") => {
                            attempt += 1;
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => return Err(anyhow::Error::from(e).context("xenbus handshake")),
                    }
                };
                self.xenbus = Some(xb);
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
                let xb = self.xenbus.as_mut().context("not connected")?;
                let report = xb.close()?;
                if !report.is_clean() {
                    bail!("grants still mapped by the backend after close: {report:?}");
                }
                Ok(format!("grants_ended={}", report.grants_ended))
            }
            "reconnect" => {
                let xb = self.xenbus.as_mut().context("not connected")?;
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
                let xb = self.xenbus.as_ref().context("not connected")?;
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
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
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
    let services = Arc::new(SimGuestServices::new(Arc::new(sim)));
    let script: Vec<String> = args
        .script
        .split(',')
        .map(|s| s.trim().to_string())
        .collect();
    let seed = args.seed;
    let mut guest = Guest {
        args,
        services,
        xenbus: None,
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
