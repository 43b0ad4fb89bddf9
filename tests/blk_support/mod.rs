//! Shared setup of the block tests: a simulated host and xenstored, the
//! backend framework serving `qdisk` and `vbd` with the block device type,
//! disks in temporary files, and blkfronts connected through xenbus.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use blkback::{BlkDeviceType, BlkOptions, BufferBudget, EngineChoice};
use xen_backend::{Backend, Config, Platform};
use xen_sim::blkfront::{BlkCompletion, BlkOp, Blkfront, BlkfrontOptions, DiskInfo, FrontQueue};
use xen_sim::dom0::{RunDir, SimDom0};
use xen_sim::frontend::{DeviceSpec, FrontendDevice, Toolstack};
use xen_sim::host::SimHost;
use xen_sim::xenstored::Xenstored;
use xs_wire::Client;

/// Longest wait for a state or a completion; reaching it is a failure.
pub const WAIT: Duration = Duration::from_secs(30);

/// A temporary disk file, removed on drop.
pub struct TempDisk {
    pub path: PathBuf,
}

impl TempDisk {
    pub fn new(name: &str, bytes: u64) -> TempDisk {
        let dir = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
        let path = dir.join(format!("blk-test-{}-{name}", std::process::id()));
        std::fs::File::create(&path).unwrap().set_len(bytes).unwrap();
        TempDisk { path }
    }
}

impl Drop for TempDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A host with dom0 running the framework with the block device type.
pub struct Harness {
    pub host: Arc<SimHost>,
    pub xenstored: Arc<Xenstored>,
    pub toolstack: Toolstack,
    pub backend: Backend,
    /// dom0's /run/xenbackd (the rings' journals).
    pub run: RunDir,
}

/// The I/O engine of these tests: io_uring in the test targets whose name
/// ends in `_uring` (the same source built twice, see tests/Cargo.toml),
/// the thread pool in the others.
pub fn engine() -> EngineChoice {
    if env!("CARGO_CRATE_NAME").ends_with("_uring") {
        EngineChoice::IoUring
    } else {
        EngineChoice::Threads
    }
}

/// The framework in dom0 serving `qdisk` and `vbd` with the block device type.
/// `qdisk` and `vbd` with the block device type, on this target's engine.
pub fn blk_types() -> Vec<Arc<dyn xen_backend::DeviceType>> {
    let opts = blk_options();
    blk_types_with(opts, &BufferBudget::new(opts.buffer_bytes))
}

/// The options of these tests: 2 I/O threads, this target's engine.
pub fn blk_options() -> BlkOptions {
    BlkOptions { io_threads: 2, engine: engine(), ..BlkOptions::default() }
}

/// `qdisk` and `vbd` with `opts`, their buffers charged to `budget`.
pub fn blk_types_with(opts: BlkOptions, budget: &Arc<BufferBudget>) -> Vec<Arc<dyn xen_backend::DeviceType>> {
    vec![
        BlkDeviceType::with_budget("qdisk", opts, budget.clone()) as _,
        BlkDeviceType::with_budget("vbd", opts, budget.clone()) as _,
    ]
}

/// Two workers, request journals in `run` (as `serve` keeps them in /run/xenbackd).
pub fn backend_config(run: &RunDir) -> Config {
    Config { workers: 2, journal_dir: Some(run.path().to_path_buf()), ..Config::default() }
}

/// The framework in dom0 serving [`blk_types`] with [`backend_config`].
fn start_backend(
    host: &Arc<SimHost>,
    xenstored: &Arc<Xenstored>,
    run: &RunDir,
    types: Vec<Arc<dyn xen_backend::DeviceType>>,
) -> Result<Backend> {
    let platform =
        Platform::new(0, Client::from_stream(xenstored.connect_as(0)?)?, host.evtchn_opener(0), host.grant_mapper(0));
    Ok(Backend::start(platform, types, backend_config(run))?)
}

/// A guest's disk: the generic frontend device (xenbus side) and the blkfront.
pub struct Guest {
    pub dev: FrontendDevice,
    pub front: Blkfront,
    pub info: DiskInfo,
}

impl Harness {
    pub fn new() -> Result<Self> {
        Ok(Self::with_options(blk_options())?.0)
    }

    /// As [`Harness::new`], the block device types with `options`, and the
    /// daemon's budget of bounce buffers they share (a restart goes back to
    /// [`blk_types`]).
    pub fn with_options(options: BlkOptions) -> Result<(Self, Arc<BufferBudget>)> {
        let SimDom0 { host, xenstored, toolstack } = SimDom0::start()?;
        let run = RunDir::new()?;
        let budget = BufferBudget::new(options.buffer_bytes);
        let backend = start_backend(&host, &xenstored, &run, blk_types_with(options, &budget))?;
        Ok((Harness { host, xenstored, toolstack, backend, run }, budget))
    }

