//! `xenbackd xs read|write|ls|list|rm|mkdir|chmod|exists|watch`: the
//! xenstore-utils tools (Xen 4.17, `tools/xenstore/xenstore_client.c`) over the
//! pure-Rust client, with the same arguments, output bytes and exit status,
//! so that a dom0 image needs no libxenstore. Invoked through a symlink named
//! `xenstore-read` (etc.) it behaves as that tool. `mkdir` is an addition.
//!
//! Kept from the C tools, on purpose: options are parsed like `getopt_long`
//! (anywhere, combined, unknown ones warned about and ignored), `-h` and
//! misuse exit 1, several keys of `read`/`write` (and every `rm`, `list`,
//! `exists`, `chmod`) run in one transaction retried on `EAGAIN`, output is
//! printed only at the end, values are escaped as `sanitise_value()` does,
//! and `ls` truncates lines at 80 columns (the terminal width minus 2 on a
//! tty) unless `-f`. Messages start with the C tool's name (`xenstore-read:`).

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::OsStringExt;

use xs_wire::client::{Client, ClientError, TxId};
use xs_wire::{Access, Perm, XsErrno};

/// The tools (`enum mode` of the C source, plus `mkdir`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Mode {
    Chmod,
    Exists,
    List,
    Ls,
    Mkdir,
    Read,
    Rm,
    Write,
    Watch,
}

impl Mode {
    /// Every mode, as `xenstore-<name>` tools.
    pub const ALL: [Mode; 9] =
        [Mode::Chmod, Mode::Exists, Mode::List, Mode::Ls, Mode::Mkdir, Mode::Read, Mode::Rm, Mode::Write, Mode::Watch];

    fn parse(name: &str) -> Option<Mode> {
        Some(match name {
            "chmod" => Mode::Chmod,
            "exists" => Mode::Exists,
            "list" => Mode::List,
            "ls" => Mode::Ls,
            "mkdir" => Mode::Mkdir,
            "read" => Mode::Read,
            "rm" => Mode::Rm,
            "write" => Mode::Write,
            "watch" => Mode::Watch,
            _ => return None,
        })
    }

    /// The mode's name (`read` for `xenstore-read`).
    pub fn name(self) -> &'static str {
        match self {
            Mode::Chmod => "chmod",
            Mode::Exists => "exists",
            Mode::List => "list",
            Mode::Ls => "ls",
            Mode::Mkdir => "mkdir",
            Mode::Read => "read",
            Mode::Rm => "rm",
            Mode::Write => "write",
            Mode::Watch => "watch",
        }
    }

    /// The usage line after the program name (Xen 4.17's text).
    fn usage(self) -> &'static str {
        match self {
            Mode::Read => "[-h] [-p] [-s] [-R] key [...]",
            Mode::Write => "[-h] [-s] [-R] key value [...]",
            Mode::Rm => "[-h] [-s] [-t] key [...]",
            Mode::Exists | Mode::List => "[-h] [-p] [-s] key [...]",
            Mode::Ls => "[-h] [-f] [-p] [-s] [path]",
            Mode::Chmod => "[-h] [-u] [-r] [-s] key <mode [modes...]>",
            Mode::Watch => "[-h] [-n NR] key",
            Mode::Mkdir => "[-h] [-s] key [...]",
        }
    }

    /// Whether the tool runs in a transaction, given its argument count.
    fn transactional(self, nargs: usize) -> bool {
        match self {
            Mode::Read => nargs > 1,
            Mode::Write => nargs > 2,
            Mode::Ls | Mode::Watch => false,
            _ => true,
        }
    }
}

/// Flags, as `main()` of the C tool collects them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opts {
    prefix: bool,
    tidy: bool,
    upto: bool,
    recurse: bool,
    raw: bool,
    flat: bool,
    help: bool,
    /// `-n NR` of watch; -1 is "forever".
    nr_watches: i64,
}

