//! The per-ring journal (crash recovery, issue 14): a backend killed at any point of a
//! request's life leaves a journal from which the next one answers every request the
//! frontend published exactly once, however out of order the dead one answered, across
//! index wrap-around and with a request in flight while the ring wraps; a journal that
//! does not fit the ring is refused.
//!
//! A killed process is a `BackRing` dropped (its views release nothing); a kill between
//! two stores of one call is played by writing the journal's documented layout through a
//! view of its own, as the dead process's stores would have left it.

mod common;

use std::sync::atomic::Ordering;

use blkif::abi::{sring, PAGE_SIZE};
use blkif::journal::{
    entry_offset, journal_len, JournalError, ANSWERED, E_INDEX, E_STATE, FORMAT_VERSION, FREE,
    H_LEN, H_MAGIC, H_REQ_CONS, H_RING_SIZE, H_VERSION, IN_FLIGHT,
};
use blkif::{BackRing, FrontRing, JournalStart, Protocol, RawRequest, Response, RingError, Ticket};
use shmem::SharedMemory;

const OP: u8 = 200;

fn req(id: u64) -> RawRequest {
    RawRequest::Other { operation: OP, id }
}

fn id_of(r: &RawRequest) -> u64 {
    match r {
        RawRequest::Other { id, .. } => *id,
        other => panic!("decoded {other:?}, not a request of the test"),
    }
}

/// A frontend and the memory successive backends attach to.
struct Host {
    protocol: Protocol,
    front: FrontRing,
    rings: Vec<SharedMemory>,
    journals: Vec<SharedMemory>,
    /// The test's own view of the journal.
    journal: SharedMemory,
    /// Responses the frontend has received, by id.
    seen: Vec<u64>,
}

impl Host {
    fn new(protocol: Protocol, order: u32, start: u32) -> Host {
        let len = PAGE_SIZE << order;
        let mut rings = common::shared_views(len, 9);
        let front = FrontRing::new_at(rings.pop().unwrap(), protocol, start).unwrap();
        let mut journals = common::shared_views(journal_len(front.size()), 9);
        let journal = journals.pop().unwrap();
        Host {
            protocol,
            front,
            rings,
            journals,
            journal,
            seen: Vec::new(),
        }
    }

    fn back(&mut self, fresh: bool) -> Result<BackRing, RingError> {
        let (ring, journal) = (self.rings.pop().unwrap(), self.journals.pop().unwrap());
        let start = if fresh {
            JournalStart::Fresh(journal)
        } else {
            JournalStart::Recover(journal)
        };
        BackRing::with_journal(ring, self.protocol, start)
    }

    fn push(&mut self, ids: impl IntoIterator<Item = u64>) {
        for id in ids {
            self.front.push_request(&req(id)).unwrap();
        }
        self.front.push_requests_and_check_notify();
    }

    /// Takes every response published so far.
    fn receive(&mut self) {
        while let Some(r) = self.front.pop_response().unwrap() {
            assert_eq!(r.operation, OP);
            self.seen.push(r.id);
        }
    }

    /// Every id in `ids` was answered exactly once, and nothing else.
    fn assert_each_answered_once(&mut self, ids: impl IntoIterator<Item = u64>) {
        self.receive();
        let mut seen = self.seen.clone();
        seen.sort_unstable();
        let mut want: Vec<u64> = ids.into_iter().collect();
        want.sort_unstable();
        assert_eq!(seen, want, "responses the frontend received");
    }

    fn journal_u32(&self, offset: usize) -> u32 {
        self.journal.load_u32(offset, Ordering::Relaxed).unwrap()
    }

    fn set_journal_u32(&self, offset: usize, value: u32) {
        self.journal
            .store_u32(offset, value, Ordering::Relaxed)
            .unwrap();
    }

