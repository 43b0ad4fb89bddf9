//! Event channels: per-domain port tables with Xen's states and errors
//! (`xen/common/event_channel.c`), and handles that behave like one open of
//! Linux's `/dev/xen/evtchn` (`drivers/xen/evtchn.c`).
//!
//! Xen's rules reproduced here:
//! - port 0 is reserved; ports are allocated lowest-free first;
//! - `bind_unbound_port` (`EVTCHNOP_alloc_unbound`) offers a port to one
//!   remote domain, which need not exist yet;
//! - `bind_interdomain` fails with `ESRCH` if the remote domain does not
//!   exist, `EINVAL` if the remote port is not unbound and offered to the
//!   binder's domain, `ENOSPC` when the local table is full; on success the
//!   new local port is marked pending ("we may have lost notifications on the
//!   remote unbound port");
//! - closing an interdomain port (`unbind`, a handle's drop, the domain's
//!   destruction) makes the far end unbound again, offered to the closer's
//!   domain; a notify on an unbound port is silently dropped and succeeds, as
//!   `evtchn_send` does.
//!
//! Linux's device rules reproduced here: `unbind`/`notify` of a port that is
//! not bound on this handle give `ENOTCONN` (a port number beyond the
//! channel limit gives `EINVAL` for `unbind`); a port that fires is masked
//! (the driver disables its irq) until unmasked; a notify while masked sets
//! it pending, delivered on unmask. The handle's fd is an eventfd that is
//! readable exactly while the handle has ports to take.
//!
//! Departures, chosen to catch bugs: `unmask` of a port not bound on the
//! handle returns [`evtchn::Error::NotBound`] (the device ignores it), and
//! `unbind` drops the port from the handle's queue of fired ports (the device
//! may still report it once). Every operation on a handle whose domain was
//! destroyed fails with `ESRCH`.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use evtchn::{EventChannel, Port};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::error::DomId;
use super::sim_host::SimHost;

/// Ports per domain: the 2-level ABI's limit on 64-bit guests.
pub const MAX_PORTS: usize = 4096;

const BIND_INTERDOMAIN: &str = "IOCTL_EVTCHN_BIND_INTERDOMAIN";
const BIND_UNBOUND: &str = "IOCTL_EVTCHN_BIND_UNBOUND_PORT";
const UNBIND: &str = "IOCTL_EVTCHN_UNBIND";
const NOTIFY: &str = "IOCTL_EVTCHN_NOTIFY";
const UNMASK: &str = "unmask";

fn op_err(op: &'static str, errno: i32) -> evtchn::Error {
    evtchn::Error::Op { op, source: std::io::Error::from_raw_os_error(errno) }
}

/// The state of a port, as `EVTCHNOP_status` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortStatus {
    /// `EVTCHNSTAT_closed`: free.
    Closed,
    /// `EVTCHNSTAT_unbound`: offered to `remote`.
    Unbound {
        /// The domain that may bind to it.
        remote: DomId,
    },
    /// `EVTCHNSTAT_interdomain`: connected.
    Interdomain {
        /// The remote domain.
        remote: DomId,
        /// The remote port.
        remote_port: Port,
    },
}

#[derive(Default)]
struct Ring {
    fired: VecDeque<Port>,
    signalled: bool,
}

/// What a port delivers to: one handle's queue of fired ports and its eventfd.
struct HandleShared {
    id: u64,
    eventfd: EventFd,
    ring: Mutex<Ring>,
}

impl HandleShared {
    fn ring(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().expect("event channel ring lock poisoned")
    }

    fn push(&self, port: Port) {
        let mut ring = self.ring();
        ring.fired.push_back(port);
        if !ring.signalled {
            if let Err(e) = self.eventfd.arm() {
                log::error!("eventfd write failed: {e}");
            }
            ring.signalled = true;
        }
    }
}

struct PortEntry {
    state: PortStatus,
    owner: Option<Arc<HandleShared>>,
    pending: bool,
    masked: bool,
}

