//! An in-process [`Store`] for unit tests of the state machine: a node tree with xenstore's
//! semantics where they matter to this crate (writes create parents, `rm` removes the
//! subtree, watches are recursive and fire once on registration, removal fires watches
//! registered below the removed node, transactions conflict with `EAGAIN`).
//!
//! It does not check permissions (it records them, so tests can assert them) and it
//! delivers watch events synchronously to one sink. End-to-end tests use the `xenstore`
//! crate's real server instead.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::StoreError;
use crate::store::{Perm, Store, StoreOps};

/// Receives watch events `(path, token)`.
pub type WatchSink = Box<dyn Fn(&str, &str) + Send + Sync>;

#[derive(Default)]
struct Inner {
    nodes: BTreeMap<String, Vec<u8>>,
    perms: BTreeMap<String, Vec<Perm>>,
    watches: Vec<(String, String)>,
    generation: u64,
    /// Commits to fail with EAGAIN before succeeding (for retry tests).
    forced_conflicts: u32,
    commits: u64,
    /// Writes and removals so far, per path (what "nothing was written" is checked on).
    changes: BTreeMap<String, u64>,
}

/// The in-memory store. Cheap to clone (shared state).
#[derive(Clone, Default)]
pub struct MemStore {
    inner: Arc<Mutex<Inner>>,
    sink: Arc<Mutex<Option<WatchSink>>>,
}

impl std::fmt::Debug for MemStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemStore").finish_non_exhaustive()
    }
}

fn parent(path: &str) -> Option<&str> {
    let idx = path.rfind('/')?;
    if idx == 0 {
        (path.len() > 1).then_some("/")
    } else {
        Some(&path[..idx])
    }
}

fn is_same_or_below(path: &str, dir: &str) -> bool {
    path == dir
        || (path.starts_with(dir)
            && (dir.ends_with('/') || path.as_bytes().get(dir.len()) == Some(&b'/')))
}

fn check_path(op: &'static str, path: &str) -> Result<(), StoreError> {
    let ok = !path.is_empty()
        && !path.contains('\0')
        && (path.starts_with('/') || path.starts_with('@'))
        && (path == "/" || !path.ends_with('/'))
        && !path.contains("//");
    if ok {
        Ok(())
    } else {
        Err(StoreError::Daemon {
            op,
            path: path.to_string(),
            errno: "EINVAL".into(),
        })
    }
}

