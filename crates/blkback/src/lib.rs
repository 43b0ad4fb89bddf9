//! The Xen PV block backend (`xen/include/public/io/blkif.h`, whose ABI,
//! requests and rings are the `blkif` crate's): storage engines,
//! per-queue execution by grant copy, and [`BlkDeviceType`], the device type
//! the backend framework serves as `qdisk` or `vbd`. See `docs/blkback.md`.
#![deny(missing_docs)]

pub mod buffer;
pub mod config;
pub mod connection;
pub mod device;
pub mod disk;
pub mod engine;
pub mod format;
pub mod idmap;
pub mod lock;
pub mod mapped;
pub mod media;
pub mod qcow2;
pub mod qcow2_engine;
pub mod queue;
pub mod uring;

pub use buffer::{AlignedBuf, BufferBudget, QueueBudget};
pub use config::{ConfigError, DiskConfig, FrontendConfig, Offer, QueueConfig};
pub use connection::{QueueError, RingQueue};
pub use device::{BlkDeviceType, BlkOptions, EngineChoice, DEFAULT_BUFFER_BYTES};
pub use disk::{Disk, DiskError, DiskKind};
pub use engine::{Completion, EngineError, IoEngine, IoOp, ThreadPoolEngine};
pub use format::{DiskImage, ImageError, ImageFormat, OpenImage};
pub use lock::{ImageLocks, LockError, LockKind, Locking};
pub use mapped::{MappedIo, PersistentGrants, PersistentStats, DEFAULT_PERSISTENT_GRANTS};
pub use media::Drive;
pub use qcow2::{DirectMapping, MappingLease, Qcow2Error, Qcow2Image};
pub use qcow2_engine::Qcow2UringEngine;
pub use queue::{QueueExecutor, QueueStats, DEFAULT_QUEUE_BUFFER_BYTES};
pub use uring::IoUringEngine;
