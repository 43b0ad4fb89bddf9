//! Writes every target's seeds into `fuzz/seeds/<target>/` (committed; the
//! fuzz smoke run starts from them), runs them and any saved crash inputs in
//! `fuzz/regressions/<target>/` through the harnesses, and checks that the
//! targets listed here match the `[[bin]]`s of `fuzz/Cargo.toml`.

use std::path::{Path, PathBuf};

use fuzz_common::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("fuzz/common has a parent").to_path_buf()
}

#[test]
fn seeds_are_written_and_run_clean() {
    for t in TARGETS {
        let dir = fuzz_dir().join("seeds").join(t.name);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in (t.seeds)() {
            let path = dir.join(name);
            if std::fs::read(&path).ok().as_deref() != Some(&bytes[..]) {
                std::fs::write(&path, &bytes).unwrap();
            }
            (t.run)(&bytes);
        }
    }
}

#[test]
fn saved_crash_inputs_run_clean() {
    for t in TARGETS {
        let Ok(entries) = std::fs::read_dir(fuzz_dir().join("regressions").join(t.name)) else { continue };
        for e in entries {
            let bytes = std::fs::read(e.unwrap().path()).unwrap();
            (t.run)(&bytes);
        }
    }
}

#[test]
fn every_target_has_a_cargo_fuzz_binary() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    let mut bins: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.trim().strip_prefix("name = \"")?.strip_suffix('"'))
        .filter(|n| *n != "xenbackd-fuzz")
        .collect();
    let mut names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
    bins.sort_unstable();
    names.sort_unstable();
    assert_eq!(bins, names);
    for n in names {
        assert!(fuzz_dir().join("fuzz_targets").join(format!("{n}.rs")).exists(), "fuzz_targets/{n}.rs missing");
    }
}
