//! Xen's shared producer/consumer rings (`xen/include/public/io/ring.h`) as
//! typed Rust, over one or more mapped pages ([`GrantMapping`]).
//!
//! A ring carries requests of one type and responses of another
//! (`DEFINE_RING_TYPES`); both are plain-bytes types ([`RingEntry`]). The
//! [`BackRing`] takes requests and puts responses, the [`FrontRing`] the
//! reverse. Entries are copied out once and handed over by value, so a guest
//! that rewrites a slot afterwards changes nothing (no double fetch); the
//! caller validates the copy.
//!
//! Indices are loaded with `Acquire` and stored with `Release` (ring.h's
//! `xen_rmb()`/`xen_wmb()`), and a `SeqCst` fence stands for each `xen_mb()`
//! between publishing an index and reading the peer's event index. A peer
//! that publishes impossible indices gets a [`RingError`], never a panic, an
//! endless loop or an access outside the ring.
//!
//! ```
//! use gnttab::GrantMapping;
//! use xen_ring::{BackRing, FrontRing};
//!
//! let mem = std::sync::Arc::new(GrantMapping::anonymous(4096)?);
//! let mut front = FrontRing::<u64, u32, _>::new(mem.clone())?;
//! let mut back = BackRing::<u64, u32, _>::new(mem)?;
//! front.push_request(&42)?;
//! let notify_back = front.push_requests_and_check_notify()?;
//! assert!(notify_back);
//! let req = back.next_request()?.unwrap();
//! back.push_response(&(req as u32 + 1))?;
//! back.push_responses_and_check_notify()?;
//! assert_eq!(front.next_response()?, Some(43));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Byte rings (`DEFINE_XEN_FLEX_RING`: the console's, 9pfs's) are
//! [`ByteReader`] and [`ByteWriter`] over a [`ByteRingLayout`], with the same
//! index discipline.
//!
//! [`GrantMapping`]: gnttab::GrantMapping
#![deny(missing_docs)]

pub mod abi;
mod back;
mod bytes;
mod error;
mod front;
mod journal;
mod shared;
#[cfg(test)]
mod testing;

pub use abi::{entry_size, ring_size, RingIdx};
pub use back::BackRing;
pub use bytes::{ByteReader, ByteRingLayout, ByteWriter};
pub use error::RingError;
pub use front::{init_shared, FrontRing};
pub use journal::{JournalFile, Ticket};
pub use shared::RingEntry;
