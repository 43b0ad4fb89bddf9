//! The kernel ABI of `/dev/xen/evtchn`: Linux's `include/uapi/xen/evtchn.h`.
//!
//! Every ioctl of this device is `_IOC(_IOC_NONE, 'E', nr, sizeof(struct))`:
//! direction "none" but with a size, which none of nix's `request_code_*`
//! macros produce, so the numbers are built with nix's `ioc!` (the macro
//! behind them, which knows each architecture's bit layout). The test
//! `tests/c_headers.rs` checks every size, offset and number below against
//! the machine's C header.

use std::mem::size_of;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// An ioctl number: `_IOC(_IOC_NONE, 'E', nr, size)`.
const fn ioc_none(nr: u32, size: usize) -> u32 {
    nix::ioc!(nix::sys::ioctl::NONE, b'E', nr, size) as u32
}

/// The argument size encoded in an ioctl number (`_IOC_SIZE`).
pub const fn ioc_size(request: u32) -> usize {
    ((request as nix::sys::ioctl::ioctl_num_type >> nix::sys::ioctl::SIZESHIFT) & nix::sys::ioctl::SIZEMASK) as usize
}

/// `struct ioctl_evtchn_bind_virq` (`xen/evtchn.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlEvtchnBindVirq {
    /// `unsigned int virq`.
    pub virq: u32,
}

/// `#define IOCTL_EVTCHN_BIND_VIRQ _IOC(_IOC_NONE, 'E', 0, sizeof(struct ioctl_evtchn_bind_virq))`
pub const IOCTL_EVTCHN_BIND_VIRQ: u32 = ioc_none(0, size_of::<IoctlEvtchnBindVirq>());

/// `struct ioctl_evtchn_bind_interdomain` (`xen/evtchn.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlEvtchnBindInterdomain {
    /// `unsigned int remote_domain`.
    pub remote_domain: u32,
    /// `unsigned int remote_port`.
    pub remote_port: u32,
}

/// `#define IOCTL_EVTCHN_BIND_INTERDOMAIN _IOC(_IOC_NONE, 'E', 1, sizeof(struct ioctl_evtchn_bind_interdomain))`
pub const IOCTL_EVTCHN_BIND_INTERDOMAIN: u32 = ioc_none(1, size_of::<IoctlEvtchnBindInterdomain>());

/// `struct ioctl_evtchn_bind_unbound_port` (`xen/evtchn.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlEvtchnBindUnboundPort {
    /// `unsigned int remote_domain`.
    pub remote_domain: u32,
}

/// `#define IOCTL_EVTCHN_BIND_UNBOUND_PORT _IOC(_IOC_NONE, 'E', 2, sizeof(struct ioctl_evtchn_bind_unbound_port))`
pub const IOCTL_EVTCHN_BIND_UNBOUND_PORT: u32 = ioc_none(2, size_of::<IoctlEvtchnBindUnboundPort>());

/// `struct ioctl_evtchn_unbind` (`xen/evtchn.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlEvtchnUnbind {
    /// `unsigned int port`.
    pub port: u32,
}

/// `#define IOCTL_EVTCHN_UNBIND _IOC(_IOC_NONE, 'E', 3, sizeof(struct ioctl_evtchn_unbind))`
pub const IOCTL_EVTCHN_UNBIND: u32 = ioc_none(3, size_of::<IoctlEvtchnUnbind>());

/// `struct ioctl_evtchn_notify` (`xen/evtchn.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlEvtchnNotify {
    /// `unsigned int port`.
    pub port: u32,
}

/// `#define IOCTL_EVTCHN_NOTIFY _IOC(_IOC_NONE, 'E', 4, sizeof(struct ioctl_evtchn_notify))`
pub const IOCTL_EVTCHN_NOTIFY: u32 = ioc_none(4, size_of::<IoctlEvtchnNotify>());

/// `#define IOCTL_EVTCHN_RESET _IOC(_IOC_NONE, 'E', 5, 0)`: clears the
/// buffer of pending ports and its overflow condition.
pub const IOCTL_EVTCHN_RESET: u32 = ioc_none(5, 0);

/// `struct ioctl_evtchn_restrict_domid` (`xen/evtchn.h`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlEvtchnRestrictDomid {
    /// `domid_t domid` (`uint16_t`).
    pub domid: u16,
}

/// `#define IOCTL_EVTCHN_RESTRICT_DOMID _IOC(_IOC_NONE, 'E', 6, sizeof(struct ioctl_evtchn_restrict_domid))`
pub const IOCTL_EVTCHN_RESTRICT_DOMID: u32 = ioc_none(6, size_of::<IoctlEvtchnRestrictDomid>());

/// `struct ioctl_evtchn_bind` (`xen/evtchn.h` of kernels newer than 6.1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoctlEvtchnBind {
    /// `unsigned int port`.
    pub port: u32,
}

/// `#define IOCTL_EVTCHN_BIND_STATIC _IOC(_IOC_NONE, 'E', 7, sizeof(struct ioctl_evtchn_bind))`
/// (kernels newer than 6.1; older ones refuse it as an unknown ioctl, and their header lacks it).
pub const IOCTL_EVTCHN_BIND_STATIC: u32 = ioc_none(7, size_of::<IoctlEvtchnBind>());

/// `evtchn_port_t` as read from and written to the device, in native byte order.
pub const PORT_SIZE: usize = size_of::<u32>();

