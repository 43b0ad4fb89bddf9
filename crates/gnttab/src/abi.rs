//! The kernel ABI of `/dev/xen/gntdev` and `/dev/xen/gntalloc`: Linux's
//! `include/uapi/xen/gntdev.h` and `include/uapi/xen/gntalloc.h`, plus the
//! `GNTCOPY_*` flags of Xen's `public/grant_table.h` they carry.
//!
//! Every ioctl here is `_IOC(_IOC_NONE, 'G', nr, sizeof(struct))`: direction
//! "none" but with a size, which none of nix's `request_code_*` macros
//! produce, so the numbers are built with nix's `ioc!` (the macro behind them,
//! which knows each architecture's bit layout). The test `tests/c_headers.rs`
//! checks every size, offset and number below against the machine's C headers.
//!
//! Two structs end in a one-element array that really holds `count`
//! elements (`refs[1]`, `gref_ids[1]`); [`map_grant_ref_request`] and
//! [`alloc_gref_request`] build those variable-length buffers.

use std::mem::{offset_of, size_of};

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// An ioctl number: `_IOC(_IOC_NONE, 'G', nr, size)`.
const fn ioc_none(nr: u32, size: usize) -> u32 {
    nix::ioc!(nix::sys::ioctl::NONE, b'G', nr, size) as u32
}

/// The argument size encoded in an ioctl number (`_IOC_SIZE`).
pub const fn ioc_size(request: u32) -> usize {
    ((request as nix::sys::ioctl::ioctl_num_type >> nix::sys::ioctl::SIZESHIFT) & nix::sys::ioctl::SIZEMASK) as usize
}

// ---------------------------------------------------------------- gntdev.h

/// `struct ioctl_gntdev_grant_ref` (`xen/gntdev.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlGntdevGrantRef {
    /// `__u32 domid`: the granting domain.
    pub domid: u32,
    /// `__u32 ref`: the grant reference.
    pub gref: u32,
}

/// `struct ioctl_gntdev_map_grant_ref` (`xen/gntdev.h`), with its one
/// declared element of `refs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlGntdevMapGrantRef {
    /// `__u32 count`: number of grants (in).
    pub count: u32,
    /// `__u32 pad`.
    pub pad: u32,
    /// `__u64 index`: the `mmap` offset of the new mapping (out).
    pub index: u64,
    /// `struct ioctl_gntdev_grant_ref refs[1]`: really `count` elements.
    pub refs: [IoctlGntdevGrantRef; 1],
}

/// `#define IOCTL_GNTDEV_MAP_GRANT_REF _IOC(_IOC_NONE, 'G', 0, sizeof(struct ioctl_gntdev_map_grant_ref))`
pub const IOCTL_GNTDEV_MAP_GRANT_REF: u32 = ioc_none(0, size_of::<IoctlGntdevMapGrantRef>());

/// `struct ioctl_gntdev_unmap_grant_ref` (`xen/gntdev.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlGntdevUnmapGrantRef {
    /// `__u64 index`: as returned by the map.
    pub index: u64,
    /// `__u32 count`: pages to unmap.
    pub count: u32,
    /// `__u32 pad`.
    pub pad: u32,
}

/// `#define IOCTL_GNTDEV_UNMAP_GRANT_REF _IOC(_IOC_NONE, 'G', 1, sizeof(struct ioctl_gntdev_unmap_grant_ref))`
pub const IOCTL_GNTDEV_UNMAP_GRANT_REF: u32 = ioc_none(1, size_of::<IoctlGntdevUnmapGrantRef>());

/// `struct ioctl_gntdev_get_offset_for_vaddr` (`xen/gntdev.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlGntdevGetOffsetForVaddr {
    /// `__u64 vaddr`: first address of a mapping (in).
    pub vaddr: u64,
    /// `__u64 offset`: its `mmap` offset (out).
    pub offset: u64,
    /// `__u32 count`: its pages (out).
    pub count: u32,
    /// `__u32 pad`.
    pub pad: u32,
}

