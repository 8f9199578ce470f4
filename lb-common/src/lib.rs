//! Types shared by the xlb XDP programs (`lb-ebpf`) and the userspace daemon
//! (`lb-userspace`).
//!
//! Everything that crosses the kernel/userspace boundary lives here: map keys and
//! values (`#[repr(C)]`, explicit padding, size asserts), map names, capacities,
//! counter indices and the flow hash both sides must agree on.
//!
//! # Byte order
//!
//! Addresses are stored as the bytes seen on the wire (network order), IPv4 in
//! the first 4 bytes of a 16-byte array with the rest zero. Ports are stored as
//! `u16` holding the two wire bytes (`u16::from_ne_bytes(wire)`), named `*_be`;
//! userspace converts with `u16::to_be()`. Everything else is host order.
#![no_std]

use core::mem::size_of;

/// Map names, used by the programs' `#[map(name = ...)]` and by userspace lookups.
pub mod map_names {
    /// `HashMap<VipKey, VipMeta>`: which (address, port, protocol) are virtual services.
    pub const VIPS: &str = "XLB_VIPS";
    /// `HashMap<AddrKey, u32>`: addresses carrying VIPs → how many VIPs.
    pub const VIP_ADDRS: &str = "XLB_VIP_ADDRS";
    /// `Array<[u32; 2]>`: the ring pool holding every VIP's Maglev tables,
    /// `RING_POOL` real-id slots packed two per entry (see [`super::RING_ENTRIES`]).
    pub const RINGS: &str = "XLB_RINGS";
    /// `Array<RealDef>`: real servers by real id (id 0 is never used).
    pub const REALS: &str = "XLB_REALS";
    /// `Array<Config>` with one element: settings of the attached interface.
    pub const CONFIG: &str = "XLB_CONFIG";
    /// `Array<CtBucket>` (memory-mappable): connection tracking, see [`super::CtWay`].
    pub const FLOWS: &str = "XLB_FLOWS";
    /// `Array<FlowKey>` (memory-mappable), one per way of [`FLOWS`] (bucket
    /// `b`, way `w` at `b * CT_WAYS + w`): the tracked flows' keys, for
    /// flow sync's full copies to peers, recorded at a flow's first hit.
    pub const FLOW_KEYS: &str = "XLB_FLOW_KEYS";
    /// `Array<CtParams>`, one element: the conntrack table's seed and size.
    pub const CT_PARAMS: &str = "XLB_CT_PARAMS";
    /// `PerCpuArray<FloodWindow>`: per-CPU rate windows, indexed by
    /// [`super::WINDOW_NEW_FLOWS`] (flood guard) and [`super::WINDOW_ICMP_TOO_BIG`].
    pub const FLOOD: &str = "XLB_FLOOD";
    /// `PerCpuArray<Counter>`: verdict and event counters, see [`super::stat`].
    pub const STATS: &str = "XLB_STATS";
    /// `PerCpuArray<Counter>`: packets, bytes and new flows per VIP id.
    pub const VIP_STATS: &str = "XLB_VIP_STATS";
    /// `PerCpuArray<Counter>`: packets, bytes and new flows per real id.
    pub const REAL_STATS: &str = "XLB_REAL_STATS";
    /// `LruHashMap<FlowKey, FlowState>` of `--conntrack-size` entries: flows other
    /// balancers reported (flow sync), written by the daemon in this node's
    /// real ids; read on a conntrack miss of a non-SYN packet and promoted.
    pub const PEER_FLOWS: &str = "XLB_PEER_FLOWS";
    /// `RingBuf` of [`super::FlowEvent`]s: confirmed and ended flows, for the
    /// daemon's flow sync ([`super::Config::sync`] turns reporting on).
    pub const FLOW_EVENTS: &str = "XLB_FLOW_EVENTS";
    /// `Array<u64>` of [`super::VIP_FILTER_WORDS`] words: a bitmap in front of
    /// [`VIPS`] and [`VIP_ADDRS`], bit [`super::vip_filter_slot`] set for every
    /// service key and VIP address (a superset: other keys may share a bit).
    /// A packet whose bit is clear is not for a VIP, without a hash lookup.
    pub const VIP_FILTER: &str = "XLB_VIP_FILTER";
    /// `Array<VipSlot>` of [`super::VIP_SLOTS_LEN`] entries, memory-mappable:
    /// the VIP that holds each VIP filter slot, its key and its meta, so that
    /// a packet for a VIP finds its meta with one array read. Keys that share
    /// a slot with the holder are found in [`VIPS`]; see [`super::VipSlot`].
    pub const VIP_SLOTS: &str = "XLB_VIP_SLOTS";
    /// Decap program: `PerCpuArray<Counter>` indexed by [`super::decap_stat`].
    pub const DECAP_STATS: &str = "XLB_DECAP_STATS";
}

/// Program names (the Rust function names of the `#[xdp]` entry points).
pub mod prog_names {
    /// The balancer.
    pub const BALANCER: &str = "xlb";
    /// A program that passes every packet. Test topologies attach it to veth peers
    /// that must receive XDP_TX frames (see docs/architecture.md).
    pub const PASS: &str = "xlb_pass";
    /// The real-server decapsulator (in the separate `lb-decap` object).
    pub const DECAP: &str = "xlb_decap";
}

