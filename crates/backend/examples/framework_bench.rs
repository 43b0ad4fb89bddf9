//! Framework benchmark on the simulator, with the echo device type:
//! bring-up time of many devices across many guests, watch events processed
//! per second, and requests per second through rings with 1 and 4 workers.
//!
//! `cargo run --release -p xen-backend --example framework_bench [domains] [devices-per-domain]`

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use xen_backend::echo::EchoType;
use xen_backend::{Backend, Config, Platform};
use xen_bus::XenbusState;
use xen_ring::FrontRing;
use xen_sim::dom0::SimDom0;
use xen_sim::frontend::{ConnectOptions, DeviceSpec, FrontendDevice, RingMemory, Toolstack};
use xen_sim::host::SimHost;
use xen_sim::xenstored::Xenstored;
use xs_wire::Client;

const WAIT: Duration = Duration::from_secs(120);

struct Sim {
    host: Arc<SimHost>,
    xenstored: Arc<Xenstored>,
    toolstack: Toolstack,
    backend: Backend,
}

impl Sim {
    fn new(workers: usize) -> Result<Self> {
        let dom0 = SimDom0::start()?;
        let platform = Platform::new(0, dom0.dom0_client()?, dom0.host.evtchn_opener(0), dom0.host.grant_mapper(0));
        let SimDom0 { host, xenstored, toolstack } = dom0;
        let backend =
            Backend::start(platform, vec![EchoType::new("echo") as _], Config { workers, ..Config::default() })?;
        Ok(Sim { host, xenstored, toolstack, backend })
    }

    fn guest(&self, domid: u16) -> Result<Client> {
        self.host.create_domain(domid)?;
        self.xenstored.introduce_domain(domid.into());
        Ok(Client::from_stream(self.xenstored.connect_as(domid.into())?)?)
    }

    /// Creates and connects `domains * per_domain` devices without waiting
    /// per step, then waits for every backend to be Connected.
    fn bring_up(&self, domains: u16, per_domain: u32) -> Result<(Vec<FrontendDevice>, Duration)> {
        let start = Instant::now();
        let opts = ConnectOptions { wait_init_wait: false, wait_connected: false, ..Default::default() };
        let mut devices = Vec::new();
        for domid in 1..=domains {
            let guest = self.guest(domid)?;
            for devid in 0..per_domain {
                let spec = DeviceSpec::new("echo", 0, domid, devid);
                self.toolstack.create(&spec)?;
                let mut dev = FrontendDevice::new(&self.host, guest.clone(), spec);
                dev.connect(&opts)?;
                devices.push(dev);
            }
        }
        for dev in &mut devices {
            dev.wait_backend_state("Connected", WAIT, |s| s == Some(XenbusState::Connected))?;
        }
        Ok((devices, start.elapsed()))
    }
}

/// Watch events the xenbus thread handles per second: toolstack writes of a
/// node each device's `backend_changed` receives.
fn watch_events(sim: &Sim, devices: &[FrontendDevice], rounds: usize) -> Result<f64> {
    let before = sim.backend.stats().events.load(Ordering::Relaxed);
    let start = Instant::now();
    let mut written = 0u64;
    for r in 0..rounds {
        for dev in devices {
            sim.toolstack.write_backend(dev.spec(), "bench-node", &r.to_string())?;
            written += 1;
        }
    }
    let deadline = Instant::now() + WAIT;
    while sim.backend.stats().events.load(Ordering::Relaxed) - before < written {
        if Instant::now() > deadline {
            bail!("events not all handled");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(written as f64 / start.elapsed().as_secs_f64())
}

/// One guest thread per device pushing echo requests for `duration`.
fn requests_per_sec(workers: usize, rings: usize, duration: Duration) -> Result<f64> {
    let sim = Sim::new(workers)?;
    let (devices, _) = sim.bring_up(rings as u16, 1)?;
    let threads: Vec<_> = devices
        .into_iter()
        .map(|dev| {
            std::thread::spawn(move || -> Result<u64> {
                let mut ring = FrontRing::<u64, u64, RingMemory>::attach(dev.ring(0)?.memory(), 0)?;
                let port = dev.ports()[0];
                let end = Instant::now() + duration;
                let mut done = 0u64;
                let mut out = Vec::new();
                while Instant::now() < end {
                    while !ring.is_full() {
                        ring.push_request(&done)?;
                    }
                    if ring.push_requests_and_check_notify()? {
                        dev.notify(port)?;
                    }
                    out.clear();
                    ring.take_responses(usize::MAX, &mut out)?;
                    if out.is_empty() && !ring.final_check_for_responses()? {
                        dev.wait_event(Duration::from_millis(100))?;
                    }
                    done += out.len() as u64;
                }
                Ok(done)
            })
        })
        .collect();
    let mut total = 0;
    for t in threads {
        total += t.join().map_err(|_| anyhow::anyhow!("guest thread panicked"))??;
    }
    Ok(total as f64 / duration.as_secs_f64())
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args: Vec<String> = std::env::args().collect();
    let domains: u16 = args.get(1).map(|a| a.parse()).transpose()?.unwrap_or(250);
    let per_domain: u32 = args.get(2).map(|a| a.parse()).transpose()?.unwrap_or(4);

    let sim = Sim::new(Config::default().workers)?;
    let (devices, took) = sim.bring_up(domains, per_domain)?;
    println!(
        "bring-up: {} devices across {} domains connected in {:.2?} ({:.0} devices/s)",
        devices.len(),
        domains,
        took,
        devices.len() as f64 / took.as_secs_f64()
    );
    let eps = watch_events(&sim, &devices, 5)?;
    println!("watch events: {eps:.0} events/s handled by the xenbus thread");
    drop(devices);
    drop(sim);

    for (workers, rings) in [(1, 1), (1, 4), (4, 4)] {
        let rps = requests_per_sec(workers, rings, Duration::from_secs(3))?;
        println!("echo ring: {workers} worker(s), {rings} ring(s): {rps:.0} requests/s");
    }
    Ok(())
}
