//! Indirect descriptors: reading an indirect request's descriptor pages once, into the
//! slot's private segment list, and where each page is read from.
//!
//! With persistent grants (map and map-or-copy modes) the descriptor pages go through the
//! persistent-grant cache as blkback's `xen_blkbk_parse_indirect` does: Linux blkfront
//! takes its indirect pages from the same pool of persistently granted pages as its data
//! pages, so in steady state they are all cached and an indirect request maps nothing. A
//! page's lease is held only while its descriptors are copied out (once, into private
//! memory, before any check), so a data segment of the same request naming the same grant
//! finds it free and uses the same mapping. Pages the cache does not hold and cannot take
//! are read as without persistent grants: mapped read-only for the request in map mode,
//! grant-copied into private pages otherwise. Nothing read here outlives the parse.

use std::time::Instant;

use blkif::abi::{BLKIF_RSP_ERROR, PAGE_SIZE};
use blkif::{DescriptorPage, DeviceLimits, IndirectRequest, Request, Segment};
use platform::{Access, CopyBuffer, CopyDirection, CopySegment, GrantMapping, OutOfBounds};

use super::acquire::{check_copied, NotMapped, PageSource};
use super::pages::HeldMapping;
use crate::persistent_grants::{Lease, PersistentGrantCache};
use crate::vbd::ResolvedGrantMode;

/// Most indirect descriptor pages of one request.
const MAX_INDIRECT_PAGES: usize = blkif::abi::BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST;

/// A page of a grant mapping, read as indirect descriptors.
#[derive(Debug, Clone, Copy)]
struct MappedPage<'a> {
    mapping: &'a GrantMapping,
    page: usize,
}

impl DescriptorPage for MappedPage<'_> {
    fn copy_descriptors(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        if offset + dst.len() > PAGE_SIZE {
            return Err(OutOfBounds {
                offset,
                len: dst.len(),
                region_len: PAGE_SIZE,
            });
        }
        self.mapping.read(self.page * PAGE_SIZE + offset, dst)
    }
}

/// An indirect descriptor page as the parser reads it (once, into a private copy).
#[derive(Debug, Clone, Copy)]
enum IndirectPage<'a> {
    Mapped(MappedPage<'a>),
    /// Grant-copied into the ring's private pages.
    Copied(&'a [u8; PAGE_SIZE]),
}

impl DescriptorPage for IndirectPage<'_> {
    fn copy_descriptors(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        match self {
            IndirectPage::Mapped(m) => m.copy_descriptors(offset, dst),
            IndirectPage::Copied(page) => page.copy_descriptors(offset, dst),
        }
    }
}

/// Fills the unused tail of a request's page array; never read (the parser reads as many
/// pages as the request names).
static NO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Where an indirect descriptor page of a request is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IndirectSource {
    /// Not in the persistent-grant cache (or no cache): mapped or copied below.
    Miss,
    /// The gref of earlier page `j` of the request: read through that page's source, so
    /// a gref repeated by the frontend costs one mapping and one cache entry.
    SameAs(usize),
    /// Leased from the persistent-grant cache until the descriptors are copied out.
    Taken,
    /// In the cache but leased by another request in flight (as its data page): read
    /// through the cached mapping without taking it. Its entry cannot go meanwhile (the
    /// purge keeps leased entries, and only this thread touches the cache).
    InUse,
    /// Mapped by this request and kept: leased until parsed, like `Taken`.
    Added,
    /// Mapped writable for the cache, which then refused it: mapping `k` of the
    /// request's own.
    Single(usize),
    /// Page `k` of what this request mapped read-only (map mode) or copied (map-or-copy
    /// and copy modes) for itself only.
    Local(usize),
}

/// The leases an indirect request holds while its descriptors are read.
pub(super) type IndirectLeases = Vec<Lease<GrantMapping>>;

