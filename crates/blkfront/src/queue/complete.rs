//! A queue's completion side: consuming responses (Linux's `blkif_interrupt`), checking
//! each against the shadow table, copying read data out and finishing its join, and
//! tearing the queue down (Linux's `blkif_free_ring`).

use std::sync::atomic::Ordering;

use blkif::abi::{
    BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_READ, BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY,
};
use blkif::Response;
use tracing::{error, warn};

use super::grants::PageKind;
use super::{bump, Completion, Queue, Shared};
use crate::error::{Error, IoError, TeardownReport};
use crate::features::CacheControl;
use crate::guest::{EndAccessError, GrantRef};
impl Queue {
    // ----- completion ----------------------------------------------------------

    /// Consumes every response the backend has published (Linux's `blkif_interrupt`),
    /// re-arming `rsp_event` so the backend notifies for the next one. Returns how many
    /// responses were consumed. A ring the backend corrupted is halted and reported.
    pub fn reap(&mut self, sh: &Shared) -> Result<usize, Error> {
        self.check_usable()?;
        self.retry_deferred(sh);
        let mut n = 0;
        loop {
            let step = match self.ring().pop_response() {
                Ok(Some(rsp)) => {
                    bump(&sh.stats.responses);
                    self.complete(sh, rsp);
                    n += 1;
                    continue;
                }
                Ok(None) => self.ring().final_check_for_responses(),
                Err(e) => Err(e),
            };
            match step {
                Ok(true) => continue,
                Ok(false) => return Ok(n),
                Err(e) => {
                    bump(&sh.stats.rings_halted);
                    error!(queue = self.index, %e, "backend broke the ring protocol; ring halted");
                    self.halted = Some(e);
                    return Err(Error::RingHalted {
                        queue: self.index,
                        source: e,
                    });
                }
            }
        }
    }

    /// Handles one response (`blkif_completion` plus the checks around it).
    fn complete(&mut self, sh: &Shared, rsp: Response) {
        // The id must name a request in flight: the backend may invent ids, repeat a
        // completion, or echo garbage. Nothing about such a response can be trusted, so
        // it is counted and dropped, and the request it might have meant stays in flight.
        let expect_op = match self.shadow.get(rsp.id) {
            Ok(p) => p.expect_op,
            Err(e) => {
                match e {
                    crate::shadow::ShadowError::UnknownId(_) => bump(&sh.stats.bad_id),
                    crate::shadow::ShadowError::NotInFlight(_) => bump(&sh.stats.not_in_flight),
                }
                warn!(queue = self.index, id = rsp.id, op = rsp.operation, %e, "bogus response from backend");
                return;
            }
        };
        let p = self
            .shadow
            .remove(rsp.id)
            .expect("checked in flight just above");
        let result = if rsp.operation != expect_op {
            // The id is ours but the answer is for something else: fail the request
            // rather than believe either half.
            bump(&sh.stats.wrong_operation);
            warn!(
                queue = self.index,
                id = rsp.id,
                expected = expect_op,
                got = rsp.operation,
                "response has wrong operation"
            );
            Err(IoError::WrongOperation {
                expected: expect_op,
                got: rsp.operation,
            })
        } else {
            match rsp.status {
                BLKIF_RSP_OKAY => Ok(()),
                BLKIF_RSP_ERROR => Err(IoError::Failed),
                BLKIF_RSP_EOPNOTSUPP => Err(IoError::NotSupported),
                s => Err(IoError::UnknownStatus(s)),
            }
        };
        if result == Err(IoError::NotSupported) {
            // As Linux: a backend that refuses flush/barrier or discard once will refuse
            // it again, so stop sending it.
            match expect_op {
                BLKIF_OP_FLUSH_DISKCACHE | BLKIF_OP_WRITE_BARRIER => {
                    warn!(
                        queue = self.index,
                        "backend refused cache flush; disabling it"
                    );
                    sh.set_cache(CacheControl::None);
                }
                BLKIF_OP_DISCARD => {
                    warn!(queue = self.index, "backend refused discard; disabling it");
                    sh.discard.store(false, Ordering::Relaxed);
                }
                _ => {}
            }
        }

        // Copy read data out before the pages go back: with persistent grants the page
        // is reused by the next request at once.
        let copy_out = result.is_ok() && expect_op == BLKIF_OP_READ;
        if copy_out {
            if let Some(j) = self.joins.get_mut(p.join).ok().filter(|j| j.copy_out) {
                for (span, g) in p.chunk.segments().zip(&p.data) {
                    let at = p.chunk.buf_offset + span.buf_offset;
                    if let Err(e) = sh.guest.read_frame(
                        g.frame,
                        span.page_offset(),
                        &mut j.data[at..at + span.len],
                    ) {
                        error!(queue = self.index, %e, "reading a completed page failed");
                    }
                }
            }
        }
        self.release_pages(sh, p.data, p.indirect);
        self.finish_part(p.join, result);
    }

