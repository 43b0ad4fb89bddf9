//! The node tree: nodes with values, permissions and ordered children, the
//! committed store, path helpers and the permission check of C xenstored
//! (`perm_for_conn()`, `get_parent()`, `is_child()` in `xenstored_core.c` and
//! `xenstored_watch.c`).

use std::collections::HashMap;

use xs_wire::{Access, Perm, XsErrno};

/// `XS_PERM_READ`.
pub(crate) const PERM_READ: u8 = 1;
/// `XS_PERM_WRITE`.
pub(crate) const PERM_WRITE: u8 = 2;
/// `XS_PERM_OWNER`.
pub(crate) const PERM_OWNER: u8 = 8;

/// Size of `struct node_hdr` (generation u64, num_perms, datalen, childlen),
/// counted by xenstored's node-size quota (`calc_node_acc_size()`).
const NODE_HDR_SIZE: usize = 8 + 2 + 2 + 4;
/// Size of `struct xs_permissions` (perms, id).
const PERM_SIZE: usize = 8;

/// One node: its value, its permissions (the first entry names the owner and
/// the access of everyone not listed) and its children, in creation order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// The value (binary).
    pub value: Vec<u8>,
    /// The permission list, never empty.
    pub perms: Vec<Perm>,
    /// Child names, in the order they were added (as xenstored lists them).
    pub children: Vec<String>,
    /// Generation at the last committed change (used for transaction conflicts).
    pub generation: u64,
}

impl Node {
    /// A node with no value and no children.
    pub fn new(perms: Vec<Perm>) -> Self {
        Node { value: Vec::new(), perms, children: Vec::new(), generation: 0 }
    }

    /// The owning domain (first permission entry).
    pub fn owner(&self) -> u32 {
        self.perms[0].domid
    }

    /// Bytes counted against the node-size quota, as `calc_node_acc_size()`.
    pub fn acc_size(&self) -> usize {
        NODE_HDR_SIZE
            + self.perms.len() * PERM_SIZE
            + self.value.len()
            + self.children.iter().map(|c| c.len() + 1).sum::<usize>()
    }

    /// The children as an `XS_DIRECTORY` payload (each name NUL-terminated).
    pub fn children_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for c in &self.children {
            out.extend_from_slice(c.as_bytes());
            out.push(0);
        }
        out
    }
}

/// Who is asking: the connection's domain, whether it is privileged, and the
/// domain it was made the target of (`XS_SET_TARGET`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The connection's domain.
    pub domid: u32,
    /// Dom0 or a socket connection: every permission.
    pub privileged: bool,
    /// Domain whose nodes this one may treat as its own.
    pub target: Option<u32>,
}

impl Caller {
    /// A privileged dom0 caller.
    pub fn dom0() -> Self {
        Caller { domid: 0, privileged: true, target: None }
    }

    /// An unprivileged domain.
    #[cfg(test)]
    pub fn domain(domid: u32) -> Self {
        Caller { domid, privileged: domid == 0, target: None }
    }

    fn is(&self, domid: u32) -> bool {
        domid == self.domid || self.target == Some(domid)
    }

    /// `perm_for_conn()`: the `PERM_*` bits this caller has on `perms`.
    pub fn perm_for(&self, perms: &[Perm]) -> u8 {
        let all = PERM_READ | PERM_WRITE | PERM_OWNER;
        let Some(first) = perms.first() else { return if self.privileged { all } else { 0 } };
        if self.privileged || self.is(first.domid) {
            return all;
        }
        let entry = perms[1..].iter().find(|p| self.is(p.domid)).unwrap_or(first);
        access_bits(entry.access)
    }

    /// Whether the caller may read a node with `perms`.
    pub fn can_read(&self, perms: &[Perm]) -> bool {
        self.perm_for(perms) & PERM_READ != 0
    }
}

fn access_bits(a: Access) -> u8 {
    match a {
        Access::None => 0,
        Access::Read => PERM_READ,
        Access::Write => PERM_WRITE,
        Access::Both => PERM_READ | PERM_WRITE,
    }
}

/// `get_parent()`: everything before the last `/`, or `/` (also for `@` names).
pub fn parent_of(path: &str) -> &str {
    match path.get(1..).and_then(|rest| rest.rfind('/')) {
        Some(i) => &path[..i + 1],
        None => "/",
    }
}

