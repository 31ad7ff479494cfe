//! Reading what the toolstack and the frontend wrote, and publishing what we offer: the
//! xenstore half of blkback's `xen_blkbk_probe`, `backend_changed`, `connect_ring` and
//! `connect`, as pure functions over a [`StoreOps`] so each is testable on its own.
//!
//! The frontend's nodes are written by the guest: every value is parsed strictly
//! ([`crate::parse`]) and every count is bounded by what we advertised before any
//! allocation depends on it.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use crate::config::{DeviceSettings, MAX_RING_PAGE_ORDER};
use crate::error::{sanitize, DeviceError, NegotiationError, StoreError};
use crate::parse::{
    is_nbd_uri, is_network_target, is_null_target, is_rbd_target, parse_flag, parse_major_minor,
    parse_params, parse_u32, DiskFormat, DiskTarget,
};
use crate::state::XenbusState;
use crate::store::{join, StoreExt, StoreOps};
use crate::vbd::{
    sectors_for, BackendFeatures, DeviceConfig, FrontendParams, Protocol, RingParams, StorageInfo,
    VDISK_CDROM, VDISK_READONLY, VDISK_REMOVABLE,
};

mod adopt;
pub use adopt::{read_adopted, Adopted};

/// What the toolstack wrote in a backend directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendNodes {
    /// `frontend`: the frontend directory (validated to lie under the frontend's domain).
    pub frontend: String,
    /// `frontend-id`.
    pub frontend_id: u32,
    /// `params`, raw.
    pub params: Option<Vec<u8>>,
    /// `mode` contains no `w`.
    pub read_only: bool,
    /// `device-type` is `cdrom`.
    pub cdrom: bool,
    /// `removable` is non-zero.
    pub removable: bool,
    /// `physical-device`, if the hotplug script wrote it.
    pub physical_device: Option<(u32, u32)>,
    /// `physical-device-path`, if the hotplug script wrote it.
    pub physical_device_path: Option<PathBuf>,
    /// `direct-io-safe`.
    pub direct_io_safe: bool,
    /// `discard-enable` (default true).
    pub discard_enable: bool,
    /// `online`, if present.
    pub online: Option<bool>,
    /// `state`, if present and valid.
    pub state: Option<XenbusState>,
    /// `dev` (the guest's name for the disk, informational).
    pub dev: Option<String>,
    /// Optional flags that held no number and were read as their default.
    pub ignored: Vec<IgnoredValue>,
}

/// An optional flag that held no number, read as its default. The caller reports it: the
/// device's reads are woken by its guest, so a plain warning per read would let the guest
/// fill the log ([`crate::ratelimit`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IgnoredValue {
    /// The node.
    pub path: String,
    /// What it held, escaped and bounded for logs.
    pub value: String,
}

impl BackendNodes {
    /// Whether the hotplug script has run (blkback's trigger: `physical-device`; our own
    /// script may write only `physical-device-path` for regular files).
    pub fn hotplug_done(&self) -> bool {
        self.physical_device.is_some() || self.physical_device_path.is_some()
    }