    /// The entry holding ring index `index` (in flight or answered).
    fn entry_of(&self, index: u32, entries: u32) -> u32 {
        (0..entries)
            .find(|&e| {
                self.journal_u32(entry_offset(e) + E_STATE) != FREE
                    && self.journal_u32(entry_offset(e) + E_INDEX) == index
            })
            .expect("an entry for the index")
    }
}

fn pop_all(ring: &mut BackRing) -> Vec<(Ticket, u64)> {
    let mut out = Vec::new();
    while let Some(p) = ring.pop().unwrap() {
        out.push((p.ticket, id_of(&p.request)));
    }
    out
}

fn answer(ring: &mut BackRing, popped: &[(Ticket, u64)]) {
    for &(t, id) in popped {
        ring.answer(t, &Response::okay(id, OP)).unwrap();
    }
}

/// Pops everything (replayed requests first), answers it all and publishes.
fn serve_all(ring: &mut BackRing) -> Vec<u64> {
    let popped = pop_all(ring);
    answer(ring, &popped);
    ring.push_responses_and_check_notify();
    popped.into_iter().map(|(_, id)| id).collect()
}

/// The case the journal exists for: requests answered out of order, their responses
/// written over requests still in flight, and the process killed before or after
/// publishing them.
#[test]
fn out_of_order_answers_then_kill_each_request_answered_once() {
    for p in [Protocol::Native, Protocol::X86_32, Protocol::X86_64] {
        for publish in [false, true] {
            let mut h = Host::new(p, 0, 0);
            h.push(0..8);
            let mut old = h.back(true).unwrap();
            let popped = pop_all(&mut old);
            assert_eq!(popped.len(), 8);
            // 5, 6, 7 answered into slots 0, 1, 2: requests 0, 1, 2 are gone from the ring.
            answer(&mut old, &popped[5..]);
            if publish {
                old.push_responses_and_check_notify();
            }
            drop(old);
            h.receive();

            let mut new = h.back(false).unwrap();
            let owed = if publish { 5 } else { 8 };
            assert_eq!(new.replayed_at_attach(), owed);
            let replayed = serve_all(&mut new);
            let want: Vec<u64> = if publish {
                (0..5).collect()
            } else {
                (0..8).collect()
            };
            assert_eq!(replayed, want, "oldest first, from the journal's copies");
            h.assert_each_answered_once(0..8);
        }
    }
}

/// Killed before the entry of a popped request was written: the request is still
/// unconsumed as far as the journal knows, and is taken from the ring.
#[test]
fn killed_before_the_entry_is_written() {
    let mut h = Host::new(Protocol::Native, 0, 0);
    h.push(0..3);
    let mut old = h.back(true).unwrap();
    let popped: Vec<_> = (0..2).map(|_| old.pop().unwrap().unwrap()).collect();
    assert_eq!(popped.len(), 2);
    drop(old);
    let mut new = h.back(false).unwrap();
    assert_eq!(new.replayed_at_attach(), 2);
    assert_eq!(serve_all(&mut new), vec![0, 1, 2]);
    h.assert_each_answered_once(0..3);
}

/// Killed after the entry was written, before the journal's `req_cons` moved past it:
/// the entry is ignored and the request taken from the ring, once.
#[test]
fn killed_between_the_entry_and_req_cons() {
    let mut h = Host::new(Protocol::Native, 0, 0);
    h.push(0..3);
    let mut old = h.back(true).unwrap();
    let popped = pop_all(&mut old);
    assert_eq!(popped.len(), 3);
    drop(old);
    // As the dead process left it had it died just before the last req_cons store.
    assert_eq!(h.journal_u32(H_REQ_CONS), 3);
    h.set_journal_u32(H_REQ_CONS, 2);
    let mut new = h.back(false).unwrap();
    assert_eq!(new.replayed_at_attach(), 2);
    assert_eq!(serve_all(&mut new), vec![0, 1, 2]);
    h.assert_each_answered_once(0..3);
}

