//! The shared ring: hostile-side detection, sizes, padding, and property tests of the
//! index arithmetic across wrap-around and of the codecs for every ABI.

mod common;

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use blkif::abi::{sring, MAX_REQUEST_SIZE, MAX_RESPONSE_SIZE, PAGE_SIZE};
use blkif::{
    needs_notify, ring_size, BackRing, DeviceLimits, FrontRing, Protocol, RawRequest, Response,
    RingError, Segment, Validated,
};
use proptest::prelude::*;
use shmem::SharedMemory;

const ALL_PROTOCOLS: [Protocol; 3] = [Protocol::Native, Protocol::X86_32, Protocol::X86_64];

/// A front and a back ring over the same fresh pages, indices starting at `start`.
fn pair(protocol: Protocol, order: u32, start: u32) -> (FrontRing, BackRing) {
    let (f, b) = common::shared_pair(PAGE_SIZE << order);
    let front = FrontRing::new_at(f, protocol, start).unwrap();
    let back = BackRing::new(b, protocol).unwrap();
    (front, back)
}

fn req(id: u64) -> RawRequest {
    RawRequest::Other { operation: 200, id }
}

// ---- geometry -------------------------------------------------------------------------------

#[test]
fn ring_sizes_follow_the_mapping_length() {
    for p in ALL_PROTOCOLS {
        for order in 0..=4 {
            let (front, back) = pair(p, order, 0);
            assert_eq!(front.size(), ring_size(p, order).unwrap());
            assert_eq!(back.size(), front.size());
            assert_eq!(front.free_slots(), front.size());
        }
    }
}

#[test]
fn bad_ring_sizes_refused() {
    for len in [
        PAGE_SIZE * 3,
        PAGE_SIZE * 32,
        PAGE_SIZE - 1,
        100,
        PAGE_SIZE * 5,
    ] {
        let mem = SharedMemory::anonymous(len).unwrap();
        assert_eq!(
            BackRing::new(mem, Protocol::Native).unwrap_err(),
            RingError::BadSize { len }
        );
        let mem = SharedMemory::anonymous(len).unwrap();
        assert_eq!(
            FrontRing::new(mem, Protocol::X86_32).unwrap_err(),
            RingError::BadSize { len }
        );
    }
}

#[test]
fn front_init_is_shared_ring_init() {
    let (f, b) = common::shared_pair(PAGE_SIZE);
    b.fill(0, PAGE_SIZE, 0xee).unwrap();
    let _front = FrontRing::new(f, Protocol::Native).unwrap();
    let idx = |off| b.load_u32(off, Ordering::Relaxed).unwrap();
    assert_eq!(
        [
            idx(sring::REQ_PROD),
            idx(sring::REQ_EVENT),
            idx(sring::RSP_PROD),
            idx(sring::RSP_EVENT)
        ],
        [0, 1, 0, 1]
    );
    let mut pad = [0xffu8; 48];
    b.read(sring::PVT, &mut pad).unwrap();
    assert_eq!(pad, [0u8; 48], "pvt and __pad zeroed");
}

#[test]
fn back_attaches_at_the_shared_rsp_prod() {
    let (f, b) = common::shared_pair(PAGE_SIZE);
    let mut front = FrontRing::new_at(f, Protocol::Native, 1000).unwrap();
    for id in 0..3 {
        front.push_request(&req(id)).unwrap();
    }
    front.push_requests_and_check_notify();
    let mut back = BackRing::new(b, Protocol::Native).unwrap();
    assert_eq!((back.req_cons(), back.rsp_prod_pvt()), (1000, 1000));
    assert_eq!(back.unconsumed_requests(), 3);
    assert_eq!(back.pop_request().unwrap(), Some(req(0)));
}

