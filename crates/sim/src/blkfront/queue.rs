//! One frontend queue: its ring, port, pre-granted buffers and the requests
//! in flight.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use blkif::abi::*;
use blkif::ring::BlkFrontRing;
use blkif::Layout;
use evtchn::{EventChannel, Port};
use gnttab::{GrantMapping, GrantRef, PAGE_SIZE};
use xen_bus::Protocol;
use zerocopy::IntoBytes;

use super::{BlkfrontError, BlkfrontOptions};
use crate::host::{DomId, GuestPages, SimGrantTable};

/// Ring pages seen by the guest.
pub(crate) struct RingPages(pub(crate) GuestPages);

impl Borrow<GrantMapping> for RingPages {
    fn borrow(&self) -> &GrantMapping {
        self.0.mapping()
    }
}

/// What a request asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkOp<'a> {
    /// Read `len` bytes (a multiple of 512) from `sector`.
    Read {
        /// First sector.
        sector: u64,
        /// Bytes.
        len: usize,
    },
    /// Write `data` (a multiple of 512 bytes) at `sector`.
    Write {
        /// First sector.
        sector: u64,
        /// The data.
        data: &'a [u8],
    },
    /// `BLKIF_OP_WRITE_BARRIER` with `data` at `sector`.
    Barrier {
        /// First sector.
        sector: u64,
        /// The data.
        data: &'a [u8],
    },
    /// `BLKIF_OP_FLUSH_DISKCACHE` with no data.
    Flush,
    /// `BLKIF_OP_DISCARD`.
    Discard {
        /// First sector.
        sector: u64,
        /// Sectors.
        nr_sectors: u64,
        /// `BLKIF_DISCARD_SECURE`.
        secure: bool,
    },
}

/// A finished request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkCompletion {
    /// The caller's tag given at submission.
    pub tag: u64,
    /// The operation byte echoed by the backend.
    pub operation: u8,
    /// `BLKIF_RSP_*`.
    pub status: i16,
    /// The data of a successful read (empty otherwise).
    pub data: Vec<u8>,
    /// From submission to collection.
    pub latency: Duration,
}

/// One request's pages: where they start in the queue's data (and
/// indirect) pages, and their grants.
struct Buffer {
    at: usize,
    grefs: Vec<GrantRef>,
    indirect: Option<(usize, Vec<GrantRef>)>,
}

struct InFlight {
    tag: u64,
    /// The `operation` Linux's blkfront accepts in the response: the request's,
    /// or for `BLKIF_OP_INDIRECT` the inner `indirect_op` (set by `post`).
    expected_op: u8,
    buffer: Option<usize>,
    read_len: usize,
    submitted: Instant,
}

pub(crate) struct QueueSetup {
    pub(crate) index: usize,
    pub(crate) backend: DomId,
    pub(crate) options: BlkfrontOptions,
    pub(crate) depth: usize,
    pub(crate) ring: BlkFrontRing<RingPages>,
    pub(crate) ring_refs: Vec<GrantRef>,
    pub(crate) evtchn: Box<dyn EventChannel>,
    pub(crate) port: Port,
}

/// One queue of a simulated blkfront.
pub struct FrontQueue {
    index: usize,
    abi: Protocol,
    indirect: bool,
    ring: BlkFrontRing<RingPages>,
    ring_refs: Vec<GrantRef>,
    evtchn: Box<dyn EventChannel>,
    port: Port,
    buffers: Vec<Buffer>,
    /// The data pages of every buffer, and their indirect pages.
    data: GuestPages,
    indirect_pages: Option<GuestPages>,
    free: Vec<usize>,
    in_flight: HashMap<u64, InFlight>,
    next_id: u64,
    ports: Vec<Port>,
    grants: SimGrantTable,
}

