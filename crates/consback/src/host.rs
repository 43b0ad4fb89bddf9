//! The host side of a console: a pseudo-terminal or a unix socket server,
//! non-blocking, with its own epoll set whose fd the worker polls as the
//! ring's completion fd (so a console's host I/O wakes its worker like a
//! block engine's completions do), and the guest output not yet written to
//! it. It outlives a guest's connection: a frontend that reconnects finds
//! the same pty name or socket and the bytes still pending.
//!
//! Interest is set per pass from what the ring can take: no `EPOLLIN` while
//! the guest's `in` ring is full, `EPOLLOUT` only while output is pending,
//! the listener only while no client is connected. Level-triggered, so an
//! fd that stays ready keeps the console's pass coming, and one we do not
//! want now costs nothing.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::pty::PtyMaster;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::termios::{self, SetArg};

use crate::config::Connection;

/// Why a host side cannot be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Creating the pty failed.
    #[error("Cannot create a pty ({step})")]
    Pty {
        /// Which call.
        step: &'static str,
        /// The error.
        #[source]
        source: Errno,
    },
    /// Binding or listening on the socket failed.
    #[error("Cannot listen on {}", path.display())]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// An epoll call failed.
    #[error("epoll failed")]
    Epoll(#[source] Errno),
    /// Reading or writing the host side failed.
    #[error("Host side I/O failed")]
    Io(#[source] std::io::Error),
}

/// What an epoll event of the host set stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    /// The pty's master.
    Master,
    /// The socket we listen on.
    Listener,
    /// The connected client.
    Client,
}

impl Token {
    fn to_u64(self) -> u64 {
        match self {
            Token::Master => 1,
            Token::Listener => 2,
            Token::Client => 3,
        }
    }

    fn from_u64(v: u64) -> Option<Self> {
        match v {
            1 => Some(Token::Master),
            2 => Some(Token::Listener),
            3 => Some(Token::Client),
            _ => None,
        }
    }
}

/// A pty as xenconsoled makes one: the master non-blocking, the slave
/// raw (`cfmakeraw`) and held open by us, so that a terminal program
/// closing it (`xl console` leaving) neither makes the master hang up nor
/// loses what the guest writes next.
struct Pty {
    master: PtyMaster,
    _slave: OwnedFd,
    name: String,
}

impl Pty {
    fn open() -> Result<Self, HostError> {
        let err = |step| move |source| HostError::Pty { step, source };
        let flags = OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        let master = nix::pty::posix_openpt(flags).map_err(err("posix_openpt /dev/ptmx"))?;
        nix::pty::grantpt(&master).map_err(err("grantpt"))?;
        nix::pty::unlockpt(&master).map_err(err("unlockpt"))?;
        let name = nix::pty::ptsname_r(&master).map_err(err("ptsname"))?;
        let slave = nix::fcntl::open(
            Path::new(&name),
            OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(err("open slave"))?;
        // SAFETY: `open` just returned this fd; nothing else owns it.
        let slave = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(slave) };
        let mut t = termios::tcgetattr(&slave).map_err(err("tcgetattr"))?;
        termios::cfmakeraw(&mut t);
        termios::tcsetattr(&slave, SetArg::TCSANOW, &t).map_err(err("tcsetattr"))?;
        Ok(Pty { master, _slave: slave, name })
    }
}

/// A unix socket server: one client at a time; the next waits in the
/// listen backlog until the current one leaves (as a QEMU socket chardev).
struct Server {
    listener: UnixListener,
    path: PathBuf,
    client: Option<UnixStream>,
    /// The client hung up with input left that the guest's ring had no
    /// room for: it is read to its end, then dropped.
    hung_up: bool,
}

