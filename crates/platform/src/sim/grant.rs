//! Grant map and grant copy for the simulated hypervisor: the per-platform limits
//! (map-tracking entries, VMAs) it enforces, and the [`GrantMapper`] of [`SimPlatform`],
//! which checks each entry the way Xen does, pins it while mapped and maps or copies the
//! guest's own pages.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use shmem::{SharedMemory, PAGE_SIZE};

use super::{vm, SimDomain, SimPlatform};
use crate::grant_table::PinKind;
use crate::{
    Access, CopyBuffer, CopyDirection, CopySegment, DomId, GrantCopyOp, GrantMapper, GrantMapping,
    GrantRef, GrantStatus, MapError, PlatformError, MAX_MAP_BATCH,
};
/// A count of something held, with a limit the simulated platform enforces.
#[derive(Debug)]
struct Limited {
    held: AtomicUsize,
    limit: AtomicUsize,
    /// Takes refused because they would have gone past `limit`.
    refusals: AtomicU64,
}

impl Default for Limited {
    fn default() -> Self {
        Self {
            held: AtomicUsize::new(0),
            limit: AtomicUsize::new(usize::MAX),
            refusals: AtomicU64::new(0),
        }
    }
}

impl Limited {
    /// Takes `n` if the total stays within the limit; counts a refusal otherwise.
    fn take(&self, n: usize) -> bool {
        let limit = self.limit.load(Ordering::Acquire);
        let mut held = self.held.load(Ordering::Acquire);
        loop {
            if held.saturating_add(n) > limit {
                self.refusals.fetch_add(1, Ordering::AcqRel);
                return false;
            }
            match self.held.compare_exchange_weak(
                held,
                held + n,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(now) => held = now,
            }
        }
    }

