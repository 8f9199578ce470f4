//! Frame generators: a weighted mix of valid, nearly valid and broken frames.
//!
//! Well-formed packets are built with etherparse (checksums right by
//! construction); the broken ones start from those and are edited by hand,
//! which is the point of them.

use std::net::IpAddr;

use etherparse::{IpHeaders, IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header, PacketBuilder};
use rand::{Rng as _, RngCore as _, seq::IndexedRandom as _};
use rand_chacha::ChaCha8Rng;
use xlb_tests::packet::{CLIENT_MAC, LB_MAC};

use crate::world::World;

/// Which program a generator's frames are run through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Balancer,
    /// The balancer and the decapsulator.
    Both,
}

/// One generator: a name for the report, a weight in the mix, a builder.
pub struct Generator {
    pub name: &'static str,
    pub weight: u32,
    pub target: Target,
    pub make: fn(&mut Gen<'_>) -> Vec<u8>,
}

/// The generators and their share of the mix.
pub const GENERATORS: &[Generator] = &[
    gen_("vip-flow", 12, Target::Balancer, vip_flow),
    gen_("non-vip-flow", 8, Target::Balancer, non_vip_flow),
    gen_("mutated", 16, Target::Both, mutated),
    gen_("truncated", 6, Target::Both, truncated),
    gen_("malformed-layer", 7, Target::Balancer, malformed_layer),
    gen_("vlan", 4, Target::Balancer, vlan),
    gen_("ipv6-ext-chain", 8, Target::Balancer, ipv6_ext_chain),
    gen_("icmp-error", 9, Target::Balancer, icmp_error),
    gen_("icmp-echo", 6, Target::Balancer, icmp_echo),
    gen_("fragment", 6, Target::Balancer, fragment),
    gen_("tunnel", 8, Target::Both, tunnel),
    gen_("other-mac", 6, Target::Balancer, other_mac),
    gen_("random-bytes", 4, Target::Both, random_bytes),
];

const fn gen_(
    name: &'static str,
    weight: u32,
    target: Target,
    make: fn(&mut Gen<'_>) -> Vec<u8>,
) -> Generator {
    Generator {
        name,
        weight,
        target,
        make,
    }
}

/// Picks generator index by weight.
pub fn pick(rng: &mut ChaCha8Rng) -> usize {
    let total: u32 = GENERATORS.iter().map(|g| g.weight).sum();
    let mut x = rng.random_range(0..total);
    for (i, g) in GENERATORS.iter().enumerate() {
        if x < g.weight {
            return i;
        }
        x -= g.weight;
    }
    unreachable!("weights add up to the total")
}

/// Smallest frame BPF_PROG_TEST_RUN accepts for XDP (an Ethernet header).
pub const MIN_FRAME: usize = 14;
/// Largest frame generated (the kernel takes about a page minus head/tailroom).
pub const MAX_FRAME: usize = 3000;

/// The generation context of one frame.
pub struct Gen<'a> {
    pub rng: &'a mut ChaCha8Rng,
    pub world: &'a World,
}

const ETH_IPV4: u16 = 0x0800;
const ETH_IPV6: u16 = 0x86dd;
const ETH_8021Q: u16 = 0x8100;
const ETH_8021AD: u16 = 0x88a8;

impl Gen<'_> {
    fn chance(&mut self, p: f64) -> bool {
        self.rng.random_bool(p)
    }

    fn upto(&mut self, n: usize) -> usize {
        self.rng.random_range(0..=n)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.rng.fill_bytes(&mut v);
        v
    }

    fn port(&mut self) -> u16 {
        if self.chance(0.1) {
            *[0u16, 1, 65535, 80, 53, 443]
                .choose(self.rng)
                .expect("non-empty")
        } else {
            self.rng.random_range(1024..=65535)
        }
    }

    /// A client address of `dst`'s family.
    fn client_for(&mut self, dst: IpAddr) -> IpAddr {
        let same: Vec<IpAddr> = self
            .world
            .clients
            .iter()
            .copied()
            .filter(|c| c.is_ipv4() == dst.is_ipv4())
            .collect();
        *same.choose(self.rng).expect("clients of both families")
    }

    fn other_addr(&mut self, v4: bool) -> IpAddr {
        let same: Vec<IpAddr> = self
            .world
            .other_addrs
            .iter()
            .copied()
            .filter(|c| c.is_ipv4() == v4)
            .collect();
        *same
            .choose(self.rng)
            .expect("other addresses of both families")
    }

    fn vip_addr(&mut self) -> IpAddr {
        *self
            .world
            .vip_addrs
            .choose(self.rng)
            .expect("VIP addresses")
    }

