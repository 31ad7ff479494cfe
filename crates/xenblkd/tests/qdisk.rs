//! The `backendtype=qdisk` route across processes: libxl's qdisk disks, `xenblkd serve
//! --type qdisk`, and `xenblkd qemu-dm` started with the command line libxl gives QEMU.
//! A qdisk device is served only while the stand-in claims its domain; the stand-in
//! reports `running`, answers libxl's QMP conversation and exits on SIGHUP (libxl's
//! destroy), on its domain's death and on QMP `quit`, taking its claim with it.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{Host, Proc, WAIT, XENBLKD};
use serde_json::{json, Value};
use xenbus::devmodel;
use xenbus::store::{join, StoreExt};
use xenbus::toolstack::{self, DiskSpec};
use xenbus::XenbusState;

/// What `device_model_override` names.
const WRAPPER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/xenblkd-qemu-dm");

/// The device-model stand-in, as libxl starts it (`libxl__spawn_local_dm`).
struct StandIn {
    proc: Proc,
    qmp: PathBuf,
    log: PathBuf,
}

impl StandIn {
    fn start(host: &Host, domid: u32) -> StandIn {
        let qmp = host.dir.path().join(format!("qmp-libxl-{domid}"));
        let stat = host.dir.path().join(format!("qmp-libxenstat-{domid}"));
        let log = host.dir.path().join(format!("qemu-dm-{domid}.log"));
        let line = format!(
            "-xen-domid {domid} -no-shutdown \
             -chardev socket,id=libxl-cmd,path={},server=on,wait=off \
             -mon chardev=libxl-cmd,mode=control \
             -chardev socket,id=libxenstat-cmd,path={},server=on,wait=off \
             -mon chardev=libxenstat-cmd,mode=control \
             -nodefaults -no-user-config -xen-attach -name guest{domid} -vnc none \
             -display none -nographic -machine xenpv -m 513",
            qmp.display(),
            stat.display()
        );
        // Through the wrapper libxl is pointed at; it execs the binary, keeping the pid.
        let child = Command::new(WRAPPER)
            .env("XENBLKD", XENBLKD)
            .args(line.split_whitespace())
            // libxenstore's override, which is how the stand-in finds the simulated xenstored.
            .env("XENSTORED_PATH", host.xs_socket(0))
            // Where the disks' counters are (query-blockstats).
            .env("XENBLKD_CONTROL_SOCKET", &host.control)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut s = StandIn {
            proc: Proc {
                child,
                name: format!("qemu-dm d{domid}"),
            },
            qmp,
            log,
        };
        s.wait_running(host, domid);
        s
    }

    /// libxl's wait: `device-model/<domid>/state` reads `running`.
    fn wait_running(&mut self, host: &Host, domid: u32) {
        let state = join(&devmodel::device_model_dir(0, domid), "state");
        let deadline = Instant::now() + WAIT;
        while host.read(&state).as_deref() != Some("running") {
            if let Ok(Some(status)) = self.proc.child.try_wait() {
                panic!("qemu-dm exited with {status}\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "no running state\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the stand-in to exit and checks it exited cleanly.
    fn expect_exit(&mut self, why: &str) {
        let status = self
            .proc
            .wait_timeout(WAIT)
            .unwrap_or_else(|| panic!("qemu-dm still running after {why}\n{}", self.log()));
        assert!(status.success(), "{why}: {status}\n{}", self.log());
    }
}

/// A QMP client as libxl_qmp.c is one: messages split on "\r\n", integer ids.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Qmp {
    fn connect(path: &Path) -> (Qmp, Value) {
        let stream = UnixStream::connect(path).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
            next_id: 0x786c_7100,
        };
        let greeting = q.read();
        (q, greeting)
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        assert!(line.ends_with("\r\n"), "{line:?}");
        serde_json::from_str(line.trim_end()).unwrap()
    }

    fn execute(&mut self, cmd: &str) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"execute": cmd, "id": id});
        self.writer
            .write_all(format!("{msg}\r\n").as_bytes())
            .unwrap();
        let reply = self.read();
        assert_eq!(reply["id"], id, "{reply}");
        reply
    }
}

/// libxl's qdisk disk (`params` aio:PATH): written without waiting for any backend state.
fn qdisk(host: &Host, domid: u32, image: &Path) -> DiskSpec {
    let spec = DiskSpec::new("qdisk", domid, 51712, &format!("aio:{}", image.display()));
    toolstack::add_disk(host.xs.as_ref(), &spec).unwrap();
    spec
}

fn has_device(host: &Host, spec: &DiskSpec) -> bool {
    host.device_status("qdisk", spec.domid, spec.devid)
        .is_some()
}

/// Nothing of ours in the device: `state` as libxl wrote it, no feature published.
fn untouched(host: &Host, spec: &DiskSpec) {
    let be = spec.backend_path();
    assert_eq!(host.state(&be), XenbusState::Initialising, "{}", host.log());
    assert_eq!(host.read(&join(&be, "multi-queue-max-queues")), None);
    assert!(!has_device(host, spec), "{}", host.status_text());
}

