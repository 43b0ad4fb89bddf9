//! Errors: the fifteen `xsd_errors` of `io/xs_wire.h`, and this crate's own.

use std::io;

/// An error xenstored reports in an `XS_ERROR` reply (`struct xsd_errors`).
/// The wire form is the errno name, NUL-terminated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum XsErrno {
    EINVAL,
    EACCES,
    EEXIST,
    EISDIR,
    ENOENT,
    ENOMEM,
    ENOSPC,
    EIO,
    ENOTEMPTY,
    ENOSYS,
    EROFS,
    EBUSY,
    EAGAIN,
    EISCONN,
    E2BIG,
}

impl XsErrno {
    /// Every error, in the order of `xsd_errors[]`.
    pub const ALL: [XsErrno; 15] = [
        XsErrno::EINVAL,
        XsErrno::EACCES,
        XsErrno::EEXIST,
        XsErrno::EISDIR,
        XsErrno::ENOENT,
        XsErrno::ENOMEM,
        XsErrno::ENOSPC,
        XsErrno::EIO,
        XsErrno::ENOTEMPTY,
        XsErrno::ENOSYS,
        XsErrno::EROFS,
        XsErrno::EBUSY,
        XsErrno::EAGAIN,
        XsErrno::EISCONN,
        XsErrno::E2BIG,
    ];

    /// The string on the wire (without the NUL).
    pub fn as_str(self) -> &'static str {
        match self {
            XsErrno::EINVAL => "EINVAL",
            XsErrno::EACCES => "EACCES",
            XsErrno::EEXIST => "EEXIST",
            XsErrno::EISDIR => "EISDIR",
            XsErrno::ENOENT => "ENOENT",
            XsErrno::ENOMEM => "ENOMEM",
            XsErrno::ENOSPC => "ENOSPC",
            XsErrno::EIO => "EIO",
            XsErrno::ENOTEMPTY => "ENOTEMPTY",
            XsErrno::ENOSYS => "ENOSYS",
            XsErrno::EROFS => "EROFS",
            XsErrno::EBUSY => "EBUSY",
            XsErrno::EAGAIN => "EAGAIN",
            XsErrno::EISCONN => "EISCONN",
            XsErrno::E2BIG => "E2BIG",
        }
    }

    /// Parses an `XS_ERROR` payload (trailing NUL optional).
    pub fn from_wire(payload: &[u8]) -> Option<XsErrno> {
        let s = payload.strip_suffix(b"\0").unwrap_or(payload);
        XsErrno::ALL.into_iter().find(|e| e.as_str().as_bytes() == s)
    }

    /// The Linux errno value with the same name.
    pub fn errno(self) -> i32 {
        match self {
            XsErrno::EINVAL => libc_errno::EINVAL,
            XsErrno::EACCES => libc_errno::EACCES,
            XsErrno::EEXIST => libc_errno::EEXIST,
            XsErrno::EISDIR => libc_errno::EISDIR,
            XsErrno::ENOENT => libc_errno::ENOENT,
            XsErrno::ENOMEM => libc_errno::ENOMEM,
            XsErrno::ENOSPC => libc_errno::ENOSPC,
            XsErrno::EIO => libc_errno::EIO,
            XsErrno::ENOTEMPTY => libc_errno::ENOTEMPTY,
            XsErrno::ENOSYS => libc_errno::ENOSYS,
            XsErrno::EROFS => libc_errno::EROFS,
            XsErrno::EBUSY => libc_errno::EBUSY,
            XsErrno::EAGAIN => libc_errno::EAGAIN,
            XsErrno::EISCONN => libc_errno::EISCONN,
            XsErrno::E2BIG => libc_errno::E2BIG,
        }
    }

    /// The errno's description as `strerror` gives it (what xenstore-utils print).
    pub fn describe(self) -> String {
        io::Error::from_raw_os_error(self.errno())
            .to_string()
            .split(" (os error")
            .next()
            .unwrap_or_default()
            .to_string()
    }
}

impl core::fmt::Display for XsErrno {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for XsErrno {}

mod libc_errno {
    pub const EINVAL: i32 = nix::libc::EINVAL;
    pub const EACCES: i32 = nix::libc::EACCES;
    pub const EEXIST: i32 = nix::libc::EEXIST;
    pub const EISDIR: i32 = nix::libc::EISDIR;
    pub const ENOENT: i32 = nix::libc::ENOENT;
    pub const ENOMEM: i32 = nix::libc::ENOMEM;
    pub const ENOSPC: i32 = nix::libc::ENOSPC;
    pub const EIO: i32 = nix::libc::EIO;
    pub const ENOTEMPTY: i32 = nix::libc::ENOTEMPTY;
    pub const ENOSYS: i32 = nix::libc::ENOSYS;
    pub const EROFS: i32 = nix::libc::EROFS;
    pub const EBUSY: i32 = nix::libc::EBUSY;
    pub const EAGAIN: i32 = nix::libc::EAGAIN;
    pub const EISCONN: i32 = nix::libc::EISCONN;
    pub const E2BIG: i32 = nix::libc::E2BIG;
}

/// Why a frame or a request could not be encoded or decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// The header announces a payload above `XENSTORE_PAYLOAD_MAX`.
    #[error("Payload of {len} bytes exceeds XENSTORE_PAYLOAD_MAX ({max})")]
    PayloadTooLarge {
        /// Announced or requested length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A path is longer than xenstored allows.
    #[error("Path of {len} bytes exceeds the limit of {max}")]
    PathTooLong {
        /// Length of the path.
        len: usize,
        /// The limit that applies (absolute or relative).
        max: usize,
    },
    /// A path that xenstored would reject (`is_valid_nodename`).
    #[error("Invalid xenstore path {0:?}")]
    InvalidPath(String),
    /// A payload that does not have the form its type requires.
    #[error("Malformed {0} payload")]
    MalformedPayload(&'static str),
    /// A permission string that is not `[nrwb]<domid>`.
    #[error("Invalid permission {0:?}")]
    InvalidPermission(String),
}
