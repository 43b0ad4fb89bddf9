//! `xenbackd demo`: the block backend against simulated guests, on a
//! machine without Xen. A simulated host gets dom0 and a few guests; each
//! guest gets disks backed by temporary files, connected through the block
//! backend; every queue of every disk then runs a mixed read / write /
//! flush / discard workload whose data is checked against what was written.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use blkback::{BlkDeviceType, BlkOptions, Offer};
use blkif::abi::BLKIF_RSP_OKAY;
use xen_backend::{Backend, Config, Platform};
use xen_sim::blkfront::{BlkCompletion, BlkOp, Blkfront, BlkfrontOptions, DiskInfo, FrontQueue};
use xen_sim::dom0::SimDom0;
use xen_sim::frontend::{DeviceSpec, FrontendDevice, Toolstack};
use xen_sim::host::SimHost;
use xen_sim::xenstored::Xenstored;
use xs_wire::Client;

use crate::cli::{check_fits, seconds, usage_error};
use crate::scratch::{self, ScratchFile};

/// Largest disk `--size` takes, in MiB (64 GiB).
const MAX_SIZE_MIB: u64 = 64 << 10;

/// Run the block backend against simulated guests, no Xen needed
///
/// Runs the block backend against simulated guests on this machine (no Xen
/// needed): each guest's disks are temporary files; every queue runs a
/// mixed read/write/flush/discard workload and checks every byte it reads
/// back. Prints a progress line per second and a table per guest at the
/// end; exits 1 if any check failed.
///
/// The disks are files in /dev/shm (else the temporary directory): all of
/// them together (guests x disks x size) must fit in its free space.
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct DemoArgs {
    /// Guests, 1 to 64
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=64))]
    guests: u16,
    /// Disks per guest, 1 to 16
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    disks: u16,
    /// Queues (rings) per disk, 1 to 4 (what the backend offers)
    #[arg(
        long,
        value_name = "N",
        default_value_t = 2,
        value_parser = clap::value_parser!(u32).range(1..=i64::from(Offer::default().max_queues))
    )]
    queues: u32,
    /// Workload time, more than 0 and at most 86400
    #[arg(long, value_name = "SECONDS", default_value_t = 8.0, value_parser = seconds, allow_negative_numbers = true)]
    duration: f64,
    /// Size of each disk, 4 to 65536
    #[arg(
        long = "size",
        value_name = "MIB",
        default_value_t = 64,
        value_parser = clap::value_parser!(u64).range(4..=MAX_SIZE_MIB),
        allow_negative_numbers = true
    )]
    size_mib: u64,
}

/// Bytes per block of the workload (the unit of verification).
const BLOCK: usize = 4096;
/// Largest request of the workload, in blocks (64 KiB: indirect requests).
const MAX_BLOCKS: usize = 16;

struct Options {
    guests: u16,
    disks: u16,
    queues: u32,
    duration: Duration,
    size_mib: u64,
}

/// The checks clap cannot make alone: the disks must fit in `dir`.
fn options(a: DemoArgs, dir: &Path) -> Result<Options, String> {
    let total = u64::from(a.guests) * u64::from(a.disks) * a.size_mib;
    check_fits("--guests x --disks x --size", total, dir)?;
    Ok(Options {
        guests: a.guests,
        disks: a.disks,
        queues: a.queues,
        duration: Duration::from_secs_f64(a.duration),
        size_mib: a.size_mib,
    })
}

/// Counters of one guest, shared by its queue threads and the progress line.
#[derive(Default)]
struct GuestStats {
    ops: AtomicU64,
    bytes: AtomicU64,
    verified: AtomicU64,
    errors: AtomicU64,
    mismatches: AtomicU64,
    latencies_us: Mutex<Vec<u32>>,
}

/// The simulated machine: host, xenstored, the toolstack's connection and
/// the backend framework serving `qdisk` from dom0.
pub(crate) struct Machine {
    host: Arc<SimHost>,
    xenstored: Arc<Xenstored>,
    toolstack: Toolstack,
    backend: Backend,
    budget: Arc<blkback::BufferBudget>,
}

impl Machine {
    pub(crate) fn start() -> Result<Machine> {
        Self::start_with(BlkOptions::default())
    }

    /// [`Machine::start`] with the block backend's options.
    pub(crate) fn start_with(options: BlkOptions) -> Result<Machine> {
        Self::start_with_config(options, Config::default())
    }

