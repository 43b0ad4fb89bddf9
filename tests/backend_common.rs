//! Shared setup of the backend scenario tests: a simulated host and
//! xenstored, the framework serving the echo device type from dom0, a
//! toolstack, guests, and an echo client over a frontend's ring.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use xen_backend::echo::EchoType;
use xen_backend::{Backend, Config, Platform};
use xen_bus::XenbusState;
use xen_ring::FrontRing;
use xen_sim::dom0::{RunDir, SimDom0};
use xen_sim::frontend::{ConnectOptions, DeviceSpec, FrontendDevice, RingMemory, Toolstack};
use xen_sim::host::SimHost;
use xen_sim::xenstored::Xenstored;
use xs_wire::Client;

/// The echo device type's xenstore name in these tests.
pub const KIND: &str = "echo";
/// Longest wait for any state; reaching it is a failure, not a measurement.
pub const WAIT: Duration = Duration::from_secs(30);

/// A host with dom0 running the framework.
pub struct Harness {
    pub host: Arc<SimHost>,
    pub xenstored: Arc<Xenstored>,
    pub toolstack: Toolstack,
    pub backend: Backend,
    config: Config,
    watch_queue: usize,
    /// dom0's /run/xenbackd (the rings' journals), unless the config names one.
    _run: RunDir,
}

/// A backend in dom0 serving the echo type on a connection of its own.
fn start_backend(
    host: &Arc<SimHost>,
    xenstored: &Arc<Xenstored>,
    config: Config,
    watch_queue: usize,
) -> Result<Backend> {
    let client = Client::from_transport(
        Box::new(xs_wire::transport::SocketTransport::new(xenstored.connect_as(0)?)),
        xs_wire::client::Options { watch_queue, ..Default::default() },
    )?;
    Ok(Backend::start(
        Platform::new(0, client, host.evtchn_opener(0), host.grant_mapper(0)),
        vec![EchoType::new(KIND) as _],
        config,
    )?)
}

impl Harness {
    /// Starts the framework with `workers` ring workers.
    pub fn new(workers: usize) -> Result<Self> {
        Self::with_watch_queue(workers, xs_wire::client::DEFAULT_WATCH_QUEUE)
    }

    /// As [`Harness::new`], the backend's connection queueing at most
    /// `watch_queue` watch events before it overflows.
    pub fn with_watch_queue(workers: usize, watch_queue: usize) -> Result<Self> {
        Self::with_config(Config { workers, ..Config::default() }, watch_queue)
    }

    /// Starts the framework with `config`, its connection queueing at most
    /// `watch_queue` watch events.
    pub fn with_config(config: Config, watch_queue: usize) -> Result<Self> {
        let _ = env_logger::builder().is_test(true).try_init();
        let SimDom0 { host, xenstored, toolstack } = SimDom0::start()?;
        let run = RunDir::new()?;
        let mut config = config;
        config.journal_dir.get_or_insert_with(|| run.path().to_path_buf());
        let backend = start_backend(&host, &xenstored, config.clone(), watch_queue)?;
        Ok(Harness { host, xenstored, toolstack, backend, config, watch_queue, _run: run })
    }

    /// Restarts the backend as `xenbackd serve` does by default: the
    /// running one detaches (leaving the devices Connected), then `gap` runs
    /// (with no backend), then a new one starts on a new connection.
    pub fn restart(&mut self, gap: impl FnOnce() -> Result<()>) -> Result<()> {
        self.backend.detach();
        gap()?;
        self.backend = start_backend(&self.host, &self.xenstored, self.config.clone(), self.watch_queue)?;
        Ok(())
    }

    /// Creates guest `domid` and returns its own xenstore connection.
    pub fn guest(&self, domid: u16) -> Result<Client> {
        self.host.create_domain(domid)?;
        self.xenstored.introduce_domain(domid.into());
        Ok(Client::from_stream(self.xenstored.connect_as(domid.into())?)?)
    }

