//! blkif-conform: a conformance and hostile-frontend suite for Xen PV block backends.
//!
//! The same cases run against xenblkd on the simulator (in this process) and against any
//! backend on real Xen (from inside a domU, on a vbd the toolstack attached).
//!
//! | module | owns |
//! |---|---|
//! | [`target`] | the backend-under-test seam ([`target::Target`]) |
//! | [`sim`] | xenblkd on the simulator (`xenblkd::simhost`) |
//! | [`xen`] | real Xen: gntalloc, evtchn, xenbus from a domU |
//! | [`front`] | [`front::RawFront`], a frontend whose every step a case controls |
//! | [`cases`] | the catalogue |
//! | [`runner`] | running, the liveness probe, leak checks, reports |

#![forbid(unsafe_code)]

pub mod cases;
pub mod front;
pub mod runner;
pub mod sim;
pub mod target;
pub mod verdict;
pub mod xen;

pub use cases::{catalogue, Case};
pub use runner::{run, CaseReport, Outcome, Summary};
pub use target::Target;
