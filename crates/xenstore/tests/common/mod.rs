//! Shared fixtures: a server with one listening socket per domain in a
//! temporary directory, and clients that give up after a bounded time so a
//! bug shows up as a failure, never as a hung test.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use xenstore::wire::{self, Message, MsgType};
use xenstore::{
    Access, ClientConfig, Perm, ServerConfig, Transport, WatchEvent, XenstoreServer, XsClient,
    XsOps,
};

/// Failure bound for anything that waits.
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub struct Harness {
    pub server: XenstoreServer,
    dir: tempfile::TempDir,
    listening: std::sync::Mutex<Vec<u32>>,
}

impl Harness {
    pub fn new() -> Harness {
        Harness::with_config(ServerConfig::default())
    }

    pub fn with_config(config: ServerConfig) -> Harness {
        Harness {
            server: XenstoreServer::new(config),
            dir: tempfile::tempdir().expect("tempdir"),
            listening: Default::default(),
        }
    }

    /// The socket a domain connects to (created on first use).
    pub fn socket(&self, domid: u32) -> PathBuf {
        let path = self.dir.path().join(format!("xs-dom{domid}.sock"));
        let mut listening = self.listening.lock().unwrap();
        if !listening.contains(&domid) {
            self.server.listen_as(domid, &path).expect("listen");
            listening.push(domid);
        }
        path
    }

    pub fn config() -> ClientConfig {
        ClientConfig {
            request_timeout: Some(TIMEOUT),
            ..ClientConfig::default()
        }
    }

    /// A client speaking as `domid` through that domain's socket.
    pub fn client(&self, domid: u32) -> XsClient {
        self.client_with(domid, Harness::config())
    }

    pub fn client_with(&self, domid: u32, config: ClientConfig) -> XsClient {
        let transport = Transport::connect_unix(self.socket(domid)).expect("connect");
        XsClient::new(transport, config).expect("client")
    }

    /// A raw socket speaking as `domid`, for hand-made messages.
    pub fn raw(&self, domid: u32) -> UnixStream {
        let s = UnixStream::connect(self.socket(domid)).expect("connect");
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.set_write_timeout(Some(TIMEOUT)).unwrap();
        s
    }

    /// Creates `/local/domain/<domid>` owned by the domain, as a toolstack does.
    pub fn make_home(&self, dom0: &XsClient, domid: u32) -> String {
        let home = format!("/local/domain/{domid}");
        dom0.mkdir(&home).unwrap();
        dom0.set_perms(&home, &[Perm::new(domid, Access::None)])
            .unwrap();
        home
    }

    /// Waits (bounded) until `cond` holds; panics with `what` otherwise.
    pub fn eventually(&self, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + TIMEOUT;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

pub fn ev(path: &str, token: &str) -> WatchEvent {
    WatchEvent {
        path: path.into(),
        token: token.into(),
    }
}

/// Sends one hand-made message.
pub fn send_raw(s: &mut UnixStream, ty: u32, req_id: u32, tx_id: u32, payload: &[u8]) {
    let msg = wire::encode_raw(ty, req_id, tx_id, payload).expect("payload fits");
    s.write_all(&msg).expect("write");
}

/// Receives one message (bounded by the socket's read timeout).
pub fn recv_raw(s: &mut UnixStream) -> Message {
    wire::read_message(s).expect("a message")
}

/// Sends a request and returns the reply, skipping watch events.
pub fn roundtrip(s: &mut UnixStream, ty: MsgType, req_id: u32, payload: &[u8]) -> Message {
    send_raw(s, ty.as_u32(), req_id, 0, payload);
    loop {
        let m = recv_raw(s);
        if m.header.ty != MsgType::WatchEvent.as_u32() {
            return m;
        }
    }
}

/// True if the server closed the stream (EOF or reset), with a bounded wait.
pub fn closed_by_peer(s: &mut UnixStream) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

pub fn error_name(m: &Message) -> Option<String> {
    (m.header.ty == MsgType::Error.as_u32()).then(|| {
        String::from_utf8_lossy(m.payload.strip_suffix(&[0]).unwrap_or(&m.payload)).into_owned()
    })
}
