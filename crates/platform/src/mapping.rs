//! Platform-neutral values handed to the engine: a mapped grant batch and a grant-copy op.
//!
//! [`GrantMapping`] wraps the [`SharedMemory`] a platform built for the batch; the
//! platform's release callback (munmap + gntdev unmap, or munmap + unpin in the simulator)
//! runs when the mapping — or the `SharedMemory` taken out of it — is dropped, so live
//! mapping counts stay exact whichever way the engine holds it.

use shmem::{OutOfBounds, SharedMemory, PAGE_SIZE};

use crate::{Access, DomId, GrantRef, GrantStatus};

/// A write was attempted through a read-only grant mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReadOnlyMapping {
    #[error("grant mapping is read-only")]
    ReadOnly,
    #[error(transparent)]
    OutOfBounds(#[from] OutOfBounds),
}

/// A batch of grants mapped as one virtually contiguous region; unmapped on drop.
///
/// Read-only mappings are mapped without write permission (gntdev refuses `PROT_WRITE`
/// on a read-only grant), so the underlying [`SharedMemory`] is exposed only for
/// read-write mappings ([`GrantMapping::shared`]); every mapping offers bounds-checked
/// [`read`](GrantMapping::read) and raw addresses for the kernel
/// ([`ptr_at`](GrantMapping::ptr_at), [`page_ptr`](GrantMapping::page_ptr)).
#[derive(Debug)]
pub struct GrantMapping {
    mem: SharedMemory,
    access: Access,
    domid: DomId,
    pages: usize,
    vmas: usize,
}

impl GrantMapping {
    /// `mem` must cover exactly `pages` pages and release the mapping on drop; for
    /// [`Access::ReadOnly`] it may be mapped without write permission, which is why only
    /// read paths of it are ever used then. `vmas`: how many VMAs the mapping occupies in
    /// this process (see [`GrantMapping::vmas`]).
    pub(crate) fn new(
        mem: SharedMemory,
        access: Access,
        domid: DomId,
        pages: usize,
        vmas: usize,
    ) -> Self {
        debug_assert_eq!(mem.len(), pages * PAGE_SIZE);
        debug_assert!((1..=pages).contains(&vmas));
        Self {
            mem,
            access,
            domid,
            pages,
            vmas,
        }
    }

    pub fn access(&self) -> Access {
        self.access
    }

    /// The granting domain.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// Number of pages (= grant refs of the batch).
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// VMAs the mapping occupies in this process, each counted against
    /// `vm.max_map_count` until the mapping is dropped: 1 on gntdev (one `mmap` of the
    /// whole batch), one per run of consecutive guest frames in the simulator (each run
    /// is an `mmap` of its own). At most [`GrantMapper::max_vmas`] of its page count.
    ///
    /// [`GrantMapper::max_vmas`]: crate::GrantMapper::max_vmas
    pub fn vmas(&self) -> usize {
        self.vmas
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.mem.len()
    }

    pub fn is_empty(&self) -> bool {
        self.mem.is_empty()
    }

    /// Base address, for iovecs and ioctls. Never dereference it in Rust.
    pub fn as_ptr(&self) -> *mut u8 {
        self.mem.as_ptr()
    }

    /// Address of page `i` (the page of `refs[i]`), `None` past the end.
    pub fn page_ptr(&self, i: usize) -> Option<*mut u8> {
        self.mem.ptr_at(i.checked_mul(PAGE_SIZE)?, PAGE_SIZE).ok()
    }

    /// Address of `len` bytes at `offset`, bounds-checked, for the kernel.
    pub fn ptr_at(&self, offset: usize, len: usize) -> Result<*mut u8, OutOfBounds> {
        self.mem.ptr_at(offset, len)
    }

    /// Copies out of the mapping (one read of each byte; the guest may change it at any
    /// time, so callers validate the private copy).
    pub fn read(&self, offset: usize, dst: &mut [u8]) -> Result<(), OutOfBounds> {
        self.mem.read(offset, dst)
    }

    /// Copies into the mapping; refused for read-only mappings.
    pub fn write(&self, offset: usize, src: &[u8]) -> Result<(), ReadOnlyMapping> {
        match self.shared() {
            Some(mem) => Ok(mem.write(offset, src)?),
            None => Err(ReadOnlyMapping::ReadOnly),
        }
    }

    /// The shared memory of a read-write mapping (rings, READ data pages), with index
    /// loads/stores and atomics; `None` for a read-only one.
    pub fn shared(&self) -> Option<&SharedMemory> {
        self.access.is_writable().then_some(&self.mem)
    }