/// A parsed command line: flags and positional arguments (as bytes).
#[derive(Debug, PartialEq, Eq)]
pub struct Invocation {
    mode: Mode,
    opts: Opts,
    args: Vec<Vec<u8>>,
}

/// Why the tool stops: the exit status, its message already printed.
struct Exit(u8);

const LONG_OPTS: [(&str, char, bool); 8] = [
    ("help", 'h', false),
    ("flat", 'f', false),
    ("prefix", 'p', false),
    ("tidy", 't', false),
    ("upto", 'u', false),
    ("recurse", 'r', false),
    ("number", 'n', true),
    ("raw", 'R', false),
];
const SHORT_OPTS: &str = "hfspturn:R";

/// C `atoi`: leading blanks, an optional sign, then digits; 0 if none.
fn atoi(s: &[u8]) -> i64 {
    let s = s.iter().skip_while(|b| b.is_ascii_whitespace()).copied().collect::<Vec<u8>>();
    let (neg, digits) = match s.first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, &s[..]),
    };
    let mut v: i64 = 0;
    for d in digits.iter().take_while(|b| b.is_ascii_digit()) {
        v = v.saturating_mul(10).saturating_add(i64::from(d - b'0'));
    }
    if neg {
        -v
    } else {
        v
    }
}

/// Parses arguments as `getopt_long(argc, argv, "hfspturn:R", ...)` with
/// GNU permutation does, then applies the per-mode checks of the C tool.
/// Warnings go to `err`; `Err(Exit)` after printing usage.
fn parse(mode: Mode, prog: &str, usage_name: &str, argv: &[Vec<u8>], err: &mut dyn Write) -> Result<Invocation, Exit> {
    let mut opts = Opts {
        prefix: false,
        tidy: false,
        upto: false,
        recurse: false,
        raw: false,
        flat: false,
        help: false,
        nr_watches: -1,
    };
    let mut args = Vec::new();
    let mut found: Vec<(char, Option<Vec<u8>>)> = Vec::new();
    let mut i = 0;
    while i < argv.len() {
        let a = &argv[i];
        i += 1;
        if a == b"--" {
            args.extend(argv[i..].iter().cloned());
            break;
        }
        if let Some(long) = a.strip_prefix(b"--") {
            let (name, value) = match long.iter().position(|&b| b == b'=') {
                Some(p) => (&long[..p], Some(long[p + 1..].to_vec())),
                None => (long, None),
            };
            let exact = LONG_OPTS.iter().find(|o| o.0.as_bytes() == name);
            let prefixed: Vec<_> = LONG_OPTS.iter().filter(|o| o.0.as_bytes().starts_with(name)).collect();
            let opt = exact.or(if prefixed.len() == 1 { Some(prefixed[0]) } else { None });
            let shown = String::from_utf8_lossy(a).into_owned();
            match opt {
                None => {
                    let _ = writeln!(err, "{prog}: unrecognized option '{shown}'");
                }
                Some(&(lname, c, true)) => match value {
                    Some(v) => found.push((c, Some(v))),
                    None if i < argv.len() => {
                        found.push((c, Some(argv[i].clone())));
                        i += 1;
                    }
                    None => {
                        let _ = writeln!(err, "{prog}: option '--{lname}' requires an argument");
                    }
                },
                Some(&(lname, c, false)) => {
                    if value.is_some() {
                        let _ = writeln!(err, "{prog}: option '--{lname}' doesn't allow an argument");
                    } else {
                        found.push((c, None));
                    }
                }
            }
            continue;
        }
        if a.len() > 1 && a[0] == b'-' {
            let mut j = 1;
            while j < a.len() {
                let c = a[j] as char;
                j += 1;
                let pos = SHORT_OPTS.find(c).filter(|_| c != ':');
                match pos {
                    None => {
                        let _ = writeln!(err, "{prog}: invalid option -- '{}'", String::from_utf8_lossy(&[c as u8]));
                    }
                    Some(p) if SHORT_OPTS[p + 1..].starts_with(':') => {
                        if j < a.len() {
                            found.push((c, Some(a[j..].to_vec())));
                        } else if i < argv.len() {
                            found.push((c, Some(argv[i].clone())));
                            i += 1;
                        } else {
                            let _ = writeln!(err, "{prog}: option requires an argument -- '{c}'");
                        }
                        break;
                    }
                    Some(_) => found.push((c, None)),
                }
            }
            continue;
        }
        args.push(a.clone());
    }
    let usage = |err: &mut dyn Write| {
        let _ = writeln!(err, "{prog}: Usage: {usage_name} {}", mode.usage());
        Exit(1)
    };
    for (c, value) in found {
        let allowed = match c {
            'h' => {
                opts.help = true;
                true
            }
            's' => true,
            'f' => mode == Mode::Ls,
            'p' => matches!(mode, Mode::Read | Mode::List | Mode::Ls),
            't' => mode == Mode::Rm,
            'u' | 'r' => mode == Mode::Chmod,
            'n' => mode == Mode::Watch,
            'R' => matches!(mode, Mode::Read | Mode::Write),
            _ => false,
        };
        if !allowed || opts.help {
            return Err(usage(err));
        }
        match c {
            'f' => opts.flat = true,
            'p' => opts.prefix = true,
            't' => opts.tidy = true,
            'u' => opts.upto = true,
            'r' => opts.recurse = true,
            'R' => opts.raw = true,
            'n' => opts.nr_watches = atoi(value.as_deref().unwrap_or_default()),
            _ => {}
        }
    }
    if mode == Mode::Write && args.len() % 2 == 1 {
        return Err(usage(err));
    }
    if mode != Mode::Ls && args.is_empty() {
        return Err(usage(err));
    }
    Ok(Invocation { mode, opts, args })
}

