//! cargo-fuzz wrapper of `fuzz_common::blk_queue`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_common::blk_queue::run(data));
