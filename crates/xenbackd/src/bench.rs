//! `xenbackd bench blk`: the block backend through the simulated blkfront,
//! xenbus and the framework, against the same workload done directly with
//! `pread`/`pwrite` on the same file in the same run. The ratio is the
//! figure: what the PV path (ring, event channels, grant copies, queue
//! workers) costs over the storage itself.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use blkback::{BlkOptions, EngineChoice};
use blkif::abi::BLKIF_RSP_OKAY;
use xen_sim::blkfront::{BlkOp, BlkfrontOptions, FrontQueue};

use crate::cli::{check_fits, seconds, usage_error, IoEngine};
use crate::demo::Machine;
use crate::scratch::{self, ScratchFile};

/// Largest file `--size` takes, in MiB (64 GiB).
const MAX_SIZE_MIB: u64 = 64 << 10;

/// The block backend through the simulated blkfront, against pread/pwrite
///
/// On a file in /dev/shm (else the temporary directory): 4 KiB random reads
/// at queue depth 32 per queue with 1 and 4 queues and at depth 1 (IOPS), and 1 MiB
/// sequential reads and writes at depth 8 (MB/s), each through the
/// simulated blkfront and the block backend, then directly with
/// pread/pwrite from as many threads as the backend has I/O threads (4 per
/// queue).
///
/// Beside each, counts that do not depend on machine noise: the backend
/// threads' (ring workers and I/O threads) system calls and voluntary and
/// involuntary context switches per request, from the kernel's
/// raw_syscalls:sys_enter tracepoint (perf_event_open: root and a mounted
/// tracefs) and /proc/self/task/*/status. "(sim copy)" is the part of the
/// system calls that the simulator's grant copy costs (one pread/pwrite per
/// 4 KiB segment; Xen's gntdev copies a batch in one ioctl).
///
/// The file is written in full: it must fit in the free space of its
/// directory.
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct BlkArgs {
    /// Time per workload, more than 0 and at most 86400
    #[arg(long, value_name = "S", default_value_t = 3.0, value_parser = seconds, allow_negative_numbers = true)]
    seconds: f64,
    /// File size, 8 to 65536
    #[arg(long, value_name = "MIB", default_value_t = 256, value_parser = clap::value_parser!(u64).range(8..=MAX_SIZE_MIB), allow_negative_numbers = true)]
    size: u64,
    /// The backend's I/O engine
    #[arg(long, value_name = "E", value_enum, default_value_t = IoEngine::Auto)]
    io_engine: IoEngine,
    /// The guest's disk: the raw file, or a fully allocated qcow2 image of
    /// the same data beside it (pread/pwrite stays on the raw file; the
    /// directory then needs twice the space)
    #[arg(long, value_name = "F", value_enum, default_value_t = DiskFormat::Raw)]
    format: DiskFormat,
    /// Offer persistent grants (1056 per queue, as serve
    /// --persistent-grants 1056); the frontend asks for them, as Linux's
    /// blkfront does. Without, every byte is grant-copied
    #[arg(long)]
    persistent_grants: bool,
    /// Only the workloads whose name contains this ("qd1", "1M")
    #[arg(long, value_name = "TEXT")]
    only: Option<String>,
}

/// `--format`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum DiskFormat {
    Raw,
    Qcow2,
}

/// A qcow2 image at `path` with every cluster allocated, holding what the
/// raw file `raw` holds.
fn allocated_qcow2(path: &std::path::Path, raw: &std::path::Path, size: u64) -> Result<()> {
    use blkback::{DiskImage, Qcow2Image};
    Qcow2Image::create(path, size)?;
    let image = Qcow2Image::open(path, false, true)?;
    let raw = std::fs::File::open(raw)?;
    let mut chunk = vec![0u8; 1 << 20];
    for i in 0..size >> 20 {
        raw.read_exact_at(&mut chunk, i << 20)?;
        image.write_at(&chunk, i << 20)?;
    }
    image.flush()?;
    Ok(())
}

/// The backend's threads on the data path (`xenbackd-w*` ring workers,
/// `blk-io-*` and `blk-discard` I/O threads).
fn is_backend_data_thread(name: &str) -> bool {
    name.starts_with("xenbackd-w") || name.starts_with("blk-io-") || name == "blk-discard"
}

const IO_THREADS: usize = 4;

struct Workload {
    name: &'static str,
    queues: u32,
    depth: usize,
    block: usize,
    random: bool,
    write: bool,
}

const WORKLOADS: [Workload; 5] = [
    Workload { name: "4k randread qd32 x1q", queues: 1, depth: 32, block: 4096, random: true, write: false },
    Workload { name: "4k randread qd1 x1q", queues: 1, depth: 1, block: 4096, random: true, write: false },
    Workload { name: "4k randread qd32 x4q", queues: 4, depth: 32, block: 4096, random: true, write: false },
    Workload { name: "1M seqread qd8", queues: 1, depth: 8, block: 1 << 20, random: false, write: false },
    Workload { name: "1M seqwrite qd8", queues: 1, depth: 8, block: 1 << 20, random: false, write: true },
];

