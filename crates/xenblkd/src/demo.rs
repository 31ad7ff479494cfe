//! `xenblkd demo`: the whole system on one machine, no Xen needed.
//!
//! It starts the in-memory xenstored, the daemon's xenbus manager and engine on the
//! simulated platform, and a simulated guest whose xen-blkfront negotiates over xenstore
//! exactly as Linux's does. A toolstack step writes the disk's nodes as `xenblkd attach`
//! would; the guest then writes a data set, reads it back and verifies it, flushes,
//! discards, runs a short benchmark, and everything is torn down with a leak check.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use blkfront::sim::SimGuestServices;
use blkfront::{FrontendConfig, XenbusFrontend};
use indicatif::{ProgressBar, ProgressStyle};
use platform::sim::{GuestConfig, SimGuest, SimPlatform};
use platform::GrantMapper;
use xenbus::config::XENBLKD_BACKEND_TYPE;
use xenbus::toolstack::{self, DiskSpec, Removal};
use xenbus::xs::XsStore;
use xenstore::{ClientConfig, ServerConfig, Transport, XenstoreServer, XsClient};

use crate::bench::{self, BenchArgs, Rw};
use crate::simhost::{create_domain, Daemon};

const GUEST_DOMID: u32 = 1;
/// xvda.
const DEVID: u32 = 51712;
const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Disk image, block device or NBD export URI; default: a sparse image the demo
    /// creates.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Format of `--image`.
    #[arg(long, value_enum, default_value = "auto")]
    pub format: bench::ImageFormatArg,
    /// Size of the default image.
    #[arg(long, default_value = "1G", value_parser = bench::parse_size)]
    pub size: u64,
    /// Bytes of data to write and verify.
    #[arg(long, default_value = "256M", value_parser = bench::parse_size)]
    pub data: u64,
    /// Seconds for each benchmark phase.
    #[arg(long, default_value_t = 3.0)]
    pub bench_secs: f64,
    /// Queues the guest asks for.
    #[arg(long, default_value_t = 2)]
    pub queues: u32,
}

/// The demo's default image: sparse, created on first use.
fn default_image(size: u64) -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from("/var/tmp/xenblkd");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("demo-disk.img");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    if file.metadata()?.len() != size {
        file.set_len(size)
            .with_context(|| format!("sizing {}", path.display()))?;
    }
    Ok(path)
}

