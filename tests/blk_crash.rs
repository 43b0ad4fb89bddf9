//! The backend killed with SIGKILL at random moments, hundreds of times,
//! under a verified mixed workload: each time a new process resumes the ring
//! from the shared memory and the request journal, and every request the
//! guest queued is answered exactly once, with its data right.
//!
//! The backend is a real child process (this test binary run again as
//! `crash_child`), the ring's queue and executor are blkback's own
//! (`RingQueue`, its journal in a tmpfs directory as `serve` keeps it in
//! /run/xenbackd), the disk is a file. Guest memory is a file both
//! processes map shared; a grant reference is a page number in it (the
//! simulator's grant tables are in-process, so they cannot outlive a
//! killed process). Event channels are two FIFOs.
//!
//! Counts printed and asserted: responses to requests not outstanding
//! (answered twice, or read from a response slot), requests never
//! answered, failed responses, data mismatches on reads and on the whole
//! disk at the end. `XENBACKD_CRASH_KILLS` sets the number of kills
//! (default 500), `XENBACKD_SEED` the seed.

mod blk_support;

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkback::{Disk, EngineChoice, IoEngine, IoUringEngine, QueueExecutor};
use blkback::{RingQueue, ThreadPoolEngine};
use blkif::abi::*;
use blkif::{BlkFrontRing, DiskLimits};
use gnttab::{CopySegment, DomId, GrantMapper, GrantMapping, GrantRef, GrantStatus, PAGE_SIZE};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use xen_bus::Protocol;
use xen_sim::rng::Rng;
use zerocopy::IntoBytes;

const RING_PAGES: usize = 1;
const SLOTS: usize = 32; // requests in flight at most: the ring's size
const BLOCK_PAGES: usize = 2;
const BLOCK: usize = BLOCK_PAGES * PAGE_SIZE;
const BLOCKS: usize = 256;
const CHILD_ENV: &str = "XENBACKD_CRASH_CHILD";

fn page_offset(page: usize) -> u64 {
    (page * PAGE_SIZE) as u64
}

/// The files both processes share.
struct Shared {
    dir: PathBuf,
}

impl Shared {
    fn mem(&self) -> PathBuf {
        self.dir.join("guest-memory")
    }
    fn disk(&self) -> PathBuf {
        self.dir.join("disk")
    }
    fn journal(&self) -> PathBuf {
        self.dir.join("journal")
    }
    fn kick(&self) -> PathBuf {
        self.dir.join("kick")
    }
    fn notify(&self) -> PathBuf {
        self.dir.join("notify")
    }
}

fn open_rw(path: &Path) -> File {
    File::options().read(true).write(true).open(path).unwrap()
}

/// A FIFO opened read-write and non-blocking (never blocks on open).
fn open_fifo(path: &Path) -> File {
    use std::os::unix::fs::OpenOptionsExt;
    File::options().read(true).write(true).custom_flags(nix::libc::O_NONBLOCK).open(path).unwrap()
}

fn signal(fifo: &File) {
    // A full FIFO already carries a wakeup.
    let _ = std::io::Write::write(&mut &*fifo, &[1]);
}

fn drain(fifo: &File) {
    let mut buf = [0u8; 256];
    while matches!(std::io::Read::read(&mut &*fifo, &mut buf), Ok(n) if n > 0) {}
}

fn wait(fds: &[&File], ms: u16) {
    let mut pfds: Vec<PollFd> = fds.iter().map(|f| PollFd::new(f.as_fd(), PollFlags::POLLIN)).collect();
    let _ = poll(&mut pfds, PollTimeout::from(ms));
}

/// Grant references are page numbers of the guest-memory file.
struct FlatGrants {
    mem: File,
}

impl GrantMapper for FlatGrants {
    fn map(&self, _: DomId, _: &[GrantRef], _: bool) -> gnttab::Result<GrantMapping> {
        Err(gnttab::Error::InvalidArgument("only grant copy here"))
    }

