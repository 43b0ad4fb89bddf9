//! blkif rings on the `xen-ring` crate. The slot size depends on the
//! frontend's ABI (a request slot is 112 bytes for x86_64 and native, 108 for
//! x86_32; responses 16 and 12), so each end is one typed ring per layout:
//! requests travel as raw slot bytes (copied out once, parsed by
//! `request.rs`), responses as the layout's `blkif_response`.
//! [`BlkBackRing`] is the backend's end; [`BlkFrontRing`] the frontend's (for
//! simulated frontends).

use std::borrow::Borrow;

use gnttab::GrantMapping;
use xen_ring::{BackRing, FrontRing, JournalFile, RingError, Ticket};
use zerocopy::{FromBytes, IntoBytes};

use crate::abi::{BlkifResponse32, BlkifResponse64, SLOT_SIZE_32, SLOT_SIZE_64};
use xen_bus::Protocol;

use crate::request::{Layout, Response};

type Slot64 = [u8; SLOT_SIZE_64];
type Slot32 = [u8; SLOT_SIZE_32];

/// The number of slots a ring of `bytes` holds in layout `abi`.
pub fn ring_size(bytes: usize, abi: Protocol) -> u32 {
    xen_ring::ring_size(bytes, Layout::from(abi).slot_size())
}

/// The backend's end of a blkif ring.
pub enum BlkBackRing {
    /// x86_64 / native layout.
    Wide(BackRing<Slot64, BlkifResponse64>),
    /// x86_32 layout.
    Narrow(BackRing<Slot32, BlkifResponse32>),
}

impl BlkBackRing {
    /// Attaches to the ring the frontend initialised in `mem`, keeping
    /// `journal` of the requests taken if given ([`BackRing::new_journaled`]).
    pub fn new(mem: GrantMapping, abi: Protocol, journal: Option<JournalFile>) -> Result<Self, RingError> {
        fn one<Req: xen_ring::RingEntry, Rsp: xen_ring::RingEntry>(
            mem: GrantMapping,
            journal: Option<JournalFile>,
        ) -> Result<BackRing<Req, Rsp>, RingError> {
            match journal {
                Some(j) => BackRing::new_journaled(mem, j),
                None => BackRing::new(mem),
            }
        }
        Ok(match Layout::from(abi) {
            Layout::Narrow => BlkBackRing::Narrow(one(mem, journal)?),
            Layout::Wide => BlkBackRing::Wide(one(mem, journal)?),
        })
    }

    /// Takes over a ring in use after a backend restart or crash, with the
    /// previous backend's journal ([`BackRing::resume`]).
    pub fn resume(mem: GrantMapping, abi: Protocol, journal: Option<JournalFile>) -> Result<Self, RingError> {
        Ok(match Layout::from(abi) {
            Layout::Narrow => BlkBackRing::Narrow(BackRing::resume(mem, journal)?),
            Layout::Wide => BlkBackRing::Wide(BackRing::resume(mem, journal)?),
        })
    }

    /// Slots in the ring.
    pub fn size(&self) -> u32 {
        match self {
            BlkBackRing::Wide(r) => r.size(),
            BlkBackRing::Narrow(r) => r.size(),
        }
    }

    /// Requests published and not taken.
    pub fn unconsumed(&mut self) -> Result<u32, RingError> {
        match self {
            BlkBackRing::Wide(r) => r.unconsumed_requests(),
            BlkBackRing::Narrow(r) => r.unconsumed_requests(),
        }
    }

    /// Copies the next request slot into `out` (at least a slot long) and
    /// returns its ticket ([`BackRing::take_request`]); `None` if there was
    /// none.
    pub fn take_request(&mut self, out: &mut [u8]) -> Result<Option<Ticket>, RingError> {
        fn copy<const N: usize>(taken: Option<(Ticket, [u8; N])>, out: &mut [u8]) -> Option<Ticket> {
            taken.map(|(t, s)| {
                out[..N].copy_from_slice(&s);
                t
            })
        }
        match self {
            BlkBackRing::Wide(r) => Ok(copy(r.take_request()?, out)),
            BlkBackRing::Narrow(r) => Ok(copy(r.take_request()?, out)),
        }
    }

