//! The metrics endpoint of a real `serve` (`--metrics`): scraped while a simulated guest
//! does a known number of requests, checked line by line, linted by Prometheus'
//! `promtool`, and scraped by a real Prometheus server (Debian's `prometheus` package)
//! whose query API must then return the guest's request counts: the OpenMetrics parser
//! of the real thing, not ours.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{disk, Host, Proc, WAIT};

/// An HTTP/1.1 exchange on `stream`: status code, headers (lower-case names) and body.
fn http<S: Read + Write>(mut stream: S, request: &str) -> (u16, BTreeMap<String, String>, String) {
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

fn get(addr: &str, path: &str, accept: Option<&str>) -> (u16, BTreeMap<String, String>, String) {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let accept = accept.map_or_else(String::new, |a| format!("Accept: {a}\r\n"));
    http(
        stream,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n"),
    )
}

/// The text-format scrape.
fn scrape(addr: &str) -> String {
    let (status, headers, body) = get(addr, "/metrics", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    body
}

/// The value of the sample whose name and labels are exactly `series` (the labels in the
/// exposition's order).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Where the daemon says its endpoint listens (port 0 was asked for).
fn endpoint(host: &Host) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let log = host.log();
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("metrics endpoint listening"))
        {
            let addr = line.split("address=").nth(1).unwrap();
            return addr.split_whitespace().next().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no metrics endpoint\n{log}");
        thread::sleep(Duration::from_millis(20));
    }
}

fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/test.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `application/x-www-form-urlencoded` for a PromQL query.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A free loopback port (bound, then released for the server about to take it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Prometheus server scraping `target` every 500 ms.
struct Prometheus {
    _proc: Proc,
    addr: String,
    log: std::path::PathBuf,
}

impl Prometheus {
    fn start(dir: &Path, target: &str) -> Prometheus {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 500ms\n  scrape_timeout: 400ms\n\
                 scrape_configs:\n  - job_name: xenblkd\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let log = dir.join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("prometheus (Debian's prometheus package; scripts/test.sh installs it)");
        Prometheus {
            _proc: Proc {
                child,
                name: "prometheus".into(),
            },
            addr,
            log,
        }
    }

    fn api(&self, path: &str) -> Option<serde_json::Value> {
        let stream = TcpStream::connect(&self.addr).ok()?;
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let (status, _, body) = http(
            stream,
            &format!(
                "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                self.addr
            ),
        );
        (status == 200).then(|| serde_json::from_str(&body).unwrap())
    }

    /// The instant value of `query`, once Prometheus has scraped it.
    fn query_until(&self, query: &str, want: f64) {
        let deadline = Instant::now() + WAIT;
        let mut last = None;
        loop {
            if let Some(v) = self.api(&format!("/api/v1/query?query={}", urlencode(query))) {
                let got = v["data"]["result"][0]["value"][1]
                    .as_str()
                    .and_then(|s| s.parse::<f64>().ok());
                if got == Some(want) {
                    return;
                }
                last = Some(v);
            }
            assert!(
                Instant::now() < deadline,
                "Prometheus: {query} is not {want}: {last:?}\ntargets: {:?}\n{}",
                self.api("/api/v1/targets"),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(200));
        }
    }
}

#[test]
fn counters_follow_the_guests_requests_and_prometheus_reads_them() {
    let host = Host::start(&["--metrics", "127.0.0.1:0"]);
    let addr = endpoint(&host);
    let idle = scrape(&addr);
    assert_eq!(value(&idle, "xenblkd_devices"), Some(0.0), "{idle}");
    // Two reactors (the tests' `--reactor-threads 2`), each with its busy time.
    for r in ["0", "1"] {
        let busy = value(
            &idle,
            &format!("xenblkd_reactor_busy_seconds_total{{reactor=\"{r}\"}}"),
        );
        assert!(busy.is_some_and(|b| b > 0.0), "{idle}");
    }
    promtool_check(&idle);

    host.create_domain(7);
    let image = host.image("d7.img", 16);
    host.attach(&disk("xenblkd", 7, 51712, &image));
    let go = host.dir.path().join("go");
    let stop = host.dir.path().join("stop");
    let mut guest = host.guest(
        7,
        51712,
        &[],
        &format!(
            "connect,wait-file:{},writes:20,reads:12,flush,wait-file:{},close",
            go.display(),
            stop.display()
        ),
    );
    guest.expect("ok connect");
    let labels = r#"type="xenblkd",domid="7",device="xvda",guest="guest7""#;
    let series = |name: &str, extra: &str| {
        if extra.is_empty() {
            format!("{name}{{{labels}}}")
        } else {
            format!("{name}{{{labels},{extra}}}")
        }
    };
    let before = scrape(&addr);
    let base = |s: &str| value(&before, s).unwrap_or_else(|| panic!("no {s} in\n{before}"));
    let (rd0, wr0, fl0) = (
        base(&series("xenblkd_requests_total", "op=\"read\"")),
        base(&series("xenblkd_requests_total", "op=\"write\"")),
        base(&series("xenblkd_requests_total", "op=\"flush\"")),
    );
    std::fs::write(&go, "").unwrap();
    guest.expect("ok writes");
    guest.expect("ok reads");
    guest.expect("ok flush");

    let busy = scrape(&addr);
    let v = |s: String| value(&busy, &s).unwrap_or_else(|| panic!("no {s} in\n{busy}"));
    assert_eq!(
        v(series("xenblkd_requests_total", "op=\"write\"")) - wr0,
        20.0
    );
    assert_eq!(
        v(series("xenblkd_requests_total", "op=\"read\"")) - rd0,
        12.0
    );
    assert_eq!(
        v(series("xenblkd_requests_total", "op=\"flush\"")) - fl0,
        1.0
    );
    assert!(v(series("xenblkd_sectors_total", "op=\"write\"")) >= 160.0);
    assert!(v(series("xenblkd_sectors_total", "op=\"read\"")) >= 96.0);
    assert_eq!(v(series("xenblkd_errors_total", "")), 0.0);
    assert_eq!(v(series("xenblkd_inflight_requests", "")), 0.0);
    // The histogram counted every answered write and read, each in some bucket.
    let writes = v(series("xenblkd_requests_total", "op=\"write\""));
    assert_eq!(
        v(series(
            "xenblkd_request_duration_seconds_count",
            "op=\"write\""
        )),
        writes
    );
    assert_eq!(
        v(series(
            "xenblkd_request_duration_seconds_bucket",
            "op=\"write\",le=\"+Inf\""
        )),
        writes
    );
    assert!(
        v(series(
            "xenblkd_request_duration_seconds_sum",
            "op=\"write\""
        )) > 0.0
    );
    assert_eq!(
        v(series(
            "xenblkd_request_duration_seconds_count",
            "op=\"read\""
        )),
        v(series("xenblkd_requests_total", "op=\"read\""))
    );
    assert!(busy.contains(&format!(
        "xenblkd_device_info{{{labels},state=\"Connected\",frontend_state=\"Connected\",target=\"{}\",format=\"raw\"}} 1",
        image.display()
    )), "{busy}");
    assert!(value(&busy, "xenblkd_persistent_grant_budget_limit_grants").is_some());
    promtool_check(&busy);

    // OpenMetrics when asked, as Prometheus asks.
    let (status, headers, om) = get(
        &addr,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    );
    assert_eq!(status, 200);
    assert!(
        headers["content-type"].starts_with("application/openmetrics-text; version=1.0.0"),
        "{headers:?}"
    );
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE xenblkd_requests counter"), "{om}");
    // The rest of HTTP: what is not /metrics.
    assert_eq!(get(&addr, "/nothing", None).0, 404);
    let (status, headers, _) = http(
        TcpStream::connect(&addr).unwrap(),
        "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!((status, headers["allow"].as_str()), (405, "GET, HEAD"));

    // A real Prometheus scrapes it (OpenMetrics, its strict parser) and answers queries.
    let prom_dir = host.dir.path().join("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let prometheus = Prometheus::start(&prom_dir, &addr);
    prometheus.query_until(
        &format!("xenblkd_requests_total{{guest=\"guest7\",device=\"xvda\",op=\"write\"}} - {wr0}"),
        20.0,
    );
    prometheus.query_until(
        "xenblkd_request_duration_seconds_count{domid=\"7\",op=\"read\"}",
        v(series("xenblkd_requests_total", "op=\"read\"")),
    );
    prometheus.query_until("count(xenblkd_reactor_busy_seconds_total)", 2.0);
    prometheus.query_until("up{job=\"xenblkd\"}", 1.0);
    let targets = prometheus.api("/api/v1/targets").unwrap();
    let target = &targets["data"]["activeTargets"][0];
    assert_eq!(target["health"], "up", "{targets}");
    assert_eq!(target["lastError"], "", "{targets}");

    std::fs::write(&stop, "").unwrap();
    guest.expect("ok close");
    guest.finish();
}

#[test]
fn a_unix_socket_endpoint_answers_and_goes_with_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/metrics.sock");
    let socket_arg = socket.display().to_string();
    let mut host = Host::start(&["--metrics", &socket_arg]);
    let ask = |request: &str| {
        let s = UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        http(s, request)
    };
    let (status, _, body) = ask("GET /metrics HTTP/1.0\r\n\r\n");
    assert_eq!(status, 200, "{body}");
    assert_eq!(value(&body, "xenblkd_devices"), Some(0.0), "{body}");
    let (status, headers, body) = ask("HEAD /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, 200);
    assert!(body.is_empty());
    assert!(headers["content-length"].parse::<usize>().unwrap() > 0);
    assert_eq!(ask("GARBAGE\r\n\r\n").0, 400);
    // Root only, as the control socket.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(host.stop_daemon().success(), "{}", host.log());
    assert!(!socket.exists(), "the socket outlived the daemon");
}

#[test]
fn metrics_are_off_by_default() {
    let host = Host::start(&[]);
    assert!(!host.log().contains("metrics endpoint"), "{}", host.log());
}
