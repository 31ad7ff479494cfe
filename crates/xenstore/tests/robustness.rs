//! Hostile and misbehaving peers: quotas, bounded event queues on both
//! sides, a connection that never reads, malformed messages to the server,
//! and a malicious "daemon" talking to the client.

mod common;

use std::io::{ErrorKind, Write};
use std::os::unix::net::UnixListener;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

use common::{closed_by_peer, error_name, ev, recv_raw, roundtrip, send_raw, Harness, TIMEOUT};
use xenstore::wire::{self, Header, MsgType, PAYLOAD_MAX};
use xenstore::{ClientConfig, Errno, Error, ServerConfig, Transport, XsClient, XsOps};

#[test]
fn node_and_value_quotas() {
    let h = Harness::with_config(ServerConfig {
        max_nodes_per_domain: 8,
        max_value_size: 64,
        max_watches_per_connection: 3,
        ..ServerConfig::default()
    });
    let dom0 = h.client(0);
    h.make_home(&dom0, 5);
    let guest = h.client(5);

    assert!(matches!(
        guest.write("v", [b'x'; 65]),
        Err(Error::Xs(Errno::E2big))
    ));
    guest.write("v", [b'x'; 64]).unwrap();
    // home + v = 2; six more fit.
    for i in 0..6 {
        guest.write(&format!("n{i}"), "").unwrap();
    }
    let e = guest.write("one-too-many", "").unwrap_err();
    assert!(matches!(e, Error::Xs(Errno::Equota)));
    assert!(e.errno().unwrap().is_quota());
    // Creating parents counts every new node.
    guest.rm("n0").unwrap();
    assert!(matches!(
        guest.write("a/b", ""),
        Err(Error::Xs(Errno::Equota))
    ));
    guest.write("a", "").unwrap();
    // dom0 is exempt from both quotas.
    dom0.write("/big", vec![b'y'; 4000]).unwrap();
    for i in 0..20 {
        dom0.write(&format!("/many/{i}"), "").unwrap();
    }
    // Watches per connection.
    for i in 0..3 {
        guest.watch(&format!("w{i}"), "t").unwrap();
    }
    assert!(matches!(
        guest.watch("w9", "t"),
        Err(Error::Xs(Errno::E2big))
    ));
}

#[test]
fn server_event_queue_is_bounded_for_a_reader_that_stalls() {
    const LIMIT: usize = 16;
    let h = Harness::with_config(ServerConfig {
        max_queued_watch_events: LIMIT,
        ..ServerConfig::default()
    });
    // A watcher that registers and then never reads anything again.
    let mut stalled = h.raw(0);
    let reply = roundtrip(&mut stalled, MsgType::Watch, 1, b"/\0stall\0");
    assert_eq!(reply.header.ty, MsgType::Watch.as_u32());

    // Long paths make each event about 1 KiB, so the kernel's socket buffer
    // fills after a few hundred at most and the server queue has to absorb
    // (and drop) the rest. The writer is never blocked by the stalled peer.
    let writer = h.client(0);
    let path = format!("/{}", "p".repeat(1000));
    const WRITES: u64 = 2000;
    for i in 0..WRITES {
        writer.write(&path, i.to_string()).unwrap();
    }
    let stats = h.server.connection_stats();
    let s = stats
        .iter()
        .find(|s| s.watches == 1)
        .expect("stalled connection");
    assert!(
        s.queued_events <= LIMIT,
        "queue grew to {}",
        s.queued_events
    );
    assert!(s.dropped_events > 0, "nothing dropped: {s:?}");
    assert!(s.dropped_events < WRITES + 1);
    // Others are served normally.
    assert_eq!(
        writer.read(&path).unwrap(),
        (WRITES - 1).to_string().as_bytes()
    );
}

#[test]
fn client_event_queue_is_bounded() {
    let h = Harness::new();
    let xs = h.client_with(
        0,
        ClientConfig {
            watch_queue_capacity: 8,
            ..Harness::config()
        },
    );
    let writer = h.client(0);
    let events = xs.watch_events();
    assert_eq!(events.capacity(), 8);
    xs.watch("/flood", "f").unwrap();
    for i in 0..100 {
        writer.write("/flood", i.to_string()).unwrap();
    }
    // Events for a connection precede later replies on it, so after this
    // round trip the reader has handled all 101 events.
    xs.read("/flood").unwrap();
    assert_eq!(events.len(), 8);
    assert_eq!(events.dropped(), 93);
    for _ in 0..8 {
        assert_eq!(events.try_recv().unwrap(), ev("/flood", "f"));
    }
    assert!(events.is_empty());
    // Room again: new events are queued.
    writer.write("/flood", "again").unwrap();
    assert_eq!(events.recv_timeout(TIMEOUT).unwrap(), ev("/flood", "f"));
}

