//! `xenbackd bench hostile`: a neighbour's latency beside each attack of
//! issue 13, and without any, on the simulator.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use blkback::{BlkOptions, EngineChoice};
use blkif::abi::*;
use xen_backend::Config;
use xen_sim::blkfront::{BlkOp, BlkfrontOptions, FrontQueue};

use crate::cli::{seconds, IoEngine};
use crate::demo::Machine;
use crate::scratch::{self, ScratchFile};

/// A neighbour's latency beside a hostile guest, on the simulator
///
/// A neighbour guest reads 4 KiB blocks at random, one at a time (queue
/// depth 1), from its own disk, while another guest on the same backend
/// attacks it, one attack per row:
///
///   none          no attacker (the undisturbed latency)
///   storm         kicks its idle ring's event channel in a loop
///   bogus-reads   keeps 4 queues of 16-page rings full of 1 MiB indirect
///                 READs whose data grants are bogus (one shared indirect
///                 page per queue)
///   big-reads     reads 1 MiB blocks at queue depth 32 (honest, but big),
///                 without feature-persistent: every byte grant-copied
///   big-mapped    the same with persistent grants (its 8192 pages exceed
///                 the 1056 kept: most requests map their pages afresh)
///
/// Per row: the neighbour's requests and latency (p50, p99, max), the
/// attacker's requests (kicks for storm), the ring workers' voluntary
/// context switches (wakeups) and CPU time (percent of a core, from
/// /proc/self/task/*/stat) and the most bytes of bounce buffers the
/// daemon held so far. With one worker (the default) attacker and
/// neighbour share it: the worst case.
///
/// Each round runs every row, the rows' order rotated by the round; at the
/// end, per attack, the neighbour's p50 and p99 as median (min-max) over
/// the rounds, and p99 over the same round's undisturbed p99.
///
/// Unless --no-pin: the backend's threads run on the first CPU, the
/// simulated guests on the last one, the attacker's threads there at
/// SCHED_IDLE. So the attacker's own spinning (its vCPUs, which Xen would
/// run on their own pCPUs) takes no CPU from the backend or from the
/// neighbour's guest, and what is measured is what the backend gives each
/// guest. Needs 2 CPUs.
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct HostileArgs {
    /// Time per row, more than 0 and at most 86400
    #[arg(long, value_name = "S", default_value_t = 3.0, value_parser = seconds, allow_negative_numbers = true)]
    seconds: f64,
    /// Ring worker threads, 1 to 64
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = crate::cli::count(1..=64))]
    workers: usize,
    /// The backend's I/O engine
    #[arg(long, value_name = "E", value_enum, default_value_t = IoEngine::Auto)]
    io_engine: IoEngine,
    /// Bounce buffers per queue in MiB, 1 to 1024 (as serve --queue-buffers)
    #[arg(long, value_name = "MIB", default_value_t = blkback::DEFAULT_QUEUE_BUFFER_BYTES >> 20, value_parser = crate::cli::count(1..=1024))]
    queue_buffers: usize,
    /// Bounce buffers of the daemon in MiB, 1 to 65536 (as serve --buffers)
    #[arg(long, value_name = "MIB", default_value_t = blkback::DEFAULT_BUFFER_BYTES >> 20, value_parser = crate::cli::count(1..=65536))]
    buffers: usize,
    /// Rounds, 1 to 20
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = crate::cli::count(1..=20))]
    rounds: usize,
    /// Leave every thread where the kernel puts it
    #[arg(long)]
    no_pin: bool,
}

/// Where the threads run: the backend on one CPU, the simulated guests on
/// another (see `HostileArgs`).
#[derive(Clone, Copy, Debug)]
struct Placement {
    backend: usize,
    guests: usize,
}

impl Placement {
    /// The first and the last CPU this process may use, if two.
    fn choose() -> Result<Option<Placement>> {
        let status = std::fs::read_to_string("/proc/self/status")?;
        let list = status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap_or("").trim();
        let mut cpus = Vec::new();
        for part in list.split(',').filter(|p| !p.is_empty()) {
            let (a, b) = part.split_once('-').unwrap_or((part, part));
            cpus.extend(a.parse::<usize>()?..=b.parse::<usize>()?);
        }
        Ok(match (cpus.first(), cpus.last()) {
            (Some(&backend), Some(&guests)) if backend != guests => Some(Placement { backend, guests }),
            _ => None,
        })
    }

