//! Xenbus conventions every device class shares: the states of a device's
//! `state` nodes, domain ids, the `protocol` names, how Linux reads a node
//! (`xenbus_scanf`), and the layout of the ring nodes a frontend writes.
//! Pure: no xenstore access, so the backend framework, device types and
//! simulated frontends read and write them through one definition.
#![deny(missing_docs)]

mod protocol;
pub mod rings;
pub mod scan;
mod state;

pub use protocol::{Protocol, UnknownProtocol};
pub use rings::{FrontendRings, QueueRing, RingNodeError, RingOffer};
pub use state::{DomId, XenbusState};
