//! The node requests, as `xenstored_core.c` executes them: `READ`, `WRITE`,
//! `MKDIR`, `RM`, `DIRECTORY`, `DIRECTORY_PART`, `GET_PERMS`, `SET_PERMS`.
//! Each runs on a [`Store`] (the committed tree or a transaction), returns the
//! reply payload or the error xenstored gives, and adds the watch events it
//! causes to `fires`.

use xs_wire::{Access, Perm, XsErrno, XENSTORE_PAYLOAD_MAX};

use super::config::Quotas;
use super::node::{basename, child_path, parent_of, Caller, Node, Store, PERM_OWNER, PERM_READ, PERM_WRITE};
use super::watch::Fire;

/// The `"OK\0"` of `send_ack()`.
pub const ACK: &[u8] = b"OK\0";

/// What a request runs with: its store, caller, quotas and the fires it causes.
pub struct Op<'a> {
    /// Committed tree or transaction view.
    pub store: &'a mut dyn Store,
    /// The connection's identity.
    pub caller: Caller,
    /// Quotas for unprivileged callers.
    pub quotas: &'a Quotas,
    /// Watch events caused so far.
    pub fires: Vec<Fire>,
}

/// `get_strings()`: the NUL-terminated strings of `payload` (bytes after the
/// last NUL are not a string).
pub fn strings(payload: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = payload;
    while let Some(i) = rest.iter().position(|&b| b == 0) {
        out.push(&rest[..i]);
        rest = &rest[i + 1..];
    }
    out
}

/// `onearg()`: the payload if it is exactly one NUL-terminated string.
pub fn onearg(payload: &[u8]) -> Option<&[u8]> {
    match payload.iter().position(|&b| b == 0) {
        Some(i) if i + 1 == payload.len() => Some(&payload[..i]),
        _ => None,
    }
}

/// C `atoi()`: optional whitespace and sign, then decimal digits; 0 if none.
pub fn atoi(s: &[u8]) -> i32 {
    let s = trim_leading_space(s);
    let (neg, digits) = match s.first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let mut v: i64 = 0;
    for &d in digits.iter().take_while(|d| d.is_ascii_digit()) {
        v = (v * 10 + i64::from(d - b'0')).min(i64::from(u32::MAX) + 1);
    }
    (if neg { -v } else { v }) as i32
}

fn trim_leading_space(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|b| b.is_ascii_whitespace()).count();
    &s[n..]
}

/// C `strtol(s, &end, 0)` requiring the whole string to be consumed and
/// non-empty, as `xenstore_strings_to_perms()` does; the result is stored in
/// an `unsigned int`.
fn strtol_domid(s: &[u8]) -> Option<u32> {
    if s.is_empty() {
        return None;
    }
    let t = trim_leading_space(s);
    let (neg, t) = match t.first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (radix, digits) = if (t.starts_with(b"0x") || t.starts_with(b"0X")) && t.len() > 2 {
        (16, &t[2..])
    } else if t.len() > 1 && t[0] == b'0' {
        (8, &t[1..])
    } else {
        (10, t)
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        let dv = (d as char).to_digit(radix)?;
        v = v.saturating_mul(i64::from(radix)).saturating_add(i64::from(dv)).min(i64::MAX / 64);
    }
    Some((if neg { -v } else { v }) as u32)
}

/// `xenstore_strings_to_perms()`: `num` entries like `r5` from `s`.
pub fn parse_perms(parts: &[&[u8]]) -> Result<Vec<Perm>, XsErrno> {
    parts
        .iter()
        .map(|p| {
            let access = match p.first() {
                Some(b'r') => Access::Read,
                Some(b'w') => Access::Write,
                Some(b'b') => Access::Both,
                Some(b'n') => Access::None,
                _ => return Err(XsErrno::EINVAL),
            };
            let domid = strtol_domid(&p[1..]).ok_or(XsErrno::EINVAL)?;
            Ok(Perm::new(access, domid))
        })
        .collect()
}

/// The permission strings of a `GET_PERMS` reply.
pub fn perms_bytes(perms: &[Perm]) -> Vec<u8> {
    xs_wire::perms::encode_perm_list(perms)
}

