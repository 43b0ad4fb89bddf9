//! CD-ROMs and removable media as libxl configures them (`device-type =
//! cdrom`, `removable = 1`, `mode = r`, an empty drive as `params = aio:`)
//! and changes them (`xl cd-eject` writes `params = ""`, `xl cd-insert`
//! writes `""` then `aio:/new.iso`, `libxl_cdrom_insert`), served to the
//! simulated blkfront: `info` says CD-ROM, removable, read-only; writes are
//! refused; an empty drive has 0 sectors and fails reads; a change while
//! connected publishes the new size with `state` written again (what
//! Linux's blkfront re-reads `sectors` on) and the guest reads the new
//! medium; a `params` change on a plain disk is ignored, as QEMU and Linux
//! ignore it.

mod blk_support;

use blk_support::*;
use blkif::abi::*;
use xen_bus::XenbusState;
use xen_sim::blkfront::{BlkOp, BlkfrontOptions, CapacityWatch};
use xen_sim::frontend::DeviceSpec;

const VDISK_CDROM: u32 = 1;
const VDISK_REMOVABLE: u32 = 2;
const VDISK_READONLY: u32 = 4;

/// An image file of `bytes` of `pattern(seed)`.
fn iso(name: &str, seed: u64, bytes: usize) -> TempDisk {
    let disk = TempDisk::new(name, 0);
    std::fs::write(&disk.path, pattern(seed, bytes)).unwrap();
    disk
}

/// The nodes libxl writes for `vdev=xvdc,devtype=cdrom`: the backend's
/// `device-type`, `removable`, `mode = r`, `params` (`aio:` when empty).
fn cdrom_spec(h: &Harness, domid: u16, params: &str) -> DeviceSpec {
    let mut spec = h.spec("qdisk", domid, 0, params, "r", &[("device-type", "cdrom"), ("removable", "1")]);
    spec.frontend_nodes.push(("device-type".into(), "cdrom".into()));
    spec
}

fn params(disk: &TempDisk) -> String {
    format!("aio:{}", disk.path.display())
}

#[test]
fn a_cdrom_says_so_in_info_reads_its_medium_and_refuses_writes() {
    let h = Harness::new().unwrap();
    let cd = iso("cd", 1, 1 << 20);
    let mut g = h.connect(cdrom_spec(&h, 1, &params(&cd)), BlkfrontOptions::default()).unwrap();
    assert_eq!(g.info.info, VDISK_CDROM | VDISK_REMOVABLE | VDISK_READONLY);
    assert_eq!(g.info.sectors, 2048);
    assert!(!g.info.flush && !g.info.barrier && !g.info.discard, "a read-only disk offers none");
    let q = g.front.queue(0);
    let c = run(q, BlkOp::Read { sector: 8, len: 8192 });
    assert!(c.status == BLKIF_RSP_OKAY && c.data == pattern(1, 1 << 20)[4096..4096 + 8192]);
    assert_eq!(run(q, BlkOp::Write { sector: 0, data: &[0; 4096] }).status, BLKIF_RSP_ERROR);
    assert_eq!(run(q, BlkOp::Flush).status, BLKIF_RSP_EOPNOTSUPP);
    assert!(std::fs::read(&cd.path).unwrap() == pattern(1, 1 << 20), "the medium is unchanged");
}

