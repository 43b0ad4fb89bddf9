//! Compares `evtchn::abi` with Linux's `<xen/evtchn.h>` (from linux-libc-dev),
//! compiled by the machine's C compiler: every struct size, field offset and
//! ioctl number. `IOCTL_EVTCHN_BIND_STATIC` is only compared where the header
//! has it (kernels newer than 6.1).

use std::collections::HashMap;
use std::process::Command;

use evtchn::abi;

const HEADER: &str = "/usr/include/xen/evtchn.h";

const PROGRAM: &str = r#"
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include <linux/ioctl.h>
typedef uint16_t domid_t;
#include <xen/evtchn.h>
#define S(t) printf("%s %lu\n", #t, (unsigned long)sizeof(struct t))
#define O(t, f) printf("%s.%s %lu\n", #t, #f, (unsigned long)offsetof(struct t, f))
#define N(n) printf("%s %lu\n", #n, (unsigned long)(n))
int main(void) {
    S(ioctl_evtchn_bind_virq); O(ioctl_evtchn_bind_virq, virq);
    S(ioctl_evtchn_bind_interdomain);
    O(ioctl_evtchn_bind_interdomain, remote_domain); O(ioctl_evtchn_bind_interdomain, remote_port);
    S(ioctl_evtchn_bind_unbound_port); O(ioctl_evtchn_bind_unbound_port, remote_domain);
    S(ioctl_evtchn_unbind); O(ioctl_evtchn_unbind, port);
    S(ioctl_evtchn_notify); O(ioctl_evtchn_notify, port);
    S(ioctl_evtchn_restrict_domid); O(ioctl_evtchn_restrict_domid, domid);
    N(IOCTL_EVTCHN_BIND_VIRQ); N(IOCTL_EVTCHN_BIND_INTERDOMAIN); N(IOCTL_EVTCHN_BIND_UNBOUND_PORT);
    N(IOCTL_EVTCHN_UNBIND); N(IOCTL_EVTCHN_NOTIFY); N(IOCTL_EVTCHN_RESET); N(IOCTL_EVTCHN_RESTRICT_DOMID);
#ifdef IOCTL_EVTCHN_BIND_STATIC
    S(ioctl_evtchn_bind); O(ioctl_evtchn_bind, port);
    N(IOCTL_EVTCHN_BIND_STATIC);
#endif
    return 0;
}
"#;

/// Compiles and runs the C program; `None` (with the reason printed) where
/// the machine has no header or no C compiler.
fn c_values(tag: &str) -> Option<HashMap<String, usize>> {
    if !std::path::Path::new(HEADER).exists() {
        eprintln!("SKIP: {HEADER} absent (install linux-libc-dev)");
        return None;
    }
    let dir = std::env::temp_dir().join(format!("evtchn-abi-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (src, exe) = (dir.join("abi.c"), dir.join("abi"));
    std::fs::write(&src, PROGRAM).unwrap();
    let cc = match Command::new("cc").arg("-Wall").arg("-o").arg(&exe).arg(&src).output() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("SKIP: no C compiler ({e})");
            return None;
        }
    };
    assert!(cc.status.success(), "cc failed: {}", String::from_utf8_lossy(&cc.stderr));
    let out = Command::new(&exe).output().unwrap();
    assert!(out.status.success());
    std::fs::remove_dir_all(&dir).unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    Some(
        text.lines()
            .map(|l| {
                let (k, v) = l.split_once(' ').unwrap();
                (k.to_string(), v.parse().unwrap())
            })
            .collect(),
    )
}

#[test]
fn struct_layouts_match_linux_xen_evtchn_h() {
    let Some(c) = c_values("layout") else { return };
    let mut compared = 0;
    for (name, rust) in abi::layout() {
        let is_static = name.starts_with("ioctl_evtchn_bind") && !name.contains("_bind_");
        match c.get(name) {
            Some(&v) => {
                assert_eq!(rust, v, "{name}: Rust {rust}, C {v}");
                compared += 1;
            }
            None if is_static => eprintln!("{name}: not in this kernel's header"),
            None => panic!("{name} missing from the C output"),
        }
    }
    assert!(compared >= 13, "only {compared} layout values compared");
}

#[test]
fn ioctl_numbers_match_linux_xen_evtchn_h() {
    let Some(c) = c_values("ioctls") else { return };
    for (name, rust) in abi::IOCTLS {
        match c.get(name) {
            Some(&v) => assert_eq!(rust as usize, v, "{name}: Rust {rust:#x}, C {v:#x}"),
            None if name == "IOCTL_EVTCHN_BIND_STATIC" => eprintln!("{name}: not in this kernel's header"),
            None => panic!("{name} missing from the C output"),
        }
    }
}
