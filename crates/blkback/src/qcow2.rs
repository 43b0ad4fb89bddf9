//! qcow2 images through the `imago` crate (synchronous build, no async
//! runtime): versions 2 and 3, backing chains of raw or qcow2 images opened
//! read-only, zero and compressed clusters, discard that frees clusters.
//!
//! The backing chain is opened here, not by imago's implicit opener,
//! because imago probes a backing file's format when the header names none,
//! and a guest that once wrote to a raw disk which later became a backing
//! file could have planted a qcow2 header there (pointing, say, at a host
//! file as *its* backing file). A backing file without a format is refused,
//! as is an external data file.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{FormatAccess, ShallowMapping, StorageOpenOptions};

use crate::disk::{open_file, DiskError};
use crate::format::{DiskImage, ImageFormat};
use crate::lock::{lock_image, ImageLocks, LockError, LockKind};

/// Backing files below the top image at most. QEMU has no limit; a bound
/// stops a chain that loops back on itself.
pub const MAX_BACKING_CHAIN: usize = 16;

/// Errors of opening a qcow2 image or its backing chain.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// A file of the chain could not be opened.
    #[error("Cannot open a file of the image")]
    Open(#[source] DiskError),
    /// A file of the chain is in use by another program (its lock bytes).
    #[error("A file of the image is in use")]
    Lock(#[source] LockError),
    /// imago refused the image: not qcow2, dirty or corrupt (its
    /// incompatible feature bits), damaged metadata, an unknown feature.
    #[error("Cannot use {path} as qcow2")]
    Image {
        /// The image.
        path: PathBuf,
        /// imago's reason.
        #[source]
        source: std::io::Error,
    },
    /// The header names a backing file but no backing format.
    #[error("{image}: backing file {backing:?} has no format in the header, and formats are never guessed (qemu-img rebase -u -F raw|qcow2 sets it)")]
    BackingFormatMissing {
        /// The image whose header it is.
        image: PathBuf,
        /// The backing file name as written.
        backing: String,
    },
    /// The backing format is one we do not read.
    #[error("{image}: backing format {format:?} is not supported (raw and qcow2 are)")]
    BackingFormat {
        /// The image whose header it is.
        image: PathBuf,
        /// The format named.
        format: String,
    },
    /// The image keeps its data in a separate file.
    #[error("{0}: external data files are not supported")]
    ExternalDataFile(PathBuf),
    /// More backing files than [`MAX_BACKING_CHAIN`].
    #[error("{0}: backing chain longer than {MAX_BACKING_CHAIN} files")]
    ChainTooLong(PathBuf),
    /// imago panicked on the image's metadata (a bug of imago's, met with
    /// malformed images: fuzz/upstream/).
    #[error("{path}: the qcow2 layer failed on this image's metadata ({message})")]
    Panicked {
        /// The top image.
        path: PathBuf,
        /// The panic's message.
        message: String,
    },
}

/// A qcow2 image with its backing chain.
pub struct Qcow2Image {
    /// Discards need it exclusively (they may free clusters that a
    /// concurrent read or write has looked up); reads, writes and flushes
    /// share it, and so does looking up a [`DirectMapping`].
    image: RwLock<FormatAccess<ImagoFile>>,
    /// The top image's file, for I/O on its data clusters without imago.
    top_file: std::fs::File,
    /// Direct I/O that holds a cluster mapping: discards wait for none.
    leases: Arc<Leases>,
    /// Reads and writes that went to the top file directly, all told.
    direct_requests: AtomicU64,
    /// What the top file needs of a direct request's offset and length
    /// (imago's probed `req_align`: the `O_DIRECT` block size where it is
    /// open so); imago realigns the others, direct I/O cannot. `u64::MAX`
    /// (nothing direct) where buffers would need more than a page.
    direct_align: u64,
    /// The unit in which a write through imago and direct I/O must not
    /// share ground ([`Qcow2Image::io_range`]): a cluster (at least the
    /// realignment block).
    serial_unit: u64,
    path: PathBuf,
    backing_chain: Vec<PathBuf>,
    size: u64,
    /// The cluster size, where discard frees clusters (v3); `None` (v2):
    /// no discard.
    discard_granularity: Option<u32>,
    read_only: bool,
    /// The top image was opened with `O_DIRECT`.
    direct: bool,
}

impl Qcow2Image {
    /// Opens the qcow2 image at `path` (writable unless `read_only`) and
    /// its backing chain (read-only), with `O_DIRECT` where `direct` and
    /// the file system takes it.
    pub fn open(path: &Path, read_only: bool, direct: bool) -> Result<Qcow2Image, Qcow2Error> {
        Self::open_locked(path, read_only, direct, None)
    }

    /// As [`Qcow2Image::open`], taking QEMU's locks with `lock`: a guest
    /// disk's on the image, a backing file's on each backing file
    /// ([`ImageLocks`]).
    pub fn open_locked(
        path: &Path,
        read_only: bool,
        direct: bool,
        lock: Option<LockKind>,
    ) -> Result<Qcow2Image, Qcow2Error> {
        let mut backing_chain = Vec::new();
        // The device's init must fail, not the daemon's thread, on an image
        // that trips an assertion in imago (I/O runs under the engine's own
        // panic guard).
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let locks = lock.map(|kind| (kind, ImageLocks::guest_disk(ImageFormat::Qcow2, !read_only)));
            open_qcow2(path, !read_only, direct, locks, &mut backing_chain)
        }));
        let (top, top_file, direct) =
            opened.map_err(|p| Qcow2Error::Panicked { path: path.into(), message: panic_message(&*p) })??;
        let image = FormatAccess::new(top);
        let size = image.size();
        // Bounce buffers are page-aligned. imago's `mem_align` is not
        // applied to lengths: it probes 1 and then the page size only, so
        // it says 4096 where the kernel takes 512-byte multiples (the raw
        // path sends the same lengths from the same buffers).
        let direct_align = match image.mem_align() {
            mem if mem <= crate::buffer::BUFFER_ALIGN => image.req_align().max(1) as u64,
            _ => u64::MAX,
        };
        // v3 frees whole clusters (zero clusters), and writes zeros over
        // the rest of a range. v2 has no zero clusters, and imago refuses
        // to discard on it ("qcow2 version 3 required"): no discard offered.
        let discard_granularity = image.inner().zero_granularity().map(|g| g.min(u32::MAX.into()) as u32);
        // v2 images name no granularity here: the largest cluster stands in.
        let cluster = discard_granularity.map_or(MAX_CLUSTER, u64::from);
        let serial_unit = cluster.max(image.req_align().max(1) as u64);
        Ok(Qcow2Image {
            image: RwLock::new(image),
            top_file,
            leases: Arc::default(),
            direct_requests: AtomicU64::new(0),
            direct_align,
            serial_unit,
            path: path.into(),
            backing_chain,
            size,
            discard_granularity,
            read_only,
            direct,
        })
    }

    /// Whether the top image was opened with `O_DIRECT` (asked for, and the
    /// file system takes it).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The path of the top image.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The backing files, the top image's first.
    pub fn backing_chain(&self) -> &[PathBuf] {
        &self.backing_chain
    }

    /// Where the `len` bytes at guest `offset` lie in the top image's file,
    /// if they are one run of allocated data clusters that may be written
    /// in place (no copy on write, not a backing file's, not zero or
    /// compressed); `None` sends the request through imago. The mapping
    /// holds until the returned lease is dropped: discards wait for it.
    ///
    /// Never blocks on a discard (the caller is the ring worker, which
    /// must go on reaping the direct I/O the discard waits for): while one
    /// holds or waits for the image, the answer is `None`.
    pub fn map_direct(&self, offset: u64, len: u64, write: bool) -> Option<DirectMapping> {
        if len == 0
            || len % self.direct_align != 0
            || (write && self.read_only)
            || offset.checked_add(len).map_or(true, |end| end > self.size)
        {
            return None;
        }
        let image = match self.image.try_read() {
            Ok(image) => image,
            Err(TryLockError::WouldBlock | TryLockError::Poisoned(_)) => return None,
        };
        // Hostile metadata that trips imago fails the request on the
        // thread pool, under its panic guard, not on the ring worker.
        let looked_up = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // The top layer only: data in a backing file is imago's to read.
            match image.get_shallow_mapping(offset, len) {
                Ok((ShallowMapping::Raw { offset: host_offset, writable: true, .. }, mapped)) if mapped >= len => {
                    Some(host_offset)
                }
                _ => None,
            }
        }));
        let host_offset = looked_up.ok().flatten().filter(|host| host % self.direct_align == 0)?;
        // Not beside a write through imago on the same clusters (it may
        // write back more than its own bytes); then imago takes this too.
        // Taken while the image is shared, so a discard that then takes it
        // exclusively sees this lease and waits for it.
        let lease = self.leases.take(self.io_range(offset, len))?;
        drop(image);
        self.direct_requests.fetch_add(1, Ordering::Relaxed);
        Some(DirectMapping { host_offset, lease })
    }

    /// The clusters `len` bytes at `offset` touch, as a byte range.
    fn io_range(&self, offset: u64, len: u64) -> (u64, u64) {
        let unit = self.serial_unit;
        (offset / unit * unit, offset.saturating_add(len).div_ceil(unit).saturating_mul(unit))
    }

    /// Reads and writes served on the top file directly so far
    /// ([`Qcow2Image::map_direct`]), one per engine operation (a request
    /// cut into parts counts each); for tests and `status`.
    pub fn direct_requests(&self) -> u64 {
        self.direct_requests.load(Ordering::Relaxed)
    }

    /// The top image's file, where [`DirectMapping::host_offset`] points.
    pub fn top_file(&self) -> BorrowedFd<'_> {
        self.top_file.as_fd()
    }

    fn shared(&self) -> std::io::Result<RwLockReadGuard<'_, FormatAccess<ImagoFile>>> {
        self.image.read().map_err(|_| poisoned())
    }

    fn exclusive(&self) -> std::io::Result<RwLockWriteGuard<'_, FormatAccess<ImagoFile>>> {
        self.image.write().map_err(|_| poisoned())
    }
}

