//! One queue: a shared ring with its event channel, grants, shadow table and completions.
//!
//! This module owns Linux's `struct blkfront_ring_info` and the functions that work on it:
//! `blkif_queue_rw_req` / `blkif_queue_discard_req` (turning a chunk into a ring request,
//! granting its pages, filling indirect pages), `blkif_interrupt` / `blkif_completion`
//! (validating each response against the shadow table, copying read data out of
//! persistent grants, ending grant access) and `blkif_free_ring` (teardown).
//!
//! Requests are grouped in *joins*: one block-layer I/O (a caller's read, write, flush or
//! discard) split into one or more ring requests, completed when its last part completes.
//! A queue is driven by one thread at a time (the frontend wraps it in a mutex), so none
//! of this needs atomics; what all queues share is in `Shared`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use blkif::abi::{
    BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_READ, BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
};
use blkif::{FrontRing, RawRequest, RingError, Segment};

use crate::error::{Error, IoError};
use crate::features::CacheControl;
use crate::guest::{Frame, GrantRef, Guest, GuestEventChannel};
use crate::layout::{
    indirect_pages_for, Chunk, MAX_DIRECT_SEGMENTS, PAGE_SIZE, SEGMENTS_PER_INDIRECT_PAGE,
};
use crate::shadow::ShadowTable;

mod complete;
mod grants;

use grants::Granted;

/// The kind of a block-layer I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoOp {
    /// Read into memory.
    Read,
    /// Write from memory.
    Write,
    /// Cache flush (`BLKIF_OP_FLUSH_DISKCACHE` or `BLKIF_OP_WRITE_BARRIER`).
    Flush,
    /// Discard, optionally secure.
    Discard,
}

/// A finished asynchronous I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The token given at submission.
    pub token: u64,
    /// What it was.
    pub op: IoOp,
    /// How it ended.
    pub result: Result<(), IoError>,
    /// The data of a successful read (empty otherwise).
    pub data: Vec<u8>,
}

/// Counters of backend misbehaviour seen by the frontend.
#[derive(Debug, Default)]
pub(crate) struct AtomicStats {
    pub requests: AtomicU64,
    pub responses: AtomicU64,
    pub notifications: AtomicU64,
    pub bad_id: AtomicU64,
    pub not_in_flight: AtomicU64,
    pub wrong_operation: AtomicU64,
    pub rings_halted: AtomicU64,
    pub end_access_failures: AtomicU64,
    pub persistent_grants: AtomicU64,
}

/// A snapshot of the frontend's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FrontendStats {
    /// Ring requests pushed.
    pub requests: u64,
    /// Responses consumed (valid or not).
    pub responses: u64,
    /// Event-channel notifications sent to the backend.
    pub notifications: u64,
    /// Responses whose id is outside the shadow table.
    pub bad_id: u64,
    /// Responses naming an id with no request in flight (duplicates, inventions).
    pub not_in_flight: u64,
    /// Responses echoing the wrong operation.
    pub wrong_operation: u64,
    /// Rings halted because the backend produced impossible indices.
    pub rings_halted: u64,
    /// `end_access` refused because the backend still mapped the grant.
    pub end_access_failures: u64,
    /// Persistent grants currently held (pool, free or in use).
    pub persistent_grants: u64,
}

impl FrontendStats {
    /// Every kind of backend protocol violation, summed.
    pub fn protocol_errors(&self) -> u64 {
        self.bad_id + self.not_in_flight + self.wrong_operation + self.rings_halted
    }
}