/// The last component (the path must not be `/`).
pub fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// `child_name()`: a child path under `parent`.
pub fn child_path(parent: &str, child: &str) -> String {
    if parent == "/" {
        format!("/{child}")
    } else {
        format!("{parent}/{child}")
    }
}

/// `is_child()`: whether `child` is `parent` or below it (everything is below `/`).
pub fn is_child(child: &str, parent: &str) -> bool {
    if parent == "/" {
        return true;
    }
    match child.strip_prefix(parent) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Reading and writing nodes, committed or within a transaction. Node
/// counts per owner (the `nodes` quota) follow every write and delete.
pub trait Store {
    /// The node at `path`, if it exists.
    fn read(&mut self, path: &str) -> Result<Option<Node>, XsErrno>;
    /// Creates or replaces the node at `path`.
    fn write(&mut self, path: &str, node: Node) -> Result<(), XsErrno>;
    /// Deletes the node at `path` (not its children).
    fn delete(&mut self, path: &str) -> Result<(), XsErrno>;
    /// Nodes owned by `domid`, as this store sees them.
    fn entries(&self, domid: u32) -> usize;
    /// The node at `path` without recording an access (for watch permissions).
    fn peek(&self, path: &str) -> Option<Node>;
}

/// The committed tree: nodes by full path (special `@` nodes included),
/// a generation counter, and node counts per owner.
#[derive(Debug)]
pub struct Tree {
    nodes: HashMap<String, Node>,
    next_generation: u64,
    entries: HashMap<u32, usize>,
}

impl Default for Tree {
    fn default() -> Self {
        Self::new()
    }
}

impl Tree {
    /// The tree `setup_structure()` creates: `/`, `/tool`, `/tool/xenstored`
    /// and the special nodes `@releaseDomain` and `@introduceDomain`, all
    /// owned by dom0 with no access for others (`n0`).
    pub fn new() -> Self {
        let mut t = Tree { nodes: HashMap::new(), next_generation: 1, entries: HashMap::new() };
        let n0 = vec![Perm::new(Access::None, 0)];
        let mk = |children: &[&str]| {
            let mut n = Node::new(n0.clone());
            n.children = children.iter().map(|c| c.to_string()).collect();
            n
        };
        t.put("/", mk(&["tool"]));
        t.put("/tool", mk(&["xenstored"]));
        t.put("/tool/xenstored", mk(&[]));
        t.put("@releaseDomain", mk(&[]));
        t.put("@introduceDomain", mk(&[]));
        t
    }

    /// The committed node at `path`.
    pub fn get(&self, path: &str) -> Option<&Node> {
        self.nodes.get(path)
    }

    /// The generation of the committed node at `path`, `None` if absent.
    pub fn generation(&self, path: &str) -> Option<u64> {
        self.nodes.get(path).map(|n| n.generation)
    }

    /// Number of nodes (special nodes included).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// A generation no node has had yet (xenstored's global `generation++`).
    pub fn fresh_generation(&mut self) -> u64 {
        let g = self.next_generation;
        self.next_generation += 1;
        g
    }

    /// Stores `node` with a fresh generation, keeping the owner counts.
    pub fn put(&mut self, path: &str, mut node: Node) {
        node.generation = self.fresh_generation();
        *self.entries.entry(node.owner()).or_default() += 1;
        if let Some(old) = self.nodes.insert(path.to_string(), node) {
            self.dec_owner(old.owner());
        }
    }

    /// Removes the node at `path`, keeping the owner counts.
    pub fn remove(&mut self, path: &str) -> Option<Node> {
        let old = self.nodes.remove(path)?;
        self.dec_owner(old.owner());
        Some(old)
    }

    fn dec_owner(&mut self, owner: u32) {
        if let Some(n) = self.entries.get_mut(&owner) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.entries.remove(&owner);
            }
        }
    }

    /// Checks the tree's structure: every node but `/` and the special ones
    /// is listed by its parent, every listed child exists, the owner counts
    /// match the nodes. Returns the first inconsistency found.
    #[cfg(test)]
    pub fn check(&self) -> Result<(), String> {
        let mut owners: HashMap<u32, usize> = HashMap::new();
        for (path, node) in &self.nodes {
            *owners.entry(node.owner()).or_default() += 1;
            for c in &node.children {
                if !self.nodes.contains_key(&child_path(path, c)) {
                    return Err(format!("{path} lists missing child {c}"));
                }
            }
            if path != "/" && !path.starts_with('@') {
                let parent = self.nodes.get(parent_of(path)).ok_or(format!("{path} has no parent"))?;
                if parent.children.iter().filter(|c| *c == basename(path)).count() != 1 {
                    return Err(format!("{path} not listed once by its parent"));
                }
            }
        }
        if owners != self.entries {
            return Err(format!("owner counts {:?} != {:?}", self.entries, owners));
        }
        Ok(())
    }

    /// Nodes owned by `domid`.
    pub fn owned_by(&self, domid: u32) -> usize {
        self.entries.get(&domid).copied().unwrap_or(0)
    }
}

