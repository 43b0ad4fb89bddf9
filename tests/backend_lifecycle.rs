//! Close, reconnect, removal and fast re-creation of devices.

#[path = "backend_common.rs"]
mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;
use common::{check_echo, wait_backend, EchoClient, Harness, WAIT};
use xen_backend::Config;
use xen_bus::XenbusState;
use xen_sim::frontend::ConnectOptions;
use xs_wire::TxId;

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
    assert_eq!(dev.backend_state()?, Some(XenbusState::Closed));
    assert_eq!(h.host.grant_table(1).live_maps()?, 0);
    dev.reinitialise()?;
    wait_backend(&mut dev, XenbusState::InitWait)?;
    dev.connect(&ConnectOptions::default())?;
    let mut echo = EchoClient::new(&dev, 0)?;

    check_echo(&dev, &mut echo, 2)?;
    assert_eq!(h.backend.stats().connects.load(std::sync::atomic::Ordering::Relaxed), 2);
    Ok(())
}

/// Waits until `path` does not exist.
fn wait_absent(h: &Harness, path: &str) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    while h.toolstack.xenstore().read(TxId::NONE, path).is_ok() {
        anyhow::ensure!(Instant::now() < deadline, "{path} still exists");
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Waits until the framework tracks no device.
fn wait_untracked(h: &Harness) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    while h.backend.stats().devices.load(Ordering::Relaxed) > 0 {
        anyhow::ensure!(Instant::now() < deadline, "device still tracked");
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

#[test]
fn backend_directory_removed_while_connected_tells_the_frontend_then_cleans_up() -> Result<()> {
    let h = Harness::new(1)?;
    let (mut dev, mut echo) = h.connected_device(2, 5)?;
    check_echo(&dev, &mut echo, 1)?;

    h.toolstack.remove_backend(dev.spec())?;
    // Closed in place of the removed directory, readable by the guest (its
    // own connection, its own permissions).
    wait_backend(&mut dev, XenbusState::Closed)?;
    wait_unmapped(&h, 2)?;
    wait_untracked(&h)?;
    let nodes = h.toolstack.xenstore().directory(TxId::NONE, &dev.spec().backend_path())?;
    assert_eq!(nodes, ["state"], "only the state node is written back");

    dev.set_state(XenbusState::Closed)?;
    wait_absent(&h, &dev.spec().backend_path())?;
    assert_eq!(h.backend.stats().departures.load(Ordering::Relaxed), 1);
    // The frontend-domain directory was not removed, so it stays.
    assert!(h.toolstack.xenstore().read(TxId::NONE, "/local/domain/0/backend/echo/2").is_ok());
    Ok(())
}

#[test]
fn removed_backend_of_a_frontend_that_never_closes_is_cleaned_after_the_timeout() -> Result<()> {
    let config = Config { workers: 1, departure_timeout: Duration::from_millis(300), ..Config::default() };
    let h = Harness::with_config(config, xs_wire::client::DEFAULT_WATCH_QUEUE)?;
    let (mut dev, _echo) = h.connected_device(3, 0)?;

    // The toolstack removes the whole domain directory.
    h.toolstack.xenstore().rm(TxId::NONE, "/local/domain/0/backend/echo/3")?;
    wait_backend(&mut dev, XenbusState::Closed)?;
    // The frontend stays Connected; the stray node and the re-created
    // domain directory go after the timeout.
    wait_absent(&h, "/local/domain/0/backend/echo/3")?;
    assert_eq!(dev.read("state")?.as_deref(), Some("4"));
    wait_untracked(&h)?;
    Ok(())
}

#[test]
fn directory_recreated_while_the_frontend_closes_is_left_to_the_new_device() -> Result<()> {
    let config = Config { workers: 1, departure_timeout: Duration::from_millis(300), ..Config::default() };
    let h = Harness::with_config(config, xs_wire::client::DEFAULT_WATCH_QUEUE)?;
    let guest = h.guest(4)?;
    let mut old = h.device(&guest, 4, 1)?;
    old.connect(&ConnectOptions::default())?;

    h.toolstack.remove_backend(old.spec())?;
    wait_backend(&mut old, XenbusState::Closed)?;
    // The guest's driver starts over on a connection of its own.
    let guest = xs_wire::Client::from_stream(h.xenstored.connect_as(4)?)?;
    let mut dev = h.device(&guest, 4, 1)?;
    dev.connect(&ConnectOptions::default())?;
    let mut echo = EchoClient::new(&dev, 0)?;
    check_echo(&dev, &mut echo, 3)?;

    // Past the departure timeout the new device's directory is untouched.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(dev.backend_state()?, Some(XenbusState::Connected));
    check_echo(&dev, &mut echo, 4)?;
    Ok(())
}

#[test]
fn removal_of_both_directories_leaves_nothing_behind() -> Result<()> {
    let h = Harness::new(1)?;
    let (dev, _echo) = h.connected_device(5, 2)?;

    h.toolstack.remove(dev.spec())?;
    wait_unmapped(&h, 5)?;
    wait_absent(&h, &dev.spec().backend_path())?;
    wait_untracked(&h)?;
    Ok(())
}

#[test]
fn restarted_backend_resumes_connected_devices_without_the_guest_noticing() -> Result<()> {
    let mut h = Harness::new(2)?;
    let (dev, mut echo) = h.connected_device(6, 0)?;
    check_echo(&dev, &mut echo, 1)?;
    let connects_before = h.backend.stats().connects.load(Ordering::Relaxed);
    assert_eq!(connects_before, 1);

    let grants = h.host.grant_table(6);
    h.restart(|| {
        // No backend: the ring is unmapped, the state still Connected, and
        // the guest's requests (and its notification) wait in the ring.
        anyhow::ensure!(grants.live_maps()? == 0, "ring still mapped after detach");
        anyhow::ensure!(dev.backend_state()? == Some(XenbusState::Connected), "state changed on detach");
        echo.send(&dev, &[10, 20, 30])
    })?;

    assert_eq!(echo.receive(&dev, 3)?, [11, 21, 31]);
    check_echo(&dev, &mut echo, 2)?;
    assert_eq!(dev.backend_state()?, Some(XenbusState::Connected));
    assert_eq!(h.backend.stats().resumes.load(Ordering::Relaxed), 1);
    assert_eq!(dev.read_backend("error")?, None);
    Ok(())
}

#[test]
fn restart_resumes_only_connected_devices_and_a_later_close_works() -> Result<()> {
    let mut h = Harness::new(1)?;
    let (mut connected, mut echo) = h.connected_device(7, 0)?;
    let guest = h.guest(8)?;
    let mut waiting = h.device(&guest, 8, 0)?;
    wait_backend(&mut waiting, XenbusState::InitWait)?;

    h.restart(|| Ok(()))?;
    // The one never connected goes through the handshake again.
    wait_backend(&mut waiting, XenbusState::InitWait)?;
    waiting.connect(&ConnectOptions::default())?;
    let mut echo_waiting = EchoClient::new(&waiting, 0)?;
    check_echo(&waiting, &mut echo_waiting, 3)?;
    check_echo(&connected, &mut echo, 4)?;
    assert_eq!(h.backend.stats().resumes.load(Ordering::Relaxed), 1);

    connected.close(WAIT)?;
    assert_eq!(connected.backend_state()?, Some(XenbusState::Closed));
    assert_eq!(h.host.grant_table(7).live_maps()?, 0);
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
    assert_eq!(b.backend_state()?, Some(XenbusState::Connected));
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
    wait_backend(&mut dev, XenbusState::Connected)?;
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

    assert_eq!(a.backend_state()?, Some(XenbusState::Closed));
    assert_eq!(b.backend_state()?, Some(XenbusState::Closed));
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
        wait_backend(dev, XenbusState::Connected)?;
    }
    let mut echo = EchoClient::new(&devices[39], 0)?;

    check_echo(&devices[39], &mut echo, 6)?;
    println!("rescans: {}", h.backend.stats().rescans.load(std::sync::atomic::Ordering::Relaxed));
    Ok(())
}
