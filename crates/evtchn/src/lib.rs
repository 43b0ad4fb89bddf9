//! Xen event channels: the [`EventChannel`] trait that backends use, and its
//! implementation on Linux's `/dev/xen/evtchn` (`include/uapi/xen/evtchn.h`),
//! done with direct ioctls and no libxenevtchn.
#![deny(missing_docs)]

pub mod abi;
mod channel;
mod device;

pub use channel::{take_and_unmask, wait_pending, DomId, Error, EventChannel, Port, Result};
pub use device::{XenEvtchn, EVTCHN_PATH};
