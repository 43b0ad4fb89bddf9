//! The ring nodes a frontend writes before `Initialised`, in the layout
//! Linux's xen-blkfront writes (`talk_to_blkback`, `write_per_ring_nodes`)
//! and its xen-blkback reads (`connect_ring`, `read_per_ring_refs`):
//!
//! - `ring-page-order`, once at the top level and only for rings of more
//!   than one page (every queue has the same size);
//! - `multi-queue-num-queues`, only for more than one queue;
//! - per queue, at the top level for one queue, else below `queue-<i>/`:
//!   `ring-ref` (one page) or `ring-ref0` .. `ring-ref<2^order - 1>`, then
//!   `event-channel`.
//!
//! [`FrontendRings`] reads and writes the whole layout, so that backends and
//! the simulated frontends agree on it by construction.

use crate::scan;

/// Why the ring nodes cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingNodeError {
    /// A node that must be there is missing.
    #[error("Missing node {0}")]
    Missing(String),
    /// A node's value does not convert (`%u` reads nothing).
    #[error("Bad value {value:?} in node {node}")]
    Bad {
        /// The node, relative to the frontend directory.
        node: String,
        /// What it held.
        value: String,
    },
    /// `ring-page-order` above what the backend offered.
    #[error("Frontend ring order {asked} above {offered}")]
    RingOrder {
        /// Requested.
        asked: u32,
        /// Offered (`max-ring-page-order`).
        offered: u32,
    },
    /// `multi-queue-num-queues` zero or above what the backend offered.
    #[error("Frontend asks for {asked} queues, {offered} offered")]
    TooManyQueues {
        /// Requested.
        asked: u32,
        /// Offered (`multi-queue-max-queues`).
        offered: u32,
    },
}

/// What the backend offered (`max-ring-page-order`,
/// `multi-queue-max-queues`): the frontend's choice is checked against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingOffer {
    /// Largest `ring-page-order` accepted.
    pub max_ring_page_order: u32,
    /// Most queues accepted.
    pub max_queues: u32,
}

/// One queue's ring: its grant references, in page order, and the port the
/// frontend allocated for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueRing {
    /// `ring-ref` or `ring-ref<i>`.
    pub ring_refs: Vec<u32>,
    /// `event-channel`.
    pub event_channel: u32,
}

/// Every ring a frontend published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendRings {
    /// `ring-page-order` (0 when absent): each ring has `2^order` pages.
    pub ring_page_order: u32,
    /// One entry per queue, in queue order.
    pub queues: Vec<QueueRing>,
}

/// The directory of queue `index` of `num_queues`, relative to the frontend
/// directory: `""` for a single queue, else `queue-<index>/`.
pub fn queue_dir(num_queues: usize, index: usize) -> String {
    if num_queues == 1 {
        String::new()
    } else {
        format!("queue-{index}/")
    }
}

/// A node read with `%u` as Linux's backends read it ([`scan::scan_u32`]):
/// `None` if absent, an error if it converts nothing.
fn number<E: From<RingNodeError>>(
    read: &impl Fn(&str) -> Result<Option<String>, E>,
    node: &str,
) -> Result<Option<u32>, E> {
    match read(node)? {
        None => Ok(None),
        Some(v) => match scan::scan_u32(v.as_bytes()) {
            Some(n) => Ok(Some(n)),
            None => Err(RingNodeError::Bad { node: node.into(), value: v }.into()),
        },
    }
}

fn required<E: From<RingNodeError>>(read: &impl Fn(&str) -> Result<Option<String>, E>, node: &str) -> Result<u32, E> {
    number(read, node)?.ok_or_else(|| RingNodeError::Missing(node.into()).into())
}

/// A node read with `xenbus_read_unsigned(..., default)`: absent or
/// converting nothing is `default`.
fn unsigned_or<E>(read: &impl Fn(&str) -> Result<Option<String>, E>, node: &str, default: u32) -> Result<u32, E> {
    Ok(scan::read_unsigned(read(node)?.as_deref().map(str::as_bytes), default))
}

/// The top-level `ring-page-order` (unreadable is one page, as Linux's
/// `xenbus_read_unsigned(..., 0)`), checked against `max`.
pub fn read_ring_page_order<E: From<RingNodeError>>(
    read: &impl Fn(&str) -> Result<Option<String>, E>,
    max: u32,
) -> Result<u32, E> {
    let order = unsigned_or(read, "ring-page-order", 0)?;
    if order > max {
        return Err(RingNodeError::RingOrder { asked: order, offered: max }.into());
    }
    Ok(order)
}

/// The grant references of the ring in `dir` (see [`queue_dir`]) of
/// `2^order` pages.
pub fn read_ring_refs<E: From<RingNodeError>>(
    read: &impl Fn(&str) -> Result<Option<String>, E>,
    dir: &str,
    order: u32,
) -> Result<Vec<u32>, E> {
    if order == 0 {
        // Linux writes `ring-ref` for one page; some frontends write
        // `ring-ref0` (with `ring-page-order = 0`): accept both.
        return match number(read, &format!("{dir}ring-ref"))? {
            Some(r) => Ok(vec![r]),
            None => Ok(vec![required(read, &format!("{dir}ring-ref0"))?]),
        };
    }
    (0..1u32 << order).map(|i| required(read, &format!("{dir}ring-ref{i}"))).collect()
}

impl QueueRing {
    /// Reads the queue in `dir` (see [`queue_dir`]) of rings of `2^order` pages.
    pub fn read<E: From<RingNodeError>>(
        read: &impl Fn(&str) -> Result<Option<String>, E>,
        dir: &str,
        order: u32,
    ) -> Result<QueueRing, E> {
        let event_channel = required(read, &format!("{dir}event-channel"))?;
        let ring_refs = read_ring_refs(read, dir, order)?;
        Ok(QueueRing { ring_refs, event_channel })
    }