impl FrontQueue {
    pub(crate) fn new(s: QueueSetup, grants: &SimGrantTable) -> Result<FrontQueue, BlkfrontError> {
        let pages_per_buffer = s.options.max_request_bytes / PAGE_SIZE;
        let indirect = s.options.indirect && pages_per_buffer > BLKIF_MAX_SEGMENTS_PER_REQUEST;
        if pages_per_buffer > BLKIF_MAX_SEGMENTS_PER_REQUEST && !indirect {
            return Err(BlkfrontError::BadOption("requests above 11 pages need indirect"));
        }
        let indirect_pages = pages_per_buffer.div_ceil(SEGS_PER_INDIRECT_FRAME);
        if indirect_pages > BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST {
            return Err(BlkfrontError::BadOption("requests above 4096 pages"));
        }
        // Every buffer of the queue in one allocation (and one for the
        // indirect pages): a mapping each, not two per buffer, so that a
        // thousand disks stay far below the kernel's vm.max_map_count.
        let data = grants.alloc_pages(pages_per_buffer * s.depth)?;
        let data_grefs = grants.grant_pages(&data, s.backend, false)?;
        let indirect_data = match indirect {
            true => {
                let p = grants.alloc_pages(indirect_pages * s.depth)?;
                let g = grants.grant_pages(&p, s.backend, true)?;
                Some((p, g))
            }
            false => None,
        };
        let buffers = (0..s.depth)
            .map(|i| Buffer {
                at: i * pages_per_buffer * PAGE_SIZE,
                grefs: data_grefs[i * pages_per_buffer..][..pages_per_buffer].to_vec(),
                indirect: indirect_data
                    .as_ref()
                    .map(|(_, g)| (i * indirect_pages * PAGE_SIZE, g[i * indirect_pages..][..indirect_pages].to_vec())),
            })
            .collect::<Vec<_>>();
        Ok(FrontQueue {
            index: s.index,
            abi: s.options.abi,
            indirect,
            ring: s.ring,
            ring_refs: s.ring_refs,
            evtchn: s.evtchn,
            port: s.port,
            free: (0..buffers.len()).rev().collect(),
            buffers,
            data,
            indirect_pages: indirect_data.map(|(p, _)| p),
            in_flight: HashMap::new(),
            next_id: 1,
            ports: Vec::new(),
            grants: grants.clone(),
        })
    }

    /// Queue number.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The ring's grant references.
    pub fn ring_refs(&self) -> &[GrantRef] {
        &self.ring_refs
    }

    /// Our port (the backend binds to it).
    pub fn port(&self) -> Port {
        self.port
    }

    /// Requests submitted and not collected.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether another data request can be submitted now.
    pub fn can_submit(&self) -> bool {
        !self.free.is_empty() && self.ring.free() > 0
    }

    /// Largest request in bytes.
    pub fn max_request_bytes(&self) -> usize {
        self.buffers.first().map_or(0, |b| b.grefs.len() * PAGE_SIZE)
    }

    /// Submits `op`; its completion carries `tag`. Fails with
    /// [`BlkfrontError::Full`] when no slot or buffer is free.
    pub fn submit(&mut self, tag: u64, op: BlkOp<'_>) -> Result<(), BlkfrontError> {
        if self.ring.free() == 0 {
            return Err(BlkfrontError::Full);
        }
        let id = self.next_id;
        match op {
            BlkOp::Flush => {
                // As Linux: an empty flush carries the block layer's unset
                // position, sector -1.
                let slot = self.data_request(BLKIF_OP_FLUSH_DISKCACHE, id, u64::MAX, &[]);
                self.post(
                    id,
                    InFlight { tag, expected_op: 0, buffer: None, read_len: 0, submitted: Instant::now() },
                    &slot,
                )
            }
            BlkOp::Discard { sector, nr_sectors, secure } => {
                let slot = self.discard_request(id, sector, nr_sectors, secure);
                self.post(
                    id,
                    InFlight { tag, expected_op: 0, buffer: None, read_len: 0, submitted: Instant::now() },
                    &slot,
                )
            }
            BlkOp::Read { sector, len } => self.submit_data(tag, id, BLKIF_OP_READ, sector, len, None),
            BlkOp::Write { sector, data } => self.submit_data(tag, id, BLKIF_OP_WRITE, sector, data.len(), Some(data)),
            BlkOp::Barrier { sector, data } => {
                self.submit_data(tag, id, BLKIF_OP_WRITE_BARRIER, sector, data.len(), Some(data))
            }
        }
    }

    /// Puts raw bytes in the next slot (a hostile or buggy guest's request).
    /// The backend answers with the id in the bytes; the completion carries
    /// `tag` if that id is `id`.
    pub fn submit_raw(&mut self, tag: u64, id: u64, slot: &[u8]) -> Result<(), BlkfrontError> {
        if self.ring.free() == 0 || slot.len() > Layout::from(self.abi).slot_size() {
            return Err(BlkfrontError::Full);
        }
        self.post(id, InFlight { tag, expected_op: 0, buffer: None, read_len: 0, submitted: Instant::now() }, slot)
    }

    /// A grant reference of this queue's data buffers (for hand-made requests).
    pub fn buffer_gref(&self, buffer: usize, page: usize) -> GrantRef {
        self.buffers[buffer].grefs[page]
    }

