//! The unsafe boundary of the grant devices: ioctls, `mmap` and `munmap` on
//! an open `/dev/xen/gntdev` or `/dev/xen/gntalloc`, each as a function that
//! is safe to call, except the two that take addresses the kernel will use;
//! and the record of live mappings both devices keep for unmap notifications.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::mem::size_of;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};

use nix::errno::Errno;
use nix::sys::mman::{MapFlags, ProtFlags};
use zerocopy::{FromBytes, IntoBytes};

use crate::abi::{self, GntdevGrantCopySegment, IoctlGntdevGrantCopy, IoctlGntdevGrantRef};
use crate::mapper::{Error, Result};
use crate::mapping::GrantMapping;

/// An open grant device.
#[derive(Debug)]
pub(crate) struct DeviceFd {
    fd: OwnedFd,
    path: &'static str,
}

impl DeviceFd {
    /// Opens `path` read-write and close-on-exec; `name` is the path for messages.
    pub(crate) fn open(path: &Path, name: &'static str) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| Error::Open { path: path.display().to_string(), source })?;
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten();
        if page != Some(crate::PAGE_SIZE as i64) {
            return Err(Error::InvalidArgument("the kernel's page size is not Xen's 4096 bytes"));
        }
        log::debug!("Opened {}", path.display());
        Ok(DeviceFd { fd: file.into(), path: name })
    }

    /// The device's name for messages.
    pub(crate) fn name(&self) -> &'static str {
        self.path
    }

    /// Issues `request`, whose whole argument is `arg`.
    pub(crate) fn ioctl<T: IntoBytes + FromBytes>(&self, request: u32, arg: &mut T) -> nix::Result<i32> {
        assert_eq!(abi::ioc_size(request), size_of::<T>(), "ioctl {request:#x} takes another argument size");
        // SAFETY: every fixed-size ioctl of gntdev.c and gntalloc.c copies at
        // most `_IOC_SIZE(request)` bytes in and out at the pointer, which is
        // `size_of::<T>()` (asserted above) of an exclusive borrow; none of
        // these structs holds an address the kernel would follow; `T:
        // FromBytes` makes whatever the kernel writes a valid `T`.
        let rc = unsafe { nix::libc::ioctl(self.fd.as_raw_fd(), request as _, std::ptr::from_mut(arg)) };
        Errno::result(rc)
    }

    /// Issues `request` on a variable-length request built by `abi`.
    fn ioctl_request(&self, request: u32, buf: &mut [u8], needed: usize) -> nix::Result<i32> {
        assert!(buf.len() >= needed.max(abi::ioc_size(request)), "request buffer too short");
        // SAFETY: the kernel copies in `_IOC_SIZE(request)` bytes, then the
        // `count` elements after the header, and copies the same back out;
        // `needed` (the header plus `count` elements, from the caller that
        // wrote `count`) and the ioctl size both fit in `buf` (asserted above).
        let rc = unsafe { nix::libc::ioctl(self.fd.as_raw_fd(), request as _, buf.as_mut_ptr()) };
        Errno::result(rc)
    }

    /// `IOCTL_GNTDEV_MAP_GRANT_REF`: returns the `mmap` offset for `refs`.
    pub(crate) fn map_grant_ref(&self, refs: &[IoctlGntdevGrantRef]) -> nix::Result<u64> {
        let mut buf = abi::map_grant_ref_request(refs);
        let needed = std::mem::offset_of!(abi::IoctlGntdevMapGrantRef, refs) + std::mem::size_of_val(refs);
        self.ioctl_request(abi::IOCTL_GNTDEV_MAP_GRANT_REF, &mut buf, needed)?;
        Ok(abi::map_grant_ref_index(&buf))
    }

    /// `IOCTL_GNTALLOC_ALLOC_GREF`: returns the `mmap` offset and the grant references.
    pub(crate) fn alloc_gref(&self, domid: u16, flags: u16, count: u32) -> nix::Result<(u64, Vec<u32>)> {
        let mut buf = abi::alloc_gref_request(domid, flags, count);
        let needed = std::mem::offset_of!(abi::IoctlGntallocAllocGref, gref_ids) + count as usize * size_of::<u32>();
        self.ioctl_request(abi::IOCTL_GNTALLOC_ALLOC_GREF, &mut buf, needed)?;
        Ok(abi::alloc_gref_result(&buf))
    }

    /// `IOCTL_GNTDEV_GRANT_COPY` over `segments`, whose statuses the kernel fills in.
    ///
    /// # Safety
    /// Every `virt` address in `segments` must point to `len` bytes that
    /// stay valid for the call: readable where it is a source, and writable,
    /// with nothing else reading or writing them, where it is a destination.
    pub(crate) unsafe fn grant_copy(&self, segments: &mut [GntdevGrantCopySegment]) -> nix::Result<()> {
        let mut arg = IoctlGntdevGrantCopy {
            count: u32::try_from(segments.len()).map_err(|_| Errno::E2BIG)?,
            segments: segments.as_mut_ptr() as usize,
            ..Default::default()
        };
        // SAFETY: the kernel reads `arg`, then reads and writes back (status
        // only) `count` segments at `segments`, an exclusive borrow of that
        // many; it reads or writes each `virt` range, valid by this
        // function's contract.
        let rc = unsafe {
            nix::libc::ioctl(self.fd.as_raw_fd(), abi::IOCTL_GNTDEV_GRANT_COPY as _, std::ptr::from_mut(&mut arg))
        };
        Errno::result(rc).map(drop)
    }

    /// Maps `len` bytes of the device at `offset`, shared, read-only unless `writable`.
    pub(crate) fn mmap(&self, len: usize, offset: u64, writable: bool) -> nix::Result<NonNull<u8>> {
        let size = NonZeroUsize::new(len).ok_or(Errno::EINVAL)?;
        let offset = nix::libc::off_t::try_from(offset).map_err(|_| Errno::EINVAL)?;
        let prot = if writable { ProtFlags::PROT_READ | ProtFlags::PROT_WRITE } else { ProtFlags::PROT_READ };
        // SAFETY: a new mapping at an address the kernel picks (no MAP_FIXED)
        // replaces nothing and aliases no Rust object.
        let addr = unsafe { nix::sys::mman::mmap(None, size, prot, MapFlags::MAP_SHARED, &self.fd, offset) }?;
        Ok(addr.cast())
    }

    /// Unmaps what [`DeviceFd::mmap`] mapped.
    ///
    /// # Safety
    /// `addr`/`len` must be a mapping returned by `mmap` that nothing uses
    /// any more; it is unmapped once.
    pub(crate) unsafe fn munmap(addr: NonNull<u8>, len: usize) -> nix::Result<()> {
        // SAFETY: by this function's contract.
        unsafe { nix::sys::mman::munmap(addr.cast(), len) }
    }
}

