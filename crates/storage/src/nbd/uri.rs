//! NBD URIs as QEMU and libnbd write them (the NBD project's `uri.md`):
//! `nbd://host[:port]/export` (also spelled `nbd+tcp://`) and
//! `nbd+unix:///export?socket=PATH`. TLS (`nbds`) and vsock schemes are recognised and
//! refused with a reason. The parser is a pure function over the string, bounded and
//! panic-free: `params` comes from the toolstack and must never crash the daemon.

use std::fmt;
use std::path::PathBuf;

use super::proto::MAX_EXPORT_NAME;

/// NBD's IANA port.
pub const DEFAULT_PORT: u16 = 10809;
/// Longest URI accepted (xenstore values are at most 4 KiB anyway).
const MAX_URI_LEN: usize = 8192;
/// `sizeof(sockaddr_un.sun_path) - 1`.
const MAX_SOCKET_PATH: usize = 107;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    /// A host name or address and a TCP port. IPv6 literals are kept without brackets.
    Tcp { host: String, port: u16 },
    /// A unix socket.
    Unix { path: PathBuf },
}

impl fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdAddress::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            NbdAddress::Tcp { host, port } => write!(f, "{host}:{port}"),
            NbdAddress::Unix { path } => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    pub address: NbdAddress,
    /// The export name (may be empty: the server's default export).
    pub export: String,
}

/// Why a URI was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error(
        "not an NBD URI (expected nbd://host[:port]/export or nbd+unix:///export?socket=PATH)"
    )]
    NotNbd,
    #[error("{0} is not supported (xenblkd speaks plain NBD over TCP or a unix socket)")]
    UnsupportedScheme(String),
    #[error("URI is longer than {MAX_URI_LEN} bytes")]
    TooLong,
    #[error("missing host")]
    NoHost,
    #[error("bad port {0:?}")]
    BadPort(String),
    #[error("user information in an NBD URI is not supported")]
    UserInfo,
    #[error("nbd+unix needs ?socket=PATH and no host")]
    UnixNeedsSocket,
    #[error("socket path must be absolute and at most {MAX_SOCKET_PATH} bytes")]
    BadSocketPath,
    #[error("unknown or repeated query parameter {0:?}")]
    BadQuery(String),
    #[error("export name longer than {MAX_EXPORT_NAME} bytes")]
    ExportTooLong,
    #[error("bad percent-encoding or non-UTF-8 text")]
    BadEncoding,
    #[error("fragments are not allowed")]
    Fragment,
}

/// True when `s` looks like an NBD URI (any of the schemes, supported or not), so callers
/// can tell "an NBD target we refuse" from "a path".
pub fn is_nbd_uri(s: &str) -> bool {
    let lower = s.get(..12).unwrap_or(s).to_ascii_lowercase();
    ["nbd://", "nbds://", "nbd+", "nbds+"]
        .iter()
        .any(|p| lower.starts_with(p))
}

fn percent_decode(s: &str) -> Result<String, UriError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).ok_or(UriError::BadEncoding)?;
            let text = std::str::from_utf8(hex).map_err(|_| UriError::BadEncoding)?;
            let v = u8::from_str_radix(text, 16).map_err(|_| UriError::BadEncoding)?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    let s = String::from_utf8(out).map_err(|_| UriError::BadEncoding)?;
    if s.contains('\0') {
        return Err(UriError::BadEncoding);
    }
    Ok(s)
}

impl NbdUri {
    /// Parses an NBD URI.
    pub fn parse(uri: &str) -> Result<NbdUri, UriError> {
        if uri.len() > MAX_URI_LEN {
            return Err(UriError::TooLong);
        }
        let (scheme, rest) = uri.split_once("://").ok_or(UriError::NotNbd)?;
        let unix = match scheme.to_ascii_lowercase().as_str() {
            "nbd" | "nbd+tcp" => false,
            "nbd+unix" => true,
            s @ ("nbds" | "nbds+tcp" | "nbds+unix" | "nbd+vsock" | "nbds+vsock") => {
                return Err(UriError::UnsupportedScheme(s.to_string()))
            }
            _ => return Err(UriError::NotNbd),
        };
        if rest.contains('#') {
            return Err(UriError::Fragment);
        }
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => (&before_query[..i], &before_query[i..]),
            None => (before_query, ""),
        };
        if authority.contains('@') {
            return Err(UriError::UserInfo);
        }
        // The export is the path without its leading slash.
        let export = percent_decode(path.strip_prefix('/').unwrap_or(path))?;
        if export.len() > MAX_EXPORT_NAME {
            return Err(UriError::ExportTooLong);
        }
        let mut socket: Option<String> = None;
        if let Some(q) = query {
            for pair in q.split('&').filter(|p| !p.is_empty()) {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                if key == "socket" && unix && socket.is_none() {
                    socket = Some(percent_decode(value)?);
                } else {
                    return Err(UriError::BadQuery(key.chars().take(64).collect()));
                }
            }
        }
        let address = if unix {
            let path = socket.ok_or(UriError::UnixNeedsSocket)?;
            if !authority.is_empty() {
                return Err(UriError::UnixNeedsSocket);
            }
            if !path.starts_with('/') || path.len() > MAX_SOCKET_PATH {
                return Err(UriError::BadSocketPath);
            }
            NbdAddress::Unix {
                path: PathBuf::from(path),
            }
        } else {
            let (host, port) = split_host_port(authority)?;
            NbdAddress::Tcp { host, port }
        };
        Ok(NbdUri { address, export })
    }
}

