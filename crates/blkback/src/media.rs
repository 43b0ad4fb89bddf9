//! A drive with removable media (`device-type = cdrom`, or `removable =
//! 1`): the medium in it can be taken out and another put in while the
//! guest is connected, as `xl cd-eject` / `xl cd-insert` do by rewriting
//! `params` (docs/blkback.md, Removable media).
//!
//! The I/O engine takes the medium in the drive when a request is
//! submitted ([`Drive::medium`]), so a request in flight at a change ends
//! on the medium it started on; the old image closes (and its locks go)
//! once its last request is done. An empty drive has no size and fails
//! every request.

use std::sync::{Arc, RwLock};

use crate::format::{DiskImage, OpenImage};

/// Requests of a removable drive are checked against this many sectors
/// when parsed (the medium may change after that) and against the medium's
/// size when they start: 2^41 sectors, 1 PiB, so that a byte offset never
/// overflows.
pub const MAX_MEDIUM_SECTORS: u64 = 1 << 41;

/// A drive and the medium in it.
pub struct Drive {
    medium: RwLock<Option<OpenImage>>,
    read_only: bool,
}

impl std::fmt::Debug for Drive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drive").field("medium", &*self.slot()).field("read_only", &self.read_only).finish()
    }
}

impl Drive {
    /// A drive holding `medium` (or empty), read-only if `read_only`.
    pub fn new(medium: Option<OpenImage>, read_only: bool) -> Arc<Drive> {
        Arc::new(Drive { medium: RwLock::new(medium), read_only })
    }

    fn slot(&self) -> std::sync::RwLockReadGuard<'_, Option<OpenImage>> {
        self.medium.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The medium in the drive now, for one request.
    pub fn medium(&self) -> Option<Arc<dyn DiskImage>> {
        self.slot().as_ref().map(OpenImage::image)
    }

    /// Whether a medium is in the drive.
    pub fn is_loaded(&self) -> bool {
        self.slot().is_some()
    }

    /// Whether the medium in it was opened with `O_DIRECT` (`None`: empty).
    pub fn is_direct(&self) -> Option<bool> {
        self.slot().as_ref().map(OpenImage::is_direct)
    }

    /// Puts `medium` in (or nothing) and gives back the one taken out; it
    /// closes once the caller and the requests still on it let it go.
    pub fn replace(&self, medium: Option<OpenImage>) -> Option<OpenImage> {
        let mut slot = self.medium.write().unwrap_or_else(|p| p.into_inner());
        std::mem::replace(&mut *slot, medium)
    }
}

fn no_medium() -> std::io::Error {
    std::io::Error::from_raw_os_error(nix::libc::ENOMEDIUM)
}

/// The drive as the xenstore nodes see it: the medium's size and sector
/// sizes (0 and 512 when empty); I/O goes to the medium in it at the call.
impl DiskImage for Drive {
    fn size(&self) -> u64 {
        self.medium().map_or(0, |m| m.size())
    }

    fn logical_sector_size(&self) -> u32 {
        self.medium().map_or(512, |m| m.logical_sector_size())
    }

    fn physical_sector_size(&self) -> u32 {
        self.medium().map_or(512, |m| m.physical_sector_size())
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Never: `feature-discard` is written once, for every medium to come.
    fn supports_discard(&self) -> bool {
        false
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.medium().ok_or_else(no_medium)?.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.medium().ok_or_else(no_medium)?.write_at(buf, offset)
    }

    fn flush(&self) -> std::io::Result<()> {
        self.medium().ok_or_else(no_medium)?.flush()
    }

    fn discard(&self, _offset: u64, _len: u64, _secure: bool) -> std::io::Result<()> {
        Err(std::io::Error::from_raw_os_error(nix::libc::EOPNOTSUPP))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::ImageFormat;

    fn medium(name: &str, bytes: &[u8]) -> (OpenImage, std::path::PathBuf) {
        let p = std::env::temp_dir().join(format!("blkback-media-{}-{name}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        (OpenImage::open(&p, ImageFormat::Raw, true, false, None).unwrap(), p)
    }

    #[test]
    fn an_empty_drive_has_no_size_and_fails_io_with_no_medium() {
        let drive = Drive::new(None, true);
        assert_eq!((drive.size(), drive.logical_sector_size(), drive.is_loaded()), (0, 512, false));
        let e = drive.read_at(&mut [0; 512], 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(nix::libc::ENOMEDIUM));
    }

    #[test]
    fn a_request_keeps_the_medium_it_started_on_across_a_change() {
        let (a, pa) = medium("a", &[1; 4096]);
        let (b, pb) = medium("b", &[2; 8192]);
        let drive = Drive::new(Some(a), true);
        let started = drive.medium().unwrap();
        let old = drive.replace(Some(b));
        assert!(old.is_some());
        let mut buf = [0; 512];
        started.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [1; 512], "the request in flight reads the old medium");
        drive.read_at(&mut buf, 0).unwrap();
        assert_eq!((buf, drive.size()), ([2; 512], 8192), "new requests read the new one");
        std::fs::remove_file(pa).unwrap();
        std::fs::remove_file(pb).unwrap();
    }
}
