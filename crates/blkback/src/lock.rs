//! Image locking as QEMU does it (`block/file-posix.c`), so that QEMU,
//! `qemu-img`, `qemu-io` and other xenbackd processes see our images in
//! use, and we see theirs.
//!
//! QEMU describes what a user of an image does, and what it lets others
//! do, as permission bits (`BLK_PERM_*` of `include/block/block-common.h`).
//! For every bit it holds it takes a shared (read) lock on byte
//! [`PERM_BASE`] + bit of the file, and for every bit it does not share
//! one on byte [`SHARED_BASE`] + bit (`raw_apply_lock_bytes`). Then it tests
//! (`raw_check_lock_bytes`, with `F_OFD_GETLK` of an exclusive lock, which
//! ignores locks of the same open file description): a bit it wants is
//! refused while anyone holds byte [`SHARED_BASE`] + bit ("Failed to get
//! "write" lock"), a bit it does not share while anyone holds byte
//! [`PERM_BASE`] + bit ("Failed to get shared "write" lock"). On a refusal
//! its bytes are unlocked again. Locks are never exclusive, so taking them
//! never fails on another user's; only the test decides.
//!
//! The locks are open file description locks (`F_OFD_SETLK`): they belong
//! to the descriptor they were taken on and go with its last close, and two
//! descriptors of one process conflict as two processes do. Where the
//! kernel has no OFD locks (before Linux 3.15) QEMU's `locking=auto` takes
//! none and `locking=on` falls back to process-wide POSIX locks (which a
//! close of any descriptor of the file drops); [`Locking`] does the same.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{fcntl, FcntlArg};

use crate::format::ImageFormat;

/// Byte of the first permission lock (`RAW_LOCK_PERM_BASE`; libvirt's
/// virtlockd takes byte 0).
pub const PERM_BASE: i64 = 100;
/// Byte of the first "not shared" lock (`RAW_LOCK_SHARED_BASE`).
pub const SHARED_BASE: i64 = 200;

/// QEMU's permission bits (`BLK_PERM_*`), as a set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perms(u8);

impl Perms {
    /// `BLK_PERM_CONSISTENT_READ`: reads see what was written.
    pub const CONSISTENT_READ: Perms = Perms(0x01);
    /// `BLK_PERM_WRITE`: changes the guest-visible data.
    pub const WRITE: Perms = Perms(0x02);
    /// `BLK_PERM_WRITE_UNCHANGED`: writes that leave the data as it reads.
    pub const WRITE_UNCHANGED: Perms = Perms(0x04);
    /// `BLK_PERM_RESIZE`: changes the size.
    pub const RESIZE: Perms = Perms(0x08);
    /// `BLK_PERM_ALL` (QEMU 6.1 dropped `GRAPH_MOD`, bit 4, which was
    /// always shared and never locked).
    pub const ALL: Perms = Perms(0x0f);
    /// No bit.
    pub const NONE: Perms = Perms(0);

    /// Both sets' bits.
    pub const fn union(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }

    /// The bits of `ALL` not in this set.
    pub const fn complement(self) -> Perms {
        Perms(!self.0 & Perms::ALL.0)
    }

    /// Whether bit number `bit` is in the set.
    fn has(self, bit: u8) -> bool {
        self.0 & (1 << bit) != 0
    }

    /// The bit numbers in the set.
    fn bits(self) -> impl Iterator<Item = u8> {
        (0..4).filter(move |&b| self.has(b))
    }
}

/// QEMU's name of bit number `bit` (`bdrv_perm_names`).
fn perm_name(bit: u8) -> &'static str {
    ["consistent read", "write", "write unchanged", "resize"][usize::from(bit)]
}

/// What one opened file of an image takes: the permissions held and those
/// shared with other users.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageLocks {
    /// Held: a lock on byte [`PERM_BASE`] + bit each.
    pub perm: Perms,
    /// Shared: every bit not in it is a lock on byte [`SHARED_BASE`] + bit.
    pub shared: Perms,
}

