//! The second stage of an indirect request: the descriptor pages the engine mapped are
//! copied once each ([`DescriptorPage`]), every descriptor is checked
//! (`xen_blkbk_parse_indirect`), and [`IndirectRequest::finish`] applies the checks that
//! need the total sector count. Also the frontend's side: [`write_indirect_page`].

use shmem::{OutOfBounds, SharedMemory};

use crate::abi::{
    BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST, PAGE_SIZE, SEGMENTS_PER_INDIRECT_PAGE, SEGMENT_SIZE,
};
use crate::response::Response;

use super::validate::check_segments;
use super::{DeviceLimits, Operation, Request, RequestError, Segment, Segments};

/// An indirect READ/WRITE whose header passed validation; its descriptors have not
/// been read yet.
///
/// Its fields are private to the `request` module so the invariants `validate`
/// established (segment count within the limits, page count at most 8) cannot be broken
/// before `parse_segments`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IndirectRequest {
    pub(super) id: u64,
    pub(super) operation: Operation,
    pub(super) handle: u16,
    pub(super) sector: u64,
    pub(super) nr_segments: u16,
    pub(super) nr_pages: u8,
    pub(super) grefs: [u32; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST],
}

/// A page of indirect segment descriptors the engine has mapped (or copied).
///
/// Implemented for [`SharedMemory`] (a mapped grant: read with volatile copies) and for
/// private byte buffers (`[u8]`, `[u8; PAGE_SIZE]`, e.g. after a grant copy).
pub trait DescriptorPage {
    /// Copies `dst.len()` bytes from `offset` of the page into `dst`, once.
    fn copy_descriptors(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds>;
}

impl DescriptorPage for SharedMemory {
    fn copy_descriptors(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        self.read(offset, dst)
    }
}

impl DescriptorPage for [u8] {
    fn copy_descriptors(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        let src = offset
            .checked_add(dst.len())
            .and_then(|end| self.get(offset..end))
            .ok_or(OutOfBounds {
                offset,
                len: dst.len(),
                region_len: self.len(),
            })?;
        dst.copy_from_slice(src);
        Ok(())
    }
}

impl DescriptorPage for [u8; PAGE_SIZE] {
    fn copy_descriptors(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        self.as_slice().copy_descriptors(offset, dst)
    }
}

impl DescriptorPage for Vec<u8> {
    fn copy_descriptors(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        self.as_slice().copy_descriptors(offset, dst)
    }
}

impl<T: DescriptorPage + ?Sized> DescriptorPage for &T {
    fn copy_descriptors(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        (**self).copy_descriptors(offset, dst)
    }
}

impl IndirectRequest {
    /// The guest's `id`.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// [`Operation::Read`] or [`Operation::Write`].
    pub fn operation(&self) -> Operation {
        self.operation
    }

    /// The guest's `handle`.
    pub fn handle(&self) -> u16 {
        self.handle
    }

    /// First 512-byte sector.
    pub fn sector(&self) -> u64 {
        self.sector
    }

    /// Number of segment descriptors: 1..=`max_indirect_segments` (and at most 4096).
    pub fn nr_segments(&self) -> u16 {
        self.nr_segments
    }

    /// Grant references of the descriptor pages to map, in order (only as many as
    /// `nr_segments` needs: `ceil(nr_segments / 512)`).
    pub fn indirect_grefs(&self) -> &[u32] {
        &self.grefs[..usize::from(self.nr_pages)]
    }

    /// Number of descriptor pages (`indirect_grefs().len()`).
    pub fn nr_pages(&self) -> usize {
        usize::from(self.nr_pages)
    }

    /// `xen_blkbk_parse_indirect`: copies the descriptors out of `pages` (the mapped
    /// `indirect_grefs()`, in order), each page with one read, checks every descriptor
    /// and stores them in `out`, returning the filled prefix.
    ///
    /// `out` is the engine's reusable buffer (no allocation here) and must hold
    /// `nr_segments` entries; `pages` must hold at least [`IndirectRequest::nr_pages`].
    pub fn parse_segments<'o, P: DescriptorPage>(
        &self,
        pages: &[P],
        out: &'o mut [Segment],
    ) -> Result<&'o [Segment], RequestError> {
        let n = usize::from(self.nr_segments);
        let nr_pages = self.nr_pages();
        if pages.len() < nr_pages {
            return Err(RequestError::IndirectPagesMissing {
                needed: nr_pages,
                given: pages.len(),
            });
        }
        if out.len() < n {
            return Err(RequestError::SegmentBufferTooSmall {
                needed: n,
                capacity: out.len(),
            });
        }
        let out = &mut out[..n];
        let mut copy = [0u8; PAGE_SIZE];
        for (page_index, (page, chunk)) in pages
            .iter()
            .zip(out.chunks_mut(SEGMENTS_PER_INDIRECT_PAGE))
            .enumerate()
        {
            let bytes = &mut copy[..chunk.len() * SEGMENT_SIZE];
            page.copy_descriptors(0, bytes).map_err(|source| {
                RequestError::IndirectPageUnreadable {
                    page: page_index,
                    source,
                }
            })?;
            for (k, (seg, raw)) in chunk
                .iter_mut()
                .zip(bytes.chunks_exact(SEGMENT_SIZE))
                .enumerate()
            {
                let mut d = [0u8; SEGMENT_SIZE];
                d.copy_from_slice(raw);
                let s = Segment::decode(&d);
                s.check(page_index * SEGMENTS_PER_INDIRECT_PAGE + k)?;
                *seg = s;
            }
        }
        Ok(out)
    }

    /// The checks that need every descriptor: the total range inside the disk
    /// (`xen_vbd_translate`) and alignment to the logical block size. `segments` is
    /// what [`IndirectRequest::parse_segments`] returned (re-checked here, so a
    /// slice from elsewhere cannot smuggle a bad descriptor in).
    pub fn finish(
        &self,
        segments: &[Segment],
        limits: &DeviceLimits,
    ) -> Result<Request, RequestError> {
        if segments.len() != usize::from(self.nr_segments) {
            return Err(RequestError::SegmentCountMismatch {
                expected: self.nr_segments,
                given: segments.len(),
            });
        }
        let nr_sectors = check_segments(segments)?;
        limits.check_access(self.operation, self.sector, nr_sectors)?;
        limits.check_alignment(self.sector, segments.iter().map(Segment::nr_sectors))?;
        Ok(Request {
            id: self.id,
            operation: self.operation,
            handle: self.handle,
            sector: self.sector,
            nr_sectors,
            segments: Segments::Indirect {
                count: self.nr_segments,
            },
        })
    }

    /// The response answering this request with `status`.
    pub fn response(&self, status: i16) -> Response {
        Response {
            id: self.id,
            operation: self.operation.blkif_op(),
            status,
        }
    }
}

/// Writes up to 512 descriptors into an indirect page with one copy (frontend side).
pub fn write_indirect_page(page: &SharedMemory, segments: &[Segment]) -> Result<(), OutOfBounds> {
    let mut buf = [0u8; PAGE_SIZE];
    let n = segments.len().min(SEGMENTS_PER_INDIRECT_PAGE);
    for (chunk, s) in buf.chunks_exact_mut(SEGMENT_SIZE).zip(&segments[..n]) {
        chunk.copy_from_slice(&s.encode());
    }
    page.write(0, &buf[..n * SEGMENT_SIZE])
}