    /// Pins the backend's threads that exist now (ring workers, I/O threads).
    fn pin_backend(self) -> Result<()> {
        xen_sim::measure::pin_threads(|n| n.starts_with("xenbackd-w") || n.starts_with("blk-io"), self.backend)?;
        Ok(())
    }

    /// Called by a simulated guest's thread: onto the guests' CPU, and for
    /// an attacker at idle priority.
    fn enter_guest(self, attacker: bool) -> Result<()> {
        xen_sim::measure::pin_thread(0, self.guests)?;
        if attacker {
            xen_sim::measure::idle_priority()?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attack {
    None,
    Storm,
    BogusReads,
    BigReads,
    BigMapped,
}

const ATTACKS: [(Attack, &str); 5] = [
    (Attack::None, "none"),
    (Attack::Storm, "storm"),
    (Attack::BogusReads, "bogus-reads"),
    (Attack::BigReads, "big-reads"),
    (Attack::BigMapped, "big-mapped"),
];

/// Disk size of each guest (sparse files).
const DISK_BYTES: u64 = 64 << 20;

/// The neighbour: QD1 4 KiB random reads until `stop`; latencies in µs,
/// and the queue (its ring stays granted until the disk is closed).
fn neighbour(mut q: FrontQueue, stop: &AtomicBool) -> Result<(Vec<u32>, FrontQueue)> {
    let blocks = DISK_BYTES / 4096;
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut lat = Vec::new();
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let t = Instant::now();
        q.submit(0, BlkOp::Read { sector: (rng % blocks) * 8, len: 4096 })?;
        out.clear();
        while out.is_empty() {
            q.wait(Duration::from_millis(100), &mut out)?;
        }
        if out[0].status != BLKIF_RSP_OKAY {
            bail!("neighbour read failed with status {}", out[0].status);
        }
        lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
    }
    Ok((lat, q))
}

/// Kicks `q`'s idle ring until `stop`; returns the kicks.
fn storm(q: FrontQueue, stop: &AtomicBool) -> Result<u64> {
    let mut kicks = 0;
    while !stop.load(Ordering::Relaxed) {
        q.kick()?;
        kicks += 1;
    }
    Ok(kicks)
}

/// Keeps `q`'s ring full of 1 MiB indirect reads to bogus grants, through
/// `indirect` (a page of 256 bogus segments); returns the requests answered.
fn bogus_reads(mut q: FrontQueue, indirect: u32, stop: &AtomicBool) -> Result<u64> {
    let mut id = 0u64;
    let mut answered = 0u64;
    let mut out = Vec::new();
    let mut slot = vec![0u8; SLOT_SIZE_64];
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if stopping && q.in_flight() == 0 {
            return Ok(answered);
        }
        // blkif_request_indirect, x86_64 layout; the ring kept full.
        slot[0] = BLKIF_OP_INDIRECT;
        slot[1] = BLKIF_OP_READ;
        slot[2..4].copy_from_slice(&256u16.to_le_bytes());
        slot[28..32].copy_from_slice(&indirect.to_le_bytes());
        if !stopping {
            loop {
                slot[8..16].copy_from_slice(&id.to_le_bytes());
                slot[16..24].copy_from_slice(&(id % 60 * 2048).to_le_bytes());
                if q.submit_raw(id, id, &slot).is_err() {
                    break;
                }
                id += 1;
            }
        }
        out.clear();
        q.wait(Duration::from_millis(50), &mut out)?;
        answered += out.len() as u64;
    }
}

/// 1 MiB sequential reads at depth 32 until `stop`; returns the requests.
fn big_reads(mut q: FrontQueue, stop: &AtomicBool) -> Result<u64> {
    let (mut next, mut done, mut in_flight) = (0u64, 0u64, 0usize);
    let mut out = Vec::new();
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if stopping && in_flight == 0 {
            return Ok(done);
        }
        while !stopping && in_flight < 32 && q.can_submit() {
            q.submit(0, BlkOp::Read { sector: next % 60 * 2048, len: 1 << 20 })?;
            next += 1;
            in_flight += 1;
        }
        out.clear();
        q.wait(Duration::from_millis(50), &mut out)?;
        in_flight -= out.len();
        done += out.len() as u64;
    }
}

struct Row {
    latencies: Vec<u32>,
    attacker: u64,
    wakeups: u64,
    /// The ring workers' CPU time over the row's wall time, in percent of a core.
    worker_cpu: f64,
}

