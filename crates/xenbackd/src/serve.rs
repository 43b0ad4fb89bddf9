//! `xenbackd serve`: the daemon. Connects to xenstore (socket or
//! `/dev/xen/xenbus`), opens `/dev/xen/evtchn` and `/dev/xen/gntdev`, and
//! serves every frontend domain's block devices below
//! `backend/<type>` of this domain from one process, until SIGTERM or SIGINT.
//! Then every ring finishes its requests in flight and the process exits 0,
//! leaving the devices Connected for the next `serve` to resume (a restart
//! the guests see as a pause), or, with `--close-on-exit`, closing them.

use anyhow::{Context, Result};
use blkback::{BlkDeviceType, BlkOptions};
use nix::sys::signal::{SigSet, Signal};
use xen_backend::{Backend, Config, DeviceKey, DeviceType, Frontends, Platform};
use xs_wire::{Client, TxId};

use crate::cli::{count, ImageLocking, IoEngine};
use xenbackd::control::{ControlServer, DEVICES_TIMEOUT};
use xenbackd::sd_notify;
use xenbackd::status::{self, Status};

/// Most ring worker threads `--workers` takes.
const MAX_WORKERS: u64 = 1024;
/// Most I/O threads per queue `--io-threads` takes.
const MAX_IO_THREADS: u64 = 64;

