//! The shared ring (`xen/io/ring.h`), back side and front side, 1 to 16 pages.
//!
//! This module owns the four shared indices, the private indices of each side
//! (`req_cons`/`rsp_prod_pvt` for the backend, `req_prod_pvt`/`rsp_cons` for the
//! frontend), slot addressing, the event-index ("notify only when the other side asked")
//! arithmetic and the memory barriers around it. It moves whole slots between shared
//! and private memory and leaves their meaning to [`crate::request`] and
//! [`crate::response`].
//!
//! Indices are free-running `u32`s compared with wrapping arithmetic, exactly as
//! `RING_IDX` in C: they wrap at 2^32, and a slot is `index & (size - 1)`.
//!
//! Each side distrusts the other. The backend checks the frontend's `req_prod` before
//! trusting it (`RING_REQUEST_PROD_OVERFLOW`: blkback halts the ring when a frontend
//! claims more outstanding requests than fit) and refuses to answer requests it has not
//! consumed; the frontend checks `rsp_prod` likewise (`RING_RESPONSE_PROD_OVERFLOW`). A
//! detected violation poisons the ring: every later consume call returns the same
//! error. Slots are copied once into private buffers (XSA-155) and responses are
//! written from fully initialised buffers (XSA-216).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use shmem::{full_barrier, SharedMemory};

use crate::abi::{
    ring_size_for_len, sring, Protocol, MAX_REQUEST_SIZE, MAX_RESPONSE_SIZE, MAX_RING_PAGE_ORDER,
    PAGE_SIZE,
};
use crate::journal::{Journal, JournalError};
use crate::request::RawRequest;
use crate::response::Response;

mod front;
pub use front::FrontRing;

/// Misuse of a ring or misbehaviour of the other side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The mapping is not 1, 2, 4, 8 or 16 whole pages.
    #[error("a ring must be 1, 2, 4, 8 or 16 pages; got {len} bytes")]
    BadSize { len: usize },
    /// `RING_REQUEST_PROD_OVERFLOW`: the frontend claims more unanswered requests than
    /// the ring holds. The ring is halted, as blkback does.
    #[error("frontend claims {} outstanding requests (req_prod {req_prod}, rsp_prod_pvt {rsp_prod_pvt}) in a ring of {size}; ring halted", req_prod.wrapping_sub(*rsp_prod_pvt))]
    RequestOverflow {
        req_prod: u32,
        rsp_prod_pvt: u32,
        size: u32,
    },
    /// The frontend moved `req_prod` back behind requests already consumed. The ring is
    /// halted (honest frontends only ever advance it).
    #[error(
        "frontend moved req_prod back to {req_prod} after {req_cons} were consumed; ring halted"
    )]
    RequestProducerRegressed { req_prod: u32, req_cons: u32 },
    /// `push_response` with no consumed request left to answer: a response there would
    /// overwrite a request the frontend has not yet seen answered.
    #[error("no consumed request is waiting for a response")]
    NoRequestToAnswer,
    /// `push_request` on a full ring (frontend side).
    #[error("the ring is full")]
    Full,
    /// `RING_RESPONSE_PROD_OVERFLOW` or more responses than requests (frontend side),
    /// including a `rsp_prod` moved backwards: the backend is misbehaving. The ring is
    /// halted.
    #[error("backend produced responses up to {rsp_prod} but only requests up to {req_prod} were pushed (rsp_cons {rsp_cons}); ring halted")]
    ResponseOverflow {
        rsp_prod: u32,
        rsp_cons: u32,
        req_prod: u32,
    },
    /// `push_raw_request` with a slot image of the wrong length (frontend side).
    #[error("a request slot of this protocol is {expected} bytes, got {got}")]
    BadSlotLength { expected: usize, got: usize },
    /// The ring's journal cannot be used (crash recovery): the ring is refused.
    #[error("ring journal: {0}")]
    Journal(#[from] JournalError),
    /// A response for a ticket this ring did not hand out, or already answered.
    #[error("ticket {0} names no request in flight")]
    BadTicket(u32),
}