/// Escapes a value as `sanitise_value()` does: printable ASCII as is except
/// backslash; `\t \n \r \\`; bytes below 8 as `\ooo`; others as `\xhh`.
pub fn sanitise(value: &[u8]) -> String {
    let mut out = String::with_capacity(value.len());
    for &c in value {
        match c {
            b' '..=b'~' if c != b'\\' => out.push(c as char),
            b'\t' => out.push_str("\\t"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\\' => out.push_str("\\\\"),
            0..=7 => out.push_str(&format!("\\{c:03o}")),
            _ => out.push_str(&format!("\\x{c:02x}")),
        }
    }
    out
}

/// Undoes [`sanitise`] as `unsanitise_value()` does, quirks included: an
/// unknown escape yields the letter, `\x` without hex digits yields `x`,
/// and a trailing backslash yields a NUL byte.
pub fn unsanitise(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    // C strings end at the first NUL (argv cannot hold one anyway).
    let input = &input[..input.iter().position(|&b| b == 0).unwrap_or(input.len())];
    while i < input.len() {
        let c = input[i];
        i += 1;
        if c != b'\\' {
            out.push(c);
            continue;
        }
        let Some(&e) = input.get(i) else {
            out.push(0);
            break;
        };
        i += 1;
        match e {
            b't' => out.push(b'\t'),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b'\\' => out.push(b'\\'),
            b'x' => {
                let digits = input[i..].iter().take(2).take_while(|b| b.is_ascii_hexdigit()).count();
                if digits == 0 {
                    out.push(b'x');
                } else {
                    let text = std::str::from_utf8(&input[i..i + digits]).expect("hex digits are ASCII");
                    out.push(u8::from_str_radix(text, 16).expect("hex digits checked"));
                    i += digits;
                }
            }
            b'0'..=b'7' => {
                let start = i - 1;
                let digits = input[start..].iter().take(3).take_while(|b| (b'0'..=b'7').contains(b)).count();
                let text = std::str::from_utf8(&input[start..start + digits]).expect("octal digits are ASCII");
                out.push((u32::from_str_radix(text, 8).expect("octal digits checked") & 0xff) as u8);
                i = start + digits;
            }
            other => out.push(other),
        }
    }
    out
}

/// What `strerror` says for the error behind a client failure.
pub(crate) fn describe(e: &ClientError) -> String {
    if let Some(errno) = e.errno() {
        return errno.describe();
    }
    match e {
        ClientError::Connect(t) => {
            match std::error::Error::source(t).and_then(|s| s.downcast_ref::<std::io::Error>()) {
                Some(io) => io.to_string().split(" (os error").next().unwrap_or_default().to_string(),
                None => t.to_string(),
            }
        }
        ClientError::Timeout { .. } => XsErrno::EIO.describe(),
        other => other.to_string(),
    }
}

/// The stdout terminal's width in columns, if stdout is a terminal.
fn terminal_columns() -> Option<i64> {
    let mut ws = nix::libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one `struct winsize` into the valid, writable
    // `ws`; fd 1 is only queried.
    let rc = unsafe { nix::libc::ioctl(1, nix::libc::TIOCGWINSZ, &mut ws as *mut nix::libc::winsize) };
    (rc == 0).then_some(i64::from(ws.ws_col))
}

/// `printf("%.*s", prec, s)` for ASCII `s`: a negative precision prints all.
fn clip(s: &str, prec: i64) -> &str {
    match usize::try_from(prec) {
        Ok(p) if p < s.len() => &s[..p],
        _ => s,
    }
}

const TAG_LEN: i64 = 8; // strlen(" = \"...\"")

/// `xenstore-ls` state: widths as the C tool computes them.
struct Ls<'a> {
    client: &'a Client,
    prog: &'a str,
    max_width: i64,
    desired_width: i64,
    whole_path: bool,
    show_perms: bool,
}

