//! The frontend's asynchronous API: submitting reads, writes, flushes and discards as
//! joins on one queue without waiting, and collecting their [`Completion`]s by polling
//! or waiting on the queue's event channel.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::features::CacheControl;
use crate::queue::{Completion, IoOp, Queue, ReadData, Shared, WriteData};

use super::{Frontend, WAIT_SLICE};

impl Frontend {
    /// Queues a read of `len` bytes at `offset` on `queue`; its [`Completion`] carries
    /// the data. Fails with [`Error::QueueFull`] when the ring lacks the slots it needs
    /// (one per [`Frontend::max_request_bytes`]).
    pub fn submit_read(
        &self,
        queue: usize,
        offset: u64,
        len: usize,
        token: u64,
    ) -> Result<(), Error> {
        let chunks = self.plan(offset, len as u64)?;
        self.submit(
            queue,
            token,
            IoOp::Read,
            len,
            chunks.len(),
            |q, sh, join, i| q.push_rw(sh, join, false, chunks[i], WriteData::InPlace),
        )
    }

    /// Queues a write of `data` at `offset` on `queue` (the data is copied at once).
    pub fn submit_write(
        &self,
        queue: usize,
        offset: u64,
        data: &[u8],
        token: u64,
    ) -> Result<(), Error> {
        self.check_writable()?;
        let chunks = self.plan(offset, data.len() as u64)?;
        self.submit(
            queue,
            token,
            IoOp::Write,
            0,
            chunks.len(),
            |q, sh, join, i| {
                let c = chunks[i];
                q.push_rw(
                    sh,
                    join,
                    true,
                    c,
                    WriteData::Bytes(&data[c.buf_offset..c.buf_offset + c.len]),
                )
            },
        )
    }

    /// Queues a cache flush on `queue`. Without cache control it completes at once.
    pub fn submit_flush(&self, queue: usize, token: u64) -> Result<(), Error> {
        let barrier = match self.shared.cache() {
            CacheControl::None => {
                self.lock(queue)?.push_ready(Completion {
                    token,
                    op: IoOp::Flush,
                    result: Ok(()),
                    data: Vec::new(),
                });
                return Ok(());
            }
            CacheControl::Flush => false,
            CacheControl::Barrier => true,
        };
        self.submit(queue, token, IoOp::Flush, 0, 1, |q, sh, join, _| {
            q.push_flush(sh, join, barrier)
        })
    }

    /// Queues a discard on `queue`.
    pub fn submit_discard(
        &self,
        queue: usize,
        offset: u64,
        len: u64,
        secure: bool,
        token: u64,
    ) -> Result<(), Error> {
        let (sector, nr) = self.plan_discard(offset, len, secure)?;
        self.submit(queue, token, IoOp::Discard, 0, 1, |q, sh, join, _| {
            q.push_discard(sh, join, sector, nr, secure)
        })
    }

    /// Moves the completions `queue` has so far into `out` without blocking.
    pub fn poll_completions(
        &self,
        queue: usize,
        out: &mut Vec<Completion>,
    ) -> Result<usize, Error> {
        let mut q = self.lock(queue)?;
        let reaped = q.reap(&self.shared);
        let n = q.drain_ready(out);
        match reaped {
            Err(e) if n == 0 => Err(e),
            _ => Ok(n),
        }
    }

    /// Like [`Frontend::poll_completions`], but waits up to `timeout` for at least one.
    pub fn wait_completions(
        &self,
        queue: usize,
        out: &mut Vec<Completion>,
        timeout: Duration,
    ) -> Result<usize, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.poll_completions(queue, out)?;
            let now = Instant::now();
            if n > 0 || now >= deadline {
                return Ok(n);
            }
            // Wait without holding the queue, so other threads may submit meanwhile.
            let evtchn = self.lock(queue)?.event_channel();
            evtchn.wait((deadline - now).min(WAIT_SLICE))?;
        }
    }

    /// Like [`Frontend::wait_completions`], but first polls the ring for up to `poll`
    /// (no system call) before sleeping on the event channel: a load generator with a
    /// core of its own trades that core's time for the wake-up latency.
    pub fn wait_completions_polling(
        &self,
        queue: usize,
        out: &mut Vec<Completion>,
        timeout: Duration,
        poll: Duration,
    ) -> Result<usize, Error> {
        let n = self.poll_completions(queue, out)?;
        if n > 0 {
            return Ok(n);
        }
        if !poll.is_zero() {
            let until = Instant::now() + poll;
            while !self.lock(queue)?.has_responses() && Instant::now() < until {
                std::hint::spin_loop();
            }
        }
        self.wait_completions(queue, out, timeout)
    }

    /// Submits an asynchronous join of `parts` ring requests, all or nothing.
    pub(super) fn submit(
        &self,
        queue: usize,
        token: u64,
        op: IoOp,
        read_len: usize,
        parts: usize,
        push: impl FnMut(&mut Queue, &Shared, u64, usize) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let mut q = self.lock(queue)?;
        let pushed = self.submit_locked(
            &mut q,
            queue,
            token,
            op,
            (read_len, ReadData::Copy),
            parts,
            push,
        );
        // Publish whatever was pushed (all of it, or the parts of a failed submission,
        // which complete unreported); a closed or halted ring has nothing to publish.
        let kicked = match q.check_usable() {
            Ok(()) => q.kick(&self.shared),
            Err(_) => Ok(()),
        };
        pushed.and(kicked)
    }

    /// The body of an asynchronous submission on a held queue: all parts or none (parts
    /// pushed before a failure are abandoned: they complete, unreported). The caller
    /// kicks.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn submit_locked(
        &self,
        q: &mut Queue,
        queue: usize,
        token: u64,
        op: IoOp,
        (read_len, read_data): (usize, ReadData),
        parts: usize,
        mut push: impl FnMut(&mut Queue, &Shared, u64, usize) -> Result<(), Error>,
    ) -> Result<(), Error> {
        if self.stopped.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        q.check_usable()?;
        if q.free_slots() < parts {
            return Err(Error::QueueFull {
                queue,
                free: q.free_slots(),
                needed: parts,
            });
        }
        let join = q.begin(token, op, false, parts, read_len, read_data);
        for i in 0..parts {
            if let Err(e) = push(q, &self.shared, join, i) {
                q.abandon(join, i);
                return Err(e);
            }
        }
        Ok(())
    }
}
