//! Fuzz harnesses for everything a guest or xenstored can feed xenbackd, with
//! their structured inputs and seed inputs. Each harness is a plain function
//! (`run(&[u8])`) that panics only when a property is broken, so it runs under
//! libFuzzer (`fuzz_targets/`) and as a normal test on stable (`tests/`).
//!
//! To add a target: a module here with `run` and `seeds`, an entry in
//! [`TARGETS`], and a `[[bin]]` in `fuzz/Cargo.toml` with its
//! `fuzz_targets/<name>.rs` wrapper (see `docs/fuzzing.md`).
#![deny(missing_docs)]

pub mod backend_state;
pub mod blk_queue;
pub mod blkif_parse;
pub mod byte_ring;
pub mod console_ring;
pub mod dm_args;
pub mod input;
pub mod qcow2_image;
pub mod qmp;
pub mod ring_back;
pub mod ring_journal;
pub mod xenstored_unpriv;
pub mod xs_client_hostile;
pub mod xs_decoder;

/// A fuzz target: its name (the cargo-fuzz binary), its harness and its seeds.
pub struct Target {
    /// The name of the `[[bin]]` in `fuzz/Cargo.toml` and of `seeds/<name>/`.
    pub name: &'static str,
    /// The harness: panics on a broken property, returns otherwise.
    pub run: fn(&[u8]),
    /// Seed inputs, each with a file name.
    pub seeds: fn() -> Vec<(&'static str, Vec<u8>)>,
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target { name: "xs_decoder", run: xs_decoder::run, seeds: xs_decoder::seeds },
    Target { name: "ring_back", run: ring_back::run, seeds: ring_back::seeds },
    Target { name: "ring_journal", run: ring_journal::run, seeds: ring_journal::seeds },
    Target { name: "blkif_parse", run: blkif_parse::run, seeds: blkif_parse::seeds },
    Target { name: "xenstored_unpriv", run: xenstored_unpriv::run, seeds: xenstored_unpriv::seeds },
    Target { name: "xs_client_hostile", run: xs_client_hostile::run, seeds: xs_client_hostile::seeds },
    Target { name: "backend_state", run: backend_state::run, seeds: backend_state::seeds },
    Target { name: "qmp", run: qmp::run, seeds: qmp::seeds },
    Target { name: "dm_args", run: dm_args::run, seeds: dm_args::seeds },
    Target { name: "byte_ring", run: byte_ring::run, seeds: byte_ring::seeds },
    Target { name: "console_ring", run: console_ring::run, seeds: console_ring::seeds },
    Target { name: "qcow2_image", run: qcow2_image::run, seeds: qcow2_image::seeds },
    Target { name: "blk_queue", run: blk_queue::run, seeds: blk_queue::seeds },
];
