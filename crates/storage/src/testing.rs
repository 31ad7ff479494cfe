//! Fault injection for tests (feature `testing`): a [`Storage`] wrapper that makes chosen
//! operations fail, so the engine's tests can show that a storage error fails only its own
//! request.
//!
//! Rules are matched in order at submission. A matching [`FaultKind::Error`] never reaches
//! the wrapped storage: its completion (the error) is delivered by the next `reap` after
//! the next `commit`, through the wrapped queue's completion eventfd, like a real one. A
//! matching [`FaultKind::Short`] performs the real I/O and then reports fewer bytes than
//! requested — a contract violation a defensive engine must turn into an error.
//!
//! ```
//! use std::sync::Arc;
//! use storage::testing::{FaultInjector, FaultKind, FaultRule, FaultyStorage};
//! use storage::{NullConfig, NullStorage, OpKind};
//!
//! let injector = FaultInjector::new();
//! injector.add(FaultRule::once(OpKind::Write, FaultKind::Error(libc::ENOSPC)));
//! let inner = Arc::new(NullStorage::new(NullConfig::default()).unwrap());
//! let storage = FaultyStorage::new(inner, injector.clone());
//! # let _ = storage;
//! ```

use std::collections::HashMap;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};

use crate::{
    Completion, OpKind, Storage, StorageError, StorageInfo, StorageOp, StorageQueue, SubmitError,
};

/// What happens to a matching operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Complete with this errno (e.g. `libc::EIO`, `libc::ENOSPC`) without doing the I/O.
    Error(i32),
    /// Do the I/O, then report at most this many bytes transferred.
    Short { bytes: u64 },
}

/// One fault-injection rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultRule {
    /// Operation kind to match; `None` matches every kind.
    pub op: Option<OpKind>,
    /// Only operations whose byte range contains this offset (reads, writes, discards).
    pub offset: Option<u64>,
    /// Let this many matching operations through before injecting.
    pub skip: u32,
    /// Inject this many times, then stop matching; `None` for ever.
    pub times: Option<u32>,
    pub fault: FaultKind,
}

impl FaultRule {
    /// Fails the next operation of kind `op`, once.
    pub fn once(op: OpKind, fault: FaultKind) -> Self {
        FaultRule {
            op: Some(op),
            offset: None,
            skip: 0,
            times: Some(1),
            fault,
        }
    }

    /// Fails every operation of kind `op`.
    pub fn always(op: OpKind, fault: FaultKind) -> Self {
        FaultRule {
            op: Some(op),
            offset: None,
            skip: 0,
            times: None,
            fault,
        }
    }

    /// Restricts the rule to operations covering `offset`.
    pub fn at_offset(mut self, offset: u64) -> Self {
        self.offset = Some(offset);
        self
    }

    fn matches(&self, kind: OpKind, range: Option<(u64, u64)>) -> bool {
        if self.op.is_some_and(|k| k != kind) {
            return false;
        }
        match (self.offset, range) {
            (None, _) => true,
            (Some(at), Some((start, len))) => at >= start && at - start < len,
            (Some(_), None) => false,
        }
    }
}

#[derive(Debug, Default)]
struct InjectorState {
    rules: Vec<FaultRule>,
    injected: u64,
}

/// A shared, mutable set of rules; clones share it, so a test can change faults while the
/// engine runs.
#[derive(Debug, Clone, Default)]
pub struct FaultInjector(Arc<Mutex<InjectorState>>);

impl FaultInjector {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&self, rule: FaultRule) {
        self.state().rules.push(rule);
    }

    pub fn clear(&self) {
        self.state().rules.clear();
    }

    /// How many faults have been injected so far.
    pub fn injected(&self) -> u64 {
        self.state().injected
    }

    fn state(&self) -> std::sync::MutexGuard<'_, InjectorState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fault for an operation, consuming the matching rule's budget.
    fn decide(&self, op: &StorageOp<'_>) -> Option<FaultKind> {
        let kind = op.kind();
        let range = match *op {
            StorageOp::Read { offset, iov } | StorageOp::Write { offset, iov, .. } => {
                Some((offset, iov.iter().map(|v| v.iov_len as u64).sum()))
            }
            StorageOp::Discard { offset, len, .. } => Some((offset, len)),
            StorageOp::Flush => None,
        };
        let mut state = self.state();
        let rule = state
            .rules
            .iter_mut()
            .find(|r| r.times != Some(0) && r.matches(kind, range))?;
        if rule.skip > 0 {
            rule.skip -= 1;
            return None;
        }
        if let Some(t) = rule.times.as_mut() {
            *t -= 1;
        }
        let fault = rule.fault;
        state.injected += 1;
        Some(fault)
    }
}

