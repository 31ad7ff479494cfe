//! The xenstore wire decoder alone, as both ends run it on every message: a byte stream
//! framed into messages by `wire::read_message` (header checks before any allocation),
//! each payload split the ways the server (`split_exact`, `split_write`) and the client
//! (`split_terminated`, permission entries, error names) split them. In-process and
//! single-threaded, so it runs orders of magnitude faster than `xenstore_wire`, which
//! drives the same decoder through the real connections.
//!
//! Checked: no panic; no message longer than `PAYLOAD_MAX`; a decoded message encodes
//! back to the bytes it came from; a parsed permission prints to a form that parses back to it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use xenstore::wire::{self, ReadError, HEADER_LEN};
use xenstore::{Errno, Perm};

fuzz_target!(|data: &[u8]| {
    let mut r: &[u8] = data;
    let mut at = 0usize;
    loop {
        match wire::read_message(&mut r) {
            Ok(m) => {
                assert!(m.payload.len() <= wire::PAYLOAD_MAX);
                let len = HEADER_LEN + m.payload.len();
                let again =
                    wire::encode_raw(m.header.ty, m.header.req_id, m.header.tx_id, &m.payload)
                        .expect("a decoded payload fits");
                assert_eq!(again, &data[at..at + len], "decode/encode round trip");
                at += len;
                for n in 0..4 {
                    let _ = wire::split_exact(&m.payload, n);
                }
                let _ = wire::split_write(&m.payload);
                if let Some(parts) = wire::split_terminated(&m.payload) {
                    for p in parts {
                        if let Some(perm) = Perm::from_wire(p) {
                            let again = Perm::from_wire(perm.to_string().as_bytes());
                            assert_eq!(again, Some(perm), "permission round trip");
                        }
                    }
                }
                let _ = Errno::from_wire(&m.payload);
                let _ = m.header.msg_type();
            }
            Err(ReadError::Eof) | Err(ReadError::Protocol(_)) => break,
            Err(ReadError::Io(e)) => panic!("reading a slice failed: {e}"),
        }
    }
});
