//! Target `dm_args`: the device model's command line (`xenbackd::dm_args`,
//! what libxl passes to the program it runs as QEMU) parsed into a
//! `DmConfig`.
//!
//! Properties: no panic; the same arguments parse to the same result; on
//! `Ok` the domain id is below `DOMID_FIRST_RESERVED`, a `-xen-domid` and
//! a `-machine`/`-M` were given, every QMP monitor and channel has a
//! non-empty id, none is both, and an `fd=` socket is not negative; an
//! unknown flag appended to a command line that parsed only adds itself to
//! `ignored`.
//!
//! Input: the arguments, separated by NUL bytes (each taken as UTF-8,
//! invalid bytes replaced).

use xenbackd::dm_args::{DmConfig, QmpSocket};

const APPENDED: &str = "-zz-fuzz-appended";

/// The arguments of an input.
fn args(data: &[u8]) -> Vec<String> {
    if data.is_empty() {
        return Vec::new();
    }
    data.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
}

/// The input for `args`.
fn encode(args: &[&str]) -> Vec<u8> {
    args.join("\0").into_bytes()
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let args = args(data);
    let first = DmConfig::parse(&args);
    let again = DmConfig::parse(&args);
    assert_eq!(format!("{first:?}"), format!("{again:?}"), "parsing is not deterministic");
    let Ok(cfg) = first else { return };
    assert!(u32::from(cfg.domid) < 0x7ff0, "domid {} is reserved", cfg.domid);
    assert!(args.iter().any(|a| a == "-xen-domid" || a == "--xen-domid"), "parsed without -xen-domid");
    assert!(
        args.iter().any(|a| ["-machine", "--machine", "-M", "--M"].contains(&a.as_str())),
        "parsed without -machine"
    );
    for q in &cfg.qmp {
        assert!(!q.id.is_empty(), "a QMP monitor without an id");
        if let QmpSocket::Fd(fd) = q.socket {
            assert!(fd >= 0, "QMP on fd {fd}");
        }
        assert!(!cfg.channels.iter().any(|c| c.id == q.id), "{} is both a monitor and a channel", q.id);
    }
    for c in &cfg.channels {
        assert!(!c.id.is_empty(), "a channel without an id");
    }

    let mut more = args.clone();
    more.push(APPENDED.to_string());
    let mut expected = cfg.clone();
    expected.ignored.push(APPENDED.to_string());
    match DmConfig::parse(&more) {
        Ok(with) => assert_eq!(with, expected, "an unknown flag appended changed more than `ignored`"),
        Err(e) => panic!("an unknown flag appended made it fail: {e}"),
    }
}

/// Command lines of libxl (Xen 4.17) and variations.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let pv = "-xen-domid 3 -no-shutdown \
        -chardev socket,id=libxl-cmd,path=/var/run/xen/qmp-libxl-3,server=on,wait=off \
        -mon chardev=libxl-cmd,mode=control \
        -chardev socket,id=libxenstat-cmd,path=/var/run/xen/qmp-libxenstat-3,server=on,wait=off \
        -mon chardev=libxenstat-cmd,mode=control -nodefaults -no-user-config -xen-attach -name guest1 \
        -vnc none -display none -nographic -machine xenpv -m 129";
    let restrict = "-xen-domid 5 -chardev socket,id=libxl-cmd,fd=9,server=on,wait=off \
        -mon chardev=libxl-cmd,mode=control -S -nodefaults -xen-attach -name g5 -machine xenpv -m 257";
    let channels = "-xen-domid 7 -chardev socket,id=libxl-cmd,path=/var/run/xen/qmp-libxl-7,server=on,wait=off \
        -mon chardev=libxl-cmd,mode=control -chardev pty,id=libxl-channel1 \
        -chardev socket,id=libxl-channel2,path=/run/guest7-ch2.sock,server=on,wait=off \
        -nodefaults -xen-attach -name g7 -machine xenpv,accel=xen -m 129";
    let dom0 = "-xen-domid 0 -xen-attach -name dom0 -nographic -M xenpv -daemonize -monitor /dev/null \
        -serial /dev/null -parallel /dev/null -nodefaults -no-user-config -pidfile /var/run/qemu-xen-dom0.pid";
    let old_qmp =
        "--xen-domid 9 -qmp unix:/var/run/xen/qmp-libxl-9,server,nowait --machine xenpv -vnc 127.0.0.1:0 -frobnicate 7";
    let hvm = "-xen-domid 4 -machine xenfv -m 1024";
    let split = |s: &'static str| s.split_whitespace().collect::<Vec<_>>();
    vec![
        ("libxl-pv", encode(&split(pv))),
        ("libxl-dm-restrict", encode(&split(restrict))),
        ("libxl-channels", encode(&split(channels))),
        ("debian-dom0", encode(&split(dom0))),
        ("old-qmp-and-unknown", encode(&split(old_qmp))),
        ("hvm-refused", encode(&split(hvm))),
        (
            "escaped-commas",
            encode(&[
                "-xen-domid",
                "2",
                "-chardev",
                "socket,id=a,path=/x,,y,server=on",
                "-mon",
                "chardev=a,mode=control",
                "-M",
                "xenpv",
            ]),
        ),
    ]
}