impl Ls<'_> {
    fn run(&self, path: &str, depth: i64, out: &mut Vec<u8>, err: &mut dyn Write) -> Result<(), Exit> {
        let names = match self.client.directory(TxId::NONE, path) {
            Ok(n) => n,
            Err(e) if depth > 0 && e.errno() == Some(XsErrno::ENOENT) => return Ok(()),
            Err(e) => {
                let _ = writeln!(err, "{}: xs_directory ({path}): {}", self.prog, describe(&e));
                return Err(Exit(1));
            }
        };
        for name in &names {
            let sep = if path.ends_with('/') { "" } else { "/" };
            let newpath = format!("{path}{sep}{name}");
            let mut linewid: i64 = 0;
            if self.whole_path {
                out.extend_from_slice(newpath.as_bytes());
            } else {
                out.extend(std::iter::repeat(b' ').take(depth as usize));
                linewid = depth;
                let shown = clip(name, self.max_width - TAG_LEN - linewid);
                out.extend_from_slice(shown.as_bytes());
                linewid += shown.len() as i64;
            }
            match self.client.read(TxId::NONE, &newpath) {
                Err(_) => out.extend_from_slice(b":\n"),
                Ok(val) => {
                    let san = sanitise(&val);
                    if self.max_width >= 0 && self.max_width < linewid + val.len() as i64 + TAG_LEN {
                        let shown = clip(&san, self.max_width - TAG_LEN - linewid);
                        out.extend_from_slice(format!(" = \"{shown}\\...\"").as_bytes());
                    } else {
                        out.extend_from_slice(format!(" = \"{san}\"").as_bytes());
                        linewid += san.len() as i64 + 5;
                        if self.show_perms {
                            out.push(b' ');
                            linewid += 1;
                            while linewid < self.desired_width.min(self.max_width) {
                                out.push(if linewid & 1 == 1 { b'.' } else { b' ' });
                                linewid += 1;
                            }
                        }
                    }
                }
            }
            if self.show_perms {
                match self.client.get_perms(TxId::NONE, &newpath) {
                    Err(e) => {
                        let _ =
                            writeln!(err, "{}: \ncould not access permissions for {name}: {}", self.prog, describe(&e));
                    }
                    Ok(perms) => {
                        let list: Vec<String> = perms.iter().map(Perm::to_string).collect();
                        out.extend_from_slice(format!("  ({})", list.join(",")).as_bytes());
                    }
                }
            }
            out.push(b'\n');
            // Print as we go, as the C tool does (it uses stdio, not its buffer).
            flush_stdout(out);
            self.run(&newpath, depth + 1, out, err)?;
        }
        Ok(())
    }
}

