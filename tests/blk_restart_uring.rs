//! `blk_restart.rs` again, on the io_uring engine: `blk_support::engine()` picks it
//! from this test target's name.

#[path = "blk_restart.rs"]
mod cases;
