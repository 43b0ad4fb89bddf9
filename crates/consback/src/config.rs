//! What a console is connected to, read from the nodes libxl writes
//! (`libxl__device_console_add`, `libxl__init_console_from_channel`) as
//! plain values: parsed here, executed by [`crate::Host`].
//!
//! Backend directory: `connection` (`pty` or `socket`), `path` (the
//! socket's), `name`. Frontend directory (read-only to the guest):
//! `type` (`ioemu` for a device model, `xenconsoled`), `output` (`pty`, or
//! `chardev:libxl-channel<N>` naming a `-chardev` of the device model's
//! command line), `limit` (bytes of guest output kept for a slow host side).

use std::path::PathBuf;

use crate::abi::LIBXL_XENCONSOLE_LIMIT;

/// Fewest bytes of guest output a console buffers for its host side.
pub const MIN_BUFFER: usize = 4096;
/// Most bytes of guest output a console buffers, whatever `limit` says.
pub const MAX_BUFFER: usize = LIBXL_XENCONSOLE_LIMIT;
/// `sizeof(sun_path)` less the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Where a console's bytes go on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Connection {
    /// A pseudo-terminal whose name is published in the `tty` node.
    Pty,
    /// A unix socket we listen on, one client at a time.
    Socket(PathBuf),
}

impl core::fmt::Display for Connection {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Connection::Pty => f.write_str("pty"),
            Connection::Socket(p) => write!(f, "socket {}", p.display()),
        }
    }
}

/// The buffer a numeric `limit` node gives, for channels and primary
/// consoles alike: 0 (no limit, to QEMU and xenconsoled) is the most we
/// keep, anything else is clamped to `MIN_BUFFER..=MAX_BUFFER`.
pub(crate) fn buffer_for_limit(limit: u64) -> usize {
    match limit {
        0 => MAX_BUFFER,
        n => (n.min(MAX_BUFFER as u64) as usize).max(MIN_BUFFER),
    }
}

/// The nodes read, as values (`None`: absent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsoleNodes {
    /// Backend `connection`.
    pub connection: Option<String>,
    /// Backend `path`.
    pub path: Option<String>,
    /// Backend (or frontend) `name`.
    pub name: Option<String>,
    /// Frontend `type`.
    pub kind: Option<String>,
    /// Frontend `output`.
    pub output: Option<String>,
    /// Frontend `limit`.
    pub limit: Option<String>,
}

/// A console as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleSpec {
    /// Where its bytes go.
    pub connection: Connection,
    /// The channel's name (`org.qemu.guest_agent.0`), if it has one.
    pub name: Option<String>,
    /// Bytes of guest output kept while the host side does not drain.
    pub buffer: usize,
}

/// Why a console's nodes are refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The frontend's `type` says another backend serves it.
    #[error("console type {0:?} is not served here (only {1:?})")]
    NotOurs(String, &'static str),
    /// No `connection` and no usable `output`.
    #[error("no connection: neither a backend connection node nor a frontend output node")]
    NoConnection,
    /// A `connection` we do not know.
    #[error("unknown connection {0:?} (pty or socket)")]
    UnknownConnection(String),
    /// `connection = socket` without a usable `path`.
    #[error("socket console with bad path {0:?} (an absolute path of at most 107 bytes)")]
    BadPath(String),
    /// An `output` we cannot serve.
    #[error("output {0:?} is not served (pty, or chardev:ID of a -chardev pty or socket)")]
    UnknownOutput(String),
    /// `limit` is not a number.
    #[error("bad limit {0:?}")]
    BadLimit(String),
}

/// The `type` a device model's consoles have (QEMU's `xen_console_device_create`
/// declines any other).
pub const TYPE_IOEMU: &str = "ioemu";
/// The `type` of consoles xenconsoled serves (the primary console).
pub const TYPE_XENCONSOLED: &str = "xenconsoled";

impl ConsoleSpec {
    /// Parses `nodes` for a backend serving consoles of type `ours`; a
    /// `chardev:ID` output is looked up with `chardev` (the device model's
    /// `-chardev` options).
    pub fn parse(
        nodes: &ConsoleNodes,
        ours: &'static str,
        chardev: &dyn Fn(&str) -> Option<Connection>,
    ) -> Result<Self, ConfigError> {
        match nodes.kind.as_deref() {
            Some(t) if t == ours => {}
            other => return Err(ConfigError::NotOurs(other.unwrap_or("").to_string(), ours)),
        }
        let connection = match (nodes.connection.as_deref(), nodes.output.as_deref()) {
            (Some("pty"), _) => Connection::Pty,
            (Some("socket"), _) => Connection::Socket(socket_path(nodes.path.as_deref().unwrap_or(""))?),
            (Some(other), _) => return Err(ConfigError::UnknownConnection(other.to_string())),
            (None, Some("pty")) => Connection::Pty,
            (None, Some(out)) => match out.strip_prefix("chardev:").and_then(chardev) {
                Some(c) => c,
                None => return Err(ConfigError::UnknownOutput(out.to_string())),
            },
            (None, None) => return Err(ConfigError::NoConnection),
        };
        let buffer = match nodes.limit.as_deref() {
            None => LIBXL_XENCONSOLE_LIMIT,
            // `%u`, as QEMU reads it; 0 means no limit there, the most here.
            Some(s) => match s.trim().parse::<u64>() {
                Ok(n) => buffer_for_limit(n),
                Err(_) => return Err(ConfigError::BadLimit(s.to_string())),
            },
        };
        Ok(ConsoleSpec { connection, name: nodes.name.clone(), buffer })
    }
}

