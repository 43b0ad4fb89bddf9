//! Every domain's primary console, as xenconsoled serves it
//! (`tools/console/daemon/io.c`), for `xenbackd serve --consoles`.
//!
//! One thread on a xenstore connection of its own watches
//! `@introduceDomain` and `@releaseDomain` and, per domain, its
//! `/local/domain/N/console` directory. A console is served once it has
//! `ring-ref` and `port`, and only if its `type` is absent or
//! `xenconsoled` (a device model's `ioemu` console is not ours). Its page
//! is mapped through gntdev at `GNTTAB_RESERVED_CONSOLE` (0), which the
//! domain builder grants to the console domain, as xenconsoled prefers; we
//! have no foreign mapping (privcmd) to fall back on, so a guest whose
//! page cannot be mapped that way is logged as unavailable and left alone.
//! Each console gets a pty whose name goes to `console/tty` (where `xl
//! console` reads it), optionally a log file, and a [`ConsoleRing`] on the
//! shared [`RingPool`]: the same budgets and rate limit as any ring.
//!
//! Never two daemons on one console: [`running_xenconsoled`] finds a live
//! xenconsoled (its pid file, or a process of that name) before anything
//! starts, and a `tty` node that names an existing pty not ours means
//! another daemon serves that guest; both are refused unless forced.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use evtchn::{DomId, Port};
use xen_backend::{BoundPort, DeviceError, DeviceKey, PlacedRing, Platform, RingPool, RingSetup};
use xs_wire::{Client, TxId, XsErrno};

use crate::abi::GNTTAB_RESERVED_CONSOLE;
use crate::config::{buffer_for_limit, Connection, MAX_BUFFER};
use crate::host::Host;
use crate::log::LogFile;
use crate::ring::{ConsoleRing, HostSlot, Limits, OutputSink};

/// The pid files xenconsoled writes (`-p`; its init scripts' default).
pub const XENCONSOLED_PID_FILES: &[&str] = &["/var/run/xenconsoled.pid", "/run/xenconsoled.pid"];
/// How long a domain's ring may take to go away.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the thread looks at ring failures and the stop flag.
const TICK: Duration = Duration::from_millis(100);

/// Why the service cannot start.
#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    /// A xenconsoled serves the consoles already.
    #[error("xenconsoled is running ({0}); stop it first, or force")]
    XenconsoledRunning(String),
    /// Xenstore refused.
    #[error("Xenstore request failed")]
    Xenstore(#[source] xs_wire::ClientError),
    /// The workers or the thread could not start.
    #[error("Cannot start the console service")]
    Start(#[source] xen_backend::Error),
}

/// How primary consoles are served.
#[derive(Clone, Debug)]
pub struct PrimaryOptions {
    /// Per console; the buffer is also bounded by the `limit` node.
    pub limits: Limits,
    /// Where `guest-<name>.log` files go (none: no logs).
    pub log_dir: Option<PathBuf>,
    /// Bytes per log file before it is rotated.
    pub log_max: u64,
    /// Serve even though xenconsoled or another daemon seems to.
    pub force: bool,
    /// Worker threads for the consoles.
    pub workers: usize,
    /// Budget units per pass ([`crate::BYTES_PER_UNIT`] bytes each).
    pub ring_budget: usize,
    /// The pid files to look for a running xenconsoled in.
    pub pid_files: Vec<PathBuf>,
    /// Where to look for a process named xenconsoled (`/proc`).
    pub proc_dir: PathBuf,
}

impl Default for PrimaryOptions {
    fn default() -> Self {
        PrimaryOptions {
            // xenconsoled's default: a console nobody reads never stops its guest.
            limits: Limits { overflow: crate::Overflow::DiscardOldest, ..Limits::default() },
            log_dir: None,
            log_max: 16 << 20,
            force: false,
            workers: 1,
            ring_budget: xen_backend::DEFAULT_RING_BUDGET,
            pid_files: XENCONSOLED_PID_FILES.iter().map(PathBuf::from).collect(),
            proc_dir: PathBuf::from("/proc"),
        }
    }
}

/// What a running xenconsoled shows of itself: a pid file naming a live
/// process, or a process called `xenconsoled`. `None` if neither.
pub fn running_xenconsoled(pid_files: &[PathBuf], proc_dir: &Path) -> Option<String> {
    for f in pid_files {
        let Ok(text) = std::fs::read_to_string(f) else { continue };
        let Ok(pid) = text.trim().parse::<i32>() else { continue };
        if pid <= 0 {
            continue;
        }
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
            Ok(()) | Err(nix::errno::Errno::EPERM) => return Some(format!("{} names live process {pid}", f.display())),
            Err(_) => {}
        }
    }
    let entries = std::fs::read_dir(proc_dir).ok()?;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else { continue };
        if std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "xenconsoled") {
            return Some(format!("process {pid} is xenconsoled"));
        }
    }
    None
}

