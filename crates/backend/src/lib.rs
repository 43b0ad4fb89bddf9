//! The xenbus backend framework: discovery of devices below
//! `backend/<type>`, the xenbus state machine, a thread reading watch events
//! and a worker pool serving shared rings. Concrete backends implement
//! [`DeviceType`], [`Device`] and [`RingHandler`] and never touch xenstore
//! paths or states themselves; see `docs/backend.md`.
#![deny(missing_docs)]

mod device;
mod error;
#[allow(dead_code)] // Used by the xenbus thread (next step).
mod key;
mod platform;
mod state;

pub use device::{BoundPort, Device, DeviceCtx, DeviceType, Progress, RingHandler, RingSetup};
pub use error::{DeviceError, Error};
pub use key::DeviceKey;
pub use platform::{EvtchnOpener, Platform};
pub use state::{Protocol, XenbusState};
