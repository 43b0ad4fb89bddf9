//! The Xen block-device protocol (`xen/include/public/io/blkif.h`): the ABI
//! in its three layouts, pure parsing of requests and encoding of responses,
//! and both ends of the ring (the backend's and, for simulated frontends,
//! the frontend's). No storage, xenstore or framework here: a device type
//! (blkback), a simulated blkfront and the fuzz targets share it.
#![deny(missing_docs)]

pub mod abi;
pub mod request;
pub mod ring;

pub use request::{
    parse, parse_indirect_segments, Direction, DiskLimits, Fault, Layout, Request, RequestError, RequestKind, Response,
    Segment, Status,
};
pub use ring::{BlkBackRing, BlkFrontRing, RawResponse};
