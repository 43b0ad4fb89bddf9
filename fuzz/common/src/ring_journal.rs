//! Target `ring_journal`: a journaled back end (`BackRing::new_journaled`)
//! killed at any point between its calls and resumed from the ring and its
//! journal (`BackRing::resume`), against a frontend that writes arbitrary
//! indices and slot contents. The backend must never panic or access
//! outside the ring or the journal; a resume either succeeds or refuses the
//! ring with `JournalMismatch` (a scribbled `rsp_prod`); after a resume the
//! first requests handed out are exactly the ones taken and not answered in
//! a published slot (as bytes, whatever the guest wrote into the ring
//! since), and a ticket that is not outstanding is refused.
//!
//! Input: a setup byte (bit 0: two pages), then [`Op`]s until the end.

use std::fs::File;
use std::sync::atomic::Ordering;

use gnttab::GrantMapping;
use xen_ring::abi::{REQ_EVENT, REQ_PROD, RING_OFFSET, RSP_EVENT, RSP_PROD};
use xen_ring::{BackRing, JournalFile, RingError, Ticket};

use crate::input::Input;

type Req = [u8; 112];
type Rsp = [u8; 16];

/// One step: a frontend action or a backend call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// The frontend stores `value` into index word `which % 4`.
    SetIndex {
        /// Which index (`req_prod`, `req_event`, `rsp_prod`, `rsp_event`).
        which: u8,
        /// Its new value.
        value: u32,
    },
    /// The frontend writes `bytes` into the ring area at `offset`.
    WriteSlots {
        /// Offset past the header (modulo the area).
        offset: u16,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// The frontend advances `req_prod` by `count`.
    Publish {
        /// How many.
        count: u8,
    },
    /// `take_request`, up to `count` times.
    Take {
        /// How many.
        count: u8,
    },
    /// `answer` the outstanding request `pick` (modulo their number), or
    /// with a ticket that is not outstanding when there is none.
    Answer {
        /// Which.
        pick: u8,
    },
    /// `push_responses_and_check_notify`.
    Publication,
    /// The process dies here; a new one resumes.
    Crash,
    /// `final_check_for_requests`.
    FinalCheck,
}

const OPS: u8 = 8;

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
            3 => Op::Take { count: input.u8() },
            4 => Op::Answer { pick: input.u8() },
            5 => Op::Publication,
            6 => Op::Crash,
            _ => Op::FinalCheck,
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
            Op::Take { count } => out.extend([3, *count]),
            Op::Answer { pick } => out.extend([4, *pick]),
            Op::Publication => out.push(5),
            Op::Crash => out.push(6),
            Op::FinalCheck => out.push(7),
        }
    }
}

/// The setup and ops of one input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scenario {
    /// Two pages instead of one.
    pub two_pages: bool,
    /// The steps.
    pub ops: Vec<Op>,
}

impl Scenario {
    /// Decodes an input.
    pub fn decode(data: &[u8]) -> Scenario {
        let mut input = Input::new(data);
        let two_pages = input.u8() & 1 != 0;
        let mut ops = Vec::new();
        while !input.is_empty() {
            ops.push(Op::decode(&mut input));
        }
        Scenario { two_pages, ops }
    }

    /// Encodes it as an input.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![u8::from(self.two_pages)];
        for op in &self.ops {
            op.encode(&mut out);
        }
        out
    }
}

thread_local! {
    /// Reused across runs: the ring pages and the journal's file (a memfd).
    static STATE: ([GrantMapping; 2], File) = (
        [GrantMapping::anonymous(4096).expect("mapping"), GrantMapping::anonymous(2 * 4096).expect("mapping")],
        unlinked_file(),
    );
}

/// A file of this thread's, already unlinked (it lives as long as its fd).
fn unlinked_file() -> File {
    let dir = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
    let path = dir.join(format!("ring_journal-{}-{:?}", std::process::id(), std::thread::current().id()));
    let f = File::options().read(true).write(true).create(true).truncate(true).open(&path).expect("journal file");
    let _ = std::fs::remove_file(&path);
    f
}

const IDENTITY: u64 = 0x6a6f_7572_6e61_6c21;

fn journal(f: &File) -> JournalFile {
    JournalFile::new(f.try_clone().expect("dup"), IDENTITY)
}

/// The harness.
pub fn run(data: &[u8]) {
    let sc = Scenario::decode(data);
    STATE.with(|(pages, file)| drive(&pages[usize::from(sc.two_pages)], file, &sc));
}

