//! `xenbackd`: a pure-Rust Xen PV backend daemon, its simulator demo, and
//! xenstore tools for dom0 images without libxen.

mod args;

use std::process::ExitCode;

const USAGE: &str = "\
Usage: xenbackd <command> [options]

Commands:
  serve       Serve PV backends on this Xen host (see `xenbackd serve --help`)
  demo        Run the block backend against simulated guests, no Xen needed
  bench       Benchmarks on the simulator
  selftest    Check /dev/xen/evtchn, gntdev and gntalloc on a real Xen host
  xs          Xenstore tools: read write ls list rm mkdir chmod exists watch
  xenstored   Run the simulated xenstored on a unix socket

Logging: RUST_LOG=debug|info|warn (default warn; info for serve, demo and xenstored).
";

fn main() -> ExitCode {
    let mut argv = std::env::args().skip(1);
    let Some(cmd) = argv.next() else {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    };
    let rest: Vec<String> = argv.collect();
    let default_log = match cmd.as_str() {
        "serve" | "demo" | "xenstored" => "info",
        _ => "warn",
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_log)).init();
    let result: anyhow::Result<u8> = match cmd.as_str() {
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            Ok(0)
        }
        other => {
            eprintln!("xenbackd: unknown command {other:?}\n\n{USAGE}");
            Ok(2)
        }
    };
    let _ = rest;
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("xenbackd: {e:#}");
            ExitCode::from(1)
        }
    }
}
