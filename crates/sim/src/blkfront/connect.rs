//! Connecting a [`Blkfront`] through xenbus as Linux's blkfront does, on the
//! generic simulated frontend ([`FrontendDevice`]): `talk_to_blkback` (read
//! what the backend offers at InitWait, set up the rings, write the nodes in
//! one transaction, Initialised), then `blkfront_connect` (read the disk's
//! nodes at Connected, go Connected).

use std::sync::Arc;
use std::time::Duration;

use blkif::abi::BLKIF_MAX_SEGMENTS_PER_REQUEST;
use gnttab::PAGE_SIZE;

use super::{Blkfront, BlkfrontError, BlkfrontOptions};
use xen_bus::XenbusState;

use crate::frontend::FrontendDevice;
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
