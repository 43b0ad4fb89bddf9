//! [`Gntdev`]: one open of Linux's `/dev/xen/gntdev` (`drivers/xen/gntdev.c`),
//! the backend side of grant tables: map other domains' grants into this
//! process, and copy to and from them.
//!
//! Mapping is two steps: `IOCTL_GNTDEV_MAP_GRANT_REF` reserves a range of the
//! device's file offsets for the refs and returns its start (`index`), then
//! `mmap` of that range asks Xen to map them, read-only when the `mmap` lacks
//! `PROT_WRITE`. Releasing is `munmap` plus `IOCTL_GNTDEV_UNMAP_GRANT_REF`,
//! which the [`GrantMapping`] does when dropped.
//!
//! Copying uses `IOCTL_GNTDEV_GRANT_COPY` where the kernel has it, which [`Gntdev::open`] finds out once by issuing an empty
//! copy; otherwise [`copy_by_mapping`] maps, copies and unmaps.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::{Arc, PoisonError};

use nix::errno::Errno;

use crate::abi::{self, *};
use crate::compat_copy::copy_by_mapping;
use crate::mapper::{check_segment, CopySegment, DomId, Error, GrantMapper, GrantRef, GrantStatus, Result, PAGE_SIZE};
use crate::mapping::{GrantMapping, Unmap};
use crate::sys::{index_of, op, DeviceFd, Registry};

/// Where Linux puts the grant-mapping device.
pub const GNTDEV_PATH: &str = "/dev/xen/gntdev";

/// How [`GrantMapper::copy`] is carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyMode {
    /// `IOCTL_GNTDEV_GRANT_COPY`: Xen copies, nothing is mapped.
    Kernel,
    /// Map each page, copy, unmap (the kernel lacks grant copy).
    Compat,
}

impl core::fmt::Display for CopyMode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            CopyMode::Kernel => "IOCTL_GNTDEV_GRANT_COPY",
            CopyMode::Compat => "map+copy+unmap fallback",
        })
    }
}

/// What the kernel does when the last mapping of a page goes away
/// (`IOCTL_GNTDEV_SET_UNMAP_NOTIFY`, `IOCTL_GNTALLOC_SET_UNMAP_NOTIFY`): how
/// the other end learns that this process died.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnmapNotify {
    /// `UNMAP_NOTIFY_CLEAR_BYTE`: zero the byte (writable mappings only).
    pub clear_byte: bool,
    /// `UNMAP_NOTIFY_SEND_EVENT`: notify this event-channel port, which must
    /// be bound in this process.
    pub event: Option<u32>,
}

impl UnmapNotify {
    /// The `action` and `event_channel_port` fields.
    pub(crate) fn raw(self) -> (u32, u32) {
        let mut action = 0;
        if self.clear_byte {
            action |= UNMAP_NOTIFY_CLEAR_BYTE;
        }
        if self.event.is_some() {
            action |= UNMAP_NOTIFY_SEND_EVENT;
        }
        (action, self.event.unwrap_or(0))
    }
}

/// One open of `/dev/xen/gntdev`.
#[derive(Debug)]
pub struct Gntdev {
    dev: Arc<DeviceFd>,
    copy_mode: CopyMode,
    live: Registry,
}

/// Releases a gntdev mapping: `munmap`, then `IOCTL_GNTDEV_UNMAP_GRANT_REF`.
struct GntdevUnmap {
    dev: Arc<DeviceFd>,
    live: Registry,
    index: u64,
    count: u32,
}

impl GntdevUnmap {
    fn release_index(&self) {
        let mut arg = IoctlGntdevUnmapGrantRef { index: self.index, count: self.count, pad: 0 };
        if let Err(e) = self.dev.ioctl(IOCTL_GNTDEV_UNMAP_GRANT_REF, &mut arg) {
            log::warn!("{}: IOCTL_GNTDEV_UNMAP_GRANT_REF of index {:#x} failed: {e}", self.dev.name(), self.index);
        }
    }
}

