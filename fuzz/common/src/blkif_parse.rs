//! Target `blkif_parse`: [`blkif::parse`] of a guest's ring slot in each of
//! the three layouts against arbitrary [`DiskLimits`], then
//! [`blkif::parse_indirect_segments`] on arbitrary indirect page contents.
//!
//! Properties: no panic. On `Ok`: the fields are the slot's bytes at the
//! layout's offsets; every segment has `first_sect <= last_sect <= 7`; 1..=11
//! direct segments (0 only for `FLUSH_DISKCACHE`); the sectors are within the
//! disk (a flush without data has no range, whatever its sector); no write,
//! barrier or discard on a read-only disk; unoffered features are refused; an indirect request names `ceil(nr / 512)` pages and
//! `nr <= max_indirect_segments`. On `Err`: the response carries the id at
//! the layout's offset (8, or 4 for x86_32), the operation byte (an indirect
//! request's inner operation, as Linux's blkfront requires), and status
//! `Error` or `NotSupported` (the latter exactly for unknown or unoffered
//! operations).
//!
//! Input: the ABI (`% 3`: native, x86_32, x86_64), a flags byte (bit 0
//! read-only, 1 discard, 2 barrier, 3 flush, 4: the indirect pages are parsed
//! with the input's `nr_segments`/`sector` even when the request is an
//! indirect one), the disk size (`u64`), `max_indirect_segments` (`u16`), the
//! slot length (a byte, used up to the slot size), the slot bytes,
//! `nr_segments` (`u16`), `sector` (`u64`), then the indirect page bytes.

use blkif::abi::{
    BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT, BLKIF_OP_READ, BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER, BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, SEGS_PER_INDIRECT_FRAME,
};
use blkif::{
    parse, parse_indirect_segments, Direction, DiskLimits, Fault, Layout, RequestKind, Response, Segment, Status,
};
use xen_bus::Protocol;

use crate::input::Input;

/// One decoded input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    /// The ring layout.
    pub abi: Protocol,
    /// The disk.
    pub disk: DiskLimits,
    /// Parse the pages with `nr_segments`/`sector` below even for an indirect request.
    pub own_indirect: bool,
    /// The slot's bytes (at most 255; `parse` zero-pads or ignores the rest).
    pub slot: Vec<u8>,
    /// `nr_segments` for `parse_indirect_segments`.
    pub nr_segments: u16,
    /// `sector` for `parse_indirect_segments`.
    pub sector: u64,
    /// The indirect pages' contents.
    pub pages: Vec<u8>,
}

fn u64_of(input: &mut Input<'_>) -> u64 {
    u64::from(input.u32()) | u64::from(input.u32()) << 32
}

impl Case {
    /// Decodes an input (every byte string decodes to some case).
    pub fn decode(data: &[u8]) -> Case {
        let mut input = Input::new(data);
        let abi = [Protocol::Native, Protocol::X86_32, Protocol::X86_64][usize::from(input.u8() % 3)];
        let flags = input.u8();
        let sectors = u64_of(&mut input);
        let max_indirect_segments = input.u16();
        let disk = DiskLimits {
            sectors,
            read_only: flags & 1 != 0,
            discard: flags & 2 != 0,
            barrier: flags & 4 != 0,
            flush: flags & 8 != 0,
            max_indirect_segments,
        };
        let slot_len = usize::from(input.u8());
        let slot = input.bytes(slot_len).to_vec();
        let nr_segments = input.u16();
        let sector = u64_of(&mut input);
        let pages = input.rest().to_vec();
        Case { abi, disk, own_indirect: flags & 16 != 0, slot, nr_segments, sector, pages }
    }

