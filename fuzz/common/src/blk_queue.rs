//! Target `blk_queue`: the block backend's request executor
//! ([`QueueExecutor`](blkback::QueueExecutor), `blkback/src/queue.rs`)
//! driven by a hostile guest: requests copied out of its ring slots (raw
//! bytes, or well-formed reads, writes, barriers, flushes, discards and
//! indirect requests of the run's ABI with fuzzed fields), polls, waits,
//! pages the guest rewrites, grant calls that fail, and a neighbour
//! holding part of the daemon's budget. The queue runs on a 64 KiB raw disk,
//! or one of 256 KiB, where a request over 64 KiB fits and is cut into
//! parts (a temporary file, page cache or `O_DIRECT`, possibly truncated to
//! three quarters under the queue) with the thread-pool
//! engine (1 or 2 threads) or io_uring, by grant copy or with persistent
//! grants of a small capacity (`blk_queue/guest.rs`: the guest's pages,
//! mapped as gntdev maps them).
//!
//! The harness takes requests as `RingQueue::process` does, only while
//! [`can_take`](blkback::QueueExecutor::can_take): the rest wait in the
//! guest's ring. Every request gets a unique id (written into its slot).
//!
//! Properties: no panic; every request taken is answered exactly once,
//! with its operation byte (an indirect request's inner one), by the end
//! (polling until nothing is pending, within 5 s); a request
//! `blkif::parse` refuses is answered at once, with that error's status; a
//! request whose grants all serve it (read-write for a read's pages,
//! granted for a write's and for the indirect pages) is answered `Okay`,
//! any other `Error` (either, where a grant copy call failed as a whole
//! while it was pending, the guest rewrote its indirect pages, or it
//! reaches beyond a truncated file's end);
//! `NotSupported` only from `parse`; nothing taken after a barrier is
//! answered before it, nor the barrier before anything taken earlier; the
//! queue's counters match the answers (completed, failed; bytes read
//! exactly those of the reads answered `Okay`, bytes written at least
//! those of the writes answered `Okay` and never more than was asked); the
//! queue's and the daemon's buffers never exceed their limits; the
//! persistent grants keep at most their capacity and count the guest's map
//! calls exactly; a failed map falls back to copying (no error for it); a
//! queue with requests pending asks to be called again only while one is
//! parked on the budget, one with nothing pending only to free its spare
//! buffers (exactly when buffers are still charged); the
//! queue copies only within pages of its own frontend (the guest's grant
//! mapper asserts it). The checks ([`Check`]): on a quiet queue a write of
//! good grants, laid out as the input says, puts the guest's bytes on the
//! disk, a discard of part of it zeros that part, and reads in other
//! segments (other pages, other offsets, several requests, direct or
//! indirect) bring the same bytes to their pages, through the copy and the
//! persistent paths alike. Once the queue is dropped, no buffer is charged
//! and no guest page is mapped.
//!
//! Input: [`Setup`] (6 bytes), then [`Op`]s until the end.

mod driver;
mod guest;

use blkback::{PersistentStats, QueueStats};
use blkif::abi::{BlkifRequestSegment, BLKIF_MAX_SEGMENTS_PER_REQUEST};
use blkif::DiskLimits;
use xen_bus::Protocol;

use crate::input::Input;
pub use driver::run_scenario;

/// The disk: 64 KiB.
const DISK_SECTORS: u64 = 128;
/// The sectors of a truncated disk's file.
const FILE_SECTORS: u64 = 96;
/// The big disk ([`Setup::big_disk`]): 256 KiB, where a request of more
/// than the queue's 64 KiB parts fits (an indirect one of 17 pages or more).
const BIG_DISK_SECTORS: u64 = 512;
/// The sectors of a truncated big disk's file.
const BIG_FILE_SECTORS: u64 = 384;

