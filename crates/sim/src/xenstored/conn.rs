//! Connections: a reader thread that decodes requests and runs them under the
//! state lock, and a writer thread that drains the connection's bounded
//! output queue.
//!
//! Output policy (XSA-349): replies and watch events share one FIFO per
//! connection, bounded in bytes. When it is full, new watch events for that
//! connection are dropped (counted, and logged once per burst) and the reader
//! stops taking requests until the peer reads, so a peer that never reads
//! costs at most the bound plus one reply. C xenstored likewise drops
//! events beyond a domain's memory quota and stops reading from a domain
//! with too many outstanding replies. An identical event already waiting is
//! not queued twice (`send_event()`), except for special `@` events.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use xs_wire::{Decoder, Message, MsgType};

use super::server::Xenstored as Shared;
use super::state::ConnId;

/// The bounded FIFO of encoded messages waiting for a connection's writer.
#[derive(Debug)]
pub struct OutQueue {
    inner: Mutex<OutInner>,
    cv: Condvar,
    limit: usize,
}

#[derive(Debug, Default)]
struct OutInner {
    msgs: VecDeque<(bool, Vec<u8>)>,
    bytes: usize,
    closed: bool,
    dropping: bool,
}

impl OutQueue {
    /// A queue that holds up to `limit` bytes of events.
    pub fn new(limit: usize) -> Self {
        OutQueue { inner: Mutex::default(), cv: Condvar::new(), limit }
    }

    fn lock(&self) -> MutexGuard<'_, OutInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a reply (always: the reader waits for room before each request).
    pub fn push_reply(&self, msg: &Message) {
        let mut q = self.lock();
        if q.closed {
            return;
        }
        let bytes = msg.encode();
        q.bytes += bytes.len();
        q.msgs.push_back((false, bytes));
        self.cv.notify_all();
    }

    /// Queues a watch event; `false` if it was dropped (queue full or closed).
    /// A duplicate of a waiting non-special event counts as delivered.
    pub fn push_event(&self, msg: &Message) -> bool {
        let mut q = self.lock();
        if q.closed {
            return false;
        }
        let bytes = msg.encode();
        if msg.payload.first() != Some(&b'@') && q.msgs.iter().any(|(ev, b)| *ev && *b == bytes) {
            return true;
        }
        if q.bytes + bytes.len() > self.limit {
            if !q.dropping {
                log::warn!("xenstored: output queue full, dropping watch events");
                q.dropping = true;
            }
            return false;
        }
        q.dropping = false;
        q.bytes += bytes.len();
        q.msgs.push_back((true, bytes));
        self.cv.notify_all();
        true
    }

