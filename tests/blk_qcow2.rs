//! qcow2 images as QEMU's `qemu-img` and `qemu-io` make them, served to the
//! simulated blkfront: a three-deep backing chain (raw, qcow2 v2 with 512 B
//! clusters, qcow2 v3 with 64 KiB ones) with zero and compressed clusters
//! reads byte for byte as `qemu-img convert -O raw` reads it; a mixed
//! write / discard / flush workload on two queues leaves an image that
//! `qemu-img check` finds clean and `qemu-img compare` finds identical to a
//! raw disk written the same way beside it; broken images are refused.
//!
//! Without qemu-utils each test prints why it skipped; under CI (`CI` set)
//! a missing qemu-img is a failure, since `scripts/setup` installs it.

mod blk_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use blk_support::*;
use blkback::EngineChoice;
use blkif::abi::*;
use xen_bus::XenbusState;
use xen_sim::blkfront::{BlkOp, BlkfrontOptions, FrontQueue};
use xen_sim::rng::Rng;

/// A directory `name` of images, or `None` (and why, printed) without
/// qemu-utils.
fn images(name: &str) -> Option<ImageDir> {
    have_qemu().then(|| ImageDir::new(name))
}

/// A directory of images, removed on drop.
struct ImageDir(PathBuf);

impl ImageDir {
    fn new(name: &str) -> ImageDir {
        let dir = std::env::temp_dir().join(format!("blk-qcow2-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        ImageDir(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    fn arg(&self, file: &str) -> String {
        self.path(file).display().to_string()
    }
}

impl Drop for ImageDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const MIB: u64 = 1 << 20;

/// base.raw <- mid.qcow2 (v2, 512 B clusters, relative backing name) <-
/// top.qcow2 (v3, 64 KiB clusters, absolute backing name), 8 MiB, each
/// layer with data of its own, compressed clusters in mid and top and zero
/// clusters in top over data below.
fn three_deep_chain(dir: &ImageDir) -> PathBuf {
    let (base, mid, top) = (dir.arg("base.raw"), dir.arg("mid.qcow2"), dir.arg("top.qcow2"));
    std::fs::write(&base, pattern(1, 8 * MIB as usize)).unwrap();
    let v2 = "compat=0.10,cluster_size=512";
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", "-o", v2, "-b", "base.raw", "-F", "raw", &mid]);
    qemu(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0x22 1M 64k",
        "-c",
        "write -c -P 0x33 2M 512",
        "-c",
        "write -P 0x23 7340544 512k",
        &mid,
    ]);
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", "-b", &mid, "-F", "qcow2", &top]);
    qemu(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -z 1M 64k",
        "-c",
        "write -z 6M 128k",
        "-c",
        "write -P 0x44 3M 100k",
        "-c",
        "write -c -P 0x55 4M 64k",
        "-c",
        "write -c -P 0x56 5M 64k",
        &top,
    ]);
    dir.path("top.qcow2")
}

/// The disk as QEMU reads it.
fn qemu_reads(dir: &ImageDir, image: &Path) -> Vec<u8> {
    let out = dir.arg("converted.raw");
    qemu(&["qemu-img", "convert", "-O", "raw", &image.display().to_string(), &out]);
    std::fs::read(out).unwrap()
}

/// A qdisk of `image` as xl writes it for `format=qcow2`.
fn attach_qcow2(h: &Harness, domid: u16, devid: u32, image: &Path, mode: &str, opts: BlkfrontOptions) -> Guest {
    let spec = h.spec("qdisk", domid, devid, &format!("qcow2:{}", image.display()), mode, &[]);
    match h.connect(spec.clone(), opts) {
        Ok(g) => g,
        Err(e) => panic!("{e:#}; error node {:?}", h.toolstack.read_backend(&spec, "error").unwrap()),
    }
}

/// The guests go, the backend closes their images and stops (so that
/// qemu-img sees them closed).
fn close(mut h: Harness, guests: Vec<Guest>) {
    for mut g in guests {
        drop(g.front);
        g.dev.close(WAIT).unwrap();
    }
    h.backend.shutdown();
}

