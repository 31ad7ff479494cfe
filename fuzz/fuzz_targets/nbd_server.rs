//! An NBD server that answers the transmission phase with what the fuzzer chose:
//! `NbdStorage::open` over a unix socket (a well-formed handshake), then a real queue
//! (io_uring sends and receives, `parse_replies`, handle matching, read data received
//! straight into the caller's buffers) whose every request is answered by a scripted
//! reply: correct, with an error, for another handle, a structured chunk, a reply cut
//! short, raw bytes, or nothing. When the script ends, or no request comes for 200 ms,
//! the server hangs up and refuses reconnects, so whatever is in flight fails after the
//! (short) reconnect timeout.
//!
//! Checked: no panic, memory safety (ASan), every operation completes (no hang), a read
//! or write that succeeds transfers exactly its length.

#![no_main]

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use storage::nbd::proto;
use storage::{AlignedBuf, NbdConfig, NbdStorage, Storage, StorageOp, StorageQueue};

#[derive(Debug, Arbitrary)]
enum Reply {
    /// A simple reply to the request (read data follows when `error` is 0).
    Simple {
        error: u8,
    },
    /// A simple reply with a handle of our choosing.
    Handle {
        handle: u64,
        error: u8,
    },
    /// A structured reply chunk (never negotiated).
    Structured {
        flags: u16,
        kind: u16,
        payload: Vec<u8>,
    },
    /// The right header and only part of the read data, then the hang-up.
    Short(u16),
    Raw(Vec<u8>),
    Nothing,
}

#[derive(Debug, Arbitrary)]
enum Op {
    Read { sector: u16, sectors: u8 },
    Write { sector: u16, sectors: u8 },
    Flush,
    Trim { sector: u16, sectors: u8 },
}

#[derive(Debug, Arbitrary)]
struct Input {
    flags: u16,
    ops: Vec<Op>,
    replies: Vec<Reply>,
}

const SIZE: u64 = 1 << 20;

fn socket_path() -> PathBuf {
    PathBuf::from(format!(
        "/dev/shm/xenblkd-fuzz-nbd-{}.sock",
        std::process::id()
    ))
}

fn handshake(s: &mut UnixStream, flags: u16) -> std::io::Result<()> {
    let mut g = proto::NBD_MAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&g)?;
    let mut b = [0u8; 4 + 16];
    s.read_exact(&mut b)?;
    let len = u32::from_be_bytes([b[16], b[17], b[18], b[19]]);
    let option = u32::from_be_bytes([b[12], b[13], b[14], b[15]]);
    std::io::copy(&mut s.take(u64::from(len)), &mut std::io::sink())?;
    let reply = |kind: u32, payload: &[u8]| {
        let mut r = proto::OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&option.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        r.extend_from_slice(payload);
        r
    };
    let mut info = proto::INFO_EXPORT.to_be_bytes().to_vec();
    info.extend_from_slice(&SIZE.to_be_bytes());
    info.extend_from_slice(&(flags | proto::TFLAG_HAS_FLAGS).to_be_bytes());
    s.write_all(&reply(proto::REP_INFO, &info))?;
    s.write_all(&reply(proto::REP_ACK, &[]))
}

fn serve(listener: UnixListener, flags: u16, replies: Vec<Reply>) {
    let Ok((mut s, _)) = listener.accept() else {
        return;
    };
    drop(listener);
    if handshake(&mut s, flags).is_err() {
        return;
    }
    // A client with nothing more to send: hang up rather than wait for it (a connected
    // server that never answers makes the client wait, as it should; that is no finding).
    let _ = s.set_read_timeout(Some(std::time::Duration::from_millis(200)));
    for reply in replies.iter().take(32) {
        let mut req = [0u8; proto::REQUEST_LEN];
        if s.read_exact(&mut req).is_err() {
            return;
        }
        let command = u16::from_be_bytes([req[6], req[7]]);
        let handle = u64::from_be_bytes(req[8..16].try_into().unwrap_or_default());
        let len = u32::from_be_bytes([req[24], req[25], req[26], req[27]]);
        if command == proto::CMD_WRITE
            && std::io::copy(&mut (&s).take(u64::from(len)), &mut std::io::sink()).is_err()
        {
            return;
        }
        let simple = |error: u32, handle: u64| {
            let mut r = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
            r.extend_from_slice(&error.to_be_bytes());
            r.extend_from_slice(&handle.to_be_bytes());
            r
        };
        let data = |n: usize| vec![0xa5u8; n];
        let bytes = match reply {
            Reply::Simple { error } => {
                let mut r = simple(u32::from(*error % 30), handle);
                if *error % 30 == 0 && command == proto::CMD_READ {
                    r.extend(data(len as usize));
                }
                r
            }
            Reply::Handle { handle, error } => simple(u32::from(*error % 30), *handle),
            Reply::Structured {
                flags,
                kind,
                payload,
            } => {
                let mut r = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
                r.extend_from_slice(&flags.to_be_bytes());
                r.extend_from_slice(&kind.to_be_bytes());
                r.extend_from_slice(&handle.to_be_bytes());
                r.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                r.extend_from_slice(payload);
                r
            }
            Reply::Short(n) => {
                let mut r = simple(0, handle);
                r.extend(data(usize::from(*n).min(len as usize)));
                let _ = s.write_all(&r);
                return;
            }
            Reply::Raw(b) => b.clone(),
            Reply::Nothing => Vec::new(),
        };
        if s.write_all(&bytes).is_err() {
            return;
        }
    }
}

