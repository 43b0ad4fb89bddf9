//! [`ConsoleRing`]: serves one console page on a worker. Per pass, bounded:
//!
//! 1. the host side's events (a client connecting or hanging up);
//! 2. pending guest output to the host side, until it would block;
//! 3. guest output (`out`) into the pending buffer, at most what the
//!    buffer has room for, the pass's budget allows and the console's rate
//!    allows; with [`Overflow::Block`] a host side that does not drain
//!    leaves the rest in the guest's ring (the guest waits: Linux's
//!    hvc_xen retries, yielding, until there is room), with
//!    [`Overflow::DiscardOldest`] (xenconsoled's default) the oldest
//!    pending bytes go instead;
//! 4. host input into the guest's `in` ring, at most the room it has (no
//!    host input is read while it is full, so none is buffered here);
//! 5. the guest is notified if either ring moved (hvc_xen reads and writes
//!    on that event, and counts an event that moved nothing as spurious).
//!
//! A guest index beyond its ring breaks the ring ([`xen_ring::ByteReader`],
//! [`xen_ring::ByteWriter`]): the console fails, with the error, and
//! nothing else does.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gnttab::GrantMapping;
use xen_backend::{DeviceError, Drained, Progress, RingCounters, RingHandler, RingStats};
use xen_ring::{ByteReader, ByteWriter};

use crate::abi::{XENCONSOLE_CONNECTED, XENCONS_CONNECTION, XENCONS_IN, XENCONS_OUT};
use crate::host::{Host, HostError, HostRead};

/// Bytes of guest output one unit of the worker's per-pass budget stands
/// for: the default budget (64) takes one full `out` ring per pass.
pub const BYTES_PER_UNIT: usize = 32;

/// Default sustained guest output per console, bytes per second.
pub const DEFAULT_RATE: u64 = 1 << 20;
/// Default burst: what a console may write at once above its rate.
pub const DEFAULT_BURST: u64 = 64 << 10;

/// The host side, shared between a device (which keeps it across guest
/// reconnections) and the ring handler that uses it while connected.
pub type HostSlot = Arc<Mutex<Option<Host>>>;

/// What happens to guest output the host side does not take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overflow {
    /// Stop consuming the guest's ring once the buffer is full: nothing is
    /// lost, the guest waits.
    Block,
    /// Keep consuming and drop the oldest buffered bytes beyond the buffer
    /// (xenconsoled's `--overflow-data=discard`): the guest never waits.
    DiscardOldest,
}

/// Where a console's guest output is copied as it is consumed (a log file).
pub trait OutputSink: Send {
    /// Takes bytes in the order the guest wrote them.
    fn write(&mut self, data: &[u8]);
}

/// Per-console limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of guest output kept for the host side.
    pub buffer: usize,
    /// What happens beyond it.
    pub overflow: Overflow,
    /// Sustained guest output, bytes per second (0: unlimited).
    pub rate: u64,
    /// Bytes above the rate allowed at once.
    pub burst: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            buffer: crate::config::MAX_BUFFER,
            overflow: Overflow::Block,
            rate: DEFAULT_RATE,
            burst: DEFAULT_BURST,
        }
    }
}

/// A token bucket in bytes.
#[derive(Debug)]
struct RateLimit {
    rate: u64,
    burst: u64,
    tokens: u64,
    /// Tokens are added for the time since.
    since: Instant,
}

impl RateLimit {
    fn new(rate: u64, burst: u64, now: Instant) -> Self {
        let burst = burst.max(XENCONS_OUT.size as u64);
        RateLimit { rate, burst, tokens: burst, since: now }
    }

