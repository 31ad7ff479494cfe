//! The image-wide gate between data I/O and operations that free clusters.
//!
//! imago hands out data mappings ("guest range G is at host offset H of file F") that stay
//! valid until something frees the cluster; only discard does that, and imago's contract
//! for it (`discard_to_zero_unsafe`) is that nobody holds or uses a mapping meanwhile,
//! including imago's own read/write paths. So every read and write, whether a reactor
//! submits it to io_uring itself or a worker runs it through imago, holds the gate
//! *shared* from before its mapping is looked up until its data has landed, and a discard
//! holds it *exclusive*.
//!
//! Reactors never wait: [`Gate::try_enter_shared`] fails while a discard is waiting or
//! running, and the reactor then hands the request to its worker, which waits
//! ([`Gate::enter_shared`]). The shared count is one atomic, so the fast path costs two
//! atomic operations and no lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

/// Set while an exclusive holder waits or runs.
const EXCLUSIVE: u64 = 1 << 63;

#[derive(Debug, Default)]
pub(crate) struct Gate {
    /// Shared holders in the low bits, [`EXCLUSIVE`] on top.
    state: AtomicU64,
    lock: Mutex<()>,
    changed: Condvar,
}

impl Gate {
    /// Enters shared unless an exclusive holder waits or runs. Never blocks.
    pub(crate) fn try_enter_shared(&self) -> bool {
        let before = self.state.fetch_add(1, Ordering::AcqRel);
        if before & EXCLUSIVE == 0 {
            return true;
        }
        self.leave_shared();
        false
    }

    /// Enters shared, waiting for an exclusive holder to finish.
    pub(crate) fn enter_shared(&self) {
        loop {
            if self.try_enter_shared() {
                return;
            }
            let mut guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            while self.state.load(Ordering::Acquire) & EXCLUSIVE != 0 {
                guard = self.changed.wait(guard).unwrap_or_else(|p| p.into_inner());
            }
        }
    }

    pub(crate) fn leave_shared(&self) {
        let after = self.state.fetch_sub(1, Ordering::AcqRel) - 1;
        if after & EXCLUSIVE != 0 && after & !EXCLUSIVE == 0 {
            // The waiting exclusive holder checks the count under the lock, so taking it
            // here orders this wake-up after its check.
            let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.changed.notify_all();
        }
    }

    /// Waits until no one holds the gate and takes it exclusively; new shared entries fail
    /// (or wait) from the moment this is called.
    pub(crate) fn enter_exclusive(&self) {
        let mut guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        // One exclusive holder at a time.
        while self.state.fetch_or(EXCLUSIVE, Ordering::AcqRel) & EXCLUSIVE != 0 {
            guard = self.changed.wait(guard).unwrap_or_else(|p| p.into_inner());
        }
        while self.state.load(Ordering::Acquire) & !EXCLUSIVE != 0 {
            guard = self.changed.wait(guard).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub(crate) fn leave_exclusive(&self) {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.state.fetch_and(!EXCLUSIVE, Ordering::AcqRel);
        self.changed.notify_all();
    }

    #[cfg(test)]
    fn shared_holders(&self) -> u64 {
        self.state.load(Ordering::Acquire) & !EXCLUSIVE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn exclusive_waits_for_shared_and_blocks_new_shared() {
        let gate = Arc::new(Gate::default());
        assert!(gate.try_enter_shared());
        let inside = Arc::new(AtomicBool::new(false));
        let t = {
            let (gate, inside) = (gate.clone(), inside.clone());
            std::thread::spawn(move || {
                gate.enter_exclusive();
                inside.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
                inside.store(false, Ordering::SeqCst);
                gate.leave_exclusive();
            })
        };
        // The exclusive holder announces itself, then waits for our shared entry.
        while gate.state.load(Ordering::SeqCst) & EXCLUSIVE == 0 {
            std::thread::yield_now();
        }
        assert!(
            !gate.try_enter_shared(),
            "shared must fail once exclusive waits"
        );
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !inside.load(Ordering::SeqCst),
            "exclusive ran beside a shared holder"
        );
        gate.leave_shared();
        // A blocking shared entry waits for the exclusive holder to finish.
        gate.enter_shared();
        assert!(!inside.load(Ordering::SeqCst));
        gate.leave_shared();
        t.join().unwrap();
        assert_eq!(gate.shared_holders(), 0);
        assert!(gate.try_enter_shared());
        gate.leave_shared();
    }
}