/// Most virtual services the maps hold.
pub const MAX_VIPS: u32 = 1024;
/// Most real servers (over all VIPs; a real serving several VIPs counts once).
pub const MAX_REALS: u32 = 16384;
/// Largest Maglev table. Every table size must be a prime not above this.
pub const RING_SIZE_MAX: u32 = 655_373;
/// Default Maglev table size (prime, as the Maglev paper requires).
pub const RING_SIZE_DEFAULT: u32 = 65537;
/// Real-id slots in the ring pool (64 MiB). Each VIP takes two ranges of its
/// table size from it (the live table and the spare a new table is written
/// into), so it holds e.g. 128 VIPs at the default size or 1,000 at 8,191.
pub const RING_POOL: u32 = 1 << 24;
/// Entries of the ring map. The kernel stores array values in 8-byte strides,
/// so ring slots are packed two per entry (`[u32; 2]`): slot `i` of the pool
/// is element `i % 2` of entry `i / 2`, and the memory-mapped map is then
/// exactly a flat `u32` array.
pub const RING_ENTRIES: u32 = RING_POOL / 2;
const _: () = assert!(RING_POOL.is_multiple_of(2));
/// Default size of the connection-tracking table (flows, all CPUs together).
/// 224 bytes of kernel memory each (see [`ct_buckets`]).
pub const FLOWS_DEFAULT: u32 = 1 << 20;

/// Buckets of a conntrack table sized for `flows` flows: `flows` rounded up
/// to a power of two (at least 2). The table then has four ways per flow: at
/// that load a bucket of four is rarely full (about 0.06% of flows would be
/// evicted before the table holds `flows`, against a fifth with one way per
/// flow and 4% with two), so that a flood the flood guard holds below the
/// table's size does not push established flows out. Each flow costs four
/// ways (16 bytes each) and four keys (40 bytes each) of kernel memory.
pub const fn ct_buckets(flows: u32) -> u32 {
    let flows = if flows < 2 { 2 } else { flows };
    let rounded = match flows.checked_next_power_of_two() {
        Some(n) => n,
        None => 1 << 31,
    };
    // At most 2^29 buckets: their keys (four each) still count in a u32.
    if rounded > 1 << 29 { 1 << 29 } else { rounded }
}
/// Most tunnel endpoint addresses of each family the decapsulator holds
/// ([`DecapSet`]).
pub const MAX_DECAP_ADDRS: usize = 64;
/// Most allowed tunnel source prefixes of each family the decapsulator holds
/// ([`DecapSet`]).
pub const MAX_DECAP_SRCS: usize = 64;

/// Bits of the VIP filter ([`map_names::VIP_FILTER`]), as a power of two.
pub const VIP_FILTER_BITS_LOG2: u32 = 16;
/// Words (`u64`) of the VIP filter: 65,536 bits, 8 KiB.
pub const VIP_FILTER_WORDS: u32 = 1 << (VIP_FILTER_BITS_LOG2 - 6);

/// The VIP filter's bit for a service key (`port_be` and `proto` as in
/// [`VipKey`]) or, with `port_be` and `proto` 0, for a VIP address. Both
/// sides compute it: the daemon sets the bit before the key enters its map
/// and clears it only after the last key on the bit left, so the data path
/// may pass a packet whose bit is clear without looking the key up.
/// A few ALU operations (no loop, no rotation, which BPF lacks): the
/// address words, port and protocol folded by XOR, then a multiplicative
/// (Fibonacci) hash whose top bits pick the slot.
#[inline(always)]
pub const fn vip_filter_slot(addr: &[u8; 16], port_be: u16, proto: u8) -> u32 {
    vip_filter_slot_words([half_le(addr, 0), half_le(addr, 8)], port_be, proto)
}

/// [`vip_filter_slot`] of an address given as its two halves, each read as a
/// little-endian `u64` (what the BPF data path holds in registers): the four
/// 4-byte words it folds are the halves' low and high words. The data path
/// calls this one, so that it never takes the address apart byte by byte.
#[inline(always)]
pub const fn vip_filter_slot_words(addr: [u64; 2], port_be: u16, proto: u8) -> u32 {
    let folded = addr[0] ^ addr[1];
    let x = (folded as u32) ^ ((folded >> 32) as u32) ^ ((port_be as u32) << 16 | proto as u32);
    x.wrapping_mul(0x9e37_79b1) >> (32 - VIP_FILTER_BITS_LOG2)
}

#[inline(always)]
const fn half_le(a: &[u8; 16], i: usize) -> u64 {
    let mut b = [0u8; 8];
    let mut j = 0;
    while j < 8 {
        b[j] = a[i + j];
        j += 1;
    }
    u64::from_le_bytes(b)
}

/// Index of the flood guard's window in the `FLOOD` map.
pub const WINDOW_NEW_FLOWS: u32 = 0;
/// Index of the ICMP too-big reply limiter's window in the `FLOOD` map.
pub const WINDOW_ICMP_TOO_BIG: u32 = 1;
/// Entries of the `FLOOD` map.
pub const WINDOWS: u32 = 2;

/// Default ICMP too-big replies a CPU may send per second ([`Config::icmp_too_big_limit`]).
pub const ICMP_TOO_BIG_LIMIT_DEFAULT: u32 = 100;
/// How often a TCP flow's `last_seen_ns` is refreshed at most: a packet
/// writes the stamp only when it is older than this (most packets write nothing).
pub const TCP_STAMP_GRAIN_NS: u64 = 1_000_000_000;

/// Real id that means "no real": a ring slot holding it drops the packet.
pub const REAL_NONE: u32 = 0;

