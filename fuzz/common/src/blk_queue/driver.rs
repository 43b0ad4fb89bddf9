//! Drives one [`QueueExecutor`] as a ring worker does, for `blk_queue`:
//! takes the guest's requests while the queue can, polls, and checks every
//! answer and counter against what the requests asked (the properties in
//! the parent module's documentation).

use std::collections::{HashMap, VecDeque};
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use blkback::buffer::MAX_REQUEST_BYTES;
use blkback::{
    AlignedBuf, BufferBudget, Disk, DiskImage, IoEngine, IoUringEngine, QueueBudget, QueueExecutor, ThreadPoolEngine,
    DEFAULT_QUEUE_BUFFER_BYTES,
};
use blkif::abi::{
    BlkifRequest32, BlkifRequest64, BlkifRequestDiscard32, BlkifRequestDiscard64, BlkifRequestIndirect32,
    BlkifRequestIndirect64, BlkifRequestSegment, BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT, BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER,
    SEGS_PER_INDIRECT_FRAME,
};
use blkif::{parse, parse_indirect_segments, Direction, DiskLimits, Layout, RequestKind, Response, Segment, Status};
use gnttab::{GrantRef, PAGE_SIZE};
use xen_bus::Protocol;
use zerocopy::little_endian::U32;
use zerocopy::IntoBytes;

use super::guest::{self, access, Access, Guest, DATA_PAGES, INDIRECT_PAGES, PAGES};
use super::{gref_of, sector_of, Check, Op, Scenario, Seg, Setup, Summary};

/// How long the queue may take to answer everything pending.
const WAIT: Duration = Duration::from_secs(5);
/// Requests per input, all told (bursts included): keeps a run short.
const MAX_REQUESTS: u32 = 512;
/// Checks per input.
const MAX_CHECKS: u32 = 16;
/// Sleeping per input, all told.
const MAX_SLEEP: Duration = Duration::from_millis(20);
/// What the neighbour holds of the daemon's budget per unit.
const NEIGHBOUR_UNIT: usize = 64 << 10;
/// A queue parked on the daemon's budget asks to be polled again after this (`queue.rs`).
const BUDGET_RETRY: Duration = Duration::from_millis(1);
/// What a check's read finds in its pages where nothing was read.
const POISON: u8 = 0xa5;

/// What a request's data is, for the byte counters.
#[derive(Clone, Copy, Debug)]
struct Data {
    direction: Direction,
    /// Its bytes, if known (an indirect request's pages rewritten while it was pending: not).
    known: Option<u64>,
    /// At most its bytes.
    bound: u64,
}

/// A request taken and not answered yet.
#[derive(Debug)]
struct Pending {
    /// Order taken off the ring.
    seq: u64,
    /// The operation byte its response carries.
    echo: u8,
    /// Its status, where the harness knows it.
    want: Option<Status>,
    /// `parse` took it (answered later, ordered by barriers).
    parsed: bool,
    /// A barrier.
    barrier: bool,
    data: Option<Data>,
    /// Its indirect pages.
    indirect: Vec<u32>,
    /// The guest pages the queue may write for it (a read's destination
    /// pages); `None`: any (a read whose segments are not known).
    writes_to: Option<Vec<u32>>,
}

impl Pending {
    /// Its indirect pages may have changed before the queue copied them:
    /// nothing is known of its segments. Whether it became a read that may
    /// write any page.
    fn unsettle(&mut self) -> bool {
        self.want = None;
        let Some(d) = &mut self.data else { return false };
        d.known = None;
        d.direction == Direction::Read && self.writes_to.take().is_some()
    }
}

/// What the answers so far add up to.
#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    responses: u64,
    failed: u64,
    /// Bytes asked, at most, by the reads and writes taken.
    read_bound: u64,
    write_bound: u64,
    /// Bytes of the reads and writes answered `Okay` (those whose bytes are known).
    read_okay: u64,
    write_okay: u64,
    /// At most the bytes of the reads answered `Okay` whose bytes are not known.
    read_okay_unknown: u64,
}

/// Whether the kernel gives us io_uring (once per process).
pub(super) fn io_uring_works() -> bool {
    static WORKS: OnceLock<bool> = OnceLock::new();
    *WORKS.get_or_init(|| blkback::uring::probe().is_ok())
}

