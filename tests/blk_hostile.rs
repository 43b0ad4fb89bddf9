//! A guest sending malformed requests gets error responses and its disk
//! keeps working; a guest breaking its ring fails its own device only.

mod blk_support;

use std::sync::atomic::Ordering;

use blk_support::*;
use blkif::abi::*;
use xen_bus::XenbusState;
use xen_sim::blkfront::{BlkOp, BlkfrontOptions};

/// A request in the x86_64 layout, byte by byte as `blkif.h` lays it out.
fn request(op: u8, id: u64, sector: u64, segs: &[(u32, u8, u8)]) -> Vec<u8> {
    let mut r = vec![0u8; SLOT_SIZE_64];
    r[0] = op;
    r[1] = segs.len() as u8;
    r[8..16].copy_from_slice(&id.to_le_bytes());
    r[16..24].copy_from_slice(&sector.to_le_bytes());
    for (i, &(g, f, l)) in segs.iter().enumerate() {
        let o = 24 + i * 8;
        r[o..o + 4].copy_from_slice(&g.to_le_bytes());
        r[o + 4] = f;
        r[o + 5] = l;
    }
    r
}

#[test]
fn malformed_requests_get_the_right_error_and_the_disk_keeps_working() {
    let h = Harness::new().unwrap();
    let disk = TempDisk::new("hostile", 1 << 20);
    let other_disk = TempDisk::new("bystander", 1 << 20);
    let mut g = h.attach(1, 0, &disk, "w", BlkfrontOptions::default()).unwrap();
    let mut other = h.attach(2, 0, &other_disk, "w", BlkfrontOptions::default()).unwrap();
    let q = g.front.queue(0);
    let gref = q.buffer_gref(0, 0).0;

    let mut unknown = request(99, 0x10, 0, &[]);
    unknown[1] = 1;
    let mut too_many = request(BLKIF_OP_READ, 0x11, 0, &[(gref, 0, 7)]);
    too_many[1] = 12;
    let cases: Vec<(&str, Vec<u8>, u64, i16)> = vec![
        ("unknown operation", unknown, 0x10, BLKIF_RSP_EOPNOTSUPP),
        ("12 segments", too_many, 0x11, BLKIF_RSP_ERROR),
        ("last_sect past the page", request(BLKIF_OP_READ, 0x12, 0, &[(gref, 0, 8)]), 0x12, BLKIF_RSP_ERROR),
        ("first after last", request(BLKIF_OP_READ, 0x13, 0, &[(gref, 5, 2)]), 0x13, BLKIF_RSP_ERROR),
        ("beyond the disk end", request(BLKIF_OP_READ, 0x14, 2047, &[(gref, 0, 7)]), 0x14, BLKIF_RSP_ERROR),
        ("ungranted page", request(BLKIF_OP_WRITE, 0x15, 0, &[(30000, 0, 7)]), 0x15, BLKIF_RSP_ERROR),
        ("read without segments", request(BLKIF_OP_READ, 0x16, 0, &[]), 0x16, BLKIF_RSP_ERROR),
    ];
    for (what, slot, id, want) in &cases {
        q.submit_raw(*id, *id, slot).unwrap();
        let c = wait_one(q);
        assert_eq!((c.tag, c.status), (*id, *want), "{what}");
    }
    let mut bad_indirect = vec![0u8; SLOT_SIZE_64];
    bad_indirect[0] = BLKIF_OP_INDIRECT;
    bad_indirect[1] = BLKIF_OP_FLUSH_DISKCACHE;
    bad_indirect[2] = 4;
    bad_indirect[8] = 0x17;
    bad_indirect[28..32].copy_from_slice(&gref.to_le_bytes());
    q.submit_raw(0x17, 0x17, &bad_indirect).unwrap();
    assert_eq!(wait_one(q).status, BLKIF_RSP_ERROR, "indirect flush");

    let data = pattern(1, 4096);
    assert_eq!(run(q, BlkOp::Write { sector: 8, data: &data }).status, BLKIF_RSP_OKAY);
    let c = run(q, BlkOp::Read { sector: 8, len: 4096 });
    assert!(c.status == BLKIF_RSP_OKAY && c.data == data, "the disk still works after the bad requests");
    assert_eq!(g.dev.backend_state().unwrap(), Some(XenbusState::Connected));
    let oq = other.front.queue(0);
    assert_eq!(run(oq, BlkOp::Write { sector: 0, data: &data }).status, BLKIF_RSP_OKAY);
}

