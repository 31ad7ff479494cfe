//! xenblkd on the simulator, in this process: xenstored, the simulated hypervisor and
//! the daemon (`xenblkd::simhost`, what `xenblkd demo` runs), one simulated guest, and a
//! fresh sparse disk image per device, attached and removed as `xl` does.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use blkfront::sim::SimGuestServices;
use blkfront::Guest;
use platform::sim::{DomainHandle, GuestConfig, SimGuest};
use platform::GrantMapper;
use xenblkd::simhost::SimHost;
use xenbus::config::{Config, DeviceSettings, XENBLKD_BACKEND_TYPE};
use xenbus::toolstack::{self, DiskSpec};
use xenstore::XsOps;

use crate::target::{Device, DeviceRequest, Leaks, Target, TargetError};

/// The simulated guest's domain id.
pub const GUEST_DOMID: u32 = 1;

/// What the daemon advertises.
#[derive(Debug, Clone)]
pub struct SimOptions {
    pub max_queues: u32,
    pub max_ring_page_order: u32,
    pub max_indirect_segments: u32,
    pub persistent_grants: bool,
    /// Size of each device's image.
    pub disk_bytes: u64,
    /// Guest memory, in pages.
    pub guest_pages: u32,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            max_queues: 4,
            max_ring_page_order: 4,
            max_indirect_segments: 256,
            persistent_grants: true,
            disk_bytes: 64 << 20,
            guest_pages: 16384,
        }
    }
}

/// The simulator target.
pub struct SimTarget {
    host: Option<SimHost>,
    services: Arc<SimGuestServices>,
    _domain: DomainHandle,
    dir: tempfile::TempDir,
    next_disk: u32,
    options: SimOptions,
}

impl std::fmt::Debug for SimTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimTarget").finish_non_exhaustive()
    }
}

impl SimTarget {
    /// Starts xenstored, the daemon and the guest.
    pub fn start(options: SimOptions) -> anyhow::Result<SimTarget> {
        let config = Config {
            reactor_threads: 1,
            defaults: DeviceSettings {
                max_queues: options.max_queues,
                max_ring_page_order: options.max_ring_page_order,
                max_indirect_segments: options.max_indirect_segments,
                persistent_grants: options.persistent_grants,
                ..DeviceSettings::default()
            },
            ..Config::default()
        };
        let host = SimHost::start(config).context("starting the simulated host")?;
        host.create_domain(GUEST_DOMID)?;
        let guest = Arc::new(
            SimGuest::new(
                GUEST_DOMID as u16,
                GuestConfig {
                    pages: options.guest_pages,
                    grant_entries: 64 * 1024,
                },
            )
            .context("creating the simulated guest")?,
        );
        let domain = host
            .platform
            .attach_local(&guest)
            .context("attaching the guest")?;
        let services = Arc::new(SimGuestServices::new(guest));
        let dir = tempfile::tempdir().context("image directory")?;
        Ok(SimTarget {
            host: Some(host),
            services,
            _domain: domain,
            dir,
            next_disk: 0,
            options,
        })
    }

    fn host(&self) -> Result<&SimHost, TargetError> {
        self.host
            .as_ref()
            .ok_or_else(|| TargetError::failed("the simulated host is stopped"))
    }

    fn image(&self, n: u32) -> Result<PathBuf, TargetError> {
        let path = self.dir.path().join(format!("disk-{n}.img"));
        let f = std::fs::File::create(&path).map_err(TargetError::failed)?;
        f.set_len(self.options.disk_bytes)
            .map_err(TargetError::failed)?;
        Ok(path)
    }

    /// Stops the daemon; then nothing may stay mapped or bound.
    pub fn stop(mut self) -> anyhow::Result<()> {
        if let Some(h) = self.host.take() {
            h.stop()?;
        }
        Ok(())
    }
}

impl Target for SimTarget {
    fn name(&self) -> String {
        "xenblkd-sim".into()
    }

    fn guest(&self) -> Arc<dyn Guest> {
        self.services.clone()
    }

    fn open_device(&mut self, req: &DeviceRequest) -> Result<Device, TargetError> {
        let n = self.next_disk;
        self.next_disk += 1;
        let image = self.image(n)?;
        // xvd's extended numbering: any number of disks, as `xvdaa`...
        let devid = (1 << 28) | (n << 8);
        let mut spec = DiskSpec::new(
            XENBLKD_BACKEND_TYPE,
            GUEST_DOMID,
            devid,
            &image.display().to_string(),
        );
        spec.writable = !req.read_only;
        spec.discard_enable = !req.no_discard;
        let host = self.host()?;
        toolstack::attach_disk(&host.store(), &spec, Duration::from_secs(10))
            .map_err(|e| TargetError::failed(format!("attaching disk {n}: {e}")))?;
        let xs = host
            .guest_xenstore(GUEST_DOMID)
            .map_err(TargetError::failed)?;
        Ok(Device {
            frontend_path: spec.frontend_path(),
            backend_path: spec.backend_path(),
            backend_domid: 0,
            xs,
            handle: (devid & 0xffff) as u16,
        })
    }

    fn release_device(&mut self, frontend: &str, backend: &str) -> Result<(), TargetError> {
        let host = self.host()?;
        let removal =
            toolstack::remove_disk(&host.store(), backend, frontend, Duration::from_secs(5))
                .map_err(|e| TargetError::failed(format!("removing {backend}: {e}")))?;
        match removal {
            toolstack::Removal::Forced => Err(TargetError::failed(format!(
                "{backend} did not reach Closed when the toolstack removed it"
            ))),
            _ => Ok(()),
        }
    }

    fn kill_guest_device(&mut self, frontend: &str, backend: &str) -> Result<(), TargetError> {
        // What libxl does for a domain that died: the frontend directory goes with the
        // domain, then the backend is asked to close and its directory removed.
        let host = self.host()?;
        host.dom0.rm(frontend).map_err(TargetError::failed)?;
        let removal =
            toolstack::remove_disk(&host.store(), backend, frontend, Duration::from_secs(5))
                .map_err(|e| TargetError::failed(format!("removing {backend}: {e}")))?;
        match removal {
            toolstack::Removal::Forced => Err(TargetError::failed(format!(
                "{backend} did not close after its guest died"
            ))),
            _ => Ok(()),
        }
    }

    fn io_timeout(&self) -> Duration {
        // Only a backend that owes an answer makes a case wait this long; generous for
        // a test machine shared with builds.
        Duration::from_secs(10)
    }

    fn state_timeout(&self) -> Duration {
        Duration::from_secs(10)
    }

    fn leaks(&self) -> Option<Leaks> {
        let host = self.host.as_ref()?;
        // Released asynchronously after Closed at most by the engine's drain: allow it
        // a moment (a loaded machine's moment) before calling anything a leak.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let l = Leaks {
                grant_mappings: host.platform.live_mappings(),
                event_channels: host.platform.bound_event_channels(),
            };
            if l.is_clean() || Instant::now() >= deadline {
                return Some(l);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for SimTarget {
    fn drop(&mut self) {
        if let Some(h) = self.host.take() {
            let _ = h.stop();
        }
    }
}
