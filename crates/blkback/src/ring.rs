//! The blkif shared ring (`xen/include/public/io/ring.h`, `DEFINE_RING_TYPES`)
//! with raw slots: the slot size depends on the frontend's ABI (112 bytes for
//! x86_64, 108 for x86_32), so the ring moves bytes and `request.rs` parses
//! them. Both ends are here: [`BackRing`] for the backend and [`FrontRing`]
//! for simulated frontends.
//!
//! Layout of the shared page(s) (`struct __name##_sring`):
//! `req_prod` at 0, `req_event` at 4, `rsp_prod` at 8, `rsp_event` at 12,
//! 48 bytes of padding, then the slots from byte 64.
//!
//! Indices are loaded with `Acquire` and stored with `Release`; the full
//! barriers `ring.h` places (`xen_mb()`) between publishing an index and
//! reading the other side's event index are `fence(SeqCst)`.

use std::borrow::Borrow;
use std::sync::atomic::{fence, Ordering};

use gnttab::{AccessError, GrantMapping, PAGE_SIZE};

const REQ_PROD: usize = 0;
const REQ_EVENT: usize = 4;
const RSP_PROD: usize = 8;
const RSP_EVENT: usize = 12;
/// Offset of the first slot (`offsetof(struct sring, ring)`).
pub const RING_HEADER: usize = 64;

/// Errors of ring access.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// The mapping is too small for a ring of that slot size.
    #[error("Ring of {len} bytes cannot hold slots of {slot} bytes")]
    TooSmall {
        /// Mapping length.
        len: usize,
        /// Slot size.
        slot: usize,
    },
    /// The other end published an index more than a ring ahead: the guest
    /// is broken or hostile (`RING_REQUEST_PROD_OVERFLOW`).
    #[error("Producer index {prod} is more than {size} ahead of {cons}")]
    Overflow {
        /// The published producer index.
        prod: u32,
        /// Our consumer or private producer index.
        cons: u32,
        /// Ring size in slots.
        size: u32,
    },
    /// A shared-memory access failed (the mapping is read-only or too short).
    #[error("Shared ring access failed")]
    Access(#[source] AccessError),
}

impl From<AccessError> for RingError {
    fn from(e: AccessError) -> Self {
        RingError::Access(e)
    }
}

/// Number of slots a ring of `bytes` holds with slots of `slot` bytes:
/// `__RING_SIZE`, rounded down to a power of two.
pub fn ring_size(bytes: usize, slot: usize) -> u32 {
    if bytes <= RING_HEADER || slot == 0 {
        return 0;
    }
    let n = (bytes - RING_HEADER) / slot;
    if n == 0 {
        return 0;
    }
    1u32 << (usize::BITS - 1 - n.leading_zeros())
}

/// Initialises a shared ring (`SHARED_RING_INIT`): producers 0, event indices 1.
pub fn init_shared(mem: &GrantMapping) -> Result<(), RingError> {
    mem.fill(0, RING_HEADER, 0)?;
    mem.store_u32(REQ_EVENT, 1, Ordering::Relaxed)?;
    mem.store_u32(RSP_EVENT, 1, Ordering::Relaxed)?;
    fence(Ordering::SeqCst);
    Ok(())
}

fn check(mem: &GrantMapping, slot: usize) -> Result<u32, RingError> {
    let n = ring_size(mem.len(), slot);
    if n == 0 || mem.len() % PAGE_SIZE != 0 {
        return Err(RingError::TooSmall { len: mem.len(), slot });
    }
    Ok(n)
}

/// The backend end: consumes requests, produces responses.
pub struct BackRing {
    mem: GrantMapping,
    slot: usize,
    size: u32,
    req_cons: u32,
    rsp_prod_pvt: u32,
}

impl BackRing {
    /// The back end of the ring in `mem` (`BACK_RING_ATTACH` with indices
    /// taken from the shared page, so a reconnect resumes where it was).
    pub fn new(mem: GrantMapping, slot: usize) -> Result<Self, RingError> {
        let size = check(&mem, slot)?;
        let rsp_prod = mem.load_u32(RSP_PROD, Ordering::Acquire)?;
        Ok(BackRing { mem, slot, size, req_cons: rsp_prod, rsp_prod_pvt: rsp_prod })
    }

    /// Slots in the ring.
    pub fn size(&self) -> u32 {
        self.size
    }

    fn slot_offset(&self, idx: u32) -> usize {
        RING_HEADER + (idx & (self.size - 1)) as usize * self.slot
    }

    /// Requests published and not consumed (`RING_HAS_UNCONSUMED_REQUESTS`,
    /// bounded by the free response slots), or an overflow error.
    pub fn unconsumed(&self) -> Result<u32, RingError> {
        let prod = self.mem.load_u32(REQ_PROD, Ordering::Acquire)?;
        if prod.wrapping_sub(self.rsp_prod_pvt) > self.size {
            return Err(RingError::Overflow { prod, cons: self.rsp_prod_pvt, size: self.size });
        }
        let reqs = prod.wrapping_sub(self.req_cons);
        let rsps = self.size - self.req_cons.wrapping_sub(self.rsp_prod_pvt);
        Ok(reqs.min(rsps))
    }

