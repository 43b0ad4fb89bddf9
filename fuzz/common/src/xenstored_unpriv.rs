//! Target `xenstored_unpriv`: the simulated xenstored
//! ([`xen_sim::xenstored::Xenstored`]) serving arbitrary requests from an
//! unprivileged guest connection (domain 7), sent raw over the socket.
//!
//! The tree, set up as dom0: the guest's home `/local/domain/7` (owned by
//! 7), `/secret` = `s3cret` and `/secret/sub` = `s3cret` (perms `n0`), and
//! `/public` (readable by 7). The guest's strings never contain `s3cret`
//! (the harness rewrites it), so the value can only reach the guest by a
//! leak.
//!
//! Properties: every request gets exactly one reply, with the request's
//! `req_id` and `tx_id`, of the request's type or `ERROR` (watch events may
//! come in between); a frame over the size limit gets no reply but a
//! disconnect; nothing the guest receives contains `s3cret`; `/secret`'s
//! value and permissions are unchanged afterwards; dom0 is still served; no
//! panic. One server per thread, the guest's home reset after each input, a
//! new guest connection each time.
//!
//! Input: [`Op`]s until the end.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use xen_sim::xenstored::Xenstored;
use xs_wire::{Access, Decoder, Message, MsgType, Perm, XENSTORE_PAYLOAD_MAX};

use crate::input::Input;

const GUEST: u32 = 7;
const SECRET: &[u8] = b"s3cret";
/// How long a reply may take before the harness calls the server hung.
const REPLY_TIMEOUT: Duration = Duration::from_secs(3);

/// Paths the guest's strings start from (then arbitrary bytes follow).
pub const PATHS: &[&str] = &[
    "/secret",
    "/secret/sub",
    "/public",
    "/local/domain/7",
    "/local/domain/7/data",
    "data",
    "",
    "/",
    "/local/domain/0",
    "/local/domain",
    "@introduceDomain",
    "@releaseDomain",
    "/tool/xenstored",
    "/secret/../secret",
    "/local/domain/7/a/b/c",
    "n0",
];

/// One string of a request: a dictionary path and a suffix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// Index into [`PATHS`] (modulo its length).
    pub path: u8,
    /// Appended to the path (at most 255 bytes).
    pub suffix: Vec<u8>,
}

/// One thing the guest does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A well-framed request; the parts are joined with NULs.
    Request {
        /// The raw type (any `u8`).
        msg_type: u8,
        /// The request id (0 is sent as 1: 0 marks watch events).
        req_id: u32,
        /// 0: none, 1: the last transaction started, 2: that plus one, else `raw_tx`.
        tx_choice: u8,
        /// The transaction id when `tx_choice` > 2.
        raw_tx: u32,
        /// Whether the payload ends with a NUL.
        trailing_nul: bool,
        /// The strings (at most 4).
        parts: Vec<Part>,
    },
    /// A header announcing `len` bytes (more than the limit when `len` exceeds
    /// it) and then nothing; the server must disconnect without a reply. Ends the input.
    Oversized {
        /// Announced length.
        len: u32,
    },
    /// Raw bytes, then the guest closes its side; whatever comes back must
    /// not leak. Ends the input.
    Garbage {
        /// The bytes (at most 255).
        bytes: Vec<u8>,
    },
}

impl Op {
    /// Decodes one op (every byte string decodes to some op).
    pub fn decode(input: &mut Input<'_>) -> Op {
        match input.u8() % 16 {
            14 => Op::Oversized { len: input.u32() },
            15 => {
                let n = usize::from(input.u8());
                Op::Garbage { bytes: input.bytes(n).to_vec() }
            }
            _ => {
                let msg_type = input.u8();
                let req_id = input.u32();
                let tx_choice = input.u8();
                let raw_tx = if tx_choice > 2 { input.u32() } else { 0 };
                let shape = input.u8();
                let mut parts = Vec::new();
                for _ in 0..(shape & 7) % 5 {
                    let path = input.u8();
                    let n = usize::from(input.u8());
                    parts.push(Part { path, suffix: input.bytes(n).to_vec() });
                }
                Op::Request { msg_type, req_id, tx_choice, raw_tx, trailing_nul: shape & 8 != 0, parts }
            }
        }
    }

    /// Appends the op's encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Op::Request { msg_type, req_id, tx_choice, raw_tx, trailing_nul, parts } => {
                out.extend([0, *msg_type]);
                out.extend(req_id.to_le_bytes());
                out.push(*tx_choice);
                if *tx_choice > 2 {
                    out.extend(raw_tx.to_le_bytes());
                }
                assert!(parts.len() <= 4);
                out.push(parts.len() as u8 | u8::from(*trailing_nul) << 3);
                for p in parts {
                    out.push(p.path);
                    out.push(u8::try_from(p.suffix.len()).expect("at most 255 bytes"));
                    out.extend(&p.suffix);
                }
            }
            Op::Oversized { len } => {
                out.push(14);
                out.extend(len.to_le_bytes());
            }
            Op::Garbage { bytes } => {
                out.extend([15, u8::try_from(bytes.len()).expect("at most 255 bytes")]);
                out.extend(bytes);
            }
        }
    }
}