impl Store for Tree {
    fn read(&mut self, path: &str) -> Result<Option<Node>, XsErrno> {
        Ok(self.nodes.get(path).cloned())
    }

    fn write(&mut self, path: &str, node: Node) -> Result<(), XsErrno> {
        self.put(path, node);
        Ok(())
    }

    fn delete(&mut self, path: &str) -> Result<(), XsErrno> {
        self.remove(path);
        Ok(())
    }

    fn entries(&self, domid: u32) -> usize {
        self.owned_by(domid)
    }

    fn peek(&self, path: &str) -> Option<Node> {
        self.nodes.get(path).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perms(s: &[&str]) -> Vec<Perm> {
        s.iter().map(|p| p.parse().unwrap()).collect()
    }

    #[test]
    fn owner_and_target_get_everything() {
        let p = perms(&["n5", "r7"]);
        assert_eq!(Caller::domain(5).perm_for(&p), PERM_READ | PERM_WRITE | PERM_OWNER);
        let targeting = Caller { domid: 9, privileged: false, target: Some(5) };
        assert_eq!(targeting.perm_for(&p), PERM_READ | PERM_WRITE | PERM_OWNER);
        assert_eq!(Caller::dom0().perm_for(&p), PERM_READ | PERM_WRITE | PERM_OWNER);
    }

    #[test]
    fn listed_domain_gets_its_entry_others_the_first() {
        let p = perms(&["r5", "w7", "n8"]);
        assert_eq!(Caller::domain(7).perm_for(&p), PERM_WRITE);
        assert_eq!(Caller::domain(8).perm_for(&p), 0);
        assert_eq!(Caller::domain(9).perm_for(&p), PERM_READ);
    }

    #[test]
    fn parent_of_matches_get_parent() {
        assert_eq!(parent_of("/a/b/c"), "/a/b");
        assert_eq!(parent_of("/a"), "/");
        assert_eq!(parent_of("/"), "/");
        assert_eq!(parent_of("@releaseDomain"), "/");
    }

    #[test]
    fn is_child_respects_component_boundaries() {
        assert!(is_child("/a/b", "/a"));
        assert!(is_child("/a", "/a"));
        assert!(!is_child("/ab", "/a"));
        assert!(is_child("/anything", "/"));
        assert!(!is_child("/a", "/a/b"));
    }

    #[test]
    fn initial_tree_is_setup_structure() {
        let t = Tree::new();
        assert_eq!(t.get("/").unwrap().children, vec!["tool"]);
        assert_eq!(t.get("/tool").unwrap().children, vec!["xenstored"]);
        assert!(t.get("/tool/xenstored").is_some());
        assert!(t.get("@releaseDomain").is_some() && t.get("@introduceDomain").is_some());
        assert_eq!(t.owned_by(0), 5);
    }

    #[test]
    fn put_and_remove_keep_owner_counts_and_bump_generation() {
        let mut t = Tree::new();
        t.put("/x", Node::new(perms(&["n3"])));
        let g1 = t.generation("/x").unwrap();
        t.put("/x", Node::new(perms(&["n4"])));
        assert!(t.generation("/x").unwrap() > g1);
        assert_eq!((t.owned_by(3), t.owned_by(4)), (0, 1));
        t.remove("/x");
        assert_eq!(t.owned_by(4), 0);
        assert_eq!(t.generation("/x"), None);
    }

    #[test]
    fn acc_size_counts_header_perms_value_and_children() {
        let mut n = Node::new(perms(&["n0", "r1"]));
        n.value = b"abc".to_vec();
        n.children = vec!["x".into(), "yz".into()];
        assert_eq!(n.acc_size(), 16 + 16 + 3 + 5);
    }
}
