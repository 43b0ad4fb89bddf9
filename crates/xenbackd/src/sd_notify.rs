//! Readiness notification to systemd (`Type=notify`), as `sd_notify(3)`
//! does it, without libsystemd: one datagram of `KEY=value` lines to the
//! unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` in the
//! abstract namespace). Without the variable (not started by systemd, or
//! another type), nothing is sent.

use std::io;
use std::os::unix::net::UnixDatagram;

/// The daemon is ready: its backend serves.
pub const READY: &str = "READY=1";
/// The daemon is stopping.
pub const STOPPING: &str = "STOPPING=1";

/// Sends `state` (e.g. `"READY=1\nSTATUS=serving"`) to `$NOTIFY_SOCKET`.
/// `Ok(false)` if the variable is unset or empty.
pub fn notify(state: &str) -> io::Result<bool> {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(addr) if !addr.is_empty() => send(&addr.to_string_lossy(), state).map(|()| true),
        _ => Ok(false),
    }
}

/// Sends `state` to the socket `addr` (`/path` or `@abstract`).
pub fn send(addr: &str, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    if let Some(name) = addr.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        let to = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        sock.send_to_addr(state.as_bytes(), &to)?;
    } else if addr.starts_with('/') {
        sock.send_to(state.as_bytes(), addr)?;
    } else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("NOTIFY_SOCKET {addr:?} is not a socket")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_socket_receives_the_state() {
        let path = std::env::temp_dir().join(format!("xenbackd-notify-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let systemd = UnixDatagram::bind(&path).unwrap();
        send(path.to_str().unwrap(), "READY=1\nSTATUS=serving").unwrap();
        let mut buf = [0u8; 64];
        let n = systemd.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=serving");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn an_abstract_socket_receives_the_state() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("xenbackd-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let systemd = UnixDatagram::bind_addr(&addr).unwrap();
        send(&format!("@{name}"), STOPPING).unwrap();
        let mut buf = [0u8; 64];
        let n = systemd.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], STOPPING.as_bytes());
    }

    #[test]
    fn a_relative_address_is_refused() {
        assert_eq!(send("notify.sock", READY).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }
}
