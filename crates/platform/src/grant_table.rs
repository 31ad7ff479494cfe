//! The v1 grant table: its ABI (`xen/grant_table.h`) and both sides of its protocol.
//!
//! A grant table is an array of 8-byte [`GrantEntryV1`] records in memory the granting
//! guest writes and the hypervisor reads and flags. This module owns:
//!
//! * the ABI constants and the entry layout;
//! * the **hypervisor's side** ([`ActiveTable`]): what Xen's `map_grant_ref` /
//!   `acquire_grant_for_copy` check before letting another domain at a page (entry type,
//!   target domain, `GTF_readonly` against a writable pin, frame in range), the
//!   `GTF_reading`/`GTF_writing` flags it sets while an entry is pinned, and the per-entry
//!   pin counts that clear them again on the last unpin (Xen's active grant table);
//! * the **guest's side** ([`grant_access`], [`end_access`]): introducing and revoking an
//!   entry the way Linux's `gnttab` does, so a revoke while mapped fails exactly as it
//!   does on Xen.
//!
//! The table is guest-writable at any time: every entry is read once into a private copy
//! before it is checked, and flags change only by compare-and-swap with a bounded retry,
//! as Xen's `_set_status_v1` does.

use std::sync::{Mutex, MutexGuard};

use shmem::{full_barrier, OutOfBounds, SharedMemory};

use crate::{DomId, GrantRef, GrantStatus};

/// `GTF_invalid`: the entry grants nothing.
pub const GTF_INVALID: u16 = 0;
/// `GTF_permit_access`: `domid` may map and access `frame`.
pub const GTF_PERMIT_ACCESS: u16 = 1;
/// `GTF_accept_transfer`.
pub const GTF_ACCEPT_TRANSFER: u16 = 2;
/// `GTF_transitive` (v2 only).
pub const GTF_TRANSITIVE: u16 = 3;
/// `GTF_type_mask`.
pub const GTF_TYPE_MASK: u16 = 3;
/// `GTF_readonly`: only read-only maps and copies from the page.
pub const GTF_READONLY: u16 = 1 << 2;
/// `GTF_reading`: set by Xen while the entry is pinned.
pub const GTF_READING: u16 = 1 << 3;
/// `GTF_writing`: set by Xen while the entry is pinned writable.
pub const GTF_WRITING: u16 = 1 << 4;
pub const GTF_PWT: u16 = 1 << 5;
pub const GTF_PCD: u16 = 1 << 6;
pub const GTF_PAT: u16 = 1 << 7;
/// `GTF_sub_page`: only part of the page is granted; never mappable.
pub const GTF_SUB_PAGE: u16 = 1 << 8;

/// Size of a `grant_entry_v1`.
pub const ENTRY_SIZE: usize = 8;
/// Entries per 4 KiB grant-table frame.
pub const ENTRIES_PER_FRAME: usize = shmem::PAGE_SIZE / ENTRY_SIZE;
/// [`ENTRIES_PER_FRAME`] as a grant-reference count.
#[allow(clippy::cast_possible_truncation)] // 512
pub const ENTRIES_PER_FRAME_U32: u32 = ENTRIES_PER_FRAME as u32;
/// `GNTTAB_NR_RESERVED_ENTRIES`: entries 0..8 belong to the toolstack (console,
/// xenstore); guests hand out refs from here on.
pub const NR_RESERVED_ENTRIES: u32 = 8;

/// A private copy of one `grant_entry_v1 { u16 flags; domid_t domid; u32 frame; }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GrantEntryV1 {
    pub flags: u16,
    pub domid: DomId,
    pub frame: u32,
}

impl GrantEntryV1 {
    pub fn from_bytes(b: [u8; ENTRY_SIZE]) -> Self {
        Self {
            flags: u16::from_ne_bytes([b[0], b[1]]),
            domid: u16::from_ne_bytes([b[2], b[3]]),
            frame: u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        }
    }

    pub fn to_bytes(self) -> [u8; ENTRY_SIZE] {
        let mut b = [0u8; ENTRY_SIZE];
        b[0..2].copy_from_slice(&self.flags.to_ne_bytes());
        b[2..4].copy_from_slice(&self.domid.to_ne_bytes());
        b[4..8].copy_from_slice(&self.frame.to_ne_bytes());
        b
    }
}

fn entry_offset(gref: GrantRef) -> usize {
    gref as usize * ENTRY_SIZE
}

