//! Transactions as in `xenstored_transaction.c` (Xen 4.17, see the notes at
//! its top and `access_node()`): the first access of a node in a transaction
//! (read, directory, get-perms, write, rm...) takes a private copy of it, or
//! notes that it was absent, together with its committed generation. From
//! then on the transaction sees only that copy and its own writes and
//! removals of it: a change made outside is not seen inside. At commit, if
//! a node the transaction first read has a different committed generation
//! (changed, removed or created meanwhile), the commit fails with `EAGAIN`
//! and nothing is applied; otherwise the nodes it modified become the
//! committed tree and the watch events it queued fire.

use std::collections::HashMap;

use xs_wire::XsErrno;

use super::node::{Node, Store, Tree};
use super::watch::Fire;

/// A node as one transaction sees it (`struct accessed_node`).
#[derive(Debug)]
struct Accessed {
    /// The transaction's copy: as first read, then as written; `None` if
    /// absent or removed.
    node: Option<Node>,
    /// Committed generation at the first access, `None` if absent.
    generation: Option<u64>,
    /// Whether the commit must find that generation unchanged (`check_gen`:
    /// the first access was a read).
    check: bool,
    /// Written or removed in the transaction (`modified`).
    modified: bool,
}

/// One open transaction of a connection.
#[derive(Debug, Default)]
pub struct Transaction {
    /// Every node accessed, with the transaction's copy.
    accessed: HashMap<String, Accessed>,
    /// Change in node counts per owner made by the modified nodes.
    entry_delta: HashMap<u32, i64>,
    /// Watch events to fire at commit, in order, without duplicates.
    fires: Vec<Fire>,
    /// Accessed-node limit (`transaction-nodes` quota), `None` for none.
    node_limit: Option<usize>,
}

impl Transaction {
    /// An empty transaction; `node_limit` bounds the nodes it may access.
    pub fn new(node_limit: Option<usize>) -> Self {
        Transaction { node_limit, ..Default::default() }
    }

    /// Queues a watch event for commit (`queue_watches()`), once per path and kind.
    pub fn queue_fire(&mut self, fire: Fire) {
        if let Some(f) = self.fires.iter_mut().find(|f| f.path == fire.path && f.exact == fire.exact) {
            f.perm_sets.extend(fire.perm_sets);
        } else {
            self.fires.push(fire);
        }
    }

    /// A view of `tree` through this transaction.
    pub fn store<'a>(&'a mut self, tree: &'a mut Tree) -> TxStore<'a> {
        TxStore { tree, tx: self }
    }

    /// Commits into `tree` (`finalize_transaction()`): `EAGAIN`, and nothing
    /// applied, if a node first read in it changed since; otherwise returns
    /// the watch events to fire.
    pub fn commit(self, tree: &mut Tree) -> Result<Vec<Fire>, XsErrno> {
        if let Some((path, _)) = self.accessed.iter().find(|(path, a)| a.check && tree.generation(path) != a.generation)
        {
            log::debug!("xenstored: transaction conflict on {path}");
            return Err(XsErrno::EAGAIN);
        }
        // Removals first, then writes parents before children, so that the
        // committed tree never holds a child without its parent entry.
        let mut changed: Vec<(String, Option<Node>)> =
            self.accessed.into_iter().filter(|(_, a)| a.modified).map(|(p, a)| (p, a.node)).collect();
        changed.sort_by(|a, b| a.1.is_some().cmp(&b.1.is_some()).then(a.0.len().cmp(&b.0.len())));
        for (path, node) in changed {
            match node {
                Some(n) => tree.put(&path, n),
                None => {
                    tree.remove(&path);
                }
            }
        }
        Ok(self.fires)
    }
}

/// A [`Store`] on a transaction's copies, taken from the committed tree at
/// each node's first access.
pub struct TxStore<'a> {
    tree: &'a mut Tree,
    tx: &'a mut Transaction,
}

