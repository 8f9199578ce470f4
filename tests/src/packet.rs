//! Test packets, built with etherparse so checksums are right by construction.

use std::net::Ipv4Addr;

use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, EtherType, IpNumber, Ipv4Header, PacketBuilder,
};

/// MAC of the test client.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x07];
/// MAC of the balancer's interface (the frames' destination on the way in).
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// A TCP segment with the given flags set by `syn`.
pub fn tcp(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    syn: bool,
    payload: &[u8],
) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(src.octets(), dst.octets(), 64)
        .tcp(sport, dport, 1000, 64240);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("building a TCP packet");
    out
}

/// A UDP datagram.
pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(sport, dport);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("building a UDP packet");
    out
}

/// A TCP segment whose IPv4 header is customised by `edit` (options, fragment bits).
pub fn tcp_with_ip(
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    edit: impl FnOnce(&mut Ipv4Header),
) -> Vec<u8> {
    let mut ip = Ipv4Header::new(0, 64, IpNumber::TCP, src.octets(), dst.octets())
        .expect("building an IPv4 header");
    edit(&mut ip);
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
        .tcp(sport, dport, 1000, 64240)
        .syn();
    let mut out = Vec::with_capacity(b.size(0));
    b.write(&mut out, &[]).expect("building a TCP packet");
    out
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

/// An IPv6 UDP datagram.
pub fn udp6(src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv6(src, dst, 64)
        .udp(sport, dport);
    let mut out = Vec::with_capacity(b.size(4));
    b.write(&mut out, b"ping").expect("building an IPv6 packet");
    out
}
