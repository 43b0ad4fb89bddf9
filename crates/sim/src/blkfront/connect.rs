//! Connecting a [`Blkfront`] through xenbus as Linux's blkfront does, on the
//! generic simulated frontend ([`FrontendDevice`]): `talk_to_blkback` (read
//! what the backend offers at InitWait, set up the rings, write the nodes in
//! one transaction, Initialised), then `blkfront_connect` (read the disk's
//! nodes at Connected, go Connected).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use xs_wire::{Client, TxId, WatchEvent, XsErrno};

use blkif::abi::BLKIF_MAX_SEGMENTS_PER_REQUEST;
use gnttab::PAGE_SIZE;

use super::{Blkfront, BlkfrontError, BlkfrontOptions};
use xen_bus::XenbusState;

use crate::frontend::{DeviceSpec, FrontendDevice, FrontendError};
use crate::host::SimHost;

/// What the backend says about the disk at Connected (`blkfront_connect`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskInfo {
    /// `sectors` (512-byte units).
    pub sectors: u64,
    /// `sector-size`.
    pub sector_size: u32,
    /// `physical-sector-size` (`sector-size` when absent).
    pub physical_sector_size: u32,
    /// `info` (`VDISK_*` bits).
    pub info: u32,
    /// `feature-flush-cache`.
    pub flush: bool,
    /// `feature-barrier`.
    pub barrier: bool,
    /// `feature-discard`.
    pub discard: bool,
    /// `discard-granularity`.
    pub discard_granularity: u32,
    /// `feature-max-indirect-segments`.
    pub max_indirect_segments: u32,
}

fn number<T: std::str::FromStr>(dev: &FrontendDevice, node: &str) -> Result<Option<T>, BlkfrontError> {
    Ok(dev.read_backend(node)?.and_then(|v| v.trim().parse().ok()))
}

impl Blkfront {
    /// Connects a frontend for `dev` (whose directories the toolstack
    /// created) with at most what `wanted` asks: queues, ring order and
    /// request size are cut to what the backend offers, as Linux does.
    pub fn connect(
        host: &Arc<SimHost>,
        dev: &mut FrontendDevice,
        wanted: BlkfrontOptions,
        timeout: Duration,
    ) -> Result<(Blkfront, DiskInfo), BlkfrontError> {
        dev.wait_backend_state("InitWait", timeout, |s| {
            matches!(s, Some(XenbusState::InitWait | XenbusState::Initialised | XenbusState::Connected))
        })?;
        let mut options = wanted;
        options.ring_page_order = options.ring_page_order.min(number(dev, "max-ring-page-order")?.unwrap_or(0));
        options.queues = options.queues.min(number(dev, "multi-queue-max-queues")?.unwrap_or(1)).max(1);
        let max_indirect: usize = number(dev, "feature-max-indirect-segments")?.unwrap_or(0);
        let max_pages = if options.indirect && max_indirect > BLKIF_MAX_SEGMENTS_PER_REQUEST {
            max_indirect
        } else {
            BLKIF_MAX_SEGMENTS_PER_REQUEST
        };
        options.max_request_bytes = options.max_request_bytes.min(max_pages * PAGE_SIZE);
        let spec = dev.spec().clone();
        let front = Blkfront::new(host, spec.frontend, spec.backend, options)?;
        let dir = spec.frontend_path();
        let xs = dev.xenstore().clone();
        xs.transaction(|tx| {
            for (node, value) in front.nodes() {
                xs.write(tx, &format!("{dir}/{node}"), value.as_bytes())?;
            }
            Ok(())
        })?;
        dev.set_state(XenbusState::Initialised)?;
        dev.wait_backend_state("Connected", timeout, |s| s == Some(XenbusState::Connected))?;
        let sector_size = number(dev, "sector-size")?.unwrap_or(512);
        let flag = |node: &str| -> Result<bool, BlkfrontError> { Ok(number::<u32>(dev, node)?.unwrap_or(0) != 0) };
        let info = DiskInfo {
            sectors: number(dev, "sectors")?.unwrap_or(0),
            sector_size,
            physical_sector_size: number(dev, "physical-sector-size")?.unwrap_or(sector_size),
            info: number(dev, "info")?.unwrap_or(0),
            flush: flag("feature-flush-cache")?,
            barrier: flag("feature-barrier")?,
            discard: flag("feature-discard")?,
            discard_granularity: number(dev, "discard-granularity")?.unwrap_or(0),
            max_indirect_segments: max_indirect as u32,
        };
        dev.set_state(XenbusState::Connected)?;
        Ok((front, info))
    }
}

/// What Linux's blkfront does when the backend writes `state` = Connected
/// again while connected (`blkback_changed` calls `blkfront_connect`: "the
/// back-end may be signalling a capacity change"): `sectors` is read again
/// and becomes the disk's capacity. A watch of the backend's `state` on a
/// connection of its own, so that only its events count.
pub struct CapacityWatch {
    xs: Client,
    token: String,
    state: String,
    sectors: String,
    events: Receiver<WatchEvent>,
}

impl CapacityWatch {
    /// Watches `spec`'s backend on `xs` (a guest's connection), past the
    /// event xenstored fires as a watch is set.
    pub fn new(xs: Client, spec: &DeviceSpec, timeout: Duration) -> Result<CapacityWatch, BlkfrontError> {
        let backend = spec.backend_path();
        let token = format!("sim-capacity:{backend}");
        let (state, sectors) = (format!("{backend}/state"), format!("{backend}/sectors"));
        let events = xs.events();
        xs.watch(&state, &token)?;
        let watch = CapacityWatch { xs, token, state, sectors, events };
        watch.next_event(Instant::now() + timeout, "the watch's first event")?;
        Ok(watch)
    }

    fn next_event(&self, deadline: Instant, what: &str) -> Result<(), BlkfrontError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(ev) if ev.token == self.token => return Ok(()),
                Ok(_) => {}
                Err(_) => {
                    let state = self.read(&self.state)?.and_then(|s| XenbusState::parse(s.as_bytes()));
                    return Err(FrontendError::Timeout { waiting_for: what.to_string(), state }.into());
                }
            }
        }
    }

    fn read(&self, path: &str) -> Result<Option<String>, BlkfrontError> {
        match self.xs.read(TxId::NONE, path) {
            Ok(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
            Err(e) if e.errno() == Some(XsErrno::ENOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits for `state` events; at each that reads Connected, reads
    /// `sectors`, and returns it once `done` holds for it.
    pub fn wait(&self, timeout: Duration, done: impl Fn(u64) -> bool) -> Result<u64, BlkfrontError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.next_event(deadline, "a capacity change")?;
            if self.read(&self.state)?.and_then(|s| XenbusState::parse(s.as_bytes())) != Some(XenbusState::Connected) {
                continue;
            }
            if let Some(sectors) = self.read(&self.sectors)?.and_then(|s| s.trim().parse().ok()) {
                if done(sectors) {
                    return Ok(sectors);
                }
            }
        }
    }
}

impl Drop for CapacityWatch {
    fn drop(&mut self) {
        let _ = self.xs.unwatch(&self.state, &self.token);
    }
}
