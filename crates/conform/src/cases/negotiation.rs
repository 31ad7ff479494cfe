//! Negotiation: ring orders, queues, ABIs, persistent grants, indirect limits, missing
//! and garbage nodes, state jumps.

use std::time::Duration;

use blkif::abi::{Protocol, BLKIF_OP_READ, BLKIF_RSP_ERROR};
use blkif::RawRequest;
use xenstore::XenbusState;

use super::{case, connected, ensure, io_on_every_ring, require, Case};
use crate::front::{Connect, RawFront, Setup};
use crate::target::DeviceRequest;
use crate::verdict::{CaseResult, Ctx, Verdict};

const G: &str = "negotiation";

/// Connects with `setup` on a fresh device and expects the backend to refuse (Closing
/// or Closed, `xenbus_dev_fatal`), not to connect.
fn refused(ctx: &mut Ctx<'_>, setup: &Setup) -> CaseResult {
    let mut f = RawFront::open(ctx, DeviceRequest::default())?;
    match f.connect(setup)? {
        Connect::Refused { .. } => Ok(()),
        other => Err(Verdict::fail(format!("expected a refusal, got {other:?}"))),
    }
}

/// Connects with a setup built from what the backend advertised.
fn refused_with(ctx: &mut Ctx<'_>, make: impl Fn(&RawFront) -> Setup) -> CaseResult {
    let mut f = RawFront::open(ctx, DeviceRequest::default())?;
    let setup = make(&f);
    match f.connect(&setup)? {
        Connect::Refused { .. } => Ok(()),
        other => Err(Verdict::fail(format!("expected a refusal, got {other:?}"))),
    }
}

fn ring_order(ctx: &mut Ctx<'_>, order: u32) -> CaseResult {
    let mut f = RawFront::open(ctx, DeviceRequest::default())?;
    require(
        order <= f.adv.max_ring_order,
        format!("backend's max-ring-page-order is {}", f.adv.max_ring_order),
    )?;
    f.connect_ok(&Setup {
        order,
        ..Setup::default()
    })?;
    io_on_every_ring(&mut f)?;
    f.close()
}

fn ring_order_above_max(ctx: &mut Ctx<'_>) -> CaseResult {
    let mut f = RawFront::open(ctx, DeviceRequest::default())?;
    let order = f.adv.max_ring_order + 1;
    let setup = Setup {
        order: order.min(blkif::abi::MAX_RING_PAGE_ORDER),
        ..Setup::default()
    };
    f.build_rings(1, setup.order, setup.abi, 0)?;
    let mut nodes = f.ring_nodes(&setup);
    // Beyond the largest ring blkif.h defines: one granted page per extra reference.
    for i in (1u32 << setup.order)..(1u32 << order) {
        let g = f.grant_to(f.backend_domid, false)?.1;
        nodes.push((format!("ring-ref{i}"), Some(g.to_string())));
    }
    nodes.push(("ring-page-order".into(), Some(order.to_string())));
    f.write_nodes(&nodes)?;
    f.write_state(XenbusState::Initialised)?;
    match f.await_connect()? {
        Connect::Refused { .. } => Ok(()),
        other => Err(Verdict::fail(format!(
            "ring-page-order {order} above max-ring-page-order: expected a refusal, got {other:?}"
        ))),
    }
}

fn queues(ctx: &mut Ctx<'_>, want: Option<u32>) -> CaseResult {
    let mut f = RawFront::open(ctx, DeviceRequest::default())?;
    let n = want.unwrap_or(f.adv.max_queues);
    require(
        n <= f.adv.max_queues,
        format!("backend's multi-queue-max-queues is {}", f.adv.max_queues),
    )?;
    f.connect_ok(&Setup {
        queues: n,
        ..Setup::default()
    })?;
    io_on_every_ring(&mut f)?;
    f.close()
}

fn abi(ctx: &mut Ctx<'_>, abi: Protocol, node: Option<&str>) -> CaseResult {
    let mut f = connected(
        ctx,
        DeviceRequest::default(),
        &Setup {
            protocol: node.map(str::to_owned),
            abi,
            ..Setup::default()
        },
    )?;
    io_on_every_ring(&mut f)?;
    f.close()
}