/// `#define IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR _IOC(_IOC_NONE, 'G', 2, sizeof(struct ioctl_gntdev_get_offset_for_vaddr))`
pub const IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR: u32 = ioc_none(2, size_of::<IoctlGntdevGetOffsetForVaddr>());

/// `struct ioctl_gntdev_set_max_grants` (`xen/gntdev.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlGntdevSetMaxGrants {
    /// `__u32 count`.
    pub count: u32,
}

/// `#define IOCTL_GNTDEV_SET_MAX_GRANTS _IOC(_IOC_NONE, 'G', 3, sizeof(struct ioctl_gntdev_set_max_grants))`
pub const IOCTL_GNTDEV_SET_MAX_GRANTS: u32 = ioc_none(3, size_of::<IoctlGntdevSetMaxGrants>());

/// `struct ioctl_gntdev_unmap_notify` (`xen/gntdev.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlGntdevUnmapNotify {
    /// `__u64 index`: `mmap` offset of a byte in the page.
    pub index: u64,
    /// `__u32 action`: `UNMAP_NOTIFY_*`.
    pub action: u32,
    /// `__u32 event_channel_port`.
    pub event_channel_port: u32,
}

/// `#define IOCTL_GNTDEV_SET_UNMAP_NOTIFY _IOC(_IOC_NONE, 'G', 7, sizeof(struct ioctl_gntdev_unmap_notify))`
pub const IOCTL_GNTDEV_SET_UNMAP_NOTIFY: u32 = ioc_none(7, size_of::<IoctlGntdevUnmapNotify>());

/// `struct { grant_ref_t ref; __u16 offset; domid_t domid; } foreign`, one
/// arm of the union in `struct gntdev_grant_copy_segment` (`xen/gntdev.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct GntdevGrantCopyForeign {
    /// `grant_ref_t ref`.
    pub gref: u32,
    /// `__u16 offset` in the granted page.
    pub offset: u16,
    /// `domid_t domid`.
    pub domid: u16,
}

/// `union { void *virt; struct {...} foreign; }` of `struct
/// gntdev_grant_copy_segment`: 8 bytes, either a local address (in its
/// first pointer-sized bytes) or a [`GntdevGrantCopyForeign`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct GntdevGrantCopyPtr(pub [u8; 8]);

impl GntdevGrantCopyPtr {
    /// The `virt` arm: a local address.
    pub fn virt(addr: usize) -> Self {
        let mut b = [0u8; 8];
        b[..size_of::<usize>()].copy_from_slice(&addr.to_ne_bytes());
        GntdevGrantCopyPtr(b)
    }

    /// The `foreign` arm: a place in a granted page.
    pub fn foreign(f: GntdevGrantCopyForeign) -> Self {
        let mut b = [0u8; 8];
        b.copy_from_slice(f.as_bytes());
        GntdevGrantCopyPtr(b)
    }
}

/// `struct gntdev_grant_copy_segment` (`xen/gntdev.h`). The C struct is
/// 8-aligned on 64-bit targets for its pointer; `_pad` makes its tail
/// padding explicit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct GntdevGrantCopySegment {
    /// `source`: `virt` unless `flags` has [`GNTCOPY_SOURCE_GREF`].
    pub source: GntdevGrantCopyPtr,
    /// `dest`: `virt` unless `flags` has [`GNTCOPY_DEST_GREF`].
    pub dest: GntdevGrantCopyPtr,
    /// `__u16 len`.
    pub len: u16,
    /// `__u16 flags`: `GNTCOPY_*`.
    pub flags: u16,
    /// `__s16 status`: `GNTST_*` (out).
    pub status: i16,
    /// Tail padding of the C struct.
    pub _pad: u16,
}

/// `struct ioctl_gntdev_grant_copy` (`xen/gntdev.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlGntdevGrantCopy {
    /// `unsigned int count`.
    pub count: u32,
    /// Padding before the pointer on 64-bit targets.
    #[cfg(target_pointer_width = "64")]
    pub _pad: u32,
    /// `struct gntdev_grant_copy_segment *segments`.
    pub segments: usize,
}

