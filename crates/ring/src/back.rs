//! The backend's end of a ring (`BACK_RING_*` in `io/ring.h`): it takes
//! requests and puts responses.

use std::borrow::Borrow;
use std::marker::PhantomData;
use std::sync::atomic::{fence, Ordering};

use gnttab::GrantMapping;

use crate::abi::{entry_size, RingIdx, REQ_EVENT, REQ_PROD, RSP_EVENT, RSP_PROD};
use crate::error::RingError;
use crate::shared::{RingEntry, Shared};

/// The back end of a shared ring of `Req`/`Rsp` entries over `M` (a
/// [`GrantMapping`], or an `Arc`/reference to one).
///
/// Requests are copied out of the ring once and returned by value; validate
/// the copy. The frontend's `req_prod` is checked on every load: more
/// requests than the ring can hold, or an index moving backwards, is an error
/// that breaks the ring ([`RingError::Overflow`], [`RingError::Backwards`]),
/// never a panic or an access outside the ring. Every loop is bounded by the
/// ring size or a caller's budget.
#[derive(Debug)]
pub struct BackRing<Req, Rsp, M = GrantMapping> {
    shared: Shared<M>,
    /// `req_cons`: the next request to take.
    req_cons: RingIdx,
    /// `rsp_prod_pvt`: the next response slot, not yet published.
    rsp_prod_pvt: RingIdx,
    /// The last validated `req_prod`; the frontend's value is checked against it.
    req_prod_seen: RingIdx,
    /// The last `rsp_prod` published (kept here: the guest may scribble on the shared one).
    rsp_prod_published: RingIdx,
    broken: bool,
    _entries: PhantomData<fn() -> (Req, Rsp)>,
}

impl<Req: RingEntry, Rsp: RingEntry, M: Borrow<GrantMapping>> BackRing<Req, Rsp, M> {
    /// Attaches to a ring the frontend initialised, at index 0 (`BACK_RING_INIT`).
    pub fn new(mem: M) -> Result<Self, RingError> {
        Self::attach(mem, 0)
    }

    /// Attaches with both private indices at `index` (`BACK_RING_ATTACH`), for
    /// a ring already in use.
    pub fn attach(mem: M, index: RingIdx) -> Result<Self, RingError> {
        let shared = Shared::new(mem, entry_size::<Req, Rsp>())?;
        Ok(BackRing {
            shared,
            req_cons: index,
            rsp_prod_pvt: index,
            req_prod_seen: index,
            rsp_prod_published: index,
            broken: false,
            _entries: PhantomData,
        })
    }

    /// Takes over a ring in use from a previous backend that answered every
    /// request it took (a backend restart): both private indices at the
    /// published `rsp_prod`, so the requests after it are taken next. The
    /// value is the guest's to scribble on; a bad one is caught as an
    /// overflow by the first request load, as any bad index is.
    pub fn resume(mem: M) -> Result<Self, RingError> {
        let shared = Shared::new(mem, entry_size::<Req, Rsp>())?;
        // Acquire: pairs with the previous backend's release of rsp_prod.
        let index = shared.load(RSP_PROD, Ordering::Acquire)?;
        Self::attach(shared.into_inner(), index)
    }

    /// Entries in the ring (`RING_SIZE`), a power of two.
    pub fn size(&self) -> u32 {
        self.shared.size()
    }

    /// The next request index to take (`req_cons`).
    pub fn req_cons(&self) -> RingIdx {
        self.req_cons
    }

    /// The next response index, published or not (`rsp_prod_pvt`).
    pub fn rsp_prod_pvt(&self) -> RingIdx {
        self.rsp_prod_pvt
    }

    /// Whether an earlier error left the ring unusable.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The shared memory.
    pub fn mapping(&self) -> &GrantMapping {
        self.shared.mem()
    }

    /// Gives the memory back (to unmap it).
    pub fn into_mapping(self) -> M {
        self.shared.into_inner()
    }

    /// Requests taken that have no response yet: how many responses may be
    /// pushed now.
    pub fn free_response_slots(&self) -> u32 {
        self.req_cons.wrapping_sub(self.rsp_prod_pvt)
    }

    fn fail<T>(&mut self, e: RingError) -> Result<T, RingError> {
        if !self.broken {
            log::warn!("ring broken: {e}");
        }
        self.broken = true;
        Err(e)
    }

