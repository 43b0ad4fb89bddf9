//! Shared setup of the console scenario tests: a simulated host and
//! xenstored, the framework serving `backend/console` from dom0 with the
//! console device type, and guests with hvc_xen-like frontends.

#![allow(dead_code)]

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use consback::{ConsoleDeviceType, ConsoleOptions};
use xen_backend::{Backend, Config, Platform};
use xen_sim::consfront::{channel_spec, ChannelConnection, ConsoleFront};
use xen_sim::dom0::SimDom0;
use xen_sim::frontend::Toolstack;
use xen_sim::host::SimHost;
use xen_sim::xenstored::Xenstored;
use xs_wire::{Client, TxId};

/// Longest wait for anything; reaching it is a failure.
pub const WAIT: Duration = Duration::from_secs(30);

/// dom0 serving consoles.
pub struct ConsoleHarness {
    pub host: Arc<SimHost>,
    pub xenstored: Arc<Xenstored>,
    pub toolstack: Toolstack,
    pub backend: Backend,
    pub dir: TempDir,
}

/// A directory removed on drop (sockets of the tests).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<Self> {
        let p = std::env::temp_dir().join(format!("xenbackd-cons-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }

    pub fn path(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl ConsoleHarness {
    pub fn new(tag: &str, opts: ConsoleOptions) -> Result<Self> {
        Self::with_config(tag, opts, Config::default())
    }

    pub fn with_config(tag: &str, opts: ConsoleOptions, config: Config) -> Result<Self> {
        let _ = env_logger::builder().is_test(true).try_init();
        let SimDom0 { host, xenstored, toolstack } = SimDom0::start()?;
        let client = Client::from_stream(xenstored.connect_as(0)?)?;
        let backend = Backend::start(
            Platform::new(0, client, host.evtchn_opener(0), host.grant_mapper(0)),
            vec![ConsoleDeviceType::new("console", opts) as _],
            config,
        )?;
        Ok(ConsoleHarness { host, xenstored, toolstack, backend, dir: TempDir::new(tag)? })
    }

    /// Creates guest `domid`; its own xenstore connection.
    pub fn guest(&self, domid: u16) -> Result<Client> {
        self.host.create_domain(domid)?;
        self.xenstored.introduce_domain(domid.into());
        Ok(Client::from_stream(self.xenstored.connect_as(domid.into())?)?)
    }

    /// A channel of `domid` as libxl creates it, not connected yet.
    pub fn channel(&self, guest: &Client, domid: u16, devid: u32, conn: &ChannelConnection) -> Result<ConsoleFront> {
        let spec = channel_spec(0, domid, devid, &format!("org.example.{devid}"), conn);
        self.toolstack.create(&spec)?;
        Ok(ConsoleFront::new(&self.host, guest.clone(), spec))
    }

    /// A connected channel.
    pub fn connected(&self, guest: &Client, domid: u16, devid: u32, conn: &ChannelConnection) -> Result<ConsoleFront> {
        let mut c = self.channel(guest, domid, devid, conn)?;
        c.connect(WAIT)?;
        Ok(c)
    }

    /// The pty the backend published in the frontend's `tty` node.
    pub fn tty(&self, domid: u16, devid: u32) -> Result<String> {
        let path = format!("/local/domain/{domid}/device/console/{devid}/tty");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(v) = self.toolstack.xenstore().read(TxId::NONE, &path) {
                let s = String::from_utf8(v)?;
                if !s.is_empty() {
                    return Ok(s);
                }
            }
            if Instant::now() > deadline {
                bail!("no tty in {path}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Opens a pty slave as a terminal program does.
pub fn open_tty(path: &str) -> Result<std::fs::File> {
    std::fs::OpenOptions::new().read(true).write(true).open(path).with_context(|| format!("opening {path}"))
}

/// Connects to a console socket, retrying while it is not there yet.
pub fn connect_socket(path: &str) -> Result<UnixStream> {
    let deadline = Instant::now() + WAIT;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => return Err(e).context(format!("connecting to {path}")),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Reads exactly `n` bytes from a host side within [`WAIT`].
pub fn read_host(r: &mut impl Read, n: usize) -> Result<Vec<u8>> {
    let mut got = vec![0u8; n];
    r.read_exact(&mut got).context("reading the host side")?;
    Ok(got)
}

/// Bytes that differ from round to round and wrap the rings unevenly.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| ((i * 7 + i / 251) as u8) ^ seed).collect()
}