#[test]
fn a_client_that_never_reads_replies_stalls_only_itself() {
    let h = Harness::new();
    let mut flood = h.raw(0);
    flood.set_nonblocking(true).unwrap();
    let msg = wire::encode(MsgType::Read, 1, 0, b"/\0").unwrap();
    // Push requests until the socket is full both ways.
    let mut sent = 0;
    let mut stuck = 0;
    while stuck < 1 && sent < 1_000_000 {
        match flood.write(&msg) {
            Ok(n) if n == msg.len() => sent += 1,
            Ok(_) => break, // partial: stream is now mid-message; stop here
            Err(e) if e.kind() == ErrorKind::WouldBlock => stuck += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(sent > 0);
    let xs = h.client(0);
    xs.write("/alive", "yes").unwrap();
    assert_eq!(xs.read("/alive").unwrap(), b"yes");
}

#[test]
fn oversized_length_closes_the_connection() {
    let h = Harness::new();
    for len in [PAYLOAD_MAX as u32 + 1, 65536, u32::MAX] {
        let mut s = h.raw(0);
        let header = Header {
            ty: MsgType::Read.as_u32(),
            req_id: 1,
            tx_id: 0,
            len,
        };
        s.write_all(&header.to_bytes()).unwrap();
        assert!(closed_by_peer(&mut s), "len {len}");
    }
    // The server still works.
    h.client(0).write("/ok", "1").unwrap();
}

#[test]
fn truncated_message_then_eof() {
    let h = Harness::new();
    let mut s = h.raw(0);
    let header = Header {
        ty: MsgType::Write.as_u32(),
        req_id: 1,
        tx_id: 0,
        len: 100,
    };
    s.write_all(&header.to_bytes()).unwrap();
    s.write_all(b"/abc\0").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(closed_by_peer(&mut s));
    assert_eq!(h.server.read("/abc"), None);
    h.eventually("connection cleaned up", || {
        h.server.connection_stats().is_empty()
    });
}

#[test]
fn malformed_requests_get_einval() {
    let h = Harness::new();
    let mut s = h.raw(0);
    let cases: &[(u32, &[u8])] = &[
        (MsgType::Read.as_u32(), b"/no-nul"),
        (MsgType::Read.as_u32(), b""),
        (MsgType::Read.as_u32(), b"/a\0/b\0"),
        (MsgType::Write.as_u32(), b"/no-nul-at-all"),
        (MsgType::Mkdir.as_u32(), b"relative/../x\0"),
        (MsgType::Watch.as_u32(), b"/path-only\0"),
        (MsgType::Watch.as_u32(), b"/p\0tok"),
        (MsgType::Unwatch.as_u32(), b"\0"),
        (MsgType::SetPerms.as_u32(), b"/\0"),
        (MsgType::SetPerms.as_u32(), b"/\0x0\0"),
        (MsgType::SetPerms.as_u32(), b"/\0r99999999\0"),
        (MsgType::TransactionEnd.as_u32(), b"T"),
        (MsgType::GetDomainPath.as_u32(), b"-1\0"),
        (MsgType::GetDomainPath.as_u32(), b"99999999999999\0"),
        (MsgType::DirectoryPart.as_u32(), b"/\0"),
        (MsgType::WatchEvent.as_u32(), b"/a\0t\0"),
        (MsgType::Error.as_u32(), b"EINVAL\0"),
        (20, b"/\0"),
        (999, b"/\0"),
        (u32::MAX, b""),
        (MsgType::Read.as_u32(), b"/\xff\xfe\0"),
    ];
    for (i, (ty, payload)) in cases.iter().enumerate() {
        let req_id = 100 + i as u32;
        send_raw(&mut s, *ty, req_id, 0, payload);
        let reply = recv_raw(&mut s);
        assert_eq!(reply.header.req_id, req_id, "case {i}");
        assert_eq!(
            error_name(&reply).as_deref(),
            Some("EINVAL"),
            "case {i}: type {ty} payload {payload:?}"
        );
    }
    // Recognised but unsupported operations.
    let reply = roundtrip(&mut s, MsgType::Control, 1, b"print\0x\0");
    assert_eq!(error_name(&reply).as_deref(), Some("ENOSYS"));
    // The connection is still usable.
    let reply = roundtrip(&mut s, MsgType::Write, 2, b"/fine\0v");
    assert_eq!(reply.payload, b"OK\0");
    let reply = roundtrip(&mut s, MsgType::Read, 3, b"/fine\0");
    assert_eq!(reply.payload, b"v");
}

#[test]
fn replies_echo_request_and_transaction_ids() {
    let h = Harness::new();
    let mut s = h.raw(0);
    let reply = roundtrip(&mut s, MsgType::TransactionStart, 0xdead_beef, b"\0");
    assert_eq!(reply.header.req_id, 0xdead_beef);
    let id: u32 = std::str::from_utf8(reply.payload.strip_suffix(&[0]).unwrap())
        .unwrap()
        .parse()
        .unwrap();
    send_raw(&mut s, MsgType::Write.as_u32(), 7, id, b"/x\0y");
    let reply = recv_raw(&mut s);
    assert_eq!((reply.header.req_id, reply.header.tx_id), (7, id));
    send_raw(&mut s, MsgType::TransactionEnd.as_u32(), 8, id, b"T\0");
    assert_eq!(recv_raw(&mut s).payload, b"OK\0");
    assert_eq!(h.server.read("/x").as_deref(), Some(&b"y"[..]));
}

#[test]
fn random_garbage_never_hurts_the_server() {
    let h = Harness::new();
    // A fixed-seed generator keeps this deterministic.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..64 {
        let mut s = h.raw(if round % 2 == 0 { 0 } else { 5 });
        let mut junk = Vec::new();
        // A plausible header (small type, small length) half the time, so the
        // garbage reaches the request handlers, not just the framing check.
        for _ in 0..4 {
            let ty = (next() % 26) as u32;
            let len = (next() % 64) as u32;
            let tx = if next() % 4 == 0 {
                (next() % 4) as u32
            } else {
                0
            };
            let mut body: Vec<u8> = (0..len)
                .map(|_| [b'/', 0, b'a', b'@', b'1', 0xff][(next() % 6) as usize])
                .collect();
            if round % 2 == 1 {
                // Shorter than announced: framing goes off the rails.
                body.truncate(len as usize / 2);
            }
            junk.extend_from_slice(
                &Header {
                    ty,
                    req_id: round,
                    tx_id: tx,
                    len,
                }
                .to_bytes(),
            );
            junk.extend_from_slice(&body);
        }
        let extra = (next() % 64) as usize;
        junk.extend((0..extra).map(|_| next() as u8));
        let _ = s.write_all(&junk);
        let _ = s.shutdown(std::net::Shutdown::Write);
        // Drain whatever the server says until it closes.
        assert!(closed_by_peer(&mut s));
    }
    let xs = h.client(0);
    xs.write("/after", "garbage").unwrap();
    assert_eq!(xs.read("/after").unwrap(), b"garbage");
}

/// A fake daemon that accepts one connection and runs `script` on it.
fn hostile_daemon(
    script: impl FnOnce(std::os::unix::net::UnixStream) + Send + 'static,
) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evil.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        if let Ok((s, _)) = listener.accept() {
            script(s);
        }
    });
    (dir, path)
}

