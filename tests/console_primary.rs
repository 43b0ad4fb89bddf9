//! The primary consoles (`serve --consoles`, what xenconsoled does) on the
//! simulator: every domain's `/local/domain/N/console` page mapped at
//! `GNTTAB_RESERVED_CONSOLE`, a pty per guest in `console/tty`, logs,
//! only consoles meant for us, never two daemons on one console.

#[path = "console_common.rs"]
mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use common::{open_tty, pattern, TempDir, WAIT};
use consback::{Connection, Host, PrimaryConsoles, PrimaryError, PrimaryOptions};
use xen_backend::Platform;
use xen_sim::consfront::PrimaryConsole;
use xen_sim::dom0::SimDom0;
use xs_wire::{Client, TxId};

struct Setup {
    dom0: SimDom0,
    admin: Client,
    dir: TempDir,
}

impl Setup {
    fn new(tag: &str) -> Result<Self> {
        let _ = env_logger::builder().is_test(true).try_init();
        let dom0 = SimDom0::start()?;
        let admin = dom0.dom0_client()?;
        Ok(Setup { dom0, admin, dir: TempDir::new(tag)? })
    }

    /// Options that look for xenconsoled nowhere real.
    fn options(&self) -> PrimaryOptions {
        let proc_dir = self.dir.0.join("proc");
        std::fs::create_dir_all(&proc_dir).unwrap();
        PrimaryOptions { pid_files: Vec::new(), proc_dir, ..PrimaryOptions::default() }
    }

    fn start(&self, opts: PrimaryOptions) -> Result<PrimaryConsoles, PrimaryError> {
        let xs = self.dom0.dom0_client().expect("a dom0 connection");
        let host = &self.dom0.host;
        PrimaryConsoles::start(Platform::new(0, xs, host.evtchn_opener(0), host.grant_mapper(0)), opts)
    }

    /// A guest, introduced to xenstored, with its console built as libxl does.
    fn guest(&self, domid: u16, kind: &str) -> Result<PrimaryConsole> {
        self.guest_with_tty(domid, kind, None)
    }

    /// As [`Setup::guest`], its `console/tty` written before the domain
    /// is introduced (as another daemon that got there first left it):
    /// written after, a running service may have served it already.
    fn guest_with_tty(&self, domid: u16, kind: &str, tty: Option<&str>) -> Result<PrimaryConsole> {
        self.dom0.host.create_domain(domid)?;
        let c = PrimaryConsole::create_with_type(&self.dom0.host, &self.admin, domid, 0, &format!("vm{domid}"), kind)?;
        if let Some(tty) = tty {
            self.admin.write(TxId::NONE, &format!("/local/domain/{domid}/console/tty"), tty.as_bytes())?;
        }
        self.dom0.xenstored.introduce_domain(domid.into());
        Ok(c)
    }

    fn tty(&self, domid: u16) -> Option<String> {
        let v = self.admin.read(TxId::NONE, &format!("/local/domain/{domid}/console/tty")).ok()?;
        Some(String::from_utf8_lossy(&v).into_owned()).filter(|s| !s.is_empty())
    }

