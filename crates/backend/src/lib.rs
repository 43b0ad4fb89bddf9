//! The xenbus backend framework: discovery of devices below
//! `backend/<type>`, the xenbus state machine, a thread reading watch events
//! and a worker pool serving shared rings. Concrete backends implement
//! [`DeviceType`], [`Device`] and [`RingHandler`] and never touch xenstore
//! paths or states themselves; see `docs/backend.md`.
#![deny(missing_docs)]

mod backend;
mod clock;
mod device;
pub mod echo;
mod error;
mod frontends;
mod key;
mod platform;
mod pool;
mod reader;
mod snapshot;
mod state;
mod thread;
mod worker;

pub use backend::{
    Backend, Config, Stats, DEFAULT_DEPARTURE_TIMEOUT, DEFAULT_DRAIN_TIMEOUT, DEFAULT_RING_BUDGET,
    DEFAULT_XENSTORE_TIMEOUT,
};
pub use clock::Tick;
pub use device::{BoundPort, Device, DeviceCtx, DeviceType, Drained, MappedRing, Progress, RingHandler, RingSetup};
pub use error::{DeviceError, Error};
pub use frontends::{DeviceFilter, Frontends};
pub use key::DeviceKey;
pub use platform::{EvtchnOpener, Platform};
pub use pool::{PlacedRing, RingFailure, RingPool};
pub use reader::NodeReader;
pub use snapshot::{
    DeviceSnapshot, Latencies, LatencySampler, Monitor, RingCounters, RingStats, LATENCY_BUCKETS,
    LATENCY_SAMPLE_BATCHES, LATENCY_SAMPLE_INTERVAL,
};
pub use thread::spawn_named;
