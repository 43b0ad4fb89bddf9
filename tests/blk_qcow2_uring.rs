//! `blk_qcow2.rs` again, on the io_uring engine (qcow2's allocated clusters
//! in place, the rest through imago): `blk_support::engine()` picks it
//! from this test target's name.

#[path = "blk_qcow2.rs"]
mod cases;
