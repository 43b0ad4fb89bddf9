//! cargo-fuzz wrapper of `fuzz_common::blkif_parse`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_common::blkif_parse::run(data));
