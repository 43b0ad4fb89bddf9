//! Persistent grants (`feature-persistent`, `blkif.h`): the guest's data
//! pages mapped once and kept, so that reads and writes go between the disk
//! and the guest's pages with no copy and no grant operation per request.
//! Linux's blkfront negotiates them by default and then copies every
//! request's data into a pool of pages it keeps granted; Linux's blkback
//! keeps up to 1056 of them mapped per ring (`max_persistent_grants`).
//!
//! Rust code never reads or writes a mapped page: the pages go to the kernel
//! as an iovec array ([`MappedIo`]), the disk reads into or writes from
//! them, and the mappings stay alive (each op holds them) until the
//! operation completed. A guest that changes a page during a write changes
//! only its own data; metadata (the ring, indirect pages) is still copied
//! once before it is parsed.

use std::collections::HashMap;
use std::sync::Arc;

use blkif::Segment;
use gnttab::{DomId, GrantMapper, GrantMapping, GrantRef, PAGE_SIZE};

/// Persistent grants kept mapped per queue by default: Linux blkback's
/// `max_persistent_grants` (1056, a 32-slot ring of 11-segment requests
/// three times over). Grants beyond it are mapped for one request only.
pub const DEFAULT_PERSISTENT_GRANTS: usize = 1056;

/// A transfer straight between the disk and mapped guest pages: one iovec
/// per segment, the mappings held until the operation is dropped.
pub struct MappedIo {
    iov: Vec<nix::libc::iovec>,
    /// What is left of `iov` ([`MappedIo::remainder`]).
    rest: Vec<nix::libc::iovec>,
    len: usize,
    _pages: Vec<Arc<GrantMapping>>,
}

// SAFETY: the iovec pointers point into the mappings held in `_pages`
// (`GrantMapping` is Send and Sync), which stay mapped while `self` lives;
// nothing else about an iovec is tied to a thread.
unsafe impl Send for MappedIo {}

impl std::fmt::Debug for MappedIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedIo").field("segments", &self.iov.len()).field("len", &self.len).finish()
    }
}

impl MappedIo {
    /// Bytes transferred.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the transfer is empty (never, for a parsed request).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Cuts the transfer into consecutive parts of `counts[i]` segments
    /// each (`counts` summing to the segments), for a request whose I/O
    /// goes in parts: its grants are mapped once, and every part holds the
    /// mappings, which stay until the last part is dropped.
    pub fn split(self, counts: &[usize]) -> Vec<MappedIo> {
        debug_assert_eq!(counts.iter().sum::<usize>(), self.iov.len());
        let mut rest = &self.iov[..];
        counts
            .iter()
            .map(|&n| {
                let (iov, tail) = rest.split_at(n.min(rest.len()));
                rest = tail;
                let len = iov.iter().map(|v| v.iov_len).sum();
                MappedIo { iov: iov.to_vec(), rest: Vec::new(), len, _pages: self._pages.clone() }
            })
            .collect()
    }

    /// The iovecs of what is left after `done` bytes, for `preadv` and
    /// io_uring's `READV`/`WRITEV`: kept in `self` (the kernel may read
    /// them until the operation completes) until the next call.
    pub fn remainder(&mut self, mut done: usize) -> &[nix::libc::iovec] {
        self.rest.clear();
        for v in &self.iov {
            if done >= v.iov_len {
                done -= v.iov_len;
                continue;
            }
            // `wrapping_add` keeps the pointer arithmetic free of `unsafe`;
            // `done < iov_len`, so it stays inside the segment.
            let iov_base = v.iov_base.cast::<u8>().wrapping_add(done).cast();
            self.rest.push(nix::libc::iovec { iov_base, iov_len: v.iov_len - done });
            done = 0;
        }
        &self.rest
    }
}

/// Counters of one queue's persistent grants.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PersistentStats {
    /// Grants mapped and kept.
    pub kept: u64,
    /// Grants mapped for one request only (the cache was full).
    pub transient: u64,
    /// Segments served from a mapping kept by an earlier request.
    pub hits: u64,
    /// Grants the guest had not given (or not writable): the request was
    /// then copied, or failed as a copy would.
    pub refused: u64,
}

/// A grant's page: the `index`th page of a mapping made for a batch of
/// grants (one gntdev call and one VMA per batch, not per page).
#[derive(Clone)]
struct MappedPage {
    batch: Arc<GrantMapping>,
    index: usize,
}

