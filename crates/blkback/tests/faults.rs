//! What a guest sees when storage fails: each failing request gets
//! `BLKIF_RSP_ERROR` and nothing else is touched (the queue keeps serving,
//! other requests complete, data written elsewhere is intact), as Linux's
//! blkback answers a failed bio (`__end_block_io_op`). A stuck operation
//! holds up nothing but itself.
//!
//! Faults come from an engine that wraps the thread-pool engine on a real
//! file and fails or holds operations by offset (this machine has no
//! device-mapper for `error`/`delay` targets; `tests/blk_faults.rs` covers
//! the faults a real file system gives: ENOSPC, a removed or truncated
//! image).

use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};

use blkback::{Completion, Disk, EngineError, IoEngine, IoOp, QueueExecutor, ThreadPoolEngine};
use blkif::abi::*;
use blkif::{DiskLimits, Response, Status};
use gnttab::{CopySegment, DomId, GrantMapper, GrantMapping, GrantRef, GrantStatus, PAGE_SIZE};
use xen_bus::Protocol;
use zerocopy::IntoBytes;

/// Guest memory: grant reference N is page N.
struct GuestMemory(Mutex<Vec<u8>>);

impl GrantMapper for GuestMemory {
    fn map(&self, _: DomId, _: &[GrantRef], _: bool) -> gnttab::Result<GrantMapping> {
        Err(gnttab::Error::InvalidArgument("grant copy only"))
    }

    fn copy(&self, segments: &mut [CopySegment<'_>], status: &mut [GrantStatus]) -> gnttab::Result<()> {
        let mut mem = self.0.lock().unwrap();
        for (seg, st) in segments.iter_mut().zip(status.iter_mut()) {
            let g = seg.guest();
            let at = g.gref.0 as usize * PAGE_SIZE + usize::from(g.offset);
            if at + seg.len() > mem.len() {
                *st = GrantStatus::BadGntref;
                continue;
            }
            match seg {
                CopySegment::FromGuest { dst, .. } => dst.copy_from_slice(&mem[at..at + dst.len()]),
                CopySegment::ToGuest { src, .. } => mem[at..at + src.len()].copy_from_slice(src),
            }
            *st = GrantStatus::Okay;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// Fails with this errno.
    Errno(i32),
    /// Held until released: a disk that stopped answering.
    Stuck,
}

/// Which operations fail, and how.
type Rule = (fn(&IoOp) -> bool, Fault);

/// Fails or holds the operations that match its rules; passes the rest to
/// the thread-pool engine.
struct FaultyEngine {
    inner: ThreadPoolEngine,
    rules: Vec<Rule>,
    failed: Vec<Completion>,
    held: Arc<Mutex<Vec<(u64, IoOp)>>>,
}

impl IoEngine for FaultyEngine {
    fn submit(&mut self, tag: u64, op: IoOp) -> Result<(), EngineError> {
        match self.rules.iter().find(|(matches, _)| matches(&op)).map(|r| r.1) {
            Some(Fault::Errno(errno)) => {
                let buf = match op {
                    IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => Some(buf),
                    _ => None,
                };
                self.failed.push(Completion { tag, result: Err(std::io::Error::from_raw_os_error(errno)), buf });
                Ok(())
            }
            Some(Fault::Stuck) => {
                self.held.lock().unwrap().push((tag, op));
                Ok(())
            }
            None => self.inner.submit(tag, op),
        }
    }

    fn completions(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.failed);
        self.inner.completions(out);
    }

    fn completion_fd(&self) -> BorrowedFd<'_> {
        self.inner.completion_fd()
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.failed.len() + self.held.lock().unwrap().len()
    }
}

const BLOCK_SECTORS: u64 = 8;
const BAD_READ: u64 = 100 * 4096;
const FULL_FROM: u64 = 200 * 4096;
const STUCK_AT: u64 = 300 * 4096;

struct Queue {
    exec: QueueExecutor,
    mem: Arc<GuestMemory>,
    held: Arc<Mutex<Vec<(u64, IoOp)>>>,
    _path: TempFile,
}

struct TempFile(std::path::PathBuf);
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn queue(name: &str) -> Queue {
    let path = std::env::temp_dir().join(format!("blkback-faults-{}-{name}", std::process::id()));
    std::fs::File::create(&path).unwrap().set_len(4 << 20).unwrap();
    let disk = Arc::new(Disk::open(&path, false, false).unwrap());
    let held = Arc::new(Mutex::new(Vec::new()));
    let rules: Vec<Rule> = vec![
        (|op| matches!(op, IoOp::Read { offset, .. } if *offset == BAD_READ), Fault::Errno(nix::libc::EIO)),
        (
            |op| matches!(op, IoOp::Write { offset, .. } if *offset >= FULL_FROM && *offset < STUCK_AT),
            Fault::Errno(nix::libc::ENOSPC),
        ),
        (|op| matches!(op, IoOp::Read { offset, .. } if *offset == STUCK_AT), Fault::Stuck),
        (|op| matches!(op, IoOp::Flush), Fault::Errno(nix::libc::EIO)),
    ];
    let engine =
        FaultyEngine { inner: ThreadPoolEngine::new(disk, 2).unwrap(), rules, failed: Vec::new(), held: held.clone() };
    let limits = DiskLimits {
        sectors: 8192,
        read_only: false,
        discard: true,
        barrier: false,
        flush: true,
        max_indirect_segments: 0,
    };
    let mem = Arc::new(GuestMemory(Mutex::new(vec![0; 64 * PAGE_SIZE])));
    let exec = QueueExecutor::new(Protocol::Native, limits, 1, mem.clone(), Box::new(engine));
    Queue { exec, mem, held, _path: TempFile(path) }
}

fn request(op: u8, id: u64, offset: u64, page: u32) -> Vec<u8> {
    let mut r = BlkifRequest64 { operation: op, nr_segments: 1, ..Default::default() };
    r.id = id.into();
    r.sector_number = (offset / 512).into();
    r.seg[0].gref = page.into();
    r.seg[0].last_sect = (BLOCK_SECTORS - 1) as u8;
    if op == BLKIF_OP_FLUSH_DISKCACHE {
        r.nr_segments = 0;
    }
    r.as_bytes().to_vec()
}

impl Queue {
    fn submit(&mut self, raw: &[u8], out: &mut Vec<Response>) {
        self.exec.submit(raw, out);
        self.exec.poll(out);
    }

