//! Per-CPU counters. Plain (non-atomic) adds are safe: each CPU owns its slot.

use aya_ebpf::maps::PerCpuArray;
use lb_common::Counter;

use crate::maps::{REAL_STATS, STATS, VIP_STATS};

#[inline(always)]
fn bump(map: &PerCpuArray<Counter>, index: u32, bytes: u64) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: the pointer is this CPU's element of a per-CPU array.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

/// Counts a verdict (`lb_common::stat` index).
#[inline(always)]
pub fn verdict(stat: u32, bytes: u64) {
    bump(&STATS, stat, bytes);
}

/// Counts a packet forwarded for a VIP to a real.
#[inline(always)]
pub fn forwarded(vip_id: u32, real_id: u32, bytes: u64) {
    bump(&VIP_STATS, vip_id, bytes);
    bump(&REAL_STATS, real_id, bytes);
}
