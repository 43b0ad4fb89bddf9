//! Persistent grants (`feature-persistent`, issue 14): with a frontend that
//! asks for them, as Linux's blkfront does by default, the guest's data
//! pages are mapped once and kept, and reads and writes go between them and
//! the disk with no grant copy; without, or beyond the cache, the data is
//! copied as before. The counts here (grant copies, live mappings) come
//! from the simulated grant table, so they do not depend on timing.

mod blk_support;

use blk_support::*;
use blkback::BlkOptions;
use blkif::abi::*;
use xen_sim::blkfront::{BlkOp, BlkfrontOptions};
use zerocopy::IntoBytes;

/// Writes and reads back `rounds` requests of 4 KiB to 44 KiB (direct
/// segments, no indirect page) all over the first 4 MiB, each verified
/// against the disk file.
fn io(g: &mut Guest, disk: &TempDisk, rounds: u64) {
    let q = g.front.queue(0);
    for i in 0..rounds {
        let len = 4096 * (1 + (i as usize * 7) % 11);
        let sector = (i * 97) % 8000;
        let data = pattern(i, len);
        assert_eq!(run(q, BlkOp::Write { sector, data: &data }).status, BLKIF_RSP_OKAY, "write {i}");
        let c = run(q, BlkOp::Read { sector, len });
        assert_eq!(c.status, BLKIF_RSP_OKAY, "read {i}");
        assert!(c.data == data, "read {i} differs");
        let on_disk = std::fs::read(&disk.path).unwrap();
        let at = sector as usize * 512;
        assert!(on_disk[at..at + len] == data[..], "write {i} not on disk");
    }
}

/// The ring pages of a one-queue, one-page-ring frontend.
const RING_MAPS: usize = 1;

/// A host whose backend offers persistent grants, as `serve
/// --persistent-grants 1056` (the default offers none).
fn persistent() -> Harness {
    let opts = BlkOptions { persistent_grants: blkback::DEFAULT_PERSISTENT_GRANTS, ..blk_options() };
    Harness::with_options(opts).unwrap().0
}

#[test]
fn with_persistent_grants_data_moves_with_no_grant_copy_and_each_page_is_mapped_once() {
    let h = persistent();
    let disk = TempDisk::new("persistent", 4 << 20);
    let mut g = h.attach(1, 0, &disk, "w", BlkfrontOptions::default()).unwrap();
    assert_eq!(h.toolstack.read_backend(g.dev.spec(), "feature-persistent").unwrap().as_deref(), Some("1"));
    let grants = h.host.grant_table(1);
    let copies_before = grants.copy_segments().unwrap();
    io(&mut g, &disk, 200);
    let copies = grants.copy_segments().unwrap() - copies_before;
    let maps = grants.live_maps().unwrap();
    eprintln!("400 requests: {copies} grant copy segments, {maps} live mappings");
    assert_eq!(copies, 0, "data was grant-copied");
    // The frontend's pool is 32 buffers of 11 pages; each page it used is
    // mapped once (the requests here use the first buffer, depth 1).
    assert!(maps > RING_MAPS && maps <= RING_MAPS + 11, "{maps} live mappings");

    // Closing unmaps them all: the frontend can revoke every grant.
    g.dev.close(WAIT).unwrap();
    assert_eq!(grants.live_maps().unwrap(), 0, "mappings left after the device closed");
    drop(g.front);
}

#[test]
fn a_frontend_without_feature_persistent_is_served_by_grant_copy() {
    let h = persistent();
    let disk = TempDisk::new("copied", 4 << 20);
    let opts = BlkfrontOptions { persistent: false, ..Default::default() };
    let mut g = h.attach(1, 0, &disk, "w", opts).unwrap();
    let grants = h.host.grant_table(1);
    let before = grants.copy_segments().unwrap();
    io(&mut g, &disk, 50);
    assert!(grants.copy_segments().unwrap() - before >= 100, "no grant copies");
    assert_eq!(grants.live_maps().unwrap(), RING_MAPS, "data pages mapped without feature-persistent");
}

/// The default.
#[test]
fn persistent_grants_switched_off_are_not_offered() {
    let h = Harness::new().unwrap();
    let disk = TempDisk::new("off", 4 << 20);
    let mut g = h.attach(1, 0, &disk, "w", BlkfrontOptions::default()).unwrap();
    assert_eq!(h.toolstack.read_backend(g.dev.spec(), "feature-persistent").unwrap().as_deref(), Some("0"));
    io(&mut g, &disk, 20);
    assert_eq!(h.host.grant_table(1).live_maps().unwrap(), RING_MAPS);
}

