//! What the toolstack and the frontend write to xenstore, read into plain
//! values, and what the backend writes back; no xenstore access here, so the
//! rules are tested directly.
//!
//! Node names and order follow Linux (`drivers/block/xen-blkback/xenbus.c`,
//! `xen-blkfront.c`) and QEMU (`hw/block/xen-block.c`):
//! - toolstack → backend: `params` (`aio:/path`, `raw:/path`, `/path`,
//!   `qcow2:/path`), `format` (`raw`, `qcow2` or absent), `mode` (`r` /
//!   `w`), `device-type` (`cdrom` / `disk`), `discard-enable` (`0`: no
//!   discard offered);
//! - backend, before `InitWait` (blkfront reads them in `talk_to_blkback`):
//!   `feature-max-indirect-segments`, `max-ring-page-order`,
//!   `multi-queue-max-queues`;
//! - frontend, before `Initialised`: `ring-ref` (one page) or
//!   `ring-ref0..N` with `ring-page-order`, `event-channel`, or
//!   `multi-queue-num-queues` with `queue-%u/{ring-ref*,event-channel}`,
//!   `protocol`, `feature-persistent`;
//! - backend, before `Connected` (blkfront reads them in `blkfront_connect`):
//!   `feature-flush-cache`, `feature-barrier`, `feature-discard` with
//!   `discard-granularity`, `discard-alignment`, `discard-secure`,
//!   `sectors`, `info`, `sector-size`, `physical-sector-size`.

use std::path::PathBuf;

use evtchn::Port;
use gnttab::GrantRef;
use xen_bus::{rings, scan, FrontendRings, Protocol, RingNodeError, RingOffer};

use crate::format::{DiskImage, ImageFormat};
use blkif::DiskLimits;

/// `VDISK_CDROM` (`blkif.h`).
pub const VDISK_CDROM: u32 = 1;
/// `VDISK_REMOVABLE`.
pub const VDISK_REMOVABLE: u32 = 2;
/// `VDISK_READONLY`.
pub const VDISK_READONLY: u32 = 4;
/// Largest `ring-page-order` offered (16 pages, as Linux's `xen_blkif_max_ring_order` allows).
pub const MAX_RING_PAGE_ORDER: u32 = 4;
/// Indirect segments offered per request (Linux blkback's `MAX_INDIRECT_SEGMENTS`).
pub const MAX_INDIRECT_SEGMENTS: u16 = 256;

/// Configuration errors; each becomes the device's `error` node.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A node that must be there is missing.
    #[error("Missing node {0}")]
    Missing(String),
    /// A node's value cannot be used.
    #[error("Bad value {value:?} in node {node}")]
    Bad {
        /// Node name.
        node: String,
        /// What it held.
        value: String,
    },
    /// A disk format we do not read (`qcow`, `vhd`, `qed`, ...).
    #[error("Unsupported disk format {0:?} (raw and qcow2 are supported)")]
    Format(String),
    /// `params`' prefix and the `format` node name different formats.
    #[error("params names format {params}, the format node {node}")]
    FormatConflict {
        /// From `params`.
        params: &'static str,
        /// From `format`.
        node: &'static str,
    },
    /// `params` names a driver we do not have (`qcow2:`, `vhd:`, ...).
    #[error("Unsupported disk driver {0:?}")]
    Driver(String),
    /// The frontend's rings are beyond what we offered (`ring-page-order`,
    /// `multi-queue-num-queues`: [`RingNodeError::RingOrder`],
    /// [`RingNodeError::TooManyQueues`]).
    #[error(transparent)]
    Rings(RingNodeError),
}

/// An image named by `params`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Medium {
    /// The file or block device.
    pub path: PathBuf,
    /// How the disk is laid out in it.
    pub format: ImageFormat,
}

/// The disk a backend directory describes (toolstack nodes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The image; `None` for a removable drive with no medium (`params`
    /// empty, or `aio:` as libxl writes an empty CD-ROM).
    pub medium: Option<Medium>,
    /// `mode` is `r`, or the device is a CD-ROM.
    pub read_only: bool,
    /// `device-type` is `cdrom`.
    pub cdrom: bool,
    /// `removable` is not 0 (libxl writes 1 for CD-ROMs).
    pub removable: bool,
    /// `discard-enable` is not 0 (libxl writes `discard-enable = 0` for
    /// `no-discard` in the disk spec; absent means enabled).
    pub discard_enable: bool,
}

