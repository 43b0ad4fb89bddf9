//! `xenbackd selftest`: checks the real `/dev/xen/evtchn`, `gntdev` and
//! `gntalloc` of a Xen domain (dom0 by default) end to end, with no other
//! domain involved:
//!
//! - an event-channel loopback: a port offered to our own domain on one
//!   handle, bound from a second handle, notified both ways, and re-armed by
//!   unmasking;
//! - pages granted to our own domain through gntalloc, mapped back through
//!   gntdev (read-write and read-only), compared both ways;
//! - unmap notifications of both devices (the byte is cleared);
//! - grant copy to and from a granted page, through `IOCTL_GNTDEV_GRANT_COPY`
//!   where the kernel has it and through the map+copy fallback.
//!
//! One line per check, `PASS name: detail` or `FAIL name: reason`; the exit
//! status is 1 if any check failed.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use evtchn::{EventChannel, Port, XenEvtchn, EVTCHN_PATH};
use gnttab::{
    CopyMode, CopySegment, Gntalloc, Gntdev, GrantMapper, GrantMapping, GrantRef, GrantStatus, GuestPage, UnmapNotify,
    PAGE_SIZE,
};

/// The first reserved domain id (`DOMID_FIRST_RESERVED`, xen/include/public/xen.h).
const DOMID_FIRST_RESERVED: i64 = 0x7FF0;

/// Check /dev/xen/evtchn, gntdev and gntalloc on a real Xen host
///
/// Checks /dev/xen/evtchn, gntdev and gntalloc on a real Xen host: an event
/// channel loopback, pages granted with gntalloc and mapped with gntdev,
/// unmap notifications, and grant copy (kernel ioctl and map+copy
/// fallback). Prints PASS/FAIL per check; exits 1 if any failed.
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct SelftestArgs {
    /// This domain's id, 0 (dom0) to 32751
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = clap::value_parser!(u16).range(0..DOMID_FIRST_RESERVED))]
    domid: u16,
}

/// How long a notified port may take to show up.
const EVENT_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs the self-test.
pub fn run(args: SelftestArgs) -> Result<u8> {
    let domid = args.domid;
    if !Path::new(EVTCHN_PATH).exists() {
        println!("FAIL evtchn: no {EVTCHN_PATH}: not a Xen dom0 (or the xen-evtchn module is not loaded)");
        return Ok(1);
    }
    let mut report = Report::default();
    report.check("evtchn", || evtchn_loopback(domid));
    report.check("evtchn reset", || evtchn_reset(domid));
    report.check("evtchn virq", evtchn_virq);
    report.check("evtchn restrict", || evtchn_restrict(domid));
    let shared = report.check("gntalloc", || share(domid));
    let Some((gntalloc, gntdev, shared, refs)) = shared else {
        println!("FAIL gntdev: skipped, gntalloc failed");
        return Ok(1);
    };
    report.check("gntdev map", || map_both_ways(&gntdev, domid, &shared, &refs));
    report.check("gntdev map read-only", || map_read_only(&gntdev, domid, &shared, &refs));
    report.check("gntdev unmap notify", || gntdev_unmap_notify(&gntdev, domid, &shared, &refs));
    report.check("gntalloc unmap notify", || gntalloc_unmap_notify(&gntalloc, &gntdev, domid));
    match gntdev.copy_mode() {
        CopyMode::Kernel => {
            report.check("grant copy", || grant_copy(&gntdev, domid, &shared, &refs));
        }
        CopyMode::Compat => {
            println!("INFO grant copy: the kernel lacks IOCTL_GNTDEV_GRANT_COPY; only the fallback runs")
        }
    }
    report.check("grant copy fallback", || {
        let mut compat = Gntdev::open()?;
        compat.set_copy_mode(CopyMode::Compat);
        grant_copy(&compat, domid, &shared, &refs)
    });
    drop(shared);
    Ok(report.finish())
}

/// Counts and prints the checks.
#[derive(Default)]
struct Report {
    passed: usize,
    failed: usize,
}

impl Report {
    /// Runs one check, printing its line; returns its value if it passed.
    fn check<T: Detail>(&mut self, name: &str, f: impl FnOnce() -> Result<T>) -> Option<T> {
        match f() {
            Ok(v) => {
                println!("PASS {name}: {}", v.detail());
                self.passed += 1;
                Some(v)
            }
            Err(e) => {
                println!("FAIL {name}: {e:#}");
                self.failed += 1;
                None
            }
        }
    }

    fn finish(self) -> u8 {
        println!("selftest: {} passed, {} failed", self.passed, self.failed);
        u8::from(self.failed > 0)
    }
}

/// What a passed check prints after its name.
trait Detail {
    fn detail(&self) -> String;
}

impl Detail for String {
    fn detail(&self) -> String {
        self.clone()
    }
}

