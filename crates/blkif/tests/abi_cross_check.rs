//! ABI cross-check against Xen's own C headers.
//!
//! `tests/c/blkif_abi.c` is compiled with gcc against the installed
//! `xen/io/blkif.h` and `xen/io/ring.h`, natively (the x86_64 layout) and with `-m32`
//! (the i386 layout, i.e. `x86_32-abi`). It
//!
//! - prints `sizeof`/`offsetof` of every blkif struct, ring sizes and constants, which
//!   must equal [`blkif::abi`]'s;
//! - acts as a frontend built from the official ring macros over a file both processes
//!   map: it pushes a few hundred to a few thousand mixed requests (every opcode, direct
//!   and indirect, valid and each kind of invalid) with indices starting near 2^32; the
//!   Rust [`BackRing`] consumes and decodes them (checked field by field against what
//!   the C compiler laid out), validates, answers; the C side checks every response's
//!   id, operation and status and the notify decisions on both sides.
//!
//! The two processes take turns over pipes; nothing sleeps. Missing gcc, gcc-multilib
//! or libxen-dev fail the test with instructions: it never skips.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use blkif::abi::{self, Layout, Protocol, BLKIF_RSP_OKAY, MAX_INDIRECT_SEGMENTS, PAGE_SIZE};
use blkif::{ring_size, BackRing, DescriptorPage, DeviceLimits, RawRequest, Segment, Validated};
use shmem::{OutOfBounds, SharedMemory};

const HINT: &str = "run ./scripts/test.sh, which installs gcc, gcc-multilib and libxen-dev";

struct CPrograms {
    _dir: tempfile::TempDir,
    native: PathBuf,
    i386: PathBuf,
}

fn c_programs() -> &'static CPrograms {
    static PROGRAMS: OnceLock<CPrograms> = OnceLock::new();
    PROGRAMS.get_or_init(|| {
        assert!(
            Path::new("/usr/include/xen/io/blkif.h").exists(),
            "Xen's public headers (/usr/include/xen/io/blkif.h) are missing: {HINT}"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let native = compile(dir.path(), false);
        let i386 = compile(dir.path(), true);
        CPrograms {
            _dir: dir,
            native,
            i386,
        }
    })
}

