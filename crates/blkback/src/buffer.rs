//! Page-aligned bounce buffers, as `O_DIRECT` needs, and the memory budget
//! they are counted against.
//!
//! Every buffer a queue allocates is charged to its [`QueueBudget`] and
//! through it to the daemon's [`BufferBudget`] until it is dropped (in flight
//! or kept spare alike), so bytes held are bounded per queue and per daemon
//! whatever a guest sends. A request that would go beyond waits in the
//! guest's ring (`queue.rs`).
//!
//! Contents: a new buffer is zero (large ones are fresh anonymous pages
//! from `mmap`, which the kernel gives zeroed, so nothing is written on our
//! side); a reused one keeps what its queue last put there, which is data of
//! the same guest and disk only (spare buffers are per queue).

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Alignment of every buffer: a page, which covers any logical sector size.
pub const BUFFER_ALIGN: usize = 4096;

/// From this size on a buffer is its own anonymous mapping: zero pages from
/// the kernel, no `memset` of ours (the allocator zeroes an over-aligned
/// block by hand), and its memory goes back to the system when dropped.
const MMAP_FROM: usize = 64 << 10;

/// Bytes of bounce buffers the whole daemon may hold.
#[derive(Debug)]
pub struct BufferBudget {
    limit: usize,
    held: AtomicUsize,
    peak: AtomicUsize,
    /// Queues waiting for the daemon's budget with nothing in flight.
    waiting: AtomicUsize,
    allocations: AtomicU64,
}

impl BufferBudget {
    /// A budget of `limit` bytes (at least one largest request, 1 MiB).
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(BufferBudget {
            limit: limit.max(MAX_REQUEST_BYTES),
            held: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            allocations: AtomicU64::new(0),
        })
    }

    /// The limit in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Most bytes held at once so far.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Buffers allocated so far.
    pub fn allocations(&self) -> u64 {
        self.allocations.load(Ordering::Relaxed)
    }

    /// Takes `bytes` if they fit. A queue with requests in flight (`busy`)
    /// gives way while another waits with none: its own completions will
    /// call it again, the waiter has nothing else.
    fn take(&self, bytes: usize, busy: bool) -> bool {
        if busy && self.waiting.load(Ordering::Relaxed) > 0 {
            return false;
        }
        let taken = self.held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
            held.checked_add(bytes).filter(|&h| h <= self.limit)
        });
        match taken {
            Ok(before) => {
                self.peak.fetch_max(before + bytes, Ordering::Relaxed);
                self.allocations.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => false,
        }
    }

    fn give_back(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// The largest request: 256 indirect segments of a page (1 MiB).
pub const MAX_REQUEST_BYTES: usize = 256 * BUFFER_ALIGN;

/// One queue's share: bytes of its buffers (in flight and spare), bounded by
/// its own limit and charged to the daemon's [`BufferBudget`].
#[derive(Debug)]
pub struct QueueBudget {
    limit: usize,
    held: AtomicUsize,
    peak: AtomicUsize,
    daemon: Arc<BufferBudget>,
    waiting: std::sync::atomic::AtomicBool,
}

/// Why a buffer was not given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverBudget {
    /// The queue's own limit.
    Queue,
    /// The daemon's.
    Daemon,
}

impl QueueBudget {
    /// A queue's share of `limit` bytes (at least one largest request).
    pub fn new(limit: usize, daemon: Arc<BufferBudget>) -> Arc<Self> {
        Arc::new(QueueBudget {
            limit: limit.max(MAX_REQUEST_BYTES),
            held: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            daemon,
            waiting: Default::default(),
        })
    }

    /// Bytes held now (in flight and spare).
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Most bytes this queue held at once.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// A new buffer of at least `len` bytes, charged to this queue and the
    /// daemon. `busy`: the queue has requests in flight.
    pub fn alloc(self: &Arc<Self>, len: usize, busy: bool) -> Result<AlignedBuf, OverBudget> {
        let capacity = capacity_for(len);
        let held = self.held.load(Ordering::Relaxed);
        if held + capacity > self.limit {
            return Err(OverBudget::Queue);
        }
        if !self.daemon.take(capacity, busy && !self.waiting.load(Ordering::Relaxed)) {
            if !busy && !self.waiting.swap(true, Ordering::Relaxed) {
                self.daemon.waiting.fetch_add(1, Ordering::Relaxed);
            }
            return Err(OverBudget::Daemon);
        }
        self.stop_waiting();
        // Only this queue's worker allocates: no race on the queue's share.
        let now = self.held.fetch_add(capacity, Ordering::Relaxed) + capacity;
        self.peak.fetch_max(now, Ordering::Relaxed);
        Ok(AlignedBuf::with_capacity(capacity, Some(self.clone())))
    }

    /// Whether a queue waits for the daemon's budget with nothing in flight.
    pub fn daemon_has_waiters(&self) -> bool {
        self.daemon.waiting.load(Ordering::Relaxed) > 0
    }

