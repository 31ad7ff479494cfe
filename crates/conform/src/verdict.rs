//! What a case concludes, and the context it runs in.

use crate::target::{Target, TargetError};

/// A case that did not pass: why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The backend did not answer as specified (or the case could not complete).
    Fail(String),
    /// The case does not apply here (what the backend advertises, what the target
    /// can do).
    Skip(String),
}

impl Verdict {
    pub fn fail(why: impl Into<String>) -> Self {
        Verdict::Fail(why.into())
    }

    pub fn skip(why: impl Into<String>) -> Self {
        Verdict::Skip(why.into())
    }
}

/// A case's result: `Ok(())` passes.
pub type CaseResult = Result<(), Verdict>;

impl From<TargetError> for Verdict {
    fn from(e: TargetError) -> Self {
        match e {
            TargetError::Unsupported(s) => Verdict::Skip(s),
            TargetError::Failed(s) => Verdict::Fail(s),
        }
    }
}

macro_rules! failing {
    ($($t:ty => $what:literal),* $(,)?) => {
        $(impl From<$t> for Verdict {
            fn from(e: $t) -> Self {
                Verdict::Fail(format!(concat!($what, ": {}"), e))
            }
        })*
    };
}

failing!(
    blkfront::GuestError => "guest",
    blkif::RingError => "ring",
    xenstore::Error => "xenstore",
    std::io::Error => "i/o",
);

/// Where a case runs: the target, and what the case opened (released by the runner).
pub struct Ctx<'a> {
    pub target: &'a mut dyn Target,
    opened: Vec<(String, String)>,
    /// Which of the answers the expectation allows the backend gave (shown with a pass).
    note: Option<String>,
}

impl std::fmt::Debug for Ctx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx").field("opened", &self.opened).finish()
    }
}

impl<'a> Ctx<'a> {
    pub fn new(target: &'a mut dyn Target) -> Self {
        Ctx {
            target,
            opened: Vec::new(),
            note: None,
        }
    }

    /// Records which of several allowed answers the backend gave.
    pub fn note(&mut self, what: impl Into<String>) {
        self.note = Some(what.into());
    }

    /// The note, if any.
    pub fn take_note(&mut self) -> Option<String> {
        self.note.take()
    }

    /// Records a device the case opened.
    pub fn opened(&mut self, frontend: &str, backend: &str) {
        self.opened.push((frontend.to_owned(), backend.to_owned()));
    }

    /// Releases every device the case opened.
    pub fn release_all(&mut self) -> Result<(), TargetError> {
        let mut first_err = None;
        for (fe, be) in std::mem::take(&mut self.opened) {
            if let Err(e) = self.target.release_device(&fe, &be) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}
