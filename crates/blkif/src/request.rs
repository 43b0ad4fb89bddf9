//! Pure parsing and checking of blkif requests: bytes copied out of a ring
//! slot become a [`Request`], or a [`RequestError`] that still carries the
//! `id` and `operation` to answer with. Nothing here touches guest memory or
//! storage, so it is fuzzed directly.

use gnttab::GrantRef;
use xen_bus::Protocol;
use zerocopy::FromBytes;

use crate::abi::*;

/// The slot layout of a frontend's [`Protocol`]: `x86_32-abi` packs its
/// structs to 4 bytes (Linux's `#pragma pack(4)`); native (x86_64 here),
/// `x86_64-abi` and `arm-abi` share the 64-bit one (Xen's Arm blkif layouts
/// are x86_64's: checked against `io/blkif.h` compiled for aarch64 in
/// tests/c_headers.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// `x86_32-abi`.
    Narrow,
    /// Native, `x86_64-abi`, `arm-abi`.
    Wide,
}

impl From<Protocol> for Layout {
    fn from(p: Protocol) -> Layout {
        match p {
            Protocol::X86_32 => Layout::Narrow,
            Protocol::Native | Protocol::X86_64 | Protocol::Arm => Layout::Wide,
        }
    }
}

impl Layout {
    /// Size of a ring slot (the request/response union).
    pub fn slot_size(self) -> usize {
        match self {
            Layout::Narrow => SLOT_SIZE_32,
            Layout::Wide => SLOT_SIZE_64,
        }
    }

    /// Size of a response in this layout.
    pub fn response_size(self) -> usize {
        match self {
            Layout::Narrow => core::mem::size_of::<BlkifResponse32>(),
            Layout::Wide => core::mem::size_of::<BlkifResponse64>(),
        }
    }

    /// Encodes a response into `out` (at least [`Layout::response_size`] bytes).
    pub fn encode_response(self, rsp: &Response, out: &mut [u8]) {
        use zerocopy::IntoBytes;
        match self {
            Layout::Narrow => {
                let r = BlkifResponse32 {
                    id: rsp.id.into(),
                    operation: rsp.operation,
                    _pad0: 0,
                    status: rsp.status.code().into(),
                };
                out[..12].copy_from_slice(r.as_bytes());
            }
            Layout::Wide => {
                let r = BlkifResponse64 {
                    id: rsp.id.into(),
                    operation: rsp.operation,
                    _pad0: 0,
                    status: rsp.status.code().into(),
                    _pad1: [0; 4],
                };
                out[..16].copy_from_slice(r.as_bytes());
            }
        }
    }
}

/// One page of a read or write: sectors `first_sect..=last_sect` of a granted page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// The granted page.
    pub gref: GrantRef,
    /// First 512-byte sector in the page.
    pub first_sect: u8,
    /// Last sector in the page, inclusive.
    pub last_sect: u8,
}

impl Segment {
    fn parse(raw: &BlkifRequestSegment) -> Result<Segment, Fault> {
        let seg = Segment { gref: GrantRef(raw.gref.get()), first_sect: raw.first_sect, last_sect: raw.last_sect };
        if seg.last_sect >= SECTORS_PER_PAGE || seg.first_sect > seg.last_sect {
            return Err(Fault::BadSegment { first_sect: seg.first_sect, last_sect: seg.last_sect });
        }
        Ok(seg)
    }

    /// Number of sectors.
    pub fn sectors(&self) -> u64 {
        u64::from(self.last_sect - self.first_sect) + 1
    }

    /// Byte offset in the page.
    pub fn page_offset(&self) -> u16 {
        u16::from(self.first_sect) * SECTOR_SIZE as u16
    }

    /// Bytes covered.
    pub fn len(&self) -> usize {
        self.sectors() as usize * SECTOR_SIZE as usize
    }

    /// Always false: a valid segment covers at least one sector.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Direction of a data transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Disk to guest.
    Read,
    /// Guest to disk.
    Write,
}

