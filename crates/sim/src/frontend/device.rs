//! The guest's part: rings, event channels, nodes and states.

use std::borrow::Borrow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use evtchn::{EventChannel, Port};
use gnttab::{GrantMapping, GrantRef};
use xs_wire::{Client, ClientError, TxId};

use xen_bus::XenbusState;

use super::toolstack::{ignore_enoent, read_opt, DeviceSpec};
use crate::host::{GuestPages, SimGrantTable, SimHost};

/// How long to sleep between state checks when no watch event arrives (the
/// guest's connection may be shared by several devices, whose waits would
/// take each other's events).
const POLL_SLICE: Duration = Duration::from_millis(20);

/// Errors of a simulated frontend.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// A xenstore request failed.
    #[error("Xenstore request failed")]
    Xenstore(#[from] ClientError),
    /// The simulated host refused (memory, grants).
    #[error("Simulated host refused")]
    Host(#[from] crate::host::Error),
    /// An event-channel operation failed.
    #[error("Event channel operation failed")]
    Evtchn(#[from] evtchn::Error),
    /// Initialising a shared ring failed.
    #[error("Shared ring setup failed")]
    Ring(#[from] xen_ring::RingError),
    /// The backend did not reach the state waited for.
    #[error("Backend stayed in state {state:?} while waiting for {waiting_for}")]
    Timeout {
        /// What was awaited.
        waiting_for: String,
        /// The last backend state seen.
        state: Option<XenbusState>,
    },
    /// The ring index does not exist.
    #[error("No ring {0}")]
    NoRing(usize),
}

/// Deviations from a correct frontend, for tests of the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Misbehaviour {
    /// Write this as `ring-ref` instead of the grant (e.g. `abc`).
    RingRef(String),
    /// Write this `ring-page-order` (the ring is still one page).
    RingPageOrder(u32),
    /// Write no `event-channel` node.
    NoEventChannel,
    /// Write this `protocol`.
    Protocol(String),
    /// Go straight to Connected without waiting for InitWait or writing Initialised.
    SkipInitialised,
    /// Remove the frontend directory right after writing Initialised.
    VanishMidConnect,
    /// Write an arbitrary node before Initialised.
    Node(String, String),
    /// Write this as `state` instead of Initialised (e.g. `banana`).
    State(String),
}

/// How [`FrontendDevice::connect`] proceeds.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// `ring-page-order` (0: one page, `ring-ref` only).
    pub ring_page_order: u32,
    /// The `protocol` node (`None`: none written, native).
    pub protocol: Option<String>,
    /// Wait for the backend's InitWait before writing the nodes (as Linux does).
    pub wait_init_wait: bool,
    /// Wait for the backend's Connected, then write Connected.
    pub wait_connected: bool,
    /// Deviations.
    pub misbehave: Vec<Misbehaviour>,
    /// Longest wait for a backend state.
    pub timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            ring_page_order: 0,
            protocol: None,
            wait_init_wait: true,
            wait_connected: true,
            misbehave: Vec::new(),
            timeout: Duration::from_secs(30),
        }
    }
}

/// A ring the guest granted: its pages and references.
pub struct FrontendRing {
    pages: RingMemory,
    grefs: Vec<GrantRef>,
}

/// The guest's pages of a ring, shareable: a [`xen_ring::FrontRing`] can own
/// one (`FrontRing::<Req, Rsp, RingMemory>::attach(ring.memory(), 0)`).
#[derive(Clone)]
pub struct RingMemory(Arc<GuestPages>);

impl Borrow<GrantMapping> for RingMemory {
    fn borrow(&self) -> &GrantMapping {
        self.0.mapping()
    }
}

impl core::fmt::Debug for RingMemory {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RingMemory").field("pages", &self.0.len()).finish()
    }
}

impl FrontendRing {
    /// The guest's view of the ring pages.
    pub fn mapping(&self) -> &GrantMapping {
        self.pages.0.mapping()
    }

    /// The pages, to hand to a [`xen_ring::FrontRing`].
    pub fn memory(&self) -> RingMemory {
        self.pages.clone()
    }

    /// The grant references, in page order.
    pub fn grefs(&self) -> &[GrantRef] {
        &self.grefs
    }
}

impl core::fmt::Debug for FrontendRing {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FrontendRing").field("grefs", &self.grefs).finish_non_exhaustive()
    }
}

/// The guest side of one device.
pub struct FrontendDevice {
    spec: DeviceSpec,
    xs: Client,
    grants: SimGrantTable,
    evtchn: Box<dyn EventChannel>,
    rings: Vec<FrontendRing>,
    ports: Vec<Port>,
    watching: bool,
}

impl FrontendDevice {
    /// The guest `spec.frontend` acting through `xs` (its own, unprivileged
    /// connection) on `host`.
    pub fn new(host: &Arc<SimHost>, xs: Client, spec: DeviceSpec) -> Self {
        let grants = host.grant_table(spec.frontend);
        let evtchn = host.evtchn(spec.frontend);
        FrontendDevice { spec, xs, grants, evtchn, rings: Vec::new(), ports: Vec::new(), watching: false }
    }