/// Decodes a whole input.
pub fn decode(data: &[u8]) -> Vec<Op> {
    let mut input = Input::new(data);
    let mut ops = Vec::new();
    while !input.is_empty() {
        ops.push(Op::decode(&mut input));
    }
    ops
}

/// Encodes ops as an input.
pub fn encode(ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::new();
    for op in ops {
        op.encode(&mut out);
    }
    out
}

/// Rewrites every `s3cret` in `bytes` (it cannot overlap itself, so one pass does).
fn scrub(bytes: &mut [u8]) {
    let mut i = 0;
    while i + SECRET.len() <= bytes.len() {
        if &bytes[i..i + SECRET.len()] == SECRET {
            bytes[i + SECRET.len() - 1] = b'T';
            i += SECRET.len();
        } else {
            i += 1;
        }
    }
}

fn leaks(bytes: &[u8]) -> bool {
    bytes.windows(SECRET.len()).any(|w| w == SECRET)
}

/// A connection read with a timeout: panics when xenstored does not answer
/// in time or sends an undecodable frame.
struct Conn {
    stream: UnixStream,
    dec: Decoder,
    pending: std::collections::VecDeque<Message>,
    /// The guest's: nothing it receives may contain the secret.
    guest: bool,
}

impl Conn {
    fn new(stream: UnixStream, guest: bool) -> Conn {
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).expect("read timeout");
        stream.set_write_timeout(Some(REPLY_TIMEOUT)).expect("write timeout");
        Conn { stream, dec: Decoder::new(), pending: Default::default(), guest }
    }

    /// The next message, or `None` at EOF (or a reset).
    fn next(&mut self) -> Option<Message> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(m) = self.pending.pop_front() {
                assert!(!(self.guest && leaks(&m.payload)), "guest received the secret: {m:?}");
                return Some(m);
            }
            let n = match self.stream.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    panic!("no message from xenstored within {REPLY_TIMEOUT:?}")
                }
                Err(_) => return None,
            };
            let mut msgs = Vec::new();
            self.dec.decode_all(&buf[..n], &mut msgs).expect("xenstored sent an undecodable frame");
            self.pending.extend(msgs);
        }
    }

    /// Sends `msg` and returns its reply, skipping watch events.
    fn call(&mut self, msg: &Message) -> Message {
        self.stream.write_all(&msg.encode()).expect("xenstored closed a connection that sent a valid frame");
        loop {
            let m = self.next().unwrap_or_else(|| panic!("no reply to {msg:?}: disconnected"));
            if m.msg_type == MsgType::WATCH_EVENT && m.req_id == 0 {
                continue;
            }
            assert_eq!(m.req_id, msg.req_id, "reply to {msg:?} with another req_id: {m:?}");
            assert_eq!(m.tx_id, msg.tx_id, "reply to {msg:?} with another tx_id: {m:?}");
            assert!(
                m.msg_type == msg.msg_type || m.msg_type == MsgType::ERROR,
                "reply of type {:?} to {msg:?}",
                m.msg_type
            );
            return m;
        }
    }
}

fn dom0_call(conn: &mut Conn, t: MsgType, parts: &[&[u8]]) -> Message {
    let m = conn.call(&Message::with_strings(t, 1, 0, parts).expect("small"));
    assert_eq!(m.as_error(), None, "dom0 {t:?} {parts:?} failed");
    m
}

fn setup() -> (Arc<Xenstored>, Conn) {
    let xs = Xenstored::new();
    let mut dom0 = Conn::new(xs.connect_as(0).expect("dom0 connection"), false);
    for (path, value, perms) in [
        ("/secret", SECRET, &[&b"n0"[..]][..]),
        ("/secret/sub", SECRET, &[b"n0"]),
        ("/public", b"hello", &[b"n0", b"r7"]),
        ("/local/domain/7", b"", &[b"n7"]),
    ] {
        xs.write_node(path, value).expect("dom0 write");
        let mut args = vec![path.as_bytes()];
        args.extend_from_slice(perms);
        dom0_call(&mut dom0, MsgType::SET_PERMS, &args);
    }
    (xs, dom0)
}

/// Puts the guest's home back as [`setup`] made it: whatever the guest
/// created is below it (it can write nowhere else), and its watches and
/// transactions went with its connection.
fn reset_home(xs: &Xenstored, dom0: &mut Conn) {
    let _ = dom0.call(&Message::with_strings(MsgType::RM, 1, 0, &[b"/local/domain/7"]).expect("small"));
    xs.write_node("/local/domain/7", b"").expect("dom0 write");
    dom0_call(dom0, MsgType::SET_PERMS, &[b"/local/domain/7", b"n7"]);
}

