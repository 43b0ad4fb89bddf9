//! `xenbackd xs` against Debian's xenstore-utils (the C tools over
//! libxenstore), both pointed at the simulated xenstored with
//! `XENSTORED_PATH`: the same arguments must give the same stdout, stderr and
//! exit status byte for byte, and mutations must leave equal trees. Skipped,
//! with the reason printed, when xenstore-utils is not installed.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use xen_sim::xenstored::{SocketServer, Xenstored};

const XB: &str = env!("CARGO_BIN_EXE_xenbackd");

struct Env {
    sock: PathBuf,
    _server: SocketServer,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn have_xenstore_utils() -> bool {
    Command::new("xenstore-read").arg("-h").stderr(Stdio::null()).status().is_ok()
}

fn start(name: &str) -> Option<Env> {
    if !have_xenstore_utils() {
        eprintln!("SKIP: xenstore-utils is not installed (apt-get install xenstore-utils)");
        return None;
    }
    let dir = std::env::temp_dir().join(format!("xs-compat-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("socket");
    let server = Xenstored::new().serve_socket(&sock).expect("serve the simulated xenstored");
    Some(Env { sock, _server: server, _dir: TempDir(dir) })
}

fn os(s: &str) -> OsString {
    OsString::from(s)
}

fn bytes(b: &[u8]) -> OsString {
    OsString::from_vec(b.to_vec())
}

impl Env {
    fn run(&self, program: &str, args: &[OsString]) -> Output {
        Command::new(program)
            .args(args)
            .env("XENSTORED_PATH", &self.sock)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
    }

    fn c_tool(&self, op: &str, args: &[OsString]) -> Output {
        self.run(&format!("xenstore-{op}"), args)
    }

    fn ours(&self, op: &str, args: &[OsString]) -> Output {
        let mut all = vec![os("xs"), os(op)];
        all.extend_from_slice(args);
        let mut out = self.run(XB, &all);
        // Usage lines name the program as invoked; everything else must be equal.
        let from = format!("Usage: xenbackd xs {op} ");
        let to = format!("Usage: xenstore-{op} ");
        out.stderr = replace(&out.stderr, from.as_bytes(), to.as_bytes());
        out
    }

    /// Runs both tools with the same arguments and compares everything.
    fn same(&self, op: &str, args: &[OsString]) {
        let c = self.c_tool(op, args);
        let r = self.ours(op, args);
        assert_same(op, args, &c, &r);
    }

    /// Runs the C tool on `/cmp/ref` and ours on `/cmp/our` (`@` in an argument
    /// stands for the subtree), compares output and the resulting trees.
    fn mutate(&self, op: &str, args: &[&[u8]]) {
        let on =
            |root: &str| -> Vec<OsString> { args.iter().map(|a| bytes(&replace(a, b"@", root.as_bytes()))).collect() };
        let c = self.c_tool(op, &on("/cmp/ref"));
        let r = self.ours(op, &on("/cmp/our"));
        let norm = |o: Output, root: &str| Output {
            status: o.status,
            stdout: replace(&o.stdout, root.as_bytes(), b"@"),
            stderr: replace(&o.stderr, root.as_bytes(), b"@"),
        };
        let shown: Vec<OsString> = args.iter().map(|a| bytes(a)).collect();
        assert_same(op, &shown, &norm(c, "/cmp/ref"), &norm(r, "/cmp/our"));
        assert_eq!(
            String::from_utf8_lossy(&self.dump("/cmp/ref")),
            String::from_utf8_lossy(&self.dump("/cmp/our")),
            "trees differ after {op} {shown:?}"
        );
    }

    /// The subtree as `xenstore-ls -f -p` prints it, with the root replaced by `@`.
    fn dump(&self, root: &str) -> Vec<u8> {
        let out = self.c_tool("ls", &[os("-f"), os("-p"), os(root)]);
        let mut all = out.stdout;
        all.extend_from_slice(&out.stderr);
        replace(&all, root.as_bytes(), b"@")
    }
}

fn replace(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(hay.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    out
}

fn assert_same(op: &str, args: &[OsString], c: &Output, r: &Output) {
    let what = format!("{op} {args:?}");
    assert_eq!(
        r.status.code(),
        c.status.code(),
        "exit status of {what}; C stderr {:?}",
        String::from_utf8_lossy(&c.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&r.stdout), String::from_utf8_lossy(&c.stdout), "stdout of {what}");
    assert_eq!(r.stdout, c.stdout, "stdout bytes of {what}");
    assert_eq!(String::from_utf8_lossy(&r.stderr), String::from_utf8_lossy(&c.stderr), "stderr of {what}");
}

fn fixture(env: &Env) {
    let long = "0123456789abcdefghijklmnopqrstuvwxyz".repeat(3);
    let args: Vec<OsString> = [
        ("/lab/tree/a", "1"),
        ("/lab/tree/b", "two words"),
        ("/lab/tree/c/d", "deep"),
        ("/lab/tree/e", ""),
        ("/lab/tree/long", long.as_str()),
        ("/lab/tree/esc", "tab\\there \\\"q\\\" \\x01\\xff"),
        ("/lab/tree/deep/very/deeply/nested/node/with/a/rather/long/name/indeed", long.as_str()),
    ]
    .iter()
    .flat_map(|(k, v)| [os(k), os(v)])
    .collect();
    assert!(env.c_tool("write", &args).status.success());
    assert!(env.c_tool("chmod", &[os("/lab/tree/b"), os("n0"), os("r3"), os("w4")]).status.success());
}

#[test]
fn read_list_exists_and_ls_print_what_xenstore_utils_print() {
    let Some(env) = start("read") else { return };
    fixture(&env);
    let cases: &[&[&str]] = &[
        &["read", "/lab/tree/a"],
        &["read", "/lab/tree/a", "/lab/tree/b", "/lab/tree/c/d"],
        &["read", "-p", "/lab/tree/a", "/lab/tree/b"],
        &["read", "/lab/tree/e"],
        &["read", "/lab/tree/esc"],
        &["read", "-R", "/lab/tree/esc"],
        &["read", "/lab/tree/a", "/lab/missing", "/lab/tree/b"],
        &["read", "/lab/missing"],
        &["read", "bad path"],
        &["read", "-x", "--bogus", "/lab/tree/a"],
        &["read", "--pre", "/lab/tree/a"],
        &["read", "-s", "/lab/tree/a"],
        &["list", "/lab/tree"],
        &["list", "-p", "/lab/tree"],
        &["list", "-p", "/"],
        &["list", "/lab/missing"],
        &["exists", "/lab/tree/a"],
        &["exists", "/lab/tree/a", "/lab/missing"],
        &["ls", "/lab"],
        &["ls", "-p", "/lab"],
        &["ls", "-f", "/lab"],
        &["ls", "-f", "-p", "/lab"],
        &["ls", "/lab/tree/deep"],
        &["ls", "-p", "/lab/tree/deep"],
        &["ls", "/lab/tree/c", "/lab/tree/deep/very"],
        &["ls", "/lab/missing"],
    ];
    for case in cases {
        let args: Vec<OsString> = case[1..].iter().map(|a| os(a)).collect();
        env.same(case[0], &args);
    }
}

#[test]
fn misuse_gives_the_same_usage_error_and_status() {
    let Some(env) = start("usage") else { return };
    let cases: &[&[&str]] = &[
        &["read"],
        &["read", "-h"],
        &["read", "-t", "/a"],
        &["write", "/a"],
        &["write", "-h"],
        &["rm"],
        &["exists", "-p", "/a"],
        &["list"],
        &["chmod", "-p", "/a", "r0"],
        &["watch", "-n", "1"],
        &["ls", "-t"],
    ];
    for case in cases {
        let args: Vec<OsString> = case[1..].iter().map(|a| os(a)).collect();
        env.same(case[0], &args);
    }
}

#[test]
fn writes_removes_and_chmods_leave_the_same_trees() {
    let Some(env) = start("mutate") else { return };
    let cases: &[(&str, &[&[u8]])] = &[
        ("write", &[b"@/a", b"1", b"@/b", b"two words", b"@/c/d", b"deep", b"@/e", b""]),
        ("write", &[b"@/esc", b"tab\\there\\n\\x41\\101\\\\back\\q\\xzz end\\"]),
        ("write", &[b"@/raw", b"-R"]),
        ("write", &[b"-R", b"@/raw", b"tab\\there\\n"]),
        ("write", &[b"@/quotes", b"quote\"d 'single'"]),
        ("write", &[b"@/newline", b"line1\nline2"]),
        ("write", &[b"-R", b"@/binary", b"\xc3\xa9\xff\x01 "]),
        ("write", &[b"@/binary2", b"\xc3\xa9\xff"]),
        ("write", &[b"bad key", b"v"]),
        ("read", &[b"@/binary"]),
        ("read", &[b"-R", b"@/binary"]),
        ("chmod", &[b"@/a", b"n0", b"r3", b"w4", b"b5"]),
        ("chmod", &[b"-r", b"@/c", b"r1"]),
        ("chmod", &[b"-u", b"@/c/d", b"b7"]),
        ("chmod", &[b"@/a", b"z1"]),
        ("chmod", &[b"@/a", b"r12junk"]),
        ("chmod", &[b"@/missing", b"r1"]),
        ("rm", &[b"@/a"]),
        ("rm", &[b"@/missing"]),
        ("rm", &[b"@/no/such/parent"]),
        ("write", &[b"@/t1/t2/t3", b"x"]),
        ("rm", &[b"-t", b"@/t1/t2/t3"]),
        ("write", &[b"@/u1/u2", b"x", b"@/u1", b"value"]),
        ("rm", &[b"-t", b"@/u1/u2"]),
        ("rm", &[b"@/b", b"@/c"]),
        ("ls", &[b"-p", b"@"]),
        ("list", &[b"@"]),
        ("exists", &[b"@/e", b"@/esc"]),
    ];
    for (op, args) in cases {
        env.mutate(op, args);
    }
}

#[test]
fn mkdir_creates_empty_nodes_readable_by_the_c_tools() {
    let Some(env) = start("mkdir") else { return };
    let out = env.ours("mkdir", &[os("/mk/a/b"), os("/mk/c")]);
    assert!(out.status.success(), "{:?}", String::from_utf8_lossy(&out.stderr));
    let ls = env.c_tool("ls", &[os("/mk")]);
    assert_eq!(String::from_utf8_lossy(&ls.stdout), "a = \"\"\n b = \"\"\nc = \"\"\n");
    let bad = env.ours("mkdir", &[os("bad key")]);
    assert_eq!(bad.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&bad.stderr), "xenstore-mkdir: could not create path bad key\n");
}

/// Both watchers print their first `n` events; a writer keeps changing a node
/// below the watched one until both have exited.
#[test]
fn watch_prints_the_same_events() {
    let Some(env) = start("watch") else { return };
    assert!(env.c_tool("write", &[os("/w/x"), os("0")]).status.success());
    let spawn = |program: &str, pre: &[&str]| {
        Command::new(program)
            .args(pre)
            .args(["-n", "2", "/w"])
            .env("XENSTORED_PATH", &env.sock)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut c = spawn("xenstore-watch", &[]);
    let mut r = spawn(XB, &["xs", "watch"]);
    let mut i = 0u64;
    while c.try_wait().unwrap().is_none() || r.try_wait().unwrap().is_none() {
        i += 1;
        assert!(i < 100_000, "watchers did not exit");
        assert!(env.c_tool("write", &[os("/w/x"), os(&i.to_string())]).status.success());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (c, r) = (c.wait_with_output().unwrap(), r.wait_with_output().unwrap());
    assert_same("watch", &[os("-n"), os("2"), os("/w")], &c, &r);
    assert_eq!(String::from_utf8_lossy(&r.stdout), "/w\n/w/x\n");
}

#[test]
fn tools_run_as_xenstore_star_through_a_symlink() {
    let Some(env) = start("symlink") else { return };
    fixture(&env);
    let link = env._dir.0.join("xenstore-read");
    std::os::unix::fs::symlink(Path::new(XB), &link).unwrap();
    let r = env.run(link.to_str().unwrap(), &[os("/lab/tree/b"), os("/lab/missing")]);
    let c = env.c_tool("read", &[os("/lab/tree/b"), os("/lab/missing")]);
    assert_same("read via symlink", &[], &c, &r);
}

/// Issue 17: with its reader gone, a watch dies of SIGPIPE at its next
/// event, as the C tool does (status 141 in a shell), instead of watching
/// for ever.
#[test]
fn watch_whose_reader_is_gone_dies_of_sigpipe_like_the_c_tool() {
    use std::os::unix::process::ExitStatusExt;
    let Some(env) = start("sigpipe") else { return };
    assert!(env.c_tool("write", &[os("/p"), os("0")]).status.success());
    let spawn = |program: &str, pre: &[&str]| {
        let mut child = Command::new(program)
            .args(pre)
            .arg("/p")
            .env("XENSTORED_PATH", &env.sock)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The reader goes away at once.
        drop(child.stdout.take());
        child
    };
    let mut c = spawn("xenstore-watch", &[]);
    let mut r = spawn(XB, &["xs", "watch"]);
    let mut i = 0u64;
    while c.try_wait().unwrap().is_none() || r.try_wait().unwrap().is_none() {
        i += 1;
        assert!(i < 500, "a watcher did not exit: C {:?}, ours {:?}", c.try_wait(), r.try_wait());
        assert!(env.c_tool("write", &[os("/p"), os(&i.to_string())]).status.success());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (c, r) = (c.wait().unwrap(), r.wait().unwrap());
    assert_eq!(c.signal(), Some(nix::libc::SIGPIPE), "the C tool: {c:?}");
    assert_eq!(r.signal(), Some(nix::libc::SIGPIPE), "ours: {r:?}");
}
