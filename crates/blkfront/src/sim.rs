//! [`Guest`] over the simulator's guest domain ([`platform::sim::SimGuest`]).
//!
//! The simulated guest owns a memfd of pages and a `grant_entry_v1` table; this module
//! adds what a guest kernel adds on top: a page allocator (frames are handed to the
//! frontend's rings, persistent-grant pool and request buffers) and the mapping of ring
//! frames as one [`SharedMemory`]. One [`SimGuestServices`] is shared by every frontend of
//! the guest so they never hand out the same frame twice.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use platform::sim::{GuestError as SimError, SimGuest};
use shmem::SharedMemory;

use crate::guest::{EndAccessError, Frame, GrantRef, Guest, GuestError, GuestEventChannel, Port};

/// A simulated guest kernel: the [`SimGuest`] plus a page allocator.
#[derive(Debug)]
pub struct SimGuestServices {
    guest: Arc<SimGuest>,
    /// Free frames. Ordered so multi-page allocations (rings) can find contiguous runs,
    /// which [`Guest::map_frames`] needs here.
    free: Mutex<BTreeSet<Frame>>,
}

impl SimGuestServices {
    /// Hands every frame of `guest` to the allocator.
    pub fn new(guest: Arc<SimGuest>) -> Self {
        let frames = 0..guest.pages();
        Self::with_frames(guest, frames)
    }

    /// Hands only `frames` to the allocator (the rest stays for the test's own use).
    pub fn with_frames(guest: Arc<SimGuest>, frames: impl IntoIterator<Item = Frame>) -> Self {
        Self {
            guest,
            free: Mutex::new(frames.into_iter().collect()),
        }
    }

    /// The simulated domain.
    pub fn sim_guest(&self) -> &Arc<SimGuest> {
        &self.guest
    }

