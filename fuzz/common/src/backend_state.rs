//! Target `backend_state`: the parsing of what a frontend writes to its
//! xenstore directory: `state` values ([`XenbusState::parse`]), the
//! `protocol` node ([`Protocol::parse`], one parser for the framework and
//! the block backend) and the
//! ring details read at `Initialised` ([`FrontendConfig::read`], against an
//! offer within the backend's limits).
//!
//! Properties: no panic, no allocation beyond what the offer allows; a
//! parsed state is the node's trimmed decimal and round-trips through its
//! number; a parsed protocol round-trips through its name and has the blkif
//! slot layout its name says ([`Layout`]); a frontend configuration read
//! `Ok` holds exactly the nodes' values, `1 <= queues <= max_queues` and
//! `2^order` ring pages per queue with `order <= max_ring_page_order`; an
//! error names a node that is missing or holds what it says.
//!
//! Input: the offer's queues (`% 17`) and ring order (`% 5`), then nodes
//! (a name from [`NAMES`], a value) until the end; a node given twice keeps
//! the last value.

use std::collections::BTreeMap;

use blkback::config::{
    ConfigError, DiskConfig, FrontendConfig, Offer, MAX_RING_PAGE_ORDER, VDISK_CDROM, VDISK_READONLY, VDISK_REMOVABLE,
};
use blkif::Layout;
use xen_bus::{scan, FrontendRings, Protocol, RingNodeError, RingOffer, XenbusState};

use crate::input::Input;

/// Node names the input picks from (relative to the frontend directory).
pub const NAMES: &[&str] = &[
    "protocol",
    "ring-page-order",
    "multi-queue-num-queues",
    "feature-persistent",
    "event-channel",
    "ring-ref",
    "ring-ref0",
    "ring-ref1",
    "ring-ref2",
    "ring-ref3",
    "queue-0/event-channel",
    "queue-0/ring-ref",
    "queue-0/ring-ref0",
    "queue-0/ring-ref1",
    "queue-1/event-channel",
    "queue-1/ring-ref0",
    "queue-1/ring-ref1",
    "queue-2/event-channel",
    "queue-2/ring-ref0",
    "state",
    // The toolstack's nodes in the backend directory (`DiskConfig::read`).
    "params",
    "mode",
    "format",
    "device-type",
    "removable",
    "discard-enable",
];

/// One decoded input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    /// The offer's `multi-queue-max-queues` (0..=16).
    pub max_queues: u8,
    /// The offer's `max-ring-page-order` (0..=4).
    pub max_order: u8,
    /// The nodes: name index and value bytes (at most 255).
    pub nodes: Vec<(u8, Vec<u8>)>,
}

impl Case {
    /// Decodes an input.
    pub fn decode(data: &[u8]) -> Case {
        let mut input = Input::new(data);
        let max_queues = input.u8() % 17;
        let max_order = input.u8() % (MAX_RING_PAGE_ORDER as u8 + 1);
        let mut nodes = Vec::new();
        while !input.is_empty() {
            let name = input.u8();
            let n = usize::from(input.u8());
            nodes.push((name, input.bytes(n).to_vec()));
        }
        Case { max_queues, max_order, nodes }
    }

    /// Encodes it.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![self.max_queues, self.max_order];
        for (name, v) in &self.nodes {
            out.extend([*name, u8::try_from(v.len()).expect("at most 255 bytes")]);
            out.extend(v);
        }
        out
    }
}

/// What a `u32` node holds, as the backend reads it (Linux's `%u`).
fn num(v: &str) -> Option<u32> {
    scan::scan_u32(v.as_bytes())
}

/// `%u` as the kernel reads it: a value that is white space then a plain
/// decimal that fits is that number; any result is the leading digits'
/// value modulo 2^32 (after the white space, before the first NUL).
fn check_scan(value: &[u8]) {
    let c = value.split(|&b| b == 0).next().unwrap_or_default();
    let start = c.iter().position(|&b| !matches!(b, b' ' | b'\t'..=b'\r' | 0xA0)).unwrap_or(c.len());
    let digits: Vec<u8> = c[start..].iter().copied().take_while(u8::is_ascii_digit).collect();
    let got = scan::scan_u32(value);
    if digits.is_empty() {
        assert_eq!(got, None, "{value:?}");
        return;
    }
    let low = digits.iter().fold(0u32, |acc, &d| acc.wrapping_mul(10).wrapping_add(u32::from(d - b'0')));
    assert_eq!(got, Some(low), "{value:?}");
    if let Ok(n) = std::str::from_utf8(&digits).expect("digits").parse::<u32>() {
        assert_eq!(got, Some(n), "{value:?}");
    }
}

