//! Operations and their edge cases: segment and sector bounds, read-only devices,
//! flush/barrier/discard advertised and not, unknown opcodes, indirect counts, request
//! ids, response padding.

use blkif::abi::{
    BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT, BLKIF_OP_READ, BLKIF_OP_RESERVED_1,
    BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY,
};
use blkif::{RawRequest, Segment};

use super::{case, connected, direct, ensure, require, write_read_verify, Case};
use crate::front::{check_response, page_segs, pattern, seg, status_name, RawFront, Setup};
use crate::target::DeviceRequest;
use crate::verdict::{CaseResult, Ctx, Verdict};

const G: &str = "ops";

fn dev(ctx: &mut Ctx<'_>) -> Result<RawFront, Verdict> {
    connected(ctx, DeviceRequest::default(), &Setup::default())
}

/// A request on a fresh connection must get `status`.
fn expect_status(
    ctx: &mut Ctx<'_>,
    status: i16,
    make: impl Fn(&mut RawFront) -> Result<RawRequest, Verdict>,
) -> CaseResult {
    let mut f = dev(ctx)?;
    let req = make(&mut f)?;
    f.expect(&req, status)?;
    f.close()
}

fn one_page(f: &mut RawFront, op: u8, sector: u64) -> Result<RawRequest, Verdict> {
    let b = f.buffer(1, false)?;
    direct(op, 0x51, f.handle, sector, &page_segs(&b.grefs))
}

fn segs_n(f: &mut RawFront, op: u8, n: u8) -> Result<RawRequest, Verdict> {
    let b = f.buffer(11, false)?;
    let mut segments = [Segment::default(); 11];
    for (s, &g) in segments.iter_mut().zip(&b.grefs) {
        *s = seg(g, 0, 7);
    }
    Ok(RawRequest::ReadWrite {
        operation: op,
        nr_segments: n,
        handle: f.handle,
        id: 0x52,
        sector_number: 0,
        segments,
    })
}

fn sub_page(ctx: &mut Ctx<'_>) -> CaseResult {
    // Three segments covering sectors 3..=7, 0..=7 and 0..=2 of their pages are 16
    // consecutive disk sectors (an O_DIRECT buffer that starts mid-page).
    let mut f = dev(ctx)?;
    let src = f.buffer(3, false)?;
    f.fill(&src, |i| pattern(0x5b, i as u64))?;
    let segs = [
        seg(src.grefs[0], 3, 7),
        seg(src.grefs[1], 0, 7),
        seg(src.grefs[2], 0, 2),
    ];
    let w = direct(BLKIF_OP_WRITE, 0x53, f.handle, 40, &segs)?;
    f.expect(&w, BLKIF_RSP_OKAY)?;
    let dst = f.buffer(2, false)?;
    let r = direct(BLKIF_OP_READ, 0x54, f.handle, 40, &page_segs(&dst.grefs))?;
    f.expect(&r, BLKIF_RSP_OKAY)?;
    let mut expect = Vec::new();
    let p: Vec<Vec<u8>> = (0..3).map(|i| pattern(0x5b, i)).collect();
    expect.extend_from_slice(&p[0][3 * 512..]);
    expect.extend_from_slice(&p[1]);
    expect.extend_from_slice(&p[2][..3 * 512]);
    let mut got = vec![0u8; 8192];
    f.read_page(dst.frames[0], 0, &mut got[..4096])?;
    f.read_page(dst.frames[1], 0, &mut got[4096..])?;
    ensure(
        got == expect,
        "sub-page segments landed on the wrong sectors",
    )?;
    f.close()
}

fn read_only(ctx: &mut Ctx<'_>, write: bool) -> CaseResult {
    let mut f = connected(
        ctx,
        DeviceRequest {
            read_only: true,
            ..DeviceRequest::default()
        },
        &Setup::default(),
    )?;
    ensure(
        f.adv.read_only(),
        format!(
            "read-only device without VDISK_READONLY in info ({:#x})",
            f.adv.info
        ),
    )?;
    let op = if write { BLKIF_OP_WRITE } else { BLKIF_OP_READ };
    let req = one_page(&mut f, op, 0)?;
    f.expect(
        &req,
        if write {
            BLKIF_RSP_ERROR
        } else {
            BLKIF_RSP_OKAY
        },
    )?;
    f.close()
}

