//! Compares `gnttab::abi` with Linux's `<xen/gntdev.h>` and `<xen/gntalloc.h>`
//! (from linux-libc-dev), compiled by the machine's C compiler: every struct
//! size, field offset, ioctl number and flag. The `GNTCOPY_*` flags come from
//! Xen's `<xen/grant_table.h>` (libxen-dev) and are compared where it exists.

use std::collections::HashMap;
use std::process::Command;

use gnttab::abi;

const HEADERS: [&str; 2] = ["/usr/include/xen/gntdev.h", "/usr/include/xen/gntalloc.h"];
const XEN_GRANT_TABLE_H: &str = "/usr/include/xen/grant_table.h";

const PROGRAM: &str = r#"
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include <linux/ioctl.h>
#ifdef HAVE_XEN_GRANT_TABLE_H
#include <xen/xen.h>
#include <xen/grant_table.h>
#else
typedef uint16_t domid_t;
typedef uint32_t grant_ref_t;
#endif
#include <xen/gntdev.h>
#include <xen/gntalloc.h>
#define S(t) printf("%s %lu\n", #t, (unsigned long)sizeof(struct t))
#define O(t, f) printf("%s.%s %lu\n", #t, #f, (unsigned long)offsetof(struct t, f))
#define N(n) printf("%s %lu\n", #n, (unsigned long)(n))
int main(void) {
    S(ioctl_gntdev_grant_ref); O(ioctl_gntdev_grant_ref, domid); O(ioctl_gntdev_grant_ref, ref);
    S(ioctl_gntdev_map_grant_ref); O(ioctl_gntdev_map_grant_ref, count);
    O(ioctl_gntdev_map_grant_ref, index); O(ioctl_gntdev_map_grant_ref, refs);
    S(ioctl_gntdev_unmap_grant_ref); O(ioctl_gntdev_unmap_grant_ref, index); O(ioctl_gntdev_unmap_grant_ref, count);
    S(ioctl_gntdev_get_offset_for_vaddr); O(ioctl_gntdev_get_offset_for_vaddr, vaddr);
    O(ioctl_gntdev_get_offset_for_vaddr, offset); O(ioctl_gntdev_get_offset_for_vaddr, count);
    S(ioctl_gntdev_set_max_grants); O(ioctl_gntdev_set_max_grants, count);
    S(ioctl_gntdev_unmap_notify); O(ioctl_gntdev_unmap_notify, index);
    O(ioctl_gntdev_unmap_notify, action); O(ioctl_gntdev_unmap_notify, event_channel_port);
    S(gntdev_grant_copy_segment); O(gntdev_grant_copy_segment, source);
    O(gntdev_grant_copy_segment, source.foreign.ref); O(gntdev_grant_copy_segment, source.foreign.offset);
    O(gntdev_grant_copy_segment, source.foreign.domid); O(gntdev_grant_copy_segment, dest);
    O(gntdev_grant_copy_segment, dest.foreign.ref); O(gntdev_grant_copy_segment, len);
    O(gntdev_grant_copy_segment, flags); O(gntdev_grant_copy_segment, status);
    S(ioctl_gntdev_grant_copy); O(ioctl_gntdev_grant_copy, count); O(ioctl_gntdev_grant_copy, segments);
    S(ioctl_gntalloc_alloc_gref); O(ioctl_gntalloc_alloc_gref, domid); O(ioctl_gntalloc_alloc_gref, flags);
    O(ioctl_gntalloc_alloc_gref, count); O(ioctl_gntalloc_alloc_gref, index); O(ioctl_gntalloc_alloc_gref, gref_ids);
    S(ioctl_gntalloc_dealloc_gref); O(ioctl_gntalloc_dealloc_gref, index); O(ioctl_gntalloc_dealloc_gref, count);
    S(ioctl_gntalloc_unmap_notify); O(ioctl_gntalloc_unmap_notify, index);
    O(ioctl_gntalloc_unmap_notify, action); O(ioctl_gntalloc_unmap_notify, event_channel_port);
    N(IOCTL_GNTDEV_MAP_GRANT_REF); N(IOCTL_GNTDEV_UNMAP_GRANT_REF); N(IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR);
    N(IOCTL_GNTDEV_SET_MAX_GRANTS); N(IOCTL_GNTDEV_SET_UNMAP_NOTIFY); N(IOCTL_GNTDEV_GRANT_COPY);
    N(IOCTL_GNTALLOC_ALLOC_GREF); N(IOCTL_GNTALLOC_DEALLOC_GREF); N(IOCTL_GNTALLOC_SET_UNMAP_NOTIFY);
    N(UNMAP_NOTIFY_CLEAR_BYTE); N(UNMAP_NOTIFY_SEND_EVENT); N(GNTALLOC_FLAG_WRITABLE);
#ifdef HAVE_XEN_GRANT_TABLE_H
    N(GNTCOPY_source_gref); N(GNTCOPY_dest_gref);
#endif
    return 0;
}
"#;