fn check_state(value: &[u8]) {
    let Some(s) = XenbusState::parse(value) else { return };
    let text = std::str::from_utf8(value).expect("a parsed state is UTF-8");
    let n: u32 = text.trim_end_matches('\0').trim().parse().expect("a parsed state is a decimal");
    assert_eq!(s.as_u32(), n, "{value:?} parsed as {s}");
    assert!(n <= 8);
    assert_eq!(XenbusState::from_u32(n), Some(s));
    assert_eq!(XenbusState::parse(n.to_string().as_bytes()), Some(s));
}

fn check_protocol(value: &str) {
    let p = Protocol::parse(Some(value));
    if let Ok(p) = p {
        assert_eq!(Protocol::parse(p.name()).ok(), Some(p), "{value:?}: {p:?} does not round-trip");
    }
    // The block backend serves it with the slot layout its name says.
    if let Ok(p) = p {
        let narrow = Layout::from(p) == Layout::Narrow;
        assert_eq!(narrow, p == Protocol::X86_32, "protocol {value:?}: {p:?} served as {:?}", Layout::from(p));
    }
}

/// The toolstack's nodes read as a disk: every field is what its node says,
/// an error names what is wrong.
fn check_disk(nodes: &BTreeMap<&str, String>) {
    let get = |n: &str| nodes.get(n).map(String::as_str);
    let unsigned = |n: &str, default| scan::read_unsigned(get(n).map(str::as_bytes), default);
    let params = get("params").unwrap_or_default();
    let format_node = get("format").filter(|f| !f.is_empty());
    let mode = get("mode").unwrap_or("w");
    match DiskConfig::read(|n| nodes.get(n).cloned()) {
        Ok(cfg) => {
            assert!(nodes.contains_key("params"));
            assert_eq!(cfg.cdrom, get("device-type") == Some("cdrom"));
            assert_eq!(cfg.removable, cfg.cdrom || unsigned("removable", 0) != 0);
            assert!(matches!(mode, "r" | "ro" | "w" | "rw" | "w!"), "mode {mode:?} accepted");
            assert_eq!(cfg.read_only, matches!(mode, "r" | "ro") || cfg.cdrom);
            assert_eq!(cfg.discard_enable, unsigned("discard-enable", 1) != 0);
            let bits = [(cfg.cdrom, VDISK_CDROM), (cfg.removable, VDISK_REMOVABLE), (cfg.read_only, VDISK_READONLY)];
            assert_eq!(cfg.info(), bits.iter().filter(|(set, _)| *set).map(|(_, b)| b).sum::<u32>());
            match &cfg.medium {
                Some(m) => {
                    let path = m.path.to_str().expect("a path from a string");
                    assert!(!path.is_empty() && params.trim().ends_with(path), "path {path:?} from {params:?}");
                    if let Some(f) = format_node {
                        assert_eq!(m.format.name(), f, "format node ignored");
                    }
                }
                None => {
                    assert!(cfg.removable, "no medium in a fixed disk");
                    let empty = params.trim().split(':').all(|p| matches!(p, "" | "aio" | "raw" | "file" | "phy"));
                    assert!(empty, "{params:?} read as an empty drive");
                }
            }
        }
        Err(ConfigError::Missing(n)) => assert!(n == "params" && get("params").is_none(), "missing {n}"),
        Err(ConfigError::Bad { node, value }) => {
            assert_eq!(get(&node), Some(value.as_str()), "bad value reported for {node}");
            match node.as_str() {
                "mode" => assert!(!matches!(mode, "r" | "ro" | "w" | "rw" | "w!")),
                "params" => {}
                other => panic!("bad {other} is no disk node"),
            }
        }
        Err(ConfigError::Format(f)) => {
            assert!(f != "raw" && f != "qcow2", "{f} refused");
            assert!(format_node == Some(f.as_str()) || params.contains(&format!("{f}:")), "{f} from nowhere");
        }
        Err(ConfigError::Driver(d)) => {
            assert!(params.contains(&format!("{d}:")), "driver {d:?} not in {params:?}");
            assert!(!matches!(d.as_str(), "aio" | "file" | "phy" | "raw" | "qcow2"), "driver {d} refused");
        }
        Err(ConfigError::FormatConflict { params: p, node: n }) => {
            assert_ne!(p, n);
            assert_eq!(format_node, Some(n));
            assert!(params.contains(&format!("{p}:")), "{p} not in {params:?}");
        }
        Err(e) => panic!("unexpected disk error {e}"),
    }
}

