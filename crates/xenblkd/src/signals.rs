//! Termination (and, for `serve`, handover and reload) signals for the long-running
//! subcommands (`serve`, `xenstored`, `qemu-dm`).
//!
//! SIGTERM and SIGINT (and, for `qemu-dm`, SIGHUP: what libxl kills a device model with)
//! are blocked in the main thread before any other thread exists, so
//! every thread inherits the mask and no reactor's `epoll_wait` or io_uring wait is ever
//! interrupted; one thread then takes them synchronously with `sigwait`. No handler runs
//! in signal context, so there is nothing async-signal-unsafe to get wrong.

use anyhow::Context;
use nix::sys::signal::{SigSet, Signal};

/// Termination signals, blocked in the calling thread (and every thread it spawns later).
pub struct TerminationSignals(SigSet);

impl TerminationSignals {
    /// Blocks SIGTERM and SIGINT; call before spawning threads.
    pub fn block() -> anyhow::Result<TerminationSignals> {
        TerminationSignals::block_set(&[Signal::SIGTERM, Signal::SIGINT])
    }

    /// Blocks SIGTERM, SIGINT and SIGHUP: libxl stops a device model with SIGHUP
    /// (`libxl__kill_xs_path`), whose default action would skip our cleanup.
    pub fn block_with_hangup() -> anyhow::Result<TerminationSignals> {
        TerminationSignals::block_set(&[Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP])
    }

    /// Blocks what `serve` handles: SIGTERM and SIGINT (close every device), SIGUSR2 (hand
    /// over to the next daemon, see ARCHITECTURE.md "Restart, handover and crash
    /// recovery") and SIGHUP (reload the configuration: `systemctl reload`).
    pub fn block_for_serve() -> anyhow::Result<TerminationSignals> {
        TerminationSignals::block_set(&[
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGUSR2,
            Signal::SIGHUP,
        ])
    }

    fn block_set(signals: &[Signal]) -> anyhow::Result<TerminationSignals> {
        let mut set = SigSet::empty();
        for &s in signals {
            set.add(s);
        }
        set.thread_block()
            .with_context(|| format!("blocking {signals:?} (pthread_sigmask)"))?;
        Ok(TerminationSignals(set))
    }

    /// Waits for one of the signals and returns it.
    pub fn wait(&self) -> anyhow::Result<Signal> {
        self.0.wait().context("sigwait")
    }
}