/// A ring a previous backend served and left (a handover: everything it consumed was
/// answered; or a crash before it answered anything): a new `BackRing` on the same pages
/// pops again exactly the requests the frontend has not seen answered, then new ones,
/// and its responses continue where the old ones stopped.
#[test]
fn a_ring_left_by_another_backend_is_resumed_at_the_shared_rsp_prod() {
    for p in ALL_PROTOCOLS {
        let (f, b, b2) = common::shared_triple(PAGE_SIZE);
        let mut front = FrontRing::new_at(f, p, u32::MAX - 1).unwrap();
        for id in 0..5 {
            front.push_request(&req(id)).unwrap();
        }
        front.push_requests_and_check_notify();
        let mut old = BackRing::new(b, p).unwrap();
        assert_eq!(old.unanswered_at_attach(), 5);
        for id in 0..4 {
            assert_eq!(old.pop_request().unwrap(), Some(req(id)));
        }
        // Two answered and published; two consumed and never answered; one never seen.
        old.push_response(&Response::okay(0, 200)).unwrap();
        old.push_response(&Response::okay(1, 200)).unwrap();
        old.push_responses_and_check_notify();
        drop(old);

        let mut new = BackRing::new(b2, p).unwrap();
        assert_eq!(new.unanswered_at_attach(), 3);
        assert_eq!(new.req_cons(), (u32::MAX - 1).wrapping_add(2));
        assert_eq!(new.rsp_prod_pvt(), new.req_cons());
        front.push_request(&req(5)).unwrap();
        front.push_requests_and_check_notify();
        for id in 2..6 {
            assert_eq!(new.pop_request().unwrap(), Some(req(id)));
        }
        assert_eq!(new.pop_request().unwrap(), None);
        for id in 2..6 {
            new.push_response(&Response::okay(id, 200)).unwrap();
        }
        new.push_responses_and_check_notify();
        // The frontend sees each of its six requests answered once, in order.
        for id in 0..6 {
            assert_eq!(front.pop_response().unwrap(), Some(Response::okay(id, 200)));
        }
        assert_eq!(front.pop_response().unwrap(), None);
    }
}

/// A ring whose indices were left corrupt (more unanswered requests than slots) is not
/// resumed: attaching fails, which fails the device as blkback fails a bad connect.
#[test]
fn a_left_ring_with_corrupt_indices_is_refused() {
    let (f, b) = common::shared_pair(PAGE_SIZE << 1);
    let front = FrontRing::new_at(f, Protocol::X86_64, 7).unwrap();
    let size = front.size();
    front
        .memory()
        .store_u32(sring::RSP_PROD, 7u32.wrapping_sub(size), Ordering::Release)
        .unwrap();
    front
        .memory()
        .store_u32(sring::REQ_PROD, 8, Ordering::Release)
        .unwrap();
    assert_eq!(
        BackRing::new(b, Protocol::X86_64).unwrap_err(),
        RingError::RequestOverflow {
            req_prod: 8,
            rsp_prod_pvt: 7u32.wrapping_sub(size),
            size
        }
    );
}

// ---- a hostile frontend ------------------------------------------------------------------------

#[test]
fn request_prod_overflow_halts_the_ring() {
    let (mut front, mut back) = pair(Protocol::Native, 0, u32::MAX - 3);
    let size = back.size();
    for id in 0..4 {
        front.push_request(&req(id)).unwrap();
    }
    front.push_requests_and_check_notify();
    assert_eq!(back.pop_request().unwrap(), Some(req(0)));
    assert_eq!(back.pop_request().unwrap(), Some(req(1)));
    // The batch snapshot is honoured...
    let bogus = back.rsp_prod_pvt().wrapping_add(size + 1);
    front
        .memory()
        .store_u32(sring::REQ_PROD, bogus, Ordering::Release)
        .unwrap();
    assert_eq!(back.pop_request().unwrap(), Some(req(2)));
    assert_eq!(back.pop_request().unwrap(), Some(req(3)));
    // ...then the next snapshot sees a frontend claiming size + 1 requests.
    let err = RingError::RequestOverflow {
        req_prod: bogus,
        rsp_prod_pvt: u32::MAX - 3,
        size,
    };
    assert_eq!(back.pop_request(), Err(err));
    assert_eq!(back.halted(), Some(err));
    // Halted for good, even if the frontend repents.
    front
        .memory()
        .store_u32(sring::REQ_PROD, back.req_cons(), Ordering::Release)
        .unwrap();
    assert_eq!(back.pop_request(), Err(err));
    assert_eq!(back.final_check_for_requests(), Err(err));
    // Requests already consumed can still be answered.
    for id in 0..4 {
        back.push_response(&Response::okay(id, 200)).unwrap();
    }
    assert_eq!(
        back.push_response(&Response::okay(9, 200)),
        Err(RingError::NoRequestToAnswer)
    );
    back.push_responses_and_check_notify();
    for id in 0..4 {
        assert_eq!(front.pop_response().unwrap(), Some(Response::okay(id, 200)));
    }
}

