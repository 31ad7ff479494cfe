//! End-to-end: blkfront against the real engine on the simulator.

mod common;

use common::{serial, Rig, RigOpts};

#[test]
fn smoke_write_read() {
    let _g = serial();
    let mut rig = Rig::new(RigOpts::default());
    let data: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    rig.write(4096, &data);
    rig.check(0, 512 * 1024);
    rig.fe().flush().unwrap();
    rig.finish();
}
