//! Map definitions. Names and value types come from `lb-common` so userspace
//! opens exactly these; see docs/architecture.md for who writes each one.

use core::{mem::transmute, ptr::read_volatile};

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use lb_common::{
    AddrKey, CT_WAYS, Config, Counter, CtBucket, CtParams, FLOW_EVENTS_BYTES, FLOWS_DEFAULT,
    FloodWindow, FlowKey, FlowState, MAX_REALS, MAX_VIPS, RING_ENTRIES, RealDef, VIP_FILTER_WORDS,
    VIP_SLOTS_LEN, VipKey, VipMeta, VipSlot, WINDOWS, ct_buckets, stat, vip_filter_slot_words,
    vip_slot_tag,
};

use crate::parse::{Addr, Aligned};

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

/// The VIP holding each VIP filter slot, with its key and meta
/// (`lb_common::VipSlot`, which says how the daemon writes an entry and how
/// [`crate::balancer`] reads one): a packet for that VIP finds its meta with
/// one array read instead of the [`VIPS`] hash lookup. Memory-mappable: the
/// daemon writes each entry word by word.
#[map(name = "XLB_VIP_SLOTS")]
pub static VIP_SLOTS: Array<VipSlot> = Array::with_max_entries(VIP_SLOTS_LEN, BPF_F_MMAPABLE);

/// The meta of the VIP `key`: from its slot of [`VIP_SLOTS`] when the slot
/// holds that key and no write crossed the read (`lb_common::VipSlot`),
/// else from [`VIPS`], which holds every VIP. `None`: not a VIP.
#[inline(always)]
pub fn vip_meta(key: &Aligned<VipKey>) -> Option<Aligned<VipMeta>> {
    let k = &key.0;
    // SAFETY: the address is the key's first 16 bytes, 8-aligned in the holder.
    let [hi, lo] = unsafe { (key as *const Aligned<VipKey>).cast::<[u64; 2]>().read() };
    let tag = vip_slot_tag(k.port_be, k.proto, k.family);
    if let Some(entry) = VIP_SLOTS.get_ptr(vip_filter_slot_words([hi, lo], k.port_be, k.proto)) {
        let w = entry.cast::<u64>();
        // SAFETY: the five words of a live array element, 8-aligned (the
        // values are 40 bytes apart from a page boundary). Volatile, so that
        // the tag word is read before and after the others, not once.
        unsafe {
            let before = read_volatile(w.add(2));
            if before as u32 == tag && read_volatile(w) == hi && read_volatile(w.add(1)) == lo {
                let meta = [read_volatile(w.add(3)), read_volatile(w.add(4))];
                if read_volatile(w.add(2)) == before {
                    return Some(transmute::<[u64; 2], Aligned<VipMeta>>(meta));
                }
            }
        }
    }
    // SAFETY: a lookup in a map only this program and the daemon touch; the
    // value is 8-aligned in its element and 16 bytes, copied as two words.
    let meta = unsafe { VIPS.get(k) }?;
    Some(unsafe {
        transmute::<[u64; 2], Aligned<VipMeta>>((meta as *const VipMeta).cast::<[u64; 2]>().read())
    })
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

/// Connection tracking: buckets of four ways, one cache line each (see
/// `lb_common::CtWay` and docs/architecture.md, "The conntrack table"). One
/// table for all CPUs (a flow moved to another queue keeps its real). The
/// daemon sizes it at load time (`lb_common::ct_buckets`); memory-mappable,
/// so that userspace counts and lists it without a system call per entry.
#[map(name = "XLB_FLOWS")]
pub static FLOWS: Array<CtBucket> =
    Array::with_max_entries(ct_buckets(FLOWS_DEFAULT), BPF_F_MMAPABLE);

/// The key of each way of [`FLOWS`] (bucket `b`, way `w` at `b * 4 + w`),
/// written with the entry; the data path never reads it.
#[map(name = "XLB_FLOW_KEYS")]
pub static FLOW_KEYS: Array<FlowKey> =
    Array::with_max_entries(ct_buckets(FLOWS_DEFAULT) * CT_WAYS, BPF_F_MMAPABLE);

/// The conntrack table's seed and size (`lb_common::CtParams`), one element,
/// written by the daemon when it creates the table.
#[map(name = "XLB_CT_PARAMS")]
pub static CT_PARAMS: Array<CtParams> = Array::with_max_entries(1, 0);

/// Flows other balancers reported (flow sync), in this node's real ids: read
/// on a conntrack miss of a non-SYN packet and promoted into [`FLOWS`]. Its
/// own LRU, so that peers' flows never evict this node's. The daemon gives it
/// `--conntrack-size` entries.
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

/// This CPU's coarse time and the jiffies it was read at
/// ([`crate::conntrack::now`]): a cache, so neither pinned nor read by
/// the daemon; a new program starts with its own, zeroed.
#[map(name = "XLB_CLOCK")]
pub static CLOCK: PerCpuArray<Clock> = PerCpuArray::with_max_entries(1, 0);

/// The element of [`CLOCK`].
#[repr(C)]
pub struct Clock {
    /// `bpf_jiffies64` when `ns` was read.
    pub jiffies: u64,
    /// `bpf_ktime_get_coarse_ns` in that tick; 0: never read.
    pub ns: u64,
}

/// Verdict and event counters, indexed by `lb_common::stat`.
#[map(name = "XLB_STATS")]
pub static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(stat::CAPACITY, 0);

/// Per-VIP counters, indexed by VIP id.
#[map(name = "XLB_VIP_STATS")]
pub static VIP_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

/// Per-real counters, indexed by real id.
#[map(name = "XLB_REAL_STATS")]
pub static REAL_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_REALS, 0);
