//! cargo-fuzz wrapper of `fuzz_common::qcow2_image`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_common::qcow2_image::run(data));
