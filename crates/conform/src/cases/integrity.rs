//! Data integrity: verified patterns across every ABI and ring order, with several
//! requests in flight, indirect requests and multiple queues.

use blkif::abi::{Protocol, BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_OKAY};
use blkif::{RawRequest, Segment};

use super::{case, connected, direct, require, verify, Case};
use crate::front::{check_response, page_segs, seg, Buf, RawFront, Setup};
use crate::target::DeviceRequest;
use crate::verdict::{CaseResult, Ctx, Verdict};

const G: &str = "integrity";

/// Writes descriptors into indirect pages (512 per page).
pub(crate) fn write_descriptors(f: &RawFront, ind: &Buf, segs: &[Segment]) -> CaseResult {
    for (page, chunk) in ind.frames.iter().zip(segs.chunks(512)) {
        let mut bytes = Vec::with_capacity(chunk.len() * 8);
        for s in chunk {
            bytes.extend_from_slice(&s.encode());
        }
        f.write_page(*page, 0, &bytes)?;
    }
    Ok(())
}

/// One indirect write of `n` pages then one indirect read, verified.
pub(crate) fn indirect_round(f: &mut RawFront, n: usize, seed: u64) -> CaseResult {
    let data = f.buffer(n, false)?;
    let ind = f.buffer(n.div_ceil(512), false)?;
    f.fill(&data, |i| crate::front::pattern(seed, i as u64))?;
    write_descriptors(f, &ind, &page_segs(&data.grefs))?;
    let count = u16::try_from(n).map_err(|_| Verdict::fail("case bug"))?;
    let w = RawRequest::indirect(BLKIF_OP_WRITE, seed, f.handle, 0, count, &ind.grefs)
        .ok_or_else(|| Verdict::fail("case bug"))?;
    f.expect(&w, BLKIF_RSP_OKAY)?;
    f.fill(&data, |_| vec![0u8; 4096])?;
    let r = RawRequest::indirect(BLKIF_OP_READ, seed + 1, f.handle, 0, count, &ind.grefs)
        .ok_or_else(|| Verdict::fail("case bug"))?;
    f.expect(&r, BLKIF_RSP_OKAY)?;
    verify(f, &data, seed)
}

/// Fills the ring: `depth` writes of `pages` pages each in flight at once, then the
/// same as reads into fresh pages, every page verified.
fn deep(
    f: &mut RawFront,
    q: usize,
    depth: usize,
    pages: usize,
    base: u64,
    seed: u64,
) -> CaseResult {
    let bufs: Vec<Buf> = (0..depth)
        .map(|_| f.buffer(pages, false))
        .collect::<Result<_, _>>()?;
    for (i, b) in bufs.iter().enumerate() {
        f.fill(b, |p| crate::front::pattern(seed + i as u64, p as u64))?;
    }
    let span = pages as u64 * 8;
    let writes: Vec<RawRequest> = bufs
        .iter()
        .enumerate()
        .map(|(i, b)| {
            direct(
                BLKIF_OP_WRITE,
                i as u64,
                f.handle,
                base + i as u64 * span,
                &page_segs(&b.grefs),
            )
        })
        .collect::<Result<_, _>>()?;
    f.submit_all(q, &writes)?;
    answered(f, q, &writes)?;
    for b in &bufs {
        f.fill(b, |_| vec![0u8; 4096])?;
    }
    let reads: Vec<RawRequest> = bufs
        .iter()
        .enumerate()
        .map(|(i, b)| {
            direct(
                BLKIF_OP_READ,
                1000 + i as u64,
                f.handle,
                base + i as u64 * span,
                &page_segs(&b.grefs),
            )
        })
        .collect::<Result<_, _>>()?;
    f.submit_all(q, &reads)?;
    answered(f, q, &reads)?;
    for (i, b) in bufs.iter().enumerate() {
        verify(f, b, seed + i as u64)?;
    }
    Ok(())
}

