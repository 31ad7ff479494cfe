//! Request geometry: how a block I/O becomes ring requests, segments and indirect pages.
//!
//! This module owns the arithmetic that Linux's xen-blkfront spreads over
//! `blkif_queue_rw_req`, `blkfront_setup_indirect` and `blkfront_gather_backend_features`:
//! how many 4 KiB segments a request may carry, how many indirect pages describe them, how
//! big the persistent-grant pool of a ring gets, and how a byte range of the disk is cut
//! into requests whose segments each stay inside one page. It is pure arithmetic so that it
//! can be pinned against Linux's formulas by unit tests.

/// Bytes in a sector: the unit of `sector_number`, `first_sect` and `last_sect`.
pub const SECTOR_SIZE: u64 = 512;
/// A Xen page; every grant covers exactly one.
pub const PAGE_SIZE: usize = 4096;
/// Sectors in one page (`first_sect..=last_sect` stay below this).
pub const SECTORS_PER_PAGE: usize = PAGE_SIZE / SECTOR_SIZE as usize;
/// `BLKIF_MAX_SEGMENTS_PER_REQUEST`: segments carried in the request slot itself.
pub const MAX_DIRECT_SEGMENTS: usize = 11;
/// `BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST`: indirect grefs an indirect request slot holds.
pub const MAX_INDIRECT_PAGES: usize = 8;
/// `GRANTS_PER_INDIRECT_FRAME`: `XEN_PAGE_SIZE / sizeof(struct blkif_request_segment)`.
pub const SEGMENTS_PER_INDIRECT_PAGE: usize = PAGE_SIZE / 8;
/// The most segments an indirect request can describe at all (8 pages of 512 descriptors).
pub const MAX_INDIRECT_SEGMENTS_LIMIT: u32 =
    (MAX_INDIRECT_PAGES * SEGMENTS_PER_INDIRECT_PAGE) as u32;
/// Linux's `xen_blkif_max_segments` default (module parameter `max_indirect_segments`).
pub const DEFAULT_MAX_INDIRECT_SEGMENTS: u32 = 32;

/// `INDIRECT_GREFS(segments)`: indirect pages needed to describe `segments` segments.
pub fn indirect_pages_for(segments: usize) -> usize {
    segments.div_ceil(SEGMENTS_PER_INDIRECT_PAGE)
}

/// The indirect-segment limit in use, as `blkfront_gather_backend_features` computes it:
/// the backend's `feature-max-indirect-segments` capped by our own maximum (and by what an
/// indirect request slot can describe), and 0 — indirect descriptors off — when that is
/// no more than a direct request carries anyway (using them would only cost throughput).
pub fn negotiate_indirect_segments(backend_max: u32, own_max: u32) -> u32 {
    let n = backend_max.min(own_max).min(MAX_INDIRECT_SEGMENTS_LIMIT);
    if n as usize <= MAX_DIRECT_SEGMENTS {
        0
    } else {
        n
    }
}

/// Segments one ring request may carry once `max_indirect_segments` is negotiated
/// (Linux's `grants` in `blkfront_setup_indirect`).
pub fn segments_per_request(max_indirect_segments: u32) -> usize {
    if max_indirect_segments == 0 {
        MAX_DIRECT_SEGMENTS
    } else {
        max_indirect_segments as usize
    }
}

/// Upper bound of the persistent-grant pool of one ring: `fill_grant_buffer`'s
/// `(grants + INDIRECT_GREFS(grants)) * BLK_RING_SIZE`. Linux allocates all of it up front;
/// we grant lazily and only ever reach it with a full ring of maximal requests.
pub fn persistent_pool_limit(max_indirect_segments: u32, ring_slots: usize) -> usize {
    let grants = segments_per_request(max_indirect_segments);
    let indirect = if max_indirect_segments == 0 {
        0
    } else {
        indirect_pages_for(grants)
    };
    (grants + indirect) * ring_slots
}

/// One segment: a sector range inside one page of the request's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentSpan {
    /// First sector in the page (inclusive).
    pub first_sect: u8,
    /// Last sector in the page (inclusive).
    pub last_sect: u8,
    /// Where the segment's bytes start in the chunk's part of the caller buffer.
    pub buf_offset: usize,
    /// Bytes in the segment (`(last_sect - first_sect + 1) * 512`).
    pub len: usize,
}

