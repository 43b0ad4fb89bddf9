//! `xenbackd bench xs [--socket PATH | --system] [--ops N]`: xenstore client
//! throughput (operations per second) for read, write and directory, from 1
//! and 16 threads sharing one connection, and pipelined batches from one
//! thread. By default against the simulated xenstored in this process;
//! `--socket` names a xenstored socket, `--system` connects as libxenstore
//! would (`XENSTORED_PATH`, the xenstored socket, `/dev/xen/xenbus`). The
//! baseline is the one thread waiting for each reply, as a C client using
//! libxenstore's `xs_read`/`xs_write` does: the other columns give their
//! ratio to it. It writes below a tree of its own, `/xenbackd-bench-<pid>`
//! (refused if it exists), and removes that tree at the end.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use xs_wire::client::{Client, Request, TxId};

use crate::cli::count;

/// Most operations per case `--ops` takes.
const MAX_OPS: u64 = 100_000_000;

/// Xenstore client throughput
///
/// Xenstore client throughput (operations per second) for read, write and
/// directory, from 1 and 16 threads sharing one connection, and pipelined
/// batches of 64 from one thread. By default against the simulated
/// xenstored in this process. The baseline is one thread waiting for each
/// reply (as a C client calling libxenstore's xs_read/xs_write does); the
/// other columns give their ratio to it. It writes below a tree of its own,
/// /xenbackd-bench-<pid> (refused if it exists), and removes it at the end.
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct XsBenchArgs {
    /// A xenstored's unix socket
    #[arg(long, value_name = "PATH", conflicts_with = "system")]
    socket: Option<PathBuf>,
    /// Connect as libxenstore would (XENSTORED_PATH, the xenstored socket,
    /// /dev/xen/xenbus)
    #[arg(long)]
    system: bool,
    /// Operations per case, 16 (one per thread) to 100000000
    #[arg(long, value_name = "N", default_value_t = 32_000, value_parser = count(16..=MAX_OPS), allow_negative_numbers = true)]
    ops: usize,
}

/// Requests per pipelined batch.
const BATCH: usize = 64;
/// Children of the node listed by the directory benchmark.
const DIR_CHILDREN: usize = 32;

#[derive(Clone, Copy, Debug)]
enum Op {
    Read,
    Write,
    Directory,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Directory => "directory",
        }
    }

    fn request(self, root: &str, thread: usize, i: usize) -> Result<Request> {
        let key = format!("{root}/t{thread}/k{}", i % 16);
        Ok(match self {
            Op::Read => Request::read(TxId::NONE, &key)?,
            Op::Write => Request::write(TxId::NONE, &key, format!("{thread}-{i}").as_bytes())?,
            Op::Directory => Request::directory(TxId::NONE, &format!("{root}/dir"))?,
        })
    }
}

/// Refuses a `root` that exists: the benchmark removes its tree at the end
/// and must never take someone else's nodes.
fn check_absent(c: &Client, root: &str) -> Result<()> {
    match c.read(TxId::NONE, root) {
        Ok(_) => anyhow::bail!("{root} exists in this xenstore; not touching it"),
        Err(e) if e.errno() == Some(xs_wire::XsErrno::ENOENT) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("reading {root}")),
    }
}

/// Creates the benchmark's tree at `root`.
fn setup(c: &Client, root: &str, threads: usize) -> Result<()> {
    for t in 0..threads {
        for k in 0..16 {
            c.write(TxId::NONE, &format!("{root}/t{t}/k{k}"), b"initial")?;
        }
    }
    for i in 0..DIR_CHILDREN {
        c.write(TxId::NONE, &format!("{root}/dir/child-{i:04}"), b"x")?;
    }
    Ok(())
}

/// Runs `ops` operations split over `threads` threads, each waiting for every
/// reply (or, with `pipelined`, sending batches of `BATCH`); returns ops/s.
fn measure(c: &Client, root: &str, op: Op, threads: usize, ops: usize, pipelined: bool) -> Result<f64> {
    let per_thread = ops / threads;
    let start = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (c, root) = (c.clone(), root.to_string());
            std::thread::spawn(move || -> Result<()> {
                if pipelined {
                    let mut i = 0;
                    while i < per_thread {
                        let n = BATCH.min(per_thread - i);
                        let reqs = (i..i + n).map(|j| op.request(&root, t, j)).collect::<Result<Vec<_>>>()?;
                        for r in c.batch(&reqs)? {
                            r?;
                        }
                        i += n;
                    }
                } else {
                    for i in 0..per_thread {
                        c.request(op.request(&root, t, i)?)?;
                    }
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join().map_err(|_| anyhow::anyhow!("benchmark thread panicked"))??;
    }
    Ok((per_thread * threads) as f64 / start.elapsed().as_secs_f64())
}

/// Prints the table: each case from one thread waiting for each reply (the
/// baseline), from 16 threads sharing the connection, and pipelined, with
/// the ratios to the baseline.
fn cases(client: &Client, root: &str, ops: usize, target: &str) -> Result<()> {
    println!("xenstore client benchmark against {target}, {ops} operations per case (ops/s; ratio to 1 thread)");
    println!(
        "{:<10} {:>12} {:>12} {:>7} {:>14} {:>7}",
        "op", "1 thread", "16 threads", "ratio", "pipelined x64", "ratio"
    );
    for op in [Op::Read, Op::Write, Op::Directory] {
        let one = measure(client, root, op, 1, ops, false)?;
        let many = measure(client, root, op, 16, ops, false)?;
        let piped = measure(client, root, op, 1, ops, true)?;
        println!(
            "{:<10} {:>12.0} {:>12.0} {:>6.1}x {:>14.0} {:>6.1}x",
            op.name(),
            one,
            many,
            many / one,
            piped,
            piped / one
        );
    }
    Ok(())
}

/// Entry point of `xenbackd bench xs`.
pub fn run(args: XsBenchArgs) -> Result<u8> {
    let ops = args.ops;
    let mut sim = None;
    // clap refuses --socket with --system.
    let (client, target) = match (args.socket, args.system) {
        (Some(path), _) => (
            Client::connect_socket(&path).with_context(|| format!("connecting to {}", path.display()))?,
            path.display().to_string(),
        ),
        (None, true) => {
            (Client::connect().context("connecting to xenstore")?, "xenstore (libxenstore's choice)".into())
        }
        (None, false) => {
            let xs = xen_sim::xenstored::Xenstored::new();
            let stream = xs.connect_as(0).context("connecting to the simulated xenstored")?;
            sim = Some(xs);
            (Client::from_stream(stream)?, "the simulated xenstored (in process)".into())
        }
    };
    let root = format!("/xenbackd-bench-{}", std::process::id());
    check_absent(&client, &root)?;
    let result = setup(&client, &root, 16).and_then(|()| cases(&client, &root, ops, &target));
    let removed = client.rm(TxId::NONE, &root).with_context(|| format!("removing {root}"));
    result.and(removed)?;
    drop(sim);
    Ok(0)
}
