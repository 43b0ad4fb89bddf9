//! A complete, minimal device type: each request is a `u64` and its
//! response the same value plus one. It exercises every step of the
//! framework (feature node, protocol, multi-page ring, event channel,
//! budgets) with no I/O of its own, so tests and benchmarks measure the
//! framework alone; it is also the template for a new device type.
//!
//! Frontend nodes: `ring-ref` (or `ring-page-order` + `ring-refN`),
//! `event-channel`, optional `protocol`. Backend node: `feature-echo = 1`.

use std::sync::Arc;

use xen_ring::BackRing;

use crate::device::{Device, DeviceCtx, DeviceType, Progress, RingHandler, RingSetup};
use crate::error::DeviceError;

/// Largest `ring-page-order` accepted (16 pages).
pub const ECHO_MAX_RING_ORDER: u32 = 4;

/// The echo device type, under any xenstore name.
#[derive(Clone, Debug)]
pub struct EchoType {
    name: String,
}

impl EchoType {
    /// Serves `backend/<name>`.
    pub fn new(name: impl Into<String>) -> Arc<Self> {
        Arc::new(EchoType { name: name.into() })
    }
}

impl DeviceType for EchoType {
    fn name(&self) -> &str {
        &self.name
    }

    fn create(&self, _ctx: &DeviceCtx) -> Result<Box<dyn Device>, DeviceError> {
        Ok(Box::new(EchoDevice))
    }
}

struct EchoDevice;

impl Device for EchoDevice {
    fn init(&mut self, ctx: &DeviceCtx) -> Result<(), DeviceError> {
        ctx.write("feature-echo", 1);
        ctx.write("max-ring-page-order", ECHO_MAX_RING_ORDER);
        Ok(())
    }

    fn connect(&mut self, ctx: &DeviceCtx) -> Result<Vec<RingSetup>, DeviceError> {
        // All three ABIs lay out u64 entries alike; an unknown one is fatal.
        ctx.protocol()?;
        let refs = ctx.ring_refs("", ECHO_MAX_RING_ORDER)?;
        // After a backend restart the ring is in use: take it where it is.
        let mapped = ctx.map_ring_with_journal("ring", &refs)?;
        let ring = BackRing::open(mapped.mem, mapped.journal, mapped.resume)?;
        let port = ctx.bind_event_channel("event-channel")?;
        Ok(vec![RingSetup { port, handler: Box::new(EchoRing { ring, batch: Vec::new() }) }])
    }
}

/// Serves one echo ring.
struct EchoRing {
    ring: BackRing<u64, u64>,
    batch: Vec<(xen_ring::Ticket, u64)>,
}

impl RingHandler for EchoRing {
    fn process(&mut self, budget: usize) -> Result<Progress, DeviceError> {
        self.batch.clear();
        while self.batch.len() < budget {
            let Some(taken) = self.ring.take_request()? else { break };
            self.batch.push(taken);
        }
        let taken = self.batch.len();
        for &(ticket, v) in &self.batch {
            self.ring.answer(ticket, &v.wrapping_add(1))?;
        }
        let notify = self.ring.push_responses_and_check_notify()?;
        let more = if taken == budget { true } else { self.ring.final_check_for_requests()? };
        Ok(Progress { notify, more, backlog: false, idle: taken == 0, retry: None })
    }
}
