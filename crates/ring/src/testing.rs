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

/// A new journal file in the temp directory, and its path (to open it again
/// as the next process would).
pub(crate) fn journal(name: &str) -> (crate::JournalFile, std::path::PathBuf) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("xen-ring-journal-{}-{name}-{n}", std::process::id()));
    (reopen(&path, true), path)
}

/// The journal at `path` opened again, as by the next process.
pub(crate) fn reopen(path: &std::path::Path, create: bool) -> crate::JournalFile {
    let f = std::fs::File::options().read(true).write(true).create(create).truncate(false).open(path).unwrap();
    crate::JournalFile::new(f, 0x1234_5678_9abc_def0)
}