/// A parsed request. Data segments of indirect requests are still in guest
/// pages; [`parse_indirect_segments`] reads them once the pages are copied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// `BLKIF_OP_READ` / `BLKIF_OP_WRITE` / `BLKIF_OP_WRITE_BARRIER` /
    /// `BLKIF_OP_FLUSH_DISKCACHE` with their segments in the request.
    Data {
        /// Read or write.
        direction: Direction,
        /// First sector on disk.
        sector: u64,
        /// 0..=11 segments (0 only for a flush).
        segments: Vec<Segment>,
        /// Order: every earlier request completes first, later ones wait (`WRITE_BARRIER`).
        barrier: bool,
        /// Make the data (and every completed write) durable (`FLUSH_DISKCACHE`, `WRITE_BARRIER`).
        flush: bool,
    },
    /// `BLKIF_OP_INDIRECT`: segments in up to 8 granted pages.
    Indirect {
        /// Read or write.
        direction: Direction,
        /// First sector on disk.
        sector: u64,
        /// Number of segments in the indirect pages.
        nr_segments: u16,
        /// The pages holding the segments (just as many as `nr_segments` needs).
        pages: Vec<GrantRef>,
    },
    /// `BLKIF_OP_DISCARD`.
    Discard {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        nr_sectors: u64,
        /// `BLKIF_DISCARD_SECURE` was set.
        secure: bool,
    },
}

/// A request: its id and raw operation (for the response) and what it asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The guest's id, echoed in the response.
    pub id: u64,
    /// The raw `operation` byte, echoed in the response.
    pub operation: u8,
    /// What it asks.
    pub kind: RequestKind,
}

/// A response's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// `BLKIF_RSP_OKAY`.
    Okay,
    /// `BLKIF_RSP_ERROR`.
    Error,
    /// `BLKIF_RSP_EOPNOTSUPP`.
    NotSupported,
}

impl Status {
    /// The wire value.
    pub fn code(self) -> i16 {
        match self {
            Status::Okay => BLKIF_RSP_OKAY,
            Status::Error => BLKIF_RSP_ERROR,
            Status::NotSupported => BLKIF_RSP_EOPNOTSUPP,
        }
    }
}

/// A response, in layout-independent form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    /// The request's id.
    pub id: u64,
    /// The request's operation byte.
    pub operation: u8,
    /// The outcome.
    pub status: Status,
}

/// What is wrong with a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Fault {
    /// An operation blkif.h does not define (or the reserved 4).
    #[error("Unknown operation {0}")]
    UnknownOperation(u8),
    /// An operation the disk does not offer (discard, barrier, ...).
    #[error("Operation {0} not supported by this disk")]
    Unsupported(u8),
    /// `nr_segments` is 0 where data is needed, or above the limit.
    #[error("Bad segment count {count} (max {max})")]
    BadSegmentCount {
        /// Requested.
        count: usize,
        /// Allowed.
        max: usize,
    },
    /// `first_sect`/`last_sect` outside the page or reversed.
    #[error("Bad segment sectors {first_sect}..={last_sect}")]
    BadSegment {
        /// First sector.
        first_sect: u8,
        /// Last sector.
        last_sect: u8,
    },
    /// The indirect request's inner operation is not read or write.
    #[error("Bad indirect operation {0}")]
    BadIndirectOperation(u8),
    /// Sectors beyond the end of the disk (or overflowing).
    #[error("Sectors {sector}+{count} beyond disk end {disk_sectors}")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        count: u64,
        /// Size of the disk in sectors.
        disk_sectors: u64,
    },
    /// A write, barrier or discard to a read-only disk.
    #[error("Write to a read-only disk")]
    ReadOnly,
}

impl Fault {
    /// The status a response to this fault carries.
    pub fn status(&self) -> Status {
        match self {
            Fault::UnknownOperation(_) | Fault::Unsupported(_) => Status::NotSupported,
            _ => Status::Error,
        }
    }
}

/// A request that cannot be served, with what the response needs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("Request {id:#x} (operation {operation}): {fault}")]
pub struct RequestError {
    /// The request's id.
    pub id: u64,
    /// The request's operation byte.
    pub operation: u8,
    /// What is wrong.
    #[source]
    pub fault: Fault,
}

