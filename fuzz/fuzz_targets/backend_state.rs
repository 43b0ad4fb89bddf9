//! cargo-fuzz wrapper of `fuzz_common::backend_state`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_common::backend_state::run(data));
