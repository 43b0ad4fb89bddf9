//! Close, reconnect, removal and fast re-creation of devices.

#[path = "backend_common.rs"]
mod common;

use std::time::Duration;

use anyhow::Result;
use common::{check_echo, wait_backend, EchoClient, Harness, WAIT};
use xen_sim::frontend::{state, ConnectOptions};

/// Waits until no grant of `domid` is mapped by the backend.
fn wait_unmapped(h: &Harness, domid: u16) -> Result<()> {
    let grants = h.host.grant_table(domid);
    let deadline = std::time::Instant::now() + WAIT;
    while grants.live_maps()? > 0 {
        anyhow::ensure!(std::time::Instant::now() < deadline, "grants of dom{domid} still mapped");
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

#[test]
fn frontend_close_then_reconnect_serves_again() -> Result<()> {
    let h = Harness::new(2)?;
    let (mut dev, mut echo) = h.connected_device(1, 0)?;
    check_echo(&dev, &mut echo, 1)?;

    dev.close(WAIT)?;
    assert_eq!(dev.backend_state()?, Some(state::CLOSED));
    assert_eq!(h.host.grant_table(1).live_maps()?, 0);
    dev.reinitialise()?;
    wait_backend(&mut dev, state::INIT_WAIT)?;
    dev.connect(&ConnectOptions::default())?;
    let mut echo = EchoClient::new(&dev, 0)?;

    check_echo(&dev, &mut echo, 2)?;
    assert_eq!(h.backend.stats().connects.load(std::sync::atomic::Ordering::Relaxed), 2);
    Ok(())
}

#[test]
fn backend_directory_removed_while_connected_unmaps_and_forgets() -> Result<()> {
    let h = Harness::new(1)?;
    let (dev, mut echo) = h.connected_device(2, 5)?;
    check_echo(&dev, &mut echo, 1)?;

    h.toolstack.remove_backend(dev.spec())?;
    wait_unmapped(&h, 2)?;
    let deadline = std::time::Instant::now() + WAIT;
    while h.backend.stats().devices.load(std::sync::atomic::Ordering::Relaxed) > 0 {
        anyhow::ensure!(std::time::Instant::now() < deadline, "device still tracked");
        std::thread::sleep(Duration::from_millis(10));
    }

    // Nothing re-created the directory behind the toolstack's back.
    assert_eq!(h.toolstack.backend_state(dev.spec())?, None);
    Ok(())
}

#[test]
fn fast_remove_and_recreate_ends_with_one_working_device() -> Result<()> {
    let h = Harness::new(2)?;
    let guest = h.guest(3)?;
    for _ in 0..20 {
        let dev = h.device(&guest, 3, 7)?;
        h.toolstack.remove(dev.spec())?;
    }

    let mut dev = h.device(&guest, 3, 7)?;
    dev.connect(&ConnectOptions::default())?;
    let mut echo = EchoClient::new(&dev, 0)?;

    check_echo(&dev, &mut echo, 9)?;
    assert_eq!(dev.read_backend("error")?, None);
    Ok(())
}

#[test]
fn removal_of_one_device_leaves_its_neighbour_connected() -> Result<()> {
    let h = Harness::new(2)?;
    let guest = h.guest(4)?;
    let mut a = h.device(&guest, 4, 1)?;
    let mut b = h.device(&guest, 4, 2)?;
    a.connect(&ConnectOptions::default())?;
    b.connect(&ConnectOptions::default())?;
    let mut echo_b = EchoClient::new(&b, 0)?;

    h.toolstack.remove(a.spec())?;
    let grants = h.host.grant_table(4);
    let deadline = std::time::Instant::now() + WAIT;
    while grants.map_count(a.ring(0)?.grefs()[0])? != Some(0) {
        anyhow::ensure!(std::time::Instant::now() < deadline, "ring of the removed device still mapped");
        std::thread::sleep(Duration::from_millis(10));
    }

    check_echo(&b, &mut echo_b, 4)?;
    assert_eq!(b.backend_state()?, Some(state::CONNECTED));
    Ok(())
}

#[test]
fn online_written_late_still_connects_a_waiting_frontend() -> Result<()> {
    let h = Harness::new(1)?;
    let guest = h.guest(5)?;
    let mut spec = xen_sim::frontend::DeviceSpec::new(common::KIND, 0, 5, 0);
    spec.backend_nodes.push(("online".into(), "0".into()));
    h.toolstack.create(&spec)?;
    let mut dev = xen_sim::frontend::FrontendDevice::new(&h.host, guest, spec);
    let opts = ConnectOptions { wait_init_wait: false, wait_connected: false, ..Default::default() };
    dev.connect(&opts)?;

    h.toolstack.write_backend(dev.spec(), "online", "1")?;
    wait_backend(&mut dev, state::CONNECTED)?;
    let mut echo = EchoClient::new(&dev, 0)?;

    check_echo(&dev, &mut echo, 5)?;
    Ok(())
}

#[test]
fn shutdown_closes_every_device_and_unmaps_its_rings() -> Result<()> {
    let mut h = Harness::new(2)?;
    let (a, _) = h.connected_device(1, 0)?;
    let (b, _) = h.connected_device(2, 0)?;

    h.backend.shutdown();

    assert_eq!(a.backend_state()?, Some(state::CLOSED));
    assert_eq!(b.backend_state()?, Some(state::CLOSED));
    assert_eq!(h.host.grant_table(1).live_maps()?, 0);
    assert_eq!(h.host.grant_table(2).live_maps()?, 0);
    Ok(())
}

#[test]
fn watch_queue_overflow_is_recovered_by_rescanning() -> Result<()> {
    // A backend connection that holds 4 watch events: creating 40 devices
    // at once overflows it; the overflow marker makes the backend rescan.
    let h = Harness::with_watch_queue(2, 4)?;
    let guest = h.guest(6)?;
    let opts = ConnectOptions { wait_init_wait: false, wait_connected: false, ..Default::default() };
    let mut devices = Vec::new();
    for devid in 0..40 {
        let mut dev = h.device(&guest, 6, devid)?;
        dev.connect(&opts)?;
        devices.push(dev);
    }

    for dev in &mut devices {
        wait_backend(dev, state::CONNECTED)?;
    }
    let mut echo = EchoClient::new(&devices[39], 0)?;

    check_echo(&devices[39], &mut echo, 6)?;
    println!("rescans: {}", h.backend.stats().rescans.load(std::sync::atomic::Ordering::Relaxed));
    Ok(())
}
