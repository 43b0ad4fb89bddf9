//! What `xenbackd status` and `xenbackd metrics` show of a running daemon:
//! [`Status`], gathered from the framework's [`Monitor`] by the control
//! socket's server ([`crate::control`]), carried as JSON, and rendered as a
//! table for an operator ([`render_text`]) or in Prometheus' text format
//! ([`render_metrics`]).
//!
//! Rates (IOPS, MB/s) are not counted by the daemon: the client takes two
//! samples and divides the difference by the daemon's own uptime between
//! them, or, given one sample, each device's totals by the time it has been
//! connected.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{json, Map, Value};
use xen_backend::{DeviceSnapshot, Latencies, Monitor, RingStats, Stats, LATENCY_BUCKETS};

/// The framework's counters ([`Stats`]), in this order: name, whether it is a
/// gauge (else a counter), help text.
pub const COUNTERS: [(&str, bool, &str); 10] = [
    ("events", false, "Watch events taken off the xenstore queue."),
    ("connects", false, "Times a device's rings were handed to workers."),
    ("failures", false, "Devices failed (an error node written)."),
    ("devices", true, "Devices currently known."),
    ("rescans", false, "Full rescans after a watch-queue overflow."),
    ("departures", false, "Backend directories removed under an attached frontend."),
    ("resumes", false, "Devices taken over Connected from a previous process."),
    ("stuck_rings", false, "Rings whose I/O outlived their drain deadline."),
    ("xenstore_reconnects", false, "Times the xenstore connection was lost and made again."),
    ("xenstore_gave_up", true, "1 once the backend stopped because xenstore stayed unreachable."),
];

fn counter_values(s: &Stats) -> [u64; 10] {
    [
        &s.events,
        &s.connects,
        &s.failures,
        &s.devices,
        &s.rescans,
        &s.departures,
        &s.resumes,
        &s.stuck_rings,
        &s.xenstore_reconnects,
        &s.xenstore_gave_up,
    ]
    .map(|c| c.load(Ordering::Relaxed))
}

/// The daemon as one answer of the control socket shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Status {
    /// `xenbackd`'s version.
    pub version: String,
    /// The daemon's process id.
    pub pid: u32,
    /// Time since the backend started (the daemon's clock: rates divide by it).
    pub uptime: Duration,
    /// The framework's counters, by name, in the order of [`COUNTERS`].
    pub counters: Vec<(String, u64)>,
    /// Every device; `None` if the xenbus thread did not answer in time.
    pub devices: Option<Vec<DeviceStatus>>,
}

/// One device of a [`Status`].
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceStatus {
    /// The device type (`qdisk`, `vbd`).
    pub kind: String,
    /// The frontend's domain.
    pub domain: u32,
    /// The device id.
    pub devid: u32,
    /// The backend state (`Connected`, ...).
    pub state: String,
    /// The frontend state last acted on.
    pub frontend_state: Option<String>,
    /// Failed and not retried since.
    pub failed: bool,
    /// Taken over Connected from a previous process.
    pub resumed: bool,
    /// Time its rings have been served.
    pub connected_for: Option<Duration>,
    /// The device type's own details (`image`, `format`, `queues`, ...).
    pub details: Vec<(String, String)>,
    /// Per ring, its counters if it keeps them.
    pub rings: Vec<Option<RingStats>>,
}

impl DeviceStatus {
    fn from_snapshot(d: DeviceSnapshot) -> Self {
        DeviceStatus {
            kind: d.key.kind,
            domain: d.key.frontend.into(),
            devid: d.key.devid,
            state: d.state.to_string(),
            frontend_state: d.frontend_state.map(|s| s.to_string()),
            failed: d.failed,
            resumed: d.resumed,
            connected_for: d.connected_for,
            details: d.details.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            rings: d.rings,
        }
    }