impl MemStore {
    /// An empty store (just `/`).
    pub fn new() -> MemStore {
        let s = MemStore::default();
        s.lock().nodes.insert("/".into(), Vec::new());
        s
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets where watch events go (the manager's event sender in tests).
    pub fn set_watch_sink(&self, sink: WatchSink) {
        *self.sink.lock().unwrap_or_else(|p| p.into_inner()) = Some(sink);
    }

    /// Makes the next `n` transaction commits fail with `EAGAIN`.
    pub fn force_conflicts(&self, n: u32) {
        self.lock().forced_conflicts = n;
    }

    /// Number of successful transaction commits so far.
    pub fn commits(&self) -> u64 {
        self.lock().commits
    }

    /// Forgets every watch, as xenstored does for a connection that closed (a daemon
    /// that exited): the next daemon registers its own.
    pub fn drop_watches(&self) {
        self.lock().watches.clear();
    }

    /// Writes and removals so far of `dir` and every node below it (`@` paths included).
    pub fn changes_below(&self, dir: &str) -> u64 {
        self.lock()
            .changes
            .iter()
            .filter(|(p, _)| is_same_or_below(p, dir))
            .map(|(_, n)| n)
            .sum()
    }

    /// The permissions last set on `path`.
    pub fn perms(&self, path: &str) -> Option<Vec<Perm>> {
        self.lock().perms.get(path).cloned()
    }

    /// Every node below (and including) `dir`, for test diagnostics.
    pub fn dump(&self, dir: &str) -> Vec<(String, String)> {
        self.lock()
            .nodes
            .iter()
            .filter(|(p, _)| is_same_or_below(p, dir))
            .map(|(p, v)| (p.clone(), String::from_utf8_lossy(v).into_owned()))
            .collect()
    }

    /// Fires `@releaseDomain` (what xenstored does when a domain dies).
    pub fn release_domain(&self) {
        *self
            .lock()
            .changes
            .entry("@releaseDomain".to_string())
            .or_default() += 1;
        self.fire("@releaseDomain", false);
    }

    /// Collects the watch events a change of `path` causes and delivers them.
    fn fire(&self, path: &str, removal: bool) {
        let events: Vec<(String, String)> = {
            let inner = self.lock();
            inner
                .watches
                .iter()
                .filter_map(|(wpath, token)| {
                    if is_same_or_below(path, wpath) {
                        Some((path.to_string(), token.clone()))
                    } else if removal && is_same_or_below(wpath, path) {
                        // xenstored: removing a node fires watches registered below it,
                        // reporting the watched path.
                        Some((wpath.clone(), token.clone()))
                    } else {
                        None
                    }
                })
                .collect()
        };
        let sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sink) = sink.as_ref() {
            for (p, t) in events {
                sink(&p, &t);
            }
        }
    }

    /// Applies one operation to the locked tree and returns the changes to fire.
    /// Changes are counted here, under the same lock as the change itself: a reader who
    /// sees a committed node also sees it counted (counting while firing, after the lock
    /// was dropped, let a test read a half-counted transaction).
    fn apply(inner: &mut Inner, op: &Op) -> Vec<(String, bool)> {
        inner.generation += 1;
        let fired = Self::apply_uncounted(inner, op);
        for (path, _) in &fired {
            *inner.changes.entry(path.clone()).or_default() += 1;
        }
        fired
    }

    fn apply_uncounted(inner: &mut Inner, op: &Op) -> Vec<(String, bool)> {
        match op {
            Op::Write(path, value) => {
                let mut fired = Vec::new();
                let mut p = parent(path);
                while let Some(dir) = p {
                    if !inner.nodes.contains_key(dir) {
                        inner.nodes.insert(dir.to_string(), Vec::new());
                        fired.push((dir.to_string(), false));
                    }
                    p = parent(dir);
                }
                inner.nodes.insert(path.clone(), value.clone());
                fired.push((path.clone(), false));
                fired
            }
            Op::Mkdir(path) => {
                if inner.nodes.contains_key(path.as_str()) {
                    return Vec::new();
                }
                Self::apply_uncounted(inner, &Op::Write(path.clone(), Vec::new()))
            }
            Op::Rm(path) => {
                let doomed: Vec<String> = inner
                    .nodes
                    .keys()
                    .filter(|p| is_same_or_below(p, path))
                    .cloned()
                    .collect();
                if doomed.is_empty() {
                    return Vec::new();
                }
                for p in &doomed {
                    inner.nodes.remove(p);
                    inner.perms.remove(p);
                }
                vec![(path.clone(), true)]
            }
            Op::Perms(path, perms) => {
                inner.perms.insert(path.clone(), perms.clone());
                vec![(path.clone(), false)]
            }
        }
    }

    /// Applies operations atomically (no reader sees a partial set), then fires watches.
    fn run_all(&self, ops: &[Op]) -> Result<(), StoreError> {
        let fired: Vec<(String, bool)> = {
            let mut inner = self.lock();
            ops.iter()
                .flat_map(|op| Self::apply(&mut inner, op))
                .collect()
        };
        for (path, removal) in fired {
            self.fire(&path, removal);
        }
        Ok(())
    }

    fn run(&self, op: Op) -> Result<(), StoreError> {
        self.run_all(std::slice::from_ref(&op))
    }
}

enum Op {
    Write(String, Vec<u8>),
    Mkdir(String),
    Rm(String),
    Perms(String, Vec<Perm>),
}

impl StoreOps for MemStore {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, StoreError> {
        check_path("read", path)?;
        Ok(self.lock().nodes.get(path).cloned())
    }