impl RequestError {
    /// The response that answers the faulty request.
    pub fn response(&self) -> Response {
        Response { id: self.id, operation: self.operation, status: self.fault.status() }
    }
}

/// What a disk offers; requests are checked against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskLimits {
    /// Size in 512-byte sectors.
    pub sectors: u64,
    /// Writes are refused.
    pub read_only: bool,
    /// `feature-discard` was advertised.
    pub discard: bool,
    /// `feature-barrier` was advertised.
    pub barrier: bool,
    /// `feature-flush-cache` was advertised.
    pub flush: bool,
    /// `feature-max-indirect-segments` (0: indirect not offered).
    pub max_indirect_segments: u16,
}

fn read_slot<T: FromBytes>(slot: &[u8]) -> T {
    // A slot is always at least as large as every request layout (asserted in abi.rs),
    // and the caller passes a whole slot (checked in `parse`).
    T::read_from_prefix(slot).map(|(v, _)| v).unwrap_or_else(|_| T::new_zeroed())
}

/// The `id` of the request in `slot` (of `abi`'s layout), whatever else the
/// slot holds: it is at the same place in every operation's layout.
pub fn request_id(abi: Protocol, slot: &[u8]) -> u64 {
    if Layout::from(abi) == Layout::Narrow {
        read_slot::<BlkifRequest32>(slot).id.get()
    } else {
        read_slot::<BlkifRequest64>(slot).id.get()
    }
}

/// Parses a request copied out of a ring slot of `abi`'s layout and checks
/// it against `disk`. `slot` must be [`Layout::slot_size`] bytes; a shorter one
/// is read as if zero-padded.
pub fn parse(abi: Protocol, slot: &[u8], disk: &DiskLimits) -> Result<Request, RequestError> {
    let mut padded = [0u8; SLOT_SIZE_64];
    let n = slot.len().min(SLOT_SIZE_64);
    padded[..n].copy_from_slice(&slot[..n]);
    let slot = &padded[..];
    // The operation echoed in the response: Linux's blkfront (blkif_interrupt)
    // and blkback answer an indirect request with its inner `indirect_op`, and
    // blkfront disables the disk on anything else. Byte 1 is `indirect_op` in
    // every layout, so even a malformed indirect request gets what it expects.
    let operation = if slot[0] == BLKIF_OP_INDIRECT { slot[1] } else { slot[0] };
    let wide = Layout::from(abi) == Layout::Wide;
    let id = request_id(abi, slot);
    let fail = |fault| RequestError { id, operation, fault };
    let kind = parse_kind(wide, slot, disk).map_err(fail)?;
    Ok(Request { id, operation, kind })
}