const _: () = assert!(size_of::<IoctlEvtchnBindVirq>() == 4);
const _: () = assert!(size_of::<IoctlEvtchnBindInterdomain>() == 8);
const _: () = assert!(size_of::<IoctlEvtchnBindUnboundPort>() == 4);
const _: () = assert!(size_of::<IoctlEvtchnUnbind>() == 4);
const _: () = assert!(size_of::<IoctlEvtchnNotify>() == 4);
const _: () = assert!(size_of::<IoctlEvtchnRestrictDomid>() == 2);
const _: () = assert!(size_of::<IoctlEvtchnBind>() == 4);

/// The ioctl numbers by their C names, for comparing with the C header.
pub const IOCTLS: [(&str, u32); 8] = [
    ("IOCTL_EVTCHN_BIND_VIRQ", IOCTL_EVTCHN_BIND_VIRQ),
    ("IOCTL_EVTCHN_BIND_INTERDOMAIN", IOCTL_EVTCHN_BIND_INTERDOMAIN),
    ("IOCTL_EVTCHN_BIND_UNBOUND_PORT", IOCTL_EVTCHN_BIND_UNBOUND_PORT),
    ("IOCTL_EVTCHN_UNBIND", IOCTL_EVTCHN_UNBIND),
    ("IOCTL_EVTCHN_NOTIFY", IOCTL_EVTCHN_NOTIFY),
    ("IOCTL_EVTCHN_RESET", IOCTL_EVTCHN_RESET),
    ("IOCTL_EVTCHN_RESTRICT_DOMID", IOCTL_EVTCHN_RESTRICT_DOMID),
    ("IOCTL_EVTCHN_BIND_STATIC", IOCTL_EVTCHN_BIND_STATIC),
];

/// Sizes and field offsets by C name (`struct.field`, or `struct` for the
/// size), for comparing with the C header.
pub fn layout() -> Vec<(&'static str, usize)> {
    use std::mem::offset_of;
    vec![
        ("ioctl_evtchn_bind_virq", size_of::<IoctlEvtchnBindVirq>()),
        ("ioctl_evtchn_bind_virq.virq", offset_of!(IoctlEvtchnBindVirq, virq)),
        ("ioctl_evtchn_bind_interdomain", size_of::<IoctlEvtchnBindInterdomain>()),
        ("ioctl_evtchn_bind_interdomain.remote_domain", offset_of!(IoctlEvtchnBindInterdomain, remote_domain)),
        ("ioctl_evtchn_bind_interdomain.remote_port", offset_of!(IoctlEvtchnBindInterdomain, remote_port)),
        ("ioctl_evtchn_bind_unbound_port", size_of::<IoctlEvtchnBindUnboundPort>()),
        ("ioctl_evtchn_bind_unbound_port.remote_domain", offset_of!(IoctlEvtchnBindUnboundPort, remote_domain)),
        ("ioctl_evtchn_unbind", size_of::<IoctlEvtchnUnbind>()),
        ("ioctl_evtchn_unbind.port", offset_of!(IoctlEvtchnUnbind, port)),
        ("ioctl_evtchn_notify", size_of::<IoctlEvtchnNotify>()),
        ("ioctl_evtchn_notify.port", offset_of!(IoctlEvtchnNotify, port)),
        ("ioctl_evtchn_restrict_domid", size_of::<IoctlEvtchnRestrictDomid>()),
        ("ioctl_evtchn_restrict_domid.domid", offset_of!(IoctlEvtchnRestrictDomid, domid)),
        ("ioctl_evtchn_bind", size_of::<IoctlEvtchnBind>()),
        ("ioctl_evtchn_bind.port", offset_of!(IoctlEvtchnBind, port)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn interdomain_fields_are_domain_then_port() {
        assert_eq!(offset_of!(IoctlEvtchnBindInterdomain, remote_domain), 0);
        assert_eq!(offset_of!(IoctlEvtchnBindInterdomain, remote_port), 4);
        let b = IoctlEvtchnBindInterdomain { remote_domain: 1, remote_port: 2 };
        assert_eq!(b.as_bytes(), [1u32.to_ne_bytes(), 2u32.to_ne_bytes()].concat());
    }

    #[test]
    fn ioctl_numbers_are_ioc_none_with_the_struct_size() {
        // The generic layout (x86, arm): dir in bits 30-31 (0 = none), size
        // in bits 16-29, type in 8-15, number in 0-7.
        #[cfg(any(target_arch = "x86", target_arch = "x86_64", target_arch = "arm", target_arch = "aarch64"))]
        {
            assert_eq!(IOCTL_EVTCHN_BIND_VIRQ, 0x0004_4500);
            assert_eq!(IOCTL_EVTCHN_BIND_INTERDOMAIN, 0x0008_4501);
            assert_eq!(IOCTL_EVTCHN_RESET, 0x0000_4505);
            assert_eq!(IOCTL_EVTCHN_RESTRICT_DOMID, 0x0002_4506);
        }
        for (i, (name, nr)) in IOCTLS.iter().enumerate() {
            assert_eq!(*nr & 0xff, i as u32, "{name}");
            assert_eq!((*nr >> 8) & 0xff, u32::from(b'E'), "{name}");
        }
    }

    #[test]
    fn restrict_domid_is_a_bare_u16() {
        assert_eq!(offset_of!(IoctlEvtchnRestrictDomid, domid), 0);
        assert_eq!(IoctlEvtchnRestrictDomid { domid: 0x1234 }.as_bytes(), 0x1234u16.to_ne_bytes());
    }
}