/// A fresh zeroed disk of `sectors`, its file already unlinked.
fn disk(read_only: bool, direct: bool, sectors: u64) -> Arc<Disk> {
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "fuzz-blk-queue-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::File::create(&path).expect("disk file").set_len(sectors * 512).expect("disk size");
    let disk = Disk::open(&path, read_only, direct);
    let _ = std::fs::remove_file(&path);
    Arc::new(disk.expect("disk"))
}

/// Waits up to 1 ms for `fd` (the completion eventfd) to be readable.
fn wait_readable(fd: BorrowedFd<'_>) {
    use nix::poll::{poll, PollFd, PollFlags};
    let _ = poll(&mut [PollFd::new(fd, PollFlags::POLLIN)], 1u8);
}

/// The guest's data of a check: a pattern over its pages.
fn pattern(fill: u8, gref: u32) -> Vec<u8> {
    (0..PAGE_SIZE as u32)
        .map(|i| ((gref * PAGE_SIZE as u32 + i).wrapping_mul(0x9e37_79b1) >> 24) as u8 ^ fill)
        .collect()
}

/// The slot of a segment list, for requests the harness builds.
fn raw_segments(segs: &[Segment]) -> Vec<BlkifRequestSegment> {
    segs.iter()
        .map(|s| BlkifRequestSegment {
            gref: s.gref.0.into(),
            first_sect: s.first_sect,
            last_sect: s.last_sect,
            _pad: [0; 2],
        })
        .collect()
}

/// One run: the queue, the guest, what is pending.
struct Run {
    abi: Protocol,
    limits: DiskLimits,
    /// The disk file's sectors (fewer than the limits say, if truncated).
    file_sectors: u64,
    guest: Arc<Guest>,
    disk: Arc<Disk>,
    exec: QueueExecutor,
    budget: Arc<QueueBudget>,
    budget_limit: usize,
    daemon: Arc<BufferBudget>,
    neighbour: Arc<QueueBudget>,
    hog: Option<AlignedBuf>,
    capacity: u64,
    /// Requests in the guest's ring the queue has not taken.
    ring: VecDeque<Vec<u8>>,
    next_id: u64,
    next_seq: u64,
    pending: HashMap<u64, Pending>,
    answered: HashMap<u64, Status>,
    out: Vec<Response>,
    copy_faults_seen: u64,
    tally: Tally,
    slept: Duration,
    summary: Summary,
}

impl Run {
    fn new(setup: &Setup) -> Run {
        let limits = setup.limits();
        let guest = Arc::new(Guest::new());
        let file_sectors = setup.file_sectors();
        let disk = disk(setup.read_only, setup.direct, file_sectors);
        let use_uring = setup.io_uring && io_uring_works();
        let engine: Box<dyn IoEngine> = if use_uring {
            Box::new(IoUringEngine::new(disk.clone()).expect("io_uring engine"))
        } else {
            Box::new(ThreadPoolEngine::new(disk.clone(), 1 + usize::from(setup.two_threads)).expect("thread pool"))
        };
        let (queue_limit, daemon_limit) =
            if setup.small_budget { (0, 0) } else { (DEFAULT_QUEUE_BUFFER_BYTES, blkback::DEFAULT_BUFFER_BYTES) };
        let daemon = BufferBudget::new(daemon_limit);
        let budget = QueueBudget::new(queue_limit, daemon.clone());
        let neighbour = QueueBudget::new(0, daemon.clone());
        let mut exec =
            QueueExecutor::new(setup.abi, limits, guest::FRONTEND, guest.clone(), engine).with_budget(budget.clone());
        if setup.persistent {
            exec =
                exec.with_persistent_grants(usize::from(setup.capacity), if setup.page_aligned { 4096 } else { 512 });
        }
        assert_eq!(exec.abi(), setup.abi);
        Run {
            abi: setup.abi,
            limits,
            file_sectors,
            guest,
            disk,
            exec,
            budget,
            budget_limit: queue_limit.max(MAX_REQUEST_BYTES),
            daemon,
            neighbour,
            hog: None,
            capacity: u64::from(setup.capacity),
            ring: VecDeque::new(),
            next_id: 0x5eed_0000_0000,
            next_seq: 0,
            pending: HashMap::new(),
            answered: HashMap::new(),
            out: Vec::new(),
            copy_faults_seen: 0,
            tally: Tally::default(),
            slept: Duration::ZERO,
            summary: Summary { io_uring: use_uring, ..Summary::default() },
        }
    }

