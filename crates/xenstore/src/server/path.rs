//! Node path rules of xenstored: validation, relative-path expansion, and the
//! parent/ancestor arithmetic the tree and the watch matcher share.

use crate::error::Errno;
use crate::wire::{ABS_PATH_MAX, REL_PATH_MAX};

/// A request path after canonicalisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Canonical {
    /// Absolute node path (`/...`) or special watch path (`@...`).
    pub path: String,
    /// The prefix that was prepended to a relative path
    /// (`/local/domain/<domid>/`), so events can be reported relative again.
    pub relative_prefix: Option<String>,
}

/// The home directory of a domain, as `XS_GET_DOMAIN_PATH` reports it.
pub(crate) fn domain_path(domid: u32) -> String {
    format!("/local/domain/{domid}")
}

/// Expands and validates a path from a request, following xenstored's
/// `canonicalize` + `is_valid_nodename`: relative paths are taken relative to
/// the caller's home; `@` paths are only accepted where `allow_special`
/// (watches); characters are limited to `[A-Za-z0-9-/_@]`; no empty
/// components, no trailing slash; length limits from xs_wire.h.
pub(crate) fn canonicalize(
    domid: u32,
    raw: &[u8],
    allow_special: bool,
) -> Result<Canonical, Errno> {
    let s = std::str::from_utf8(raw).map_err(|_| Errno::Einval)?;
    if s.is_empty() || !s.bytes().all(valid_char) {
        return Err(Errno::Einval);
    }
    if s.starts_with('@') {
        if !allow_special || s.len() > REL_PATH_MAX || s.contains('/') {
            return Err(Errno::Einval);
        }
        return Ok(Canonical {
            path: s.to_owned(),
            relative_prefix: None,
        });
    }
    let (path, relative_prefix) = if s.starts_with('/') {
        (s.to_owned(), None)
    } else {
        if s.len() > REL_PATH_MAX {
            return Err(Errno::Einval);
        }
        let prefix = format!("{}/", domain_path(domid));
        (format!("{prefix}{s}"), Some(prefix))
    };
    if path.len() > ABS_PATH_MAX || path.contains("//") || (path.len() > 1 && path.ends_with('/')) {
        return Err(Errno::Einval);
    }
    Ok(Canonical {
        path,
        relative_prefix,
    })
}

fn valid_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_' | b'@')
}

/// The parent of an absolute path; `None` for the root.
pub(crate) fn parent(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    match path.rfind('/') {
        Some(0) => Some("/"),
        Some(i) => Some(&path[..i]),
        None => None,
    }
}

/// The last component of an absolute path (empty for the root).
pub(crate) fn basename(path: &str) -> &str {
    path.rfind('/').map_or(path, |i| &path[i + 1..])
}

/// `parent/child`.
pub(crate) fn join(parent: &str, child: &str) -> String {
    if parent == "/" {
        format!("/{child}")
    } else {
        format!("{parent}/{child}")
    }
}

/// True if `ancestor` is `path` or one of its ancestors.
pub(crate) fn is_self_or_ancestor(ancestor: &str, path: &str) -> bool {
    if ancestor == "/" {
        return path.starts_with('/');
    }
    path.strip_prefix(ancestor)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_paths() {
        let c = canonicalize(5, b"device/vbd", false).unwrap();
        assert_eq!(c.path, "/local/domain/5/device/vbd");
        assert_eq!(c.relative_prefix.as_deref(), Some("/local/domain/5/"));
        assert_eq!(
            canonicalize(5, b"/a/b-c_d@e", false).unwrap().path,
            "/a/b-c_d@e"
        );
        assert_eq!(canonicalize(5, b"/", false).unwrap().path, "/");
        assert_eq!(
            canonicalize(0, b"@releaseDomain", true).unwrap().path,
            "@releaseDomain"
        );
        for bad in [
            &b""[..],
            b"/a/",
            b"/a//b",
            b"/a b",
            b"/a.b",
            b"@releaseDomain",
            b"/\xff",
            b"a\0b",
        ] {
            assert_eq!(canonicalize(0, bad, false), Err(Errno::Einval), "{bad:?}");
        }
        assert!(canonicalize(
            0,
            format!("/{}", "a".repeat(ABS_PATH_MAX)).as_bytes(),
            false
        )
        .is_err());
        assert!(canonicalize(0, "a".repeat(REL_PATH_MAX + 1).as_bytes(), false).is_err());
    }

    #[test]
    fn tree_arithmetic() {
        assert_eq!(parent("/"), None);
        assert_eq!(parent("/a"), Some("/"));
        assert_eq!(parent("/a/b"), Some("/a"));
        assert_eq!(basename("/a/b"), "b");
        assert_eq!(join("/", "a"), "/a");
        assert_eq!(join("/a", "b"), "/a/b");
        assert!(is_self_or_ancestor("/", "/a"));
        assert!(is_self_or_ancestor("/a", "/a"));
        assert!(is_self_or_ancestor("/a", "/a/b"));
        assert!(!is_self_or_ancestor("/a", "/ab"));
        assert!(!is_self_or_ancestor("/a/b", "/a"));
    }
}
