//! Errors of the framework and of devices.

use nix::libc;

/// Why a device failed. Every variant becomes the device's `error` node
/// ("`<errno> <message>`", as Linux's `xenbus_dev_fatal` writes it).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A node the device needs is absent.
    #[error("Missing node {0}")]
    MissingNode(String),
    /// A node's value does not parse or is out of range.
    #[error("Bad value {value:?} in {node}")]
    BadNode {
        /// The node (relative to the device directory).
        node: String,
        /// The value read (lossy UTF-8, truncated).
        value: String,
    },
    /// The frontend's `protocol` names an ABI we do not serve (`arm-abi`
    /// on a backend not built for Arm).
    #[error("Unknown protocol {0:?}{}", if .0 == "arm-abi" { " (an Arm guest's ABI; this backend is not built for Arm)" } else { "" })]
    UnknownProtocol(String),
    /// The frontend's state node holds a value Xen does not define.
    #[error("Bad frontend state {0:?}")]
    BadState(String),
    /// A xenstore request failed.
    #[error("Xenstore request failed")]
    Xenstore(#[source] xs_wire::ClientError),
    /// Mapping or copying grants failed.
    #[error("Grant operation failed")]
    Grant(#[source] gnttab::Error),
    /// An event-channel operation failed.
    #[error("Event channel operation failed")]
    Evtchn(#[source] evtchn::Error),
    /// The shared ring is broken (indices running away, moving back).
    #[error("Shared ring failed")]
    SharedRing(#[source] xen_ring::RingError),
    /// A request on the ring cannot be served (it does not parse, ...).
    #[error("Bad request on the ring: {0}")]
    Ring(String),
    /// The device's ring handler panicked.
    #[error("Ring handler panicked: {0}")]
    Panic(String),
    /// Any other failure of a concrete device.
    #[error("{msg}")]
    Other {
        /// What failed.
        msg: String,
        /// The cause, if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl From<xen_bus::UnknownProtocol> for DeviceError {
    fn from(e: xen_bus::UnknownProtocol) -> Self {
        DeviceError::UnknownProtocol(e.0)
    }
}

impl From<xen_bus::RingNodeError> for DeviceError {
    fn from(e: xen_bus::RingNodeError) -> Self {
        use xen_bus::RingNodeError as E;
        match e {
            E::Missing(node) => DeviceError::MissingNode(node),
            E::Bad { node, value } => crate::device::bad(&node, value.as_bytes()),
            E::RingOrder { asked, .. } => crate::device::bad("ring-page-order", asked.to_string().as_bytes()),
            E::TooManyQueues { asked, .. } => {
                crate::device::bad("multi-queue-num-queues", asked.to_string().as_bytes())
            }
        }
    }
}

impl DeviceError {
    /// A device-specific failure with a cause.
    pub fn other(msg: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        DeviceError::Other { msg: msg.into(), source: Some(Box::new(source)) }
    }

    /// A device-specific failure without a cause.
    pub fn msg(msg: impl Into<String>) -> Self {
        DeviceError::Other { msg: msg.into(), source: None }
    }

    /// The positive errno written in front of the message in the `error` node.
    pub fn errno(&self) -> i32 {
        match self {
            DeviceError::MissingNode(_) => libc::ENOENT,
            DeviceError::BadNode { .. } | DeviceError::BadState(_) => libc::EINVAL,
            DeviceError::UnknownProtocol(_) => libc::ENOSYS,
            DeviceError::Xenstore(e) => e.errno().map(|e| e.errno()).unwrap_or(libc::EIO),
            DeviceError::Grant(e) => match e {
                gnttab::Error::Op { source, .. } | gnttab::Error::Open { source, .. } => {
                    source.raw_os_error().unwrap_or(libc::EIO)
                }
                gnttab::Error::Map { .. } => libc::EFAULT,
                _ => libc::EINVAL,
            },
            DeviceError::Evtchn(e) => e.errno().unwrap_or(libc::EIO),
            DeviceError::Ring(_) | DeviceError::SharedRing(_) => libc::EPROTO,
            DeviceError::Panic(_) | DeviceError::Other { .. } => libc::EIO,
        }
    }

    /// The text of the `error` node: "`<errno> <message and causes>`".
    pub fn node_text(&self) -> String {
        let mut text = format!("{} {}", self.errno(), self);
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            text.push_str(": ");
            text.push_str(&c.to_string());
            cause = c.source();
        }
        text
    }
}

impl From<xs_wire::ClientError> for DeviceError {
    fn from(e: xs_wire::ClientError) -> Self {
        DeviceError::Xenstore(e)
    }
}

impl From<xen_ring::RingError> for DeviceError {
    fn from(e: xen_ring::RingError) -> Self {
        DeviceError::SharedRing(e)
    }
}

impl From<gnttab::Error> for DeviceError {
    fn from(e: gnttab::Error) -> Self {
        DeviceError::Grant(e)
    }
}

impl From<evtchn::Error> for DeviceError {
    fn from(e: evtchn::Error) -> Self {
        DeviceError::Evtchn(e)
    }
}

/// Errors of the framework itself (starting, registering device types).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A xenstore request of the framework failed.
    #[error("Xenstore request failed")]
    Xenstore(#[source] xs_wire::ClientError),
    /// Creating an epoll instance or eventfd failed.
    #[error("Cannot set up {what}")]
    Sys {
        /// What was being set up.
        what: &'static str,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// Spawning a thread failed.
    #[error("Cannot spawn thread {name}")]
    Spawn {
        /// The thread's name.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Opening the grant device failed.
    #[error("Cannot open the grant device")]
    Grant(#[source] gnttab::Error),
    /// The connection's `domid` node is not a domain id.
    #[error("Bad domid node {0:?}")]
    BadDomid(String),
    /// Two device types with one name.
    #[error("Device type {0} registered twice")]
    DuplicateType(String),
    /// The backend was shut down.
    #[error("Backend is shut down")]
    ShutDown,
}

impl From<xs_wire::ClientError> for Error {
    fn from(e: xs_wire::ClientError) -> Self {
        Error::Xenstore(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_text_starts_with_errno_and_carries_causes() {
        let e = DeviceError::other("Opening disk", std::io::Error::from_raw_os_error(libc::ENOENT));
        let text = e.node_text();
        assert!(text.starts_with(&format!("{} Opening disk: ", libc::EIO)), "{text}");
        assert!(text.len() > "5 Opening disk: ".len());
    }

    #[test]
    fn missing_node_is_enoent() {
        assert_eq!(DeviceError::MissingNode("ring-ref".into()).errno(), libc::ENOENT);
    }
}
