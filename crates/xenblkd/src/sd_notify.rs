//! Tells systemd how `serve` is doing (sd_notify(3)): `READY=1` once the control socket
//! answers and the xenstore watches are registered, `RELOADING=1` then `READY=1` around a
//! configuration reload, `STOPPING=1` when shutting down or handing over, and `STATUS=`
//! lines `systemctl status` shows. Outside systemd (`NOTIFY_SOCKET` unset) every call does
//! nothing.
//!
//! The protocol is one datagram per message on the unix socket `NOTIFY_SOCKET` names (a
//! path, or `@name` in the abstract namespace); it is small enough not to need a crate.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;

/// Where notifications go, if systemd asked for them.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` asks for. The variable is removed from the environment
    /// so that no child (a hotplug helper, the device model) talks to systemd as us.
    pub fn from_env() -> anyhow::Result<Notifier> {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return Ok(Notifier { target: None });
        };
        std::env::remove_var("NOTIFY_SOCKET");
        let path = path
            .into_string()
            .map_err(|p| anyhow::anyhow!("NOTIFY_SOCKET is not UTF-8: {p:?}"))?;
        let addr = match path.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
            None => SocketAddr::from_pathname(&path),
        }
        .with_context(|| format!("NOTIFY_SOCKET={path}"))?;
        let socket = UnixDatagram::unbound().context("creating the sd_notify socket")?;
        Ok(Notifier {
            target: Some((socket, addr)),
        })
    }

    /// Sends one message (`KEY=VALUE` lines). A failure is logged, not fatal: systemd
    /// times the service out if readiness never arrives, which says more than we could.
    pub fn send(&self, message: &str) {
        let Some((socket, addr)) = &self.target else {
            return;
        };
        if let Err(e) = socket.send_to_addr(message.as_bytes(), addr) {
            tracing::warn!(error = %e, message, "sd_notify");
        }
    }

    /// The service is up.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// A reload starts; `MONOTONIC_USEC` lets systemd (Type=notify-reload) match it to the
    /// reload it asked for.
    pub fn reloading(&self) {
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()));
    }

    /// The service is going away.
    pub fn stopping(&self, status: &str) {
        self.send(&format!("STOPPING=1\nSTATUS={status}"));
    }
}

/// CLOCK_MONOTONIC in microseconds, as sd_notify's `MONOTONIC_USEC` wants it.
fn monotonic_usec() -> u128 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => (t.tv_sec() as u128) * 1_000_000 + (t.tv_nsec() as u128) / 1000,
        // Never on Linux; the realtime clock is a harmless stand-in.
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_the_socket_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let addr = SocketAddr::from_pathname(&path).unwrap();
        let n = Notifier {
            target: Some((UnixDatagram::unbound().unwrap(), addr)),
        };
        n.ready("serving");
        n.reloading();
        n.stopping("bye");
        let mut buf = [0u8; 256];
        let mut got = Vec::new();
        for _ in 0..3 {
            let len = listener.recv(&mut buf).unwrap();
            got.push(String::from_utf8(buf[..len].to_vec()).unwrap());
        }
        assert_eq!(got[0], "READY=1\nSTATUS=serving");
        assert!(
            got[1].starts_with("RELOADING=1\nMONOTONIC_USEC="),
            "{}",
            got[1]
        );
        assert_eq!(got[2], "STOPPING=1\nSTATUS=bye");
        // Unset: nothing is sent and nothing fails.
        Notifier { target: None }.ready("x");
    }
}
