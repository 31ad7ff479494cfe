//! Strict parsers for xenstore values.
//!
//! Everything a frontend writes is guest-controlled, so these parsers accept exactly the
//! decimal (or, for `physical-device`, hexadecimal) forms the protocol uses and nothing
//! else: no sign, no spaces, no radix prefix, bounded length, no overflow. The one
//! leniency is a single trailing NUL, because some writers store the C terminator.
//! None of them can panic on any input.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// Longest decimal value we parse (`u64::MAX` has 20 digits).
const MAX_DIGITS: usize = 20;

fn strip_nul(value: &[u8]) -> &[u8] {
    value.strip_suffix(&[0]).unwrap_or(value)
}

/// A strictly decimal `u64`.
pub fn parse_u64(value: &[u8]) -> Option<u64> {
    let v = strip_nul(value);
    if v.is_empty() || v.len() > MAX_DIGITS || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |acc, &d| {
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// A strictly decimal `u32`.
pub fn parse_u32(value: &[u8]) -> Option<u32> {
    parse_u64(value).and_then(|v| u32::try_from(v).ok())
}

/// A boolean feature flag as Linux reads it (`xenbus_read_unsigned(..., 0)`): any
/// non-zero number is true. `None` if it is not a number.
pub fn parse_flag(value: &[u8]) -> Option<bool> {
    parse_u64(value).map(|v| v != 0)
}

/// `physical-device`: `"MAJOR:MINOR"` in hexadecimal, as the hotplug scripts write it
/// (`printf "%x:%x"`) and blkback reads it (`"%x:%x"`).
pub fn parse_major_minor(value: &[u8]) -> Option<(u32, u32)> {
    let v = strip_nul(value);
    let colon = v.iter().position(|&b| b == b':')?;
    let hex = |s: &[u8]| -> Option<u32> {
        if s.is_empty() || s.len() > 8 || !s.iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        u32::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok()
    };
    Some((hex(&v[..colon])?, hex(&v[colon + 1..])?))
}

/// The image format named by a `params` prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// A raw image, regular file or block device (`raw:`, `aio:` or no prefix).
    Raw,
    /// A qcow2 image (`qcow2:`).
    Qcow2,
    /// An export of an NBD server, named by its URI (`nbd://host[:port]/export`,
    /// `nbd+unix:///export?socket=PATH`), alone or after `raw:` / `aio:`.
    Nbd,
    /// An image of a Ceph cluster, named as QEMU and libxl name it
    /// (`rbd:pool[/namespace]/image[@snap][:id=NAME][:conf=PATH][:key=value...]`), alone
    /// or after `raw:` / `aio:`.
    Rbd,
    /// A null disk of a given size (`null:SIZE`): reads return zeros, writes are
    /// forgotten. A benchmark and test target (QEMU's `null-co`).
    Null,
}

impl DiskFormat {
    /// The name used in `params` prefixes and status output.
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Nbd => "nbd",
            DiskFormat::Rbd => "rbd",
            DiskFormat::Null => "null",
        }
    }
}

/// What `params` names: a format and an absolute path (or, for NBD, a URI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskTarget {
    /// The image format.
    pub format: DiskFormat,
    /// The absolute path of the image or device; for [`DiskFormat::Nbd`] the export's
    /// URI, for [`DiskFormat::Rbd`] the `rbd:` target, as written (validated in full when
    /// the storage layer opens it).
    pub path: PathBuf,
}

/// Whether `v` starts with an NBD URI scheme (`nbd://`, `nbd+unix://`, `nbds://`...).
/// Schemes xenblkd cannot serve (TLS, vsock) are still NBD targets: opening them fails
/// with the reason, rather than "not an absolute path".
pub fn is_nbd_uri(v: &[u8]) -> bool {
    let Some(end) = v.windows(3).position(|w| w == b"://") else {
        return false;
    };
    let scheme = &v[..end];
    let lower: Vec<u8> = scheme.iter().map(u8::to_ascii_lowercase).collect();
    lower.len() <= 16
        && (lower == b"nbd"
            || lower == b"nbds"
            || lower.starts_with(b"nbd+")
            || lower.starts_with(b"nbds+"))
}

/// Whether `v` names a Ceph RBD image (`rbd:`).
pub fn is_rbd_target(v: &[u8]) -> bool {
    v.starts_with(b"rbd:")
}