impl Server {
    fn bind(path: &Path) -> Result<Self, HostError> {
        let err = |source| HostError::Listen { path: path.to_path_buf(), source };
        // A stale socket file is replaced, as QEMU's unix_listen_saddr does.
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        Ok(Server { listener, path: path.to_path_buf(), client: None, hung_up: false })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

enum Side {
    Pty(Pty),
    Socket(Server),
}

/// What a read of the host side gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostRead {
    /// This many bytes.
    Data(usize),
    /// Nothing now (or no client).
    Empty,
}

/// A console's host side and the guest output it has not taken yet.
pub struct Host {
    epoll: Epoll,
    side: Side,
    /// Guest output not yet written to the host side.
    pub(crate) pending: VecDeque<u8>,
    /// Registered interest per fd, to change it only when it changes.
    interest: [Option<EpollFlags>; 3],
    /// The last pass wanted input (the guest's ring had room).
    want_in: bool,
    clients: u64,
}

impl Host {
    /// Creates the host side of `connection`.
    pub fn open(connection: &Connection) -> Result<Self, HostError> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(HostError::Epoll)?;
        let side = match connection {
            Connection::Pty => Side::Pty(Pty::open()?),
            Connection::Socket(path) => Side::Socket(Server::bind(path)?),
        };
        let mut host = Host { epoll, side, pending: VecDeque::new(), interest: [None; 3], want_in: true, clients: 0 };
        host.set_interest(true, false)?;
        Ok(host)
    }

    /// The pty's slave name (`/dev/pts/N`), for the `tty` node.
    pub fn tty(&self) -> Option<&str> {
        match &self.side {
            Side::Pty(p) => Some(&p.name),
            Side::Socket(_) => None,
        }
    }

    /// Whether a client is connected (a pty always counts as one: its
    /// buffer takes output whoever has it open; a client that hung up
    /// does not).
    pub fn connected(&self) -> bool {
        match &self.side {
            Side::Pty(_) => true,
            Side::Socket(s) => s.client.is_some() && !s.hung_up,
        }
    }

    /// Socket clients accepted so far.
    pub fn clients(&self) -> u64 {
        self.clients
    }

