//! Test packets, built with etherparse so checksums are right by construction.
//!
//! Frames go from the client (or a router) to the balancer's MAC; each builder
//! takes the pieces a fixture names ("TCP SYN from 198.51.100.7:40000 to the
//! VIP") and returns the whole frame.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, EtherType, IpHeaders, IpNumber, Ipv4Header,
    Ipv6Extensions, Ipv6FlowLabel, Ipv6Header, PacketBuilder, VlanId,
};

/// MAC of the test client (or the upstream router).
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x07];
/// MAC of the balancer's interface (the frames' destination on the way in).
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// Optional L2 details of a test frame.
#[derive(Clone, Copy, Debug, Default)]
pub struct L2 {
    /// An 802.1Q tag with this VLAN id.
    pub vlan: Option<u16>,
}

/// The transport part of a test packet.
#[derive(Clone, Copy, Debug)]
pub enum L4<'a> {
    /// TCP with SYN (true) or ACK (false) set, and a payload.
    Tcp {
        sport: u16,
        dport: u16,
        syn: bool,
        payload: &'a [u8],
    },
    /// UDP with a payload.
    Udp {
        sport: u16,
        dport: u16,
        payload: &'a [u8],
    },
}

/// Builds a frame with the IP header `ip` and transport `l4`.
fn frame(src_mac: [u8; 6], dst_mac: [u8; 6], l2: L2, ip: IpHeaders, l4: L4<'_>) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(src_mac, dst_mac);
    let mut out = Vec::new();
    macro_rules! finish {
        ($b:expr) => {{
            let b = $b.ip(ip);
            match l4 {
                L4::Tcp {
                    sport,
                    dport,
                    syn,
                    payload,
                } => {
                    let t = b.tcp(sport, dport, 1000, 64240);
                    let t = if syn { t.syn() } else { t.ack(1) };
                    t.write(&mut out, payload).expect("building a TCP packet");
                }
                L4::Udp {
                    sport,
                    dport,
                    payload,
                } => b
                    .udp(sport, dport)
                    .write(&mut out, payload)
                    .expect("building a UDP packet"),
            }
        }};
    }
    match l2.vlan {
        Some(id) => finish!(eth.single_vlan(VlanId::try_new(id).expect("valid VLAN id"))),
        None => finish!(eth),
    }
    out
}

/// An IPv4 header as a client would send it (DF set, TTL 64).
pub fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, proto: IpNumber) -> Ipv4Header {
    Ipv4Header::new(0, 64, proto, src.octets(), dst.octets()).expect("building an IPv4 header")
}

/// An IPv6 header as a client would send it (hop limit 64).
pub fn ipv6_header(src: Ipv6Addr, dst: Ipv6Addr, proto: IpNumber) -> Ipv6Header {
    Ipv6Header {
        traffic_class: 0,
        flow_label: Ipv6FlowLabel::ZERO,
        payload_length: 0,
        next_header: proto,
        hop_limit: 64,
        source: src.octets(),
        destination: dst.octets(),
    }
}

/// A client's packet from `src` to `dst` (same family) with `l4`.
pub fn client(src: IpAddr, dst: IpAddr, l2: L2, l4: L4<'_>) -> Vec<u8> {
    let proto = match l4 {
        L4::Tcp { .. } => IpNumber::TCP,
        L4::Udp { .. } => IpNumber::UDP,
    };
    let ip = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            IpHeaders::Ipv4(ipv4_header(s, d, proto), Default::default())
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            IpHeaders::Ipv6(ipv6_header(s, d, proto), Default::default())
        }
        _ => panic!("client packet with mixed families {src} -> {dst}"),
    };
    frame(CLIENT_MAC, LB_MAC, l2, ip, l4)
}

/// A client's IPv4 packet whose header `edit` customises (options, fragment bits, TOS).
pub fn client_v4_with(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    l4: L4<'_>,
    edit: impl FnOnce(&mut Ipv4Header),
) -> Vec<u8> {
    let proto = match l4 {
        L4::Tcp { .. } => IpNumber::TCP,
        L4::Udp { .. } => IpNumber::UDP,
    };
    let mut ip = ipv4_header(src, dst, proto);
    edit(&mut ip);
    frame(
        CLIENT_MAC,
        LB_MAC,
        L2::default(),
        IpHeaders::Ipv4(ip, Default::default()),
        l4,
    )
}

