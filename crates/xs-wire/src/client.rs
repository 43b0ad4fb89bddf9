//! A xenstore client over the xenstored socket or `/dev/xen/xenbus`, without
//! libxenstore.
//!
//! One connection carries many requests at once from many threads. Callers
//! write whole frames under a write lock; one reader thread decodes replies,
//! hands each to the caller waiting on its `req_id`, and queues watch events
//! on a bounded channel (see [`crate::watch`] for the overflow policy), so a
//! slow watch consumer never delays replies.
//!
//! Every request is checked (path, payload size) before it is sent. A request
//! unanswered within the timeout fails with [`ClientError::Timeout`] naming its
//! type (some daemons drop unknown types silently); the connection stays up.
//! A frame the decoder refuses, a read error or end of stream marks the
//! connection dead: every waiting caller gets [`ClientError::Disconnected`],
//! and later calls fail at once.
//!
//! The last clone's drop closes the connection. On a socket the reader thread
//! is woken by `shutdown(2)` and joined. On the xenbus device a blocked
//! `read(2)` cannot be interrupted: the reader thread is detached and exits
//! when the next message arrives (or with the process); the device stays open
//! until then.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use zerocopy::IntoBytes;

use crate::abi::{MsgType, XsdSockmsg, HEADER_LEN};
use crate::codec::{Decoder, Message};
use crate::error::{WireError, XsErrno};
use crate::perms::{parse_perm_list, Perm};
use crate::request;
use crate::transport::{self, SocketTransport, Transport, TransportError, TransportKind};
use crate::watch::WatchQueue;

pub use crate::request::{Request, TxId};
pub use crate::watch::WatchEvent;

/// Default time to wait for a reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default number of watch events queued before the overflow policy applies.
pub const DEFAULT_WATCH_QUEUE: usize = 4096;
/// Attempts `Client::transaction` makes before giving up on `EAGAIN`.
pub const TRANSACTION_ATTEMPTS: u32 = 16;
/// Restarts of a `XS_DIRECTORY_PART` listing (generation changed) before giving up.
const DIRECTORY_PART_RESTARTS: u32 = 8;
/// Bytes of child names a `XS_DIRECTORY_PART` listing may collect.
const DIRECTORY_PART_MAX_BYTES: usize = 1 << 20;

/// Errors of the xenstore client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection could be made.
    #[error("Cannot connect to xenstore")]
    Connect(#[source] TransportError),
    /// The request was refused before sending (bad path, too large, ...).
    #[error("Invalid {msg_type} request")]
    Invalid {
        /// The request's type.
        msg_type: MsgType,
        /// What is wrong with it.
        #[source]
        source: WireError,
    },
    /// Xenstored answered with `XS_ERROR`.
    #[error("Xenstored refused {msg_type}")]
    Xs {
        /// The request's type.
        msg_type: MsgType,
        /// The error it gave.
        #[source]
        errno: XsErrno,
    },
    /// No reply within the timeout; the daemon may not implement the type.
    #[error("No reply to {msg_type} within {after:?} (the daemon may not support it)")]
    Timeout {
        /// The request's type.
        msg_type: MsgType,
        /// The timeout that expired.
        after: Duration,
    },
    /// The connection is gone (closed, read error, or a malformed frame).
    #[error("Connection to xenstored lost: {reason}")]
    Disconnected {
        /// Why the connection was marked dead.
        reason: Arc<str>,
    },
    /// The reply had another type than the request.
    #[error("Reply of type {got} to {expected}")]
    UnexpectedReply {
        /// The request's type.
        expected: MsgType,
        /// The reply's type.
        got: MsgType,
    },
    /// The reply's payload does not have the form its type requires.
    #[error("Malformed reply to {msg_type}")]
    MalformedReply {
        /// The request's type.
        msg_type: MsgType,
        /// What is wrong with it.
        #[source]
        source: WireError,
    },
    /// `Client::transaction` met `EAGAIN` on every attempt.
    #[error("Transaction still conflicting after {attempts} attempts")]
    TooManyRetries {
        /// Attempts made.
        attempts: u32,
    },
}

impl ClientError {
    /// The xenstore error this stands for: the one xenstored sent, or the one
    /// it would have sent for a request refused locally (`EINVAL` for a bad
    /// path, `E2BIG` for an oversized payload), `EAGAIN` for exhausted retries.
    pub fn errno(&self) -> Option<XsErrno> {
        match self {
            ClientError::Xs { errno, .. } => Some(*errno),
            ClientError::Invalid { source: WireError::PayloadTooLarge { .. }, .. } => Some(XsErrno::E2BIG),
            ClientError::Invalid { .. } => Some(XsErrno::EINVAL),
            ClientError::TooManyRetries { .. } => Some(XsErrno::EAGAIN),
            _ => None,
        }
    }
}

/// Result of client operations.
pub type Result<T> = std::result::Result<T, ClientError>;

/// Connection options.
#[derive(Clone, Debug)]
pub struct Options {
    /// How long a caller waits for its reply.
    pub timeout: Duration,
    /// Watch events queued before the overflow policy applies.
    pub watch_queue: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options { timeout: DEFAULT_TIMEOUT, watch_queue: DEFAULT_WATCH_QUEUE }
    }
}