/// Killed after an entry was marked answered and before (or while) the response was
/// written into the ring: the response position is not published, so it is owed again.
#[test]
fn killed_after_the_answer_mark_before_the_response() {
    let mut h = Host::new(Protocol::Native, 0, 0);
    h.push(0..4);
    let mut old = h.back(true).unwrap();
    let popped = pop_all(&mut old);
    answer(&mut old, &popped[..1]);
    old.push_responses_and_check_notify();
    answer(&mut old, &popped[3..]);
    drop(old);
    // The mark says answered at position 1; whatever the ring slot holds is unpublished.
    let e = h.entry_of(3, 32);
    assert_eq!(h.journal_u32(entry_offset(e) + E_STATE), ANSWERED);
    let mut new = h.back(false).unwrap();
    assert_eq!(new.replayed_at_attach(), 3);
    assert_eq!(serve_all(&mut new), vec![1, 2, 3]);
    h.assert_each_answered_once(0..4);
}

/// Killed after `rsp_prod` was published and before the entries were freed: published
/// answers are not owed.
#[test]
fn killed_after_publishing_before_freeing() {
    let mut h = Host::new(Protocol::Native, 0, 0);
    h.push(0..4);
    let mut old = h.back(true).unwrap();
    let popped = pop_all(&mut old);
    answer(&mut old, &[popped[2], popped[0]]);
    old.push_responses_and_check_notify();
    drop(old);
    h.receive();
    // Put the answer marks back, with the positions they had (0 and 1, both published).
    for (index, pos) in [(2u32, 0u32), (0, 1)] {
        let e = (0..32)
            .find(|&e| {
                h.journal_u32(entry_offset(e) + E_STATE) == FREE
                    && h.journal_u32(entry_offset(e) + E_INDEX) == index
            })
            .unwrap();
        h.set_journal_u32(entry_offset(e) + 8, pos);
        h.set_journal_u32(entry_offset(e) + E_STATE, ANSWERED);
    }
    let mut new = h.back(false).unwrap();
    assert_eq!(new.replayed_at_attach(), 2);
    assert_eq!(serve_all(&mut new), vec![1, 3]);
    h.assert_each_answered_once(0..4);
}

/// Killed with nothing owed after everything was published: nothing is re-executed, and
/// later requests are served from the ring.
#[test]
fn killed_after_publishing_everything() {
    let mut h = Host::new(Protocol::Native, 0, 0);
    h.push(0..4);
    let mut old = h.back(true).unwrap();
    serve_all(&mut old);
    drop(old);
    let mut new = h.back(false).unwrap();
    assert_eq!(new.replayed_at_attach(), 0);
    h.push(4..6);
    assert_eq!(serve_all(&mut new), vec![4, 5]);
    h.assert_each_answered_once(0..6);
}

/// Indices wrap at 2^32 during the run and between the two processes; three kills in a
/// row, each with requests in flight and answers unpublished.
#[test]
fn wrap_around_and_repeated_kills() {
    let mut h = Host::new(Protocol::X86_32, 1, u32::MAX - 40);
    let mut next = 0u64;
    let mut back = h.back(true).unwrap();
    for round in 0..3 {
        // Serve a few full batches, then leave half a batch in flight and half answered.
        for _ in 0..3 {
            h.push(next..next + 20);
            next += 20;
            serve_all(&mut back);
            h.receive();
        }
        h.push(next..next + 20);
        next += 20;
        let popped = pop_all(&mut back);
        let odd: Vec<_> = popped
            .iter()
            .copied()
            .filter(|(_, id)| id % 2 == 1)
            .collect();
        answer(&mut back, &odd);
        if round == 1 {
            back.push_responses_and_check_notify();
        }
        drop(back);
        h.receive();
        back = h.back(false).unwrap();
        assert!(back.replayed_at_attach() >= 10);
    }
    serve_all(&mut back);
    h.assert_each_answered_once(0..next);
}