fn compile(dir: &Path, m32: bool) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/blkif_abi.c");
    let out = dir.join(if m32 { "blkif_abi_32" } else { "blkif_abi_64" });
    let mut cmd = Command::new("gcc");
    cmd.args([
        "-std=gnu11",
        "-O2",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-fno-strict-aliasing",
    ]);
    if m32 {
        cmd.arg("-m32");
    }
    cmd.arg(&src).arg("-o").arg(&out);
    let output = match cmd.output() {
        Ok(o) => o,
        Err(e) => panic!("cannot run gcc ({e}): {HINT}"),
    };
    assert!(
        output.status.success(),
        "gcc{} failed to build {}: {HINT}\n{}",
        if m32 { " -m32" } else { "" },
        src.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

// ---- layouts ------------------------------------------------------------------------

fn c_layout(program: &Path) -> BTreeMap<String, String> {
    let output = Command::new(program)
        .arg("layout")
        .output()
        .expect("run layout");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(' ').expect("name value");
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

fn rust_layout(protocol: Protocol, l: &Layout) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: i64| {
        m.insert(k.to_owned(), v.to_string());
    };
    let rw = l.read_write;
    put("blkif_request.size", rw.size as i64);
    put("blkif_request.operation", rw.operation as i64);
    put("blkif_request.nr_segments", rw.nr_segments as i64);
    put("blkif_request.handle", rw.handle as i64);
    put("blkif_request.id", rw.id as i64);
    put("blkif_request.sector_number", rw.sector_number as i64);
    put("blkif_request.seg", rw.seg as i64);
    put("blkif_request_segment.size", abi::SEGMENT_SIZE as i64);
    put("blkif_request_segment.gref", abi::SEGMENT_GREF as i64);
    put(
        "blkif_request_segment.first_sect",
        abi::SEGMENT_FIRST_SECT as i64,
    );
    put(
        "blkif_request_segment.last_sect",
        abi::SEGMENT_LAST_SECT as i64,
    );
    let d = l.discard;
    put("blkif_request_discard.size", d.size as i64);
    put("blkif_request_discard.operation", d.operation as i64);
    put("blkif_request_discard.flag", d.flag as i64);
    put("blkif_request_discard.handle", d.handle as i64);
    put("blkif_request_discard.id", d.id as i64);
    put(
        "blkif_request_discard.sector_number",
        d.sector_number as i64,
    );
    put("blkif_request_discard.nr_sectors", d.nr_sectors as i64);
    let i = l.indirect;
    put("blkif_request_indirect.size", i.size as i64);
    put("blkif_request_indirect.operation", i.operation as i64);
    put("blkif_request_indirect.indirect_op", i.indirect_op as i64);
    put("blkif_request_indirect.nr_segments", i.nr_segments as i64);
    put("blkif_request_indirect.id", i.id as i64);
    put(
        "blkif_request_indirect.sector_number",
        i.sector_number as i64,
    );
    put("blkif_request_indirect.handle", i.handle as i64);
    put(
        "blkif_request_indirect.indirect_grefs",
        i.indirect_grefs as i64,
    );
    put("blkif_request_other.operation", l.other.operation as i64);
    put("blkif_request_other.id", l.other.id as i64);
    let r = l.response;
    put("blkif_response.size", r.size as i64);
    put("blkif_response.id", r.id as i64);
    put("blkif_response.operation", r.operation as i64);
    put("blkif_response.status", r.status as i64);
    put("blkif_sring.req_prod", abi::sring::REQ_PROD as i64);
    put("blkif_sring.req_event", abi::sring::REQ_EVENT as i64);
    put("blkif_sring.rsp_prod", abi::sring::RSP_PROD as i64);
    put("blkif_sring.rsp_event", abi::sring::RSP_EVENT as i64);
    put("blkif_sring.pvt", abi::sring::PVT as i64);
    put("blkif_sring.__pad", abi::sring::PVT as i64 + 4);
    put("blkif_sring.ring", abi::sring::RING as i64);
    put("blkif_sring_entry.size", l.slot_size as i64);
    for order in 0..=4 {
        put(
            &format!("ring_size.{order}"),
            ring_size(protocol, order).unwrap() as i64,
        );
    }
    put("BLKIF_OP_READ", abi::BLKIF_OP_READ.into());
    put("BLKIF_OP_WRITE", abi::BLKIF_OP_WRITE.into());
    put("BLKIF_OP_WRITE_BARRIER", abi::BLKIF_OP_WRITE_BARRIER.into());
    put(
        "BLKIF_OP_FLUSH_DISKCACHE",
        abi::BLKIF_OP_FLUSH_DISKCACHE.into(),
    );
    put("BLKIF_OP_RESERVED_1", abi::BLKIF_OP_RESERVED_1.into());
    put("BLKIF_OP_DISCARD", abi::BLKIF_OP_DISCARD.into());
    put("BLKIF_OP_INDIRECT", abi::BLKIF_OP_INDIRECT.into());
    put("BLKIF_RSP_OKAY", abi::BLKIF_RSP_OKAY.into());
    put("BLKIF_RSP_ERROR", abi::BLKIF_RSP_ERROR.into());
    put("BLKIF_RSP_EOPNOTSUPP", abi::BLKIF_RSP_EOPNOTSUPP.into());
    put("BLKIF_DISCARD_SECURE", abi::BLKIF_DISCARD_SECURE.into());
    put(
        "BLKIF_MAX_SEGMENTS_PER_REQUEST",
        abi::BLKIF_MAX_SEGMENTS_PER_REQUEST as i64,
    );
    put(
        "BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST",
        abi::BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST as i64,
    );
    put(
        "SEGS_PER_INDIRECT_PAGE",
        abi::SEGMENTS_PER_INDIRECT_PAGE as i64,
    );
    m.insert(
        "XEN_IO_PROTO_ABI_NATIVE".to_owned(),
        protocol.xenstore_name().to_owned(),
    );
    m
}

fn assert_layouts_equal(c: &BTreeMap<String, String>, rust: &BTreeMap<String, String>) {
    let mut diffs = Vec::new();
    for (k, v) in c {
        match rust.get(k) {
            Some(r) if r == v => {}
            Some(r) => diffs.push(format!("{k}: C {v}, Rust {r}")),
            None => diffs.push(format!("{k}: C {v}, not checked by Rust")),
        }
    }
    for k in rust.keys().filter(|k| !c.contains_key(*k)) {
        diffs.push(format!("{k}: not printed by C"));
    }
    assert!(diffs.is_empty(), "layout mismatches:\n{}", diffs.join("\n"));
}

#[test]
fn layout_matches_c_headers_x86_64() {
    let c = c_layout(&c_programs().native);
    assert_layouts_equal(
        &c,
        &rust_layout(Protocol::X86_64, Protocol::X86_64.layout()),
    );
    // On this (64-bit) host the native layout is the x86_64 one.
    assert_eq!(Protocol::Native.layout(), Protocol::X86_64.layout());
    assert_eq!(
        c["XEN_IO_PROTO_ABI_NATIVE"],
        Protocol::Native.xenstore_name()
    );
}

#[test]
fn layout_matches_c_headers_x86_32() {
    let c = c_layout(&c_programs().i386);
    assert_layouts_equal(
        &c,
        &rust_layout(Protocol::X86_32, Protocol::X86_32.layout()),
    );
}

// ---- the ring, driven by the C macros -------------------------------------------------

/// An indirect descriptor page inside the shared pool: "grant" `gref` is pool page `gref`.
struct PoolPage<'a> {
    pool: &'a SharedMemory,
    gref: u32,
}

