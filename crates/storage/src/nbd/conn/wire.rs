//! The socket side of a connection: building the `SENDMSG` that carries queued commands
//! (headers from the slots, write payloads straight from the guest's pages), the receive
//! into `rbuf` or straight into a read's pages, and parsing the replies that come back.

use std::io;
use std::os::fd::AsRawFd;

use io_uring::{opcode, types};

use super::slot::Op;
use super::{NbdQueue, MAX_SEND_IOVS, UD_RECV, UD_SEND};
use crate::iovec::IoVec;
use crate::nbd::proto::{self, ReplyHeader};

/// What the receive side is in the middle of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RecvState {
    /// Expecting a reply header.
    Header,
    /// Receiving the data of slot `idx`'s read reply; `got` bytes of its chunk are in.
    Data { idx: u32, got: usize },
}

/// Which receive is in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RecvKind {
    Buffer,
    Direct,
}

impl NbdQueue {
    pub(super) fn fd(&self) -> Option<types::Fd> {
        self.socket.as_ref().map(|s| types::Fd(s.as_raw_fd()))
    }

    pub(super) fn push_send(&mut self) -> bool {
        let Some(fd) = self.fd() else { return false };
        let mut iov = std::mem::take(&mut self.send_iov);
        iov.clear();
        let mut skip = self.send_skip;
        let mut bytes = 0usize;
        'commands: for &idx in &self.send_queue {
            let slot = &self.slots[idx as usize];
            let header_len = proto::REQUEST_LEN;
            if skip < header_len {
                iov.push(IoVec(libc::iovec {
                    iov_base: slot.header[skip..].as_ptr() as *mut libc::c_void,
                    iov_len: header_len - skip,
                }));
                bytes += header_len - skip;
                skip = 0;
            } else {
                skip -= header_len;
            }
            if iov.len() >= MAX_SEND_IOVS {
                break;
            }
            if slot.command == proto::CMD_WRITE {
                let mut full = false;
                slot.for_each_piece(
                    skip,
                    slot.chunk as usize - skip.min(slot.chunk as usize),
                    |ptr, len| {
                        iov.push(IoVec(libc::iovec {
                            iov_base: ptr.cast(),
                            iov_len: len,
                        }));
                        bytes += len;
                        full = iov.len() >= MAX_SEND_IOVS;
                        !full
                    },
                );
                skip = 0;
                if full {
                    break 'commands;
                }
            }
        }
        self.send_iov = iov;
        if bytes == 0 {
            return false;
        }
        let msg = &mut self.send_msg.0;
        msg.msg_iov = self.send_iov.as_mut_ptr().cast();
        msg.msg_iovlen = self.send_iov.len();
        let entry = opcode::SendMsg::new(fd, msg)
            .flags((libc::MSG_NOSIGNAL | libc::MSG_WAITALL) as u32)
            .build()
            .user_data(UD_SEND);
        // SAFETY: the SQE refers to `send_msg` and `send_iov` (boxed / owned by this queue,
        // not touched until its CQE is processed: `send_busy` guards them), to slot
        // headers (slots are never moved; a slot is freed only after its bytes are sent),
        // to guest memory valid until the slot completes (the caller's contract), and to
        // the socket, closed only after every CQE has come back.
        match unsafe { self.ring.submission().push(&entry) } {
            Ok(()) => {
                self.in_ring += 1;
                self.send_busy = bytes;
                true
            }
            Err(_) => false,
        }
    }

    pub(super) fn push_recv(&mut self) -> bool {
        let Some(fd) = self.fd() else { return false };
        let entry = match self.rstate {
            RecvState::Data { idx, got } if self.rstart == self.rend => {
                let slot = &self.slots[idx as usize];
                let mut iov = std::mem::take(&mut self.recv_iov);
                iov.clear();
                slot.for_each_piece(got, slot.chunk as usize - got, |ptr, len| {
                    iov.push(IoVec(libc::iovec {
                        iov_base: ptr.cast(),
                        iov_len: len,
                    }));
                    iov.len() < crate::MAX_SEGMENTS
                });
                self.recv_iov = iov;
                let msg = &mut self.recv_msg.0;
                msg.msg_iov = self.recv_iov.as_mut_ptr().cast();
                msg.msg_iovlen = self.recv_iov.len();
                self.recv_busy = Some(RecvKind::Direct);
                opcode::RecvMsg::new(fd, msg)
                    .flags(libc::MSG_WAITALL as u32)
                    .build()
                    .user_data(UD_RECV)
            }
            _ => {
                if self.rstart > 0 {
                    self.rbuf.copy_within(self.rstart..self.rend, 0);
                    self.rend -= self.rstart;
                    self.rstart = 0;
                }
                let free = &mut self.rbuf[self.rend..];
                self.recv_busy = Some(RecvKind::Buffer);
                // `free` is at most RBUF_SIZE long, so the length fits in u32.
                #[allow(clippy::cast_possible_truncation)]
                let free_len = free.len() as u32;
                opcode::Recv::new(fd, free.as_mut_ptr(), free_len)
                    .build()
                    .user_data(UD_RECV)
            }
        };
        // SAFETY: the SQE refers to `rbuf` (owned, not touched while `recv_busy`), or to
        // `recv_msg`/`recv_iov` and the guest buffers of a read slot that completes only
        // after this receive's CQE; the socket is closed only after every CQE is back.
        match unsafe { self.ring.submission().push(&entry) } {
            Ok(()) => {
                self.in_ring += 1;
                true
            }
            Err(_) => {
                self.recv_busy = None;
                false
            }
        }
    }

    pub(super) fn on_send(&mut self, res: i32) {
        let batch = std::mem::replace(&mut self.send_busy, 0);
        if self.lost.is_some() {
            return;
        }
        if res <= 0 {
            let why = if res == 0 {
                "send made no progress".to_string()
            } else {
                io::Error::from_raw_os_error(-res).to_string()
            };
            return self.lose(&format_args!("send: {why}"));
        }
        let mut n = (res as usize).min(batch);
        while n > 0 {
            let Some(&idx) = self.send_queue.front() else {
                break;
            };
            let left = self.slots[idx as usize].wire_len() - self.send_skip;
            if n >= left {
                n -= left;
                self.send_queue.pop_front();
                self.send_skip = 0;
                self.slots[idx as usize].sent = true;
                self.maybe_finish(idx);
            } else {
                self.send_skip += n;
                n = 0;
            }
        }
    }

    pub(super) fn on_recv(&mut self, res: i32) {
        let kind = self.recv_busy.take();
        if self.lost.is_some() {
            return;
        }
        if res <= 0 {
            let why = if res == 0 {
                "the server closed the connection".to_string()
            } else {
                io::Error::from_raw_os_error(-res).to_string()
            };
            return self.lose(&format_args!("receive: {why}"));
        }
        let n = res as usize;
        match kind {
            Some(RecvKind::Buffer) => {
                self.rend = (self.rend + n).min(self.rbuf.len());
                self.parse_replies();
            }
            Some(RecvKind::Direct) => {
                if let RecvState::Data { idx, got } = self.rstate {
                    let chunk = self.slots[idx as usize].chunk as usize;
                    let got = (got + n).min(chunk);
                    self.rstate = RecvState::Data { idx, got };
                    if got == chunk {
                        self.read_done(idx);
                    }
                }
            }
            None => {}
        }
    }

    pub(super) fn read_done(&mut self, idx: u32) {
        self.rstate = RecvState::Header;
        self.slots[idx as usize].reply = Some(0);
        self.maybe_finish(idx);
    }

    /// Consumes every complete reply (and read data) in `rbuf`.
    pub(super) fn parse_replies(&mut self) {
        loop {
            match self.rstate {
                RecvState::Header => {
                    let header = match proto::parse_reply_header(&self.rbuf[self.rstart..self.rend])
                    {
                        Ok(None) => break,
                        Ok(Some(h)) => h,
                        Err(e) => return self.lose(&format_args!("protocol error: {e}")),
                    };
                    let ReplyHeader::Simple { error, handle } = header else {
                        return self.lose(&"structured reply, which was not negotiated");
                    };
                    self.rstart += proto::SIMPLE_REPLY_LEN;
                    // A handle is `(sequence << 32) | slot`: the halves.
                    #[allow(clippy::cast_possible_truncation)]
                    let (idx, seq) = (handle as u32, (handle >> 32) as u32);
                    let valid = self.slots.get(idx as usize).is_some_and(|s| {
                        s.op != Op::Free && s.awaiting && s.reply.is_none() && s.seq == seq
                    });
                    if !valid {
                        return self.lose(&format_args!("reply for unknown handle {handle:#x}"));
                    }
                    let slot = &mut self.slots[idx as usize];
                    if error == 0 && slot.command == proto::CMD_READ {
                        self.rstate = RecvState::Data { idx, got: 0 };
                    } else {
                        slot.reply = Some(error);
                        self.maybe_finish(idx);
                    }
                }
                RecvState::Data { idx, got } => {
                    let avail = self.rend - self.rstart;
                    if avail == 0 {
                        break;
                    }
                    let slot = &self.slots[idx as usize];
                    let n = avail.min(slot.chunk as usize - got);
                    let mut src = self.rbuf[self.rstart..self.rstart + n].as_ptr();
                    slot.for_each_piece(got, n, |dst, len| {
                        // SAFETY: `dst..dst+len` lies inside an iovec of a read that is
                        // still in flight, so by `submit`'s contract it is valid for
                        // writing and no reference to it exists; `src..src+len` lies
                        // inside `rbuf` (n bytes from rstart), and the two cannot overlap
                        // (rbuf is ours).
                        unsafe {
                            std::ptr::copy_nonoverlapping(src, dst, len);
                            src = src.add(len);
                        }
                        true
                    });
                    self.rstart += n;
                    let got = got + n;
                    if got == slot.chunk as usize {
                        self.read_done(idx);
                    } else {
                        self.rstate = RecvState::Data { idx, got };
                    }
                }
            }
        }
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        }
    }
}