impl DiskConfig {
    /// From the toolstack's nodes: `params`, `format`, `mode`, `device-type`
    /// (read through `read`, relative to the backend directory).
    pub fn read(read: impl Fn(&str) -> Option<String>) -> Result<DiskConfig, ConfigError> {
        let params = read("params").ok_or_else(|| ConfigError::Missing("params".into()))?;
        let cdrom = read("device-type").is_some_and(|t| t == "cdrom");
        let removable = cdrom || scan::read_unsigned(read("removable").as_deref().map(str::as_bytes), 0) != 0;
        let medium = match parse_params(&params) {
            Err(ConfigError::Bad { .. }) if removable && is_empty_medium(&params) => None,
            parsed => {
                let (from_params, path) = parsed?;
                let from_node = match read("format") {
                    Some(name) if !name.is_empty() => Some(format_named(&name)?),
                    _ => None,
                };
                let format = match (from_params, from_node) {
                    (Some(p), Some(n)) if p != n => {
                        return Err(ConfigError::FormatConflict { params: p.name(), node: n.name() })
                    }
                    (p, n) => p.or(n).unwrap_or(ImageFormat::Raw),
                };
                Some(Medium { path, format })
            }
        };
        let mode = read("mode").unwrap_or_else(|| "w".into());
        let read_only = match mode.as_str() {
            "r" | "ro" => true,
            "w" | "rw" | "w!" => false,
            _ => return Err(ConfigError::Bad { node: "mode".into(), value: mode }),
        };
        // As Linux's blkback reads it (`xenbus_read_unsigned(..., 1)`);
        // QEMU's `0`/`1` read alike.
        let discard_enable = scan::read_unsigned(read("discard-enable").as_deref().map(str::as_bytes), 1) != 0;
        Ok(DiskConfig { medium, read_only: read_only || cdrom, cdrom, removable, discard_enable })
    }

    /// The `info` node's bits: `VDISK_CDROM` from `device-type`,
    /// `VDISK_REMOVABLE` from `removable`, `VDISK_READONLY` from `mode` (or
    /// a CD-ROM).
    pub fn info(&self) -> u32 {
        let bit = |set: bool, bit: u32| if set { bit } else { 0 };
        bit(self.cdrom, VDISK_CDROM) | bit(self.removable, VDISK_REMOVABLE) | bit(self.read_only, VDISK_READONLY)
    }
}

/// A `params` of no image: empty, or driver prefixes only (`aio:`, what
/// libxl writes for a CD-ROM drive created empty).
fn is_empty_medium(params: &str) -> bool {
    params.trim().split(':').all(|part| matches!(part, "" | "aio" | "raw" | "file" | "phy"))
}

/// A format by the name libxl writes (`libxl__device_disk_string_of_format`:
/// `raw` is written as `aio`, `vhd` is QEMU's `vpc`).
fn format_named(name: &str) -> Result<ImageFormat, ConfigError> {
    match name {
        "raw" => Ok(ImageFormat::Raw),
        "qcow2" => Ok(ImageFormat::Qcow2),
        other => Err(ConfigError::Format(other.into())),
    }
}

/// Prefixes of `params` that name an image format rather than a driver.
const FORMAT_PREFIXES: [&str; 7] = ["raw", "qcow2", "qcow", "vhd", "vpc", "qed", "vmdk"];

/// The format and path in a `params` node: `/path`, `aio:/path`,
/// `raw:/path`, `aio:raw:/path`, `qcow2:/path` (xl's qdisk forms); the
/// format is `None` where only a driver (or nothing) is named. Other
/// drivers and formats are refused.
pub fn parse_params(params: &str) -> Result<(Option<ImageFormat>, PathBuf), ConfigError> {
    let mut rest = params.trim();
    let mut format = None;
    loop {
        match rest.split_once(':') {
            Some((prefix, tail)) if !prefix.contains('/') => {
                match prefix {
                    "aio" | "file" | "phy" => {}
                    f if FORMAT_PREFIXES.contains(&f) => format = Some(format_named(f)?),
                    other => return Err(ConfigError::Driver(other.into())),
                }
                rest = tail;
            }
            _ => break,
        }
    }
    if rest.is_empty() {
        return Err(ConfigError::Bad { node: "params".into(), value: params.into() });
    }
    Ok((format, PathBuf::from(rest)))
}