    /// Loads the frontend's `req_prod` and validates it.
    fn refresh(&mut self) -> Result<(), RingError> {
        if self.broken {
            return Err(RingError::Broken);
        }
        // Acquire: the request slots below req_prod are read after the index
        // (ring.h: `rp = sring->req_prod; xen_rmb();`).
        let prod = match self.shared.load(REQ_PROD, Ordering::Acquire) {
            Ok(p) => p,
            Err(e) => return self.fail(e),
        };
        let size = self.size();
        // RING_REQUEST_PROD_OVERFLOW: the frontend can have at most `size`
        // requests outstanding, counted from the oldest one not answered.
        if prod.wrapping_sub(self.rsp_prod_pvt) > size {
            return self.fail(RingError::Overflow { prod, base: self.rsp_prod_pvt, limit: size });
        }
        // Both `prod` and `req_prod_seen` lie within `size` past rsp_prod_pvt,
        // so `prod` behind `req_prod_seen` shows as a difference beyond `size`.
        if prod.wrapping_sub(self.req_prod_seen) > size {
            return self.fail(RingError::Backwards { seen: self.req_prod_seen, prod });
        }
        self.req_prod_seen = prod;
        Ok(())
    }

    /// Requests published and not taken (`RING_HAS_UNCONSUMED_REQUESTS`),
    /// after validating `req_prod`.
    pub fn unconsumed_requests(&mut self) -> Result<u32, RingError> {
        self.refresh()?;
        Ok(self.req_prod_seen.wrapping_sub(self.req_cons))
    }

    /// Copies the next request out of the ring, or `None` if there is none.
    /// `req_prod` is reloaded only once the requests seen are taken.
    pub fn next_request(&mut self) -> Result<Option<Req>, RingError> {
        if self.broken {
            return Err(RingError::Broken);
        }
        if self.req_cons == self.req_prod_seen {
            self.refresh()?;
            if self.req_cons == self.req_prod_seen {
                return Ok(None);
            }
        }
        // RING_REQUEST_CONS_OVERFLOW cannot hold: req_prod_seen is at most
        // `size` past rsp_prod_pvt and req_cons is behind it.
        debug_assert!(self.req_cons.wrapping_sub(self.rsp_prod_pvt) < self.size());
        let req = match self.shared.read(self.req_cons) {
            Ok(r) => r,
            Err(e) => return self.fail(e),
        };
        self.req_cons = self.req_cons.wrapping_add(1);
        Ok(Some(req))
    }

    /// Takes up to `budget` requests into `out` (so one busy guest cannot
    /// starve others) and returns how many.
    pub fn take_requests(&mut self, budget: usize, out: &mut Vec<Req>) -> Result<usize, RingError> {
        if self.broken {
            return Err(RingError::Broken);
        }
        let mut n = 0;
        while n < budget {
            match self.next_request()? {
                Some(r) => out.push(r),
                None => break,
            }
            n += 1;
        }
        Ok(n)
    }

    /// `RING_FINAL_CHECK_FOR_REQUESTS`: whether requests are waiting; if none,
    /// asks for an event on the next one (`req_event = req_cons + 1`) and
    /// checks again, so a request published meanwhile is not missed. Call it
    /// before going to sleep on the event channel.
    pub fn final_check_for_requests(&mut self) -> Result<bool, RingError> {
        if self.unconsumed_requests()? > 0 {
            return Ok(true);
        }
        if let Err(e) = self.shared.store(REQ_EVENT, self.req_cons.wrapping_add(1), Ordering::Relaxed) {
            return self.fail(e);
        }
        // xen_mb(): the frontend must see req_event before we read req_prod
        // again, or it could skip the event while we miss its request.
        fence(Ordering::SeqCst);
        Ok(self.unconsumed_requests()? > 0)
    }

    /// Writes a response into the next slot, unpublished until
    /// [`push_responses_and_check_notify`](Self::push_responses_and_check_notify).
    /// Fails if every request taken already has its response: a response
    /// beyond that would overwrite a request the frontend has queued.
    pub fn push_response(&mut self, rsp: &Rsp) -> Result<(), RingError> {
        if self.broken {
            return Err(RingError::Broken);
        }
        if self.free_response_slots() == 0 {
            return Err(RingError::NoRequestPending);
        }
        if let Err(e) = self.shared.write(self.rsp_prod_pvt, rsp) {
            return self.fail(e);
        }
        self.rsp_prod_pvt = self.rsp_prod_pvt.wrapping_add(1);
        Ok(())
    }