impl AsFd for DeviceFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// `Error::Op` for `op`.
pub(crate) fn op(op: &'static str) -> impl FnOnce(Errno) -> Error {
    move |e| Error::Op { op, source: e.into() }
}

/// Live mappings of one open device: start address to (`mmap` offset, pages).
pub(crate) type Registry = Arc<Mutex<HashMap<usize, (u64, u32)>>>;

/// The device `index` of `offset` bytes into `mapping`, if `registry` holds it.
pub(crate) fn index_of(registry: &Registry, mapping: &GrantMapping, offset: usize) -> Result<u64> {
    if offset >= mapping.len() {
        return Err(Error::InvalidArgument("offset beyond the mapping"));
    }
    let map = registry.lock().unwrap_or_else(PoisonError::into_inner);
    let (index, _) =
        map.get(&(mapping.as_ptr() as usize)).ok_or(Error::InvalidArgument("mapping not made by this device"))?;
    Ok(index + offset as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_of_adds_the_offset_to_the_registered_mapping_index() {
        let m = GrantMapping::anonymous(2 * crate::PAGE_SIZE).unwrap();
        let reg = Registry::default();
        reg.lock().unwrap().insert(m.as_ptr() as usize, (0x3000, 2));
        assert_eq!(index_of(&reg, &m, 5).unwrap(), 0x3005);
        assert_eq!(index_of(&reg, &m, crate::PAGE_SIZE + 1).unwrap(), 0x4001);
        assert!(matches!(index_of(&reg, &m, 2 * crate::PAGE_SIZE), Err(Error::InvalidArgument(_))));
    }
}
