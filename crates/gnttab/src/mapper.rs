//! What the layers above need from grant tables, for the real device and the
//! simulator alike.

use crate::mapping::GrantMapping;

/// A grant reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrantRef(pub u32);

pub use xen_bus::DomId;

/// Xen's page size; grants are per page.
pub const PAGE_SIZE: usize = 4096;

/// A per-segment result of a grant copy: `GNTST_*` from Xen's
/// `public/grant_table.h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GrantStatus {
    /// `GNTST_okay` (0).
    Okay,
    /// `GNTST_general_error` (-1).
    GeneralError,
    /// `GNTST_bad_domain` (-2).
    BadDomain,
    /// `GNTST_bad_gntref` (-3).
    BadGntref,
    /// `GNTST_bad_handle` (-4).
    BadHandle,
    /// `GNTST_bad_virt_addr` (-5).
    BadVirtAddr,
    /// `GNTST_bad_dev_addr` (-6).
    BadDevAddr,
    /// `GNTST_no_device_space` (-7).
    NoDeviceSpace,
    /// `GNTST_permission_denied` (-8).
    PermissionDenied,
    /// `GNTST_bad_page` (-9).
    BadPage,
    /// `GNTST_bad_copy_arg` (-10).
    BadCopyArg,
    /// `GNTST_address_too_big` (-11).
    AddressTooBig,
    /// `GNTST_eagain` (-12).
    Eagain,
    /// `GNTST_no_space` (-13).
    NoSpace,
    /// A value Xen does not define.
    Unknown(i16),
}

impl GrantStatus {
    /// From the `int16_t status` Xen writes.
    pub fn from_raw(v: i16) -> Self {
        match v {
            0 => GrantStatus::Okay,
            -1 => GrantStatus::GeneralError,
            -2 => GrantStatus::BadDomain,
            -3 => GrantStatus::BadGntref,
            -4 => GrantStatus::BadHandle,
            -5 => GrantStatus::BadVirtAddr,
            -6 => GrantStatus::BadDevAddr,
            -7 => GrantStatus::NoDeviceSpace,
            -8 => GrantStatus::PermissionDenied,
            -9 => GrantStatus::BadPage,
            -10 => GrantStatus::BadCopyArg,
            -11 => GrantStatus::AddressTooBig,
            -12 => GrantStatus::Eagain,
            -13 => GrantStatus::NoSpace,
            v => GrantStatus::Unknown(v),
        }
    }

    /// The `int16_t` value.
    pub fn to_raw(self) -> i16 {
        match self {
            GrantStatus::Okay => 0,
            GrantStatus::GeneralError => -1,
            GrantStatus::BadDomain => -2,
            GrantStatus::BadGntref => -3,
            GrantStatus::BadHandle => -4,
            GrantStatus::BadVirtAddr => -5,
            GrantStatus::BadDevAddr => -6,
            GrantStatus::NoDeviceSpace => -7,
            GrantStatus::PermissionDenied => -8,
            GrantStatus::BadPage => -9,
            GrantStatus::BadCopyArg => -10,
            GrantStatus::AddressTooBig => -11,
            GrantStatus::Eagain => -12,
            GrantStatus::NoSpace => -13,
            GrantStatus::Unknown(v) => v,
        }
    }

    /// Whether the segment was copied.
    pub fn is_ok(self) -> bool {
        self == GrantStatus::Okay
    }
}

/// A place in a guest's granted page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestPage {
    /// The granting domain.
    pub domid: DomId,
    /// The grant.
    pub gref: GrantRef,
    /// Byte offset in the page.
    pub offset: u16,
}

/// One segment of a grant copy: at most one page, never crossing a page
/// boundary on the guest side.
#[derive(Debug)]
pub enum CopySegment<'a> {
    /// Guest page to local buffer (a guest's write request).
    FromGuest {
        /// Source in the guest.
        src: GuestPage,
        /// Local destination; its length is the copy length.
        dst: &'a mut [u8],
    },
    /// Local buffer to guest page (a guest's read request).
    ToGuest {
        /// Local source; its length is the copy length.
        src: &'a [u8],
        /// Destination in the guest.
        dst: GuestPage,
    },
}

impl CopySegment<'_> {
    /// The copy length.
    pub fn len(&self) -> usize {
        match self {
            CopySegment::FromGuest { dst, .. } => dst.len(),
            CopySegment::ToGuest { src, .. } => src.len(),
        }
    }

    /// Whether the segment copies nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The guest side of the copy.
    pub fn guest(&self) -> GuestPage {
        match self {
            CopySegment::FromGuest { src, .. } => *src,
            CopySegment::ToGuest { dst, .. } => *dst,
        }
    }
}

/// Errors of grant operations (as a whole; per-segment copy failures are
/// [`GrantStatus`] values).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening the device failed.
    #[error("Cannot open {path}")]
    Open {
        /// Device path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An ioctl, mmap or munmap failed.
    #[error("{op} failed")]
    Op {
        /// Which operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Xen refused to map a grant.
    #[error("Mapping grant {gref:?} of domain {domid} failed: {status:?}")]
    Map {
        /// Granting domain.
        domid: DomId,
        /// The grant.
        gref: GrantRef,
        /// Xen's status.
        status: GrantStatus,
    },
    /// A segment that is empty, larger than a page or crosses a page boundary.
    #[error("Invalid copy segment: offset {offset}, length {len}")]
    BadSegment {
        /// Offset in the guest page.
        offset: u16,
        /// Length.
        len: usize,
    },
    /// An argument outside what the interface accepts.
    #[error("Invalid argument: {0}")]
    InvalidArgument(&'static str),
}

/// Result of grant operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Checks a copy segment as Xen's `gnttab_copy` does: non-empty, within one page.
pub fn check_segment(seg: &CopySegment<'_>) -> Result<()> {
    let offset = seg.guest().offset;
    let len = seg.len();
    if len == 0 || usize::from(offset) + len > PAGE_SIZE {
        return Err(Error::BadSegment { offset, len });
    }
    Ok(())
}

/// Maps and copies grants of other domains (the backend side; `/dev/xen/gntdev`).
pub trait GrantMapper: Send + Sync {
    /// `IOCTL_GNTDEV_MAP_GRANT_REF` + `mmap`: maps `refs` of `domid` as one
    /// contiguous range of `refs.len()` pages.
    fn map(&self, domid: DomId, refs: &[GrantRef], writable: bool) -> Result<GrantMapping>;

    /// `IOCTL_GNTDEV_GRANT_COPY`: copies every segment, writing each one's
    /// result to `status` (same length as `segments`). An `Err` means the batch
    /// as a whole failed.
    fn copy(&self, segments: &mut [CopySegment<'_>], status: &mut [GrantStatus]) -> Result<()>;
}
