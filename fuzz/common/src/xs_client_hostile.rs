//! Target `xs_client_hostile`: the xenstore [`Client`] talking to a hostile
//! xenstored: a thread that answers each request it receives with frames the
//! input chooses (replies of the right or a wrong type or `req_id`, error
//! replies, watch events with any payload, raw bytes and partial frames,
//! oversized headers), and closes the connection when the script runs out
//! or the input says so.
//!
//! Properties: every client call returns (`Ok` or `Err`) within a bound (the
//! reply timeout is 2 ms; a call may send a few requests); no panic; once
//! the daemon has sent a frame the decoder refuses or closed the connection,
//! the client is marked dead (within a second) and every later call fails
//! with `Disconnected`; watch events delivered never contain a NUL.
//!
//! Input: the number of calls (`% 9`), that many [`Call`]s (two bytes
//! each), then the [`Answer`]s, one per request received, until the end.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use xs_wire::client::{ClientError, Options};
use xs_wire::transport::SocketTransport;
use xs_wire::{Access, Client, Decoder, Message, MsgType, Perm, TxId, WatchEvent, XENSTORE_PAYLOAD_MAX};

use crate::input::Input;

/// The client's reply timeout. Short: every request the script leaves
/// unanswered costs a run this much waiting, no CPU (at 10 ms a run spent
/// 90% of its wall time asleep); a reply that comes later than this is a
/// late reply, which the client must handle too.
const TIMEOUT: Duration = Duration::from_millis(2);
/// The client's watch queue: small, so the daemon's events overflow it.
const WATCH_QUEUE: usize = 2;
/// How many methods [`Call::op`] picks from.
const CALLS: u8 = 17;
/// The longest a call may take (it may send several requests, each waiting up to the timeout).
const CALL_BOUND: Duration = Duration::from_secs(3);

/// A client call: `op % CALLS` picks the method, `arg` its argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Call {
    /// Which method.
    pub op: u8,
    /// Its argument (a transaction id, a domid, a value's length, a raw type).
    pub arg: u8,
}

/// One frame the daemon sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A reply to the request with its `req_id` and type.
    Reply(Vec<u8>),
    /// An `XS_ERROR` reply to it (the payload need not name an errno).
    Error(Vec<u8>),
    /// A reply with `req_id + delta` and the raw type `msg_type`.
    Stray {
        /// Added to the request's id.
        delta: u8,
        /// The type.
        msg_type: u8,
        /// The payload.
        payload: Vec<u8>,
    },
    /// A watch event with this payload (NULs or not).
    Event(Vec<u8>),
    /// Raw bytes (a partial frame, garbage).
    Raw(Vec<u8>),
    /// A header announcing more than the limit: the client must drop the connection.
    Oversized(u32),
}

/// What the daemon does for one request: the frames, then maybe close.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// Sent in one write.
    pub frames: Vec<Frame>,
    /// Close the connection afterwards.
    pub close: bool,
}

impl Answer {
    /// Decodes one answer.
    pub fn decode(input: &mut Input<'_>) -> Answer {
        let head = input.u8();
        let mut frames = Vec::new();
        for _ in 0..head % 4 {
            let kind = input.u8();
            let mut payload = || {
                let n = usize::from(input.u8());
                input.bytes(n).to_vec()
            };
            frames.push(match kind % 6 {
                0 => Frame::Reply(payload()),
                1 => Frame::Error(payload()),
                2 => {
                    let delta = input.u8();
                    let msg_type = input.u8();
                    let n = usize::from(input.u8());
                    Frame::Stray { delta, msg_type, payload: input.bytes(n).to_vec() }
                }
                3 => Frame::Event(payload()),
                4 => Frame::Raw(payload()),
                _ => Frame::Oversized(input.u32()),
            });
        }
        Answer { frames, close: head & 4 != 0 }
    }

