//! The io_uring engine: driven by the ring worker itself, with no thread
//! per request. `submit` only fills submission entries; `submit_pending`
//! hands a pass's worth to the kernel in one `io_uring_enter`; completions
//! are reaped from the shared completion queue without a system call, and
//! the ring's own fd, readable while the completion queue holds entries,
//! is the queue's fd in the worker's epoll: no eventfd to signal and to
//! read back. Discards of block devices (`BLKDISCARD`, which io_uring
//! cannot issue before Linux 6.12) run on one helper thread that signals
//! an eventfd the ring polls (a one-shot poll, re-armed, so its wakeup comes
//! through the same queue). The same engine serves a qcow2 image's
//! allocated data clusters in its file (`qcow2_engine.rs`), each operation
//! holding the lease that keeps its cluster mapping valid.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use io_uring::{opcode, squeue, types, IoUring};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::buffer::AlignedBuf;
use crate::disk::{Disk, DiskKind};
use crate::engine::{Completion, EngineError, IoEngine, IoOp};
use crate::format::DiskImage;
use crate::mapped::MappedIo;
use crate::qcow2::{MappingLease, Qcow2Image};

/// Submission queue entries per queue: a pass rarely submits more (the
/// ring budget), and a full queue is entered early, never refused.
const ENTRIES: u32 = 128;
/// `user_data` of the poll of the discard thread's eventfd (slots are
/// indices, far below).
const DISCARD_WAKE: u64 = u64::MAX;

/// What an operation in flight keeps until its completion is reaped: the
/// buffer the kernel reads or writes, which must not move or be freed.
struct Pending {
    tag: u64,
    kind: Kind,
    offset: u64,
    buf: Option<AlignedBuf>,
    /// The guest's pages of a vectored read or write, with the iovecs of
    /// what is left of it (read by the kernel while the entry is in flight).
    pages: Option<MappedIo>,
    /// A discard's length.
    len: u64,
    /// Bytes of `buf` already transferred (a short read or write goes on
    /// from there).
    done: usize,
    /// For I/O on a qcow2 image's data cluster: its mapping stays valid
    /// until the completion is reaped.
    _lease: Option<MappingLease>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    ReadPages,
    WritePages,
    Flush,
    Discard,
}

/// Whether io_uring can be used here (kernel support, not disabled by
/// `kernel.io_uring_disabled` or a seccomp filter): the error if not.
pub fn probe() -> std::io::Result<()> {
    IoUring::new(2).map(drop)
}

/// The file an engine's operations go to.
enum Target {
    /// A raw file or block device: the guest's offsets are the file's.
    Raw(Arc<Disk>),
    /// A qcow2 image's top file: offsets are host offsets, mapped before
    /// submission ([`IoUringEngine::submit_mapped`]).
    Qcow2(Arc<Qcow2Image>),
}

/// io_uring on one disk, for one queue.
pub struct IoUringEngine {
    ring: IoUring,
    target: Target,
    /// Operations by slot; the slot index is the entry's `user_data`.
    slots: Vec<Option<Pending>>,
    free: Vec<usize>,
    /// Entries pushed and not yet handed to the kernel.
    unsubmitted: usize,
    in_flight: usize,
    discards: Option<DiscardThread>,
    /// Completion entries copied out of the ring by `reap` (kept, so that
    /// reaping allocates nothing).
    cqes: Vec<(u64, i32)>,
}

