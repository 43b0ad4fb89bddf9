//! cargo-fuzz wrapper of `fuzz_common::qmp`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_common::qmp::run(data));