fn flush_stdout(buf: &mut Vec<u8>) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(buf);
    let _ = stdout.flush();
    buf.clear();
}

fn text(arg: &[u8]) -> String {
    String::from_utf8_lossy(arg).into_owned()
}

/// A path argument: the client takes `&str`; bytes that are not UTF-8 would
/// be refused by xenstored anyway, and the lossy form is refused locally.
fn path_of(arg: &[u8]) -> String {
    text(arg)
}

/// One pass of `perform()`: returns the exit status (0 or 1), or `Exit` for
/// the C tool's `err()`/`errx()` calls.
fn perform(
    c: &Client,
    inv: &Invocation,
    tx: TxId,
    prog: &str,
    out: &mut Vec<u8>,
    err: &mut dyn Write,
) -> Result<u8, Exit> {
    let o = &inv.opts;
    match inv.mode {
        Mode::Read => {
            for arg in &inv.args {
                let path = path_of(arg);
                let Ok(val) = c.read(tx, &path) else {
                    let _ = writeln!(err, "{prog}: couldn't read path {path}");
                    return Ok(1);
                };
                if o.prefix {
                    out.extend_from_slice(format!("{path}: ").as_bytes());
                }
                if o.raw {
                    out.extend_from_slice(&val);
                } else {
                    out.extend_from_slice(sanitise(&val).as_bytes());
                    out.push(b'\n');
                }
            }
        }
        Mode::Write => {
            for pair in inv.args.chunks(2) {
                let path = path_of(&pair[0]);
                let val = if o.raw { pair[1].clone() } else { unsanitise(&pair[1]) };
                if c.write(tx, &path, &val).is_err() {
                    let _ = writeln!(err, "{prog}: could not write path {path}");
                    return Ok(1);
                }
            }
        }
        Mode::Mkdir => {
            for arg in &inv.args {
                let path = path_of(arg);
                if c.mkdir(tx, &path).is_err() {
                    let _ = writeln!(err, "{prog}: could not create path {path}");
                    return Ok(1);
                }
            }
        }
        Mode::Rm => {
            for arg in &inv.args {
                let mut path = path_of(arg);
                loop {
                    if c.rm(tx, &path).is_err() {
                        let _ = writeln!(err, "{prog}: could not remove path {path}");
                        return Ok(1);
                    }
                    if !o.tidy {
                        break;
                    }
                    // -t: also remove parents left empty and without a value.
                    let Some(slash) = path.rfind('/') else { break };
                    path.truncate(slash);
                    let empty_value = matches!(c.read(tx, &path), Ok(v) if v.is_empty());
                    if !(empty_value && matches!(c.directory(tx, &path), Ok(l) if l.is_empty())) {
                        break;
                    }
                }
            }
        }
        Mode::Exists => {
            for arg in &inv.args {
                if c.read(tx, &path_of(arg)).is_err() {
                    return Ok(1);
                }
            }
        }
        Mode::List => {
            for arg in &inv.args {
                let path = path_of(arg);
                let Ok(list) = c.directory(tx, &path) else {
                    let _ = writeln!(err, "{prog}: could not list path {path}");
                    return Ok(1);
                };
                for name in list {
                    // Xen 4.17 prints "//name" for "-p /" (later versions drop one slash).
                    if o.prefix {
                        out.extend_from_slice(format!("{path}/").as_bytes());
                    }
                    out.extend_from_slice(format!("{name}\n").as_bytes());
                }
            }
        }
        Mode::Ls => {
            let mut max_width = if o.flat { i64::from(i32::MAX / 2) } else { 80 };
            if let Some(cols) = terminal_columns() {
                max_width = cols - 2;
            }
            let ls = Ls {
                client: c,
                prog,
                max_width,
                desired_width: if o.flat { 0 } else { 60 },
                whole_path: o.flat,
                show_perms: o.prefix,
            };
            let roots = if inv.args.is_empty() { vec![b"/".to_vec()] } else { inv.args.clone() };
            for root in roots {
                ls.run(&path_of(&root), 0, out, err)?;
            }
        }
        Mode::Chmod => {
            let path = path_of(&inv.args[0]);
            let mut perms = Vec::new();
            for spec in &inv.args[1..] {
                let access = match spec.first() {
                    Some(b'n') => Access::None,
                    Some(b'r') => Access::Read,
                    Some(b'w') => Access::Write,
                    Some(b'b') => Access::Both,
                    other => {
                        let shown = other.map(|&b| text(&[b])).unwrap_or_default();
                        let _ = writeln!(err, "{prog}: Invalid permission specification: '{shown}'");
                        return Err(Exit(1));
                    }
                };
                perms.push(Perm { access, domid: atoi(&spec[1..]) as u32 });
            }
            chmod(c, tx, prog, &path, &perms, o.upto, o.recurse, err)?;
        }
        Mode::Watch => {
            for arg in &inv.args {
                let path = path_of(arg);
                if c.watch(&path, &path).is_err() {
                    let _ = writeln!(err, "{prog}: Unable to add watch on {path}\n");
                    return Err(Exit(1));
                }
            }
            let events = c.events();
            let mut count: i64 = 0;
            while o.nr_watches == -1 || count < o.nr_watches {
                let Ok(ev) = events.recv() else { return Err(Exit(1)) };
                if ev.is_overflow() {
                    continue;
                }
                out.extend_from_slice(format!("{}\n", ev.path).as_bytes());
                flush_stdout(out);
                count += 1;
            }
        }
    }
    Ok(0)
}

