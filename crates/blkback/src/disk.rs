//! The storage behind a virtual disk: a raw file or a block device, opened
//! with `O_DIRECT` where the target supports it.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{fallocate, FallocateFlags};
use nix::sys::ioctl::ioctl_num_type;

use crate::format::DiskImage;
use crate::mapped::MappedIo;

/// `#define BLKGETSIZE64 _IOR(0x12,114,size_t)` (`linux/fs.h`).
const BLKGETSIZE64: u64 = nix::request_code_read!(0x12, 114, core::mem::size_of::<usize>()) as u64;
/// `#define BLKSSZGET _IO(0x12,104)`: logical sector size (int).
const BLKSSZGET: ioctl_num_type = nix::request_code_none!(0x12, 104);
/// `#define BLKPBSZGET _IO(0x12,123)`: physical sector size (unsigned int).
const BLKPBSZGET: ioctl_num_type = nix::request_code_none!(0x12, 123);
/// `#define BLKDISCARD _IO(0x12,119)`: `uint64_t range[2]` = {start, len}.
const BLKDISCARD: ioctl_num_type = nix::request_code_none!(0x12, 119);
/// `#define BLKSECDISCARD _IO(0x12,125)`.
const BLKSECDISCARD: ioctl_num_type = nix::request_code_none!(0x12, 125);

/// Errors of opening or using a disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The path could not be opened.
    #[error("Cannot open {path}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Neither a regular file nor a block device.
    #[error("{0} is neither a regular file nor a block device")]
    NotADisk(PathBuf),
    /// An ioctl or fstat on the disk failed.
    #[error("{op} on {path} failed")]
    Probe {
        /// Which query.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// What kind of target backs the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskKind {
    /// A regular file.
    File,
    /// A block device.
    BlockDevice,
}

/// An open disk and what the frontend is told about it.
#[derive(Debug)]
pub struct Disk {
    file: File,
    path: PathBuf,
    kind: DiskKind,
    size: u64,
    logical_sector: u32,
    physical_sector: u32,
    read_only: bool,
    direct: bool,
    discard: bool,
}

/// Whether the block device `rdev` accepts discards: its queue's
/// `discard_max_bytes` is non-zero (Linux 6.1's brd, for one, has none).
fn block_device_discards(rdev: u64) -> bool {
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/queue/discard_max_bytes"))
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|max| max > 0)
}

/// Drops the clean page-cache pages of a file opened for direct writes.
/// A direct write that must not block (io_uring's first try, `IOCB_NOWAIT`)
/// fails with `EAGAIN` while any page of its range is cached (Linux's
/// `generic_file_direct_write` and iomap's direct write), and io_uring then
/// hands it to an io-wq worker, which in Linux before 6.4 runs the writes of
/// one regular file one at a time. An image that was just copied, created
/// or read through the cache (`qemu-img`, `dd`, a backup) keeps such pages
/// until memory is short. Advisory: a failure costs only speed.
fn drop_cached_pages(file: &File, path: &Path) {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
    if let Err(e) = posix_fadvise(file.as_raw_fd(), 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED) {
        log::debug!("{}: posix_fadvise(DONTNEED): {e}", path.display());
    }
}

/// Opens `path` for reading (and writing unless `read_only`), with
/// `O_DIRECT` if `direct` and the file system accepts it; whether it did.
pub(crate) fn open_file(path: &Path, read_only: bool, direct: bool) -> Result<(File, bool), DiskError> {
    let open = |flags: i32| {
        OpenOptions::new().read(true).write(!read_only).custom_flags(flags | nix::libc::O_CLOEXEC).open(path)
    };
    let opened = |r: std::io::Result<File>| r.map_err(|source| DiskError::Open { path: path.into(), source });
    if !direct {
        return Ok((opened(open(0))?, false));
    }
    match open(nix::libc::O_DIRECT) {
        Ok(f) => {
            if !read_only {
                drop_cached_pages(&f, path);
            }
            Ok((f, true))
        }
        Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
            log::info!("{}: O_DIRECT not supported, using the page cache", path.display());
            Ok((opened(open(0))?, false))
        }
        Err(source) => Err(DiskError::Open { path: path.into(), source }),
    }
}

