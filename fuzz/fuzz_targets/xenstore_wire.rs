//! The xenstore wire protocol from both ends.
//!
//! Server side: framed requests (any type number, transaction id and NUL-separated
//! arguments, plus raw bytes that may break the framing) sent to the in-memory xenstored
//! first as dom0, then as a guest, over its real connection code (`connect_as`: reader
//! and writer threads, the one-lock state, permissions, quotas, transactions, watches).
//! Checked: no panic, every connection ends when its peer does, and everything the
//! server sends back decodes as well-framed messages.
//!
//! Client side: `XsClient` against a hostile daemon. For each request the client sends,
//! the fake daemon answers with fuzzer-chosen messages (watch events, replies with the
//! right or a wrong request id and type, arbitrary payloads, broken framing) and hangs up
//! whenever it did not answer the request, so nothing waits forever. Checked: no panic,
//! every call returns.

#![no_main]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use xenstore::wire::{self, MsgType, ReadError};
use xenstore::{ClientConfig, Transport, XenstoreServer, XsClient, XsOps};

#[derive(Debug, Arbitrary)]
enum Arg {
    Home,
    Backend,
    Raw(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
struct Request {
    ty: u8,
    tx_id: u8,
    args: Vec<Arg>,
    terminated: bool,
}

#[derive(Debug, Arbitrary)]
struct Reply {
    /// Answer with the request's id (else `req_id`).
    echo_id: bool,
    /// Answer with the request's type (else `ty`).
    echo_ty: bool,
    req_id: u32,
    ty: u8,
    payload: Vec<u8>,
    watch_event: Option<Vec<u8>>,
    garbage: Vec<u8>,
}

#[derive(Debug, Arbitrary)]
enum ClientOp {
    Read,
    Directory,
    GetPerms,
    Write(Vec<u8>),
    Watch,
    Transaction,
    DomainPath(u32),
    Introduced(u32),
}

#[derive(Debug, Arbitrary)]
enum Input {
    Server {
        dom0: Vec<Request>,
        guest: Vec<Request>,
        guest_id: u8,
        raw_tail: Vec<u8>,
    },
    Client {
        ops: Vec<(ClientOp, Vec<Reply>)>,
    },
}

fn encode(reqs: &[Request], tail: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, r) in reqs.iter().enumerate() {
        let mut payload = Vec::new();
        for (k, a) in r.args.iter().enumerate() {
            if k > 0 {
                payload.push(0);
            }
            match a {
                Arg::Home => payload.extend_from_slice(b"/local/domain/7"),
                Arg::Backend => payload.extend_from_slice(b"/local/domain/0/backend/vbd/7/51712"),
                Arg::Raw(b) => payload.extend_from_slice(b),
            }
        }
        if r.terminated {
            payload.push(0);
        }
        payload.truncate(wire::PAYLOAD_MAX);
        let req_id = u32::try_from(i).unwrap_or(u32::MAX);
        if let Some(m) = wire::encode_raw(
            u32::from(r.ty % 24),
            req_id,
            u32::from(r.tx_id % 4),
            &payload,
        ) {
            out.extend_from_slice(&m);
        }
    }
    out.extend_from_slice(tail);
    out
}

/// Sends `bytes` on a fresh connection as `domid`, hangs up, and checks the replies.
fn converse(server: &XenstoreServer, domid: u32, bytes: &[u8]) {
    let stream = server.connect_as(domid).expect("connect_as");
    let mut writer = stream.try_clone().expect("clone");
    let replies = std::thread::scope(|s| {
        s.spawn(move || {
            let _ = writer.write_all(bytes);
            let _ = writer.shutdown(Shutdown::Write);
        });
        let mut replies = Vec::new();
        let _ = (&stream).read_to_end(&mut replies);
        replies
    });
    let mut r: &[u8] = &replies;
    loop {
        match wire::read_message(&mut r) {
            Ok(m) => assert!(m.payload.len() <= wire::PAYLOAD_MAX),
            Err(ReadError::Eof) => break,
            Err(e) => panic!("the server sent a malformed message: {e}"),
        }
    }
}

fn fake_daemon(stream: UnixStream, script: Vec<Vec<Reply>>) {
    let mut input = std::io::BufReader::new(stream.try_clone().expect("clone"));
    let mut out = stream;
    // What the client's reader has received but not yet framed (a message cut short).
    let mut unframed: Vec<u8> = Vec::new();
    for replies in script {
        let Ok(req) = wire::read_message(&mut input) else {
            return;
        };
        let mut bytes = Vec::new();
        for r in replies.iter().take(4) {
            if let Some(ev) = &r.watch_event {
                let ev = &ev[..ev.len().min(wire::PAYLOAD_MAX)];
                bytes.extend(wire::encode(MsgType::WatchEvent, 0, 0, ev).unwrap_or_default());
            }
            let id = if r.echo_id {
                req.header.req_id
            } else {
                r.req_id
            };
            let ty = if r.echo_ty {
                req.header.ty
            } else {
                u32::from(r.ty % 24)
            };
            let payload = &r.payload[..r.payload.len().min(wire::PAYLOAD_MAX)];
            bytes.extend(wire::encode_raw(ty, id, 0, payload).unwrap_or_default());
            bytes.extend_from_slice(&r.garbage);
        }
        if out.write_all(&bytes).is_err() {
            break;
        }
        // Frame the stream as the client's reader will: the request is over once a reply
        // to it is complete, or once the framing is broken (the reader gives up). Anything
        // else would leave the client waiting, as it waits for a real xenstored: hang up.
        unframed.extend_from_slice(&bytes);
        let mut r: &[u8] = &unframed;
        let mut over = false;
        loop {
            let before = r.len();
            match wire::read_message(&mut r) {
                Ok(m) => {
                    over |= m.header.req_id == req.header.req_id
                        && m.header.ty != MsgType::WatchEvent.as_u32();
                }
                Err(ReadError::Protocol(xenstore::ProtocolError::Truncated)) => {
                    r = &unframed[unframed.len() - before..];
                    break;
                }
                Err(ReadError::Eof) => break,
                Err(_) => {
                    over = true;
                    break;
                }
            }
        }
        unframed = r.to_vec();
        if !over {
            break;
        }
    }
    let _ = out.shutdown(Shutdown::Both);
}

fn client(ops: Vec<(ClientOp, Vec<Reply>)>) {
    let (ours, theirs) = UnixStream::pair().expect("pair");
    let (ops, script): (Vec<ClientOp>, Vec<Vec<Reply>>) = ops.into_iter().take(16).unzip();
    let daemon = std::thread::spawn(move || fake_daemon(theirs, script));
    let xs = XsClient::new(Transport::Unix(ours), ClientConfig::default()).expect("client");
    for op in ops {
        let p = "/local/domain/7/device/vbd/51712";
        let _ = match op {
            ClientOp::Read => xs.read(p).map(drop),
            ClientOp::Directory => xs.directory(p).map(drop),
            ClientOp::GetPerms => xs.get_perms(p).map(drop),
            ClientOp::Write(v) => xs.write(p, v),
            ClientOp::Watch => xs.watch(p, "tok"),
            ClientOp::Transaction => xs.transaction(|tx| tx.write(p, "4")),
            ClientOp::DomainPath(d) => xs.get_domain_path(d).map(drop),
            ClientOp::Introduced(d) => xs.is_domain_introduced(d).map(drop),
        };
    }
    let events = xs.watch_events();
    while events.try_recv().is_ok() {}
    drop(xs);
    let _ = daemon.join();
}

fuzz_target!(|input: Input| match input {
    Input::Server {
        dom0,
        guest,
        guest_id,
        raw_tail,
    } => {
        let server = XenstoreServer::default();
        converse(&server, 0, &encode(&dom0, &[]));
        converse(
            &server,
            if guest_id % 2 == 0 {
                7
            } else {
                u32::from(guest_id)
            },
            &encode(&guest, &raw_tail),
        );
    }
    Input::Client { ops } => client(ops),
});