/// Reads the whole disk in requests of `chunk` bytes.
fn read_all(q: &mut FrontQueue, bytes: u64, chunk: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(bytes as usize);
    for offset in (0..bytes).step_by(chunk) {
        let len = chunk.min((bytes - offset) as usize);
        let c = run(q, BlkOp::Read { sector: offset / 512, len });
        assert_eq!(c.status, BLKIF_RSP_OKAY, "read at {offset}");
        data.extend_from_slice(&c.data);
    }
    data
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y).or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

#[test]
fn a_three_deep_chain_reads_as_qemu_img_convert_reads_it() {
    let Some(dir) = images("chain") else { return };
    let top = three_deep_chain(&dir);
    let expected = qemu_reads(&dir, &top);
    let h = Harness::new().unwrap();
    let opts = BlkfrontOptions { max_request_bytes: 1 << 20, depth: 4, ..Default::default() };
    let mut g = attach_qcow2(&h, 1, 0, &top, "w", opts);
    assert_eq!(g.info.sectors, 8 * MIB / 512);
    let read = |n: &str| h.toolstack.read_backend(g.dev.spec(), n).unwrap();
    assert_eq!(read("discard-granularity").as_deref(), Some("65536"), "top's clusters");
    // Large indirect reads, and small ones that cut clusters of every layer.
    for chunk in [1 << 20, 4096 + 512] {
        let got = read_all(g.front.queue(0), 8 * MIB, chunk);
        assert_eq!(first_difference(&got, &expected), None, "chunks of {chunk}");
    }
    // The top's own data (100 KiB at 3 MiB: two clusters) is read in place
    // by the small reads that fall inside it, the rest through imago.
    let direct = direct_requests(&h, 0);
    match engine() {
        EngineChoice::IoUring => assert!((1..=30).contains(&direct), "{direct} reads in place"),
        EngineChoice::Threads | EngineChoice::Auto => assert_eq!(direct, 0),
    }
}

#[test]
fn an_image_of_compressed_clusters_reads_as_qemu_reads_it() {
    let Some(dir) = images("compressed") else { return };
    let raw = dir.arg("data.raw");
    // Half compressible text, half noise (stored uncompressed by qemu).
    let mut data = pattern(5, 4 * MIB as usize);
    for (i, b) in data[..2 * MIB as usize].iter_mut().enumerate() {
        *b = b"qcow2 compressed cluster "[i % 25];
    }
    std::fs::write(&raw, &data).unwrap();
    for cluster in ["512", "65536", "2M"] {
        let image = dir.path(&format!("c-{cluster}.qcow2"));
        let arg = image.display().to_string();
        qemu(&["qemu-img", "convert", "-c", "-O", "qcow2", "-o", &format!("cluster_size={cluster}"), &raw, &arg]);
        let check = qemu(&["qemu-img", "check", &arg]);
        assert!(!check.contains(" 0.00% compressed clusters"), "{check}");
        let h = Harness::new().unwrap();
        let opts = BlkfrontOptions { max_request_bytes: 1 << 20, ..Default::default() };
        let mut g = attach_qcow2(&h, 1, 0, &image, "r", opts);
        let got = read_all(g.front.queue(0), 4 * MIB, 1 << 20);
        assert_eq!(first_difference(&got, &data), None, "cluster size {cluster}");
    }
}

/// What the workload does, applied alike to the qcow2 disk, the raw disk
/// and the model.
#[derive(Clone, Copy, Debug)]
enum Op {
    Write { offset: u64, len: usize, seed: u64 },
    Discard { offset: u64, len: u64 },
    Read { offset: u64, len: usize },
}

impl Op {
    fn range(&self) -> (u64, u64) {
        match *self {
            Op::Write { offset, len, .. } | Op::Read { offset, len } => (offset, offset + len as u64),
            Op::Discard { offset, len } => (offset, offset + len),
        }
    }
}

/// Up to `n` operations on ranges that do not overlap (their order in
/// flight is then irrelevant), sector-aligned, some cluster-aligned.
fn batch(rng: &mut Rng, n: usize, disk: u64) -> Vec<Op> {
    let mut ops: Vec<Op> = Vec::new();
    while ops.len() < n {
        let sectors = match rng.below(4) {
            0 => 1 + rng.below(8),
            1 => 8 * (1 + rng.below(16)),
            2 => 128 * (1 + rng.below(4)),
            _ => 1 + rng.below(1024),
        };
        let len = sectors * 512;
        let mut offset = rng.below((disk - len) / 512) * 512;
        if rng.below(3) == 0 {
            offset &= !(65536 - 1);
        }
        let op = match rng.below(10) {
            0..=5 => Op::Write { offset, len: len as usize, seed: rng.next_u64() },
            6..=7 => Op::Discard { offset, len },
            _ => Op::Read { offset, len: len as usize },
        };
        let (a, b) = op.range();
        if ops.iter().all(|o| o.range().1 <= a || b <= o.range().0) {
            ops.push(op);
        }
    }
    ops
}

