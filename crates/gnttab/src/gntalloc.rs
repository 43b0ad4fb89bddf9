//! [`Gntalloc`]: one open of Linux's `/dev/xen/gntalloc`
//! (`drivers/xen/gntalloc.c`), the frontend side of grant tables: allocate
//! pages in this domain and grant another domain access to them.
//!
//! `IOCTL_GNTALLOC_ALLOC_GREF` allocates the pages, grants them and returns
//! the grant references and a range of the device's file offsets (`index`);
//! `mmap` of that range gives this process the pages. Releasing is
//! `munmap` plus `IOCTL_GNTALLOC_DEALLOC_GREF`, which the [`GrantMapping`]
//! does when dropped; the kernel frees a page, and ends its grant, only once
//! the other domain has unmapped it too.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::{Arc, PoisonError};

use crate::abi::*;
use crate::gntdev::UnmapNotify;
use crate::mapper::{DomId, Error, GrantRef, Result, PAGE_SIZE};
use crate::mapping::{GrantMapping, Unmap};
use crate::sys::{index_of, op, DeviceFd, Registry};

/// Where Linux puts the grant-allocation device.
pub const GNTALLOC_PATH: &str = "/dev/xen/gntalloc";

/// One open of `/dev/xen/gntalloc`.
#[derive(Debug)]
pub struct Gntalloc {
    dev: Arc<DeviceFd>,
    live: Registry,
}

/// Releases shared pages: `munmap`, then `IOCTL_GNTALLOC_DEALLOC_GREF`.
struct GntallocUnmap {
    dev: Arc<DeviceFd>,
    live: Registry,
    index: u64,
    count: u32,
}

impl GntallocUnmap {
    fn dealloc(&self) {
        let mut arg = IoctlGntallocDeallocGref { index: self.index, count: self.count, _pad: 0 };
        if let Err(e) = self.dev.ioctl(IOCTL_GNTALLOC_DEALLOC_GREF, &mut arg) {
            log::warn!("{}: IOCTL_GNTALLOC_DEALLOC_GREF of index {:#x} failed: {e}", self.dev.name(), self.index);
        }
    }
}

impl Unmap for GntallocUnmap {
    fn unmap(&mut self, addr: NonNull<u8>, len: usize) {
        self.live.lock().unwrap_or_else(PoisonError::into_inner).remove(&(addr.as_ptr() as usize));
        // SAFETY: `addr`/`len` is the mapping `Gntalloc::share` made; this
        // runs once, from the GrantMapping's Drop, when nothing can reach it.
        if let Err(e) = unsafe { DeviceFd::munmap(addr, len) } {
            log::warn!("{}: munmap of shared pages failed: {e}", self.dev.name());
        }
        self.dealloc();
    }
}

impl Gntalloc {
    /// Opens [`GNTALLOC_PATH`].
    pub fn open() -> Result<Self> {
        Self::open_path(GNTALLOC_PATH)
    }

    /// Opens the gntalloc device at `path`.
    pub fn open_path(path: impl AsRef<Path>) -> Result<Self> {
        Ok(Gntalloc { dev: Arc::new(DeviceFd::open(path.as_ref(), GNTALLOC_PATH)?), live: Registry::default() })
    }

    /// Allocates `pages` zeroed pages, grants them to `domid` (read-write if
    /// `writable`, else read-only) and maps them here, always writable.
    /// Returns the mapping and one grant reference per page, in order.
    pub fn share(&self, domid: DomId, pages: usize, writable: bool) -> Result<(GrantMapping, Vec<GrantRef>)> {
        if pages == 0 {
            return Err(Error::InvalidArgument("no pages to share"));
        }
        let count = u32::try_from(pages).map_err(|_| Error::InvalidArgument("too many pages"))?;
        let len = pages.checked_mul(PAGE_SIZE).ok_or(Error::InvalidArgument("too many pages"))?;
        let flags = if writable { GNTALLOC_FLAG_WRITABLE } else { 0 };
        let (index, ids) = self.dev.alloc_gref(domid, flags, count).map_err(op("IOCTL_GNTALLOC_ALLOC_GREF"))?;
        let unmap = GntallocUnmap { dev: self.dev.clone(), live: self.live.clone(), index, count };
        let addr = match self.dev.mmap(len, index, true) {
            Ok(addr) => addr,
            Err(e) => {
                unmap.dealloc();
                return Err(op("mmap")(e));
            }
        };
        self.live.lock().unwrap_or_else(PoisonError::into_inner).insert(addr.as_ptr() as usize, (index, count));
        // SAFETY: `addr` is a fresh read-write mapping of `len` bytes,
        // released only by `unmap`.
        let mapping = unsafe { GrantMapping::from_raw(addr, len, true, Box::new(unmap)) };
        Ok((mapping, ids.into_iter().map(GrantRef).collect()))
    }

    /// `IOCTL_GNTALLOC_SET_UNMAP_NOTIFY` for the page holding byte `offset`
    /// of `mapping` (made by this handle): when the page is finally released,
    /// the kernel zeroes that byte and/or notifies the event channel, so the
    /// other domain learns that this side went away.
    pub fn set_unmap_notify(&self, mapping: &GrantMapping, offset: usize, notify: UnmapNotify) -> Result<()> {
        let (action, event_channel_port) = notify.raw();
        let mut arg =
            IoctlGntallocUnmapNotify { index: index_of(&self.live, mapping, offset)?, action, event_channel_port };
        self.dev
            .ioctl(IOCTL_GNTALLOC_SET_UNMAP_NOTIFY, &mut arg)
            .map(drop)
            .map_err(op("IOCTL_GNTALLOC_SET_UNMAP_NOTIFY"))
    }
}

impl AsFd for Gntalloc {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.dev.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_of_a_missing_device_names_the_path() {
        let err = Gntalloc::open_path("/nonexistent/xen/gntalloc").unwrap_err();
        assert!(matches!(&err, Error::Open { path, .. } if path == "/nonexistent/xen/gntalloc"), "{err:?}");
        assert_eq!(err.to_string(), "Cannot open /nonexistent/xen/gntalloc");
    }

    #[test]
    fn share_failure_names_the_ioctl() {
        let dev = Gntalloc::open_path("/dev/null").unwrap();
        let err = dev.share(0, 2, true).unwrap_err();
        assert!(matches!(&err, Error::Op { op: "IOCTL_GNTALLOC_ALLOC_GREF", .. }), "{err:?}");
        assert!(matches!(dev.share(0, 0, true), Err(Error::InvalidArgument(_))));
        assert!(dev.live.lock().unwrap().is_empty());
    }

    #[test]
    fn unmap_notify_refuses_mappings_of_other_devices() {
        let dev = Gntalloc::open_path("/dev/null").unwrap();
        let anon = GrantMapping::anonymous(PAGE_SIZE).unwrap();
        let err = dev.set_unmap_notify(&anon, 0, UnmapNotify { clear_byte: true, event: None }).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)));
    }
}
