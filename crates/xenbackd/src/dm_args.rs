//! QEMU's command line as libxl builds it for a PV guest's device model
//! (`libxl__build_device_model_args_new` in `tools/libs/light/libxl_dm.c`),
//! for Debian's domain-0 instance (`/etc/init.d/xen`) and for `xl devd`'s
//! qdisk backend (`libxl__spawn_qdisk_backend`): parsed into a [`DmConfig`]
//! without side effects. Options that matter to a PV backend are read; the
//! rest are kept in [`DmConfig::ignored`] for the log; HVM machine types are
//! refused.

use evtchn::DomId;

/// The first reserved domain id (`DOMID_FIRST_RESERVED`, `xen.h`).
const DOMID_FIRST_RESERVED: u32 = 0x7ff0;

/// How a QMP socket is given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QmpSocket {
    /// `path=`: bind and listen there (the file is replaced).
    Path(String),
    /// `fd=`: a socket libxl already bound and listens on (`dm_restrict`).
    Fd(i32),
}

/// A `-chardev socket,...` used as a QMP monitor (`-mon chardev=ID,mode=control`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QmpChardev {
    /// The chardev's `id=`.
    pub id: String,
    /// Where it listens.
    pub socket: QmpSocket,
}

/// A guest channel's `-chardev` (`libxl-channel<devid>`), which the
/// console backend connects a guest's console to (`output = chardev:ID`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelChardev {
    /// The chardev's `id=`.
    pub id: String,
    /// What it is.
    pub connection: consback::Connection,
}

/// The parsed command line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DmConfig {
    /// `-xen-domid`: the guest whose devices are served.
    pub domid: DomId,
    /// `-name`.
    pub name: Option<String>,
    /// `-S`: start in `prelaunch` (libxl adds it with the fd form of the socket).
    pub prelaunch: bool,
    /// `-incoming`: a device state to load (HVM only in libxl; `paused` under `-S`).
    pub incoming: Option<String>,
    /// The QMP monitors, in command-line order.
    pub qmp: Vec<QmpChardev>,
    /// The other `-chardev pty` and `-chardev socket,path=...,server=on`:
    /// guest channels.
    pub channels: Vec<ChannelChardev>,
    /// `-pidfile`.
    pub pidfile: Option<String>,
    /// `-daemonize`.
    pub daemonize: bool,
    /// `-m`, as given (a PV device model maps no guest RAM).
    pub memory: Option<String>,
    /// Options accepted but without effect here, each with its value.
    pub ignored: Vec<String>,
    /// Options that ask for something this device model does not do (a
    /// console channel, a VNC server, ...), each with its value: logged as
    /// warnings.
    pub unsupported: Vec<String>,
}

/// Why the command line is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    /// No `-xen-domid`.
    #[error("no -xen-domid: this is not a Xen device model command line")]
    NoDomid,
    /// `-xen-domid` is not a guest domain id.
    #[error("-xen-domid {0:?} is not a domain id")]
    BadDomid(String),
    /// An option's value is missing.
    #[error("{0} needs a value")]
    MissingValue(String),
    /// An HVM machine.
    #[error(
        "machine {0:?} is an HVM guest: xenbackd is a device model for PV and PVH guests only; \
         keep QEMU (qemu-system-xen) for HVM guests, e.g. with device_model_override naming QEMU \
         in their xl.cfg"
    )]
    Hvm(String),
    /// A machine type that is neither PV nor a known HVM one.
    #[error("machine {0:?} is not supported (only xenpv)")]
    UnknownMachine(String),
    /// No `-machine`/`-M` (QEMU would default to an HVM PC).
    #[error("no -machine xenpv: QEMU's default machine is an HVM PC, which xenbackd does not emulate")]
    NoMachine,
    /// A malformed `-chardev` or `-mon`.
    #[error("bad {option} {value:?}: {why}")]
    BadOption {
        /// The option.
        option: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        why: &'static str,
    },
    /// `-mon` names a chardev that was not defined.
    #[error("-mon chardev={0} names no -chardev")]
    NoSuchChardev(String),
}