    /// The fd that is readable when the host side wants a pass.
    pub fn poll_fd(&self) -> BorrowedFd<'_> {
        self.epoll.0.as_fd()
    }

    /// Handles what the host set reports without waiting: accepts a client,
    /// drops one that hung up.
    pub fn events(&mut self) -> Result<(), HostError> {
        let mut events = [EpollEvent::empty(); 4];
        let n = match self.epoll.wait(&mut events, EpollTimeout::ZERO) {
            Ok(n) => n,
            Err(Errno::EINTR) => 0,
            Err(e) => return Err(HostError::Epoll(e)),
        };
        for ev in &events[..n] {
            match Token::from_u64(ev.data()) {
                Some(Token::Listener) => self.accept()?,
                Some(Token::Client) if ev.events().intersects(EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR) => {
                    self.client_hung_up(ev.events())
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn accept(&mut self) -> Result<(), HostError> {
        let Side::Socket(s) = &mut self.side else { return Ok(()) };
        if s.client.is_some() {
            return Ok(());
        }
        match s.listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(true).map_err(HostError::Io)?;
                log::info!("{}: client connected", s.path.display());
                s.client = Some(stream);
                self.clients += 1;
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            // ECONNABORTED and the like: the next one may do.
            Err(e) => {
                log::warn!("{}: accept: {e}", s.path.display());
                Ok(())
            }
        }
    }

    /// A client that hung up is dropped once nothing it sent is left
    /// unread: the guest gets every byte sent before the hangup (as QEMU's
    /// socket chardev reads to EOF), however long its ring stays full.
    /// Until then the client leaves the host set, whose hangup would
    /// otherwise be reported on every wait, and takes no output.
    fn client_hung_up(&mut self, events: EpollFlags) {
        let Side::Socket(s) = &mut self.side else { return };
        let Some(c) = &s.client else { return };
        let unread = if self.want_in {
            events.contains(EpollFlags::EPOLLIN)
        } else {
            let flags = nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
            matches!(nix::sys::socket::recv(c.as_raw_fd(), &mut [0u8; 1], flags), Ok(n) if n > 0)
        };
        if !unread {
            self.drop_client("hung up");
        } else if !s.hung_up {
            s.hung_up = true;
            log::info!("{}: client hung up; its input is read before it goes", s.path.display());
        }
    }

    fn drop_client(&mut self, why: &str) {
        let Side::Socket(s) = &mut self.side else { return };
        s.hung_up = false;
        if let Some(c) = s.client.take() {
            let _ = self.epoll.delete(&c);
            self.interest[2] = None;
            log::info!("{}: client {why}; {} bytes wait for the next one", s.path.display(), self.pending.len());
        }
    }

    /// Reads what the host sent, at most `buf.len()` bytes.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<HostRead, HostError> {
        if buf.is_empty() {
            return Ok(HostRead::Empty);
        }
        let got = match &mut self.side {
            Side::Pty(p) => match nix::unistd::read(p.master.as_raw_fd(), buf) {
                Ok(n) => Ok(n),
                Err(e) => Err(std::io::Error::from(e)),
            },
            Side::Socket(s) => match &mut s.client {
                None => return Ok(HostRead::Empty),
                Some(c) => c.read(buf),
            },
        };
        match got {
            Ok(0) => {
                self.drop_client("closed the connection");
                Ok(HostRead::Empty)
            }
            Ok(n) => Ok(HostRead::Data(n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::Interrupted => {
                Ok(HostRead::Empty)
            }
            Err(e) if matches!(self.side, Side::Socket(_)) => {
                self.drop_client(&format!("failed ({e})"));
                Ok(HostRead::Empty)
            }
            Err(e) => Err(HostError::Io(e)),
        }
    }

    /// Writes pending output to the host side until it would block.
    /// Returns the bytes written.
    pub fn flush(&mut self) -> Result<usize, HostError> {
        let mut total = 0;
        while !self.pending.is_empty() {
            let (chunk, _) = self.pending.as_slices();
            let wrote = match &mut self.side {
                Side::Pty(p) => p.master.write(chunk),
                Side::Socket(s) => match &mut s.client {
                    Some(c) if !s.hung_up => c.write(chunk),
                    _ => return Ok(total),
                },
            };
            match wrote {
                Ok(0) => break,
                Ok(n) => {
                    self.pending.drain(..n);
                    total += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if matches!(self.side, Side::Socket(_)) => {
                    self.drop_client(&format!("failed ({e})"));
                    break;
                }
                Err(e) => return Err(HostError::Io(e)),
            }
        }
        Ok(total)
    }

    /// Sets what wakes the console: input while the guest can take it
    /// (`want_in`), writability while output is pending, a new client
    /// while none is connected.
    pub fn set_interest(&mut self, want_in: bool, want_out: bool) -> Result<(), HostError> {
        let mut flags = EpollFlags::empty();
        if want_in {
            flags |= EpollFlags::EPOLLIN;
        }
        if want_out {
            flags |= EpollFlags::EPOLLOUT;
        }
        self.want_in = want_in;
        let Host { epoll, side, interest, .. } = self;
        match side {
            Side::Pty(p) => register(epoll, &mut interest[0], p.master.as_fd(), Token::Master, Some(flags)),
            Side::Socket(s) => {
                let listen = s.client.is_none().then_some(EpollFlags::EPOLLIN);
                register(epoll, &mut interest[1], s.listener.as_fd(), Token::Listener, listen)?;
                match &s.client {
                    Some(c) if s.hung_up => {
                        let want = want_in.then_some(EpollFlags::EPOLLIN);
                        register(epoll, &mut interest[2], c.as_fd(), Token::Client, want)
                    }
                    Some(c) => register(epoll, &mut interest[2], c.as_fd(), Token::Client, Some(flags)),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Adds, changes or removes `fd`'s registration to `want` (`None`: not
/// registered), remembering it in `current`.
fn register(
    epoll: &Epoll,
    current: &mut Option<EpollFlags>,
    fd: BorrowedFd<'_>,
    token: Token,
    want: Option<EpollFlags>,
) -> Result<(), HostError> {
    if *current == want {
        return Ok(());
    }
    let res = match (*current, want) {
        (None, Some(f)) => epoll.add(fd, EpollEvent::new(f, token.to_u64())),
        (Some(_), Some(f)) => epoll.modify(fd, &mut EpollEvent::new(f, token.to_u64())),
        (Some(_), None) => epoll.delete(fd),
        (None, None) => Ok(()),
    };
    res.map_err(HostError::Epoll)?;
    *current = want;
    Ok(())
}

impl core::fmt::Debug for Host {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let side = match &self.side {
            Side::Pty(p) => format!("pty {}", p.name),
            Side::Socket(s) => format!("socket {}", s.path.display()),
        };
        f.debug_struct("Host").field("side", &side).field("pending", &self.pending.len()).finish_non_exhaustive()
    }
}
