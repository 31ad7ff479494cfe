//! The daemon lock: one `serve` per control socket. `serve` holds an exclusive `flock` on
//! `<control socket>.lock` from before it touches any device until after it released the
//! last one; the kernel drops it when the process dies (`kill -9` included), which is what
//! lets a restarted daemon adopt the devices of a crashed one.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use tracing::info;

/// The lock file of the daemon serving `control`.
pub fn lock_path(control: &Path) -> PathBuf {
    let mut p = control.as_os_str().to_owned();
    p.push(".lock");
    PathBuf::from(p)
}

/// The daemon lock, held while this process serves devices.
pub type DaemonLock = Flock<std::fs::File>;

/// Tries the exclusive `flock` once: `Err(file)` back when another process holds it.
fn try_lock(file: std::fs::File) -> anyhow::Result<Result<DaemonLock, std::fs::File>> {
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Ok(lock)),
        Err((file, Errno::EWOULDBLOCK)) => Ok(Err(file)),
        Err((_, e)) => Err(e.into()),
    }
}

/// Takes the daemon lock of `control`. If a running daemon holds it, asks that daemon to
/// hand its devices over (its control socket) and waits for it to exit, at most `wait`.
/// The returned file holds the lock until it is dropped (or the process dies).
pub(super) fn take_daemon_lock(control: &Path, wait: Duration) -> anyhow::Result<DaemonLock> {
    let path = lock_path(control);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut file = match try_lock(file).with_context(|| format!("locking {}", path.display()))? {
        Ok(lock) => return Ok(lock),
        Err(file) => file,
    };
    info!(lock = %path.display(), "another xenblkd serves these devices: asking it to hand over");
    let start = Instant::now();
    let mut asked = false;
    loop {
        if !asked {
            // The holder may still be starting (no socket yet) or already leaving.
            match crate::status::query_line(control, r#"{"cmd":"handover"}"#) {
                Ok(reply) => {
                    asked = true;
                    info!(reply = %reply.trim(), "handover requested");
                }
                Err(e) => tracing::debug!(error = %format!("{e:#}"), "handover request"),
            }
        }
        thread::sleep(Duration::from_millis(5));
        file = match try_lock(file).with_context(|| format!("locking {}", path.display()))? {
            Ok(lock) => {
                info!(waited = ?start.elapsed(), "the previous daemon has handed over");
                return Ok(lock);
            }
            Err(file) => file,
        };
        if start.elapsed() >= wait {
            bail!(
                "another xenblkd holds {} and did not hand over within {wait:?}",
                path.display()
            );
        }
    }
}
