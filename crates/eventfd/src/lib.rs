//! The eventfd: the one wakeup counter of the workspace. A storage queue's completion fd,
//! the reactor's control doorbell and the simulator's event channels are all this type.
//!
//! Every eventfd here is non-blocking and in counter mode (not `EFD_SEMAPHORE`): a signal
//! adds 1, a drain reads and zeroes the whole count, so one drain quiets a
//! level-triggered epoll registration however many signals arrived. Its own crate because
//! `storage`, `platform` and `backend` all need it and none of the crates below them
//! (`shmem` owns shared guest memory) is about wakeups. All calls go through `rustix`, so
//! the crate has no `unsafe`.

#![forbid(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use rustix::event::EventfdFlags;
use rustix::io::Errno;

/// A non-blocking, close-on-exec eventfd in counter mode. Closed on drop.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// A fresh eventfd with a zero count.
    pub fn new() -> io::Result<Self> {
        Ok(Self(rustix::event::eventfd(
            0,
            EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK,
        )?))
    }

    /// Adds 1 to the count, which makes the fd readable.
    pub fn signal(&self) -> io::Result<()> {
        signal(self.0.as_fd())
    }

    /// Reads and zeroes the count: the fd is no longer readable. Returns the old count,
    /// 0 when nothing was pending.
    ///
    /// An error is possible only for a descriptor adopted with `EventFd::from(OwnedFd)`
    /// that is not a non-blocking eventfd; [`EventFd::drain`] is the call for one made by
    /// [`EventFd::new`].
    pub fn try_drain(&self) -> io::Result<u64> {
        let mut count = [0u8; 8];
        loop {
            return match rustix::io::read(&self.0, &mut count) {
                Ok(8) => Ok(u64::from_ne_bytes(count)),
                // An eventfd read is all 8 bytes or an error; anything else is not one.
                Ok(_) => Err(io::Error::from(io::ErrorKind::InvalidData)),
                Err(Errno::AGAIN) => Ok(0),
                Err(Errno::INTR) => continue,
                Err(e) => Err(e.into()),
            };
        }
    }

    /// [`EventFd::try_drain`] for an eventfd this process made with [`EventFd::new`],
    /// whose read can only succeed or find nothing pending (EAGAIN, reported as 0).
    pub fn drain(&self) -> u64 {
        self.try_drain().unwrap_or(0)
    }

    /// A second handle on the same counter (`dup`): a signal through either is seen by
    /// both.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }
}

/// Adds 1 to an eventfd known only by a borrowed descriptor (for example a storage
/// queue's completion fd seen through the `Storage` trait). A saturated counter
/// (2^64 - 2 pending) is already readable, so its EAGAIN is success.
pub fn signal(fd: BorrowedFd<'_>) -> io::Result<()> {
    match rustix::io::write(fd, &1u64.to_ne_bytes()) {
        Ok(_) | Err(Errno::AGAIN) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Adopts a descriptor that should be a non-blocking eventfd, such as one passed over a
/// unix socket by a simulated guest. Nothing is checked here: if it is something else,
/// [`EventFd::signal`] and [`EventFd::try_drain`] report the I/O errors they meet.
impl From<OwnedFd> for EventFd {
    fn from(fd: OwnedFd) -> Self {
        Self(fd)
    }
}

impl From<EventFd> for OwnedFd {
    fn from(fd: EventFd) -> Self {
        fd.0
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: BorrowedFd<'_>) -> bool {
        let mut pfd = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        rustix::event::poll(&mut pfd, Some(&rustix::event::Timespec::default())).unwrap() == 1
    }

    #[test]
    fn signals_add_up_and_one_drain_resets_them() {
        let e = EventFd::new().unwrap();
        assert!(!readable(e.as_fd()));
        assert_eq!(e.drain(), 0, "nothing pending is 0, not an error");
        e.signal().unwrap();
        e.signal().unwrap();
        signal(e.as_fd()).unwrap();
        assert!(readable(e.as_fd()));
        assert_eq!(e.try_drain().unwrap(), 3);
        assert!(!readable(e.as_fd()));
        assert_eq!(e.try_drain().unwrap(), 0);
    }

    #[test]
    fn a_clone_shares_the_counter() {
        let a = EventFd::new().unwrap();
        let b = a.try_clone().unwrap();
        b.signal().unwrap();
        assert_eq!(a.drain(), 1);
        assert_eq!(b.drain(), 0);
    }

    #[test]
    fn a_saturated_counter_still_signals() {
        let e = EventFd::new().unwrap();
        // The largest count an eventfd holds; one more write would block.
        rustix::io::write(&e, &(u64::MAX - 1).to_ne_bytes()).unwrap();
        e.signal().unwrap();
        assert_eq!(e.drain(), u64::MAX - 1);
    }

    #[test]
    fn an_adopted_fd_that_is_not_an_eventfd_reports_errors() {
        // The write end of a pipe: reading it fails with EBADF, which try_drain must
        // report rather than call "nothing pending".
        let (_read, write) = rustix::pipe::pipe().unwrap();
        let e = EventFd::from(write);
        assert!(e.try_drain().is_err());
        assert_eq!(e.drain(), 0);
    }
}
