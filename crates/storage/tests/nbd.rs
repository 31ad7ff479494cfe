//! The NBD backend against real servers (qemu-nbd, nbdkit) on unix sockets and loopback
//! TCP, and against a hostile one written here.

mod common;

use std::io;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{filled, pattern_byte, pattern_file, read_back, run_one, wait_for};
use storage::nbd::proto;
use storage::nbd::testing::{Listen, NbdServer};
use storage::{AlignedBuf, NbdConfig, NbdStorage, Storage, StorageKind, StorageOp, StorageQueue};

const MIB: usize = 1 << 20;

fn open(uri: &str) -> NbdStorage {
    NbdStorage::open(uri, NbdConfig::default()).unwrap_or_else(|e| panic!("{uri}: {e}"))
}

fn sock(dir: &Path, name: &str) -> Listen {
    Listen::Unix(dir.join(name))
}

fn write_at(q: &mut dyn StorageQueue, offset: u64, data: &mut AlignedBuf, fua: bool) {
    let iov = [data.full_iovec()];
    // SAFETY: `data` outlives the operation.
    let res = unsafe {
        run_one(
            q,
            StorageOp::Write {
                offset,
                iov: &iov,
                fua,
            },
        )
    }
    .unwrap();
    assert_eq!(res.unwrap(), data.len() as u64);
}

fn file_bytes(path: &Path, offset: usize, len: usize) -> Vec<u8> {
    std::fs::read(path).unwrap()[offset..offset + len].to_vec()
}

#[test]
fn qemu_nbd_over_a_unix_socket_reads_writes_flushes_and_discards() {
    let dir = tempfile::tempdir().unwrap();
    let (img, data) = pattern_file(dir.path(), "disk.img", 16 * MIB);
    let _server = NbdServer::qemu_nbd(&img, sock(dir.path(), "s"), &[]).unwrap();
    let s = open(&_server.uri(""));
    let info = s.info();
    assert_eq!(info.kind, StorageKind::Nbd);
    assert_eq!(info.size_bytes, 16 * MIB as u64);
    assert_eq!(
        (info.logical_block_size, info.physical_block_size),
        (512, 4096)
    );
    assert!(info.flush && info.discard && !info.read_only && !info.secure_discard);
    // qemu-nbd serves one client by default and so does not advertise multi-conn.
    assert!(!s.multi_conn());
    let mut q = s.open_queue(32).unwrap();

    assert_eq!(read_back(&mut *q, 4096, 8192), data[4096..4096 + 8192]);

    // A write from three buffers, FUA, lands in the image in order.
    let mut a = filled(4096, 1);
    let mut b = filled(8192, 2);
    let mut c = filled(512, 3);
    let iov = [a.full_iovec(), b.full_iovec(), c.full_iovec()];
    // SAFETY: the buffers outlive the operation.
    let res = unsafe {
        run_one(
            &mut *q,
            StorageOp::Write {
                offset: MIB as u64,
                iov: &iov,
                fua: true,
            },
        )
    };
    assert_eq!(res.unwrap().unwrap(), 12800);
    let expected: Vec<u8> = [a.as_slice(), b.as_slice(), c.as_slice()].concat();
    assert_eq!(read_back(&mut *q, MIB as u64, 12800), expected);
    // SAFETY: no buffers.
    let flushed = unsafe { run_one(&mut *q, StorageOp::Flush) };
    assert_eq!(flushed.unwrap().unwrap(), 0);
    assert_eq!(file_bytes(&img, MIB, 12800), expected);

    // Discard (trim, punched by qemu-nbd --discard=unmap) reads back as zeros.
    let discard = StorageOp::Discard {
        offset: 2 * MIB as u64,
        len: 65536,
        secure: false,
    };
    // SAFETY: no buffers.
    let discarded = unsafe { run_one(&mut *q, discard) };
    assert_eq!(discarded.unwrap().unwrap(), 65536);
    assert!(read_back(&mut *q, 2 * MIB as u64, 65536)
        .iter()
        .all(|&x| x == 0));

    // Beyond the end is refused before it reaches the server.
    let mut buf = AlignedBuf::page_aligned(4096);
    let iov = [buf.full_iovec()];
    // SAFETY: refused at submission; nothing refers to `buf` afterwards.
    let refused = unsafe {
        q.submit(
            StorageOp::Read {
                offset: 16 * MIB as u64,
                iov: &iov,
            },
            1,
        )
    };
    assert!(refused.is_err());
}

