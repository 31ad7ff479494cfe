//! The simulator across two processes: a guest in a child process (this test binary
//! re-executed with `GUEST_SOCKET_ENV` set, running only `guest_process_entry`) and the
//! backend here, talking through the `platform` traits only.
//!
//! The child is driven over its stdin/stdout with one-line commands; its answers start
//! with `@@ ` so the test harness's own output around them is ignored.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixListener;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use platform::grant_table::{GTF_PERMIT_ACCESS, GTF_READING, GTF_READONLY, GTF_WRITING};
use platform::sim::{GuestConfig, GuestError, SimGuest, SimPlatform};
use platform::{
    Access, CopyDirection, DomId, EventChannelBinder, GrantCopyOp, GrantMapper, GrantStatus,
    PAGE_SIZE,
};

const GUEST_SOCKET_ENV: &str = "XENBLKD_PLATFORM_TEST_GUEST_SOCKET";
const GUEST: DomId = 7;
const PAGES: u32 = 64;
const ENTRIES: u32 = 256;
const TIMEOUT: Duration = Duration::from_secs(10);

/// Byte `i` of guest page `frame` as the guest fills it.
fn pattern(frame: u32, i: usize) -> u8 {
    (frame as usize * 31 + i * 7) as u8
}

// ---------------------------------------------------------------- guest (child) side

/// Entry point of the child process; does nothing in an ordinary test run.
#[test]
fn guest_process_entry() {
    let Ok(socket) = std::env::var(GUEST_SOCKET_ENV) else {
        return;
    };
    let say = |s: String| {
        println!("@@ {s}");
        std::io::stdout().flush().unwrap();
    };
    let guest = SimGuest::connect(
        &socket,
        GUEST,
        GuestConfig {
            pages: PAGES,
            grant_entries: ENTRIES,
        },
    )
    .expect("guest connects");
    for f in 0..PAGES {
        let page: Vec<u8> = (0..PAGE_SIZE).map(|i| pattern(f, i)).collect();
        guest.write_page(f, 0, &page).unwrap();
    }
    let g = |domid, frame, ro| guest.grant_access(domid, frame, ro).unwrap();
    let mut refs = vec![
        ("rw", g(0, 1, false)),
        ("ro", g(0, 2, true)),
        ("other", g(5, 3, false)),
        ("oob", g(0, PAGES + 1000, false)),
        ("wt", g(0, 4, false)),
        ("cfrom", g(0, 5, true)),
        ("cto", g(0, 6, false)),
    ];
    for (i, f) in (10..14).enumerate() {
        refs.push((["ring0", "ring1", "ring2", "ring3"][i], g(0, f, false)));
    }
    let evtchn = guest.alloc_event_channel(0).unwrap();
    let mut ready: Vec<String> = refs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    ready.push(format!("port={}", evtchn.port()));
    say(format!("READY {}", ready.join(" ")));

    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let mut words = line.split_whitespace();
        let cmd = words.next().unwrap_or("");
        let arg = words.next().and_then(|a| a.parse::<u32>().ok());
        match cmd {
            "CHECK_WRITES" => {
                let mut a = [0u8; 22];
                guest.read_page(4, 0, &mut a).unwrap();
                let mut b = [0u8; 19];
                guest.read_page(6, 300, &mut b).unwrap();
                let mut c = [0u8; 4];
                guest.read_page(6, 296, &mut c).unwrap();
                let untouched = c.iter().enumerate().all(|(i, &x)| x == pattern(6, 296 + i));
                if &a == b"written by the backend" && &b == b"copied to the guest" && untouched {
                    say("OK".into());
                } else {
                    say(format!("BAD {a:?} {b:?} {c:?}"));
                }
            }
            "FLAGS" => say(format!(
                "FLAGS {}",
                guest.grant_entry(arg.unwrap()).unwrap().flags
            )),
            "END" => match guest.end_access(arg.unwrap()) {
                Ok(()) => say("END ok".into()),
                Err(GuestError::EndAccess(_)) => {
                    say(format!("END busy failures={}", guest.end_access_failures()))
                }
                Err(e) => say(format!("END error {e}")),
            },
            "WAIT_EVENT" => {
                let got = evtchn.wait(TIMEOUT).unwrap();
                say(format!("EVENT {}", if got { "yes" } else { "no" }));
            }
            "NOTIFY" => {
                evtchn.notify().unwrap();
                say("NOTIFIED".into());
            }
            "SLEEP" => {
                say("SLEEPING".into());
                loop {
                    std::thread::sleep(Duration::from_secs(60));
                }
            }
            other => say(format!("UNKNOWN {other}")),
        }
    }
}

// ---------------------------------------------------------------- backend (parent) side

