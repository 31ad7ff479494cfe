//! The node tree, Xen's permission checks on it, per-domain quotas, and
//! transactions.
//!
//! The tree is a flat map from absolute path to [`Node`]; each node keeps the
//! names of its children so `XS_DIRECTORY` is cheap. Every modification
//! stamps the node with a fresh, globally increasing *generation*.
//!
//! Operations are written once against the [`View`] trait and run either
//! directly on the tree or inside a transaction ([`TxView`]). A transaction
//! works on a private overlay of modified nodes and records the generation of
//! every tree node it looked at (for a missing node, its nearest existing
//! ancestor, whose children list changes when the node is created). Commit
//! fails with `EAGAIN` if any recorded node's generation moved, which is the
//! conflict rule of C xenstored: a node read or written in the transaction
//! was changed by someone else.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::error::Errno;
use crate::perms::{effective_access, Access, Perm};
use crate::wire::PAYLOAD_MAX;

use super::path::{basename, join, parent};

/// One node: its value, permissions (owner first) and child names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Node {
    pub value: Vec<u8>,
    pub perms: Vec<Perm>,
    pub children: BTreeSet<String>,
    pub generation: u64,
}

impl Node {
    fn new(value: Vec<u8>, perms: Vec<Perm>) -> Node {
        Node {
            value,
            perms,
            children: BTreeSet::new(),
            generation: 0,
        }
    }

    /// The owning domain (first permission entry).
    pub fn owner(&self) -> u32 {
        self.perms.first().map_or(0, |p| p.domid)
    }
}

/// Who is asking.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caller {
    pub domid: u32,
    pub privileged: bool,
}

impl Caller {
    fn access(&self, node: &Node) -> Access {
        effective_access(&node.perms, self.domid, self.privileged)
    }
}

/// Quotas for unprivileged callers (privileged ones are exempt, as in xenstored).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_nodes_per_domain: usize,
    pub max_value_size: usize,
}

/// A modification that may fire watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change {
    /// The node written, removed, or re-permissioned (or a special `@` path).
    pub path: String,
    /// A removal: watches *below* `path` fire too.
    pub recursive: bool,
    /// The permissions that decide who may see the event (the node's after a
    /// write, before a removal).
    pub perms: Vec<Perm>,
}

/// Access to nodes, directly or through a transaction.
pub(crate) trait View {
    /// The node at `path`, as this view sees it.
    fn get(&mut self, path: &str) -> Option<&Node>;
    /// Inserts or replaces the node at `path` (the caller keeps the parent's
    /// children list consistent).
    fn put(&mut self, path: &str, node: Node);
    /// Deletes the node at `path` (not its children).
    fn remove(&mut self, path: &str);
    /// How many nodes `domid` owns, as this view sees it.
    fn owned_by(&self, domid: u32) -> usize;
}

/// The committed tree.
#[derive(Debug)]
pub(crate) struct Nodes {
    map: HashMap<String, Node>,
    owner_counts: HashMap<u32, usize>,
    next_generation: u64,
}

impl Nodes {
    /// A tree holding only `/`, owned by dom0 and readable by nobody else.
    pub fn new() -> Nodes {
        let mut n = Nodes {
            map: HashMap::new(),
            owner_counts: HashMap::new(),
            next_generation: 1,
        };
        n.put("/", Node::new(Vec::new(), vec![Perm::new(0, Access::None)]));
        n
    }

    /// Number of nodes, root included.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Read-only lookup, bypassing permissions (for the server's own API).
    pub fn peek(&self, path: &str) -> Option<&Node> {
        self.map.get(path)
    }

    fn count_delta(&mut self, domid: u32, delta: isize) {
        let c = self.owner_counts.entry(domid).or_insert(0);
        *c = c.saturating_add_signed(delta);
        if *c == 0 {
            self.owner_counts.remove(&domid);
        }
    }
}

impl View for Nodes {
    fn get(&mut self, path: &str) -> Option<&Node> {
        self.map.get(path)
    }

    fn put(&mut self, path: &str, mut node: Node) {
        node.generation = self.next_generation;
        self.next_generation += 1;
        let new_owner = node.owner();
        if let Some(old) = self.map.insert(path.to_owned(), node) {
            self.count_delta(old.owner(), -1);
        }
        self.count_delta(new_owner, 1);
    }