/// Runs block-device discards off the worker thread.
struct DiscardThread {
    /// Written by the thread after each discard; polled by the ring.
    wake: Arc<EventFd>,
    jobs: Option<Sender<(usize, u64, u64, bool)>>,
    done: Receiver<(usize, std::io::Result<()>)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl IoUringEngine {
    /// An engine on `disk`; fails where io_uring is unavailable.
    pub fn new(disk: Arc<Disk>) -> Result<Self, EngineError> {
        Self::on(Target::Raw(disk))
    }

    /// An engine on the top file of `image`, for reads and writes whose
    /// clusters were mapped ([`IoUringEngine::submit_mapped`]); nothing
    /// else is submitted to it.
    pub fn for_mapped_clusters(image: Arc<Qcow2Image>) -> Result<Self, EngineError> {
        Self::on(Target::Qcow2(image))
    }

    fn on(target: Target) -> Result<Self, EngineError> {
        let ring = IoUring::builder().build(ENTRIES).map_err(EngineError::Create)?;
        Ok(IoUringEngine {
            ring,
            target,
            slots: Vec::new(),
            free: Vec::new(),
            unsubmitted: 0,
            in_flight: 0,
            discards: None,
            cqes: Vec::with_capacity(ENTRIES as usize),
        })
    }

    fn fd(&self) -> types::Fd {
        match &self.target {
            Target::Raw(disk) => types::Fd(disk.as_fd().as_raw_fd()),
            Target::Qcow2(image) => types::Fd(image.top_file().as_raw_fd()),
        }
    }

    /// Queues a read or write of a qcow2 image at `host_offset` in its top
    /// file, where [`Qcow2Image::map_direct`] found the guest's range;
    /// `lease` is dropped once the kernel is done with it.
    pub fn submit_mapped(
        &mut self,
        tag: u64,
        op: IoOp,
        host_offset: u64,
        lease: MappingLease,
    ) -> Result<(), EngineError> {
        let (kind, buf) = match op {
            IoOp::Read { buf, .. } => (Kind::Read, buf),
            IoOp::Write { buf, .. } => (Kind::Write, buf),
            IoOp::ReadPages { .. } | IoOp::WritePages { .. } | IoOp::Flush | IoOp::Discard { .. } => {
                return Err(EngineError::Submit(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "only reads and writes go to mapped clusters",
                )))
            }
        };
        let pending = Pending {
            tag,
            kind,
            offset: host_offset,
            buf: Some(buf),
            pages: None,
            len: 0,
            done: 0,
            _lease: Some(lease),
        };
        let slot = self.slot(pending);
        self.in_flight += 1;
        self.push(slot)
    }

