//! The device-model mode: `xenbackd` started by libxl in place of QEMU for
//! one PV (or PVH) guest, with QEMU's command line (see [`crate::dm_args`]).
//! It serves that guest's `backend/qdisk` and `backend/console` devices
//! (its disks, and its channels on the `-chardev`s libxl passes) and no
//! other domain's,
//! writes `device-model/<domid>/state = running` (what libxl waits for),
//! answers libxl's QMP on the sockets named by `-chardev`/`-mon` (see
//! [`crate::qmp`]), and exits on SIGHUP (libxl's destroy), SIGTERM, SIGINT
//! or QMP `quit`, closing the guest's devices. One process per guest, as
//! with QEMU: a fault stays with its guest. Its control socket, for
//! `xenbackd status` and `metrics`, is `/run/xenbackd/dm-<domid>.sock`.
//! See `docs/device-model.md`.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use blkback::{BlkDeviceType, BlkOptions};
use consback::{ChardevLookup, Connection, ConsoleDeviceType, ConsoleOptions, TtyPublished};
use crossbeam_channel::{Receiver, Sender};
use nix::sys::signal::{SigSet, Signal};
use xen_backend::{Backend, Config, DeviceType, Frontends};
use xs_wire::{Client, TxId};

use crate::platform::lazy_xen_platform;
use xenbackd::control::ControlServer;
use xenbackd::dm_args::{ChannelChardev, DmConfig, QmpChardev, QmpSocket};
use xenbackd::qmp::{self, ChardevInfo, Decoder, Effect, RunState, Session, VmState};

/// What the main thread waits for.
enum Event {
    Signal(Signal),
    Qmp(Effect),
    /// xenstored released the guest (it died without libxl telling us).
    DomainGone,
    /// The backend stopped on its own (xenstore unreachable for good).
    BackendStopped,
}

