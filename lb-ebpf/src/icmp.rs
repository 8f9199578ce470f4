//! ICMP to a VIP address: echo requests are answered here; "packet too big"
//! errors about a VIP flow are steered to that flow's real, whose reply
//! triggered them (it needs them for path MTU discovery).

use aya_ebpf::programs::XdpContext;
use lb_common::{FAMILY_V4, FlowKey, PROTO_TCP, PROTO_UDP, VipKey};

use crate::{
    csum,
    parse::{self, L3, read_at, write_at},
};

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// ICMP header bytes before the quoted packet of an error message.
const ICMP_ERR_HDR: usize = 8;
const REPLY_TTL: u8 = 64;

/// What to do with an ICMP message to a VIP address.
pub enum IcmpAction {
    /// The packet was turned into an echo reply in place: XDP_TX.
    Echo,
    /// A too-big error about this VIP flow: forward it to the flow's real.
    Steer { vip: VipKey, flow: FlowKey },
    /// Not ours to handle: pass to the kernel.
    Pass,
    /// Cut short: drop.
    Malformed,
}

/// Handles ICMP (IPv4) or ICMPv6 (IPv6) at `l3.l4_off`.
#[inline(always)]
pub fn handle(ctx: &XdpContext, l3: &L3, l3_off: usize, iface_mac: &[u8; 6]) -> IcmpAction {
    let Some(head) = read_at::<[u8; 4]>(ctx, l3.l4_off) else {
        return IcmpAction::Malformed;
    };
    let (ty, code) = (head[0], head[1]);
    let check = u16::from_be_bytes([head[2], head[3]]);
    let v4 = l3.family == FAMILY_V4;
    if (v4 && ty == ICMP_ECHO_REQUEST && code == 0) || (!v4 && ty == ICMPV6_ECHO_REQUEST) {
        return if echo_reply(ctx, l3, l3_off, iface_mac, ty, code, check) {
            IcmpAction::Echo
        } else {
            IcmpAction::Malformed
        };
    }
    let too_big = if v4 {
        ty == ICMP_DEST_UNREACH && code == ICMP_FRAG_NEEDED
    } else {
        ty == ICMPV6_PACKET_TOO_BIG
    };
    if !too_big {
        return IcmpAction::Pass;
    }
    // The quoted packet is the real's reply: source VIP:port, destination client.
    let inner_off = l3.l4_off + ICMP_ERR_HDR;
    let inner = if v4 {
        parse::ipv4(ctx, inner_off)
    } else {
        parse::ipv6(ctx, inner_off)
    };
    let Ok(inner) = inner else {
        return IcmpAction::Malformed;
    };
    if inner.src != l3.dst || (inner.proto != PROTO_TCP && inner.proto != PROTO_UDP) {
        return IcmpAction::Pass;
    }
    let Some(ports) = read_at::<[u8; 4]>(ctx, inner.l4_off) else {
        return IcmpAction::Malformed;
    };
    IcmpAction::Steer {
        vip: VipKey {
            addr: inner.src,
            port_be: u16::from_ne_bytes([ports[0], ports[1]]),
            proto: inner.proto,
            family: l3.family,
        },
        // The flow as the client sent it: client → VIP.
        flow: FlowKey {
            src: inner.dst,
            dst: inner.src,
            ports: u32::from_be_bytes([ports[2], ports[3], ports[0], ports[1]]),
            proto: inner.proto,
            family: l3.family,
            _pad: [0; 2],
        },
    }
}

/// Turns an echo request into its reply in place.
#[inline(always)]
fn echo_reply(
    ctx: &XdpContext,
    l3: &L3,
    l3_off: usize,
    iface_mac: &[u8; 6],
    ty: u8,
    code: u8,
    check: u16,
) -> bool {
    let Some(client_mac) = read_at::<[u8; 6]>(ctx, 6) else {
        return false;
    };
    let mut ok = write_at(ctx, 0, client_mac) && write_at(ctx, 6, *iface_mac);
    let reply = if l3.family == FAMILY_V4 {
        ICMP_ECHO_REPLY
    } else {
        ICMPV6_ECHO_REPLY
    };
    // Only the type changes in the ICMP message. Swapping the addresses leaves
    // the ICMPv6 pseudo-header sum unchanged.
    let new_check = csum::replace16(
        check,
        u16::from_be_bytes([ty, code]),
        u16::from_be_bytes([reply, code]),
    );
    // Two-byte accesses throughout: LLVM turns a one-byte bounds check into a
    // form the verifier does not credit.
    ok &= write_at(ctx, l3.l4_off, [reply, code]);
    ok &= write_at(ctx, l3.l4_off + 2, new_check.to_be_bytes());
    if l3.family == FAMILY_V4 {
        let mut src = [0u8; 4];
        let mut dst = [0u8; 4];
        src.copy_from_slice(&l3.src[..4]);
        dst.copy_from_slice(&l3.dst[..4]);
        ok &= write_at(ctx, l3_off + 12, dst) && write_at(ctx, l3_off + 16, src);
        // TTL changes; the address swap does not change the header checksum.
        let Some(ttl_proto) = read_at::<[u8; 2]>(ctx, l3_off + 8) else {
            return false;
        };
        let Some(hc) = read_at::<[u8; 2]>(ctx, l3_off + 10) else {
            return false;
        };
        let hc = csum::replace16(
            u16::from_be_bytes(hc),
            u16::from_be_bytes(ttl_proto),
            u16::from_be_bytes([REPLY_TTL, ttl_proto[1]]),
        );
        ok &= write_at(ctx, l3_off + 8, [REPLY_TTL, ttl_proto[1]])
            && write_at(ctx, l3_off + 10, hc.to_be_bytes());
    } else {
        let Some(nh_hop) = read_at::<[u8; 2]>(ctx, l3_off + 6) else {
            return false;
        };
        ok &= write_at(ctx, l3_off + 6, [nh_hop[0], REPLY_TTL]);
        ok &= write_at(ctx, l3_off + 8, l3.dst) && write_at(ctx, l3_off + 24, l3.src);
    }
    ok
}
