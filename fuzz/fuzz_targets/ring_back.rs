//! cargo-fuzz wrapper of `fuzz_common::ring_back`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_common::ring_back::run(data));
