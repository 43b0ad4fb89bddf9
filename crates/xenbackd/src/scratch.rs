//! The scratch files of `demo` and `bench` (disk images in /dev/shm, which
//! is RAM) and stopping early on Ctrl-C or SIGTERM without leaving them
//! behind.
//!
//! A file is named `xenbackd-<kind>-<pid>-<name>` and registered until it
//! is dropped. The first SIGINT or SIGTERM asks the command to stop
//! ([`interrupted`]): it finishes the requests in flight, closes its disks
//! and removes its files on the way out. A second one removes every
//! registered file at once and exits 130. Files of runs that died anyway
//! (SIGKILL, a crash) are removed by the next run ([`remove_stale`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{SigSet, Signal};

/// The kinds of scratch file, as they appear in the names.
const KINDS: [&str; 3] = ["demo", "bench", "hostile"];

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static REGISTERED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Where scratch files go: /dev/shm where there is one, else the
/// temporary directory.
pub(crate) fn dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.into()
    } else {
        std::env::temp_dir()
    }
}

/// A scratch file of this process, removed on drop.
pub(crate) struct ScratchFile(PathBuf);

impl ScratchFile {
    /// Creates `xenbackd-<kind>-<pid>-<name>` in [`dir`], `len` bytes long
    /// (sparse).
    pub(crate) fn create(kind: &str, name: &str, len: u64) -> Result<ScratchFile> {
        debug_assert!(KINDS.contains(&kind), "{kind} is not removed by remove_stale");
        let path = dir().join(format!("xenbackd-{kind}-{}-{name}", std::process::id()));
        // Registered first: a second signal during the creation removes it.
        REGISTERED.lock().unwrap_or_else(|e| e.into_inner()).push(path.clone());
        let file = ScratchFile(path);
        std::fs::File::create(&file.0)
            .and_then(|f| f.set_len(len))
            .with_context(|| format!("creating {}", file.0.display()))?;
        Ok(file)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        REGISTERED.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| *p != self.0);
    }
}

/// Whether SIGINT or SIGTERM asked the command to stop.
pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// Sleeps `d`, or less once [`interrupted`]; false if interrupted.
pub(crate) fn sleep(d: Duration) -> bool {
    let end = Instant::now() + d;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if interrupted() {
            return false;
        }
        if left.is_zero() {
            return true;
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

/// Takes SIGINT and SIGTERM on a thread of their own. Call it before any
/// other thread starts: they inherit the blocked mask, so the signals
/// reach only that thread.
pub(crate) fn stop_on_signals() -> Result<()> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block().context("blocking SIGINT/SIGTERM")?;
    std::thread::Builder::new()
        .name("xenbackd-signals".into())
        .spawn(move || loop {
            let Ok(signal) = set.wait() else { continue };
            if !INTERRUPTED.swap(true, Ordering::Relaxed) {
                eprintln!("\nxenbackd: {signal}: stopping (again to quit at once)");
                continue;
            }
            for path in REGISTERED.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let _ = std::fs::remove_file(path);
            }
            std::process::exit(130);
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// Removes from [`dir`] the scratch files of runs whose process is gone;
/// returns how many.
pub(crate) fn remove_stale() -> usize {
    let Ok(entries) = std::fs::read_dir(dir()) else { return 0 };
    entries
        .flatten()
        .filter(|e| owner_pid(&e.file_name().to_string_lossy()).is_some_and(|pid| !process_exists(pid)))
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

/// The pid in a scratch file's name (`xenbackd-<kind>-<pid>-...`).
fn owner_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix("xenbackd-")?;
    let (kind, rest) = rest.split_once('-')?;
    if !KINDS.contains(&kind) {
        return None;
    }
    let (pid, _) = rest.split_once('-')?;
    pid.parse().ok().filter(|&p| p > 0)
}

fn process_exists(pid: i32) -> bool {
    // Signal 0 checks only; EPERM means it exists under another user.
    !matches!(nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None), Err(nix::errno::Errno::ESRCH))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_scratch_names_have_an_owner() {
        assert_eq!(owner_pid("xenbackd-demo-4242-d1-0.img"), Some(4242));
        assert_eq!(owner_pid("xenbackd-bench-7-disk.img"), Some(7));
        assert_eq!(owner_pid("xenbackd-demo-0-x"), None);
        assert_eq!(owner_pid("xenbackd-notify-12-x.sock"), None, "another kind");
        assert_eq!(owner_pid("xenbackd-demo-abc-x"), None);
        assert_eq!(owner_pid("other-demo-12-x"), None);
        assert_eq!(owner_pid("xenbackd-demo-12"), None, "no name after the pid");
    }

    #[test]
    fn stale_files_of_dead_runs_go_and_live_ones_stay() {
        // A pid that is no process: past the kernel's pid_max (4194304 at most).
        let dead = dir().join("xenbackd-bench-4194305-disk.img");
        std::fs::write(&dead, b"x").unwrap();
        let live = ScratchFile::create("bench", "live.img", 4096).unwrap();
        assert!(remove_stale() >= 1);
        assert!(!dead.exists(), "the dead run's file stays");
        assert!(live.path().exists(), "this process's file went");
        let path = live.path().to_path_buf();
        drop(live);
        assert!(!path.exists());
    }
}