    fn finish_part(&mut self, join: u64, result: Result<(), IoError>) {
        let Ok(j) = self.joins.get_mut(join) else {
            error!(queue = self.index, join, "completion for a vanished join");
            return;
        };
        j.parts_done += 1;
        if j.result.is_ok() {
            j.result = result;
        }
        if j.parts_done < j.parts_total {
            return;
        }
        let j = self.joins.remove(join).expect("checked above");
        if j.abandoned {
            return;
        }
        let data = if j.result.is_ok() { j.data } else { Vec::new() };
        let c = Completion {
            token: j.token,
            op: j.op,
            result: j.result,
            data,
        };
        if j.sync {
            self.sync_done.push((join, c));
        } else {
            self.ready.push_back(c);
        }
    }

    // ----- teardown -------------------------------------------------------------

    /// Revokes every grant of the queue and frees its pages (`blkif_free_ring`). Grants
    /// the backend still maps are reported and their pages leaked, never reused.
    pub fn teardown(&mut self, sh: &Shared) -> TeardownReport {
        let mut report = TeardownReport::default();
        let end = |gref: GrantRef, report: &mut TeardownReport| match sh.guest.end_access(gref) {
            Ok(()) => {
                report.grants_ended += 1;
                true
            }
            Err(EndAccessError::StillMapped(_)) => {
                bump(&sh.stats.end_access_failures);
                report.still_mapped.push(gref);
                false
            }
            Err(EndAccessError::Invalid(_)) => true,
        };
        for (_, p) in self.shadow.drain() {
            report.aborted_requests += 1;
            for g in p.data.into_iter().chain(p.indirect) {
                if end(g.gref, &mut report) {
                    if g.kind == PageKind::Pool {
                        self.pool_granted -= 1;
                        sh.stats.persistent_grants.fetch_sub(1, Ordering::Relaxed);
                    }
                    sh.guest.free_frames(&[g.frame]);
                }
            }
        }
        for (_, j) in self.joins.drain() {
            if !j.sync && !j.abandoned {
                self.ready.push_back(Completion {
                    token: j.token,
                    op: j.op,
                    result: Err(IoError::Aborted),
                    data: Vec::new(),
                });
            }
        }
        for (frame, gref) in std::mem::take(&mut self.pool) {
            self.pool_granted -= 1;
            sh.stats.persistent_grants.fetch_sub(1, Ordering::Relaxed);
            if end(gref, &mut report) {
                sh.guest.free_frames(&[frame]);
            }
        }
        for g in std::mem::take(&mut self.deferred) {
            if end(g.gref, &mut report) {
                sh.guest.free_frames(&[g.frame]);
            }
        }
        let frames = std::mem::take(&mut self.indirect_frames);
        sh.guest.free_frames(&frames);
        // The ring last: the backend unmaps it when it disconnects.
        let mut ring_free = true;
        for gref in std::mem::take(&mut self.ring_grefs) {
            ring_free &= end(gref, &mut report);
        }
        self.ring = None;
        let frames = std::mem::take(&mut self.ring_frames);
        if ring_free {
            sh.guest.free_frames(&frames);
        }
        if !report.is_clean() {
            warn!(queue = self.index, still_mapped = ?report.still_mapped, "backend still maps grants at teardown");
        }
        report
    }
}