type Reply = std::result::Result<Message, Arc<str>>;

/// Callers waiting for replies, and whether the connection is dead.
struct Waiters {
    dead: Option<Arc<str>>,
    by_req: HashMap<u32, Sender<Reply>>,
}

/// State shared by callers and the reader thread.
struct Shared {
    transport: Box<dyn Transport>,
    write_lock: Mutex<()>,
    waiters: Mutex<Waiters>,
    next_req: AtomicU32,
    timeout_ms: AtomicU64,
    events: Receiver<WatchEvent>,
    dropped: Arc<AtomicU64>,
}

impl Shared {
    fn waiters(&self) -> MutexGuard<'_, Waiters> {
        // A panic while holding this lock leaves the map consistent (plain inserts/removes).
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the connection dead and fails every waiting caller.
    fn kill(&self, reason: &str) {
        let mut w = self.waiters();
        if w.dead.is_none() {
            log::debug!("xenstore connection closed: {reason}");
            w.dead = Some(reason.into());
        }
        let reason = w.dead.clone().expect("set above");
        for (_, tx) in w.by_req.drain() {
            let _ = tx.send(Err(reason.clone()));
        }
    }
}

/// Owns the connection; its drop (with the last `Client` clone) closes it.
struct Handle {
    shared: Arc<Shared>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.kill("Client closed");
        let wakes = self.shared.transport.shutdown();
        let reader = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(reader) = reader {
            if wakes {
                let _ = reader.join();
            }
            // Otherwise (device) the thread is detached: it exits on its next read.
        }
    }
}

/// A connection to xenstored, shared by clones (cheap: an `Arc`), usable from
/// many threads at once.
#[derive(Clone)]
pub struct Client {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("transport", &self.handle.shared.transport.kind()).finish_non_exhaustive()
    }
}

/// A request sent and not yet answered; [`Pending::wait`] collects the reply.
#[must_use = "a pending request's reply is only checked by wait()"]
pub struct Pending {
    shared: Arc<Shared>,
    req_id: u32,
    msg_type: MsgType,
    rx: Receiver<Reply>,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending").field("req_id", &self.req_id).field("msg_type", &self.msg_type).finish()
    }
}

impl Drop for Pending {
    /// Forgets the request, so that an abandoned one (never waited for, or
    /// never answered) does not stay registered: a late reply is then dropped.
    fn drop(&mut self) {
        self.shared.waiters().by_req.remove(&self.req_id);
    }
}

impl Pending {
    /// The request's id on the wire.
    pub fn req_id(&self) -> u32 {
        self.req_id
    }

    /// Waits for the reply (up to the client's timeout). An `XS_ERROR` reply
    /// becomes [`ClientError::Xs`]; a reply of another type than the request
    /// becomes [`ClientError::UnexpectedReply`].
    pub fn wait(self) -> Result<Message> {
        let after = Duration::from_millis(self.shared.timeout_ms.load(Ordering::Relaxed));
        let reply = match self.rx.recv_timeout(after) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => {
                self.shared.waiters().by_req.remove(&self.req_id);
                // The reply may have landed between the timeout and the removal.
                match self.rx.try_recv() {
                    Ok(r) => r,
                    Err(_) => return Err(ClientError::Timeout { msg_type: self.msg_type, after }),
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                Err(self.shared.waiters().dead.clone().unwrap_or_else(|| "reply channel closed".into()))
            }
        };
        let msg = reply.map_err(|reason| ClientError::Disconnected { reason })?;
        if let Some(errno) = msg.as_error() {
            return Err(ClientError::Xs { msg_type: self.msg_type, errno });
        }
        if msg.msg_type != self.msg_type {
            return Err(ClientError::UnexpectedReply { expected: self.msg_type, got: msg.msg_type });
        }
        Ok(msg)
    }
}

/// The reader thread: decodes frames, routes replies and watch events.
fn reader_loop(shared: &Shared, mut queue: WatchQueue) {
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; HEADER_LEN + crate::abi::XENSTORE_PAYLOAD_MAX];
    let mut msgs = Vec::new();
    loop {
        if shared.waiters().dead.is_some() {
            return;
        }
        let n = match shared.transport.recv(&mut buf) {
            Ok(0) => return shared.kill("xenstored closed the connection"),
            Ok(n) => n,
            Err(e) => return shared.kill(&format!("read failed: {e}")),
        };
        if let Err(e) = decoder.decode_all(&buf[..n], &mut msgs) {
            log::warn!("xenstore: malformed frame from the daemon: {e}");
            return shared.kill(&format!("malformed frame from the daemon: {e}"));
        }
        for msg in msgs.drain(..) {
            if msg.msg_type == MsgType::WATCH_EVENT {
                match request::parse_watch_event(&msg.payload) {
                    Ok((path, token)) => queue.push(WatchEvent { path, token }),
                    Err(e) => log::warn!("xenstore: dropped a watch event: {e}"),
                }
                continue;
            }
            let waiter = shared.waiters().by_req.remove(&msg.req_id);
            match waiter {
                Some(tx) => {
                    let _ = tx.send(Ok(msg));
                }
                None => log::warn!("xenstore: dropped a {} reply for unknown req_id {}", msg.msg_type, msg.req_id),
            }
        }
    }
}

