//! What the layers above need from event channels, for the real device and
//! the simulator alike.

use std::os::fd::AsFd;
use std::time::Duration;

/// A local event-channel port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Port(pub u32);

impl core::fmt::Display for Port {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", self.0)
    }
}

pub use xen_bus::DomId;

/// Errors of event-channel operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening the device failed.
    #[error("Cannot open {path}")]
    Open {
        /// Device path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An ioctl or read/write on the device failed.
    #[error("{op} failed")]
    Op {
        /// Which operation.
        op: &'static str,
        /// The cause (the errno Xen or the kernel returned).
        #[source]
        source: std::io::Error,
    },
    /// The port is not bound on this handle.
    #[error("Port {0} is not bound on this handle")]
    NotBound(Port),
}

impl Error {
    /// The raw errno, where the error carries one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Open { source, .. } | Error::Op { source, .. } => source.raw_os_error(),
            Error::NotBound(_) => Some(nix::libc::EINVAL),
        }
    }
}

/// Result of event-channel operations.
pub type Result<T> = std::result::Result<T, Error>;

/// One event-channel handle (one open of `/dev/xen/evtchn`). Ports bound
/// through a handle deliver their events to that handle only. As with the
/// Linux device, a port that fired is masked until [`EventChannel::unmask`].
pub trait EventChannel: AsFd + Send + Sync {
    /// `IOCTL_EVTCHN_BIND_INTERDOMAIN`: binds to `remote_port` of `remote_domid`.
    fn bind_interdomain(&self, remote_domid: DomId, remote_port: Port) -> Result<Port>;
    /// `IOCTL_EVTCHN_BIND_UNBOUND_PORT`: a new port that `remote_domid` may bind to.
    fn bind_unbound_port(&self, remote_domid: DomId) -> Result<Port>;
    /// `IOCTL_EVTCHN_UNBIND`: closes the port (and the binding at the far end).
    fn unbind(&self, port: Port) -> Result<()>;
    /// `IOCTL_EVTCHN_NOTIFY`: signals the remote end of `port`.
    fn notify(&self, port: Port) -> Result<()>;
    /// Takes the pending ports without blocking, appending them to `out`; each
    /// stays masked until unmasked.
    fn take_pending(&self, out: &mut Vec<Port>) -> Result<()>;
    /// Unmasks a port taken by [`EventChannel::take_pending`].
    fn unmask(&self, port: Port) -> Result<()>;
}

/// Waits until `ch` has pending ports (its fd, [`AsFd`], polls readable
/// while it does) or `timeout` passes (`None`: no limit). An interrupted
/// wait counts as a timeout. Returns whether ports are pending.
pub fn wait_pending(ch: &dyn EventChannel, timeout: Option<Duration>) -> Result<bool> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let timeout = match timeout {
        None => PollTimeout::NONE,
        Some(t) => PollTimeout::try_from(t.as_millis().min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX),
    };
    let mut fds = [PollFd::new(ch.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, timeout) {
        Ok(n) => Ok(n > 0),
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(e) => Err(Error::Op { op: "poll", source: e.into() }),
    }
}

/// Takes the pending ports into `out` (cleared first) and unmasks each, for
/// a caller that serves all its ports on every event.
pub fn take_and_unmask(ch: &dyn EventChannel, out: &mut Vec<Port>) -> Result<()> {
    out.clear();
    ch.take_pending(out)?;
    out.iter().try_for_each(|p| ch.unmask(*p))
}
