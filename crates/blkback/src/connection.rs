//! One connected queue: the frontend's ring (grant-mapped) and the
//! [`QueueExecutor`] behind it. [`RingQueue::process`] is what a worker
//! calls whenever the port fired or storage completed.

use std::os::fd::BorrowedFd;

use evtchn::Port;
use gnttab::{DomId, GrantMapper, GrantMapping, GrantRef};

use std::time::Instant;

use crate::idmap::{id_map, IdMap};
use crate::queue::{QueueExecutor, QueueStats};
use blkif::request::request_id;
use blkif::ring::BlkBackRing;
use blkif::{Layout, Response};
use xen_backend::{Latencies, LatencySampler, Progress};
use xen_bus::Protocol;
use xen_ring::{JournalFile, RingError, Ticket};

/// Errors of connecting or serving a queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Mapping the ring's grants failed.
    #[error("Cannot map the ring of queue {queue}")]
    Map {
        /// Queue number.
        queue: usize,
        /// The cause.
        #[source]
        source: gnttab::Error,
    },
    /// Binding the frontend's event channel failed.
    #[error("Cannot bind event channel {port} of queue {queue}")]
    Bind {
        /// Queue number.
        queue: usize,
        /// The frontend's port.
        port: Port,
        /// The cause.
        #[source]
        source: evtchn::Error,
    },
    /// The ring is unusable (too small, or the frontend broke it).
    #[error("Ring of queue {queue} failed")]
    Ring {
        /// Queue number.
        queue: usize,
        /// The cause.
        #[source]
        source: RingError,
    },
    /// The queue's I/O engine did not start.
    #[error("Cannot start the I/O engine of queue {queue}")]
    Engine {
        /// Queue number.
        queue: usize,
        /// The cause.
        #[source]
        source: crate::engine::EngineError,
    },
    /// Notifying the frontend failed.
    #[error("Cannot notify the frontend of queue {queue}")]
    Notify {
        /// Queue number.
        queue: usize,
        /// The cause.
        #[source]
        source: evtchn::Error,
    },
}

/// A connected queue: the mapped ring and the executor behind it. Event
/// channels are the caller's (the framework's worker).
pub struct RingQueue {
    index: usize,
    ring: BlkBackRing,
    abi: Protocol,
    exec: QueueExecutor,
    slot: Vec<u8>,
    responses: Vec<Response>,
    /// The ring's ticket of each request in flight, by the guest's id, and
    /// when it was taken if its batch is sampled ([`LatencySampler`]).
    tickets: IdMap<(Ticket, Option<Instant>)>,
    /// Tickets of requests whose id was already in flight (a guest that
    /// reuses ids gets as many responses with that id as it sent requests).
    more_tickets: Vec<(u64, (Ticket, Option<Instant>))>,
    /// From taking each sampled request to putting its response.
    latencies: Latencies,
    sampler: LatencySampler,
}

impl RingQueue {
    /// Queue `index` over the mapped `ring` memory, served by `exec` (whose
    /// ABI sets the slot size), keeping `journal` of the requests taken so
    /// that a later process can resume after a crash.
    pub fn new(
        index: usize,
        mem: GrantMapping,
        exec: QueueExecutor,
        journal: Option<JournalFile>,
    ) -> Result<Self, QueueError> {
        Self::with_ring(index, exec, |abi| BlkBackRing::new(mem, abi, journal))
    }

    /// As [`RingQueue::new`], taking over a ring a previous backend process
    /// left, after a clean stop or a crash, with its `journal`
    /// ([`BlkBackRing::resume`]): the requests it took and did not answer
    /// are executed again first.
    pub fn resume(
        index: usize,
        mem: GrantMapping,
        exec: QueueExecutor,
        journal: Option<JournalFile>,
    ) -> Result<Self, QueueError> {
        Self::with_ring(index, exec, |abi| BlkBackRing::resume(mem, abi, journal))
    }