    /// The storage to open: the hotplug script's resolved path when present, else `params`.
    pub fn target(&self, backend: &str) -> Result<DiskTarget, NegotiationError> {
        let from_params = match &self.params {
            Some(p) => Some(parse_params(p).map_err(|e| {
                NegotiationError::Backend(format!("{}: {e}", join(backend, "params")))
            })?),
            None => None,
        };
        let format = from_params
            .as_ref()
            .map_or(crate::parse::DiskFormat::Raw, |t| t.format);
        if let Some(t) = from_params.as_ref().filter(|t| {
            matches!(
                t.format,
                DiskFormat::Nbd | DiskFormat::Rbd | DiskFormat::Null
            )
        }) {
            // Only a URI names an export, only an rbd: target an image and only a null:
            // target a null disk: the hotplug script's, when it wrote one of the same
            // kind (it may have resolved the host), else params'. A path or device number means nothing here.
            use std::os::unix::ffi::OsStrExt;
            let same_kind = |p: &[u8]| match format {
                DiskFormat::Nbd => is_nbd_uri(p),
                DiskFormat::Null => is_null_target(p),
                _ => is_rbd_target(p),
            };
            let path = match &self.physical_device_path {
                Some(p) if same_kind(p.as_os_str().as_bytes()) => p.clone(),
                _ => t.path.clone(),
            };
            return Ok(DiskTarget { format, path });
        }
        match (
            &self.physical_device_path,
            self.physical_device,
            from_params,
        ) {
            // The script resolved where the data is; the format still comes from params.
            (Some(path), _, _) => Ok(DiskTarget {
                format,
                path: path.clone(),
            }),
            // Only the device number (what blkback itself uses): its /dev/block node.
            (None, Some((major, minor)), _) => Ok(DiskTarget {
                format,
                path: PathBuf::from(format!("/dev/block/{major}:{minor}")),
            }),
            (None, None, Some(t)) => Ok(t),
            (None, None, None) => Err(NegotiationError::Missing {
                path: join(backend, "params"),
            }),
        }
    }
}

fn invalid(path: String, value: &[u8]) -> NegotiationError {
    NegotiationError::Invalid {
        path,
        value: sanitize(value),
    }
}

/// Reads an optional flag; a value that is not a number counts as absent (and is noted in
/// `ignored`): optional features must not make a device fail.
fn read_flag(
    store: &dyn StoreOps,
    dir: &str,
    name: &str,
    default: bool,
    ignored: &mut Vec<IgnoredValue>,
) -> Result<bool, StoreError> {
    let path = join(dir, name);
    Ok(match store.read(&path)? {
        None => default,
        Some(v) => parse_flag(&v).unwrap_or_else(|| {
            ignored.push(IgnoredValue {
                value: sanitize(&v),
                path,
            });
            default
        }),
    })
}

/// Reads a backend directory. `Ok(None)` if it does not exist (or has no `frontend` yet:
/// toolstacks that write without a transaction are still writing).
pub fn read_backend(
    store: &dyn StoreOps,
    backend: &str,
) -> Result<Option<BackendNodes>, DeviceError> {
    let Some(frontend_raw) = store.read(&join(backend, "frontend"))? else {
        return Ok(None);
    };
    let Some(frontend_id_raw) = store.read(&join(backend, "frontend-id"))? else {
        return Ok(None);
    };
    let frontend_id = parse_u32(&frontend_id_raw)
        .ok_or_else(|| invalid(join(backend, "frontend-id"), &frontend_id_raw))?;
    let frontend = std::str::from_utf8(&frontend_raw)
        .ok()
        .map(|s| s.trim_end_matches('\0').to_string())
        .filter(|f| f.starts_with(&format!("/local/domain/{frontend_id}/")) && !f.contains("//"))
        .ok_or_else(|| {
            NegotiationError::Backend(format!(
                "frontend {:?} is not under /local/domain/{frontend_id}/",
                sanitize(&frontend_raw)
            ))
        })?;
    let mode_path = join(backend, "mode");
    let mode = store
        .read(&mode_path)?
        .ok_or(NegotiationError::Missing { path: mode_path })?;
    let physical_device = match store.read(&join(backend, "physical-device"))? {
        None => None,
        Some(v) => Some(
            parse_major_minor(&v).ok_or_else(|| invalid(join(backend, "physical-device"), &v))?,
        ),
    };
    let physical_device_path = match store.read(&join(backend, "physical-device-path"))? {
        None => None,
        Some(v) => {
            let v = v.strip_suffix(&[0]).unwrap_or(&v).to_vec();
            // An absolute path, or the NBD URI, rbd: or null: target the script passed on.
            if !(v.starts_with(b"/") || is_network_target(&v) || is_null_target(&v))
                || v.contains(&0)
            {
                return Err(invalid(join(backend, "physical-device-path"), &v).into());
            }
            Some(PathBuf::from(OsStr::from_bytes(&v)))
        }
    };
    let online = store
        .read(&join(backend, "online"))?
        .map(|v| parse_flag(&v).unwrap_or(false));
    let mut ignored = Vec::new();
    Ok(Some(BackendNodes {
        frontend,
        frontend_id,
        params: store.read(&join(backend, "params"))?,
        read_only: !mode.contains(&b'w'),
        cdrom: store.read(&join(backend, "device-type"))?.as_deref() == Some(b"cdrom"),
        removable: read_flag(store, backend, "removable", false, &mut ignored)?,
        physical_device,
        physical_device_path,
        direct_io_safe: read_flag(store, backend, "direct-io-safe", false, &mut ignored)?,
        discard_enable: read_flag(store, backend, "discard-enable", true, &mut ignored)?,
        online,
        state: store
            .read(&join(backend, "state"))?
            .and_then(|v| XenbusState::parse(&v)),
        dev: store.read_string(&join(backend, "dev"))?,
        ignored,
    }))
}