/// The child process; killed on drop so a failing assertion never leaves it behind.
struct GuestProcess {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl GuestProcess {
    fn spawn(socket: &std::path::Path) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "guest_process_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(GUEST_SOCKET_ENV, socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn guest process");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest may print "test guest_process_entry ... " on the same line.
                if let Some(at) = line.find("@@ ") {
                    if tx.send(line[at + 3..].to_string()).is_err() {
                        break;
                    }
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
        }
    }

    fn recv(&self) -> String {
        self.lines
            .recv_timeout(TIMEOUT)
            .expect("guest process answered in time")
    }

    fn ask(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        self.recv()
    }
}

impl Drop for GuestProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
    let mut fds = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    let ts = rustix::event::Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: timeout.subsec_nanos().into(),
    };
    rustix::event::poll(&mut fds, Some(&ts)).unwrap() > 0
}

#[test]
fn two_process_guest_and_backend() {
    if std::env::var_os(GUEST_SOCKET_ENV).is_some() {
        return; // we are the child: only guest_process_entry runs there
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("guest.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let platform = SimPlatform::new();
    let mut guest = GuestProcess::spawn(&socket);
    let handle = platform
        .accept_timeout(&listener, TIMEOUT)
        .expect("guest attaches");
    assert_eq!(handle.domid(), GUEST);
    assert_eq!(handle.nr_frames(), PAGES);
    assert!(handle.is_alive());

    let ready = guest.recv();
    let r: HashMap<&str, u32> = ready
        .strip_prefix("READY ")
        .expect("READY line")
        .split_whitespace()
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k, v.parse().unwrap())
        })
        .collect();
    let map = |refs: &[u32], access| platform.map(GUEST, refs, access);
    let failure = |refs: &[u32], access| {
        let e = map(refs, access).expect_err("map must fail");
        (e.index(), e.status())
    };

    // --- Grant checks: exactly Xen's answers (map_grant_ref / _set_status_v1).
    let never = 200; // inside the table, never granted
    assert_eq!(
        failure(&[r["ro"]], Access::ReadWrite),
        (Some(0), GrantStatus::GENERAL_ERROR)
    );
    assert_eq!(
        failure(&[r["other"]], Access::ReadOnly),
        (Some(0), GrantStatus::GENERAL_ERROR)
    );
    assert_eq!(
        failure(&[never], Access::ReadOnly),
        (Some(0), GrantStatus::GENERAL_ERROR)
    );
    assert_eq!(
        failure(&[r["oob"]], Access::ReadOnly),
        (Some(0), GrantStatus::BAD_PAGE)
    );
    assert_eq!(
        failure(&[ENTRIES + 3], Access::ReadOnly),
        (Some(0), GrantStatus::BAD_GNTREF)
    );
    // One bad entry fails the whole batch (its request), naming the entry.
    assert_eq!(
        failure(&[r["rw"], r["ro"], r["oob"]], Access::ReadOnly),
        (Some(2), GrantStatus::BAD_PAGE)
    );
    let e = platform.map(99, &[r["rw"]], Access::ReadOnly).unwrap_err();
    assert_eq!(e.status(), GrantStatus::BAD_DOMAIN);
    assert_eq!(platform.live_mappings(), 0);
    assert_eq!(
        guest.ask(&format!("FLAGS {}", r["ro"])),
        format!("FLAGS {}", GTF_PERMIT_ACCESS | GTF_READONLY)
    );

    // --- Reading guest-written data through the mapping.
    let ro = map(&[r["ro"]], Access::ReadOnly).unwrap();
    let mut page = vec![0u8; PAGE_SIZE];
    ro.read(0, &mut page).unwrap();
    assert!(page.iter().enumerate().all(|(i, &b)| b == pattern(2, i)));
    assert!(ro.write(0, b"x").is_err());
    let rw = map(&[r["rw"]], Access::ReadWrite).unwrap();
    rw.read(0, &mut page).unwrap();
    assert!(page.iter().enumerate().all(|(i, &b)| b == pattern(1, i)));

    // --- A 4-page ring: one contiguous region, page i = ring ref i.
    let ring_refs = [r["ring0"], r["ring1"], r["ring2"], r["ring3"]];
    let ring = map(&ring_refs, Access::ReadWrite).unwrap();
    assert_eq!(ring.len(), 4 * PAGE_SIZE);
    for i in 0..4 {
        assert_eq!(
            ring.page_ptr(i).unwrap() as usize,
            ring.as_ptr() as usize + i * PAGE_SIZE
        );
        let mut b = [0u8; 16];
        ring.read(i * PAGE_SIZE + 4000, &mut b).unwrap();
        assert!(b
            .iter()
            .enumerate()
            .all(|(j, &x)| x == pattern(10 + i as u32, 4000 + j)));
    }

    // --- Writing data the guest verifies, by map and by grant copy (both ways).
    let wt = map(&[r["wt"]], Access::ReadWrite).unwrap();
    wt.write(0, b"written by the backend").unwrap();
    drop(wt);
    let mut from_guest = [0u8; 64];
    let bounce = platform::SharedMemory::anonymous(PAGE_SIZE).unwrap();
    {
        let mut ops = [
            GrantCopyOp::from_guest(GUEST, r["cfrom"], 1000, &mut from_guest),
            GrantCopyOp::to_guest(GUEST, r["cto"], 300, b"copied to the guest"),
            GrantCopyOp::to_guest(GUEST, r["cfrom"], 0, b"refused: read-only"),
            GrantCopyOp::to_guest(GUEST, r["cto"], 4090, b"crosses the page"),
            GrantCopyOp::with_shared(CopyDirection::FromGuest, GUEST, r["ro"], 0, &bounce, 8, 100)
                .unwrap(),
        ];
        platform.copy(&mut ops).unwrap();
        let statuses: Vec<_> = ops.iter().map(|o| o.status()).collect();
        assert_eq!(
            statuses,
            [
                GrantStatus::OKAY,
                GrantStatus::OKAY,
                GrantStatus::GENERAL_ERROR,
                GrantStatus::BAD_COPY_ARG,
                GrantStatus::OKAY
            ]
        );
    }
    assert!(from_guest
        .iter()
        .enumerate()
        .all(|(i, &b)| b == pattern(5, 1000 + i)));
    let mut b = [0u8; 100];
    bounce.read(8, &mut b).unwrap();
    assert!(b.iter().enumerate().all(|(i, &x)| x == pattern(2, i)));
    assert_eq!(guest.ask("CHECK_WRITES"), "OK");

    // --- Revoking while mapped fails (and is counted); after unmap it succeeds.
    let flags = guest.ask(&format!("FLAGS {}", r["rw"]));
    assert_eq!(
        flags,
        format!("FLAGS {}", GTF_PERMIT_ACCESS | GTF_READING | GTF_WRITING)
    );
    assert_eq!(
        guest.ask(&format!("END {}", r["rw"])),
        "END busy failures=1"
    );
    drop(rw);
    assert_eq!(
        guest.ask(&format!("FLAGS {}", r["rw"])),
        format!("FLAGS {GTF_PERMIT_ACCESS}")
    );
    assert_eq!(guest.ask(&format!("END {}", r["rw"])), "END ok");
    assert_eq!(
        guest.ask(&format!("END {}", r["ro"])),
        "END busy failures=2"
    );
    drop(ro);
    assert_eq!(guest.ask(&format!("END {}", r["ro"])), "END ok");

    // --- Event channels wake both sides.
    let ch = platform
        .bind_interdomain(GUEST, r["port"])
        .expect("bind the guest's port");
    assert!(!ch.ack().unwrap());
    writeln!(guest.stdin, "WAIT_EVENT").unwrap();
    guest.stdin.flush().unwrap();
    ch.notify().unwrap();
    assert_eq!(guest.recv(), "EVENT yes");
    assert!(!wait_readable(ch.fd(), Duration::ZERO));
    assert_eq!(guest.ask("NOTIFY"), "NOTIFIED");
    assert!(
        wait_readable(ch.fd(), TIMEOUT),
        "backend fd readable after guest notify"
    );
    assert!(ch.ack().unwrap());
    assert!(!ch.ack().unwrap());

    // --- SIGKILL the guest mid-I/O (the ring still mapped): noticed, bounded, no fault.
    assert_eq!(guest.ask("SLEEP"), "SLEEPING");
    assert!(handle.is_alive());
    let killed_at = Instant::now();
    guest.child.kill().unwrap();
    assert!(
        handle.wait_for_exit(TIMEOUT),
        "liveness fd readable/HUP after SIGKILL"
    );
    assert!(killed_at.elapsed() < TIMEOUT);
    assert!(!handle.is_alive());
    let status = guest.child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    // The dead guest's memory stays valid under our mappings; notifies go nowhere.
    ring.write(0, b"after death").unwrap();
    let mut b = [0u8; 11];
    ring.read(0, &mut b).unwrap();
    assert_eq!(&b, b"after death");
    ch.notify().unwrap();
    assert!(!ch.ack().unwrap());
    // Tearing the domain down: new maps fail cleanly.
    platform.detach(GUEST).unwrap();
    assert_eq!(
        failure(&[r["cto"]], Access::ReadOnly),
        (Some(0), GrantStatus::BAD_DOMAIN)
    );
    assert!(platform.bind_interdomain(GUEST, r["port"]).is_err());
    drop(ch);
    drop(ring);
    assert_eq!(platform.live_mappings(), 0);
    assert_eq!(platform.mapped_pages(), 0);
}