/// Rings read `Ok` are written back (`FrontendRings::nodes`, what our
/// simulated frontends write) as nodes that read as the same rings.
fn check_rings_round_trip(nodes: &BTreeMap<&str, String>, offer: RingOffer) {
    let read = |n: &str| Ok::<_, RingNodeError>(nodes.get(n).cloned());
    let Ok(rings) = FrontendRings::read(read, offer) else { return };
    let written: BTreeMap<String, String> = rings.nodes().into_iter().collect();
    let again = FrontendRings::read(|n: &str| Ok::<_, RingNodeError>(written.get(n).cloned()), offer);
    assert_eq!(again, Ok(rings), "rings written as {written:?}");
}

/// The harness.
pub fn run(data: &[u8]) {
    let case = Case::decode(data);
    let offer = Offer {
        max_queues: u32::from(case.max_queues),
        max_ring_page_order: u32::from(case.max_order),
        ..Offer::default()
    };
    let mut nodes: BTreeMap<&str, String> = BTreeMap::new();
    for (name, v) in &case.nodes {
        check_state(v);
        check_scan(v);
        let v = String::from_utf8_lossy(v).into_owned();
        check_protocol(&v);
        nodes.insert(NAMES[usize::from(*name) % NAMES.len()], v);
    }
    check_disk(&nodes);
    check_rings_round_trip(
        &nodes,
        RingOffer { max_ring_page_order: offer.max_ring_page_order, max_queues: offer.max_queues },
    );
    let read = |node: &str| nodes.get(node).cloned();
    match FrontendConfig::read(read, &offer) {
        Ok(cfg) => {
            let want_abi = nodes.get("protocol").map_or(Some(Protocol::Native), |p| Protocol::parse(Some(p)).ok());
            assert_eq!(Some(cfg.abi), want_abi);
            // xenbus_read_unsigned: absent or no number is the default.
            let unsigned = |n: &str, default| scan::read_unsigned(nodes.get(n).map(|v| v.as_bytes()), default);
            assert_eq!(cfg.ring_page_order, unsigned("ring-page-order", 0));
            assert!(cfg.ring_page_order <= offer.max_ring_page_order);
            assert_eq!(cfg.queues.len() as u32, unsigned("multi-queue-num-queues", 1));
            assert!((1..=offer.max_queues as usize).contains(&cfg.queues.len()));
            assert_eq!(cfg.persistent, unsigned("feature-persistent", 0) != 0);
            for (q, queue) in cfg.queues.iter().enumerate() {
                let dir = if cfg.queues.len() == 1 { String::new() } else { format!("queue-{q}/") };
                let node = |n: &str| nodes.get(format!("{dir}{n}").as_str()).and_then(|v| num(v));
                assert_eq!(Some(queue.event_channel.0), node("event-channel"), "queue {q}");
                assert_eq!(queue.ring_refs.len(), 1 << cfg.ring_page_order, "queue {q}");
                for (i, r) in queue.ring_refs.iter().enumerate() {
                    let want = if cfg.ring_page_order == 0 {
                        node("ring-ref").or_else(|| node("ring-ref0"))
                    } else {
                        node(&format!("ring-ref{i}"))
                    };
                    assert_eq!(Some(r.0), want, "queue {q} ring-ref {i}");
                }
            }
        }
        Err(ConfigError::Missing(node)) => assert!(!nodes.contains_key(node.as_str()), "{node} is there"),
        Err(ConfigError::Bad { node, value }) => {
            assert_eq!(nodes.get(node.as_str()), Some(&value), "bad value reported for {node}");
            if node != "protocol" {
                assert_eq!(num(&value), None, "{node} = {value:?} is a number");
            } else {
                assert!(Protocol::parse(Some(&value)).is_err());
            }
        }
        Err(ConfigError::Rings(RingNodeError::TooManyQueues { asked, offered })) => {
            assert_eq!(offered, offer.max_queues);
            assert!(asked == 0 || asked > offered);
        }
        Err(ConfigError::Rings(RingNodeError::RingOrder { asked, offered })) => {
            assert_eq!(offered, offer.max_ring_page_order);
            assert!(asked > offered);
        }
        Err(e) => panic!("unexpected error {e}"),
    }
}

