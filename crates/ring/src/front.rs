//! The frontend's end of a ring (`FRONT_RING_*` in `io/ring.h`): it pushes
//! requests and takes responses. Used by simulated frontends and by test
//! frontends on gntalloc pages.

use std::borrow::Borrow;
use std::marker::PhantomData;
use std::sync::atomic::{fence, Ordering};

use gnttab::GrantMapping;

use crate::abi::{entry_size, RingIdx, REQ_EVENT, REQ_PROD, RING_OFFSET, RSP_EVENT, RSP_PROD};
use crate::error::RingError;
use crate::shared::{RingEntry, Shared};

/// `SHARED_RING_INIT`: indices to 0, event indices to 1, padding zeroed.
/// Only the frontend initialises the shared ring.
pub fn init_shared(mem: &GrantMapping) -> Result<(), RingError> {
    if mem.len() < RING_OFFSET {
        return Err(RingError::TooSmall { len: mem.len(), entry: 0 });
    }
    mem.fill(0, RING_OFFSET, 0)?;
    mem.store_u32(REQ_EVENT, 1, Ordering::Relaxed)?;
    // Release: whoever sees the indices also sees the rest of the header.
    mem.store_u32(RSP_EVENT, 1, Ordering::Release)?;
    Ok(())
}

/// The front end of a shared ring of `Req`/`Rsp` entries over `M`.
///
/// It never has more than [`size`](Self::size) requests outstanding, and it
/// checks the backend's `rsp_prod` as the back end checks `req_prod`: a
/// response for a request never published, or an index moving backwards,
/// breaks the ring.
#[derive(Debug)]
pub struct FrontRing<Req, Rsp, M = GrantMapping> {
    shared: Shared<M>,
    /// `req_prod_pvt`: the next request slot, not yet published.
    req_prod_pvt: RingIdx,
    /// `rsp_cons`: the next response to take.
    rsp_cons: RingIdx,
    /// The last `req_prod` published.
    req_prod_published: RingIdx,
    /// The last validated `rsp_prod`.
    rsp_prod_seen: RingIdx,
    broken: bool,
    _entries: PhantomData<fn() -> (Req, Rsp)>,
}

impl<Req: RingEntry, Rsp: RingEntry, M: Borrow<GrantMapping>> FrontRing<Req, Rsp, M> {
    /// Initialises the shared ring and attaches at index 0
    /// (`SHARED_RING_INIT` then `FRONT_RING_INIT`).
    pub fn new(mem: M) -> Result<Self, RingError> {
        let ring = Self::attach(mem, 0)?;
        init_shared(ring.shared.mem())?;
        Ok(ring)
    }

    /// Attaches to an initialised ring with both private indices at `index`
    /// (`FRONT_RING_ATTACH`).
    pub fn attach(mem: M, index: RingIdx) -> Result<Self, RingError> {
        let shared = Shared::new(mem, entry_size::<Req, Rsp>())?;
        Ok(FrontRing {
            shared,
            req_prod_pvt: index,
            rsp_cons: index,
            req_prod_published: index,
            rsp_prod_seen: index,
            broken: false,
            _entries: PhantomData,
        })
    }

    /// Entries in the ring (`RING_SIZE`), a power of two.
    pub fn size(&self) -> u32 {
        self.shared.size()
    }