#[test]
fn eject_then_insert_as_xl_does_changes_the_medium_under_a_connected_guest() {
    let h = Harness::new().unwrap();
    let (first, second) = (iso("first", 2, 1 << 20), iso("second", 3, 3 << 20));
    let spec = cdrom_spec(&h, 1, &params(&first));
    let mut g = h.connect(spec.clone(), BlkfrontOptions::default()).unwrap();
    let capacity = CapacityWatch::new(h.guest_xs(1).unwrap(), &spec, WAIT).unwrap();
    let q = g.front.queue(0);
    assert!(run(q, BlkOp::Read { sector: 0, len: 4096 }).data == pattern(2, 1 << 20)[..4096]);

    // xl cd-eject: params = "" (and `type`, rewritten as it was).
    h.toolstack.write_backend(&spec, "params", "").unwrap();
    assert_eq!(capacity.wait(WAIT, |s| s == 0).unwrap(), 0, "no medium: 0 sectors, state written again");
    assert_eq!(run(q, BlkOp::Read { sector: 0, len: 512 }).status, BLKIF_RSP_ERROR);

    // xl cd-insert: params = "" again, then the new medium.
    h.toolstack.write_backend(&spec, "params", "").unwrap();
    h.toolstack.write_backend(&spec, "params", &params(&second)).unwrap();
    assert_eq!(capacity.wait(WAIT, |s| s != 0).unwrap(), 6144, "the new medium's size");
    let c = run(q, BlkOp::Read { sector: 4096, len: 8192 });
    assert!(c.status == BLKIF_RSP_OKAY && c.data == pattern(3, 3 << 20)[2 << 20..(2 << 20) + 8192]);
    assert_eq!(run(q, BlkOp::Write { sector: 0, data: &[0; 512] }).status, BLKIF_RSP_ERROR);
    assert_eq!(g.dev.backend_state().unwrap(), Some(XenbusState::Connected), "no reconnection");
    let info = h.toolstack.read_backend(&spec, "info").unwrap();
    assert_eq!(info.as_deref(), Some("7"));
}

#[test]
fn an_empty_cdrom_connects_with_no_medium_and_takes_one_later() {
    let h = Harness::new().unwrap();
    let spec = cdrom_spec(&h, 1, "aio:");
    let mut g = h.connect(spec.clone(), BlkfrontOptions::default()).unwrap();
    assert_eq!((g.info.sectors, g.info.info), (0, VDISK_CDROM | VDISK_REMOVABLE | VDISK_READONLY));
    let q = g.front.queue(0);
    assert_eq!(run(q, BlkOp::Read { sector: 0, len: 512 }).status, BLKIF_RSP_ERROR);
    let capacity = CapacityWatch::new(h.guest_xs(1).unwrap(), &spec, WAIT).unwrap();
    let cd = iso("late", 4, 1 << 20);
    h.toolstack.write_backend(&spec, "params", &params(&cd)).unwrap();
    assert_eq!(capacity.wait(WAIT, |s| s != 0).unwrap(), 2048);
    assert!(run(q, BlkOp::Read { sector: 2040, len: 4096 }).data == pattern(4, 1 << 20)[(1 << 20) - 4096..]);
}

#[test]
fn a_medium_that_does_not_open_leaves_the_drive_empty_and_the_guest_connected() {
    let h = Harness::new().unwrap();
    let cd = iso("good", 5, 1 << 20);
    let spec = cdrom_spec(&h, 1, &params(&cd));
    let mut g = h.connect(spec.clone(), BlkfrontOptions::default()).unwrap();
    let capacity = CapacityWatch::new(h.guest_xs(1).unwrap(), &spec, WAIT).unwrap();
    for bad in ["aio:/nonexistent/cd.iso", "vhd:/some.vhd"] {
        h.toolstack.write_backend(&spec, "params", bad).unwrap();
        assert_eq!(capacity.wait(WAIT, |s| s == 0).unwrap(), 0, "{bad}");
        assert_eq!(run(g.front.queue(0), BlkOp::Read { sector: 0, len: 512 }).status, BLKIF_RSP_ERROR);
        assert_eq!(h.toolstack.backend_state(&spec).unwrap(), Some(XenbusState::Connected), "{bad}");
        h.toolstack.write_backend(&spec, "params", &params(&cd)).unwrap();
        assert_eq!(capacity.wait(WAIT, |s| s != 0).unwrap(), 2048);
    }
    assert!(run(g.front.queue(0), BlkOp::Read { sector: 0, len: 512 }).data == pattern(5, 512));
}

