//! The device-model mode as libxl drives it: the real binary started as a
//! child with the command line `libxl__build_device_model_args_new` builds
//! for a PV guest, against the simulated xenstored (`XENSTORED_PATH`), with
//! the xenstore nodes `xl create` writes for a qdisk disk. The test then acts
//! as libxl: waits for `device-model/<domid>/state = running`, speaks QMP
//! over the unix socket (one command per connection, as `libxl__ev_qmp`
//! does), and sends SIGHUP. Another guest's qdisk disk in the same
//! directory must stay untouched. No Xen devices are needed: the backend
//! brings a disk to InitWait (disk opened, features written) without
//! event channels or grants; the data path is covered by the simulator's
//! in-process tests.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use xen_sim::xenstored::{SocketServer, Xenstored};
use xs_wire::{Client, TxId};

const XB: &str = env!("CARGO_BIN_EXE_xenbackd");
/// libxl's own limit for the state node (`LIBXL_DEVICE_MODEL_START_TIMEOUT`).
const START: Duration = Duration::from_secs(60);
const WAIT: Duration = Duration::from_secs(20);
const GUEST: u32 = 3;
const OTHER: u32 = 4;
const VDEV: u32 = 51712; // xvda

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A simulated dom0 with two PV guests, each given a qdisk disk by "libxl".
struct Host {
    dir: TempDir,
    sock: PathBuf,
    xs: Client,
    _server: SocketServer,
    xenstored: Arc<Xenstored>,
}

