//! The `rbd:` target syntax of QEMU and libxl:
//! `rbd:pool[/namespace]/image[@snapshot][:option=value...]`.
//!
//! Options are `id=NAME` (the cephx user, without `client.`), `conf=PATH` (a ceph.conf;
//! default: librados' search: `$CEPH_CONF`, /etc/ceph/ceph.conf...), and any other
//! `key=value`, which is passed to librados as a configuration setting (`mon_host=...`,
//! `keyring=...`, `rados_osd_op_timeout=...`), as QEMU does. A `:` inside a value is
//! written `\:` (a monitor address with a port), a backslash `\\`.
//!
//! A pure, bounded parser: at most [`MAX_TARGET_LEN`] bytes and [`MAX_OPTIONS`] options;
//! names are checked for what Ceph allows, so nothing odd reaches librados' C strings.

use std::fmt;

/// Longest target accepted (xenstore values are at most 4 KiB).
pub const MAX_TARGET_LEN: usize = 4096;
/// Most `key=value` options in one target.
pub const MAX_OPTIONS: usize = 16;
/// Longest pool, namespace, image or snapshot name.
pub const MAX_NAME_LEN: usize = 255;

/// A parsed `rbd:` target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdTarget {
    pub pool: String,
    /// RADOS namespace inside the pool (empty: the default namespace).
    pub namespace: String,
    pub image: String,
    /// Open this snapshot (read-only) instead of the image head.
    pub snapshot: Option<String>,
    /// The cephx user (`client.<id>`); `None`: librados' default (`admin`).
    pub id: Option<String>,
    /// The ceph.conf to read; `None`: librados' default search.
    pub conf: Option<String>,
    /// Further librados settings, in the order given.
    pub options: Vec<(String, String)>,
}

/// Why an `rbd:` target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("not an rbd: target")]
    NotRbd,
    #[error("rbd target longer than {MAX_TARGET_LEN} bytes")]
    TooLong,
    #[error("rbd target must be rbd:pool/image or rbd:pool/namespace/image")]
    MissingImage,
    #[error("empty {0} name in the rbd target")]
    EmptyName(&'static str),
    #[error(
        "{what} name {name:?} is not allowed (at most {MAX_NAME_LEN} bytes, no control characters)"
    )]
    BadName { what: &'static str, name: String },
    #[error("rbd option {0:?} is not key=value")]
    BadOption(String),
    #[error("rbd option key {0:?} is not a librados setting name")]
    BadKey(String),
    #[error("rbd option {0} given twice")]
    Duplicate(String),
    #[error("more than {MAX_OPTIONS} rbd options")]
    TooManyOptions,
    #[error("rbd target ends in a lone backslash")]
    TrailingBackslash,
    #[error("rbd target contains a NUL byte")]
    Nul,
}

/// Whether `v` names an RBD image (`rbd:` prefix).
pub fn is_rbd_target(v: &str) -> bool {
    v.starts_with("rbd:")
}

/// Splits `s` at unescaped `sep`, unescaping `\x` to `x` in the pieces.
fn split_escaped(s: &str, sep: char) -> Result<Vec<String>, TargetError> {
    let mut parts = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(n) => parts.last_mut().expect("never empty").push(n),
                None => return Err(TargetError::TrailingBackslash),
            },
            c if c == sep => {
                if parts.len() > MAX_OPTIONS {
                    return Err(TargetError::TooManyOptions);
                }
                parts.push(String::new());
            }
            c => parts.last_mut().expect("never empty").push(c),
        }
    }
    Ok(parts)
}

fn check_name(what: &'static str, name: &str) -> Result<(), TargetError> {
    if name.is_empty() {
        return Err(TargetError::EmptyName(what));
    }
    if name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(TargetError::BadName {
            what,
            name: name.chars().take(64).collect(),
        });
    }
    Ok(())
}

impl RbdTarget {
    /// Parses `rbd:pool[/namespace]/image[@snapshot][:key=value...]`.
    pub fn parse(v: &str) -> Result<RbdTarget, TargetError> {
        if v.len() > MAX_TARGET_LEN {
            return Err(TargetError::TooLong);
        }
        if v.contains('\0') {
            return Err(TargetError::Nul);
        }
        let rest = v.strip_prefix("rbd:").ok_or(TargetError::NotRbd)?;
        let mut fields = split_escaped(rest, ':')?.into_iter();
        let spec = fields.next().unwrap_or_default();
        let (path, snapshot) = match spec.split_once('@') {
            Some((p, s)) => (p, Some(s.to_string())),
            None => (spec.as_str(), None),
        };
        let names: Vec<&str> = path.split('/').collect();
        let (pool, namespace, image) = match names.as_slice() {
            [pool, image] => (*pool, "", *image),
            [pool, ns, image] => (*pool, *ns, *image),
            _ => return Err(TargetError::MissingImage),
        };
        check_name("pool", pool)?;
        if names.len() == 3 {
            check_name("namespace", namespace)?;
        }
        check_name("image", image)?;
        if let Some(s) = &snapshot {
            check_name("snapshot", s)?;
        }
        let mut target = RbdTarget {
            pool: pool.to_string(),
            namespace: namespace.to_string(),
            image: image.to_string(),
            snapshot,
            id: None,
            conf: None,
            options: Vec::new(),
        };
        for field in fields {
            let (key, value) = field
                .split_once('=')
                .ok_or_else(|| TargetError::BadOption(field.chars().take(64).collect()))?;
            if key.is_empty()
                || key.len() > 64
                || !key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b' ' || b == b'-')
            {
                return Err(TargetError::BadKey(key.chars().take(64).collect()));
            }
            if value.chars().any(char::is_control) {
                return Err(TargetError::BadOption(field.chars().take(64).collect()));
            }
            let slot = match key {
                "id" => Some(&mut target.id),
                "conf" => Some(&mut target.conf),
                _ => None,
            };
            match slot {
                Some(s) if s.is_some() => return Err(TargetError::Duplicate(key.to_string())),
                Some(s) => *s = Some(value.to_string()),
                None => {
                    if target.options.iter().any(|(k, _)| k == key) {
                        return Err(TargetError::Duplicate(key.to_string()));
                    }
                    target.options.push((key.to_string(), value.to_string()));
                }
            }
        }
        Ok(target)
    }

    /// `pool[/namespace]/image[@snapshot]`: what the image is, for messages.
    pub fn image_spec(&self) -> String {
        let mut s = self.pool.clone();
        if !self.namespace.is_empty() {
            s.push('/');
            s.push_str(&self.namespace);
        }
        s.push('/');
        s.push_str(&self.image);
        if let Some(snap) = &self.snapshot {
            s.push('@');
            s.push_str(snap);
        }
        s
    }
}

