//! Request encoding: which NBD command an operation's slot sends next (read/write chunks
//! within the server's maximum, trim or write-zeroes for discards, flush, the flush a FUA
//! write owes), and what a reply to it means for the operation.

use std::io;

use super::slot::Op;
use super::NbdQueue;
use crate::error::unsupported;
use crate::nbd::proto;
use crate::OpKind;

impl NbdQueue {
    /// Issues the next command of slot `idx` (or completes it when none is needed) and
    /// queues it for sending.
    pub(super) fn start_command(&mut self, idx: u32) {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        let (max_payload, max_discard) = (self.target.max_payload, self.target.max_discard);
        let (can_fua, can_flush) = (
            self.has(proto::TFLAG_SEND_FUA),
            self.has(proto::TFLAG_SEND_FLUSH),
        );
        let (can_trim, can_zero) = (
            self.has(proto::TFLAG_SEND_TRIM),
            self.has(proto::TFLAG_SEND_WRITE_ZEROES),
        );
        let slot = &mut self.slots[idx as usize];
        let remaining = slot.total - slot.done;
        let mut flags = 0;
        let (command, chunk) = match slot.op {
            Op::Free => return,
            Op::Read if remaining > 0 => (proto::CMD_READ, remaining.min(u64::from(max_payload))),
            Op::Write { fua } if remaining > 0 => {
                if fua && can_fua {
                    flags |= proto::CMD_FLAG_FUA;
                }
                (proto::CMD_WRITE, remaining.min(u64::from(max_payload)))
            }
            Op::Discard if remaining > 0 => {
                let command = if can_trim {
                    proto::CMD_TRIM
                } else if can_zero {
                    // Zeroing is a valid discard: the contents become unspecified.
                    proto::CMD_WRITE_ZEROES
                } else {
                    let e = unsupported(OpKind::Discard, libc::EOPNOTSUPP);
                    return self.complete(idx, Err(e));
                };
                (command, remaining.min(max_discard))
            }
            Op::Flush if can_flush => (proto::CMD_FLUSH, 0),
            Op::Flush => {
                // Read-only storage, or a restarted server that no longer has a cache to
                // flush: nothing is volatile.
                return self.complete(idx, Ok(0));
            }
            // A write whose data is all acknowledged: the FUA flush, if one is owed.
            Op::Read | Op::Write { .. } | Op::Discard => {
                if slot.flush_after && can_flush {
                    (proto::CMD_FLUSH, 0)
                } else {
                    let total = slot.total;
                    return self.complete(idx, Ok(total));
                }
            }
        };
        // `chunk` is bounded by `max_payload` (u32) or `max_discard` (<= 4 GiB - 64 KiB).
        #[allow(clippy::cast_possible_truncation)]
        let chunk = chunk as u32;
        let offset = if command == proto::CMD_FLUSH {
            0
        } else {
            slot.offset + slot.done
        };
        slot.command = command;
        slot.chunk = chunk;
        slot.seq = seq;
        slot.sent = false;
        slot.awaiting = true;
        slot.reply = None;
        let handle = (u64::from(seq) << 32) | u64::from(idx);
        proto::encode_request(&mut slot.header, flags, command, handle, offset, chunk);
        self.send_queue.push_back(idx);
    }

    /// The current command of slot `idx` is sent and answered: move on.
    pub(super) fn maybe_finish(&mut self, idx: u32) {
        let slot = &mut self.slots[idx as usize];
        let Some(error) = slot.reply else { return };
        if !slot.sent || !slot.awaiting {
            return;
        }
        slot.awaiting = false;
        slot.waiting_since = None;
        if error != 0 {
            let errno = proto::errno_of(error);
            let kind = slot.kind();
            tracing::debug!(command = %proto::CommandName(slot.command), errno, "NBD command failed");
            return self.complete(idx, Err(nbd_error(kind, errno)));
        }
        match slot.command {
            proto::CMD_FLUSH => {
                if slot.op == Op::Flush {
                    return self.complete(idx, Ok(0));
                }
                slot.flush_after = false;
            }
            command => {
                let n = u64::from(slot.chunk);
                slot.done += n;
                if command == proto::CMD_READ || command == proto::CMD_WRITE {
                    slot.advance(n);
                }
            }
        }
        self.start_command(idx);
    }
}

/// The completion error for a command the server failed with `errno`. Only ENOTSUP means
/// "unsupported" here: a server's EINVAL is a refused request, not a missing feature.
fn nbd_error(kind: OpKind, errno: i32) -> io::Error {
    if errno == libc::EOPNOTSUPP {
        unsupported(kind, errno)
    } else {
        io::Error::from_raw_os_error(errno)
    }
}
