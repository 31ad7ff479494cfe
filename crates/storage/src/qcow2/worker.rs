//! The worker thread of a qcow2 queue: what the reactor cannot do without waiting (L2
//! tables not cached, allocation, copy-on-write, compressed clusters, discard, flush) runs
//! here through imago's synchronous API, with the guest's data bounced through a buffer
//! of the worker's own. Results go to the queue's [`Port`] and its eventfd.

use std::io;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

use super::Image;
use crate::iovec::IoVec;
use crate::AlignedBuf;
use eventfd::EventFd;

/// The worker's bounce buffer: requests are copied through it in pieces of this size.
const BOUNCE_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Copy)]
pub(super) enum JobOp {
    Read { offset: u64, len: u64 },
    Write { offset: u64, len: u64, fua: bool },
    Flush,
    Discard { offset: u64, len: u64 },
}

/// A request for the worker. `iov` points into the slot's iovec copy, which the queue does
/// not touch until the job's result has been reaped (or the worker has been joined).
pub(super) struct Job {
    pub(super) slot: u32,
    pub(super) op: JobOp,
    pub(super) iov: *const IoVec,
    pub(super) iov_count: usize,
}

// SAFETY: `iov` points to the slot's `iovs` vector, owned by the queue and left untouched
// while the job is out (the slot is in state `Worker` until its result is reaped, and Drop
// joins the worker before the vectors are freed); the memory those iovecs describe is the
// submitter's contract.
unsafe impl Send for Job {}

/// Where the worker leaves results; its eventfd is the queue's completion fd (also
/// registered with the io_uring).
pub(super) struct Port {
    pub(super) results: Mutex<Vec<(u32, io::Result<u64>)>>,
    pub(super) eventfd: EventFd,
}

/// The queue's worker thread, started at the first request that needs it. Dropping it
/// closes its channel and joins it: the jobs it was given are finished first.
pub(super) struct Worker {
    jobs: Option<mpsc::SyncSender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    pub(super) fn start(image: &Arc<Image>, port: &Arc<Port>, depth: u32) -> io::Result<Worker> {
        let (tx, rx) = mpsc::sync_channel::<Job>(depth as usize);
        let image = Arc::clone(image);
        let port = Arc::clone(port);
        let thread = std::thread::Builder::new()
            .name("xenblkd-qcow2".into())
            .spawn(move || worker_main(&image, &rx, &port))?;
        Ok(Worker {
            jobs: Some(tx),
            thread: Some(thread),
        })
    }

    /// Never blocks: the queue has at most `depth` slots, so at most `depth` jobs are out.
    pub(super) fn send(&self, job: Job) -> io::Result<()> {
        match &self.jobs {
            Some(tx) => tx
                .send(job)
                .map_err(|_| io::Error::other("qcow2 worker thread is gone")),
            None => Err(io::Error::other("qcow2 worker thread is gone")),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Leaves the gate when dropped (also when a job panics inside imago).
struct Held<'a> {
    image: &'a Image,
    exclusive: bool,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if self.exclusive {
            self.image.gate.leave_exclusive();
        } else {
            self.image.gate.leave_shared();
        }
    }
}

fn shared(image: &Image) -> Held<'_> {
    image.gate.enter_shared();
    Held {
        image,
        exclusive: false,
    }
}

fn worker_main(image: &Image, jobs: &mpsc::Receiver<Job>, port: &Port) {
    // Aligned for imago as for the kernel: every piece imago writes from it starts a
    // multiple of the logical block size in (see `host_file` on why that matters).
    let mut bounce = AlignedBuf::new(BOUNCE_BYTES, image.access.mem_align().max(4096));
    for job in jobs {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_job(image, &job, &mut bounce)
        }))
        .unwrap_or_else(|_| Err(io::Error::other("qcow2 worker panicked")));
        if let Err(e) = &result {
            tracing::debug!(path = %image.path.display(), op = ?job.op, error = %e,
                "qcow2 request failed");
        }
        port.results
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((job.slot, result));
        if let Err(e) = port.eventfd.signal() {
            tracing::error!(error = %e, "qcow2 worker cannot signal completion");
        }
    }
}

