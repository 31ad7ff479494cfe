//! Xen's node permission model: a list of `(domid, access)` pairs, where the
//! first entry names the node's *owner* and the access that applies to every
//! domain not listed; the following entries are an ACL.
//!
//! On the wire each entry is a letter followed by the decimal domid:
//! `n` (none), `r` (read), `w` (write), `b` (both), e.g. `"n0"`, `"r5"`.
//! The owner always has full access, whatever its letter says; privileged
//! domains (dom0) bypass permissions entirely.

use std::fmt;
use std::str::FromStr;

/// The largest domain id the parser accepts (Xen's `DOMID_MASK`-bounded ids
/// and the special ids `DOMID_SELF`..`DOMID_IDLE` all fit in 16 bits).
pub const DOMID_MAX: u32 = 0xffff;

/// Access rights for one domain on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// `n`: no access.
    None,
    /// `r`: may read.
    Read,
    /// `w`: may write.
    Write,
    /// `b`: may read and write.
    Both,
}

impl Access {
    /// The wire letter.
    pub fn letter(self) -> char {
        match self {
            Access::None => 'n',
            Access::Read => 'r',
            Access::Write => 'w',
            Access::Both => 'b',
        }
    }

    /// Parses a wire letter.
    pub fn from_letter(c: u8) -> Option<Access> {
        Some(match c {
            b'n' => Access::None,
            b'r' => Access::Read,
            b'w' => Access::Write,
            b'b' => Access::Both,
            _ => return None,
        })
    }

    /// True if this grants reading.
    pub fn can_read(self) -> bool {
        matches!(self, Access::Read | Access::Both)
    }

    /// True if this grants writing.
    pub fn can_write(self) -> bool {
        matches!(self, Access::Write | Access::Both)
    }
}

/// One permission entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Perm {
    /// The domain this entry is about (the owner, for the first entry).
    pub domid: u32,
    /// What that domain (or, for the first entry, everybody else) may do.
    pub access: Access,
}

impl Perm {
    /// A permission entry.
    pub const fn new(domid: u32, access: Access) -> Perm {
        Perm { domid, access }
    }
}

/// Why a permission string did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid permission string {0:?}")]
pub struct ParsePermError(pub String);

impl FromStr for Perm {
    type Err = ParsePermError;

    fn from_str(s: &str) -> Result<Perm, ParsePermError> {
        Perm::from_wire(s.as_bytes()).ok_or_else(|| ParsePermError(s.chars().take(16).collect()))
    }
}

impl Perm {
    /// Parses `"<letter><domid>"`; strict: no sign, no spaces, no overflow.
    pub fn from_wire(b: &[u8]) -> Option<Perm> {
        let (&letter, digits) = b.split_first()?;
        let access = Access::from_letter(letter)?;
        if digits.is_empty() || digits.len() > 5 || !digits.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let domid = digits
            .iter()
            .fold(0u32, |acc, d| acc * 10 + u32::from(d - b'0'));
        (domid <= DOMID_MAX).then_some(Perm { domid, access })
    }
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.access.letter(), self.domid)
    }
}

/// What `domid` may do on a node with permissions `perms`, following
/// xenstored's `perm_for_conn`: privileged → everything; owner → everything;
/// first matching ACL entry; else the owner entry's access (the default).
pub fn effective_access(perms: &[Perm], domid: u32, privileged: bool) -> Access {
    if privileged {
        return Access::Both;
    }
    let Some(owner) = perms.first() else {
        return Access::None;
    };
    if owner.domid == domid {
        return Access::Both;
    }
    perms[1..]
        .iter()
        .find(|p| p.domid == domid)
        .map_or(owner.access, |p| p.access)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_format() {
        for s in ["n0", "r1", "w2", "b3", "b65535"] {
            assert_eq!(s.parse::<Perm>().unwrap().to_string(), s);
        }
        assert_eq!("r7".parse::<Perm>().unwrap(), Perm::new(7, Access::Read));
        for bad in [
            "",
            "n",
            "x1",
            "r-1",
            "r 1",
            "r65536",
            "r999999999999",
            "R1",
            "r1x",
        ] {
            assert!(bad.parse::<Perm>().is_err(), "{bad}");
        }
    }

    #[test]
    fn effective_access_follows_xenstored() {
        let perms = [Perm::new(5, Access::None), Perm::new(7, Access::Read)];
        assert_eq!(effective_access(&perms, 5, false), Access::Both);
        assert_eq!(effective_access(&perms, 7, false), Access::Read);
        assert_eq!(effective_access(&perms, 9, false), Access::None);
        assert_eq!(effective_access(&perms, 9, true), Access::Both);
        let public = [Perm::new(0, Access::Read)];
        assert_eq!(effective_access(&public, 3, false), Access::Read);
        assert_eq!(effective_access(&[], 3, false), Access::None);
    }
}