    /// The device's spec.
    pub fn spec(&self) -> &DeviceSpec {
        &self.spec
    }

    /// The guest's xenstore connection.
    pub fn xenstore(&self) -> &Client {
        &self.xs
    }

    /// The guest's grant table.
    pub fn grant_table(&self) -> &SimGrantTable {
        &self.grants
    }

    /// Writes a node of the frontend directory.
    pub fn write(&self, node: &str, value: impl core::fmt::Display) -> Result<(), FrontendError> {
        let path = format!("{}/{node}", self.spec.frontend_path());
        Ok(self.xs.write(TxId::NONE, &path, value.to_string().as_bytes())?)
    }

    /// Reads a node of the frontend directory.
    pub fn read(&self, node: &str) -> Result<Option<String>, FrontendError> {
        Ok(read_opt(&self.xs, &format!("{}/{node}", self.spec.frontend_path()))?)
    }

    /// Reads a node of the backend directory (the guest may read it).
    pub fn read_backend(&self, node: &str) -> Result<Option<String>, FrontendError> {
        Ok(read_opt(&self.xs, &format!("{}/{node}", self.spec.backend_path()))?)
    }

    /// Writes the frontend's `state`.
    pub fn set_state(&self, state: XenbusState) -> Result<(), FrontendError> {
        self.write("state", state.as_u32())
    }

    /// The backend's `state` (`None` if absent or not a state). A removed
    /// backend directory may read as EACCES (xenstored hides whether a node
    /// exists below a directory the reader may not read): `None` too, as
    /// Linux's `xenbus_read_driver_state` reads Unknown on any error.
    pub fn backend_state(&self) -> Result<Option<XenbusState>, FrontendError> {
        match read_opt(&self.xs, &format!("{}/state", self.spec.backend_path())) {
            Err(e) if e.errno() == Some(xs_wire::XsErrno::EACCES) => Ok(None),
            r => Ok(r?.and_then(|s| XenbusState::parse(s.as_bytes()))),
        }
    }

