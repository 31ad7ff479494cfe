//! Indirect descriptor pages as a frontend fills them: a structure-aware indirect request
//! (operation, segment count, sector, page grants) encoded into a ring slot in any of the
//! three ABIs, decoded and validated as the backend does, then its descriptor pages
//! (mostly well-formed descriptors, with arbitrary bytes spliced in, some pages short)
//! parsed and the whole request finished against arbitrary device limits.
//!
//! Checked: no panic; a request that passes lies inside the disk, is block-aligned, names
//! no more segments than advertised, and every descriptor stays inside its page; the
//! segment count the request claims is the count parsed.

#![no_main]

use arbitrary::Arbitrary;
use blkif::abi::{MAX_INDIRECT_SEGMENTS, PAGE_SIZE};
use blkif::{DeviceLimits, Protocol, RawRequest, Segment, Validated};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Desc {
    gref: u32,
    first: u8,
    last: u8,
}

#[derive(Debug, Arbitrary)]
struct Page {
    /// Well-formed descriptors from the start of the page (repeated to fill it).
    descs: Vec<Desc>,
    /// Raw bytes written over the page at `at` (a guest scribbling).
    at: u16,
    raw: Vec<u8>,
    /// The page is this many bytes short (an unreadable tail).
    short: u16,
}

#[derive(Debug, Arbitrary)]
struct Input {
    protocol: u8,
    op: u8,
    nr_segments: u16,
    sector: u64,
    grefs: Vec<u32>,
    sectors: u64,
    flags: u8,
    block_shift: u8,
    max_indirect: u16,
    pages: Vec<Page>,
}

fn page_bytes(p: &Page) -> Vec<u8> {
    let mut b = vec![0u8; PAGE_SIZE];
    if !p.descs.is_empty() {
        for (i, chunk) in b.chunks_exact_mut(8).enumerate() {
            let d = &p.descs[i % p.descs.len()];
            chunk.copy_from_slice(
                &Segment {
                    gref: d.gref,
                    first_sect: d.first % 9,
                    last_sect: d.last % 9,
                }
                .encode(),
            );
        }
    }
    let at = usize::from(p.at) % PAGE_SIZE;
    let n = p.raw.len().min(PAGE_SIZE - at);
    b[at..at + n].copy_from_slice(&p.raw[..n]);
    b.truncate(PAGE_SIZE - usize::from(p.short % 64).min(PAGE_SIZE));
    if !p.short.is_multiple_of(7) {
        b.resize(PAGE_SIZE, 0);
    }
    b
}

fuzz_target!(|input: Input| {
    let protocol = match input.protocol % 3 {
        0 => Protocol::Native,
        1 => Protocol::X86_32,
        _ => Protocol::X86_64,
    };
    let limits = DeviceLimits {
        sectors: input.sectors,
        read_only: input.flags & 1 != 0,
        logical_block_size: 512u32 << (input.block_shift % 4),
        max_indirect_segments: u32::from(input.max_indirect) % (2 * MAX_INDIRECT_SEGMENTS as u32),
        discard: input.flags & 2 != 0,
        secure_discard: input.flags & 4 != 0,
        flush: input.flags & 8 != 0,
        barrier: input.flags & 16 != 0,
    };
    let grefs: Vec<u32> = input.grefs.iter().copied().take(8).collect();
    let Some(raw) =
        RawRequest::indirect(input.op % 4, 7, 0, input.sector, input.nr_segments, &grefs)
    else {
        return;
    };
    let decoded = RawRequest::decode(protocol, &raw.encode(protocol));
    let pages: Vec<Vec<u8>> = input.pages.iter().take(9).map(page_bytes).collect();
    thread_local! {
        static SEGS: std::cell::RefCell<Vec<Segment>> =
            std::cell::RefCell::new(vec![Segment::default(); MAX_INDIRECT_SEGMENTS]);
    }
    let ind = match decoded.validate(&limits) {
        Ok(Validated::Indirect(ind)) => ind,
        Ok(Validated::Ready(_)) | Err(_) => return,
    };
    assert!(ind.nr_pages() <= 8);
    assert!(u32::from(ind.nr_segments()) <= limits.max_indirect_segments);
    let page_refs: Vec<&[u8]> = ind
        .indirect_grefs()
        .iter()
        .enumerate()
        .filter_map(|(i, _)| pages.get(i).map(Vec::as_slice))
        .collect();
    SEGS.with_borrow_mut(|segs| check(&ind, &page_refs, segs, &limits));
});

fn check(
    ind: &blkif::IndirectRequest,
    page_refs: &[&[u8]],
    segs: &mut [Segment],
    limits: &DeviceLimits,
) {
    let parsed = match ind.parse_segments(page_refs, segs) {
        Ok(s) => s,
        Err(_) => return,
    };
    assert_eq!(parsed.len(), usize::from(ind.nr_segments()));
    for s in parsed {
        assert!(s.first_sect <= s.last_sect && s.last_sect < 8);
    }
    if let Ok(req) = ind.finish(parsed, limits) {
        let end = req.sector.checked_add(req.nr_sectors).expect("no overflow");
        assert!(end <= limits.sectors, "outside the disk");
        let spb = limits.sectors_per_block();
        assert_eq!(req.sector % spb, 0, "unaligned start");
        assert_eq!(req.nr_sectors % spb, 0, "unaligned length");
    }
}
