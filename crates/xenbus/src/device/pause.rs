//! Pause, resume and reopen (`xenblkd pause|resume|reopen <device>`), as tapdisk's
//! `tap-ctl pause/unpause` offers snapshot tools.
//!
//! A pause takes nothing from the engine but what a disconnect does: the session's rings
//! go to a disconnect worker (stop consuming, answer what is in flight, unmap, unbind),
//! while the device stays Connected in xenstore and the frontend keeps queueing requests
//! on the shared rings, which it sees as latency. Resume attaches the rings again as an
//! adoption does (the journal is gone with the drained rings, so the new rings start at
//! `rsp_prod`, which is where the old ones stopped: every request they consumed was
//! answered and published), and the requests queued meanwhile are served at once. Reopen,
//! only while paused and drained, closes the storage (its image locks with it), re-reads
//! the backend's `params` (a snapshot tool may have pointed it at a new overlay) and opens
//! it again; a new size is published as a resize. The pause is the daemon's state: a
//! frontend that reconnects meanwhile gets Connected but no service until resumed, and a
//! handover or restart does not carry it (the next daemon serves the device).

use std::sync::mpsc::Sender;

use tracing::{info, warn};

use super::{Ctx, Device, Effect, Phase, Rings, Storage};
use crate::error::VbdError;
use crate::negotiate;
use crate::vbd::DisconnectReport;

/// Where the answer to one control request goes.
pub type DeviceReply = Sender<Result<String, String>>;

/// A reopen waiting for its open.
#[derive(Debug)]
pub(crate) struct Reopen {
    replies: Vec<DeviceReply>,
    /// The size before, for the answer.
    pub(crate) size_before: u64,
}

impl Reopen {
    pub(crate) fn answer(self, result: Result<String, String>) {
        for r in self.replies {
            let _ = r.send(result.clone());
        }
    }
}

/// Control requests a device answers later.
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    pause: Vec<DeviceReply>,
    reopen: Option<Reopen>,
}

impl Waiters {
    pub(crate) fn take_reopen(&mut self) -> Option<Reopen> {
        self.reopen.take()
    }

    pub(crate) fn answer_pause(&mut self, result: Result<String, String>) {
        for r in self.pause.drain(..) {
            let _ = r.send(result.clone());
        }
    }
}

impl Device {
    /// Stops taking requests: the rings are drained and released (answered once drained).
    pub fn pause(&mut self, reply: DeviceReply, fx: &mut Vec<Effect>) {
        self.paused = true;
        let Phase::Connected(s) = &mut self.phase else {
            let text = match self.phase {
                Phase::Disconnecting { .. } => "paused; the device is disconnecting",
                _ => "paused; no rings are connected, and none will be served until resumed",
            };
            info!(device = %self.key, "paused");
            let _ = reply.send(Ok(text.to_string()));
            return;
        };
        match std::mem::replace(&mut s.rings, Rings::Draining) {
            Rings::Up(vbd) => {
                info!(device = %self.key, "pausing: answering the requests in flight");
                fx.push(Effect::Disconnect { session: s.id, vbd });
                self.waiters.pause.push(reply);
            }
            Rings::Draining => self.waiters.pause.push(reply),
            other => {
                s.rings = other;
                let _ = reply.send(Ok("already paused".to_string()));
            }
        }
    }

    /// The pause's disconnect worker reported.
    pub(super) fn pause_drained(&mut self, result: Result<DisconnectReport, VbdError>) {
        let Phase::Connected(s) = &mut self.phase else {
            return;
        };
        let answer = match result {
            Ok(r) if r.drained => {
                s.rings = Rings::Released;
                info!(device = %self.key, detail = %r.detail, "paused: every request in flight answered, rings released");
                Ok(format!("paused ({})", r.detail))
            }
            Ok(r) => {
                s.rings = Rings::Abandoned;
                warn!(device = %self.key, abandoned = r.abandoned_requests, detail = %r.detail,
                    "pause: the drain timed out");
                Err(format!(
                    "paused, but {} request(s) were still in flight at the drain timeout ({}); \
                     this session's rings are not served again",
                    r.abandoned_requests, r.detail
                ))
            }
            Err(e) => {
                s.rings = Rings::Abandoned;
                warn!(device = %self.key, error = %e, "pause: the disconnect failed");
                Err(format!("pause failed: {e}"))
            }
        };
        self.waiters.answer_pause(answer);
    }

