//! A request's way through the ring, from the slot it is accepted into to its
//! response: validation (and indirect descriptors), page acquisition, the barrier's wait
//! for the drain, its phases' storage operations, and the release of its pages when the
//! last one completed.

use std::time::Instant;

use crate::qos::{self, Cost, Direction};
use blkif::abi::{BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR};
use blkif::{Operation, Popped, RawRequest, Request, Response, Segments, Ticket, Validated};
use storage::SubmitError;

use super::acquire::Acquired;
use super::request::Phase;
use super::{Held, RingRunner};
use crate::vbd::LostFeature;

impl RingRunner {
    /// Validates a request and starts it.
    pub(super) fn dispatch(&mut self, popped: Popped, now: Instant) {
        let Some((slot, req)) = self.accept(&popped.request, popped.ticket, now) else {
            return;
        };
        self.count_accepted(&req);
        if let Some(cost) = qos_cost(&req) {
            if let Err(until) = self.admit(cost, now) {
                // Held in its slot; consumption stops and the reactor arms a timer.
                self.stats.throttled.inc();
                self.held = Some(Held {
                    slot,
                    cost,
                    since: now,
                    until,
                });
                return;
            }
        }
        self.start(slot, now);
    }

    /// Takes `cost` from the VBD's throttles, or says when it may be taken.
    #[inline]
    pub(super) fn admit(&self, cost: Cost, now: Instant) -> Result<(), Instant> {
        qos::admit(
            self.qos.own.as_deref(),
            self.qos.group.as_ref().map(|(_, t)| &**t),
            cost,
            now,
        )
    }

    /// Starts an accepted request that its QoS limits let go: its pages, then its I/O.
    pub(super) fn start(&mut self, slot: u32, now: Instant) {
        let acquired = self.pages.acquire(self.io.slots_mut().get_mut(slot), now);
        if acquired == Acquired::Wait {
            // Wait for completions to return bounce pages; consumption stops meanwhile.
            self.stats.oo_req.inc();
            self.stalled = Some(slot);
            return;
        }
        self.acquired(slot, acquired, now);
    }

