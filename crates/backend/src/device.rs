//! The device-type API: what a concrete backend implements ([`DeviceType`],
//! [`Device`], [`RingHandler`]) and the typed helpers it gets instead of
//! xenstore paths and the state machine ([`DeviceCtx`]).

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use evtchn::{DomId, EventChannel, Port};
use gnttab::{GrantMapper, GrantMapping, GrantRef};
use xen_bus::{rings, scan, Protocol};
use xs_wire::{TxId, XsErrno};

use crate::error::DeviceError;
use crate::key::DeviceKey;
use crate::platform::Platform;

/// Bytes of a node value kept in error messages.
const VALUE_IN_ERROR: usize = 64;

/// A kind of device (`vbd`, ...): the framework watches `backend/<name>`
/// and asks this for a [`Device`] per backend directory that appears.
pub trait DeviceType: Send + Sync + 'static {
    /// The xenstore name of the type (`backend/<name>/...`).
    fn name(&self) -> &str;
    /// Creates the device for a new backend directory. Nothing is mapped yet.
    fn create(&self, ctx: &DeviceCtx) -> Result<Box<dyn Device>, DeviceError>;
    /// Whether this type serves the device at all, judged from its nodes
    /// (`frontend` is the frontend directory): one it declines is left
    /// untouched, nothing written, for whichever backend it is meant for
    /// (the console type declines a primary console of type
    /// `xenconsoled`, as QEMU does). Asked once, when the device is first
    /// seen, after [`crate::Frontends`]. The default serves every device.
    fn serves(&self, _xs: &xs_wire::Client, _key: &DeviceKey, _frontend: &str) -> bool {
        true
    }
}

/// One device instance. The framework calls these from its xenbus thread, in
/// the order of the state machine (see `docs/backend.md`):
/// `init` -> `connect` -> `connected` -> `disconnect` (-> `init` again on
/// reconnection), and drops the device when its backend directory goes away.
pub trait Device: Send {
    /// Prepares the device before the frontend is ready (open the disk, write
    /// feature nodes with [`DeviceCtx::write`]). The backend then goes to
    /// InitWait.
    fn init(&mut self, ctx: &DeviceCtx) -> Result<(), DeviceError>;
    /// The frontend is Initialised or Connected: read its nodes, map rings,
    /// bind event channels. The returned rings are handed to workers and the
    /// backend goes to Connected.
    fn connect(&mut self, ctx: &DeviceCtx) -> Result<Vec<RingSetup>, DeviceError>;
    /// The backend state is Connected and the rings are served.
    fn connected(&mut self, _ctx: &DeviceCtx) {}
    /// The rings were taken back from the workers (their handlers already
    /// finished in-flight requests and were dropped); release what `connect`
    /// set up besides them.
    fn disconnect(&mut self, _ctx: &DeviceCtx) {}
    /// A node below the backend directory changed (not one the framework
    /// owns: `state`, `hotplug-status`, `error`). Writes it queues are
    /// committed at once where the device is Connected, with `state`
    /// written again (Linux's signal of a new disk size); an error fails the
    /// device.
    fn backend_changed(&mut self, _ctx: &DeviceCtx, _node: &str) -> Result<(), DeviceError> {
        Ok(())
    }
    /// What an operator's status shows of the device besides its key and
    /// state, as names and values (a block device: `image`, `format`,
    /// `queues`, `ring-order`...). Read on the xenbus thread: keep it cheap.
    fn describe(&self) -> Vec<(&'static str, String)> {
        Vec::new()
    }
}

/// What a ring handler reports after a pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Responses were pushed and the frontend asked to be notified.
    pub notify: bool,
    /// The budget ran out with requests left: call again soon.
    pub more: bool,
    /// Work already taken waits for the next pass (completions held back
    /// by a per-pass bound): call again soon. Unlike `more`, it does not
    /// cut the ring's request budget: that work is bounded already.
    pub backlog: bool,
    /// The pass took no request off the ring. A port event followed only
    /// by such passes was spurious, and a port that keeps firing for
    /// nothing is throttled (the worker delays its unmask, as Linux's
    /// lateeoi does, XSA-332). `false` (the default) never throttles.
    pub idle: bool,
    /// Call again after this long even if no event comes: the handler
    /// waits for something that sends none (a shared memory budget) or
    /// wants to release what an idle ring holds.
    pub retry: Option<std::time::Duration>,
}

