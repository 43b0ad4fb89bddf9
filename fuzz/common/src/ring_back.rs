//! Target `ring_back`: the back end of a shared ring against a frontend that
//! writes arbitrary indices and slot contents between the backend's calls.
//! The backend must never panic, never loop beyond its budget, never take a
//! request the frontend did not publish or more than the ring holds, never
//! overwrite a request it has not taken, and once it reports the frontend
//! broken it must stay broken. A backend that restarts without a journal
//! (`resume(mem, None)`) resumes the ring exactly when no request is
//! pending in the shared indices (`req_prod == rsp_prod`), at `rsp_prod`,
//! unbroken; otherwise it refuses and the old backend goes on.
//!
//! Input: a setup byte (bit 0: 8-byte entries instead of blkif's 112; bit 1:
//! two pages), the starting index (`u32`), then [`Op`]s until the end.

use std::sync::atomic::Ordering;

use gnttab::GrantMapping;
use xen_ring::abi::{REQ_EVENT, REQ_PROD, RING_OFFSET, RSP_EVENT, RSP_PROD};
use xen_ring::{BackRing, RingEntry, RingError};

use crate::input::Input;

/// One step: a frontend action or a backend call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// The frontend stores `value` into index word `which % 4` (`req_prod`,
    /// `req_event`, `rsp_prod`, `rsp_event`).
    SetIndex {
        /// Which index.
        which: u8,
        /// Its new value.
        value: u32,
    },
    /// The frontend writes `bytes` into the ring area at `offset` (modulo its length).
    WriteSlots {
        /// Offset past the header.
        offset: u16,
        /// The bytes (at most 255).
        bytes: Vec<u8>,
    },
    /// The frontend advances `req_prod` by `count`, as a frontend would.
    Publish {
        /// How many requests.
        count: u8,
    },
    /// `next_request`.
    NextRequest,
    /// `take_requests` with this budget.
    TakeRequests {
        /// The budget.
        budget: u8,
    },
    /// `push_response` of a response filled with `fill`.
    PushResponse {
        /// The response's byte value.
        fill: u8,
    },
    /// `push_responses_and_check_notify`.
    PushAndNotify,
    /// `final_check_for_requests`.
    FinalCheck,
    /// `unconsumed_requests`.
    Unconsumed,
    /// The backend restarts: `BackRing::resume` on the ring without a journal.
    Resume,
}

const OPS: u8 = 10;

impl Op {
    /// Decodes one op (every byte string decodes to some op).
    pub fn decode(input: &mut Input<'_>) -> Op {
        match input.u8() % OPS {
            0 => Op::SetIndex { which: input.u8(), value: input.u32() },
            1 => {
                let offset = input.u16();
                let len = usize::from(input.u8());
                Op::WriteSlots { offset, bytes: input.bytes(len).to_vec() }
            }
            2 => Op::Publish { count: input.u8() },
            3 => Op::NextRequest,
            4 => Op::TakeRequests { budget: input.u8() },
            5 => Op::PushResponse { fill: input.u8() },
            6 => Op::PushAndNotify,
            7 => Op::FinalCheck,
            8 => Op::Unconsumed,
            _ => Op::Resume,
        }
    }

    /// Appends the op's encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Op::SetIndex { which, value } => {
                out.extend([0, *which]);
                out.extend(value.to_le_bytes());
            }
            Op::WriteSlots { offset, bytes } => {
                out.push(1);
                out.extend(offset.to_le_bytes());
                out.push(u8::try_from(bytes.len()).expect("at most 255 bytes"));
                out.extend(bytes);
            }
            Op::Publish { count } => out.extend([2, *count]),
            Op::NextRequest => out.push(3),
            Op::TakeRequests { budget } => out.extend([4, *budget]),
            Op::PushResponse { fill } => out.extend([5, *fill]),
            Op::PushAndNotify => out.push(6),
            Op::FinalCheck => out.push(7),
            Op::Unconsumed => out.push(8),
            Op::Resume => out.push(9),
        }
    }
}