impl ImageLocks {
    /// What QEMU's file node under a guest's disk takes. The device
    /// (`blkconf_apply_backend_options`, resizable as xen-block asks)
    /// holds consistent read, and write unless read-only; it shares
    /// consistent read, write unchanged and resize, never write. A raw
    /// format node passes that through to the file; a qcow2 node
    /// (`bdrv_default_perms_for_storage`, metadata and data child) adds write
    /// and resize where writable and shares neither.
    pub fn guest_disk(format: ImageFormat, writable: bool) -> ImageLocks {
        let read = Perms::CONSISTENT_READ;
        let device_shared = read.union(Perms::WRITE_UNCHANGED).union(Perms::RESIZE);
        match (format, writable) {
            (ImageFormat::Raw, true) => ImageLocks { perm: read.union(Perms::WRITE), shared: device_shared },
            (ImageFormat::Raw, false) => ImageLocks { perm: read, shared: device_shared },
            (ImageFormat::Qcow2, true) => ImageLocks {
                perm: read.union(Perms::WRITE).union(Perms::RESIZE),
                shared: read.union(Perms::WRITE_UNCHANGED),
            },
            (ImageFormat::Qcow2, false) => ImageLocks { perm: read, shared: read.union(Perms::WRITE_UNCHANGED) },
        }
    }

    /// What QEMU takes on a backing file (`bdrv_default_perms_for_cow`,
    /// the parent not sharing write): consistent read held; consistent read
    /// and write unchanged shared, so nobody may write or resize it.
    pub fn backing_file() -> ImageLocks {
        ImageLocks { perm: Perms::CONSISTENT_READ, shared: Perms::CONSISTENT_READ.union(Perms::WRITE_UNCHANGED) }
    }

    /// The bytes locked: each held bit's, then each unshared bit's.
    pub fn bytes(&self) -> Vec<i64> {
        let held = self.perm.bits().map(|b| PERM_BASE + i64::from(b));
        held.chain(self.shared.complement().bits().map(|b| SHARED_BASE + i64::from(b))).collect()
    }
}

/// Whether images are locked (`xenbackd serve --image-locking`), with
/// QEMU's `locking` option's values and meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Locking {
    /// OFD locks where the kernel has them, else none.
    Auto,
    /// OFD locks, or POSIX locks where the kernel has no OFD locks.
    On,
    /// No locks (QEMU's own qdisk backend opens images `locking=off`).
    Off,
}

impl core::str::FromStr for Locking {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Locking::Auto),
            "on" => Ok(Locking::On),
            "off" => Ok(Locking::Off),
            _ => Err(format!("unknown image locking {s:?} (auto, on or off)")),
        }
    }
}

/// Which `fcntl` locks are taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockKind {
    /// `F_OFD_SETLK` / `F_OFD_GETLK`: per open file description.
    Ofd,
    /// `F_SETLK` / `F_GETLK`: per process.
    Posix,
}

impl Locking {
    /// The locks this policy takes on this kernel (`None`: none), as
    /// `raw_open_common` decides it.
    pub fn resolve(self) -> Option<LockKind> {
        match (self, has_ofd_locks()) {
            (Locking::Off, _) | (Locking::Auto, false) => None,
            (_, true) => Some(LockKind::Ofd),
            (Locking::On, false) => {
                log::warn!("image locking on, but the kernel has no OFD locks: POSIX locks, which any close of the file in this process drops");
                Some(LockKind::Posix)
            }
        }
    }
}

/// Whether the kernel has OFD locks (`qemu_probe_lock_ops`: an
/// `F_OFD_GETLK` on `/dev/null` fails with `EINVAL` where it has not).
pub fn has_ofd_locks() -> bool {
    let Ok(null) = std::fs::File::open("/dev/null") else { return false };
    let mut probe = flock(nix::libc::F_WRLCK, 0);
    !matches!(fcntl(null.as_raw_fd(), FcntlArg::F_OFD_GETLK(&mut probe)), Err(nix::errno::Errno::EINVAL))
}

