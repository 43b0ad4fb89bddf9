//! imago's cluster allocation (with the fixes carried in
//! `vendor/imago-0.2.6`, fuzz/upstream/README.md) on images as `qemu-img`
//! makes them: every cluster size from 512 B to 2 MiB, versions 2 and 3,
//! refcount widths from 1 to 64 bits, alone or over a qcow2 backing file.
//! Writes (whole clusters, parts of clusters copied from the backing
//! file), discards (v3; v2 refuses them and keeps its data) and rewrites
//! that need new refcount blocks and, with
//! small clusters, a larger refcount table, leave an image that `qemu-img
//! check` finds clean and `qemu-img compare` finds identical to a raw file
//! written the same way.
//!
//! Without qemu-utils the test prints why it skipped; under CI (`CI` set) a
//! missing qemu-img is a failure, since `scripts/setup` installs it.

use std::path::{Path, PathBuf};
use std::process::Command;

use blkback::{DiskImage, Qcow2Image};

const MIB: u64 = 1 << 20;
const DISK: u64 = 16 * MIB;

fn have_qemu() -> bool {
    let found = ["qemu-img", "qemu-io"].iter().all(|t| Command::new(t).arg("--version").output().is_ok());
    if !found {
        assert!(std::env::var_os("CI").is_none(), "qemu-utils missing under CI (scripts/setup installs it)");
        println!("skipped: qemu-utils (qemu-img, qemu-io) not installed");
    }
    found
}

/// Runs a qemu tool; its stdout, or a panic with its stderr.
fn qemu(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{args:?}: {}{stdout}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// The refcount table's size in clusters (header offset 56).
fn reftable_clusters(image: &Path) -> u32 {
    let header = std::fs::read(image).unwrap();
    u32::from_be_bytes(header[56..60].try_into().unwrap())
}

/// One image: qemu-img's options, how much to write.
struct Config {
    compat: &'static str,
    cluster: u64,
    refcount_bits: u32,
    backed: bool,
    /// Bytes written in whole 64 KiB pieces (every other piece of the disk
    /// first, then the ones between).
    written: u64,
}

fn fill(offset: u64, len: u64, seed: u8) -> Vec<u8> {
    (offset..offset + len).map(|i| (i / 512) as u8 ^ (i % 251) as u8 ^ seed).collect()
}

/// Writes to `image` and `model` alike.
fn write(image: &Qcow2Image, model: &mut [u8], offset: u64, data: &[u8]) {
    image.write_at(data, offset).unwrap_or_else(|e| panic!("write of {} at {offset}: {e}", data.len()));
    model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
}

fn exercise(dir: &Path, c: &Config) {
    let name = format!("{}-{}-{}{}", c.compat, c.cluster, c.refcount_bits, if c.backed { "-backed" } else { "" });
    let arg = |file: &str| dir.join(format!("{name}-{file}")).display().to_string();
    let (top, base, raw) = (arg("top.qcow2"), arg("base.qcow2"), arg("model.raw"));
    let mut model = vec![0u8; DISK as usize];
    let mut options = format!("compat={},cluster_size={}", c.compat, c.cluster);
    if c.compat != "0.10" {
        options += &format!(",refcount_bits={}", c.refcount_bits);
    }
    if c.backed {
        qemu(&["qemu-img", "create", "-q", "-f", "qcow2", "-o", &options, &base, "16M"]);
        qemu(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x3c 0 5M", "-c", "write -P 0xc3 11M 3M", &base]);
        model[..5 * MIB as usize].fill(0x3c);
        model[11 * MIB as usize..14 * MIB as usize].fill(0xc3);
        qemu(&["qemu-img", "create", "-q", "-f", "qcow2", "-o", &options, "-b", &base, "-F", "qcow2", &top]);
    } else {
        qemu(&["qemu-img", "create", "-q", "-f", "qcow2", "-o", &options, &top, "16M"]);
    }
    let reftable_before = reftable_clusters(Path::new(&top));

    let image = Qcow2Image::open(Path::new(&top), false, false).unwrap();
    let pieces = (c.written / (64 << 10)).min(DISK / (64 << 10));
    for i in (0..pieces).map(|i| (i * 2) % (DISK / (64 << 10)) + (i * 2) / (DISK / (64 << 10))) {
        write(&image, &mut model, i * (64 << 10), &fill(i * (64 << 10), 64 << 10, 1));
    }
    // Parts of clusters: the rest of each comes from the backing file.
    for offset in [512, 3 * MIB + 1536, 12 * MIB - 4096, DISK - 1024] {
        write(&image, &mut model, offset, &fill(offset, 1024, 2));
    }
    image.flush().unwrap();
    // Freed clusters are allocated again, for other offsets. v2 has no
    // zero clusters: imago does not discard there, nor do we offer it.
    let v3 = c.compat == "1.1";
    assert_eq!(image.supports_discard(), v3, "{name}");
    for (offset, len) in [(MIB, MIB), (6 * MIB + 512, 300 << 10), (13 * MIB, 2 * MIB)] {
        match image.discard(offset, len, false) {
            Ok(()) if v3 => model[offset as usize..(offset + len) as usize].fill(0),
            Err(e) if !v3 => assert!(e.to_string().contains("version 3 required"), "{name}: {e}"),
            other => panic!("{name}: discard: {other:?}"),
        }
    }
    for offset in [MIB + 4096, 9 * MIB, 15 * MIB + 512] {
        write(&image, &mut model, offset, &fill(offset, 256 << 10, 3));
    }
    let mut back = vec![0u8; DISK as usize];
    image.read_at(&mut back, 0).unwrap();
    assert!(back == model, "{name}: reads what was written");
    drop(image);

    std::fs::write(&raw, &model).unwrap();
    let check = Command::new("qemu-img").args(["check", &top]).output().unwrap();
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{name}: qemu-img check: {report}{}", String::from_utf8_lossy(&check.stderr));
    qemu(&["qemu-img", "compare", "-f", "qcow2", "-F", "raw", &top, &raw]);
    let reftable_after = reftable_clusters(Path::new(&top));
    // 512-byte clusters and wide refcounts: one refcount table cluster
    // covers 2 MiB (64-bit) or 8 MiB (16-bit) of the file, less than what
    // was written.
    if c.cluster == 512 && (c.refcount_bits == 64 || c.written > 8 * MIB) {
        assert!(reftable_after > reftable_before, "{name}: the refcount table grew ({reftable_before})");
    }
}

#[test]
fn writes_that_grow_the_refcount_structures_leave_qemu_img_images_clean() {
    if !have_qemu() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("blkback-qcow2-allocation-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut configs = vec![
        Config { compat: "1.1", cluster: 512, refcount_bits: 64, backed: false, written: 3 * MIB },
        Config { compat: "1.1", cluster: 512, refcount_bits: 16, backed: true, written: 10 * MIB },
        Config { compat: "0.10", cluster: 512, refcount_bits: 16, backed: false, written: 10 * MIB },
        Config { compat: "1.1", cluster: 512, refcount_bits: 1, backed: false, written: MIB },
    ];
    for (n, shift) in (10..=21).enumerate() {
        for compat in ["0.10", "1.1"] {
            let refcount_bits = [2, 4, 8, 16, 32, 64][n % 6];
            configs.push(Config { compat, cluster: 1 << shift, refcount_bits, backed: n % 2 == 0, written: 4 * MIB });
        }
    }
    for c in &configs {
        exercise(&dir, c);
    }
    let _ = std::fs::remove_dir_all(PathBuf::from(&dir));
}