impl Detail for (Gntalloc, Gntdev, GrantMapping, Vec<GrantRef>) {
    fn detail(&self) -> String {
        let refs: Vec<u32> = self.3.iter().map(|r| r.0).collect();
        format!("{} pages granted to ourselves, grant refs {refs:?}", self.3.len())
    }
}

/// Waits until `port` is pending on `h`, taking (and unmasking) whatever
/// else was pending; fails after [`EVENT_TIMEOUT`].
fn expect_event(h: &XenEvtchn, port: Port) -> Result<()> {
    let deadline = std::time::Instant::now() + EVENT_TIMEOUT;
    let mut seen = Vec::new();
    loop {
        let mut got = Vec::new();
        h.take_pending(&mut got)?;
        h.unmask_all(&got)?;
        seen.extend_from_slice(&got);
        if got.contains(&port) {
            return Ok(());
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            bail!("port {port} not pending after {EVENT_TIMEOUT:?} (saw {seen:?})");
        }
        h.wait(Some(left))?;
    }
}

/// Takes everything pending on `h` (after a short wait), unmasking it.
fn drain(h: &XenEvtchn) -> Result<Vec<Port>> {
    h.wait(Some(Duration::from_millis(50)))?;
    let mut got = Vec::new();
    h.take_pending(&mut got)?;
    h.unmask_all(&got)?;
    Ok(got)
}

fn evtchn_loopback(domid: u16) -> Result<String> {
    let a = XenEvtchn::open()?;
    let b = XenEvtchn::open()?;
    let p = a.bind_unbound_port(domid)?;
    let q = b.bind_interdomain(domid, p)?;
    // Xen marks the new interdomain port pending on bind.
    let initial = drain(&b)?;
    drain(&a)?;
    b.notify(q).context("notify b->a")?;
    expect_event(&a, p).context("b->a")?;
    a.notify(p).context("notify a->b")?;
    expect_event(&b, q).context("a->b")?;
    // Unmasked by expect_event: a second notify must arrive again.
    b.notify(q).context("second notify b->a")?;
    expect_event(&a, p).context("b->a after unmask")?;
    ensure!(drain(&a)?.is_empty(), "a port stayed pending after it was taken");
    b.unbind(q)?;
    a.unbind(p)?;
    let err = a.notify(p).err().context("notify of an unbound port succeeded")?;
    ensure!(err.errno() == Some(nix::libc::ENOTCONN), "notify of an unbound port: {err:#}, not ENOTCONN");
    Ok(format!(
        "loopback dom{domid} port {p} <-> port {q}, pending on bind {initial:?}, notify both ways, unmask re-arms, unbind"
    ))
}

fn evtchn_reset(domid: u16) -> Result<String> {
    let a = XenEvtchn::open()?;
    let b = XenEvtchn::open()?;
    let p = a.bind_unbound_port(domid)?;
    let q = b.bind_interdomain(domid, p)?;
    b.notify(q)?;
    a.wait(Some(EVENT_TIMEOUT))?;
    a.reset()?;
    let mut after = Vec::new();
    a.take_pending(&mut after)?;
    ensure!(after.is_empty(), "ports pending after IOCTL_EVTCHN_RESET: {after:?}");
    Ok("IOCTL_EVTCHN_RESET empties the queue of fired ports".into())
}

/// `VIRQ_TBUF` (Xen's `public/xen.h`): a global virq for xentrace, which
/// nothing else in a plain dom0 binds.
const VIRQ_TBUF: u32 = 4;

fn evtchn_virq() -> Result<String> {
    let a = XenEvtchn::open()?;
    let port = a.bind_virq(VIRQ_TBUF).context("VIRQ_TBUF")?;
    a.unbind(port)?;
    Ok(format!("VIRQ_TBUF bound to port {port}, unbound"))
}

