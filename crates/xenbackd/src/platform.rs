//! The Xen platform of the device-model mode, with `/dev/xen/gntdev` opened
//! when the first ring connects rather than at start-up (event channels are
//! opened per handle anyway). A device model is started per guest before
//! that guest runs; this way it comes up, writes its state node and answers
//! QMP on a host whose grant device is missing or busy, and the failure lands
//! on the device that needs it (its `error` node) instead of failing
//! `xl create` with a bare exit status. It also lets the device-model tests
//! run the real binary against the simulated xenstored.

use std::sync::{Arc, Mutex, OnceLock};

use evtchn::EventChannel;
use gnttab::{CopySegment, DomId, Gntdev, GrantMapper, GrantMapping, GrantRef, GrantStatus};
use xen_backend::Platform;
use xs_wire::Client;

/// A gntdev opened on first use.
#[derive(Default)]
struct LazyGntdev {
    dev: OnceLock<Gntdev>,
    opening: Mutex<()>,
}

impl LazyGntdev {
    fn get(&self) -> gnttab::Result<&Gntdev> {
        if let Some(d) = self.dev.get() {
            return Ok(d);
        }
        let _guard = self.opening.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = self.dev.get() {
            return Ok(d);
        }
        let d = Gntdev::open()?;
        log::info!("opened {}", gnttab::GNTDEV_PATH);
        Ok(self.dev.get_or_init(|| d))
    }
}

impl GrantMapper for LazyGntdev {
    fn map(&self, domid: DomId, refs: &[GrantRef], writable: bool) -> gnttab::Result<GrantMapping> {
        self.get()?.map(domid, refs, writable)
    }

    fn copy(&self, segments: &mut [CopySegment<'_>], status: &mut [GrantStatus]) -> gnttab::Result<()> {
        self.get()?.copy(segments, status)
    }
}

/// The real host, with the grant device opened lazily. The domain id comes
/// from the connection's `domid` node (absent in dom0).
pub fn lazy_xen_platform(xs: Client) -> anyhow::Result<Platform> {
    let domid = match xs.read(xs_wire::TxId::NONE, "domid") {
        Ok(v) => {
            let text = String::from_utf8_lossy(&v);
            let text = text.trim_end_matches('\0').trim();
            text.parse().map_err(|_| anyhow::anyhow!("own domid node reads {text:?}"))?
        }
        Err(e) if e.errno() == Some(xs_wire::XsErrno::ENOENT) => 0,
        Err(e) => return Err(anyhow::Error::from(e)),
    };
    let open = || -> evtchn::Result<Box<dyn EventChannel>> { Ok(Box::new(evtchn::XenEvtchn::open()?)) };
    Ok(Platform::new(domid, xs, open, Arc::new(LazyGntdev::default())))
}
