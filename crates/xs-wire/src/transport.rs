//! Byte transports to xenstored: its unix socket, or the `/dev/xen/xenbus`
//! device of the Linux xenbus driver, chosen as libxenstore's `xs_open()` does.
//!
//! The client writes whole frames from the calling thread (under its write
//! lock) and reads from one reader thread with blocking reads, because `poll`
//! on the xenbus device never reports `POLLOUT`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use crate::abi::HEADER_LEN;

/// `XENSTORED_PATH`: the socket or device to use, overriding everything else.
pub const ENV_PATH: &str = "XENSTORED_PATH";
/// `XENSTORED_RUNDIR`: the directory holding `socket` (libxenstore's `xs_daemon_rundir()`).
pub const ENV_RUNDIR: &str = "XENSTORED_RUNDIR";
/// The socket directories tried when `XENSTORED_RUNDIR` is unset, in order.
pub const DEFAULT_RUNDIRS: [&str; 2] = ["/run/xenstored", "/var/run/xenstored"];
/// The xenbus devices tried after the sockets (`xs_domain_dev()` on Linux).
pub const DEFAULT_DEVICES: [&str; 2] = ["/dev/xen/xenbus", "/proc/xen/xenbus"];

/// The largest frame (header and payload) the Linux xenbus device accepts in
/// one message: its buffer is `XENSTORE_PAYLOAD_MAX` bytes, header included
/// (`xenbus_file_write()` answers `E2BIG` beyond it).
pub const DEVICE_FRAME_MAX: usize = crate::abi::XENSTORE_PAYLOAD_MAX;

/// Why no transport could be opened.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Connecting to a unix socket failed.
    #[error("Cannot connect to xenstored socket {path}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// Opening the xenbus device failed.
    #[error("Cannot open xenbus device {path}")]
    Open {
        /// The device path.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// Neither a socket nor a device exists at any of the usual places.
    #[error("No xenstored socket or xenbus device found (tried {tried})")]
    NotFound {
        /// The paths tried, comma-separated.
        tried: String,
    },
}

/// Which kind of endpoint a transport talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    /// A xenstored unix socket: full duplex, shutdown wakes a blocked reader.
    Socket,
    /// The xenbus character device: one message per `write(2)`, and a blocked
    /// `read(2)` cannot be woken from another thread.
    Device,
}

/// A byte pipe to xenstored. `send` is called with the client's write lock
/// held; `recv` only from the client's reader thread.
pub trait Transport: Send + Sync + 'static {
    /// Writes each frame completely. Frames are whole messages (header and payload).
    fn send(&self, frames: &[&[u8]]) -> io::Result<()>;
    /// Blocks until some bytes arrive; `Ok(0)` means the peer closed.
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Stops the connection. Returns whether a reader blocked in `recv` is
    /// woken by it (true for sockets, false for the device).
    fn shutdown(&self) -> bool;
    /// The kind of endpoint.
    fn kind(&self) -> TransportKind;
    /// The largest frame `send` accepts.
    fn max_frame(&self) -> usize {
        HEADER_LEN + crate::abi::XENSTORE_PAYLOAD_MAX
    }
}

/// A xenstored unix socket.
#[derive(Debug)]
pub struct SocketTransport {
    stream: UnixStream,
}

impl SocketTransport {
    /// Wraps a connected stream.
    pub fn new(stream: UnixStream) -> Self {
        SocketTransport { stream }
    }

    /// Connects to the socket at `path`.
    pub fn connect(path: &Path) -> Result<Self, TransportError> {
        UnixStream::connect(path)
            .map(SocketTransport::new)
            .map_err(|source| TransportError::Connect { path: path.to_path_buf(), source })
    }
}