/// Runs the device model; `args` are the arguments after the program name.
pub fn run(args: Vec<String>) -> Result<u8> {
    let cfg = match DmConfig::parse(&args) {
        Ok(c) => c,
        Err(e) => {
            log::error!("{e}");
            eprintln!("xenbackd (device model): {e}");
            return Ok(1);
        }
    };
    log::info!(
        "device model for domain {} ({}), xenbackd {}",
        cfg.domid,
        cfg.name.as_deref().unwrap_or("no name"),
        env!("CARGO_PKG_VERSION")
    );
    for i in &cfg.ignored {
        log::info!("ignoring QEMU option {i}");
    }
    for u in &cfg.unsupported {
        log::warn!("not provided by xenbackd (ignored): {u}");
    }
    if let Some(i) = &cfg.incoming {
        log::warn!("-incoming {i}: a PV device model has no device state to load");
    }
    let daemon = if cfg.daemonize { Some(daemonize()?) } else { None };

    // Block the stop signals before any thread starts, so every thread
    // inherits the mask and only the signal thread receives them.
    let mut stop = SigSet::empty();
    for s in [Signal::SIGHUP, Signal::SIGTERM, Signal::SIGINT] {
        stop.add(s);
    }
    stop.thread_block().context("blocking SIGHUP/SIGTERM/SIGINT")?;

    // The QMP sockets first: under dm_restrict libxl is already waiting on
    // the one it passed.
    let listeners: Vec<(QmpChardev, UnixListener)> =
        cfg.qmp.iter().map(|c| Ok((c.clone(), listen(&c.socket)?))).collect::<Result<_>>()?;
    let bound: Vec<String> = cfg
        .qmp
        .iter()
        .filter_map(|c| match &c.socket {
            QmpSocket::Path(p) => Some(p.clone()),
            QmpSocket::Fd(_) => None,
        })
        .collect();

    let xs = Client::connect().context("connecting to xenstore")?;
    let platform = lazy_xen_platform(xs.clone()).context("setting up the Xen platform")?;
    let self_domid = platform.domid();
    let state_path = format!("/local/domain/{self_domid}/device-model/{}/state", cfg.domid);

    let run = match (cfg.prelaunch, cfg.incoming.is_some()) {
        (false, _) => RunState::Running,
        (true, false) => RunState::Prelaunch,
        (true, true) => RunState::Paused,
    };
    let vm = Arc::new(Mutex::new(VmState {
        run,
        name: cfg.name.clone(),
        chardevs: cfg.qmp.iter().map(chardev_info).chain(cfg.channels.iter().filter_map(channel_info)).collect(),
        package: format!("xenbackd {}", env!("CARGO_PKG_VERSION")),
    }));

    let device_types: Vec<Arc<dyn DeviceType>> = vec![
        BlkDeviceType::new("qdisk", BlkOptions::default()),
        ConsoleDeviceType::new("console", console_options(&cfg.channels, vm.clone())),
    ];
    let config = Config {
        frontends: Frontends::Only(cfg.domid),
        journal_dir: Some(crate::JOURNAL_DIR.into()),
        ..Config::default()
    };
    let mut backend = Backend::start(platform, device_types, config).context("starting the backend")?;
    log::info!("serving backend/{{qdisk,console}}/{} of dom{self_domid}", cfg.domid);
    for c in &cfg.channels {
        log::info!("channel chardev {}: {}", c.id, c.connection);
    }
    // `xenbackd status --control-socket /run/xenbackd/dm-<domid>.sock`;
    // without it (another process holds it, no /run) the guest is served all the same.
    let control_path = std::path::PathBuf::from(format!("{}/dm-{}.sock", crate::RUN_DIR, cfg.domid));
    let _control = ControlServer::start(&control_path, backend.monitor())
        .map_err(|e| log::warn!("control socket {}: {e}; no status for this guest", control_path.display()))
        .ok();

    let (tx, rx) = crossbeam_channel::unbounded();
    for (chardev, listener) in listeners {
        spawn_qmp(chardev, listener, vm.clone(), tx.clone())?;
    }
    spawn_domain_watch(cfg.domid, tx.clone())?;
    let done = backend.done();
    let backend_tx = tx.clone();
    std::thread::Builder::new()
        .name("xenbackd-done".into())
        .spawn(move || {
            let _ = done.recv();
            let _ = backend_tx.send(Event::BackendStopped);
        })
        .context("starting a thread")?;
    spawn_signals(stop, tx)?;

    if run == RunState::Running {
        write_state(&xs, &state_path)?;
    }
    if let Some(pidfile) = &cfg.pidfile {
        std::fs::write(pidfile, format!("{}\n", std::process::id())).with_context(|| format!("writing {pidfile}"))?;
    }
    if let Some(d) = daemon {
        d.ready()?;
    }

    let why = wait(&rx, &xs, &state_path);
    match &why {
        Some(why) => {
            log::info!("{why}: closing the devices of domain {}", cfg.domid);
            backend.shutdown();
        }
        // Its devices stay as they are: a new device model resumes them.
        None => backend.detach(),
    }
    for p in &bound {
        let _ = std::fs::remove_file(p);
    }
    if let Some(pidfile) = &cfg.pidfile {
        let _ = std::fs::remove_file(pidfile);
    }
    if why.is_none() {
        anyhow::bail!("the backend stopped: xenstore unreachable for {:?}", xen_backend::DEFAULT_XENSTORE_TIMEOUT);
    }
    log::info!("device model for domain {} stopped", cfg.domid);
    Ok(0)
}

/// Waits for the end; `Started` effects write the state node on the way.
/// `None`: the backend stopped on its own.
fn wait(rx: &Receiver<Event>, xs: &Client, state_path: &str) -> Option<String> {
    Some(loop {
        match rx.recv() {
            Ok(Event::Signal(sig)) => break format!("{sig:?}"),
            Ok(Event::Qmp(Effect::Quit)) => break "QMP quit".into(),
            Ok(Event::Qmp(Effect::Started)) => {
                if let Err(e) = write_state(xs, state_path) {
                    log::error!("{e:#}");
                }
            }
            Ok(Event::Qmp(Effect::None)) => {}
            Ok(Event::DomainGone) => break "the domain is gone".into(),
            Ok(Event::BackendStopped) => return None,
            Err(_) => break "no event source left".into(),
        }
    })
}

fn write_state(xs: &Client, path: &str) -> Result<()> {
    xs.write(TxId::NONE, path, b"running").with_context(|| format!("writing {path}"))?;
    log::info!("{path} = running");
    Ok(())
}

fn chardev_info(c: &QmpChardev) -> ChardevInfo {
    let filename = match &c.socket {
        QmpSocket::Path(p) => format!("unix:{p},server=on"),
        QmpSocket::Fd(fd) => format!("fd:{fd}"),
    };
    ChardevInfo { label: c.id.clone(), filename }
}