/// The persistent grants of one queue.
pub struct PersistentGrants {
    grants: Arc<dyn GrantMapper>,
    frontend: DomId,
    mapped: HashMap<GrantRef, MappedPage>,
    capacity: usize,
    stats: PersistentStats,
}

impl PersistentGrants {
    /// Keeps up to `capacity` grants of `frontend` mapped.
    pub fn new(grants: Arc<dyn GrantMapper>, frontend: DomId, capacity: usize) -> Self {
        PersistentGrants { grants, frontend, mapped: HashMap::new(), capacity, stats: PersistentStats::default() }
    }

    /// Counters so far.
    pub fn stats(&self) -> PersistentStats {
        self.stats
    }

    /// Grants mapped now.
    pub fn mapped(&self) -> usize {
        self.mapped.len()
    }

    /// The transfer for `segments`, every grant mapped writable (blkfront
    /// grants persistent pages read-write, for reads and writes alike).
    /// The grants not mapped yet are mapped in one call, kept if they all
    /// fit the cache, else mapped for this request only. `None` if they
    /// cannot be mapped: the caller copies instead, so the guest gets what
    /// grant copy gives it (a read-only grant for a write works, a bad
    /// grant fails the request).
    pub fn io(&mut self, segments: &[Segment]) -> Option<MappedIo> {
        // The grants not mapped yet, and their index in the batch.
        let mut new: Vec<GrantRef> = Vec::new();
        let mut index_of: HashMap<GrantRef, usize> = HashMap::new();
        for seg in segments {
            if !self.mapped.contains_key(&seg.gref) && !index_of.contains_key(&seg.gref) {
                index_of.insert(seg.gref, new.len());
                new.push(seg.gref);
            }
        }
        // The batch, if mapped for this request only.
        let mut transient = None;
        if !new.is_empty() {
            let batch = match self.grants.map(self.frontend, &new, true) {
                Ok(m) => Arc::new(m),
                Err(e) => {
                    log::debug!("dom{}: {} grant(s) not mapped persistently: {e}", self.frontend, new.len());
                    self.stats.refused += 1;
                    return None;
                }
            };
            if self.mapped.len() + new.len() <= self.capacity {
                self.stats.kept += new.len() as u64;
                for (index, gref) in new.iter().enumerate() {
                    self.mapped.insert(*gref, MappedPage { batch: batch.clone(), index });
                }
            } else {
                self.stats.transient += new.len() as u64;
                transient = Some(batch);
            }
        }
        let mut iov = Vec::with_capacity(segments.len());
        let mut pages: Vec<Arc<GrantMapping>> = Vec::new();
        let mut len = 0;
        for seg in segments {
            let page = match (self.mapped.get(&seg.gref), &transient) {
                (Some(p), _) => {
                    if !index_of.contains_key(&seg.gref) {
                        self.stats.hits += 1;
                    }
                    p.clone()
                }
                (None, Some(batch)) => MappedPage { batch: batch.clone(), index: index_of[&seg.gref] },
                (None, None) => unreachable!("a grant neither kept nor in this request's batch"),
            };
            let at = page.index * PAGE_SIZE + usize::from(seg.page_offset());
            // Segments were checked against the page when parsed: the range
            // is within the one page of the batch.
            debug_assert!(at + seg.len() <= page.batch.len());
            iov.push(nix::libc::iovec { iov_base: page.batch.as_ptr().wrapping_add(at).cast(), iov_len: seg.len() });
            len += seg.len();
            if !pages.last().is_some_and(|b| Arc::ptr_eq(b, &page.batch)) {
                pages.push(page.batch);
            }
        }
        Some(MappedIo { iov, rest: Vec::new(), len, _pages: pages })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Maps any grant below 100 as fresh anonymous pages, counting calls.
    #[derive(Default)]
    struct Pages {
        calls: AtomicUsize,
    }

    impl GrantMapper for Pages {
        fn map(&self, domid: DomId, refs: &[GrantRef], _: bool) -> gnttab::Result<GrantMapping> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            if let Some(bad) = refs.iter().find(|r| r.0 >= 100) {
                return Err(gnttab::Error::Map { domid, gref: *bad, status: gnttab::GrantStatus::BadGntref });
            }
            Ok(GrantMapping::anonymous(refs.len() * PAGE_SIZE).unwrap())
        }

        fn copy(&self, _: &mut [gnttab::CopySegment<'_>], _: &mut [gnttab::GrantStatus]) -> gnttab::Result<()> {
            unreachable!("nothing is copied here")
        }
    }

    fn segs(refs: &[u32]) -> Vec<Segment> {
        refs.iter().map(|&r| Segment { gref: GrantRef(r), first_sect: 0, last_sect: 7 }).collect()
    }

    #[test]
    fn new_grants_of_a_request_are_mapped_in_one_call_and_kept() {
        let pages = Arc::new(Pages::default());
        let mut p = PersistentGrants::new(pages.clone(), 1, 8);
        let io = p.io(&segs(&[1, 2, 3, 2])).unwrap();
        assert_eq!((io.len(), pages.calls.load(Ordering::Relaxed), p.mapped()), (4 * 4096, 1, 3));
        // All kept now: no more calls.
        p.io(&segs(&[3, 1])).unwrap();
        assert_eq!(pages.calls.load(Ordering::Relaxed), 1);
        assert_eq!(p.stats(), PersistentStats { kept: 3, transient: 0, hits: 2, refused: 0 });
    }

    #[test]
    fn beyond_the_capacity_a_batch_is_mapped_for_its_request_only() {
        let pages = Arc::new(Pages::default());
        let mut p = PersistentGrants::new(pages.clone(), 1, 2);
        p.io(&segs(&[1, 2])).unwrap();
        for _ in 0..3 {
            p.io(&segs(&[1, 5, 6])).unwrap();
        }
        assert_eq!(p.mapped(), 2);
        assert_eq!(pages.calls.load(Ordering::Relaxed), 4);
        assert_eq!(p.stats(), PersistentStats { kept: 2, transient: 6, hits: 3, refused: 0 });
    }

    #[test]
    fn a_grant_that_cannot_be_mapped_gives_none_and_keeps_nothing() {
        let mut p = PersistentGrants::new(Arc::new(Pages::default()), 1, 8);
        assert!(p.io(&segs(&[1, 100])).is_none());
        assert_eq!((p.mapped(), p.stats().refused), (0, 1));
    }

    #[test]
    fn a_split_transfer_keeps_its_segments_in_order_and_its_pages_mapped_in_every_part() {
        let mut p = PersistentGrants::new(Arc::new(Pages::default()), 1, 8);
        let io = p.io(&segs(&[1, 2, 3, 4, 5])).unwrap();
        let bases: Vec<usize> = io.iov.iter().map(|v| v.iov_base as usize).collect();
        let parts = io.split(&[2, 2, 1]);
        assert_eq!(parts.iter().map(MappedIo::len).collect::<Vec<_>>(), [8192, 8192, 4096]);
        let split_bases: Vec<usize> = parts.iter().flat_map(|m| m.iov.iter().map(|v| v.iov_base as usize)).collect();
        assert_eq!(split_bases, bases);
        // The batch's mapping is held by the cache and each part.
        assert!(parts.iter().all(|m| m._pages.len() == 1));
        assert_eq!(Arc::strong_count(&parts[0]._pages[0]), 5 + 3);
    }

    #[test]
    fn the_remainder_skips_what_was_transferred() {
        let mut p = PersistentGrants::new(Arc::new(Pages::default()), 1, 8);
        let mut segments = segs(&[1, 2]);
        segments[1] = Segment { gref: GrantRef(2), first_sect: 2, last_sect: 3 };
        let mut io = p.io(&segments).unwrap();
        assert_eq!(io.len(), 4096 + 1024);
        let lens = |io: &mut MappedIo, done| io.remainder(done).iter().map(|v| v.iov_len).collect::<Vec<_>>();
        assert_eq!(lens(&mut io, 0), [4096, 1024]);
        assert_eq!(lens(&mut io, 1000), [3096, 1024]);
        assert_eq!(lens(&mut io, 4096), [1024]);
        assert_eq!(lens(&mut io, 4096 + 1024), Vec::<usize>::new());
        let base = io.remainder(4096 + 512)[0].iov_base as usize;
        assert_eq!(base, io.remainder(4096)[0].iov_base as usize + 512);
    }
}