    /// Slots free for requests (`RING_FREE_REQUESTS`).
    pub fn free_requests(&self) -> u32 {
        self.size() - self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    /// Whether no request can be pushed (`RING_FULL`).
    pub fn is_full(&self) -> bool {
        self.free_requests() == 0
    }

    /// The next request index, published or not (`req_prod_pvt`).
    pub fn req_prod_pvt(&self) -> RingIdx {
        self.req_prod_pvt
    }

    /// The next response index to take (`rsp_cons`).
    pub fn rsp_cons(&self) -> RingIdx {
        self.rsp_cons
    }

    /// Whether an earlier error left the ring unusable.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The shared memory.
    pub fn mapping(&self) -> &GrantMapping {
        self.shared.mem()
    }

    /// Gives the memory back.
    pub fn into_mapping(self) -> M {
        self.shared.into_inner()
    }

    fn fail<T>(&mut self, e: RingError) -> Result<T, RingError> {
        if !self.broken {
            log::warn!("ring broken: {e}");
        }
        self.broken = true;
        Err(e)
    }

    /// Writes a request into the next slot, unpublished until
    /// [`push_requests_and_check_notify`](Self::push_requests_and_check_notify).
    pub fn push_request(&mut self, req: &Req) -> Result<(), RingError> {
        if self.broken {
            return Err(RingError::Broken);
        }
        if self.is_full() {
            return Err(RingError::Full);
        }
        if let Err(e) = self.shared.write(self.req_prod_pvt, req) {
            return self.fail(e);
        }
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`: publishes the requests pushed
    /// and returns whether the backend asked for an event.
    pub fn push_requests_and_check_notify(&mut self) -> Result<bool, RingError> {
        if self.broken {
            return Err(RingError::Broken);
        }
        let old = self.req_prod_published;
        let new = self.req_prod_pvt;
        // Release is xen_wmb(): the backend sees the requests before the index.
        if let Err(e) = self.shared.store(REQ_PROD, new, Ordering::Release) {
            return self.fail(e);
        }
        self.req_prod_published = new;
        // xen_mb(): the backend sees the new req_prod before we read req_event.
        fence(Ordering::SeqCst);
        let event = match self.shared.load(REQ_EVENT, Ordering::Relaxed) {
            Ok(e) => e,
            Err(e) => return self.fail(e),
        };
        Ok(new.wrapping_sub(event) < new.wrapping_sub(old))
    }

    /// Loads the backend's `rsp_prod` and validates it.
    fn refresh(&mut self) -> Result<(), RingError> {
        if self.broken {
            return Err(RingError::Broken);
        }
        // Acquire: response slots are read after the index that publishes them.
        let prod = match self.shared.load(RSP_PROD, Ordering::Acquire) {
            Ok(p) => p,
            Err(e) => return self.fail(e),
        };
        // The backend can only answer requests we published
        // (a stricter RING_RESPONSE_PROD_OVERFLOW).
        let limit = self.req_prod_published.wrapping_sub(self.rsp_cons);
        if prod.wrapping_sub(self.rsp_cons) > limit {
            return self.fail(RingError::Overflow { prod, base: self.rsp_cons, limit });
        }
        // Both lie within `limit` (at most the ring size) past rsp_cons.
        if prod.wrapping_sub(self.rsp_prod_seen) > self.size() {
            return self.fail(RingError::Backwards { seen: self.rsp_prod_seen, prod });
        }
        self.rsp_prod_seen = prod;
        Ok(())
    }

    /// Responses published and not taken (`RING_HAS_UNCONSUMED_RESPONSES`).
    pub fn unconsumed_responses(&mut self) -> Result<u32, RingError> {
        self.refresh()?;
        Ok(self.rsp_prod_seen.wrapping_sub(self.rsp_cons))
    }

    /// Copies the next response out of the ring, or `None` if there is none.
    pub fn next_response(&mut self) -> Result<Option<Rsp>, RingError> {
        if self.broken {
            return Err(RingError::Broken);
        }
        if self.rsp_cons == self.rsp_prod_seen {
            self.refresh()?;
            if self.rsp_cons == self.rsp_prod_seen {
                return Ok(None);
            }
        }
        let rsp = match self.shared.read(self.rsp_cons) {
            Ok(r) => r,
            Err(e) => return self.fail(e),
        };
        self.rsp_cons = self.rsp_cons.wrapping_add(1);
        Ok(Some(rsp))
    }

    /// Takes up to `budget` responses into `out` and returns how many.
    pub fn take_responses(&mut self, budget: usize, out: &mut Vec<Rsp>) -> Result<usize, RingError> {
        if self.broken {
            return Err(RingError::Broken);
        }
        let mut n = 0;
        while n < budget {
            match self.next_response()? {
                Some(r) => out.push(r),
                None => break,
            }
            n += 1;
        }
        Ok(n)
    }

    /// `RING_FINAL_CHECK_FOR_RESPONSES`: whether responses are waiting; if
    /// none, asks for an event on the next one (`rsp_event = rsp_cons + 1`)
    /// and checks again.
    pub fn final_check_for_responses(&mut self) -> Result<bool, RingError> {
        if self.unconsumed_responses()? > 0 {
            return Ok(true);
        }
        if let Err(e) = self.shared.store(RSP_EVENT, self.rsp_cons.wrapping_add(1), Ordering::Relaxed) {
            return self.fail(e);
        }
        // xen_mb(): the backend sees rsp_event before we read rsp_prod again.
        fence(Ordering::SeqCst);
        Ok(self.unconsumed_responses()? > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{req, TestReq, TestRsp};

    type Front = FrontRing<TestReq, TestRsp>;

    #[test]
    fn new_initialises_the_shared_header() {
        let mem = GrantMapping::anonymous(4096).unwrap();
        mem.fill(0, 64, 0xaa).unwrap();
        let front = Front::new(mem).unwrap();
        let m = front.mapping();
        let idx: Vec<u32> = [REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT]
            .iter()
            .map(|&o| m.load_u32(o, Ordering::Relaxed).unwrap())
            .collect();
        assert_eq!(idx, vec![0, 1, 0, 1]);
        let mut pad = [0xffu8; 48];
        m.read(16, &mut pad).unwrap();
        assert_eq!(pad, [0u8; 48]);
    }

    #[test]
    fn front_stops_at_ring_size_outstanding_requests() {
        let mut front = Front::new(GrantMapping::anonymous(4096).unwrap()).unwrap();
        for id in 0..32 {
            front.push_request(&req(id)).unwrap();
        }
        assert!(front.is_full());
        assert!(matches!(front.push_request(&req(32)), Err(RingError::Full)));
        assert!(!front.is_broken());
    }

    #[test]
    fn responses_for_unpublished_requests_break_the_ring() {
        let mut front = Front::new(GrantMapping::anonymous(4096).unwrap()).unwrap();
        front.push_request(&req(0)).unwrap();
        front.push_request(&req(1)).unwrap();
        front.push_requests_and_check_notify().unwrap();
        front.push_request(&req(2)).unwrap();
        // Three responses, but only two requests were published.
        front.mapping().store_u32(RSP_PROD, 3, Ordering::Release).unwrap();
        assert!(matches!(front.next_response(), Err(RingError::Overflow { prod: 3, base: 0, limit: 2 })));
        assert!(matches!(front.next_response(), Err(RingError::Broken)));
    }

    #[test]
    fn rsp_prod_going_backwards_breaks_the_ring() {
        let mut front = Front::new(GrantMapping::anonymous(4096).unwrap()).unwrap();
        for id in 0..4 {
            front.push_request(&req(id)).unwrap();
        }
        front.push_requests_and_check_notify().unwrap();
        front.mapping().store_u32(RSP_PROD, 3, Ordering::Release).unwrap();
        front.next_response().unwrap().unwrap();
        front.mapping().store_u32(RSP_PROD, 2, Ordering::Release).unwrap();
        assert!(matches!(front.unconsumed_responses(), Err(RingError::Backwards { seen: 3, prod: 2 })));
    }
}