    /// Creates the directories of echo device `devid` of `domid` and the guest's side.
    pub fn device(&self, guest: &Client, domid: u16, devid: u32) -> Result<FrontendDevice> {
        let spec = DeviceSpec::new(KIND, 0, domid, devid);
        self.toolstack.create(&spec)?;
        Ok(FrontendDevice::new(&self.host, guest.clone(), spec))
    }

    /// A guest with one device brought to Connected.
    pub fn connected_device(&self, domid: u16, devid: u32) -> Result<(FrontendDevice, EchoClient)> {
        let guest = self.guest(domid)?;
        let mut dev = self.device(&guest, domid, devid)?;
        dev.connect(&ConnectOptions::default())?;
        let echo = EchoClient::new(&dev, 0)?;
        Ok((dev, echo))
    }
}

/// Waits for the backend of `dev` to reach `want`.
pub fn wait_backend(dev: &mut FrontendDevice, want: XenbusState) -> Result<()> {
    dev.wait_backend_state(&format!("state {want}"), WAIT, |s| s == Some(want))?;
    Ok(())
}

/// Waits until the device failed: `error` written and state Closed.
pub fn wait_failed(dev: &mut FrontendDevice) -> Result<String> {
    wait_backend(dev, XenbusState::Closed)?;
    dev.read_backend("error")?.context("no error node")
}

/// The guest's end of an echo ring.
pub struct EchoClient {
    ring: FrontRing<u64, u64, RingMemory>,
    port: evtchn::Port,
}

impl EchoClient {
    /// Attaches to ring `index` of `dev` (already initialised by the frontend).
    pub fn new(dev: &FrontendDevice, index: usize) -> Result<Self> {
        Ok(EchoClient { ring: FrontRing::attach(dev.ring(index)?.memory(), 0)?, port: dev.ports()[index] })
    }

    /// Sends `values` (at most a ring's worth at a time) and returns the responses.
    pub fn round_trip(&mut self, dev: &FrontendDevice, values: &[u64]) -> Result<Vec<u64>> {
        let mut out = Vec::with_capacity(values.len());
        for chunk in values.chunks(self.ring.size() as usize) {
            self.send(dev, chunk)?;
            out.extend(self.receive(dev, chunk.len())?);
        }
        Ok(out)
    }

    /// Publishes `values` as requests (no more than the free slots) and
    /// notifies the backend if the ring says so.
    pub fn send(&mut self, dev: &FrontendDevice, values: &[u64]) -> Result<()> {
        for v in values {
            self.ring.push_request(v)?;
        }
        if self.ring.push_requests_and_check_notify()? {
            dev.notify(self.port)?;
        }
        Ok(())
    }

    /// Waits for `n` responses.
    pub fn receive(&mut self, dev: &FrontendDevice, n: usize) -> Result<Vec<u64>> {
        let mut out = Vec::with_capacity(n);
        let deadline = Instant::now() + WAIT;
        while out.len() < n {
            self.ring.take_responses(n - out.len(), &mut out)?;
            if out.len() < n && !self.ring.final_check_for_responses()? {
                if Instant::now() > deadline {
                    bail!("no response after {} of {}", out.len(), n);
                }
                dev.wait_event(Duration::from_millis(100))?;
            }
        }
        Ok(out)
    }
}

/// Checks that `dev` echoes 100 values.
pub fn check_echo(dev: &FrontendDevice, echo: &mut EchoClient, seed: u64) -> Result<()> {
    let values: Vec<u64> = (0..100).map(|i| seed * 1000 + i).collect();
    let got = echo.round_trip(dev, &values)?;
    let want: Vec<u64> = values.iter().map(|v| v + 1).collect();
    if got != want {
        bail!("echo mismatch: got {:?}.. want {:?}..", &got[..3.min(got.len())], &want[..3]);
    }
    Ok(())
}
