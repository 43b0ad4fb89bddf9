//! cargo-fuzz wrapper of `fuzz_common::dm_args`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_common::dm_args::run(data));
