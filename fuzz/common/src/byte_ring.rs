//! Target `byte_ring`: both ends of the console's byte rings (`io/console.h`)
//! as a console backend holds them (a [`ByteReader`] of `out`, a
//! [`ByteWriter`] of `in`), against a guest that writes arbitrary indices
//! and bytes anywhere in the page between the backend's calls. The backend
//! must never panic, never read more than the guest published or write more
//! than there is room for, touch only its own array and index, return the
//! bytes the array held, and once it reports an end broken, keep it broken.
//!
//! Input: the starting indices (`u32` each for `in` and `out`), then [`Op`]s
//! until the end.

use std::sync::atomic::Ordering;

use gnttab::GrantMapping;
use xen_ring::abi::{XENCONS_IN, XENCONS_OUT};
use xen_ring::{ByteReader, ByteRingLayout, ByteWriter, RingError};

use crate::input::Input;

/// The console page's size in the harness: one page.
const PAGE: usize = 4096;

/// One step: a guest action or a backend call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// The guest stores `value` into index `which % 4` (`in_cons`,
    /// `in_prod`, `out_cons`, `out_prod`).
    SetIndex {
        /// Which index.
        which: u8,
        /// Its new value.
        value: u32,
    },
    /// The guest writes `bytes` into `out` at its `out_prod` and advances
    /// it, as hvc_xen does (without checking for room).
    GuestWrite {
        /// The bytes (at most 255).
        bytes: Vec<u8>,
    },
    /// The guest consumes up to `count` bytes of `in`.
    GuestRead {
        /// How many.
        count: u8,
    },
    /// The guest writes `bytes` anywhere in the page (`offset` modulo its size).
    Scribble {
        /// Where.
        offset: u16,
        /// The bytes (at most 255).
        bytes: Vec<u8>,
    },
    /// The backend reads up to `len` bytes of `out`.
    Read {
        /// The buffer's length.
        len: u8,
    },
    /// The backend writes `bytes` to `in`.
    Write {
        /// The bytes (at most 255).
        bytes: Vec<u8>,
    },
    /// The backend asks how much `out` holds.
    Available,
    /// The backend asks how much room `in` has.
    Space,
}

const OPS: u8 = 8;

impl Op {
    /// Decodes one op (every byte string decodes to some op).
    pub fn decode(input: &mut Input<'_>) -> Op {
        let bytes = |input: &mut Input<'_>| {
            let len = usize::from(input.u8());
            input.bytes(len).to_vec()
        };
        match input.u8() % OPS {
            0 => Op::SetIndex { which: input.u8(), value: input.u32() },
            1 => Op::GuestWrite { bytes: bytes(input) },
            2 => Op::GuestRead { count: input.u8() },
            3 => Op::Scribble { offset: input.u16(), bytes: bytes(input) },
            4 => Op::Read { len: input.u8() },
            5 => Op::Write { bytes: bytes(input) },
            6 => Op::Available,
            _ => Op::Space,
        }
    }

    /// Appends its encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let bytes = |out: &mut Vec<u8>, b: &[u8]| {
            out.push(u8::try_from(b.len()).expect("at most 255 bytes"));
            out.extend(b);
        };
        match self {
            Op::SetIndex { which, value } => {
                out.extend([0, *which]);
                out.extend(value.to_le_bytes());
            }
            Op::GuestWrite { bytes: b } => {
                out.push(1);
                bytes(out, b);
            }
            Op::GuestRead { count } => out.extend([2, *count]),
            Op::Scribble { offset, bytes: b } => {
                out.push(3);
                out.extend(offset.to_le_bytes());
                bytes(out, b);
            }
            Op::Read { len } => out.extend([4, *len]),
            Op::Write { bytes: b } => {
                out.push(5);
                bytes(out, b);
            }
            Op::Available => out.push(6),
            Op::Space => out.push(7),
        }
    }
}

/// A decoded input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scenario {
    /// The indices of `in` (both) at attach time.
    pub start_in: u32,
    /// The indices of `out` (both) at attach time.
    pub start_out: u32,
    /// The steps.
    pub ops: Vec<Op>,
}

impl Scenario {
    /// Decodes an input (every byte string decodes).
    pub fn decode(data: &[u8]) -> Scenario {
        let mut input = Input::new(data);
        let start_in = input.u32();
        let start_out = input.u32();
        let mut ops = Vec::new();
        while !input.is_empty() {
            ops.push(Op::decode(&mut input));
        }
        Scenario { start_in, start_out, ops }
    }

    /// Encodes it as an input.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(self.start_in.to_le_bytes());
        out.extend(self.start_out.to_le_bytes());
        for op in &self.ops {
            op.encode(&mut out);
        }
        out
    }
}