    fn release(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::AcqRel);
    }

    fn get(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

/// Live grant-mapping accounting shared with every mapping's release callback.
#[derive(Debug, Default)]
pub(super) struct Counters {
    mappings: AtomicUsize,
    /// Grant pages mapped: on Xen, entries of the backend domain's map-tracking table
    /// ([`SimPlatform::set_grant_page_limit`]).
    pages: Limited,
    /// VMAs the grant mappings occupy (one per `mmap`: per run of consecutive frames;
    /// [`SimPlatform::set_grant_vma_limit`]).
    vmas: Limited,
}

impl Counters {
    /// Takes what a mapping of `pages` pages in `vmas` VMAs costs before it is made:
    /// refused with the status Xen gives when the backend's map-tracking table is full
    /// (`GNTST_no_device_space`), or with ENOMEM as from `mmap` once a process holds
    /// `vm.max_map_count` VMAs.
    fn take(&self, domid: DomId, refs: &[GrantRef], vmas: usize) -> Result<(), MapError> {
        let pages = refs.len();
        if !self.pages.take(pages) {
            return Err(MapError::Grant {
                domid,
                index: 0,
                gref: refs[0],
                count: pages,
                status: GrantStatus::NO_DEVICE_SPACE,
            });
        }
        if !self.vmas.take(vmas) {
            self.pages.release(pages);
            return Err(MapError::AddressSpace {
                pages,
                source: std::io::Error::from_raw_os_error(libc::ENOMEM),
            });
        }
        Ok(())
    }

    fn release(&self, pages: usize, vmas: usize) {
        self.pages.release(pages);
        self.vmas.release(vmas);
    }
}

impl SimPlatform {
    /// A map batch's checks before any page: its size, and the domain it names (Xen's
    /// `GNTST_bad_domain` on the first entry when the domain is unknown).
    fn batch_domain(&self, domid: DomId, refs: &[GrantRef]) -> Result<Arc<SimDomain>, MapError> {
        let count = refs.len();
        if count == 0 || count > MAX_MAP_BATCH {
            return Err(MapError::BadBatchSize {
                count,
                max: MAX_MAP_BATCH,
            });
        }
        self.lookup(domid).ok_or(MapError::Grant {
            domid,
            index: 0,
            gref: refs[0],
            count,
            status: GrantStatus::BAD_DOMAIN,
        })
    }

    /// Simulates `vm.max_map_count` for the grant mappings: from now on a map that would
    /// make them occupy more than `limit` VMAs fails with ENOMEM, as `mmap` does in a
    /// process at its limit (`None`: no limit but the real one). The VMAs counted are
    /// those of grant mappings only (see [`SimPlatform::live_vmas`]); the rest of the
    /// process is what a backend's own reserve stands for.
    pub fn set_grant_vma_limit(&self, limit: Option<usize>) {
        self.inner
            .counters
            .vmas
            .limit
            .store(limit.unwrap_or(usize::MAX), Ordering::Release);
    }

    /// Simulates the size of the backend domain's map-tracking table (Xen's
    /// `gnttab_max_maptrack_frames` x 256 entries): from now on a map that would make
    /// more than `limit` grant pages mapped at once fails with `GNTST_no_device_space`, as
    /// Xen answers when the table is full (`None`: no limit).
    pub fn set_grant_page_limit(&self, limit: Option<usize>) {
        self.inner
            .counters
            .pages
            .limit
            .store(limit.unwrap_or(usize::MAX), Ordering::Release);
    }

    /// VMAs the live grant mappings occupy: one per `mmap`, so one per run of consecutive
    /// guest frames of a batch, and one per single grant.
    pub fn live_vmas(&self) -> usize {
        self.inner.counters.vmas.get()
    }

    /// Maps refused (ENOMEM) because of [`SimPlatform::set_grant_vma_limit`].
    pub fn vma_limit_refusals(&self) -> u64 {
        self.inner.counters.vmas.refusals.load(Ordering::Acquire)
    }

    /// Maps refused (`GNTST_no_device_space`) because of
    /// [`SimPlatform::set_grant_page_limit`].
    pub fn page_limit_refusals(&self) -> u64 {
        self.inner.counters.pages.refusals.load(Ordering::Acquire)
    }

    /// Maps one grant as a mapping of its own: one pin, one mmap (persistent grants and
    /// single indirect pages take this path).
    fn map_one(
        &self,
        dom: &Arc<SimDomain>,
        gref: GrantRef,
        access: Access,
    ) -> Result<GrantMapping, MapError> {
        let domid = dom.domid;
        let readonly = !access.is_writable();
        let frame = dom
            .active
            .pin(
                &dom.table,
                gref,
                self.inner.backend_domid,
                readonly,
                dom.nr_frames,
                PinKind::Map,
            )
            .map_err(|status| {
                tracing::debug!(domid, gref, %status, "grant map failed");
                MapError::Grant {
                    domid,
                    index: 0,
                    gref,
                    count: 1,
                    status,
                }
            })?;
        if let Err(e) = self.inner.counters.take(domid, &[gref], 1) {
            dom.active.unpin(&dom.table, gref, readonly);
            return Err(e);
        }
        let release = {
            let dom = dom.clone();
            let counters = self.inner.counters.clone();
            Box::new(move || {
                dom.active.unpin(&dom.table, gref, readonly);
                counters.mappings.fetch_sub(1, Ordering::AcqRel);
                counters.release(1, 1);
            })
        };
        match vm::map_frame(dom.memory.as_fd(), frame, access.is_writable(), release) {
            Ok(mem) => {
                self.inner.counters.mappings.fetch_add(1, Ordering::AcqRel);
                Ok(GrantMapping::new(mem, access, domid, 1, 1))
            }
            Err(source) => {
                // `release` was dropped unrun: undo the pin and the counts here.
                dom.active.unpin(&dom.table, gref, readonly);
                self.inner.counters.release(1, 1);
                Err(MapError::AddressSpace { pages: 1, source })
            }
        }
    }

    /// One grant copy, in Xen's order of checks: domain, entry (pin), page bounds.
    fn copy_one(&self, op: &mut GrantCopyOp<'_>) -> GrantStatus {
        let Some(dom) = self.lookup(op.domid()) else {
            return GrantStatus::BAD_DOMAIN;
        };
        let readonly = op.direction() == CopyDirection::FromGuest;
        let frame = match dom.active.pin(
            &dom.table,
            op.gref(),
            self.inner.backend_domid,
            readonly,
            dom.nr_frames,
            PinKind::Copy,
        ) {
            Ok(frame) => frame,
            Err(status) => return status,
        };
        let status = if op.fits_page() {
            let pos = frame as usize * PAGE_SIZE + usize::from(op.offset());
            match copy_bytes(&dom.memory_map, pos, op) {
                Ok(()) => GrantStatus::OKAY,
                Err(e) => {
                    tracing::error!(domid = dom.domid, gref = op.gref(), error = %e, "grant copy out of bounds");
                    GrantStatus::GENERAL_ERROR
                }
            }
        } else {
            GrantStatus::BAD_COPY_ARG
        };
        dom.active.unpin(&dom.table, op.gref(), readonly);
        status
    }

    /// One segment of [`GrantMapper::copy_segments`], checked like [`Self::copy_one`].
    fn copy_segment(
        &self,
        dom: &SimDomain,
        buffer: &mut CopyBuffer<'_>,
        seg: &CopySegment,
    ) -> GrantStatus {
        let readonly = seg.direction == CopyDirection::FromGuest;
        let frame = match dom.active.pin(
            &dom.table,
            seg.gref,
            self.inner.backend_domid,
            readonly,
            dom.nr_frames,
            PinKind::Copy,
        ) {
            Ok(frame) => frame,
            Err(status) => return status,
        };
        let len = usize::from(seg.len);
        let status = if !seg.fits_page() || !buffer.contains(seg.local, len) {
            GrantStatus::BAD_COPY_ARG
        } else {
            let pos = frame as usize * PAGE_SIZE + usize::from(seg.offset);
            let guest = &dom.memory_map;
            let done = match (seg.direction, buffer) {
                (CopyDirection::FromGuest, CopyBuffer::Shared(m)) => {
                    guest.copy_to(pos, m, seg.local, len)
                }
                (CopyDirection::ToGuest, CopyBuffer::Shared(m)) => {
                    m.copy_to(seg.local, guest, pos, len)
                }
                (CopyDirection::FromGuest, CopyBuffer::Private(b)) => {
                    guest.read(pos, &mut b[seg.local..seg.local + len])
                }
                (CopyDirection::ToGuest, CopyBuffer::Private(b)) => {
                    guest.write(pos, &b[seg.local..seg.local + len])
                }
            };
            match done {
                Ok(()) => GrantStatus::OKAY,
                Err(e) => {
                    tracing::error!(domid = dom.domid, gref = seg.gref, error = %e, "grant copy out of bounds");
                    GrantStatus::GENERAL_ERROR
                }
            }
        };
        dom.active.unpin(&dom.table, seg.gref, readonly);
        status
    }
}

/// Moves the bytes of one checked copy op through the backend's mapping of guest memory.
fn copy_bytes(
    memory: &SharedMemory,
    pos: usize,
    op: &mut GrantCopyOp<'_>,
) -> Result<(), shmem::OutOfBounds> {
    use crate::mapping::Local;
    let len = op.len();
    let direction = op.direction();
    match &mut op.local {
        Local::Dst(dst) => memory.read(pos, dst),
        Local::Src(src) => memory.write(pos, src),
        Local::Shared { mem, offset } => match direction {
            CopyDirection::FromGuest => memory.copy_to(pos, mem, *offset, len),
            CopyDirection::ToGuest => mem.copy_to(*offset, memory, pos, len),
        },
    }
}

impl GrantMapper for SimPlatform {
    fn map(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        access: Access,
    ) -> Result<GrantMapping, MapError> {
        let count = refs.len();
        let dom = self.batch_domain(domid, refs)?;
        if count == 1 {
            return self.map_one(&dom, refs[0], access);
        }
        let readonly = !access.is_writable();
        let mut frames = Vec::with_capacity(count);
        for (index, &gref) in refs.iter().enumerate() {
            match dom.active.pin(
                &dom.table,
                gref,
                self.inner.backend_domid,
                readonly,
                dom.nr_frames,
                PinKind::Map,
            ) {
                Ok(frame) => frames.push(frame),
                Err(status) => {
                    for &g in &refs[..index] {
                        dom.active.unpin(&dom.table, g, readonly);
                    }
                    tracing::debug!(domid, index, gref, %status, "grant map failed");
                    return Err(MapError::Grant {
                        domid,
                        index,
                        gref,
                        count,
                        status,
                    });
                }
            }
        }
        // The frames were read once, by the pins: what the mapping costs is known before
        // any mmap, and cannot change under us.
        let vmas = vm::runs(&frames);
        let unpin_all = || {
            for &g in refs {
                dom.active.unpin(&dom.table, g, readonly);
            }
        };
        if let Err(e) = self.inner.counters.take(domid, refs, vmas) {
            unpin_all();
            return Err(e);
        }
        let release = {
            let dom = dom.clone();
            let refs = refs.to_vec();
            let counters = self.inner.counters.clone();
            Box::new(move || {
                for &g in &refs {
                    dom.active.unpin(&dom.table, g, readonly);
                }
                counters.mappings.fetch_sub(1, Ordering::AcqRel);
                counters.release(refs.len(), vmas);
            })
        };
        match vm::map_frames(dom.memory.as_fd(), &frames, access.is_writable(), release) {
            Ok(mem) => {
                self.inner.counters.mappings.fetch_add(1, Ordering::AcqRel);
                Ok(GrantMapping::new(mem, access, domid, count, vmas))
            }
            Err(source) => {
                // `release` was dropped unrun: undo the pins and the counts here.
                unpin_all();
                self.inner.counters.release(count, vmas);
                Err(MapError::AddressSpace {
                    pages: count,
                    source,
                })
            }
        }
    }

    fn copy(&self, ops: &mut [GrantCopyOp<'_>]) -> Result<(), PlatformError> {
        for op in ops.iter_mut() {
            let status = self.copy_one(op);
            op.set_status(status);
        }
        Ok(())
    }

    fn copy_segments(
        &self,
        mut buffer: CopyBuffer<'_>,
        segs: &mut [CopySegment],
    ) -> Result<(), PlatformError> {
        // One registry lookup per run of segments of the same domain (a request's
        // segments all name the frontend's domain).
        let mut dom: Option<Arc<SimDomain>> = None;
        for seg in segs.iter_mut() {
            if dom.as_ref().is_none_or(|d| d.domid != seg.domid) {
                dom = self.lookup(seg.domid);
            }
            seg.status = match &dom {
                Some(d) => self.copy_segment(d, &mut buffer, seg),
                None => GrantStatus::BAD_DOMAIN,
            };
        }
        Ok(())
    }

    fn map_each(
        &self,
        domid: DomId,
        refs: &[GrantRef],
        access: Access,
    ) -> Result<Vec<GrantMapping>, MapError> {
        let count = refs.len();
        // One registry lookup for the batch, then one mmap per page: each page is a
        // mapping of its own, which the persistent-grant purge unmaps on its own.
        let dom = self.batch_domain(domid, refs)?;
        let mut out = Vec::with_capacity(count);
        for (index, &gref) in refs.iter().enumerate() {
            match self.map_one(&dom, gref, access) {
                Ok(m) => out.push(m),
                Err(e) => {
                    // Dropping `out` unmaps what was mapped: all or nothing.
                    return Err(e.rebase(index, count));
                }
            }
        }
        Ok(out)
    }

    fn live_mappings(&self) -> usize {
        self.inner.counters.mappings.load(Ordering::Acquire)
    }

    fn mapped_pages(&self) -> usize {
        self.inner.counters.pages.get()
    }
}