    fn narrow(&self) -> bool {
        Layout::from(self.abi) == Layout::Narrow
    }

    fn slot(&self, mut bytes: Vec<u8>) -> Vec<u8> {
        bytes.resize(Layout::from(self.abi).slot_size(), 0);
        bytes
    }

    fn rw_slot(&self, operation: u8, nr: u8, sector: u64, segs: &[BlkifRequestSegment]) -> Vec<u8> {
        let mut seg = [BlkifRequestSegment::default(); BLKIF_MAX_SEGMENTS_PER_REQUEST];
        seg[..segs.len()].copy_from_slice(segs);
        let sector_number = sector.into();
        let bytes = if self.narrow() {
            BlkifRequest32 { operation, nr_segments: nr, sector_number, seg, ..Default::default() }.as_bytes().to_vec()
        } else {
            BlkifRequest64 { operation, nr_segments: nr, sector_number, seg, ..Default::default() }.as_bytes().to_vec()
        };
        self.slot(bytes)
    }

    fn indirect_slot(&self, indirect_op: u8, nr: u16, sector: u64, pages: &[u32]) -> Vec<u8> {
        let mut grefs = [U32::new(0); 8];
        for (g, p) in grefs.iter_mut().zip(pages) {
            *g = (*p).into();
        }
        let (operation, nr_segments, sector_number) = (BLKIF_OP_INDIRECT, nr.into(), sector.into());
        let bytes = if self.narrow() {
            let r = BlkifRequestIndirect32 {
                operation,
                indirect_op,
                nr_segments,
                sector_number,
                indirect_grefs: grefs,
                ..Default::default()
            };
            r.as_bytes().to_vec()
        } else {
            let r = BlkifRequestIndirect64 {
                operation,
                indirect_op,
                nr_segments,
                sector_number,
                indirect_grefs: grefs,
                ..Default::default()
            };
            r.as_bytes().to_vec()
        };
        self.slot(bytes)
    }

    fn discard_slot(&self, flag: u8, sector: u64, nr_sectors: u64) -> Vec<u8> {
        let (operation, sector_number, nr_sectors) = (BLKIF_OP_DISCARD, sector.into(), nr_sectors.into());
        let bytes = if self.narrow() {
            BlkifRequestDiscard32 { operation, flag, sector_number, nr_sectors, ..Default::default() }
                .as_bytes()
                .to_vec()
        } else {
            BlkifRequestDiscard64 { operation, flag, sector_number, nr_sectors, ..Default::default() }
                .as_bytes()
                .to_vec()
        };
        self.slot(bytes)
    }

    /// Writes indirect segment descriptors `segs`, repeated to `nr`, into `pages`.
    fn write_descriptors(&mut self, pages: &[u32], nr: usize, segs: &[BlkifRequestSegment]) {
        if segs.is_empty() {
            return;
        }
        for (p, &gref) in pages.iter().enumerate() {
            let first = p * SEGS_PER_INDIRECT_FRAME;
            if first >= nr || gref >= PAGES {
                continue;
            }
            let bytes: Vec<u8> = (first..nr.min(first + SEGS_PER_INDIRECT_FRAME))
                .flat_map(|i| segs[i % segs.len()].as_bytes().to_vec())
                .collect();
            self.poke(gref, 0, &bytes);
        }
    }

    /// The guest writes its page; indirect requests pending on it are no longer known.
    fn poke(&mut self, gref: u32, offset: usize, bytes: &[u8]) {
        let n = bytes.len().min(PAGE_SIZE - offset);
        let mut old = vec![0u8; n];
        self.guest.read(gref, offset, &mut old);
        if old == bytes[..n] {
            return;
        }
        self.guest.write(gref, offset, bytes);
        self.unsettle(Some(&[gref]));
    }

    /// Indirect requests pending on `pages` (`None`: on any) no longer know
    /// their segments: the guest, or a read of the queue's, may change the
    /// pages before the queue copies them.
    fn unsettle(&mut self, pages: Option<&[u32]>) {
        let mut any = false;
        for p in self.pending.values_mut() {
            if !p.indirect.is_empty() && pages.is_none_or(|g| p.indirect.iter().any(|i| g.contains(i))) {
                any |= p.unsettle();
            }
        }
        if any {
            self.unsettle(None);
        }
    }

