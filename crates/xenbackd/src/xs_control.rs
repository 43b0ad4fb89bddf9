//! `xenstore-control` (`xenbackd xs control`): Xen 4.17's tool, with its
//! arguments, output and exit status. `XS_CONTROL <command> <args>...` goes
//! to xenstored and its answer is printed; a command xenstored does not
//! know (`EINVAL`) gets the list its `help` gives. `live-update` runs the
//! daemon sequence (binary, command line, start, retried while the daemon
//! answers `BUSY`); a xenstore stub domain's update needs the kernel image
//! sent through libxenguest and is refused with a message.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::time::{Duration, Instant};

use xs_wire::client::{Client, ClientError, TxId};
use xs_wire::XsErrno;

/// Runs the tool; `prog` names it in the usage message.
pub fn run(prog: &str, args: Vec<OsString>) -> u8 {
    let args: Vec<Vec<u8>> = args.into_iter().map(OsStringExt::into_vec).collect();
    let Some((command, rest)) = args.split_first() else {
        eprintln!("Usage:\n{prog} <command> [<arg>...]");
        return 2;
    };
    let Ok(client) = Client::connect() else {
        eprintln!("Failed to contact Xenstored.");
        return 1;
    };
    if command == b"live-update" {
        return live_update(&client, rest);
    }
    let mut request: Vec<&[u8]> = vec![command];
    request.extend(rest.iter().map(Vec::as_slice));
    match client.control(&request) {
        Ok(reply) => {
            let text = String::from_utf8_lossy(strip_nul(&reply));
            if !text.is_empty() {
                println!("{text}");
            }
            0
        }
        Err(e) if e.errno() == Some(XsErrno::EINVAL) => {
            match client.control(&[b"help"]) {
                Ok(help) => {
                    eprintln!(
                        "Command not supported. Valid commands are:\n{}",
                        String::from_utf8_lossy(strip_nul(&help))
                    )
                }
                Err(_) => eprintln!("Error when executing command."),
            }
            3
        }
        Err(e) => {
            eprintln!("Error {} when trying to execute command.", errno_of(&e));
            3
        }
    }
}

fn strip_nul(b: &[u8]) -> &[u8] {
    b.strip_suffix(b"\0").unwrap_or(b)
}

/// The errno value the C tool prints (`errno` after `xs_control_command`).
fn errno_of(e: &ClientError) -> i32 {
    e.errno().map_or(nix::libc::EIO, XsErrno::errno)
}

/// `live-update [-c cmdline] [-t timeout] [-F] binary`, as the C tool
/// parses it (the last bare argument is the binary; default timeout 60 s).
fn live_update(client: &Client, args: &[Vec<u8>]) -> u8 {
    let (mut binary, mut cmdline, mut timeout, mut force) = (None, None, 60u32, false);
    let mut i = 0;
    while i < args.len() {
        match args[i].as_slice() {
            b"-c" => {
                i += 1;
                let Some(c) = args.get(i) else {
                    eprintln!("Missing command line value");
                    return 2;
                };
                cmdline = Some(c.clone());
            }
            b"-t" => {
                i += 1;
                let Some(t) = args.get(i) else {
                    eprintln!("Missing timeout value");
                    return 2;
                };
                // atoi: leading digits, else 0.
                timeout = String::from_utf8_lossy(t)
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
                    .parse()
                    .unwrap_or(0);
            }
            b"-F" => force = true,
            other => binary = Some(other.to_vec()),
        }
        i += 1;
    }
    let Some(binary) = binary else {
        eprintln!("Missing binary specification");
        return 2;
    };
    if client.read(TxId::NONE, "/tool/xenstored/domid").is_ok() {
        eprintln!(
            "Xenstore runs in a stub domain: its live update sends a kernel image through libxenguest, which xenbackd does not link; use Xen's xenstore-control"
        );
        return 3;
    }
    match client.control(&[b"live-update", b"-f", &binary]) {
        Ok(r) if strip_nul(&r) == b"OK" => {}
        other => {
            eprintln!("Setting update binary failed:\n{}", answer_or_error(other));
            return 3;
        }
    }
    let rc = (|| {
        if let Some(c) = &cmdline {
            match client.control(&[b"live-update", b"-c", c]) {
                Ok(r) if strip_nul(&r) == b"OK" => {}
                other => {
                    eprintln!("Setting update command line failed:\n{}", answer_or_error(other));
                    return 3;
                }
            }
        }
        let secs = timeout.to_string();
        let mut start: Vec<&[u8]> = vec![b"live-update", b"-s", b"-t", secs.as_bytes()];
        if force {
            start.push(b"-F");
        }
        let began = Instant::now();
        let mut last = client.control(&start);
        while matches!(&last, Ok(r) if strip_nul(r) == b"BUSY") && began.elapsed() < Duration::from_secs(timeout.into())
        {
            std::thread::sleep(Duration::from_secs(1));
            last = client.control(&start);
        }
        match last {
            Ok(r) if strip_nul(&r) == b"OK" => 0,
            other => {
                eprintln!("Starting live update failed:\n{}", answer_or_error(other));
                3
            }
        }
    })();
    if rc != 0 {
        let _ = client.control(&[b"live-update", b"-a"]);
    }
    rc
}

fn answer_or_error(r: Result<Vec<u8>, ClientError>) -> String {
    match r {
        Ok(reply) => String::from_utf8_lossy(strip_nul(&reply)).into_owned(),
        Err(e) => crate::xs::describe(&e),
    }
}