impl Client {
    /// Connects as libxenstore does: `XENSTORED_PATH`, else the socket in
    /// `XENSTORED_RUNDIR`, `/run/xenstored` or `/var/run/xenstored`, else
    /// `/dev/xen/xenbus` (see [`transport::choose_endpoint`]).
    pub fn connect() -> Result<Client> {
        Client::connect_with(Options::default())
    }

    /// [`Client::connect`] with options.
    pub fn connect_with(opts: Options) -> Result<Client> {
        let t = transport::open_default().map_err(ClientError::Connect)?;
        Client::from_transport(t, opts)
    }

    /// Connects to a xenstored unix socket.
    pub fn connect_socket(path: &Path) -> Result<Client> {
        let t = SocketTransport::connect(path).map_err(ClientError::Connect)?;
        Client::from_transport(Box::new(t), Options::default())
    }

    /// Opens the xenbus device (normally `/dev/xen/xenbus`).
    pub fn connect_device(path: &Path) -> Result<Client> {
        let t = transport::DeviceTransport::open(path).map_err(ClientError::Connect)?;
        Client::from_transport(Box::new(t), Options::default())
    }

    /// Uses an already connected stream (e.g. from a simulator).
    pub fn from_stream(stream: UnixStream) -> Result<Client> {
        Client::from_transport(Box::new(SocketTransport::new(stream)), Options::default())
    }

