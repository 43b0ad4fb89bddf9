//! Watches as in `xenstored_watch.c`: a watch is a path and a token; a change
//! fires every watch on the changed path or an ancestor of it (`is_child()`),
//! or, for the descendants removed with a subtree, every watch on exactly that
//! path. A watcher only hears of a node it, or its parent, may read
//! (`watch_permitted()`); special `@` events go to those who may read the
//! special node. A relative watch hears relative paths (`get_watch_path()`).

use xs_wire::{Perm, XENSTORE_PAYLOAD_MAX};

use super::node::{is_child, Caller};

/// A change that fires watches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fire {
    /// The changed node's full path, or a special `@` name.
    pub path: String,
    /// Only watches on exactly `path` fire (descendants of a removed subtree).
    pub exact: bool,
    /// A watcher that can read under any of these permission lists hears it
    /// (the node's, its parent's, and its former ones after a `SET_PERMS`).
    pub perm_sets: Vec<Vec<Perm>>,
}

impl Fire {
    /// Whether `caller` may hear of this change (ignored for `@` events).
    pub fn permitted(&self, caller: &Caller) -> bool {
        self.perm_sets.iter().any(|p| caller.can_read(p))
    }
}

/// One registered watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watch {
    /// The canonical (absolute or `@`) path watched.
    pub node: String,
    /// The token echoed in events (any bytes but NUL).
    pub token: Vec<u8>,
    /// For a relative watch, the home prefix stripped from event paths.
    pub relative_to: Option<String>,
}

impl Watch {
    /// Whether `fire` triggers this watch.
    pub fn matches(&self, fire: &Fire) -> bool {
        if fire.exact {
            fire.path == self.node
        } else {
            is_child(&fire.path, &self.node)
        }
    }

    /// The path as this watch reports it (`get_watch_path()`).
    pub fn event_path<'a>(&self, path: &'a str) -> &'a str {
        match &self.relative_to {
            Some(prefix) => {
                let rest = path.get(prefix.len()..).unwrap_or(path);
                rest.strip_prefix('/').unwrap_or(rest)
            }
            None => path,
        }
    }

    /// The `XS_WATCH_EVENT` payload for a change of `path`, or `None` when it
    /// would exceed `XENSTORE_PAYLOAD_MAX` (xenstored drops such events).
    pub fn event_payload(&self, path: &str) -> Option<Vec<u8>> {
        let p = self.event_path(path);
        let len = p.len() + 1 + self.token.len() + 1;
        if len > XENSTORE_PAYLOAD_MAX {
            return None;
        }
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(p.as_bytes());
        out.push(0);
        out.extend_from_slice(&self.token);
        out.push(0);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch(node: &str, rel: Option<&str>) -> Watch {
        Watch { node: node.into(), token: b"t".to_vec(), relative_to: rel.map(Into::into) }
    }

    fn fire(path: &str, exact: bool) -> Fire {
        Fire { path: path.into(), exact, perm_sets: vec![] }
    }

    #[test]
    fn watch_fires_for_itself_and_descendants_only() {
        let w = watch("/a/b", None);
        assert!(w.matches(&fire("/a/b", false)));
        assert!(w.matches(&fire("/a/b/c", false)));
        assert!(!w.matches(&fire("/a", false)));
        assert!(!w.matches(&fire("/a/bc", false)));
    }

    #[test]
    fn exact_fire_reaches_only_the_exact_path() {
        let w = watch("/a/b", None);
        assert!(w.matches(&fire("/a/b", true)));
        assert!(!w.matches(&fire("/a/b/c", true)));
    }

    #[test]
    fn relative_watch_reports_relative_paths() {
        let w = watch("/local/domain/5/device", Some("/local/domain/5"));
        assert_eq!(w.event_path("/local/domain/5/device/vbd"), "device/vbd");
        assert_eq!(w.event_payload("/local/domain/5/device").unwrap(), b"device\0t\0");
    }

    #[test]
    fn over_long_event_is_dropped() {
        let mut w = watch("/a", None);
        w.token = vec![b'x'; XENSTORE_PAYLOAD_MAX];
        assert!(w.event_payload("/a").is_none());
    }
}
