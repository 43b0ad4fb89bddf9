//! Block data path on the simulator: a blkfront's requests through the real
//! rings, grant copies and disk, in the three ABIs, with multi-page rings,
//! several queues and indirect requests.

mod blk_support;

use blk_support::*;
use blkback::abi::{BLKIF_OP_INDIRECT, BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_OKAY};
use blkback::Abi;
use xen_sim::blkfront::{BlkOp, BlkfrontOptions};

fn write_read_verify(abi: Abi) {
    let host = host_with(&[1]);
    let disk = TempDisk::new(&format!("abi-{abi:?}"), 4 << 20);
    let mut d = direct(&host, 1, &disk, false, BlkfrontOptions { abi, ..Default::default() });
    let q = d.front.queue(0);
    let data = pattern(3, 8192);
    let c = run(q, BlkOp::Write { sector: 100, data: &data });
    assert_eq!((c.status, c.operation), (BLKIF_RSP_OKAY, BLKIF_OP_WRITE));
    let c = run(q, BlkOp::Read { sector: 100, len: 8192 });
    assert_eq!((c.status, c.operation), (BLKIF_RSP_OKAY, BLKIF_OP_READ));
    assert!(c.data == data, "read back differs");
    let on_disk = std::fs::read(&disk.path).unwrap();
    assert!(on_disk[100 * 512..100 * 512 + 8192] == data[..], "data not at sector 100 on disk");
}

#[test]
fn native_abi_writes_and_reads_back() {
    write_read_verify(Abi::Native);
}

#[test]
fn x86_32_abi_writes_and_reads_back() {
    write_read_verify(Abi::X86_32);
}

#[test]
fn x86_64_abi_writes_and_reads_back() {
    write_read_verify(Abi::X86_64);
}

#[test]
fn indirect_request_of_a_megabyte_round_trips() {
    let host = host_with(&[2]);
    let disk = TempDisk::new("indirect", 8 << 20);
    let opts = BlkfrontOptions { max_request_bytes: 1 << 20, depth: 4, ..Default::default() };
    let mut d = direct(&host, 2, &disk, false, opts);
    let q = d.front.queue(0);
    assert!(q.uses_indirect());
    let data = pattern(9, 1 << 20);
    let c = run(q, BlkOp::Write { sector: 2048, data: &data });
    assert_eq!((c.status, c.operation), (BLKIF_RSP_OKAY, BLKIF_OP_INDIRECT));
    let c = run(q, BlkOp::Read { sector: 2048, len: 1 << 20 });
    assert_eq!(c.status, BLKIF_RSP_OKAY);
    assert!(c.data == data, "indirect read back differs");
}