    /// Bytes that may be taken now.
    fn available(&mut self, now: Instant) -> u64 {
        if self.rate == 0 {
            return u64::MAX;
        }
        let elapsed = now.saturating_duration_since(self.since).as_nanos();
        let add = (elapsed * u128::from(self.rate) / 1_000_000_000).min(u128::from(self.burst)) as u64;
        if add > 0 {
            self.tokens = (self.tokens + add).min(self.burst);
            // Only the time the added tokens stand for: no fraction is lost.
            self.since += Duration::from_nanos((u128::from(add) * 1_000_000_000 / u128::from(self.rate)) as u64);
            if self.tokens == self.burst {
                self.since = now;
            }
        }
        self.tokens
    }

    fn take(&mut self, n: u64) {
        if self.rate != 0 {
            self.tokens = self.tokens.saturating_sub(n);
        }
    }

    /// How long until `n` bytes may be taken.
    fn wait_for(&self, n: u64) -> Duration {
        let missing = n.saturating_sub(self.tokens).max(1);
        Duration::from_nanos((u128::from(missing) * 1_000_000_000 / u128::from(self.rate.max(1))) as u64)
            .max(Duration::from_millis(1))
    }
}

/// Serves one console page; see the module docs.
pub struct ConsoleRing {
    out: ByteReader<Arc<GrantMapping>>,
    input: ByteWriter<Arc<GrantMapping>>,
    slot: HostSlot,
    host: Option<Host>,
    limits: Limits,
    limiter: RateLimit,
    sink: Option<Box<dyn OutputSink>>,
    counters: Arc<RingCounters>,
    from_guest: u64,
    to_guest: u64,
    dropped: u64,
    /// Passes that moved bytes (status counts them as requests).
    moves: u64,
}

fn host_error(e: HostError) -> DeviceError {
    DeviceError::Other { msg: "Console host side failed".into(), source: Some(Box::new(e)) }
}

impl ConsoleRing {
    /// Attaches to the console page `mem` (indices where the guest and any
    /// previous backend left them), says it is served (the `connection`
    /// flag of newer headers), and takes the host side out of `slot` until
    /// dropped.
    pub fn new(
        mem: GrantMapping,
        slot: HostSlot,
        limits: Limits,
        sink: Option<Box<dyn OutputSink>>,
    ) -> Result<Self, DeviceError> {
        let mem = Arc::new(mem);
        let out = ByteReader::new(mem.clone(), XENCONS_OUT)?;
        let input = ByteWriter::new(mem.clone(), XENCONS_IN)?;
        mem.write(XENCONS_CONNECTION, &[XENCONSOLE_CONNECTED])
            .map_err(|e| DeviceError::msg(format!("Cannot write the console page: {e}")))?;
        let host = slot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| DeviceError::msg("Console host side is still in use by a previous connection"))?;
        Ok(ConsoleRing {
            out,
            input,
            slot,
            host: Some(host),
            limits,
            limiter: RateLimit::new(limits.rate, limits.burst, Instant::now()),
            sink,
            counters: RingCounters::new(),
            from_guest: 0,
            to_guest: 0,
            dropped: 0,
            moves: 0,
        })
    }

    /// Bytes dropped so far under [`Overflow::DiscardOldest`].
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    fn pass(&mut self, budget: usize) -> Result<Progress, DeviceError> {
        let host = self.host.as_mut().ok_or_else(|| DeviceError::msg("Console host side is gone"))?;
        host.events().map_err(host_error)?;
        let mut wrote = host.flush().map_err(host_error)?;

        // Guest output, bounded by room, budget and rate.
        let avail = self.out.available()? as usize;
        let room = match self.limits.overflow {
            Overflow::Block => self.limits.buffer.saturating_sub(host.pending.len()),
            Overflow::DiscardOldest => usize::MAX,
        };
        let budget_bytes = budget.saturating_mul(BYTES_PER_UNIT);
        let tokens = usize::try_from(self.limiter.available(Instant::now())).unwrap_or(usize::MAX);
        let mut chunk = [0u8; XENCONS_OUT.size as usize];
        let want = avail.min(room).min(budget_bytes).min(tokens).min(chunk.len());
        let took = self.out.read(&mut chunk[..want])?;
        if took > 0 {
            let data = &chunk[..took];
            if let Some(sink) = &mut self.sink {
                sink.write(data);
            }
            self.limiter.take(took as u64);
            self.from_guest += took as u64;
            host.pending.extend(data);
            let over = host.pending.len().saturating_sub(self.limits.buffer);
            if over > 0 {
                if self.dropped == 0 {
                    log::warn!("console output not taken by its host side: dropping the oldest bytes");
                }
                host.pending.drain(..over);
                self.dropped += over as u64;
            }
            wrote += host.flush().map_err(host_error)?;
        }

        // Host input, never more than the guest's ring has room for.
        let mut produced = 0;
        let space = self.input.space()? as usize;
        if space > 0 {
            let mut buf = [0u8; XENCONS_IN.size as usize];
            if let HostRead::Data(n) = host.read(&mut buf[..space.min(XENCONS_IN.size as usize)]).map_err(host_error)? {
                produced = self.input.write(&buf[..n])?;
                self.to_guest += produced as u64;
            }
        }
        if took > 0 || produced > 0 {
            self.moves += 1;
        }
        let room_in = self.input.space()? > 0;
        host.set_interest(room_in, !host.pending.is_empty()).map_err(host_error)?;

        let left = avail - took;
        let (more, retry) = if left == 0 {
            (false, None)
        } else if want == budget_bytes && budget_bytes <= room.min(tokens) {
            (true, None)
        } else if tokens < room.min(budget_bytes) {
            (false, Some(self.limiter.wait_for(left.min(budget_bytes) as u64)))
        } else {
            // The buffer is full: the host side's writability (or a new
            // client) wakes us.
            (false, None)
        };
        self.counters.publish(RingStats {
            in_flight: host.pending.len() as u64,
            completed: self.moves,
            failed: self.dropped,
            bytes_read: self.to_guest,
            bytes_written: self.from_guest,
            ..RingStats::default()
        });
        Ok(Progress {
            notify: took > 0 || produced > 0,
            more,
            backlog: false,
            idle: took == 0 && produced == 0 && wrote == 0,
            retry,
        })
    }
}