/// Whether `v` names a null disk (`null:SIZE`).
pub fn is_null_target(v: &[u8]) -> bool {
    v.starts_with(storage::null::NULL_TARGET_PREFIX.as_bytes())
}

/// Whether `v` names network storage (an NBD URI or an `rbd:` target) rather than a path.
pub fn is_network_target(v: &[u8]) -> bool {
    is_nbd_uri(v) || is_rbd_target(v)
}

/// Why a `params` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamsError {
    /// Empty value.
    #[error("params is empty")]
    Empty,
    /// A `format:` prefix we do not implement.
    #[error("unsupported image format prefix {0:?}")]
    UnsupportedFormat(String),
    /// The path is not absolute (relative paths would depend on the daemon's cwd).
    #[error("path {0:?} is not absolute")]
    NotAbsolute(String),
    /// The path contains a NUL byte.
    #[error("path contains a NUL byte")]
    Nul,
    /// An NBD URI after a format other than raw.
    #[error("{0} images over NBD are not supported (serve the export as raw)")]
    FormatOverNbd(&'static str),
    /// An NBD URI that is not valid UTF-8.
    #[error("NBD URI is not valid UTF-8")]
    NbdNotUtf8,
    /// An `rbd:` target after a format other than raw.
    #[error("{0} images over RBD are not supported (RBD images are served as raw)")]
    FormatOverRbd(&'static str),
    /// An `rbd:` target that is not valid UTF-8.
    #[error("rbd target is not valid UTF-8")]
    RbdNotUtf8,
    /// A `null:SIZE` target whose size is not one.
    #[error(transparent)]
    Null(#[from] storage::NullTargetError),
}

/// Parses `params` as libxl and the xl disk syntax write it: a plain absolute path, or
/// `raw:`, `aio:` (the blktap-era spelling of raw asynchronous I/O) or `qcow2:` followed
/// by one; or an NBD URI (`target=nbd://...` on an xl disk line) or an `rbd:` target
/// (`target=rbd:pool/image`), alone or after `raw:` / `aio:` (libxl writes `aio:` before a
/// qdisk's target); or a null disk, `null:SIZE` (`target=null:1G`), for benchmarks. The longest value xenstore can
/// carry is 4 KiB, so no extra bound is needed.
pub fn parse_params(value: &[u8]) -> Result<DiskTarget, ParamsError> {
    let v = strip_nul(value);
    if v.is_empty() {
        return Err(ParamsError::Empty);
    }
    let nbd = |uri: &[u8]| -> Result<DiskTarget, ParamsError> {
        let text = std::str::from_utf8(uri).map_err(|_| ParamsError::NbdNotUtf8)?;
        if text.contains('\0') {
            return Err(ParamsError::Nul);
        }
        Ok(DiskTarget {
            format: DiskFormat::Nbd,
            path: PathBuf::from(text),
        })
    };
    let rbd = |target: &[u8]| -> Result<DiskTarget, ParamsError> {
        let text = std::str::from_utf8(target).map_err(|_| ParamsError::RbdNotUtf8)?;
        if text.contains('\0') {
            return Err(ParamsError::Nul);
        }
        Ok(DiskTarget {
            format: DiskFormat::Rbd,
            path: PathBuf::from(text),
        })
    };
    if is_nbd_uri(v) {
        return nbd(v);
    }
    if is_rbd_target(v) {
        return rbd(v);
    }
    if is_null_target(v) {
        let text = std::str::from_utf8(v).map_err(|_| {
            ParamsError::Null(storage::NullTargetError::BadSize(
                crate::error::sanitize(v),
                "not UTF-8".into(),
            ))
        })?;
        storage::NullConfig::from_target(text)?;
        return Ok(DiskTarget {
            format: DiskFormat::Null,
            path: PathBuf::from(text),
        });
    }
    if let Some(colon) = v.iter().position(|&b| b == b':') {
        let rest = &v[colon + 1..];
        if is_nbd_uri(rest) {
            return match &v[..colon] {
                b"raw" | b"aio" => nbd(rest),
                b"qcow2" => Err(ParamsError::FormatOverNbd("qcow2")),
                other => Err(ParamsError::UnsupportedFormat(crate::error::sanitize(
                    other,
                ))),
            };
        }
        if is_rbd_target(rest) {
            return match &v[..colon] {
                b"raw" | b"aio" => rbd(rest),
                b"qcow2" => Err(ParamsError::FormatOverRbd("qcow2")),
                other => Err(ParamsError::UnsupportedFormat(crate::error::sanitize(
                    other,
                ))),
            };
        }
    }
    let (format, path) = if v.starts_with(b"/") {
        (DiskFormat::Raw, v)
    } else if let Some(colon) = v.iter().position(|&b| b == b':') {
        let (prefix, rest) = (&v[..colon], &v[colon + 1..]);
        let format = match prefix {
            b"raw" | b"aio" => DiskFormat::Raw,
            b"qcow2" => DiskFormat::Qcow2,
            other => {
                return Err(ParamsError::UnsupportedFormat(crate::error::sanitize(
                    other,
                )));
            }
        };
        (format, rest)
    } else {
        return Err(ParamsError::NotAbsolute(crate::error::sanitize(v)));
    };
    if path.contains(&0) {
        return Err(ParamsError::Nul);
    }
    if !path.starts_with(b"/") {
        return Err(ParamsError::NotAbsolute(crate::error::sanitize(path)));
    }
    Ok(DiskTarget {
        format,
        path: PathBuf::from(OsStr::from_bytes(path)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_strict() {
        assert_eq!(parse_u64(b"0"), Some(0));
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        assert_eq!(parse_u64(b"99999999999999999999"), None);
        assert_eq!(parse_u32(b"4294967295"), Some(u32::MAX));
        assert_eq!(parse_u32(b"4294967296"), None);
        assert_eq!(parse_u32(b"12\0"), Some(12));
        for bad in [
            &b""[..],
            b"\0",
            b" 1",
            b"1 ",
            b"+1",
            b"-1",
            b"0x10",
            b"1\0\0",
            b"1e3",
            b"\xff",
            b"000000000000000000001",
        ] {
            assert_eq!(parse_u64(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn flags() {
        assert_eq!(parse_flag(b"1"), Some(true));
        assert_eq!(parse_flag(b"0"), Some(false));
        assert_eq!(parse_flag(b"2"), Some(true));
        assert_eq!(parse_flag(b"yes"), None);
    }

    #[test]
    fn major_minor() {
        assert_eq!(parse_major_minor(b"fd:0"), Some((0xfd, 0)));
        assert_eq!(parse_major_minor(b"8:10"), Some((8, 0x10)));
        assert_eq!(parse_major_minor(b"103:1\0"), Some((0x103, 1)));
        for bad in [
            &b""[..],
            b"8",
            b":1",
            b"8:",
            b"g:1",
            b"8:1:2",
            b"123456789:1",
        ] {
            assert_eq!(parse_major_minor(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn params_prefixes() {
        let t = parse_params(b"/var/lib/xen/disk.img").unwrap();
        assert_eq!(
            (t.format, t.path.to_str().unwrap()),
            (DiskFormat::Raw, "/var/lib/xen/disk.img")
        );
        let t = parse_params(b"aio:/dev/vg/lv").unwrap();
        assert_eq!(
            (t.format, t.path.to_str().unwrap()),
            (DiskFormat::Raw, "/dev/vg/lv")
        );
        let t = parse_params(b"raw:/a:b").unwrap();
        assert_eq!(
            (t.format, t.path.to_str().unwrap()),
            (DiskFormat::Raw, "/a:b")
        );
        let t = parse_params(b"qcow2:/img.qcow2\0").unwrap();
        assert_eq!(t.format, DiskFormat::Qcow2);
        // A colon inside an absolute path is part of the path.
        let t = parse_params(b"/dev/disk/by-path/pci-0:0:1").unwrap();
        assert_eq!(t.path.to_str().unwrap(), "/dev/disk/by-path/pci-0:0:1");
        assert_eq!(parse_params(b""), Err(ParamsError::Empty));
        assert!(matches!(
            parse_params(b"vhd:/x"),
            Err(ParamsError::UnsupportedFormat(_))
        ));
        assert!(matches!(
            parse_params(b"disk.img"),
            Err(ParamsError::NotAbsolute(_))
        ));
        assert!(matches!(
            parse_params(b"raw:disk.img"),
            Err(ParamsError::NotAbsolute(_))
        ));
        assert_eq!(parse_params(b"/a\0b"), Err(ParamsError::Nul));
    }

    #[test]
    fn nbd_targets() {
        for (params, uri) in [
            (
                &b"nbd://10.0.0.1:10809/disk"[..],
                "nbd://10.0.0.1:10809/disk",
            ),
            (
                b"nbd+unix:///e?socket=/run/s.sock\0",
                "nbd+unix:///e?socket=/run/s.sock",
            ),
            (b"aio:nbd://h/e", "nbd://h/e"),
            (b"raw:NBD+TCP://h/e", "NBD+TCP://h/e"),
            // Refused by the storage layer with the reason, but an NBD target here.
            (b"nbds://h/e", "nbds://h/e"),
        ] {
            let t = parse_params(params).unwrap();
            assert_eq!((t.format, t.path.to_str().unwrap()), (DiskFormat::Nbd, uri));
        }
        assert_eq!(DiskFormat::Nbd.name(), "nbd");
        assert_eq!(
            parse_params(b"qcow2:nbd://h/e"),
            Err(ParamsError::FormatOverNbd("qcow2"))
        );
        assert!(matches!(
            parse_params(b"vhd:nbd://h/e"),
            Err(ParamsError::UnsupportedFormat(_))
        ));
        assert_eq!(parse_params(b"nbd://h/\xff"), Err(ParamsError::NbdNotUtf8));
        assert_eq!(parse_params(b"nbd://h/a\0b"), Err(ParamsError::Nul));
        // Not NBD: a scheme-less or other-scheme value is still a path question.
        assert!(matches!(
            parse_params(b"http://h/e"),
            Err(ParamsError::UnsupportedFormat(_))
        ));
        assert!(!is_nbd_uri(b"/srv/nbd://x"));
        assert!(!is_nbd_uri(b"nbdx://h"));
        assert!(!is_nbd_uri(b"nbd:/h"));
    }

    #[test]
    fn null_targets() {
        for (params, target) in [(&b"null:1G"[..], "null:1G"), (b"null:4096\0", "null:4096")] {
            let t = parse_params(params).unwrap();
            assert_eq!(
                (t.format, t.path.to_str().unwrap()),
                (DiskFormat::Null, target)
            );
        }
        assert_eq!(DiskFormat::Null.name(), "null");
        assert!(is_null_target(b"null:1G"));
        assert!(!is_null_target(b"/srv/null:1G"));
        // Refused here, before a device is created: its size is all there is to check.
        assert!(matches!(
            parse_params(b"null:lots"),
            Err(ParamsError::Null(storage::NullTargetError::BadSize(..)))
        ));
        assert_eq!(
            parse_params(b"null:1"),
            Err(ParamsError::Null(storage::NullTargetError::TooSmall(1)))
        );
        assert!(matches!(
            parse_params(b"null:\xff"),
            Err(ParamsError::Null(_))
        ));
    }

    #[test]
    fn rbd_targets() {
        for (params, target) in [
            (&b"rbd:rbd/vm1"[..], "rbd:rbd/vm1"),
            (b"rbd:pool/ns/img@snap\0", "rbd:pool/ns/img@snap"),
            (b"aio:rbd:rbd/vm1:id=xen", "rbd:rbd/vm1:id=xen"),
            (
                b"raw:rbd:p/i:conf=/etc/ceph/c.conf:mon_host=10.0.0.1\\:6789",
                "rbd:p/i:conf=/etc/ceph/c.conf:mon_host=10.0.0.1\\:6789",
            ),
            // Refused by the storage layer with the reason, but an RBD target here.
            (b"rbd:", "rbd:"),
        ] {
            let t = parse_params(params).unwrap();
            assert_eq!(
                (t.format, t.path.to_str().unwrap()),
                (DiskFormat::Rbd, target)
            );
        }
        assert_eq!(DiskFormat::Rbd.name(), "rbd");
        assert_eq!(
            parse_params(b"qcow2:rbd:p/i"),
            Err(ParamsError::FormatOverRbd("qcow2"))
        );
        assert!(matches!(
            parse_params(b"vhd:rbd:p/i"),
            Err(ParamsError::UnsupportedFormat(_))
        ));
        assert_eq!(parse_params(b"rbd:p/\xff"), Err(ParamsError::RbdNotUtf8));
        assert_eq!(parse_params(b"rbd:p/a\0b"), Err(ParamsError::Nul));
        assert!(!is_rbd_target(b"/srv/rbd:x"));
        assert!(!is_rbd_target(b"RBD:p/i"));
        assert!(is_network_target(b"rbd:p/i") && is_network_target(b"nbd://h/e"));
        assert!(!is_network_target(b"/dev/rbd0"));
    }
}