    /// Appends its encoding.
    pub fn encode(&self, out: &mut Vec<u8>) {
        assert!(self.frames.len() < 4);
        out.push(self.frames.len() as u8 | u8::from(self.close) << 2);
        let bytes = |out: &mut Vec<u8>, b: &[u8]| {
            out.push(u8::try_from(b.len()).expect("at most 255 bytes"));
            out.extend(b);
        };
        for f in &self.frames {
            match f {
                Frame::Reply(p) => {
                    out.push(0);
                    bytes(out, p);
                }
                Frame::Error(p) => {
                    out.push(1);
                    bytes(out, p);
                }
                Frame::Stray { delta, msg_type, payload } => {
                    out.extend([2, *delta, *msg_type]);
                    bytes(out, payload);
                }
                Frame::Event(p) => {
                    out.push(3);
                    bytes(out, p);
                }
                Frame::Raw(p) => {
                    out.push(4);
                    bytes(out, p);
                }
                Frame::Oversized(len) => {
                    out.push(5);
                    out.extend(len.to_le_bytes());
                }
            }
        }
    }
}

/// A whole input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Script {
    /// The client's calls, in order.
    pub calls: Vec<Call>,
    /// The daemon's answers, one per request.
    pub answers: Vec<Answer>,
}

impl Script {
    /// Decodes an input.
    pub fn decode(data: &[u8]) -> Script {
        let mut input = Input::new(data);
        let n = input.u8() % 9;
        let calls = (0..n).map(|_| Call { op: input.u8(), arg: input.u8() }).collect();
        let mut answers = Vec::new();
        while !input.is_empty() {
            answers.push(Answer::decode(&mut input));
        }
        Script { calls, answers }
    }

    /// Encodes it.
    pub fn encode(&self) -> Vec<u8> {
        assert!(self.calls.len() < 9);
        let mut out = vec![self.calls.len() as u8];
        for c in &self.calls {
            out.extend([c.op, c.arg]);
        }
        for a in &self.answers {
            a.encode(&mut out);
        }
        out
    }
}

