//! A frontend and a backend on two threads over one mapping exchange 100,000
//! requests, each sleeping on a simulated event channel whenever the ring's
//! final check says there is nothing to do: a lost notification shows up as a
//! wait that times out.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use gnttab::GrantMapping;
use xen_ring::{BackRing, FrontRing};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
struct Req {
    id: u64,
    sector: u64,
    body: [u8; 96],
}

#[repr(C)]
#[derive(Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
struct Rsp {
    id: u64,
    status: i16,
    pad: [u8; 6],
}

const TOTAL: u64 = 100_000;

/// An event channel port: a latched pending bit, as Xen's.
#[derive(Default)]
struct Event {
    pending: Mutex<bool>,
    cond: Condvar,
}

impl Event {
    fn notify(&self) {
        *self.pending.lock().unwrap() = true;
        self.cond.notify_one();
    }

    fn wait(&self) {
        let guard = self.pending.lock().unwrap();
        let (mut guard, timeout) =
            self.cond.wait_timeout_while(guard, Duration::from_secs(20), |pending| !*pending).unwrap();
        assert!(!timeout.timed_out(), "lost notification: nobody woke us in 20 s");
        *guard = false;
    }
}

fn backend(mut ring: BackRing<Req, Rsp, Arc<GrantMapping>>, to_back: Arc<Event>, to_front: Arc<Event>) -> u64 {
    let mut served = 0;
    let mut batch = Vec::new();
    let mut notifications = 0;
    while served < TOTAL {
        batch.clear();
        // A budget smaller than the ring, as a backend serving several guests would use.
        ring.take_requests(8, &mut batch).unwrap();
        for r in &batch {
            assert_eq!(r.id, served);
            assert_eq!(r.sector, r.id * 8);
            ring.push_response(&Rsp { id: r.id, status: (r.id % 7) as i16, pad: [0; 6] }).unwrap();
            served += 1;
        }
        if ring.push_responses_and_check_notify().unwrap() {
            notifications += 1;
            to_front.notify();
        }
        if batch.is_empty() && !ring.final_check_for_requests().unwrap() {
            to_back.wait();
        }
    }
    notifications
}

fn frontend(mut ring: FrontRing<Req, Rsp, Arc<GrantMapping>>, to_back: Arc<Event>, to_front: Arc<Event>) -> u64 {
    let (mut sent, mut done, mut notifications) = (0, 0, 0);
    let mut got = Vec::new();
    while done < TOTAL {
        while sent < TOTAL && !ring.is_full() {
            ring.push_request(&Req { id: sent, sector: sent * 8, body: [sent as u8; 96] }).unwrap();
            sent += 1;
        }
        if ring.push_requests_and_check_notify().unwrap() {
            notifications += 1;
            to_back.notify();
        }
        got.clear();
        ring.take_responses(usize::MAX, &mut got).unwrap();
        for r in &got {
            assert_eq!(r.id, done);
            assert_eq!(r.status, (done % 7) as i16);
            done += 1;
        }
        if got.is_empty() && !ring.final_check_for_responses().unwrap() {
            to_front.wait();
        }
    }
    notifications
}

#[test]
fn front_and_back_exchange_100000_requests_with_event_suppression() {
    let mem = Arc::new(GrantMapping::anonymous(2 * 4096).unwrap());
    let front = FrontRing::<Req, Rsp, _>::new(mem.clone()).unwrap();
    let back = BackRing::<Req, Rsp, _>::new(mem).unwrap();
    assert_eq!(back.size(), 64);
    let (to_back, to_front) = (Arc::new(Event::default()), Arc::new(Event::default()));
    let b = {
        let (tb, tf) = (to_back.clone(), to_front.clone());
        std::thread::Builder::new().name("back".into()).spawn(move || backend(back, tb, tf)).unwrap()
    };
    let front_events = frontend(front, to_back, to_front);
    let back_events = b.join().unwrap();
    // Events were needed, but suppression kept them well below one per message.
    assert!(front_events > 0 && back_events > 0);
    assert!(front_events < TOTAL && back_events < TOTAL, "front {front_events}, back {back_events}");
}
