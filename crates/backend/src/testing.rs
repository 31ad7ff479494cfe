//! Helpers for leak-checking tests of the engine and the layers around it.
//!
//! Tests that prove "teardown closes every fd it opened" compare this process's fd table
//! before and after. The table is process-wide, so two things must hold for the
//! comparison to mean anything:
//! * only one such test runs at a time ([`serial`]);
//! * no other thread opens a file meanwhile. The test harness runs each test on its own
//!   thread, and the thread of the *previous* test keeps running for a moment after it
//!   released the lock: it drops the test's output buffer, flushes its malloc cache and
//!   exits. Those frees can shrink a glibc arena heap, and the first time a process does
//!   that glibc opens `/proc/sys/vm/overcommit_memory` (`check_may_shrink_heap`). An fd
//!   opened by another thread in that instant made a leak check fail spuriously, so
//!   [`serial`] also waits until the previous holder's thread has exited.
//!
//! [`FdTable`] records what every fd points to, so a failing check says what leaked.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The lock: the thread id of the last holder.
static SERIAL: Mutex<Option<i32>> = Mutex::new(None);

/// How long [`serial`] waits for the previous holder's thread to exit.
const THREAD_EXIT_WAIT: Duration = Duration::from_secs(10);

/// Serialises fd-counting tests within a process; hold the guard for the whole test.
///
/// Returns once the previous holder's thread has exited, so nothing of the previous test
/// still runs when the next one snapshots the fd table.
pub fn serial() -> MutexGuard<'static, Option<i32>> {
    let mut guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let me = rustix::thread::gettid().as_raw_nonzero().get();
    let pid = std::process::id() as i32;
    if let Some(prev) = *guard {
        // The main thread never exits, and a thread re-taking the lock has no past self.
        if prev != me && prev != pid {
            let task = format!("/proc/self/task/{prev}");
            let deadline = Instant::now() + THREAD_EXIT_WAIT;
            while std::path::Path::new(&task).exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    *guard = Some(me);
    guard
}

/// An fd and what it points to (the target of its `/proc/self/fd` link).
pub type FdEntry = (i32, String);

/// This process's open file descriptors and what each points to.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FdTable(BTreeMap<i32, String>);

impl FdTable {
    /// The fds open now (the directory handle used to list them excluded).
    pub fn now() -> FdTable {
        let mut t = BTreeMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            for e in dir.flatten() {
                let Some(fd) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
                    continue;
                };
                // The listing's own fd is closed by the time the loop ends; fds that
                // vanish mid-listing do not count either.
                if let Ok(target) = std::fs::read_link(e.path()) {
                    t.insert(fd, target.display().to_string());
                }
            }
        }
        // The directory handle itself: listed, and gone now.
        t.retain(|&fd, target| {
            !(target.starts_with("/proc/") && target.ends_with("/fd") && is_closed(fd))
        });
        FdTable(t)
    }

    /// Number of fds.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Fds open now that were not in `self` (or now point elsewhere), and fds of `self`
    /// that are closed now.
    pub fn diff_now(&self) -> (Vec<FdEntry>, Vec<FdEntry>) {
        let now = FdTable::now();
        let opened = now
            .0
            .iter()
            .filter(|(k, v)| self.0.get(k) != Some(v))
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let closed = self
            .0
            .iter()
            .filter(|(k, v)| now.0.get(k) != Some(v))
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        (opened, closed)
    }

    /// Panics, naming the fds, unless exactly the fds of `self` are open now.
    pub fn assert_unchanged(&self, what: &str) {
        let (opened, closed) = self.diff_now();
        assert!(
            opened.is_empty() && closed.is_empty(),
            "{what}: fd table changed: opened since {opened:?}, closed since {closed:?}"
        );
    }
}

fn is_closed(fd: i32) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{fd}")).is_err()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_see_opened_and_closed_fds() {
        // Other unit tests of this binary open fds concurrently: look only at ours.
        let stat = |v: &[FdEntry]| {
            v.iter()
                .any(|(_, t)| t.starts_with("/proc/") && t.ends_with("/stat"))
        };
        let before = FdTable::now();
        assert!(!before.is_empty());
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        let (opened, _) = before.diff_now();
        assert!(stat(&opened), "{opened:?}");
        drop(f);
        let (opened, _) = before.diff_now();
        assert!(!stat(&opened), "{opened:?}");
    }

    #[test]
    fn serial_is_reentrant_across_sequential_holders() {
        let start = Instant::now();
        std::thread::spawn(|| drop(serial())).join().unwrap();
        // The previous holder has exited: no wait; then this thread again: no wait.
        std::thread::spawn(|| {
            drop(serial());
            drop(serial());
        })
        .join()
        .unwrap();
        assert!(start.elapsed() < THREAD_EXIT_WAIT);
    }

    #[test]
    fn serial_waits_for_the_previous_test_thread_to_finish() {
        // The flake this fixes: the previous test's thread, after releasing the lock,
        // briefly holds an fd (glibc reading overcommit_memory while it frees memory)
        // just as the next test snapshots the fd table.
        // A path with no fd of ours open on it.
        let file = tempfile::NamedTempFile::new().unwrap().into_temp_path();
        let path = file.to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        let previous = std::thread::spawn(move || {
            drop(serial());
            let f = std::fs::File::open(&path).unwrap();
            tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            drop(f);
        });
        rx.recv().unwrap();
        let _g = serial();
        let name = file.display().to_string();
        assert!(
            !FdTable::now().0.values().any(|t| *t == name),
            "the previous test thread still held its fd"
        );
        previous.join().unwrap();
    }
}