    /// Writes the response to the request of `ticket` to the next slot
    /// (published by [`Self::push_responses`]).
    pub fn put_response(&mut self, ticket: Ticket, rsp: &Response) -> Result<(), RingError> {
        let mut raw = [0u8; 16];
        match self {
            BlkBackRing::Wide(r) => {
                Layout::Wide.encode_response(rsp, &mut raw);
                let (v, _) = BlkifResponse64::read_from_prefix(&raw).expect("16 bytes");
                r.answer(ticket, &v)
            }
            BlkBackRing::Narrow(r) => {
                Layout::Narrow.encode_response(rsp, &mut raw);
                let (v, _) = BlkifResponse32::read_from_prefix(&raw).expect("12 bytes");
                r.answer(ticket, &v)
            }
        }
    }

    /// Publishes the responses; whether the frontend asked for an event.
    pub fn push_responses(&mut self) -> Result<bool, RingError> {
        match self {
            BlkBackRing::Wide(r) => r.push_responses_and_check_notify(),
            BlkBackRing::Narrow(r) => r.push_responses_and_check_notify(),
        }
    }

    /// `RING_FINAL_CHECK_FOR_REQUESTS`.
    pub fn final_check_for_requests(&mut self) -> Result<bool, RingError> {
        match self {
            BlkBackRing::Wide(r) => r.final_check_for_requests(),
            BlkBackRing::Narrow(r) => r.final_check_for_requests(),
        }
    }
}

/// A response as the frontend reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawResponse {
    /// The request's id.
    pub id: u64,
    /// The operation echoed.
    pub operation: u8,
    /// `BLKIF_RSP_*`.
    pub status: i16,
}

/// The frontend's end of a blkif ring over `M` (the guest's view of the pages).
pub enum BlkFrontRing<M: Borrow<GrantMapping>> {
    /// x86_64 / native layout.
    Wide(FrontRing<Slot64, BlkifResponse64, M>),
    /// x86_32 layout.
    Narrow(FrontRing<Slot32, BlkifResponse32, M>),
}

impl<M: Borrow<GrantMapping>> BlkFrontRing<M> {
    /// Initialises the shared ring in `mem` for layout `abi`.
    pub fn new(mem: M, abi: Protocol) -> Result<Self, RingError> {
        Ok(match Layout::from(abi) {
            Layout::Narrow => BlkFrontRing::Narrow(FrontRing::new(mem)?),
            Layout::Wide => BlkFrontRing::Wide(FrontRing::new(mem)?),
        })
    }

    /// Slots in the ring.
    pub fn size(&self) -> u32 {
        match self {
            BlkFrontRing::Wide(r) => r.size(),
            BlkFrontRing::Narrow(r) => r.size(),
        }
    }

    /// Free request slots.
    pub fn free(&self) -> u32 {
        match self {
            BlkFrontRing::Wide(r) => r.free_requests(),
            BlkFrontRing::Narrow(r) => r.free_requests(),
        }
    }

    /// The shared pages (to scribble on them, as a hostile guest would).
    pub fn mapping(&self) -> &GrantMapping {
        match self {
            BlkFrontRing::Wide(r) => r.mapping(),
            BlkFrontRing::Narrow(r) => r.mapping(),
        }
    }

    /// Writes a request (at most a slot; zero-padded) to the next slot.
    pub fn put_request(&mut self, req: &[u8]) -> Result<(), RingError> {
        match self {
            BlkFrontRing::Wide(r) => {
                let mut s = [0u8; SLOT_SIZE_64];
                s[..req.len()].copy_from_slice(req);
                r.push_request(&s)
            }
            BlkFrontRing::Narrow(r) => {
                let mut s = [0u8; SLOT_SIZE_32];
                s[..req.len()].copy_from_slice(req);
                r.push_request(&s)
            }
        }
    }

    /// Publishes the requests; whether the backend asked for an event.
    pub fn push_requests(&mut self) -> Result<bool, RingError> {
        match self {
            BlkFrontRing::Wide(r) => r.push_requests_and_check_notify(),
            BlkFrontRing::Narrow(r) => r.push_requests_and_check_notify(),
        }
    }

    /// The next response, if any.
    pub fn next_response(&mut self) -> Result<Option<RawResponse>, RingError> {
        Ok(match self {
            BlkFrontRing::Wide(r) => r.next_response()?.map(|v| decode(v.as_bytes())),
            BlkFrontRing::Narrow(r) => r.next_response()?.map(|v| decode(v.as_bytes())),
        })
    }

    /// `RING_FINAL_CHECK_FOR_RESPONSES`.
    pub fn final_check_for_responses(&mut self) -> Result<bool, RingError> {
        match self {
            BlkFrontRing::Wide(r) => r.final_check_for_responses(),
            BlkFrontRing::Narrow(r) => r.final_check_for_responses(),
        }
    }
}