/// The queue and its disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setup {
    /// The ring's layout (byte 0, `% 3`).
    pub abi: Protocol,
    /// io_uring instead of the thread pool, where the kernel has it (byte 1, bit 0).
    pub io_uring: bool,
    /// Two I/O threads instead of one (bit 1).
    pub two_threads: bool,
    /// Persistent grants (bit 2).
    pub persistent: bool,
    /// Budgets of the minimum, 1 MiB, for the queue and the daemon (bit 3); else 4 MiB and 64 MiB.
    pub small_budget: bool,
    /// Persistent segments must be whole pages (alignment 4096 instead of 512) (bit 4).
    pub page_aligned: bool,
    /// The disk is opened with `O_DIRECT` (bit 5).
    pub direct: bool,
    /// The disk's file is shorter than the size the queue was given,
    /// [`FILE_SECTORS`] (an image truncated under it) (bit 6).
    pub truncated: bool,
    /// The disk is [`BIG_DISK_SECTORS`] (its truncated file
    /// [`BIG_FILE_SECTORS`]) (bit 7).
    pub big_disk: bool,
    /// The disk (byte 2): bit 0 read-only, 1 discard, 2 barrier, 3 flush offered.
    pub read_only: bool,
    /// Discard offered.
    pub discard: bool,
    /// Barrier offered.
    pub barrier: bool,
    /// Flush offered.
    pub flush: bool,
    /// `feature-max-indirect-segments` (bytes 3-4).
    pub max_indirect_segments: u16,
    /// Grants kept mapped (byte 5, `% 33`).
    pub capacity: u8,
}

impl Setup {
    fn decode(input: &mut Input<'_>) -> Setup {
        let abi = [Protocol::Native, Protocol::X86_32, Protocol::X86_64][usize::from(input.u8() % 3)];
        let o = input.u8();
        let d = input.u8();
        Setup {
            abi,
            io_uring: o & 1 != 0,
            two_threads: o & 2 != 0,
            persistent: o & 4 != 0,
            small_budget: o & 8 != 0,
            page_aligned: o & 16 != 0,
            direct: o & 32 != 0,
            truncated: o & 64 != 0,
            big_disk: o & 128 != 0,
            read_only: d & 1 != 0,
            discard: d & 2 != 0,
            barrier: d & 4 != 0,
            flush: d & 8 != 0,
            max_indirect_segments: input.u16(),
            capacity: input.u8() % 33,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let abi = match self.abi {
            Protocol::Native => 0,
            Protocol::X86_32 => 1,
            Protocol::X86_64 | Protocol::Arm => 2,
        };
        let o = u8::from(self.io_uring)
            | u8::from(self.two_threads) << 1
            | u8::from(self.persistent) << 2
            | u8::from(self.small_budget) << 3
            | u8::from(self.page_aligned) << 4
            | u8::from(self.direct) << 5
            | u8::from(self.truncated) << 6
            | u8::from(self.big_disk) << 7;
        let d = u8::from(self.read_only)
            | u8::from(self.discard) << 1
            | u8::from(self.barrier) << 2
            | u8::from(self.flush) << 3;
        out.extend([abi, o, d]);
        out.extend(self.max_indirect_segments.to_le_bytes());
        out.push(self.capacity);
    }

    /// The disk's sectors, as the queue is told.
    fn disk_sectors(&self) -> u64 {
        if self.big_disk {
            BIG_DISK_SECTORS
        } else {
            DISK_SECTORS
        }
    }

    /// The sectors of the disk's file (fewer if truncated).
    fn file_sectors(&self) -> u64 {
        match (self.big_disk, self.truncated) {
            (false, false) => DISK_SECTORS,
            (false, true) => FILE_SECTORS,
            (true, false) => BIG_DISK_SECTORS,
            (true, true) => BIG_FILE_SECTORS,
        }
    }

    fn limits(&self) -> DiskLimits {
        DiskLimits {
            sectors: self.disk_sectors(),
            read_only: self.read_only,
            discard: self.discard,
            barrier: self.barrier,
            flush: self.flush,
            max_indirect_segments: self.max_indirect_segments,
        }
    }
}

/// A segment as the input gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    /// The grant: `% 32` (0..20 read-write, 20..24 read-only, the rest not granted), 255 for `u32::MAX`.
    pub gref: u8,
    /// `first_sect`, `% 9` (8 is invalid).
    pub first: u8,
    /// `last_sect`, `% 9`.
    pub last: u8,
}

impl Seg {
    fn decode(input: &mut Input<'_>) -> Seg {
        Seg { gref: input.u8(), first: input.u8(), last: input.u8() }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend([self.gref, self.first, self.last]);
    }

    fn raw(&self) -> BlkifRequestSegment {
        let (first_sect, last_sect) = (self.first % 9, self.last % 9);
        BlkifRequestSegment { gref: gref_of(self.gref).into(), first_sect, last_sect, _pad: [0; 2] }
    }
}

/// A grant reference as the input gives it: `% 32`, 255 for `u32::MAX`.
fn gref_of(b: u8) -> u32 {
    if b == 0xff {
        u32::MAX
    } else {
        u32::from(b % 32)
    }
}