/// Options of QEMU that take a value and mean nothing to a PV backend.
const IGNORED_WITH_VALUE: &[&str] = &[
    "-display",
    "-k",
    "-monitor",
    "-serial",
    "-parallel",
    "-global",
    "-boot",
    "-smp",
    "-net",
    "-netdev",
    "-drive",
    "-device",
    "-object",
    "-append",
    "-kernel",
    "-initrd",
    "-usbdevice",
    "-soundhw",
    "-spice",
    "-rtc",
    "-cpu",
    "-chroot",
    "-runas",
    "-accel",
    "-L",
    "-bios",
    "-vga",
    "-audiodev",
    "-trace",
    "-D",
    "-d",
];

/// Options of QEMU without a value that mean nothing to a PV backend.
const IGNORED_FLAGS: &[&str] = &[
    "-no-shutdown",
    "-nodefaults",
    "-no-user-config",
    "-xen-attach",
    "-nographic",
    "-xen-domid-restrict",
    "-no-acpi",
    "-usb",
    "-no-reboot",
    "-enable-kvm",
];

/// Splits `a=b,c=d` into pairs; a leading bare word (the backend or the
/// machine type) comes back as `("", word)`. `,,` is an escaped comma, as in
/// QEMU's option parser.
fn opts(value: &str) -> Vec<(String, String)> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = value.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
        .into_iter()
        .enumerate()
        .map(|(i, p)| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None if i == 0 => (String::new(), p),
            None => (p, "on".to_string()),
        })
        .collect()
}

fn get<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// A chardev as defined by `-chardev`: the socket ones we can serve QMP on.
#[derive(Debug)]
struct Chardev {
    id: String,
    socket: Option<QmpSocket>,
    /// `pty`, or a listening socket by path: usable for a channel.
    channel: Option<consback::Connection>,
    text: String,
}

fn parse_chardev(value: &str) -> Result<Chardev, ArgsError> {
    let bad = |why| ArgsError::BadOption { option: "-chardev", value: value.to_string(), why };
    let pairs = opts(value);
    let backend = get(&pairs, "").ok_or_else(|| bad("no backend"))?;
    let id = get(&pairs, "id").filter(|i| !i.is_empty()).ok_or_else(|| bad("no id="))?.to_string();
    let socket = if backend == "socket" {
        match (get(&pairs, "path"), get(&pairs, "fd")) {
            (Some(p), None) if !p.is_empty() => Some(QmpSocket::Path(p.to_string())),
            (None, Some(fd)) => Some(QmpSocket::Fd(fd.parse().ok().filter(|n| *n >= 0).ok_or_else(|| bad("bad fd="))?)),
            (Some(_), Some(_)) => return Err(bad("both path= and fd=")),
            _ => None,
        }
    } else {
        None
    };
    let server = get(&pairs, "server").is_some_and(|s| s.is_empty() || s == "on" || s == "yes" || s == "true");
    let channel = match (backend, &socket) {
        ("pty", _) => Some(consback::Connection::Pty),
        ("socket", Some(QmpSocket::Path(p))) if server => {
            consback::config::socket_path(p).ok().map(consback::Connection::Socket)
        }
        _ => None,
    };
    Ok(Chardev { id, socket, channel, text: value.to_string() })
}

fn check_machine(value: &str) -> Result<(), ArgsError> {
    let pairs = opts(value);
    let kind = get(&pairs, "").or_else(|| get(&pairs, "type")).unwrap_or("");
    match kind {
        "xenpv" => Ok(()),
        k if k == "xenfv" || k.starts_with("pc") || k.starts_with("q35") || k == "isapc" || k == "microvm" => {
            Err(ArgsError::Hvm(k.to_string()))
        }
        k => Err(ArgsError::UnknownMachine(k.to_string())),
    }
}

