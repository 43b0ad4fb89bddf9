//! Errors of shared-ring access.

use gnttab::AccessError;

/// What went wrong on a ring. A misbehaving peer ([`RingError::Overflow`],
/// [`RingError::Backwards`]) leaves the ring unusable: the device should fail
/// that one connection, and every later call reports [`RingError::Broken`].
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// The request or response type has no bytes.
    #[error("Ring entries of zero bytes")]
    EmptyEntry,
    /// The mapping cannot hold the header and one entry.
    #[error("A mapping of {len} bytes cannot hold a ring of {entry}-byte entries")]
    TooSmall {
        /// Mapping length.
        len: usize,
        /// Entry size.
        entry: usize,
    },
    /// The shared ring is mapped read-only; both ends write to it.
    #[error("Shared ring mapping is read-only")]
    ReadOnly,
    /// The peer published a producer index beyond what the ring can hold
    /// (`RING_REQUEST_PROD_OVERFLOW` / `RING_RESPONSE_PROD_OVERFLOW`).
    #[error("Peer producer index {prod} is more than {limit} entries past {base}")]
    Overflow {
        /// The producer index the peer published.
        prod: u32,
        /// The index it is measured from.
        base: u32,
        /// How far past `base` it may be.
        limit: u32,
    },
    /// The peer's consumer index of a byte ring is not within the array
    /// behind our producer index.
    #[error("Peer consumer index {cons} is not within {size} bytes behind {prod}")]
    ConsumerOverflow {
        /// The consumer index the peer published.
        cons: u32,
        /// Our producer index.
        prod: u32,
        /// The array's length.
        size: u32,
    },
    /// A byte ring's layout does not fit the mapping, or its array is not
    /// a power of two long.
    #[error("Byte ring layout does not fit a mapping of {len} bytes")]
    BadLayout {
        /// Mapping length.
        len: usize,
    },
    /// The peer moved its producer index backwards.
    #[error("Peer producer index went back from {seen} to {prod}")]
    Backwards {
        /// The index seen before.
        seen: u32,
        /// The one seen now.
        prod: u32,
    },
    /// The backend tried to answer more requests than it has taken.
    #[error("No request taken is awaiting a response")]
    NoRequestPending,
    /// The frontend tried to push a request onto a full ring.
    #[error("Ring is full")]
    Full,
    /// An earlier error left the ring unusable.
    #[error("Ring is broken by an earlier error")]
    Broken,
    /// The request journal's file could not be created, sized or mapped.
    #[error("Ring journal file")]
    Journal(#[source] std::io::Error),
    /// The journal found for a ring to resume cannot be used: the reason.
    #[error("The ring's journal cannot be used: {0}")]
    JournalMismatch(&'static str),
    /// A ring with requests published and not answered, left by a backend
    /// that kept no journal (or whose journal is gone): the slots between
    /// `rsp_prod` and `req_prod` may hold responses it wrote but did not
    /// publish, so nothing there can be taken as a request.
    #[error("Cannot resume exactly: {pending} request(s) pending at rsp_prod {rsp_prod} and no journal")]
    NotResumable {
        /// The published `rsp_prod`.
        rsp_prod: u32,
        /// `req_prod - rsp_prod`.
        pending: u32,
    },
    /// A response without its request's ticket on a journaled ring.
    #[error("A journaled ring answers requests by ticket")]
    TicketRequired,
    /// An access to the shared memory failed.
    #[error("Shared ring access failed")]
    Access(#[source] AccessError),
}

impl From<AccessError> for RingError {
    fn from(e: AccessError) -> Self {
        RingError::Access(e)
    }
}