/// blkback's lookup in `xen_blkbk_map` for indirect pages: leases each page's grant from
/// `cache` when it is there (`None`: persistent grants are off) and says how every page is
/// read. Returns (cache hits, misses); the misses are left [`IndirectSource::Miss`].
fn plan_indirect<M>(
    grefs: &[u32],
    mut cache: Option<&mut PersistentGrantCache<M>>,
    sources: &mut [IndirectSource],
    leases: &mut Vec<Lease<M>>,
) -> (usize, usize) {
    let (mut hits, mut misses) = (0, 0);
    for (i, &gref) in grefs.iter().enumerate() {
        sources[i] = if let Some(j) = grefs[..i].iter().position(|&g| g == gref) {
            IndirectSource::SameAs(j)
        } else {
            match cache.as_deref_mut() {
                Some(c) => {
                    if let Some(lease) = c.get(gref) {
                        leases.push(lease);
                        IndirectSource::Taken
                    } else if c.is_active(gref) {
                        IndirectSource::InUse
                    } else {
                        IndirectSource::Miss
                    }
                }
                None => IndirectSource::Miss,
            }
        };
        match sources[i] {
            IndirectSource::Taken | IndirectSource::InUse => hits += 1,
            IndirectSource::Miss => misses += 1,
            _ => {}
        }
    }
    (hits, misses)
}

impl PageSource {
    /// Reads an indirect request's descriptors into `segs`, then runs the checks that
    /// need them.
    pub(super) fn read_indirect(
        &mut self,
        ind: &IndirectRequest,
        segs: &mut Vec<Segment>,
        limits: &DeviceLimits,
        now: Instant,
    ) -> Result<Request, i16> {
        let grefs = ind.indirect_grefs();
        let n = grefs.len();
        // Room for every descriptor the pages can hold (bounded by the advertised
        // maximum); parsing fills the request's `nr_segments` of them.
        let room =
            (n * blkif::abi::SEGMENTS_PER_INDIRECT_PAGE).min(limits.max_indirect_segments as usize);
        segs.clear();
        segs.resize(room, Segment::default());

        let cached = self.persistent && self.mode != ResolvedGrantMode::Copy;
        let mut sources = [IndirectSource::Miss; MAX_INDIRECT_PAGES];
        let sources = &mut sources[..n];
        // Reused from one request to the next (at most MAX_INDIRECT_PAGES leases).
        let mut leases = std::mem::take(&mut self.indirect_leases);
        let (hits, misses) = plan_indirect(
            grefs,
            cached.then_some(&mut self.cache),
            sources,
            &mut leases,
        );
        if cached {
            self.stats.persistent_hits.add(hits as u64);
            self.stats.persistent_misses.add(misses as u64);
            self.stats.indirect_hits.add(hits as u64);
            self.stats.indirect_misses.add(misses as u64);
        }
        let parsed = self.parse_indirect(ind, sources, &mut leases, segs, now);
        // Whatever happened, the grants this request leased are free again: the
        // descriptors were copied out, nothing reads the pages any more.
        for lease in leases.drain(..) {
            self.cache.put(lease, now);
        }
        self.indirect_leases = leases;
        segs.truncate(parsed?);
        ind.finish(segs, limits).map_err(|e| e.status())
    }

    /// Makes the pages [`plan_indirect`] left as misses readable (kept in the cache when
    /// it takes them, else for this request only) and parses the descriptors. Returns how
    /// many were read.
    fn parse_indirect(
        &mut self,
        ind: &IndirectRequest,
        sources: &mut [IndirectSource],
        leases: &mut IndirectLeases,
        segs: &mut [Segment],
        now: Instant,
    ) -> Result<usize, i16> {
        let grefs = ind.indirect_grefs();
        let mut singles: Vec<HeldMapping> = Vec::new();
        let writable_refused = self.keep_indirect_misses(grefs, sources, leases, &mut singles, now);
        let batch = self.read_local(grefs, sources, writable_refused)?;

        let mut pages = [IndirectPage::Copied(&NO_PAGE); MAX_INDIRECT_PAGES];
        for (i, source) in sources.iter().enumerate() {
            pages[i] = match *source {
                IndirectSource::SameAs(j) => pages[j],
                IndirectSource::Taken | IndirectSource::InUse | IndirectSource::Added => {
                    let Some(mapping) = self.cache.peek(grefs[i]) else {
                        tracing::error!(gref = grefs[i], "indirect page left the cache");
                        return Err(BLKIF_RSP_ERROR);
                    };
                    IndirectPage::Mapped(MappedPage { mapping, page: 0 })
                }
                IndirectSource::Single(k) => IndirectPage::Mapped(MappedPage {
                    mapping: &singles[k].mapping,
                    page: 0,
                }),
                IndirectSource::Local(k) => match &batch {
                    Some(held) => IndirectPage::Mapped(MappedPage {
                        mapping: &held.mapping,
                        page: k,
                    }),
                    None => IndirectPage::Copied(&self.indirect_pages[k]),
                },
                IndirectSource::Miss => {
                    tracing::error!(gref = grefs[i], "indirect page without a source");
                    return Err(BLKIF_RSP_ERROR);
                }
            };
        }
        ind.parse_segments(&pages[..grefs.len()], segs)
            .map(<[Segment]>::len)
            .map_err(|e| e.status())
    }

