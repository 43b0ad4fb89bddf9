//! Naming devices: the `(type, frontend domid, devid)` key, backend paths,
//! and the watch tokens that carry a device's generation.

use evtchn::DomId;

/// Which device: `backend/<kind>/<frontend domid>/<devid>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceKey {
    /// The device type (`vbd`, `qdisk`, ...).
    pub kind: String,
    /// The frontend's domain.
    pub frontend: DomId,
    /// The device id (for `vbd`, the virtual-device number).
    pub devid: u32,
}

impl core::fmt::Display for DeviceKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}/{}/{}", self.kind, self.frontend, self.devid)
    }
}

/// What a path below `backend/<kind>` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendPath<'a> {
    /// The type directory itself.
    Root,
    /// A frontend domain's directory: `<kind>/<domid>`.
    Domain(DomId),
    /// A device directory or a node below it (`rest` is `""` for the directory).
    Device {
        /// The device.
        key: DeviceKey,
        /// The node below the device directory, `""` for the directory.
        rest: &'a str,
    },
}

/// Parses `path` relative to `root` (`/local/domain/<be>/backend/<kind>`);
/// `None` for paths outside it or components that are not numbers.
pub fn parse_backend_path<'a>(root: &str, kind: &str, path: &'a str) -> Option<BackendPath<'a>> {
    let rel = path.strip_prefix(root)?;
    if rel.is_empty() {
        return Some(BackendPath::Root);
    }
    let rel = rel.strip_prefix('/')?;
    let mut parts = rel.splitn(3, '/');
    let domid = parse_num::<DomId>(parts.next()?)?;
    let Some(devid) = parts.next() else {
        return Some(BackendPath::Domain(domid));
    };
    let devid = parse_num::<u32>(devid)?;
    let rest = parts.next().unwrap_or("");
    Some(BackendPath::Device { key: DeviceKey { kind: kind.to_string(), frontend: domid, devid }, rest })
}

/// Decimal without sign or leading zeros (as the toolstack writes them).
fn parse_num<T: core::str::FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.parse().ok()
}

/// The token of a device's frontend-state watch: key and generation, so an
/// event for an earlier instance of the same key is recognised as stale.
pub fn frontend_token(key: &DeviceKey, generation: u64) -> String {
    format!("fe:{}:{}:{}:{}", key.kind, key.frontend, key.devid, generation)
}

/// Parses a [`frontend_token`].
pub fn parse_frontend_token(token: &str) -> Option<(DeviceKey, u64)> {
    let mut parts = token.strip_prefix("fe:")?.split(':');
    let kind = parts.next()?.to_string();
    let frontend = parts.next()?.parse().ok()?;
    let devid = parts.next()?.parse().ok()?;
    let generation = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some((DeviceKey { kind, frontend, devid }, generation))
}

/// The token of the discovery watch on `backend/<kind>`.
pub fn backend_token(kind: &str) -> String {
    format!("be:{kind}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "/local/domain/0/backend/vbd";

    #[test]
    fn parses_root_domain_device_and_node() {
        assert_eq!(parse_backend_path(ROOT, "vbd", ROOT), Some(BackendPath::Root));
        assert_eq!(parse_backend_path(ROOT, "vbd", "/local/domain/0/backend/vbd/7"), Some(BackendPath::Domain(7)));
        let key = DeviceKey { kind: "vbd".into(), frontend: 7, devid: 51712 };
        assert_eq!(
            parse_backend_path(ROOT, "vbd", "/local/domain/0/backend/vbd/7/51712"),
            Some(BackendPath::Device { key: key.clone(), rest: "" })
        );
        assert_eq!(
            parse_backend_path(ROOT, "vbd", "/local/domain/0/backend/vbd/7/51712/queue-0/ring-ref"),
            Some(BackendPath::Device { key, rest: "queue-0/ring-ref" })
        );
    }

    #[test]
    fn rejects_foreign_and_malformed_paths() {
        assert_eq!(parse_backend_path(ROOT, "vbd", "/local/domain/0/backend/vbd2/1/2"), None);
        assert_eq!(parse_backend_path(ROOT, "vbd", "/local/domain/0/backend/vbd/x/2"), None);
        assert_eq!(parse_backend_path(ROOT, "vbd", "/local/domain/0/backend/vbd/1/-2"), None);
        assert_eq!(parse_backend_path(ROOT, "vbd", "/local/domain/0/backend/vbd/01/2"), None);
        assert_eq!(parse_backend_path(ROOT, "vbd", "/local/domain/0/backend/vbd/70000/2"), None);
    }

    #[test]
    fn frontend_token_round_trips_and_rejects_extra_fields() {
        let key = DeviceKey { kind: "vif".into(), frontend: 3, devid: 0 };
        assert_eq!(parse_frontend_token(&frontend_token(&key, 42)), Some((key, 42)));
        assert_eq!(parse_frontend_token("fe:vif:3:0:42:1"), None);
        assert_eq!(parse_frontend_token("be:vif"), None);
    }
}