impl Transport for SocketTransport {
    fn send(&self, frames: &[&[u8]]) -> io::Result<()> {
        let mut w = &self.stream;
        if frames.len() == 1 {
            return w.write_all(frames[0]);
        }
        // One buffer, so that a pipelined batch costs one system call.
        let joined: Vec<u8> = frames.concat();
        w.write_all(&joined)
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match (&self.stream).read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    fn shutdown(&self) -> bool {
        // NotConnected when the peer is already gone: nothing left to wake.
        let _ = self.stream.shutdown(Shutdown::Both);
        true
    }

    fn kind(&self) -> TransportKind {
        TransportKind::Socket
    }
}

/// The xenbus device (`/dev/xen/xenbus`), through which the kernel relays
/// messages to xenstored (in dom0 or a stub domain).
#[derive(Debug)]
pub struct DeviceTransport {
    file: File,
}

impl DeviceTransport {
    /// Opens the device read-write.
    pub fn open(path: &Path) -> Result<Self, TransportError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map(DeviceTransport::from_file)
            .map_err(|source| TransportError::Open { path: path.to_path_buf(), source })
    }

    /// Wraps an open device (or, in tests, any file with message boundaries).
    pub fn from_file(file: File) -> Self {
        DeviceTransport { file }
    }
}

impl Transport for DeviceTransport {
    fn send(&self, frames: &[&[u8]]) -> io::Result<()> {
        // The kernel takes one message per write and drops bytes beyond it,
        // so every frame gets its own write(2).
        for frame in frames {
            (&self.file).write_all(frame)?;
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match (&self.file).read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }

    fn shutdown(&self) -> bool {
        // A read blocked on the device cannot be interrupted: the reader
        // thread exits when the next message arrives, or with the process.
        false
    }

    fn kind(&self) -> TransportKind {
        TransportKind::Device
    }

    fn max_frame(&self) -> usize {
        DEVICE_FRAME_MAX
    }
}

/// Where to connect, as decided by [`choose_endpoint`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket.
    Socket(PathBuf),
    /// A character device.
    Device(PathBuf),
}

/// What kind of file a path is, for [`choose_endpoint`]; `None` if it does not exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// A unix socket.
    Socket,
    /// Anything else (device, regular file).
    Other,
}

/// The kind of file at `path`, following symlinks.
pub fn file_kind(path: &Path) -> Option<FileKind> {
    let meta = std::fs::metadata(path).ok()?;
    Some(if meta.file_type().is_socket() { FileKind::Socket } else { FileKind::Other })
}

/// Picks the endpoint as libxenstore does: `XENSTORED_PATH` if set (a socket
/// or a device, by its file type); else `socket` in `XENSTORED_RUNDIR`, or in
/// `/run/xenstored` then `/var/run/xenstored`; else `/dev/xen/xenbus`, then
/// `/proc/xen/xenbus`. Pure: the environment and file system come in as
/// arguments, so the choice is testable.
pub fn choose_endpoint(
    env_path: Option<&str>,
    env_rundir: Option<&str>,
    kind_of: impl Fn(&Path) -> Option<FileKind>,
) -> Result<Endpoint, TransportError> {
    let endpoint_for = |p: PathBuf, kind| match kind {
        FileKind::Socket => Endpoint::Socket(p),
        FileKind::Other => Endpoint::Device(p),
    };
    if let Some(p) = env_path.filter(|p| !p.is_empty()) {
        let path = PathBuf::from(p);
        // Missing: report the connect error for the path the user asked for.
        let kind = kind_of(&path).unwrap_or(FileKind::Socket);
        return Ok(endpoint_for(path, kind));
    }
    let rundirs: Vec<&str> = match env_rundir.filter(|d| !d.is_empty()) {
        Some(d) => vec![d],
        None => DEFAULT_RUNDIRS.to_vec(),
    };
    let mut tried = Vec::new();
    for dir in rundirs {
        let path = Path::new(dir).join("socket");
        if kind_of(&path) == Some(FileKind::Socket) {
            return Ok(Endpoint::Socket(path));
        }
        tried.push(path.display().to_string());
    }
    for dev in DEFAULT_DEVICES {
        let path = PathBuf::from(dev);
        if kind_of(&path).is_some() {
            return Ok(endpoint_for(path, FileKind::Other));
        }
        tried.push(dev.to_string());
    }
    Err(TransportError::NotFound { tried: tried.join(", ") })
}

/// Opens the endpoint chosen from the process environment.
pub fn open_default() -> Result<Box<dyn Transport>, TransportError> {
    let path = std::env::var(ENV_PATH).ok();
    let rundir = std::env::var(ENV_RUNDIR).ok();
    open_endpoint(&choose_endpoint(path.as_deref(), rundir.as_deref(), file_kind)?)
}