#[test]
fn exactly_a_full_ring_is_not_an_overflow() {
    let (mut front, mut back) = pair(Protocol::X86_32, 1, u32::MAX - 10);
    let size = front.size();
    for id in 0..u64::from(size) {
        front.push_request(&req(id)).unwrap();
    }
    assert_eq!(front.push_request(&req(0)), Err(RingError::Full));
    front.push_requests_and_check_notify();
    for id in 0..u64::from(size) {
        assert_eq!(back.pop_request().unwrap(), Some(req(id)));
    }
    assert_eq!(back.pop_request().unwrap(), None);
    assert_eq!(back.awaiting_response(), size);
}

#[test]
fn request_producer_moving_backwards_halts_the_ring() {
    let (mut front, mut back) = pair(Protocol::Native, 0, 5);
    for id in 0..6 {
        front.push_request(&req(id)).unwrap();
    }
    front.push_requests_and_check_notify();
    for _ in 0..6 {
        back.pop_request().unwrap().unwrap();
    }
    back.push_response(&Response::okay(0, 200)).unwrap();
    // req_prod back behind req_cons (11) but ahead of rsp_prod_pvt (6).
    front
        .memory()
        .store_u32(sring::REQ_PROD, 8, Ordering::Release)
        .unwrap();
    assert_eq!(
        back.pop_request(),
        Err(RingError::RequestProducerRegressed {
            req_prod: 8,
            req_cons: 11
        })
    );
}

#[test]
fn attaching_to_an_overflowed_ring_fails() {
    let (f, b) = common::shared_pair(PAGE_SIZE);
    let front = FrontRing::new(f, Protocol::Native).unwrap();
    front
        .memory()
        .store_u32(sring::REQ_PROD, 33, Ordering::Release)
        .unwrap();
    assert_eq!(
        BackRing::new(b, Protocol::Native).unwrap_err(),
        RingError::RequestOverflow {
            req_prod: 33,
            rsp_prod_pvt: 0,
            size: 32
        }
    );
}

#[test]
fn unconsumed_requests_is_capped_by_the_ring_size() {
    let (front, back) = pair(Protocol::Native, 0, 0);
    front
        .memory()
        .store_u32(sring::REQ_PROD, 0x8000_0000, Ordering::Release)
        .unwrap();
    assert_eq!(back.unconsumed_requests(), 32);
}

#[test]
fn responses_never_outnumber_consumed_requests() {
    let (mut front, mut back) = pair(Protocol::X86_64, 0, 0);
    assert_eq!(
        back.push_response(&Response::okay(1, 0)),
        Err(RingError::NoRequestToAnswer)
    );
    front.push_request(&req(1)).unwrap();
    front.push_requests_and_check_notify();
    // Published but not consumed: still nothing to answer.
    assert_eq!(
        back.push_response(&Response::okay(1, 0)),
        Err(RingError::NoRequestToAnswer)
    );
    back.pop_request().unwrap().unwrap();
    back.push_response(&Response::okay(1, 0)).unwrap();
    assert_eq!(
        back.push_response(&Response::okay(1, 0)),
        Err(RingError::NoRequestToAnswer)
    );
}