impl Unmap for GntdevUnmap {
    fn unmap(&mut self, addr: NonNull<u8>, len: usize) {
        self.live.lock().unwrap_or_else(PoisonError::into_inner).remove(&(addr.as_ptr() as usize));
        // SAFETY: `addr`/`len` is the mapping `Gntdev::map_refs` made; this
        // runs once, from the GrantMapping's Drop, when nothing can reach it.
        if let Err(e) = unsafe { DeviceFd::munmap(addr, len) } {
            log::warn!("{}: munmap of a grant mapping failed: {e}", self.dev.name());
        }
        self.release_index();
    }
}

impl Gntdev {
    /// Opens [`GNTDEV_PATH`].
    pub fn open() -> Result<Self> {
        Self::open_path(GNTDEV_PATH)
    }

    /// Opens the gntdev device at `path` and finds out whether it can copy.
    pub fn open_path(path: impl AsRef<Path>) -> Result<Self> {
        let dev = Arc::new(DeviceFd::open(path.as_ref(), GNTDEV_PATH)?);
        // SAFETY: no segments, so no addresses for the kernel to use.
        let copy_mode = match unsafe { dev.grant_copy(&mut []) } {
            Ok(()) => CopyMode::Kernel,
            Err(e) => {
                if !matches!(e, Errno::ENOTTY | Errno::EINVAL | Errno::ENOSYS) {
                    log::warn!("{GNTDEV_PATH}: probing IOCTL_GNTDEV_GRANT_COPY failed unexpectedly: {e}");
                }
                log::info!("{GNTDEV_PATH}: no IOCTL_GNTDEV_GRANT_COPY ({e}); copying by mapping");
                CopyMode::Compat
            }
        };
        Ok(Gntdev { dev, copy_mode, live: Registry::default() })
    }

    /// How copies are done.
    pub fn copy_mode(&self) -> CopyMode {
        self.copy_mode
    }

    /// Chooses how copies are done, e.g. to exercise the fallback; choosing
    /// [`CopyMode::Kernel`] where the kernel lacks it makes copies fail.
    pub fn set_copy_mode(&mut self, mode: CopyMode) {
        self.copy_mode = mode;
    }

    /// `IOCTL_GNTDEV_SET_MAX_GRANTS`. Current kernels no longer implement it
    /// and answer `ENOTTY` (their limit is gntdev's `limit` module parameter).
    pub fn set_max_grants(&self, count: u32) -> Result<()> {
        let mut arg = IoctlGntdevSetMaxGrants { count };
        self.dev.ioctl(IOCTL_GNTDEV_SET_MAX_GRANTS, &mut arg).map(drop).map_err(op("IOCTL_GNTDEV_SET_MAX_GRANTS"))
    }

    /// Maps `refs` (of any domains) as one contiguous range, read-only unless
    /// `writable`.
    pub fn map_refs(&self, refs: &[(DomId, GrantRef)], writable: bool) -> Result<GrantMapping> {
        if refs.is_empty() {
            return Err(Error::InvalidArgument("no grant references to map"));
        }
        let count = u32::try_from(refs.len()).map_err(|_| Error::InvalidArgument("too many grant references"))?;
        let len = refs.len().checked_mul(PAGE_SIZE).ok_or(Error::InvalidArgument("too many grant references"))?;
        let raw: Vec<IoctlGntdevGrantRef> =
            refs.iter().map(|&(domid, gref)| IoctlGntdevGrantRef { domid: domid.into(), gref: gref.0 }).collect();
        let index = self.dev.map_grant_ref(&raw).map_err(op("IOCTL_GNTDEV_MAP_GRANT_REF"))?;
        let unmap = GntdevUnmap { dev: self.dev.clone(), live: self.live.clone(), index, count };
        let addr = match self.dev.mmap(len, index, writable) {
            Ok(addr) => addr,
            Err(e) => {
                unmap.release_index();
                return Err(op("mmap")(e));
            }
        };
        self.live.lock().unwrap_or_else(PoisonError::into_inner).insert(addr.as_ptr() as usize, (index, count));
        // SAFETY: `addr` is a fresh mapping of `len` bytes, readable, and
        // writable if `writable`, released only by `unmap`.
        Ok(unsafe { GrantMapping::from_raw(addr, len, writable, Box::new(unmap)) })
    }