    /// Restarts the backend as `xenbackd serve` does by default: the
    /// running one detaches (devices stay Connected), `gap` runs with no
    /// backend, then a new one starts on a new xenstore connection.
    pub fn restart(&mut self, gap: impl FnOnce() -> Result<()>) -> Result<()> {
        self.backend.detach();
        gap()?;
        self.backend = start_backend(&self.host, &self.xenstored, &self.run, blk_types())?;
        Ok(())
    }

    /// Creates guest `domid` (if new) and returns its own xenstore connection.
    pub fn guest_xs(&self, domid: u16) -> Result<Client> {
        if !self.host.domain_exists(domid) {
            self.host.create_domain(domid)?;
            self.xenstored.introduce_domain(domid.into());
        }
        Ok(Client::from_stream(self.xenstored.connect_as(domid.into())?)?)
    }

    /// The toolstack's side of a disk: `backend/<kind>/<domid>/<devid>` with
    /// `params`, `mode` and any `extra` nodes; frontend `device/vbd/<devid>`.
    pub fn spec(
        &self,
        kind: &str,
        domid: u16,
        devid: u32,
        params: &str,
        mode: &str,
        extra: &[(&str, &str)],
    ) -> DeviceSpec {
        let mut spec = DeviceSpec::new(kind, 0, domid, devid);
        spec.frontend_kind = "vbd".into();
        spec.backend_nodes.push(("params".into(), params.into()));
        spec.backend_nodes.push(("mode".into(), mode.into()));
        for (k, v) in extra {
            spec.backend_nodes.push((k.to_string(), v.to_string()));
        }
        spec.frontend_nodes.push(("virtual-device".into(), (51712 + devid * 16).to_string()));
        spec
    }

    /// Creates the directories of `spec` and returns the guest's device.
    pub fn create(&self, spec: DeviceSpec) -> Result<FrontendDevice> {
        let xs = self.guest_xs(spec.frontend)?;
        self.toolstack.create(&spec)?;
        Ok(FrontendDevice::new(&self.host, xs, spec))
    }

    /// A `qdisk` of `disk` for `domid`, connected with `opts`.
    pub fn attach(&self, domid: u16, devid: u32, disk: &TempDisk, mode: &str, opts: BlkfrontOptions) -> Result<Guest> {
        let spec = self.spec("qdisk", domid, devid, &format!("aio:{}", disk.path.display()), mode, &[]);
        self.connect(spec, opts)
    }

    /// Creates and connects `spec` with `opts`.
    pub fn connect(&self, spec: DeviceSpec, opts: BlkfrontOptions) -> Result<Guest> {
        let mut dev = self.create(spec)?;
        let (front, info) = Blkfront::connect(&self.host, &mut dev, opts, WAIT).context("blkfront connect")?;
        Ok(Guest { dev, front, info })
    }
}

/// Submits `op` with tag 7 and waits for its completion.
pub fn run(q: &mut FrontQueue, op: BlkOp<'_>) -> BlkCompletion {
    q.submit(7, op).unwrap();
    wait_one(q)
}

/// Waits for one completion.
pub fn wait_one(q: &mut FrontQueue) -> BlkCompletion {
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while std::time::Instant::now() < deadline {
        q.wait(Duration::from_millis(100), &mut out).unwrap();
        if let Some(c) = out.pop() {
            assert!(out.is_empty(), "more completions than requests");
            return c;
        }
    }
    panic!("no completion");
}

/// Whether qemu-img and qemu-io are here; prints why not. Under CI (`CI`
/// set) their absence is a failure: `scripts/setup` installs qemu-utils.
pub fn have_qemu() -> bool {
    let found = ["qemu-img", "qemu-io"].iter().all(|t| std::process::Command::new(t).arg("--version").output().is_ok());
    if !found {
        assert!(std::env::var_os("CI").is_none(), "qemu-utils missing under CI (scripts/setup installs it)");
        println!("skipped: qemu-utils (qemu-img, qemu-io) not installed");
    }
    found
}

/// Runs a qemu tool; its stdout, or a panic with its stderr.
pub fn qemu(args: &[&str]) -> String {
    let out = std::process::Command::new(args[0]).args(&args[1..]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{args:?}: {}{stdout}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// Deterministic bytes for `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