/// A request stays in flight while the ring wraps several times over its slot: it is
/// re-executed from the journal's copy (its ring slot has long been reused).
#[test]
fn a_request_in_flight_across_wraps_is_recovered_from_its_copy() {
    let mut h = Host::new(Protocol::Native, 0, 0);
    h.push([1000]);
    let mut old = h.back(true).unwrap();
    let slow = old.pop().unwrap().unwrap();
    let mut next = 0u64;
    for _ in 0..10 {
        h.push(next..next + 20);
        next += 20;
        serve_all(&mut old);
        h.receive();
    }
    h.push(next..next + 5);
    let popped = pop_all(&mut old);
    answer(&mut old, &popped[3..]);
    drop(old);
    let mut new = h.back(false).unwrap();
    // The slow one, and all five of the last batch (two answered, not published).
    assert_eq!(new.replayed_at_attach(), 6);
    let first = new.pop().unwrap().unwrap();
    assert_eq!(id_of(&first.request), 1000, "oldest first");
    assert_eq!(first.request, slow.request);
    new.answer(first.ticket, &Response::okay(1000, OP)).unwrap();
    serve_all(&mut new);
    h.assert_each_answered_once((0..next + 5).chain([1000]));
}

/// An answered entry whose response is not yet published is not reused: a frontend that
/// overfills the ring makes the backend publish before it takes the next request.
#[test]
fn answered_entries_are_reused_only_once_published() {
    let mut h = Host::new(Protocol::Native, 0, 0);
    h.push(0..32);
    let mut old = h.back(true).unwrap();
    let popped = pop_all(&mut old);
    assert_eq!(popped.len(), 32);
    answer(&mut old, &popped);
    let rsp_prod = |h: &Host| {
        h.front
            .memory()
            .load_u32(sring::RSP_PROD, Ordering::Relaxed)
            .unwrap()
    };
    assert_eq!(rsp_prod(&h), 0, "nothing published yet");
    // A hostile frontend publishes one more request without having seen a response (its
    // slot holds response 0).
    h.front
        .memory()
        .store_u32(sring::REQ_PROD, 33, Ordering::Release)
        .unwrap();
    let extra = old.pop().unwrap().unwrap();
    assert_eq!(rsp_prod(&h), 32, "published before an entry was reused");
    drop(old);
    let mut new = h.back(false).unwrap();
    assert_eq!(new.replayed_at_attach(), 1);
    let again = new.pop().unwrap().unwrap();
    assert_eq!(again.request, extra.request);
}

/// A blank journal (created, never written) means nothing was consumed beyond rsp_prod.
#[test]
fn a_blank_journal_resumes_at_rsp_prod() {
    let mut h = Host::new(Protocol::Native, 0, 5);
    h.push(0..3);
    let mut new = h.back(false).unwrap();
    assert_eq!(new.replayed_at_attach(), 0);
    assert_eq!(new.req_cons(), 5);
    assert_eq!(serve_all(&mut new), vec![0, 1, 2]);
    h.assert_each_answered_once(0..3);
}

fn refused(h: &mut Host) -> JournalError {
    match h.back(false) {
        Err(RingError::Journal(e)) => e,
        other => panic!("expected the journal refused, got {other:?}"),
    }
}