/// What a domain's `console` directory says, as values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrimaryNodes {
    /// `type`.
    pub kind: Option<String>,
    /// `ring-ref` (the page's frame; we map the reserved grant instead).
    pub ring_ref: Option<String>,
    /// `port`.
    pub port: Option<String>,
    /// `limit`.
    pub limit: Option<String>,
    /// `tty`.
    pub tty: Option<String>,
}

/// What to do with a domain's console.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Serve it: the guest's port, the buffer.
    Serve {
        /// The port to bind.
        port: u32,
        /// Bytes of output kept.
        buffer: usize,
    },
    /// Not yet complete (`ring-ref` or `port` missing): wait for the watch.
    NotYet,
    /// Not ours, with why (logged once).
    Skip(String),
}

/// Decides about a console from its nodes; `ours` is the tty we wrote, if
/// any; `tty_exists` says whether a pty path exists.
pub fn decide(nodes: &PrimaryNodes, ours: Option<&str>, force: bool, tty_exists: &dyn Fn(&str) -> bool) -> Decision {
    if let Some(t) = nodes.kind.as_deref().filter(|t| *t != crate::config::TYPE_XENCONSOLED) {
        return Decision::Skip(format!("its console is of type {t:?}, not xenconsoled"));
    }
    let (Some(_), Some(port)) = (&nodes.ring_ref, &nodes.port) else { return Decision::NotYet };
    // `%i`, as xenconsoled reads it.
    let Some(port) = xen_bus_scan(port) else { return Decision::Skip(format!("bad port {port:?}")) };
    if let Some(tty) = nodes.tty.as_deref().filter(|t| !t.is_empty()) {
        if Some(tty) != ours && tty_exists(tty) && !force {
            return Decision::Skip(format!(
                "its tty is already {tty}, a pty another console daemon (xenconsoled?) holds open; not taken over (force to)"
            ));
        }
    }
    let buffer = match nodes.limit.as_deref().map(|l| l.trim().parse::<u64>()) {
        Some(Ok(n)) => buffer_for_limit(n),
        None | Some(Err(_)) => MAX_BUFFER,
    };
    Decision::Serve { port, buffer }
}