    fn copy(&self, segments: &mut [CopySegment<'_>], status: &mut [GrantStatus]) -> gnttab::Result<()> {
        for (seg, st) in segments.iter_mut().zip(status.iter_mut()) {
            let g = seg.guest();
            let at = page_offset(g.gref.0 as usize) + u64::from(g.offset);
            let ok = match seg {
                CopySegment::FromGuest { dst, .. } => self.mem.read_exact_at(dst, at).is_ok(),
                CopySegment::ToGuest { src, .. } => self.mem.write_all_at(src, at).is_ok(),
            };
            *st = if ok { GrantStatus::Okay } else { GrantStatus::BadGntref };
        }
        Ok(())
    }
}

/// The backend process: serves the ring until it is killed.
#[test]
#[ignore = "the child process of kills_at_random_moments_lose_and_repeat_nothing"]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else { return };
    let files = Shared { dir: dir.into() };
    let resume = std::env::var("XENBACKD_CRASH_RESUME").as_deref() == Ok("1");
    let mem = open_rw(&files.mem());
    let ring = GrantMapping::shared_file(&mem, RING_PAGES * PAGE_SIZE).unwrap();
    let disk = Arc::new(Disk::open(&files.disk(), false, false).unwrap());
    let engine: Box<dyn IoEngine> = match blk_support::engine() {
        EngineChoice::IoUring => Box::new(IoUringEngine::new(disk).unwrap()),
        _ => Box::new(ThreadPoolEngine::new(disk, 2).unwrap()),
    };
    let limits = DiskLimits {
        sectors: (BLOCKS * BLOCK / 512) as u64,
        read_only: false,
        discard: true,
        barrier: false,
        flush: true,
        max_indirect_segments: 0,
    };
    let exec = QueueExecutor::new(Protocol::Native, limits, 1, Arc::new(FlatGrants { mem }), engine);
    let journal = File::options().read(true).write(true).create(!resume).truncate(false).open(files.journal()).unwrap();
    let journal = Some(xen_ring::JournalFile::new(journal, 42));
    let mut queue = if resume {
        RingQueue::resume(0, ring, exec, journal).unwrap()
    } else {
        RingQueue::new(0, ring, exec, journal).unwrap()
    };
    let kick = open_fifo(&files.kick());
    let notify = open_fifo(&files.notify());
    signal(&notify); // up: the ring is attached
                     // A duplicate of the executor's eventfd, polled while the queue is busy.
    let completions = File::from(queue.completion_fd().try_clone_to_owned().unwrap());
    loop {
        drain(&kick);
        let pass = queue.process(64).unwrap();
        if pass.notify {
            signal(&notify);
        }
        if !pass.more {
            wait(&[&kick, &completions], 20);
        }
    }
}

struct Outstanding {
    op: u8,
    block: usize,
    slot: usize,
}

/// A `usize` in `0..n`.
fn below(rng: &mut Rng, n: usize) -> usize {
    rng.below(n as u64) as usize
}

/// The guest: a blkfront on the shared ring, with a model of the disk.
struct Guest {
    files: Shared,
    mem: File,
    front: BlkFrontRing<GrantMapping>,
    kick: File,
    notify: File,
    outstanding: HashMap<u64, Outstanding>,
    free_slots: Vec<usize>,
    busy: Vec<bool>,
    expected: Vec<Vec<u8>>,
    next_id: u64,
    rng: Rng,
    submitted: u64,
    answered: u64,
    unknown: u64,
    failed: u64,
    read_mismatches: u64,
}

impl Guest {
    fn slot_page(slot: usize, k: usize) -> usize {
        RING_PAGES + slot * BLOCK_PAGES + k
    }

