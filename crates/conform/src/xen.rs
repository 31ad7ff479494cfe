//! Real Xen, from inside a domU: the backend the toolstack attached to one of this
//! guest's vbds (kernel blkback, QEMU qdisk, xenblkd, any other), driven by a userspace
//! frontend. The guest's kernel must leave the vbd alone (`xen-blkfront` unloaded, or
//! the device not claimed).
//!
//! Memory and grants come from `/dev/xen/gntalloc` (a page is granted when allocated,
//! with its access fixed then), event channels from `/dev/xen/evtchn` (unbound ports for
//! the backend's domain), xenstore from `/dev/xen/xenbus`. Between connections the
//! frontend walks the device back to Closed and then Initialising, which blkback answers
//! with InitWait (`frontend_changed`: "prepare for reconnect").
//!
//! **Written for the lab, not run here** (no Xen on the build machines).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use blkfront::guest::{EndAccessError, Frame, GrantRef, GuestError, Port};
use blkfront::{Guest, GuestEventChannel};
use platform::linux::guest::{Gntalloc, GrantedPages, UnboundEventChannel};
use shmem::{SharedMemory, PAGE_SIZE};
use xenstore::{XenbusState, XsClient, XsOps};

use crate::target::{Device, DeviceRequest, Leaks, Target, TargetError};

/// One frame: a page of a gntalloc allocation.
#[derive(Debug, Clone)]
struct FrameSlot {
    pages: Arc<GrantedPages>,
    index: usize,
}

#[derive(Debug, Default)]
struct Table {
    next: Frame,
    frames: HashMap<Frame, FrameSlot>,
    /// Grants made for another domain or read-only: pages of their own, with the
    /// frame they stand for.
    aliases: HashMap<GrantRef, (Frame, Arc<GrantedPages>)>,
}

/// [`Guest`] over gntalloc and evtchn.
///
/// gntalloc grants a page when it allocates it, to one domain with access fixed then, and
/// ends the grant only when the page is freed. So each frame is allocated granted
/// writable to the backend, and [`Guest::grant_access`] for the backend with write
/// access returns that grant. A read-only grant, or one for another domain, gets a page
/// of its own (an alias) holding a copy of the frame, and every later write to the
/// frame is written to its aliases too; the backend never writes an alias (it may not),
/// so reads from the frame see what the guest sees. [`Guest::end_access`] of a frame's own grant takes effect when the
/// frame is freed; a backend still mapping it is invisible from userspace (gntalloc
/// defers the release), so leaks are not observable here.
#[derive(Debug)]
pub struct LinuxGuest {
    gntalloc: Gntalloc,
    evtchn: PathBuf,
    backend_domid: u16,
    table: Mutex<Table>,
}

fn perr(op: &'static str) -> impl FnOnce(platform::PlatformError) -> GuestError {
    move |e| GuestError::platform(op, e)
}

