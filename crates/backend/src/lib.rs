//! The blkback engine: VBDs, their rings, the reactors that run them, the
//! persistent-grant cache, request pipeline, completion, barrier drain, resize and
//! statistics.

pub mod persistent_grants;
