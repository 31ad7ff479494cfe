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
//! | [`xenbus_state`] | [`XenbusState`], the `state` node of split drivers (xenbus.h) |
//! | [`server`] | [`XenstoreServer`]: node tree, permissions, watches, transactions, quotas |
//!
//! This crate knows nothing about block devices.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use xenstore::{Access, Perm, XenstoreServer, XsClient, XsOps};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let server = XenstoreServer::default();
//! server.listen_as(0, dir.path().join("dom0.sock"))?; // the toolstack / backend
//! server.listen_as(5, dir.path().join("dom5.sock"))?; // a guest
//!
//! let dom0 = XsClient::connect_unix(dir.path().join("dom0.sock"))?;
//! dom0.mkdir("/local/domain/5")?;
//! dom0.set_perms("/local/domain/5", &[Perm::new(5, Access::None)])?;
//!
//! // The daemon's control thread: watch, then wait for events.
//! let events = dom0.watch_events(); // also `AsFd`, for poll/epoll loops
//! dom0.watch("/local/domain/5/device", "vbd")?;
//! assert_eq!(events.recv_timeout(Duration::from_secs(5))?.path, "/local/domain/5/device"); // initial fire
//!
//! // The guest writes under its home, relative paths allowed, atomically.
//! let guest = XsClient::connect_unix(dir.path().join("dom5.sock"))?;
//! guest.transaction(|tx| {
//!     tx.write("device/vbd/51712/state", "1")?;
//!     tx.write("device/vbd/51712/ring-ref", "8")
//! })?;
//! let ev = events.recv_timeout(Duration::from_secs(5))?;
//! assert!(ev.path.starts_with("/local/domain/5/device/vbd/51712/"));
//! assert_eq!(ev.token, "vbd");
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod error;
pub mod perms;
pub mod server;
pub mod wire;
pub mod xenbus_state;

pub use client::{
    ClientConfig, Transaction, Transport, WatchEvent, WatchEvents, XsClient, XsOps,
    DEFAULT_SOCKET_PATH, DEFAULT_XENBUS_DEVICE,
};
pub use error::{Errno, Error, ProtocolError, Result};
pub use perms::{Access, Perm};
pub use server::{ConnectionStats, ServerConfig, XenstoreServer};
pub use xenbus_state::XenbusState;