    /// Frames not allocated: after a clean teardown, all of them again.
    pub fn free_frames_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<Frame>> {
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn sim_err(op: &'static str) -> impl FnOnce(SimError) -> GuestError {
    move |e| GuestError::platform(op, e)
}

impl Guest for SimGuestServices {
    fn alloc_frames(&self, count: usize) -> Result<Vec<Frame>, GuestError> {
        let mut free = self.lock();
        if count == 1 {
            return free
                .pop_first()
                .map(|f| vec![f])
                .ok_or(GuestError::OutOfMemory { wanted: 1 });
        }
        // First fit of `count` consecutive frames.
        let mut run_start = None;
        let mut run_len = 0usize;
        let mut prev: Option<Frame> = None;
        for &f in free.iter() {
            if prev.is_some_and(|p| p + 1 == f) {
                run_len += 1;
            } else {
                run_start = Some(f);
                run_len = 1;
            }
            prev = Some(f);
            if run_len == count {
                break;
            }
        }
        match run_start {
            Some(start) if run_len == count && count > 0 => {
                let frames: Vec<Frame> = (start..start + count as Frame).collect();
                for f in &frames {
                    free.remove(f);
                }
                Ok(frames)
            }
            _ if count == 0 => Ok(Vec::new()),
            _ => Err(GuestError::OutOfMemory { wanted: count }),
        }
    }

    fn free_frames(&self, frames: &[Frame]) {
        let mut free = self.lock();
        for &f in frames {
            if !free.insert(f) {
                tracing::error!(frame = f, "frame freed twice");
            }
        }
    }

    fn read_frame(&self, frame: Frame, offset: usize, dst: &mut [u8]) -> Result<(), GuestError> {
        self.guest
            .read_page(frame, offset, dst)
            .map_err(sim_err("read guest page"))
    }

    fn write_frame(&self, frame: Frame, offset: usize, src: &[u8]) -> Result<(), GuestError> {
        self.guest
            .write_page(frame, offset, src)
            .map_err(sim_err("write guest page"))
    }

    fn map_frames(&self, frames: &[Frame]) -> Result<SharedMemory, GuestError> {
        let first = *frames
            .first()
            .ok_or(GuestError::OutOfMemory { wanted: 0 })?;
        if frames
            .iter()
            .enumerate()
            .any(|(i, &f)| f != first + i as Frame)
        {
            return Err(GuestError::platform(
                "map ring frames",
                "ring frames must be contiguous in simulated guest memory",
            ));
        }
        self.guest
            .map_frames(first, frames.len() as u32)
            .map_err(sim_err("map ring frames"))
    }

    fn grant_access(
        &self,
        domid: u16,
        frame: Frame,
        readonly: bool,
    ) -> Result<GrantRef, GuestError> {
        self.guest
            .grant_access(domid, frame, readonly)
            .map_err(|e| match e {
                SimError::GrantTableFull => GuestError::OutOfGrants,
                e => GuestError::platform("grant access", e),
            })
    }

    fn end_access(&self, gref: GrantRef) -> Result<(), EndAccessError> {
        match self.guest.end_access(gref) {
            Ok(()) => Ok(()),
            Err(SimError::EndAccess(platform::grant_table::EndAccessError::StillInUse {
                ..
            })) => Err(EndAccessError::StillMapped(gref)),
            Err(_) => Err(EndAccessError::Invalid(gref)),
        }
    }

    fn alloc_event_channel(&self, remote: u16) -> Result<Box<dyn GuestEventChannel>, GuestError> {
        let ch = self
            .guest
            .alloc_event_channel(remote)
            .map_err(sim_err("allocate event channel"))?;
        Ok(Box::new(SimChannel(ch)))
    }
}

struct SimChannel(platform::sim::GuestEventChannel);

impl GuestEventChannel for SimChannel {
    fn port(&self) -> Port {
        self.0.port()
    }

    fn notify(&self) -> Result<(), GuestError> {
        self.0
            .notify()
            .map_err(|e| GuestError::platform("notify backend", e))
    }

    fn wait(&self, timeout: Duration) -> Result<bool, GuestError> {
        self.0
            .wait(timeout)
            .map_err(|e| GuestError::platform("wait for backend", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use platform::sim::GuestConfig;
    use shmem::PAGE_SIZE;

    fn services(pages: u32) -> SimGuestServices {
        let g = SimGuest::new(
            1,
            GuestConfig {
                pages,
                grant_entries: 64,
            },
        )
        .unwrap();
        SimGuestServices::new(Arc::new(g))
    }

    #[test]
    fn multi_page_allocations_are_contiguous_and_mappable() {
        let s = services(16);
        let single = s.alloc_frames(1).unwrap();
        let ring = s.alloc_frames(4).unwrap();
        assert!(ring.windows(2).all(|w| w[1] == w[0] + 1));
        assert!(!ring.contains(&single[0]));
        let mem = s.map_frames(&ring).unwrap();
        mem.write(PAGE_SIZE + 5, b"ring").unwrap();
        let mut back = [0u8; 4];
        s.read_frame(ring[1], 5, &mut back).unwrap();
        assert_eq!(&back, b"ring", "the mapping aliases guest memory");
        assert!(s.map_frames(&[ring[0], ring[2]]).is_err());
        drop(mem);
        s.free_frames(&ring);
        s.free_frames(&single);
        assert_eq!(s.free_frames_count(), 16);
    }

    #[test]
    fn exhaustion_and_fragmentation_are_reported() {
        let s = services(4);
        let a = s.alloc_frames(1).unwrap();
        let _b = s.alloc_frames(1).unwrap();
        s.free_frames(&a);
        // Frames 0, 2, 3 are free: no run of three.
        assert!(matches!(
            s.alloc_frames(3),
            Err(GuestError::OutOfMemory { wanted: 3 })
        ));
        assert_eq!(s.alloc_frames(2).unwrap(), vec![2, 3]);
        assert_eq!(s.alloc_frames(1).unwrap(), vec![0]);
        assert!(s.alloc_frames(1).is_err());
    }

    #[test]
    fn end_access_of_an_unknown_grant_is_invalid() {
        let s = services(4);
        assert_eq!(s.end_access(30), Err(EndAccessError::Invalid(30)));
        let f = s.alloc_frames(1).unwrap()[0];
        let g = s.grant_access(0, f, true).unwrap();
        assert_eq!(s.end_access(g), Ok(()));
        assert_eq!(s.end_access(g), Err(EndAccessError::Invalid(g)));
    }
}