#[test]
fn client_survives_a_hostile_daemon() {
    // Oversized length: the client drops the connection, waiters see it.
    let (_d, path) = hostile_daemon(|mut s| {
        let _ = wire::read_message(&mut s);
        let h = Header {
            ty: MsgType::Read.as_u32(),
            req_id: 1,
            tx_id: 0,
            len: u32::MAX,
        };
        let _ = s.write_all(&h.to_bytes());
        // Hold the socket open: the client must not wait for more.
        let _ = wire::read_message(&mut s);
    });
    let xs = XsClient::new(Transport::connect_unix(&path).unwrap(), Harness::config()).unwrap();
    assert!(matches!(xs.read("/x"), Err(Error::Disconnected)));
    assert!(!xs.is_connected());
    assert!(matches!(xs.read("/x"), Err(Error::Disconnected)));
    assert_eq!(
        xs.watch_events().recv_timeout(TIMEOUT),
        Err(RecvTimeoutError::Disconnected)
    );

    // Wrong reply type, malformed watch events, unknown req ids, a huge
    // unknown error string: all contained.
    let (_d, path) = hostile_daemon(|mut s| {
        let m = wire::read_message(&mut s).unwrap();
        let send = |s: &mut std::os::unix::net::UnixStream, ty: MsgType, req: u32, p: &[u8]| {
            s.write_all(&wire::encode(ty, req, 0, p).unwrap()).unwrap();
        };
        send(&mut s, MsgType::WatchEvent, 0, b"no-terminator");
        send(&mut s, MsgType::WatchEvent, 0, b"");
        send(&mut s, MsgType::Read, 4242, b"nobody asked");
        send(&mut s, MsgType::Directory, m.header.req_id, b"wrong type");
        let m = wire::read_message(&mut s).unwrap();
        send(
            &mut s,
            MsgType::Error,
            m.header.req_id,
            &[b'Z'; PAYLOAD_MAX],
        );
        let m = wire::read_message(&mut s).unwrap();
        send(&mut s, MsgType::WatchEvent, 0, b"/ok\0tok\0");
        send(&mut s, MsgType::Read, m.header.req_id, b"fine");
        let _ = wire::read_message(&mut s);
    });
    let xs = XsClient::new(Transport::connect_unix(&path).unwrap(), Harness::config()).unwrap();
    assert!(matches!(
        xs.read("/a"),
        Err(Error::Protocol(
            xenstore::ProtocolError::UnexpectedReply { .. }
        ))
    ));
    match xs.read("/b") {
        Err(Error::Xs(Errno::Other(s))) => assert_eq!(s.len(), Errno::MAX_OTHER_LEN),
        other => panic!("{other:?}"),
    }
    assert_eq!(xs.read("/c").unwrap(), b"fine");
    assert_eq!(
        xs.watch_events().recv_timeout(TIMEOUT).unwrap(),
        ev("/ok", "tok")
    );
    assert!(xs.is_connected());
}

