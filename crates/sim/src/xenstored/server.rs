//! The server handle: [`Xenstored`] owns the state; connections come from a
//! unix socket ([`Xenstored::serve_socket`], every connection privileged like
//! xenstored's socket) or a socketpair acting as a domain
//! ([`Xenstored::connect_as`], like that domain's ring).

use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use xs_wire::{Message, Perm, XsErrno};

use super::config::XenstoredConfig;
use super::conn::{self, OutQueue};
use super::ops::Op;
use super::state::{ConnId, ConnState, State};

/// Counters of what the server did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XenstoredStats {
    /// Connections opened (socket and domain).
    pub connections: u64,
    /// Connections open now.
    pub open_connections: u64,
    /// Requests processed.
    pub requests: u64,
    /// Connections closed because they sent an unreadable frame.
    pub bad_clients: u64,
    /// Watch events queued.
    pub events_sent: u64,
    /// Watch events dropped because the watcher's output queue was full.
    pub events_dropped: u64,
    /// Nodes in the tree, the special `@` nodes included.
    pub nodes: u64,
}

/// A simulated C xenstored (Xen 4.17 semantics), in process.
pub struct Xenstored {
    state: Mutex<State>,
    next_conn: AtomicU64,
    next_server: AtomicU64,
    connections: AtomicU64,
    requests: AtomicU64,
    bad_clients: AtomicU64,
}

impl Xenstored {
    /// A server with xenstored's default quotas.
    pub fn new() -> Arc<Self> {
        Self::with_config(XenstoredConfig::default())
    }