    fn submit_data(
        &mut self,
        tag: u64,
        id: u64,
        op: u8,
        sector: u64,
        len: usize,
        data: Option<&[u8]>,
    ) -> Result<(), BlkfrontError> {
        if len == 0 || len % SECTOR_SIZE as usize != 0 || len > self.max_request_bytes() {
            return Err(BlkfrontError::BadSize(len));
        }
        let Some(b) = self.free.pop() else {
            return Err(BlkfrontError::Full);
        };
        let buf = &self.buffers[b];
        if let Some(data) = data {
            if let Err(e) = self.data.mapping().write(buf.at, data) {
                self.free.push(b);
                return Err(BlkfrontError::Ring(e.into()));
            }
        }
        let sectors = len / SECTOR_SIZE as usize;
        let segs: Vec<BlkifRequestSegment> = (0..len.div_ceil(PAGE_SIZE))
            .map(|p| {
                let in_page = (sectors - p * SECTORS_PER_PAGE as usize).min(SECTORS_PER_PAGE as usize);
                BlkifRequestSegment {
                    gref: buf.grefs[p].0.into(),
                    first_sect: 0,
                    last_sect: (in_page - 1) as u8,
                    _pad: [0; 2],
                }
            })
            .collect();
        let slot = if segs.len() <= BLKIF_MAX_SEGMENTS_PER_REQUEST {
            self.data_request(op, id, sector, &segs)
        } else {
            let (Some((at, grefs)), Some(pages)) = (&buf.indirect, &self.indirect_pages) else {
                self.free.push(b);
                return Err(BlkfrontError::BadSize(len));
            };
            if let Err(e) = pages.mapping().write(*at, segs.as_bytes()) {
                self.free.push(b);
                return Err(BlkfrontError::Ring(e.into()));
            }
            let n = segs.len().div_ceil(SEGS_PER_INDIRECT_FRAME);
            self.indirect_request(op, id, sector, segs.len() as u16, &grefs[..n])
        };
        let read_len = if op == BLKIF_OP_READ { len } else { 0 };
        let f = InFlight { tag, expected_op: 0, buffer: Some(b), read_len, submitted: Instant::now() };
        self.post(id, f, &slot)
    }

    fn post(&mut self, id: u64, mut f: InFlight, slot: &[u8]) -> Result<(), BlkfrontError> {
        f.expected_op = if slot[0] == BLKIF_OP_INDIRECT { slot[1] } else { slot[0] };
        if let Err(e) = self.ring.put_request(slot) {
            if let Some(b) = f.buffer {
                self.free.push(b);
            }
            return Err(e.into());
        }
        self.next_id = self.next_id.wrapping_add(1);
        self.in_flight.insert(id, f);
        if self.ring.push_requests()? {
            self.evtchn.notify(self.port)?;
        }
        Ok(())
    }

    fn data_request(&self, op: u8, id: u64, sector: u64, segs: &[BlkifRequestSegment]) -> Vec<u8> {
        let mut seg = [BlkifRequestSegment::default(); BLKIF_MAX_SEGMENTS_PER_REQUEST];
        seg[..segs.len()].copy_from_slice(segs);
        let n = segs.len() as u8;
        match Layout::from(self.abi) {
            Layout::Narrow => BlkifRequest32 {
                operation: op,
                nr_segments: n,
                handle: 0.into(),
                id: id.into(),
                sector_number: sector.into(),
                seg,
            }
            .as_bytes()
            .to_vec(),
            Layout::Wide => BlkifRequest64 {
                operation: op,
                nr_segments: n,
                handle: 0.into(),
                _pad: [0; 4],
                id: id.into(),
                sector_number: sector.into(),
                seg,
            }
            .as_bytes()
            .to_vec(),
        }
    }

    fn discard_request(&self, id: u64, sector: u64, nr_sectors: u64, secure: bool) -> Vec<u8> {
        let flag = if secure { BLKIF_DISCARD_SECURE } else { 0 };
        match Layout::from(self.abi) {
            Layout::Narrow => BlkifRequestDiscard32 {
                operation: BLKIF_OP_DISCARD,
                flag,
                handle: 0.into(),
                id: id.into(),
                sector_number: sector.into(),
                nr_sectors: nr_sectors.into(),
            }
            .as_bytes()
            .to_vec(),
            Layout::Wide => BlkifRequestDiscard64 {
                operation: BLKIF_OP_DISCARD,
                flag,
                handle: 0.into(),
                _pad: [0; 4],
                id: id.into(),
                sector_number: sector.into(),
                nr_sectors: nr_sectors.into(),
            }
            .as_bytes()
            .to_vec(),
        }
    }

