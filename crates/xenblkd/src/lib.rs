//! The parts of the xenblkd binary other crates reuse: the glue between the xenbus layer
//! and the engine ([`engine_glue`]) and the in-process simulated host ([`simhost`]: the
//! in-memory xenstored, the daemon's xenbus manager and engine on the simulated platform)
//! that `xenblkd demo` and the `conform` crate's simulator target run.

#![forbid(unsafe_code)]

pub mod engine_glue;
pub mod simhost;
