//! The guest of `blk_queue`: its pages, a grant table fixed for the run
//! (which references are granted, read-write or read-only) and a
//! [`GrantMapper`] that copies and maps them as gntdev does, failing a
//! whole call on demand.
//!
//! The pages are a memfd. The harness reads and writes them through one
//! shared mapping of it; [`GrantMapper::map`] maps the granted pages of a
//! batch side by side from the same memfd, so a mapping and the guest's page
//! are the same memory, as they are under Xen: what the disk reads into a
//! persistently mapped page is what the guest finds there, and what the
//! guest writes into one is what a write sends to the disk.

use std::fs::File;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use gnttab::{CopySegment, DomId, GrantMapper, GrantMapping, GrantRef, GrantStatus, Unmap, PAGE_SIZE};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::mman::{mmap, mmap_anonymous, munmap, MapFlags, ProtFlags};

/// The frontend's domain.
pub const FRONTEND: DomId = 7;
/// The guest's pages: reference `n` is page `n`; references from here on are not granted.
pub const PAGES: u32 = 24;
/// Granted read-write, the data pages of the harness's own checks.
pub const DATA_PAGES: Range<u32> = 0..16;
/// Granted read-write, where the harness's checks put indirect segments.
pub const INDIRECT_PAGES: Range<u32> = 16..20;
/// Granted read-only.
pub const READ_ONLY_PAGES: Range<u32> = 20..24;

/// How a reference is granted to the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Readable and writable.
    ReadWrite,
    /// Readable only.
    ReadOnly,
    /// Not granted at all.
    None,
}

/// How `gref` is granted.
pub fn access(gref: GrantRef) -> Access {
    if READ_ONLY_PAGES.contains(&gref.0) {
        Access::ReadOnly
    } else if gref.0 < PAGES {
        Access::ReadWrite
    } else {
        Access::None
    }
}

/// The guest's memory and grant table, as the backend's [`GrantMapper`].
pub struct Guest {
    file: File,
    /// The guest's own view of all its pages.
    view: GrantMapping,
    /// Copy calls still to fail as a whole.
    fail_copies: AtomicU32,
    /// Map calls still to fail.
    fail_maps: AtomicU32,
    /// Copy calls failed as a whole, all told.
    copy_faults: AtomicU64,
    /// Map calls refused (a fault, or a reference not granted writable).
    maps_refused: AtomicU64,
    /// References mapped by calls that succeeded.
    refs_mapped: AtomicU64,
    /// Pages mapped now (each mapping counts its pages until unmapped).
    live_pages: Arc<AtomicUsize>,
}

/// One less of `n`, if any is left.
fn take_one(n: &AtomicU32) -> bool {
    n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1)).is_ok()
}

