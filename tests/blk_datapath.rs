//! Block data path through the framework on the simulator: a blkfront
//! connected by xenbus to the `qdisk` backend, requests through the real
//! rings, grant copies and disk file, in the three ABIs, with indirect
//! requests, multi-page rings, several queues, flush and discard.

mod blk_support;

use blk_support::*;
use blkif::abi::*;
use xen_bus::Protocol;
use xen_sim::blkfront::{BlkOp, BlkfrontOptions};

fn write_read_verify(abi: Protocol, domid: u16) {
    let h = Harness::new().unwrap();
    let disk = TempDisk::new(&format!("abi-{abi:?}"), 4 << 20);
    let mut g = h.attach(domid, 0, &disk, "w", BlkfrontOptions { abi, ..Default::default() }).unwrap();
    assert_eq!(h.toolstack.read_backend(g.dev.spec(), "sectors").unwrap().as_deref(), Some("8192"));
    let q = g.front.queue(0);
    let data = pattern(3, 8192);
    let c = run(q, BlkOp::Write { sector: 100, data: &data });
    assert_eq!((c.status, c.operation), (BLKIF_RSP_OKAY, BLKIF_OP_WRITE));
    let c = run(q, BlkOp::Read { sector: 100, len: 8192 });
    assert_eq!((c.status, c.operation), (BLKIF_RSP_OKAY, BLKIF_OP_READ));
    assert!(c.data == data, "read back differs");
    let on_disk = std::fs::read(&disk.path).unwrap();
    assert!(on_disk[100 * 512..100 * 512 + 8192] == data[..], "data not at sector 100 on disk");
}

#[test]
fn native_abi_writes_and_reads_back() {
    write_read_verify(Protocol::Native, 1);
}

#[test]
fn x86_32_abi_writes_and_reads_back() {
    write_read_verify(Protocol::X86_32, 2);
}

#[test]
fn x86_64_abi_writes_and_reads_back() {
    write_read_verify(Protocol::X86_64, 3);
}

#[test]
fn backend_advertises_what_linux_blkfront_reads() {
    let h = Harness::new().unwrap();
    let disk = TempDisk::new("nodes", 1 << 20);
    let g = h.attach(1, 0, &disk, "w", BlkfrontOptions::default()).unwrap();
    let read = |n: &str| h.toolstack.read_backend(g.dev.spec(), n).unwrap();
    assert_eq!(read("sectors").as_deref(), Some("2048"));
    assert_eq!(read("sector-size").as_deref(), Some("512"));
    assert_eq!(read("info").as_deref(), Some("0"));
    assert_eq!(read("feature-flush-cache").as_deref(), Some("1"));
    assert_eq!(read("feature-barrier").as_deref(), Some("1"));
    assert_eq!(read("feature-discard").as_deref(), Some("1"));
    assert!(read("discard-granularity").is_some() && read("discard-alignment").is_some());
    assert_eq!(read("feature-max-indirect-segments").as_deref(), Some("256"));
    assert_eq!(read("max-ring-page-order").as_deref(), Some("4"));
    assert_eq!(read("multi-queue-max-queues").as_deref(), Some("4"));
    assert!(read("physical-sector-size").is_some());
    assert_eq!(g.info.sectors, 2048);
    assert!(g.info.flush && g.info.discard && g.info.barrier);
}

#[test]
fn indirect_request_of_a_megabyte_round_trips() {
    let h = Harness::new().unwrap();
    let disk = TempDisk::new("indirect", 8 << 20);
    let opts = BlkfrontOptions { max_request_bytes: 1 << 20, depth: 4, ..Default::default() };
    let mut g = h.attach(2, 0, &disk, "w", opts).unwrap();
    let q = g.front.queue(0);
    assert!(q.uses_indirect());
    let data = pattern(9, 1 << 20);
    let c = run(q, BlkOp::Write { sector: 2048, data: &data });
    // Linux answers (and its blkfront expects) the inner operation, not INDIRECT.
    assert_eq!((c.status, c.operation), (BLKIF_RSP_OKAY, BLKIF_OP_WRITE));
    let c = run(q, BlkOp::Read { sector: 2048, len: 1 << 20 });
    assert_eq!(c.status, BLKIF_RSP_OKAY);
    assert!(c.data == data, "indirect read back differs");
}

#[test]
fn multi_page_ring_holds_a_full_ring_of_requests_in_flight() {
    let h = Harness::new().unwrap();
    let disk = TempDisk::new("multipage", 8 << 20);
    let opts = BlkfrontOptions { ring_page_order: 2, depth: 128, ..Default::default() };
    let mut g = h.attach(1, 0, &disk, "w", opts).unwrap();
    assert_eq!(g.dev.read("ring-page-order").unwrap().as_deref(), Some("2"));
    assert!(g.dev.read("ring-ref3").unwrap().is_some());
    let q = g.front.queue(0);
    let blocks: Vec<Vec<u8>> = (0..128).map(|i| pattern(100 + i, 4096)).collect();
    for (i, b) in blocks.iter().enumerate() {
        q.submit(i as u64, BlkOp::Write { sector: i as u64 * 8, data: b }).unwrap();
    }
    assert!(!q.can_submit(), "128 requests fill a 4-page ring");
    let mut done = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while done.len() < 128 && std::time::Instant::now() < deadline {
        q.wait(std::time::Duration::from_millis(100), &mut done).unwrap();
    }
    assert_eq!(done.len(), 128);
    assert!(done.iter().all(|c| c.status == BLKIF_RSP_OKAY));
    let on_disk = std::fs::read(&disk.path).unwrap();
    for (i, b) in blocks.iter().enumerate() {
        assert!(on_disk[i * 4096..(i + 1) * 4096] == b[..], "block {i}");
    }
}