fn run_job(image: &Image, job: &Job, bounce: &mut AlignedBuf) -> io::Result<u64> {
    // SAFETY: see `Job`: the slot's iovec copy outlives the job.
    let iovs = unsafe { std::slice::from_raw_parts(job.iov, job.iov_count) };
    let access = &image.access;
    match job.op {
        JobOp::Read { offset, len } => {
            let _held = shared(image);
            let mut pos = 0u64;
            while pos < len {
                // At most BOUNCE_BYTES, a usize.
                #[allow(clippy::cast_possible_truncation)]
                let n = (len - pos).min(BOUNCE_BYTES as u64) as usize;
                let buf = &mut bounce.as_mut_slice()[..n];
                access.read(&mut *buf, offset + pos)?;
                // SAFETY: the iovecs describe memory writable for this read until its
                // completion (the `submit` contract), disjoint from `bounce`.
                unsafe { copy_to_iovecs(iovs, pos, buf) };
                pos += n as u64;
            }
            Ok(len)
        }
        JobOp::Write { offset, len, fua } => {
            let _held = shared(image);
            let mut pos = 0u64;
            while pos < len {
                // At most BOUNCE_BYTES, a usize.
                #[allow(clippy::cast_possible_truncation)]
                let n = (len - pos).min(BOUNCE_BYTES as u64) as usize;
                let buf = &mut bounce.as_mut_slice()[..n];
                // SAFETY: the iovecs describe memory readable for this write until its
                // completion (the `submit` contract), disjoint from `bounce`.
                unsafe { copy_from_iovecs(iovs, pos, buf) };
                access.write(&*buf, offset + pos)?;
                pos += n as u64;
            }
            if fua {
                access.flush()?;
                access.sync()?;
            }
            Ok(len)
        }
        JobOp::Flush => {
            let _held = shared(image);
            // imago writes refcount blocks before the L2 tables that point at what they
            // count, then the file is synced: metadata and data are durable together.
            access.flush()?;
            access.sync()?;
            Ok(0)
        }
        JobOp::Discard { offset, len } => {
            image.gate.enter_exclusive();
            let _held = Held {
                image,
                exclusive: true,
            };
            // SAFETY: imago requires that no data mapping of the image is held or used
            // while clusters are freed; every user of a mapping (mapped requests on any
            // queue of this image, worker jobs) holds the gate shared, and we hold it
            // exclusively.
            unsafe { access.discard_to_zero_unsafe(offset, len) }?;
            Ok(len)
        }
    }
}

/// Copies `src` into the memory the iovecs describe, starting `skip` bytes in.
///
/// # Safety
/// Every iovec must describe memory valid for writes, not aliased by `src` and not accessed
/// through Rust references meanwhile.
unsafe fn copy_to_iovecs(iovs: &[IoVec], skip: u64, src: &[u8]) {
    let mut skip = skip;
    let mut src = src;
    for v in iovs {
        if src.is_empty() {
            break;
        }
        let len = v.0.iov_len as u64;
        if skip >= len {
            skip -= len;
            continue;
        }
        // `skip < len`, the length of an iovec: both fit a usize.
        #[allow(clippy::cast_possible_truncation)]
        let (rest, skip_bytes) = ((len - skip) as usize, skip as usize);
        let n = rest.min(src.len());
        // SAFETY: `skip + n <= iov_len`; validity per this function's contract.
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.as_ptr(),
                v.0.iov_base.cast::<u8>().add(skip_bytes),
                n,
            )
        };
        src = &src[n..];
        skip = 0;
    }
}

/// Copies from the memory the iovecs describe, starting `skip` bytes in, into `dst`.
///
/// # Safety
/// Every iovec must describe memory valid for reads, not aliased by `dst`.
unsafe fn copy_from_iovecs(iovs: &[IoVec], skip: u64, dst: &mut [u8]) {
    let mut skip = skip;
    let mut at = 0usize;
    for v in iovs {
        if at == dst.len() {
            break;
        }
        let len = v.0.iov_len as u64;
        if skip >= len {
            skip -= len;
            continue;
        }
        // `skip < len`, the length of an iovec: both fit a usize.
        #[allow(clippy::cast_possible_truncation)]
        let (rest, skip_bytes) = ((len - skip) as usize, skip as usize);
        let n = rest.min(dst.len() - at);
        // SAFETY: `skip + n <= iov_len`; validity per this function's contract.
        unsafe {
            std::ptr::copy_nonoverlapping(
                v.0.iov_base.cast::<u8>().add(skip_bytes),
                dst[at..].as_mut_ptr(),
                n,
            )
        };
        at += n;
        skip = 0;
    }
}