    /// Waits until the queue has room for more replies; `false` once closed.
    pub fn wait_room(&self) -> bool {
        let mut q = self.lock();
        while !q.closed && q.bytes >= self.limit {
            q = self.cv.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        !q.closed
    }

    /// Takes the next message to write, waiting for one; `None` once closed.
    pub fn pop(&self) -> Option<Vec<u8>> {
        let mut q = self.lock();
        loop {
            if q.closed {
                return None;
            }
            if let Some((_, b)) = q.msgs.pop_front() {
                q.bytes -= b.len();
                self.cv.notify_all();
                return Some(b);
            }
            q = self.cv.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Closes the queue: waiters wake, further pushes are ignored.
    pub fn close(&self) {
        let mut q = self.lock();
        q.closed = true;
        q.msgs.clear();
        q.bytes = 0;
        self.cv.notify_all();
    }

    /// Hands every waiting message to `f` as one buffer and empties the queue.
    #[cfg(test)]
    pub fn take_all(&self, f: impl FnOnce(Vec<u8>)) {
        let mut q = self.lock();
        let bytes: Vec<u8> = q.msgs.drain(..).flat_map(|(_, b)| b).collect();
        q.bytes = 0;
        drop(q);
        f(bytes);
    }

    /// Bytes waiting.
    #[cfg(test)]
    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }
}

/// Registers a connection on `stream` and starts its reader and writer
/// threads (named `xs-conn<id>-rd` / `-wr`).
pub fn spawn(shared: &Arc<Shared>, stream: UnixStream, domid: u32, server: Option<u64>) -> std::io::Result<ConnId> {
    let id = shared.next_conn_id();
    let out = Arc::new(OutQueue::new(shared.out_queue_bytes()));
    let privileged = server.is_some() || domid == 0;
    let handle = stream.try_clone()?;
    let writer_stream = stream.try_clone()?;
    shared.register(id, domid, privileged, out.clone(), handle, server);
    let s = shared.clone();
    let o = out.clone();
    let wr = std::thread::Builder::new().name(format!("xs-conn{id}-wr")).spawn(move || writer(writer_stream, o));
    if let Err(e) = wr {
        shared.unregister(id);
        return Err(e);
    }
    let rd = std::thread::Builder::new().name(format!("xs-conn{id}-rd")).spawn(move || reader(s, id, stream, out));
    if let Err(e) = rd {
        shared.unregister(id);
        return Err(e);
    }
    log::debug!("xenstored: conn {id} as domain {domid} (privileged: {privileged})");
    Ok(id)
}

fn writer(mut stream: UnixStream, out: Arc<OutQueue>) {
    while let Some(bytes) = out.pop() {
        if stream.write_all(&bytes).is_err() {
            out.close();
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}

fn reader(shared: Arc<Shared>, id: ConnId, mut stream: UnixStream, out: Arc<OutQueue>) {
    let mut dec = Decoder::new();
    let mut buf = vec![0u8; 4096];
    'conn: loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let mut input = &buf[..n];
        while !input.is_empty() {
            let (used, msg) = match dec.decode(input) {
                Ok(r) => r,
                Err(e) => {
                    log::warn!("xenstored: conn {id}: {e}; disconnecting");
                    shared.count_bad_client();
                    break 'conn;
                }
            };
            input = &input[used..];
            let Some(msg) = msg else { continue };
            if !out.wait_room() {
                break 'conn;
            }
            let t: MsgType = msg.msg_type;
            let ok = std::panic::catch_unwind(AssertUnwindSafe(|| shared.process(id, &msg)));
            if ok.is_err() {
                log::error!("xenstored: conn {id}: panic while processing {t:?}; disconnecting");
                break 'conn;
            }
        }
    }
    shared.unregister(id);
    out.close();
    let _ = stream.shutdown(std::net::Shutdown::Both);
    log::debug!("xenstored: conn {id} closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(p: &[u8]) -> Message {
        Message { msg_type: MsgType::WATCH_EVENT, req_id: 0, tx_id: 0, payload: p.to_vec() }
    }

    #[test]
    fn full_queue_drops_events_but_takes_replies() {
        let q = OutQueue::new(42);
        assert!(q.push_event(&event(b"/a\0t\0")));
        assert!(q.push_event(&event(b"/b\0t\0")));
        assert!(!q.push_event(&event(b"/c\0t\0")));
        q.push_reply(&Message::error_reply(1, 0, xs_wire::XsErrno::EINVAL));
        assert_eq!(q.queued_bytes(), 21 + 21 + 23);
    }

    #[test]
    fn identical_pending_event_is_queued_once() {
        let q = OutQueue::new(1000);
        assert!(q.push_event(&event(b"/a\0t\0")));
        assert!(q.push_event(&event(b"/a\0t\0")));
        assert_eq!(q.queued_bytes(), 21);
        assert!(q.push_event(&event(b"@releaseDomain\0t\0")));
        assert!(q.push_event(&event(b"@releaseDomain\0t\0")));
        assert_eq!(q.queued_bytes(), 21 + 2 * 33);
    }

    #[test]
    fn pop_returns_fifo_then_none_after_close() {
        let q = OutQueue::new(1000);
        q.push_reply(&event(b"1"));
        q.push_reply(&event(b"2"));
        assert_eq!(q.pop().unwrap()[16..], *b"1");
        assert_eq!(q.pop().unwrap()[16..], *b"2");
        q.close();
        assert!(q.pop().is_none());
        assert!(!q.wait_room());
    }
}
