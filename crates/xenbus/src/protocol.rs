//! The ring ABI a frontend announces in its `protocol` node
//! (`xen/include/public/io/protocols.h`), as every device class reads it.

/// A `protocol` node naming an ABI this build does not serve (`arm-abi` on
/// a backend not built for Arm).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("Unknown protocol {0:?}{}", if .0 == "arm-abi" { " (an Arm guest's ABI; this backend is not built for Arm)" } else { "" })]
pub struct UnknownProtocol(pub String);

/// The ring ABI a frontend announces in its `protocol` node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// No `protocol` node: the backend's own ABI.
    Native,
    /// `x86_32-abi` (`XEN_IO_PROTO_ABI_X86_32`).
    X86_32,
    /// `x86_64-abi` (`XEN_IO_PROTO_ABI_X86_64`).
    X86_64,
    /// `arm-abi` (`XEN_IO_PROTO_ABI_ARM`): Linux writes it on Arm and arm64,
    /// where it is `XEN_IO_PROTO_ABI_NATIVE`. Its ring layouts are
    /// x86_64's. Accepted only by a backend built for Arm: no x86 host runs
    /// Arm guests.
    Arm,
}

/// Whether `arm-abi` is this build's native ABI (`io/protocols.h`).
const ARM_IS_NATIVE: bool = cfg!(any(target_arch = "arm", target_arch = "aarch64"));

impl Protocol {
    /// Parses the node's value; an absent node is [`Protocol::Native`], an
    /// unknown name an error (the device cannot be served).
    pub fn parse(value: Option<&str>) -> Result<Self, UnknownProtocol> {
        Self::parse_bytes(value.map(str::as_bytes))
    }

    /// [`Protocol::parse`] on the node's bytes, as Linux's blkback reads it
    /// (`xenbus_scanf(..., "%63s")`, [`crate::scan::scan_word`]): the first
    /// word counts (`x86_32-abi\0garbage` and `x86_32-abi trailing` are
    /// `x86_32-abi`), an empty value is native, and a value of only white
    /// space is an unknown (empty) protocol, as in Linux.
    pub fn parse_bytes(value: Option<&[u8]>) -> Result<Self, UnknownProtocol> {
        match value.and_then(|v| crate::scan::scan_word(v, 63)) {
            None => Ok(Protocol::Native),
            Some(b"x86_32-abi") => Ok(Protocol::X86_32),
            Some(b"x86_64-abi") => Ok(Protocol::X86_64),
            Some(b"arm-abi") if ARM_IS_NATIVE => Ok(Protocol::Arm),
            Some(other) => Err(UnknownProtocol(String::from_utf8_lossy(other).into_owned())),
        }
    }

    /// The name written in the node (`None` for native).
    pub fn name(self) -> Option<&'static str> {
        match self {
            Protocol::Native => None,
            Protocol::X86_32 => Some("x86_32-abi"),
            Protocol::X86_64 => Some("x86_64-abi"),
            Protocol::Arm => Some("arm-abi"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_absent_is_native_and_unknown_is_error() {
        assert_eq!(Protocol::parse(None).unwrap(), Protocol::Native);
        assert_eq!(Protocol::parse(Some("x86_32-abi")).unwrap(), Protocol::X86_32);
        assert_eq!(Protocol::parse(Some("x86_64-abi")).unwrap(), Protocol::X86_64);
        assert!(matches!(Protocol::parse(Some("mips-abi")), Err(UnknownProtocol(p)) if p == "mips-abi"));
        assert!(matches!(Protocol::parse(Some("native")), Err(UnknownProtocol(_))));
    }

    /// Values Linux's blkback accepts with `%63s` (issue 13).
    #[test]
    fn protocol_is_read_as_linux_reads_it() {
        assert_eq!(Protocol::parse_bytes(Some(b"x86_32-abi\0garbage")).unwrap(), Protocol::X86_32);
        assert_eq!(Protocol::parse(Some("x86_32-abi trailing")).unwrap(), Protocol::X86_32);
        assert_eq!(Protocol::parse(Some("  x86_64-abi\n")).unwrap(), Protocol::X86_64);
        assert_eq!(Protocol::parse(Some("")).unwrap(), Protocol::Native);
        assert_eq!(Protocol::parse_bytes(Some(b"\0x86_32-abi")).unwrap(), Protocol::Native);
        assert!(matches!(Protocol::parse(Some("   ")), Err(UnknownProtocol(p)) if p.is_empty()));
        assert!(Protocol::parse_bytes(Some(b"x86_32-abi\xff")).is_err());
    }

    #[test]
    fn arm_abi_is_accepted_only_where_it_is_native() {
        let p = Protocol::parse(Some("arm-abi"));
        if cfg!(any(target_arch = "arm", target_arch = "aarch64")) {
            assert_eq!(p.unwrap(), Protocol::Arm);
            assert_eq!(Protocol::Arm.name(), Some("arm-abi"));
        } else {
            let err = p.unwrap_err();
            assert!(matches!(&err, UnknownProtocol(p) if p == "arm-abi"));
            assert!(err.to_string().contains("Arm"), "{err}");
        }
    }
}