    /// Waits for the service to serve `domid`; its pty.
    fn served(&self, svc: &PrimaryConsoles, domid: u16) -> Result<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some((_, tty)) = svc.served().into_iter().find(|(d, _)| *d == domid) {
                return Ok(tty);
            }
            if Instant::now() > deadline {
                bail!("domain {domid} not served: {:?}", svc.served());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out: {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

#[test]
fn every_guest_gets_a_pty_in_its_tty_node_both_ways() -> Result<()> {
    let s = Setup::new("pty")?;
    // One guest before the service starts, one after.
    let mut early = s.guest(1, "xenconsoled")?;
    let svc = s.start(s.options())?;
    let mut late = s.guest(2, "xenconsoled")?;
    for (domid, con) in [(1u16, &mut early), (2, &mut late)] {
        let tty = s.served(&svc, domid)?;
        assert_eq!(s.tty(domid).as_deref(), Some(tty.as_str()), "xl console reads console/tty");
        let mut term = open_tty(&tty)?;
        let out = pattern(30_000, domid as u8);
        let reader = {
            let mut t = term.try_clone()?;
            let n = out.len();
            std::thread::spawn(move || common::read_host(&mut t, n))
        };
        con.page().write_all(&out, WAIT)?;
        assert_eq!(reader.join().expect("reader")?, out);
        term.write_all(b"root\n")?;
        assert_eq!(con.page().read_exact(5, WAIT)?, b"root\n");
    }
    Ok(())
}

#[test]
fn only_xenconsoled_consoles_and_never_a_live_foreign_tty() -> Result<()> {
    let s = Setup::new("types")?;
    let svc = s.start(s.options())?;
    let _qemu = s.guest(3, "ioemu")?;
    // Another daemon's pty, alive (we hold it), and a stale name.
    let other = Host::open(&Connection::Pty)?;
    let theirs = other.tty().expect("a pty").to_string();
    let _taken = s.guest_with_tty(4, "xenconsoled", Some(&theirs))?;
    let _stale = s.guest_with_tty(5, "xenconsoled", Some("/dev/pts/99999"))?;

    let tty5 = s.served(&svc, 5)?;
    assert_ne!(tty5, "/dev/pts/99999", "a stale tty is taken over");
    std::thread::sleep(Duration::from_millis(200));
    let served: Vec<u16> = svc.served().into_iter().map(|(d, _)| d).collect();
    assert_eq!(served, [5], "not the ioemu one, not the one another daemon holds");
    assert_eq!(s.tty(3), None);
    assert_eq!(s.tty(4).as_deref(), Some(theirs.as_str()), "left as the other daemon wrote it");
    drop(svc);

    let forced = s.start(PrimaryOptions { force: true, ..s.options() })?;
    let tty4 = s.served(&forced, 4)?;
    assert_ne!(tty4, theirs, "forced: taken over with a pty of ours");
    Ok(())
}

#[test]
fn a_running_xenconsoled_is_detected_and_refused_unless_forced() -> Result<()> {
    let s = Setup::new("detect")?;
    let pid_file = s.dir.0.join("xenconsoled.pid");
    std::fs::write(&pid_file, format!("{}\n", std::process::id()))?;
    let opts = PrimaryOptions { pid_files: vec![pid_file], ..s.options() };
    match s.start(opts.clone()) {
        Err(PrimaryError::XenconsoledRunning(why)) => assert!(why.contains("xenconsoled.pid"), "{why}"),
        other => bail!("started beside xenconsoled: {other:?}"),
    }
    s.start(PrimaryOptions { force: true, ..opts })?;
    Ok(())
}

#[test]
fn a_guest_without_the_reserved_grant_is_unavailable_and_others_are_served() -> Result<()> {
    let s = Setup::new("nogrant")?;
    let svc = s.start(s.options())?;
    // The nodes, but no page at GNTTAB_RESERVED_CONSOLE.
    s.dom0.host.create_domain(6)?;
    for (node, value) in [("ring-ref", "77"), ("port", "5"), ("type", "xenconsoled"), ("tty", "")] {
        s.admin.write(TxId::NONE, &format!("/local/domain/6/console/{node}"), value.as_bytes())?;
    }
    s.dom0.xenstored.introduce_domain(6);
    let mut fine = s.guest(7, "xenconsoled")?;
    let tty = s.served(&svc, 7)?;
    let mut term = open_tty(&tty)?;
    fine.page().write_all(b"still here", WAIT)?;
    assert_eq!(common::read_host(&mut term, 10)?, b"still here");
    assert!(!svc.served().iter().any(|(d, _)| *d == 6));
    assert_eq!(s.tty(6), None);
    Ok(())
}

#[test]
fn a_released_domain_loses_its_pty_and_a_hostile_one_only_its_own() -> Result<()> {
    let s = Setup::new("release")?;
    let svc = s.start(s.options())?;
    let _gone = s.guest(8, "xenconsoled")?;
    let mut evil = s.guest(9, "xenconsoled")?;
    let mut fine = s.guest(10, "xenconsoled")?;
    let tty8 = s.served(&svc, 8)?;
    s.served(&svc, 9)?;
    let tty10 = s.served(&svc, 10)?;

    s.admin.rm(TxId::NONE, "/local/domain/8")?;
    s.dom0.xenstored.release_domain(8);
    wait_until("domain 8 dropped", || !svc.served().iter().any(|(d, _)| *d == 8))?;
    wait_until("its pty closed", || !std::path::Path::new(&tty8).exists())?;

    evil.page().mapping().store_u32(xen_ring::abi::XENCONS_OUT.prod, 9999, std::sync::atomic::Ordering::Release)?;
    evil.page().notify()?;
    wait_until("domain 9's broken console dropped", || !svc.served().iter().any(|(d, _)| *d == 9))?;

    let mut term = open_tty(&tty10)?;
    fine.page().write_all(b"unharmed", WAIT)?;
    assert_eq!(common::read_host(&mut term, 8)?, b"unharmed");
    Ok(())
}

#[test]
fn guest_output_is_logged_bounded_and_reopened_on_request() -> Result<()> {
    let s = Setup::new("logs")?;
    let logs: PathBuf = s.dir.0.join("logs");
    std::fs::create_dir_all(&logs)?;
    let svc = s.start(PrimaryOptions { log_dir: Some(logs.clone()), log_max: 8192, ..s.options() })?;
    let mut con = s.guest(11, "xenconsoled")?;
    s.served(&svc, 11)?;
    let log = logs.join("guest-vm11.log");

    // Nobody reads the pty: the log has it all the same.
    con.page().write_all(b"boot message\n", WAIT)?;
    wait_until("the log written", || std::fs::read(&log).is_ok_and(|b| b == b"boot message\n"))?;

    std::fs::rename(&log, logs.join("rotated"))?;
    svc.reopen_logs();
    con.page().write_all(b"after rotate\n", WAIT)?;
    wait_until("a new log", || std::fs::read(&log).is_ok_and(|b| b == b"after rotate\n"))?;
    assert_eq!(std::fs::read(logs.join("rotated"))?, b"boot message\n");

    let big = pattern(10_000, 3);
    con.page().write_all(&big, WAIT)?;
    wait_until("the bound kept", || {
        let now = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let old = std::fs::metadata(logs.join("guest-vm11.log.old")).map(|m| m.len()).unwrap_or(0);
        now <= 8192 && now + old == 13 + 10_000
    })?;
    drop(svc);
    let mut f = std::fs::File::open(&log)?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail)?;
    assert!(big.ends_with(&tail), "the newest output in the current file");
    Ok(())
}