fn case(max_queues: u8, max_order: u8, nodes: &[(&str, &str)]) -> Vec<u8> {
    let idx = |n: &str| NAMES.iter().position(|x| *x == n).expect("a known name") as u8;
    Case { max_queues, max_order, nodes: nodes.iter().map(|(n, v)| (idx(n), v.as_bytes().to_vec())).collect() }.encode()
}

/// Seeds: frontends as Linux and other guests write them (one queue of one
/// page, several queues of several pages, 32-bit), states, and bad values.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "linux-single",
            case(4, 4, &[("ring-ref", "8"), ("event-channel", "5"), ("protocol", "x86_64-abi"), ("state", "3")]),
        ),
        (
            "multi-queue",
            case(
                4,
                4,
                &[
                    ("ring-page-order", "1"),
                    ("multi-queue-num-queues", "2"),
                    ("queue-0/ring-ref0", "10"),
                    ("queue-0/ring-ref1", "11"),
                    ("queue-0/event-channel", "3"),
                    ("queue-1/ring-ref0", "12"),
                    ("queue-1/ring-ref1", "13"),
                    ("queue-1/event-channel", "4"),
                    ("feature-persistent", "1"),
                ],
            ),
        ),
        (
            "order-two",
            case(
                1,
                2,
                &[
                    ("ring-page-order", "2"),
                    ("ring-ref0", "1"),
                    ("ring-ref1", "2"),
                    ("ring-ref2", "3"),
                    ("ring-ref3", "4"),
                    ("event-channel", " 9 "),
                ],
            ),
        ),
        ("x86_32-ring-ref0", case(1, 0, &[("ring-ref0", "8"), ("event-channel", "5"), ("protocol", "x86_32-abi")])),
        (
            "bad-values",
            case(4, 4, &[("ring-ref", "-1"), ("event-channel", "5"), ("protocol", "arm-abi"), ("state", "4\0")]),
        ),
        (
            "linux-lenient",
            case(
                4,
                4,
                &[
                    ("ring-ref", "8junk"),
                    ("event-channel", "\t5\n"),
                    ("protocol", "x86_64-abi trailing"),
                    ("feature-persistent", "yes"),
                    ("multi-queue-num-queues", "one"),
                ],
            ),
        ),
        ("too-many-queues", case(2, 0, &[("multi-queue-num-queues", "3"), ("state", " 9")])),
        ("order-too-high", case(4, 1, &[("ring-page-order", "2"), ("ring-ref0", "1")])),
        ("missing-event-channel", case(4, 4, &[("ring-ref", "8"), ("state", "6")])),
        ("disk-libxl", case(1, 0, &[("params", "aio:/var/lib/xen/disk.img"), ("mode", "w"), ("device-type", "disk")])),
        ("disk-qcow2", case(1, 0, &[("params", "qcow2:/img.qcow2"), ("format", "qcow2"), ("discard-enable", "0")])),
        ("cdrom-empty", case(1, 0, &[("params", "aio:"), ("mode", "r"), ("device-type", "cdrom"), ("removable", "1")])),
        ("disk-format-conflict", case(1, 0, &[("params", "raw:/img"), ("format", "qcow2")])),
        ("disk-bad", case(1, 0, &[("params", "vhd:/img"), ("mode", "x"), ("format", "vmdk")])),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cases_round_trip_through_bytes() {
        for (_, bytes) in seeds() {
            assert_eq!(Case::decode(&bytes).encode(), bytes);
        }
    }

    #[test]
    fn harness_accepts_empty_and_garbage_inputs() {
        run(&[]);
        run(&[0xff; 64]);
        run(&[4, 4, 1, 2, b'3', b'1']);
    }
}
