//! The daemon's open-file limit. Every ring holds a few descriptors (its event channel, its
//! storage queue's completion fd, io_uring for file storage) and every guest a few more
//! (on the simulator: its connection, memory and grant table), about 11 per VBD of two
//! rings: measured with `scripts/many-vbds`, where 1,000 VBDs hold ~11,000. A daemon
//! started from a shell inherits the usual soft limit of 1,024 and would refuse the
//! hundredth disk with EMFILE, so `serve` raises its soft limit to the hard limit, as
//! systemd advises programs that need many descriptors to do themselves (its unit sets
//! `LimitNOFILE=1048576` too). Nothing in the daemon uses `select(2)`, whose fd sets stop
//! at 1,024. The simulator's `xenblkd xenstored` does the same: it holds a connection per
//! disk while guests connect, and with 250 guests of 4 disks the 1,024th connection
//! failed with EMFILE (`scripts/many-vbds` from a shell with the usual limit).

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the limits before and after
/// (soft, hard).
pub fn raise_nofile_limit() -> nix::Result<((u64, u64), (u64, u64))> {
    let before = getrlimit(Resource::RLIMIT_NOFILE)?;
    if before.0 < before.1 {
        setrlimit(Resource::RLIMIT_NOFILE, before.1, before.1)?;
    }
    Ok((before, getrlimit(Resource::RLIMIT_NOFILE)?))
}

/// [`raise_nofile_limit`], logged: info when raised, a warning when it cannot be.
pub fn raise_nofile_limit_logged() {
    match raise_nofile_limit() {
        Ok((before, after)) if before != after => tracing::info!(
            from = before.0,
            to = after.0,
            "raised the open-file limit (RLIMIT_NOFILE) to its hard limit"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit (RLIMIT_NOFILE)"),
    }
}
