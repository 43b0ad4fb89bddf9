//! One blkif queue's request execution, independent of rings and xenstore:
//! a request copied out of a slot goes in, responses come out. Data moves by
//! grant copy between guest pages and aligned bounce buffers, so the guest
//! never shares memory with the storage path (no persistent grants needed).
//!
//! Ordering (`blkif.h`): a `WRITE_BARRIER` starts only after every earlier
//! request completed and later requests wait until it completed; a
//! `FLUSH_DISKCACHE` with data writes first, then flushes, before answering.
//!
//! Memory: bounce buffers are charged to the queue's [`QueueBudget`] (and
//! the daemon's). A request whose buffer does not fit is parked, and the
//! queue takes nothing more off the ring ([`QueueExecutor::can_take`]) until
//! buffers come back: the rest waits in the guest's ring. Buffers of
//! finished requests are kept for reuse while the queue is busy and
//! released after [`SPARE_IDLE`] with nothing to do.
//!
//! Time (issue 13): a read or write larger than `PART_BYTES` (64 KiB) is
//! cut into parts of whole segments, each its own engine operation with its
//! own buffer, and at most `POLL_PART_BYTES` of parts go to the engine per
//! poll; the rest wait in order, and the queue takes nothing more off the
//! ring meanwhile. The request is answered once, when its last part
//! completed.

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Duration;

use xen_backend::Tick;

use blkif::{parse, parse_indirect_segments, Direction, DiskLimits, Request, RequestKind, Response, Segment, Status};
use gnttab::{CopySegment, DomId, GrantMapper, GrantRef, GrantStatus, GuestPage, PAGE_SIZE};
use xen_bus::Protocol;

use crate::buffer::{AlignedBuf, BufferBudget, QueueBudget};
use crate::engine::{Completion, IoEngine, IoOp};
use crate::idmap::{id_map, IdMap};
use crate::mapped::{MappedIo, PersistentGrants, PersistentStats};

/// Bytes of bounce buffers one queue may hold by default (in flight and
/// spare): 1024 pages, Linux blkback's `max_buffer_pages` per ring; a
/// 32-slot ring full of 128 KiB requests (Linux blkfront's default of 32
/// indirect segments), or four of the largest (1 MiB).
pub const DEFAULT_QUEUE_BUFFER_BYTES: usize = 4 << 20;
/// How long a queue with nothing to do keeps its spare buffers.
pub const SPARE_IDLE: Duration = Duration::from_secs(1);
/// Reads whose destination grants are checked before any I/O after a read
/// of the queue failed on a bad grant. Linux maps the guest's pages first,
/// so a bad grant costs it no I/O; we copy, so we check only where a guest
/// showed it sends them: an honest guest pays nothing.
const SUSPECT_READS: u32 = 1024;
/// How often a queue parked on the daemon's budget, with nothing of its own
/// in flight to wake it, tries again.
const BUDGET_RETRY: Duration = Duration::from_millis(1);
/// Read data copied to the guest per poll: the rest, down to a part of one
/// request, waits for the next poll (the ring reports more work), so a pass
/// that reaps large reads does not hold the worker, and the guests behind
/// it, for all their copies. At least one segment is copied per poll. Not
/// less when the worker cut the pass's request budget to fit its time
/// quantum: a page per request of budget was tried, and in the Xen lab it
/// cost an attacker half its 1 MiB throughput for no better neighbour p99
/// (every poll's system calls and hypercall for a page; docs/blkback.md).
const POLL_READ_BYTES: usize = 64 << 10;
/// Reads and writes larger than this are cut into parts of whole segments
/// of at most this much (a segment is at most a page), each its own engine
/// operation. Why: the worker serves many guests' rings, and its pass for
/// one is bounded by a request budget scaled to a time quantum, but never
/// below one request; a 1 MiB buffered read or write is copied from or to
/// the page cache inside the submitting system call (io_uring on tmpfs,
/// ~250 us), so one request would hold every other guest for that long.
/// Requests at most this large (every direct one: 11 segments, 44 KiB) go
/// whole, as before.
const PART_BYTES: usize = 64 << 10;
/// Bytes of parts handed to the engine per poll (at least one part): the
/// rest wait in the executor for the next poll (the ring reports more
/// work), so a pass submits at most this much of a large request.
const POLL_PART_BYTES: usize = PART_BYTES;

/// Counters of a queue, for the demo and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Requests answered.
    pub completed: u64,
    /// Requests answered with an error or "not supported".
    pub failed: u64,
    /// Bytes read for the guest.
    pub bytes_read: u64,
    /// Bytes written for the guest.
    pub bytes_written: u64,
    /// Times a request waited (and the ring with it) for buffers to come back.
    pub budget_waits: u64,
    /// Reads failed on a bad grant before any I/O.
    pub bad_grants_caught: u64,
}

enum Stage {
    /// Data transfer in flight; `then_flush` adds a flush before the answer;
    /// `mapped`: straight to or from the guest's pages (persistent grants),
    /// else through a bounce buffer.
    Data { direction: Direction, segments: Vec<Segment>, then_flush: bool, mapped: bool },
    /// The final flush (or a pure flush) in flight.
    Flush,
    /// A discard in flight.
    Discard,
}

struct InFlight {
    id: u64,
    operation: u8,
    stage: Stage,
    barrier: bool,
    /// The split request this is a part of ([`QueueExecutor::splits`]).
    part: Option<u64>,
}

/// A read or write to start, whole or a part of a split one.
struct DataStart {
    id: u64,
    operation: u8,
    direction: Direction,
    sector: u64,
    segments: Vec<Segment>,
    then_flush: bool,
    barrier: bool,
    /// The split request this is a part of ([`QueueExecutor::splits`]).
    part: Option<u64>,
    /// A part's share of its request's mapped pages, where the request's
    /// grants were mapped (once, for all its parts).
    pages: Option<MappedIo>,
}

impl DataStart {
    fn len(&self) -> usize {
        self.segments.iter().map(Segment::len).sum()
    }
}

/// A request cut into parts ([`PART_BYTES`]): answered once, when its last
/// part completed, Okay only if every part succeeded; a flush after its
/// data (`then_flush`) starts then.
struct Split {
    id: u64,
    operation: u8,
    direction: Direction,
    then_flush: bool,
    barrier: bool,
    /// Parts not completed yet: waiting, being copied or in flight.
    left: usize,
    /// Every part completed so far succeeded.
    ok: bool,
    /// Bytes of the parts that succeeded.
    bytes: u64,
    /// Its grants passed the check after a bad grant whole, or none was
    /// due ([`SUSPECT_READS`]): its parts are not checked again.
    checked: bool,
}

/// A plain write whose data is not copied from the guest yet.
struct UnstartedWrite {
    id: u64,
    operation: u8,
    segments: Vec<Segment>,
    offset: u64,
    buf: AlignedBuf,
    part: Option<u64>,
}

/// Executes the requests of one queue.
pub struct QueueExecutor {
    abi: Protocol,
    limits: DiskLimits,
    frontend: DomId,
    grants: Arc<dyn GrantMapper>,
    engine: Box<dyn IoEngine>,
    in_flight: IdMap<InFlight>,
    next_tag: u64,
    /// Requests held behind a barrier, in ring order.
    held: VecDeque<Request>,
    barrier_in_flight: bool,
    /// Plain writes whose data is still in the guest: their grant copies
    /// are done together, in one call, at the next poll.
    unstarted_writes: Vec<UnstartedWrite>,
    completions: Vec<Completion>,
    /// Completions reaped and not answered yet, beyond [`POLL_READ_BYTES`].
    backlog: Vec<Completion>,
    /// The first backlog entry's read was cut at the bound: its segments
    /// copied so far, and whether all those copies succeeded.
    partial: Option<(usize, bool)>,
    /// Bounce buffers of finished requests, reused (allocating and freeing
    /// a large buffer per request costs page faults and `munmap`s).
    spare: Vec<AlignedBuf>,
    /// What every buffer is charged to.
    budget: Arc<QueueBudget>,
    /// Reads and writes taken and not started, in order: parts of a split
    /// request beyond [`POLL_PART_BYTES`], or a request or part whose
    /// buffer did not fit the budget (`parked`: the front one waits for
    /// buffers to come back). Nothing more is taken off the ring meanwhile.
    waiting: VecDeque<DataStart>,
    parked: bool,
    /// Requests cut into parts and not answered yet, by a key of their own.
    splits: IdMap<Split>,
    /// Parts not completed, of all the splits together.
    parts: usize,
    /// Bytes of parts handed to the engine since the last submit.
    part_bytes_submitted: usize,
    /// Requests larger than this are split ([`PART_BYTES`]), and this much
    /// of parts goes to the engine per poll ([`POLL_PART_BYTES`]).
    part_bytes: usize,
    poll_part_bytes: usize,
    /// Since when nothing is pending (spare buffers go after [`SPARE_IDLE`]).
    idle_since: Option<Tick>,
    /// The indirect pages of a request, kept for the next.
    indirect: Vec<u8>,
    /// Reads left to check before I/O ([`SUSPECT_READS`]).
    suspect: u32,
    /// The guest's pages kept mapped, where persistent grants were
    /// negotiated; with the byte alignment a segment needs to go to the
    /// disk from its page (the disk's logical sector size).
    persistent: Option<(PersistentGrants, usize)>,
    stats: QueueStats,
}

impl QueueExecutor {
    /// An executor for a frontend in domain `frontend`, using `abi`'s layout.
    pub fn new(
        abi: Protocol,
        limits: DiskLimits,
        frontend: DomId,
        grants: Arc<dyn GrantMapper>,
        engine: Box<dyn IoEngine>,
    ) -> Self {
        QueueExecutor {
            abi,
            limits,
            frontend,
            grants,
            engine,
            in_flight: id_map(0),
            next_tag: 0,
            held: VecDeque::new(),
            barrier_in_flight: false,
            unstarted_writes: Vec::new(),
            completions: Vec::new(),
            backlog: Vec::new(),
            partial: None,
            spare: Vec::new(),
            budget: QueueBudget::new(DEFAULT_QUEUE_BUFFER_BYTES, BufferBudget::new(usize::MAX)),
            waiting: VecDeque::new(),
            parked: false,
            splits: id_map(0),
            parts: 0,
            part_bytes_submitted: 0,
            part_bytes: PART_BYTES,
            poll_part_bytes: POLL_PART_BYTES,
            idle_since: None,
            indirect: Vec::new(),
            suspect: 0,
            persistent: None,
            stats: QueueStats::default(),
        }
    }