    fn submit_some(&mut self) {
        let mut pushed = false;
        while self.front.free() > 0 && !self.free_slots.is_empty() && below(&mut self.rng, 16) != 0 {
            let block = below(&mut self.rng, BLOCKS);
            if self.busy[block] {
                continue;
            }
            let slot = self.free_slots.pop().unwrap();
            let id = self.next_id;
            self.next_id += 1;
            let op = match below(&mut self.rng, 10) {
                0..=4 => BLKIF_OP_WRITE,
                5..=7 => BLKIF_OP_READ,
                8 => BLKIF_OP_FLUSH_DISKCACHE,
                _ => BLKIF_OP_DISCARD,
            };
            let sector = (block * BLOCK / 512) as u64;
            let raw: Vec<u8> = match op {
                BLKIF_OP_DISCARD => {
                    let mut r = BlkifRequestDiscard64 { operation: op, ..Default::default() };
                    r.id = id.into();
                    r.sector_number = sector.into();
                    r.nr_sectors = ((BLOCK / 512) as u64).into();
                    self.expected[block] = vec![0; BLOCK];
                    r.as_bytes().to_vec()
                }
                BLKIF_OP_FLUSH_DISKCACHE => {
                    let mut r = BlkifRequest64 { operation: op, ..Default::default() };
                    r.id = id.into();
                    r.as_bytes().to_vec()
                }
                _ => {
                    let mut r = BlkifRequest64 { operation: op, nr_segments: BLOCK_PAGES as u8, ..Default::default() };
                    r.id = id.into();
                    r.sector_number = sector.into();
                    for k in 0..BLOCK_PAGES {
                        r.seg[k].gref = (Self::slot_page(slot, k) as u32).into();
                        r.seg[k].first_sect = 0;
                        r.seg[k].last_sect = 7;
                    }
                    if op == BLKIF_OP_WRITE {
                        let data: Vec<u8> = (0..BLOCK / 8).flat_map(|_| self.rng.next_u64().to_le_bytes()).collect();
                        self.mem.write_all_at(&data, page_offset(Self::slot_page(slot, 0))).unwrap();
                        self.expected[block] = data;
                    } else {
                        // Garbage where the read lands, so a read not done shows.
                        self.mem.write_all_at(&[0xee; BLOCK], page_offset(Self::slot_page(slot, 0))).unwrap();
                    }
                    r.as_bytes().to_vec()
                }
            };
            if op != BLKIF_OP_FLUSH_DISKCACHE {
                self.busy[block] = true;
            }
            self.front.put_request(&raw).unwrap();
            self.outstanding.insert(id, Outstanding { op, block, slot });
            self.submitted += 1;
            pushed = true;
        }
        if pushed && self.front.push_requests().unwrap() {
            signal(&self.kick);
        }
    }

    fn collect(&mut self) {
        loop {
            while let Some(r) = self.front.next_response().unwrap() {
                let Some(o) = self.outstanding.remove(&r.id) else {
                    self.unknown += 1;
                    eprintln!("response to request {:#x}, which is not outstanding", r.id);
                    continue;
                };
                self.answered += 1;
                if r.status != 0 || r.operation != o.op {
                    self.failed += 1;
                    eprintln!("request {:#x} (op {}): status {} op {}", r.id, o.op, r.status, r.operation);
                }
                if o.op == BLKIF_OP_READ && r.status == 0 {
                    let mut got = vec![0u8; BLOCK];
                    self.mem.read_exact_at(&mut got, page_offset(Self::slot_page(o.slot, 0))).unwrap();
                    if got != self.expected[o.block] {
                        self.read_mismatches += 1;
                        eprintln!("read of block {} (request {:#x}) differs from what was written", o.block, r.id);
                    }
                }
                if o.op != BLKIF_OP_FLUSH_DISKCACHE {
                    self.busy[o.block] = false;
                }
                self.free_slots.push(o.slot);
            }
            if !self.front.final_check_for_responses().unwrap() {
                return;
            }
        }
    }

    fn step(&mut self) {
        self.submit_some();
        wait(&[&self.notify], 1);
        drain(&self.notify);
        self.collect();
    }