/// IP protocol numbers.
pub const PROTO_ICMP: u8 = 1;
/// IP-in-IP (RFC 2003); also the IPv6 next header of IPv4-in-IPv6.
pub const PROTO_IPIP: u8 = 4;
/// TCP.
pub const PROTO_TCP: u8 = 6;
/// UDP.
pub const PROTO_UDP: u8 = 17;
/// IPv6 encapsulated (IPv6-in-IPv6, RFC 2473).
pub const PROTO_IPV6: u8 = 41;
/// ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;

/// Address family tags used in keys and values.
pub const FAMILY_V4: u8 = 4;
/// IPv6 family tag.
pub const FAMILY_V6: u8 = 6;

/// Key of the VIP map: one virtual service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey {
    /// Destination address, network order.
    pub addr: [u8; 16],
    /// Destination port, the two wire bytes.
    pub port_be: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
}
const _: () = assert!(size_of::<VipKey>() == 20);

/// Key of the address maps (VIP addresses, decap endpoints): one IP address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrKey {
    /// The address, network order.
    pub addr: [u8; 16],
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Explicit padding, zero.
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<AddrKey>() == 20);

/// Value of the VIP map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipMeta {
    /// Index into `VIP_STATS`; stable for the VIP's life.
    pub vip_id: u32,
    /// Offset (in slots) of the live table in the ring pool. Userspace writes
    /// a new table into the VIP's other range and flips this.
    pub ring_off: u32,
    /// Maglev table size of the live ring (prime, <= [`RING_SIZE_MAX`]).
    pub ring_size: u32,
    /// `VIP_F_*` bits.
    pub flags: u32,
}
const _: () = assert!(size_of::<VipMeta>() == 16);

/// Entries of [`map_names::VIP_SLOTS`]: one per VIP filter slot.
pub const VIP_SLOTS_LEN: u32 = 1 << VIP_FILTER_BITS_LOG2;

/// Value of [`map_names::VIP_SLOTS`]: the VIP that holds one VIP filter slot
/// ([`vip_filter_slot`] of its key). As five 8-byte words: the address's two
/// halves, the tag word (port, protocol, family, `seq`), the meta's two.
///
/// The daemon writes an entry through a memory mapping, word by word (each
/// an aligned 8-byte store): the tag word first with `family` 0 and `seq`
/// moved on (no packet's key has family 0, so the entry matches nothing),
/// then the address and the meta, then the tag word with the family and
/// `seq` moved on again. The data path reads the tag word, the address and
/// the meta, then the tag word again, and takes the meta only when the key
/// matched and the tag word did not change: a write in between moves `seq`.
/// Anything else (an empty slot, another key on it, a write in progress)
/// falls back to the [`map_names::VIPS`] lookup, which is always complete.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipSlot {
    /// The VIP's address, network order.
    pub addr: [u8; 16],
    /// [`VipKey::port_be`].
    pub port_be: u16,
    /// [`VipKey::proto`].
    pub proto: u8,
    /// [`VipKey::family`]; 0 while the entry is empty or being written.
    pub family: u8,
    /// Moved on by every write, so that a reader can tell one happened.
    pub seq: u32,
    /// The VIP's meta, as in [`map_names::VIPS`].
    pub meta: VipMeta,
}
const _: () = assert!(size_of::<VipSlot>() == 40);

/// [`VipSlot`]'s tag word without `seq` (its low 32 bits, as the data path
/// reads the little-endian word): the key's port, protocol and family.
#[inline(always)]
pub const fn vip_slot_tag(port_be: u16, proto: u8, family: u8) -> u32 {
    port_be as u32 | (proto as u32) << 16 | (family as u32) << 24
}

/// Hash only the source address (IPVS `sh`-like persistence) instead of the 5-tuple.
pub const VIP_F_HASH_SRC_ONLY: u32 = 1 << 0;
/// Forward by encapsulation (TUN) instead of a MAC rewrite (DR).
pub const VIP_F_TUNNEL: u32 = 1 << 1;

/// Value of the reals map: where to send a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RealDef {
    /// The real's address, network order: the outer destination in TUN mode.
    pub addr: [u8; 16],
    /// MAC of the next hop toward the real: the real itself when it is on the
    /// balancer's segment (always, in DR mode), else the gateway.
    pub mac: [u8; 6],
    /// [`FAMILY_V4`] or [`FAMILY_V6`]; 0 marks an unused slot.
    pub family: u8,
    /// Reserved, zero.
    pub flags: u8,
    /// Changes whenever the slot is given to another real. Conntrack entries
    /// record it ([`FlowState::generation`]): an entry whose real slot has
    /// another generation belongs to a real that is gone, and is re-hashed.
    pub generation: u32,
}
const _: () = assert!(size_of::<RealDef>() == 28);