fn persistent(ctx: &mut Ctx<'_>, on: bool) -> CaseResult {
    let mut f = connected(
        ctx,
        DeviceRequest::default(),
        &Setup {
            persistent: on,
            ..Setup::default()
        },
    )?;
    let buf = f.buffer(1, false)?;
    for round in 0..3 {
        super::write_read_verify(&mut f, 0, &buf, 8, 0x500 + round * 2)?;
    }
    if !on || !f.adv.persistent {
        // Without persistent grants the backend unmaps each page when its request is
        // answered (blkback xen_blkbk_unmap): ending access must succeed at once.
        let g = buf.grefs[0];
        f.revoke(g).map_err(|e| match e {
            Verdict::Fail(r) | Verdict::Skip(r) => Verdict::fail(format!(
                "data page still mapped after its requests were answered without persistent grants: {r}"
            )),
        })?;
    }
    f.close()
}

fn indirect_max(ctx: &mut Ctx<'_>) -> CaseResult {
    let mut f = connected(ctx, DeviceRequest::default(), &Setup::default())?;
    let max = f.adv.max_indirect_segments;
    require(max > 11, "backend offers no indirect descriptors")?;
    require(
        max <= 4096,
        format!("{max} segments is more than the suite allocates"),
    )?;
    super::integrity::indirect_round(&mut f, max as usize, 0x1d1)?;
    f.close()
}

fn indirect_over(ctx: &mut Ctx<'_>) -> CaseResult {
    let mut f = connected(ctx, DeviceRequest::default(), &Setup::default())?;
    let max = f.adv.max_indirect_segments;
    require(max > 11, "backend offers no indirect descriptors")?;
    let n = max as usize + 1;
    let pages = n.div_ceil(512);
    require(
        pages <= 8,
        "the limit plus one does not fit 8 indirect pages",
    )?;
    let data = f.buffer(n.min(64), false)?;
    let ind = f.buffer(pages, false)?;
    let segs: Vec<_> = (0..n)
        .map(|i| crate::front::seg(data.grefs[i % data.grefs.len()], 0, 7))
        .collect();
    super::integrity::write_descriptors(&f, &ind, &segs)?;
    let req = RawRequest::indirect(
        BLKIF_OP_READ,
        7,
        f.handle,
        0,
        u16::try_from(n).unwrap_or(u16::MAX),
        &ind.grefs,
    )
    .ok_or_else(|| Verdict::fail("case bug"))?;
    f.expect(&req, BLKIF_RSP_ERROR)?;
    f.close()
}

/// A node blkif.h defines as a number holds text. Linux blkback reads
/// `ring-page-order` with xenbus_scanf and `multi-queue-num-queues` with
/// xenbus_read_unsigned: unparsable is "absent" (one page with `ring-ref`; one queue with
/// the top-level nodes) and the device connects. blkif.h has no rule for it, so refusing
/// the device (Closing, `xenbus_dev_fatal`) is the other answer that keeps to it. What
/// may not happen: a hang, a connection that does not work, or a crash.
fn unparsable(ctx: &mut Ctx<'_>, key: &'static str) -> CaseResult {
    let mut f = RawFront::open(ctx, DeviceRequest::default())?;
    match f.connect(&with_nodes(vec![node(key, Some("two"))]))? {
        Connect::Refused { .. } => {
            ctx.note("refused the device");
            Ok(())
        }
        Connect::Connected => {
            io_on_every_ring(&mut f)?;
            f.close()?;
            ctx.note("connected as if the node were absent");
            Ok(())
        }
        other => Err(Verdict::fail(format!(
            "neither refused nor connected: {other:?}"
        ))),
    }
}