impl LinuxGuest {
    pub fn open(backend_domid: u16) -> Result<Self, platform::PlatformError> {
        Ok(LinuxGuest {
            gntalloc: Gntalloc::open()?,
            evtchn: PathBuf::from("/dev/xen/evtchn"),
            backend_domid,
            table: Mutex::new(Table::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self, frame: Frame) -> Result<FrameSlot, GuestError> {
        self.lock()
            .frames
            .get(&frame)
            .cloned()
            .ok_or(GuestError::BadFrame(frame))
    }
}

struct Evtchn(UnboundEventChannel);

impl GuestEventChannel for Evtchn {
    fn port(&self) -> Port {
        self.0.port()
    }
    fn notify(&self) -> Result<(), GuestError> {
        self.0.notify().map_err(perr("notify"))
    }
    fn wait(&self, timeout: Duration) -> Result<bool, GuestError> {
        self.0.wait(timeout).map_err(perr("wait for an event"))
    }
}

impl Guest for LinuxGuest {
    fn alloc_frames(&self, count: usize) -> Result<Vec<Frame>, GuestError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let pages = self
            .gntalloc
            .alloc(self.backend_domid, count, false)
            .map_err(|_| GuestError::OutOfMemory { wanted: count })?;
        let mut t = self.lock();
        let first = t.next;
        t.next += count as Frame;
        for i in 0..count {
            t.frames.insert(
                first + i as Frame,
                FrameSlot {
                    pages: pages.clone(),
                    index: i,
                },
            );
        }
        Ok((first..first + count as Frame).collect())
    }

    fn free_frames(&self, frames: &[Frame]) {
        let mut t = self.lock();
        for f in frames {
            t.frames.remove(f);
        }
        t.aliases.retain(|_, (f, _)| !frames.contains(f));
    }

    fn read_frame(&self, frame: Frame, offset: usize, dst: &mut [u8]) -> Result<(), GuestError> {
        let s = self.slot(frame)?;
        if offset + dst.len() > PAGE_SIZE {
            return Err(GuestError::BadFrame(frame));
        }
        s.pages
            .memory()
            .read(s.index * PAGE_SIZE + offset, dst)
            .map_err(|_| GuestError::BadFrame(frame))
    }

    fn write_frame(&self, frame: Frame, offset: usize, src: &[u8]) -> Result<(), GuestError> {
        let s = self.slot(frame)?;
        if offset + src.len() > PAGE_SIZE {
            return Err(GuestError::BadFrame(frame));
        }
        s.pages
            .memory()
            .write(s.index * PAGE_SIZE + offset, src)
            .map_err(|_| GuestError::BadFrame(frame))?;
        let aliases: Vec<Arc<GrantedPages>> = self
            .lock()
            .aliases
            .values()
            .filter(|(f, _)| *f == frame)
            .map(|(_, p)| p.clone())
            .collect();
        for a in aliases {
            a.memory()
                .write(offset, src)
                .map_err(|_| GuestError::BadFrame(frame))?;
        }
        Ok(())
    }

    fn map_frames(&self, frames: &[Frame]) -> Result<SharedMemory, GuestError> {
        // Rings are allocated as one gntalloc batch and mapped whole.
        let first = frames
            .first()
            .ok_or(GuestError::OutOfMemory { wanted: 0 })?;
        let s = self.slot(*first)?;
        let whole = s.pages.grefs().len() == frames.len()
            && frames.iter().enumerate().all(|(i, f)| {
                self.slot(*f)
                    .is_ok_and(|o| Arc::ptr_eq(&o.pages, &s.pages) && o.index == i)
            });
        if !whole {
            return Err(GuestError::platform(
                "map ring frames",
                "ring frames must be one whole allocation",
            ));
        }
        Ok(s.pages.view())
    }

    fn grant_access(
        &self,
        domid: u16,
        frame: Frame,
        readonly: bool,
    ) -> Result<GrantRef, GuestError> {
        let s = self.slot(frame)?;
        if domid == self.backend_domid && !readonly {
            return Ok(s.pages.grefs()[s.index]);
        }
        let alias = self
            .gntalloc
            .alloc(domid, 1, readonly)
            .map_err(|_| GuestError::OutOfGrants)?;
        let mut copy = vec![0u8; PAGE_SIZE];
        self.read_frame(frame, 0, &mut copy)?;
        alias
            .memory()
            .write(0, &copy)
            .map_err(|_| GuestError::BadFrame(frame))?;
        let g = alias.grefs()[0];
        self.lock().aliases.insert(g, (frame, alias));
        Ok(g)
    }

    fn end_access(&self, gref: GrantRef) -> Result<(), EndAccessError> {
        let mut t = self.lock();
        if t.aliases.remove(&gref).is_some() {
            return Ok(());
        }
        // A frame's own grant: ended when the frame is freed. A revoked grant a case
        // wants stale right away is dropped with its frame: find it and free it.
        let frame = t
            .frames
            .iter()
            .find(|(_, s)| s.pages.grefs().get(s.index) == Some(&gref))
            .map(|(f, s)| (*f, s.pages.grefs().len()));
        if let Some((f, 1)) = frame {
            t.frames.remove(&f);
        }
        Ok(())
    }

    fn alloc_event_channel(&self, remote: u16) -> Result<Box<dyn GuestEventChannel>, GuestError> {
        let ch = UnboundEventChannel::alloc(&self.evtchn, remote).map_err(perr("alloc evtchn"))?;
        Ok(Box::new(Evtchn(ch)))
    }
}

/// The real-Xen target.
#[derive(Debug)]
pub struct XenTarget {
    guest: Arc<LinuxGuest>,
    domid: u32,
    vbd: u32,
    ro_vbd: Option<u32>,
    backend_domid: u16,
    label: String,
}

impl XenTarget {
    /// Uses vbd `vbd` (and `ro_vbd`, attached read-only, for the read-only cases).
    pub fn open(vbd: u32, ro_vbd: Option<u32>, label: &str) -> anyhow::Result<Self> {
        let xs = xs()?;
        let domid: u32 = String::from_utf8_lossy(&xs.read("domid")?).trim().parse()?;
        let fe = format!("/local/domain/{domid}/device/vbd/{vbd}");
        let backend_domid: u16 = String::from_utf8_lossy(&xs.read(&format!("{fe}/backend-id"))?)
            .trim()
            .parse()?;
        Ok(XenTarget {
            guest: Arc::new(LinuxGuest::open(backend_domid)?),
            domid,
            vbd,
            ro_vbd,
            backend_domid,
            label: label.to_owned(),
        })
    }
}

fn xs() -> anyhow::Result<XsClient> {
    Ok(XsClient::open_xenbus_device("/dev/xen/xenbus")?)
}

/// The frontend nodes libxl writes (`libxl__device_disk_add`, `libxl__device_generic_add`);
/// every other node in `device/vbd/<id>` is a frontend's negotiation.
const TOOLSTACK_NODES: &[&str] = &[
    "backend",
    "backend-id",
    "state",
    "virtual-device",
    "device-type",
    "trusted",
];

/// Removes every node of the frontend directory `fe` a frontend wrote.
pub fn clear_frontend_nodes(xs: &impl XsOps, fe: &str) -> xenstore::Result<()> {
    for k in xs.directory(fe)? {
        if !TOOLSTACK_NODES.contains(&k.as_str()) {
            match xs.rm(&format!("{fe}/{k}")) {
                Err(e) if e.is_not_found() => {}
                other => other?,
            }
        }
    }
    Ok(())
}

fn state(xs: &XsClient, dir: &str) -> XenbusState {
    xs.read_opt(&format!("{dir}/state"))
        .ok()
        .flatten()
        .and_then(|v| XenbusState::parse(&v))
        .unwrap_or(XenbusState::Unknown)
}

fn wait(xs: &XsClient, dir: &str, pred: impl Fn(XenbusState) -> bool) -> XenbusState {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = state(xs, dir);
        if pred(s) || Instant::now() >= deadline {
            return s;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

impl Target for XenTarget {
    fn name(&self) -> String {
        format!("xen:{}", self.label)
    }

    fn guest(&self) -> Arc<dyn Guest> {
        self.guest.clone()
    }

    fn open_device(&mut self, req: &DeviceRequest) -> Result<Device, TargetError> {
        let vbd = if req.read_only {
            self.ro_vbd.ok_or_else(|| {
                TargetError::Unsupported("no read-only vbd given (--ro-vbd)".into())
            })?
        } else {
            self.vbd
        };
        let xs = xs().map_err(TargetError::failed)?;
        let fe = format!("/local/domain/{}/device/vbd/{vbd}", self.domid);
        let be = String::from_utf8_lossy(
            &xs.read(&format!("{fe}/backend"))
                .map_err(TargetError::failed)?,
        )
        .into_owned();
        if req.no_discard {
            let d = xs.read_opt(&format!("{be}/feature-discard")).ok().flatten();
            if d.as_deref() == Some(b"1") {
                return Err(TargetError::Unsupported(
                    "the lab's vbd offers discard".into(),
                ));
            }
        }
        // Back to a fresh connection: Closed, then Initialising (blkback answers InitWait).
        let w = |k: &str, s: XenbusState| xs.write(&format!("{fe}/{k}"), s.node_value());
        if state(&xs, &be) != XenbusState::InitWait {
            w("state", XenbusState::Closing).map_err(TargetError::failed)?;
            wait(&xs, &be, |s| s >= XenbusState::Closing);
            w("state", XenbusState::Closed).map_err(TargetError::failed)?;
            wait(&xs, &be, |s| s == XenbusState::Closed);
        }
        // The frontend directory outlives connections here (on the simulator every case
        // gets a fresh device): a previous case's nodes (`multi-queue-num-queues` 0,
        // `ring-page-order` "two", queue-N/...) would poison this one. Everything but
        // what the toolstack wrote goes, as a fresh blkfront would find it.
        clear_frontend_nodes(&xs, &fe).map_err(TargetError::failed)?;
        w("state", XenbusState::Initialising).map_err(TargetError::failed)?;
        let s = wait(&xs, &be, |s| s == XenbusState::InitWait);
        if s != XenbusState::InitWait {
            return Err(TargetError::failed(format!(
                "{be} is {s:?}, not InitWait, after the frontend reinitialised"
            )));
        }
        Ok(Device {
            frontend_path: fe,
            backend_path: be,
            backend_domid: self.backend_domid,
            xs,
            handle: (vbd & 0xffff) as u16,
        })
    }

    fn release_device(&mut self, _frontend: &str, _backend: &str) -> Result<(), TargetError> {
        Ok(())
    }

    fn kill_guest_device(&mut self, _fe: &str, _be: &str) -> Result<(), TargetError> {
        Err(TargetError::Unsupported(
            "the suite runs inside the guest it would kill".into(),
        ))
    }

    fn leaks(&self) -> Option<Leaks> {
        None
    }

    fn io_timeout(&self) -> Duration {
        Duration::from_secs(30)
    }

    fn state_timeout(&self) -> Duration {
        Duration::from_secs(10)
    }
}
