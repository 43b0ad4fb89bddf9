//! The qcow2 engine: a request whose whole range lies in allocated data
//! clusters of the top image, writable in place, goes to io_uring on the
//! image file at its host offset, as QEMU's qcow2 driver hands such
//! requests to its file driver; everything else (unallocated, zero and
//! compressed clusters, backing-file data, copy on write, allocating
//! writes, discard, flush) goes through imago on a small thread pool. Both
//! halves complete into one pollable fd: an epoll instance holding the
//! io_uring's own fd and the pool's eventfd.
//!
//! A range that maps to several runs of host clusters (not contiguous in
//! the file) goes through imago whole rather than being split: on a fully
//! allocated image the runs are long (qemu-img's preallocation lays
//! clusters out in guest order), and a split request would need several
//! completions merged into one.
//!
//! The mapping of a direct request stays valid until its completion is
//! reaped: it holds a lease ([`crate::qcow2::MappingLease`]) that discards,
//! the only operation we run that frees data clusters, wait for.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};

use crate::engine::{Completion, EngineError, IoEngine, IoOp, ThreadPoolEngine};
use crate::qcow2::Qcow2Image;
use crate::uring::IoUringEngine;

/// io_uring for a qcow2 image's mapped data clusters, imago on threads for
/// the rest.
pub struct Qcow2UringEngine {
    image: Arc<Qcow2Image>,
    /// Dropped before `pool` (fields drop in order): its drop waits for
    /// the direct I/O in flight and so releases the leases a discard on
    /// the pool may be waiting for before the pool's threads are joined.
    uring: IoUringEngine,
    pool: ThreadPoolEngine,
    /// Readable while either half has completions.
    ready: Epoll,
}

impl Qcow2UringEngine {
    /// An engine on `image` with `threads` I/O threads for what imago does;
    /// fails where io_uring is unavailable.
    pub fn new(image: Arc<Qcow2Image>, threads: usize) -> Result<Self, EngineError> {
        let uring = IoUringEngine::for_mapped_clusters(image.clone())?;
        let pool = ThreadPoolEngine::new(image.clone(), threads)?;
        let ready = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(|e| EngineError::Create(e.into()))?;
        // Level-triggered: each half resets its own eventfd when it drains.
        for fd in [uring.completion_fd(), pool.completion_fd()] {
            ready.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, 0)).map_err(|e| EngineError::Create(e.into()))?;
        }
        Ok(Qcow2UringEngine { image, uring, pool, ready })
    }
}

impl IoEngine for Qcow2UringEngine {
    fn submit(&mut self, tag: u64, op: IoOp) -> Result<(), EngineError> {
        let mapped = match &op {
            IoOp::Read { offset, buf } => self.image.map_direct(*offset, buf.len() as u64, false),
            IoOp::Write { offset, buf } => self.image.map_direct(*offset, buf.len() as u64, true),
            // Never sent: the engine takes no guest pages.
            IoOp::ReadPages { .. } | IoOp::WritePages { .. } | IoOp::Flush | IoOp::Discard { .. } => None,
        };
        match mapped {
            Some(m) => self.uring.submit_mapped(tag, op, m.host_offset, m.lease),
            // A flush goes to imago too: its metadata first, then an fsync
            // of the same file, which covers the direct writes completed.
            None => self.pool.submit(tag, op),
        }
    }

    fn submit_pending(&mut self) -> Result<(), EngineError> {
        self.uring.submit_pending()
    }

    fn completions(&mut self, out: &mut Vec<Completion>) {
        self.uring.completions(out);
        self.pool.completions(out);
    }

    fn completions_ready(&mut self) -> bool {
        self.uring.completions_ready()
    }