fn cache_op(ctx: &mut Ctx<'_>, op: u8) -> CaseResult {
    let mut f = dev(ctx)?;
    let advertised = if op == BLKIF_OP_FLUSH_DISKCACHE {
        f.adv.flush
    } else {
        f.adv.barrier
    };
    let req = direct(op, 0x55, f.handle, 0, &[])?;
    if advertised {
        f.expect(&req, BLKIF_RSP_OKAY)?;
    } else {
        // blkif.h: without the feature the request may fail with EOPNOTSUPP.
        let rsp = f.call(&req)?;
        ensure(
            matches!(rsp.status, BLKIF_RSP_OKAY | BLKIF_RSP_EOPNOTSUPP),
            format!("not advertised: status {}", rsp.status),
        )?;
        ctx.note(format!(
            "not advertised; answered {}",
            status_name(rsp.status)
        ));
    }
    f.close()
}

fn discard(ctx: &mut Ctx<'_>, advertised: bool, secure: bool) -> CaseResult {
    let mut f = connected(
        ctx,
        DeviceRequest {
            no_discard: !advertised,
            ..DeviceRequest::default()
        },
        &Setup::default(),
    )?;
    if advertised {
        require(
            f.adv.discard,
            "backend does not offer discard for this device",
        )?;
    } else {
        require(!f.adv.discard, "backend offers discard on this device")?;
    }
    let req = RawRequest::discard(0x56, f.handle, 128, 64, secure);
    let rsp = f.call(&req)?;
    let ok = if secure && !f.adv.secure_discard {
        // blkif.h: BLKIF_DISCARD_SECURE is "ignored if discard-secure=0", and blkback
        // dispatch_discard_io (6.1) does a plain discard (OKAY); EOPNOTSUPP may come at
        // any time (older blkback answered it here). Never ERROR.
        matches!(rsp.status, BLKIF_RSP_OKAY | BLKIF_RSP_EOPNOTSUPP)
    } else if advertised {
        rsp.status == BLKIF_RSP_OKAY
    } else {
        // blkif.h: a discard may fail with EOPNOTSUPP at any time; never ERROR.
        matches!(rsp.status, BLKIF_RSP_OKAY | BLKIF_RSP_EOPNOTSUPP)
    };
    ensure(
        ok && rsp.id == req.id(),
        format!("status {} for id {:#x}", rsp.status, rsp.id),
    )?;
    if secure || !advertised {
        ctx.note(format!("answered {}", status_name(rsp.status)));
    }
    f.close()
}

fn discard_out_of_range(ctx: &mut Ctx<'_>) -> CaseResult {
    let mut f = dev(ctx)?;
    require(f.adv.discard, "backend does not offer discard")?;
    let req = RawRequest::discard(0x57, f.handle, f.adv.sectors - 8, 16, false);
    f.expect(&req, BLKIF_RSP_ERROR)?;
    f.close()
}

fn id_reuse(ctx: &mut Ctx<'_>) -> CaseResult {
    let mut f = dev(ctx)?;
    let a = f.buffer(1, false)?;
    let b = f.buffer(1, false)?;
    f.fill(&a, |_| pattern(1, 0))?;
    f.fill(&b, |_| pattern(2, 0))?;
    let wa = direct(BLKIF_OP_WRITE, 7, f.handle, 0, &page_segs(&a.grefs))?;
    let wb = direct(BLKIF_OP_WRITE, 7, f.handle, 8, &page_segs(&b.grefs))?;
    f.submit_all(0, &[wa, wb])?;
    let r = f.responses(0, 2)?;
    for rsp in &r {
        check_response(rsp, &wa, BLKIF_RSP_OKAY)?;
    }
    write_read_verify(&mut f, 0, &a, 16, 0x77)?;
    f.close()
}