    /// [`Machine::start_with`] and the framework's `config`.
    pub(crate) fn start_with_config(options: BlkOptions, config: Config) -> Result<Machine> {
        let dom0 = SimDom0::start()?;
        let platform = Platform::new(0, dom0.dom0_client()?, dom0.host.evtchn_opener(0), dom0.host.grant_mapper(0));
        let SimDom0 { host, xenstored, toolstack } = dom0;
        let budget = blkback::BufferBudget::new(options.buffer_bytes);
        let types = vec![BlkDeviceType::with_budget("qdisk", options, budget.clone()) as _];
        let backend = Backend::start(platform, types, config).context("starting the backend")?;
        Ok(Machine { host, xenstored, toolstack, backend, budget })
    }

    /// The simulated host (a hostile guest's own grants).
    pub(crate) fn host(&self) -> &Arc<SimHost> {
        &self.host
    }

    /// The daemon's budget of bounce buffers.
    pub(crate) fn budget(&self) -> &Arc<blkback::BufferBudget> {
        &self.budget
    }

    /// Creates guest `domid` with its own xenstore connection.
    pub(crate) fn guest(&self, domid: u16) -> Result<Client> {
        self.host.create_domain(domid)?;
        self.xenstored.introduce_domain(domid.into());
        Ok(Client::from_stream(self.xenstored.connect_as(domid.into())?)?)
    }

    /// Adds disk `index` of `domid` backed by the raw file `path` as xl
    /// does for `backendtype=qdisk`, and connects the guest's blkfront
    /// through xenbus.
    pub(crate) fn attach(
        &self,
        xs: &Client,
        domid: u16,
        index: u32,
        path: &Path,
        opts: BlkfrontOptions,
    ) -> Result<Attached> {
        self.attach_image(xs, domid, index, path, blkback::ImageFormat::Raw, opts)
    }

    /// As [`Machine::attach`], the image in `format` (`params` as xl writes
    /// it: `aio:` for raw, `qcow2:`).
    pub(crate) fn attach_image(
        &self,
        xs: &Client,
        domid: u16,
        index: u32,
        path: &Path,
        format: blkback::ImageFormat,
        opts: BlkfrontOptions,
    ) -> Result<Attached> {
        let devid = 51712 + index * 16; // xvda, xvdb, ...
        let mut spec = DeviceSpec::new("qdisk", 0, domid, devid);
        spec.frontend_kind = "vbd".into();
        let driver = match format {
            blkback::ImageFormat::Raw => "aio",
            blkback::ImageFormat::Qcow2 => "qcow2",
        };
        spec.backend_nodes.push(("params".into(), format!("{driver}:{}", path.display())));
        spec.backend_nodes.push(("mode".into(), "w".into()));
        spec.frontend_nodes.push(("virtual-device".into(), devid.to_string()));
        self.toolstack.create(&spec)?;
        let mut dev = FrontendDevice::new(&self.host, xs.clone(), spec);
        let (front, info) = Blkfront::connect(&self.host, &mut dev, opts, Duration::from_secs(30))?;
        Ok(Attached { dev, front: Some(front), info })
    }
}

/// One attached disk: the guest's xenbus device and its blkfront.
pub(crate) struct Attached {
    pub(crate) dev: FrontendDevice,
    pub(crate) front: Option<Blkfront>,
    pub(crate) info: DiskInfo,
}

/// Fills `out` (one block) with the pattern of `seed` at `block`.
fn fill_block(seed: u32, block: u64, out: &mut [u8]) {
    let mut x = (u64::from(seed) << 32) ^ block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x2545_F491_4F6C_DD1D;
    for chunk in out.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
}

/// What the disk holds in a block, as far as the workload knows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shadow {
    Zero,
    Pattern(u32),
    /// A failed write may or may not have landed.
    Unknown,
}

enum Kind {
    Read,
    Write(u32),
    Discard,
    Flush,
}

struct Pending {
    kind: Kind,
    start: usize,
    blocks: usize,
}

/// The workload of one queue over its own range of blocks.
struct QueueRun {
    queue: FrontQueue,
    first_block: u64,
    shadow: Vec<Shadow>,
    busy: Vec<bool>,
    pending: HashMap<u64, Pending>,
    next_tag: u64,
    next_seed: u32,
    rng: u64,
    stats: Arc<GuestStats>,
    latencies: Vec<u32>,
}

