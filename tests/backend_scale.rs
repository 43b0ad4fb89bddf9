//! Many devices across many guests brought up at once.

#[path = "backend_common.rs"]
mod common;

use std::time::Instant;

use anyhow::Result;
use common::{check_echo, EchoClient, Harness, WAIT};
use xen_bus::XenbusState;
use xen_sim::frontend::ConnectOptions;

/// 1,000 devices over 250 guests (a few seconds in debug builds).
const DOMAINS: u16 = 250;
const PER_DOMAIN: u32 = 4;

#[test]
fn many_devices_across_many_domains_all_connect_and_echo() -> Result<()> {
    let h = Harness::new(2)?;
    let start = Instant::now();
    let opts = ConnectOptions { wait_init_wait: false, wait_connected: false, ..Default::default() };
    let mut devices = Vec::new();
    for domid in 1..=DOMAINS {
        let guest = h.guest(domid)?;
        for devid in 0..PER_DOMAIN {
            let mut dev = h.device(&guest, domid, devid)?;
            dev.connect(&opts)?;
            devices.push(dev);
        }
    }
    for dev in &mut devices {
        dev.wait_backend_state("Connected", WAIT, |s| s == Some(XenbusState::Connected))?;
    }
    let elapsed = start.elapsed();
    println!("{} devices across {} domains connected in {:?}", devices.len(), DOMAINS, elapsed);

    for (i, dev) in devices.iter().enumerate().step_by(37) {
        let mut echo = EchoClient::new(dev, 0)?;
        check_echo(dev, &mut echo, i as u64)?;
    }
    assert_eq!(
        h.backend.stats().connects.load(std::sync::atomic::Ordering::Relaxed),
        u64::from(DOMAINS) * u64::from(PER_DOMAIN)
    );
    Ok(())
}