/// The largest qcow2 cluster (2 MiB).
const MAX_CLUSTER: u64 = 2 << 20;

/// Direct I/O in flight on mapped clusters.
#[derive(Default)]
struct Leases {
    held: AtomicUsize,
    /// Paired with `released`, for a discard that waits.
    waiting: Mutex<()>,
    released: Condvar,
    /// The clusters of I/O in flight, direct and writes through imago.
    /// imago may write more of a cluster than a write's own bytes (copy on
    /// write, realignment), which would undo a direct write beside it in
    /// the same cluster (found by tests/blk_qcow2.rs, io_uring: one write
    /// in 6 lost): the two never overlap, as QEMU serialises such requests
    /// (`bdrv_make_request_serialising`).
    ranges: Mutex<Ranges>,
    /// Signalled when direct I/O ends, for a write through imago waiting.
    range_freed: Condvar,
}

#[derive(Default)]
struct Ranges {
    direct: Vec<(u64, u64)>,
    imago_writes: Vec<(u64, u64)>,
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

impl Leases {
    /// A lease on `range`, unless a write through imago is on it.
    fn take(self: &Arc<Self>, range: (u64, u64)) -> Option<MappingLease> {
        let mut ranges = self.ranges.lock().unwrap_or_else(|p| p.into_inner());
        if ranges.imago_writes.iter().any(|&w| overlaps(w, range)) {
            return None;
        }
        ranges.direct.push(range);
        self.held.fetch_add(1, Ordering::AcqRel);
        Some(MappingLease { leases: self.clone(), range })
    }