/// `#define IOCTL_GNTDEV_GRANT_COPY _IOC(_IOC_NONE, 'G', 8, sizeof(struct ioctl_gntdev_grant_copy))`
pub const IOCTL_GNTDEV_GRANT_COPY: u32 = ioc_none(8, size_of::<IoctlGntdevGrantCopy>());

/// `#define UNMAP_NOTIFY_CLEAR_BYTE 0x1`: zero the byte at `index` on unmap.
pub const UNMAP_NOTIFY_CLEAR_BYTE: u32 = 0x1;
/// `#define UNMAP_NOTIFY_SEND_EVENT 0x2`: notify `event_channel_port` on unmap.
pub const UNMAP_NOTIFY_SEND_EVENT: u32 = 0x2;

/// `#define GNTCOPY_source_gref (1<<_GNTCOPY_source_gref)` (Xen's
/// `public/grant_table.h`, `_GNTCOPY_source_gref` = 0).
pub const GNTCOPY_SOURCE_GREF: u16 = 1 << 0;
/// `#define GNTCOPY_dest_gref (1<<_GNTCOPY_dest_gref)` (`_GNTCOPY_dest_gref` = 1).
pub const GNTCOPY_DEST_GREF: u16 = 1 << 1;

// ---------------------------------------------------------------- gntalloc.h

/// `struct ioctl_gntalloc_alloc_gref` (`xen/gntalloc.h`), with its one
/// declared element of `gref_ids`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlGntallocAllocGref {
    /// `__u16 domid`: the domain given access (in).
    pub domid: u16,
    /// `__u16 flags`: [`GNTALLOC_FLAG_WRITABLE`] (in).
    pub flags: u16,
    /// `__u32 count`: pages (in).
    pub count: u32,
    /// `__u64 index`: the `mmap` offset (out).
    pub index: u64,
    /// `__u32 gref_ids[1]`: really `count` grant references (out).
    pub gref_ids: [u32; 1],
    /// Tail padding of the C struct.
    pub _pad: u32,
}

/// `#define IOCTL_GNTALLOC_ALLOC_GREF _IOC(_IOC_NONE, 'G', 5, sizeof(struct ioctl_gntalloc_alloc_gref))`
pub const IOCTL_GNTALLOC_ALLOC_GREF: u32 = ioc_none(5, size_of::<IoctlGntallocAllocGref>());

/// `#define GNTALLOC_FLAG_WRITABLE 1`: the remote domain may map read-write.
pub const GNTALLOC_FLAG_WRITABLE: u16 = 1;

/// `struct ioctl_gntalloc_dealloc_gref` (`xen/gntalloc.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlGntallocDeallocGref {
    /// `__u64 index`: as returned by the allocation.
    pub index: u64,
    /// `__u32 count`.
    pub count: u32,
    /// Tail padding of the C struct.
    pub _pad: u32,
}

/// `#define IOCTL_GNTALLOC_DEALLOC_GREF _IOC(_IOC_NONE, 'G', 6, sizeof(struct ioctl_gntalloc_dealloc_gref))`
pub const IOCTL_GNTALLOC_DEALLOC_GREF: u32 = ioc_none(6, size_of::<IoctlGntallocDeallocGref>());

/// `struct ioctl_gntalloc_unmap_notify` (`xen/gntalloc.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlGntallocUnmapNotify {
    /// `__u64 index`: `mmap` offset of a byte in the page.
    pub index: u64,
    /// `__u32 action`: `UNMAP_NOTIFY_*`.
    pub action: u32,
    /// `__u32 event_channel_port`.
    pub event_channel_port: u32,
}

