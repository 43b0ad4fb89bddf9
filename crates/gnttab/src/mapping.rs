//! Memory shared with a guest, reached only through volatile and atomic
//! accessors: the guest may change it at any moment, so no Rust reference
//! (`&[u8]`, `&T`) into it is ever handed out.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

/// Releases a mapping when it is dropped (gntdev unmap + munmap, or the
/// simulator's bookkeeping).
pub trait Unmap: Send + Sync {
    /// Called once, from `Drop`, with the mapping's address and length.
    fn unmap(&mut self, addr: NonNull<u8>, len: usize);
}

/// A contiguous range of shared pages: grant-mapped guest pages, or anonymous
/// memory for tests. Dropping it unmaps it.
pub struct GrantMapping {
    addr: NonNull<u8>,
    len: usize,
    writable: bool,
    unmap: Option<Box<dyn Unmap>>,
}

// SAFETY: the mapping is plain memory reachable from any thread; all access
// goes through volatile/atomic operations, and `Unmap` is `Send + Sync`.
unsafe impl Send for GrantMapping {}
// SAFETY: as above: no method hands out references, so shared access from
// several threads is the same as a guest writing concurrently.
unsafe impl Sync for GrantMapping {}

/// An access outside the mapping, or a write to a read-only one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccessError {
    /// Offset and length reach past the end of the mapping.
    #[error("Access at {offset}+{len} is outside a mapping of {size} bytes")]
    OutOfBounds {
        /// Start of the access.
        offset: usize,
        /// Its length.
        len: usize,
        /// Size of the mapping.
        size: usize,
    },
    /// The mapping is read-only.
    #[error("Write to a read-only mapping")]
    ReadOnly,
    /// An atomic access that is not 4-byte aligned.
    #[error("Unaligned atomic access at {0}")]
    Unaligned(usize),
}

struct Munmap;

impl Unmap for Munmap {
    fn unmap(&mut self, addr: NonNull<u8>, len: usize) {
        // SAFETY: `addr`/`len` are exactly what `anonymous()` or
        // `shared_file()` got from mmap, and this runs once, from Drop, when
        // nothing else can reach them.
        if let Err(e) = unsafe { nix::sys::mman::munmap(addr.cast(), len) } {
            log::warn!("munmap failed: {e}");
        }
    }
}

impl GrantMapping {
    /// Wraps memory mapped elsewhere.
    ///
    /// # Safety
    /// `addr` must point to `len` bytes that stay mapped (readable, and
    /// writable if `writable`) until `unmap` runs, and that nothing frees
    /// otherwise.
    pub unsafe fn from_raw(addr: NonNull<u8>, len: usize, writable: bool, unmap: Box<dyn Unmap>) -> Self {
        GrantMapping { addr, len, writable, unmap: Some(unmap) }
    }

    /// Zeroed anonymous memory of `len` bytes, writable (tests, fuzzing, and
    /// the frontend side of simulated rings). Private to this process, which
    /// all its threads share; miri supports only such mappings.
    pub fn anonymous(len: usize) -> std::io::Result<Self> {
        use nix::sys::mman::{mmap_anonymous, MapFlags, ProtFlags};
        let size =
            std::num::NonZeroUsize::new(len).ok_or_else(|| std::io::Error::from_raw_os_error(nix::libc::EINVAL))?;
        // SAFETY: a fresh anonymous mapping aliases nothing in this process.
        let addr =
            unsafe { mmap_anonymous(None, size, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_PRIVATE) }
                .map_err(std::io::Error::from)?;
        // SAFETY: `addr` is a new mapping of `len` bytes released only by Munmap.
        Ok(unsafe { GrantMapping::from_raw(addr.cast(), len, true, Box::new(Munmap)) })
    }