/// Random reads and writes, up to 32 in flight, over loopback TCP, checked against a
/// model of the disk; includes 1 MiB transfers spanning many iovecs.
#[test]
fn qd32_random_io_over_tcp_matches_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let size = 32 * MIB;
    let (img, mut model) = pattern_file(dir.path(), "disk.img", size);
    let server = NbdServer::qemu_nbd(&img, Listen::free_tcp().unwrap(), &[]).unwrap();
    let s = open(&server.uri(""));
    let mut q = s.open_queue(32).unwrap();

    struct Op {
        write: bool,
        offset: usize,
        buf: AlignedBuf,
    }
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut pending: Vec<Option<Op>> = (0..32).map(|_| None).collect();
    let mut issued = 0;
    let mut finished = 0;
    let total = 1500;
    // Overlapping writes in flight would make the model ambiguous: regions are private
    // to one in-flight operation.
    let busy = |pending: &Vec<Option<Op>>, off: usize, len: usize| {
        pending
            .iter()
            .flatten()
            .any(|o| off < o.offset + o.buf.len() && o.offset < off + len)
    };
    while finished < total {
        while issued < total {
            let Some(tag) = pending.iter().position(Option::is_none) else {
                break;
            };
            let len = if next() % 16 == 0 {
                MIB
            } else {
                512 * (1 + (next() % 64) as usize)
            };
            let offset = 512 * (next() as usize % ((size - len) / 512));
            if busy(&pending, offset, len) {
                break;
            }
            let write = next() % 2 == 0;
            let mut buf = if write {
                filled(len, next() as u8)
            } else {
                AlignedBuf::page_aligned(len)
            };
            // Split into 4 KiB iovecs, as guest pages are.
            let iov: Vec<libc::iovec> = (0..len)
                .step_by(4096)
                .map(|at| buf.iovec(at..(at + 4096).min(len)))
                .collect();
            let op = if write {
                StorageOp::Write {
                    offset: offset as u64,
                    iov: &iov,
                    fua: false,
                }
            } else {
                StorageOp::Read {
                    offset: offset as u64,
                    iov: &iov,
                }
            };
            // SAFETY: `buf` moves into `pending` (its heap memory does not move) and stays
            // there until the completion is reaped.
            unsafe { q.submit(op, tag as u64) }.unwrap();
            pending[tag] = Some(Op { write, offset, buf });
            issued += 1;
        }
        q.commit().unwrap();
        for (tag, res) in wait_for(&mut *q, 1) {
            let op = pending[tag as usize].take().unwrap();
            assert_eq!(res.unwrap(), op.buf.len() as u64);
            let range = op.offset..op.offset + op.buf.len();
            if op.write {
                model[range].copy_from_slice(op.buf.as_slice());
            } else {
                assert!(
                    model[range] == *op.buf.as_slice(),
                    "read at {} differs",
                    op.offset
                );
            }
            finished += 1;
        }
    }
    // SAFETY: no buffers.
    unsafe { run_one(&mut *q, StorageOp::Flush) }
        .unwrap()
        .unwrap();
    assert!(std::fs::read(&img).unwrap() == model);
}

#[test]
fn nbdkit_memory_gives_each_queue_its_own_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = NbdServer::nbdkit(sock(dir.path(), "s"), &["memory", "size=8M"]).unwrap();
    let s = open(&server.uri(""));
    assert!(s.multi_conn());
    assert_eq!(s.info().size_bytes, 8 * MIB as u64);
    let mut q1 = s.open_queue(8).unwrap();
    let mut q2 = s.open_queue(8).unwrap();
    let mut data = filled(65536, 9);
    write_at(&mut *q1, 4096, &mut data, false);
    // SAFETY: no buffers.
    unsafe { run_one(&mut *q1, StorageOp::Flush) }
        .unwrap()
        .unwrap();
    assert_eq!(read_back(&mut *q2, 4096, 65536), data.as_slice());
    drop(q1);
    assert_eq!(read_back(&mut *q2, 4096, 4096), data.as_slice()[..4096]);
}