impl TxStore<'_> {
    /// `access_node()`: the transaction's entry for `path`, taking the copy
    /// at the first access (`read` says whether that access is a read).
    fn access(&mut self, path: &str, read: bool) -> Result<&mut Accessed, XsErrno> {
        if !self.tx.accessed.contains_key(path) {
            if self.tx.node_limit.is_some_and(|l| self.tx.accessed.len() >= l) {
                return Err(XsErrno::ENOSPC);
            }
            let node = self.tree.get(path).cloned();
            let generation = node.as_ref().map(|n| n.generation);
            self.tx.accessed.insert(path.to_string(), Accessed { node, generation, check: read, modified: false });
        }
        Ok(self.tx.accessed.get_mut(path).expect("just inserted"))
    }

    /// The node as the transaction sees it, without recording an access.
    fn current(&self, path: &str) -> Option<&Node> {
        match self.tx.accessed.get(path) {
            Some(a) => a.node.as_ref(),
            None => self.tree.get(path),
        }
    }

    fn adjust(&mut self, owner: u32, delta: i64) {
        *self.tx.entry_delta.entry(owner).or_default() += delta;
    }

    /// Replaces the transaction's copy of `path` (`None`: removed).
    fn modify(&mut self, path: &str, node: Option<Node>) -> Result<(), XsErrno> {
        let entry = self.access(path, false)?;
        entry.modified = true;
        let old = std::mem::replace(&mut entry.node, node);
        let new_owner = entry.node.as_ref().map(Node::owner);
        if let Some(owner) = old.as_ref().map(Node::owner) {
            self.adjust(owner, -1);
        }
        if let Some(owner) = new_owner {
            self.adjust(owner, 1);
        }
        Ok(())
    }
}