fn id_echo(ctx: &mut Ctx<'_>) -> CaseResult {
    let mut f = dev(ctx)?;
    let b = f.buffer(1, false)?;
    for id in [0u64, u64::MAX, 0x8000_0000_0000_0001] {
        let r = direct(BLKIF_OP_READ, id, f.handle, 0, &page_segs(&b.grefs))?;
        f.expect(&r, BLKIF_RSP_OKAY)?;
    }
    f.close()
}

/// XSA-216: every byte of a response slot that is not id, operation or status must be
/// zero, though the slot held the request before.
fn response_padding(ctx: &mut Ctx<'_>) -> CaseResult {
    let mut f = dev(ctx)?;
    let b = f.buffer(1, false)?;
    let req = direct(BLKIF_OP_READ, u64::MAX, f.handle, 0, &page_segs(&b.grefs))?;
    // id u64::MAX: the request's id bytes lie under the response's padding in
    // every layout.
    let l = f.abi.layout();
    let idx = f.rings[0].front.req_prod_pvt();
    let size = f.rings[0].front.size();
    f.submit(0, &req)?;
    let rsp = f.responses(0, 1)?;
    check_response(&rsp[0], &req, BLKIF_RSP_OKAY)?;
    let slot = 64 + (idx % size) as usize * l.slot_size;
    let mut raw = vec![0u8; l.response.size];
    f.rings[0]
        .front
        .memory()
        .read(slot, &mut raw)
        .map_err(|e| Verdict::fail(format!("reading the slot: {e}")))?;
    // A padding byte may be zero or the byte the request itself left in the slot (Linux
    // blkback writes the response's fields one by one since XSA-216, leaving the guest's
    // own request bytes under the padding): either way nothing of the backend's memory.
    let own = req.encode(f.abi);
    let r = &l.response;
    let mut kept_request_bytes = false;
    for (i, &v) in raw.iter().enumerate() {
        let field = (r.id..r.id + 8).contains(&i)
            || i == r.operation
            || (r.status..r.status + 2).contains(&i);
        if field || v == 0 {
            continue;
        }
        if own.get(i) == Some(&v) {
            kept_request_bytes = true;
            continue;
        }
        return Err(Verdict::fail(format!(
            "response padding byte {i} is {v:#x}: neither zero nor the request's own byte"
        )));
    }
    f.close()?;
    if kept_request_bytes {
        ctx.note("padding holds the request's own bytes (as Linux blkback leaves them)");
    }
    Ok(())
}

pub(super) fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    rw_cases(&mut v);
    feature_cases(&mut v);
    opcode_cases(&mut v);
    v
}

