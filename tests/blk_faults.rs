//! Storage failing under a connected guest, through the whole backend: the
//! failing requests get `BLKIF_RSP_ERROR`, the device stays Connected and
//! serves what it can, the neighbour on another disk sees nothing. The
//! faults are real ones of the file system: a full file system (a small
//! tmpfs, where mounting is allowed: root), the image removed, the image
//! truncated under the guest. Errors by offset and a stuck disk are in
//! `crates/blkback/tests/faults.rs`.

mod blk_support;

use std::process::Command;
use std::sync::atomic::Ordering;

use blk_support::*;
use blkif::abi::{BLKIF_RSP_ERROR, BLKIF_RSP_OKAY};
use xen_bus::XenbusState;
use xen_sim::blkfront::{BlkOp, BlkfrontOptions};

fn write(g: &mut Guest, sector: u64, data: &[u8]) -> i16 {
    run(g.front.queue(0), BlkOp::Write { sector, data }).status
}

fn read(g: &mut Guest, sector: u64, len: usize) -> (i16, Vec<u8>) {
    let c = run(g.front.queue(0), BlkOp::Read { sector, len });
    (c.status, c.data)
}

/// The neighbour's disk still works, and both devices are Connected and
/// not failed.
fn unharmed(h: &Harness, g: &mut Guest, neighbour: &mut Guest) {
    let data = pattern(77, 4096);
    assert_eq!(write(neighbour, 8, &data), BLKIF_RSP_OKAY);
    assert_eq!(read(neighbour, 8, 4096), (BLKIF_RSP_OKAY, data));
    assert_eq!(g.dev.backend_state().unwrap(), Some(XenbusState::Connected));
    assert_eq!(neighbour.dev.backend_state().unwrap(), Some(XenbusState::Connected));
    assert_eq!(h.backend.stats().failures.load(Ordering::SeqCst), 0);
}

/// A tmpfs of `kib` KiB mounted on a new directory, unmounted on drop;
/// `None` where this process may not mount.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(kib: u64) -> Option<SmallFs> {
        let dir = std::env::temp_dir().join(format!("xenbackd-smallfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "xenbackd-test", dir.to_str()?])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = std::fs::remove_dir(&dir);
            return None;
        }
        Some(SmallFs(dir))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").args(["-l", self.0.to_str().unwrap()]).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_full_file_system_fails_the_writes_that_do_not_fit_and_nothing_else() {
    let Some(fs) = SmallFs::mount(256) else {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root); the ENOSPC path is covered by crates/blkback/tests/faults.rs");
        return;
    };
    let h = Harness::new().unwrap();
    let neighbour_disk = TempDisk::new("faults-neighbour", 1 << 20);
    let mut neighbour = h.attach(4, 0, &neighbour_disk, "w", BlkfrontOptions::default()).unwrap();
    // A sparse 4 MiB image on a 256 KiB file system.
    let image = fs.0.join("disk");
    std::fs::File::create(&image).unwrap().set_len(4 << 20).unwrap();
    let spec = h.spec("qdisk", 3, 0, &format!("aio:{}", image.display()), "w", &[]);
    let mut g = h.connect(spec, BlkfrontOptions::default()).unwrap();
    let mut written = Vec::new();
    let mut enospc = 0;
    for i in 0..128u64 {
        let data = pattern(i, 32 << 10);
        match write(&mut g, i * 64, &data) {
            BLKIF_RSP_OKAY => written.push((i, data)),
            BLKIF_RSP_ERROR => enospc += 1,
            s => panic!("status {s}"),
        }
    }
    eprintln!("{} writes of 32 KiB fitted, {enospc} failed", written.len());
    assert!(enospc > 0 && !written.is_empty(), "the file system filled up");
    for (i, data) in &written {
        assert_eq!(read(&mut g, i * 64, 32 << 10), (BLKIF_RSP_OKAY, data.clone()), "block {i}");
    }
    // Space freed (a discard punches holes) and writes fit again.
    let (i, _) = written[0];
    let c = run(g.front.queue(0), BlkOp::Discard { sector: i * 64, nr_sectors: 64, secure: false });
    assert_eq!(c.status, BLKIF_RSP_OKAY);
    assert_eq!(write(&mut g, 127 * 64, &pattern(9, 4096)), BLKIF_RSP_OKAY);
    unharmed(&h, &mut g, &mut neighbour);
}

#[test]
fn a_removed_image_is_served_until_the_device_goes_as_linux_keeps_an_open_file() {
    let h = Harness::new().unwrap();
    let disk = TempDisk::new("faults-removed", 1 << 20);
    let neighbour_disk = TempDisk::new("faults-removed-neighbour", 1 << 20);
    let mut g = h.attach(3, 0, &disk, "w", BlkfrontOptions::default()).unwrap();
    let mut neighbour = h.attach(4, 0, &neighbour_disk, "w", BlkfrontOptions::default()).unwrap();
    let data = pattern(5, 8192);
    assert_eq!(write(&mut g, 0, &data), BLKIF_RSP_OKAY);
    std::fs::remove_file(&disk.path).unwrap();
    assert_eq!(read(&mut g, 0, 8192), (BLKIF_RSP_OKAY, data));
    assert_eq!(write(&mut g, 16, &pattern(6, 4096)), BLKIF_RSP_OKAY);
    unharmed(&h, &mut g, &mut neighbour);
}

#[test]
fn an_image_truncated_under_the_guest_fails_reads_past_its_new_end() {
    let h = Harness::new().unwrap();
    let disk = TempDisk::new("faults-truncated", 1 << 20);
    let neighbour_disk = TempDisk::new("faults-truncated-neighbour", 1 << 20);
    let mut g = h.attach(3, 0, &disk, "w", BlkfrontOptions::default()).unwrap();
    let mut neighbour = h.attach(4, 0, &neighbour_disk, "w", BlkfrontOptions::default()).unwrap();
    let head = pattern(1, 4096);
    assert_eq!(write(&mut g, 0, &head), BLKIF_RSP_OKAY);
    assert_eq!(write(&mut g, 1024, &pattern(2, 4096)), BLKIF_RSP_OKAY);
    std::fs::OpenOptions::new().write(true).open(&disk.path).unwrap().set_len(64 << 10).unwrap();
    // Past the end: an error, never a short read passed off as data.
    let (status, _) = read(&mut g, 1024, 4096);
    assert_eq!(status, BLKIF_RSP_ERROR);
    assert_eq!(read(&mut g, 0, 4096), (BLKIF_RSP_OKAY, head));
    unharmed(&h, &mut g, &mut neighbour);
}