    /// Validates a request (reading its indirect descriptors) into a free slot; answers
    /// it and returns `None` when it is refused.
    fn accept(&mut self, raw: &RawRequest, ticket: Ticket, now: Instant) -> Option<(u32, Request)> {
        let validated = match raw.validate(&self.limits) {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(vbd = self.vbd.id.0, ring = self.index, error = %e, "request refused");
                self.respond_now(ticket, raw.response(e.status()));
                return None;
            }
        };
        let Some(slot) = self.io.slots_mut().alloc() else {
            // consume() checked for a free slot.
            self.respond_now(ticket, raw.response(BLKIF_RSP_ERROR));
            return None;
        };
        let s = self.io.slots_mut().get_mut(slot);
        let req = match validated {
            Validated::Ready(req) => {
                s.segs.clear();
                if let Segments::Direct(d) = &req.segments {
                    s.segs.extend_from_slice(d.as_slice());
                }
                req
            }
            Validated::Indirect(ind) => {
                match self
                    .pages
                    .read_indirect(&ind, &mut s.segs, &self.limits, now)
                {
                    Ok(req) => req,
                    Err(status) => {
                        let response = ind.response(status);
                        tracing::debug!(
                            vbd = self.vbd.id.0,
                            ring = self.index,
                            id = response.id,
                            "indirect request refused"
                        );
                        self.io.slots_mut().free(slot);
                        self.respond_now(ticket, response);
                        return None;
                    }
                }
            }
        };
        let s = self.io.slots_mut().get_mut(slot);
        s.reset(&req);
        s.ticket = ticket;
        s.started = now;
        Some((slot, req))
    }

    fn count_accepted(&self, req: &Request) {
        match req.operation {
            Operation::Read => {
                self.stats.rd_req.inc();
                self.stats.rd_sect.add(req.nr_sectors);
            }
            Operation::Write => {
                self.stats.wr_req.inc();
                self.stats.wr_sect.add(req.nr_sectors);
            }
            Operation::Flush | Operation::Barrier => {
                self.stats.f_req.inc();
                self.stats.wr_sect.add(req.nr_sectors);
            }
            Operation::Discard { .. } => {
                self.stats.ds_req.inc();
                self.stats.ds_sect.add(req.nr_sectors);
            }
        }
    }

    /// The request's pages were acquired (or could not be): run it, park a barrier until
    /// the ring drained, or answer it.
    #[inline]
    pub(super) fn acquired(&mut self, slot: u32, acquired: Acquired, now: Instant) {
        match acquired {
            Acquired::Ready => {}
            Acquired::Failed(status) => {
                self.io.slots_mut().get_mut(slot).status = status;
                self.finish(slot, now);
                return;
            }
            Acquired::Wait => return,
        }
        if self.io.slots().get(slot).op == Operation::Barrier {
            self.barrier = Some(slot);
            if self.io.slots().in_use() > 1 {
                tracing::trace!(
                    vbd = self.vbd.id.0,
                    ring = self.index,
                    "barrier waits for in-flight I/O"
                );
                return;
            }
        }
        self.begin(slot, now);
    }

    /// Starts the first phase of an accepted request.
    #[inline]
    pub(super) fn begin(&mut self, slot: u32, now: Instant) {
        if self.io.slots_mut().get_mut(slot).advance() {
            self.submit_phase(slot, now);
        } else {
            self.finish(slot, now);
        }
    }

    /// Submits what remains of the slot's current phase.
    #[inline]
    pub(super) fn submit_phase(&mut self, slot: u32, now: Instant) {
        match self.io.submit_phase(slot) {
            Ok(()) => {}
            Err(SubmitError::Full) => {
                // Completions will make room; keep the request's place in line.
                if !self.retry.contains(&slot) {
                    self.retry.push_back(slot);
                }
            }
            Err(e) => {
                let who = self.who();
                tracing::debug!(vbd = who.vbd, ring = who.ring, error = %e, "storage refused an operation");
                let s = self.io.slots_mut().get_mut(slot);
                if matches!(e, SubmitError::Unsupported(_)) && s.phase != Phase::Data {
                    s.unsupported = true;
                }
                // Stop submitting further chunks; finish when what is in flight is done.
                if s.fail(BLKIF_RSP_ERROR) {
                    self.finish(slot, now);
                }
            }
        }
    }

    /// The request is over: deliver read data (bounce pages), release its pages, answer.
    pub(super) fn finish(&mut self, slot: u32, now: Instant) {
        let s = self.io.slots_mut().get_mut(slot);
        self.pages.release(s, now);
        let mut status = s.status;
        let (op, id, ticket) = (s.op, s.id, s.ticket);
        self.stats
            .latency
            .record(op, now.saturating_duration_since(s.started));
        if s.unsupported {
            status = BLKIF_RSP_EOPNOTSUPP;
            self.withdraw_feature(op);
        }
        let s = self.io.slots_mut().get_mut(slot);
        s.phase = Phase::Idle;
        self.io.slots_mut().free(slot);
        if self.barrier == Some(slot) {
            self.barrier = None;
        }
        self.respond_now(
            ticket,
            Response {
                id,
                operation: op.blkif_op(),
                status,
            },
        );
    }

    /// The storage refused `op` as unsupported: the frontend is told it is gone.
    fn withdraw_feature(&self, op: Operation) {
        let lost = match op {
            Operation::Flush => LostFeature::Flush,
            Operation::Barrier => LostFeature::Barrier,
            Operation::Discard { secure: true } => LostFeature::SecureDiscard,
            Operation::Discard { secure: false } => LostFeature::Discard,
            Operation::Read | Operation::Write => return,
        };
        if self.vbd.drop_feature(lost) {
            tracing::info!(
                vbd = self.vbd.id.0,
                ?lost,
                "storage does not support it; feature withdrawn"
            );
        }
    }
}

/// What a request costs against QoS limits: reads and writes by their bytes, a flush or
/// barrier by the data it carries (none: free, as in QEMU), a discard as one write
/// without bytes.
fn qos_cost(req: &Request) -> Option<Cost> {
    let bytes = req.nr_sectors.saturating_mul(512);
    let direction = match req.operation {
        Operation::Read => Direction::Read,
        Operation::Write => Direction::Write,
        Operation::Flush | Operation::Barrier if bytes > 0 => Direction::Write,
        Operation::Flush | Operation::Barrier => return None,
        Operation::Discard { .. } => {
            return Some(Cost {
                direction: Direction::Write,
                bytes: 0,
            })
        }
    };
    Some(Cost { direction, bytes })
}