/// Serve PV backends on this Xen host
///
/// Serves Xen PV block and console backends for every guest from this
/// domain: devices the toolstack creates below
/// /local/domain/<self>/backend/<NAME>/ (xl's backendtype=qdisk disks and
/// `console` channels by default) are connected to their frontends; disks
/// are the files or block devices named by `params` (`aio:/path`,
/// `raw:/path` or `/path`; `format` must be raw); a console goes to a pty
/// (its name in the frontend's `tty` node) or a unix socket (`path`).
///
/// A qdisk disk or a channel that libxl created (`xl create`, `xl
/// block-attach`) is left to the device model libxl starts for its guest (xenbackd itself or QEMU,
/// see docs/device-model.md): libxl records it in
/// /libxl/<domid>/device/{vbd,console}/<devid>, and exactly one process
/// must serve each device.
///
/// `xenbackd status` and `xenbackd metrics` ask it over its control socket
/// (--control-socket). Started by systemd with Type=notify, it tells systemd
/// it is ready once the backend serves. SIGHUP logs one line of status
/// (devices by state, counters) and reopens the guests' console logs
/// (--console-log-dir); serve itself logs to stderr.
///
/// With --consoles it also does xenconsoled's job: every domain's primary
/// console gets a pty (its name in /local/domain/N/console/tty, for `xl
/// console`), mapped at the reserved grant GNTTAB_RESERVED_CONSOLE.
///
/// Runs until SIGTERM or SIGINT. Then every ring finishes the requests in
/// flight and answers them, and the process exits 0 leaving xenstore as it
/// is: the devices stay Connected, and the guests' new requests wait in
/// their rings until the next `xenbackd serve` resumes every Connected
/// device where it was (so a restart or an upgrade is a pause to the guests,
/// not an error). With --close-on-exit, every device is closed instead
/// (backend state Closing, then Closed), as when a backend driver is
/// unloaded.
#[derive(clap::Args, Debug)]
#[command(
    verbatim_doc_comment,
    after_help = "\
Xenstore: XENSTORED_PATH or /var/run/xenstored/socket, else /dev/xen/xenbus.
Logging: RUST_LOG (default info)."
)]
pub struct ServeArgs {
    /// Serve backend/NAME (repeatable; e.g. vbd when the kernel's blkback is
    /// not loaded): `console` is the console device type (channels and
    /// secondary consoles), any other name the block device type
    #[arg(long = "type", value_name = "NAME", default_values_t = ["qdisk".to_string(), "console".to_string()], value_parser = device_type_name)]
    types: Vec<String>,
    /// Guest output one console may send, KiB per second (0: unlimited)
    #[arg(long, value_name = "KIB", default_value_t = consback::DEFAULT_RATE >> 10)]
    console_rate: u64,
    /// What happens to console output its host side does not take: block
    /// (the guest waits) or discard (the oldest bytes go, as xenconsoled's
    /// default)
    #[arg(long, value_name = "POLICY", value_enum, default_value_t = crate::cli::ConsoleOverflow::Block)]
    console_overflow: crate::cli::ConsoleOverflow,
    /// Ring worker threads, 1 to 1024 [default: number of CPUs]
    #[arg(long, value_name = "N", value_parser = count(1..=MAX_WORKERS))]
    workers: Option<usize>,
    /// The I/O engine
    #[arg(long, value_name = "E", value_enum, default_value_t = IoEngine::Auto)]
    io_engine: IoEngine,
    /// I/O threads per queue of the threads engine, 1 to 64
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = count(1..=MAX_IO_THREADS))]
    io_threads: usize,
    /// Bounce buffers one queue may hold (in flight and spare), in MiB, 1 to
    /// 1024; a guest's requests beyond wait in its ring (4 MiB is Linux
    /// blkback's max_buffer_pages, 1024 pages per ring)
    #[arg(long, value_name = "MIB", default_value_t = blkback::DEFAULT_QUEUE_BUFFER_BYTES >> 20, value_parser = count(1..=1024))]
    queue_buffers: usize,
    /// Bounce buffers all guests' queues together may hold, in MiB, 1 to
    /// 65536
    #[arg(long, value_name = "MIB", default_value_t = blkback::DEFAULT_BUFFER_BYTES >> 20, value_parser = count(1..=65536))]
    buffers: usize,
    /// Guest pages kept mapped per queue for frontends that negotiate
    /// feature-persistent (raw disks), 0 to 65536; 0 (the default) offers
    /// no persistent grants and grant-copies every byte, as fast or faster
    /// in the lab; 1056 is Linux blkback's default
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = count(0..=65536))]
    persistent_grants: usize,
    /// Use the page cache instead of O_DIRECT
    #[arg(long)]
    buffered: bool,
    /// Lock images as QEMU does, so that QEMU, qemu-img or another xenbackd
    /// cannot write an image served here (and we refuse one they write);
    /// off for storage that live migration opens on two hosts at once
    #[arg(long, value_name = "L", value_enum, default_value_t = ImageLocking::Auto)]
    image_locking: ImageLocking,
    /// Also serve every domain's primary console (/local/domain/N/console),
    /// as xenconsoled does: stop xenconsoled first (refused while it runs,
    /// unless --force-consoles)
    #[arg(long)]
    consoles: bool,
    /// With --consoles: write each guest's console output to
    /// DIR/guest-<name>.log (reopened on SIGHUP)
    #[arg(long, value_name = "DIR", requires = "consoles")]
    console_log_dir: Option<std::path::PathBuf>,
    /// With --console-log-dir: MiB per log file before it becomes
    /// <file>.old, 1 to 4096
    #[arg(long, value_name = "MIB", default_value_t = 16, value_parser = count(1..=4096))]
    console_log_size: usize,
    /// With --consoles: serve even if xenconsoled seems to run, and take
    /// over consoles whose tty another daemon holds
    #[arg(long, requires = "consoles")]
    force_consoles: bool,
    /// Close every device on SIGTERM/SIGINT instead of leaving them for the
    /// next serve to resume
    #[arg(long)]
    close_on_exit: bool,
    /// Where each ring's request journal is kept, so that a serve started
    /// after a crash resumes every device exactly (a tmpfs: it must outlive
    /// the process, not the host)
    #[arg(long, value_name = "DIR", default_value = crate::JOURNAL_DIR)]
    journal_dir: std::path::PathBuf,
    /// Seconds the xenstore connection may stay lost (the rings are served
    /// meanwhile and reconnection is tried) before serve exits with status 1,
    /// leaving the devices for the next serve to resume; 1 to 3600
    #[arg(long, value_name = "SECONDS", default_value_t = 60, value_parser = crate::cli::count(1..=3600))]
    xenstore_timeout: usize,
    /// The control socket `xenbackd status` and `metrics` ask (made with
    /// mode 0600, its directory 0700)
    #[arg(long, value_name = "PATH", default_value = xenbackd::control::CONTROL_SOCKET)]
    control_socket: std::path::PathBuf,
}