    /// The slot of a request op (descriptors of an indirect one written first).
    fn request_slot(&mut self, op: &Op) -> Vec<u8> {
        match op {
            Op::Raw { bytes } => self.slot(bytes.clone()),
            Op::Rw { op, nr, sector, segs } => {
                let operation = [BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE]
                    [usize::from(op % 4)];
                let raw: Vec<_> = segs.iter().map(Seg::raw).collect();
                self.rw_slot(operation, nr % 13, sector_of(*sector), &raw)
            }
            Op::Indirect { inner, nr, sector, pages, segs } => {
                let inner = if *inner < 0xc0 { inner % 2 } else { *inner };
                let nr = nr % 1030;
                let pages: Vec<u32> = pages.iter().map(|&g| gref_of(g)).collect();
                let raw: Vec<_> = segs.iter().map(Seg::raw).collect();
                self.write_descriptors(&pages, usize::from(nr), &raw);
                self.indirect_slot(inner, nr, sector_of(*sector), &pages)
            }
            Op::Discard { flag, sector, count } => {
                let n = if *count == 0xff { u64::MAX } else { u64::from(*count) };
                self.discard_slot(*flag, sector_of(*sector), n)
            }
            _ => unreachable!("not a request: {op:?}"),
        }
    }

    /// A request op's slot offered, unless the input made [`MAX_REQUESTS`] already.
    fn request(&mut self, op: &Op) -> bool {
        if self.summary.requests >= MAX_REQUESTS {
            return false;
        }
        let slot = self.request_slot(op);
        self.offer(slot);
        true
    }

    /// The guest puts a request in its ring (with a fresh id); the queue
    /// takes what it can. Its id.
    fn offer(&mut self, mut slot: Vec<u8>) -> u64 {
        self.summary.requests += 1;
        let id = self.next_id;
        self.next_id += 1;
        let at = if self.narrow() { 4 } else { 8 };
        slot[at..at + 8].copy_from_slice(&id.to_le_bytes());
        self.ring.push_back(slot);
        if !self.exec.can_take() {
            self.summary.ring_waits += 1;
        }
        self.take();
        id
    }

    /// Takes requests off the ring while the queue can.
    fn take(&mut self) {
        while self.exec.can_take() {
            let Some(slot) = self.ring.pop_front() else { return };
            let mut pending = self.expect(&slot);
            // A pending read may write this one's indirect pages before the
            // queue copies them, and this one, a read, theirs.
            let overlaps =
                |w: &Option<Vec<u32>>| w.as_ref().is_none_or(|w| w.iter().any(|g| pending.indirect.contains(g)));
            if !pending.indirect.is_empty() && self.pending.values().any(|q| overlaps(&q.writes_to)) {
                pending.unsettle();
            }
            match pending.writes_to.clone() {
                None => self.unsettle(None),
                Some(pages) => self.unsettle(Some(&pages)),
            }
            let id = blkif::request::request_id(self.abi, &slot);
            let parsed = pending.parsed;
            self.add_bounds(&pending);
            assert!(self.pending.insert(id, pending).is_none(), "id {id:#x} reused by the harness");
            self.exec.submit(&slot, &mut self.out);
            self.after_call();
            if !parsed {
                assert!(self.answered.contains_key(&id), "request {id:#x} that parse refuses was not answered at once");
            }
        }
    }

    fn add_bounds(&mut self, p: &Pending) {
        if let Some(d) = p.data {
            match d.direction {
                Direction::Read => self.tally.read_bound += d.bound,
                Direction::Write => self.tally.write_bound += d.bound,
            }
        }
    }

