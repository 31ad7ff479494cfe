//! [`Batch`]: submissions on one queue held under one lock and published to the backend
//! with one producer-index update and at most one notification.

use std::sync::MutexGuard;

use crate::error::Error;
use crate::queue::{Completion, IoOp, Queue, ReadData, WriteData};

use super::Frontend;

impl Frontend {
    /// Opens a batch of submissions on `queue` (see [`Batch`]).
    pub fn batch(&self, queue: usize) -> Result<Batch<'_>, Error> {
        Ok(Batch {
            fe: self,
            queue,
            q: self.lock(queue)?,
            committed: false,
        })
    }
}

/// Submissions on one queue published together, as Linux's blk-mq hands blkfront a
/// batch and blkfront notifies once per commit (`blkif_commit_rqs`): the queue is held
/// from [`Frontend::batch`] until the batch is committed or dropped, requests are pushed
/// on the ring as they come, and the ring's producer index is published — and the
/// backend notified if it asked — once, at the end. Completions can be reaped under the
/// same hold ([`Batch::reap`]), so a load generator reaps and refills with one lock.
pub struct Batch<'a> {
    fe: &'a Frontend,
    queue: usize,
    q: MutexGuard<'a, Queue>,
    committed: bool,
}

impl std::fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl Batch<'_> {
    /// Ring slots free for more requests.
    pub fn free_slots(&self) -> usize {
        self.q.free_slots()
    }

    /// Moves the completions the queue has into `out` (see
    /// [`Frontend::poll_completions`]).
    pub fn reap(&mut self, out: &mut Vec<Completion>) -> Result<usize, Error> {
        let reaped = self.q.reap(&self.fe.shared);
        let n = self.q.drain_ready(out);
        match reaped {
            Err(e) if n == 0 => Err(e),
            _ => Ok(n),
        }
    }

    /// Queues a read of `len` bytes at `offset`; with [`ReadData::Discard`] its
    /// completion carries no data and nothing is copied out of the granted pages.
    pub fn read(
        &mut self,
        offset: u64,
        len: usize,
        token: u64,
        data: ReadData,
    ) -> Result<(), Error> {
        self.rw(offset, len, token, None, data)
    }

    /// Queues a write of `data` at `offset` (copied into the granted pages now).
    pub fn write(&mut self, offset: u64, data: &[u8], token: u64) -> Result<(), Error> {
        self.rw(
            offset,
            data.len(),
            token,
            Some(WriteData::Bytes(data)),
            ReadData::Copy,
        )
    }

    /// Queues a write of `len` bytes at `offset` of whatever the granted pages hold
    /// ([`WriteData::InPlace`]): a load generator's write, with no copy on the guest side.
    pub fn write_in_place(&mut self, offset: u64, len: usize, token: u64) -> Result<(), Error> {
        self.rw(offset, len, token, Some(WriteData::InPlace), ReadData::Copy)
    }

    fn rw(
        &mut self,
        offset: u64,
        len: usize,
        token: u64,
        write: Option<WriteData<'_>>,
        read_data: ReadData,
    ) -> Result<(), Error> {
        if write.is_some() {
            self.fe.check_writable()?;
        }
        let mut chunks = std::mem::take(&mut self.q.chunks);
        let result = self
            .fe
            .plan_into(offset, len as u64, &mut chunks)
            .and_then(|()| {
                let (op, read_len) = match write {
                    Some(_) => (IoOp::Write, 0),
                    None => (IoOp::Read, len),
                };
                self.fe.submit_locked(
                    &mut self.q,
                    self.queue,
                    token,
                    op,
                    (read_len, read_data),
                    chunks.len(),
                    |q, sh, join, i| {
                        let c = chunks[i];
                        let data = match write {
                            Some(WriteData::Bytes(d)) => {
                                WriteData::Bytes(&d[c.buf_offset..c.buf_offset + c.len])
                            }
                            Some(WriteData::InPlace) | None => WriteData::InPlace,
                        };
                        q.push_rw(sh, join, write.is_some(), c, data)
                    },
                )
            });
        self.q.chunks = chunks;
        result
    }

    /// Publishes the batch: one producer-index update, one notification if the backend
    /// asked for one. Dropping the batch does the same, ignoring errors.
    pub fn commit(mut self) -> Result<(), Error> {
        self.committed = true;
        self.kick()
    }

    fn kick(&mut self) -> Result<(), Error> {
        // A queue torn down or halted meanwhile has nothing to publish.
        self.q.check_usable()?;
        self.q.kick(&self.fe.shared)
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if !self.committed {
            let _ = self.kick();
        }
    }
}