/// What a journaled ring needs to know at attach.
#[derive(Debug)]
pub enum JournalStart {
    /// A ring connected afresh: the journal (a [`crate::journal::journal_len`]-byte
    /// mapping) is initialised; whatever it held is discarded.
    Fresh(SharedMemory),
    /// A ring adopted from a previous process: the journal it left says what it had
    /// consumed and not answered; those requests are popped again first. A blank journal
    /// (never written) means nothing was consumed beyond `rsp_prod`. A journal this build
    /// cannot use that provably owes nothing ([`JournalError::owes_nothing`]: another
    /// format version, or a corrupt one while the frontend has nothing unanswered) is
    /// ignored: the ring resumes at `rsp_prod` without a journal
    /// ([`BackRing::ignored_journal`]) until [`BackRing::start_journal`] gives it one.
    Recover(SharedMemory),
}

/// Which request a response answers: handed out by [`BackRing::pop`], given back to
/// [`BackRing::answer`]. On a ring with a journal it names the request's journal entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket(u32);

impl Ticket {
    /// The ticket of a ring without a journal (every request's).
    pub const UNJOURNALED: Ticket = Ticket(u32::MAX);
}

/// A request taken off the ring (or out of the journal, after a crash).
#[derive(Debug)]
pub struct Popped {
    pub ticket: Ticket,
    pub request: RawRequest,
}

/// A journaled ring's private view of its journal's entries.
#[derive(Debug)]
struct Journaled {
    journal: Journal,
    /// Entries that may be taken (LIFO).
    free: Vec<u32>,
    /// Entries holding a request not yet answered.
    in_flight: Vec<bool>,
    /// Entries answered and not yet published, with their response positions, oldest
    /// first: they go back to `free` only once `rsp_prod` passed them.
    answered: VecDeque<(u32, u32)>,
    /// Requests a previous process consumed and did not answer: popped first.
    replay: VecDeque<(u32, RawRequest)>,
}

impl Journaled {
    fn new(journal: Journal, size: u32) -> Self {
        Journaled {
            journal,
            free: (0..size).rev().collect(),
            in_flight: vec![false; size as usize],
            answered: VecDeque::with_capacity(size as usize),
            replay: VecDeque::new(),
        }
    }

    /// Returns the entries whose responses are now published (`pos < rsp_prod`).
    fn published(&mut self, rsp_prod: u32, rsp_prod_before: u32) {
        while let Some(&(entry, pos)) = self.answered.front() {
            // `pos` lies in [rsp_prod_before, rsp_prod_pvt): published iff below rsp_prod.
            if pos.wrapping_sub(rsp_prod_before) >= rsp_prod.wrapping_sub(rsp_prod_before) {
                break;
            }
            self.answered.pop_front();
            self.journal.record_free(entry);
            self.free.push(entry);
        }
    }
}

/// The private copy of one request slot.
#[repr(C, align(8))]
struct SlotCopy([u8; MAX_REQUEST_SIZE]);

/// What both sides share: the mapping, its protocol and its geometry.
#[derive(Debug)]
struct Shared {
    mem: SharedMemory,
    protocol: Protocol,
    /// `RING_SIZE`: a power of two.
    size: u32,
}

impl Shared {
    fn new(mem: SharedMemory, protocol: Protocol) -> Result<Self, RingError> {
        let len = mem.len();
        let pages_ok = len.is_multiple_of(PAGE_SIZE)
            && (len / PAGE_SIZE).is_power_of_two()
            && len / PAGE_SIZE <= 1 << MAX_RING_PAGE_ORDER;
        if !pages_ok {
            return Err(RingError::BadSize { len });
        }
        let size = ring_size_for_len(protocol, len);
        debug_assert!(size.is_power_of_two() && size >= 32);
        Ok(Shared {
            mem,
            protocol,
            size,
        })
    }

    /// Loads a shared index. The offsets are constant, aligned and inside the first
    /// page, which `new` checked exists, so the access cannot be out of bounds.
    fn load(&self, offset: usize, order: Ordering) -> u32 {
        self.mem
            .load_u32(offset, order)
            .expect("ring index inside the checked first page")
    }

    fn store(&self, offset: usize, value: u32, order: Ordering) {
        self.mem
            .store_u32(offset, value, order)
            .expect("ring index inside the checked first page")
    }

    /// Byte offset of the slot for `index` (`RING_GET_REQUEST`/`RING_GET_RESPONSE`).
    fn slot_offset(&self, index: u32) -> usize {
        sring::RING + (index & (self.size - 1)) as usize * self.protocol.slot_size()
    }