/// `/local/domain/<id>`, the home of relative paths (`get_implicit_path()`).
pub fn home_path(domid: u32) -> String {
    format!("/local/domain/{domid}")
}

fn valid_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_' | b'@')
}

/// Length of a `/local/domain/<1-5 digits>/` prefix (`sscanf("%5u/%n")`).
fn local_offset(name: &str) -> usize {
    let Some(rest) = name.strip_prefix("/local/domain/") else { return 0 };
    let digits = rest.bytes().take(5).take_while(u8::is_ascii_digit).count();
    if digits > 0 && rest.as_bytes().get(digits) == Some(&b'/') {
        "/local/domain/".len() + digits + 1
    } else {
        0
    }
}

/// `canonicalize()`: checks characters, makes a relative path absolute under
/// the caller's home, and checks the form and, for unprivileged callers, the
/// path-length quota. Every failure is `EINVAL`.
pub fn canonicalize(
    caller: &Caller,
    quotas: &Quotas,
    node: Option<&[u8]>,
    allow_special: bool,
) -> Result<String, XsErrno> {
    let node = node.ok_or(XsErrno::EINVAL)?;
    if !node.iter().all(|&b| valid_char(b)) || (node.first() == Some(&b'@') && !allow_special) {
        return Err(XsErrno::EINVAL);
    }
    let node = std::str::from_utf8(node).map_err(|_| XsErrno::EINVAL)?;
    let name = if node.starts_with('/') || node.starts_with('@') {
        node.to_string()
    } else {
        format!("{}/{node}", home_path(caller.domid))
    };
    let too_long = !caller.privileged && name.len() - local_offset(&name) > quotas.path_length;
    if (name.ends_with('/') && name != "/") || name.contains("//") || too_long {
        return Err(XsErrno::EINVAL);
    }
    Ok(name)
}