/// What the backend offers; written before `InitWait` and checked against
/// the frontend's choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Offer {
    /// `multi-queue-max-queues`.
    pub max_queues: u32,
    /// `max-ring-page-order`.
    pub max_ring_page_order: u32,
    /// `feature-max-indirect-segments`.
    pub max_indirect_segments: u16,
}

impl Default for Offer {
    fn default() -> Self {
        Offer { max_queues: 4, max_ring_page_order: MAX_RING_PAGE_ORDER, max_indirect_segments: MAX_INDIRECT_SEGMENTS }
    }
}

impl Offer {
    /// The nodes written at probe time, before `InitWait`, in Linux's order.
    pub fn nodes(&self) -> Vec<(&'static str, String)> {
        vec![
            ("feature-max-indirect-segments", self.max_indirect_segments.to_string()),
            ("max-ring-page-order", self.max_ring_page_order.to_string()),
            ("multi-queue-max-queues", self.max_queues.to_string()),
        ]
    }
}

/// Whether `discard-secure` is offered. Never: no sysfs attribute tells
/// whether a block device can erase securely (`BLKSECDISCARD`), and a file
/// cannot. A request with `BLKIF_DISCARD_SECURE` is then a plain discard,
/// as Linux's blkback does when it does not advertise it.
pub const SECURE_DISCARD_OFFERED: bool = false;

/// Whether discard is offered: the disk can, and the toolstack did not
/// switch it off.
fn discard_offered(disk: &dyn DiskImage, cfg: &DiskConfig) -> bool {
    disk.supports_discard() && cfg.discard_enable
}

/// The limits requests of `disk` are checked against.
pub fn disk_limits(disk: &dyn DiskImage, cfg: &DiskConfig, offer: &Offer) -> DiskLimits {
    let read_only = disk.is_read_only();
    // A removable drive's medium may change after a request is parsed: its
    // range is checked against the medium when it starts (`engine.rs`).
    let sectors = if cfg.removable { crate::media::MAX_MEDIUM_SECTORS } else { disk.sectors() };
    DiskLimits {
        sectors,
        read_only,
        discard: discard_offered(disk, cfg),
        barrier: !read_only,
        flush: !read_only,
        max_indirect_segments: offer.max_indirect_segments,
    }
}

/// The nodes written just before `Connected`, in Linux blkback's order
/// (`connect()` in `xenbus.c`); `persistent`: whether `feature-persistent`
/// is offered (the frontend uses persistent grants only if it is).
pub fn connect_nodes(disk: &dyn DiskImage, cfg: &DiskConfig, persistent: bool) -> Vec<(&'static str, String)> {
    let info = cfg.info() | if disk.is_read_only() { VDISK_READONLY } else { 0 };
    let flag = |b: bool| u8::from(b).to_string();
    let writable = !disk.is_read_only();
    let mut nodes = vec![("feature-flush-cache", flag(writable))];
    let discard = discard_offered(disk, cfg);
    if discard {
        // A file's holes are punched sector by sector, a qcow2 image's
        // clusters freed whole.
        nodes.push(("discard-granularity", disk.discard_granularity().to_string()));
        nodes.push(("discard-alignment", "0".into()));
        nodes.push(("discard-secure", flag(SECURE_DISCARD_OFFERED)));
    }
    nodes.push(("feature-discard", flag(discard)));
    nodes.push(("feature-barrier", flag(writable)));
    nodes.push(("feature-persistent", flag(persistent)));
    // blkif counts 512-byte sectors whatever the logical sector size.
    nodes.push(("sectors", disk.sectors().to_string()));
    nodes.push(("info", info.to_string()));
    nodes.push(("sector-size", disk.logical_sector_size().to_string()));
    nodes.push(("physical-sector-size", disk.physical_sector_size().to_string()));
    nodes
}

/// One ring of the frontend: its pages and event channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// The ring's grant references, in page order.
    pub ring_refs: Vec<GrantRef>,
    /// The frontend's port.
    pub event_channel: Port,
}