    /// Misses the cache takes: mapped writable, one mapping each, as blkback maps them
    /// (no GNTMAP_readonly with persistent grants) and as every kept grant is, so the
    /// entry can serve a data page of a READ later. Their shares of the guest's budget are
    /// taken first. Returns whether the writable map was refused for the grants' sake
    /// (granted read-only, or not at all).
    fn keep_indirect_misses(
        &mut self,
        grefs: &[u32],
        sources: &mut [IndirectSource],
        leases: &mut IndirectLeases,
        singles: &mut Vec<HeldMapping>,
        now: Instant,
    ) -> bool {
        let mut misses = [0usize; MAX_INDIRECT_PAGES];
        let mut nr_misses = 0;
        for (i, source) in sources.iter().enumerate() {
            if *source == IndirectSource::Miss {
                misses[nr_misses] = i;
                nr_misses += 1;
            }
        }
        let misses = &misses[..nr_misses];
        if !self.persistent
            || self.mode == ResolvedGrantMode::Copy
            || self.indirect_read_only
            || misses.is_empty()
        {
            return false;
        }
        let shares = self.cache.reserve(misses.len());
        if shares.as_ref().map_or(0, |s| s.cost().vmas) < misses.len() {
            // As blkback when a grant does not fit: the next purge makes room.
            self.cache.note_overflow();
        }
        let Some(mut shares) = shares else {
            return false;
        };
        let keep = shares.cost().vmas;
        self.grefs.clear();
        self.grefs.extend(misses[..keep].iter().map(|&i| grefs[i]));
        let maps = match self
            .platform
            .map_each(self.domid, &self.grefs, Access::ReadWrite)
        {
            Ok(maps) => maps,
            Err(e) => {
                // Granted read-only, or not at all: found out by the caller. A map known
                // to have failed for want of resources says nothing about the grants.
                tracing::debug!(error = %e, "indirect pages do not map writable");
                return !e.lacks_resources();
            }
        };
        for (&i, m) in misses[..keep].iter().zip(maps) {
            let Some(one) = shares.split_grant() else {
                // `reserve` took one share per grant: not reached. The page is read
                // for this request only.
                tracing::error!(gref = grefs[i], "indirect page mapped without its share");
                break;
            };
            sources[i] = match self.cache.add(grefs[i], m, one, now) {
                Ok(lease) => {
                    leases.push(lease);
                    IndirectSource::Added
                }
                Err(rejected) => {
                    singles.push(HeldMapping {
                        mapping: rejected.mapping,
                        _share: rejected.share,
                    });
                    IndirectSource::Single(singles.len() - 1)
                }
            };
        }
        false
    }

