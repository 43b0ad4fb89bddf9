//! A ring's request journal: what the backend took off the ring and has
//! not answered, kept in a file that outlives the process (on tmpfs, e.g.
//! `/run`), so that a backend started after a crash resumes exactly.
//!
//! A ring slot holds a request until the backend writes a response over it,
//! and responses are written in completion order into the slots from
//! `rsp_prod` on. After a crash (SIGKILL, OOM kill, abort) the slots between
//! the published `rsp_prod` and the old `req_cons` may hold unpublished
//! responses or requests, and nothing in the ring says which, nor which
//! requests the published responses answered. The journal has one record
//! per request outstanding (at most a ring's worth): a copy of the request,
//! the index it was taken at, and the response slot it was answered in, if
//! any; plus the count taken (`req_cons`). Records are freed once their
//! response is published. A new backend re-executes every request whose
//! record is not freed and whose response was not published, answers each
//! once, and goes on with the ring at `req_cons`. See docs/backend.md,
//! "Resume after a crash".
//!
//! The cost on the data path is one copy of the request (112 bytes) and a
//! few stores per request: plain memory writes, no system call. The crash
//! model is the process's: a killed process's stores up to the instruction
//! it was killed at are in the page cache (a host crash also loses the
//! guests, so the file need not reach a disk). Stores are ordered so that a
//! kill between any two of them leaves a journal that resumes exactly.

use std::fs::File;
use std::sync::atomic::{compiler_fence, Ordering};

use gnttab::GrantMapping;

use crate::abi::RingIdx;
use crate::error::RingError;
use crate::shared::RingEntry;

const MAGIC: u32 = u32::from_le_bytes(*b"XBRJ");
const VERSION: u32 = 1;

// Header fields (u32, little-endian), then the slots from HEADER on.
const MAGIC_OFF: usize = 0;
const VERSION_OFF: usize = 4;
const ENTRY_OFF: usize = 8;
const SIZE_OFF: usize = 12;
const IDENTITY_OFF: usize = 16; // u64 as two u32: low, high
const REQ_CONS_OFF: usize = 24;
const RSP_PUBLISHED_OFF: usize = 28;
const RSP_PENDING_OFF: usize = 32;
const VALID_OFF: usize = 36;
const HEADER: usize = 64;

// A record: state, the index the request was taken at, the response slot it
// was answered in (u32 each, one spare), then the request's bytes.
const STATE: usize = 0;
const SEQ: usize = 4;
const ANSWERED_AT: usize = 8;
const RECORD_HEAD: usize = 16;
const FREE: u32 = 0;
const TAKEN: u32 = 1;
const ANSWERED: u32 = 2;

/// Which request a response answers, on a journaled ring: handed out with
/// the request by [`crate::BackRing::take_request`], given back with its
/// response to [`crate::BackRing::answer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ticket(pub(crate) u32);

/// The file of a ring's journal and what it journals (a value the caller
/// derives from the ring's identity: frontend domain, grant references),
/// handed to [`crate::BackRing::new_journaled`] or
/// [`crate::BackRing::resume`], which size, fill and check it.
#[derive(Debug)]
pub struct JournalFile {
    file: File,
    identity: u64,
}

impl JournalFile {
    /// A journal in `file` (opened read-write) for the ring `identity`.
    pub fn new(file: File, identity: u64) -> Self {
        JournalFile { file, identity }
    }
}

/// An open journal, mapped, with the in-memory lists of its records.
#[derive(Debug)]
pub(crate) struct Journal {
    mem: GrantMapping,
    size: u32,
    stride: usize,
    /// Records not in use.
    free: Vec<u32>,
    /// Records answered since the last publication.
    answered: Vec<u32>,
}

fn journal_err(what: &'static str) -> RingError {
    RingError::JournalMismatch(what)
}

fn stride(entry: usize) -> usize {
    (RECORD_HEAD + entry).next_multiple_of(8)
}

impl Journal {
    fn len(size: u32, entry: usize) -> usize {
        HEADER + size as usize * stride(entry)
    }

    fn map(f: &JournalFile, size: u32, entry: usize) -> Result<Self, RingError> {
        let mem = GrantMapping::shared_file(&f.file, Self::len(size, entry)).map_err(RingError::Journal)?;
        Ok(Journal { mem, size, stride: stride(entry), free: Vec::with_capacity(size as usize), answered: Vec::new() })
    }