/// qemu-nbd's default allows one client: every queue must share one connection (a
/// second one would wait for ever; the short timeout makes that fail fast).
#[test]
fn queues_share_one_connection_without_multi_conn() {
    let dir = tempfile::tempdir().unwrap();
    let (img, data) = pattern_file(dir.path(), "disk.img", 8 * MIB);
    let server = NbdServer::qemu_nbd(&img, sock(dir.path(), "s"), &[]).unwrap();
    let config = NbdConfig {
        connect_timeout: Duration::from_secs(2),
        ..NbdConfig::default()
    };
    let s = NbdStorage::open(&server.uri(""), config).unwrap();
    let queues: Vec<_> = (0..3).map(|_| s.open_queue(16).unwrap()).collect();
    let threads: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(i, mut q)| {
            let data = data.clone();
            std::thread::spawn(move || {
                let base = (i * 2 * MIB) as u64;
                for round in 0..20u64 {
                    let at = base + round * 65536;
                    let mut w = filled(65536, (i as u8) * 50 + round as u8);
                    write_at(&mut *q, at, &mut w, round % 5 == 0);
                    assert_eq!(read_back(&mut *q, at, 65536), w.as_slice());
                    let other = (6 * MIB as u64) + round * 4096;
                    let r = read_back(&mut *q, other, 4096);
                    assert_eq!(r, data[other as usize..other as usize + 4096]);
                }
                q
            })
        })
        .collect();
    let mut queues: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();

    // A queue dropped with reads in flight does not disturb the others.
    let mut victim = queues.pop().unwrap();
    let mut bufs: Vec<AlignedBuf> = (0..8).map(|_| AlignedBuf::page_aligned(65536)).collect();
    for (i, b) in bufs.iter_mut().enumerate() {
        let iov = [b.full_iovec()];
        // SAFETY: dropping the queue below waits until the kernel is done with `bufs`,
        // which outlive it.
        unsafe {
            victim.submit(
                StorageOp::Read {
                    offset: (i * 65536) as u64,
                    iov: &iov,
                },
                i as u64,
            )
        }
        .unwrap();
    }
    victim.commit().unwrap();
    drop(victim);
    drop(bufs);
    let q = &mut queues[0];
    assert_eq!(
        read_back(&mut **q, 7 * MIB as u64, 8192),
        data[7 * MIB..7 * MIB + 8192]
    );
}

fn error_filter_server(dir: &Path, trigger: &Path) -> NbdServer {
    let file = format!("error-pread-file={}", trigger.display());
    NbdServer::nbdkit(
        sock(dir, "s"),
        &[
            "--filter=error",
            "memory",
            "size=4M",
            "error-pread=EIO",
            "error-pread-rate=100%",
            &file,
        ],
    )
    .unwrap()
}

/// nbdkit's error filter fails reads while its trigger file exists: exactly those
/// requests fail, the writes beside them succeed, and the connection stays up.
#[test]
fn injected_errors_fail_only_their_requests() {
    let dir = tempfile::tempdir().unwrap();
    let trigger = dir.path().join("fail-reads");
    let server = error_filter_server(dir.path(), &trigger);
    let s = open(&server.uri(""));
    let mut q = s.open_queue(32).unwrap();
    let mut writes: Vec<AlignedBuf> = (0..8).map(|i| filled(4096, i)).collect();
    let mut reads: Vec<AlignedBuf> = (0..8).map(|_| AlignedBuf::page_aligned(4096)).collect();
    std::fs::write(&trigger, b"").unwrap();
    for (i, w) in writes.iter_mut().enumerate() {
        let iov = [w.full_iovec()];
        // SAFETY: the buffers outlive the completions awaited below.
        unsafe {
            q.submit(
                StorageOp::Write {
                    offset: (i * 4096) as u64,
                    iov: &iov,
                    fua: false,
                },
                i as u64,
            )
        }
        .unwrap();
    }
    for (i, r) in reads.iter_mut().enumerate() {
        let iov = [r.full_iovec()];
        // SAFETY: as above.
        unsafe {
            q.submit(
                StorageOp::Read {
                    offset: (65536 + i * 4096) as u64,
                    iov: &iov,
                },
                100 + i as u64,
            )
        }
        .unwrap();
    }
    q.commit().unwrap();
    let done = wait_for(&mut *q, 16);
    for (tag, res) in done {
        if tag < 100 {
            assert_eq!(res.unwrap(), 4096, "write {tag}");
        } else {
            let e = res.expect_err("read under the error filter");
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "read {tag}: {e}");
        }
    }
    std::fs::remove_file(&trigger).unwrap();
    // The same connection serves the data written meanwhile.
    for (i, w) in writes.iter().enumerate() {
        assert_eq!(read_back(&mut *q, (i * 4096) as u64, 4096), w.as_slice());
    }
}

/// A server that holds every request for seconds, so they are in flight when it dies.
fn slow_server(dir: &Path, img: &Path) -> NbdServer {
    let file = format!("file={}", img.display());
    NbdServer::nbdkit(
        sock(dir, "s"),
        &["--filter=delay", "file", &file, "rdelay=10", "wdelay=10"],
    )
    .unwrap()
}