    fn indirect_request(&self, op: u8, id: u64, sector: u64, nr_segments: u16, pages: &[GrantRef]) -> Vec<u8> {
        let mut grefs = [0u32.into(); BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
        for (g, p) in grefs.iter_mut().zip(pages) {
            *g = p.0.into();
        }
        match Layout::from(self.abi) {
            Layout::Narrow => BlkifRequestIndirect32 {
                operation: BLKIF_OP_INDIRECT,
                indirect_op: op,
                nr_segments: nr_segments.into(),
                id: id.into(),
                sector_number: sector.into(),
                handle: 0.into(),
                _pad1: 0.into(),
                indirect_grefs: grefs,
                _pad2: 0.into(),
            }
            .as_bytes()
            .to_vec(),
            Layout::Wide => BlkifRequestIndirect64 {
                operation: BLKIF_OP_INDIRECT,
                indirect_op: op,
                nr_segments: nr_segments.into(),
                _pad0: [0; 4],
                id: id.into(),
                sector_number: sector.into(),
                handle: 0.into(),
                _pad1: 0.into(),
                indirect_grefs: grefs,
                _pad2: 0.into(),
            }
            .as_bytes()
            .to_vec(),
        }
    }

    /// Collects every published response into `out` without blocking (and
    /// re-arms `rsp_event`).
    pub fn poll(&mut self, out: &mut Vec<BlkCompletion>) -> Result<(), BlkfrontError> {
        loop {
            while let Some(rsp) = self.ring.next_response()? {
                let (id, operation, status) = (rsp.id, rsp.operation, rsp.status);
                let Some(f) = self.in_flight.remove(&id) else {
                    log::warn!("blkfront queue {}: response for unknown id {id:#x}", self.index);
                    continue;
                };
                // Linux's blkif_interrupt disables the disk on a mismatch.
                if operation != f.expected_op {
                    return Err(BlkfrontError::WrongOperation { expected: f.expected_op, got: operation });
                }
                let mut data = Vec::new();
                if let Some(b) = f.buffer {
                    if status == BLKIF_RSP_OKAY && f.read_len > 0 {
                        data = vec![0u8; f.read_len];
                        self.data
                            .mapping()
                            .read(self.buffers[b].at, &mut data)
                            .map_err(|e| BlkfrontError::Ring(e.into()))?;
                    }
                    self.free.push(b);
                }
                out.push(BlkCompletion { tag: f.tag, operation, status, data, latency: f.submitted.elapsed() });
            }
            if !self.ring.final_check_for_responses()? {
                return Ok(());
            }
        }
    }

    /// Waits up to `timeout` for the backend's notification, then collects
    /// responses into `out`.
    pub fn wait(&mut self, timeout: Duration, out: &mut Vec<BlkCompletion>) -> Result<(), BlkfrontError> {
        self.poll(out)?;
        if !out.is_empty() {
            return Ok(());
        }
        evtchn::wait_pending(&*self.evtchn, Some(timeout.min(Duration::from_secs(60))))?;
        evtchn::take_and_unmask(&*self.evtchn, &mut self.ports)?;
        self.poll(out)
    }

    /// Notifies the backend without publishing anything (after scribbling
    /// on the ring, as a hostile guest).
    pub fn kick(&self) -> Result<(), BlkfrontError> {
        Ok(self.evtchn.notify(self.port)?)
    }

    /// The shared ring pages (to scribble on the indices, as a hostile guest).
    pub fn ring_mapping(&self) -> &GrantMapping {
        self.ring.mapping()
    }

    /// Whether requests above 11 pages go as indirect requests.
    pub fn uses_indirect(&self) -> bool {
        self.indirect
    }
}

impl Drop for FrontQueue {
    /// Revokes every grant and closes the port, as blkfront does when it
    /// frees a ring; a grant the backend still maps stays (and is logged).
    fn drop(&mut self) {
        let buffers = self.buffers.iter().flat_map(|b| b.grefs.iter().chain(b.indirect.iter().flat_map(|i| &i.1)));
        for g in self.ring_refs.iter().chain(buffers) {
            if let Err(e) = self.grants.end_access(*g) {
                log::debug!("blkfront queue {}: end_access({}): {e}", self.index, g.0);
            }
        }
        if let Err(e) = self.evtchn.unbind(self.port) {
            log::debug!("blkfront queue {}: unbind of port {}: {e}", self.index, self.port);
        }
    }
}