/// Builds the device's configuration from its backend nodes and the operator's settings.
pub fn device_config(
    backend_type: &str,
    devid: u32,
    backend: &str,
    nodes: &BackendNodes,
    settings: DeviceSettings,
) -> Result<DeviceConfig, NegotiationError> {
    Ok(DeviceConfig {
        backend_type: backend_type.to_string(),
        frontend_id: nodes.frontend_id,
        devid,
        backend_path: backend.to_string(),
        frontend_path: nodes.frontend.clone(),
        target: nodes.target(backend)?,
        physical_device: nodes.physical_device,
        read_only: nodes.read_only,
        cdrom: nodes.cdrom,
        removable: nodes.removable,
        direct_io_safe: nodes.direct_io_safe,
        discard_enable: nodes.discard_enable,
        settings,
    })
}

/// Writes `state` only if the node still exists, so a device being removed is never
/// resurrected (Linux's `xenbus_switch_state` rule). Returns whether it was written.
pub fn write_state(
    store: &dyn StoreOps,
    backend: &str,
    state: XenbusState,
) -> Result<bool, StoreError> {
    let path = join(backend, "state");
    if store.read(&path)?.is_none() {
        return Ok(false);
    }
    store.write_str(&path, &state.node_value())?;
    Ok(true)
}

/// The transport limits published before InitWait (blkback's probe), plus the legacy
/// `max-ring-pages` of the Red Hat/Amazon scheme, which blkif.h asks backends to publish
/// alongside `max-ring-page-order` for interoperability.
pub fn initwait_nodes(settings: &DeviceSettings) -> Vec<(&'static str, Option<String>)> {
    let indirect =
        (settings.max_indirect_segments > 0).then(|| settings.max_indirect_segments.to_string());
    vec![
        ("feature-max-indirect-segments", indirect),
        (
            "multi-queue-max-queues",
            Some(settings.max_queues.to_string()),
        ),
        (
            "max-ring-page-order",
            Some(settings.max_ring_page_order.to_string()),
        ),
        (
            "max-ring-pages",
            Some((1u32 << settings.max_ring_page_order).to_string()),
        ),
    ]
}

/// Publishes the InitWait nodes and switches to InitWait in one transaction (so a frontend
/// that sees InitWait also sees the limits). `Ok(false)` if the device is being removed.
pub fn publish_initwait(
    store: &dyn crate::store::Store,
    backend: &str,
    settings: &DeviceSettings,
) -> Result<bool, StoreError> {
    let mut written = false;
    store.transaction(&mut |tx| {
        written = false;
        if tx.read(&join(backend, "state"))?.is_none() {
            return Ok(());
        }
        for (name, value) in initwait_nodes(settings) {
            match value {
                Some(v) => tx.write_str(&join(backend, name), &v)?,
                None => tx.rm(&join(backend, name))?,
            }
        }
        tx.write_str(&join(backend, "state"), &XenbusState::InitWait.node_value())?;
        written = true;
        Ok(())
    })?;
    Ok(written)
}