impl SegmentSpan {
    /// Byte offset of the segment inside its page.
    pub fn page_offset(&self) -> usize {
        self.first_sect as usize * SECTOR_SIZE as usize
    }
}

/// A piece of an I/O that one ring request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// First disk sector.
    pub sector: u64,
    /// Offset of the chunk's bytes in the whole I/O's buffer.
    pub buf_offset: usize,
    /// Bytes (a multiple of 512).
    pub len: usize,
    /// Offset of the chunk's first byte inside its first page (a multiple of 512).
    pub page_offset: usize,
}

impl Chunk {
    /// Number of page segments (grants) the chunk needs.
    pub fn nr_segments(&self) -> usize {
        (self.page_offset + self.len).div_ceil(PAGE_SIZE)
    }

    /// The chunk's segments in order; each stays inside one page.
    pub fn segments(&self) -> impl Iterator<Item = SegmentSpan> + '_ {
        let mut done = 0usize;
        let mut in_page = self.page_offset;
        std::iter::from_fn(move || {
            if done >= self.len {
                return None;
            }
            let len = (PAGE_SIZE - in_page).min(self.len - done);
            let first = in_page / SECTOR_SIZE as usize;
            let last = first + len / SECTOR_SIZE as usize - 1;
            let seg = SegmentSpan {
                first_sect: first as u8,
                last_sect: last as u8,
                buf_offset: done,
                len,
            };
            done += len;
            in_page = 0;
            Some(seg)
        })
    }
}

/// Cuts `len` bytes at disk `sector` into chunks of at most `max_segments` page segments.
///
/// The buffer is laid out as if it started `page_offset` bytes into a page (an O_DIRECT
/// buffer that is sector- but not page-aligned), so the first segment of the first chunk
/// may start mid-page and every later one is page-aligned, exactly as a scatter-gather list
/// of a contiguous buffer would map. `len` and `page_offset` must be multiples of 512 and
/// `page_offset < 4096`; the callers check that.
pub fn split(sector: u64, len: usize, page_offset: usize, max_segments: usize) -> Vec<Chunk> {
    let mut chunks = Vec::with_capacity(len / (max_segments * PAGE_SIZE) + 1);
    split_into(sector, len, page_offset, max_segments, &mut chunks);
    chunks
}