impl Store for TxStore<'_> {
    fn read(&mut self, path: &str) -> Result<Option<Node>, XsErrno> {
        Ok(self.access(path, true)?.node.clone())
    }

    fn write(&mut self, path: &str, mut node: Node) -> Result<(), XsErrno> {
        // A written node gets a fresh generation, as in xenstored, so that
        // `XS_DIRECTORY_PART` inside the transaction sees the change.
        node.generation = self.tree.fresh_generation();
        self.modify(path, Some(node))
    }

    fn delete(&mut self, path: &str) -> Result<(), XsErrno> {
        self.modify(path, None)
    }

    fn entries(&self, domid: u32) -> usize {
        let base = self.tree.owned_by(domid) as i64;
        (base + self.tx.entry_delta.get(&domid).copied().unwrap_or(0)).max(0) as usize
    }

    fn peek(&self, path: &str) -> Option<Node> {
        self.current(path).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xenstored::config::Quotas;
    use crate::xenstored::node::Caller;
    use crate::xenstored::ops::Op;
    use xs_wire::{Access, Perm};

    fn node(v: &[u8]) -> Node {
        let mut n = Node::new(vec![Perm::new(Access::None, 0)]);
        n.value = v.to_vec();
        n
    }

    #[test]
    fn writes_are_private_until_commit() {
        let mut tree = Tree::new();
        let mut tx = Transaction::new(None);
        tx.store(&mut tree).write("/tool/x", node(b"1")).unwrap();
        assert!(tree.get("/tool/x").is_none());
        assert_eq!(tx.store(&mut tree).read("/tool/x").unwrap().unwrap().value, b"1");
        tx.commit(&mut tree).unwrap();
        assert_eq!(tree.get("/tool/x").unwrap().value, b"1");
    }

    #[test]
    fn commit_fails_with_eagain_when_a_read_node_changed() {
        let mut tree = Tree::new();
        let mut tx = Transaction::new(None);
        tx.store(&mut tree).read("/tool").unwrap();
        tx.store(&mut tree).write("/tool/y", node(b"t")).unwrap();
        tree.put("/tool", node(b"changed"));
        assert_eq!(tx.commit(&mut tree).unwrap_err(), XsErrno::EAGAIN);
        assert!(tree.get("/tool/y").is_none());
    }

    #[test]
    fn creation_of_a_node_found_missing_conflicts() {
        let mut tree = Tree::new();
        let mut tx = Transaction::new(None);
        assert!(tx.store(&mut tree).read("/new").unwrap().is_none());
        tree.put("/new", node(b""));
        assert_eq!(tx.commit(&mut tree).unwrap_err(), XsErrno::EAGAIN);
    }

    #[test]
    fn untouched_changes_do_not_conflict() {
        let mut tree = Tree::new();
        let mut tx = Transaction::new(None);
        tx.store(&mut tree).read("/tool").unwrap();
        tree.put("/other", node(b""));
        assert!(tx.commit(&mut tree).is_ok());
    }

    #[test]
    fn touched_node_limit_gives_enospc() {
        let mut tree = Tree::new();
        let mut tx = Transaction::new(Some(2));
        let mut s = tx.store(&mut tree);
        s.read("/a").unwrap();
        s.read("/b").unwrap();
        s.read("/a").unwrap();
        assert_eq!(s.read("/c").unwrap_err(), XsErrno::ENOSPC);
    }

    #[test]
    fn entry_counts_include_uncommitted_changes() {
        let mut tree = Tree::new();
        let mut tx = Transaction::new(None);
        let mut s = tx.store(&mut tree);
        let mut n = node(b"");
        n.perms[0].domid = 4;
        s.write("/d4", n).unwrap();
        assert_eq!(s.entries(4), 1);
        s.delete("/d4").unwrap();
        assert_eq!(s.entries(4), 0);
        assert_eq!(tree.owned_by(4), 0);
    }

    /// Runs one request in `tx` as dom0; returns the reply (or error).
    fn in_tx(
        tx: &mut Transaction,
        tree: &mut Tree,
        f: impl FnOnce(&mut Op) -> Result<Vec<u8>, XsErrno>,
    ) -> Result<Vec<u8>, XsErrno> {
        let q = Quotas::default();
        let mut store = tx.store(tree);
        let mut op = Op { store: &mut store, caller: Caller::dom0(), quotas: &q, fires: Vec::new() };
        let r = f(&mut op);
        for fire in std::mem::take(&mut op.fires) {
            tx.queue_fire(fire);
        }
        r
    }

    /// Runs one request outside any transaction as dom0.
    fn outside(tree: &mut Tree, f: impl FnOnce(&mut Op) -> Result<Vec<u8>, XsErrno>) -> Result<Vec<u8>, XsErrno> {
        let q = Quotas::default();
        let mut op = Op { store: tree, caller: Caller::dom0(), quotas: &q, fires: Vec::new() };
        f(&mut op)
    }

    #[test]
    fn read_in_tx_keeps_the_copy_of_its_first_access() {
        let mut tree = Tree::new();
        outside(&mut tree, |op| op.write(b"/a\0a")).unwrap();
        let mut tx = Transaction::new(None);
        assert_eq!(in_tx(&mut tx, &mut tree, |op| op.read(b"/a\0")).unwrap(), b"a");
        outside(&mut tree, |op| op.write(b"/a\0b")).unwrap();
        assert_eq!(in_tx(&mut tx, &mut tree, |op| op.read(b"/a\0")).unwrap(), b"a");
        assert_eq!(tx.commit(&mut tree).unwrap_err(), XsErrno::EAGAIN);
        assert_eq!(tree.get("/a").unwrap().value, b"b");
    }

    #[test]
    fn node_found_missing_stays_missing_in_tx() {
        let mut tree = Tree::new();
        let mut tx = Transaction::new(None);
        assert_eq!(in_tx(&mut tx, &mut tree, |op| op.read(b"/n\0")).unwrap_err(), XsErrno::ENOENT);
        outside(&mut tree, |op| op.write(b"/n\0x")).unwrap();
        assert_eq!(in_tx(&mut tx, &mut tree, |op| op.read(b"/n\0")).unwrap_err(), XsErrno::ENOENT);
        assert_eq!(tx.commit(&mut tree).unwrap_err(), XsErrno::EAGAIN);
    }

    #[test]
    fn own_write_after_outside_write_is_seen_and_still_conflicts() {
        let mut tree = Tree::new();
        outside(&mut tree, |op| op.write(b"/a\0a")).unwrap();
        let mut tx = Transaction::new(None);
        in_tx(&mut tx, &mut tree, |op| op.read(b"/a\0")).unwrap();
        outside(&mut tree, |op| op.write(b"/a\0b")).unwrap();
        in_tx(&mut tx, &mut tree, |op| op.write(b"/a\0c")).unwrap();
        assert_eq!(in_tx(&mut tx, &mut tree, |op| op.read(b"/a\0")).unwrap(), b"c");
        assert_eq!(tx.commit(&mut tree).unwrap_err(), XsErrno::EAGAIN);
        assert_eq!(tree.get("/a").unwrap().value, b"b");
    }

    #[test]
    fn directory_in_tx_lists_the_copy_and_own_changes() {
        let mut tree = Tree::new();
        outside(&mut tree, |op| op.write(b"/d/x\0")).unwrap();
        let mut tx = Transaction::new(None);
        assert_eq!(in_tx(&mut tx, &mut tree, |op| op.directory(b"/d\0")).unwrap(), b"x\0");
        outside(&mut tree, |op| op.write(b"/d/outside\0")).unwrap();
        assert_eq!(in_tx(&mut tx, &mut tree, |op| op.directory(b"/d\0")).unwrap(), b"x\0", "outside child unseen");
        in_tx(&mut tx, &mut tree, |op| op.write(b"/d/mine\0")).unwrap();
        assert_eq!(in_tx(&mut tx, &mut tree, |op| op.directory(b"/d\0")).unwrap(), b"x\0mine\0");
        assert_eq!(outside(&mut tree, |op| op.directory(b"/d\0")).unwrap(), b"x\0outside\0");
        assert_eq!(tx.commit(&mut tree).unwrap_err(), XsErrno::EAGAIN);
    }

    #[test]
    fn directory_part_in_tx_gets_a_new_generation_after_own_write() {
        let mut tree = Tree::new();
        outside(&mut tree, |op| op.write(b"/d/x\0")).unwrap();
        let before = tree.get("/d").unwrap().generation;
        let mut tx = Transaction::new(None);
        in_tx(&mut tx, &mut tree, |op| op.write(b"/d/y\0")).unwrap();
        let reply = in_tx(&mut tx, &mut tree, |op| op.directory_part(b"/d\x000\0")).unwrap();
        let gen: u64 = std::str::from_utf8(reply.split(|&b| b == 0).next().unwrap()).unwrap().parse().unwrap();
        assert_ne!(gen, before);
        assert!(reply.ends_with(b"x\0y\0\0"), "{reply:?}");
    }

    #[test]
    fn rm_in_tx_hides_the_subtree_until_commit() {
        let mut tree = Tree::new();
        outside(&mut tree, |op| op.write(b"/r/a/b\0v")).unwrap();
        let mut tx = Transaction::new(None);
        in_tx(&mut tx, &mut tree, |op| op.rm(b"/r/a\0")).unwrap();
        assert_eq!(in_tx(&mut tx, &mut tree, |op| op.read(b"/r/a/b\0")).unwrap_err(), XsErrno::ENOENT);
        assert_eq!(in_tx(&mut tx, &mut tree, |op| op.directory(b"/r\0")).unwrap(), b"");
        assert_eq!(outside(&mut tree, |op| op.read(b"/r/a/b\0")).unwrap(), b"v", "committed tree untouched");
        let fires = tx.commit(&mut tree).unwrap();
        assert!(tree.get("/r/a").is_none() && tree.get("/r/a/b").is_none());
        assert_eq!(tree.get("/r").unwrap().children, Vec::<String>::new());
        assert!(fires.iter().any(|f| f.path == "/r/a" && !f.exact));
        tree.check().unwrap();
    }

    #[test]
    fn write_in_tx_then_rm_in_tx_commits_nothing_new() {
        let mut tree = Tree::new();
        let mut tx = Transaction::new(None);
        in_tx(&mut tx, &mut tree, |op| op.write(b"/w/x\0v")).unwrap();
        in_tx(&mut tx, &mut tree, |op| op.rm(b"/w\0")).unwrap();
        tx.commit(&mut tree).unwrap();
        assert!(tree.get("/w").is_none() && tree.get("/w/x").is_none());
        tree.check().unwrap();
    }

    #[test]
    fn outside_change_of_a_node_only_read_conflicts() {
        let mut tree = Tree::new();
        outside(&mut tree, |op| op.write(b"/only-read\0")).unwrap();
        let mut tx = Transaction::new(None);
        in_tx(&mut tx, &mut tree, |op| op.get_perms(b"/only-read\0")).unwrap();
        in_tx(&mut tx, &mut tree, |op| op.write(b"/tool/mine\0")).unwrap();
        outside(&mut tree, |op| op.set_perms(b"/only-read\0n0\0r1\0")).unwrap();
        assert_eq!(tx.commit(&mut tree).unwrap_err(), XsErrno::EAGAIN);
        assert!(tree.get("/tool/mine").is_none(), "nothing applied");
    }

    #[test]
    fn outside_removal_of_a_node_only_read_conflicts() {
        let mut tree = Tree::new();
        outside(&mut tree, |op| op.write(b"/gone\0")).unwrap();
        let mut tx = Transaction::new(None);
        in_tx(&mut tx, &mut tree, |op| op.read(b"/gone\0")).unwrap();
        outside(&mut tree, |op| op.rm(b"/gone\0")).unwrap();
        assert_eq!(in_tx(&mut tx, &mut tree, |op| op.read(b"/gone\0")).unwrap(), b"");
        assert_eq!(tx.commit(&mut tree).unwrap_err(), XsErrno::EAGAIN);
    }

    #[test]
    fn outside_changes_of_unrelated_nodes_do_not_conflict() {
        let mut tree = Tree::new();
        outside(&mut tree, |op| op.write(b"/mine/v\0a")).unwrap();
        outside(&mut tree, |op| op.write(b"/theirs/v\0a")).unwrap();
        let mut tx = Transaction::new(None);
        in_tx(&mut tx, &mut tree, |op| op.read(b"/mine/v\0")).unwrap();
        in_tx(&mut tx, &mut tree, |op| op.write(b"/mine/v\0b")).unwrap();
        outside(&mut tree, |op| op.write(b"/theirs/v\0b")).unwrap();
        outside(&mut tree, |op| op.write(b"/theirs/new\0")).unwrap();
        tx.commit(&mut tree).unwrap();
        assert_eq!(tree.get("/mine/v").unwrap().value, b"b");
        assert_eq!(tree.get("/theirs/v").unwrap().value, b"b");
        tree.check().unwrap();
    }

    #[test]
    fn two_interfering_transactions_first_commit_wins() {
        // The fourth example of xenstored_transaction.c's notes.
        let mut tree = Tree::new();
        outside(&mut tree, |op| op.write(b"/A\0")).unwrap();
        outside(&mut tree, |op| op.write(b"/B\0")).unwrap();
        let (mut t1, mut t2) = (Transaction::new(None), Transaction::new(None));
        in_tx(&mut t1, &mut tree, |op| op.read(b"/A\0")).unwrap();
        in_tx(&mut t2, &mut tree, |op| op.read(b"/B\0")).unwrap();
        in_tx(&mut t1, &mut tree, |op| op.write(b"/B\x001")).unwrap();
        in_tx(&mut t2, &mut tree, |op| op.write(b"/A\x002")).unwrap();
        t1.commit(&mut tree).unwrap();
        assert_eq!(t2.commit(&mut tree).unwrap_err(), XsErrno::EAGAIN);
        assert_eq!((&tree.get("/A").unwrap().value[..], &tree.get("/B").unwrap().value[..]), (&b""[..], &b"1"[..]));
    }
}
