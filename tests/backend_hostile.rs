//! Frontends that write garbage, skip steps, vanish or corrupt their ring:
//! the device concerned fails with an `error` node and goes Closed, every
//! other device keeps working and the daemon keeps running.

#[path = "backend_common.rs"]
mod common;

use std::sync::atomic::Ordering;

use anyhow::Result;
use common::{check_echo, wait_failed, Harness};
use xen_bus::XenbusState;
use xen_sim::frontend::{ConnectOptions, Misbehaviour};

/// Connects a bad frontend on dom `domid`, with a good neighbour on dom 1;
/// returns the error node's text once the bad device is Closed.
fn bad_device_fails_alone(misbehave: Misbehaviour, domid: u16) -> Result<String> {
    let h = Harness::new(2)?;
    let (good, mut good_echo) = h.connected_device(1, 0)?;
    let guest = h.guest(domid)?;
    let mut bad = h.device(&guest, domid, 0)?;
    let opts = ConnectOptions { misbehave: vec![misbehave], wait_connected: false, ..Default::default() };

    bad.connect(&opts)?;
    let error = wait_failed(&mut bad)?;

    check_echo(&good, &mut good_echo, 7)?;
    assert_eq!(good.backend_state()?, Some(XenbusState::Connected));
    let linux_error = h.toolstack.linux_error(bad.spec())?;
    assert_eq!(linux_error.as_deref(), Some(error.as_str()));
    assert_eq!(h.backend.stats().failures.load(Ordering::Relaxed), 1);
    Ok(error)
}

#[test]
fn garbage_ring_ref_fails_that_device_only() -> Result<()> {
    let error = bad_device_fails_alone(Misbehaviour::RingRef("abc".into()), 2)?;
    assert!(error.starts_with(&format!("{} ", nix::libc::EINVAL)), "{error}");
    assert!(error.contains("ring-ref"), "{error}");
    Ok(())
}

#[test]
fn ring_page_order_99_fails_that_device_only() -> Result<()> {
    let error = bad_device_fails_alone(Misbehaviour::RingPageOrder(99), 3)?;
    assert!(error.contains("ring-page-order"), "{error}");
    Ok(())
}

#[test]
fn missing_event_channel_fails_that_device_only() -> Result<()> {
    let error = bad_device_fails_alone(Misbehaviour::NoEventChannel, 4)?;
    assert!(error.starts_with(&format!("{} ", nix::libc::ENOENT)), "{error}");
    assert!(error.contains("event-channel"), "{error}");
    Ok(())
}

#[test]
fn unknown_protocol_fails_that_device_only() -> Result<()> {
    let error = bad_device_fails_alone(Misbehaviour::Protocol("sparc-abi".into()), 5)?;
    assert!(error.contains("sparc-abi"), "{error}");
    Ok(())
}

#[test]
fn garbage_frontend_state_fails_that_device_only() -> Result<()> {
    let error = bad_device_fails_alone(Misbehaviour::State("banana".into()), 6)?;
    assert!(error.contains("banana"), "{error}");
    Ok(())
}

#[test]
fn runaway_ring_indices_fail_that_device_only() -> Result<()> {
    let h = Harness::new(2)?;
    let (good, mut good_echo) = h.connected_device(1, 0)?;
    let (mut bad, mut bad_echo) = h.connected_device(2, 0)?;
    check_echo(&bad, &mut bad_echo, 1)?;

    // req_prod (offset 0) far beyond what the ring holds.
    let ring = bad.ring(0)?.mapping();
    let prod = ring.load_u32(0, std::sync::atomic::Ordering::Acquire)?;
    ring.store_u32(0, prod.wrapping_add(100_000), std::sync::atomic::Ordering::Release)?;
    bad.notify(bad.ports()[0])?;
    let error = wait_failed(&mut bad)?;

    assert!(error.starts_with(&format!("{} ", nix::libc::EPROTO)), "{error}");
    check_echo(&good, &mut good_echo, 2)?;
    assert_eq!(h.host.grant_table(2).live_maps()?, 0);
    Ok(())
}

#[test]
fn frontend_vanishing_mid_connect_leaves_others_running() -> Result<()> {
    let h = Harness::new(1)?;
    let (good, mut good_echo) = h.connected_device(1, 0)?;
    let guest = h.guest(2)?;
    let mut bad = h.device(&guest, 2, 0)?;
    let opts = ConnectOptions { misbehave: vec![Misbehaviour::VanishMidConnect], ..Default::default() };

    bad.connect(&opts)?;
    // Its state node is gone: the backend sees Unknown and closes.
    bad.wait_backend_state("Closed", common::WAIT, |s| s == Some(XenbusState::Closed))?;

    check_echo(&good, &mut good_echo, 3)?;
    assert_eq!(h.host.grant_table(2).live_maps()?, 0);
    Ok(())
}

#[test]
fn frontend_flooding_its_state_node_does_not_starve_others() -> Result<()> {
    let h = Harness::new(2)?;
    let (good, mut good_echo) = h.connected_device(1, 0)?;
    let (flooder, _) = h.connected_device(2, 0)?;

    // Reconfiguring/Reconfigured are ignored by the state machine; each
    // write still fires a watch event at the backend.
    for i in 0..5000 {
        flooder.set_state(if i % 2 == 0 { XenbusState::Reconfiguring } else { XenbusState::Reconfigured })?;
    }
    check_echo(&good, &mut good_echo, 4)?;
    flooder.set_state(XenbusState::Connected)?;

    assert_eq!(good.backend_state()?, Some(XenbusState::Connected));
    assert_eq!(flooder.backend_state()?, Some(XenbusState::Connected));
    assert_eq!(h.backend.stats().failures.load(Ordering::Relaxed), 0);
    Ok(())
}

#[test]
fn failed_device_recovers_when_the_frontend_starts_over() -> Result<()> {
    let h = Harness::new(1)?;
    let guest = h.guest(2)?;
    let mut dev = h.device(&guest, 2, 0)?;
    let bad = ConnectOptions { misbehave: vec![Misbehaviour::RingRef("abc".into())], ..Default::default() };
    dev.connect(&ConnectOptions { wait_connected: false, ..bad })?;
    wait_failed(&mut dev)?;

    dev.reinitialise()?;
    common::wait_backend(&mut dev, XenbusState::InitWait)?;
    dev.connect(&ConnectOptions::default())?;
    let mut echo = common::EchoClient::new(&dev, 0)?;

    check_echo(&dev, &mut echo, 8)?;
    assert_eq!(dev.read_backend("error")?, None);
    assert_eq!(h.toolstack.linux_error(dev.spec())?, None);
    Ok(())
}