    /// Starts a backend process and waits until it has attached.
    fn spawn(&mut self, resume: bool) -> Child {
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["crash_child", "--ignored", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &self.files.dir)
            .env("XENBACKD_CRASH_RESUME", if resume { "1" } else { "0" })
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        if !resume {
            // Only the first one: the guest queues nothing before its
            // backend is connected, as blkfront.
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                wait(&[&self.notify], 100);
                let mut b = [0u8; 1];
                if matches!(std::io::Read::read(&mut &self.notify, &mut b), Ok(1)) {
                    break;
                }
                assert!(Instant::now() < deadline, "the first backend did not come up");
            }
        }
        child
    }
}

fn kill(mut child: Child) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGKILL).unwrap();
    let status = child.wait().unwrap();
    assert!(
        std::os::unix::process::ExitStatusExt::signal(&status) == Some(9),
        "the backend died before it was killed: {status}"
    );
}

#[test]
fn kills_at_random_moments_lose_and_repeat_nothing() {
    let kills: usize = std::env::var("XENBACKD_CRASH_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
    let seed: u64 = std::env::var("XENBACKD_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("XENBACKD_SEED={seed} XENBACKD_CRASH_KILLS={kills} engine {:?}", blk_support::engine());
    let run = xen_sim::dom0::RunDir::new().unwrap();
    let files = Shared { dir: run.path().to_path_buf() };
    let mem_pages = RING_PAGES + SLOTS * BLOCK_PAGES;
    File::create(files.mem()).unwrap().set_len(page_offset(mem_pages)).unwrap();
    File::create(files.disk()).unwrap().set_len((BLOCKS * BLOCK) as u64).unwrap();
    for fifo in [files.kick(), files.notify()] {
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR).unwrap();
    }
    let mem = open_rw(&files.mem());
    let front =
        BlkFrontRing::new(GrantMapping::shared_file(&mem, RING_PAGES * PAGE_SIZE).unwrap(), Protocol::Native).unwrap();
    assert_eq!(front.size() as usize, SLOTS);
    let mut g = Guest {
        kick: open_fifo(&files.kick()),
        notify: open_fifo(&files.notify()),
        files,
        mem,
        front,
        outstanding: HashMap::new(),
        free_slots: (0..SLOTS).collect(),
        busy: vec![false; BLOCKS],
        expected: vec![vec![0; BLOCK]; BLOCKS],
        next_id: 1,
        rng: Rng::new(seed),
        submitted: 0,
        answered: 0,
        unknown: 0,
        failed: 0,
        read_mismatches: 0,
    };

    let mut child = g.spawn(false);
    let mut in_flight_at_kill = 0;
    for _ in 0..kills {
        let until = Instant::now() + Duration::from_micros(below(&mut g.rng, 20_000) as u64);
        while Instant::now() < until {
            g.step();
        }
        in_flight_at_kill += g.outstanding.len();
        kill(child);
        // Requests queued while no backend runs.
        g.submit_some();
        child = g.spawn(true);
    }
    // The last one answers everything left.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !g.outstanding.is_empty() && Instant::now() < deadline {
        wait(&[&g.notify], 10);
        drain(&g.notify);
        g.collect();
    }
    kill(child);
    let never_answered = g.outstanding.len();

    let disk = File::open(g.files.disk()).unwrap();
    let mut disk_mismatches = 0;
    for (b, want) in g.expected.iter().enumerate() {
        let mut got = vec![0u8; BLOCK];
        disk.read_exact_at(&mut got, (b * BLOCK) as u64).unwrap();
        if &got != want {
            disk_mismatches += 1;
            eprintln!("block {b} on disk differs");
        }
    }
    eprintln!(
        "{kills} kills, {} requests ({in_flight_at_kill} outstanding at the kills), {} answered; \
         answered twice or unknown {}, never answered {never_answered}, failed {}, read mismatches {}, \
         disk mismatches {disk_mismatches}",
        g.submitted, g.answered, g.unknown, g.failed, g.read_mismatches
    );
    assert_eq!(
        (g.unknown, never_answered, g.failed, g.read_mismatches, disk_mismatches),
        (0, 0, 0, 0, 0),
        "seed {seed}"
    );
    assert!(g.submitted > kills as u64, "the workload ran");
}