    /// Reads and writes go straight between the disk and the guest's pages,
    /// up to `capacity` of them kept mapped ([`crate::mapped`]), where the
    /// engine can and a request's segments are multiples of `alignment`
    /// bytes (the disk's logical sector size); other requests, and those
    /// whose grants cannot be mapped, are copied. For a frontend that
    /// negotiated `feature-persistent`.
    pub fn with_persistent_grants(mut self, capacity: usize, alignment: usize) -> Self {
        if self.engine.takes_mapped_pages() {
            self.persistent =
                Some((PersistentGrants::new(self.grants.clone(), self.frontend, capacity), alignment.max(1)));
        } else {
            log::info!("dom{}: this disk's I/O engine takes no guest pages: data is copied", self.frontend);
        }
        self
    }

    /// The persistent grants' counters, where they are used.
    pub fn persistent_stats(&self) -> Option<PersistentStats> {
        self.persistent.as_ref().map(|(p, _)| p.stats())
    }

    /// Charges the queue's buffers to `budget` (by default its own
    /// [`DEFAULT_QUEUE_BUFFER_BYTES`] and no daemon limit).
    pub fn with_budget(mut self, budget: Arc<QueueBudget>) -> Self {
        self.budget = budget;
        self
    }

    /// Parts of `part` bytes and `per_poll` bytes of them per poll, for
    /// tests that split small requests.
    #[cfg(test)]
    fn with_parts(mut self, part: usize, per_poll: usize) -> Self {
        (self.part_bytes, self.poll_part_bytes) = (part, per_poll);
        self
    }

    /// Whether a request may be taken off the ring now: not while one
    /// waits for its buffer, nor while parts of a split one wait.
    pub fn can_take(&self) -> bool {
        self.waiting.is_empty()
    }

    /// When to call [`Self::poll`] again without an event: soon if a
    /// request waits for the daemon's budget with nothing in flight to wake
    /// the queue; after [`SPARE_IDLE`] if spare buffers wait to be released.
    pub fn retry(&self) -> Option<Duration> {
        if self.parked && !self.busy() {
            Some(BUDGET_RETRY)
        } else if self.pending() == 0 && !self.spare.is_empty() {
            Some(SPARE_IDLE)
        } else {
            None
        }
    }

    /// Completions wait to be answered, or parts of a split request to be
    /// started, by the next poll (which nothing else will trigger: call
    /// again). Not for a part waiting for buffers: a completion or
    /// [`Self::retry`] brings those back.
    pub fn has_backlog(&self) -> bool {
        !self.backlog.is_empty() || (!self.waiting.is_empty() && !self.parked)
    }

    /// Something of this queue is in flight (its completion will poll us).
    fn busy(&self) -> bool {
        !self.in_flight.is_empty() || !self.unstarted_writes.is_empty()
    }

    /// The ring layout.
    pub fn abi(&self) -> Protocol {
        self.abi
    }