    /// A detail by name.
    pub fn detail(&self, name: &str) -> Option<&str> {
        self.details.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The sum over its rings that keep counters.
    pub fn totals(&self) -> RingStats {
        self.rings.iter().flatten().fold(RingStats::default(), |a, r| RingStats {
            in_flight: a.in_flight + r.in_flight,
            completed: a.completed + r.completed,
            failed: a.failed + r.failed,
            bytes_read: a.bytes_read + r.bytes_read,
            bytes_written: a.bytes_written + r.bytes_written,
            latencies: a.latencies.merged(&r.latencies),
        })
    }
}

impl Status {
    /// Gathers the status from `monitor`, waiting at most `timeout` for the
    /// xenbus thread's device list.
    pub fn gather(monitor: &Monitor, timeout: Duration) -> Status {
        let counters = COUNTERS.iter().zip(counter_values(monitor.stats())).map(|((n, ..), v)| (n.to_string(), v));
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            uptime: monitor.uptime(),
            counters: counters.collect(),
            devices: monitor.devices(timeout).map(|ds| ds.into_iter().map(DeviceStatus::from_snapshot).collect()),
        }
    }

    /// A counter by name (0 if absent).
    pub fn counter(&self, name: &str) -> u64 {
        self.counters.iter().find(|(n, _)| n == name).map_or(0, |(_, v)| *v)
    }

    /// As the control socket sends it.
    pub fn to_json(&self) -> Value {
        let devices = self.devices.as_ref().map(|ds| {
            ds.iter()
                .map(|d| {
                    let details: Map<String, Value> =
                        d.details.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
                    let rings: Vec<Value> = d
                        .rings
                        .iter()
                        .map(|r| match r {
                            Some(r) => json!({
                                "in_flight": r.in_flight,
                                "completed": r.completed,
                                "failed": r.failed,
                                "bytes_read": r.bytes_read,
                                "bytes_written": r.bytes_written,
                                "latency_log2_us": r.latencies.buckets.to_vec(),
                                "latency_sum_us": r.latencies.sum_us,
                            }),
                            None => Value::Null,
                        })
                        .collect();
                    json!({
                        "type": d.kind,
                        "domain": d.domain,
                        "devid": d.devid,
                        "state": d.state,
                        "frontend_state": d.frontend_state,
                        "failed": d.failed,
                        "resumed": d.resumed,
                        "connected_ms": d.connected_for.map(|t| t.as_millis() as u64),
                        "details": details,
                        "rings": rings,
                    })
                })
                .collect::<Vec<_>>()
        });
        let counters: Map<String, Value> = self.counters.iter().map(|(n, v)| (n.clone(), json!(v))).collect();
        json!({
            "version": self.version,
            "pid": self.pid,
            "uptime_ms": self.uptime.as_millis() as u64,
            "counters": counters,
            "devices": devices,
        })
    }

    /// Reads what [`Status::to_json`] wrote.
    pub fn from_json(v: &Value) -> Result<Status, String> {
        // In the order of COUNTERS (a JSON object has none), others after.
        let map = obj(v, "counters")?;
        let mut counters = Vec::with_capacity(map.len());
        for (name, ..) in COUNTERS {
            if let Some(x) = map.get(name) {
                counters.push((name.to_string(), num(x, name)?));
            }
        }
        for (k, x) in map {
            if !COUNTERS.iter().any(|(n, ..)| n == k) {
                counters.push((k.clone(), num(x, k)?));
            }
        }
        let devices = match v.get("devices") {
            None | Some(Value::Null) => None,
            Some(Value::Array(ds)) => Some(ds.iter().map(device_from_json).collect::<Result<_, _>>()?),
            Some(_) => return Err("devices is not a list".into()),
        };
        Ok(Status {
            version: text(v, "version")?,
            pid: u32::try_from(field_num(v, "pid")?).map_err(|_| "pid out of range")?,
            uptime: Duration::from_millis(field_num(v, "uptime_ms")?),
            counters,
            devices,
        })
    }
}

fn obj<'a>(v: &'a Value, name: &str) -> Result<&'a Map<String, Value>, String> {
    v.get(name).and_then(Value::as_object).ok_or_else(|| format!("{name} missing or not an object"))
}

fn num(v: &Value, name: &str) -> Result<u64, String> {
    v.as_u64().ok_or_else(|| format!("{name} is not a number"))
}

fn field_num(v: &Value, name: &str) -> Result<u64, String> {
    num(v.get(name).unwrap_or(&Value::Null), name)
}

fn text(v: &Value, name: &str) -> Result<String, String> {
    v.get(name).and_then(Value::as_str).map(str::to_string).ok_or_else(|| format!("{name} missing or not text"))
}

