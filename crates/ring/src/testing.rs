//! Entry types for the unit tests: blkif-sized requests (112 bytes) and
//! 16-byte responses.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub(crate) struct TestReq {
    pub(crate) id: u64,
    pub(crate) body: [u8; 104],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub(crate) struct TestRsp {
    pub(crate) id: u64,
    pub(crate) status: i32,
    pub(crate) pad: u32,
}

pub(crate) fn req(id: u64) -> TestReq {
    TestReq { id, body: [id as u8; 104] }
}

pub(crate) fn rsp(id: u64) -> TestRsp {
    TestRsp { id, status: 0, pad: 0 }
}
