//! The block device type on the backend framework: `qdisk` (xl's
//! `backendtype=qdisk`) and `vbd` are the same device under two names.
//!
//! - `init` (before InitWait): reads `params`/`format`/`mode`/`device-type`,
//!   opens the disk as raw or qcow2 (a bad value, another format or an
//!   unopenable image is fatal: the framework writes the `error` node), and
//!   writes what blkfront
//!   reads in `talk_to_blkback`: `feature-max-indirect-segments`,
//!   `max-ring-page-order`, `multi-queue-max-queues`.
//! - `connect` (frontend Initialised): reads the frontend's rings, ports and
//!   `protocol` by [`FrontendConfig::read`], maps each queue's ring, binds
//!   its port, and writes what blkfront reads in `blkfront_connect`
//!   (`sectors`, `info`, `sector-size`, features); one [`RingSetup`] per
//!   queue, so each queue runs on a worker of its own choosing.
//! - Persistent grants are not offered: data moves by grant copy
//!   (`docs/blkback.md`).

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use xen_backend::{
    Device, DeviceCtx, DeviceError, DeviceType, Drained, NodeReader, Progress, RingCounters, RingHandler, RingSetup,
    RingStats,
};

use crate::buffer::{BufferBudget, QueueBudget};
use crate::config::{connect_nodes, disk_limits, DiskConfig, FrontendConfig, Medium, Offer};
use crate::connection::RingQueue;
use crate::engine::{IoEngine, ThreadPoolEngine};
use crate::format::{DiskImage, OpenImage};
use crate::lock::{LockKind, Locking};
#[cfg(doc)]
use crate::mapped::DEFAULT_PERSISTENT_GRANTS;
use crate::media::Drive;
use crate::qcow2_engine::Qcow2UringEngine;
use crate::queue::{QueueExecutor, DEFAULT_QUEUE_BUFFER_BYTES};
use crate::uring::IoUringEngine;

/// Which I/O engine serves the queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineChoice {
    /// io_uring where the kernel allows it, else the thread pool (decided
    /// once, when the device type is made, with a log line).
    Auto,
    /// io_uring, driven by the ring worker: no thread per request.
    IoUring,
    /// Blocking I/O on `io_threads` threads per queue.
    Threads,
}

impl core::str::FromStr for EngineChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(EngineChoice::Auto),
            "io-uring" | "io_uring" => Ok(EngineChoice::IoUring),
            "threads" => Ok(EngineChoice::Threads),
            _ => Err(format!("unknown I/O engine {s:?} (auto, io-uring or threads)")),
        }
    }
}

/// Options of the block device type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkOptions {
    /// What is offered to frontends.
    pub offer: Offer,
    /// I/O threads per queue (thread-pool engine).
    pub io_threads: usize,
    /// Open disks with `O_DIRECT` where the file system allows it.
    pub direct: bool,
    /// The I/O engine: [`EngineChoice::Auto`] by default (io_uring where
    /// the kernel allows it; docs/blkback.md has the measurements).
    pub engine: EngineChoice,
    /// Bytes of bounce buffers one queue may hold, in flight and spare
    /// ([`DEFAULT_QUEUE_BUFFER_BYTES`], 4 MiB; at least 1 MiB, the largest
    /// request). Requests beyond wait in the guest's ring.
    pub queue_buffer_bytes: usize,
    /// Bytes of bounce buffers all queues of the device type together may
    /// hold ([`DEFAULT_BUFFER_BYTES`], 64 MiB), unless the type is made
    /// with a shared [`BufferBudget`] ([`BlkDeviceType::with_budget`]).
    pub buffer_bytes: usize,
    /// Whether images are locked as QEMU locks them ([`Locking::Auto`] by
    /// default: OFD locks where the kernel has them; docs/blkback.md,
    /// Image locking, says why).
    pub locking: Locking,
    /// Guest pages kept mapped per queue where a frontend negotiates
    /// `feature-persistent`; 0 (the default) offers no persistent grants:
    /// every byte is grant-copied, which the lab measured as fast or faster
    /// (docs/blkback.md). [`DEFAULT_PERSISTENT_GRANTS`] is Linux blkback's
    /// 1056. Raw disks only: other formats are copied.
    pub persistent_grants: usize,
}