/// `#define IOCTL_GNTALLOC_SET_UNMAP_NOTIFY _IOC(_IOC_NONE, 'G', 7, sizeof(struct ioctl_gntalloc_unmap_notify))`
pub const IOCTL_GNTALLOC_SET_UNMAP_NOTIFY: u32 = ioc_none(7, size_of::<IoctlGntallocUnmapNotify>());

const _: () = assert!(size_of::<IoctlGntdevGrantRef>() == 8);
const _: () = assert!(size_of::<IoctlGntdevMapGrantRef>() == 24);
const _: () = assert!(size_of::<IoctlGntdevUnmapGrantRef>() == 16);
const _: () = assert!(size_of::<IoctlGntdevGetOffsetForVaddr>() == 24);
const _: () = assert!(size_of::<IoctlGntdevSetMaxGrants>() == 4);
const _: () = assert!(size_of::<IoctlGntdevUnmapNotify>() == 16);
const _: () = assert!(size_of::<GntdevGrantCopyForeign>() == 8);
const _: () = assert!(size_of::<GntdevGrantCopySegment>() == 24);
const _: () = assert!(size_of::<IoctlGntdevGrantCopy>() == 2 * size_of::<usize>());
const _: () = assert!(size_of::<IoctlGntallocAllocGref>() == 24);
const _: () = assert!(size_of::<IoctlGntallocDeallocGref>() == 16);
const _: () = assert!(size_of::<IoctlGntallocUnmapNotify>() == 16);

// ------------------------------------------------ variable-length requests

/// The bytes of an `IOCTL_GNTDEV_MAP_GRANT_REF` request for `refs`
/// (at least one): the header, then every ref, and never shorter than the C
/// struct, which the kernel copies whole.
pub fn map_grant_ref_request(refs: &[IoctlGntdevGrantRef]) -> Vec<u8> {
    let header = IoctlGntdevMapGrantRef { count: refs.len() as u32, ..Default::default() };
    let start = offset_of!(IoctlGntdevMapGrantRef, refs);
    let mut buf = header.as_bytes()[..start].to_vec();
    for r in refs {
        buf.extend_from_slice(r.as_bytes());
    }
    buf.resize(buf.len().max(size_of::<IoctlGntdevMapGrantRef>()), 0);
    buf
}

/// The `index` the kernel wrote into a map request.
pub fn map_grant_ref_index(request: &[u8]) -> u64 {
    let (header, _) =
        IoctlGntdevMapGrantRef::read_from_prefix(request).expect("a request is never shorter than its struct");
    header.index
}

/// The bytes of an `IOCTL_GNTALLOC_ALLOC_GREF` request for `count` pages:
/// the header and room for `count` grant references, never shorter than the
/// C struct, which the kernel copies whole.
pub fn alloc_gref_request(domid: u16, flags: u16, count: u32) -> Vec<u8> {
    let header = IoctlGntallocAllocGref { domid, flags, count, ..Default::default() };
    let start = offset_of!(IoctlGntallocAllocGref, gref_ids);
    let mut buf = header.as_bytes()[..start].to_vec();
    buf.resize((start + count as usize * size_of::<u32>()).max(size_of::<IoctlGntallocAllocGref>()), 0);
    buf
}

/// The `index` and the `count` grant references the kernel wrote into an
/// allocation request.
pub fn alloc_gref_result(request: &[u8]) -> (u64, Vec<u32>) {
    let (header, _) =
        IoctlGntallocAllocGref::read_from_prefix(request).expect("a request is never shorter than its struct");
    let start = offset_of!(IoctlGntallocAllocGref, gref_ids);
    let ids = request[start..]
        .chunks_exact(size_of::<u32>())
        .take(header.count as usize)
        .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (header.index, ids)
}

// ------------------------------------------------ for the C header test