/// `rbd:` and the image spec (options, which may name keyrings or monitors, left out).
impl fmt::Display for RbdTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rbd:{}", self.image_spec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_and_image() {
        let t = RbdTarget::parse("rbd:rbd/vm1").unwrap();
        assert_eq!((t.pool.as_str(), t.image.as_str()), ("rbd", "vm1"));
        assert_eq!(t.namespace, "");
        assert_eq!((t.snapshot, t.id, t.conf), (None, None, None));
        assert!(t.options.is_empty());
        assert_eq!(
            RbdTarget::parse("rbd:rbd/vm1").unwrap().to_string(),
            "rbd:rbd/vm1"
        );
    }

    #[test]
    fn namespace_snapshot_and_options() {
        let t = RbdTarget::parse(
            "rbd:pool/tenant/img@base:id=xen:conf=/etc/ceph/c.conf:mon_host=10.0.0.1\\:6789",
        )
        .unwrap();
        assert_eq!(t.pool, "pool");
        assert_eq!(t.namespace, "tenant");
        assert_eq!(t.image, "img");
        assert_eq!(t.snapshot.as_deref(), Some("base"));
        assert_eq!(t.id.as_deref(), Some("xen"));
        assert_eq!(t.conf.as_deref(), Some("/etc/ceph/c.conf"));
        assert_eq!(
            t.options,
            vec![("mon_host".to_string(), "10.0.0.1:6789".to_string())]
        );
        assert_eq!(t.to_string(), "rbd:pool/tenant/img@base");
        let t = RbdTarget::parse("rbd:p/a\\\\b").unwrap();
        assert_eq!(t.image, "a\\b");
    }

    #[test]
    fn refusals() {
        use TargetError::*;
        for (v, e) in [
            ("nbd://h/e", NotRbd),
            ("rbd:", MissingImage),
            ("rbd:pool", MissingImage),
            ("rbd:a/b/c/d", MissingImage),
            ("rbd:/img", EmptyName("pool")),
            ("rbd:pool/", EmptyName("image")),
            ("rbd:pool//img", EmptyName("namespace")),
            ("rbd:p/i@", EmptyName("snapshot")),
            ("rbd:p/i:id", BadOption("id".into())),
            ("rbd:p/i:=x", BadKey("".into())),
            ("rbd:p/i:a;b=1", BadKey("a;b".into())),
            ("rbd:p/i:id=a:id=b", Duplicate("id".into())),
            ("rbd:p/i:x=1:x=2", Duplicate("x".into())),
            ("rbd:p/i\\", TrailingBackslash),
            ("rbd:p/i\0", Nul),
        ] {
            assert_eq!(RbdTarget::parse(v), Err(e), "{v:?}");
        }
        assert!(matches!(
            RbdTarget::parse("rbd:p/i\u{7}"),
            Err(BadName { what: "image", .. })
        ));
        let many: String = (0..=MAX_OPTIONS).map(|i| format!(":k{i}=v")).collect();
        assert_eq!(
            RbdTarget::parse(&format!("rbd:p/i{many}")),
            Err(TooManyOptions)
        );
        let long = format!("rbd:p/{}", "x".repeat(MAX_TARGET_LEN));
        assert_eq!(RbdTarget::parse(&long), Err(TooLong));
        let name = format!("rbd:p/{}", "x".repeat(MAX_NAME_LEN + 1));
        assert!(matches!(RbdTarget::parse(&name), Err(BadName { .. })));
    }

    #[test]
    fn never_panics_on_odd_input() {
        // A cheap exhaustive pass over short strings of the interesting characters.
        let alphabet = ['r', 'b', 'd', ':', '/', '@', '=', '\\', 'a'];
        let mut s = String::from("rbd:");
        fn walk(s: &mut String, alphabet: &[char], depth: usize) {
            let _ = RbdTarget::parse(s);
            if depth == 0 {
                return;
            }
            for &c in alphabet {
                s.push(c);
                walk(s, alphabet, depth - 1);
                s.pop();
            }
        }
        walk(&mut s, &alphabet, 5);
    }
}
