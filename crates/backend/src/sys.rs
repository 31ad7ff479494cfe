//! The kernel object a reactor waits in: one io_uring per reactor used as its event loop
//! (multishot `POLL_ADD` on every watched fd, the housekeeping deadline as the wait's own
//! timeout), so that whatever wakes the reactor — a guest's notification, a storage
//! completion, a control command, the tick — costs one `io_uring_enter`, and the
//! readiness of everything is then read from the completion queue without a system call.
//!
//! The `unsafe` here is the SQE push (the kernel reads the entry's fd at submission; see
//! the SAFETY comment). Everything else goes through the `io-uring` crate's safe API.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// What a watched fd is known by: chosen by the caller, echoed in every readiness report.
pub(crate) type Token = u64;

/// The `user_data` of `POLL_REMOVE` requests: their own completions carry no readiness.
const TOKEN_REMOVE: Token = u64::MAX;

/// A completion queue large enough that every watched fd of a few hundred rings can
/// report at once; beyond it the kernel keeps completions on its overflow list
/// (`IORING_FEAT_NODROP`) and a multishot poll that could not post ends, to be re-armed.
const CQ_ENTRIES: u32 = 4096;
const SQ_ENTRIES: u32 = 256;

/// Why [`EventLoop::wait`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Woken {
    /// Completions were already waiting: no system call was made.
    NoWait,
    /// The thread slept and was woken by at least one completion.
    Event,
    /// The thread slept until the timeout (or a signal) with nothing to report.
    Timeout,
}

/// One reactor's io_uring, watching fds for readability.
pub(crate) struct EventLoop {
    ring: IoUring,
    /// Watched fds by token, to re-arm a multishot poll the kernel ended.
    watched: HashMap<Token, RawFd>,
}

