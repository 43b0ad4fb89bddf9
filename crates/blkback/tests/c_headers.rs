//! Compares the Rust blkif layouts with Xen's public `io/blkif.h` (from
//! `libxen-dev`), compiled by the machine's C compiler.

use std::mem::{offset_of, size_of};
use std::process::Command;

use blkback::abi::*;

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
