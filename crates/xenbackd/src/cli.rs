//! The command line, defined once with clap's derive: the parser, every
//! `--help` and `help <command>`, `--version`, the shell completions and the
//! man page come from these types. Usage errors exit 2 (clap's convention,
//! and the C tools'), `--help` and `--version` print on stdout and exit 0.
//!
//! Two modes stay outside: the device-model mode (QEMU's single-dash
//! arguments, `crate::dm`) and the xenstore tools invoked through a
//! `xenstore-*` name (`crate::xs`); `main` dispatches to them before clap
//! parses anything.

use std::ffi::OsString;
use std::path::Path;

use clap::builder::{RangedU64ValueParser, TypedValueParser};
use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

const AFTER_HELP: &str = "\
Started with QEMU's arguments (-xen-domid N ... -machine xenpv), or under
the name qemu-system-i386, xenbackd is a PV guest's device model for libxl
(see docs/device-model.md).

Logging: RUST_LOG=debug|info|warn (default warn; info for serve, demo and xenstored).";

/// `xenbackd`: a pure-Rust Xen PV backend daemon, its simulator demo, and
/// xenstore tools for dom0 images without libxen.
#[derive(Parser, Debug)]
#[command(
    name = "xenbackd",
    version,
    about = "Pure-Rust Xen PV backend daemon, simulator demo and xenstore tools",
    long_about = None,
    after_help = AFTER_HELP,
    subcommand_required = true,
    arg_required_else_help = true
)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    Serve(crate::serve::ServeArgs),
    Status(crate::status_cmd::StatusArgs),
    Metrics(crate::status_cmd::MetricsArgs),
    Demo(crate::demo::DemoArgs),
    /// Benchmarks on the simulator
    #[command(subcommand)]
    Bench(BenchCommand),
    Selftest(crate::selftest::SelftestArgs),
    Xs(XsArgs),
    Xenstored(crate::xenstored_cmd::XenstoredArgs),
    InstallLinks(crate::links::LinksArgs),
    /// Print the version
    Version,
    /// Print a completion script for SHELL on stdout
    #[command(hide = true)]
    Completions {
        /// The shell
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page xenbackd(1) (roff) on stdout, or write it and one
    /// page per command (xenbackd-serve.1, ...) into DIR
    #[command(hide = true)]
    Manpage {
        /// Write every page into this directory
        #[arg(long, value_name = "DIR")]
        dir: Option<std::path::PathBuf>,
    },
}

/// `xenbackd bench ...`.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    Blk(crate::bench::BlkArgs),
    Xs(crate::bench_xs::XsBenchArgs),
    Hostile(crate::bench_hostile::HostileArgs),
}

/// Xenstore tools: read write ls list rm mkdir chmod exists watch control
// `xenbackd xs MODE ARGS...`: the arguments go as they are to the
// xenstore-utils parser of `crate::xs` (getopt rules, exit status 1 on
// misuse, as the C tools), so clap neither reads options nor adds `--help`.
#[derive(clap::Args, Debug)]
#[command(
    disable_help_flag = true,
    override_usage = "xenbackd xs <MODE> [OPTIONS] [ARGS]...",
    long_about = "\
The xenstore-utils tools (Xen 4.17's xenstore-read, xenstore-write, ...)
with the same arguments, output and exit status; `xenbackd xs read -h`
prints the tool's own usage. Through a symlink named xenstore-read (etc.)
xenbackd behaves as that tool. `mkdir` is an addition. `control` is
xenstore-control (XS_CONTROL commands such as check, log, quota, help).

Modes: read write ls list rm mkdir chmod exists watch control

Xenstore: XENSTORED_PATH or /var/run/xenstored/socket, else /dev/xen/xenbus."
)]
pub struct XsArgs {
    /// The mode and its arguments, as the C tool takes them
    #[arg(
        value_name = "MODE ARGS",
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_parser = clap::value_parser!(OsString)
    )]
    pub args: Vec<OsString>,
}

/// The block backend's I/O engine, as `serve` and `bench blk` take it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IoEngine {
    /// io-uring where the kernel allows it (logged at start), else threads
    Auto,
    /// io_uring driven by the ring workers
    #[value(alias = "io_uring")]
    IoUring,
    /// blocking I/O on a pool of threads per queue
    Threads,
}

impl From<IoEngine> for blkback::EngineChoice {
    fn from(e: IoEngine) -> Self {
        match e {
            IoEngine::Auto => blkback::EngineChoice::Auto,
            IoEngine::IoUring => blkback::EngineChoice::IoUring,
            IoEngine::Threads => blkback::EngineChoice::Threads,
        }
    }
}

