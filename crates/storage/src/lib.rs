//! Storage backends behind one trait: raw file/block device on io_uring, null.