/// A sector as the input gives it: below 240 itself (the disk has 128),
/// above counting down from `u64::MAX`.
fn sector_of(b: u8) -> u64 {
    if b < 0xf0 {
        u64::from(b)
    } else {
        u64::MAX - u64::from(b - 0xf0)
    }
}

/// The direct segments an `Rw` op writes for its `nr`.
fn direct_segments(nr: u8) -> usize {
    usize::from(nr % 13).min(BLKIF_MAX_SEGMENTS_PER_REQUEST)
}

/// One step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A slot of these bytes (zero-padded or cut to the slot size).
    Raw {
        /// The bytes (at most 255).
        bytes: Vec<u8>,
    },
    /// A read, write, barrier or flush (`op % 4`).
    Rw {
        /// Which.
        op: u8,
        /// `nr_segments`, `% 13`.
        nr: u8,
        /// The sector: below 240 itself (the disk has 128 or 512), above `u64::MAX` counting down.
        sector: u8,
        /// The segments written in the slot: `min(nr % 13, 11)`.
        segs: Vec<Seg>,
    },
    /// An indirect request, its segment descriptors first written into its pages.
    Indirect {
        /// `indirect_op`: below 192 `% 2` (read or write), else itself.
        inner: u8,
        /// `nr_segments`, `% 1030`.
        nr: u16,
        /// The sector: below 240 itself (the disk has 128 or 512), above `u64::MAX` counting down.
        sector: u8,
        /// `indirect_grefs` (at most 8; as [`Seg::gref`]).
        pages: Vec<u8>,
        /// Descriptors written, repeated to `nr_segments` (at most 32; none: the pages are left as they are).
        segs: Vec<Seg>,
    },
    /// A discard.
    Discard {
        /// `flag` (bit 0: secure).
        flag: u8,
        /// The sector: below 240 itself (the disk has 128 or 512), above `u64::MAX` counting down.
        sector: u8,
        /// `nr_sectors` (255: `u64::MAX`).
        count: u8,
    },
    /// `count % 64 + 1` copies of a request (raw, rw, indirect or discard).
    Burst {
        /// How many.
        count: u8,
        /// Which.
        op: Box<Op>,
    },
    /// One poll (and what the queue can take from the ring after it).
    Poll,
    /// Polls until nothing is pending.
    Drain,
    /// Sleeps `4 * micros` microseconds, then polls.
    Sleep {
        /// A quarter of the microseconds.
        micros: u8,
    },
    /// The guest writes into one of its pages (`gref % 24`).
    Poke {
        /// The page.
        gref: u8,
        /// Where, `% 4096`.
        offset: u16,
        /// The bytes (at most 255, cut at the page's end).
        bytes: Vec<u8>,
    },
    /// The next `1 + (what >> 1) % 4` grant copy calls (bit 0 clear) or map calls (set) fail.
    Fault {
        /// Which and how many.
        what: u8,
    },
    /// The neighbour holds `units % 16` times 64 KiB of the daemon's budget (or waits for it).
    Neighbour {
        /// How much.
        units: u8,
    },
    /// Write, discard and read back on a quiet queue.
    Check(Check),
}

/// A write of good grants, a discard of part of it, reads of all of it back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// The write (`% 4`): plain, barrier, flush with data, indirect (plain where not offered).
    pub write_op: u8,
    /// The reads: bit 0 indirect (where offered), the rest their segments per request.
    pub read_op: u8,
    /// First sector, `% 128`.
    pub sector: u8,
    /// The guest's data pattern, and the write's first page.
    pub fill: u8,
    /// A discard of part of the range, where offered (0: none): low nibble offset, high nibble length.
    pub discard: u8,
    /// The write's segments: per byte, bits 0-2 `first_sect`, the rest the sectors.
    pub write_shape: Vec<u8>,
    /// The reads' segments: per byte, bits 0-1 sectors skipped in the pages, the rest the sectors.
    pub read_shape: Vec<u8>,
}

const OPS: u8 = 12;

/// A length byte (`% (max + 1)`), then that many bytes.
fn bytes_of(input: &mut Input<'_>, max: u8) -> Vec<u8> {
    let n = usize::from(input.u8()) % (usize::from(max) + 1);
    input.bytes(n).to_vec()
}

fn push_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.push(u8::try_from(b.len()).expect("at most 255 bytes"));
    out.extend(b);
}

