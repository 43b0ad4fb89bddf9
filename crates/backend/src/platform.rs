//! What a backend needs from the host: a xenstore connection, event-channel
//! handles, a grant mapper and its own domain id.

use std::sync::Arc;

use evtchn::{DomId, EventChannel};
use gnttab::GrantMapper;
use xs_wire::Client;

/// Opens a new event-channel handle (one open of `/dev/xen/evtchn`, or a
/// simulated one).
pub type EvtchnOpener = dyn Fn() -> evtchn::Result<Box<dyn EventChannel>> + Send + Sync;

/// The host as a backend sees it: a struct of trait objects, built from the
/// real devices by the binary or from the simulator by tests.
#[derive(Clone)]
pub struct Platform {
    domid: DomId,
    xenstore: Client,
    open_evtchn: Arc<EvtchnOpener>,
    grants: Arc<dyn GrantMapper>,
}

impl Platform {
    /// A platform serving from domain `domid`.
    pub fn new(
        domid: DomId,
        xenstore: Client,
        open_evtchn: impl Fn() -> evtchn::Result<Box<dyn EventChannel>> + Send + Sync + 'static,
        grants: Arc<dyn GrantMapper>,
    ) -> Self {
        Platform { domid, xenstore, open_evtchn: Arc::new(open_evtchn), grants }
    }

    /// The backend's own domain id.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// The xenstore connection.
    pub fn xenstore(&self) -> &Client {
        &self.xenstore
    }

    /// Opens a new event-channel handle.
    pub fn open_evtchn(&self) -> evtchn::Result<Box<dyn EventChannel>> {
        (self.open_evtchn)()
    }

    /// The grant mapper (map and copy).
    pub fn grants(&self) -> &Arc<dyn GrantMapper> {
        &self.grants
    }
}

impl core::fmt::Debug for Platform {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Platform").field("domid", &self.domid).finish_non_exhaustive()
    }
}
