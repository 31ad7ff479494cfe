//! One NBD connection's transmission phase on its own io_uring: the engine of an
//! [`super::NbdStorage`] queue.
//!
//! - **Slots.** Each storage operation occupies one of `depth` slots from `submit` until
//!   its completion is delivered. An operation is sent as one NBD command at a time: more
//!   than one only when it is larger than the server's maximum block size (or a discard
//!   larger than [`DISCARD_CHUNK`]), or a FUA write the server cannot FUA (write, then
//!   flush). The command's handle is `(sequence << 32) | slot`, so a reply names its slot
//!   and a stale or forged handle is detected.
//! - **Sending.** Commands wait in `send_queue` in order. One `IORING_OP_SENDMSG` at a time
//!   carries as many of them as fit in [`MAX_SEND_IOVS`] iovecs: each command's 28-byte
//!   header (held by its slot) followed, for writes, by iovecs that point straight into
//!   the guest pages. A short send continues where it stopped. A slot is complete only
//!   once its bytes are sent *and* its reply has arrived, so nothing in the kernel still
//!   refers to its memory when the completion is delivered.
//! - **Receiving.** One receive at a time. Normally it fills `rbuf`, from which reply
//!   headers are parsed ([`proto::parse_reply_header`]) — many per system call when
//!   replies queue up. The data of a read that already sits in `rbuf` is copied to the
//!   guest's buffers; the rest of it is received with `IORING_OP_RECVMSG` straight into
//!   them. Structured replies are not negotiated, so one is a protocol error.
//! - **Completions** reach the reactor through the eventfd registered with this ring:
//!   the kernel signals it for every CQE, and the reconnect helper and immediate
//!   completions write it too. `reap` processes CQEs, arms the next send/receive, and
//!   delivers completed slots.
//! - **Connection loss** (an error or end-of-file on the socket, or any protocol
//!   violation): the socket is shut down, and once the kernel has returned every
//!   operation on it, closed. Every unfinished operation is kept; a helper thread
//!   reconnects with backoff (blocking connect and handshake, off the reactor) and hands
//!   the new socket over through [`Reconnect`]; then every unfinished operation's current
//!   command is sent again, in submission order. An operation that has waited longer than
//!   the reconnect bound during an outage fails with EIO.
//! - **Drop** sends `NBD_CMD_DISC` when idle, shuts the socket down and waits for the
//!   kernel to return every operation, so no guest memory is touched afterwards.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};

use super::handshake::{self, Negotiated};
use super::proto::{self, ReplyHeader};
use super::uri::NbdUri;
use crate::error::unsupported;
use crate::sys::EventFd;
use crate::{
    validate, Completion, OpKind, StorageError, StorageInfo, StorageOp, StorageQueue, SubmitError,
};

/// Iovecs in one `sendmsg` (the kernel's `UIO_MAXIOV`).
const MAX_SEND_IOVS: usize = 1024;
/// Size of the receive buffer replies are parsed from.
const RBUF_SIZE: usize = 64 * 1024;
/// Largest discard (trim / write-zeroes) command when the server names no maximum.
pub(crate) const DISCARD_CHUNK: u64 = 1 << 30;
/// Rounds of "process CQEs, arm the next operations" per `reap`, so one busy connection
/// cannot keep its reactor from its other rings.
const MAX_ROUNDS: usize = 16;
/// iovecs reserved per slot up front: a direct blkif request has at most 11 segments.
const INITIAL_IOVS_PER_SLOT: usize = 16;

const UD_SEND: u64 = 1;
const UD_RECV: u64 = 2;

/// A `libc::iovec` that may move between threads with its queue.
#[repr(transparent)]
#[derive(Clone, Copy)]
struct IoVec(libc::iovec);

// SAFETY: the pointer is only an address handed to the kernel or written through by the
// queue that owns it (copying received read data); the queue is used by one thread at a
// time (`&mut self`), and the memory's validity is the submitter's contract, independent of
// the thread.
unsafe impl Send for IoVec {}

/// A `msghdr` the kernel reads while a send/receive is in flight.
struct MsgHdr(libc::msghdr);

// SAFETY: as for `IoVec`: it only points at this queue's own iovec arrays.
unsafe impl Send for MsgHdr {}

