//! The worker pool: each ring belongs to one worker thread, which waits on
//! the rings' event-channel fds with epoll and calls their handlers with a
//! bounded budget per pass, round-robin over the rings with work. Rings are
//! added and removed through a bounded command channel plus an eventfd
//! wakeup; the worker owns them.
//!
//! Removal never blocks anyone: the ring is drained step by step on its
//! completion events ([`RingHandler::drain`]) while the worker serves its
//! other rings, and the remover hears of it on a channel ([`Released`]). A
//! ring still busy at its deadline goes to a thread of its own to finish
//! and drop (a stuck disk keeps only that thread), and is reported stuck.
//!
//! Event storms: a port is unmasked only once the passes its event caused
//! are done (Linux's lateeoi, `drivers/xen/events/events_base.c`). If none
//! of them took a request ([`Progress::idle`]), the event was spurious; from
//! the second spurious event in a row on, the unmask is delayed, 1 ms
//! doubling up to 1 s, and the first event that finds work ends the delay
//! (XSA-332). A guest kicking an idle ring in a loop then costs a pass per
//! delay, not a pass per kick; a guest with work is never delayed.
//!
//! Fairness: passes are bounded by time as well as requests. A ring whose
//! pass ran out of budget after more than [`PASS_QUANTUM`] gets a budget
//! scaled down to fit the quantum (doubled back while its passes are
//! short), and goes to the back of the ready rings; a ring woken by an
//! event goes to the front. A neighbour's request then waits for at most
//! one busy ring's pass, whatever the busy ring's requests cost.

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::clock::Tick;
use crate::device::{Progress, RingSetup};
use crate::error::{DeviceError, Error};
use crate::key::DeviceKey;
use crate::thread::{panic_message, spawn_named};

/// Commands queued per worker before the sender waits.
const COMMAND_QUEUE: usize = 64;
/// Epoll events taken per wait.
const EVENTS_PER_WAIT: usize = 64;
/// Spurious events in a row that are unmasked at once (Linux's
/// `spurious_threshold` default).
const SPURIOUS_THRESHOLD: u32 = 1;
/// How long one pass of a busy ring should take at most.
const PASS_QUANTUM: Duration = Duration::from_micros(30);
/// Longest delay of a spurious port's unmask (Linux: `HZ`, one second).
const MAX_EOI_DELAY: Duration = Duration::from_secs(1);

/// How long the unmask of a port is delayed after its `spurious`-th
/// spurious event in a row: nothing up to [`SPURIOUS_THRESHOLD`], then 1 ms
/// doubling up to [`MAX_EOI_DELAY`] (Linux's `xen_irq_lateeoi_locked`, in
/// milliseconds instead of jiffies).
fn eoi_delay(spurious: u32) -> Option<Duration> {
    let over = spurious.checked_sub(SPURIOUS_THRESHOLD + 1)?;
    Some(Duration::from_millis(1u64 << over.min(10)).min(MAX_EOI_DELAY))
}

/// Which device instance a ring belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Owner {
    pub key: DeviceKey,
    pub generation: u64,
}

/// A ring handler failed (error or panic); the ring is already gone.
#[derive(Debug)]
pub(crate) struct Failure {
    pub owner: Owner,
    pub error: DeviceError,
}

/// Where a ring went, to take it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Placement {
    worker: usize,
    id: u64,
}

/// A removed ring is gone: drained and dropped (unmapped, port unbound),
/// or, if `stuck`, handed to a thread of its own because its I/O did not
/// finish by the deadline.
#[derive(Debug)]
pub(crate) struct Released {
    pub owner: Owner,
    pub stuck: bool,
}

enum Command {
    Add { id: u64, owner: Owner, setup: RingSetup },
    Remove { id: u64, owner: Owner, deadline: Tick, done: Sender<Released> },
    Stop,
}

/// What an epoll event stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    /// The command eventfd.
    Wake,
    /// A ring's event channel (slot index).
    Port(u32),
    /// A ring handler's completion fd (slot index).
    Completion(u32),
}

impl Token {
    const KIND_SHIFT: u32 = 32;

    fn to_u64(self) -> u64 {
        match self {
            Token::Wake => 0,
            Token::Port(s) => (1 << Self::KIND_SHIFT) | u64::from(s),
            Token::Completion(s) => (2 << Self::KIND_SHIFT) | u64::from(s),
        }
    }

    fn from_u64(v: u64) -> Option<Self> {
        let slot = v as u32;
        match v >> Self::KIND_SHIFT {
            0 if slot == 0 => Some(Token::Wake),
            1 => Some(Token::Port(slot)),
            2 => Some(Token::Completion(slot)),
            _ => None,
        }
    }
}

struct WorkerHandle {
    commands: Sender<Command>,
    wake: Arc<EventFd>,
    load: Arc<AtomicUsize>,
    thread: Option<JoinHandle<Option<()>>>,
}

/// The pool; see the module docs.
pub(crate) struct WorkerPool {
    workers: Vec<WorkerHandle>,
    next_id: u64,
}