/// Every request in `reqs` answered OKAY exactly once (in any order).
fn answered(f: &mut RawFront, q: usize, reqs: &[RawRequest]) -> CaseResult {
    let got = f.responses(q, reqs.len())?;
    let mut seen = vec![false; reqs.len()];
    for rsp in &got {
        let i = reqs
            .iter()
            .position(|r| r.id() == rsp.id)
            .ok_or_else(|| Verdict::fail(format!("response for unknown id {:#x}", rsp.id)))?;
        if std::mem::replace(&mut seen[i], true) {
            return Err(Verdict::fail(format!("id {:#x} answered twice", rsp.id)));
        }
        check_response(rsp, &reqs[i], BLKIF_RSP_OKAY)?;
    }
    Ok(())
}

fn abi_order(ctx: &mut Ctx<'_>, abi: Protocol, order: u32) -> CaseResult {
    let mut f = crate::front::RawFront::open(ctx, DeviceRequest::default())?;
    require(
        order <= f.adv.max_ring_order,
        format!("backend's max-ring-page-order is {}", f.adv.max_ring_order),
    )?;
    f.connect_ok(&Setup {
        order,
        ..Setup::with_abi(abi)
    })?;
    let depth = (f.rings[0].front.size() as usize).min(64);
    deep(&mut f, 0, depth, 2, 0, 0x1000 + u64::from(order) * 97)?;
    f.close()
}

fn multi_queue(ctx: &mut Ctx<'_>) -> CaseResult {
    let mut f = crate::front::RawFront::open(ctx, DeviceRequest::default())?;
    let n = f.adv.max_queues.min(4);
    require(n >= 2, "backend offers one queue")?;
    f.connect_ok(&Setup {
        queues: n,
        ..Setup::default()
    })?;
    for q in 0..n as usize {
        deep(&mut f, q, 16, 1, q as u64 * 4096, 0x2000 + q as u64 * 100)?;
    }
    f.close()
}

fn persistent_off(ctx: &mut Ctx<'_>) -> CaseResult {
    let mut f = connected(
        ctx,
        DeviceRequest::default(),
        &Setup {
            persistent: false,
            ..Setup::default()
        },
    )?;
    deep(&mut f, 0, 32, 4, 0, 0x3000)?;
    f.close()
}

fn indirect_big(ctx: &mut Ctx<'_>) -> CaseResult {
    let mut f = connected(ctx, DeviceRequest::default(), &Setup::default())?;
    let max = f.adv.max_indirect_segments as usize;
    require(max > 11, "backend offers no indirect descriptors")?;
    for n in [12, 32.min(max), max.min(256)] {
        indirect_round(&mut f, n, 0x4000 + n as u64 * 3)?;
    }
    f.close()
}

fn sector_granular(ctx: &mut Ctx<'_>) -> CaseResult {
    // Sector-sized writes at every offset inside a page, read back as whole pages.
    let mut f = connected(ctx, DeviceRequest::default(), &Setup::default())?;
    let src = f.buffer(1, false)?;
    let page = crate::front::pattern(0x5000, 0);
    f.fill(&src, |_| page.clone())?;
    for s in 0..8u8 {
        let w = direct(
            BLKIF_OP_WRITE,
            u64::from(s),
            f.handle,
            512 + u64::from(s),
            &[seg(src.grefs[0], s, s)],
        )?;
        f.expect(&w, BLKIF_RSP_OKAY)?;
    }
    let dst = f.buffer(1, false)?;
    let r = direct(BLKIF_OP_READ, 9, f.handle, 512, &page_segs(&dst.grefs))?;
    f.expect(&r, BLKIF_RSP_OKAY)?;
    verify(&f, &dst, 0x5000)?;
    f.close()
}