fn parse_kind(wide: bool, slot: &[u8], disk: &DiskLimits) -> Result<RequestKind, Fault> {
    let operation = slot[0];
    match operation {
        BLKIF_OP_READ | BLKIF_OP_WRITE | BLKIF_OP_WRITE_BARRIER | BLKIF_OP_FLUSH_DISKCACHE => {
            let (nr, sector, raw_segs) = if wide {
                let r: BlkifRequest64 = read_slot(slot);
                (r.nr_segments as usize, r.sector_number.get(), r.seg)
            } else {
                let r: BlkifRequest32 = read_slot(slot);
                (r.nr_segments as usize, r.sector_number.get(), r.seg)
            };
            let direction = if operation == BLKIF_OP_READ { Direction::Read } else { Direction::Write };
            let barrier = operation == BLKIF_OP_WRITE_BARRIER;
            let flush = barrier || operation == BLKIF_OP_FLUSH_DISKCACHE;
            if (barrier && !disk.barrier) || (operation == BLKIF_OP_FLUSH_DISKCACHE && !disk.flush) {
                return Err(Fault::Unsupported(operation));
            }
            let min = if operation == BLKIF_OP_FLUSH_DISKCACHE { 0 } else { 1 };
            if nr < min || nr > BLKIF_MAX_SEGMENTS_PER_REQUEST {
                return Err(Fault::BadSegmentCount { count: nr, max: BLKIF_MAX_SEGMENTS_PER_REQUEST });
            }
            let segments = raw_segs[..nr].iter().map(Segment::parse).collect::<Result<Vec<_>, _>>()?;
            if direction == Direction::Write && disk.read_only {
                return Err(Fault::ReadOnly);
            }
            // A flush without data has no range: Linux sends the block
            // layer's unset position (sector -1) there, and Linux's blkback
            // checks the range only when there are sectors.
            if !segments.is_empty() {
                check_range(sector, segments.iter().map(Segment::sectors).sum(), disk)?;
            }
            Ok(RequestKind::Data { direction, sector, segments, barrier, flush })
        }
        BLKIF_OP_DISCARD => {
            let (flag, sector, nr_sectors) = if wide {
                let r: BlkifRequestDiscard64 = read_slot(slot);
                (r.flag, r.sector_number.get(), r.nr_sectors.get())
            } else {
                let r: BlkifRequestDiscard32 = read_slot(slot);
                (r.flag, r.sector_number.get(), r.nr_sectors.get())
            };
            if !disk.discard {
                return Err(Fault::Unsupported(operation));
            }
            if disk.read_only {
                return Err(Fault::ReadOnly);
            }
            check_range(sector, nr_sectors, disk)?;
            Ok(RequestKind::Discard { sector, nr_sectors, secure: flag & BLKIF_DISCARD_SECURE != 0 })
        }
        BLKIF_OP_INDIRECT => {
            let (inner, nr, sector, grefs) = if wide {
                let r: BlkifRequestIndirect64 = read_slot(slot);
                (r.indirect_op, r.nr_segments.get() as usize, r.sector_number.get(), r.indirect_grefs)
            } else {
                let r: BlkifRequestIndirect32 = read_slot(slot);
                (r.indirect_op, r.nr_segments.get() as usize, r.sector_number.get(), r.indirect_grefs)
            };
            if disk.max_indirect_segments == 0 {
                return Err(Fault::Unsupported(operation));
            }
            let direction = match inner {
                BLKIF_OP_READ => Direction::Read,
                BLKIF_OP_WRITE => Direction::Write,
                other => return Err(Fault::BadIndirectOperation(other)),
            };
            let max = usize::from(disk.max_indirect_segments).min(SEGS_PER_INDIRECT_FRAME * grefs.len());
            if nr == 0 || nr > max {
                return Err(Fault::BadSegmentCount { count: nr, max });
            }
            if direction == Direction::Write && disk.read_only {
                return Err(Fault::ReadOnly);
            }
            // Each segment has at most 8 sectors: a cheap early bound on the range.
            check_range(sector, 1, disk)?;
            let pages = grefs[..nr.div_ceil(SEGS_PER_INDIRECT_FRAME)].iter().map(|g| GrantRef(g.get())).collect();
            Ok(RequestKind::Indirect { direction, sector, nr_segments: nr as u16, pages })
        }
        other => Err(Fault::UnknownOperation(other)),
    }
}

fn check_range(sector: u64, count: u64, disk: &DiskLimits) -> Result<(), Fault> {
    match sector.checked_add(count) {
        Some(end) if end <= disk.sectors => Ok(()),
        _ => Err(Fault::OutOfRange { sector, count, disk_sectors: disk.sectors }),
    }
}

