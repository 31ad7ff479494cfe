//! QMP input from the toolstack (libxl) against `xenblkd qemu-dm`'s QMP server: the
//! fuzzer's bytes arrive in chunks over a scripted stream, so JSON values split and
//! batched across reads, garbage, floods and every command with any arguments reach
//! `qmp::serve` as they would on the socket.
//!
//! `qmp.rs` lives in the `xenblkd` binary crate and depends only on serde_json, so it is
//! compiled in here as a module rather than giving the binary a library target.
//!
//! Checked: no panic, termination, and every reply is one JSON value per `"\r\n"` line.

#![no_main]

#[allow(dead_code)]
#[path = "../../crates/xenblkd/src/qmp.rs"]
mod qmp;

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use libfuzzer_sys::fuzz_target;
use qmp::{BlockDevice, ChardevInfo, DeviceModel, RunState};

struct Dm {
    running: AtomicBool,
    fail_cont: bool,
}

impl DeviceModel for Dm {
    fn run_state(&self) -> RunState {
        if self.running.load(Ordering::Relaxed) {
            RunState::Running
        } else {
            RunState::Prelaunch
        }
    }
    fn cont(&self) -> Result<(), String> {
        if self.fail_cont {
            return Err("no".into());
        }
        self.running.store(true, Ordering::Relaxed);
        Ok(())
    }
    fn name(&self) -> Option<String> {
        Some("guest".into())
    }
    fn chardevs(&self) -> Vec<ChardevInfo> {
        vec![ChardevInfo {
            label: "serial0".into(),
            filename: "pty:/dev/pts/3".into(),
        }]
    }
    fn block_devices(&self) -> Result<Vec<BlockDevice>, String> {
        if self.fail_cont {
            return Err("xenblkd serve is not answering".into());
        }
        Ok(vec![BlockDevice {
            device: "xvda".into(),
            devid: 51712,
            file: Some("/var/lib/xen/images/guest.qcow2".into()),
            format: Some("qcow2".into()),
            read_only: false,
            size_bytes: 8 << 30,
            ..BlockDevice::default()
        }])
    }
}

/// Hands out the input in chunks whose sizes the input's first bytes choose.
struct Script<'a> {
    input: &'a [u8],
    sizes: &'a [u8],
    turn: usize,
    out: Vec<u8>,
}

impl Read for Script<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let size = self.sizes.get(self.turn % self.sizes.len().max(1)).copied();
        self.turn += 1;
        let want = match size {
            Some(0) | None => self.input.len(),
            Some(s) => usize::from(s) * 16,
        };
        let n = want.min(buf.len()).min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Script<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let nsizes = usize::from(flags >> 4).min(rest.len());
    let (sizes, input) = rest.split_at(nsizes);
    let dm = Dm {
        running: AtomicBool::new(flags & 1 != 0),
        fail_cont: flags & 2 != 0,
    };
    let mut stream = Script {
        input,
        sizes,
        turn: 0,
        out: Vec::new(),
    };
    let mut record = Vec::new();
    let _ = qmp::serve(&mut stream, &dm, &mut record);
    assert!(record.len() <= 32);
    for line in stream.out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let line = line
            .strip_suffix(b"\r")
            .expect("every message ends with \\r\\n");
        serde_json::from_slice::<serde_json::Value>(line).expect("every reply is JSON");
    }
});