#[test]
fn response_padding_is_zero_in_shared_memory() {
    for p in ALL_PROTOCOLS {
        let (f, b) = common::shared_pair(PAGE_SIZE);
        let mut front = FrontRing::new(f, p).unwrap();
        front.push_request(&req(7)).unwrap();
        front.push_requests_and_check_notify();
        // Stale bytes in the slot where the response goes.
        front
            .memory()
            .fill(sring::RING, p.slot_size(), 0xff)
            .unwrap();
        let mut back = BackRing::new(b, p).unwrap();
        back.pop_request().unwrap().unwrap();
        back.push_response(&Response::okay(7, 200)).unwrap();
        back.push_responses_and_check_notify();
        let mut slot = [0u8; 16];
        front.memory().read(sring::RING, &mut slot).unwrap();
        assert_eq!(slot[9], 0, "{p:?}: padding after operation");
        if p.response_size() == 16 {
            assert_eq!(&slot[12..16], &[0; 4], "{p:?}: tail padding");
        } else {
            assert_eq!(&slot[12..16], &[0xff; 4], "{p:?}: only 12 bytes written");
        }
    }
}

// ---- a hostile backend ---------------------------------------------------------------------------

#[test]
fn front_detects_responses_without_requests() {
    let (mut front, _back) = pair(Protocol::Native, 0, u32::MAX);
    front.push_request(&req(1)).unwrap();
    front.push_requests_and_check_notify();
    front
        .memory()
        .store_u32(sring::RSP_PROD, 1, Ordering::Release)
        .unwrap();
    let err = RingError::ResponseOverflow {
        rsp_prod: 1,
        rsp_cons: u32::MAX,
        req_prod: 0,
    };
    assert_eq!(front.pop_response(), Err(err));
    assert_eq!(front.final_check_for_responses(), Err(err));
}

// ---- notify / event index ------------------------------------------------------------------------

#[test]
fn final_check_rearms_and_catches_races() {
    let (mut front, mut back) = pair(Protocol::Native, 0, u32::MAX - 1);
    assert!(!back.final_check_for_requests().unwrap());
    front.push_request(&req(1)).unwrap();
    assert!(
        front.push_requests_and_check_notify(),
        "req_event was re-armed"
    );
    front.push_request(&req(2)).unwrap();
    assert!(
        !front.push_requests_and_check_notify(),
        "backend still awake"
    );
    // The backend checks again before sleeping and finds the requests.
    assert!(back.final_check_for_requests().unwrap());
    assert_eq!(back.pop_request().unwrap(), Some(req(1)));
    assert_eq!(back.pop_request().unwrap(), Some(req(2)));
    assert!(!back.final_check_for_requests().unwrap());
    let event = front
        .memory()
        .load_u32(sring::REQ_EVENT, Ordering::Relaxed)
        .unwrap();
    assert_eq!(event, back.req_cons().wrapping_add(1));
    assert_eq!(event, 1, "req_cons wrapped past 2^32 to 0");
}

/// ring.h's formula, written out as the macro does.
fn c_macro_notify(old: u32, new: u32, event: u32) -> bool {
    new.wrapping_sub(event) < new.wrapping_sub(old)
}

/// What the formula means: the event index lies in (old, new].
fn event_in_batch(old: u32, new: u32, event: u32) -> bool {
    let batch = new.wrapping_sub(old);
    let pos = event.wrapping_sub(old);
    pos >= 1 && pos <= batch
}

// ---- properties ----------------------------------------------------------------------------------

fn start_index() -> impl Strategy<Value = u32> {
    prop_oneof![any::<u32>(), (u32::MAX - 1100)..=u32::MAX, 0u32..1100,]
}