    fn remove(&mut self, path: &str) {
        if let Some(old) = self.map.remove(path) {
            self.count_delta(old.owner(), -1);
        }
    }

    fn owned_by(&self, domid: u32) -> usize {
        self.owner_counts.get(&domid).copied().unwrap_or(0)
    }
}

/// An open transaction.
#[derive(Debug)]
pub(crate) struct Tx {
    /// The connection that started it; other connections cannot use it.
    pub conn_id: u64,
    /// Generation of every committed node this transaction depended on.
    accessed: HashMap<String, u64>,
    /// Private modifications: `Some` = new content, `None` = deleted.
    overlay: HashMap<String, Option<Node>>,
    /// Watches to fire at commit, deduplicated (a loop of writes to one node
    /// queues one event, so this is bounded by the nodes touched).
    changes: Vec<Change>,
    change_keys: HashSet<(String, bool)>,
    /// Change in nodes owned per domain, for quota checks.
    owner_delta: HashMap<u32, isize>,
}

impl Tx {
    pub fn new(conn_id: u64) -> Tx {
        Tx {
            conn_id,
            accessed: HashMap::new(),
            overlay: HashMap::new(),
            changes: Vec::new(),
            change_keys: HashSet::new(),
            owner_delta: HashMap::new(),
        }
    }

    /// Queues a change to fire on commit.
    pub fn add_change(&mut self, c: Change) {
        if self.change_keys.insert((c.path.clone(), c.recursive)) {
            self.changes.push(c);
        } else if let Some(old) = self
            .changes
            .iter_mut()
            .find(|o| o.path == c.path && o.recursive == c.recursive)
        {
            old.perms = c.perms;
        }
    }

    /// Applies the transaction to the tree if nothing it depended on changed.
    /// Returns the changes to fire.
    pub fn commit(
        self,
        nodes: &mut Nodes,
        caller: Caller,
        limits: Limits,
    ) -> Result<Vec<Change>, Errno> {
        for (path, generation) in &self.accessed {
            if nodes.map.get(path).map(|n| n.generation) != Some(*generation) {
                return Err(Errno::Eagain);
            }
        }
        if !caller.privileged {
            let delta = self.owner_delta.get(&caller.domid).copied().unwrap_or(0);
            if delta > 0
                && nodes.owned_by(caller.domid).saturating_add_signed(delta)
                    > limits.max_nodes_per_domain
            {
                return Err(Errno::Equota);
            }
        }
        // Each overlay entry is a whole node (children list included), and
        // every committed node it replaces was checked above, so applying
        // them in any order leaves a consistent tree.
        for (path, entry) in self.overlay {
            match entry {
                Some(node) => nodes.put(&path, node),
                None => nodes.remove(&path),
            }
        }
        Ok(self.changes)
    }
}

/// A transaction's view: its overlay over the committed tree.
pub(crate) struct TxView<'a> {
    pub nodes: &'a Nodes,
    pub tx: &'a mut Tx,
}

impl TxView<'_> {
    fn record(&mut self, path: &str, generation: u64) {
        if !self.tx.accessed.contains_key(path) {
            self.tx.accessed.insert(path.to_owned(), generation);
        }
    }

    /// A missing node depends on its nearest existing ancestor: creating the
    /// node (or any missing parent) changes that ancestor's children list.
    fn record_missing(&mut self, path: &str) {
        let mut cur = parent(path);
        while let Some(p) = cur {
            if self.tx.overlay.contains_key(p) {
                return;
            }
            if let Some(n) = self.nodes.map.get(p) {
                self.record(p, n.generation);
                return;
            }
            cur = parent(p);
        }
    }

    fn adjust_owner(&mut self, domid: u32, delta: isize) {
        *self.tx.owner_delta.entry(domid).or_insert(0) += delta;
    }
}

