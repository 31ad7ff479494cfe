//! `xenblkd status` against a daemon serving a guest under I/O: the JSON reply validates
//! against the published schema (docs/status-schema.json, with Python's `jsonschema`, a
//! validator independent of the types that wrote it), the table fits 80 columns, and
//! `--watch` shows the guest's rates once it has two samples.

mod common;

use std::path::Path;
use std::process::Command;

use common::{start_rw_guest, Host, XENBLKD};

fn schema_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/status-schema.json")
}

/// Validates `json` against the schema with python3-jsonschema; Err(reason) if it does
/// not validate.
fn validate(json: &str) -> Result<(), String> {
    let script = r#"
import json, sys, jsonschema
schema = json.load(open(sys.argv[1]))
jsonschema.Draft202012Validator.check_schema(schema)
errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(json.load(sys.stdin)), key=str)
for e in errors:
    print(list(e.absolute_path), e.message)
sys.exit(1 if errors else 0)
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .arg(schema_path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (scripts/test.sh installs python3-jsonschema)");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), json.as_bytes()).unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn status(host: &Host, args: &[&str]) -> String {
    let out = Command::new(XENBLKD)
        .arg("status")
        .args(args)
        .arg("--control-socket")
        .arg(&host.control)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn status_json_table_and_watch() {
    let host = Host::start(&[]);
    let idle = status(&host, &["--json"]);
    validate(&idle).unwrap_or_else(|e| panic!("{e}\n{idle}"));

    let stop = host.dir.path().join("stop");
    let guest = start_rw_guest(&host, 7, &[51712, 51728], 16, &stop);
    let busy = status(&host, &["--json"]);
    validate(&busy).unwrap_or_else(|e| panic!("{e}\n{busy}"));
    let reply: serde_json::Value = serde_json::from_str(&busy).unwrap();
    assert_eq!(reply["version"], 1);
    assert_eq!(reply["devices"].as_array().unwrap().len(), 2);
    // The validator is not a formality: the same reply with a field retyped fails.
    let broken = busy.replacen("\"domid\":7", "\"domid\":\"7\"", 1);
    assert!(validate(&broken).is_err(), "a string domid validated");
    let missing = busy.replacen("\"version\":1,", "", 1);
    assert!(
        validate(&missing).is_err(),
        "a reply without version validated"
    );

    let table = status(&host, &[]);
    for l in table.lines() {
        assert!(l.chars().count() <= 80, "{l:?}");
    }
    assert!(table.contains("    7 xenblkd xvda   Connected"), "{table}");
    assert!(table.contains("    7 xenblkd xvdb   Connected"), "{table}");

    // Two frames: the first has no rates yet, the second the guest's I/O per second.
    let frames = status(&host, &["--watch", "0.5", "--iterations", "2"]);
    let parts: Vec<&str> = frames.split("\n\n").collect();
    assert_eq!(parts.len(), 2, "{frames}");
    let row = |frame: &str, vdev: &str| -> Vec<String> {
        frame
            .lines()
            .find(|l| l.contains(&format!(" {vdev} ")))
            .unwrap_or_else(|| panic!("no {vdev} in {frame}"))
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    assert!(parts[0].contains("RD/s"), "{frames}");
    assert_eq!(
        &row(parts[0], "xvda")[5..9],
        ["-", "-", "-", "-"],
        "{frames}"
    );
    for vdev in ["xvda", "xvdb"] {
        let r = row(parts[1], vdev);
        let rd: f64 = r[5].parse().unwrap_or(f64::MAX);
        let wr: f64 = r[6].parse().unwrap_or(f64::MAX);
        assert!(rd > 0.0 && wr > 0.0, "no rates for {vdev}: {frames}");
    }

    std::fs::write(&stop, "").unwrap();
    guest.finish();
}
