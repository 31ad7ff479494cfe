//! The shadow table: what each request id in flight on a ring stands for.
//!
//! Linux keeps `shadow[BLK_RING_SIZE]` per ring and threads a free list through the unused
//! entries' `id` fields (`get_id_from_freelist` / `add_id_to_freelist`). The id the
//! backend echoes is the slot index, so a response names its shadow entry directly; the
//! backend is untrusted, so an id outside the table or naming an idle slot is reported as
//! an error instead of being believed.

/// Why a response's id could not be matched to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ShadowError {
    /// An id we never handed out (outside the table).
    #[error("response id {0} is outside the shadow table")]
    UnknownId(u64),
    /// An id whose request is not in flight: a duplicate or invented completion.
    #[error("response id {0} names no request in flight (duplicate completion?)")]
    NotInFlight(u64),
}

#[derive(Debug)]
enum Slot<T> {
    Free { next: Option<usize> },
    InFlight(T),
}

/// A fixed-size table of in-flight requests with an O(1) free list.
#[derive(Debug)]
pub struct ShadowTable<T> {
    slots: Vec<Slot<T>>,
    free_head: Option<usize>,
    in_flight: usize,
}

impl<T> ShadowTable<T> {
    /// A table with `size` ids (the ring's slot count: never more requests than slots).
    pub fn new(size: usize) -> Self {
        let slots = (0..size)
            .map(|i| Slot::Free {
                next: (i + 1 < size).then_some(i + 1),
            })
            .collect();
        Self {
            slots,
            free_head: (size > 0).then_some(0),
            in_flight: 0,
        }
    }

    /// Number of ids.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Free ids.
    pub fn free(&self) -> usize {
        self.slots.len() - self.in_flight
    }

    /// Records `value` under a free id, or gives it back when the table is full.
    pub fn insert(&mut self, value: T) -> Result<u64, T> {
        let Some(id) = self.free_head else {
            return Err(value);
        };
        let Slot::Free { next } = self.slots[id] else {
            unreachable!("free list points at an in-flight slot");
        };
        self.free_head = next;
        self.slots[id] = Slot::InFlight(value);
        self.in_flight += 1;
        Ok(id as u64)
    }

    /// The request in flight under `id`.
    pub fn get(&self, id: u64) -> Result<&T, ShadowError> {
        match self.slots.get(usize::try_from(id).unwrap_or(usize::MAX)) {
            None => Err(ShadowError::UnknownId(id)),
            Some(Slot::Free { .. }) => Err(ShadowError::NotInFlight(id)),
            Some(Slot::InFlight(v)) => Ok(v),
        }
    }

    /// The request in flight under `id`, mutably.
    pub fn get_mut(&mut self, id: u64) -> Result<&mut T, ShadowError> {
        match self
            .slots
            .get_mut(usize::try_from(id).unwrap_or(usize::MAX))
        {
            None => Err(ShadowError::UnknownId(id)),
            Some(Slot::Free { .. }) => Err(ShadowError::NotInFlight(id)),
            Some(Slot::InFlight(v)) => Ok(v),
        }
    }

    /// Ends the request under `id` and frees the id.
    pub fn remove(&mut self, id: u64) -> Result<T, ShadowError> {
        self.get(id)?;
        let idx = id as usize;
        let slot = std::mem::replace(
            &mut self.slots[idx],
            Slot::Free {
                next: self.free_head,
            },
        );
        self.free_head = Some(idx);
        self.in_flight -= 1;
        match slot {
            Slot::InFlight(v) => Ok(v),
            Slot::Free { .. } => unreachable!("checked in flight above"),
        }
    }

    /// Removes every request in flight (teardown), returning them with their ids.
    pub fn drain(&mut self) -> Vec<(u64, T)> {
        let ids: Vec<u64> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, Slot::InFlight(_)))
            .map(|(i, _)| i as u64)
            .collect();
        ids.into_iter()
            .map(|id| (id, self.remove(id).expect("listed as in flight")))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn ids_are_unique_until_freed() {
        let mut t = ShadowTable::new(4);
        let ids: Vec<u64> = (0..4).map(|i| t.insert(i).unwrap()).collect();
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 4);
        assert!(ids.iter().all(|&id| id < 4));
        assert_eq!(t.insert(99), Err(99), "full table gives the value back");
        assert_eq!(t.in_flight(), 4);
        assert_eq!(t.remove(ids[2]), Ok(2));
        assert_eq!(t.free(), 1);
        // LIFO reuse, as Linux's free list.
        assert_eq!(t.insert(7), Ok(ids[2]));
    }

    #[test]
    fn hostile_ids_are_rejected() {
        let mut t = ShadowTable::new(2);
        let id = t.insert("a").unwrap();
        assert_eq!(t.remove(5), Err(ShadowError::UnknownId(5)));
        assert_eq!(t.remove(u64::MAX), Err(ShadowError::UnknownId(u64::MAX)));
        let other = 1 - id;
        assert_eq!(t.remove(other), Err(ShadowError::NotInFlight(other)));
        assert_eq!(t.remove(id), Ok("a"));
        assert_eq!(
            t.remove(id),
            Err(ShadowError::NotInFlight(id)),
            "duplicate completion"
        );
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn drain_returns_everything_in_flight() {
        let mut t = ShadowTable::new(8);
        for i in 0..5 {
            t.insert(i).unwrap();
        }
        t.remove(1).unwrap();
        let mut drained: Vec<_> = t.drain().into_iter().map(|(_, v)| v).collect();
        drained.sort();
        assert_eq!(drained, vec![0, 2, 3, 4]);
        assert_eq!(t.free(), 8);
        // Every id is usable again.
        for i in 0..8 {
            t.insert(i).unwrap();
        }
    }

    #[test]
    fn zero_sized_table_is_always_full() {
        let mut t = ShadowTable::<u8>::new(0);
        assert_eq!(t.insert(1), Err(1));
        assert_eq!(t.remove(0), Err(ShadowError::UnknownId(0)));
    }
}
