//! Xenstore going away under a running backend: the connection cut,
//! xenstored "restarting" (refusing connections for a while), a malformed
//! frame from it. The rings are served all along, the backend reconnects
//! and reconciles what changed meanwhile; if xenstore stays away past
//! `Config::xenstore_timeout` it stops, leaving the devices for the next
//! process, which resumes them.
//!
//! dom0's connections go through links the test can cut (the simulated
//! xenstored keeps its store, as a xenstored restarted with live update
//! does).

mod blk_support;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blk_support::*;
use blkif::abi::BLKIF_RSP_OKAY;
use xen_backend::{Backend, Config, Platform};
use xen_bus::XenbusState;
use xen_sim::blkfront::{BlkOp, BlkfrontOptions};
use xen_sim::dom0::{RunDir, SimDom0};
use xen_sim::xenstored::Xenstored;
use xs_wire::{Client, ClientError};

/// dom0's connections to the simulated xenstored, each through a socket
/// pair the test holds the far end of.
struct Links {
    xenstored: Arc<Xenstored>,
    current: Mutex<Option<UnixStream>>,
    refuse: AtomicBool,
    made: AtomicU64,
}

fn pump(mut from: UnixStream, mut to: UnixStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = from.shutdown(std::net::Shutdown::Both);
        let _ = to.shutdown(std::net::Shutdown::Both);
    });
}

impl Links {
    fn new(xenstored: &Arc<Xenstored>) -> Arc<Links> {
        Arc::new(Links {
            xenstored: xenstored.clone(),
            current: Mutex::new(None),
            refuse: AtomicBool::new(false),
            made: AtomicU64::new(0),
        })
    }

    /// A new connection, or a refusal while xenstored is "down".
    fn connect(&self) -> Result<Client, ClientError> {
        let lost = |e: std::io::Error| ClientError::Disconnected { reason: e.to_string().into() };
        if self.refuse.load(Ordering::SeqCst) {
            return Err(lost(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)));
        }
        let upstream = self.xenstored.connect_as(0).map_err(lost)?;
        let (ours, theirs) = UnixStream::pair().map_err(lost)?;
        pump(upstream.try_clone().map_err(lost)?, theirs.try_clone().map_err(lost)?);
        pump(theirs.try_clone().map_err(lost)?, upstream);
        *self.current.lock().unwrap() = Some(theirs);
        self.made.fetch_add(1, Ordering::SeqCst);
        Client::from_stream(ours)
    }

    /// The connection goes away under the client.
    fn cut(&self) {
        if let Some(s) = self.current.lock().unwrap().take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// A frame header announcing a 4 GiB payload, as from a broken xenstored.
    fn bad_frame(&self) {
        let guard = self.current.lock().unwrap();
        let mut s = guard.as_ref().expect("a connection");
        let header: Vec<u8> = [15u32, 0, 0, u32::MAX].iter().flat_map(|v| v.to_le_bytes()).collect();
        s.write_all(&header).unwrap();
    }
}

struct Setup {
    h: Harness,
    links: Arc<Links>,
}

fn setup(xenstore_timeout: Duration) -> Setup {
    let _ = env_logger::builder().is_test(true).try_init();
    let SimDom0 { host, xenstored, toolstack } = SimDom0::start().unwrap();
    let run = RunDir::new().unwrap();
    let links = Links::new(&xenstored);
    let backend = start(&host, &links, &run, xenstore_timeout);
    Setup { h: Harness { host, xenstored, toolstack, backend, run }, links }
}

fn start(host: &Arc<xen_sim::host::SimHost>, links: &Arc<Links>, run: &RunDir, timeout: Duration) -> Backend {
    let l = links.clone();
    let platform = Platform::new(0, links.connect().unwrap(), host.evtchn_opener(0), host.grant_mapper(0))
        .with_reconnect(move || l.connect());
    let config = Config { xenstore_timeout: timeout, ..backend_config(run) };
    Backend::start(platform, blk_types(), config).unwrap()
}

