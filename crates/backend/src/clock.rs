//! A coarse monotonic clock for timers that need no better than a tick
//! (1-10 ms): the worker's delayed unmasks, retries and drain deadlines, a
//! queue's idle time.
//!
//! `CLOCK_MONOTONIC_COARSE` is served by the vDSO from the last tick's
//! time, without reading a clock source, so it is no system call anywhere.
//! `Instant::now()` (`CLOCK_MONOTONIC`) is one in a Xen PV domain unless
//! Xen's TSC is stable (`PVCLOCK_TSC_STABLE_BIT`; Linux's
//! `xen_setup_vsyscall_time_info`), and there each system call goes
//! through the hypervisor: dearer than the rest of a small request's work
//! on a ring worker. Linux's lateeoi delays are in jiffies too.

use std::ops::Add;
use std::time::Duration;

use nix::time::{clock_gettime, ClockId};

/// A time on the coarse monotonic clock: it lags the fine clock by up to
/// a tick, so a deadline on it fires up to a tick late, never early.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tick(Duration);

impl Tick {
    /// Now, to the last tick.
    pub fn now() -> Tick {
        // Linux has had the coarse clock since 2.6.32; the fine one stands in
        // for it anywhere else.
        let t = clock_gettime(ClockId::CLOCK_MONOTONIC_COARSE).or_else(|_| clock_gettime(ClockId::CLOCK_MONOTONIC));
        Tick(t.map(Duration::from).unwrap_or_default())
    }

    /// How long after `earlier` this is; zero if it is not after.
    pub fn saturating_duration_since(self, earlier: Tick) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

impl Add<Duration> for Tick {
    type Output = Tick;

    fn add(self, d: Duration) -> Tick {
        Tick(self.0.saturating_add(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coarse_clock_moves_forward_with_the_fine_one() {
        let (a, fine) = (Tick::now(), std::time::Instant::now());
        std::thread::sleep(Duration::from_millis(30));
        let b = Tick::now();
        assert!(b >= a);
        // Within a tick (10 ms at HZ=100) of what the fine clock measured.
        let passed = b.saturating_duration_since(a);
        assert!(passed + Duration::from_millis(10) >= fine.elapsed().min(Duration::from_millis(30)));
        assert_eq!(a.saturating_duration_since(b), Duration::ZERO);
        assert!(a + Duration::from_secs(1) > b);
    }
}
