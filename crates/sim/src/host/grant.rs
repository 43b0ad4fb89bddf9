//! Grant tables: the frontend side ([`SimGrantTable`]: grant and revoke
//! pages) and the backend side ([`SimGrantMapper`], a [`GrantMapper`]: map
//! and copy grants), with the checks and `GNTST_*` results of Xen's
//! `xen/common/grant_table.c`:
//!
//! - a reference beyond the table's current size: `GNTST_bad_gntref`;
//! - a reference that is not granted, granted to another domain, or a write
//!   (read-write map, copy to the guest) through a read-only grant:
//!   `GNTST_general_error` (Xen's `_set_status`: "Bad flags or dom",
//!   "Attempt to write-pin a r/o grant entry");
//! - a granting domain that does not exist: `GNTST_bad_domain`;
//! - a copy reaching past the end of the page: `GNTST_bad_copy_arg`, checked
//!   after the grant as `gnttab_copy_buf` does. This is the hypercall's
//!   per-segment answer; Linux's gntdev rejects such a batch as a whole with
//!   `EINVAL` before calling Xen. A zero-length segment succeeds, as on Xen
//!   (where [`gnttab::check_segment`] is stricter).
//!
//! Revoking ([`SimGrantTable::end_access`]) while a grant is mapped or being
//! copied fails with [`Error::Busy`] and leaves the grant in place, as
//! `gnttab_end_foreign_access_ref` fails while `GTF_reading`/`GTF_writing`
//! are set; the guest must retry after the backend unmaps (Linux's deferred
//! `gnttab_end_foreign_access` does exactly that).

use std::ptr::NonNull;
use std::sync::{Arc, MutexGuard};

use gnttab::{CopySegment, GrantMapper, GrantMapping, GrantRef, GrantStatus, Unmap, PAGE_SIZE};

use super::error::{DomId, Error, Result};
use super::memory::{unmap_range, GuestPages, PageFrame};
use super::sim_host::{Domain, SimHost};

/// Entries a guest never hands out (`GNTTAB_NR_RESERVED_ENTRIES`: toolstack
/// grants for xenstore and the console).
pub const RESERVED_GRANT_ENTRIES: u32 = 8;
/// v1 entries per grant-table frame (`PAGE_SIZE / sizeof(grant_entry_v1_t)`).
const ENTRIES_PER_FRAME: usize = PAGE_SIZE / 8;
/// Xen's default `gnttab_max_frames`.
const MAX_GRANT_FRAMES: usize = 64;

/// What holds a grant: a mapping or a copy in progress (Xen's pin counts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pin {
    Map,
    Copy,
}

#[derive(Debug)]
struct GrantEntry {
    frame: u64,
    to: DomId,
    readonly: bool,
    maps: u32,
    copies: u32,
}

/// One domain's grant table.
#[derive(Debug)]
pub(crate) struct GrantTable {
    domid: DomId,
    /// Grows a frame (512 entries) at a time, as a guest's table does.
    entries: Vec<Option<GrantEntry>>,
    /// Free references, lowest on top.
    free: Vec<u32>,
    /// The domain was destroyed: its mappings' pins no longer matter.
    revoked: bool,
    /// Grant copy segments that reached this domain's grants, all told.
    copy_segments: u64,
}

impl GrantTable {
    pub(crate) fn new(domid: DomId) -> Self {
        GrantTable { domid, entries: Vec::new(), free: Vec::new(), revoked: false, copy_segments: 0 }
    }

    fn grow(&mut self) -> Result<()> {
        let old = self.entries.len();
        if old >= MAX_GRANT_FRAMES * ENTRIES_PER_FRAME {
            return Err(Error::TableFull(self.domid));
        }
        let new = old + ENTRIES_PER_FRAME;
        self.entries.resize_with(new, || None);
        let first = (old as u32).max(RESERVED_GRANT_ENTRIES);
        self.free.extend((first..new as u32).rev());
        Ok(())
    }

    fn grant(&mut self, frame: u64, to: DomId, readonly: bool) -> Result<GrantRef> {
        if self.free.is_empty() {
            self.grow()?;
        }
        let r = self.free.pop().expect("grow added free entries");
        self.entries[r as usize] = Some(GrantEntry { frame, to, readonly, maps: 0, copies: 0 });
        Ok(GrantRef(r))
    }