impl View for TxView<'_> {
    fn get(&mut self, path: &str) -> Option<&Node> {
        if self.tx.overlay.contains_key(path) {
            return self.tx.overlay.get(path).and_then(Option::as_ref);
        }
        let nodes: &Nodes = self.nodes;
        match nodes.map.get(path) {
            Some(n) => {
                self.record(path, n.generation);
                Some(n)
            }
            None => {
                self.record_missing(path);
                None
            }
        }
    }

    fn put(&mut self, path: &str, node: Node) {
        if let Some(old_owner) = self.get(path).map(Node::owner) {
            self.adjust_owner(old_owner, -1);
        }
        self.adjust_owner(node.owner(), 1);
        self.tx.overlay.insert(path.to_owned(), Some(node));
    }

    fn remove(&mut self, path: &str) {
        if let Some(old_owner) = self.get(path).map(Node::owner) {
            self.adjust_owner(old_owner, -1);
        }
        self.tx.overlay.insert(path.to_owned(), None);
    }

    fn owned_by(&self, domid: u32) -> usize {
        let delta = self.tx.owner_delta.get(&domid).copied().unwrap_or(0);
        self.nodes.owned_by(domid).saturating_add_signed(delta)
    }
}

/// The error for a missing node, as xenstored's `errno_from_parents`: if the
/// caller could not have `want`ed the nearest existing ancestor, say `EACCES`
/// rather than leak whether the node exists.
fn missing(v: &mut dyn View, caller: Caller, path: &str, want: fn(Access) -> bool) -> Errno {
    let mut cur = parent(path);
    while let Some(p) = cur {
        if let Some(n) = v.get(p) {
            return if want(caller.access(n)) {
                Errno::Enoent
            } else {
                Errno::Eacces
            };
        }
        cur = parent(p);
    }
    Errno::Enoent
}

/// The node at `path` if the caller may access it as `want` says.
fn checked<'v>(
    v: &'v mut dyn View,
    caller: Caller,
    path: &str,
    want: fn(Access) -> bool,
) -> Result<&'v Node, Errno> {
    // Two lookups: returning the borrow from a conditional branch and then
    // using `v` again is beyond today's borrow checker.
    if v.get(path).is_none() {
        return Err(missing(v, caller, path, want));
    }
    let node = v.get(path).ok_or(Errno::Enoent)?;
    if want(caller.access(node)) {
        Ok(node)
    } else {
        Err(Errno::Eacces)
    }
}

/// `XS_READ`.
pub(crate) fn read(v: &mut dyn View, caller: Caller, path: &str) -> Result<Vec<u8>, Errno> {
    Ok(checked(v, caller, path, Access::can_read)?.value.clone())
}

/// `XS_DIRECTORY`: child names, each NUL-terminated.
pub(crate) fn directory(v: &mut dyn View, caller: Caller, path: &str) -> Result<Vec<u8>, Errno> {
    let node = checked(v, caller, path, Access::can_read)?;
    let mut out = Vec::new();
    for name in &node.children {
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        if out.len() > PAYLOAD_MAX {
            return Err(Errno::E2big);
        }
    }
    Ok(out)
}

/// `XS_DIRECTORY_PART`: `<generation>\0` then whole child names from byte
/// `offset` of the full list, ending with an empty name once the list is done.
pub(crate) fn directory_part(
    v: &mut dyn View,
    caller: Caller,
    path: &str,
    offset: usize,
) -> Result<Vec<u8>, Errno> {
    let node = checked(v, caller, path, Access::can_read)?;
    let mut out = format!("{}\0", node.generation).into_bytes();
    let mut pos = 0usize;
    for name in &node.children {
        let len = name.len() + 1;
        if pos >= offset {
            // Keep one byte for the end-of-list marker.
            if out.len() + len + 1 > PAYLOAD_MAX {
                return Ok(out);
            }
            out.extend_from_slice(name.as_bytes());
            out.push(0);
        } else if pos + len > offset {
            // An offset inside a name is not one we ever handed out.
            return Err(Errno::Einval);
        }
        pos += len;
    }
    if offset > pos {
        return Err(Errno::Einval);
    }
    out.push(0);
    Ok(out)
}

/// `XS_GET_PERMS`: each entry NUL-terminated.
pub(crate) fn get_perms(v: &mut dyn View, caller: Caller, path: &str) -> Result<Vec<u8>, Errno> {
    let node = checked(v, caller, path, Access::can_read)?;
    let mut out = Vec::new();
    for p in &node.perms {
        out.extend_from_slice(p.to_string().as_bytes());
        out.push(0);
    }
    Ok(out)
}