    /// Readable while storage completions wait: add it to the worker's epoll.
    pub fn completion_fd(&self) -> BorrowedFd<'_> {
        self.engine.completion_fd()
    }

    /// Requests taken and not yet answered.
    pub fn pending(&self) -> usize {
        // Each split request's parts are among the first three, counted
        // once as the split.
        self.in_flight.len() + self.unstarted_writes.len() + self.waiting.len() - self.parts
            + self.splits.len()
            + self.held.len()
    }

    /// No request is started and unanswered (what a barrier waits for).
    fn idle(&self) -> bool {
        self.in_flight.is_empty() && self.unstarted_writes.is_empty() && self.waiting.is_empty()
    }

    /// Counters so far.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// Takes a request copied out of a ring slot. Requests that fail at once
    /// (malformed, out of range, a grant the guest did not give) are answered
    /// through `out`; others are answered by later calls to [`Self::poll`]
    /// (which also starts plain writes: call it after a batch of submits).
    pub fn submit(&mut self, slot: &[u8], out: &mut Vec<Response>) {
        match parse(self.abi, slot, &self.limits) {
            Ok(req) => {
                let behind = self.barrier_in_flight || !self.held.is_empty() || !self.waiting.is_empty();
                if behind || (is_barrier(&req) && !self.idle()) {
                    self.held.push_back(req);
                } else {
                    self.start(req, out);
                }
            }
            Err(e) => {
                log::debug!("dom{}: {e}", self.frontend);
                self.answer(e.response(), out);
            }
        }
    }

    /// Starts the plain writes taken since the last poll (their data copied
    /// from the guest in one grant copy), collects finished storage
    /// operations and answers them, and starts requests a finished barrier
    /// was holding back.
    pub fn poll(&mut self, out: &mut Vec<Response>) {
        self.start_writes(out);
        let collected = self.collect(out);
        // The pass's operations go to the kernel together (io_uring: one
        // system call); a failure leaves them queued for the next poll.
        if let Err(e) = self.engine.submit_pending() {
            log::error!("dom{}: {e}", self.frontend);
        }
        // A poll that found nothing finished answers what its own submission
        // finished at once (queue depth 1 on a RAM disk or cached pages):
        // one wakeup of the worker per request, not two. A poll that did
        // collect leaves the rest to the next, within its bounds.
        if collected == 0 && self.engine.completions_ready() {
            self.collect(out);
            if let Err(e) = self.engine.submit_pending() {
                log::error!("dom{}: {e}", self.frontend);
            }
        }
        self.part_bytes_submitted = 0;
        self.release_idle_spares();
    }

    /// Answers finished storage operations (their reads copied to the
    /// guest in one batch) and starts what they let go: requests waiting
    /// for buffers, requests a barrier held, writes. Returns how many
    /// completions the engine gave.
    fn collect(&mut self, out: &mut Vec<Response>) -> usize {
        let mut done = std::mem::take(&mut self.completions);
        done.append(&mut self.backlog);
        let carried = done.len();
        self.engine.completions(&mut done);
        let collected = done.len() - carried;
        let copied = self.copy_reads_to_guest(&done);
        self.backlog.extend(done.drain(copied.len()..));
        for (c, read_copied) in done.drain(..).zip(copied) {
            self.complete(c, read_copied, out);
        }
        self.completions = done;
        // Buffers may have come back: the parked one tries again.
        self.parked = false;
        self.start_waiting(out);
        self.release_held(out);
        // Writes a finished barrier let go, and parts of writes: started
        // now, as nothing else would wake the worker for them.
        self.start_writes(out);
        collected
    }

    /// Frees the spare buffers of a queue that had nothing to do for
    /// [`SPARE_IDLE`].
    fn release_idle_spares(&mut self) {
        if self.pending() > 0 || self.spare.is_empty() {
            self.idle_since = None;
            return;
        }
        // The coarse clock: read at every idle poll, which is no system call.
        let now = Tick::now();
        let since = *self.idle_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= SPARE_IDLE {
            self.spare.clear();
            self.idle_since = None;
        }
    }

    /// The data to copy to the guest for a completion: a successful read's
    /// segments and buffer.
    fn read_to_copy<'a>(&'a self, c: &'a Completion) -> Option<(&'a [Segment], &'a AlignedBuf)> {
        match (self.in_flight.get(&c.tag), &c.buf) {
            (
                Some(InFlight {
                    stage: Stage::Data { direction: Direction::Read, segments, mapped: false, .. }, ..
                }),
                Some(buf),
            ) if c.result.is_ok() => Some((segments, buf)),
            _ => None,
        }
    }

    /// Copies the data of the reads in `done` that succeeded to the guest
    /// in ONE grant copy (one ioctl for the batch, not one per request),
    /// segment by segment from the first completion on while they fit
    /// [`POLL_READ_BYTES`] (at least one segment). Per completion finished,
    /// in order: whether its data reached the guest (true for anything that
    /// is not a successful read). The completions after them, the first of
    /// which may be a read copied in part ([`Self::partial`]), are left for
    /// the next poll.
    fn copy_reads_to_guest(&mut self, done: &[Completion]) -> Vec<bool> {
        let mut copies = Vec::new();
        // Per completion: its copies' range in `copies`, if it is a read to copy.
        let mut spans = Vec::with_capacity(done.len());
        // Where the first completion's copy resumes.
        let (resume, resumed_ok) = self.partial.take().unwrap_or((0, true));
        let mut cut = None;
        let mut bytes = 0;
        for (i, c) in done.iter().enumerate() {
            let Some((segments, buf)) = self.read_to_copy(c) else {
                spans.push(None);
                continue;
            };
            let skip = if i == 0 { resume } else { 0 };
            let first = copies.len();
            let mut rest: &[u8] = buf;
            let mut taken = skip;
            for (k, seg) in segments.iter().enumerate() {
                let (src, tail) = rest.split_at(seg.len().min(rest.len()));
                rest = tail;
                if k < skip {
                    continue;
                }
                if bytes + src.len() > POLL_READ_BYTES && !copies.is_empty() {
                    break;
                }
                bytes += src.len();
                taken += 1;
                copies.push(CopySegment::ToGuest { src, dst: self.guest_page(seg) });
            }
            spans.push(Some(first..copies.len()));
            if taken < segments.len() {
                cut = Some(taken);
                break;
            }
        }
        let mut ok = self.copy_batch(&mut copies, spans);
        if resume > 0 {
            if let Some(first) = ok.first_mut() {
                *first &= resumed_ok;
            }
        }
        if let Some(taken) = cut {
            // The last completion taken waits, at the backlog's front.
            let last_ok = ok.pop().expect("the cut read has a span");
            self.partial = Some((taken, last_ok));
        }
        ok
    }

    /// Runs `copies` in one grant copy. Per span (one request's copies, or
    /// `None` for a request with nothing to copy): whether all its copies
    /// succeeded (`None`: true). A failed call fails every span.
    fn copy_batch(&self, copies: &mut [CopySegment<'_>], spans: Vec<Option<std::ops::Range<usize>>>) -> Vec<bool> {
        if copies.is_empty() {
            return vec![true; spans.len()];
        }
        let mut status = vec![GrantStatus::Okay; copies.len()];
        if let Err(e) = self.grants.copy(copies, &mut status) {
            log::warn!("dom{}: grant copy failed: {e}", self.frontend);
            return spans.iter().map(Option::is_none).collect();
        }
        spans
            .into_iter()
            .map(|span| {
                let Some(r) = span else { return true };
                let bad = status[r].iter().find(|s| !s.is_ok());
                if let Some(bad) = bad {
                    log::debug!("dom{}: grant copy segment failed: {bad:?}", self.frontend);
                }
                bad.is_none()
            })
            .collect()
    }

    fn answer(&mut self, rsp: Response, out: &mut Vec<Response>) {
        self.stats.completed += 1;
        if rsp.status != Status::Okay {
            self.stats.failed += 1;
        }
        out.push(rsp);
    }

    fn release_held(&mut self, out: &mut Vec<Response>) {
        while !self.barrier_in_flight && self.waiting.is_empty() {
            let Some(front) = self.held.front() else { return };
            if is_barrier(front) && !self.idle() {
                return;
            }
            let req = self.held.pop_front().expect("front exists");
            self.start(req, out);
        }
    }

    fn tag(&mut self) -> u64 {
        self.next_tag = self.next_tag.wrapping_add(1);
        self.next_tag
    }

    fn start(&mut self, req: Request, out: &mut Vec<Response>) {
        let Request { id, operation, kind } = req;
        let fail = |status| Response { id, operation, status };
        match kind {
            RequestKind::Discard { sector, nr_sectors, secure } => {
                // Secure only where offered, as Linux's blkback.
                let secure = secure && crate::config::SECURE_DISCARD_OFFERED;
                let op = IoOp::Discard { offset: sector * 512, len: nr_sectors * 512, secure };
                self.launch(InFlight { id, operation, stage: Stage::Discard, barrier: false, part: None }, op, out);
            }
            RequestKind::Data { direction, sector, segments, barrier, flush } => {
                if segments.is_empty() {
                    let f = InFlight { id, operation, stage: Stage::Flush, barrier, part: None };
                    self.launch(f, IoOp::Flush, out);
                    return;
                }
                let d = DataStart {
                    id,
                    operation,
                    direction,
                    sector,
                    segments,
                    then_flush: flush,
                    barrier,
                    part: None,
                    pages: None,
                };
                self.start_data(d, out);
            }
            RequestKind::Indirect { direction, sector, nr_segments, pages } => {
                // At most 8 pages, kept from request to request.
                let mut raw = std::mem::take(&mut self.indirect);
                raw.clear();
                raw.resize(pages.len() * PAGE_SIZE, 0);
                let copied = self.copy_pages_in(&pages, &mut raw);
                let parsed = copied.then(|| parse_indirect_segments(&raw, nr_segments, sector, &self.limits));
                self.indirect = raw;
                match parsed {
                    None => self.answer(fail(Status::Error), out),
                    Some(Ok(segments)) => {
                        let (then_flush, barrier, part) = (false, false, None);
                        let pages = None;
                        let d =
                            DataStart { id, operation, direction, sector, segments, then_flush, barrier, part, pages };
                        self.start_data(d, out);
                    }
                    Some(Err(fault)) => {
                        log::debug!("dom{}: indirect request {id:#x}: {fault}", self.frontend);
                        self.answer(fail(fault.status()), out);
                    }
                }
            }
        }
    }

    /// A buffer of `len` bytes: the smallest spare that fits, else a new one
    /// within the budget (spares freed to make room), else `None`.
    fn buffer(&mut self, len: usize) -> Option<AlignedBuf> {
        let fit = (self.spare.iter().enumerate())
            .filter(|(_, b)| b.capacity() >= len)
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        if let Some(i) = fit {
            return Some(self.spare.swap_remove(i));
        }
        loop {
            match self.budget.alloc(len, self.busy()) {
                Ok(buf) => return Some(buf),
                Err(_) if !self.spare.is_empty() => {
                    // Make room: the largest spare goes.
                    let i = (0..self.spare.len()).max_by_key(|&i| self.spare[i].capacity()).expect("not empty");
                    self.spare.swap_remove(i);
                }
                Err(_) => return None,
            }
        }
    }

    /// Whether every destination of a read is a page the guest granted us
    /// for writing: one byte of each written (the read overwrites it).
    fn probe_read_grants(&self, segments: &[Segment]) -> bool {
        static ZERO: [u8; 1] = [0];
        let mut copies: Vec<CopySegment<'_>> =
            segments.iter().map(|seg| CopySegment::ToGuest { src: &ZERO, dst: self.guest_page(seg) }).collect();
        self.run_copy(&mut copies)
    }

    /// Whether `segments` go straight to the guest's mapped pages: where
    /// persistent grants are used and every segment is aligned for the disk.
    fn maps(&self, segments: &[Segment]) -> bool {
        let Some((_, alignment)) = &self.persistent else { return false };
        let aligned = |seg: &Segment| usize::from(seg.page_offset()) % alignment == 0 && seg.len() % alignment == 0;
        segments.iter().all(aligned)
    }

    /// Starts a read or write on the guest's mapped pages, where persistent
    /// grants are used, the segments aligned and every grant mapped (for a
    /// part: where its request's were); else gives the request back, to be
    /// copied.
    fn start_mapped(&mut self, mut d: DataStart, out: &mut Vec<Response>) -> Option<DataStart> {
        let pages = match d.pages.take() {
            Some(pages) => pages,
            None if d.part.is_some() || !self.maps(&d.segments) => return Some(d),
            None => {
                let (persistent, _) = self.persistent.as_mut().expect("maps() saw persistent grants");
                let Some(pages) = persistent.io(&d.segments) else { return Some(d) };
                pages
            }
        };
        let DataStart { id, operation, direction, sector, segments, then_flush, barrier, part, .. } = d;
        let offset = sector * 512;
        let op = match direction {
            Direction::Read => IoOp::ReadPages { offset, pages },
            Direction::Write => IoOp::WritePages { offset, pages },
        };
        let stage = Stage::Data { direction, segments, then_flush, mapped: true };
        self.launch(InFlight { id, operation, stage, barrier, part }, op, out);
        None
    }

    /// Whether a read's destination grants pass the check that follows a
    /// bad grant ([`SUSPECT_READS`]): always, where none is due. A read (or
    /// part) that fails it fails here, with no I/O and no buffer.
    fn check_suspect_read(&mut self, d: &DataStart, out: &mut Vec<Response>) -> bool {
        if d.direction != Direction::Read || self.suspect == 0 {
            return true;
        }
        if self.probe_read_grants(&d.segments) {
            self.suspect -= 1;
            return true;
        }
        self.suspect = SUSPECT_READS;
        self.stats.bad_grants_caught += 1;
        self.fail(d.id, d.operation, d.part, out);
        false
    }

    /// Starts a read or write, or its first parts if it is larger than
    /// [`PART_BYTES`]; parks it (or the part) if its buffer does not fit.
    fn start_data(&mut self, d: DataStart, out: &mut Vec<Response>) {
        if d.part.is_none() && d.len() > self.part_bytes {
            self.split(d, out);
            return;
        }
        let Some(d) = self.start_mapped(d, out) else { return };
        // A part of a request checked whole is not checked again; one of a
        // request meant for mapped pages is, once it has to be copied.
        let checked = d.part.is_some_and(|key| self.splits.get(&key).is_some_and(|s| s.checked));
        if !checked && !self.check_suspect_read(&d, out) {
            return;
        }
        let len = d.len();
        let Some(mut buf) = self.buffer(len) else {
            self.stats.budget_waits += 1;
            log::trace!("dom{}: request {:#x} waits for buffers", self.frontend, d.id);
            // At the front: it came from there, or nothing waited.
            self.waiting.push_front(d);
            self.parked = true;
            return;
        };
        let DataStart { id, operation, direction, sector, segments, then_flush, barrier, part, .. } = d;
        // A reused buffer holds this queue's earlier data (the same guest's);
        // every byte of its length is overwritten before the guest sees it:
        // by the guest's data (writes) or by the disk (reads, which fail
        // whole if they come back short).
        buf.set_len(len);
        // Plain writes (and parts of writes: their order is the split's) get
        // their data at the next poll, all in one grant copy; ordered ones
        // (barrier, flush after) get it now.
        let plain_write = direction == Direction::Write && !barrier && !then_flush;
        if direction == Direction::Write && !plain_write && !self.copy_from_guest(&segments, &mut buf) {
            self.recycle(buf);
            self.fail(id, operation, part, out);
            return;
        }
        let offset = sector * 512;
        if plain_write {
            self.unstarted_writes.push(UnstartedWrite { id, operation, segments, offset, buf, part });
            return;
        }
        let op = match direction {
            Direction::Read => IoOp::Read { offset, buf },
            Direction::Write => IoOp::Write { offset, buf },
        };
        let stage = Stage::Data { direction, segments, then_flush, mapped: false };
        self.launch(InFlight { id, operation, stage, barrier, part }, op, out);
    }

    /// Cuts a request larger than [`PART_BYTES`] into parts of whole
    /// segments, queues them behind what waits, and starts what the poll's
    /// bound allows. A barrier holds later requests from here on. Where it
    /// goes to mapped pages, its grants are mapped here, in one call for
    /// all its parts: mapping them part by part cost a map and an unmap per
    /// part where the grants are not kept (`bench hostile`, big-mapped: the
    /// worker's passes over 1 ms were 160-310 per 3 s row that way, 65-105
    /// mapped once, 35-45 unsplit).
    fn split(&mut self, d: DataStart, out: &mut Vec<Response>) {
        // Checked whole, before any part's I/O, unless it goes to mapped
        // pages: a bad grant is not mapped, and a part that then has to be
        // copied is checked alone (as a whole request is).
        let checked = !self.maps(&d.segments);
        if checked && !self.check_suspect_read(&d, out) {
            return;
        }
        let DataStart { id, operation, direction, sector, segments, then_flush, barrier, .. } = d;
        // Segments per part: whole ones up to the part's size (at least one).
        let mut counts = Vec::new();
        let mut rest = &segments[..];
        while let Some(first) = rest.first() {
            let (mut n, mut bytes) = (1, first.len());
            while n < rest.len() && bytes + rest[n].len() <= self.part_bytes {
                bytes += rest[n].len();
                n += 1;
            }
            counts.push(n);
            rest = &rest[n..];
        }
        let mapped = match &mut self.persistent {
            Some((persistent, _)) if !checked => persistent.io(&segments).map(|io| io.split(&counts)),
            _ => None,
        };
        let mut mapped = mapped.into_iter().flatten();
        let key = self.tag();
        let (mut at, mut rest) = (sector, &segments[..]);
        for &n in &counts {
            let (mine, tail) = rest.split_at(n);
            rest = tail;
            let sector = at;
            at += mine.iter().map(|s| s.len() as u64 / 512).sum::<u64>();
            let (segments, pages) = (mine.to_vec(), mapped.next());
            let (then_flush, barrier, part) = (false, false, Some(key));
            let d = DataStart { id, operation, direction, sector, segments, then_flush, barrier, part, pages };
            self.waiting.push_back(d);
        }
        let left = counts.len();
        self.parts += left;
        let s = Split { id, operation, direction, then_flush, barrier, left, ok: true, bytes: 0, checked };
        self.splits.insert(key, s);
        self.barrier_in_flight |= barrier;
        self.start_waiting(out);
    }

    /// Starts what waits, in order, until one parks or the parts handed to
    /// the engine since the last submit reach [`POLL_PART_BYTES`] (at least
    /// one part per poll): the worker's pass then costs the copies of a
    /// part or so, not of a whole large request.
    fn start_waiting(&mut self, out: &mut Vec<Response>) {
        while !self.parked {
            let Some(next) = self.waiting.front() else { return };
            let (len, part) = (next.len(), next.part.is_some());
            if part && self.part_bytes_submitted > 0 && self.part_bytes_submitted + len > self.poll_part_bytes {
                return;
            }
            let d = self.waiting.pop_front().expect("front exists");
            self.start_data(d, out);
            if part && !self.parked {
                self.part_bytes_submitted += len;
            }
        }
    }

    /// Copies the data of every plain write taken since the last poll from
    /// the guest in ONE grant copy, then starts them (each failing alone on
    /// a bad grant).
    fn start_writes(&mut self, out: &mut Vec<Response>) {
        if self.unstarted_writes.is_empty() {
            return;
        }
        let mut writes = std::mem::take(&mut self.unstarted_writes);
        let copied = {
            let mut copies = Vec::new();
            let mut spans = Vec::with_capacity(writes.len());
            for w in writes.iter_mut() {
                let first = copies.len();
                let mut rest: &mut [u8] = &mut w.buf;
                for seg in &w.segments {
                    let (dst, tail) = std::mem::take(&mut rest).split_at_mut(seg.len());
                    rest = tail;
                    copies.push(CopySegment::FromGuest { src: self.guest_page(seg), dst });
                }
                spans.push(Some(first..copies.len()));
            }
            self.copy_batch(&mut copies, spans)
        };
        for (w, ok) in writes.drain(..).zip(copied) {
            let UnstartedWrite { id, operation, segments, offset, buf, part } = w;
            if ok {
                let stage = Stage::Data { direction: Direction::Write, segments, then_flush: false, mapped: false };
                let f = InFlight { id, operation, stage, barrier: false, part };
                self.launch(f, IoOp::Write { offset, buf }, out);
            } else {
                self.recycle(buf);
                self.fail(id, operation, part, out);
            }
        }
        // Keep the allocation for the next pass.
        self.unstarted_writes = writes;
    }

    fn launch(&mut self, f: InFlight, op: IoOp, out: &mut Vec<Response>) {
        let tag = self.tag();
        match self.engine.submit(tag, op) {
            Ok(()) => {
                self.barrier_in_flight |= f.barrier;
                self.in_flight.insert(tag, f);
            }
            Err(e) => {
                log::error!("dom{}: {e}", self.frontend);
                // A barrier is the only one in flight: the one that failed.
                if f.barrier {
                    self.barrier_in_flight = false;
                }
                self.fail(f.id, f.operation, f.part, out);
            }
        }
    }

    /// A request, or a part of one, failed before its I/O.
    fn fail(&mut self, id: u64, operation: u8, part: Option<u64>, out: &mut Vec<Response>) {
        match part {
            Some(key) => self.part_done(key, false, 0, out),
            None => self.answer(Response { id, operation, status: Status::Error }, out),
        }
    }

    /// `read_copied`: for a read, whether its data reached the guest
    /// ([`Self::copy_reads_to_guest`]).
    fn complete(&mut self, mut c: Completion, read_copied: bool, out: &mut Vec<Response>) {
        let Some(f) = self.in_flight.remove(&c.tag) else {
            log::error!("dom{}: completion for unknown tag {}", self.frontend, c.tag);
            return;
        };
        let mut status = if c.result.is_ok() { Status::Okay } else { Status::Error };
        if let Err(e) = &c.result {
            log::warn!("dom{}: request {:#x}: I/O error: {e}", self.frontend, f.id);
        }
        let had_buf = c.buf.is_some();
        if let Some(b) = c.buf.take() {
            self.recycle(b);
        }
        if let Stage::Data { direction, segments, then_flush, mapped } = f.stage {
            let len: u64 = segments.iter().map(|s| s.len() as u64).sum();
            if status == Status::Okay && direction == Direction::Read && !(mapped || (read_copied && had_buf)) {
                status = Status::Error;
                // Check the next reads' grants before their I/O.
                self.suspect = SUSPECT_READS;
            }
            if let Some(key) = f.part {
                self.part_done(key, status == Status::Okay, len, out);
                return;
            }
            if status == Status::Okay {
                self.count_bytes(direction, len);
                if then_flush {
                    let next = InFlight {
                        id: f.id,
                        operation: f.operation,
                        stage: Stage::Flush,
                        barrier: f.barrier,
                        part: None,
                    };
                    self.launch(next, IoOp::Flush, out);
                    return;
                }
            }
        }
        if f.barrier {
            self.barrier_in_flight = false;
        }
        self.answer(Response { id: f.id, operation: f.operation, status }, out);
    }

    fn count_bytes(&mut self, direction: Direction, len: u64) {
        match direction {
            Direction::Read => self.stats.bytes_read += len,
            Direction::Write => self.stats.bytes_written += len,
        }
    }

    /// A part of split request `key` completed (`ok`: it succeeded, moving
    /// `len` bytes). The first part that fails fails the request, and its
    /// parts not started yet are dropped; the last part answers it, or
    /// starts the flush it asked for after its data.
    fn part_done(&mut self, key: u64, ok: bool, len: u64, out: &mut Vec<Response>) {
        let Some(s) = self.splits.get_mut(&key) else {
            log::error!("dom{}: a part of an unknown split request {key}", self.frontend);
            return;
        };
        s.left -= 1;
        self.parts -= 1;
        if ok {
            s.bytes += len;
        } else if s.ok {
            s.ok = false;
            let before = self.waiting.len();
            self.waiting.retain(|d| d.part != Some(key));
            let dropped = before - self.waiting.len();
            s.left -= dropped;
            self.parts -= dropped;
            if dropped > 0 {
                // The parked front may have been one of them.
                self.parked = false;
            }
        }
        if s.left > 0 {
            return;
        }
        let s = self.splits.remove(&key).expect("looked up above");
        if s.ok {
            self.count_bytes(s.direction, s.bytes);
            if s.then_flush {
                let next =
                    InFlight { id: s.id, operation: s.operation, stage: Stage::Flush, barrier: s.barrier, part: None };
                self.launch(next, IoOp::Flush, out);
                return;
            }
        }
        if s.barrier {
            self.barrier_in_flight = false;
        }
        let status = if s.ok { Status::Okay } else { Status::Error };
        self.answer(Response { id: s.id, operation: s.operation, status }, out);
    }
    /// Keeps `buf` for a later request (it stays charged to the budget),
    /// unless another queue waits for the daemon's budget: then it is freed.
    fn recycle(&mut self, buf: AlignedBuf) {
        if self.budget.daemon_has_waiters() {
            self.spare.clear();
            return;
        }
        self.spare.push(buf);
    }

    fn guest_page(&self, seg: &Segment) -> GuestPage {
        GuestPage { domid: self.frontend, gref: seg.gref, offset: seg.page_offset() }
    }

    fn copy_from_guest(&self, segments: &[Segment], buf: &mut [u8]) -> bool {
        let mut copies = Vec::with_capacity(segments.len());
        let mut rest = buf;
        for seg in segments {
            let (dst, tail) = rest.split_at_mut(seg.len());
            rest = tail;
            copies.push(CopySegment::FromGuest { src: self.guest_page(seg), dst });
        }
        self.run_copy(&mut copies)
    }

    fn copy_pages_in(&self, pages: &[GrantRef], raw: &mut [u8]) -> bool {
        let mut copies: Vec<CopySegment<'_>> = raw
            .chunks_mut(PAGE_SIZE)
            .zip(pages)
            .map(|(dst, &gref)| CopySegment::FromGuest {
                src: GuestPage { domid: self.frontend, gref, offset: 0 },
                dst,
            })
            .collect();
        self.run_copy(&mut copies)
    }

    fn run_copy(&self, copies: &mut [CopySegment<'_>]) -> bool {
        let mut status = vec![GrantStatus::Okay; copies.len()];
        if let Err(e) = self.grants.copy(copies, &mut status) {
            log::warn!("dom{}: grant copy failed: {e}", self.frontend);
            return false;
        }
        match status.iter().find(|s| !s.is_ok()) {
            Some(bad) => {
                log::debug!("dom{}: grant copy segment failed: {bad:?}", self.frontend);
                false
            }
            None => true,
        }
    }
}

fn is_barrier(req: &Request) -> bool {
    matches!(req.kind, RequestKind::Data { barrier: true, .. })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::Disk;
    use crate::engine::ThreadPoolEngine;
    use blkif::abi::*;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use zerocopy::IntoBytes;

    /// Guest pages as plain memory, indexed by grant ref; refs >= 1000 are not granted.
    #[derive(Default)]
    struct FakeGrants {
        pages: Mutex<HashMap<u32, Vec<u8>>>,
        /// Calls of `copy` (each one ioctl on real Xen).
        copies: std::sync::atomic::AtomicUsize,
        /// Bytes copied to the guest, all told.
        to_guest: std::sync::atomic::AtomicUsize,
    }

    impl GrantMapper for FakeGrants {
        fn map(&self, _: DomId, _: &[GrantRef], _: bool) -> gnttab::Result<gnttab::GrantMapping> {
            Err(gnttab::Error::InvalidArgument("mapping not used by the queue"))
        }

        fn copy(&self, segments: &mut [CopySegment<'_>], status: &mut [GrantStatus]) -> gnttab::Result<()> {
            self.copies.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut pages = self.pages.lock().unwrap();
            for (seg, st) in segments.iter_mut().zip(status.iter_mut()) {
                let g = seg.guest();
                let Some(page) = pages.get_mut(&g.gref.0) else {
                    *st = GrantStatus::BadGntref;
                    continue;
                };
                let off = g.offset as usize;
                match seg {
                    CopySegment::FromGuest { dst, .. } => dst.copy_from_slice(&page[off..off + dst.len()]),
                    CopySegment::ToGuest { src, .. } => {
                        self.to_guest.fetch_add(src.len(), std::sync::atomic::Ordering::Relaxed);
                        page[off..off + src.len()].copy_from_slice(src)
                    }
                }
                *st = GrantStatus::Okay;
            }
            Ok(())
        }
    }

    const LIMITS: DiskLimits = DiskLimits {
        sectors: 2048,
        read_only: false,
        discard: true,
        barrier: true,
        flush: true,
        max_indirect_segments: 64,
    };

    fn setup() -> (QueueExecutor, Arc<FakeGrants>, std::path::PathBuf) {
        let p = std::env::temp_dir().join(format!(
            "blkback-queue-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::File::create(&p).unwrap().set_len(2048 * 512).unwrap();
        let disk = Arc::new(Disk::open(&p, false, true).unwrap());
        let pages = (0..16u32).map(|g| (g, vec![0u8; PAGE_SIZE])).collect();
        let grants = Arc::new(FakeGrants { pages: Mutex::new(pages), ..Default::default() });
        let engine = Box::new(ThreadPoolEngine::new(disk, 2).unwrap());
        (QueueExecutor::new(Protocol::Native, LIMITS, 5, grants.clone(), engine), grants, p)
    }

    fn request(op: u8, id: u64, sector: u64, segs: &[(u32, u8, u8)]) -> BlkifRequest64 {
        let mut r = BlkifRequest64 { operation: op, nr_segments: segs.len() as u8, ..Default::default() };
        r.id = id.into();
        r.sector_number = sector.into();
        for (i, &(g, f, l)) in segs.iter().enumerate() {
            r.seg[i] = BlkifRequestSegment { gref: g.into(), first_sect: f, last_sect: l, _pad: [0; 2] };
        }
        r
    }

    fn run(q: &mut QueueExecutor, slots: &[&[u8]]) -> Vec<Response> {
        let mut out = Vec::new();
        for s in slots {
            q.submit(s, &mut out);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while q.pending() > 0 {
            std::thread::sleep(std::time::Duration::from_millis(1));
            q.poll(&mut out);
            assert!(std::time::Instant::now() < deadline, "requests never completed");
        }
        out
    }

    #[test]
    fn write_then_read_moves_data_through_grant_copies() {
        let (mut q, grants, p) = setup();
        grants.pages.lock().unwrap().get_mut(&1).unwrap().fill(0x5a);
        let w = request(BLKIF_OP_WRITE, 1, 16, &[(1, 0, 7), (1, 2, 3)]);
        assert_eq!(run(&mut q, &[w.as_bytes()]), vec![Response { id: 1, operation: 1, status: Status::Okay }]);
        let r = request(BLKIF_OP_READ, 2, 16, &[(2, 0, 7), (3, 4, 5)]);
        assert_eq!(run(&mut q, &[r.as_bytes()])[0].status, Status::Okay);
        let pages = grants.pages.lock().unwrap();
        assert!(pages[&2].iter().all(|&b| b == 0x5a));
        assert!(pages[&3][4 * 512..6 * 512].iter().all(|&b| b == 0x5a));
        assert!(pages[&3][..4 * 512].iter().all(|&b| b == 0));
        assert_eq!(q.stats().bytes_written, 5 * 1024);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn ungranted_page_gets_an_error_and_the_queue_keeps_working() {
        let (mut q, _, p) = setup();
        let bad = request(BLKIF_OP_WRITE, 7, 0, &[(1000, 0, 7)]);
        let good = request(BLKIF_OP_READ, 8, 0, &[(1, 0, 7)]);
        let out = run(&mut q, &[bad.as_bytes(), good.as_bytes()]);
        assert!(out.contains(&Response { id: 7, operation: 1, status: Status::Error }));
        assert!(out.contains(&Response { id: 8, operation: 0, status: Status::Okay }));
        assert_eq!(q.stats().failed, 1);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn reads_finished_together_go_to_the_guest_in_one_copy_and_fail_alone() {
        let (mut q, grants, p) = setup();
        grants.pages.lock().unwrap().get_mut(&1).unwrap().fill(0x33);
        let w = request(BLKIF_OP_WRITE, 1, 0, &[(1, 0, 7)]);
        assert_eq!(run(&mut q, &[w.as_bytes()])[0].status, Status::Okay);
        let before = grants.copies.load(std::sync::atomic::Ordering::Relaxed);

        let mut out = Vec::new();
        for id in 0..8u32 {
            // Read 3 goes to a page the guest did not grant.
            let gref = if id == 3 { 1000 } else { 2 + id };
            q.submit(request(BLKIF_OP_READ, id.into(), 0, &[(gref, 0, 7)]).as_bytes(), &mut out);
        }
        // Let every read finish, so that one poll collects them all.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while q.pending() > 0 {
            q.poll(&mut out);
            std::thread::sleep(std::time::Duration::from_millis(1));
            assert!(std::time::Instant::now() < deadline, "requests never completed");
        }
        let copies = grants.copies.load(std::sync::atomic::Ordering::Relaxed) - before;
        assert!(copies < 7, "{copies} grant copies for 7 good reads: not batched");
        for id in 0..8u64 {
            let status = out.iter().find(|r| r.id == id).expect("answered").status;
            assert_eq!(status, if id == 3 { Status::Error } else { Status::Okay }, "read {id}");
        }
        let pages = grants.pages.lock().unwrap();
        assert!((0..8u32).filter(|&i| i != 3).all(|i| pages[&(2 + i)].iter().all(|&b| b == 0x33)));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn one_poll_copies_a_bounded_amount_of_read_data_and_leaves_the_rest() {
        let (mut q, grants, p) = setup();
        let mut out = Vec::new();
        // 12 reads of 44 KiB (11 segments): 528 KiB, over POLL_READ_BYTES.
        for id in 0..12u32 {
            let segs = [(2 + id % 14, 0, 7); 11];
            q.submit(request(BLKIF_OP_READ, id.into(), u64::from(id) * 88, &segs).as_bytes(), &mut out);
        }
        // Let every read finish, so that one poll could collect them all.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut left_some = false;
        let copied = || grants.to_guest.load(std::sync::atomic::Ordering::Relaxed);
        while q.pending() > 0 {
            let before = copied();
            q.poll(&mut out);
            let bytes = copied() - before;
            assert!(bytes <= POLL_READ_BYTES, "{bytes} bytes copied to the guest by one poll");
            if q.has_backlog() {
                assert!(bytes > 0, "a poll with completions waiting copied nothing");
                left_some = true;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            assert!(std::time::Instant::now() < deadline, "requests never completed");
        }
        assert!(left_some, "12 reads finished together were answered by one poll");
        assert!(!q.has_backlog());
        assert_eq!(out.len(), 12);
        assert!(out.iter().all(|r| r.status == Status::Okay));
        std::fs::remove_file(p).unwrap();
    }

    /// A read whose copy is cut at [`POLL_READ_BYTES`] is answered by the
    /// next poll, which copies the rest, every byte in its place.
    #[test]
    fn a_read_cut_at_the_bound_is_finished_by_the_next_poll_with_every_byte_in_place() {
        let (mut q, grants, p) = setup();
        let content: Vec<u8> = (0..176 * 512).map(|i| (i / 512 % 251) as u8 ^ (i % 7) as u8).collect();
        std::fs::write(&p, &content).unwrap();
        grants.pages.lock().unwrap().extend((20..42u32).map(|g| (g, vec![0u8; PAGE_SIZE])));
        let mut out = Vec::new();
        // Two reads of 44 KiB, one page per segment: 88 KiB, over the bound.
        let segs = |first: u32| (first..first + 11).map(|g| (g, 0, 7)).collect::<Vec<_>>();
        q.submit(request(BLKIF_OP_READ, 1, 0, &segs(20)).as_bytes(), &mut out);
        q.submit(request(BLKIF_OP_READ, 2, 88, &segs(31)).as_bytes(), &mut out);
        std::thread::sleep(std::time::Duration::from_millis(100));
        // The reads are done: wait for the engine to report both.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while out.is_empty() {
            q.poll(&mut out);
            assert!(std::time::Instant::now() < deadline, "requests never completed");
        }
        // The engine's threads finish them in any order: the one reaped
        // second is cut.
        assert_eq!(out.len(), 1, "the second read was not cut");
        let cut_pages = if out[0].id == 1 { 31..42u32 } else { 20..31 };
        assert!(q.has_backlog());
        {
            let pages = grants.pages.lock().unwrap();
            let copied = cut_pages.take_while(|g| pages[g].iter().any(|&b| b != 0)).count();
            assert_eq!(
                copied * PAGE_SIZE,
                POLL_READ_BYTES - 44 * 1024,
                "pages of the cut read copied by the first poll"
            );
        }
        q.poll(&mut out);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|r| r.status == Status::Okay));
        assert!(!q.has_backlog());
        let pages = grants.pages.lock().unwrap();
        for (i, g) in (20..42u32).enumerate() {
            assert!(pages[&g][..] == content[i * PAGE_SIZE..(i + 1) * PAGE_SIZE], "page {i} of the reads");
        }
        drop(pages);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn writes_taken_together_are_copied_in_one_call_and_fail_alone() {
        let (mut q, grants, p) = setup();
        for g in 2..10u32 {
            grants.pages.lock().unwrap().get_mut(&g).unwrap().fill(g as u8);
        }
        let before = grants.copies.load(std::sync::atomic::Ordering::Relaxed);
        let mut out = Vec::new();
        for id in 0..8u32 {
            // Write 5 names a page the guest did not grant.
            let gref = if id == 5 { 1000 } else { 2 + id };
            q.submit(request(BLKIF_OP_WRITE, id.into(), u64::from(id) * 8, &[(gref, 0, 7)]).as_bytes(), &mut out);
        }
        assert_eq!(grants.copies.load(std::sync::atomic::Ordering::Relaxed), before, "copied before the poll");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while q.pending() > 0 {
            q.poll(&mut out);
            std::thread::sleep(std::time::Duration::from_millis(1));
            assert!(std::time::Instant::now() < deadline, "requests never completed");
        }
        assert_eq!(grants.copies.load(std::sync::atomic::Ordering::Relaxed), before + 1, "one grant copy for 8 writes");
        for id in 0..8u64 {
            let status = out.iter().find(|r| r.id == id).expect("answered").status;
            assert_eq!(status, if id == 5 { Status::Error } else { Status::Okay }, "write {id}");
        }
        let disk = std::fs::read(&p).unwrap();
        for id in (0..8usize).filter(|&i| i != 5) {
            assert!(disk[id * 4096..(id + 1) * 4096].iter().all(|&b| b == 2 + id as u8), "write {id} on disk");
        }
        assert!(disk[5 * 4096..6 * 4096].iter().all(|&b| b == 0), "the failed write reached the disk");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn barrier_waits_for_earlier_requests_and_later_ones_wait_for_it() {
        let (mut q, _, p) = setup();
        let a = request(BLKIF_OP_WRITE, 1, 0, &[(1, 0, 7)]);
        let b = request(BLKIF_OP_WRITE_BARRIER, 2, 8, &[(2, 0, 7)]);
        let c = request(BLKIF_OP_WRITE, 3, 16, &[(3, 0, 7)]);
        let out = run(&mut q, &[a.as_bytes(), b.as_bytes(), c.as_bytes()]);
        let order: Vec<u64> = out.iter().map(|r| r.id).collect();
        assert_eq!(order, vec![1, 2, 3]);
        assert!(out.iter().all(|r| r.status == Status::Okay));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn indirect_request_reads_segments_from_its_page() {
        let (mut q, grants, p) = setup();
        {
            let mut pages = grants.pages.lock().unwrap();
            let ind = pages.get_mut(&9).unwrap();
            for i in 0..3u32 {
                let seg = BlkifRequestSegment { gref: (4 + i).into(), first_sect: 0, last_sect: 7, _pad: [0; 2] };
                ind[i as usize * 8..i as usize * 8 + 8].copy_from_slice(seg.as_bytes());
            }
            pages.get_mut(&4).unwrap().fill(1);
            pages.get_mut(&5).unwrap().fill(2);
            pages.get_mut(&6).unwrap().fill(3);
        }
        let mut r = BlkifRequestIndirect64 {
            operation: BLKIF_OP_INDIRECT,
            indirect_op: BLKIF_OP_WRITE,
            nr_segments: 3.into(),
            id: 11.into(),
            sector_number: 64.into(),
            ..Default::default()
        };
        r.indirect_grefs[0] = 9.into();
        let mut slot = [0u8; SLOT_SIZE_64];
        slot[..64].copy_from_slice(r.as_bytes());
        assert_eq!(run(&mut q, &[&slot])[0].status, Status::Okay);
        let read = request(BLKIF_OP_READ, 12, 72, &[(10, 0, 7)]);
        assert_eq!(run(&mut q, &[read.as_bytes()])[0].status, Status::Okay);
        assert!(grants.pages.lock().unwrap()[&10].iter().all(|&b| b == 2));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn flush_and_discard_complete() {
        let (mut q, _, p) = setup();
        let f = request(BLKIF_OP_FLUSH_DISKCACHE, 1, 0, &[]);
        let fw = request(BLKIF_OP_FLUSH_DISKCACHE, 2, 0, &[(1, 0, 7)]);
        let d = BlkifRequestDiscard64 {
            operation: BLKIF_OP_DISCARD,
            id: 3.into(),
            sector_number: 0.into(),
            nr_sectors: 8.into(),
            ..Default::default()
        };
        let mut slot = [0u8; SLOT_SIZE_64];
        slot[..32].copy_from_slice(d.as_bytes());
        let out = run(&mut q, &[f.as_bytes(), fw.as_bytes(), &slot]);
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|r| r.status == Status::Okay), "{out:?}");
        std::fs::remove_file(p).unwrap();
    }

    /// Takes `slots` as the ring loop does: only while the queue can take.
    fn run_as_ring(q: &mut QueueExecutor, slots: &[&[u8]]) -> Vec<Response> {
        let mut out = Vec::new();
        let mut next = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while next < slots.len() || q.pending() > 0 {
            while next < slots.len() && q.can_take() {
                q.submit(slots[next], &mut out);
                next += 1;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            q.poll(&mut out);
            assert!(std::time::Instant::now() < deadline, "requests never completed");
        }
        out
    }

    /// Issue 13, memory: requests beyond the queue's budget wait (in the
    /// ring) instead of allocating, and all are served; the spare buffers
    /// go once the queue is idle.
    #[test]
    fn requests_beyond_the_budget_wait_and_spares_go_when_idle() {
        let (q, _, p) = setup();
        let daemon = BufferBudget::new(0);
        let budget = QueueBudget::new(0, daemon.clone());
        let mut q = q.with_budget(budget.clone());
        let segs: Vec<(u32, u8, u8)> = (1..12).map(|g| (g, 0, 7)).collect();
        let reads: Vec<_> = (0..64u64).map(|id| request(BLKIF_OP_READ, id, (id % 16) * 88, &segs)).collect();
        let slots: Vec<&[u8]> = reads.iter().map(|r| r.as_bytes()).collect();

        let out = run_as_ring(&mut q, &slots);

        assert_eq!(out.len(), 64);
        assert!(out.iter().all(|r| r.status == Status::Okay));
        // 64 reads of 44 KiB (2.75 MiB) within the minimum share, 1 MiB.
        assert!(budget.peak() <= 1 << 20, "peak {} bytes", budget.peak());
        assert!(q.stats().budget_waits > 0);
        assert!(daemon.allocations() <= 23, "{} buffers allocated", daemon.allocations());
        assert!(budget.held() > 0, "spares kept while busy");
        assert_eq!(q.retry(), Some(SPARE_IDLE));
        q.poll(&mut Vec::new());
        // Idle time is on the coarse clock: up to a tick (10 ms) late.
        std::thread::sleep(SPARE_IDLE + Duration::from_millis(20));
        q.poll(&mut Vec::new());
        assert_eq!((budget.held(), daemon.held(), q.retry()), (0, 0, None));
        std::fs::remove_file(p).unwrap();
    }

    /// Records what reaches the engine, completing each at once (reported
    /// while `hold` is false).
    struct Recorder {
        ops: Arc<Mutex<Vec<String>>>,
        done: Vec<Completion>,
        fd: nix::sys::eventfd::EventFd,
        hold: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Recorder {
        fn new(ops: Arc<Mutex<Vec<String>>>) -> Box<Self> {
            let fd = nix::sys::eventfd::EventFd::new().unwrap();
            Box::new(Recorder { ops, done: Vec::new(), fd, hold: Default::default() })
        }
    }

    impl IoEngine for Recorder {
        fn submit(&mut self, tag: u64, op: IoOp) -> Result<(), crate::engine::EngineError> {
            self.ops.lock().unwrap().push(format!("{op:?}"));
            let buf = match op {
                IoOp::Read { buf, .. } | IoOp::Write { buf, .. } => Some(buf),
                IoOp::ReadPages { .. } | IoOp::WritePages { .. } | IoOp::Flush | IoOp::Discard { .. } => None,
            };
            self.done.push(Completion { tag, result: Ok(()), buf });
            Ok(())
        }
        fn completions(&mut self, out: &mut Vec<Completion>) {
            if !self.hold.load(std::sync::atomic::Ordering::Relaxed) {
                out.append(&mut self.done);
            }
        }
        fn completion_fd(&self) -> BorrowedFd<'_> {
            use std::os::fd::AsFd;
            self.fd.as_fd()
        }
        fn in_flight(&self) -> usize {
            self.done.len()
        }
    }

    /// Issue 13, memory: once a read failed on a bad grant, the grants of
    /// the queue's next reads are checked first, and a bad one costs no
    /// I/O and no buffer.
    #[test]
    fn after_a_bad_grant_reads_to_bad_grants_cost_no_io() {
        let ops = Arc::new(Mutex::new(Vec::new()));
        let engine = Recorder::new(ops.clone());
        let pages = (0..4u32).map(|g| (g, vec![0u8; PAGE_SIZE])).collect();
        let grants = Arc::new(FakeGrants { pages: Mutex::new(pages), ..Default::default() });
        let mut q = QueueExecutor::new(Protocol::Native, LIMITS, 5, grants, engine);
        let bad: Vec<_> = (0..10).map(|id| request(BLKIF_OP_READ, id, 0, &[(1, 0, 7), (1000, 0, 7)])).collect();
        let good = request(BLKIF_OP_READ, 99, 0, &[(1, 0, 7)]);

        // The first costs its I/O: its copy to the guest fails after.
        assert_eq!(run(&mut q, &[bad[0].as_bytes()])[0].status, Status::Error);
        let slots: Vec<&[u8]> = bad[1..].iter().map(|r| r.as_bytes()).collect();
        let out = run(&mut q, &slots);
        let good_out = run(&mut q, &[good.as_bytes()]);

        assert!(out.iter().all(|r| r.status == Status::Error) && out.len() == 9);
        assert_eq!(good_out[0].status, Status::Okay);
        assert_eq!(ops.lock().unwrap().len(), 2, "I/O only for the first bad read and the good one");
        assert_eq!(q.stats().bad_grants_caught, 9);
    }

    /// Issue 13: `discard-secure = 0` is advertised, so a guest's secure
    /// discard is a plain one (Linux's blkback honours the flag only when it
    /// advertised it).
    #[test]
    fn secure_discard_is_plain_where_not_offered() {
        let ops = Arc::new(Mutex::new(Vec::new()));
        let engine = Recorder::new(ops.clone());
        let grants = Arc::new(FakeGrants { pages: Mutex::new(Default::default()), ..Default::default() });
        let mut q = QueueExecutor::new(Protocol::Native, LIMITS, 5, grants, engine);
        let d = BlkifRequestDiscard64 {
            operation: BLKIF_OP_DISCARD,
            flag: BLKIF_DISCARD_SECURE,
            id: 3.into(),
            sector_number: 8.into(),
            nr_sectors: 8.into(),
            ..Default::default()
        };
        let mut slot = [0u8; SLOT_SIZE_64];
        slot[..32].copy_from_slice(d.as_bytes());
        let out = run(&mut q, &[&slot]);
        assert_eq!(out.len(), 1);
        assert_eq!(*ops.lock().unwrap(), ["Discard { offset: 4096, len: 4096, secure: false }"]);
        const { assert!(!crate::config::SECURE_DISCARD_OFFERED) };
    }

    /// Passes operations on to another engine, recording each one's kind,
    /// offset and length, and the bytes handed over between two submits.
    struct Tally {
        inner: Box<dyn IoEngine>,
        log: Arc<Mutex<TallyLog>>,
    }

    #[derive(Default)]
    struct TallyLog {
        /// (kind, offset, bytes) per operation, in submission order.
        ops: Vec<(&'static str, u64, usize)>,
        /// Bytes handed over before each `submit_pending` (one per poll).
        batches: Vec<usize>,
        open: usize,
    }

    impl IoEngine for Tally {
        fn submit(&mut self, tag: u64, op: IoOp) -> Result<(), crate::engine::EngineError> {
            let (kind, offset, len) = match &op {
                IoOp::Read { offset, buf } => ("read", *offset, buf.len()),
                IoOp::Write { offset, buf } => ("write", *offset, buf.len()),
                IoOp::ReadPages { offset, pages } => ("read-pages", *offset, pages.len()),
                IoOp::WritePages { offset, pages } => ("write-pages", *offset, pages.len()),
                IoOp::Flush => ("flush", 0, 0),
                IoOp::Discard { offset, len, .. } => ("discard", *offset, *len as usize),
            };
            let mut log = self.log.lock().unwrap();
            log.ops.push((kind, offset, len));
            log.open += len;
            drop(log);
            self.inner.submit(tag, op)
        }
        fn submit_pending(&mut self) -> Result<(), crate::engine::EngineError> {
            let mut log = self.log.lock().unwrap();
            let open = std::mem::take(&mut log.open);
            log.batches.push(open);
            drop(log);
            self.inner.submit_pending()
        }
        fn completions(&mut self, out: &mut Vec<Completion>) {
            self.inner.completions(out);
        }
        fn completion_fd(&self) -> BorrowedFd<'_> {
            self.inner.completion_fd()
        }
        fn in_flight(&self) -> usize {
            self.inner.in_flight()
        }
        fn takes_mapped_pages(&self) -> bool {
            self.inner.takes_mapped_pages()
        }
    }

    /// 1 MiB indirect requests (256 segments) on a 2 MiB disk.
    const BIG_LIMITS: DiskLimits = DiskLimits { sectors: 4096, max_indirect_segments: 256, ..LIMITS };
    const MIB: usize = 1 << 20;

    /// A queue on a 2 MiB disk of its own (`name`) taking 1 MiB requests
    /// from `grants`, its engine's operations recorded.
    fn setup_big(
        name: &str,
        grants: Arc<dyn GrantMapper>,
    ) -> (QueueExecutor, Arc<Mutex<TallyLog>>, std::path::PathBuf) {
        let p = std::env::temp_dir().join(format!("blkback-queue-{}-{name}", std::process::id()));
        std::fs::File::create(&p).unwrap().set_len(2 * MIB as u64).unwrap();
        let disk = Arc::new(Disk::open(&p, false, true).unwrap());
        let log = Arc::new(Mutex::new(TallyLog::default()));
        let engine = Box::new(Tally { inner: Box::new(ThreadPoolEngine::new(disk, 2).unwrap()), log: log.clone() });
        (QueueExecutor::new(Protocol::Native, BIG_LIMITS, 5, grants, engine), log, p)
    }

    /// Granted pages `range` of `grants`, each sector of page `g` filled
    /// with a byte of its own.
    fn fill_pages(grants: &FakeGrants, range: std::ops::Range<u32>) {
        let mut pages = grants.pages.lock().unwrap();
        for g in range {
            pages.insert(g, (0..PAGE_SIZE).map(|i| pattern(g, i)).collect());
        }
    }

    fn pattern(g: u32, i: usize) -> u8 {
        (g as usize * 31 + i / 512 * 7) as u8
    }

    /// A slot with an indirect request of `segs` (one indirect page: at most
    /// 512), their descriptors given to `put` for the guest's page `table`.
    fn indirect(op: u8, id: u64, sector: u64, table: u32, segs: &[u32], put: impl FnOnce(u32, &[u8])) -> Vec<u8> {
        let mut page = vec![0u8; PAGE_SIZE];
        for (i, &g) in segs.iter().enumerate() {
            let seg = BlkifRequestSegment { gref: g.into(), first_sect: 0, last_sect: 7, _pad: [0; 2] };
            page[i * 8..i * 8 + 8].copy_from_slice(seg.as_bytes());
        }
        put(table, &page);
        let mut r = BlkifRequestIndirect64 {
            operation: BLKIF_OP_INDIRECT,
            indirect_op: op,
            nr_segments: (segs.len() as u16).into(),
            id: id.into(),
            sector_number: sector.into(),
            ..Default::default()
        };
        r.indirect_grefs[0] = table.into();
        let mut slot = vec![0u8; SLOT_SIZE_64];
        slot[..64].copy_from_slice(r.as_bytes());
        slot
    }

    fn fake_indirect(grants: &FakeGrants, op: u8, id: u64, sector: u64, table: u32, segs: &[u32]) -> Vec<u8> {
        indirect(op, id, sector, table, segs, |g, page| {
            grants.pages.lock().unwrap().insert(g, page.to_vec());
        })
    }

    /// Polls `q` until nothing is pending, as the ring worker does, and
    /// returns the responses.
    fn finish(q: &mut QueueExecutor, mut out: Vec<Response>) -> Vec<Response> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while q.pending() > 0 {
            q.poll(&mut out);
            std::thread::sleep(std::time::Duration::from_millis(1));
            assert!(std::time::Instant::now() < deadline, "requests never completed");
        }
        out
    }

    /// What a 1 MiB request at byte `at` sent to the engine, for `kind`:
    /// parts of one part's size, in order over the whole range, and no
    /// poll's batch over the bound.
    fn assert_parts(log: &TallyLog, kind: &str, at: u64) {
        let ops: Vec<_> = log.ops.iter().filter(|op| op.0 == kind).collect();
        let expected: Vec<_> = (0..MIB / PART_BYTES).map(|k| at + (k * PART_BYTES) as u64).collect();
        assert_eq!(ops.iter().map(|op| op.1).collect::<Vec<_>>(), expected, "{kind} parts' offsets");
        assert!(ops.iter().all(|op| op.2 == PART_BYTES), "{kind} parts of another size");
        let most = log.batches.iter().max().copied().unwrap_or(0);
        assert!(most <= POLL_PART_BYTES, "{most} bytes handed to the engine by one poll");
    }

    /// Issue 13, time: a 1 MiB read or write goes to the engine as parts of
    /// at most `PART_BYTES`, no poll hands more than `POLL_PART_BYTES` over,
    /// the queue takes no more requests while parts wait, and each request
    /// is answered once with every byte in its place.
    #[test]
    fn a_1_mib_request_goes_to_the_engine_in_parts_within_the_poll_bound_and_every_byte_arrives() {
        let grants = Arc::new(FakeGrants::default());
        fill_pages(&grants, 100..356);
        let (mut q, log, p) = setup_big("parts", grants.clone());
        let written: Vec<u32> = (100..356).collect();
        let write = fake_indirect(&grants, BLKIF_OP_WRITE, 1, 2048, 1, &written);
        let mut out = Vec::new();

        q.submit(&write, &mut out);
        assert!(!q.can_take() && q.has_backlog(), "the write's parts do not wait");
        let out = finish(&mut q, out);

        assert_eq!(out, [Response { id: 1, operation: BLKIF_OP_WRITE, status: Status::Okay }]);
        assert_parts(&log.lock().unwrap(), "write", MIB as u64);
        let disk = std::fs::read(&p).unwrap();
        for (k, &g) in written.iter().enumerate() {
            let at = MIB + k * PAGE_SIZE;
            assert!((0..PAGE_SIZE).all(|i| disk[at + i] == pattern(g, i)), "page {k} of the write on disk");
        }

        let read_into: Vec<u32> = (400..656).collect();
        grants.pages.lock().unwrap().extend(read_into.iter().map(|&g| (g, vec![0u8; PAGE_SIZE])));
        let read = fake_indirect(&grants, BLKIF_OP_READ, 2, 2048, 2, &read_into);
        log.lock().unwrap().batches.clear();
        let mut out = Vec::new();
        q.submit(&read, &mut out);
        assert!(!q.can_take());
        let out = finish(&mut q, out);

        assert_eq!(out, [Response { id: 2, operation: BLKIF_OP_READ, status: Status::Okay }]);
        assert_parts(&log.lock().unwrap(), "read", MIB as u64);
        let pages = grants.pages.lock().unwrap();
        for (&from, to) in written.iter().zip(&read_into) {
            assert!((0..PAGE_SIZE).all(|i| pages[to][i] == pattern(from, i)), "page {to} read");
        }
        assert_eq!((q.stats().bytes_written, q.stats().bytes_read), (MIB as u64, MIB as u64));
        assert_eq!((q.stats().completed, q.pending()), (2, 0));
        drop(pages);
        std::fs::remove_file(p).unwrap();
    }

    /// A part that fails fails its request, answered once: a write's bad
    /// grant stops the parts after it (they are never written); a read's
    /// bad grant fails it after its I/O, and the next read to a bad grant
    /// is caught whole, before any part's I/O.
    #[test]
    fn a_failing_part_fails_its_request_once_and_the_parts_after_it_are_dropped() {
        let grants = Arc::new(FakeGrants::default());
        fill_pages(&grants, 100..356);
        let (mut q, log, p) = setup_big("failing", grants.clone());
        // Segment 100 (in part 6 of 16) names a page the guest did not grant.
        let mut segs: Vec<u32> = (100..356).collect();
        segs[100] = 5000;
        let write = fake_indirect(&grants, BLKIF_OP_WRITE, 1, 0, 1, &segs);
        let read = fake_indirect(&grants, BLKIF_OP_READ, 2, 0, 2, &segs);
        let again = fake_indirect(&grants, BLKIF_OP_READ, 3, 0, 3, &segs);
        let good = fake_indirect(&grants, BLKIF_OP_READ, 4, 0, 4, &(100..356).collect::<Vec<_>>());

        let wrote = run_as_ring(&mut q, &[&write]);
        let writes = log.lock().unwrap().ops.len();
        let read_out = run_as_ring(&mut q, &[&read]);
        let reads = log.lock().unwrap().ops.len() - writes;
        let again_out = run_as_ring(&mut q, &[&again]);
        let after_again = log.lock().unwrap().ops.len();
        let good_out = run_as_ring(&mut q, &[&good]);

        let status = |out: &[Response]| out.iter().map(|r| (r.id, r.status)).collect::<Vec<_>>();
        assert_eq!(status(&wrote), [(1, Status::Error)]);
        assert_eq!(writes, 6, "parts of the write that reached the engine");
        let disk = std::fs::read(&p).unwrap();
        assert!(disk[6 * PART_BYTES..].iter().all(|&b| b == 0), "a part at or after the bad grant was written");
        assert_eq!(status(&read_out), [(2, Status::Error)]);
        assert!((7..=16).contains(&reads), "{reads} parts of the read");
        assert_eq!(status(&again_out), [(3, Status::Error)]);
        assert_eq!(after_again, writes + reads, "the read after a bad grant did I/O");
        assert_eq!(q.stats().bad_grants_caught, 1);
        assert_eq!(status(&good_out), [(4, Status::Okay)]);
        assert_eq!((q.stats().completed, q.stats().failed, q.pending()), (4, 3, 0));
        std::fs::remove_file(p).unwrap();
    }

    /// A `FLUSH_DISKCACHE` with data that is split flushes once, after all
    /// its parts completed, and is answered after the flush.
    #[test]
    fn a_split_write_with_flush_flushes_only_after_all_its_parts_completed() {
        let ops = Arc::new(Mutex::new(Vec::new()));
        let engine = Recorder::new(ops.clone());
        let hold = engine.hold.clone();
        let pages = (0..16u32).map(|g| (g, vec![0u8; PAGE_SIZE])).collect();
        let grants = Arc::new(FakeGrants { pages: Mutex::new(pages), ..Default::default() });
        // Parts of 16 KiB, one per poll: the 44 KiB write is cut in three.
        let mut q = QueueExecutor::new(Protocol::Native, LIMITS, 5, grants, engine).with_parts(16 << 10, 16 << 10);
        let segs: Vec<_> = (1..12).map(|g| (g, 0, 7)).collect();
        let fw = request(BLKIF_OP_FLUSH_DISKCACHE, 7, 0, &segs);
        let kinds =
            || ops.lock().unwrap().iter().map(|op| op.split(' ').next().unwrap().to_owned()).collect::<Vec<_>>();
        let mut out = Vec::new();

        hold.store(true, std::sync::atomic::Ordering::Relaxed);
        q.submit(fw.as_bytes(), &mut out);
        for _ in 0..4 {
            q.poll(&mut out);
        }
        let before = kinds();
        hold.store(false, std::sync::atomic::Ordering::Relaxed);
        let out = finish(&mut q, out);

        assert_eq!(before, ["Write", "Write", "Write"], "flushed before its parts completed");
        assert_eq!(kinds(), ["Write", "Write", "Write", "Flush"]);
        let lens: Vec<_> =
            ops.lock().unwrap()[..3].iter().map(|op| op.split("AlignedBuf(").nth(1).unwrap().to_owned()).collect();
        assert_eq!(lens, ["16384 of 16384) }", "16384 of 16384) }", "12288 of 12288) }"]);
        assert_eq!(out, [Response { id: 7, operation: BLKIF_OP_FLUSH_DISKCACHE, status: Status::Okay }]);
    }

    /// A split barrier waits for the request before it, and the request
    /// after it waits for its parts and its flush.
    #[test]
    fn a_split_barrier_waits_for_earlier_requests_and_later_ones_wait_for_all_its_parts() {
        let ops = Arc::new(Mutex::new(Vec::new()));
        let pages = (0..16u32).map(|g| (g, vec![0u8; PAGE_SIZE])).collect();
        let grants = Arc::new(FakeGrants { pages: Mutex::new(pages), ..Default::default() });
        let mut q = QueueExecutor::new(Protocol::Native, LIMITS, 5, grants, Recorder::new(ops.clone()))
            .with_parts(16 << 10, 16 << 10);
        let a = request(BLKIF_OP_WRITE, 1, 0, &[(1, 0, 7)]);
        let segs: Vec<_> = (1..12).map(|g| (g, 0, 7)).collect();
        let b = request(BLKIF_OP_WRITE_BARRIER, 2, 8, &segs);
        let c = request(BLKIF_OP_WRITE, 3, 200, &[(3, 0, 7)]);

        let out = run(&mut q, &[a.as_bytes(), b.as_bytes(), c.as_bytes()]);

        assert_eq!(
            out.iter().map(|r| (r.id, r.status)).collect::<Vec<_>>(),
            [(1, Status::Okay), (2, Status::Okay), (3, Status::Okay)]
        );
        let offsets: Vec<_> = ops.lock().unwrap().iter().map(|op| op.split(',').next().unwrap().to_owned()).collect();
        assert_eq!(
            offsets,
            [
                "Write { offset: 0",
                "Write { offset: 4096",
                "Write { offset: 20480",
                "Write { offset: 36864",
                "Flush",
                "Write { offset: 102400"
            ]
        );
    }

    /// What the ring's `drain` does with parts waiting: the polls it makes
    /// while `has_backlog` start them all, and the requests held behind,
    /// and every request is answered once.
    #[test]
    fn draining_starts_every_waiting_part_and_answers_every_request_once() {
        let grants = Arc::new(FakeGrants::default());
        fill_pages(&grants, 100..356);
        let (mut q, log, p) = setup_big("drain", grants.clone());
        let read = fake_indirect(&grants, BLKIF_OP_READ, 1, 0, 1, &(100..356).collect::<Vec<_>>());
        let write = fake_indirect(&grants, BLKIF_OP_WRITE, 2, 2048, 2, &(100..356).collect::<Vec<_>>());
        let mut out = Vec::new();
        q.submit(&read, &mut out);
        // Taken behind the read's waiting parts (as by a ring that ignored
        // `can_take`): held, not started.
        q.submit(&write, &mut out);
        assert_eq!(q.pending(), 2);

        // RingQueue::drain's first step.
        q.poll(&mut out);
        while q.has_backlog() {
            q.poll(&mut out);
        }
        let started = log.lock().unwrap().ops.len();
        let out = finish(&mut q, out);

        assert_eq!(started, 32, "parts left waiting by the first drain step");
        let mut ids: Vec<_> = out.iter().map(|r| (r.id, r.status)).collect();
        ids.sort_unstable_by_key(|&(id, _)| id);
        assert_eq!(ids, [(1, Status::Okay), (2, Status::Okay)]);
        std::fs::remove_file(p).unwrap();
    }

    /// Guest memory of pages `0..n`, grant `g` being page `g`: mapped by
    /// pointing into it (runs of consecutive grants only), and copied.
    struct GuestMemory {
        mem: Arc<gnttab::GrantMapping>,
        copies: std::sync::atomic::AtomicUsize,
        maps: std::sync::atomic::AtomicUsize,
    }

    /// Keeps the guest memory mapped while a view of it lives.
    struct Keep(#[allow(dead_code)] Arc<gnttab::GrantMapping>);
    impl gnttab::Unmap for Keep {
        fn unmap(&mut self, _: std::ptr::NonNull<u8>, _: usize) {}
    }

    impl GrantMapper for GuestMemory {
        fn map(&self, _: DomId, refs: &[GrantRef], _: bool) -> gnttab::Result<gnttab::GrantMapping> {
            self.maps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let first = refs[0].0 as usize;
            let run = refs.iter().enumerate().all(|(i, r)| r.0 as usize == first + i);
            if !run || (first + refs.len()) * PAGE_SIZE > self.mem.len() {
                return Err(gnttab::Error::InvalidArgument("not a run of the guest's pages"));
            }
            let addr = std::ptr::NonNull::new(self.mem.as_ptr().wrapping_add(first * PAGE_SIZE)).unwrap();
            // SAFETY: the range is within `mem`, which `Keep` holds mapped
            // until the view is dropped.
            Ok(unsafe {
                gnttab::GrantMapping::from_raw(addr, refs.len() * PAGE_SIZE, true, Box::new(Keep(self.mem.clone())))
            })
        }

        fn copy(&self, segments: &mut [CopySegment<'_>], status: &mut [GrantStatus]) -> gnttab::Result<()> {
            self.copies.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            for (seg, st) in segments.iter_mut().zip(status.iter_mut()) {
                let g = seg.guest();
                let at = g.gref.0 as usize * PAGE_SIZE + usize::from(g.offset);
                let done = match seg {
                    CopySegment::FromGuest { dst, .. } => self.mem.read(at, dst),
                    CopySegment::ToGuest { src, .. } => self.mem.write(at, src),
                };
                *st = if done.is_ok() { GrantStatus::Okay } else { GrantStatus::BadGntref };
            }
            Ok(())
        }
    }

    /// With persistent grants, the parts of a 1 MiB request go to the
    /// engine as mapped pages, within the same bounds, its grants mapped in
    /// one call for all its parts, and the data goes between the disk and
    /// the guest's pages uncopied.
    #[test]
    fn a_1_mib_request_on_persistent_grants_goes_in_mapped_parts_and_every_byte_arrives() {
        let mem = Arc::new(gnttab::GrantMapping::anonymous(700 * PAGE_SIZE).unwrap());
        for g in 100..356u32 {
            let page: Vec<u8> = (0..PAGE_SIZE).map(|i| pattern(g, i)).collect();
            mem.write(g as usize * PAGE_SIZE, &page).unwrap();
        }
        let grants = Arc::new(GuestMemory { mem: mem.clone(), copies: Default::default(), maps: Default::default() });
        let (q, log, p) = setup_big("mapped", grants.clone());
        let mut q = q.with_persistent_grants(crate::mapped::DEFAULT_PERSISTENT_GRANTS, 512);
        let put = |g: u32, page: &[u8]| mem.write(g as usize * PAGE_SIZE, page).unwrap();
        let write = indirect(BLKIF_OP_WRITE, 1, 0, 1, &(100..356).collect::<Vec<_>>(), put);
        let read = indirect(BLKIF_OP_READ, 2, 0, 2, &(400..656).collect::<Vec<_>>(), put);

        let out = run_as_ring(&mut q, &[&write, &read]);

        let status: Vec<_> = out.iter().map(|r| (r.id, r.status)).collect();
        assert_eq!(status, [(1, Status::Okay), (2, Status::Okay)]);
        let log = log.lock().unwrap();
        assert_parts(&log, "write-pages", 0);
        assert_parts(&log, "read-pages", 0);
        assert_eq!(log.ops.len(), 32, "operations other than mapped parts");
        assert_eq!(grants.copies.load(std::sync::atomic::Ordering::Relaxed), 2, "copies beyond the indirect pages");
        assert_eq!(grants.maps.load(std::sync::atomic::Ordering::Relaxed), 2, "map calls for two requests");
        let mut page = vec![0u8; PAGE_SIZE];
        for (k, g) in (400..656u32).enumerate() {
            mem.read(g as usize * PAGE_SIZE, &mut page).unwrap();
            assert!((0..PAGE_SIZE).all(|i| page[i] == pattern(100 + k as u32, i)), "page {g} read");
        }
        std::fs::remove_file(p).unwrap();
    }

    /// With persistent grants, a split read whose grants cannot be mapped
    /// is copied part by part; after a bad grant each such part's grants
    /// are checked before its I/O, so a read to bogus grants costs none.
    #[test]
    fn after_a_bad_grant_a_split_read_to_unmappable_grants_costs_no_io() {
        let mem = Arc::new(gnttab::GrantMapping::anonymous(300 * PAGE_SIZE).unwrap());
        let grants = Arc::new(GuestMemory { mem: mem.clone(), copies: Default::default(), maps: Default::default() });
        let (q, log, p) = setup_big("unmappable", grants.clone());
        let mut q = q.with_persistent_grants(crate::mapped::DEFAULT_PERSISTENT_GRANTS, 512);
        let put = |g: u32, page: &[u8]| mem.write(g as usize * PAGE_SIZE, page).unwrap();
        // Grants beyond the guest's memory: neither mapped nor copied.
        let bogus: Vec<u32> = (60_000..60_256).collect();
        let first = indirect(BLKIF_OP_READ, 1, 0, 1, &bogus, put);
        let more: Vec<_> = (2..6).map(|id| indirect(BLKIF_OP_READ, id, 0, 1 + id as u32, &bogus, put)).collect();
        let good = indirect(BLKIF_OP_READ, 9, 0, 9, &(10..266).collect::<Vec<_>>(), put);

        let first_out = run_as_ring(&mut q, &[&first]);
        let first_ops = log.lock().unwrap().ops.len();
        let more_out = run_as_ring(&mut q, &more.iter().map(Vec::as_slice).collect::<Vec<_>>());
        let more_ops = log.lock().unwrap().ops.len() - first_ops;
        let good_out = run_as_ring(&mut q, &[&good]);

        assert_eq!(first_out.iter().map(|r| r.status).collect::<Vec<_>>(), [Status::Error]);
        // Parts go on starting (one a poll) until the first one's failure is reaped.
        assert!((1..=16).contains(&first_ops), "{first_ops} parts of the first bogus read");
        assert_eq!(more_out.len(), 4);
        assert!(more_out.iter().all(|r| r.status == Status::Error));
        assert_eq!(more_ops, 0, "bogus reads after a bad grant did I/O");
        assert_eq!(q.stats().bad_grants_caught, 4);
        assert_eq!(good_out.iter().map(|r| r.status).collect::<Vec<_>>(), [Status::Okay]);
        std::fs::remove_file(p).unwrap();
    }
}