    /// Fills reserved entry `gref` (below [`RESERVED_GRANT_ENTRIES`]), as
    /// the domain builder does for the console and xenstore pages.
    fn grant_reserved(&mut self, gref: GrantRef, frame: u64, to: DomId, readonly: bool) -> Result<()> {
        if gref.0 >= RESERVED_GRANT_ENTRIES {
            return Err(Error::NotGranted(gref));
        }
        if self.entries.is_empty() {
            self.grow()?;
        }
        let slot = &mut self.entries[gref.0 as usize];
        if slot.as_ref().is_some_and(|e| e.maps > 0 || e.copies > 0) {
            return Err(Error::Busy(gref));
        }
        *slot = Some(GrantEntry { frame, to, readonly, maps: 0, copies: 0 });
        Ok(())
    }

    fn end_access(&mut self, gref: GrantRef) -> Result<()> {
        let slot = self.entries.get_mut(gref.0 as usize).ok_or(Error::NotGranted(gref))?;
        match slot {
            None => Err(Error::NotGranted(gref)),
            Some(e) if e.maps > 0 || e.copies > 0 => Err(Error::Busy(gref)),
            Some(_) => {
                *slot = None;
                // A reserved entry is never handed out by `grant`.
                if gref.0 >= RESERVED_GRANT_ENTRIES {
                    self.free.push(gref.0);
                }
                Ok(())
            }
        }
    }

    /// Checks that `ldom` may access `gref` (for writing if `write`) and pins
    /// it; returns the granted frame.
    pub(crate) fn acquire(
        &mut self,
        gref: GrantRef,
        ldom: DomId,
        write: bool,
        pin: Pin,
    ) -> std::result::Result<u64, GrantStatus> {
        let slot = self.entries.get_mut(gref.0 as usize).ok_or(GrantStatus::BadGntref)?;
        let e = slot.as_mut().ok_or(GrantStatus::GeneralError)?;
        if e.to != ldom || (write && e.readonly) {
            return Err(GrantStatus::GeneralError);
        }
        match pin {
            Pin::Map => e.maps += 1,
            Pin::Copy => e.copies += 1,
        }
        if pin == Pin::Copy {
            self.copy_segments += 1;
        }
        Ok(e.frame)
    }

    /// Drops a pin taken by [`GrantTable::acquire`].
    pub(crate) fn release(&mut self, gref: GrantRef, pin: Pin) {
        match self.entries.get_mut(gref.0 as usize).and_then(Option::as_mut) {
            Some(e) => match pin {
                Pin::Map => e.maps = e.maps.saturating_sub(1),
                Pin::Copy => e.copies = e.copies.saturating_sub(1),
            },
            None if self.revoked => {}
            None => log::warn!("Release of grant {gref:?} of domain {} that is not granted", self.domid),
        }
    }

    fn map_count(&self, gref: GrantRef) -> Option<u32> {
        self.entries.get(gref.0 as usize).and_then(Option::as_ref).map(|e| e.maps)
    }

    fn live_maps(&self) -> usize {
        self.entries.iter().flatten().map(|e| e.maps as usize).sum()
    }

    fn granted(&self) -> usize {
        self.entries.iter().flatten().count()
    }

    /// Revokes every grant (the domain is being destroyed). Mappings made
    /// before stay valid memory until unmapped, as a dying domain's pages do.
    pub(crate) fn revoke_all(&mut self) {
        self.entries.clear();
        self.free.clear();
        self.revoked = true;
    }
}

fn lock(domain: &Domain) -> MutexGuard<'_, GrantTable> {
    domain.grants.lock().expect("grant table lock poisoned")
}

/// The frontend side of a domain's grant table, and its memory.
#[derive(Clone)]
pub struct SimGrantTable {
    host: Arc<SimHost>,
    domid: DomId,
}

impl SimGrantTable {
    pub(crate) fn new(host: Arc<SimHost>, domid: DomId) -> Self {
        SimGrantTable { host, domid }
    }

    fn domain(&self) -> Result<Arc<Domain>> {
        self.host.domain(self.domid).ok_or(Error::NoDomain(self.domid))
    }

    /// The domain acting.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// Allocates `n` zeroed pages of guest memory.
    pub fn alloc_pages(&self, n: usize) -> Result<GuestPages> {
        GuestPages::new(&self.domain()?.memory, n)
    }

    /// Grants domain `to` access to `page` (`gnttab_grant_foreign_access`).
    pub fn grant_access(&self, page: impl Into<PageFrame>, to: DomId, readonly: bool) -> Result<GrantRef> {
        let page = page.into();
        let dom = self.domain()?;
        if !dom.memory.is_allocated(page.0) {
            return Err(Error::BadFrame { domid: self.domid, pfn: page.0 });
        }
        let gref = lock(&dom).grant(page.0, to, readonly)?;
        log::trace!("dom{} grants frame {} to dom{to} as {gref:?} (readonly {readonly})", self.domid, page.0);
        Ok(gref)
    }