impl AtomicStats {
    pub fn snapshot(&self) -> FrontendStats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        FrontendStats {
            requests: l(&self.requests),
            responses: l(&self.responses),
            notifications: l(&self.notifications),
            bad_id: l(&self.bad_id),
            not_in_flight: l(&self.not_in_flight),
            wrong_operation: l(&self.wrong_operation),
            rings_halted: l(&self.rings_halted),
            end_access_failures: l(&self.end_access_failures),
            persistent_grants: l(&self.persistent_grants),
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What every queue of one frontend shares.
pub(crate) struct Shared {
    pub guest: Arc<dyn Guest>,
    pub backend_domid: u16,
    /// `handle` in requests: the virtual device number (Linux uses the devid).
    pub handle: u16,
    pub persistent: bool,
    /// Segments per ring request (11 direct or the negotiated indirect maximum).
    pub max_segments: usize,
    /// [`CacheControl`] as a byte; Linux turns flush off after EOPNOTSUPP.
    pub cache: AtomicU8,
    /// Discard in use; Linux turns it off after EOPNOTSUPP.
    pub discard: AtomicBool,
    pub stats: AtomicStats,
}

impl Shared {
    pub fn cache(&self) -> CacheControl {
        match self.cache.load(Ordering::Relaxed) {
            1 => CacheControl::Flush,
            2 => CacheControl::Barrier,
            _ => CacheControl::None,
        }
    }

    pub fn set_cache(&self, c: CacheControl) {
        let v = match c {
            CacheControl::None => 0,
            CacheControl::Flush => 1,
            CacheControl::Barrier => 2,
        };
        self.cache.store(v, Ordering::Relaxed);
    }
}

/// One ring request in flight (Linux's `struct blk_shadow`).
struct Pending {
    join: u64,
    /// The operation the response must echo: the inner op for indirect requests.
    expect_op: u8,
    chunk: Chunk,
    data: Vec<Granted>,
    indirect: Vec<Granted>,
}

/// One block-layer I/O, possibly spanning several ring requests.
struct Join {
    token: u64,
    op: IoOp,
    sync: bool,
    /// A synchronous caller gave up waiting: drop the completion.
    abandoned: bool,
    parts_total: usize,
    parts_done: usize,
    result: Result<(), IoError>,
    /// A read's data, copied out of the granted pages as each part completes; empty
    /// when the caller asked not to have it ([`ReadData::Discard`]).
    data: Vec<u8>,
    copy_out: bool,
}

/// What happens to the data of a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadData {
    /// Copied out of the granted pages into [`Completion::data`] (what a guest's block
    /// layer gets).
    Copy,
    /// Left in the granted pages and dropped: for load generators, which want the
    /// backend's cost and not the guest's memcpy.
    Discard,
}

/// Where a write's data comes from.
#[derive(Debug, Clone, Copy)]
pub enum WriteData<'a> {
    /// Copied into the granted pages before the request is published.
    Bytes(&'a [u8]),
    /// Whatever the granted pages hold already (with persistent grants: the pool pages'
    /// last contents): for load generators, like [`ReadData::Discard`].
    InPlace,
}

/// A queue's construction parameters and resources, made by the connect code.
pub(crate) struct QueueResources {
    pub ring: FrontRing,
    pub ring_frames: Vec<Frame>,
    pub ring_grefs: Vec<GrantRef>,
    pub evtchn: Arc<dyn GuestEventChannel>,
}

pub(crate) struct Queue {
    index: usize,
    ring: Option<FrontRing>,
    ring_frames: Vec<Frame>,
    ring_grefs: Vec<GrantRef>,
    evtchn: Arc<dyn GuestEventChannel>,
    shadow: ShadowTable<Pending>,
    joins: ShadowTable<Join>,
    /// Free persistent grants (Linux's `rinfo->grants`).
    pool: Vec<(Frame, GrantRef)>,
    /// Persistent grants handed out, free or in use. Bounded by
    /// [`crate::layout::persistent_pool_limit`]: a ring full of maximal requests.
    pool_granted: usize,
    /// Free, ungranted indirect pages (non-persistent mode).
    indirect_frames: Vec<Frame>,
    /// Grants the backend still mapped at completion; retried before each reap and
    /// at teardown. Their pages are not reused meanwhile.
    deferred: Vec<Granted>,
    ready: VecDeque<Completion>,
    sync_done: Vec<(u64, Completion)>,
    halted: Option<RingError>,
    /// Emptied page lists of completed requests, reused by the next ones: no
    /// allocation per request in the steady state.
    spare_pages: Vec<Vec<Granted>>,
    /// Scratch for building a request's segments and indirect refs.
    segs: Vec<Segment>,
    indirect_grefs: Vec<GrantRef>,
    /// Scratch for splitting an I/O into ring requests.
    pub(crate) chunks: Vec<Chunk>,
}

impl Queue {
    pub fn new(index: usize, res: QueueResources) -> Self {
        let slots = res.ring.size() as usize;
        Self {
            index,
            ring: Some(res.ring),
            ring_frames: res.ring_frames,
            ring_grefs: res.ring_grefs,
            evtchn: res.evtchn,
            shadow: ShadowTable::new(slots),
            // A join exists only while at least one of its parts is in flight or about
            // to be pushed, so one more than the ring size always suffices.
            joins: ShadowTable::new(slots + 1),
            pool: Vec::new(),
            pool_granted: 0,
            indirect_frames: Vec::new(),
            deferred: Vec::new(),
            ready: VecDeque::new(),
            sync_done: Vec::new(),
            halted: None,
            spare_pages: Vec::new(),
            segs: Vec::new(),
            indirect_grefs: Vec::new(),
            chunks: Vec::new(),
        }
    }

