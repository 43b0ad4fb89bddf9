//! Compares the Rust blkif layouts with Xen's public `io/blkif.h` (from
//! `libxen-dev`), compiled by the machine's C compiler.

use std::mem::{offset_of, size_of};
use std::process::Command;

use blkif::abi::*;

const PROGRAM: &str = r#"
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include <xen/xen.h>
#include <xen/io/blkif.h>
#define P(name, value) printf("%s %lu\n", name, (unsigned long)(value))
int main(void) {
    P("seg.size", sizeof(struct blkif_request_segment));
    P("seg.first_sect", offsetof(struct blkif_request_segment, first_sect));
    P("req.size", sizeof(struct blkif_request));
    P("req.id", offsetof(struct blkif_request, id));
    P("req.sector_number", offsetof(struct blkif_request, sector_number));
    P("req.seg", offsetof(struct blkif_request, seg));
    P("discard.size", sizeof(struct blkif_request_discard));
    P("discard.nr_sectors", offsetof(struct blkif_request_discard, nr_sectors));
    P("indirect.size", sizeof(struct blkif_request_indirect));
    P("indirect.handle", offsetof(struct blkif_request_indirect, handle));
    P("indirect.grefs", offsetof(struct blkif_request_indirect, indirect_grefs));
    P("rsp.size", sizeof(struct blkif_response));
    P("rsp.status", offsetof(struct blkif_response, status));
    P("op.indirect", BLKIF_OP_INDIRECT);
    P("op.discard", BLKIF_OP_DISCARD);
    P("max_segs", BLKIF_MAX_SEGMENTS_PER_REQUEST);
    P("max_indirect_pages", BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST);
    return 0;
}
"#;

