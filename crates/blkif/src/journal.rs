//! The per-ring journal: what a [`BackRing`](crate::BackRing) consumed and not yet
//! published an answer for, kept outside guest memory so that a process killed mid-I/O
//! can be replaced by one that re-executes exactly those requests (ARCHITECTURE.md,
//! "Restart, handover and crash recovery").
//!
//! This module owns the journal's layout and its pure logic over a
//! [`SharedMemory`] (the backend maps a file of the daemon's run directory there,
//! `MAP_SHARED` on tmpfs, so a killed process's stores stay). It does no I/O.
//!
//! Layout (native endian; the journal never leaves the host):
//! - header, [`HEADER_LEN`] bytes: magic, format version, protocol, ring size, entry
//!   count, entry size, `req_cons` (the journal's count of requests consumed), then the
//!   journal's length in bytes (0 in files of builds before that word, which read the
//!   same: it sits in what those builds zero and ignore, so the format stays version 1
//!   and these builds and those read each other's journals);
//! - `entries` entries of [`ENTRY_LEN`] bytes: state (free, in flight, answered), the
//!   request's ring index, the response position when answered, and the private copy of
//!   the request's slot as it was read from the ring.
//!
//! Entries are the journal's own, one per request the ring may have consumed and not yet
//! published an answer for (at most the ring size); a request holds its entry from its
//! pop to the publication of its response, however many times the ring wraps meanwhile.
//!
//! Ordering: every store is a volatile store, so the compiler keeps them in program
//! order, and the state words are written with `Release` (a fence before them). A
//! process killed by a signal stops at one instruction: every store before it is in the
//! shared page cache, none after it. That is all recovery needs, on the same host; the
//! journal is never read concurrently with its writer.
//!
//! Across versions ([`FORMAT_VERSION`]): the magic, the version word and `req_cons`
//! (the first [`PREFIX_LEN`] bytes hold them, at the offsets below) keep their place and
//! meaning in every format version. A reader meeting a version it does not know reads
//! only those: when `req_cons` equals the shared `rsp_prod`, the journal owes nothing and
//! the ring alone says everything ([`JournalError::owes_nothing`]).

use std::sync::atomic::Ordering;

use shmem::SharedMemory;

use crate::abi::{Protocol, MAX_REQUEST_SIZE};

/// `"XBJ1"`: a journal of this layout.
const MAGIC: u32 = u32::from_le_bytes(*b"XBJ1");
/// The format version this build writes and reads. It changes with any change a reader
/// of this version would misread; what such a reader may ignore goes into header words
/// it zeroes and keeps the version.
pub const FORMAT_VERSION: u32 = 1;

/// Bytes of the header.
pub const HEADER_LEN: usize = 64;
/// Bytes of one entry: 16 bytes of state, then a slot copy.
pub const ENTRY_LEN: usize = 16 + MAX_REQUEST_SIZE;
/// [`ENTRY_LEN`] as the header stores it.
const ENTRY_LEN_WORD: u32 = 128;
const _: () = assert!(ENTRY_LEN_WORD as usize == ENTRY_LEN);

/// Header offsets (`u32` each).
pub const H_MAGIC: usize = 0;
pub const H_VERSION: usize = 4;
pub const H_PROTOCOL: usize = 8;
pub const H_RING_SIZE: usize = 12;
pub const H_ENTRIES: usize = 16;
pub const H_ENTRY_LEN: usize = 20;
pub const H_REQ_CONS: usize = 24;
pub const H_LEN: usize = 28;
/// Bytes at the start of the header every format version lays out alike: magic,
/// version, `req_cons` (and the words between, whose meaning may change).
pub const PREFIX_LEN: usize = 28;

/// Offsets within an entry.
pub const E_STATE: usize = 0;
pub const E_INDEX: usize = 4;
pub const E_RSP_POS: usize = 8;
pub const E_SLOT: usize = 16;

/// Entry states.
pub const FREE: u32 = 0;
pub const IN_FLIGHT: u32 = 1;
pub const ANSWERED: u32 = 2;

/// Offset of entry `entry`.
pub const fn entry_offset(entry: u32) -> usize {
    HEADER_LEN + entry as usize * ENTRY_LEN
}