fn rw_cases(v: &mut Vec<Case>) {
    v.push(case(
        G,
        "read-write-one-page",
        "blkif.h BLKIF_OP_READ/WRITE",
        |c| {
            let mut f = dev(c)?;
            let b = f.buffer(1, false)?;
            write_read_verify(&mut f, 0, &b, 0, 0x60)?;
            f.close()
        },
    ));
    v.push(case(
        G,
        "read-write-11-segments",
        "blkif.h BLKIF_MAX_SEGMENTS_PER_REQUEST",
        |c| {
            let mut f = dev(c)?;
            let b = f.buffer(11, false)?;
            write_read_verify(&mut f, 0, &b, 88, 0x62)?;
            f.close()
        },
    ));
    v.push(case(
        G,
        "zero-segments-read",
        "blkback dispatch_rw_block_io (nseg 0 only for flush)",
        |c| expect_status(c, BLKIF_RSP_ERROR, |f| segs_n(f, BLKIF_OP_READ, 0)),
    ));
    v.push(case(
        G,
        "twelve-direct-segments",
        "blkback dispatch_rw_block_io (nseg > BLKIF_MAX_SEGMENTS_PER_REQUEST)",
        |c| expect_status(c, BLKIF_RSP_ERROR, |f| segs_n(f, BLKIF_OP_WRITE, 12)),
    ));
    v.push(case(
        G,
        "segments-255",
        "blkback dispatch_rw_block_io (nseg > BLKIF_MAX_SEGMENTS_PER_REQUEST)",
        |c| expect_status(c, BLKIF_RSP_ERROR, |f| segs_n(f, BLKIF_OP_READ, 255)),
    ));
    for (name, first, last) in [
        ("first-sect-after-last", 4u8, 3u8),
        ("last-sect-beyond-page", 0, 8),
        ("last-sect-255", 0, 255),
    ] {
        v.push(case(
            G,
            name,
            "blkif.h first_sect/last_sect; blkback dispatch_rw_block_io",
            move |c| {
                expect_status(c, BLKIF_RSP_ERROR, |f| {
                    let b = f.buffer(1, false)?;
                    direct(
                        BLKIF_OP_READ,
                        0x58,
                        f.handle,
                        0,
                        &[seg(b.grefs[0], first, last)],
                    )
                })
            },
        ));
    }
    v.push(case(
        G,
        "sub-page-segments",
        "blkif.h first_sect/last_sect (sectors within a page)",
        sub_page,
    ));
    v.push(case(
        G,
        "last-page-of-disk",
        "blkback xen_vbd_translate",
        |c| {
            let mut f = dev(c)?;
            let b = f.buffer(1, false)?;
            let last = f.adv.sectors - 8;
            write_read_verify(&mut f, 0, &b, last, 0x64)?;
            f.close()
        },
    ));
    for (name, back) in [("sector-past-end", 0u64), ("sector-straddles-end", 4)] {
        v.push(case(
            G,
            name,
            "blkback xen_vbd_translate (sector + nr_sects > size)",
            move |c| {
                expect_status(c, BLKIF_RSP_ERROR, |f| {
                    let s = f.adv.sectors - back;
                    one_page(f, BLKIF_OP_WRITE, s)
                })
            },
        ));
    }
}

fn feature_cases(v: &mut Vec<Case>) {
    v.push(case(
        G,
        "sector-wraps-around",
        "blkback xen_vbd_translate (sector + nr_sects overflow)",
        |c| {
            expect_status(c, BLKIF_RSP_ERROR, |f| {
                one_page(f, BLKIF_OP_READ, u64::MAX - 3)
            })
        },
    ));
    v.push(case(
        G,
        "read-only-write-refused",
        "blkback xen_vbd_translate (write to a read-only vbd)",
        |c| read_only(c, true),
    ));
    v.push(case(
        G,
        "read-only-read",
        "blkback connect (VDISK_READONLY in info); reads allowed",
        |c| read_only(c, false),
    ));
    v.push(case(
        G,
        "read-only-discard-refused",
        "blkback dispatch_discard_io (xen_vbd_translate refuses a write op on a read-only vbd)",
        |c| {
            let mut f = connected(
                c,
                DeviceRequest {
                    read_only: true,
                    ..DeviceRequest::default()
                },
                &Setup::default(),
            )?;
            let req = RawRequest::discard(0x5b, f.handle, 0, 8, false);
            let rsp = f.call(&req)?;
            ensure(
                rsp.id == req.id() && matches!(rsp.status, BLKIF_RSP_ERROR | BLKIF_RSP_EOPNOTSUPP),
                format!("discard on a read-only vbd: status {}", rsp.status),
            )?;
            c.note(format!("answered {}", status_name(rsp.status)));
            f.close()
        },
    ));
    v.push(case(
        G,
        "flush",
        "blkif.h BLKIF_OP_FLUSH_DISKCACHE / feature-flush-cache",
        |c| cache_op(c, BLKIF_OP_FLUSH_DISKCACHE),
    ));
    v.push(case(
        G,
        "barrier",
        "blkif.h BLKIF_OP_WRITE_BARRIER / feature-barrier",
        |c| cache_op(c, BLKIF_OP_WRITE_BARRIER),
    ));
    v.push(case(
        G,
        "flush-with-data",
        "blkback dispatch_rw_block_io (FLUSH_DISKCACHE with segments writes them)",
        |c| {
            let mut f = dev(c)?;
            require(f.adv.flush, "backend does not offer flush")?;
            let b = f.buffer(1, false)?;
            f.fill(&b, |_| pattern(0x66, 0))?;
            let w = direct(
                BLKIF_OP_FLUSH_DISKCACHE,
                0x59,
                f.handle,
                256,
                &page_segs(&b.grefs),
            )?;
            f.expect(&w, BLKIF_RSP_OKAY)?;
            f.fill(&b, |_| vec![0u8; 4096])?;
            let r = direct(BLKIF_OP_READ, 0x5a, f.handle, 256, &page_segs(&b.grefs))?;
            f.expect(&r, BLKIF_RSP_OKAY)?;
            super::verify(&f, &b, 0x66)?;
            f.close()
        },
    ));
    v.push(case(
        G,
        "discard",
        "blkif.h BLKIF_OP_DISCARD / feature-discard",
        |c| discard(c, true, false),
    ));
    v.push(case(
        G,
        "discard-not-advertised",
        "blkif.h BLKIF_OP_DISCARD (may fail with EOPNOTSUPP)",
        |c| discard(c, false, false),
    ));
    v.push(case(
        G,
        "secure-discard",
        "blkif.h BLKIF_DISCARD_SECURE (ignored if discard-secure=0); blkback dispatch_discard_io",
        |c| discard(c, true, true),
    ));
    v.push(case(
        G,
        "discard-past-end",
        "blkback dispatch_discard_io (xen_vbd_translate)",
        discard_out_of_range,
    ));
}