/// The single element of the config map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// MAC of the interface the balancer is attached to: source MAC of forwarded frames.
    pub iface_mac: [u8; 6],
    /// 1: report confirmed and ended flows to [`map_names::FLOW_EVENTS`]
    /// (flow sync on); 0: report nothing.
    pub sync: u8,
    /// Explicit padding, zero.
    pub _pad: u8,
    /// Largest IP packet (bytes, L3) that may leave the interface; encapsulated
    /// packets above it are dropped and counted. 0 disables the check.
    pub mtu: u32,
    /// New flows a CPU may add to the conntrack table per second; above it new
    /// flows are still forwarded (Maglev alone) but not tracked. 0: no limit.
    pub new_flow_limit: u32,
    /// Idle time after which a tracked UDP flow is forgotten, nanoseconds.
    pub udp_idle_ns: u64,
    /// IPv4 tunnel source prefix (network order): outer source of IPv4 tunnels is
    /// `tun_src_v4 | (flow_hash & tun_host_v4)`.
    pub tun_src_v4: [u8; 4],
    /// Host-bit mask of the IPv4 tunnel source prefix, host order.
    pub tun_host_v4: u32,
    /// IPv6 tunnel source prefix; the low 32 bits are combined like IPv4's.
    pub tun_src_v6: [u8; 16],
    /// Host-bit mask applied to the low 32 bits of the IPv6 tunnel source, host order.
    pub tun_host_v6: u32,
    /// ICMP "fragmentation needed" / ICMPv6 "packet too big" replies a CPU may
    /// send per second to clients whose packet would exceed the MTU once
    /// encapsulated; above it such packets are only dropped. 0: never reply.
    pub icmp_too_big_limit: u32,
}
const _: () = assert!(size_of::<Config>() == 56);

/// Key of the conntrack map: a flow as the client sent it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source (client) address.
    pub src: [u8; 16],
    /// Destination (VIP) address.
    pub dst: [u8; 16],
    /// Source port in the high 16 bits, destination port in the low 16, of the
    /// big-endian wire bytes (as [`flow_hash`] takes them).
    pub ports: u32,
    /// IP protocol.
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Explicit padding, zero.
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FlowKey>() == 40);

/// A tracked flow: the value of the peer flow map
/// ([`map_names::PEER_FLOWS`]), and a conntrack way ([`CtWay`]) as userspace
/// reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowState {
    /// The real the flow is pinned to.
    pub real_id: u32,
    /// [`RealDef::generation`] of that real when the entry was written: the
    /// whole generation in a peer flow, its low bits ([`ct_generation`]) in
    /// a conntrack way.
    pub generation: u32,
    /// Last packet seen, CLOCK_MONOTONIC at tick resolution (the data path
    /// reads the coarse clock once per tick and CPU), refreshed only when
    /// older than the protocol's grain, so that most packets write nothing:
    /// TCP [`TCP_STAMP_GRAIN_NS`] (it tells active from idle flows to that
    /// precision), UDP [`udp_stamp_grain_ns`] (the idle timeout reads it, and
    /// allows for the grain). In a conntrack way, to [`CT_STAMP_SHIFT`]'s unit.
    pub last_seen_ns: u64,
    /// The flow's [`flow_hash`] (a peer flow carries it for the tunnel's
    /// outer source; read from a conntrack way, computed from the key).
    pub hash: u32,
    /// [`FLOW_F_REPORTED`] and [`FLOW_F_ENDED`]: what flow sync was told.
    pub flags: u32,
}
const _: () = assert!(size_of::<FlowState>() == 24);

/// [`FlowState::flags`]: the flow was reported to flow sync as confirmed (or
/// came from a peer, which already knows it).
pub const FLOW_F_REPORTED: u32 = 1;
/// [`FlowState::flags`]: the flow's end (a FIN or RST from the client) was reported.
pub const FLOW_F_ENDED: u32 = 2;

/// Ways of a conntrack bucket ([`CtBucket`]).
pub const CT_WAYS: u32 = 4;
/// The tag bits of [`CtWay::word`]; its top byte holds the way's flags.
pub const CT_TAG_MASK: u64 = (1 << 56) - 1;
/// Shift of the flags byte in [`CtWay::word`].
pub const CT_FLAGS_SHIFT: u32 = 56;
/// A way's flag: the flow is UDP (for counting: the idle timeout applies).
/// The other flag bits are [`FLOW_F_REPORTED`] and [`FLOW_F_ENDED`].
pub const CT_F_UDP: u8 = 4;
/// A way's flag: the flow had a hit (a second packet), or came from a peer
/// (which reports confirmed flows only). An insert into a full bucket evicts
/// flows without it first once they are a few seconds old
/// ([`ct_evict_rank`]), so a flood of lone SYNs or datagrams does not push
/// answered flows out.
pub const CT_F_HIT: u8 = 8;
/// A way's flag: the way is being written by one CPU (its tag part is 0, so
/// it matches no flow; no other writer takes it).
pub const CT_F_BUSY: u8 = 0x80;
/// [`CtWay::word`] of a way being written.
pub const CT_BUSY: u64 = (CT_F_BUSY as u64) << CT_FLAGS_SHIFT;
/// A way's stamp is CLOCK_MONOTONIC in units of 2^20 ns (about 1.05 ms),
/// truncated to 32 bits (it wraps after about 52 days; ages are taken modulo
/// that, see [`ct_age_ns`]).
pub const CT_STAMP_SHIFT: u32 = 20;
/// Bits of [`CtWay::pin`] that hold the real id (ids are below [`MAX_REALS`]).
pub const CT_REAL_BITS: u32 = 14;
const _: () = assert!(MAX_REALS <= 1 << CT_REAL_BITS);
/// Mask of the real id in [`CtWay::pin`].
pub const CT_REAL_MASK: u32 = (1 << CT_REAL_BITS) - 1;
/// The generation bits [`CtWay::pin`] keeps (the low 18 bits of
/// [`RealDef::generation`]).
pub const CT_GEN_MASK: u32 = (1 << (32 - CT_REAL_BITS)) - 1;