/// Serves one shared ring on a worker thread. Owned by that worker.
pub trait RingHandler: Send {
    /// Takes at most `budget` requests off the ring, handles them, pushes
    /// responses. An error fails the device (hostile or broken ring). The
    /// worker cuts `budget` below its maximum only to fit its time quantum
    /// while other rings wait: a handler may bound the rest of a pass's
    /// work by it too.
    fn process(&mut self, budget: usize) -> Result<Progress, DeviceError>;
    /// An fd (e.g. an I/O engine's completion eventfd) that, when readable,
    /// means [`RingHandler::process`] has work besides the ring.
    fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    /// The ring is being taken away (disconnect or shutdown): finish the
    /// requests in flight and push their responses. Returns whether the
    /// frontend must be notified. May block (used at shutdown).
    fn quiesce(&mut self) -> bool {
        false
    }
    /// One step of taking the ring away without blocking: take no new
    /// request, collect what finished and push its responses. Until it
    /// reports `done`, the worker calls it again whenever
    /// [`RingHandler::completion_fd`] is readable, and serves its other
    /// rings meanwhile. The default quiesces at once.
    fn drain(&mut self) -> Drained {
        Drained { notify: self.quiesce(), done: true }
    }
    /// Counters the handler publishes as it serves the ring (requests in
    /// flight, answered, failed, bytes), for status and metrics. Asked once,
    /// when the ring is handed to its worker; the handler then stores into
    /// them on its worker and readers load them from anywhere. `None` (the
    /// default): the ring keeps none.
    fn counters(&self) -> Option<Arc<crate::snapshot::RingCounters>> {
        None
    }
}

/// What a ring handler reports from [`RingHandler::drain`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// Responses were pushed and the frontend asked to be notified.
    pub notify: bool,
    /// Nothing is in flight any more: the ring can go.
    pub done: bool,
}

/// An event-channel port bound to the frontend, on its own handle.
pub struct BoundPort {
    evtchn: Box<dyn EventChannel>,
    port: Port,
}

impl BoundPort {
    /// Binds a new handle to `remote_port` of `remote`.
    pub fn bind(evtchn: Box<dyn EventChannel>, remote: DomId, remote_port: Port) -> Result<Self, DeviceError> {
        let port = evtchn.bind_interdomain(remote, remote_port)?;
        Ok(BoundPort { evtchn, port })
    }

    /// The local port.
    pub fn port(&self) -> Port {
        self.port
    }

    /// Signals the frontend.
    pub fn notify(&self) -> Result<(), DeviceError> {
        Ok(self.evtchn.notify(self.port)?)
    }

    /// The handle (for polling and taking pending events).
    pub fn handle(&self) -> &dyn EventChannel {
        &*self.evtchn
    }
}

impl Drop for BoundPort {
    fn drop(&mut self) {
        if let Err(e) = self.evtchn.unbind(self.port) {
            log::debug!("Unbinding port {}: {e}", self.port);
        }
    }
}

impl core::fmt::Debug for BoundPort {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("BoundPort").field("port", &self.port).finish_non_exhaustive()
    }
}

/// A ring to serve: its event channel and its handler. The worker that
/// receives it owns both.
pub struct RingSetup {
    /// The bound port the frontend notifies.
    pub port: BoundPort,
    /// The handler.
    pub handler: Box<dyn RingHandler>,
}

/// A frontend's ring mapped for its handler: the memory, its request
/// journal ([`DeviceCtx::ring_journal`]) and whether to attach where a
/// previous backend process left it ([`DeviceCtx::resuming`]).
#[derive(Debug)]
pub struct MappedRing {
    /// The ring's pages, mapped writable.
    pub mem: GrantMapping,
    /// Its request journal, if one is kept (or, resuming, was found).
    pub journal: Option<xen_ring::JournalFile>,
    /// Take the ring over where it is ([`xen_ring::BackRing::resume`])
    /// instead of from index 0.
    pub resume: bool,
}

/// Everything a device may do with xenstore and the host, relative to its
/// own directories. Backend writes are collected and committed by the
/// framework in one transaction with the next state change, and only while
/// the backend directory still exists (a removed device is never recreated
/// by a late write).
pub struct DeviceCtx {
    platform: Platform,
    key: DeviceKey,
    backend_path: String,
    frontend_path: String,
    writes: std::sync::Mutex<Vec<(String, Vec<u8>)>>,
    resuming: std::sync::atomic::AtomicBool,
    journal_dir: Option<Arc<std::path::Path>>,
}