thread_local! {
    /// One server per thread, reused: a fresh one per input (three
    /// connections, six threads) made the target five times slower.
    static SERVER: std::cell::RefCell<Option<(Arc<Xenstored>, Conn)>> = const { std::cell::RefCell::new(None) };
}

/// The process's thread count (`Threads:` of `/proc/self/status`; 0 if unknown).
fn threads() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Threads:")?.trim().parse().ok()).unwrap_or(0)
}

fn secret_perms() -> Vec<Perm> {
    vec![Perm::new(Access::None, 0)]
}

/// The harness.
pub fn run(data: &[u8]) {
    let ops = decode(data);
    // Taken out while in use: after a panic the next run starts afresh.
    let (xs, mut dom0) = SERVER.with(|s| s.borrow_mut().take()).unwrap_or_else(setup);
    let threads_before = threads();
    let mut guest = Conn::new(xs.connect_as(GUEST).expect("guest connection"), true);
    let mut last_tx = 0u32;
    for op in &ops {
        match op {
            Op::Request { msg_type, req_id, tx_choice, raw_tx, trailing_nul, parts } => {
                let tx_id = match tx_choice {
                    0 => 0,
                    1 => last_tx,
                    2 => last_tx.wrapping_add(1),
                    _ => *raw_tx,
                };
                let mut payload = Vec::new();
                for (i, p) in parts.iter().enumerate() {
                    if i > 0 {
                        payload.push(0);
                    }
                    payload.extend(PATHS[usize::from(p.path) % PATHS.len()].as_bytes());
                    payload.extend(&p.suffix);
                }
                if *trailing_nul {
                    payload.push(0);
                }
                scrub(&mut payload);
                payload.truncate(XENSTORE_PAYLOAD_MAX);
                let t = MsgType(u32::from(*msg_type));
                let msg = Message::new(t, (*req_id).max(1), tx_id, payload).expect("within the limit");
                let reply = guest.call(&msg);
                if t == MsgType::TRANSACTION_START && reply.msg_type == t {
                    let s = reply.strings();
                    last_tx = s.first().and_then(|s| std::str::from_utf8(s).ok()?.parse().ok()).unwrap_or(0);
                }
            }
            Op::Oversized { len } => {
                let len = (*len).max(XENSTORE_PAYLOAD_MAX as u32 + 1);
                let mut frame = Vec::new();
                frame.extend(MsgType::READ.0.to_le_bytes());
                frame.extend(1u32.to_le_bytes());
                frame.extend(0u32.to_le_bytes());
                frame.extend(len.to_le_bytes());
                // The server may already be gone after an earlier op; that is fine too.
                let _ = guest.stream.write_all(&frame);
                while let Some(m) = guest.next() {
                    assert!(m.msg_type == MsgType::WATCH_EVENT && m.req_id == 0, "reply to an oversized frame: {m:?}");
                }
                break;
            }
            Op::Garbage { bytes } => {
                let mut bytes = bytes.clone();
                scrub(&mut bytes);
                let _ = guest.stream.write_all(&bytes);
                let _ = guest.stream.shutdown(std::net::Shutdown::Write);
                // Whatever comes back is checked for the secret by `next`.
                while guest.next().is_some() {}
                break;
            }
        }
    }
    drop(guest);
    // The guest's connection is forgotten once it hung up.
    let start = std::time::Instant::now();
    while xs.stats().open_connections > 1 {
        assert!(start.elapsed() < Duration::from_secs(5), "guest connection still open after it hung up");
        std::thread::yield_now();
    }
    // And its two threads are gone: LeakSanitizer took the handle of a
    // thread still exiting at the end of a run for a leak.
    while threads() > threads_before && start.elapsed() < Duration::from_secs(1) {
        std::thread::yield_now();
    }

    assert_eq!(xs.read_node("/secret").as_deref(), Some(SECRET), "/secret changed");
    assert_eq!(xs.node_perms("/secret"), Some(secret_perms()), "/secret's perms changed");
    assert_eq!(xs.read_node("/secret/sub").as_deref(), Some(SECRET), "/secret/sub changed");
    assert_eq!(xs.node_perms("/secret/sub"), Some(secret_perms()), "/secret/sub's perms changed");
    let m = dom0_call(&mut dom0, MsgType::READ, &[b"/secret"]);
    assert_eq!(m.payload, SECRET);
    let m = dom0_call(&mut dom0, MsgType::READ, &[b"/secret/sub"]);
    assert_eq!(m.payload, SECRET);
    reset_home(&xs, &mut dom0);
    SERVER.with(|s| *s.borrow_mut() = Some((xs, dom0)));
}