    /// Copies a whole request slot out with one read, into a buffer aligned like the
    /// slot so the copy moves whole words rather than bytes.
    fn read_request(&self, index: u32) -> SlotCopy {
        let mut buf = SlotCopy([0u8; MAX_REQUEST_SIZE]);
        let len = self.protocol.request_size();
        self.mem
            .read(self.slot_offset(index), &mut buf.0[..len])
            .expect("slot inside the ring: size * slot_size + 64 <= len by construction");
        buf
    }

    fn read_response(&self, index: u32) -> [u8; MAX_RESPONSE_SIZE] {
        let mut buf = [0u8; MAX_RESPONSE_SIZE];
        let len = self.protocol.response_size();
        self.mem
            .read(self.slot_offset(index), &mut buf[..len])
            .expect("slot inside the ring by construction");
        buf
    }

    fn write_slot(&self, index: u32, bytes: &[u8]) {
        debug_assert!(bytes.len() <= self.protocol.slot_size());
        self.mem
            .write(self.slot_offset(index), bytes)
            .expect("slot inside the ring by construction");
    }
}

/// The event-index test of `RING_PUSH_*_AND_CHECK_NOTIFY`: notify if the other side's
/// event index lies in `(old, new]`, i.e. it asked to be woken within this batch.
pub fn needs_notify(old: u32, new: u32, event: u32) -> bool {
    new.wrapping_sub(event) < new.wrapping_sub(old)
}

/// The backend's side of a ring (`struct blkif_back_ring`).
///
/// The engine's loop, as blkback's `do_block_io_op`:
///
/// ```text
/// loop {
///     while let Some(raw) = ring.pop_request()? {   // Err: ring halted, stop serving it
///         match raw.validate(&limits) { ... }        // answer errors with raw.response(e.status())
///     }
///     if !ring.final_check_for_requests()? { break } // re-arms req_event; races handled
/// }
/// // later, as I/O completes:
/// ring.push_response(&response)?;
/// if ring.push_responses_and_check_notify() { kick the event channel }
/// ```
#[derive(Debug)]
pub struct BackRing {
    shared: Shared,
    /// Next request to consume.
    req_cons: u32,
    /// Next response slot to fill.
    rsp_prod_pvt: u32,
    /// `rsp_prod` as we last published it: the `old` of the notify check. Kept
    /// privately so the guest cannot influence our notify decision by rewriting it.
    rsp_prod_published: u32,
    /// `req_prod` as snapshotted for the current batch.
    req_prod_seen: u32,
    /// Set once the frontend was caught misbehaving.
    halted: Option<RingError>,
    /// See [`BackRing::unanswered_at_attach`].
    unanswered_at_attach: u32,
    /// `rsp_prod` as last stored (by a publication, or by `pop` making room in the
    /// journal): entries answered below it may be reused.
    rsp_prod_stored: u32,
    journal: Option<Journaled>,
    /// Why the journal offered at attach was ignored (it owed nothing).
    ignored_journal: Option<JournalError>,
}

impl BackRing {
    /// Attaches to a ring the frontend initialised (`BACK_RING_ATTACH`), taking
    /// ownership of the mapping. `mem` must be 1, 2, 4, 8 or 16 pages.
    ///
    /// Like Linux's `xen_blkif_map`, the private indices start at the shared
    /// `rsp_prod` (0 on a fresh ring; anything after a reconnect), and a ring whose
    /// `req_prod` is already more than a ring's worth ahead is refused.
    ///
    /// The same start serves a ring another process served before (adoption after a
    /// handover or a crash, see ARCHITECTURE.md "Restart, handover and crash recovery"):
    /// `rsp_prod` is the last response the frontend can have seen, so every request
    /// from there to `req_prod` is popped (again) and answered exactly once by this
    /// ring. [`BackRing::unanswered_at_attach`] says how many were waiting.
    pub fn new(mem: SharedMemory, protocol: Protocol) -> Result<Self, RingError> {
        let shared = Shared::new(mem, protocol)?;
        let rsp_prod = shared.load(sring::RSP_PROD, Ordering::Relaxed);
        let req_prod = shared.load(sring::REQ_PROD, Ordering::Acquire);
        if req_prod.wrapping_sub(rsp_prod) > shared.size {
            return Err(RingError::RequestOverflow {
                req_prod,
                rsp_prod_pvt: rsp_prod,
                size: shared.size,
            });
        }
        Ok(BackRing {
            shared,
            req_cons: rsp_prod,
            rsp_prod_pvt: rsp_prod,
            rsp_prod_published: rsp_prod,
            req_prod_seen: rsp_prod,
            halted: None,
            unanswered_at_attach: req_prod.wrapping_sub(rsp_prod),
            rsp_prod_stored: rsp_prod,
            journal: None,
            ignored_journal: None,
        })
    }