    fn stop_waiting(&self) {
        if self.waiting.swap(false, Ordering::Relaxed) {
            self.daemon.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn release(&self, capacity: usize) {
        self.held.fetch_sub(capacity, Ordering::Relaxed);
        self.daemon.give_back(capacity);
    }
}

impl Drop for QueueBudget {
    fn drop(&mut self) {
        self.stop_waiting();
    }
}

fn capacity_for(len: usize) -> usize {
    len.max(1).next_multiple_of(BUFFER_ALIGN)
}

/// An owned, page-aligned, initialised byte buffer (zero when new).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
    charged: Option<Arc<QueueBudget>>,
}

// SAFETY: the buffer owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only reads through `&self`, like a Vec<u8>.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A buffer able to hold `capacity` bytes, with length `capacity`,
    /// counted against no budget.
    pub fn new(capacity: usize) -> Self {
        Self::with_capacity(capacity_for(capacity), None)
    }

    fn with_capacity(capacity: usize, charged: Option<Arc<QueueBudget>>) -> Self {
        let ptr = if capacity >= MMAP_FROM {
            use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};
            let size = std::num::NonZeroUsize::new(capacity).expect("non-zero capacity");
            // SAFETY: a new private anonymous mapping, aliasing nothing.
            let mapped = unsafe {
                mmap_anonymous(None, size, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_PRIVATE)
            };
            match mapped {
                Ok(p) => p.cast::<u8>(),
                Err(_) => std::alloc::handle_alloc_error(Self::layout(capacity)),
            }
        } else {
            let layout = Self::layout(capacity);
            // SAFETY: the layout has a non-zero size.
            let raw = unsafe { alloc_zeroed(layout) };
            NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout))
        };
        AlignedBuf { ptr, len: capacity, capacity, charged }
    }

    fn layout(capacity: usize) -> Layout {
        Layout::from_size_align(capacity, BUFFER_ALIGN).expect("valid buffer layout")
    }

    /// Sets the length (at most the capacity); contents are kept.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity, "length {len} beyond capacity {}", self.capacity);
        self.len = len;
    }

    /// Capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for `capacity` initialised bytes and len <= capacity.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in Deref, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.capacity >= MMAP_FROM {
            // SAFETY: mapped in `with_capacity` with exactly this size, unmapped once.
            if let Err(e) = unsafe { nix::sys::mman::munmap(self.ptr.cast(), self.capacity) } {
                log::error!("munmap of a bounce buffer: {e}");
            }
        } else {
            // SAFETY: allocated in `with_capacity` with exactly this layout, freed once.
            unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.capacity)) };
        }
        if let Some(budget) = self.charged.take() {
            budget.release(self.capacity);
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} of {})", self.len, self.capacity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_page_aligned_and_zeroed() {
        for size in [1000, 1 << 20] {
            let mut b = AlignedBuf::new(size);
            assert_eq!(b.as_ptr() as usize % BUFFER_ALIGN, 0);
            assert_eq!(b.capacity(), size.next_multiple_of(4096));
            assert!(b.iter().all(|&x| x == 0));
            b.set_len(512);
            b[511] = 1;
            assert_eq!(b.len(), 512);
        }
    }

    #[test]
    fn buffers_are_charged_until_dropped_and_never_beyond_either_limit() {
        let daemon = BufferBudget::new(2 << 20);
        let a = QueueBudget::new(1 << 20, daemon.clone());
        let b = QueueBudget::new(4 << 20, daemon.clone());
        let one = a.alloc(1 << 20, false).unwrap();
        assert_eq!(a.alloc(4096, true).unwrap_err(), OverBudget::Queue);
        let two = b.alloc(1 << 20, false).unwrap();
        assert_eq!(b.alloc(4096, true).unwrap_err(), OverBudget::Daemon);
        assert_eq!((daemon.held(), daemon.peak()), (2 << 20, 2 << 20));
        drop(one);
        assert_eq!((a.held(), daemon.held()), (0, 1 << 20));
        drop(two);
        assert_eq!((b.held(), daemon.held(), daemon.allocations()), (0, 0, 2));
    }

    #[test]
    fn a_busy_queue_gives_way_to_one_waiting_with_nothing_in_flight() {
        let daemon = BufferBudget::new(1 << 20);
        let busy = QueueBudget::new(1 << 20, daemon.clone());
        let idle = QueueBudget::new(1 << 20, daemon.clone());
        let held = busy.alloc(1 << 20, false).unwrap();
        assert_eq!(idle.alloc(1 << 20, false).unwrap_err(), OverBudget::Daemon);
        drop(held);
        assert_eq!(busy.alloc(4096, true).unwrap_err(), OverBudget::Daemon, "the waiter goes first");
        let got = idle.alloc(1 << 20, false).unwrap();
        drop(got);
        assert!(busy.alloc(4096, true).is_ok());
    }
}
