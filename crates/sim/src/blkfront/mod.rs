//! A simulated blkfront: a guest's block frontend speaking blkif over
//! simulated grants and event channels, as Linux's `xen-blkfront.c` does.
//!
//! [`Blkfront::new`] allocates and grants the rings (one per queue, of
//! `2^ring_page_order` pages), allocates an unbound port per queue, and
//! pre-grants a pool of data buffers and indirect pages; [`Blkfront::nodes`]
//! gives the xenstore nodes to write before `Initialised`, in Linux's order
//! (`talk_to_blkback`). Each [`FrontQueue`] then submits requests (many in
//! flight) and collects completions; queues can move to their own threads.
//! Requests of more than 11 pages go as `BLKIF_OP_INDIRECT`.
//! [`Blkfront::connect`] does the whole xenbus handshake on a
//! [`crate::frontend::FrontendDevice`], as Linux's blkfront does.

mod connect;
mod queue;

use std::sync::Arc;

use blkif::ring::{ring_size, BlkFrontRing};
use evtchn::EventChannel;
use gnttab::PAGE_SIZE;
use xen_bus::{FrontendRings, Protocol, QueueRing};
use xen_ring::RingError;

use crate::host::{DomId, SimHost};

pub use connect::{CapacityWatch, DiskInfo};
pub use queue::{BlkCompletion, BlkOp, FrontQueue};

/// How the frontend sets itself up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkfrontOptions {
    /// Ring layout; `Native` writes no `protocol` node.
    pub abi: Protocol,
    /// Number of queues (rings); more than one writes `multi-queue-num-queues`.
    pub queues: u32,
    /// `ring-page-order`: each ring has `2^order` pages.
    pub ring_page_order: u32,
    /// Largest request, in bytes (multiple of 4096); above 44 KiB needs indirect.
    pub max_request_bytes: usize,
    /// Requests in flight per queue (buffers pre-granted); capped at the ring size.
    pub depth: usize,
    /// Use indirect requests for more than 11 pages (needs the backend's
    /// `feature-max-indirect-segments`).
    pub indirect: bool,
    /// `feature-persistent`: Linux's blkfront asks for persistent grants by
    /// default (its buffers stay granted either way, as ours do).
    pub persistent: bool,
}

impl Default for BlkfrontOptions {
    fn default() -> Self {
        BlkfrontOptions {
            abi: Protocol::Native,
            queues: 1,
            ring_page_order: 0,
            max_request_bytes: 11 * PAGE_SIZE,
            depth: 32,
            indirect: true,
            persistent: true,
        }
    }
}