/// CPU time (user + system) of this process's ring workers, in clock ticks.
fn worker_ticks() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return 0 };
    let mut ticks = 0;
    for entry in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // pid (comm) state ... : fields after the last ')' from 3 on.
        let Some((head, rest)) = stat.rsplit_once(')') else { continue };
        if !head.contains("(xenbackd-w") {
            continue;
        }
        let f: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat, 12 and 13 here.
        ticks += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        ticks += f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    ticks
}

fn run_row(
    m: &Machine,
    attack: Attack,
    row: u16,
    disks: &[std::path::PathBuf; 2],
    secs: f64,
    place: Option<Placement>,
) -> Result<Row> {
    let enter = move |attacker: bool| place.map_or(Ok(()), |p| p.enter_guest(attacker));
    let (nd, ad) = (20 + 2 * row, 21 + 2 * row);
    let nxs = m.guest(nd)?;
    let mut n = m.attach(&nxs, nd, 0, &disks[0], BlkfrontOptions { depth: 1, ..Default::default() })?;
    let nq = n.front.take().expect("connected").into_queues().remove(0);
    let mut attacker = None;
    let mut pages = Vec::new();
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads: Vec<std::thread::JoinHandle<Result<u64>>> = Vec::new();
    if attack != Attack::None {
        let axs = m.guest(ad)?;
        let opts = match attack {
            Attack::Storm => BlkfrontOptions { depth: 1, ..Default::default() },
            Attack::BogusReads => BlkfrontOptions { queues: 4, ring_page_order: 4, depth: 1, ..Default::default() },
            _ => BlkfrontOptions {
                ring_page_order: 4,
                max_request_bytes: 1 << 20,
                depth: 32,
                persistent: attack == Attack::BigMapped,
                ..Default::default()
            },
        };
        let mut a = m.attach(&axs, ad, 0, &disks[1], opts)?;
        let grants = m.host().grant_table(ad);
        for q in a.front.take().expect("connected").into_queues() {
            let stop = stop.clone();
            threads.push(match attack {
                Attack::Storm => std::thread::spawn(move || {
                    enter(true)?;
                    storm(q, &stop)
                }),
                Attack::BogusReads => {
                    let page = grants.alloc_pages(1)?;
                    let gref = grants.grant_pages(&page, 0, true)?[0].0;
                    // 256 blkif_request_segments: bogus grefs, sectors 0-7.
                    for s in 0..256u32 {
                        let mut seg = [0u8, 0, 0, 0, 0, 7, 0, 0];
                        seg[..4].copy_from_slice(&(60_000 + s).to_le_bytes());
                        page.mapping().write(s as usize * 8, &seg)?;
                    }
                    pages.push(page);
                    std::thread::spawn(move || {
                        enter(true)?;
                        bogus_reads(q, gref, &stop)
                    })
                }
                _ => std::thread::spawn(move || {
                    enter(true)?;
                    big_reads(q, &stop)
                }),
            });
        }
        attacker = Some(a);
    }
    if let Some(p) = place {
        // The attacker's disk may have started I/O threads.
        p.pin_backend()?;
    }
    // Let the attack start before the neighbour is measured.
    std::thread::sleep(Duration::from_millis(100));
    let mut wakeups = xen_sim::measure::ThreadCounters::start(|n| n.starts_with("xenbackd-w"))?;
    let (ticks, started) = (worker_ticks(), Instant::now());
    let nstop = Arc::new(AtomicBool::new(false));
    let measured = {
        let nstop = nstop.clone();
        std::thread::spawn(move || {
            enter(false)?;
            neighbour(nq, &nstop)
        })
    };
    crate::scratch::sleep(Duration::from_secs_f64(secs));
    nstop.store(true, Ordering::Relaxed);
    let (latencies, _nq) = measured.join().map_err(|_| anyhow::anyhow!("neighbour panicked"))??;
    let wakeups = wakeups.read().voluntary;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100).max(1) as f64;
    let worker_cpu = 100.0 * (worker_ticks() - ticks) as f64 / hz / started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut done = 0;
    for t in threads {
        done += t.join().map_err(|_| anyhow::anyhow!("attacker panicked"))??;
    }
    if let Some(mut a) = attacker {
        a.dev.close(Duration::from_secs(30))?;
    }
    n.dev.close(Duration::from_secs(30))?;
    Ok(Row { latencies, attacker: done, wakeups, worker_cpu })
}

fn percentile_ms(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i]) / 1000.0
}

