//! `enum xenbus_state` of `xen/io/xenbus.h`: the states both ends of a split driver
//! publish in their `state` node, and their strict parsing. Defined here, the lowest layer
//! both the backend's device lifecycle (`xenbus`) and the simulated frontend (`blkfront`)
//! build on; it says nothing about block devices.

use std::fmt;

/// A XenbusState, as written (in decimal) in a `state` node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum XenbusState {
    /// 0: the node is missing or unreadable.
    Unknown,
    /// 1: the toolstack created the device; the driver is getting ready.
    Initialising,
    /// 2: the backend waits for the frontend's transport parameters (after publishing its
    /// own); blkfront waits for this before it allocates rings.
    InitWait,
    /// 3: the frontend published its rings and event channels.
    Initialised,
    /// 4: serving.
    Connected,
    /// 5: the device is being shut down.
    Closing,
    /// 6: shut down; may be restarted (Initialising) or removed.
    Closed,
    /// 7: (netfront/pcifront) reconfiguration in progress.
    Reconfiguring,
    /// 8: reconfiguration done.
    Reconfigured,
}

impl XenbusState {
    /// The number written in the `state` node.
    pub fn as_u32(self) -> u32 {
        match self {
            XenbusState::Unknown => 0,
            XenbusState::Initialising => 1,
            XenbusState::InitWait => 2,
            XenbusState::Initialised => 3,
            XenbusState::Connected => 4,
            XenbusState::Closing => 5,
            XenbusState::Closed => 6,
            XenbusState::Reconfiguring => 7,
            XenbusState::Reconfigured => 8,
        }
    }

    /// The state with that number, if xenbus.h defines one.
    pub fn from_u32(v: u32) -> Option<XenbusState> {
        Some(match v {
            0 => XenbusState::Unknown,
            1 => XenbusState::Initialising,
            2 => XenbusState::InitWait,
            3 => XenbusState::Initialised,
            4 => XenbusState::Connected,
            5 => XenbusState::Closing,
            6 => XenbusState::Closed,
            7 => XenbusState::Reconfiguring,
            8 => XenbusState::Reconfigured,
            _ => return None,
        })
    }

    /// Parses a `state` node. Strict decimal (an optional trailing NUL is tolerated, some
    /// writers include the terminator); `None` for anything else, which callers treat as
    /// [`XenbusState::Unknown`] the way Linux's `xenbus_read_driver_state` does.
    pub fn parse(value: &[u8]) -> Option<XenbusState> {
        parse_decimal(value).and_then(XenbusState::from_u32)
    }

    /// What Linux's `xenbus_read_driver_state` makes of a `state` node: a missing node
    /// or one that is no state is [`XenbusState::Unknown`].
    pub fn read(value: Option<&[u8]>) -> XenbusState {
        value
            .and_then(XenbusState::parse)
            .unwrap_or(XenbusState::Unknown)
    }

    /// The number in a `state` node that holds a number xenbus.h does not define.
    pub fn undefined_number(value: &[u8]) -> Option<u32> {
        parse_decimal(value).filter(|&n| XenbusState::from_u32(n).is_none())
    }

    /// The node value to write.
    pub fn node_value(self) -> String {
        self.as_u32().to_string()
    }

    /// Linux's `xenbus_strstate` name.
    pub fn name(self) -> &'static str {
        match self {
            XenbusState::Unknown => "Unknown",
            XenbusState::Initialising => "Initialising",
            XenbusState::InitWait => "InitWait",
            XenbusState::Initialised => "Initialised",
            XenbusState::Connected => "Connected",
            XenbusState::Closing => "Closing",
            XenbusState::Closed => "Closed",
            XenbusState::Reconfiguring => "Reconfiguring",
            XenbusState::Reconfigured => "Reconfigured",
        }
    }
}

/// Strict decimal `u32`: digits only, no sign or spaces, one trailing NUL tolerated.
fn parse_decimal(value: &[u8]) -> Option<u32> {
    let v = value.strip_suffix(&[0]).unwrap_or(value);
    if v.is_empty() || v.len() > 10 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

impl fmt::Display for XenbusState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_strictness() {
        for v in 0..=8 {
            let s = XenbusState::from_u32(v).unwrap();
            assert_eq!(s.as_u32(), v);
            assert_eq!(XenbusState::parse(s.node_value().as_bytes()), Some(s));
        }
        assert_eq!(XenbusState::parse(b"4\0"), Some(XenbusState::Connected));
        for bad in [
            &b""[..],
            b"9",
            b" 4",
            b"4 ",
            b"+4",
            b"-1",
            b"0x4",
            b"44444444444444444444",
        ] {
            assert_eq!(XenbusState::parse(bad), None, "{bad:?}");
            assert_eq!(
                XenbusState::read(Some(bad)),
                XenbusState::Unknown,
                "{bad:?}"
            );
        }
        assert_eq!(XenbusState::read(None), XenbusState::Unknown);
        assert_eq!(XenbusState::undefined_number(b"9"), Some(9));
        assert_eq!(XenbusState::undefined_number(b"4"), None);
        assert_eq!(XenbusState::undefined_number(b"x"), None);
    }
}