fn split_host_port(authority: &str) -> Result<(String, u16), UriError> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or(UriError::NoHost)?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':').ok_or(UriError::NoHost)?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let host = percent_decode(host)?;
    if host.is_empty() {
        return Err(UriError::NoHost);
    }
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => Some(p)
            .filter(|p| p.len() <= 5 && p.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|p| p.parse::<u16>().ok())
            .filter(|&v| v != 0)
            .ok_or_else(|| UriError::BadPort(p.chars().take(16).collect()))?,
    };
    Ok((host, port))
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.address {
            NbdAddress::Tcp { .. } => write!(f, "nbd://{}/{}", self.address, self.export),
            NbdAddress::Unix { path } => {
                write!(f, "nbd+unix:///{}?socket={}", self.export, path.display())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> NbdAddress {
        NbdAddress::Tcp {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn tcp_uris() {
        let u = NbdUri::parse("nbd://example.org/disk0").unwrap();
        assert_eq!(
            (u.address, u.export.as_str()),
            (tcp("example.org", 10809), "disk0")
        );
        let u = NbdUri::parse("nbd://127.0.0.1:10810").unwrap();
        assert_eq!(
            (u.address, u.export.as_str()),
            (tcp("127.0.0.1", 10810), "")
        );
        let u = NbdUri::parse("nbd+tcp://[::1]:3000/a%20b/c").unwrap();
        assert_eq!((u.address, u.export.as_str()), (tcp("::1", 3000), "a b/c"));
        let u = NbdUri::parse("NBD://[fe80::1]/").unwrap();
        assert_eq!((u.address, u.export.as_str()), (tcp("fe80::1", 10809), ""));
        assert_eq!(
            NbdUri::parse("nbd://h:1/x").unwrap().to_string(),
            "nbd://h:1/x"
        );
    }

    #[test]
    fn unix_uris() {
        let u = NbdUri::parse("nbd+unix:///export?socket=/run/nbd.sock").unwrap();
        assert_eq!(
            u.address,
            NbdAddress::Unix {
                path: "/run/nbd.sock".into()
            }
        );
        assert_eq!(u.export, "export");
        let u = NbdUri::parse("nbd+unix://?socket=%2Ftmp%2Fs").unwrap();
        assert_eq!(
            (u.address, u.export.as_str()),
            (
                NbdAddress::Unix {
                    path: "/tmp/s".into()
                },
                ""
            )
        );
        assert_eq!(
            NbdUri::parse("nbd+unix:///e?socket=/s")
                .unwrap()
                .to_string(),
            "nbd+unix:///e?socket=/s"
        );
    }

    #[test]
    fn refusals() {
        use UriError::*;
        let long = format!("nbd://h/{}", "x".repeat(MAX_EXPORT_NAME + 1));
        let long_sock = format!("nbd+unix:///e?socket=/{}", "s".repeat(200));
        for (uri, err) in [
            ("/var/disk.img", NotNbd),
            ("http://h/e", NotNbd),
            ("nbds://h/e", UnsupportedScheme("nbds".into())),
            ("nbd+vsock://1/e", UnsupportedScheme("nbd+vsock".into())),
            ("nbd:///e", NoHost),
            ("nbd://h:0/e", BadPort("0".into())),
            ("nbd://h:65536/e", BadPort("65536".into())),
            ("nbd://h:+1/e", BadPort("+1".into())),
            ("nbd://h:x/e", BadPort("x".into())),
            ("nbd://u@h/e", UserInfo),
            ("nbd+unix:///e", UnixNeedsSocket),
            ("nbd+unix://h/e?socket=/s", UnixNeedsSocket),
            ("nbd+unix:///e?socket=rel", BadSocketPath),
            (long_sock.as_str(), BadSocketPath),
            ("nbd://h/e?socket=/s", BadQuery("socket".into())),
            (
                "nbd+unix:///e?socket=/s&socket=/t",
                BadQuery("socket".into()),
            ),
            ("nbd+unix:///e?socket=/s&tls=on", BadQuery("tls".into())),
            ("nbd://h/%zz", BadEncoding),
            ("nbd://h/%00", BadEncoding),
            ("nbd://h/%ff", BadEncoding),
            ("nbd://h/e%", BadEncoding),
            ("nbd://h/e#f", Fragment),
            (long.as_str(), ExportTooLong),
            ("nbd://[::1/e", NoHost),
            ("nbd://[::1]x/e", NoHost),
        ] {
            assert_eq!(NbdUri::parse(uri), Err(err), "{uri}");
        }
        assert_eq!(NbdUri::parse(&"n".repeat(10000)), Err(TooLong));
    }

    #[test]
    fn recognises_nbd_schemes() {
        for s in [
            "nbd://h/e",
            "NBD+unix:///e?socket=/s",
            "nbds://h",
            "nbd+vsock://2",
        ] {
            assert!(is_nbd_uri(s), "{s}");
        }
        for s in ["/a/b", "raw:/a", "qcow2:/x", "", "nbd", "nbd:/x"] {
            assert!(!is_nbd_uri(s), "{s}");
        }
    }
}
