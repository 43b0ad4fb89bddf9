//! `xenbackd`: a pure-Rust Xen PV backend daemon, its simulator demo, and
//! xenstore tools for dom0 images without libxen.

mod args;
mod bench;
mod bench_xs;
mod demo;
mod dm;
mod platform;
mod selftest;
mod serve;
mod xenstored_cmd;
mod xs;

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

Started with QEMU's arguments (-xen-domid N ... -machine xenpv), or under
the name qemu-system-i386, xenbackd is a PV guest's device model for libxl
(see docs/device-model.md).

Logging: RUST_LOG=debug|info|warn (default warn; info for serve, demo and xenstored).
";

fn main() -> ExitCode {
    // Raw arguments: xenstore values given with -R may not be UTF-8.
    let raw: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let argv0 = raw.first().map(|a| a.to_string_lossy().into_owned()).unwrap_or_default();
    if xs::is_tool_name(&argv0) {
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
        return ExitCode::from(xs::run_as(&argv0, raw[1..].to_vec()).unwrap_or(1));
    }
    // Started by libxl in place of QEMU: under a QEMU name, or with QEMU's
    // command line (`device_model_override`).
    let all: Vec<String> = raw.iter().skip(1).map(|a| a.to_string_lossy().into_owned()).collect();
    if xenbackd::dm_args::is_qemu_name(&argv0) || xenbackd::dm_args::looks_like_qemu(&all) {
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
        return exit(dm::run(all));
    }
    let mut argv = raw.iter().skip(1).map(|a| a.to_string_lossy().into_owned());
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
        "xs" => xs::run_os(raw[2..].to_vec()),
        "selftest" => selftest::run(rest.clone()),
        "demo" => demo::run(rest.clone()),
        "serve" => serve::run(rest.clone()),
        "xenstored" => xenstored_cmd::run(rest.clone()),
        "bench" => match rest.first().map(String::as_str) {
            Some("xs") => bench_xs::run(rest[1..].to_vec()),
            Some("blk") => bench::run(rest[1..].to_vec()),
            _ => {
                eprintln!("Usage: xenbackd bench xs [--socket PATH | --system] [--ops N]\n       xenbackd bench blk [--seconds S] [--size MIB]");
                Ok(2)
            }
        },
        other => {
            eprintln!("xenbackd: unknown command {other:?}\n\n{USAGE}");
            Ok(2)
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