/// Reads one `u32` node that must exist.
fn required_u32(store: &dyn StoreOps, path: String) -> Result<u32, DeviceError> {
    match store.read(&path)? {
        None => Err(NegotiationError::Missing { path }.into()),
        Some(v) => parse_u32(&v).ok_or_else(|| invalid(path, &v).into()),
    }
}

/// Reads the ring references and event channel of one queue.
fn read_ring(
    store: &dyn StoreOps,
    dir: &str,
    pages: u32,
    multi_ref: bool,
) -> Result<RingParams, DeviceError> {
    let event_channel = required_u32(store, join(dir, "event-channel"))?;
    if event_channel == 0 {
        // Port 0 is never a bound interdomain channel.
        return Err(invalid(join(dir, "event-channel"), b"0").into());
    }
    let mut ring_refs = Vec::with_capacity(pages as usize);
    for i in 0..pages {
        let gref = if multi_ref {
            let name = join(dir, &format!("ring-ref{i}"));
            match store.read(&name)? {
                Some(v) => parse_u32(&v).ok_or_else(|| invalid(name, &v))?,
                // An order-0 ring described with ring-page-order but named the
                // single-page way: accept the plain name too.
                None if pages == 1 => required_u32(store, join(dir, "ring-ref"))?,
                None => return Err(NegotiationError::Missing { path: name }.into()),
            }
        } else {
            required_u32(store, join(dir, "ring-ref"))?
        };
        ring_refs.push(gref);
    }
    Ok(RingParams {
        ring_refs,
        event_channel,
    })
}

/// Parses the frontend's `protocol` node with blkif's parser ([`Protocol::from_node`]),
/// which the frontend side uses too; also says whether the frontend wrote one.
pub fn parse_protocol(value: Option<&[u8]>) -> Result<(Protocol, bool), NegotiationError> {
    match Protocol::from_node(value) {
        Ok(Some(p)) => Ok((p, true)),
        Ok(None) => Ok((Protocol::Native, false)),
        Err(_) => Err(NegotiationError::UnknownProtocol(sanitize(
            value.unwrap_or_default(),
        ))),
    }
}

/// blkback's `connect_ring`: reads and validates the frontend's transport parameters.
pub fn read_frontend(
    store: &dyn StoreOps,
    frontend: &str,
    settings: &DeviceSettings,
) -> Result<FrontendParams, DeviceError> {
    let (protocol, protocol_specified) =
        parse_protocol(store.read(&join(frontend, "protocol"))?.as_deref())?;
    let mut ignored_flags = Vec::new();
    let frontend_persistent = read_flag(
        store,
        frontend,
        "feature-persistent",
        false,
        &mut ignored_flags,
    )?;
    let large_sector_size = read_flag(
        store,
        frontend,
        "feature-large-sector-size",
        false,
        &mut ignored_flags,
    )?;

    let nq_path = join(frontend, "multi-queue-num-queues");
    let num_queues = match store.read(&nq_path)? {
        None => 1,
        Some(v) => {
            let n = crate::parse::parse_u64(&v).ok_or_else(|| invalid(nq_path.clone(), &v))?;
            if n == 0 || n > u64::from(settings.max_queues) {
                return Err(NegotiationError::BadQueueCount {
                    requested: n,
                    max: settings.max_queues,
                }
                .into());
            }
            n as u32
        }
    };

    let max_order = settings.max_ring_page_order.min(MAX_RING_PAGE_ORDER);
    let order_path = join(frontend, "ring-page-order");
    let (order, multi_ref) = match store.read(&order_path)? {
        Some(v) => {
            let order =
                crate::parse::parse_u64(&v).ok_or_else(|| invalid(order_path.clone(), &v))?;
            if order > u64::from(max_order) {
                return Err(NegotiationError::RingOrderTooLarge {
                    requested: order,
                    max: max_order,
                }
                .into());
            }
            (order as u32, true)
        }
        None => {
            // The legacy (Red Hat/Amazon) scheme counts pages instead.
            let pages_path = join(frontend, "num-ring-pages");
            match store.read(&pages_path)? {
                None => (0, false),
                Some(v) => {
                    let pages = crate::parse::parse_u64(&v)
                        .ok_or_else(|| invalid(pages_path.clone(), &v))?;
                    if pages == 0 || !pages.is_power_of_two() {
                        return Err(NegotiationError::RingPagesNotPowerOfTwo(pages).into());
                    }
                    let order = u64::from(pages.trailing_zeros());
                    if order > u64::from(max_order) {
                        return Err(NegotiationError::RingOrderTooLarge {
                            requested: order,
                            max: max_order,
                        }
                        .into());
                    }
                    (order as u32, pages > 1)
                }
            }
        }
    };
    let pages = 1u32 << order;

    let queues = if num_queues == 1 {
        vec![read_ring(store, frontend, pages, multi_ref)?]
    } else {
        (0..num_queues)
            .map(|q| {
                read_ring(
                    store,
                    &join(frontend, &format!("queue-{q}")),
                    pages,
                    multi_ref,
                )
            })
            .collect::<Result<Vec<_>, _>>()?
    };

    Ok(FrontendParams {
        protocol,
        protocol_specified,
        queues,
        ring_page_order: order,
        frontend_persistent,
        persistent: settings.persistent_grants && frontend_persistent,
        large_sector_size,
        ignored_flags,
    })
}