    /// Copies the next request slot into `out` (exactly one slot long) and
    /// consumes it. Call only while [`Self::unconsumed`] is non-zero.
    pub fn take_request(&mut self, out: &mut [u8]) -> Result<(), RingError> {
        let off = self.slot_offset(self.req_cons);
        self.mem.read(off, &mut out[..self.slot])?;
        self.req_cons = self.req_cons.wrapping_add(1);
        Ok(())
    }

    /// Writes a response (already encoded, at most one slot) to the next
    /// response slot; published by [`Self::push_responses`].
    pub fn put_response(&mut self, rsp: &[u8]) -> Result<(), RingError> {
        let off = self.slot_offset(self.rsp_prod_pvt);
        self.mem.write(off, rsp)?;
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// Publishes the responses written so far; returns whether the frontend
    /// asked to be notified (`RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`).
    pub fn push_responses(&mut self) -> Result<bool, RingError> {
        let old = self.mem.load_u32(RSP_PROD, Ordering::Relaxed)?;
        let new = self.rsp_prod_pvt;
        if old == new {
            return Ok(false);
        }
        // Release: the response slots are visible before the index.
        self.mem.store_u32(RSP_PROD, new, Ordering::Release)?;
        // xen_mb(): the index is visible before we read the frontend's event index.
        fence(Ordering::SeqCst);
        let event = self.mem.load_u32(RSP_EVENT, Ordering::Acquire)?;
        Ok(new.wrapping_sub(event) < new.wrapping_sub(old))
    }

    /// `RING_FINAL_CHECK_FOR_REQUESTS`: whether requests wait; if none do,
    /// asks the frontend to notify for the next one first, then checks again.
    pub fn final_check_for_requests(&mut self) -> Result<bool, RingError> {
        if self.unconsumed()? > 0 {
            return Ok(true);
        }
        self.mem.store_u32(REQ_EVENT, self.req_cons.wrapping_add(1), Ordering::Release)?;
        // xen_mb(): the event index is visible before we look at req_prod again.
        fence(Ordering::SeqCst);
        Ok(self.unconsumed()? > 0)
    }

    /// Requests consumed and not yet answered.
    pub fn outstanding(&self) -> u32 {
        self.req_cons.wrapping_sub(self.rsp_prod_pvt)
    }
}

/// The frontend end: produces requests, consumes responses. `M` is the
/// frontend's view of the ring pages (a mapping, or something owning one).
pub struct FrontRing<M: Borrow<GrantMapping> = GrantMapping> {
    mem: M,
    slot: usize,
    size: u32,
    req_prod_pvt: u32,
    rsp_cons: u32,
}

impl<M: Borrow<GrantMapping>> FrontRing<M> {
    /// Initialises the shared ring in `mem` and returns its front end.
    pub fn new(mem: M, slot: usize) -> Result<Self, RingError> {
        let size = check(mem.borrow(), slot)?;
        init_shared(mem.borrow())?;
        Ok(FrontRing { mem, slot, size, req_prod_pvt: 0, rsp_cons: 0 })
    }

