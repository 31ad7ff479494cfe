//! The blkback engine: VBDs, their rings, the reactors that run them, the
//! persistent-grant cache, request pipeline, completion, barrier drain, resize and
//! statistics.

pub mod bounce;
pub mod persistent_grants;
mod reactor;
mod slots;
pub mod stats;
mod sys;

pub use reactor::VbdId;
pub use stats::{Stats, VbdStats};
pub use sys::open_fd_count;
