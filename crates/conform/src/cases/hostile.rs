//! A hostile guest: ring index overflow and rewind, revoked and foreign grants,
//! read-only grants written by the backend, event storms, responses never consumed,
//! state flapping, death mid-I/O, garbage on the ring.

use std::sync::atomic::Ordering;
use std::time::Duration;

use blkif::abi::{
    BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY,
};
use blkif::RawRequest;
use xenstore::XenbusState;

use super::{case, connected, direct, ensure, io_on_every_ring, Case};
use crate::front::{check_response, page_segs, pattern, seg, RawFront, Setup};
use crate::target::DeviceRequest;
use crate::verdict::{CaseResult, Ctx, Verdict};

const G: &str = "hostile";
/// `req_prod`'s offset in the shared ring header (ring.h).
const REQ_PROD: usize = 0;

fn dev(ctx: &mut Ctx<'_>) -> Result<RawFront, Verdict> {
    connected(ctx, DeviceRequest::default(), &Setup::default())
}

/// Publishes `req_prod` as `value` (no slot written) and notifies.
fn set_req_prod(f: &mut RawFront, value: u32) -> CaseResult {
    let r = f.ring(0)?;
    r.front
        .memory()
        .store_u32(REQ_PROD, value, Ordering::Release)
        .map_err(|e| Verdict::fail(format!("ring header: {e}")))?;
    r.evtchn.notify()?;
    Ok(())
}

/// No response may come within a short wait (the ring is halted).
fn silent(f: &mut RawFront) -> CaseResult {
    let got = f.responses_within(0, 1, Duration::from_millis(200))?;
    ensure(
        got.is_empty(),
        format!("the backend answered {} bogus request(s)", got.len()),
    )
}

/// Notes what became of the device after a halted ring: Linux blkback keeps it
/// Connected (the ring alone stops); failing it visibly is the other answer.
fn note_halt(ctx: &mut Ctx<'_>, f: &RawFront) -> CaseResult {
    f.wait_backend_for(Duration::from_secs(1), |s| s >= XenbusState::Closing)?;
    match device_failed(f)? {
        Some(error) => ctx.note(format!("ring halted, device failed: {error}")),
        None => ctx.note(format!("ring halted, device {:?}", f.backend_state()?)),
    }
    Ok(())
}

/// The backend's `error` node if it failed the device (Closing or Closed); a failure
/// without one is a case failure (the guest could not tell why).
fn device_failed(f: &RawFront) -> Result<Option<String>, Verdict> {
    let s = f.backend_state()?;
    if !matches!(s, XenbusState::Closing | XenbusState::Closed) {
        return Ok(None);
    }
    f.read_backend("error")?
        .map(Some)
        .ok_or_else(|| Verdict::fail(format!("the device went {s:?} with no `error` node")))
}

fn overflow(ctx: &mut Ctx<'_>) -> CaseResult {
    let mut f = dev(ctx)?;
    let size = f.rings[0].front.size();
    // blkback __do_block_io_op: RING_REQUEST_PROD_OVERFLOW halts the ring.
    set_req_prod(&mut f, size + 5)?;
    silent(&mut f)?;
    note_halt(ctx, &f)?;
    f.close()
}

fn rewind(ctx: &mut Ctx<'_>) -> CaseResult {
    let mut f = dev(ctx)?;
    let b = f.buffer(1, false)?;
    for i in 0..3 {
        let r = direct(BLKIF_OP_READ, i, f.handle, 0, &page_segs(&b.grefs))?;
        f.expect(&r, BLKIF_RSP_OKAY)?;
    }
    // req_prod moved behind req_cons: req_prod - req_cons is ~2^32.
    set_req_prod(&mut f, 1)?;
    silent(&mut f)?;
    note_halt(ctx, &f)?;
    f.close()
}

