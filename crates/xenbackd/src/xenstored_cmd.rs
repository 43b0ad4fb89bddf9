//! `xenbackd xenstored --socket PATH`: the simulated xenstored in the
//! foreground, until SIGTERM or SIGINT (the socket file is then removed).
//! SIGHUP is logged and ignored (its log is stderr: nothing to reopen).

use std::path::PathBuf;

use anyhow::{Context, Result};
use nix::sys::signal::{SigSet, Signal};
use xen_sim::xenstored::{Quotas, Xenstored, XenstoredConfig};

/// Run the simulated xenstored on a unix socket
///
/// Runs a simulated xenstored (Xen 4.17 semantics) on a unix socket; every
/// connection is privileged, as on xenstored's socket. Point xenstore tools
/// at it with XENSTORED_PATH=PATH. Quotas apply to unprivileged domains
/// only; their defaults are C xenstored's.
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct XenstoredArgs {
    /// The unix socket to listen on (refused if a server answers on it)
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Nodes a domain may own (xenstored -E)
    #[arg(long, value_name = "N")]
    entry_nb: Option<usize>,
    /// Watches per domain (xenstored -W)
    #[arg(long, value_name = "N")]
    watch_nb: Option<usize>,
    /// Open transactions per connection (xenstored -t)
    #[arg(long, value_name = "N")]
    transaction: Option<usize>,
    /// Bytes per node (xenstored -S)
    #[arg(long, value_name = "N")]
    entry_size: Option<usize>,
    /// Permission entries per node (xenstored -A)
    #[arg(long, value_name = "N")]
    perm_nb: Option<usize>,
}

/// Runs the command; returns the exit status.
pub fn run(args: XenstoredArgs) -> Result<u8> {
    let mut quotas = Quotas::default();
    let set = |field: &mut usize, v: Option<usize>| {
        if let Some(v) = v {
            *field = v;
        }
    };
    set(&mut quotas.nodes, args.entry_nb);
    set(&mut quotas.watches, args.watch_nb);
    set(&mut quotas.transactions, args.transaction);
    set(&mut quotas.node_size, args.entry_size);
    set(&mut quotas.perms, args.perm_nb);
    let socket = args.socket;

    // Block the signals before any thread starts, so that every thread
    // inherits the mask and only the wait below receives them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGHUP);
    signals.thread_block().context("blocking SIGTERM, SIGINT and SIGHUP")?;

    let server = Xenstored::with_config(XenstoredConfig { quotas, ..XenstoredConfig::default() });
    let socket = server.serve_socket(&socket).with_context(|| format!("listening on {}", socket.display()))?;
    println!("xenstored: listening on {}", socket.path().display());
    let sig = loop {
        match signals.wait().context("waiting for a signal")? {
            Signal::SIGHUP => {
                log::info!("xenstored: SIGHUP: nothing to reopen (logging goes to stderr); still serving")
            }
            sig => break sig,
        }
    };
    log::info!("xenstored: {sig:?}, stopping");
    drop(socket);
    Ok(0)
}
