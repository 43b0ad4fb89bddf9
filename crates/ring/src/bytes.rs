//! Byte rings: the flex rings of `io/ring.h` (`DEFINE_XEN_FLEX_RING`) that
//! the console (`io/console.h`) and 9pfs (`io/9pfs.h`) use. One direction is
//! an array of `2^n` bytes and two free-running 32-bit indices, masked into
//! the array; the producer owns `prod`, the consumer `cons`.
//!
//! As for the request rings: the peer's index is loaded with `Acquire`
//! before the bytes are touched (ring.h's `virt_mb()` after reading the
//! indices), our own is stored with `Release` after them (`virt_wmb()` /
//! `virt_mb()` before publishing it), bytes are copied through the
//! mapping's volatile accessors, and our own index is kept privately, so a
//! peer that rewrites it changes nothing. A peer whose index puts more than
//! the array between `cons` and `prod` breaks the ring
//! ([`RingError::Overflow`], [`RingError::ConsumerOverflow`]), as Linux's
//! hvc_xen refuses "illegal ring page indices".

use std::borrow::Borrow;
use std::sync::atomic::Ordering;

use gnttab::GrantMapping;

use crate::error::RingError;

/// Where one direction of a flex ring lives in the shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteRingLayout {
    /// Offset of the byte array.
    pub data: usize,
    /// Length of the byte array: a power of two.
    pub size: u32,
    /// Offset of the consumer index.
    pub cons: usize,
    /// Offset of the producer index.
    pub prod: usize,
}

impl ByteRingLayout {
    fn check(&self, len: usize) -> Result<(), RingError> {
        let fits = |off: usize, n: usize| off.checked_add(n).is_some_and(|end| end <= len);
        let ok = self.size.is_power_of_two()
            && fits(self.data, self.size as usize)
            && fits(self.cons, 4)
            && fits(self.prod, 4)
            && self.cons % 4 == 0
            && self.prod % 4 == 0;
        if ok {
            Ok(())
        } else {
            Err(RingError::BadLayout { len })
        }
    }

    /// The ranges of the array holding `n` bytes from index `idx` (two
    /// when they wrap past its end).
    fn chunks(&self, idx: u32, n: usize) -> [(usize, usize); 2] {
        let start = (idx & (self.size - 1)) as usize;
        let first = n.min(self.size as usize - start);
        [(self.data + start, first), (self.data, n - first)]
    }
}

/// The memory and layout of one direction, and whether the peer broke it.
#[derive(Debug)]
struct Flex<M> {
    mem: M,
    layout: ByteRingLayout,
    broken: bool,
}

impl<M: Borrow<GrantMapping>> Flex<M> {
    fn new(mem: M, layout: ByteRingLayout) -> Result<Self, RingError> {
        let m = mem.borrow();
        if !m.is_writable() {
            return Err(RingError::ReadOnly);
        }
        layout.check(m.len())?;
        Ok(Flex { mem, layout, broken: false })
    }

    fn mem(&self) -> &GrantMapping {
        self.mem.borrow()
    }

    fn check_usable(&self) -> Result<(), RingError> {
        if self.broken {
            Err(RingError::Broken)
        } else {
            Ok(())
        }
    }

    /// `e`, and the ring is broken from now on.
    fn fail<T>(&mut self, e: RingError) -> Result<T, RingError> {
        self.broken = true;
        Err(e)
    }
}

/// The consuming end of one direction of a byte ring (a console backend's
/// `out`, a console frontend's `in`).
#[derive(Debug)]
pub struct ByteReader<M = GrantMapping> {
    flex: Flex<M>,
    cons: u32,
}

impl<M: Borrow<GrantMapping>> ByteReader<M> {
    /// Attaches to the direction at `layout` of `mem`, from the consumer
    /// index found there (0 on a fresh page; where a previous consumer
    /// stopped otherwise).
    pub fn new(mem: M, layout: ByteRingLayout) -> Result<Self, RingError> {
        let flex = Flex::new(mem, layout)?;
        let cons = flex.mem().load_u32(layout.cons, Ordering::Relaxed)?;
        Ok(ByteReader { flex, cons })
    }

    /// Our consumer index.
    pub fn cons(&self) -> u32 {
        self.cons
    }