    /// Attaches like [`BackRing::new`], with a journal kept in `start`'s mapping (crash
    /// recovery; see [`crate::journal`]).
    ///
    /// `Recover` with a journal that is not blank: `req_cons` is the journal's,
    /// `rsp_prod_pvt` the shared `rsp_prod`, and the requests the journal still owes
    /// (in flight, or answered at a position the frontend has not seen) are popped
    /// first, from the journal's copies, oldest first. Their number must be
    /// `req_cons - rsp_prod`, otherwise the ring is refused ([`RingError::Journal`]).
    pub fn with_journal(
        mem: SharedMemory,
        protocol: Protocol,
        start: JournalStart,
    ) -> Result<Self, RingError> {
        let mut ring = Self::new(mem, protocol)?;
        let size = ring.shared.size;
        let rsp_prod = ring.rsp_prod_pvt;
        let fresh = |mem| Journal::create(mem, protocol, size, rsp_prod);
        let journaled = match start {
            JournalStart::Fresh(mem) => Journaled::new(fresh(mem)?, size),
            JournalStart::Recover(mem) => {
                let req_prod = ring.shared.load(sring::REQ_PROD, Ordering::Acquire);
                let recovered = match Journal::recover(mem, protocol, size, rsp_prod, req_prod) {
                    Err(e) if e.owes_nothing(rsp_prod, req_prod) => {
                        ring.ignored_journal = Some(e);
                        return Ok(ring);
                    }
                    other => other?,
                };
                match recovered {
                    (journal, None) => Journaled::new(fresh(journal.into_memory())?, size),
                    (journal, Some(recovered)) => {
                        let mut j = Journaled::new(journal, size);
                        for owed in recovered.owed {
                            j.in_flight[owed.entry as usize] = true;
                            j.free.retain(|&e| e != owed.entry);
                            j.replay
                                .push_back((owed.entry, RawRequest::decode(protocol, &owed.slot)));
                        }
                        ring.req_cons = recovered.req_cons;
                        ring.req_prod_seen = recovered.req_cons;
                        j
                    }
                }
            }
        };
        ring.journal = Some(journaled);
        Ok(ring)
    }

    /// The journal offered at attach that was ignored because it could not be read and
    /// provably owed nothing (see [`JournalStart::Recover`]); the ring has no journal.
    pub fn ignored_journal(&self) -> Option<&JournalError> {
        self.ignored_journal.as_ref()
    }

    /// Gives a ring attached without a journal (one whose journal was ignored) a fresh
    /// one in `mem`, before anything is popped: it records from `req_cons` on.
    pub fn start_journal(&mut self, mem: SharedMemory) -> Result<(), RingError> {
        assert!(
            self.journal.is_none() && self.req_cons == self.rsp_prod_pvt,
            "a journal starts before the ring consumes anything"
        );
        let journal = Journal::create(mem, self.shared.protocol, self.shared.size, self.req_cons)?;
        self.journal = Some(Journaled::new(journal, self.shared.size));
        Ok(())
    }

    /// Requests the journal said a previous process owed at attach (re-executed first).
    pub fn replayed_at_attach(&self) -> usize {
        self.journal.as_ref().map_or(0, |j| j.replay.len())
    }

    /// The journal's mapping, if this ring keeps one (tests).
    pub fn journal_memory(&self) -> Option<&SharedMemory> {
        self.journal.as_ref().map(|j| j.journal.memory())
    }

    /// Requests published but not answered when the ring was attached (`req_prod -
    /// rsp_prod`, at most the ring size): 0 on a fresh ring; on an adopted one, those
    /// the previous process left (consumed and unanswered, or never consumed).
    pub fn unanswered_at_attach(&self) -> u32 {
        self.unanswered_at_attach
    }

