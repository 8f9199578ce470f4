//! Map definitions. Names and value types come from `lb-common` so userspace
//! opens exactly these; see docs/architecture.md for who writes each one.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    AddrKey, Config, Counter, FLOW_EVENTS_BYTES, FLOWS_DEFAULT, FloodWindow, FlowKey, FlowState,
    MAX_REALS, MAX_VIPS, RING_ENTRIES, RealDef, VIP_FILTER_WORDS, VipKey, VipMeta, WINDOWS, stat,
    vip_filter_slot_words,
};

use crate::parse::Addr;

/// Virtual services: (address, port, protocol) → VIP metadata.
#[map(name = "XLB_VIPS")]
pub static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(MAX_VIPS, 0);

/// Addresses that carry at least one VIP (value: number of VIPs on it). Lets the
/// program tell "not ours" from "ours but unusable" (fragments, broken L4, ICMP).
#[map(name = "XLB_VIP_ADDRS")]
pub static VIP_ADDRS: HashMap<AddrKey, u32> = HashMap::with_max_entries(MAX_VIPS, 0);

/// A bitmap in front of [`VIPS`] and [`VIP_ADDRS`] (`lb_common::vip_filter_slot`):
/// the daemon keeps it a superset of their keys. An array, so the verifier
/// inlines its lookup: a packet not for a VIP is told so without a hash
/// lookup.
#[map(name = "XLB_VIP_FILTER")]
pub static VIP_FILTER: Array<u64> = Array::with_max_entries(VIP_FILTER_WORDS, 0);

/// Whether the VIP filter may hold this key (`port_be` and `proto` 0 for a
/// VIP address): false means it is in neither VIP map.
#[inline(always)]
pub fn maybe_vip(addr: &Addr, port_be: u16, proto: u8) -> bool {
    // The address as two words (bpfel: native is little-endian), not 16 bytes.
    let slot = vip_filter_slot_words(addr.words(), port_be, proto);
    match VIP_FILTER.get(slot >> 6) {
        Some(word) => word & (1 << (slot & 63)) != 0,
        // Cannot happen (the slot is in range): the maps decide.
        None => true,
    }
}

/// The ring pool: every VIP's Maglev tables, at the offsets `VipMeta.ring_off`
/// names, packed two slots per entry. Memory-mappable so the daemon writes a
/// whole table with one copy.
#[map(name = "XLB_RINGS")]
pub static RINGS: Array<[u32; 2]> = Array::with_max_entries(RING_ENTRIES, BPF_F_MMAPABLE);

/// Real servers by real id.
#[map(name = "XLB_REALS")]
pub static REALS: Array<RealDef> = Array::with_max_entries(MAX_REALS, 0);

/// Interface and data-path settings, one element.
#[map(name = "XLB_CONFIG")]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Connection tracking: flow → real. One table for all CPUs (a flow moved to
/// another queue keeps its real). The daemon sizes it at load time.
///
/// One LRU shared by all CPUs, not per-CPU LRU lists (`BPF_F_NO_COMMON_LRU`):
/// per-CPU lists split the entries evenly over every *possible* CPU, so a
/// host with 128 possible and 8 online CPUs would hold 1/128 of the table per
/// receive queue. With the common LRU the table holds `--conntrack-size`
/// flows however they spread over queues. Its global lock is taken only when a
/// CPU's local free list (refilled in batches) runs dry, so a tracked flow's
/// packets never take it (measurements in docs/architecture.md).
#[map(name = "XLB_FLOWS")]
pub static FLOWS: LruHashMap<FlowKey, FlowState> = LruHashMap::with_max_entries(FLOWS_DEFAULT, 0);

/// Flows other balancers reported (flow sync), in this node's real ids: read
/// on a conntrack miss of a non-SYN packet and promoted into [`FLOWS`]. Its
/// own LRU, so that peers' flows never evict this node's. Sized like [`FLOWS`].
#[map(name = "XLB_PEER_FLOWS")]
pub static PEER_FLOWS: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(FLOWS_DEFAULT, 0);

/// Confirmed and ended flows for the daemon's flow sync
/// (`lb_common::FlowEvent`), when `Config::sync` is set.
#[map(name = "XLB_FLOW_EVENTS")]
pub static FLOW_EVENTS: RingBuf = RingBuf::with_byte_size(FLOW_EVENTS_BYTES, 0);

/// Per-CPU one-second rate windows: the flood guard's new flows and the ICMP
/// too-big replies (indices `lb_common::WINDOW_*`).
#[map(name = "XLB_FLOOD")]
pub static FLOOD: PerCpuArray<FloodWindow> = PerCpuArray::with_max_entries(WINDOWS, 0);

/// Verdict and event counters, indexed by `lb_common::stat`.
#[map(name = "XLB_STATS")]
pub static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(stat::CAPACITY, 0);

/// Per-VIP counters, indexed by VIP id.
#[map(name = "XLB_VIP_STATS")]
pub static VIP_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

/// Per-real counters, indexed by real id.
#[map(name = "XLB_REAL_STATS")]
pub static REAL_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_REALS, 0);
