//! A simulated console frontend, as Linux's `drivers/tty/hvc/hvc_xen.c`
//! behaves: [`ConsoleFront`] is a secondary console or channel
//! (`device/console/<devid>`: one page granted to the backend, a port
//! allocated for it, `ring-ref` and `port` written, Initialised, then
//! Connected once the backend is), [`PrimaryConsole`] a domain's first
//! console (`/local/domain/N/console`: the page granted at
//! `GNTTAB_RESERVED_CONSOLE` and the nodes written by the toolstack, no
//! xenbus states). Both write to `out` and read `in` through
//! [`ConsolePage`], notifying the backend after each write that moved
//! bytes and after each read, as `__write_console` and `domU_read_console`
//! do. [`channel_spec`] gives the directories libxl writes for
//! `channel = [ "connection=...,name=..." ]`.

use std::borrow::Borrow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use evtchn::{EventChannel, Port};
use gnttab::{GrantMapping, GrantRef};
use xen_bus::XenbusState;
use xen_ring::abi::{XENCONS_IN, XENCONS_OUT};
use xen_ring::{ByteReader, ByteWriter};
use xs_wire::{Access, Client, Perm, TxId};

use crate::frontend::{DeviceSpec, FrontendDevice, FrontendError};
use crate::host::{DomId, GuestPages, SimHost};

/// How long a blocked writer or reader sleeps for an event before retrying
/// (hvc_xen yields and polls).
const POLL: Duration = Duration::from_millis(5);

/// A channel's connection, as in xl.cfg.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChannelConnection {
    /// `connection=pty`.
    Pty,
    /// `connection=socket,path=PATH`.
    Socket(String),
}

/// The directories libxl writes for a channel (`libxl__device_console_add`
/// of `libxl__init_console_from_channel`): backend `name`, `connection`,
/// `path`, `protocol = vt100`; frontend `name`, `limit`, `type = ioemu`,
/// `output` (`pty` or `chardev:libxl-channel<devid>`), `tty` (empty),
/// `protocol`.
pub fn channel_spec(backend: DomId, frontend: DomId, devid: u32, name: &str, conn: &ChannelConnection) -> DeviceSpec {
    let mut spec = DeviceSpec::new("console", backend, frontend, devid);
    let (connection, output) = match conn {
        ChannelConnection::Pty => ("pty".to_string(), "pty".to_string()),
        ChannelConnection::Socket(_) => ("socket".to_string(), format!("chardev:libxl-channel{devid}")),
    };
    let mut be = vec![("protocol", "vt100".to_string()), ("name", name.to_string()), ("connection", connection)];
    if let ChannelConnection::Socket(path) = conn {
        be.push(("path", path.clone()));
    }
    spec.backend_nodes = be.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    spec.frontend_nodes = [
        ("name", name.to_string()),
        ("limit", "1048576".to_string()),
        ("type", "ioemu".to_string()),
        ("output", output),
        ("tty", String::new()),
        ("protocol", "vt100".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    spec
}

/// The guest's console page, shareable with the byte rings.
#[derive(Clone)]
struct PageMemory(Arc<GuestPages>);

impl Borrow<GrantMapping> for PageMemory {
    fn borrow(&self) -> &GrantMapping {
        self.0.mapping()
    }
}

/// The guest's end of a console page: its rings and its port.
pub struct ConsolePage {
    page: PageMemory,
    out: ByteWriter<PageMemory>,
    input: ByteReader<PageMemory>,
    evtchn: Box<dyn EventChannel>,
    port: Port,
}

impl ConsolePage {
    fn new(page: GuestPages, evtchn: Box<dyn EventChannel>, port: Port) -> Result<Self, FrontendError> {
        let page = PageMemory(Arc::new(page));
        let out = ByteWriter::new(page.clone(), XENCONS_OUT)?;
        let input = ByteReader::new(page.clone(), XENCONS_IN)?;
        Ok(ConsolePage { page, out, input, evtchn, port })
    }

    /// The page as the guest sees it (to scribble on, in hostile tests).
    pub fn mapping(&self) -> &GrantMapping {
        self.page.0.mapping()
    }

    /// The port the backend binds.
    pub fn port(&self) -> Port {
        self.port
    }

    /// Signals the backend.
    pub fn notify(&self) -> Result<(), FrontendError> {
        Ok(self.evtchn.notify(self.port)?)
    }

    /// Writes what fits into `out`; notifies the backend if anything did.
    pub fn write(&mut self, data: &[u8]) -> Result<usize, FrontendError> {
        let n = self.out.write(data)?;
        if n > 0 {
            self.evtchn.notify(self.port)?;
        }
        Ok(n)
    }

    /// Reads what `in` holds (up to `buf.len()`), then notifies the backend.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, FrontendError> {
        let n = self.input.read(buf)?;
        self.evtchn.notify(self.port)?;
        Ok(n)
    }

    /// Waits up to `timeout` for an event; takes and unmasks it.
    pub fn wait_event(&self, timeout: Duration) -> Result<bool, FrontendError> {
        let ready = evtchn::wait_pending(&*self.evtchn, Some(timeout))?;
        let mut pending = Vec::new();
        evtchn::take_and_unmask(&*self.evtchn, &mut pending)?;
        Ok(ready || !pending.is_empty())
    }

    /// Writes all of `data`, waiting for room as hvc_xen does (within `timeout`).
    pub fn write_all(&mut self, data: &[u8], timeout: Duration) -> Result<(), FrontendError> {
        let deadline = Instant::now() + timeout;
        let mut at = 0;
        while at < data.len() {
            let n = self.write(&data[at..])?;
            at += n;
            if n == 0 {
                if Instant::now() >= deadline {
                    return Err(timeout_error(format!("room in out ({at} of {} bytes written)", data.len())));
                }
                self.wait_event(POLL)?;
            }
        }
        Ok(())
    }

    /// Reads exactly `len` bytes from `in` (within `timeout`).
    pub fn read_exact(&mut self, len: usize, timeout: Duration) -> Result<Vec<u8>, FrontendError> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::with_capacity(len);
        let mut buf = [0u8; 1024];
        while got.len() < len {
            let n = self.read(&mut buf[..(len - got.len()).min(1024)])?;
            got.extend_from_slice(&buf[..n]);
            if n == 0 {
                if Instant::now() >= deadline {
                    return Err(timeout_error(format!("{len} bytes in in ({} read)", got.len())));
                }
                self.wait_event(POLL)?;
            }
        }
        Ok(got)
    }

    /// Bytes the guest wrote that the backend has not consumed.
    pub fn unconsumed(&mut self) -> Result<u32, FrontendError> {
        Ok(XENCONS_OUT.size - self.out.space()?)
    }
}

