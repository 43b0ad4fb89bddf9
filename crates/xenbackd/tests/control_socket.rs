//! The control socket of a running daemon, on the simulator: the framework
//! serves a guest's two-queue disk, the guest does known I/O, and the
//! answers of the socket (`status` as JSON, `metrics` as Prometheus text)
//! and of the real binary's `status` and `metrics` commands show that
//! device with those counts.

#[path = "../../../tests/blk_support/mod.rs"]
mod blk_support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use blk_support::{run, Harness, TempDisk, WAIT};
use xen_sim::blkfront::{BlkOp, BlkfrontOptions};
use xenbackd::control::{request, ClientError, ControlServer, Request, IO_TIMEOUT};
use xenbackd::status::{render_text, Status};

const XB: &str = env!("CARGO_BIN_EXE_xenbackd");
const DOMAIN: u16 = 3;
const DEVID: u32 = 51712;

fn status(path: &Path) -> Status {
    let reply = request(path, Request::Status, IO_TIMEOUT).unwrap();
    Status::from_json(&serde_json::from_str(&reply).unwrap()).unwrap()
}

/// Asks until queue 0 shows `completed` requests (a ring publishes its
/// counters after the pass that answered them); reaching [`WAIT`] fails.
fn settled(path: &Path, completed: u64) -> Status {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = status(path);
        let done = s.devices.as_ref().and_then(|d| d.first()).and_then(|d| d.rings[0]).map(|r| r.completed);
        if done == Some(completed) {
            return s;
        }
        assert!(Instant::now() < deadline, "queue 0 never showed {completed} requests: {s:?}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn xenbackd(args: &[&str]) -> String {
    let out = Command::new(XB).args(args).output().unwrap();
    assert!(out.status.success(), "xenbackd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn status_and_metrics_show_the_device_and_its_io() {
    let h = Harness::new().unwrap();
    let disk = TempDisk::new("control", 8 << 20);
    let opts = BlkfrontOptions { queues: 2, ring_page_order: 1, ..BlkfrontOptions::default() };
    let mut guest = h.attach(DOMAIN, DEVID, &disk, "w", opts).unwrap();
    let sock = h.run.path().join("control.sock");
    let _server = ControlServer::start(&sock, h.backend.monitor()).unwrap();

    // Four 4 KiB writes and two 4 KiB reads on queue 0.
    let data = blk_support::pattern(1, 4096);
    for i in 0..4 {
        assert_eq!(run(guest.front.queue(0), BlkOp::Write { sector: i * 8, data: &data }).status, 0);
    }
    for i in 0..2 {
        assert_eq!(run(guest.front.queue(0), BlkOp::Read { sector: i * 8, len: 4096 }).status, 0);
    }

    let s = settled(&sock, 6);
    assert_eq!(s.counter("devices"), 1);
    assert_eq!(s.counter("connects"), 1);
    assert_eq!(s.counter("failures"), 0);
    let devices = s.devices.as_ref().unwrap();
    assert_eq!(devices.len(), 1);
    let d = &devices[0];
    assert_eq!((d.kind.as_str(), d.domain, d.devid), ("qdisk", u32::from(DOMAIN), DEVID));
    assert_eq!((d.state.as_str(), d.failed, d.resumed), ("Connected", false, false));
    assert_eq!(d.detail("image"), Some(disk.path.to_str().unwrap()));
    assert_eq!(d.detail("format"), Some("raw"));
    assert_eq!(d.detail("queues"), Some("2"));
    assert_eq!(d.detail("ring-order"), Some("1"));
    assert_eq!(d.detail("sectors"), Some("16384"));
    assert!(d.connected_for.is_some());
    let q0 = d.rings[0].unwrap();
    assert_eq!((q0.completed, q0.failed, q0.in_flight), (6, 0, 0));
    assert_eq!((q0.bytes_written, q0.bytes_read), (4 * 4096, 2 * 4096));
    assert_eq!(d.rings.len(), 2);
    assert_eq!(d.rings[1].unwrap().completed, 0);

    let text = render_text(&s, None);
    println!("{text}");
    let row = text.lines().find(|l| l.starts_with("3 ")).unwrap_or_else(|| panic!("no row for dom3: {text}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cols[..8], ["3", "qdisk", "51712", "Connected", disk.path.to_str().unwrap(), "raw", "2", "1"]);

    let metrics = request(&sock, Request::Metrics, IO_TIMEOUT).unwrap();
    let labels = "type=\"qdisk\",domain=\"3\",devid=\"51712\"";
    for line in [
        "xenbackd_devices 1".to_string(),
        "xenbackd_connects_total 1".to_string(),
        format!("xenbackd_device_state{{{labels}}} 4"),
        format!("xenbackd_ring_requests_completed_total{{{labels},queue=\"0\"}} 6"),
        format!("xenbackd_ring_written_bytes_total{{{labels},queue=\"0\"}} 16384"),
        format!("xenbackd_ring_read_bytes_total{{{labels},queue=\"0\"}} 8192"),
        format!("xenbackd_ring_requests_completed_total{{{labels},queue=\"1\"}} 0"),
    ] {
        assert!(metrics.lines().any(|l| l == line), "no {line:?} in\n{metrics}");
    }

    // The binary's commands, as an operator runs them.
    let sock_arg = sock.to_str().unwrap();
    let out = xenbackd(&["status", "--control-socket", sock_arg, "--interval", "0"]);
    println!("$ xenbackd status --interval 0\n{out}");
    assert!(out.lines().any(|l| l.split_whitespace().take(4).eq(["3", "qdisk", "51712", "Connected"])), "{out}");
    // As an operator types it: rates between two answers 1 s apart (no I/O meanwhile).
    let out = xenbackd(&["status", "--control-socket", sock_arg]);
    println!("$ xenbackd status\n{out}");
    let row = out.lines().find(|l| l.starts_with("3 ")).unwrap_or_else(|| panic!("no row for dom3: {out}"));
    assert_eq!(row.split_whitespace().nth(9), Some("0"), "no I/O between the samples: {out}");
    let out = xenbackd(&["metrics", "--control-socket", sock_arg]);
    println!("$ xenbackd metrics | head\n{}", out.lines().take(10).collect::<Vec<_>>().join("\n"));
    assert!(out.contains(&format!("xenbackd_ring_requests_completed_total{{{labels},queue=\"0\"}} 6\n")), "{out}");
    let json = xenbackd(&["status", "--control-socket", sock_arg, "--json"]);
    println!("$ xenbackd status --json\n{json}");
    let parsed = Status::from_json(&serde_json::from_str(&json).unwrap()).unwrap();
    assert_eq!(parsed.devices.unwrap()[0].rings[0].unwrap().completed, 6);
}

#[test]
fn the_socket_is_roots_alone_and_one_daemon_holds_it() {
    let h = Harness::new().unwrap();
    let sock = h.run.path().join("sub/control.sock");
    let server = ControlServer::start(&sock, h.backend.monitor()).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&sock), 0o600);
    assert_eq!(mode(sock.parent().unwrap()), 0o700);

    let second = ControlServer::bind(&sock).err().expect("a second daemon is refused");
    assert_eq!(second.kind(), std::io::ErrorKind::AddrInUse);
    assert_eq!(status(&sock).devices, Some(vec![]), "the first still answers");

    drop(server);
    assert!(!sock.exists(), "the socket file goes with its server");
    let err = request(&sock, Request::Status, IO_TIMEOUT).unwrap_err();
    assert!(matches!(err, ClientError::NotRunning { .. }), "{err}");
    // A socket file left by a dead daemon is taken over.
    let stale = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    drop(stale);
    let again = ControlServer::start(&sock, h.backend.monitor()).unwrap();
    assert_eq!(status(&sock).counter("devices"), 0);
    // Its file removed under it, the server still stops.
    std::fs::remove_file(&sock).unwrap();
    drop(again);
}

#[test]
fn an_unknown_request_is_answered_with_an_error() {
    use std::io::{Read, Write};
    let h = Harness::new().unwrap();
    let sock = h.run.path().join("control.sock");
    let _server = ControlServer::start(&sock, h.backend.monitor()).unwrap();
    let mut conn = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    conn.write_all(b"shutdown\n").unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    assert_eq!(reply, "error: unknown request \"shutdown\" (status or metrics)\n");
}