/// One page named by two segments of one write: the backend maps (or copies) it twice
/// (blkback get_persistent_gnt: a grant already in use is mapped again), and both disk
/// pages get its data.
fn same_grant_twice(ctx: &mut Ctx<'_>) -> CaseResult {
    let mut f = connected(ctx, DeviceRequest::default(), &Setup::default())?;
    let src = f.buffer(1, false)?;
    f.fill(&src, |_| crate::front::pattern(0x6000, 0))?;
    let g = src.grefs[0];
    let w = direct(
        BLKIF_OP_WRITE,
        1,
        f.handle,
        1024,
        &[seg(g, 0, 7), seg(g, 0, 7)],
    )?;
    f.expect(&w, BLKIF_RSP_OKAY)?;
    let dst = f.buffer(2, false)?;
    let r = direct(BLKIF_OP_READ, 2, f.handle, 1024, &page_segs(&dst.grefs))?;
    f.expect(&r, BLKIF_RSP_OKAY)?;
    let want = crate::front::pattern(0x6000, 0);
    let mut got = vec![0u8; 4096];
    for &fr in &dst.frames {
        f.read_page(fr, 0, &mut got)?;
        if got != want {
            return Err(Verdict::fail(
                "a page written twice by one request reads back wrong",
            ));
        }
    }
    f.close()
}

/// Writes, a barrier (or flush), and the data is there.
fn write_barrier_read(ctx: &mut Ctx<'_>) -> CaseResult {
    let mut f = connected(ctx, DeviceRequest::default(), &Setup::default())?;
    let op = if f.adv.barrier {
        blkif::abi::BLKIF_OP_WRITE_BARRIER
    } else {
        require(f.adv.flush, "backend offers neither barrier nor flush")?;
        blkif::abi::BLKIF_OP_FLUSH_DISKCACHE
    };
    let bufs: Vec<Buf> = (0..8)
        .map(|_| f.buffer(2, false))
        .collect::<Result<_, _>>()?;
    let mut reqs = Vec::new();
    for (i, b) in bufs.iter().enumerate() {
        f.fill(b, |p| crate::front::pattern(0x7000 + i as u64, p as u64))?;
        reqs.push(direct(
            BLKIF_OP_WRITE,
            i as u64,
            f.handle,
            2048 + i as u64 * 16,
            &page_segs(&b.grefs),
        )?);
    }
    // Writes and a barrier in one batch: the barrier is answered after the writes it
    // follows completed (blkback xen_blk_drain_io).
    reqs.push(direct(op, 99, f.handle, 0, &[])?);
    f.submit_all(0, &reqs)?;
    answered(&mut f, 0, &reqs)?;
    for (i, b) in bufs.iter().enumerate() {
        f.fill(b, |_| vec![0u8; 4096])?;
        let r = direct(
            BLKIF_OP_READ,
            200 + i as u64,
            f.handle,
            2048 + i as u64 * 16,
            &page_segs(&b.grefs),
        )?;
        f.expect(&r, BLKIF_RSP_OKAY)?;
        verify(&f, b, 0x7000 + i as u64)?;
    }
    f.close()
}

pub(super) fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for (abi_name, abi) in [
        ("native", Protocol::native()),
        ("x86_32", Protocol::X86_32),
        ("x86_64", Protocol::X86_64),
    ] {
        for order in 0..=4u32 {
            v.push(case(
                G,
                format!("{abi_name}-order-{order}"),
                "blkif.h (request/response layouts per ABI); ring.h",
                move |c| abi_order(c, abi, order),
            ));
        }
    }
    v.push(case(G, "multi-queue", "blkif.h multi-queue", multi_queue));
    v.push(case(
        G,
        "persistent-off-deep",
        "blkif.h feature-persistent (off: grants mapped per request)",
        persistent_off,
    ));
    v.push(case(
        G,
        "indirect",
        "blkif.h BLKIF_OP_INDIRECT; blkback xen_blkbk_parse_indirect",
        indirect_big,
    ));
    v.push(case(
        G,
        "same-grant-twice-in-one-request",
        "blkif.h (segments are independent); blkback get_persistent_gnt",
        same_grant_twice,
    ));
    v.push(case(
        G,
        "writes-then-barrier",
        "blkif.h BLKIF_OP_WRITE_BARRIER; blkback xen_blk_drain_io",
        write_barrier_read,
    ));
    v.push(case(
        G,
        "sector-granular-writes",
        "blkif.h first_sect/last_sect",
        sector_granular,
    ));
    v
}
