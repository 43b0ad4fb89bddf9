//! Image formats under the I/O engines: a virtual disk's bytes as the guest
//! sees them ([`DiskImage`]), held in a raw file or block device
//! ([`Disk`]) or in a qcow2 image ([`Qcow2Image`]). The engines run on the
//! trait, so multi-queue, indirect requests, flush and discard work the same
//! on every format.
//!
//! The format is what the toolstack says (`params`' prefix, the `format`
//! node; `config.rs`), never what the file's first bytes look like: a guest
//! can write a qcow2 header into its raw disk.

use std::path::Path;
use std::sync::Arc;

use crate::disk::{Disk, DiskError};
use crate::lock::{lock_image, ImageLocks, LockError, LockKind};
use crate::mapped::MappedIo;
use crate::qcow2::{Qcow2Error, Qcow2Image};

/// A virtual disk's bytes, as the I/O engines read and write them. All
/// methods may be called from several threads at once.
pub trait DiskImage: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Size in 512-byte sectors (blkif's unit; the `sectors` node).
    fn sectors(&self) -> u64 {
        self.size() / 512
    }

    /// Logical sector size (the `sector-size` node).
    fn logical_sector_size(&self) -> u32;

    /// Physical sector size (the `physical-sector-size` node).
    fn physical_sector_size(&self) -> u32;

    /// Opened read-only.
    fn is_read_only(&self) -> bool;

    /// Discard can be offered.
    fn supports_discard(&self) -> bool;

    /// The unit discards free storage in (the `discard-granularity` node).
    fn discard_granularity(&self) -> u32 {
        self.logical_sector_size()
    }

    /// Reads exactly `buf.len()` bytes at `offset`; a range past the end is
    /// an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;

    /// Writes all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()>;

    /// Whether [`DiskImage::read_pages`] and [`DiskImage::write_pages`]
    /// work (raw disks: the guest's pages go to the kernel as they are).
    fn takes_mapped_pages(&self) -> bool {
        false
    }

    /// Reads exactly `pages.len()` bytes at `offset` into mapped guest pages.
    fn read_pages(&self, _pages: &mut MappedIo, _offset: u64) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(nix::libc::EOPNOTSUPP))
    }

    /// Writes all of mapped guest pages at `offset`.
    fn write_pages(&self, _pages: &mut MappedIo, _offset: u64) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(nix::libc::EOPNOTSUPP))
    }

    /// Makes every completed write durable, data and metadata.
    fn flush(&self) -> std::io::Result<()>;

    /// Discards `len` bytes at `offset`; the range then reads as zeros
    /// (files and images) or as the device defines (block devices).
    fn discard(&self, offset: u64, len: u64, secure: bool) -> std::io::Result<()>;
}

/// How a disk's bytes are laid out in its file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageFormat {
    /// The file or block device is the disk.
    Raw,
    /// QEMU's qcow2, versions 2 and 3, with backing files.
    Qcow2,
}

impl ImageFormat {
    /// The name libxl and QEMU use.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// Errors of opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The raw file or block device.
    #[error("Raw disk")]
    Raw(#[source] DiskError),
    /// The qcow2 image or its backing chain.
    #[error("qcow2 image")]
    Qcow2(#[source] Qcow2Error),
    /// The raw file or block device is in use by another program.
    #[error("Raw disk in use")]
    Lock(#[source] LockError),
}

/// An open image, by format: the I/O engines take it as a [`DiskImage`];
/// io_uring needs the raw file itself, or a qcow2 image for its mapping of
/// data clusters.
#[derive(Clone)]
pub enum OpenImage {
    /// A raw file or block device.
    Raw(Arc<Disk>),
    /// A qcow2 image and its backing chain.
    Qcow2(Arc<Qcow2Image>),
}

impl std::fmt::Debug for OpenImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenImage::Raw(d) => f.debug_tuple("Raw").field(&d.path()).finish(),
            OpenImage::Qcow2(q) => f.debug_tuple("Qcow2").field(&q.path()).finish(),
        }
    }
}

impl OpenImage {
    /// Opens `path` as `format`: read-only if `read_only` (backing files
    /// always are), with `O_DIRECT` if `direct` and the file system takes it,
    /// and with QEMU's locks of a guest's disk (and of backing files) where
    /// `lock` says which ([`crate::lock`]). A file another program uses in
    /// a way ours excludes is refused.
    pub fn open(
        path: &Path,
        format: ImageFormat,
        read_only: bool,
        direct: bool,
        lock: Option<LockKind>,
    ) -> Result<OpenImage, ImageError> {
        Ok(match format {
            ImageFormat::Raw => {
                let disk = Disk::open(path, read_only, direct).map_err(ImageError::Raw)?;
                if let Some(kind) = lock {
                    let locks = ImageLocks::guest_disk(ImageFormat::Raw, !read_only);
                    lock_image(std::os::fd::AsFd::as_fd(&disk), path, locks, kind).map_err(ImageError::Lock)?;
                }
                OpenImage::Raw(Arc::new(disk))
            }
            ImageFormat::Qcow2 => OpenImage::Qcow2(Arc::new(
                Qcow2Image::open_locked(path, read_only, direct, lock).map_err(ImageError::Qcow2)?,
            )),
        })
    }

    /// Its format.
    pub fn format(&self) -> ImageFormat {
        match self {
            OpenImage::Raw(_) => ImageFormat::Raw,
            OpenImage::Qcow2(_) => ImageFormat::Qcow2,
        }
    }

    /// The image, for the thread-pool engine and the xenstore nodes.
    pub fn image(&self) -> Arc<dyn DiskImage> {
        match self {
            OpenImage::Raw(d) => d.clone(),
            OpenImage::Qcow2(q) => q.clone(),
        }
    }

    /// Whether it was opened with `O_DIRECT` (asked for, and the file
    /// system takes it).
    pub fn is_direct(&self) -> bool {
        match self {
            OpenImage::Raw(d) => d.is_direct(),
            OpenImage::Qcow2(q) => q.is_direct(),
        }
    }

    /// The raw file or block device, for the io_uring engine; `None` for
    /// formats whose layout needs the format layer between guest and file.
    pub fn raw(&self) -> Option<&Arc<Disk>> {
        match self {
            OpenImage::Raw(d) => Some(d),
            OpenImage::Qcow2(_) => None,
        }
    }
}