/// The daemon's default budget of bounce buffers: 64 MiB, 16 queues at
/// their full share (4 disks of 4 queues busy at once); what a dom0 of
/// 512 MiB can spare.
pub const DEFAULT_BUFFER_BYTES: usize = 64 << 20;

impl Default for BlkOptions {
    fn default() -> Self {
        BlkOptions {
            offer: Offer::default(),
            io_threads: 4,
            direct: true,
            engine: EngineChoice::Auto,
            queue_buffer_bytes: DEFAULT_QUEUE_BUFFER_BYTES,
            buffer_bytes: DEFAULT_BUFFER_BYTES,
            locking: Locking::Auto,
            persistent_grants: 0,
        }
    }
}

/// The block device type under one xenstore name (`qdisk`, `vbd`).
#[derive(Debug)]
pub struct BlkDeviceType {
    name: String,
    options: BlkOptions,
    budget: Arc<BufferBudget>,
    /// `options.locking` on this kernel.
    lock: Option<LockKind>,
}

impl BlkDeviceType {
    /// Serves `backend/<name>` with `options`, its buffers within a budget
    /// of its own of `options.buffer_bytes`.
    pub fn new(name: impl Into<String>, options: BlkOptions) -> Arc<Self> {
        Self::with_budget(name, options, BufferBudget::new(options.buffer_bytes))
    }

    /// As [`BlkDeviceType::new`], its buffers charged to `budget`, which
    /// other device types may share (one budget for the daemon).
    pub fn with_budget(name: impl Into<String>, mut options: BlkOptions, budget: Arc<BufferBudget>) -> Arc<Self> {
        let name = name.into();
        if options.engine == EngineChoice::Auto {
            options.engine = match crate::uring::probe() {
                Ok(()) => EngineChoice::IoUring,
                Err(e) => {
                    log::info!("{name}: io_uring unavailable ({e}); using the thread-pool engine");
                    EngineChoice::Threads
                }
            };
        }
        let lock = options.locking.resolve();
        log::info!(
            "{name}: I/O engine {:?}, buffers {} KiB per queue, {} KiB in all, image locks {}",
            options.engine,
            options.queue_buffer_bytes >> 10,
            budget.limit() >> 10,
            match lock {
                Some(LockKind::Ofd) => "OFD",
                Some(LockKind::Posix) => "POSIX",
                None => "off",
            }
        );
        Arc::new(BlkDeviceType { name, options, budget, lock })
    }

    /// The budget its queues' buffers are charged to.
    pub fn buffer_budget(&self) -> &Arc<BufferBudget> {
        &self.budget
    }
}

impl DeviceType for BlkDeviceType {
    fn name(&self) -> &str {
        &self.name
    }

    fn create(&self, _ctx: &DeviceCtx) -> Result<Box<dyn Device>, DeviceError> {
        Ok(Box::new(BlkDevice {
            options: self.options,
            lock: self.lock,
            budget: self.budget.clone(),
            disk: None,
            rings: None,
        }))
    }
}

struct BlkDevice {
    options: BlkOptions,
    lock: Option<LockKind>,
    budget: Arc<BufferBudget>,
    disk: Option<Opened>,
    /// Of the connection: queues, `ring-page-order`, the ABI.
    rings: Option<(usize, u32, xen_bus::Protocol)>,
}

/// A device's disk: what the toolstack configured, and the storage.
struct Opened {
    cfg: DiskConfig,
    storage: Storage,
}

/// Where a disk's bytes are.
enum Storage {
    /// The image `params` named, for as long as the device is there.
    Fixed(OpenImage),
    /// A drive with removable media (`device-type = cdrom`, `removable =
    /// 1`), whose medium `params` changes while connected.
    Removable(Arc<Drive>),
}

impl Storage {
    fn image(&self) -> Arc<dyn DiskImage> {
        match self {
            Storage::Fixed(image) => image.image(),
            Storage::Removable(drive) => drive.clone(),
        }
    }
}

fn config_error(e: crate::config::ConfigError) -> DeviceError {
    use crate::config::ConfigError;
    match e {
        ConfigError::Missing(node) => DeviceError::MissingNode(node),
        ConfigError::Bad { node, value } => DeviceError::BadNode { node, value },
        other => DeviceError::msg(other.to_string()),
    }
}

