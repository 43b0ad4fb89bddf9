//! Simulated domains, event channels and grant tables.
//!
//! A [`SimHost`] holds domains. Each has ports (reached through
//! [`SimHost::evtchn`] handles that behave like `/dev/xen/evtchn`), guest
//! memory (one memfd, grown as the guest allocates pages) and a grant table:
//! the frontend side is [`SimGrantTable`], the backend side a
//! [`gnttab::GrantMapper`] from [`SimHost::grant_mapper`]. A guest's view of
//! its pages and a backend's grant mapping are mappings of the same memfd
//! offsets, so a frontend and a backend on different threads share memory
//! exactly as on Xen. Errors carry the errno or `GNTST_*` value Xen gives;
//! each module documents where it follows Xen and where it departs.

pub mod bench;
mod error;
mod evtchn;
mod grant;
mod memory;
mod sim_host;

pub use self::error::{DomId, Error, Result};
pub use self::evtchn::{PortStatus, SimEventChannel, MAX_PORTS};
pub use self::grant::{SimGrantMapper, SimGrantTable, RESERVED_GRANT_ENTRIES};
pub use self::memory::{GuestPages, PageFrame, MAX_GUEST_PAGES};
pub use self::sim_host::SimHost;