#[test]
fn a_guest_breaking_its_ring_fails_only_its_own_device() {
    let h = Harness::new().unwrap();
    let disk = TempDisk::new("breaker", 1 << 20);
    let other_disk = TempDisk::new("survivor", 1 << 20);
    let mut g = h.attach(1, 0, &disk, "w", BlkfrontOptions::default()).unwrap();
    let mut other = h.attach(2, 0, &other_disk, "w", BlkfrontOptions::default()).unwrap();
    let q = g.front.queue(0);
    // req_prod (offset 0 of the shared ring) far beyond what a ring can hold.
    q.ring_mapping().store_u32(0, 1000, Ordering::Release).unwrap();
    q.kick().unwrap();
    g.dev.wait_backend_state("Closed", WAIT, |s| s == Some(XenbusState::Closed)).unwrap();
    let error = g.dev.read_backend("error").unwrap().expect("error node written");
    assert!(!error.is_empty());
    let data = pattern(2, 4096);
    let oq = other.front.queue(0);
    assert_eq!(run(oq, BlkOp::Write { sector: 0, data: &data }).status, BLKIF_RSP_OKAY);
    let c = run(oq, BlkOp::Read { sector: 0, len: 4096 });
    assert!(c.data == data);
    assert_eq!(other.dev.backend_state().unwrap(), Some(XenbusState::Connected));
}

/// The flapping frontend of issue 18: 4 queues of 16-page rings, its state
/// cycled (Initialised, Closing, Closed, Initialising, ...) as fast as it
/// can write, then left on Initialised. The backend misses states as the
/// events coalesce; as Linux's blkback it must still connect, serve every
/// queue and, after a clean close, keep nothing mapped; a bystander's I/O
/// never fails meanwhile. Repeated `XENBACKD_FLAP_RUNS` times (default 20).
#[test]
fn a_frontend_flapping_its_state_then_stopping_on_initialised_is_connected() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use xen_sim::blkfront::Blkfront;

    let runs: u64 = std::env::var("XENBACKD_FLAP_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let h = Harness::new().unwrap();
    let disk = TempDisk::new("flapper", 4 << 20);
    let bystander_disk = TempDisk::new("flap-bystander", 1 << 20);
    let bystander = h.attach(1, 0, &bystander_disk, "w", BlkfrontOptions::default()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let bystander_io = {
        let stop = stop.clone();
        let mut q = bystander.front.into_queues().remove(0);
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let data = pattern(n, 4096);
                let sector = (n % 256) * 8;
                assert_eq!(run(&mut q, BlkOp::Write { sector, data: &data }).status, BLKIF_RSP_OKAY);
                let c = run(&mut q, BlkOp::Read { sector, len: 4096 });
                assert!(c.status == BLKIF_RSP_OKAY && c.data == data, "bystander read {n}");
                n += 1;
            }
            n
        })
    };
    let spec = h.spec("qdisk", 2, 0, &format!("aio:{}", disk.path.display()), "w", &[]);
    let mut dev = h.create(spec).unwrap();
    let options = BlkfrontOptions { queues: 4, ring_page_order: 4, ..BlkfrontOptions::default() };
    let cycle = [XenbusState::Initialised, XenbusState::Closing, XenbusState::Closed, XenbusState::Initialising];
    for run_no in 0..runs {
        dev.wait_backend_state("InitWait", WAIT, |s| s == Some(XenbusState::InitWait)).unwrap();
        let mut front = Blkfront::new(&h.host, 2, 0, options).unwrap();
        for (node, value) in front.nodes() {
            dev.write(&node, &value).unwrap();
        }
        for i in 0..(50 + run_no * 37 % 200) {
            dev.set_state(cycle[i as usize % cycle.len()]).unwrap();
        }
        dev.set_state(XenbusState::Initialised).unwrap();
        assert!(h.backend.sync(WAIT));
        assert_eq!(dev.backend_state().unwrap(), Some(XenbusState::Connected), "run {run_no}");
        assert_eq!(dev.read_backend("error").unwrap(), None, "run {run_no}");
        dev.set_state(XenbusState::Connected).unwrap();
        for q in 0..4 {
            let data = pattern(run_no * 4 + q as u64, 32 << 10);
            let sector = q as u64 * 2048;
            let fq = front.queue(q);
            assert_eq!(run(fq, BlkOp::Write { sector, data: &data }).status, BLKIF_RSP_OKAY, "run {run_no} queue {q}");
            let c = run(fq, BlkOp::Read { sector, len: data.len() });
            assert!(c.status == BLKIF_RSP_OKAY && c.data == data, "run {run_no} queue {q}: data");
        }
        dev.close(WAIT).unwrap();
        assert_eq!(h.host.grant_table(2).live_maps().unwrap(), 0, "run {run_no}: still mapped after close");
        drop(front);
        dev.set_state(XenbusState::Initialising).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let served = bystander_io.join().expect("bystander I/O failed");
    assert!(served > 0);
    assert_eq!(bystander.dev.backend_state().unwrap(), Some(XenbusState::Connected));
    assert_eq!(h.backend.stats().failures.load(Ordering::Relaxed), 0);
}