/// Bytes a journal for a ring of `ring_size` slots needs.
pub const fn journal_len(ring_size: u32) -> usize {
    HEADER_LEN + ring_size as usize * ENTRY_LEN
}

/// [`journal_len`] as the header stores it (at most 64 + 2048 * 128 bytes: a ring has
/// at most 16 pages of at least 32-byte slots).
fn journal_len_word(ring_size: u32) -> u32 {
    u32::try_from(journal_len(ring_size)).unwrap_or(u32::MAX)
}

fn protocol_code(p: Protocol) -> u32 {
    match p {
        Protocol::Native => 1,
        Protocol::X86_32 => 2,
        Protocol::X86_64 => 3,
    }
}

/// A journal that cannot be used for the ring it was offered for. The ring is refused:
/// resuming without it could answer a request twice or decode a response as a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    /// The mapping is not the length of a journal for this ring.
    #[error("journal is {len} bytes; a ring of {ring_size} slots needs {}", journal_len(*ring_size))]
    Length { len: usize, ring_size: u32 },
    /// Written by a build of another format version (its `req_cons`, which every
    /// version keeps in place, is given).
    #[error("journal of format version {version} (this build reads {FORMAT_VERSION}); its req_cons is {req_cons}")]
    Version { version: u32, req_cons: u32 },
    /// Written by another layout, or for another ring geometry or protocol (or its
    /// length word disagrees with them).
    #[error("journal header does not match this ring (magic {magic:#x}, version {version}, protocol {protocol}, ring size {ring_size}, entries {entries}, entry size {entry_len})")]
    Mismatch {
        magic: u32,
        version: u32,
        protocol: u32,
        ring_size: u32,
        entries: u32,
        entry_len: u32,
    },
    /// An entry's state word is none of the states.
    #[error("journal entry {entry} has unknown state {state}")]
    BadState { entry: u32, state: u32 },
    /// The journal's `req_cons` and the shared indices do not fit together.
    #[error("journal req_cons {req_cons} does not fit the ring (rsp_prod {rsp_prod}, req_prod {req_prod}, size {size})")]
    BadIndices {
        req_cons: u32,
        rsp_prod: u32,
        req_prod: u32,
        size: u32,
    },
    /// The entries still owed a response are not `req_cons - rsp_prod`.
    #[error("journal holds {found} unanswered requests, but req_cons {req_cons} - rsp_prod {rsp_prod} says {expected}")]
    Inconsistent {
        found: u32,
        expected: u32,
        req_cons: u32,
        rsp_prod: u32,
    },
}

impl JournalError {
    /// Whether a journal refused with this error provably owes no request, given the
    /// ring's shared `rsp_prod` and `req_prod`: then ignoring it and resuming from the
    /// ring at `rsp_prod` is exact. That holds when the frontend published nothing
    /// unanswered (`req_prod == rsp_prod`: no process can have consumed anything beyond
    /// `rsp_prod`), and for a journal of another format version whose `req_cons` (kept in
    /// place by every version) is `rsp_prod`: nothing was consumed beyond what was
    /// answered and published, so every request from `rsp_prod` on is intact on the ring.
    pub fn owes_nothing(&self, rsp_prod: u32, req_prod: u32) -> bool {
        req_prod == rsp_prod
            || matches!(*self, JournalError::Version { req_cons, .. } if req_cons == rsp_prod)
    }
}

/// A request the journal says is owed a response: its entry, ring index and slot copy.
#[derive(Debug, Clone)]
pub(crate) struct Owed {
    pub(crate) entry: u32,
    pub(crate) index: u32,
    pub(crate) slot: [u8; MAX_REQUEST_SIZE],
}

/// What a journal found at recovery.
#[derive(Debug)]
pub(crate) struct Recovered {
    pub(crate) req_cons: u32,
    /// Oldest first.
    pub(crate) owed: Vec<Owed>,
}

/// A ring's journal: the mapping and the offsets into it. Every access is bounds
/// checked by [`SharedMemory`]; `new` checked the mapping is long enough, so the
/// accesses below cannot fail.
#[derive(Debug)]
pub(crate) struct Journal {
    mem: SharedMemory,
    entries: u32,
    slot_len: usize,
}

