//! The block-device ABI of Xen's `xen/include/public/io/blkif.h`, in its three
//! layouts: native (x86_64 here), `x86_32-abi` and `x86_64-abi` (Linux's
//! `drivers/block/xen-blkback/common.h` defines the two foreign ones with
//! `#pragma pack(4)` for 32-bit guests).
//!
//! Fields use zerocopy's alignment-1 little-endian types with explicit padding,
//! so each struct's offsets are exactly the C ones whatever the Rust alignment.

use zerocopy::little_endian::{I16, U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `#define BLKIF_OP_READ 0`.
pub const BLKIF_OP_READ: u8 = 0;
/// `#define BLKIF_OP_WRITE 1`.
pub const BLKIF_OP_WRITE: u8 = 1;
/// `#define BLKIF_OP_WRITE_BARRIER 2`.
pub const BLKIF_OP_WRITE_BARRIER: u8 = 2;
/// `#define BLKIF_OP_FLUSH_DISKCACHE 3`.
pub const BLKIF_OP_FLUSH_DISKCACHE: u8 = 3;
/// `#define BLKIF_OP_RESERVED_1 4` (was `BLKIF_OP_TRIM` in a tree never upstream).
pub const BLKIF_OP_RESERVED_1: u8 = 4;
/// `#define BLKIF_OP_DISCARD 5`.
pub const BLKIF_OP_DISCARD: u8 = 5;
/// `#define BLKIF_OP_INDIRECT 6`.
pub const BLKIF_OP_INDIRECT: u8 = 6;

/// `#define BLKIF_MAX_SEGMENTS_PER_REQUEST 11`.
pub const BLKIF_MAX_SEGMENTS_PER_REQUEST: usize = 11;
/// `#define BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST 8`.
pub const BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST: usize = 8;
/// `#define BLKIF_DISCARD_SECURE (1<<0)`.
pub const BLKIF_DISCARD_SECURE: u8 = 1;

/// `#define BLKIF_RSP_EOPNOTSUPP -2`.
pub const BLKIF_RSP_EOPNOTSUPP: i16 = -2;
/// `#define BLKIF_RSP_ERROR -1`.
pub const BLKIF_RSP_ERROR: i16 = -1;
/// `#define BLKIF_RSP_OKAY 0`.
pub const BLKIF_RSP_OKAY: i16 = 0;

/// Bytes per sector in blkif requests (always 512, whatever `sector-size` says).
pub const SECTOR_SIZE: u64 = 512;
/// Sectors per 4 KiB page: `first_sect`/`last_sect` are below this.
pub const SECTORS_PER_PAGE: u8 = 8;
/// Segments in one indirect page (`struct blkif_request_segment` is 8 bytes).
pub const SEGS_PER_INDIRECT_FRAME: usize = 4096 / core::mem::size_of::<BlkifRequestSegment>();

/// `struct blkif_request_segment` (same in every layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct BlkifRequestSegment {
    /// `grant_ref_t gref`: the page's grant.
    pub gref: U32,
    /// `uint8_t first_sect`: first sector in the page (0..=7).
    pub first_sect: u8,
    /// `uint8_t last_sect`: last sector in the page, inclusive (first..=7).
    pub last_sect: u8,
    /// Padding to 8 bytes (the C struct's alignment of 4).
    pub _pad: [u8; 2],
}

/// `struct blkif_request` in the x86_64 layout (also native on x86_64).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct BlkifRequest64 {
    /// `uint8_t operation`.
    pub operation: u8,
    /// `uint8_t nr_segments`.
    pub nr_segments: u8,
    /// `blkif_vdev_t handle`.
    pub handle: U16,
    /// Padding before the 8-aligned `id`.
    pub _pad: [u8; 4],
    /// `uint64_t id`: echoed in the response.
    pub id: U64,
    /// `blkif_sector_t sector_number`.
    pub sector_number: U64,
    /// `struct blkif_request_segment seg[11]`.
    pub seg: [BlkifRequestSegment; BLKIF_MAX_SEGMENTS_PER_REQUEST],
}

