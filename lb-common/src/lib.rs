//! Types shared by the xlb XDP program (`lb-ebpf`) and its userspace daemon
//! (`lb-userspace`).
//!
//! Everything that crosses the kernel/userspace boundary lives here: map keys and
//! values (`#[repr(C)]`, explicit padding, size asserts), map names, capacities,
//! counter indices and the flow hash both sides must agree on.
//!
//! # Byte order
//!
//! Addresses are stored as the bytes seen on the wire (network order). Ports are
//! stored as `u16` holding the two wire bytes (`u16::from_ne_bytes(wire)`), named
//! `*_be` — userspace converts with `u16::to_be()`. Everything else is host order.
#![no_std]

use core::mem::size_of;

/// Map names, used by the program's `#[map(name = ...)]` and by userspace lookups.
pub mod map_names {
    /// `HashMap<VipKey, VipMeta>`: which (address, port, protocol) are virtual services.
    pub const VIPS: &str = "XLB_VIPS";
    /// `HashMap<VipAddrKey, u32>`: addresses carrying VIPs → how many VIPs.
    pub const VIP_ADDRS: &str = "XLB_VIP_ADDRS";
    /// `Array<[u32; 2]>`: the Maglev lookup tables, `RING_SLOTS` rings of
    /// `RING_SIZE_MAX` real ids, packed two per entry (see [`super::RING_ENTRIES`]).
    pub const RINGS: &str = "XLB_RINGS";
    /// `Array<RealDef>`: real servers by real id (id 0 is never used).
    pub const REALS: &str = "XLB_REALS";
    /// `Array<Config>` with one element: settings of the attached interface.
    pub const CONFIG: &str = "XLB_CONFIG";
    /// `PerCpuArray<Counter>`: one counter per verdict reason, see [`super::stat`].
    pub const STATS: &str = "XLB_STATS";
    /// `PerCpuArray<Counter>`: packets and bytes per VIP id.
    pub const VIP_STATS: &str = "XLB_VIP_STATS";
    /// `PerCpuArray<Counter>`: packets and bytes per real id.
    pub const REAL_STATS: &str = "XLB_REAL_STATS";
}

/// Program names (the Rust function names of the `#[xdp]` entry points).
pub mod prog_names {
    /// The balancer.
    pub const BALANCER: &str = "xlb";
    /// A program that passes every packet. Test topologies attach it to veth peers
    /// that must receive XDP_TX frames (see docs/architecture.md).
    pub const PASS: &str = "xlb_pass";
}

/// Most virtual services the maps hold.
pub const MAX_VIPS: u32 = 64;
/// Most real servers (over all VIPs; a real serving several VIPs counts once).
pub const MAX_REALS: u32 = 4096;
/// Largest Maglev table. Every table size must be a prime not above this.
pub const RING_SIZE_MAX: u32 = 65537;
/// Default Maglev table size (prime, as the Maglev paper requires).
pub const RING_SIZE_DEFAULT: u32 = 65537;
/// Number of rings: two per VIP, so a new table is written aside and swapped in.
pub const RING_SLOTS: u32 = MAX_VIPS * 2;
/// Entries of the ring map. The kernel stores array values in 8-byte strides,
/// so ring slots are packed two per entry (`[u32; 2]`): slot `i` of the flat
/// ring space is element `i % 2` of entry `i / 2`, and the memory-mapped map
/// is then exactly a flat `u32` array.
pub const RING_ENTRIES: u32 = RING_SLOTS * RING_SIZE_MAX / 2;
const _: () = assert!((RING_SLOTS * RING_SIZE_MAX) % 2 == 0);

/// Real id that means "no real": a ring slot holding it drops the packet.
pub const REAL_NONE: u32 = 0;

/// IP protocol numbers used in [`VipKey::proto`].
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// Address family tags used in keys and values.
pub const FAMILY_V4: u8 = 4;
/// IPv6 family tag.
pub const FAMILY_V6: u8 = 6;

/// Key of the VIP map: one virtual service.
///
/// An IPv4 address takes the first 4 bytes of `addr`; the rest stay zero.
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

/// Key of the VIP-address map: an address that carries at least one VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipAddrKey {
    /// The address, network order (IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Explicit padding, zero.
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<VipAddrKey>() == 20);

/// Value of the VIP map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipMeta {
    /// Index into `VIP_STATS`; stable for the VIP's life.
    pub vip_id: u32,
    /// Which ring in `RINGS` is live. Userspace writes the other one and flips this.
    pub ring_id: u32,
    /// Maglev table size of the live ring (prime, <= [`RING_SIZE_MAX`]).
    pub ring_size: u32,
    /// `VIP_F_*` bits.
    pub flags: u32,
}
const _: () = assert!(size_of::<VipMeta>() == 16);