/// The setup and ops of one input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scenario {
    /// 8-byte entries (a 256- or 512-entry ring) instead of blkif's 112 bytes.
    pub small_entries: bool,
    /// Two pages instead of one.
    pub two_pages: bool,
    /// Where both ends start (`BACK_RING_ATTACH`), to reach the `u32` wrap.
    pub start: u32,
    /// The steps.
    pub ops: Vec<Op>,
}

impl Scenario {
    /// Decodes an input.
    pub fn decode(data: &[u8]) -> Scenario {
        let mut input = Input::new(data);
        let setup = input.u8();
        let start = input.u32();
        let mut ops = Vec::new();
        while !input.is_empty() {
            ops.push(Op::decode(&mut input));
        }
        Scenario { small_entries: setup & 1 != 0, two_pages: setup & 2 != 0, start, ops }
    }

    /// Encodes it as an input.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![u8::from(self.small_entries) | u8::from(self.two_pages) << 1];
        out.extend(self.start.to_le_bytes());
        for op in &self.ops {
            op.encode(&mut out);
        }
        out
    }
}

thread_local! {
    /// Reused across runs (an mmap per input would dominate the time).
    static PAGES: [GrantMapping; 2] = [
        GrantMapping::anonymous(4096).expect("anonymous mapping"),
        GrantMapping::anonymous(2 * 4096).expect("anonymous mapping"),
    ];
}

/// The harness.
pub fn run(data: &[u8]) {
    let sc = Scenario::decode(data);
    PAGES.with(|pages| {
        let mem = &pages[usize::from(sc.two_pages)];
        if sc.small_entries {
            drive::<u64, u32>(mem, &sc);
        } else {
            drive::<[u8; 112], [u8; 16]>(mem, &sc);
        }
    });
}

/// What the frontend did, to judge the backend by.
struct Model {
    size: u32,
    /// Every value the frontend ever stored into `req_prod`.
    published: Vec<u32>,
    broken: bool,
}

impl Model {
    /// Whether request `idx` was published at some point: some `req_prod`
    /// the frontend stored was at most a ring ahead of it.
    fn was_published(&self, idx: u32) -> bool {
        self.published.iter().any(|&p| (1..=self.size).contains(&p.wrapping_sub(idx)))
    }
}

fn load(mem: &GrantMapping, off: usize) -> u32 {
    mem.load_u32(off, Ordering::Relaxed).expect("index in the header")
}