    /// Runs the client over any transport; starts the reader thread.
    pub fn from_transport(transport: Box<dyn Transport>, opts: Options) -> Result<Client> {
        let queue = WatchQueue::new(opts.watch_queue);
        let shared = Arc::new(Shared {
            transport,
            write_lock: Mutex::new(()),
            waiters: Mutex::new(Waiters { dead: None, by_req: HashMap::new() }),
            next_req: AtomicU32::new(1),
            timeout_ms: AtomicU64::new(duration_ms(opts.timeout)),
            events: queue.receiver(),
            dropped: queue.dropped_counter(),
        });
        let for_reader = shared.clone();
        let reader = std::thread::Builder::new()
            .name("xs-reader".into())
            .spawn(move || {
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| reader_loop(&for_reader, queue)));
                if run.is_err() {
                    log::error!("xenstore reader thread panicked");
                    for_reader.kill("reader thread panicked");
                }
            })
            .map_err(|e| ClientError::Disconnected { reason: format!("cannot start reader thread: {e}").into() })?;
        Ok(Client { handle: Arc::new(Handle { shared, reader: Mutex::new(Some(reader)) }) })
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// The watch events of this connection (all receivers share one queue).
    pub fn events(&self) -> Receiver<WatchEvent> {
        self.shared().events.clone()
    }

    /// Watch events dropped because the queue was full (see [`crate::watch`]).
    pub fn dropped_events(&self) -> u64 {
        self.shared().dropped.load(Ordering::Relaxed)
    }

    /// Changes the reply timeout for requests waited on from now on.
    pub fn set_timeout(&self, timeout: Duration) {
        self.shared().timeout_ms.store(duration_ms(timeout), Ordering::Relaxed);
    }

    /// The transport kind in use.
    pub fn transport_kind(&self) -> TransportKind {
        self.shared().transport.kind()
    }

    /// Whether the connection has been marked dead.
    pub fn is_dead(&self) -> bool {
        self.shared().waiters().dead.is_some()
    }

    /// Sends a request of any type and returns at once; see [`Pending::wait`].
    pub fn submit(&self, msg_type: MsgType, tx: TxId, payload: Vec<u8>) -> Result<Pending> {
        let req = Request::raw(msg_type, tx, payload).map_err(|source| ClientError::Invalid { msg_type, source })?;
        Ok(self.submit_batch(std::slice::from_ref(&req))?.pop().expect("one request, one pending"))
    }

    /// Sends several requests in one write (one per frame on the device) and
    /// returns their pending replies, in order.
    pub fn submit_batch(&self, reqs: &[Request]) -> Result<Vec<Pending>> {
        let shared = self.shared();
        let max = shared.transport.max_frame();
        for r in reqs {
            if HEADER_LEN + r.payload.len() > max {
                let source = WireError::PayloadTooLarge { len: r.payload.len(), max: max - HEADER_LEN };
                return Err(ClientError::Invalid { msg_type: r.msg_type, source });
            }
        }
        let mut pendings = Vec::with_capacity(reqs.len());
        let mut frames = Vec::with_capacity(reqs.len());
        {
            let mut w = shared.waiters();
            if let Some(reason) = &w.dead {
                return Err(ClientError::Disconnected { reason: reason.clone() });
            }
            for r in reqs {
                let req_id = loop {
                    let id = shared.next_req.fetch_add(1, Ordering::Relaxed);
                    if !w.by_req.contains_key(&id) {
                        break id;
                    }
                };
                let (tx, rx) = crossbeam_channel::bounded(1);
                w.by_req.insert(req_id, tx);
                let header = XsdSockmsg {
                    msg_type: r.msg_type.0.into(),
                    req_id: req_id.into(),
                    tx_id: r.tx.0.into(),
                    len: (r.payload.len() as u32).into(),
                };
                let mut frame = Vec::with_capacity(HEADER_LEN + r.payload.len());
                frame.extend_from_slice(header.as_bytes());
                frame.extend_from_slice(&r.payload);
                frames.push(frame);
                pendings.push(Pending { shared: shared.clone(), req_id, msg_type: r.msg_type, rx });
            }
        }
        let slices: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
        let sent = {
            let _guard = shared.write_lock.lock().unwrap_or_else(|e| e.into_inner());
            shared.transport.send(&slices)
        };
        if let Err(e) = sent {
            // A partial frame may be on the wire: the stream is out of step.
            shared.kill(&format!("write failed: {e}"));
            return Err(ClientError::Disconnected { reason: shared.waiters().dead.clone().expect("killed") });
        }
        Ok(pendings)
    }

    /// Sends a batch and waits for every reply; the outer error is a failure
    /// to send, the inner ones are per request.
    pub fn batch(&self, reqs: &[Request]) -> Result<Vec<Result<Message>>> {
        Ok(self.submit_batch(reqs)?.into_iter().map(Pending::wait).collect())
    }

    /// Sends one request and waits for its reply.
    pub fn request(&self, req: Request) -> Result<Message> {
        self.submit_batch(std::slice::from_ref(&req))?.pop().expect("one request, one pending").wait()
    }

    fn checked(msg_type: MsgType, r: std::result::Result<Request, WireError>) -> Result<Request> {
        r.map_err(|source| ClientError::Invalid { msg_type, source })
    }

    /// Reads a node's value.
    pub fn read(&self, tx: TxId, path: &str) -> Result<Vec<u8>> {
        Ok(self.request(Self::checked(MsgType::READ, Request::read(tx, path))?)?.payload)
    }

    /// Reads several nodes with one pipelined batch; one result per path.
    pub fn read_many(&self, tx: TxId, paths: &[&str]) -> Result<Vec<Result<Vec<u8>>>> {
        let reqs = paths
            .iter()
            .map(|p| Self::checked(MsgType::READ, Request::read(tx, p)))
            .collect::<Result<Vec<Request>>>()?;
        Ok(self.batch(&reqs)?.into_iter().map(|r| r.map(|m| m.payload)).collect())
    }

    /// Writes a node's value, creating the node (and missing parents).
    pub fn write(&self, tx: TxId, path: &str, value: &[u8]) -> Result<()> {
        self.request(Self::checked(MsgType::WRITE, Request::write(tx, path, value))?).map(drop)
    }

    /// Creates a node with an empty value (no error if it exists).
    pub fn mkdir(&self, tx: TxId, path: &str) -> Result<()> {
        self.request(Self::checked(MsgType::MKDIR, Request::mkdir(tx, path))?).map(drop)
    }

    /// Removes a node and everything below it.
    pub fn rm(&self, tx: TxId, path: &str) -> Result<()> {
        self.request(Self::checked(MsgType::RM, Request::rm(tx, path))?).map(drop)
    }

    /// Lists a node's children; falls back to `XS_DIRECTORY_PART` when the
    /// list does not fit one reply (`E2BIG`).
    pub fn directory(&self, tx: TxId, path: &str) -> Result<Vec<String>> {
        let msg_type = MsgType::DIRECTORY;
        match self.request(Self::checked(msg_type, Request::directory(tx, path))?) {
            Ok(m) => {
                request::parse_directory(&m.payload).map_err(|source| ClientError::MalformedReply { msg_type, source })
            }
            Err(e) if e.errno() == Some(XsErrno::E2BIG) => self.directory_part(tx, path),
            Err(e) => Err(e),
        }
    }

    /// Lists a node's children with `XS_DIRECTORY_PART` only, restarting if
    /// the node changes (its generation) between parts.
    pub fn directory_part(&self, tx: TxId, path: &str) -> Result<Vec<String>> {
        let msg_type = MsgType::DIRECTORY_PART;
        let malformed = |what| ClientError::MalformedReply { msg_type, source: WireError::MalformedPayload(what) };
        'restart: for _ in 0..DIRECTORY_PART_RESTARTS {
            let mut names: Vec<u8> = Vec::new();
            let mut generation: Option<Vec<u8>> = None;
            loop {
                let req = Self::checked(msg_type, Request::directory_part(tx, path, names.len()))?;
                let reply = self.request(req)?;
                let part = request::parse_directory_part(&reply.payload)
                    .map_err(|source| ClientError::MalformedReply { msg_type, source })?;
                match &generation {
                    Some(g) if g.as_slice() != part.generation => continue 'restart,
                    Some(_) => {}
                    None => generation = Some(part.generation.to_vec()),
                }
                if !part.last && part.names.is_empty() {
                    return Err(malformed("directory part without progress"));
                }
                if names.len() + part.names.len() > DIRECTORY_PART_MAX_BYTES {
                    return Err(malformed("directory listing too long"));
                }
                names.extend_from_slice(part.names);
                if part.last {
                    return request::names_from_parts(&names)
                        .map_err(|source| ClientError::MalformedReply { msg_type, source });
                }
            }
        }
        Err(malformed("directory changing on every attempt"))
    }

    /// A node's permissions (owner first).
    pub fn get_perms(&self, tx: TxId, path: &str) -> Result<Vec<Perm>> {
        let msg_type = MsgType::GET_PERMS;
        let m = self.request(Self::checked(msg_type, Request::get_perms(tx, path))?)?;
        parse_perm_list(&m.payload).map_err(|source| ClientError::MalformedReply { msg_type, source })
    }

    /// Sets a node's permissions (owner first).
    pub fn set_perms(&self, tx: TxId, path: &str, perms: &[Perm]) -> Result<()> {
        self.request(Self::checked(MsgType::SET_PERMS, Request::set_perms(tx, path, perms))?).map(drop)
    }

    /// Watches `path` (and below); events carry `token`. Xenstored fires
    /// one event at once for the path itself.
    pub fn watch(&self, path: &str, token: &str) -> Result<()> {
        self.request(Self::checked(MsgType::WATCH, Request::watch(path, token))?).map(drop)
    }

    /// Removes a watch.
    pub fn unwatch(&self, path: &str, token: &str) -> Result<()> {
        self.request(Self::checked(MsgType::UNWATCH, Request::unwatch(path, token))?).map(drop)
    }

    /// Starts a transaction.
    pub fn transaction_start(&self) -> Result<TxId> {
        let msg_type = MsgType::TRANSACTION_START;
        let m = self.request(Request::transaction_start())?;
        request::parse_tx_id(&m.payload).map_err(|source| ClientError::MalformedReply { msg_type, source })
    }

    /// Ends a transaction, committing it or not. `EAGAIN` means it conflicted.
    pub fn transaction_end(&self, tx: TxId, commit: bool) -> Result<()> {
        self.request(Request::transaction_end(tx, commit)).map(drop)
    }

    /// Runs `f` in a transaction and commits it, rerunning all of it when
    /// xenstored answers `EAGAIN` (conflict), up to [`TRANSACTION_ATTEMPTS`]
    /// times, after a short random pause that grows with each attempt. An
    /// error from `f` other than `EAGAIN` aborts the transaction.
    pub fn transaction<T>(&self, mut f: impl FnMut(TxId) -> Result<T>) -> Result<T> {
        for attempt in 1..=TRANSACTION_ATTEMPTS {
            let tx = self.transaction_start()?;
            match f(tx) {
                Ok(v) => match self.transaction_end(tx, true) {
                    Ok(()) => return Ok(v),
                    Err(e) if e.errno() == Some(XsErrno::EAGAIN) => {
                        log::debug!("xenstore transaction conflicted (attempt {attempt}), retrying");
                    }
                    Err(e) => return Err(e),
                },
                Err(e) => {
                    if let Err(end) = self.transaction_end(tx, false) {
                        log::debug!("xenstore transaction abort failed: {end}");
                    }
                    if e.errno() != Some(XsErrno::EAGAIN) {
                        return Err(e);
                    }
                }
            }
            if attempt < TRANSACTION_ATTEMPTS {
                std::thread::sleep(retry_backoff(attempt));
            }
        }
        Err(ClientError::TooManyRetries { attempts: TRANSACTION_ATTEMPTS })
    }

    fn text_reply(&self, req: Request, what: &'static str) -> Result<String> {
        let msg_type = req.msg_type;
        let m = self.request(req)?;
        request::parse_text(&m.payload, what).map_err(|source| ClientError::MalformedReply { msg_type, source })
    }

    /// The home path of a domain (`/local/domain/<domid>`).
    pub fn get_domain_path(&self, domid: u32) -> Result<String> {
        self.text_reply(Request::get_domain_path(domid), "domain path")
    }

    /// Introduces a domain's xenstore ring to xenstored.
    pub fn introduce(&self, domid: u32, mfn: u64, port: u32) -> Result<()> {
        self.request(Request::introduce(domid, mfn, port)).map(drop)
    }

    /// Tells xenstored a domain is gone.
    pub fn release(&self, domid: u32) -> Result<()> {
        self.request(Request::release(domid)).map(drop)
    }

    /// Whether xenstored knows the domain.
    pub fn is_domain_introduced(&self, domid: u32) -> Result<bool> {
        let msg_type = MsgType::IS_DOMAIN_INTRODUCED;
        let m = self.request(Request::is_domain_introduced(domid))?;
        request::parse_bool(&m.payload).map_err(|source| ClientError::MalformedReply { msg_type, source })
    }

    /// Clears a domain's shutdown flag after resume.
    pub fn resume(&self, domid: u32) -> Result<()> {
        self.request(Request::resume(domid)).map(drop)
    }

    /// Gives `domid` the privileges of `target` (device models).
    pub fn set_target(&self, domid: u32, target: u32) -> Result<()> {
        self.request(Request::set_target(domid, target)).map(drop)
    }

    /// Drops every watch and transaction of this connection.
    pub fn reset_watches(&self) -> Result<()> {
        self.request(Request::reset_watches()).map(drop)
    }

    /// `XS_CONTROL` with arguments; returns the reply payload.
    pub fn control(&self, args: &[&[u8]]) -> Result<Vec<u8>> {
        Ok(self.request(Self::checked(MsgType::CONTROL, Request::control(args))?)?.payload)
    }
}

