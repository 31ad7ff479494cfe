//! The toolstack's side of a disk: writing and removing the frontend and backend nodes the
//! way libxl does (`device_disk_add` + `libxl__device_generic_add`, and
//! `libxl__initiate_device_generic_remove`), with Xen's permission rules and libxl's
//! timeouts. `xenblkd attach`/`detach` use it to serve disks under our own backend type on
//! hosts where blkback keeps `vbd`; the tests use it to play the toolstack.

use std::thread;
use std::time::{Duration, Instant};

use crate::error::{Error, Result, StoreError};
use crate::state::XenbusState;
use crate::store::{join, owned_readable_by, Access, Perm, Store, StoreExt};
use crate::vdev::vdev_name;

/// libxl's `LIBXL_INIT_TIMEOUT`: how long the backend has to reach InitWait.
pub const INIT_TIMEOUT: Duration = Duration::from_secs(10);
/// libxl's `LIBXL_DESTROY_TIMEOUT`: how long the backend has to reach Closed on removal.
pub const DESTROY_TIMEOUT: Duration = Duration::from_secs(10);

/// A disk to attach, in the terms of an xl disk line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The domain serving the disk (0, or a driver domain).
    pub backend_domid: u32,
    /// The backend directory type (`vbd` for libxl's phy disks, `xenblkd` for ours).
    pub backend_type: String,
    /// The guest.
    pub domid: u32,
    /// The virtual device number (`vdev::parse_vdev("xvdb")`).
    pub devid: u32,
    /// `params`: the image (`/path`, `raw:/path`, `qcow2:/path`).
    pub params: String,
    /// `mode` w (else r).
    pub writable: bool,
    /// `device-type` cdrom (else disk).
    pub cdrom: bool,
    /// `script`, as libxl writes it for phy disks.
    pub script: Option<String>,
    /// `discard-enable`.
    pub discard_enable: bool,
    /// `direct-io-safe`.
    pub direct_io_safe: bool,
    /// The frontend `protocol` node libxl writes for PV guests (`x86_64-abi`), if any.
    pub protocol: Option<String>,
}

impl DiskSpec {
    /// A writable disk with libxl's defaults.
    pub fn new(backend_type: &str, domid: u32, devid: u32, params: &str) -> DiskSpec {
        DiskSpec {
            backend_domid: 0,
            backend_type: backend_type.to_string(),
            domid,
            devid,
            params: params.to_string(),
            writable: true,
            cdrom: false,
            script: None,
            discard_enable: true,
            direct_io_safe: false,
            protocol: None,
        }
    }

    /// `/local/domain/<backend>/backend/<type>/<domid>/<devid>`.
    pub fn backend_path(&self) -> String {
        backend_path(
            self.backend_domid,
            &self.backend_type,
            self.domid,
            self.devid,
        )
    }

    /// `/local/domain/<domid>/device/vbd/<devid>`.
    pub fn frontend_path(&self) -> String {
        frontend_path(self.domid, self.devid)
    }
}

/// The backend directory of a device.
pub fn backend_path(backend_domid: u32, backend_type: &str, domid: u32, devid: u32) -> String {
    format!("/local/domain/{backend_domid}/backend/{backend_type}/{domid}/{devid}")
}

/// The frontend directory of a disk: always `device/vbd`, whatever the backend type,
/// because that is what blkfront binds; it follows the `backend` node to find us.
pub fn frontend_path(domid: u32, devid: u32) -> String {
    format!("/local/domain/{domid}/device/vbd/{devid}")
}

