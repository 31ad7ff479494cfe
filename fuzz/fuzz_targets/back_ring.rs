//! A hostile frontend against the back ring, the decoder, the validator and the
//! indirect-descriptor parser (and, on the same bytes, the front ring's response path).
//!
//! The input chooses the protocol, the ring order, the device limits, the initial
//! shared indices and ring contents, a pool of indirect descriptor pages, and then a
//! script of steps interleaving what the guest does (rewrite `req_prod`, `rsp_event`,
//! any slot) with what the engine does (pop, validate, parse, answer, push, final
//! check). Checked: no panic, termination within the input's length, the backend never
//! has more requests awaiting answers than the ring holds, a halted ring stays halted,
//! and nothing is allocated in proportion to guest-claimed sizes.

#![no_main]

use blkif::abi::{MAX_INDIRECT_SEGMENTS, MAX_RESPONSE_SIZE, PAGE_SIZE};
use blkif::{
    BackRing, DeviceLimits, FrontRing, Protocol, RawRequest, Response, RingError, Segment,
    Validated,
};
use libfuzzer_sys::fuzz_target;
use shmem::SharedMemory;
use std::sync::atomic::Ordering;

/// Reads the input front to back; past the end, everything is zero.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

const POOL_PAGES: usize = 9;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let protocol = match input.u8() % 3 {
        0 => Protocol::Native,
        1 => Protocol::X86_32,
        _ => Protocol::X86_64,
    };
    let order = u32::from(input.u8() % 5);
    let flags = input.u8();
    let limits = DeviceLimits {
        sectors: input.u64(),
        read_only: flags & 1 != 0,
        logical_block_size: 512u32 << (input.u8() % 5),
        max_indirect_segments: input.u32() % (2 * MAX_INDIRECT_SEGMENTS as u32),
        discard: flags & 2 != 0,
        secure_discard: flags & 4 != 0,
        flush: flags & 8 != 0,
        barrier: flags & 16 != 0,
    };
    let ring_len = PAGE_SIZE << order;
    let mem = SharedMemory::anonymous(ring_len).unwrap();
    // Initial indices and slot contents, as a guest may have left them.
    for off in [0, 4, 8, 12] {
        mem.store_u32(off, input.u32(), Ordering::Relaxed).unwrap();
    }
    let seed_len = usize::from(input.u8()) * 16;
    let seed = input.bytes(seed_len).to_vec();
    if !seed.is_empty() {
        let image: Vec<u8> = seed.iter().copied().cycle().take(ring_len - 64).collect();
        mem.write(64, &image).unwrap();
    }
    // Descriptor pages the "grants" of indirect requests resolve to (gref % POOL_PAGES;
    // the last page is short, to exercise the unreadable-page path).
    let mut pool: Vec<Vec<u8>> = Vec::with_capacity(POOL_PAGES);
    for p in 0..POOL_PAGES {
        let fill = input.u8();
        let mut page = vec![fill; if p == POOL_PAGES - 1 { 100 } else { PAGE_SIZE }];
        let patch = input.bytes(64);
        page[..patch.len()].copy_from_slice(patch);
        pool.push(page);
    }

    // The same bytes, seen by a frontend as responses from a hostile backend.
    fuzz_front(protocol, order, data);

    let mut ring = match BackRing::new(mem, protocol) {
        Ok(r) => r,
        Err(RingError::RequestOverflow { .. }) => return,
        Err(e) => panic!("unexpected attach error {e}"),
    };
    let size = ring.size();
    let mut segment_buf = vec![Segment::default(); MAX_INDIRECT_SEGMENTS];
    // Answers not yet written, bounded by the ring size (checked below).
    let mut pending: Vec<Response> = Vec::with_capacity(size as usize);
    let mut halted: Option<RingError> = None;

    while !input.is_empty() {
        match input.u8() % 8 {
            // Engine: consume a batch (bounded: at most a ring's worth per step).
            0 | 1 => {
                for _ in 0..=size {
                    match ring.pop_request() {
                        Ok(Some(raw)) => {
                            pending.push(answer(&raw, &limits, &pool, &mut segment_buf));
                            assert!(
                                ring.awaiting_response() <= size
                                    && pending.len() as u32 == ring.awaiting_response(),
                                "consumed more than the ring holds"
                            );
                        }
                        Ok(None) => break,
                        Err(e) => {
                            if let Some(h) = halted {
                                assert_eq!(h, e, "halt error changed");
                            }
                            halted = Some(e);
                            assert_eq!(ring.pop_request(), Err(e), "halt must stick");
                            break;
                        }
                    }
                }
            }
            // Engine: answer some pending requests, push, check notify.
            2 => {
                let n = usize::from(input.u8()).min(pending.len());
                for r in pending.drain(..n) {
                    ring.push_response(&r)
                        .expect("answering a consumed request");
                }
                let _ = ring.push_responses_and_check_notify();
                if pending.is_empty() {
                    assert_eq!(
                        ring.push_response(&Response::default()),
                        Err(RingError::NoRequestToAnswer)
                    );
                }
            }
            3 => match ring.final_check_for_requests() {
                Ok(_) => assert!(halted.is_none()),
                Err(e) => assert_eq!(Some(e), halted),
            },
            // Guest: move req_prod anywhere.
            4 => {
                let v = input.u32();
                ring.memory().store_u32(0, v, Ordering::Release).unwrap();
            }
            // Guest: advance req_prod by a small amount (plausible traffic).
            5 => {
                let v = ring.memory().load_u32(0, Ordering::Relaxed).unwrap();
                let step = u32::from(input.u8() % 40);
                ring.memory()
                    .store_u32(0, v.wrapping_add(step), Ordering::Release)
                    .unwrap();
            }
            // Guest: rewrite a slot (or any bytes of the ring) while we work.
            6 => {
                let off = input.u32() as usize % ring_len;
                let b = input.bytes(usize::from(input_len_hint(off, ring_len)));
                let _ = ring.memory().write(off, b);
            }
            // Guest: scribble on rsp_event / rsp_prod.
            _ => {
                let which = if input.u8() & 1 == 0 { 12 } else { 8 };
                let v = input.u32();
                ring.memory()
                    .store_u32(which, v, Ordering::Relaxed)
                    .unwrap();
            }
        }
    }
    let _ = ring.unconsumed_requests();
});