#[test]
fn client_request_timeout() {
    let (_d, path) = hostile_daemon(|mut s| {
        // Read requests, never answer, until the client goes away.
        while wire::read_message(&mut s).is_ok() {}
    });
    let xs = XsClient::new(
        Transport::connect_unix(&path).unwrap(),
        ClientConfig {
            request_timeout: Some(Duration::from_millis(50)),
            ..ClientConfig::default()
        },
    )
    .unwrap();
    assert!(matches!(xs.read("/x"), Err(Error::Timeout)));
    // Still connected; a later request times out on its own too.
    assert!(xs.is_connected());
    assert!(matches!(xs.mkdir("/y"), Err(Error::Timeout)));
}

#[test]
fn connections_per_domain_are_limited() {
    let h = Harness::with_config(ServerConfig {
        max_connections_per_domain: 2,
        ..ServerConfig::default()
    });
    let a = h.client(5);
    let b = h.client(5);
    a.get_domain_path(5).unwrap();
    b.get_domain_path(5).unwrap();
    let refused = h.client(5);
    assert!(matches!(
        refused.get_domain_path(5),
        Err(Error::Disconnected) | Err(Error::Io(_))
    ));
    drop(a);
    h.eventually("first connection gone", || {
        h.server
            .connection_stats()
            .iter()
            .filter(|s| s.domid == 5)
            .count()
            == 1
    });
    h.client(5).get_domain_path(5).unwrap();
    // dom0 is not limited.
    let many: Vec<XsClient> = (0..5).map(|_| h.client(0)).collect();
    for xs in &many {
        xs.get_domain_path(0).unwrap();
    }
    drop(b);
}

/// Many connections doing everything at once, including watchers that never
/// read and connections that come and go: every request completes (each is
/// bounded by the client timeout, so a deadlock fails rather than hangs) and
/// the server stays consistent.
#[test]
fn concurrent_mixed_load_does_not_deadlock() {
    let h = std::sync::Arc::new(Harness::with_config(ServerConfig {
        max_queued_watch_events: 32,
        ..ServerConfig::default()
    }));
    let dom0 = h.client(0);
    for d in 1..=2 {
        h.make_home(&dom0, d);
    }
    // A watcher that never reads, on the busiest subtree.
    let mut stalled = h.raw(0);
    roundtrip(&mut stalled, MsgType::Watch, 1, b"/local\0stall\0");

    let workers: Vec<_> = (0..4u32)
        .map(|w| {
            let h = h.clone();
            std::thread::spawn(move || {
                let domid = w % 3; // dom0, dom1, dom2
                for round in 0..3 {
                    let xs = h.client(domid);
                    let events = xs.watch_events();
                    xs.watch("/local/domain", &format!("w{w}")).unwrap();
                    for i in 0..60u32 {
                        let base = if domid == 0 {
                            format!("/local/domain/0/w{w}")
                        } else {
                            format!("w{w}")
                        };
                        let p = format!("{base}/n{}", i % 7);
                        match i % 5 {
                            0 => xs.write(&p, i.to_string()).unwrap(),
                            1 => drop(xs.read_opt(&p).unwrap()),
                            2 => xs
                                .transaction(|tx| {
                                    let v = tx.read_opt(&p)?.unwrap_or_default();
                                    tx.write(
                                        &p,
                                        [v.as_slice(), b"+"].concat().get(..64).unwrap_or(b"+"),
                                    )
                                })
                                .unwrap(),
                            3 => xs.rm(&p).unwrap(),
                            _ => drop(xs.directory(&base).unwrap_or_default()),
                        }
                        while events.try_recv().is_ok() {}
                    }
                    if round == 1 {
                        // Leave with a transaction open.
                        std::mem::forget(xs.transaction_start().unwrap());
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    h.eventually("worker connections closed", || {
        h.server.connection_stats().len() == 2
    });
    let stats = h.server.connection_stats();
    assert!(stats
        .iter()
        .all(|s| s.transactions == 0 && s.queued_events <= 32));
    dom0.write("/done", "1").unwrap();
    assert_eq!(dom0.read("/done").unwrap(), b"1");
}