#[test]
fn native_layout_matches_xen_public_blkif_h() {
    if !std::path::Path::new("/usr/include/xen/io/blkif.h").exists() {
        eprintln!("SKIP: /usr/include/xen/io/blkif.h absent (install libxen-dev: scripts/setup)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("blkif-abi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("abi.c");
    let exe = dir.join("abi");
    std::fs::write(&src, PROGRAM).unwrap();
    let cc = match Command::new("cc").arg("-o").arg(&exe).arg(&src).output() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("SKIP: no C compiler ({e})");
            return;
        }
    };
    assert!(cc.status.success(), "cc failed: {}", String::from_utf8_lossy(&cc.stderr));
    let out = Command::new(&exe).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let c: std::collections::HashMap<&str, usize> = text
        .lines()
        .map(|l| {
            let (k, v) = l.split_once(' ').unwrap();
            (k, v.parse().unwrap())
        })
        .collect();
    let rust = [
        ("seg.size", size_of::<BlkifRequestSegment>()),
        ("seg.first_sect", offset_of!(BlkifRequestSegment, first_sect)),
        ("req.size", size_of::<BlkifRequest64>()),
        ("req.id", offset_of!(BlkifRequest64, id)),
        ("req.sector_number", offset_of!(BlkifRequest64, sector_number)),
        ("req.seg", offset_of!(BlkifRequest64, seg)),
        ("discard.size", size_of::<BlkifRequestDiscard64>()),
        ("discard.nr_sectors", offset_of!(BlkifRequestDiscard64, nr_sectors)),
        ("indirect.size", size_of::<BlkifRequestIndirect64>()),
        ("indirect.handle", offset_of!(BlkifRequestIndirect64, handle)),
        ("indirect.grefs", offset_of!(BlkifRequestIndirect64, indirect_grefs)),
        ("rsp.size", size_of::<BlkifResponse64>()),
        ("rsp.status", offset_of!(BlkifResponse64, status)),
        ("op.indirect", BLKIF_OP_INDIRECT as usize),
        ("op.discard", BLKIF_OP_DISCARD as usize),
        ("max_segs", BLKIF_MAX_SEGMENTS_PER_REQUEST),
        ("max_indirect_pages", BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST),
    ];
    for (name, value) in rust {
        assert_eq!(c.get(name), Some(&value), "{name}: C says {:?}, Rust {value}", c.get(name));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `io/blkif.h` layouts as `(C expression, Rust value)` for a guest whose
/// structs are the `Req`/`Discard`/`Indirect`/`Rsp` of one Rust layout.
macro_rules! layout {
    ($req:ty, $discard:ty, $indirect:ty, $rsp:ty) => {
        vec![
            ("sizeof(struct blkif_request_segment)", size_of::<BlkifRequestSegment>()),
            ("sizeof(struct blkif_request)", size_of::<$req>()),
            ("offsetof(struct blkif_request, id)", offset_of!($req, id)),
            ("offsetof(struct blkif_request, sector_number)", offset_of!($req, sector_number)),
            ("offsetof(struct blkif_request, seg)", offset_of!($req, seg)),
            ("sizeof(struct blkif_request_discard)", size_of::<$discard>()),
            ("offsetof(struct blkif_request_discard, id)", offset_of!($discard, id)),
            ("offsetof(struct blkif_request_discard, nr_sectors)", offset_of!($discard, nr_sectors)),
            ("sizeof(struct blkif_request_indirect)", size_of::<$indirect>()),
            ("offsetof(struct blkif_request_indirect, id)", offset_of!($indirect, id)),
            ("offsetof(struct blkif_request_indirect, handle)", offset_of!($indirect, handle)),
            ("offsetof(struct blkif_request_indirect, indirect_grefs)", offset_of!($indirect, indirect_grefs)),
            ("sizeof(struct blkif_response)", size_of::<$rsp>()),
            ("offsetof(struct blkif_response, status)", offset_of!($rsp, status)),
        ]
    };
}

/// Compiles `io/blkif.h` with `cc args` for another architecture and checks
/// each layout value with a `_Static_assert`: nothing has to run there.
/// Freestanding, so that the compiler's own `stdint.h` is used, with only
/// `xen/` of the host's headers on the include path.
fn check_foreign_layout(cc: &str, args: &[&str], protocol: &str, layout: &[(&str, usize)]) {
    if !std::path::Path::new("/usr/include/xen/io/blkif.h").exists() {
        eprintln!("SKIP: /usr/include/xen/io/blkif.h absent (install libxen-dev: scripts/setup)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("blkif-{cc}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let xen = dir.join("xen");
    if !xen.exists() {
        std::os::unix::fs::symlink("/usr/include/xen", &xen).unwrap();
    }
    let mut program = String::from(
        "#include <stddef.h>\n#include <stdint.h>\n#include <xen/xen.h>\n#include <xen/io/blkif.h>\n\
         #include <xen/io/protocols.h>\n",
    );
    for (expr, value) in layout {
        program.push_str(&format!("_Static_assert({expr} == {value}, \"{expr} is not {value}\");\n"));
    }
    let src = dir.join("layout.c");
    std::fs::write(&src, program).unwrap();
    let out = match Command::new(cc)
        .args(args)
        .args(["-ffreestanding", "-fsyntax-only", "-I"])
        .arg(&dir)
        .arg(&src)
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            eprintln!("SKIP: no {cc} ({e}); scripts/setup installs it");
            return;
        }
    };
    assert!(out.status.success(), "{cc} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    // The protocol name the guest's Linux writes (`XEN_IO_PROTO_ABI_NATIVE`),
    // from the preprocessor alone.
    let probe = dir.join("native.c");
    std::fs::write(&probe, "#include <xen/io/protocols.h>\nXEN_IO_PROTO_ABI_NATIVE\n").unwrap();
    let out =
        Command::new(cc).args(args).args(["-ffreestanding", "-E", "-P", "-I"]).arg(&dir).arg(&probe).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.trim().lines().last(), Some(format!("\"{protocol}\"").as_str()), "{cc} {args:?}");
}

#[test]
fn arm64_layout_is_x86_64_and_matches_xen_public_blkif_h() {
    // What `Protocol::Arm` (`arm-abi`) is served with.
    assert_eq!(blkif::Layout::from(xen_bus::Protocol::Arm), blkif::Layout::from(xen_bus::Protocol::X86_64));
    let layout = layout!(BlkifRequest64, BlkifRequestDiscard64, BlkifRequestIndirect64, BlkifResponse64);
    check_foreign_layout("aarch64-linux-gnu-gcc", &[], "arm-abi", &layout);
}

#[test]
fn x86_32_layout_matches_xen_public_blkif_h() {
    let layout = layout!(BlkifRequest32, BlkifRequestDiscard32, BlkifRequestIndirect32, BlkifResponse32);
    check_foreign_layout("gcc", &["-m32"], "x86_32-abi", &layout);
}
