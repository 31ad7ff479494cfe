//! Device-model claims: which domains' `qdisk` devices the daemon may serve.
//!
//! libxl hands a PV guest's `backendtype=qdisk` disks to the guest's device model: QEMU,
//! unless the guest's configuration names another program (`device_model_override`). Two
//! backends on one ring corrupt the guest's disk, so the daemon serves a `qdisk` device only
//! while the domain's device model is `xenblkd qemu-dm`, which says so with a claim node
//! beside the `state` node every device model writes:
//!
//! ```text
//! /local/domain/<toolstack>/device-model/<domid>/state   = "running"   (QEMU writes it too)
//! /local/domain/<toolstack>/device-model/<domid>/xenblkd = "<pid>"     (only the stand-in)
//! ```
//!
//! QEMU never writes the claim. libxl removes the whole `device-model/<domid>` directory
//! when it destroys the domain, the stand-in removes its claim when it exits, and the node
//! lives in the toolstack domain's home, where no guest may write.

use crate::error::StoreError;
use crate::parse::parse_u32;
use crate::store::{join, StoreOps};

/// The claim node's name inside `device-model/<domid>`.
pub const CLAIM_NODE: &str = "xenblkd";

/// `/local/domain/<toolstack>/device-model`: where libxl and device models meet.
pub fn device_model_root(toolstack_domid: u32) -> String {
    format!("/local/domain/{toolstack_domid}/device-model")
}

/// `/local/domain/<toolstack>/device-model/<domid>`: one domain's device-model directory.
pub fn device_model_dir(toolstack_domid: u32, domid: u32) -> String {
    join(&device_model_root(toolstack_domid), &domid.to_string())
}

/// The claim node of `domid`.
pub fn claim_path(toolstack_domid: u32, domid: u32) -> String {
    join(&device_model_dir(toolstack_domid, domid), CLAIM_NODE)
}

/// Whether our stand-in is `domid`'s device model.
pub fn is_claimed(
    store: &dyn StoreOps,
    toolstack_domid: u32,
    domid: u32,
) -> Result<bool, StoreError> {
    Ok(store.read(&claim_path(toolstack_domid, domid))?.is_some())
}

/// Which claims a change at `path` (a watch event under [`device_model_root`]) may have
/// changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimChange {
    /// The whole device-model directory appeared or went: every domain.
    All,
    /// One domain's directory or claim node.
    Domain(u32),
}

/// Classifies a watch path under `root` ([`device_model_root`]). Writes to other nodes (a
/// device model's `state`, an HVM QEMU's `physmap` entries) change no claim and give `None`.
pub fn claim_change(root: &str, path: &str) -> Option<ClaimChange> {
    let rest = path.strip_prefix(root)?;
    if !rest.is_empty() && !rest.starts_with('/') {
        // `device-model2/...`: a sibling, not ours.
        return None;
    }
    let mut parts = rest.split('/').filter(|s| !s.is_empty());
    let Some(domid) = parts.next() else {
        return Some(ClaimChange::All);
    };
    let domid = parse_u32(domid.as_bytes())?;
    match parts.next() {
        None => Some(ClaimChange::Domain(domid)),
        Some(CLAIM_NODE) => Some(ClaimChange::Domain(domid)),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memstore::MemStore;
    use crate::store::StoreExt;

    #[test]
    fn paths() {
        assert_eq!(device_model_root(0), "/local/domain/0/device-model");
        assert_eq!(claim_path(0, 7), "/local/domain/0/device-model/7/xenblkd");
    }

    #[test]
    fn claims_are_read_from_the_claim_node_only() {
        let s = MemStore::new();
        assert!(!is_claimed(&s, 0, 7).unwrap());
        // What QEMU writes is no claim.
        s.write_str(&join(&device_model_dir(0, 7), "state"), "running")
            .unwrap();
        assert!(!is_claimed(&s, 0, 7).unwrap());
        s.write_str(&claim_path(0, 7), "1234").unwrap();
        assert!(is_claimed(&s, 0, 7).unwrap());
        assert!(!is_claimed(&s, 0, 8).unwrap());
        s.rm(&device_model_dir(0, 7)).unwrap();
        assert!(!is_claimed(&s, 0, 7).unwrap());
    }

    #[test]
    fn watch_paths_are_classified() {
        let root = device_model_root(0);
        let at = |p: &str| claim_change(&root, &format!("{root}{p}"));
        assert_eq!(at(""), Some(ClaimChange::All));
        assert_eq!(at("/"), Some(ClaimChange::All));
        assert_eq!(at("/7"), Some(ClaimChange::Domain(7)));
        assert_eq!(at("/7/xenblkd"), Some(ClaimChange::Domain(7)));
        assert_eq!(at("/7/state"), None);
        assert_eq!(at("/7/physmap/f0000/size"), None);
        assert_eq!(at("/x7"), None);
        assert_eq!(claim_change(&root, "/local/domain/0/device-model2/7"), None);
        assert_eq!(claim_change(&root, "/local/domain/0/backend/qdisk/7"), None);
    }
}