impl PortEntry {
    const FREE: PortEntry = PortEntry { state: PortStatus::Closed, owner: None, pending: false, masked: false };

    /// Xen's `evtchn_port_set_pending` plus the Linux driver's interrupt
    /// handler: delivers unless masked, then masks.
    fn set_pending(&mut self, port: Port) {
        self.pending = true;
        if self.masked {
            return;
        }
        if let Some(owner) = &self.owner {
            self.pending = false;
            self.masked = true;
            owner.push(port);
        }
    }
}

struct DomPorts {
    generation: u64,
    /// Index is the port number; entry 0 is reserved and stays free. Each
    /// port has its own lock, taken under the table's shared lock to send
    /// or unmask (one guest's notifications never wait for another's, as
    /// with Xen's per-channel locks); binding and closing hold the table
    /// exclusively and need no port lock.
    ports: Vec<Mutex<PortEntry>>,
}

impl DomPorts {
    /// The entry of `port`, with the table held exclusively.
    fn entry_mut(&mut self, port: usize) -> Option<&mut PortEntry> {
        self.ports.get_mut(port).map(|m| m.get_mut().expect("event channel port lock poisoned"))
    }

    /// The entry of `port`, locked, with the table held shared.
    fn entry(&self, port: usize) -> Option<MutexGuard<'_, PortEntry>> {
        self.ports.get(port).map(|m| m.lock().expect("event channel port lock poisoned"))
    }

    fn free_port(&mut self) -> Option<usize> {
        if let Some(p) =
            (1..self.ports.len()).find(|&p| self.entry_mut(p).is_some_and(|e| e.state == PortStatus::Closed))
        {
            return Some(p);
        }
        if self.ports.len() < MAX_PORTS {
            self.ports.push(Mutex::new(PortEntry::FREE));
            Some(self.ports.len() - 1)
        } else {
            None
        }
    }
}

/// Every domain's ports, behind one host-wide read-write lock.
pub(crate) struct EvtchnTable {
    domains: HashMap<DomId, DomPorts>,
}

impl EvtchnTable {
    pub(crate) fn new() -> Self {
        EvtchnTable { domains: HashMap::new() }
    }

    pub(crate) fn add_domain(&mut self, domid: DomId, generation: u64) {
        let mut ports = Vec::with_capacity(64);
        ports.push(Mutex::new(PortEntry::FREE));
        self.domains.insert(domid, DomPorts { generation, ports });
    }

    /// Closes every port of `domid` (Xen's `evtchn_destroy`) and forgets it.
    pub(crate) fn remove_domain(&mut self, domid: DomId) {
        let Some(dp) = self.domains.get_mut(&domid) else { return };
        let open: Vec<usize> =
            (1..dp.ports.len()).filter(|&p| dp.entry_mut(p).is_some_and(|e| e.state != PortStatus::Closed)).collect();
        for p in open {
            self.close(domid, p);
        }
        self.domains.remove(&domid);
    }

    /// Xen's `__evtchn_close`: frees the port; an interdomain far end becomes
    /// unbound, offered to `domid` again.
    fn close(&mut self, domid: DomId, port: usize) {
        let Some(entry) = self.domains.get_mut(&domid).and_then(|d| d.entry_mut(port)) else { return };
        let state = entry.state;
        *entry = PortEntry::FREE;
        if let PortStatus::Interdomain { remote, remote_port } = state {
            if let Some(far) = self.domains.get_mut(&remote).and_then(|d| d.entry_mut(remote_port.0 as usize)) {
                far.state = PortStatus::Unbound { remote: domid };
            }
        }
    }

    pub(crate) fn status(&self, domid: DomId, port: Port) -> Option<PortStatus> {
        self.domains.get(&domid)?.entry(port.0 as usize).map(|e| e.state).filter(|_| port.0 != 0)
    }

    pub(crate) fn generation(&self, domid: DomId) -> u64 {
        self.domains.get(&domid).map_or(0, |d| d.generation)
    }
}

static NEXT_HANDLE: AtomicU64 = AtomicU64::new(1);