fn reconnect(ctx: &mut Ctx<'_>, skip_closing: bool) -> CaseResult {
    let mut f = connected(ctx, DeviceRequest::default(), &Setup::default())?;
    io_on_every_ring(&mut f)?;
    if !skip_closing {
        f.write_state(XenbusState::Closing)?;
        f.wait_backend(|s| s >= XenbusState::Closing)?;
    }
    f.write_state(XenbusState::Closed)?;
    let s = f.wait_backend(|s| s == XenbusState::Closed)?;
    ensure(
        s == XenbusState::Closed,
        format!("backend is {s:?} after Closed"),
    )?;
    // blkif_free: the old rings' grants end once the backend let go of them.
    let fe = f.fe.clone();
    drop_rings_and_reopen(&mut f)?;
    f.write_state(XenbusState::Initialising)?;
    let s = f.wait_backend(|s| s == XenbusState::InitWait)?;
    ensure(
        s == XenbusState::InitWait,
        format!("backend is {s:?}, not InitWait, after {fe} reinitialised"),
    )?;
    f.connect_ok(&Setup::default())?;
    io_on_every_ring(&mut f)?;
    f.close()
}

/// Ends the old connection's grants (the backend must have unmapped them at Closed)
/// and forgets its rings, keeping the device.
fn drop_rings_and_reopen(f: &mut RawFront) -> CaseResult {
    f.release_connection()
}

fn state_jump_connected(ctx: &mut Ctx<'_>) -> CaseResult {
    let f = RawFront::open(ctx, DeviceRequest::default())?;
    // No rings published: connect_ring has nothing to read.
    f.write_state(XenbusState::Connected)?;
    let s = f.wait_backend(|s| s >= XenbusState::Connected)?;
    ensure(
        matches!(s, XenbusState::Closing | XenbusState::Closed),
        format!("backend is {s:?}; a Connected frontend without rings must be refused"),
    )
}

fn state_garbage(ctx: &mut Ctx<'_>, value: &'static str) -> CaseResult {
    let mut f = connected(ctx, DeviceRequest::default(), &Setup::default())?;
    f.write_node("state", value)?;
    // blkback frontend_changed: an undefined state is fatal (Closing).
    let s = f.wait_backend(|s| s >= XenbusState::Closing)?;
    ensure(
        matches!(s, XenbusState::Closing | XenbusState::Closed),
        format!("backend is {s:?} after the frontend wrote state {value:?}"),
    )?;
    f.close()
}

fn initialised_again(ctx: &mut Ctx<'_>) -> CaseResult {
    let mut f = connected(ctx, DeviceRequest::default(), &Setup::default())?;
    f.write_state(XenbusState::Initialised)?;
    std::thread::sleep(Duration::from_millis(50));
    let s = f.backend_state()?;
    ensure(
        s == XenbusState::Connected,
        format!("backend is {s:?} after a second Initialised"),
    )?;
    io_on_every_ring(&mut f)?;
    f.close()
}

/// `ring-ref` names a page the backend may not map: a revoked grant (`foreign` false)
/// or one granted to another domain.
fn ring_ref_unusable(ctx: &mut Ctx<'_>, foreign: bool) -> CaseResult {
    let mut f = RawFront::open(ctx, DeviceRequest::default())?;
    let setup = Setup::default();
    // The rings first: a grant reference revoked before them could be reused by them.
    f.build_rings(1, 0, setup.abi, 0)?;
    let g = if foreign {
        let other = f.backend_domid.wrapping_add(7);
        f.grant_to(other, false)?.1
    } else {
        let g = f.grant_to(f.backend_domid, false)?.1;
        f.revoke(g)?;
        g
    };
    let mut nodes = f.ring_nodes(&setup);
    nodes.push(("ring-ref".into(), Some(g.to_string())));
    f.write_nodes(&nodes)?;
    f.write_state(XenbusState::Initialised)?;
    match f.await_connect()? {
        Connect::Refused { .. } => Ok(()),
        other => Err(Verdict::fail(format!("expected a refusal, got {other:?}"))),
    }
}

fn node(k: &str, v: Option<&str>) -> (String, Option<String>) {
    (k.to_owned(), v.map(str::to_owned))
}

