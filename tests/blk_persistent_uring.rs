//! `blk_persistent.rs` again, on the io_uring engine: `blk_support::engine()` picks it
//! from this test target's name.

#[path = "blk_persistent.rs"]
mod cases;
