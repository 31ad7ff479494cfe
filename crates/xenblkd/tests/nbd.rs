//! NBD exports end to end: the daemon serving a simulated guest's blkfront from qemu-nbd
//! and nbdkit, with verified I/O, a server killed and restarted mid-I/O, a server that
//! stays away, and nbdkit's error filter; `xenblkd demo` and `xenblkd bench` on a URI.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{disk, Host};
use storage::nbd::testing::{Listen, NbdServer};
use xenbus::XenbusState;

fn uri_spec(domid: u32, devid: u32, uri: &str) -> xenbus::toolstack::DiskSpec {
    disk("xenblkd", domid, devid, Path::new(uri))
}

/// Guest 6 runs verified I/O on an export while the server is killed and restarted;
/// guest 7's file-backed disk keeps working meanwhile; status names the format.
#[test]
fn guest_io_survives_a_server_restart() {
    let host = Host::start(&[]);
    host.create_domain(6);
    host.create_domain(7);
    let img = host.image("nbd.img", 32);
    let sock = img.with_extension("sock");
    let mut server = NbdServer::qemu_nbd(&img, Listen::Unix(sock.clone()), &[]).unwrap();
    let uri = server.uri("");
    let spec = uri_spec(6, 51712, &uri);
    assert_eq!(host.attach(&spec), XenbusState::InitWait);
    let other = disk("xenblkd", 7, 51712, &host.image("file.img", 16));
    assert_eq!(host.attach(&other), XenbusState::InitWait);

    let go = img.with_extension("go");
    let mut guest = host.guest(
        6,
        51712,
        &[],
        &format!(
            "connect,io:8,wait-file:{},io:40,flush,discard,io:4,close",
            go.display()
        ),
    );
    guest.expect("ok connect");
    guest.expect("ok io:8");
    let dev = host
        .device_status("xenblkd", 6, 51712)
        .expect("device status");
    assert_eq!(dev.format.as_deref(), Some("nbd"), "{dev:?}");
    assert!(host.status_text().contains("nbd"), "{}", host.status_text());

    // Kill the server as the guest starts its next rounds; restart it a second later.
    std::fs::write(&go, b"").unwrap();
    std::thread::sleep(Duration::from_millis(30));
    server.kill();
    let mut bystander = host.guest(7, 51712, &[], "connect,io:16,close");
    std::thread::sleep(Duration::from_secs(1));
    let _restarted = NbdServer::qemu_nbd(&img, Listen::Unix(sock), &[]).unwrap();
    guest.expect("ok io:40");
    guest.expect("ok flush");
    guest.expect("ok discard");
    guest.expect("ok io:4");
    guest.expect("ok close");
    bystander.expect("ok close");
    bystander.finish();
    guest.finish();
    assert!(host.log().contains("NBD connection lost"), "{}", host.log());
}

/// nbdkit's error filter fails reads while its trigger file exists: the guest gets an
/// error for those reads only (the write beside them succeeds), then carries on.
#[test]
fn injected_errors_fail_only_the_affected_requests() {
    let host = Host::start(&[]);
    host.create_domain(6);
    let dir = tempfile::tempdir().unwrap();
    let trigger = dir.path().join("fail-reads");
    let resume = dir.path().join("resume");
    let file = format!("error-pread-file={}", trigger.display());
    let server = NbdServer::nbdkit(
        Listen::Unix(dir.path().join("s")),
        &[
            "--filter=error",
            "memory",
            "size=16M",
            "error-pread=EIO",
            "error-pread-rate=100%",
            &file,
        ],
    )
    .unwrap();
    let spec = uri_spec(6, 51712, &server.uri(""));
    assert_eq!(host.attach(&spec), XenbusState::InitWait);
    let mut guest = host.guest(
        6,
        51712,
        &[],
        &format!(
            "connect,io:4,wait-file:{},expect-read-error,wait-file:{},io:8,close",
            trigger.display(),
            resume.display()
        ),
    );
    guest.expect("ok io:4");
    std::fs::write(&trigger, b"").unwrap();
    guest.expect("ok expect-read-error");
    std::fs::remove_file(&trigger).unwrap();
    std::fs::write(&resume, b"").unwrap();
    guest.expect("ok io:8");
    guest.expect("ok close");
    guest.finish();
    // Exactly the one read failed: 4 + 8 rounds, and the write beside the failed read.
    let dev = host.device_status("xenblkd", 6, 51712).unwrap();
    let served = dev
        .last_disconnect
        .as_ref()
        .map(|r| r.detail.as_str())
        .unwrap_or_default();
    assert!(served.ends_with("1 errors served"), "{dev:?}");
}

/// A server that does not come back: after the configured bound the guest's requests
/// fail with an error, and the daemon keeps serving.
#[test]
fn requests_fail_after_the_reconnect_bound() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("xenblkd.toml");
    std::fs::write(&config, "[defaults]\nnbd_reconnect_secs = 1\n").unwrap();
    let host = Host::start(&["--config", config.to_str().unwrap()]);
    host.create_domain(6);
    let mut server =
        NbdServer::nbdkit(Listen::Unix(dir.path().join("s")), &["memory", "size=16M"]).unwrap();
    let spec = uri_spec(6, 51712, &server.uri(""));
    assert_eq!(host.attach(&spec), XenbusState::InitWait);
    let gone = dir.path().join("gone");
    let mut guest = host.guest(
        6,
        51712,
        &[],
        &format!(
            "connect,io:4,wait-file:{},expect-write-error",
            gone.display()
        ),
    );
    guest.expect("ok io:4");
    server.kill();
    let start = std::time::Instant::now();
    std::fs::write(&gone, b"").unwrap();
    guest.expect("ok expect-write-error");
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );
    guest.finish();
    assert!(host.try_status().is_some(), "the daemon must keep running");
}

fn xenblkd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_xenblkd"))
}

#[test]
fn demo_and_bench_take_an_nbd_uri() {
    let dir = tempfile::tempdir().unwrap();
    let server = NbdServer::nbdkit(
        Listen::Tcp(match Listen::free_tcp().unwrap() {
            Listen::Tcp(p) => p,
            Listen::Unix(_) => unreachable!(),
        }),
        &["memory", "size=64M"],
    )
    .unwrap();
    let out = xenblkd()
        .args([
            "demo",
            "--data",
            "16M",
            "--bench-secs",
            "0.3",
            "--image",
            &server.uri(""),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("verified 16 MiB"), "{stdout}");

    let img = dir.path().join("bench.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let q = NbdServer::qemu_nbd(&img, Listen::Unix(dir.path().join("q")), &[]).unwrap();
    let out = xenblkd()
        .args([
            "bench",
            "--runtime",
            "0.3",
            "--json",
            "--size",
            "32M",
            "--image",
            &q.uri(""),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert!(
        v["iops"].as_f64().unwrap_or(0.0) > 0.0 || stdout.contains("iops"),
        "{stdout}"
    );
}
