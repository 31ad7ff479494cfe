//! [`RawFront`]: a blkif frontend whose every step a case controls.
//!
//! It does what Linux's xen-blkfront does (`talk_to_blkback`, `setup_blkring`,
//! `blkif_queue_rq`, `blkif_free`) through the [`blkfront::Guest`] seam, but writes
//! exactly the nodes, states and ring slots the case asks for, so a case can be an
//! honest frontend or a hostile one. It distrusts the backend: responses are decoded from
//! private copies and checked by the case.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use blkfront::guest::{EndAccessError, Frame, GrantRef};
use blkfront::{Guest, GuestEventChannel};
use blkif::abi::{Protocol, PAGE_SIZE};
use blkif::{FrontRing, RawRequest, Response, Segment};
use xenstore::{XenbusState, XsClient, XsOps};

use crate::target::{Device, DeviceRequest};
use crate::verdict::{Ctx, Verdict};

/// The backend's nodes a frontend reads (at InitWait, then at Connected).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Advertised {
    pub max_queues: u32,
    pub max_ring_order: u32,
    pub max_indirect_segments: u32,
    pub persistent: bool,
    pub flush: bool,
    pub barrier: bool,
    pub discard: bool,
    pub secure_discard: bool,
    pub sectors: u64,
    pub sector_size: u32,
    pub info: u32,
}

impl Advertised {
    pub fn read_only(&self) -> bool {
        self.info & blkfront::features::VDISK_READONLY != 0
    }
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct Setup {
    pub queues: u32,
    pub order: u32,
    /// The `protocol` node's value; `None`: no node (the backend's native ABI).
    pub protocol: Option<String>,
    /// The ABI the rings are encoded in.
    pub abi: Protocol,
    pub persistent: bool,
    /// One page, one queue: `ring-ref` and no `ring-page-order` (Linux); off:
    /// `ring-page-order` 0 and `ring-ref0`.
    pub legacy_keys: bool,
    /// Written after the standard nodes (value `None`: the node is removed).
    pub nodes: Vec<(String, Option<String>)>,
    /// Every ring index starts here (ring.h's indices are free-running u32s).
    pub start_index: u32,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            queues: 1,
            order: 0,
            protocol: Some(Protocol::native().xenstore_name().into()),
            abi: Protocol::native(),
            persistent: true,
            legacy_keys: true,
            nodes: Vec::new(),
            start_index: 0,
        }
    }
}

impl Setup {
    pub fn with_abi(abi: Protocol) -> Self {
        Setup {
            protocol: Some(abi.xenstore_name().into()),
            abi,
            ..Setup::default()
        }
    }
}

/// One ring of the connection.
pub struct Ring {
    pub front: FrontRing,
    pub evtchn: Box<dyn GuestEventChannel>,
    pub grefs: Vec<GrantRef>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").field("grefs", &self.grefs).finish()
    }
}

/// Granted data pages.
#[derive(Debug, Clone)]
pub struct Buf {
    pub frames: Vec<Frame>,
    pub grefs: Vec<GrantRef>,
}

/// What the backend did with the connection attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connect {
    Connected,
    /// The backend went Closing/Closed (its `error` node, if any).
    Refused {
        state: XenbusState,
        error: Option<String>,
    },
    /// It stayed where it was.
    NoAnswer(XenbusState),
}

/// A frontend on one device.
pub struct RawFront {
    guest: Arc<dyn Guest>,
    xs: XsClient,
    pub fe: String,
    pub be: String,
    pub backend_domid: u16,
    pub handle: u16,
    pub abi: Protocol,
    pub rings: Vec<Ring>,
    pub adv: Advertised,
    grants: Vec<GrantRef>,
    frames: Vec<Frame>,
    closed: bool,
    state_timeout: Duration,
    io_timeout: Duration,
}

impl std::fmt::Debug for RawFront {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawFront").field("fe", &self.fe).finish()
    }
}

fn parse_u64(v: Option<Vec<u8>>) -> Option<u64> {
    v.and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.trim().parse().ok())
}

