//! The xenbus thread: discovery of devices below `backend/<type>`, the
//! per-device state machine, and teardown. See `docs/backend.md`.

use std::collections::{BTreeSet, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, Receiver, Sender};
use evtchn::DomId;
use xs_wire::{Access, ClientError, Perm, TxId, WatchEvent, XsErrno};

use crate::device::{Device, DeviceCtx, DeviceType};
use crate::error::{DeviceError, Error};
use crate::frontends::Frontends;
use crate::key::{backend_token, frontend_token, parse_backend_path, parse_frontend_token, BackendPath, DeviceKey};
use crate::platform::Platform;
use crate::snapshot::{DeviceSnapshot, Monitor, RingCounters};
use crate::state::{step, Step};
use crate::thread::{panic_message, spawn_named};
use crate::worker::{Failure, Owner, Placement, Released, WorkerPool};
use xen_bus::XenbusState;

/// Watch events taken in one batch before pending frontend states are read.
const EVENT_BATCH: usize = 256;

/// Requests a ring handler may take per pass before other rings get a turn.
pub const DEFAULT_RING_BUDGET: usize = 64;

/// How long a frontend is given to close after its backend directory was
/// removed under it (see [`Config::departure_timeout`]).
pub const DEFAULT_DEPARTURE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a ring being taken away may take to finish its I/O (see
/// [`Config::drain_timeout`]).
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the xenstore connection may stay lost (see
/// [`Config::xenstore_timeout`]).
pub const DEFAULT_XENSTORE_TIMEOUT: Duration = Duration::from_secs(60);

/// Backend configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Worker threads serving rings (default: the number of CPUs).
    pub workers: usize,
    /// Requests per ring per pass ([`DEFAULT_RING_BUDGET`]).
    pub ring_budget: usize,
    /// When the toolstack removes a backend directory under an attached
    /// frontend, the framework writes `state = Closed` in its place so that
    /// the frontend lets go, and removes that node again once the frontend is
    /// Closed or gone, or after this long ([`DEFAULT_DEPARTURE_TIMEOUT`]).
    pub departure_timeout: Duration,
    /// Which frontend domains' devices this process serves (default: all).
    pub frontends: Frontends,
    /// A ring taken away (disconnect) finishes its requests in flight in
    /// the background, while every other device is served; one whose I/O
    /// is not done after this long fails its device alone, and is finished
    /// and dropped on a thread of its own ([`DEFAULT_DRAIN_TIMEOUT`]).
    pub drain_timeout: Duration,
    /// Where rings keep their request journals, so that a process started
    /// after a crash resumes them exactly (a tmpfs such as `/run/xenbackd`;
    /// see docs/backend.md, "Resume after a crash"). `None`: no journals,
    /// and a device found Connected is resumed only if its rings have no
    /// request pending.
    pub journal_dir: Option<std::path::PathBuf>,
    /// How long the xenstore connection may stay lost (xenstored restarting,
    /// or gone) while the rings go on being served and reconnection is
    /// tried; after that the backend stops, leaving every device for the
    /// next process to resume ([`DEFAULT_XENSTORE_TIMEOUT`]; see
    /// [`Backend::done`]).
    pub xenstore_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            workers: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            ring_budget: DEFAULT_RING_BUDGET,
            departure_timeout: DEFAULT_DEPARTURE_TIMEOUT,
            frontends: Frontends::All,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            journal_dir: None,
            xenstore_timeout: DEFAULT_XENSTORE_TIMEOUT,
        }
    }
}

/// Counters of the xenbus thread.
#[derive(Debug, Default)]
pub struct Stats {
    /// Watch events taken off the queue.
    pub events: AtomicU64,
    /// Times a device's rings were handed to workers (Connected written next).
    pub connects: AtomicU64,
    /// Devices failed (an `error` node written).
    pub failures: AtomicU64,
    /// Devices currently known.
    pub devices: AtomicU64,
    /// Full rescans after a watch-queue overflow.
    pub rescans: AtomicU64,
    /// Backend directories removed under an attached frontend, for which
    /// `state = Closed` was written in their place.
    pub departures: AtomicU64,
    /// Devices found Connected (left by a previous backend process) and
    /// taken over where they were.
    pub resumes: AtomicU64,
    /// Rings whose I/O was still in flight at their drain deadline after a
    /// disconnect (each failed its device and was finished aside).
    pub stuck_rings: AtomicU64,
    /// Times the xenstore connection was lost and made again.
    pub xenstore_reconnects: AtomicU64,
    /// 1 once the backend stopped because xenstore stayed unreachable for
    /// [`Config::xenstore_timeout`].
    pub xenstore_gave_up: AtomicU64,
}

/// How the xenbus thread ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// Close every device (Closing, then Closed).
    Close,
    /// Leave every device as it is, for a later process to resume.
    Detach,
}

/// A running backend: the xenbus thread and its worker pool. Dropping it
/// shuts it down.
pub struct Backend {
    stop: Sender<Stop>,
    sync: Sender<Sender<()>>,
    /// Disconnected when the xenbus thread has ended.
    done: Receiver<()>,
    thread: Option<JoinHandle<Option<()>>>,
    stats: Arc<Stats>,
    snapshot: Sender<Sender<Vec<DeviceSnapshot>>>,
    started: Instant,
}