    fn with_ring(
        index: usize,
        exec: QueueExecutor,
        ring: impl FnOnce(Protocol) -> Result<BlkBackRing, xen_ring::RingError>,
    ) -> Result<Self, QueueError> {
        let abi = exec.abi();
        let ring = ring(abi).map_err(|source| QueueError::Ring { queue: index, source })?;
        let tickets = id_map(ring.size() as usize);
        let slot = vec![0; Layout::from(abi).slot_size()];
        Ok(RingQueue {
            index,
            ring,
            abi,
            exec,
            slot,
            responses: Vec::new(),
            tickets,
            more_tickets: Vec::new(),
            latencies: Latencies::default(),
            sampler: LatencySampler::default(),
        })
    }

    /// Maps queue `index`'s ring from `frontend` and serves it with `exec`.
    pub fn map(
        index: usize,
        frontend: DomId,
        refs: &[GrantRef],
        grants: &dyn GrantMapper,
        exec: QueueExecutor,
    ) -> Result<Self, QueueError> {
        let mem = grants.map(frontend, refs, true).map_err(|source| QueueError::Map { queue: index, source })?;
        let q = RingQueue::new(index, mem, exec, None)?;
        log::debug!("dom{frontend} queue {index}: {} ring pages, {} slots", refs.len(), q.ring.size());
        Ok(q)
    }

    /// The ring layout.
    pub fn abi(&self) -> Protocol {
        self.abi
    }

    /// Queue number.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Slots in the ring.
    pub fn ring_size(&self) -> u32 {
        self.ring.size()
    }