/// The ioctl numbers by their C names, for comparing with the C headers.
pub const IOCTLS: [(&str, u32); 9] = [
    ("IOCTL_GNTDEV_MAP_GRANT_REF", IOCTL_GNTDEV_MAP_GRANT_REF),
    ("IOCTL_GNTDEV_UNMAP_GRANT_REF", IOCTL_GNTDEV_UNMAP_GRANT_REF),
    ("IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR", IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR),
    ("IOCTL_GNTDEV_SET_MAX_GRANTS", IOCTL_GNTDEV_SET_MAX_GRANTS),
    ("IOCTL_GNTDEV_SET_UNMAP_NOTIFY", IOCTL_GNTDEV_SET_UNMAP_NOTIFY),
    ("IOCTL_GNTDEV_GRANT_COPY", IOCTL_GNTDEV_GRANT_COPY),
    ("IOCTL_GNTALLOC_ALLOC_GREF", IOCTL_GNTALLOC_ALLOC_GREF),
    ("IOCTL_GNTALLOC_DEALLOC_GREF", IOCTL_GNTALLOC_DEALLOC_GREF),
    ("IOCTL_GNTALLOC_SET_UNMAP_NOTIFY", IOCTL_GNTALLOC_SET_UNMAP_NOTIFY),
];

/// Other constants by their C names.
pub const CONSTANTS: [(&str, u32); 5] = [
    ("UNMAP_NOTIFY_CLEAR_BYTE", UNMAP_NOTIFY_CLEAR_BYTE),
    ("UNMAP_NOTIFY_SEND_EVENT", UNMAP_NOTIFY_SEND_EVENT),
    ("GNTALLOC_FLAG_WRITABLE", GNTALLOC_FLAG_WRITABLE as u32),
    ("GNTCOPY_source_gref", GNTCOPY_SOURCE_GREF as u32),
    ("GNTCOPY_dest_gref", GNTCOPY_DEST_GREF as u32),
];