thread_local! {
    static CONSOLE: GrantMapping = GrantMapping::anonymous(PAGE).expect("anonymous mapping");
}

fn load(mem: &GrantMapping, off: usize) -> u32 {
    mem.load_u32(off, Ordering::Relaxed).expect("index in the page")
}

fn snapshot(mem: &GrantMapping) -> Vec<u8> {
    let mut page = vec![0u8; PAGE];
    mem.read(0, &mut page).expect("page");
    page
}

/// The array bytes of `layout` from index `idx`, `n` of them.
fn array(page: &[u8], layout: ByteRingLayout, idx: u32, n: usize) -> Vec<u8> {
    (0..n).map(|i| page[layout.data + (idx.wrapping_add(i as u32) & (layout.size - 1)) as usize]).collect()
}

/// Asserts that `before` and `after` differ only inside the `allowed`
/// ranges (sorted, not overlapping).
fn only_changed(before: &[u8], after: &[u8], allowed: &[(usize, usize)], what: &str) {
    let mut at = 0;
    for &(start, len) in allowed.iter().chain(&[(before.len(), 0)]) {
        assert!(before[at..start] == after[at..start], "{what} changed bytes in {at}..{start}");
        at = start + len;
    }
}

/// Whether an end is broken, from the errors it reported.
#[derive(Default)]
struct Model {
    reader_broken: bool,
    writer_broken: bool,
}

/// Checks a call's outcome against the model of its end.
fn outcome(op: &Op, result: Result<(), RingError>, broken: &mut bool) {
    match result {
        Ok(()) => assert!(!*broken, "{op:?} succeeded on a broken ring"),
        Err(RingError::Broken) => assert!(*broken, "Broken reported before any error"),
        Err(RingError::Overflow { .. } | RingError::ConsumerOverflow { .. }) => {
            assert!(!*broken);
            *broken = true;
        }
        Err(e) => panic!("{op:?}: unexpected error {e}"),
    }
}

/// The harness.
pub fn run(data: &[u8]) {
    let sc = Scenario::decode(data);
    CONSOLE.with(|mem| drive(mem, &sc));
}