#[allow(clippy::too_many_arguments)]
fn chmod(
    c: &Client,
    tx: TxId,
    prog: &str,
    path: &str,
    perms: &[Perm],
    upto: bool,
    recurse: bool,
    err: &mut dyn Write,
) -> Result<(), Exit> {
    if path.is_empty() {
        return Ok(());
    }
    if let Err(e) = c.set_perms(tx, path, perms) {
        let _ = writeln!(err, "{prog}: Error occurred setting permissions on '{path}': {}", describe(&e));
        return Err(Exit(1));
    }
    if upto {
        let Some(slash) = path.rfind('/') else {
            let _ = writeln!(err, "{prog}: Unable to locate path separator '/' in '{path}'");
            return Err(Exit(1));
        };
        chmod(c, tx, prog, &path[..slash], perms, true, false, err)?;
    }
    if recurse {
        if let Ok(children) = c.directory(tx, path) {
            for child in children {
                chmod(c, tx, prog, &format!("{path}/{child}"), perms, false, true, err)?;
            }
        }
    }
    Ok(())
}

/// Runs a parsed invocation against xenstore; returns the exit status.
fn execute(inv: &Invocation, prog: &str, err: &mut dyn Write) -> u8 {
    let client = match Client::connect() {
        Ok(c) => c,
        Err(e) => {
            let _ = writeln!(err, "{prog}: xs_open: {}", describe(&e));
            return 1;
        }
    };
    let transactional = inv.mode.transactional(inv.args.len());
    let mut out = Vec::new();
    loop {
        out.clear();
        let tx = if transactional {
            match client.transaction_start() {
                Ok(tx) => tx,
                Err(_) => {
                    let _ = writeln!(err, "{prog}: couldn't start transaction");
                    return 1;
                }
            }
        } else {
            TxId::NONE
        };
        let ret = match perform(&client, inv, tx, prog, &mut out, err) {
            Ok(r) => r,
            // err()/errx() exit at once: the buffered output is not printed.
            Err(Exit(code)) => return code,
        };
        if transactional {
            if let Err(e) = client.transaction_end(tx, ret == 0) {
                if ret == 0 && e.errno() == Some(XsErrno::EAGAIN) {
                    continue;
                }
                let _ = writeln!(err, "{prog}: couldn't end transaction");
                return 1;
            }
        }
        flush_stdout(&mut out);
        return ret;
    }
}

