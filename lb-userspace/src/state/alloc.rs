//! Allocation of the maps' shared resources: ranges of the ring pool, VIP ids
//! and real-slot ids.
//!
//! The reconcile step allocates only resources that the model before the
//! change does not use, and frees what it replaces only after the whole change
//! succeeded: a rollback never finds a resource of the old state handed to a
//! new owner.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{MAX_REALS, MAX_VIPS, RING_POOL};
use serde::{Deserialize, Serialize};

/// First-fit allocator of ranges in the ring pool.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingPool {
    /// Used ranges: start → length.
    used: BTreeMap<u32, u32>,
}

impl RingPool {
    /// A free range of `len` slots, now marked used.
    pub fn alloc(&mut self, len: u32) -> Option<u32> {
        let mut start = 0u32;
        for (&s, &l) in &self.used {
            if s - start >= len {
                break;
            }
            start = s + l;
        }
        if u64::from(start) + u64::from(len) > u64::from(RING_POOL) {
            return None;
        }
        self.used.insert(start, len);
        Some(start)
    }

    /// Marks `[start, start + len)` used (a range the kernel still reads that
    /// the model does not know). False when it overlaps a used range.
    pub fn reserve(&mut self, start: u32, len: u32) -> bool {
        let end = u64::from(start) + u64::from(len);
        if end > u64::from(RING_POOL) {
            return false;
        }
        let overlaps = self
            .used
            .iter()
            .any(|(&s, &l)| u64::from(s) < end && u64::from(start) < u64::from(s) + u64::from(l));
        if overlaps {
            return false;
        }
        self.used.insert(start, len);
        true
    }

    /// Frees the range starting at `start`.
    pub fn free(&mut self, start: u32) {
        self.used.remove(&start);
    }

    /// Lengths of the used ranges, by start.
    pub fn used(&self) -> &BTreeMap<u32, u32> {
        &self.used
    }
}

/// The lowest VIP id not in `used`.
pub fn vip_id(used: &BTreeSet<u32>) -> Option<u32> {
    (0..MAX_VIPS).find(|id| !used.contains(id))
}

/// A real-slot id not in `used`, searched round robin from `next` so that a
/// freed id is reused as late as possible. Id 0 is `REAL_NONE`.
pub fn real_id(used: &BTreeSet<u32>, next: &mut u32) -> Option<u32> {
    let start = (*next).clamp(1, MAX_REALS - 1);
    let id = (start..MAX_REALS)
        .chain(1..start)
        .find(|id| !used.contains(id))?;
    *next = id + 1;
    Some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_pool_is_first_fit_and_refuses_overflow() {
        let mut pool = RingPool::default();
        let a = pool.alloc(100).expect("a");
        let b = pool.alloc(100).expect("b");
        assert_eq!((a, b), (0, 100));
        pool.free(a);
        assert_eq!(pool.alloc(50), Some(0), "reuses the hole");
        assert_eq!(
            pool.alloc(60),
            Some(200),
            "too big for the rest of the hole"
        );
        assert_eq!(pool.alloc(RING_POOL), None);
    }

    #[test]
    fn reserved_ranges_are_never_handed_out() {
        let mut pool = RingPool::default();
        assert!(pool.reserve(10, 20));
        assert!(!pool.reserve(25, 10), "overlap refused");
        assert_eq!(pool.alloc(10), Some(0));
        assert_eq!(pool.alloc(5), Some(30), "skips the reserved range");
    }

    #[test]
    fn real_ids_go_round_robin_and_skip_zero() {
        let mut next = 0;
        let mut used = BTreeSet::new();
        let a = real_id(&used, &mut next).expect("id");
        used.insert(a);
        let b = real_id(&used, &mut next).expect("id");
        assert_eq!((a, b), (1, 2));
        used.remove(&a);
        // The freed id 1 is not reused while later ids are free.
        assert_eq!(real_id(&used, &mut next), Some(3));
    }
}
