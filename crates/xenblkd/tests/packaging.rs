//! What the Debian package ships beside the binary, checked against the code it
//! describes: the example configuration (`debian/xenblkd.toml`, installed as
//! /etc/xenblkd/xenblkd.toml) parses with the daemon's own parser and documents the real
//! defaults, and the unit (`debian/xenblkd.service`) passes `systemd-analyze verify`
//! with its `ExecStart=` a command line this binary accepts. `scripts/build-deb` builds
//! the package itself and checks its contents.

use std::path::{Path, PathBuf};
use std::process::Command;

use xenbus::config::{BackendType, Config};

const XENBLKD: &str = env!("CARGO_BIN_EXE_xenblkd");

fn debian_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("debian")
        .join(name)
}

/// The example with the lines starting `prefix` uncommented.
fn uncommented(text: &str, prefixes: &[&str]) -> String {
    text.lines()
        .map(|l| {
            prefixes
                .iter()
                .find_map(|p| {
                    l.strip_prefix(p)
                        .filter(|rest| !rest.starts_with('#'))
                        .filter(|rest| rest.starts_with('[') || rest.contains(" = "))
                })
                .unwrap_or(l)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn example_configuration_is_the_parsers_defaults() {
    let text = std::fs::read_to_string(debian_file("xenblkd.toml")).unwrap();
    // As shipped: everything commented out, so the defaults.
    assert_eq!(
        Config::from_toml(&text, "example").unwrap(),
        Config::default()
    );
    // Every `#key = value` line uncommented: real keys, valid values, and the values the
    // comments claim are the defaults are the defaults.
    let settings = uncommented(&text, &["#"]);
    assert!(
        settings.lines().filter(|l| l.contains(" = ")).count() >= 15,
        "{settings}"
    );
    let parsed = Config::from_toml(&settings, "example, uncommented")
        .unwrap_or_else(|e| panic!("{e}\n{settings}"));
    let expected = Config {
        log_level: Some("info".into()),
        ..Config::default()
    };
    assert_eq!(parsed, expected, "{settings}");
    // The examples (`## ` lines) parse too and mean what they say.
    let examples = uncommented(&text, &["#", "## "]);
    let parsed = Config::from_toml(&examples, "example, with the examples")
        .unwrap_or_else(|e| panic!("{e}\n{examples}"));
    assert_eq!(parsed.defaults.max_queues, 4);
    assert_eq!(parsed.metrics.listen.as_deref(), Some("127.0.0.1:9477"));
    assert!(parsed.backend_type("qdisk").is_some());
    assert_eq!(
        parsed.backend_types.len(),
        BackendType::defaults().len() + 1
    );
    let s = parsed.settings_for("vbd", 5, 51728);
    assert_eq!((s.max_queues, s.persistent_grants), (1, false));
    assert_eq!((s.qos.iops, s.qos.bps), (500, 50_000_000));
    assert_eq!(s.qos_group.as_deref(), Some("tenant-a"));
    assert_eq!(parsed.qos.groups["tenant-a"].iops, 2000);
}

/// The unit's `ExecStart=` arguments.
fn exec_start(unit: &str) -> Vec<String> {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart=");
    line.split_whitespace().map(String::from).collect()
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(debian_file("xenblkd.service")).unwrap();
    let argv = exec_start(&unit);
    assert_eq!(
        argv[0], "/usr/sbin/xenblkd",
        "the package installs it there"
    );
    // The command line is one this binary takes (clap refuses unknown flags).
    let help = Command::new(XENBLKD)
        .args(&argv[1..])
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        help.status.success(),
        "{}",
        String::from_utf8_lossy(&help.stderr)
    );
    for needed in [
        "Type=notify",
        "KillSignal=SIGUSR2",
        "Restart=on-failure",
        "ExecReload=",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "DeviceAllow=/dev/xen/gntdev rw",
        "RuntimeDirectoryPreserve=yes",
    ] {
        assert!(unit.contains(needed), "the unit lacks {needed}");
    }

    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIP verify: systemd-analyze is not installed (Debian package systemd)");
        return;
    }
    // Verify in a directory holding the unit, with stand-ins for the Xen units it needs
    // (xen-utils-common's, absent where Xen is not installed) and ExecStart= pointed at
    // the binary just built (not installed here). Man pages are the package's, checked
    // by scripts/build-deb.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("xenblkd.service"),
        unit.replace(
            "ExecStart=/usr/sbin/xenblkd",
            &format!("ExecStart={XENBLKD}"),
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("xenstored.service"),
        "[Unit]\nDescription=xenstored stand-in\n[Service]\nType=notify\nExecStart=/bin/true\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("proc-xen.mount"),
        "[Unit]\nDescription=/proc/xen stand-in\n[Mount]\nWhat=xenfs\nWhere=/proc/xen\nType=xenfs\n",
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("xenblkd.service"))
        .arg(dir.path().join("xenstored.service"))
        .arg(dir.path().join("proc-xen.mount"))
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The container has no sysinit.target (nothing boots systemd here): the only line
    // verify may print about dependencies it cannot resolve.
    let problems: Vec<&str> = said
        .lines()
        .filter(|l| !l.contains("Unit sysinit.target not found"))
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(problems.is_empty(), "systemd-analyze verify:\n{said}");
}
