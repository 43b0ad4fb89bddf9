//! Image locking against the real peer: QEMU's `qemu-io` and `qemu-img`
//! (Debian's qemu-utils) and our own devices see each other's OFD byte
//! locks (`block/file-posix.c`). While we serve an image writable, QEMU
//! cannot open it for writing, and we refuse an image QEMU writes; readers
//! share a read-only disk; two of our writable devices on one image are
//! refused as two QEMUs are.
//!
//! Without qemu-utils the tests that need it print why they skip; under
//! CI (`CI` set) that is a failure.

mod blk_support;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use blk_support::*;
use blkback::{BlkOptions, Locking};
use blkif::abi::*;
use xen_bus::XenbusState;
use xen_sim::blkfront::{BlkOp, BlkfrontOptions};

/// Runs a qemu tool that may fail; its output.
fn qemu_try(args: &[&str]) -> Output {
    Command::new(args[0]).args(&args[1..]).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `qemu-io` holding `image` open (with `args`) until dropped: it reads
/// its commands from a pipe kept open.
struct QemuIo(Child);

impl QemuIo {
    /// Starts it and waits until its lock on byte `byte` shows in
    /// `/proc/locks`, i.e. it has opened the image.
    fn hold(args: &[&str], image: &Path, byte: u64) -> QemuIo {
        // Waited for on drop, also when the wait below fails.
        let holder = QemuIo(
            Command::new("qemu-io").args(args).arg(image).stdin(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap(),
        );
        let meta = std::fs::metadata(image).unwrap();
        let (major, minor) = (nix::sys::stat::major(meta.dev()), nix::sys::stat::minor(meta.dev()));
        let file = format!("{major:02x}:{minor:02x}:{} ", meta.ino());
        let deadline = Instant::now() + WAIT;
        loop {
            let locks = std::fs::read_to_string("/proc/locks").unwrap();
            let held = locks.lines().filter(|l| l.contains(&file)).any(|l| {
                let range: Vec<u64> = l.split_whitespace().rev().take(2).filter_map(|w| w.parse().ok()).collect();
                matches!(range[..], [end, start] if start <= byte && byte <= end)
            });
            if held {
                return holder;
            }
            assert!(Instant::now() < deadline, "qemu-io never locked {}", image.display());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.0.stdin.take() {
            let _ = stdin.write_all(b"quit\n");
        }
        let _ = self.0.wait();
    }
}

/// The `error` node of a device that closed (or a panic if it connected),
/// then the device removed: a failed device is tried again when its
/// frontend changes state, and would take the image once it is free.
fn refused(h: &Harness, domid: u16, devid: u32, params: &str, mode: &str) -> String {
    let mut dev = h.create(h.spec("qdisk", domid, devid, params, mode, &[])).unwrap();
    dev.wait_backend_state("Closed", WAIT, |s| s == Some(XenbusState::Closed)).unwrap();
    let error = dev.read_backend("error").unwrap().expect("error node");
    h.toolstack.remove(dev.spec()).unwrap();
    assert!(h.backend.sync(WAIT));
    error
}

/// The guests go, the backend closes their images and stops.
fn close(mut h: Harness, guests: Vec<Guest>) {
    for mut g in guests {
        drop(g.front);
        g.dev.close(WAIT).unwrap();
    }
    h.backend.shutdown();
}

#[test]
fn while_we_write_an_image_qemu_io_cannot_write_it_and_qemu_readers_can_read_it() {
    if !have_qemu() {
        return;
    }
    let disk = TempDisk::new("served-w", 1 << 20);
    let image = disk.path.display().to_string();
    let h = Harness::new().unwrap();
    let mut g = h.attach(1, 0, &disk, "w", BlkfrontOptions::default()).unwrap();
    assert_eq!(run(g.front.queue(0), BlkOp::Write { sector: 0, data: &[0x5a; 512] }).status, BLKIF_RSP_OKAY);

    let write = qemu_try(&["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 512", &image]);
    assert!(!write.status.success(), "qemu-io wrote a served image");
    assert!(stderr(&write).contains("Failed to get \"write\" lock"), "{}", stderr(&write));
    // Reading is shared, as QEMU's own guest devices share it.
    let info = qemu(&["qemu-img", "info", "-f", "raw", &image]);
    assert!(info.contains("1 MiB"), "{info}");
    let read = qemu(&["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x5a 0 512", &image]);
    assert!(read.contains("read 512/512"), "{read}");
    assert!(std::fs::read(&disk.path).unwrap()[..512].iter().all(|&b| b == 0x5a), "nothing of qemu-io's landed");

    // Closed, the image is free again.
    close(h, vec![g]);
    qemu(&["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 512", &image]);
}

#[test]
fn an_image_qemu_io_writes_is_refused_with_the_holder_named() {
    if !have_qemu() {
        return;
    }
    let disk = TempDisk::new("held-w", 1 << 20);
    let h = Harness::new().unwrap();
    let holder = QemuIo::hold(&["-f", "raw"], &disk.path, 101);
    let e = refused(&h, 1, 0, &format!("aio:{}", disk.path.display()), "w");
    assert!(e.contains("Failed to get shared \"write\" lock"), "{e}");
    assert!(e.contains(&disk.path.display().to_string()) && e.contains("qemu-io (pid"), "names image and holder: {e}");
    // Read-only is refused too: a QEMU guest device never shares write.
    let e = refused(&h, 1, 1, &format!("aio:{}", disk.path.display()), "r");
    assert!(e.contains("Failed to get shared \"write\" lock"), "{e}");
    drop(holder);
    let spec = h.spec("qdisk", 1, 2, &format!("aio:{}", disk.path.display()), "w", &[]);
    let mut g = match h.connect(spec.clone(), BlkfrontOptions::default()) {
        Ok(g) => g,
        Err(e) => panic!("{e:#}; error node {:?}", h.toolstack.read_backend(&spec, "error").unwrap()),
    };
    assert_eq!(run(g.front.queue(0), BlkOp::Write { sector: 8, data: &[1; 512] }).status, BLKIF_RSP_OKAY);
}

#[test]
fn a_qcow2_chain_locks_its_backing_file_against_writers() {
    if !have_qemu() {
        return;
    }
    let base = TempDisk::new("chain-base.raw", 1 << 20);
    let top = TempDisk::new("chain-top.qcow2", 0);
    let (b, t) = (base.path.display().to_string(), top.path.display().to_string());
    qemu(&["qemu-img", "create", "-q", "-f", "qcow2", "-b", &b, "-F", "raw", &t]);
    let h = Harness::new().unwrap();
    let spec = h.spec("qdisk", 1, 0, &format!("qcow2:{t}"), "w", &[]);
    let g = h.connect(spec, BlkfrontOptions::default()).unwrap();
    for image in [&b, &t] {
        let write = qemu_try(&["qemu-io", "-c", "write 0 512", image]);
        assert!(stderr(&write).contains("Failed to get \"write\" lock"), "{image}: {}", stderr(&write));
    }
    qemu(&["qemu-io", "-r", "-f", "raw", "-c", "read 0 512", &b]);
    // As against a running QEMU: qemu-img's qcow2 layer never shares write
    // on the file under it (its metadata), so `info` needs -U (force share).
    let info = qemu_try(&["qemu-img", "info", &t]);
    assert!(stderr(&info).contains("Failed to get shared \"write\" lock"), "{}", stderr(&info));
    assert!(qemu(&["qemu-img", "info", "-U", &t]).contains("backing file: "));
    // A second of our devices may not use the backing file as its disk.
    let e = refused(&h, 2, 0, &format!("aio:{b}"), "w");
    assert!(e.contains("Failed to get \"write\" lock") && e.contains("this process"), "{e}");
    close(h, vec![g]);
}

#[test]
fn a_read_only_disk_lets_readers_in_and_keeps_writers_out() {
    let have_qemu = have_qemu();
    let disk = TempDisk::new("served-r", 1 << 20);
    let h = Harness::new().unwrap();
    let mut first = h.attach(1, 0, &disk, "r", BlkfrontOptions::default()).unwrap();
    let mut second = h.attach(2, 0, &disk, "r", BlkfrontOptions::default()).unwrap();
    for g in [&mut first, &mut second] {
        assert_eq!(run(g.front.queue(0), BlkOp::Read { sector: 0, len: 4096 }).status, BLKIF_RSP_OKAY);
    }
    let e = refused(&h, 3, 0, &format!("aio:{}", disk.path.display()), "w");
    assert!(e.contains("Failed to get \"write\" lock") && e.contains("this process"), "{e}");
    if have_qemu {
        let image = disk.path.display().to_string();
        qemu(&["qemu-io", "-r", "-f", "raw", "-c", "read 0 512", &image]);
        let write = qemu_try(&["qemu-io", "-f", "raw", "-c", "write 0 512", &image]);
        assert!(stderr(&write).contains("Failed to get \"write\" lock"), "{}", stderr(&write));
    }
}

#[test]
fn the_second_of_two_writable_devices_on_one_image_is_refused_and_the_first_goes_on() {
    let disk = TempDisk::new("two-w", 1 << 20);
    let h = Harness::new().unwrap();
    let mut first = h.attach(1, 0, &disk, "w", BlkfrontOptions::default()).unwrap();
    let e = refused(&h, 2, 0, &format!("aio:{}", disk.path.display()), "w");
    assert!(e.contains(&disk.path.display().to_string()), "{e}");
    assert!(e.contains("Failed to get \"write\" lock") && e.contains("this process"), "{e}");
    let data = pattern(3, 4096);
    assert_eq!(run(first.front.queue(0), BlkOp::Write { sector: 0, data: &data }).status, BLKIF_RSP_OKAY);
    assert!(run(first.front.queue(0), BlkOp::Read { sector: 0, len: 4096 }).data == data);
}

#[test]
fn with_locking_off_a_second_writer_is_let_in_as_qemus_qdisk_does() {
    let disk = TempDisk::new("off-w", 1 << 20);
    let opts = BlkOptions { locking: Locking::Off, ..blk_options() };
    let (h, _) = Harness::with_options(opts).unwrap();
    let mut first = h.attach(1, 0, &disk, "w", BlkfrontOptions::default()).unwrap();
    let mut second = h.attach(2, 0, &disk, "w", BlkfrontOptions::default()).unwrap();
    assert_eq!(run(first.front.queue(0), BlkOp::Write { sector: 0, data: &[7; 512] }).status, BLKIF_RSP_OKAY);
    let c = run(second.front.queue(0), BlkOp::Read { sector: 0, len: 512 });
    assert!(c.status == BLKIF_RSP_OKAY && c.data == [7; 512]);
}