/// A decimal port number (leading digits, as `sscanf("%i")` reads one).
fn xen_bus_scan(s: &str) -> Option<u32> {
    let digits: String = s.trim().chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// One domain's console.
struct Console {
    host: Option<HostSlot>,
    tty: Option<String>,
    ring: Option<(PlacedRing, u32, String)>,
    /// Why it is not served, once logged.
    skipped: Option<String>,
}

/// The running service; stops on drop.
pub struct PrimaryConsoles {
    stop: Arc<AtomicBool>,
    reopen: Arc<AtomicU64>,
    thread: Option<JoinHandle<Option<()>>>,
    served: Arc<Mutex<Vec<(DomId, String)>>>,
}

impl PrimaryConsoles {
    /// Starts serving every domain's primary console through `platform`
    /// (its xenstore connection must be this service's alone).
    pub fn start(platform: Platform, opts: PrimaryOptions) -> Result<Self, PrimaryError> {
        if !opts.force {
            if let Some(why) = running_xenconsoled(&opts.pid_files, &opts.proc_dir) {
                return Err(PrimaryError::XenconsoledRunning(why));
            }
        }
        let pool = RingPool::new(opts.workers, opts.ring_budget).map_err(PrimaryError::Start)?;
        let xs = platform.xenstore();
        let events = xs.events();
        for path in ["@introduceDomain", "@releaseDomain"] {
            xs.watch(path, "cons:domains").map_err(PrimaryError::Xenstore)?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let reopen = Arc::new(AtomicU64::new(0));
        let served = Arc::new(Mutex::new(Vec::new()));
        let mut svc = Service {
            platform,
            xs,
            pool,
            opts,
            consoles: BTreeMap::new(),
            reopen: reopen.clone(),
            served: served.clone(),
        };
        let flag = stop.clone();
        let thread = xen_backend::spawn_named(
            "xenbackd-consoled",
            |msg| log::error!("The primary console thread died: {msg}; consoles are no longer set up"),
            move || {
                svc.domains();
                while !flag.load(Ordering::Relaxed) {
                    match events.recv_timeout(TICK) {
                        Ok(ev) => svc.event(&ev.token),
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                            log::error!(
                                "xenstore connection of the console service lost; consoles keep running, none is added"
                            );
                            while !flag.load(Ordering::Relaxed) {
                                std::thread::sleep(TICK);
                                svc.failures();
                            }
                            break;
                        }
                    }
                    svc.failures();
                }
                svc.shutdown();
            },
        )
        .map_err(PrimaryError::Start)?;
        Ok(PrimaryConsoles { stop, reopen, thread: Some(thread), served })
    }

    /// Reopens every log file (SIGHUP, after logrotate moved them).
    pub fn reopen_logs(&self) {
        self.reopen.fetch_add(1, Ordering::Relaxed);
    }

    /// The consoles served: domain and pty.
    pub fn served(&self) -> Vec<(DomId, String)> {
        self.served.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops: every ring taken back, every pty closed.
    pub fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for PrimaryConsoles {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl core::fmt::Debug for PrimaryConsoles {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("PrimaryConsoles").field("served", &self.served()).finish_non_exhaustive()
    }
}

struct Service {
    platform: Platform,
    xs: Client,
    pool: RingPool,
    opts: PrimaryOptions,
    consoles: BTreeMap<DomId, Console>,
    reopen: Arc<AtomicU64>,
    served: Arc<Mutex<Vec<(DomId, String)>>>,
}

fn dom_token(domid: DomId) -> String {
    format!("cons:dom:{domid}")
}

impl Service {
    fn event(&mut self, token: &str) {
        match token.strip_prefix("cons:dom:").map(str::parse::<DomId>) {
            Some(Ok(domid)) => self.refresh(domid),
            Some(Err(_)) => log::warn!("unknown watch token {token:?}"),
            // The domain list, or a dropped-events marker: look at everything.
            None => {
                self.domains();
                for domid in self.consoles.keys().copied().collect::<Vec<_>>() {
                    self.refresh(domid);
                }
            }
        }
    }

    /// Adds the domains xenstore lists and drops the ones gone.
    fn domains(&mut self) {
        let listed: Vec<DomId> = match self.xs.directory(TxId::NONE, "/local/domain") {
            Ok(l) => l.iter().filter_map(|d| d.parse().ok()).filter(|d| *d != self.platform.domid()).collect(),
            Err(e) => {
                log::warn!("listing /local/domain: {e}");
                return;
            }
        };
        let gone: Vec<DomId> = self
            .consoles
            .keys()
            .copied()
            .filter(|d| !listed.contains(d) || self.xs.is_domain_introduced(u32::from(*d)).is_ok_and(|i| !i))
            .collect();
        for domid in gone {
            self.remove(domid, "the domain is gone");
        }
        for domid in listed {
            if self.consoles.contains_key(&domid) {
                continue;
            }
            self.consoles.insert(domid, Console { host: None, tty: None, ring: None, skipped: None });
            // Fires at once, and on every change of the directory.
            if let Err(e) = self.xs.watch(&format!("/local/domain/{domid}/console"), &dom_token(domid)) {
                log::warn!("domain {domid}: watching its console: {e}");
            }
        }
    }

    fn read(&self, domid: DomId, node: &str) -> Option<String> {
        match self.xs.read(TxId::NONE, &format!("/local/domain/{domid}/console/{node}")) {
            Ok(v) => Some(String::from_utf8_lossy(&v).trim_end_matches('\0').to_string()),
            Err(e) if e.errno() == Some(XsErrno::ENOENT) => None,
            Err(e) => {
                log::debug!("domain {domid}: console/{node}: {e}");
                None
            }
        }
    }

    fn refresh(&mut self, domid: DomId) {
        let Some(c) = self.consoles.get(&domid) else { return };
        let nodes = PrimaryNodes {
            kind: self.read(domid, "type"),
            ring_ref: self.read(domid, "ring-ref"),
            port: self.read(domid, "port"),
            limit: self.read(domid, "limit"),
            tty: self.read(domid, "tty"),
        };
        let decision = decide(&nodes, c.tty.as_deref(), self.opts.force, &|t| Path::new(t).exists());
        let ring_ref = nodes.ring_ref.clone().unwrap_or_default();
        match decision {
            Decision::NotYet => {}
            Decision::Skip(why) => {
                let c = self.consoles.get_mut(&domid).expect("known");
                if c.ring.is_none() && c.skipped.as_deref() != Some(&why) {
                    log::warn!("domain {domid}: console not served: {why}");
                    c.skipped = Some(why);
                }
            }
            Decision::Serve { port, buffer } => {
                let current = self.consoles[&domid].ring.as_ref().map(|(_, p, r)| (*p, r.clone()));
                if current == Some((port, ring_ref.clone())) {
                    return;
                }
                if current.is_some() {
                    // A new page or port (the guest reconnected, kexec): start over on the same pty.
                    self.take_ring(domid);
                }
                if let Err(e) = self.serve(domid, port, buffer, ring_ref) {
                    let c = self.consoles.get_mut(&domid).expect("known");
                    let why = format!("{e}");
                    if c.skipped.as_deref() != Some(&why) {
                        log::error!(
                            "domain {domid}: console unavailable: {}",
                            std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
                                .map(|e| e.to_string())
                                .collect::<Vec<_>>()
                                .join(": ")
                        );
                        c.skipped = Some(why);
                    }
                }
            }
        }
    }

    fn serve(&mut self, domid: DomId, port: u32, buffer: usize, ring_ref: String) -> Result<(), DeviceError> {
        // No privcmd here: the reserved grant is the only way to the page.
        let mem =
            self.platform.grants().map(domid, &[GNTTAB_RESERVED_CONSOLE], true).map_err(|e| DeviceError::Other {
                msg: "Cannot map its page at GNTTAB_RESERVED_CONSOLE (no foreign-mapping fallback)".into(),
                source: Some(Box::new(e)),
            })?;
        let c = self.consoles.get_mut(&domid).expect("known");
        let slot = match &c.host {
            Some(s) => s.clone(),
            None => {
                let host = Host::open(&Connection::Pty).map_err(|e| DeviceError::Other {
                    msg: "Cannot create its pty".into(),
                    source: Some(Box::new(e)),
                })?;
                let s: HostSlot = Arc::new(Mutex::new(Some(host)));
                c.host = Some(s.clone());
                s
            }
        };
        let tty = slot.lock().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(|h| h.tty().map(str::to_string));
        let tty = tty.ok_or_else(|| DeviceError::msg("Its pty is in use"))?;
        let sink = self.log_for(domid);
        let limits = Limits { buffer: buffer.min(self.opts.limits.buffer), ..self.opts.limits };
        let handler = ConsoleRing::new(mem, slot, limits, sink)?;
        let bound = BoundPort::bind(self.platform.open_evtchn()?, domid, Port(port))?;
        let local = bound.port();
        self.xs.write(TxId::NONE, &format!("/local/domain/{domid}/console/tty"), tty.as_bytes())?;
        let key = DeviceKey { kind: "console".into(), frontend: domid, devid: 0 };
        let placed = self.pool.add(key, RingSetup { port: bound, handler: Box::new(handler) });
        let c = self.consoles.get_mut(&domid).expect("known");
        log::info!("domain {domid}: console on {tty} (port {port}, local {})", local.0);
        // The guest's port and ring-ref: a change of either starts over.
        c.ring = Some((placed, port, ring_ref));
        c.tty = Some(tty);
        c.skipped = None;
        self.publish();
        Ok(())
    }

    fn log_for(&self, domid: DomId) -> Option<Box<dyn OutputSink>> {
        let dir = self.opts.log_dir.as_ref()?;
        let name = match self.xs.read(TxId::NONE, &format!("/local/domain/{domid}/name")) {
            Ok(v) if !v.is_empty() => String::from_utf8_lossy(&v).replace(['/', '\0'], "_"),
            _ => format!("domain-{domid}"),
        };
        let path = dir.join(format!("guest-{name}.log"));
        Some(Box::new(LogFile::new(path, self.opts.log_max, self.reopen.clone())))
    }

    fn take_ring(&mut self, domid: DomId) {
        if let Some((placed, _, _)) = self.consoles.get_mut(&domid).and_then(|c| c.ring.take()) {
            self.pool.remove(&placed, REMOVE_TIMEOUT);
        }
    }

    fn remove(&mut self, domid: DomId, why: &str) {
        self.take_ring(domid);
        if let Some(c) = self.consoles.remove(&domid) {
            let _ = self.xs.unwatch(&format!("/local/domain/{domid}/console"), &dom_token(domid));
            if let Some(tty) = c.tty {
                log::info!("domain {domid}: console on {tty} closed: {why}");
            }
        }
        self.publish();
    }

    fn failures(&mut self) {
        while let Some(f) = self.pool.next_failure(Duration::ZERO) {
            let domid = f.key.frontend;
            if let Some(c) = self.consoles.get_mut(&domid) {
                if c.ring.as_ref().is_some_and(|(p, _, _)| p.serial() == f.serial) {
                    c.ring = None;
                    let why = format!("its ring failed: {}", f.error);
                    log::warn!("domain {domid}: console broken: {why}; served again when its nodes change");
                    c.skipped = Some(why);
                }
            }
        }
        self.publish();
    }

    fn publish(&self) {
        let list = self
            .consoles
            .iter()
            .filter(|(_, c)| c.ring.is_some())
            .filter_map(|(d, c)| Some((*d, c.tty.clone()?)))
            .collect();
        *self.served.lock().unwrap_or_else(|p| p.into_inner()) = list;
    }

    fn shutdown(&mut self) {
        for domid in self.consoles.keys().copied().collect::<Vec<_>>() {
            self.remove(domid, "shutting down");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(kind: Option<&str>, tty: &str) -> PrimaryNodes {
        PrimaryNodes {
            kind: kind.map(str::to_string),
            ring_ref: Some("12345".into()),
            port: Some("3".into()),
            limit: Some("1048576".into()),
            tty: Some(tty.into()),
        }
    }

    #[test]
    fn xenconsoled_type_or_none_is_served_and_ioemu_is_not() {
        let never = |_: &str| false;
        assert_eq!(
            decide(&nodes(Some("xenconsoled"), ""), None, false, &never),
            Decision::Serve { port: 3, buffer: MAX_BUFFER }
        );
        assert_eq!(decide(&nodes(None, ""), None, false, &never), Decision::Serve { port: 3, buffer: MAX_BUFFER });
        assert!(matches!(decide(&nodes(Some("ioemu"), ""), None, false, &never), Decision::Skip(_)));
    }

    #[test]
    fn incomplete_nodes_wait() {
        let n = PrimaryNodes { port: None, ..nodes(None, "") };
        assert_eq!(decide(&n, None, false, &|_| false), Decision::NotYet);
    }

    #[test]
    fn a_live_foreign_tty_is_refused_unless_forced_and_a_stale_one_taken_over() {
        let exists = |t: &str| t == "/dev/pts/7";
        assert!(matches!(decide(&nodes(None, "/dev/pts/7"), None, false, &exists), Decision::Skip(_)));
        assert!(matches!(decide(&nodes(None, "/dev/pts/7"), None, true, &exists), Decision::Serve { .. }));
        assert!(matches!(decide(&nodes(None, "/dev/pts/9"), None, false, &exists), Decision::Serve { .. }), "stale");
        assert!(
            matches!(decide(&nodes(None, "/dev/pts/7"), Some("/dev/pts/7"), false, &exists), Decision::Serve { .. }),
            "ours"
        );
    }

    #[test]
    fn a_pid_file_of_a_live_process_means_xenconsoled_runs() {
        let dir = std::env::temp_dir().join(format!("consback-pid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pid = dir.join("xenconsoled.pid");
        let empty_proc = dir.join("proc");
        std::fs::create_dir_all(&empty_proc).unwrap();
        std::fs::write(&pid, format!("{}\n", std::process::id())).unwrap();
        assert!(running_xenconsoled(std::slice::from_ref(&pid), &empty_proc).is_some());
        // A pid that cannot exist (above pid_max).
        std::fs::write(&pid, "99999999\n").unwrap();
        assert_eq!(running_xenconsoled(std::slice::from_ref(&pid), &empty_proc), None);
        std::fs::create_dir_all(empty_proc.join("4242")).unwrap();
        std::fs::write(empty_proc.join("4242/comm"), "xenconsoled\n").unwrap();
        assert_eq!(running_xenconsoled(&[], &empty_proc).as_deref(), Some("process 4242 is xenconsoled"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
