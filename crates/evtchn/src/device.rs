//! [`XenEvtchn`]: one open of Linux's `/dev/xen/evtchn`
//! (`drivers/xen/evtchn.c`), every ioctl as a safe method.
//!
//! The device's rules, which this type passes through unchanged:
//! - a port that fires is queued once for reading and masked until it is
//!   written back ([`EventChannel::unmask`]); unmasking a port not bound on
//!   this handle is silently ignored;
//! - `read` returns whole `evtchn_port_t`s (native-endian `u32`) and fails
//!   with `EAGAIN` when none is pending (the fd is non-blocking), and with
//!   `EFBIG` after the kernel's queue overflowed, until [`XenEvtchn::reset`];
//! - `unbind`/`notify` of a port not bound here fail with `ENOTCONN`;
//! - after `IOCTL_EVTCHN_BIND_INTERDOMAIN` Xen marks the new local port
//!   pending, so it is read once without any notify;
//! - closing the handle unbinds every port bound through it.
//!
//! The only `unsafe` of this crate is the one `ioctl` call in [`ioctl`].

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use zerocopy::{FromBytes, IntoBytes};

use crate::abi::{self, *};
use crate::channel::{DomId, Error, EventChannel, Port, Result};

/// Where Linux puts the event-channel device.
pub const EVTCHN_PATH: &str = "/dev/xen/evtchn";

/// Ports taken per `read` (the kernel caps one read at a page).
const READ_BATCH: usize = 128;

/// One open of `/dev/xen/evtchn`: an event-channel handle. Ports bound
/// through it deliver their events to it only, and are unbound when it is
/// dropped.
#[derive(Debug)]
pub struct XenEvtchn {
    file: File,
}

/// Issues `request`, whose argument is `arg`, on `fd`, returning the ioctl's
/// non-negative result.
fn ioctl<T: IntoBytes + FromBytes>(fd: BorrowedFd<'_>, request: u32, arg: &mut T) -> nix::Result<i32> {
    assert_eq!(abi::ioc_size(request), std::mem::size_of::<T>(), "ioctl {request:#x} takes another argument size");
    // SAFETY: the kernel reads and writes at most `_IOC_SIZE(request)` bytes at
    // the pointer (every ioctl of drivers/xen/evtchn.c copies exactly its
    // struct), which equals `size_of::<T>()` (asserted above); `arg` is an
    // exclusive borrow valid for that long, and any bytes written back form
    // a valid `T` since `T: FromBytes`.
    let rc = unsafe { nix::libc::ioctl(fd.as_raw_fd(), request as _, std::ptr::from_mut(arg)) };
    Errno::result(rc)
}

fn op(op: &'static str) -> impl FnOnce(Errno) -> Error {
    move |e| Error::Op { op, source: e.into() }
}

fn port_from(rc: i32) -> Port {
    // `Errno::result` let only non-negative values through.
    Port(rc as u32)
}

impl XenEvtchn {
    /// Opens [`EVTCHN_PATH`].
    pub fn open() -> Result<Self> {
        Self::open_path(EVTCHN_PATH)
    }