    /// The Ethernet header with random VLAN tags (none, 802.1Q, QinQ, odd stacks).
    fn l2(&mut self, dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
        let mut out = Vec::with_capacity(26);
        out.extend_from_slice(&dst);
        out.extend_from_slice(&src);
        let tags: &[u16] = match self.rng.random_range(0..20) {
            0..=11 => &[],
            12..=14 => &[ETH_8021Q],
            15..=16 => &[ETH_8021AD, ETH_8021Q],
            17 => &[ETH_8021Q, ETH_8021Q],
            18 => &[ETH_8021AD],
            _ => &[ETH_8021AD, ETH_8021Q, ETH_8021Q],
        };
        for t in tags {
            out.extend_from_slice(&t.to_be_bytes());
            let tci: u16 = self.rng.random_range(0..=0xffff);
            out.extend_from_slice(&tci.to_be_bytes());
        }
        out.extend_from_slice(&ethertype.to_be_bytes());
        out
    }

    /// A frame from the client to the balancer carrying the IP packet `l3`.
    fn frame(&mut self, l3: &[u8]) -> Vec<u8> {
        let ethertype = if l3.first().is_some_and(|b| b >> 4 == 6) {
            ETH_IPV6
        } else {
            ETH_IPV4
        };
        let mut f = self.l2(LB_MAC, CLIENT_MAC, ethertype);
        f.extend_from_slice(l3);
        f
    }

    fn payload(&mut self) -> Vec<u8> {
        let n = match self.rng.random_range(0..10) {
            0..=3 => 0,
            4..=8 => self.upto(200),
            _ => self.upto(1500),
        };
        self.bytes(n)
    }
}

fn ip_headers(src: IpAddr, dst: IpAddr, proto: IpNumber) -> IpHeaders {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => IpHeaders::Ipv4(
            Ipv4Header::new(0, 64, proto, s.octets(), d.octets()).expect("IPv4 header"),
            Default::default(),
        ),
        (IpAddr::V6(s), IpAddr::V6(d)) => IpHeaders::Ipv6(
            Ipv6Header {
                traffic_class: 0,
                flow_label: Ipv6FlowLabel::ZERO,
                payload_length: 0,
                next_header: proto,
                hop_limit: 64,
                source: s.octets(),
                destination: d.octets(),
            },
            Default::default(),
        ),
        _ => panic!("mixed families {src} -> {dst}"),
    }
}

/// What sits on top of IP in a built packet.
#[derive(Clone, Copy)]
enum Upper<'a> {
    Tcp {
        sport: u16,
        dport: u16,
        flags: u8,
        payload: &'a [u8],
    },
    Udp {
        sport: u16,
        dport: u16,
        payload: &'a [u8],
    },
    /// ICMP (IPv4) or ICMPv6 (IPv6): type, code, bytes 4..8, body.
    Icmp {
        ty: u8,
        code: u8,
        rest: [u8; 4],
        body: &'a [u8],
    },
    /// Any other protocol with raw bytes.
    Raw { proto: u8, payload: &'a [u8] },
}

/// An IP packet (no Ethernet header) with correct lengths and checksums.
fn ip_packet(src: IpAddr, dst: IpAddr, upper: Upper<'_>) -> Vec<u8> {
    let v6 = src.is_ipv6();
    let mut out = Vec::new();
    match upper {
        Upper::Tcp {
            sport,
            dport,
            flags,
            payload,
        } => {
            let mut b = PacketBuilder::ip(ip_headers(src, dst, IpNumber::TCP)).tcp(
                sport,
                dport,
                0x1000_0000,
                64240,
            );
            if flags & 0x02 != 0 {
                b = b.syn();
            }
            if flags & 0x10 != 0 {
                b = b.ack(1);
            }
            if flags & 0x01 != 0 {
                b = b.fin();
            }
            if flags & 0x04 != 0 {
                b = b.rst();
            }
            b.write(&mut out, payload).expect("TCP packet");
        }
        Upper::Udp {
            sport,
            dport,
            payload,
        } => PacketBuilder::ip(ip_headers(src, dst, IpNumber::UDP))
            .udp(sport, dport)
            .write(&mut out, payload)
            .expect("UDP packet"),
        Upper::Icmp {
            ty,
            code,
            rest,
            body,
        } => {
            if v6 {
                PacketBuilder::ip(ip_headers(src, dst, IpNumber::IPV6_ICMP))
                    .icmpv6_raw(ty, code, rest)
                    .write(&mut out, body)
                    .expect("ICMPv6 packet");
            } else {
                PacketBuilder::ip(ip_headers(src, dst, IpNumber::ICMP))
                    .icmpv4_raw(ty, code, rest)
                    .write(&mut out, body)
                    .expect("ICMP packet");
            }
        }
        Upper::Raw { proto, payload } => {
            let h = ip_headers(src, dst, IpNumber(proto));
            match h {
                IpHeaders::Ipv4(mut h, _) => {
                    h.set_payload_len(payload.len()).expect("fits");
                    h.header_checksum = h.calc_header_checksum();
                    out.extend_from_slice(&h.to_bytes());
                }
                IpHeaders::Ipv6(mut h, _) => {
                    h.set_payload_length(payload.len()).expect("fits");
                    out.extend_from_slice(&h.to_bytes());
                }
            }
            out.extend_from_slice(payload);
        }
    }
    out
}