/// Offsets of one stream: random blocks, or sequential with wrap-around.
struct Offsets {
    random: bool,
    block: u64,
    blocks: u64,
    next: u64,
    rng: u64,
}

impl Offsets {
    fn new(w: &Workload, size: u64, stream: u64, streams: u64) -> Offsets {
        let blocks = size / w.block as u64;
        Offsets {
            random: w.random,
            block: w.block as u64,
            blocks,
            next: blocks * stream / streams.max(1),
            rng: 0x9E37_79B9_7F4A_7C15 ^ (stream + 1).wrapping_mul(0x2545_F491_4F6C_DD1D),
        }
    }

    fn next(&mut self) -> u64 {
        let b = if self.random {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            self.rng % self.blocks
        } else {
            let b = self.next % self.blocks;
            self.next += 1;
            b
        };
        b * self.block
    }
}

/// Drives one queue at `depth` until `stop`; returns completed requests.
fn drive_queue(q: &mut FrontQueue, w: &Workload, mut offs: Offsets, stop: &AtomicBool) -> Result<u64> {
    let data = vec![0x5Au8; w.block];
    let mut done = 0u64;
    let mut out = Vec::new();
    let mut in_flight = 0usize;
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if stopping && in_flight == 0 {
            return Ok(done);
        }
        while !stopping && in_flight < w.depth && q.can_submit() {
            let sector = offs.next() / 512;
            let op = match w.write {
                true => BlkOp::Write { sector, data: &data },
                false => BlkOp::Read { sector, len: w.block },
            };
            q.submit(0, op)?;
            in_flight += 1;
        }
        out.clear();
        q.wait(Duration::from_millis(50), &mut out)?;
        for c in &out {
            if c.status != BLKIF_RSP_OKAY {
                bail!("request failed with status {}", c.status);
            }
        }
        in_flight -= out.len();
        done += out.len() as u64;
    }
}

/// Requests per second through the backend, and the backend threads'
/// counts per request.
struct Measured {
    rate: f64,
    syscalls: Option<f64>,
    /// Of those, the simulator's grant copies: one pread/pwrite per 4 KiB
    /// segment on a ring worker (Xen's gntdev does a batch in one ioctl).
    sim_copies: Option<f64>,
    voluntary: f64,
    involuntary: f64,
    why_not: Option<String>,
}