    /// Opens the event-channel device at `path` (read-write, non-blocking,
    /// close-on-exec).
    pub fn open_path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| Error::Open { path: path.display().to_string(), source })?;
        log::debug!("Opened {}", path.display());
        Ok(XenEvtchn { file })
    }

    /// `IOCTL_EVTCHN_BIND_VIRQ`: a port for virtual interrupt `virq` of this
    /// domain (`VIRQ_*` of Xen's `public/xen.h`).
    pub fn bind_virq(&self, virq: u32) -> Result<Port> {
        let mut arg = IoctlEvtchnBindVirq { virq };
        ioctl(self.file.as_fd(), IOCTL_EVTCHN_BIND_VIRQ, &mut arg).map(port_from).map_err(op("IOCTL_EVTCHN_BIND_VIRQ"))
    }

    /// `IOCTL_EVTCHN_RESET`: empties the queue of fired ports and clears its
    /// overflow condition (after a read failed with `EFBIG`).
    pub fn reset(&self) -> Result<()> {
        // The ioctl takes no argument: a zero-sized one keeps `ioctl`'s size check.
        ioctl(self.file.as_fd(), IOCTL_EVTCHN_RESET, &mut ()).map(drop).map_err(op("IOCTL_EVTCHN_RESET"))
    }

    /// `IOCTL_EVTCHN_RESTRICT_DOMID`: from now on this handle may only bind
    /// interdomain ports to `domid` (a deprivileged backend). It cannot be undone.
    pub fn restrict_domid(&self, domid: DomId) -> Result<()> {
        let mut arg = IoctlEvtchnRestrictDomid { domid };
        ioctl(self.file.as_fd(), IOCTL_EVTCHN_RESTRICT_DOMID, &mut arg)
            .map(drop)
            .map_err(op("IOCTL_EVTCHN_RESTRICT_DOMID"))
    }

    /// `IOCTL_EVTCHN_BIND_STATIC`: takes delivery of `port`, a static event
    /// channel set up by Xen at boot; unlike other ports it stays open when
    /// the handle is closed. Kernels up to 6.1 refuse it as an unknown ioctl.
    pub fn bind_static(&self, port: Port) -> Result<()> {
        let mut arg = IoctlEvtchnBind { port: port.0 };
        ioctl(self.file.as_fd(), IOCTL_EVTCHN_BIND_STATIC, &mut arg).map(drop).map_err(op("IOCTL_EVTCHN_BIND_STATIC"))
    }

    /// Unmasks several ports with one `write`.
    pub fn unmask_all(&self, ports: &[Port]) -> Result<()> {
        let bytes: Vec<u8> = ports.iter().flat_map(|p| p.0.to_ne_bytes()).collect();
        for chunk in bytes.chunks(READ_BATCH * PORT_SIZE) {
            write_all(&self.file, chunk).map_err(|source| Error::Op { op: "unmask", source })?;
        }
        Ok(())
    }

    /// Waits until a port is pending or `timeout` passes (`None`: forever);
    /// returns whether one is pending. Interrupted waits return `false`.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<bool> {
        let timeout = match timeout {
            None => PollTimeout::NONE,
            // Longer than poll can wait (about 24 days): the caller loops.
            Some(t) => PollTimeout::try_from(t).unwrap_or(PollTimeout::MAX),
        };
        let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, timeout) {
            Ok(n) => Ok(n > 0),
            Err(Errno::EINTR) => Ok(false),
            Err(e) => Err(op("poll")(e)),
        }
    }
}

/// Writes all of `bytes` (whole ports) to the device.
fn write_all(mut file: &File, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    file.write_all(bytes)
}

/// Decodes whole ports out of a read, appending them to `out`; returns the
/// count of trailing bytes that did not form a port (0 from a conforming kernel).
fn decode_ports(bytes: &[u8], out: &mut Vec<Port>) -> usize {
    let mut chunks = bytes.chunks_exact(PORT_SIZE);
    out.extend(chunks.by_ref().map(|c| Port(u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))));
    chunks.remainder().len()
}

impl EventChannel for XenEvtchn {
    fn bind_interdomain(&self, remote_domid: DomId, remote_port: Port) -> Result<Port> {
        let mut arg = IoctlEvtchnBindInterdomain { remote_domain: remote_domid.into(), remote_port: remote_port.0 };
        ioctl(self.file.as_fd(), IOCTL_EVTCHN_BIND_INTERDOMAIN, &mut arg)
            .map(port_from)
            .map_err(op("IOCTL_EVTCHN_BIND_INTERDOMAIN"))
    }

    fn bind_unbound_port(&self, remote_domid: DomId) -> Result<Port> {
        let mut arg = IoctlEvtchnBindUnboundPort { remote_domain: remote_domid.into() };
        ioctl(self.file.as_fd(), IOCTL_EVTCHN_BIND_UNBOUND_PORT, &mut arg)
            .map(port_from)
            .map_err(op("IOCTL_EVTCHN_BIND_UNBOUND_PORT"))
    }

    fn unbind(&self, port: Port) -> Result<()> {
        let mut arg = IoctlEvtchnUnbind { port: port.0 };
        ioctl(self.file.as_fd(), IOCTL_EVTCHN_UNBIND, &mut arg).map(drop).map_err(op("IOCTL_EVTCHN_UNBIND"))
    }

