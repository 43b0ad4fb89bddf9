//! `xenbackd xenstored --socket PATH`: the simulated xenstored in the
//! foreground, until SIGTERM or SIGINT (the socket file is then removed).
//! SIGHUP is logged and ignored (its log is stderr: nothing to reopen).

use anyhow::{Context, Result};
use nix::sys::signal::{SigSet, Signal};
use xen_sim::xenstored::{Quotas, Xenstored, XenstoredConfig};

use crate::args::Args;

const USAGE: &str = "\
Usage: xenbackd xenstored --socket PATH [--entry-nb N] [--watch-nb N]
                          [--transaction N] [--entry-size N] [--perm-nb N]

Runs a simulated xenstored (Xen 4.17 semantics) on a unix socket; every
connection is privileged, as on xenstored's socket. Point xenstore tools at it
with XENSTORED_PATH=PATH. Quotas apply to unprivileged domains only.
";

/// Runs the command; returns the exit status.
pub fn run(args: Vec<String>) -> Result<u8> {
    let mut a = Args::new(args);
    if a.flag("-h") || a.flag("--help") {
        print!("{USAGE}");
        return Ok(0);
    }
    let Some(socket) = a.value("--socket")? else {
        eprint!("{USAGE}");
        return Ok(2);
    };
    let mut quotas = Quotas::default();
    if let Some(n) = a.parsed("--entry-nb")? {
        quotas.nodes = n;
    }
    if let Some(n) = a.parsed("--watch-nb")? {
        quotas.watches = n;
    }
    if let Some(n) = a.parsed("--transaction")? {
        quotas.transactions = n;
    }
    if let Some(n) = a.parsed("--entry-size")? {
        quotas.node_size = n;
    }
    if let Some(n) = a.parsed("--perm-nb")? {
        quotas.perms = n;
    }
    let rest = a.positionals()?;
    if !rest.is_empty() {
        anyhow::bail!("unexpected arguments: {}", rest.join(" "));
    }

    // Block the signals before any thread starts, so that every thread
    // inherits the mask and only the wait below receives them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGHUP);
    signals.thread_block().context("blocking SIGTERM, SIGINT and SIGHUP")?;

    let server = Xenstored::with_config(XenstoredConfig { quotas, ..XenstoredConfig::default() });
    let socket =
        server.serve_socket(std::path::Path::new(&socket)).with_context(|| format!("listening on {socket}"))?;
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