    /// Encodes it as an input.
    pub fn encode(&self) -> Vec<u8> {
        let d = &self.disk;
        let abi = match self.abi {
            Protocol::Native => 0,
            Protocol::X86_32 => 1,
            // `arm-abi` is never decoded; its layout is x86_64's.
            Protocol::X86_64 | Protocol::Arm => 2,
        };
        let flags = u8::from(d.read_only)
            | u8::from(d.discard) << 1
            | u8::from(d.barrier) << 2
            | u8::from(d.flush) << 3
            | u8::from(self.own_indirect) << 4;
        let mut out = vec![abi, flags];
        out.extend(d.sectors.to_le_bytes());
        out.extend(d.max_indirect_segments.to_le_bytes());
        out.push(u8::try_from(self.slot.len()).expect("slot of at most 255 bytes"));
        out.extend(&self.slot);
        out.extend(self.nr_segments.to_le_bytes());
        out.extend(self.sector.to_le_bytes());
        out.extend(&self.pages);
        out
    }
}

/// Little-endian field of the zero-padded slot.
fn field(slot: &[u8], at: usize, len: usize) -> u64 {
    (0..len).map(|i| u64::from(slot.get(at + i).copied().unwrap_or(0)) << (8 * i)).sum()
}

fn check_segment(seg: &Segment, raw: &[u8], at: usize) {
    assert!(seg.first_sect <= seg.last_sect && seg.last_sect <= 7, "bad segment accepted: {seg:?}");
    assert_eq!(seg.len(), seg.sectors() as usize * 512);
    assert!(usize::from(seg.page_offset()) + seg.len() <= 4096, "{seg:?} leaves its page");
    assert_eq!(u64::from(seg.gref.0), field(raw, at, 4), "gref not from the segment's bytes");
    assert_eq!(u64::from(seg.first_sect), field(raw, at + 4, 1));
    assert_eq!(u64::from(seg.last_sect), field(raw, at + 5, 1));
}

/// Whether the raw segment at `at` is invalid.
fn bad_segment(raw: &[u8], at: usize) -> bool {
    let (first, last) = (field(raw, at + 4, 1), field(raw, at + 5, 1));
    last > 7 || first > last
}

/// The response as the layout puts it in a slot: `id`, `operation`, zero
/// padding, `status` (`blkif_response`, or `blkif_x86_32_response` packed
/// to 12 bytes).
fn check_response(layout: Layout, rsp: &Response) {
    let size = if layout == Layout::Narrow { 12 } else { 16 };
    assert_eq!(layout.response_size(), size);
    let mut out = vec![0xa5; size];
    layout.encode_response(rsp, &mut out);
    assert_eq!(field(&out, 0, 8), rsp.id);
    assert_eq!((out[8], out[9]), (rsp.operation, 0));
    let code = i16::from_le_bytes([out[10], out[11]]);
    let want = match rsp.status {
        Status::Okay => BLKIF_RSP_OKAY,
        Status::Error => BLKIF_RSP_ERROR,
        Status::NotSupported => BLKIF_RSP_EOPNOTSUPP,
    };
    assert_eq!((code, rsp.status.code()), (want, want));
    assert!(out[12..].iter().all(|&b| b == 0), "padding not zero: {out:?}");
}

fn in_range(sector: u64, count: u64, disk: &DiskLimits) -> bool {
    sector.checked_add(count).is_some_and(|end| end <= disk.sectors)
}

