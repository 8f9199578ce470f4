//! Picking a real server: the VIP's live Maglev ring indexed by the flow hash.

use lb_common::{REAL_NONE, RING_SIZE_MAX, RealDef, VipMeta};

use crate::maps::{REALS, RINGS};

/// The real id the VIP's table gives `hash`, or `None` when it gives none.
#[inline(always)]
pub fn pick(meta: &VipMeta, hash: u32) -> Option<u32> {
    // Bound the table size so neither the verifier nor a corrupt map can index
    // outside the VIP's ring: ring_size 0 means "no table".
    let size = meta.ring_size;
    if size == 0 || size > RING_SIZE_MAX {
        return None;
    }
    let slot = meta.ring_off.checked_add(hash % size)?;
    // Two slots per map entry (see lb_common::RING_ENTRIES); a slot past the
    // pool is refused by the lookup itself.
    let pair = RINGS.get(slot / 2)?;
    let real_id = pair[(slot & 1) as usize];
    if real_id == REAL_NONE {
        return None;
    }
    Some(real_id)
}

/// Real `id` if it is in use (family 0 marks a slot userspace cleared).
#[inline(always)]
pub fn real(id: u32) -> Option<&'static RealDef> {
    REALS.get(id).filter(|r| r.family != 0)
}