    /// Whether a bad peer index made the ring unusable.
    pub fn is_broken(&self) -> bool {
        self.flex.broken
    }

    /// The bytes the producer published and we have not read.
    pub fn available(&mut self) -> Result<u32, RingError> {
        self.flex.check_usable()?;
        let prod = self.flex.mem().load_u32(self.flex.layout.prod, Ordering::Acquire)?;
        let queued = prod.wrapping_sub(self.cons);
        if queued > self.flex.layout.size {
            return self.flex.fail(RingError::Overflow { prod, base: self.cons, limit: self.flex.layout.size });
        }
        Ok(queued)
    }

    /// Copies up to `out.len()` published bytes into `out`, once, and
    /// gives their room back to the producer. Returns how many.
    pub fn read(&mut self, out: &mut [u8]) -> Result<usize, RingError> {
        let n = out.len().min(self.available()? as usize);
        let mut at = 0;
        for (offset, len) in self.flex.layout.chunks(self.cons, n) {
            self.flex.mem().read(offset, &mut out[at..at + len])?;
            at += len;
        }
        self.cons = self.cons.wrapping_add(n as u32);
        // Release: the bytes are read before the producer may reuse them.
        self.flex.mem().store_u32(self.flex.layout.cons, self.cons, Ordering::Release)?;
        Ok(n)
    }
}

/// The producing end of one direction of a byte ring (a console backend's
/// `in`, a console frontend's `out`).
#[derive(Debug)]
pub struct ByteWriter<M = GrantMapping> {
    flex: Flex<M>,
    prod: u32,
}

impl<M: Borrow<GrantMapping>> ByteWriter<M> {
    /// Attaches to the direction at `layout` of `mem`, from the producer
    /// index found there.
    pub fn new(mem: M, layout: ByteRingLayout) -> Result<Self, RingError> {
        let flex = Flex::new(mem, layout)?;
        let prod = flex.mem().load_u32(layout.prod, Ordering::Relaxed)?;
        Ok(ByteWriter { flex, prod })
    }

    /// Our producer index.
    pub fn prod(&self) -> u32 {
        self.prod
    }

    /// Whether a bad peer index made the ring unusable.
    pub fn is_broken(&self) -> bool {
        self.flex.broken
    }

    /// The room left for bytes.
    pub fn space(&mut self) -> Result<u32, RingError> {
        self.flex.check_usable()?;
        let cons = self.flex.mem().load_u32(self.flex.layout.cons, Ordering::Acquire)?;
        let queued = self.prod.wrapping_sub(cons);
        if queued > self.flex.layout.size {
            return self.flex.fail(RingError::ConsumerOverflow { cons, prod: self.prod, size: self.flex.layout.size });
        }
        Ok(self.flex.layout.size - queued)
    }