/// A client's IPv6 packet with extension headers `exts`.
pub fn client_v6_with(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    l4: L4<'_>,
    edit: impl FnOnce(&mut Ipv6Header, &mut Ipv6Extensions),
) -> Vec<u8> {
    let proto = match l4 {
        L4::Tcp { .. } => IpNumber::TCP,
        L4::Udp { .. } => IpNumber::UDP,
    };
    let mut ip = ipv6_header(src, dst, proto);
    let mut exts = Ipv6Extensions::default();
    edit(&mut ip, &mut exts);
    frame(
        CLIENT_MAC,
        LB_MAC,
        L2::default(),
        IpHeaders::Ipv6(ip, exts),
        l4,
    )
}

/// A TCP segment (SYN when `syn`, else ACK) from `src` to `dst`.
pub fn tcp(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    syn: bool,
    payload: &[u8],
) -> Vec<u8> {
    client(
        src.into(),
        dst.into(),
        L2::default(),
        L4::Tcp {
            sport,
            dport,
            syn,
            payload,
        },
    )
}

/// A UDP datagram from `src` to `dst`.
pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    client(
        src.into(),
        dst.into(),
        L2::default(),
        L4::Udp {
            sport,
            dport,
            payload,
        },
    )
}

/// An ARP request for `target` from `sender`.
pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let arp = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation::REQUEST,
        &CLIENT_MAC,
        &sender.octets(),
        &[0; 6],
        &target.octets(),
    )
    .expect("building an ARP packet");
    let b = PacketBuilder::ethernet2(CLIENT_MAC, [0xff; 6]).arp(arp);
    let mut out = Vec::with_capacity(b.size());
    b.write(&mut out).expect("building an ARP frame");
    out
}

/// An ICMP echo request (or reply when `reply`) between two IPv4 hosts.
pub fn icmp_echo_v4(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    reply: bool,
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, dst_mac).ip(IpHeaders::Ipv4(
        ipv4_header(src, dst, IpNumber::ICMP),
        Default::default(),
    ));
    let b = if reply {
        b.icmpv4_echo_reply(0x1234, 7)
    } else {
        b.icmpv4_echo_request(0x1234, 7)
    };
    let mut out = Vec::new();
    b.write(&mut out, b"xlb-ping")
        .expect("building an ICMP echo");
    out
}

/// An ICMPv6 echo request (or reply when `reply`) between two IPv6 hosts.
pub fn icmp_echo_v6(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    reply: bool,
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src_mac, dst_mac).ip(IpHeaders::Ipv6(
        ipv6_header(src, dst, IpNumber::IPV6_ICMP),
        Default::default(),
    ));
    let b = if reply {
        b.icmpv6_echo_reply(0x1234, 7)
    } else {
        b.icmpv6_echo_request(0x1234, 7)
    };
    let mut out = Vec::new();
    b.write(&mut out, b"xlb-ping")
        .expect("building an ICMPv6 echo");
    out
}

/// The IP packet (no Ethernet) a real would send back to the client: quoted
/// by ICMP errors about it.
fn reply_ip(vip: IpAddr, vport: u16, client: IpAddr, cport: u16) -> Vec<u8> {
    let b = match (vip, client) {
        (IpAddr::V4(v), IpAddr::V4(c)) => PacketBuilder::ip(IpHeaders::Ipv4(
            ipv4_header(v, c, IpNumber::TCP),
            Default::default(),
        )),
        (IpAddr::V6(v), IpAddr::V6(c)) => PacketBuilder::ip(IpHeaders::Ipv6(
            ipv6_header(v, c, IpNumber::TCP),
            Default::default(),
        )),
        _ => panic!("mixed families"),
    };
    let b = b.tcp(vport, cport, 5000, 64240).ack(1001);
    let mut out = Vec::new();
    b.write(&mut out, &[0u8; 1400]).expect("building a reply");
    out
}

/// An ICMP "fragmentation needed" from router `router` to the VIP about the
/// real's reply VIP:vport → client:cport (quoting its first 28 bytes).
pub fn icmp_frag_needed(
    router: Ipv4Addr,
    vip: Ipv4Addr,
    vport: u16,
    client: Ipv4Addr,
    cport: u16,
) -> Vec<u8> {
    let quoted = reply_ip(vip.into(), vport, client.into(), cport);
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ip(IpHeaders::Ipv4(
            ipv4_header(router, vip, IpNumber::ICMP),
            Default::default(),
        ))
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        ));
    let mut out = Vec::new();
    b.write(&mut out, &quoted[..28])
        .expect("building an ICMP error");
    out
}