    /// Marks a write through imago on `range`, once no direct I/O is on it;
    /// no direct I/O starts there until the guard is dropped. Blocks (on
    /// an I/O thread) until the direct I/O in its way has completed.
    fn imago_write(self: &Arc<Self>, range: (u64, u64)) -> ImagoWrite {
        let mut ranges = self.ranges.lock().unwrap_or_else(|p| p.into_inner());
        // Marked first: direct I/O that would start meanwhile goes to imago.
        ranges.imago_writes.push(range);
        while ranges.direct.iter().any(|&d| overlaps(d, range)) {
            ranges = self.range_freed.wait(ranges).unwrap_or_else(|p| p.into_inner());
        }
        ImagoWrite { leases: self.clone(), range }
    }

    /// Until no lease is held. The caller holds the image exclusively, so
    /// no new one is taken meanwhile.
    fn wait_none(&self) {
        let mut guard = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        while self.held.load(Ordering::Acquire) > 0 {
            guard = self.released.wait(guard).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Keeps a [`DirectMapping`] valid: no cluster of the image is freed while
/// one is held, and no write through imago runs on its clusters. Dropped
/// when the direct I/O's completion is reaped.
pub struct MappingLease {
    leases: Arc<Leases>,
    range: (u64, u64),
}

impl Drop for MappingLease {
    fn drop(&mut self) {
        {
            let mut ranges = self.leases.ranges.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = ranges.direct.iter().position(|&d| d == self.range) {
                ranges.direct.swap_remove(i);
            }
            // Only a write through imago waits, and it is marked before it
            // waits (under this mutex): with none marked, no futex wake (a
            // system call per direct completion otherwise).
            if !ranges.imago_writes.is_empty() {
                self.leases.range_freed.notify_all();
            }
        }
        if self.leases.held.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Under the mutex, so a discard between its check and its wait
            // cannot miss this.
            let _guard = self.leases.waiting.lock().unwrap_or_else(|p| p.into_inner());
            self.leases.released.notify_all();
        }
    }
}

/// A write through imago in progress on a range ([`Leases::imago_write`]).
struct ImagoWrite {
    leases: Arc<Leases>,
    range: (u64, u64),
}

impl Drop for ImagoWrite {
    fn drop(&mut self) {
        let mut ranges = self.leases.ranges.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = ranges.imago_writes.iter().position(|&w| w == self.range) {
            ranges.imago_writes.swap_remove(i);
        }
    }
}

/// A request's range in the top image's file ([`Qcow2Image::map_direct`]).
pub struct DirectMapping {
    /// Where the guest offset lies in the top file.
    pub host_offset: u64,
    /// Held until the I/O on it has completed.
    pub lease: MappingLease,
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        // imago flushes on drop too, but reports a failure only through
        // `tracing`, which this build compiles out.
        if !self.read_only {
            if let Err(e) = self.flush() {
                log::error!("{}: flushing the image at close failed: {e}", self.path.display());
            }
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload.downcast_ref::<&str>().copied().or(payload.downcast_ref::<String>().map(String::as_str));
    text.unwrap_or("?").to_string()
}

/// An operation panicked inside the format layer: its metadata may be half
/// updated, so nothing more is done on the image.
fn poisoned() -> std::io::Error {
    std::io::Error::other("an earlier operation on the image panicked")
}

/// A backing file name as QEMU resolves it: relative to the directory of
/// the image that names it.
fn backing_path(image: &Path, name: &str) -> PathBuf {
    match image.parent() {
        Some(dir) if Path::new(name).is_relative() => dir.join(name),
        _ => PathBuf::from(name),
    }
}

/// `QCOW_EXT_MAGIC_BACKING_FORMAT` (QEMU's `block/qcow2.h`).
const BACKING_FORMAT_EXTENSION: u32 = 0xe279_2aca;
/// `QCOW2_EXT_MAGIC_FEATURE_TABLE`; its entries are 48 bytes each.
const FEATURE_TABLE_EXTENSION: u32 = 0x6803_f857;

/// Reads an image's header extensions before imago does, for what imago
/// 0.2.6 gets wrong: it reads none for version 2 (so the backing format of
/// a v2 image comes from here), and it panics on a feature name table that
/// is not whole entries (refused here). As QEMU's `qcow2_read_extensions`:
/// after the header (72 bytes in v2, `header_length` in v3), type and
/// length (big endian u32 each), the data padded to 8 bytes, a type of 0
/// ends them; within the first cluster, and in v2 before the backing file
/// name. A file that is not qcow2 yields nothing (imago refuses it).
fn read_extensions(path: &Path) -> std::io::Result<Option<String>> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path)?;
    let mut header = [0u8; 104];
    let len = file.read_at(&mut header, 0)?;
    let be32 = |b: &[u8]| u32::from_be_bytes(b[..4].try_into().expect("4 bytes"));
    let version = be32(&header[4..]);
    let cluster_bits = be32(&header[20..]);
    if len < 72 || &header[..4] != b"QFI\xfb" || !(9..=21).contains(&cluster_bits) {
        return Ok(None);
    }
    let start = match version {
        2 => 72,
        _ if len == 104 => u64::from(be32(&header[100..])),
        _ => return Ok(None),
    };
    let backing_name_offset = u64::from_be_bytes(header[8..16].try_into().expect("8 bytes"));
    // imago reads v3 extensions to the end of the first cluster whatever
    // the backing name's offset, so the feature table check looks as far;
    // a v2 backing format ends before the name, as in QEMU.
    let end = match (version, backing_name_offset) {
        (2, n) if n != 0 => n.min(1 << cluster_bits),
        _ => 1u64 << cluster_bits,
    };
    let mut offset = start;
    let mut backing_format = None;
    while offset + 8 <= end {
        let mut ext = [0u8; 8];
        file.read_exact_at(&mut ext, offset)?;
        let (kind, len) = (be32(&ext), u64::from(be32(&ext[4..])));
        offset += 8;
        if kind == 0 || offset + len > end {
            break;
        }
        match kind {
            BACKING_FORMAT_EXTENSION if version == 2 => {
                let mut name = vec![0u8; len as usize];
                file.read_exact_at(&mut name, offset)?;
                backing_format = Some(String::from_utf8_lossy(&name).into_owned());
            }
            FEATURE_TABLE_EXTENSION if len % 48 != 0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("feature name table of {len} bytes is not whole 48-byte entries"),
                ));
            }
            _ => {}
        }
        offset += len.next_multiple_of(8);
    }
    Ok(backing_format)
}

