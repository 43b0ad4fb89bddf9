//! A read-only view of a running backend, for a daemon's status and
//! metrics: every device's key, state and rings ([`Monitor::devices`]), the
//! framework's counters ([`Stats`]), and per ring the counters its handler
//! publishes ([`RingCounters`], through [`crate::RingHandler::counters`]).
//!
//! The device list is built by the xenbus thread (which owns the devices),
//! asked over a channel and waited for with a timeout, as
//! [`crate::Backend::sync`]: a busy thread makes the answer late, never
//! the thread slow. Ring counters are atomics the handler stores into on
//! its own worker and anyone loads: no worker is asked anything.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::backend::Stats;
use crate::key::DeviceKey;
use xen_bus::XenbusState;

/// What a ring's handler has done so far, as it last published it
/// ([`RingCounters::publish`]). Device types give the words their own
/// meaning within these: a block ring's request is a read, a write, a flush.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Requests taken and not answered yet.
    pub in_flight: u64,
    /// Requests answered.
    pub completed: u64,
    /// Requests answered with an error.
    pub failed: u64,
    /// Bytes moved to the guest (a block device's reads).
    pub bytes_read: u64,
    /// Bytes moved from the guest (a block device's writes).
    pub bytes_written: u64,
}

/// A ring's counters, shared between its handler (which stores them, on
/// its worker, after each pass) and whoever reads the status.
#[derive(Debug, Default)]
pub struct RingCounters {
    in_flight: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
}

impl RingCounters {
    /// New counters at zero, to be shared.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Stores `s`. Each field is its own atomic: a reader may see one pass's
    /// `completed` with the previous pass's bytes (status, not accounting).
    pub fn publish(&self, s: RingStats) {
        self.in_flight.store(s.in_flight, Ordering::Relaxed);
        self.completed.store(s.completed, Ordering::Relaxed);
        self.failed.store(s.failed, Ordering::Relaxed);
        self.bytes_read.store(s.bytes_read, Ordering::Relaxed);
        self.bytes_written.store(s.bytes_written, Ordering::Relaxed);
    }

    /// What was last published.
    pub fn load(&self) -> RingStats {
        RingStats {
            in_flight: self.in_flight.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
        }
    }
}

/// One device as the xenbus thread saw it when asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSnapshot {
    /// Type, frontend domain, devid.
    pub key: DeviceKey,
    /// The backend state last written.
    pub state: XenbusState,
    /// The frontend state last acted on (`None` before the first).
    pub frontend_state: Option<XenbusState>,
    /// The device failed (an `error` node was written) and was not retried since.
    pub failed: bool,
    /// This process took it over Connected from a previous one.
    pub resumed: bool,
    /// How long its rings have been served (`None` when not connected).
    pub connected_for: Option<Duration>,
    /// What the device type tells of it ([`crate::Device::describe`]).
    pub details: Vec<(&'static str, String)>,
    /// One entry per ring served: its counters, if its handler keeps them.
    pub rings: Vec<Option<RingStats>>,
}

/// A clonable, read-only handle on a running backend ([`crate::Backend::monitor`]).
#[derive(Clone)]
pub struct Monitor {
    pub(crate) stats: Arc<Stats>,
    pub(crate) snapshot: Sender<Sender<Vec<DeviceSnapshot>>>,
    pub(crate) started: Instant,
}

impl Monitor {
    /// The framework's counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Time since the backend started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Every device, ordered by key, as the xenbus thread has them; `None`
    /// if it did not answer within `timeout` (busy with a long step, or
    /// reconnecting to xenstore) or is gone.
    pub fn devices(&self, timeout: Duration) -> Option<Vec<DeviceSnapshot>> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.snapshot.send(tx).ok()?;
        rx.recv_timeout(timeout).ok()
    }
}

impl core::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Monitor").field("stats", &self.stats).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_counters_load_what_was_published() {
        let c = RingCounters::new();
        assert_eq!(c.load(), RingStats::default());
        let s = RingStats { in_flight: 3, completed: 10, failed: 1, bytes_read: 4096, bytes_written: 512 };
        c.publish(s);
        assert_eq!(c.load(), s);
    }
}