    /// What the harness expects of the request in `slot`, now.
    fn expect(&mut self, slot: &[u8]) -> Pending {
        let seq = self.next_seq;
        self.next_seq += 1;
        let echo = if slot[0] == BLKIF_OP_INDIRECT { slot[1] } else { slot[0] };
        let mut p = Pending {
            seq,
            echo,
            want: None,
            parsed: false,
            barrier: false,
            data: None,
            indirect: Vec::new(),
            writes_to: Some(Vec::new()),
        };
        let req = match parse(self.abi, slot, &self.limits) {
            Ok(req) => req,
            Err(e) => {
                p.want = Some(e.response().status);
                return p;
            }
        };
        p.parsed = true;
        let good = |direction: Direction, segs: &[Segment]| {
            segs.iter().all(|s| match access(s.gref) {
                Access::ReadWrite => true,
                Access::ReadOnly => direction == Direction::Write,
                Access::None => false,
            })
        };
        let len = |segs: &[Segment]| segs.iter().map(|s| s.len() as u64).sum::<u64>();
        // The pages a read writes: those it may (read-write).
        let written = |direction: Direction, segs: &[Segment]| match direction {
            Direction::Read => {
                segs.iter().map(|s| s.gref.0).filter(|&g| access(GrantRef(g)) == Access::ReadWrite).collect()
            }
            Direction::Write => Vec::new(),
        };
        // A good request beyond a truncated file's end may fail (or not:
        // writes there may grow it).
        let okay = |sector: u64, segs: &[Segment]| {
            let sectors = segs.iter().map(Segment::sectors).sum::<u64>();
            sector.checked_add(sectors).is_some_and(|end| end <= self.file_sectors).then_some(Status::Okay)
        };
        match req.kind {
            RequestKind::Data { direction, sector, segments, barrier, .. } => {
                p.barrier = barrier;
                p.want = if good(direction, &segments) { okay(sector, &segments) } else { Some(Status::Error) };
                if !segments.is_empty() {
                    let n = len(&segments);
                    p.data = Some(Data { direction, known: Some(n), bound: n });
                    p.writes_to = Some(written(direction, &segments));
                }
            }
            RequestKind::Discard { sector, nr_sectors, .. } => {
                let end = sector.checked_add(nr_sectors);
                p.want = end.is_some_and(|end| end <= self.file_sectors).then_some(Status::Okay);
            }
            RequestKind::Indirect { direction, sector, nr_segments, pages } => {
                p.indirect = pages.iter().map(|g| g.0).collect();
                let bound = u64::from(nr_segments) * PAGE_SIZE as u64;
                let mut known = 0;
                p.want = Some(Status::Error);
                if pages.iter().all(|&g| access(g) != Access::None) {
                    let mut raw = vec![0u8; pages.len() * PAGE_SIZE];
                    for (chunk, g) in raw.chunks_mut(PAGE_SIZE).zip(&pages) {
                        self.guest.read(g.0, 0, chunk);
                    }
                    match parse_indirect_segments(&raw, nr_segments, sector, &self.limits) {
                        Ok(segs) => {
                            known = len(&segs);
                            p.writes_to = Some(written(direction, &segs));
                            p.want = if good(direction, &segs) { okay(sector, &segs) } else { Some(Status::Error) };
                        }
                        Err(f) => p.want = Some(f.status()),
                    }
                }
                p.data = Some(Data { direction, known: Some(known), bound });
            }
        }
        p
    }

    /// After a call of the queue's: the answers it gave, its counters.
    fn after_call(&mut self) {
        let faults = self.guest.copy_faults();
        if faults != self.copy_faults_seen {
            // A copy call failed as a whole: whatever was pending may fail.
            self.copy_faults_seen = faults;
            for p in self.pending.values_mut() {
                if p.want == Some(Status::Okay) {
                    p.want = None;
                }
            }
        }
        for rsp in std::mem::take(&mut self.out) {
            self.answer(rsp);
        }
        self.check_counters();
    }

    fn answer(&mut self, rsp: Response) {
        let Some(p) = self.pending.remove(&rsp.id) else {
            let again = self.answered.contains_key(&rsp.id);
            panic!(
                "{} for request {:#x}: {rsp:?}",
                if again { "a second answer" } else { "an answer never asked" },
                rsp.id
            );
        };
        assert_eq!(rsp.operation, p.echo, "request {:#x} answered with another operation", rsp.id);
        assert!([0, -1, -2].contains(&rsp.status.code()));
        match p.want {
            Some(want) => assert_eq!(rsp.status, want, "request {:#x}: {p:?}", rsp.id),
            None => assert!(!p.parsed || rsp.status != Status::NotSupported, "{rsp:?} for a request parse took"),
        }
        if p.parsed {
            if let Some(earlier) = self.pending.values().find(|q| q.barrier && q.seq < p.seq) {
                panic!("request {:#x} answered before the barrier taken before it: {earlier:?}", rsp.id);
            }
            if p.barrier {
                if let Some(earlier) = self.pending.values().find(|q| q.parsed && q.seq < p.seq) {
                    panic!("barrier {:#x} answered before a request taken before it: {earlier:?}", rsp.id);
                }
            }
        }
        self.tally.responses += 1;
        if rsp.status != Status::Okay {
            self.tally.failed += 1;
        } else if let Some(d) = p.data {
            match (d.direction, d.known) {
                (Direction::Read, Some(n)) => self.tally.read_okay += n,
                (Direction::Read, None) => self.tally.read_okay_unknown += d.bound,
                (Direction::Write, Some(n)) => self.tally.write_okay += n,
                (Direction::Write, None) => {}
            }
        }
        self.answered.insert(rsp.id, rsp.status);
    }