/// Recomputes the IPv4 header checksum of the packet at the start of `l3`.
fn fix_ipv4_checksum(l3: &mut [u8]) {
    let ihl = usize::from(l3[0] & 0x0f) * 4;
    if ihl < 20 || l3.len() < ihl {
        return;
    }
    l3[10] = 0;
    l3[11] = 0;
    let c = crate::check::checksum(&[&l3[..ihl]]);
    l3[10..12].copy_from_slice(&c.to_be_bytes());
}

fn tcp_flags(g: &mut Gen<'_>) -> u8 {
    *[0x02u8, 0x10, 0x10, 0x18, 0x12, 0x11, 0x04, 0x00, 0x3f]
        .choose(g.rng)
        .expect("non-empty")
}

/// A TCP or UDP packet from a client to `dst:dport`.
fn flow_packet(g: &mut Gen<'_>, dst: IpAddr, dport: u16, udp: bool) -> Vec<u8> {
    let src = g.client_for(dst);
    let sport = g.port();
    let payload = g.payload();
    let upper = if udp {
        Upper::Udp {
            sport,
            dport,
            payload: &payload,
        }
    } else {
        Upper::Tcp {
            sport,
            dport,
            flags: tcp_flags(g),
            payload: &payload,
        }
    };
    ip_packet(src, dst, upper)
}

/// A valid TCP/UDP packet to a configured service (IP layer only).
fn vip_flow_l3(g: &mut Gen<'_>) -> Vec<u8> {
    let s = g.world.services.choose(g.rng).expect("services");
    let (addr, port, udp) = (s.vip.addr, s.vip.port, s.vip.proto.number() == 17);
    flow_packet(g, addr, port, udp)
}

fn vip_flow(g: &mut Gen<'_>) -> Vec<u8> {
    let l3 = vip_flow_l3(g);
    g.frame(&l3)
}

/// TCP/UDP/other protocols to addresses or ports that carry no service.
fn non_vip_l3(g: &mut Gen<'_>) -> Vec<u8> {
    let v4 = g.chance(0.5);
    match g.rng.random_range(0..4) {
        // Another address, any port.
        0 => {
            let dst = g.other_addr(v4);
            let port = g.port();
            let udp = g.chance(0.5);
            flow_packet(g, dst, port, udp)
        }
        // A VIP address on a port or protocol without a service.
        1 => {
            let dst = g.vip_addr();
            let mut port = g.port();
            let udp = g.chance(0.5);
            let proto = if udp { 17 } else { 6 };
            while g.world.service(dst, port, proto).is_some() {
                port = port.wrapping_add(1);
            }
            flow_packet(g, dst, port, udp)
        }
        // Other protocols to a VIP address (GRE, ESP, SCTP, IPIP, ICMP of the
        // other family, an unassigned number).
        2 => {
            let dst = g.vip_addr();
            let src = g.client_for(dst);
            let proto = *[47u8, 50, 132, 4, 41, 1, 58, 253, 255, 0]
                .choose(g.rng)
                .expect("non-empty");
            let proto = match (proto, dst.is_ipv4()) {
                // ICMP of the other family, never the family's own.
                (1, true) => 58,
                (58, false) => 1,
                // Extension-header numbers are the chain generator's business.
                (0, false) => 59,
                (p, _) => p,
            };
            let payload = g.payload();
            ip_packet(
                src,
                dst,
                Upper::Raw {
                    proto,
                    payload: &payload,
                },
            )
        }
        // ICMP to another address.
        _ => {
            let dst = g.other_addr(v4);
            let src = g.client_for(dst);
            let ty = if v4 { 8 } else { 128 };
            let body = g.payload();
            ip_packet(
                src,
                dst,
                Upper::Icmp {
                    ty,
                    code: 0,
                    rest: [0, 1, 0, 1],
                    body: &body,
                },
            )
        }
    }
}

fn non_vip_flow(g: &mut Gen<'_>) -> Vec<u8> {
    if g.chance(0.05) {
        // Not IP at all: ARP, LLDP, MPLS, a length field instead of a type.
        let et = *[0x0806u16, 0x88cc, 0x8847, 0x0600, 0x86dd ^ 1]
            .choose(g.rng)
            .expect("non-empty");
        let mut f = g.l2(LB_MAC, CLIENT_MAC, et);
        let n = g.upto(80);
        f.extend(g.bytes(n));
        return pad_min(f);
    }
    let l3 = non_vip_l3(g);
    g.frame(&l3)
}

/// A valid frame of any kind the balancer may meet, as the base of mutations.
fn base_frame(g: &mut Gen<'_>) -> Vec<u8> {
    match g.rng.random_range(0..8) {
        0 | 1 => vip_flow(g),
        2 => non_vip_flow(g),
        3 => icmp_echo(g),
        4 => icmp_error(g),
        5 => ipv6_ext_chain(g),
        6 => fragment(g),
        _ => tunnel(g),
    }
}

