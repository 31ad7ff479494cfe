//! A simulated xen-blkfront: the guest side of the Xen PV block protocol, over the simulator.
//!
//! Tests, the demo and the benchmark drive the backend through this crate exactly as a
//! Linux guest's `drivers/block/xen-blkfront.c` would: it negotiates features, puts
//! requests on shared rings, grants pages, validates every response (the backend is
//! untrusted from the guest's side too) and ends grant access on completion.
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | [`FrontendConfig`]: what the frontend offers (Linux's module parameters) and odd behaviours for tests |
//! | [`features`] | negotiation: queues, ring order, persistent grants, indirect segments, flush vs barrier, discard, disk geometry |
//! | [`layout`] | request geometry: segments per request, indirect pages, pool bounds, splitting an I/O into chunks |
//! | [`shadow`] | the shadow id table with its free list (`shadow[]`) |
//! | [`queue`] | one ring: grants (persistent pool or per request), request encoding, response validation, completion, teardown |
//! | [`frontend`] | [`Frontend`]: block-layer checks, queue choice, sync and async APIs, the direct connection ([`ConnectInfo`]) |
//! | [`xenbus`] | [`XenbusFrontend`]: the xenstore handshake, resize, close, reconnect |
//! | [`guest`] | the [`Guest`] seam: memory, grants, event channels of the guest kernel |
//! | [`sim`] | [`Guest`] over the simulator's [`platform::sim::SimGuest`] |
//! | [`workload`] | a verified random read/write workload with several requests in flight, reporting slow requests (for restart tests and the restart benchmark) |
//! | [`load`] | an unverified load at a fixed depth, counting completed requests and errors (for throughput and fairness across many disks) |
//!
//! Direct connection, for engine tests (the test starts the engine with the returned
//! [`ConnectInfo`]: ring grant references and event channel per queue, protocol,
//! persistent flag):
//!
//! ```text
//! let services = Arc::new(SimGuestServices::new(Arc::new(sim_guest)));
//! let (fe, info) = Frontend::connect_direct(services, FrontendConfig::default(), &backend_features)?;
//! engine.attach(VbdSpec { rings: /* from info.queues */, protocol: info.protocol, persistent: info.persistent, .. })?;
//! fe.write(0, &data)?;
//! fe.read(0, &mut buf)?;
//! // stop the engine, then:
//! assert!(fe.close().is_clean());
//! ```
//!
//! Over xenstore, [`XenbusFrontend::connect`] follows the state machine from the frontend
//! directory's `backend` node and keeps following the backend afterwards.

#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod features;
pub mod frontend;
pub mod guest;
pub mod layout;
pub mod load;
pub mod queue;
pub mod shadow;
pub mod sim;
pub mod workload;
pub mod xenbus;

pub use config::{BufferPlacement, FlushPreference, FrontendConfig, Protocol, QueuePolicy};
pub use error::{Error, IoError, TeardownReport};
pub use features::{BackendFeatures, CacheControl, DiscardParams, DiskInfo, Negotiated};
pub use frontend::{Batch, ConnectInfo, Frontend, QueueConnectInfo};
pub use guest::{EndAccessError, Guest, GuestError, GuestEventChannel};
pub use queue::{Completion, FrontendStats, IoOp, ReadData, WriteData};
pub use xenbus::{XenbusFrontend, XenbusState};