    /// Waits until the backend's state satisfies `done`, on a watch of the
    /// backend's `state` (re-checking every few ms in case another device on
    /// the same connection took the event). Returns the state reached.
    pub fn wait_backend_state(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(Option<XenbusState>) -> bool,
    ) -> Result<Option<XenbusState>, FrontendError> {
        if !self.watching {
            let token = format!("sim-fe:{}", self.spec.backend_path());
            self.xs.watch(&format!("{}/state", self.spec.backend_path()), &token)?;
            self.watching = true;
        }
        let events = self.xs.events();
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.backend_state()?;
            if done(state) {
                return Ok(state);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(FrontendError::Timeout { waiting_for: what.to_string(), state });
            }
            let _ = events.recv_timeout((deadline - now).min(POLL_SLICE));
        }
    }

    /// Allocates `2^order` zeroed pages, initialises a shared ring in them
    /// and grants them to the backend. Returns the ring's index.
    pub fn grant_ring(&mut self, order: u32) -> Result<usize, FrontendError> {
        let pages = self.grants.alloc_pages(1 << order)?;
        xen_ring::init_shared(pages.mapping())?;
        let grefs = self.grants.grant_pages(&pages, self.spec.backend, false)?;
        self.rings.push(FrontendRing { pages: RingMemory(Arc::new(pages)), grefs });
        Ok(self.rings.len() - 1)
    }

    /// A granted ring.
    pub fn ring(&self, index: usize) -> Result<&FrontendRing, FrontendError> {
        self.rings.get(index).ok_or(FrontendError::NoRing(index))
    }

    /// Writes ring `index`'s references in the queue directory `dir`
    /// (`""`, `"queue-0/"`) as Linux does ([`xen_bus::rings`]): `ring-ref`
    /// for one page, else `ring-ref<i>` and, at the top level,
    /// `ring-page-order`.
    pub fn publish_ring(&self, dir: &str, index: usize) -> Result<(), FrontendError> {
        let ring = self.ring(index)?;
        if ring.grefs.len() > 1 {
            self.write("ring-page-order", ring.grefs.len().trailing_zeros())?;
        }
        let refs: Vec<u32> = ring.grefs.iter().map(|g| g.0).collect();
        for (node, value) in xen_bus::rings::ring_ref_nodes(dir, &refs) {
            self.write(&node, value)?;
        }
        Ok(())
    }

    /// Allocates a port the backend may bind (`bind_unbound_port`).
    pub fn offer_event_channel(&mut self) -> Result<Port, FrontendError> {
        let port = self.evtchn.bind_unbound_port(self.spec.backend)?;
        self.ports.push(port);
        Ok(port)
    }

    /// The guest's event-channel handle (to poll, take pending, unmask).
    pub fn evtchn(&self) -> &dyn EventChannel {
        &*self.evtchn
    }

    /// The ports offered, in order.
    pub fn ports(&self) -> &[Port] {
        &self.ports
    }

    /// Signals the backend.
    pub fn notify(&self, port: Port) -> Result<(), FrontendError> {
        Ok(self.evtchn.notify(port)?)
    }

    /// Waits up to `timeout` for an event on any port; takes and unmasks the
    /// pending ports. Returns whether one arrived.
    pub fn wait_event(&self, timeout: Duration) -> Result<bool, FrontendError> {
        let ready = evtchn::wait_pending(&*self.evtchn, Some(timeout))?;
        let mut pending = Vec::new();
        evtchn::take_and_unmask(&*self.evtchn, &mut pending)?;
        Ok(ready || !pending.is_empty())
    }

    /// The standard single-ring connection, with `opts.misbehave` applied:
    /// wait for InitWait, grant a ring of `2^ring_page_order` pages, offer a
    /// port, write `ring-ref`/`ring-page-order`, `event-channel` and
    /// `protocol`, go Initialised, wait for Connected, go Connected.
    pub fn connect(&mut self, opts: &ConnectOptions) -> Result<(), FrontendError> {
        let has = |m: &dyn Fn(&Misbehaviour) -> bool| opts.misbehave.iter().any(m);
        let skip = has(&|m| *m == Misbehaviour::SkipInitialised);
        if opts.wait_init_wait && !skip {
            self.wait_backend_state("InitWait", opts.timeout, |s| {
                matches!(s, Some(XenbusState::InitWait | XenbusState::Initialised | XenbusState::Connected))
            })?;
        }
        let ring = self.grant_ring(opts.ring_page_order)?;
        let port = self.offer_event_channel()?;
        self.publish_ring("", ring)?;
        if !has(&|m| *m == Misbehaviour::NoEventChannel) {
            self.write("event-channel", port.0)?;
        }
        if let Some(p) = &opts.protocol {
            self.write("protocol", p)?;
        }
        for m in &opts.misbehave {
            match m {
                Misbehaviour::RingRef(v) => self.write("ring-ref", v)?,
                Misbehaviour::RingPageOrder(o) => self.write("ring-page-order", o)?,
                Misbehaviour::Protocol(p) => self.write("protocol", p)?,
                Misbehaviour::Node(n, v) => self.write(n, v)?,
                _ => {}
            }
        }
        if skip {
            return self.set_state(XenbusState::Connected);
        }
        if let Some(Misbehaviour::State(v)) = opts.misbehave.iter().find(|m| matches!(m, Misbehaviour::State(_))) {
            return self.write("state", v);
        }
        self.set_state(XenbusState::Initialised)?;
        if has(&|m| *m == Misbehaviour::VanishMidConnect) {
            self.xs.rm(TxId::NONE, &self.spec.frontend_path()).or_else(ignore_enoent)?;
            return Ok(());
        }
        if opts.wait_connected {
            self.wait_backend_state("Connected", opts.timeout, |s| s == Some(XenbusState::Connected))?;
            self.set_state(XenbusState::Connected)?;
        }
        Ok(())
    }

    /// Closes as Linux does on detach: Closing, wait for the backend to close,
    /// Closed, wait for the backend's Closed; then revokes the rings and
    /// closes the ports.
    pub fn close(&mut self, timeout: Duration) -> Result<(), FrontendError> {
        self.set_state(XenbusState::Closing)?;
        self.wait_backend_state("Closing", timeout, |s| {
            matches!(s, Some(XenbusState::Closing | XenbusState::Closed) | None)
        })?;
        self.set_state(XenbusState::Closed)?;
        self.wait_backend_state("Closed", timeout, |s| matches!(s, Some(XenbusState::Closed) | None))?;
        self.release()
    }

    /// Revokes every ring grant and closes every port (the backend must have
    /// unmapped them: a mapped grant cannot be revoked).
    pub fn release(&mut self) -> Result<(), FrontendError> {
        for ring in self.rings.drain(..) {
            for g in &ring.grefs {
                self.grants.end_access(*g)?;
            }
        }
        for p in self.ports.drain(..) {
            self.evtchn.unbind(p)?;
        }
        Ok(())
    }

    /// Starts over as a rebooted driver would: releases rings and ports,
    /// removes the ring nodes and goes back to Initialising.
    pub fn reinitialise(&mut self) -> Result<(), FrontendError> {
        self.release()?;
        for node in ["ring-ref", "ring-page-order", "event-channel", "protocol"] {
            let path = format!("{}/{node}", self.spec.frontend_path());
            self.xs.rm(TxId::NONE, &path).or_else(ignore_enoent)?;
        }
        self.set_state(XenbusState::Initialising)
    }
}

impl core::fmt::Debug for FrontendDevice {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FrontendDevice").field("spec", &self.spec).field("ports", &self.ports).finish_non_exhaustive()
    }
}