impl Host {
    fn new(name: &str) -> Host {
        let dir = std::env::temp_dir().join(format!("xenbackd-dm-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("xenstored");
        let xenstored = Xenstored::new();
        let server = xenstored.serve_socket(&sock).unwrap();
        let xs = Client::connect_socket(&sock).unwrap();
        let host = Host { dir: TempDir(dir), sock, xs, _server: server, xenstored };
        for domid in [GUEST, OTHER] {
            host.libxl_disk(domid);
        }
        host
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    fn read(&self, path: &str) -> Option<String> {
        self.xs.read(TxId::NONE, path).ok().map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    /// The nodes `device_disk_add` writes for
    /// `format=raw,vdev=xvda,access=rw,backendtype=qdisk,target=IMG`, and
    /// the directory `libxl__spawn_local_dm` creates.
    fn libxl_disk(&self, domid: u32) {
        let img = self.path(&format!("disk{domid}.img"));
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let be = format!("/local/domain/0/backend/qdisk/{domid}/{VDEV}");
        let fe = format!("/local/domain/{domid}/device/vbd/{VDEV}");
        let tx = self.xs.transaction_start().unwrap();
        for (k, v) in [
            ("frontend", fe.as_str()),
            ("params", &format!("raw:{}", img.display())),
            ("frontend-id", &domid.to_string()),
            ("online", "1"),
            ("removable", "0"),
            ("bootable", "1"),
            ("state", "1"),
            ("dev", "xvda"),
            ("type", "qdisk"),
            ("mode", "w"),
            ("device-type", "disk"),
            ("discard-enable", "1"),
        ] {
            self.xs.write(tx, &format!("{be}/{k}"), v.as_bytes()).unwrap();
        }
        for (k, v) in [
            ("backend", be.as_str()),
            ("backend-id", "0"),
            ("state", "1"),
            ("virtual-device", &VDEV.to_string()),
            ("device-type", "disk"),
        ] {
            self.xs.write(tx, &format!("{fe}/{k}"), v.as_bytes()).unwrap();
        }
        let libxl = format!("/libxl/{domid}/device/vbd/{VDEV}");
        self.xs.write(tx, &format!("{libxl}/frontend"), fe.as_bytes()).unwrap();
        self.xs.write(tx, &format!("{libxl}/backend"), be.as_bytes()).unwrap();
        self.xs.transaction_end(tx, true).unwrap();
        self.xs.mkdir(TxId::NONE, &format!("/local/domain/0/device-model/{domid}")).unwrap();
    }

    /// The nodes `libxl__device_console_add` writes for `channel = [
    /// "connection=pty,name=org.example.1" ]` (devid 1) or with
    /// `connection=socket,path=PATH`, in one transaction with libxl's record.
    fn libxl_channel(&self, domid: u32, devid: u32, socket: Option<&Path>) {
        let be = format!("/local/domain/0/backend/console/{domid}/{devid}");
        let fe = format!("/local/domain/{domid}/device/console/{devid}");
        let name = format!("org.example.{devid}");
        let (connection, output) = match socket {
            None => ("pty".to_string(), "pty".to_string()),
            Some(_) => ("socket".to_string(), format!("chardev:libxl-channel{devid}")),
        };
        let tx = self.xs.transaction_start().unwrap();
        let mut be_nodes = vec![
            ("frontend", fe.clone()),
            ("frontend-id", domid.to_string()),
            ("online", "1".into()),
            ("state", "1".into()),
            ("protocol", "vt100".into()),
            ("name", name.clone()),
            ("connection", connection.clone()),
        ];
        if let Some(p) = socket {
            be_nodes.push(("path", p.display().to_string()));
        }
        for (k, v) in &be_nodes {
            self.xs.write(tx, &format!("{be}/{k}"), v.as_bytes()).unwrap();
        }
        for (k, v) in [
            ("backend", be.as_str()),
            ("backend-id", "0"),
            ("name", &name),
            ("limit", "1048576"),
            ("type", "ioemu"),
            ("output", &output),
            ("tty", ""),
            ("state", "1"),
            ("protocol", "vt100"),
        ] {
            self.xs.write(tx, &format!("{fe}/{k}"), v.as_bytes()).unwrap();
        }
        let libxl = format!("/libxl/{domid}/device/console/{devid}");
        for (k, v) in
            [("frontend", fe.as_str()), ("backend", be.as_str()), ("name", &name), ("connection", &connection)]
        {
            self.xs.write(tx, &format!("{libxl}/{k}"), v.as_bytes()).unwrap();
        }
        self.xs.transaction_end(tx, true).unwrap();
    }

    fn backend(&self, domid: u32, node: &str) -> Option<String> {
        self.read(&format!("/local/domain/0/backend/qdisk/{domid}/{VDEV}/{node}"))
    }

    fn wait_for(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// libxl's command line for a PV guest (Xen 4.17, path form of the QMP
    /// socket), the program first.
    fn libxl_args(&self, program: &Path, domid: u32) -> Vec<String> {
        let qmp = self.path(&format!("qmp-libxl-{domid}"));
        let stat = self.path(&format!("qmp-libxenstat-{domid}"));
        let mut a = vec![program.display().to_string()];
        a.extend([
            "-xen-domid".to_string(),
            domid.to_string(),
            "-no-shutdown".into(),
            "-chardev".into(),
            format!("socket,id=libxl-cmd,path={},server=on,wait=off", qmp.display()),
            "-mon".into(),
            "chardev=libxl-cmd,mode=control".into(),
            "-chardev".into(),
            format!("socket,id=libxenstat-cmd,path={},server=on,wait=off", stat.display()),
            "-mon".into(),
            "chardev=libxenstat-cmd,mode=control".into(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-xen-attach".into(),
            "-name".into(),
            format!("guest{domid}"),
            "-vnc".into(),
            "none".into(),
            "-display".into(),
            "none".into(),
            "-nographic".into(),
            "-machine".into(),
            "xenpv".into(),
            "-m".into(),
            "129".into(),
        ]);
        a
    }

    fn spawn(&self, args: &[String]) -> Child {
        let mut cmd = Command::new(&args[0]);
        cmd.args(&args[1..])
            .env("XENSTORED_PATH", &self.sock)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.path("dm.log")).unwrap());
        cmd.spawn().unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("dm.log")).unwrap_or_default()
    }
}

#[test]
fn libxl_channels_are_served_on_a_pty_and_a_socket() {
    let host = Host::new("channels");
    let sock = host.path("channel2.sock");
    host.libxl_channel(GUEST, 1, None);
    host.libxl_channel(GUEST, 2, Some(&sock));
    host.libxl_channel(OTHER, 1, None);
    // The primary console's directories, as libxl writes them for every PV guest.
    let primary_be = format!("/local/domain/0/backend/console/{GUEST}/0");
    let primary_fe = format!("/local/domain/{GUEST}/console");
    for (path, value) in [
        (format!("{primary_fe}/type"), "xenconsoled".to_string()),
        (format!("{primary_fe}/tty"), String::new()),
        (format!("{primary_be}/frontend"), primary_fe.clone()),
        (format!("{primary_be}/frontend-id"), GUEST.to_string()),
        (format!("{primary_be}/online"), "1".into()),
        (format!("{primary_be}/state"), "1".into()),
    ] {
        host.xs.write(TxId::NONE, &path, value.as_bytes()).unwrap();
    }
    let mut args = host.libxl_args(Path::new(XB), GUEST);
    // libxl_dm.c: one -chardev per channel, before -nodefaults.
    let at = args.iter().position(|a| a == "-nodefaults").unwrap();
    args.splice(
        at..at,
        [
            "-chardev".to_string(),
            "pty,id=libxl-channel1".to_string(),
            "-chardev".to_string(),
            format!("socket,id=libxl-channel2,path={},server=on,wait=off", sock.display()),
        ],
    );
    let mut child = host.spawn(&args);
    let be = |devid: u32, node: &str| host.read(&format!("/local/domain/0/backend/console/{GUEST}/{devid}/{node}"));

    for devid in [1, 2] {
        host.wait_for("InitWait of a channel", WAIT, || be(devid, "state").as_deref() == Some("2"));
    }
    let tty = host.read(&format!("/local/domain/{GUEST}/device/console/1/tty")).unwrap();
    assert!(tty.starts_with("/dev/pts/") && Path::new(&tty).exists(), "tty node {tty:?}; log:\n{}", host.log());
    std::os::unix::net::UnixStream::connect(&sock).expect("the socket channel listens");
    let qmp = host.path(&format!("qmp-libxl-{GUEST}"));
    let chardevs = Qmp::libxl(&qmp, "query-chardev");
    let listed: Vec<(String, String)> = chardevs["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["label"].as_str().unwrap().to_string(), c["filename"].as_str().unwrap().to_string()))
        .collect();
    assert!(listed.contains(&("libxl-channel1".into(), format!("pty:{tty}"))), "{listed:?}");
    assert!(listed.contains(&("libxl-channel2".into(), format!("unix:{},server=on", sock.display()))), "{listed:?}");
    assert!(!host.log().contains("not provided by xenbackd (ignored): -chardev"), "log:\n{}", host.log());
    let other = format!("/local/domain/0/backend/console/{OTHER}/1/state");
    assert_eq!(host.read(&other).as_deref(), Some("1"), "another guest's channel is not touched");

    sighup(&child);
    let status = wait_exit(&mut child, WAIT);
    assert!(status.success(), "{status}; log:\n{}", host.log());
    assert_eq!(be(1, "state").as_deref(), Some("6"));
    assert!(!sock.exists(), "the channel's socket file is removed");
    assert_eq!(be(0, "state").as_deref(), Some("1"), "the primary console is xenconsoled's, never touched");
    assert_eq!(host.read(&format!("{primary_fe}/tty")).as_deref(), Some(""));
}

/// One QMP connection, as `libxl__ev_qmp` makes one per command.
struct Qmp {
    reader: BufReader<UnixStream>,
    stream: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let stream = UnixStream::connect(path).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut q = Qmp { reader: BufReader::new(stream.try_clone().unwrap()), stream };
        let greeting = q.recv();
        assert!(greeting["QMP"]["version"]["qemu"]["major"].is_u64(), "greeting: {greeting}");
        q
    }

    fn recv(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        assert!(line.ends_with("\r\n"), "libxl splits messages on CRLF: {line:?}");
        serde_json::from_str(&line).unwrap()
    }

    fn execute(&mut self, cmd: &str, id: u64) -> Value {
        self.stream.write_all(format!("{{\"execute\":\"{cmd}\",\"id\":{id}}}\r\n").as_bytes()).unwrap();
        let reply = self.recv();
        assert_eq!(reply["id"], json!(id), "the id is echoed: {reply}");
        reply
    }

    /// libxl's exchange for one command: capabilities, then the command.
    fn libxl(path: &Path, cmd: &str) -> Value {
        let mut q = Qmp::connect(path);
        let caps = q.execute("qmp_capabilities", 0x786c7100);
        assert_eq!(caps["return"], json!({}), "{caps}");
        q.execute(cmd, 0x786c7101)
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the device model did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sighup(child: &Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
}

#[test]
fn libxl_create_serves_only_its_guest_and_sighup_closes() {
    let host = Host::new("create");
    // Installed at the compiled-in QEMU path (a QEMU name), with no override.
    let qemu = host.path("xen-qemu-system-i386");
    std::os::unix::fs::symlink(XB, &qemu).unwrap();
    let mut child = host.spawn(&host.libxl_args(&qemu, GUEST));
    let state = format!("/local/domain/0/device-model/{GUEST}/state");

    host.wait_for("the state node", START, || host.read(&state).as_deref() == Some("running"));
    host.wait_for("InitWait of the guest's disk", WAIT, || host.backend(GUEST, "state").as_deref() == Some("2"));

    assert!(host.backend(GUEST, "max-ring-page-order").is_some(), "features offered; log:\n{}", host.log());
    let qmp = host.path(&format!("qmp-libxl-{GUEST}"));
    let chardevs = Qmp::libxl(&qmp, "query-chardev");
    let labels: Vec<&str> =
        chardevs["return"].as_array().unwrap().iter().map(|c| c["label"].as_str().unwrap()).collect();
    assert_eq!(labels, ["libxl-cmd", "libxenstat-cmd"]);
    assert_eq!(Qmp::libxl(&qmp, "query-status")["return"]["status"], json!("running"));
    let unknown = Qmp::libxl(&qmp, "xen-save-devices-state");
    assert_eq!(unknown["error"]["class"], json!("CommandNotFound"), "{unknown}");
    // libxenstat's socket speaks the same protocol.
    let stat = host.path(&format!("qmp-libxenstat-{GUEST}"));
    assert_eq!(Qmp::libxl(&stat, "query-name")["return"]["name"], json!(format!("guest{GUEST}")));
    // The other guest's disk was not touched.
    assert_eq!(host.backend(OTHER, "state").as_deref(), Some("1"));
    assert_eq!(host.backend(OTHER, "sectors"), None);

    sighup(&child);
    let status = wait_exit(&mut child, WAIT);

    assert!(status.success(), "{status}; log:\n{}", host.log());
    assert_eq!(host.backend(GUEST, "state").as_deref(), Some("6"), "closed on SIGHUP");
    assert_eq!(host.backend(OTHER, "state").as_deref(), Some("1"));
    assert!(!qmp.exists(), "the QMP socket file is removed");
    assert!(host.log().contains("ignoring QEMU option -no-shutdown"), "unknown options are logged");
}

#[test]
fn dm_restrict_fd_socket_prelaunch_then_cont_then_quit() {
    let host = Host::new("restrict");
    // libxl__pre_open_qmp_socket: bound and listening before the spawn.
    let qmp_path = host.path(&format!("qmp-libxl-{GUEST}"));
    let listener = UnixListener::bind(&qmp_path).unwrap();
    let fd = listener.as_raw_fd();
    let mut args = host.libxl_args(Path::new(XB), GUEST);
    let i = args.iter().position(|a| a.starts_with("socket,id=libxl-cmd")).unwrap();
    args[i] = "socket,id=libxl-cmd,fd=9,server=on,wait=off".into();
    args.insert(i + 1, "-S".into());
    let mut cmd = Command::new(&args[0]);
    cmd.args(&args[1..])
        .env("XENSTORED_PATH", &host.sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(host.path("dm.log")).unwrap());
    // SAFETY: dup2 and fcntl are async-signal-safe; this runs in the child
    // between fork and exec and gives it the listening socket as fd 9
    // without FD_CLOEXEC, as libxl passes it (dup2 onto itself would keep
    // the flag, hence the fcntl when the socket already is fd 9).
    unsafe {
        cmd.pre_exec(move || {
            use nix::fcntl::{fcntl, FcntlArg, FdFlag};
            let r = if fd == 9 { fcntl(9, FcntlArg::F_SETFD(FdFlag::empty())) } else { nix::unistd::dup2(fd, 9) };
            r.map(|_| ()).map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(listener);
    let state = format!("/local/domain/0/device-model/{GUEST}/state");

    // libxl sends query-status at once and expects prelaunch.
    let status = Qmp::libxl(&qmp_path, "query-status");

    assert_eq!(status["return"]["status"], json!("prelaunch"), "{status}");
    host.wait_for("InitWait of the guest's disk", WAIT, || host.backend(GUEST, "state").as_deref() == Some("2"));
    assert_eq!(host.read(&state), None, "under -S the state node waits for cont");
    assert_eq!(Qmp::libxl(&qmp_path, "cont")["return"], json!({}));
    host.wait_for("the state node after cont", WAIT, || host.read(&state).as_deref() == Some("running"));
    assert_eq!(Qmp::libxl(&qmp_path, "quit")["return"], json!({}));
    let exit = wait_exit(&mut child, WAIT);
    assert!(exit.success(), "{exit}; log:\n{}", host.log());
    assert_eq!(host.backend(OTHER, "state").as_deref(), Some("1"));
}

#[test]
fn hvm_machine_is_refused_at_once_naming_qemu() {
    let host = Host::new("hvm");
    let mut args = host.libxl_args(Path::new(XB), GUEST);
    let m = args.iter().position(|a| a == "xenpv").unwrap();
    args[m] = "xenfv,suppress-vmdesc=on".into();

    let mut child = host.spawn(&args);
    let status = wait_exit(&mut child, WAIT);

    assert_eq!(status.code(), Some(1));
    assert!(host.log().contains("keep QEMU"), "log:\n{}", host.log());
    assert_eq!(host.backend(GUEST, "state").as_deref(), Some("1"), "nothing served");
    assert_eq!(host.read(&format!("/local/domain/0/device-model/{GUEST}/state")), None);
}

#[test]
fn released_domain_ends_its_device_model() {
    let host = Host::new("release");
    host.xenstored.introduce_domain(GUEST);
    let mut child = host.spawn(&host.libxl_args(Path::new(XB), GUEST));
    let state = format!("/local/domain/0/device-model/{GUEST}/state");
    host.wait_for("the state node", START, || host.read(&state).as_deref() == Some("running"));
    host.wait_for("InitWait of the guest's disk", WAIT, || host.backend(GUEST, "state").as_deref() == Some("2"));

    // The guest dies and no SIGHUP comes (the toolstack is gone).
    host.xenstored.release_domain(GUEST);
    let status = wait_exit(&mut child, WAIT);

    assert!(status.success(), "{status}; log:\n{}", host.log());
    assert!(host.log().contains("the domain is gone"), "log:\n{}", host.log());
    assert_eq!(host.backend(OTHER, "state").as_deref(), Some("1"));
}

#[test]
fn debian_dom0_instance_daemonizes_and_writes_its_pidfile() {
    let host = Host::new("dom0");
    let pidfile = host.path("qemu-dom0.pid");
    let args: Vec<String> = [
        XB,
        "-xen-domid",
        "0",
        "-xen-attach",
        "-name",
        "dom0",
        "-nographic",
        "-M",
        "xenpv",
        "-daemonize",
        "-monitor",
        "/dev/null",
        "-serial",
        "/dev/null",
        "-parallel",
        "/dev/null",
        "-nodefaults",
        "-no-user-config",
        "-pidfile",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([pidfile.display().to_string()])
    .collect();

    // As /etc/init.d/xen runs it: the command returns once the daemon is up.
    let mut parent = host.spawn(&args);
    let status = wait_exit(&mut parent, START);

    assert!(status.success(), "{status}; log:\n{}", host.log());
    assert_eq!(host.read("/local/domain/0/device-model/0/state").as_deref(), Some("running"));
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    let daemon = nix::unistd::Pid::from_raw(pid);
    assert_ne!(pid, parent.id() as i32, "the pidfile names the daemon, not the parent");
    nix::sys::signal::kill(daemon, None).expect("the daemon runs");
    assert_eq!(host.backend(GUEST, "state").as_deref(), Some("1"), "domain 0's instance serves domain 0 only");
    nix::sys::signal::kill(daemon, nix::sys::signal::Signal::SIGTERM).unwrap();
    host.wait_for("the daemon to exit", WAIT, || !pidfile.exists());
}
