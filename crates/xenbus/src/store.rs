//! The narrow view of xenstore this crate needs, as object-safe traits.
//!
//! The state machine is written against [`Store`] rather than a concrete client so it runs
//! unchanged over the `xenstore` crate's client (on real Xen and in the simulator, see
//! [`crate::xs`]) and over [`crate::memstore::MemStore`] in unit tests. Reads of missing
//! nodes return `None` rather than an error: absence is normal in this protocol (optional
//! features, devices being torn down).
//!
//! Watch events are not part of the trait: whoever owns the connection forwards them to
//! the manager's [`crate::manager::EventSender`].

use crate::error::StoreError;

/// Access rights in a permission entry (`n`, `r`, `w`, `b` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Access {
    /// No access.
    None,
    /// Read.
    Read,
    /// Write.
    Write,
    /// Read and write.
    Both,
}

/// One permission entry; the first entry of a list names the owner and the access of
/// every domain not listed, the others are an ACL (Xen's model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Perm {
    /// The domain.
    pub domid: u32,
    /// Its access (or, for the owner entry, everybody else's).
    pub access: Access,
}

impl Perm {
    /// A permission entry.
    pub const fn new(domid: u32, access: Access) -> Perm {
        Perm { domid, access }
    }
}

/// The permissions libxl gives a device's directories (`libxl__device_generic_add`):
/// owned by `owner`, nobody else may access it, except `reader` who may read.
pub fn owned_readable_by(owner: u32, reader: u32) -> [Perm; 2] {
    [
        Perm::new(owner, Access::None),
        Perm::new(reader, Access::Read),
    ]
}

/// Store operations valid both inside and outside a transaction.
pub trait StoreOps {
    /// A node's value, `None` if it does not exist.
    fn read(&self, path: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Writes a node, creating missing parents.
    fn write(&self, path: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Creates a node with an empty value (no-op if it exists).
    fn mkdir(&self, path: &str) -> Result<(), StoreError>;
    /// Removes a node and its subtree; a missing node is not an error.
    fn rm(&self, path: &str) -> Result<(), StoreError>;
    /// The names of a node's children, `None` if it does not exist.
    fn directory(&self, path: &str) -> Result<Option<Vec<String>>, StoreError>;
    /// Replaces a node's permissions (`perms[0]` is the owner).
    fn set_perms(&self, path: &str, perms: &[Perm]) -> Result<(), StoreError>;
}

/// A xenstore connection.
pub trait Store: StoreOps + Send + Sync {
    /// Registers a watch on `path` and its subtree. The daemon fires it once right away.
    fn watch(&self, path: &str, token: &str) -> Result<(), StoreError>;
    /// Removes a watch.
    fn unwatch(&self, path: &str, token: &str) -> Result<(), StoreError>;
    /// Runs `f` in a transaction and commits it, rerunning it from scratch on `EAGAIN`
    /// (bounded), like Linux's xenbus drivers. `f` must have no side effects outside the
    /// store. An error from `f` aborts the transaction and is returned.
    fn transaction(
        &self,
        f: &mut dyn FnMut(&dyn StoreOps) -> Result<(), StoreError>,
    ) -> Result<(), StoreError>;
    /// Whether xenstored has `domid` introduced (`XS_IS_DOMAIN_INTRODUCED`); `None` when the
    /// store cannot tell.
    fn domain_introduced(&self, domid: u32) -> Result<Option<bool>, StoreError> {
        let _ = domid;
        Ok(None)
    }
}

/// Convenience readers over any [`StoreOps`].
pub trait StoreExt: StoreOps {
    /// Reads a node as (lossy) UTF-8 text: for values the toolstack wrote that we only log
    /// or echo.
    fn read_string(&self, path: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .read(path)?
            .map(|v| String::from_utf8_lossy(v.strip_suffix(&[0]).unwrap_or(&v)).into_owned()))
    }

    /// True if the node exists.
    fn exists(&self, path: &str) -> Result<bool, StoreError> {
        Ok(self.read(path)?.is_some())
    }

    /// Writes a text value.
    fn write_str(&self, path: &str, value: &str) -> Result<(), StoreError> {
        self.write(path, value.as_bytes())
    }
}

impl<T: StoreOps + ?Sized> StoreExt for T {}

/// Joins a directory and a child name with exactly one `/`.
pub fn join(dir: &str, name: &str) -> String {
    let mut s = String::with_capacity(dir.len() + 1 + name.len());
    s.push_str(dir.trim_end_matches('/'));
    s.push('/');
    s.push_str(name.trim_start_matches('/'));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_paths() {
        assert_eq!(join("/a", "b"), "/a/b");
        assert_eq!(join("/a/", "/b"), "/a/b");
        assert_eq!(join("backend", "vbd"), "backend/vbd");
    }
}
