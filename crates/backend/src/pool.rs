//! [`RingPool`]: the worker pool on its own, for rings that are not xenbus
//! devices (a domain's primary console: no backend directory, no state
//! machine). The same workers, budgets, late EOI and failure isolation as
//! the rings of a [`crate::Backend`].

use std::time::Duration;

use crossbeam_channel::Receiver;

use crate::device::RingSetup;
use crate::error::{DeviceError, Error};
use crate::key::DeviceKey;
use crate::worker::{Failure, Owner, Placement, WorkerPool};

/// A ring placed on a [`RingPool`], to take it back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlacedRing {
    placement: Placement,
    owner: Owner,
}

impl PlacedRing {
    /// The key the ring was added under.
    pub fn key(&self) -> &DeviceKey {
        &self.owner.key
    }

    /// Distinguishes rings added under the same key.
    pub fn serial(&self) -> u64 {
        self.owner.generation
    }
}

/// A ring whose handler failed (error or panic); it is gone already.
#[derive(Debug)]
pub struct RingFailure {
    /// The key it was added under.
    pub key: DeviceKey,
    /// Its [`PlacedRing::serial`].
    pub serial: u64,
    /// Why.
    pub error: DeviceError,
}

/// Worker threads serving rings handed to them; see the module docs.
pub struct RingPool {
    pool: WorkerPool,
    failures: Receiver<Failure>,
    next_serial: u64,
}

impl RingPool {
    /// Starts `workers` threads serving at most `budget` units per ring per pass.
    pub fn new(workers: usize, budget: usize) -> Result<Self, Error> {
        let (tx, failures) = crossbeam_channel::unbounded();
        Ok(RingPool { pool: WorkerPool::new(workers, budget, tx)?, failures, next_serial: 0 })
    }

    /// Hands a ring to the least loaded worker.
    pub fn add(&mut self, key: DeviceKey, setup: RingSetup) -> PlacedRing {
        self.next_serial += 1;
        let owner = Owner { key, generation: self.next_serial };
        let placement = self.pool.add(owner.clone(), setup);
        PlacedRing { placement, owner }
    }

    /// Takes a ring back and waits until it is drained and dropped (up to
    /// `timeout`; a ring still busy then is finished on a thread of its
    /// own). False if it failed before or its worker is gone.
    pub fn remove(&self, ring: &PlacedRing, timeout: Duration) -> bool {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if !self.pool.remove(ring.placement, ring.owner.clone(), timeout, tx) {
            return false;
        }
        rx.recv_timeout(timeout + Duration::from_secs(1)).is_ok()
    }

    /// Failed rings, as they fail.
    pub fn failures(&self) -> impl Iterator<Item = RingFailure> + '_ {
        self.failures.try_iter().map(|f| RingFailure { key: f.owner.key, serial: f.owner.generation, error: f.error })
    }

    /// Waits up to `timeout` for the next failure.
    pub fn next_failure(&self, timeout: Duration) -> Option<RingFailure> {
        let f = self.failures.recv_timeout(timeout).ok()?;
        Some(RingFailure { key: f.owner.key, serial: f.owner.generation, error: f.error })
    }
}

impl core::fmt::Debug for RingPool {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RingPool").field("workers", &self.pool.len()).finish_non_exhaustive()
    }
}