impl Op<'_> {
    fn unprivileged(&self) -> bool {
        !self.caller.privileged
    }

    /// `ask_parents()`: the caller's permission on the nearest existing ancestor.
    fn ask_parents(&mut self, name: &str) -> Result<u8, XsErrno> {
        let mut p = name;
        loop {
            p = parent_of(p);
            if let Some(n) = self.store.read(p)? {
                return Ok(self.caller.perm_for(&n.perms));
            }
            if p == "/" {
                return Ok(0);
            }
        }
    }

    /// `get_node()`: the node if the caller has `perm` on it; otherwise
    /// `EACCES`, or `ENOENT` for a missing node, turned into `EACCES` when
    /// the nearest ancestor does not grant `perm` either (`errno_from_parents()`).
    pub fn get_node(&mut self, name: &str, perm: u8) -> Result<Node, XsErrno> {
        let err = match self.store.read(name)? {
            Some(n) if self.caller.perm_for(&n.perms) & perm == perm => return Ok(n),
            Some(_) => XsErrno::EACCES,
            None => XsErrno::ENOENT,
        };
        if self.ask_parents(name)? & perm != 0 {
            Err(err)
        } else {
            Err(XsErrno::EACCES)
        }
    }

    fn check_size(&self, node: &Node) -> Result<(), XsErrno> {
        if self.unprivileged() && node.acc_size() > self.quotas.node_size {
            return Err(XsErrno::ENOSPC);
        }
        Ok(())
    }

    fn parent_perms(&mut self, name: &str) -> Vec<Vec<Perm>> {
        if name == "/" {
            return Vec::new();
        }
        self.store.peek(parent_of(name)).map(|n| vec![n.perms]).unwrap_or_default()
    }

    /// `create_node()`: creates `name` and any missing ancestors, each
    /// inheriting its parent's permissions, owned by the caller when it is
    /// unprivileged. Checks every quota before changing anything.
    fn create_node(&mut self, name: &str, value: Vec<u8>) -> Result<Node, XsErrno> {
        let mut missing = vec![name.to_string()];
        let (parent_name, mut parent) = loop {
            let p = parent_of(missing.last().expect("not empty")).to_string();
            match self.store.read(&p)? {
                Some(n) => break (p, n),
                None if p == "/" => return Err(XsErrno::ENOENT),
                None => missing.push(p),
            }
        };
        if self.unprivileged() && self.store.entries(self.caller.domid) + missing.len() > self.quotas.nodes {
            return Err(XsErrno::ENOSPC);
        }
        let mut writes = Vec::with_capacity(missing.len() + 1);
        let mut above = parent.clone();
        for path in missing.iter().rev() {
            let mut perms = above.perms.clone();
            if self.unprivileged() {
                perms[0].domid = self.caller.domid;
            }
            let mut node = Node::new(perms);
            if path == name {
                node.value = value.clone();
            }
            above = node.clone();
            writes.push((path.clone(), node));
        }
        // Each new node names its child; the existing parent gains the top one.
        for i in 0..writes.len() - 1 {
            let child = basename(&writes[i + 1].0).to_string();
            writes[i].1.children.push(child);
        }
        parent.children.push(basename(&writes[0].0).to_string());
        for (_, n) in &writes {
            self.check_size(n)?;
        }
        self.check_size(&parent)?;
        for (p, n) in writes.iter().rev() {
            self.store.write(p, n.clone())?;
        }
        self.store.write(&parent_name, parent)?;
        Ok(writes.pop().expect("not empty").1)
    }

    fn fire_change(&mut self, name: &str, node: &Node, extra: Option<Vec<Perm>>) {
        let mut perm_sets = vec![node.perms.clone()];
        perm_sets.extend(extra);
        perm_sets.extend(self.parent_perms(name));
        self.fires.push(Fire { path: name.to_string(), exact: false, perm_sets });
    }

    /// `XS_READ`: the value.
    pub fn read(&mut self, payload: &[u8]) -> Result<Vec<u8>, XsErrno> {
        let name = canonicalize(&self.caller, self.quotas, onearg(payload), false)?;
        Ok(self.get_node(&name, PERM_READ)?.value)
    }

    /// `XS_DIRECTORY`: child names, each NUL-terminated.
    pub fn directory(&mut self, payload: &[u8]) -> Result<Vec<u8>, XsErrno> {
        let name = canonicalize(&self.caller, self.quotas, onearg(payload), false)?;
        Ok(self.get_node(&name, PERM_READ)?.children_bytes())
    }

    /// `XS_DIRECTORY_PART` (`send_directory_part()`): the generation, then as
    /// many children from byte offset `off` as fit, then an empty string once
    /// the list is complete.
    pub fn directory_part(&mut self, payload: &[u8]) -> Result<Vec<u8>, XsErrno> {
        let args = strings(payload);
        if args.len() != 2 {
            return Err(XsErrno::EINVAL);
        }
        let name = canonicalize(&self.caller, self.quotas, Some(args[0]), false)?;
        let node = self.get_node(&name, PERM_READ)?;
        let off = atoi(args[1]) as u32 as usize;
        let children = node.children_bytes();
        let mut out = node.generation.to_string().into_bytes();
        out.push(0);
        if off >= children.len() {
            out.push(0);
            return Ok(out);
        }
        let maxlen = XENSTORE_PAYLOAD_MAX - out.len() - 1;
        let mut len = 0;
        let mut rest = &children[off..];
        loop {
            let clen = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            if len + clen >= maxlen {
                break;
            }
            len += clen + 1;
            rest = &rest[(clen + 1).min(rest.len())..];
            if off + len >= children.len() {
                break;
            }
        }
        out.extend_from_slice(&children[off..off + len]);
        if off + len >= children.len() {
            out.push(0);
        }
        Ok(out)
    }

    /// `XS_WRITE`: `path\0value`; creates missing nodes.
    pub fn write(&mut self, payload: &[u8]) -> Result<Vec<u8>, XsErrno> {
        let path = *strings(payload).first().ok_or(XsErrno::EINVAL)?;
        let value = payload[path.len() + 1..].to_vec();
        let name = canonicalize(&self.caller, self.quotas, Some(path), false)?;
        let node = match self.get_node(&name, PERM_WRITE) {
            Ok(mut node) => {
                node.value = value;
                self.check_size(&node)?;
                self.store.write(&name, node.clone())?;
                node
            }
            Err(XsErrno::ENOENT) => self.create_node(&name, value)?,
            Err(e) => return Err(e),
        };
        self.fire_change(&name, &node, None);
        Ok(ACK.to_vec())
    }

    /// `XS_MKDIR`: creates the node (and missing ancestors); fine if it exists.
    pub fn mkdir(&mut self, payload: &[u8]) -> Result<Vec<u8>, XsErrno> {
        let name = canonicalize(&self.caller, self.quotas, onearg(payload), false)?;
        match self.get_node(&name, PERM_WRITE) {
            Ok(_) => {}
            Err(XsErrno::ENOENT) => {
                let node = self.create_node(&name, Vec::new())?;
                self.fire_change(&name, &node, None);
            }
            Err(e) => return Err(e),
        }
        Ok(ACK.to_vec())
    }

    /// `XS_RM`: removes the subtree; a missing node is fine if its parent exists.
    pub fn rm(&mut self, payload: &[u8]) -> Result<Vec<u8>, XsErrno> {
        let name = canonicalize(&self.caller, self.quotas, onearg(payload), false)?;
        let node = match self.get_node(&name, PERM_WRITE) {
            Ok(n) => n,
            Err(XsErrno::ENOENT) => {
                return match self.store.read(parent_of(&name))? {
                    Some(_) => Ok(ACK.to_vec()),
                    None => Err(XsErrno::ENOENT),
                };
            }
            Err(e) => return Err(e),
        };
        if name == "/" {
            return Err(XsErrno::EINVAL);
        }
        let parent_name = parent_of(&name).to_string();
        let Some(mut parent) = self.store.read(&parent_name)? else { return Err(XsErrno::EINVAL) };
        self.remove_subtree(&name, node, parent.perms.clone())?;
        let base = basename(&name);
        parent.children.retain(|c| c != base);
        self.store.write(&parent_name, parent)?;
        Ok(ACK.to_vec())
    }

    /// Deletes `root` and everything below it, children first, firing each
    /// node's exact watches and, for `root`, the watches above it too
    /// (`delnode_sub()`).
    fn remove_subtree(&mut self, root: &str, node: Node, parent_perms: Vec<Perm>) -> Result<(), XsErrno> {
        // (path, node, perms of its parent, index of the next child to visit)
        let mut stack = vec![(root.to_string(), node, parent_perms, 0usize)];
        while let Some((path, node, pperms, next)) = stack.pop() {
            if let Some(child) = node.children.get(next) {
                let cpath = child_path(&path, child);
                let perms = node.perms.clone();
                stack.push((path, node, pperms, next + 1));
                if let Some(cnode) = self.store.read(&cpath)? {
                    stack.push((cpath, cnode, perms, 0));
                }
                continue;
            }
            self.store.delete(&path)?;
            let exact = path != root;
            self.fires.push(Fire { path, exact, perm_sets: vec![node.perms, pperms] });
        }
        Ok(())
    }

    /// `XS_GET_PERMS`: the permission list (special `@` nodes allowed).
    pub fn get_perms(&mut self, payload: &[u8]) -> Result<Vec<u8>, XsErrno> {
        let name = canonicalize(&self.caller, self.quotas, onearg(payload), true)?;
        Ok(perms_bytes(&self.get_node(&name, PERM_READ)?.perms))
    }

    /// `XS_SET_PERMS`: `path\0perm\0...`; owner or privileged only, and an
    /// unprivileged owner may not give the node away (`EPERM`, sent as
    /// `EINVAL` since `EPERM` is not a xenstore error).
    pub fn set_perms(&mut self, payload: &[u8]) -> Result<Vec<u8>, XsErrno> {
        let args = strings(payload);
        if args.len() < 2 {
            return Err(XsErrno::EINVAL);
        }
        if self.unprivileged() && args.len() - 1 > self.quotas.perms {
            return Err(XsErrno::ENOSPC);
        }
        let perms = parse_perms(&args[1..])?;
        let name = canonicalize(&self.caller, self.quotas, Some(args[0]), true)?;
        if name.starts_with('@') && self.store.peek(&name).is_none() {
            // set_perms_special(): only the two special nodes exist.
            return Err(XsErrno::EINVAL);
        }
        let mut node = self.get_node(&name, PERM_WRITE | PERM_OWNER)?;
        if self.unprivileged() && perms[0].domid != node.owner() {
            return Err(XsErrno::EINVAL);
        }
        let old = std::mem::replace(&mut node.perms, perms);
        self.check_size(&node)?;
        self.store.write(&name, node.clone())?;
        self.fire_change(&name, &node, Some(old));
        Ok(ACK.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xenstored::node::Tree;

    fn run<T>(tree: &mut Tree, caller: Caller, f: impl FnOnce(&mut Op) -> T) -> (T, Vec<Fire>) {
        let q = Quotas::default();
        let mut op = Op { store: tree, caller, quotas: &q, fires: Vec::new() };
        let r = f(&mut op);
        (r, op.fires)
    }

    fn write(tree: &mut Tree, c: Caller, path: &str, v: &str) -> Result<Vec<u8>, XsErrno> {
        let mut p = path.as_bytes().to_vec();
        p.push(0);
        p.extend_from_slice(v.as_bytes());
        run(tree, c, |op| op.write(&p)).0
    }

    fn arg(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    fn perms_of(tree: &Tree, p: &str) -> Vec<String> {
        tree.get(p).unwrap().perms.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn write_creates_missing_parents_inheriting_permissions() {
        let mut t = Tree::new();
        write(&mut t, Caller::dom0(), "/a/b/c", "v").unwrap();
        assert_eq!(t.get("/a/b/c").unwrap().value, b"v");
        assert_eq!(t.get("/a").unwrap().children, vec!["b"]);
        assert_eq!(t.get("/").unwrap().children, vec!["tool", "a"]);
        assert_eq!(perms_of(&t, "/a/b"), vec!["n0"]);
    }

    #[test]
    fn unprivileged_creator_owns_new_nodes_with_parent_acl() {
        let mut t = Tree::new();
        let (r, _) = run(&mut t, Caller::dom0(), |op| op.set_perms(b"/tool\0n0\0w5\0r6\0"));
        r.unwrap();
        write(&mut t, Caller::domain(5), "/tool/x/y", "1").unwrap();
        assert_eq!(perms_of(&t, "/tool/x/y"), vec!["n5", "w5", "r6"]);
        assert_eq!(t.owned_by(5), 2);
    }

    #[test]
    fn dom0_creation_keeps_the_parent_owner() {
        let mut t = Tree::new();
        run(&mut t, Caller::dom0(), |op| op.mkdir(&arg("/local/domain/7"))).0.unwrap();
        run(&mut t, Caller::dom0(), |op| op.set_perms(b"/local/domain/7\0n7\0")).0.unwrap();
        write(&mut t, Caller::dom0(), "/local/domain/7/x", "").unwrap();
        assert_eq!(perms_of(&t, "/local/domain/7/x"), vec!["n7"]);
    }

    #[test]
    fn unreadable_missing_node_reports_eacces_readable_parent_enoent() {
        let mut t = Tree::new();
        let (r, _) = run(&mut t, Caller::domain(3), |op| op.read(&arg("/nothing")));
        assert_eq!(r.unwrap_err(), XsErrno::EACCES);
        run(&mut t, Caller::dom0(), |op| op.set_perms(b"/\0r0\0")).0.unwrap();
        let (r, _) = run(&mut t, Caller::domain(3), |op| op.read(&arg("/nothing")));
        assert_eq!(r.unwrap_err(), XsErrno::ENOENT);
        let (r, _) = run(&mut t, Caller::domain(3), |op| op.read(&arg("/tool")));
        assert_eq!(r.unwrap_err(), XsErrno::EACCES);
    }

    #[test]
    fn write_under_read_only_parent_is_eacces() {
        let mut t = Tree::new();
        run(&mut t, Caller::dom0(), |op| op.set_perms(b"/\0r0\0")).0.unwrap();
        assert_eq!(write(&mut t, Caller::domain(3), "/x", "1").unwrap_err(), XsErrno::EACCES);
    }

    #[test]
    fn relative_paths_live_under_the_domain_home() {
        let mut t = Tree::new();
        run(&mut t, Caller::dom0(), |op| op.mkdir(&arg("/local/domain/4"))).0.unwrap();
        run(&mut t, Caller::dom0(), |op| op.set_perms(b"/local/domain/4\0n4\0")).0.unwrap();
        write(&mut t, Caller::domain(4), "data/x", "hi").unwrap();
        assert_eq!(t.get("/local/domain/4/data/x").unwrap().value, b"hi");
    }

    #[test]
    fn invalid_paths_are_einval() {
        let mut t = Tree::new();
        for p in ["/a/", "/a//b", "/a b", "@foo", ""] {
            assert_eq!(write(&mut t, Caller::dom0(), p, "").unwrap_err(), XsErrno::EINVAL, "{p:?}");
        }
        let (r, _) = run(&mut t, Caller::dom0(), |op| op.read(b"/tool"));
        assert_eq!(r.unwrap_err(), XsErrno::EINVAL);
    }

    #[test]
    fn mkdir_of_existing_node_is_ok_and_fires_nothing() {
        let mut t = Tree::new();
        let (r, fires) = run(&mut t, Caller::dom0(), |op| op.mkdir(&arg("/tool")));
        assert_eq!(r.unwrap(), ACK);
        assert!(fires.is_empty());
    }

    #[test]
    fn rm_missing_node_ok_if_parent_exists_else_enoent() {
        let mut t = Tree::new();
        assert_eq!(run(&mut t, Caller::dom0(), |op| op.rm(&arg("/tool/none"))).0.unwrap(), ACK);
        assert_eq!(run(&mut t, Caller::dom0(), |op| op.rm(&arg("/none/none"))).0.unwrap_err(), XsErrno::ENOENT);
        assert_eq!(run(&mut t, Caller::dom0(), |op| op.rm(&arg("/"))).0.unwrap_err(), XsErrno::EINVAL);
    }

    #[test]
    fn rm_removes_subtree_and_fires_exact_for_descendants() {
        let mut t = Tree::new();
        write(&mut t, Caller::dom0(), "/a/b/c", "").unwrap();
        write(&mut t, Caller::dom0(), "/a/d", "").unwrap();
        let before = t.len();
        let (r, fires) = run(&mut t, Caller::dom0(), |op| op.rm(&arg("/a")));
        r.unwrap();
        assert_eq!(t.len(), before - 4);
        assert_eq!(t.get("/").unwrap().children, vec!["tool"]);
        let got: Vec<(String, bool)> = fires.into_iter().map(|f| (f.path, f.exact)).collect();
        let want = [("/a/b/c", true), ("/a/b", true), ("/a/d", true), ("/a", false)];
        assert_eq!(got, want.map(|(p, e)| (p.to_string(), e)));
    }

    #[test]
    fn unprivileged_may_not_change_owner() {
        let mut t = Tree::new();
        run(&mut t, Caller::dom0(), |op| op.set_perms(b"/tool\0n5\0")).0.unwrap();
        let (r, _) = run(&mut t, Caller::domain(5), |op| op.set_perms(b"/tool\0n6\0"));
        assert_eq!(r.unwrap_err(), XsErrno::EINVAL);
        let (r, _) = run(&mut t, Caller::domain(5), |op| op.set_perms(b"/tool\0n5\0r6\0"));
        assert_eq!(r.unwrap(), ACK);
    }

    #[test]
    fn special_node_permissions_are_settable_by_dom0_only() {
        let mut t = Tree::new();
        let (r, _) = run(&mut t, Caller::domain(3), |op| op.set_perms(b"@releaseDomain\0r3\0"));
        assert_eq!(r.unwrap_err(), XsErrno::EACCES);
        run(&mut t, Caller::dom0(), |op| op.set_perms(b"@releaseDomain\0n0\0r3\0")).0.unwrap();
        assert_eq!(perms_of(&t, "@releaseDomain"), vec!["n0", "r3"]);
        let (r, _) = run(&mut t, Caller::domain(3), |op| op.get_perms(b"@releaseDomain\0"));
        assert_eq!(r.unwrap(), b"n0\0r3\0");
        let (r, _) = run(&mut t, Caller::dom0(), |op| op.set_perms(b"@other\0n0\0"));
        assert_eq!(r.unwrap_err(), XsErrno::EINVAL);
    }

    #[test]
    fn set_perms_parses_like_strtol_and_rejects_garbage() {
        let mut t = Tree::new();
        run(&mut t, Caller::dom0(), |op| op.set_perms(b"/tool\0b0x10\0r010\0")).0.unwrap();
        assert_eq!(perms_of(&t, "/tool"), vec!["b16", "r8"]);
        for bad in [&b"/tool\0x1\0"[..], b"/tool\0r\0", b"/tool\0r1a\0", b"/tool\0", b"/tool\0r1"] {
            assert_eq!(run(&mut t, Caller::dom0(), |op| op.set_perms(bad)).0.unwrap_err(), XsErrno::EINVAL);
        }
    }

    #[test]
    fn node_quota_gives_enospc_before_any_change() {
        let mut t = Tree::new();
        run(&mut t, Caller::dom0(), |op| op.set_perms(b"/\0b0\0")).0.unwrap();
        let q = Quotas { nodes: 2, ..Quotas::default() };
        let mut op = Op { store: &mut t, caller: Caller::domain(9), quotas: &q, fires: Vec::new() };
        assert_eq!(op.write(b"/a/b/c\0").unwrap_err(), XsErrno::ENOSPC);
        op.write(b"/a/b\0").unwrap();
        assert_eq!(op.write(b"/a/b/c\0").unwrap_err(), XsErrno::ENOSPC);
        assert_eq!(t.owned_by(9), 2);
    }

    #[test]
    fn oversized_value_from_domain_is_enospc_dom0_exempt() {
        let mut t = Tree::new();
        run(&mut t, Caller::dom0(), |op| op.set_perms(b"/\0b0\0")).0.unwrap();
        let big = "x".repeat(3000);
        assert_eq!(write(&mut t, Caller::domain(2), "/big", &big).unwrap_err(), XsErrno::ENOSPC);
        write(&mut t, Caller::dom0(), "/big", &big).unwrap();
    }

    #[test]
    fn directory_part_pages_children_with_generation() {
        let mut t = Tree::new();
        for i in 0..3 {
            write(&mut t, Caller::dom0(), &format!("/d/c{i}"), "").unwrap();
        }
        let gen = t.get("/d").unwrap().generation;
        let (r, _) = run(&mut t, Caller::dom0(), |op| op.directory_part(b"/d\x000\0"));
        assert_eq!(r.unwrap(), format!("{gen}\0c0\0c1\0c2\0\0").into_bytes());
        let (r, _) = run(&mut t, Caller::dom0(), |op| op.directory_part(b"/d\x003\0"));
        assert_eq!(r.unwrap(), format!("{gen}\0c1\0c2\0\0").into_bytes());
        let (r, _) = run(&mut t, Caller::dom0(), |op| op.directory_part(b"/d\x0099\0"));
        assert_eq!(r.unwrap(), format!("{gen}\0\0").into_bytes());
    }

    #[test]
    fn unprivileged_path_length_quota_counts_below_home() {
        let c = Caller::domain(1);
        let q = Quotas::default();
        let long = "a".repeat(q.path_length);
        assert!(canonicalize(&c, &q, Some(long.as_bytes()), false).is_ok());
        let longer = format!("{long}a");
        assert_eq!(canonicalize(&c, &q, Some(longer.as_bytes()), false).unwrap_err(), XsErrno::EINVAL);
        assert!(canonicalize(&Caller::dom0(), &q, Some(format!("/{longer}").as_bytes()), false).is_ok());
    }

    #[test]
    fn atoi_follows_c() {
        assert_eq!(atoi(b"12x"), 12);
        assert_eq!(atoi(b" -3"), -3);
        assert_eq!(atoi(b"x"), 0);
    }
}