impl EventLoop {
    pub(crate) fn new() -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_cqsize(CQ_ENTRIES)
            .build(SQ_ENTRIES)?;
        Ok(Self {
            ring,
            watched: HashMap::new(),
        })
    }

    /// Starts reporting `fd` under `token` whenever it becomes readable (and once now if
    /// it already is). The registration is in the kernel when this returns, so the fd
    /// may be closed only after [`unwatch`](Self::unwatch).
    pub(crate) fn watch(&mut self, fd: BorrowedFd<'_>, token: Token) -> io::Result<()> {
        if token == TOKEN_REMOVE {
            return Err(io::Error::other("reserved token"));
        }
        let raw = fd.as_raw_fd();
        self.push(poll_entry(raw, token))?;
        self.submit()?;
        self.watched.insert(token, raw);
        Ok(())
    }

    /// Stops reporting `token`'s fd. The removal is in the kernel when this returns (a
    /// poll is cancelled synchronously at submission); a report already in the completion
    /// queue is dropped by [`drain`](Self::drain) since the token is no longer watched.
    pub(crate) fn unwatch(&mut self, token: Token) -> io::Result<()> {
        if self.watched.remove(&token).is_none() {
            return Ok(());
        }
        self.push(
            opcode::PollRemove::new(token)
                .build()
                .user_data(TOKEN_REMOVE),
        )?;
        self.submit()
    }

    /// Whether completions wait in the queue: a memory read, no system call (what an
    /// adaptive poll spins on).
    pub(crate) fn has_events(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Submits what is queued (re-arms) and, if no completion is waiting, sleeps until one
    /// arrives or `timeout` passes (forever if `None`): the reactor's one blocking call.
    pub(crate) fn wait(&mut self, timeout: Option<Duration>) -> io::Result<Woken> {
        if self.has_events() {
            if !self.ring.submission().is_empty() {
                self.submit()?;
            }
            return Ok(Woken::NoWait);
        }
        let ts = timeout.map(|d| {
            types::Timespec::new()
                .sec(d.as_secs())
                .nsec(d.subsec_nanos())
        });
        let args = types::SubmitArgs::new();
        let args = match &ts {
            Some(ts) => args.timespec(ts),
            None => args,
        };
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
            Err(e) => return Err(e),
        }
        Ok(if self.has_events() {
            Woken::Event
        } else {
            Woken::Timeout
        })
    }

    /// Hands every readiness report in the queue to `f` (the token, and `Err` when the
    /// kernel ended the watch with an error: the fd is then no longer watched). A
    /// multishot poll the kernel ended without error is re-armed; the new SQE goes in
    /// with the next [`wait`](Self::wait).
    pub(crate) fn drain(&mut self, mut f: impl FnMut(Token, io::Result<()>)) -> io::Result<()> {
        let mut rearm = Vec::new();
        for cqe in self.ring.completion() {
            let token = cqe.user_data();
            if token == TOKEN_REMOVE {
                continue;
            }
            let Some(&fd) = self.watched.get(&token) else {
                // Removed meanwhile: its last reports (and the -ECANCELED) mean nothing.
                continue;
            };
            let res = cqe.result();
            if res < 0 && res != -libc::ECANCELED {
                self.watched.remove(&token);
                f(token, Err(io::Error::from_raw_os_error(-res)));
                continue;
            }
            if !cqueue::more(cqe.flags()) {
                rearm.push((fd, token));
            }
            if res >= 0 {
                f(token, Ok(()));
            }
        }
        for (fd, token) in rearm {
            self.push(poll_entry(fd, token))?;
        }
        Ok(())
    }

    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the entry is a POLL_ADD or POLL_REMOVE: it points at no memory of
            // ours, only at an fd number, which the kernel resolves when it consumes the
            // SQE. Every caller submits while that fd is open: `watch` submits at once,
            // and a re-arm is only queued for a still-watched fd, which its owner keeps
            // open until `unwatch` (which submits everything queued before it).
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                return Ok(());
            }
            self.submit()?;
        }
    }

    fn submit(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// A multishot poll for readability of `fd`.
fn poll_entry(fd: RawFd, token: Token) -> squeue::Entry {
    opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
        .multi(true)
        .build()
        .user_data(token)
}

/// Number of file descriptors open in this process; tests use it to prove teardown
/// closes everything it opened.
pub fn open_fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::time::Instant;

    fn reports(l: &mut EventLoop) -> Vec<Token> {
        let mut seen = vec![];
        l.drain(|t, r| {
            r.unwrap();
            seen.push(t);
        })
        .unwrap();
        seen
    }

    #[test]
    fn a_signal_is_one_wake_up_and_one_report() {
        let mut l = EventLoop::new().unwrap();
        let d = eventfd::EventFd::new().unwrap();
        l.watch(d.as_fd(), 7).unwrap();
        assert_eq!(l.wait(Some(Duration::ZERO)).unwrap(), Woken::Timeout);
        // Signalled from this very thread, the report is in the queue before the wait
        // (the poll's task work runs on the way out of `write`): no sleep then.
        d.signal().unwrap();
        assert_ne!(
            l.wait(Some(Duration::from_secs(5))).unwrap(),
            Woken::Timeout
        );
        assert_eq!(reports(&mut l), vec![7]);
        // The watch stays armed (multishot) without being drained: the next signal,
        // from another thread while this one sleeps, reports again.
        let d2 = d.try_clone().unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            d2.signal().unwrap();
        });
        assert_eq!(l.wait(Some(Duration::from_secs(5))).unwrap(), Woken::Event);
        t.join().unwrap();
        assert_eq!(reports(&mut l), vec![7]);
        assert_eq!(d.drain(), 2);
    }

    #[test]
    fn an_fd_readable_before_the_watch_is_reported() {
        let mut l = EventLoop::new().unwrap();
        let d = eventfd::EventFd::new().unwrap();
        d.signal().unwrap();
        l.watch(d.as_fd(), 3).unwrap();
        assert_ne!(
            l.wait(Some(Duration::from_secs(5))).unwrap(),
            Woken::Timeout
        );
        assert_eq!(reports(&mut l), vec![3]);
    }

    #[test]
    fn the_timeout_ends_the_wait() {
        let mut l = EventLoop::new().unwrap();
        let start = Instant::now();
        assert_eq!(
            l.wait(Some(Duration::from_millis(20))).unwrap(),
            Woken::Timeout
        );
        assert!(start.elapsed() >= Duration::from_millis(19));
    }

    #[test]
    fn an_unwatched_fd_reports_nothing() {
        let mut l = EventLoop::new().unwrap();
        let a = eventfd::EventFd::new().unwrap();
        let b = eventfd::EventFd::new().unwrap();
        l.watch(a.as_fd(), 1).unwrap();
        l.watch(b.as_fd(), 2).unwrap();
        l.unwatch(1).unwrap();
        a.signal().unwrap();
        // The removal's own completions may wake the loop; they report nothing.
        l.wait(Some(Duration::from_millis(20))).unwrap();
        assert!(reports(&mut l).is_empty());
        assert_eq!(
            l.wait(Some(Duration::from_millis(20))).unwrap(),
            Woken::Timeout
        );
        b.signal().unwrap();
        l.wait(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(reports(&mut l), vec![2]);
    }
}
