//! What the toolstack writes decides the disk: read-only mode, `params`
//! forms, the `vbd` and `qdisk` types, and fatal errors (a format we do not read, a
//! missing file) that close one device and leave the others running.

mod blk_support;

use blk_support::*;
use blkif::abi::*;
use xen_bus::XenbusState;
use xen_sim::blkfront::{BlkOp, BlkfrontOptions};

#[test]
fn read_only_disk_refuses_writes_and_serves_reads() {
    let h = Harness::new().unwrap();
    let disk = TempDisk::new("ro", 1 << 20);
    std::fs::write(&disk.path, pattern(4, 1 << 20)).unwrap();
    let mut g = h.attach(1, 0, &disk, "r", BlkfrontOptions::default()).unwrap();
    assert_eq!(g.info.info & 4, 4, "VDISK_READONLY");
    assert!(!g.info.discard && !g.info.flush);
    let q = g.front.queue(0);
    let c = run(q, BlkOp::Write { sector: 0, data: &[0u8; 4096] });
    assert_eq!(c.status, BLKIF_RSP_ERROR);
    let c = run(q, BlkOp::Discard { sector: 0, nr_sectors: 8, secure: false });
    assert_ne!(c.status, BLKIF_RSP_OKAY);
    let c = run(q, BlkOp::Read { sector: 0, len: 4096 });
    assert_eq!(c.status, BLKIF_RSP_OKAY);
    assert!(c.data == pattern(4, 1 << 20)[..4096], "reads serve the file");
    assert!(std::fs::read(&disk.path).unwrap() == pattern(4, 1 << 20), "file unchanged");
}

#[test]
fn vbd_type_with_raw_params_and_qdisk_with_a_plain_path_are_served() {
    let h = Harness::new().unwrap();
    let d1 = TempDisk::new("vbd", 1 << 20);
    let d2 = TempDisk::new("plain", 1 << 20);
    let spec = h.spec("vbd", 1, 51712, &format!("raw:{}", d1.path.display()), "w", &[("format", "raw")]);
    let mut g1 = h.connect(spec, BlkfrontOptions::default()).unwrap();
    let spec = h.spec("qdisk", 1, 51728, &d2.path.display().to_string(), "w", &[]);
    let mut g2 = h.connect(spec, BlkfrontOptions::default()).unwrap();
    for (g, d, seed) in [(&mut g1, &d1, 1), (&mut g2, &d2, 2)] {
        let data = pattern(seed, 4096);
        assert_eq!(run(g.front.queue(0), BlkOp::Write { sector: 16, data: &data }).status, BLKIF_RSP_OKAY);
        assert!(std::fs::read(&d.path).unwrap()[16 * 512..16 * 512 + 4096] == data[..]);
    }
}

#[test]
fn unsupported_format_is_fatal_with_an_error_node() {
    let h = Harness::new().unwrap();
    let disk = TempDisk::new("vhd", 1 << 20);
    let spec = h.spec("qdisk", 1, 51712, &format!("aio:{}", disk.path.display()), "w", &[("format", "vhd")]);
    let mut dev = h.create(spec).unwrap();
    dev.wait_backend_state("Closed", WAIT, |s| s == Some(XenbusState::Closed)).unwrap();
    let error = dev.read_backend("error").unwrap().expect("error node");
    assert!(error.contains("vhd"), "error names the format: {error}");
}

#[test]
fn missing_disk_file_fails_its_device_and_others_connect() {
    let h = Harness::new().unwrap();
    let spec = h.spec("qdisk", 1, 51712, "aio:/nonexistent/disk.img", "w", &[]);
    let mut dev = h.create(spec).unwrap();
    dev.wait_backend_state("Closed", WAIT, |s| s == Some(XenbusState::Closed)).unwrap();
    assert!(dev.read_backend("error").unwrap().expect("error node").contains("/nonexistent/disk.img"));
    let disk = TempDisk::new("fine", 1 << 20);
    let mut g = h.attach(2, 0, &disk, "w", BlkfrontOptions::default()).unwrap();
    assert_eq!(run(g.front.queue(0), BlkOp::Read { sector: 0, len: 512 }).status, BLKIF_RSP_OKAY);
}

#[test]
fn a_guest_that_reconnects_finds_its_data_on_new_rings() {
    let h = Harness::new().unwrap();
    let disk = TempDisk::new("reconnect", 1 << 20);
    let opts = BlkfrontOptions { queues: 2, ring_page_order: 1, ..Default::default() };
    let mut g = h.attach(1, 0, &disk, "w", opts).unwrap();
    let data = pattern(8, 8192);
    assert_eq!(run(g.front.queue(1), BlkOp::Write { sector: 32, data: &data }).status, BLKIF_RSP_OKAY);
    drop(g.front);
    g.dev.close(WAIT).unwrap();
    g.dev.reinitialise().unwrap();
    let (mut front, info) = xen_sim::blkfront::Blkfront::connect(&h.host, &mut g.dev, opts, WAIT).unwrap();
    assert_eq!(info.sectors, 2048);
    let c = run(front.queue(0), BlkOp::Read { sector: 32, len: 8192 });
    assert_eq!(c.status, BLKIF_RSP_OKAY);
    assert!(c.data == data, "data written before the reconnection");
}