fn drain(q: &mut dyn StorageQueue, done: &mut Vec<(u64, std::io::Result<u64>)>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while q.in_flight() > 0 {
        assert!(Instant::now() < deadline, "the queue hung");
        let mut pfd = libc::pollfd {
            fd: q.completion_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, 50) };
        q.reap(&mut |tag, res| done.push((tag, res)));
    }
}

fuzz_target!(|input: Input| {
    let path = socket_path();
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind");
    let flags = input.flags & !proto::TFLAG_READ_ONLY;
    let server = std::thread::spawn(move || serve(listener, flags, input.replies));
    let uri = format!("nbd+unix:///export?socket={}", path.display());
    let config = NbdConfig {
        read_only: false,
        connect_timeout: Duration::from_secs(5),
        reconnect_timeout: Duration::from_millis(50),
    };
    let storage = NbdStorage::open(&uri, config);
    // Reconnects find nobody.
    let _ = std::fs::remove_file(&path);
    let Ok(storage) = storage else {
        let _ = server.join();
        return;
    };
    let info = storage.info();
    let Ok(mut q) = storage.open_queue(8) else {
        let _ = server.join();
        return;
    };
    let mut bufs: Vec<AlignedBuf> = Vec::new();
    let mut expect: Vec<(u64, u64)> = Vec::new();
    for (i, op) in input.ops.iter().take(16).enumerate() {
        let tag = i as u64;
        let range = |sector: u16, sectors: u8| {
            (
                u64::from(sector) * 512 % SIZE,
                (u64::from(sectors) % 64 + 1) * 512,
            )
        };
        // SAFETY: every buffer lives in `bufs` until `drain` has seen all completions.
        let submitted = unsafe {
            match *op {
                Op::Read { sector, sectors } | Op::Write { sector, sectors } => {
                    let (offset, len) = range(sector, sectors);
                    let mut b = AlignedBuf::page_aligned(len as usize);
                    let iov = [b.full_iovec()];
                    bufs.push(b);
                    let op = if matches!(op, Op::Read { .. }) {
                        StorageOp::Read { offset, iov: &iov }
                    } else {
                        StorageOp::Write {
                            offset,
                            iov: &iov,
                            fua: false,
                        }
                    };
                    expect.push((tag, len));
                    q.submit(op, tag)
                }
                Op::Flush => q.submit(StorageOp::Flush, tag),
                Op::Trim { sector, sectors } => {
                    let (offset, len) = range(sector, sectors);
                    q.submit(
                        StorageOp::Discard {
                            offset,
                            len,
                            secure: false,
                        },
                        tag,
                    )
                }
            }
        };
        if submitted.is_err() {
            expect.retain(|e| e.0 != tag);
        }
        if q.in_flight() >= q.depth() {
            let _ = q.commit();
            let mut done = Vec::new();
            drain(q.as_mut(), &mut done);
            check(&done, &expect);
        }
    }
    let _ = q.commit();
    let mut done = Vec::new();
    drain(q.as_mut(), &mut done);
    check(&done, &expect);
    assert!(info.size_bytes <= SIZE);
    drop(q);
    drop(bufs);
    drop(storage);
    let _ = server.join();
});

fn check(done: &[(u64, std::io::Result<u64>)], expect: &[(u64, u64)]) {
    for (tag, res) in done {
        if let (Some(&(_, len)), Ok(n)) = (expect.iter().find(|e| e.0 == *tag), res) {
            assert_eq!(*n, len, "a transfer of the wrong length succeeded");
        }
    }
}
