//! Errors of the simulated host's own operations (domains, guest memory,
//! the frontend side of grant tables). Backend-facing operations report the
//! `evtchn` and `gnttab` crates' errors, with the errno or `GNTST_*` Xen gives.

use gnttab::GrantRef;

pub use xen_bus::DomId;

/// Errors of [`super::SimHost`] and [`super::SimGrantTable`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `create_domain` of an id in use (`EEXIST` from `XEN_DOMCTL_createdomain`).
    #[error("Domain {0} already exists")]
    DomainExists(DomId),
    /// The domain does not exist (or was destroyed).
    #[error("Domain {0} does not exist")]
    NoDomain(DomId),
    /// A page frame the domain has not allocated.
    #[error("Page frame {pfn} is not allocated in domain {domid}")]
    BadFrame {
        /// The domain.
        domid: DomId,
        /// The frame.
        pfn: u64,
    },
    /// `end_access` of a reference that is not granted.
    #[error("Grant {0:?} is not in use")]
    NotGranted(GrantRef),
    /// `end_access` while the grant is mapped or being copied: what
    /// `gnttab_end_foreign_access_ref` reports when `GTF_reading`/`GTF_writing`
    /// are set.
    #[error("Grant {0:?} is still mapped or being copied")]
    Busy(GrantRef),
    /// The domain's grant table reached its maximum size.
    #[error("Grant table of domain {0} is full")]
    TableFull(DomId),
    /// The domain's memory reached its maximum size, or zero pages were asked for.
    #[error("Cannot allocate {pages} pages in domain {domid}")]
    OutOfMemory {
        /// The domain.
        domid: DomId,
        /// Pages asked for.
        pages: usize,
    },
    /// A system call on guest memory failed.
    #[error("{op} failed")]
    Io {
        /// Which operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn io(op: &'static str, e: nix::Error) -> Self {
        Error::Io { op, source: std::io::Error::from(e) }
    }
}

/// Result of the simulated host's operations.
pub type Result<T> = std::result::Result<T, Error>;
