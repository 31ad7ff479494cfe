use std::collections::{BTreeMap, HashSet};

use xenbus::XenbusState;

use super::*;

fn device(domid: u32, devid: u32, vdev: &str, connected: bool) -> DeviceStatus {
    let stats = if connected {
        BTreeMap::from(
            [
                ("rd_req", 3),
                ("wr_req", 5),
                ("f_req", 1),
                ("ds_req", 0),
                ("rd_sect", 24),
                ("wr_sect", 40),
                ("ds_sect", 0),
                ("errors", 2),
                ("unsupported", 0),
                ("oo_req", 7),
                ("in_flight", 4),
                ("persistent_grants_mapped", 11),
                ("persistent_grants_in_use", 4),
                ("persistent_hits", 9),
                ("persistent_misses", 2),
                ("persistent_budget_refusals", 0),
                ("map_fallbacks", 0),
                ("notifications", 6),
                ("rings", 2),
                ("halted_rings", 0),
                ("grant_copy", 0),
            ]
            .map(|(k, v)| (k.to_string(), v)),
        )
    } else {
        BTreeMap::new()
    };
    let latency = if connected {
        BTreeMap::from([
            (
                "read".to_string(),
                LatencyHistogram {
                    bounds_us: vec![10, 100, 1_000_000],
                    counts: vec![1, 2, 0, 0],
                    sum_ns: 150_000,
                },
            ),
            (
                "write".to_string(),
                LatencyHistogram {
                    bounds_us: vec![10, 100, 1_000_000],
                    counts: vec![0, 1, 3, 1],
                    sum_ns: 3_000_000_000,
                },
            ),
        ])
    } else {
        BTreeMap::new()
    };
    DeviceStatus {
        backend_type: "xenblkd".into(),
        domid,
        devid,
        vdev: vdev.into(),
        backend_path: format!("/local/domain/0/backend/xenblkd/{domid}/{devid}"),
        frontend_path: None,
        state: if connected {
            XenbusState::Connected
        } else {
            XenbusState::InitWait
        },
        frontend_state: XenbusState::Initialising,
        target: Some("/img/a \"quoted\".img".into()),
        format: Some("raw".into()),
        disk: None,
        layers: vec![],
        frontend: None,
        features: None,
        stats,
        error: None,
        sessions: 1,
        last_disconnect: None,
        disconnecting: false,
        paused: false,
        latency,
        qos: None,
    }
}

fn snapshot_text(format: Format) -> String {
    let daemon = DaemonStatus {
        backend_types: vec!["xenblkd".into()],
        home: "/local/domain/0".into(),
        shutting_down: false,
        handing_over: false,
        qos_groups: BTreeMap::new(),
        metrics: BTreeMap::from(
            [
                ("persistent_grant_budget_used", 11),
                ("persistent_grant_budget_limit", 100),
                ("persistent_grant_budget_refusals", 1),
                ("open_fds", 30),
                ("reactor_wakeups", 9),
                ("some_new_level", 4),
            ]
            .map(|(k, v)| (k.to_string(), v)),
        ),
    };
    let devices = [
        device(5, 51712, "xvda", true),
        device(6, 51728, "xvdb", false),
    ];
    let reactors = [
        ReactorStats {
            busy_ns: 1_500_000_000,
            wakeups: 3,
            ..Default::default()
        },
        ReactorStats::default(),
    ];
    let guests = BTreeMap::from([(5, "web\\1 \"prod\"".to_string())]);
    render(
        &Snapshot {
            daemon: &daemon,
            devices: &devices,
            reactors: &reactors,
            guests: &guests,
        },
        format,
    )
}

const L5: &str = r#"type="xenblkd",domid="5",device="xvda",guest="web\\1 \"prod\"""#;