impl Op {
    /// Decodes one op.
    pub fn decode(input: &mut Input<'_>) -> Op {
        match input.u8() % OPS {
            k @ 0..=3 => Op::decode_request(k, input),
            4 => {
                let count = input.u8();
                let k = input.u8() % 4;
                Op::Burst { count, op: Box::new(Op::decode_request(k, input)) }
            }
            5 => Op::Poll,
            6 => Op::Drain,
            7 => Op::Sleep { micros: input.u8() },
            8 => Op::Poke { gref: input.u8(), offset: input.u16(), bytes: bytes_of(input, 255) },
            9 => Op::Fault { what: input.u8() },
            10 => Op::Neighbour { units: input.u8() },
            _ => Op::Check(Check {
                write_op: input.u8(),
                read_op: input.u8(),
                sector: input.u8(),
                fill: input.u8(),
                discard: input.u8(),
                write_shape: bytes_of(input, 255),
                read_shape: bytes_of(input, 255),
            }),
        }
    }

    fn decode_request(kind: u8, input: &mut Input<'_>) -> Op {
        match kind {
            0 => Op::Raw { bytes: bytes_of(input, 255) },
            1 => {
                let (op, nr, sector) = (input.u8(), input.u8(), input.u8());
                let segs = (0..direct_segments(nr)).map(|_| Seg::decode(input)).collect();
                Op::Rw { op, nr, sector, segs }
            }
            2 => {
                let (inner, nr, sector) = (input.u8(), input.u16(), input.u8());
                let pages = bytes_of(input, 8);
                let n = input.u8() % 33;
                let segs = (0..n).map(|_| Seg::decode(input)).collect();
                Op::Indirect { inner, nr, sector, pages, segs }
            }
            _ => Op::Discard { flag: input.u8(), sector: input.u8(), count: input.u8() },
        }
    }

    /// Appends its encoding.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Op::Raw { .. } | Op::Rw { .. } | Op::Indirect { .. } | Op::Discard { .. } => self.encode_request(out),
            Op::Burst { count, op } => {
                out.extend([4, *count]);
                op.encode_request(out);
            }
            Op::Poll => out.push(5),
            Op::Drain => out.push(6),
            Op::Sleep { micros } => out.extend([7, *micros]),
            Op::Poke { gref, offset, bytes } => {
                out.extend([8, *gref]);
                out.extend(offset.to_le_bytes());
                push_bytes(out, bytes);
            }
            Op::Fault { what } => out.extend([9, *what]),
            Op::Neighbour { units } => out.extend([10, *units]),
            Op::Check(c) => {
                out.extend([11, c.write_op, c.read_op, c.sector, c.fill, c.discard]);
                push_bytes(out, &c.write_shape);
                push_bytes(out, &c.read_shape);
            }
        }
    }

    /// A request's encoding: its kind (0..=3, also its op's tag) then its fields.
    fn encode_request(&self, out: &mut Vec<u8>) {
        let kind = match self {
            Op::Raw { .. } => 0,
            Op::Rw { .. } => 1,
            Op::Indirect { .. } => 2,
            Op::Discard { .. } => 3,
            _ => panic!("not a request: {self:?}"),
        };
        out.push(kind);
        match self {
            Op::Raw { bytes } => push_bytes(out, bytes),
            Op::Rw { op, nr, sector, segs } => {
                assert_eq!(segs.len(), direct_segments(*nr), "segments for nr {nr}");
                out.extend([*op, *nr, *sector]);
                segs.iter().for_each(|s| s.encode(out));
            }
            Op::Indirect { inner, nr, sector, pages, segs } => {
                assert!(pages.len() <= 8 && segs.len() <= 32);
                out.push(*inner);
                out.extend(nr.to_le_bytes());
                out.push(*sector);
                push_bytes(out, pages);
                out.push(segs.len() as u8);
                segs.iter().for_each(|s| s.encode(out));
            }
            Op::Discard { flag, sector, count } => out.extend([*flag, *sector, *count]),
            _ => unreachable!(),
        }
    }
}

/// A decoded input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scenario {
    /// The queue and its disk.
    pub setup: Setup,
    /// The steps.
    pub ops: Vec<Op>,
}

impl Scenario {
    /// Decodes an input (every byte string decodes to some scenario).
    pub fn decode(data: &[u8]) -> Scenario {
        let mut input = Input::new(data);
        let setup = Setup::decode(&mut input);
        let mut ops = Vec::new();
        while !input.is_empty() {
            ops.push(Op::decode(&mut input));
        }
        Scenario { setup, ops }
    }