/// Opens a chosen endpoint.
pub fn open_endpoint(endpoint: &Endpoint) -> Result<Box<dyn Transport>, TransportError> {
    Ok(match endpoint {
        Endpoint::Socket(p) => Box::new(SocketTransport::connect(p)?),
        Endpoint::Device(p) => Box::new(DeviceTransport::open(p)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fs(entries: &'static [(&'static str, FileKind)]) -> impl Fn(&Path) -> Option<FileKind> {
        move |p| entries.iter().find(|(q, _)| Path::new(q) == p).map(|(_, k)| *k)
    }

    #[test]
    fn env_path_wins_and_its_file_type_picks_socket_or_device() {
        let files = fs(&[("/tmp/s", FileKind::Socket), ("/tmp/d", FileKind::Other)]);
        assert_eq!(choose_endpoint(Some("/tmp/s"), None, &files).unwrap(), Endpoint::Socket("/tmp/s".into()));
        assert_eq!(choose_endpoint(Some("/tmp/d"), None, &files).unwrap(), Endpoint::Device("/tmp/d".into()));
        assert_eq!(choose_endpoint(Some("/nope"), None, &files).unwrap(), Endpoint::Socket("/nope".into()));
    }

    #[test]
    fn rundir_socket_comes_before_default_sockets_and_device() {
        let files = fs(&[
            ("/x/socket", FileKind::Socket),
            ("/run/xenstored/socket", FileKind::Socket),
            ("/dev/xen/xenbus", FileKind::Other),
        ]);
        assert_eq!(choose_endpoint(None, Some("/x"), &files).unwrap(), Endpoint::Socket("/x/socket".into()));
        assert_eq!(choose_endpoint(None, None, &files).unwrap(), Endpoint::Socket("/run/xenstored/socket".into()));
    }

    #[test]
    fn var_run_socket_then_device_are_fallbacks() {
        let var = fs(&[("/var/run/xenstored/socket", FileKind::Socket), ("/dev/xen/xenbus", FileKind::Other)]);
        assert_eq!(choose_endpoint(None, None, &var).unwrap(), Endpoint::Socket("/var/run/xenstored/socket".into()));
        let dev = fs(&[("/dev/xen/xenbus", FileKind::Other)]);
        assert_eq!(choose_endpoint(None, None, &dev).unwrap(), Endpoint::Device("/dev/xen/xenbus".into()));
    }

    #[test]
    fn nothing_found_names_every_path_tried() {
        let err = choose_endpoint(None, None, fs(&[])).unwrap_err().to_string();
        for p in ["/run/xenstored/socket", "/var/run/xenstored/socket", "/dev/xen/xenbus", "/proc/xen/xenbus"] {
            assert!(err.contains(p), "{err}");
        }
    }

    /// A SOCK_SEQPACKET pair keeps write boundaries, as the device's messages.
    fn seqpacket_pair() -> (File, UnixStream) {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let (a, b) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap();
        (File::from(a), UnixStream::from(b))
    }

    #[test]
    #[cfg_attr(miri, ignore = "miri has no SOCK_SEQPACKET")]
    fn device_transport_writes_each_frame_with_its_own_write() {
        let (dev, peer) = seqpacket_pair();
        let t = DeviceTransport::from_file(dev);
        t.send(&[b"first", b"second"]).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!((&peer).read(&mut buf).unwrap(), 5);
        assert_eq!((&peer).read(&mut buf).unwrap(), 6);
        assert_eq!(t.max_frame(), 4096);
        assert!(!t.shutdown());
    }

    #[test]
    #[cfg_attr(miri, ignore = "miri has no recv/shutdown on sockets")]
    fn socket_transport_sends_a_batch_and_shutdown_wakes_reader() {
        let (a, b) = UnixStream::pair().unwrap();
        let t = std::sync::Arc::new(SocketTransport::new(a));
        t.send(&[b"ab", b"cd"]).unwrap();
        let mut got = [0u8; 4];
        (&b).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"abcd");
        let reader = {
            let t = t.clone();
            std::thread::spawn(move || t.recv(&mut [0u8; 16]).unwrap())
        };
        assert!(t.shutdown());
        assert_eq!(reader.join().unwrap(), 0);
    }
}