fn wrap(ctx: &mut Ctx<'_>) -> CaseResult {
    let mut f = connected(
        ctx,
        DeviceRequest::default(),
        &Setup {
            start_index: u32::MAX - 20,
            ..Setup::default()
        },
    )?;
    let b = f.buffer(1, false)?;
    for i in 0..48u64 {
        super::write_read_verify(&mut f, 0, &b, i * 8, 0x700 + 2 * i)?;
    }
    f.close()
}

/// A request over a page the backend may not use must fail with ERROR.
fn bad_grant(ctx: &mut Ctx<'_>, op: u8, how: &'static str) -> CaseResult {
    let mut f = dev(ctx)?;
    let (frame, g) = match how {
        "revoked" => {
            let (fr, g) = f.grant_to(f.backend_domid, false)?;
            f.write_page(fr, 0, &[0xaa; 4096])?;
            f.revoke(g)?;
            (None, g)
        }
        "foreign" => {
            let other = f.backend_domid.wrapping_add(7);
            let (fr, g) = f.grant_to(other, false)?;
            (Some(fr), g)
        }
        "readonly" => {
            let (fr, g) = f.grant_to(f.backend_domid, true)?;
            (Some(fr), g)
        }
        _ => (None, 0x00ff_fff0),
    };
    if let Some(fr) = frame {
        f.write_page(fr, 0, &[0xaa; 4096])?;
    }
    let req = direct(op, 0x80, f.handle, 0, &[seg(g, 0, 7)])?;
    f.expect(&req, BLKIF_RSP_ERROR)?;
    if let (Some(fr), "readonly") = (frame, how) {
        let mut back = vec![0u8; 4096];
        f.read_page(fr, 0, &mut back)?;
        ensure(
            back.iter().all(|&b| b == 0xaa),
            "the backend wrote into a page granted read-only",
        )?;
    }
    f.close()
}

/// A write whose data page is granted read-only. Without persistent grants blkback
/// xen_blkbk_map maps a write's data pages read-only (`!use_persistent_gnts && ro`):
/// OKAY. With them, blkif.h lets the backend map every grant writable (the frontend
/// promised to reuse grants for reads too) and blkback does, so the map of a read-only
/// grant fails: ERROR there; a backend that serves the write from the read-only grant
/// (grant copy) keeps to blkif.h as well. Either way the data must be right if OKAY.
fn readonly_grant_write(ctx: &mut Ctx<'_>, persistent: bool) -> CaseResult {
    let mut f = connected(
        ctx,
        DeviceRequest::default(),
        &Setup {
            persistent,
            ..Setup::default()
        },
    )?;
    let b = f.buffer(1, true)?;
    f.fill(&b, |_| pattern(0x81, 0))?;
    let w = direct(BLKIF_OP_WRITE, 0x81, f.handle, 16, &page_segs(&b.grefs))?;
    if persistent && f.adv.persistent {
        let rsp = f.call(&w)?;
        if rsp.status == BLKIF_RSP_ERROR {
            check_response(&rsp, &w, BLKIF_RSP_ERROR)?;
            ctx.note("refused the read-only grant (ERROR)");
            return f.close();
        }
        check_response(&rsp, &w, BLKIF_RSP_OKAY)?;
        ctx.note("served the write from the read-only grant (OKAY)");
    } else {
        f.expect(&w, BLKIF_RSP_OKAY)?;
    }
    let rb = f.buffer(1, false)?;
    let r = direct(BLKIF_OP_READ, 0x82, f.handle, 16, &page_segs(&rb.grefs))?;
    f.expect(&r, BLKIF_RSP_OKAY)?;
    super::verify(&f, &rb, 0x81)?;
    f.close()
}

fn event_storm(ctx: &mut Ctx<'_>) -> CaseResult {
    let mut f = dev(ctx)?;
    for _ in 0..20_000 {
        f.rings[0].evtchn.notify()?;
    }
    io_on_every_ring(&mut f)?;
    f.close()
}