fn with_nodes(nodes: Vec<(String, Option<String>)>) -> Setup {
    Setup {
        nodes,
        ..Setup::default()
    }
}

pub(super) fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    geometry_cases(&mut v);
    abi_feature_cases(&mut v);
    node_cases(&mut v);
    state_cases(&mut v);
    v
}

fn geometry_cases(v: &mut Vec<Case>) {
    for order in 0..=4u32 {
        v.push(case(
            G,
            format!("ring-order-{order}"),
            "blkif.h max-ring-page-order/ring-page-order; blkback read_per_ring_refs",
            move |c| ring_order(c, order),
        ));
    }
    v.push(case(
        G,
        "ring-order-above-max",
        "blkback read_per_ring_refs (order > max_ring_page_order is fatal)",
        ring_order_above_max,
    ));
    v.push(case(
        G,
        "ring-ref0-at-order-0",
        "blkif.h (ring-page-order 0 with ring-ref0); blkback read_per_ring_refs multi_ref",
        |c| {
            let mut f = connected(
                c,
                DeviceRequest::default(),
                &Setup {
                    legacy_keys: false,
                    ..Setup::default()
                },
            )?;
            io_on_every_ring(&mut f)?;
            f.close()
        },
    ));
    v.push(case(G, "queues-1", "blkif.h multi-queue-num-queues", |c| {
        queues(c, Some(1))
    }));
    v.push(case(G, "queues-2", "blkif.h multi-queue-num-queues", |c| {
        queues(c, Some(2))
    }));
    v.push(case(
        G,
        "queues-max",
        "blkif.h multi-queue-max-queues; blkback connect_ring",
        |c| queues(c, None),
    ));
    v.push(case(
        G,
        "queues-above-max",
        "blkback connect_ring (requested queues > max is fatal)",
        |c| {
            refused_with(c, |f| {
                with_nodes(vec![node(
                    "multi-queue-num-queues",
                    Some(&(f.adv.max_queues + 1).to_string()),
                )])
            })
        },
    ));
    v.push(case(
        G,
        "queues-zero",
        "blkback connect_ring (0 queues is fatal)",
        |c| {
            refused(
                c,
                &with_nodes(vec![node("multi-queue-num-queues", Some("0"))]),
            )
        },
    ));
}

fn abi_feature_cases(v: &mut Vec<Case>) {
    for (name, p) in [
        ("abi-x86_32", Protocol::X86_32),
        ("abi-x86_64", Protocol::X86_64),
    ] {
        v.push(case(
            G,
            name,
            "blkif.h protocol; blkback connect_ring, common.h blkif_x86_{32,64}_request",
            move |c| abi(c, p, Some(p.xenstore_name())),
        ));
    }
    v.push(case(
        G,
        "abi-native-name",
        "blkif.h XEN_IO_PROTO_ABI_NATIVE",
        |c| {
            abi(
                c,
                Protocol::native(),
                Some(Protocol::native().xenstore_name()),
            )
        },
    ));
    v.push(case(
        G,
        "abi-absent",
        "blkif.h protocol (default: native; Linux blkback on x86 assumes x86_32)",
        |c| abi(c, Protocol::native(), None),
    ));
    v.push(case(
        G,
        "abi-garbage",
        "blkback connect_ring (unknown protocol is fatal)",
        |c| {
            refused(
                c,
                &Setup {
                    protocol: Some("sparc-abi".into()),
                    ..Setup::default()
                },
            )
        },
    ));
    v.push(case(
        G,
        "persistent-on",
        "blkif.h feature-persistent",
        |c| persistent(c, true),
    ));
    v.push(case(
        G,
        "persistent-off",
        "blkif.h feature-persistent; blkback xen_blkbk_unmap",
        |c| persistent(c, false),
    ));
    v.push(case(
        G,
        "indirect-at-limit",
        "blkif.h feature-max-indirect-segments",
        indirect_max,
    ));
    v.push(case(
        G,
        "indirect-above-limit",
        "blkback xen_blkbk_parse_indirect / dispatch_rw_block_io (nseg > max)",
        indirect_over,
    ));
}