/// Writes both directories in one transaction, as libxl does: the backend directory owned
/// by the backend domain and readable by the guest, the frontend directory owned by the
/// guest and readable by the backend domain (children inherit these permissions).
/// Fails with [`Error::DeviceExists`] if either directory exists.
pub fn add_disk(store: &dyn Store, spec: &DiskSpec) -> Result<()> {
    let be = spec.backend_path();
    let fe = spec.frontend_path();
    let mut exists = false;
    store.transaction(&mut |tx| {
        exists = tx.read(&be)?.is_some() || tx.read(&fe)?.is_some();
        if exists {
            return Ok(());
        }
        // The guest's device/ directory is normally made by libxl at domain creation,
        // owned by the guest; make it the same way if it is missing.
        let device_dir = format!("/local/domain/{}/device", spec.domid);
        if tx.read(&device_dir)?.is_none() {
            tx.mkdir(&device_dir)?;
            tx.set_perms(
                &device_dir,
                &owned_readable_by(spec.domid, spec.backend_domid),
            )?;
        }
        tx.mkdir(&fe)?;
        tx.set_perms(&fe, &owned_readable_by(spec.domid, spec.backend_domid))?;
        tx.mkdir(&be)?;
        tx.set_perms(&be, &owned_readable_by(spec.backend_domid, spec.domid))?;

        let backend: Vec<(&str, String)> = [
            ("frontend", fe.clone()),
            ("frontend-id", spec.domid.to_string()),
            ("params", spec.params.clone()),
            ("online", "1".into()),
            ("removable", u8::from(spec.cdrom).to_string()),
            ("bootable", "1".into()),
            ("state", XenbusState::Initialising.node_value()),
            ("dev", vdev_name(spec.devid)),
            // libxl's `libxl__device_disk_string_of_backend`.
            (
                "type",
                if spec.backend_type == crate::config::QDISK_BACKEND_TYPE {
                    "qdisk"
                } else {
                    "phy"
                }
                .into(),
            ),
            ("mode", if spec.writable { "w" } else { "r" }.into()),
            (
                "device-type",
                if spec.cdrom { "cdrom" } else { "disk" }.into(),
            ),
            ("discard-enable", u8::from(spec.discard_enable).to_string()),
        ]
        .into_iter()
        .chain(spec.script.clone().map(|s| ("script", s)))
        .chain(
            spec.direct_io_safe
                .then(|| ("direct-io-safe", "1".to_string())),
        )
        .collect();
        for (k, v) in backend {
            tx.write_str(&join(&be, k), &v)?;
        }
        let frontend: Vec<(&str, String)> = [
            ("backend", be.clone()),
            ("backend-id", spec.backend_domid.to_string()),
            ("state", XenbusState::Initialising.node_value()),
            ("virtual-device", spec.devid.to_string()),
            (
                "device-type",
                if spec.cdrom { "cdrom" } else { "disk" }.into(),
            ),
        ]
        .into_iter()
        .chain(spec.protocol.clone().map(|p| ("protocol", p)))
        .collect();
        for (k, v) in frontend {
            tx.write_str(&join(&fe, k), &v)?;
        }
        Ok(())
    })?;
    if exists {
        return Err(Error::DeviceExists(be));
    }
    Ok(())
}

/// Reads a `state` node (`Unknown` if missing or invalid).
pub fn read_state(store: &dyn Store, dir: &str) -> std::result::Result<XenbusState, StoreError> {
    Ok(store
        .read(&join(dir, "state"))?
        .and_then(|v| XenbusState::parse(&v))
        .unwrap_or(XenbusState::Unknown))
}

/// Polls `<dir>/state` until `pred` holds (or the directory is gone, if `gone_ok`).
pub fn wait_state(
    store: &dyn Store,
    dir: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(XenbusState) -> bool,
) -> Result<XenbusState> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = read_state(store, dir)?;
        if pred(s) {
            return Ok(s);
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("{what} (state is {s})"),
                timeout_ms: timeout.as_millis() as u64,
            });
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// libxl's attach: write the nodes, then wait for the backend to reach InitWait (or any
/// later state) within [`INIT_TIMEOUT`].
pub fn attach_disk(store: &dyn Store, spec: &DiskSpec, timeout: Duration) -> Result<XenbusState> {
    add_disk(store, spec)?;
    wait_state(
        store,
        &spec.backend_path(),
        timeout,
        "backend InitWait",
        |s| s >= XenbusState::InitWait,
    )
}

/// How a removal ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// The backend reached Closed in time.
    Clean,
    /// The backend did not; the nodes were removed anyway (libxl's forced path).
    Forced,
    /// The backend directory did not exist.
    AlreadyGone,
}