/// A frontend writing what Linux's blkback accepts but a strict parser
/// would not (issue 13: `protocol` with a trailing word, `feature-persistent
/// = yes`, `ring-ref` with trailing junk, `event-channel` with white space)
/// is connected and served, as by Linux.
#[test]
fn frontend_nodes_linux_accepts_connect_and_serve() {
    use xen_bus::Protocol;
    use xen_sim::blkfront::Blkfront;
    let h = Harness::new().unwrap();
    let disk = TempDisk::new("lenient", 1 << 20);
    let spec = h.spec("qdisk", 1, 0, &format!("aio:{}", disk.path.display()), "w", &[]);
    let mut dev = h.create(spec).unwrap();
    dev.wait_backend_state("InitWait", WAIT, |s| s == Some(XenbusState::InitWait)).unwrap();
    let options = BlkfrontOptions { abi: Protocol::X86_64, ..BlkfrontOptions::default() };
    let mut front = Blkfront::new(&h.host, 1, 0, options).unwrap();
    for (node, value) in front.nodes() {
        let value = match node.as_str() {
            "protocol" => format!("{value} trailing"),
            "feature-persistent" => "yes".to_string(),
            "ring-ref" => format!("{value}junk"),
            "event-channel" => format!(" {value}\n"),
            _ => value,
        };
        dev.write(&node, &value).unwrap();
    }
    dev.set_state(XenbusState::Initialised).unwrap();
    dev.wait_backend_state("Connected", WAIT, |s| s == Some(XenbusState::Connected)).unwrap();
    dev.set_state(XenbusState::Connected).unwrap();
    assert_eq!(dev.read_backend("error").unwrap(), None);
    let data = pattern(13, 4096);
    let q = front.queue(0);
    assert_eq!(run(q, BlkOp::Write { sector: 8, data: &data }).status, BLKIF_RSP_OKAY);
    let c = run(q, BlkOp::Read { sector: 8, len: 4096 });
    assert!(c.status == BLKIF_RSP_OKAY && c.data == data);
}

#[test]
fn discard_enable_0_offers_no_discard_and_refuses_one() {
    let h = Harness::new().unwrap();
    let disk = TempDisk::new("nodiscard", 1 << 20);
    let params = format!("aio:{}", disk.path.display());
    let spec = h.spec("qdisk", 1, 0, &params, "w", &[("discard-enable", "0")]);
    let mut g = h.connect(spec, BlkfrontOptions::default()).unwrap();
    assert_eq!(h.toolstack.read_backend(g.dev.spec(), "feature-discard").unwrap().as_deref(), Some("0"));
    assert!(!g.info.discard && g.info.flush);
    let c = run(g.front.queue(0), BlkOp::Discard { sector: 0, nr_sectors: 8, secure: false });
    assert_eq!(c.status, BLKIF_RSP_EOPNOTSUPP);
    let other = TempDisk::new("discard", 1 << 20);
    let spec = h.spec("qdisk", 1, 1, &format!("aio:{}", other.path.display()), "w", &[("discard-enable", "1")]);
    let g = h.connect(spec, BlkfrontOptions::default()).unwrap();
    assert!(g.info.discard);
}

/// `direct-io-safe` (libxl writes `1` for the disk spec's `direct-io-safe`)
/// tells QEMU that `O_DIRECT` is safe with the guest's grant-mapped pages;
/// ours are bounce buffers, so every disk is opened `O_DIRECT` where its
/// file system takes it, whatever the node says, and none under `serve
/// --buffered` (docs/blkback.md).
#[test]
fn direct_io_safe_does_not_decide_o_direct_and_buffered_does() {
    // On the temporary directory's file system, not tmpfs (no O_DIRECT).
    let disk = |name: &str| {
        let path = std::env::temp_dir().join(format!("blk-config-{}-{name}", std::process::id()));
        std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
        TempDisk { path }
    };
    let cache = |h: &Harness, devid: u32| {
        let devices = h.backend.monitor().devices(WAIT).expect("status");
        let d = devices.iter().find(|d| d.key.devid == devid).expect("device");
        d.details.iter().find(|(k, _)| *k == "cache").map(|(_, v)| v.clone()).expect("cache")
    };
    let h = Harness::new().unwrap();
    let disks = [disk("dio-absent"), disk("dio-0"), disk("dio-1")];
    for (devid, (d, safe)) in disks.iter().zip([None, Some("0"), Some("1")]).enumerate() {
        let extra: Vec<(&str, &str)> = safe.map(|v| ("direct-io-safe", v)).into_iter().collect();
        let spec = h.spec("qdisk", 1, devid as u32, &format!("aio:{}", d.path.display()), "w", &extra);
        let mut g = h.connect(spec, BlkfrontOptions::default()).unwrap();
        assert_eq!(run(g.front.queue(0), BlkOp::Write { sector: 0, data: &pattern(20, 4096) }).status, BLKIF_RSP_OKAY);
        assert_eq!(cache(&h, devid as u32), "direct", "direct-io-safe {safe:?}");
    }
    // The first backend closes its images (and their locks go) first.
    drop(h);
    let (h, _) = Harness::with_options(blkback::BlkOptions { direct: false, ..blk_options() }).unwrap();
    let spec = h.spec("qdisk", 1, 0, &format!("aio:{}", disks[2].path.display()), "w", &[("direct-io-safe", "1")]);
    let _g = h.connect(spec, BlkfrontOptions::default()).unwrap();
    assert_eq!(cache(&h, 0), "page cache");
}