    /// Polls until `n` responses are in `out` (the engine's threads finish
    /// in a few milliseconds; a minute means something hangs).
    fn collect(&mut self, out: &mut Vec<Response>, n: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while out.len() < n {
            assert!(std::time::Instant::now() < deadline, "{} of {n} responses", out.len());
            std::thread::sleep(std::time::Duration::from_millis(1));
            self.exec.poll(out);
        }
    }

    fn page(&self, page: usize) -> Vec<u8> {
        self.mem.0.lock().unwrap()[page * PAGE_SIZE..(page + 1) * PAGE_SIZE].to_vec()
    }

    fn fill(&self, page: usize, byte: u8) {
        self.mem.0.lock().unwrap()[page * PAGE_SIZE..(page + 1) * PAGE_SIZE].fill(byte);
    }
}

fn status_of(out: &[Response], id: u64) -> Status {
    out.iter().find(|r| r.id == id).unwrap_or_else(|| panic!("no response to {id}")).status
}

#[test]
fn a_read_error_fails_that_read_alone() {
    let mut q = queue("eio-read");
    let mut out = Vec::new();
    q.fill(1, 0xab);
    q.submit(&request(BLKIF_OP_WRITE, 1, 0, 1), &mut out);
    q.collect(&mut out, 1);
    q.fill(2, 0xee);
    q.submit(&request(BLKIF_OP_READ, 2, BAD_READ, 2), &mut out);
    q.submit(&request(BLKIF_OP_READ, 3, 0, 3), &mut out);
    q.collect(&mut out, 3);
    assert_eq!(status_of(&out, 1), Status::Okay);
    assert_eq!(status_of(&out, 2), Status::Error, "the failed read");
    assert_eq!(q.page(2), vec![0xee; PAGE_SIZE], "a failed read writes nothing to the guest");
    assert_eq!(status_of(&out, 3), Status::Okay, "the other read");
    assert_eq!(q.page(3), vec![0xab; PAGE_SIZE]);
    assert_eq!(q.exec.pending(), 0);
    assert_eq!(q.exec.stats().failed, 1);
}

#[test]
fn a_full_disk_fails_the_writes_that_do_not_fit_and_keeps_the_rest() {
    let mut q = queue("enospc");
    let mut out = Vec::new();
    q.fill(1, 0x11);
    q.submit(&request(BLKIF_OP_WRITE, 1, FULL_FROM - 4096, 1), &mut out);
    q.fill(2, 0x22);
    q.submit(&request(BLKIF_OP_WRITE, 2, FULL_FROM, 2), &mut out);
    q.collect(&mut out, 2);
    assert_eq!(status_of(&out, 1), Status::Okay);
    assert_eq!(status_of(&out, 2), Status::Error, "ENOSPC");
    // The write that fitted is there; the queue still reads and writes.
    q.submit(&request(BLKIF_OP_READ, 3, FULL_FROM - 4096, 3), &mut out);
    q.submit(&request(BLKIF_OP_WRITE, 4, 0, 2), &mut out);
    q.collect(&mut out, 4);
    assert_eq!((status_of(&out, 3), status_of(&out, 4)), (Status::Okay, Status::Okay));
    assert_eq!(q.page(3), vec![0x11; PAGE_SIZE]);
}

#[test]
fn a_failed_flush_is_an_error_response() {
    let mut q = queue("eio-flush");
    let mut out = Vec::new();
    q.submit(&request(BLKIF_OP_FLUSH_DISKCACHE, 9, 0, 0), &mut out);
    q.collect(&mut out, 1);
    assert_eq!(status_of(&out, 9), Status::Error);
    assert_eq!(out[0].operation, BLKIF_OP_FLUSH_DISKCACHE);
}

#[test]
fn a_stuck_operation_holds_up_only_itself() {
    let mut q = queue("stuck");
    let mut out = Vec::new();
    q.submit(&request(BLKIF_OP_READ, 100, STUCK_AT, 1), &mut out);
    for i in 0..16u64 {
        q.fill(2 + i as usize, i as u8);
        q.submit(&request(BLKIF_OP_WRITE, i, i * 4096, 2 + i as u32), &mut out);
    }
    q.collect(&mut out, 16);
    assert!(out.iter().all(|r| r.id != 100 && r.status == Status::Okay), "{out:?}");
    assert_eq!(q.exec.pending(), 1, "the stuck read is still in flight");
    assert_eq!(q.held.lock().unwrap().len(), 1);
}
