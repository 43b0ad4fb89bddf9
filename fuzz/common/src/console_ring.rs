//! Target `console_ring`: a console backend's pass ([`ConsoleRing`],
//! `consback`) over a page a hostile guest writes (indices anywhere, bytes
//! anywhere) while a host client on its socket reads and writes. The
//! backend must never panic, never write outside the `in` array, `in_prod`,
//! `out_cons` and the `connection` flag, never hold more guest output than
//! its buffer, and, while the guest follows the protocol, carry both
//! directions byte-exact: the client gets exactly what the guest wrote and
//! the guest exactly what the client wrote; a log sink gets every byte taken
//! from the guest, and a rate-limited console takes no more than its burst
//! plus its rate.
//!
//! Input: one byte of options (bit 0: discard-oldest instead of blocking;
//! bit 1: a log sink; bit 2: a rate limit; bit 3: the client connects only
//! at its first read or write, so output piles up), then [`Op`]s until the
//! end.

use std::cell::Cell;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use consback::{Connection, ConsoleRing, Host, HostSlot, Limits, OutputSink, Overflow};
use gnttab::GrantMapping;
use xen_backend::RingHandler;
use xen_ring::abi::{XENCONS_CONNECTION, XENCONS_IN, XENCONS_OUT};

use crate::input::Input;

const PAGE: usize = 4096;
/// The backend's buffer in the harness: small, so it fills.
const BUFFER: usize = 4096;
/// The rate of a rate-limited console (bytes per second); its burst is the
/// smallest there is, the `out` ring's size.
const RATE: u64 = 256 * 1024;

/// One step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// The guest stores `value` into index `which % 4` (`in_cons`, `in_prod`, `out_cons`, `out_prod`).
    SetIndex {
        /// Which index.
        which: u8,
        /// Its value.
        value: u32,
    },
    /// The guest writes what fits of `bytes` to `out`, as hvc_xen does.
    GuestWrite {
        /// The bytes (at most 255).
        bytes: Vec<u8>,
    },
    /// The guest reads up to `count` bytes of `in`.
    GuestRead {
        /// How many.
        count: u8,
    },
    /// The guest writes `bytes` anywhere in the page.
    Scribble {
        /// Where (modulo the page).
        offset: u16,
        /// The bytes (at most 255).
        bytes: Vec<u8>,
    },
    /// The backend's pass with budget `budget` (at least 1).
    Process {
        /// Worker budget units.
        budget: u8,
    },
    /// The client writes `bytes` (what the socket takes).
    HostWrite {
        /// The bytes (at most 255).
        bytes: Vec<u8>,
    },
    /// The client reads up to `len` bytes (what is there).
    HostRead {
        /// Most bytes.
        len: u16,
    },
}

const OPS: u8 = 7;

impl Op {
    /// Decodes one op (every byte string decodes to some op).
    pub fn decode(input: &mut Input<'_>) -> Op {
        let bytes = |input: &mut Input<'_>| {
            let len = usize::from(input.u8());
            input.bytes(len).to_vec()
        };
        match input.u8() % OPS {
            0 => Op::SetIndex { which: input.u8(), value: input.u32() },
            1 => Op::GuestWrite { bytes: bytes(input) },
            2 => Op::GuestRead { count: input.u8() },
            3 => Op::Scribble { offset: input.u16(), bytes: bytes(input) },
            4 => Op::Process { budget: input.u8() },
            5 => Op::HostWrite { bytes: bytes(input) },
            _ => Op::HostRead { len: input.u16() },
        }
    }

    /// Appends its encoding.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let bytes = |out: &mut Vec<u8>, b: &[u8]| {
            out.push(u8::try_from(b.len()).expect("at most 255 bytes"));
            out.extend(b);
        };
        match self {
            Op::SetIndex { which, value } => {
                out.extend([0, *which]);
                out.extend(value.to_le_bytes());
            }
            Op::GuestWrite { bytes: b } => {
                out.push(1);
                bytes(out, b);
            }
            Op::GuestRead { count } => out.extend([2, *count]),
            Op::Scribble { offset, bytes: b } => {
                out.push(3);
                out.extend(offset.to_le_bytes());
                bytes(out, b);
            }
            Op::Process { budget } => out.extend([4, *budget]),
            Op::HostWrite { bytes: b } => {
                out.push(5);
                bytes(out, b);
            }
            Op::HostRead { len } => {
                out.push(6);
                out.extend(len.to_le_bytes());
            }
        }
    }
}