impl RawFront {
    /// Opens a device and waits for the backend's InitWait; reads what it advertises.
    pub fn open(ctx: &mut Ctx<'_>, req: DeviceRequest) -> Result<RawFront, Verdict> {
        let Device {
            frontend_path,
            backend_path,
            backend_domid,
            xs,
            handle,
        } = ctx.target.open_device(&req)?;
        ctx.opened(&frontend_path, &backend_path);
        let mut f = RawFront {
            guest: ctx.target.guest(),
            xs,
            fe: frontend_path,
            be: backend_path,
            backend_domid,
            handle,
            abi: Protocol::native(),
            rings: Vec::new(),
            adv: Advertised::default(),
            grants: Vec::new(),
            frames: Vec::new(),
            closed: false,
            state_timeout: ctx.target.state_timeout(),
            io_timeout: ctx.target.io_timeout(),
        };
        let s = f.wait_backend(|s| s == XenbusState::InitWait)?;
        if s != XenbusState::InitWait {
            return Err(Verdict::fail(format!("backend is {s:?}, not InitWait")));
        }
        f.adv.max_queues = f.read_u64("multi-queue-max-queues")?.unwrap_or(1) as u32;
        f.adv.max_ring_order = f.read_u64("max-ring-page-order")?.unwrap_or(0) as u32;
        f.adv.max_indirect_segments =
            f.read_u64("feature-max-indirect-segments")?.unwrap_or(0) as u32;
        Ok(f)
    }

    pub fn io_timeout(&self) -> Duration {
        self.io_timeout
    }

    pub fn guest(&self) -> &Arc<dyn Guest> {
        &self.guest
    }

    /// A backend node, parsed as an unsigned number.
    pub fn read_u64(&self, key: &str) -> Result<Option<u64>, Verdict> {
        Ok(parse_u64(self.xs.read_opt(&format!("{}/{key}", self.be))?))
    }

