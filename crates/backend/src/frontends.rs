//! Which frontend domains' devices one backend process serves
//! ([`Config::frontends`](crate::Config::frontends)). Several processes may
//! watch the same `backend/<type>` directory (a `serve` daemon for the host
//! and one device model per guest, as libxl starts QEMU); each device must
//! be served by exactly one of them, so each process says which are its.

use std::sync::Arc;

use evtchn::DomId;
use xs_wire::Client;

use crate::key::DeviceKey;

/// Decides whether a device is this process's: given the xenstore
/// connection, the device and its backend directory. Asked once, when the
/// device is first seen (before anything is written for it).
pub type DeviceFilter = Arc<dyn Fn(&Client, &DeviceKey, &str) -> bool + Send + Sync>;

/// The frontend domains whose devices a backend serves.
#[derive(Clone, Default)]
pub enum Frontends {
    /// Every domain's.
    #[default]
    All,
    /// One domain's only (a per-guest device model): the framework then
    /// watches `backend/<type>/<domid>` alone, and never reads or writes
    /// another domain's devices.
    Only(DomId),
    /// Every domain's device that the filter accepts; the others are left
    /// untouched for whichever process serves them.
    Filter(DeviceFilter),
}

impl Frontends {
    /// Whether domain `domid`'s devices may be served at all.
    pub fn domain(&self, domid: DomId) -> bool {
        match self {
            Frontends::Only(d) => *d == domid,
            Frontends::All | Frontends::Filter(_) => true,
        }
    }

    /// Whether the device is this process's.
    pub fn device(&self, xs: &Client, key: &DeviceKey, dir: &str) -> bool {
        match self {
            Frontends::All => true,
            Frontends::Only(d) => *d == key.frontend,
            Frontends::Filter(f) => f(xs, key, dir),
        }
    }

    /// The path below `root` (`.../backend/<type>`) to watch.
    pub fn watch_path(&self, root: &str) -> String {
        match self {
            Frontends::Only(d) => format!("{root}/{d}"),
            Frontends::All | Frontends::Filter(_) => root.to_string(),
        }
    }
}

impl core::fmt::Debug for Frontends {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Frontends::All => f.write_str("All"),
            Frontends::Only(d) => write!(f, "Only({d})"),
            Frontends::Filter(_) => f.write_str("Filter(..)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_narrows_the_watch_and_the_domains() {
        let only = Frontends::Only(3);
        assert_eq!(only.watch_path("/local/domain/0/backend/qdisk"), "/local/domain/0/backend/qdisk/3");
        assert!(only.domain(3));
        assert!(!only.domain(4));
        assert_eq!(Frontends::All.watch_path("/r"), "/r");
        assert!(Frontends::All.domain(4));
    }
}