/// A decoded input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scenario {
    /// Discard the oldest output instead of blocking the guest.
    pub discard: bool,
    /// Log the guest's output to a sink.
    pub log: bool,
    /// Limit the guest's output to [`RATE`].
    pub rate: bool,
    /// The client connects at its first read or write, not at the start.
    pub late_client: bool,
    /// The steps.
    pub ops: Vec<Op>,
}

impl Scenario {
    /// Decodes an input.
    pub fn decode(data: &[u8]) -> Scenario {
        let mut input = Input::new(data);
        let o = input.u8();
        let mut ops = Vec::new();
        while !input.is_empty() {
            ops.push(Op::decode(&mut input));
        }
        Scenario { discard: o & 1 != 0, log: o & 2 != 0, rate: o & 4 != 0, late_client: o & 8 != 0, ops }
    }

    /// Encodes it.
    pub fn encode(&self) -> Vec<u8> {
        let o = u8::from(self.discard)
            | u8::from(self.log) << 1
            | u8::from(self.rate) << 2
            | u8::from(self.late_client) << 3;
        let mut out = vec![o];
        for op in &self.ops {
            op.encode(&mut out);
        }
        out
    }
}

/// The page twice (the guest's view and the backend's), over one file.
fn page() -> (GrantMapping, GrantMapping) {
    let path = std::env::temp_dir().join(format!("fuzz-console-{}", std::process::id()));
    let f =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).expect("page file");
    let _ = std::fs::remove_file(&path);
    f.set_len(PAGE as u64).expect("page size");
    (GrantMapping::shared_file(&f, PAGE).expect("map"), GrantMapping::shared_file(&f, PAGE).expect("map"))
}

fn load(mem: &GrantMapping, off: usize) -> u32 {
    mem.load_u32(off, Ordering::Relaxed).expect("index")
}

/// A log sink keeping what it gets.
struct Sink(Arc<Mutex<Vec<u8>>>);

impl OutputSink for Sink {
    fn write(&mut self, data: &[u8]) {
        self.0.lock().expect("sink").extend_from_slice(data);
    }
}

/// The client, connected now if it is not yet.
fn client<'a>(client: &'a mut Option<UnixStream>, sock: &Path) -> &'a mut UnixStream {
    client.get_or_insert_with(|| {
        let c = UnixStream::connect(sock).expect("connect");
        c.set_nonblocking(true).expect("nonblocking");
        c
    })
}

fn snapshot(mem: &GrantMapping) -> Vec<u8> {
    let mut p = vec![0u8; PAGE];
    mem.read(0, &mut p).expect("page");
    p
}