    /// Encodes it.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.setup.encode(&mut out);
        for op in &self.ops {
            op.encode(&mut out);
        }
        out
    }
}

/// What a run reached, for the tests of the seeds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    /// The queue's counters at the end.
    pub stats: QueueStats,
    /// Its persistent grants' counters.
    pub persistent: Option<PersistentStats>,
    /// Checks run to the end.
    pub checks: u32,
    /// Requests taken.
    pub requests: u32,
    /// Requests that waited in the ring because the queue could not take them.
    pub ring_waits: u32,
    /// Grant copy calls failed as a whole.
    pub copy_faults: u64,
    /// io_uring was used.
    pub io_uring: bool,
}

/// The harness.
pub fn run(data: &[u8]) {
    run_scenario(&Scenario::decode(data));
}

fn seg(gref: u8, first: u8, last: u8) -> Seg {
    Seg { gref, first, last }
}

fn rw(op: u8, sector: u8, segs: Vec<Seg>) -> Op {
    Op::Rw { op, nr: segs.len() as u8, sector, segs }
}

/// A read (`op` 0) or write (1) of 11 whole pages from `first`.
fn big(op: u8, sector: u8, first: u8) -> Op {
    rw(op, sector, (0..11).map(|i| seg((first + i) % 16, 0, 7)).collect())
}

fn check(write_op: u8, read_op: u8, sector: u8, fill: u8, discard: u8, write_shape: &[u8], read_shape: &[u8]) -> Op {
    Op::Check(Check {
        write_op,
        read_op,
        sector,
        fill,
        discard,
        write_shape: write_shape.to_vec(),
        read_shape: read_shape.to_vec(),
    })
}

/// Every operation offered, 64 indirect segments, no persistent grants.
fn setup(abi: Protocol) -> Setup {
    Setup {
        abi,
        io_uring: false,
        two_threads: true,
        persistent: false,
        small_budget: false,
        page_aligned: false,
        direct: false,
        truncated: false,
        big_disk: false,
        read_only: false,
        discard: true,
        barrier: true,
        flush: true,
        max_indirect_segments: 64,
        capacity: 0,
    }
}