/// What to publish at connect, from the storage, the toolstack's and the operator's
/// settings and what the frontend said about sector units.
pub fn backend_features(
    config: &DeviceConfig,
    info: &StorageInfo,
    large_sector_size: bool,
) -> BackendFeatures {
    let read_only = config.read_only || info.read_only;
    let sector_size = info.logical_block_size.max(512);
    let discard = config.settings.discard && config.discard_enable && info.discard && !read_only;
    let mut bits = 0;
    if config.cdrom {
        bits |= VDISK_CDROM;
    }
    if config.removable {
        bits |= VDISK_REMOVABLE;
    }
    if read_only {
        bits |= VDISK_READONLY;
    }
    BackendFeatures {
        // blkback advertises flush and barrier exactly when the device has a write cache.
        flush: info.flush,
        barrier: info.flush,
        discard,
        secure_discard: discard && info.secure_discard,
        discard_granularity: if info.discard_granularity == 0 {
            sector_size
        } else {
            info.discard_granularity
        },
        discard_alignment: info.discard_alignment,
        persistent: config.settings.persistent_grants,
        max_indirect_segments: config.settings.max_indirect_segments,
        sector_size,
        physical_sector_size: info.physical_block_size.max(sector_size),
        sectors: sectors_for(info.size_bytes, sector_size, large_sector_size),
        info: bits,
        read_only,
    }
}

/// The nodes [`publish_connected`] writes, in order.
pub fn connect_nodes(f: &BackendFeatures) -> Vec<(&'static str, Option<String>)> {
    let b = |v: bool| Some(u8::from(v).to_string());
    let discard_detail = |v: String| f.discard.then_some(v);
    vec![
        ("feature-flush-cache", b(f.flush)),
        ("feature-barrier", b(f.barrier)),
        ("feature-discard", b(f.discard)),
        (
            "discard-granularity",
            discard_detail(f.discard_granularity.to_string()),
        ),
        (
            "discard-alignment",
            discard_detail(f.discard_alignment.to_string()),
        ),
        (
            "discard-secure",
            discard_detail(u8::from(f.secure_discard).to_string()),
        ),
        ("feature-persistent", b(f.persistent)),
        ("sectors", Some(f.sectors.to_string())),
        ("info", Some(f.info.to_string())),
        ("sector-size", Some(f.sector_size.to_string())),
        (
            "physical-sector-size",
            Some(f.physical_sector_size.to_string()),
        ),
    ]
}