/// A random pause before rerunning a conflicted transaction, so that writers
/// that keep colliding fall out of step: up to 50 µs doubled per attempt,
/// capped at about 50 ms.
fn retry_backoff(attempt: u32) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let max_us = 50u64 << attempt.min(10);
    let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
    Duration::from_micros(random % max_us)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::atomic::AtomicUsize;

    type Answer = Box<dyn FnMut(&Message) -> Vec<Vec<u8>> + Send>;

    /// A connected pair used through read(2)/write(2) only, which miri
    /// supports (unlike recv/send/shutdown on sockets).
    fn file_pair() -> (std::fs::File, std::fs::File) {
        let (a, b) = UnixStream::pair().unwrap();
        (std::os::fd::OwnedFd::from(a).into(), std::os::fd::OwnedFd::from(b).into())
    }

    /// A test transport whose shutdown asks the fake server to stop (a frame
    /// of type `XS_INVALID`, echoed back) and joins it, so no thread outlives a test.
    struct TestPipe {
        file: std::fs::File,
        server: Mutex<Option<JoinHandle<()>>>,
    }

    impl Transport for TestPipe {
        fn send(&self, frames: &[&[u8]]) -> std::io::Result<()> {
            frames.iter().try_for_each(|f| (&self.file).write_all(f))
        }

        fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
            (&self.file).read(buf)
        }

        fn shutdown(&self) -> bool {
            let close = Message { msg_type: MsgType::INVALID, req_id: 0, tx_id: 0, payload: vec![] };
            // Fails if the server already closed: then there is nothing to wake.
            let _ = (&self.file).write_all(&close.encode());
            if let Some(server) = self.server.lock().unwrap().take() {
                server.join().unwrap();
            }
            true
        }

        fn kind(&self) -> TransportKind {
            TransportKind::Socket
        }
    }

    fn pipe_client(file: std::fs::File, server: Option<JoinHandle<()>>, opts: Options) -> Client {
        Client::from_transport(Box::new(TestPipe { file, server: Mutex::new(server) }), opts).unwrap()
    }

    /// A fake xenstored thread: `answer` gives the bytes to send back for
    /// each request. Returns the client and the count of requests seen.
    fn fake(mut answer: Answer) -> (Client, Arc<AtomicUsize>) {
        let (a, mut b) = file_pair();
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        let server = std::thread::spawn(move || {
            let mut dec = Decoder::new();
            let mut buf = [0u8; 8192];
            let mut msgs = Vec::new();
            while let Ok(n @ 1..) = b.read(&mut buf) {
                dec.decode_all(&buf[..n], &mut msgs).unwrap();
                for m in msgs.drain(..) {
                    if m.msg_type == MsgType::INVALID {
                        // Echo it: wakes the reader (miri does not wake a
                        // blocked read when the peer closes), which then sees
                        // the connection closed and exits.
                        let _ = b.write_all(&m.encode());
                        return;
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    for out in answer(&m) {
                        if b.write_all(&out).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        (pipe_client(a, Some(server), Options::default()), seen)
    }

    fn reply(m: &Message, payload: &[u8]) -> Vec<u8> {
        Message { msg_type: m.msg_type, req_id: m.req_id, tx_id: m.tx_id, payload: payload.to_vec() }.encode()
    }

    fn error(m: &Message, e: XsErrno) -> Vec<u8> {
        Message::error_reply(m.req_id, m.tx_id, e).encode()
    }

    #[test]
    fn replies_out_of_order_reach_their_callers() {
        let mut held: Vec<Message> = Vec::new();
        let (c, _) = fake(Box::new(move |m| {
            held.push(m.clone());
            if held.len() < 2 {
                return vec![];
            }
            // Answer in reverse order, each with its own path as the value.
            held.drain(..).rev().map(|h| reply(&h, &h.payload[..h.payload.len() - 1])).collect()
        }));
        let reqs = [Request::read(TxId::NONE, "/a").unwrap(), Request::read(TxId::NONE, "/b").unwrap()];
        let got: Vec<Vec<u8>> = c.batch(&reqs).unwrap().into_iter().map(|r| r.unwrap().payload).collect();
        assert_eq!(got, vec![b"/a".to_vec(), b"/b".to_vec()]);
    }

    #[test]
    fn unanswered_type_times_out_naming_it_and_connection_survives() {
        let (c, _) = fake(Box::new(|m| if m.msg_type == MsgType::GET_QUOTA { vec![] } else { vec![reply(m, b"v")] }));
        c.set_timeout(Duration::from_millis(50));
        let err = c.submit(MsgType::GET_QUOTA, TxId::NONE, b"\0".to_vec()).unwrap().wait().unwrap_err();
        assert!(matches!(err, ClientError::Timeout { msg_type: MsgType::GET_QUOTA, .. }), "{err}");
        assert!(err.to_string().contains("XS_GET_QUOTA"));
        c.set_timeout(DEFAULT_TIMEOUT);
        assert_eq!(c.read(TxId::NONE, "/x").unwrap(), b"v");
    }

    #[test]
    fn oversized_frame_disconnects_waiters_and_later_calls_fail_fast() {
        let (c, seen) = fake(Box::new(|m| {
            let mut bad = reply(m, b"");
            bad[12..16].copy_from_slice(&100_000u32.to_le_bytes());
            vec![bad]
        }));
        let err = c.read(TxId::NONE, "/x").unwrap_err();
        assert!(matches!(err, ClientError::Disconnected { .. }), "{err}");
        assert!(c.is_dead());
        assert!(matches!(c.read(TxId::NONE, "/y").unwrap_err(), ClientError::Disconnected { .. }));
        assert_eq!(seen.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn garbage_after_close_gives_disconnected_not_panic() {
        let (c, _) = fake(Box::new(|_| vec![vec![0xff; 40]]));
        assert!(matches!(c.mkdir(TxId::NONE, "/x").unwrap_err(), ClientError::Disconnected { .. }));
    }

    #[test]
    fn abandoned_pending_requests_are_forgotten() {
        let (c, _) = fake(Box::new(|_| vec![]));
        for i in 0..100 {
            drop(c.submit(MsgType::READ, TxId::NONE, format!("/{i}\0").into_bytes()).unwrap());
        }
        assert!(c.shared().waiters().by_req.is_empty());
    }

    #[test]
    fn xs_error_reply_carries_errno() {
        let (c, _) = fake(Box::new(|m| vec![error(m, XsErrno::ENOENT)]));
        let err = c.read(TxId::NONE, "/missing").unwrap_err();
        assert_eq!(err.errno(), Some(XsErrno::ENOENT));
        assert!(matches!(err, ClientError::Xs { msg_type: MsgType::READ, .. }));
    }

    #[test]
    fn invalid_requests_are_refused_before_sending() {
        let (c, seen) = fake(Box::new(|m| vec![reply(m, b"OK\0")]));
        assert_eq!(c.write(TxId::NONE, "/a b", b"").unwrap_err().errno(), Some(XsErrno::EINVAL));
        let big = vec![0u8; crate::abi::XENSTORE_PAYLOAD_MAX];
        assert_eq!(c.write(TxId::NONE, "/a", &big).unwrap_err().errno(), Some(XsErrno::E2BIG));
        c.write(TxId::NONE, "/a", b"ok").unwrap();
        assert_eq!(seen.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn stray_reply_is_dropped_and_wrong_type_is_reported() {
        let (c, _) = fake(Box::new(|m| {
            let stray = Message { req_id: m.req_id.wrapping_add(1000), ..m.clone() }.encode();
            let wrong = Message { msg_type: MsgType::RM, req_id: m.req_id, tx_id: 0, payload: vec![] }.encode();
            vec![stray, wrong]
        }));
        let err = c.read(TxId::NONE, "/a").unwrap_err();
        assert!(matches!(err, ClientError::UnexpectedReply { expected: MsgType::READ, got: MsgType::RM }));
        assert!(!c.is_dead());
    }

    #[test]
    fn watch_events_queue_while_replies_keep_flowing() {
        let (c, _) = fake(Box::new(|m| {
            let ev = Message { msg_type: MsgType::WATCH_EVENT, req_id: 0, tx_id: 0, payload: b"/w\0tok\0".to_vec() };
            vec![ev.encode(), ev.encode(), reply(m, b"OK\0")]
        }));
        // Nobody reads events while the replies arrive.
        for _ in 0..10 {
            c.watch("/w", "tok").unwrap();
        }
        let events: Vec<WatchEvent> = c.events().try_iter().collect();
        assert_eq!(events.len(), 20);
        assert!(events.iter().all(|e| e.path == "/w" && e.token == "tok"));
        assert_eq!(c.dropped_events(), 0);
    }

    #[test]
    fn full_watch_queue_drops_and_marks_overflow() {
        let (a, mut b) = file_pair();
        // The reply comes after ten events: once it is in, all were queued.
        let server = std::thread::spawn(move || {
            let mut dec = Decoder::new();
            let mut buf = [0u8; 4096];
            let mut msgs = Vec::new();
            while let Ok(n @ 1..) = b.read(&mut buf) {
                dec.decode_all(&buf[..n], &mut msgs).unwrap();
                for m in msgs.drain(..) {
                    let mut out = Vec::new();
                    if m.msg_type == MsgType::READ {
                        for i in 0..10 {
                            let payload = format!("/w/{i}\0t\0").into_bytes();
                            Message { msg_type: MsgType::WATCH_EVENT, req_id: 0, tx_id: 0, payload }
                                .encode_into(&mut out);
                        }
                    }
                    out.extend_from_slice(&m.encode());
                    b.write_all(&out).unwrap();
                    if m.msg_type == MsgType::INVALID {
                        return;
                    }
                }
            }
        });
        let c = pipe_client(a, Some(server), Options { watch_queue: 3, ..Default::default() });
        c.read(TxId::NONE, "/x").unwrap();
        let rx = c.events();
        let first: Vec<String> = (0..4).map(|_| rx.recv().unwrap().path).collect();
        assert_eq!(first, vec!["/w/0", "/w/1", "/w/2", ""]);
        assert_eq!(c.dropped_events(), 7);
    }

    #[test]
    fn directory_falls_back_to_parts_and_restarts_on_generation_change() {
        let mut calls = 0;
        let (c, _) = fake(Box::new(move |m| {
            if m.msg_type == MsgType::DIRECTORY {
                return vec![error(m, XsErrno::E2BIG)];
            }
            calls += 1;
            let off = std::str::from_utf8(crate::codec::split_nul(&m.payload)[1]).unwrap().to_string();
            let payload: &[u8] = match (calls, off.as_str()) {
                (1, "0") => b"1\0a\0b\0",
                (2, "4") => b"2\0z\0\0", // generation changed: restart
                (3, "0") => b"3\0a\0b\0",
                (4, "4") => b"3\0c\0\0",
                other => panic!("unexpected {other:?}"),
            };
            vec![reply(m, payload)]
        }));
        assert_eq!(c.directory(TxId::NONE, "/big").unwrap(), vec!["a", "b", "c"]);
    }

    #[test]
    fn transaction_reruns_on_eagain_then_commits() {
        let mut ends = 0;
        let (c, _) = fake(Box::new(move |m| match m.msg_type {
            MsgType::TRANSACTION_START => vec![reply(m, b"9\0")],
            MsgType::TRANSACTION_END => {
                ends += 1;
                if ends < 3 {
                    vec![error(m, XsErrno::EAGAIN)]
                } else {
                    vec![reply(m, b"OK\0")]
                }
            }
            _ => vec![reply(m, b"OK\0")],
        }));
        let mut runs = 0;
        c.transaction(|tx| {
            runs += 1;
            assert_eq!(tx, TxId(9));
            c.write(tx, "/a", b"1")
        })
        .unwrap();
        assert_eq!(runs, 3);
    }

    #[test]
    fn transaction_gives_up_after_bounded_attempts() {
        let (c, _) = fake(Box::new(|m| match m.msg_type {
            MsgType::TRANSACTION_START => vec![reply(m, b"5\0")],
            MsgType::TRANSACTION_END => vec![error(m, XsErrno::EAGAIN)],
            _ => vec![reply(m, b"OK\0")],
        }));
        let err = c.transaction(|_| Ok(())).unwrap_err();
        assert!(matches!(err, ClientError::TooManyRetries { attempts: TRANSACTION_ATTEMPTS }));
    }

    #[test]
    #[cfg_attr(miri, ignore = "miri has no SOCK_SEQPACKET")]
    fn device_frames_over_4096_bytes_are_refused_before_sending() {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let (a, b) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap();
        let dev = transport::DeviceTransport::from_file(std::fs::File::from(a));
        let c = Client::from_transport(Box::new(dev), Options::default()).unwrap();
        assert_eq!(c.transport_kind(), TransportKind::Device);
        let value = vec![b'v'; crate::abi::XENSTORE_PAYLOAD_MAX - HEADER_LEN - 2];
        let err = c.write(TxId::NONE, "/a", &value).unwrap_err();
        assert_eq!(err.errno(), Some(XsErrno::E2BIG), "{err}");
        // The largest frame that fits goes out as one message.
        let fits = vec![b'v'; crate::abi::XENSTORE_PAYLOAD_MAX - HEADER_LEN - 3];
        let pending = c.submit(MsgType::WRITE, TxId::NONE, [b"/a\0".as_slice(), &fits].concat()).unwrap();
        let mut buf = vec![0u8; 8192];
        assert_eq!(UnixStream::from(b).read(&mut buf).unwrap(), crate::abi::XENSTORE_PAYLOAD_MAX);
        drop(pending);
        // Drop returns although the reader stays blocked on the "device".
        drop(c);
    }

    #[test]
    #[cfg_attr(miri, ignore = "miri has no recv/shutdown on sockets")]
    fn dropping_last_clone_closes_the_socket() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let c = Client::from_stream(a).unwrap();
        let c2 = c.clone();
        drop(c);
        drop(c2);
        assert_eq!(b.read(&mut [0u8; 4]).unwrap(), 0);
    }

    #[test]
    #[cfg_attr(miri, ignore = "miri has no recv/shutdown on sockets")]
    fn server_closing_fails_waiting_callers() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let c = Client::from_stream(a).unwrap();
        assert!(matches!(c.read(TxId::NONE, "/a").unwrap_err(), ClientError::Disconnected { .. }));
    }

    #[test]
    fn typed_replies_are_parsed() {
        let (c, _) = fake(Box::new(|m| {
            let p: &[u8] = match m.msg_type {
                MsgType::GET_DOMAIN_PATH => b"/local/domain/3\0",
                MsgType::IS_DOMAIN_INTRODUCED => b"T\0",
                MsgType::GET_PERMS => b"n0\0r3\0",
                MsgType::DIRECTORY => b"x\0y\0",
                _ => b"OK\0",
            };
            vec![reply(m, p)]
        }));
        assert_eq!(c.get_domain_path(3).unwrap(), "/local/domain/3");
        assert!(c.is_domain_introduced(3).unwrap());
        assert_eq!(c.get_perms(TxId::NONE, "/a").unwrap()[1], Perm::new(crate::perms::Access::Read, 3));
        assert_eq!(c.directory(TxId::NONE, "/a").unwrap(), vec!["x", "y"]);
        c.introduce(3, 0x10, 4).unwrap();
        c.release(3).unwrap();
        c.resume(3).unwrap();
        c.set_target(3, 4).unwrap();
        c.reset_watches().unwrap();
        c.unwatch("/a", "t").unwrap();
        assert_eq!(c.control(&[b"print", b"x"]).unwrap(), b"OK\0");
    }
}
