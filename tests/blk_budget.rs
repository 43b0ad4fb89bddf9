//! Issue 13: a hostile guest gets its share and nothing more. Each attack
//! runs beside a measured neighbour; the bounds are counts (bytes held,
//! buffers allocated, worker wakeups), never times.

mod blk_support;

use std::sync::Mutex;

use blk_support::*;
use blkback::BlkOptions;
use blkif::abi::*;
use xen_sim::blkfront::{BlkOp, BlkfrontOptions};
use zerocopy::IntoBytes;

/// The tests count the workers' context switches: one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// The neighbour's I/O: `n` 4 KiB reads at depth 1, each checked.
fn neighbour_reads(q: &mut xen_sim::blkfront::FrontQueue, n: u64) {
    for i in 0..n {
        let c = run(q, BlkOp::Read { sector: (i % 64) * 8, len: 4096 });
        assert_eq!(c.status, BLKIF_RSP_OKAY, "neighbour read {i}");
    }
}

/// The attack of issue 13: 4 queues of 16-page rings filled with 1 MiB
/// indirect READs whose 256 data grants are bogus, all the requests of a
/// queue sharing one indirect page. Bytes held by the daemon stay within
/// its budget, and its spare buffers go once the attacker is idle.
#[test]
fn bogus_1mib_indirect_reads_stay_within_the_daemon_budget() {
    let _one = serial();
    const BUDGET: usize = 8 << 20;
    let opts = BlkOptions { buffer_bytes: BUDGET, ..blk_options() };
    let (h, budget) = Harness::with_options(opts).unwrap();
    let disk = TempDisk::new("budget-attacker", 8 << 20);
    let other_disk = TempDisk::new("budget-neighbour", 1 << 20);
    let fopts = BlkfrontOptions { queues: 4, ring_page_order: 4, depth: 1, ..BlkfrontOptions::default() };
    let mut attacker = h.attach(1, 0, &disk, "w", fopts).unwrap();
    let mut neighbour = h.attach(2, 0, &other_disk, "w", BlkfrontOptions::default()).unwrap();
    let grants = h.host.grant_table(1);

    let mut sent = [0u64; 4];
    let mut pages = Vec::new();
    for (qi, n) in sent.iter_mut().enumerate() {
        let page = grants.alloc_pages(1).unwrap();
        let gref = grants.grant_pages(&page, 0, true).unwrap()[0];
        for s in 0..256u32 {
            let seg = BlkifRequestSegment { gref: (60_000 + s).into(), first_sect: 0, last_sect: 7, _pad: [0; 2] };
            page.mapping().write(s as usize * 8, seg.as_bytes()).unwrap();
        }
        pages.push(page);
        let q = attacker.front.queue(qi);
        loop {
            let id = (qi as u64) << 32 | *n;
            let mut r = BlkifRequestIndirect64 {
                operation: BLKIF_OP_INDIRECT,
                indirect_op: BLKIF_OP_READ,
                nr_segments: 256.into(),
                id: id.into(),
                sector_number: (*n % 7 * 2048).into(),
                ..Default::default()
            };
            r.indirect_grefs[0] = gref.0.into();
            let mut slot = vec![0u8; SLOT_SIZE_64];
            slot[..r.as_bytes().len()].copy_from_slice(r.as_bytes());
            if q.submit_raw(id, id, &slot).is_err() {
                break;
            }
            *n += 1;
        }
    }
    neighbour_reads(neighbour.front.queue(0), 50);
    for (qi, &n) in sent.iter().enumerate() {
        let q = attacker.front.queue(qi);
        let mut done = Vec::new();
        let deadline = std::time::Instant::now() + WAIT;
        while (done.len() as u64) < n {
            assert!(std::time::Instant::now() < deadline, "queue {qi}: {} of {n} answered", done.len());
            q.wait(std::time::Duration::from_millis(100), &mut done).unwrap();
        }
        assert!(done.iter().all(|c| c.status == BLKIF_RSP_ERROR), "a read to bogus grants succeeded");
    }
    neighbour_reads(neighbour.front.queue(0), 10);

    let total: u64 = sent.iter().sum();
    let (peak, allocations) = (budget.peak(), budget.allocations());
    eprintln!("{total} bogus 1 MiB reads: peak {} KiB held, {allocations} buffers allocated", peak >> 10);
    assert!(total >= 4 * 500, "{total} requests: the rings were not filled");
    assert!(peak <= BUDGET, "peak {peak} bytes beyond the budget of {BUDGET}");
    assert!(allocations < total / 4, "{allocations} buffers for {total} requests: not reused");
    // Idle now: the spare buffers go after a second.
    let deadline = std::time::Instant::now() + WAIT;
    while budget.held() > 0 {
        assert!(std::time::Instant::now() < deadline, "{} bytes still held while idle", budget.held());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A guest kicking its idle ring in a loop: the workers wake a bounded
/// number of times (the port is throttled), not once per kick, and the
/// neighbour is served throughout.
#[test]
fn kicking_an_idle_ring_in_a_loop_wakes_the_workers_a_bounded_number_of_times() {
    let _one = serial();
    let h = Harness::new().unwrap();
    let disk = TempDisk::new("storm-attacker", 1 << 20);
    let other_disk = TempDisk::new("storm-neighbour", 1 << 20);
    let attacker = h.attach(1, 0, &disk, "w", BlkfrontOptions::default()).unwrap();
    let mut neighbour = h.attach(2, 0, &other_disk, "w", BlkfrontOptions::default()).unwrap();
    let mut attacker = attacker.front.into_queues().remove(0);
    neighbour_reads(neighbour.front.queue(0), 5);
    let mut workers = xen_sim::measure::ThreadCounters::start(|n| n.starts_with("xenbackd-w")).unwrap();

    const KICKS: u64 = 100_000;
    const NEIGHBOUR_READS: u64 = 10;
    for i in 0..KICKS {
        attacker.kick().unwrap();
        if i % (KICKS / NEIGHBOUR_READS) == 0 {
            neighbour_reads(neighbour.front.queue(0), 1);
        }
    }
    let wakeups = workers.read().voluntary;
    eprintln!("{KICKS} kicks of an idle ring, {NEIGHBOUR_READS} neighbour reads: {wakeups} worker wakeups");
    // Each neighbour read costs its worker a few wakeups; the attacker's
    // throttled port 1 + 2 + ... per doubling delay.
    assert!(wakeups <= NEIGHBOUR_READS * 4 + 40, "{wakeups} worker wakeups for {KICKS} kicks");
    // The attacker, once it sends work, is served.
    assert_eq!(run(&mut attacker, BlkOp::Read { sector: 0, len: 4096 }).status, BLKIF_RSP_OKAY);
}