    fn write(&self, path: &str, value: &[u8]) -> Result<(), StoreError> {
        check_path("write", path)?;
        self.run(Op::Write(path.into(), value.to_vec()))
    }

    fn mkdir(&self, path: &str) -> Result<(), StoreError> {
        check_path("mkdir", path)?;
        self.run(Op::Mkdir(path.into()))
    }

    fn rm(&self, path: &str) -> Result<(), StoreError> {
        check_path("rm", path)?;
        self.run(Op::Rm(path.into()))
    }

    fn directory(&self, path: &str) -> Result<Option<Vec<String>>, StoreError> {
        check_path("directory", path)?;
        let inner = self.lock();
        if !inner.nodes.contains_key(path) {
            return Ok(None);
        }
        let prefix = if path == "/" {
            "/".to_string()
        } else {
            format!("{path}/")
        };
        Ok(Some(
            inner
                .nodes
                .range(prefix.clone()..)
                .take_while(|(p, _)| p.starts_with(&prefix))
                .filter(|(p, _)| !p[prefix.len()..].contains('/') && p.len() > prefix.len())
                .map(|(p, _)| p[prefix.len()..].to_string())
                .collect(),
        ))
    }

    fn set_perms(&self, path: &str, perms: &[Perm]) -> Result<(), StoreError> {
        check_path("set_perms", path)?;
        if !self.lock().nodes.contains_key(path) {
            return Err(StoreError::Daemon {
                op: "set_perms",
                path: path.into(),
                errno: "ENOENT".into(),
            });
        }
        self.run(Op::Perms(path.into(), perms.to_vec()))
    }
}

/// A transaction: reads see the store plus the transaction's own pending changes (a
/// simplification that suffices here); commits conflict if anything changed meanwhile.
struct MemTx<'a> {
    store: &'a MemStore,
    ops: Mutex<Vec<Op>>,
}

impl MemTx<'_> {
    fn pending(&self) -> MutexGuard<'_, Vec<Op>> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl StoreOps for MemTx<'_> {
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut value = self.store.read(path)?;
        for op in self.pending().iter() {
            match op {
                Op::Write(p, v) if p == path => value = Some(v.clone()),
                Op::Mkdir(p) if p == path && value.is_none() => value = Some(Vec::new()),
                Op::Rm(p) if is_same_or_below(path, p) => value = None,
                _ => {}
            }
        }
        Ok(value)
    }

    fn write(&self, path: &str, value: &[u8]) -> Result<(), StoreError> {
        check_path("write", path)?;
        self.pending().push(Op::Write(path.into(), value.to_vec()));
        Ok(())
    }

    fn mkdir(&self, path: &str) -> Result<(), StoreError> {
        check_path("mkdir", path)?;
        self.pending().push(Op::Mkdir(path.into()));
        Ok(())
    }

    fn rm(&self, path: &str) -> Result<(), StoreError> {
        check_path("rm", path)?;
        self.pending().push(Op::Rm(path.into()));
        Ok(())
    }

    fn directory(&self, path: &str) -> Result<Option<Vec<String>>, StoreError> {
        // Pending changes are not reflected; this crate lists directories only outside
        // transactions.
        self.store.directory(path)
    }

    fn set_perms(&self, path: &str, perms: &[Perm]) -> Result<(), StoreError> {
        check_path("set_perms", path)?;
        self.pending().push(Op::Perms(path.into(), perms.to_vec()));
        Ok(())
    }
}

/// Retries before a transaction gives up, as the real client does.
const TX_RETRIES: u32 = 32;