fn opt_text(v: &Value, name: &str) -> Option<String> {
    v.get(name).and_then(Value::as_str).map(str::to_string)
}

/// A ring's latency histogram; absent (a daemon from before it was kept)
/// reads as empty.
fn latencies_from_json(r: &Value) -> Result<Latencies, String> {
    let Some(v) = r.get("latency_log2_us") else { return Ok(Latencies::default()) };
    let buckets = v.as_array().filter(|a| a.len() == LATENCY_BUCKETS).ok_or("latency_log2_us: not its buckets")?;
    let mut l = Latencies { sum_us: field_num(r, "latency_sum_us")?, ..Latencies::default() };
    for (slot, b) in l.buckets.iter_mut().zip(buckets) {
        *slot = b.as_u64().ok_or("latency_log2_us: not a count")?;
    }
    Ok(l)
}

fn device_from_json(v: &Value) -> Result<DeviceStatus, String> {
    let details = obj(v, "details")?
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_str().ok_or_else(|| format!("detail {k} is not text"))?.to_string())))
        .collect::<Result<_, String>>()?;
    let rings = v
        .get("rings")
        .and_then(Value::as_array)
        .ok_or("rings missing")?
        .iter()
        .map(|r| {
            if r.is_null() {
                return Ok(None);
            }
            Ok(Some(RingStats {
                in_flight: field_num(r, "in_flight")?,
                completed: field_num(r, "completed")?,
                failed: field_num(r, "failed")?,
                bytes_read: field_num(r, "bytes_read")?,
                bytes_written: field_num(r, "bytes_written")?,
                latencies: latencies_from_json(r)?,
            }))
        })
        .collect::<Result<_, String>>()?;
    let u32_field = |name: &str| u32::try_from(field_num(v, name)?).map_err(|_| format!("{name} out of range"));
    Ok(DeviceStatus {
        kind: text(v, "type")?,
        domain: u32_field("domain")?,
        devid: u32_field("devid")?,
        state: text(v, "state")?,
        frontend_state: opt_text(v, "frontend_state"),
        failed: v.get("failed").and_then(Value::as_bool).unwrap_or(false),
        resumed: v.get("resumed").and_then(Value::as_bool).unwrap_or(false),
        connected_for: v.get("connected_ms").and_then(Value::as_u64).map(Duration::from_millis),
        details,
        rings,
    })
}

/// A duration as an operator reads it: `45s`, `12m05s`, `3h02m`, `2d04h`.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// One line for the log (SIGHUP): devices by state, and what went wrong.
pub fn summary(s: &Status) -> String {
    let devices = match &s.devices {
        Some(ds) => {
            let connected = ds.iter().filter(|d| d.state == "Connected").count();
            let failed = ds.iter().filter(|d| d.failed).count();
            let in_flight: u64 = ds.iter().map(|d| d.totals().in_flight).sum();
            let n = ds.len();
            let plural = if n == 1 { "" } else { "s" };
            format!("{n} device{plural} ({connected} connected, {failed} failed, {in_flight} requests in flight)")
        }
        None => format!("{} device(s) (the xenbus thread is busy)", s.counter("devices")),
    };
    format!(
        "up {}, {devices}; {} connects, {} failures, {} resumes, {} stuck rings, {} xenstore reconnects",
        human_duration(s.uptime),
        s.counter("connects"),
        s.counter("failures"),
        s.counter("resumes"),
        s.counter("stuck_rings"),
        s.counter("xenstore_reconnects"),
    )
}

/// The totals of device `d` of `now` in the earlier sample `before`, and the
/// time between: `None` if `before` is not of the same connection.
fn earlier(d: &DeviceStatus, now: &Status, before: Option<&Status>) -> Option<(RingStats, Duration)> {
    let b = before?;
    let dt = now.uptime.checked_sub(b.uptime)?;
    let e = b.devices.as_ref()?.iter().find(|e| e.kind == d.kind && e.domain == d.domain && e.devid == d.devid)?;
    // The same connection: connected before the first sample.
    (d.connected_for? >= dt && e.connected_for.is_some()).then(|| (e.totals(), dt))
}