/// Offsets of the IP header and the transport header in a generated frame
/// (best effort: for picking which fields to lie in).
fn offsets(f: &[u8]) -> (usize, usize) {
    let mut off = 14;
    while off + 4 <= f.len()
        && matches!(
            u16::from_be_bytes([f[off - 2], f[off - 1]]),
            0x8100 | 0x88a8
        )
    {
        off += 4;
    }
    let l4 = match f.get(off).map(|b| b >> 4) {
        Some(4) => off + usize::from(f[off] & 0x0f) * 4,
        Some(6) => off + 40,
        _ => off,
    };
    (off, l4)
}

/// One random edit: a bit flip, a byte, a length lie, a wrong checksum, a cut.
fn mutate(g: &mut Gen<'_>, f: &mut Vec<u8>) {
    let (l3, l4) = offsets(f);
    let n = f.len();
    match g.rng.random_range(0..10) {
        0 | 1 => {
            for _ in 0..g.rng.random_range(1..=4) {
                let i = g.rng.random_range(0..n);
                f[i] ^= 1 << g.rng.random_range(0..8);
            }
        }
        2 => {
            // A random byte in the headers, where it matters most.
            let i = g.rng.random_range(0..n.min(l4 + 24));
            f[i] = g.rng.random();
        }
        3 => {
            // IP length field lies (IPv4 total length, IPv6 payload length).
            let at = if f.get(l3).is_some_and(|b| b >> 4 == 6) {
                l3 + 4
            } else {
                l3 + 2
            };
            if at + 2 <= n {
                let real = u16::from_be_bytes([f[at], f[at + 1]]);
                let lie = match g.rng.random_range(0..4) {
                    0 => 0,
                    1 => real.wrapping_add(g.rng.random_range(1..64)),
                    2 => real.saturating_sub(g.rng.random_range(1..64)),
                    _ => g.rng.random(),
                };
                f[at..at + 2].copy_from_slice(&lie.to_be_bytes());
                if f[l3] >> 4 == 4 && g.chance(0.7) {
                    fix_ipv4_checksum(&mut f[l3..]);
                }
            }
        }
        4 => {
            // Transport length lies: UDP length, TCP data offset.
            if l4 + 13 <= n {
                if g.chance(0.5) {
                    let v: u16 = *[0u16, 7, 8, 9, 0xffff].choose(g.rng).expect("non-empty");
                    f[l4 + 4..l4 + 6].copy_from_slice(&v.to_be_bytes());
                } else {
                    f[l4 + 12] = (g.rng.random_range(0..16u8) << 4) | (f[l4 + 12] & 0x0f);
                }
            }
        }
        5 => {
            // A wrong checksum: the IPv4 header's or the transport's.
            let at = if g.chance(0.5) && f.get(l3).is_some_and(|b| b >> 4 == 4) {
                l3 + 10
            } else {
                l4 + if g.chance(0.5) { 16 } else { 6 }
            };
            if at + 2 <= n {
                f[at] ^= g.rng.random_range(1..=255u8);
            }
        }
        6 | 7 => {
            let keep = g.rng.random_range(MIN_FRAME.min(n)..=n);
            f.truncate(keep);
        }
        8 => {
            // Trailing bytes after the IP packet (Ethernet padding, or junk).
            let extra = g.upto(64);
            f.extend(g.bytes(extra));
        }
        _ => {
            // The IP version nibble or header length.
            if l3 < n {
                f[l3] = g.rng.random();
                if g.chance(0.5) && f[l3] >> 4 == 4 {
                    fix_ipv4_checksum(&mut f[l3..]);
                }
            }
        }
    }
}

fn mutated(g: &mut Gen<'_>) -> Vec<u8> {
    let mut f = base_frame(g);
    for _ in 0..g.rng.random_range(1..=3) {
        mutate(g, &mut f);
    }
    pad_min(f)
}

fn truncated(g: &mut Gen<'_>) -> Vec<u8> {
    let mut f = base_frame(g);
    let keep = g.rng.random_range(MIN_FRAME..=f.len());
    f.truncate(keep);
    f
}