fn drive<Req: RingEntry, Rsp: RingEntry>(mem: &GrantMapping, sc: &Scenario) {
    mem.fill(0, mem.len(), 0).expect("writable");
    for (off, v) in [(REQ_PROD, 0), (REQ_EVENT, 1), (RSP_PROD, 0), (RSP_EVENT, 1)] {
        mem.store_u32(off, sc.start.wrapping_add(v), Ordering::Relaxed).expect("header");
    }
    let mut back = BackRing::<Req, Rsp, &GrantMapping>::attach(mem, sc.start).expect("ring fits");
    let size = back.size();
    let entry = xen_ring::entry_size::<Req, Rsp>();
    let slot = |idx: u32| RING_OFFSET + (idx & (size - 1)) as usize * entry;
    let area = size as usize * entry;
    let mut model = Model { size, published: vec![sc.start], broken: false };

    for op in &sc.ops {
        let cons = back.req_cons();
        let pvt = back.rsp_prod_pvt();
        // `None` for the frontend's own actions, the backend's result otherwise.
        let result: Option<Result<(), RingError>> = match op {
            Op::SetIndex { which, value } => {
                let off = [REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT][usize::from(which % 4)];
                mem.store_u32(off, *value, Ordering::Release).expect("header");
                if off == REQ_PROD {
                    model.published.push(*value);
                }
                None
            }
            Op::WriteSlots { offset, bytes } => {
                let at = usize::from(*offset) % area;
                let n = bytes.len().min(area - at);
                mem.write(RING_OFFSET + at, &bytes[..n]).expect("inside the ring");
                None
            }
            Op::Publish { count } => {
                let p = load(mem, REQ_PROD).wrapping_add(u32::from(*count));
                mem.store_u32(REQ_PROD, p, Ordering::Release).expect("header");
                model.published.push(p);
                None
            }
            Op::NextRequest => {
                let mut expected = vec![0u8; size_of::<Req>()];
                mem.read(slot(cons), &mut expected).expect("slot");
                Some(back.next_request().map(|r| match r {
                    Some(r) => {
                        assert_eq!(r.as_bytes(), &expected[..], "request differs from its slot");
                        assert_eq!(back.req_cons(), cons.wrapping_add(1));
                        assert!(model.was_published(cons), "request {cons} was never published");
                    }
                    None => assert_eq!(back.req_cons(), cons),
                }))
            }
            Op::TakeRequests { budget } => {
                let mut out = Vec::new();
                Some(back.take_requests(usize::from(*budget), &mut out).map(|n| {
                    assert!(n <= usize::from(*budget) && n == out.len());
                    assert_eq!(back.req_cons(), cons.wrapping_add(n as u32));
                    if n > 0 {
                        assert!(model.was_published(back.req_cons().wrapping_sub(1)));
                    }
                }))
            }
            Op::PushResponse { fill } => {
                let rsp = Rsp::read_from_bytes(&vec![*fill; size_of::<Rsp>()]).expect("sized");
                let free = back.free_response_slots();
                Some(match back.push_response(&rsp) {
                    Err(RingError::NoRequestPending) => {
                        assert_eq!(free, 0);
                        Ok(())
                    }
                    r => r.map(|()| {
                        assert!(free > 0, "response pushed with no request taken");
                        let mut got = vec![0u8; size_of::<Rsp>()];
                        mem.read(slot(pvt), &mut got).expect("slot");
                        assert_eq!(got, rsp.as_bytes());
                    }),
                })
            }
            Op::PushAndNotify => Some(back.push_responses_and_check_notify().map(|_| {
                assert_eq!(load(mem, RSP_PROD), back.rsp_prod_pvt());
            })),
            Op::FinalCheck => Some(back.final_check_for_requests().map(|more| {
                let prod = load(mem, REQ_PROD);
                if more {
                    assert_ne!(prod, cons);
                } else {
                    assert_eq!(prod, cons);
                    assert_eq!(load(mem, REQ_EVENT), cons.wrapping_add(1));
                }
            })),
            Op::Unconsumed => Some(back.unconsumed_requests().map(|n| {
                assert_eq!(n, load(mem, REQ_PROD).wrapping_sub(cons));
                assert!(n <= size);
            })),
            Op::Resume => {
                let (req_prod, rsp_prod) = (load(mem, REQ_PROD), load(mem, RSP_PROD));
                match BackRing::<Req, Rsp, &GrantMapping>::resume(mem, None) {
                    Ok(resumed) => {
                        assert_eq!(req_prod, rsp_prod, "resumed with requests pending");
                        assert_eq!((resumed.req_cons(), resumed.rsp_prod_pvt()), (rsp_prod, rsp_prod));
                        assert!(!resumed.is_broken());
                        back = resumed;
                        model.broken = false;
                    }
                    Err(RingError::NotResumable { rsp_prod: r, pending }) => {
                        assert_eq!((r, pending), (rsp_prod, req_prod.wrapping_sub(rsp_prod)));
                        assert_ne!(pending, 0, "refused with nothing pending");
                    }
                    Err(e) => panic!("resume: unexpected error {e}"),
                }
                None
            }
        };
        match result {
            None => {}
            Some(Ok(())) => assert!(!model.broken, "{op:?} succeeded on a broken ring"),
            Some(Err(RingError::Broken)) => assert!(model.broken, "Broken reported before any error"),
            Some(Err(RingError::Overflow { .. } | RingError::Backwards { .. })) => {
                assert!(!model.broken);
                model.broken = true;
            }
            Some(Err(e)) => panic!("{op:?}: unexpected error {e}"),
        }
        assert_eq!(back.is_broken(), model.broken);
        // Never more requests taken and unanswered than the ring holds.
        assert!(back.req_cons().wrapping_sub(back.rsp_prod_pvt()) <= size);
        assert_eq!(back.free_response_slots(), back.req_cons().wrapping_sub(back.rsp_prod_pvt()));
    }
}

