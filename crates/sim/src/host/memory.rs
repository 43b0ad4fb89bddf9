//! Guest memory: one memfd per domain, grown page by page as the guest
//! allocates. The guest's own view and every backend mapping of a grant are
//! `mmap`s of the same memfd offsets, so they alias exactly as a frontend's
//! page and a backend's grant mapping do on Xen.

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use gnttab::{GrantMapping, Unmap, PAGE_SIZE};
use nix::sys::mman::{mmap, mmap_anonymous, munmap, MapFlags, ProtFlags};

use super::error::{DomId, Error, Result};

/// Most pages one simulated domain may allocate over its life (1 TiB of
/// frame numbers; only pages not yet dropped use memory).
pub const MAX_GUEST_PAGES: u64 = 1 << 28;

/// A guest page frame number (an index into the domain's memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageFrame(pub u64);

impl From<u64> for PageFrame {
    fn from(pfn: u64) -> Self {
        PageFrame(pfn)
    }
}

/// The memory of one domain.
pub(crate) struct GuestMemory {
    domid: DomId,
    fd: OwnedFd,
    /// Number of frames allocated; frames `0..pages` exist.
    pages: Mutex<u64>,
}

impl GuestMemory {
    pub(crate) fn new(domid: DomId) -> Result<Self> {
        use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
        let name = std::ffi::CString::new(format!("xen-sim-dom{domid}")).expect("no NUL in a formatted name");
        let fd = memfd_create(&name, MemFdCreateFlag::MFD_CLOEXEC).map_err(|e| Error::io("memfd_create", e))?;
        Ok(GuestMemory { domid, fd, pages: Mutex::new(0) })
    }

    /// Allocates `n` consecutive new frames (zeroed) and returns the first.
    pub(crate) fn alloc(&self, n: usize) -> Result<u64> {
        let oom = Error::OutOfMemory { domid: self.domid, pages: n };
        let mut pages = self.pages.lock().expect("guest memory lock poisoned");
        let first = *pages;
        let end = u64::try_from(n).ok().filter(|&n| n > 0).and_then(|n| first.checked_add(n)).ok_or(oom)?;
        if end > MAX_GUEST_PAGES {
            return Err(Error::OutOfMemory { domid: self.domid, pages: n });
        }
        nix::unistd::ftruncate(&self.fd, (end * PAGE_SIZE as u64) as i64).map_err(|e| Error::io("ftruncate", e))?;
        *pages = end;
        Ok(first)
    }

    pub(crate) fn is_allocated(&self, pfn: u64) -> bool {
        pfn < *self.pages.lock().expect("guest memory lock poisoned")
    }

    /// Maps `frames` (allocated, possibly scattered) as one contiguous range.
    /// The caller owns the returned range of `frames.len()` pages and must
    /// `munmap` it.
    pub(crate) fn map_frames(&self, frames: &[u64], writable: bool) -> std::io::Result<NonNull<u8>> {
        let einval = || std::io::Error::from_raw_os_error(nix::libc::EINVAL);
        let len = NonZeroUsize::new(frames.len() * PAGE_SIZE).ok_or_else(einval)?;
        // SAFETY: a fresh anonymous reservation aliases nothing in this process.
        let base = unsafe {
            mmap_anonymous(None, len, ProtFlags::PROT_NONE, MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE)
        }?;
        let prot = if writable { ProtFlags::PROT_READ | ProtFlags::PROT_WRITE } else { ProtFlags::PROT_READ };
        let mut i = 0;
        while i < frames.len() {
            // A run of consecutive frames is one mmap.
            let mut run = 1;
            while i + run < frames.len() && frames[i + run] == frames[i] + run as u64 {
                run += 1;
            }
            let addr = NonZeroUsize::new(base.as_ptr() as usize + i * PAGE_SIZE);
            let size = NonZeroUsize::new(run * PAGE_SIZE).expect("run is at least one page");
            let offset = (frames[i] * PAGE_SIZE as u64) as i64;
            // SAFETY: MAP_FIXED replaces pages inside our own reservation
            // (`base..base+len`), which nothing else refers to yet.
            let mapped =
                unsafe { mmap(addr, size, prot, MapFlags::MAP_SHARED | MapFlags::MAP_FIXED, &self.fd, offset) };
            if let Err(e) = mapped {
                // SAFETY: `base`/`len` is the reservation made above, unused elsewhere.
                if let Err(e) = unsafe { munmap(base, len.get()) } {
                    log::warn!("munmap of a failed grant mapping failed: {e}");
                }
                return Err(e.into());
            }
            i += run;
        }
        Ok(base.cast())
    }