/// Sizes and field offsets by C name (`struct.field`, or `struct` for the
/// size), for comparing with the C headers.
pub fn layout() -> Vec<(&'static str, usize)> {
    type Seg = GntdevGrantCopySegment;
    type Foreign = GntdevGrantCopyForeign;
    vec![
        ("ioctl_gntdev_grant_ref", size_of::<IoctlGntdevGrantRef>()),
        ("ioctl_gntdev_grant_ref.domid", offset_of!(IoctlGntdevGrantRef, domid)),
        ("ioctl_gntdev_grant_ref.ref", offset_of!(IoctlGntdevGrantRef, gref)),
        ("ioctl_gntdev_map_grant_ref", size_of::<IoctlGntdevMapGrantRef>()),
        ("ioctl_gntdev_map_grant_ref.count", offset_of!(IoctlGntdevMapGrantRef, count)),
        ("ioctl_gntdev_map_grant_ref.index", offset_of!(IoctlGntdevMapGrantRef, index)),
        ("ioctl_gntdev_map_grant_ref.refs", offset_of!(IoctlGntdevMapGrantRef, refs)),
        ("ioctl_gntdev_unmap_grant_ref", size_of::<IoctlGntdevUnmapGrantRef>()),
        ("ioctl_gntdev_unmap_grant_ref.index", offset_of!(IoctlGntdevUnmapGrantRef, index)),
        ("ioctl_gntdev_unmap_grant_ref.count", offset_of!(IoctlGntdevUnmapGrantRef, count)),
        ("ioctl_gntdev_get_offset_for_vaddr", size_of::<IoctlGntdevGetOffsetForVaddr>()),
        ("ioctl_gntdev_get_offset_for_vaddr.vaddr", offset_of!(IoctlGntdevGetOffsetForVaddr, vaddr)),
        ("ioctl_gntdev_get_offset_for_vaddr.offset", offset_of!(IoctlGntdevGetOffsetForVaddr, offset)),
        ("ioctl_gntdev_get_offset_for_vaddr.count", offset_of!(IoctlGntdevGetOffsetForVaddr, count)),
        ("ioctl_gntdev_set_max_grants", size_of::<IoctlGntdevSetMaxGrants>()),
        ("ioctl_gntdev_set_max_grants.count", offset_of!(IoctlGntdevSetMaxGrants, count)),
        ("ioctl_gntdev_unmap_notify", size_of::<IoctlGntdevUnmapNotify>()),
        ("ioctl_gntdev_unmap_notify.index", offset_of!(IoctlGntdevUnmapNotify, index)),
        ("ioctl_gntdev_unmap_notify.action", offset_of!(IoctlGntdevUnmapNotify, action)),
        ("ioctl_gntdev_unmap_notify.event_channel_port", offset_of!(IoctlGntdevUnmapNotify, event_channel_port)),
        ("gntdev_grant_copy_segment", size_of::<Seg>()),
        ("gntdev_grant_copy_segment.source", offset_of!(Seg, source)),
        ("gntdev_grant_copy_segment.source.foreign.ref", offset_of!(Seg, source) + offset_of!(Foreign, gref)),
        ("gntdev_grant_copy_segment.source.foreign.offset", offset_of!(Seg, source) + offset_of!(Foreign, offset)),
        ("gntdev_grant_copy_segment.source.foreign.domid", offset_of!(Seg, source) + offset_of!(Foreign, domid)),
        ("gntdev_grant_copy_segment.dest", offset_of!(Seg, dest)),
        ("gntdev_grant_copy_segment.dest.foreign.ref", offset_of!(Seg, dest) + offset_of!(Foreign, gref)),
        ("gntdev_grant_copy_segment.len", offset_of!(Seg, len)),
        ("gntdev_grant_copy_segment.flags", offset_of!(Seg, flags)),
        ("gntdev_grant_copy_segment.status", offset_of!(Seg, status)),
        ("ioctl_gntdev_grant_copy", size_of::<IoctlGntdevGrantCopy>()),
        ("ioctl_gntdev_grant_copy.count", offset_of!(IoctlGntdevGrantCopy, count)),
        ("ioctl_gntdev_grant_copy.segments", offset_of!(IoctlGntdevGrantCopy, segments)),
        ("ioctl_gntalloc_alloc_gref", size_of::<IoctlGntallocAllocGref>()),
        ("ioctl_gntalloc_alloc_gref.domid", offset_of!(IoctlGntallocAllocGref, domid)),
        ("ioctl_gntalloc_alloc_gref.flags", offset_of!(IoctlGntallocAllocGref, flags)),
        ("ioctl_gntalloc_alloc_gref.count", offset_of!(IoctlGntallocAllocGref, count)),
        ("ioctl_gntalloc_alloc_gref.index", offset_of!(IoctlGntallocAllocGref, index)),
        ("ioctl_gntalloc_alloc_gref.gref_ids", offset_of!(IoctlGntallocAllocGref, gref_ids)),
        ("ioctl_gntalloc_dealloc_gref", size_of::<IoctlGntallocDeallocGref>()),
        ("ioctl_gntalloc_dealloc_gref.index", offset_of!(IoctlGntallocDeallocGref, index)),
        ("ioctl_gntalloc_dealloc_gref.count", offset_of!(IoctlGntallocDeallocGref, count)),
        ("ioctl_gntalloc_unmap_notify", size_of::<IoctlGntallocUnmapNotify>()),
        ("ioctl_gntalloc_unmap_notify.index", offset_of!(IoctlGntallocUnmapNotify, index)),
        ("ioctl_gntalloc_unmap_notify.action", offset_of!(IoctlGntallocUnmapNotify, action)),
        ("ioctl_gntalloc_unmap_notify.event_channel_port", offset_of!(IoctlGntallocUnmapNotify, event_channel_port)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_request_holds_every_ref_after_the_header() {
        let refs: Vec<_> = (0..5).map(|i| IoctlGntdevGrantRef { domid: 7, gref: 100 + i }).collect();
        let buf = map_grant_ref_request(&refs);
        assert_eq!(buf.len(), 16 + 5 * 8);
        assert_eq!(u32::from_ne_bytes(buf[0..4].try_into().unwrap()), 5);
        for (i, r) in refs.iter().enumerate() {
            let at = offset_of!(IoctlGntdevMapGrantRef, refs) + i * size_of::<IoctlGntdevGrantRef>();
            let (got, _) = IoctlGntdevGrantRef::read_from_prefix(&buf[at..]).unwrap();
            assert_eq!(&got, r);
        }
    }

    #[test]
    fn map_request_for_one_ref_is_the_whole_c_struct_and_reads_back_the_index() {
        let mut buf = map_grant_ref_request(&[IoctlGntdevGrantRef { domid: 0, gref: 9 }]);
        assert_eq!(buf.len(), size_of::<IoctlGntdevMapGrantRef>());
        // The kernel writes the mmap offset into `index`.
        buf[offset_of!(IoctlGntdevMapGrantRef, index)..][..8].copy_from_slice(&0x5000u64.to_ne_bytes());
        assert_eq!(map_grant_ref_index(&buf), 0x5000);
    }

    #[test]
    fn alloc_request_has_room_for_every_gref_and_never_less_than_the_struct() {
        assert_eq!(alloc_gref_request(0, 0, 1).len(), size_of::<IoctlGntallocAllocGref>());
        let mut buf = alloc_gref_request(3, GNTALLOC_FLAG_WRITABLE, 4);
        assert_eq!(buf.len(), 16 + 4 * 4);
        let (h, _) = IoctlGntallocAllocGref::read_from_prefix(&buf).unwrap();
        assert_eq!((h.domid, h.flags, h.count), (3, GNTALLOC_FLAG_WRITABLE, 4));
        for i in 0..4u32 {
            buf[16 + 4 * i as usize..][..4].copy_from_slice(&(50 + i).to_ne_bytes());
        }
        buf[8..16].copy_from_slice(&0x2000u64.to_ne_bytes());
        assert_eq!(alloc_gref_result(&buf), (0x2000, vec![50, 51, 52, 53]));
    }

    #[test]
    fn copy_pointer_arms_share_the_same_eight_bytes() {
        let f = GntdevGrantCopyForeign { gref: 0x0102_0304, offset: 0x0506, domid: 0x0708 };
        let p = GntdevGrantCopyPtr::foreign(f);
        assert_eq!(GntdevGrantCopyForeign::read_from_bytes(&p.0).unwrap(), f);
        let v = GntdevGrantCopyPtr::virt(0xdead_b000);
        assert_eq!(usize::from_ne_bytes(v.0[..size_of::<usize>()].try_into().unwrap()), 0xdead_b000);
    }

    #[test]
    fn copy_segment_fields_sit_where_the_kernel_reads_them() {
        assert_eq!(offset_of!(GntdevGrantCopySegment, dest), 8);
        assert_eq!(offset_of!(GntdevGrantCopySegment, len), 16);
        assert_eq!(offset_of!(GntdevGrantCopySegment, flags), 18);
        assert_eq!(offset_of!(GntdevGrantCopySegment, status), 20);
        assert_eq!(offset_of!(IoctlGntdevGrantCopy, segments), size_of::<usize>());
    }

    #[test]
    fn ioctl_numbers_carry_type_g_their_number_and_struct_size() {
        for (name, nr, want_nr, size) in [
            ("map", IOCTL_GNTDEV_MAP_GRANT_REF, 0, 24),
            ("unmap", IOCTL_GNTDEV_UNMAP_GRANT_REF, 1, 16),
            ("copy", IOCTL_GNTDEV_GRANT_COPY, 8, 2 * size_of::<usize>()),
            ("alloc", IOCTL_GNTALLOC_ALLOC_GREF, 5, 24),
            ("dealloc", IOCTL_GNTALLOC_DEALLOC_GREF, 6, 16),
        ] {
            assert_eq!(nr & 0xff, want_nr, "{name}");
            assert_eq!((nr >> 8) & 0xff, u32::from(b'G'), "{name}");
            assert_eq!(ioc_size(nr), size, "{name}");
        }
    }
}