/// Wraps a storage; its queues consult the injector on every submission.
pub struct FaultyStorage {
    inner: Arc<dyn Storage>,
    injector: FaultInjector,
}

impl std::fmt::Debug for FaultyStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultyStorage")
            .field("info", &self.inner.info())
            .finish_non_exhaustive()
    }
}

impl FaultyStorage {
    pub fn new(inner: Arc<dyn Storage>, injector: FaultInjector) -> Self {
        FaultyStorage { inner, injector }
    }
}

impl Storage for FaultyStorage {
    fn info(&self) -> StorageInfo {
        self.inner.info()
    }

    fn refresh_size(&self) -> io::Result<u64> {
        self.inner.refresh_size()
    }

    fn open_queue(&self, depth: u32) -> Result<Box<dyn StorageQueue>, StorageError> {
        Ok(Box::new(FaultyQueue {
            inner: self.inner.open_queue(depth)?,
            injector: self.injector.clone(),
            queued: Vec::new(),
            ready: Vec::new(),
            short: HashMap::new(),
        }))
    }
}

struct FaultyQueue {
    inner: Box<dyn StorageQueue>,
    injector: FaultInjector,
    /// Injected failures submitted, not yet committed.
    queued: Vec<(u64, i32)>,
    /// Injected failures committed, not yet reaped.
    ready: Vec<(u64, i32)>,
    /// Tags whose completion is to be reported short, and the cap.
    short: HashMap<u64, u64>,
}

impl StorageQueue for FaultyQueue {
    unsafe fn submit(&mut self, op: StorageOp<'_>, tag: u64) -> Result<(), SubmitError> {
        if self.in_flight() >= self.inner.depth() {
            return Err(SubmitError::Full);
        }
        match self.injector.decide(&op) {
            Some(FaultKind::Error(errno)) => {
                tracing::debug!(tag, errno, op = %op.kind(), "injecting storage error");
                self.queued.push((tag, errno));
                Ok(())
            }
            Some(FaultKind::Short { bytes }) => {
                // SAFETY: forwarded unchanged; our caller gave the same guarantees.
                unsafe { self.inner.submit(op, tag) }?;
                self.short.insert(tag, bytes);
                Ok(())
            }
            // SAFETY: forwarded unchanged; our caller gave the same guarantees.
            None => unsafe { self.inner.submit(op, tag) },
        }
    }

    fn commit(&mut self) -> io::Result<()> {
        if !self.queued.is_empty() {
            self.ready.append(&mut self.queued);
            // So the reactor comes to reap the injected completions.
            self.inner.wake()?;
        }
        self.inner.commit()
    }

    fn completion_fd(&self) -> BorrowedFd<'_> {
        self.inner.completion_fd()
    }

    fn wake(&self) -> io::Result<()> {
        self.inner.wake()
    }

    fn reap(&mut self, f: Completion<'_>) -> usize {
        let short = &mut self.short;
        let mut n = self.inner.reap(&mut |tag, res| {
            let res = match (short.remove(&tag), res) {
                (Some(cap), Ok(bytes)) => Ok(bytes.min(cap)),
                (_, res) => res,
            };
            f(tag, res)
        });
        for (tag, errno) in self.ready.drain(..) {
            f(tag, Err(io::Error::from_raw_os_error(errno)));
            n += 1;
        }
        n
    }

    fn in_flight(&self) -> u32 {
        let held = u32::try_from(self.queued.len() + self.ready.len()).unwrap_or(u32::MAX);
        self.inner.in_flight().saturating_add(held)
    }

    fn depth(&self) -> u32 {
        self.inner.depth()
    }
}