    fn ring(&mut self) -> &mut FrontRing {
        self.ring.as_mut().expect("callers check_usable() first")
    }

    pub fn ring_size(&self) -> usize {
        self.shadow.capacity()
    }

    pub fn ring_grefs(&self) -> &[GrantRef] {
        &self.ring_grefs
    }

    pub fn port(&self) -> u32 {
        self.evtchn.port()
    }

    /// Whether the backend published responses not yet consumed (one load, no call).
    pub fn has_responses(&self) -> bool {
        self.ring
            .as_ref()
            .is_some_and(|r| r.unconsumed_responses() > 0)
    }

    /// Ring slots free for new requests.
    pub fn free_slots(&self) -> usize {
        self.shadow.free()
    }

    pub fn in_flight(&self) -> usize {
        self.shadow.in_flight()
    }

    /// `Ok` if requests may be pushed and responses reaped.
    pub fn check_usable(&self) -> Result<(), Error> {
        if self.ring.is_none() {
            return Err(Error::Closed);
        }
        match self.halted {
            Some(source) => Err(Error::RingHalted {
                queue: self.index,
                source,
            }),
            None => Ok(()),
        }
    }

    /// Starts a join of `parts` ring requests.
    pub fn begin(
        &mut self,
        token: u64,
        op: IoOp,
        sync: bool,
        parts: usize,
        read_len: usize,
        read_data: ReadData,
    ) -> u64 {
        let copy_out = op == IoOp::Read && read_data == ReadData::Copy;
        let join = Join {
            token,
            op,
            sync,
            abandoned: false,
            parts_total: parts,
            parts_done: 0,
            result: Ok(()),
            data: if copy_out {
                vec![0; read_len]
            } else {
                Vec::new()
            },
            copy_out,
        };
        match self.joins.insert(join) {
            Ok(id) => id,
            // Callers check free ring slots first, and each live join holds one.
            Err(_) => unreachable!("more joins than ring slots + 1"),
        }
    }

    /// A synchronous caller gives up on a join (timeout, or a submission failed part
    /// way): the parts already pushed still complete, and the join then vanishes.
    /// `submitted` is how many parts were pushed.
    pub fn abandon(&mut self, join: u64, submitted: usize) {
        let finished = match self.joins.get_mut(join) {
            Ok(j) => {
                j.abandoned = true;
                j.parts_total = submitted;
                j.parts_done >= submitted
            }
            Err(_) => false,
        };
        if finished {
            let _ = self.joins.remove(join);
        }
        self.sync_done.retain(|(id, _)| *id != join);
    }

