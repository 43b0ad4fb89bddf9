//! A backend restart under load: the daemon detaches with requests in
//! flight and more arriving, a new one resumes the rings, and the guest's
//! every request completes exactly once with its data on disk.

mod blk_support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use blk_support::*;
use blkif::abi::*;
use xen_sim::blkfront::{BlkCompletion, BlkOp, BlkfrontOptions, FrontQueue};

const BLOCK: usize = 32 << 10;

/// Collects completions until `n` more came.
fn collect(q: &mut FrontQueue, n: usize, done: &mut Vec<BlkCompletion>) {
    let want = done.len() + n;
    let deadline = Instant::now() + WAIT;
    while done.len() < want {
        assert!(Instant::now() < deadline, "{} of {want} completions", done.len());
        q.wait(Duration::from_millis(100), done).unwrap();
    }
}

#[test]
fn restart_with_requests_in_flight_completes_each_exactly_once() {
    let mut h = Harness::new().unwrap();
    let disk = TempDisk::new("restart", 16 << 20);
    let opts = BlkfrontOptions { ring_page_order: 1, depth: 64, ..Default::default() };
    let mut g = h.attach(3, 0, &disk, "w", opts).unwrap();
    let blocks: Vec<Vec<u8>> = (0..64).map(|i| pattern(500 + i, BLOCK)).collect();
    let sector = |i: usize| (i * BLOCK / 512) as u64;

    let q = g.front.queue(0);
    for (i, b) in blocks.iter().enumerate().take(40) {
        q.submit(i as u64, BlkOp::Write { sector: sector(i), data: b }).unwrap();
    }
    let mut done = Vec::new();
    h.restart(|| {
        // While no backend runs: more requests (the ring holds 64), and
        // their notification lost.
        for (i, b) in blocks.iter().enumerate().skip(40) {
            q.submit(i as u64, BlkOp::Write { sector: sector(i), data: b })?;
        }
        Ok(())
    })
    .unwrap();
    collect(q, 64, &mut done);

    let mut seen = BTreeMap::new();
    for c in &done {
        assert_eq!((c.status, c.operation), (BLKIF_RSP_OKAY, BLKIF_OP_WRITE), "request {}", c.tag);
        *seen.entry(c.tag).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 64, "every request answered");
    assert!(seen.values().all(|&n| n == 1), "no request answered twice");
    let on_disk = std::fs::read(&disk.path).unwrap();
    for (i, b) in blocks.iter().enumerate() {
        assert!(on_disk[i * BLOCK..(i + 1) * BLOCK] == b[..], "block {i} on disk");
    }
    let c = run(q, BlkOp::Read { sector: sector(63), len: BLOCK });
    assert!(c.status == BLKIF_RSP_OKAY && c.data == blocks[63], "read after the restart");
    assert_eq!(h.backend.stats().resumes.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(g.dev.backend_state().unwrap(), Some(xen_bus::XenbusState::Connected));
}