/// One way of a conntrack bucket: a tracked flow, 16 bytes.
///
/// The flow is known by its tag (56 bits of [`ct_hash`], never 0), not its
/// key: the data path reads nothing else on a hit. The key is kept apart in
/// [`map_names::FLOW_KEYS`] (written at the flow's first hit, or when a
/// peer's flow is promoted; read only by userspace). Writers (see
/// docs/architecture.md, "The conntrack table"): a new entry claims the way
/// with a compare-and-swap of `word` to [`CT_BUSY`], writes `stamp` and
/// `pin`, then `word`; a hit writes only `stamp` (4 bytes) and, through
/// another compare-and-swap, the flags (the first hit, then also the key,
/// and flow sync's reports).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtWay {
    /// Tag in the low 56 bits, flags ([`FLOW_F_REPORTED`], [`FLOW_F_ENDED`],
    /// [`CT_F_UDP`], [`CT_F_HIT`], [`CT_F_BUSY`]) in the top byte; 0: an
    /// empty way.
    pub word: u64,
    /// Last packet seen, CLOCK_MONOTONIC `>> CT_STAMP_SHIFT` (32 bits);
    /// 0: never stamped.
    pub stamp: u32,
    /// The real id (low [`CT_REAL_BITS`] bits) and the low bits of its
    /// generation ([`ct_pin`]).
    pub pin: u32,
}
const _: () = assert!(size_of::<CtWay>() == 16);

/// A bucket of the conntrack table ([`map_names::FLOWS`]): [`CT_WAYS`] ways
/// in one 64-byte cache line.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtBucket {
    /// The ways.
    pub ways: [CtWay; CT_WAYS as usize],
}
const _: () = assert!(size_of::<CtBucket>() == 64);

/// The conntrack table's hashing parameters ([`map_names::CT_PARAMS`]): made
/// with the table and kept with it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtParams {
    /// Seed of [`ct_hash`] (random per table, so that nobody outside can
    /// choose flows that share a bucket).
    pub seed: u64,
    /// 64 minus log2 of the bucket count: a flow's bucket is
    /// `ct_hash >> shift`. 0: no table yet (the data path tracks nothing).
    pub shift: u32,
    /// Explicit padding, zero.
    pub _pad: u32,
}
const _: () = assert!(size_of::<CtParams>() == 16);