fn apply(model: &mut [u8], op: &Op) {
    match *op {
        Op::Write { offset, len, seed } => {
            model[offset as usize..offset as usize + len].copy_from_slice(&pattern(seed, len))
        }
        Op::Discard { offset, len } => model[offset as usize..(offset + len) as usize].fill(0),
        Op::Read { .. } => {}
    }
}

/// Submits `ops` (tags are their indices), then waits for all; checks
/// every status and every read against `model` (as before the batch).
fn run_batch(q: &mut FrontQueue, ops: &[Op], model: &[u8]) {
    let data: Vec<Vec<u8>> = ops
        .iter()
        .map(|op| match *op {
            Op::Write { len, seed, .. } => pattern(seed, len),
            _ => Vec::new(),
        })
        .collect();
    let mut pending = 0;
    let mut done = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let blk = match *op {
            Op::Write { offset, .. } => BlkOp::Write { sector: offset / 512, data: &data[i] },
            Op::Discard { offset, len } => {
                BlkOp::Discard { sector: offset / 512, nr_sectors: len / 512, secure: false }
            }
            Op::Read { offset, len } => BlkOp::Read { sector: offset / 512, len },
        };
        while !q.can_submit() {
            q.wait(std::time::Duration::from_millis(100), &mut done).unwrap();
        }
        q.submit(i as u64, blk).unwrap();
        pending += 1;
    }
    let deadline = std::time::Instant::now() + WAIT;
    while done.len() < pending {
        assert!(std::time::Instant::now() < deadline, "completions missing");
        q.wait(std::time::Duration::from_millis(100), &mut done).unwrap();
    }
    for c in done {
        let op = ops[c.tag as usize];
        assert_eq!(c.status, BLKIF_RSP_OKAY, "{op:?}");
        if let Op::Read { offset, len } = op {
            assert!(c.data[..] == model[offset as usize..offset as usize + len], "{op:?} read back differs");
        }
    }
}

fn flush(q: &mut FrontQueue) {
    assert_eq!(run(q, BlkOp::Flush).status, BLKIF_RSP_OKAY);
}

#[test]
fn a_mixed_workload_leaves_an_image_qemu_img_checks_clean_and_identical_to_raw() {
    const DISK: u64 = 16 * MIB;
    let Some(dir) = images("workload") else { return };
    let (base, top, raw) = (dir.arg("base.qcow2"), dir.arg("top.qcow2"), dir.arg("same.raw"));
    // A backing file with data, so that partial-cluster writes and
    // discards in the top image have something to copy or to hide.
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", &base, "16M"]);
    qemu(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 12M", &base]);
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", &top]);
    let mut model = qemu_reads(&dir, Path::new(&top));
    std::fs::write(&raw, &model).unwrap();

    let h = Harness::new().unwrap();
    let opts = BlkfrontOptions { queues: 2, max_request_bytes: 1 << 20, depth: 16, ..Default::default() };
    let mut qcow2 = attach_qcow2(&h, 1, 0, Path::new(&top), "w", opts);
    let spec = h.spec("qdisk", 1, 1, &format!("aio:{raw}"), "w", &[]);
    let mut same = h.connect(spec, opts).unwrap();
    assert!(qcow2.info.discard && qcow2.info.flush);
    let mut rng = Rng::new(15);
    for round in 0..120 {
        let n = 1 + rng.below(12) as usize;
        let ops = batch(&mut rng, n, DISK);
        let queue = round % 2;
        run_batch(qcow2.front.queue(queue), &ops, &model);
        run_batch(same.front.queue(queue), &ops, &model);
        for op in &ops {
            apply(&mut model, op);
        }
        if rng.below(4) == 0 {
            flush(qcow2.front.queue(queue));
            flush(same.front.queue(queue));
        }
    }
    flush(qcow2.front.queue(0));
    let got = read_all(qcow2.front.queue(1), DISK, 1 << 20);
    assert_eq!(first_difference(&got, &model), None, "qcow2 disk against the model");
    let got = read_all(same.front.queue(1), DISK, 1 << 20);
    assert_eq!(first_difference(&got, &model), None, "raw disk against the model");

    close(h, vec![qcow2, same]);

    let check = Command::new("qemu-img").args(["check", &top]).output().unwrap();
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "qemu-img check: {report}{}", String::from_utf8_lossy(&check.stderr));
    assert!(report.contains("No errors were found") && !report.contains("leaked"), "{report}");
    let compare = qemu(&["qemu-img", "compare", "-f", "qcow2", "-F", "raw", &top, &raw]);
    assert!(compare.contains("Images are identical"), "{compare}");
}