/// A socket path as a unix socket can be bound to.
pub fn socket_path(p: &str) -> Result<PathBuf, ConfigError> {
    if !p.starts_with('/') || p.len() > MAX_SOCKET_PATH || p.contains('\0') {
        return Err(ConfigError::BadPath(p.to_string()));
    }
    Ok(PathBuf::from(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(pairs: &[(&str, &str)]) -> ConsoleNodes {
        let get = |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        ConsoleNodes {
            connection: get("connection"),
            path: get("path"),
            name: get("name"),
            kind: get("type"),
            output: get("output"),
            limit: get("limit"),
        }
    }

    fn none(_: &str) -> Option<Connection> {
        None
    }

    #[test]
    fn libxl_pty_channel_is_a_pty_with_its_name_and_limit() {
        let n = nodes(&[
            ("connection", "pty"),
            ("name", "org.example.0"),
            ("type", "ioemu"),
            ("output", "pty"),
            ("limit", "1048576"),
        ]);
        let spec = ConsoleSpec::parse(&n, TYPE_IOEMU, &none).unwrap();
        assert_eq!(
            spec,
            ConsoleSpec { connection: Connection::Pty, name: Some("org.example.0".into()), buffer: 1 << 20 }
        );
    }

    #[test]
    fn libxl_socket_channel_listens_on_its_path() {
        let n = nodes(&[
            ("connection", "socket"),
            ("path", "/run/guest.sock"),
            ("type", "ioemu"),
            ("output", "chardev:libxl-channel1"),
        ]);
        let spec = ConsoleSpec::parse(&n, TYPE_IOEMU, &none).unwrap();
        assert_eq!(spec.connection, Connection::Socket("/run/guest.sock".into()));
    }

    #[test]
    fn chardev_output_without_connection_node_is_looked_up() {
        let n = nodes(&[("type", "ioemu"), ("output", "chardev:libxl-channel1")]);
        let table = |id: &str| (id == "libxl-channel1").then(|| Connection::Socket("/s".into()));
        assert_eq!(ConsoleSpec::parse(&n, TYPE_IOEMU, &table).unwrap().connection, Connection::Socket("/s".into()));
        let unknown = nodes(&[("type", "ioemu"), ("output", "chardev:other")]);
        assert_eq!(
            ConsoleSpec::parse(&unknown, TYPE_IOEMU, &table),
            Err(ConfigError::UnknownOutput("chardev:other".into()))
        );
    }

    #[test]
    fn another_backends_type_is_refused() {
        let n = nodes(&[("type", "xenconsoled"), ("output", "pty")]);
        assert_eq!(
            ConsoleSpec::parse(&n, TYPE_IOEMU, &none),
            Err(ConfigError::NotOurs("xenconsoled".into(), TYPE_IOEMU))
        );
        assert!(matches!(ConsoleSpec::parse(&nodes(&[]), TYPE_IOEMU, &none), Err(ConfigError::NotOurs(..))));
    }

    #[test]
    fn bad_socket_paths_and_connections_are_refused() {
        for path in ["", "relative", &format!("/{}", "x".repeat(200))] {
            let n = nodes(&[("type", "ioemu"), ("connection", "socket"), ("path", path)]);
            assert!(matches!(ConsoleSpec::parse(&n, TYPE_IOEMU, &none), Err(ConfigError::BadPath(_))), "{path}");
        }
        let n = nodes(&[("type", "ioemu"), ("connection", "tcp")]);
        assert_eq!(ConsoleSpec::parse(&n, TYPE_IOEMU, &none), Err(ConfigError::UnknownConnection("tcp".into())));
        let n = nodes(&[("type", "ioemu")]);
        assert_eq!(ConsoleSpec::parse(&n, TYPE_IOEMU, &none), Err(ConfigError::NoConnection));
    }

    #[test]
    fn limit_is_clamped_and_garbage_refused() {
        let with = |l: &str| {
            ConsoleSpec::parse(&nodes(&[("type", "ioemu"), ("output", "pty"), ("limit", l)]), TYPE_IOEMU, &none)
        };
        assert_eq!(with("1").unwrap().buffer, MIN_BUFFER);
        assert_eq!(with("99999999999").unwrap().buffer, MAX_BUFFER);
        assert_eq!(with("0").unwrap().buffer, MAX_BUFFER);
        assert_eq!(with("65536").unwrap().buffer, 65536);
        assert_eq!(with("lots"), Err(ConfigError::BadLimit("lots".into())));
    }
}