impl Journal {
    fn new(mem: SharedMemory, protocol: Protocol, ring_size: u32) -> Result<Self, JournalError> {
        if mem.len() < journal_len(ring_size) {
            return Err(JournalError::Length {
                len: mem.len(),
                ring_size,
            });
        }
        Ok(Journal {
            mem,
            entries: ring_size,
            slot_len: protocol.request_size(),
        })
    }

    fn load(&self, offset: usize) -> u32 {
        self.mem
            .load_u32(offset, Ordering::Relaxed)
            .expect("journal offset inside the checked length")
    }

    fn store(&self, offset: usize, value: u32, order: Ordering) {
        self.mem
            .store_u32(offset, value, order)
            .expect("journal offset inside the checked length")
    }

    fn entry_offset(&self, entry: u32) -> usize {
        debug_assert!(entry < self.entries);
        entry_offset(entry)
    }

    /// Whether the header was never written (a file created and never initialised, or a
    /// zeroed one): such a journal records nothing and is as good as none.
    fn is_blank(&self) -> bool {
        self.load(H_MAGIC) == 0
    }

    /// Initialises a fresh journal: every entry free, `req_cons` at `req_cons`. The
    /// magic goes last, so a process killed half-way leaves a blank journal.
    pub(crate) fn create(
        mem: SharedMemory,
        protocol: Protocol,
        ring_size: u32,
        req_cons: u32,
    ) -> Result<Self, JournalError> {
        let j = Self::new(mem, protocol, ring_size)?;
        j.store(H_MAGIC, 0, Ordering::Release);
        j.mem
            .fill(H_VERSION, journal_len(ring_size) - H_VERSION, 0)
            .expect("journal inside the checked length");
        j.store(H_VERSION, FORMAT_VERSION, Ordering::Relaxed);
        j.store(H_PROTOCOL, protocol_code(protocol), Ordering::Relaxed);
        j.store(H_RING_SIZE, ring_size, Ordering::Relaxed);
        j.store(H_ENTRIES, ring_size, Ordering::Relaxed);
        j.store(H_ENTRY_LEN, ENTRY_LEN_WORD, Ordering::Relaxed);
        j.store(H_REQ_CONS, req_cons, Ordering::Relaxed);
        j.store(H_LEN, journal_len_word(ring_size), Ordering::Relaxed);
        j.store(H_MAGIC, MAGIC, Ordering::Release);
        Ok(j)
    }

