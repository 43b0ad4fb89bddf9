//! cargo-fuzz wrapper of `fuzz_common::ring_journal`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_common::ring_journal::run(data));
