//! Grant copy without `IOCTL_GNTDEV_GRANT_COPY` (kernels before 4.7, or a
//! gntdev that refuses it): map each guest page, copy through the mapping's
//! volatile accessors, unmap. This is the fallback QEMU's `xen_disk` had.
//! The routine is generic over the map function, so it runs on gntdev
//! mappings in production and on any [`GrantMapping`] in tests.

use crate::mapper::{check_segment, CopySegment, DomId, Error, GrantRef, GrantStatus, Result};
use crate::mapping::GrantMapping;

/// A guest page and whether it is mapped writable.
type PageKey = (DomId, GrantRef, bool);

/// Copies every segment through a mapping of its guest page made by `map`
/// (`domid`, `gref`, `writable`), writing each one's result to `status`.
///
/// Like the kernel's grant copy, the batch is refused as a whole
/// ([`Error::BadSegment`]) if any segment is empty or crosses its page, and
/// nothing is copied then. A page that cannot be mapped fails only the
/// segments on it: with Xen's status where the error carries one
/// ([`Error::Map`]), otherwise `GNTST_general_error`. Consecutive segments on
/// the same page share one mapping.
pub fn copy_by_mapping<F>(mut map: F, segments: &mut [CopySegment<'_>], status: &mut [GrantStatus]) -> Result<()>
where
    F: FnMut(DomId, GrantRef, bool) -> Result<GrantMapping>,
{
    if segments.len() != status.len() {
        return Err(Error::InvalidArgument("status and segments differ in length"));
    }
    segments.iter().try_for_each(check_segment)?;
    let mut cached: Option<(PageKey, std::result::Result<GrantMapping, GrantStatus>)> = None;
    for (seg, st) in segments.iter_mut().zip(status.iter_mut()) {
        let guest = seg.guest();
        let key = (guest.domid, guest.gref, matches!(seg, CopySegment::ToGuest { .. }));
        if cached.as_ref().map(|(k, _)| *k) != Some(key) {
            // Unmap the previous page before mapping the next one.
            drop(cached.take());
            let mapped = map(key.0, key.1, key.2).map_err(|e| match e {
                Error::Map { status, .. } => status,
                other => {
                    log::debug!("Mapping grant {:?} of domain {} for a copy failed: {other}", key.1, key.0);
                    GrantStatus::GeneralError
                }
            });
            cached = Some((key, mapped));
        }
        let Some((_, mapped)) = &cached else { unreachable!("set just above") };
        *st = match mapped {
            Err(s) => *s,
            Ok(m) => {
                let offset = usize::from(guest.offset);
                let io = match seg {
                    CopySegment::FromGuest { dst, .. } => m.read(offset, dst),
                    CopySegment::ToGuest { src, .. } => m.write(offset, src),
                };
                match io {
                    Ok(()) => GrantStatus::Okay,
                    Err(e) => {
                        log::warn!("Copy through the mapping of grant {:?} failed: {e}", guest.gref);
                        GrantStatus::GeneralError
                    }
                }
            }
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mapper::{GuestPage, PAGE_SIZE};
    use crate::mapping::Unmap;
    use std::os::fd::OwnedFd;
    use std::ptr::NonNull;

    /// A "guest" of four pages in a memfd; grant `g` is page `g`, and grant 3
    /// is read-only. Every map is a fresh `mmap` of the page, as gntdev's is.
    struct Guest {
        fd: OwnedFd,
        maps: std::cell::Cell<usize>,
    }

    struct Munmap;

    impl Unmap for Munmap {
        fn unmap(&mut self, addr: NonNull<u8>, len: usize) {
            // SAFETY: the page mapped in `Guest::map`, unmapped once from Drop.
            unsafe { nix::sys::mman::munmap(addr.cast(), len) }.unwrap();
        }
    }

    impl Guest {
        fn new() -> Guest {
            let fd = nix::sys::memfd::memfd_create(c"guest", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC).unwrap();
            nix::unistd::ftruncate(&fd, 4 * PAGE_SIZE as i64).unwrap();
            Guest { fd, maps: std::cell::Cell::new(0) }
        }

        fn map(&self, domid: DomId, gref: GrantRef, writable: bool) -> Result<GrantMapping> {
            use nix::sys::mman::{mmap, MapFlags, ProtFlags};
            if domid != 5 {
                return Err(Error::Map { domid, gref, status: GrantStatus::BadDomain });
            }
            if gref.0 >= 4 || (writable && gref.0 == 3) {
                let status = if gref.0 >= 4 { GrantStatus::BadGntref } else { GrantStatus::GeneralError };
                return Err(Error::Map { domid, gref, status });
            }
            self.maps.set(self.maps.get() + 1);
            let prot = if writable { ProtFlags::PROT_READ | ProtFlags::PROT_WRITE } else { ProtFlags::PROT_READ };
            let len = std::num::NonZeroUsize::new(PAGE_SIZE).unwrap();
            let offset = i64::from(gref.0) * PAGE_SIZE as i64;
            // SAFETY: a new shared mapping of the memfd at a kernel-chosen address.
            let addr = unsafe { mmap(None, len, prot, MapFlags::MAP_SHARED, &self.fd, offset) }.unwrap();
            // SAFETY: `addr` maps PAGE_SIZE bytes, released only by Munmap.
            Ok(unsafe { GrantMapping::from_raw(addr.cast(), PAGE_SIZE, writable, Box::new(Munmap)) })
        }

        fn page(&self, gref: u32) -> Vec<u8> {
            let m = self.map(5, GrantRef(gref), false).unwrap();
            let mut v = vec![0u8; PAGE_SIZE];
            m.read(0, &mut v).unwrap();
            v
        }
    }

    fn at(gref: u32, offset: u16) -> GuestPage {
        GuestPage { domid: 5, gref: GrantRef(gref), offset }
    }

    #[test]
    fn copies_to_and_from_guest_pages_at_their_offsets() {
        let guest = Guest::new();
        let data: Vec<u8> = (1..=96u8).collect();
        let mut back = vec![0u8; 100];
        let mut st = [GrantStatus::GeneralError; 2];
        let mut segs = [CopySegment::ToGuest { src: &data, dst: at(1, 4000) }];
        copy_by_mapping(|d, g, w| guest.map(d, g, w), &mut segs, &mut st[..1]).unwrap();
        let mut segs = [CopySegment::FromGuest { src: at(1, 3996), dst: &mut back }];
        copy_by_mapping(|d, g, w| guest.map(d, g, w), &mut segs, &mut st[1..]).unwrap();
        assert_eq!(st, [GrantStatus::Okay; 2]);
        assert_eq!(&guest.page(1)[4000..4096], &data[..]);
        assert_eq!(&back[4..100], &data[..]);
        assert_eq!(&back[..4], &[0; 4]);
    }

    #[test]
    fn unmappable_pages_fail_only_their_segments_with_xen_status() {
        let guest = Guest::new();
        let src = [7u8; 16];
        let mut dst = [0u8; 16];
        let mut segs = [
            CopySegment::ToGuest { src: &src, dst: at(3, 0) },
            CopySegment::ToGuest { src: &src, dst: at(9, 0) },
            CopySegment::FromGuest { src: GuestPage { domid: 6, ..at(0, 0) }, dst: &mut dst },
            CopySegment::ToGuest { src: &src, dst: at(2, 16) },
        ];
        let mut st = [GrantStatus::Okay; 4];
        copy_by_mapping(|d, g, w| guest.map(d, g, w), &mut segs, &mut st).unwrap();
        assert_eq!(st, [GrantStatus::GeneralError, GrantStatus::BadGntref, GrantStatus::BadDomain, GrantStatus::Okay]);
        assert_eq!(&guest.page(2)[16..32], &src);
        assert_eq!(&guest.page(3)[..16], &[0; 16]);
    }

    #[test]
    fn a_segment_crossing_its_page_refuses_the_whole_batch() {
        let guest = Guest::new();
        let src = [1u8; 8];
        let mut segs =
            [CopySegment::ToGuest { src: &src, dst: at(0, 0) }, CopySegment::ToGuest { src: &src, dst: at(1, 4090) }];
        let mut st = [GrantStatus::Okay; 2];
        let err = copy_by_mapping(|d, g, w| guest.map(d, g, w), &mut segs, &mut st).unwrap_err();
        assert!(matches!(err, Error::BadSegment { offset: 4090, len: 8 }), "{err:?}");
        assert_eq!(guest.maps.get(), 0);
    }

    #[test]
    fn consecutive_segments_on_one_page_share_a_mapping() {
        let guest = Guest::new();
        let (a, b) = ([1u8; 8], [2u8; 8]);
        let mut segs = [
            CopySegment::ToGuest { src: &a, dst: at(0, 0) },
            CopySegment::ToGuest { src: &b, dst: at(0, 8) },
            CopySegment::ToGuest { src: &a, dst: at(1, 0) },
        ];
        let mut st = [GrantStatus::GeneralError; 3];
        copy_by_mapping(|d, g, w| guest.map(d, g, w), &mut segs, &mut st).unwrap();
        assert_eq!(st, [GrantStatus::Okay; 3]);
        assert_eq!(guest.maps.get(), 2);
        assert_eq!(&guest.page(0)[..16], [[1u8; 8], [2u8; 8]].concat());
    }

    #[test]
    fn status_of_another_length_is_refused() {
        let guest = Guest::new();
        let src = [0u8; 4];
        let mut segs = [CopySegment::ToGuest { src: &src, dst: at(0, 0) }];
        let err = copy_by_mapping(|d, g, w| guest.map(d, g, w), &mut segs, &mut []).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)));
    }
}
