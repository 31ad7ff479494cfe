//! The metrics endpoint of `serve` (`--metrics`, `[metrics] listen`): a small HTTP/1.1
//! responder on a thread of its own, off by default.
//!
//! Each scrape asks the manager for the status snapshot (the same request `xenblkd
//! status` makes: the manager thread reads each device's counters, which the reactors
//! keep without locks), reads the reactors' counters and renders [`crate::metrics`]. No
//! reactor is asked anything, so a scrape cannot delay a ring. Guests' names come from
//! xenstore (`/local/domain/<domid>/name`), cached for [`NAME_TTL`].
//!
//! One connection at a time, each answered and closed (`Connection: close`), with short
//! timeouts: a client that stalls delays the next scrape by at most those, and nothing
//! else. `GET /metrics` (or `HEAD`); `/` names it; anything else is 404 or 405.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use tracing::{debug, info, warn};
use xenbus::config::MetricsListen;
use xenbus::store::StoreExt;
use xenbus::xs::XsStore;
use xenbus::EventSender;

use crate::engine_glue::EngineGauges;
use crate::metrics::{render, Format, Snapshot};

/// How long a guest's name is trusted before it is read again (a rename shows within it).
pub const NAME_TTL: Duration = Duration::from_secs(30);
/// Longest request head read (request line and headers).
const MAX_REQUEST_HEAD: usize = 16 * 1024;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to read the answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a scrape waits for the manager's snapshot.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest guest name shown (it is a label on every series of the guest's devices).
const MAX_NAME: usize = 256;

/// Where the scrapes' figures come from.
pub struct Source {
    /// The manager, for the status snapshot.
    pub sender: EventSender,
    /// The engine's reactors.
    pub gauges: EngineGauges,
    /// xenstore, for guests' names.
    pub store: Arc<XsStore>,
}

/// Guests' names by domain id, each read at most once per [`NAME_TTL`].
struct GuestNames {
    store: Arc<XsStore>,
    cache: HashMap<u32, (Instant, Option<String>)>,
}

impl GuestNames {
    /// The names of `domids`; domains not asked for are forgotten.
    fn lookup(&mut self, domids: impl IntoIterator<Item = u32>) -> BTreeMap<u32, String> {
        let now = Instant::now();
        let mut names = BTreeMap::new();
        let mut keep = HashMap::new();
        for domid in domids {
            let entry = match self.cache.remove(&domid) {
                Some(e) if now.duration_since(e.0) < NAME_TTL => e,
                _ => (now, self.read(domid)),
            };
            if let Some(n) = &entry.1 {
                names.insert(domid, n.clone());
            }
            keep.insert(domid, entry);
        }
        self.cache = keep;
        names
    }

    fn read(&self, domid: u32) -> Option<String> {
        let path = format!("/local/domain/{domid}/name");
        match self.store.read_string(&path) {
            Ok(name) => name.map(|n| n.chars().take(MAX_NAME).collect()),
            Err(e) => {
                debug!(domid, error = %e, "cannot read the guest's name");
                None
            }
        }
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

/// A bound endpoint, not yet serving.
pub struct Endpoint {
    listener: Listener,
}

impl Endpoint {
    /// Binds `listen`. A unix socket replaces a stale socket file (the daemon lock is
    /// held: no other daemon serves it) and is root-only, like the control socket.
    pub fn bind(listen: &MetricsListen) -> anyhow::Result<Endpoint> {
        let listener = match listen {
            MetricsListen::Tcp(addr) => {
                Listener::Tcp(TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?)
            }
            MetricsListen::Unix(path) => {
                use std::os::unix::fs::FileTypeExt;
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if !meta.file_type().is_socket() {
                        anyhow::bail!("{} exists and is not a socket", path.display());
                    }
                    std::fs::remove_file(path)
                        .with_context(|| format!("removing stale {}", path.display()))?;
                }
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                }
                let l = UnixListener::bind(path)
                    .with_context(|| format!("binding {}", path.display()))?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("chmod {}", path.display()))?;
                Listener::Unix(l, path.clone())
            }
        };
        Ok(Endpoint { listener })
    }

    /// Where it listens (a TCP port 0 resolved).
    pub fn address(&self) -> String {
        match &self.listener {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string()),
            Listener::Unix(_, p) => p.display().to_string(),
        }
    }

    /// The unix socket file to remove at exit, if any.
    pub fn socket_file(&self) -> Option<PathBuf> {
        match &self.listener {
            Listener::Unix(_, p) => Some(p.clone()),
            Listener::Tcp(_) => None,
        }
    }

    /// Serves scrapes on a thread of its own until the process exits.
    pub fn spawn(self, source: Source) -> anyhow::Result<()> {
        let address = self.address();
        info!(%address, "metrics endpoint listening");
        let mut names = GuestNames {
            store: source.store.clone(),
            cache: HashMap::new(),
        };
        thread::Builder::new()
            .name("metrics".into())
            .spawn(move || loop {
                let accepted = match &self.listener {
                    Listener::Tcp(l) => l.accept().map(|(s, _)| Conn::Tcp(s)),
                    Listener::Unix(l, _) => l.accept().map(|(s, _)| Conn::Unix(s)),
                };
                match accepted {
                    Ok(conn) => {
                        if let Err(e) = serve_connection(conn, &source, &mut names) {
                            debug!(error = %e, "metrics connection");
                        }
                    }
                    Err(e) => {
                        warn!(address = %address, error = %e, "metrics accept");
                        thread::sleep(Duration::from_millis(100));
                    }
                }
            })
            .context("spawning the metrics thread")?;
        Ok(())
    }
}

