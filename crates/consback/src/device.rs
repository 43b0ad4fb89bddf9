//! The `console` device type: libxl's channels and secondary consoles
//! (`backend/console/<domid>/<devid>`, frontend `device/console/<devid>`),
//! as QEMU's `hw/char/xen_console.c` serves them for a device model.
//!
//! `init` reads the nodes ([`crate::config`]) and, the first time, opens
//! the host side: a pty, whose name goes to the frontend's `tty` node
//! (where `libxl_console_get_tty` and `xl console` read it, and QEMU writes
//! it), or a listening socket. The host side stays while the backend
//! directory does, across the guest's reconnections. `connect` maps the
//! frontend's `ring-ref` (a grant), binds its `port`, and hands the page
//! to a [`ConsoleRing`].

use std::sync::{Arc, Mutex};

use gnttab::GrantRef;
use xen_backend::{Device, DeviceCtx, DeviceError, DeviceKey, DeviceType, RingSetup};

use crate::config::{ConfigError, Connection, ConsoleNodes, ConsoleSpec, TYPE_IOEMU};
use crate::host::Host;
use crate::ring::{ConsoleRing, HostSlot, Limits};

/// Looks up the `-chardev` an `output = chardev:ID` names.
pub type ChardevLookup = Arc<dyn Fn(&str) -> Option<Connection> + Send + Sync>;

/// Told a console's pty name once it is published (devid, `/dev/pts/N`).
pub type TtyPublished = Arc<dyn Fn(u32, &str) + Send + Sync>;

/// How consoles are served.
#[derive(Clone)]
pub struct ConsoleOptions {
    /// Limits per console (its buffer is the smaller of this and `limit`).
    pub limits: Limits,
    /// The device model's `-chardev` table, for `output = chardev:ID`.
    pub chardevs: ChardevLookup,
    /// Told each pty name written to a `tty` node (the device model's
    /// `query-chardev` shows it, as QEMU's does).
    pub tty_published: Option<TtyPublished>,
}

impl Default for ConsoleOptions {
    fn default() -> Self {
        ConsoleOptions { limits: Limits::default(), chardevs: Arc::new(|_| None), tty_published: None }
    }
}

impl core::fmt::Debug for ConsoleOptions {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ConsoleOptions").field("limits", &self.limits).finish_non_exhaustive()
    }
}

/// The console device type, serving `backend/<name>` (`console`).
#[derive(Debug)]
pub struct ConsoleDeviceType {
    name: String,
    opts: ConsoleOptions,
}

impl ConsoleDeviceType {
    /// Serves `backend/<name>` with `opts`.
    pub fn new(name: impl Into<String>, opts: ConsoleOptions) -> Arc<Self> {
        Arc::new(ConsoleDeviceType { name: name.into(), opts })
    }
}

impl DeviceType for ConsoleDeviceType {
    fn name(&self) -> &str {
        &self.name
    }

    /// QEMU's `xen_console_device_create` rule: only consoles whose
    /// frontend `type` is `ioemu`. libxl gives every PV guest's primary
    /// console a `backend/console/<domid>/0` too, of type `xenconsoled`:
    /// that one is xenconsoled's (or `serve --consoles`'), not a device's.
    fn serves(&self, xs: &xs_wire::Client, key: &DeviceKey, frontend: &str) -> bool {
        match xs.read(xs_wire::TxId::NONE, &format!("{frontend}/type")) {
            Ok(v) if v.strip_suffix(b"\0").unwrap_or(&v) == TYPE_IOEMU.as_bytes() => true,
            Ok(v) => {
                log::info!("{key}: console of type {:?}, not ioemu: not ours", String::from_utf8_lossy(&v));
                false
            }
            // Absent (QEMU declines too) or unreadable.
            Err(e) => {
                log::info!("{key}: no readable console type ({e}): not ours");
                false
            }
        }
    }

    fn create(&self, _ctx: &DeviceCtx) -> Result<Box<dyn Device>, DeviceError> {
        Ok(Box::new(ConsoleDevice { opts: self.opts.clone(), spec: None, host: Arc::new(Mutex::new(None)), tty: None }))
    }
}

struct ConsoleDevice {
    opts: ConsoleOptions,
    spec: Option<ConsoleSpec>,
    host: HostSlot,
    tty: Option<String>,
}

fn config_error(e: ConfigError) -> DeviceError {
    DeviceError::Other { msg: "Bad console configuration".into(), source: Some(Box::new(e)) }
}

impl ConsoleDevice {
    fn read_nodes(ctx: &DeviceCtx) -> Result<ConsoleNodes, DeviceError> {
        Ok(ConsoleNodes {
            connection: ctx.backend_str_opt("connection")?,
            path: ctx.backend_str_opt("path")?,
            name: ctx.backend_str_opt("name")?,
            kind: ctx.frontend_str_opt("type")?,
            output: ctx.frontend_str_opt("output")?,
            limit: ctx.frontend_str_opt("limit")?,
        })
    }
}

impl Device for ConsoleDevice {
    fn init(&mut self, ctx: &DeviceCtx) -> Result<(), DeviceError> {
        if self.spec.is_some() {
            // A reconnection: the same host side, the same tty.
            return Ok(());
        }
        let spec =
            ConsoleSpec::parse(&Self::read_nodes(ctx)?, TYPE_IOEMU, &*self.opts.chardevs).map_err(config_error)?;
        let host = Host::open(&spec.connection).map_err(|e| DeviceError::Other {
            msg: format!("Cannot open the console's {}", spec.connection),
            source: Some(Box::new(e)),
        })?;
        if let Some(tty) = host.tty() {
            ctx.write_frontend_node("tty", tty)?;
            if let Some(told) = &self.opts.tty_published {
                told(ctx.key().devid, tty);
            }
            log::info!("{}: {} on {tty}", ctx.backend_path(), spec.name.as_deref().unwrap_or("console"));
            self.tty = Some(tty.to_string());
        } else {
            log::info!("{}: {} on {}", ctx.backend_path(), spec.name.as_deref().unwrap_or("console"), spec.connection);
        }
        *self.host.lock().unwrap_or_else(|p| p.into_inner()) = Some(host);
        self.spec = Some(spec);
        Ok(())
    }

    fn connect(&mut self, ctx: &DeviceCtx) -> Result<Vec<RingSetup>, DeviceError> {
        let spec = self.spec.as_ref().ok_or_else(|| DeviceError::msg("Console connected before init"))?;
        let gref = GrantRef(ctx.frontend_u32("ring-ref")?);
        let mem = ctx.map_grants(&[gref], true)?;
        let limits = Limits { buffer: spec.buffer.min(self.opts.limits.buffer), ..self.opts.limits };
        let handler = ConsoleRing::new(mem, self.host.clone(), limits, None)?;
        let port = ctx.bind_event_channel("port")?;
        Ok(vec![RingSetup { port, handler: Box::new(handler) }])
    }

    fn describe(&self) -> Vec<(&'static str, String)> {
        let Some(spec) = &self.spec else { return Vec::new() };
        let mut d = match &spec.connection {
            Connection::Pty => vec![("connection", "pty".to_string())],
            Connection::Socket(p) => vec![("connection", "socket".to_string()), ("path", p.display().to_string())],
        };
        if let Some(name) = &spec.name {
            d.push(("name", name.clone()));
        }
        if let Some(tty) = &self.tty {
            d.push(("tty", tty.clone()));
        }
        d
    }
}
