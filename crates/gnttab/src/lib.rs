//! Xen grant tables: the [`GrantMapper`] trait that backends use, the
//! [`GrantMapping`] of shared pages reached only through volatile/atomic
//! accessors, and their implementation on Linux's `/dev/xen/gntdev` and
//! `/dev/xen/gntalloc` (`include/uapi/xen/{gntdev,gntalloc}.h`), done with
//! direct ioctls and no libxengnttab.
#![deny(missing_docs)]

pub mod abi;
mod compat_copy;
mod gntalloc;
mod gntdev;
mod mapper;
mod mapping;
mod sys;

pub use compat_copy::copy_by_mapping;
pub use gntalloc::{Gntalloc, GNTALLOC_PATH};
pub use gntdev::{CopyMode, Gntdev, UnmapNotify, GNTDEV_PATH};
pub use mapper::{
    check_segment, CopySegment, DomId, Error, GrantMapper, GrantRef, GrantStatus, GuestPage, Result, PAGE_SIZE,
};
pub use mapping::{AccessError, GrantMapping, Unmap};
