//! `blk_hostile.rs` again, on the io_uring engine: `blk_support::engine()` picks it
//! from this test target's name.

#[path = "blk_hostile.rs"]
mod cases;
