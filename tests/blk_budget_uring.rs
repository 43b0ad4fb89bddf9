//! `blk_budget.rs` again, on the io_uring engine: `blk_support::engine()` picks it
//! from this test target's name.

#[path = "blk_budget.rs"]
mod cases;