/// `struct blkif_x86_32_request` (Linux `common.h`, `#pragma pack(4)`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct BlkifRequest32 {
    /// `uint8_t operation`.
    pub operation: u8,
    /// `uint8_t nr_segments`.
    pub nr_segments: u8,
    /// `blkif_vdev_t handle`.
    pub handle: U16,
    /// `uint64_t id` (4-aligned on i386).
    pub id: U64,
    /// `blkif_sector_t sector_number`.
    pub sector_number: U64,
    /// `struct blkif_request_segment seg[11]`.
    pub seg: [BlkifRequestSegment; BLKIF_MAX_SEGMENTS_PER_REQUEST],
}

/// `struct blkif_request_discard`, x86_64 layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct BlkifRequestDiscard64 {
    /// `uint8_t operation` (`BLKIF_OP_DISCARD`).
    pub operation: u8,
    /// `uint8_t flag`: `BLKIF_DISCARD_SECURE` or 0.
    pub flag: u8,
    /// `blkif_vdev_t handle`.
    pub handle: U16,
    /// Padding before `id`.
    pub _pad: [u8; 4],
    /// `uint64_t id`.
    pub id: U64,
    /// `blkif_sector_t sector_number`.
    pub sector_number: U64,
    /// `uint64_t nr_sectors`.
    pub nr_sectors: U64,
}

/// `struct blkif_x86_32_request_discard`, `#pragma pack(4)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct BlkifRequestDiscard32 {
    /// `uint8_t operation`.
    pub operation: u8,
    /// `uint8_t flag`.
    pub flag: u8,
    /// `blkif_vdev_t handle`.
    pub handle: U16,
    /// `uint64_t id`.
    pub id: U64,
    /// `blkif_sector_t sector_number`.
    pub sector_number: U64,
    /// `uint64_t nr_sectors`.
    pub nr_sectors: U64,
}

/// `struct blkif_request_indirect`, x86_64 layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct BlkifRequestIndirect64 {
    /// `uint8_t operation` (`BLKIF_OP_INDIRECT`).
    pub operation: u8,
    /// `uint8_t indirect_op`: `BLKIF_OP_READ` or `BLKIF_OP_WRITE`.
    pub indirect_op: u8,
    /// `uint16_t nr_segments`.
    pub nr_segments: U16,
    /// Padding before `id`.
    pub _pad0: [u8; 4],
    /// `uint64_t id`.
    pub id: U64,
    /// `blkif_sector_t sector_number`.
    pub sector_number: U64,
    /// `blkif_vdev_t handle`.
    pub handle: U16,
    /// `uint16_t _pad1`.
    pub _pad1: U16,
    /// `grant_ref_t indirect_grefs[BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST]`.
    pub indirect_grefs: [U32; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST],
    /// `uint32_t _pad2` (absent on i386).
    pub _pad2: U32,
}

/// `struct blkif_x86_32_request_indirect`, `#pragma pack(4)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct BlkifRequestIndirect32 {
    /// `uint8_t operation`.
    pub operation: u8,
    /// `uint8_t indirect_op`.
    pub indirect_op: u8,
    /// `uint16_t nr_segments`.
    pub nr_segments: U16,
    /// `uint64_t id`.
    pub id: U64,
    /// `blkif_sector_t sector_number`.
    pub sector_number: U64,
    /// `blkif_vdev_t handle`.
    pub handle: U16,
    /// `uint16_t _pad1`.
    pub _pad1: U16,
    /// `grant_ref_t indirect_grefs[8]`.
    pub indirect_grefs: [U32; BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST],
    /// `uint64_t pad` ("Make it 64 byte aligned on i386" in `io/blkif.h`;
    /// Linux's `blkif_x86_32_request_indirect` has it too).
    pub _pad2: U64,
}