impl Store for MemStore {
    fn watch(&self, path: &str, token: &str) -> Result<(), StoreError> {
        check_path("watch", path)?;
        {
            let mut inner = self.lock();
            if inner.watches.iter().any(|(p, t)| p == path && t == token) {
                return Err(StoreError::Daemon {
                    op: "watch",
                    path: path.into(),
                    errno: "EEXIST".into(),
                });
            }
            inner.watches.push((path.into(), token.into()));
        }
        // Like xenstored, fire once on registration.
        let sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sink) = sink.as_ref() {
            sink(path, token);
        }
        Ok(())
    }

    fn unwatch(&self, path: &str, token: &str) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let before = inner.watches.len();
        inner.watches.retain(|(p, t)| !(p == path && t == token));
        if inner.watches.len() == before {
            return Err(StoreError::Daemon {
                op: "unwatch",
                path: path.into(),
                errno: "ENOENT".into(),
            });
        }
        Ok(())
    }

    fn transaction(
        &self,
        f: &mut dyn FnMut(&dyn StoreOps) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        for _ in 0..=TX_RETRIES {
            let start = self.lock().generation;
            let tx = MemTx {
                store: self,
                ops: Mutex::new(Vec::new()),
            };
            f(&tx)?;
            let ops = std::mem::take(&mut *tx.pending());
            let fired: Vec<(String, bool)> = {
                let mut inner = self.lock();
                if inner.forced_conflicts > 0 {
                    inner.forced_conflicts -= 1;
                    continue;
                }
                if inner.generation != start {
                    continue;
                }
                inner.commits += 1;
                // Atomic, as a real commit: no reader sees half of the transaction.
                ops.iter()
                    .flat_map(|op| Self::apply(&mut inner, op))
                    .collect()
            };
            for (path, removal) in fired {
                self.fire(&path, removal);
            }
            return Ok(());
        }
        Err(StoreError::Conflict(TX_RETRIES + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Access, StoreExt};

    #[test]
    fn tree_semantics() {
        let s = MemStore::new();
        s.write("/a/b/c", b"1").unwrap();
        assert_eq!(s.read("/a/b").unwrap(), Some(vec![]));
        assert_eq!(s.directory("/a").unwrap(), Some(vec!["b".to_string()]));
        assert_eq!(s.directory("/").unwrap(), Some(vec!["a".to_string()]));
        s.write("/a/bb", b"2").unwrap();
        assert_eq!(s.directory("/a").unwrap().unwrap(), vec!["b", "bb"]);
        s.rm("/a/b").unwrap();
        assert_eq!(s.read("/a/b/c").unwrap(), None);
        assert_eq!(s.read_string("/a/bb").unwrap().as_deref(), Some("2"));
        assert_eq!(s.directory("/zz").unwrap(), None);
        assert!(s.read("relative").is_err());
        s.set_perms("/a", &[Perm::new(0, Access::None)]).unwrap();
        assert_eq!(s.perms("/a").unwrap()[0].domid, 0);
    }

    #[test]
    fn watches_fire_on_change_and_removal() {
        let s = MemStore::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        s.set_watch_sink(Box::new(move |p, t| {
            seen2.lock().unwrap().push((p.to_string(), t.to_string()))
        }));
        s.watch("/x/y/state", "t1").unwrap();
        s.watch("/x", "t2").unwrap();
        s.write("/x/y/state", b"1").unwrap();
        s.rm("/x").unwrap();
        let seen = seen.lock().unwrap().clone();
        assert!(seen.contains(&("/x/y/state".into(), "t1".into())));
        assert!(seen.contains(&("/x".into(), "t2".into())));
        assert!(
            seen.iter()
                .filter(|(p, t)| p == "/x/y/state" && t == "t1")
                .count()
                >= 3
        );
    }

    #[test]
    fn transactions_retry_conflicts() {
        let s = MemStore::new();
        s.force_conflicts(2);
        let mut runs = 0;
        s.transaction(&mut |tx| {
            runs += 1;
            tx.write("/k", b"v")
        })
        .unwrap();
        assert_eq!(runs, 3);
        assert_eq!(s.read("/k").unwrap(), Some(b"v".to_vec()));
        s.force_conflicts(100);
        assert!(matches!(
            s.transaction(&mut |tx| tx.write("/k", b"w")),
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(s.read("/k").unwrap(), Some(b"v".to_vec()));
    }
}