    /// A server with the given quotas and limits.
    pub fn with_config(config: XenstoredConfig) -> Arc<Self> {
        Arc::new(Xenstored {
            state: Mutex::new(State::new(config)),
            next_conn: AtomicU64::new(1),
            next_server: AtomicU64::new(1),
            connections: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            bad_clients: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while processing disconnects only that client; the state
        // is changed only by whole operations, so it is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Listens on a unix socket at `path`. Every connection is privileged,
    /// as on xenstored's socket. A socket file left by a dead server is
    /// replaced; one a live server answers on is refused (`AddrInUse`), so
    /// that its clients are not taken over.
    pub fn serve_socket(self: &Arc<Self>, path: &Path) -> io::Result<SocketServer> {
        if std::fs::symlink_metadata(path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }) {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("another server is listening on {}", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        let inode = std::fs::symlink_metadata(path).map(|m| (m.dev(), m.ino()))?;
        let tag = self.next_server.fetch_add(1, Ordering::Relaxed);
        let stop = Arc::new(AtomicBool::new(false));
        let me = self.clone();
        let st = stop.clone();
        let l = listener.try_clone()?;
        let acceptor =
            std::thread::Builder::new().name("xs-accept".into()).spawn(move || accept_loop(me, l, st, tag))?;
        log::info!("xenstored: listening on {}", path.display());
        Ok(SocketServer {
            path: path.to_path_buf(),
            inode,
            listener,
            stop,
            acceptor: Some(acceptor),
            server: self.clone(),
            tag,
        })
    }

    /// A connection acting as domain `domid` (unprivileged unless 0), as if
    /// over that domain's ring. The domain need not be introduced.
    pub fn connect_as(self: &Arc<Self>, domid: u32) -> io::Result<UnixStream> {
        let (ours, theirs) = UnixStream::pair()?;
        conn::spawn(self, ours, domid, None)?;
        Ok(theirs)
    }

    /// What `XS_INTRODUCE` does: marks the domain introduced and fires
    /// `@introduceDomain` (once).
    pub fn introduce_domain(&self, domid: u32) {
        let mut s = self.lock();
        let fires = s.introduce_domain(domid);
        s.fire(&fires);
    }

    /// What `XS_RELEASE` does: forgets the domain, closes the connections
    /// acting as it and fires `@releaseDomain`.
    pub fn release_domain(&self, domid: u32) {
        let mut s = self.lock();
        let fires = s.release(domid);
        s.fire(&fires);
    }

    /// The committed value at absolute `path`, bypassing permissions.
    pub fn read_node(&self, path: &str) -> Option<Vec<u8>> {
        self.lock().read_value(path)
    }

    /// The committed permissions at absolute `path`.
    pub fn node_perms(&self, path: &str) -> Option<Vec<Perm>> {
        self.lock().tree.get(path).map(|n| n.perms.clone())
    }

    /// The committed children at absolute `path`, in xenstored's order.
    pub fn node_children(&self, path: &str) -> Option<Vec<String>> {
        self.lock().tree.get(path).map(|n| n.children.clone())
    }

    /// Writes as dom0 would (creating parents, firing watches).
    pub fn write_node(&self, path: &str, value: &[u8]) -> Result<(), XsErrno> {
        let mut payload = path.as_bytes().to_vec();
        payload.push(0);
        payload.extend_from_slice(value);
        self.lock().dom0_op(|op: &mut Op| op.write(&payload)).map(|_| ())
    }

    /// Counters so far.
    pub fn stats(&self) -> XenstoredStats {
        let s = self.lock();
        XenstoredStats {
            connections: self.connections.load(Ordering::Relaxed),
            open_connections: s.conns.len() as u64,
            requests: self.requests.load(Ordering::Relaxed),
            bad_clients: self.bad_clients.load(Ordering::Relaxed),
            events_sent: s.events_sent,
            events_dropped: s.events_dropped,
            nodes: s.tree.len() as u64,
        }
    }

    pub(crate) fn next_conn_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn out_queue_bytes(&self) -> usize {
        self.lock().config.out_queue_bytes
    }

    pub(crate) fn register(
        &self,
        id: ConnId,
        domid: u32,
        privileged: bool,
        out: Arc<OutQueue>,
        stream: UnixStream,
        server: Option<u64>,
    ) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.lock().conns.insert(id, ConnState::new(domid, privileged, out, stream, server));
    }

    pub(crate) fn unregister(&self, id: ConnId) {
        self.lock().remove_conn(id);
    }

    pub(crate) fn count_bad_client(&self) {
        self.bad_clients.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn process(&self, id: ConnId, msg: &Message) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.lock().process(id, msg);
    }

    fn close_server_conns(&self, tag: u64) {
        let mut s = self.lock();
        let ids: Vec<ConnId> = s.conns.iter().filter(|(_, c)| c.server == Some(tag)).map(|(&i, _)| i).collect();
        for id in ids {
            if let Some(c) = s.remove_conn(id) {
                c.out.close();
                let _ = c.stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

fn accept_loop(server: Arc<Xenstored>, listener: UnixListener, stop: Arc<AtomicBool>, tag: u64) {
    for stream in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            break;
        }
        match stream {
            Ok(s) => {
                if let Err(e) = conn::spawn(&server, s, 0, Some(tag)) {
                    log::warn!("xenstored: cannot start connection: {e}");
                }
            }
            Err(e) => {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                log::warn!("xenstored: accept: {e}");
            }
        }
    }
}

/// A listening socket. Dropping it stops accepting, closes the connections
/// it accepted and removes the socket file.
pub struct SocketServer {
    path: PathBuf,
    /// The socket file's (device, inode): removed at the end only if the
    /// path still names it.
    inode: (u64, u64),
    listener: UnixListener,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    server: Arc<Xenstored>,
    tag: u64,
}

impl SocketServer {
    /// The socket's path (for `XENSTORED_PATH`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The server behind the socket.
    pub fn xenstored(&self) -> &Arc<Xenstored> {
        &self.server
    }
}

impl Drop for SocketServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the acceptor: a connection of our own, and a shutdown of the
        // listening socket in case the file is already gone.
        let _ = UnixStream::connect(&self.path);
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&self.listener),
            nix::sys::socket::Shutdown::Both,
        );
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        self.server.close_server_conns(self.tag);
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