/// libxl's `libxl__initiate_device_generic_remove` + `device_hotplug_done`: in one
/// transaction set `online` 0 and `state` Closing (unless already Closed), wait up to
/// `timeout` for Closed, then remove both directories. On timeout, the frontend directory
/// is removed first (libxl's forced retry) and the backend gets another `timeout`.
pub fn remove_disk(
    store: &dyn Store,
    backend: &str,
    frontend: &str,
    timeout: Duration,
) -> Result<Removal> {
    let mut present = true;
    store.transaction(&mut |tx| {
        let state = tx.read(&join(backend, "state"))?;
        present = state.is_some();
        let Some(state) = state else {
            return Ok(());
        };
        tx.write_str(&join(backend, "online"), "0")?;
        if XenbusState::parse(&state) != Some(XenbusState::Closed) {
            tx.write_str(&join(backend, "state"), &XenbusState::Closing.node_value())?;
        }
        Ok(())
    })?;
    if !present {
        store.rm(frontend)?;
        return Ok(Removal::AlreadyGone);
    }
    let closed = |s: XenbusState| s == XenbusState::Closed || s == XenbusState::Unknown;
    let outcome = match wait_state(store, backend, timeout, "backend Closed", closed) {
        Ok(_) => Removal::Clean,
        Err(Error::Timeout { .. }) => {
            store.rm(frontend)?;
            match wait_state(store, backend, timeout, "backend Closed", closed) {
                Ok(_) => Removal::Clean,
                Err(Error::Timeout { .. }) => Removal::Forced,
                Err(e) => return Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    remove_backend_dir(store, backend)?;
    store.rm(frontend)?;
    Ok(outcome)
}

/// Removes a backend directory and, if that leaves it empty, its domain's directory
/// (`backend/<type>/<domid>`), in one transaction: what libxl's `libxl__xs_path_cleanup`
/// does, so no empty directory outlives the last disk of a domain.
pub fn remove_backend_dir(store: &dyn Store, backend: &str) -> std::result::Result<(), StoreError> {
    let Some((parent, name)) = backend.trim_end_matches('/').rsplit_once('/') else {
        return store.rm(backend);
    };
    store.transaction(&mut |tx| {
        // Decided on the directory as it was before the removal: a transaction's listing
        // need not show its own pending changes.
        let only_child = tx
            .directory(parent)?
            .is_some_and(|c| c.len() == 1 && c[0] == name);
        tx.rm(if only_child { parent } else { backend })
    })
}

/// The permissions [`add_disk`] gives the backend directory.
pub fn backend_perms(backend_domid: u32, domid: u32) -> [Perm; 2] {
    owned_readable_by(backend_domid, domid)
}

/// The permissions [`add_disk`] gives the frontend directory.
pub fn frontend_perms(backend_domid: u32, domid: u32) -> [Perm; 2] {
    [
        Perm::new(domid, Access::None),
        Perm::new(backend_domid, Access::Read),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memstore::MemStore;
    use crate::store::StoreOps;

    #[test]
    fn add_writes_libxl_nodes_and_permissions() {
        let s = MemStore::new();
        let mut spec = DiskSpec::new("xenblkd", 5, 51728, "/img/a.raw");
        spec.protocol = Some("x86_64-abi".into());
        add_disk(&s, &spec).unwrap();
        let be = spec.backend_path();
        let fe = spec.frontend_path();
        assert_eq!(be, "/local/domain/0/backend/xenblkd/5/51728");
        assert_eq!(fe, "/local/domain/5/device/vbd/51728");
        let get = |p: &str| s.read_string(p).unwrap();
        assert_eq!(get(&join(&be, "frontend")).as_deref(), Some(fe.as_str()));
        assert_eq!(get(&join(&be, "dev")).as_deref(), Some("xvdb"));
        assert_eq!(get(&join(&be, "state")).as_deref(), Some("1"));
        assert_eq!(get(&join(&be, "online")).as_deref(), Some("1"));
        assert_eq!(get(&join(&fe, "backend")).as_deref(), Some(be.as_str()));
        assert_eq!(get(&join(&fe, "virtual-device")).as_deref(), Some("51728"));
        assert_eq!(get(&join(&fe, "protocol")).as_deref(), Some("x86_64-abi"));
        assert_eq!(s.perms(&be).unwrap(), backend_perms(0, 5).to_vec());
        assert_eq!(s.perms(&fe).unwrap(), frontend_perms(0, 5).to_vec());
        assert!(matches!(add_disk(&s, &spec), Err(Error::DeviceExists(_))));
    }

    #[test]
    fn remove_times_out_then_forces() {
        let s = MemStore::new();
        let spec = DiskSpec::new("xenblkd", 5, 51728, "/img/a.raw");
        add_disk(&s, &spec).unwrap();
        let (be, fe) = (spec.backend_path(), spec.frontend_path());
        // Nobody serves the device: no Closed ever comes.
        let r = remove_disk(&s, &be, &fe, Duration::from_millis(50)).unwrap();
        assert_eq!(r, Removal::Forced);
        assert!(s.read(&be).unwrap().is_none() && s.read(&fe).unwrap().is_none());
        assert_eq!(
            remove_disk(&s, &be, &fe, Duration::from_millis(50)).unwrap(),
            Removal::AlreadyGone
        );
    }

    #[test]
    fn removing_the_last_disk_removes_the_domain_directory() {
        let s = MemStore::new();
        let a = DiskSpec::new("xenblkd", 5, 51712, "/img/a.raw");
        let b = DiskSpec::new("xenblkd", 5, 51728, "/img/b.raw");
        add_disk(&s, &a).unwrap();
        add_disk(&s, &b).unwrap();
        let domain_dir = "/local/domain/0/backend/xenblkd/5";
        remove_backend_dir(&s, &a.backend_path()).unwrap();
        assert!(s.read(&a.backend_path()).unwrap().is_none());
        assert_eq!(
            s.directory(domain_dir).unwrap(),
            Some(vec!["51728".to_string()])
        );
        remove_backend_dir(&s, &b.backend_path()).unwrap();
        assert_eq!(s.directory(domain_dir).unwrap(), None);
        assert!(s
            .directory("/local/domain/0/backend/xenblkd")
            .unwrap()
            .is_some());
        // A disk removed the toolstack's way leaves no empty directory either.
        s.rm(&a.frontend_path()).unwrap();
        add_disk(&s, &a).unwrap();
        let r = remove_disk(
            &s,
            &a.backend_path(),
            &a.frontend_path(),
            Duration::from_millis(20),
        );
        assert_eq!(r.unwrap(), Removal::Forced);
        assert_eq!(s.directory(domain_dir).unwrap(), None);
    }
}