fn wait_for(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Writes and reads back `n` blocks; every one must succeed.
fn io(g: &mut Guest, seed: u64, n: usize) {
    let q = g.front.queue(0);
    for i in 0..n {
        let data = pattern(seed + i as u64, 4096);
        let sector = (i * 8) as u64;
        assert_eq!(run(q, BlkOp::Write { sector, data: &data }).status, BLKIF_RSP_OKAY);
        let c = run(q, BlkOp::Read { sector, len: 4096 });
        assert!(c.status == BLKIF_RSP_OKAY && c.data == data, "block {i}");
    }
}

#[test]
fn rings_are_served_while_xenstore_is_away_and_changes_meanwhile_are_picked_up() {
    let Setup { h, links } = setup(Duration::from_secs(60));
    let disk = TempDisk::new("xs-away", 4 << 20);
    let mut g = h.attach(3, 0, &disk, "w", BlkfrontOptions::default()).unwrap();
    io(&mut g, 1, 8);

    links.refuse.store(true, Ordering::SeqCst);
    links.cut();
    // xenstored "restarting": I/O goes on.
    io(&mut g, 100, 32);
    // The toolstack adds a disk meanwhile; nobody sees it yet.
    let disk2 = TempDisk::new("xs-away-2", 4 << 20);
    let spec = h.spec("qdisk", 4, 0, &format!("aio:{}", disk2.path.display()), "w", &[]);
    let guest2_xs = h.guest_xs(4).unwrap();
    h.toolstack.create(&spec).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(h.backend.stats().xenstore_reconnects.load(Ordering::SeqCst), 0);

    links.refuse.store(false, Ordering::SeqCst);
    wait_for("the reconnection", || h.backend.stats().xenstore_reconnects.load(Ordering::SeqCst) == 1);
    let mut dev2 = xen_sim::frontend::FrontendDevice::new(&h.host, guest2_xs, spec);
    let (front2, _) = xen_sim::blkfront::Blkfront::connect(&h.host, &mut dev2, BlkfrontOptions::default(), WAIT)
        .expect("the disk added while xenstore was away connects");
    let mut g2 = Guest { dev: dev2, front: front2, info: g.info };
    io(&mut g2, 200, 4);
    io(&mut g, 300, 4);
    assert_eq!(g.dev.backend_state().unwrap(), Some(XenbusState::Connected));
    assert_eq!(h.backend.stats().failures.load(Ordering::SeqCst), 0);
}

#[test]
fn cuts_at_random_moments_during_state_changes_cost_nothing() {
    let Setup { h, links } = setup(Duration::from_secs(60));
    let disk = TempDisk::new("xs-cuts", 4 << 20);
    let mut g = h.attach(3, 0, &disk, "w", BlkfrontOptions::default()).unwrap();
    let rounds: u64 = std::env::var("XENBACKD_XS_CUTS").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    let mut seed = 0x5eed_u64;
    for round in 0..rounds {
        // A second disk comes and goes while the connection is cut at a
        // random moment of its handshake or teardown.
        let disk2 = TempDisk::new(&format!("xs-cuts-{round}"), 1 << 20);
        let devid = 1 + round as u32;
        let spec = h.spec("qdisk", 3, devid, &format!("aio:{}", disk2.path.display()), "w", &[]);
        let cutter = {
            let links = links.clone();
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let delay = Duration::from_micros((seed >> 33) % 20_000);
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                links.cut();
            })
        };
        let mut g2 = h.connect(spec, BlkfrontOptions::default()).unwrap();
        io(&mut g2, round * 10, 2);
        cutter.join().unwrap();
        io(&mut g, round * 10 + 5, 2);
        g2.dev.close(WAIT).unwrap();
        drop(g2.front);
        h.toolstack.remove(g2.dev.spec()).unwrap();
    }
    eprintln!(
        "{rounds} rounds: {} connections made, {} reconnections, {} failures",
        links.made.load(Ordering::SeqCst),
        h.backend.stats().xenstore_reconnects.load(Ordering::SeqCst),
        h.backend.stats().failures.load(Ordering::SeqCst)
    );
    assert_eq!(h.backend.stats().failures.load(Ordering::SeqCst), 0);
    assert!(h.backend.stats().xenstore_reconnects.load(Ordering::SeqCst) >= rounds);
}

#[test]
fn a_malformed_frame_costs_a_reconnection_not_the_data_path() {
    let Setup { h, links } = setup(Duration::from_secs(60));
    let disk = TempDisk::new("xs-bad-frame", 4 << 20);
    let mut g = h.attach(3, 0, &disk, "w", BlkfrontOptions::default()).unwrap();
    links.bad_frame();
    wait_for("the reconnection", || h.backend.stats().xenstore_reconnects.load(Ordering::SeqCst) == 1);
    io(&mut g, 7, 8);
    // And xenstore is served again: a new disk connects.
    let disk2 = TempDisk::new("xs-bad-frame-2", 1 << 20);
    let mut g2 = h.attach(3, 1, &disk2, "w", BlkfrontOptions::default()).unwrap();
    io(&mut g2, 8, 2);
}

#[test]
fn xenstore_away_too_long_stops_the_backend_and_the_next_one_resumes() {
    let Setup { mut h, links } = setup(Duration::from_millis(500));
    let disk = TempDisk::new("xs-gone", 4 << 20);
    let mut g = h.attach(3, 0, &disk, "w", BlkfrontOptions::default()).unwrap();
    links.refuse.store(true, Ordering::SeqCst);
    links.cut();
    let done = h.backend.done();
    assert!(done.recv_timeout(WAIT).is_err(), "the backend stopped");
    assert_eq!(h.backend.stats().xenstore_gave_up.load(Ordering::SeqCst), 1);
    // Requests queued while no backend runs wait in the ring.
    let q = g.front.queue(0);
    let data = pattern(99, 4096);
    q.submit(1, BlkOp::Write { sector: 64, data: &data }).unwrap();
    // xenstored is back; the supervisor starts a new backend.
    links.refuse.store(false, Ordering::SeqCst);
    h.backend = start(&h.host, &links, &h.run, Duration::from_secs(60));
    let c = wait_one(q);
    assert_eq!((c.tag, c.status), (1, BLKIF_RSP_OKAY));
    io(&mut g, 11, 4);
    assert_eq!(h.backend.stats().resumes.load(Ordering::SeqCst), 1);
    assert_eq!(g.dev.backend_state().unwrap(), Some(XenbusState::Connected));
}
