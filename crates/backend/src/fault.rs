//! Test-only fault injection (the `fault-injection` feature, never in a daemon build):
//! makes a chosen ring panic at its next pass, to test that a bug in one ring halts only
//! that ring. Nothing a guest sends can reach it.

use std::sync::Mutex;

use crate::reactor::VbdId;

/// Rings that panic at their next pass.
static PANIC_NEXT: Mutex<Vec<(VbdId, usize)>> = Mutex::new(Vec::new());

/// Makes ring `ring` of `vbd` panic the next time its reactor runs it.
pub fn panic_next_pass(vbd: VbdId, ring: usize) {
    PANIC_NEXT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((vbd, ring));
}

/// Whether ring `ring` of `vbd` is to panic now (once).
pub(crate) fn take_panic(vbd: VbdId, ring: usize) -> bool {
    let mut v = PANIC_NEXT.lock().unwrap_or_else(|p| p.into_inner());
    match v.iter().position(|&e| e == (vbd, ring)) {
        Some(i) => {
            v.swap_remove(i);
            true
        }
        None => false,
    }
}