    /// The first `len` bytes of `file` mapped shared and writable: memory
    /// that outlives this process (a ring's request journal on tmpfs, read
    /// by the next backend process after a crash). The file must be at
    /// least `len` bytes long; the mapping keeps no reference to `file`.
    pub fn shared_file(file: &std::fs::File, len: usize) -> std::io::Result<Self> {
        use nix::sys::mman::{mmap, MapFlags, ProtFlags};
        let size =
            std::num::NonZeroUsize::new(len).ok_or_else(|| std::io::Error::from_raw_os_error(nix::libc::EINVAL))?;
        if file.metadata()?.len() < len as u64 {
            // A mapping past the end of the file faults (SIGBUS) when touched.
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "file shorter than the mapping"));
        }
        // SAFETY: a new shared mapping of a file we hold open; the address is
        // the kernel's choice, so it aliases nothing in this process. Other
        // processes may write the file: all access is volatile or atomic.
        let addr =
            unsafe { mmap(None, size, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, MapFlags::MAP_SHARED, file, 0) }
                .map_err(std::io::Error::from)?;
        // SAFETY: `addr` is a new mapping of `len` bytes released only by Munmap (a plain munmap).
        Ok(unsafe { GrantMapping::from_raw(addr.cast(), len, true, Box::new(Munmap)) })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether writes are allowed.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The start address (for handing to the kernel, e.g. as an I/O buffer).
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), AccessError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(AccessError::OutOfBounds { offset, len, size: self.len }),
        }
    }

    /// Copies `buf.len()` bytes at `offset` out of the mapping.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), AccessError> {
        self.check(offset, buf.len())?;
        // SAFETY: offset + buf.len() <= len was checked.
        let src = unsafe { self.addr.as_ptr().add(offset) };
        let (head, body, _) = words(src as usize, buf.len());
        for i in (0..head).chain(body..buf.len()) {
            // SAFETY: i < buf.len(), within the checked range; mapped readable.
            buf[i] = unsafe { src.add(i).read_volatile() };
        }
        for (k, chunk) in buf[head..body].chunks_exact_mut(8).enumerate() {
            // SAFETY: head..body is within the checked range and 8-aligned
            // at `src + head` (`words`); one volatile load per word, a
            // guest changing the page meanwhile tears nothing we rely on:
            // what is read is a copy, parsed after.
            let w = unsafe { src.add(head + 8 * k).cast::<u64>().read_volatile() };
            chunk.copy_from_slice(&w.to_ne_bytes());
        }
        Ok(())
    }

    /// Copies `buf` into the mapping at `offset`.
    pub fn write(&self, offset: usize, buf: &[u8]) -> Result<(), AccessError> {
        if !self.writable {
            return Err(AccessError::ReadOnly);
        }
        self.check(offset, buf.len())?;
        // SAFETY: offset + buf.len() <= len was checked.
        let dst = unsafe { self.addr.as_ptr().add(offset) };
        let (head, body, _) = words(dst as usize, buf.len());
        for i in (0..head).chain(body..buf.len()) {
            // SAFETY: i < buf.len(), within the checked range; writable.
            unsafe { dst.add(i).write_volatile(buf[i]) };
        }
        for (k, chunk) in buf[head..body].chunks_exact(8).enumerate() {
            let w = u64::from_ne_bytes(chunk.try_into().expect("8 bytes"));
            // SAFETY: head..body is within the checked range and 8-aligned
            // at `dst + head` (`words`); the mapping is writable.
            unsafe { dst.add(head + 8 * k).cast::<u64>().write_volatile(w) };
        }
        Ok(())
    }

    /// Fills `len` bytes at `offset` with `value`.
    pub fn fill(&self, offset: usize, len: usize, value: u8) -> Result<(), AccessError> {
        if !self.writable {
            return Err(AccessError::ReadOnly);
        }
        self.check(offset, len)?;
        for i in 0..len {
            // SAFETY: offset + i < len was checked; the mapping is writable.
            unsafe { self.addr.as_ptr().add(offset + i).write_volatile(value) };
        }
        Ok(())
    }

    fn atomic(&self, offset: usize) -> Result<&AtomicU32, AccessError> {
        self.check(offset, 4)?;
        if (self.addr.as_ptr() as usize + offset) % 4 != 0 {
            return Err(AccessError::Unaligned(offset));
        }
        // The reference is to an atomic, never plain data, and stays in this module.
        // SAFETY: in bounds and aligned (checked above); AtomicU32 has u32's layout.
        Ok(unsafe { AtomicU32::from_ptr(self.addr.as_ptr().add(offset).cast()) })
    }

    /// Atomically loads the little-endian `u32` at `offset` (4-byte aligned).
    pub fn load_u32(&self, offset: usize, order: Ordering) -> Result<u32, AccessError> {
        Ok(u32::from_le(self.atomic(offset)?.load(order)))
    }

    /// Atomically stores a little-endian `u32` at `offset` (4-byte aligned).
    pub fn store_u32(&self, offset: usize, value: u32, order: Ordering) -> Result<(), AccessError> {
        if !self.writable {
            return Err(AccessError::ReadOnly);
        }
        self.atomic(offset)?.store(value.to_le(), order);
        Ok(())
    }
}

