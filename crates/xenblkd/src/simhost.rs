//! A simulated Xen host in this process: the in-memory xenstored, the simulated
//! hypervisor and the daemon (its xenbus manager and engine, as `serve` runs them), with
//! no Xen and no second process.
//!
//! `xenblkd demo` runs a guest against it, and so does the `conform` crate's simulator
//! target; both then play the toolstack (`xenbus::toolstack`) and the guest (a frontend
//! over [`SimHost::guest_xenstore`] and the simulated guest's memory and grants).

use std::sync::Arc;
use std::thread;

use anyhow::{bail, Context};
use backend::{Engine, EngineConfig};
use platform::sim::SimPlatform;
use platform::Platform;
use xenbus::config::Config;
use xenbus::xs::{spawn_watch_forwarder, XsStore};
use xenbus::Manager;
use xenstore::{
    Access, ClientConfig, Perm, ServerConfig, Transport, XenstoreServer, XsClient, XsOps,
};

use crate::engine_glue::{EngineFactory, EngineGauges};

/// The daemon side running in this process: the xenbus manager on its own thread, over
/// an engine on the given platform.
pub struct Daemon {
    pub sender: xenbus::EventSender,
    thread: Option<thread::JoinHandle<anyhow::Result<()>>>,
    pub gauges: EngineGauges,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon").finish_non_exhaustive()
    }
}

impl Daemon {
    /// Starts the manager with the default settings and one reactor.
    pub fn start(server: &XenstoreServer, platform: Arc<dyn Platform>) -> anyhow::Result<Daemon> {
        let config = Config {
            reactor_threads: 1,
            ..Config::default()
        };
        Self::start_with(server, platform, config)
    }

    /// Starts the manager with `config` (`reactor_threads` reactors).
    pub fn start_with(
        server: &XenstoreServer,
        platform: Arc<dyn Platform>,
        config: Config,
    ) -> anyhow::Result<Daemon> {
        let stream = server
            .connect_as(0)
            .context("connecting the daemon to xenstore")?;
        let client = Arc::new(XsClient::new(
            Transport::Unix(stream),
            ClientConfig::default(),
        )?);
        let reactors = usize::try_from(config.reactor_threads.max(1)).unwrap_or(1);
        let engine = Engine::start(EngineConfig {
            reactors,
            reactor_cpus: config.reactor_cpus.iter().map(|&c| c as usize).collect(),
        })
        .context("starting the engine")?;
        let factory = Arc::new(EngineFactory::new(engine, platform));
        let gauges = factory.gauges();
        let mut manager = Manager::new(Arc::new(XsStore::new(client.clone())), factory, config);
        spawn_watch_forwarder(&client, manager.sender()).context("watch forwarder")?;
        manager.start().context("registering xenstore watches")?;
        let sender = manager.sender();
        let thread = thread::Builder::new()
            .name("xenbus-manager".into())
            .spawn(move || {
                let r = manager.run().context("xenbus manager");
                drop(manager);
                drop(client);
                r
            })
            .context("spawning the manager")?;
        Ok(Daemon {
            sender,
            thread: Some(thread),
            gauges,
        })
    }

    /// Shuts the manager down (every device closed) and waits for it.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.sender.shutdown();
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => bail!("the xenbus manager panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.sender.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Makes `/local/domain/<domid>` the way xl's domain creation does.
pub fn create_domain(dom0: &XsClient, server: &XenstoreServer, domid: u32) -> anyhow::Result<()> {
    let home = format!("/local/domain/{domid}");
    dom0.mkdir(&home)?;
    dom0.set_perms(
        &home,
        &[Perm::new(domid, Access::None), Perm::new(0, Access::Read)],
    )?;
    dom0.write(&format!("{home}/name"), format!("sim-guest-{domid}"))?;
    dom0.write(&format!("{home}/domid"), domid.to_string())?;
    server.introduce_domain(domid);
    Ok(())
}

/// xenstored, the simulated hypervisor and the daemon, started together.
pub struct SimHost {
    pub server: XenstoreServer,
    /// The toolstack's connection (dom0).
    pub dom0: Arc<XsClient>,
    pub platform: SimPlatform,
    daemon: Option<Daemon>,
}

impl std::fmt::Debug for SimHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHost").finish_non_exhaustive()
    }
}

impl SimHost {
    /// Starts xenstored and the daemon with `config`.
    pub fn start(config: Config) -> anyhow::Result<SimHost> {
        let server = XenstoreServer::new(ServerConfig::default());
        let dom0 = Arc::new(XsClient::new(
            Transport::Unix(server.connect_as(0)?),
            ClientConfig::default(),
        )?);
        let platform = SimPlatform::new();
        let daemon = Daemon::start_with(&server, Arc::new(platform.clone()), config)?;
        Ok(SimHost {
            server,
            dom0,
            platform,
            daemon: Some(daemon),
        })
    }

    /// The toolstack's view of xenstore, for `xenbus::toolstack`.
    pub fn store(&self) -> XsStore {
        XsStore::new(self.dom0.clone())
    }

    /// Makes the guest's home directory (the simulated guest itself is attached to
    /// [`SimHost::platform`] by the caller).
    pub fn create_domain(&self, domid: u32) -> anyhow::Result<()> {
        create_domain(&self.dom0, &self.server, domid)
    }

    /// A xenstore connection as the guest `domid`.
    pub fn guest_xenstore(&self, domid: u32) -> anyhow::Result<XsClient> {
        Ok(XsClient::new(
            Transport::Unix(self.server.connect_as(domid)?),
            ClientConfig::default(),
        )?)
    }

    /// The running daemon.
    pub fn daemon(&self) -> Option<&Daemon> {
        self.daemon.as_ref()
    }

    /// Stops the daemon (every device closed).
    pub fn stop(mut self) -> anyhow::Result<()> {
        match self.daemon.take() {
            Some(d) => d.stop(),
            None => Ok(()),
        }
    }
}