fn drive(mem: &GrantMapping, sc: &Scenario) {
    mem.fill(0, PAGE, 0).expect("writable");
    for (off, v) in [
        (XENCONS_IN.cons, sc.start_in),
        (XENCONS_IN.prod, sc.start_in),
        (XENCONS_OUT.cons, sc.start_out),
        (XENCONS_OUT.prod, sc.start_out),
    ] {
        mem.store_u32(off, v, Ordering::Relaxed).expect("index");
    }
    let mut reader = ByteReader::new(mem, XENCONS_OUT).expect("layout fits");
    let mut writer = ByteWriter::new(mem, XENCONS_IN).expect("layout fits");
    let mut model = Model::default();
    let idx =
        |which: u8| [XENCONS_IN.cons, XENCONS_IN.prod, XENCONS_OUT.cons, XENCONS_OUT.prod][usize::from(which % 4)];

    for op in &sc.ops {
        let (cons, prod) = (reader.cons(), writer.prod());
        // The page before a backend call (guest actions need none).
        let before = || snapshot(mem);
        match op {
            Op::SetIndex { which, value } => mem.store_u32(idx(*which), *value, Ordering::Release).expect("index"),
            Op::GuestWrite { bytes } => {
                let p = load(mem, XENCONS_OUT.prod);
                for (i, b) in bytes.iter().enumerate() {
                    let at = XENCONS_OUT.data + (p.wrapping_add(i as u32) & (XENCONS_OUT.size - 1)) as usize;
                    mem.write(at, &[*b]).expect("array");
                }
                mem.store_u32(XENCONS_OUT.prod, p.wrapping_add(bytes.len() as u32), Ordering::Release).expect("index");
            }
            Op::GuestRead { count } => {
                let (c, p) = (load(mem, XENCONS_IN.cons), load(mem, XENCONS_IN.prod));
                let n = p.wrapping_sub(c).min(u32::from(*count));
                mem.store_u32(XENCONS_IN.cons, c.wrapping_add(n), Ordering::Release).expect("index");
            }
            Op::Scribble { offset, bytes } => {
                let at = usize::from(*offset) % PAGE;
                let n = bytes.len().min(PAGE - at);
                mem.write(at, &bytes[..n]).expect("page");
            }
            Op::Read { len } => {
                let before = before();
                let published = load(mem, XENCONS_OUT.prod).wrapping_sub(cons);
                let mut out = vec![0u8; usize::from(*len)];
                let result = reader.read(&mut out).map(|n| {
                    assert!(n <= out.len() && n as u32 <= published, "read {n} of {published} published");
                    assert_eq!(out[..n], array(&before, XENCONS_OUT, cons, n), "bytes differ from the array");
                    assert_eq!(reader.cons(), cons.wrapping_add(n as u32));
                    assert_eq!(load(mem, XENCONS_OUT.cons), reader.cons(), "consumer index not published");
                });
                if result.is_err() {
                    assert_eq!(reader.cons(), cons);
                }
                only_changed(&before, &snapshot(mem), &[(XENCONS_OUT.cons, 4)], "read");
                outcome(op, result, &mut model.reader_broken);
            }
            Op::Write { bytes } => {
                let before = before();
                let room = XENCONS_IN.size.wrapping_sub(prod.wrapping_sub(load(mem, XENCONS_IN.cons)));
                let result = writer.write(bytes).map(|n| {
                    assert!(n <= bytes.len() && n as u32 <= room, "wrote {n} with room for {room}");
                    assert_eq!(array(&snapshot(mem), XENCONS_IN, prod, n), bytes[..n], "bytes not in the array");
                    assert_eq!(writer.prod(), prod.wrapping_add(n as u32));
                    assert_eq!(load(mem, XENCONS_IN.prod), writer.prod(), "producer index not published");
                });
                if result.is_err() {
                    assert_eq!(writer.prod(), prod);
                }
                let array_range = (XENCONS_IN.data, XENCONS_IN.size as usize);
                only_changed(&before, &snapshot(mem), &[array_range, (XENCONS_IN.prod, 4)], "write");
                outcome(op, result, &mut model.writer_broken);
            }
            Op::Available => {
                let before = before();
                let result = reader.available().map(|n| {
                    assert_eq!(n, load(mem, XENCONS_OUT.prod).wrapping_sub(cons));
                    assert!(n <= XENCONS_OUT.size);
                });
                only_changed(&before, &snapshot(mem), &[], "available");
                outcome(op, result, &mut model.reader_broken);
            }
            Op::Space => {
                let before = before();
                let result = writer.space().map(|n| {
                    assert_eq!(n, XENCONS_IN.size - prod.wrapping_sub(load(mem, XENCONS_IN.cons)));
                });
                only_changed(&before, &snapshot(mem), &[], "space");
                outcome(op, result, &mut model.writer_broken);
            }
        }
        assert_eq!(reader.is_broken(), model.reader_broken);
        assert_eq!(writer.is_broken(), model.writer_broken);
    }
}

/// Seed inputs.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let text = |s: &str| s.as_bytes().to_vec();
    let sc = |start_in, start_out, ops| Scenario { start_in, start_out, ops }.encode();
    vec![
        (
            "exchange",
            sc(
                0,
                0,
                vec![
                    Op::GuestWrite { bytes: text("login: ") },
                    Op::Available,
                    Op::Read { len: 64 },
                    Op::Write { bytes: text("root\n") },
                    Op::GuestRead { count: 5 },
                    Op::Space,
                ],
            ),
        ),
        (
            "wraparound",
            sc(
                u32::MAX - 100,
                2000,
                vec![
                    Op::GuestWrite { bytes: vec![b'a'; 200] },
                    Op::Read { len: 150 },
                    Op::Read { len: 255 },
                    Op::Write { bytes: vec![b'b'; 255] },
                    Op::GuestRead { count: 255 },
                    Op::Write { bytes: vec![b'c'; 255] },
                ],
            ),
        ),
        (
            "runaway-out-prod",
            sc(0, 0, vec![Op::SetIndex { which: 3, value: 4000 }, Op::Read { len: 16 }, Op::Read { len: 16 }]),
        ),
        (
            "in-cons-ahead",
            sc(7, 7, vec![Op::SetIndex { which: 0, value: 50 }, Op::Write { bytes: text("x") }, Op::Space]),
        ),
        (
            "own-index-scribbled",
            sc(
                0,
                0,
                vec![
                    Op::GuestWrite { bytes: text("hello") },
                    Op::SetIndex { which: 2, value: 3 },
                    Op::Scribble { offset: 3076, bytes: vec![0xff; 4] },
                    Op::Read { len: 8 },
                    Op::Write { bytes: text("ok") },
                ],
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_round_trip_through_their_encoding() {
        for (name, bytes) in seeds() {
            assert_eq!(Scenario::decode(&bytes).encode(), bytes, "{name}");
        }
    }

    #[test]
    fn seeds_run_clean() {
        for (_, bytes) in seeds() {
            run(&bytes);
        }
    }
}
