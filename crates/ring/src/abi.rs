//! The shared-ring ABI of Xen's `xen/include/public/io/ring.h`
//! (`DEFINE_RING_TYPES`): the 64-byte `struct __name##_sring` header before
//! the entries, and the ring size computed as `__RING_SIZE` does; and the
//! console page of `io/console.h`, whose two flex rings
//! (`DEFINE_XEN_FLEX_RING`) are [`crate::ByteReader`] and [`crate::ByteWriter`].

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::bytes::ByteRingLayout;

/// `typedef unsigned int RING_IDX`: a free-running index; only its low bits
/// (`idx & (RING_SIZE - 1)`) select a slot.
pub type RingIdx = u32;

/// The header of `struct __name##_sring` (`io/ring.h`, `DEFINE_RING_TYPES`):
/// the four indices, the `pvt` union and `__pad[44]`, then the entries
/// (`union __name##_sring_entry ring[]`) from byte 64. Older headers have
/// `uint8_t __pad[48]` in place of `pvt` and `__pad`; the layout is the same.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct SringHeader {
    /// `RING_IDX req_prod`: written by the frontend after its requests.
    pub req_prod: RingIdx,
    /// `RING_IDX req_event`: the backend wants an event when `req_prod` passes it.
    pub req_event: RingIdx,
    /// `RING_IDX rsp_prod`: written by the backend after its responses.
    pub rsp_prod: RingIdx,
    /// `RING_IDX rsp_event`: the frontend wants an event when `rsp_prod` passes it.
    pub rsp_event: RingIdx,
    /// `union { ... uint8_t pvt_pad[4]; } pvt`: private to some protocols (netif smartpoll).
    pub pvt: [u8; 4],
    /// `uint8_t __pad[44]`.
    pub pad: [u8; 44],
}

const _: () = assert!(core::mem::size_of::<SringHeader>() == 64);

/// Offset of `req_prod` in the shared page.
pub const REQ_PROD: usize = core::mem::offset_of!(SringHeader, req_prod);
/// Offset of `req_event`.
pub const REQ_EVENT: usize = core::mem::offset_of!(SringHeader, req_event);
/// Offset of `rsp_prod`.
pub const RSP_PROD: usize = core::mem::offset_of!(SringHeader, rsp_prod);
/// Offset of `rsp_event`.
pub const RSP_EVENT: usize = core::mem::offset_of!(SringHeader, rsp_event);
/// Offset of the first entry: `offsetof(struct __name##_sring, ring)`.
pub const RING_OFFSET: usize = core::mem::size_of::<SringHeader>();

/// Size of one ring entry, `sizeof(union __name##_sring_entry)`: the larger of
/// request and response, rounded up to the larger alignment as a C union is.
/// Types built from alignment-1 fields (zerocopy's little-endian integers)
/// must carry explicit padding to their C size for this to match.
pub const fn entry_size<Req, Rsp>() -> usize {
    let (rq, rs) = (core::mem::size_of::<Req>(), core::mem::size_of::<Rsp>());
    let (aq, as_) = (core::mem::align_of::<Req>(), core::mem::align_of::<Rsp>());
    let size = if rq > rs { rq } else { rs };
    let align = if aq > as_ { aq } else { as_ };
    size.div_ceil(align) * align
}

/// `__RING_SIZE` for a shared area of `bytes` bytes and entries of `entry`
/// bytes: as many entries as fit after the header, rounded down to a power of
/// two (`__RD32`). 0 when not even one fits or `entry` is 0.
pub const fn ring_size(bytes: usize, entry: usize) -> u32 {
    if entry == 0 || bytes < RING_OFFSET {
        return 0;
    }
    let n = (bytes - RING_OFFSET) / entry;
    // __RD32 works on 32 bits: clamp first.
    let n = if n > u32::MAX as usize { u32::MAX } else { n as u32 };
    if n == 0 {
        0
    } else {
        1 << (31 - n.leading_zeros())
    }
}