/// The conntrack hash of a flow key given as its five little-endian words:
/// a multiply and xor-shift per word from the table's seed, then a final
/// mix. The bucket is the top bits, the tag ([`ct_tag`]) the low 56.
#[inline(always)]
pub const fn ct_hash(seed: u64, w: &[u64; 5]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = seed;
    let mut i = 0;
    while i < 5 {
        h = (h ^ w[i]).wrapping_mul(K);
        h ^= h >> 32;
        i += 1;
    }
    h = (h ^ (h >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^ (h >> 32)
}

/// The tag a way holds for a flow of hash `h`: never 0 (an empty way).
#[inline(always)]
pub const fn ct_tag(h: u64) -> u64 {
    (h & CT_TAG_MASK) | 1
}

/// [`CtWay::pin`] of a real id and generation.
#[inline(always)]
pub const fn ct_pin(real_id: u32, generation: u32) -> u32 {
    (real_id & CT_REAL_MASK) | ((generation & CT_GEN_MASK) << CT_REAL_BITS)
}

/// The generation bits a conntrack entry keeps of `generation`: compare an
/// entry's generation with a real's through this.
#[inline(always)]
pub const fn ct_generation(generation: u32) -> u32 {
    generation & CT_GEN_MASK
}

/// A way's stamp for CLOCK_MONOTONIC `now_ns` (never 0).
#[inline(always)]
pub const fn ct_stamp(now_ns: u64) -> u32 {
    let s = (now_ns >> CT_STAMP_SHIFT) as u32;
    if s == 0 { 1 } else { s }
}

/// How long ago `stamp` was at `now_units` (a stamp of now), in stamp units,
/// modulo the stamp's wrap. A stamp up to half the wrap ahead of now (another
/// CPU's clock a tick ahead of this one's) is no age at all.
#[inline(always)]
pub const fn ct_age_units(now_units: u32, stamp: u32) -> u32 {
    let age = now_units.wrapping_sub(stamp);
    if age > i32::MAX as u32 { 0 } else { age }
}

/// How long ago `stamp` was at `now_ns`, ns ([`ct_age_units`]).
#[inline(always)]
pub const fn ct_age_ns(now_ns: u64, stamp: u32) -> u64 {
    ct_age_units((now_ns >> CT_STAMP_SHIFT) as u32, stamp) as u64 * (1 << CT_STAMP_SHIFT)
}

/// A flow never answered stops being protected after this many stamp units
/// (2^11: about 2.1 s, longer than a handshake's round trip, shorter than a
/// SYN's first retransmission timeout plus one).
pub const CT_GRACE_UNITS: u32 = 1 << 11;
/// An answered flow silent for this many stamp units (2^16: about 69 s) is
/// idle: evicted before a young flow that was not answered yet.
pub const CT_IDLE_UNITS: u32 = 1 << 16;

/// Which way of a full bucket a new flow evicts: the one with the highest
/// rank. By class first: a flow never answered older than
/// [`CT_GRACE_UNITS`] (a flood's lone SYN), then an answered flow idle for
/// [`CT_IDLE_UNITS`], then a flow not answered yet (a handshake under way),
/// last an active answered flow; within a class the least recently stamped.
#[inline(always)]
pub const fn ct_evict_rank(flags: u8, age_units: u32) -> u64 {
    let answered = flags & CT_F_HIT != 0;
    let class: u64 = if !answered && age_units >= CT_GRACE_UNITS {
        3
    } else if answered && age_units >= CT_IDLE_UNITS {
        2
    } else if !answered {
        1
    } else {
        0
    };
    (class << 32) | age_units as u64
}

/// A flow key as the five words [`ct_hash`] takes.
#[inline(always)]
pub fn ct_words(key: &FlowKey) -> [u64; 5] {
    let mut w = [0u64; 5];
    let src = &key.src;
    let dst = &key.dst;
    w[0] = u64::from_le_bytes([
        src[0], src[1], src[2], src[3], src[4], src[5], src[6], src[7],
    ]);
    w[1] = u64::from_le_bytes([
        src[8], src[9], src[10], src[11], src[12], src[13], src[14], src[15],
    ]);
    w[2] = u64::from_le_bytes([
        dst[0], dst[1], dst[2], dst[3], dst[4], dst[5], dst[6], dst[7],
    ]);
    w[3] = u64::from_le_bytes([
        dst[8], dst[9], dst[10], dst[11], dst[12], dst[13], dst[14], dst[15],
    ]);
    w[4] = u64::from(key.ports)
        | (u64::from(key.proto) << 32)
        | (u64::from(key.family) << 40)
        | (u64::from(key._pad[0]) << 48)
        | (u64::from(key._pad[1]) << 56);
    w
}

/// [`FlowEvent::kind`]: a flow is confirmed (its second packet passed; a
/// lone SYN or datagram never is, so a flood is no sync traffic).
pub const FLOW_EVENT_NEW: u32 = 1;
/// [`FlowEvent::kind`]: the client ended the flow (FIN or RST).
pub const FLOW_EVENT_END: u32 = 2;

/// Size of the [`map_names::FLOW_EVENTS`] ring: 8,192 events of 72 bytes
/// (with the ring's 8-byte record header), a power of two pages.
pub const FLOW_EVENTS_BYTES: u32 = 1 << 19;

/// What the data path reports to flow sync.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    /// The flow.
    pub flow: FlowKey,
    /// The real it is pinned to (this node's id).
    pub real_id: u32,
    /// That real's generation as the conntrack entry keeps it
    /// ([`ct_generation`]: its low bits).
    pub generation: u32,
    /// [`FLOW_EVENT_NEW`] or [`FLOW_EVENT_END`].
    pub kind: u32,
    /// Explicit padding, zero.
    pub _pad: u32,
    /// When, `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC at tick resolution).
    pub at_ns: u64,
}
const _: () = assert!(size_of::<FlowEvent>() == 64);

/// How stale a UDP flow's `last_seen_ns` may get before a packet refreshes
/// it: an eighth of the idle timeout, at most [`TCP_STAMP_GRAIN_NS`]. A UDP
/// flow counts as idle once `now - last_seen_ns` exceeds the idle timeout plus
/// this grain, so a flow is never forgotten before it was idle for the whole
/// timeout, and at most one grain after.
#[inline(always)]
pub const fn udp_stamp_grain_ns(udp_idle_ns: u64) -> u64 {
    let eighth = udp_idle_ns / 8;
    if eighth < TCP_STAMP_GRAIN_NS {
        eighth
    } else {
        TCP_STAMP_GRAIN_NS
    }
}

/// Per-CPU state of the new-flow flood guard.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FloodWindow {
    /// Start of the current one-second window, `bpf_ktime_get_coarse_ns`.
    pub start_ns: u64,
    /// New flows tracked in the window.
    pub count: u64,
}
const _: () = assert!(size_of::<FloodWindow>() == 16);

/// A packet, byte and new-flow counter (per CPU in the maps; userspace sums).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted (the whole frame as received).
    pub bytes: u64,
    /// New flows (per-VIP and per-real counters only).
    pub flows: u64,
    /// Explicit padding, zero.
    pub _pad: u64,
}
const _: () = assert!(size_of::<Counter>() == 32);