fn never_consume(ctx: &mut Ctx<'_>) -> CaseResult {
    let mut f = dev(ctx)?;
    let b = f.buffer(1, false)?;
    let size = f.rings[0].front.size() as u64;
    let reqs: Vec<RawRequest> = (0..size)
        .map(|i| direct(BLKIF_OP_READ, i, f.handle, 0, &page_segs(&b.grefs)))
        .collect::<Result<_, _>>()?;
    f.submit_all(0, &reqs)?;
    // Responses pile up unread; the guest keeps kicking and then leaves.
    for _ in 0..50 {
        f.rings[0].evtchn.notify()?;
        std::thread::sleep(Duration::from_millis(2));
    }
    f.close()
}

fn close_mid_io(ctx: &mut Ctx<'_>) -> CaseResult {
    let mut f = dev(ctx)?;
    let b = f.buffer(11, false)?;
    let size = f.rings[0].front.size() as u64;
    let reqs: Vec<RawRequest> = (0..size)
        .map(|i| direct(BLKIF_OP_WRITE, i, f.handle, i * 88, &page_segs(&b.grefs)))
        .collect::<Result<_, _>>()?;
    f.submit_all(0, &reqs)?;
    f.close()
}

fn flap(ctx: &mut Ctx<'_>) -> CaseResult {
    let mut f = dev(ctx)?;
    let b = f.buffer(1, false)?;
    let reqs: Vec<RawRequest> = (0..16)
        .map(|i| direct(BLKIF_OP_READ, i, f.handle, 0, &page_segs(&b.grefs)))
        .collect::<Result<_, _>>()?;
    f.submit_all(0, &reqs)?;
    let states = [
        XenbusState::Initialised,
        XenbusState::Connected,
        XenbusState::InitWait,
        XenbusState::Initialising,
        XenbusState::Connected,
    ];
    for i in 0..60 {
        f.write_state(states[i % states.len()])?;
    }
    f.close()
}

fn death(ctx: &mut Ctx<'_>) -> CaseResult {
    let mut f = dev(ctx)?;
    let b = f.buffer(11, false)?;
    let size = f.rings[0].front.size() as u64;
    let reqs: Vec<RawRequest> = (0..size)
        .map(|i| direct(BLKIF_OP_WRITE, i, f.handle, i * 88, &page_segs(&b.grefs)))
        .collect::<Result<_, _>>()?;
    f.submit_all(0, &reqs)?;
    let (fe, be) = (f.fe.clone(), f.be.clone());
    f.abandon();
    ctx.target.kill_guest_device(&fe, &be)?;
    Ok(())
}

fn garbage(ctx: &mut Ctx<'_>) -> CaseResult {
    let mut f = dev(ctx)?;
    let n = 16u64;
    let mut x = 0x1234_5678_9abc_def1u64;
    let size = f.abi.request_size();
    let mut ids = Vec::new();
    for i in 0..n {
        let mut slot = vec![0u8; size];
        for b in slot.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        // Opcodes 7..=255 are undefined: blkback answers EOPNOTSUPP.
        slot[0] = 7 + (i as u8 * 15) % 249;
        let id = 0xbad0 + i;
        let l = f.abi.layout();
        slot[l.other.id..l.other.id + 8].copy_from_slice(&id.to_le_bytes());
        ids.push((id, slot[0]));
        f.ring(0)?.front.push_raw_request(&slot)?;
    }
    {
        let r = f.ring(0)?;
        r.front.push_requests_and_check_notify();
        r.evtchn.notify()?;
    }
    let got = f.responses(0, n as usize)?;
    for (rsp, (id, op)) in got.iter().zip(&ids) {
        check_response(
            rsp,
            &RawRequest::Other {
                operation: *op,
                id: *id,
            },
            BLKIF_RSP_EOPNOTSUPP,
        )?;
    }
    f.close()
}