/// `struct xencons_interface` (`io/console.h`): the console page, two flex
/// rings (`in`: to the guest, `out`: from it) and their indices. Newer
/// headers add the `connection` byte (`XENCONSOLE_CONNECTED` 0,
/// `XENCONSOLE_DISCONNECTED` 1); older ones end before it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct XenconsInterface {
    /// `char in[1024]`: bytes the backend sends to the guest.
    pub input: [u8; 1024],
    /// `char out[2048]`: bytes the guest sends to the backend.
    pub output: [u8; 2048],
    /// `XENCONS_RING_IDX in_cons`.
    pub in_cons: u32,
    /// `XENCONS_RING_IDX in_prod`.
    pub in_prod: u32,
    /// `XENCONS_RING_IDX out_cons`.
    pub out_cons: u32,
    /// `XENCONS_RING_IDX out_prod`.
    pub out_prod: u32,
    /// `uint8_t connection`.
    pub connection: u8,
    /// The C struct's tail padding.
    pub pad: [u8; 3],
}

const _: () = assert!(core::mem::size_of::<XenconsInterface>() == 3092);

/// The console's `in` ring: the backend produces, the guest consumes.
pub const XENCONS_IN: ByteRingLayout = ByteRingLayout {
    data: core::mem::offset_of!(XenconsInterface, input),
    size: 1024,
    cons: core::mem::offset_of!(XenconsInterface, in_cons),
    prod: core::mem::offset_of!(XenconsInterface, in_prod),
};

/// The console's `out` ring: the guest produces, the backend consumes.
pub const XENCONS_OUT: ByteRingLayout = ByteRingLayout {
    data: core::mem::offset_of!(XenconsInterface, output),
    size: 2048,
    cons: core::mem::offset_of!(XenconsInterface, out_cons),
    prod: core::mem::offset_of!(XenconsInterface, out_prod),
};

