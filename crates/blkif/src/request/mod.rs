//! Requests: copy-once decoding, frontend-side encoding, and validation.
//!
//! This module owns the path from the bytes of one request slot to a request the engine
//! may execute:
//!
//! 1. The ring copies the slot into a private buffer with one read ([`crate::ring`]).
//! 2. [`RawRequest::decode`] turns that private copy into a [`RawRequest`], an enum by
//!    opcode that keeps every field exactly as the guest wrote it. Decoding is total:
//!    every byte pattern is some `RawRequest`. Because only the private copy is read,
//!    a guest rewriting the slot meanwhile cannot make us see two different values of
//!    one field (XSA-155, the double fetch in blkback's `blkif_get_x86_32_req`).
//! 3. [`RawRequest::validate`] applies every rule of the seed's `dispatch_rw_block_io`,
//!    `dispatch_discard_io`, `dispatch_other_io` and `xen_vbd_translate` against the
//!    device's [`DeviceLimits`] and yields a typed [`Request`], or an
//!    [`IndirectRequest`] whose descriptor pages the engine must map first, or a
//!    [`RequestError`] that says which status to answer with.
//! 4. For indirect requests, [`IndirectRequest::parse_segments`] copies each descriptor
//!    page once and checks every descriptor (`xen_blkbk_parse_indirect`), and
//!    [`IndirectRequest::finish`] runs the checks that need the total sector count.
//!
//! Whatever the outcome, [`RawRequest::id`] and [`RawRequest::response_operation`]
//! give what an answer needs, so a malformed request still gets its response.
//!
//! No allocation happens here: direct segments live in a fixed array, indirect segments
//! in a buffer the caller owns and reuses.
//!
//! One file per concern: the slot and its segments as the guest wrote them, decoded and
//! encoded (`raw.rs`); the rules that turn them into a [`Request`] (`validate.rs`); the
//! second stage of indirect requests (`indirect.rs`); the refusals (`error.rs`).

mod error;
mod indirect;
mod raw;
mod validate;

pub use error::RequestError;
pub use indirect::{write_indirect_page, DescriptorPage, IndirectRequest};
pub use raw::{RawRequest, Segment};
pub use validate::{DeviceLimits, DirectSegments, Operation, Request, Segments, Validated};

// Little-endian field access on private copies of slots and descriptor pages.

pub(crate) fn le_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

pub(crate) fn le_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

pub(crate) fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(v)
}

fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