impl Disk {
    /// Opens `path`, with `O_DIRECT` if `direct` and the target accepts it
    /// (tmpfs, for one, does not: the disk then falls back to the page cache).
    pub fn open(path: &Path, read_only: bool, direct: bool) -> Result<Disk, DiskError> {
        let (file, direct) = open_file(path, read_only, direct)?;
        let probe = |op, source| DiskError::Probe { op, path: path.into(), source };
        let meta = file.metadata().map_err(|e| probe("fstat", e))?;
        let ft = meta.file_type();
        let discard = if ft.is_block_device() {
            block_device_discards(std::os::unix::fs::MetadataExt::rdev(&meta))
        } else {
            true
        };
        let (kind, size, logical_sector, physical_sector) = if ft.is_file() {
            (DiskKind::File, meta.len(), 512, 4096)
        } else if ft.is_block_device() {
            let fd = file.as_raw_fd();
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 to the pointer, which is valid.
            let rc = unsafe { nix::libc::ioctl(fd, BLKGETSIZE64 as _, &mut size as *mut u64) };
            if rc < 0 {
                return Err(probe("BLKGETSIZE64", std::io::Error::last_os_error()));
            }
            let mut lss: nix::libc::c_int = 0;
            // SAFETY: BLKSSZGET writes one int to the pointer, which is valid.
            let rc = unsafe { nix::libc::ioctl(fd, BLKSSZGET as _, &mut lss as *mut nix::libc::c_int) };
            if rc < 0 {
                return Err(probe("BLKSSZGET", std::io::Error::last_os_error()));
            }
            let mut pss: nix::libc::c_uint = 0;
            // SAFETY: BLKPBSZGET writes one unsigned int to the pointer, which is valid.
            let rc = unsafe { nix::libc::ioctl(fd, BLKPBSZGET as _, &mut pss as *mut nix::libc::c_uint) };
            let pss = if rc < 0 { lss as u32 } else { pss };
            (DiskKind::BlockDevice, size, lss as u32, pss)
        } else {
            return Err(DiskError::NotADisk(path.into()));
        };
        Ok(Disk { file, path: path.into(), kind, size, logical_sector, physical_sector, read_only, direct, discard })
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// File or block device.
    pub fn kind(&self) -> DiskKind {
        self.kind
    }

    /// Opened with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct
    }
}

impl DiskImage for Disk {
    /// Size in bytes.
    fn size(&self) -> u64 {
        self.size
    }

    /// Logical sector size (the `sector-size` node).
    fn logical_sector_size(&self) -> u32 {
        self.logical_sector
    }

    /// Physical sector size (the `physical-sector-size` node).
    fn physical_sector_size(&self) -> u32 {
        self.physical_sector
    }

    /// Opened read-only.
    fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Discard is offered: writable, and a file (holes are punched) or a
    /// block device whose queue accepts discards.
    fn supports_discard(&self) -> bool {
        self.discard && !self.read_only
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, offset)
    }

    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.file, buf, offset)
    }

    fn takes_mapped_pages(&self) -> bool {
        true
    }

    /// `preadv` into the guest's pages until all are filled.
    fn read_pages(&self, pages: &mut MappedIo, offset: u64) -> std::io::Result<()> {
        vectored(pages, offset, |iov, at| {
            // SAFETY: the iovecs point into guest pages mapped writable for
            // as long as `pages` lives (it outlives this call); the kernel
            // writes only within them; no Rust reference to them exists.
            unsafe { nix::libc::preadv(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as _, at as _) }
        })
    }

    /// `pwritev` from the guest's pages until all are written.
    fn write_pages(&self, pages: &mut MappedIo, offset: u64) -> std::io::Result<()> {
        vectored(pages, offset, |iov, at| {
            // SAFETY: the iovecs point into guest pages mapped for as long
            // as `pages` lives; the kernel only reads them.
            unsafe { nix::libc::pwritev(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as _, at as _) }
        })
    }

    /// Makes written data durable (`fdatasync`).
    fn flush(&self) -> std::io::Result<()> {
        nix::unistd::fdatasync(self.file.as_raw_fd()).map_err(std::io::Error::from)
    }

    /// Discards `len` bytes at `offset`: the range then reads as zeros on
    /// files (a punched hole) and as the device defines on block devices.
    fn discard(&self, offset: u64, len: u64, secure: bool) -> std::io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        match self.kind {
            DiskKind::File => fallocate(
                self.file.as_raw_fd(),
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                len as i64,
            )
            .map_err(std::io::Error::from),
            DiskKind::BlockDevice => {
                let range = [offset, len];
                let req = if secure { BLKSECDISCARD } else { BLKDISCARD };
                // SAFETY: BLKDISCARD/BLKSECDISCARD read two u64s from the pointer, which is valid.
                let rc = unsafe { nix::libc::ioctl(self.file.as_raw_fd(), req as _, range.as_ptr()) };
                if rc < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// Runs `op` (`preadv` or `pwritev`) over what is left of `pages` until
/// all of it is transferred; a transfer of nothing is the end of the disk.
fn vectored(pages: &mut MappedIo, offset: u64, op: impl Fn(&[nix::libc::iovec], u64) -> isize) -> std::io::Result<()> {
    let mut done = 0;
    while done < pages.len() {
        // At most IOV_MAX (1024) iovecs: a request has at most 256 segments.
        match op(pages.remainder(done), offset + done as u64) {
            n if n < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            0 => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "short transfer at end of disk")),
            n => done += n as usize,
        }
    }
    Ok(())
}