    fn check_counters(&self) {
        let s = self.exec.stats();
        let t = &self.tally;
        assert_eq!((s.completed, s.failed), (t.responses, t.failed), "counters against the answers");
        assert!(s.bytes_read <= t.read_bound, "{} bytes read, {} asked", s.bytes_read, t.read_bound);
        assert!(s.bytes_written <= t.write_bound, "{} bytes written, {} asked", s.bytes_written, t.write_bound);
        assert!(
            (t.read_okay..=t.read_okay + t.read_okay_unknown).contains(&s.bytes_read),
            "{} bytes read, reads answered Okay had {} (and at most {} unknown)",
            s.bytes_read,
            t.read_okay,
            t.read_okay_unknown
        );
        assert!(
            s.bytes_written >= t.write_okay,
            "{} bytes written, writes answered Okay had {}",
            s.bytes_written,
            t.write_okay
        );
        // A request is answered once all its parts are done, so one whose
        // part was caught may still be pending (at most one caught each).
        assert!(
            s.bad_grants_caught <= s.failed + self.pending.len() as u64,
            "{} reads caught on bad grants, {} failed, {} pending",
            s.bad_grants_caught,
            s.failed,
            self.pending.len()
        );
        assert!(self.budget.held() <= self.budget_limit, "queue holds {} of {}", self.budget.held(), self.budget_limit);
        assert!(self.budget.peak() <= self.budget_limit);
        assert!(
            self.daemon.held() <= self.daemon.limit(),
            "daemon holds {} of {}",
            self.daemon.held(),
            self.daemon.limit()
        );
        if let Some(ps) = self.exec.persistent_stats() {
            assert!(ps.kept <= self.capacity, "{} grants kept, capacity {}", ps.kept, self.capacity);
            assert_eq!(ps.refused, self.guest.maps_refused(), "map refusals counted");
            assert_eq!(ps.kept + ps.transient, self.guest.refs_mapped(), "grants mapped counted");
        }
    }

    fn poll(&mut self) {
        self.exec.poll(&mut self.out);
        self.after_call();
        self.take();
    }