/// `XS_WRITE`: replaces the value, or creates the node and missing parents.
pub(crate) fn write(
    v: &mut dyn View,
    caller: Caller,
    limits: Limits,
    path: &str,
    value: &[u8],
) -> Result<Change, Errno> {
    if !caller.privileged && value.len() > limits.max_value_size {
        return Err(Errno::E2big);
    }
    if v.get(path).is_none() {
        return create(v, caller, limits, path, value.to_vec());
    }
    let mut node = checked(v, caller, path, Access::can_write)?.clone();
    node.value = value.to_vec();
    let change = Change {
        path: path.to_owned(),
        recursive: false,
        perms: node.perms.clone(),
    };
    v.put(path, node);
    Ok(change)
}

/// `XS_MKDIR`: creates an empty node; an existing writable node is left alone.
pub(crate) fn mkdir(
    v: &mut dyn View,
    caller: Caller,
    limits: Limits,
    path: &str,
) -> Result<Option<Change>, Errno> {
    if v.get(path).is_none() {
        return create(v, caller, limits, path, Vec::new()).map(Some);
    }
    checked(v, caller, path, Access::can_write)?;
    Ok(None)
}

/// Creates `path` and any missing ancestors. Needs write access to the
/// nearest existing ancestor. New nodes inherit that ancestor's permissions;
/// an unprivileged creator becomes their owner (xenstored's
/// `construct_node`), and is charged for them against its node quota.
fn create(
    v: &mut dyn View,
    caller: Caller,
    limits: Limits,
    path: &str,
    value: Vec<u8>,
) -> Result<Change, Errno> {
    // Missing paths, deepest first.
    let mut missing_paths = vec![path.to_owned()];
    let mut cur = parent(path);
    let ancestor_path = loop {
        let Some(p) = cur else {
            // Only reachable if the root were missing, which never happens.
            return Err(Errno::Eio);
        };
        if v.get(p).is_some() {
            break p.to_owned();
        }
        missing_paths.push(p.to_owned());
        cur = parent(p);
    };
    let ancestor = checked(v, caller, &ancestor_path, Access::can_write)?.clone();
    if !caller.privileged
        && v.owned_by(caller.domid).saturating_add(missing_paths.len())
            > limits.max_nodes_per_domain
    {
        return Err(Errno::Equota);
    }
    let mut perms = ancestor.perms.clone();
    if !caller.privileged {
        if let Some(owner) = perms.first_mut() {
            owner.domid = caller.domid;
        }
    }
    // Link top-down: the existing ancestor gains the first missing child,
    // each new node the next one.
    let mut linked_parent = ancestor;
    let mut linked_parent_path = ancestor_path;
    for p in missing_paths.iter().rev() {
        linked_parent.children.insert(basename(p).to_owned());
        v.put(&linked_parent_path, linked_parent);
        linked_parent = Node::new(Vec::new(), perms.clone());
        linked_parent_path = p.clone();
    }
    linked_parent.value = value;
    v.put(&linked_parent_path, linked_parent);
    Ok(Change {
        path: path.to_owned(),
        recursive: false,
        perms,
    })
}

/// `XS_RM`: removes a node and its whole subtree. Removing a missing node
/// whose parent exists succeeds, as in xenstored.
pub(crate) fn rm(v: &mut dyn View, caller: Caller, path: &str) -> Result<Option<Change>, Errno> {
    let Some(parent_path) = parent(path) else {
        return Err(Errno::Einval);
    };
    if v.get(path).is_none() {
        let e = missing(v, caller, path, Access::can_write);
        return if e == Errno::Enoent && v.get(parent_path).is_some() {
            Ok(None)
        } else {
            Err(e)
        };
    }
    let perms = checked(v, caller, path, Access::can_write)?.perms.clone();
    // Collect the subtree iteratively: depth is bounded by the path length
    // limit, but breadth is not, so no recursion.
    let mut doomed = vec![path.to_owned()];
    let mut i = 0;
    while i < doomed.len() {
        let children: Vec<String> = v
            .get(&doomed[i])
            .map(|n| n.children.iter().map(|c| join(&doomed[i], c)).collect())
            .unwrap_or_default();
        doomed.extend(children);
        i += 1;
    }
    for p in doomed.iter().rev() {
        v.remove(p);
    }
    if let Some(mut parent_node) = v.get(parent_path).cloned() {
        parent_node.children.remove(basename(path));
        v.put(parent_path, parent_node);
    }
    Ok(Some(Change {
        path: path.to_owned(),
        recursive: true,
        perms,
    }))
}