    /// `IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR`: the `mmap` offset and page count
    /// of the gntdev mapping starting at `addr`.
    pub fn offset_for_vaddr(&self, addr: *const u8) -> Result<(u64, u32)> {
        let mut arg = IoctlGntdevGetOffsetForVaddr { vaddr: addr as usize as u64, ..Default::default() };
        self.dev.ioctl(IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR, &mut arg).map_err(op("IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR"))?;
        Ok((arg.offset, arg.count))
    }

    /// `IOCTL_GNTDEV_SET_UNMAP_NOTIFY` for the page holding byte `offset` of
    /// `mapping` (made by this handle); with `clear_byte`, that byte is zeroed.
    pub fn set_unmap_notify(&self, mapping: &GrantMapping, offset: usize, notify: UnmapNotify) -> Result<()> {
        let (action, event_channel_port) = notify.raw();
        let mut arg =
            IoctlGntdevUnmapNotify { index: index_of(&self.live, mapping, offset)?, action, event_channel_port };
        self.dev.ioctl(IOCTL_GNTDEV_SET_UNMAP_NOTIFY, &mut arg).map(drop).map_err(op("IOCTL_GNTDEV_SET_UNMAP_NOTIFY"))
    }

    /// `IOCTL_GNTDEV_GRANT_COPY` of checked segments.
    fn kernel_copy(&self, segments: &mut [CopySegment<'_>], status: &mut [GrantStatus]) -> Result<()> {
        let mut raw: Vec<GntdevGrantCopySegment> = segments.iter_mut().map(raw_segment).collect();
        // SAFETY: every `virt` address is that of a segment's local slice,
        // of the segment's length (checked to fit a u16 page): shared for a
        // source, exclusively borrowed for a destination, both through
        // `segments`, which stays borrowed for the call.
        unsafe { self.dev.grant_copy(&mut raw) }.map_err(op("IOCTL_GNTDEV_GRANT_COPY"))?;
        for (st, r) in status.iter_mut().zip(&raw) {
            *st = GrantStatus::from_raw(r.status);
        }
        Ok(())
    }
}

/// The kernel's form of a segment (checked: its length fits a page).
fn raw_segment(seg: &mut CopySegment<'_>) -> GntdevGrantCopySegment {
    let len = seg.len() as u16;
    let guest = seg.guest();
    let foreign = GntdevGrantCopyPtr::foreign(GntdevGrantCopyForeign {
        gref: guest.gref.0,
        offset: guest.offset,
        domid: guest.domid,
    });
    let (source, dest, flags) = match seg {
        CopySegment::FromGuest { dst, .. } => {
            (foreign, GntdevGrantCopyPtr::virt(dst.as_mut_ptr() as usize), abi::GNTCOPY_SOURCE_GREF)
        }
        CopySegment::ToGuest { src, .. } => {
            (GntdevGrantCopyPtr::virt(src.as_ptr() as usize), foreign, abi::GNTCOPY_DEST_GREF)
        }
    };
    GntdevGrantCopySegment { source, dest, len, flags, status: GrantStatus::GeneralError.to_raw(), _pad: 0 }
}

impl GrantMapper for Gntdev {
    fn map(&self, domid: DomId, refs: &[GrantRef], writable: bool) -> Result<GrantMapping> {
        let refs: Vec<(DomId, GrantRef)> = refs.iter().map(|&r| (domid, r)).collect();
        self.map_refs(&refs, writable)
    }

    fn copy(&self, segments: &mut [CopySegment<'_>], status: &mut [GrantStatus]) -> Result<()> {
        if segments.len() != status.len() {
            return Err(Error::InvalidArgument("status and segments differ in length"));
        }
        segments.iter().try_for_each(check_segment)?;
        match self.copy_mode {
            CopyMode::Kernel => self.kernel_copy(segments, status),
            CopyMode::Compat => copy_by_mapping(|d, g, w| self.map_refs(&[(d, g)], w), segments, status),
        }
    }
}

impl AsFd for Gntdev {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.dev.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapper::GuestPage;

    #[test]
    fn open_of_a_missing_device_names_the_path() {
        let err = Gntdev::open_path("/nonexistent/xen/gntdev").unwrap_err();
        assert!(matches!(&err, Error::Open { path, .. } if path == "/nonexistent/xen/gntdev"), "{err:?}");
        assert_eq!(err.to_string(), "Cannot open /nonexistent/xen/gntdev");
    }