/// Indices into the `STATS` map.
///
/// Indices below [`stat::VERDICTS`] are verdicts: every packet the balancer sees
/// bumps exactly one of them. The ones from [`stat::VERDICTS`] on are events that
/// come on top (a conntrack hit, a flood-guard bypass).
pub mod stat {
    /// Not IPv4 or IPv6 (ARP, LLDP, ...): passed to the kernel.
    pub const PASS_NOT_IP: u32 = 0;
    /// Not to a VIP (address, port or protocol unknown): passed.
    pub const PASS_NOT_VIP: u32 = 1;
    /// Headers too short or inconsistent to know whether it is ours: passed, the
    /// kernel applies its own checks and drops what is broken.
    pub const PASS_MALFORMED: u32 = 2;
    /// Forwarded to a real by MAC rewrite (DR).
    pub const TX_DR: u32 = 3;
    /// To a VIP with no real server available: dropped.
    pub const DROP_NO_REAL: u32 = 4;
    /// A first fragment (the one with the ports) to a service: dropped (ports
    /// are not in every fragment, so fragments cannot be steered consistently).
    pub const DROP_FRAGMENT: u32 = 5;
    /// A helper that cannot fail did (adjust_head, a fixed map entry): XDP_ABORTED.
    pub const ABORTED: u32 = 6;
    /// To a service (its ports were readable) or ICMP to a VIP address, but the
    /// TCP/UDP/ICMP header is cut short: dropped.
    pub const DROP_MALFORMED: u32 = 7;
    /// Forwarded to a real by encapsulation (TUN).
    pub const TX_TUN: u32 = 8;
    /// An ICMP/ICMPv6 echo request to a VIP address, answered by the balancer.
    pub const TX_ICMP_ECHO: u32 = 9;
    /// ICMP fragmentation-needed / ICMPv6 packet-too-big about a VIP flow,
    /// forwarded to that flow's real.
    pub const TX_ICMP_TOO_BIG: u32 = 10;
    /// Would exceed the MTU once encapsulated and no ICMP reply was sent (the
    /// per-CPU reply limit was reached, or replies are off): dropped.
    pub const DROP_TOO_BIG: u32 = 11;
    /// Other ICMP to a VIP address: passed to the kernel.
    pub const PASS_ICMP: u32 = 12;
    /// A VIP/real family pair the data path cannot encapsulate (IPv6 VIP to IPv4 real).
    pub const DROP_UNSUPPORTED: u32 = 13;
    /// An IP frame whose destination MAC is not the interface's (broadcast,
    /// multicast, or unicast for another station seen in promiscuous mode or
    /// flooded by a switch): passed untouched, never forwarded or answered.
    pub const PASS_NOT_OUR_MAC: u32 = 14;
    /// A fragment to a VIP address that is not a service's first fragment
    /// (later fragments carry no ports; ICMP fragments): passed to the kernel.
    pub const PASS_FRAGMENT: u32 = 15;
    /// A TUN packet whose family has no tunnel source configured (0.0.0.0 or
    /// ::): dropped rather than sent from an unspecified address.
    pub const DROP_NO_TUNNEL_SOURCE: u32 = 16;
    /// Would exceed the MTU once encapsulated: answered with ICMP
    /// "fragmentation needed" / ICMPv6 "packet too big" from the VIP.
    pub const TX_ICMP_TOO_BIG_REPLY: u32 = 17;
    /// Number of verdict counters.
    pub const VERDICTS: u32 = 18;

    /// Event: a packet of a tracked flow (conntrack hit).
    pub const CT_HIT: u32 = 24;
    /// Event: a non-SYN packet of a flow not in the conntrack table.
    pub const CT_MISS: u32 = 25;
    /// Event: a new flow entered the conntrack table (also counted in the
    /// per-VIP and per-real `flows` counters).
    pub const CT_NEW: u32 = 26;
    /// Event: a new flow was not tracked because of the flood guard.
    pub const CT_FLOOD_BYPASS: u32 = 27;
    /// Event: a tracked flow's real is gone (slot cleared or given to another
    /// real, see [`super::RealDef::generation`]); the flow was re-hashed.
    pub const CT_STALE: u32 = 28;
    /// Event: the conntrack insert failed.
    pub const CT_INSERT_FAILED: u32 = 29;
    /// Event: a non-SYN packet missed the conntrack table but another
    /// balancer had reported its flow (flow sync): forwarded to that real and
    /// promoted into the conntrack table.
    pub const CT_PEER_HIT: u32 = 30;
    /// Event: a flow sync report was lost (the ring was full).
    pub const SYNC_LOST: u32 = 31;
    /// Capacity of the map (room to add reasons without a layout change).
    pub const CAPACITY: u32 = 32;

    /// Names of the verdicts, in index order, as shown by `xlb stats` and metrics.
    pub const VERDICT_NAMES: [&str; VERDICTS as usize] = [
        "pass_not_ip",
        "pass_not_vip",
        "pass_malformed",
        "tx_dr",
        "drop_no_real",
        "drop_fragment",
        "aborted",
        "drop_malformed",
        "tx_tun",
        "tx_icmp_echo",
        "tx_icmp_too_big",
        "drop_too_big",
        "pass_icmp",
        "drop_unsupported",
        "pass_not_our_mac",
        "pass_fragment",
        "drop_no_tunnel_source",
        "tx_icmp_too_big_reply",
    ];

    const _: () = assert!(VERDICTS <= CT_HIT && SYNC_LOST < CAPACITY);

    /// Names and indices of the events.
    pub const EVENTS: [(u32, &str); 8] = [
        (CT_HIT, "conntrack_hit"),
        (CT_MISS, "conntrack_miss"),
        (CT_NEW, "conntrack_new"),
        (CT_FLOOD_BYPASS, "flood_guard_bypass"),
        (CT_STALE, "conntrack_stale"),
        (CT_INSERT_FAILED, "conntrack_insert_failed"),
        (CT_PEER_HIT, "conntrack_peer_hit"),
        (SYNC_LOST, "sync_report_lost"),
    ];
}