/// Killed mid-I/O and restarted (here as qemu-nbd on the same socket and image): the
/// requests in flight are resent and succeed; nothing fails.
#[test]
fn server_killed_mid_io_and_restarted_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (img, data) = pattern_file(dir.path(), "disk.img", 4 * MIB);
    let mut server = slow_server(dir.path(), &img);
    let s = open(&server.uri(""));
    let mut q = s.open_queue(16).unwrap();
    let mut writes: Vec<AlignedBuf> = (0..4).map(|i| filled(65536, 40 + i)).collect();
    let mut reads: Vec<AlignedBuf> = (0..4).map(|_| AlignedBuf::page_aligned(65536)).collect();
    for (i, w) in writes.iter_mut().enumerate() {
        let iov = [w.full_iovec()];
        // SAFETY: the buffers outlive the completions awaited below.
        unsafe {
            q.submit(
                StorageOp::Write {
                    offset: (i * 65536) as u64,
                    iov: &iov,
                    fua: false,
                },
                i as u64,
            )
        }
        .unwrap();
    }
    for (i, r) in reads.iter_mut().enumerate() {
        let iov = [r.full_iovec()];
        // SAFETY: as above.
        unsafe {
            q.submit(
                StorageOp::Read {
                    offset: (MIB + i * 65536) as u64,
                    iov: &iov,
                },
                10 + i as u64,
            )
        }
        .unwrap();
    }
    q.commit().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut early = Vec::new();
    q.reap(&mut |tag, res| early.push((tag, res.is_ok())));
    assert!(
        early.is_empty(),
        "the delay filter holds every request: {early:?}"
    );
    server.kill();
    std::thread::sleep(Duration::from_millis(300));
    let _restarted = NbdServer::qemu_nbd(&img, server.listen.clone(), &[]).unwrap();
    let done = wait_for(&mut *q, 8);
    for (tag, res) in done {
        assert_eq!(res.unwrap_or_else(|e| panic!("op {tag}: {e}")), 65536);
    }
    for (i, r) in reads.iter().enumerate() {
        let at = MIB + i * 65536;
        assert!(r.as_slice() == &data[at..at + 65536], "read {i}");
    }
    // SAFETY: no buffers.
    unsafe { run_one(&mut *q, StorageOp::Flush) }
        .unwrap()
        .unwrap();
    for (i, w) in writes.iter().enumerate() {
        assert!(
            file_bytes(&img, i * 65536, 65536) == w.as_slice(),
            "write {i}"
        );
    }
}

/// Killed and not restarted: requests fail with EIO once they have waited the reconnect
/// bound, not before; a server that comes back later serves new requests again.
#[test]
fn server_gone_fails_requests_after_the_bound_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let (img, data) = pattern_file(dir.path(), "disk.img", MIB);
    let mut server = slow_server(dir.path(), &img);
    let bound = Duration::from_millis(1500);
    let config = NbdConfig {
        reconnect_timeout: bound,
        ..NbdConfig::default()
    };
    let s = NbdStorage::open(&server.uri(""), config).unwrap();
    let mut q = s.open_queue(8).unwrap();
    let mut bufs: Vec<AlignedBuf> = (0..4).map(|_| AlignedBuf::page_aligned(4096)).collect();
    for (i, b) in bufs.iter_mut().enumerate() {
        let iov = [b.full_iovec()];
        // SAFETY: the buffers outlive the completions awaited below.
        unsafe {
            q.submit(
                StorageOp::Read {
                    offset: (i * 4096) as u64,
                    iov: &iov,
                },
                i as u64,
            )
        }
        .unwrap();
    }
    q.commit().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let killed = Instant::now();
    server.kill();
    let done = wait_for(&mut *q, 4);
    let waited = killed.elapsed();
    for (tag, res) in done {
        let e = res.expect_err("no server");
        assert_eq!(e.raw_os_error(), Some(libc::EIO), "op {tag}: {e}");
    }
    assert!(
        waited >= bound - Duration::from_millis(100),
        "failed after {waited:?}, before the bound"
    );
    assert!(
        waited < bound + Duration::from_secs(3),
        "failed only after {waited:?}"
    );

    // Back again: new requests succeed on a new connection.
    let _back = NbdServer::qemu_nbd(&img, server.listen.clone(), &[]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut b = AlignedBuf::page_aligned(4096);
        let iov = [b.full_iovec()];
        // SAFETY: `b` outlives the operation.
        let res = unsafe {
            run_one(
                &mut *q,
                StorageOp::Read {
                    offset: 8192,
                    iov: &iov,
                },
            )
        }
        .unwrap();
        if res.is_ok() {
            assert_eq!(b.as_slice(), &data[8192..12288]);
            break;
        }
        assert!(Instant::now() < deadline, "never recovered");
    }
}