    /// Readable while storage completions wait.
    pub fn completion_fd(&self) -> BorrowedFd<'_> {
        self.exec.completion_fd()
    }

    /// Requests taken and not answered.
    pub fn pending(&self) -> usize {
        self.exec.pending()
    }

    /// When to be called again without an event ([`QueueExecutor::retry`]).
    pub fn retry(&self) -> Option<std::time::Duration> {
        self.exec.retry()
    }

    /// The executor's counters.
    pub fn stats(&self) -> QueueStats {
        self.exec.stats()
    }

    /// How long the requests answered so far took, from being taken off the
    /// ring to their response.
    pub fn latencies(&self) -> Latencies {
        self.latencies
    }

    /// Takes up to `budget` waiting requests, collects finished ones and
    /// publishes the responses. When the ring is left empty, `req_event` is
    /// armed (`RING_FINAL_CHECK_FOR_REQUESTS`) before answering `more:
    /// false`. An error means the frontend broke the ring: stop serving it.
    pub fn process(&mut self, budget: usize) -> Result<Progress, QueueError> {
        let queue = self.index;
        let ring_err = |source| QueueError::Ring { queue, source };
        let mut pass = Progress::default();
        let mut taken = 0usize;
        let mut left = budget;
        loop {
            let n = (self.ring.unconsumed().map_err(ring_err)? as usize).min(left);
            // The clock is read for a sampled batch only, once.
            let mut stamp = None;
            for _ in 0..n {
                // Beyond the memory budget the rest waits in the ring.
                if !self.exec.can_take() {
                    break;
                }
                let Some(ticket) = self.ring.take_request(&mut self.slot).map_err(ring_err)? else { break };
                let id = request_id(self.abi, &self.slot);
                let taken_at = *stamp.get_or_insert_with(|| self.sampler.stamp());
                if let Some(first) = self.tickets.insert(id, (ticket, taken_at)) {
                    self.more_tickets.push((id, first));
                }
                self.exec.submit(&self.slot, &mut self.responses);
                taken += 1;
            }
            left -= n;
            self.exec.poll(&mut self.responses);
            pass.notify |= self.respond()?;
            // Waiting for buffers: a completion, or the retry, calls again.
            if !self.exec.can_take() {
                let backlog = self.exec.has_backlog();
                return Ok(Progress { backlog, idle: taken == 0, retry: self.exec.retry(), ..pass });
            }
            // With the budget spent, report more work; else (or if the ring
            // is empty now) arm req_event so the next request notifies us.
            let waiting = self.ring.final_check_for_requests().map_err(ring_err)?;
            if left == 0 || !waiting {
                // Completions left for the next poll need a call too, which
                // is no reason to take fewer requests per pass.
                let backlog = self.exec.has_backlog();
                return Ok(Progress { more: waiting, backlog, idle: taken == 0, retry: self.exec.retry(), ..pass });
            }
        }
    }

    /// One step of [`RingQueue::quiesce`] that never waits: collects what
    /// finished and publishes the responses, taking no new request.
    /// Returns whether to notify and whether nothing is in flight any more.
    /// A ring the guest broke gets no more responses, but its requests in
    /// flight are still waited for (their buffers are the engine's).
    pub fn drain(&mut self) -> (bool, bool) {
        // The first poll also starts writes taken but not started; the
        // completions one poll leaves for the next are answered here too
        // (nothing else would call again).
        self.exec.poll(&mut self.responses);
        while self.exec.has_backlog() {
            self.exec.poll(&mut self.responses);
        }
        let notify = match self.respond() {
            Ok(notify) => notify,
            Err(e) => {
                log::warn!("queue {}: {e}; dropping {} response(s)", self.index, self.responses.len());
                self.responses.clear();
                false
            }
        };
        (notify, self.exec.pending() == 0)
    }

    /// Waits for every request in flight and publishes the responses
    /// (before the ring is unmapped). Returns whether to notify.
    pub fn quiesce(&mut self) -> Result<bool, QueueError> {
        let mut notify = false;
        loop {
            // The first poll also starts writes taken but not started.
            self.exec.poll(&mut self.responses);
            notify |= self.respond()?;
            if self.exec.pending() == 0 {
                return Ok(notify);
            }
            if !self.exec.has_backlog() {
                wait_readable(self.exec.completion_fd());
            }
        }
    }

    fn respond(&mut self) -> Result<bool, QueueError> {
        if self.responses.is_empty() {
            return Ok(false);
        }
        let queue = self.index;
        // Read only if a sampled request is answered.
        let mut now = None;
        let mut responses = std::mem::take(&mut self.responses);
        let put = responses.iter().try_for_each(|rsp| {
            let Some((ticket, taken_at)) = self.take_ticket(rsp.id) else {
                log::error!("queue {queue}: a response to request {:#x}, which is not in flight", rsp.id);
                return Ok(());
            };
            if let Some(taken_at) = taken_at {
                let now = *now.get_or_insert_with(Instant::now);
                self.latencies.record(now.saturating_duration_since(taken_at));
            }
            self.ring.put_response(ticket, rsp)
        });
        responses.clear();
        self.responses = responses;
        put.map_err(|source| QueueError::Ring { queue, source })?;
        self.ring.push_responses().map_err(|source| QueueError::Ring { queue, source })
    }

    /// The ticket of a request with `id` in flight, and when it was taken.
    fn take_ticket(&mut self, id: u64) -> Option<(Ticket, Option<Instant>)> {
        if let Some(i) = self.more_tickets.iter().position(|&(other, _)| other == id) {
            return Some(self.more_tickets.swap_remove(i).1);
        }
        self.tickets.remove(&id)
    }
}