/// Reads entry `gref` once (one 8-byte volatile load: the entry is 8-aligned).
pub fn read_entry(table: &SharedMemory, gref: GrantRef) -> Result<GrantEntryV1, OutOfBounds> {
    let mut b = [0u8; ENTRY_SIZE];
    table.read(entry_offset(gref), &mut b)?;
    Ok(GrantEntryV1::from_bytes(b))
}

/// Number of entries a table region of `len` bytes holds.
pub fn entries_in(len: usize) -> u32 {
    u32::try_from(len / ENTRY_SIZE).unwrap_or(u32::MAX)
}

/// How many times a flags compare-and-swap is retried against a guest rewriting the
/// entry before the pin fails ("Shared grant entry is unstable", Xen allows 5 tries).
const PIN_RETRIES: u32 = 4;

/// What a pin is for; a copy may use `GTF_sub_page` entries (v1 ignores the subrange),
/// a map may not (Xen's `mapflag`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinKind {
    Map,
    Copy,
}

/// Xen's per-entry active state: how often the entry is pinned, how often writable, and
/// the frame read when the first pin activated it (later guest rewrites of the shared
/// entry do not move an active pin, as on Xen).
#[derive(Debug, Default, Clone, Copy)]
struct Active {
    pins: u32,
    writers: u32,
    frame: u32,
}

/// The hypervisor's view of one guest's grant table: the active entries, one lock each
/// (Xen's `active_entry_acquire`), so reactor threads mapping different grants of the
/// same guest do not contend.
#[derive(Debug)]
pub struct ActiveTable {
    entries: Box<[Mutex<Active>]>,
}

impl ActiveTable {
    pub fn new(nr_entries: u32) -> Self {
        Self {
            entries: (0..nr_entries)
                .map(|_| Mutex::new(Active::default()))
                .collect(),
        }
    }

    pub fn nr_entries(&self) -> u32 {
        entries_in(self.entries.len() * ENTRY_SIZE)
    }