impl Backend {
    /// Watches `backend/<type>` for every type and starts serving. The
    /// platform's xenstore connection must be this backend's alone: its
    /// watch events are all consumed here.
    pub fn start(platform: Platform, types: Vec<Arc<dyn DeviceType>>, config: Config) -> Result<Backend, Error> {
        let (fail_tx, fail_rx) = crossbeam_channel::unbounded();
        let pool = WorkerPool::new(config.workers, config.ring_budget, fail_tx)?;
        let home = format!("/local/domain/{}", platform.domid());
        let mut kinds = HashMap::new();
        for t in types {
            let name = t.name().to_string();
            if kinds.insert(name.clone(), t).is_some() {
                return Err(Error::DuplicateType(name));
            }
        }
        let xs = platform.xenstore();
        let events = xs.events();
        for kind in kinds.keys() {
            xs.watch(&config.frontends.watch_path(&format!("{home}/backend/{kind}")), &backend_token(kind))?;
        }
        log::info!("Serving {:?} from domain {} with {} workers", kinds.keys(), platform.domid(), pool.len());
        let stats = Arc::new(Stats::default());
        let mut xenbus = Xenbus {
            xs,
            platform,
            xenstore_timeout: config.xenstore_timeout,
            unsynced: BTreeSet::new(),
            home,
            kinds,
            devices: HashMap::new(),
            departing: HashMap::new(),
            departure_timeout: config.departure_timeout,
            drain_timeout: config.drain_timeout,
            journal_dir: config.journal_dir.map(Arc::from),
            detaching: false,
            released: crossbeam_channel::unbounded(),
            dirty: Vec::new(),
            next_generation: 1,
            pool,
            stats: stats.clone(),
            frontends: config.frontends,
            foreign: BTreeSet::new(),
        };
        let (stop, stop_rx) = crossbeam_channel::bounded::<Stop>(1);
        let (sync, sync_rx) = crossbeam_channel::unbounded::<Sender<()>>();
        let (done_tx, done) = crossbeam_channel::bounded::<()>(0);
        let (snapshot, snapshot_rx) = crossbeam_channel::unbounded::<Sender<Vec<DeviceSnapshot>>>();
        let thread = spawn_named(
            "xenbackd-xenbus",
            |msg| log::error!("Xenbus thread died: {msg}; no device changes are handled"),
            move || {
                let _done = done_tx;
                xenbus.run(events, fail_rx, stop_rx, sync_rx, snapshot_rx)
            },
        )?;
        Ok(Backend { stop, sync, done, thread: Some(thread), stats, snapshot, started: Instant::now() })
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// A read-only handle for status and metrics, usable from any thread
    /// while the backend runs ([`Monitor::devices`]).
    pub fn monitor(&self) -> Monitor {
        Monitor { stats: self.stats.clone(), snapshot: self.snapshot.clone(), started: self.started }
    }

    /// Disconnected (`recv` returns) once the backend has stopped on its
    /// own: xenstore unreachable for [`Config::xenstore_timeout`] (see
    /// [`Stats::xenstore_gave_up`]) or its thread died. A daemon then exits
    /// non-zero so that its supervisor starts a new one, which resumes.
    pub fn done(&self) -> Receiver<()> {
        self.done.clone()
    }

    /// Waits (at most `timeout`) until the xenbus thread has handled every
    /// watch event that xenstored sent it before this call: after a write
    /// whose reply the caller has seen, the backend has acted on it. False
    /// if the thread is gone or did not answer in time.
    pub fn sync(&self, timeout: Duration) -> bool {
        let (done, wait) = crossbeam_channel::bounded(1);
        self.sync.send(done).is_ok() && wait.recv_timeout(timeout).is_ok()
    }

    /// Stops taking requests, lets every ring finish its in-flight requests
    /// and respond, disconnects every device (backend state Closing, then
    /// Closed) and stops the threads. Idempotent.
    pub fn shutdown(&mut self) {
        self.stop(Stop::Close);
    }

    /// Stops for a restart, without hurting the guests: every ring finishes
    /// its in-flight requests and responds, then is unmapped and its port
    /// closed, and nothing is written to xenstore. Connected devices stay
    /// Connected; the frontends' new requests wait in their rings until a
    /// new backend process resumes the devices (it finds backend and
    /// frontend Connected and attaches to the rings where they are).
    pub fn detach(&mut self) {
        self.stop(Stop::Detach);
    }

    fn stop(&mut self, how: Stop) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.try_send(how);
            let _ = t.join();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// One device instance as the xenbus thread tracks it.
struct Slot {
    generation: u64,
    ctx: DeviceCtx,
    device: Option<Box<dyn Device>>,
    /// The backend state we last wrote.
    state: XenbusState,
    online: bool,
    failed: bool,
    /// A frontend-state event is pending (in `Xenbus::dirty`).
    dirty: bool,
    frontend_state_path: String,
    rings: Vec<Placement>,
    /// Rings taken back and still draining; the device's next step waits
    /// for them (see [`Xenbus::released`]).
    releasing: usize,
    /// A ring of it was still busy at its drain deadline.
    stuck: bool,
    /// A failure whose Closing/Closed waits for the rings to be released.
    pending_error: Option<String>,
    /// The step whose state write waits for the rings to be released.
    after_release: Option<Step>,
    /// The frontend state last acted on.
    last_fe: Option<XenbusState>,
    /// The frontend state the device failed in: the same state again does
    /// not retry it (another one does).
    failed_with: Option<XenbusState>,
    /// Per ring in `rings`, the counters its handler publishes.
    counters: Vec<Option<Arc<RingCounters>>>,
    /// When the rings were last handed to the workers.
    connected_at: Option<Instant>,
    /// Taken over Connected from a previous process.
    resumed: bool,
}

/// A removed device whose frontend is being told to close: we wrote
/// `state = Closed` into the removed directory and watch the frontend.
struct Departing {
    generation: u64,
    frontend_state_path: String,
    /// The frontend-domain directory was absent too (we re-created it).
    created_domain_dir: bool,
    deadline: Instant,
}

/// The xenbus thread's state (owned by it).
struct Xenbus {
    /// The current xenstore connection (the platform's, cached).
    xs: xs_wire::Client,
    platform: Platform,
    xenstore_timeout: Duration,
    /// Devices whose last state write was lost with the connection: written
    /// again once it is back.
    unsynced: BTreeSet<DeviceKey>,
    home: String,
    kinds: HashMap<String, Arc<dyn DeviceType>>,
    devices: HashMap<DeviceKey, Slot>,
    /// Devices whose backend directory was removed under an attached
    /// frontend, until that frontend has closed.
    departing: HashMap<DeviceKey, Departing>,
    departure_timeout: Duration,
    drain_timeout: Duration,
    journal_dir: Option<Arc<std::path::Path>>,
    /// Stopping for a later process to resume: journals are kept.
    detaching: bool,
    /// Where workers report rings taken back ([`WorkerPool::remove`]).
    released: (Sender<Released>, Receiver<Released>),
    /// Devices whose frontend state changed, handled after a batch of events.
    dirty: Vec<(DeviceKey, u64)>,
    next_generation: u64,
    pool: WorkerPool,
    stats: Arc<Stats>,
    /// Which domains' devices are ours.
    frontends: Frontends,
    /// Devices seen that [`Frontends`] gave to another process: left
    /// untouched until their directory goes.
    foreign: BTreeSet<DeviceKey>,
}

/// Nodes of the backend directory the framework writes (their watch events
/// are ours, not the toolstack's).
const OWN_NODES: [&str; 3] = ["state", "hotplug-status", "error"];

impl Xenbus {
    fn run(
        &mut self,
        mut events: Receiver<WatchEvent>,
        failures: Receiver<Failure>,
        stop: Receiver<Stop>,
        sync: Receiver<Sender<()>>,
        snapshot: Receiver<Sender<Vec<DeviceSnapshot>>>,
    ) {
        let how;
        let released = self.released.1.clone();
        loop {
            let mut lost = false;
            let next_deadline = self.departing.values().map(|d| d.deadline).min();
            let timer = match next_deadline {
                Some(t) => crossbeam_channel::at(t),
                None => crossbeam_channel::never(),
            };
            select! {
                recv(events) -> ev => match ev {
                    Ok(ev) => {
                        self.event(ev);
                        // Take what else is queued, then handle each device's
                        // frontend-state events once: a guest writing its
                        // state in a loop costs one read per batch.
                        for ev in events.try_iter().take(EVENT_BATCH) {
                            self.event(ev);
                        }
                        self.run_dirty();
                    }
                    Err(_) => lost = true,
                },
                recv(failures) -> f => if let Ok(f) = f {
                    self.ring_failed(f);
                },
                recv(stop) -> s => {
                    how = s.unwrap_or(Stop::Close);
                    break;
                }
                recv(timer) -> _ => self.departures_expired(),
                recv(released) -> r => if let Ok(r) = r {
                    self.released(r);
                },
                recv(sync) -> done => if let Ok(done) = done {
                    self.sync(&events);
                    let _ = done.send(());
                },
                recv(snapshot) -> reply => if let Ok(reply) = reply {
                    let _ = reply.send(self.snapshot());
                },
            }
            if lost {
                match self.reconnect(&stop) {
                    Ok(new) => events = new,
                    Err(s) => {
                        how = s;
                        break;
                    }
                }
            }
        }
        self.shutdown(how);
    }

    /// The xenstore connection is gone: the rings go on being served by
    /// the workers (the data path needs no xenstore) while a new connection
    /// is tried, with back-off, for [`Config::xenstore_timeout`]. Once made:
    /// every watch again, the state writes that were lost written again,
    /// and every device looked at again, as after a watch-queue overflow.
    /// `Err`: stop (asked meanwhile, or given up: leave the devices for the
    /// next process).
    fn reconnect(&mut self, stop: &Receiver<Stop>) -> Result<Receiver<WatchEvent>, Stop> {
        log::error!("Xenstore connection lost; the rings are still served; reconnecting");
        let deadline = Instant::now() + self.xenstore_timeout;
        let mut backoff = Duration::from_millis(10);
        loop {
            if self.platform.can_reconnect() {
                match self.platform.reconnect().and_then(|client| self.resubscribe(client)) {
                    Ok(events) => {
                        log::info!("Xenstore connection made again; reconciling every device");
                        self.stats.xenstore_reconnects.fetch_add(1, Ordering::Relaxed);
                        self.resync();
                        return Ok(events);
                    }
                    Err(e) => log::warn!("Reconnecting to xenstore: {e}"),
                }
            }
            let now = Instant::now();
            if now >= deadline {
                log::error!(
                    "No xenstore for {:?}: stopping; every device stays as it is for the next process to resume",
                    self.xenstore_timeout
                );
                self.stats.xenstore_gave_up.store(1, Ordering::Relaxed);
                return Err(Stop::Detach);
            }
            match stop.recv_timeout(backoff.min(deadline - now)) {
                Ok(how) => return Err(how),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return Err(Stop::Detach),
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Makes `client` the connection and sets every watch on it again.
    fn resubscribe(&mut self, client: xs_wire::Client) -> Result<Receiver<WatchEvent>, xs_wire::ClientError> {
        self.xs = client;
        let events = self.xs.events();
        for kind in self.kinds.keys() {
            self.xs.watch(&self.frontends.watch_path(&self.root(kind)), &backend_token(kind))?;
        }
        for (key, slot) in &self.devices {
            self.xs.watch(&slot.frontend_state_path, &frontend_token(key, slot.generation))?;
        }
        for (key, d) in &self.departing {
            self.xs.watch(&d.frontend_state_path, &frontend_token(key, d.generation))?;
        }
        Ok(events)
    }

    /// After a new connection: the lost state writes again, then every
    /// device reconciled with what xenstore says now.
    fn resync(&mut self) {
        for key in std::mem::take(&mut self.unsynced) {
            let Some(state) = self.devices.get(&key).map(|s| s.state) else { continue };
            log::info!("{key}: writing state {state} again");
            self.set_state(&key, state, &[]);
        }
        self.reconcile();
    }

    /// Every device looked at again (events may have been missed).
    fn reconcile(&mut self) {
        // Devices whose creation was cut short start over (the rescan
        // creates them again).
        let unmade: Vec<DeviceKey> =
            self.devices.iter().filter(|(_, s)| s.device.is_none() && !s.failed).map(|(k, _)| k.clone()).collect();
        for key in unmade {
            self.forget(&key);
        }
        let kinds: Vec<String> = self.kinds.keys().cloned().collect();
        for kind in kinds {
            self.rescan(&kind);
        }
        let keys: Vec<DeviceKey> = self.devices.keys().cloned().collect();
        for key in keys {
            // `online` may have changed unseen.
            self.online_changed(&key);
            // A device whose `init` was cut short (by a lost connection).
            let init = self
                .devices
                .get(&key)
                .is_some_and(|s| s.state == XenbusState::Initialising && s.online && !s.failed && s.device.is_some());
            if init {
                self.init(&key);
            } else {
                self.frontend_changed(&key);
            }
        }
    }

    /// One round trip to xenstored, then every event queued by then: the
    /// reply comes after the events xenstored sent before it, and the
    /// client queues events in the order they arrive.
    fn sync(&mut self, events: &Receiver<WatchEvent>) {
        if let Err(e) = self.xs().read(TxId::NONE, &self.home) {
            log::debug!("Sync read of {}: {e}", self.home);
        }
        for ev in events.try_iter().take(events.len()) {
            self.event(ev);
        }
        self.run_dirty();
        // And every step that waits for rings to drain.
        let deadline = Instant::now() + self.drain_timeout + Duration::from_secs(1);
        while self.devices.values().any(|s| s.releasing > 0) {
            match self.released.1.recv_deadline(deadline) {
                Ok(r) => self.released(r),
                Err(_) => break,
            }
        }
    }

    /// Every device as it is now, ordered by key (in memory: no xenstore
    /// round trip).
    fn snapshot(&self) -> Vec<DeviceSnapshot> {
        // Ordered through a set (a sort would be one more in the binary).
        let mut order = BTreeSet::new();
        for key in self.devices.keys() {
            order.insert(key.clone());
        }
        order
            .into_iter()
            .filter_map(|key| self.devices.get(&key).map(|slot| (key, slot)))
            .map(|(key, slot)| DeviceSnapshot {
                key,
                state: slot.state,
                frontend_state: slot.last_fe,
                failed: slot.failed,
                resumed: slot.resumed,
                connected_for: slot.connected_at.map(|t| t.elapsed()),
                details: slot
                    .device
                    .as_ref()
                    .and_then(|d| catch_unwind(AssertUnwindSafe(|| d.describe())).ok())
                    .unwrap_or_default(),
                rings: slot.counters.iter().map(|c| c.as_ref().map(|c| c.load())).collect(),
            })
            .collect()
    }

    fn shutdown(&mut self, how: Stop) {
        self.detaching = how == Stop::Detach;
        let keys: Vec<DeviceKey> = self.devices.keys().cloned().collect();
        for key in keys {
            self.teardown_now(&key);
            if how == Stop::Close {
                self.set_state(&key, XenbusState::Closing, &[]);
                self.set_state(&key, XenbusState::Closed, &[]);
            }
            self.forget(&key);
        }
        if !self.departing.is_empty() {
            // Their frontends may not have seen Closed yet: the stray `state`
            // nodes stay, for the toolstack to remove with the frontends'.
            log::info!("Leaving {} removed device(s) with state Closed", self.departing.len());
        }
        self.pool.shutdown();
        log::info!("Backend {}", if how == Stop::Close { "shut down" } else { "detached" });
    }

    fn root(&self, kind: &str) -> String {
        format!("{}/backend/{kind}", self.home)
    }

    fn xs(&self) -> &xs_wire::Client {
        &self.xs
    }

    fn run_dirty(&mut self) {
        for (key, generation) in std::mem::take(&mut self.dirty) {
            let Some(slot) = self.devices.get_mut(&key) else { continue };
            if slot.generation == generation && slot.dirty {
                slot.dirty = false;
                self.frontend_changed(&key);
            }
        }
    }

    fn event(&mut self, ev: WatchEvent) {
        self.stats.events.fetch_add(1, Ordering::Relaxed);
        if ev.is_overflow() {
            log::warn!("Watch events were dropped; rescanning every device");
            self.stats.rescans.fetch_add(1, Ordering::Relaxed);
            self.reconcile();
            return;
        }
        if let Some(kind) = ev.token.strip_prefix("be:") {
            if !self.kinds.contains_key(kind) {
                return;
            }
            let kind = kind.to_string();
            let root = self.root(&kind);
            match parse_backend_path(&root, &kind, &ev.path) {
                Some(BackendPath::Root) => self.rescan(&kind),
                Some(BackendPath::Domain(domid)) => self.rescan_domain(&kind, domid),
                Some(BackendPath::Device { key, rest }) => self.backend_changed(key, rest),
                None => log::debug!("Ignoring event for {}", ev.path),
            }
        } else if let Some((key, generation)) = parse_frontend_token(&ev.token) {
            match self.devices.get_mut(&key) {
                Some(slot) if slot.generation == generation => {
                    if !slot.dirty {
                        slot.dirty = true;
                        self.dirty.push((key, generation));
                    }
                }
                _ if self.departing.get(&key).is_some_and(|d| d.generation == generation) => {
                    self.departing_frontend_changed(&key)
                }
                _ => log::debug!("Stale frontend event for {key} (generation {generation})"),
            }
        } else {
            log::debug!("Ignoring event with token {:?}", ev.token);
        }
    }

    /// Children of a directory that parse as numbers (absent: none).
    fn list_numbers<T: core::str::FromStr + Ord>(&self, path: &str) -> Option<BTreeSet<T>> {
        match self.xs().directory(TxId::NONE, path) {
            Ok(names) => Some(names.iter().filter_map(|n| n.parse().ok()).collect()),
            Err(e) if e.errno() == Some(XsErrno::ENOENT) => Some(BTreeSet::new()),
            Err(e) => {
                log::warn!("Listing {path}: {e}");
                None
            }
        }
    }

    fn rescan(&mut self, kind: &str) {
        let Some(mut domains) = self.list_numbers::<DomId>(&self.root(kind)) else { return };
        domains.retain(|d| self.frontends.domain(*d));
        let gone: BTreeSet<DomId> = self
            .devices
            .keys()
            .filter(|k| k.kind == kind && !domains.contains(&k.frontend))
            .map(|k| k.frontend)
            .collect();
        for domid in domains.iter().chain(gone.iter()) {
            self.rescan_domain(kind, *domid);
        }
    }

    /// Brings the devices of one frontend domain in line with its directory.
    fn rescan_domain(&mut self, kind: &str, domid: DomId) {
        if !self.frontends.domain(domid) {
            return;
        }
        let Some(devids) = self.list_numbers::<u32>(&format!("{}/{domid}", self.root(kind))) else { return };
        self.foreign.retain(|k| k.kind != kind || k.frontend != domid || devids.contains(&k.devid));
        let gone: Vec<DeviceKey> = self
            .devices
            .keys()
            .filter(|k| k.kind == kind && k.frontend == domid && !devids.contains(&k.devid))
            .cloned()
            .collect();
        for key in gone {
            self.removed(&key);
        }
        for devid in devids {
            let key = DeviceKey { kind: kind.to_string(), frontend: domid, devid };
            if !self.devices.contains_key(&key) {
                self.try_create(key);
            }
        }
    }

    fn backend_dir(&self, key: &DeviceKey) -> String {
        format!("{}/{}/{}", self.root(&key.kind), key.frontend, key.devid)
    }

    fn backend_changed(&mut self, key: DeviceKey, rest: &str) {
        if OWN_NODES.contains(&rest) || rest.starts_with("error/") {
            return;
        }
        if self.foreign.contains(&key) {
            if rest.is_empty() && !self.exists(&self.backend_dir(&key)) {
                self.foreign.remove(&key);
            }
            return;
        }
        if !self.devices.contains_key(&key) {
            self.try_create(key);
            return;
        }
        match rest {
            "" => self.directory_changed(key),
            "frontend" | "frontend-id" => {}
            "online" => self.online_changed(&key),
            node => match self.call(&key, |d, ctx| d.backend_changed(ctx, node)) {
                Some(Ok(Ok(()))) => self.publish_changes(&key),
                Some(Ok(Err(e)) | Err(e)) => self.fail(&key, e),
                None => {}
            },
        }
    }

    /// Commits what a connected device queued in `backend_changed` at once,
    /// with its `state` written again in the same transaction: how Linux's
    /// blkback tells blkfront of a new size (`xen_vbd_resize`; blkfront
    /// re-reads `sectors` on every Connected event). A device not connected
    /// yet, or whose rings are being taken back, has them committed with its
    /// next state change.
    fn publish_changes(&mut self, key: &DeviceKey) {
        let Some(slot) = self.devices.get(key) else { return };
        // Not while its rings are being taken back: the Connected event
        // would make a closing blkfront start over (`blkback_changed`).
        let settled = slot.releasing == 0 && slot.after_release.is_none() && slot.pending_error.is_none();
        if slot.state == XenbusState::Connected && settled && slot.ctx.has_writes() {
            self.set_state(key, XenbusState::Connected, &[]);
        }
    }

    /// The device directory itself changed: removed, or removed and created
    /// again before we saw it go (its `state` is then no longer ours; the
    /// toolstack writes `state = 1` on creation). Our own writes touch only
    /// nodes below the directory, so they never land here.
    fn directory_changed(&mut self, key: DeviceKey) {
        let dir = self.backend_dir(&key);
        if !self.exists(&dir) {
            return self.removed(&key);
        }
        let on_disk = self.xs().read(TxId::NONE, &format!("{dir}/state")).ok().and_then(|v| XenbusState::parse(&v));
        let ours = self.devices.get(&key).map(|s| s.state);
        if on_disk != ours {
            log::info!("{key}: directory re-created (state {on_disk:?}, ours {ours:?})");
            self.remove(&key);
            self.try_create(key);
        }
    }

    fn exists(&self, path: &str) -> bool {
        !matches!(self.xs().read(TxId::NONE, path), Err(e) if e.errno() == Some(XsErrno::ENOENT))
    }

    /// Creates a device once its backend directory has `frontend` and a
    /// matching `frontend-id`.
    fn try_create(&mut self, key: DeviceKey) {
        let Some(kind) = self.kinds.get(&key.kind).cloned() else { return };
        let dir = self.backend_dir(&key);
        let nodes = [format!("{dir}/frontend"), format!("{dir}/frontend-id"), format!("{dir}/online")];
        let paths: Vec<&str> = nodes.iter().map(String::as_str).collect();
        let values = match self.xs().read_many(TxId::NONE, &paths) {
            Ok(v) => v,
            Err(e) => {
                log::warn!("Reading {dir}: {e}");
                return;
            }
        };
        let text = |i: usize| -> Option<String> {
            values[i].as_ref().ok().map(|v| String::from_utf8_lossy(v).trim_end_matches('\0').trim().to_string())
        };
        let (Some(frontend), Some(frontend_id)) = (text(0), text(1)) else {
            log::debug!("{dir}: waiting for frontend and frontend-id");
            return;
        };
        if frontend_id != key.frontend.to_string() || !frontend.starts_with('/') || frontend.ends_with('/') {
            log::warn!("{dir}: frontend {frontend:?} / frontend-id {frontend_id:?} do not match the path; ignored");
            return;
        }
        // Asked once the directory is complete (frontend and frontend-id
        // written), before anything is written for the device.
        if !self.frontends.device(self.xs(), &key, &dir) {
            log::info!("{key}: not this process's (frontends {:?}); left to its own backend", self.frontends);
            self.foreign.insert(key);
            return;
        }
        // The type's own say, from the nodes (a console another daemon serves).
        if !catch_unwind(AssertUnwindSafe(|| kind.serves(self.xs(), &key, &frontend))).unwrap_or(false) {
            log::info!("{key}: not served by the {} device type; left to its own backend", kind.name());
            self.foreign.insert(key);
            return;
        }
        let online = text(2).as_deref() == Some("1");
        // Left Connected by a previous backend process, with its frontend
        // Connected: take it over without a state change (see `resume`).
        let resume = online
            && self.read_state(&format!("{dir}/state")) == Some(XenbusState::Connected)
            && self.read_state(&format!("{frontend}/state")) == Some(XenbusState::Connected);
        if let Some(d) = self.departing.remove(&key) {
            // Re-created by the toolstack: the directory is theirs again.
            log::info!("{key}: re-created while its frontend was closing");
            self.unwatch_frontend(&key, &d.frontend_state_path, d.generation);
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        let ctx = DeviceCtx::new(self.platform.clone(), key.clone(), dir, frontend.clone())
            .with_journal_dir(self.journal_dir.clone());
        let frontend_state_path = format!("{frontend}/state");
        log::info!("{key}: new device (generation {generation}), frontend {frontend}");
        self.devices.insert(
            key.clone(),
            Slot {
                generation,
                ctx,
                device: None,
                state: XenbusState::Unknown,
                online,
                failed: false,
                dirty: false,
                frontend_state_path,
                rings: Vec::new(),
                releasing: 0,
                stuck: false,
                pending_error: None,
                after_release: None,
                last_fe: None,
                failed_with: None,
                counters: Vec::new(),
                connected_at: None,
                resumed: false,
            },
        );
        self.stats.devices.fetch_add(1, Ordering::Relaxed);
        let created = {
            let slot = &self.devices[&key];
            catch_unwind(AssertUnwindSafe(|| kind.create(&slot.ctx)))
                .unwrap_or_else(|p| Err(DeviceError::Panic(panic_message(&*p))))
        };
        match created {
            Ok(device) => self.devices.get_mut(&key).expect("just inserted").device = Some(device),
            Err(e) => {
                self.fail(&key, e);
                return;
            }
        }
        if !resume && !self.set_state(&key, XenbusState::Initialising, &[]) {
            return;
        }
        let slot = &self.devices[&key];
        if let Err(e) = self.xs().watch(&slot.frontend_state_path, &frontend_token(&key, generation)) {
            self.fail(&key, e.into());
            return;
        }
        if resume {
            self.resume(&key);
        } else if online {
            self.init(&key);
        }
    }

    /// A state node's value (`None` if absent, unreadable or not a state).
    fn read_state(&self, path: &str) -> Option<XenbusState> {
        self.xs().read(TxId::NONE, path).ok().and_then(|v| XenbusState::parse(&v))
    }

    /// Takes over a device a previous backend process left Connected:
    /// `init` and `connect` with [`DeviceCtx::resuming`] set, so that the
    /// rings are attached where they are; the guest sees its backend's state
    /// rewritten as Connected and nothing else.
    fn resume(&mut self, key: &DeviceKey) {
        log::info!("{key}: found Connected; resuming it");
        match self.call(key, |d, ctx| d.init(ctx)) {
            Some(Ok(Ok(()))) => {}
            Some(Ok(Err(e)) | Err(e)) => return self.fail(key, e),
            None => return,
        }
        let Some(slot) = self.devices.get_mut(key) else { return };
        // What the device is now, though not written: teardown disconnects it.
        slot.state = XenbusState::InitWait;
        slot.ctx.set_resuming(true);
        slot.resumed = true;
        self.stats.resumes.fetch_add(1, Ordering::Relaxed);
        self.connect(key);
        // Still resuming if the connection was cut before the rings were
        // attached: the next attempt must take them where they are too.
        if let Some(slot) = self.devices.get(key).filter(|s| s.state == XenbusState::Connected || !s.rings.is_empty()) {
            slot.ctx.set_resuming(false);
        }
    }

    fn online_changed(&mut self, key: &DeviceKey) {
        let online = self.exists(&self.backend_dir(key))
            && matches!(self.xs().read(TxId::NONE, &format!("{}/online", self.backend_dir(key))), Ok(v) if v.starts_with(b"1"));
        let Some(slot) = self.devices.get_mut(key) else { return };
        let was = std::mem::replace(&mut slot.online, online);
        if online && !was && slot.state == XenbusState::Initialising && !slot.failed {
            self.init(key);
        }
    }

    /// Runs a device callback with panics caught; `None` if there is no device.
    fn call<T>(
        &mut self,
        key: &DeviceKey,
        f: impl FnOnce(&mut dyn Device, &DeviceCtx) -> T,
    ) -> Option<Result<T, DeviceError>> {
        let slot = self.devices.get_mut(key)?;
        let device = slot.device.as_mut()?;
        Some(
            catch_unwind(AssertUnwindSafe(|| f(&mut **device, &slot.ctx)))
                .map_err(|p| DeviceError::Panic(panic_message(&*p))),
        )
    }

    /// `init` then InitWait (with `hotplug-status = connected`).
    fn init(&mut self, key: &DeviceKey) {
        // A new attempt: a failure now is recorded afresh.
        let was_failed = self.devices.get_mut(key).is_some_and(|s| std::mem::replace(&mut s.failed, false));
        match self.call(key, |d, ctx| d.init(ctx)) {
            Some(Ok(Ok(()))) => {}
            Some(Ok(Err(e)) | Err(e)) => return self.fail(key, e),
            None => return,
        }
        let mut extra: Vec<(&str, &[u8])> = vec![("hotplug-status", b"connected")];
        if was_failed {
            extra.push(("error", b""));
            if let Err(e) = rm_quiet(self.xs(), TxId::NONE, &self.linux_error_path(key)) {
                log::warn!("{key}: removing the old error: {e}");
            }
        }
        if self.set_state(key, XenbusState::InitWait, &extra) {
            // The frontend may be Initialised already (e.g. `online` came late).
            self.frontend_changed(key);
        }
    }

    /// Where Linux's `xenbus_dev_fatal` writes a device's error:
    /// `error/<nodename>/error` below the backend domain's home.
    fn linux_error_path(&self, key: &DeviceKey) -> String {
        format!("{}/error/backend/{}/{}/{}/error", self.home, key.kind, key.frontend, key.devid)
    }

    fn frontend_changed(&mut self, key: &DeviceKey) {
        let Some(slot) = self.devices.get(key) else { return };
        if slot.releasing > 0 {
            // Looked at again once the rings are back.
            return;
        }
        let (be, online) = (slot.state, slot.online);
        let fe = match self.xs().read(TxId::NONE, &slot.frontend_state_path) {
            Ok(v) => match XenbusState::parse(&v) {
                Some(s) => s,
                None => {
                    let shown = String::from_utf8_lossy(&v[..v.len().min(32)]).into_owned();
                    return self.fail(key, DeviceError::BadState(shown));
                }
            },
            Err(e) if e.errno() == Some(XsErrno::ENOENT) => XenbusState::Unknown,
            Err(e) => {
                log::warn!("{key}: reading frontend state: {e}");
                return;
            }
        };
        log::debug!("{key}: frontend {fe}, backend {be}");
        if let Some(slot) = self.devices.get_mut(key) {
            slot.last_fe = Some(fe);
            if slot.failed && slot.failed_with == Some(fe) {
                // Failed in this very state: a frontend that starts over
                // writes another one first (Linux's always do), so a
                // repeated event or write costs no new attempt.
                return;
            }
            slot.failed_with = None;
        }
        let step = step(fe, be, online);
        match step {
            Step::Nothing => {}
            Step::Connect => self.connect(key),
            Step::Reinitialise { .. } | Step::Close(_) => {
                if self.teardown(key) {
                    self.finish_step(key, step);
                } else if let Some(slot) = self.devices.get_mut(key) {
                    // The rings drain meanwhile; every other device is served.
                    slot.after_release = Some(step);
                }
            }
        }
    }

    /// What a step does once the device's rings are back.
    fn finish_step(&mut self, key: &DeviceKey, step: Step) {
        match step {
            Step::Reinitialise { close_first } => {
                if close_first {
                    self.set_state(key, XenbusState::Closing, &[]);
                }
                self.init(key);
            }
            Step::Close(state) => {
                self.set_state(key, state, &[]);
            }
            Step::Nothing | Step::Connect => {}
        }
    }

    fn connect(&mut self, key: &DeviceKey) {
        let rings = match self.call(key, |d, ctx| d.connect(ctx)) {
            Some(Ok(Ok(rings))) => rings,
            Some(Ok(Err(e)) | Err(e)) => return self.fail(key, e),
            None => return,
        };
        let Some(slot) = self.devices.get(key) else { return };
        let owner = Owner { key: key.clone(), generation: slot.generation };
        let counters =
            rings.iter().map(|r| catch_unwind(AssertUnwindSafe(|| r.handler.counters())).unwrap_or(None)).collect();
        let placements: Vec<Placement> = rings.into_iter().map(|r| self.pool.add(owner.clone(), r)).collect();
        if let Some(slot) = self.devices.get_mut(key) {
            slot.rings = placements;
            slot.counters = counters;
            slot.connected_at = Some(Instant::now());
        }
        // Counted before the state is written, so that whoever sees Connected
        // sees the count too.
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        if self.set_state(key, XenbusState::Connected, &[]) {
            log::info!("{key}: connected");
            let _ = self.call(key, |d, ctx| d.connected(ctx));
        }
    }

    /// Takes the rings back from the workers and lets the device release
    /// the rest (only if it was connecting or connected). The rings drain in
    /// the background, so this never waits for I/O: false while they are
    /// not all back, and [`Xenbus::released`] carries on once they are.
    fn teardown(&mut self, key: &DeviceKey) -> bool {
        let Some(slot) = self.devices.get_mut(key) else { return true };
        let rings = std::mem::take(&mut slot.rings);
        slot.counters.clear();
        slot.connected_at = None;
        let owner = Owner { key: key.clone(), generation: slot.generation };
        for p in rings {
            if self.pool.remove(p, owner.clone(), self.drain_timeout, self.released.0.clone()) {
                slot.releasing += 1;
            } else {
                log::error!("{owner:?}: its worker is gone; the ring is lost with it");
            }
        }
        if slot.releasing > 0 {
            return false;
        }
        let was_connected = matches!(slot.state, XenbusState::Connected | XenbusState::InitWait);
        if was_connected {
            if let Some(Err(e)) = self.call(key, |d, ctx| d.disconnect(ctx)) {
                log::error!("{key}: disconnect: {e}");
            }
        }
        if !self.detaching {
            if let Some(slot) = self.devices.get(key) {
                slot.ctx.remove_journals();
            }
        }
        true
    }

    /// [`Xenbus::teardown`] that waits for the rings (at shutdown, when
    /// nothing else is served any more).
    fn teardown_now(&mut self, key: &DeviceKey) {
        let deadline = Instant::now() + self.drain_timeout + Duration::from_secs(1);
        while !self.teardown(key) {
            match self.released.1.recv_deadline(deadline) {
                Ok(r) => {
                    if let Some(slot) = self.devices.get_mut(&r.owner.key) {
                        if slot.generation == r.owner.generation {
                            slot.releasing = slot.releasing.saturating_sub(1);
                        }
                    }
                }
                Err(_) => {
                    log::error!("{key}: rings not released in time; shutting down without them");
                    if let Some(slot) = self.devices.get_mut(key) {
                        slot.releasing = 0;
                    }
                }
            }
        }
    }

    /// A ring taken back is released. Once all of a device's are, what
    /// waited for them goes on: a pending failure closes the device (a
    /// ring stuck past its deadline fails it), else the frontend's state is
    /// looked at again.
    fn released(&mut self, r: Released) {
        let key = r.owner.key.clone();
        let Some(slot) = self.devices.get_mut(&key) else { return };
        if slot.generation != r.owner.generation || slot.releasing == 0 {
            return;
        }
        slot.releasing -= 1;
        slot.stuck |= r.stuck;
        if slot.releasing > 0 {
            return;
        }
        if std::mem::take(&mut slot.stuck) {
            self.stats.stuck_rings.fetch_add(1, Ordering::Relaxed);
            let msg = format!("I/O still in flight {:?} after the disconnect; ring dropped aside", self.drain_timeout);
            // A failure already pending is written first.
            if slot.pending_error.is_none() {
                return self.fail(&key, DeviceError::msg(msg));
            }
        }
        let after = slot.after_release.take();
        if slot.pending_error.is_some() {
            self.finish_fail(&key);
            return;
        }
        if let Some(step) = after {
            if !self.teardown(&key) {
                return;
            }
            self.finish_step(&key, step);
        }
        // The frontend may have moved on while the rings drained.
        self.frontend_changed(&key);
    }

    /// Writes queued device nodes, `extra` and `state`, in one transaction
    /// and only if the backend directory still exists. False if it is gone
    /// (the device is then removed) or the write failed (the device failed).
    fn set_state(&mut self, key: &DeviceKey, state: XenbusState, extra: &[(&str, &[u8])]) -> bool {
        let Some(slot) = self.devices.get(key) else { return false };
        let dir = slot.ctx.backend_path().to_string();
        let writes = slot.ctx.take_writes();
        let xs = self.xs().clone();
        let res = xs.transaction(|tx| {
            match xs.read(tx, &dir) {
                Err(e) if e.errno() == Some(XsErrno::ENOENT) => return Ok(false),
                r => r?,
            };
            for (node, value) in &writes {
                xs.write(tx, &format!("{dir}/{node}"), value)?;
            }
            for (node, value) in extra {
                if value.is_empty() && *node == "error" {
                    rm_quiet(&xs, tx, &format!("{dir}/error"))?;
                } else {
                    xs.write(tx, &format!("{dir}/{node}"), value)?;
                }
            }
            xs.write(tx, &format!("{dir}/state"), state.as_u32().to_string().as_bytes())?;
            Ok(true)
        });
        match res {
            Ok(true) => {
                if let Some(slot) = self.devices.get_mut(key) {
                    slot.state = state;
                }
                true
            }
            Ok(false) => {
                log::info!("{key}: backend directory gone");
                self.removed(key);
                false
            }
            Err(e) => {
                log::error!("{key}: writing state {state}: {e}");
                if let Some(slot) = self.devices.get_mut(key) {
                    slot.state = state;
                    if self.xs.is_dead() {
                        // Written again once the connection is back.
                        let extra = extra.iter().filter(|(n, v)| !(v.is_empty() && *n == "error"));
                        let extra = extra.map(|(n, v)| (n.to_string(), v.to_vec()));
                        slot.ctx.requeue_writes(writes.into_iter().chain(extra).collect());
                        self.unsynced.insert(key.clone());
                    }
                }
                false
            }
        }
    }

    /// A fatal device error: as Linux's `xenbus_dev_fatal`, write the error
    /// (in the backend directory and in `error/backend/...` of the backend
    /// domain), tear the device down and go Closing, then Closed.
    fn fail(&mut self, key: &DeviceKey, error: DeviceError) {
        if matches!(error, DeviceError::Xenstore(_)) && self.xs.is_dead() {
            // Not the device's fault: it is looked at again once the
            // connection is back (`reconcile`).
            log::warn!("{key}: {error}; retried after reconnecting");
            return;
        }
        let text = error.node_text();
        if self.devices.get(key).is_some_and(|s| s.failed && s.state == XenbusState::Closed) {
            // Already failed and closed: the first error stays (a frontend
            // repeating its garbage does not rewrite it).
            log::debug!("{key}: again: {text}");
            return;
        }
        if self.devices.get(key).is_some_and(|s| s.pending_error.is_some()) {
            log::debug!("{key}: again while closing: {text}");
            return;
        }
        log::error!("{key}: {text}");
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        let linux_error = self.linux_error_path(key);
        if let Err(e) = self.xs().write(TxId::NONE, &linux_error, text.as_bytes()) {
            log::warn!("{key}: writing {linux_error}: {e}");
        }
        let Some(slot) = self.devices.get_mut(key) else { return };
        slot.failed = true;
        slot.failed_with = slot.last_fe;
        slot.pending_error = Some(text);
        self.finish_fail(key);
    }

    /// The rest of [`Xenbus::fail`], once the rings are back: Closing with
    /// the error, then Closed.
    fn finish_fail(&mut self, key: &DeviceKey) {
        if !self.teardown(key) {
            return;
        }
        let Some(text) = self.devices.get_mut(key).and_then(|s| s.pending_error.take()) else { return };
        if self.set_state(key, XenbusState::Closing, &[("error", text.as_bytes())]) {
            self.set_state(key, XenbusState::Closed, &[]);
        }
    }

    fn ring_failed(&mut self, f: Failure) {
        let current = self.devices.get(&f.owner.key).is_some_and(|s| s.generation == f.owner.generation);
        if current {
            // Rings of a failed device that are still placed are removed by fail().
            self.fail(&f.owner.key, f.error);
        } else {
            log::debug!("Failure of a previous instance of {}: {}", f.owner.key, f.error);
        }
    }

    /// Tears a device down and forgets it, writing nothing (its directory
    /// was re-created, so it is no longer ours to write).
    fn remove(&mut self, key: &DeviceKey) {
        if !self.devices.contains_key(key) {
            return;
        }
        log::info!("{key}: removed");
        self.teardown(key);
        self.forget(key);
    }

    /// The backend directory is gone. Tear down; then, if a frontend is
    /// still attached, tell it: Linux's frontends learn of a vanished
    /// backend only from its `state` node (Linux 6.1's blkback writes nothing
    /// then, and the guest's I/O hangs; QEMU closes before removing). So
    /// write `state = Closed` in its place, only while the directory is
    /// still absent, and remove that node again once the frontend has closed.
    fn removed(&mut self, key: &DeviceKey) {
        let Some(slot) = self.devices.get(key) else { return };
        let (generation, path) = (slot.generation, slot.frontend_state_path.clone());
        log::info!("{key}: backend directory removed");
        self.teardown(key);
        // Untracked, but the frontend watch stays while it departs.
        self.untrack(key);
        if !self.frontend_attached(&path) {
            return self.unwatch_frontend(key, &path, generation);
        }
        match self.write_departure(key) {
            Ok(Some(created_domain_dir)) => {
                log::info!("{key}: frontend still attached; wrote state Closed in the removed directory");
                self.stats.departures.fetch_add(1, Ordering::Relaxed);
                let deadline = Instant::now() + self.departure_timeout;
                self.departing.insert(
                    key.clone(),
                    Departing { generation, frontend_state_path: path, created_domain_dir, deadline },
                );
                // The frontend may have closed before the watch could tell.
                self.departing_frontend_changed(key);
            }
            Ok(None) => self.unwatch_frontend(key, &path, generation),
            Err(e) => {
                log::warn!("{key}: telling the frontend of the removal: {e}");
                self.unwatch_frontend(key, &path, generation);
            }
        }
    }

    /// Whether a frontend state is one that waits for its backend (not
    /// absent, Unknown or Closed).
    fn frontend_attached(&self, frontend_state_path: &str) -> bool {
        match self.xs().read(TxId::NONE, frontend_state_path) {
            Ok(v) => !matches!(XenbusState::parse(&v), None | Some(XenbusState::Unknown | XenbusState::Closed)),
            Err(_) => false,
        }
    }

    /// Writes `state = Closed` into the removed backend directory, owned by
    /// us and readable by the frontend (as the toolstack creates it), only
    /// if the directory is still absent. `Some(created_domain_dir)` if
    /// written, `None` if the directory exists again.
    fn write_departure(&self, key: &DeviceKey) -> Result<Option<bool>, ClientError> {
        let dir = self.backend_dir(key);
        let domain_dir = format!("{}/{}", self.root(&key.kind), key.frontend);
        let perms =
            [Perm::new(Access::None, self.platform.domid().into()), Perm::new(Access::Read, key.frontend.into())];
        let xs = self.xs();
        xs.transaction(|tx| {
            if exists_in(xs, tx, &dir)? {
                return Ok(None);
            }
            let created_domain_dir = !exists_in(xs, tx, &domain_dir)?;
            xs.mkdir(tx, &dir)?;
            xs.set_perms(tx, &dir, &perms)?;
            let state = format!("{dir}/state");
            xs.write(tx, &state, XenbusState::Closed.as_u32().to_string().as_bytes())?;
            xs.set_perms(tx, &state, &perms)?;
            Ok(Some(created_domain_dir))
        })
    }

    /// A departing device's frontend state changed: once it is no longer
    /// attached, remove what we wrote.
    fn departing_frontend_changed(&mut self, key: &DeviceKey) {
        let Some(d) = self.departing.get(key) else { return };
        if self.frontend_attached(&d.frontend_state_path) {
            return;
        }
        log::info!("{key}: frontend closed after the removal");
        self.finish_departure(key);
    }

    fn departures_expired(&mut self) {
        let now = Instant::now();
        let expired: Vec<DeviceKey> =
            self.departing.iter().filter(|(_, d)| d.deadline <= now).map(|(k, _)| k.clone()).collect();
        for key in expired {
            log::warn!("{key}: frontend did not close within {:?} of the removal", self.departure_timeout);
            self.finish_departure(&key);
        }
    }

    /// Removes the `state` node written by [`Xenbus::write_departure`], and
    /// the directories it re-created, unless the toolstack has since put
    /// anything else there.
    fn finish_departure(&mut self, key: &DeviceKey) {
        let Some(d) = self.departing.remove(key) else { return };
        self.unwatch_frontend(key, &d.frontend_state_path, d.generation);
        let dir = self.backend_dir(key);
        let domain_dir = format!("{}/{}", self.root(&key.kind), key.frontend);
        let closed = XenbusState::Closed.as_u32().to_string();
        let xs = self.xs();
        let res = xs.transaction(|tx| {
            let children = match xs.directory(tx, &dir) {
                Err(e) if e.errno() == Some(XsErrno::ENOENT) => return Ok(()),
                r => r?,
            };
            let ours = children == ["state"] && xs.read(tx, &format!("{dir}/state"))? == closed.as_bytes();
            if !ours {
                return Ok(());
            }
            xs.rm(tx, &dir)?;
            if d.created_domain_dir && xs.directory(tx, &domain_dir)?.is_empty() {
                xs.rm(tx, &domain_dir)?;
            }
            Ok(())
        });
        if let Err(e) = res {
            log::warn!("{key}: removing the Closed state left for the frontend: {e}");
        }
    }

    fn forget(&mut self, key: &DeviceKey) {
        if let Some(slot) = self.untrack(key) {
            self.unwatch_frontend(key, &slot.frontend_state_path, slot.generation);
        }
    }

    fn untrack(&mut self, key: &DeviceKey) -> Option<Slot> {
        let slot = self.devices.remove(key)?;
        self.stats.devices.fetch_sub(1, Ordering::Relaxed);
        Some(slot)
    }

    fn unwatch_frontend(&self, key: &DeviceKey, frontend_state_path: &str, generation: u64) {
        if let Err(e) = self.xs().unwatch(frontend_state_path, &frontend_token(key, generation)) {
            log::debug!("{key}: unwatch: {e}");
        }
    }
}

/// Whether a node exists, inside a transaction.
fn exists_in(xs: &xs_wire::Client, tx: TxId, path: &str) -> Result<bool, ClientError> {
    match xs.read(tx, path) {
        Ok(_) => Ok(true),
        Err(e) if e.errno() == Some(XsErrno::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `rm` that ignores an absent node.
fn rm_quiet(xs: &xs_wire::Client, tx: TxId, path: &str) -> Result<(), ClientError> {
    match xs.rm(tx, path) {
        Err(e) if e.errno() == Some(XsErrno::ENOENT) => Ok(()),
        r => r,
    }
}
