//! A slot: one storage operation of an NBD queue, from `submit` until its completion is
//! delivered — its iovecs, its current command's header, and how far it has got.

use std::time::Instant;

use super::INITIAL_IOVS_PER_SLOT;
use crate::iovec::IoVec;
use crate::nbd::proto;
use crate::OpKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Free,
    Read,
    Write { fua: bool },
    Flush,
    Discard,
}

pub(super) struct Slot {
    pub(super) tag: u64,
    pub(super) op: Op,
    pub(super) offset: u64,
    pub(super) total: u64,
    /// Bytes (of reads, writes, discards) the server has acknowledged.
    pub(super) done: u64,
    /// The caller's iovecs; `iovs[first..]` start at byte `done` of the operation.
    pub(super) iovs: Vec<IoVec>,
    pub(super) first: usize,
    /// The current command.
    pub(super) command: u16,
    pub(super) chunk: u32,
    pub(super) header: [u8; proto::REQUEST_LEN],
    pub(super) seq: u32,
    /// The current command's bytes have all been sent.
    pub(super) sent: bool,
    /// The current command has been issued and its reply not yet received.
    pub(super) awaiting: bool,
    /// The reply's NBD error, once received (reads: once its data is in, too).
    pub(super) reply: Option<u32>,
    /// A flush follows the last write command (FUA the server cannot do itself).
    pub(super) flush_after: bool,
    /// Submission order, so a reconnect resends in the order the guest submitted.
    pub(super) order: u64,
    pub(super) submitted: Instant,
    /// When the operation started waiting for a lost connection without an answer since:
    /// kept across reconnects, so a server that keeps dropping the connection cannot hold
    /// it beyond the bound.
    pub(super) waiting_since: Option<Instant>,
}

impl Slot {
    pub(super) fn new() -> Slot {
        Slot {
            tag: 0,
            op: Op::Free,
            offset: 0,
            total: 0,
            done: 0,
            iovs: Vec::with_capacity(INITIAL_IOVS_PER_SLOT),
            first: 0,
            command: 0,
            chunk: 0,
            header: [0; proto::REQUEST_LEN],
            seq: 0,
            sent: false,
            awaiting: false,
            reply: None,
            flush_after: false,
            order: 0,
            submitted: Instant::now(),
            waiting_since: None,
        }
    }

    pub(super) fn kind(&self) -> OpKind {
        match self.op {
            Op::Read => OpKind::Read,
            Op::Write { .. } => OpKind::Write,
            Op::Flush | Op::Free => OpKind::Flush,
            Op::Discard => OpKind::Discard,
        }
    }

    /// Bytes the current command occupies on the wire (header and write payload).
    pub(super) fn wire_len(&self) -> usize {
        proto::REQUEST_LEN
            + if self.command == proto::CMD_WRITE {
                self.chunk as usize
            } else {
                0
            }
    }

    /// Drops `n` acknowledged bytes from the front of the remaining iovecs.
    pub(super) fn advance(&mut self, n: u64) {
        crate::iovec::advance(&mut self.iovs, &mut self.first, n);
    }

    /// Calls `f(ptr, len)` for the pieces of the current chunk's buffers covering bytes
    /// `[skip, skip + len)` of the chunk, until `f` returns false.
    pub(super) fn for_each_piece(
        &self,
        mut skip: usize,
        mut len: usize,
        mut f: impl FnMut(*mut u8, usize) -> bool,
    ) {
        for v in &self.iovs[self.first..] {
            if len == 0 {
                return;
            }
            let vlen = v.0.iov_len;
            if skip >= vlen {
                skip -= vlen;
                continue;
            }
            let take = (vlen - skip).min(len);
            let ptr = v.0.iov_base.cast::<u8>().wrapping_add(skip);
            if !f(ptr, take) {
                return;
            }
            skip = 0;
            len -= take;
        }
    }
}
