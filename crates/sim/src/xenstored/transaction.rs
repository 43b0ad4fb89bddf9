//! Transactions as in `xenstored_transaction.c` (Xen 4.17): a transaction
//! keeps private copies of the nodes it writes or deletes, and remembers the
//! generation of every node it touched (read, written or found missing). At
//! commit, if any touched node's committed generation changed, the commit
//! fails with `EAGAIN`; otherwise its copies become the committed tree and
//! the watch events it queued fire.

use std::collections::HashMap;

use xs_wire::XsErrno;

use super::node::{Node, Store, Tree};
use super::watch::Fire;

/// One open transaction of a connection.
#[derive(Debug, Default)]
pub struct Transaction {
    /// Committed generation of every node touched, `None` if it was absent.
    accessed: HashMap<String, Option<u64>>,
    /// Written (`Some`) or deleted (`None`) nodes, not yet committed.
    changed: HashMap<String, Option<Node>>,
    /// Change in node counts per owner made by `changed`.
    entry_delta: HashMap<u32, i64>,
    /// Watch events to fire at commit, in order, without duplicates.
    fires: Vec<Fire>,
    /// Touched-node limit (`transaction-nodes` quota), `None` for none.
    node_limit: Option<usize>,
}

impl Transaction {
    /// An empty transaction; `node_limit` bounds the nodes it may touch.
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

    /// Commits into `tree`: `EAGAIN` (and nothing applied) if a touched node
    /// changed since; otherwise returns the watch events to fire.
    pub fn commit(self, tree: &mut Tree) -> Result<Vec<Fire>, XsErrno> {
        if self.accessed.iter().any(|(path, gen)| tree.generation(path) != *gen) {
            return Err(XsErrno::EAGAIN);
        }
        // Deletes first, then writes parents before children, so that the
        // committed tree never holds a child without its parent entry.
        let mut changed: Vec<(String, Option<Node>)> = self.changed.into_iter().collect();
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

/// A [`Store`] reading through a transaction's copies to the committed tree.
pub struct TxStore<'a> {
    tree: &'a mut Tree,
    tx: &'a mut Transaction,
}

impl TxStore<'_> {
    fn touch(&mut self, path: &str) -> Result<(), XsErrno> {
        if !self.tx.accessed.contains_key(path) {
            if self.tx.node_limit.is_some_and(|l| self.tx.accessed.len() >= l) {
                return Err(XsErrno::ENOSPC);
            }
            self.tx.accessed.insert(path.to_string(), self.tree.generation(path));
        }
        Ok(())
    }

    fn current(&self, path: &str) -> Option<&Node> {
        match self.tx.changed.get(path) {
            Some(n) => n.as_ref(),
            None => self.tree.get(path),
        }
    }

    fn adjust(&mut self, owner: u32, delta: i64) {
        *self.tx.entry_delta.entry(owner).or_default() += delta;
    }
}

impl Store for TxStore<'_> {
    fn read(&mut self, path: &str) -> Result<Option<Node>, XsErrno> {
        self.touch(path)?;
        Ok(self.current(path).cloned())
    }

    fn write(&mut self, path: &str, node: Node) -> Result<(), XsErrno> {
        self.touch(path)?;
        if let Some(old) = self.current(path).map(Node::owner) {
            self.adjust(old, -1);
        }
        self.adjust(node.owner(), 1);
        self.tx.changed.insert(path.to_string(), Some(node));
        Ok(())
    }

    fn delete(&mut self, path: &str) -> Result<(), XsErrno> {
        self.touch(path)?;
        if let Some(old) = self.current(path).map(Node::owner) {
            self.adjust(old, -1);
        }
        self.tx.changed.insert(path.to_string(), None);
        Ok(())
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
}