#[test]
fn discarding_the_whole_disk_frees_its_clusters() {
    let Some(dir) = images("discard") else { return };
    let image = dir.arg("d.qcow2");
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", &image, "8M"]);
    let h = Harness::new().unwrap();
    let opts = BlkfrontOptions { max_request_bytes: 1 << 20, ..Default::default() };
    let mut g = attach_qcow2(&h, 1, 0, Path::new(&image), "w", opts);
    let q = g.front.queue(0);
    for mib in 0..8 {
        assert_eq!(run(q, BlkOp::Write { sector: mib * 2048, data: &pattern(mib, 1 << 20) }).status, BLKIF_RSP_OKAY);
    }
    let c = run(q, BlkOp::Discard { sector: 0, nr_sectors: 8 * 2048, secure: false });
    assert_eq!(c.status, BLKIF_RSP_OKAY);
    assert!(read_all(q, 8 * MIB, 1 << 20).iter().all(|&b| b == 0), "discarded range reads zeros");
    close(h, vec![g]);
    let map = qemu(&["qemu-img", "map", "--output=json", &image]);
    assert!(!map.contains("\"data\": true"), "no cluster still holds data: {map}");
    let copy = dir.arg("copy.qcow2");
    qemu(&["qemu-img", "convert", "-O", "qcow2", &image, &copy]);
    assert!(std::fs::metadata(&copy).unwrap().len() < MIB, "a converted copy is small");
    qemu(&["qemu-img", "check", &image]);
}

/// The device's `error` node once it closed. Each call is a device of its
/// own: with one device id, the state and error of the one removed before
/// could still be read (the test once got the previous image's error).
fn refused(h: &Harness, params: &str, mode: &str) -> String {
    static DEVID: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let devid = DEVID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let spec = h.spec("qdisk", 1, devid, params, mode, &[]);
    let mut dev = h.create(spec).unwrap();
    dev.wait_backend_state("Closed", WAIT, |s| s == Some(XenbusState::Closed)).unwrap();
    let error = dev.read_backend("error").unwrap().expect("error node");
    h.toolstack.remove(dev.spec()).unwrap();
    error
}

/// Sets bits in a v3 header's `incompatible_features` (bytes 72..80, big endian).
fn set_incompatible_bits(path: &str, bits: u8) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[79] |= bits;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn dirty_corrupt_and_broken_images_are_refused_with_a_clear_error() {
    let Some(dir) = images("refused") else { return };
    let h = Harness::new().unwrap();
    let make = |name: &str| {
        let p = dir.arg(name);
        qemu(&["qemu-img", "create", "-q", "-f", "qcow2", &p, "1M"]);
        p
    };
    let dirty = make("dirty.qcow2");
    set_incompatible_bits(&dirty, 1);
    let e = refused(&h, &format!("qcow2:{dirty}"), "w");
    assert!(e.contains("dirty") && e.contains("dirty.qcow2"), "{e}");
    let corrupt = make("corrupt.qcow2");
    set_incompatible_bits(&corrupt, 2);
    let e = refused(&h, &format!("qcow2:{corrupt}"), "w");
    assert!(e.contains("corrupt"), "{e}");
    // A raw file named as qcow2 is not opened as anything else.
    let raw = dir.arg("plain.raw");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let e = refused(&h, &format!("qcow2:{raw}"), "w");
    assert!(e.contains("plain.raw") && e.contains("qcow2"), "{e}");
    // A backing file whose format the header does not name is not guessed.
    // qemu-img no longer writes such images; v2 keeps the format in a header
    // extension (at byte 72), which is cut off here.
    let base = dir.arg("base.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let nofmt = dir.arg("nofmt.qcow2");
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", &base, "-F", "raw", &nofmt]);
    let mut bytes = std::fs::read(&nofmt).unwrap();
    assert_eq!(bytes[72..76], 0xE279_2ACAu32.to_be_bytes(), "backing format extension first");
    bytes[72..76].fill(0);
    std::fs::write(&nofmt, bytes).unwrap();
    let info = qemu(&["qemu-img", "info", &nofmt]);
    assert!(!info.contains("backing file format"), "{info}");
    let e = refused(&h, &format!("qcow2:{nofmt}"), "w");
    assert!(e.contains("no format") && e.contains("base.raw"), "{e}");
    // A missing backing file names itself.
    let orphan = dir.arg("orphan.qcow2");
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "gone.raw", "-F", "raw", &orphan, "1M"]);
    let e = refused(&h, &format!("qcow2:{orphan}"), "w");
    assert!(e.contains("gone.raw"), "{e}");
}

