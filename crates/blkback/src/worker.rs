//! A thread serving one [`RingQueue`] outside the backend framework (tools,
//! benchmarks): epoll on the queue's event-channel handle, its storage
//! completions and a stop event. Named, with panics
//! caught (the queue stops, the process does not), stopped and joined on drop.

use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use evtchn::{EventChannel, Port};

use crate::connection::{QueueError, RingQueue};

/// What woke the worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    Event = 1,
    Completion = 2,
    Stop = 3,
}

impl Token {
    fn from_u64(v: u64) -> Option<Token> {
        [Token::Event, Token::Completion, Token::Stop].into_iter().find(|t| *t as u64 == v)
    }
}

/// Errors of starting a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Creating the epoll or stop event failed, or the thread did not start.
    #[error("Cannot start the queue worker")]
    Start(#[source] std::io::Error),
}

/// A running queue worker.
pub struct QueueWorker {
    stop: Arc<EventFd>,
    failed: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn add(epoll: &Epoll, fd: RawFd, token: Token) -> std::io::Result<()> {
    // SAFETY: the fd belongs to the queue (or the stop event), which the
    // worker thread owns for as long as the epoll exists.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    epoll.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token as u64)).map_err(std::io::Error::from)
}

impl QueueWorker {
    /// Starts a thread named `name` serving `queue`, whose frontend is
    /// signalled through `port` bound on `evtchn` (the worker unbinds it when
    /// it stops).
    pub fn spawn(
        name: String,
        queue: RingQueue,
        evtchn: Box<dyn EventChannel>,
        port: Port,
    ) -> Result<QueueWorker, WorkerError> {
        let start = |e: nix::Error| WorkerError::Start(e.into());
        let stop = Arc::new(EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).map_err(start)?);
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(start)?;
        add(&epoll, evtchn.as_raw_fd(), Token::Event).map_err(WorkerError::Start)?;
        add(&epoll, queue.completion_fd(), Token::Completion).map_err(WorkerError::Start)?;
        {
            use std::os::fd::AsRawFd;
            add(&epoll, stop.as_fd().as_raw_fd(), Token::Stop).map_err(WorkerError::Start)?;
        }
        let failed = Arc::new(AtomicBool::new(false));
        let (thread_failed, thread_name) = (failed.clone(), name.clone());
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let r = serve(epoll, queue, &*evtchn, port);
                    if let Err(e) = evtchn.unbind(port) {
                        log::debug!("unbind of port {port}: {e}");
                    }
                    r
                }));
                let ok = match result {
                    Ok(Ok(())) => true,
                    Ok(Err(e)) => {
                        log::error!("{thread_name}: {e}");
                        false
                    }
                    Err(_) => {
                        log::error!("{thread_name}: worker panicked; queue stopped");
                        false
                    }
                };
                thread_failed.store(!ok, Ordering::Release);
            })
            .map_err(WorkerError::Start)?;
        Ok(QueueWorker { stop, failed, thread: Some(thread) })
    }

    /// Whether the worker stopped on an error or panic.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Whether the thread is gone.
    pub fn is_finished(&self) -> bool {
        match &self.thread {
            Some(t) => t.is_finished(),
            None => true,
        }
    }
}

/// Serves every queue of a frontend configured by `cfg` on workers of its
/// own, binding each queue's event channel on a new handle from `open_evtchn`.
pub fn spawn_workers(
    name: &str,
    frontend: gnttab::DomId,
    cfg: &crate::config::FrontendConfig,
    queues: Vec<RingQueue>,
    open_evtchn: &dyn Fn() -> evtchn::Result<Box<dyn EventChannel>>,
) -> Result<Vec<QueueWorker>, QueueError> {
    let mut workers = Vec::with_capacity(queues.len());
    for (q, qcfg) in queues.into_iter().zip(&cfg.queues) {
        let index = q.index();
        let bind = |source| QueueError::Bind { queue: index, port: qcfg.event_channel, source };
        let evtchn = open_evtchn().map_err(bind)?;
        let port = evtchn.bind_interdomain(frontend, qcfg.event_channel).map_err(bind)?;
        let worker =
            QueueWorker::spawn(format!("{name}-q{index}"), q, evtchn, port).map_err(|WorkerError::Start(source)| {
                QueueError::Bind {
                    queue: index,
                    port: qcfg.event_channel,
                    source: evtchn::Error::Op { op: "spawn worker", source },
                }
            })?;
        workers.push(worker);
    }
    Ok(workers)
}

impl Drop for QueueWorker {
    fn drop(&mut self) {
        if let Err(e) = self.stop.write(1) {
            log::warn!("cannot stop queue worker: {e}");
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(epoll: Epoll, mut queue: RingQueue, evtchn: &dyn EventChannel, port: Port) -> Result<(), QueueError> {
    let mut events = [EpollEvent::empty(); 4];
    let mut ports = Vec::new();
    let pass = |queue: &mut RingQueue| -> Result<(), QueueError> {
        loop {
            let p = queue.process(64)?;
            if p.notify {
                evtchn.notify(port).map_err(|source| QueueError::Notify { queue: queue.index(), source })?;
            }
            if !p.more {
                return Ok(());
            }
        }
    };
    // Requests posted before the port was bound raised no event.
    pass(&mut queue)?;
    loop {
        let n = match epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(n) => n,
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                log::error!("epoll_wait failed: {e}");
                return Ok(());
            }
        };
        for ev in &events[..n] {
            match Token::from_u64(ev.data()) {
                Some(Token::Stop) => {
                    if queue.quiesce()? {
                        evtchn.notify(port).map_err(|source| QueueError::Notify { queue: queue.index(), source })?;
                    }
                    return Ok(());
                }
                Some(Token::Event) => {
                    ports.clear();
                    if let Err(e) = evtchn.take_pending(&mut ports) {
                        log::warn!("reading event channel: {e}");
                    }
                    for p in &ports {
                        if let Err(e) = evtchn.unmask(*p) {
                            log::warn!("unmask of port {p} failed: {e}");
                        }
                    }
                }
                // Drained by the executor's poll in `process`.
                Some(Token::Completion) | None => {}
            }
        }
        pass(&mut queue)?;
    }
}