    /// `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`: publishes the responses pushed
    /// and returns whether the frontend asked for an event (its `rsp_event`
    /// lies in the range just published).
    pub fn push_responses_and_check_notify(&mut self) -> Result<bool, RingError> {
        if self.broken {
            return Err(RingError::Broken);
        }
        let old = self.rsp_prod_published;
        let new = self.rsp_prod_pvt;
        // Release is ring.h's xen_wmb(): the frontend sees the responses
        // before the index that publishes them.
        if let Err(e) = self.shared.store(RSP_PROD, new, Ordering::Release) {
            return self.fail(e);
        }
        self.rsp_prod_published = new;
        // xen_mb(): the frontend sees the new rsp_prod before we read
        // rsp_event, so either it sees our responses or we see its request
        // for an event.
        fence(Ordering::SeqCst);
        let event = match self.shared.load(RSP_EVENT, Ordering::Relaxed) {
            Ok(e) => e,
            Err(e) => return self.fail(e),
        };
        Ok(new.wrapping_sub(event) < new.wrapping_sub(old))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::front::FrontRing;
    use crate::testing::{req, rsp, TestReq, TestRsp};

    type Back = BackRing<TestReq, TestRsp, std::sync::Arc<GrantMapping>>;
    type Front = FrontRing<TestReq, TestRsp, std::sync::Arc<GrantMapping>>;

    fn pair(pages: usize) -> (Front, Back) {
        let mem = std::sync::Arc::new(GrantMapping::anonymous(pages * 4096).unwrap());
        let front = Front::new(mem.clone()).unwrap();
        let back = Back::new(mem).unwrap();
        (front, back)
    }

    #[test]
    fn back_takes_requests_in_order_and_front_gets_responses() {
        let (mut front, mut back) = pair(1);
        for id in 0..5 {
            front.push_request(&req(id)).unwrap();
        }
        assert!(front.push_requests_and_check_notify().unwrap());
        for id in 0..5 {
            let r = back.next_request().unwrap().unwrap();
            assert_eq!(r.id, id);
            back.push_response(&rsp(id)).unwrap();
        }
        assert!(back.next_request().unwrap().is_none());
        assert!(back.push_responses_and_check_notify().unwrap());
        let mut got = Vec::new();
        assert_eq!(front.take_responses(usize::MAX, &mut got).unwrap(), 5);
        assert_eq!(got.iter().map(|r| r.id).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn resumed_backend_takes_the_requests_its_predecessor_left() {
        let (mut front, mut back) = pair(1);
        for id in 0..3 {
            front.push_request(&req(id)).unwrap();
        }
        front.push_requests_and_check_notify().unwrap();
        for _ in 0..3 {
            let r = back.next_request().unwrap().unwrap();
            back.push_response(&rsp(r.id)).unwrap();
        }
        back.push_responses_and_check_notify().unwrap();
        let mem = back.into_mapping();
        // Published while no backend was attached.
        for id in 3..5 {
            front.push_request(&req(id)).unwrap();
        }
        front.push_requests_and_check_notify().unwrap();

        let mut back = Back::resume(mem).unwrap();
        assert_eq!((back.req_cons(), back.rsp_prod_pvt()), (3, 3));
        let mut got = Vec::new();
        back.take_requests(usize::MAX, &mut got).unwrap();
        assert_eq!(got.iter().map(|r| r.id).collect::<Vec<_>>(), vec![3, 4]);
        for r in &got {
            back.push_response(&rsp(r.id)).unwrap();
        }
        back.push_responses_and_check_notify().unwrap();
        let mut rsps = Vec::new();
        front.take_responses(usize::MAX, &mut rsps).unwrap();
        assert_eq!(rsps.iter().map(|r| r.id).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn resume_on_a_scribbled_rsp_prod_breaks_the_ring_instead_of_reading_garbage() {
        let (mut front, back) = pair(1);
        front.push_request(&req(1)).unwrap();
        front.push_requests_and_check_notify().unwrap();
        let mem = back.into_mapping();
        mem.store_u32(RSP_PROD, 0x8000_0000, Ordering::Relaxed).unwrap();
        let mut back = Back::resume(mem).unwrap();
        assert!(matches!(back.next_request(), Err(RingError::Overflow { .. })));
        assert!(back.is_broken());
    }

    #[test]
    fn take_requests_stops_at_the_budget() {
        let (mut front, mut back) = pair(1);
        for id in 0..10 {
            front.push_request(&req(id)).unwrap();
        }
        front.push_requests_and_check_notify().unwrap();
        let mut out = Vec::new();
        assert_eq!(back.take_requests(4, &mut out).unwrap(), 4);
        assert_eq!(back.unconsumed_requests().unwrap(), 6);
        assert_eq!(back.take_requests(100, &mut out).unwrap(), 6);
        assert_eq!(out.last().unwrap().id, 9);
    }

    #[test]
    fn request_is_a_copy_the_frontend_cannot_change() {
        let (mut front, mut back) = pair(1);
        front.push_request(&req(7)).unwrap();
        front.push_requests_and_check_notify().unwrap();
        let r = back.next_request().unwrap().unwrap();
        // The guest rewrites the slot after we took it.
        back.mapping().fill(crate::abi::RING_OFFSET, 112, 0xff).unwrap();
        assert_eq!(r.id, 7);
        assert_eq!(r.body[0], 7);
    }

    #[test]
    fn runaway_req_prod_breaks_the_ring() {
        let (_front, mut back) = pair(1);
        back.mapping().store_u32(REQ_PROD, 33, Ordering::Release).unwrap();
        assert!(matches!(back.next_request(), Err(RingError::Overflow { prod: 33, base: 0, limit: 32 })));
        assert!(back.is_broken());
        assert!(matches!(back.next_request(), Err(RingError::Broken)));
        assert!(matches!(back.final_check_for_requests(), Err(RingError::Broken)));
    }

    #[test]
    fn broken_ring_fails_even_a_zero_budget() {
        // Found by the ring_back fuzz target: take_requests(0) returned Ok(0).
        let (_front, mut back) = pair(1);
        back.mapping().store_u32(REQ_PROD, 40, Ordering::Release).unwrap();
        assert!(back.next_request().is_err());
        assert!(matches!(back.take_requests(0, &mut Vec::new()), Err(RingError::Broken)));
    }

    #[test]
    fn full_ring_of_requests_is_accepted() {
        let (_front, mut back) = pair(1);
        back.mapping().store_u32(REQ_PROD, 32, Ordering::Release).unwrap();
        let mut out = Vec::new();
        assert_eq!(back.take_requests(usize::MAX, &mut out).unwrap(), 32);
    }

    #[test]
    fn requests_beyond_unanswered_ones_are_an_overflow() {
        let (_front, mut back) = pair(1);
        back.mapping().store_u32(REQ_PROD, 20, Ordering::Release).unwrap();
        let mut out = Vec::new();
        back.take_requests(usize::MAX, &mut out).unwrap();
        // 20 unanswered: the frontend may publish 12 more, not 13.
        back.mapping().store_u32(REQ_PROD, 33, Ordering::Release).unwrap();
        assert!(matches!(back.next_request(), Err(RingError::Overflow { prod: 33, .. })));
    }

    #[test]
    fn req_prod_going_backwards_breaks_the_ring() {
        let (_front, mut back) = pair(1);
        back.mapping().store_u32(REQ_PROD, 10, Ordering::Release).unwrap();
        back.next_request().unwrap().unwrap();
        back.mapping().store_u32(REQ_PROD, 5, Ordering::Release).unwrap();
        // The 9 requests already seen are taken before the index is reloaded.
        let mut out = Vec::new();
        assert_eq!(back.take_requests(9, &mut out).unwrap(), 9);
        assert!(matches!(back.next_request(), Err(RingError::Backwards { seen: 10, prod: 5 })));
    }

    #[test]
    fn req_prod_going_backwards_but_ahead_of_req_cons_is_detected() {
        let (_front, mut back) = pair(1);
        back.mapping().store_u32(REQ_PROD, 10, Ordering::Release).unwrap();
        back.next_request().unwrap().unwrap();
        back.mapping().store_u32(REQ_PROD, 5, Ordering::Release).unwrap();
        assert!(matches!(back.unconsumed_requests(), Err(RingError::Backwards { seen: 10, prod: 5 })));
    }

    #[test]
    fn req_prod_far_behind_is_an_overflow_not_a_huge_batch() {
        let (_front, mut back) = pair(1);
        back.mapping().store_u32(REQ_PROD, u32::MAX, Ordering::Release).unwrap();
        assert!(matches!(back.next_request(), Err(RingError::Overflow { prod: u32::MAX, .. })));
    }

    #[test]
    fn indices_wrap_around_u32_max() {
        let mem = std::sync::Arc::new(GrantMapping::anonymous(4096).unwrap());
        let start = u32::MAX - 3;
        for off in [REQ_PROD, RSP_PROD] {
            mem.store_u32(off, start, Ordering::Relaxed).unwrap();
        }
        for off in [REQ_EVENT, RSP_EVENT] {
            mem.store_u32(off, start.wrapping_add(1), Ordering::Relaxed).unwrap();
        }
        let mut front = Front::attach(mem.clone(), start).unwrap();
        let mut back = Back::attach(mem, start).unwrap();
        for round in 0..3u64 {
            for i in 0..20 {
                front.push_request(&req(round * 100 + i)).unwrap();
            }
            front.push_requests_and_check_notify().unwrap();
            for i in 0..20 {
                let r = back.next_request().unwrap().unwrap();
                assert_eq!(r.id, round * 100 + i);
                back.push_response(&rsp(r.id)).unwrap();
            }
            back.push_responses_and_check_notify().unwrap();
            for i in 0..20 {
                assert_eq!(front.next_response().unwrap().unwrap().id, round * 100 + i);
            }
        }
        assert_eq!(back.req_cons(), start.wrapping_add(60));
        assert!(back.req_cons() < start);
    }

    #[test]
    fn response_without_a_request_is_refused() {
        let (mut front, mut back) = pair(1);
        assert!(matches!(back.push_response(&rsp(0)), Err(RingError::NoRequestPending)));
        front.push_request(&req(1)).unwrap();
        front.push_requests_and_check_notify().unwrap();
        back.next_request().unwrap().unwrap();
        assert_eq!(back.free_response_slots(), 1);
        back.push_response(&rsp(1)).unwrap();
        assert!(matches!(back.push_response(&rsp(2)), Err(RingError::NoRequestPending)));
        // A refused response does not break the ring.
        assert!(!back.is_broken());
    }

    #[test]
    fn final_check_asks_for_an_event_on_the_next_request() {
        let (mut front, mut back) = pair(1);
        front.push_request(&req(1)).unwrap();
        front.push_requests_and_check_notify().unwrap();
        assert!(back.final_check_for_requests().unwrap());
        back.next_request().unwrap().unwrap();
        assert!(!back.final_check_for_requests().unwrap());
        assert_eq!(back.mapping().load_u32(REQ_EVENT, Ordering::Relaxed).unwrap(), 2);
        front.push_request(&req(2)).unwrap();
        assert!(front.push_requests_and_check_notify().unwrap());
    }

    #[test]
    fn frontend_not_waiting_gets_no_event() {
        let (mut front, mut back) = pair(1);
        for id in 0..3 {
            front.push_request(&req(id)).unwrap();
        }
        front.push_requests_and_check_notify().unwrap();
        let mut out = Vec::new();
        back.take_requests(3, &mut out).unwrap();
        // The frontend's rsp_event is 1: the first response crosses it.
        back.push_response(&rsp(0)).unwrap();
        assert!(back.push_responses_and_check_notify().unwrap());
        // The frontend has not re-armed rsp_event: no more events.
        back.push_response(&rsp(1)).unwrap();
        assert!(!back.push_responses_and_check_notify().unwrap());
        // Once it has consumed and re-armed, the next response notifies.
        front.take_responses(usize::MAX, &mut Vec::new()).unwrap();
        assert!(!front.final_check_for_responses().unwrap());
        back.push_response(&rsp(2)).unwrap();
        assert!(back.push_responses_and_check_notify().unwrap());
    }

    #[test]
    fn ring_sizes_follow_the_page_count() {
        for (pages, size) in [(1, 32), (2, 64), (4, 128), (8, 256)] {
            let (front, back) = pair(pages);
            assert_eq!(back.size(), size);
            assert_eq!(front.size(), size);
        }
    }

    #[test]
    fn mapping_too_small_for_one_entry_is_refused() {
        let mem = GrantMapping::anonymous(64 + 100).unwrap();
        let r = BackRing::<TestReq, TestRsp>::new(mem);
        assert!(matches!(r, Err(RingError::TooSmall { len: 164, entry: 112 })));
    }
}