/// `XS_SET_PERMS`: only the owner or a privileged caller may; an
/// unprivileged owner may not give the node away (`EPERM`).
pub(crate) fn set_perms(
    v: &mut dyn View,
    caller: Caller,
    path: &str,
    perms: Vec<Perm>,
) -> Result<Change, Errno> {
    let Some(new_owner) = perms.first().map(|p| p.domid) else {
        return Err(Errno::Einval);
    };
    let mut node = checked(v, caller, path, Access::can_write)?.clone();
    if !caller.privileged {
        if node.owner() != caller.domid {
            return Err(Errno::Eacces);
        }
        if new_owner != node.owner() {
            return Err(Errno::Eperm);
        }
    }
    node.perms = perms;
    let change = Change {
        path: path.to_owned(),
        recursive: false,
        perms: node.perms.clone(),
    };
    v.put(path, node);
    Ok(change)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOM0: Caller = Caller {
        domid: 0,
        privileged: true,
    };
    const DOM5: Caller = Caller {
        domid: 5,
        privileged: false,
    };
    const LIMITS: Limits = Limits {
        max_nodes_per_domain: 10,
        max_value_size: 16,
    };

    #[test]
    fn write_creates_parents_and_inherits_perms() {
        let mut t = Nodes::new();
        write(&mut t, DOM0, LIMITS, "/a/b/c", b"v").unwrap();
        assert_eq!(
            t.peek("/a").unwrap().children.iter().collect::<Vec<_>>(),
            ["b"]
        );
        assert_eq!(read(&mut t, DOM0, "/a/b/c").unwrap(), b"v");
        assert_eq!(read(&mut t, DOM0, "/a/b").unwrap(), b"");
        set_perms(&mut t, DOM0, "/a", vec![Perm::new(5, Access::None)]).unwrap();
        write(&mut t, DOM5, LIMITS, "/a/x/y", b"1").unwrap();
        assert_eq!(
            t.peek("/a/x/y").unwrap().perms,
            vec![Perm::new(5, Access::None)]
        );
        assert_eq!(t.owned_by(5), 3);
        assert_eq!(read(&mut t, DOM5, "/a/b/c"), Err(Errno::Eacces));
        assert_eq!(read(&mut t, DOM5, "/nope"), Err(Errno::Eacces));
        assert_eq!(read(&mut t, DOM5, "/a/nope"), Err(Errno::Enoent));
    }

    #[test]
    fn rm_subtree_and_counts() {
        let mut t = Nodes::new();
        for p in ["/a/b/c", "/a/b/d", "/a/e"] {
            write(&mut t, DOM0, LIMITS, p, b"").unwrap();
        }
        assert_eq!(t.len(), 6);
        rm(&mut t, DOM0, "/a/b").unwrap();
        assert_eq!(t.len(), 3);
        assert!(t.peek("/a/b/c").is_none());
        assert_eq!(t.peek("/a").unwrap().children.len(), 1);
        assert_eq!(rm(&mut t, DOM0, "/a/zz"), Ok(None));
        assert_eq!(rm(&mut t, DOM0, "/q/zz"), Err(Errno::Enoent));
        assert_eq!(rm(&mut t, DOM0, "/"), Err(Errno::Einval));
        assert_eq!(t.owned_by(0), 3);
    }

    #[test]
    fn directory_part_pages_through_long_lists() {
        let mut t = Nodes::new();
        let names: Vec<String> = (0..600).map(|i| format!("child-number-{i:04}")).collect();
        for n in &names {
            mkdir(&mut t, DOM0, LIMITS, &format!("/big/{n}")).unwrap();
        }
        assert_eq!(directory(&mut t, DOM0, "/big"), Err(Errno::E2big));
        let mut got = Vec::new();
        let mut offset = 0;
        loop {
            let part = directory_part(&mut t, DOM0, "/big", offset).unwrap();
            assert!(part.len() <= PAYLOAD_MAX);
            let body = part.strip_suffix(&[0]).unwrap();
            let mut it = body.split(|&b| b == 0).skip(1);
            let mut done = false;
            for name in it.by_ref() {
                if name.is_empty() {
                    done = true;
                    break;
                }
                offset += name.len() + 1;
                got.push(String::from_utf8(name.to_vec()).unwrap());
            }
            if done {
                break;
            }
        }
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(got, sorted);
        assert_eq!(directory_part(&mut t, DOM0, "/big", 3), Err(Errno::Einval));
    }

    #[test]
    fn transaction_conflicts_on_read_and_write_sets() {
        let mut t = Nodes::new();
        write(&mut t, DOM0, LIMITS, "/x", b"1").unwrap();
        write(&mut t, DOM0, LIMITS, "/y", b"1").unwrap();

        // Read /x in tx, someone writes /x: conflict.
        let mut tx = Tx::new(1);
        read(
            &mut TxView {
                nodes: &t,
                tx: &mut tx,
            },
            DOM0,
            "/x",
        )
        .unwrap();
        write(&mut t, DOM0, LIMITS, "/x", b"2").unwrap();
        assert_eq!(tx.commit(&mut t, DOM0, LIMITS), Err(Errno::Eagain));

        // Read /x in tx, someone writes /y: no conflict.
        let mut tx = Tx::new(1);
        {
            let mut view = TxView {
                nodes: &t,
                tx: &mut tx,
            };
            read(&mut view, DOM0, "/x").unwrap();
            write(&mut view, DOM0, LIMITS, "/z/new", b"3").unwrap();
            assert_eq!(read(&mut view, DOM0, "/z/new").unwrap(), b"3");
        }
        write(&mut t, DOM0, LIMITS, "/y", b"2").unwrap();
        assert!(t.peek("/z/new").is_none(), "isolated until commit");
        tx.commit(&mut t, DOM0, LIMITS).unwrap();
        assert_eq!(t.peek("/z/new").unwrap().value, b"3");
        assert!(t.peek("/").unwrap().children.contains("z"));

        // Read a missing node, someone creates it: conflict.
        let mut tx = Tx::new(1);
        assert_eq!(
            read(
                &mut TxView {
                    nodes: &t,
                    tx: &mut tx
                },
                DOM0,
                "/z/other"
            ),
            Err(Errno::Enoent)
        );
        write(&mut t, DOM0, LIMITS, "/z/other", b"").unwrap();
        assert_eq!(tx.commit(&mut t, DOM0, LIMITS), Err(Errno::Eagain));
    }

    #[test]
    fn quotas() {
        let mut t = Nodes::new();
        mkdir(&mut t, DOM0, LIMITS, "/d").unwrap();
        set_perms(&mut t, DOM0, "/d", vec![Perm::new(5, Access::None)]).unwrap();
        assert_eq!(
            write(&mut t, DOM5, LIMITS, "/d/v", &[0; 17]),
            Err(Errno::E2big)
        );
        for i in 0..9 {
            write(&mut t, DOM5, LIMITS, &format!("/d/{i}"), b"").unwrap();
        }
        assert_eq!(write(&mut t, DOM5, LIMITS, "/d/x", b""), Err(Errno::Equota));
        assert_eq!(
            set_perms(&mut t, DOM5, "/d/1", vec![Perm::new(6, Access::None)]),
            Err(Errno::Eperm)
        );
        rm(&mut t, DOM5, "/d/1").unwrap();
        write(&mut t, DOM5, LIMITS, "/d/x", b"").unwrap();
    }

    /// Structural invariants of the committed tree.
    fn check_invariants(t: &Nodes) {
        let mut counts: HashMap<u32, usize> = HashMap::new();
        for (path, node) in &t.map {
            *counts.entry(node.owner()).or_insert(0) += 1;
            assert!(!node.perms.is_empty(), "{path} has no perms");
            if let Some(p) = parent(path) {
                let parent_node = t
                    .map
                    .get(p)
                    .unwrap_or_else(|| panic!("{path}: parent missing"));
                assert!(
                    parent_node.children.contains(basename(path)),
                    "{path} not listed in parent"
                );
            }
            for c in &node.children {
                assert!(
                    t.map.contains_key(&join(path, c)),
                    "{path} lists missing child {c}"
                );
            }
        }
        assert_eq!(counts, t.owner_counts, "owner counts drifted");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(usize, u8),
        Mkdir(usize),
        Rm(usize),
        Chown(usize, u32),
    }

    const PATHS: [&str; 8] = [
        "/a", "/a/b", "/a/b/c", "/a/d", "/e", "/e/f/g", "/a/b/c/h", "/e/f",
    ];

    fn op_strategy() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        let p = 0..PATHS.len();
        prop_oneof![
            (p.clone(), any::<u8>()).prop_map(|(i, v)| Op::Write(i, v)),
            p.clone().prop_map(Op::Mkdir),
            p.clone().prop_map(Op::Rm),
            (p, 0u32..3).prop_map(|(i, d)| Op::Chown(i, d)),
        ]
    }

    fn apply(v: &mut dyn View, op: &Op) {
        let _ = match op {
            Op::Write(i, b) => write(v, DOM0, LIMITS, PATHS[*i], &[*b]).map(drop),
            Op::Mkdir(i) => mkdir(v, DOM0, LIMITS, PATHS[*i]).map(drop),
            Op::Rm(i) => rm(v, DOM0, PATHS[*i]).map(drop),
            Op::Chown(i, d) => {
                set_perms(v, DOM0, PATHS[*i], vec![Perm::new(*d, Access::None)]).map(drop)
            }
        };
    }

    /// Values, perms and children of every node, for comparing two trees.
    type Contents = std::collections::BTreeMap<String, (Vec<u8>, Vec<Perm>, BTreeSet<String>)>;

    fn contents(t: &Nodes) -> Contents {
        t.map
            .iter()
            .map(|(k, n)| {
                (
                    k.clone(),
                    (n.value.clone(), n.perms.clone(), n.children.clone()),
                )
            })
            .collect()
    }

    proptest::proptest! {
        /// Random operations, some batched in transactions, keep the tree
        /// consistent, and a committed transaction has exactly the effect
        /// of running its operations directly.
        #[test]
        fn random_ops_keep_tree_consistent(
            batches in proptest::collection::vec(
                (proptest::collection::vec(op_strategy(), 1..8), proptest::bool::ANY),
                1..12,
            )
        ) {
            let mut t = Nodes::new();
            let mut model = Nodes::new();
            for (ops, in_tx) in &batches {
                if *in_tx {
                    let mut tx = Tx::new(1);
                    for op in ops {
                        apply(&mut TxView { nodes: &t, tx: &mut tx }, op);
                    }
                    tx.commit(&mut t, DOM0, LIMITS).unwrap();
                } else {
                    for op in ops {
                        apply(&mut t, op);
                    }
                }
                for op in ops {
                    apply(&mut model, op);
                }
                check_invariants(&t);
                proptest::prop_assert_eq!(contents(&t), contents(&model));
            }
        }
    }

    proptest::proptest! {
        /// Serializability: a transaction that commits despite concurrent
        /// direct writes has the same effect as running after them; one
        /// that fails with EAGAIN has no effect at all.
        #[test]
        fn committed_transactions_are_serializable(
            setup in proptest::collection::vec(op_strategy(), 0..10),
            tx_ops in proptest::collection::vec(op_strategy(), 1..6),
            concurrent in proptest::collection::vec(op_strategy(), 0..4),
        ) {
            let mut t = Nodes::new();
            for op in &setup {
                apply(&mut t, op);
            }
            let mut tx = Tx::new(1);
            for op in &tx_ops {
                apply(&mut TxView { nodes: &t, tx: &mut tx }, op);
            }
            for op in &concurrent {
                apply(&mut t, op);
            }
            let mut serial = Nodes::new();
            for op in setup.iter().chain(&concurrent) {
                apply(&mut serial, op);
            }
            match tx.commit(&mut t, DOM0, LIMITS) {
                Ok(_) => {
                    for op in &tx_ops {
                        apply(&mut serial, op);
                    }
                }
                Err(e) => proptest::prop_assert_eq!(e, Errno::Eagain),
            }
            check_invariants(&t);
            proptest::prop_assert_eq!(contents(&t), contents(&serial));
        }
    }
}
