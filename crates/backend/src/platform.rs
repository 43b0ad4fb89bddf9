//! What a backend needs from the host: a xenstore connection, event-channel
//! handles, a grant mapper and its own domain id.

use std::sync::{Arc, RwLock};

use evtchn::{DomId, EventChannel};
use gnttab::GrantMapper;
use xs_wire::Client;

/// Opens a new event-channel handle (one open of `/dev/xen/evtchn`, or a
/// simulated one).
pub type EvtchnOpener = dyn Fn() -> evtchn::Result<Box<dyn EventChannel>> + Send + Sync;

/// Opens a new xenstore connection (after the last one was lost).
pub type XenstoreConnector = dyn Fn() -> Result<Client, xs_wire::ClientError> + Send + Sync;

/// The host as a backend sees it: a struct of trait objects, built from the
/// real devices by the binary or from the simulator by tests. Clones share
/// one xenstore connection, which [`Platform::reconnect`] replaces for all.
#[derive(Clone)]
pub struct Platform {
    domid: DomId,
    xenstore: Arc<RwLock<Client>>,
    connect: Option<Arc<XenstoreConnector>>,
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
        Platform {
            domid,
            xenstore: Arc::new(RwLock::new(xenstore)),
            connect: None,
            open_evtchn: Arc::new(open_evtchn),
            grants,
        }
    }

    /// How to connect to xenstore again when the connection is lost
    /// (xenstored restarted, or a frame it sent could not be parsed).
    /// Without it a lost connection is not re-established.
    pub fn with_reconnect(
        mut self,
        connect: impl Fn() -> Result<Client, xs_wire::ClientError> + Send + Sync + 'static,
    ) -> Self {
        self.connect = Some(Arc::new(connect));
        self
    }

    /// Whether [`Platform::reconnect`] can do anything.
    pub fn can_reconnect(&self) -> bool {
        self.connect.is_some()
    }

    /// Opens a new xenstore connection and makes it every clone's.
    pub fn reconnect(&self) -> Result<Client, xs_wire::ClientError> {
        let Some(connect) = &self.connect else {
            return Err(xs_wire::ClientError::Disconnected { reason: "no way to reconnect was given".into() });
        };
        let client = connect()?;
        *self.xenstore.write().unwrap_or_else(|p| p.into_inner()) = client.clone();
        Ok(client)
    }

    /// The real host: `xenstore` (normally [`Client::connect`]), one
    /// `/dev/xen/evtchn` open per handle, one `/dev/xen/gntdev` for grants.
    /// The domain id is read from the connection's own `domid` node (a
    /// relative path), as a driver domain learns it.
    pub fn xen(xenstore: Client) -> Result<Self, crate::error::Error> {
        let domid = read_own_domid(&xenstore)?;
        let gntdev = gnttab::Gntdev::open().map_err(crate::error::Error::Grant)?;
        let open = || -> evtchn::Result<Box<dyn EventChannel>> { Ok(Box::new(evtchn::XenEvtchn::open()?)) };
        Ok(Platform::new(domid, xenstore, open, Arc::new(gntdev)).with_reconnect(Client::connect))
    }

    /// The backend's own domain id.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// The xenstore connection (the current one: see [`Platform::reconnect`]).
    pub fn xenstore(&self) -> Client {
        self.xenstore.read().unwrap_or_else(|p| p.into_inner()).clone()
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