impl DmConfig {
    /// Parses the arguments after the program name.
    pub fn parse(args: &[String]) -> Result<DmConfig, ArgsError> {
        let mut cfg = DmConfig::default();
        let mut domid = None;
        let mut machine = false;
        let mut chardevs: Vec<Chardev> = Vec::new();
        let mut monitors: Vec<(String, String)> = Vec::new();
        let mut it = args.iter().peekable();
        while let Some(arg) = it.next() {
            // QEMU takes `--opt` as `-opt`.
            let opt = if arg.starts_with("--") { &arg[1..] } else { arg.as_str() };
            let mut value = |name: &str| it.next().cloned().ok_or_else(|| ArgsError::MissingValue(name.to_string()));
            match opt {
                "-xen-domid" => {
                    let v = value(opt)?;
                    let n: u32 = v.parse().map_err(|_| ArgsError::BadDomid(v.clone()))?;
                    if n >= DOMID_FIRST_RESERVED {
                        return Err(ArgsError::BadDomid(v));
                    }
                    domid = Some(n as DomId);
                }
                "-machine" | "-M" => {
                    check_machine(&value(opt)?)?;
                    machine = true;
                }
                "-name" => {
                    let v = value(opt)?;
                    let pairs = opts(&v);
                    cfg.name = get(&pairs, "guest").or_else(|| get(&pairs, "")).map(str::to_string);
                }
                "-S" => cfg.prelaunch = true,
                "-daemonize" => cfg.daemonize = true,
                "-incoming" => cfg.incoming = Some(value(opt)?),
                "-pidfile" => cfg.pidfile = Some(value(opt)?),
                "-m" => cfg.memory = Some(value(opt)?),
                "-chardev" => {
                    let v = value(opt)?;
                    chardevs.push(parse_chardev(&v)?);
                }
                "-mon" => {
                    let v = value(opt)?;
                    let pairs = opts(&v);
                    let id = get(&pairs, "chardev").ok_or(ArgsError::BadOption {
                        option: "-mon",
                        value: v.clone(),
                        why: "no chardev=",
                    })?;
                    let mode = get(&pairs, "mode").unwrap_or("readline");
                    monitors.push((id.to_string(), mode.to_string()));
                }
                "-qmp" => {
                    // `-qmp unix:PATH,server=on,wait=off`: the older form.
                    let v = value(opt)?;
                    let pairs = opts(&v);
                    let path = get(&pairs, "").and_then(|p| p.strip_prefix("unix:")).ok_or(ArgsError::BadOption {
                        option: "-qmp",
                        value: v.clone(),
                        why: "only unix:PATH is supported",
                    })?;
                    let id = format!("qmp{}", cfg.qmp.len());
                    cfg.qmp.push(QmpChardev { id, socket: QmpSocket::Path(path.to_string()) });
                }
                "-vnc" => {
                    let v = value(opt)?;
                    if v != "none" {
                        cfg.unsupported.push(format!("-vnc {v}"));
                    } else {
                        cfg.ignored.push(format!("-vnc {v}"));
                    }
                }
                "-sdl" => cfg.unsupported.push(opt.to_string()),
                o if IGNORED_FLAGS.contains(&o) => cfg.ignored.push(o.to_string()),
                o if IGNORED_WITH_VALUE.contains(&o) => {
                    let v = value(o)?;
                    cfg.ignored.push(format!("{o} {v}"));
                }
                o => {
                    // Unknown: take a following non-option as its value, so
                    // one unknown option does not derail the rest.
                    match it.peek() {
                        Some(v) if !v.starts_with('-') => {
                            cfg.ignored.push(format!("{o} {v}"));
                            it.next();
                        }
                        _ => cfg.ignored.push(o.to_string()),
                    }
                }
            }
        }
        cfg.domid = domid.ok_or(ArgsError::NoDomid)?;
        if !machine {
            return Err(ArgsError::NoMachine);
        }
        let mut used = Vec::new();
        for (id, mode) in monitors {
            let Some(c) = chardevs.iter().find(|c| c.id == id) else {
                return Err(ArgsError::NoSuchChardev(id));
            };
            used.push(id.clone());
            match (&c.socket, mode.as_str()) {
                (Some(_), "control")
                    if get(&opts(&c.text), "server")
                        .is_some_and(|s| s != "on" && s != "yes" && s != "true" && !s.is_empty()) =>
                {
                    return Err(ArgsError::BadOption {
                        option: "-chardev",
                        value: c.text.clone(),
                        why: "a QMP socket must be server=on",
                    })
                }
                (Some(s), "control") => cfg.qmp.push(QmpChardev { id: id.clone(), socket: s.clone() }),
                _ => cfg.unsupported.push(format!("-mon chardev={id},mode={mode} (-chardev {})", c.text)),
            }
        }
        // A chardev no monitor uses is a guest channel (pty, or a socket
        // server on a path): the console backend connects it.
        for c in chardevs.iter().filter(|c| !used.contains(&c.id)) {
            match &c.channel {
                Some(conn) => cfg.channels.push(ChannelChardev { id: c.id.clone(), connection: conn.clone() }),
                None => cfg.unsupported.push(format!("-chardev {}", c.text)),
            }
        }
        Ok(cfg)
    }
}