/// Errors of the simulated blkfront.
#[derive(Debug, thiserror::Error)]
pub enum BlkfrontError {
    /// Guest memory or grant table.
    #[error("Guest memory or grant operation failed")]
    Host(#[from] crate::host::Error),
    /// Event channel.
    #[error("Event channel operation failed")]
    Evtchn(#[from] evtchn::Error),
    /// The shared ring.
    #[error("Ring access failed")]
    Ring(#[from] RingError),
    /// No free ring slot or buffer: collect completions first.
    #[error("Queue full")]
    Full,
    /// A response whose `operation` Linux's blkfront would refuse ("response
    /// has wrong operation"), disabling the disk.
    #[error("Response has wrong operation ({got} instead of {expected})")]
    WrongOperation {
        /// What Linux expects.
        expected: u8,
        /// What the backend sent.
        got: u8,
    },
    /// A request larger than the buffers, not a multiple of 512, or needing
    /// more indirect segments than allowed.
    #[error("Bad request size {0}")]
    BadSize(usize),
    /// Options that cannot work.
    #[error("Bad option: {0}")]
    BadOption(&'static str),
    /// A xenbus step of the generic frontend failed (or timed out).
    #[error("Xenbus step failed")]
    Frontend(#[from] crate::frontend::FrontendError),
    /// A xenstore request failed.
    #[error("Xenstore request failed")]
    Xenstore(#[from] xs_wire::ClientError),
    /// Waiting for an event failed.
    #[error("Waiting for an event failed")]
    Wait(#[source] std::io::Error),
}

/// A guest's block frontend.
pub struct Blkfront {
    options: BlkfrontOptions,
    queues: Vec<FrontQueue>,
}

impl Blkfront {
    /// Sets up the frontend of domain `domid` for a backend in `backend`.
    pub fn new(
        host: &Arc<SimHost>,
        domid: DomId,
        backend: DomId,
        options: BlkfrontOptions,
    ) -> Result<Blkfront, BlkfrontError> {
        if options.queues == 0 || options.ring_page_order > 8 {
            return Err(BlkfrontError::BadOption("queues must be 1.. and ring-page-order 0..=8"));
        }
        if options.max_request_bytes == 0 || options.max_request_bytes % PAGE_SIZE != 0 {
            return Err(BlkfrontError::BadOption("max_request_bytes must be a positive multiple of 4096"));
        }
        let pages = 1usize << options.ring_page_order;
        let slots = ring_size(pages * PAGE_SIZE, options.abi) as usize;
        let depth = options.depth.clamp(1, slots);
        let grants = host.grant_table(domid);
        let mut queues = Vec::with_capacity(options.queues as usize);
        for index in 0..options.queues as usize {
            let ring_pages = grants.alloc_pages(pages)?;
            let ring_refs = grants.grant_pages(&ring_pages, backend, false)?;
            let ring = BlkFrontRing::new(queue::RingPages(ring_pages), options.abi)?;
            let evtchn: Box<dyn EventChannel> = Box::new(host.try_evtchn(domid).map_err(BlkfrontError::Wait)?);
            let port = evtchn.bind_unbound_port(backend)?;
            let setup = queue::QueueSetup { index, backend, options, depth, ring, ring_refs, evtchn, port };
            queues.push(FrontQueue::new(setup, &grants)?);
        }
        Ok(Blkfront { options, queues })
    }

    /// The nodes to write in the frontend directory before `Initialised`,
    /// in Linux's order: `ring-page-order`, `multi-queue-num-queues`, the
    /// rings and ports (flat for one queue, `queue-%u/` for several),
    /// `protocol`, `feature-persistent`.
    pub fn nodes(&self) -> Vec<(String, String)> {
        let rings = FrontendRings {
            ring_page_order: self.options.ring_page_order,
            queues: self
                .queues
                .iter()
                .map(|q| QueueRing {
                    ring_refs: q.ring_refs().iter().map(|r| r.0).collect(),
                    event_channel: q.port().0,
                })
                .collect(),
        };
        let mut nodes = rings.nodes();
        if let Some(name) = self.options.abi.name() {
            nodes.push(("protocol".to_string(), name.to_string()));
        }
        nodes.push(("feature-persistent".to_string(), u8::from(self.options.persistent).to_string()));
        nodes
    }

    /// The options in force.
    pub fn options(&self) -> BlkfrontOptions {
        self.options
    }

    /// Queue `i`.
    ///
    /// # Panics
    /// If `i` is not below the number of queues.
    pub fn queue(&mut self, i: usize) -> &mut FrontQueue {
        &mut self.queues[i]
    }

    /// Number of queues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The queues, to drive from threads of their own.
    pub fn into_queues(self) -> Vec<FrontQueue> {
        self.queues
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Arc<SimHost> {
        let host = SimHost::new();
        host.create_domain(0).unwrap();
        host.create_domain(1).unwrap();
        host
    }

    #[test]
    fn nodes_follow_linux_order_for_two_queues_of_two_pages() {
        let h = host();
        let opts = BlkfrontOptions { abi: Protocol::X86_32, queues: 2, ring_page_order: 1, ..Default::default() };
        let front = Blkfront::new(&h, 1, 0, opts).unwrap();
        let names: Vec<String> = front.nodes().into_iter().map(|(k, _)| k).collect();
        let want = [
            "ring-page-order",
            "multi-queue-num-queues",
            "queue-0/ring-ref0",
            "queue-0/ring-ref1",
            "queue-0/event-channel",
            "queue-1/ring-ref0",
            "queue-1/ring-ref1",
            "queue-1/event-channel",
            "protocol",
            "feature-persistent",
        ];
        assert_eq!(names, want);
        let protocol = front.nodes().into_iter().find(|(k, _)| k == "protocol").unwrap().1;
        assert_eq!(protocol, "x86_32-abi");
    }

    #[test]
    fn one_page_native_frontend_writes_ring_ref_and_no_protocol() {
        let h = host();
        let front = Blkfront::new(&h, 1, 0, BlkfrontOptions::default()).unwrap();
        let names: Vec<String> = front.nodes().into_iter().map(|(k, _)| k).collect();
        assert_eq!(names, ["ring-ref", "event-channel", "feature-persistent"]);
    }

    #[test]
    fn requests_above_eleven_pages_need_indirect() {
        let h = host();
        let opts = BlkfrontOptions { max_request_bytes: 64 * PAGE_SIZE, indirect: false, ..Default::default() };
        assert!(matches!(Blkfront::new(&h, 1, 0, opts), Err(BlkfrontError::BadOption(_))));
        let opts = BlkfrontOptions { max_request_bytes: 64 * PAGE_SIZE, depth: 2, ..Default::default() };
        let mut front = Blkfront::new(&h, 1, 0, opts).unwrap();
        assert!(front.queue(0).uses_indirect());
        assert_eq!(front.queue(0).max_request_bytes(), 64 * PAGE_SIZE);
    }

    /// The demo's largest run (64 guests x 16 disks x 2 queues) failed with
    /// ENOMEM at 478 disks: two mappings per buffer hit vm.max_map_count
    /// (65530). A queue's buffers are one mapping now, its indirect pages
    /// another.
    #[test]
    fn a_queue_costs_a_few_mappings_whatever_its_depth() {
        let maps = || std::fs::read_to_string("/proc/self/maps").unwrap().lines().count();
        let h = host();
        let opts = BlkfrontOptions { max_request_bytes: 64 * PAGE_SIZE, depth: 128, ..Default::default() };
        let before = maps();
        let front = Blkfront::new(&h, 1, 0, opts).unwrap();
        let added = maps().saturating_sub(before);
        // 256 before; the bound leaves room for other tests' mappings
        // made meanwhile in this process.
        assert!(front.num_queues() == 1 && added <= 64, "{added} mappings for one queue of depth 128");
    }
}