/// Runs tool `mode` with its arguments; `prog` names it in messages.
fn run_tool(mode: Mode, prog: &str, usage_name: &str, argv: Vec<OsString>) -> u8 {
    let argv: Vec<Vec<u8>> = argv.into_iter().map(OsStringExt::into_vec).collect();
    let mut err = std::io::stderr();
    match parse(mode, prog, usage_name, &argv, &mut err) {
        Ok(inv) => execute(&inv, prog, &mut err),
        Err(Exit(code)) => code,
    }
}

/// As the C tools: a closed pipe on stdout ends the process (`xs watch /w |
/// head -1` exits, status 141 in the shell; `xs ls / | head` stops walking).
/// Rust ignores SIGPIPE by default, so its default action is restored.
fn die_on_broken_pipe() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: SIG_DFL installs no handler, so nothing runs in signal
    // context; done before the tool starts any thread.
    if let Err(e) = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) } {
        log::debug!("restoring SIGPIPE: {e}");
    }
}

/// `xenbackd xs <mode> args...`; the arguments may not be UTF-8 (values
/// written with `-R`), and clap passes them on untouched.
pub fn run_os(mut args: Vec<OsString>) -> anyhow::Result<u8> {
    die_on_broken_pipe();
    const MODES: &str = "read write ls list rm mkdir chmod exists watch control";
    if args.is_empty() {
        eprintln!("xenstore: Usage: xenbackd xs <mode> [-h] [...]\n  modes: {MODES}");
        return Ok(1);
    }
    let name = args.remove(0).to_string_lossy().into_owned();
    if matches!(name.as_str(), "-h" | "--help" | "help") {
        println!("Usage: xenbackd xs <mode> [-h] [...]\n  modes: {MODES}");
        return Ok(0);
    }
    if name == "control" {
        return Ok(crate::xs_control::run("xenbackd xs control", args));
    }
    let Some(mode) = Mode::parse(&name) else {
        eprintln!("xenstore: unknown mode {name}\n");
        return Ok(1);
    };
    let prog = format!("xenstore-{}", mode.name());
    Ok(run_tool(mode, &prog, &format!("xenbackd xs {}", mode.name()), args))
}

/// Whether `argv0` names one of the tools (`xenstore`, `xenstore-read`, ...).
pub fn is_tool_name(argv0: &str) -> bool {
    let base = argv0.rsplit('/').next().unwrap_or(argv0);
    base == "xenstore" || base == CONTROL_TOOL || base.strip_prefix("xenstore-").and_then(Mode::parse).is_some()
}

/// `xenstore-control`, which has no getopt options ([`crate::xs_control`]).
pub const CONTROL_TOOL: &str = "xenstore-control";