    /// A new journal for a ring of `size` entries of `entry` bytes, taking
    /// from `index` on. Whatever the file held is gone; the header is marked
    /// valid last, so a crash while creating leaves a file that
    /// [`Journal::open`] refuses.
    pub(crate) fn create(f: JournalFile, size: u32, entry: usize, index: RingIdx) -> Result<Self, RingError> {
        f.file.set_len(0).map_err(RingError::Journal)?;
        f.file.set_len(Self::len(size, entry) as u64).map_err(RingError::Journal)?;
        let mut j = Self::map(&f, size, entry)?;
        let id = f.identity;
        for (off, v) in [
            (MAGIC_OFF, MAGIC),
            (VERSION_OFF, VERSION),
            (ENTRY_OFF, entry as u32),
            (SIZE_OFF, size),
            (IDENTITY_OFF, id as u32),
            (IDENTITY_OFF + 4, (id >> 32) as u32),
            (REQ_CONS_OFF, index),
            (RSP_PUBLISHED_OFF, index),
            (RSP_PENDING_OFF, index),
        ] {
            j.store(off, v, Ordering::Relaxed)?;
        }
        // Release: the fields above before the mark.
        j.store(VALID_OFF, 1, Ordering::Release)?;
        j.free = (0..size).rev().collect();
        Ok(j)
    }

    /// The journal a previous process kept for this ring; refused unless it
    /// is complete and for this ring (identity and geometry). Call
    /// [`Journal::recover`] next.
    pub(crate) fn open(f: JournalFile, size: u32, entry: usize) -> Result<Self, RingError> {
        let len = f.file.metadata().map_err(RingError::Journal)?.len();
        if len != Self::len(size, entry) as u64 {
            return Err(journal_err("its size is not this ring's"));
        }
        let j = Self::map(&f, size, entry)?;
        if j.load(VALID_OFF, Ordering::Acquire)? != 1 {
            return Err(journal_err("it was never completed"));
        }
        if j.load(MAGIC_OFF, Ordering::Relaxed)? != MAGIC || j.load(VERSION_OFF, Ordering::Relaxed)? != VERSION {
            return Err(journal_err("it is not a journal of this version"));
        }
        if j.load(ENTRY_OFF, Ordering::Relaxed)? != entry as u32 || j.load(SIZE_OFF, Ordering::Relaxed)? != size {
            return Err(journal_err("its ring geometry differs"));
        }
        let id = u64::from(j.load(IDENTITY_OFF, Ordering::Relaxed)?)
            | u64::from(j.load(IDENTITY_OFF + 4, Ordering::Relaxed)?) << 32;
        if id != f.identity {
            return Err(journal_err("it is another ring's"));
        }
        Ok(j)
    }

    fn load(&self, off: usize, order: Ordering) -> Result<u32, RingError> {
        Ok(self.mem.load_u32(off, order)?)
    }

    fn store(&self, off: usize, v: u32, order: Ordering) -> Result<(), RingError> {
        Ok(self.mem.store_u32(off, v, order)?)
    }

    fn record(&self, t: u32) -> usize {
        HEADER + t as usize * self.stride
    }

