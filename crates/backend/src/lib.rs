//! The blkback engine: VBDs, their rings, the reactors that run them, the
//! persistent-grant cache, request pipeline, completion, barrier drain, resize and
//! statistics.
//!
//! Modules and what each owns:
//! - [`engine`]: the public API ([`Engine`], [`VbdHandle`]) and attach/detach;
//! - `reactor`: the threads, their io_uring event loop, adaptive polling, housekeeping
//!   and control channel;
//! - `ring`: one ring's request pipeline, split along a request's life: the pass loop
//!   (consume, publish, notify, halting) in `ring`, then `ring::indirect` (descriptor
//!   pages), `ring::acquire` (map, copy, bounce within the grant budget), `ring::pages`
//!   (what a request holds of its pages until completion), `ring::request` (slot,
//!   phases, storage operations) and `ring::lifecycle` (those steps in order);
//! - [`vbd`]: what a VBD is (spec, modes, limits, features) and the state its rings share;
//! - [`persistent_grants`]: blkback's persistent-grant cache and purge;
//! - [`grant_budget`]: the daemon-wide bound on grant mappings (VMAs: the process has
//!   `vm.max_map_count` of them; mapped pages: dom0's map-tracking table) and every
//!   guest's share of it;
//! - [`bounce`]: bounce buffers of the grant-copy data path;
//! - [`qos`]: per-VBD and per-group IOPS and bandwidth limits (token buckets), enforced
//!   by the rings with a reactor timer;
//! - `journal_file`: the file behind each ring's crash-recovery journal (`blkif::journal`);
//! - `slots`: the per-ring request slot pool;
//! - [`stats`]: run-time counters; [`latency`]: request latency histograms;
//! - `sys`: the io_uring event loop a reactor waits in (multishot polls, timed wait);
//! - [`testing`]: fd-leak checks for tests of this crate and the layers around it.

#![warn(clippy::cast_possible_truncation)]

pub mod bounce;
pub mod engine;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod grant_budget;
mod journal_file;
pub mod latency;
pub mod persistent_grants;
pub mod qos;
mod reactor;
mod ring;
mod slots;
pub mod stats;
mod sys;
pub mod testing;
pub mod vbd;

pub use engine::{AttachError, DetachError, Engine, EngineConfig, EngineError, VbdHandle};
pub use grant_budget::{BudgetSize, BudgetUsage, GuestBudget, MapBudget, MapCost, MapLimits};
pub use latency::{Latency, LatencyOp, OpLatency, LATENCY_BOUNDS_US};
pub use reactor::VbdId;
pub use stats::{ReactorStats, ReactorStatsReader, Stats, VbdStats};
pub use sys::open_fd_count;
pub use vbd::{
    EventCallback, Features, GrantMode, JournalSpec, QosSpec, ResolvedGrantMode, RingSpec,
    VbdEvent, VbdLimits, VbdSpec,
};