/// A journal that does not fit the ring refuses the ring: wrong magic, another ring
/// size, an unknown state, indices beyond what the frontend published, and owed entries
/// that do not add up.
#[test]
fn corrupt_or_mismatched_journals_are_refused() {
    let left = || {
        let mut h = Host::new(Protocol::Native, 0, 0);
        h.push(0..6);
        let mut old = h.back(true).unwrap();
        let popped = pop_all(&mut old);
        answer(&mut old, &popped[4..]);
        drop(old);
        h
    };

    let mut h = left();
    h.set_journal_u32(H_MAGIC, 0x1234);
    assert!(matches!(
        refused(&mut h),
        JournalError::Mismatch { magic: 0x1234, .. }
    ));

    let mut h = left();
    h.set_journal_u32(H_RING_SIZE, 64);
    assert!(matches!(
        refused(&mut h),
        JournalError::Mismatch { ring_size: 64, .. }
    ));

    let mut h = left();
    h.set_journal_u32(entry_offset(7) + E_STATE, 9);
    assert_eq!(
        refused(&mut h),
        JournalError::BadState { entry: 7, state: 9 }
    );

    let mut h = left();
    h.set_journal_u32(H_REQ_CONS, 7);
    assert!(matches!(
        refused(&mut h),
        JournalError::BadIndices { req_cons: 7, .. }
    ));

    let mut h = left();
    let e = h.entry_of(2, 32);
    h.set_journal_u32(entry_offset(e) + E_STATE, FREE);
    assert_eq!(
        refused(&mut h),
        JournalError::Inconsistent {
            found: 5,
            expected: 6,
            req_cons: 6,
            rsp_prod: 0
        }
    );

    let mut h = left();
    let e = h.entry_of(1, 32);
    let other = (0..32)
        .find(|&x| h.journal_u32(entry_offset(x) + E_STATE) == FREE)
        .unwrap();
    h.set_journal_u32(entry_offset(other) + E_STATE, IN_FLIGHT);
    h.set_journal_u32(entry_offset(other) + E_INDEX, 1);
    assert!(e != other);
    assert!(matches!(
        refused(&mut h),
        JournalError::Inconsistent { found: 7, .. }
    ));

    // A journal mapping too small for the ring (written for a smaller one).
    let mut h = left();
    let small = common::shared_views(journal_len(16), 1).pop().unwrap();
    let ring = h.rings.pop().unwrap();
    assert!(matches!(
        BackRing::with_journal(ring, Protocol::Native, JournalStart::Recover(small)),
        Err(RingError::Journal(JournalError::Length { .. }))
    ));
}

/// The header says its format version and its length; a length word that disagrees
/// with the geometry is refused, and a journal from a build before that word (0 there)
/// recovers as before.
#[test]
fn the_header_holds_version_and_length() {
    let mut h = Host::new(Protocol::Native, 0, 0);
    h.push(0..4);
    let mut old = h.back(true).unwrap();
    let popped = pop_all(&mut old);
    answer(&mut old, &popped[3..]);
    drop(old);
    assert_eq!(h.journal_u32(H_VERSION), FORMAT_VERSION);
    let len = u32::try_from(journal_len(32)).unwrap();
    assert_eq!(h.journal_u32(H_LEN), len);

    h.set_journal_u32(H_LEN, len + 128);
    assert!(matches!(refused(&mut h), JournalError::Mismatch { .. }));

    h.set_journal_u32(H_LEN, 0);
    let mut new = h.back(false).unwrap();
    assert_eq!(new.replayed_at_attach(), 4);
    assert_eq!(serve_all(&mut new), vec![0, 1, 2, 3]);
    h.assert_each_answered_once(0..4);
}