fn opcode_cases(v: &mut Vec<Case>) {
    for (name, op) in [
        ("opcode-reserved-4", BLKIF_OP_RESERVED_1),
        ("opcode-255", 255u8),
    ] {
        v.push(case(
            G,
            name,
            "blkback dispatch_other_io (EOPNOTSUPP)",
            move |c| {
                expect_status(c, BLKIF_RSP_EOPNOTSUPP, |_| {
                    Ok(RawRequest::Other {
                        operation: op,
                        id: 0x5c,
                    })
                })
            },
        ));
    }
    v.push(case(
        G,
        "indirect-zero-segments",
        "blkback xen_blkbk_parse_indirect / dispatch_rw_block_io (nseg 0)",
        |c| {
            expect_status(c, BLKIF_RSP_ERROR, |f| {
                require(f.adv.max_indirect_segments > 11, "no indirect descriptors")?;
                let ind = f.buffer(1, false)?;
                RawRequest::indirect(BLKIF_OP_READ, 0x5d, f.handle, 0, 0, &ind.grefs)
                    .ok_or_else(|| Verdict::fail("case bug"))
            })
        },
    ));
    v.push(case(
        G,
        "indirect-flush-op",
        "blkback dispatch_rw_block_io (indirect_op other than READ/WRITE)",
        |c| {
            expect_status(c, BLKIF_RSP_ERROR, |f| {
                require(f.adv.max_indirect_segments > 11, "no indirect descriptors")?;
                let ind = f.buffer(1, false)?;
                RawRequest::indirect(BLKIF_OP_FLUSH_DISKCACHE, 0x5e, f.handle, 0, 1, &ind.grefs)
                    .ok_or_else(|| Verdict::fail("case bug"))
            })
        },
    ));
    v.push(case(
        G,
        "indirect-nested",
        "blkback dispatch_rw_block_io (indirect_op INDIRECT)",
        |c| {
            expect_status(c, BLKIF_RSP_ERROR, |f| {
                require(f.adv.max_indirect_segments > 11, "no indirect descriptors")?;
                let ind = f.buffer(1, false)?;
                RawRequest::indirect(BLKIF_OP_INDIRECT, 0x5f, f.handle, 0, 1, &ind.grefs)
                    .ok_or_else(|| Verdict::fail("case bug"))
            })
        },
    ));
    v.push(case(
        G,
        "request-id-reuse",
        "blkif.h (id is opaque to the backend, echoed)",
        id_reuse,
    ));
    v.push(case(
        G,
        "request-id-echo",
        "blkif.h blkif_response.id",
        id_echo,
    ));
    v.push(case(
        G,
        "response-padding-zero",
        "XSA-216 (response padding leaked backend memory; zero or the request's own bytes)",
        response_padding,
    ));
}
