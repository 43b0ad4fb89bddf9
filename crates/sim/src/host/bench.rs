//! Measurements of the simulated host's hot paths, for `examples/host_bench`
//! and `xenbackd bench`: notifications per second through an event channel
//! (two threads ping-ponging over polled fds) and grant-copy throughput.

use std::time::{Duration, Instant};

use evtchn::{EventChannel, Port};
use gnttab::{CopySegment, GrantRef, GrantStatus, GuestPage, PAGE_SIZE};

use super::error::{DomId, Error};
use super::sim_host::SimHost;

const BACK: DomId = 0;
const FRONT: DomId = 1;

/// Why a measurement could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Setting up domains or memory failed.
    #[error("Simulated host setup failed")]
    Host(#[from] Error),
    /// An event-channel operation failed.
    #[error("Event channel operation failed")]
    Evtchn(#[from] evtchn::Error),
    /// A grant operation failed as a whole.
    #[error("Grant operation failed")]
    Gnttab(#[from] gnttab::Error),
    /// Writing the guest's pages failed.
    #[error("Guest memory access failed")]
    Access(#[from] gnttab::AccessError),
    /// A segment of a copy failed.
    #[error("Grant copy segment failed: {0:?}")]
    Copy(GrantStatus),
    /// Spawning or joining the echo thread failed.
    #[error("Echo thread failed")]
    Thread(#[source] std::io::Error),
    /// The echo thread panicked.
    #[error("Echo thread panicked")]
    Panicked,
}

/// Result of [`evtchn_ping_pong`].
#[derive(Clone, Copy, Debug)]
pub struct NotifyBench {
    /// Round trips made (two notifications each).
    pub round_trips: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl NotifyBench {
    /// Notifications delivered per second (both directions).
    pub fn notifications_per_sec(&self) -> f64 {
        2.0 * self.round_trips as f64 / self.elapsed.as_secs_f64()
    }
}

/// Direction of a grant copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyDirection {
    /// Guest pages to a local buffer (a guest's write request).
    FromGuest,
    /// A local buffer to guest pages (a guest's read request).
    ToGuest,
}

/// Result of [`grant_copy`].
#[derive(Clone, Copy, Debug)]
pub struct CopyBench {
    /// Segments per `copy` call.
    pub batch: usize,
    /// Bytes copied.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl CopyBench {
    /// Throughput in MB/s (10^6 bytes).
    pub fn mb_per_sec(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64()
    }
}

fn wait(ch: &dyn EventChannel, out: &mut Vec<Port>) -> Result<(), BenchError> {
    while !evtchn::wait_pending(ch, None)? {}
    out.clear();
    ch.take_pending(out)?;
    Ok(())
}

/// Two threads, a frontend and a backend domain, bounce `round_trips`
/// notifications over one channel, each blocking in `poll` on its handle's
/// fd and unmasking the port before answering.
pub fn evtchn_ping_pong(round_trips: u64) -> Result<NotifyBench, BenchError> {
    let host = SimHost::new();
    host.create_domain(BACK)?;
    host.create_domain(FRONT)?;
    let front = host.evtchn(FRONT);
    let back = host.evtchn(BACK);
    let fport = front.bind_unbound_port(BACK)?;
    let bport = back.bind_interdomain(FRONT, fport)?;
    let mut fired = Vec::new();
    wait(&*back, &mut fired)?;
    back.unmask(bport)?;

    let echo = std::thread::Builder::new()
        .name("bench-echo".into())
        .spawn(move || -> Result<(), BenchError> {
            let mut fired = Vec::new();
            let mut served = 0;
            while served < round_trips {
                wait(&*back, &mut fired)?;
                for p in &fired {
                    back.unmask(*p)?;
                    back.notify(*p)?;
                    served += 1;
                }
            }
            Ok(())
        })
        .map_err(BenchError::Thread)?;

    let start = Instant::now();
    for _ in 0..round_trips {
        front.notify(fport)?;
        wait(&*front, &mut fired)?;
        front.unmask(fport)?;
    }
    let elapsed = start.elapsed();
    echo.join().map_err(|_| BenchError::Panicked)??;
    Ok(NotifyBench { round_trips, elapsed })
}

/// Copies `total_bytes` (rounded to whole batches) in 4 KiB segments,
/// `batch` segments per call, between a frontend's granted pages and a local
/// buffer.
pub fn grant_copy(batch: usize, total_bytes: u64, direction: CopyDirection) -> Result<CopyBench, BenchError> {
    const GUEST_PAGES: usize = 256;
    let batch = batch.max(1);
    let host = SimHost::new();
    host.create_domain(BACK)?;
    host.create_domain(FRONT)?;
    let gt = host.grant_table(FRONT);
    let pages = gt.alloc_pages(GUEST_PAGES)?;
    pages.mapping().fill(0, GUEST_PAGES * PAGE_SIZE, 0x5a)?;
    let refs: Vec<GrantRef> = gt.grant_pages(&pages, BACK, false)?;
    let mapper = host.grant_mapper(BACK);
    let mut local = vec![0u8; batch * PAGE_SIZE];
    let mut status = vec![GrantStatus::Okay; batch];
    let calls = (total_bytes / (batch * PAGE_SIZE) as u64).max(1);

    let start = Instant::now();
    let mut next = 0;
    for _ in 0..calls {
        let mut segs: Vec<CopySegment<'_>> = local
            .chunks_mut(PAGE_SIZE)
            .map(|buf| {
                let guest = GuestPage { domid: FRONT, gref: refs[next % GUEST_PAGES], offset: 0 };
                next += 1;
                match direction {
                    CopyDirection::FromGuest => CopySegment::FromGuest { src: guest, dst: buf },
                    CopyDirection::ToGuest => CopySegment::ToGuest { src: buf, dst: guest },
                }
            })
            .collect();
        mapper.copy(&mut segs, &mut status)?;
        if let Some(bad) = status.iter().find(|s| !s.is_ok()) {
            return Err(BenchError::Copy(*bad));
        }
    }
    let elapsed = start.elapsed();
    Ok(CopyBench { batch, bytes: calls * (batch * PAGE_SIZE) as u64, elapsed })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_pong_counts_every_round_trip() {
        let r = evtchn_ping_pong(50).unwrap();
        assert_eq!(r.round_trips, 50);
        assert!(r.notifications_per_sec() > 0.0);
    }

    #[test]
    fn copy_bench_copies_whole_batches() {
        let r = grant_copy(11, 11 * PAGE_SIZE as u64 * 3, CopyDirection::ToGuest).unwrap();
        assert_eq!(r.bytes, 3 * 11 * PAGE_SIZE as u64);
        let r = grant_copy(32, 1, CopyDirection::FromGuest).unwrap();
        assert_eq!(r.bytes, 32 * PAGE_SIZE as u64);
    }
}