#[test]
fn a_qcow2_header_a_guest_writes_into_its_raw_disk_stays_data() {
    let Some(dir) = images("planted") else { return };
    let planted = dir.arg("planted.qcow2");
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/hostname", "-F", "raw", "-u", &planted, "1M"]);
    let header = std::fs::read(&planted).unwrap()[..4096].to_vec();
    let disk = TempDisk::new("planted", 1 << 20);
    let h = Harness::new().unwrap();
    let mut g = h.attach(1, 0, &disk, "w", BlkfrontOptions::default()).unwrap();
    assert_eq!(run(g.front.queue(0), BlkOp::Write { sector: 0, data: &header }).status, BLKIF_RSP_OKAY);
    // Opened again once the writer has closed it (its lock keeps a second
    // open out meanwhile).
    close(h, vec![g]);
    let h = Harness::new().unwrap();
    let mut again = h.attach(2, 1, &disk, "w", BlkfrontOptions::default()).unwrap();
    assert_eq!(again.info.sectors, 2048, "still the raw file's size");
    let c = run(again.front.queue(0), BlkOp::Read { sector: 0, len: 4096 });
    assert!(c.status == BLKIF_RSP_OKAY && c.data == header, "the header reads back as data");
}

#[test]
fn a_read_only_qcow2_disk_refuses_writes_and_stays_unchanged() {
    let Some(dir) = images("ro") else { return };
    let image = dir.arg("ro.qcow2");
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", &image, "1M"]);
    qemu(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x77 0 64k", &image]);
    let before = std::fs::read(&image).unwrap();
    let h = Harness::new().unwrap();
    let mut g = attach_qcow2(&h, 1, 0, Path::new(&image), "r", BlkfrontOptions::default());
    let read = |n: &str| h.toolstack.read_backend(g.dev.spec(), n).unwrap();
    assert_eq!(read("info").as_deref(), Some("4"), "VDISK_READONLY");
    assert_eq!(read("feature-discard").as_deref(), Some("0"));
    let q = g.front.queue(0);
    assert_ne!(run(q, BlkOp::Write { sector: 0, data: &[1; 512] }).status, BLKIF_RSP_OKAY);
    let c = run(q, BlkOp::Read { sector: 0, len: 4096 });
    assert!(c.status == BLKIF_RSP_OKAY && c.data.iter().all(|&b| b == 0x77));
    close(h, vec![g]);
    assert!(std::fs::read(&image).unwrap() == before, "the image file is unchanged");
}

#[test]
fn a_restarted_backend_reopens_the_image_and_its_writes_stay_consistent() {
    let Some(dir) = images("restart") else { return };
    let image = dir.arg("r.qcow2");
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", &image, "8M"]);
    let mut h = Harness::new().unwrap();
    let opts = BlkfrontOptions { max_request_bytes: 1 << 20, depth: 16, ..Default::default() };
    let mut g = attach_qcow2(&h, 1, 0, Path::new(&image), "w", opts);
    let blocks: Vec<Vec<u8>> = (0..16).map(|i| pattern(900 + i, 256 << 10)).collect();
    let q = g.front.queue(0);
    for (i, b) in blocks.iter().enumerate().take(8) {
        assert_eq!(run(q, BlkOp::Write { sector: i as u64 * 512, data: b }).status, BLKIF_RSP_OKAY);
    }
    // The old backend closes the image before the new one opens it.
    h.restart(|| Ok(())).unwrap();
    for (i, b) in blocks.iter().enumerate().skip(8) {
        assert_eq!(run(q, BlkOp::Write { sector: i as u64 * 512, data: b }).status, BLKIF_RSP_OKAY);
    }
    let got = read_all(q, 4 * MIB, 1 << 20);
    assert_eq!(first_difference(&got, &blocks.concat()), None);
    close(h, vec![g]);
    let check = qemu(&["qemu-img", "check", &image]);
    assert!(check.contains("No errors were found"), "{check}");
}

/// Reads and writes the device served on the image file directly so far
/// (`status`' `direct-requests`).
fn direct_requests(h: &Harness, devid: u32) -> u64 {
    let devices = h.backend.monitor().devices(WAIT).expect("status");
    let d = devices.iter().find(|d| d.key.devid == devid).expect("device");
    let n = d.details.iter().find(|(k, _)| *k == "direct-requests").map(|(_, v)| v.clone());
    n.expect("a fixed qcow2 disk reports direct-requests").parse().unwrap()
}

/// On a fully allocated image every read and write goes to the image file
/// at its host offset on the io_uring engine (none on the thread pool),
/// and qemu-img reads back what was written.
#[test]
fn a_fully_allocated_image_is_read_and_written_in_place_on_io_uring() {
    let Some(dir) = images("prealloc") else { return };
    let image = dir.arg("full.qcow2");
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=full", &image, "8M"]);
    qemu(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x6b 0 8M", &image]);
    let h = Harness::new().unwrap();
    let opts = BlkfrontOptions { max_request_bytes: 1 << 20, depth: 16, ..Default::default() };
    let mut g = attach_qcow2(&h, 1, 0, Path::new(&image), "w", opts);
    let before = direct_requests(&h, 0);
    let q = g.front.queue(0);
    let mut model = vec![0x6b; 8 * MIB as usize];
    let mut rng = Rng::new(41);
    // Engine operations: the backend cuts a request over 64 KiB into parts
    // of 64 KiB, each its own operation (docs/blkback.md, issue 13).
    let mut operations = 0;
    for i in 0..64u64 {
        let len = if i % 8 == 0 { 1 << 20 } else { 4096 << rng.below(3) };
        let offset = rng.below((8 * MIB - len) / 512) * 512;
        if i % 2 == 0 {
            let data = pattern(i, len as usize);
            assert_eq!(run(q, BlkOp::Write { sector: offset / 512, data: &data }).status, BLKIF_RSP_OKAY);
            model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
        } else {
            let c = run(q, BlkOp::Read { sector: offset / 512, len: len as usize });
            assert!(c.status == BLKIF_RSP_OKAY && c.data[..] == model[offset as usize..(offset + len) as usize]);
        }
        operations += len.div_ceil(64 << 10);
    }
    flush(q);
    let direct = direct_requests(&h, 0) - before;
    match engine() {
        EngineChoice::IoUring => assert_eq!(direct, operations, "every request in place"),
        EngineChoice::Threads | EngineChoice::Auto => assert_eq!(direct, 0, "the thread pool goes through imago"),
    }
    close(h, vec![g]);
    assert_eq!(first_difference(&qemu_reads(&dir, Path::new(&image)), &model), None);
    let check = qemu(&["qemu-img", "check", &image]);
    assert!(check.contains("No errors were found"), "{check}");
}

/// Discards (which free clusters) in flight together with writes to the
/// same clusters, on two queues, over many rounds, while allocating writes
/// elsewhere may take the freed clusters: each cluster then reads either
/// the write's data or zeros, whole; what the guest reads is what qemu-img
/// reads from the closed image (no write landed in a cluster that was
/// freed and given to another offset), and `qemu-img check` is clean.
#[test]
fn discards_in_flight_with_writes_to_the_same_clusters_corrupt_nothing() {
    const DISK: u64 = 8 * MIB;
    const CLUSTER: u64 = 65536;
    let Some(dir) = images("discard-race") else { return };
    let (image, raw) = (dir.arg("race.qcow2"), dir.arg("race.raw"));
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=full", &image, "8M"]);
    let h = Harness::new().unwrap();
    let opts = BlkfrontOptions { queues: 2, max_request_bytes: 1 << 20, depth: 32, ..Default::default() };
    let mut g = attach_qcow2(&h, 1, 0, Path::new(&image), "w", opts);
    let before = direct_requests(&h, 0);
    let clusters = DISK / CLUSTER;
    let mut rng = Rng::new(77);
    for round in 0..30u64 {
        // Cluster -> the seed written to it this round.
        let mut written: Vec<(u64, u64)> = Vec::new();
        let mut data = Vec::new();
        while written.len() < 12 {
            let c = rng.below(clusters);
            if written.iter().all(|&(w, _)| w != c) {
                written.push((c, round * 1000 + c));
                data.push(pattern(round * 1000 + c, CLUSTER as usize));
            }
        }
        for (i, &(c, _)) in written.iter().enumerate() {
            let sector = c * CLUSTER / 512;
            g.front.queue(0).submit(i as u64, BlkOp::Write { sector, data: &data[i] }).unwrap();
            let discard = BlkOp::Discard { sector, nr_sectors: CLUSTER / 512, secure: false };
            g.front.queue(1).submit(100 + i as u64, discard).unwrap();
        }
        // Writes elsewhere meanwhile, which allocate (freed clusters may be
        // reused for them).
        let fresh = rng.below(clusters);
        let fresh_data = pattern(round, CLUSTER as usize);
        if written.iter().all(|&(w, _)| w != fresh) {
            g.front.queue(1).submit(999, BlkOp::Write { sector: fresh * CLUSTER / 512, data: &fresh_data }).unwrap();
        }
        for queue in 0..2 {
            let n = if queue == 0 {
                written.len()
            } else {
                written.len() + usize::from(written.iter().all(|&(w, _)| w != fresh))
            };
            let mut done = Vec::new();
            let deadline = std::time::Instant::now() + WAIT;
            while done.len() < n {
                assert!(std::time::Instant::now() < deadline, "completions missing");
                g.front.queue(queue).wait(std::time::Duration::from_millis(100), &mut done).unwrap();
            }
            assert!(done.iter().all(|c| c.status == BLKIF_RSP_OKAY), "round {round}");
        }
        let q = g.front.queue(0);
        for (i, &(c, _)) in written.iter().enumerate() {
            let got = run(q, BlkOp::Read { sector: c * CLUSTER / 512, len: CLUSTER as usize });
            assert_eq!(got.status, BLKIF_RSP_OKAY);
            let zeros = got.data.iter().all(|&b| b == 0);
            assert!(zeros || got.data == data[i], "round {round}: cluster {c} is neither the write nor zeros");
        }
    }
    let direct = direct_requests(&h, 0) - before;
    if engine() == EngineChoice::IoUring {
        assert!(direct > 0, "some writes went in place");
    }
    flush(g.front.queue(0));
    let seen = read_all(g.front.queue(1), DISK, 1 << 20);
    std::fs::write(&raw, &seen).unwrap();
    close(h, vec![g]);
    let check = Command::new("qemu-img").args(["check", &image]).output().unwrap();
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "qemu-img check: {report}{}", String::from_utf8_lossy(&check.stderr));
    assert!(report.contains("No errors were found") && !report.contains("leaked"), "{report}");
    let compare = qemu(&["qemu-img", "compare", "-f", "qcow2", "-F", "raw", &image, &raw]);
    assert!(compare.contains("Images are identical"), "{compare}");
}

/// A guest on a qcow2 image of 4 KiB clusters over a backing file of the
/// same cluster size, full of 0x5a (16 MiB, one queue).
fn over_a_backing_file(name: &str) -> Option<(ImageDir, Harness, Guest)> {
    let dir = images(name)?;
    let (base, top) = (dir.arg("base.qcow2"), dir.arg("top.qcow2"));
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", &base, "16M"]);
    qemu(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 16M", &base]);
    let backed = ["-o", "cluster_size=4096", "-b", "base.qcow2", "-F", "qcow2"];
    qemu(&[&["qemu-img", "create", "-q", "-f", "qcow2"][..], &backed[..], &[top.as_str()]].concat());
    let h = Harness::new().unwrap();
    let opts = BlkfrontOptions { queues: 1, max_request_bytes: 1 << 20, depth: 32, ..Default::default() };
    let g = attach_qcow2(&h, 1, 0, Path::new(&top), "w", opts);
    Some((dir, h, g))
}

/// Writes in flight together; each must succeed.
fn write_together<const N: usize>(q: &mut FrontQueue, writes: [(u64, &[u8]); N]) {
    for (tag, (sector, data)) in writes.into_iter().enumerate() {
        q.submit(tag as u64, BlkOp::Write { sector, data }).unwrap();
    }
    let mut done = Vec::new();
    while done.len() < N {
        q.wait(std::time::Duration::from_millis(100), &mut done).unwrap();
    }
    assert!(done.iter().all(|c| c.status == BLKIF_RSP_OKAY));
}

/// Two writes in flight together that share an unallocated cluster (the
/// boundary between them inside it), over a backing file: both halves
/// must be in the cluster afterwards, and the backing data elsewhere.
#[test]
fn two_writes_in_flight_into_one_unallocated_cluster_both_land() {
    let Some((_dir, h, mut g)) = over_a_backing_file("shared-cluster") else { return };
    let q = g.front.queue(0);
    let mut lost = Vec::new();
    for c in 0..512u64 {
        let split = 1 + c % 7; // sectors of the cluster in the first write
        let a = vec![0xa0 | (c % 16) as u8; (split * 512) as usize];
        let b = vec![0xb0 | (c % 16) as u8; ((8 - split) * 512) as usize];
        write_together(q, [(c * 8, &a), (c * 8 + split, &b)]);
        let got = run(q, BlkOp::Read { sector: c * 8, len: 4096 });
        if got.data[..a.len()] != a[..] || got.data[a.len()..] != b[..] {
            lost.push(c);
        }
    }
    assert!(lost.is_empty(), "clusters with a write lost: {lost:?}");
    close(h, vec![g]);
}

/// One write over 64 KiB, not cluster-aligned, into unallocated clusters
/// over a backing file: every byte lands, whatever parts it goes in.
#[test]
fn a_large_unaligned_write_into_unallocated_clusters_lands_whole() {
    let Some((_dir, h, mut g)) = over_a_backing_file("large-unaligned") else { return };
    let q = g.front.queue(0);
    let mut bad = Vec::new();
    for i in 0..24u64 {
        let sector = i * 640 + 1 + i % 7;
        let data = pattern(i, 200 * 1024);
        assert_eq!(run(q, BlkOp::Write { sector, data: &data }).status, BLKIF_RSP_OKAY);
        let got = run(q, BlkOp::Read { sector, len: data.len() });
        if let Some(at) = first_difference(&got.data, &data) {
            bad.push((i, at));
        }
    }
    assert!(bad.is_empty(), "writes with bytes lost (index, first offset): {bad:?}");
    close(h, vec![g]);
}

/// Two writes in flight together sharing an allocated cluster: one also
/// covers an unallocated cluster (so it goes through the format layer),
/// the other only the allocated one (so on io_uring it may go in place).
#[test]
fn a_format_layer_write_and_an_in_place_write_sharing_a_cluster_both_land() {
    let Some((_dir, h, mut g)) = over_a_backing_file("mixed-paths") else { return };
    let q = g.front.queue(0);
    let mut lost = Vec::new();
    for i in 0..256u64 {
        // Clusters 2i (unallocated) and 2i+1 (allocated now).
        let c = (2 * i + 1) * 8;
        assert_eq!(run(q, BlkOp::Write { sector: c, data: &[0x11; 4096] }).status, BLKIF_RSP_OKAY);
        let split = 1 + i % 7;
        let a = vec![0xa0 | (i % 16) as u8; ((8 + split) * 512) as usize];
        let b = vec![0xb0 | (i % 16) as u8; ((8 - split) * 512) as usize];
        write_together(q, [(c - 8, &a), (c + split, &b)]);
        let got = run(q, BlkOp::Read { sector: c - 8, len: 8192 });
        if got.data[..a.len()] != a[..] || got.data[a.len()..] != b[..] {
            let bad_a = first_difference(&got.data[..a.len()], &a);
            let bad_b = first_difference(&got.data[a.len()..], &b);
            lost.push((i, bad_a, bad_b, got.data[a.len() + bad_b.unwrap_or(0)]));
        }
    }
    assert!(lost.is_empty(), "cluster pairs with a write lost: {lost:?}");
    close(h, vec![g]);
}
