//! The simulated xenstored: a wire-compatible xenstore daemon (the semantics
//! of Xen 4.17's C `xenstored`) so that every layer, and the real
//! xenstore-utils through `XENSTORED_PATH`, can be tested without Xen.
//!
//! What it follows (file by file of `tools/xenstore/`):
//! - the tree of `xenstored_core.c`: `setup_structure()`'s initial nodes,
//!   permissions by `perm_for_conn()`, inheritance in `construct_node()`
//!   (the parent's list, owner set to an unprivileged creator), errors
//!   hidden by `errno_from_parents()`, `rm` of subtrees, and the request
//!   checks of `process_message()` (`ENOSYS` for unknown types, `XS_WATCH_EVENT`,
//!   `XS_ERROR` and the 4.18 types 23..26; `EACCES` for privileged requests;
//!   `ENOENT` for an unknown transaction id);
//! - watches of `xenstored_watch.c` (`watch.rs`), transactions of
//!   `xenstored_transaction.c` (`transaction.rs`);
//! - domains of `xenstored_domain.c`: introduce, release (which removes the
//!   nodes the domain owns), resume, set-target,
//!   `@introduceDomain` / `@releaseDomain`, and the quotas ([`Quotas`]).
//!
//! Where it departs: there are no rings or event channels (a domain is a
//! socketpair from [`Xenstored::connect_as`]); watch events queued inside a
//! transaction are checked against the permissions seen when queued;
//! permissions naming a gone domain are kept as they are; pending watch
//! events never time out; `XS_CONTROL` knows `check`, `log`, `print`,
//! `help`, `quota` and `memreport`; the output bound applies to dom0 too
//! (see `conn.rs`).
//!
//! ```no_run
//! use xen_sim::xenstored::Xenstored;
//!
//! let xs = Xenstored::new();
//! // Privileged connections, for tools run with XENSTORED_PATH=/tmp/xs.sock:
//! let socket = xs.serve_socket(std::path::Path::new("/tmp/xs.sock"))?;
//! // A guest's connection (relative paths under /local/domain/5):
//! let guest = xs.connect_as(5)?;
//! xs.introduce_domain(5); // fires @introduceDomain
//! assert_eq!(xs.read_node("/tool/xenstored"), Some(Vec::new()));
//! # Ok::<(), std::io::Error>(())
//! ```

mod config;
mod conn;
mod node;
mod ops;
mod server;
mod state;
mod transaction;
mod watch;

pub use self::config::{Quotas, XenstoredConfig};
pub use self::server::{SocketServer, Xenstored, XenstoredStats};
