//! The control socket of a running daemon (`serve --control-socket`,
//! default [`CONTROL_SOCKET`]): a unix stream socket, mode 0600 in a
//! directory of mode 0700, so root's alone. One request line per
//! connection, one answer, then the server closes:
//!
//! | request | answer |
//! |---|---|
//! | `status` | [`Status`] as one JSON object |
//! | `metrics` | Prometheus text format ([`crate::status::render_metrics`]) |
//! | anything else | `error: ...` and a newline |
//!
//! The server is one thread answering one connection at a time; a client
//! that sends no line within [`IO_TIMEOUT`] is dropped. The device list is
//! asked of the xenbus thread with [`DEVICES_TIMEOUT`]: a busy thread makes
//! the answer say so, it never holds the thread.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use xen_backend::Monitor;

use crate::status::{render_metrics, Status};

/// Where `serve` listens by default.
pub const CONTROL_SOCKET: &str = "/run/xenbackd/control.sock";

/// Longest wait for a client's request line or for it to take the answer.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest wait for the xenbus thread's device list.
pub const DEVICES_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest request line.
const MAX_LINE: u64 = 256;

/// A request on the control socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Every device and counter, as JSON.
    Status,
    /// The counters in Prometheus text format.
    Metrics,
}

impl Request {
    /// Parses a request line (surrounding whitespace ignored).
    pub fn parse(line: &str) -> Result<Request, String> {
        match line.trim() {
            "status" => Ok(Request::Status),
            "metrics" => Ok(Request::Metrics),
            "" => Err("empty request (status or metrics)".into()),
            other => Err(format!("unknown request {:?} (status or metrics)", truncate(other))),
        }
    }

    /// The line a client sends.
    pub fn line(self) -> &'static str {
        match self {
            Request::Status => "status\n",
            Request::Metrics => "metrics\n",
        }
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(32).collect()
}

/// The answer to `request` from what `monitor` shows now.
pub fn answer(request: Request, monitor: &Monitor) -> String {
    let status = Status::gather(monitor, DEVICES_TIMEOUT);
    match request {
        Request::Status => {
            // `to_vec`, as QMP's answers: one serialiser in the binary.
            let mut json = serde_json::to_vec(&status.to_json()).expect("a Value always serialises");
            json.push(b'\n');
            String::from_utf8(json).expect("serde_json writes UTF-8")
        }
        Request::Metrics => render_metrics(&status),
    }
}

/// The server. Dropping it stops it and removes the socket file (if the
/// path still names the socket it made).
pub struct ControlServer {
    path: PathBuf,
    /// The socket file's (device, inode).
    inode: (u64, u64),
    listener: UnixListener,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Option<()>>>,
}

impl ControlServer {
    /// [`ControlServer::bind`], then [`ControlServer::serve`].
    pub fn start(path: &Path, monitor: Monitor) -> io::Result<ControlServer> {
        let mut server = ControlServer::bind(path)?;
        server.serve(monitor)?;
        Ok(server)
    }

    /// Listens on `path`; connections wait until [`ControlServer::serve`].
    /// The parent directory is made with mode 0700 if absent; the socket
    /// gets mode 0600. A socket file a live server answers on is refused
    /// (`AddrInUse`: another daemon runs, so binding first keeps a second
    /// one from touching any device); one left by a dead process is
    /// replaced.
    pub fn bind(path: &Path) -> io::Result<ControlServer> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        }
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("another xenbackd answers on {}", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        let meta = std::fs::symlink_metadata(path)?;
        let server = ControlServer {
            path: path.to_path_buf(),
            inode: (meta.dev(), meta.ino()),
            listener,
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
        };
        // The directory's mode keeps others out meanwhile (umask aside).
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(server)
    }

    /// Answers from `monitor`, on a thread of its own.
    pub fn serve(&mut self, monitor: Monitor) -> io::Result<()> {
        if self.thread.is_some() {
            return Ok(());
        }
        let listener = self.listener.try_clone()?;
        let stop = self.stop.clone();
        let thread = xen_backend::spawn_named(
            "xenbackd-control",
            |msg| log::error!("Control socket thread died: {msg}; status is unavailable"),
            move || serve(listener, monitor, stop),
        )
        .map_err(io::Error::other)?;
        self.thread = Some(thread);
        log::info!("control socket: {}", self.path.display());
        Ok(())
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept: a connection of our own, and a shutdown of the
        // listening socket in case the file is gone (accept then fails).
        let _ = UnixStream::connect(&self.path);
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&self.listener),
            nix::sys::socket::Shutdown::Both,
        );
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn serve(listener: UnixListener, monitor: Monitor, stop: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::Acquire) {
            return;
        }
        match conn {
            Ok(conn) => {
                if let Err(e) = handle(conn, &monitor) {
                    log::debug!("control socket: {e}");
                }
            }
            Err(e) => {
                log::warn!("control socket: accept: {e}");
                // Not a busy loop on a persistent error (EMFILE).
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn handle(conn: UnixStream, monitor: &Monitor) -> io::Result<()> {
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&conn).take(MAX_LINE)).read_line(&mut line)?;
    let reply = match Request::parse(&line) {
        Ok(r) => answer(r, monitor),
        Err(e) => format!("error: {e}\n"),
    };
    (&conn).write_all(reply.as_bytes())
}

/// Errors of a client of the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens there.
    #[error("No xenbackd answers on {path} (is `xenbackd serve` running? --control-socket names another socket)")]
    NotRunning {
        /// The socket.
        path: PathBuf,
        /// Why the connection failed.
        #[source]
        source: io::Error,
    },
    /// The exchange failed midway.
    #[error("Talking to {path}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// The server refused the request.
    #[error("The daemon answered: {0}")]
    Refused(String),
}

/// Sends `request` to the server on `path` and returns its answer.
pub fn request(path: &Path, request: Request, timeout: Duration) -> Result<String, ClientError> {
    let mut conn =
        UnixStream::connect(path).map_err(|source| ClientError::NotRunning { path: path.to_path_buf(), source })?;
    let io = |source| ClientError::Io { path: path.to_path_buf(), source };
    conn.set_read_timeout(Some(timeout)).map_err(io)?;
    conn.set_write_timeout(Some(timeout)).map_err(io)?;
    conn.write_all(request.line().as_bytes()).map_err(io)?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply).map_err(io)?;
    if let Some(e) = reply.strip_prefix("error: ") {
        return Err(ClientError::Refused(e.trim_end().to_string()));
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_word_lines() {
        assert_eq!(Request::parse("status\n"), Ok(Request::Status));
        assert_eq!(Request::parse("  metrics \r\n"), Ok(Request::Metrics));
        for r in [Request::Status, Request::Metrics] {
            assert_eq!(Request::parse(r.line()), Ok(r));
        }
    }

    #[test]
    fn unknown_requests_are_named_and_cut() {
        let err = Request::parse("reboot now").unwrap_err();
        assert!(err.contains("\"reboot now\"") && err.contains("status or metrics"), "{err}");
        let long = "x".repeat(1000);
        assert!(Request::parse(&long).unwrap_err().len() < 100);
        assert!(Request::parse("\n").unwrap_err().contains("empty"));
    }

    #[test]
    fn client_of_no_server_says_so() {
        let path = std::env::temp_dir().join(format!("xenbackd-no-control-{}.sock", std::process::id()));
        let err = request(&path, Request::Status, IO_TIMEOUT).unwrap_err();
        assert!(matches!(err, ClientError::NotRunning { .. }), "{err}");
        assert!(err.to_string().contains("xenbackd serve"), "{err}");
    }
}