impl MsgHdr {
    fn new() -> Box<MsgHdr> {
        // SAFETY: msghdr is plain old data; all-zero is a valid (empty) value.
        Box::new(MsgHdr(unsafe { std::mem::zeroed() }))
    }
}

/// How the queue reaches its server and how long it keeps trying.
#[derive(Debug, Clone)]
pub(crate) struct ConnTarget {
    pub uri: Arc<NbdUri>,
    /// Static capabilities (what the engine was told).
    pub info: StorageInfo,
    /// Live size, shared with the storage.
    pub size: Arc<AtomicU64>,
    /// Largest read/write command, a multiple of the logical block size.
    pub max_payload: u32,
    /// Largest trim / write-zeroes command, a multiple of the logical block size.
    pub max_discard: u64,
    /// Bound of one connect + handshake attempt.
    pub connect_timeout: Duration,
    /// How long an operation may wait for a lost connection to come back.
    pub reconnect_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Free,
    Read,
    Write { fua: bool },
    Flush,
    Discard,
}

struct Slot {
    tag: u64,
    op: Op,
    offset: u64,
    total: u64,
    /// Bytes (of reads, writes, discards) the server has acknowledged.
    done: u64,
    /// The caller's iovecs; `iovs[first..]` start at byte `done` of the operation.
    iovs: Vec<IoVec>,
    first: usize,
    /// The current command.
    command: u16,
    chunk: u32,
    header: [u8; proto::REQUEST_LEN],
    seq: u32,
    /// The current command's bytes have all been sent.
    sent: bool,
    /// The current command has been issued and its reply not yet received.
    awaiting: bool,
    /// The reply's NBD error, once received (reads: once its data is in, too).
    reply: Option<u32>,
    /// A flush follows the last write command (FUA the server cannot do itself).
    flush_after: bool,
    /// Submission order, so a reconnect resends in the order the guest submitted.
    order: u64,
    submitted: Instant,
    /// When the operation started waiting for a lost connection without an answer since:
    /// kept across reconnects, so a server that keeps dropping the connection cannot hold
    /// it beyond the bound.
    waiting_since: Option<Instant>,
}

impl Slot {
    fn new() -> Slot {
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

    fn kind(&self) -> OpKind {
        match self.op {
            Op::Read => OpKind::Read,
            Op::Write { .. } => OpKind::Write,
            Op::Flush | Op::Free => OpKind::Flush,
            Op::Discard => OpKind::Discard,
        }
    }

    /// Bytes the current command occupies on the wire (header and write payload).
    fn wire_len(&self) -> usize {
        proto::REQUEST_LEN
            + if self.command == proto::CMD_WRITE {
                self.chunk as usize
            } else {
                0
            }
    }

    /// Drops `n` acknowledged bytes from the front of the remaining iovecs.
    fn advance(&mut self, mut n: u64) {
        while n > 0 && self.first < self.iovs.len() {
            let v = &mut self.iovs[self.first].0;
            let len = v.iov_len as u64;
            if len <= n {
                n -= len;
                self.first += 1;
            } else {
                // `n < len <= usize::MAX`, so the cast is lossless.
                #[allow(clippy::cast_possible_truncation)]
                let n_bytes = n as usize;
                v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n_bytes).cast();
                v.iov_len -= n_bytes;
                n = 0;
            }
        }
    }

    /// Calls `f(ptr, len)` for the pieces of the current chunk's buffers covering bytes
    /// `[skip, skip + len)` of the chunk, until `f` returns false.
    fn for_each_piece(
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

/// What the receive side is in the middle of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecvState {
    /// Expecting a reply header.
    Header,
    /// Receiving the data of slot `idx`'s read reply; `got` bytes of its chunk are in.
    Data { idx: u32, got: usize },
}

/// Which receive is in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecvKind {
    Buffer,
    Direct,
}

/// A lost connection being replaced.
struct Outage {
    since: Instant,
}

/// The mailbox between a queue and its reconnect helper thread.
pub(crate) struct Reconnect {
    result: Mutex<Option<(OwnedFd, Negotiated)>>,
    stop: AtomicBool,
    running: AtomicBool,
}

impl Reconnect {
    fn new() -> Arc<Reconnect> {
        Arc::new(Reconnect {
            result: Mutex::new(None),
            stop: AtomicBool::new(false),
            running: AtomicBool::new(false),
        })
    }