    /// After a crash, with the ring's published `rsp_prod`: frees the
    /// records that are done, and returns `req_cons` and the records of the
    /// requests to execute again, in the order they were taken.
    pub(crate) fn recover(&mut self, rsp_prod: RingIdx) -> Result<(RingIdx, Vec<Ticket>), RingError> {
        let req_cons = self.load(REQ_CONS_OFF, Ordering::Acquire)?;
        let published = self.load(RSP_PUBLISHED_OFF, Ordering::Acquire)?;
        let pending = self.load(RSP_PENDING_OFF, Ordering::Acquire)?;
        // rsp_prod is what was published or what was being published.
        if rsp_prod.wrapping_sub(published) > pending.wrapping_sub(published) {
            return Err(journal_err("the ring's rsp_prod is not one the backend published"));
        }
        let outstanding = req_cons.wrapping_sub(rsp_prod);
        if outstanding > self.size {
            return Err(journal_err("more requests taken than the ring holds"));
        }
        let mut replay = Vec::new();
        self.free.clear();
        for t in (0..self.size).rev() {
            let rec = self.record(t);
            let state = self.load(rec + STATE, Ordering::Acquire)?;
            let seq = self.load(rec + SEQ, Ordering::Relaxed)?;
            let at = self.load(rec + ANSWERED_AT, Ordering::Relaxed)?;
            let redo = match state {
                FREE => false,
                // Recorded, but killed before req_cons counted it: the
                // ring's slot still holds it and it is taken from there.
                TAKEN => seq.wrapping_sub(req_cons) >= self.size,
                // Answered in a slot not published: the guest never saw it.
                ANSWERED => at.wrapping_sub(rsp_prod) < self.size,
                _ => return Err(journal_err("a record has an unknown state")),
            };
            if redo {
                self.store(rec + STATE, TAKEN, Ordering::Relaxed)?;
                // Outstanding requests were taken in [req_cons - size, req_cons).
                replay.push((seq.wrapping_sub(req_cons.wrapping_sub(self.size)), Ticket(t)));
            } else {
                self.store(rec + STATE, FREE, Ordering::Relaxed)?;
                self.free.push(t);
            }
        }
        if replay.len() != outstanding as usize {
            return Err(journal_err("its records do not account for the requests outstanding"));
        }
        replay.sort_unstable_by_key(|&(order, _)| order);
        self.store(RSP_PUBLISHED_OFF, rsp_prod, Ordering::Relaxed)?;
        self.store(RSP_PENDING_OFF, rsp_prod, Ordering::Release)?;
        Ok((req_cons, replay.into_iter().map(|(_, t)| t).collect()))
    }

    /// Records request `seq` (the copy the backend parses) and counts it
    /// taken. `None` if every record is in use: the frontend queued more
    /// than the ring holds beyond the responses published.
    pub(crate) fn take(&mut self, seq: RingIdx, req: &[u8]) -> Result<Option<Ticket>, RingError> {
        let Some(t) = self.free.pop() else { return Ok(None) };
        let rec = self.record(t);
        self.mem.write(rec + RECORD_HEAD, req)?;
        self.store(rec + SEQ, seq, Ordering::Relaxed)?;
        // Release: the copy and its index before the state that makes it a
        // record, and that before the count that covers it.
        self.store(rec + STATE, TAKEN, Ordering::Release)?;
        self.store(REQ_CONS_OFF, seq.wrapping_add(1), Ordering::Release)?;
        // No later store (a response over this request's ring slot) may be
        // moved before the count.
        compiler_fence(Ordering::SeqCst);
        Ok(Some(Ticket(t)))
    }

    /// The journaled copy of the request of `t`.
    pub(crate) fn read<T: RingEntry>(&self, t: Ticket) -> Result<T, RingError> {
        let mut v = T::new_zeroed();
        self.mem.read(self.record(t.0) + RECORD_HEAD, v.as_mut_bytes())?;
        Ok(v)
    }

    /// Whether `t` is a record of a request taken and not answered.
    pub(crate) fn is_taken(&self, t: Ticket) -> Result<bool, RingError> {
        Ok(t.0 < self.size && self.load(self.record(t.0) + STATE, Ordering::Relaxed)? == TAKEN)
    }

    /// The request of `t` is answered in response slot `at` (not published).
    pub(crate) fn answer(&mut self, t: Ticket, at: RingIdx) -> Result<(), RingError> {
        let rec = self.record(t.0);
        self.store(rec + ANSWERED_AT, at, Ordering::Relaxed)?;
        // Release: the slot before the state that refers to it. Publication
        // (a release store of rsp_prod) comes after both.
        self.store(rec + STATE, ANSWERED, Ordering::Release)?;
        self.answered.push(t.0);
        Ok(())
    }

    /// Before `rsp_prod` is published as `idx`.
    pub(crate) fn publishing(&self, idx: RingIdx) -> Result<(), RingError> {
        self.store(RSP_PENDING_OFF, idx, Ordering::Relaxed)
    }

    /// After `rsp_prod` was published as `idx` (and a fence): the records
    /// answered are done.
    pub(crate) fn published(&mut self, idx: RingIdx) -> Result<(), RingError> {
        self.store(RSP_PUBLISHED_OFF, idx, Ordering::Relaxed)?;
        let mut answered = std::mem::take(&mut self.answered);
        let freed = answered.iter().try_for_each(|&t| self.store(self.record(t) + STATE, FREE, Ordering::Relaxed));
        self.free.extend_from_slice(&answered);
        answered.clear();
        self.answered = answered;
        freed
    }
}
