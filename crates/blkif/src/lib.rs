//! The Xen PV block protocol (`xen/io/blkif.h` over `xen/io/ring.h`), without I/O.
//!
//! This crate is what every other layer of xenblkd uses to speak blkif:
//!
//! - [`abi`]: constants, the native / `x86_32-abi` / `x86_64-abi` struct layouts,
//!   [`Protocol`] and ring geometry ([`ring_size`]).
//! - [`ring`]: the shared ring, [`BackRing`] for the backend and [`FrontRing`] for a
//!   (simulated) frontend, with the event-index notify logic and overflow detection.
//! - [`request`]: copy-once decoding into [`RawRequest`], validation against
//!   [`DeviceLimits`] into a typed [`Request`] with a [`RequestError`] per rule of
//!   Linux blkback, indirect descriptor parsing, and frontend-side encoding.
//! - [`response`]: [`Response`] encoding/decoding with no uninitialised bytes.
//!
//! Shared memory is touched only through [`shmem::SharedMemory`] (volatile, fenced,
//! bounds-checked); no Rust reference to guest-writable memory exists. Nothing here
//! panics on guest input, allocates per request, does I/O, or knows about xenstore.
//!
//! The backend's loop for one ring (Linux blkback's `do_block_io_op`), minus the I/O:
//!
//! ```
//! use blkif::{BackRing, DeviceLimits, RingError, Segment, Validated};
//! use blkif::abi::BLKIF_RSP_OKAY;
//! use shmem::SharedMemory;
//!
//! /// Serves what is on the ring; returns whether to kick the event channel.
//! fn serve(
//!     ring: &mut BackRing,
//!     limits: &DeviceLimits,
//!     map_indirect: &dyn Fn(&[u32]) -> Vec<SharedMemory>,
//!     segment_buf: &mut [Segment], // abi::MAX_INDIRECT_SEGMENTS long, reused
//! ) -> Result<bool, RingError> {
//!     loop {
//!         // Err: the frontend overflowed the ring; it is halted for good.
//!         while let Some(raw) = ring.pop_request()? {
//!             let response = match raw.validate(limits) {
//!                 Ok(Validated::Ready(req)) => req.response(BLKIF_RSP_OKAY), // I/O here
//!                 Ok(Validated::Indirect(ind)) => {
//!                     let pages = map_indirect(ind.indirect_grefs());
//!                     match ind
//!                         .parse_segments(&pages, segment_buf)
//!                         .and_then(|segs| ind.finish(segs, limits))
//!                     {
//!                         Ok(req) => req.response(BLKIF_RSP_OKAY), // I/O here
//!                         Err(e) => ind.response(e.status()),
//!                     }
//!                 }
//!                 Err(e) => raw.response(e.status()),
//!             };
//!             ring.push_response(&response)?;
//!         }
//!         // Re-arms req_event; true if requests raced in meanwhile.
//!         if !ring.final_check_for_requests()? {
//!             break;
//!         }
//!     }
//!     Ok(ring.push_responses_and_check_notify())
//! }
//! ```

#![forbid(unsafe_code)]
#![warn(clippy::cast_possible_truncation)]

pub mod abi;
pub mod journal;
pub mod request;
pub mod response;
pub mod ring;

pub use abi::{ring_size, Protocol, UnknownProtocol};
pub use journal::JournalError;
pub use request::{
    write_indirect_page, DescriptorPage, DeviceLimits, DirectSegments, IndirectRequest, Operation,
    RawRequest, Request, RequestError, Segment, Segments, Validated,
};
pub use response::Response;
pub use ring::{needs_notify, BackRing, FrontRing, JournalStart, Popped, RingError, Ticket};