/// [`split`] into a caller's vector (cleared first), so a submission path that runs per
/// I/O allocates nothing.
pub fn split_into(
    sector: u64,
    len: usize,
    page_offset: usize,
    max_segments: usize,
    chunks: &mut Vec<Chunk>,
) {
    debug_assert!(page_offset < PAGE_SIZE && page_offset.is_multiple_of(SECTOR_SIZE as usize));
    debug_assert!(len.is_multiple_of(SECTOR_SIZE as usize) && max_segments > 0);
    chunks.clear();
    let mut done = 0usize;
    while done < len {
        let in_page = (page_offset + done) % PAGE_SIZE;
        let room = max_segments * PAGE_SIZE - in_page;
        let this = room.min(len - done);
        chunks.push(Chunk {
            sector: sector + (done as u64 / SECTOR_SIZE),
            buf_offset: done,
            len: this,
            page_offset: in_page,
        });
        done += this;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn indirect_negotiation_follows_linux() {
        // Backend offers nothing: no indirect descriptors.
        assert_eq!(negotiate_indirect_segments(0, 32), 0);
        // blkback advertises 256; Linux's default cap is 32.
        assert_eq!(
            negotiate_indirect_segments(256, DEFAULT_MAX_INDIRECT_SEGMENTS),
            32
        );
        // A limit at or below 11 would lower throughput: indirect stays off.
        assert_eq!(negotiate_indirect_segments(11, 32), 0);
        assert_eq!(negotiate_indirect_segments(256, 8), 0);
        assert_eq!(negotiate_indirect_segments(12, 32), 12);
        // Never more than 8 indirect pages can describe.
        assert_eq!(negotiate_indirect_segments(u32::MAX, u32::MAX), 4096);
    }

    #[test]
    fn indirect_page_arithmetic() {
        assert_eq!(SEGMENTS_PER_INDIRECT_PAGE, 512);
        assert_eq!(indirect_pages_for(1), 1);
        assert_eq!(indirect_pages_for(32), 1);
        assert_eq!(indirect_pages_for(512), 1);
        assert_eq!(indirect_pages_for(513), 2);
        assert_eq!(indirect_pages_for(4096), 8);
    }

    #[test]
    fn pool_limit_matches_fill_grant_buffer() {
        // (32 + INDIRECT_GREFS(32)) * 32 slots for order 0 with Linux's defaults.
        assert_eq!(persistent_pool_limit(32, 32), 33 * 32);
        // Without indirect descriptors: 11 grants per slot.
        assert_eq!(persistent_pool_limit(0, 32), 11 * 32);
        assert_eq!(persistent_pool_limit(1024, 512), (1024 + 2) * 512);
    }

    #[test]
    fn aligned_split() {
        let chunks = split(100, 11 * 4096 + 512, 0, 11);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].len, 11 * 4096);
        assert_eq!(chunks[0].nr_segments(), 11);
        assert_eq!(chunks[1].sector, 100 + 88);
        assert_eq!(chunks[1].len, 512);
        assert_eq!(chunks[1].page_offset, 0);
        let segs: Vec<_> = chunks[1].segments().collect();
        assert_eq!(
            segs,
            vec![SegmentSpan {
                first_sect: 0,
                last_sect: 0,
                buf_offset: 0,
                len: 512
            }]
        );
    }

    #[test]
    fn misaligned_split_starts_mid_page() {
        // 3 sectors into a page: the first chunk holds 11 pages minus that.
        let chunks = split(0, 11 * 4096, 1536, 11);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].len, 11 * 4096 - 1536);
        assert_eq!(chunks[0].nr_segments(), 11);
        let first = chunks[0].segments().next().unwrap();
        assert_eq!((first.first_sect, first.last_sect), (3, 7));
        assert_eq!(chunks[1].page_offset, 0);
        assert_eq!(chunks[1].len, 1536);
        assert_eq!(chunks[1].sector, (11 * 4096 - 1536) / 512);
    }

    #[test]
    fn a_single_sector_mid_page() {
        let c = split(7, 512, 3584, 11);
        assert_eq!(c.len(), 1);
        let s: Vec<_> = c[0].segments().collect();
        assert_eq!((s[0].first_sect, s[0].last_sect, s[0].len), (7, 7, 512));
    }

    proptest! {
        #[test]
        fn chunks_tile_the_io_and_respect_limits(
            sector in 0u64..1_000_000,
            sectors in 1usize..2000,
            in_page in 0usize..8,
            max_segments in prop::sample::select(vec![11usize, 12, 32, 64, 256, 4096]),
        ) {
            let len = sectors * 512;
            let chunks = split(sector, len, in_page * 512, max_segments);
            let mut expect_buf = 0usize;
            for c in &chunks {
                prop_assert_eq!(c.buf_offset, expect_buf);
                prop_assert_eq!(c.sector, sector + (c.buf_offset / 512) as u64);
                prop_assert!(c.nr_segments() <= max_segments);
                prop_assert!(c.len > 0 && c.len % 512 == 0);
                let mut seg_bytes = 0;
                let mut count = 0;
                for (i, s) in c.segments().enumerate() {
                    prop_assert!(s.first_sect <= s.last_sect && s.last_sect < 8);
                    if i > 0 { prop_assert_eq!(s.first_sect, 0); }
                    prop_assert_eq!(s.len, (s.last_sect - s.first_sect + 1) as usize * 512);
                    prop_assert_eq!(s.buf_offset, seg_bytes);
                    seg_bytes += s.len;
                    count += 1;
                }
                prop_assert_eq!(count, c.nr_segments());
                prop_assert_eq!(seg_bytes, c.len);
                expect_buf += c.len;
            }
            prop_assert_eq!(expect_buf, len);
            // Every chunk but the last is full: no request is wasted.
            for c in &chunks[..chunks.len() - 1] {
                prop_assert_eq!(c.page_offset + c.len, max_segments * 4096);
            }
        }
    }
}
