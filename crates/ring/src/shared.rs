//! The shared area both ring ends use: index loads and stores through atomics
//! and entry copies through volatile accessors, never a reference into it.

use std::borrow::Borrow;
use std::sync::atomic::Ordering;

use gnttab::GrantMapping;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::abi::{ring_size, RING_OFFSET};
use crate::error::RingError;

/// A request or response type: plain bytes that any bit pattern is valid for,
/// copied in and out of the ring whole. Implemented for every type with the
/// zerocopy derives `FromBytes, IntoBytes, Immutable, KnownLayout`.
pub trait RingEntry: FromBytes + IntoBytes + Immutable + KnownLayout + Sized {}

impl<T: FromBytes + IntoBytes + Immutable + KnownLayout> RingEntry for T {}

/// The mapping with the ring geometry.
#[derive(Debug)]
pub(crate) struct Shared<M> {
    mem: M,
    size: u32,
    entry: usize,
}

impl<M: Borrow<GrantMapping>> Shared<M> {
    pub(crate) fn new(mem: M, entry: usize) -> Result<Self, RingError> {
        if entry == 0 {
            return Err(RingError::EmptyEntry);
        }
        let m = mem.borrow();
        if !m.is_writable() {
            return Err(RingError::ReadOnly);
        }
        let size = ring_size(m.len(), entry);
        if size == 0 {
            return Err(RingError::TooSmall { len: m.len(), entry });
        }
        Ok(Shared { mem, size, entry })
    }

    pub(crate) fn size(&self) -> u32 {
        self.size
    }

    pub(crate) fn mem(&self) -> &GrantMapping {
        self.mem.borrow()
    }

    pub(crate) fn into_inner(self) -> M {
        self.mem
    }

    pub(crate) fn load(&self, offset: usize, order: Ordering) -> Result<u32, RingError> {
        Ok(self.mem.borrow().load_u32(offset, order)?)
    }

    pub(crate) fn store(&self, offset: usize, value: u32, order: Ordering) -> Result<(), RingError> {
        Ok(self.mem.borrow().store_u32(offset, value, order)?)
    }

    /// Byte offset of the slot for free-running index `idx`: always inside
    /// the mapping, since `size * entry` fits after the header.
    fn slot(&self, idx: u32) -> usize {
        RING_OFFSET + (idx & (self.size - 1)) as usize * self.entry
    }

    /// Copies the slot of `idx` out as a `T`, once (`RING_COPY_REQUEST`).
    pub(crate) fn read<T: RingEntry>(&self, idx: u32) -> Result<T, RingError> {
        let mut v = T::new_zeroed();
        self.mem.borrow().read(self.slot(idx), v.as_mut_bytes())?;
        Ok(v)
    }

    /// Copies `v` into the slot of `idx`.
    pub(crate) fn write<T: RingEntry>(&self, idx: u32, v: &T) -> Result<(), RingError> {
        Ok(self.mem.borrow().write(self.slot(idx), v.as_bytes())?)
    }
}