/// Compiles and runs the C program; `None` (with the reason printed) where
/// the machine has no header or no C compiler.
fn c_values(tag: &str) -> Option<HashMap<String, usize>> {
    if let Some(h) = HEADERS.iter().find(|h| !std::path::Path::new(h).exists()) {
        eprintln!("SKIP: {h} absent (install linux-libc-dev)");
        return None;
    }
    let dir = std::env::temp_dir().join(format!("gnttab-abi-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (src, exe) = (dir.join("abi.c"), dir.join("abi"));
    std::fs::write(&src, PROGRAM).unwrap();
    let mut cc = Command::new("cc");
    cc.arg("-Wall").arg("-o").arg(&exe).arg(&src);
    if std::path::Path::new(XEN_GRANT_TABLE_H).exists() {
        cc.arg("-DHAVE_XEN_GRANT_TABLE_H");
    } else {
        eprintln!("{XEN_GRANT_TABLE_H} absent: GNTCOPY_* not compared (install libxen-dev)");
    }
    let out = match cc.output() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("SKIP: no C compiler ({e})");
            return None;
        }
    };
    assert!(out.status.success(), "cc failed: {}", String::from_utf8_lossy(&out.stderr));
    let run = Command::new(&exe).output().unwrap();
    assert!(run.status.success());
    std::fs::remove_dir_all(&dir).unwrap();
    let text = String::from_utf8(run.stdout).unwrap();
    Some(
        text.lines()
            .map(|l| {
                let (k, v) = l.split_once(' ').unwrap();
                (k.to_string(), v.parse().unwrap())
            })
            .collect(),
    )
}

#[test]
fn struct_layouts_match_linux_xen_gntdev_and_gntalloc_h() {
    let Some(c) = c_values("layout") else { return };
    let rust = abi::layout();
    for (name, value) in &rust {
        let want = c.get(*name).unwrap_or_else(|| panic!("{name} missing from the C output"));
        assert_eq!(value, want, "{name}: Rust {value}, C {want}");
    }
    assert_eq!(rust.len(), 46);
}

#[test]
fn ioctl_numbers_and_flags_match_the_c_headers() {
    let Some(c) = c_values("ioctls") else { return };
    for (name, rust) in abi::IOCTLS {
        let want = c.get(name).unwrap_or_else(|| panic!("{name} missing from the C output"));
        assert_eq!(rust as usize, *want, "{name}: Rust {rust:#x}, C {want:#x}");
    }
    for (name, rust) in abi::CONSTANTS {
        match c.get(name) {
            Some(want) => assert_eq!(rust as usize, *want, "{name}"),
            None if name.starts_with("GNTCOPY_") && !std::path::Path::new(XEN_GRANT_TABLE_H).exists() => {}
            None => panic!("{name} missing from the C output"),
        }
    }
}
