//! The frontend's side of a shared ring: [`FrontRing`], which the simulated guest, the
//! conformance suite and the tests use. It distrusts the backend as [`super::BackRing`]
//! distrusts the frontend.

use std::sync::atomic::Ordering;

use shmem::{full_barrier, SharedMemory};

use super::{needs_notify, RingError, Shared};
use crate::abi::{sring, Protocol};
use crate::request::RawRequest;
use crate::response::Response;

/// The frontend's side of a ring (`struct blkif_front_ring`): used by the simulated
/// guest and by tests. It distrusts the backend just as [`BackRing`] distrusts it.
#[derive(Debug)]
pub struct FrontRing {
    shared: Shared,
    /// Next request slot to fill.
    req_prod_pvt: u32,
    /// Next response to consume.
    rsp_cons: u32,
    /// `req_prod` as we last published it.
    req_prod_published: u32,
    /// `rsp_prod` as snapshotted for the current batch.
    rsp_prod_seen: u32,
    halted: Option<RingError>,
}

impl FrontRing {
    /// Initialises a fresh ring in `mem` (`SHARED_RING_INIT` + `FRONT_RING_INIT`).
    pub fn new(mem: SharedMemory, protocol: Protocol) -> Result<Self, RingError> {
        Self::new_at(mem, protocol, 0)
    }

    /// Like [`FrontRing::new`], but every index starts at `start` (`SHARED_RING_INIT`
    /// followed by setting the indices, then `FRONT_RING_ATTACH`): lets tests start
    /// near 2^32 to exercise wrap-around.
    pub fn new_at(mem: SharedMemory, protocol: Protocol, start: u32) -> Result<Self, RingError> {
        let shared = Shared::new(mem, protocol)?;
        shared.store(sring::REQ_PROD, start, Ordering::Relaxed);
        shared.store(sring::RSP_PROD, start, Ordering::Relaxed);
        shared.store(sring::REQ_EVENT, start.wrapping_add(1), Ordering::Relaxed);
        shared.store(sring::RSP_EVENT, start.wrapping_add(1), Ordering::Relaxed);
        shared
            .mem
            .fill(sring::PVT, sring::RING - sring::PVT, 0)
            .expect("header inside the checked first page");
        full_barrier();
        Ok(FrontRing {
            shared,
            req_prod_pvt: start,
            rsp_cons: start,
            req_prod_published: start,
            rsp_prod_seen: start,
            halted: None,
        })
    }

    /// The ABI this ring encodes with.
    pub fn protocol(&self) -> Protocol {
        self.shared.protocol
    }

    /// Number of slots (`RING_SIZE`).
    pub fn size(&self) -> u32 {
        self.shared.size
    }

    /// Index of the next request slot.
    pub fn req_prod_pvt(&self) -> u32 {
        self.req_prod_pvt
    }

    /// Index of the next response to consume.
    pub fn rsp_cons(&self) -> u32 {
        self.rsp_cons
    }

    /// The error that halted the ring, if the backend was caught misbehaving.
    pub fn halted(&self) -> Option<RingError> {
        self.halted
    }

    /// The shared mapping: a hostile test frontend may scribble on it directly.
    pub fn memory(&self) -> &SharedMemory {
        &self.shared.mem
    }

    /// `RING_FREE_REQUESTS`: slots not holding an unanswered request.
    pub fn free_slots(&self) -> u32 {
        self.shared
            .size
            .wrapping_sub(self.req_prod_pvt.wrapping_sub(self.rsp_cons))
    }

    /// Writes `request` at `req_prod_pvt` (visible to the backend after
    /// [`FrontRing::push_requests_and_check_notify`]).
    pub fn push_request(&mut self, request: &RawRequest) -> Result<(), RingError> {
        let bytes = request.encode(self.shared.protocol);
        self.push_raw_request(&bytes[..self.shared.protocol.request_size()])
    }

    /// Writes a raw slot image (exactly [`Protocol::request_size`] bytes) at
    /// `req_prod_pvt`: for hostile-frontend tests that need bytes no encoder makes.
    pub fn push_raw_request(&mut self, slot: &[u8]) -> Result<(), RingError> {
        let expected = self.shared.protocol.request_size();
        if slot.len() != expected {
            return Err(RingError::BadSlotLength {
                expected,
                got: slot.len(),
            });
        }
        if self.free_slots() == 0 {
            return Err(RingError::Full);
        }
        self.shared.write_slot(self.req_prod_pvt, slot);
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`: publishes the requests written so far
    /// and says whether the backend asked to be notified for one of them.
    pub fn push_requests_and_check_notify(&mut self) -> bool {
        let old = self.req_prod_published;
        let new = self.req_prod_pvt;
        self.shared.store(sring::REQ_PROD, new, Ordering::Release);
        self.req_prod_published = new;
        full_barrier();
        let event = self.shared.load(sring::REQ_EVENT, Ordering::Relaxed);
        needs_notify(old, new, event)
    }

    fn halt(&mut self, e: RingError) -> RingError {
        self.halted = Some(e);
        e
    }

    fn snapshot_rsp_prod(&mut self) -> Result<u32, RingError> {
        let rsp_prod = self.shared.load(sring::RSP_PROD, Ordering::Acquire);
        // Called only when every response seen so far is consumed, so a `rsp_prod` moved
        // back behind `rsp_cons` shows up here as a huge count too.
        let claimed = rsp_prod.wrapping_sub(self.rsp_cons);
        // RING_RESPONSE_PROD_OVERFLOW, tightened: no more responses than requests
        // published (which is itself at most the ring size).
        if claimed > self.req_prod_published.wrapping_sub(self.rsp_cons) {
            return Err(self.halt(RingError::ResponseOverflow {
                rsp_prod,
                rsp_cons: self.rsp_cons,
                req_prod: self.req_prod_published,
            }));
        }
        Ok(rsp_prod)
    }

    /// Takes the next response, copied out of its slot once. `Ok(None)`: none pending
    /// as of the latest `rsp_prod`. After an `Err` the ring is halted.
    pub fn pop_response(&mut self) -> Result<Option<Response>, RingError> {
        if let Some(e) = self.halted {
            return Err(e);
        }
        if self.rsp_cons == self.rsp_prod_seen {
            self.rsp_prod_seen = self.snapshot_rsp_prod()?;
            if self.rsp_cons == self.rsp_prod_seen {
                return Ok(None);
            }
        }
        let slot = self.shared.read_response(self.rsp_cons);
        self.rsp_cons = self.rsp_cons.wrapping_add(1);
        Ok(Some(Response::decode(self.shared.protocol, &slot)))
    }

    /// `RING_HAS_UNCONSUMED_RESPONSES`, capped by the requests outstanding.
    pub fn unconsumed_responses(&self) -> u32 {
        let rsp_prod = self.shared.load(sring::RSP_PROD, Ordering::Acquire);
        rsp_prod
            .wrapping_sub(self.rsp_cons)
            .min(self.req_prod_published.wrapping_sub(self.rsp_cons))
    }

    /// `RING_FINAL_CHECK_FOR_RESPONSES`: sets `rsp_event = rsp_cons + 1` when nothing
    /// is pending, then re-checks after a full barrier.
    pub fn final_check_for_responses(&mut self) -> Result<bool, RingError> {
        if let Some(e) = self.halted {
            return Err(e);
        }
        if self.unconsumed_responses() > 0 {
            return Ok(true);
        }
        self.shared.store(
            sring::RSP_EVENT,
            self.rsp_cons.wrapping_add(1),
            Ordering::Relaxed,
        );
        full_barrier();
        Ok(self.unconsumed_responses() > 0)
    }
}