    fn slot(&mut self, pending: Pending) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(pending);
                i
            }
            None => {
                self.slots.push(Some(pending));
                self.slots.len() - 1
            }
        }
    }

    /// The entry that (re)starts the operation in `slot`.
    fn entry(&mut self, slot: usize) -> squeue::Entry {
        let fd = self.fd();
        let p = self.slots[slot].as_mut().expect("slot in use");
        let entry = match p.kind {
            Kind::Read => {
                let buf = p.buf.as_mut().expect("a read has a buffer");
                let rest = &mut buf[p.done..];
                opcode::Read::new(fd, rest.as_mut_ptr(), rest.len() as u32).offset(p.offset + p.done as u64).build()
            }
            Kind::Write => {
                let buf = p.buf.as_ref().expect("a write has a buffer");
                let rest = &buf[p.done..];
                opcode::Write::new(fd, rest.as_ptr(), rest.len() as u32).offset(p.offset + p.done as u64).build()
            }
            Kind::ReadPages | Kind::WritePages => {
                let at = p.offset + p.done as u64;
                let iov = p.pages.as_mut().expect("a vectored transfer has pages").remainder(p.done);
                if p.kind == Kind::ReadPages {
                    opcode::Readv::new(fd, iov.as_ptr(), iov.len() as u32).offset(at).build()
                } else {
                    opcode::Writev::new(fd, iov.as_ptr(), iov.len() as u32).offset(at).build()
                }
            }
            Kind::Flush => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
            Kind::Discard => {
                let mode = nix::libc::FALLOC_FL_PUNCH_HOLE | nix::libc::FALLOC_FL_KEEP_SIZE;
                opcode::Fallocate::new(fd, p.len).offset(p.offset).mode(mode).build()
            }
        };
        entry.user_data(slot as u64)
    }

    fn push(&mut self, slot: usize) -> Result<(), EngineError> {
        let entry = self.entry(slot);
        self.push_entry(&entry)
    }

    /// A one-shot poll of the discard thread's eventfd (one-shot, as every
    /// kernel with io_uring has it; re-armed by `reap` at each completion).
    fn arm_discard_poll(&mut self) -> Result<(), EngineError> {
        let Some(d) = &self.discards else { return Ok(()) };
        let fd = types::Fd(d.wake.as_raw_fd());
        let entry = opcode::PollAdd::new(fd, nix::libc::POLLIN as u32).build().user_data(DISCARD_WAKE);
        self.push_entry(&entry)
    }

    fn push_entry(&mut self, entry: &squeue::Entry) -> Result<(), EngineError> {
        loop {
            // SAFETY: the entry points into the buffer of `slots[slot]` (or
            // its iovecs and the guest pages they name), which stays there, neither moved nor freed, until this
            // entry's completion is reaped (`reap`), and `Drop` waits for
            // every completion before the buffers go.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                self.unsubmitted += 1;
                return Ok(());
            }
            // Full: hand what is there to the kernel first.
            self.enter()?;
        }
    }

    fn enter(&mut self) -> Result<(), EngineError> {
        // Completions that found the completion queue full are kept by the
        // kernel (IORING_FEAT_NODROP) and moved to the ring only by an
        // io_uring_enter: one is due then even with nothing to submit
        // (`submit` adds GETEVENTS for it).
        if self.unsubmitted == 0 && !self.ring.submission().cq_overflow() {
            return Ok(());
        }
        match self.ring.submit() {
            Ok(_) => {
                self.unsubmitted = 0;
                Ok(())
            }
            // The completion queue is full (kernels without NODROP): the
            // entries stay queued for the next call, after a reap.
            Err(e) if e.raw_os_error() == Some(nix::libc::EBUSY) => Ok(()),
            Err(e) if e.raw_os_error() == Some(nix::libc::EINTR) => Ok(()),
            Err(e) => Err(EngineError::Submit(e)),
        }
    }

    /// Moves reaped completions to `out`; the number reaped.
    fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        let mut reaped = 0;
        let mut again = Vec::new();
        let mut rearm = false;
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(slot, res) in &cqes {
            reaped += 1;
            if slot == DISCARD_WAKE {
                // The discards done are on their channel (`reap_discards`).
                if let Some(d) = &self.discards {
                    let _ = d.wake.read();
                }
                rearm = true;
                continue;
            }
            let slot = slot as usize;
            let Some(p) = self.slots.get_mut(slot).and_then(Option::as_mut) else {
                log::error!("io_uring completion for unknown slot {slot}");
                continue;
            };
            let result = match (p.kind, res) {
                (_, r) if r < 0 => Err(std::io::Error::from_raw_os_error(-r)),
                (Kind::Read | Kind::Write | Kind::ReadPages | Kind::WritePages, n) => {
                    p.done += n as usize;
                    let len = match (&p.buf, &p.pages) {
                        (Some(b), _) => b.len(),
                        (None, Some(pages)) => pages.len(),
                        (None, None) => 0,
                    };
                    if p.done >= len {
                        Ok(())
                    } else if n == 0 {
                        Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "short transfer at end of disk"))
                    } else {
                        // Short: the rest goes in again.
                        again.push(slot);
                        continue;
                    }
                }
                _ => Ok(()),
            };
            out.push(self.finish(slot, result));
        }
        for slot in again {
            if let Err(e) = self.push(slot) {
                out.push(self.finish(slot, Err(std::io::Error::other(e))));
            }
        }
        if rearm {
            if let Err(e) = self.arm_discard_poll() {
                log::error!("io_uring: cannot poll for discard completions: {e}");
            }
        }
        self.cqes = cqes;
        reaped
    }

    fn finish(&mut self, slot: usize, result: std::io::Result<()>) -> Completion {
        // The lease (if any) goes with `p`: the kernel is done with the
        // cluster.
        let p = self.slots[slot].take().expect("slot in use");
        self.free.push(slot);
        self.in_flight -= 1;
        Completion { tag: p.tag, result, buf: p.buf }
    }

    fn discard_on_thread(&mut self, slot: usize, offset: u64, len: u64, secure: bool) -> Result<(), EngineError> {
        if self.discards.is_none() {
            let Target::Raw(disk) = &self.target else {
                return Err(EngineError::Submit(std::io::Error::from_raw_os_error(nix::libc::EOPNOTSUPP)));
            };
            let (jobs, rx) = crossbeam_channel::unbounded::<(usize, u64, u64, bool)>();
            let (tx, done) = crossbeam_channel::unbounded();
            let disk = disk.clone();
            let wake = Arc::new(
                EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                    .map_err(|e| EngineError::Create(e.into()))?,
            );
            let thread_wake = wake.clone();
            let thread = std::thread::Builder::new()
                .name("blk-discard".into())
                .spawn(move || {
                    for (slot, offset, len, secure) in rx {
                        if tx.send((slot, disk.discard(offset, len, secure))).is_err() {
                            break;
                        }
                        if let Err(e) = thread_wake.write(1) {
                            log::warn!("Discard completion wakeup failed: {e}");
                        }
                    }
                })
                .map_err(EngineError::Create)?;
            self.discards = Some(DiscardThread { wake, jobs: Some(jobs), done, thread: Some(thread) });
            self.arm_discard_poll()?;
        }
        let d = self.discards.as_ref().expect("just made");
        d.jobs.as_ref().ok_or(EngineError::Stopped)?.send((slot, offset, len, secure)).map_err(|_| EngineError::Stopped)
    }

    fn reap_discards(&mut self, out: &mut Vec<Completion>) -> usize {
        let Some(d) = &self.discards else { return 0 };
        let done: Vec<_> = d.done.try_iter().collect();
        let n = done.len();
        for (slot, result) in done {
            out.push(self.finish(slot, result));
        }
        n
    }
}

