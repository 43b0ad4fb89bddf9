//! Quotas and server settings, with C xenstored's defaults (`hard_quotas[]`
//! in `xenstored_domain.c`).

/// Per-domain limits. They apply to unprivileged connections only, as in
/// xenstored (dom0 is exempt).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quotas {
    /// Nodes a domain may own (`-E`, default 1000): `ENOSPC` beyond.
    pub nodes: usize,
    /// Watches per domain (`-W`, default 128): `E2BIG` beyond.
    pub watches: usize,
    /// Open transactions per connection (`-t`, default 10): `ENOSPC` beyond.
    pub transactions: usize,
    /// Bytes per node, header, permissions, value and child names counted
    /// (`-S`, default 2048): `ENOSPC` beyond.
    pub node_size: usize,
    /// Permission entries per node (`-A`, default 5): `ENOSPC` beyond.
    pub perms: usize,
    /// Path length below `/local/domain/<id>/` (`-M`, default 2048): `EINVAL` beyond.
    pub path_length: usize,
    /// Nodes one transaction may touch (default 1024): `ENOSPC` beyond.
    pub transaction_nodes: usize,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            nodes: 1000,
            watches: 128,
            transactions: 10,
            node_size: 2048,
            perms: 5,
            path_length: 2048,
            transaction_nodes: 1024,
        }
    }
}

/// Settings of a [`super::Xenstored`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XenstoredConfig {
    /// Quotas for unprivileged domains.
    pub quotas: Quotas,
    /// Bytes of replies and watch events queued for one connection before
    /// further watch events for it are dropped and its requests wait
    /// (XSA-349). Applies to every connection, dom0 included.
    pub out_queue_bytes: usize,
}

impl Default for XenstoredConfig {
    fn default() -> Self {
        XenstoredConfig { quotas: Quotas::default(), out_queue_bytes: 1 << 20 }
    }
}