/// An indirect request whose descriptor page is unusable, or whose descriptors are.
fn bad_indirect(ctx: &mut Ctx<'_>, how: &'static str) -> CaseResult {
    let mut f = dev(ctx)?;
    crate::cases::require(f.adv.max_indirect_segments > 11, "no indirect descriptors")?;
    let data = f.buffer(16, false)?;
    let ind = f.buffer(1, false)?;
    let mut segs = page_segs(&data.grefs);
    if how == "descriptor" {
        segs[9] = seg(data.grefs[9], 2, 8);
    }
    crate::cases::integrity::write_descriptors(&f, &ind, &segs)?;
    if how == "revoked" {
        f.revoke(ind.grefs[0])?;
    }
    let req = RawRequest::indirect(BLKIF_OP_READ, 0x90, f.handle, 0, 16, &ind.grefs)
        .ok_or_else(|| Verdict::fail("case bug"))?;
    f.expect(&req, BLKIF_RSP_ERROR)?;
    f.close()
}

fn exactly_full(ctx: &mut Ctx<'_>) -> CaseResult {
    // RING_REQUEST_PROD_OVERFLOW's boundary: `size` unanswered requests are legal.
    let mut f = dev(ctx)?;
    let size = f.rings[0].front.size() as u64;
    let b = f.buffer(1, false)?;
    for round in 0..3 {
        let reqs: Vec<RawRequest> = (0..size)
            .map(|i| {
                direct(
                    BLKIF_OP_READ,
                    round * 1000 + i,
                    f.handle,
                    i * 8,
                    &page_segs(&b.grefs),
                )
            })
            .collect::<Result<_, _>>()?;
        f.submit_all(0, &reqs)?;
        let got = f.responses(0, size as usize)?;
        ensure(
            got.iter().all(|r| r.status == BLKIF_RSP_OKAY),
            "a request of a full ring failed",
        )?;
    }
    f.close()
}

/// One queue of two overflows. Linux blkback halts that ring alone
/// (`__do_block_io_op`) and the other keeps serving; blkif.h has no rule. The other
/// allowed answer is to fail the whole device visibly (Closing with an `error` node,
/// `xenbus_dev_fatal`). What may not happen: the healthy queue stalls while the device
/// still claims to be Connected.
fn one_queue_halted(ctx: &mut Ctx<'_>) -> CaseResult {
    let mut f = RawFront::open(ctx, DeviceRequest::default())?;
    crate::cases::require(f.adv.max_queues >= 2, "backend offers one queue")?;
    f.connect_ok(&Setup {
        queues: 2,
        ..Setup::default()
    })?;
    let size = f.rings[0].front.size();
    set_req_prod(&mut f, size + 5)?;
    silent(&mut f)?;
    f.wait_backend_for(Duration::from_secs(1), |s| s >= XenbusState::Closing)?;
    if let Some(error) = device_failed(&f)? {
        ctx.note(format!("failed the whole device: {error}"));
        return f.close();
    }
    let b = f.buffer(1, false)?;
    match super::write_read_verify(&mut f, 1, &b, 64, 0x91) {
        Ok(()) => ctx.note("the other queue kept serving"),
        // A slow backend may fail the device only now: still a visible failure.
        Err(e) => match device_failed(&f)? {
            Some(error) => ctx.note(format!("failed the whole device: {error}")),
            None => return Err(e),
        },
    }
    f.close()
}

fn same_port(ctx: &mut Ctx<'_>) -> CaseResult {
    let mut f = RawFront::open(ctx, DeviceRequest::default())?;
    crate::cases::require(f.adv.max_queues >= 2, "backend offers one queue")?;
    let setup = Setup {
        queues: 2,
        ..Setup::default()
    };
    f.build_rings(2, 0, setup.abi, 0)?;
    let mut nodes = f.ring_nodes(&setup);
    let p0 = f.rings[0].evtchn.port().to_string();
    nodes.push(("queue-1/event-channel".into(), Some(p0)));
    f.write_nodes(&nodes)?;
    f.write_state(XenbusState::Initialised)?;
    match f.await_connect()? {
        crate::front::Connect::Refused { .. } => Ok(()),
        other => Err(Verdict::fail(format!(
            "two queues on one event channel: expected a refusal, got {other:?}"
        ))),
    }
}

