//! The blkback engine: VBDs, rings, reactors, persistent grants.
