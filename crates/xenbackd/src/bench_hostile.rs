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
///   big-reads     reads 1 MiB blocks at queue depth 32 (honest, but big)
///
/// Per row: the neighbour's requests and latency (p50, p99, max), the
/// attacker's requests (kicks for storm), the ring workers' voluntary
/// context switches (wakeups) and CPU time (percent of a core, from
/// /proc/self/task/*/stat) and the most bytes of bounce buffers the
/// daemon held so far. With one worker (the default) attacker and
/// neighbour share it: the worst case.
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attack {
    None,
    Storm,
    BogusReads,
    BigReads,
}

const ATTACKS: [(Attack, &str); 4] = [
    (Attack::None, "none"),
    (Attack::Storm, "storm"),
    (Attack::BogusReads, "bogus-reads"),
    (Attack::BigReads, "big-reads"),
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

fn run_row(m: &Machine, attack: Attack, row: u16, disks: &[std::path::PathBuf; 2], secs: f64) -> Result<Row> {
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
            _ => BlkfrontOptions { ring_page_order: 4, max_request_bytes: 1 << 20, depth: 32, ..Default::default() },
        };
        let mut a = m.attach(&axs, ad, 0, &disks[1], opts)?;
        let grants = m.host().grant_table(ad);
        for q in a.front.take().expect("connected").into_queues() {
            let stop = stop.clone();
            threads.push(match attack {
                Attack::Storm => std::thread::spawn(move || storm(q, &stop)),
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
                    std::thread::spawn(move || bogus_reads(q, gref, &stop))
                }
                _ => std::thread::spawn(move || big_reads(q, &stop)),
            });
        }
        attacker = Some(a);
    }
    // Let the attack start before the neighbour is measured.
    std::thread::sleep(Duration::from_millis(100));
    let mut wakeups = xen_sim::measure::ThreadCounters::start(|n| n.starts_with("xenbackd-w"))?;
    let (ticks, started) = (worker_ticks(), Instant::now());
    let nstop = Arc::new(AtomicBool::new(false));
    let measured = {
        let nstop = nstop.clone();
        std::thread::spawn(move || neighbour(nq, &nstop))
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
    let options = BlkOptions {
        engine,
        queue_buffer_bytes: args.queue_buffers << 20,
        buffer_bytes: args.buffers << 20,
        ..BlkOptions::default()
    };
    let m = Machine::start_with_config(options, Config { workers: args.workers, ..Config::default() })?;
    println!(
        "xenbackd bench hostile: {} s per row, {} worker(s), I/O engine {engine:?}, buffers {} MiB per queue, {} MiB in all",
        args.seconds, args.workers, args.queue_buffers, args.buffers
    );
    println!(
        "{:<12} {:>9} {:>9} {:>9} {:>9} {:>10} {:>9} {:>8} {:>11}",
        "attack", "requests", "p50 ms", "p99 ms", "max ms", "attacker", "wakeups", "cpu %", "peak MiB"
    );
    for (row, (attack, name)) in ATTACKS.iter().enumerate() {
        if scratch::interrupted() {
            return Ok(130);
        }
        let mut r = run_row(&m, *attack, row as u16, &disks, args.seconds)?;
        r.latencies.sort_unstable();
        println!(
            "{:<12} {:>9} {:>9.3} {:>9.3} {:>9.3} {:>10} {:>9} {:>8.0} {:>11.1}",
            name,
            r.latencies.len(),
            percentile_ms(&r.latencies, 0.5),
            percentile_ms(&r.latencies, 0.99),
            percentile_ms(&r.latencies, 1.0),
            r.attacker,
            r.wakeups,
            r.worker_cpu,
            m.budget().peak() as f64 / f64::from(1 << 20)
        );
    }
    Ok(0)
}