pub(super) fn cases() -> Vec<Case> {
    let mut v = vec![
        case(
            G,
            "req-prod-overflow",
            "blkback __do_block_io_op (RING_REQUEST_PROD_OVERFLOW halts the ring)",
            overflow,
        ),
        case(
            G,
            "req-prod-rewind",
            "blkback __do_block_io_op (RING_REQUEST_PROD_OVERFLOW halts the ring)",
            rewind,
        ),
        case(
            G,
            "ring-index-wraparound",
            "ring.h (free-running indices); blkback xen_blkif_map (BACK_RING_ATTACH at rsp_prod)",
            wrap,
        ),
    ];
    for (name, op, how) in [
        ("revoked-grant-read", BLKIF_OP_READ, "revoked"),
        ("revoked-grant-write", BLKIF_OP_WRITE, "revoked"),
        ("foreign-grant", BLKIF_OP_WRITE, "foreign"),
        ("readonly-grant-read", BLKIF_OP_READ, "readonly"),
        ("gref-beyond-table", BLKIF_OP_READ, "beyond"),
    ] {
        v.push(case(
            G,
            name,
            "blkback xen_blkbk_map (a failed map answers ERROR)",
            move |c| bad_grant(c, op, how),
        ));
    }
    v.push(case(
        G,
        "readonly-grant-write",
        "blkback xen_blkbk_map (GNTMAP_readonly for writes without persistent grants)",
        |c| readonly_grant_write(c, false),
    ));
    v.push(case(
        G,
        "readonly-grant-write-persistent",
        "blkif.h feature-persistent (grants may be mapped writable); blkback xen_blkbk_map (ERROR)",
        |c| readonly_grant_write(c, true),
    ));
    v.push(case(
        G,
        "event-storm",
        "XSA-332 (event storms from a frontend)",
        event_storm,
    ));
    v.push(case(
        G,
        "never-consume-responses",
        "blkback make_response (responses are not waited for); xen_blkif_disconnect",
        never_consume,
    ));
    v.push(case(
        G,
        "close-with-io-in-flight",
        "blkback xen_blkif_disconnect (waits for in-flight I/O, unmaps)",
        close_mid_io,
    ));
    v.push(case(G, "state-flapping", "blkback frontend_changed", flap));
    v.push(case(
        G,
        "guest-death-mid-io",
        "blkback xen_blkif_disconnect; libxl device removal",
        death,
    ));
    v.push(case(
        G,
        "random-unknown-opcodes",
        "blkback dispatch_other_io (EOPNOTSUPP, id echoed)",
        garbage,
    ));
    v.push(case(
        G,
        "indirect-page-revoked",
        "blkback xen_blkbk_parse_indirect (unmappable indirect page: ERROR)",
        |c| bad_indirect(c, "revoked"),
    ));
    v.push(case(
        G,
        "indirect-descriptor-past-page",
        "blkback xen_blkbk_parse_indirect (last_sect >= 8 in a descriptor: ERROR)",
        |c| bad_indirect(c, "descriptor"),
    ));
    v.push(case(
        G,
        "ring-exactly-full",
        "ring.h RING_REQUEST_PROD_OVERFLOW (a full ring is legal)",
        exactly_full,
    ));
    v.push(case(
        G,
        "overflow-one-queue-of-two",
        "blkback __do_block_io_op (the overflowing ring alone is halted) or a visible device failure",
        one_queue_halted,
    ));
    v.push(case(
        G,
        "two-queues-one-port",
        "blkback xen_blkif_map (bind_interdomain fails for a bound port)",
        same_port,
    ));
    v
}