impl Drop for GrantMapping {
    fn drop(&mut self) {
        if let Some(mut u) = self.unmap.take() {
            u.unmap(self.addr, self.len);
        }
    }
}

impl core::fmt::Debug for GrantMapping {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("GrantMapping")
            .field("addr", &self.addr)
            .field("len", &self.len)
            .field("writable", &self.writable)
            .finish()
    }
}

/// Splits `len` bytes at address `addr` into a head of single bytes up to
/// 8-byte alignment, a body of whole aligned words (`head..body`), and a
/// tail of bytes (`body..len`): a ring request of 112 bytes is copied in 14
/// loads instead of 112.
fn words(addr: usize, len: usize) -> (usize, usize, usize) {
    let head = addr.wrapping_neg() % 8;
    if head >= len {
        return (len, len, 0);
    }
    let body = head + (len - head) / 8 * 8;
    (head, body, len - body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_mapping_reads_back_writes() {
        let m = GrantMapping::anonymous(4096).unwrap();
        m.write(10, b"hello").unwrap();
        let mut buf = [0u8; 5];
        m.read(10, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        m.store_u32(8, 0xdead_beef, Ordering::Release).unwrap();
        assert_eq!(m.load_u32(8, Ordering::Acquire).unwrap(), 0xdead_beef);
    }

    #[test]
    fn reads_and_writes_at_every_alignment_and_length_match_bytewise() {
        let m = GrantMapping::anonymous(4096).unwrap();
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        m.write(0, &pattern).unwrap();
        for offset in 0..17 {
            for len in [0, 1, 7, 8, 9, 15, 16, 17, 63, 112, 1000] {
                let mut got = vec![0u8; len];
                m.read(offset, &mut got).unwrap();
                assert_eq!(got, pattern[offset..offset + len], "read at {offset}, {len} bytes");
            }
        }
        for offset in 0..17 {
            for len in [1, 7, 8, 9, 17, 112] {
                let data: Vec<u8> = (0..len).map(|i| (i as u8) ^ 0xa5 ^ offset as u8).collect();
                m.write(100 + offset, &data).unwrap();
                let mut all = vec![0u8; 4096];
                m.read(0, &mut all).unwrap();
                let mut want = pattern.clone();
                want[100 + offset..100 + offset + len].copy_from_slice(&data);
                assert_eq!(all, want, "write at {}, {len} bytes", 100 + offset);
                m.write(0, &pattern).unwrap();
            }
        }
        assert_eq!(words(8, 0), (0, 0, 0));
        assert_eq!(words(3, 4), (4, 4, 0));
        assert_eq!(words(3, 30), (5, 29, 1));
    }

    #[test]
    fn accesses_outside_the_mapping_fail() {
        let m = GrantMapping::anonymous(4096).unwrap();
        let mut buf = [0u8; 2];
        assert!(m.read(4095, &mut buf).is_err());
        assert!(m.read(usize::MAX, &mut buf).is_err());
        assert!(m.load_u32(4093, Ordering::Relaxed).is_err());
        assert_eq!(m.load_u32(2, Ordering::Relaxed), Err(AccessError::Unaligned(2)));
    }
}
