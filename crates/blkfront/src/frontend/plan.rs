//! Block-layer checks and planning: choosing a queue, refusing writes to a read-only
//! disk, checking an I/O's offset and length against the logical block size and the disk
//! size, and splitting it into ring-request chunks ([`crate::layout::split`]).

use std::sync::atomic::Ordering;

use crate::config::{BufferPlacement, QueuePolicy};
use crate::error::Error;
use crate::features::DiscardParams;
use crate::layout::{self, PAGE_SIZE, SECTOR_SIZE};

use super::{Frontend, NEXT_THREAD_SLOT, THREAD_SLOT};

impl Frontend {
    pub(super) fn pick_queue(&self) -> usize {
        let n = self.queues.len().max(1);
        match self.config.queue_policy {
            QueuePolicy::RoundRobin => self.round_robin.fetch_add(1, Ordering::Relaxed) % n,
            QueuePolicy::PerThread => THREAD_SLOT.with(|slot| {
                let s = slot.get().unwrap_or_else(|| {
                    let s = NEXT_THREAD_SLOT.fetch_add(1, Ordering::Relaxed);
                    slot.set(Some(s));
                    s
                });
                s % n
            }),
        }
    }

    pub(super) fn check_writable(&self) -> Result<(), Error> {
        if self.config.honour_read_only && self.disk.read_only() {
            return Err(Error::ReadOnly);
        }
        Ok(())
    }

    /// Checks an I/O like the block layer does and splits it into ring requests.
    pub(super) fn plan(&self, offset: u64, len: u64) -> Result<Vec<layout::Chunk>, Error> {
        let mut chunks = Vec::new();
        self.plan_into(offset, len, &mut chunks)?;
        Ok(chunks)
    }

    /// [`Frontend::plan`] into a reused vector.
    pub(super) fn plan_into(
        &self,
        offset: u64,
        len: u64,
        chunks: &mut Vec<layout::Chunk>,
    ) -> Result<(), Error> {
        self.check_range(offset, len)?;
        let page_offset = match self.config.placement {
            BufferPlacement::PageAligned => 0,
            BufferPlacement::FollowDiskOffset => (offset % PAGE_SIZE as u64) as usize,
            BufferPlacement::SectorOffset(n) => (usize::from(n) % 8) * SECTOR_SIZE as usize,
        };
        layout::split_into(
            offset / SECTOR_SIZE,
            len as usize,
            page_offset,
            self.shared.max_segments,
            chunks,
        );
        Ok(())
    }

    pub(super) fn check_range(&self, offset: u64, len: u64) -> Result<(), Error> {
        let block = u64::from(self.disk.sector_size);
        if len == 0 || !offset.is_multiple_of(block) || !len.is_multiple_of(block) {
            return Err(Error::Unaligned {
                offset,
                len,
                block_size: self.disk.sector_size,
            });
        }
        let capacity = self.capacity();
        if offset.checked_add(len).is_none_or(|end| end > capacity) {
            return Err(Error::OutOfRange {
                offset,
                len,
                capacity,
            });
        }
        Ok(())
    }

    pub(super) fn plan_discard(
        &self,
        offset: u64,
        len: u64,
        secure: bool,
    ) -> Result<(u64, u64), Error> {
        let Some(params) = self.discard_params() else {
            return Err(Error::NotSupported("discard"));
        };
        if secure && !params.secure {
            return Err(Error::NotSupported("secure discard"));
        }
        if self.config.honour_read_only && self.disk.read_only() {
            return Err(Error::ReadOnly);
        }
        self.check_range(offset, len)?;
        Ok((offset / SECTOR_SIZE, len / SECTOR_SIZE))
    }

    pub(super) fn discard_params(&self) -> Option<DiscardParams> {
        if self.shared.discard.load(Ordering::Relaxed) {
            self.negotiated.discard
        } else {
            None
        }
    }
}
