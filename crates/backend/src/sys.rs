//! Thin, safe wrappers over the three kernel objects a reactor is built from: an epoll
//! instance, a periodic timerfd and an eventfd used as a doorbell.
//!
//! They own their file descriptors (closing on drop) and expose only what the reactor
//! needs. All system calls go through `rustix`, so this module holds no `unsafe`.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::buffer::spare_capacity;
use rustix::event::epoll;
use rustix::event::{eventfd, EventfdFlags};
use rustix::time::{
    timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags,
    Timespec,
};

/// One readiness report from [`Poller::wait`]: the token given at registration.
pub(crate) type Token = u64;

/// An epoll instance. Registrations are level-triggered: a source that stays readable
/// keeps waking the reactor, so a missed drain shows up as busy-looping rather than as a
/// hang (the safer failure for a block device).
pub(crate) struct Poller {
    epoll: OwnedFd,
}

/// Room for the events of one wait. Not `Send` (rustix's event type may carry a
/// pointer), so each thread makes its own.
pub(crate) struct Events(Vec<epoll::Event>);

impl Events {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n.max(1)))
    }
}

impl Poller {
    pub(crate) fn new() -> io::Result<Self> {
        Ok(Self {
            epoll: epoll::create(epoll::CreateFlags::CLOEXEC)?,
        })
    }

    pub(crate) fn add(&self, fd: BorrowedFd<'_>, token: Token) -> io::Result<()> {
        epoll::add(
            &self.epoll,
            fd,
            epoll::EventData::new_u64(token),
            epoll::EventFlags::IN,
        )?;
        Ok(())
    }

    pub(crate) fn delete(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        epoll::delete(&self.epoll, fd)?;
        Ok(())
    }

    /// Waits for readiness (at most `timeout`, forever if `None`) and calls `f` with the
    /// token of every ready source. An interrupted wait reports nothing.
    pub(crate) fn wait(
        &self,
        events: &mut Events,
        timeout: Option<Duration>,
        mut f: impl FnMut(Token),
    ) -> io::Result<()> {
        events.0.clear();
        let ts = timeout.map(|d| Timespec {
            tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
            tv_nsec: d.subsec_nanos().into(),
        });
        match epoll::wait(&self.epoll, spare_capacity(&mut events.0), ts.as_ref()) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        for ev in &events.0 {
            f(ev.data.u64());
        }
        Ok(())
    }
}

/// A periodic monotonic timer (the reactor's 100 ms housekeeping tick).
pub(crate) struct Timer {
    fd: OwnedFd,
}

impl Timer {
    pub(crate) fn periodic(period: Duration) -> io::Result<Self> {
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::CLOEXEC | TimerfdFlags::NONBLOCK,
        )?;
        let ts = Timespec {
            tv_sec: period.as_secs() as i64,
            tv_nsec: period.subsec_nanos().into(),
        };
        timerfd_settime(
            &fd,
            TimerfdTimerFlags::empty(),
            &Itimerspec {
                it_interval: ts,
                it_value: ts,
            },
        )?;
        Ok(Self { fd })
    }

    /// Consumes the expiration count so the level-triggered registration quiets down.
    pub(crate) fn drain(&self) -> u64 {
        read_counter(self.fd.as_fd())
    }
}

impl AsFd for Timer {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// An eventfd used as a doorbell between threads (the reactor's control channel).
pub(crate) struct Doorbell {
    fd: OwnedFd,
}

impl Doorbell {
    pub(crate) fn new() -> io::Result<Self> {
        Ok(Self {
            fd: eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?,
        })
    }

    pub(crate) fn ring(&self) -> io::Result<()> {
        match rustix::io::write(&self.fd, &1u64.to_ne_bytes()) {
            // EAGAIN: the counter is saturated, which still means "readable".
            Ok(_) | Err(rustix::io::Errno::AGAIN) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub(crate) fn drain(&self) -> u64 {
        read_counter(self.fd.as_fd())
    }

    #[cfg(test)]
    pub(crate) fn fd_clone_for_tests(&self) -> Self {
        Self {
            fd: self.fd.try_clone().unwrap(),
        }
    }
}

impl AsFd for Doorbell {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Reads an 8-byte counter (eventfd, timerfd); 0 when nothing was pending.
fn read_counter(fd: BorrowedFd<'_>) -> u64 {
    let mut buf = [0u8; 8];
    match rustix::io::read(fd, &mut buf) {
        Ok(8) => u64::from_ne_bytes(buf),
        _ => 0,
    }
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

    #[test]
    fn doorbell_wakes_poller_and_drains() {
        let p = Poller::new().unwrap();
        let mut ev = Events::with_capacity(4);
        let d = Doorbell::new().unwrap();
        p.add(d.as_fd(), 7).unwrap();
        let mut seen = vec![];
        p.wait(&mut ev, Some(Duration::ZERO), |t| seen.push(t))
            .unwrap();
        assert!(seen.is_empty());
        d.ring().unwrap();
        d.ring().unwrap();
        p.wait(&mut ev, Some(Duration::from_secs(1)), |t| seen.push(t))
            .unwrap();
        assert_eq!(seen, vec![7]);
        assert_eq!(d.drain(), 2);
        assert_eq!(d.drain(), 0);
    }

    #[test]
    fn timer_fires_periodically() {
        let p = Poller::new().unwrap();
        let mut ev = Events::with_capacity(4);
        let t = Timer::periodic(Duration::from_millis(5)).unwrap();
        p.add(t.as_fd(), 1).unwrap();
        let mut n = 0;
        while n < 2 {
            p.wait(&mut ev, Some(Duration::from_secs(1)), |_| n += 1)
                .unwrap();
            t.drain();
        }
    }
}
