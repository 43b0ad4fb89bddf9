//! The bounded queue between the client's reader thread and the consumer of
//! watch events.
//!
//! Policy (XSA-349: a peer must not make us queue without bound): the queue
//! holds at most `limit` events. When it is full, the newest event is dropped,
//! counted in [`WatchQueue::dropped`], and an *overflow marker*
//! ([`WatchEvent::is_overflow`]) is queued behind the events already waiting,
//! in a slot reserved for it. A consumer that takes the marker must re-read
//! everything it watches: some change after the events before the marker was
//! not reported. One marker covers every drop until the consumer takes it.
//! The reader thread never blocks on this queue, so replies keep flowing
//! however slow the consumer is.

use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_channel::{Receiver, Sender, TrySendError};

/// A watch firing: the path that changed and the token given to `watch`.
/// The overflow marker has an empty path and token.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WatchEvent {
    /// The path that changed (at or below the watched path), or a special path.
    pub path: String,
    /// The token the watch was registered with.
    pub token: String,
}

impl WatchEvent {
    /// The marker queued after events were dropped: rescan everything.
    pub fn overflow() -> Self {
        WatchEvent { path: String::new(), token: String::new() }
    }

    /// Whether this is the overflow marker (real events always have a path).
    pub fn is_overflow(&self) -> bool {
        self.path.is_empty()
    }
}

/// The sending side of the watch queue, owned by the reader thread.
#[derive(Debug)]
pub struct WatchQueue {
    tx: Sender<WatchEvent>,
    rx: Receiver<WatchEvent>,
    limit: usize,
    /// A marker was queued and may not have been taken yet.
    marker_queued: bool,
    /// Events queued after the marker (to tell whether the marker was taken).
    sent_after_marker: usize,
    dropped: std::sync::Arc<AtomicU64>,
}

impl WatchQueue {
    /// A queue holding up to `limit` events (at least 1) plus the marker.
    pub fn new(limit: usize) -> Self {
        let limit = limit.max(1);
        let (tx, rx) = crossbeam_channel::bounded(limit + 1);
        WatchQueue { tx, rx, limit, marker_queued: false, sent_after_marker: 0, dropped: Default::default() }
    }

    /// A receiver for consumers (all clones share one queue).
    pub fn receiver(&self) -> Receiver<WatchEvent> {
        self.rx.clone()
    }

    /// The drop counter, shared so the client can report it.
    pub fn dropped_counter(&self) -> std::sync::Arc<AtomicU64> {
        self.dropped.clone()
    }

    /// Events dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Queues `event`, or drops it by the policy above. Never blocks.
    pub fn push(&mut self, event: WatchEvent) {
        // Only this side sends, so the length can only shrink between the
        // check and the send: a send after `len < capacity` cannot block.
        let len = self.tx.len();
        if self.marker_queued && len <= self.sent_after_marker {
            self.marker_queued = false;
        }
        if len < self.limit {
            if self.tx.try_send(event).is_ok() && self.marker_queued {
                self.sent_after_marker += 1;
            }
            return;
        }
        let total = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if self.marker_queued {
            return;
        }
        log::warn!(
            "xenstore watch queue full ({} events): dropped {:?}, {total} dropped so far; consumers will rescan",
            self.limit,
            event.path
        );
        match self.tx.try_send(WatchEvent::overflow()) {
            Ok(()) => {
                self.marker_queued = true;
                self.sent_after_marker = 0;
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                // Unreachable by the reservation above; counted as dropped already.
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(i: usize) -> WatchEvent {
        WatchEvent { path: format!("/p{i}"), token: "t".into() }
    }

    #[test]
    fn full_queue_drops_newest_counts_and_queues_one_marker() {
        let mut q = WatchQueue::new(2);
        let rx = q.receiver();
        for i in 0..5 {
            q.push(ev(i));
        }
        assert_eq!(q.dropped(), 3);
        let got: Vec<WatchEvent> = rx.try_iter().collect();
        assert_eq!(got, vec![ev(0), ev(1), WatchEvent::overflow()]);
    }

    #[test]
    fn marker_is_queued_again_after_the_consumer_took_it() {
        let mut q = WatchQueue::new(1);
        let rx = q.receiver();
        q.push(ev(0));
        q.push(ev(1));
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![ev(0), WatchEvent::overflow()]);
        q.push(ev(2));
        q.push(ev(3));
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![ev(2), WatchEvent::overflow()]);
        assert_eq!(q.dropped(), 2);
    }

    #[test]
    fn no_second_marker_while_the_first_is_still_queued() {
        let mut q = WatchQueue::new(2);
        let rx = q.receiver();
        q.push(ev(0));
        q.push(ev(1));
        q.push(ev(2)); // dropped, marker queued: [0, 1, M]
        assert_eq!(rx.recv().unwrap(), ev(0));
        assert_eq!(rx.recv().unwrap(), ev(1)); // [M]
        q.push(ev(3)); // fits: [M, 3]
        q.push(ev(4)); // dropped; M still queued, so no new marker
        let rest: Vec<WatchEvent> = rx.try_iter().collect();
        assert_eq!(rest, vec![WatchEvent::overflow(), ev(3)]);
        assert_eq!(q.dropped(), 2);
    }

    #[test]
    fn overflow_marker_is_recognisable() {
        assert!(WatchEvent::overflow().is_overflow());
        assert!(!ev(0).is_overflow());
    }
}
