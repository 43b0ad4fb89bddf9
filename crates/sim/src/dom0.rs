//! A simulated host with dom0 up: the host, the xenstored and a toolstack
//! connection. What every simulator user (demo, benchmarks, scenario
//! tests) starts with; a backend in dom0 is built on
//! [`SimHost::evtchn_opener`] and [`SimHost::grant_mapper`] of domain 0.

use std::sync::Arc;

use xs_wire::Client;

use crate::frontend::Toolstack;
use crate::host::SimHost;
use crate::xenstored::Xenstored;

/// Errors of bringing up the simulated dom0.
#[derive(Debug, thiserror::Error)]
pub enum Dom0Error {
    /// Creating domain 0 failed.
    #[error("Cannot create domain 0")]
    Host(#[from] crate::host::Error),
    /// A xenstore connection could not be made.
    #[error("Cannot connect to the simulated xenstored")]
    Connect(#[from] std::io::Error),
    /// The xenstore client could not start.
    #[error("Cannot start a xenstore client")]
    Client(#[from] xs_wire::ClientError),
}

/// The simulated host with dom0 created and a toolstack connected.
pub struct SimDom0 {
    /// The host: domains, event channels, grant tables.
    pub host: Arc<SimHost>,
    /// The xenstored.
    pub xenstored: Arc<Xenstored>,
    /// dom0's toolstack connection (creates device directories).
    pub toolstack: Toolstack,
}

impl SimDom0 {
    /// Creates the host and domain 0, a xenstored, and the toolstack's connection.
    pub fn start() -> Result<SimDom0, Dom0Error> {
        let host = SimHost::new();
        host.create_domain(0)?;
        let xenstored = Xenstored::new();
        let toolstack = Toolstack::new(Client::from_stream(xenstored.connect_as(0)?)?);
        Ok(SimDom0 { host, xenstored, toolstack })
    }

    /// A new dom0 xenstore connection.
    pub fn dom0_client(&self) -> Result<Client, Dom0Error> {
        Ok(Client::from_stream(self.xenstored.connect_as(0)?)?)
    }
}

/// A simulated dom0's `/run/xenbackd`: a fresh directory on tmpfs (in
/// `/dev/shm` where there is one) for the backend's request journals,
/// removed with everything in it on drop. Each one is new, so tests running
/// at once never share journals.
#[derive(Debug)]
pub struct RunDir {
    path: std::path::PathBuf,
}

impl RunDir {
    /// Creates the directory.
    pub fn new() -> std::io::Result<RunDir> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let base = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let path = base.join(format!("xenbackd-run-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(RunDir { path })
    }

    /// Its path.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
