//! Xen grant tables: the [`GrantMapper`] trait that backends use, the
//! [`GrantMapping`] of shared pages reached only through volatile/atomic
//! accessors, and their implementation on Linux's `/dev/xen/gntdev` and
//! `/dev/xen/gntalloc` (`include/uapi/xen/{gntdev,gntalloc}.h`), done with
//! direct ioctls and no libxengnttab.
#![deny(missing_docs)]

mod mapper;
mod mapping;

pub use mapper::{
    check_segment, CopySegment, DomId, Error, GrantMapper, GrantRef, GrantStatus, GuestPage, Result, PAGE_SIZE,
};
pub use mapping::{AccessError, GrantMapping, Unmap};
