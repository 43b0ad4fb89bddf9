//! `xenbackd status` and `xenbackd metrics`: clients of a running daemon's
//! control socket (`xenbackd::control`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use xenbackd::control::{request, Request, CONTROL_SOCKET};
use xenbackd::status::{render_text, Status};

/// Longest wait for the daemon's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Show every device of the running daemon
///
/// Asks the running `xenbackd serve` over its control socket and prints
/// every device: domain, type, devid, backend state, image, format, queues,
/// ring page order, requests in flight, IOPS and MB/s, requests answered
/// with an error, time connected, and whether it was resumed from a
/// previous process; then the framework's counters. IOPS and MB/s are
/// measured between two answers --interval seconds apart (0: averages
/// since each device connected).
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct StatusArgs {
    /// The daemon's control socket (serve --control-socket)
    #[arg(long, value_name = "PATH", default_value = CONTROL_SOCKET)]
    control_socket: PathBuf,
    /// Seconds between the two samples of the rates, 0 to 60
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0, value_parser = interval)]
    interval: f64,
    /// Print the daemon's answer as it is (one JSON object; no rates)
    #[arg(long)]
    json: bool,
}

/// Print the running daemon's counters for Prometheus
///
/// Asks the running `xenbackd serve` over its control socket and prints
/// its counters in Prometheus' text format: the framework's (events,
/// connects, failures, devices, resumes, ...), each device's state and,
/// per ring, requests in flight, answered and failed, and bytes read and
/// written. For node_exporter's textfile collector, for example:
/// `xenbackd metrics > /var/lib/prometheus/node-exporter/xenbackd.prom.$$ && mv ...`
#[derive(clap::Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct MetricsArgs {
    /// The daemon's control socket (serve --control-socket)
    #[arg(long, value_name = "PATH", default_value = CONTROL_SOCKET)]
    control_socket: PathBuf,
}

fn interval(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !v.is_finite() || !(0.0..=60.0).contains(&v) {
        return Err("must be from 0 to 60 seconds".into());
    }
    Ok(v)
}

fn sample(path: &std::path::Path) -> Result<Status> {
    let reply = request(path, Request::Status, ANSWER_TIMEOUT)?;
    // `from_slice`, as QMP's requests: one parser in the binary.
    let v: serde_json::Value = serde_json::from_slice(reply.as_bytes()).context("the daemon's answer is not JSON")?;
    Status::from_json(&v).map_err(|e| anyhow::anyhow!("the daemon's answer: {e}"))
}

/// Runs `status`.
pub fn run_status(args: StatusArgs) -> Result<u8> {
    if args.json {
        return out(&request(&args.control_socket, Request::Status, ANSWER_TIMEOUT)?);
    }
    let first = sample(&args.control_socket)?;
    let (now, before) = if args.interval > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(args.interval));
        (sample(&args.control_socket)?, Some(first))
    } else {
        (first, None)
    };
    out(&render_text(&now, before.as_ref()))
}

/// Runs `metrics`.
pub fn run_metrics(args: MetricsArgs) -> Result<u8> {
    out(&request(&args.control_socket, Request::Metrics, ANSWER_TIMEOUT)?)
}

/// Writes `text` on stdout; a reader that closed it early (`| head`) is
/// not an error.
fn out(text: &str) -> Result<u8> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(0),
    }
}