/// Errors of locking an image.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another user holds what we need, or needs what we hold.
    #[error("{path}: Failed to get {shared}\"{perm}\" lock: {holder}")]
    Conflict {
        /// The image file.
        path: PathBuf,
        /// The permission's QEMU name.
        perm: &'static str,
        /// `"shared "` where the other user holds the permission we do not
        /// share, empty where it does not share the one we want.
        shared: &'static str,
        /// Who holds the conflicting byte, as far as `/proc` shows it.
        holder: String,
    },
    /// A lock call itself failed.
    #[error("{path}: cannot lock byte {byte}")]
    Fcntl {
        /// The image file.
        path: PathBuf,
        /// The byte.
        byte: i64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn flock(kind: i32, start: i64) -> nix::libc::flock {
    // SAFETY: `flock` is a plain C struct of integers; all zeros is a valid
    // value (and `l_pid` must be 0 for OFD locks).
    let mut fl: nix::libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as _;
    fl.l_whence = nix::libc::SEEK_SET as _;
    fl.l_start = start;
    fl.l_len = 1;
    fl
}

fn set(fd: BorrowedFd<'_>, kind: LockKind, lock_type: i32, byte: i64) -> nix::Result<()> {
    let fl = flock(lock_type, byte);
    let arg = match kind {
        LockKind::Ofd => FcntlArg::F_OFD_SETLK(&fl),
        LockKind::Posix => FcntlArg::F_SETLK(&fl),
    };
    fcntl(fd.as_raw_fd(), arg).map(drop)
}

/// Whether another open file description (or, for POSIX locks, another
/// process) holds a lock on `byte` (`qemu_lock_fd_test`, exclusive).
fn locked_by_other(fd: BorrowedFd<'_>, kind: LockKind, byte: i64) -> nix::Result<bool> {
    let mut fl = flock(nix::libc::F_WRLCK, byte);
    let arg = match kind {
        LockKind::Ofd => FcntlArg::F_OFD_GETLK(&mut fl),
        LockKind::Posix => FcntlArg::F_GETLK(&mut fl),
    };
    fcntl(fd.as_raw_fd(), arg)?;
    Ok(i32::from(fl.l_type) != nix::libc::F_UNLCK)
}

/// Takes `locks` on the image file open as `fd` (`raw_handle_perm_lock`'s
/// prepare and commit, from nothing held): the bytes are locked, then
/// tested; on a conflict, or a failure, every byte is unlocked again and
/// the error names the permission and who holds it. The locks last as long
/// as the file's open file description.
pub fn lock_image(fd: BorrowedFd<'_>, path: &Path, locks: ImageLocks, kind: LockKind) -> Result<(), LockError> {
    let taken = take_and_test(fd, path, locks, kind);
    if taken.is_err() {
        for byte in locks.bytes() {
            let _ = set(fd, kind, nix::libc::F_UNLCK, byte);
        }
    }
    taken
}

fn take_and_test(fd: BorrowedFd<'_>, path: &Path, locks: ImageLocks, kind: LockKind) -> Result<(), LockError> {
    let failed = |byte| move |e: nix::Error| LockError::Fcntl { path: path.into(), byte, source: e.into() };
    for byte in locks.bytes() {
        set(fd, kind, nix::libc::F_RDLCK, byte).map_err(failed(byte))?;
    }
    let wanted = locks.perm.bits().map(|b| (b, SHARED_BASE + i64::from(b), ""));
    let unshared = locks.shared.complement().bits().map(|b| (b, PERM_BASE + i64::from(b), "shared "));
    for (bit, byte, shared) in wanted.chain(unshared) {
        if locked_by_other(fd, kind, byte).map_err(failed(byte))? {
            let holder = holders(fd, byte);
            return Err(LockError::Conflict { path: path.into(), perm: perm_name(bit), shared, holder });
        }
    }
    Ok(())
}

/// Who holds a lock on `byte` of the file open as `fd`, from the `lock:`
/// lines of `/proc/*/fdinfo/*` (`F_OFD_GETLK` reports no process for OFD
/// locks); our own descriptor is left out. Only on a conflict: it reads
/// every process's descriptors.
fn holders(fd: BorrowedFd<'_>, byte: i64) -> String {
    let Ok(stat) = nix::sys::stat::fstat(fd.as_raw_fd()) else { return "held by another user".into() };
    let (dev, ino) = (stat.st_dev, stat.st_ino);
    let file_id = format!("{:02x}:{:02x}:{ino}", nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let me = std::process::id();
    let mut found = Vec::new();
    for proc in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = proc.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        for info in std::fs::read_dir(proc.path().join("fdinfo")).into_iter().flatten().flatten() {
            if pid == me && info.file_name().to_str() == Some(&fd.as_raw_fd().to_string()) {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(info.path()) else { continue };
            if text.lines().any(|l| lock_line_covers(l, &file_id, byte)) {
                let comm = std::fs::read_to_string(proc.path().join("comm")).unwrap_or_default();
                let this = if pid == me { ", this process" } else { "" };
                found.push(format!("{} (pid {pid}{this})", comm.trim()));
                break;
            }
        }
        if found.len() == 4 {
            break;
        }
    }
    if found.is_empty() {
        "held by another user".into()
    } else {
        format!("held by {}", found.join(", "))
    }
}

/// Whether an fdinfo line (`lock:\t1: OFDLCK ADVISORY  READ -1
/// fe:00:10010651 100 101`) is a lock of file `file_id` over `byte`.
fn lock_line_covers(line: &str, file_id: &str, byte: i64) -> bool {
    let Some(rest) = line.strip_prefix("lock:") else { return false };
    let words: Vec<&str> = rest.split_whitespace().collect();
    let Some(at) = words.iter().position(|w| *w == file_id) else { return false };
    let start = words.get(at + 1).and_then(|w| w.parse::<i64>().ok());
    let end = words.get(at + 2).and_then(|w| if *w == "EOF" { Some(i64::MAX) } else { w.parse::<i64>().ok() });
    matches!((start, end), (Some(s), Some(e)) if s <= byte && byte <= e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn temp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("blkback-lock-{}-{name}", std::process::id()));
        std::fs::write(&p, [0u8; 4096]).unwrap();
        p
    }

    fn open(p: &Path, writable: bool) -> std::fs::File {
        std::fs::OpenOptions::new().read(true).write(writable).open(p).unwrap()
    }

    #[test]
    fn the_bytes_are_qemus_for_each_kind_of_user() {
        let raw_w = ImageLocks::guest_disk(ImageFormat::Raw, true);
        assert_eq!(raw_w.bytes(), vec![100, 101, 201]);
        assert_eq!(ImageLocks::guest_disk(ImageFormat::Raw, false).bytes(), vec![100, 201]);
        assert_eq!(ImageLocks::guest_disk(ImageFormat::Qcow2, true).bytes(), vec![100, 101, 103, 201, 203]);
        assert_eq!(ImageLocks::guest_disk(ImageFormat::Qcow2, false).bytes(), vec![100, 201, 203]);
        assert_eq!(ImageLocks::backing_file().bytes(), vec![100, 201, 203]);
    }

    #[test]
    fn a_writer_refuses_a_second_writer_and_its_bytes_go_with_it() {
        let p = temp("writers");
        let (a, b) = (open(&p, true), open(&p, true));
        let w = ImageLocks::guest_disk(ImageFormat::Raw, true);
        lock_image(a.as_fd(), &p, w, LockKind::Ofd).unwrap();
        let e = lock_image(b.as_fd(), &p, w, LockKind::Ofd).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("Failed to get \"write\" lock"), "{text}");
        assert!(text.contains("this process"), "the holder is named: {text}");
        // The refused descriptor holds nothing: a reader that shares
        // nothing but write sees only the first writer's bytes.
        drop(a);
        lock_image(b.as_fd(), &p, w, LockKind::Ofd).unwrap();
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn readers_share_and_a_reader_keeps_a_writer_out() {
        let p = temp("readers");
        let r = ImageLocks::guest_disk(ImageFormat::Raw, false);
        let (a, b, c) = (open(&p, false), open(&p, false), open(&p, true));
        lock_image(a.as_fd(), &p, r, LockKind::Ofd).unwrap();
        lock_image(b.as_fd(), &p, r, LockKind::Ofd).unwrap();
        let e = lock_image(c.as_fd(), &p, ImageLocks::guest_disk(ImageFormat::Raw, true), LockKind::Ofd);
        assert!(matches!(e, Err(LockError::Conflict { perm: "write", shared: "", .. })), "{e:?}");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn a_user_that_does_not_share_write_is_refused_while_someone_writes() {
        let p = temp("unshared");
        let (a, b) = (open(&p, true), open(&p, false));
        // qemu-io's default open: write held, everything shared.
        let sharing_writer = ImageLocks { perm: Perms::CONSISTENT_READ.union(Perms::WRITE), shared: Perms::ALL };
        lock_image(a.as_fd(), &p, sharing_writer, LockKind::Ofd).unwrap();
        let e = lock_image(b.as_fd(), &p, ImageLocks::backing_file(), LockKind::Ofd).unwrap_err();
        assert!(e.to_string().contains("Failed to get shared \"write\" lock"), "{e}");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn fdinfo_lock_lines_are_matched_by_file_and_range() {
        let line = "lock:\t1: OFDLCK ADVISORY  READ -1 fe:00:10010651 100 101";
        assert!(lock_line_covers(line, "fe:00:10010651", 101));
        assert!(!lock_line_covers(line, "fe:00:10010651", 201));
        assert!(!lock_line_covers(line, "fe:00:1001065", 100));
        assert!(lock_line_covers("lock:\t2: POSIX  ADVISORY  WRITE 23639 fe:00:7 0 EOF", "fe:00:7", 201));
        assert!(!lock_line_covers("pos:\t0", "fe:00:7", 0));
    }

    #[test]
    fn the_policy_is_parsed_by_qemus_names() {
        assert_eq!("auto".parse(), Ok(Locking::Auto));
        assert_eq!("off".parse(), Ok(Locking::Off));
        assert!("yes".parse::<Locking>().is_err());
        assert_eq!(Locking::Off.resolve(), None);
        assert!(has_ofd_locks(), "Linux 3.15 and later");
        assert_eq!(Locking::Auto.resolve(), Some(LockKind::Ofd));
    }
}
