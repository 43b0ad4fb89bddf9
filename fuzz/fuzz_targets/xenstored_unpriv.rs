//! cargo-fuzz wrapper of `fuzz_common::xenstored_unpriv`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_common::xenstored_unpriv::run(data));