    /// Polls until nothing is pending and the ring is empty.
    fn drain(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            self.poll();
            if self.exec.pending() == 0 && self.ring.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "requests never answered: {} pending, {} in the ring, can_take {}, backlog {}, retry {:?}: {:?}",
                self.exec.pending(),
                self.ring.len(),
                self.exec.can_take(),
                self.exec.has_backlog(),
                self.exec.retry(),
                self.pending
            );
            // With requests pending, a retry only while one is parked on
            // the budget (1 ms), never the idle queue's.
            let retry = self.exec.retry();
            assert!(retry.is_none_or(|d| d == BUDGET_RETRY && !self.exec.can_take()), "retry {retry:?} while busy");
            if !self.exec.has_backlog() {
                wait_readable(self.exec.completion_fd());
            }
        }
        assert!(self.pending.is_empty(), "the queue has nothing pending, the harness waits for {:?}", self.pending);
        assert!(!self.exec.has_backlog() && self.exec.can_take());
        // Nothing pending: a retry only for the spare buffers, charged while kept.
        let spares = self.budget.held() > 0;
        assert_eq!(self.exec.retry(), spares.then_some(blkback::queue::SPARE_IDLE), "retry of an idle queue");
    }

    fn step(&mut self, op: &Op) {
        match op {
            Op::Raw { .. } | Op::Rw { .. } | Op::Indirect { .. } | Op::Discard { .. } => {
                self.request(op);
            }
            Op::Burst { count, op } => {
                for _ in 0..=count % 64 {
                    if !self.request(op) {
                        break;
                    }
                }
            }
            Op::Poll => self.poll(),
            Op::Drain => self.drain(),
            Op::Sleep { micros } => {
                let d = Duration::from_micros(u64::from(*micros) * 4).min(MAX_SLEEP.saturating_sub(self.slept));
                self.slept += d;
                std::thread::sleep(d);
                self.poll();
            }
            Op::Poke { gref, offset, bytes } => {
                self.poke(u32::from(*gref) % PAGES, usize::from(*offset) % PAGE_SIZE, bytes);
            }
            Op::Fault { what } => {
                let n = 1 + u32::from(what >> 1) % 4;
                if what & 1 == 0 {
                    self.guest.fail_copies(n);
                } else {
                    self.guest.fail_maps(n);
                }
            }
            Op::Neighbour { units } => {
                self.hog = None;
                let n = usize::from(units % 16);
                if n > 0 {
                    self.hog = self.neighbour.alloc(n * NEIGHBOUR_UNIT, false).ok();
                }
            }
            Op::Check(c) => {
                if self.summary.checks < MAX_CHECKS {
                    self.check(c);
                }
            }
        }
    }

    /// Offers `slots` (a check's: [`MAX_CHECKS`] bounds them), drains, and
    /// wants them all answered `Okay`.
    fn offer_and_drain(&mut self, slots: Vec<Vec<u8>>, what: &str) {
        let ids: Vec<u64> = slots.into_iter().map(|slot| self.offer(slot)).collect();
        self.drain();
        for id in ids {
            assert_eq!(self.answered.get(&id), Some(&Status::Okay), "the check's {what} {id:#x}");
        }
    }

    /// The disk's bytes of `sectors` from `sector`.
    fn read_disk(&self, sector: u64, sectors: u64) -> Vec<u8> {
        let mut buf = AlignedBuf::new(sectors as usize * 512);
        buf.set_len(sectors as usize * 512);
        self.disk.read_at(&mut buf, sector * 512).expect("reading the disk");
        buf.to_vec()
    }

    fn check(&mut self, c: &Check) {
        if self.limits.read_only {
            return;
        }
        self.drain();
        self.guest.fail_copies(0);
        let start = u64::from(c.sector) % self.file_sectors;
        // At most what the reads below can lay out in the data pages (the
        // big disk is larger than them).
        let room = ((self.file_sectors - start) as usize).min(DATA_PAGES.len() * 8);
        let indirect_max = usize::from(self.limits.max_indirect_segments).min(SEGS_PER_INDIRECT_FRAME);

        // The write: its operation, then its segments, on the data pages.
        let (operation, indirect) = match c.write_op % 4 {
            1 if self.limits.barrier => (BLKIF_OP_WRITE_BARRIER, false),
            2 if self.limits.flush => (BLKIF_OP_FLUSH_DISKCACHE, false),
            3 if indirect_max > 0 => (BLKIF_OP_WRITE, true),
            _ => (BLKIF_OP_WRITE, false),
        };
        let max_segs = if indirect { indirect_max } else { BLKIF_MAX_SEGMENTS_PER_REQUEST };
        let shape = if c.write_shape.is_empty() { &[0xf8][..] } else { &c.write_shape[..] };
        let mut segs = Vec::new();
        let mut total = 0usize;
        for (i, &b) in shape.iter().enumerate() {
            if segs.len() == max_segs || total == room {
                break;
            }
            let first = b & 7;
            let len = (1 + usize::from(b >> 3) % usize::from(8 - first)).min(room - total);
            let gref = (u32::from(c.fill) + i as u32) % DATA_PAGES.end;
            segs.push(Segment { gref: GrantRef(gref), first_sect: first, last_sect: first + len as u8 - 1 });
            total += len;
        }
        for g in DATA_PAGES {
            self.guest.write(g, 0, &pattern(c.fill, g));
        }
        let mut expected = Vec::with_capacity(total * 512);
        for s in &segs {
            let mut b = vec![0u8; s.len()];
            self.guest.read(s.gref.0, usize::from(s.page_offset()), &mut b);
            expected.extend(b);
        }
        let raw = raw_segments(&segs);
        let slot = if indirect {
            let page = INDIRECT_PAGES.start;
            self.write_descriptors(&[page], raw.len(), &raw);
            self.indirect_slot(operation, raw.len() as u16, start, &[page])
        } else {
            self.rw_slot(operation, raw.len() as u8, start, &raw)
        };
        self.offer_and_drain(vec![slot], "write");
        assert!(self.read_disk(start, total as u64) == expected, "the check's write put other bytes on the disk");

        // A discard of part of it: zeros there.
        if c.discard != 0 && self.limits.discard {
            let off = usize::from(c.discard & 0x0f) % total;
            let n = 1 + usize::from(c.discard >> 4) % (total - off);
            let slot = self.discard_slot(0, start + off as u64, n as u64);
            self.offer_and_drain(vec![slot], "discard");
            expected[off * 512..(off + n) * 512].fill(0);
            assert!(self.read_disk(start, total as u64) == expected, "the check's discard left other bytes");
        }

        // Reads of it all, into other places of the data pages.
        for g in DATA_PAGES {
            self.guest.write(g, 0, &[POISON; PAGE_SIZE]);
        }
        let slots_in_pages = DATA_PAGES.len() * 8;
        let mut at = 0usize;
        let mut left = total;
        let mut shape = c.read_shape.iter().copied();
        let mut reads = Vec::new();
        while left > 0 {
            let b = shape.next().unwrap_or(0xfc);
            at += usize::from(b & 3).min(slots_in_pages - at - left);
            let len = (1 + usize::from(b >> 2) % 8).min(8 - at % 8).min(left);
            let first = (at % 8) as u8;
            reads.push(Segment {
                gref: GrantRef((at / 8) as u32),
                first_sect: first,
                last_sect: first + len as u8 - 1,
            });
            at += len;
            left -= len;
        }
        let indirect = c.read_op & 1 != 0 && indirect_max > 0;
        let most = if indirect { indirect_max } else { BLKIF_MAX_SEGMENTS_PER_REQUEST };
        let per_request = 1 + usize::from(c.read_op >> 1) % most;
        // Indirect reads go four at a time, each with its own indirect page.
        let together = if indirect { INDIRECT_PAGES.len() } else { usize::MAX };
        let mut sector = start;
        let mut slots = Vec::new();
        for (k, chunk) in reads.chunks(per_request).enumerate() {
            let raw = raw_segments(chunk);
            slots.push(if indirect {
                let page = INDIRECT_PAGES.start + (k % INDIRECT_PAGES.len()) as u32;
                self.write_descriptors(&[page], raw.len(), &raw);
                self.indirect_slot(BLKIF_OP_READ, raw.len() as u16, sector, &[page])
            } else {
                self.rw_slot(BLKIF_OP_READ, raw.len() as u8, sector, &raw)
            });
            sector += chunk.iter().map(Segment::sectors).sum::<u64>();
            if slots.len() == together {
                self.offer_and_drain(std::mem::take(&mut slots), "read");
            }
        }
        if !slots.is_empty() {
            self.offer_and_drain(slots, "read");
        }
        let mut off = 0;
        for s in &reads {
            let mut got = vec![0u8; s.len()];
            self.guest.read(s.gref.0, usize::from(s.page_offset()), &mut got);
            assert!(
                got[..] == expected[off..off + s.len()],
                "the check's read brought other bytes to {s:?} (sectors {}..)",
                start + off as u64 / 512
            );
            off += s.len();
        }
        self.summary.checks += 1;
    }
}

/// Runs a scenario; what it reached.
pub fn run_scenario(sc: &Scenario) -> Summary {
    let mut run = Run::new(&sc.setup);
    for op in &sc.ops {
        run.step(op);
    }
    run.drain();
    assert!(run.ring.is_empty());
    let mut summary = run.summary;
    summary.stats = run.exec.stats();
    summary.persistent = run.exec.persistent_stats();
    summary.copy_faults = run.guest.copy_faults();
    let Run { exec, budget, daemon, neighbour, hog, guest, .. } = run;
    drop(exec);
    assert_eq!(budget.held(), 0, "buffers still charged once the queue is gone");
    drop((hog, neighbour));
    assert_eq!(daemon.held(), 0, "the daemon's budget still charged once the queue is gone");
    assert_eq!(guest.live_pages(), 0, "guest pages still mapped once the queue is gone");
    summary
}
