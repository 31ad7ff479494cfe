//! Runs cases against a target and reports them.
//!
//! A case passes when its own checks pass (the backend answered as blkif.h and Linux
//! blkback specify), the backend then still serves a fresh connection (a probe: connect,
//! write a page, read it back), and, where the target can see them, the backend holds
//! no grant mapping and no bound event channel once every device is gone.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use blkif::abi::{BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_OKAY};
use blkif::RawRequest;

use crate::cases::Case;
use crate::front::{page_segs, pattern, RawFront, Setup};
use crate::target::{DeviceRequest, Target};
use crate::verdict::{CaseResult, Ctx, Verdict};

/// One case's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Outcome {
    Pass,
    Fail,
    Skip,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "PASS",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "SKIP",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaseReport {
    pub name: String,
    pub group: String,
    pub source: String,
    pub outcome: Outcome,
    pub reason: Option<String>,
    pub millis: u64,
}

impl CaseReport {
    /// `PASS|FAIL|SKIP name (reason)`.
    pub fn line(&self) -> String {
        match &self.reason {
            Some(r) => format!("{} {} ({r})", self.outcome.as_str(), self.name),
            None => format!("{} {}", self.outcome.as_str(), self.name),
        }
    }
}

/// The whole run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    pub target: String,
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    pub cases: Vec<CaseReport>,
}

impl Summary {
    /// `N passed, N failed, N skipped`.
    pub fn line(&self) -> String {
        format!(
            "{} passed, {} failed, {} skipped",
            self.passed, self.failed, self.skipped
        )
    }
}

/// True if `name` matches the filter: comma-separated patterns, each a substring or,
/// with `*`, a glob over the whole name.
pub fn matches(filter: Option<&str>, name: &str) -> bool {
    let Some(f) = filter else { return true };
    f.split(',').filter(|p| !p.is_empty()).any(|p| {
        if p.contains('*') {
            glob(p.as_bytes(), name.as_bytes())
        } else {
            name.contains(p)
        }
    })
}

fn glob(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => glob(&p[1..], s) || (!s.is_empty() && glob(p, &s[1..])),
        (Some(a), Some(b)) if a == b => glob(&p[1..], &s[1..]),
        _ => false,
    }
}

/// Runs the cases `filter` selects, calling `each` after every case.
pub fn run(
    target: &mut dyn Target,
    cases: &[Case],
    filter: Option<&str>,
    mut each: impl FnMut(&CaseReport),
) -> Summary {
    let mut summary = Summary {
        target: target.name(),
        ..Summary::default()
    };
    for case in cases.iter().filter(|c| matches(filter, &c.name)) {
        let started = Instant::now();
        let result = run_one(target, case);
        let (outcome, reason) = match result {
            Ok(note) => (Outcome::Pass, note),
            Err(Verdict::Skip(r)) => (Outcome::Skip, Some(r)),
            Err(Verdict::Fail(r)) => (Outcome::Fail, Some(r)),
        };
        match outcome {
            Outcome::Pass => summary.passed += 1,
            Outcome::Fail => summary.failed += 1,
            Outcome::Skip => summary.skipped += 1,
        }
        let report = CaseReport {
            name: case.name.clone(),
            group: case.group.to_string(),
            source: case.source.to_string(),
            outcome,
            reason,
            millis: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        };
        each(&report);
        summary.cases.push(report);
    }
    summary
}

/// Runs one case, then the probe and the leak check; a pass may carry a note.
fn run_one(target: &mut dyn Target, case: &Case) -> Result<Option<String>, Verdict> {
    let mut ctx = Ctx::new(target);
    let result = catch_unwind(AssertUnwindSafe(|| (case.run)(&mut ctx)))
        .unwrap_or_else(|_| Err(Verdict::fail("the case panicked")));
    let note = ctx.take_note();
    let released = ctx.release_all();
    if let Err(Verdict::Skip(r)) = result {
        return Err(Verdict::Skip(r));
    }
    result?;
    released.map_err(|e| Verdict::fail(format!("releasing the device: {e}")))?;
    probe(target).map_err(|e| match e {
        Verdict::Fail(r) | Verdict::Skip(r) => Verdict::fail(format!(
            "backend did not stay up: a fresh connection failed: {r}"
        )),
    })?;
    if let Some(l) = target.leaks() {
        if !l.is_clean() {
            return Err(Verdict::fail(format!(
                "leaked after every device was removed: {} grant mapping(s), {} bound event channel(s)",
                l.grant_mappings, l.event_channels
            )));
        }
    }
    Ok(note)
}

/// A fresh connection still works: connect, write a page, read it back.
pub fn probe(target: &mut dyn Target) -> CaseResult {
    let mut ctx = Ctx::new(target);
    let result = probe_io(&mut ctx);
    let released = ctx.release_all();
    result?;
    released.map_err(|e| Verdict::fail(format!("releasing the probe's device: {e}")))
}

fn probe_io(ctx: &mut Ctx<'_>) -> CaseResult {
    let mut f = RawFront::open(ctx, DeviceRequest::default())?;
    f.connect_ok(&Setup::default())?;
    let buf = f.buffer(1, false)?;
    let data = pattern(0x9e0b, 0);
    f.fill(&buf, |_| data.clone())?;
    let w = RawRequest::direct(BLKIF_OP_WRITE, 1, f.handle, 8, &page_segs(&buf.grefs))
        .ok_or_else(|| Verdict::fail("encoding"))?;
    f.expect(&w, BLKIF_RSP_OKAY)?;
    f.write_page(buf.frames[0], 0, &[0u8; 4096])?;
    let r = RawRequest::direct(BLKIF_OP_READ, 2, f.handle, 8, &page_segs(&buf.grefs))
        .ok_or_else(|| Verdict::fail("encoding"))?;
    f.expect(&r, BLKIF_RSP_OKAY)?;
    let mut back = vec![0u8; 4096];
    f.read_page(buf.frames[0], 0, &mut back)?;
    if back != data {
        return Err(Verdict::fail("probe read back other data"));
    }
    f.close()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        assert!(matches(None, "a.b"));
        assert!(matches(Some("neg"), "negotiation.ring-order-0"));
        assert!(!matches(Some("hostile"), "negotiation.ring-order-0"));
        assert!(!matches(Some("x,ring-order-*"), "negotiation.ring-order-0"));
        assert!(matches(
            Some("x,*.ring-order-*"),
            "negotiation.ring-order-0"
        ));
        assert!(matches(Some("*order-0"), "negotiation.ring-order-0"));
        assert!(!matches(Some("*order-1"), "negotiation.ring-order-0"));
    }

    #[test]
    fn lines() {
        let r = CaseReport {
            name: "a".into(),
            group: "g".into(),
            source: "s".into(),
            outcome: Outcome::Skip,
            reason: Some("why".into()),
            millis: 1,
        };
        assert_eq!(r.line(), "SKIP a (why)");
        let s = Summary {
            passed: 3,
            failed: 1,
            skipped: 2,
            ..Summary::default()
        };
        assert_eq!(s.line(), "3 passed, 1 failed, 2 skipped");
    }
}