/// Both response layouts put `id` at 0, `operation` at 8 and `status` at 10.
fn decode(raw: &[u8]) -> RawResponse {
    RawResponse {
        id: u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes")),
        operation: raw[8],
        status: i16::from_le_bytes([raw[10], raw[11]]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::Status;
    use gnttab::PAGE_SIZE;
    use std::sync::Arc;

    /// Keeps the shared memory mapped while either end lives.
    struct Keep(#[allow(dead_code)] Arc<GrantMapping>);
    impl gnttab::Unmap for Keep {
        fn unmap(&mut self, _: std::ptr::NonNull<u8>, _: usize) {}
    }

    fn pair(pages: usize, abi: Protocol) -> (BlkFrontRing<Arc<GrantMapping>>, BlkBackRing) {
        let len = pages * PAGE_SIZE;
        let shared = Arc::new(GrantMapping::anonymous(len).unwrap());
        let addr = std::ptr::NonNull::new(shared.as_ptr()).unwrap();
        let front = BlkFrontRing::new(shared.clone(), abi).unwrap();
        // SAFETY: `Keep` holds the anonymous mapping until this view is dropped.
        let back_mem = unsafe { GrantMapping::from_raw(addr, len, true, Box::new(Keep(shared))) };
        (front, BlkBackRing::new(back_mem, abi, None).unwrap())
    }

    #[test]
    fn ring_sizes_match_ring_h_for_blkif() {
        assert_eq!(ring_size(PAGE_SIZE, Protocol::X86_64), 32);
        assert_eq!(ring_size(PAGE_SIZE, Protocol::X86_32), 32);
        assert_eq!(ring_size(4 * PAGE_SIZE, Protocol::Native), 128);
        assert_eq!(ring_size(16 * PAGE_SIZE, Protocol::Native), 512);
    }

    #[test]
    fn x86_32_slots_are_108_bytes_apart_and_responses_12() {
        let (mut front, mut back) = pair(1, Protocol::X86_32);
        front.put_request(&[1u8; SLOT_SIZE_32]).unwrap();
        front.put_request(&[2u8; SLOT_SIZE_32]).unwrap();
        front.push_requests().unwrap();
        let mut m = [0u8; SLOT_SIZE_32];
        front.mapping().read(64 + SLOT_SIZE_32, &mut m).unwrap();
        assert_eq!(m, [2u8; SLOT_SIZE_32], "second slot at 64 + 108");
        let mut slot = [0u8; SLOT_SIZE_64];
        let t1 = back.take_request(&mut slot).unwrap().unwrap();
        assert_eq!(slot[..SLOT_SIZE_32], [1u8; SLOT_SIZE_32]);
        let t2 = back.take_request(&mut slot).unwrap().unwrap();
        assert!(back.take_request(&mut slot).unwrap().is_none());
        back.put_response(t1, &Response { id: 0xAB, operation: 1, status: Status::Error }).unwrap();
        back.put_response(t2, &Response { id: 0xCD, operation: 0, status: Status::Okay }).unwrap();
        back.push_responses().unwrap();
        let mut r = [0u8; 12];
        front.mapping().read(64 + SLOT_SIZE_32, &mut r).unwrap();
        assert_eq!(r[0], 0xCD, "second response overwrites the second slot");
        let first = front.next_response().unwrap().unwrap();
        assert_eq!(first, RawResponse { id: 0xAB, operation: 1, status: -1 });
    }

    #[test]
    fn wide_layout_round_trips_a_full_ring() {
        let (mut front, mut back) = pair(2, Protocol::Native);
        let n = front.size();
        for i in 0..n {
            front.put_request(&[i as u8; 40]).unwrap();
        }
        assert_eq!(front.free(), 0);
        front.push_requests().unwrap();
        let mut slot = [0u8; SLOT_SIZE_64];
        for i in 0..n {
            let t = back.take_request(&mut slot).unwrap().unwrap();
            assert_eq!((slot[0], slot[40]), (i as u8, 0), "zero-padded slot {i}");
            back.put_response(t, &Response { id: u64::from(i), operation: 0, status: Status::Okay }).unwrap();
        }
        back.push_responses().unwrap();
        for i in 0..n {
            assert_eq!(front.next_response().unwrap().unwrap().id, u64::from(i));
        }
        assert!(!front.final_check_for_responses().unwrap());
    }
}
