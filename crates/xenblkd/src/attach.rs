//! `xenblkd attach` / `xenblkd detach`: the toolstack's part for disks served under our own
//! backend type, for hosts where the kernel's blkback keeps serving `vbd`. They write (and
//! remove) the frontend and backend nodes exactly as libxl does for a disk, with Xen's
//! permission rules; the guest's blkfront follows the frontend's `backend` node to us.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use xenbus::config::XENBLKD_BACKEND_TYPE;
use xenbus::store::{join, Store, StoreExt};
use xenbus::toolstack::{self, DiskSpec, Removal};
use xenbus::vdev::{parse_vdev, vdev_name};
use xenbus::xs::XsStore;
use xenbus::XenbusState;
use xenstore::XsClient;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum FormatArg {
    Raw,
    Qcow2,
}

#[derive(Debug, clap::Args)]
pub struct XenstoreArgs {
    /// xenstored's unix socket (default: where libxenstore looks, else /dev/xen/xenbus).
    #[arg(long, value_name = "PATH")]
    pub xenstore_socket: Option<PathBuf>,
    /// The domain running xenblkd (0, or a driver domain).
    #[arg(long, default_value_t = 0)]
    pub backend_domid: u32,
    /// Backend directory type.
    #[arg(long, default_value = XENBLKD_BACKEND_TYPE)]
    pub backend_type: String,
    /// Seconds to wait for the backend (libxl waits 10).
    #[arg(long, default_value_t = 10)]
    pub timeout_secs: u64,
}

#[derive(Debug, clap::Args)]
pub struct CheckTargetArgs {
    /// What `params` would say: an absolute path, optionally prefixed `raw:`, `aio:`,
    /// `qcow2:`, an NBD URI, an `rbd:pool/image` target or a `null:SIZE` disk.
    pub params: String,
    /// The disk is read-only (`mode` r).
    #[arg(long)]
    pub read_only: bool,
    /// O_DIRECT is declared safe (`direct-io-safe` 1).
    #[arg(long)]
    pub direct_io_safe: bool,
}

#[derive(Debug, clap::Args)]
pub struct AttachArgs {
    /// The guest.
    pub domid: u32,
    /// Disk image, block device, NBD export (`nbd://host[:port]/export`,
    /// `nbd+unix:///export?socket=PATH`), Ceph RBD image
    /// (`rbd:pool[/namespace]/image[:id=NAME][:conf=PATH]`) or, for benchmarks and tests,
    /// a null disk of SIZE bytes (`null:SIZE`, e.g. `null:1G`: reads zeros, forgets
    /// writes).
    pub image: PathBuf,
    /// Virtual device (xvdb, sdb, hdc, or a number); default: the first free xvdX.
    pub vdev: Option<String>,
    #[command(flatten)]
    pub xs: XenstoreArgs,
    /// Read-only disk (`mode` r).
    #[arg(long)]
    pub read_only: bool,
    /// A CD-ROM (`device-type` cdrom).
    #[arg(long)]
    pub cdrom: bool,
    /// Image format.
    #[arg(long, value_enum, default_value = "raw")]
    pub format: FormatArg,
    /// Do not offer discard (`discard-enable` 0).
    #[arg(long)]
    pub no_discard: bool,
    /// Declare O_DIRECT safe for this storage (`direct-io-safe` 1): true for local files and
    /// block devices; leave it off for network storage.
    #[arg(long)]
    pub direct_io_safe: bool,
    /// Return once the backend is in InitWait instead of waiting for the guest to connect.
    #[arg(long)]
    pub no_wait_connect: bool,
}

#[derive(Debug, clap::Args)]
pub struct DetachArgs {
    /// The guest.
    pub domid: u32,
    /// Virtual device (xvdb, or a number).
    pub vdev: String,
    #[command(flatten)]
    pub xs: XenstoreArgs,
}

fn connect(socket: Option<&Path>) -> anyhow::Result<XsStore> {
    let client = match socket {
        Some(p) => {
            XsClient::connect_unix(p).with_context(|| format!("connecting to {}", p.display()))?
        }
        None => match platform::linux::detect_xenstore(
            Path::new("/"),
            std::env::var_os("XENSTORED_PATH").map(PathBuf::from),
        )
        .context("finding xenstore")?
        {
            platform::XenstoreEndpoint::UnixSocket(p) => XsClient::connect_unix(&p)
                .with_context(|| format!("connecting to {}", p.display()))?,
            platform::XenstoreEndpoint::XenbusDevice(p) => XsClient::open_xenbus_device(&p)
                .with_context(|| format!("opening {}", p.display()))?,
        },
    };
    Ok(XsStore::new(Arc::new(client)))
}

/// The first `xvdX` with no frontend directory in the guest.
fn first_free_vdev(store: &dyn Store, domid: u32) -> anyhow::Result<u32> {
    let used: Vec<String> = store
        .directory(&format!("/local/domain/{domid}/device/vbd"))?
        .unwrap_or_default();
    (0..26u32)
        .map(|disk| (202 << 8) | (disk << 4))
        .find(|devid| !used.contains(&devid.to_string()))
        .context("no free xvd name left")
}

/// dom0's domain id: `attach` run there for a daemon there can open the storage itself.
const LOCAL_DOMID: u32 = 0;