impl DeviceCtx {
    /// A context for the device `key` with its backend and frontend directories.
    pub fn new(platform: Platform, key: DeviceKey, backend_path: String, frontend_path: String) -> Self {
        DeviceCtx {
            platform,
            key,
            backend_path,
            frontend_path,
            writes: Default::default(),
            resuming: Default::default(),
            journal_dir: None,
        }
    }

    /// Keeps the rings' request journals in `dir` ([`DeviceCtx::ring_journal`]).
    pub fn with_journal_dir(mut self, dir: Option<Arc<std::path::Path>>) -> Self {
        self.journal_dir = dir;
        self
    }

    fn journal_prefix(&self) -> String {
        format!("{}-{}-{}-", self.key.kind, self.key.frontend, self.key.devid)
    }

    /// The request journal of ring `name` (e.g. `q0`) over `refs`, for
    /// [`xen_ring::BackRing::new_journaled`] or, while
    /// [`resuming`](Self::resuming), the one the previous process kept, for
    /// [`xen_ring::BackRing::resume`]. `None` if no journal directory is
    /// configured, the file cannot be made (logged: the ring is served
    /// without, and a crash then cannot be resumed exactly), or when
    /// resuming, there is none.
    pub fn ring_journal(&self, name: &str, refs: &[GrantRef]) -> Option<xen_ring::JournalFile> {
        let dir = self.journal_dir.as_ref()?;
        let path = dir.join(format!("{}{name}", self.journal_prefix()));
        // FNV-1a over what identifies the ring: a journal of another
        // connection of the same device is never taken for this one's.
        let mut identity: u64 = 0xcbf2_9ce4_8422_2325;
        let words = [u32::from(self.key.frontend), self.key.devid].into_iter().chain(refs.iter().map(|r| r.0));
        for b in words.flat_map(u32::to_le_bytes).chain(name.bytes()) {
            identity = (identity ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        let opened = if self.resuming() {
            std::fs::OpenOptions::new().read(true).write(true).open(&path)
        } else {
            use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
            let _ = std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir);
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(&path)
        };
        match opened {
            Ok(f) => Some(xen_ring::JournalFile::new(f, identity)),
            Err(e) if self.resuming() && e.kind() == std::io::ErrorKind::NotFound => {
                log::warn!("{}: no request journal {} to resume from", self.backend_path, path.display());
                None
            }
            Err(e) => {
                log::warn!("{}: request journal {}: {e}; serving without", self.backend_path, path.display());
                None
            }
        }
    }

    /// Removes the device's request journals (its rings are gone for good).
    pub(crate) fn remove_journals(&self) {
        let Some(dir) = &self.journal_dir else { return };
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        let prefix = self.journal_prefix();
        for e in entries.flatten() {
            if e.file_name().to_str().is_some_and(|n| n.starts_with(&prefix)) {
                if let Err(err) = std::fs::remove_file(e.path()) {
                    log::warn!("Removing {}: {err}", e.path().display());
                }
            }
        }
    }

    /// True during an `init`/`connect` that takes over a device a previous
    /// backend process left Connected (a restart): the frontend's rings are
    /// in use, so attach to them where they are (e.g.
    /// `xen_ring::BackRing::resume`) instead of from index 0.
    pub fn resuming(&self) -> bool {
        self.resuming.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn set_resuming(&self, on: bool) {
        self.resuming.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The device's key.
    pub fn key(&self) -> &DeviceKey {
        &self.key
    }

    /// The frontend's domain.
    pub fn frontend_domid(&self) -> DomId {
        self.key.frontend
    }

    /// The backend's own domain.
    pub fn backend_domid(&self) -> DomId {
        self.platform.domid()
    }

    /// The backend directory (for log messages).
    pub fn backend_path(&self) -> &str {
        &self.backend_path
    }

    /// The frontend directory (for log messages).
    pub fn frontend_path(&self) -> &str {
        &self.frontend_path
    }

    /// The grant mapper, for data copies.
    pub fn grants(&self) -> &Arc<dyn GrantMapper> {
        self.platform.grants()
    }

    fn read_opt(&self, dir: &str, node: &str) -> Result<Option<Vec<u8>>, DeviceError> {
        match self.platform.xenstore().read(TxId::NONE, &format!("{dir}/{node}")) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.errno() == Some(XsErrno::ENOENT) => Ok(None),
            Err(e) => Err(DeviceError::Xenstore(e)),
        }
    }

    fn opt_string(node: &str, v: Option<Vec<u8>>) -> Result<Option<String>, DeviceError> {
        v.map(|v| {
            let mut s = String::from_utf8(v).map_err(|e| bad(node, e.as_bytes()))?;
            while s.ends_with('\0') {
                s.pop();
            }
            Ok(s)
        })
        .transpose()
    }

    fn opt_int<T: core::str::FromStr>(node: &str, v: Option<String>) -> Result<Option<T>, DeviceError> {
        v.map(|s| s.trim().parse::<T>().map_err(|_| bad(node, s.as_bytes()))).transpose()
    }

    /// A frontend node as a string, `None` if absent. Read as Linux reads
    /// a frontend's node, a C string: it ends at the first NUL, and bytes
    /// that are not UTF-8 become U+FFFD (no name or number has them).
    pub fn frontend_str_opt(&self, node: &str) -> Result<Option<String>, DeviceError> {
        Ok(self.read_opt(&self.frontend_path, node)?.map(|v| {
            let end = v.iter().position(|&b| b == 0).unwrap_or(v.len());
            String::from_utf8_lossy(&v[..end]).into_owned()
        }))
    }

    /// A frontend node read with `%u` as Linux's backends read it
    /// ([`xen_bus::scan::scan_u32`]: `"12junk"` is 12), `None` if absent; an
    /// error if it converts nothing.
    pub fn frontend_u32_opt(&self, node: &str) -> Result<Option<u32>, DeviceError> {
        self.read_opt(&self.frontend_path, node)?.map(|v| scan::scan_u32(&v).ok_or_else(|| bad(node, &v))).transpose()
    }

    /// [`DeviceCtx::frontend_u32_opt`]; absent is an error.
    pub fn frontend_u32(&self, node: &str) -> Result<u32, DeviceError> {
        self.frontend_u32_opt(node)?.ok_or_else(|| DeviceError::MissingNode(node.to_string()))
    }

    /// A frontend node as a string; absent is an error.
    pub fn frontend_str(&self, node: &str) -> Result<String, DeviceError> {
        self.frontend_str_opt(node)?.ok_or_else(|| DeviceError::MissingNode(node.to_string()))
    }

    /// A backend node (written by the toolstack) as a string, `None` if absent.
    pub fn backend_str_opt(&self, node: &str) -> Result<Option<String>, DeviceError> {
        Self::opt_string(node, self.read_opt(&self.backend_path, node)?)
    }

    /// A backend node as a string; absent is an error.
    pub fn backend_str(&self, node: &str) -> Result<String, DeviceError> {
        self.backend_str_opt(node)?.ok_or_else(|| DeviceError::MissingNode(node.to_string()))
    }

    /// A backend node as a number, `None` if absent.
    pub fn backend_int_opt<T: core::str::FromStr>(&self, node: &str) -> Result<Option<T>, DeviceError> {
        Self::opt_int(node, self.backend_str_opt(node)?)
    }

    /// A backend node as a number; absent is an error.
    pub fn backend_int<T: core::str::FromStr>(&self, node: &str) -> Result<T, DeviceError> {
        self.backend_int_opt(node)?.ok_or_else(|| DeviceError::MissingNode(node.to_string()))
    }

    /// Queues a write of a backend node (e.g. `feature-flush-cache = 1`),
    /// committed with the next state change.
    pub fn write(&self, node: &str, value: impl core::fmt::Display) {
        self.lock_writes().push((node.to_string(), value.to_string().into_bytes()));
    }

    /// Writes a node of the frontend directory at once, not queued: one
    /// the toolstack owns there and a backend fills in (the console's
    /// `tty`, which libxl and `xl console` read from the frontend
    /// directory).
    pub fn write_frontend_node(&self, node: &str, value: &str) -> Result<(), DeviceError> {
        let path = format!("{}/{node}", self.frontend_path);
        self.platform.xenstore().write(TxId::NONE, &path, value.as_bytes()).map_err(DeviceError::Xenstore)
    }

    fn lock_writes(&self) -> std::sync::MutexGuard<'_, Vec<(String, Vec<u8>)>> {
        self.writes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts writes back in front of those queued since (their commit failed).
    pub(crate) fn requeue_writes(&self, mut writes: Vec<(String, Vec<u8>)>) {
        let mut queued = self.lock_writes();
        writes.append(&mut queued);
        *queued = writes;
    }

    /// Whether writes are queued.
    pub(crate) fn has_writes(&self) -> bool {
        !self.lock_writes().is_empty()
    }

    /// Takes the queued writes (the framework commits them).
    pub(crate) fn take_writes(&self) -> Vec<(String, Vec<u8>)> {
        std::mem::take(&mut *self.lock_writes())
    }

    /// The frontend's `protocol` node (absent: native; unknown: error), as
    /// Linux reads it ([`Protocol::parse_bytes`]).
    pub fn protocol(&self) -> Result<Protocol, DeviceError> {
        Ok(Protocol::parse_bytes(self.read_opt(&self.frontend_path, "protocol")?.as_deref())?)
    }

    /// Maps grants of the frontend as one contiguous range.
    pub fn map_grants(&self, refs: &[GrantRef], writable: bool) -> Result<GrantMapping, DeviceError> {
        Ok(self.platform.grants().map(self.key.frontend, refs, writable)?)
    }

    /// A frontend node as [`xen_bus::rings`] reads it (whose `%u` stops at
    /// the first NUL itself).
    fn ring_node(&self, node: &str) -> Result<Option<String>, DeviceError> {
        Ok(self.read_opt(&self.frontend_path, node)?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Reads the ring references of the queue in `dir` (`""`, or
    /// `queue-N/` with `multi-queue-num-queues`) as Linux frontends write
    /// them ([`xen_bus::rings`]): the top-level `ring-page-order` absent or 0
    /// with `ring-ref`, else `ring-ref0` .. `ring-ref<2^order - 1>` below
    /// `dir`. Orders above `max_order` are an error.
    pub fn ring_refs(&self, dir: &str, max_order: u32) -> Result<Vec<GrantRef>, DeviceError> {
        let read = |node: &str| self.ring_node(node);
        let order = rings::read_ring_page_order(&read, max_order)?;
        Ok(rings::read_ring_refs(&read, dir, order)?.into_iter().map(GrantRef).collect())
    }

    /// Reads every ring the frontend published ([`xen_bus::FrontendRings`]),
    /// checked against what the backend offered.
    pub fn frontend_rings(&self, offer: xen_bus::RingOffer) -> Result<xen_bus::FrontendRings, DeviceError> {
        xen_bus::FrontendRings::read(|node| self.ring_node(node), offer)
    }

    /// Maps the ring of `refs` with its request journal `name`, ready for a
    /// handler to attach to ([`xen_ring::BackRing::open`]).
    pub fn map_ring_with_journal(&self, name: &str, refs: &[GrantRef]) -> Result<MappedRing, DeviceError> {
        let mem = self.map_grants(refs, true)?;
        Ok(MappedRing { mem, journal: self.ring_journal(name, refs), resume: self.resuming() })
    }

    /// Serves one ring per queue: for queue `i` (its grant references and
    /// the frontend's port, as [`DeviceCtx::frontend_rings`] reads them),
    /// maps the ring with its journal `q<i>`, asks `handler` for the ring's
    /// handler and binds the port. The rings for [`Device::connect`].
    pub fn serve_queues<'q>(
        &self,
        queues: impl IntoIterator<Item = (&'q [GrantRef], Port)>,
        mut handler: impl FnMut(usize, MappedRing) -> Result<Box<dyn RingHandler>, DeviceError>,
    ) -> Result<Vec<RingSetup>, DeviceError> {
        let mut setups = Vec::new();
        for (i, (refs, remote)) in queues.into_iter().enumerate() {
            let handler = handler(i, self.map_ring_with_journal(&format!("q{i}"), refs)?)?;
            let port = BoundPort::bind(self.platform.open_evtchn()?, self.key.frontend, remote)?;
            setups.push(RingSetup { port, handler });
        }
        Ok(setups)
    }

    /// Maps the ring of the queue in `dir` (see [`DeviceCtx::ring_refs`]) writable.
    pub fn map_ring(&self, dir: &str, max_order: u32) -> Result<GrantMapping, DeviceError> {
        let refs = self.ring_refs(dir, max_order)?;
        self.map_grants(&refs, true)
    }

    /// Binds the frontend's event channel named by `node` (e.g.
    /// `event-channel` or `queue-0/event-channel`) on a new handle.
    pub fn bind_event_channel(&self, node: &str) -> Result<BoundPort, DeviceError> {
        let remote = self.frontend_u32(node)?;
        BoundPort::bind(self.platform.open_evtchn()?, self.key.frontend, Port(remote))
    }
}

impl core::fmt::Debug for DeviceCtx {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DeviceCtx").field("key", &self.key).finish_non_exhaustive()
    }
}

/// A [`DeviceError::BadNode`] with the value cut to a readable length.
pub(crate) fn bad(node: &str, value: &[u8]) -> DeviceError {
    let value = String::from_utf8_lossy(&value[..value.len().min(VALUE_IN_ERROR)]).into_owned();
    DeviceError::BadNode { node: node.to_string(), value }
}

#[cfg(test)]
mod tests {
    use xen_sim::host::SimHost;
    use xen_sim::xenstored::Xenstored;
    use xs_wire::Client;

    use super::*;

    const FE: &str = "/local/domain/1/device/echo/0";

    /// A context for dom1's echo device 0 whose frontend directory holds `nodes`.
    fn ctx_with(nodes: &[(&str, &str)]) -> DeviceCtx {
        let host = SimHost::new();
        host.create_domain(0).unwrap();
        let xs = Client::from_stream(Xenstored::new().connect_as(0).unwrap()).unwrap();
        for (node, value) in nodes {
            xs.write(TxId::NONE, &format!("{FE}/{node}"), value.as_bytes()).unwrap();
        }
        let h = host.clone();
        let platform = Platform::new(0, xs, move || Ok(h.evtchn(0)), host.grant_mapper(0));
        let key = DeviceKey { kind: "echo".into(), frontend: 1, devid: 0 };
        DeviceCtx::new(platform, key, "/local/domain/0/backend/echo/1/0".into(), FE.into())
    }

    #[test]
    fn single_page_ring_reads_ring_ref() {
        let ctx = ctx_with(&[("ring-ref", "8"), ("ring-page-order", "0")]);
        assert_eq!(ctx.ring_refs("", 4).unwrap(), vec![GrantRef(8)]);
    }

    /// Linux writes `ring-page-order` once, at the top level, for every
    /// queue (`talk_to_blkback`), and reads it there (`connect_ring`).
    #[test]
    fn multi_page_ring_reads_every_numbered_ref_below_the_queue_directory() {
        let ctx = ctx_with(&[
            ("ring-page-order", "1"),
            ("multi-queue-num-queues", "2"),
            ("queue-1/ring-ref0", "10"),
            ("queue-1/ring-ref1", "11"),
        ]);
        assert_eq!(ctx.ring_refs("queue-1/", 4).unwrap(), vec![GrantRef(10), GrantRef(11)]);
    }

    #[test]
    fn per_queue_ring_page_order_is_not_the_linux_layout() {
        let ctx =
            ctx_with(&[("queue-1/ring-page-order", "1"), ("queue-1/ring-ref0", "10"), ("queue-1/ring-ref1", "11")]);
        assert_eq!(ctx.ring_refs("queue-1/", 4).unwrap(), vec![GrantRef(10)]);
    }

    #[test]
    fn ring_page_order_above_max_is_bad_node() {
        let ctx = ctx_with(&[("ring-page-order", "99"), ("ring-ref", "8")]);
        let err = ctx.ring_refs("", 4).unwrap_err();
        assert!(
            matches!(err, DeviceError::BadNode { ref node, ref value } if node == "ring-page-order" && value == "99")
        );
    }

    #[test]
    fn garbage_number_is_bad_node_with_value_cut() {
        let long = "x".repeat(500);
        let ctx = ctx_with(&[("ring-ref", &long)]);
        let err = ctx.frontend_u32("ring-ref").unwrap_err();
        assert!(matches!(err, DeviceError::BadNode { ref value, .. } if value.len() == VALUE_IN_ERROR), "{err:?}");
    }

    #[test]
    fn missing_node_is_named_and_optional_read_is_none() {
        let ctx = ctx_with(&[]);
        assert!(matches!(ctx.frontend_u32("event-channel"), Err(DeviceError::MissingNode(n)) if n == "event-channel"));
        assert_eq!(ctx.frontend_str_opt("event-channel").unwrap(), None);
    }

    #[test]
    fn protocol_node_is_parsed_and_unknown_is_fatal() {
        assert_eq!(ctx_with(&[]).protocol().unwrap(), Protocol::Native);
        assert_eq!(ctx_with(&[("protocol", "x86_32-abi")]).protocol().unwrap(), Protocol::X86_32);
        assert!(matches!(ctx_with(&[("protocol", "mips")]).protocol(), Err(DeviceError::UnknownProtocol(_))));
    }

    #[test]
    fn writes_are_queued_until_taken() {
        let ctx = ctx_with(&[]);
        ctx.write("feature-x", 1);
        ctx.write("name", "disk");
        assert_eq!(ctx.take_writes(), vec![("feature-x".into(), b"1".to_vec()), ("name".into(), b"disk".to_vec())]);
        assert!(ctx.take_writes().is_empty());
    }
}