fn header(msg_type: u32, req_id: u32, tx_id: u32, len: u32) -> Vec<u8> {
    [msg_type, req_id, tx_id, len].iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The hostile daemon: answers each request by the script; sets `doomed`
/// before sending a frame the client's decoder must refuse or closing.
fn daemon(mut stream: UnixStream, answers: Vec<Answer>, doomed: Arc<AtomicBool>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut dec = Decoder::new();
    let mut answers = answers.into_iter();
    let mut buf = [0u8; 8192];
    let mut reqs = Vec::new();
    let mut raw_sent = false;
    'conn: loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        dec.decode_all(&buf[..n], &mut reqs).expect("the client sent a malformed frame");
        for req in reqs.drain(..) {
            let Some(answer) = answers.next() else { break 'conn };
            let mut out = Vec::new();
            for f in &answer.frames {
                let msg = |out: &mut Vec<u8>, t: u32, id: u32, p: &[u8]| {
                    let p = &p[..p.len().min(XENSTORE_PAYLOAD_MAX)];
                    out.extend(header(t, id, req.tx_id, p.len() as u32));
                    out.extend(p);
                };
                match f {
                    Frame::Reply(p) => msg(&mut out, req.msg_type.0, req.req_id, p),
                    Frame::Error(p) => msg(&mut out, MsgType::ERROR.0, req.req_id, p),
                    Frame::Stray { delta, msg_type, payload } => {
                        msg(&mut out, u32::from(*msg_type), req.req_id.wrapping_add(u32::from(*delta)), payload)
                    }
                    Frame::Event(p) => msg(&mut out, MsgType::WATCH_EVENT.0, 0, p),
                    Frame::Raw(p) => {
                        raw_sent |= !p.is_empty();
                        out.extend(p);
                    }
                    Frame::Oversized(len) => {
                        // Only surely refused at a frame boundary: not after raw bytes.
                        if !raw_sent {
                            doomed.store(true, Ordering::SeqCst);
                        }
                        out.extend(header(2, req.req_id, 0, (*len).max(XENSTORE_PAYLOAD_MAX as u32 + 1)));
                    }
                }
            }
            if answer.close {
                doomed.store(true, Ordering::SeqCst);
            }
            if stream.write_all(&out).is_err() || answer.close {
                break 'conn;
            }
        }
    }
    doomed.store(true, Ordering::SeqCst);
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// Makes the call; `Err` only with the client's error.
fn call(client: &Client, c: Call) -> Result<(), ClientError> {
    let tx = TxId(u32::from(c.arg % 4));
    let path = "/local/domain/1/device/vbd/51712/state";
    match c.op % CALLS {
        0 => client.read(tx, path).map(drop),
        1 => client.write(tx, path, &vec![b'4'; usize::from(c.arg)]),
        2 => client.mkdir(tx, path),
        3 => client.rm(tx, path),
        4 => client.directory(tx, "/local/domain").map(drop),
        5 => client.directory_part(tx, "/local/domain").map(drop),
        6 => client.get_perms(tx, path).map(drop),
        7 => client.watch(path, "tok"),
        8 => client.unwatch(path, "tok"),
        9 => client.transaction_start().map(drop),
        10 => client.transaction_end(tx, c.arg & 1 != 0),
        11 => client.get_domain_path(u32::from(c.arg)).map(drop),
        12 => client.is_domain_introduced(u32::from(c.arg)).map(drop),
        13 => client.read_many(tx, &[path, "/local", "/tool"]).map(drop),
        14 => client.submit(MsgType(u32::from(c.arg)), tx, b"x\0".to_vec())?.wait().map(drop),
        15 => {
            let access = [Access::None, Access::Read, Access::Write, Access::Both][usize::from(c.arg % 4)];
            client.set_perms(tx, path, &[Perm::new(Access::None, 0), Perm::new(access, u32::from(c.arg >> 2))])
        }
        // A whole transaction, `arg` writes in it, rerun on EAGAIN.
        _ => client.transaction(|tx| (0..c.arg % 4).try_for_each(|_| client.write(tx, path, b"5"))),
    }
}

/// The harness.
pub fn run(data: &[u8]) {
    let script = Script::decode(data);
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let doomed = Arc::new(AtomicBool::new(false));
    let d = doomed.clone();
    let answers = script.answers.clone();
    let server = std::thread::spawn(move || daemon(theirs, answers, d));
    let opts = Options { timeout: TIMEOUT, watch_queue: WATCH_QUEUE };
    let client = Client::from_transport(Box::new(SocketTransport::new(ours)), opts).expect("client");
    let events = client.events();
    for &c in &script.calls {
        let dead_before = doomed.load(Ordering::SeqCst);
        if dead_before {
            assert!(wait_dead(&client), "client not dead a second after a refused frame or a close");
        }
        let start = Instant::now();
        let r = call(&client, c);
        let took = start.elapsed();
        assert!(took < CALL_BOUND, "{c:?} took {took:?}");
        if dead_before {
            assert!(matches!(r, Err(ClientError::Disconnected { .. })), "{c:?} on a dead connection gave {r:?}");
        }
    }
    if doomed.load(Ordering::SeqCst) {
        assert!(wait_dead(&client), "client not dead after a refused frame or a close");
        let r = client.read(TxId::NONE, "/x");
        assert!(matches!(r, Err(ClientError::Disconnected { .. })), "read on a dead connection gave {r:?}");
    }
    // Nobody took events before: after a drop the queue holds the first
    // `WATCH_QUEUE` events, then the overflow marker (a late answer may
    // still add events and drops while they are taken).
    let dropped = client.dropped_events();
    let delivered: Vec<WatchEvent> = events.try_iter().collect();
    let dropped_after = client.dropped_events();
    for ev in &delivered {
        assert!(!ev.path.contains('\0') && !ev.token.contains('\0'), "event with a NUL: {ev:?}");
    }
    if dropped > 0 {
        assert!(delivered.len() > WATCH_QUEUE, "{dropped} events dropped, {} delivered", delivered.len());
        assert!(delivered[..WATCH_QUEUE].iter().all(|e| !e.is_overflow()), "overflow marker early: {delivered:?}");
        assert!(delivered[WATCH_QUEUE].is_overflow(), "no overflow marker after {dropped} drops: {delivered:?}");
    } else if dropped_after == 0 {
        assert!(delivered.iter().all(|e| !e.is_overflow()), "overflow marker without a drop: {delivered:?}");
    }
    drop(client);
    server.join().expect("daemon thread");
}

/// Waits (up to a second) for the client to notice the connection is gone.
fn wait_dead(client: &Client) -> bool {
    let start = Instant::now();
    while !client.is_dead() {
        if start.elapsed() > Duration::from_secs(1) {
            return false;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    true
}

/// Seeds: a well-behaved daemon, wrong ids and types, malformed payloads
/// and events, a partial frame, an oversized header and a close.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let all: Vec<Call> = (0..8).map(|op| Call { op, arg: 1 }).collect();
    let reply = |p: &[u8]| Answer { frames: vec![Frame::Reply(p.to_vec())], close: false };
    let script = |calls: &[Call], answers: Vec<Answer>| Script { calls: calls.to_vec(), answers }.encode();
    let good = vec![
        reply(b"4"),
        reply(b"OK\0"),
        reply(b"OK\0"),
        reply(b"OK\0"),
        reply(b"0\01\0"),
        reply(b"7\0a\0b\0\0"),
        reply(b"n0\0r1\0"),
        reply(b"OK\0"),
    ];
    let later: Vec<Call> = (8..15).map(|op| Call { op, arg: 3 }).collect();
    let good_later = vec![reply(b"OK\0"), reply(b"12\0"), reply(b"OK\0"), reply(b"/local/domain/3\0"), reply(b"T\0")];
    let msg = Message::with_strings(MsgType::READ, 1, 0, &[b"4"]).unwrap().encode();
    vec![
        ("well-behaved", script(&all, good)),
        ("well-behaved-later-calls", script(&later, good_later)),
        (
            "wrong-ids-and-types",
            script(
                &all[..4],
                vec![
                    Answer {
                        frames: vec![
                            Frame::Stray { delta: 1, msg_type: 2, payload: b"x".to_vec() },
                            Frame::Stray { delta: 0, msg_type: 6, payload: b"x".to_vec() },
                        ],
                        close: false,
                    },
                    Answer { frames: vec![Frame::Error(b"EACCES\0".to_vec())], close: false },
                    Answer { frames: vec![Frame::Error(b"nonsense".to_vec())], close: false },
                    Answer { frames: vec![], close: false },
                ],
            ),
        ),
        (
            "bad-events",
            script(
                &all[..3],
                vec![
                    Answer {
                        frames: vec![
                            Frame::Event(b"/a".to_vec()),
                            Frame::Event(b"/a\0t".to_vec()),
                            Frame::Reply(b"v".to_vec()),
                        ],
                        close: false,
                    },
                    Answer { frames: vec![Frame::Event(b"/a\0t\0x\0".to_vec()), Frame::Event(vec![])], close: false },
                ],
            ),
        ),
        (
            "partial-frame",
            script(&all[..3], vec![Answer { frames: vec![Frame::Raw(msg[..10].to_vec())], close: false }, reply(b"1")]),
        ),
        (
            "oversized",
            script(
                &all[..3],
                vec![Answer { frames: vec![Frame::Reply(b"4".to_vec()), Frame::Oversized(5000)], close: false }],
            ),
        ),
        ("close", script(&all[..3], vec![Answer { frames: vec![Frame::Reply(b"4".to_vec())], close: true }])),
        (
            "bad-directory-part",
            script(&[Call { op: 5, arg: 0 }], vec![reply(b"7\0"), reply(b"8\0a\0"), reply(b"7\0\0")]),
        ),
        (
            "transaction-conflict-and-perms",
            script(
                &[Call { op: 16, arg: 1 }, Call { op: 15, arg: 5 }],
                vec![
                    reply(b"12\0"),
                    reply(b"OK\0"),
                    Answer { frames: vec![Frame::Error(b"EAGAIN\0".to_vec())], close: false },
                    reply(b"13\0"),
                    reply(b"OK\0"),
                    reply(b"OK\0"),
                    reply(b"OK\0"),
                ],
            ),
        ),
        (
            "watch-queue-overflow",
            script(
                &all[7..8],
                vec![Answer {
                    frames: vec![
                        Frame::Event(b"/a\0t\0".to_vec()),
                        Frame::Event(b"/b\0t\0".to_vec()),
                        Frame::Event(b"/c\0t\0".to_vec()),
                    ],
                    close: false,
                }],
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_round_trip_through_bytes() {
        for (_, bytes) in seeds() {
            assert_eq!(Script::decode(&bytes).encode(), bytes);
        }
    }

    #[test]
    fn harness_accepts_empty_and_garbage_inputs() {
        run(&[]);
        run(&[0xff; 64]);
        run(&[8, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]);
    }
}