    fn lock(&self, gref: GrantRef) -> Option<MutexGuard<'_, Active>> {
        let slot = self.entries.get(gref as usize)?;
        // A panic while holding an entry lock cannot leave `Active` half-updated (all
        // updates are single assignments after the checks), so a poisoned lock is usable.
        Some(slot.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Pins `gref` for `mapper` (`map_grant_ref` / `acquire_grant_for_copy`): checks the
    /// entry, sets `GTF_reading` (and `GTF_writing` unless `readonly`) in the shared
    /// flags, counts the pin and returns the frame. `nr_frames` bounds the frame (Xen's
    /// `get_paged_frame` → `GNTST_bad_page`).
    pub fn pin(
        &self,
        table: &SharedMemory,
        gref: GrantRef,
        mapper: DomId,
        readonly: bool,
        nr_frames: u32,
        kind: PinKind,
    ) -> Result<u32, GrantStatus> {
        let mut act = self.lock(gref).ok_or(GrantStatus::BAD_GNTREF)?;
        if act.pins == u32::MAX || act.writers == u32::MAX {
            return Err(GrantStatus::GENERAL_ERROR);
        }
        if act.pins == 0 || (!readonly && act.writers == 0) {
            set_status(table, gref, act.pins != 0, mapper, readonly, kind)?;
            if act.pins == 0 {
                // Read after the flags are set, as Xen does: from here on a well-behaved
                // guest no longer changes the entry.
                let frame = table
                    .load_u32_relaxed(entry_offset(gref) + 4)
                    .map_err(|_| GrantStatus::BAD_GNTREF)?;
                if frame >= nr_frames {
                    // `reduce_status_for_pin`: undo what this pin set.
                    let clear = GTF_READING | if readonly { 0 } else { GTF_WRITING };
                    clear_flags(table, gref, clear);
                    return Err(GrantStatus::BAD_PAGE);
                }
                act.frame = frame;
            }
        }
        act.pins += 1;
        if !readonly {
            act.writers += 1;
        }
        Ok(act.frame)
    }

    /// Drops one pin taken by [`ActiveTable::pin`]; the last writer clears `GTF_writing`,
    /// the last pin `GTF_reading`.
    pub fn unpin(&self, table: &SharedMemory, gref: GrantRef, readonly: bool) {
        let Some(mut act) = self.lock(gref) else {
            tracing::error!(gref, "unpin of a grant outside the table");
            return;
        };
        if act.pins == 0 || (!readonly && act.writers == 0) {
            tracing::error!(gref, readonly, "unpin of a grant that is not pinned");
            return;
        }
        act.pins -= 1;
        let mut clear = 0;
        if !readonly {
            act.writers -= 1;
            if act.writers == 0 {
                clear |= GTF_WRITING;
            }
        }
        if act.pins == 0 {
            clear |= GTF_READING;
        }
        if clear != 0 {
            clear_flags(table, gref, clear);
        }
    }

    /// Pins currently held on `gref` (0 outside the table).
    pub fn pins(&self, gref: GrantRef) -> u32 {
        self.lock(gref).map_or(0, |a| a.pins)
    }
}

/// Xen's `_set_status_v1`: on a private copy of flags and domid, check the entry (only
/// when not yet pinned) and compare-and-swap the access flags in, retrying a few times
/// against a guest racing us.
///
/// Xen swaps flags and domid as one 32-bit word; the shared-memory seam offers a 16-bit
/// swap, so a guest that rewrites `domid` alone, without touching `flags`, in the window
/// between our load and our swap is not caught. Such a guest only races its own grant:
/// the result is a pin it asked for with a domid it then withdrew, and the frame is still
/// bounds-checked.
fn set_status(
    table: &SharedMemory,
    gref: GrantRef,
    already_pinned: bool,
    mapper: DomId,
    readonly: bool,
    kind: PinKind,
) -> Result<(), GrantStatus> {
    let off = entry_offset(gref);
    let mask = match kind {
        PinKind::Map => GTF_TYPE_MASK | GTF_SUB_PAGE,
        PinKind::Copy => GTF_TYPE_MASK,
    };
    let mut seen = read_entry(table, gref).map_err(|_| GrantStatus::BAD_GNTREF)?;
    let mut retries = 0;
    loop {
        if !already_pinned && ((seen.flags & mask) != GTF_PERMIT_ACCESS || seen.domid != mapper) {
            tracing::debug!(
                gref,
                flags = seen.flags,
                domid = seen.domid,
                mapper,
                "bad grant flags or domain"
            );
            return Err(GrantStatus::GENERAL_ERROR);
        }
        let mut new = seen.flags | GTF_READING;
        if !readonly {
            new |= GTF_WRITING;
            if seen.flags & GTF_READONLY != 0 {
                tracing::debug!(gref, "attempt to write-pin a read-only grant");
                return Err(GrantStatus::GENERAL_ERROR);
            }
        }
        match table.compare_exchange_u16(off, seen.flags, new) {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(actual)) => {
                if retries == PIN_RETRIES {
                    tracing::debug!(gref, "shared grant entry is unstable");
                    return Err(GrantStatus::GENERAL_ERROR);
                }
                retries += 1;
                // Re-read domid with the new flags: both may have moved.
                seen = read_entry(table, gref).map_err(|_| GrantStatus::BAD_GNTREF)?;
                seen.flags = actual;
            }
            Err(_) => return Err(GrantStatus::BAD_GNTREF),
        }
    }
}

/// Clears `bits` in an entry's flags (Xen's `gnttab_clear_flags`, an atomic and).
fn clear_flags(table: &SharedMemory, gref: GrantRef, bits: u16) {
    if table.fetch_and_u16(entry_offset(gref), !bits).is_err() {
        tracing::error!(gref, "clearing flags of a grant outside the table");
    }
}

/// What Xen does to a guest's grant table when the process that mapped from it dies
/// (its gntdev mappings are torn down with it): clears `GTF_reading`/`GTF_writing` on
/// every entry among the first `nr_entries` granted to `mapper`, so the guest can end
/// access again. Returns how many entries were pinned.
///
/// Only for a mapper that holds nothing any more: a live one's pins would be lost.
pub fn release_pins(table: &SharedMemory, nr_entries: u32, mapper: DomId) -> usize {
    let mut released = 0;
    for gref in 0..nr_entries {
        let Ok(entry) = read_entry(table, gref) else {
            break;
        };
        if entry.domid == mapper && entry.flags & (GTF_READING | GTF_WRITING) != 0 {
            clear_flags(table, gref, GTF_READING | GTF_WRITING);
            released += 1;
        }
    }
    released
}

/// Why a guest could not revoke a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EndAccessError {
    /// The other domain still has the entry pinned (`GTF_reading`/`GTF_writing` set).
    #[error("grant {gref} is still in use by the other domain (flags {flags:#x})")]
    StillInUse { gref: GrantRef, flags: u16 },
    #[error("grant {0} is outside the grant table")]
    OutOfRange(GrantRef),
}