impl Device for BlkDevice {
    fn init(&mut self, ctx: &DeviceCtx) -> Result<(), DeviceError> {
        let reader = NodeReader::new(|n: &str| ctx.backend_str_opt(n));
        let cfg = DiskConfig::read(|n| reader.read(n));
        reader.check()?;
        let cfg = cfg.map_err(config_error)?;
        // A reconnection opens the image again (its size may have changed):
        // the old one is closed first, or its lock would refuse the new one.
        self.disk = None;
        let medium = cfg.medium.as_ref().map(|m| self.open_medium(ctx, m, cfg.read_only)).transpose()?;
        let storage = if cfg.removable {
            if medium.is_none() {
                log::info!("{}: removable drive, empty", ctx.backend_path());
            }
            Storage::Removable(Drive::new(medium, cfg.read_only))
        } else {
            // `DiskConfig::read` lets only a removable drive be empty.
            let medium = medium.ok_or_else(|| DeviceError::BadNode { node: "params".into(), value: String::new() })?;
            Storage::Fixed(medium)
        };
        if self.options.engine == EngineChoice::IoUring {
            match &storage {
                Storage::Fixed(OpenImage::Qcow2(_)) => log::info!(
                    "{}: qcow2 on io_uring with imago for metadata (allocated clusters in place, the rest on the thread pool)",
                    ctx.backend_path()
                ),
                Storage::Removable(_) => {
                    log::info!("{}: removable media use the thread-pool engine", ctx.backend_path())
                }
                Storage::Fixed(OpenImage::Raw(_)) => {}
            }
        }
        for (node, value) in self.options.offer.nodes() {
            ctx.write(node, value);
        }
        self.disk = Some(Opened { cfg, storage });
        Ok(())
    }

    fn connect(&mut self, ctx: &DeviceCtx) -> Result<Vec<RingSetup>, DeviceError> {
        let Some(Opened { cfg, storage }) = &self.disk else {
            return Err(DeviceError::msg("Connect before the disk was opened"));
        };
        let offer = self.options.offer;
        let reader = NodeReader::new(|n: &str| ctx.frontend_str_opt(n));
        let fe = FrontendConfig::read(|n| reader.read(n), &offer);
        reader.check()?;
        let fe = match fe {
            Ok(fe) => fe,
            Err(crate::config::ConfigError::Bad { node, value }) if node == "protocol" => {
                return Err(DeviceError::UnknownProtocol(value))
            }
            Err(e) => return Err(config_error(e)),
        };
        let image = storage.image();
        let limits = disk_limits(&*image, cfg, &offer);
        let frontend = ctx.frontend_domid();
        // Persistent grants where I/O can go straight to the guest's pages:
        // a raw image (qcow2 data and removable media are copied).
        let persistent_offered =
            self.options.persistent_grants > 0 && matches!(storage, Storage::Fixed(OpenImage::Raw(_)));
        let persistent = persistent_offered && fe.persistent;
        let alignment = image.logical_sector_size() as usize;
        let queues = fe.queues.iter().map(|q| (&q.ring_refs[..], q.event_channel));
        let setups = ctx.serve_queues(queues, |i, ring| {
            let threads = self.options.io_threads;
            let engine: Result<Box<dyn IoEngine>, _> = match (self.options.engine, storage) {
                (_, Storage::Removable(drive)) => {
                    ThreadPoolEngine::for_drive(drive.clone(), threads).map(|e| Box::new(e) as _)
                }
                (EngineChoice::IoUring, Storage::Fixed(OpenImage::Raw(raw))) => {
                    IoUringEngine::new(raw.clone()).map(|e| Box::new(e) as _)
                }
                (EngineChoice::IoUring, Storage::Fixed(OpenImage::Qcow2(image))) => {
                    Qcow2UringEngine::new(image.clone(), threads).map(|e| Box::new(e) as _)
                }
                _ => ThreadPoolEngine::new(image.clone(), threads).map(|e| Box::new(e) as _),
            };
            let engine = engine.map_err(|e| DeviceError::other(format!("Cannot start I/O for queue {i}"), e))?;
            let budget = QueueBudget::new(self.options.queue_buffer_bytes, self.budget.clone());
            let mut exec =
                QueueExecutor::new(fe.abi, limits, frontend, ctx.grants().clone(), engine).with_budget(budget);
            if persistent {
                exec = exec.with_persistent_grants(self.options.persistent_grants, alignment);
            }
            let queue = if ring.resume {
                RingQueue::resume(i, ring.mem, exec, ring.journal)
            } else {
                RingQueue::new(i, ring.mem, exec, ring.journal)
            };
            let queue = queue.map_err(|e| DeviceError::other("Bad ring", e))?;
            Ok(Box::new(BlkRing { queue, counters: RingCounters::new() }) as Box<dyn RingHandler>)
        })?;
        for (node, value) in connect_nodes(&*image, cfg, persistent_offered) {
            ctx.write(node, value);
        }
        self.rings = Some((fe.queues.len(), fe.ring_page_order, fe.abi));
        log::info!(
            "{}: connected, {} queue(s) of {} pages, protocol {:?}, {}",
            ctx.backend_path(),
            fe.queues.len(),
            1u32 << fe.ring_page_order,
            fe.abi,
            if persistent { "persistent grants" } else { "grant copy" }
        );
        Ok(setups)
    }