/// The frontend's choice, read when it reaches `Initialised`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendConfig {
    /// The ring layout (`protocol`).
    pub abi: Protocol,
    /// `ring-page-order` (0 when absent).
    pub ring_page_order: u32,
    /// One entry per queue.
    pub queues: Vec<QueueConfig>,
    /// `feature-persistent` was set: with ours, the guest's data pages are
    /// mapped and kept (`mapped.rs`).
    pub persistent: bool,
}

/// A node read with `xenbus_read_unsigned(..., default)`, as Linux's
/// blkback reads optional ones: absent or converting nothing is `default`.
fn unsigned_or(read: &impl Fn(&str) -> Option<String>, node: &str, default: u32) -> u32 {
    scan::read_unsigned(read(node).as_deref().map(str::as_bytes), default)
}

impl From<RingNodeError> for ConfigError {
    fn from(e: RingNodeError) -> Self {
        match e {
            RingNodeError::Missing(node) => ConfigError::Missing(node),
            RingNodeError::Bad { node, value } => ConfigError::Bad { node, value },
            other => ConfigError::Rings(other),
        }
    }
}

impl FrontendConfig {
    /// Reads the frontend's nodes through `read` (paths relative to the
    /// frontend directory), checking them against `offer`; the rings by
    /// [`FrontendRings::read`], in the layout Linux writes.
    pub fn read(read: impl Fn(&str) -> Option<String>, offer: &Offer) -> Result<FrontendConfig, ConfigError> {
        let abi = match read("protocol") {
            None => Protocol::Native,
            Some(p) => Protocol::parse(Some(&p)).map_err(|_| ConfigError::Bad { node: "protocol".into(), value: p })?,
        };
        let ring_offer = RingOffer { max_ring_page_order: offer.max_ring_page_order, max_queues: offer.max_queues };
        let rings = FrontendRings::read(|n| Ok::<_, ConfigError>(read(n)), ring_offer)?;
        let persistent = unsigned_or(&read, "feature-persistent", 0) != 0;
        let queues = rings
            .queues
            .into_iter()
            .map(|q: rings::QueueRing| QueueConfig {
                ring_refs: q.ring_refs.into_iter().map(GrantRef).collect(),
                event_channel: Port(q.event_channel),
            })
            .collect();
        Ok(FrontendConfig { abi, ring_page_order: rings.ring_page_order, queues, persistent })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn reader(nodes: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = nodes.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn params_accepts_xl_qdisk_forms_and_refuses_other_drivers() {
        let d = || PathBuf::from("/d");
        assert_eq!(parse_params("/var/disk.img").unwrap(), (None, PathBuf::from("/var/disk.img")));
        assert_eq!(parse_params("aio:/d").unwrap(), (None, d()));
        assert_eq!(parse_params("raw:/d").unwrap(), (Some(ImageFormat::Raw), d()));
        assert_eq!(parse_params("aio:raw:/d").unwrap(), (Some(ImageFormat::Raw), d()));
        assert_eq!(parse_params("qcow2:/d").unwrap(), (Some(ImageFormat::Qcow2), d()));
        assert_eq!(parse_params("tap:/d"), Err(ConfigError::Driver("tap".into())));
        assert!(parse_params("aio:").is_err());
    }

    #[test]
    fn formats_libxl_writes_that_we_do_not_read_are_refused_by_name() {
        for name in ["qcow", "vhd", "vpc", "qed", "vmdk"] {
            let e = parse_params(&format!("{name}:/d")).unwrap_err();
            assert_eq!(e, ConfigError::Format(name.into()));
            assert!(e.to_string().contains(name), "{e}");
            let e = DiskConfig::read(reader(&[("params", "/d"), ("format", name)])).unwrap_err();
            assert_eq!(e, ConfigError::Format(name.into()));
        }
    }

    #[test]
    fn the_format_comes_from_params_or_the_format_node_and_they_must_agree() {
        let format = |nodes: &[(&str, &str)]| DiskConfig::read(reader(nodes)).map(|c| c.medium.unwrap().format);
        assert_eq!(format(&[("params", "/d")]), Ok(ImageFormat::Raw));
        assert_eq!(format(&[("params", "aio:/d"), ("format", "")]), Ok(ImageFormat::Raw));
        assert_eq!(format(&[("params", "qcow2:/d")]), Ok(ImageFormat::Qcow2));
        assert_eq!(format(&[("params", "aio:/d"), ("format", "qcow2")]), Ok(ImageFormat::Qcow2));
        assert_eq!(format(&[("params", "qcow2:/d"), ("format", "qcow2")]), Ok(ImageFormat::Qcow2));
        assert_eq!(
            format(&[("params", "raw:/d"), ("format", "qcow2")]),
            Err(ConfigError::FormatConflict { params: "raw", node: "qcow2" })
        );
    }

    #[test]
    fn discard_enable_0_switches_discard_off_and_absent_leaves_it_on() {
        let enabled = |v: Option<&str>| {
            let mut nodes = vec![("params", "/d")];
            nodes.extend(v.map(|v| ("discard-enable", v)));
            DiskConfig::read(reader(&nodes)).unwrap().discard_enable
        };
        assert!(enabled(None) && enabled(Some("1")) && enabled(Some("junk")));
        assert!(!enabled(Some("0")) && !enabled(Some(" 0\n")));
    }

    #[test]
    fn info_has_cdrom_removable_and_read_only_bits_from_their_nodes() {
        let info = |nodes: &[(&str, &str)]| {
            let mut all = vec![("params", "/d")];
            all.extend_from_slice(nodes);
            DiskConfig::read(reader(&all)).unwrap().info()
        };
        assert_eq!(info(&[]), 0);
        assert_eq!(info(&[("mode", "r")]), VDISK_READONLY);
        assert_eq!(info(&[("removable", "1")]), VDISK_REMOVABLE);
        assert_eq!(info(&[("removable", "0"), ("device-type", "disk")]), 0);
        // libxl's CD-ROM: device-type cdrom, removable 1, mode r.
        let cd = info(&[("device-type", "cdrom"), ("removable", "1"), ("mode", "r")]);
        assert_eq!(cd, VDISK_CDROM | VDISK_REMOVABLE | VDISK_READONLY);
        assert_eq!(info(&[("device-type", "cdrom"), ("mode", "w")]), cd, "a CD-ROM is removable and read-only");
    }

    #[test]
    fn only_a_removable_drive_may_be_empty() {
        for params in ["", "aio:", " aio: "] {
            let cd = DiskConfig::read(reader(&[("params", params), ("device-type", "cdrom")])).unwrap();
            assert_eq!(cd.medium, None, "{params:?}");
            let r = DiskConfig::read(reader(&[("params", params), ("removable", "1")])).unwrap();
            assert_eq!(r.medium, None);
            let e = DiskConfig::read(reader(&[("params", params), ("device-type", "disk")])).unwrap_err();
            assert!(matches!(e, ConfigError::Bad { ref node, .. } if node == "params"), "{e:?}");
        }
        let e = DiskConfig::read(reader(&[("params", "tap:"), ("device-type", "cdrom")])).unwrap_err();
        assert_eq!(e, ConfigError::Driver("tap".into()));
        let cd = DiskConfig::read(reader(&[("params", "qcow2:/cd.qcow2"), ("device-type", "cdrom")])).unwrap();
        assert_eq!(cd.medium, Some(Medium { path: "/cd.qcow2".into(), format: ImageFormat::Qcow2 }));
    }

    /// libxl writes `w` or `r`. QEMU's xen-block is read-only unless the
    /// first character is `w`, Linux's blkback unless the value contains a
    /// `w`; both agree on these, and where they disagree (`rw`: QEMU
    /// read-only) the writer's intent (Linux's reading) is followed.
    #[test]
    fn mode_is_read_as_libxl_writes_it_and_anything_else_is_refused() {
        let mode = |m: Option<&str>| {
            let mut nodes = vec![("params", "/d")];
            nodes.extend(m.map(|m| ("mode", m)));
            DiskConfig::read(reader(&nodes)).map(|c| c.read_only)
        };
        assert_eq!(mode(Some("w")), Ok(false));
        assert_eq!(mode(Some("r")), Ok(true));
        assert_eq!((mode(Some("w!")), mode(Some("rw")), mode(Some("ro"))), (Ok(false), Ok(false), Ok(true)));
        assert_eq!(mode(None), Ok(false), "absent: writable, as QEMU's xen-block");
        for odd in ["", "x", "W", "read"] {
            assert_eq!(mode(Some(odd)), Err(ConfigError::Bad { node: "mode".into(), value: odd.into() }));
        }
    }

    #[test]
    fn mode_r_and_cdrom_are_read_only() {
        let c = DiskConfig::read(reader(&[("params", "/d"), ("format", "raw"), ("mode", "r")])).unwrap();
        assert!(c.read_only);
        let c = DiskConfig::read(reader(&[("params", "/d"), ("mode", "w"), ("device-type", "cdrom")])).unwrap();
        assert!(c.read_only && c.cdrom);
    }

    #[test]
    fn single_queue_single_page_frontend_as_linux_writes_it() {
        let f = FrontendConfig::read(
            reader(&[("ring-ref", "8"), ("event-channel", "5"), ("protocol", "x86_32-abi")]),
            &Offer::default(),
        )
        .unwrap();
        assert_eq!(f.abi, Protocol::X86_32);
        assert_eq!(f.queues, vec![QueueConfig { ring_refs: vec![GrantRef(8)], event_channel: Port(5) }]);
    }

    #[test]
    fn multi_queue_multi_page_frontend_reads_every_queue_directory() {
        let f = FrontendConfig::read(
            reader(&[
                ("ring-page-order", "1"),
                ("multi-queue-num-queues", "2"),
                ("queue-0/ring-ref0", "10"),
                ("queue-0/ring-ref1", "11"),
                ("queue-0/event-channel", "3"),
                ("queue-1/ring-ref0", "12"),
                ("queue-1/ring-ref1", "13"),
                ("queue-1/event-channel", "4"),
            ]),
            &Offer::default(),
        )
        .unwrap();
        assert_eq!(f.abi, Protocol::Native);
        assert_eq!(f.queues[1].ring_refs, vec![GrantRef(12), GrantRef(13)]);
        assert_eq!(f.queues[1].event_channel, Port(4));
    }

    /// Values Linux's blkback accepts (`%u`, `%63s`, `xenbus_read_unsigned`)
    /// are accepted alike (issue 13); what it refuses is refused.
    #[test]
    fn frontend_nodes_are_read_as_linux_reads_them() {
        let f = FrontendConfig::read(
            reader(&[
                ("ring-ref", "8junk"),
                ("event-channel", " 5\n"),
                ("protocol", "x86_32-abi trailing"),
                ("feature-persistent", "yes"),
                ("multi-queue-num-queues", "many"),
                ("ring-page-order", "big"),
            ]),
            &Offer::default(),
        )
        .unwrap();
        assert_eq!(f.abi, Protocol::X86_32);
        assert!(!f.persistent);
        assert_eq!(f.ring_page_order, 0);
        assert_eq!(f.queues, vec![QueueConfig { ring_refs: vec![GrantRef(8)], event_channel: Port(5) }]);
        let f = FrontendConfig::read(
            reader(&[("ring-ref", "8"), ("event-channel", "5"), ("feature-persistent", "2x")]),
            &Offer::default(),
        )
        .unwrap();
        assert!(f.persistent);
        for (node, value) in [("ring-ref", "junk"), ("event-channel", "-1"), ("protocol", "x86_32"), ("protocol", " ")]
        {
            let mut nodes = vec![("ring-ref", "8"), ("event-channel", "5")];
            nodes.retain(|(n, _)| *n != node);
            nodes.push((node, value));
            let e = FrontendConfig::read(reader(&nodes), &Offer::default()).unwrap_err();
            assert!(matches!(&e, ConfigError::Bad { node: n, .. } if n == node), "{node}={value:?}: {e:?}");
        }
    }

    #[test]
    fn frontend_asking_beyond_the_offer_is_refused() {
        let offer = Offer { max_queues: 2, ..Offer::default() };
        let e = FrontendConfig::read(reader(&[("multi-queue-num-queues", "3")]), &offer).unwrap_err();
        assert_eq!(e, ConfigError::Rings(RingNodeError::TooManyQueues { asked: 3, offered: 2 }));
        let e = FrontendConfig::read(reader(&[("ring-page-order", "9")]), &offer).unwrap_err();
        assert!(matches!(e, ConfigError::Rings(RingNodeError::RingOrder { asked: 9, .. })));
        let e = FrontendConfig::read(reader(&[("ring-ref", "1")]), &offer).unwrap_err();
        assert_eq!(e, ConfigError::Missing("event-channel".into()));
    }
}