impl DescriptorPage for PoolPage<'_> {
    fn copy_descriptors(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        let oob = OutOfBounds {
            offset,
            len: dst.len(),
            region_len: PAGE_SIZE,
        };
        if offset
            .checked_add(dst.len())
            .is_none_or(|end| end > PAGE_SIZE)
        {
            return Err(oob);
        }
        let base = (self.gref as usize).checked_mul(PAGE_SIZE).ok_or(oob)?;
        self.pool.read(base + offset, dst)
    }
}

/// The descriptor the C generator writes at index `n` of a valid indirect request.
fn indirect_descriptor(id: u64, n: u32, lbs: u32) -> Segment {
    let gref = (id.wrapping_mul(2654435761) as u32).wrapping_add(n);
    let (first_sect, last_sect) = if lbs == 512 {
        let first = (n % 8) as u8;
        (first, first + ((n / 8) % (8 - u32::from(first))) as u8)
    } else {
        (0, 7)
    };
    Segment {
        gref,
        first_sect,
        last_sect,
    }
}

fn parse_req(words: &[&str]) -> RawRequest {
    let n = |i: usize| -> u64 {
        words[i]
            .parse()
            .unwrap_or_else(|_| panic!("number in {words:?}"))
    };
    match words[0] {
        "rw" => {
            let mut segments = [Segment::default(); 11];
            for (k, s) in segments.iter_mut().enumerate() {
                let f: Vec<u64> = words[6 + k]
                    .split(':')
                    .map(|x| x.parse().unwrap())
                    .collect();
                *s = Segment {
                    gref: f[0] as u32,
                    first_sect: f[1] as u8,
                    last_sect: f[2] as u8,
                };
            }
            RawRequest::ReadWrite {
                id: n(1),
                operation: n(2) as u8,
                nr_segments: n(3) as u8,
                handle: n(4) as u16,
                sector_number: n(5),
                segments,
            }
        }
        "discard" => RawRequest::Discard {
            id: n(1),
            flag: n(2) as u8,
            handle: n(3) as u16,
            sector_number: n(4),
            nr_sectors: n(5),
        },
        "indirect" => {
            let mut indirect_grefs = [0u32; 8];
            for (k, g) in indirect_grefs.iter_mut().enumerate() {
                *g = n(6 + k) as u32;
            }
            RawRequest::Indirect {
                id: n(1),
                indirect_op: n(2) as u8,
                nr_segments: n(3) as u16,
                handle: n(4) as u16,
                sector_number: n(5),
                indirect_grefs,
            }
        }
        "other" => RawRequest::Other {
            id: n(1),
            operation: n(2) as u8,
        },
        other => panic!("unknown request kind {other}"),
    }
}