    /// The ABI this ring decodes with.
    pub fn protocol(&self) -> Protocol {
        self.shared.protocol
    }

    /// Number of slots (`RING_SIZE`).
    pub fn size(&self) -> u32 {
        self.shared.size
    }

    /// Index of the next request to consume.
    pub fn req_cons(&self) -> u32 {
        self.req_cons
    }

    /// Index of the next response to produce.
    pub fn rsp_prod_pvt(&self) -> u32 {
        self.rsp_prod_pvt
    }

    /// Requests consumed and not yet answered.
    pub fn awaiting_response(&self) -> u32 {
        self.req_cons.wrapping_sub(self.rsp_prod_pvt)
    }

    /// The error that halted the ring, if the frontend was caught misbehaving.
    pub fn halted(&self) -> Option<RingError> {
        self.halted
    }

    /// The shared mapping (for tests and diagnostics; never needed on the data path).
    pub fn memory(&self) -> &SharedMemory {
        &self.shared.mem
    }

    fn halt(&mut self, e: RingError) -> RingError {
        self.halted = Some(e);
        e
    }

    /// Reads `req_prod` (with the read barrier that orders the slot reads after it)
    /// and checks it before trusting it.
    fn snapshot_req_prod(&mut self) -> Result<u32, RingError> {
        let req_prod = self.shared.load(sring::REQ_PROD, Ordering::Acquire);
        let claimed = req_prod.wrapping_sub(self.rsp_prod_pvt);
        if claimed > self.shared.size {
            return Err(self.halt(RingError::RequestOverflow {
                req_prod,
                rsp_prod_pvt: self.rsp_prod_pvt,
                size: self.shared.size,
            }));
        }
        if claimed < self.awaiting_response() {
            return Err(self.halt(RingError::RequestProducerRegressed {
                req_prod,
                req_cons: self.req_cons,
            }));
        }
        Ok(req_prod)
    }

    /// Takes the next request, copied out of its slot in one read and decoded.
    ///
    /// `req_prod` is read (and checked) only when the previous snapshot is used up, so
    /// one batch is bounded by what the frontend had published at its start.
    /// `Ok(None)` means the ring is empty as of the latest `req_prod`; follow with
    /// [`BackRing::final_check_for_requests`] before sleeping. After an `Err` the ring
    /// is halted and every later call returns the same error; responses to requests
    /// already consumed can still be pushed.
    pub fn pop_request(&mut self) -> Result<Option<RawRequest>, RingError> {
        Ok(self.pop()?.map(|p| p.request))
    }

    /// [`BackRing::pop_request`] with the ticket its response must be given back with
    /// ([`BackRing::answer`]); on a journaled ring, the request is recorded in the journal
    /// before it is returned, and requests a previous process owed come first.
    pub fn pop(&mut self) -> Result<Option<Popped>, RingError> {
        if let Some(j) = &mut self.journal {
            if let Some((entry, request)) = j.replay.pop_front() {
                return Ok(Some(Popped {
                    ticket: Ticket(entry),
                    request,
                }));
            }
        }
        if let Some(e) = self.halted {
            return Err(e);
        }
        if self.req_cons == self.req_prod_seen {
            self.req_prod_seen = self.snapshot_req_prod()?;
            if self.req_cons == self.req_prod_seen {
                return Ok(None);
            }
        }
        // RING_REQUEST_CONS_OVERFLOW: every slot holds a request we have not answered.
        // Unreachable after the req_prod checks above, kept as the seed keeps it.
        if self.awaiting_response() >= self.shared.size {
            return Ok(None);
        }
        let ticket = match self.take_entry() {
            Some(t) => t,
            None => return Ok(None),
        };
        let index = self.req_cons;
        let slot = self.shared.read_request(index);
        if let Some(j) = &mut self.journal {
            j.journal.record_pop(ticket.0, index, &slot.0);
            j.in_flight[ticket.0 as usize] = true;
        }
        self.req_cons = index.wrapping_add(1);
        Ok(Some(Popped {
            ticket,
            request: RawRequest::decode(self.shared.protocol, &slot.0),
        }))
    }