/// An ICMP "fragmentation needed" from `router` to `vip` quoting `quoted`
/// (an IP packet's first bytes, as the fixture needs them).
pub fn icmp_frag_needed_quoting(router: Ipv4Addr, vip: Ipv4Addr, quoted: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ip(IpHeaders::Ipv4(
            ipv4_header(router, vip, IpNumber::ICMP),
            Default::default(),
        ))
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        ));
    let mut out = Vec::new();
    b.write(&mut out, quoted).expect("building an ICMP error");
    out
}

/// An ICMP "port unreachable" from `router` to the VIP (not steered).
pub fn icmp_port_unreachable(router: Ipv4Addr, vip: Ipv4Addr, client: Ipv4Addr) -> Vec<u8> {
    let quoted = reply_ip(vip.into(), 80, client.into(), 40000);
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ip(IpHeaders::Ipv4(
            ipv4_header(router, vip, IpNumber::ICMP),
            Default::default(),
        ))
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::Port,
        ));
    let mut out = Vec::new();
    b.write(&mut out, &quoted[..28])
        .expect("building an ICMP error");
    out
}

/// An ICMPv6 "packet too big" from `router` to the VIP about the real's reply
/// VIP:vport → client:cport (quoting its first 48 bytes).
pub fn icmp6_too_big(
    router: Ipv6Addr,
    vip: Ipv6Addr,
    vport: u16,
    client: Ipv6Addr,
    cport: u16,
) -> Vec<u8> {
    let quoted = reply_ip(vip.into(), vport, client.into(), cport);
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ip(IpHeaders::Ipv6(
            ipv6_header(router, vip, IpNumber::IPV6_ICMP),
            Default::default(),
        ))
        .icmpv6(etherparse::Icmpv6Type::PacketTooBig { mtu: 1280 });
    let mut out = Vec::new();
    b.write(&mut out, &quoted[..48])
        .expect("building an ICMPv6 error");
    out
}

/// Wraps the IP packet `inner` in an outer IPv4 (protocol 4) or IPv6 header
/// (next header 4 or 41) from `src` to `dst`, as the balancer's tunnel would:
/// TTL 64, TOS/traffic class and DF copied from the inner header, IPv6 flow
/// label `flow_label`.
pub fn tunnel(
    src: IpAddr,
    dst: IpAddr,
    l2: L2,
    dst_mac: [u8; 6],
    flow_label: u32,
    inner: &[u8],
) -> Vec<u8> {
    let inner_v4 = inner[0] >> 4 == 4;
    let tos = if inner_v4 {
        inner[1]
    } else {
        (inner[0] << 4) | (inner[1] >> 4)
    };
    let df = inner_v4 && inner[6] & 0x40 != 0;
    let proto = if inner_v4 {
        IpNumber::IPV4
    } else {
        IpNumber::IPV6
    };
    let mut out = Vec::new();
    let ethertype = match src {
        IpAddr::V4(_) => EtherType::IPV4,
        IpAddr::V6(_) => EtherType::IPV6,
    };
    out.extend_from_slice(&dst_mac);
    out.extend_from_slice(&LB_MAC);
    if let Some(id) = l2.vlan {
        out.extend_from_slice(&EtherType::VLAN_TAGGED_FRAME.0.to_be_bytes());
        out.extend_from_slice(&id.to_be_bytes());
    }
    out.extend_from_slice(&ethertype.0.to_be_bytes());
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = Ipv4Header::new(inner.len() as u16, 64, proto, s.octets(), d.octets())
                .expect("outer IPv4 header");
            h.dont_fragment = df;
            h.dscp = etherparse::IpDscp::try_new(tos >> 2).expect("6 bits");
            h.ecn = etherparse::IpEcn::try_new(tos & 3).expect("2 bits");
            h.header_checksum = h.calc_header_checksum();
            out.extend_from_slice(&h.to_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let h = Ipv6Header {
                payload_length: inner.len() as u16,
                traffic_class: tos,
                flow_label: Ipv6FlowLabel::try_new(flow_label & 0xf_ffff).expect("20 bits"),
                ..ipv6_header(s, d, proto)
            };
            out.extend_from_slice(&h.to_bytes());
        }
        _ => panic!("mixed outer families"),
    }
    out.extend_from_slice(inner);
    out
}

/// Offset of the IP header in a frame (after Ethernet and one optional VLAN tag).
pub fn l3_offset(frame: &[u8]) -> usize {
    if frame[12..14] == [0x81, 0x00] {
        18
    } else {
        14
    }
}