/// Runs `bench hostile`.
pub fn run(args: HostileArgs) -> Result<u8> {
    let engine: EngineChoice = args.io_engine.into();
    scratch::stop_on_signals()?;
    scratch::remove_stale();
    let files = [0, 1].map(|i| ScratchFile::create("hostile", &format!("{i}.img"), DISK_BYTES));
    let [a, b] = files;
    let files = [a?, b?];
    let disks = files.each_ref().map(|f| f.path().to_path_buf());
    // No image locks: each row attaches the files again while the backend
    // may still be closing the previous row's devices (whose locks would
    // refuse the next ones), and nothing else opens them.
    let options = BlkOptions {
        engine,
        locking: blkback::Locking::Off,
        queue_buffer_bytes: args.queue_buffers << 20,
        buffer_bytes: args.buffers << 20,
        // Offered so that big-mapped's attacker gets them; the neighbour
        // (a frontend like Linux's) uses them too, big-reads' asks for none.
        persistent_grants: blkback::DEFAULT_PERSISTENT_GRANTS,
        ..BlkOptions::default()
    };
    let m = Machine::start_with_config(options, Config { workers: args.workers, ..Config::default() })?;
    let place = if args.no_pin { None } else { Placement::choose()? };
    if let Some(p) = place {
        p.pin_backend()?;
    }
    println!(
        "xenbackd bench hostile: {} s per row, {} round(s), {} worker(s), I/O engine {engine:?}, buffers {} MiB per queue, {} MiB in all",
        args.seconds, args.rounds, args.workers, args.queue_buffers, args.buffers
    );
    match place {
        Some(p) => println!("backend on CPU {}, guests on CPU {} (attackers at SCHED_IDLE)", p.backend, p.guests),
        None if args.no_pin => println!("threads not pinned (--no-pin)"),
        None => println!("threads not pinned (one CPU)"),
    }
    println!(
        "{:<5} {:<12} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>8} {:>11}",
        "round", "attack", "requests", "p50 ms", "p99 ms", "max ms", "attacker", "wakeups", "cpu %", "peak MiB"
    );
    // (p50, p99) per round, per attack.
    let mut results = vec![vec![(0.0, 0.0); ATTACKS.len()]; args.rounds];
    for (round, per_attack) in results.iter_mut().enumerate() {
        for k in 0..ATTACKS.len() {
            let i = (k + round) % ATTACKS.len();
            let (attack, name) = ATTACKS[i];
            if scratch::interrupted() {
                return Ok(130);
            }
            let row = (round * ATTACKS.len() + k) as u16;
            let mut r = run_row(&m, attack, row, &disks, args.seconds, place)?;
            r.latencies.sort_unstable();
            let (p50, p99) = (percentile_ms(&r.latencies, 0.5), percentile_ms(&r.latencies, 0.99));
            per_attack[i] = (p50, p99);
            println!(
                "{:<5} {:<12} {:>9} {:>9.3} {:>9.3} {:>9.3} {:>10} {:>9} {:>8.0} {:>11.1}",
                round + 1,
                name,
                r.latencies.len(),
                p50,
                p99,
                percentile_ms(&r.latencies, 1.0),
                r.attacker,
                r.wakeups,
                r.worker_cpu,
                m.budget().peak() as f64 / f64::from(1 << 20)
            );
        }
    }
    println!();
    println!("per attack over {} round(s): median (min-max); ratios against the same round's \"none\"", args.rounds);
    println!("{:<12} {:>22} {:>22} {:>22}", "attack", "p50 ms", "p99 ms", "p99 / none's p99");
    for (i, (_, name)) in ATTACKS.iter().enumerate() {
        let p50: Vec<f64> = results.iter().map(|r| r[i].0).collect();
        let p99: Vec<f64> = results.iter().map(|r| r[i].1).collect();
        let ratio: Vec<f64> = results.iter().map(|r| r[i].1 / r[0].1.max(1e-3)).collect();
        println!("{:<12} {:>22} {:>22} {:>22}", name, spread(&p50, 3), spread(&p99, 3), spread(&ratio, 2));
    }
    Ok(0)
}

/// `median (min-max)` of `v`, with `digits` decimals.
fn spread(v: &[f64], digits: usize) -> String {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let median = if v.len() % 2 == 1 { v[v.len() / 2] } else { (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0 };
    format!("{median:.digits$} ({:.digits$}-{:.digits$})", v[0], v[v.len() - 1])
}