fn evtchn_restrict(domid: u16) -> Result<String> {
    // The kernel refuses domain 0 as the restriction; any other id will do.
    let other = if domid == 1 { 2 } else { 1 };
    let a = XenEvtchn::open()?;
    a.restrict_domid(other)?;
    let err = a.bind_unbound_port(domid).err().context("a restricted handle offered a port")?;
    ensure!(err.errno() == Some(nix::libc::EACCES), "restricted bind_unbound_port: {err:#}, not EACCES");
    Ok(format!("handle restricted to dom{other} may not offer ports (EACCES)"))
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn read(m: &GrantMapping, offset: usize, len: usize) -> Result<Vec<u8>> {
    let mut v = vec![0u8; len];
    m.read(offset, &mut v)?;
    Ok(v)
}

fn share(domid: u16) -> Result<(Gntalloc, Gntdev, GrantMapping, Vec<GrantRef>)> {
    let gntalloc = Gntalloc::open()?;
    let gntdev = Gntdev::open()?;
    let (shared, refs) = gntalloc.share(domid, 2, true)?;
    ensure!(refs.len() == 2 && shared.len() == 2 * PAGE_SIZE, "got {} refs, {} bytes", refs.len(), shared.len());
    ensure!(read(&shared, 0, shared.len())?.iter().all(|&b| b == 0), "new pages are not zeroed");
    Ok((gntalloc, gntdev, shared, refs))
}

fn map_both_ways(gntdev: &Gntdev, domid: u16, shared: &GrantMapping, refs: &[GrantRef]) -> Result<String> {
    let mine = pattern(1, 2 * PAGE_SIZE);
    shared.write(0, &mine)?;
    let m = gntdev.map(domid, refs, true)?;
    ensure!(read(&m, 0, m.len())? == mine, "gntalloc's bytes differ through the gntdev mapping");
    let theirs = pattern(2, 100);
    m.write(PAGE_SIZE + 7, &theirs)?;
    ensure!(read(shared, PAGE_SIZE + 7, 100)? == theirs, "bytes written through gntdev differ in gntalloc's pages");
    let (offset, count) = gntdev.offset_for_vaddr(m.as_ptr())?;
    ensure!(count == 2, "IOCTL_GNTDEV_GET_OFFSET_FOR_VADDR says {count} pages, not 2");
    Ok(format!("2 refs in one mapping at device offset {offset:#x}, bytes equal both ways"))
}

fn map_read_only(gntdev: &Gntdev, domid: u16, shared: &GrantMapping, refs: &[GrantRef]) -> Result<String> {
    let mine = pattern(3, 64);
    shared.write(32, &mine)?;
    let m = gntdev.map(domid, &refs[..1], false)?;
    ensure!(!m.is_writable(), "read-only mapping reports writable");
    ensure!(read(&m, 32, 64)? == mine, "bytes differ through the read-only mapping");
    ensure!(m.write(0, &[1]).is_err(), "write to the read-only mapping was accepted");
    Ok("mapped with PROT_READ, bytes equal".into())
}

fn gntdev_unmap_notify(gntdev: &Gntdev, domid: u16, shared: &GrantMapping, refs: &[GrantRef]) -> Result<String> {
    const AT: usize = 123;
    shared.write(AT, &[0xaa])?;
    let m = gntdev.map(domid, &refs[..1], true)?;
    gntdev.set_unmap_notify(&m, AT, UnmapNotify { clear_byte: true, event: None })?;
    ensure!(read(shared, AT, 1)? == [0xaa], "byte changed before unmap");
    drop(m);
    ensure!(read(shared, AT, 1)? == [0], "byte not cleared when the gntdev mapping went away");
    Ok("UNMAP_NOTIFY_CLEAR_BYTE cleared the byte on unmap".into())
}

fn gntalloc_unmap_notify(gntalloc: &Gntalloc, gntdev: &Gntdev, domid: u16) -> Result<String> {
    const AT: usize = 77;
    let (page, refs) = gntalloc.share(domid, 1, true)?;
    page.write(AT, &[0x55])?;
    let m = gntdev.map(domid, &refs, false)?;
    gntalloc.set_unmap_notify(&page, AT, UnmapNotify { clear_byte: true, event: None })?;
    ensure!(read(&m, AT, 1)? == [0x55], "byte not visible through gntdev");
    drop(page);
    ensure!(read(&m, AT, 1)? == [0], "byte not cleared when gntalloc's mapping went away");
    Ok("UNMAP_NOTIFY_CLEAR_BYTE cleared the byte, seen through gntdev".into())
}

fn grant_copy(gntdev: &Gntdev, domid: u16, shared: &GrantMapping, refs: &[GrantRef]) -> Result<String> {
    shared.fill(0, shared.len(), 0)?;
    let out = pattern(4, 300);
    let theirs = pattern(5, 200);
    shared.write(PAGE_SIZE + 1000, &theirs)?;
    let mut back = vec![0u8; 200];
    let mut segs = [
        CopySegment::ToGuest { src: &out, dst: GuestPage { domid, gref: refs[0], offset: 3796 } },
        CopySegment::FromGuest { src: GuestPage { domid, gref: refs[1], offset: 1000 }, dst: &mut back },
    ];
    let mut status = [GrantStatus::GeneralError; 2];
    gntdev.copy(&mut segs, &mut status)?;
    ensure!(status == [GrantStatus::Okay; 2], "per-segment status {status:?}");
    ensure!(read(shared, 3796, 300)? == out, "bytes copied to the page differ");
    ensure!(back == theirs, "bytes copied from the page differ");
    ensure!(read(shared, 3795, 1)? == [0], "copy wrote before its offset");
    // A grant that does not exist fails its own segment only.
    let mut one = [0u8; 8];
    let mut bad =
        [CopySegment::FromGuest { src: GuestPage { domid, gref: GrantRef(u32::MAX - 1), offset: 0 }, dst: &mut one }];
    let mut st = [GrantStatus::Okay];
    gntdev.copy(&mut bad, &mut st)?;
    ensure!(!st[0].is_ok(), "copy from a nonexistent grant succeeded");
    Ok(format!("via {}: 300 bytes to a page, 200 back, bad grant gives {:?}", gntdev.copy_mode(), st[0]))
}