impl RingHandler for ConsoleRing {
    fn process(&mut self, budget: usize) -> Result<Progress, DeviceError> {
        self.pass(budget)
    }

    fn completion_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.host.as_ref().map(Host::poll_fd)
    }

    /// Nothing is in flight: pending output stays with the host side for
    /// the next connection.
    fn drain(&mut self) -> Drained {
        Drained { notify: false, done: true }
    }

    fn counters(&self) -> Option<Arc<RingCounters>> {
        Some(self.counters.clone())
    }
}

impl Drop for ConsoleRing {
    fn drop(&mut self) {
        if let Some(host) = self.host.take() {
            *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(host);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::config::Connection;

    /// The page twice, as the guest and the backend each map it.
    fn page() -> (GrantMapping, Arc<GrantMapping>) {
        let f = tempfile();
        (GrantMapping::shared_file(&f, 4096).unwrap(), Arc::new(GrantMapping::shared_file(&f, 4096).unwrap()))
    }

    fn tempfile() -> std::fs::File {
        let path = std::env::temp_dir().join(format!(
            "consback-page-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        f.set_len(4096).unwrap();
        f
    }

    fn ring_with(conn: &Connection, limits: Limits) -> (ConsoleRing, Arc<GrantMapping>, HostSlot) {
        let (backend, guest) = page();
        let slot: HostSlot = Arc::new(Mutex::new(Some(Host::open(conn).unwrap())));
        (ConsoleRing::new(backend, slot.clone(), limits, None).unwrap(), guest, slot)
    }

    fn socket_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("consback-{name}-{}.sock", std::process::id()))
    }

    #[test]
    fn pty_carries_both_directions_byte_exact_across_wraparound() {
        let (mut ring, guest, _slot) = ring_with(&Connection::Pty, Limits::default());
        let tty = ring.host.as_ref().unwrap().tty().unwrap().to_string();
        let mut term = std::fs::OpenOptions::new().read(true).write(true).open(&tty).unwrap();
        let mut gout = ByteWriter::new(guest.clone(), XENCONS_OUT).unwrap();
        let mut gin = ByteReader::new(guest.clone(), XENCONS_IN).unwrap();
        for round in 0..7u8 {
            let data: Vec<u8> = (0..1500u32).map(|i| (i as u8) ^ round).collect();
            assert_eq!(gout.write(&data).unwrap(), 1500);
            let p = ring.process(64).unwrap();
            assert!(p.notify);
            let mut got = vec![0u8; 1500];
            term.read_exact(&mut got).unwrap();
            assert_eq!(got, data, "round {round}");
            let input: Vec<u8> = (0..700u32).map(|i| (i as u8).wrapping_mul(3) ^ round).collect();
            term.write_all(&input).unwrap();
            let mut back = Vec::new();
            while back.len() < 700 {
                ring.process(64).unwrap();
                let mut b = [0u8; 1024];
                let n = gin.read(&mut b).unwrap();
                back.extend_from_slice(&b[..n]);
            }
            assert_eq!(back, input, "round {round}");
        }
        assert_eq!(guest.load_u32(XENCONS_OUT.cons, Ordering::Acquire).unwrap(), 7 * 1500);
    }

    #[test]
    fn socket_without_client_blocks_the_guest_once_the_buffer_is_full() {
        let path = socket_path("block");
        let limits = Limits { buffer: 4096, ..Limits::default() };
        let (mut ring, guest, _slot) = ring_with(&Connection::Socket(path.clone()), limits);
        let mut gout = ByteWriter::new(guest.clone(), XENCONS_OUT).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut sent = 0;
        for _ in 0..20 {
            sent += gout.write(&data[sent..]).unwrap();
            ring.process(64).unwrap();
        }
        // 4096 buffered, 2048 left in the guest's full ring: nothing lost, the guest waits.
        assert_eq!(sent, 4096 + 2048);
        assert_eq!(gout.space().unwrap(), 0);
        let p = ring.process(64).unwrap();
        assert!(!p.more && p.retry.is_none() && p.idle, "waits for a client, not the worker: {p:?}");
        let mut client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let mut got = Vec::new();
        while got.len() < data.len() {
            sent += gout.write(&data[sent..]).unwrap();
            ring.process(64).unwrap();
            let mut b = [0u8; 8192];
            client.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            if let Ok(n) = client.read(&mut b) {
                got.extend_from_slice(&b[..n]);
            }
        }
        assert_eq!(got, data, "the stream continues where it stopped, byte exact");
    }

    /// A client that sends more than the guest's `in` ring holds and hangs
    /// up at once: every byte reaches the guest, however long it takes to
    /// read them (all but the first ring's worth were lost before), and the
    /// next client is served after.
    #[test]
    fn socket_client_that_hangs_up_with_input_unread_loses_none_of_it() {
        let path = socket_path("hangup");
        let (mut ring, guest, _slot) = ring_with(&Connection::Socket(path.clone()), Limits::default());
        let mut gin = ByteReader::new(guest.clone(), XENCONS_IN).unwrap();
        let data: Vec<u8> = (0..4000u32).map(|i| (i % 249) as u8).collect();
        let mut client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        client.write_all(&data).unwrap();
        ring.process(64).unwrap();
        drop(client);
        let mut got = Vec::new();
        for _ in 0..20 {
            // The guest is slow: the ring is full at each of these passes.
            ring.process(64).unwrap();
            ring.process(64).unwrap();
            let mut b = [0u8; 1024];
            let n = gin.read(&mut b).unwrap();
            got.extend_from_slice(&b[..n]);
        }
        assert_eq!(got.len(), data.len(), "bytes the guest got");
        assert!(got == data, "in order");
        assert!(!ring.host.as_ref().unwrap().connected(), "dropped once read to its end");
        let mut next = std::os::unix::net::UnixStream::connect(&path).unwrap();
        next.write_all(b"next").unwrap();
        let mut b = [0u8; 16];
        let mut n = 0;
        for _ in 0..10 {
            ring.process(64).unwrap();
            n += gin.read(&mut b[n..]).unwrap();
        }
        assert_eq!(&b[..n], b"next");
    }

    #[test]
    fn discard_oldest_keeps_the_newest_and_never_stops_the_guest() {
        let path = socket_path("discard");
        let limits = Limits { buffer: 4096, overflow: Overflow::DiscardOldest, ..Limits::default() };
        let (mut ring, guest, _slot) = ring_with(&Connection::Socket(path.clone()), limits);
        let mut gout = ByteWriter::new(guest.clone(), XENCONS_OUT).unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
        let mut sent = 0;
        while sent < data.len() {
            sent += gout.write(&data[sent..]).unwrap();
            ring.process(64).unwrap();
        }
        assert_eq!(ring.dropped(), 10_000 - 4096);
        let mut client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        ring.process(64).unwrap();
        ring.process(64).unwrap();
        let mut got = vec![0u8; 4096];
        client.read_exact(&mut got).unwrap();
        assert_eq!(got, data[10_000 - 4096..], "the newest bytes, in order");
    }

    #[test]
    fn bad_guest_index_fails_the_console_and_gives_the_host_side_back() {
        let (mut ring, guest, slot) = ring_with(&Connection::Pty, Limits::default());
        guest.store_u32(XENCONS_OUT.prod, 5000, Ordering::Release).unwrap();
        assert!(matches!(ring.process(64), Err(DeviceError::SharedRing(xen_ring::RingError::Overflow { .. }))));
        assert!(matches!(ring.process(64), Err(DeviceError::SharedRing(xen_ring::RingError::Broken))));
        drop(ring);
        assert!(slot.lock().unwrap().is_some(), "the pty outlives the broken connection");
    }

    #[test]
    fn rate_limit_spreads_a_burst_over_time() {
        let path = socket_path("rate");
        let limits = Limits { rate: 20_000, burst: 2048, ..Limits::default() };
        let (mut ring, guest, _slot) = ring_with(&Connection::Socket(path.clone()), limits);
        let _client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let mut gout = ByteWriter::new(guest.clone(), XENCONS_OUT).unwrap();
        let start = Instant::now();
        let mut sent = 0;
        while ring.from_guest < 6144 {
            sent += gout.write(&[7u8; 2048][..2048.min(6144 - sent)]).unwrap();
            let p = ring.process(64).unwrap();
            if let Some(d) = p.retry {
                std::thread::sleep(d);
            }
        }
        // 2048 at once, 4096 more at 20,000 bytes/s: at least 0.2 s.
        assert!(start.elapsed() >= Duration::from_millis(190), "{:?}", start.elapsed());
    }

    #[test]
    fn rate_limit_refills_at_its_rate_up_to_the_burst() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(1000, 4096, t0);
        assert_eq!(r.available(t0), 4096);
        r.take(4096);
        assert_eq!(r.available(t0), 0);
        assert_eq!(r.available(t0 + Duration::from_millis(500)), 500);
        assert_eq!(r.available(t0 + Duration::from_secs(100)), 4096, "capped at the burst");
        r.take(4096);
        assert_eq!(r.wait_for(100), Duration::from_millis(100));
    }

    #[test]
    fn rate_limit_loses_no_fraction_over_many_small_steps() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(1500, 2048, t0);
        r.take(2048);
        let mut total = 0;
        for ms in 1..=1000u64 {
            let got = r.available(t0 + Duration::from_millis(ms));
            r.take(got);
            total += got;
        }
        assert_eq!(total, 1500);
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(0, 0, t0);
        r.take(1 << 40);
        assert_eq!(r.available(t0), u64::MAX);
    }
}