    /// The queue's nodes below `dir`, in the order Linux writes them.
    pub fn nodes(&self, dir: &str) -> Vec<(String, String)> {
        let mut nodes = ring_ref_nodes(dir, &self.ring_refs);
        nodes.push((format!("{dir}event-channel"), self.event_channel.to_string()));
        nodes
    }
}

/// `ring-ref` for one page, else `ring-ref<i>`, below `dir`.
pub fn ring_ref_nodes(dir: &str, refs: &[u32]) -> Vec<(String, String)> {
    if let [one] = refs {
        return vec![(format!("{dir}ring-ref"), one.to_string())];
    }
    refs.iter().enumerate().map(|(i, r)| (format!("{dir}ring-ref{i}"), r.to_string())).collect()
}

impl FrontendRings {
    /// Reads the frontend's rings through `read` (a node relative to the
    /// frontend directory; `None` if absent), checked against `offer`.
    pub fn read<E: From<RingNodeError>>(
        read: impl Fn(&str) -> Result<Option<String>, E>,
        offer: RingOffer,
    ) -> Result<FrontendRings, E> {
        let ring_page_order = read_ring_page_order(&read, offer.max_ring_page_order)?;
        let num_queues = unsigned_or(&read, "multi-queue-num-queues", 1)?;
        if num_queues == 0 || num_queues > offer.max_queues {
            return Err(RingNodeError::TooManyQueues { asked: num_queues, offered: offer.max_queues }.into());
        }
        let queues = (0..num_queues as usize)
            .map(|q| QueueRing::read(&read, &queue_dir(num_queues as usize, q), ring_page_order))
            .collect::<Result<_, E>>()?;
        Ok(FrontendRings { ring_page_order, queues })
    }

    /// The nodes to write, in the order Linux's blkfront writes them.
    pub fn nodes(&self) -> Vec<(String, String)> {
        let mut nodes = Vec::new();
        if self.ring_page_order > 0 {
            nodes.push(("ring-page-order".to_string(), self.ring_page_order.to_string()));
        }
        let n = self.queues.len();
        if n > 1 {
            nodes.push(("multi-queue-num-queues".to_string(), n.to_string()));
        }
        for (i, q) in self.queues.iter().enumerate() {
            nodes.extend(q.nodes(&queue_dir(n, i)));
        }
        nodes
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const OFFER: RingOffer = RingOffer { max_ring_page_order: 4, max_queues: 4 };

    fn reader(nodes: &[(String, String)]) -> impl Fn(&str) -> Result<Option<String>, RingNodeError> {
        let map: HashMap<String, String> = nodes.iter().cloned().collect();
        move |k| Ok(map.get(k).cloned())
    }

    fn owned(nodes: &[(&str, &str)]) -> Vec<(String, String)> {
        nodes.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn multi_queue_multi_page_layout_has_one_top_level_ring_page_order() {
        let rings = FrontendRings {
            ring_page_order: 1,
            queues: vec![
                QueueRing { ring_refs: vec![10, 11], event_channel: 3 },
                QueueRing { ring_refs: vec![12, 13], event_channel: 4 },
            ],
        };
        let want = owned(&[
            ("ring-page-order", "1"),
            ("multi-queue-num-queues", "2"),
            ("queue-0/ring-ref0", "10"),
            ("queue-0/ring-ref1", "11"),
            ("queue-0/event-channel", "3"),
            ("queue-1/ring-ref0", "12"),
            ("queue-1/ring-ref1", "13"),
            ("queue-1/event-channel", "4"),
        ]);
        assert_eq!(rings.nodes(), want);
        assert_eq!(FrontendRings::read(reader(&want), OFFER).unwrap(), rings);
    }

    #[test]
    fn one_page_one_queue_writes_ring_ref_and_nothing_else() {
        let rings =
            FrontendRings { ring_page_order: 0, queues: vec![QueueRing { ring_refs: vec![8], event_channel: 5 }] };
        assert_eq!(rings.nodes(), owned(&[("ring-ref", "8"), ("event-channel", "5")]));
        assert_eq!(FrontendRings::read(reader(&rings.nodes()), OFFER).unwrap(), rings);
    }

    #[test]
    fn per_queue_ring_page_order_is_not_linux_and_is_ignored() {
        let nodes =
            owned(&[("queue-1/ring-page-order", "1"), ("queue-1/ring-ref0", "10"), ("queue-1/ring-ref1", "11")]);
        let order = read_ring_page_order(&reader(&nodes), 4).unwrap();
        assert_eq!(order, 0);
        // One page: only the first reference counts.
        assert_eq!(read_ring_refs(&reader(&nodes), "queue-1/", order).unwrap(), vec![10]);
    }

    #[test]
    fn single_page_accepts_ring_ref0_too() {
        let nodes = owned(&[("ring-page-order", "0"), ("ring-ref0", "9")]);
        assert_eq!(read_ring_refs(&reader(&nodes), "", 0).unwrap(), vec![9]);
    }

    #[test]
    fn choices_beyond_the_offer_are_refused() {
        let e = FrontendRings::read(reader(&owned(&[("ring-page-order", "9")])), OFFER).unwrap_err();
        assert_eq!(e, RingNodeError::RingOrder { asked: 9, offered: 4 });
        for n in ["0", "5"] {
            let e = FrontendRings::read(reader(&owned(&[("multi-queue-num-queues", n)])), OFFER).unwrap_err();
            assert!(matches!(e, RingNodeError::TooManyQueues { offered: 4, .. }), "{n}: {e:?}");
        }
    }
}