/// Opens (and closes) the storage `params` names, with the options `serve` would use, so
/// that `attach` and the hotplug script refuse at once what the daemon would refuse later.
pub fn check_target(params: &str, writable: bool, direct_io_safe: bool) -> anyhow::Result<()> {
    let target = xenbus::parse::parse_params(params.as_bytes())
        .with_context(|| format!("target {params:?}"))?;
    let options = crate::engine_glue::storage_options(
        xenbus::config::DirectIo::Auto,
        direct_io_safe,
        !writable,
    );
    let nbd = storage::NbdConfig {
        read_only: !writable,
        ..storage::NbdConfig::default()
    };
    let rbd = storage::RbdConfig {
        read_only: !writable,
        ..storage::RbdConfig::default()
    };
    crate::engine_glue::open_target(&target, options, None, nbd, rbd, "check-target")?;
    Ok(())
}

pub fn run_attach(args: &AttachArgs) -> anyhow::Result<()> {
    let store = connect(args.xs.xenstore_socket.as_deref())?;
    let nbd = args.image.to_str().is_some_and(storage::nbd::is_nbd_uri);
    if nbd {
        // Checked here so a typo fails the command, not the guest's device.
        storage::nbd::NbdUri::parse(args.image.to_str().unwrap_or_default())
            .with_context(|| format!("{}", args.image.display()))?;
        if matches!(args.format, FormatArg::Qcow2) {
            bail!("NBD exports are served as raw; --format qcow2 does not apply");
        }
    }
    let rbd = args.image.to_str().is_some_and(storage::rbd::is_rbd_target);
    if rbd {
        storage::rbd::RbdTarget::parse(args.image.to_str().unwrap_or_default())
            .with_context(|| format!("{}", args.image.display()))?;
        if matches!(args.format, FormatArg::Qcow2) {
            bail!("RBD images are served as raw; --format qcow2 does not apply");
        }
    }
    let null = args.image.to_str().is_some_and(storage::is_null_target);
    if null && matches!(args.format, FormatArg::Qcow2) {
        bail!("a null disk has no format; --format qcow2 does not apply");
    }
    let image = if nbd || rbd || null {
        args.image.clone()
    } else {
        std::fs::canonicalize(&args.image).with_context(|| format!("{}", args.image.display()))?
    };
    let devid = match &args.vdev {
        Some(v) => parse_vdev(v)?,
        None => first_free_vdev(&store, args.domid)?,
    };
    let prefix = match args.format {
        FormatArg::Raw => "",
        FormatArg::Qcow2 => "qcow2:",
    };
    let params = format!("{prefix}{}", image.display());
    if args.xs.backend_domid == LOCAL_DOMID {
        // The daemon runs here and would open the storage only once the guest's frontend
        // shows up; refuse now what it would refuse then, before anything is written.
        check_target(&params, !args.read_only, args.direct_io_safe)?;
    }
    let spec = DiskSpec {
        backend_domid: args.xs.backend_domid,
        backend_type: args.xs.backend_type.clone(),
        domid: args.domid,
        devid,
        params,
        writable: !args.read_only,
        cdrom: args.cdrom,
        script: None,
        discard_enable: !args.no_discard,
        direct_io_safe: args.direct_io_safe,
        protocol: None,
    };
    let timeout = Duration::from_secs(args.xs.timeout_secs);
    let be = spec.backend_path();
    let state = toolstack::attach_disk(&store, &spec, timeout)
        .with_context(|| format!("attaching {} to domain {}", image.display(), args.domid))?;
    if state == XenbusState::Closing || state == XenbusState::Closed {
        let err = store.read_string(&join(&be, "error"))?.unwrap_or_default();
        // Leave nothing behind, as libxl removes a device that failed to attach.
        let _ = toolstack::remove_disk(&store, &be, &spec.frontend_path(), Duration::from_secs(1));
        bail!("the backend refused the disk: {err}");
    }
    println!(
        "attached {} as {} (device {devid}) of domain {}: {be}",
        image.display(),
        vdev_name(devid),
        args.domid
    );
    if !args.no_wait_connect {
        match toolstack::wait_state(&store, &be, timeout, "backend Connected", |s| {
            s >= XenbusState::Connected
        }) {
            Ok(XenbusState::Connected) => println!("connected"),
            Ok(s) => {
                let err = store.read_string(&join(&be, "error"))?.unwrap_or_default();
                bail!("backend went {s}: {err}");
            }
            Err(xenbus::Error::Timeout { .. }) => {
                println!("the guest has not connected yet (no blkfront, or not booted); the disk stays attached")
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

pub fn run_detach(args: &DetachArgs) -> anyhow::Result<()> {
    let store = connect(args.xs.xenstore_socket.as_deref())?;
    let devid = parse_vdev(&args.vdev)?;
    let be = toolstack::backend_path(
        args.xs.backend_domid,
        &args.xs.backend_type,
        args.domid,
        devid,
    );
    let fe = toolstack::frontend_path(args.domid, devid);
    match toolstack::remove_disk(&store, &be, &fe, Duration::from_secs(args.xs.timeout_secs))? {
        Removal::Clean => println!("detached {} from domain {}", vdev_name(devid), args.domid),
        Removal::Forced => println!(
            "detached {} from domain {} (forced: the backend did not reach Closed in time)",
            vdev_name(devid),
            args.domid
        ),
        Removal::AlreadyGone => bail!("no such device: {be}"),
    }
    Ok(())
}