/// One header layer made invalid on purpose (each a field a parser must check).
fn malformed_layer(g: &mut Gen<'_>) -> Vec<u8> {
    let mut f = if g.chance(0.8) {
        vip_flow(g)
    } else {
        icmp_echo(g)
    };
    let (l3, l4) = offsets(&f);
    let v4 = f[l3] >> 4 == 4;
    match g.rng.random_range(0..8) {
        // The IP version of the other family, or nonsense.
        0 => f[l3] = (*[4u8, 6, 0, 5, 15].choose(g.rng).expect("non-empty") << 4) | (f[l3] & 0x0f),
        // IPv4 header length below 20 or past the packet; IPv6 payload length 0.
        1 if v4 => {
            f[l3] = 0x40 | *[0u8, 1, 4, 6, 15].choose(g.rng).expect("non-empty");
            fix_ipv4_checksum(&mut f[l3..]);
        }
        1 => f[l3 + 4..l3 + 6].copy_from_slice(&[0, 0]),
        // IPv4 total length below the header length.
        2 if v4 => {
            let v = g.rng.random_range(0..20u16);
            f[l3 + 2..l3 + 4].copy_from_slice(&v.to_be_bytes());
            fix_ipv4_checksum(&mut f[l3..]);
        }
        // The ethertype of the other family.
        2 | 3 => {
            let et = if v4 { ETH_IPV6 } else { ETH_IPV4 };
            f[l3 - 2..l3].copy_from_slice(&et.to_be_bytes());
        }
        // TCP data offset below 5 or past the segment; UDP length below 8.
        4 | 5 => {
            if l4 + 13 <= f.len() {
                f[l4 + 12] = (g.rng.random_range(0..5u8) << 4) | (f[l4 + 12] & 0x0f);
                let ul = g.rng.random_range(0..8u16);
                if g.chance(0.5) {
                    f[l4 + 4..l4 + 6].copy_from_slice(&ul.to_be_bytes());
                }
            }
        }
        // The transport header cut at every length.
        6 => {
            let keep = (l4 + g.upto(20)).clamp(MIN_FRAME, f.len());
            f.truncate(keep);
        }
        // The IPv4 TTL / IPv6 hop limit 0, or a reserved flag bit.
        _ => {
            if v4 {
                f[l3 + 8] = 0;
                f[l3 + 6] |= 0x80;
                fix_ipv4_checksum(&mut f[l3..]);
            } else {
                f[l3 + 7] = 0;
            }
        }
    }
    f
}

