//! The xenblkd binary: `serve`, `demo`, `bench`, `status`.

use clap::Parser;

#[derive(Parser)]
#[command(name = "xenblkd", version, about = "Userspace Xen PV block backend")]
struct Cli {}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let _cli = Cli::parse();
    Ok(())
}
