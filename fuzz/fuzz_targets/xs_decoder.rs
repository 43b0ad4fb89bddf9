//! cargo-fuzz wrapper of `fuzz_common::xs_decoder`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_common::xs_decoder::run(data));
