//! A simulated Xen host, in process: a wire-compatible xenstored on a unix
//! socket, domains with event channels and grant tables over real shared
//! memory, and scripted frontends, so that every layer is tested without a
//! hypervisor.
#![deny(missing_docs)]

pub mod blkfront;
pub mod consfront;
pub mod dom0;
pub mod frontend;
pub mod host;
pub mod measure;
pub mod rng;
pub mod xenstored;