/// The harness.
pub fn run(data: &[u8]) {
    let sc = Scenario::decode(data);
    let (guest, backend) = page();
    let sock = std::env::temp_dir().join(format!(
        "fuzz-console-{}-{:?}.sock",
        std::process::id(),
        std::thread::current().id()
    ));
    let slot: HostSlot = Arc::new(Mutex::new(Some(Host::open(&Connection::Socket(sock.clone())).expect("listen"))));
    let overflow = if sc.discard { Overflow::DiscardOldest } else { Overflow::Block };
    let limits = Limits { buffer: BUFFER, overflow, rate: if sc.rate { RATE } else { 0 }, burst: 0 };
    let logged = Arc::new(Mutex::new(Vec::new()));
    let sink: Option<Box<dyn OutputSink>> = if sc.log { Some(Box::new(Sink(logged.clone()))) } else { None };
    let started = Instant::now();
    let mut ring = ConsoleRing::new(backend, slot.clone(), limits, sink).expect("a fresh page attaches");
    let counters = ring.counters().expect("counters");
    let mut conn = None;
    if !sc.late_client {
        client(&mut conn, &sock);
    }
    // The last pass's retry: a rate-limited console waits that long.
    let retry = Cell::new(None);

    let mut honest = true;
    let mut broken = false;
    let (mut guest_sent, mut guest_got, mut host_sent, mut host_got) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let idx = |w: u8| [XENCONS_IN.cons, XENCONS_IN.prod, XENCONS_OUT.cons, XENCONS_OUT.prod][usize::from(w % 4)];
    let allowed = [
        (XENCONS_IN.data, XENCONS_IN.size as usize),
        (XENCONS_IN.prod, 4),
        (XENCONS_OUT.cons, 4),
        (XENCONS_CONNECTION, 1),
    ];

    let mut step =
        |op: &Op, ring: &mut ConsoleRing, conn: &mut Option<UnixStream>, honest: &mut bool, broken: &mut bool| match op
        {
            Op::SetIndex { which, value } => {
                *honest = false;
                guest.store_u32(idx(*which), *value, Ordering::Release).expect("index");
            }
            Op::Scribble { offset, bytes } => {
                *honest = false;
                let at = usize::from(*offset) % PAGE;
                let n = bytes.len().min(PAGE - at);
                guest.write(at, &bytes[..n]).expect("page");
            }
            Op::GuestWrite { bytes } => {
                let (c, p) = (load(&guest, XENCONS_OUT.cons), load(&guest, XENCONS_OUT.prod));
                let room = XENCONS_OUT.size.saturating_sub(p.wrapping_sub(c)) as usize;
                let n = bytes.len().min(room);
                for (i, b) in bytes[..n].iter().enumerate() {
                    let at = XENCONS_OUT.data + (p.wrapping_add(i as u32) & (XENCONS_OUT.size - 1)) as usize;
                    guest.write(at, &[*b]).expect("array");
                }
                guest.store_u32(XENCONS_OUT.prod, p.wrapping_add(n as u32), Ordering::Release).expect("index");
                guest_sent.extend_from_slice(&bytes[..n]);
            }
            Op::GuestRead { count } => {
                let (c, p) = (load(&guest, XENCONS_IN.cons), load(&guest, XENCONS_IN.prod));
                let n = p.wrapping_sub(c).min(u32::from(*count)).min(XENCONS_IN.size);
                for i in 0..n {
                    let mut b = [0u8];
                    guest
                        .read(XENCONS_IN.data + (c.wrapping_add(i) & (XENCONS_IN.size - 1)) as usize, &mut b)
                        .expect("array");
                    guest_got.push(b[0]);
                }
                guest.store_u32(XENCONS_IN.cons, c.wrapping_add(n), Ordering::Release).expect("index");
            }
            Op::Process { budget } => {
                if *broken {
                    return;
                }
                let before = snapshot(&guest);
                let result = ring.process(usize::from(*budget).max(1));
                let after = snapshot(&guest);
                let mut at = 0;
                for &(start, len) in allowed.iter().chain(&[(PAGE, 0)]) {
                    assert!(before[at..start] == after[at..start], "the backend wrote bytes in {at}..{start}");
                    at = start + len;
                }
                // Published at the end of a pass that succeeded.
                let stats = counters.load();
                if sc.rate {
                    let most = XENCONS_OUT.size as f64 + RATE as f64 * started.elapsed().as_secs_f64();
                    assert!(
                        stats.bytes_written as f64 <= most,
                        "{} bytes taken, the rate allows {most}",
                        stats.bytes_written
                    );
                }
                match result {
                    Ok(p) => {
                        if sc.log {
                            let n = logged.lock().expect("sink").len() as u64;
                            assert_eq!(n, stats.bytes_written, "the log missed output");
                        }
                        assert!(stats.in_flight <= BUFFER as u64, "more output buffered than the limit");
                        retry.set(p.retry);
                    }
                    Err(e) => {
                        assert!(!*honest, "an honest guest's console failed: {e}");
                        *broken = true;
                    }
                }
            }
            Op::HostWrite { bytes } => {
                if let Ok(n) = client(conn, &sock).write(bytes) {
                    host_sent.extend_from_slice(&bytes[..n]);
                }
            }
            Op::HostRead { len } => {
                let mut buf = vec![0u8; usize::from(*len)];
                if let Ok(n) = client(conn, &sock).read(&mut buf) {
                    host_got.extend_from_slice(&buf[..n]);
                }
            }
        };
    for op in &sc.ops {
        step(op, &mut ring, &mut conn, &mut honest, &mut broken);
    }
    if honest && !sc.discard {
        // Drain both ways until nothing moves (a few passes in a row, each
        // after the wait a rate-limited pass asks for), then everything
        // must have arrived.
        let mut still = 0;
        let mut last = (usize::MAX, usize::MAX);
        while still < 3 {
            if let Some(wait) = retry.take() {
                std::thread::sleep(wait.min(Duration::from_millis(20)));
                still = 0;
            }
            step(&Op::Process { budget: 64 }, &mut ring, &mut conn, &mut honest, &mut broken);
            step(&Op::HostRead { len: 8192 }, &mut ring, &mut conn, &mut honest, &mut broken);
            step(&Op::GuestRead { count: 255 }, &mut ring, &mut conn, &mut honest, &mut broken);
            let now = (counters.load().bytes_written as usize, counters.load().bytes_read as usize);
            still = if now == last && retry.get().is_none() { still + 1 } else { 0 };
            last = now;
        }
        assert_eq!(host_got, guest_sent, "the client got other bytes than the guest wrote");
        assert_eq!(guest_got, host_sent, "the guest got other bytes than the client wrote");
        if sc.log {
            assert_eq!(*logged.lock().expect("sink"), guest_sent, "the log got other bytes than the guest wrote");
        }
    } else if honest {
        assert!(guest_got == host_sent[..guest_got.len()], "input is never dropped");
        let logged = logged.lock().expect("sink");
        assert!(logged[..] == guest_sent[..logged.len()], "the log got other bytes than the guest wrote");
    }
    drop(ring);
    drop(slot);
}