/// Opens one file of the chain for imago, locked with `locks` first (the
/// locks live as long as imago keeps the file open).
/// Also a duplicate of its descriptor (the same open file: its `O_DIRECT`
/// and its locks), through which the io_uring engine reaches the data
/// clusters imago maps (imago's `File` does not lend its descriptor).
fn storage(
    path: &Path,
    writable: bool,
    direct: bool,
    locks: Option<(LockKind, ImageLocks)>,
) -> Result<(ImagoFile, std::fs::File, bool), Qcow2Error> {
    let (file, direct) = open_file(path, !writable, direct).map_err(Qcow2Error::Open)?;
    if let Some((kind, locks)) = locks {
        lock_image(std::os::fd::AsFd::as_fd(&file), path, locks, kind).map_err(Qcow2Error::Lock)?;
    }
    let open_error = |source| Qcow2Error::Open(DiskError::Open { path: path.into(), source });
    let duplicate = file.try_clone().map_err(open_error)?;
    let options = StorageOpenOptions::new().filename(path).write(writable).direct(direct);
    let file =
        ImagoFile::from_open_file(file, options).map_err(|source| Qcow2Error::Image { path: path.into(), source })?;
    Ok((file, duplicate, direct))
}

/// Opens the qcow2 image at `path` and, below it, its backing chain; the
/// backing files opened are appended to `chain`. Also `path`'s own file
/// (a duplicate descriptor, [`storage`]) and whether it was opened with
/// `O_DIRECT`.
fn open_qcow2(
    path: &Path,
    writable: bool,
    direct: bool,
    locks: Option<(LockKind, ImageLocks)>,
    chain: &mut Vec<PathBuf>,
) -> Result<(Qcow2<ImagoFile>, std::fs::File, bool), Qcow2Error> {
    let refused = |source| Qcow2Error::Image { path: path.into(), source };
    let (file, own_file, opened_direct) = storage(path, writable, direct, locks)?;
    let v2_backing_format = read_extensions(path).map_err(refused)?;
    let mut image = Qcow2::<ImagoFile>::open_image(file, writable).map_err(refused)?;
    if image.requires_external_data_file() {
        return Err(Qcow2Error::ExternalDataFile(path.into()));
    }
    image.set_data_file(None);
    let backing = match image.implicit_backing_file() {
        None => None,
        Some(name) => {
            if chain.len() >= MAX_BACKING_CHAIN {
                return Err(Qcow2Error::ChainTooLong(path.into()));
            }
            let file = backing_path(path, name);
            let format = image.implicit_backing_format().cloned().or(v2_backing_format);
            chain.push(file.clone());
            let backing_locks = locks.map(|(kind, _)| (kind, ImageLocks::backing_file()));
            Some(match format.as_deref() {
                Some("qcow2") => FormatAccess::new(open_qcow2(&file, false, direct, backing_locks, chain)?.0),
                Some("raw") | Some("file") => {
                    let raw = Raw::open_image(storage(&file, false, direct, backing_locks)?.0, false)
                        .map_err(|source| Qcow2Error::Image { path: file.clone(), source })?;
                    FormatAccess::new(raw)
                }
                Some(other) => return Err(Qcow2Error::BackingFormat { image: path.into(), format: other.into() }),
                None => return Err(Qcow2Error::BackingFormatMissing { image: path.into(), backing: name.clone() }),
            })
        }
    };
    image.set_backing(backing);
    Ok((image, own_file, opened_direct))
}

