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
use crate::clock::Tick;
use crate::key::DeviceKey;
use xen_bus::XenbusState;

/// Buckets of [`Latencies`]: bucket `i` counts requests answered in less
/// than 2^(i+1) µs after they were taken off the ring (the first: < 2 µs;
/// the last: everything from 2^LATENCY_BUCKETS µs, about 16 s, on).
pub const LATENCY_BUCKETS: usize = 24;

/// How long requests took, from being taken off the ring to their answer,
/// as a histogram of powers of two in microseconds: a handler adds each
/// request ([`Latencies::record`]), a reader takes percentiles
/// ([`Latencies::percentile`]), within a factor of two.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Latencies {
    /// Requests per bucket.
    pub buckets: [u64; LATENCY_BUCKETS],
    /// The sum of their times, in microseconds.
    pub sum_us: u64,
}

impl Latencies {
    /// The bucket of a request that took `d`.
    pub fn bucket(d: Duration) -> usize {
        let us = d.as_micros().max(1);
        // floor(log2(us)): 1 µs -> 0, 2-3 -> 1, 4-7 -> 2, ...
        ((u128::BITS - 1 - us.leading_zeros()) as usize).min(LATENCY_BUCKETS - 1)
    }

    /// Counts one request that took `d`.
    pub fn record(&mut self, d: Duration) {
        self.buckets[Self::bucket(d)] += 1;
        self.sum_us = self.sum_us.saturating_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    /// Requests counted.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The sum of both histograms (a device's rings together).
    pub fn merged(mut self, other: &Latencies) -> Latencies {
        self.buckets.iter_mut().zip(other.buckets).for_each(|(a, b)| *a += b);
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
        self
    }

    /// What was counted after `earlier`, a previous reading of the same
    /// counters.
    pub fn since(mut self, earlier: &Latencies) -> Latencies {
        self.buckets.iter_mut().zip(earlier.buckets).for_each(|(a, b)| *a = a.saturating_sub(b));
        self.sum_us = self.sum_us.saturating_sub(earlier.sum_us);
        self
    }

    /// The upper bound of the bucket holding the `p` quantile (0 < p <= 1),
    /// or `None` with nothing counted. Exact to a factor of two; the last
    /// bucket has no bound and reads as its lower one.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64 * p).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        let i = self.buckets.iter().position(|&n| {
            seen += n;
            seen >= rank
        })?;
        let shift = if i == LATENCY_BUCKETS - 1 { i } else { i + 1 };
        Some(Duration::from_micros(1 << shift))
    }

    /// The upper bound of bucket `i` in seconds (Prometheus' `le`), `None`
    /// for the last, unbounded one.
    pub fn bucket_bound_secs(i: usize) -> Option<f64> {
        (i + 1 < LATENCY_BUCKETS).then(|| (1u64 << (i + 1)) as f64 / 1e6)
    }
}

/// Batches of requests per latency sample, at most ([`LatencySampler`]).
pub const LATENCY_SAMPLE_BATCHES: u32 = 16;
/// Coarse-clock time after which the next batch is sampled anyway.
pub const LATENCY_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// Which batches of requests have their latency measured. The fine clock
/// is a system call in a Xen PV dom0 (its vDSO has no clock without a
/// stable TSC): a stamp when a batch is taken and one when it is answered
/// were two of a request's eight calls at queue depth 1. So one batch in
/// [`LATENCY_SAMPLE_BATCHES`] is measured, and the first after
/// [`LATENCY_SAMPLE_INTERVAL`] of the coarse clock (no system call), so
/// that a nearly idle disk still has every request measured. The
/// histogram's percentiles stay those of the requests; its count is of
/// the sample.
#[derive(Debug, Default)]
pub struct LatencySampler {
    skipped: u32,
    last: Option<Tick>,
}

impl LatencySampler {
    /// For a batch just taken: when it was taken if it is sampled.
    pub fn stamp(&mut self) -> Option<Instant> {
        let now = Tick::now();
        let due = self.skipped + 1 >= LATENCY_SAMPLE_BATCHES
            || self.last.map_or(true, |t| now.saturating_duration_since(t) >= LATENCY_SAMPLE_INTERVAL);
        if due {
            self.skipped = 0;
            self.last = Some(now);
            Some(Instant::now())
        } else {
            self.skipped += 1;
            None
        }
    }
}

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
    /// Time from taking each request off the ring to its answer.
    pub latencies: Latencies,
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
    latencies: [AtomicU64; LATENCY_BUCKETS],
    latency_sum_us: AtomicU64,
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
        for (a, v) in self.latencies.iter().zip(s.latencies.buckets) {
            a.store(v, Ordering::Relaxed);
        }
        self.latency_sum_us.store(s.latencies.sum_us, Ordering::Relaxed);
    }

    /// What was last published.
    pub fn load(&self) -> RingStats {
        RingStats {
            in_flight: self.in_flight.load(Ordering::Relaxed),
            completed: self.completed.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            latencies: Latencies {
                buckets: std::array::from_fn(|i| self.latencies[i].load(Ordering::Relaxed)),
                sum_us: self.latency_sum_us.load(Ordering::Relaxed),
            },
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
        let mut latencies = Latencies::default();
        latencies.record(Duration::from_micros(300));
        let s = RingStats { in_flight: 3, completed: 10, failed: 1, bytes_read: 4096, bytes_written: 512, latencies };
        c.publish(s);
        assert_eq!(c.load(), s);
    }

    #[test]
    fn latency_sampler_measures_one_batch_in_sixteen_and_the_first() {
        let mut s = LatencySampler::default();
        let sampled: Vec<bool> = (0..33).map(|_| s.stamp().is_some()).collect();
        assert!(sampled[0], "the first batch");
        let n = sampled.iter().filter(|&&x| x).count();
        // 0, 16 and 32; more only if this thread stalled past the interval.
        assert!((3..33).contains(&n), "{n} of 33: {sampled:?}");
        assert!(!sampled[1..16].iter().all(|&x| x), "not every batch");
    }

    #[test]
    fn latencies_fall_in_powers_of_two_and_percentiles_bound_them() {
        assert_eq!(Latencies::bucket(Duration::ZERO), 0);
        assert_eq!(Latencies::bucket(Duration::from_micros(1)), 0);
        assert_eq!(Latencies::bucket(Duration::from_micros(3)), 1);
        assert_eq!(Latencies::bucket(Duration::from_micros(100)), 6);
        assert_eq!(Latencies::bucket(Duration::from_secs(3600)), LATENCY_BUCKETS - 1);
        let mut l = Latencies::default();
        assert_eq!(l.percentile(0.5), None);
        for _ in 0..98 {
            l.record(Duration::from_micros(100)); // bucket 6: 64-127 µs
        }
        l.record(Duration::from_millis(5));
        l.record(Duration::from_millis(5));
        assert_eq!(l.percentile(0.5), Some(Duration::from_micros(128)));
        assert_eq!(l.percentile(0.98), Some(Duration::from_micros(128)));
        assert_eq!(l.percentile(0.99), Some(Duration::from_micros(8192)));
        assert_eq!(l.merged(&l).count(), 200);
        assert_eq!(l.sum_us, 98 * 100 + 2 * 5000);
        assert_eq!(l.merged(&l).since(&l), l);
        assert_eq!(Latencies::bucket_bound_secs(6), Some(128e-6));
        assert_eq!(Latencies::bucket_bound_secs(LATENCY_BUCKETS - 1), None);
    }
}