fn input_len_hint(off: usize, ring_len: usize) -> u8 {
    (ring_len - off).min(112) as u8
}

/// What the engine would answer, without I/O.
fn answer(
    raw: &RawRequest,
    limits: &DeviceLimits,
    pool: &[Vec<u8>],
    segment_buf: &mut [Segment],
) -> Response {
    match raw.validate(limits) {
        Ok(Validated::Ready(req)) => {
            assert!(
                req.nr_sectors == 0
                    || req
                        .sector
                        .checked_add(req.nr_sectors)
                        .is_some_and(|e| e <= limits.sectors)
            );
            req.response(0)
        }
        Ok(Validated::Indirect(ind)) => {
            assert!(
                ind.nr_pages() <= 8 && u32::from(ind.nr_segments()) <= limits.max_indirect_segments
            );
            let pages: Vec<&Vec<u8>> = ind
                .indirect_grefs()
                .iter()
                .map(|&g| &pool[g as usize % pool.len()])
                .collect();
            match ind
                .parse_segments(&pages, segment_buf)
                .and_then(|segs| ind.finish(segs, limits))
            {
                Ok(req) => {
                    assert!(req
                        .sector
                        .checked_add(req.nr_sectors)
                        .is_some_and(|e| e <= limits.sectors));
                    req.response(0)
                }
                Err(e) => ind.response(e.status()),
            }
        }
        Err(e) => {
            let r = raw.response(e.status());
            assert_eq!(r.id, raw.id());
            r
        }
    }
}

/// A frontend facing a backend that wrote `data` as responses and indices.
fn fuzz_front(protocol: Protocol, order: u32, data: &[u8]) {
    let mut slot = [0u8; MAX_RESPONSE_SIZE];
    let n = data.len().min(MAX_RESPONSE_SIZE);
    slot[..n].copy_from_slice(&data[..n]);
    let _ = Response::decode(protocol, &slot);

    let mem = SharedMemory::anonymous(PAGE_SIZE << order).unwrap();
    let mut input = Input(data);
    let start = input.u32();
    let mut front = FrontRing::new_at(mem, protocol, start).unwrap();
    let size = front.size();
    let k = u32::from(input.u8()) % (size + 1);
    let req = RawRequest::Other {
        operation: 200,
        id: 1,
    };
    for _ in 0..k {
        front.push_request(&req).unwrap();
    }
    let _ = front.push_requests_and_check_notify();
    assert_eq!(front.free_slots(), size - k);
    // The backend publishes an arbitrary rsp_prod.
    let rsp_prod = start.wrapping_add(input.u32() % (2 * size + 2));
    front
        .memory()
        .store_u32(8, rsp_prod, Ordering::Release)
        .unwrap();
    let mut got = 0u32;
    loop {
        match front.pop_response() {
            Ok(Some(_)) => got += 1,
            Ok(None) => break,
            Err(_) => {
                assert!(front.halted().is_some());
                break;
            }
        }
        assert!(got <= k, "more responses than requests");
    }
    let _ = front.final_check_for_responses();
}