impl DiskImage for Qcow2Image {
    fn size(&self) -> u64 {
        self.size
    }

    fn logical_sector_size(&self) -> u32 {
        512
    }

    fn physical_sector_size(&self) -> u32 {
        4096
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn supports_discard(&self) -> bool {
        !self.read_only && self.discard_granularity.is_some()
    }

    fn discard_granularity(&self) -> u32 {
        self.discard_granularity.unwrap_or(512)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        // imago fills a read past the end with zeros; a disk fails it.
        if offset.checked_add(buf.len() as u64).map_or(true, |end| end > self.size) {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read beyond the end of the image"));
        }
        self.shared()?.read(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let _clusters = self.leases.imago_write(self.io_range(offset, buf.len() as u64));
        self.shared()?.write(buf, offset)
    }

    fn flush(&self) -> std::io::Result<()> {
        // Cached metadata (L2 tables, refcount blocks, in imago's
        // dependency order) to the file, then the file to stable storage.
        let image = self.shared()?;
        image.flush()?;
        image.sync()
    }

    fn discard(&self, offset: u64, len: u64, _secure: bool) -> std::io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        // Reads zeros afterwards, as a raw file's punched hole does; whole
        // clusters are freed (v3: zero clusters where a backing file would
        // show through), the rest written with zeros. Freed clusters may be
        // allocated again at once, for another guest offset: direct I/O
        // still on them must end first (a stale write would land in the
        // new data).
        let mut image = self.exclusive()?;
        self.leases.wait_none();
        image.discard_to_zero(offset, len)
    }
}

impl Qcow2Image {
    /// Formats an empty qcow2 image of `size` bytes at `path` (v3, 64 KiB
    /// clusters, no backing file), replacing what was there; for benchmarks
    /// and tests that have no qemu-img.
    pub fn create(path: &Path, size: u64) -> Result<(), Qcow2Error> {
        use imago::FormatCreateBuilder;
        let image = |source| Qcow2Error::Image { path: path.into(), source };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|source| Qcow2Error::Open(DiskError::Open { path: path.into(), source }))?;
        let storage =
            ImagoFile::from_open_file(file, StorageOpenOptions::new().write(true).filename(path)).map_err(image)?;
        Qcow2::<ImagoFile>::create_builder(storage).size(size).create().map_err(image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("blkback-qcow2-{}-{name}", std::process::id()))
    }