/// One event-channel handle acting as a domain: what
/// [`SimHost::evtchn`] returns.
pub struct SimEventChannel {
    host: Arc<SimHost>,
    domid: DomId,
    generation: u64,
    shared: Arc<HandleShared>,
}

impl SimEventChannel {
    pub(crate) fn new(host: Arc<SimHost>, domid: DomId) -> std::io::Result<Self> {
        let eventfd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        let generation = host.evtchn_shared().generation(domid);
        let shared =
            Arc::new(HandleShared { id: NEXT_HANDLE.fetch_add(1, Ordering::Relaxed), eventfd, ring: Mutex::default() });
        Ok(SimEventChannel { host, domid, generation, shared })
    }

    /// The domain this handle acts as.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// This handle's domain's ports, if the domain it was opened in still exists.
    fn ports<'a>(&self, t: &'a mut EvtchnTable, op: &'static str) -> evtchn::Result<&'a mut DomPorts> {
        match t.domains.get_mut(&self.domid) {
            Some(d) if d.generation == self.generation => Ok(d),
            _ => Err(op_err(op, nix::libc::ESRCH)),
        }
    }

    /// [`SimEventChannel::ports`] with the table held shared.
    fn ports_shared<'a>(&self, t: &'a EvtchnTable, op: &'static str) -> evtchn::Result<&'a DomPorts> {
        match t.domains.get(&self.domid) {
            Some(d) if d.generation == self.generation => Ok(d),
            _ => Err(op_err(op, nix::libc::ESRCH)),
        }
    }

    fn is_mine(&self, e: &PortEntry) -> bool {
        e.owner.as_ref().is_some_and(|h| h.id == self.shared.id)
    }

    /// The entry of `port` if it is bound on this handle, with the table
    /// held exclusively.
    fn owned<'a>(&self, dp: &'a mut DomPorts, port: Port) -> Option<&'a mut PortEntry> {
        dp.entry_mut(port.0 as usize).filter(|e| self.is_mine(e))
    }

    /// The entry of `port`, locked, if it is bound on this handle.
    fn owned_shared<'a>(&self, dp: &'a DomPorts, port: Port) -> Option<MutexGuard<'a, PortEntry>> {
        dp.entry(port.0 as usize).filter(|e| self.is_mine(e))
    }
}

impl EventChannel for SimEventChannel {
    fn bind_interdomain(&self, remote_domid: DomId, remote_port: Port) -> evtchn::Result<Port> {
        let mut t = self.host.evtchn_table();
        self.ports(&mut t, BIND_INTERDOMAIN)?;
        if !t.domains.contains_key(&remote_domid) {
            return Err(op_err(BIND_INTERDOMAIN, nix::libc::ESRCH));
        }
        let offered = t
            .domains
            .get_mut(&remote_domid)
            .and_then(|d| d.entry_mut(remote_port.0 as usize))
            .is_some_and(|e| remote_port.0 != 0 && e.state == PortStatus::Unbound { remote: self.domid });
        let dp = self.ports(&mut t, BIND_INTERDOMAIN)?;
        let local = dp.free_port().ok_or_else(|| op_err(BIND_INTERDOMAIN, nix::libc::ENOSPC))?;
        if !offered {
            return Err(op_err(BIND_INTERDOMAIN, nix::libc::EINVAL));
        }
        let lport = Port(local as u32);
        *dp.entry_mut(local).expect("free_port returned it") = PortEntry {
            state: PortStatus::Interdomain { remote: remote_domid, remote_port },
            owner: Some(self.shared.clone()),
            pending: false,
            masked: false,
        };
        let far =
            t.domains.get_mut(&remote_domid).and_then(|d| d.entry_mut(remote_port.0 as usize)).expect("checked above");
        far.state = PortStatus::Interdomain { remote: self.domid, remote_port: lport };
        // Xen conservatively marks the new local port pending.
        self.ports(&mut t, BIND_INTERDOMAIN)?.entry_mut(local).expect("bound above").set_pending(lport);
        log::debug!("dom{} port {lport} bound to dom{remote_domid} port {remote_port}", self.domid);
        Ok(lport)
    }

