//! The host: its domains, and the handles that act as one of them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use evtchn::{EventChannel, Port};
use gnttab::GrantMapper;

use super::error::{DomId, Error, Result};
use super::evtchn::{EvtchnTable, PortStatus, SimEventChannel};
use super::grant::{GrantTable, SimGrantMapper, SimGrantTable};
use super::memory::GuestMemory;

/// One domain's memory and grant table (its ports live in the host's
/// event-channel table).
pub(crate) struct Domain {
    pub(crate) id: DomId,
    pub(crate) memory: Arc<GuestMemory>,
    pub(crate) grants: Mutex<GrantTable>,
}

/// A simulated Xen host: domains with event channels and grant tables over
/// real shared memory. Everything is `Send + Sync`; locks are held only for
/// table updates, never across a copy or a wait.
///
/// No domain exists at first, not even 0: create the backend's domain too.
pub struct SimHost {
    domains: RwLock<HashMap<DomId, Arc<Domain>>>,
    evtchn: RwLock<EvtchnTable>,
    generations: AtomicU64,
}

impl SimHost {
    /// An empty host.
    pub fn new() -> Arc<Self> {
        Arc::new(SimHost {
            domains: RwLock::new(HashMap::new()),
            evtchn: RwLock::new(EvtchnTable::new()),
            generations: AtomicU64::new(1),
        })
    }

    /// Creates domain `domid` with empty memory, grant table and ports.
    pub fn create_domain(&self, domid: DomId) -> Result<()> {
        let mut domains = self.domains.write().expect("domain registry lock poisoned");
        if domains.contains_key(&domid) {
            return Err(Error::DomainExists(domid));
        }
        let memory = Arc::new(GuestMemory::new(domid)?);
        domains.insert(domid, Arc::new(Domain { id: domid, memory, grants: Mutex::new(GrantTable::new(domid)) }));
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        self.evtchn_table().add_domain(domid, generation);
        log::debug!("dom{domid} created");
        Ok(())
    }

    /// Destroys domain `domid`: closes its ports (their interdomain far ends
    /// become unbound, as on Xen, so notifying them succeeds and delivers
    /// nothing) and revokes its grants (new maps and copies fail with
    /// `GNTST_bad_domain`; mappings made before stay valid until dropped, as
    /// a dying domain's pages do). Handles opened as the domain then fail
    /// with `ESRCH`. Destroying a domain that does not exist does nothing.
    pub fn destroy_domain(&self, domid: DomId) {
        let mut domains = self.domains.write().expect("domain registry lock poisoned");
        let Some(dom) = domains.remove(&domid) else {
            log::debug!("destroy of dom{domid}, which does not exist");
            return;
        };
        dom.grants.lock().expect("grant table lock poisoned").revoke_all();
        self.evtchn_table().remove_domain(domid);
        log::debug!("dom{domid} destroyed");
    }

    /// Whether `domid` exists.
    pub fn domain_exists(&self, domid: DomId) -> bool {
        self.domains.read().expect("domain registry lock poisoned").contains_key(&domid)
    }

    /// A new event-channel handle acting as `domid` (one open of
    /// `/dev/xen/evtchn` in that domain). Its operations fail with `ESRCH`
    /// if the domain did not exist when it was opened or was destroyed since
    /// (even if the id was then reused).
    ///
    /// # Panics
    /// If no eventfd can be created (file descriptors exhausted); see
    /// [`SimHost::try_evtchn`].
    pub fn evtchn(self: &Arc<Self>, domid: DomId) -> Box<dyn EventChannel> {
        Box::new(self.try_evtchn(domid).expect("cannot create an eventfd for a simulated event channel"))
    }

    /// [`SimHost::evtchn`], reporting a failure to create the eventfd.
    pub fn try_evtchn(self: &Arc<Self>, domid: DomId) -> std::io::Result<SimEventChannel> {
        SimEventChannel::new(self.clone(), domid)
    }

    /// Opens event-channel handles of `domid` (what a backend's platform
    /// opens one with per ring).
    pub fn evtchn_opener(
        self: &Arc<Self>,
        domid: DomId,
    ) -> impl Fn() -> evtchn::Result<Box<dyn EventChannel>> + Send + Sync + 'static {
        let host = self.clone();
        move || Ok(host.evtchn(domid))
    }

    /// The backend side acting as `domid`: maps and copies grants other
    /// domains gave to `domid`.
    pub fn grant_mapper(self: &Arc<Self>, domid: DomId) -> Arc<dyn GrantMapper> {
        Arc::new(SimGrantMapper::new(self.clone(), domid))
    }

    /// The frontend side of `domid`: its memory and grant table.
    pub fn grant_table(self: &Arc<Self>, domid: DomId) -> SimGrantTable {
        SimGrantTable::new(self.clone(), domid)
    }

    /// `EVTCHNOP_status` of `port` in `domid` (`None` if the domain does not
    /// exist or the port was never allocated).
    pub fn port_status(&self, domid: DomId, port: Port) -> Option<PortStatus> {
        self.evtchn_shared().status(domid, port)
    }

    pub(crate) fn domain(&self, domid: DomId) -> Option<Arc<Domain>> {
        self.domains.read().expect("domain registry lock poisoned").get(&domid).cloned()
    }

    /// The event-channel table for binding and closing ports (exclusive).
    pub(crate) fn evtchn_table(&self) -> RwLockWriteGuard<'_, EvtchnTable> {
        self.evtchn.write().expect("event channel table lock poisoned")
    }

    /// The event-channel table for sending and unmasking (shared: each port
    /// has its own lock, as each channel has in Xen).
    pub(crate) fn evtchn_shared(&self) -> RwLockReadGuard<'_, EvtchnTable> {
        self.evtchn.read().expect("event channel table lock poisoned")
    }
}

impl core::fmt::Debug for SimHost {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let mut ids: Vec<DomId> = self.domains.read().map(|d| d.keys().copied().collect()).unwrap_or_default();
        ids.sort_unstable();
        f.debug_struct("SimHost").field("domains", &ids).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creating_a_domain_twice_fails_until_it_is_destroyed() {
        let host = SimHost::new();
        host.create_domain(5).unwrap();
        assert!(matches!(host.create_domain(5), Err(Error::DomainExists(5))));
        host.destroy_domain(5);
        assert!(!host.domain_exists(5));
        host.create_domain(5).unwrap();
        assert!(host.domain_exists(5));
    }

    #[test]
    fn a_handle_of_a_destroyed_domain_fails_with_esrch_even_after_the_id_is_reused() {
        let host = SimHost::new();
        host.create_domain(5).unwrap();
        let ch = host.evtchn(5);
        host.destroy_domain(5);
        host.create_domain(5).unwrap();
        assert_eq!(ch.bind_unbound_port(0).unwrap_err().errno(), Some(nix::libc::ESRCH));
        assert_eq!(host.evtchn(5).bind_unbound_port(0).unwrap(), Port(1));
    }

    #[test]
    fn host_and_handles_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<SimHost>();
        check::<SimGrantTable>();
        check::<SimEventChannel>();
        check::<SimGrantMapper>();
        check::<crate::host::GuestPages>();
    }

    #[test]
    fn grant_table_of_a_missing_domain_reports_it() {
        let host = SimHost::new();
        assert!(matches!(host.grant_table(9).alloc_pages(1), Err(Error::NoDomain(9))));
    }
}