/// A channel socket as QEMU's `query-chardev` lists it; a pty is listed
/// once its console publishes the name ([`console_options`]).
fn channel_info(c: &ChannelChardev) -> Option<ChardevInfo> {
    match &c.connection {
        Connection::Socket(p) => {
            Some(ChardevInfo { label: c.id.clone(), filename: format!("unix:{},server=on", p.display()) })
        }
        Connection::Pty => None,
    }
}

/// The guest's consoles: `output = chardev:ID` names a `-chardev` of the
/// command line; a pty's name, once written to its `tty` node, is also
/// listed by `query-chardev` as `pty:/dev/pts/N` under `libxl-channel<devid>`.
fn console_options(channels: &[ChannelChardev], vm: Arc<Mutex<VmState>>) -> ConsoleOptions {
    let table = channels.to_vec();
    let chardevs: ChardevLookup = Arc::new(move |id| table.iter().find(|c| c.id == id).map(|c| c.connection.clone()));
    let published: TtyPublished = Arc::new(move |devid, tty| {
        let label = format!("libxl-channel{devid}");
        let info = ChardevInfo { label: label.clone(), filename: format!("pty:{tty}") };
        let mut vm = vm.lock().unwrap_or_else(|p| p.into_inner());
        vm.chardevs.retain(|c| c.label != label);
        vm.chardevs.push(info);
    });
    ConsoleOptions { chardevs, tty_published: Some(published), ..ConsoleOptions::default() }
}

/// The listening socket of a QMP chardev.
fn listen(socket: &QmpSocket) -> Result<UnixListener> {
    match socket {
        QmpSocket::Path(path) => {
            // QEMU replaces a stale socket file, as libxl does before binding.
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing the old {path}")),
            }
            UnixListener::bind(path).with_context(|| format!("listening on {path}"))
        }
        QmpSocket::Fd(fd) => listener_from_fd(*fd),
    }
}

/// Takes a listening unix socket passed by number, after checking that it
/// is one (a wrong number must not become someone else's file).
fn listener_from_fd(fd: RawFd) -> Result<UnixListener> {
    use nix::sys::socket::{getsockname, getsockopt, sockopt, AddressFamily, SockaddrLike, UnixAddr};
    use nix::sys::stat::{fstat, SFlag};
    let st = fstat(fd).with_context(|| format!("QMP socket fd={fd} is not open"))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        bail!("fd={fd} is not a socket");
    }
    // SAFETY: `fd` is open (fstat succeeded) and was handed to this process
    // for the QMP socket; we become its only owner.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr: UnixAddr = getsockname(fd).with_context(|| format!("fd={fd}: getsockname"))?;
    if addr.family() != Some(AddressFamily::Unix) {
        bail!("fd={fd} is not a unix socket");
    }
    if !getsockopt(&owned, sockopt::AcceptConn).with_context(|| format!("fd={fd}: SO_ACCEPTCONN"))? {
        bail!("fd={fd} is a socket that does not listen");
    }
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))
        .with_context(|| format!("fd={fd}: FD_CLOEXEC"))?;
    Ok(UnixListener::from(owned))
}

/// Exits when xenstored releases the guest, so that a device model whose
/// toolstack died (no SIGHUP will come) does not keep the guest's disks open.
/// On its own xenstore connection (the backend's watch events are its own).
/// Only for a guest xenstored knows (`XS_IS_DOMAIN_INTRODUCED`), as every
/// guest libxl creates is.
fn spawn_domain_watch(domid: evtchn::DomId, tx: Sender<Event>) -> Result<()> {
    let xs = Client::connect().context("connecting to xenstore for @releaseDomain")?;
    match xs.is_domain_introduced(domid.into()) {
        Ok(true) => {}
        Ok(false) => {
            log::info!("domain {domid} is not introduced to xenstored; not watching @releaseDomain");
            return Ok(());
        }
        Err(e) => {
            // An unprivileged connection (a driver domain's) may not ask.
            log::info!("XS_IS_DOMAIN_INTRODUCED {domid}: {e}; not watching @releaseDomain");
            return Ok(());
        }
    }
    let events = xs.events();
    xs.watch("@releaseDomain", "dm-release").context("watching @releaseDomain")?;
    std::thread::Builder::new()
        .name("xenbackd-release".into())
        .spawn(move || {
            for _ in events.iter() {
                match xs.is_domain_introduced(domid.into()) {
                    Ok(true) => {}
                    Ok(false) => {
                        let _ = tx.send(Event::DomainGone);
                        return;
                    }
                    Err(e) => log::warn!("XS_IS_DOMAIN_INTRODUCED {domid}: {e}"),
                }
            }
        })
        .context("starting the @releaseDomain thread")?;
    Ok(())
}

