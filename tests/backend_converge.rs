//! The state machine converges whatever frontend states it misses. A
//! frontend writes random state sequences as fast as it can: the framework
//! coalesces their watch events, so the backend sees some subsequence that
//! ends in the last value. Once the frontend settles, the backend must be
//! where that last state says (Linux's blkback `frontend_changed` is the
//! reference): Connected with I/O working, InitWait, Closing or Closed with
//! nothing of the guest mapped. A bystander keeps being served.
//!
//! `XENBACKD_SEED` picks the sequences (printed on failure), and
//! `XENBACKD_CONVERGE_ROUNDS` their number.

#[path = "backend_common.rs"]
mod common;

use std::sync::atomic::Ordering;

use anyhow::{bail, ensure, Context, Result};
use common::{check_echo, EchoClient, Harness, WAIT};
use xen_bus::XenbusState;
use xen_sim::frontend::FrontendDevice;
use xs_wire::TxId;

use xen_sim::rng::Rng;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A frontend state to write; `None` removes the node (Unknown).
type FrontendState = Option<XenbusState>;

/// States a frontend may write, Unknown (node removed) the rarest.
fn random_state(rng: &mut Rng) -> FrontendState {
    match rng.below(21) {
        0..=3 => Some(XenbusState::Initialising),
        4..=8 => Some(XenbusState::Initialised),
        9..=12 => Some(XenbusState::Connected),
        13..=16 => Some(XenbusState::Closing),
        17..=19 => Some(XenbusState::Closed),
        _ => None,
    }
}

/// The echo frontend of the test: its ring is set up before its first
/// Initialised or Connected and kept for the whole sequence, as the
/// frontends that cycle fastest do; it is released once the backend has let
/// go of it.
struct Flapper {
    dev: FrontendDevice,
    has_ring: bool,
}

impl Flapper {
    fn write(&mut self, s: FrontendState, ring_page_order: u32) -> Result<()> {
        match s {
            Some(s @ (XenbusState::Initialised | XenbusState::Connected)) => {
                if !self.has_ring {
                    let ring = self.dev.grant_ring(ring_page_order)?;
                    let port = self.dev.offer_event_channel()?;
                    self.dev.publish_ring("", ring)?;
                    self.dev.write("event-channel", port.0)?;
                    self.has_ring = true;
                }
                self.dev.set_state(s)?;
            }
            Some(s) => self.dev.set_state(s)?,
            None => {
                let path = format!("{}/state", self.dev.spec().frontend_path());
                self.dev.xenstore().rm(TxId::NONE, &path)?;
            }
        }
        Ok(())
    }

    /// Revokes the ring and closes the port (the backend must have unmapped
    /// the ring) and removes their nodes.
    fn release(&mut self) -> Result<()> {
        self.dev.release()?;
        for node in ["ring-ref", "ring-page-order", "event-channel"] {
            let path = format!("{}/{node}", self.dev.spec().frontend_path());
            match self.dev.xenstore().rm(TxId::NONE, &path) {
                Err(e) if e.errno() == Some(xs_wire::XsErrno::ENOENT) => {}
                r => r?,
            }
        }
        self.has_ring = false;
        Ok(())
    }
}

/// Where the backend must be once the frontend settled on `last`.
fn settled(last: FrontendState) -> XenbusState {
    match last {
        Some(XenbusState::Initialising) => XenbusState::InitWait,
        Some(XenbusState::Initialised | XenbusState::Connected) => XenbusState::Connected,
        Some(XenbusState::Closing) => XenbusState::Closing,
        _ => XenbusState::Closed,
    }
}

fn show(s: FrontendState) -> String {
    s.map_or("gone".into(), |s| s.to_string())
}

/// One sequence, then the checks. Leaves the frontend with no ring.
/// Returns the backend state it settled on.
fn round(h: &Harness, f: &mut Flapper, rng: &mut Rng, round: u64) -> Result<XenbusState> {
    let len = 1 + rng.below(12);
    let order = rng.below(3) as u32;
    let seq: Vec<FrontendState> = (0..len).map(|_| random_state(rng)).collect();
    let text = seq.iter().map(|s| show(*s)).collect::<Vec<_>>().join(",");
    for s in &seq {
        f.write(*s, order)?;
        // Now and then let the backend catch up, so that every kind of
        // subsequence happens, the full one included.
        if rng.below(4) == 0 {
            std::thread::yield_now();
        }
    }
    // Every event of those writes is handled once sync returns: the state
    // the backend has now is its final one.
    ensure!(h.backend.sync(WAIT), "backend did not sync");
    let last = *seq.last().expect("len >= 1");
    let want = settled(last);
    let got = f.dev.backend_state()?;
    ensure!(got == Some(want), "round {round} [{text}]: backend {got:?}, want {want}");
    ensure!(f.dev.read_backend("error")?.is_none(), "round {round} [{text}]: device failed");
    let maps = h.host.grant_table(f.dev.spec().frontend).live_maps()?;
    if want == XenbusState::Connected {
        ensure!(maps > 0, "round {round} [{text}]: Connected with nothing mapped");
        if last == Some(XenbusState::Initialised) {
            // As Linux's blkfront: Connected once the backend is.
            f.dev.set_state(XenbusState::Connected)?;
            ensure!(h.backend.sync(WAIT), "backend did not sync");
            ensure!(f.dev.backend_state()? == Some(XenbusState::Connected), "round {round} [{text}]: left Connected");
        }
        let mut echo = EchoClient::new(&f.dev, 0)?;
        check_echo(&f.dev, &mut echo, round).with_context(|| format!("round {round} [{text}]"))?;
        f.dev.close(WAIT)?;
    } else {
        ensure!(maps == 0, "round {round} [{text}]: backend {want} with {maps} page(s) still mapped");
    }
    f.release().with_context(|| format!("round {round} [{text}]: release"))?;
    Ok(want)
}

#[test]
fn backend_ends_where_the_frontends_last_state_says_whatever_it_missed() -> Result<()> {
    let seed = env_number("XENBACKD_SEED", 0x5eed_0018);
    let rounds = env_number("XENBACKD_CONVERGE_ROUNDS", 1000);
    eprintln!("seed {seed:#x}, {rounds} sequences (XENBACKD_SEED, XENBACKD_CONVERGE_ROUNDS)");
    let mut rng = Rng::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let h = Harness::new(2)?;
    let (bystander, mut bystander_echo) = h.connected_device(1, 0)?;
    let guest = h.guest(2)?;
    let mut f = Flapper { dev: h.device(&guest, 2, 0)?, has_ring: false };
    f.dev.wait_backend_state("InitWait", WAIT, |s| s == Some(XenbusState::InitWait))?;
    let mut ends = [0u64; 7];
    for r in 0..rounds {
        let end = round(&h, &mut f, &mut rng, r).with_context(|| format!("seed {seed:#x}"))?;
        ends[end as usize] += 1;
        if r % 100 == 0 {
            check_echo(&bystander, &mut bystander_echo, r)?;
        }
    }
    check_echo(&bystander, &mut bystander_echo, rounds)?;
    eprintln!(
        "{rounds} sequences ended: {} Connected (I/O checked), {} InitWait, {} Closing, {} Closed",
        ends[4], ends[2], ends[5], ends[6]
    );
    if ends[4] == 0 || ends[6] == 0 {
        bail!("the sequences never ended Connected or never Closed: the test checked too little");
    }
    assert_eq!(h.backend.stats().failures.load(Ordering::Relaxed), 0);
    Ok(())
}
