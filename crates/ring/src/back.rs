//! The backend's end of a ring (`BACK_RING_*` in `io/ring.h`): it takes
//! requests and puts responses.

use std::borrow::Borrow;
use std::marker::PhantomData;
use std::sync::atomic::{fence, Ordering};

use gnttab::GrantMapping;

use crate::abi::{entry_size, RingIdx, REQ_EVENT, REQ_PROD, RSP_EVENT, RSP_PROD};
use crate::error::RingError;
use crate::journal::{Journal, JournalFile, Ticket};
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
///
/// With a journal ([`BackRing::new_journaled`]), every request taken is
/// recorded before its slot can be reused, and [`BackRing::resume`] after
/// any kind of exit hands out the requests the previous backend took and did
/// not answer (published) again, then goes on with the ring.
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
    journal: Option<Journal>,
    /// Requests to hand out from the journal before the ring's, last first.
    replay: Vec<Ticket>,
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
            journal: None,
            replay: Vec::new(),
            broken: false,
            _entries: PhantomData,
        })
    }

    /// As [`BackRing::new`], recording every request taken in `journal`
    /// (created anew) so that a later process can [`resume`](Self::resume)
    /// exactly.
    pub fn new_journaled(mem: M, journal: JournalFile) -> Result<Self, RingError> {
        let mut ring = Self::attach(mem, 0)?;
        ring.journal = Some(Journal::create(journal, ring.size(), entry_size::<Req, Rsp>(), 0)?);
        Ok(ring)
    }

    /// [`BackRing::resume`] when `resume` (a backend taking over from a
    /// previous process), else [`BackRing::new_journaled`] or, without a
    /// journal, [`BackRing::new`].
    pub fn open(mem: M, journal: Option<JournalFile>, resume: bool) -> Result<Self, RingError> {
        match (resume, journal) {
            (true, journal) => Self::resume(mem, journal),
            (false, Some(journal)) => Self::new_journaled(mem, journal),
            (false, None) => Self::new(mem),
        }
    }

    /// Takes over a ring in use from a previous backend process, after a
    /// clean stop or a crash.
    ///
    /// With the previous backend's `journal`: responses go on from the
    /// published `rsp_prod`; the requests it took and did not answer
    /// (published) are handed out first, from the journal, in the order it
    /// took them; then the ring's own from its `req_cons`. Each request the
    /// guest queued is thus answered once, and no response slot is ever
    /// read as a request. The journal goes on being kept.
    ///
    /// Without one, only a ring with no request pending (`req_prod ==
    /// rsp_prod`) is resumed; any other is [`RingError::NotResumable`].
    ///
    /// `rsp_prod` is the guest's to scribble on: a value the journal does
    /// not account for is [`RingError::JournalMismatch`].
    pub fn resume(mem: M, journal: Option<JournalFile>) -> Result<Self, RingError> {
        let shared = Shared::new(mem, entry_size::<Req, Rsp>())?;
        // Acquire: pairs with the previous backend's release of rsp_prod.
        let rsp_prod = shared.load(RSP_PROD, Ordering::Acquire)?;
        let Some(journal) = journal else {
            let req_prod = shared.load(REQ_PROD, Ordering::Acquire)?;
            let pending = req_prod.wrapping_sub(rsp_prod);
            if pending != 0 {
                return Err(RingError::NotResumable { rsp_prod, pending });
            }
            return Self::attach(shared.into_inner(), rsp_prod);
        };
        let mut journal = Journal::open(journal, shared.size(), entry_size::<Req, Rsp>())?;
        let (req_cons, mut replay) = journal.recover(rsp_prod)?;
        let mut ring = Self::attach(shared.into_inner(), rsp_prod)?;
        ring.req_cons = req_cons;
        ring.req_prod_seen = req_cons;
        if !replay.is_empty() {
            log::info!("resuming a ring at rsp_prod {rsp_prod}: {} request(s) again from the journal", replay.len());
        }
        replay.reverse();
        ring.replay = replay;
        ring.journal = Some(journal);
        Ok(ring)
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
        Ok(self.replay.len() as u32 + self.req_prod_seen.wrapping_sub(self.req_cons))
    }

    /// Copies the next request out of the ring, or `None` if there is none.
    /// `req_prod` is reloaded only once the requests seen are taken. On a
    /// journaled ring use [`BackRing::take_request`].
    pub fn next_request(&mut self) -> Result<Option<Req>, RingError> {
        Ok(self.take_request()?.map(|(_, req)| req))
    }

    /// The next request and its [`Ticket`], to give back with its response
    /// to [`BackRing::answer`]: after a resume, first the requests again
    /// from the journal, then the ring's.
    pub fn take_request(&mut self) -> Result<Option<(Ticket, Req)>, RingError> {
        if self.broken {
            return Err(RingError::Broken);
        }
        if let (Some(&t), Some(j)) = (self.replay.last(), &self.journal) {
            let req = match j.read(t) {
                Ok(r) => r,
                Err(e) => return self.fail(e),
            };
            self.replay.pop();
            return Ok(Some((t, req)));
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
        let req: Req = match self.shared.read(self.req_cons) {
            Ok(r) => r,
            Err(e) => return self.fail(e),
        };
        let ticket = match &mut self.journal {
            None => Ticket(0),
            Some(j) => match j.take(self.req_cons, req.as_bytes()) {
                Ok(Some(t)) => t,
                // More outstanding than the ring holds: the frontend
                // queued requests over responses it was not given yet.
                Ok(None) => {
                    let e = RingError::Overflow {
                        prod: self.req_prod_seen,
                        base: self.rsp_prod_published,
                        limit: self.size(),
                    };
                    return self.fail(e);
                }
                Err(e) => return self.fail(e),
            },
        };
        self.req_cons = self.req_cons.wrapping_add(1);
        Ok(Some((ticket, req)))
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
    /// beyond that would overwrite a request the frontend has queued. On a
    /// journaled ring use [`BackRing::answer`].
    pub fn push_response(&mut self, rsp: &Rsp) -> Result<(), RingError> {
        if self.journal.is_some() {
            return Err(RingError::TicketRequired);
        }
        self.write_response(rsp)
    }

    /// [`BackRing::push_response`] for the request of `ticket`, which the
    /// journal then counts answered (a ticket not outstanding is refused,
    /// as a response with no request is).
    pub fn answer(&mut self, ticket: Ticket, rsp: &Rsp) -> Result<(), RingError> {
        if let Some(j) = &self.journal {
            if !j.is_taken(ticket)? {
                return Err(RingError::NoRequestPending);
            }
        }
        let at = self.rsp_prod_pvt;
        self.write_response(rsp)?;
        if let Some(j) = &mut self.journal {
            if let Err(e) = j.answer(ticket, at) {
                return self.fail(e);
            }
        }
        Ok(())
    }

    fn write_response(&mut self, rsp: &Rsp) -> Result<(), RingError> {
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
        if let Some(j) = &self.journal {
            if let Err(e) = j.publishing(new) {
                return self.fail(e);
            }
        }
        // Release is ring.h's xen_wmb(): the frontend sees the responses
        // before the index that publishes them (and the journal's note
        // comes before it).
        if let Err(e) = self.shared.store(RSP_PROD, new, Ordering::Release) {
            return self.fail(e);
        }
        self.rsp_prod_published = new;
        // xen_mb(): the frontend sees the new rsp_prod before we read
        // rsp_event, so either it sees our responses or we see its request
        // for an event.
        fence(Ordering::SeqCst);
        if let Some(j) = &mut self.journal {
            if let Err(e) = j.published(new) {
                return self.fail(e);
            }
        }
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
    use crate::testing::{journal, reopen, req, rsp, TestReq, TestRsp};

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
    #[cfg_attr(miri, ignore = "the journal is a mapped file, which Miri cannot map")]
    fn resumed_backend_takes_the_requests_its_predecessor_left() {
        let (mut front, back) = pair(1);
        let (journal, path) = journal("left");
        let mut back = Back::new_journaled(back.into_mapping(), journal).unwrap();
        for id in 0..3 {
            front.push_request(&req(id)).unwrap();
        }
        front.push_requests_and_check_notify().unwrap();
        for _ in 0..3 {
            let (t, r) = back.take_request().unwrap().unwrap();
            back.answer(t, &rsp(r.id)).unwrap();
        }
        back.push_responses_and_check_notify().unwrap();
        let mem = back.into_mapping();
        // Published while no backend was attached.
        for id in 3..5 {
            front.push_request(&req(id)).unwrap();
        }
        front.push_requests_and_check_notify().unwrap();

        let mut back = Back::resume(mem, Some(reopen(&path, false))).unwrap();
        assert_eq!((back.req_cons(), back.rsp_prod_pvt()), (3, 3));
        let mut got = Vec::new();
        while let Some(taken) = back.take_request().unwrap() {
            got.push(taken);
        }
        assert_eq!(got.iter().map(|(_, r)| r.id).collect::<Vec<_>>(), vec![3, 4]);
        for (t, r) in &got {
            back.answer(*t, &rsp(r.id)).unwrap();
        }
        assert!(matches!(back.answer(got[0].0, &rsp(3)), Err(RingError::NoRequestPending)), "answered twice");
        assert!(matches!(back.push_response(&rsp(3)), Err(RingError::TicketRequired)));
        back.push_responses_and_check_notify().unwrap();
        let mut rsps = Vec::new();
        front.take_responses(usize::MAX, &mut rsps).unwrap();
        assert_eq!(rsps.iter().map(|r| r.id).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    #[cfg_attr(miri, ignore = "the journal is a mapped file, which Miri cannot map")]
    fn crash_with_unpublished_responses_replays_from_the_journal_not_the_slots() {
        // The case: requests answered out of order, one response
        // published, one written and not published, one in flight, one not
        // taken.
        let (mut front, back) = pair(1);
        let (journal, path) = journal("crash");
        let mut back = Back::new_journaled(back.into_mapping(), journal).unwrap();
        for id in [0x101, 0x102, 0x103, 0x104] {
            front.push_request(&req(id)).unwrap();
        }
        front.push_requests_and_check_notify().unwrap();
        let taken: Vec<_> = (0..3).map(|_| back.take_request().unwrap().unwrap()).collect();
        back.answer(taken[1].0, &rsp(taken[1].1.id)).unwrap();
        back.push_responses_and_check_notify().unwrap();
        back.answer(taken[0].0, &rsp(taken[0].1.id)).unwrap();
        let mem = back.into_mapping(); // killed before publishing
        assert_eq!(front.next_response().unwrap().unwrap().id, 0x102);

        let mut back = Back::resume(mem, Some(reopen(&path, false))).unwrap();
        let mut got = Vec::new();
        while let Some((_, r)) = back.take_request().unwrap() {
            got.push(r);
        }
        assert_eq!(got.iter().map(|r| r.id).collect::<Vec<_>>(), vec![0x101, 0x103, 0x104]);
        assert!(got.iter().all(|r| r.body == req(r.id).body), "every request as the guest wrote it");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn without_a_journal_only_a_ring_with_nothing_pending_is_resumed() {
        let (mut front, back) = pair(1);
        let mem = back.into_mapping();
        let back = Back::resume(mem, None).unwrap();
        assert_eq!(back.req_cons(), 0);
        front.push_request(&req(1)).unwrap();
        front.push_requests_and_check_notify().unwrap();
        let r = Back::resume(back.into_mapping(), None);
        assert!(matches!(r, Err(RingError::NotResumable { rsp_prod: 0, pending: 1 })), "{r:?}");
    }

    #[test]
    #[cfg_attr(miri, ignore = "the journal is a mapped file, which Miri cannot map")]
    fn a_journal_of_another_ring_or_an_unfinished_one_is_refused() {
        let (_front, back) = pair(1);
        let (journal, path) = journal("other");
        let back = Back::new_journaled(back.into_mapping(), journal).unwrap();
        let mem = back.into_mapping();
        let f = std::fs::File::options().read(true).write(true).open(&path).unwrap();
        let r = Back::resume(mem, Some(crate::JournalFile::new(f, 7)));
        assert!(matches!(r, Err(RingError::JournalMismatch(_))), "{r:?}");
        // Bigger ring, same file.
        let r =
            Back::resume(std::sync::Arc::new(GrantMapping::anonymous(2 * 4096).unwrap()), Some(reopen(&path, false)));
        assert!(matches!(r, Err(RingError::JournalMismatch(_))), "{r:?}");
        // Truncated to zero (a crash while it was being created).
        std::fs::File::create(&path).unwrap().set_len(64 + 32 * 112).unwrap();
        let r = Back::resume(std::sync::Arc::new(GrantMapping::anonymous(4096).unwrap()), Some(reopen(&path, false)));
        assert!(matches!(r, Err(RingError::JournalMismatch(_))), "{r:?}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    #[cfg_attr(miri, ignore = "the journal is a mapped file, which Miri cannot map")]
    fn a_guest_scribbled_rsp_prod_is_caught_by_the_journal() {
        let (mut front, back) = pair(1);
        let (journal, path) = journal("scribble");
        let mut back = Back::new_journaled(back.into_mapping(), journal).unwrap();
        front.push_request(&req(1)).unwrap();
        front.push_requests_and_check_notify().unwrap();
        back.next_request().unwrap().unwrap();
        let mem = back.into_mapping();
        mem.store_u32(RSP_PROD, 5, Ordering::Relaxed).unwrap();
        let r = Back::resume(mem, Some(reopen(&path, false)));
        assert!(matches!(r, Err(RingError::JournalMismatch(_))), "{r:?}");
        std::fs::remove_file(path).unwrap();
    }

    /// xorshift64*, for the seeded crash test.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state >> 12;
        *state ^= *state << 25;
        *state ^= *state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    #[test]
    #[cfg_attr(miri, ignore = "the journal is a mapped file, which Miri cannot map")]
    fn every_request_is_answered_once_across_crashes_at_any_call() {
        // A backend killed between any two ring calls leaves exactly the ring
        // and the journal; each new one resumes from both. Requests carry a
        // body derived from their id, so a response slot read as a request
        // shows.
        let mut crashes = 0;
        for seed in 1..=300u64 {
            let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let (mut front, back) = pair(1);
            let (journal, path) = journal("prop");
            let mut back = Back::new_journaled(back.into_mapping(), journal).unwrap();
            let mut outstanding = std::collections::BTreeSet::new();
            let mut inflight: Vec<(Ticket, u64)> = Vec::new();
            let mut next_id = 0u64;
            let total = 400;
            for step in 0..10_000 {
                if next_id >= total && outstanding.is_empty() {
                    break;
                }
                assert!(step < 9_999, "seed {seed}: {} never answered", outstanding.len());
                match next(&mut rng) % 6 {
                    0 if next_id < total => {
                        let n = next(&mut rng) % (u64::from(front.free_requests()) + 1);
                        for _ in 0..n.min(total - next_id) {
                            front.push_request(&req(next_id)).unwrap();
                            outstanding.insert(next_id);
                            next_id += 1;
                        }
                        front.push_requests_and_check_notify().unwrap();
                    }
                    1 => {
                        for _ in 0..next(&mut rng) % 8 {
                            let Some((t, r)) = back.take_request().unwrap() else { break };
                            assert_eq!(r.body, req(r.id).body, "seed {seed}: a request that is not the guest's");
                            inflight.push((t, r.id));
                        }
                    }
                    2 if !inflight.is_empty() => {
                        let i = (next(&mut rng) % inflight.len() as u64) as usize;
                        let (t, id) = inflight.swap_remove(i);
                        back.answer(t, &rsp(id)).unwrap();
                    }
                    3 => {
                        back.push_responses_and_check_notify().unwrap();
                    }
                    4 => {
                        while let Some(r) = front.next_response().unwrap() {
                            assert!(outstanding.remove(&r.id), "seed {seed}: request {} answered twice", r.id);
                        }
                    }
                    5 if next(&mut rng) % 4 == 0 => {
                        crashes += 1;
                        inflight.clear();
                        back = Back::resume(back.into_mapping(), Some(reopen(&path, false))).unwrap();
                    }
                    _ => {}
                }
            }
            std::fs::remove_file(path).unwrap();
        }
        assert!(crashes > 10_000, "{crashes} crashes");
    }

    #[test]
    fn resume_on_a_scribbled_rsp_prod_breaks_the_ring_instead_of_reading_garbage() {
        let (mut front, back) = pair(1);
        front.push_request(&req(1)).unwrap();
        front.push_requests_and_check_notify().unwrap();
        let mem = back.into_mapping();
        mem.store_u32(RSP_PROD, 0x8000_0000, Ordering::Relaxed).unwrap();
        let r = Back::resume(mem, None);
        assert!(matches!(r, Err(RingError::NotResumable { rsp_prod: 0x8000_0000, .. })), "{r:?}");
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
