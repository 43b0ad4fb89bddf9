//! A generic simulated frontend: the toolstack's and the guest's side of
//! xenbus for any device type, over ordinary xenstore connections (the
//! toolstack's as dom0, the guest's as the frontend domain) and the
//! simulated host's grants and event channels.
//!
//! [`Toolstack`] creates the frontend and backend directories as libxl does
//! (owners, read access for the peer, `state = 1`, `online = 1`). A
//! [`FrontendDevice`] is the guest: it grants ring pages, offers event
//! channels, writes its nodes, follows the backend's states, and can
//! [`Misbehaviour`] on purpose. Device-specific frontends (a blkfront, ...)
//! build on its pieces rather than on [`FrontendDevice::connect`].

mod device;
mod toolstack;

pub use device::{ConnectOptions, FrontendDevice, FrontendError, FrontendRing, Misbehaviour, RingMemory};
pub use toolstack::{DeviceSpec, Toolstack};