/// Seed inputs.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let sc = |setup: Setup, ops: Vec<Op>| Scenario { setup, ops }.encode();
    let whole: Vec<u8> = vec![0xf8; 16];
    let odd = [0x02, 0x29, 0x15, 0x3b, 0x07, 0xf0, 0x11];
    let mixed = vec![
        rw(1, 0, vec![seg(1, 0, 7), seg(2, 2, 5)]),
        rw(2, 8, vec![seg(3, 0, 7)]),
        rw(0, 0, vec![seg(4, 0, 7), seg(5, 0, 3)]),
        rw(3, 0, vec![]),
        Op::Indirect { inner: 1, nr: 20, sector: 16, pages: vec![16], segs: vec![seg(6, 0, 7), seg(7, 1, 1)] },
        Op::Discard { flag: 1, sector: 4, count: 8 },
        Op::Poll,
        rw(3, 24, vec![seg(8, 0, 7)]),
        Op::Indirect { inner: 0, nr: 20, sector: 16, pages: vec![17], segs: vec![seg(9, 0, 7)] },
        Op::Sleep { micros: 100 },
        Op::Drain,
    ];
    let mut out = vec![
        ("native-write-read", sc(setup(Protocol::Native), vec![check(0, 0, 0, 1, 0, &whole, &[])])),
        (
            "x86_32-barrier-write-indirect-reads",
            sc(setup(Protocol::X86_32), vec![check(1, 0x0b, 5, 2, 0x31, &odd, &[0x01, 0x06, 0x13, 0x0e])]),
        ),
        (
            "x86_64-indirect-write-flush-write",
            sc(
                setup(Protocol::X86_64),
                vec![check(3, 0x14, 100, 3, 0, &[0xf8; 40], &[]), check(2, 0, 60, 4, 0, &odd, &odd)],
            ),
        ),
        ("native-mixed", sc(setup(Protocol::Native), mixed.clone())),
        ("x86_32-mixed", sc(setup(Protocol::X86_32), mixed.clone())),
        (
            "bad-grants",
            sc(
                setup(Protocol::X86_64),
                vec![
                    rw(1, 0, vec![seg(1, 0, 7), seg(30, 0, 7)]),
                    rw(1, 8, vec![seg(21, 0, 7)]),
                    rw(0, 0, vec![seg(2, 0, 7), seg(22, 0, 7)]),
                    Op::Drain,
                    rw(0, 0, vec![seg(255, 0, 7)]),
                    rw(0, 0, vec![seg(3, 0, 7)]),
                    Op::Indirect { inner: 0, nr: 4, sector: 0, pages: vec![28], segs: vec![] },
                    Op::Drain,
                ],
            ),
        ),
        (
            "malformed",
            sc(
                setup(Protocol::Native),
                vec![
                    rw(0, 0, vec![seg(1, 5, 3)]),
                    rw(1, 127, vec![seg(1, 0, 7)]),
                    rw(2, 0xf3, vec![seg(1, 0, 7)]),
                    Op::Rw { op: 0, nr: 12, sector: 0, segs: (0..11).map(|i| seg(i, 0, 7)).collect() },
                    Op::Indirect { inner: 0xc5, nr: 3, sector: 0, pages: vec![16], segs: vec![seg(1, 0, 7)] },
                    Op::Indirect { inner: 1, nr: 600, sector: 0, pages: vec![16, 17], segs: vec![seg(1, 0, 0)] },
                    Op::Discard { flag: 0, sector: 120, count: 0xff },
                    Op::Raw { bytes: vec![4, 1, 0, 0, 0, 0, 0, 0] },
                    Op::Raw { bytes: vec![0xff; 40] },
                    Op::Drain,
                ],
            ),
        ),
    ];
    let mut small = setup(Protocol::Native);
    small.small_budget = true;
    out.push((
        "budget-parks-the-ring",
        sc(
            small.clone(),
            vec![
                Op::Burst { count: 29, op: Box::new(big(1, 0, 0)) },
                Op::Burst { count: 29, op: Box::new(big(0, 40, 3)) },
                Op::Poll,
                Op::Sleep { micros: 50 },
                Op::Drain,
            ],
        ),
    ));
    out.push((
        "neighbour-holds-the-daemon",
        sc(
            small.clone(),
            vec![
                Op::Neighbour { units: 15 },
                Op::Burst { count: 9, op: Box::new(big(0, 0, 0)) },
                Op::Poll,
                Op::Neighbour { units: 0 },
                Op::Burst { count: 9, op: Box::new(big(1, 8, 2)) },
                Op::Drain,
            ],
        ),
    ));
    // Requests over the queue's 64 KiB parts, cut into parts: a 128 KiB
    // read, an 80 KiB write, a read whose 9th page is not granted (a part
    // fails, the parts not started are dropped), and a burst of them on
    // the smallest budget, with persistent grants.
    let mut big_disk = setup(Protocol::X86_64);
    big_disk.big_disk = true;
    let split = |inner: u8, nr: u16, sector: u8, page: u8, segs: Vec<Seg>| Op::Indirect {
        inner,
        nr,
        sector,
        pages: vec![page],
        segs,
    };
    let mut holey: Vec<Seg> = (1..9).map(|g| seg(g, 0, 7)).collect();
    holey.push(seg(30, 0, 7));
    let split_ops = vec![
        split(0, 32, 0, 16, vec![seg(1, 0, 7)]),
        split(1, 20, 64, 17, vec![seg(2, 0, 7), seg(3, 0, 7)]),
        Op::Poll,
        split(0, 20, 64, 18, vec![seg(4, 0, 7)]),
        split(0, 24, 8, 19, holey),
        Op::Drain,
        check(3, 1, 10, 5, 0x21, &[0xf8; 24], &[0x3c; 12]),
    ];
    out.push(("big-disk-split-requests", sc(big_disk.clone(), split_ops)));
    let mut small_persistent = big_disk;
    small_persistent.small_budget = true;
    small_persistent.persistent = true;
    small_persistent.capacity = 16;
    out.push((
        "big-disk-split-requests-small-budget-persistent",
        sc(
            small_persistent,
            vec![
                Op::Burst { count: 12, op: Box::new(split(0, 32, 0, 16, vec![seg(1, 0, 7), seg(2, 0, 7)])) },
                Op::Burst { count: 6, op: Box::new(split(1, 18, 100, 17, vec![seg(3, 0, 7)])) },
                Op::Sleep { micros: 100 },
                Op::Drain,
            ],
        ),
    ));
    out.push((
        "big-reads-cut-per-poll",
        sc(
            setup(Protocol::X86_64),
            vec![Op::Burst { count: 11, op: Box::new(big(0, 0, 0)) }, Op::Sleep { micros: 250 }, Op::Poll, Op::Poll],
        ),
    ));
    out.push((
        "copy-faults",
        sc(
            setup(Protocol::Native),
            vec![
                Op::Fault { what: 2 },
                Op::Burst { count: 3, op: Box::new(rw(1, 0, vec![seg(1, 0, 7)])) },
                Op::Poll,
                rw(2, 0, vec![seg(2, 0, 7)]),
                Op::Indirect { inner: 1, nr: 2, sector: 0, pages: vec![16], segs: vec![seg(3, 0, 7)] },
                Op::Drain,
                check(0, 0, 0, 5, 0, &[], &[]),
            ],
        ),
    ));
    let mut persistent = setup(Protocol::Native);
    persistent.persistent = true;
    persistent.capacity = 4;
    out.push((
        "persistent-kept-and-transient",
        sc(
            persistent.clone(),
            vec![
                rw(1, 0, vec![seg(1, 0, 7), seg(21, 0, 7)]),
                rw(0, 8, vec![seg(2, 0, 7), seg(22, 0, 7)]),
                Op::Fault { what: 1 },
                rw(0, 16, vec![seg(3, 0, 7)]),
                Op::Drain,
                check(0, 0, 0, 6, 0, &whole, &[]),
                check(3, 0x15, 7, 7, 0x52, &odd, &[0x05, 0x0a, 0x1f]),
            ],
        ),
    ));
    let mut aligned = persistent.clone();
    aligned.abi = Protocol::X86_32;
    aligned.page_aligned = true;
    aligned.capacity = 32;
    out.push((
        "persistent-pages-x86_32",
        sc(aligned, vec![check(0, 0, 0, 8, 0, &whole, &[]), check(0, 1, 3, 9, 0, &odd, &odd)]),
    ));
    let mut uring = persistent.clone();
    uring.io_uring = true;
    uring.abi = Protocol::X86_64;
    out.push((
        "io_uring-persistent",
        sc(uring.clone(), mixed.iter().cloned().chain([check(0, 1, 9, 10, 0x23, &whole, &odd)]).collect()),
    ));
    uring.persistent = false;
    uring.direct = true;
    out.push((
        "io_uring-direct",
        sc(uring, vec![check(3, 0x08, 0, 11, 0x40, &odd, &[]), Op::Burst { count: 15, op: Box::new(big(0, 0, 0)) }]),
    ));
    let mut direct = setup(Protocol::Native);
    direct.direct = true;
    direct.persistent = true;
    direct.capacity = 8;
    out.push(("threads-direct-persistent", sc(direct, vec![check(1, 0, 64, 12, 0, &whole, &odd)])));
    out.push((
        "indirect-page-rewritten",
        sc(
            setup(Protocol::X86_64),
            vec![
                rw(2, 0, vec![seg(1, 0, 7)]),
                Op::Indirect { inner: 1, nr: 8, sector: 0, pages: vec![17], segs: vec![seg(2, 0, 7)] },
                Op::Poke { gref: 17, offset: 4, bytes: vec![7, 0] },
                Op::Drain,
            ],
        ),
    ));
    let mut read_only = setup(Protocol::X86_32);
    read_only.read_only = true;
    read_only.max_indirect_segments = 0;
    out.push((
        "read-only-disk",
        sc(
            read_only,
            vec![
                rw(1, 0, vec![seg(1, 0, 7)]),
                rw(0, 0, vec![seg(2, 0, 7)]),
                Op::Discard { flag: 0, sector: 0, count: 8 },
                Op::Indirect { inner: 0, nr: 1, sector: 0, pages: vec![16], segs: vec![seg(1, 0, 7)] },
                Op::Drain,
            ],
        ),
    ));
    // Reads and writes across the end of a file shorter than the disk
    // (copied and mapped), a check before it.
    let mut truncated = setup(Protocol::X86_64);
    truncated.truncated = true;
    truncated.persistent = true;
    truncated.capacity = 8;
    let across = |op| rw(op, 92, vec![seg(1, 0, 3), seg(2, 0, 7)]);
    let mut uring = truncated.clone();
    uring.io_uring = true;
    for (name, setup) in [("truncated-file", truncated), ("truncated-file-io_uring", uring)] {
        out.push((
            name,
            sc(
                setup,
                vec![
                    across(0),
                    rw(0, 92, vec![seg(3, 1, 3), seg(4, 0, 7)]),
                    Op::Drain,
                    across(1),
                    Op::Discard { flag: 0, sector: 90, count: 20 },
                    Op::Drain,
                    across(0),
                    check(0, 0, 40, 13, 0, &odd, &odd),
                ],
            ),
        ));
    }
    out.push((
        "barriers-among-reads-and-writes",
        sc(
            setup(Protocol::X86_32),
            vec![
                Op::Burst { count: 5, op: Box::new(big(0, 0, 0)) },
                rw(2, 0, vec![seg(1, 0, 7), seg(2, 0, 7)]),
                Op::Burst { count: 3, op: Box::new(rw(1, 16, vec![seg(3, 0, 7)])) },
                rw(2, 8, vec![seg(4, 0, 7)]),
                Op::Discard { flag: 0, sector: 0, count: 16 },
                rw(3, 0, vec![]),
                Op::Poll,
                rw(2, 24, vec![seg(5, 0, 7)]),
                Op::Drain,
            ],
        ),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(name: &str) -> Scenario {
        let (_, bytes) = seeds().into_iter().find(|(n, _)| *n == name).expect("a seed of that name");
        Scenario::decode(&bytes)
    }

    #[test]
    fn scenarios_round_trip_through_their_encoding() {
        for (name, bytes) in seeds() {
            assert_eq!(Scenario::decode(&bytes).encode(), bytes, "{name}");
        }
    }

    #[test]
    fn checks_run_on_every_abi() {
        for name in ["native-write-read", "x86_32-barrier-write-indirect-reads", "x86_64-indirect-write-flush-write"] {
            let s = run_scenario(&seed(name));
            assert!(s.checks > 0, "{name}: {s:?}");
        }
    }

    #[test]
    fn the_budget_seeds_park_requests() {
        let s = run_scenario(&seed("budget-parks-the-ring"));
        assert!(s.stats.budget_waits > 0 && s.ring_waits > 0, "{s:?}");
        let s = run_scenario(&seed("neighbour-holds-the-daemon"));
        assert!(s.stats.budget_waits > 0, "{s:?}");
    }

    /// Requests over 64 KiB are cut into parts and answered once each: the
    /// 128 KiB read, the 80 KiB write and the 80 KiB read succeed, the read
    /// with an ungranted page fails.
    #[test]
    fn requests_over_a_part_are_split_and_answered_once() {
        let s = run_scenario(&seed("big-disk-split-requests"));
        assert!(s.stats.failed >= 1, "{s:?}");
        assert!(s.stats.bytes_read >= (128 + 80) << 10 && s.stats.bytes_written >= 80 << 10, "{s:?}");
        let s = run_scenario(&seed("big-disk-split-requests-small-budget-persistent"));
        assert!(s.stats.failed == 0 && s.stats.bytes_read >= 12 * (128 << 10), "{s:?}");
    }

    #[test]
    fn bad_grants_fail_and_are_caught_before_io() {
        let s = run_scenario(&seed("bad-grants"));
        assert!(s.stats.failed == 4 && s.stats.bad_grants_caught > 0, "{s:?}");
    }

    #[test]
    fn reads_beyond_a_truncated_file_fail() {
        for name in ["truncated-file", "truncated-file-io_uring"] {
            let s = run_scenario(&seed(name));
            assert!(s.stats.failed > 0 && s.checks == 1, "{name}: {s:?}");
        }
    }

    #[test]
    fn copy_faults_fire() {
        assert!(run_scenario(&seed("copy-faults")).copy_faults > 0);
    }

    #[test]
    fn persistent_grants_are_kept_mapped_for_one_request_and_hit() {
        let s = run_scenario(&seed("persistent-kept-and-transient"));
        let p = s.persistent.expect("persistent grants on the thread pool");
        assert!(p.kept > 0 && p.transient > 0 && p.hits > 0 && p.refused > 0, "{p:?}");
        assert_eq!(s.checks, 2);
    }

    #[test]
    fn io_uring_seeds_use_it_where_the_kernel_has_it() {
        let s = run_scenario(&seed("io_uring-persistent"));
        assert_eq!(s.io_uring, driver::io_uring_works());
        if s.io_uring {
            assert!(s.persistent.is_some_and(|p| p.kept > 0), "{s:?}");
        }
    }

    #[test]
    fn harness_accepts_empty_and_garbage_inputs() {
        run(&[]);
        run(&[0xff; 300]);
        run(&(0..=255u8).cycle().take(4000).collect::<Vec<_>>());
    }
}