#[test]
fn each_queue_has_its_own_ring_and_sees_the_others_writes() {
    let h = Harness::new().unwrap();
    let disk = TempDisk::new("multiqueue", 8 << 20);
    let opts = BlkfrontOptions { queues: 4, ..Default::default() };
    let g = h.attach(1, 0, &disk, "w", opts).unwrap();
    assert_eq!(g.dev.read("multi-queue-num-queues").unwrap().as_deref(), Some("4"));
    assert!(g.dev.read("queue-3/event-channel").unwrap().is_some());
    let mut queues = g.front.into_queues();
    assert_eq!(queues.len(), 4);
    let threads: Vec<_> = queues
        .drain(..)
        .map(|mut q| {
            std::thread::spawn(move || {
                let i = q.index() as u64;
                let data = pattern(i + 50, 4096);
                let c = run(&mut q, BlkOp::Write { sector: i * 8, data: &data });
                assert_eq!(c.status, BLKIF_RSP_OKAY);
                q
            })
        })
        .collect();
    let mut queues: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    // Queue 0 reads back what the other three wrote through their own rings.
    let q0 = &mut queues[0];
    let c = run(q0, BlkOp::Read { sector: 0, len: 4 * 4096 });
    assert_eq!(c.status, BLKIF_RSP_OKAY);
    for i in 0..4u64 {
        assert!(c.data[i as usize * 4096..(i as usize + 1) * 4096] == pattern(i + 50, 4096)[..], "queue {i}'s block");
    }
}

#[test]
fn flush_succeeds_and_discarded_range_reads_zeros() {
    let h = Harness::new().unwrap();
    let disk = TempDisk::new("discard", 4 << 20);
    let mut g = h.attach(1, 0, &disk, "w", BlkfrontOptions::default()).unwrap();
    let q = g.front.queue(0);
    let data = pattern(5, 3 * 4096);
    assert_eq!(run(q, BlkOp::Write { sector: 64, data: &data }).status, BLKIF_RSP_OKAY);
    let c = run(q, BlkOp::Flush);
    assert_eq!((c.status, c.operation), (BLKIF_RSP_OKAY, BLKIF_OP_FLUSH_DISKCACHE));
    let c = run(q, BlkOp::Discard { sector: 72, nr_sectors: 8, secure: false });
    assert_eq!((c.status, c.operation), (BLKIF_RSP_OKAY, BLKIF_OP_DISCARD));
    let c = run(q, BlkOp::Read { sector: 64, len: 3 * 4096 });
    assert!(c.data[..4096] == data[..4096], "before the hole");
    assert!(c.data[4096..8192].iter().all(|b| *b == 0), "the discarded block reads zeros");
    assert!(c.data[8192..] == data[8192..], "after the hole");
    let c = run(q, BlkOp::Barrier { sector: 0, data: &data[..4096] });
    assert_eq!((c.status, c.operation), (BLKIF_RSP_OKAY, BLKIF_OP_WRITE_BARRIER));
}

#[test]
fn writes_around_a_barrier_in_one_batch_all_complete_in_order_on_disk() {
    let h = Harness::new().unwrap();
    let disk = TempDisk::new("barrier-batch", 4 << 20);
    let mut g = h.attach(1, 0, &disk, "w", BlkfrontOptions::default()).unwrap();
    let q = g.front.queue(0);
    let (a, b, c) = (pattern(11, 4096), pattern(12, 4096), pattern(13, 4096));
    // One notification for all three: the write after the barrier is
    // released by the barrier's completion, with no further event.
    q.submit(1, BlkOp::Write { sector: 0, data: &a }).unwrap();
    q.submit(2, BlkOp::Barrier { sector: 0, data: &b }).unwrap();
    q.submit(3, BlkOp::Write { sector: 8, data: &c }).unwrap();
    let mut done = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while done.len() < 3 {
        assert!(std::time::Instant::now() < deadline, "{} of 3 completed", done.len());
        q.wait(std::time::Duration::from_millis(100), &mut done).unwrap();
    }
    assert!(done.iter().all(|c| c.status == BLKIF_RSP_OKAY));
    let on_disk = std::fs::read(&disk.path).unwrap();
    assert!(on_disk[..4096] == b[..], "the barrier's data, written after the first write");
    assert!(on_disk[4096..8192] == c[..], "the write after the barrier");
}
