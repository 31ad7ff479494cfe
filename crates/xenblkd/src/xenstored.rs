//! `xenblkd xenstored`: runs the `xenstore` crate's in-memory xenstored for multi-process
//! simulations: one unix socket per domain id in `--socket-dir` (`d0.sock` for dom0, the
//! daemon and the toolstack; `d<N>.sock` for simulated guest N), until SIGTERM/SIGINT.
//! Guests are introduced and released by the toolstack with `XS_INTRODUCE`/`XS_RELEASE`,
//! as libxl does.

use std::path::PathBuf;

use anyhow::{bail, Context};
use xenstore::{ServerConfig, XenstoreServer};

use crate::signals::TerminationSignals;

#[derive(Debug, clap::Args)]
pub struct XenstoredArgs {
    /// Where the per-domain sockets go.
    #[arg(long, value_name = "DIR")]
    pub socket_dir: PathBuf,
    /// Guest domain ids to open sockets for (`1-16`, `3,5,7`).
    #[arg(long, default_value = "1-32")]
    pub domains: String,
}

/// Parses `1-16,20`.
pub fn parse_domains(spec: &str) -> anyhow::Result<Vec<u32>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<u32>()?, b.parse::<u32>()?),
            None => {
                let v = part.parse::<u32>()?;
                (v, v)
            }
        };
        if a == 0 || b < a || b >= 0x7ff0 || b - a > 1024 {
            bail!("bad domain range {part:?}");
        }
        out.extend(a..=b);
    }
    Ok(out)
}

/// The socket of `domid` in `dir`.
pub fn socket_path(dir: &std::path::Path, domid: u32) -> PathBuf {
    dir.join(format!("d{domid}.sock"))
}

pub fn run(args: &XenstoredArgs) -> anyhow::Result<()> {
    let signals = TerminationSignals::block()?;
    // A connection per disk a guest sets up: past a shell's 1,024 with many guests.
    crate::fd_limit::raise_nofile_limit_logged();
    let domains = parse_domains(&args.domains)?;
    std::fs::create_dir_all(&args.socket_dir)
        .with_context(|| format!("creating {}", args.socket_dir.display()))?;
    let server = XenstoreServer::new(ServerConfig::default());
    for domid in std::iter::once(0).chain(domains) {
        let path = socket_path(&args.socket_dir, domid);
        let _ = std::fs::remove_file(&path);
        server
            .listen_as(domid, &path)
            .with_context(|| format!("listening on {}", path.display()))?;
    }
    println!("xenstored ready: {}", args.socket_dir.display());
    signals.wait()?;
    server.shutdown();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_lists() {
        assert_eq!(parse_domains("1-3,7").unwrap(), vec![1, 2, 3, 7]);
        assert!(parse_domains("0").is_err());
        assert!(parse_domains("5-2").is_err());
        assert!(parse_domains("x").is_err());
    }
}
