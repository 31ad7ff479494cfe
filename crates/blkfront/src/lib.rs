//! A simulated xen-blkfront: the guest side of the Xen PV block protocol, over the simulator.
//!
//! Tests, the demo and the benchmark drive the backend through this crate exactly as a Linux
//! guest's `drivers/block/xen-blkfront.c` would: it negotiates features, puts requests on
//! shared rings, grants pages, validates every response (the backend is untrusted from the
//! guest's side too) and ends grant access on completion.

pub mod config;
pub mod error;
pub mod features;
pub mod frontend;
pub mod guest;
pub mod layout;
pub mod queue;
pub mod shadow;
pub mod sim;
pub mod xenbus;

pub use config::{BufferPlacement, FlushPreference, FrontendConfig, Protocol, QueuePolicy};
pub use error::{Error, IoError, TeardownReport};
pub use features::{BackendFeatures, CacheControl, DiscardParams, DiskInfo, Negotiated};
pub use frontend::{ConnectInfo, Frontend, QueueConnectInfo};
pub use guest::{EndAccessError, Guest, GuestError, GuestEventChannel};
pub use queue::{Completion, FrontendStats, IoOp};
pub use xenbus::{XenbusFrontend, XenbusState};