#[derive(Debug, Clone)]
enum Step {
    FrontPush(u16),
    BackPop(u16),
    BackRespond(u16),
    FrontPop(u16),
    BackFinalCheck,
    FrontFinalCheck,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u16..600).prop_map(Step::FrontPush),
        (0u16..600).prop_map(Step::BackPop),
        (0u16..600).prop_map(Step::BackRespond),
        (0u16..600).prop_map(Step::FrontPop),
        Just(Step::BackFinalCheck),
        Just(Step::FrontFinalCheck),
    ]
}

fn protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![
        Just(Protocol::Native),
        Just(Protocol::X86_32),
        Just(Protocol::X86_64)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn notify_formula_means_event_in_batch(old in any::<u32>(), len in 0u32..=512, event in any::<u32>()) {
        let new = old.wrapping_add(len);
        prop_assert_eq!(needs_notify(old, new, event), c_macro_notify(old, new, event));
        prop_assert_eq!(needs_notify(old, new, event), event_in_batch(old, new, event));
        // Also for an event near the batch, the interesting region.
        let near = old.wrapping_add(event % 1030).wrapping_sub(5);
        prop_assert_eq!(needs_notify(old, new, near), event_in_batch(old, new, near));
    }

    /// Front pushes, back pops, back responds, front pops, in random batch sizes from a
    /// random start index: nothing lost, nothing duplicated, order preserved, indices
    /// consistent, and every notify decision equals ring.h's formula on the values the
    /// other side left in shared memory (and is `true` whenever the other side had
    /// re-armed its event index with a final check and was waiting).
    #[test]
    fn ring_transfers_everything_in_order(
        protocol in protocol(),
        order in 0u32..=4,
        start in start_index(),
        steps in proptest::collection::vec(step(), 1..60),
    ) {
        let (mut front, mut back) = pair(protocol, order, start);
        let size = front.size();
        let mut next_id = 0u64;
        let mut published: VecDeque<u64> = VecDeque::new(); // pushed, not popped by back
        let mut consumed: VecDeque<u64> = VecDeque::new(); // popped by back, not answered
        let mut answered: VecDeque<u64> = VecDeque::new(); // answered, not popped by front
        let mut received = 0u64;
        let mut req_published = start;
        let mut rsp_published = start;
        let mut back_waiting = false; // back's final check said "nothing", it sleeps
        let mut front_waiting = false;

        let all_steps = steps.into_iter().chain([
            Step::FrontPush(0), Step::BackPop(600), Step::BackRespond(600), Step::FrontPop(600),
        ]);
        for s in all_steps {
            match s {
                Step::FrontPush(n) => {
                    let n = u32::from(n).min(front.free_slots());
                    for _ in 0..n {
                        front.push_request(&req(next_id)).unwrap();
                        published.push_back(next_id);
                        next_id += 1;
                    }
                    let event = front.memory().load_u32(sring::REQ_EVENT, Ordering::Relaxed).unwrap();
                    let new = front.req_prod_pvt();
                    let notify = front.push_requests_and_check_notify();
                    prop_assert_eq!(notify, c_macro_notify(req_published, new, event));
                    if back_waiting && n > 0 {
                        prop_assert!(notify, "a sleeping backend must be woken");
                        back_waiting = false;
                    }
                    req_published = new;
                }
                Step::BackPop(n) => {
                    for _ in 0..n {
                        match back.pop_request().unwrap() {
                            Some(r) => {
                                let want = published.pop_front();
                                prop_assert_eq!(Some(r.id()), want);
                                consumed.push_back(r.id());
                            }
                            None => {
                                prop_assert!(published.is_empty());
                                break;
                            }
                        }
                    }
                    prop_assert_eq!(back.awaiting_response() as usize, consumed.len());
                    prop_assert!(back.awaiting_response() <= size);
                }
                Step::BackRespond(n) => {
                    for _ in 0..n {
                        let Some(id) = consumed.pop_front() else {
                            prop_assert_eq!(back.push_response(&Response::okay(0, 0)), Err(RingError::NoRequestToAnswer));
                            break;
                        };
                        back.push_response(&Response::okay(id, 200)).unwrap();
                        answered.push_back(id);
                    }
                    let event = front.memory().load_u32(sring::RSP_EVENT, Ordering::Relaxed).unwrap();
                    let new = back.rsp_prod_pvt();
                    let notify = back.push_responses_and_check_notify();
                    prop_assert_eq!(notify, c_macro_notify(rsp_published, new, event));
                    if front_waiting && new != rsp_published {
                        prop_assert!(notify, "a sleeping frontend must be woken");
                        front_waiting = false;
                    }
                    rsp_published = new;
                }
                Step::FrontPop(n) => {
                    for _ in 0..n {
                        match front.pop_response().unwrap() {
                            Some(r) => {
                                prop_assert_eq!(Some(r.id), answered.pop_front());
                                prop_assert_eq!(r, Response::okay(r.id, 200));
                                prop_assert_eq!(r.id, received);
                                received += 1;
                            }
                            None => {
                                prop_assert!(answered.is_empty());
                                break;
                            }
                        }
                    }
                }
                Step::BackFinalCheck => {
                    let more = back.final_check_for_requests().unwrap();
                    prop_assert_eq!(more, !published.is_empty());
                    back_waiting = !more;
                }
                Step::FrontFinalCheck => {
                    let more = front.final_check_for_responses().unwrap();
                    prop_assert_eq!(more, !answered.is_empty());
                    front_waiting = !more;
                }
            }
            // Index invariants, in wrapping arithmetic.
            prop_assert_eq!(front.req_prod_pvt(), start.wrapping_add(next_id as u32));
            prop_assert_eq!(back.req_cons(), start.wrapping_add((next_id - published.len() as u64) as u32));
            prop_assert_eq!(front.rsp_cons(), start.wrapping_add(received as u32));
            prop_assert_eq!(front.free_slots(), size - (next_id - received) as u32);
        }
        prop_assert!(published.is_empty() && consumed.is_empty() && answered.is_empty());
        prop_assert_eq!(received, next_id);
    }
}