/// Reads `nr_segments` segments from the copied contents of an indirect
/// request's pages (concatenated, 4096 bytes each) and checks the whole
/// request's sector range.
pub fn parse_indirect_segments(
    pages: &[u8],
    nr_segments: u16,
    sector: u64,
    disk: &DiskLimits,
) -> Result<Vec<Segment>, Fault> {
    let nr = usize::from(nr_segments);
    let need = nr * core::mem::size_of::<BlkifRequestSegment>();
    if pages.len() < need {
        return Err(Fault::BadSegmentCount { count: nr, max: pages.len() / 8 });
    }
    let segments = pages[..need]
        .chunks_exact(8)
        .map(|c| Segment::parse(&read_slot::<BlkifRequestSegment>(c)))
        .collect::<Result<Vec<_>, _>>()?;
    check_range(sector, segments.iter().map(Segment::sectors).sum(), disk)?;
    Ok(segments)
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    const DISK: DiskLimits = DiskLimits {
        sectors: 1 << 20,
        read_only: false,
        discard: true,
        barrier: true,
        flush: true,
        max_indirect_segments: 256,
    };

    fn seg(gref: u32, first: u8, last: u8) -> BlkifRequestSegment {
        BlkifRequestSegment { gref: gref.into(), first_sect: first, last_sect: last, _pad: [0; 2] }
    }

    fn rw64(op: u8, nr: u8, sector: u64) -> BlkifRequest64 {
        let mut r = BlkifRequest64 { operation: op, nr_segments: nr, id: 0xabcd.into(), ..Default::default() };
        r.sector_number = sector.into();
        for i in 0..BLKIF_MAX_SEGMENTS_PER_REQUEST {
            r.seg[i] = seg(100 + i as u32, 0, 7);
        }
        r
    }

    #[test]
    fn parses_native_write_with_segments() {
        let r = rw64(BLKIF_OP_WRITE, 2, 8);
        let req = parse(Protocol::Native, r.as_bytes(), &DISK).unwrap();
        assert_eq!(req.id, 0xabcd);
        let RequestKind::Data { direction, sector, segments, barrier, flush } = req.kind else { panic!("{req:?}") };
        assert_eq!((direction, sector, barrier, flush), (Direction::Write, 8, false, false));
        assert_eq!(segments.len(), 2);
        assert_eq!(segments[1].gref, GrantRef(101));
    }

    #[test]
    fn parses_x86_32_layout_ids_and_sectors() {
        let mut r = BlkifRequest32 { operation: BLKIF_OP_READ, nr_segments: 1, ..Default::default() };
        r.id = 0x1122_3344_5566_7788.into();
        r.sector_number = 77.into();
        r.seg[0] = seg(9, 1, 3);
        let req = parse(Protocol::X86_32, r.as_bytes(), &DISK).unwrap();
        assert_eq!(req.id, 0x1122_3344_5566_7788);
        let RequestKind::Data { sector, segments, .. } = req.kind else { panic!() };
        assert_eq!(sector, 77);
        assert_eq!(segments, vec![Segment { gref: GrantRef(9), first_sect: 1, last_sect: 3 }]);
        assert_eq!(segments[0].len(), 3 * 512);
        assert_eq!(segments[0].page_offset(), 512);
    }

    #[test]
    fn parse_rejects_segment_beyond_page() {
        let mut r = rw64(BLKIF_OP_READ, 1, 0);
        r.seg[0] = seg(1, 0, 8);
        let err = parse(Protocol::X86_64, r.as_bytes(), &DISK).unwrap_err();
        assert_eq!(err.fault, Fault::BadSegment { first_sect: 0, last_sect: 8 });
        assert_eq!(err.response().status, Status::Error);
        assert_eq!(err.id, 0xabcd);
    }

    #[test]
    fn parse_rejects_reversed_segment_and_bad_counts() {
        let mut r = rw64(BLKIF_OP_READ, 1, 0);
        r.seg[0] = seg(1, 5, 4);
        assert!(matches!(parse(Protocol::Native, r.as_bytes(), &DISK).unwrap_err().fault, Fault::BadSegment { .. }));
        for nr in [0u8, 12, 255] {
            let r = rw64(BLKIF_OP_WRITE, nr, 0);
            assert!(matches!(
                parse(Protocol::Native, r.as_bytes(), &DISK).unwrap_err().fault,
                Fault::BadSegmentCount { .. }
            ));
        }
    }

    #[test]
    fn parse_rejects_sectors_beyond_disk_end_and_overflow() {
        let r = rw64(BLKIF_OP_READ, 2, DISK.sectors - 8);
        assert!(matches!(parse(Protocol::Native, r.as_bytes(), &DISK).unwrap_err().fault, Fault::OutOfRange { .. }));
        let r = rw64(BLKIF_OP_READ, 1, u64::MAX - 2);
        assert!(matches!(parse(Protocol::Native, r.as_bytes(), &DISK).unwrap_err().fault, Fault::OutOfRange { .. }));
        let r = rw64(BLKIF_OP_READ, 1, DISK.sectors - 8);
        assert!(parse(Protocol::Native, r.as_bytes(), &DISK).is_ok());
    }

    #[test]
    fn parse_rejects_writes_to_read_only_disk() {
        let ro = DiskLimits { read_only: true, ..DISK };
        let r = rw64(BLKIF_OP_WRITE, 1, 0);
        assert_eq!(parse(Protocol::Native, r.as_bytes(), &ro).unwrap_err().fault, Fault::ReadOnly);
        let r = rw64(BLKIF_OP_READ, 1, 0);
        assert!(parse(Protocol::Native, r.as_bytes(), &ro).is_ok());
    }

    #[test]
    fn unknown_and_unsupported_operations_get_eopnotsupp() {
        for op in [BLKIF_OP_RESERVED_1, 7, 255] {
            let r = rw64(op, 1, 0);
            let e = parse(Protocol::Native, r.as_bytes(), &DISK).unwrap_err();
            assert_eq!(e.response().status, Status::NotSupported);
            assert_eq!(e.response().operation, op);
        }
        let no_barrier = DiskLimits { barrier: false, ..DISK };
        let r = rw64(BLKIF_OP_WRITE_BARRIER, 1, 0);
        assert_eq!(parse(Protocol::Native, r.as_bytes(), &no_barrier).unwrap_err().fault, Fault::Unsupported(2));
    }

    #[test]
    fn flush_without_segments_is_a_pure_flush_whatever_its_sector() {
        // Linux's blkfront sends an empty flush with sector -1 (the block
        // layer's unset position); refusing it makes blkfront turn flushes off.
        for sector in [0, DISK.sectors, u64::MAX] {
            let r = rw64(BLKIF_OP_FLUSH_DISKCACHE, 0, sector);
            let req = parse(Protocol::Native, r.as_bytes(), &DISK).unwrap();
            assert!(matches!(req.kind, RequestKind::Data { flush: true, ref segments, .. } if segments.is_empty()));
        }
        // With data, the range is checked as for any write.
        let r = rw64(BLKIF_OP_FLUSH_DISKCACHE, 1, u64::MAX);
        assert!(matches!(parse(Protocol::Native, r.as_bytes(), &DISK).unwrap_err().fault, Fault::OutOfRange { .. }));
    }

    #[test]
    fn parses_discard_in_both_layouts() {
        let d = BlkifRequestDiscard64 {
            operation: BLKIF_OP_DISCARD,
            flag: BLKIF_DISCARD_SECURE,
            id: 5.into(),
            sector_number: 16.into(),
            nr_sectors: 64.into(),
            ..Default::default()
        };
        let req = parse(Protocol::X86_64, d.as_bytes(), &DISK).unwrap();
        assert_eq!(req.kind, RequestKind::Discard { sector: 16, nr_sectors: 64, secure: true });
        let d32 = BlkifRequestDiscard32 {
            operation: BLKIF_OP_DISCARD,
            id: 6.into(),
            sector_number: 1.into(),
            nr_sectors: 2.into(),
            ..Default::default()
        };
        let mut slot = [0u8; SLOT_SIZE_32];
        slot[..28].copy_from_slice(d32.as_bytes());
        let req = parse(Protocol::X86_32, &slot, &DISK).unwrap();
        assert_eq!((req.id, req.kind), (6, RequestKind::Discard { sector: 1, nr_sectors: 2, secure: false }));
        let no_discard = DiskLimits { discard: false, ..DISK };
        assert_eq!(parse(Protocol::X86_64, d.as_bytes(), &no_discard).unwrap_err().fault, Fault::Unsupported(5));
    }

    #[test]
    fn parses_indirect_and_bounds_its_pages() {
        let mut r = BlkifRequestIndirect64 {
            operation: BLKIF_OP_INDIRECT,
            indirect_op: BLKIF_OP_WRITE,
            nr_segments: 513.into(),
            id: 9.into(),
            ..Default::default()
        };
        for i in 0..8 {
            r.indirect_grefs[i] = (1000 + i as u32).into();
        }
        let big = DiskLimits { max_indirect_segments: 4096, ..DISK };
        let req = parse(Protocol::Native, r.as_bytes(), &big).unwrap();
        let RequestKind::Indirect { pages, nr_segments, .. } = req.kind else { panic!() };
        assert_eq!((nr_segments, pages), (513, vec![GrantRef(1000), GrantRef(1001)]));
        // Above the advertised maximum.
        assert!(matches!(
            parse(Protocol::Native, r.as_bytes(), &DISK).unwrap_err().fault,
            Fault::BadSegmentCount { .. }
        ));
        r.indirect_op = BLKIF_OP_DISCARD;
        assert_eq!(parse(Protocol::Native, r.as_bytes(), &big).unwrap_err().fault, Fault::BadIndirectOperation(5));
    }

    #[test]
    fn indirect_responses_carry_the_inner_operation_as_linux_expects() {
        let mut r = BlkifRequestIndirect64 {
            operation: BLKIF_OP_INDIRECT,
            indirect_op: BLKIF_OP_WRITE,
            nr_segments: 2.into(),
            id: 3.into(),
            ..Default::default()
        };
        assert_eq!(parse(Protocol::Native, r.as_bytes(), &DISK).unwrap().operation, BLKIF_OP_WRITE);
        r.nr_segments = 0.into();
        assert_eq!(parse(Protocol::Native, r.as_bytes(), &DISK).unwrap_err().response().operation, BLKIF_OP_WRITE);
        let d = BlkifRequest32 { operation: BLKIF_OP_INDIRECT, nr_segments: BLKIF_OP_READ, ..Default::default() };
        assert_eq!(parse(Protocol::X86_32, d.as_bytes(), &DISK).unwrap_err().response().operation, BLKIF_OP_READ);
    }

    #[test]
    fn indirect_segments_are_checked_like_direct_ones() {
        let mut page = vec![0u8; 4096];
        for i in 0..3 {
            page[i * 8..i * 8 + 8].copy_from_slice(seg(i as u32, 0, 7).as_bytes());
        }
        let segs = parse_indirect_segments(&page, 3, 0, &DISK).unwrap();
        assert_eq!(segs.len(), 3);
        page[16..24].copy_from_slice(seg(2, 3, 9).as_bytes());
        assert!(parse_indirect_segments(&page, 3, 0, &DISK).is_err());
        assert!(parse_indirect_segments(&page, 600, 0, &DISK).is_err());
        assert!(matches!(parse_indirect_segments(&page, 2, DISK.sectors - 8, &DISK), Err(Fault::OutOfRange { .. })));
    }

    #[test]
    fn responses_encode_per_layout() {
        let rsp = Response { id: 0x0102_0304_0506_0708, operation: 1, status: Status::NotSupported };
        let mut out = [0xffu8; 16];
        Layout::from(Protocol::Native).encode_response(&rsp, &mut out);
        assert_eq!(out, [8, 7, 6, 5, 4, 3, 2, 1, 1, 0, 0xfe, 0xff, 0, 0, 0, 0]);
        let mut out = [0xffu8; 12];
        Layout::from(Protocol::X86_32).encode_response(&rsp, &mut out);
        assert_eq!(&out[8..], &[1, 0, 0xfe, 0xff]);
    }

    #[test]
    fn protocol_names_map_to_layouts() {
        let layout = |name: &str| Protocol::parse(Some(name)).ok().map(Layout::from);
        assert_eq!(layout("x86_32-abi"), Some(Layout::Narrow));
        assert_eq!(layout("x86_64-abi"), Some(Layout::Wide));
        let arm = if cfg!(any(target_arch = "arm", target_arch = "aarch64")) { Some(Layout::Wide) } else { None };
        assert_eq!(layout("arm-abi"), arm);
        assert_eq!(layout("native"), None);
        assert_eq!(layout(""), Some(Layout::Wide));
        assert_eq!(layout("x86_32-abi\0"), Some(Layout::Narrow));
        assert_eq!(Layout::Narrow.slot_size(), 108);
    }

    #[test]
    fn parse_never_panics_on_short_or_garbage_slots() {
        for len in 0..SLOT_SIZE_64 {
            let slot = vec![0xa5u8; len];
            for abi in [Protocol::Native, Protocol::X86_32] {
                let _ = parse(abi, &slot, &DISK);
            }
        }
    }
}