fn timeout_error(what: String) -> FrontendError {
    FrontendError::Timeout { waiting_for: what, state: None }
}

/// Allocates the console page and a port for `backend`.
fn new_page(
    host: &Arc<SimHost>,
    domid: DomId,
    backend: DomId,
) -> Result<(GuestPages, Box<dyn EventChannel>, Port), FrontendError> {
    let grants = host.grant_table(domid);
    let page = grants.alloc_pages(1)?;
    let evtchn = host.evtchn(domid);
    let port = evtchn.bind_unbound_port(backend)?;
    Ok((page, evtchn, port))
}

/// A secondary console or channel, as hvc_xen's xenbus driver.
pub struct ConsoleFront {
    dev: FrontendDevice,
    host: Arc<SimHost>,
    page: Option<ConsolePage>,
    gref: Option<GrantRef>,
}

impl ConsoleFront {
    /// The guest's side of `spec` (the toolstack created it), not connected.
    pub fn new(host: &Arc<SimHost>, xs: Client, spec: DeviceSpec) -> Self {
        ConsoleFront { dev: FrontendDevice::new(host, xs, spec), host: host.clone(), page: None, gref: None }
    }

    /// `xencons_connect_backend` and the states: grants a zeroed page,
    /// allocates a port, writes `ring-ref` and `port` in one transaction,
    /// goes Initialised, and Connected once the backend is.
    pub fn connect(&mut self, timeout: Duration) -> Result<(), FrontendError> {
        let spec = self.dev.spec().clone();
        let (page, evtchn, port) = new_page(&self.host, spec.frontend, spec.backend)?;
        let gref = self.dev.grant_table().grant_access(page.frame(0), spec.backend, false)?;
        let fe = spec.frontend_path();
        let xs = self.dev.xenstore().clone();
        xs.transaction(|tx| {
            xs.write(tx, &format!("{fe}/ring-ref"), gref.0.to_string().as_bytes())?;
            xs.write(tx, &format!("{fe}/port"), port.0.to_string().as_bytes())
        })?;
        self.page = Some(ConsolePage::new(page, evtchn, port)?);
        self.gref = Some(gref);
        self.dev.set_state(XenbusState::Initialised)?;
        self.dev.wait_backend_state("Connected", timeout, |s| s == Some(XenbusState::Connected))?;
        self.dev.set_state(XenbusState::Connected)
    }

    /// The page (connected).
    pub fn page(&mut self) -> Result<&mut ConsolePage, FrontendError> {
        self.page.as_mut().ok_or(FrontendError::NoRing(0))
    }

