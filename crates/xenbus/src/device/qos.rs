//! `xenblkd limit <device>`: a device's QoS limits and group, changed live.
//!
//! The operator's change is the device's from then on: it applies to the rings at once
//! (the engine re-reads them with the next request) and to every later session, over what
//! the configuration says, until the daemon stops. A handover or restart does not carry it
//! (the next daemon applies its configuration), as with a pause.

use tracing::info;

use super::{Ctx, Device, DeviceReply, Phase, Rings};
use crate::qos::{DeviceQos, LimitChange};

impl Device {
    /// The QoS a session connected now gets: the operator's, else the configuration's.
    pub(super) fn qos(&self, ctx: &Ctx<'_>) -> DeviceQos {
        self.qos_live
            .clone()
            .unwrap_or_else(|| self.settings(ctx).device_qos())
    }

    /// Applies (or, for an empty change, shows) the device's limits.
    pub fn limit(&mut self, ctx: &Ctx<'_>, change: &LimitChange, reply: DeviceReply) {
        let current = self.qos(ctx);
        if change.is_query() {
            let _ = reply.send(Ok(current.to_string()));
            return;
        }
        let qos = match change.apply(&current) {
            Ok(q) => q,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let live = match &self.phase {
            Phase::Connected(s) => match &s.rings {
                Rings::Up(vbd) => {
                    vbd.set_qos(&qos);
                    "in force"
                }
                _ => "in force once the rings are served again",
            },
            _ => "in force from the next connection",
        };
        info!(device = %self.key, domid = self.key.domid, %qos, "QoS limits set");
        self.qos_shown = qos.clone();
        self.qos_live = Some(qos.clone());
        let _ = reply.send(Ok(format!("{qos} ({live})")));
    }
}