    /// Takes the completion of a finished synchronous join.
    pub fn take_sync(&mut self, join: u64) -> Option<Completion> {
        let pos = self.sync_done.iter().position(|(id, _)| *id == join)?;
        Some(self.sync_done.swap_remove(pos).1)
    }

    /// Queues a completion that needed no ring request (a flush without cache control).
    pub fn push_ready(&mut self, c: Completion) {
        self.ready.push_back(c);
    }

    /// Moves finished asynchronous completions into `out`.
    pub fn drain_ready(&mut self, out: &mut Vec<Completion>) -> usize {
        let n = self.ready.len();
        out.extend(self.ready.drain(..));
        n
    }

    /// Publishes pushed requests and kicks the backend if it asked for it.
    pub fn kick(&mut self, sh: &Shared) -> Result<(), Error> {
        if self.ring().push_requests_and_check_notify() {
            bump(&sh.stats.notifications);
            self.evtchn.notify()?;
        }
        Ok(())
    }

    /// Waits for the backend's next notification.
    pub fn wait(&self, timeout: Duration) -> Result<bool, Error> {
        Ok(self.evtchn.wait(timeout)?)
    }

    /// The event channel, to wait on without holding the queue.
    pub fn event_channel(&self) -> Arc<dyn GuestEventChannel> {
        self.evtchn.clone()
    }

    // ----- submission ----------------------------------------------------------

    /// Pushes one READ/WRITE ring request for `chunk` (direct, or indirect when it has
    /// more than 11 segments). `data` is where a write's bytes come from (the chunk's
    /// own, or the pages as they are).
    pub fn push_rw(
        &mut self,
        sh: &Shared,
        join: u64,
        write: bool,
        chunk: Chunk,
        data: WriteData<'_>,
    ) -> Result<(), Error> {
        let nsegs = chunk.nr_segments();
        debug_assert!(nsegs <= sh.max_segments && self.free_slots() > 0);
        let mut granted = self.spare_pages.pop().unwrap_or_default();
        let mut indirect = self.spare_pages.pop().unwrap_or_default();
        let mut segs = std::mem::take(&mut self.segs);
        segs.clear();
        let built = self.build_rw(
            sh,
            write,
            chunk,
            data,
            &mut granted,
            &mut indirect,
            &mut segs,
        );
        if let Err(e) = built {
            self.segs = segs;
            for g in granted.drain(..).chain(indirect.drain(..)) {
                self.release(sh, g);
            }
            self.spare_pages.push(granted);
            self.spare_pages.push(indirect);
            return Err(e);
        }
        let op = if write { BLKIF_OP_WRITE } else { BLKIF_OP_READ };
        let mut indirect_grefs = std::mem::take(&mut self.indirect_grefs);
        indirect_grefs.clear();
        indirect_grefs.extend(indirect.iter().map(|g| g.gref));
        let pending = Pending {
            join,
            expect_op: op,
            chunk,
            data: granted,
            indirect,
        };
        let id = match self.shadow.insert(pending) {
            Ok(id) => id,
            Err(_) => unreachable!("free slot checked by the caller"),
        };
        let req = if indirect_grefs.is_empty() {
            RawRequest::direct(op, id, sh.handle, chunk.sector, &segs)
        } else {
            RawRequest::indirect(
                op,
                id,
                sh.handle,
                chunk.sector,
                nsegs as u16,
                &indirect_grefs,
            )
        }
        .expect("segment and indirect-page counts bounded by negotiation");
        self.segs = segs;
        self.indirect_grefs = indirect_grefs;
        self.push(sh, id, &req)
    }