/// Latency percentiles of device `d`'s requests answered between `before`
/// and `now` (or since it connected), `None` if none was.
fn percentiles(d: &DeviceStatus, now: &Status, before: Option<&Status>) -> Option<(Duration, Duration)> {
    let mut l = d.totals().latencies;
    if let Some((base, _)) = earlier(d, now, before) {
        l = l.since(&base.latencies);
    }
    Some((l.percentile(0.5)?, l.percentile(0.99)?))
}

/// A latency for the table, in ms (to a factor of two: the histogram's).
fn millis(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 10.0 {
        format!("{ms:.3}")
    } else {
        format!("{ms:.0}")
    }
}

/// Requests and bytes per second of `now`'s device `d`: against the same
/// device in `before` (taken earlier, same connection), else averaged over
/// the time it has been connected. `None` if neither gives a time.
fn rates(d: &DeviceStatus, now: &Status, before: Option<&Status>) -> Option<(f64, f64)> {
    let t = d.totals();
    let (base, dt) = match earlier(d, now, before) {
        Some(x) => x,
        None => (RingStats::default(), d.connected_for?),
    };
    let secs = dt.as_secs_f64();
    if secs <= 0.0 {
        return None;
    }
    let ops = t.completed.saturating_sub(base.completed) as f64 / secs;
    let bytes = (t.bytes_read + t.bytes_written).saturating_sub(base.bytes_read + base.bytes_written) as f64 / secs;
    Some((ops, bytes / 1e6))
}

/// The status as a table, one line per device. Rates are over the time
/// between `before` and `now` where `before` is given and has the device.
pub fn render_text(now: &Status, before: Option<&Status>) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "xenbackd {}, pid {}", now.version, now.pid);
    let _ = writeln!(out, "{}", summary(now));
    let Some(devices) = &now.devices else {
        out.push_str("devices: the xenbus thread did not answer in time (busy, or reconnecting to xenstore)\n");
        return out;
    };
    if devices.is_empty() {
        out.push_str("no devices\n");
        return out;
    }
    let header = [
        "DOMAIN", "TYPE", "DEVID", "STATE", "IMAGE", "FORMAT", "QUEUES", "ORDER", "INFLIGHT", "IOPS", "MB/s", "P50ms",
        "P99ms",
    ];
    let header2 = ["ERRORS", "UPTIME", "RESUMED"];
    let mut rows: Vec<Vec<String>> = vec![header.iter().chain(&header2).map(|s| s.to_string()).collect()];
    for d in devices {
        let t = d.totals();
        let dash = || "-".to_string();
        let (iops, mbs) = match rates(d, now, before) {
            Some((ops, mb)) => (format!("{ops:.0}"), format!("{mb:.1}")),
            None => (dash(), dash()),
        };
        let (p50, p99) = match percentiles(d, now, before) {
            Some((a, b)) => (millis(a), millis(b)),
            None => (dash(), dash()),
        };
        let state = if d.failed { format!("{} (failed)", d.state) } else { d.state.clone() };
        let counted = d.rings.iter().any(Option::is_some);
        rows.push(vec![
            d.domain.to_string(),
            d.kind.clone(),
            d.devid.to_string(),
            state,
            // A console: its pty or socket, and which of the two.
            d.detail("image").or(d.detail("tty")).or(d.detail("path")).map_or_else(dash, str::to_string),
            d.detail("format").or(d.detail("connection")).map_or_else(dash, str::to_string),
            d.detail("queues").map_or_else(dash, str::to_string),
            d.detail("ring-order").map_or_else(dash, str::to_string),
            if counted { t.in_flight.to_string() } else { dash() },
            iops,
            mbs,
            p50,
            p99,
            if counted { t.failed.to_string() } else { dash() },
            d.connected_for.map_or_else(dash, human_duration),
            if d.resumed { "yes" } else { "no" }.to_string(),
        ]);
    }
    let widths: Vec<usize> =
        (0..rows[0].len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    for r in &rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(v, w)| format!("{v:<w$}")).collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    match before {
        Some(b) => {
            let dt = now.uptime.saturating_sub(b.uptime);
            let _ = writeln!(out, "IOPS, MB/s, P50/P99: over the last {:.1} s", dt.as_secs_f64());
        }
        None => out.push_str("IOPS, MB/s, P50/P99: since each device connected\n"),
    }
    out.push_str("P50/P99: from taking a request off the ring to its answer, rounded up to a power of two\n");
    out
}

