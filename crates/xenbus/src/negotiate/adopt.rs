//! Adoption of a device another process connected (ARCHITECTURE.md, "Restart, handover
//! and crash recovery"): what the frontend was told, read back from our own backend
//! directory and the frontend's nodes, with nothing written.

use super::{backend_features, invalid, read_flag, read_frontend, IgnoredValue};
use crate::config::DeviceSettings;
use crate::error::{DeviceError, NegotiationError, StoreError};
use crate::parse::parse_u32;
use crate::store::{join, StoreOps};
use crate::vbd::{BackendFeatures, DeviceConfig, FrontendParams, StorageInfo};

/// What an adopted device runs with: the frontend's rings, and what the frontend was
/// told when another process connected it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adopted {
    /// The frontend's rings, validated against the limits *we published* (not this
    /// daemon's settings, which may differ from the previous daemon's).
    pub frontend: FrontendParams,
    /// The features in force: what the backend directory advertises, less what this
    /// storage cannot do (a request for one of those gets `BLKIF_RSP_EOPNOTSUPP`).
    pub features: BackendFeatures,
}

/// Reads an optional `u32` node of our own backend directory: absent is `None`, garbage
/// fails the adoption (we wrote these nodes; anything else was tampered with).
fn optional_u32(store: &dyn StoreOps, path: String) -> Result<Option<u32>, DeviceError> {
    match store.read(&path)? {
        None => Ok(None),
        Some(v) => parse_u32(&v)
            .map(Some)
            .ok_or_else(|| invalid(path, &v).into()),
    }
}

/// Adoption of a device another process connected (ARCHITECTURE.md, "Restart, handover
/// and crash recovery"): reads the frontend's rings as `connect_ring` does, but against
/// the limits the backend directory published (`multi-queue-max-queues`,
/// `max-ring-page-order`, `feature-persistent`, `feature-max-indirect-segments`), and
/// takes the features the frontend read at its connect from the same directory. Writes
/// nothing. Values that are inconsistent (a frontend beyond the published limits, a
/// garbled node) fail the device as a bad connect does.
pub fn read_adopted(
    store: &dyn StoreOps,
    backend: &str,
    frontend: &str,
    config: &DeviceConfig,
    info: &StorageInfo,
) -> Result<Adopted, DeviceError> {
    let node = |name: &str| join(backend, name);
    let mut ignored = Vec::new();
    let published_persistent =
        read_flag(store, backend, "feature-persistent", false, &mut ignored)?;
    let flag = |name: &str, ignored: &mut Vec<IgnoredValue>| -> Result<bool, StoreError> {
        read_flag(store, backend, name, false, ignored)
    };
    let flush = flag("feature-flush-cache", &mut ignored)?;
    let barrier = flag("feature-barrier", &mut ignored)?;
    let discard = flag("feature-discard", &mut ignored)?;
    let secure_discard = flag("discard-secure", &mut ignored)?;
    if let Some(bad) = ignored.first() {
        return Err(NegotiationError::Invalid {
            path: bad.path.clone(),
            value: bad.value.clone(),
        }
        .into());
    }
    let settings = DeviceSettings {
        max_queues: optional_u32(store, node("multi-queue-max-queues"))?.unwrap_or(1),
        max_ring_page_order: optional_u32(store, node("max-ring-page-order"))?.unwrap_or(0),
        max_indirect_segments: optional_u32(store, node("feature-max-indirect-segments"))?
            .unwrap_or(0),
        persistent_grants: published_persistent,
        ..config.settings.clone()
    };
    let params = read_frontend(store, frontend, &settings)?;
    let mut features = backend_features(config, info, params.large_sector_size);
    // What the frontend was told, as far as this storage can still do it.
    features.flush &= flush;
    features.barrier &= barrier;
    features.discard &= discard;
    features.secure_discard &= secure_discard && features.discard;
    features.persistent = published_persistent;
    features.max_indirect_segments = settings.max_indirect_segments;
    Ok(Adopted {
        frontend: params,
        features,
    })
}
