//! The xenstore layer of xenblkd: the wire protocol of Xen's
//! `xen/io/xs_wire.h`, a blocking thread-safe client ([`XsClient`]) with
//! transactions and watches, and an in-memory server ([`XenstoreServer`])
//! that speaks the same protocol over unix sockets, so the daemon's xenstore
//! code is identical on real Xen and in the simulator.
//!
//! | module | owns |
//! |---|---|
//! | [`wire`] | message types, the 16-byte header, limits, the bounded decoder |
//! | [`error`] | [`Errno`] (the daemon's error strings) and the client [`Error`] |
//! | [`perms`] | Xen's permission model ([`Perm`], [`Access`]) |
//! | [`client`] | [`XsClient`], [`Transaction`], [`XsOps`], [`WatchEvents`], transports |
//! | [`server`] | [`XenstoreServer`]: node tree, permissions, watches, transactions, quotas |
//!
//! This crate knows nothing about block devices.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod error;
pub mod perms;
pub mod server;
pub mod wire;

pub use client::{
    ClientConfig, Transaction, Transport, WatchEvent, WatchEvents, XsClient, XsOps,
    DEFAULT_SOCKET_PATH, DEFAULT_XENBUS_DEVICE,
};
pub use error::{Errno, Error, ProtocolError, Result};
pub use perms::{Access, Perm};
pub use server::{ConnectionStats, ServerConfig, XenstoreServer};