fn scenario(small_entries: bool, two_pages: bool, start: u32, ops: Vec<Op>) -> Vec<u8> {
    Scenario { small_entries, two_pages, start, ops }.encode()
}

/// Seeds: a well-behaved exchange, one across the `u32` wrap, a runaway and a
/// backwards `req_prod`, slots rewritten under the backend, a response
/// overflow attempt, and restarts with and without requests pending.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use Op::*;
    let exchange = |n: u8| {
        let mut ops = vec![Publish { count: n }, TakeRequests { budget: 8 }, TakeRequests { budget: 255 }];
        ops.extend((0..n).map(|i| PushResponse { fill: i }));
        ops.extend([PushAndNotify, FinalCheck, Unconsumed]);
        ops
    };
    let mut wrap = exchange(20);
    wrap.extend(exchange(32));
    wrap.extend(exchange(7));
    vec![
        ("exchange", scenario(false, false, 0, exchange(5))),
        ("exchange-small-entries", scenario(true, true, 0, exchange(200))),
        ("wraparound", scenario(false, false, u32::MAX - 10, wrap)),
        (
            "runaway-req-prod",
            scenario(false, false, 0, vec![SetIndex { which: 0, value: 1000 }, NextRequest, FinalCheck]),
        ),
        (
            "backwards-req-prod",
            scenario(
                false,
                true,
                5,
                vec![Publish { count: 10 }, NextRequest, SetIndex { which: 0, value: 8 }, TakeRequests { budget: 20 }],
            ),
        ),
        (
            "slots-rewritten",
            scenario(
                false,
                false,
                0,
                vec![
                    Publish { count: 3 },
                    WriteSlots { offset: 0, bytes: vec![0xee; 200] },
                    NextRequest,
                    WriteSlots { offset: 112, bytes: vec![0x11; 112] },
                    NextRequest,
                    SetIndex { which: 3, value: 0 },
                    PushResponse { fill: 1 },
                    PushAndNotify,
                ],
            ),
        ),
        (
            "response-overflow",
            scenario(
                false,
                false,
                0,
                vec![
                    PushResponse { fill: 1 },
                    Publish { count: 1 },
                    NextRequest,
                    PushResponse { fill: 2 },
                    PushResponse { fill: 3 },
                ],
            ),
        ),
        (
            "restarts",
            scenario(
                false,
                false,
                u32::MAX - 2,
                vec![
                    Publish { count: 4 },
                    TakeRequests { budget: 2 },
                    Resume,
                    PushResponse { fill: 1 },
                    PushResponse { fill: 2 },
                    PushAndNotify,
                    Resume,
                    TakeRequests { budget: 9 },
                    PushResponse { fill: 3 },
                    PushResponse { fill: 4 },
                    PushAndNotify,
                    Resume,
                    Publish { count: 1 },
                    NextRequest,
                    SetIndex { which: 2, value: 0 },
                    Resume,
                    Unconsumed,
                ],
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_round_trip_through_bytes() {
        for (_, bytes) in seeds() {
            assert_eq!(Scenario::decode(&bytes).encode(), bytes);
        }
    }

    #[test]
    fn runaway_seed_breaks_the_ring() {
        let sc = Scenario::decode(&seeds()[3].1);
        let mem = GrantMapping::anonymous(4096).unwrap();
        mem.store_u32(REQ_PROD, 1000, Ordering::Relaxed).unwrap();
        let mut back = BackRing::<[u8; 112], [u8; 16], _>::new(mem).unwrap();
        assert!(back.next_request().is_err());
        assert_eq!(sc.ops[0], Op::SetIndex { which: 0, value: 1000 });
    }

    #[test]
    fn harness_accepts_empty_and_garbage_inputs() {
        run(&[]);
        run(&[0xff; 300]);
        run(&[1, 0xff, 0xff, 0xff, 0xff, 2, 255, 4, 255, 3, 3]);
    }
}