fn node_cases(v: &mut Vec<Case>) {
    for (name, key) in [
        ("event-channel-missing", "event-channel"),
        ("ring-ref-missing", "ring-ref"),
    ] {
        v.push(case(
            G,
            name,
            "blkback read_per_ring_refs (missing node is fatal)",
            move |c| refused(c, &with_nodes(vec![node(key, None)])),
        ));
    }
    for (name, key, val) in [
        ("event-channel-garbage", "event-channel", "port"),
        ("ring-ref-garbage", "ring-ref", "0x"),
        ("event-channel-unbound", "event-channel", "4000"),
    ] {
        v.push(case(
            G,
            name,
            "blkback read_per_ring_refs / xen_blkif_map (bad node is fatal)",
            move |c| refused(c, &with_nodes(vec![node(key, Some(val))])),
        ));
    }
    v.push(case(
        G,
        "ring-ref-legacy-key-at-order-1",
        "blkback read_per_ring_refs (ring-page-order present: ring-ref0.. required)",
        |c| {
            refused(
                c,
                &Setup {
                    order: 1,
                    nodes: vec![node("ring-ref", Some("8")), node("ring-ref0", None)],
                    ..Setup::default()
                },
            )
        },
    ));
    v.push(case(
        G,
        "queue-directory-missing",
        "blkback connect_ring (queue-%u/ nodes read per queue)",
        |c| {
            let mut f = RawFront::open(c, DeviceRequest::default())?;
            require(f.adv.max_queues >= 2, "backend offers one queue")?;
            match f.connect(&Setup {
                queues: 2,
                nodes: vec![node("queue-1", None)],
                ..Setup::default()
            })? {
                Connect::Refused { .. } => Ok(()),
                other => Err(Verdict::fail(format!("expected a refusal, got {other:?}"))),
            }
        },
    ));
    v.push(case(
        G,
        "persistent-garbage",
        "blkback connect_ring (xenbus_read_unsigned: unparsable means 0)",
        |c| {
            let mut f = connected(
                c,
                DeviceRequest::default(),
                &with_nodes(vec![node("feature-persistent", Some("yes"))]),
            )?;
            io_on_every_ring(&mut f)?;
            f.close()
        },
    ));
    v.push(case(
        G,
        "ring-page-order-unparsable",
        "blkback connect_ring (xenbus_scanf fails: one page) or a refusal; blkif.h has no rule",
        |c| unparsable(c, "ring-page-order"),
    ));
    v.push(case(
        G,
        "queues-unparsable",
        "blkback connect_ring (xenbus_read_unsigned: 1 queue) or a refusal; blkif.h has no rule",
        |c| unparsable(c, "multi-queue-num-queues"),
    ));
    v.push(case(
        G,
        "ring-ref-revoked",
        "blkback xen_blkif_map (xenbus_map_ring fails: fatal)",
        |c| ring_ref_unusable(c, false),
    ));
    v.push(case(
        G,
        "ring-ref-foreign",
        "blkback xen_blkif_map (xenbus_map_ring fails: fatal)",
        |c| ring_ref_unusable(c, true),
    ));
}

fn state_cases(v: &mut Vec<Case>) {
    v.push(case(
        G,
        "state-jump-to-connected",
        "blkback frontend_changed (Connected runs connect_ring; missing nodes are fatal)",
        state_jump_connected,
    ));
    v.push(case(
        G,
        "state-undefined",
        "blkback frontend_changed default: xenbus_dev_fatal",
        |c| state_garbage(c, "42"),
    ));
    v.push(case(
        G,
        "initialised-while-connected",
        "blkback frontend_changed (Initialised while Connected is ignored)",
        initialised_again,
    ));
    v.push(case(
        G,
        "reconnect-after-close",
        "blkback frontend_changed (Initialising while Closed: InitWait again)",
        |c| reconnect(c, false),
    ));
    v.push(case(
        G,
        "reconnect-after-closed-without-closing",
        "blkback frontend_changed (Closed: disconnect; then Initialising)",
        |c| reconnect(c, true),
    ));
}