impl AsFd for Disk {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_disk(len: u64) -> PathBuf {
        let p = std::env::temp_dir().join(format!("blkback-disk-{}-{}", std::process::id(), len));
        let f = File::create(&p).unwrap();
        f.set_len(len).unwrap();
        p
    }

    #[test]
    fn file_disk_reports_size_in_sectors_and_round_trips_data() {
        let p = temp_disk(1 << 20);
        let d = Disk::open(&p, false, true).unwrap();
        assert_eq!((d.kind(), d.sectors(), d.logical_sector_size()), (DiskKind::File, 2048, 512));
        // O_DIRECT needs aligned buffers: the engine always uses AlignedBuf.
        let mut data = crate::buffer::AlignedBuf::new(512);
        data.set_len(512);
        data.fill(7);
        d.write_at(&data, 4096).unwrap();
        let mut buf = crate::buffer::AlignedBuf::new(512);
        buf.set_len(512);
        d.read_at(&mut buf, 4096).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        d.flush().unwrap();
        std::fs::remove_file(p).unwrap();
    }

    /// Whether the page at `offset` of `file` is in the page cache: a
    /// buffered read that must not block fails with `EAGAIN` otherwise.
    fn page_is_cached(file: &File, offset: i64) -> bool {
        let mut byte = [0u8; 1];
        let iov = nix::libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
        // SAFETY: one iovec over a live 1-byte buffer; the fd is open.
        let n = unsafe { nix::libc::preadv2(file.as_raw_fd(), &iov, 1, offset, nix::libc::RWF_NOWAIT) };
        n == 1
    }

    #[test]
    fn a_writable_direct_open_drops_the_files_cached_pages() {
        // Where the file system takes O_DIRECT (tmpfs does not): /var/tmp
        // is on disk where /tmp may be tmpfs.
        let p = PathBuf::from("/var/tmp").join(format!("blkback-cached-{}", std::process::id()));
        std::fs::write(&p, vec![5u8; 64 << 10]).unwrap();
        let cached = File::open(&p).unwrap();
        cached.sync_all().unwrap();
        let mut all = Vec::new();
        std::io::Read::read_to_end(&mut &cached, &mut all).unwrap();
        assert!(page_is_cached(&cached, 0), "a page just read is cached");
        let (_ro, ro_direct) = open_file(&p, true, true).unwrap();
        if ro_direct {
            assert!(page_is_cached(&cached, 0), "a read-only open leaves the cache alone");
        }
        let (_rw, direct) = open_file(&p, false, true).unwrap();
        if direct {
            assert!(!page_is_cached(&cached, 0) && !page_is_cached(&cached, 32 << 10));
        }
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn discard_punches_a_hole_that_reads_zeros() {
        let p = temp_disk(1 << 16);
        let d = Disk::open(&p, false, false).unwrap();
        d.write_at(&[0xaa; 8192], 0).unwrap();
        d.discard(0, 4096, false).unwrap();
        let mut buf = [1u8; 8192];
        d.read_at(&mut buf, 0).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..].iter().all(|&b| b == 0xaa));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn discard_is_offered_on_writable_files_and_only_where_a_block_queue_takes_it() {
        let p = temp_disk(3 << 12);
        assert!(Disk::open(&p, false, false).unwrap().supports_discard());
        assert!(!Disk::open(&p, true, false).unwrap().supports_discard());
        std::fs::remove_file(p).unwrap();
        // No such device (major 0, minor 0 has no queue in sysfs): no discard.
        assert!(!block_device_discards(0));
    }

    #[test]
    fn read_only_disk_refuses_writes_and_missing_path_is_a_clear_error() {
        let p = temp_disk(4096);
        let d = Disk::open(&p, true, false).unwrap();
        assert!(d.write_at(&[0; 512], 0).is_err());
        std::fs::remove_file(&p).unwrap();
        let err = Disk::open(&p, true, false).unwrap_err();
        assert!(err.to_string().contains("Cannot open"), "{err}");
        assert!(matches!(Disk::open(Path::new("/dev/null"), true, false), Err(DiskError::NotADisk(_))));
    }
}