// ---- codecs -------------------------------------------------------------------------------------

fn segment() -> impl Strategy<Value = Segment> {
    (any::<u32>(), any::<u8>(), any::<u8>()).prop_map(|(gref, first_sect, last_sect)| Segment {
        gref,
        first_sect,
        last_sect,
    })
}

fn raw_request() -> impl Strategy<Value = RawRequest> {
    prop_oneof![
        (
            0u8..=3,
            any::<u8>(),
            any::<u16>(),
            any::<u64>(),
            any::<u64>(),
            proptest::array::uniform11(segment())
        )
            .prop_map(
                |(operation, nr_segments, handle, id, sector_number, segments)| {
                    RawRequest::ReadWrite {
                        operation,
                        nr_segments,
                        handle,
                        id,
                        sector_number,
                        segments,
                    }
                }
            ),
        (
            any::<u8>(),
            any::<u16>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>()
        )
            .prop_map(|(flag, handle, id, sector_number, nr_sectors)| {
                RawRequest::Discard {
                    flag,
                    handle,
                    id,
                    sector_number,
                    nr_sectors,
                }
            }),
        (
            any::<u8>(),
            any::<u16>(),
            any::<u16>(),
            any::<u64>(),
            any::<u64>(),
            proptest::array::uniform8(any::<u32>())
        )
            .prop_map(
                |(indirect_op, nr_segments, handle, id, sector_number, indirect_grefs)| {
                    RawRequest::Indirect {
                        indirect_op,
                        nr_segments,
                        handle,
                        id,
                        sector_number,
                        indirect_grefs,
                    }
                }
            ),
        (prop_oneof![Just(4u8), 7u8..=255], any::<u64>())
            .prop_map(|(operation, id)| RawRequest::Other { operation, id }),
    ]
}

