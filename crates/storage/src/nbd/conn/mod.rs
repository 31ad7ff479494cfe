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
//! - **Completions** reach the reactor through the ring's own descriptor: it is the
//!   queue's completion fd, readable (level-triggered) while CQEs wait, so `reap` needs no
//!   system call to clear it and a CQE consumed in `commit` (a send completing during
//!   its own submission) costs no later wake-up. Wake-ups with no CQE of their own (the
//!   reconnect helper's attempts, completions made without the server) write the
//!   queue's eventfd, on which a multishot `IORING_OP_POLL_ADD` waits in the ring, so
//!   they arrive as a CQE too. `reap` processes CQEs, arms the next send/receive, and
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
//!
//! This module owns the queue, its ring and the `StorageQueue` face; by concern:
//! [`slot`] (an operation's state), [`command`] (request encoding, reply meaning),
//! [`wire`] (sending, receiving, reply parsing), [`reconnect`] (loss and reconnection).
//! The handshake is [`super::handshake`].

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};

mod command;
mod reconnect;
mod slot;
mod wire;

use super::proto;
use super::uri::NbdUri;
use crate::iovec::IoVec;
use crate::{
    validate, Completion, StorageError, StorageInfo, StorageOp, StorageQueue, SubmitError,
};
use eventfd::EventFd;
use reconnect::{spawn_reconnect, Outage, Reconnect};
use slot::{Op, Slot};
use wire::{RecvKind, RecvState};

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
/// The multishot poll on the queue's eventfd (not counted in `in_ring`: it refers to no
/// memory of ours and goes with the ring).
const UD_WAKE: u64 = 3;

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
    /// SQEs pushed whose CQE has not been seen (sends and receives).
    in_ring: u32,
    /// The multishot poll on `eventfd` is in the ring.
    wake_armed: bool,
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
        let mut queue = NbdQueue {
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
            wake_armed: false,
            lost: None,
            reconnect: Reconnect::new(),
            next_order: 0,
            next_seq: 1,
            cqes: Vec::with_capacity(16),
            resend: Vec::with_capacity(depth as usize),
        };
        // Armed before anyone can write the eventfd (a poll armed later would still see
        // the count, but nothing would enter the ring to arm it).
        if queue.arm_wake() {
            queue.submit_pushed().map_err(StorageError::Ring)?;
        }
        Ok(queue)
    }

    /// Puts the multishot poll on the eventfd into the ring if it is not there. Returns
    /// true if an SQE was pushed.
    fn arm_wake(&mut self) -> bool {
        if self.wake_armed {
            return false;
        }
        let entry = opcode::PollAdd::new(types::Fd(self.eventfd.as_raw_fd()), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(UD_WAKE);
        // SAFETY: a poll refers to no memory, only to the eventfd, which the ring keeps
        // open while the poll is armed.
        self.wake_armed = unsafe { self.ring.submission().push(&entry) }.is_ok();
        self.wake_armed
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

    /// Moves the connection along: after a loss, close/reconnect/expire; when connected,
    /// arm the next receive and send. Returns true if SQEs were pushed.
    fn service(&mut self) -> bool {
        let armed = self.arm_wake();
        if let Some(outage) = &self.lost {
            let since = outage.since;
            if self.in_ring > 0 {
                return armed;
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
                    return armed;
                }
            }
        }
        let mut pushed = armed;
        if self.recv_busy.is_none() {
            pushed |= self.push_recv();
        }
        if self.send_busy == 0 && !self.send_queue.is_empty() {
            pushed |= self.push_send();
        }
        pushed
    }

    /// Processes every CQE. Returns how many there were.
    fn process_cqes(&mut self) -> usize {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        let (mut woken, mut rearm) = (0, false);
        cqes.extend(self.ring.completion().filter_map(|c| {
            if c.user_data() == UD_WAKE {
                woken += 1;
                rearm |= !io_uring::cqueue::more(c.flags());
                None
            } else {
                Some((c.user_data(), c.result()))
            }
        }));
        if woken > 0 {
            // Consumed, so that a poll armed again does not fire for the same writes; a
            // write after this fires the poll again.
            self.eventfd.drain();
        }
        if rearm {
            self.wake_armed = false;
        }
        for &(ud, res) in &cqes {
            self.in_ring = self.in_ring.saturating_sub(1);
            match ud {
                UD_SEND => self.on_send(res),
                UD_RECV => self.on_recv(res),
                other => tracing::error!(user_data = other, "CQE with a foreign user_data"),
            }
        }
        let n = cqes.len() + woken;
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
    /// The eventfd that wakes this queue's completion fd (see the module documentation).
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
        self.ring.as_fd()
    }

    fn wake(&self) -> io::Result<()> {
        self.eventfd.signal()
    }

    fn reap(&mut self, f: Completion<'_>) -> usize {
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
            // The wake poll may be one of them; counting it as ours errs on the side of
            // waiting (the socket is shut down, so our operations come back at once).
            let unsubmitted = unsubmitted.saturating_sub(u32::from(self.wake_armed));
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
            let seen = self
                .ring
                .completion()
                .filter(|c| c.user_data() != UD_WAKE)
                .count();
            let seen = u32::try_from(seen).unwrap_or(u32::MAX);
            self.in_ring = self.in_ring.saturating_sub(seen);
        }
    }
}