/// A journal this build cannot read is ignored when it provably owes nothing: the ring
/// resumes at `rsp_prod` without it, a fresh journal is started, and every request the
/// frontend published is answered exactly once from the ring. Another format version
/// whose `req_cons` is `rsp_prod` (whatever its length), and any garbage while the
/// frontend has nothing unanswered.
#[test]
fn unreadable_journals_that_owe_nothing_are_ignored() {
    // Another format version (a newer build's, after a downgrade), of another length,
    // that consumed nothing beyond the published responses.
    let mut h = Host::new(Protocol::Native, 0, 3);
    h.push(0..2);
    let mut old = h.back(true).unwrap();
    assert_eq!(serve_all(&mut old), vec![0, 1]);
    drop(old);
    h.push(2..6);
    let foreign = common::shared_views(journal_len(32) + 4096, 1)
        .pop()
        .unwrap();
    foreign
        .store_u32(H_MAGIC, h.journal_u32(H_MAGIC), Ordering::Relaxed)
        .unwrap();
    foreign
        .store_u32(H_VERSION, FORMAT_VERSION + 1, Ordering::Relaxed)
        .unwrap();
    foreign.store_u32(H_REQ_CONS, 5, Ordering::Relaxed).unwrap();
    // Garbage where this version keeps its entries: none of it is read.
    foreign.fill(64, 4096, 0xa5).unwrap();
    let ring = h.rings.pop().unwrap();
    let mut new =
        BackRing::with_journal(ring, Protocol::Native, JournalStart::Recover(foreign)).unwrap();
    assert!(
        matches!(
            new.ignored_journal(),
            Some(JournalError::Version { req_cons: 5, .. })
        ),
        "{:?}",
        new.ignored_journal()
    );
    assert_eq!(new.replayed_at_attach(), 0);
    assert!(new.journal_memory().is_none());
    new.start_journal(h.journals.pop().unwrap()).unwrap();
    // The new journal records from here on: kill once more mid-I/O and recover from it.
    let popped = pop_all(&mut new);
    assert_eq!(
        popped.iter().map(|p| p.1).collect::<Vec<_>>(),
        vec![2, 3, 4, 5]
    );
    answer(&mut new, &popped[2..]);
    drop(new);
    let mut again = h.back(false).unwrap();
    assert_eq!(again.replayed_at_attach(), 4);
    assert_eq!(serve_all(&mut again), vec![2, 3, 4, 5]);
    h.assert_each_answered_once(0..6);

    // Garbage (a corrupt file) while the frontend has nothing unanswered.
    let mut h = Host::new(Protocol::X86_32, 0, 9);
    h.push(0..3);
    let mut old = h.back(true).unwrap();
    assert_eq!(serve_all(&mut old), vec![0, 1, 2]);
    drop(old);
    h.journal
        .fill(0, journal_len(h.front.size()), 0x5a)
        .unwrap();
    let mut new = h.back(false).unwrap();
    assert!(
        matches!(new.ignored_journal(), Some(JournalError::Mismatch { .. })),
        "{:?}",
        new.ignored_journal()
    );
    assert_eq!(new.req_cons(), 12);
    new.start_journal(h.journals.pop().unwrap()).unwrap();
    h.push(3..5);
    assert_eq!(serve_all(&mut new), vec![3, 4]);
    h.assert_each_answered_once(0..5);
}

/// A journal this build cannot read that may owe requests refuses the ring: only the
/// journal has their text (responses may have overwritten their slots), so resuming
/// from the ring could answer a request twice or run a response as a request.
#[test]
fn unreadable_journals_that_may_owe_requests_are_refused() {
    let left = || {
        let mut h = Host::new(Protocol::Native, 0, 0);
        h.push(0..6);
        let mut old = h.back(true).unwrap();
        let popped = pop_all(&mut old);
        answer(&mut old, &popped[4..]);
        drop(old);
        h
    };
    // Another version that consumed beyond the published responses.
    let mut h = left();
    h.set_journal_u32(H_VERSION, FORMAT_VERSION + 1);
    assert_eq!(
        refused(&mut h),
        JournalError::Version {
            version: FORMAT_VERSION + 1,
            req_cons: 6
        }
    );
    // Garbage while requests are unanswered.
    let mut h = left();
    h.journal.fill(0, journal_len(32), 0x5a).unwrap();
    assert!(matches!(refused(&mut h), JournalError::Mismatch { .. }));
}

/// A ticket is answered once, and only a ticket the ring handed out is accepted.
#[test]
fn tickets_are_checked() {
    let mut h = Host::new(Protocol::Native, 0, 0);
    h.push(0..2);
    let mut back = h.back(true).unwrap();
    let a = back.pop().unwrap().unwrap();
    let _b = back.pop().unwrap().unwrap();
    back.answer(a.ticket, &Response::okay(0, OP)).unwrap();
    assert!(matches!(
        back.answer(a.ticket, &Response::okay(0, OP)),
        Err(RingError::BadTicket(_))
    ));
    assert!(matches!(
        back.answer(Ticket::UNJOURNALED, &Response::okay(0, OP)),
        Err(RingError::BadTicket(_))
    ));
}
