//! Several backend processes on one `backend/<type>` directory, as on a
//! host where `xenbackd serve` runs and libxl starts one device model per
//! guest: `Config::frontends` gives each device to exactly one of them.

#[path = "backend_common.rs"]
mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Result;
use common::{check_echo, EchoClient, Harness, KIND, WAIT};
use xen_backend::echo::EchoType;
use xen_backend::{Backend, Config, Frontends, Platform};
use xen_bus::XenbusState;
use xen_sim::frontend::ConnectOptions;
use xs_wire::Client;

/// Another backend process in dom0, on a connection of its own.
fn second_backend(h: &Harness, frontends: Frontends) -> Result<Backend> {
    let client = Client::from_stream(h.xenstored.connect_as(0)?)?;
    let config = Config { workers: 1, frontends, ..Config::default() };
    Ok(Backend::start(
        Platform::new(0, client, h.host.evtchn_opener(0), h.host.grant_mapper(0)),
        vec![EchoType::new(KIND) as _],
        config,
    )?)
}

#[test]
fn per_guest_backends_each_serve_only_their_domain() -> Result<()> {
    let h = Harness::with_config(Config { workers: 1, frontends: Frontends::Only(1), ..Config::default() }, 1024)?;
    let other = second_backend(&h, Frontends::Only(2))?;

    let (dev1, mut echo1) = h.connected_device(1, 0)?;
    let (dev2, mut echo2) = h.connected_device(2, 0)?;

    check_echo(&dev1, &mut echo1, 1)?;
    check_echo(&dev2, &mut echo2, 2)?;
    assert_eq!(h.backend.stats().devices.load(Ordering::Relaxed), 1, "the domain-1 backend knows one device");
    assert_eq!(other.stats().devices.load(Ordering::Relaxed), 1, "the domain-2 backend knows one device");
    assert_eq!(h.backend.stats().connects.load(Ordering::Relaxed), 1);
    assert_eq!(other.stats().connects.load(Ordering::Relaxed), 1);
    Ok(())
}

#[test]
fn filtered_device_is_left_untouched_for_its_own_backend() -> Result<()> {
    // The host daemon leaves device 5 of domain 3 to a per-guest process.
    let filter: xen_backend::DeviceFilter = Arc::new(|_xs, key, dir| {
        assert!(dir.ends_with(&format!("/backend/{KIND}/{}/{}", key.frontend, key.devid)), "{dir}");
        key.devid != 5
    });
    let h =
        Harness::with_config(Config { workers: 1, frontends: Frontends::Filter(filter), ..Config::default() }, 1024)?;
    let guest = h.guest(3)?;
    let mut ours = h.device(&guest, 3, 6)?;
    let mut theirs = h.device(&guest, 3, 5)?;

    ours.connect(&ConnectOptions::default())?;
    let mut echo = EchoClient::new(&ours, 0)?;
    check_echo(&ours, &mut echo, 6)?;
    // Device 5 was created before device 6 connected; the daemon wrote nothing for it.
    assert_eq!(theirs.backend_state()?, Some(XenbusState::Initialising));
    assert_eq!(theirs.read_backend("feature-echo")?, None);
    assert_eq!(h.backend.stats().devices.load(Ordering::Relaxed), 1);

    // The process it was left to (here: one that takes exactly what the
    // daemon refused) serves it; device 6 stays the daemon's alone.
    let complement: xen_backend::DeviceFilter = Arc::new(|_xs, key, _dir| key.devid == 5);
    let guest_model = second_backend(&h, Frontends::Filter(complement))?;
    theirs.wait_backend_state("InitWait", WAIT, |s| s == Some(XenbusState::InitWait))?;
    theirs.connect(&ConnectOptions::default())?;
    let mut echo5 = EchoClient::new(&theirs, 0)?;
    check_echo(&theirs, &mut echo5, 5)?;
    check_echo(&ours, &mut echo, 7)?;
    assert_eq!(guest_model.stats().devices.load(Ordering::Relaxed), 1);
    assert_eq!(h.backend.stats().devices.load(Ordering::Relaxed), 1);
    Ok(())
}
