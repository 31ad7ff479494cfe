//! `xenblkd xenstore read|write|rm|ls|introduce|release`: a small xenstore client for operators and the
//! simulator (the simulated xenstored has no `xenstore-ls`), and the stand-in for
//! Debian's xenstore-utils when the hotplug script is tested on a machine without them.
//! Like those tools it finds xenstored through `XENSTORED_PATH`, passes relative paths
//! to xenstored (which resolves them against our domain's home), and `write` takes
//! several key/value pairs applied in one transaction.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use xenbus::store::{join, Store, StoreExt, StoreOps};
use xenbus::xs::XsStore;
use xenstore::XsClient;

#[derive(Debug, clap::Args)]
pub struct XenstoreArgs {
    /// xenstored's socket (default: $XENSTORED_PATH, then the usual places).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    #[command(subcommand)]
    pub op: Op,
}

#[derive(Debug, clap::Subcommand)]
pub enum Op {
    /// Print the values of nodes.
    Read { paths: Vec<String> },
    /// Write `PATH VALUE` pairs, in one transaction.
    Write { pairs: Vec<String> },
    /// Remove nodes (and their subtrees).
    Rm { paths: Vec<String> },
    /// Print a subtree, one `path = "value"` per line.
    Ls { path: String },
    /// Introduce domains to xenstored (`XS_INTRODUCE`, as libxl does when it builds a
    /// domain; the simulator's domains need it too, or the daemon takes them for dead).
    Introduce { domids: Vec<u32> },
    /// Release domains (`XS_RELEASE`: xenstored fires `@releaseDomain`).
    Release { domids: Vec<u32> },
}

fn connect(socket: Option<&std::path::Path>) -> anyhow::Result<Arc<XsClient>> {
    let path = match socket {
        Some(p) => p.to_path_buf(),
        None => match platform::linux::detect_xenstore(
            std::path::Path::new("/"),
            std::env::var_os("XENSTORED_PATH").map(PathBuf::from),
        )
        .context("finding xenstore")?
        {
            platform::XenstoreEndpoint::UnixSocket(p) => p,
            platform::XenstoreEndpoint::XenbusDevice(p) => {
                let c = XsClient::open_xenbus_device(&p)
                    .with_context(|| format!("opening {}", p.display()))?;
                return Ok(Arc::new(c));
            }
        },
    };
    let c = XsClient::connect_unix(&path)
        .with_context(|| format!("connecting to {}", path.display()))?;
    Ok(Arc::new(c))
}

fn ls(store: &dyn Store, path: &str, out: &mut String, depth: usize) -> anyhow::Result<()> {
    // Bounded: xenstore paths cannot nest deeper than their length allows anyway.
    if depth > 64 {
        return Ok(());
    }
    let value = store.read_string(path)?.unwrap_or_default();
    out.push_str(&format!("{path} = {value:?}\n"));
    for child in store.directory(path)?.unwrap_or_default() {
        ls(store, &join(path, &child), out, depth + 1)?;
    }
    Ok(())
}

pub fn run(args: &XenstoreArgs) -> anyhow::Result<()> {
    let client = connect(args.socket.as_deref())?;
    let store = XsStore::new(client.clone());
    match &args.op {
        Op::Read { paths } => {
            for p in paths {
                match store.read_string(p)? {
                    Some(v) => println!("{v}"),
                    None => bail!("{p}: no such node"),
                }
            }
        }
        Op::Write { pairs } => {
            if pairs.is_empty() || pairs.len() % 2 != 0 {
                bail!("write takes PATH VALUE pairs");
            }
            store.transaction(&mut |tx: &dyn StoreOps| {
                for kv in pairs.chunks(2) {
                    tx.write(&kv[0], kv[1].as_bytes())?;
                }
                Ok(())
            })?;
        }
        Op::Rm { paths } => {
            for p in paths {
                store.rm(p)?;
            }
        }
        Op::Ls { path } => {
            let mut out = String::new();
            ls(&store, path, &mut out, 0)?;
            print!("{out}");
        }
        Op::Introduce { domids } => {
            for &d in domids {
                // A PV domain's store page and event channel matter only to a real
                // xenstored talking to a real guest; the simulator ignores them.
                client
                    .introduce_domain(d, 0, 0)
                    .with_context(|| format!("introducing domain {d}"))?;
            }
        }
        Op::Release { domids } => {
            for &d in domids {
                client
                    .release_domain(d)
                    .with_context(|| format!("releasing domain {d}"))?;
            }
        }
    }
    Ok(())
}