/// Escapes a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A metric family: HELP and TYPE lines, then the samples.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

/// A per-ring metric: name, type, help, and what it reads of a ring.
type RingMetric = (&'static str, &'static str, &'static str, fn(&RingStats) -> u64);

/// The status in Prometheus' text exposition format (version 0.0.4):
/// the framework's counters, each device's state, and per ring what its
/// handler counts.
pub fn render_metrics(s: &Status) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "xenbackd_uptime_seconds",
        "gauge",
        "Seconds since the backend started.",
        &[(String::new(), s.uptime.as_secs())],
    );
    for (name, gauge, help) in COUNTERS {
        let (metric, kind) =
            if gauge { (format!("xenbackd_{name}"), "gauge") } else { (format!("xenbackd_{name}_total"), "counter") };
        family(&mut out, &metric, kind, help, &[(String::new(), s.counter(name))]);
    }
    let Some(devices) = &s.devices else { return out };
    let dev_labels =
        |d: &DeviceStatus| format!("type=\"{}\",domain=\"{}\",devid=\"{}\"", label(&d.kind), d.domain, d.devid);
    let state: Vec<(String, u64)> = devices
        .iter()
        .map(|d| {
            let n = (0..9).find(|&n| xen_bus::XenbusState::from_u32(n).is_some_and(|s| s.to_string() == d.state));
            (format!("{{{}}}", dev_labels(d)), u64::from(n.unwrap_or(0)))
        })
        .collect();
    let help = "The backend's xenbus state (1 Initialising, 2 InitWait, 4 Connected, 5 Closing, 6 Closed).";
    family(&mut out, "xenbackd_device_state", "gauge", help, &state);
    let failed: Vec<(String, u64)> =
        devices.iter().map(|d| (format!("{{{}}}", dev_labels(d)), u64::from(d.failed))).collect();
    family(&mut out, "xenbackd_device_failed", "gauge", "1 while the device is failed.", &failed);
    let ring = |f: fn(&RingStats) -> u64| -> Vec<(String, u64)> {
        devices
            .iter()
            .flat_map(|d| {
                d.rings.iter().enumerate().filter_map(move |(q, r)| {
                    r.as_ref().map(|r| (format!("{{{},queue=\"{q}\"}}", dev_labels(d)), f(r)))
                })
            })
            .collect()
    };
    let rings: [RingMetric; 5] = [
        ("xenbackd_ring_requests_in_flight", "gauge", "Requests taken off the ring, not answered yet.", |r| {
            r.in_flight
        }),
        ("xenbackd_ring_requests_completed_total", "counter", "Requests answered.", |r| r.completed),
        ("xenbackd_ring_requests_failed_total", "counter", "Requests answered with an error.", |r| r.failed),
        ("xenbackd_ring_read_bytes_total", "counter", "Bytes moved to the guest (reads).", |r| r.bytes_read),
        ("xenbackd_ring_written_bytes_total", "counter", "Bytes moved from the guest (writes).", |r| r.bytes_written),
    ];
    for (name, kind, help, f) in rings {
        family(&mut out, name, kind, help, &ring(f));
    }
    latency_histogram(&mut out, devices, dev_labels);
    out
}