    fn notify(&self, port: Port) -> Result<()> {
        let mut arg = IoctlEvtchnNotify { port: port.0 };
        ioctl(self.file.as_fd(), IOCTL_EVTCHN_NOTIFY, &mut arg).map(drop).map_err(op("IOCTL_EVTCHN_NOTIFY"))
    }

    fn take_pending(&self, out: &mut Vec<Port>) -> Result<()> {
        let mut buf = [0u8; READ_BATCH * PORT_SIZE];
        loop {
            let n = match (&self.file).read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(source) => return Err(Error::Op { op: "read", source }),
            };
            let stray = decode_ports(&buf[..n], out);
            if stray != 0 {
                log::warn!("{EVTCHN_PATH}: read of {n} bytes is not whole ports; {stray} bytes dropped");
            }
            // A short read emptied the kernel's queue (it returns both halves
            // of a wrapped queue in one read).
            if n < buf.len() {
                return Ok(());
            }
        }
    }

    fn unmask(&self, port: Port) -> Result<()> {
        write_all(&self.file, &port.0.to_ne_bytes()).map_err(|source| Error::Op { op: "unmask", source })
    }
}

impl AsFd for XenEvtchn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for XenEvtchn {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_of_a_missing_device_names_the_path() {
        let err = XenEvtchn::open_path("/nonexistent/xen/evtchn").unwrap_err();
        assert!(matches!(&err, Error::Open { path, .. } if path == "/nonexistent/xen/evtchn"), "{err:?}");
        assert_eq!(err.errno(), Some(nix::libc::ENOENT));
        assert_eq!(err.to_string(), "Cannot open /nonexistent/xen/evtchn");
    }

    #[test]
    fn decode_ports_takes_native_u32s_and_reports_stray_bytes() {
        let mut bytes: Vec<u8> = [7u32, 1 << 20].iter().flat_map(|p| p.to_ne_bytes()).collect();
        bytes.push(0xff);
        let mut out = vec![Port(3)];
        assert_eq!(decode_ports(&bytes, &mut out), 1);
        assert_eq!(out, vec![Port(3), Port(7), Port(1 << 20)]);
    }

    #[test]
    fn ioctl_refuses_an_argument_of_the_wrong_size() {
        let file = File::open("/dev/null").unwrap();
        let mut wrong = IoctlEvtchnBindInterdomain::default();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = ioctl(file.as_fd(), IOCTL_EVTCHN_NOTIFY, &mut wrong);
        }));
        assert!(r.is_err());
    }

    #[test]
    fn ioctls_on_another_device_fail_with_the_ioctl_name() {
        // /dev/null has no ioctls: the error names the operation and carries ENOTTY.
        let file = OpenOptions::new().read(true).write(true).open("/dev/null").unwrap();
        let dev = XenEvtchn { file };
        let err = dev.notify(Port(1)).unwrap_err();
        assert_eq!(err.to_string(), "IOCTL_EVTCHN_NOTIFY failed");
        assert_eq!(err.errno(), Some(nix::libc::ENOTTY));
        assert_eq!(dev.reset().unwrap_err().errno(), Some(nix::libc::ENOTTY));
    }

    #[test]
    fn take_pending_stops_at_end_of_input_and_wait_sees_readable() {
        // A pipe stands in for the device: ports written are read back.
        let (r, w) = nix::unistd::pipe().unwrap();
        nix::fcntl::fcntl(r.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK)).unwrap();
        let dev = XenEvtchn { file: File::from(r) };
        assert!(!dev.wait(Some(Duration::from_millis(1))).unwrap());
        let ports: Vec<u8> = (1u32..=200).flat_map(|p| p.to_ne_bytes()).collect();
        write_all(&File::from(w), &ports).unwrap();
        assert!(dev.wait(Some(Duration::from_millis(1000))).unwrap());
        let mut out = Vec::new();
        dev.take_pending(&mut out).unwrap();
        assert_eq!(out, (1u32..=200).map(Port).collect::<Vec<_>>());
    }
}