/// The harness.
pub fn run(data: &[u8]) {
    let case = Case::decode(data);
    let disk = &case.disk;
    let wide = case.abi != Protocol::X86_32;
    let slot_size = Layout::from(case.abi).slot_size();
    let slot = &case.slot[..case.slot.len().min(slot_size)];
    // Offsets of the layout: id, sector, direct segments, discard's nr_sectors, indirect grefs.
    let (id_at, sector_at, seg_at, grefs_at) = if wide { (8, 16, 24, 28) } else { (4, 12, 20, 24) };
    let op = field(slot, 0, 1) as u8;
    // The operation a response echoes: an indirect request's inner one (byte
    // 1 in every layout), as Linux's blkfront requires.
    let echo = if op == BLKIF_OP_INDIRECT { field(slot, 1, 1) as u8 } else { op };
    let id = field(slot, id_at, 8);
    let sector = field(slot, sector_at, 8);

    let mut indirect = None;
    match parse(case.abi, slot, disk) {
        Ok(req) => {
            assert_eq!(req.id, id, "id not from offset {id_at}");
            assert_eq!(req.operation, echo, "operation {op} echoed wrongly");
            check_response(Layout::from(case.abi), &Response { id, operation: echo, status: Status::Okay });
            match &req.kind {
                RequestKind::Data { direction, sector: s, segments, barrier, flush } => {
                    assert!(
                        [BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_FLUSH_DISKCACHE].contains(&op),
                        "data request from operation {op}"
                    );
                    assert_eq!(*s, sector);
                    assert_eq!(segments.len() as u64, field(slot, 1, 1), "segment count not nr_segments");
                    let min = usize::from(op == BLKIF_OP_FLUSH_DISKCACHE);
                    assert!((1 - min..=11).contains(&segments.len()), "{} segments for op {op}", segments.len());
                    for (i, seg) in segments.iter().enumerate() {
                        check_segment(seg, slot, seg_at + 8 * i);
                    }
                    assert_eq!(*direction == Direction::Read, op == BLKIF_OP_READ);
                    assert_eq!(*barrier, op == BLKIF_OP_WRITE_BARRIER);
                    assert_eq!(*flush, op == BLKIF_OP_WRITE_BARRIER || op == BLKIF_OP_FLUSH_DISKCACHE);
                    assert!(!(*barrier && !disk.barrier), "barrier not offered");
                    assert!(!(op == BLKIF_OP_FLUSH_DISKCACHE && !disk.flush), "flush not offered");
                    assert!(!(*direction == Direction::Write && disk.read_only), "write on a read-only disk");
                    let total: u64 = segments.iter().map(Segment::sectors).sum();
                    assert!(
                        segments.is_empty() || in_range(sector, total, disk),
                        "{sector}+{total} beyond {}",
                        disk.sectors
                    );
                }
                RequestKind::Discard { sector: s, nr_sectors, secure } => {
                    assert_eq!(op, BLKIF_OP_DISCARD);
                    assert!(disk.discard && !disk.read_only, "discard not offered or read-only: {disk:?}");
                    assert_eq!(*s, sector);
                    assert_eq!(*nr_sectors, field(slot, sector_at + 8, 8));
                    assert_eq!(*secure, field(slot, 1, 1) & 1 != 0);
                    assert!(in_range(sector, *nr_sectors, disk));
                }
                RequestKind::Indirect { direction, sector: s, nr_segments, pages } => {
                    assert_eq!(op, BLKIF_OP_INDIRECT);
                    let inner = field(slot, 1, 1) as u8;
                    assert!(inner == BLKIF_OP_READ || inner == BLKIF_OP_WRITE, "indirect op {inner}");
                    assert_eq!(*direction == Direction::Read, inner == BLKIF_OP_READ);
                    assert!(!(*direction == Direction::Write && disk.read_only), "indirect write on a read-only disk");
                    assert_eq!(*s, sector);
                    assert_eq!(u64::from(*nr_segments), field(slot, 2, 2));
                    let nr = usize::from(*nr_segments);
                    assert!(nr >= 1 && nr <= usize::from(disk.max_indirect_segments), "nr {nr} vs {disk:?}");
                    assert_eq!(pages.len(), nr.div_ceil(SEGS_PER_INDIRECT_FRAME), "page count for {nr} segments");
                    assert!(pages.len() <= 8);
                    for (i, g) in pages.iter().enumerate() {
                        assert_eq!(u64::from(g.0), field(slot, grefs_at + 4 * i, 4));
                    }
                    assert!(in_range(sector, 1, disk));
                    indirect = Some((*nr_segments, sector));
                }
            }
        }
        Err(e) => {
            assert_eq!(e.id, id, "error id not from offset {id_at}");
            assert_eq!(e.operation, echo, "operation {op} echoed wrongly");
            let rsp = e.response();
            assert_eq!((rsp.id, rsp.operation), (id, echo));
            let unsupported = match op {
                BLKIF_OP_READ | BLKIF_OP_WRITE => false,
                BLKIF_OP_WRITE_BARRIER => !disk.barrier,
                BLKIF_OP_FLUSH_DISKCACHE => !disk.flush,
                BLKIF_OP_DISCARD => !disk.discard,
                BLKIF_OP_INDIRECT => disk.max_indirect_segments == 0,
                _ => true,
            };
            let want = if unsupported { Status::NotSupported } else { Status::Error };
            assert_eq!(rsp.status, want, "{e}");
            check_response(Layout::from(case.abi), &rsp);
        }
    }

    // The indirect pages, with the request's values or the input's.
    let (nr, sector) = match indirect {
        Some(v) if !case.own_indirect => v,
        _ => (case.nr_segments, case.sector),
    };
    let pages = &case.pages;
    let need = usize::from(nr) * 8;
    match parse_indirect_segments(pages, nr, sector, disk) {
        Ok(segs) => {
            assert_eq!(segs.len(), usize::from(nr));
            for (i, seg) in segs.iter().enumerate() {
                check_segment(seg, pages, 8 * i);
            }
            let total: u64 = segs.iter().map(Segment::sectors).sum();
            assert!(in_range(sector, total, disk), "indirect {sector}+{total} beyond {}", disk.sectors);
        }
        Err(Fault::BadSegmentCount { .. }) => assert!(pages.len() < need, "enough pages refused"),
        Err(Fault::BadSegment { .. }) => {
            assert!(pages.len() >= need && (0..usize::from(nr)).any(|i| bad_segment(pages, 8 * i)));
        }
        Err(Fault::OutOfRange { .. }) => {
            assert!(pages.len() >= need && !(0..usize::from(nr)).any(|i| bad_segment(pages, 8 * i)));
            let total: u64 =
                (0..usize::from(nr)).map(|i| field(pages, 8 * i + 5, 1) - field(pages, 8 * i + 4, 1) + 1).sum();
            assert!(!in_range(sector, total, disk), "in-range indirect request refused");
        }
        Err(f) => panic!("unexpected indirect fault {f}"),
    }
}

