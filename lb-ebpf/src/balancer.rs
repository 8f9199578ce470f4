//! The balancer's packet path: parse, classify, pick a real, forward.
//!
//! Every packet ends in exactly one [`Verdict`], and [`run`] maps it to an XDP
//! action and a counter in one place.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{FAMILY_V4, PROTO_TCP, PROTO_UDP, VipAddrKey, VipKey, stat};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    forward,
    maps::{CONFIG, VIP_ADDRS, VIPS},
    parse::{ptr_at, read_at},
    select::{self, Flow},
    stats,
};

/// Ethertype of IPv4, as the two wire bytes read into a u16.
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// IPv4 "more fragments" flag and fragment offset bits, host order.
const IPV4_MF_OR_OFFSET: u16 = 0x3fff;

/// How a packet's processing ended.
enum Verdict {
    /// Not for us: hand to the kernel untouched, counting `stat`.
    Pass(u32),
    /// For one of our VIPs but cannot be forwarded: drop, counting `stat`.
    Drop(u32),
    /// Rewritten toward a real server: XDP_TX.
    Tx,
    /// Something that cannot happen did (a fixed map entry missing).
    Aborted,
}

/// Entry point body: runs the packet path and records the verdict.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let (action, stat) = match process(ctx, bytes) {
        Verdict::Pass(stat) => (xdp_action::XDP_PASS, stat),
        Verdict::Drop(stat) => (xdp_action::XDP_DROP, stat),
        Verdict::Tx => (xdp_action::XDP_TX, stat::TX),
        Verdict::Aborted => (xdp_action::XDP_ABORTED, stat::ABORTED),
    };
    stats::verdict(stat, bytes);
    action
}

#[inline(always)]
fn process(ctx: &XdpContext, bytes: u64) -> Verdict {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Verdict::Pass(stat::PASS_MALFORMED);
    };
    // SAFETY: ptr_at checked the Ethernet header is inside the packet.
    if unsafe { (*eth).ether_type } != ETH_P_IP_BE {
        return Verdict::Pass(stat::PASS_NOT_IP);
    }
    process_v4(ctx, eth, bytes)
}

#[inline(always)]
fn process_v4(ctx: &XdpContext, eth: *mut EthHdr, bytes: u64) -> Verdict {
    let Some(ip) = read_at::<Ipv4Hdr>(ctx, EthHdr::LEN) else {
        return Verdict::Pass(stat::PASS_MALFORMED);
    };
    // Header length in bytes; the mask keeps the verifier's bound at 60.
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Verdict::Pass(stat::PASS_MALFORMED);
    }

    let mut dst = [0u8; 16];
    dst[..4].copy_from_slice(&ip.dst_addr);
    let addr_key = VipAddrKey {
        addr: dst,
        family: FAMILY_V4,
        _pad: [0; 3],
    };
    // SAFETY: a lookup in a map only this program and the daemon touch.
    if unsafe { VIP_ADDRS.get(&addr_key) }.is_none() {
        return Verdict::Pass(stat::PASS_NOT_VIP);
    }
    // From here the packet is addressed to one of our VIP addresses.
    if u16::from_be_bytes(ip.frags) & IPV4_MF_OR_OFFSET != 0 {
        return Verdict::Drop(stat::DROP_FRAGMENT);
    }
    if ip.proto != PROTO_TCP && ip.proto != PROTO_UDP {
        // ICMP and other protocols to a VIP address are the kernel's business.
        return Verdict::Pass(stat::PASS_NOT_VIP);
    }
    // TCP and UDP both start with source and destination port; read both at once
    // but require the whole fixed header of the protocol to be present.
    let l4 = EthHdr::LEN + ihl;
    let l4_len = if ip.proto == PROTO_TCP { 20 } else { 8 };
    if ptr_at::<[u8; 8]>(ctx, l4).is_none()
        || (l4_len == 20 && ptr_at::<[u8; 20]>(ctx, l4).is_none())
    {
        return Verdict::Drop(stat::DROP_MALFORMED);
    }
    let Some(ports) = read_at::<[u8; 4]>(ctx, l4) else {
        return Verdict::Drop(stat::DROP_MALFORMED);
    };

    let key = VipKey {
        addr: dst,
        port_be: u16::from_ne_bytes([ports[2], ports[3]]),
        proto: ip.proto,
        family: FAMILY_V4,
    };
    // SAFETY: as above.
    let Some(meta) = (unsafe { VIPS.get(&key) }) else {
        return Verdict::Pass(stat::PASS_NOT_VIP);
    };

    let mut src = [0u8; 16];
    src[..4].copy_from_slice(&ip.src_addr);
    let flow = Flow {
        src,
        dst,
        ports: u32::from_be_bytes(ports),
        proto: ip.proto,
    };
    let Some((real_id, real)) = select::pick(meta, &flow) else {
        return Verdict::Drop(stat::DROP_NO_REAL);
    };
    let Some(config) = CONFIG.get(0) else {
        return Verdict::Aborted;
    };
    forward::dr_rewrite(eth, &real.mac, &config.iface_mac);
    stats::forwarded(meta.vip_id, real_id, bytes);
    Verdict::Tx
}
