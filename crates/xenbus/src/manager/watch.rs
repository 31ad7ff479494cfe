//! Which devices an event concerns: routing a watch event to the devices, backend types
//! and domains it touches, scanning backend directories for devices come and gone,
//! telling whether a domain still exists, and the watch tokens naming a device's
//! frontend directory.

use std::collections::BTreeSet;

use tracing::{debug, info, warn};

use super::{Manager, RELEVANT_BACKEND_NODES, TOKEN_PREFIX};
use crate::device::DeviceKey;
use crate::devmodel::{self, ClaimChange};
use crate::error::StoreError;
use crate::parse::parse_u32;
use crate::store::{join, StoreExt};
/// What a batch of watch events asks the manager to look at.
pub(super) struct Found<'a> {
    /// Devices to reconcile.
    pub(super) dirty: &'a mut BTreeSet<DeviceKey>,
    /// Backend types to list again.
    pub(super) rescan: &'a mut BTreeSet<String>,
    /// Domains found dead.
    pub(super) released: &'a mut BTreeSet<u32>,
    /// Domains whose device-model claim may have changed.
    pub(super) claims: &'a mut BTreeSet<u32>,
}

impl Manager {
    /// Maps a watch event to the devices (or backend types, domains) it concerns.
    pub(super) fn route_watch(&self, path: &str, token: &str, found: &mut Found<'_>) {
        let Found {
            dirty,
            rescan,
            released,
            claims,
        } = found;
        let Some(what) = token.strip_prefix(TOKEN_PREFIX) else {
            debug!(%path, %token, "foreign watch token ignored");
            return;
        };
        if let Some(t) = what.strip_prefix("be:") {
            let dir = self.backend_dir(t);
            let Some(rest) = path.strip_prefix(&dir) else {
                return;
            };
            let mut parts = rest
                .trim_start_matches('/')
                .split('/')
                .filter(|s| !s.is_empty());
            let (Some(domid), Some(devid)) = (parts.next(), parts.next()) else {
                // The type or a domain directory itself changed: rescan it.
                rescan.insert(t.to_string());
                return;
            };
            let (Some(domid), Some(devid)) =
                (parse_u32(domid.as_bytes()), parse_u32(devid.as_bytes()))
            else {
                debug!(%path, "ignoring non-numeric backend entry");
                return;
            };
            if let Some(node) = parts.next() {
                if !RELEVANT_BACKEND_NODES.contains(&node) {
                    return;
                }
            }
            dirty.insert(DeviceKey {
                backend_type: t.to_string(),
                domid,
                devid,
            });
        } else if let Some(k) = what.strip_prefix("fe:") {
            if let Some(key) = parse_fe_token(k) {
                dirty.insert(key);
            }
        } else if what == "dm" {
            let root = devmodel::device_model_root(self.config.backend_domid);
            match devmodel::claim_change(&root, path) {
                Some(ClaimChange::All) => rescan.extend(self.claimed_type_names()),
                Some(ClaimChange::Domain(domid)) => {
                    claims.insert(domid);
                }
                None => {}
            }
        } else if what == "release" {
            // Which domain died is not said; check every domain we serve.
            let domids: BTreeSet<u32> = self.devices.keys().map(|k| k.domid).collect();
            for domid in domids {
                match self.domain_alive(domid) {
                    Ok(true) => {}
                    Ok(false) => {
                        info!(domid, "domain is gone");
                        released.insert(domid);
                        dirty.extend(self.devices.keys().filter(|k| k.domid == domid).cloned());
                    }
                    Err(e) => warn!(domid, error = %e, "checking domain"),
                }
            }
        }
    }

    /// Whether a domain still exists: xenstored still has it introduced (when the store
    /// can tell) and its home directory is still there.
    pub(super) fn domain_alive(&self, domid: u32) -> Result<bool, StoreError> {
        if self.store.domain_introduced(domid)? == Some(false) {
            return Ok(false);
        }
        self.domain_exists(domid)
    }

    pub(super) fn domain_exists(&self, domid: u32) -> Result<bool, StoreError> {
        match self.store.exists(&format!("/local/domain/{domid}")) {
            // A driver domain may not read other domains' homes: it cannot tell, so the
            // domain counts as alive (its frontend directory vanishing still tears down).
            Err(StoreError::Daemon { errno, .. }) if errno == "EACCES" => Ok(true),
            other => other,
        }
    }

    /// Lists `backend/<type>/*/*` and marks every device found (new or known) and every
    /// known device not found (removed) dirty.
    pub(super) fn scan_type(
        &mut self,
        t: &str,
        dirty: &mut BTreeSet<DeviceKey>,
    ) -> Result<(), StoreError> {
        let dir = self.backend_dir(t);
        let mut found = BTreeSet::new();
        for domid in self.store.directory(&dir)?.unwrap_or_default() {
            let Some(domid_n) = parse_u32(domid.as_bytes()) else {
                continue;
            };
            for devid in self
                .store
                .directory(&join(&dir, &domid))?
                .unwrap_or_default()
            {
                let Some(devid_n) = parse_u32(devid.as_bytes()) else {
                    continue;
                };
                found.insert(DeviceKey {
                    backend_type: t.to_string(),
                    domid: domid_n,
                    devid: devid_n,
                });
            }
        }
        dirty.extend(
            self.devices
                .keys()
                .filter(|k| k.backend_type == t && !found.contains(k))
                .cloned(),
        );
        dirty.extend(found);
        Ok(())
    }

    /// Lists `backend/<type>/<domid>/*` and marks every device found and every known device
    /// of that domain and type dirty.
    pub(super) fn scan_domain(
        &self,
        t: &str,
        domid: u32,
        dirty: &mut BTreeSet<DeviceKey>,
    ) -> Result<(), StoreError> {
        let dir = join(&self.backend_dir(t), &domid.to_string());
        for devid in self.store.directory(&dir)?.unwrap_or_default() {
            if let Some(devid) = parse_u32(devid.as_bytes()) {
                dirty.insert(DeviceKey {
                    backend_type: t.to_string(),
                    domid,
                    devid,
                });
            }
        }
        dirty.extend(
            self.devices
                .keys()
                .filter(|k| k.backend_type == t && k.domid == domid)
                .cloned(),
        );
        Ok(())
    }
}

pub(super) fn fe_token(key: &DeviceKey) -> String {
    format!(
        "{TOKEN_PREFIX}fe:{}/{}/{}",
        key.backend_type, key.domid, key.devid
    )
}

pub(super) fn parse_fe_token(s: &str) -> Option<DeviceKey> {
    let mut it = s.rsplitn(3, '/');
    let devid = parse_u32(it.next()?.as_bytes())?;
    let domid = parse_u32(it.next()?.as_bytes())?;
    let backend_type = it.next()?.to_string();
    Some(DeviceKey {
        backend_type,
        domid,
        devid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fe_tokens_round_trip() {
        let k = DeviceKey {
            backend_type: "vbd".into(),
            domid: 7,
            devid: 51712,
        };
        let t = fe_token(&k);
        assert_eq!(
            parse_fe_token(t.strip_prefix("xenblkd:fe:").unwrap()),
            Some(k)
        );
        assert_eq!(parse_fe_token("x/y"), None);
    }
}