fn spawn_signals(set: SigSet, tx: Sender<Event>) -> Result<()> {
    std::thread::Builder::new()
        .name("xenbackd-signals".into())
        .spawn(move || loop {
            match set.wait() {
                Ok(sig) => {
                    if tx.send(Event::Signal(sig)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    log::error!("waiting for signals: {e}");
                    return;
                }
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

fn spawn_qmp(chardev: QmpChardev, listener: UnixListener, vm: Arc<Mutex<VmState>>, tx: Sender<Event>) -> Result<()> {
    std::thread::Builder::new()
        .name(format!("xenbackd-qmp-{}", chardev.id))
        .spawn(move || {
            // One client at a time, as a QEMU chardev serves them.
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        if let Err(e) = serve_client(stream, &vm, &tx) {
                            log::info!("QMP {}: connection ended: {e}", chardev.id);
                        }
                    }
                    Err(e) => {
                        log::error!("QMP {}: accept: {e}", chardev.id);
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
            }
        })
        .context("starting a QMP thread")?;
    Ok(())
}

/// Commands already logged as not found, so a client polling one does not
/// fill the log.
static NOT_FOUND_LOGGED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

fn serve_client(mut stream: UnixStream, vm: &Mutex<VmState>, tx: &Sender<Event>) -> std::io::Result<()> {
    let package = vm.lock().expect("vm state lock").package.clone();
    stream.write_all(&qmp::greeting(&package))?;
    let mut session = Session::new();
    let mut decoder = Decoder::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        decoder.feed(&buf[..n]);
        while let Some(msg) = decoder.next_request() {
            let (reply, id, effect) = match msg {
                Ok(req) => {
                    let (reply, effect) = session.handle(&mut vm.lock().expect("vm state lock"), &req);
                    match &req.command {
                        qmp::Command::Other(name) => {
                            let mut logged = NOT_FOUND_LOGGED.lock().expect("log set lock");
                            if logged.get_or_insert_with(HashSet::new).insert(name.clone()) {
                                log::warn!(
                                    "QMP command {name:?} is not provided by xenbackd; answered CommandNotFound"
                                );
                            }
                        }
                        c => log::debug!("QMP {}", c.name()),
                    }
                    (reply, req.id, effect)
                }
                Err(bad) => {
                    log::warn!("QMP: bad request: {}", bad.error);
                    (session.reject(&bad), bad.id, Effect::None)
                }
            };
            stream.write_all(&reply.render(id.as_ref()))?;
            if effect != Effect::None {
                let _ = tx.send(Event::Qmp(effect));
            }
            if effect == Effect::Quit {
                return Ok(());
            }
        }
    }
}

/// The parent side of `-daemonize`: it waits until the child is ready.
struct Daemon {
    ready: std::fs::File,
}

impl Daemon {
    /// Tells the waiting parent that start-up succeeded, and detaches from
    /// its terminal (stdio to /dev/null, as QEMU does once ready).
    fn ready(self) -> Result<()> {
        let mut f = self.ready;
        f.write_all(b"1").context("telling the parent that start-up is done")?;
        let null = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null").context("opening /dev/null")?;
        for target in 0..=2 {
            nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), target).context("redirecting stdio")?;
        }
        Ok(())
    }
}

/// `-daemonize`: forks; the parent exits 0 once the child reports ready
/// (1 if it fails first), the child goes on in a new session.
fn daemonize() -> Result<Daemon> {
    let (r, w) = nix::unistd::pipe().context("pipe")?;
    // SAFETY: no other thread exists yet (the signal, QMP and backend
    // threads start after this), so the child may run arbitrary code.
    match unsafe { nix::unistd::fork() }.context("fork")? {
        nix::unistd::ForkResult::Parent { .. } => {
            drop(w);
            let mut f = std::fs::File::from(r);
            let mut b = [0u8; 1];
            let code = match f.read(&mut b) {
                Ok(1) => 0,
                _ => 1,
            };
            std::process::exit(code);
        }
        nix::unistd::ForkResult::Child => {
            drop(r);
            nix::unistd::setsid().context("setsid")?;
            Ok(Daemon { ready: std::fs::File::from(w) })
        }
    }
}