/// Blocks until `fd` is readable (or a second passed, to re-check).
fn wait_readable(fd: BorrowedFd<'_>) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    if let Err(e) = poll(&mut fds, PollTimeout::from(1000u16)) {
        log::debug!("poll of completion fd: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::Disk;
    use crate::engine::ThreadPoolEngine;
    use blkif::abi::{BlkifRequest64, BLKIF_OP_FLUSH_DISKCACHE};
    use blkif::ring::BlkFrontRing;
    use blkif::DiskLimits;
    use gnttab::{CopySegment, GrantStatus, PAGE_SIZE};
    use std::sync::Arc;
    use zerocopy::IntoBytes;

    /// A mapper for requests that carry no data: nothing is granted.
    struct NoGrants;

    impl GrantMapper for NoGrants {
        fn map(&self, _: DomId, _: &[GrantRef], _: bool) -> gnttab::Result<GrantMapping> {
            Err(gnttab::Error::InvalidArgument("not used"))
        }

        fn copy(&self, _: &mut [CopySegment<'_>], status: &mut [GrantStatus]) -> gnttab::Result<()> {
            status.fill(GrantStatus::BadGntref);
            Ok(())
        }
    }

    /// Keeps the shared memory mapped while the back end's view lives.
    struct Keep(#[allow(dead_code)] Arc<GrantMapping>);
    impl gnttab::Unmap for Keep {
        fn unmap(&mut self, _: std::ptr::NonNull<u8>, _: usize) {}
    }

    fn setup(name: &str) -> (BlkFrontRing<Arc<GrantMapping>>, RingQueue, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("blkback-conn-{}-{name}", std::process::id()));
        std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let disk = Arc::new(Disk::open(&path, false, false).unwrap());
        let limits = DiskLimits {
            sectors: 2048,
            read_only: false,
            discard: true,
            barrier: true,
            flush: true,
            max_indirect_segments: 0,
        };
        let engine = Box::new(ThreadPoolEngine::new(disk, 1).unwrap());
        let exec = QueueExecutor::new(Protocol::Native, limits, 1, Arc::new(NoGrants), engine);
        let shared = Arc::new(GrantMapping::anonymous(PAGE_SIZE).unwrap());
        let front = BlkFrontRing::new(shared.clone(), Protocol::Native).unwrap();
        let addr = std::ptr::NonNull::new(shared.as_ptr()).unwrap();
        // SAFETY: `Keep` holds the anonymous mapping until this view is dropped.
        let back = unsafe { GrantMapping::from_raw(addr, PAGE_SIZE, true, Box::new(Keep(shared))) };
        (front, RingQueue::new(0, back, exec, None).unwrap(), path)
    }

    fn flush(id: u64) -> Vec<u8> {
        let mut r = BlkifRequest64 { operation: BLKIF_OP_FLUSH_DISKCACHE, ..Default::default() };
        r.id = id.into();
        r.as_bytes().to_vec()
    }

    fn drain(front: &mut BlkFrontRing<Arc<GrantMapping>>, q: &mut RingQueue, n: usize) -> Vec<u64> {
        let mut ids = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while ids.len() < n {
            assert!(std::time::Instant::now() < deadline, "responses missing");
            wait_readable(q.completion_fd());
            q.process(64).unwrap();
            while let Some(r) = front.next_response().unwrap() {
                assert_eq!(r.status, 0);
                ids.push(r.id);
            }
        }
        ids
    }

    #[test]
    fn a_pass_that_spends_its_budget_and_empties_the_ring_still_asks_for_the_next_event() {
        let (mut front, mut q, path) = setup("budget");
        front.put_request(&flush(1)).unwrap();
        front.put_request(&flush(2)).unwrap();
        front.push_requests().unwrap();
        let pass = q.process(2).unwrap();
        assert!(!pass.more, "the ring is empty after two requests");
        let req_event = front.mapping().load_u32(4, std::sync::atomic::Ordering::Acquire).unwrap();
        assert_eq!(req_event, 3, "req_event = req_cons + 1");
        assert_eq!(drain(&mut front, &mut q, 2), vec![1, 2]);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_pass_stops_at_its_budget_and_reports_more() {
        let (mut front, mut q, path) = setup("more");
        for id in 0..5 {
            front.put_request(&flush(id)).unwrap();
        }
        front.push_requests().unwrap();
        assert!(q.process(3).unwrap().more);
        assert_eq!(drain(&mut front, &mut q, 5), vec![0, 1, 2, 3, 4]);
        // The first batch's requests have their time from take to
        // response (the second is sampled only if 100 ms passed).
        let lat = q.latencies();
        assert!(lat.count() == 3 || lat.count() == 5, "{lat:?}");
        assert!(lat.percentile(1.0).unwrap() <= std::time::Duration::from_secs(16), "{lat:?}");
        let _ = std::fs::remove_file(path);
    }
}
