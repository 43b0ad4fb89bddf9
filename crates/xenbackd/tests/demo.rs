//! `xenbackd demo` tells the truth (issue 17): OK only after a clean run
//! that verified data, with no device failed at teardown; Ctrl-C stops it
//! with its scratch files removed; files of runs that died are removed by
//! the next run.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const XB: &str = env!("CARGO_BIN_EXE_xenbackd");

/// One demo at a time: each removes the stale files of the others' view.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn scratch_dir() -> &'static Path {
    if Path::new("/dev/shm").is_dir() {
        Path::new("/dev/shm")
    } else {
        Box::leak(std::env::temp_dir().into_boxed_path())
    }
}

/// Scratch files of process `pid` still in the scratch directory.
fn files_of(pid: u32) -> Vec<String> {
    let prefix = format!("xenbackd-demo-{pid}-");
    std::fs::read_dir(scratch_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect()
}

fn demo(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(XB).arg("demo").args(args).env_remove("RUST_LOG").output().expect("run xenbackd demo");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// Many guests (the run that logged 40 errors at teardown and said OK: the
/// guests' rings were freed before their devices were closed).
#[test]
fn sixty_four_guests_pass_with_no_error_at_teardown() {
    let _one = one_at_a_time();
    let (code, stdout, stderr) = demo(&["--guests", "64", "--duration", "1", "--size", "4", "--queues", "1"]);
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("\nOK: every byte read back matched"), "{stdout}");
    assert!(!stderr.contains("ERROR"), "{stderr}");
    assert!(!stderr.contains("Ring failed"), "{stderr}");
}

#[test]
fn sigint_stops_the_demo_and_removes_its_disks() {
    let _one = one_at_a_time();
    let mut child = Command::new(XB)
        .args(["demo", "--guests", "2", "--disks", "2", "--duration", "600", "--size", "8"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    // Wait until the workload runs: its first progress line.
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let started = Instant::now();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push(line.clone());
        if line.starts_with("[  1s]") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "no progress: {seen:?}");
    }
    assert_eq!(files_of(pid).len(), 4, "{:?}", files_of(pid));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{rest:?}");
    assert!(rest.iter().any(|l| l.starts_with("INTERRUPTED")), "{rest:?}");
    assert!(files_of(pid).is_empty(), "left behind: {:?}", files_of(pid));
}

#[test]
fn files_of_a_demo_that_died_are_removed_by_the_next() {
    let _one = one_at_a_time();
    // A pid that is no process: past the kernel's largest pid_max.
    let stale = scratch_dir().join("xenbackd-demo-4194309-d1-0.img");
    std::fs::write(&stale, b"left by a run killed with SIGKILL").unwrap();
    let (code, stdout, stderr) = demo(&["--guests", "1", "--duration", "1", "--size", "4"]);
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(!stale.exists());
    assert!(stderr.contains("removed 1 scratch file(s) of earlier runs"), "{stderr}");
}
