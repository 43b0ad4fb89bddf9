//! Shared setup of the block tests: a simulated host with dom0 and guests,
//! disks in temporary files, blkfronts connected to the real backend.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use blkback::{Disk, FrontendConfig, Offer, QueueWorker};
use xen_sim::blkfront::{BlkCompletion, BlkOp, Blkfront, BlkfrontOptions, FrontQueue};
use xen_sim::host::SimHost;

/// A temporary disk file, removed on drop.
pub struct TempDisk {
    pub path: PathBuf,
}

impl TempDisk {
    pub fn new(name: &str, bytes: u64) -> TempDisk {
        let dir = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
        let path = dir.join(format!("blk-test-{}-{name}", std::process::id()));
        std::fs::File::create(&path).unwrap().set_len(bytes).unwrap();
        TempDisk { path }
    }
}

impl Drop for TempDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A guest's frontend wired straight to backend workers (no xenstore).
pub struct Direct {
    pub front: Blkfront,
    pub workers: Vec<QueueWorker>,
}

pub fn host_with(guests: &[u16]) -> Arc<SimHost> {
    let host = SimHost::new();
    host.create_domain(0).unwrap();
    for &g in guests {
        host.create_domain(g).unwrap();
    }
    host
}

/// Connects a new blkfront of `domid` to `disk` through the frontend's nodes.
pub fn direct(host: &Arc<SimHost>, domid: u16, disk: &TempDisk, read_only: bool, opts: BlkfrontOptions) -> Direct {
    let front = Blkfront::new(host, domid, 0, opts).unwrap();
    let nodes: HashMap<String, String> = front.nodes().into_iter().collect();
    let offer = Offer::default();
    let cfg = FrontendConfig::read(|k| nodes.get(k).cloned(), &offer).unwrap();
    let d = Arc::new(Disk::open(&disk.path, read_only, true).unwrap());
    let limits = blkback::config::disk_limits(&d, &offer);
    let grants = host.grant_mapper(0);
    let queues = blkback::map_queues(domid, &cfg, &d, limits, &grants, 2).unwrap();
    let h = host.clone();
    let open = move || -> evtchn::Result<Box<dyn evtchn::EventChannel>> { Ok(h.evtchn(0)) };
    let workers = blkback::spawn_workers(&format!("blk-d{domid}"), domid, &cfg, queues, &open).unwrap();
    Direct { front, workers }
}

/// Submits `op` and waits for its completion.
pub fn run(q: &mut FrontQueue, op: BlkOp<'_>) -> BlkCompletion {
    q.submit(7, op).unwrap();
    let mut out = Vec::new();
    for _ in 0..1000 {
        q.wait(Duration::from_millis(100), &mut out).unwrap();
        if let Some(c) = out.pop() {
            return c;
        }
    }
    panic!("no completion");
}

/// A recognisable pattern for `sector`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
