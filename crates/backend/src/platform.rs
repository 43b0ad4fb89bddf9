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

    /// The real host: `xenstore` (normally [`Client::connect`]), one
    /// `/dev/xen/evtchn` open per handle, one `/dev/xen/gntdev` for grants.
    /// The domain id is read from the connection's own `domid` node (a
    /// relative path), as a driver domain learns it.
    pub fn xen(xenstore: Client) -> Result<Self, crate::error::Error> {
        let domid = read_own_domid(&xenstore)?;
        let gntdev = gnttab::Gntdev::open().map_err(crate::error::Error::Grant)?;
        let open = || -> evtchn::Result<Box<dyn EventChannel>> { Ok(Box::new(evtchn::XenEvtchn::open()?)) };
        Ok(Platform::new(domid, xenstore, open, Arc::new(gntdev)))
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

/// Reads `domid` relative to the connection's home; dom0's tools may not
/// have written it, and a privileged connection without it is dom0.
fn read_own_domid(xs: &Client) -> Result<DomId, crate::error::Error> {
    match xs.read(xs_wire::TxId::NONE, "domid") {
        Ok(v) => {
            let text = String::from_utf8_lossy(&v);
            text.trim_end_matches('\0').trim().parse().map_err(|_| crate::error::Error::BadDomid(text.into_owned()))
        }
        Err(e) if e.errno() == Some(xs_wire::XsErrno::ENOENT) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

impl core::fmt::Debug for Platform {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Platform").field("domid", &self.domid).finish_non_exhaustive()
    }
}