    /// Serves the rings again (the requests the frontend queued meanwhile at once).
    pub fn resume(&mut self, ctx: &Ctx<'_>, reply: DeviceReply, fx: &mut Vec<Effect>) {
        let answer = self.try_resume(ctx, fx);
        let _ = reply.send(answer);
    }

    fn try_resume(&mut self, ctx: &Ctx<'_>, fx: &mut Vec<Effect>) -> Result<String, String> {
        if !self.paused {
            return Ok("not paused".to_string());
        }
        let Phase::Connected(s) = &self.phase else {
            self.paused = false;
            // A frontend waiting to connect is connected by the next reconcile.
            fx.push(Effect::RetryLater);
            info!(device = %self.key, "resumed");
            return Ok("resumed; no rings were connected".to_string());
        };
        match s.rings {
            Rings::Released => {}
            Rings::Draining => return Err("the pause is still draining; try again".to_string()),
            Rings::Abandoned => {
                return Err(
                    "the pause's drain timed out: this session is not served again; \
                     the frontend must reconnect"
                        .to_string(),
                )
            }
            Rings::Up(_) => {
                self.paused = false;
                return Ok("resumed".to_string());
            }
        }
        let Storage::Open(open) = &self.storage else {
            return Err("the storage is being reopened; try again".to_string());
        };
        let (config, disk) = (open.config.clone(), open.disk.clone());
        let (params, features) = (s.frontend.clone(), s.features);
        // As an adoption: the rings are used, their journals gone with the drain.
        match self.connect_rings(ctx, &config, &disk, &params, &features, true) {
            Ok(vbd) => {
                if let Phase::Connected(s) = &mut self.phase {
                    s.rings = Rings::Up(vbd);
                    s.id = self.session_id;
                }
                self.paused = false;
                info!(device = %self.key, "resumed");
                Ok("resumed".to_string())
            }
            Err(e) => {
                let text = format!("resume failed: {e}");
                if let Err(store) = self.fail(ctx, &e, fx) {
                    warn!(device = %self.key, error = %store, "failing the device after a failed resume");
                }
                Err(text)
            }
        }
    }

    /// Closes the storage and opens what the backend's nodes name now (answered when the
    /// open reports, in [`Device::opened`]). Only while paused and drained.
    pub fn reopen(&mut self, ctx: &Ctx<'_>, reply: DeviceReply, fx: &mut Vec<Effect>) {
        if let Err(e) = self.try_reopen(ctx, fx, &reply) {
            let _ = reply.send(Err(e));
        }
    }

    fn try_reopen(
        &mut self,
        ctx: &Ctx<'_>,
        fx: &mut Vec<Effect>,
        reply: &DeviceReply,
    ) -> Result<(), String> {
        if !self.paused {
            return Err("reopen only while paused (xenblkd pause first)".to_string());
        }
        match &self.phase {
            Phase::Connected(s) if !matches!(s.rings, Rings::Released) => {
                return Err(format!(
                    "the rings are not released ({:?}); reopen after the pause has drained",
                    s.rings
                ))
            }
            Phase::Disconnecting { .. } => return Err("the device is disconnecting".to_string()),
            _ => {}
        }
        let size_before = match &self.storage {
            Storage::Open(o) => o.info.size_bytes,
            Storage::Opening { .. } => return Err("an open is already in progress".to_string()),
            Storage::Closed => 0,
        };
        let nodes = self
            .read_backend(ctx, fx)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "the backend directory cannot be read now".to_string())?;
        let config = negotiate::device_config(
            &self.key.backend_type,
            self.key.devid,
            &self.backend_path,
            &nodes,
            self.settings(ctx),
        )
        .map_err(|e| e.to_string())?;
        info!(device = %self.key, target = %config.target.path.display(), "reopening the storage");
        // The old storage goes first, and its image locks with it: the new target may be
        // the same file, or have the old one as its backing file.
        self.storage = Storage::Closed;
        self.start_open(config, fx);
        self.waiters.reopen = Some(Reopen {
            replies: vec![reply.clone()],
            size_before,
        });
        Ok(())
    }
}