    fn bind_unbound_port(&self, remote_domid: DomId) -> evtchn::Result<Port> {
        let mut t = self.host.evtchn_table();
        let dp = self.ports(&mut t, BIND_UNBOUND)?;
        let p = dp.free_port().ok_or_else(|| op_err(BIND_UNBOUND, nix::libc::ENOSPC))?;
        *dp.entry_mut(p).expect("free_port returned it") = PortEntry {
            state: PortStatus::Unbound { remote: remote_domid },
            owner: Some(self.shared.clone()),
            pending: false,
            masked: false,
        };
        log::debug!("dom{} port {p} offered to dom{remote_domid}", self.domid);
        Ok(Port(p as u32))
    }

    fn unbind(&self, port: Port) -> evtchn::Result<()> {
        let mut t = self.host.evtchn_table();
        let dp = self.ports(&mut t, UNBIND)?;
        if port.0 as usize >= MAX_PORTS {
            return Err(op_err(UNBIND, nix::libc::EINVAL));
        }
        if self.owned(dp, port).is_none() {
            return Err(op_err(UNBIND, nix::libc::ENOTCONN));
        }
        t.close(self.domid, port.0 as usize);
        self.shared.ring().fired.retain(|p| *p != port);
        Ok(())
    }

    fn notify(&self, port: Port) -> evtchn::Result<()> {
        let t = self.host.evtchn_shared();
        let dp = self.ports_shared(&t, NOTIFY)?;
        let state = self.owned_shared(dp, port).ok_or_else(|| op_err(NOTIFY, nix::libc::ENOTCONN))?.state;
        // The local port's lock is released: one port lock at a time, so
        // two domains notifying each other cannot deadlock. Nothing can
        // rebind either port meanwhile (that needs the table exclusively).
        match state {
            PortStatus::Interdomain { remote, remote_port } => {
                if let Some(mut far) = t.domains.get(&remote).and_then(|d| d.entry(remote_port.0 as usize)) {
                    far.set_pending(remote_port);
                }
                Ok(())
            }
            // `evtchn_send` silently drops a notification on an unbound port.
            PortStatus::Unbound { .. } => Ok(()),
            PortStatus::Closed => Err(op_err(NOTIFY, nix::libc::EINVAL)),
        }
    }

    fn take_pending(&self, out: &mut Vec<Port>) -> evtchn::Result<()> {
        let mut ring = self.shared.ring();
        out.extend(ring.fired.drain(..));
        if ring.signalled {
            match self.shared.eventfd.read() {
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => {}
                Err(e) => return Err(evtchn::Error::Op { op: "read", source: e.into() }),
            }
            ring.signalled = false;
        }
        Ok(())
    }

    fn unmask(&self, port: Port) -> evtchn::Result<()> {
        let t = self.host.evtchn_shared();
        let dp = self.ports_shared(&t, UNMASK)?;
        let mut entry = self.owned_shared(dp, port).ok_or(evtchn::Error::NotBound(port))?;
        if entry.masked {
            entry.masked = false;
            if entry.pending {
                entry.set_pending(port);
            }
        }
        Ok(())
    }
}

impl AsFd for SimEventChannel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.shared.eventfd.as_fd()
    }
}

impl Drop for SimEventChannel {
    /// Closes every port bound on the handle, as closing the device does.
    fn drop(&mut self) {
        let mut t = self.host.evtchn_table();
        let Ok(dp) = self.ports(&mut t, "close") else { return };
        let mine: Vec<usize> =
            (1..dp.ports.len()).filter(|&p| dp.entry_mut(p).is_some_and(|e| self.is_mine(e))).collect();
        for p in mine {
            t.close(self.domid, p);
        }
    }
}

