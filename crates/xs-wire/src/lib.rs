//! The xenstore wire protocol (`xen/include/public/io/xs_wire.h`,
//! `docs/misc/xenstore.txt`) in pure Rust: the message header and types, the
//! error strings, an incremental decoder, permissions, path checks, and a
//! client over the xenstored socket or `/dev/xen/xenbus` that links no libxen.
#![deny(missing_docs)]

pub mod abi;
pub mod client;
pub mod codec;
pub mod error;
pub mod path;
pub mod perms;
pub mod request;
pub mod transport;
pub mod watch;

pub use abi::{MsgType, XENSTORE_PAYLOAD_MAX};
pub use client::{Client, ClientError, TxId, WatchEvent};
pub use codec::{split_nul, Decoder, Message};
pub use error::{WireError, XsErrno};
pub use perms::{Access, Perm};