    #[test]
    fn a_device_without_grant_copy_falls_back_to_mapping() {
        // /dev/null answers every ioctl with ENOTTY, as a kernel without the copy ioctl does.
        let dev = Gntdev::open_path("/dev/null").unwrap();
        assert_eq!(dev.copy_mode(), CopyMode::Compat);
        let err = dev.set_max_grants(8).unwrap_err();
        assert_eq!(err.to_string(), "IOCTL_GNTDEV_SET_MAX_GRANTS failed");
    }

    #[test]
    fn map_failure_names_the_ioctl_and_leaves_nothing_registered() {
        let dev = Gntdev::open_path("/dev/null").unwrap();
        let err = dev.map(0, &[GrantRef(8)], true).unwrap_err();
        assert!(matches!(&err, Error::Op { op: "IOCTL_GNTDEV_MAP_GRANT_REF", .. }), "{err:?}");
        assert!(dev.live.lock().unwrap().is_empty());
        assert!(matches!(dev.map(0, &[], true), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn compat_copy_reports_unmappable_pages_per_segment() {
        let dev = Gntdev::open_path("/dev/null").unwrap();
        let src = [1u8; 4];
        let mut segs = [CopySegment::ToGuest { src: &src, dst: GuestPage { domid: 1, gref: GrantRef(9), offset: 0 } }];
        let mut st = [GrantStatus::Okay];
        dev.copy(&mut segs, &mut st).unwrap();
        assert_eq!(st, [GrantStatus::GeneralError]);
    }

    #[test]
    fn kernel_copy_failure_fails_the_batch() {
        let mut dev = Gntdev::open_path("/dev/null").unwrap();
        dev.set_copy_mode(CopyMode::Kernel);
        let mut dst = [0u8; 4];
        let mut segs =
            [CopySegment::FromGuest { src: GuestPage { domid: 1, gref: GrantRef(9), offset: 0 }, dst: &mut dst }];
        let err = dev.copy(&mut segs, &mut [GrantStatus::Okay]).unwrap_err();
        assert!(matches!(&err, Error::Op { op: "IOCTL_GNTDEV_GRANT_COPY", .. }), "{err:?}");
    }

    #[test]
    fn raw_segments_point_at_the_local_buffer_and_name_the_guest_page() {
        let mut buf = [0u8; 100];
        let addr = buf.as_ptr() as usize;
        let page = GuestPage { domid: 3, gref: GrantRef(77), offset: 12 };
        let from = raw_segment(&mut CopySegment::FromGuest { src: page, dst: &mut buf });
        let want_foreign = GntdevGrantCopyPtr::foreign(GntdevGrantCopyForeign { gref: 77, offset: 12, domid: 3 });
        assert_eq!((from.source, from.dest, from.len), (want_foreign, GntdevGrantCopyPtr::virt(addr), 100));
        assert_eq!(from.flags, GNTCOPY_SOURCE_GREF);
        let to = raw_segment(&mut CopySegment::ToGuest { src: &buf, dst: page });
        assert_eq!((to.source, to.dest, to.flags), (GntdevGrantCopyPtr::virt(addr), want_foreign, GNTCOPY_DEST_GREF));
    }

    #[test]
    fn unmap_notify_sets_the_action_bits_it_names() {
        assert_eq!(UnmapNotify::default().raw(), (0, 0));
        assert_eq!(UnmapNotify { clear_byte: true, event: None }.raw(), (UNMAP_NOTIFY_CLEAR_BYTE, 0));
        assert_eq!(
            UnmapNotify { clear_byte: true, event: Some(5) }.raw(),
            (UNMAP_NOTIFY_CLEAR_BYTE | UNMAP_NOTIFY_SEND_EVENT, 5)
        );
    }

    #[test]
    fn unmap_notify_refuses_mappings_of_other_devices() {
        let dev = Gntdev::open_path("/dev/null").unwrap();
        let anon = GrantMapping::anonymous(PAGE_SIZE).unwrap();
        assert!(matches!(dev.set_unmap_notify(&anon, 0, UnmapNotify::default()), Err(Error::InvalidArgument(_))));
        assert!(matches!(
            dev.set_unmap_notify(&anon, PAGE_SIZE, UnmapNotify::default()),
            Err(Error::InvalidArgument(_))
        ));
    }
}