fn seg(gref: u32, first: u8, last: u8) -> [u8; 8] {
    let mut s = [0u8; 8];
    s[..4].copy_from_slice(&gref.to_le_bytes());
    s[4] = first;
    s[5] = last;
    s
}

/// A slot of `abi`'s layout: `op`, byte 1, `id`, `sector`, then `tail` after the sector.
fn slot(abi: Protocol, op: u8, b1: u8, nr16: Option<u16>, id: u64, sector: u64, tail: &[u8]) -> Vec<u8> {
    let wide = abi != Protocol::X86_32;
    let mut s = vec![0u8; Layout::from(abi).slot_size()];
    s[0] = op;
    s[1] = b1;
    if let Some(n) = nr16 {
        s[2..4].copy_from_slice(&n.to_le_bytes());
    }
    let id_at = if wide { 8 } else { 4 };
    s[id_at..id_at + 8].copy_from_slice(&id.to_le_bytes());
    s[id_at + 8..id_at + 16].copy_from_slice(&sector.to_le_bytes());
    s[id_at + 16..id_at + 16 + tail.len()].copy_from_slice(tail);
    s
}

/// Seeds: reads, writes, flushes, barriers, discards and indirect requests of
/// every layout, valid and faulty (bad segments, out of range, read-only).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let disk = |read_only: bool| DiskLimits {
        sectors: 1 << 20,
        read_only,
        discard: true,
        barrier: true,
        flush: true,
        max_indirect_segments: 256,
    };
    let segs = |n: u32| (0..n).flat_map(|i| seg(100 + i, 0, 7)).collect::<Vec<u8>>();
    let mut indirect_tail = vec![0u8; 4]; // handle, _pad1
    indirect_tail.extend(77u32.to_le_bytes());
    let mut indirect_pages = segs(200);
    indirect_pages.extend(seg(1, 3, 2));
    let case = |abi, d, slot: Vec<u8>, nr_segments, sector, pages: Vec<u8>| {
        Case { abi, disk: d, own_indirect: false, slot, nr_segments, sector, pages }.encode()
    };
    let mut out = Vec::new();
    for abi in [Protocol::Native, Protocol::X86_32, Protocol::X86_64] {
        out.push(case(abi, disk(false), slot(abi, BLKIF_OP_READ, 3, None, 0x1122, 64, &segs(3)), 0, 0, vec![]));
        out.push(case(abi, disk(true), slot(abi, BLKIF_OP_WRITE, 11, None, 7, 8, &segs(11)), 2, 0, segs(2)));
        out.push(case(abi, disk(false), slot(abi, BLKIF_OP_FLUSH_DISKCACHE, 0, None, 9, 0, &[]), 0, 0, vec![]));
        out.push(case(
            abi,
            disk(false),
            slot(abi, BLKIF_OP_WRITE_BARRIER, 1, None, 10, (1 << 20) - 8, &segs(1)),
            0,
            0,
            vec![],
        ));
        out.push(case(
            abi,
            disk(false),
            slot(abi, BLKIF_OP_DISCARD, 1, None, 11, 0, &(1u64 << 20).to_le_bytes()),
            0,
            0,
            vec![],
        ));
        out.push(case(
            abi,
            disk(false),
            slot(abi, BLKIF_OP_INDIRECT, BLKIF_OP_WRITE, Some(201), 12, 4096, &indirect_tail),
            0,
            0,
            indirect_pages.clone(),
        ));
        out.push(case(
            abi,
            disk(false),
            slot(abi, BLKIF_OP_READ, 2, None, 13, 0, &[seg(1, 0, 7), seg(2, 5, 8)].concat()),
            0,
            0,
            vec![],
        ));
    }
    const NAMES: [&str; 21] = [
        "native-read",
        "native-write-read-only",
        "native-flush",
        "native-barrier-at-end",
        "native-discard-whole",
        "native-indirect",
        "native-bad-segment",
        "x86_32-read",
        "x86_32-write-read-only",
        "x86_32-flush",
        "x86_32-barrier-at-end",
        "x86_32-discard-whole",
        "x86_32-indirect",
        "x86_32-bad-segment",
        "x86_64-read",
        "x86_64-write-read-only",
        "x86_64-flush",
        "x86_64-barrier-at-end",
        "x86_64-discard-whole",
        "x86_64-indirect",
        "x86_64-bad-segment",
    ];
    assert_eq!(out.len(), NAMES.len());
    NAMES.into_iter().zip(out).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_round_trip_through_bytes() {
        for (_, bytes) in seeds() {
            assert_eq!(Case::decode(&bytes).encode(), bytes);
        }
    }

    #[test]
    fn seeds_parse_as_intended() {
        let s = seeds();
        let c = Case::decode(&s[0].1);
        assert!(matches!(parse(c.abi, &c.slot, &c.disk), Ok(r) if r.id == 0x1122));
        let c = Case::decode(&s[1].1);
        assert_eq!(parse(c.abi, &c.slot, &c.disk).unwrap_err().fault, Fault::ReadOnly);
        for i in [5, 12, 19] {
            let c = Case::decode(&s[i].1);
            assert!(matches!(
                parse(c.abi, &c.slot, &c.disk).unwrap().kind,
                RequestKind::Indirect { nr_segments: 201, .. }
            ));
        }
    }

    #[test]
    fn harness_accepts_empty_and_garbage_inputs() {
        run(&[]);
        run(&[0xff; 300]);
        run(&[1, 0x1f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 108, 6, 1]);
    }
}
