//! Per-CPU counters and rate windows. Plain (non-atomic) adds are safe: each
//! CPU owns its slot.

use aya_ebpf::maps::PerCpuArray;
use lb_common::Counter;

use crate::{
    conntrack::now,
    maps::{FLOOD, REAL_STATS, STATS, VIP_STATS},
};

#[inline(always)]
fn bump(map: &PerCpuArray<Counter>, index: u32, bytes: u64, new_flow: bool) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: the pointer is this CPU's element of a per-CPU array.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            if new_flow {
                (*c).flows += 1;
            }
        }
    }
}

/// Counts a verdict (`lb_common::stat` index below `VERDICTS`).
#[inline(always)]
pub fn verdict(stat: u32, bytes: u64) {
    bump(&STATS, stat, bytes, false);
}

/// Counts an event (`lb_common::stat` index from `VERDICTS` on).
#[inline(always)]
pub fn event(stat: u32) {
    bump(&STATS, stat, 0, false);
}

/// Counts a packet forwarded for a VIP to a real; `new_flow` when the packet
/// created the flow's conntrack entry.
#[inline(always)]
pub fn forwarded(vip_id: u32, real_id: u32, bytes: u64, new_flow: bool) {
    bump(&VIP_STATS, vip_id, bytes, new_flow);
    bump(&REAL_STATS, real_id, bytes, new_flow);
}

/// A per-CPU one-second window (`lb_common::WINDOW_*`): may this CPU do one
/// more of its thing this second? `limit` 0 means no limit.
#[inline(always)]
pub fn admit(window: u32, limit: u32) -> bool {
    if limit == 0 {
        return true;
    }
    let Some(w) = FLOOD.get_ptr_mut(window) else {
        return true;
    };
    // SAFETY: this CPU's element of a per-CPU array.
    let w = unsafe { &mut *w };
    let t = now();
    if t.saturating_sub(w.start_ns) >= 1_000_000_000 {
        w.start_ns = t;
        w.count = 0;
    }
    if w.count >= u64::from(limit) {
        return false;
    }
    w.count += 1;
    true
}