    fn completion_fd(&self) -> BorrowedFd<'_> {
        self.ready.0.as_fd()
    }

    fn in_flight(&self) -> usize {
        self.uring.in_flight() + self.pool.in_flight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::AlignedBuf;
    use crate::format::DiskImage;
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    const MIB: u64 = 1 << 20;

    /// A 4 MiB image (64 KiB clusters) whose first 2 MiB are allocated
    /// (written through imago), the rest unallocated. `None` where io_uring
    /// is unavailable (reported).
    fn image(name: &str) -> Option<(Arc<Qcow2Image>, PathBuf)> {
        if let Err(e) = crate::uring::probe() {
            eprintln!("io_uring unavailable here ({e}): the qcow2 io_uring engine is not tested");
            return None;
        }
        let p = std::env::temp_dir().join(format!("blkback-q2u-{}-{name}", std::process::id()));
        Qcow2Image::create(&p, 4 * MIB).unwrap();
        let image = Arc::new(Qcow2Image::open(&p, false, true).unwrap());
        image.write_at(&vec![0x11; 2 * MIB as usize], 0).unwrap();
        Some((image, p))
    }

    fn wait(engine: &mut dyn IoEngine, n: usize) -> Vec<Completion> {
        engine.submit_pending().unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while out.len() < n {
            let mut pfd = [nix::poll::PollFd::new(engine.completion_fd(), nix::poll::PollFlags::POLLIN)];
            nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(100u16)).unwrap();
            engine.completions(&mut out);
            assert!(Instant::now() < deadline, "completions did not arrive");
        }
        out.sort_by_key(|c| c.tag);
        out
    }

    fn filled(len: usize, byte: u8) -> AlignedBuf {
        let mut buf = AlignedBuf::new(len);
        buf.fill(byte);
        buf
    }

    #[test]
    fn allocated_clusters_go_direct_and_the_rest_through_imago() {
        let Some((image, p)) = image("split") else { return };
        let mut engine = Qcow2UringEngine::new(image.clone(), 2).unwrap();
        let before = image.direct_requests();
        // Allocated: a write and a read inside, one across two clusters.
        engine.submit(1, IoOp::Write { offset: 65536 - 4096, buf: filled(8192, 0x22) }).unwrap();
        let done = wait(&mut engine, 1);
        assert!(done[0].result.is_ok());
        engine.submit(2, IoOp::Read { offset: 65536 - 8192, buf: AlignedBuf::new(16384) }).unwrap();
        let done = wait(&mut engine, 1);
        let data = done[0].buf.as_ref().unwrap();
        assert!(data[..4096].iter().all(|&b| b == 0x11) && data[4096..12288].iter().all(|&b| b == 0x22));
        assert!(data[12288..].iter().all(|&b| b == 0x11));
        assert_eq!(image.direct_requests() - before, 2);
        // Unallocated: reads zeros through imago, a write allocates there;
        // a range that only starts in allocated clusters goes there whole.
        engine.submit(3, IoOp::Read { offset: 3 * MIB, buf: filled(4096, 0xff) }).unwrap();
        engine.submit(4, IoOp::Write { offset: 2 * MIB - 4096, buf: filled(8192, 0x33) }).unwrap();
        engine.submit(5, IoOp::Flush).unwrap();
        let done = wait(&mut engine, 3);
        assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
        assert!(done[0].buf.as_ref().unwrap().iter().all(|&b| b == 0));
        assert_eq!(image.direct_requests() - before, 2, "none of these went direct");
        // Now allocated: the same range goes direct.
        engine.submit(6, IoOp::Read { offset: 2 * MIB - 4096, buf: AlignedBuf::new(8192) }).unwrap();
        let done = wait(&mut engine, 1);
        assert!(done[0].buf.as_ref().unwrap().iter().all(|&b| b == 0x33));
        assert_eq!(image.direct_requests() - before, 3);
        drop(engine);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn a_discard_waits_for_the_direct_io_that_holds_its_mapping() {
        let Some((image, p)) = image("lease") else { return };
        let mapping = image.map_direct(0, 65536, true).expect("allocated and writable");
        let discard = std::thread::spawn({
            let image = image.clone();
            move || image.discard(0, 65536, false)
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(!discard.is_finished(), "the discard freed a cluster under a lease");
        // While the discard waits, no new mapping is handed out (the ring
        // worker must never block on it).
        assert!(image.map_direct(MIB, 4096, false).is_none());
        drop(mapping);
        discard.join().unwrap().unwrap();
        assert!(image.map_direct(0, 4096, false).is_none(), "discarded: unallocated now");
        assert!(image.map_direct(MIB, 4096, false).is_some());
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn a_read_only_image_never_maps_a_write() {
        let Some((image, p)) = image("ro") else { return };
        drop(image);
        let image = Qcow2Image::open(&p, true, false).unwrap();
        assert!(image.map_direct(0, 4096, true).is_none());
        assert!(image.map_direct(0, 4096, false).is_some());
        assert!(image.map_direct(4 * MIB - 512, 1024, false).is_none(), "past the end");
        std::fs::remove_file(p).unwrap();
    }

    /// Discards of the very clusters direct writes are going to (in flight
    /// together), and allocating writes that may take the freed clusters
    /// for other guest offsets: a contested block reads either the write's
    /// data or zeros, whole, and every other block what the last operation
    /// on it left; no write lands in a cluster given to another offset.
    #[test]
    fn discards_racing_direct_writes_leave_no_stale_data_in_reallocated_clusters() {
        let Some((image, p)) = image("race") else { return };
        let mut engine = Qcow2UringEngine::new(image.clone(), 2).unwrap();
        const BLOCK: u64 = 65536;
        let blocks = 4 * MIB / BLOCK;
        let mut expect = vec![0x11u8; blocks as usize];
        for b in 2 * MIB / BLOCK..blocks {
            expect[b as usize] = 0;
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let direct_before = image.direct_requests();
        for round in 0..40u64 {
            // Per block this round: the bytes it may read afterwards.
            let mut allowed: Vec<Vec<u8>> = vec![Vec::new(); blocks as usize];
            let mut n = 0;
            for i in 0..24u64 {
                let b = next() % blocks;
                let tag = round * 100 + i;
                let byte = (next() % 250 + 1) as u8;
                if allowed[b as usize].len() >= 2 {
                    continue;
                }
                // A block already written this round gets a discard beside
                // it, one already discarded a write: the contested pairs.
                let discard = match allowed[b as usize].first() {
                    Some(0) => false,
                    Some(_) => true,
                    None => next() % 3 == 0,
                };
                if discard {
                    engine.submit(tag, IoOp::Discard { offset: b * BLOCK, len: BLOCK, secure: false }).unwrap();
                    allowed[b as usize].push(0);
                } else {
                    engine.submit(tag, IoOp::Write { offset: b * BLOCK, buf: filled(BLOCK as usize, byte) }).unwrap();
                    allowed[b as usize].push(byte);
                }
                n += 1;
            }
            let done = wait(&mut engine, n);
            assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
            let touched: Vec<u64> = (0..blocks).filter(|&b| !allowed[b as usize].is_empty()).collect();
            for &b in &touched {
                engine.submit(b, IoOp::Read { offset: b * BLOCK, buf: AlignedBuf::new(BLOCK as usize) }).unwrap();
            }
            for c in wait(&mut engine, touched.len()) {
                let data = c.buf.as_ref().unwrap();
                let b = c.tag as usize;
                assert!(data.iter().all(|&x| x == data[0]), "round {round}: block {b} is mixed");
                assert!(allowed[b].contains(&data[0]), "round {round}: block {b} reads {:#x}", data[0]);
                expect[b] = data[0];
            }
        }
        assert!(image.direct_requests() > direct_before, "some writes went direct");
        engine.submit(1, IoOp::Flush).unwrap();
        wait(&mut engine, 1);
        for b in 0..blocks {
            engine.submit(b, IoOp::Read { offset: b * BLOCK, buf: AlignedBuf::new(BLOCK as usize) }).unwrap();
        }
        for c in wait(&mut engine, blocks as usize) {
            let want = expect[c.tag as usize];
            assert!(c.buf.as_ref().unwrap().iter().all(|&x| x == want), "block {} is not {want:#x}", c.tag);
        }
        drop(engine);
        drop(image);
        // Reopened: what imago's metadata says, not its caches.
        let image = Qcow2Image::open(&p, true, false).unwrap();
        let mut buf = vec![0u8; BLOCK as usize];
        for b in 0..blocks {
            image.read_at(&mut buf, b * BLOCK).unwrap();
            assert!(buf.iter().all(|&x| x == expect[b as usize]), "block {b} after reopening");
        }
        std::fs::remove_file(p).unwrap();
    }
}
