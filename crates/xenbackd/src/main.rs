//! `xenbackd`: a pure-Rust Xen PV backend daemon, its simulator demo, and
//! xenstore tools for dom0 images without libxen.

mod bench;
mod bench_hostile;
mod bench_xs;
mod cli;
mod demo;
mod dm;
mod links;
mod platform;
mod scratch;
mod selftest;
mod serve;
mod status_cmd;
mod xenstored_cmd;
mod xs;
mod xs_control;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use cli::{BenchCommand, Cli, Command};

/// Where `serve` and the device-model mode keep the rings' request journals
/// (docs/backend.md, "Resume after a crash"): tmpfs, root's alone.
const JOURNAL_DIR: &str = "/run/xenbackd/rings";

/// The daemon's runtime directory (mode 0700): journals, control sockets.
const RUN_DIR: &str = "/run/xenbackd";

fn init_log(default: &str) {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default)).init();
}

fn main() -> ExitCode {
    // Raw arguments: xenstore values given with -R may not be UTF-8.
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let argv0 = raw.first().map(|a| a.to_string_lossy().into_owned()).unwrap_or_default();
    if xs::is_tool_name(&argv0) {
        init_log("warn");
        return ExitCode::from(xs::run_as(&argv0, raw[1..].to_vec()).unwrap_or(1));
    }
    // Started by libxl in place of QEMU: under a QEMU name, or with QEMU's
    // command line (`device_model_override`). QEMU's single-dash options
    // have their own parser (`xenbackd::dm_args`), not clap.
    let all: Vec<String> = raw.iter().skip(1).map(|a| a.to_string_lossy().into_owned()).collect();
    if xenbackd::dm_args::is_qemu_name(&argv0) || xenbackd::dm_args::looks_like_qemu(&all) {
        init_log("info");
        return exit(dm::run(all));
    }
    let cli = Cli::parse_from(raw);
    init_log(match cli.command {
        // The demo prints its own lines; the framework's warnings stay.
        Command::Serve(_) | Command::Xenstored(_) => "info",
        _ => "warn",
    });
    let result = match cli.command {
        Command::Serve(a) => serve::run(a),
        Command::Status(a) => status_cmd::run_status(a),
        Command::Metrics(a) => status_cmd::run_metrics(a),
        Command::Demo(a) => demo::run(a),
        Command::Bench(BenchCommand::Blk(a)) => bench::run(a),
        Command::Bench(BenchCommand::Xs(a)) => bench_xs::run(a),
        Command::Bench(BenchCommand::Hostile(a)) => bench_hostile::run(a),
        Command::Selftest(a) => selftest::run(a),
        Command::Xs(a) => xs::run_os(a.args),
        Command::Xenstored(a) => xenstored_cmd::run(a),
        Command::InstallLinks(a) => links::run(a),
        Command::Version => {
            print!("{}", cli::version());
            Ok(0)
        }
        Command::Completions { shell } => {
            cli::completions(shell, &mut std::io::stdout()).map(|()| 0).context("writing the completions")
        }
        Command::Manpage { dir } => {
            cli::manpage(dir.as_deref(), &mut std::io::stdout()).map(|()| 0).context("writing the man page")
        }
    };
    exit(result)
}

fn exit(result: anyhow::Result<u8>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("xenbackd: {e:#}");
            ExitCode::from(1)
        }
    }
}