    /// Reads the pages still missing for this request only: mapped read-only in map mode
    /// (the mapping is returned), else, or when that mapping cannot be had, grant-copied
    /// into the ring's private pages.
    fn read_local(
        &mut self,
        grefs: &[u32],
        sources: &mut [IndirectSource],
        writable_refused: bool,
    ) -> Result<Option<HeldMapping>, i16> {
        self.grefs.clear();
        for (i, source) in sources.iter_mut().enumerate() {
            if *source == IndirectSource::Miss {
                *source = IndirectSource::Local(self.grefs.len());
                self.grefs.push(grefs[i]);
            }
        }
        if self.grefs.is_empty() {
            return Ok(None);
        }
        let mut batch = None;
        if self.mode == ResolvedGrantMode::Map {
            // Only read: mapped read-only, unmapped right after parsing; copied like
            // in the other modes when the guest's budget has no room for the mapping
            // or it fails for want of resources.
            match self.map_budgeted(&self.grefs, Access::ReadOnly) {
                Ok(held) => batch = Some(held),
                Err(NotMapped::Map(e)) if e.grant_refused() => {
                    tracing::debug!(error = %e, "indirect pages do not map");
                    return Err(BLKIF_RSP_ERROR);
                }
                Err(_) => {}
            }
        }
        if batch.is_none() {
            // Copy and map-or-copy modes copy them into private memory (one small copy
            // instead of a read-only map and unmap), and so does map mode when it could
            // not map them.
            self.copy_indirect()?;
        }
        if writable_refused {
            tracing::debug!(
                vbd = self.who.vbd,
                ring = self.who.ring,
                "indirect pages granted read-only: not kept persistently on this ring"
            );
            self.indirect_read_only = true;
        }
        Ok(batch)
    }

    /// Grant-copies the pages of `self.grefs` into `self.indirect_pages`.
    fn copy_indirect(&mut self) -> Result<(), i16> {
        let local = self.grefs.len();
        if self.indirect_pages.len() < local {
            self.indirect_pages.resize(local, [0; PAGE_SIZE]);
        }
        self.copy_segs.clear();
        // PAGE_SIZE (4096) fits a u16.
        #[allow(clippy::cast_possible_truncation)]
        const PAGE_LEN: u16 = PAGE_SIZE as u16;
        self.copy_segs
            .extend(self.grefs.iter().enumerate().map(|(k, &gref)| {
                CopySegment::new(
                    CopyDirection::FromGuest,
                    self.domid,
                    gref,
                    0,
                    PAGE_LEN,
                    k * PAGE_SIZE,
                )
            }));
        let copied = self.platform.copy_segments(
            CopyBuffer::Private(self.indirect_pages.as_flattened_mut()),
            &mut self.copy_segs,
        );
        check_copied(copied, &self.copy_segs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persistent_grants::PersistentGrantLimits;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::Duration;

    fn cache(max: usize) -> PersistentGrantCache<u32> {
        PersistentGrantCache::new(
            PersistentGrantLimits {
                max_grants: max,
                unused_timeout: Duration::from_secs(60),
            },
            Arc::new(AtomicBool::new(false)),
            crate::grant_budget::MapBudget::unlimited().guest(1),
        )
    }

    #[test]
    fn indirect_pages_are_taken_from_the_cache_once_per_gref() {
        use IndirectSource::*;
        let t = Instant::now();
        let mut c = cache(16);
        for gref in [10, 11, 12] {
            let share = c.reserve(1).unwrap();
            let lease = c.add(gref, gref * 100, share, t).unwrap();
            c.put(lease, t);
        }
        // 12 is another in-flight request's data page.
        let other = c.get(12).unwrap();
        let mut sources = [Miss; MAX_INDIRECT_PAGES];
        let grefs = [10, 20, 10, 12, 20, 11];
        let mut leases = Vec::new();
        let (hits, misses) = plan_indirect(
            &grefs,
            Some(&mut c),
            &mut sources[..grefs.len()],
            &mut leases,
        );
        assert_eq!(
            sources[..grefs.len()],
            [Taken, Miss, SameAs(0), InUse, SameAs(1), Taken]
        );
        // Repeats are neither: one lookup per distinct gref.
        assert_eq!((hits, misses), (3, 1));
        // Taken ones are leased until returned; the one in use elsewhere was not taken
        // a second time.
        assert_eq!(leases.len(), 2);
        assert_eq!(c.in_use(), 3);
        assert!(c.is_active(10) && c.is_active(11) && c.is_active(12));
        assert_eq!(c.peek(12), Some(&1200));
        drop(leases);
        drop(other);
        assert_eq!(c.in_use(), 0);

        // Without persistent grants: every distinct gref is a miss, repeats still shared.
        let mut sources = [Miss; MAX_INDIRECT_PAGES];
        let (hits, misses) =
            plan_indirect::<u32>(&[7, 7, 8], None, &mut sources[..3], &mut Vec::new());
        assert_eq!(sources[..3], [Miss, SameAs(0), Miss]);
        assert_eq!((hits, misses), (0, 2));
    }
}
