//! `unixcat PATH SECS`: the lab's client of a unix stream socket (dom0 has
//! no socat): stdin goes to the socket, the socket to stdout, until the
//! peer closes or nothing arrives for SECS seconds. std only, built static
//! by run-scenarios like xensmoke.
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: unixcat PATH IDLE_SECS");
        std::process::exit(2);
    }
    let secs: u64 = args[2].parse().unwrap_or_else(|_| {
        eprintln!("unixcat: IDLE_SECS must be a whole number");
        std::process::exit(2)
    });
    let sock = UnixStream::connect(&args[1]).unwrap_or_else(|e| {
        eprintln!("unixcat: connect {}: {e}", args[1]);
        std::process::exit(1)
    });
    let mut to_sock = sock.try_clone().expect("clone the socket");
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to_sock.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut from = sock;
    from.set_read_timeout(Some(Duration::from_secs(secs))).expect("read timeout");
    let mut out = std::io::stdout();
    let mut buf = [0u8; 65536];
    loop {
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                eprintln!("unixcat: nothing for {secs}s");
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("unixcat: read: {e}");
                std::process::exit(1)
            }
        }
    }
}