/// Hash only the source address (IPVS `sh`-like persistence) instead of the 5-tuple.
pub const VIP_F_HASH_SRC_ONLY: u32 = 1 << 0;

/// Value of the reals map: where to send a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RealDef {
    /// The real's address, network order (IPv4 in the first 4 bytes).
    pub addr: [u8; 16],
    /// The real's MAC on the balancer's segment (DR mode destination MAC).
    pub mac: [u8; 6],
    /// [`FAMILY_V4`] or [`FAMILY_V6`]; 0 marks an unused slot.
    pub family: u8,
    /// Reserved, zero.
    pub flags: u8,
}
const _: () = assert!(size_of::<RealDef>() == 24);

/// The single element of the config map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// MAC of the interface the balancer is attached to: source MAC of forwarded frames.
    pub iface_mac: [u8; 6],
    /// Explicit padding, zero.
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<Config>() == 8);

/// A packet and byte counter (per CPU in the maps; userspace sums).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    /// Packets counted.
    pub packets: u64,
    /// Bytes counted (the whole frame as received).
    pub bytes: u64,
}
const _: () = assert!(size_of::<Counter>() == 16);

/// Indices into the `STATS` map: every verdict the balancer returns bumps exactly one.
pub mod stat {
    /// Not IPv4 (ARP, IPv6, other ethertypes): passed to the kernel.
    pub const PASS_NOT_IP: u32 = 0;
    /// IPv4 but not to a VIP (address, port or protocol unknown): passed.
    pub const PASS_NOT_VIP: u32 = 1;
    /// Headers too short or inconsistent to know whether it is ours: passed, the
    /// kernel applies its own checks and drops what is broken.
    pub const PASS_MALFORMED: u32 = 2;
    /// Forwarded to a real server (XDP_TX).
    pub const TX: u32 = 3;
    /// To a VIP with no real server available: dropped.
    pub const DROP_NO_REAL: u32 = 4;
    /// An IPv4 fragment to a VIP address: dropped (ports are not in every fragment,
    /// so fragments cannot be steered consistently).
    pub const DROP_FRAGMENT: u32 = 5;
    /// A map lookup that cannot fail did (e.g. config missing): XDP_ABORTED.
    pub const ABORTED: u32 = 6;
    /// To a VIP address but the TCP/UDP header is cut short: dropped.
    pub const DROP_MALFORMED: u32 = 7;
    /// Number of counters in use.
    pub const COUNT: u32 = 8;
    /// Capacity of the map (room to add reasons without a layout change).
    pub const CAPACITY: u32 = 32;

    /// Names, in index order, as shown by `xlb stats` and metrics.
    pub const NAMES: [&str; COUNT as usize] = [
        "pass_not_ip",
        "pass_not_vip",
        "pass_malformed",
        "tx",
        "drop_no_real",
        "drop_fragment",
        "aborted",
        "drop_malformed",
    ];
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

/// The flow hash the dataplane uses to pick a Maglev slot (`hash % ring_size`).
///
/// Inputs are the wire bytes: `src` and `dst` addresses as 16 bytes (IPv4 in the
/// first 4, rest zero), ports as their two wire bytes packed `src << 16 | dst`
/// in big-endian order, and the IP protocol. Userspace calls the same function
/// to answer "which real does this flow get".
#[inline(always)]
pub const fn flow_hash(src: &[u8; 16], dst: &[u8; 16], ports: u32, proto: u8) -> u32 {
    let mut h = FLOW_HASH_SEED;
    let mut i = 0;
    while i < 16 {
        h = mix(
            h,
            u32::from_be_bytes([src[i], src[i + 1], src[i + 2], src[i + 3]]),
        );
        i += 4;
    }
    i = 0;
    while i < 16 {
        h = mix(
            h,
            u32::from_be_bytes([dst[i], dst[i + 1], dst[i + 2], dst[i + 3]]),
        );
        i += 4;
    }
    h = mix(h, ports);
    h = mix(h, proto as u32);
    fmix(h ^ 37)
}

/// The hash a `maglev-src` VIP uses: the source address only.
#[inline(always)]
pub const fn src_hash(src: &[u8; 16]) -> u32 {
    let mut h = FLOW_HASH_SEED;
    let mut i = 0;
    while i < 16 {
        h = mix(
            h,
            u32::from_be_bytes([src[i], src[i + 1], src[i + 2], src[i + 3]]),
        );
        i += 4;
    }
    fmix(h ^ 16)
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)] plain integers and byte arrays with no
    // implicit padding (the size asserts above pin their layout).
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipMeta {}
    unsafe impl aya::Pod for super::VipAddrKey {}
    unsafe impl aya::Pod for super::RealDef {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Counter {}
}