/// Indices into the decap program's `DECAP_STATS` map; one per packet.
pub mod decap_stat {
    /// Not a tunnel packet: passed untouched.
    pub const PASS_NOT_TUNNEL: u32 = 0;
    /// A tunnel packet for another address: passed untouched.
    pub const PASS_NOT_LOCAL: u32 = 1;
    /// Headers cut short: passed untouched.
    pub const PASS_MALFORMED: u32 = 2;
    /// IPv4-in-IPv4 decapsulated.
    pub const DECAP_IPIP: u32 = 3;
    /// IPv6-in-IPv6 decapsulated.
    pub const DECAP_IP6IP6: u32 = 4;
    /// IPv4-in-IPv6 decapsulated.
    pub const DECAP_4IN6: u32 = 5;
    /// adjust_head failed: XDP_ABORTED.
    pub const ABORTED: u32 = 6;
    /// A tunnel packet for a local address from a source outside the allowed
    /// balancer prefixes (`xlb decap --allow-src`): dropped.
    pub const DROP_NOT_ALLOWED_SRC: u32 = 7;
    /// Number of counters.
    pub const COUNT: u32 = 8;
    /// Names in index order.
    pub const NAMES: [&str; COUNT as usize] = [
        "pass_not_tunnel",
        "pass_not_local",
        "pass_malformed",
        "decap_ipip",
        "decap_ip6ip6",
        "decap_4in6",
        "aborted",
        "drop_not_allowed_src",
    ];
}

/// Symbol of the decapsulator's [`DecapSet`], a `.rodata` global of the
/// `lb-decap` object.
pub const DECAP_SET_SYMBOL: &str = "XLB_DECAP_SET";

/// What the decapsulator accepts: this host's tunnel endpoints and the
/// balancers' tunnel source prefixes. A read-only global
/// ([`DECAP_SET_SYMBOL`]) that `xlb decap` sets when it loads the program;
/// the kernel freezes it, so the program never sees it change (a new set
/// is a new program swapped in on the link).
///
/// Addresses, networks and masks are network order, each stored as the
/// native integer its bytes read as, so the program compares packet words
/// as they are. The first `*_count` entries of each array are used. A
/// source matches a prefix when `source & mask == net`; a /0 (mask 0)
/// accepts every source of its family.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecapSet {
    /// IPv4 tunnel endpoints.
    pub v4_addrs: [u32; MAX_DECAP_ADDRS],
    /// IPv4 allowed sources: `[net, mask]`.
    pub v4_srcs: [[u32; 2]; MAX_DECAP_SRCS],
    /// IPv6 tunnel endpoints: the address as two words.
    pub v6_addrs: [[u64; 2]; MAX_DECAP_ADDRS],
    /// IPv6 allowed sources: `[net (2 words), mask (2 words)]`.
    pub v6_srcs: [[u64; 4]; MAX_DECAP_SRCS],
    /// Entries used in `v4_addrs`.
    pub v4_addr_count: u32,
    /// Entries used in `v6_addrs`.
    pub v6_addr_count: u32,
    /// Entries used in `v4_srcs`.
    pub v4_src_count: u32,
    /// Entries used in `v6_srcs`.
    pub v6_src_count: u32,
}
const _: () = assert!(size_of::<DecapSet>() == 3856);

impl DecapSet {
    /// Accepts nothing (the object's value before the loader sets it).
    pub const EMPTY: DecapSet = DecapSet {
        v4_addrs: [0; MAX_DECAP_ADDRS],
        v4_srcs: [[0; 2]; MAX_DECAP_SRCS],
        v6_addrs: [[0; 2]; MAX_DECAP_ADDRS],
        v6_srcs: [[0; 4]; MAX_DECAP_SRCS],
        v4_addr_count: 0,
        v6_addr_count: 0,
        v4_src_count: 0,
        v6_src_count: 0,
    };
}

/// Seed of the flow hash. Changing it moves every untracked flow: keep it fixed.
pub const FLOW_HASH_SEED: u32 = 0x786c_6231; // "xlb1"

/// Mixes one 32-bit word into the running hash (murmur3's block step).
#[inline(always)]
const fn mix(h: u32, w: u32) -> u32 {
    let k = w
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// murmur3's finaliser: every input bit affects every output bit.
#[inline(always)]
const fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
const fn mix_addr(mut h: u32, a: &[u8; 16]) -> u32 {
    let mut i = 0;
    while i < 16 {
        h = mix(h, u32::from_be_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]));
        i += 4;
    }
    h
}

/// The flow hash the dataplane uses to pick a Maglev slot (`hash % ring_size`).
///
/// Inputs are the wire bytes: `src` and `dst` addresses as 16 bytes (IPv4 in the
/// first 4, rest zero), ports as their two wire bytes packed `src << 16 | dst`
/// in big-endian order, and the IP protocol. Userspace calls the same function
/// to answer "which real does this flow get".
#[inline(always)]
pub const fn flow_hash(src: &[u8; 16], dst: &[u8; 16], ports: u32, proto: u8) -> u32 {
    let mut h = mix_addr(FLOW_HASH_SEED, src);
    h = mix_addr(h, dst);
    h = mix(h, ports);
    h = mix(h, proto as u32);
    fmix(h ^ 37)
}

/// The hash a `maglev-src` VIP uses: the source address only.
#[inline(always)]
pub const fn src_hash(src: &[u8; 16]) -> u32 {
    fmix(mix_addr(FLOW_HASH_SEED, src) ^ 16)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)] plain integers and byte arrays with no
    // implicit padding (the size asserts above pin their layout).
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipMeta {}
    unsafe impl aya::Pod for super::VipSlot {}
    unsafe impl aya::Pod for super::AddrKey {}
    unsafe impl aya::Pod for super::RealDef {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowState {}
    unsafe impl aya::Pod for super::CtBucket {}
    unsafe impl aya::Pod for super::CtParams {}
    unsafe impl aya::Pod for super::FlowEvent {}
    unsafe impl aya::Pod for super::FloodWindow {}
    unsafe impl aya::Pod for super::DecapSet {}
}
