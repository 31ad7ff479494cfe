//! The configuration file and the disk-line / target parsers: everything an operator's file
//! or a toolstack's `params`, `vdev`, `physical-device` and frontend nodes feed us.
//!
//! The first byte picks the parser; the rest is its input. Checked: no panic, and the
//! round trips that must hold (a device number printed and parsed back, a parsed
//! `XenbusState` written and read back, a valid configuration re-validated after reload).

#![no_main]

use libfuzzer_sys::fuzz_target;
use storage::nbd::NbdUri;
use storage::rbd::target::RbdTarget;
use xenbus::config::Config;
use xenbus::{negotiate, parse, vdev, XenbusState};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match which % 6 {
        0 => {
            if let Ok(mut c) = Config::from_toml(&text, "fuzz") {
                let _ = c.settings_for("vbd", 1, 51712);
                let again = c.clone();
                let _ = c.reload_from(again);
                assert!(
                    c.validate().is_ok(),
                    "a reloaded valid config must stay valid"
                );
            }
        }
        1 => {
            if let Ok(t) = parse::parse_params(rest) {
                // Network targets go on to their own parsers, as the open path does.
                let s = t.path.to_string_lossy();
                let _ = NbdUri::parse(&s);
                let _ = RbdTarget::parse(&s);
            }
            let _ = parse::is_network_target(rest);
        }
        2 => {
            if let Ok(devid) = vdev::parse_vdev(&text) {
                names_itself(devid);
            }
            if rest.len() >= 4 {
                let devid = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let _ = vdev::VdevDisplay(devid).to_string();
                names_itself(devid);
            }
        }
        3 => {
            let _ = parse::parse_u64(rest);
            let _ = parse::parse_u32(rest);
            let _ = parse::parse_flag(rest);
            let _ = parse::parse_major_minor(rest);
            let _ = negotiate::parse_protocol(Some(rest));
            if let Some(s) = XenbusState::parse(rest) {
                assert_eq!(XenbusState::parse(s.node_value().as_bytes()), Some(s));
            }
        }
        4 => {
            let _ = NbdUri::parse(&text);
        }
        _ => {
            let _ = RbdTarget::parse(&text);
            let _ = text.parse::<xenstore::Perm>();
        }
    }
});

/// The name of a device number parses back to that number, or to the short form of the
/// same disk when the number is the extended encoding of a disk the short form covers.
fn names_itself(devid: u32) {
    let name = vdev::vdev_name(devid);
    let Ok(back) = vdev::parse_vdev(&name) else {
        return;
    };
    if back != devid {
        let (disk, part) = ((back >> 4) & 0xf, back & 0xf);
        assert!(
            back >> 8 == 202 && devid == (1 << 28) | (disk << 8) | part,
            "{name} names {back}, not {devid}"
        );
    }
}