impl WorkerPool {
    /// Starts `n` workers (at least one) serving `budget` requests per ring per pass.
    pub fn new(n: usize, budget: usize, failures: Sender<Failure>) -> Result<Self, Error> {
        let mut workers = Vec::new();
        for i in 0..n.max(1) {
            let epoll =
                Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(|source| Error::Sys { what: "epoll", source })?;
            let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|source| Error::Sys { what: "eventfd", source })?;
            epoll
                .add(wake.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, Token::Wake.to_u64()))
                .map_err(|source| Error::Sys { what: "epoll", source })?;
            let wake = Arc::new(wake);
            let (tx, rx) = crossbeam_channel::bounded(COMMAND_QUEUE);
            let load = Arc::new(AtomicUsize::new(0));
            let worker = Worker {
                epoll,
                wake: wake.clone(),
                commands: rx,
                slots: Vec::new(),
                free: Vec::new(),
                ready: VecDeque::new(),
                budget: budget.max(1),
                failures: failures.clone(),
                load: load.clone(),
            };
            let name = format!("xenbackd-w{i}");
            let thread = spawn_named(
                name.clone(),
                move |msg| log::error!("Worker {name} died: {msg}; its rings are no longer served"),
                move || worker.run(),
            )?;
            workers.push(WorkerHandle { commands: tx, wake, load, thread: Some(thread) });
        }
        Ok(WorkerPool { workers, next_id: 0 })
    }

    /// Number of workers.
    pub fn len(&self) -> usize {
        self.workers.len()
    }

    fn send(&self, worker: usize, cmd: Command) -> bool {
        let w = &self.workers[worker];
        if w.commands.send(cmd).is_err() {
            return false;
        }
        if let Err(e) = w.wake.write(1) {
            log::error!("Waking worker {worker}: {e}");
        }
        true
    }

    /// Hands a ring to the least loaded worker.
    pub fn add(&mut self, owner: Owner, setup: RingSetup) -> Placement {
        let worker = (0..self.workers.len()).min_by_key(|&i| self.workers[i].load.load(Ordering::Relaxed)).unwrap_or(0);
        let id = self.next_id;
        self.next_id += 1;
        self.workers[worker].load.fetch_add(1, Ordering::Relaxed);
        if !self.send(worker, Command::Add { id, owner, setup }) {
            log::error!("Worker {worker} is gone; ring {id} is not served");
        }
        Placement { worker, id }
    }

    /// Takes a ring back without waiting: its handler takes no new request
    /// and is drained, then dropped (unmapping the ring, unbinding the
    /// port); `done` then gets a [`Released`]. At `timeout` a ring still
    /// busy is left to a thread of its own and reported stuck. False if
    /// the worker is gone (nothing will be sent).
    pub fn remove(&self, placement: Placement, owner: Owner, timeout: Duration, done: Sender<Released>) -> bool {
        let deadline = Tick::now() + timeout;
        self.send(placement.worker, Command::Remove { id: placement.id, owner, deadline, done })
    }

    /// Stops every worker after their rings are quiesced and dropped.
    pub fn shutdown(&mut self) {
        for i in 0..self.workers.len() {
            self.send(i, Command::Stop);
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Entry {
    id: u64,
    owner: Owner,
    setup: RingSetup,
    queued: bool,
    /// Being taken away: whom to tell, and by when.
    draining: Option<(Tick, Sender<Released>)>,
    /// Ports taken from the handle and not unmasked yet (late EOI).
    eoi: Vec<evtchn::Port>,
    /// A pass since the last port event took requests.
    worked: bool,
    /// Spurious port events in a row.
    spurious: u32,
    /// When the port of a spurious ring is unmasked.
    unmask_at: Option<Tick>,
    /// When the handler asked to be called again ([`Progress::retry`]).
    retry_at: Option<Tick>,
    /// Requests per pass, cut to fit [`PASS_QUANTUM`].
    budget: usize,
}

impl Entry {
    fn new(id: u64, owner: Owner, setup: RingSetup) -> Self {
        Entry {
            id,
            owner,
            setup,
            queued: false,
            draining: None,
            eoi: Vec::new(),
            worked: false,
            spurious: 0,
            unmask_at: None,
            retry_at: None,
            budget: usize::MAX,
        }
    }

    /// The next pass's budget after one of `budget` requests that took
    /// `spent`, `more` work left: scaled to fit [`PASS_QUANTUM`] if it was
    /// longer and left work, doubled back up to `max` if short. Handlers
    /// may bound more than requests by it (blkback: read data copied per
    /// pass).
    fn adapt_budget(&mut self, budget: usize, spent: Duration, more: bool, max: usize) {
        self.budget = if more && spent > PASS_QUANTUM {
            let fit = budget as u128 * PASS_QUANTUM.as_nanos() / spent.as_nanos().max(1);
            (fit as usize).max(1)
        } else if spent < PASS_QUANTUM / 2 {
            budget.saturating_mul(2).min(max)
        } else {
            budget
        };
    }

    /// The earliest of its timers.
    fn next_timer(&self) -> Option<Tick> {
        let drain = self.draining.as_ref().map(|(t, _)| *t);
        [drain, self.unmask_at, self.retry_at].into_iter().flatten().min()
    }

    /// Unmasks the ports taken (the late EOI).
    fn unmask(&mut self) -> Result<(), DeviceError> {
        self.unmask_at = None;
        let handle = self.setup.port.handle();
        let res = self.eoi.iter().try_for_each(|p| handle.unmask(*p));
        self.eoi.clear();
        Ok(res?)
    }

    /// After a pass with nothing left to take: the late EOI of the port
    /// events since the last one, at once if a pass took work, else (a
    /// spurious event) delayed per [`eoi_delay`].
    fn late_eoi(&mut self, now: Tick) -> Result<(), DeviceError> {
        if self.eoi.is_empty() || self.unmask_at.is_some() {
            return Ok(());
        }
        if std::mem::take(&mut self.worked) {
            self.spurious = 0;
        } else {
            self.spurious = (self.spurious + 1).min(SPURIOUS_THRESHOLD + 12);
            if let Some(delay) = eoi_delay(self.spurious) {
                self.unmask_at = Some(now + delay);
                return Ok(());
            }
        }
        self.unmask()
    }
}

/// One worker's state, owned by its thread.
struct Worker {
    epoll: Epoll,
    wake: Arc<EventFd>,
    commands: Receiver<Command>,
    slots: Vec<Option<Entry>>,
    free: Vec<u32>,
    ready: VecDeque<u32>,
    budget: usize,
    failures: Sender<Failure>,
    load: Arc<AtomicUsize>,
}

/// Drops a ring taken out of its worker (unmapping it, unbinding its port),
/// then tells whoever asked for its removal.
fn release(mut entry: Entry) {
    let tell = entry.draining.take().map(|(_, tell)| tell);
    let owner = entry.owner.clone();
    drop(entry);
    if let Some(tell) = tell {
        let _ = tell.send(Released { owner, stuck: false });
    }
}

/// A failed ring on its way out: dropped (waiting for its I/O), then its
/// failure reported. Wherever it is dropped, on a reaper thread or, if none
/// could start, on its worker.
struct ReapFailed {
    entry: Option<Entry>,
    failures: Sender<Failure>,
    failure: Option<Failure>,
}

impl Drop for ReapFailed {
    fn drop(&mut self) {
        drop(self.entry.take());
        if let Some(f) = self.failure.take() {
            // Unbounded, but each ring reports at most once (it is gone).
            let _ = self.failures.send(f);
        }
    }
}

impl Worker {
    fn run(mut self) {
        let mut events = [EpollEvent::empty(); EVENTS_PER_WAIT];
        let mut pending = Vec::new();
        loop {
            let timeout = if !self.ready.is_empty() {
                EpollTimeout::ZERO
            } else {
                match self.next_timer() {
                    None => EpollTimeout::NONE,
                    Some(t) => {
                        let ms = t.saturating_duration_since(Tick::now()).as_millis().clamp(1, 60_000);
                        EpollTimeout::try_from(ms as i32).unwrap_or(EpollTimeout::NONE)
                    }
                }
            };
            let n = match self.epoll.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("Worker epoll failed: {e}");
                    self.stop();
                    return;
                }
            };
            for ev in &events[..n] {
                match Token::from_u64(ev.data()) {
                    Some(Token::Wake) => {
                        let _ = self.wake.read();
                        if !self.commands() {
                            self.stop();
                            return;
                        }
                    }
                    Some(Token::Port(slot)) => self.port_event(slot, &mut pending),
                    Some(Token::Completion(slot)) if self.is_draining(slot) => self.drain_step(slot),
                    Some(Token::Completion(slot)) => self.mark_woken(slot),
                    None => log::warn!("Unknown epoll token {:#x}", ev.data()),
                }
            }
            // Timers on the coarse clock, which is no system call (see
            // `clock`); pass times need the fine one, which may be.
            let now = Tick::now();
            self.drains_expired(now);
            self.timers(now);
            // Pass times matter only between rings: a worker serving one
            // ring does not time its passes. Else one fine clock read per
            // pass, each pass starting when the last ended.
            let round = (self.rings() > 1).then(Instant::now);
            let mut now = round;
            for _ in 0..self.ready.len() {
                let Some(slot) = self.ready.pop_front() else { break };
                now = self.service(slot, now);
                // Once a round has taken a quantum, poll for events before
                // the next pass: a ring woken meanwhile then waits for one
                // busy pass, not for every ready ring's. The rings not
                // served yet keep their place.
                if let (Some(round), Some(now)) = (round, now) {
                    if now.duration_since(round) >= PASS_QUANTUM {
                        break;
                    }
                }
            }
        }
    }

    /// Runs queued commands; false on Stop.
    fn commands(&mut self) -> bool {
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                Command::Add { id, owner, setup } => self.add(id, owner, setup),
                Command::Remove { id, owner, deadline, done } => {
                    match self.slots.iter().position(|e| e.as_ref().is_some_and(|e| e.id == id)) {
                        Some(slot) => self.start_drain(slot as u32, deadline, done),
                        // Failed before (its failure is reported): gone already.
                        None => {
                            let _ = done.send(Released { owner, stuck: false });
                        }
                    }
                }
                Command::Stop => return false,
            }
        }
        true
    }

    fn add(&mut self, id: u64, owner: Owner, setup: RingSetup) {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                (self.slots.len() - 1) as u32
            }
        };
        let port_fd = setup.port.handle().as_fd();
        let completion = setup.handler.completion_fd();
        let mut res = self.epoll.add(port_fd, EpollEvent::new(EpollFlags::EPOLLIN, Token::Port(slot).to_u64()));
        if let (Ok(()), Some(fd)) = (&res, completion) {
            res = self.epoll.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, Token::Completion(slot).to_u64()));
        }
        let res = res
            .map_err(|e| DeviceError::msg(format!("Cannot poll the event channel: {e}")))
            // A predecessor that crashed may have published responses
            // without notifying them, and a frontend like Linux's blkfront
            // reads responses only on an event: one event now, which a
            // frontend with nothing to read takes as spurious.
            .and_then(|()| setup.port.notify());
        self.slots[slot as usize] = Some(Entry::new(id, owner, setup));
        match res {
            // Requests may have been queued before the port was watched.
            Ok(()) => self.mark_ready(slot),
            Err(e) => self.fail(slot, e),
        }
    }

    /// Takes the ring's pending ports, left masked until its passes are
    /// done ([`Entry::late_eoi`]).
    fn port_event(&mut self, slot: u32, pending: &mut Vec<evtchn::Port>) {
        let Some(Some(entry)) = self.slots.get_mut(slot as usize) else { return };
        pending.clear();
        match entry.setup.port.handle().take_pending(pending) {
            Ok(()) => {
                for p in pending.drain(..) {
                    if !entry.eoi.contains(&p) {
                        entry.eoi.push(p);
                    }
                }
                self.mark_woken(slot)
            }
            Err(e) => self.fail(slot, DeviceError::Evtchn(e)),
        }
    }

    /// Rings served (draining ones included).
    fn rings(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Runs the timers that are due at `now`: delayed unmasks and handlers'
    /// retries.
    fn timers(&mut self, now: Tick) {
        for slot in 0..self.slots.len() as u32 {
            let Some(Some(entry)) = self.slots.get_mut(slot as usize) else { continue };
            if entry.unmask_at.is_some_and(|t| t <= now) {
                // A notify while masked is delivered now, as a port event.
                if let Err(e) = entry.unmask() {
                    self.fail(slot, e);
                    continue;
                }
            }
            if entry.retry_at.is_some_and(|t| t <= now) {
                entry.retry_at = None;
                self.mark_woken(slot);
            }
        }
    }

    /// Marks a ring woken by an event ready, ahead of the rings that are
    /// ready because their last pass left work.
    fn mark_woken(&mut self, slot: u32) {
        if let Some(Some(entry)) = self.slots.get_mut(slot as usize) {
            if !entry.queued {
                entry.queued = true;
                self.ready.push_front(slot);
            }
        }
    }

    fn mark_ready(&mut self, slot: u32) {
        if let Some(Some(entry)) = self.slots.get_mut(slot as usize) {
            if !entry.queued {
                entry.queued = true;
                self.ready.push_back(slot);
            }
        }
    }

    fn is_draining(&self, slot: u32) -> bool {
        matches!(self.slots.get(slot as usize), Some(Some(e)) if e.draining.is_some())
    }

    fn next_timer(&self) -> Option<Tick> {
        self.slots.iter().flatten().filter_map(Entry::next_timer).min()
    }

    /// Stops serving the ring's requests (its port leaves epoll; its
    /// completion fd stays) and drains it.
    fn start_drain(&mut self, slot: u32, deadline: Tick, done: Sender<Released>) {
        let Some(Some(entry)) = self.slots.get_mut(slot as usize) else { return };
        let _ = self.epoll.delete(entry.setup.port.handle().as_fd());
        entry.draining = Some((deadline, done));
        entry.queued = false;
        self.ready.retain(|s| *s != slot);
        self.drain_step(slot);
    }

    fn drain_step(&mut self, slot: u32) {
        let Some(Some(entry)) = self.slots.get_mut(slot as usize) else { return };
        let drained = catch_unwind(AssertUnwindSafe(|| entry.setup.handler.drain()));
        let done = match drained {
            Ok(d) => {
                if d.notify {
                    let _ = entry.setup.port.notify();
                }
                d.done
            }
            Err(payload) => {
                log::error!("Ring of {} panicked while draining: {}", entry.owner.key, panic_message(&*payload));
                true
            }
        };
        if done {
            if let Some(entry) = self.remove(slot, false) {
                release(entry);
            }
        }
    }

    /// Rings whose drain deadline passed: each goes to a thread of its own,
    /// which drops it once its I/O is done (the drop waits for it).
    fn drains_expired(&mut self, now: Tick) {
        let expired: Vec<u32> = (0..self.slots.len() as u32)
            .filter(
                |&s| matches!(&self.slots[s as usize], Some(e) if e.draining.as_ref().is_some_and(|(t, _)| *t <= now)),
            )
            .collect();
        for slot in expired {
            let Some(mut entry) = self.remove(slot, false) else { continue };
            let (_, tell) = entry.draining.take().expect("draining");
            let owner = entry.owner.clone();
            log::error!("Ring of {} still has I/O in flight at its drain deadline; finishing it aside", owner.key);
            let key = owner.key.clone();
            let reaper = spawn_named(
                "xenbackd-reap".to_string(),
                move |msg| log::error!("Finishing a ring of {key} aside: {msg}"),
                move || {
                    let mut entry = entry;
                    if entry.setup.handler.quiesce() {
                        let _ = entry.setup.port.notify();
                    }
                },
            );
            if let Err(e) = reaper {
                log::error!("Cannot start a thread to finish the ring aside ({e}); its resources are leaked");
            }
            let _ = tell.send(Released { owner, stuck: true });
        }
    }

    /// One pass of ring `slot`, started at `start`; returns when it ended.
    /// Untimed (`None`), its budget is not cut to fit the quantum.
    fn service(&mut self, slot: u32, start: Option<Instant>) -> Option<Instant> {
        let max = self.budget;
        let Some(Some(entry)) = self.slots.get_mut(slot as usize) else { return start };
        if entry.draining.is_some() {
            return start;
        }
        entry.queued = false;
        let budget = entry.budget.min(max);
        let res = catch_unwind(AssertUnwindSafe(|| entry.setup.handler.process(budget)));
        let res = match res {
            Ok(r) => r,
            Err(payload) => Err(DeviceError::Panic(panic_message(&*payload))),
        };
        let end = start.map(|_| Instant::now());
        if let Ok(progress) = &res {
            let spent = start.zip(end).map_or(Duration::ZERO, |(start, end)| end.duration_since(start));
            // Work left for the next pass either way: requests in the ring,
            // or completions the handler bounds per pass (its backlog).
            entry.adapt_budget(budget, spent, progress.more || progress.backlog, max);
        }
        match res.and_then(|progress| Self::after_pass(entry, progress)) {
            Ok(true) => self.mark_ready(slot),
            Ok(false) => {}
            Err(e) => self.fail(slot, e),
        }
        end
    }

    /// What follows a pass: the notify, the retry timer, the late EOI.
    /// Returns whether the ring has more to take now.
    fn after_pass(entry: &mut Entry, progress: Progress) -> Result<bool, DeviceError> {
        if progress.notify {
            entry.setup.port.notify()?;
        }
        let now = Tick::now();
        entry.worked |= !progress.idle;
        entry.retry_at = progress.retry.map(|d| now + d);
        let again = progress.more || progress.backlog;
        if !again {
            entry.late_eoi(now)?;
        }
        Ok(again)
    }

    /// Drops a ring: out of epoll first, then (optionally quiesced) dropped.
    fn remove(&mut self, slot: u32, quiesce: bool) -> Option<Entry> {
        let mut entry = self.slots.get_mut(slot as usize)?.take()?;
        let _ = self.epoll.delete(entry.setup.port.handle().as_fd());
        if let Some(fd) = entry.setup.handler.completion_fd() {
            let _ = self.epoll.delete(fd);
        }
        if quiesce {
            match catch_unwind(AssertUnwindSafe(|| entry.setup.handler.quiesce())) {
                Ok(true) => {
                    let _ = entry.setup.port.notify();
                }
                Ok(false) => {}
                Err(payload) => {
                    log::error!("Ring of {} panicked while quiescing: {}", entry.owner.key, panic_message(&*payload))
                }
            }
        }
        self.ready.retain(|s| *s != slot);
        self.free.push(slot);
        self.load.fetch_sub(1, Ordering::Relaxed);
        Some(entry)
    }

    fn fail(&mut self, slot: u32, error: DeviceError) {
        let Some(entry) = self.remove(slot, false) else { return };
        log::warn!("Ring of {} failed: {error}", entry.owner.key);
        // Dropping the ring waits for its I/O in flight (an I/O engine joins
        // its threads): on a thread of its own, not on this worker that
        // serves other guests. The failure is reported once the ring is gone,
        // unmapped, as when it was dropped here.
        let key = entry.owner.key.clone();
        let failure = Failure { owner: entry.owner.clone(), error };
        let reap = ReapFailed { entry: Some(entry), failures: self.failures.clone(), failure: Some(failure) };
        if let Err(e) = spawn_named(
            "xenbackd-reap",
            move |msg| log::error!("Dropping a failed ring of {key} panicked: {msg}"),
            move || drop(reap),
        ) {
            // The closure, and with it the ring, was dropped here.
            log::warn!("No thread to drop a failed ring ({e}); dropped on its worker");
        }
    }

    fn stop(&mut self) {
        for slot in 0..self.slots.len() as u32 {
            if let Some(entry) = self.remove(slot, true) {
                release(entry);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::BorrowedFd;
    use std::time::Duration;

    use evtchn::Port;
    use xen_ring::{BackRing, FrontRing};
    use xen_sim::host::SimHost;

    use super::*;
    use crate::device::{BoundPort, Progress, RingHandler};

    /// Echoes u64 + 1; panics on the value 666.
    struct Echo(BackRing<u64, u64>);

    impl RingHandler for Echo {
        fn process(&mut self, budget: usize) -> Result<Progress, DeviceError> {
            let mut n = 0;
            while n < budget {
                let Some(v) = self.0.next_request()? else { break };
                assert_ne!(v, 666, "poisoned request");
                self.0.push_response(&(v + 1))?;
                n += 1;
            }
            let notify = self.0.push_responses_and_check_notify()?;
            let more = n == budget || self.0.final_check_for_requests()?;
            Ok(Progress { notify, more, backlog: false, idle: n == 0, retry: None })
        }
    }

    /// A guest (dom 1) with one echo ring served by dom 0 through `pool`.
    struct Guest {
        _pages: xen_sim::host::GuestPages,
        ring: FrontRing<u64, u64>,
        evtchn: Box<dyn evtchn::EventChannel>,
        port: Port,
    }

    /// Guest `domid` (created) with a one-page echo ring and an unbound
    /// port for dom 0, not served yet; and the ring's grants.
    fn unserved_guest(host: &Arc<SimHost>, domid: u16) -> (Guest, Vec<gnttab::GrantRef>) {
        host.create_domain(domid).unwrap();
        let pages = host.grant_table(domid).alloc_pages(1).unwrap();
        let grefs = host.grant_table(domid).grant_pages(&pages, 0, false).unwrap();
        // The guest's end through a second mapping of the same grants (one
        // live map that stays; the backend's is the other).
        let front = FrontRing::new(host.grant_mapper(0).map(domid, &grefs, true).unwrap()).unwrap();
        let evtchn = host.evtchn(domid);
        let remote = evtchn.bind_unbound_port(0).unwrap();
        (Guest { _pages: pages, ring: front, evtchn, port: remote }, grefs)
    }

    /// Dom 0's end of `guest`'s ring: its port bound, its ring mapped.
    fn back_end(
        host: &Arc<SimHost>,
        domid: u16,
        grefs: &[gnttab::GrantRef],
        guest: &Guest,
    ) -> (BoundPort, BackRing<u64, u64>) {
        let port = BoundPort::bind(host.evtchn(0), domid, guest.port).unwrap();
        (port, BackRing::new(host.grant_mapper(0).map(domid, grefs, true).unwrap()).unwrap())
    }

    fn guest_with_ring(pool: &mut WorkerPool, host: &Arc<SimHost>, domid: u16) -> (Guest, Placement) {
        let (guest, grefs) = unserved_guest(host, domid);
        let (port, back) = back_end(host, domid, &grefs, &guest);
        let owner = Owner { key: DeviceKey { kind: "echo".into(), frontend: domid, devid: 0 }, generation: 1 };
        let placement = pool.add(owner, RingSetup { port, handler: Box::new(Echo(back)) });
        (guest, placement)
    }

    impl Guest {
        fn send(&mut self, values: &[u64]) {
            for v in values {
                self.ring.push_request(v).unwrap();
            }
            if self.ring.push_requests_and_check_notify().unwrap() {
                self.evtchn.notify(self.port).unwrap();
            }
        }

        fn receive(&mut self, n: usize) -> Vec<u64> {
            let mut out = Vec::new();
            let mut pending = Vec::new();
            while out.len() < n {
                self.ring.take_responses(n - out.len(), &mut out).unwrap();
                if out.len() < n && !self.ring.final_check_for_responses().unwrap() {
                    let ready = evtchn::wait_pending(&*self.evtchn, Some(Duration::from_secs(30))).unwrap();
                    assert!(ready, "no event from the backend");
                    evtchn::take_and_unmask(&*self.evtchn, &mut pending).unwrap();
                }
            }
            out
        }
    }

    /// An [`Echo`] that counts its passes.
    struct Counted(Echo, Arc<AtomicUsize>);

    impl RingHandler for Counted {
        fn process(&mut self, budget: usize) -> Result<Progress, DeviceError> {
            self.1.fetch_add(1, Ordering::Relaxed);
            self.0.process(budget)
        }
    }

    #[test]
    fn a_long_pass_that_used_its_budget_gets_a_budget_that_fits_the_quantum() {
        let host = SimHost::new();
        host.create_domain(0).unwrap();
        host.create_domain(9).unwrap();
        let guest = host.evtchn(9);
        let remote = guest.bind_unbound_port(0).unwrap();
        let port = BoundPort::bind(host.evtchn(0), 9, remote).unwrap();
        let fd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
        let handler = Box::new(SlowDrain { fd, finished: false });
        let mut e = Entry::new(0, owner_of(9), RingSetup { port, handler });

        e.adapt_budget(64, PASS_QUANTUM * 4, true, 64);
        assert_eq!(e.budget, 16);
        e.adapt_budget(16, PASS_QUANTUM * 1000, true, 64);
        assert_eq!(e.budget, 1, "never below one request");
        e.adapt_budget(1, PASS_QUANTUM * 4, false, 64);
        assert_eq!(e.budget, 1, "a pass that emptied the ring keeps its budget");
        e.adapt_budget(1, PASS_QUANTUM / 10, true, 64);
        assert_eq!(e.budget, 2);
        e.adapt_budget(48, PASS_QUANTUM / 10, true, 64);
        assert_eq!(e.budget, 64, "doubled back up to the framework's budget");
    }

    #[test]
    fn spurious_delay_grows_from_the_second_event_and_is_capped() {
        let delays: Vec<_> = (0..14).map(eoi_delay).collect();
        assert_eq!(delays[..3], [None, None, Some(Duration::from_millis(1))]);
        assert_eq!(delays[3], Some(Duration::from_millis(2)));
        assert!(delays[2..].windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(delays[13], Some(MAX_EOI_DELAY));
    }

    /// Issue 13, event storms: a guest kicking its idle ring in a loop costs
    /// its worker a pass per throttle delay, not a pass per kick, and the
    /// neighbour on the same worker is served meanwhile; once the attacker
    /// sends work it is served too.
    #[test]
    fn kicks_that_find_no_work_are_throttled_and_the_neighbour_is_served() {
        let host = SimHost::new();
        host.create_domain(0).unwrap();
        let (failures, _failed) = crossbeam_channel::unbounded();
        let mut pool = WorkerPool::new(1, 64, failures).unwrap();
        let (mut neighbour, _) = guest_with_ring(&mut pool, &host, 1);
        let (mut attacker, grefs) = unserved_guest(&host, 2);
        let (port, back) = back_end(&host, 2, &grefs, &attacker);
        let passes = Arc::new(AtomicUsize::new(0));
        let owner = Owner { key: DeviceKey { kind: "echo".into(), frontend: 2, devid: 0 }, generation: 1 };
        pool.add(owner, RingSetup { port, handler: Box::new(Counted(Echo(back), passes.clone())) });
        attacker.send(&[1]);
        assert_eq!(attacker.receive(1), vec![2]);
        let before = passes.load(Ordering::Relaxed);

        const KICKS: usize = 20_000;
        for i in 0..KICKS {
            attacker.evtchn.notify(attacker.port).unwrap();
            if i % 1000 == 0 {
                neighbour.send(&[i as u64]);
                assert_eq!(neighbour.receive(1), vec![i as u64 + 1]);
            }
        }
        let storm = passes.load(Ordering::Relaxed) - before;
        // Past the ramp (1 + 2 + ... + 512 ms, 11 passes), one pass a second.
        assert!(storm <= 24, "{storm} passes for {KICKS} kicks that found no work");
        attacker.send(&[41]);
        assert_eq!(attacker.receive(1), vec![42]);
    }

    /// A ring that always has more and spends `PASS_QUANTUM * 3` per pass;
    /// counts its passes when they end.
    struct Busy(Arc<AtomicUsize>);

    impl RingHandler for Busy {
        fn process(&mut self, _budget: usize) -> Result<Progress, DeviceError> {
            let start = Instant::now();
            while start.elapsed() < PASS_QUANTUM * 3 {
                std::hint::spin_loop();
            }
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(Progress { notify: false, more: true, backlog: false, idle: false, retry: None })
        }
    }

    /// An [`Echo`] that notes the busy rings' passes when it takes a request.
    struct Probe(Echo, Arc<AtomicUsize>, Arc<AtomicUsize>);

    impl RingHandler for Probe {
        fn process(&mut self, budget: usize) -> Result<Progress, DeviceError> {
            self.2.store(self.1.load(Ordering::Relaxed), Ordering::Relaxed);
            self.0.process(budget)
        }
    }

    #[test]
    fn a_woken_ring_waits_for_one_busy_pass_not_for_every_busy_ring() {
        let host = SimHost::new();
        host.create_domain(0).unwrap();
        let (failures, _failed) = crossbeam_channel::unbounded();
        let mut pool = WorkerPool::new(1, 64, failures).unwrap();
        let busy_passes = Arc::new(AtomicUsize::new(0));
        let mut busy_guests = Vec::new();
        for domid in 2..8 {
            let (guest, grefs) = unserved_guest(&host, domid);
            let (port, _back) = back_end(&host, domid, &grefs, &guest);
            let owner = Owner { key: DeviceKey { kind: "busy".into(), frontend: domid, devid: 0 }, generation: 1 };
            pool.add(owner, RingSetup { port, handler: Box::new(Busy(busy_passes.clone())) });
            busy_guests.push(guest);
        }
        let (mut neighbour, grefs) = unserved_guest(&host, 1);
        let (port, back) = back_end(&host, 1, &grefs, &neighbour);
        let seen = Arc::new(AtomicUsize::new(0));
        let owner = Owner { key: DeviceKey { kind: "echo".into(), frontend: 1, devid: 0 }, generation: 1 };
        pool.add(owner, RingSetup { port, handler: Box::new(Probe(Echo(back), busy_passes.clone(), seen.clone())) });
        neighbour.send(&[0]);
        assert_eq!(neighbour.receive(1), vec![1]);

        let mut worst = 0;
        for i in 1..=10u64 {
            std::thread::sleep(PASS_QUANTUM * 7);
            neighbour.send(&[i]);
            // The event is queued for the worker once notify returns.
            let sent = busy_passes.load(Ordering::Relaxed);
            assert_eq!(neighbour.receive(1), vec![i + 1]);
            worst = worst.max(seen.load(Ordering::Relaxed).saturating_sub(sent));
        }
        // The pass under way when the event came, and one more if it came
        // just after the worker polled. Serving every ready ring before
        // polling again made it wait for up to all six.
        assert!(worst <= 2, "the woken ring waited for {worst} busy passes");
    }

    #[test]
    fn worker_serves_ring_across_many_budgeted_passes() {
        let host = SimHost::new();
        host.create_domain(0).unwrap();
        let (failures, _failed) = crossbeam_channel::unbounded();
        let mut pool = WorkerPool::new(1, 4, failures).unwrap();
        let (mut guest, _) = guest_with_ring(&mut pool, &host, 1);

        let values: Vec<u64> = (0..200).collect();
        guest.send(&values);
        let got = guest.receive(values.len());

        assert_eq!(got, values.iter().map(|v| v + 1).collect::<Vec<_>>());
    }

    #[test]
    fn panicking_handler_fails_its_device_and_spares_the_other_ring() {
        let host = SimHost::new();
        host.create_domain(0).unwrap();
        let (failures, failed) = crossbeam_channel::unbounded();
        let mut pool = WorkerPool::new(1, 64, failures).unwrap();
        let (mut good, _) = guest_with_ring(&mut pool, &host, 1);
        let (mut bad, _) = guest_with_ring(&mut pool, &host, 2);

        bad.send(&[666]);
        let failure = failed.recv_timeout(Duration::from_secs(30)).unwrap();
        good.send(&[1, 2, 3]);

        assert_eq!(failure.owner.key.frontend, 2);
        assert!(matches!(failure.error, DeviceError::Panic(ref m) if m.contains("poisoned")), "{:?}", failure.error);
        assert_eq!(good.receive(3), vec![2, 3, 4]);
        assert_eq!(host.grant_table(2).live_maps().unwrap(), 1);
    }

    #[test]
    fn runaway_indices_fail_the_ring() {
        let host = SimHost::new();
        host.create_domain(0).unwrap();
        let (failures, failed) = crossbeam_channel::unbounded();
        let mut pool = WorkerPool::new(2, 64, failures).unwrap();
        let (bad, _) = guest_with_ring(&mut pool, &host, 3);

        bad.ring.mapping().store_u32(0, 100_000, std::sync::atomic::Ordering::Release).unwrap();
        bad.evtchn.notify(bad.port).unwrap();
        let failure = failed.recv_timeout(Duration::from_secs(30)).unwrap();

        assert!(matches!(failure.error, DeviceError::SharedRing(_)), "{:?}", failure.error);
    }

    #[test]
    fn removed_ring_is_unmapped_before_remove_returns() {
        let host = SimHost::new();
        host.create_domain(0).unwrap();
        let (failures, _failed) = crossbeam_channel::unbounded();
        let mut pool = WorkerPool::new(2, 64, failures).unwrap();
        let (mut guest, placement) = guest_with_ring(&mut pool, &host, 4);
        guest.send(&[10]);
        assert_eq!(guest.receive(1), vec![11]);

        let (tx, released) = crossbeam_channel::unbounded();
        assert!(pool.remove(placement, owner_of(4), Duration::from_secs(30), tx));
        let r = released.recv_timeout(Duration::from_secs(30)).unwrap();

        assert!(!r.stuck);
        // Only the guest's own end is left mapped.
        assert_eq!(host.grant_table(4).live_maps().unwrap(), 1);
    }

    #[test]
    fn tokens_round_trip_and_unknown_values_are_rejected() {
        for t in [Token::Wake, Token::Port(0), Token::Port(u32::MAX), Token::Completion(7)] {
            assert_eq!(Token::from_u64(t.to_u64()), Some(t));
        }
        assert_eq!(Token::from_u64(3 << 32), None);
        assert_eq!(Token::from_u64(5), None);
    }

    /// Reports what its completion eventfd carried, and being quiesced.
    struct Completions {
        fd: EventFd,
        seen: Sender<&'static str>,
    }

    impl RingHandler for Completions {
        fn process(&mut self, _budget: usize) -> Result<Progress, DeviceError> {
            if self.fd.read().is_ok() {
                self.seen.send("completion").unwrap();
            }
            Ok(Progress::default())
        }

        fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
            Some(self.fd.as_fd())
        }

        fn quiesce(&mut self) -> bool {
            self.seen.send("quiesce").unwrap();
            false
        }
    }

    #[test]
    fn completion_fd_wakes_the_handler_and_removal_quiesces_it() {
        let host = SimHost::new();
        host.create_domain(0).unwrap();
        host.create_domain(5).unwrap();
        let (failures, _failed) = crossbeam_channel::unbounded();
        let mut pool = WorkerPool::new(1, 64, failures).unwrap();
        let guest = host.evtchn(5);
        let remote = guest.bind_unbound_port(0).unwrap();
        let port = BoundPort::bind(host.evtchn(0), 5, remote).unwrap();
        let fd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
        let completion = fd.as_fd().try_clone_to_owned().unwrap();
        let (seen, events) = crossbeam_channel::unbounded();
        let owner = Owner { key: DeviceKey { kind: "t".into(), frontend: 5, devid: 0 }, generation: 1 };
        let placement = pool.add(owner, RingSetup { port, handler: Box::new(Completions { fd, seen }) });

        nix::unistd::write(&completion, &1u64.to_ne_bytes()).unwrap();
        let first = events.recv_timeout(Duration::from_secs(30)).unwrap();
        let (tx, released) = crossbeam_channel::unbounded();
        pool.remove(placement, owner_of(5), Duration::from_secs(30), tx);
        released.recv_timeout(Duration::from_secs(30)).unwrap();
        let second = events.try_recv().unwrap();

        assert_eq!((first, second), ("completion", "quiesce"));
    }

    fn owner_of(domid: u16) -> Owner {
        Owner { key: DeviceKey { kind: "t".into(), frontend: domid, devid: 0 }, generation: 1 }
    }

    /// Drains only once its completion fd was written (an I/O that takes
    /// as long as the test wants), or never.
    struct SlowDrain {
        fd: EventFd,
        finished: bool,
    }

    impl RingHandler for SlowDrain {
        fn process(&mut self, _budget: usize) -> Result<Progress, DeviceError> {
            Ok(Progress::default())
        }

        fn completion_fd(&self) -> Option<BorrowedFd<'_>> {
            Some(self.fd.as_fd())
        }

        fn drain(&mut self) -> crate::device::Drained {
            self.finished |= self.fd.read().is_ok();
            crate::device::Drained { notify: false, done: self.finished }
        }

        fn quiesce(&mut self) -> bool {
            false
        }
    }

    /// The ring's placement, the fd that finishes its I/O, and the guest's
    /// event-channel handle (its port lives as long as the handle).
    fn slow_ring(
        pool: &mut WorkerPool,
        host: &Arc<SimHost>,
        domid: u16,
    ) -> (Placement, std::os::fd::OwnedFd, Box<dyn evtchn::EventChannel>) {
        host.create_domain(domid).unwrap();
        let guest = host.evtchn(domid);
        let remote = guest.bind_unbound_port(0).unwrap();
        let port = BoundPort::bind(host.evtchn(0), domid, remote).unwrap();
        let fd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
        let finish = fd.as_fd().try_clone_to_owned().unwrap();
        let owner = Owner { key: DeviceKey { kind: "t".into(), frontend: domid, devid: 0 }, generation: 1 };
        (pool.add(owner, RingSetup { port, handler: Box::new(SlowDrain { fd, finished: false }) }), finish, guest)
    }

    /// Issue 13: a ring draining slow I/O blocks neither the remover nor
    /// the other rings of its worker.
    #[test]
    fn a_draining_ring_does_not_block_its_worker_or_the_remover() {
        let host = SimHost::new();
        host.create_domain(0).unwrap();
        let (failures, _failed) = crossbeam_channel::unbounded();
        let mut pool = WorkerPool::new(1, 64, failures).unwrap();
        let (mut neighbour, _) = guest_with_ring(&mut pool, &host, 1);
        let (slow, finish, _guest) = slow_ring(&mut pool, &host, 2);

        let (tx, released) = crossbeam_channel::unbounded();
        assert!(pool.remove(slow, owner_of(2), Duration::from_secs(60), tx));
        // The remover returned at once; the worker serves the neighbour.
        neighbour.send(&[1, 2, 3]);
        assert_eq!(neighbour.receive(3), vec![2, 3, 4]);
        assert!(released.try_recv().is_err(), "released before its I/O finished");

        nix::unistd::write(&finish, &1u64.to_ne_bytes()).unwrap();
        let r = released.recv_timeout(Duration::from_secs(30)).unwrap();
        assert!(!r.stuck);
        assert_eq!(r.owner.key.frontend, 2);
        neighbour.send(&[7]);
        assert_eq!(neighbour.receive(1), vec![8]);
    }

    /// A ring whose I/O outlives the drain deadline is reported stuck and
    /// finished aside; its worker goes on serving.
    #[test]
    fn a_ring_stuck_past_its_deadline_is_reported_and_its_worker_goes_on() {
        let host = SimHost::new();
        host.create_domain(0).unwrap();
        let (failures, _failed) = crossbeam_channel::unbounded();
        let mut pool = WorkerPool::new(1, 64, failures).unwrap();
        let (mut neighbour, _) = guest_with_ring(&mut pool, &host, 1);
        let (slow, _finish, _guest) = slow_ring(&mut pool, &host, 3);

        let (tx, released) = crossbeam_channel::unbounded();
        assert!(pool.remove(slow, owner_of(3), Duration::from_millis(100), tx));
        let r = released.recv_timeout(Duration::from_secs(30)).unwrap();

        assert!(r.stuck);
        neighbour.send(&[41]);
        assert_eq!(neighbour.receive(1), vec![42]);
    }

    /// A predecessor that published responses and died before notifying
    /// them: the frontend gets an event as soon as the ring is served again
    /// (Linux's blkfront reads responses only on an event; the lab's
    /// killresume hung on this).
    #[test]
    fn a_ring_added_to_a_worker_notifies_the_frontend_once() {
        let host = SimHost::new();
        host.create_domain(0).unwrap();
        let (mut guest, grefs) = unserved_guest(&host, 3);
        guest.ring.push_request(&1).unwrap();
        guest.ring.push_request(&2).unwrap();
        guest.ring.push_requests_and_check_notify().unwrap();
        let mut previous = BackRing::<u64, u64>::new(host.grant_mapper(0).map(3, &grefs, true).unwrap()).unwrap();
        while let Some(v) = previous.next_request().unwrap() {
            previous.push_response(&(v + 1)).unwrap();
        }
        assert!(previous.push_responses_and_check_notify().unwrap(), "the notify the crash lost");
        drop(previous);

        let (failures, _failed) = crossbeam_channel::unbounded();
        let mut pool = WorkerPool::new(1, 64, failures).unwrap();
        let back = BackRing::resume(host.grant_mapper(0).map(3, &grefs, true).unwrap(), None).unwrap();
        let port = BoundPort::bind(host.evtchn(0), 3, guest.port).unwrap();
        pool.add(owner_of(3), RingSetup { port, handler: Box::new(Echo(back)) });
        let ready = evtchn::wait_pending(&*guest.evtchn, Some(Duration::from_secs(30))).unwrap();
        assert!(ready, "no event for the published responses");
        let mut got = Vec::new();
        guest.ring.take_responses(2, &mut got).unwrap();
        assert_eq!(got, vec![2, 3]);
    }

    /// An [`Echo`] whose drop waits until `release` says so (an I/O engine
    /// joining threads stuck on a slow disk).
    struct SlowToDrop(Echo, crossbeam_channel::Receiver<()>, crossbeam_channel::Sender<()>);

    impl RingHandler for SlowToDrop {
        fn process(&mut self, budget: usize) -> Result<Progress, DeviceError> {
            self.0.process(budget)
        }
    }

    impl Drop for SlowToDrop {
        fn drop(&mut self) {
            let _ = self.2.send(());
            let _ = self.1.recv_timeout(Duration::from_secs(60));
        }
    }

    /// Issue 13: a failed ring is dropped off its worker. Its drop may wait
    /// for I/O (ThreadPoolEngine joins its threads: 3-228 ms measured) and
    /// the neighbour on the same worker is served meanwhile; the failure is
    /// reported once the ring is gone and unmapped.
    #[test]
    fn a_failed_ring_slow_to_drop_does_not_stall_its_worker() {
        let host = SimHost::new();
        host.create_domain(0).unwrap();
        let (failures, failed) = crossbeam_channel::unbounded();
        let mut pool = WorkerPool::new(1, 64, failures).unwrap();
        let (mut neighbour, _) = guest_with_ring(&mut pool, &host, 1);
        let (mut bad, grefs) = unserved_guest(&host, 2);
        let (port, back) = back_end(&host, 2, &grefs, &bad);
        let (release, released) = crossbeam_channel::bounded(1);
        let (dropping, drop_started) = crossbeam_channel::bounded(1);
        pool.add(owner_of(2), RingSetup { port, handler: Box::new(SlowToDrop(Echo(back), released, dropping)) });

        bad.ring.push_request(&666).unwrap();
        bad.ring.push_requests_and_check_notify().unwrap();
        bad.evtchn.notify(bad.port).unwrap();
        // The poisoned ring fails; while its drop waits, its worker goes on.
        drop_started.recv_timeout(Duration::from_secs(30)).expect("the poisoned ring failed");
        neighbour.send(&[7]);
        assert_eq!(neighbour.receive(1), vec![8]);
        assert!(failed.try_recv().is_err(), "reported before the ring was gone");
        release.send(()).unwrap();
        let failure = failed.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(failure.owner.key.frontend, 2);
        assert_eq!(host.grant_table(2).live_maps().unwrap(), 1, "the failed ring is unmapped when reported");
    }
}
