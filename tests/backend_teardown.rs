//! Taking a device's rings away never waits for its I/O on the xenbus
//! thread or on a worker (issues 12 and 13): a device whose frontend closes
//! with I/O still in flight drains in the background while another guest's
//! device connects and a neighbour is served; the closing device goes
//! Closed once its I/O is done, and one whose I/O outlives the drain
//! deadline fails alone.

#[path = "backend_common.rs"]
mod common;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use common::{check_echo, EchoClient, Harness, WAIT};
use nix::sys::eventfd::{EfdFlags, EventFd};
use xen_backend::echo::EchoType;
use xen_backend::{
    Backend, Config, Device, DeviceCtx, DeviceError, DeviceType, Drained, Platform, Progress, RingHandler, RingSetup,
};
use xen_bus::XenbusState;
use xen_ring::BackRing;
use xen_sim::frontend::{ConnectOptions, DeviceSpec, FrontendDevice};
use xs_wire::Client;

/// Echo rings whose drain, once asked, lasts until the test writes the
/// ring's "I/O done" fd (kept in `finishers`), as a disk whose last
/// requests take that long.
struct SlowType {
    finishers: Arc<Mutex<Vec<OwnedFd>>>,
}

struct SlowDevice {
    finishers: Arc<Mutex<Vec<OwnedFd>>>,
}

struct SlowRing {
    ring: BackRing<u64, u64>,
    done: EventFd,
    batch: Vec<u64>,
}

impl DeviceType for SlowType {
    fn name(&self) -> &str {
        "slow"
    }

    fn create(&self, _ctx: &DeviceCtx) -> Result<Box<dyn Device>, DeviceError> {
        Ok(Box::new(SlowDevice { finishers: self.finishers.clone() }))
    }
}

impl Device for SlowDevice {
    fn init(&mut self, _ctx: &DeviceCtx) -> Result<(), DeviceError> {
        Ok(())
    }

    fn connect(&mut self, ctx: &DeviceCtx) -> Result<Vec<RingSetup>, DeviceError> {
        let ring = BackRing::new(ctx.map_ring("", 0)?)?;
        let port = ctx.bind_event_channel("event-channel")?;
        let done = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).map_err(|e| DeviceError::msg(e.to_string()))?;
        let finisher = done.as_fd().try_clone_to_owned().map_err(|e| DeviceError::msg(e.to_string()))?;
        self.finishers.lock().unwrap().push(finisher);
        Ok(vec![RingSetup { port, handler: Box::new(SlowRing { ring, done, batch: Vec::new() }) }])
    }
}

impl RingHandler for SlowRing {
    fn process(&mut self, budget: usize) -> Result<Progress, DeviceError> {
        self.batch.clear();
        self.ring.take_requests(budget, &mut self.batch)?;
        for v in &self.batch {
            self.ring.push_response(&v.wrapping_add(1))?;
        }
        Ok(Progress { notify: self.ring.push_responses_and_check_notify()?, ..Progress::default() })
    }

    fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.done.as_fd())
    }

    fn drain(&mut self) -> Drained {
        Drained { notify: false, done: self.done.read().is_ok() }
    }
}

/// dom0's framework serving `echo` and `slow` on a connection of its own.
fn start(h: &Harness, drain_timeout: Duration) -> Result<(Backend, Arc<Mutex<Vec<OwnedFd>>>)> {
    let finishers = Arc::new(Mutex::new(Vec::new()));
    let client = Client::from_stream(h.xenstored.connect_as(0)?)?;
    let types: Vec<Arc<dyn DeviceType>> =
        vec![EchoType::new("echo2") as _, Arc::new(SlowType { finishers: finishers.clone() }) as _];
    // One worker: the slow ring and the neighbour share it.
    let config = Config { workers: 1, drain_timeout, ..Config::default() };
    Ok((
        Backend::start(Platform::new(0, client, h.host.evtchn_opener(0), h.host.grant_mapper(0)), types, config)?,
        finishers,
    ))
}

fn device(h: &Harness, kind: &str, domid: u16) -> Result<FrontendDevice> {
    let spec = DeviceSpec::new(kind, 0, domid, 0);
    h.toolstack.create(&spec)?;
    Ok(FrontendDevice::new(&h.host, h.guest(domid)?, spec))
}

/// The backend, a connected echo neighbour (dom 1) and a connected slow
/// device (dom 2), both on its one worker.
struct Scene {
    backend: Backend,
    finishers: Arc<Mutex<Vec<OwnedFd>>>,
    neighbour: FrontendDevice,
    neighbour_echo: EchoClient,
    slow: FrontendDevice,
}

fn scene(h: &Harness, drain_timeout: Duration) -> Result<Scene> {
    let (backend, finishers) = start(h, drain_timeout)?;
    let mut neighbour = device(h, "echo2", 1)?;
    neighbour.connect(&ConnectOptions::default())?;
    let neighbour_echo = EchoClient::new(&neighbour, 0)?;
    let mut slow = device(h, "slow", 2)?;
    slow.connect(&ConnectOptions::default())?;
    Ok(Scene { backend, finishers, neighbour, neighbour_echo, slow })
}

#[test]
fn a_device_draining_slow_io_blocks_no_other_device() -> Result<()> {
    let h = Harness::new(1)?;
    let Scene { backend, finishers, neighbour, mut neighbour_echo, mut slow } = scene(&h, Duration::from_secs(120))?;

    // The slow device's frontend closes: its ring drains, and stays
    // mapped, until its I/O is done.
    slow.set_state(XenbusState::Closing)?;
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(slow.backend_state()?, Some(XenbusState::Connected), "closed before its I/O finished");
    assert_eq!(h.host.grant_table(2).live_maps()?, 1, "the backend's mapping of the ring");

    // Meanwhile a new guest's device connects and the neighbour is served.
    let started = Instant::now();
    let mut newcomer = device(&h, "echo2", 3)?;
    newcomer.connect(&ConnectOptions::default())?;
    let mut newcomer_echo = EchoClient::new(&newcomer, 0)?;
    check_echo(&newcomer, &mut newcomer_echo, 1)?;
    check_echo(&neighbour, &mut neighbour_echo, 2)?;
    eprintln!("a new device connected in {:?} while another drained", started.elapsed());
    assert_eq!(slow.backend_state()?, Some(XenbusState::Connected));

    // Its I/O finishes: now it closes and lets go of the ring.
    let finisher = finishers.lock().unwrap().pop().expect("the slow ring's finisher");
    nix::unistd::write(&finisher, &1u64.to_ne_bytes())?;
    slow.wait_backend_state("Closing", WAIT, |s| s == Some(XenbusState::Closing))?;
    assert_eq!(h.host.grant_table(2).live_maps()?, 0, "the ring is unmapped");
    slow.close(WAIT)?;
    assert_eq!(backend.stats().failures.load(Ordering::Relaxed), 0);
    Ok(())
}

#[test]
fn a_device_whose_io_outlives_the_drain_deadline_fails_alone() -> Result<()> {
    let h = Harness::new(1)?;
    let Scene { backend, neighbour, mut neighbour_echo, mut slow, .. } = scene(&h, Duration::from_millis(300))?;

    slow.set_state(XenbusState::Closing)?;
    let error = common::wait_failed(&mut slow)?;

    assert!(error.contains("in flight"), "{error}");
    assert_eq!(backend.stats().stuck_rings.load(Ordering::Relaxed), 1);
    check_echo(&neighbour, &mut neighbour_echo, 3)?;
    Ok(())
}
