//! A well-behaved frontend connects and its ring is served.

#[path = "backend_common.rs"]
mod common;

use anyhow::Result;
use common::{check_echo, EchoClient, Harness, KIND};
use xen_sim::frontend::{state, ConnectOptions};

#[test]
fn normal_connect_reaches_connected_and_echoes() -> Result<()> {
    let h = Harness::new(2)?;
    let (dev, mut echo) = h.connected_device(1, 0)?;

    assert_eq!(dev.backend_state()?, Some(state::CONNECTED));
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
    common::wait_backend(&mut dev, state::CONNECTED)?;
    let mut echo = EchoClient::new(&dev, 0)?;

    check_echo(&dev, &mut echo, 3)?;
    assert_eq!(dev.spec().kind, KIND);
    Ok(())
}