/// Whether a command line (after the program name) is QEMU's rather than a
/// `xenbackd` subcommand: libxl's starts with `-xen-domid`.
pub fn looks_like_qemu(args: &[String]) -> bool {
    args.first().is_some_and(|a| a.starts_with('-') && a != "-h" && a != "--help")
        && args.iter().any(|a| a == "-xen-domid" || a == "--xen-domid")
}

/// Whether the program was invoked under a QEMU name (installed at the path
/// libxl runs, e.g. Debian's `/usr/libexec/xen-qemu-system-i386`).
pub fn is_qemu_name(argv0: &str) -> bool {
    let base = argv0.rsplit('/').next().unwrap_or(argv0);
    base.starts_with("qemu-system-") || base.starts_with("xen-qemu-system-") || base == "qemu-dm"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    /// `xl create` of a PV guest with a qdisk disk (Xen 4.17, no dm_restrict).
    const LIBXL_PV: &str = "-xen-domid 3 -no-shutdown \
        -chardev socket,id=libxl-cmd,path=/var/run/xen/qmp-libxl-3,server=on,wait=off \
        -mon chardev=libxl-cmd,mode=control \
        -chardev socket,id=libxenstat-cmd,path=/var/run/xen/qmp-libxenstat-3,server=on,wait=off \
        -mon chardev=libxenstat-cmd,mode=control -nodefaults -no-user-config -xen-attach -name guest1 \
        -vnc none -display none -nographic -machine xenpv -m 129";

    #[test]
    fn parses_libxl_pv_command_line() {
        let cfg = DmConfig::parse(&v(LIBXL_PV)).unwrap();
        assert_eq!(cfg.domid, 3);
        assert_eq!(cfg.name.as_deref(), Some("guest1"));
        assert!(!cfg.prelaunch);
        assert_eq!(
            cfg.qmp,
            vec![
                QmpChardev { id: "libxl-cmd".into(), socket: QmpSocket::Path("/var/run/xen/qmp-libxl-3".into()) },
                QmpChardev {
                    id: "libxenstat-cmd".into(),
                    socket: QmpSocket::Path("/var/run/xen/qmp-libxenstat-3".into())
                },
            ]
        );
        assert!(cfg.unsupported.is_empty(), "{:?}", cfg.unsupported);
        assert_eq!(cfg.memory.as_deref(), Some("129"));
    }

    #[test]
    fn parses_dm_restrict_fd_form_with_prelaunch() {
        let args = v("-xen-domid 4 -no-shutdown -chardev socket,id=libxl-cmd,fd=9,server=on,wait=off -S \
            -mon chardev=libxl-cmd,mode=control -xen-attach -name g -xen-domid-restrict -chroot /var/run/xen/qemu-root-4 \
            -machine xenpv -m 256");
        let cfg = DmConfig::parse(&args).unwrap();
        assert!(cfg.prelaunch);
        assert_eq!(cfg.qmp, vec![QmpChardev { id: "libxl-cmd".into(), socket: QmpSocket::Fd(9) }]);
        assert!(cfg.ignored.iter().any(|i| i == "-xen-domid-restrict"));
    }

    #[test]
    fn parses_debian_dom0_instance() {
        let args = v("-xen-domid 0 -xen-attach -name dom0 -nographic -M xenpv -daemonize -monitor /dev/null \
            -serial /dev/null -parallel /dev/null -nodefaults -no-user-config -pidfile /var/run/xen/qemu-dom0.pid");
        let cfg = DmConfig::parse(&args).unwrap();
        assert_eq!(cfg.domid, 0);
        assert!(cfg.daemonize);
        assert_eq!(cfg.pidfile.as_deref(), Some("/var/run/xen/qemu-dom0.pid"));
        assert!(cfg.qmp.is_empty());
    }

    #[test]
    fn refuses_hvm_machines_naming_qemu() {
        for m in ["xenfv,suppress-vmdesc=on", "pc,accel=xen,suppress-vmdesc=on", "q35"] {
            let err = DmConfig::parse(&v(&format!("-xen-domid 5 -machine {m} -m 512"))).unwrap_err();
            assert!(matches!(err, ArgsError::Hvm(_)), "{m}: {err}");
            assert!(err.to_string().contains("keep QEMU"), "{err}");
        }
        assert_eq!(DmConfig::parse(&v("-xen-domid 5 -m 512")).unwrap_err(), ArgsError::NoMachine);
    }

    #[test]
    fn refuses_bad_domids_and_missing_values() {
        assert_eq!(DmConfig::parse(&v("-machine xenpv")).unwrap_err(), ArgsError::NoDomid);
        assert!(matches!(DmConfig::parse(&v("-xen-domid x -M xenpv")), Err(ArgsError::BadDomid(_))));
        assert!(matches!(DmConfig::parse(&v("-xen-domid 32752 -M xenpv")), Err(ArgsError::BadDomid(_))));
        assert!(matches!(DmConfig::parse(&v("-M xenpv -xen-domid")), Err(ArgsError::MissingValue(_))));
        assert!(matches!(
            DmConfig::parse(&v("-xen-domid 1 -M xenpv -mon chardev=nope,mode=control")),
            Err(ArgsError::NoSuchChardev(_))
        ));
        assert!(matches!(
            DmConfig::parse(&v("-xen-domid 1 -M xenpv -chardev socket,id=a,fd=-3")),
            Err(ArgsError::BadOption { .. })
        ));
    }

    #[test]
    fn unknown_options_are_kept_for_the_log() {
        let cfg = DmConfig::parse(&v("-xen-domid 2 -frobnicate 7 -M xenpv -whatever")).unwrap();
        assert_eq!(cfg.ignored, vec!["-frobnicate 7".to_string(), "-whatever".to_string()]);
    }

    #[test]
    fn channel_chardevs_are_channels_and_vnc_is_unsupported() {
        let cfg = DmConfig::parse(&v("-xen-domid 2 -chardev pty,id=libxl-channel1 \
            -chardev socket,id=libxl-channel2,path=/run/ch.sock,server=on,wait=off -vnc 127.0.0.1:0 -M xenpv"))
        .unwrap();
        assert_eq!(
            cfg.channels,
            vec![
                ChannelChardev { id: "libxl-channel1".into(), connection: consback::Connection::Pty },
                ChannelChardev {
                    id: "libxl-channel2".into(),
                    connection: consback::Connection::Socket("/run/ch.sock".into())
                },
            ]
        );
        assert_eq!(cfg.unsupported, vec!["-vnc 127.0.0.1:0".to_string()]);
    }

    #[test]
    fn a_channel_socket_that_does_not_listen_is_unsupported() {
        let cfg = DmConfig::parse(&v("-xen-domid 2 -chardev socket,id=c,path=/x,server=off -M xenpv")).unwrap();
        assert!(cfg.channels.is_empty());
        assert_eq!(cfg.unsupported.len(), 1, "{:?}", cfg.unsupported);
    }

    #[test]
    fn recognises_qemu_invocations() {
        assert!(looks_like_qemu(&v(LIBXL_PV)));
        assert!(!looks_like_qemu(&v("serve --type vbd")));
        assert!(is_qemu_name("/usr/libexec/xen-qemu-system-i386"));
        assert!(is_qemu_name("qemu-system-i386"));
        assert!(!is_qemu_name("/usr/local/sbin/xenbackd"));
    }

    #[test]
    fn option_values_unescape_double_commas() {
        assert_eq!(
            opts("socket,id=a,path=/x,,y"),
            vec![("".into(), "socket".into()), ("id".into(), "a".into()), ("path".into(), "/x,y".into())]
        );
    }
}