fn drive(mem: &GrantMapping, file: &File, sc: &Scenario) {
    mem.fill(0, mem.len(), 0).expect("writable");
    for (off, v) in [(REQ_PROD, 0), (REQ_EVENT, 1), (RSP_PROD, 0), (RSP_EVENT, 1)] {
        mem.store_u32(off, v, Ordering::Relaxed).expect("header");
    }
    let mut back = BackRing::<Req, Rsp, &GrantMapping>::new_journaled(mem, journal(file)).expect("ring fits");
    let size = back.size() as usize;
    let area = size * 112;
    // Taken, not answered; answered, not published (both as bytes).
    let mut outstanding: Vec<(Ticket, Req)> = Vec::new();
    let mut answered: Vec<Req> = Vec::new();
    // After a resume: the requests the journal must hand out first.
    let mut replay: Vec<Req> = Vec::new();
    let mut broken = false;
    // A ticket already answered (refused if given again).
    let mut stale: Option<Ticket> = None;
    for op in &sc.ops {
        let result: Result<(), RingError> = match op {
            Op::SetIndex { which, value } => {
                let off = [REQ_PROD, REQ_EVENT, RSP_PROD, RSP_EVENT][usize::from(which % 4)];
                mem.store_u32(off, *value, Ordering::Release).expect("header");
                Ok(())
            }
            Op::WriteSlots { offset, bytes } => {
                let at = usize::from(*offset) % area;
                let n = bytes.len().min(area - at);
                mem.write(RING_OFFSET + at, &bytes[..n]).expect("inside the ring");
                Ok(())
            }
            Op::Publish { count } => {
                let p = mem.load_u32(REQ_PROD, Ordering::Relaxed).expect("header").wrapping_add(u32::from(*count));
                mem.store_u32(REQ_PROD, p, Ordering::Release).expect("header");
                Ok(())
            }
            Op::Take { count } => (0..*count).try_for_each(|_| match back.take_request()? {
                Some((t, req)) => {
                    if !replay.is_empty() {
                        let i = replay.iter().position(|r| *r == req).expect("a replayed request is one outstanding");
                        replay.swap_remove(i);
                    }
                    assert!(outstanding.iter().all(|(o, _)| *o != t), "a ticket handed out twice");
                    outstanding.push((t, req));
                    Ok(())
                }
                None => {
                    assert!(replay.is_empty(), "{} outstanding requests not replayed", replay.len());
                    Ok(())
                }
            }),
            Op::Answer { pick } => {
                if outstanding.is_empty() {
                    // A ticket already answered: refused.
                    match stale.map(|t| back.answer(t, &[*pick; 16])) {
                        None | Some(Err(RingError::NoRequestPending | RingError::Broken)) => Ok(()),
                        Some(Ok(())) => panic!("a ticket answered twice was taken"),
                        Some(Err(e)) => Err(e),
                    }
                } else {
                    let (t, req) = outstanding.swap_remove(usize::from(*pick) % outstanding.len());
                    let r = back.answer(t, &[*pick; 16]);
                    if r.is_ok() {
                        answered.push(req);
                        stale = Some(t);
                    } else {
                        // Not answered (a broken ring): still outstanding.
                        outstanding.push((t, req));
                    }
                    r
                }
            }
            Op::Publication => back.push_responses_and_check_notify().map(|_| answered.clear()),
            Op::Crash => {
                let m = back.into_mapping();
                match BackRing::<Req, Rsp, &GrantMapping>::resume(m, Some(journal(file))) {
                    Ok(b) => {
                        back = b;
                        replay = outstanding.drain(..).map(|(_, r)| r).chain(answered.drain(..)).collect();
                        broken = false;
                        stale = None;
                        Ok(())
                    }
                    // The guest moved rsp_prod: the device fails, nothing more to check.
                    Err(RingError::JournalMismatch(_)) => return,
                    Err(e) => panic!("resume: {e}"),
                }
            }
            Op::FinalCheck => back.final_check_for_requests().map(|_| ()),
        };
        match result {
            Ok(()) => {}
            Err(RingError::Broken) => assert!(broken, "{op:?}: Broken before any error"),
            Err(RingError::Overflow { .. } | RingError::Backwards { .. }) => broken = true,
            Err(RingError::NoRequestPending) if broken => {}
            Err(e) => panic!("{op:?}: unexpected error {e}"),
        }
        assert!(outstanding.len() + answered.len() + replay.len() <= size, "more outstanding than the ring holds");
    }
}

fn scenario(two_pages: bool, ops: Vec<Op>) -> Vec<u8> {
    Scenario { two_pages, ops }.encode()
}

/// Seeds: exchanges with crashes before and after publication, out-of-order
/// answers, a guest that rewrites slots after a crash, a scribbled rsp_prod.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use Op::*;
    vec![
        (
            "crash-before-publication",
            scenario(
                false,
                vec![
                    Publish { count: 6 },
                    Take { count: 6 },
                    Answer { pick: 3 },
                    Answer { pick: 0 },
                    Crash,
                    Take { count: 8 },
                ],
            ),
        ),
        (
            "crash-after-publication",
            scenario(
                true,
                vec![
                    Publish { count: 40 },
                    Take { count: 30 },
                    Answer { pick: 7 },
                    Answer { pick: 1 },
                    Publication,
                    Crash,
                    Take { count: 40 },
                    Answer { pick: 2 },
                    Crash,
                    Take { count: 40 },
                ],
            ),
        ),
        (
            "slots-rewritten-after-crash",
            scenario(
                false,
                vec![
                    Publish { count: 4 },
                    Take { count: 4 },
                    Answer { pick: 0 },
                    Crash,
                    WriteSlots { offset: 0, bytes: vec![0xee; 255] },
                    Take { count: 4 },
                    FinalCheck,
                ],
            ),
        ),
        (
            "scribbled-rsp-prod",
            scenario(false, vec![Publish { count: 2 }, Take { count: 2 }, SetIndex { which: 2, value: 9 }, Crash]),
        ),
        (
            "bogus-answer",
            scenario(
                false,
                vec![
                    Answer { pick: 3 },
                    Publish { count: 1 },
                    Take { count: 1 },
                    Answer { pick: 0 },
                    Answer { pick: 0 },
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
    fn harness_accepts_empty_and_garbage_inputs() {
        run(&[]);
        run(&[0xff; 300]);
        run(&[1, 2, 200, 3, 200, 6, 3, 200, 4, 1, 5, 6]);
    }
}
