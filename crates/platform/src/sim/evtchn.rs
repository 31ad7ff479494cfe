//! Event channels of the simulated hypervisor: binding a backend end to a port a guest
//! offered ([`EventChannelBinder`] for [`SimPlatform`]) and the bound channel itself, a
//! pair of eventfds shared with the guest.

use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use eventfd::EventFd;

use super::{SimDomain, SimPlatform, PORT_OFFER_GRACE};
use crate::{DomId, EventChannel, EventChannelBinder, PlatformError, Port};
/// A bound simulated event channel: two eventfds shared with the guest.
#[derive(Debug)]
struct SimEventChannel {
    local_port: Port,
    remote_port: Port,
    to_backend: EventFd,
    to_guest: EventFd,
    dom: Arc<SimDomain>,
}

impl EventChannel for SimEventChannel {
    fn fd(&self) -> BorrowedFd<'_> {
        self.to_backend.as_fd()
    }

    fn notify(&self) -> Result<(), PlatformError> {
        self.to_guest
            .signal()
            .map_err(|e| PlatformError::io("evtchn notify", e))
    }

    fn ack(&self) -> Result<bool, PlatformError> {
        self.to_backend
            .try_drain()
            .map(|pending| pending > 0)
            .map_err(|e| PlatformError::io("evtchn ack", e))
    }

    fn local_port(&self) -> Port {
        self.local_port
    }

    fn remote(&self) -> (DomId, Port) {
        (self.dom.domid, self.remote_port)
    }
}

impl Drop for SimEventChannel {
    fn drop(&mut self) {
        // Back to "unbound": the frontend may be bound again after a reconnect.
        if let Some(p) = self.dom.control().ports.get_mut(&self.remote_port) {
            p.bound = false;
        }
    }
}

impl EventChannelBinder for SimPlatform {
    fn bind_interdomain(
        &self,
        domid: DomId,
        remote_port: Port,
    ) -> Result<Box<dyn EventChannel>, PlatformError> {
        let dom = self
            .lookup(domid)
            .ok_or(PlatformError::UnknownDomain(domid))?;
        let bad = |reason| PlatformError::BadPort {
            domid,
            port: remote_port,
            reason,
        };
        let mut ctl = dom.control();
        if !ctl.ports.contains_key(&remote_port) {
            dom.drain_control(&mut ctl);
        }
        if !ctl.ports.contains_key(&remote_port) && dom.attached_at.elapsed() < PORT_OFFER_GRACE {
            return Err(PlatformError::PortNotYetOffered {
                domid,
                port: remote_port,
            });
        }
        let p = ctl
            .ports
            .get_mut(&remote_port)
            .ok_or_else(|| bad("no such unbound port"))?;
        if p.remote_domid != self.inner.backend_domid {
            return Err(bad("port is offered to another domain"));
        }
        if p.bound {
            return Err(bad("port is already bound"));
        }
        let to_backend = p
            .to_backend
            .try_clone()
            .map_err(|e| PlatformError::io("dup eventfd", e))?;
        let to_guest = p
            .to_guest
            .try_clone()
            .map_err(|e| PlatformError::io("dup eventfd", e))?;
        p.bound = true;
        drop(ctl);
        let local_port = self.inner.next_port.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(domid, remote_port, local_port, "event channel bound");
        Ok(Box::new(SimEventChannel {
            local_port,
            remote_port,
            to_backend: to_backend.into(),
            to_guest: to_guest.into(),
            dom,
        }))
    }
}