    fn take(&self) -> Option<(OwnedFd, Negotiated)> {
        self.result.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Starts the helper that reconnects with backoff until it succeeds or is stopped. It
/// signals `eventfd` after every attempt, so the queue can fail operations whose bound has
/// passed even while the server stays away.
fn spawn_reconnect(target: &ConnTarget, mailbox: Arc<Reconnect>, eventfd: Arc<EventFd>) {
    if mailbox.running.swap(true, Ordering::AcqRel) {
        return;
    }
    let uri = Arc::clone(&target.uri);
    let timeout = target.connect_timeout;
    let thread_mailbox = Arc::clone(&mailbox);
    let cap =
        (target.reconnect_timeout / 8).clamp(Duration::from_millis(50), Duration::from_millis(500));
    let spawned = std::thread::Builder::new()
        .name("nbd-reconnect".into())
        .spawn(move || {
            let mailbox = thread_mailbox;
            let mut backoff = Duration::from_millis(20);
            let mut attempts = 0u64;
            while !mailbox.stop.load(Ordering::Acquire) {
                attempts += 1;
                match handshake::open(&uri.address, &uri.export, timeout) {
                    Ok(conn) => {
                        tracing::info!(uri = %uri, attempts, "NBD connection re-established");
                        *mailbox.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn);
                        break;
                    }
                    Err(e) => {
                        if attempts == 1 || attempts.is_power_of_two() {
                            tracing::warn!(uri = %uri, attempts, error = %e, "NBD reconnect failed; retrying");
                        }
                    }
                }
                let _ = eventfd.signal();
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(cap);
            }
            mailbox.running.store(false, Ordering::Release);
            let _ = eventfd.signal();
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the NBD reconnect thread");
        mailbox.running.store(false, Ordering::Release);
    }
}

/// One connection and its operations (see the module documentation).
pub(crate) struct NbdQueue {
    ring: IoUring,
    eventfd: Arc<EventFd>,
    target: ConnTarget,
    socket: Option<OwnedFd>,
    /// Transmission flags of the current connection.
    flags: u16,
    slots: Box<[Slot]>,
    free: Vec<u32>,
    depth: u32,
    /// Completed operations not yet delivered: `(tag, result)`.
    ready: VecDeque<(u64, io::Result<u64>)>,
    send_queue: VecDeque<u32>,
    /// Bytes of the first queued command already sent.
    send_skip: usize,
    send_iov: Vec<IoVec>,
    send_msg: Box<MsgHdr>,
    /// Bytes of the sendmsg in the kernel (0: none).
    send_busy: usize,
    rbuf: Box<[u8]>,
    rstart: usize,
    rend: usize,
    rstate: RecvState,
    recv_busy: Option<RecvKind>,
    recv_iov: Vec<IoVec>,
    recv_msg: Box<MsgHdr>,
    /// SQEs pushed whose CQE has not been seen.
    in_ring: u32,
    lost: Option<Outage>,
    reconnect: Arc<Reconnect>,
    next_order: u64,
    next_seq: u32,
    cqes: Vec<(u64, i32)>,
    resend: Vec<u32>,
}

impl NbdQueue {
    pub(crate) fn new(
        target: ConnTarget,
        socket: OwnedFd,
        flags: u16,
        depth: u32,
    ) -> Result<NbdQueue, StorageError> {
        let ring = IoUring::builder()
            .dontfork()
            .build(8)
            .map_err(StorageError::Ring)?;
        let eventfd = Arc::new(EventFd::new().map_err(StorageError::EventFd)?);
        ring.submitter()
            .register_eventfd(eventfd.as_raw_fd())
            .map_err(StorageError::Ring)?;
        Ok(NbdQueue {
            ring,
            eventfd,
            target,
            socket: Some(socket),
            flags,
            slots: (0..depth).map(|_| Slot::new()).collect(),
            free: (0..depth).rev().collect(),
            depth,
            ready: VecDeque::with_capacity(depth as usize),
            send_queue: VecDeque::with_capacity(depth as usize),
            send_skip: 0,
            send_iov: Vec::with_capacity(MAX_SEND_IOVS),
            send_msg: MsgHdr::new(),
            send_busy: 0,
            rbuf: vec![0u8; RBUF_SIZE].into_boxed_slice(),
            rstart: 0,
            rend: 0,
            rstate: RecvState::Header,
            recv_busy: None,
            recv_iov: Vec::with_capacity(crate::MAX_SEGMENTS),
            recv_msg: MsgHdr::new(),
            in_ring: 0,
            lost: None,
            reconnect: Reconnect::new(),
            next_order: 0,
            next_seq: 1,
            cqes: Vec::with_capacity(16),
            resend: Vec::with_capacity(depth as usize),
        })
    }

    fn connected(&self) -> bool {
        self.lost.is_none() && self.socket.is_some()
    }

    fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    /// Completes slot `idx` and frees it.
    fn complete(&mut self, idx: u32, result: io::Result<u64>) {
        let slot = &mut self.slots[idx as usize];
        slot.op = Op::Free;
        slot.iovs.clear();
        slot.awaiting = false;
        self.ready.push_back((slot.tag, result));
        self.free.push(idx);
    }

    /// Issues the next command of slot `idx` (or completes it when none is needed) and
    /// queues it for sending.
    fn start_command(&mut self, idx: u32) {
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
    fn maybe_finish(&mut self, idx: u32) {
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

    /// Connection trouble: shut the socket down; the rest happens once the kernel has
    /// returned our operations on it ([`Self::service`]).
    fn lose(&mut self, why: &dyn std::fmt::Display) {
        if self.lost.is_some() {
            return;
        }
        tracing::warn!(uri = %self.target.uri, reason = %why,
            in_flight = self.depth - u32::try_from(self.free.len()).unwrap_or(self.depth),
            "NBD connection lost; reconnecting");
        if let Some(s) = &self.socket {
            // SAFETY: shutdown takes only integers; the descriptor is open (owned by us).
            unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_RDWR) };
        }
        let now = Instant::now();
        for slot in self.slots.iter_mut().filter(|s| s.op != Op::Free) {
            slot.waiting_since.get_or_insert(now);
        }
        self.lost = Some(Outage { since: now });
    }

    /// The old socket is quiet: close it, forget partial transfers, start reconnecting.
    fn finish_loss(&mut self) {
        self.socket = None;
        self.send_queue.clear();
        self.send_skip = 0;
        self.rstart = 0;
        self.rend = 0;
        self.rstate = RecvState::Header;
        for slot in self.slots.iter_mut() {
            slot.sent = false;
            slot.awaiting = false;
            slot.reply = None;
        }
        spawn_reconnect(
            &self.target,
            Arc::clone(&self.reconnect),
            Arc::clone(&self.eventfd),
        );
    }

    /// Takes the helper's new connection and resends every unfinished operation.
    fn adopt(&mut self, socket: OwnedFd, negotiated: Negotiated) {
        let old = self.target.size.load(Ordering::Acquire);
        let lbs = u64::from(self.target.info.logical_block_size);
        let size = negotiated.size - negotiated.size % lbs;
        if size != old {
            tracing::warn!(uri = %self.target.uri, old, new = size, "export size changed across reconnect");
            self.target.size.store(size, Ordering::Release);
        }
        if negotiated.has(proto::TFLAG_READ_ONLY) && !self.target.info.read_only {
            tracing::warn!(uri = %self.target.uri, "export became read-only across reconnect");
        }
        self.socket = Some(socket);
        self.flags = negotiated.flags;
        self.lost = None;
        let mut resend = std::mem::take(&mut self.resend);
        resend.clear();
        resend.extend((0..self.depth).filter(|&i| self.slots[i as usize].op != Op::Free));
        resend.sort_unstable_by_key(|&i| self.slots[i as usize].order);
        tracing::info!(uri = %self.target.uri, resent = resend.len(), "resending unfinished NBD commands");
        for &idx in &resend {
            self.start_command(idx);
        }
        self.resend = resend;
    }

    /// Fails the operations that have waited out the reconnect bound.
    fn expire(&mut self, outage_since: Instant) {
        let now = Instant::now();
        let bound = self.target.reconnect_timeout;
        for idx in 0..self.depth {
            let slot = &self.slots[idx as usize];
            if slot.op == Op::Free {
                continue;
            }
            // Submitted during this outage: it waits from its submission.
            let waiting_since = slot
                .waiting_since
                .unwrap_or_else(|| slot.submitted.max(outage_since));
            if now.duration_since(waiting_since) >= bound {
                tracing::warn!(uri = %self.target.uri, ?bound, op = %slot.kind(),
                    "NBD server unreachable for the reconnect bound; failing the operation");
                self.complete(idx, Err(io::Error::from_raw_os_error(libc::EIO)));
            }
        }
    }

    /// Moves the connection along: after a loss, close/reconnect/expire; when connected,
    /// arm the next receive and send. Returns true if SQEs were pushed.
    fn service(&mut self) -> bool {
        if let Some(outage) = &self.lost {
            let since = outage.since;
            if self.in_ring > 0 {
                return false;
            }
            if self.socket.is_some() {
                self.finish_loss();
            }
            match self.reconnect.take() {
                Some((socket, negotiated)) => self.adopt(socket, negotiated),
                None => {
                    self.expire(since);
                    if !self.reconnect.running.load(Ordering::Acquire) {
                        spawn_reconnect(
                            &self.target,
                            Arc::clone(&self.reconnect),
                            Arc::clone(&self.eventfd),
                        );
                    }
                    return false;
                }
            }
        }
        let mut pushed = false;
        if self.recv_busy.is_none() {
            pushed |= self.push_recv();
        }
        if self.send_busy == 0 && !self.send_queue.is_empty() {
            pushed |= self.push_send();
        }
        pushed
    }

    fn fd(&self) -> Option<types::Fd> {
        self.socket.as_ref().map(|s| types::Fd(s.as_raw_fd()))
    }

    fn push_send(&mut self) -> bool {
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

    fn push_recv(&mut self) -> bool {
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

    fn on_send(&mut self, res: i32) {
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

    fn on_recv(&mut self, res: i32) {
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

    fn read_done(&mut self, idx: u32) {
        self.rstate = RecvState::Header;
        self.slots[idx as usize].reply = Some(0);
        self.maybe_finish(idx);
    }

    /// Consumes every complete reply (and read data) in `rbuf`.
    fn parse_replies(&mut self) {
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

    /// Processes every CQE. Returns how many there were.
    fn process_cqes(&mut self) -> usize {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(ud, res) in &cqes {
            self.in_ring = self.in_ring.saturating_sub(1);
            match ud {
                UD_SEND => self.on_send(res),
                UD_RECV => self.on_recv(res),
                other => tracing::error!(user_data = other, "CQE with a foreign user_data"),
            }
        }
        let n = cqes.len();
        self.cqes = cqes;
        n
    }

    fn submit_pushed(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs the connection until it has nothing more to do right now.
    fn drive(&mut self) -> io::Result<()> {
        for _ in 0..MAX_ROUNDS {
            let seen = self.process_cqes();
            let pushed = self.service();
            if pushed {
                self.submit_pushed()?;
            }
            if seen == 0 && !pushed {
                break;
            }
        }
        Ok(())
    }
}

impl NbdQueue {
    /// The eventfd the kernel signals for this queue's completions.
    pub(crate) fn eventfd(&self) -> Arc<EventFd> {
        Arc::clone(&self.eventfd)
    }

    /// Forgets every operation whose tag `abandoned` selects, delivering nothing for them:
    /// for a queue sharing this connection that is going away. Guest memory of those
    /// operations may be in a send or receive in the kernel, so the connection is dropped
    /// and, once the kernel has returned everything, the others are resent on a new one.
    pub(crate) fn abandon(&mut self, abandoned: impl Fn(u64) -> bool) {
        self.ready.retain(|(tag, _)| !abandoned(*tag));
        let any = self
            .slots
            .iter()
            .any(|s| s.op != Op::Free && abandoned(s.tag));
        if !any {
            return;
        }
        self.lose(&"a queue sharing the connection closed with operations in flight");
        let _ = self.submit_pushed();
        while self.in_ring > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "waiting for NBD operations");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            self.process_cqes();
        }
        for idx in 0..self.depth {
            let slot = &mut self.slots[idx as usize];
            if slot.op != Op::Free && abandoned(slot.tag) {
                slot.op = Op::Free;
                slot.iovs.clear();
                slot.awaiting = false;
                self.free.push(idx);
            }
        }
        if let Err(e) = self.drive() {
            tracing::warn!(error = %e, "io_uring submission failed");
        }
    }
}

impl StorageQueue for NbdQueue {
    unsafe fn submit(&mut self, op: StorageOp<'_>, tag: u64) -> Result<(), SubmitError> {
        let size = self.target.size.load(Ordering::Acquire);
        let total = validate(&op, &self.target.info, size)?;
        let idx = self.free.pop().ok_or(SubmitError::Full)?;
        let order = self.next_order;
        self.next_order += 1;
        let slot = &mut self.slots[idx as usize];
        slot.tag = tag;
        slot.total = total;
        slot.done = 0;
        slot.first = 0;
        slot.iovs.clear();
        slot.flush_after = false;
        slot.order = order;
        slot.submitted = Instant::now();
        slot.awaiting = false;
        slot.reply = None;
        slot.sent = false;
        slot.waiting_since = None;
        match op {
            StorageOp::Read { offset, iov } => {
                slot.op = Op::Read;
                slot.offset = offset;
                slot.iovs.extend(iov.iter().map(|v| IoVec(*v)));
            }
            StorageOp::Write { offset, iov, fua } => {
                slot.op = Op::Write { fua };
                slot.offset = offset;
                slot.flush_after =
                    fua && !self.target.info.read_only && self.flags & proto::TFLAG_SEND_FUA == 0;
                slot.iovs.extend(iov.iter().map(|v| IoVec(*v)));
            }
            StorageOp::Flush => {
                slot.op = Op::Flush;
                slot.offset = 0;
            }
            StorageOp::Discard { offset, .. } => {
                slot.op = Op::Discard;
                slot.offset = offset;
            }
        }
        // While disconnected the operation waits; `adopt` sends it.
        if self.connected() {
            self.start_command(idx);
        }
        Ok(())
    }

    fn commit(&mut self) -> io::Result<()> {
        let result = self.drive();
        if !self.ready.is_empty() {
            self.eventfd.signal()?;
        }
        result
    }

    fn completion_fd(&self) -> BorrowedFd<'_> {
        self.eventfd.as_fd()
    }

    fn reap(&mut self, f: Completion<'_>) -> usize {
        self.eventfd.drain();
        if let Err(e) = self.drive() {
            tracing::warn!(error = %e, "io_uring submission failed; retrying at the next wake-up");
            let _ = self.eventfd.signal();
        }
        let n = self.ready.len();
        while let Some((tag, result)) = self.ready.pop_front() {
            f(tag, result);
        }
        n
    }

    fn in_flight(&self) -> u32 {
        // The free list holds at most `depth` slots.
        self.depth - u32::try_from(self.free.len()).unwrap_or(self.depth)
    }

    fn depth(&self) -> u32 {
        self.depth
    }
}

impl Drop for NbdQueue {
    fn drop(&mut self) {
        self.reconnect.stop.store(true, Ordering::Release);
        if let Some(s) = &self.socket {
            if self.lost.is_none() && self.send_busy == 0 && self.send_queue.is_empty() {
                let mut disc = [0u8; proto::REQUEST_LEN];
                proto::encode_request(&mut disc, 0, proto::CMD_DISC, 0, 0, 0);
                // SAFETY: sends 28 bytes from a live local buffer on our open socket;
                // MSG_DONTWAIT: a full socket buffer must not block the drop.
                unsafe {
                    libc::send(
                        s.as_raw_fd(),
                        disc.as_ptr().cast(),
                        disc.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                };
            }
            // SAFETY: shutdown takes only integers; the descriptor is open.
            unsafe { libc::shutdown(s.as_raw_fd(), libc::SHUT_RDWR) };
        }
        // Wait until the kernel has returned every operation: a receive may be writing
        // into a guest buffer, a send reading one.
        let _ = self.submit_pushed();
        while self.in_ring > 0 {
            let unsubmitted = u32::try_from(self.ring.submission().len()).unwrap_or(u32::MAX);
            if self.in_ring <= unsubmitted {
                break;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "waiting for NBD operations at queue drop");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            let seen = u32::try_from(self.ring.completion().count()).unwrap_or(u32::MAX);
            self.in_ring = self.in_ring.saturating_sub(seen);
        }
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