impl QueueRun {
    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn run(&mut self, stop: &AtomicBool) -> Result<()> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; MAX_BLOCKS * BLOCK];
        loop {
            let stopping = stop.load(Ordering::Relaxed);
            if stopping && self.pending.is_empty() {
                break;
            }
            while !stopping && self.queue.can_submit() {
                if !self.submit_one(&mut buf)? {
                    break;
                }
            }
            out.clear();
            self.queue.wait(Duration::from_millis(20), &mut out)?;
            for c in out.drain(..) {
                self.complete(c);
            }
        }
        self.stats.latencies_us.lock().expect("stats lock").extend_from_slice(&self.latencies);
        Ok(())
    }

    /// Submits one request on a range no other request in flight touches;
    /// false if the chosen range was busy.
    fn submit_one(&mut self, buf: &mut [u8]) -> Result<bool> {
        let roll = self.random() % 100;
        let blocks = 1 + (self.random() % MAX_BLOCKS as u64) as usize;
        let start = (self.random() % (self.shadow.len() - blocks) as u64) as usize;
        if roll >= 97 {
            let tag = self.tag();
            self.queue.submit(tag, BlkOp::Flush)?;
            self.pending.insert(tag, Pending { kind: Kind::Flush, start: 0, blocks: 0 });
            return Ok(true);
        }
        if self.busy[start..start + blocks].iter().any(|b| *b) {
            return Ok(false);
        }
        let sector = (self.first_block + start as u64) * (BLOCK as u64 / 512);
        let tag = self.tag();
        let kind = if roll < 50 {
            self.next_seed = self.next_seed.wrapping_add(1).max(1);
            let seed = self.next_seed;
            let data = &mut buf[..blocks * BLOCK];
            for (i, b) in data.chunks_exact_mut(BLOCK).enumerate() {
                fill_block(seed, self.first_block + (start + i) as u64, b);
            }
            self.queue.submit(tag, BlkOp::Write { sector, data })?;
            Kind::Write(seed)
        } else if roll < 94 {
            self.queue.submit(tag, BlkOp::Read { sector, len: blocks * BLOCK })?;
            Kind::Read
        } else {
            let nr_sectors = (blocks * BLOCK / 512) as u64;
            self.queue.submit(tag, BlkOp::Discard { sector, nr_sectors, secure: false })?;
            Kind::Discard
        };
        self.busy[start..start + blocks].fill(true);
        self.pending.insert(tag, Pending { kind, start, blocks });
        Ok(true)
    }

    fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    fn complete(&mut self, c: BlkCompletion) {
        let Some(p) = self.pending.remove(&c.tag) else {
            log::error!("completion for unknown tag {}", c.tag);
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            return;
        };
        self.latencies.push(c.latency.as_micros().min(u128::from(u32::MAX)) as u32);
        self.stats.ops.fetch_add(1, Ordering::Relaxed);
        let range = p.start..p.start + p.blocks;
        self.busy[range.clone()].fill(false);
        let ok = c.status == BLKIF_RSP_OKAY;
        if !ok {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        match p.kind {
            Kind::Flush => {}
            Kind::Write(seed) => {
                self.shadow[range].fill(if ok { Shadow::Pattern(seed) } else { Shadow::Unknown });
                if ok {
                    self.stats.bytes.fetch_add((p.blocks * BLOCK) as u64, Ordering::Relaxed);
                }
            }
            Kind::Discard => self.shadow[range].fill(if ok { Shadow::Zero } else { Shadow::Unknown }),
            Kind::Read if ok => {
                self.stats.bytes.fetch_add((p.blocks * BLOCK) as u64, Ordering::Relaxed);
                self.verify(p.start, &c.data);
            }
            Kind::Read => {}
        }
    }

    fn verify(&mut self, start: usize, data: &[u8]) {
        let mut expect = vec![0u8; BLOCK];
        for (i, got) in data.chunks_exact(BLOCK).enumerate() {
            let block = start + i;
            match self.shadow[block] {
                Shadow::Unknown => continue,
                Shadow::Zero => expect.fill(0),
                Shadow::Pattern(seed) => fill_block(seed, self.first_block + block as u64, &mut expect),
            }
            if got == &expect[..] {
                self.stats.verified.fetch_add(BLOCK as u64, Ordering::Relaxed);
            } else {
                self.stats.mismatches.fetch_add(1, Ordering::Relaxed);
                log::error!("queue {}: block {} differs from what was written", self.queue.index(), block);
            }
        }
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    f64::from(sorted[i])
}

/// Runs the demo; exit status 1 if any data check or request failed or a
/// device of the backend failed, 130 if interrupted.
pub fn run(args: DemoArgs) -> Result<u8> {
    let dir = scratch::dir();
    let o = options(args, &dir).unwrap_or_else(|e| usage_error(&["demo"], e));
    scratch::stop_on_signals()?;
    let stale = scratch::remove_stale();
    if stale > 0 {
        eprintln!("xenbackd demo: removed {stale} scratch file(s) of earlier runs that died from {}", dir.display());
    }
    let machine = Machine::start()?;
    let mut files = Vec::new();
    let mut runs: Vec<(u16, QueueRun)> = Vec::new();
    let mut attached = Vec::new();
    let stats: Vec<Arc<GuestStats>> = (0..o.guests).map(|_| Arc::default()).collect();
    let bytes = o.size_mib << 20;
    println!(
        "xenbackd demo: {} guests x {} disks x {} queues, {} MiB per disk in {}, {:.0} s",
        o.guests,
        o.disks,
        o.queues,
        o.size_mib,
        dir.display(),
        o.duration.as_secs_f64()
    );
    let mut progress = Progress::new();
    'attach: for g in 0..o.guests {
        let domid = g + 1;
        let xs = machine.guest(domid)?;
        for d in 0..o.disks {
            if scratch::interrupted() {
                break 'attach;
            }
            let file = ScratchFile::create("demo", &format!("d{domid}-{d}.img"), bytes)?;
            let opts = BlkfrontOptions {
                queues: o.queues,
                ring_page_order: 1,
                max_request_bytes: MAX_BLOCKS * BLOCK,
                depth: 32,
                ..Default::default()
            };
            let mut a = machine
                .attach(&xs, domid, u32::from(d), file.path(), opts)
                .with_context(|| format!("attaching disk {d} of dom{domid}"))?;
            files.push(file);
            let front = a.front.take().expect("just connected");
            progress.line(&format!(
                "  dom{domid}: xvd{} connected through xenbus: {} queue(s), ring order {}, {} sectors",
                (b'a' + d as u8) as char,
                front.num_queues(),
                front.options().ring_page_order,
                a.info.sectors
            ));
            let blocks = bytes as usize / BLOCK;
            let per_queue = blocks / o.queues as usize;
            for (i, queue) in front.into_queues().into_iter().enumerate() {
                let run = QueueRun {
                    queue,
                    first_block: (i * per_queue) as u64,
                    shadow: vec![Shadow::Zero; per_queue],
                    busy: vec![false; per_queue],
                    pending: HashMap::new(),
                    next_tag: 0,
                    next_seed: 0,
                    rng: 0x1234_5678_9ABC_DEF1 ^ (u64::from(domid) << 40) ^ ((d as u64) << 20) ^ i as u64,
                    stats: stats[g as usize].clone(),
                    latencies: Vec::new(),
                };
                runs.push((domid, run));
            }
            attached.push(a);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    // Each thread hands its queue back: the guest's rings must stay until
    // the backend let go of them (closing the device), as blkfront keeps
    // them.
    let threads: Vec<_> = runs
        .into_iter()
        .map(|(domid, mut r)| {
            let stop = stop.clone();
            let name = format!("guest-d{domid}-q{}", r.queue.index());
            std::thread::Builder::new().name(name).spawn(move || {
                let result = r.run(&stop);
                (r, result)
            })
        })
        .collect::<std::io::Result<_>>()?;
    let start = Instant::now();
    let total = |f: fn(&GuestStats) -> u64| stats.iter().map(|s| f(s)).sum::<u64>();
    let (mut last_ops, mut last_bytes) = (0, 0);
    let mut tick = 1;
    while start.elapsed() < o.duration && !scratch::interrupted() {
        let next = Duration::from_secs(tick).min(o.duration);
        if !scratch::sleep(next.saturating_sub(start.elapsed())) {
            break;
        }
        let (ops, b) = (total(|s| s.ops.load(Ordering::Relaxed)), total(|s| s.bytes.load(Ordering::Relaxed)));
        progress.update(&format!(
            "[{:>3}s] {:>8} IOPS {:>8.1} MB/s   verified {:>6} MiB   errors {}   mismatches {}",
            tick,
            ops - last_ops,
            (b - last_bytes) as f64 / 1e6,
            total(|s| s.verified.load(Ordering::Relaxed)) >> 20,
            total(|s| s.errors.load(Ordering::Relaxed)),
            total(|s| s.mismatches.load(Ordering::Relaxed)),
        ));
        (last_ops, last_bytes) = (ops, b);
        tick += 1;
    }
    progress.finish();
    stop.store(true, Ordering::Relaxed);
    let mut failed = false;
    let mut queues = Vec::new();
    for t in threads {
        match t.join() {
            Ok((r, Ok(()))) => queues.push(r),
            Ok((r, Err(e))) => {
                eprintln!("xenbackd demo: a guest queue failed: {e:#}");
                queues.push(r);
                failed = true;
            }
            Err(_) => {
                eprintln!("xenbackd demo: a guest queue panicked");
                failed = true;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    for a in &mut attached {
        if let Err(e) = a.dev.close(Duration::from_secs(30)) {
            eprintln!("xenbackd demo: closing {}: {e:#}", a.dev.spec().backend_path());
            failed = true;
        }
    }
    drop(queues);
    drop(attached);
    let mut machine = machine;
    let device_failures = machine.backend.stats().failures.load(Ordering::Relaxed);
    machine.backend.shutdown();
    println!();
    println!(
        "{:<8} {:>10} {:>9} {:>10} {:>10} {:>14} {:>7} {:>10}",
        "guest", "IOPS", "MB/s", "p50 (us)", "p99 (us)", "verified", "errors", "mismatches"
    );
    let mut verified = 0;
    for (g, s) in stats.iter().enumerate() {
        let mut lat = std::mem::take(&mut *s.latencies_us.lock().expect("stats lock"));
        lat.sort_unstable();
        let (errors, mismatches) = (s.errors.load(Ordering::Relaxed), s.mismatches.load(Ordering::Relaxed));
        failed |= errors > 0 || mismatches > 0;
        verified += s.verified.load(Ordering::Relaxed);
        println!(
            "{:<8} {:>10.0} {:>9.1} {:>10.0} {:>10.0} {:>10} MiB {:>7} {:>10}",
            format!("dom{}", g + 1),
            s.ops.load(Ordering::Relaxed) as f64 / secs,
            s.bytes.load(Ordering::Relaxed) as f64 / 1e6 / secs,
            percentile(&lat, 0.50),
            percentile(&lat, 0.99),
            s.verified.load(Ordering::Relaxed) >> 20,
            errors,
            mismatches,
        );
    }
    drop(files);
    if device_failures > 0 {
        println!("\nFAILED: the backend failed {device_failures} device(s) (see the log above)");
        return Ok(1);
    }
    if failed {
        println!("\nFAILED: some requests failed or data did not verify");
        return Ok(1);
    }
    if scratch::interrupted() {
        println!("\nINTERRUPTED: no error until then; every byte read back matched ({} MiB)", verified >> 20);
        return Ok(130);
    }
    if verified == 0 {
        println!("\nFAILED: nothing was read back to verify in {secs:.1} s");
        return Ok(1);
    }
    println!("\nOK: every byte read back matched what was written ({} MiB)", verified >> 20);
    Ok(0)
}

/// The progress line: rewritten in place on a terminal, a line per update
/// otherwise (a log or a pipe).
struct Progress {
    tty: bool,
    open: bool,
}

impl Progress {
    fn new() -> Progress {
        use std::io::IsTerminal;
        Progress { tty: std::io::stdout().is_terminal(), open: false }
    }

    /// A line that stays (above the progress line).
    fn line(&mut self, text: &str) {
        self.finish();
        println!("{text}");
    }

    fn update(&mut self, text: &str) {
        use std::io::Write;
        if self.tty {
            // Carriage return and erase to the end of the line.
            print!("\r{text}\x1b[K");
            let _ = std::io::stdout().flush();
            self.open = true;
        } else {
            println!("{text}");
        }
    }

    fn finish(&mut self) {
        if std::mem::take(&mut self.open) {
            println!();
        }
    }
}