impl IoEngine for IoUringEngine {
    fn submit(&mut self, tag: u64, op: IoOp) -> Result<(), EngineError> {
        if let Target::Qcow2(_) = self.target {
            // Guest offsets are not the file's: only mapped I/O comes here.
            return Err(EngineError::Submit(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "qcow2 I/O must be mapped first",
            )));
        }
        let (kind, offset, buf, pages) = match op {
            IoOp::Read { offset, buf } => (Kind::Read, offset, Some(buf), None),
            IoOp::Write { offset, buf } => (Kind::Write, offset, Some(buf), None),
            IoOp::ReadPages { offset, pages } => (Kind::ReadPages, offset, None, Some(pages)),
            IoOp::WritePages { offset, pages } => (Kind::WritePages, offset, None, Some(pages)),
            IoOp::Flush => (Kind::Flush, 0, None, None),
            IoOp::Discard { offset, len, secure } => {
                let p =
                    Pending { tag, kind: Kind::Discard, offset, buf: None, pages: None, len, done: 0, _lease: None };
                let slot = self.slot(p);
                self.in_flight += 1;
                let file = matches!(&self.target, Target::Raw(disk) if disk.kind() == DiskKind::File);
                if file && len > 0 {
                    return self.push(slot);
                }
                // BLKDISCARD (and the empty range, which fallocate refuses)
                // as the thread-pool engine does it.
                return self.discard_on_thread(slot, offset, len, secure).inspect_err(|_| {
                    let _ = self.finish(slot, Ok(()));
                });
            }
        };
        let slot = self.slot(Pending { tag, kind, offset, buf, pages, len: 0, done: 0, _lease: None });
        self.in_flight += 1;
        self.push(slot)
    }

    fn submit_pending(&mut self) -> Result<(), EngineError> {
        self.enter()
    }

    fn completions(&mut self, out: &mut Vec<Completion>) {
        // Entries left queued by a full completion queue go in first.
        if let Err(e) = self.enter() {
            log::warn!("io_uring submit: {e}");
        }
        // Nothing to reset: the ring's fd is readable while entries wait.
        let mut reaped = self.reap(out) + self.reap_discards(out);
        // More than the completion queue holds may have completed (a ring
        // of 512 requests, 128 submitted at a time): the overflow comes
        // back one enter at a time, as the ring has room.
        while self.ring.submission().cq_overflow() {
            if let Err(e) = self.enter() {
                log::warn!("io_uring submit: {e}");
                break;
            }
            let more = self.reap(out);
            if more == 0 {
                break;
            }
            reaped += more;
        }
        if reaped > 0 {
            // Short transfers put back in the queue.
            if let Err(e) = self.enter() {
                log::warn!("io_uring submit: {e}");
            }
        }
    }

    fn completions_ready(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    fn completion_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn takes_mapped_pages(&self) -> bool {
        matches!(self.target, Target::Raw(_))
    }
}

impl Drop for IoUringEngine {
    fn drop(&mut self) {
        // The kernel may still write into the buffers of operations in
        // flight: wait for each before they are freed.
        if let Some(d) = &mut self.discards {
            d.jobs = None;
            if let Some(t) = d.thread.take() {
                let _ = t.join();
            }
        }
        let mut out = Vec::new();
        while self.in_flight > 0 {
            self.reap_discards(&mut out);
            if self.in_flight == 0 {
                break;
            }
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.raw_os_error() != Some(nix::libc::EINTR) {
                    log::error!(
                        "io_uring: waiting for {} operation(s) at teardown: {e}; leaking their buffers",
                        self.in_flight
                    );
                    for p in self.slots.drain(..).flatten() {
                        std::mem::forget(p.buf);
                        // The guest's pages stay mapped too.
                        std::mem::forget(p.pages);
                    }
                    return;
                }
            }
            self.reap(&mut out);
            out.clear();
        }
    }
}