/// Introduces entry `gref` granting `domid` access to `frame` (guest side): domid and
/// frame first, a write barrier, then the flags, as `grant_table.h` prescribes.
pub fn grant_access(
    table: &SharedMemory,
    gref: GrantRef,
    domid: DomId,
    frame: u32,
    readonly: bool,
) -> Result<(), OutOfBounds> {
    let off = entry_offset(gref);
    let e = GrantEntryV1 {
        flags: 0,
        domid,
        frame,
    }
    .to_bytes();
    table.write(off + 2, &e[2..])?;
    full_barrier();
    let flags = GTF_PERMIT_ACCESS | if readonly { GTF_READONLY } else { 0 };
    // The entry is free (flags 0) when handed out; a swap keeps a stray concurrent pin
    // bit, which a correct hypervisor never sets on an invalid entry, from being lost.
    let mut cur = table.load_u16(off)?;
    loop {
        let new = (cur & (GTF_READING | GTF_WRITING)) | flags;
        match table.compare_exchange_u16(off, cur, new)? {
            Ok(_) => return Ok(()),
            Err(actual) => cur = actual,
        }
    }
}

/// Revokes entry `gref` (guest side), like Linux's `gnttab_end_foreign_access_ref`:
/// succeeds only if the entry is not pinned, by a compare-and-swap of the observed flags
/// to 0 that fails if Xen set `GTF_reading`/`GTF_writing` in between.
pub fn end_access(table: &SharedMemory, gref: GrantRef) -> Result<(), EndAccessError> {
    let off = entry_offset(gref);
    let mut flags = table
        .load_u16(off)
        .map_err(|_| EndAccessError::OutOfRange(gref))?;
    loop {
        if flags & (GTF_READING | GTF_WRITING) != 0 {
            return Err(EndAccessError::StillInUse { gref, flags });
        }
        match table
            .compare_exchange_u16(off, flags, 0)
            .map_err(|_| EndAccessError::OutOfRange(gref))?
        {
            Ok(_) => return Ok(()),
            Err(actual) => flags = actual,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BACKEND: DomId = 0;

    fn table(entries: usize) -> SharedMemory {
        SharedMemory::anonymous(entries * ENTRY_SIZE).unwrap()
    }

    fn flags(t: &SharedMemory, gref: GrantRef) -> u16 {
        read_entry(t, gref).unwrap().flags
    }

    #[test]
    fn entry_layout_round_trips() {
        let e = GrantEntryV1 {
            flags: GTF_PERMIT_ACCESS | GTF_READONLY,
            domid: 0x1234,
            frame: 0xdead_beef,
        };
        assert_eq!(GrantEntryV1::from_bytes(e.to_bytes()), e);
        let t = table(16);
        grant_access(&t, 9, 0x1234, 0xdead_beef, true).unwrap();
        assert_eq!(read_entry(&t, 9).unwrap(), e);
        assert_eq!(ENTRIES_PER_FRAME, 512);
    }

    #[test]
    fn pin_checks_what_xen_checks() {
        let t = table(32);
        let act = ActiveTable::new(32);
        let pin = |gref, ro| act.pin(&t, gref, BACKEND, ro, 16, PinKind::Map);
        // Never granted.
        assert_eq!(pin(8, true), Err(GrantStatus::GENERAL_ERROR));
        // Outside the table.
        assert_eq!(pin(32, true), Err(GrantStatus::BAD_GNTREF));
        assert_eq!(pin(u32::MAX, true), Err(GrantStatus::BAD_GNTREF));
        // Granted to someone else.
        grant_access(&t, 9, 5, 1, false).unwrap();
        assert_eq!(pin(9, true), Err(GrantStatus::GENERAL_ERROR));
        // Read-only grant, writable pin.
        grant_access(&t, 10, BACKEND, 2, true).unwrap();
        assert_eq!(pin(10, false), Err(GrantStatus::GENERAL_ERROR));
        assert_eq!(
            flags(&t, 10),
            GTF_PERMIT_ACCESS | GTF_READONLY,
            "failed pin sets nothing"
        );
        assert_eq!(pin(10, true), Ok(2));
        // Frame outside guest memory: bad_page, and the flags set for the pin are undone.
        grant_access(&t, 11, BACKEND, 16, false).unwrap();
        assert_eq!(pin(11, false), Err(GrantStatus::BAD_PAGE));
        assert_eq!(flags(&t, 11), GTF_PERMIT_ACCESS);
        assert_eq!(act.pins(11), 0);
        // Transfer-type and sub-page entries are not mappable; sub-page is copyable.
        t.write(
            12 * ENTRY_SIZE,
            &GrantEntryV1 {
                flags: GTF_ACCEPT_TRANSFER,
                domid: 0,
                frame: 1,
            }
            .to_bytes(),
        )
        .unwrap();
        assert_eq!(pin(12, true), Err(GrantStatus::GENERAL_ERROR));
        t.write(
            13 * ENTRY_SIZE,
            &GrantEntryV1 {
                flags: GTF_PERMIT_ACCESS | GTF_SUB_PAGE,
                domid: 0,
                frame: 1,
            }
            .to_bytes(),
        )
        .unwrap();
        assert_eq!(pin(13, true), Err(GrantStatus::GENERAL_ERROR));
        assert_eq!(act.pin(&t, 13, BACKEND, true, 16, PinKind::Copy), Ok(1));
    }

    #[test]
    fn pin_counts_and_flags_follow_the_last_unpin() {
        let t = table(16);
        let act = ActiveTable::new(16);
        grant_access(&t, 8, BACKEND, 3, false).unwrap();
        assert_eq!(act.pin(&t, 8, BACKEND, true, 4, PinKind::Map), Ok(3));
        assert_eq!(flags(&t, 8), GTF_PERMIT_ACCESS | GTF_READING);
        assert_eq!(act.pin(&t, 8, BACKEND, false, 4, PinKind::Map), Ok(3));
        assert_eq!(act.pin(&t, 8, BACKEND, false, 4, PinKind::Map), Ok(3));
        assert_eq!(flags(&t, 8), GTF_PERMIT_ACCESS | GTF_READING | GTF_WRITING);
        assert_eq!(act.pins(8), 3);
        // An active pin keeps its frame even if the guest rewrites the entry.
        t.write(8 * ENTRY_SIZE + 4, &1u32.to_ne_bytes()).unwrap();
        assert_eq!(act.pin(&t, 8, BACKEND, true, 4, PinKind::Map), Ok(3));
        act.unpin(&t, 8, true);
        act.unpin(&t, 8, false);
        assert_eq!(flags(&t, 8) & GTF_WRITING, GTF_WRITING, "one writer left");
        assert_eq!(
            end_access(&t, 8),
            Err(EndAccessError::StillInUse {
                gref: 8,
                flags: flags(&t, 8)
            })
        );
        act.unpin(&t, 8, false);
        assert_eq!(flags(&t, 8), GTF_PERMIT_ACCESS | GTF_READING, "reader left");
        assert!(end_access(&t, 8).is_err());
        act.unpin(&t, 8, true);
        assert_eq!(flags(&t, 8), GTF_PERMIT_ACCESS);
        assert_eq!(act.pins(8), 0);
        end_access(&t, 8).unwrap();
        assert_eq!(flags(&t, 8), 0);
        // A revoked entry is no longer mappable.
        assert_eq!(
            act.pin(&t, 8, BACKEND, true, 4, PinKind::Map),
            Err(GrantStatus::GENERAL_ERROR)
        );
        // Unbalanced unpin is logged, not fatal.
        act.unpin(&t, 8, true);
        assert_eq!(act.pins(8), 0);
    }

    #[test]
    fn end_access_out_of_range() {
        let t = table(16);
        assert_eq!(end_access(&t, 16), Err(EndAccessError::OutOfRange(16)));
    }

    #[test]
    fn racing_guest_makes_the_pin_fail_not_hang() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let t = Arc::new(table(16));
        let act = ActiveTable::new(16);
        grant_access(&t, 8, BACKEND, 1, false).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flipper = {
            let (t, stop) = (t.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // A hostile guest toggling PWT as fast as it can.
                    t.fetch_or_u16(8 * ENTRY_SIZE, GTF_PWT).unwrap();
                    t.fetch_and_u16(8 * ENTRY_SIZE, !GTF_PWT).unwrap();
                }
            })
        };
        for _ in 0..2000 {
            match act.pin(&t, 8, BACKEND, false, 4, PinKind::Map) {
                Ok(_) => act.unpin(&t, 8, false),
                Err(s) => assert_eq!(s, GrantStatus::GENERAL_ERROR),
            }
        }
        stop.store(true, Ordering::Relaxed);
        flipper.join().unwrap();
        assert_eq!(act.pins(8), 0);
        assert_eq!(flags(&t, 8) & (GTF_READING | GTF_WRITING), 0);
    }
}