fn req(msg_type: MsgType, tx_choice: u8, parts: &[(u8, &[u8])]) -> Op {
    Op::Request {
        msg_type: msg_type.0 as u8,
        req_id: 42,
        tx_choice,
        raw_tx: 0,
        trailing_nul: true,
        parts: parts.iter().map(|&(path, s)| Part { path, suffix: s.to_vec() }).collect(),
    }
}

/// Seeds: reads and writes inside and outside the guest's home, permission
/// changes, watches, transactions, privileged requests, an oversized frame
/// and garbage.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use MsgType as T;
    let (secret, sub, public, home, data, rel) = (0, 1, 2, 3, 4, 5);
    vec![
        (
            "reads",
            encode(&[
                req(T::READ, 0, &[(secret, b"")]),
                req(T::READ, 0, &[(sub, b"")]),
                req(T::READ, 0, &[(public, b"")]),
                req(T::DIRECTORY, 0, &[(secret, b"")]),
                req(T::GET_PERMS, 0, &[(secret, b"")]),
                req(T::DIRECTORY_PART, 0, &[(secret, b""), (6, b"0")]),
            ]),
        ),
        (
            "writes",
            encode(&[
                req(T::WRITE, 0, &[(data, b""), (6, b"v")]),
                req(T::WRITE, 0, &[(rel, b"/x"), (6, b"v")]),
                req(T::WRITE, 0, &[(secret, b""), (6, b"mine")]),
                req(T::WRITE, 0, &[(sub, b"/new"), (6, b"v")]),
                req(T::MKDIR, 0, &[(secret, b"/dir")]),
                req(T::RM, 0, &[(secret, b"")]),
                req(T::RM, 0, &[(home, b"")]),
            ]),
        ),
        (
            "perms",
            encode(&[
                req(T::SET_PERMS, 0, &[(secret, b""), (6, b"b7")]),
                req(T::SET_PERMS, 0, &[(data, b""), (6, b"n7"), (6, b"r0")]),
                req(T::WRITE, 0, &[(data, b""), (6, b"v")]),
                req(T::SET_PERMS, 0, &[(data, b""), (6, b"n0")]),
                req(T::GET_PERMS, 0, &[(data, b"")]),
            ]),
        ),
        (
            "watches",
            encode(&[
                req(T::WATCH, 0, &[(secret, b""), (6, b"tok")]),
                req(T::WATCH, 0, &[(6, b"/"), (6, b"all")]),
                req(T::WATCH, 0, &[(10, b""), (6, b"intro")]),
                req(T::WRITE, 0, &[(data, b""), (6, b"v")]),
                req(T::UNWATCH, 0, &[(secret, b""), (6, b"tok")]),
                req(T::RESET_WATCHES, 0, &[]),
            ]),
        ),
        (
            "transaction",
            encode(&[
                req(T::TRANSACTION_START, 0, &[(6, b"")]),
                req(T::READ, 1, &[(secret, b"")]),
                req(T::WRITE, 1, &[(data, b""), (6, b"v")]),
                req(T::WRITE, 1, &[(secret, b""), (6, b"v")]),
                req(T::READ, 2, &[(data, b"")]),
                req(T::TRANSACTION_END, 1, &[(6, b"T")]),
            ]),
        ),
        (
            "privileged",
            encode(&[
                req(T::INTRODUCE, 0, &[(6, b"7"), (6, b"1"), (6, b"1")]),
                req(T::RELEASE, 0, &[(6, b"0")]),
                req(T::SET_TARGET, 0, &[(6, b"7"), (6, b"0")]),
                req(T::GET_DOMAIN_PATH, 0, &[(6, b"0")]),
                req(T::CONTROL, 0, &[(6, b"print"), (6, b"x")]),
                req(T::WATCH_EVENT, 0, &[(secret, b""), (6, b"t")]),
                req(MsgType(99), 0, &[]),
            ]),
        ),
        ("oversized", encode(&[req(T::READ, 0, &[(public, b"")]), Op::Oversized { len: 4097 }])),
        (
            "garbage",
            encode(&[Op::Garbage { bytes: Message::with_strings(T::READ, 5, 0, &[b"/secret"]).unwrap().encode() }]),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_round_trip_through_bytes() {
        for (_, bytes) in seeds() {
            assert_eq!(encode(&decode(&bytes)), bytes);
        }
    }

    #[test]
    fn scrub_removes_every_secret() {
        let mut b = b"s3crets3cret-s3s3cret".to_vec();
        scrub(&mut b);
        assert!(!leaks(&b));
    }

    #[test]
    fn harness_accepts_empty_and_garbage_inputs() {
        run(&[]);
        run(&[0xff; 64]);
        run(&[0, 2, 0, 0, 0, 0, 0, 1, 0, 0]);
    }
}