    /// A free journal entry. An entry answered at a position the frontend has not been
    /// shown yet must not be reused (a crash would lose the request it owes), so when
    /// none is free the responses written so far are published first; the notify check
    /// still covers them at the next [`BackRing::push_responses_and_check_notify`].
    fn take_entry(&mut self) -> Option<Ticket> {
        let Some(j) = &mut self.journal else {
            return Some(Ticket::UNJOURNALED);
        };
        if j.free.is_empty() && !j.answered.is_empty() {
            self.shared
                .store(sring::RSP_PROD, self.rsp_prod_pvt, Ordering::Release);
            j.published(self.rsp_prod_pvt, self.rsp_prod_stored);
            self.rsp_prod_stored = self.rsp_prod_pvt;
        }
        j.free.pop().map(Ticket)
    }

    /// `RING_HAS_UNCONSUMED_REQUESTS`: requests published and not yet consumed, capped
    /// by the free room (so a bogus `req_prod` cannot make it exceed the ring size).
    pub fn unconsumed_requests(&self) -> u32 {
        let req_prod = self.shared.load(sring::REQ_PROD, Ordering::Acquire);
        let published = req_prod.wrapping_sub(self.req_cons);
        let room = self.shared.size.wrapping_sub(self.awaiting_response());
        published.min(room)
    }

    /// `RING_FINAL_CHECK_FOR_REQUESTS`: whether more requests arrived; if none, sets
    /// `req_event = req_cons + 1` so the frontend's next push notifies us, then
    /// checks again after a full barrier (a request published between the first
    /// check and the `req_event` store would otherwise sleep unseen).
    pub fn final_check_for_requests(&mut self) -> Result<bool, RingError> {
        if let Some(e) = self.halted {
            return Err(e);
        }
        if self.unconsumed_requests() > 0 {
            return Ok(true);
        }
        self.shared.store(
            sring::REQ_EVENT,
            self.req_cons.wrapping_add(1),
            Ordering::Relaxed,
        );
        full_barrier();
        Ok(self.unconsumed_requests() > 0)
    }

    /// Writes `response` at `rsp_prod_pvt` (not yet visible to the frontend: see
    /// [`BackRing::push_responses_and_check_notify`]). The slot image is built in a
    /// zeroed private buffer and written with one copy.
    ///
    /// Refuses ([`RingError::NoRequestToAnswer`]) when every consumed request has been
    /// answered: the slot would still belong to an unconsumed request.
    pub fn push_response(&mut self, response: &Response) -> Result<(), RingError> {
        self.answer(Ticket::UNJOURNALED, response)
    }

    /// [`BackRing::push_response`] for the request `ticket` came with. On a journaled
    /// ring the journal records the answer (and its position) before the response is
    /// written into the ring, whose slot may still hold a request the journal owes.
    pub fn answer(&mut self, ticket: Ticket, response: &Response) -> Result<(), RingError> {
        if self.awaiting_response() == 0 {
            return Err(RingError::NoRequestToAnswer);
        }
        let pos = self.rsp_prod_pvt;
        if let Some(j) = &mut self.journal {
            match j.in_flight.get_mut(ticket.0 as usize) {
                Some(busy) if *busy => *busy = false,
                _ => return Err(RingError::BadTicket(ticket.0)),
            }
            j.journal.record_answer(ticket.0, pos);
            j.answered.push_back((ticket.0, pos));
        }
        let bytes = response.encode(self.shared.protocol);
        self.shared
            .write_slot(pos, &bytes[..self.shared.protocol.response_size()]);
        self.rsp_prod_pvt = pos.wrapping_add(1);
        Ok(())
    }

    /// `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`: publishes the responses written so far
    /// (write barrier, then `rsp_prod`), then after a full barrier reads `rsp_event` and
    /// says whether the frontend asked to be notified for one of them.
    pub fn push_responses_and_check_notify(&mut self) -> bool {
        let old = self.rsp_prod_published;
        let new = self.rsp_prod_pvt;
        self.shared.store(sring::RSP_PROD, new, Ordering::Release);
        self.rsp_prod_published = new;
        if let Some(j) = &mut self.journal {
            j.published(new, self.rsp_prod_stored);
        }
        self.rsp_prod_stored = new;
        full_barrier();
        let event = self.shared.load(sring::RSP_EVENT, Ordering::Relaxed);
        needs_notify(old, new, event)
    }
}