/// A xenstore directory name under `backend/`.
fn device_type_name(s: &str) -> Result<String, String> {
    if s.is_empty() || s.contains('/') {
        return Err("must be a non-empty name without '/'".into());
    }
    Ok(s.to_string())
}

/// Whether a device is `serve`'s rather than a device model's. libxl starts
/// a device model for every guest that has a qdisk disk backed by the
/// toolstack's domain (`libxl_device_disk_dm_needed`, `libxl__need_xenpv_qemu`)
/// and that process serves it; libxl records the disk at
/// `/libxl/<domid>/device/vbd/<devid>/backend` in the same transaction that
/// creates the backend directory, so the record is there when we first see
/// the device. Devices without the record (another toolstack, or written by
/// hand) and libxl's `vbd` (phy) disks, which have no device model, are ours.
pub fn not_libxl_device_model(xs: &Client, key: &DeviceKey, dir: &str) -> bool {
    // libxl's channels and secondary consoles backed by the toolstack's
    // domain get a device model too (`libxl__need_xenpv_qemu`), recorded in
    // /libxl/<domid>/device/console/<devid>.
    let kind = match key.kind.as_str() {
        "qdisk" => "vbd",
        "console" => "console",
        _ => return true,
    };
    let record = format!("/libxl/{}/device/{kind}/{}/backend", key.frontend, key.devid);
    match xs.read(TxId::NONE, &record) {
        Ok(v) if String::from_utf8_lossy(&v).trim_end_matches('\0') == dir => {
            log::info!("{key}: created by libxl, which starts a device model for it; not served here");
            false
        }
        _ => true,
    }
}

