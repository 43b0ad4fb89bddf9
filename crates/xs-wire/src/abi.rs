//! The xenstore wire ABI, from Xen's `xen/include/public/io/xs_wire.h`.
//!
//! The header is written in the host's byte order by every Xen implementation;
//! Xen runs only on little-endian hosts, so the fields are little-endian here.

use zerocopy::little_endian::U32;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `struct xsd_sockmsg` (`io/xs_wire.h`): the 16-byte header before every payload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct XsdSockmsg {
    /// `uint32_t type`: an `enum xsd_sockmsg_type` value.
    pub msg_type: U32,
    /// `uint32_t req_id`: chosen by the client, echoed in the reply.
    pub req_id: U32,
    /// `uint32_t tx_id`: transaction id, 0 outside a transaction.
    pub tx_id: U32,
    /// `uint32_t len`: payload length in bytes.
    pub len: U32,
}

const _: () = assert!(core::mem::size_of::<XsdSockmsg>() == 16);

/// Size of [`XsdSockmsg`] on the wire.
pub const HEADER_LEN: usize = 16;

/// `#define XENSTORE_PAYLOAD_MAX 4096`: the largest payload xenstored accepts.
pub const XENSTORE_PAYLOAD_MAX: usize = 4096;
/// `#define XENSTORE_ABS_PATH_MAX 3072`: longest absolute path.
pub const XENSTORE_ABS_PATH_MAX: usize = 3072;
/// `#define XENSTORE_REL_PATH_MAX 2048`: longest path relative to a domain's home.
pub const XENSTORE_REL_PATH_MAX: usize = 2048;

/// `#define XENSTORE_RING_SIZE 1024` (`struct xenstore_domain_interface`).
pub const XENSTORE_RING_SIZE: usize = 1024;
/// `#define XENSTORE_SERVER_FEATURE_RECONNECTION 1`.
pub const XENSTORE_SERVER_FEATURE_RECONNECTION: u32 = 1;
/// `#define XENSTORE_SERVER_FEATURE_ERROR 2`.
pub const XENSTORE_SERVER_FEATURE_ERROR: u32 = 2;

/// `enum xs_watch_type`: index of the path in a `XS_WATCH_EVENT` payload.
pub const XS_WATCH_PATH: usize = 0;
/// `enum xs_watch_type`: index of the token in a `XS_WATCH_EVENT` payload.
pub const XS_WATCH_TOKEN: usize = 1;

/// A message type (`enum xsd_sockmsg_type`). A newtype rather than an enum so
/// that a type this crate does not know still round-trips (xenstored answers
/// unknown types with `ENOSYS`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsgType(pub u32);

macro_rules! msg_types {
    ($($name:ident = $val:expr, $text:expr;)*) => {
        impl MsgType {
            $(
                #[doc = concat!("`XS_", $text, "` (", stringify!($val), ").")]
                pub const $name: MsgType = MsgType($val);
            )*
            /// Every valid type, in numeric order (20, the removed `XS_RESTRICT`, is absent).
            pub const ALL: &'static [MsgType] = &[$(MsgType::$name),*];

            /// The `XS_*` name without its prefix, or `None` for an invalid type.
            pub fn name(self) -> Option<&'static str> {
                match self {
                    $(MsgType::$name => Some($text),)*
                    _ => None,
                }
            }
        }
    };
}

msg_types! {
    CONTROL = 0, "CONTROL";
    DIRECTORY = 1, "DIRECTORY";
    READ = 2, "READ";
    GET_PERMS = 3, "GET_PERMS";
    WATCH = 4, "WATCH";
    UNWATCH = 5, "UNWATCH";
    TRANSACTION_START = 6, "TRANSACTION_START";
    TRANSACTION_END = 7, "TRANSACTION_END";
    INTRODUCE = 8, "INTRODUCE";
    RELEASE = 9, "RELEASE";
    GET_DOMAIN_PATH = 10, "GET_DOMAIN_PATH";
    WRITE = 11, "WRITE";
    MKDIR = 12, "MKDIR";
    RM = 13, "RM";
    SET_PERMS = 14, "SET_PERMS";
    WATCH_EVENT = 15, "WATCH_EVENT";
    ERROR = 16, "ERROR";
    IS_DOMAIN_INTRODUCED = 17, "IS_DOMAIN_INTRODUCED";
    RESUME = 18, "RESUME";
    SET_TARGET = 19, "SET_TARGET";
    RESET_WATCHES = 21, "RESET_WATCHES";
    DIRECTORY_PART = 22, "DIRECTORY_PART";
    GET_FEATURE = 23, "GET_FEATURE";
    SET_FEATURE = 24, "SET_FEATURE";
    GET_QUOTA = 25, "GET_QUOTA";
    SET_QUOTA = 26, "SET_QUOTA";
}

impl MsgType {
    /// `XS_RESTRICT` (20) was removed from the protocol; it is never valid.
    pub const RESTRICT_REMOVED: MsgType = MsgType(20);
    /// `XS_TYPE_COUNT`: one past the highest type.
    pub const TYPE_COUNT: u32 = 27;
    /// `XS_INVALID = 0xffff`.
    pub const INVALID: MsgType = MsgType(0xffff);

    /// Whether this is a type of the protocol (0..=26 except 20).
    pub fn is_valid(self) -> bool {
        self.name().is_some()
    }
}

impl core::fmt::Debug for MsgType {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.name() {
            Some(n) => write!(f, "XS_{n}"),
            None => write!(f, "XS_INVALID({})", self.0),
        }
    }
}

impl core::fmt::Display for MsgType {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn header_layout_matches_xs_wire_h() {
        assert_eq!(offset_of!(XsdSockmsg, msg_type), 0);
        assert_eq!(offset_of!(XsdSockmsg, req_id), 4);
        assert_eq!(offset_of!(XsdSockmsg, tx_id), 8);
        assert_eq!(offset_of!(XsdSockmsg, len), 12);
        assert_eq!(core::mem::size_of::<XsdSockmsg>(), HEADER_LEN);
    }

    #[test]
    fn message_types_have_xs_wire_h_numbers() {
        assert_eq!(MsgType::ALL.len(), 26);
        for (i, t) in MsgType::ALL.iter().enumerate() {
            let expected = if i < 20 { i as u32 } else { i as u32 + 1 };
            assert_eq!(t.0, expected, "{t:?}");
        }
        assert_eq!(MsgType::RESET_WATCHES.0, MsgType::SET_TARGET.0 + 2);
        assert!(!MsgType::RESTRICT_REMOVED.is_valid());
        assert!(!MsgType(MsgType::TYPE_COUNT).is_valid());
        assert!(!MsgType::INVALID.is_valid());
    }
}
