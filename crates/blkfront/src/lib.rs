//! A simulated xen-blkfront: the guest side of the Xen PV block protocol, over the simulator.
//!
//! Tests, the demo and the benchmark drive the backend through this crate exactly as a Linux
//! guest's `drivers/block/xen-blkfront.c` would: it negotiates features, puts requests on
//! shared rings, grants pages, validates every response (the backend is untrusted from the
//! guest's side too) and ends grant access on completion.

pub mod layout;
pub mod shadow;