    /// Opens a journal a previous process left and works out what it owed, given the
    /// ring's shared indices. `Ok((journal, None))`: the journal is blank (nothing was
    /// ever recorded); the caller re-initialises it. The journal is left describing the
    /// recovered state: owed entries in flight again, every other entry free.
    pub(crate) fn recover(
        mem: SharedMemory,
        protocol: Protocol,
        ring_size: u32,
        rsp_prod: u32,
        req_prod: u32,
    ) -> Result<(Self, Option<Recovered>), JournalError> {
        let prefix_word = |offset| mem.load_u32(offset, Ordering::Relaxed).ok();
        let length = JournalError::Length {
            len: mem.len(),
            ring_size,
        };
        match (prefix_word(H_MAGIC), prefix_word(H_VERSION)) {
            (Some(MAGIC), Some(version)) if version != FORMAT_VERSION => {
                return Err(JournalError::Version {
                    version,
                    req_cons: prefix_word(H_REQ_CONS).ok_or(length)?,
                })
            }
            (Some(_), Some(_)) => {}
            _ => return Err(length),
        }
        if mem.len() != journal_len(ring_size) {
            return Err(length);
        }
        let j = Self::new(mem, protocol, ring_size)?;
        if j.is_blank() {
            return Ok((j, None));
        }
        let header = [
            H_MAGIC,
            H_VERSION,
            H_PROTOCOL,
            H_RING_SIZE,
            H_ENTRIES,
            H_ENTRY_LEN,
        ]
        .map(|o| j.load(o));
        let expected = [
            MAGIC,
            FORMAT_VERSION,
            protocol_code(protocol),
            ring_size,
            ring_size,
            ENTRY_LEN_WORD,
        ];
        let len_word = j.load(H_LEN);
        if header != expected || (len_word != 0 && len_word != journal_len_word(ring_size)) {
            let [magic, version, protocol, ring_size, entries, entry_len] = header;
            return Err(JournalError::Mismatch {
                magic,
                version,
                protocol,
                ring_size,
                entries,
                entry_len,
            });
        }
        let req_cons = j.load(H_REQ_CONS);
        let owed_count = req_cons.wrapping_sub(rsp_prod);
        // Consumed no more than published, and never more than a ring's worth unanswered.
        if owed_count > ring_size || owed_count > req_prod.wrapping_sub(rsp_prod) {
            return Err(JournalError::BadIndices {
                req_cons,
                rsp_prod,
                req_prod,
                size: ring_size,
            });
        }
        let mut owed = Vec::new();
        for entry in 0..ring_size {
            let at = j.entry_offset(entry);
            let state = j.load(at + E_STATE);
            let index = j.load(at + E_INDEX);
            let is_owed = match state {
                FREE => false,
                // Written, but the journal's req_cons never moved past it: the process
                // died between the two, and the request is still on the ring, unconsumed.
                IN_FLIGHT => index != req_cons,
                // Answered at a position the frontend has not seen: the response may be
                // half-written or unpublished, so the request is owed again.
                ANSWERED => j.load(at + E_RSP_POS).wrapping_sub(rsp_prod) < owed_count,
                state => return Err(JournalError::BadState { entry, state }),
            };
            if is_owed {
                let mut slot = [0u8; MAX_REQUEST_SIZE];
                j.mem
                    .read(at + E_SLOT, &mut slot[..j.slot_len])
                    .expect("journal entry inside the checked length");
                owed.push(Owed { entry, index, slot });
            }
        }
        let found = u32::try_from(owed.len()).unwrap_or(u32::MAX);
        if found != owed_count {
            return Err(JournalError::Inconsistent {
                found,
                expected: owed_count,
                req_cons,
                rsp_prod,
            });
        }
        // Oldest first: furthest behind req_cons (a request may have stayed in flight
        // while the ring wrapped, so its index is not compared with rsp_prod).
        owed.sort_by_key(|o| std::cmp::Reverse(req_cons.wrapping_sub(o.index)));
        for entry in 0..ring_size {
            let at = j.entry_offset(entry);
            let state = if owed.iter().any(|o| o.entry == entry) {
                IN_FLIGHT
            } else {
                FREE
            };
            j.store(at + E_STATE, state, Ordering::Release);
        }
        Ok((j, Some(Recovered { req_cons, owed })))
    }

    /// Records a request just read from ring index `index` into `entry`, then advances the
    /// journal's `req_cons` past it (in that order: see [`Journal::recover`]).
    pub(crate) fn record_pop(&self, entry: u32, index: u32, slot: &[u8]) {
        let at = self.entry_offset(entry);
        self.mem
            .write(at + E_SLOT, &slot[..self.slot_len])
            .expect("journal entry inside the checked length");
        self.store(at + E_INDEX, index, Ordering::Relaxed);
        self.store(at + E_STATE, IN_FLIGHT, Ordering::Release);
        self.store(H_REQ_CONS, index.wrapping_add(1), Ordering::Release);
    }

    /// Marks `entry` answered at response position `pos`: before the response is written
    /// into the ring, whose slot may still hold a request this journal owes.
    pub(crate) fn record_answer(&self, entry: u32, pos: u32) {
        let at = self.entry_offset(entry);
        self.store(at + E_RSP_POS, pos, Ordering::Relaxed);
        self.store(at + E_STATE, ANSWERED, Ordering::Release);
        // The ring slot write that follows is a plain copy: keep it after the state.
        std::sync::atomic::fence(Ordering::Release);
    }

    /// Frees `entry` once its response was published (after the `rsp_prod` store).
    pub(crate) fn record_free(&self, entry: u32) {
        self.store(self.entry_offset(entry) + E_STATE, FREE, Ordering::Release);
    }

    /// The mapping.
    pub(crate) fn memory(&self) -> &SharedMemory {
        &self.mem
    }

    pub(crate) fn into_memory(self) -> SharedMemory {
        self.mem
    }
}