    /// Takes the shared memory out of a read-write mapping (a ring keeps it for its
    /// lifetime); dropping it unmaps. A read-only mapping is handed back unchanged.
    pub fn into_shared(self) -> Result<SharedMemory, GrantMapping> {
        if self.access.is_writable() {
            Ok(self.mem)
        } else {
            Err(self)
        }
    }
}

/// Which way a grant copy moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyDirection {
    /// Guest page → local buffer (serving a WRITE request).
    FromGuest,
    /// Local buffer → guest page (completing a READ request).
    ToGuest,
}

/// The local side of a batch of [`CopySegment`]s: one buffer the segments address by
/// offset.
#[derive(Debug)]
pub enum CopyBuffer<'a> {
    /// Shared memory the storage does I/O on (bounce buffers).
    Shared(&'a SharedMemory),
    /// Private memory (the copy of an indirect descriptor page).
    Private(&'a mut [u8]),
}

impl CopyBuffer<'_> {
    pub fn len(&self) -> usize {
        match self {
            CopyBuffer::Shared(m) => m.len(),
            CopyBuffer::Private(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `local..local + len` lies inside the buffer.
    pub(crate) fn contains(&self, local: usize, len: usize) -> bool {
        local.checked_add(len).is_some_and(|end| end <= self.len())
    }

    /// Address of `local` for the kernel; `None` out of bounds.
    pub(crate) fn ptr_at(&mut self, local: usize, len: usize) -> Option<*mut u8> {
        if !self.contains(local, len) {
            return None;
        }
        match self {
            CopyBuffer::Shared(m) => m.ptr_at(local, len).ok(),
            // In bounds (checked): the add stays inside the slice.
            CopyBuffer::Private(b) => Some(b[local..].as_mut_ptr()),
        }
    }
}

/// One segment of a batched grant copy ([`GrantMapper::copy_segments`]): `len` bytes
/// between `offset` of the page granted by `gref` of `domid` and `local..local + len` of
/// the batch's [`CopyBuffer`].
///
/// Plain data that borrows nothing, so a ring keeps one vector of them and refills it for
/// every request: no allocation per copy.
///
/// [`GrantMapper::copy_segments`]: crate::GrantMapper::copy_segments
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopySegment {
    pub direction: CopyDirection,
    pub domid: DomId,
    pub gref: GrantRef,
    /// Offset inside the guest page.
    pub offset: u16,
    /// Bytes; `offset + len` must stay within the guest page.
    pub len: u16,
    /// Offset in the local buffer.
    pub local: usize,
    /// Outcome, written back by the copy (`GNTST_general_error` until it ran).
    pub status: GrantStatus,
}

impl CopySegment {
    pub fn new(
        direction: CopyDirection,
        domid: DomId,
        gref: GrantRef,
        offset: u16,
        len: u16,
        local: usize,
    ) -> Self {
        Self {
            direction,
            domid,
            gref,
            offset,
            len,
            local,
            status: GrantStatus::GENERAL_ERROR,
        }
    }

    /// Whether the segment stays inside one guest page (Xen's `GNTST_bad_copy_arg`
    /// check).
    pub fn fits_page(&self) -> bool {
        usize::from(self.offset) + usize::from(self.len) <= PAGE_SIZE
    }
}

#[derive(Debug)]
pub(crate) enum Local<'a> {
    Dst(&'a mut [u8]),
    Src(&'a [u8]),
    Shared {
        mem: &'a SharedMemory,
        offset: usize,
    },
}

/// One grant copy (`GNTTABOP_copy` / `IOCTL_GNTDEV_GRANT_COPY` segment): `len` bytes
/// between `offset` of the page granted by `gref` of `domid` and a local buffer.
///
/// The local side is borrowed for the op's lifetime, so the copy needs no `unsafe` at
/// the call site. `offset + len` must stay within the 4 KiB guest page; an op breaking
/// that gets `GNTST_bad_copy_arg`, as Xen answers.
#[derive(Debug)]
pub struct GrantCopyOp<'a> {
    domid: DomId,
    gref: GrantRef,
    offset: u16,
    len: usize,
    direction: CopyDirection,
    pub(crate) local: Local<'a>,
    status: GrantStatus,
}

impl<'a> GrantCopyOp<'a> {
    fn new(
        domid: DomId,
        gref: GrantRef,
        offset: u16,
        len: usize,
        direction: CopyDirection,
        local: Local<'a>,
    ) -> Self {
        Self {
            domid,
            gref,
            offset,
            len,
            direction,
            local,
            // Not yet performed: a copy that never ran must not read as success.
            status: GrantStatus::GENERAL_ERROR,
        }
    }

    /// Copies `dst.len()` bytes from the guest page into `dst`.
    pub fn from_guest(domid: DomId, gref: GrantRef, offset: u16, dst: &'a mut [u8]) -> Self {
        let len = dst.len();
        Self::new(
            domid,
            gref,
            offset,
            len,
            CopyDirection::FromGuest,
            Local::Dst(dst),
        )
    }

    /// Copies `src` into the guest page.
    pub fn to_guest(domid: DomId, gref: GrantRef, offset: u16, src: &'a [u8]) -> Self {
        let len = src.len();
        Self::new(
            domid,
            gref,
            offset,
            len,
            CopyDirection::ToGuest,
            Local::Src(src),
        )
    }

    /// Copies between the guest page and `mem[mem_offset..mem_offset + len]` (a bounce
    /// buffer the storage does I/O on), in `direction`.
    pub fn with_shared(
        direction: CopyDirection,
        domid: DomId,
        gref: GrantRef,
        offset: u16,
        mem: &'a SharedMemory,
        mem_offset: usize,
        len: usize,
    ) -> Result<Self, OutOfBounds> {
        mem.ptr_at(mem_offset, len)?;
        Ok(Self::new(
            domid,
            gref,
            offset,
            len,
            direction,
            Local::Shared {
                mem,
                offset: mem_offset,
            },
        ))
    }

    pub fn domid(&self) -> DomId {
        self.domid
    }

    pub fn gref(&self) -> GrantRef {
        self.gref
    }

    /// Offset inside the guest page.
    pub fn offset(&self) -> u16 {
        self.offset
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn direction(&self) -> CopyDirection {
        self.direction
    }

    /// Outcome, valid after [`GrantMapper::copy`](crate::GrantMapper::copy) returned.
    pub fn status(&self) -> GrantStatus {
        self.status
    }

    pub(crate) fn set_status(&mut self, status: GrantStatus) {
        self.status = status;
    }

    /// Whether the op stays inside one guest page (Xen's `GNTST_bad_copy_arg` check).
    pub(crate) fn fits_page(&self) -> bool {
        usize::from(self.offset) + self.len <= PAGE_SIZE
    }

    /// Local address for the kernel. For [`Local::Src`] the kernel only reads through it.
    pub(crate) fn local_ptr(&mut self) -> *mut u8 {
        match &mut self.local {
            Local::Dst(d) => d.as_mut_ptr(),
            Local::Src(s) => s.as_ptr().cast_mut(),
            // Checked at construction; a zero-length op maps to the region base.
            Local::Shared { mem, offset } => mem
                .ptr_at(*offset, self.len)
                .unwrap_or_else(|_| mem.as_ptr()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_mapping_refuses_writes_and_hides_shared() {
        let mem = SharedMemory::anonymous(PAGE_SIZE).unwrap();
        let m = GrantMapping::new(mem, Access::ReadOnly, 3, 1, 1);
        assert_eq!(m.write(0, b"x"), Err(ReadOnlyMapping::ReadOnly));
        assert!(m.shared().is_none());
        let m = m.into_shared().unwrap_err();
        let mut b = [1u8; 4];
        m.read(0, &mut b).unwrap();
        assert_eq!(b, [0; 4]);
        assert!(m.page_ptr(0).is_some());
        assert!(m.page_ptr(1).is_none());
        assert!(m.page_ptr(usize::MAX).is_none());
    }

    #[test]
    fn read_write_mapping_round_trips() {
        let mem = SharedMemory::anonymous(2 * PAGE_SIZE).unwrap();
        let m = GrantMapping::new(mem, Access::ReadWrite, 3, 2, 2);
        m.write(PAGE_SIZE + 10, b"abc").unwrap();
        let mut b = [0u8; 3];
        m.read(PAGE_SIZE + 10, &mut b).unwrap();
        assert_eq!(&b, b"abc");
        assert_eq!(
            m.page_ptr(1).unwrap() as usize - m.as_ptr() as usize,
            PAGE_SIZE
        );
        assert!(matches!(
            m.write(2 * PAGE_SIZE - 1, b"ab"),
            Err(ReadOnlyMapping::OutOfBounds(_))
        ));
        assert_eq!(m.into_shared().unwrap().len(), 2 * PAGE_SIZE);
    }

    #[test]
    fn copy_op_page_fit() {
        let mut buf = [0u8; 100];
        let op = GrantCopyOp::from_guest(1, 8, 4000, &mut buf);
        assert!(!op.fits_page());
        assert_eq!(op.status(), GrantStatus::GENERAL_ERROR);
        let op = GrantCopyOp::to_guest(1, 8, 3996, &[0u8; 100]);
        assert!(op.fits_page());
        let mem = SharedMemory::anonymous(64).unwrap();
        assert!(GrantCopyOp::with_shared(CopyDirection::ToGuest, 1, 8, 0, &mem, 60, 8).is_err());
    }
}