#[test]
fn qdisk_is_served_only_for_domains_the_stand_in_claims() {
    let host = Host::start(&["--type", "qdisk", "--type", "xenblkd"]);
    for d in [5, 6, 7] {
        host.create_domain(d);
    }
    let ours = qdisk(&host, 5, &host.image("q5.img", 32));
    // Domain 7's device model is a real QEMU: it writes `state`, never a claim.
    let qemus = qdisk(&host, 7, &host.image("q7.img", 32));
    host.xs
        .write_str(&join(&devmodel::device_model_dir(0, 7), "state"), "running")
        .unwrap();
    // A device the daemon does serve, attached afterwards: once it is in InitWait the
    // daemon has been through the qdisk devices' watch events too.
    host.attach(&common::disk(
        "xenblkd",
        6,
        51712,
        &host.image("own.img", 8),
    ));
    untouched(&host, &ours);
    untouched(&host, &qemus);

    let mut dm = StandIn::start(&host, 5);
    assert_eq!(
        host.read(&devmodel::claim_path(0, 5)),
        Some(dm.proc.pid().to_string())
    );
    // What libxl asks once the state is `running`: it must get answers, or `xl create` fails.
    let (mut q, greeting) = Qmp::connect(&dm.qmp);
    assert!(
        greeting["QMP"]["version"]["qemu"]["major"].is_u64(),
        "{greeting}"
    );
    assert_eq!(q.execute("qmp_capabilities")["return"], json!({}));
    let chardevs = q.execute("query-chardev");
    let labels: Vec<&str> = chardevs["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["libxl-cmd", "libxenstat-cmd"]);
    assert_eq!(q.execute("query-status")["return"]["status"], "running");
    assert_eq!(
        q.execute("xen-save-devices-state")["error"]["class"],
        "CommandNotFound"
    );
    drop(q);
    // What the toolstack asked is in the device model's log (libxl's qemu-dm-<guest>.log).
    let deadline = Instant::now() + WAIT;
    while !dm
        .log()
        .contains("commands=qmp_capabilities query-chardev query-status xen-save-devices-state")
    {
        assert!(Instant::now() < deadline, "no QMP record\n{}", dm.log());
        thread::sleep(Duration::from_millis(10));
    }

    // The claimed domain's disk is served: a guest connects and does verified I/O.
    let be = ours.backend_path();
    host.wait_state(&be, XenbusState::InitWait);
    let mut g = host.guest(5, 51712, &[], "connect,io:64,flush,discard,wait-close");
    g.expect("ok connect");
    g.expect("ok io");
    g.expect("ok discard");
    host.wait_state(&be, XenbusState::Connected);
    // Domain 7 is still QEMU's, with a stand-in running next door.
    untouched(&host, &qemus);

    // libxl's destroy: SIGHUP to the device model. It exits, its claim goes, the daemon lets
    // the device go (the guest sees the backend Closed with every grant unmapped).
    dm.proc.signal(nix::sys::signal::Signal::SIGHUP);
    dm.expect_exit("SIGHUP");
    assert!(dm.log().contains("exiting"), "{}", dm.log());
    assert_eq!(host.read(&devmodel::claim_path(0, 5)), None);
    assert!(!dm.qmp.exists(), "QMP socket left behind");
    g.expect("ok wait-close");
    g.finish();
    host.wait_state(&be, XenbusState::Closed);
    let deadline = Instant::now() + WAIT;
    while has_device(&host, &ours) {
        assert!(Instant::now() < deadline, "{}", host.status_text());
        thread::sleep(Duration::from_millis(20));
    }
    // The directory is libxl's to remove.
    assert!(host.read(&join(&be, "frontend")).is_some());
    untouched(&host, &qemus);
}

/// xentop's way to a qdisk disk's figures (libxenstat's `xenstat_qmp.c`): the
/// `qmp-libxenstat-<domid>` monitor, `query-blockstats`, then `query-block` to match each
/// entry to its xenstore device by the image path in `params`.
#[test]
fn xentop_reads_qdisk_figures_over_qmp() {
    let host = Host::start(&["--type", "qdisk"]);
    host.create_domain(5);
    let image = host.image("q5.img", 16);
    let spec = qdisk(&host, 5, &image);
    let mut dm = StandIn::start(&host, 5);
    host.wait_state(&spec.backend_path(), XenbusState::InitWait);
    let stat = host.dir.path().join("qmp-libxenstat-5");
    let go = host.dir.path().join("go");
    let mut g = host.guest(
        5,
        51712,
        &[],
        &format!(
            "connect,wait-file:{},writes:5,reads:3,flush,wait-close",
            go.display()
        ),
    );
    g.expect("ok connect");
    // The counters start with the session: read them before the I/O as a baseline.
    let (mut q, _) = Qmp::connect(&stat);
    assert_eq!(q.execute("qmp_capabilities")["return"], json!({}));
    let before = q.execute("query-blockstats");
    let entry = &before["return"][0];
    assert_eq!(entry["device"], "xvda", "{before}");
    let base = |k: &str| entry["stats"][k].as_u64().unwrap();
    let (rd0, wr0, fl0, rdb0, wrb0) = (
        base("rd_operations"),
        base("wr_operations"),
        base("flush_operations"),
        base("rd_bytes"),
        base("wr_bytes"),
    );
    std::fs::write(&go, "").unwrap();
    g.expect("ok writes");
    g.expect("ok reads");
    g.expect("ok flush");
    let after = q.execute("query-blockstats");
    let list = after["return"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{after}");
    let s = &list[0]["stats"];
    let n = |k: &str| s[k].as_u64().unwrap();
    assert_eq!(n("wr_operations") - wr0, 5, "{after}");
    assert_eq!(n("rd_operations") - rd0, 3, "{after}");
    assert_eq!(n("flush_operations") - fl0, 1, "{after}");
    assert_eq!(n("wr_bytes") - wrb0, 5 * 4096, "{after}");
    assert_eq!(n("rd_bytes") - rdb0, 3 * 4096, "{after}");
    assert!(n("wr_total_time_ns") > 0, "{after}");
    // libxenstat compares `inserted.file` with `params` after its first '/'.
    let block = q.execute("query-block");
    assert_eq!(block["return"][0]["device"], "xvda");
    assert_eq!(
        block["return"][0]["inserted"]["file"],
        image.display().to_string(),
        "{block}"
    );
    drop(q);
    dm.proc.signal(nix::sys::signal::Signal::SIGHUP);
    dm.expect_exit("SIGHUP");
    // xentop polls every few seconds: its conversations stay out of the default log.
    let log = dm.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("query-blockstats"))
        .collect();
    assert!(!lines.is_empty(), "{log}");
    assert!(lines.iter().all(|l| l.contains("DEBUG")), "{log}");
    g.expect("ok wait-close");
    g.finish();
}

#[test]
fn the_stand_in_exits_with_its_domain_and_on_quit() {
    let host = Host::start(&["--type", "qdisk"]);
    host.create_domain(8);
    host.create_domain(9);
    let spec = qdisk(&host, 8, &host.image("q8.img", 16));
    let mut dm8 = StandIn::start(&host, 8);
    host.wait_state(&spec.backend_path(), XenbusState::InitWait);
    let mut dm9 = StandIn::start(&host, 9);

    // The guest dies without libxl's help: the stand-in notices and cleans up after itself.
    host.destroy_domain(8, &[&spec]);
    dm8.expect_exit("the domain's death");
    assert!(dm8.log().contains("the domain is gone"), "{}", dm8.log());
    assert_eq!(host.read(&devmodel::claim_path(0, 8)), None);

    // QMP `quit`, as to QEMU.
    let (mut q, _) = Qmp::connect(&dm9.qmp);
    q.execute("qmp_capabilities");
    assert_eq!(q.execute("quit")["return"], json!({}));
    dm9.expect_exit("quit");
    assert_eq!(host.read(&devmodel::claim_path(0, 9)), None);

    // Refused before doing anything: an HVM guest's command line, a domain that does not
    // exist (no claim written for either).
    for (args, domid) in [
        (vec!["-xen-domid", "9", "-machine", "xenfv"], 9),
        (vec!["-xen-domid", "31", "-machine", "xenpv"], 31),
    ] {
        let out = Command::new(XENBLKD)
            .arg("qemu-dm")
            .args(&args)
            .env("XENSTORED_PATH", host.xs_socket(0))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(host.read(&devmodel::claim_path(0, domid)), None);
    }
}

#[test]
fn qdisk_with_format_qcow2() {
    let mut host = Host::start(&["--type", "qdisk"]);
    host.create_domain(10);
    let (top, _, reference) = common::qcow2_chain(&host, "qdisk", 16);
    // libxl writes `params` as FORMAT:TARGET for qdisk disks (`format=qcow2`).
    let spec = DiskSpec::new("qdisk", 10, 51712, &format!("qcow2:{}", top.display()));
    toolstack::add_disk(host.xs.as_ref(), &spec).unwrap();
    let mut dm = StandIn::start(&host, 10);
    let be = spec.backend_path();
    host.wait_state(&be, XenbusState::InitWait);
    let dev = host.device_status("qdisk", 10, 51712).unwrap();
    assert_eq!(dev.format.as_deref(), Some("qcow2"));
    host.guest(
        10,
        51712,
        &["--mirror", reference.to_str().unwrap()],
        "connect,io:32,flush,discard,flush,close",
    )
    .finish();
    dm.proc.signal(nix::sys::signal::Signal::SIGHUP);
    dm.expect_exit("SIGHUP");
    assert_eq!(host.stop_daemon().code(), Some(0));
    common::qcow2_consistent(&top, &reference);
}
