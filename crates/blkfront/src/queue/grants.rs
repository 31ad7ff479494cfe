//! A queue's granted pages: where each data and indirect page comes from (the
//! persistent-grant pool, a fresh page granted for one request, a reused indirect page),
//! and how it goes back when its request completes — revoked, recycled, or deferred
//! while the backend still maps it (Linux's `blkif_completion` grant handling).

use std::sync::atomic::Ordering;

use tracing::{debug, error, warn};

use super::{bump, Queue, Shared};
use crate::error::Error;
use crate::guest::{EndAccessError, Frame, GrantRef};
/// Where a granted page came from, hence where it goes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PageKind {
    /// A persistent grant of the pool: stays granted, back to the pool.
    Pool,
    /// A data page granted for this request only: revoked and freed.
    Data,
    /// An indirect-descriptor page granted for this request only: revoked and kept for
    /// reuse (Linux's `indirect_pages` list).
    Indirect,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Granted {
    pub(super) frame: Frame,
    pub(super) gref: GrantRef,
    pub(super) kind: PageKind,
}

impl Queue {
    /// A page for one data segment: a persistent grant from the pool, or a fresh page
    /// granted for this request (read-only when the backend only reads it, as Linux
    /// grants `rq_data_dir(req)`).
    pub(super) fn data_page(
        &mut self,
        sh: &Shared,
        backend_reads_only: bool,
    ) -> Result<Granted, Error> {
        if sh.persistent {
            return self.pool_page(sh);
        }
        let frame = sh.guest.alloc_frames(1)?[0];
        match sh
            .guest
            .grant_access(sh.backend_domid, frame, backend_reads_only)
        {
            Ok(gref) => Ok(Granted {
                frame,
                gref,
                kind: PageKind::Data,
            }),
            Err(e) => {
                sh.guest.free_frames(&[frame]);
                Err(e.into())
            }
        }
    }

    /// An indirect-descriptor page. With persistent grants it comes from the pool
    /// (writable, as Linux's `get_indirect_grant` does, so a backend that keeps it mapped
    /// persistently can also reuse it for data); without, a page kept for the purpose,
    /// granted read-only for this request since the backend only reads descriptors.
    pub(super) fn indirect_page(&mut self, sh: &Shared) -> Result<Granted, Error> {
        if sh.persistent {
            return self.pool_page(sh);
        }
        let frame = match self.indirect_frames.pop() {
            Some(f) => f,
            None => sh.guest.alloc_frames(1)?[0],
        };
        match sh.guest.grant_access(sh.backend_domid, frame, true) {
            Ok(gref) => Ok(Granted {
                frame,
                gref,
                kind: PageKind::Indirect,
            }),
            Err(e) => {
                self.indirect_frames.push(frame);
                Err(e.into())
            }
        }
    }

    pub(super) fn pool_page(&mut self, sh: &Shared) -> Result<Granted, Error> {
        if let Some((frame, gref)) = self.pool.pop() {
            return Ok(Granted {
                frame,
                gref,
                kind: PageKind::Pool,
            });
        }
        let frame = sh.guest.alloc_frames(1)?[0];
        match sh.guest.grant_access(sh.backend_domid, frame, false) {
            Ok(gref) => {
                self.pool_granted += 1;
                sh.stats.persistent_grants.fetch_add(1, Ordering::Relaxed);
                Ok(Granted {
                    frame,
                    gref,
                    kind: PageKind::Pool,
                })
            }
            Err(e) => {
                sh.guest.free_frames(&[frame]);
                Err(e.into())
            }
        }
    }

    /// Gives a page back after its request completed: pool pages to the pool, others
    /// revoked (or deferred if the backend still maps them).
    pub(super) fn release(&mut self, sh: &Shared, g: Granted) {
        if g.kind == PageKind::Pool {
            self.pool.push((g.frame, g.gref));
            return;
        }
        match sh.guest.end_access(g.gref) {
            Ok(()) => self.recycle(sh, g),
            Err(EndAccessError::StillMapped(_)) => {
                bump(&sh.stats.end_access_failures);
                warn!(
                    queue = self.index,
                    gref = g.gref,
                    "backend has not unmapped grant; page held back"
                );
                self.deferred.push(g);
            }
            Err(e @ EndAccessError::Invalid(_)) => {
                error!(queue = self.index, %e, "ending access of a grant we never made");
                self.recycle(sh, g);
            }
        }
    }

    /// Releases a completed request's pages and keeps its emptied lists for reuse.
    pub(super) fn release_pages(
        &mut self,
        sh: &Shared,
        mut data: Vec<Granted>,
        mut indirect: Vec<Granted>,
    ) {
        for g in data.drain(..).chain(indirect.drain(..)) {
            self.release(sh, g);
        }
        // Bounded: two lists per ring slot at most.
        if self.spare_pages.len() < 2 * self.shadow.capacity() {
            self.spare_pages.push(data);
            self.spare_pages.push(indirect);
        }
    }

    pub(super) fn recycle(&mut self, sh: &Shared, g: Granted) {
        match g.kind {
            PageKind::Indirect => self.indirect_frames.push(g.frame),
            _ => sh.guest.free_frames(&[g.frame]),
        }
    }

    pub(super) fn retry_deferred(&mut self, sh: &Shared) {
        if self.deferred.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.deferred);
        for g in pending {
            match sh.guest.end_access(g.gref) {
                Ok(()) => {
                    debug!(
                        queue = self.index,
                        gref = g.gref,
                        "deferred grant finally ended"
                    );
                    self.recycle(sh, g);
                }
                Err(EndAccessError::StillMapped(_)) => self.deferred.push(g),
                Err(EndAccessError::Invalid(_)) => self.recycle(sh, g),
            }
        }
    }
}