impl core::fmt::Debug for SimEventChannel {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SimEventChannel").field("domid", &self.domid).field("handle", &self.shared.id).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_with(domids: &[DomId]) -> Arc<SimHost> {
        let host = SimHost::new();
        for d in domids {
            host.create_domain(*d).unwrap();
        }
        host
    }

    fn taken(ch: &dyn EventChannel) -> Vec<Port> {
        let mut out = Vec::new();
        ch.take_pending(&mut out).unwrap();
        out
    }

    fn readable(ch: &dyn EventChannel) -> bool {
        evtchn::wait_pending(ch, Some(std::time::Duration::ZERO)).unwrap()
    }

    #[test]
    fn ports_start_at_one_and_reuse_the_lowest_free() {
        let host = host_with(&[0, 1]);
        let ch = host.evtchn(1);
        assert_eq!(ch.bind_unbound_port(0).unwrap(), Port(1));
        assert_eq!(ch.bind_unbound_port(0).unwrap(), Port(2));
        ch.unbind(Port(1)).unwrap();
        assert_eq!(ch.bind_unbound_port(0).unwrap(), Port(1));
    }

    #[test]
    fn interdomain_bind_marks_the_new_local_port_pending() {
        let host = host_with(&[0, 1]);
        let front = host.evtchn(1);
        let back = host.evtchn(0);
        let offered = front.bind_unbound_port(0).unwrap();
        let local = back.bind_interdomain(1, offered).unwrap();
        assert!(readable(&*back));
        assert_eq!(taken(&*back), vec![local]);
        assert!(!readable(&*back));
        assert!(!readable(&*front));
    }

    #[test]
    fn a_fired_port_stays_masked_and_a_notify_while_masked_shows_after_unmask() {
        let host = host_with(&[0, 1]);
        let front = host.evtchn(1);
        let back = host.evtchn(0);
        let fport = front.bind_unbound_port(0).unwrap();
        let bport = back.bind_interdomain(1, fport).unwrap();
        taken(&*back);
        back.unmask(bport).unwrap();
        front.notify(fport).unwrap();
        assert_eq!(taken(&*back), vec![bport]);
        front.notify(fport).unwrap();
        front.notify(fport).unwrap();
        assert!(!readable(&*back));
        assert!(taken(&*back).is_empty());
        back.unmask(bport).unwrap();
        assert!(readable(&*back));
        assert_eq!(taken(&*back), vec![bport]);
    }

    #[test]
    fn events_reach_only_the_handle_the_port_is_bound_on() {
        let host = host_with(&[0, 1]);
        let front = host.evtchn(1);
        let back = host.evtchn(0);
        let other = host.evtchn(0);
        let fport = front.bind_unbound_port(0).unwrap();
        let bport = back.bind_interdomain(1, fport).unwrap();
        taken(&*back);
        back.unmask(bport).unwrap();
        front.notify(fport).unwrap();
        assert!(!readable(&*other));
        assert_eq!(other.notify(bport).unwrap_err().errno(), Some(nix::libc::ENOTCONN));
        assert!(matches!(other.unmask(bport), Err(evtchn::Error::NotBound(p)) if p == bport));
        assert_eq!(taken(&*back), vec![bport]);
    }

    #[test]
    fn dropping_a_handle_closes_its_ports_and_unbinds_the_far_end() {
        let host = host_with(&[0, 1]);
        let front = host.evtchn(1);
        let back = host.evtchn(0);
        let fport = front.bind_unbound_port(0).unwrap();
        back.bind_interdomain(1, fport).unwrap();
        drop(back);
        assert_eq!(host.port_status(1, fport), Some(PortStatus::Unbound { remote: 0 }));
        front.notify(fport).unwrap();
    }

    #[test]
    fn loopback_binding_within_one_domain_works() {
        let host = host_with(&[3]);
        let a = host.evtchn(3);
        let b = host.evtchn(3);
        let pa = a.bind_unbound_port(3).unwrap();
        let pb = b.bind_interdomain(3, pa).unwrap();
        taken(&*b);
        b.notify(pb).unwrap();
        assert_eq!(taken(&*a), vec![pa]);
        assert_eq!(host.port_status(3, pa), Some(PortStatus::Interdomain { remote: 3, remote_port: pb }));
    }
}