/// Whether `serve` locks images as QEMU does (QEMU's `locking` option).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ImageLocking {
    /// QEMU's OFD byte locks where the kernel has them, else none
    Auto,
    /// OFD locks, or POSIX locks on kernels without them (logged)
    On,
    /// no locks, as QEMU's own qdisk backend
    Off,
}

impl From<ImageLocking> for blkback::Locking {
    fn from(l: ImageLocking) -> Self {
        match l {
            ImageLocking::Auto => blkback::Locking::Auto,
            ImageLocking::On => blkback::Locking::On,
            ImageLocking::Off => blkback::Locking::Off,
        }
    }
}

/// What a console does with output its host side does not take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ConsoleOverflow {
    /// Keep it in the guest's ring: the guest waits
    Block,
    /// Drop the oldest buffered bytes: the guest never waits
    Discard,
}

impl From<ConsoleOverflow> for consback::Overflow {
    fn from(o: ConsoleOverflow) -> Self {
        match o {
            ConsoleOverflow::Block => consback::Overflow::Block,
            ConsoleOverflow::Discard => consback::Overflow::DiscardOldest,
        }
    }
}

/// The longest time a demo or benchmark workload may be asked to run (a day).
pub const MAX_SECONDS: f64 = 86_400.0;

/// Parses a time in seconds: a finite number in (0, [`MAX_SECONDS`]], so
/// that `Duration::from_secs_f64` cannot panic (negative, NaN, 1e30).
pub fn seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !v.is_finite() || v <= 0.0 || v > MAX_SECONDS {
        return Err(format!("must be more than 0 and at most {MAX_SECONDS} seconds"));
    }
    Ok(v)
}

/// A value parser for a count in `range`, as `usize`.
pub fn count(range: std::ops::RangeInclusive<u64>) -> impl TypedValueParser<Value = usize> {
    RangedU64ValueParser::<usize>::new().range(range)
}

/// Space free to an unprivileged writer in the file system holding `dir`, in
/// bytes; `None` if it cannot be asked.
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let s = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(s.blocks_available().saturating_mul(s.fragment_size()))
}

/// Checks that `mib` MiB of files fit in the free space of `dir`; the error
/// is the usage message.
pub fn check_fits(what: &str, mib: u64, dir: &Path) -> Result<(), String> {
    let Some(free) = free_bytes(dir) else {
        log::warn!("cannot ask the free space of {}; not checking {what}", dir.display());
        return Ok(());
    };
    if mib.saturating_mul(1 << 20) > free {
        return Err(format!("{what}: {mib} MiB do not fit in {} ({} MiB free)", dir.display(), free >> 20));
    }
    Ok(())
}

/// Exits with status 2 and clap's usage message for the (sub)command at
/// `path` (e.g. `["bench", "blk"]`): for checks that need more than one value
/// or the machine (free space), made after parsing.
pub fn usage_error(path: &[&str], msg: impl std::fmt::Display) -> ! {
    let mut cmd = Cli::command();
    cmd.build();
    let mut sub = &mut cmd;
    for name in path {
        sub = sub.find_subcommand_mut(name).expect("a subcommand of the definition");
    }
    sub.error(ErrorKind::ValueValidation, msg).exit()
}

/// The text of `xenbackd version` (as `--version`).
pub fn version() -> String {
    Cli::command().render_version()
}

/// Writes the completion script for `shell`.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    // Into a buffer first: `generate` panics on a write error (a closed pipe).
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "xenbackd", &mut script);
    out.write_all(&script)
}

/// Writes the man page xenbackd(1) to `out`, or, given `dir`, it and the
/// pages of the commands into `dir`.
pub fn manpage(dir: Option<&Path>, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    match dir {
        Some(dir) => clap_mangen::generate_to(Cli::command(), dir),
        None => clap_mangen::Man::new(Cli::command()).render(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn seconds_refuses_what_duration_cannot_hold() {
        for bad in ["-1", "0", "nan", "inf", "1e30", "86401", "x", ""] {
            assert!(seconds(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(seconds("0.5"), Ok(0.5));
        assert_eq!(seconds("86400"), Ok(MAX_SECONDS));
    }

    #[test]
    fn check_fits_compares_with_free_space() {
        let dir = std::env::temp_dir();
        assert!(check_fits("--size", 1, &dir).is_ok());
        let err = check_fits("--size", u64::MAX >> 20, &dir).unwrap_err();
        assert!(err.contains("do not fit"), "{err}");
    }

    #[test]
    fn usage_error_path_names_real_subcommands() {
        let mut cmd = Cli::command();
        cmd.build();
        let bench = cmd.find_subcommand_mut("bench").expect("bench");
        assert!(bench.find_subcommand_mut("blk").is_some());
    }
}