fn vlan(g: &mut Gen<'_>) -> Vec<u8> {
    // Always tagged: 802.1Q, QinQ (802.1ad + 802.1Q), or a stack of three.
    let l3 = if g.chance(0.7) {
        vip_flow_l3(g)
    } else {
        non_vip_l3(g)
    };
    let ethertype = if l3[0] >> 4 == 6 { ETH_IPV6 } else { ETH_IPV4 };
    let tags: &[u16] = [
        &[ETH_8021Q][..],
        &[ETH_8021AD, ETH_8021Q],
        &[ETH_8021Q, ETH_8021Q],
        &[ETH_8021AD, ETH_8021Q, ETH_8021Q],
        &[ETH_8021AD, ETH_8021AD],
    ]
    .choose(g.rng)
    .expect("non-empty");
    let mut f = Vec::new();
    f.extend_from_slice(&LB_MAC);
    f.extend_from_slice(&CLIENT_MAC);
    for t in tags {
        f.extend_from_slice(&t.to_be_bytes());
        let tci: u16 = g.rng.random();
        f.extend_from_slice(&tci.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(&l3);
    f
}

/// IPv6 extension header numbers.
const NH_HOP_BY_HOP: u8 = 0;
const NH_ROUTING: u8 = 43;
const NH_FRAGMENT: u8 = 44;
const NH_AH: u8 = 51;
const NH_DEST_OPTS: u8 = 60;
const NH_NONE: u8 = 59;

/// Inserts a chain of extension headers between the IPv6 header at the start
/// of `l3` and its payload. `frag` picks the fragment header's offset/M bits.
fn insert_ext_chain(g: &mut Gen<'_>, l3: &mut Vec<u8>, kinds: &[u8]) {
    let upper_nh = l3[6];
    let mut chain = Vec::new();
    for (i, kind) in kinds.iter().enumerate() {
        let next = kinds.get(i + 1).copied().unwrap_or(upper_nh);
        match *kind {
            NH_FRAGMENT => {
                let (offset, more): (u16, bool) = match g.rng.random_range(0..4) {
                    0 => (0, false), // atomic: carries a whole packet
                    1 => (0, true),  // first fragment
                    _ => (g.rng.random_range(1..8191), g.chance(0.5)),
                };
                let field = (offset << 3) | u16::from(more);
                chain.extend_from_slice(&[next, 0]);
                chain.extend_from_slice(&field.to_be_bytes());
                chain.extend_from_slice(&g.rng.random::<u32>().to_be_bytes());
            }
            NH_AH => {
                // Payload length in 4-byte units minus 2; at least 12 bytes.
                let units = g.rng.random_range(1..=6u8);
                let len = (usize::from(units) + 2) * 4;
                chain.extend_from_slice(&[next, units]);
                chain.extend(g.bytes(len - 2));
            }
            _ => {
                let units = if g.chance(0.8) {
                    g.rng.random_range(0..=2u8)
                } else {
                    g.rng.random()
                };
                let len = (usize::from(units) + 1) * 8;
                chain.extend_from_slice(&[next, units]);
                // PadN options keep the option area well formed, mostly.
                let mut body = vec![0u8; len - 2];
                if len - 2 >= 2 && g.chance(0.8) {
                    body[0] = 1;
                    body[1] = u8::try_from(len - 4).unwrap_or(255);
                } else {
                    g.rng.fill_bytes(&mut body);
                }
                chain.extend(body);
            }
        }
    }
    l3[6] = kinds.first().copied().unwrap_or(upper_nh);
    let payload = u16::from_be_bytes([l3[4], l3[5]]) as usize + chain.len();
    l3[4..6].copy_from_slice(&u16::try_from(payload).unwrap_or(u16::MAX).to_be_bytes());
    let tail = l3.split_off(40);
    l3.extend(chain);
    l3.extend(tail);
}

fn ipv6_ext_chain(g: &mut Gen<'_>) -> Vec<u8> {
    let v6_vips: Vec<IpAddr> = g
        .world
        .vip_addrs
        .iter()
        .copied()
        .filter(IpAddr::is_ipv6)
        .collect();
    let mut l3 = match g.rng.random_range(0..4) {
        0 | 1 => loop {
            let p = vip_flow_l3(g);
            if p[0] >> 4 == 6 {
                break p;
            }
        },
        2 => {
            let dst = *v6_vips.choose(g.rng).expect("IPv6 VIPs");
            icmp_echo_l3(g, dst)
        }
        _ => {
            let dst = g.other_addr(false);
            let port = g.port();
            let udp = g.chance(0.5);
            flow_packet(g, dst, port, udp)
        }
    };
    let n = match g.rng.random_range(0..10) {
        0..=5 => g.rng.random_range(1..=3),
        6..=8 => g.rng.random_range(4..=6),
        _ => g.rng.random_range(7..=12),
    };
    let kinds: Vec<u8> = (0..n)
        .map(|_| {
            *[
                NH_HOP_BY_HOP,
                NH_ROUTING,
                NH_DEST_OPTS,
                NH_DEST_OPTS,
                NH_FRAGMENT,
                NH_AH,
                253,
                NH_NONE,
            ]
            .choose(g.rng)
            .expect("non-empty")
        })
        .collect();
    // Headers after an unknown one or "no next header" are never reached: cut there.
    let end = kinds
        .iter()
        .position(|k| *k == 253 || *k == NH_NONE)
        .map_or(kinds.len(), |i| i + 1);
    let kinds = &kinds[..end];
    if kinds.last().is_some_and(|k| *k == 253 || *k == NH_NONE) {
        let (last, rest) = kinds.split_last().expect("non-empty");
        insert_ext_chain(g, &mut l3, rest);
        // The unknown header becomes the upper layer: its payload follows as is.
        set_last_next_header(&mut l3, *last);
    } else {
        insert_ext_chain(g, &mut l3, kinds);
    }
    g.frame(&l3)
}

/// Sets the next-header field that names the upper layer of an IPv6 packet
/// whose chain holds only known extension headers.
fn set_last_next_header(l3: &mut [u8], nh: u8) {
    let mut at = 6;
    let mut cur = l3[6];
    let mut off = 40;
    while matches!(
        cur,
        NH_HOP_BY_HOP | NH_ROUTING | NH_DEST_OPTS | NH_FRAGMENT | NH_AH
    ) && off + 2 <= l3.len()
    {
        at = off;
        let len = match cur {
            NH_FRAGMENT => 8,
            NH_AH => (usize::from(l3[off + 1]) + 2) * 4,
            _ => (usize::from(l3[off + 1]) + 1) * 8,
        };
        cur = l3[off];
        off += len;
    }
    l3[at] = nh;
}

/// An echo request (sometimes another type or code) to `dst`, IP layer only.
fn icmp_echo_l3(g: &mut Gen<'_>, dst: IpAddr) -> Vec<u8> {
    let src = g.client_for(dst);
    let v4 = dst.is_ipv4();
    let (ty, code) = match g.rng.random_range(0..10) {
        0 => (if v4 { 0 } else { 129 }, 0),
        1 => (if v4 { 8 } else { 128 }, g.rng.random_range(1..=255)),
        _ => (if v4 { 8 } else { 128 }, 0),
    };
    let rest: [u8; 4] = g.rng.random();
    let n = if g.chance(0.8) {
        g.upto(64)
    } else {
        g.upto(1450)
    };
    let body = g.bytes(n);
    ip_packet(
        src,
        dst,
        Upper::Icmp {
            ty,
            code,
            rest,
            body: &body,
        },
    )
}

fn icmp_echo(g: &mut Gen<'_>) -> Vec<u8> {
    let dst = if g.chance(0.85) {
        g.vip_addr()
    } else {
        let v4 = g.chance(0.5);
        g.other_addr(v4)
    };
    let mut l3 = icmp_echo_l3(g, dst);
    if dst.is_ipv6() && g.chance(0.2) {
        let kinds: &[u8] = [
            &[NH_HOP_BY_HOP][..],
            &[NH_DEST_OPTS],
            &[NH_HOP_BY_HOP, NH_DEST_OPTS],
            &[NH_ROUTING],
        ]
        .choose(g.rng)
        .expect("non-empty");
        insert_ext_chain(g, &mut l3, kinds);
    }
    g.frame(&l3)
}

/// ICMP error types: (type, code) for IPv4 and IPv6.
const ICMP4_ERRORS: &[(u8, u8)] = &[
    (3, 4),
    (3, 4),
    (3, 3),
    (3, 1),
    (11, 0),
    (12, 0),
    (5, 1),
    (4, 0),
];
const ICMP6_ERRORS: &[(u8, u8)] = &[(2, 0), (2, 0), (1, 4), (3, 0), (4, 0), (4, 1)];

/// An ICMP error to a VIP address (mostly) quoting the packet a real sent
/// back from a flow: of a service or not, whole, fragmented or cut.
fn icmp_error(g: &mut Gen<'_>) -> Vec<u8> {
    let v4 = g.chance(0.5);
    let family: Vec<&crate::world::Service> = g
        .world
        .services
        .iter()
        .filter(|s| s.vip.addr.is_ipv4() == v4)
        .collect();
    let s = *family.choose(g.rng).expect("services of both families");
    let vip = s.vip.addr;
    let client = g.client_for(vip);
    let udp = s.vip.proto.number() == 17;
    // Whose reply is quoted: the service's, another port's, another address's.
    let (qsrc, qport, qudp) = match g.rng.random_range(0..6) {
        0..=2 => (vip, s.vip.port, udp),
        3 => (vip, g.port(), g.chance(0.5)),
        4 => (g.other_addr(v4), s.vip.port, udp),
        _ => (vip, s.vip.port, !udp),
    };
    let cport = g.port();
    let n = g.upto(64);
    let body = g.bytes(n);
    let mut quoted = if qudp {
        ip_packet(
            qsrc,
            client,
            Upper::Udp {
                sport: qport,
                dport: cport,
                payload: &body,
            },
        )
    } else {
        ip_packet(
            qsrc,
            client,
            Upper::Tcp {
                sport: qport,
                dport: cport,
                flags: 0x10,
                payload: &body,
            },
        )
    };
    // A quoted fragment: first or later (a later one has no ports).
    if g.chance(0.15) {
        if v4 {
            let later = g.chance(0.6);
            let frags: u16 = if later {
                g.rng.random_range(1..0x1fff)
            } else {
                0x2000
            };
            quoted[6..8].copy_from_slice(&frags.to_be_bytes());
            fix_ipv4_checksum(&mut quoted);
        } else {
            insert_ext_chain(g, &mut quoted, &[NH_FRAGMENT]);
        }
    }
    // Routers quote at least 8 bytes past the header; cut the quote anywhere.
    let keep = match g.rng.random_range(0..6) {
        0 => g.upto(quoted.len()),
        1 => quoted.len(),
        _ => (if v4 { 28 } else { 48 }).min(quoted.len()),
    };
    quoted.truncate(keep);
    let (ty, code) = *if v4 { ICMP4_ERRORS } else { ICMP6_ERRORS }
        .choose(g.rng)
        .expect("non-empty");
    let rest: [u8; 4] = if (v4 && ty == 3 && code == 4) || (!v4 && ty == 2) {
        let mtu: u16 = *[1400u16, 1280, 576, 68, 0, 9000]
            .choose(g.rng)
            .expect("non-empty");
        [0, 0, (mtu >> 8) as u8, mtu as u8]
    } else {
        [0; 4]
    };
    // Sent to the VIP address mostly; sometimes to another address.
    let dst = if g.chance(0.9) { vip } else { g.other_addr(v4) };
    let router = if v4 {
        "198.51.100.254".parse().expect("v4")
    } else {
        "2001:db8:100::fe".parse().expect("v6")
    };
    let l3 = ip_packet(
        router,
        dst,
        Upper::Icmp {
            ty,
            code,
            rest,
            body: &quoted,
        },
    );
    g.frame(&l3)
}

/// First and later fragments of TCP/UDP/ICMP to VIP and other addresses.
fn fragment(g: &mut Gen<'_>) -> Vec<u8> {
    let to_vip = g.chance(0.7);
    let mut l3 = match g.rng.random_range(0..5) {
        0..=2 if to_vip => vip_flow_l3(g),
        3 if to_vip => {
            let dst = g.vip_addr();
            icmp_echo_l3(g, dst)
        }
        _ => non_vip_l3(g),
    };
    let later = g.chance(0.5);
    if l3[0] >> 4 == 4 {
        let offset: u16 = if later {
            g.rng.random_range(1..0x1fff)
        } else {
            0
        };
        let more = !later || g.chance(0.5);
        let frags = offset | if more { 0x2000 } else { 0 } | if g.chance(0.3) { 0x4000 } else { 0 };
        l3[6..8].copy_from_slice(&frags.to_be_bytes());
        fix_ipv4_checksum(&mut l3);
        if later {
            // A later fragment carries data, not the transport header.
            let ihl = usize::from(l3[0] & 0x0f) * 4;
            let n = l3.len() - ihl;
            let data = g.bytes(n);
            l3[ihl..].copy_from_slice(&data);
        }
    } else {
        insert_ext_chain(g, &mut l3, &[NH_FRAGMENT]);
        // Force the kind: rewrite the fragment field.
        let offset: u16 = if later {
            g.rng.random_range(1..8191)
        } else {
            0
        };
        let more = !later || g.chance(0.5);
        let field = (offset << 3) | u16::from(more);
        l3[42..44].copy_from_slice(&field.to_be_bytes());
        if later {
            let n = l3.len() - 48;
            let data = g.bytes(n);
            l3[48..].copy_from_slice(&data);
        }
    }
    g.frame(&l3)
}

/// IPIP, IP6IP6 and 4in6 (and 6in4, which nobody decapsulates) to the
/// decapsulator's addresses and others, carrying valid or broken inner packets.
fn tunnel(g: &mut Gen<'_>) -> Vec<u8> {
    let outer_v4 = g.chance(0.45);
    let dst = match g.rng.random_range(0..10) {
        0..=6 => {
            let local: Vec<IpAddr> = g
                .world
                .decap_addrs
                .iter()
                .copied()
                .filter(|a| a.is_ipv4() == outer_v4)
                .collect();
            *local
                .choose(g.rng)
                .expect("decap addresses of both families")
        }
        7 => g.other_addr(outer_v4),
        _ => {
            let vips: Vec<IpAddr> = g
                .world
                .vip_addrs
                .iter()
                .copied()
                .filter(|a| a.is_ipv4() == outer_v4)
                .collect();
            *vips.choose(g.rng).expect("VIPs of both families")
        }
    };
    let src: IpAddr = match (outer_v4, g.rng.random_range(0..4)) {
        (true, 0) => "0.0.0.0".parse().expect("v4"),
        (true, _) => "192.0.2.200".parse().expect("v4"),
        (false, 0) => "::".parse().expect("v6"),
        (false, _) => "2001:db8:ff::9".parse().expect("v6"),
    };
    let inner = match g.rng.random_range(0..10) {
        0..=6 => vip_flow_l3(g),
        7 => non_vip_l3(g),
        8 => {
            let n = g.upto(60);
            g.bytes(n)
        }
        _ => {
            // The other version than the outer protocol number says.
            let mut p = vip_flow_l3(g);
            p[0] = (p[0] & 0x0f) | if p[0] >> 4 == 4 { 0x60 } else { 0x40 };
            p
        }
    };
    let inner_v4 = inner.first().is_none_or(|b| b >> 4 != 6);
    let proto = match g.rng.random_range(0..10) {
        0 => *[41u8, 4, 47].choose(g.rng).expect("non-empty"),
        _ if inner_v4 => 4,
        _ => 41,
    };
    let mut l3 = ip_packet(
        src,
        dst,
        Upper::Raw {
            proto,
            payload: &inner,
        },
    );
    if g.chance(0.1) {
        if outer_v4 {
            l3[6] |= 0x20;
            fix_ipv4_checksum(&mut l3);
        } else {
            let kinds: &[u8] = [
                &[NH_FRAGMENT][..],
                &[NH_HOP_BY_HOP],
                &[NH_DEST_OPTS, NH_FRAGMENT],
            ]
            .choose(g.rng)
            .expect("non-empty");
            insert_ext_chain(g, &mut l3, kinds);
        }
    }
    g.frame(&l3)
}

/// Frames to another unicast MAC, the broadcast address or a multicast group.
fn other_mac(g: &mut Gen<'_>) -> Vec<u8> {
    let mut f = match g.rng.random_range(0..4) {
        0 | 1 => vip_flow(g),
        2 => icmp_echo(g),
        _ => icmp_error(g),
    };
    let mac: [u8; 6] = match g.rng.random_range(0..4) {
        0 => [0xff; 6],
        1 => [0x01, 0x00, 0x5e, 0x00, 0x00, g.rng.random()],
        2 => [0x33, 0x33, 0, 0, 0, g.rng.random()],
        _ => {
            let mut m: [u8; 6] = g.rng.random();
            m[0] &= 0xfe;
            if m == LB_MAC {
                m[5] ^= 1;
            }
            m
        }
    };
    f[..6].copy_from_slice(&mac);
    f
}

fn random_bytes(g: &mut Gen<'_>) -> Vec<u8> {
    let n = g.rng.random_range(MIN_FRAME..=300);
    let mut f = g.bytes(n);
    match g.rng.random_range(0..4) {
        0 => {}
        1 => {
            // To our MAC with an IP ethertype.
            f[..6].copy_from_slice(&LB_MAC);
            let et = if g.chance(0.5) { ETH_IPV4 } else { ETH_IPV6 };
            f[12..14].copy_from_slice(&et.to_be_bytes());
        }
        _ => {
            // A plausible IP header start to a VIP address, random after.
            let dst = g.vip_addr();
            let udp = g.chance(0.3);
            let l3 = flow_packet(g, dst, 80, udp);
            let mut head = g.frame(&l3);
            let keep = g.rng.random_range(MIN_FRAME..=head.len().min(80));
            head.truncate(keep);
            let rest = n.saturating_sub(head.len());
            head.extend(g.bytes(rest));
            f = head;
        }
    }
    f
}

fn pad_min(mut f: Vec<u8>) -> Vec<u8> {
    if f.len() < MIN_FRAME {
        f.resize(MIN_FRAME, 0);
    }
    f.truncate(MAX_FRAME);
    f
}