#[test]
fn a_removable_writable_disk_writes_to_the_medium_in_it() {
    let h = Harness::new().unwrap();
    let (a, b) = (TempDisk::new("stick-a", 1 << 20), TempDisk::new("stick-b", 2 << 20));
    let spec = h.spec("qdisk", 1, 0, &params(&a), "w", &[("removable", "1"), ("device-type", "disk")]);
    let mut g = h.connect(spec.clone(), BlkfrontOptions::default()).unwrap();
    assert_eq!(g.info.info, VDISK_REMOVABLE);
    assert!(g.info.flush && !g.info.discard, "flush, and no discard for media to come");
    let capacity = CapacityWatch::new(h.guest_xs(1).unwrap(), &spec, WAIT).unwrap();
    let q = g.front.queue(0);
    assert_eq!(run(q, BlkOp::Write { sector: 0, data: &pattern(6, 4096) }).status, BLKIF_RSP_OKAY);
    h.toolstack.write_backend(&spec, "params", &params(&b)).unwrap();
    assert_eq!(capacity.wait(WAIT, |s| s == 4096).unwrap(), 4096);
    assert_eq!(run(q, BlkOp::Write { sector: 3000, data: &pattern(7, 4096) }).status, BLKIF_RSP_OKAY);
    assert_eq!(run(q, BlkOp::Flush).status, BLKIF_RSP_OKAY);
    assert!(std::fs::read(&a.path).unwrap()[..4096] == pattern(6, 4096)[..]);
    assert!(std::fs::read(&b.path).unwrap()[3000 * 512..3000 * 512 + 4096] == pattern(7, 4096)[..]);
    assert_eq!(std::fs::metadata(&a.path).unwrap().len(), 1 << 20, "the old medium untouched since");
}

#[test]
fn a_params_change_on_a_disk_that_is_not_removable_is_ignored() {
    let h = Harness::new().unwrap();
    let (disk, other) = (iso("fixed", 8, 1 << 20), iso("other", 9, 2 << 20));
    let spec = h.spec("qdisk", 1, 0, &params(&disk), "w", &[("removable", "0"), ("device-type", "disk")]);
    let mut g = h.connect(spec.clone(), BlkfrontOptions::default()).unwrap();
    assert_eq!(g.info.info, 0);
    h.toolstack.write_backend(&spec, "params", &params(&other)).unwrap();
    assert!(h.backend.sync(WAIT));
    assert_eq!(h.toolstack.read_backend(&spec, "sectors").unwrap().as_deref(), Some("2048"));
    let c = run(g.front.queue(0), BlkOp::Read { sector: 0, len: 4096 });
    assert!(c.status == BLKIF_RSP_OKAY && c.data == pattern(8, 4096), "still the first image");
    assert_eq!(h.toolstack.backend_state(&spec).unwrap(), Some(XenbusState::Connected));
}

#[test]
fn an_ejected_medium_is_closed_and_its_lock_released() {
    if !have_qemu() {
        return;
    }
    let h = Harness::new().unwrap();
    let cd = iso("locked", 10, 1 << 20);
    let image = cd.path.display().to_string();
    let spec = cdrom_spec(&h, 1, &params(&cd));
    let g = h.connect(spec.clone(), BlkfrontOptions::default()).unwrap();
    let out = std::process::Command::new("qemu-io").args(["-f", "raw", "-c", "write 0 512", &image]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("Failed to get \"write\" lock"), "{out:?}");
    qemu(&["qemu-io", "-r", "-f", "raw", "-c", "read 0 512", &image]);
    let capacity = CapacityWatch::new(h.guest_xs(1).unwrap(), &spec, WAIT).unwrap();
    h.toolstack.write_backend(&spec, "params", "").unwrap();
    capacity.wait(WAIT, |s| s == 0).unwrap();
    qemu(&["qemu-io", "-f", "raw", "-c", "write 0 512", &image]);
    drop(g);
}
