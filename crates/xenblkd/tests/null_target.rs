//! The null disk as the daemon serves it (`null:SIZE`, a benchmark and test target),
//! multi-process: `xenblkd attach` takes it, a guest's writes are forgotten and its reads
//! return zeros, and the fixed-depth load (`bench-until`) on two disks of one guest counts
//! what completed, per disk, with no failed request.

mod common;

use std::time::Duration;

use common::{line_numbers, text, xenblkd, Host};

#[test]
fn null_disks_read_zeros_and_carry_a_counted_load() {
    let host = Host::start(&[]);
    host.create_domain(3);
    for vdev in ["xvdb", "xvdc"] {
        let out = xenblkd(
            &host,
            &["attach", "3", "null:64M", vdev, "--no-wait-connect"],
        );
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            text(&out).contains("attached null:64M as"),
            "{}",
            text(&out)
        );
    }
    // A size that is not one is refused before anything is written.
    let out = xenblkd(&host, &["attach", "3", "null:lots", "xvdd"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("null target size"), "{}", text(&out));
    assert_eq!(host.read("/local/domain/3/device/vbd/51760/backend"), None);

    let stop = host.dir.path().join("stop");
    let close = host.dir.path().join("close");
    let mut guest = host.guest(
        3,
        51728,
        &[
            "--devid",
            "51744",
            "--depth",
            "16",
            "--bench-write-percent",
            "30",
        ],
        &format!(
            "connect,expect-zeros,bench-until:{},wait-file:{},close",
            stop.display(),
            close.display()
        ),
    );
    let connect = guest.expect("ok connect");
    assert!(
        connect.contains(&format!("capacity={}", 64u64 << 20)),
        "{connect}"
    );
    guest.expect("ok expect-zeros");
    let dev = host.device_status("xenblkd", 3, 51728).unwrap();
    assert_eq!(dev.format.as_deref(), Some("null"));
    assert_eq!(dev.target.as_deref(), Some("null:64M"));
    std::thread::sleep(Duration::from_millis(500));
    std::fs::write(&stop, b"").unwrap();
    let line = guest.expect("ok bench-until");
    let n = line_numbers(&line);
    assert_eq!(n.get("errors"), Some(&0), "{line}");
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {line}"))
            .split(',')
            .map(|v| v.parse::<f64>().unwrap())
            .collect::<Vec<_>>()
    };
    let (ops, secs) = (field("ops="), field("secs="));
    assert_eq!((ops.len(), secs.len()), (2, 2), "{line}");
    assert!(ops.iter().all(|&o| o > 0.0), "{line}");
    assert!(secs.iter().all(|&s| (0.4..20.0).contains(&s)), "{line}");
    // The daemon served them all and failed none.
    let dev = host.device_status("xenblkd", 3, 51728).unwrap();
    assert_eq!(dev.stats["errors"], 0, "{:?}", dev.stats);
    assert!(
        (dev.stats["rd_req"] + dev.stats["wr_req"]) as f64 >= ops[0],
        "{:?} {line}",
        dev.stats
    );
    assert!(dev.stats["wr_req"] > 0, "{:?}", dev.stats);
    std::fs::write(&close, b"").unwrap();
    guest.finish();
}