/// `xenbackd_ring_request_duration_seconds`, a Prometheus histogram per
/// ring: cumulative buckets at the powers of two of the framework's.
fn latency_histogram(out: &mut String, devices: &[DeviceStatus], dev_labels: impl Fn(&DeviceStatus) -> String) {
    let name = "xenbackd_ring_request_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time from taking a request off the ring to its answer, of a sample of the requests."
    );
    let _ = writeln!(out, "# TYPE {name} histogram");
    for d in devices {
        for (q, r) in d.rings.iter().enumerate() {
            let Some(r) = r else { continue };
            let labels = format!("{},queue=\"{q}\"", dev_labels(d));
            let mut cumulative = 0;
            for (i, n) in r.latencies.buckets.iter().enumerate() {
                cumulative += n;
                if let Some(le) = Latencies::bucket_bound_secs(i) {
                    let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
                }
            }
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
            let _ = writeln!(out, "{name}_sum{{{labels}}} {}", r.latencies.sum_us as f64 / 1e6);
            let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(uptime_ms: u64, completed: u64, bytes: u64) -> Status {
        let mut latencies = Latencies::default();
        (0..completed).for_each(|i| latencies.record(Duration::from_micros(100 + 50 * (i % 3))));
        let ring = RingStats { in_flight: 2, completed, failed: 1, bytes_read: bytes, bytes_written: 0, latencies };
        Status {
            version: "0.1.0".into(),
            pid: 42,
            uptime: Duration::from_millis(uptime_ms),
            counters: COUNTERS.iter().enumerate().map(|(i, (n, ..))| (n.to_string(), i as u64)).collect(),
            devices: Some(vec![
                DeviceStatus {
                    kind: "qdisk".into(),
                    domain: 3,
                    devid: 51712,
                    state: "Connected".into(),
                    frontend_state: Some("Connected".into()),
                    failed: false,
                    resumed: true,
                    connected_for: Some(Duration::from_millis(uptime_ms - 1000)),
                    details: vec![
                        ("image".into(), "/srv/a \"b\".img".into()),
                        ("format".into(), "raw".into()),
                        ("queues".into(), "2".into()),
                        ("ring-order".into(), "1".into()),
                    ],
                    rings: vec![Some(ring), None],
                },
                DeviceStatus {
                    kind: "vbd".into(),
                    domain: 4,
                    devid: 768,
                    state: "Closed".into(),
                    frontend_state: None,
                    failed: true,
                    resumed: false,
                    connected_for: None,
                    details: vec![],
                    rings: vec![],
                },
            ]),
        }
    }

    #[test]
    fn status_survives_its_json() {
        let mut s = sample(5000, 100, 4096);
        let text = s.to_json().to_string();
        let back = Status::from_json(&serde_json::from_str(&text).unwrap()).unwrap();
        // Details come back by name (a JSON object's order).
        for d in s.devices.as_mut().unwrap() {
            d.details.sort();
        }
        assert_eq!(back, s);
    }

    #[test]
    fn status_json_without_devices_reads_as_none() {
        let mut s = sample(5000, 100, 4096);
        s.devices = None;
        let back = Status::from_json(&s.to_json()).unwrap();
        assert_eq!(back.devices, None);
    }

    #[test]
    fn from_json_names_what_is_missing() {
        let err = Status::from_json(&json!({"version": "1", "pid": 1, "uptime_ms": 1})).unwrap_err();
        assert!(err.contains("counters"), "{err}");
    }

    #[test]
    fn text_shows_each_device_with_rates_since_connect() {
        let out = render_text(&sample(5000, 400, 8_000_000), None);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "xenbackd 0.1.0, pid 42", "{out}");
        assert!(lines[1].starts_with("up 5s, 2 devices"), "{out}");
        assert!(lines[2].starts_with("DOMAIN  TYPE   DEVID  STATE"), "{out}");
        let cols: Vec<&str> = lines[3].split_whitespace().collect();
        // 400 requests and 8 MB in the 4 s connected.
        assert_eq!(cols[..4], ["3", "qdisk", "51712", "Connected"], "{out}");
        assert!(lines[3].contains(" raw ") && lines[3].ends_with("yes"), "{out}");
        assert!(cols.contains(&"100") && cols.contains(&"2.0"), "{out}");
        assert!(lines[4].contains("Closed (failed)"), "{out}");
        assert!(out.contains("IOPS, MB/s, P50/P99: since each device connected\n"), "{out}");
        // 100, 150 and 200 µs in turn: both within 128-256 µs.
        assert_eq!(cols.iter().filter(|c| **c == "0.256").count(), 2, "p50 and p99: {out}");
    }

    #[test]
    fn a_console_shows_its_pty_or_socket_and_the_connection() {
        let mut s = sample(5000, 0, 0);
        let console = |devid, details: &[(&str, &str)]| DeviceStatus {
            kind: "console".into(),
            domain: 5,
            devid,
            state: "Connected".into(),
            frontend_state: Some("Connected".into()),
            failed: false,
            resumed: false,
            connected_for: Some(Duration::from_secs(1)),
            details: details.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            rings: vec![None],
        };
        s.devices = Some(vec![
            console(1, &[("connection", "pty"), ("name", "org.a"), ("tty", "/dev/pts/4")]),
            console(2, &[("connection", "socket"), ("path", "/run/ch.sock")]),
        ]);
        let out = render_text(&s, None);
        let rows: Vec<Vec<&str>> = out.lines().skip(3).take(2).map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(rows[0][4..6], ["/dev/pts/4", "pty"], "{out}");
        assert_eq!(rows[1][4..6], ["/run/ch.sock", "socket"], "{out}");
    }

    #[test]
    fn text_rates_are_the_difference_between_two_samples() {
        let (before, now) = (sample(5000, 400, 0), sample(7000, 1000, 4_000_000));
        let out = render_text(&now, Some(&before));
        // 600 requests and 4 MB in 2 s.
        let cols: Vec<&str> = out.lines().nth(3).unwrap().split_whitespace().collect();
        assert!(cols.contains(&"300") && cols.contains(&"2.0"), "{out}");
        assert!(out.contains("P50/P99: over the last 2.0 s\n"), "{out}");
    }

    #[test]
    fn metrics_are_prometheus_text() {
        let out = render_metrics(&sample(5000, 400, 8192));
        assert!(out.contains("# TYPE xenbackd_events_total counter\nxenbackd_events_total 0\n"), "{out}");
        assert!(out.contains("# TYPE xenbackd_devices gauge\nxenbackd_devices 3\n"), "{out}");
        assert!(out.contains("xenbackd_device_state{type=\"qdisk\",domain=\"3\",devid=\"51712\"} 4\n"), "{out}");
        assert!(out.contains("xenbackd_device_failed{type=\"vbd\",domain=\"4\",devid=\"768\"} 1\n"), "{out}");
        let key = "{type=\"qdisk\",domain=\"3\",devid=\"51712\",queue=\"0\"}";
        assert!(out.contains(&format!("xenbackd_ring_requests_completed_total{key} 400\n")), "{out}");
        assert!(out.contains(&format!("xenbackd_ring_read_bytes_total{key} 8192\n")), "{out}");
        assert!(!out.contains("queue=\"1\""), "a ring without counters has no samples: {out}");
        let hist = "xenbackd_ring_request_duration_seconds";
        let labels = "type=\"qdisk\",domain=\"3\",devid=\"51712\",queue=\"0\"";
        assert!(out.contains(&format!("{hist}_bucket{{{labels},le=\"0.000128\"}} 134\n")), "{out}");
        assert!(out.contains(&format!("{hist}_bucket{{{labels},le=\"0.000256\"}} 400\n")), "{out}");
        assert!(out.contains(&format!("{hist}_bucket{{{labels},le=\"+Inf\"}} 400\n")), "{out}");
        assert!(out.contains(&format!("{hist}_count{{{labels}}} 400\n")), "{out}");
        assert!(out.contains(&format!("{hist}_sum{{{labels}}} 0.05995\n")), "{out}");
        // Every line is a comment or `name{labels} value`, and every family
        // is declared once before its samples.
        let mut declared = std::collections::BTreeSet::new();
        for line in out.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                assert!(declared.insert(rest.split(' ').next().unwrap().to_string()), "twice: {line}");
            } else if !line.starts_with("# HELP ") {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| declared.contains(*f)))
                    .unwrap_or(name);
                assert!(declared.contains(family), "undeclared sample: {line}");
                assert!(line.rsplit(' ').next().unwrap().parse::<f64>().is_ok(), "{line}");
            }
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn durations_read_as_an_operator_writes_them() {
        assert_eq!(human_duration(Duration::from_secs(45)), "45s");
        assert_eq!(human_duration(Duration::from_secs(725)), "12m05s");
        assert_eq!(human_duration(Duration::from_secs(3 * 3600 + 120)), "3h02m");
        assert_eq!(human_duration(Duration::from_secs(2 * 86_400 + 4 * 3600)), "2d04h");
    }

    #[test]
    fn summary_counts_devices_by_state() {
        let s = summary(&sample(5000, 1, 1));
        assert!(s.starts_with("up 5s, 2 devices (1 connected, 1 failed, 2 requests in flight)"), "{s}");
    }
}