/// Runs the daemon.
pub fn run(args: ServeArgs) -> Result<u8> {
    let types = args.types;
    let mut config =
        Config { frontends: Frontends::Filter(std::sync::Arc::new(not_libxl_device_model)), ..Config::default() };
    if let Some(w) = args.workers {
        config.workers = w;
    }
    config.journal_dir = Some(args.journal_dir);
    config.xenstore_timeout = std::time::Duration::from_secs(args.xenstore_timeout as u64);
    let xenstore_timeout = config.xenstore_timeout;
    let opts = BlkOptions {
        io_threads: args.io_threads,
        engine: args.io_engine.into(),
        direct: !args.buffered,
        locking: args.image_locking.into(),
        queue_buffer_bytes: args.queue_buffers << 20,
        buffer_bytes: args.buffers << 20,
        persistent_grants: args.persistent_grants,
        ..BlkOptions::default()
    };
    // One budget for every device type: the daemon's.
    let budget = blkback::BufferBudget::new(opts.buffer_bytes);
    let close_on_exit = args.close_on_exit;

    // Block the signals before any thread starts, so every thread inherits
    // the mask and only `wait` below receives them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGHUP);
    signals.thread_block().context("blocking SIGTERM/SIGINT/SIGHUP")?;

    // Bound first: a second serve stops here, before touching any device.
    let mut control = ControlServer::bind(&args.control_socket)
        .with_context(|| format!("listening on {}", args.control_socket.display()))?;
    let xs = Client::connect().context("connecting to xenstore")?;
    let platform = Platform::xen(xs).context("opening the Xen devices")?;
    let domid = platform.domid();
    let console = consback::ConsoleOptions {
        limits: consback::Limits {
            rate: args.console_rate << 10,
            overflow: args.console_overflow.into(),
            ..consback::Limits::default()
        },
        ..consback::ConsoleOptions::default()
    };
    let device_types: Vec<std::sync::Arc<dyn DeviceType>> = types
        .iter()
        .map(|t| match t.as_str() {
            "console" => consback::ConsoleDeviceType::new(t.clone(), console.clone()) as _,
            _ => BlkDeviceType::with_budget(t.clone(), opts, budget.clone()) as _,
        })
        .collect();
    let workers = config.workers;
    let primary = if args.consoles {
        let opts = consback::PrimaryOptions {
            limits: consback::Limits { rate: args.console_rate << 10, ..consback::PrimaryOptions::default().limits },
            log_dir: args.console_log_dir.clone(),
            log_max: (args.console_log_size as u64) << 20,
            force: args.force_consoles,
            ..consback::PrimaryOptions::default()
        };
        if let Some(dir) = &opts.log_dir {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let xs = Client::connect().context("connecting to xenstore for the primary consoles")?;
        let platform = Platform::xen(xs).context("opening the Xen devices for the primary consoles")?;
        Some(consback::PrimaryConsoles::start(platform, opts).context("serving the primary consoles")?)
    } else {
        None
    };
    let mut backend = Backend::start(platform, device_types, config).context("starting the backend")?;
    let monitor = backend.monitor();
    if let Err(e) = control.serve(monitor.clone()) {
        log::error!("control socket {}: {e}; status and metrics are unavailable", args.control_socket.display());
    }
    log::info!("serving backend/{{{}}} of dom{domid} with {workers} workers", types.join(","));
    let ready = format!("{}\nSTATUS=serving backend/{{{}}} of dom{domid}", sd_notify::READY, types.join(","));
    if let Err(e) = sd_notify::notify(&ready) {
        log::warn!("telling systemd we are ready: {e}");
    }

    // A backend that stops on its own (xenstore gone for good) wakes the
    // wait below as a SIGTERM would.
    let done = backend.done();
    std::thread::Builder::new()
        .name("xenbackd-done".into())
        .spawn(move || {
            let _ = done.recv();
            let _ = nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGTERM);
        })
        .context("starting a thread")?;

    let sig = loop {
        match signals.wait().context("waiting for a signal")? {
            Signal::SIGHUP => {
                let summary = status::summary(&Status::gather(&monitor, DEVICES_TIMEOUT));
                log::info!("SIGHUP: {summary}");
                if let Some(p) = &primary {
                    p.reopen_logs();
                    log::info!("SIGHUP: console logs reopened; {} primary consoles served", p.served().len());
                }
                // And for `systemctl status`.
                let _ = sd_notify::notify(&format!("STATUS={summary}"));
            }
            sig => break sig,
        }
    };
    if let Err(e) = sd_notify::notify(sd_notify::STOPPING) {
        log::warn!("telling systemd we stop: {e}");
    }
    // `control` stays bound until the backend has stopped (at the return):
    // a second serve must not resume devices this one still drains.
    if backend.done().try_recv() == Err(crossbeam_channel::TryRecvError::Disconnected) {
        backend.detach();
        anyhow::bail!(
            "the backend stopped (xenstore unreachable for {:?}); devices are left for the next serve to resume",
            xenstore_timeout
        );
    }
    if close_on_exit {
        log::info!("{sig:?}: closing every device");
        backend.shutdown();
    } else {
        log::info!("{sig:?}: finishing the requests in flight; devices stay connected for the next serve");
        backend.detach();
    }
    log::info!("stopped");
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use xen_sim::xenstored::Xenstored;

    fn key(kind: &str) -> DeviceKey {
        DeviceKey { kind: kind.into(), frontend: 3, devid: 51712 }
    }

    const DIR: &str = "/local/domain/0/backend/qdisk/3/51712";

    #[test]
    fn libxl_qdisk_is_left_to_the_device_model() {
        let xs = Client::from_stream(Xenstored::new().connect_as(0).unwrap()).unwrap();
        assert!(not_libxl_device_model(&xs, &key("qdisk"), DIR), "no libxl record: ours");
        xs.write(TxId::NONE, "/libxl/3/device/vbd/51712/backend", DIR.as_bytes()).unwrap();
        assert!(!not_libxl_device_model(&xs, &key("qdisk"), DIR), "libxl's qdisk: the device model's");
        let vbd = "/local/domain/0/backend/vbd/3/51712";
        assert!(not_libxl_device_model(&xs, &key("vbd"), vbd), "libxl's vbd has no device model");
        xs.write(TxId::NONE, "/libxl/3/device/vbd/51712/backend", b"/local/domain/5/backend/qdisk/3/51712").unwrap();
        assert!(not_libxl_device_model(&xs, &key("qdisk"), DIR), "a record naming another backend is not this one");
        let console = "/local/domain/0/backend/console/3/51712";
        assert!(not_libxl_device_model(&xs, &key("console"), console), "a console without a libxl record: ours");
        xs.write(TxId::NONE, "/libxl/3/device/console/51712/backend", console.as_bytes()).unwrap();
        assert!(!not_libxl_device_model(&xs, &key("console"), console), "libxl's channel: the device model's");
    }
}
