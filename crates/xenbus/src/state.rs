//! `XenbusState`, defined once in the `xenstore` crate (the lowest layer both this crate
//! and blkfront build on) and re-exported here.

pub use xenstore::XenbusState;