    fn disconnect(&mut self, ctx: &DeviceCtx) {
        self.rings = None;
        log::info!("{}: disconnected", ctx.backend_path());
    }

    /// A removable drive's `params` changed: the medium goes out, the one
    /// named goes in (docs/blkback.md, Removable media). Other disks keep
    /// their image, as QEMU's xen-block (which does not watch `params`) and
    /// Linux's blkback (which refuses a new `physical-device`) do.
    fn backend_changed(&mut self, ctx: &DeviceCtx, node: &str) -> Result<(), DeviceError> {
        if node != "params" {
            return Ok(());
        }
        let Some(opened) = &self.disk else { return Ok(()) };
        let reader = NodeReader::new(|n: &str| ctx.backend_str_opt(n));
        let new = DiskConfig::read(|n| reader.read(n));
        reader.check()?;
        let drive = match &opened.storage {
            Storage::Removable(drive) => drive.clone(),
            Storage::Fixed(_) => {
                if new.map_or(true, |c| c.medium != opened.cfg.medium) {
                    log::warn!("{}: params changed on a disk that is not removable; ignored", ctx.backend_path());
                }
                return Ok(());
            }
        };
        let wanted = match new {
            Ok(cfg) => cfg.medium,
            Err(e) => {
                log::error!("{}: new params refused, the drive is left empty: {e}", ctx.backend_path());
                None
            }
        };
        if wanted == opened.cfg.medium {
            return Ok(());
        }
        let read_only = opened.cfg.read_only;
        // Out first: requests in flight keep the old medium open until
        // they are done, none started from now on reads it.
        if let Some(old) = drive.replace(None) {
            log::info!("{}: medium {:?} ejected", ctx.backend_path(), old);
        }
        let loaded = wanted.as_ref().and_then(|m| match self.open_medium(ctx, m, read_only) {
            Ok(image) => Some(image),
            Err(e) => {
                log::error!("{}: the drive is left empty: {}", ctx.backend_path(), e.node_text());
                None
            }
        });
        let inserted = loaded.is_some();
        drive.replace(loaded);
        if let Some(opened) = &mut self.disk {
            // A medium that did not open is not recorded: the same `params`
            // written again tries again.
            opened.cfg.medium = if inserted { wanted } else { None };
        }
        ctx.write("sectors", drive.sectors());
        Ok(())
    }