/// `struct blkif_response`, x86_64 layout (native on x86_64).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct BlkifResponse64 {
    /// `uint64_t id`: copied from the request.
    pub id: U64,
    /// `uint8_t operation`: copied from the request.
    pub operation: u8,
    /// Padding before `status`.
    pub _pad0: u8,
    /// `int16_t status`: `BLKIF_RSP_*`.
    pub status: I16,
    /// Tail padding to the struct's 8-byte alignment.
    pub _pad1: [u8; 4],
}

/// `struct blkif_x86_32_response`, `#pragma pack(4)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct BlkifResponse32 {
    /// `uint64_t id`.
    pub id: U64,
    /// `uint8_t operation`.
    pub operation: u8,
    /// Padding before `status`.
    pub _pad0: u8,
    /// `int16_t status`.
    pub status: I16,
}

/// A ring slot of the x86_64/native layout: the union of request and response
/// (`DEFINE_RING_TYPES(blkif, struct blkif_request, struct blkif_response)`).
pub const SLOT_SIZE_64: usize = 112;
/// A ring slot of the x86_32 layout.
pub const SLOT_SIZE_32: usize = 108;

const _: () = {
    assert!(core::mem::size_of::<BlkifRequestSegment>() == 8);
    assert!(core::mem::size_of::<BlkifRequest64>() == SLOT_SIZE_64);
    assert!(core::mem::size_of::<BlkifRequest32>() == SLOT_SIZE_32);
    assert!(core::mem::size_of::<BlkifRequestDiscard64>() == 32);
    assert!(core::mem::size_of::<BlkifRequestDiscard32>() == 28);
    assert!(core::mem::size_of::<BlkifRequestIndirect64>() == 64);
    assert!(core::mem::size_of::<BlkifRequestIndirect32>() == 64);
    assert!(core::mem::size_of::<BlkifResponse64>() == 16);
    assert!(core::mem::size_of::<BlkifResponse32>() == 12);
};

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn x86_64_request_offsets_match_blkif_h() {
        assert_eq!(offset_of!(BlkifRequest64, operation), 0);
        assert_eq!(offset_of!(BlkifRequest64, nr_segments), 1);
        assert_eq!(offset_of!(BlkifRequest64, handle), 2);
        assert_eq!(offset_of!(BlkifRequest64, id), 8);
        assert_eq!(offset_of!(BlkifRequest64, sector_number), 16);
        assert_eq!(offset_of!(BlkifRequest64, seg), 24);
        assert_eq!(offset_of!(BlkifRequestSegment, first_sect), 4);
        assert_eq!(offset_of!(BlkifRequestSegment, last_sect), 5);
    }

    #[test]
    fn x86_32_request_offsets_match_linux_common_h() {
        assert_eq!(offset_of!(BlkifRequest32, id), 4);
        assert_eq!(offset_of!(BlkifRequest32, sector_number), 12);
        assert_eq!(offset_of!(BlkifRequest32, seg), 20);
        assert_eq!(offset_of!(BlkifRequestDiscard32, nr_sectors), 20);
        assert_eq!(offset_of!(BlkifRequestIndirect32, handle), 20);
        assert_eq!(offset_of!(BlkifRequestIndirect32, indirect_grefs), 24);
        assert_eq!(offset_of!(BlkifResponse32, status), 10);
    }

    #[test]
    fn x86_64_discard_indirect_response_offsets_match_blkif_h() {
        assert_eq!(offset_of!(BlkifRequestDiscard64, flag), 1);
        assert_eq!(offset_of!(BlkifRequestDiscard64, id), 8);
        assert_eq!(offset_of!(BlkifRequestDiscard64, nr_sectors), 24);
        assert_eq!(offset_of!(BlkifRequestIndirect64, nr_segments), 2);
        assert_eq!(offset_of!(BlkifRequestIndirect64, id), 8);
        assert_eq!(offset_of!(BlkifRequestIndirect64, handle), 24);
        assert_eq!(offset_of!(BlkifRequestIndirect64, indirect_grefs), 28);
        assert_eq!(offset_of!(BlkifResponse64, operation), 8);
        assert_eq!(offset_of!(BlkifResponse64, status), 10);
    }
}