/// Serves the handshake properly, then answers every request with `reply`.
fn hostile_server(path: PathBuf, reply: Vec<u8>) {
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            let reply = reply.clone();
            std::thread::spawn(move || -> io::Result<()> {
                let mut g = proto::NBD_MAGIC.to_be_bytes().to_vec();
                g.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
                g.extend_from_slice(&3u16.to_be_bytes());
                c.write_all(&g)?;
                let mut head = [0u8; 4 + 16];
                c.read_exact(&mut head)?;
                let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
                let mut opt = vec![0u8; len];
                c.read_exact(&mut opt)?;
                let mut info = vec![0u8, 0];
                info.extend_from_slice(&(MIB as u64).to_be_bytes());
                info.extend_from_slice(
                    &(proto::TFLAG_HAS_FLAGS | proto::TFLAG_SEND_FLUSH).to_be_bytes(),
                );
                for (ty, payload) in [(proto::REP_INFO, info), (proto::REP_ACK, Vec::new())] {
                    let mut r = proto::OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
                    r.extend_from_slice(&proto::OPT_GO.to_be_bytes());
                    r.extend_from_slice(&ty.to_be_bytes());
                    r.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                    r.extend_from_slice(&payload);
                    c.write_all(&r)?;
                }
                let mut req = [0u8; proto::REQUEST_LEN];
                loop {
                    c.read_exact(&mut req)?;
                    c.write_all(&reply)?;
                }
            });
        }
    });
}

/// Garbage, forged handles, unrequested structured replies: each drops the connection
/// (no panic, no hang); with a server that keeps doing it, the request fails after the
/// bound.
#[test]
fn hostile_replies_fail_the_request_not_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let mut forged = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    forged.extend_from_slice(&0u32.to_be_bytes());
    forged.extend_from_slice(&0xdead_0000_0007u64.to_be_bytes());
    let mut structured = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    structured.extend_from_slice(&[0, 1, 0, 1]);
    structured.extend_from_slice(&(1u64 << 32).to_be_bytes());
    structured.extend_from_slice(&u32::MAX.to_be_bytes());
    for (name, reply) in [
        ("garbage", vec![0xffu8; 64]),
        ("forged", forged),
        ("structured", structured),
    ] {
        let path = dir.path().join(name);
        hostile_server(path.clone(), reply);
        let config = NbdConfig {
            reconnect_timeout: Duration::from_millis(400),
            ..NbdConfig::default()
        };
        let s =
            NbdStorage::open(&format!("nbd+unix:///?socket={}", path.display()), config).unwrap();
        let mut q = s.open_queue(4).unwrap();
        let mut b = AlignedBuf::page_aligned(4096);
        let iov = [b.full_iovec()];
        // SAFETY: `b` outlives the operation.
        let res = unsafe {
            run_one(
                &mut *q,
                StorageOp::Read {
                    offset: 0,
                    iov: &iov,
                },
            )
        }
        .unwrap();
        assert_eq!(res.unwrap_err().raw_os_error(), Some(libc::EIO), "{name}");
        // Flush works the same way (no payload in either direction).
        // SAFETY: no buffers.
        let res = unsafe { run_one(&mut *q, StorageOp::Flush) }.unwrap();
        assert!(res.is_err(), "{name}");
    }
}

#[test]
fn bad_targets_fail_to_open_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("nbd+unix:///x?socket={}", dir.path().join("none").display());
    let e = NbdStorage::open(&missing, NbdConfig::default()).unwrap_err();
    assert!(e.to_string().contains("No such file"), "{e}");
    let server = NbdServer::nbdkit(sock(dir.path(), "s"), &["memory", "size=1M"]).unwrap();
    // nbdkit serves any export name; qemu-nbd refuses unknown ones.
    let (img, _) = pattern_file(dir.path(), "img", MIB);
    let q = NbdServer::qemu_nbd(&img, sock(dir.path(), "q"), &["-x", "disk"]).unwrap();
    let e = NbdStorage::open(&q.uri("other"), NbdConfig::default()).unwrap_err();
    assert!(e.to_string().contains("no such export"), "{e}");
    assert_eq!(open(&q.uri("disk")).info().size_bytes, MIB as u64);
    let e = NbdStorage::open("nbds://h/x", NbdConfig::default()).unwrap_err();
    assert!(e.to_string().contains("not supported"), "{e}");
    drop(server);
    let _ = pattern_byte(0);
}