    /// Grants `page` to `to` at the reserved reference `gref`
    /// (`GNTTAB_RESERVED_CONSOLE` = 0, `GNTTAB_RESERVED_XENSTORE` = 1): what
    /// libxl's domain builder (`xc_dom_gnttab_init`) does before the guest
    /// runs, so a console backend maps the page without foreign mapping.
    pub fn grant_reserved(&self, gref: GrantRef, page: impl Into<PageFrame>, to: DomId, readonly: bool) -> Result<()> {
        let page = page.into();
        let dom = self.domain()?;
        if !dom.memory.is_allocated(page.0) {
            return Err(Error::BadFrame { domid: self.domid, pfn: page.0 });
        }
        let result = lock(&dom).grant_reserved(gref, page.0, to, readonly);
        result
    }

    /// Grants every page of `pages` to `to`, in order.
    pub fn grant_pages(&self, pages: &GuestPages, to: DomId, readonly: bool) -> Result<Vec<GrantRef>> {
        pages.frames().into_iter().map(|f| self.grant_access(f, to, readonly)).collect()
    }

    /// Revokes a grant (`gnttab_end_foreign_access_ref` then freeing the
    /// reference). Fails with [`Error::Busy`] while it is mapped or being
    /// copied, leaving it granted.
    pub fn end_access(&self, gref: GrantRef) -> Result<()> {
        let dom = self.domain()?;
        let result = lock(&dom).end_access(gref);
        result
    }

    /// How many live mappings of `gref` backends hold (`None` if not granted).
    pub fn map_count(&self, gref: GrantRef) -> Result<Option<u32>> {
        let dom = self.domain()?;
        let value = lock(&dom).map_count(gref);
        Ok(value)
    }

    /// Live mappings of this domain's grants, over all references.
    pub fn live_maps(&self) -> Result<usize> {
        let dom = self.domain()?;
        let value = lock(&dom).live_maps();
        Ok(value)
    }

    /// Grant copy segments that reached this domain's grants since it was
    /// created (each a page or less of data, or an indirect page).
    pub fn copy_segments(&self) -> Result<u64> {
        let dom = self.domain()?;
        let value = lock(&dom).copy_segments;
        Ok(value)
    }

    /// Number of references currently granted.
    pub fn granted(&self) -> Result<usize> {
        let dom = self.domain()?;
        let value = lock(&dom).granted();
        Ok(value)
    }
}

impl core::fmt::Debug for SimGrantTable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SimGrantTable").field("domid", &self.domid).finish()
    }
}

/// Drops the map pins of a grant mapping and unmaps it.
struct GrantUnmap {
    domain: Arc<Domain>,
    refs: Vec<GrantRef>,
}

impl Unmap for GrantUnmap {
    fn unmap(&mut self, addr: NonNull<u8>, len: usize) {
        unmap_range(addr, len);
        let mut table = lock(&self.domain);
        for r in &self.refs {
            table.release(*r, Pin::Map);
        }
    }
}

/// The backend side: maps and copies grants other domains gave to `domid`.
pub struct SimGrantMapper {
    host: Arc<SimHost>,
    domid: DomId,
}

impl SimGrantMapper {
    pub(crate) fn new(host: Arc<SimHost>, domid: DomId) -> Self {
        SimGrantMapper { host, domid }
    }

    fn copy_one(&self, seg: &mut CopySegment<'_>, cached: &mut Option<Arc<Domain>>) -> GrantStatus {
        let guest = seg.guest();
        let dom = match cached {
            Some(d) if d.id == guest.domid => d.clone(),
            _ => match self.host.domain(guest.domid) {
                Some(d) => {
                    *cached = Some(d.clone());
                    d
                }
                None => return GrantStatus::BadDomain,
            },
        };
        let write = matches!(seg, CopySegment::ToGuest { .. });
        let frame = match lock(&dom).acquire(guest.gref, self.domid, write, Pin::Copy) {
            Ok(f) => f,
            Err(status) => return status,
        };
        let offset = usize::from(guest.offset);
        let result = if offset + seg.len() > PAGE_SIZE {
            GrantStatus::BadCopyArg
        } else {
            let io = match seg {
                CopySegment::FromGuest { dst, .. } => dom.memory.read(frame, offset, dst),
                CopySegment::ToGuest { src, .. } => dom.memory.write(frame, offset, src),
            };
            match io {
                Ok(()) => GrantStatus::Okay,
                Err(e) => {
                    log::warn!("Grant copy on frame {frame} of dom{} failed: {e}", dom.id);
                    GrantStatus::GeneralError
                }
            }
        };
        lock(&dom).release(guest.gref, Pin::Copy);
        result
    }
}