    fn describe(&self) -> Vec<(&'static str, String)> {
        let mut d = Vec::new();
        if let Some(Opened { cfg, storage }) = &self.disk {
            let image = storage.image();
            match &cfg.medium {
                Some(m) => {
                    d.push(("image", m.path.display().to_string()));
                    d.push(("format", m.format.name().to_string()));
                }
                None => d.push(("image", "(no medium)".to_string())),
            }
            d.push(("mode", if image.is_read_only() { "r" } else { "w" }.to_string()));
            d.push(("sectors", image.sectors().to_string()));
            d.push(("sector-size", image.logical_sector_size().to_string()));
            let direct = match storage {
                Storage::Fixed(image) => Some(image.is_direct()),
                Storage::Removable(drive) => drive.is_direct(),
            };
            if let Some(direct) = direct {
                d.push(("cache", if direct { "direct" } else { "page cache" }.to_string()));
            }
        }
        let fixed = self.disk.as_ref().map(|o| match &o.storage {
            Storage::Fixed(image) => Some(image),
            Storage::Removable(_) => None,
        });
        let engine = match (self.options.engine, fixed) {
            (EngineChoice::IoUring, None | Some(Some(OpenImage::Raw(_)))) => "io-uring",
            (EngineChoice::IoUring, Some(Some(OpenImage::Qcow2(_)))) => "io-uring with imago for metadata",
            _ => "threads",
        };
        d.push(("engine", engine.to_string()));
        if let Some(Some(OpenImage::Qcow2(q))) = fixed {
            // Reads and writes that went to the image file directly.
            d.push(("direct-requests", q.direct_requests().to_string()));
        }
        if let Some((queues, order, abi)) = self.rings {
            d.push(("queues", queues.to_string()));
            d.push(("ring-order", order.to_string()));
            d.push(("protocol", format!("{abi:?}")));
        }
        d
    }
}

impl BlkDevice {
    /// Opens the image `medium` names (read-only if `read_only`), locked
    /// as the device type says; logged with its size and backing files.
    fn open_medium(&self, ctx: &DeviceCtx, medium: &Medium, read_only: bool) -> Result<OpenImage, DeviceError> {
        let Medium { path, format } = medium;
        let disk = OpenImage::open(path, *format, read_only, self.options.direct, self.lock)
            .map_err(|e| DeviceError::other(format!("Cannot open {}", path.display()), e))?;
        let image = disk.image();
        log::info!(
            "{}: {} ({}, {} sectors{})",
            ctx.backend_path(),
            path.display(),
            format.name(),
            image.sectors(),
            if image.is_read_only() { ", read-only" } else { "" }
        );
        if let OpenImage::Qcow2(q) = &disk {
            for backing in q.backing_chain() {
                log::info!("{}: backing file {}", ctx.backend_path(), backing.display());
            }
        }
        Ok(disk)
    }
}

/// One queue on a framework worker.
struct BlkRing {
    queue: RingQueue,
    /// The queue's counters, published after each pass.
    counters: Arc<RingCounters>,
}

impl BlkRing {
    fn publish(&self) {
        let s = self.queue.stats();
        self.counters.publish(RingStats {
            in_flight: self.queue.pending() as u64,
            completed: s.completed,
            failed: s.failed,
            bytes_read: s.bytes_read,
            bytes_written: s.bytes_written,
            latencies: self.queue.latencies(),
        });
    }
}

impl RingHandler for BlkRing {
    fn process(&mut self, budget: usize) -> Result<Progress, DeviceError> {
        let pass = self.queue.process(budget);
        self.publish();
        pass.map_err(|e| DeviceError::other("Ring failed", e))
    }

    fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.queue.completion_fd())
    }

    fn quiesce(&mut self) -> bool {
        match self.queue.quiesce() {
            Ok(notify) => notify,
            Err(e) => {
                log::warn!("queue {}: {e}", self.queue.index());
                false
            }
        }
    }

    fn drain(&mut self) -> Drained {
        let (notify, done) = self.queue.drain();
        self.publish();
        Drained { notify, done }
    }

    fn counters(&self) -> Option<Arc<RingCounters>> {
        Some(self.counters.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_xenstore_error_while_reading_nodes_is_reported_not_taken_as_absent() {
        let reader = NodeReader::new(|n: &str| match n {
            "params" => Ok(Some("/disk.img".to_string())),
            "mode" => Err(DeviceError::msg("Xenstore went away")),
            _ => Ok(None),
        });
        let cfg = DiskConfig::read(|n| reader.read(n));
        assert!(cfg.is_ok(), "the rules alone would accept it");
        let err = reader.check().unwrap_err();
        assert_eq!(err.to_string(), "Xenstore went away");
    }

    #[test]
    fn config_errors_keep_the_node_name_for_the_error_node() {
        let e = config_error(crate::config::ConfigError::Missing("params".into()));
        assert!(matches!(e, DeviceError::MissingNode(n) if n == "params"));
        let e = config_error(crate::config::ConfigError::Format("vhd".into()));
        assert!(e.to_string().contains("vhd"));
    }
}