    /// Slots in the ring.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Free request slots (`RING_FULL` when 0).
    pub fn free(&self) -> u32 {
        self.size - self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    fn slot_offset(&self, idx: u32) -> usize {
        RING_HEADER + (idx & (self.size - 1)) as usize * self.slot
    }

    /// Writes a request (at most one slot) to the next free slot; published
    /// by [`Self::push_requests`]. Call only while [`Self::free`] is non-zero.
    pub fn put_request(&mut self, req: &[u8]) -> Result<(), RingError> {
        let off = self.slot_offset(self.req_prod_pvt);
        self.mem.borrow().fill(off, self.slot, 0)?;
        self.mem.borrow().write(off, req)?;
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// Publishes the requests written so far; returns whether the backend
    /// asked to be notified (`RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`).
    pub fn push_requests(&mut self) -> Result<bool, RingError> {
        let old = self.mem.borrow().load_u32(REQ_PROD, Ordering::Relaxed)?;
        let new = self.req_prod_pvt;
        if old == new {
            return Ok(false);
        }
        self.mem.borrow().store_u32(REQ_PROD, new, Ordering::Release)?;
        // xen_mb(): the index is visible before we read the backend's event index.
        fence(Ordering::SeqCst);
        let event = self.mem.borrow().load_u32(REQ_EVENT, Ordering::Acquire)?;
        Ok(new.wrapping_sub(event) < new.wrapping_sub(old))
    }

    /// Responses published and not yet consumed, or an overflow error.
    pub fn unconsumed(&self) -> Result<u32, RingError> {
        let prod = self.mem.borrow().load_u32(RSP_PROD, Ordering::Acquire)?;
        let n = prod.wrapping_sub(self.rsp_cons);
        if n > self.req_prod_pvt.wrapping_sub(self.rsp_cons) {
            return Err(RingError::Overflow { prod, cons: self.rsp_cons, size: self.size });
        }
        Ok(n)
    }

    /// Copies the next response (`out.len()` bytes) and consumes it.
    pub fn take_response(&mut self, out: &mut [u8]) -> Result<(), RingError> {
        let off = self.slot_offset(self.rsp_cons);
        self.mem.borrow().read(off, out)?;
        self.rsp_cons = self.rsp_cons.wrapping_add(1);
        Ok(())
    }

    /// `RING_FINAL_CHECK_FOR_RESPONSES`.
    pub fn final_check_for_responses(&mut self) -> Result<bool, RingError> {
        if self.unconsumed()? > 0 {
            return Ok(true);
        }
        self.mem.borrow().store_u32(RSP_EVENT, self.rsp_cons.wrapping_add(1), Ordering::Release)?;
        // xen_mb(): the event index is visible before we look at rsp_prod again.
        fence(Ordering::SeqCst);
        Ok(self.unconsumed()? > 0)
    }

    /// Writes `value` to the shared request producer index directly (tests
    /// of hostile frontends).
    pub fn force_req_prod(&self, value: u32) -> Result<(), RingError> {
        self.mem.borrow().store_u32(REQ_PROD, value, Ordering::Release)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keeps the shared memory mapped while either end lives.
    struct Keep(#[allow(dead_code)] std::sync::Arc<GrantMapping>);
    impl gnttab::Unmap for Keep {
        fn unmap(&mut self, _: std::ptr::NonNull<u8>, _: usize) {}
    }

    fn pair(pages: usize, slot: usize) -> (FrontRing, BackRing) {
        let len = pages * PAGE_SIZE;
        let shared = std::sync::Arc::new(GrantMapping::anonymous(len).unwrap());
        let addr = std::ptr::NonNull::new(shared.as_ptr()).unwrap();
        // SAFETY: `Keep` holds the anonymous mapping until this view is dropped.
        let front_mem = unsafe { GrantMapping::from_raw(addr, len, true, Box::new(Keep(shared.clone()))) };
        // SAFETY: as above.
        let back_mem = unsafe { GrantMapping::from_raw(addr, len, true, Box::new(Keep(shared))) };
        let front = FrontRing::new(front_mem, slot).unwrap();
        (front, BackRing::new(back_mem, slot).unwrap())
    }

    #[test]
    fn ring_sizes_match_ring_h_for_blkif() {
        assert_eq!(ring_size(PAGE_SIZE, 112), 32);
        assert_eq!(ring_size(PAGE_SIZE, 108), 32);
        assert_eq!(ring_size(4 * PAGE_SIZE, 112), 128);
        assert_eq!(ring_size(16 * PAGE_SIZE, 112), 512);
    }

    #[test]
    fn requests_and_responses_cross_with_notifications_as_ring_h_says() {
        let (mut front, mut back) = pair(1, 112);
        assert!(!back.final_check_for_requests().unwrap());
        front.put_request(&[7u8; 112]).unwrap();
        assert!(front.push_requests().unwrap(), "backend asked for a notification");
        assert_eq!(back.unconsumed().unwrap(), 1);
        let mut slot = [0u8; 112];
        back.take_request(&mut slot).unwrap();
        assert_eq!(slot, [7u8; 112]);
        back.put_response(&[9u8; 16]).unwrap();
        assert!(back.push_responses().unwrap(), "SHARED_RING_INIT asks for the first response");
        back.put_response(&[8u8; 16]).unwrap();
        assert!(!back.push_responses().unwrap(), "frontend has not consumed the first yet");
        let mut rsp = [0u8; 16];
        front.take_response(&mut rsp).unwrap();
        assert_eq!(rsp, [9u8; 16]);
        front.take_response(&mut rsp).unwrap();
        assert_eq!(rsp, [8u8; 16]);
        assert!(!front.final_check_for_responses().unwrap());
        back.put_response(&[7u8; 16]).unwrap();
        assert!(back.push_responses().unwrap(), "final check re-armed rsp_event");
    }

    #[test]
    fn a_producer_index_beyond_the_ring_is_an_overflow() {
        let (front, back) = pair(1, 112);
        front.force_req_prod(1000).unwrap();
        assert!(matches!(back.unconsumed(), Err(RingError::Overflow { prod: 1000, .. })));
    }

    #[test]
    fn a_full_ring_is_consumed_in_order_across_wraparound() {
        let (mut front, mut back) = pair(2, 108);
        let n = front.size();
        for round in 0..3u8 {
            for i in 0..n {
                front.put_request(&[round.wrapping_add(i as u8); 108]).unwrap();
            }
            assert_eq!(front.free(), 0);
            front.push_requests().unwrap();
            assert_eq!(back.unconsumed().unwrap(), n);
            for i in 0..n {
                let mut s = [0u8; 108];
                back.take_request(&mut s).unwrap();
                assert_eq!(s[0], round.wrapping_add(i as u8));
                back.put_response(&[s[0]; 12]).unwrap();
            }
            back.push_responses().unwrap();
            for i in 0..n {
                let mut r = [0u8; 12];
                front.take_response(&mut r).unwrap();
                assert_eq!(r[0], round.wrapping_add(i as u8));
            }
        }
    }
}