/// The content of 4 KiB block `block` at write generation `generation` (0 = the
/// sequential pass): derivable, so verification needs no copy of the data set.
fn fill_block(block: u64, generation: u64, out: &mut [u8]) {
    let mut x = block
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(generation.wrapping_mul(0xD1B5_4A32_D192_ED03))
        | 1;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "  {msg:<24} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    ensure!(args.data >= MIB, "--data must be at least 1 MiB");
    let image = match &args.image {
        Some(p) => p.clone(),
        None => default_image(args.size)?,
    };
    // Open the storage as the daemon will, so that a missing or unusable image is
    // reported with its path and the OS error, not as a guest that failed to connect.
    let is_uri = image
        .to_str()
        .is_some_and(|s| s.contains("://") || storage::rbd::is_rbd_target(s));
    let image_abs = if is_uri {
        image.clone()
    } else {
        std::fs::canonicalize(&image).with_context(|| format!("opening {}", image.display()))?
    };
    // What an xl disk line's `target=qcow2:/img` becomes in `params`.
    let prefix = if is_uri {
        ""
    } else {
        match args.format.resolve(&image_abs)? {
            bench::ImageFormatArg::Qcow2 => "qcow2:",
            _ => "",
        }
    };
    crate::attach::check_target(&format!("{prefix}{}", image_abs.display()), true, false)?;
    println!("xenblkd demo: a simulated Xen guest's blkfront against xenblkd, no Xen needed");
    println!("  image: {}", image.display());

    // The host: xenstored, the hypervisor, the daemon.
    let server = XenstoreServer::new(ServerConfig::default());
    let dom0 = XsClient::new(
        Transport::Unix(server.connect_as(0)?),
        ClientConfig::default(),
    )?;
    create_domain(&dom0, &server, GUEST_DOMID)?;
    let platform = SimPlatform::new();
    let guest = Arc::new(
        SimGuest::new(
            GUEST_DOMID as u16,
            GuestConfig {
                pages: 32768,
                grant_entries: 64 * 1024,
            },
        )
        .context("creating the simulated guest")?,
    );
    let domain = platform
        .attach_local(&guest)
        .context("attaching the guest")?;
    let daemon = Daemon::start(&server, Arc::new(platform.clone()))?;

    // The toolstack: what `xenblkd attach` writes, then wait for InitWait.
    let store = XsStore::new(Arc::new(dom0));
    let spec = DiskSpec::new(
        XENBLKD_BACKEND_TYPE,
        GUEST_DOMID,
        DEVID,
        &format!("{prefix}{}", image_abs.display()),
    );
    toolstack::attach_disk(&store, &spec, toolstack::INIT_TIMEOUT).context("attaching the disk")?;

    // The guest: blkfront negotiates over xenstore.
    let services = Arc::new(SimGuestServices::new(guest.clone()));
    let guest_xs = XsClient::new(
        Transport::Unix(server.connect_as(GUEST_DOMID)?),
        ClientConfig::default(),
    )?;
    let config = FrontendConfig {
        max_queues: args.queues,
        max_ring_order: 4,
        max_indirect_segments: 256,
        ..FrontendConfig::default()
    };
    let mut xbf =
        XenbusFrontend::connect(services.clone(), config, guest_xs, &spec.frontend_path())
            .context("blkfront connecting over xenstore")?;
    let fe = xbf.frontend().context("frontend not connected")?.clone();
    let n = fe.negotiated();
    let disk = fe.disk();
    let status = daemon.sender.status(Duration::from_secs(5));
    let grant_mode = status
        .as_ref()
        .and_then(|(_, devs)| devs.first())
        .and_then(|d| d.stats.get("grant_copy"))
        .map(|&c| if c == 1 { "copy" } else { "map" })
        .unwrap_or("unknown (daemon status unavailable)");
    if let Some(d) = status.as_ref().and_then(|(_, devs)| devs.first()) {
        println!(
            "  storage: {} ({}){}",
            d.target.as_deref().unwrap_or("?"),
            d.format.as_deref().unwrap_or("?"),
            if d.layers.len() > 1 {
                format!(", backing chain {}", d.layers.join(" -> "))
            } else {
                String::new()
            }
        );
    }
    println!("  negotiated over xenstore:");
    println!("    ABI                {}", n.protocol.xenstore_name());
    println!("    queues             {}", n.queues);
    println!(
        "    ring order         {} ({} pages per ring)",
        n.ring_order,
        1u32 << n.ring_order
    );
    println!(
        "    persistent grants  {}",
        if n.persistent { "on" } else { "off" }
    );
    println!("    indirect segments  {}", n.max_indirect_segments);
    println!("    grant mode         {grant_mode}");
    println!("    flush              {:?}", n.cache);
    println!(
        "    discard            {}",
        match n.discard {
            Some(d) => format!("on (granularity {}, secure {})", d.granularity, d.secure),
            None => "off".into(),
        }
    );
    println!(
        "    disk               {} sectors of {} bytes ({} MiB){}",
        disk.sectors,
        disk.sector_size,
        disk.size_bytes() / MIB,
        if disk.read_only() { ", read-only" } else { "" }
    );

    // Write, read back, verify.
    let region = args.data.min(disk.size_bytes()) / MIB * MIB;
    let overwrites = write_and_verify(&fe, region)?;
    println!(
        "  verified {} MiB ({} random overwrites) byte for byte",
        region / MIB,
        overwrites
    );

    if let Some(d) = n.discard {
        discard_and_read_back(&fe, d, region)?;
    }

    // A short benchmark on the same connection.
    println!("  benchmark ({} s per phase):", args.bench_secs);
    for (rw, bs, depth) in [(Rw::Randread, 4096u64, 32u32), (Rw::Write, MIB, 8)] {
        let bench_args = BenchArgs {
            rw,
            bs,
            iodepth: depth,
            queues: n.queues,
            runtime: args.bench_secs,
            ..BenchArgs::default()
        };
        let stop = AtomicBool::new(false);
        let m = bench::measure_frontend(&fe, &bench_args, region, &stop)?;
        println!(
            "    {:<9} bs={:<7} QD{:<3} {:>9.0} IOPS {:>8.1} MiB/s  p50 {:>7.1} us  p99 {:>8.1} us",
            format!("{rw:?}").to_lowercase(),
            bench_size(bs),
            depth * n.queues,
            m.iops,
            m.bw_mib_s,
            m.lat_us.p50,
            m.lat_us.p99
        );
    }
    if let Some((_, devs)) = daemon.sender.status(Duration::from_secs(5)) {
        if let Some(d) = devs.first() {
            let get = |k: &str| d.stats.get(k).copied().unwrap_or(0);
            println!(
                "  backend counters: rd_req {} wr_req {} f_req {} ds_req {} oo_req {} errors {} persistent grants mapped {}",
                get("rd_req"),
                get("wr_req"),
                get("f_req"),
                get("ds_req"),
                get("oo_req"),
                get("errors"),
                get("persistent_grants_mapped")
            );
        }
    }
    let budget = daemon.gauges.read();
    println!(
        "  persistent-grant budget (all devices): {} of {} in use, {} refused",
        budget["persistent_grant_budget_used"],
        budget["persistent_grant_budget_limit"],
        budget["persistent_grant_budget_refusals"]
    );

    // Teardown as `xl block-detach` does it, then check nothing leaked.
    let removal = toolstack::remove_disk(
        &store,
        &spec.backend_path(),
        &spec.frontend_path(),
        toolstack::DESTROY_TIMEOUT,
    )
    .context("detaching the disk")?;
    ensure!(
        removal == Removal::Clean,
        "the backend did not close in time: {removal:?}"
    );
    let report = match xbf.take_teardown_report() {
        Some(r) => r,
        None => xbf.close().context("closing the frontend")?,
    };
    ensure!(
        report.is_clean(),
        "grants still mapped at teardown: {report:?}"
    );
    drop(fe);
    drop(xbf);
    let gauges = daemon.gauges.clone();
    daemon.stop()?;
    let live = platform.live_mappings();
    ensure!(live == 0, "{live} grant mappings leaked");
    let kept = gauges.read()["persistent_grant_budget_used"];
    ensure!(
        kept == 0,
        "{kept} persistent grants still counted in the budget"
    );
    drop(domain);
    let _ = platform.detach(GUEST_DOMID as u16);
    println!(
        "  detached cleanly: 0 grants mapped, {} guest pages free; done in {:.1} s",
        services.free_frames_count(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Writes the first `region` bytes sequentially, overwrites random 4 KiB blocks, flushes,
/// and reads everything back, checking each block against what was last written to it.
/// Returns how many random overwrites were done.
fn write_and_verify(fe: &blkfront::Frontend, region: u64) -> anyhow::Result<u64> {
    let chunk = (fe.max_request_bytes() as u64).clamp(BLOCK, MIB) / BLOCK * BLOCK;
    let mut buf = vec![0u8; chunk as usize];
    let bar = progress(region, "sequential write");
    let mut off = 0;
    while off < region {
        let len = chunk.min(region - off);
        for (i, b) in buf[..len as usize].chunks_mut(BLOCK as usize).enumerate() {
            fill_block(off / BLOCK + i as u64, 0, b);
        }
        fe.write(off, &buf[..len as usize])
            .with_context(|| format!("writing at {off}"))?;
        off += len;
        bar.set_position(off);
    }
    bar.finish();

    let mut rng_state = 0x2545_F491_4F6C_DD1Du64;
    let mut rand = move || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    let overwrites = 2000u64.min(region / BLOCK);
    let mut generation: HashMap<u64, u64> = HashMap::new();
    let bar = progress(overwrites * BLOCK, "random 4 KiB overwrites");
    let mut block_buf = vec![0u8; BLOCK as usize];
    for i in 0..overwrites {
        let block = rand() % (region / BLOCK);
        let gen = i + 1;
        fill_block(block, gen, &mut block_buf);
        fe.write(block * BLOCK, &block_buf)
            .with_context(|| format!("writing block {block}"))?;
        generation.insert(block, gen);
        bar.inc(BLOCK);
    }
    bar.finish();
    fe.flush().context("flush")?;

    let bar = progress(region, "read back + verify");
    let mut expect = vec![0u8; BLOCK as usize];
    let mut off = 0;
    while off < region {
        let len = chunk.min(region - off);
        fe.read(off, &mut buf[..len as usize])
            .with_context(|| format!("reading at {off}"))?;
        for (i, got) in buf[..len as usize].chunks(BLOCK as usize).enumerate() {
            let block = off / BLOCK + i as u64;
            fill_block(
                block,
                generation.get(&block).copied().unwrap_or(0),
                &mut expect,
            );
            if got != expect.as_slice() {
                bar.abandon();
                bail!(
                    "verification failed: block {block} (byte offset {}) differs",
                    block * BLOCK
                );
            }
        }
        off += len;
        bar.set_position(off);
    }
    bar.finish();
    Ok(overwrites)
}

/// Discards 1 MiB in the middle of the verified region and reports how it reads back.
fn discard_and_read_back(
    fe: &blkfront::Frontend,
    d: blkfront::DiscardParams,
    region: u64,
) -> anyhow::Result<()> {
    let gran = u64::from(d.granularity.max(512));
    let at = (region / 2) / gran * gran;
    let len = (MIB / gran).max(1) * gran;
    fe.discard(at, len, false).context("discard")?;
    let mut back = vec![0xffu8; len as usize];
    fe.read(at, &mut back)
        .context("reading the discarded range")?;
    // A file punches a hole (zeros); other storage may keep the data, which blkif allows.
    let zeros = back.iter().all(|&b| b == 0);
    println!(
        "  discarded {} KiB at {} MiB: reads back {}",
        len / 1024,
        at / MIB,
        if zeros {
            "as zeros"
        } else {
            "unchanged (storage kept the data)"
        }
    );
    Ok(())
}

fn bench_size(bs: u64) -> String {
    if bs >= MIB {
        format!("{}M", bs / MIB)
    } else {
        format!("{}k", bs / 1024)
    }
}
