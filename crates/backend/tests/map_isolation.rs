//! One guest must not be able to make another guest's I/O fail through the daemon-wide
//! resources grant mapping consumes (issue 11, item 4): a hostile guest keeps its rings
//! full of indirect requests whose data pages are scattered over its memory, in map mode,
//! for 10 s, while a second guest on the same engine does verified I/O.
//!
//! In the simulator every run of non-consecutive guest frames is an `mmap` of its own, so
//! a 256-segment request of scattered pages costs 256 VMAs and a 4096-segment one 4096.
//! The simulator is given a small `vm.max_map_count` for grant mappings (past it a map
//! fails with ENOMEM, as `mmap` does), and the engine the process limit that leaves
//! exactly that much to grant mappings. The hostile guest also sends 4096 consecutive
//! pages, which the simulator maps as gntdev maps any batch, in one VMA per map call:
//! what they exhaust is the map-tracking table of the backend's domain, which the
//! simulator is given small too (past it Xen answers `GNTST_no_device_space`), and the
//! engine its page limit.

mod harness;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backend::grant_budget::{BASE_MAP_RESERVE, MAPS_PER_REACTOR};
use backend::GrantMode;
use blkif::abi::{BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_OKAY, SEGMENTS_PER_INDIRECT_PAGE};
use blkif::{RawRequest, Segment};
use harness::{serial, Harness, Opts, Rng, SECTOR};

const FLOOD: Duration = Duration::from_secs(10);
/// VMAs the simulated process leaves to grant mappings.
const GRANT_VMAS: usize = 3000;
/// Grant pages the simulated hypervisor lets the backend map at once.
const GRANT_PAGES: usize = 6000;
const HOSTILE_DOMID: u16 = 8;
/// The hostile guest's data pages: every other frame, so no two are consecutive.
const HOSTILE_SEGMENTS: usize = 4096;

/// Warnings logged by any thread of this test binary (one test: the subscriber is global).
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn capture() -> Log {
        let log = Log::default();
        let writer = log.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        log
    }

    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// The `count=` of a log line.
