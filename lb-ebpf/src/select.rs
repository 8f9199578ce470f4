//! Picking a real server: the flow hash indexes the VIP's live Maglev ring.

use lb_common::{
    REAL_NONE, RING_SIZE_MAX, RealDef, VIP_F_HASH_SRC_ONLY, VipMeta, flow_hash, src_hash,
};

use crate::maps::{REALS, RINGS};

/// The flow whose real is being chosen, addresses and ports as wire bytes.
pub struct Flow {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Source port in the high 16 bits, destination port in the low 16 (big-endian view).
    pub ports: u32,
    pub proto: u8,
}

/// The real chosen for `flow`, with its id, or `None` when the VIP has no usable real.
#[inline(always)]
pub fn pick(meta: &VipMeta, flow: &Flow) -> Option<(u32, &'static RealDef)> {
    let hash = if meta.flags & VIP_F_HASH_SRC_ONLY != 0 {
        src_hash(&flow.src)
    } else {
        flow_hash(&flow.src, &flow.dst, flow.ports, flow.proto)
    };
    // Bound the table size so the verifier (and a corrupt map) cannot index out of
    // the VIP's ring: ring_size 0 means "no table".
    let size = meta.ring_size;
    if size == 0 || size > RING_SIZE_MAX {
        return None;
    }
    let slot = meta.ring_id.checked_mul(RING_SIZE_MAX)? + hash % size;
    // Two slots per map entry (see lb_common::RING_ENTRIES).
    let pair = RINGS.get(slot / 2)?;
    let real_id = pair[(slot & 1) as usize];
    if real_id == REAL_NONE {
        return None;
    }
    let real = REALS.get(real_id)?;
    // family 0 marks a slot userspace has not filled (or is removing).
    if real.family == 0 {
        return None;
    }
    Some((real_id, real))
}
