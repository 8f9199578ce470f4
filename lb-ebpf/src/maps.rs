//! Map definitions. Names and value types come from `lb-common` so userspace
//! opens exactly these; see docs/architecture.md for who writes each one.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use lb_common::{
    Config, Counter, MAX_REALS, MAX_VIPS, RING_ENTRIES, RealDef, VipAddrKey, VipKey, VipMeta, stat,
};

/// Virtual services: (address, port, protocol) → VIP metadata.
#[map(name = "XLB_VIPS")]
pub static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(MAX_VIPS, 0);

/// Addresses that carry at least one VIP (value: number of VIPs on it). Lets the
/// program tell "not ours" from "ours but unusable" (fragments, broken L4).
#[map(name = "XLB_VIP_ADDRS")]
pub static VIP_ADDRS: HashMap<VipAddrKey, u32> = HashMap::with_max_entries(MAX_VIPS, 0);

/// Maglev lookup tables: ring `r` occupies slots `[r * RING_SIZE_MAX, (r + 1) * RING_SIZE_MAX)`
/// of a flat slot space packed two slots per entry. Memory-mappable so the
/// daemon writes a whole table with one copy.
#[map(name = "XLB_RINGS")]
pub static RINGS: Array<[u32; 2]> = Array::with_max_entries(RING_ENTRIES, BPF_F_MMAPABLE);

/// Real servers by real id.
#[map(name = "XLB_REALS")]
pub static REALS: Array<RealDef> = Array::with_max_entries(MAX_REALS, 0);

/// Interface settings, one element.
#[map(name = "XLB_CONFIG")]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Verdict counters, indexed by `lb_common::stat`.
#[map(name = "XLB_STATS")]
pub static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(stat::CAPACITY, 0);

/// Per-VIP counters, indexed by VIP id.
#[map(name = "XLB_VIP_STATS")]
pub static VIP_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

/// Per-real counters, indexed by real id.
#[map(name = "XLB_REAL_STATS")]
pub static REAL_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_REALS, 0);