fn count_of(line: &str) -> u64 {
    let at = line.find("count=").expect("a count") + "count=".len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Sets `stop` when dropped, so a failing test never leaves the flood running.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct FloodOutcome {
    requests: u64,
    failed: u64,
}

/// Grants `frames` (writable, so READs can fill them) and writes descriptor pages naming
/// them as one-sector segments, at frames `first_descriptor_frame`, +2, ... Returns the
/// data grants and the descriptor pages' grants.
fn describe(h: &Harness, frames: &[u32], first_descriptor_frame: u32) -> (Vec<u32>, Vec<u32>) {
    let data: Vec<u32> = frames
        .iter()
        .map(|&f| h.guest.grant_access(0, f, false).unwrap())
        .collect();
    let indirect = data
        .chunks(SEGMENTS_PER_INDIRECT_PAGE)
        .zip((first_descriptor_frame..).step_by(2))
        .map(|(grefs, frame)| {
            let bytes: Vec<u8> = grefs
                .iter()
                .flat_map(|&gref| {
                    Segment {
                        gref,
                        first_sect: 0,
                        last_sect: 0,
                    }
                    .encode()
                })
                .collect();
            h.guest.write_page(frame, 0, &bytes).unwrap();
            h.guest.grant_access(0, frame, true).unwrap()
        })
        .collect();
    (data, indirect)
}

/// Keeps every ring of `h` full of READs and WRITEs until `stop`, then collects what is
/// still outstanding. Requests of one-sector segments (little I/O, much mapping): on
/// ring 0 of up to 256 scattered pages (blkback's most), in sizes that fill a map count
/// to the brim; on the others the most the engine accepts, 4096 scattered or consecutive
/// pages.
fn flood(h: &mut Harness, stop: &AtomicBool) -> FloodOutcome {
    let top = h.opts.guest_pages - 1;
    let scattered_frames: Vec<u32> = (0..HOSTILE_SEGMENTS as u32).map(|k| top - 2 * k).collect();
    let consecutive_frames: Vec<u32> = (1024..1024 + HOSTILE_SEGMENTS as u32).collect();
    let (scattered, scattered_indirect) = describe(h, &scattered_frames, 64);
    let (consecutive, consecutive_indirect) = describe(h, &consecutive_frames, 256);
    let disk_sectors = h.model.len() / SECTOR;
    let mut rng = Rng::new(0xf100d);
    let mut outcome = FloodOutcome::default();
    let mut outstanding = vec![0u32; h.fronts.len()];
    let mut id = 1u64 << 40;
    while !stop.load(Ordering::SeqCst) || outstanding.iter().any(|&n| n > 0) {
        for (r, waiting) in outstanding.iter_mut().enumerate() {
            if !stop.load(Ordering::SeqCst) {
                while h.fronts[r].ring.free_slots() > 0 {
                    id += 1;
                    let (segments, indirect) = match (r, id % 2) {
                        (0, _) => (1 + rng.below(256) as usize, &scattered_indirect),
                        (_, 0) => (HOSTILE_SEGMENTS, &scattered_indirect),
                        _ => (HOSTILE_SEGMENTS, &consecutive_indirect),
                    };
                    let pages = segments.div_ceil(SEGMENTS_PER_INDIRECT_PAGE);
                    let op = if id.is_multiple_of(2) {
                        BLKIF_OP_READ
                    } else {
                        BLKIF_OP_WRITE
                    };
                    let sector = rng.below((disk_sectors - segments) as u64);
                    let raw = RawRequest::indirect(
                        op,
                        id,
                        0,
                        sector,
                        segments as u16,
                        &indirect[..pages],
                    )
                    .unwrap();
                    h.fronts[r].ring.push_request(&raw).unwrap();
                    *waiting += 1;
                    outcome.requests += 1;
                }
                if h.fronts[r].ring.push_requests_and_check_notify() {
                    h.fronts[r].evtchn.notify().unwrap();
                }
            }
            for rsp in h.responses(r, Duration::from_millis(2)) {
                *waiting -= 1;
                if rsp.status != BLKIF_RSP_OKAY {
                    outcome.failed += 1;
                }
            }
        }
    }
    for gref in [
        scattered,
        scattered_indirect,
        consecutive,
        consecutive_indirect,
    ]
    .into_iter()
    .flatten()
    {
        h.guest.end_access(gref).unwrap();
    }
    outcome
}

/// One write of random shape and data, then a read of it checked against the model.
/// Returns what went wrong.
fn verified_round(h: &mut Harness, rng: &mut Rng) -> Result<(), String> {
    let disk_sectors = (h.model.len() / SECTOR) as u64;
    let seg_sectors = 1 + rng.below(8) as usize;
    let first = rng.below((8 - seg_sectors + 1) as u64) as u8;
    let nsegs = 1 + rng.below(40) as usize;
    let len = nsegs * seg_sectors * SECTOR;
    let sector = rng.below(disk_sectors - (len / SECTOR) as u64);
    let indirect = rng.below(4) == 0;
    let data = rng.bytes(len);
    let b = h.build(BLKIF_OP_WRITE, sector, &data, seg_sectors, first, indirect);
    h.push(0, &[&b]);
    let (rsp, _) = h.complete(0, b);
    if rsp.status != BLKIF_RSP_OKAY {
        return Err(format!("write at {sector} answered {}", rsp.status));
    }
    let b = h.build(
        BLKIF_OP_READ,
        sector,
        &vec![0; len],
        seg_sectors,
        first,
        indirect,
    );
    h.push(0, &[&b]);
    let (rsp, back) = h.complete(0, b);
    if rsp.status != BLKIF_RSP_OKAY {
        return Err(format!("read at {sector} answered {}", rsp.status));
    }
    let at = sector as usize * SECTOR;
    if back.as_deref() != Some(&h.model[at..at + len]) {
        return Err(format!("read at {sector} returned other data"));
    }
    Ok(())
}

#[test]
fn a_guest_flooding_scattered_indirect_requests_cannot_fail_another_guests_io() {
    let _g = serial();
    let log = Log::capture();
    // A reactor per ring: a ring its frontend keeps busy holds its reactor (a run does
    // not return while there is work), which starves the other rings of that reactor
    // whatever this test is about.
    let reactors = 3;
    let mut good = Harness::new(Opts {
        mode: GrantMode::Map,
        reactors,
        disk_bytes: 8 << 20,
        // The process limit that leaves GRANT_VMAS to grant mappings.
        max_map_count: Some(GRANT_VMAS + BASE_MAP_RESERVE + reactors * MAPS_PER_REACTOR),
        max_mapped_pages: Some(GRANT_PAGES),
        ..Opts::default()
    });
    good.platform.set_grant_vma_limit(Some(GRANT_VMAS));
    good.platform.set_grant_page_limit(Some(GRANT_PAGES));
    // Two rings: one domain's share, whichever ring maps.
    let mut hostile = good.another_guest(
        HOSTILE_DOMID,
        Opts {
            mode: GrantMode::Map,
            rings: 2,
            order: 1,
            max_indirect: HOSTILE_SEGMENTS as u32,
            disk_bytes: 32 << 20,
            guest_pages: 3 * HOSTILE_SEGMENTS as u32 + 1024,
            ..Opts::default()
        },
    );
    assert_eq!(good.engine.as_ref().unwrap().reactor_loads(), vec![1; 3]);

    let stop = AtomicBool::new(false);
    let (flooded, rounds, failures) = std::thread::scope(|s| {
        let flooder = s.spawn(|| flood(&mut hostile, &stop));
        let stopper = StopOnDrop(&stop);
        // Let the flood fill the rings first.
        std::thread::sleep(Duration::from_millis(200));
        let mut rng = Rng::new(0x600d);
        let deadline = Instant::now() + FLOOD;
        let (mut rounds, mut failures) = (0u64, Vec::new());
        while Instant::now() < deadline {
            rounds += 1;
            if let Err(e) = verified_round(&mut good, &mut rng) {
                failures.push(e);
            }
        }
        drop(stopper);
        (flooder.join().unwrap(), rounds, failures)
    });

    let good_stats = good.vbd().stats().total;
    let hostile_stats = hostile.vbd().stats().total;
    eprintln!(
        "flood: {flooded:?}; good guest: {rounds} rounds, {} failed; hostile stats {hostile_stats:?}; \
         simulated limits refused {} map(s) for VMAs, {} for pages",
        failures.len(),
        good.platform.vma_limit_refusals(),
        good.platform.page_limit_refusals(),
    );
    assert!(
        failures.is_empty(),
        "the well-behaved guest's I/O failed {} time(s) in {rounds} rounds, first: {}",
        failures.len(),
        failures[0]
    );
    assert_eq!(good_stats.errors, 0);
    assert!(
        rounds >= 50,
        "the well-behaved guest was starved: {rounds} rounds"
    );
    // The hostile guest's requests are valid too: served, by grant copy when its share
    // had no room for their mappings, and counted where `xenblkd status` shows them.
    assert!(flooded.requests > 100, "{flooded:?}");
    assert_eq!(flooded.failed, 0, "{flooded:?}");
    assert_eq!(hostile_stats.errors, 0);
    assert!(hostile_stats.map_fallbacks > 0, "{hostile_stats:?}");
    assert_eq!(good_stats.map_fallbacks, 0, "{good_stats:?}");
    // The engine never let a map run into either limit.
    assert_eq!(good.platform.vma_limit_refusals(), 0);
    assert_eq!(good.platform.page_limit_refusals(), 0);
    // Logged at warn, for the hostile guest's VBD only, at most once per 10 s with the
    // count since the last line: the first fallback at once, the next after 10 s.
    let fallback_lines: Vec<String> = log
        .lines()
        .into_iter()
        .filter(|l| l.contains("grant-copied instead of mapped"))
        .collect();
    eprintln!("{fallback_lines:#?}");
    assert!(
        fallback_lines.iter().all(|l| l.contains("WARN")
            && l.contains(&format!("vbd={}", hostile.vbd().id().0))
            && l.contains(&format!("domid={HOSTILE_DOMID}"))),
        "{fallback_lines:#?}"
    );
    assert!(
        (1..=3).contains(&fallback_lines.len()),
        "{fallback_lines:#?}"
    );
    let logged: u64 = fallback_lines.iter().map(|l| count_of(l)).sum();
    assert!(
        logged >= 1 && logged <= hostile_stats.map_fallbacks,
        "{logged} logged of {}",
        hostile_stats.map_fallbacks
    );
    hostile.teardown();
    good.verify_disk(0);
    good.teardown();
}