    /// Releases the memory of `n` frames from `first` (they read as zeros after).
    fn release(&self, first: u64, n: usize) {
        use nix::fcntl::{fallocate, FallocateFlags};
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        let (offset, len) = ((first * PAGE_SIZE as u64) as i64, (n * PAGE_SIZE) as i64);
        if let Err(e) = fallocate(self.fd.as_raw_fd(), mode, offset, len) {
            log::warn!("Releasing {n} pages of dom{} failed: {e}", self.domid);
        }
    }

    /// Copies `buf.len()` bytes of frame `pfn` at `offset` into `buf`.
    pub(crate) fn read(&self, pfn: u64, offset: usize, buf: &mut [u8]) -> std::io::Result<()> {
        let mut done = 0;
        let base = pfn * PAGE_SIZE as u64 + offset as u64;
        while done < buf.len() {
            match nix::sys::uio::pread(self.fd.as_fd(), &mut buf[done..], (base + done as u64) as i64) {
                Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
                Ok(n) => done += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Copies `buf` into frame `pfn` at `offset`.
    pub(crate) fn write(&self, pfn: u64, offset: usize, buf: &[u8]) -> std::io::Result<()> {
        let mut done = 0;
        let base = pfn * PAGE_SIZE as u64 + offset as u64;
        while done < buf.len() {
            match nix::sys::uio::pwrite(self.fd.as_fd(), &buf[done..], (base + done as u64) as i64) {
                Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero)),
                Ok(n) => done += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Unmaps a range made by [`GuestMemory::map_frames`].
pub(crate) fn unmap_range(addr: NonNull<u8>, len: usize) {
    // SAFETY: called once per range from an `Unmap` impl, with the address
    // and length `map_frames` returned, when no GrantMapping refers to it.
    if let Err(e) = unsafe { munmap(addr.cast(), len) } {
        log::warn!("munmap of simulated guest memory failed: {e}");
    }
}

struct GuestViewUnmap;

impl Unmap for GuestViewUnmap {
    fn unmap(&mut self, addr: NonNull<u8>, len: usize) {
        unmap_range(addr, len);
    }
}

/// Pages a simulated guest allocated: its own view of them (what the
/// frontend writes rings and buffers through) and their frame numbers, to
/// grant them.
pub struct GuestPages {
    memory: Arc<GuestMemory>,
    domid: DomId,
    first: u64,
    count: usize,
    view: GrantMapping,
}

impl GuestPages {
    pub(crate) fn new(memory: &Arc<GuestMemory>, n: usize) -> Result<Self> {
        let first = memory.alloc(n)?;
        let frames: Vec<u64> = (first..first + n as u64).collect();
        let addr = memory.map_frames(&frames, true).map_err(|source| Error::Io { op: "mmap", source })?;
        // SAFETY: `addr` is a new writable mapping of `n` pages, released only
        // by GuestViewUnmap.
        let view = unsafe { GrantMapping::from_raw(addr, n * PAGE_SIZE, true, Box::new(GuestViewUnmap)) };
        Ok(GuestPages { memory: memory.clone(), domid: memory.domid, first, count: n, view })
    }

    /// The guest's own (writable) view of the pages, contiguous.
    pub fn mapping(&self) -> &GrantMapping {
        &self.view
    }

    /// The frame of page `i`.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn frame(&self, i: usize) -> PageFrame {
        assert!(i < self.count, "page {i} of {}", self.count);
        PageFrame(self.first + i as u64)
    }

    /// All frames, in order.
    pub fn frames(&self) -> Vec<PageFrame> {
        (0..self.count).map(|i| self.frame(i)).collect()
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are no pages (never true: allocations are of at least one page).
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The domain that owns the pages.
    pub fn domid(&self) -> DomId {
        self.domid
    }
}

impl Drop for GuestPages {
    fn drop(&mut self) {
        self.memory.release(self.first, self.count);
    }
}

impl core::fmt::Debug for GuestPages {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("GuestPages")
            .field("domid", &self.domid)
            .field("first", &self.first)
            .field("count", &self.count)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_allocated_consecutively_and_zeroed() {
        let mem = Arc::new(GuestMemory::new(1).unwrap());
        let a = GuestPages::new(&mem, 2).unwrap();
        let b = GuestPages::new(&mem, 3).unwrap();
        assert_eq!(a.frames(), vec![PageFrame(0), PageFrame(1)]);
        assert_eq!(b.frame(0), PageFrame(2));
        assert!(mem.is_allocated(4));
        assert!(!mem.is_allocated(5));
        let mut buf = [0xffu8; 16];
        b.mapping().read(2 * PAGE_SIZE + 100, &mut buf).unwrap();
        assert_eq!(buf, [0u8; 16]);
    }

    #[test]
    fn zero_page_allocation_fails() {
        let mem = Arc::new(GuestMemory::new(1).unwrap());
        assert!(matches!(GuestPages::new(&mem, 0), Err(Error::OutOfMemory { pages: 0, .. })));
    }

    #[test]
    fn scattered_frames_map_contiguously_in_the_given_order() {
        let mem = Arc::new(GuestMemory::new(1).unwrap());
        let pages = GuestPages::new(&mem, 4).unwrap();
        for i in 0..4 {
            pages.mapping().fill(i * PAGE_SIZE, PAGE_SIZE, b'a' + i as u8).unwrap();
        }
        let order = [3u64, 0, 1];
        let addr = mem.map_frames(&order, false).unwrap();
        // SAFETY: a fresh read-only mapping of 3 pages owned by this test.
        let m = unsafe { GrantMapping::from_raw(addr, 3 * PAGE_SIZE, false, Box::new(GuestViewUnmap)) };
        for (i, pfn) in order.iter().enumerate() {
            let mut b = [0u8; 1];
            m.read(i * PAGE_SIZE + 17, &mut b).unwrap();
            assert_eq!(b[0], b'a' + *pfn as u8);
        }
    }

    #[test]
    fn dropped_pages_are_released_and_their_frames_not_reused() {
        let mem = Arc::new(GuestMemory::new(1).unwrap());
        let a = GuestPages::new(&mem, 1).unwrap();
        a.mapping().fill(0, PAGE_SIZE, 0xee).unwrap();
        drop(a);
        let mut buf = [0xffu8; 8];
        mem.read(0, 0, &mut buf).unwrap();
        assert_eq!(buf, [0u8; 8]);
        assert_eq!(GuestPages::new(&mem, 1).unwrap().frame(0), PageFrame(1));
    }

    #[test]
    fn pread_and_pwrite_reach_the_guest_view() {
        let mem = Arc::new(GuestMemory::new(1).unwrap());
        let pages = GuestPages::new(&mem, 2).unwrap();
        mem.write(1, 4000, b"0123456789").unwrap();
        let mut via_view = [0u8; 10];
        pages.mapping().read(PAGE_SIZE + 4000, &mut via_view).unwrap();
        assert_eq!(&via_view, b"0123456789");
        pages.mapping().write(10, b"guest").unwrap();
        let mut via_fd = [0u8; 5];
        mem.read(0, 10, &mut via_fd).unwrap();
        assert_eq!(&via_fd, b"guest");
    }
}
