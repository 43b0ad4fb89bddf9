//! cargo-fuzz wrapper of `fuzz_common::xs_client_hostile`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_common::xs_client_hostile::run(data));