    #[test]
    fn a_backing_name_is_relative_to_the_directory_of_the_image_naming_it() {
        assert_eq!(backing_path(Path::new("/img/top.qcow2"), "base.raw"), PathBuf::from("/img/base.raw"));
        assert_eq!(backing_path(Path::new("/img/top.qcow2"), "../b/base"), PathBuf::from("/img/../b/base"));
        assert_eq!(backing_path(Path::new("/img/top.qcow2"), "/abs/base"), PathBuf::from("/abs/base"));
        assert_eq!(backing_path(Path::new("top.qcow2"), "base"), PathBuf::from("base"));
    }

    #[test]
    fn an_image_made_here_round_trips_and_reports_its_clusters() {
        let p = temp("roundtrip");
        Qcow2Image::create(&p, 4 << 20).unwrap();
        let image = Qcow2Image::open(&p, false, true).unwrap();
        assert_eq!((image.sectors(), image.discard_granularity()), (8192, 65536));
        assert!(image.supports_discard() && image.backing_chain().is_empty());
        let data: Vec<u8> = (0..12288u32).map(|i| (i % 251) as u8).collect();
        image.write_at(&data, 65536 - 4096).unwrap();
        image.flush().unwrap();
        let mut back = vec![0; data.len()];
        image.read_at(&mut back, 65536 - 4096).unwrap();
        assert!(back == data);
        drop(image);
        let image = Qcow2Image::open(&p, true, false).unwrap();
        let mut back = vec![0; data.len()];
        image.read_at(&mut back, 65536 - 4096).unwrap();
        assert!(back == data, "durable across a reopen");
        assert!(image.write_at(&data, 0).is_err(), "read-only");
        assert!(!image.supports_discard());
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn a_ragged_feature_table_after_a_backing_name_offset_is_refused_not_a_panic() {
        // Found by the qcow2_image target: v3, 512-byte clusters, a backing
        // name offset of 1 (size 0), and at 104 a feature name table of 1
        // byte, which imago 0.2.6 reads (to the cluster's end) and panics on.
        let mut img = vec![0u8; 512];
        img[..4].copy_from_slice(b"QFI\xfb");
        img[4..8].copy_from_slice(&3u32.to_be_bytes());
        img[8..16].copy_from_slice(&1u64.to_be_bytes());
        img[20..24].copy_from_slice(&9u32.to_be_bytes());
        img[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        img[96..100].copy_from_slice(&4u32.to_be_bytes());
        img[100..104].copy_from_slice(&104u32.to_be_bytes());
        img[104..108].copy_from_slice(&FEATURE_TABLE_EXTENSION.to_be_bytes());
        img[108..112].copy_from_slice(&1u32.to_be_bytes());
        let p = temp("ragged-feature-table");
        std::fs::write(&p, &img).unwrap();
        for read_only in [true, false] {
            match Qcow2Image::open(&p, read_only, false) {
                Err(Qcow2Error::Image { source, .. }) => {
                    assert!(source.to_string().contains("feature name table"), "{source}")
                }
                Err(e) => panic!("refused for another reason: {e}"),
                Ok(_) => panic!("opened"),
            }
        }
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn a_write_without_a_refcount_block_for_the_header_fails_and_keeps_the_image() {
        // Refcount table entry 0 emptied: nothing says the header's cluster
        // is in use. imago 0.2.6 placed a refcount block for it at cluster
        // 0, over the header, which the table cannot reference (offset 0
        // is "none"), and then recursed allocating it until the stack
        // overflowed (fuzz/upstream/README.md); the patched imago refuses.
        let p = temp("headerless-refcounts");
        Qcow2Image::create(&p, 1 << 20).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let mut reftable_offset = [0u8; 8];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut reftable_offset, 48).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[0; 8], u64::from_be_bytes(reftable_offset)).unwrap();
        let before = std::fs::read(&p).unwrap();
        let image = Qcow2Image::open(&p, false, false).unwrap();

        let write = image.write_at(&[0x5a; 4096], 8192).expect_err("no cluster can be allocated");
        let discard = image.discard(0, 65536, false).expect_err("nor an L2 table for zero clusters");
        let flush = image.flush();
        drop(image);

        for e in [write, discard] {
            assert!(e.to_string().contains("no refcount block for the image header"), "{e}");
        }
        assert!(flush.is_ok(), "{flush:?}");
        assert!(std::fs::read(&p).unwrap() == before, "the image is unchanged");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn a_discard_in_a_disk_smaller_than_a_cluster_zeros_only_its_range() {
        // 40 KiB of disk in one 64 KiB cluster: imago 0.2.6 cut the zeroing
        // range to the disk size and then subtracted a cluster from it,
        // which overflowed (fuzz/upstream/README.md).
        let p = temp("small-discard");
        Qcow2Image::create(&p, 40 << 10).unwrap();
        let image = Qcow2Image::open(&p, false, false).unwrap();
        image.write_at(&[0x5a; 40 << 10], 0).unwrap();

        image.discard(0, 4096, false).unwrap();

        let mut back = vec![0xa5; 40 << 10];
        image.read_at(&mut back, 0).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0), "the discarded range reads zeros");
        assert!(back[4096..].iter().all(|&b| b == 0x5a), "the rest of the cluster is kept");
        drop(image);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn a_file_that_is_not_qcow2_is_refused_and_never_read_as_raw() {
        let p = temp("notqcow2");
        std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
        let e = Qcow2Image::open(&p, false, false).err().expect("refused");
        assert!(matches!(e, Qcow2Error::Image { .. }), "{e:?}");
        std::fs::remove_file(&p).unwrap();
        let e = Qcow2Image::open(&p, false, false).err().expect("refused");
        assert!(matches!(e, Qcow2Error::Open(_)), "{e:?}");
    }
}