    /// Copies as much of `data` as there is room for and publishes it.
    /// Returns how many bytes.
    pub fn write(&mut self, data: &[u8]) -> Result<usize, RingError> {
        let n = data.len().min(self.space()? as usize);
        let mut at = 0;
        for (offset, len) in self.flex.layout.chunks(self.prod, n) {
            self.flex.mem().write(offset, &data[at..at + len])?;
            at += len;
        }
        self.prod = self.prod.wrapping_add(n as u32);
        // Release: the bytes are in the array before the consumer sees them.
        self.flex.mem().store_u32(self.flex.layout.prod, self.prod, Ordering::Release)?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::abi::{XENCONS_IN, XENCONS_OUT};

    fn page() -> Arc<GrantMapping> {
        Arc::new(GrantMapping::anonymous(4096).unwrap())
    }

    fn pair(layout: ByteRingLayout) -> (ByteWriter<Arc<GrantMapping>>, ByteReader<Arc<GrantMapping>>) {
        let mem = page();
        (ByteWriter::new(mem.clone(), layout).unwrap(), ByteReader::new(mem, layout).unwrap())
    }

    #[test]
    fn bytes_written_are_read_once_and_in_order() {
        let (mut w, mut r) = pair(XENCONS_OUT);
        assert_eq!(w.write(b"hello ").unwrap(), 6);
        assert_eq!(w.write(b"world").unwrap(), 5);
        let mut out = [0u8; 64];
        assert_eq!(r.read(&mut out).unwrap(), 11);
        assert_eq!(&out[..11], b"hello world");
        assert_eq!(r.read(&mut out).unwrap(), 0);
    }

    #[test]
    fn a_full_ring_takes_no_more_until_read() {
        let (mut w, mut r) = pair(XENCONS_IN);
        let data = vec![7u8; 1500];
        assert_eq!(w.write(&data).unwrap(), 1024);
        assert_eq!(w.space().unwrap(), 0);
        assert_eq!(w.write(b"x").unwrap(), 0);
        let mut out = [0u8; 24];
        assert_eq!(r.read(&mut out).unwrap(), 24);
        assert_eq!(w.space().unwrap(), 24);
    }

    #[test]
    fn bytes_wrap_around_the_end_of_the_array() {
        let (mut w, mut r) = pair(XENCONS_IN);
        let mut out = vec![0u8; 1024];
        for round in 0..5u8 {
            let data: Vec<u8> = (0..700).map(|i| (i as u8).wrapping_add(round)).collect();
            assert_eq!(w.write(&data).unwrap(), 700);
            assert_eq!(r.read(&mut out).unwrap(), 700);
            assert_eq!(&out[..700], &data[..], "round {round}");
        }
        assert_eq!(r.cons(), 3500);
        assert_eq!(w.prod(), 3500);
    }

    #[test]
    fn indices_wrap_at_u32_max() {
        let mem = page();
        mem.store_u32(XENCONS_OUT.prod, u32::MAX - 2, Ordering::Relaxed).unwrap();
        mem.store_u32(XENCONS_OUT.cons, u32::MAX - 2, Ordering::Relaxed).unwrap();
        let mut w = ByteWriter::new(mem.clone(), XENCONS_OUT).unwrap();
        let mut r = ByteReader::new(mem, XENCONS_OUT).unwrap();
        assert_eq!(w.write(b"abcdef").unwrap(), 6);
        let mut out = [0u8; 8];
        assert_eq!(r.read(&mut out).unwrap(), 6);
        assert_eq!(&out[..6], b"abcdef");
        assert_eq!(r.cons(), 3);
    }

    #[test]
    fn runaway_producer_index_breaks_the_reader_for_good() {
        let mem = page();
        let mut r = ByteReader::new(mem.clone(), XENCONS_OUT).unwrap();
        mem.store_u32(XENCONS_OUT.prod, 2049, Ordering::Release).unwrap();
        assert!(matches!(r.available(), Err(RingError::Overflow { prod: 2049, base: 0, limit: 2048 })));
        mem.store_u32(XENCONS_OUT.prod, 1, Ordering::Release).unwrap();
        assert!(matches!(r.read(&mut [0u8; 4]), Err(RingError::Broken)));
        assert!(r.is_broken());
    }

    #[test]
    fn consumer_index_ahead_of_the_producer_breaks_the_writer() {
        let mem = page();
        let mut w = ByteWriter::new(mem.clone(), XENCONS_IN).unwrap();
        mem.store_u32(XENCONS_IN.cons, 5, Ordering::Release).unwrap();
        assert!(matches!(w.write(b"x"), Err(RingError::ConsumerOverflow { cons: 5, prod: 0, size: 1024 })));
        assert!(matches!(w.space(), Err(RingError::Broken)));
    }

    #[test]
    fn a_peer_rewriting_our_index_changes_nothing() {
        let (mut w, mut r) = pair(XENCONS_OUT);
        w.write(b"abc").unwrap();
        // The producer scribbles on the consumer's index: the reader keeps its own.
        w.flex.mem().store_u32(XENCONS_OUT.cons, 2, Ordering::Relaxed).unwrap();
        let mut out = [0u8; 4];
        assert_eq!(r.read(&mut out).unwrap(), 3);
        assert_eq!(&out[..3], b"abc");
    }

    #[test]
    fn a_layout_outside_the_mapping_or_of_odd_size_is_refused() {
        let bad_size = ByteRingLayout { size: 1000, ..XENCONS_IN };
        assert!(matches!(ByteReader::new(page(), bad_size), Err(RingError::BadLayout { len: 4096 })));
        let outside = ByteRingLayout { prod: 4094, ..XENCONS_IN };
        assert!(matches!(ByteWriter::new(page(), outside), Err(RingError::BadLayout { .. })));
    }
}