/// Seed inputs.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let text = |s: &str| s.as_bytes().to_vec();
    let sc = |discard, ops| Scenario { discard, log: false, rate: false, late_client: false, ops }.encode();
    let flood = |n| (0..n).flat_map(|_| [Op::GuestWrite { bytes: vec![b'w'; 255] }, Op::Process { budget: 64 }]);
    vec![
        (
            "late-client-discard-logged",
            Scenario { discard: true, log: true, rate: false, late_client: true, ops: flood(40).collect() }.encode(),
        ),
        (
            "late-client-blocked",
            Scenario {
                discard: false,
                log: false,
                rate: false,
                late_client: true,
                ops: flood(30).chain([Op::HostRead { len: 4096 }, Op::Process { budget: 64 }]).collect(),
            }
            .encode(),
        ),
        (
            "rate-limited-logged",
            Scenario {
                discard: false,
                log: true,
                rate: true,
                late_client: false,
                ops: flood(20).chain([Op::HostRead { len: 8192 }, Op::HostWrite { bytes: text("ok\n") }]).collect(),
            }
            .encode(),
        ),
        (
            "login",
            sc(
                false,
                vec![
                    Op::GuestWrite { bytes: text("login: ") },
                    Op::Process { budget: 64 },
                    Op::HostRead { len: 64 },
                    Op::HostWrite { bytes: text("root\n") },
                    Op::Process { budget: 64 },
                    Op::GuestRead { count: 5 },
                ],
            ),
        ),
        (
            "full-buffer",
            sc(
                false,
                (0..40).flat_map(|_| [Op::GuestWrite { bytes: vec![b'x'; 255] }, Op::Process { budget: 2 }]).collect(),
            ),
        ),
        (
            "discard",
            sc(
                true,
                (0..40).flat_map(|_| [Op::GuestWrite { bytes: vec![b'y'; 255] }, Op::Process { budget: 64 }]).collect(),
            ),
        ),
        (
            "guest-not-reading",
            sc(
                false,
                (0..12).flat_map(|_| [Op::HostWrite { bytes: vec![b'z'; 255] }, Op::Process { budget: 64 }]).collect(),
            ),
        ),
        (
            "runaway-out-prod",
            sc(
                false,
                vec![Op::SetIndex { which: 3, value: 5000 }, Op::Process { budget: 64 }, Op::Process { budget: 1 }],
            ),
        ),
        (
            "in-cons-ahead",
            sc(
                false,
                vec![
                    Op::HostWrite { bytes: text("abc") },
                    Op::SetIndex { which: 0, value: 77 },
                    Op::Process { budget: 64 },
                ],
            ),
        ),
        (
            "scribble-indices",
            sc(
                false,
                vec![
                    Op::Scribble { offset: 3072, bytes: vec![0xff; 16] },
                    Op::Process { budget: 64 },
                    Op::GuestRead { count: 9 },
                ],
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_round_trip_through_their_encoding() {
        for (name, bytes) in seeds() {
            assert_eq!(Scenario::decode(&bytes).encode(), bytes, "{name}");
        }
    }

    #[test]
    fn seeds_run_clean() {
        for (_, bytes) in seeds() {
            run(&bytes);
        }
    }
}
