//! The command line of the built binary as an operator meets it: versions,
//! help per command on stdout with status 0, usage errors with status 2 and
//! a message that names the problem, numbers out of range refused before
//! anything runs, `--`, completions and man pages, and the two modes that
//! keep their own parsers (`xs`, the device model).

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

const XB: &str = env!("CARGO_BIN_EXE_xenbackd");

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn xenbackd(args: &[&str]) -> Run {
    let Output { status, stdout, stderr } = Command::new(XB)
        .args(args)
        .env_remove("RUST_LOG")
        .env("XENSTORED_PATH", "/nonexistent/xenstored-socket")
        .stdin(Stdio::null())
        .output()
        .expect("run xenbackd");
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

/// Asserts a usage error: status 2, nothing on stdout, `message` on stderr,
/// and no panic.
fn assert_usage_error(args: &[&str], message: &str) {
    let r = xenbackd(args);
    assert_eq!(r.code, Some(2), "{args:?}: status; stderr: {}", r.stderr);
    assert!(r.stdout.is_empty(), "{args:?}: stdout {:?}", r.stdout);
    assert!(r.stderr.contains(message), "{args:?}: {message:?} not in {:?}", r.stderr);
    assert!(!r.stderr.contains("panicked"), "{args:?}: {}", r.stderr);
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn version_flag_short_flag_and_command_print_the_version() {
    let want = format!("xenbackd {}\n", env!("CARGO_PKG_VERSION"));
    for args in [&["--version"][..], &["-V"], &["version"]] {
        let r = xenbackd(args);
        assert_eq!((r.code, r.stdout.as_str(), r.stderr.as_str()), (Some(0), want.as_str(), ""), "{args:?}");
    }
}

#[test]
fn help_of_every_command_goes_to_stdout_with_status_0() {
    let commands: [&[&str]; 10] = [
        &["serve"],
        &["status"],
        &["metrics"],
        &["demo"],
        &["bench"],
        &["bench", "blk"],
        &["bench", "xs"],
        &["selftest"],
        &["xenstored"],
        &["version"],
    ];
    for cmd in commands {
        let usage = format!("Usage: xenbackd {}", cmd.join(" "));
        let by_command = [&["help"][..], cmd].concat();
        let by_flag = [cmd, &["--help"][..]].concat();
        let by_short = [cmd, &["-h"][..]].concat();
        for args in [by_command, by_flag, by_short] {
            let r = xenbackd(&args);
            assert_eq!(r.code, Some(0), "{args:?}: {}", r.stderr);
            assert!(r.stdout.contains(&usage), "{args:?}: {usage:?} not in {:?}", r.stdout);
            assert!(r.stderr.is_empty(), "{args:?}: stderr {:?}", r.stderr);
        }
    }
    let top = xenbackd(&["--help"]);
    assert_eq!(top.code, Some(0));
    for cmd in
        ["serve", "status", "metrics", "demo", "bench", "selftest", "xs", "xenstored", "install-links", "version"]
    {
        assert!(top.stdout.contains(&format!("\n  {cmd} ")), "{cmd} not listed in {}", top.stdout);
    }
    assert!(!top.stdout.contains("completions") && !top.stdout.contains("manpage"), "hidden: {}", top.stdout);
}

#[test]
fn serve_help_documents_the_bounds() {
    let r = xenbackd(&["help", "serve"]);
    assert!(r.stdout.starts_with("Serve PV backends on this Xen host\n"), "{}", r.stdout);
    for text in
        ["--workers <N>", "1 to 1024", "--io-threads <N>", "1 to 64", "--close-on-exit", "[default: qdisk console]"]
    {
        assert!(r.stdout.contains(text), "{text:?} not in {}", r.stdout);
    }
}

#[test]
fn missing_and_unknown_commands_are_usage_errors() {
    let none = xenbackd(&[]);
    assert_eq!(none.code, Some(2));
    assert!(none.stderr.contains("Usage: xenbackd <COMMAND>"), "{}", none.stderr);
    assert_usage_error(&["frob"], "unrecognized subcommand 'frob'");
    assert_usage_error(&["bench", "frob"], "unrecognized subcommand 'frob'");
    assert_usage_error(&["serve", "--wrkers", "2"], "tip: a similar argument exists: '--workers'");
    assert_usage_error(&["serve", "extra"], "unexpected argument 'extra'");
    assert_usage_error(&["xenstored"], "--socket <PATH>");
    assert_usage_error(&["bench", "xs", "--socket", "/s", "--system"], "cannot be used with '--system'");
    assert_usage_error(&["serve", "--io-engine", "fast"], "[possible values: auto, io-uring, threads]");
    assert_usage_error(&["serve", "--type", "a/b"], "without '/'");
    assert_usage_error(&["completions", "tcsh"], "invalid value 'tcsh'");
}

#[test]
fn a_repeated_flag_is_named_as_repeated() {
    assert_usage_error(&["demo", "--guests", "2", "--guests", "3"], "'--guests <N>' cannot be used multiple times");
    assert_usage_error(&["serve", "--workers", "2", "--workers=3"], "'--workers <N>' cannot be used multiple times");
}

#[test]
fn double_dash_ends_the_options() {
    let r = xenbackd(&["version", "--"]);
    assert_eq!((r.code, r.stdout.starts_with("xenbackd ")), (Some(0), true), "{}", r.stderr);
    // After `--`, a flag is an argument, which demo does not take.
    assert_usage_error(&["demo", "--", "--guests"], "unexpected argument '--guests'");
    // A short run through to the end: 16 operations per case in process.
    let r = xenbackd(&["bench", "xs", "--ops", "16", "--"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.contains("directory"), "{}", r.stdout);
}

#[test]
fn numbers_out_of_range_are_refused_before_anything_runs() {
    let cases: [(&[&str], &str); 24] = [
        (&["demo", "--duration", "-1"], "must be more than 0"),
        (&["demo", "--duration", "nan"], "must be more than 0"),
        (&["demo", "--duration", "1e30"], "must be more than 0"),
        (&["demo", "--duration", "inf"], "must be more than 0"),
        (&["demo", "--duration", "0"], "must be more than 0"),
        (&["demo", "--duration", "soon"], "is not a number of seconds"),
        (&["bench", "blk", "--seconds", "-1"], "must be more than 0"),
        (&["bench", "blk", "--seconds", "NaN"], "must be more than 0"),
        (&["demo", "--size", "10000000"], "10000000 is not in 4..=65536"),
        (&["demo", "--size", "3"], "3 is not in 4..=65536"),
        (&["demo", "--size", "-4"], "invalid value '-4'"),
        (&["bench", "blk", "--size", "7"], "7 is not in 8..=65536"),
        (&["demo", "--guests", "0"], "0 is not in 1..=64"),
        (&["demo", "--guests", "65"], "65 is not in 1..=64"),
        (&["demo", "--disks", "17"], "17 is not in 1..=16"),
        (&["demo", "--queues", "5"], "5 is not in 1..=4"),
        (&["serve", "--workers", "999999"], "999999 is not in 1..=1024"),
        (&["serve", "--workers", "0"], "0 is not in 1..=1024"),
        (&["serve", "--io-threads", "100000"], "100000 is not in 1..=64"),
        (&["serve", "--io-threads", "0"], "0 is not in 1..=64"),
        (&["selftest", "--domid", "32752"], "32752 is not in 0..32752"),
        (&["bench", "xs", "--ops", "0"], "0 is not in 16..=100000000"),
        (&["status", "--interval", "61"], "must be from 0 to 60 seconds"),
        (&["status", "--interval", "nan"], "must be from 0 to 60 seconds"),
    ];
    for (args, message) in cases {
        assert_usage_error(args, message);
    }
}

#[test]
fn disks_larger_than_the_free_space_are_refused() {
    // 64 guests x 16 disks x 64 GiB = 64 TiB: more than any test machine has.
    assert_usage_error(
        &["demo", "--guests", "64", "--disks", "16", "--size", "65536"],
        "--guests x --disks x --size: 67108864 MiB do not fit in",
    );
}

#[test]
fn completions_are_scripts_for_each_shell() {
    for (shell, marker) in [("bash", "_xenbackd()"), ("zsh", "#compdef xenbackd"), ("fish", "complete -c xenbackd")] {
        let r = xenbackd(&["completions", shell]);
        assert_eq!(r.code, Some(0), "{shell}: {}", r.stderr);
        assert!(r.stdout.contains(marker), "{shell}: {marker:?} missing");
        assert!(r.stdout.contains("serve") && r.stdout.contains("io-threads"), "{shell}: commands missing");
    }
}

#[test]
fn manpage_prints_xenbackd_1_or_writes_every_page() {
    let r = xenbackd(&["manpage"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.contains(".TH xenbackd 1"), "{}", r.stdout);
    assert!(r.stdout.contains("xenbackd\\-serve(1)"), "{}", r.stdout);

    let dir = TempDir(std::env::temp_dir().join(format!("xenbackd-cli-man-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("create the directory");
    let r = xenbackd(&["manpage", "--dir", dir.0.to_str().expect("utf-8 temp dir")]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    for page in ["xenbackd.1", "xenbackd-serve.1", "xenbackd-demo.1", "xenbackd-bench-blk.1", "xenbackd-xs.1"] {
        let text = std::fs::read_to_string(dir.0.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.starts_with(".ie"), "{page} is not roff");
    }
    let serve = std::fs::read_to_string(dir.0.join("xenbackd-serve.1")).expect("serve page");
    assert!(serve.contains("\\-\\-close\\-on\\-exit"), "{serve}");
}

#[test]
fn xs_arguments_reach_the_xenstore_tools_parser_unchanged() {
    // The C tools' conventions: -h and misuse exit 1 with the tool's usage.
    let r = xenbackd(&["xs", "read", "-h"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.starts_with("xenstore-read: Usage: xenbackd xs read [-h] [-p] [-s] [-R] key"), "{}", r.stderr);
    let r = xenbackd(&["xs", "write", "/only-a-key"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.starts_with("xenstore-write: Usage:"), "{}", r.stderr);
    let r = xenbackd(&["xs"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("modes: read write ls"), "{}", r.stderr);
    let r = xenbackd(&["xs", "--help"]);
    assert_eq!(r.code, Some(0));
    assert!(r.stdout.contains("Usage: xenbackd xs <mode>"), "{}", r.stdout);
    // clap's help for the command, as for the others.
    let r = xenbackd(&["help", "xs"]);
    assert_eq!(r.code, Some(0));
    assert!(r.stdout.contains("Usage: xenbackd xs <MODE>"), "{}", r.stdout);
}

#[test]
fn qemu_arguments_go_to_the_device_model_not_to_clap() {
    // libxl's single-dash options: the device model's own parser answers.
    let r = xenbackd(&["-xen-domid", "5"]);
    assert_eq!(r.code, Some(1), "{}", r.stderr);
    assert!(r.stderr.contains("xenbackd (device model): no -machine xenpv"), "{}", r.stderr);
    assert!(!r.stderr.contains("unexpected argument"), "{}", r.stderr);
}

#[test]
fn status_and_metrics_without_a_daemon_say_so_with_status_1() {
    let sock = std::env::temp_dir().join(format!("xenbackd-cli-no-daemon-{}.sock", std::process::id()));
    for cmd in ["status", "metrics"] {
        let r = xenbackd(&[cmd, "--control-socket", sock.to_str().unwrap()]);
        assert_eq!(r.code, Some(1), "{cmd}: {}", r.stderr);
        assert!(r.stdout.is_empty(), "{cmd}: {}", r.stdout);
        assert!(r.stderr.contains("No xenbackd answers on") && r.stderr.contains("xenbackd serve"), "{}", r.stderr);
    }
}

/// `xenbackd xenstored` on a socket in a directory of its own, killed on
/// drop.
struct SimXenstored {
    child: std::process::Child,
    socket: PathBuf,
    _dir: TempDir,
}

impl SimXenstored {
    fn start(name: &str) -> SimXenstored {
        let dir = std::env::temp_dir().join(format!("xenbackd-cli-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("xs.sock");
        let child = Command::new(XB)
            .args(["xenstored", "--socket"])
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while !socket.exists() && started.elapsed() < std::time::Duration::from_secs(20) {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        SimXenstored { child, socket, _dir: TempDir(dir) }
    }

    /// Runs `program` (xenbackd, or a link to it) with `args` against it.
    fn run(&self, program: &std::path::Path, args: &[&str]) -> Run {
        let Output { status, stdout, stderr } = Command::new(program)
            .args(args)
            .env("XENSTORED_PATH", &self.socket)
            .env_remove("RUST_LOG")
            .output()
            .expect("run");
        Run {
            code: status.code(),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        }
    }
}

impl Drop for SimXenstored {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `bench xs` works in a tree of its own: an existing `/bench` (or any
/// other node) is never touched, and its own tree is gone at the end.
#[test]
fn bench_xs_leaves_other_trees_alone_and_prints_ratios() {
    let xs = SimXenstored::start("benchxs");
    let xb = std::path::Path::new(XB);
    assert_eq!(xs.run(xb, &["xs", "write", "/bench/mine", "keep"]).code, Some(0));
    let socket = xs.socket.to_string_lossy().into_owned();
    let r = xs.run(xb, &["bench", "xs", "--ops", "64", "--socket", &socket]);
    let tree = xs.run(xb, &["xs", "ls", "/"]).stdout;
    assert_eq!(r.code, Some(0), "{} {}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains("ratio to 1 thread") && r.stdout.lines().filter(|l| l.ends_with('x')).count() == 3,
        "{}",
        r.stdout
    );
    assert!(tree.contains("mine = \"keep\""), "{tree}");
    assert!(!tree.contains("xenbackd-bench"), "its tree stayed: {tree}");
}

/// `xs control` and a `xenstore-control` link behave as Xen 4.17's tool:
/// usage (2), an answer printed (0), an unknown command answered with the
/// daemon's help (3).
#[test]
fn xenstore_control_as_xen_s_tool() {
    let xs = SimXenstored::start("control");
    let xb = std::path::Path::new(XB);
    let r = xs.run(xb, &["xs", "control"]);
    assert_eq!((r.code, r.stderr.as_str()), (Some(2), "Usage:\nxenbackd xs control <command> [<arg>...]\n"));
    let r = xs.run(xb, &["xs", "control", "quota"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.starts_with("Transaction nodes per transaction:"), "{}", r.stdout);
    let r = xs.run(xb, &["xs", "control", "check"]);
    assert_eq!((r.code, r.stdout.as_str()), (Some(0), "OK\n"), "{}", r.stderr);
    let r = xs.run(xb, &["xs", "control", "frobnicate"]);
    assert_eq!(r.code, Some(3));
    assert!(
        r.stderr.starts_with("Command not supported. Valid commands are:\nValid commands:\ncheck\n"),
        "{}",
        r.stderr
    );
    let r = xs.run(xb, &["xs", "control", "live-update", "-t"]);
    assert_eq!((r.code, r.stderr.as_str()), (Some(2), "Missing timeout value\n"));
    let r = xs.run(xb, &["xs", "control", "live-update", "/usr/sbin/xenstored"]);
    assert_eq!(r.code, Some(3), "{}", r.stderr);
    assert!(r.stderr.starts_with("Setting update binary failed:\n"), "{}", r.stderr);

    let link = xs.socket.with_file_name("xenstore-control");
    std::os::unix::fs::symlink(XB, &link).unwrap();
    let r = xs.run(&link, &["check"]);
    assert_eq!((r.code, r.stdout.as_str()), (Some(0), "OK\n"), "{}", r.stderr);
    let r = xs.run(&link, &[]);
    assert_eq!(r.code, Some(2));
    assert!(r.stderr.ends_with("xenstore-control <command> [<arg>...]\n"), "{}", r.stderr);
}

#[test]
fn console_log_options_need_the_primary_consoles() {
    for args in [&["serve", "--console-log-dir", "/tmp/x"][..], &["serve", "--force-consoles"]] {
        let r = xenbackd(args);
        assert_eq!(r.code, Some(2), "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("--consoles"), "{args:?}: {}", r.stderr);
    }
    let r = xenbackd(&["serve", "--console-overflow", "sometimes"]);
    assert_eq!(r.code, Some(2), "{}", r.stderr);
}