/// Offset of `connection` (newer headers).
pub const XENCONS_CONNECTION: usize = core::mem::offset_of!(XenconsInterface, connection);

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn sring_header_offsets_match_ring_h() {
        assert_eq!(offset_of!(SringHeader, req_prod), 0);
        assert_eq!(offset_of!(SringHeader, req_event), 4);
        assert_eq!(offset_of!(SringHeader, rsp_prod), 8);
        assert_eq!(offset_of!(SringHeader, rsp_event), 12);
        assert_eq!(offset_of!(SringHeader, pvt), 16);
        assert_eq!(offset_of!(SringHeader, pad), 20);
        assert_eq!(RING_OFFSET, 64);
    }

    #[test]
    fn ring_size_for_blkif_entries_is_32_per_page() {
        // x86_64 blkif: request 112 bytes, response 16 (12 on x86_32): entry 112.
        let entry = 112;
        assert_eq!(ring_size(4096, entry), 32);
        assert_eq!(ring_size(2 * 4096, entry), 64);
        assert_eq!(ring_size(4 * 4096, entry), 128);
        assert_eq!(ring_size(8 * 4096, entry), 256);
    }

    #[test]
    fn ring_size_rounds_down_to_a_power_of_two() {
        assert_eq!(ring_size(64 + 7 * 8, 8), 4);
        assert_eq!(ring_size(64 + 8 * 8, 8), 8);
        assert_eq!(ring_size(64 + 8, 8), 1);
    }

    #[test]
    fn ring_size_is_zero_when_nothing_fits() {
        assert_eq!(ring_size(64 + 111, 112), 0);
        assert_eq!(ring_size(10, 1), 0);
        assert_eq!(ring_size(4096, 0), 0);
    }

    #[test]
    fn entry_size_is_the_union_of_request_and_response() {
        #[repr(C)]
        struct Req112([u64; 14]);
        #[repr(C)]
        struct Rsp12([u32; 3]);
        #[repr(C)]
        struct Req12([u32; 3]);
        #[repr(C)]
        struct Rsp8(u64);
        #[repr(C)]
        struct Unaligned108([u8; 108]);
        assert_eq!(entry_size::<Req112, Rsp12>(), 112);
        // 12 bytes rounded up to the response's 8-byte alignment, as a C union.
        assert_eq!(entry_size::<Req12, Rsp8>(), 16);
        assert_eq!(entry_size::<Unaligned108, Rsp12>(), 108);
    }

    /// Compiles `source` (which includes `header`) and returns what it
    /// prints; `None` (skipped) without a C compiler.
    fn run_c(name: &str, header: &std::path::Path, source: &str) -> Option<String> {
        let dir = std::env::temp_dir().join(format!("xen-ring-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("t.c");
        std::fs::write(&src, source).unwrap();
        let bin = dir.join("t");
        let cc = std::process::Command::new("cc").arg("-o").arg(&bin).arg(&src).status();
        let Ok(status) = cc else {
            eprintln!("skipped: no C compiler");
            return None;
        };
        assert!(status.success(), "compiling against {} failed", header.display());
        let out = std::process::Command::new(&bin).output().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        Some(String::from_utf8(out.stdout).unwrap())
    }

    /// Compiles a C program against the machine's Xen headers, when it has
    /// them, and compares the layout and `__CONST_RING_SIZE`.
    #[test]
    #[cfg_attr(miri, ignore = "runs the C compiler")]
    fn layout_matches_the_c_header_when_installed() {
        let header = std::path::Path::new("/usr/include/xen/io/ring.h");
        if !header.exists() {
            eprintln!("skipped: {} not installed (apt-get install libxen-dev)", header.display());
            return;
        }
        let Some(got) = run_c(
            "abi",
            header,
            r#"#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <xen/io/ring.h>
struct rq { uint64_t a[14]; };
struct rs { uint32_t a[3]; };
DEFINE_RING_TYPES(t, struct rq, struct rs);
int main(void) {
    printf("%zu %zu %zu %zu %zu %zu %u %u\n",
        offsetof(struct t_sring, req_prod), offsetof(struct t_sring, req_event),
        offsetof(struct t_sring, rsp_prod), offsetof(struct t_sring, rsp_event),
        offsetof(struct t_sring, ring), sizeof(union t_sring_entry),
        (unsigned)__CONST_RING_SIZE(t, 4096), (unsigned)__CONST_RING_SIZE(t, 8 * 4096));
    return 0;
}
"#,
        ) else {
            return;
        };
        let want = format!(
            "{REQ_PROD} {REQ_EVENT} {RSP_PROD} {RSP_EVENT} {RING_OFFSET} {} {} {}\n",
            entry_size::<[u64; 14], [u32; 3]>(),
            ring_size(4096, 112),
            ring_size(8 * 4096, 112)
        );
        assert_eq!(got, want);
    }

    #[test]
    fn xencons_interface_offsets_match_console_h() {
        assert_eq!(offset_of!(XenconsInterface, input), 0);
        assert_eq!(offset_of!(XenconsInterface, output), 1024);
        assert_eq!(offset_of!(XenconsInterface, in_cons), 3072);
        assert_eq!(offset_of!(XenconsInterface, in_prod), 3076);
        assert_eq!(offset_of!(XenconsInterface, out_cons), 3080);
        assert_eq!(offset_of!(XenconsInterface, out_prod), 3084);
        assert_eq!(XENCONS_CONNECTION, 3088);
        assert_eq!((XENCONS_IN.size, XENCONS_OUT.size), (1024, 2048));
    }

    /// Compiles a C program against the machine's `io/console.h`, when it
    /// has it, and compares the offsets (`connection` where it has one).
    #[test]
    #[cfg_attr(miri, ignore = "runs the C compiler")]
    fn console_layout_matches_the_c_header_when_installed() {
        let header = std::path::Path::new("/usr/include/xen/io/console.h");
        let Ok(text) = std::fs::read_to_string(header) else {
            eprintln!("skipped: {} not installed (apt-get install libxen-dev)", header.display());
            return;
        };
        let connection = if text.contains("uint8_t connection") {
            "offsetof(struct xencons_interface, connection)"
        } else {
            "(size_t)3088"
        };
        let source = format!(
            r#"#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <xen/io/console.h>
int main(void) {{
    printf("%zu %zu %zu %zu %zu %zu %zu\n",
        offsetof(struct xencons_interface, in), offsetof(struct xencons_interface, out),
        offsetof(struct xencons_interface, in_cons), offsetof(struct xencons_interface, in_prod),
        offsetof(struct xencons_interface, out_cons), offsetof(struct xencons_interface, out_prod),
        {connection});
    return 0;
}}
"#
        );
        let Some(got) = run_c("console", header, &source) else { return };
        let want = format!(
            "{} {} {} {} {} {} {XENCONS_CONNECTION}\n",
            XENCONS_IN.data, XENCONS_OUT.data, XENCONS_IN.cons, XENCONS_IN.prod, XENCONS_OUT.cons, XENCONS_OUT.prod
        );
        assert_eq!(got, want);
    }
}