/// Beyond its capacity a queue maps a grant for one request and drops it:
/// what it keeps is bounded, whatever pages the guest cycles through.
#[test]
fn grants_beyond_the_cache_are_mapped_for_one_request_only() {
    let opts = BlkOptions { persistent_grants: 4, ..blk_options() };
    let (h, _) = Harness::with_options(opts).unwrap();
    let disk = TempDisk::new("capacity", 4 << 20);
    let fopts = BlkfrontOptions { depth: 8, ..Default::default() };
    let mut g = h.attach(1, 0, &disk, "w", fopts).unwrap();
    let grants = h.host.grant_table(1);
    let q = g.front.queue(0);
    // Eight 44 KiB writes in flight use 88 pages of the pool.
    let data: Vec<Vec<u8>> = (0..8).map(|i| pattern(100 + i, 44 << 10)).collect();
    for (i, d) in data.iter().enumerate() {
        q.submit(i as u64, BlkOp::Write { sector: i as u64 * 88, data: d }).unwrap();
    }
    let mut done = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while done.len() < 8 {
        assert!(std::time::Instant::now() < deadline, "{} of 8 writes answered", done.len());
        q.wait(std::time::Duration::from_millis(100), &mut done).unwrap();
    }
    assert!(done.iter().all(|c| c.status == BLKIF_RSP_OKAY), "a write failed");
    for (i, d) in data.iter().enumerate() {
        let c = run(q, BlkOp::Read { sector: i as u64 * 88, len: d.len() });
        assert!(c.status == BLKIF_RSP_OKAY && c.data == *d, "read {i}");
    }
    let maps = grants.live_maps().unwrap();
    assert!(maps <= RING_MAPS + 4, "{maps} live mappings with a cache of 4");
}

/// A grant the guest gave read-only cannot be mapped for a persistent
/// write (blkfront grants its persistent pages read-write): the write is
/// copied instead and succeeds, as it does without persistent grants; a
/// read into such a page fails as a grant copy fails. A grant it never
/// gave fails the request, before any I/O, with nothing mapped.
#[test]
fn a_grant_that_cannot_be_mapped_is_copied_or_refused_as_a_copy_would_be() {
    let h = persistent();
    let disk = TempDisk::new("read-only-grant", 1 << 20);
    let mut g = h.attach(1, 0, &disk, "w", BlkfrontOptions::default()).unwrap();
    let grants = h.host.grant_table(1);
    let page = grants.alloc_pages(1).unwrap();
    let data = pattern(5, 4096);
    page.mapping().write(0, &data).unwrap();
    let ro = grants.grant_pages(&page, 0, true).unwrap()[0];
    let q = g.front.queue(0);
    let request = |op: u8, id: u64, gref: u32| {
        let mut r = BlkifRequest64 {
            operation: op,
            nr_segments: 1,
            id: id.into(),
            sector_number: 64.into(),
            ..Default::default()
        };
        r.seg[0] = BlkifRequestSegment { gref: gref.into(), first_sect: 0, last_sect: 7, _pad: [0; 2] };
        let mut slot = vec![0u8; SLOT_SIZE_64];
        slot[..r.as_bytes().len()].copy_from_slice(r.as_bytes());
        slot
    };
    q.submit_raw(1, 1, &request(BLKIF_OP_WRITE, 1, ro.0)).unwrap();
    assert_eq!(wait_one(q).status, BLKIF_RSP_OKAY, "write from a read-only grant");
    assert!(std::fs::read(&disk.path).unwrap()[64 * 512..64 * 512 + 4096] == data[..]);
    q.submit_raw(2, 2, &request(BLKIF_OP_READ, 2, ro.0)).unwrap();
    assert_eq!(wait_one(q).status, BLKIF_RSP_ERROR, "read into a read-only grant");
    q.submit_raw(3, 3, &request(BLKIF_OP_READ, 3, 50_000)).unwrap();
    assert_eq!(wait_one(q).status, BLKIF_RSP_ERROR, "read into a grant never given");
    assert_eq!(grants.map_count(ro).unwrap(), Some(0), "the read-only grant stayed mapped");
    // The queue goes on serving the guest's own buffers, persistently.
    io(&mut g, &disk, 5);
}
