//! Device lifecycle over xenstore: the XenbusState machine and feature negotiation of a
//! userspace Xen PV block backend.
//!
//! This crate does what Linux's `drivers/block/xen-blkback/xenbus.c` (and the generic
//! `xenbus_probe_backend.c`) do: it watches `backend/<type>/` under our domain's home for
//! the backend types it serves, reacts to devices appearing and disappearing, publishes
//! what we offer, reads what the frontend chose, and creates and tears down VBDs through
//! the engine behind [`vbd::VbdFactory`]. It never touches ring memory.
//!
//! | module | owns |
//! |---|---|
//! | [`manager`] | the control loop: watches, the device table, events, shutdown, status |
//! | [`device`] | one device's state machine: a phase enum matched with the frontend's state |
//! | [`event`] | what reaches the control loop, and the worker threads that report there |
//! | [`negotiate`] | reading toolstack/frontend nodes, publishing ours (pure functions) |
//! | [`vbd`] | the engine seam: [`vbd::VbdFactory`], [`vbd::ConnectedVbd`], the types they exchange |
//! | [`toolstack`] | writing/removing device nodes the way libxl does (for `xenblkd attach`, tests) |
//! | [`config`] | daemon and per-device settings (TOML) |
//! | [`qos`] | per-device and per-group I/O limits as configured and changed live |
//! | [`devmodel`] | device-model claims: which domains' `qdisk` devices are ours to serve |
//! | [`store`] | the narrow xenstore interface the above are written against |
//! | [`xs`] | [`store::Store`] over the `xenstore` crate's client, and its watch forwarder |
//! | [`memstore`] | an in-memory [`store::Store`] for unit tests |
//! | [`status`] | the JSON status snapshot and control protocol types |
//! | [`ratelimit`] | per-device limits on the warnings a guest can cause at will |
//! | [`parse`], [`state`], [`vdev`] | strict value parsers, XenbusState, device names |

#![forbid(unsafe_code)]

pub mod config;
pub mod device;
pub mod devmodel;
pub mod error;
pub mod event;
pub mod manager;
pub mod memstore;
pub mod negotiate;
pub mod parse;
pub mod qos;
pub mod ratelimit;
pub mod state;
pub mod status;
pub mod store;
pub mod toolstack;
pub mod vbd;
pub mod vdev;
pub mod xs;

pub use device::DeviceKey;
pub use error::{ConfigError, DeviceError, Error, NegotiationError, Result, StoreError, VbdError};
pub use manager::{Event, EventSender, Manager};
pub use state::XenbusState;
