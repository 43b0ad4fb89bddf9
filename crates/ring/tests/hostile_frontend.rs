//! A hostile frontend on another thread scribbles over the indices and slots
//! while the backend serves the ring: the backend must end every pass (no
//! endless loop), never panic, and once it reports the ring broken keep
//! reporting it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gnttab::GrantMapping;
use xen_ring::abi::{REQ_EVENT, REQ_PROD, RING_OFFSET, RSP_EVENT, RSP_PROD};
use xen_ring::{BackRing, RingError};

/// xorshift64: a fixed-seed generator, so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn scribble(mem: &GrantMapping, stop: &AtomicBool, seed: u64) {
    let mut rng = Rng(seed);
    let mut prod = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let r = rng.next();
        match r % 8 {
            // Mostly plausible publishing, sometimes nonsense.
            0..=3 => prod = prod.wrapping_add((r >> 8) as u32 % 4),
            4 => prod = (r >> 8) as u32,
            5 => prod = prod.wrapping_sub(1),
            6 => {
                let off = [REQ_EVENT, RSP_PROD, RSP_EVENT][(r >> 8) as usize % 3];
                mem.store_u32(off, (r >> 16) as u32, Ordering::Relaxed).unwrap();
                continue;
            }
            _ => {
                let at = RING_OFFSET + (r >> 8) as usize % (4096 - RING_OFFSET - 8);
                mem.write(at, &r.to_le_bytes()).unwrap();
                continue;
            }
        }
        mem.store_u32(REQ_PROD, prod, Ordering::Release).unwrap();
    }
}

fn serve(back: &mut BackRing<[u8; 112], [u8; 16], Arc<GrantMapping>>, deadline: Instant) -> Option<RingError> {
    let mut batch = Vec::new();
    while Instant::now() < deadline {
        batch.clear();
        let pass = back.take_requests(16, &mut batch).and_then(|n| {
            assert!(n <= 16);
            for _ in 0..n {
                back.push_response(&[0x5a; 16])?;
            }
            back.push_responses_and_check_notify()?;
            back.final_check_for_requests()
        });
        if let Err(e) = pass {
            return Some(e);
        }
    }
    None
}

#[test]
fn backend_survives_a_frontend_scribbling_concurrently() {
    for seed in 1..=8u64 {
        let mem = Arc::new(GrantMapping::anonymous(4096).unwrap());
        let mut back = BackRing::<[u8; 112], [u8; 16], _>::new(mem.clone()).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let hostile = {
            let (mem, stop) = (mem.clone(), stop.clone());
            std::thread::spawn(move || scribble(&mem, &stop, seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
        };
        // Served until the ring breaks (the deadline only bounds a broken test).
        let err = serve(&mut back, Instant::now() + Duration::from_secs(20));
        stop.store(true, Ordering::Relaxed);
        hostile.join().unwrap();
        let e = err.expect("the scribbler's nonsense indices were never noticed");
        assert!(matches!(e, RingError::Overflow { .. } | RingError::Backwards { .. }), "{e}");
        assert!(back.is_broken());
        assert!(matches!(back.next_request(), Err(RingError::Broken)));
        assert!(matches!(back.push_responses_and_check_notify(), Err(RingError::Broken)));
        // Even broken, the backend never holds more than a ring of unanswered requests.
        assert!(back.free_response_slots() <= back.size());
    }
}