fn slot_bytes() -> impl Strategy<Value = [u8; MAX_REQUEST_SIZE]> {
    proptest::collection::vec(any::<u8>(), MAX_REQUEST_SIZE).prop_map(|v| {
        let mut a = [0u8; MAX_REQUEST_SIZE];
        a.copy_from_slice(&v);
        a
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn request_encode_decode_round_trips(r in raw_request(), p in protocol()) {
        let bytes = r.encode(p);
        prop_assert!(bytes[p.request_size()..].iter().all(|&b| b == 0), "nothing past the slot");
        prop_assert_eq!(RawRequest::decode(p, &bytes), r);
        // The id is where every ABI's "other" layout says, whatever the variant.
        let id_at = p.layout().other.id;
        prop_assert_eq!(u64::from_le_bytes(bytes[id_at..id_at + 8].try_into().unwrap()), r.id());
    }

    #[test]
    fn any_slot_decodes_and_reencodes_to_the_same_request(bytes in slot_bytes(), p in protocol()) {
        let r = RawRequest::decode(p, &bytes);
        prop_assert_eq!(r.operation(), bytes[0]);
        prop_assert_eq!(RawRequest::decode(p, &r.encode(p)), r);
        // Bytes past this ABI's slot are never looked at.
        let mut other = bytes;
        other[p.request_size()..].fill(0x5a);
        prop_assert_eq!(RawRequest::decode(p, &other), r);
    }

    #[test]
    fn response_round_trips(id in any::<u64>(), operation in any::<u8>(), status in any::<i16>(), p in protocol()) {
        let r = Response { id, operation, status };
        let bytes = r.encode(p);
        prop_assert!(bytes[p.response_size()..].iter().all(|&b| b == 0));
        prop_assert_eq!(bytes[9], 0);
        prop_assert_eq!(Response::decode(p, &bytes), r);
        let mut arbitrary = [0u8; MAX_RESPONSE_SIZE];
        arbitrary[..8].copy_from_slice(&id.to_le_bytes());
        let d = Response::decode(p, &arbitrary);
        prop_assert_eq!(Response::decode(p, &d.encode(p)), d);
    }

    #[test]
    fn segment_round_trips(s in segment()) {
        prop_assert_eq!(Segment::decode(&s.encode()), s);
    }

    /// Validation is total and what it accepts is inside the disk, within the limits.
    #[test]
    fn validation_accepts_only_sane_requests(
        bytes in slot_bytes(),
        p in protocol(),
        sectors in any::<u64>(),
        read_only in any::<bool>(),
        lbs_shift in 0u32..4,
        max_indirect in 0u32..5000,
        features in any::<u8>(),
    ) {
        let limits = DeviceLimits {
            sectors,
            read_only,
            logical_block_size: 512 << lbs_shift,
            max_indirect_segments: max_indirect,
            discard: features & 1 != 0,
            secure_discard: features & 2 != 0,
            flush: features & 4 != 0,
            barrier: features & 8 != 0,
        };
        let raw = RawRequest::decode(p, &bytes);
        match raw.validate(&limits) {
            Ok(Validated::Ready(r)) => {
                prop_assert_eq!(r.id, raw.id());
                prop_assert!(!(read_only && r.operation.writes()));
                if r.nr_sectors > 0 {
                    prop_assert!(r.sector.checked_add(r.nr_sectors).is_some_and(|e| e <= sectors));
                    prop_assert_eq!(r.sector % limits.sectors_per_block(), 0);
                }
                prop_assert_eq!(r.response(0).operation, raw.response_operation());
            }
            Ok(Validated::Indirect(i)) => {
                prop_assert!(i.nr_segments() >= 1 && u32::from(i.nr_segments()) <= max_indirect);
                prop_assert!(i.nr_pages() <= 8);
                prop_assert_eq!(i.response(0).operation, raw.response_operation());
            }
            Err(e) => {
                let rsp = raw.response(e.status());
                prop_assert_eq!(rsp.id, raw.id());
            }
        }
    }
}
