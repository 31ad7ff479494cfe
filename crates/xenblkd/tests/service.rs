//! `xenblkd serve` as systemd runs it: readiness, reload and stop reported on a real
//! `NOTIFY_SOCKET` (a unix datagram socket, as systemd's), the configuration re-read on
//! SIGHUP, and the log in the journal's native protocol read back from a real
//! systemd-journald (in a private mount namespace, so the host's /run is untouched).

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{disk, Host, Proc, XENBLKD};
use nix::sys::signal::Signal;
use xenbus::XenbusState;

/// The next notification, or a failure after `common::WAIT`.
fn next_notification(socket: &UnixDatagram, host: &Host) -> String {
    socket.set_read_timeout(Some(common::WAIT)).unwrap();
    let mut buf = [0u8; 4096];
    match socket.recv(&mut buf) {
        Ok(n) => String::from_utf8(buf[..n].to_vec()).unwrap(),
        Err(e) => panic!("no notification: {e}\n{}", host.log()),
    }
}

fn spawn_notified_daemon(host: &mut Host, notify: &Path, config: &Path) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(host.dir.path().join("serve.log"))
        .unwrap();
    let child = Command::new(XENBLKD)
        .env_remove("RUST_LOG")
        .env("NOTIFY_SOCKET", notify)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .arg("--xenstore-socket")
        .arg(host.xs_socket(0))
        .arg("--sim-socket")
        .arg(&host.sim_socket)
        .arg("--control-socket")
        .arg(&host.control)
        .args(["--reactor-threads", "2"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    host.daemon = Some(Proc {
        child,
        name: "xenblkd serve (notify)".into(),
    });
}

#[test]
fn readiness_reload_and_stop_reach_systemd() {
    let mut host = Host::start(&[]);
    assert!(host.stop_daemon().success());
    let notify_path = host.dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let config = host.dir.path().join("xenblkd.toml");
    std::fs::write(
        &config,
        "log_level = \"info\"\n[defaults]\nmax_queues = 3\n",
    )
    .unwrap();
    spawn_notified_daemon(&mut host, &notify_path, &config);

    // READY=1 only once the control socket answers: a status query right after it works.
    let ready = next_notification(&notify, &host);
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    assert!(ready.contains("STATUS=serving"), "{ready}");
    let status = host
        .try_status()
        .unwrap_or_else(|| panic!("READY before the control socket answers\n{}", host.log()));
    assert!(status.devices.is_empty());

    // A device set up before the reload gets the file's 3 queues.
    host.create_domain(5);
    let image = host.image("a.img", 8);
    let before = disk("xenblkd", 5, 51712, &image);
    assert_eq!(host.attach(&before), XenbusState::InitWait);
    let queues = |devid: u32| {
        common::node_u64(
            &host,
            &format!("/local/domain/0/backend/xenblkd/5/{devid}"),
            "multi-queue-max-queues",
        )
    };
    assert_eq!(queues(51712), Some(3));

    // Reload: device settings change for devices set up from now on; the types served
    // need a restart and are said to be ignored.
    std::fs::write(
        &config,
        "log_level = \"debug\"\n[defaults]\nmax_queues = 1\n[[backend_type]]\nname = \"xenblkd\"\n",
    )
    .unwrap();
    host.daemon.as_ref().unwrap().signal(Signal::SIGHUP);
    let reloading = next_notification(&notify, &host);
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    let ready = next_notification(&notify, &host);
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    let log = host.log();
    assert!(
        log.contains("configuration reloaded") && log.contains(r#"applied=["defaults"]"#),
        "{log}"
    );
    assert!(log.contains("log_level=debug"), "{log}");
    assert!(
        log.contains(r#"ignored=["backend_type"]"#) && log.contains("only at a restart"),
        "{log}"
    );
    // An image of its own: a second writer of `a.img` would be refused (image locking).
    let second = host.image("b.img", 8);
    let after = disk("xenblkd", 5, 51728, &second);
    assert_eq!(host.attach(&after), XenbusState::InitWait);
    assert_eq!(queues(51728), Some(1));
    // The device set up before keeps what it advertised.
    assert_eq!(queues(51712), Some(3));
    // The level from the file is in force: debug lines appear after the reload.
    let deadline = Instant::now() + common::WAIT;
    while !host.log().contains(" DEBUG ") {
        assert!(
            Instant::now() < deadline,
            "no debug line after the reload\n{}",
            host.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A file that does not parse changes nothing, and the daemon stays ready.
    std::fs::write(&config, "max_queues = \"many\"\n").unwrap();
    host.daemon.as_ref().unwrap().signal(Signal::SIGHUP);
    assert!(next_notification(&notify, &host).starts_with("RELOADING=1"));
    let ready = next_notification(&notify, &host);
    assert!(
        ready.starts_with("READY=1\n") && ready.contains("refused"),
        "{ready}"
    );
    assert!(host.log().contains("reload refused"), "{}", host.log());
    assert!(host.try_status().is_some());

    // Stop: STOPPING=1 as soon as the signal is taken.
    let status = host.stop_daemon();
    assert!(status.success(), "{status}\n{}", host.log());
    let stopping = next_notification(&notify, &host);
    assert!(stopping.starts_with("STOPPING=1\n"), "{stopping}");
}

/// Runs `script` in a private mount namespace with its own systemd-journald; `None` when
/// this host cannot (no unshare privilege, no journald binary).
fn with_private_journald(script: &str) -> Option<std::process::Output> {
    const JOURNALD: &str = "/lib/systemd/systemd-journald";
    if !Path::new(JOURNALD).exists() {
        eprintln!("SKIP: {JOURNALD} is not installed (Debian package systemd)");
        return None;
    }
    let probe = Command::new("unshare")
        .args(["-m", "true"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !probe {
        eprintln!("SKIP: cannot create a mount namespace (unshare -m) here");
        return None;
    }
    // Everything journald touches is a tmpfs of the namespace: its sockets
    // (/run/systemd/journal) and the volatile journal (/run/log/journal); a persistent
    // /var/log/journal is hidden too so nothing reaches the host's journal.
    let full = format!(
        r#"set -e
mount -t tmpfs none /run/systemd 2>/dev/null || {{ mkdir -p /run/systemd && mount -t tmpfs none /run/systemd; }}
mkdir -p /run/systemd/journal /run/log
mount -t tmpfs none /run/log
if [ -d /var/log/journal ]; then mount -t tmpfs none /var/log/journal; fi
{JOURNALD} &
J=$!
i=0; while [ ! -S /run/systemd/journal/socket ]; do i=$((i+1)); [ $i -lt 200 ] || exit 90; sleep 0.05; done
set +e
{script}
rc=$?
journalctl --directory=/run/log/journal --sync 2>/dev/null
sleep 0.3
journalctl --directory=/run/log/journal -o json --no-pager SYSLOG_IDENTIFIER=xenblkd
kill $J
exit $rc
"#
    );
    Some(
        Command::new("unshare")
            .args(["-m", "--fork", "sh", "-c", &full])
            .output()
            .unwrap(),
    )
}

#[test]
fn lifecycle_lines_reach_a_real_journald_with_fields() {
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "{XENBLKD} --log-target journal --log-level info demo --size 16M --data 4M --bench-secs 0.2 --queues 1 >/dev/null 2>{}/stderr",
        dir.path().display()
    );
    let Some(out) = with_private_journald(&script) else {
        return;
    };
    let stderr = std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default();
    assert!(
        out.status.success(),
        "{}\n{}\ndemo's stderr: {stderr}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // With the journal as target nothing goes to stderr.
    assert!(stderr.is_empty(), "{stderr}");
    let entries: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let field =
        |e: &serde_json::Value, k: &str| e.get(k).and_then(|v| v.as_str()).map(String::from);
    let find = |message: &str| {
        entries
            .iter()
            .find(|e| {
                field(e, "MESSAGE").as_deref() == Some(message)
                    && field(e, "TARGET").is_some_and(|t| t.starts_with("xenbus"))
            })
            .unwrap_or_else(|| panic!("no {message:?} entry in {entries:#?}"))
    };
    for message in ["storage opened", "InitWait", "rings connected", "Connected"] {
        let e = find(message);
        // Structured: the device and the guest as fields of their own, the level as the
        // journal's priority (info is 6), no timestamp of ours inside the message.
        let device = field(e, "DEVICE").unwrap_or_else(|| panic!("{e:#}"));
        assert!(device.ends_with("/51712"), "{e:#}");
        let domid = field(e, "DOMID").unwrap_or_else(|| panic!("{e:#}"));
        assert!(device.contains(&format!("/{domid}/")), "{e:#}");
        assert_eq!(field(e, "PRIORITY").as_deref(), Some("6"), "{e:#}");
        assert_eq!(field(e, "_TRANSPORT").as_deref(), Some("journal"), "{e:#}");
        assert!(
            field(e, "TARGET").is_some_and(|t| t.starts_with("xenbus")),
            "{e:#}"
        );
        // The guest by its toolstack name (the demo's simulated host names its domains
        // `sim-guest-<domid>`), a field of the `guest` span the lifecycle lines are in.
        assert_eq!(
            field(e, "NAME"),
            Some(format!("sim-guest-{domid}")),
            "{e:#}"
        );
    }
    let connected = find("Connected");
    assert!(field(connected, "SECTORS").is_some(), "{connected:#}");
}