/// blkback's `connect`: publishes the device properties and switches to Connected, all in
/// one transaction. `Ok(false)` if the device is being removed.
pub fn publish_connected(
    store: &dyn crate::store::Store,
    backend: &str,
    features: &BackendFeatures,
) -> Result<bool, StoreError> {
    let mut written = false;
    store.transaction(&mut |tx| {
        written = false;
        if tx.read(&join(backend, "state"))?.is_none() {
            return Ok(());
        }
        for (name, value) in connect_nodes(features) {
            match value {
                Some(v) => tx.write_str(&join(backend, name), &v)?,
                None => tx.rm(&join(backend, name))?,
            }
        }
        tx.rm(&join(backend, "error"))?;
        tx.write_str(
            &join(backend, "state"),
            &XenbusState::Connected.node_value(),
        )?;
        written = true;
        Ok(())
    })?;
    Ok(written)
}

/// blkback's `xen_vbd_resize`: publishes the new `sectors` and re-writes `state` in one
/// transaction, so the frontend's watch on our state fires and it re-reads the size.
pub fn publish_resize(
    store: &dyn crate::store::Store,
    backend: &str,
    sectors: u64,
) -> Result<bool, StoreError> {
    let mut written = false;
    store.transaction(&mut |tx| {
        written = false;
        let state_path = join(backend, "state");
        let Some(state) = tx.read(&state_path)? else {
            return Ok(());
        };
        tx.write_str(&join(backend, "sectors"), &sectors.to_string())?;
        tx.write(&state_path, &state)?;
        written = true;
        Ok(())
    })?;
    Ok(written)
}

/// Rewrites feature nodes to 0 after the storage refused what they advertise (blkback's
/// `xen_blkbk_flush_diskcache(..., 0)` / `xen_blkbk_barrier(..., 0)` on EOPNOTSUPP), in one
/// transaction. `Ok(false)` if the device is being removed.
pub fn publish_withdrawn(
    store: &dyn crate::store::Store,
    backend: &str,
    nodes: &[&str],
) -> Result<bool, StoreError> {
    let mut written = false;
    store.transaction(&mut |tx| {
        written = false;
        if tx.read(&join(backend, "state"))?.is_none() {
            return Ok(());
        }
        for n in nodes {
            tx.write_str(&join(backend, n), "0")?;
        }
        written = true;
        Ok(())
    })?;
    Ok(written)
}

/// Where Linux's `xenbus_dev_fatal` puts the error of a device: `error/<nodename>/error`
/// under the backend domain's home, next to our own `<backend>/error`.
pub fn linux_error_path(backend: &str) -> Option<String> {
    // /local/domain/<id>/backend/... -> /local/domain/<id>/error/backend/.../error
    let rest = backend.strip_prefix("/local/domain/")?;
    let slash = rest.find('/')?;
    let (id, nodename) = (&rest[..slash], &rest[slash + 1..]);
    Some(format!("/local/domain/{id}/error/{nodename}/error"))
}

/// Reports a fatal error as blkback's `xenbus_dev_fatal` does: the `error` node gets
/// "`<errno> <message>`" and the device switches to Closing. Both writes skip a device
/// whose directory is already gone.
pub fn publish_fatal(
    store: &dyn crate::store::Store,
    backend: &str,
    errno: i32,
    message: &str,
) -> Result<(), StoreError> {
    let text = format!("{errno} {message}");
    let mut linux_written = false;
    store.transaction(&mut |tx| {
        linux_written = false;
        let state_path = join(backend, "state");
        if tx.read(&state_path)?.is_none() {
            return Ok(());
        }
        tx.write_str(&join(backend, "error"), &text)?;
        tx.write_str(&state_path, &XenbusState::Closing.node_value())?;
        linux_written = true;
        Ok(())
    })?;
    if linux_written {
        if let Some(p) = linux_error_path(backend) {
            // Best effort: a driver domain may not be allowed to write there, and the
            // error is already in the backend directory.
            if let Err(e) = store.write_str(&p, &text) {
                tracing::debug!(path = %p, error = %e, "writing Linux's error node");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "negotiate_tests.rs"]
mod tests;