    #[allow(clippy::too_many_arguments)]
    fn build_rw(
        &mut self,
        sh: &Shared,
        write: bool,
        chunk: Chunk,
        data: WriteData<'_>,
        granted: &mut Vec<Granted>,
        indirect: &mut Vec<Granted>,
        segs: &mut Vec<Segment>,
    ) -> Result<(), Error> {
        for span in chunk.segments() {
            let g = self.data_page(sh, write)?;
            granted.push(g);
            if let (true, WriteData::Bytes(data)) = (write, data) {
                // A write's data must be in the page before the request is visible:
                // with persistent grants this is the copy Linux does in
                // `blkif_setup_rw_req_grant`; without, it stands for the caller's own
                // page already holding the data.
                sh.guest.write_frame(
                    g.frame,
                    span.page_offset(),
                    &data[span.buf_offset..span.buf_offset + span.len],
                )?;
            }
            segs.push(Segment {
                gref: g.gref,
                first_sect: span.first_sect,
                last_sect: span.last_sect,
            });
        }
        if segs.len() > MAX_DIRECT_SEGMENTS {
            let mut page = [0u8; PAGE_SIZE];
            for descs in segs.chunks(SEGMENTS_PER_INDIRECT_PAGE) {
                let g = self.indirect_page(sh)?;
                indirect.push(g);
                for (slot, s) in page.chunks_exact_mut(8).zip(descs) {
                    slot.copy_from_slice(&s.encode());
                }
                sh.guest.write_frame(g.frame, 0, &page[..descs.len() * 8])?;
            }
            debug_assert_eq!(indirect.len(), indirect_pages_for(segs.len()));
        }
        Ok(())
    }

    /// Pushes a cache flush (`BLKIF_OP_FLUSH_DISKCACHE`) or barrier
    /// (`BLKIF_OP_WRITE_BARRIER`) with no segments: Linux's empty `REQ_PREFLUSH`.
    pub fn push_flush(&mut self, sh: &Shared, join: u64, barrier: bool) -> Result<(), Error> {
        let op = if barrier {
            BLKIF_OP_WRITE_BARRIER
        } else {
            BLKIF_OP_FLUSH_DISKCACHE
        };
        let id = self.insert_control(join, op);
        let req =
            RawRequest::direct(op, id, sh.handle, 0, &[]).expect("flush/barrier is a direct op");
        self.push(sh, id, &req)
    }

    /// Pushes a discard of `nr_sectors` sectors at `sector` (`blkif_queue_discard_req`).
    pub fn push_discard(
        &mut self,
        sh: &Shared,
        join: u64,
        sector: u64,
        nr_sectors: u64,
        secure: bool,
    ) -> Result<(), Error> {
        let id = self.insert_control(join, BLKIF_OP_DISCARD);
        let req = RawRequest::discard(id, sh.handle, sector, nr_sectors, secure);
        self.push(sh, id, &req)
    }

    fn insert_control(&mut self, join: u64, op: u8) -> u64 {
        debug_assert!(self.free_slots() > 0);
        let pending = Pending {
            join,
            expect_op: op,
            chunk: Chunk {
                sector: 0,
                buf_offset: 0,
                len: 0,
                page_offset: 0,
            },
            data: Vec::new(),
            indirect: Vec::new(),
        };
        match self.shadow.insert(pending) {
            Ok(id) => id,
            Err(_) => unreachable!("free slot checked by the caller"),
        }
    }

    fn push(&mut self, sh: &Shared, id: u64, req: &RawRequest) -> Result<(), Error> {
        if let Err(e) = self.ring().push_request(req) {
            // Cannot happen with a free shadow slot (one slot per request), but never
            // leave a shadow entry for a request the backend will not see.
            if let Ok(p) = self.shadow.remove(id) {
                self.release_pages(sh, p.data, p.indirect);
            }
            return Err(Error::RingHalted {
                queue: self.index,
                source: e,
            });
        }
        bump(&sh.stats.requests);
        Ok(())
    }
}