impl Guest {
    /// Zeroed pages.
    pub fn new() -> Guest {
        let fd = memfd_create(c"fuzz-blk-queue-guest", MemFdCreateFlag::MFD_CLOEXEC).expect("memfd");
        let file = File::from(fd);
        let len = PAGES as usize * PAGE_SIZE;
        file.set_len(len as u64).expect("guest memory size");
        let view = GrantMapping::shared_file(&file, len).expect("guest memory mapping");
        Guest {
            file,
            view,
            fail_copies: AtomicU32::new(0),
            fail_maps: AtomicU32::new(0),
            copy_faults: AtomicU64::new(0),
            maps_refused: AtomicU64::new(0),
            refs_mapped: AtomicU64::new(0),
            live_pages: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Bytes of page `gref` at `offset` (the guest reading its memory).
    pub fn read(&self, gref: u32, offset: usize, buf: &mut [u8]) {
        assert!(gref < PAGES && offset + buf.len() <= PAGE_SIZE);
        self.view.read(gref as usize * PAGE_SIZE + offset, buf).expect("guest page");
    }

    /// Writes into page `gref` at `offset`, what fits in the page.
    pub fn write(&self, gref: u32, offset: usize, bytes: &[u8]) {
        assert!(gref < PAGES && offset <= PAGE_SIZE);
        let n = bytes.len().min(PAGE_SIZE - offset);
        self.view.write(gref as usize * PAGE_SIZE + offset, &bytes[..n]).expect("guest page");
    }

    /// The next `n` copy calls fail as a whole (as a failing ioctl does).
    pub fn fail_copies(&self, n: u32) {
        self.fail_copies.store(n, Ordering::Relaxed);
    }

    /// The next `n` map calls fail.
    pub fn fail_maps(&self, n: u32) {
        self.fail_maps.store(n, Ordering::Relaxed);
    }

    /// Copy calls failed as a whole so far.
    pub fn copy_faults(&self) -> u64 {
        self.copy_faults.load(Ordering::Relaxed)
    }

    /// Map calls refused so far.
    pub fn maps_refused(&self) -> u64 {
        self.maps_refused.load(Ordering::Relaxed)
    }

    /// References mapped so far.
    pub fn refs_mapped(&self) -> u64 {
        self.refs_mapped.load(Ordering::Relaxed)
    }

    /// Pages mapped now.
    pub fn live_pages(&self) -> usize {
        self.live_pages.load(Ordering::Relaxed)
    }

    /// `refs`' pages side by side, from the guest's memory.
    fn alias(&self, refs: &[GrantRef], writable: bool) -> std::io::Result<GrantMapping> {
        let len = NonZeroUsize::new(refs.len() * PAGE_SIZE).ok_or(std::io::ErrorKind::InvalidInput)?;
        let page = NonZeroUsize::new(PAGE_SIZE).expect("a page is not empty");
        // SAFETY: a fresh reservation aliases nothing in this process.
        let base = unsafe { mmap_anonymous(None, len, ProtFlags::PROT_NONE, MapFlags::MAP_PRIVATE) }?;
        let prot = if writable { ProtFlags::PROT_READ | ProtFlags::PROT_WRITE } else { ProtFlags::PROT_READ };
        for (i, gref) in refs.iter().enumerate() {
            let addr = NonZeroUsize::new(base.as_ptr() as usize + i * PAGE_SIZE);
            let offset = (gref.0 as usize * PAGE_SIZE) as i64;
            // SAFETY: MAP_FIXED replaces a page of our own reservation
            // (`base..base + len`), which nothing refers to yet.
            let mapped =
                unsafe { mmap(addr, page, prot, MapFlags::MAP_SHARED | MapFlags::MAP_FIXED, &self.file, offset) };
            if let Err(e) = mapped {
                // SAFETY: the reservation made above, which nothing else uses.
                let _ = unsafe { munmap(base, len.get()) };
                return Err(e.into());
            }
        }
        self.live_pages.fetch_add(refs.len(), Ordering::Relaxed);
        let unmap = Box::new(Unmapper(self.live_pages.clone()));
        // SAFETY: `base` is a new mapping of `len` bytes, writable only if
        // `writable`, that only `Unmapper` releases.
        Ok(unsafe { GrantMapping::from_raw(base.cast(), len.get(), writable, unmap) })
    }
}

/// Releases a mapping made by [`Guest::alias`], counting its pages off.
struct Unmapper(Arc<AtomicUsize>);

impl Unmap for Unmapper {
    fn unmap(&mut self, addr: NonNull<u8>, len: usize) {
        // SAFETY: `addr`/`len` are the whole mapping `alias` made, released
        // once, from the mapping's Drop, when nothing can reach it.
        unsafe { munmap(addr.cast(), len) }.expect("munmap of a guest mapping");
        self.0.fetch_sub(len / PAGE_SIZE, Ordering::Relaxed);
    }
}

impl GrantMapper for Guest {
    fn map(&self, domid: DomId, refs: &[GrantRef], writable: bool) -> gnttab::Result<GrantMapping> {
        assert_eq!(domid, FRONTEND, "a grant of another domain mapped");
        let refuse = |gref: GrantRef, status| {
            self.maps_refused.fetch_add(1, Ordering::Relaxed);
            Err(gnttab::Error::Map { domid, gref, status })
        };
        let Some(&first) = refs.first() else { return Err(gnttab::Error::InvalidArgument("no grants to map")) };
        if take_one(&self.fail_maps) {
            return refuse(first, GrantStatus::NoDeviceSpace);
        }
        for &gref in refs {
            match access(gref) {
                Access::None => return refuse(gref, GrantStatus::BadGntref),
                Access::ReadOnly if writable => return refuse(gref, GrantStatus::PermissionDenied),
                Access::ReadOnly | Access::ReadWrite => {}
            }
        }
        let mapping = self.alias(refs, writable).map_err(|source| gnttab::Error::Op { op: "mmap", source })?;
        self.refs_mapped.fetch_add(refs.len() as u64, Ordering::Relaxed);
        Ok(mapping)
    }

    fn copy(&self, segments: &mut [CopySegment<'_>], status: &mut [GrantStatus]) -> gnttab::Result<()> {
        assert_eq!(segments.len(), status.len(), "a status per copy segment");
        if take_one(&self.fail_copies) {
            self.copy_faults.fetch_add(1, Ordering::Relaxed);
            return Err(gnttab::Error::Op {
                op: "grant copy",
                source: std::io::Error::from_raw_os_error(nix::libc::EFAULT),
            });
        }
        for (seg, st) in segments.iter_mut().zip(status.iter_mut()) {
            let g = seg.guest();
            let offset = usize::from(g.offset);
            // What the queue asks is within a page of its own frontend.
            assert_eq!(g.domid, FRONTEND, "a copy from or to another domain");
            assert!(!seg.is_empty() && offset + seg.len() <= PAGE_SIZE, "copy of {} bytes at {offset}", seg.len());
            let at = g.gref.0 as usize * PAGE_SIZE + offset;
            *st = match (access(g.gref), seg) {
                (Access::None, _) => GrantStatus::BadGntref,
                (Access::ReadOnly, CopySegment::ToGuest { .. }) => GrantStatus::PermissionDenied,
                (_, CopySegment::FromGuest { dst, .. }) => {
                    self.view.read(at, dst).expect("guest page");
                    GrantStatus::Okay
                }
                (Access::ReadWrite, CopySegment::ToGuest { src, .. }) => {
                    self.view.write(at, src).expect("guest page");
                    GrantStatus::Okay
                }
            };
        }
        Ok(())
    }
}
