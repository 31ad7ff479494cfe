//! Termination signals for the long-running subcommands (`serve`, `xenstored`).
//!
//! SIGTERM and SIGINT are blocked in the main thread before any other thread exists, so
//! every thread inherits the mask and no reactor's `epoll_wait` or io_uring wait is ever
//! interrupted; one thread then takes them synchronously with `sigwait`. No handler runs
//! in signal context, so there is nothing async-signal-unsafe to get wrong.

use anyhow::Context;
use nix::sys::signal::{SigSet, Signal};

/// SIGTERM and SIGINT, blocked in the calling thread (and every thread it spawns later).
pub struct TerminationSignals(SigSet);

impl TerminationSignals {
    /// Blocks the signals; call before spawning threads.
    pub fn block() -> anyhow::Result<TerminationSignals> {
        let mut set = SigSet::empty();
        set.add(Signal::SIGTERM);
        set.add(Signal::SIGINT);
        set.thread_block()
            .context("blocking SIGTERM/SIGINT (pthread_sigmask)")?;
        Ok(TerminationSignals(set))
    }

    /// Waits for one of the signals and returns it.
    pub fn wait(&self) -> anyhow::Result<Signal> {
        self.0.wait().context("sigwait")
    }
}