/// Runs as the tool named by `argv[0]` (`xenstore-read`, ... through a
/// symlink to `xenbackd`), or as the `xenstore <mode>` multicall. `None` if
/// the name is not one of them.
pub fn run_as(argv0: &str, args: Vec<OsString>) -> Option<u8> {
    die_on_broken_pipe();
    let base = argv0.rsplit('/').next().unwrap_or(argv0);
    if base == "xenstore" {
        return Some(run_os(args).unwrap_or(1));
    }
    if base == CONTROL_TOOL {
        return Some(crate::xs_control::run(base, args));
    }
    let mode = Mode::parse(base.strip_prefix("xenstore-")?)?;
    Some(run_tool(mode, base, base, args))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<Vec<u8>> {
        a.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    fn parse_ok(mode: Mode, a: &[&str]) -> (Invocation, String) {
        let mut err = Vec::new();
        let inv = parse(mode, "xenstore-x", "x", &argv(a), &mut err).unwrap_or_else(|_| panic!("usage for {a:?}"));
        (inv, String::from_utf8(err).unwrap())
    }

    #[test]
    fn sanitise_escapes_like_xenstore_client() {
        assert_eq!(sanitise(b"a b\"'~"), "a b\"'~");
        assert_eq!(sanitise(b"\t\n\r\\"), "\\t\\n\\r\\\\");
        assert_eq!(sanitise(b"\x00\x07\x08\x1f\x7f\xff"), "\\000\\007\\x08\\x1f\\x7f\\xff");
    }

    #[test]
    fn unsanitise_inverts_sanitise_for_every_byte() {
        let all: Vec<u8> = (1..=255).collect();
        assert_eq!(unsanitise(sanitise(&all).as_bytes()), all);
        assert_eq!(unsanitise(b"\\000x"), b"\0x");
    }

    #[test]
    fn unsanitise_keeps_c_quirks() {
        assert_eq!(unsanitise(b"a\\qb"), b"aqb");
        assert_eq!(unsanitise(b"\\xzz"), b"xzz");
        assert_eq!(unsanitise(b"\\x4"), b"\x04");
        assert_eq!(unsanitise(b"\\1012"), b"A2");
        assert_eq!(unsanitise(b"\\777"), b"\xff");
        assert_eq!(unsanitise(b"end\\"), b"end\0");
    }

    #[test]
    fn options_anywhere_combined_and_after_double_dash() {
        let (inv, _) = parse_ok(Mode::Read, &["/a", "-pR", "/b", "--", "-c"]);
        assert!(inv.opts.prefix && inv.opts.raw);
        assert_eq!(inv.args, argv(&["/a", "/b", "-c"]));
        let (w, _) = parse_ok(Mode::Watch, &["-n2", "/a", "--number", "3"]);
        assert_eq!(w.opts.nr_watches, 3);
        let (l, _) = parse_ok(Mode::Ls, &["--fl", "-s"]);
        assert!(l.opts.flat && l.args.is_empty());
    }

    #[test]
    fn unknown_options_are_warned_and_ignored() {
        let (inv, err) = parse_ok(Mode::Read, &["-x", "--bogus", "/a"]);
        assert_eq!(inv.args, argv(&["/a"]));
        assert_eq!(err, "xenstore-x: invalid option -- 'x'\nxenstore-x: unrecognized option '--bogus'\n");
    }

    #[test]
    fn misuse_prints_usage_and_exits_1() {
        for (mode, a) in [
            (Mode::Read, &[][..]),
            (Mode::Write, &["/a"][..]),
            (Mode::Read, &["-t", "/a"][..]),
            (Mode::Rm, &["-h", "/a"][..]),
            (Mode::Exists, &["-p", "/a"][..]),
        ] {
            let mut err = Vec::new();
            let r = parse(mode, "xenstore-x", "xenstore-x", &argv(a), &mut err);
            assert!(matches!(r, Err(Exit(1))), "{mode:?} {a:?}");
            let text = String::from_utf8(err).unwrap();
            assert!(text.starts_with("xenstore-x: Usage: xenstore-x "), "{text}");
        }
    }

    #[test]
    fn transactions_as_the_c_tools_use_them() {
        assert!(!Mode::Read.transactional(1) && Mode::Read.transactional(2));
        assert!(!Mode::Write.transactional(2) && Mode::Write.transactional(4));
        assert!(Mode::Rm.transactional(1) && !Mode::Ls.transactional(3) && !Mode::Watch.transactional(1));
    }

    #[test]
    fn atoi_is_lenient_like_c() {
        assert_eq!(atoi(b"12x"), 12);
        assert_eq!(atoi(b" -3"), -3);
        assert_eq!(atoi(b""), 0);
        assert_eq!(atoi(b"x"), 0);
    }

    #[test]
    fn clip_follows_printf_precision() {
        assert_eq!(clip("abcdef", 3), "abc");
        assert_eq!(clip("abc", 10), "abc");
        assert_eq!(clip("abc", -1), "abc");
        assert_eq!(clip("abc", 0), "");
    }
}