    /// The xenbus device.
    pub fn device(&mut self) -> &mut FrontendDevice {
        &mut self.dev
    }

    /// Closes as the driver going away does: Closing; on the backend's
    /// Closing, Closed (`xenbus_frontend_closed`); the grant revoked and
    /// the port closed once the backend is Closed and let go.
    pub fn close(&mut self, timeout: Duration) -> Result<(), FrontendError> {
        self.dev.set_state(XenbusState::Closing)?;
        self.dev.wait_backend_state("Closing", timeout, |s| {
            matches!(s, Some(XenbusState::Closing | XenbusState::Closed) | None)
        })?;
        self.dev.set_state(XenbusState::Closed)?;
        self.dev.wait_backend_state("Closed", timeout, |s| matches!(s, Some(XenbusState::Closed) | None))?;
        self.release(timeout)
    }

    fn release(&mut self, timeout: Duration) -> Result<(), FrontendError> {
        if let Some(page) = self.page.take() {
            let _ = page.evtchn.unbind(page.port);
        }
        if let Some(gref) = self.gref.take() {
            // The backend unmaps as it closes; retry while it still holds it.
            let deadline = Instant::now() + timeout;
            while let Err(e) = self.dev.grant_table().end_access(gref) {
                if Instant::now() >= deadline {
                    return Err(e.into());
                }
                std::thread::sleep(POLL);
            }
        }
        let xs = self.dev.xenstore().clone();
        let fe = self.dev.spec().frontend_path();
        for node in ["ring-ref", "port"] {
            let _ = xs.rm(TxId::NONE, &format!("{fe}/{node}"));
        }
        Ok(())
    }

    /// Starts over as a reloaded driver: Initialising, then [`ConsoleFront::connect`].
    pub fn reconnect(&mut self, timeout: Duration) -> Result<(), FrontendError> {
        self.dev.set_state(XenbusState::Initialising)?;
        self.dev.wait_backend_state("InitWait", timeout, |s| s == Some(XenbusState::InitWait))?;
        self.connect(timeout)
    }
}

/// A domain's primary console: the page at `GNTTAB_RESERVED_CONSOLE`, the
/// port allocated for the console daemon's domain, and the nodes libxl
/// writes (`libxl__device_console_add` with a build state): `ring-ref`
/// (the page's frame), `port`, `limit`, `type = xenconsoled`, `output =
/// pty`, `tty` (empty), plus the domain's `name`.
pub struct PrimaryConsole {
    page: ConsolePage,
    domid: DomId,
}

/// `GNTTAB_RESERVED_CONSOLE`.
const RESERVED_CONSOLE: GrantRef = GrantRef(0);

impl PrimaryConsole {
    /// Builds guest `domid`'s console for a daemon in `backend`, the nodes
    /// written through the toolstack's `xs` (dom0, privileged).
    pub fn create(
        host: &Arc<SimHost>,
        xs: &Client,
        domid: DomId,
        backend: DomId,
        name: &str,
    ) -> Result<Self, FrontendError> {
        Self::create_with_type(host, xs, domid, backend, name, "xenconsoled")
    }

    /// [`PrimaryConsole::create`] with another `type` (`ioemu`: QEMU's).
    pub fn create_with_type(
        host: &Arc<SimHost>,
        xs: &Client,
        domid: DomId,
        backend: DomId,
        name: &str,
        kind: &str,
    ) -> Result<Self, FrontendError> {
        let (page, evtchn, port) = new_page(host, domid, backend)?;
        host.grant_table(domid).grant_reserved(RESERVED_CONSOLE, page.frame(0), backend, false)?;
        let frame = page.frame(0).0;
        let dir = format!("/local/domain/{domid}/console");
        let ro = [Perm::new(Access::None, 0), Perm::new(Access::Read, u32::from(domid))];
        xs.transaction(|tx| {
            xs.write(tx, &format!("/local/domain/{domid}/name"), name.as_bytes())?;
            for (node, value) in [
                ("ring-ref", frame.to_string()),
                ("port", port.0.to_string()),
                ("limit", "1048576".to_string()),
                ("type", kind.to_string()),
                ("output", "pty".to_string()),
                ("tty", String::new()),
            ] {
                let path = format!("{dir}/{node}");
                xs.write(tx, &path, value.as_bytes())?;
                xs.set_perms(tx, &path, &ro)?;
            }
            Ok(())
        })?;
        Ok(PrimaryConsole { page: ConsolePage::new(page, evtchn, port)?, domid })
    }

    /// The page.
    pub fn page(&mut self) -> &mut ConsolePage {
        &mut self.page
    }

    /// The domain.
    pub fn domid(&self) -> DomId {
        self.domid
    }
}