impl GrantMapper for SimGrantMapper {
    fn map(&self, domid: DomId, refs: &[GrantRef], writable: bool) -> gnttab::Result<GrantMapping> {
        let first = *refs.first().ok_or(gnttab::Error::InvalidArgument("no grant references to map"))?;
        let dom =
            self.host.domain(domid).ok_or(gnttab::Error::Map { domid, gref: first, status: GrantStatus::BadDomain })?;
        let mut frames = Vec::with_capacity(refs.len());
        {
            let mut table = lock(&dom);
            for (i, r) in refs.iter().enumerate() {
                match table.acquire(*r, self.domid, writable, Pin::Map) {
                    Ok(f) => frames.push(f),
                    Err(status) => {
                        for done in &refs[..i] {
                            table.release(*done, Pin::Map);
                        }
                        return Err(gnttab::Error::Map { domid, gref: *r, status });
                    }
                }
            }
        }
        let addr = match dom.memory.map_frames(&frames, writable) {
            Ok(a) => a,
            Err(source) => {
                let mut table = lock(&dom);
                for r in refs {
                    table.release(*r, Pin::Map);
                }
                return Err(gnttab::Error::Op { op: "mmap", source });
            }
        };
        let unmap = GrantUnmap { domain: dom, refs: refs.to_vec() };
        // SAFETY: `addr` is a new mapping of `refs.len()` pages, writable only
        // if `writable`, released only by GrantUnmap.
        Ok(unsafe { GrantMapping::from_raw(addr, refs.len() * PAGE_SIZE, writable, Box::new(unmap)) })
    }

    fn copy(&self, segments: &mut [CopySegment<'_>], status: &mut [GrantStatus]) -> gnttab::Result<()> {
        if segments.len() != status.len() {
            return Err(gnttab::Error::InvalidArgument("status and segments differ in length"));
        }
        let mut cached = None;
        for (seg, st) in segments.iter_mut().zip(status.iter_mut()) {
            *st = self.copy_one(seg, &mut cached);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_start_after_the_reserved_entries_and_are_reused() {
        let mut t = GrantTable::new(1);
        let a = t.grant(0, 0, false).unwrap();
        let b = t.grant(1, 0, false).unwrap();
        assert_eq!(a, GrantRef(RESERVED_GRANT_ENTRIES));
        assert_eq!(b, GrantRef(RESERVED_GRANT_ENTRIES + 1));
        t.end_access(a).unwrap();
        assert_eq!(t.grant(2, 0, true).unwrap(), a);
    }

    #[test]
    fn acquire_reports_xen_statuses() {
        let mut t = GrantTable::new(1);
        let rw = t.grant(0, 0, false).unwrap();
        let ro = t.grant(1, 0, true).unwrap();
        assert_eq!(t.acquire(GrantRef(100_000), 0, false, Pin::Map), Err(GrantStatus::BadGntref));
        assert_eq!(t.acquire(GrantRef(RESERVED_GRANT_ENTRIES + 5), 0, false, Pin::Map), Err(GrantStatus::GeneralError));
        assert_eq!(t.acquire(rw, 2, false, Pin::Map), Err(GrantStatus::GeneralError));
        assert_eq!(t.acquire(ro, 0, true, Pin::Map), Err(GrantStatus::GeneralError));
        assert_eq!(t.acquire(ro, 0, false, Pin::Copy), Ok(1));
        assert_eq!(t.acquire(rw, 0, true, Pin::Map), Ok(0));
    }

    #[test]
    fn end_access_fails_while_pinned_and_succeeds_after_release() {
        let mut t = GrantTable::new(1);
        let g = t.grant(0, 0, false).unwrap();
        t.acquire(g, 0, true, Pin::Map).unwrap();
        assert!(matches!(t.end_access(g), Err(Error::Busy(r)) if r == g));
        assert_eq!(t.map_count(g), Some(1));
        t.release(g, Pin::Map);
        t.end_access(g).unwrap();
        assert!(matches!(t.end_access(g), Err(Error::NotGranted(_))));
    }

    #[test]
    fn table_grows_to_the_frame_limit_then_reports_full() {
        let mut t = GrantTable::new(1);
        let usable = MAX_GRANT_FRAMES * ENTRIES_PER_FRAME - RESERVED_GRANT_ENTRIES as usize;
        for _ in 0..usable {
            t.grant(0, 0, false).unwrap();
        }
        assert!(matches!(t.grant(0, 0, false), Err(Error::TableFull(1))));
    }
}
