//! What an NBD server sends: the fixed-newstyle handshake (greeting, option replies,
//! `NBD_REP_INFO` payloads, the `NBD_OPT_EXPORT_NAME` fallback) through the real
//! `handshake::negotiate` over a scripted stream, and transmission-phase reply headers
//! through `proto::parse_reply_header` as the queue's receive loop feeds them.
//!
//! Checked: no panic, no allocation beyond the protocol's bounds, a negotiated export
//! always carries `NBD_FLAG_HAS_FLAGS`, and a parsed reply header never claims more than
//! the bytes it was given or a chunk longer than the limit.

#![no_main]

use std::io::{self, Read, Write};

use libfuzzer_sys::fuzz_target;
use storage::nbd::handshake::{self, Goal};
use storage::nbd::proto::{self, ReplyHeader};

struct Server<'a> {
    input: &'a [u8],
    written: usize,
}

impl Read for Server<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Short reads: a server's bytes arrive in pieces.
        let n = buf.len().min(self.input.len()).min(37);
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Server<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let goal = if mode & 2 == 0 { Goal::Go } else { Goal::Info };
        let mut server = Server {
            input: rest,
            written: 0,
        };
        if let Ok(n) = handshake::negotiate(&mut server, "export", goal) {
            assert!(n.has(proto::TFLAG_HAS_FLAGS));
        }
        // Whatever the server did, we sent a bounded amount.
        assert!(server.written < 64 * 1024);
    } else {
        let mut at = 0;
        while at < rest.len() {
            match proto::parse_reply_header(&rest[at..]) {
                Ok(Some(h)) => {
                    assert!(h.header_len() <= rest.len() - at);
                    if let ReplyHeader::Structured { len, .. } = h {
                        assert!(len <= proto::MAX_STRUCTURED_CHUNK_LEN);
                    }
                    at += h.header_len();
                }
                Ok(None) | Err(_) => break,
            }
        }
        if rest.len() >= 2 {
            let _ = proto::parse_info(&rest[1..]);
        }
        if let Ok(b) = <&[u8; 18]>::try_from(rest.get(..18).unwrap_or(&[])) {
            let _ = proto::parse_greeting(b);
        }
        if let Ok(b) = <&[u8; 20]>::try_from(rest.get(..20).unwrap_or(&[])) {
            let _ = proto::parse_option_reply_header(b, proto::OPT_GO);
        }
        let _ = proto::errno_of(u32::from(mode));
    }
});
