// The lab harness's own check (scenario `smoke`), from the Xen lab recipe:
// proves the booted dom0 has working xenstore, event channels and grants
// independently of xenbackd. Built by run-scenarios with plain rustc.
// Minimal std-only smoke test of the real Xen userspace interfaces in dom0:
// xenstore wire protocol over /dev/xen/xenbus and the xenstored unix socket,
// /dev/xen/evtchn loopback (bind_unbound + bind_interdomain + notify + read),
// /dev/xen/gntalloc -> /dev/xen/gntdev self-grant map and compare.
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;

extern "C" {
    fn ioctl(fd: i32, req: u64, ...) -> i32;
    fn mmap(addr: *mut u8, len: usize, prot: i32, flags: i32, fd: i32, off: i64) -> *mut u8;
    fn munmap(addr: *mut u8, len: usize) -> i32;
}
const fn ioc_none(ty: u8, nr: u8, size: u64) -> u64 { (size << 16) | ((ty as u64) << 8) | nr as u64 }

fn xs_msg(ty: u32, req: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [ty, req, 0u32, payload.len() as u32] { v.extend_from_slice(&x.to_le_bytes()); }
    v.extend_from_slice(payload);
    v
}
fn xs_reply<R: Read>(r: &mut R) -> std::io::Result<(u32, Vec<u8>)> {
    let mut h = [0u8; 16];
    r.read_exact(&mut h)?;
    let ty = u32::from_le_bytes(h[0..4].try_into().unwrap());
    let len = u32::from_le_bytes(h[12..16].try_into().unwrap()) as usize;
    let mut b = vec![0u8; len];
    r.read_exact(&mut b)?;
    Ok((ty, b))
}

fn main() {
    let mut fails = 0;
    // 1. xenstore over /dev/xen/xenbus (XS_READ = 2)
    match OpenOptions::new().read(true).write(true).open("/dev/xen/xenbus") {
        Ok(mut f) => {
            f.write_all(&xs_msg(2, 1, b"/local/domain/0/name\0")).unwrap();
            let (ty, b) = xs_reply(&mut f).unwrap();
            println!("RUST xenbus XS_READ -> type {} value {:?}", ty, String::from_utf8_lossy(&b));
            if ty != 2 || b != b"Domain-0" { fails += 1; }
        }
        Err(e) => { println!("RUST open /dev/xen/xenbus: {}", e); fails += 1; }
    }
    // 2. xenstore over the unix socket (XS_DIRECTORY = 1)
    match std::os::unix::net::UnixStream::connect("/run/xenstored/socket") {
        Ok(mut s) => {
            s.write_all(&xs_msg(1, 7, b"/local/domain/0\0")).unwrap();
            let (ty, b) = xs_reply(&mut s).unwrap();
            let names: Vec<_> = b.split(|c| *c == 0).filter(|x| !x.is_empty()).map(|x| String::from_utf8_lossy(x).into_owned()).collect();
            println!("RUST socket XS_DIRECTORY /local/domain/0 -> type {} {:?}", ty, names);
            if ty != 1 { fails += 1; }
        }
        Err(e) => { println!("RUST connect socket: {}", e); fails += 1; }
    }
    // 3. event channel loopback in dom0
    let ev = OpenOptions::new().read(true).write(true).open("/dev/xen/evtchn").expect("open evtchn");
    let efd = ev.as_raw_fd();
    unsafe {
        let mut unbound: u32 = 0; // remote_domain = 0
        let p = ioctl(efd, ioc_none(b'E', 2, 4), &mut unbound as *mut u32);
        let mut inter: [u32; 2] = [0, p as u32];
        let q = ioctl(efd, ioc_none(b'E', 1, 8), inter.as_mut_ptr());
        let mut n: u32 = q as u32;
        let r = ioctl(efd, ioc_none(b'E', 4, 4), &mut n as *mut u32);
        // Xen sets the new interdomain port (q) pending on bind; the notify on q
        // makes the remote end (p) pending.  Collect until p shows up.
        let mut seen: Vec<u32> = Vec::new();
        let mut buf = [0u8; 64];
        for _ in 0..4 {
            let n = (&ev).read(&mut buf).unwrap_or(0);
            for c in buf[..n].chunks(4) { seen.push(u32::from_le_bytes(c.try_into().unwrap())); }
            let _ = (&ev).write(&buf[..n]); // unmask what we consumed
            if seen.contains(&(p as u32)) { break; }
        }
        println!("RUST evtchn: unbound port {} interdomain port {} notify rc {} -> events {:?}", p, q, r, seen);
        if p <= 0 || q <= 0 || r != 0 || !seen.contains(&(p as u32)) { fails += 1; }
        let mut up: u32 = q as u32; ioctl(efd, ioc_none(b'E', 3, 4), &mut up as *mut u32);
        let mut up: u32 = p as u32; ioctl(efd, ioc_none(b'E', 3, 4), &mut up as *mut u32);
    }
    // 4. gntalloc a page granted to dom0, map it back through gntdev
    let ga = OpenOptions::new().read(true).write(true).open("/dev/xen/gntalloc").expect("open gntalloc");
    let gd = OpenOptions::new().read(true).write(true).open("/dev/xen/gntdev").expect("open gntdev");
    unsafe {
        #[repr(C)] struct Alloc { domid: u16, flags: u16, count: u32, index: u64, gref: u32, _pad: u32 }
        let mut a = Alloc { domid: 0, flags: 1, count: 1, index: 0, gref: 0, _pad: 0 };
        let r = ioctl(ga.as_raw_fd(), ioc_none(b'G', 5, 24), &mut a as *mut Alloc);
        let pa = mmap(std::ptr::null_mut(), 4096, 3, 1, ga.as_raw_fd(), a.index as i64);
        #[repr(C)] struct Map { count: u32, pad: u32, index: u64, domid: u32, gref: u32 }
        let mut m = Map { count: 1, pad: 0, index: 0, domid: 0, gref: a.gref };
        let r2 = ioctl(gd.as_raw_fd(), ioc_none(b'G', 0, 24), &mut m as *mut Map);
        let pm = mmap(std::ptr::null_mut(), 4096, 3, 1, gd.as_raw_fd(), m.index as i64);
        let ok = r == 0 && r2 == 0 && pa as isize != -1 && pm as isize != -1;
        let mut same = false;
        if ok {
            let msg = b"hello through a grant";
            std::ptr::copy_nonoverlapping(msg.as_ptr(), pa, msg.len());
            same = std::slice::from_raw_parts(pm, msg.len()) == msg;
            munmap(pm, 4096); munmap(pa, 4096);
        }
        println!("RUST grant: gntalloc rc {} gref {} ; gntdev map rc {} ; data visible through gntdev mapping: {}", r, a.gref, r2, same);
        if !same { fails += 1; }
        #[repr(C)] struct Unmap { index: u64, count: u32, pad: u32 }
        let mut u = Unmap { index: m.index, count: 1, pad: 0 };
        ioctl(gd.as_raw_fd(), ioc_none(b'G', 1, 16), &mut u as *mut Unmap);
    }
    println!("RUST smoke: {} failures", fails);
    println!("{} smoke: raw xenstore/evtchn/gntdev checks", if fails == 0 { "PASS" } else { "FAIL" });
    std::process::exit(if fails == 0 { 0 } else { 1 });
}