struct Run {
    m32: bool,
    protocol: Protocol,
    order: u32,
    start: u32,
    seed: u64,
    count: u64,
    lbs: u32,
}

const SECTORS: u64 = 1 << 24;

fn run_ring(run: Run) {
    let program = if run.m32 {
        &c_programs().i386
    } else {
        &c_programs().native
    };
    let size = ring_size(run.protocol, run.order).unwrap();
    let ring_bytes = PAGE_SIZE << run.order;
    let pool_bytes = size as usize * 8 * PAGE_SIZE;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring");
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .unwrap();
    file.set_len((ring_bytes + pool_bytes) as u64).unwrap();
    let mut ring_mem = Some(common::map_file(&file, 0, ring_bytes));
    let pool = common::map_file(&file, ring_bytes, pool_bytes);

    let stderr_path = dir.path().join("stderr");
    let mut child = Command::new(program)
        .arg("ring")
        .arg(&path)
        .args([
            run.order.to_string(),
            run.start.to_string(),
            run.seed.to_string(),
            run.count.to_string(),
            SECTORS.to_string(),
            run.lbs.to_string(),
            MAX_INDIRECT_SEGMENTS.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(File::create(&stderr_path).unwrap())
        .spawn()
        .expect("spawn the C frontend");
    let mut to_c = child.stdin.take().unwrap();
    let from_c = BufReader::new(child.stdout.take().unwrap());
    let c_stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();

    let limits = DeviceLimits {
        sectors: SECTORS,
        read_only: false,
        logical_block_size: run.lbs,
        max_indirect_segments: MAX_INDIRECT_SEGMENTS as u32,
        discard: true,
        secure_discard: true,
        flush: true,
        barrier: true,
    };
    let mut segment_buf = vec![Segment::default(); MAX_INDIRECT_SEGMENTS];
    let mut ring: Option<BackRing> = None;
    let mut pushed: Vec<RawRequest> = Vec::new();
    let mut done = None;
    let (mut okay, mut refused) = (0u64, 0u64);

    for line in from_c.lines() {
        let line = line.unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[0] {
            "READY" => {
                let back = BackRing::new(ring_mem.take().unwrap(), run.protocol).unwrap();
                assert_eq!(words[1], back.size().to_string(), "RING_SIZE");
                assert_eq!(back.req_cons(), run.start);
                ring = Some(back);
            }
            "REQ" => pushed.push(parse_req(&words[1..])),
            "PUSHED" => {
                let ring = ring.as_mut().expect("READY first");
                assert_eq!(words[1], pushed.len().to_string());
                let mut responses = Vec::with_capacity(pushed.len());
                for want in pushed.drain(..) {
                    let raw = ring
                        .pop_request()
                        .unwrap()
                        .expect("a request the C side pushed");
                    assert_eq!(raw, want, "decoded request differs from the C layout");
                    let rsp = match raw.validate(&limits) {
                        Ok(Validated::Ready(req)) => req.response(BLKIF_RSP_OKAY),
                        Ok(Validated::Indirect(ind)) => {
                            let pages: Vec<PoolPage> = ind
                                .indirect_grefs()
                                .iter()
                                .map(|&gref| PoolPage { pool: &pool, gref })
                                .collect();
                            let parsed = ind.parse_segments(&pages, &mut segment_buf);
                            if let Ok(segs) = &parsed {
                                for (n, s) in segs.iter().enumerate() {
                                    assert_eq!(
                                        *s,
                                        indirect_descriptor(ind.id(), n as u32, run.lbs)
                                    );
                                }
                            }
                            match parsed.and_then(|segs| ind.finish(segs, &limits)) {
                                Ok(req) => req.response(BLKIF_RSP_OKAY),
                                Err(e) => ind.response(e.status()),
                            }
                        }
                        Err(e) => raw.response(e.status()),
                    };
                    if rsp.status == BLKIF_RSP_OKAY {
                        okay += 1;
                    } else {
                        refused += 1;
                    }
                    responses.push(rsp);
                }
                assert_eq!(
                    ring.pop_request().unwrap(),
                    None,
                    "nothing beyond the batch"
                );
                // Two pushes: the first must notify (the C side re-armed rsp_event), the
                // second must not (it has not run since).
                let first = responses.len().div_ceil(2);
                for r in &responses[..first] {
                    ring.push_response(r).unwrap();
                }
                assert!(
                    ring.push_responses_and_check_notify(),
                    "first push notifies"
                );
                for r in &responses[first..] {
                    ring.push_response(r).unwrap();
                }
                assert!(
                    !ring.push_responses_and_check_notify(),
                    "second push is silent"
                );
                assert_eq!(ring.awaiting_response(), 0);
                assert!(!ring.final_check_for_requests().unwrap());
                writeln!(to_c, "GO").unwrap();
                to_c.flush().unwrap();
            }
            "DONE" => {
                done = Some(words[1].parse::<u64>().unwrap());
                let ring = ring.as_ref().unwrap();
                assert_eq!(words[2], ring.req_cons().to_string());
            }
            _ => panic!("unexpected line from the C frontend: {line}"),
        }
    }
    drop(to_c);
    let status = child.wait().unwrap();
    assert!(
        status.success() && done == Some(run.count),
        "C frontend failed ({status}, done {done:?}):\n{}",
        c_stderr()
    );
    let ring = ring.unwrap();
    assert_eq!(ring.req_cons(), run.start.wrapping_add(run.count as u32));
    assert!(
        okay > 0 && refused > 0,
        "mixed outcomes: {okay} ok, {refused} refused"
    );
}

fn run_all_orders(m32: bool, protocol: Protocol, lbs: u32) {
    for order in 0..=4u32 {
        let size = u64::from(ring_size(protocol, order).unwrap());
        run_ring(Run {
            m32,
            protocol,
            order,
            // Indices wrap at 2^32 within the first batches.
            start: u32::MAX - 5 - 37 * order,
            seed: 0x5eed_0000 + u64::from(order) + if m32 { 100 } else { 0 },
            count: (4 * size).max(600),
            lbs,
        });
    }
}

#[test]
fn ring_native_protocol_against_c_macros() {
    run_all_orders(false, Protocol::Native, 512);
    // And once from a fresh ring at index 0, as SHARED_RING_INIT leaves it.
    run_ring(Run {
        m32: false,
        protocol: Protocol::Native,
        order: 0,
        start: 0,
        seed: 7,
        count: 300,
        lbs: 512,
    });
}

#[test]
fn ring_x86_64_abi_against_c_macros_4k_blocks() {
    run_all_orders(false, Protocol::X86_64, 4096);
}

#[test]
fn ring_x86_32_abi_against_i386_c_macros() {
    run_all_orders(true, Protocol::X86_32, 512);
}
