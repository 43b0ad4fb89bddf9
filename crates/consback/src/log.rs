//! A guest's console log file (`serve --consoles --console-log-dir`), as
//! xenconsoled's `guest-<name>.log`: what the guest wrote, appended as it
//! is consumed from the ring (before the pty, so a console nobody reads is
//! still logged), bounded in size (at the bound the file becomes
//! `<file>.old` and a new one starts: at most twice the bound on disk),
//! reopened when the shared generation changes (SIGHUP, for logrotate).
//!
//! Writes are plain appends to a local file on the console's worker, as
//! xenconsoled does them on its one thread: a log directory on a slow file
//! system slows the consoles of that worker.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::ring::OutputSink;

/// One guest's log file.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    max: u64,
    generation: Arc<AtomicU64>,
    seen: u64,
    failed: bool,
}

impl LogFile {
    /// Appends to `path`, keeping it under `max` bytes; reopens it whenever
    /// `generation` changes.
    pub fn new(path: PathBuf, max: u64, generation: Arc<AtomicU64>) -> Self {
        let seen = generation.load(Ordering::Relaxed);
        let mut log = LogFile { path, file: None, size: 0, max: max.max(4096), generation, seen, failed: false };
        log.open(false);
        log
    }

    /// The file's path.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    fn open(&mut self, truncate: bool) {
        let opened = OpenOptions::new().create(true).append(!truncate).write(true).truncate(truncate).open(&self.path);
        match opened {
            Ok(f) => {
                self.size = f.metadata().map(|m| m.len()).unwrap_or(0);
                self.file = Some(f);
                self.failed = false;
            }
            Err(e) => {
                if !self.failed {
                    log::error!("console log {}: {e}; not logging this guest", self.path.display());
                }
                self.failed = true;
                self.file = None;
            }
        }
    }

    fn rotate(&mut self) {
        self.file = None;
        let mut old = self.path.clone().into_os_string();
        old.push(".old");
        if let Err(e) = std::fs::rename(&self.path, &old) {
            log::warn!("console log {}: rotating: {e}", self.path.display());
        }
        self.open(true);
    }
}

impl OutputSink for LogFile {
    fn write(&mut self, data: &[u8]) {
        let generation = self.generation.load(Ordering::Relaxed);
        if generation != self.seen {
            self.seen = generation;
            self.file = None;
            self.open(false);
        }
        if self.size + data.len() as u64 > self.max {
            self.rotate();
        }
        let Some(f) = &mut self.file else { return };
        match f.write_all(data) {
            Ok(()) => self.size += data.len() as u64,
            Err(e) => {
                log::error!("console log {}: {e}", self.path.display());
                self.file = None;
                self.failed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("consback-log-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn appends_and_rotates_at_the_bound() {
        let d = dir("rotate");
        let path = d.join("guest-a.log");
        let mut log = LogFile::new(path.clone(), 4096, Arc::default());
        log.write(&[b'a'; 3000]);
        log.write(&[b'b'; 3000]);
        assert_eq!(std::fs::read(&path).unwrap(), vec![b'b'; 3000], "a new file after the bound");
        assert_eq!(std::fs::read(d.join("guest-a.log.old")).unwrap(), vec![b'a'; 3000]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_new_generation_reopens_the_path() {
        let d = dir("reopen");
        let path = d.join("guest-b.log");
        let generation = Arc::new(AtomicU64::new(0));
        let mut log = LogFile::new(path.clone(), 1 << 20, generation.clone());
        log.write(b"one ");
        std::fs::rename(&path, d.join("rotated")).unwrap();
        log.write(b"two ");
        generation.fetch_add(1, Ordering::Relaxed);
        log.write(b"three");
        assert_eq!(std::fs::read(d.join("rotated")).unwrap(), b"one two ");
        assert_eq!(std::fs::read(&path).unwrap(), b"three");
        let _ = std::fs::remove_dir_all(&d);
    }
}