#[test]
fn text_format_carries_the_counters_with_their_labels() {
    let t = snapshot_text(Format::Text);
    for line in [
        "# TYPE xenblkd_requests_total counter".to_string(),
        format!("xenblkd_requests_total{{{L5},op=\"read\"}} 3"),
        format!("xenblkd_requests_total{{{L5},op=\"write\"}} 5"),
        format!("xenblkd_requests_total{{{L5},op=\"flush\"}} 1"),
        format!("xenblkd_sectors_total{{{L5},op=\"write\"}} 40"),
        format!("xenblkd_errors_total{{{L5}}} 2"),
        format!("xenblkd_oo_requests_total{{{L5}}} 7"),
        "# TYPE xenblkd_inflight_requests gauge".to_string(),
        format!("xenblkd_inflight_requests{{{L5}}} 4"),
        format!("xenblkd_persistent_grants{{{L5}}} 11"),
        format!("xenblkd_persistent_grant_lookups_total{{{L5},result=\"hit\"}} 9"),
        "xenblkd_persistent_grant_budget_grants 11".to_string(),
        "xenblkd_persistent_grant_budget_limit_grants 100".to_string(),
        "xenblkd_persistent_grant_budget_refusals_total 1".to_string(),
        "xenblkd_some_new_level 4".to_string(),
        "xenblkd_reactor_busy_seconds_total{reactor=\"0\"} 1.5".to_string(),
        "xenblkd_reactor_busy_seconds_total{reactor=\"1\"} 0".to_string(),
        "xenblkd_reactor_wakeups_total{reactor=\"0\"} 3".to_string(),
        "xenblkd_devices 2".to_string(),
        "# TYPE xenblkd_device_info gauge".to_string(),
        "# TYPE xenblkd_request_duration_seconds histogram".to_string(),
        format!("xenblkd_request_duration_seconds_bucket{{{L5},op=\"read\",le=\"0.00001\"}} 1"),
        format!("xenblkd_request_duration_seconds_bucket{{{L5},op=\"read\",le=\"0.0001\"}} 3"),
        format!("xenblkd_request_duration_seconds_bucket{{{L5},op=\"read\",le=\"1.0\"}} 3"),
        format!("xenblkd_request_duration_seconds_bucket{{{L5},op=\"read\",le=\"+Inf\"}} 3"),
        format!("xenblkd_request_duration_seconds_sum{{{L5},op=\"read\"}} 0.00015"),
        format!("xenblkd_request_duration_seconds_count{{{L5},op=\"read\"}} 3"),
        format!("xenblkd_request_duration_seconds_bucket{{{L5},op=\"write\",le=\"1.0\"}} 4"),
        format!("xenblkd_request_duration_seconds_bucket{{{L5},op=\"write\",le=\"+Inf\"}} 5"),
        format!("xenblkd_request_duration_seconds_sum{{{L5},op=\"write\"}} 3"),
    ] {
        assert!(t.lines().any(|l| l == line), "no {line:?} in\n{t}");
    }
    // The disconnected device has its info and session count, no counters; the summed
    // reactor gauges of the status are per reactor here instead.
    assert!(t.contains(
        r#"xenblkd_device_info{type="xenblkd",domid="6",device="xvdb",guest="",state="InitWait""#
    ));
    assert!(t.contains(r#"target="/img/a \"quoted\".img""#), "{t}");
    assert!(!t.contains(r#"xenblkd_requests_total{type="xenblkd",domid="6""#));
    assert!(!t.contains("xenblkd_reactor_wakeups "));
    assert!(!t.contains("# EOF"));
}

#[test]
fn openmetrics_names_families_without_suffixes_and_ends_with_eof() {
    let t = snapshot_text(Format::OpenMetrics);
    assert!(t.ends_with("# EOF\n"), "{t}");
    assert_eq!(t.matches("# EOF").count(), 1);
    for line in [
        "# TYPE xenblkd_requests counter",
        "# TYPE xenblkd_device info",
        "# TYPE xenblkd_build info",
        "# TYPE xenblkd_reactor_busy_seconds counter",
        "# TYPE xenblkd_request_duration_seconds histogram",
    ] {
        assert!(t.lines().any(|l| l == line), "no {line:?} in\n{t}");
    }
    assert!(t.contains(&format!("xenblkd_requests_total{{{L5},op=\"read\"}} 3")));
}

/// Each family is declared once and its samples are together (OpenMetrics forbids
/// interleaving; the text format's parsers reject a second TYPE).
#[test]
fn families_are_declared_once_and_not_interleaved() {
    for format in [Format::Text, Format::OpenMetrics] {
        let t = snapshot_text(format);
        let mut seen = HashSet::new();
        let mut current = String::new();
        for l in t.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap().to_string();
                assert!(seen.insert(name.clone()), "{name} declared twice");
                current = name;
            } else if !l.starts_with('#') {
                let sample = l.split(['{', ' ']).next().unwrap();
                assert!(
                    sample.starts_with(&current),
                    "{sample} outside its family ({current})"
                );
            }
        }
        // Help texts need no escaping that the two formats would read differently.
        assert!(t
            .lines()
            .filter(|l| l.starts_with("# HELP"))
            .all(|l| !l.contains('"')));
    }
}

#[test]
fn the_accept_header_picks_the_format() {
    // What Prometheus 2.x sends.
    let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
    assert_eq!(Format::negotiate(Some("text/plain")), Format::Text);
    assert_eq!(Format::negotiate(Some("*/*")), Format::Text);
    assert_eq!(Format::negotiate(None), Format::Text);
}

#[test]
fn rbd_options_stay_out_of_labels() {
    assert_eq!(
        public_target("rbd:pool/ns/img@snap:id=admin:key=AQBx=="),
        "rbd:pool/ns/img@snap"
    );
    assert_eq!(public_target("rbd:pool/img"), "rbd:pool/img");
    assert_eq!(public_target("/srv/a:b.img"), "/srv/a:b.img");
}

#[test]
fn le_values_are_canonical_floats() {
    assert_eq!(seconds_le(10), "0.00001");
    assert_eq!(seconds_le(2_500), "0.0025");
    assert_eq!(seconds_le(1_000_000), "1.0");
    assert_eq!(seconds_le(10_000_000), "10.0");
}

/// Prometheus' own linter reads the text format as a scraper would.
#[test]
fn promtool_accepts_the_text_format() {
    let t = snapshot_text(Format::Text);
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/test.sh installs it)");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), t.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}\n{t}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