    /// A backend node as text.
    pub fn read_backend(&self, key: &str) -> Result<Option<String>, Verdict> {
        Ok(self
            .xs
            .read_opt(&format!("{}/{key}", self.be))?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// Writes a frontend node.
    pub fn write_node(&self, key: &str, value: &str) -> Result<(), Verdict> {
        self.xs.write(&format!("{}/{key}", self.fe), value)?;
        Ok(())
    }

    /// Writes the frontend's `state`.
    pub fn write_state(&self, s: XenbusState) -> Result<(), Verdict> {
        self.write_node("state", &s.node_value())
    }

    /// The backend's `state` (`Unknown` if missing or garbage; `Closed` if the backend
    /// directory is gone).
    pub fn backend_state(&self) -> Result<XenbusState, Verdict> {
        Ok(match self.xs.read_opt(&format!("{}/state", self.be))? {
            Some(v) => XenbusState::parse(&v).unwrap_or(XenbusState::Unknown),
            None => XenbusState::Closed,
        })
    }

    /// Polls the backend's state until `pred` holds or the state timeout passes; the
    /// last state seen.
    pub fn wait_backend(&self, pred: impl Fn(XenbusState) -> bool) -> Result<XenbusState, Verdict> {
        self.wait_backend_for(self.state_timeout, pred)
    }

    pub fn wait_backend_for(
        &self,
        timeout: Duration,
        pred: impl Fn(XenbusState) -> bool,
    ) -> Result<XenbusState, Verdict> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.backend_state()?;
            if pred(s) || Instant::now() >= deadline {
                return Ok(s);
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Allocates, grants and initialises `queues` rings of `2^order` pages each, with
    /// their event channels (nothing written to xenstore).
    pub fn build_rings(
        &mut self,
        queues: u32,
        order: u32,
        abi: Protocol,
        start: u32,
    ) -> Result<(), Verdict> {
        self.abi = abi;
        for _ in 0..queues {
            let pages = 1usize << order;
            let frames = self.guest.alloc_frames(pages)?;
            self.frames.extend(&frames);
            let mut grefs = Vec::with_capacity(pages);
            for &f in &frames {
                let g = self.guest.grant_access(self.backend_domid, f, false)?;
                self.grants.push(g);
                grefs.push(g);
            }
            let mem = self.guest.map_frames(&frames)?;
            let front = FrontRing::new_at(mem, abi, start)?;
            let evtchn = self.guest.alloc_event_channel(self.backend_domid)?;
            self.rings.push(Ring {
                front,
                evtchn,
                grefs,
            });
        }
        Ok(())
    }

    /// The nodes `talk_to_blkback` writes for `setup` and the rings built.
    pub fn ring_nodes(&self, setup: &Setup) -> Vec<(String, Option<String>)> {
        let mut n: Vec<(String, Option<String>)> = Vec::new();
        let multi_page = setup.order > 0 || !setup.legacy_keys;
        if multi_page {
            n.push(("ring-page-order".into(), Some(setup.order.to_string())));
        }
        let dirs: Vec<String> = if self.rings.len() == 1 {
            vec![String::new()]
        } else {
            n.push((
                "multi-queue-num-queues".into(),
                Some(self.rings.len().to_string()),
            ));
            (0..self.rings.len())
                .map(|i| format!("queue-{i}/"))
                .collect()
        };
        for (dir, r) in dirs.iter().zip(&self.rings) {
            if multi_page {
                for (i, g) in r.grefs.iter().enumerate() {
                    n.push((format!("{dir}ring-ref{i}"), Some(g.to_string())));
                }
            } else {
                n.push((format!("{dir}ring-ref"), Some(r.grefs[0].to_string())));
            }
            n.push((
                format!("{dir}event-channel"),
                Some(r.evtchn.port().to_string()),
            ));
        }
        if let Some(p) = &setup.protocol {
            n.push(("protocol".into(), Some(p.clone())));
        }
        n.push((
            "feature-persistent".into(),
            Some(if setup.persistent { "1" } else { "0" }.into()),
        ));
        n.extend(setup.nodes.iter().cloned());
        n
    }

    /// Writes `nodes` under the frontend directory in one transaction.
    pub fn write_nodes(&self, nodes: &[(String, Option<String>)]) -> Result<(), Verdict> {
        let fe = self.fe.clone();
        self.xs.transaction(|tx| {
            for (k, v) in nodes {
                let path = format!("{fe}/{k}");
                match v {
                    Some(v) => tx.write(&path, v)?,
                    None => match tx.rm(&path) {
                        Err(e) if e.is_not_found() => {}
                        other => other?,
                    },
                }
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Builds the rings, publishes them, writes Initialised and waits for the backend
    /// to connect or give up.
    pub fn connect(&mut self, setup: &Setup) -> Result<Connect, Verdict> {
        self.build_rings(setup.queues, setup.order, setup.abi, setup.start_index)?;
        let nodes = self.ring_nodes(setup);
        self.write_nodes(&nodes)?;
        self.write_state(XenbusState::Initialised)?;
        self.await_connect()
    }

    /// Waits for Connected (or a refusal) after the frontend wrote Initialised.
    pub fn await_connect(&mut self) -> Result<Connect, Verdict> {
        let s = self.wait_backend(|s| s >= XenbusState::Connected)?;
        match s {
            XenbusState::Connected => {
                self.read_disk()?;
                self.write_state(XenbusState::Connected)?;
                Ok(Connect::Connected)
            }
            XenbusState::Closing | XenbusState::Closed => Ok(Connect::Refused {
                state: s,
                error: self.read_backend("error")?,
            }),
            other => Ok(Connect::NoAnswer(other)),
        }
    }

    /// Connects as `setup` and insists on success.
    pub fn connect_ok(&mut self, setup: &Setup) -> Result<(), Verdict> {
        match self.connect(setup)? {
            Connect::Connected => Ok(()),
            other => Err(Verdict::fail(format!("backend did not connect: {other:?}"))),
        }
    }

    fn read_disk(&mut self) -> Result<(), Verdict> {
        let flag = |f: &Self, k: &str| -> Result<bool, Verdict> { Ok(f.read_u64(k)? == Some(1)) };
        self.adv.sectors = self
            .read_u64("sectors")?
            .ok_or_else(|| Verdict::fail("backend Connected without `sectors`"))?;
        self.adv.sector_size = self.read_u64("sector-size")?.unwrap_or(512) as u32;
        self.adv.info = self.read_u64("info")?.unwrap_or(0) as u32;
        self.adv.persistent = flag(self, "feature-persistent")?;
        self.adv.flush = flag(self, "feature-flush-cache")?;
        self.adv.barrier = flag(self, "feature-barrier")?;
        self.adv.discard = flag(self, "feature-discard")?;
        self.adv.secure_discard = flag(self, "discard-secure")?;
        Ok(())
    }

    /// `count` data pages granted to the backend (read-only grants if `readonly`).
    pub fn buffer(&mut self, count: usize, readonly: bool) -> Result<Buf, Verdict> {
        let mut frames = Vec::with_capacity(count);
        for _ in 0..count {
            frames.extend(self.guest.alloc_frames(1)?);
        }
        self.frames.extend(&frames);
        let mut grefs = Vec::with_capacity(count);
        for &f in &frames {
            let g = self.guest.grant_access(self.backend_domid, f, readonly)?;
            self.grants.push(g);
            grefs.push(g);
        }
        Ok(Buf { frames, grefs })
    }

    /// A page granted to `domid` (not necessarily the backend).
    pub fn grant_to(&mut self, domid: u16, readonly: bool) -> Result<(Frame, GrantRef), Verdict> {
        let f = self.guest.alloc_frames(1)?;
        self.frames.extend(&f);
        let g = self.guest.grant_access(domid, f[0], readonly)?;
        self.grants.push(g);
        Ok((f[0], g))
    }

    /// Ends a grant now (the case then uses the stale reference).
    pub fn revoke(&mut self, gref: GrantRef) -> Result<(), Verdict> {
        self.guest
            .end_access(gref)
            .map_err(|e| Verdict::fail(format!("revoking: {e}")))?;
        self.grants.retain(|&g| g != gref);
        Ok(())
    }

    pub fn write_page(&self, frame: Frame, offset: usize, data: &[u8]) -> Result<(), Verdict> {
        Ok(self.guest.write_frame(frame, offset, data)?)
    }

    pub fn read_page(&self, frame: Frame, offset: usize, out: &mut [u8]) -> Result<(), Verdict> {
        Ok(self.guest.read_frame(frame, offset, out)?)
    }

    /// Fills each page of `buf` with `pattern(page_index)`.
    pub fn fill(&self, buf: &Buf, pattern: impl Fn(usize) -> Vec<u8>) -> Result<(), Verdict> {
        for (i, &f) in buf.frames.iter().enumerate() {
            self.write_page(f, 0, &pattern(i))?;
        }
        Ok(())
    }

    /// Puts `req` on ring `q` and notifies.
    pub fn submit(&mut self, q: usize, req: &RawRequest) -> Result<(), Verdict> {
        let r = self.ring(q)?;
        r.front.push_request(req)?;
        r.front.push_requests_and_check_notify();
        r.evtchn.notify()?;
        Ok(())
    }

    /// Puts `reqs` on ring `q` with one publication and one notify.
    pub fn submit_all(&mut self, q: usize, reqs: &[RawRequest]) -> Result<(), Verdict> {
        let r = self.ring(q)?;
        for req in reqs {
            r.front.push_request(req)?;
        }
        r.front.push_requests_and_check_notify();
        r.evtchn.notify()?;
        Ok(())
    }

    pub fn ring(&mut self, q: usize) -> Result<&mut Ring, Verdict> {
        self.rings
            .get_mut(q)
            .ok_or_else(|| Verdict::fail(format!("no ring {q}")))
    }

    /// Waits for `n` responses on ring `q` (fails if they do not come in time).
    pub fn responses(&mut self, q: usize, n: usize) -> Result<Vec<Response>, Verdict> {
        let timeout = self.io_timeout;
        let got = self.responses_within(q, n, timeout)?;
        if got.len() < n {
            return Err(Verdict::fail(format!(
                "{} of {n} responses within {timeout:?}",
                got.len()
            )));
        }
        Ok(got)
    }

    /// Up to `n` responses on ring `q`, waiting at most `timeout`.
    pub fn responses_within(
        &mut self,
        q: usize,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Response>, Verdict> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        let r = self.ring(q)?;
        loop {
            while out.len() < n {
                match r.front.pop_response()? {
                    Some(rsp) => out.push(rsp),
                    None => break,
                }
            }
            if out.len() >= n {
                return Ok(out);
            }
            if !r.front.final_check_for_responses()? {
                let now = Instant::now();
                if now >= deadline {
                    return Ok(out);
                }
                r.evtchn
                    .wait((deadline - now).min(Duration::from_millis(20)))?;
            }
        }
    }

    /// Submits `req` on ring 0 and returns its one response.
    pub fn call(&mut self, req: &RawRequest) -> Result<Response, Verdict> {
        self.submit(0, req)?;
        let mut r = self.responses(0, 1)?;
        Ok(r.remove(0))
    }

    /// Submits `req` and checks its response is `status` for its id and operation.
    pub fn expect(&mut self, req: &RawRequest, status: i16) -> Result<(), Verdict> {
        let rsp = self.call(req)?;
        check_response(&rsp, req, status)
    }

    /// Guest-initiated close (`blkfront_closing` then `blkif_free`): Closing, wait for
    /// the backend to follow, Closed, wait for Closed, then end every grant. A grant the
    /// backend still maps once it said Closed is a leak (Linux blkback unmaps everything
    /// in `xen_blkif_disconnect` before it switches to Closed).
    pub fn close(&mut self) -> Result<(), Verdict> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        let state = self.backend_state()?;
        if state != XenbusState::Closed {
            self.write_state(XenbusState::Closing)?;
            self.wait_backend(|s| s >= XenbusState::Closing)?;
        }
        self.write_state(XenbusState::Closed)?;
        let s = self.wait_backend(|s| s == XenbusState::Closed)?;
        let still = self.end_all_grants();
        if s != XenbusState::Closed {
            return Err(Verdict::fail(format!(
                "backend did not close: {s:?} after the frontend's Closed"
            )));
        }
        if !still.is_empty() {
            return Err(Verdict::fail(format!(
                "{} grant(s) still mapped by the backend after it went Closed: {still:?}",
                still.len()
            )));
        }
        Ok(())
    }

    /// Ends the connection's grants (the backend must have let go of them: it is
    /// Closed) and forgets its rings, keeping the device for another connection.
    pub fn release_connection(&mut self) -> Result<(), Verdict> {
        let still = self.end_all_grants();
        if !still.is_empty() {
            return Err(Verdict::fail(format!(
                "{} grant(s) still mapped by the backend after it went Closed: {still:?}",
                still.len()
            )));
        }
        Ok(())
    }

    /// Ends every grant (retrying for a second while the backend still maps some) and
    /// frees the pages; the grants that stayed mapped.
    fn end_all_grants(&mut self) -> Vec<GrantRef> {
        let deadline = Instant::now() + Duration::from_secs(1);
        let mut pending = std::mem::take(&mut self.grants);
        loop {
            pending.retain(|&g| match self.guest.end_access(g) {
                Ok(()) | Err(EndAccessError::Invalid(_)) => false,
                Err(EndAccessError::StillMapped(_)) => true,
            });
            if pending.is_empty() || Instant::now() >= deadline {
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        self.rings.clear();
        if pending.is_empty() {
            let frames = std::mem::take(&mut self.frames);
            self.guest.free_frames(&frames);
        }
        // Pages of grants still mapped are never reused (they stay allocated).
        pending
    }

    /// Drops everything without telling the backend (the guest died): grants and pages
    /// stay as they are, for the toolstack to clean up.
    pub fn abandon(&mut self) {
        self.closed = true;
        self.rings.clear();
    }
}

impl Drop for RawFront {
    fn drop(&mut self) {
        if !self.closed {
            let _ = self.close();
        }
    }
}

/// A data segment over page `gref`, sectors `first..=last` of the page.
pub fn seg(gref: GrantRef, first: u8, last: u8) -> Segment {
    Segment {
        gref,
        first_sect: first,
        last_sect: last,
    }
}

/// Whole-page segments over `grefs`.
pub fn page_segs(grefs: &[GrantRef]) -> Vec<Segment> {
    grefs.iter().map(|&g| seg(g, 0, 7)).collect()
}

/// Checks `rsp` answers `req` with `status`.
pub fn check_response(rsp: &Response, req: &RawRequest, status: i16) -> Result<(), Verdict> {
    if rsp.id != req.id() {
        return Err(Verdict::fail(format!(
            "response id {:#x}, request id {:#x}",
            rsp.id,
            req.id()
        )));
    }
    if rsp.operation != req.response_operation() {
        return Err(Verdict::fail(format!(
            "response operation {}, expected {}",
            rsp.operation,
            req.response_operation()
        )));
    }
    if rsp.status != status {
        return Err(Verdict::fail(format!(
            "status {} ({}), expected {} ({})",
            rsp.status,
            status_name(rsp.status),
            status,
            status_name(status)
        )));
    }
    Ok(())
}

pub fn status_name(s: i16) -> &'static str {
    match s {
        blkif::abi::BLKIF_RSP_OKAY => "OKAY",
        blkif::abi::BLKIF_RSP_ERROR => "ERROR",
        blkif::abi::BLKIF_RSP_EOPNOTSUPP => "EOPNOTSUPP",
        _ => "?",
    }
}

/// A derivable page of data: `seed` and the page number decide every byte.
pub fn pattern(seed: u64, page: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(page.wrapping_mul(0xD1B5_4A32_D192_ED03))
        | 1;
    let mut out = vec![0u8; PAGE_SIZE];
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    out
}