fn through_backend(
    m: &Machine,
    domid: u16,
    path: &std::path::Path,
    format: blkback::ImageFormat,
    w: &Workload,
    secs: f64,
    size: u64,
) -> Result<Measured> {
    let xs = m.guest(domid)?;
    let opts = BlkfrontOptions {
        queues: w.queues,
        ring_page_order: 1,
        max_request_bytes: w.block.max(4096),
        depth: w.depth,
        ..Default::default()
    };
    let mut a = m.attach_image(&xs, domid, 0, path, format, opts)?;
    let queues = a.front.take().expect("connected").into_queues();
    let stop = Arc::new(AtomicBool::new(false));
    let n = queues.len() as u64;
    // Connected: every backend thread of this disk exists now.
    let mut counters = xen_sim::measure::ThreadCounters::start(is_backend_data_thread)?;
    let copies = xen_sim::measure::syscall_filter(&[nix::libc::SYS_pread64, nix::libc::SYS_pwrite64]);
    let mut copy_counters =
        xen_sim::measure::ThreadCounters::start_filtered(|n| n.starts_with("xenbackd-w"), Some(&copies))?;
    let start = Instant::now();
    // Each thread hands its queue back: the rings stay until the device is
    // closed, as blkfront keeps them.
    let threads: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(i, mut q)| {
            let (stop, offs) = (stop.clone(), Offsets::new(w, size, i as u64, n));
            let w = Workload { name: w.name, ..*w };
            std::thread::spawn(move || {
                let done = drive_queue(&mut q, &w, offs, &stop);
                (q, done)
            })
        })
        .collect();
    scratch::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    let mut queues = Vec::new();
    let mut failed = None;
    for t in threads {
        let (q, done) = t.join().map_err(|_| anyhow::anyhow!("bench thread panicked"))?;
        queues.push(q);
        match done {
            Ok(n) => total += n,
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let counts = counters.read();
    let copy_counts = copy_counters.read();
    a.dev.close(Duration::from_secs(30))?;
    drop(queues);
    if let Some(e) = failed {
        return Err(e);
    }
    let per = |n: u64| n as f64 / total.max(1) as f64;
    Ok(Measured {
        rate: total as f64 / elapsed,
        syscalls: counts.syscalls.map(per),
        sim_copies: copy_counts.syscalls.map(per),
        voluntary: per(counts.voluntary),
        involuntary: per(counts.involuntary),
        why_not: counts.why_not,
    })
}

fn direct(path: &std::path::Path, w: &Workload, secs: f64, size: u64) -> Result<f64> {
    let file = Arc::new(std::fs::OpenOptions::new().read(true).write(true).open(path)?);
    let threads = IO_THREADS * w.queues as usize;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (file, stop, count) = (file.clone(), stop.clone(), count.clone());
            let mut offs = Offsets::new(w, size, i as u64, threads as u64);
            let (block, write) = (w.block, w.write);
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut buf = vec![0x5Au8; block];
                while !stop.load(Ordering::Relaxed) {
                    let off = offs.next();
                    match write {
                        true => file.write_all_at(&buf, off)?,
                        false => file.read_exact_at(&mut buf, off)?,
                    }
                    count.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect();
    scratch::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().map_err(|_| anyhow::anyhow!("bench thread panicked"))??;
    }
    Ok(count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}

/// Runs `bench blk`.
pub fn run(args: BlkArgs) -> Result<u8> {
    let secs = args.seconds;
    let engine: EngineChoice = args.io_engine.into();
    let dir = scratch::dir();
    check_fits("--size", args.size, &dir).unwrap_or_else(|e| usage_error(&["bench", "blk"], e));
    let chosen = |w: &&Workload| args.only.as_deref().map_or(true, |only| w.name.contains(only));
    if !WORKLOADS.iter().any(|w| chosen(&w)) {
        let names: Vec<_> = WORKLOADS.iter().map(|w| w.name).collect();
        usage_error(&["bench", "blk"], format!("--only: no workload is named like that ({})", names.join(", ")));
    }
    scratch::stop_on_signals()?;
    scratch::remove_stale();
    let size = args.size << 20;
    let file = ScratchFile::create("bench", "disk.img", 0)?;
    let path = file.path().to_path_buf();
    // Filled, so reads touch real pages on both paths.
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let chunk = vec![0xA5u8; 1 << 20];
        for i in 0..size >> 20 {
            if scratch::interrupted() {
                return Ok(130);
            }
            f.write_all_at(&chunk, i << 20)?;
        }
    }
    let qcow2 = match args.format {
        DiskFormat::Raw => None,
        DiskFormat::Qcow2 => Some(ScratchFile::create("bench", "disk.qcow2", 0)?),
    };
    let (image, format) = match &qcow2 {
        None => (path.clone(), blkback::ImageFormat::Raw),
        Some(q) => {
            allocated_qcow2(q.path(), &path, size).context("making the qcow2 image")?;
            (q.path().to_path_buf(), blkback::ImageFormat::Qcow2)
        }
    };
    // No image locks: each workload attaches the file again while the
    // backend may still be closing the previous workload's device (whose
    // lock then refused the next one), and nothing else opens it.
    let persistent_grants = if args.persistent_grants { blkback::DEFAULT_PERSISTENT_GRANTS } else { 0 };
    let m = Machine::start_with(BlkOptions {
        engine,
        locking: blkback::Locking::Off,
        persistent_grants,
        ..BlkOptions::default()
    })?;
    println!(
        "xenbackd bench blk: {} MiB {} image {}, {secs} s per workload, I/O engine {engine:?}, {}",
        size >> 20,
        format.name(),
        image.display(),
        if persistent_grants > 0 && format == blkback::ImageFormat::Raw { "persistent grants" } else { "grant copy" }
    );
    println!(
        "{:<22} {:>14} {:>14} {:>7} {:>9} {:>10} {:>9} {:>9}",
        "workload", "xenbackd", "pread/pwrite", "ratio", "sys/req", "(sim copy)", "vcs/req", "ics/req"
    );
    let mut why_not = None;
    for (i, w) in WORKLOADS.iter().enumerate().filter(|(_, w)| chosen(w)) {
        if scratch::interrupted() {
            return Ok(130);
        }
        let pv = through_backend(&m, i as u16 + 1, &image, format, w, secs, size)?;
        let raw = direct(&path, w, secs, size)?;
        let (pv_s, raw_s) = if w.block >= 1 << 20 {
            (format!("{:.0} MB/s", pv.rate * w.block as f64 / 1e6), format!("{:.0} MB/s", raw * w.block as f64 / 1e6))
        } else {
            (format!("{:.0} IOPS", pv.rate), format!("{raw:.0} IOPS"))
        };
        let show = |v: Option<f64>| v.map_or("n/a".to_string(), |s| format!("{s:.2}"));
        println!(
            "{:<22} {:>14} {:>14} {:>6.0}% {:>9} {:>10} {:>9.2} {:>9.2}",
            w.name,
            pv_s,
            raw_s,
            100.0 * pv.rate / raw,
            show(pv.syscalls),
            show(pv.sim_copies),
            pv.voluntary,
            pv.involuntary
        );
        why_not = why_not.or(pv.why_not);
    }
    if let Some(why) = why_not {
        println!("system calls not counted: {why}");
    }
    drop(m);
    drop(file);
    Ok(0)
}
