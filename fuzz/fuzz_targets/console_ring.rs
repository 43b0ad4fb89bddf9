//! cargo-fuzz wrapper of `fuzz_common::console_ring`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_common::console_ring::run(data));
