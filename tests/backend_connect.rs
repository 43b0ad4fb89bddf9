//! A well-behaved frontend connects and its ring is served.

#[path = "backend_common.rs"]
mod common;

use anyhow::Result;
use common::{check_echo, EchoClient, Harness, KIND};
use xen_bus::XenbusState;
use xen_sim::frontend::ConnectOptions;

#[test]
fn normal_connect_reaches_connected_and_echoes() -> Result<()> {
    let h = Harness::new(2)?;
    let (dev, mut echo) = h.connected_device(1, 0)?;

    assert_eq!(dev.backend_state()?, Some(XenbusState::Connected));
    assert_eq!(dev.read_backend("hotplug-status")?.as_deref(), Some("connected"));
    assert_eq!(dev.read_backend("feature-echo")?.as_deref(), Some("1"));
    assert_eq!(dev.read_backend("error")?, None);
    check_echo(&dev, &mut echo, 1)?;
    check_echo(&dev, &mut echo, 2)?;
    Ok(())
}

#[test]
fn multi_page_ring_with_protocol_node_is_served() -> Result<()> {
    let h = Harness::new(1)?;
    let guest = h.guest(3)?;
    let mut dev = h.device(&guest, 3, 768)?;
    let opts = ConnectOptions { ring_page_order: 2, protocol: Some("x86_64-abi".into()), ..Default::default() };

    dev.connect(&opts)?;
    let mut echo = EchoClient::new(&dev, 0)?;

    assert_eq!(dev.ring(0)?.grefs().len(), 4);
    // More values than a one-page ring holds (4096 - 64) / 8 = 504 -> 256.
    let values: Vec<u64> = (0..3000).collect();
    let got = echo.round_trip(&dev, &values)?;
    assert_eq!(got, values.iter().map(|v| v + 1).collect::<Vec<_>>());
    Ok(())
}

#[test]
fn frontend_skipping_initialised_is_still_connected() -> Result<()> {
    let h = Harness::new(1)?;
    let guest = h.guest(4)?;
    let mut dev = h.device(&guest, 4, 1)?;
    let opts =
        ConnectOptions { misbehave: vec![xen_sim::frontend::Misbehaviour::SkipInitialised], ..Default::default() };

    dev.connect(&opts)?;
    common::wait_backend(&mut dev, XenbusState::Connected)?;
    let mut echo = EchoClient::new(&dev, 0)?;

    check_echo(&dev, &mut echo, 3)?;
    assert_eq!(dev.spec().kind, KIND);
    Ok(())
}

#[test]
fn monitor_lists_every_device_with_its_state_and_rings() -> Result<()> {
    let h = Harness::new(1)?;
    let (_a, _ea) = h.connected_device(5, 2)?;
    let (_b, _eb) = h.connected_device(4, 1)?;
    // The frontends' Connected reached the xenbus thread (its view is what
    // the monitor shows).
    assert!(h.backend.sync(common::WAIT));

    let monitor = h.backend.monitor();
    let devices = monitor.devices(common::WAIT).expect("the xenbus thread answers");

    let keys: Vec<(u16, u32)> = devices.iter().map(|d| (d.key.frontend, d.key.devid)).collect();
    assert_eq!(keys, [(4, 1), (5, 2)], "ordered by key");
    for d in &devices {
        assert_eq!(d.key.kind, KIND);
        assert_eq!(d.state, xen_bus::XenbusState::Connected);
        assert_eq!(d.frontend_state, Some(xen_bus::XenbusState::Connected));
        assert_eq!(d.rings, [None], "one ring, and the echo handler keeps no counters");
        assert!(d.connected_for.is_some() && !d.resumed && !d.failed, "{d:?}");
        assert!(d.details.is_empty(), "the echo type describes nothing: {d:?}");
    }
    assert_eq!(monitor.stats().devices.load(std::sync::atomic::Ordering::Relaxed), 2);
    Ok(())
}

#[test]
fn monitor_shows_a_device_taken_over_from_a_previous_process_as_resumed() -> Result<()> {
    let mut h = Harness::new(1)?;
    let (dev, mut echo) = h.connected_device(6, 0)?;
    h.restart(|| Ok(()))?;

    // Served again: the new backend has resumed it.
    check_echo(&dev, &mut echo, 1)?;
    let devices = h.backend.monitor().devices(common::WAIT).expect("the xenbus thread answers");

    assert_eq!(devices.len(), 1);
    assert!(devices[0].resumed, "{:?}", devices[0]);
    assert_eq!(devices[0].state, xen_bus::XenbusState::Connected);
    Ok(())
}
