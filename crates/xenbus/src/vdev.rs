//! Virtual device names and numbers (Xen's docs/misc/vbd-interface.txt): the `devid` of
//! `backend/<type>/<domid>/<devid>` and `device/vbd/<devid>` is the number the guest
//! derives its disk name from, e.g. `xvda` = 51712.

use std::fmt;

/// Why a virtual device specification was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid virtual device {0:?} (expected xvdX, sdX, hdX with an optional partition, or a number)")]
pub struct VdevError(pub String);

/// The Xen major number of `xvd*` disks.
const XVD_MAJOR: u32 = 202;

/// Parses `xvda`, `xvdb3`, `xvdaa`, `sda`, `hdc1` or a decimal device number.
pub fn parse_vdev(spec: &str) -> Result<u32, VdevError> {
    let err = || VdevError(spec.chars().take(32).collect());
    if !spec.is_empty() && spec.len() <= 10 && spec.bytes().all(|b| b.is_ascii_digit()) {
        return spec.parse::<u32>().map_err(|_| err());
    }
    let (kind, rest) = if let Some(r) = spec.strip_prefix("xvd") {
        ("xvd", r)
    } else if let Some(r) = spec.strip_prefix("sd") {
        ("sd", r)
    } else if let Some(r) = spec.strip_prefix("hd") {
        ("hd", r)
    } else {
        return Err(err());
    };
    let letters_len = rest.bytes().take_while(u8::is_ascii_lowercase).count();
    let (letters, digits) = rest.split_at(letters_len);
    if letters.is_empty() || letters.len() > 3 {
        return Err(err());
    }
    let disk = disk_index(letters).ok_or_else(err)?;
    let part = if digits.is_empty() {
        0
    } else if digits.len() <= 3
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
    {
        digits.parse::<u32>().map_err(|_| err())?
    } else {
        return Err(err());
    };
    match kind {
        "xvd" if disk < 16 && part < 16 => Ok((XVD_MAJOR << 8) | (disk << 4) | part),
        "xvd" if part < 256 => Ok((1 << 28) | (disk << 8) | part),
        "sd" if disk < 16 && part < 16 => Ok((8 << 8) | (disk << 4) | part),
        "hd" if disk < 2 && part < 64 => Ok((3 << 8) | (disk << 6) | part),
        "hd" if disk < 4 && part < 64 => Ok((22 << 8) | ((disk - 2) << 6) | part),
        _ => Err(err()),
    }
}

/// Bijective base-26 index of a disk letter sequence (`a` = 0, `z` = 25, `aa` = 26).
fn disk_index(letters: &str) -> Option<u32> {
    let mut n: u32 = 0;
    for c in letters.bytes() {
        n = n.checked_mul(26)?.checked_add(u32::from(c - b'a') + 1)?;
    }
    n.checked_sub(1)
}

/// The `xvd` name of a device number, for logs and status output (`xvdb`, `xvda1`), or the
/// number itself when it is not an `xvd` number.
pub fn vdev_name(devid: u32) -> String {
    let (disk, part) = if devid >> 8 == XVD_MAJOR {
        ((devid >> 4) & 0xf, devid & 0xf)
    } else if devid >> 28 == 1 {
        // The extended form is exactly `1 << 28 | disk << 8 | partition`: a number with
        // any higher bit set is no xvd number (it used to be named as if those bits were
        // not there, so two different devices could share a name in logs and status).
        ((devid >> 8) & 0xfffff, devid & 0xff)
    } else {
        return devid.to_string();
    };
    let mut letters = Vec::new();
    let mut n = disk + 1;
    while n > 0 {
        n -= 1;
        letters.push(b'a' + (n % 26) as u8);
        n /= 26;
    }
    letters.reverse();
    let mut s = format!("xvd{}", String::from_utf8_lossy(&letters));
    if part != 0 {
        s.push_str(&part.to_string());
    }
    s
}

/// A device id shown as name and number.
#[derive(Debug, Clone, Copy)]
pub struct VdevDisplay(pub u32);

impl fmt::Display for VdevDisplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", vdev_name(self.0), self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!(parse_vdev("xvda"), Ok(51712));
        assert_eq!(parse_vdev("xvdb"), Ok(51728));
        assert_eq!(parse_vdev("xvda1"), Ok(51713));
        assert_eq!(parse_vdev("xvdp"), Ok((202 << 8) | (15 << 4)));
        assert_eq!(parse_vdev("xvdq"), Ok((1 << 28) | (16 << 8)));
        assert_eq!(parse_vdev("xvdaa"), Ok((1 << 28) | (26 << 8)));
        assert_eq!(parse_vdev("sda"), Ok(2048));
        assert_eq!(parse_vdev("hda"), Ok(768));
        assert_eq!(parse_vdev("hdc"), Ok(22 << 8));
        assert_eq!(parse_vdev("51712"), Ok(51712));
        for bad in [
            "",
            "xvd",
            "xvdA",
            "xvda0",
            "xvda01",
            "hde",
            "floppy",
            "xvdabcd",
            "99999999999",
            "sdq",
        ] {
            assert!(parse_vdev(bad).is_err(), "{bad}");
        }
        for name in [
            "xvda", "xvdb", "xvdp", "xvdq", "xvdz", "xvdaa", "xvdzz", "xvda3",
        ] {
            assert_eq!(vdev_name(parse_vdev(name).unwrap()), name);
        }
        assert_eq!(vdev_name(2048), "2048");
    }

    /// Found by the `config` fuzz target: bits above the extended form's marker were
    /// ignored, so 0x7005_6272 was named `xvdbaa114`, the name of 0x1005_6272.
    #[test]
    fn numbers_above_the_extended_form_are_not_named() {
        assert_eq!(vdev_name(0x7005_6272), "1879401074");
        assert_eq!(vdev_name(0x2000_0100), "536871168");
        assert_eq!(vdev_name(0x1005_6272), "xvdbaa114");
        assert_eq!(parse_vdev("xvdbaa114"), Ok(0x1005_6272));
        // The extended encoding of a short-form disk names the same disk.
        assert_eq!(vdev_name((1 << 28) | 1), "xvda1");
    }
}