enum Conn {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl Conn {
    fn set_timeouts(&self) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => {
                s.set_read_timeout(Some(READ_TIMEOUT))?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))
            }
            Conn::Unix(s) => {
                s.set_read_timeout(Some(READ_TIMEOUT))?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))
            }
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Unix(s) => s.flush(),
        }
    }
}

/// A parsed request head: what the responder needs of it.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// The path, without a query string.
    pub path: String,
    /// The `Accept` header, if given.
    pub accept: Option<String>,
}

/// Parses a request head (up to the blank line). `None`: not HTTP.
pub fn parse_request(head: &str) -> Option<Request> {
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, target, version) = (first.next()?, first.next()?, first.next()?);
    if !version.starts_with("HTTP/1.") || first.next().is_some() {
        return None;
    }
    let path = target.split('?').next().unwrap_or(target).to_string();
    let mut accept: Option<String> = None;
    for l in lines {
        if let Some((name, value)) = l.split_once(':') {
            if name.trim().eq_ignore_ascii_case("accept") {
                // Repeated headers combine, as HTTP says.
                let v = value.trim();
                accept = Some(match accept {
                    Some(a) => format!("{a},{v}"),
                    None => v.to_string(),
                });
            }
        }
    }
    Some(Request {
        method: method.to_string(),
        path,
        accept,
    })
}

/// Reads up to the end of the request head (bounded by [`MAX_REQUEST_HEAD`]).
fn read_head(conn: &mut Conn) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
        if buf.len() > MAX_REQUEST_HEAD {
            return Ok(None);
        }
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn respond(
    conn: &mut Conn,
    status: &str,
    content_type: &str,
    extra: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    conn.write_all(&out)?;
    conn.flush()
}

fn serve_connection(
    mut conn: Conn,
    source: &Source,
    names: &mut GuestNames,
) -> std::io::Result<()> {
    conn.set_timeouts()?;
    let plain = "text/plain; charset=utf-8";
    let Some(req) = read_head(&mut conn)?.as_deref().and_then(parse_request) else {
        return respond(
            &mut conn,
            "400 Bad Request",
            plain,
            "",
            "bad request\n",
            false,
        );
    };
    let head_only = req.method == "HEAD";
    if req.method != "GET" && !head_only {
        return respond(
            &mut conn,
            "405 Method Not Allowed",
            plain,
            "Allow: GET, HEAD\r\n",
            "only GET and HEAD\n",
            false,
        );
    }
    match req.path.as_str() {
        "/metrics" => {}
        "/" => {
            return respond(
                &mut conn,
                "200 OK",
                plain,
                "",
                "xenblkd: metrics at /metrics\n",
                head_only,
            )
        }
        _ => {
            return respond(
                &mut conn,
                "404 Not Found",
                plain,
                "",
                "not found\n",
                head_only,
            )
        }
    }
    let Some((daemon, devices)) = source.sender.status(STATUS_TIMEOUT) else {
        return respond(
            &mut conn,
            "503 Service Unavailable",
            plain,
            "",
            "the device manager did not answer\n",
            head_only,
        );
    };
    let guests = names.lookup(devices.iter().map(|d| d.domid));
    let reactors = source.gauges.reactors();
    let format = Format::negotiate(req.accept.as_deref());
    let body = render(
        &Snapshot {
            daemon: &daemon,
            devices: &devices,
            reactors: &reactors,
            guests: &guests,
        },
        format,
    );
    respond(
        &mut conn,
        "200 OK",
        format.content_type(),
        "",
        &body,
        head_only,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads() {
        let r = parse_request(
            "GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept: application/openmetrics-text;version=1.0.0\r\naccept: text/plain",
        )
        .unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/metrics");
        assert_eq!(
            r.accept.as_deref(),
            Some("application/openmetrics-text;version=1.0.0,text/plain")
        );
        assert_eq!(
            parse_request("HEAD / HTTP/1.0").unwrap(),
            Request {
                method: "HEAD".into(),
                path: "/".into(),
                accept: None
            }
        );
        assert_eq!(parse_request("GET /metrics"), None);
        assert_eq!(parse_request("GET /metrics SPDY/3"), None);
        assert_eq!(parse_request("\u{0}\u{1}"), None);
    }
}
