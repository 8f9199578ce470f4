//! Forwarding modes.
//!
//! - DR: only the Ethernet addresses change (destination = the real, source =
//!   the balancer); the IP packet and any VLAN tags are untouched.
//! - TUN: an outer IPv4 (IPIP) or IPv6 (IP6IP6, 4in6) header is pushed in front
//!   of the IP packet; VLAN tags stay in front of the new header.

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{Config, FAMILY_V4, FAMILY_V6, PROTO_IPIP, PROTO_IPV6, RealDef};

use crate::{
    csum,
    parse::{ETH_P_IP, ETH_P_IPV6, L2, L3, write_at},
};

/// Why a packet could not be forwarded.
pub enum ForwardError {
    /// The encapsulated packet would exceed the MTU.
    TooBig,
    /// IPv6 inside IPv4 is not a mode xlb offers.
    Unsupported,
    /// A helper failed (no headroom) or a write fell outside the packet.
    Failed,
}

/// Rewrites the Ethernet addresses for direct return.
#[inline(always)]
pub fn dr(ctx: &XdpContext, real_mac: &[u8; 6], iface_mac: &[u8; 6]) -> Result<(), ForwardError> {
    if write_at(ctx, 0, *real_mac) && write_at(ctx, 6, *iface_mac) {
        Ok(())
    } else {
        Err(ForwardError::Failed)
    }
}

const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const TTL: u8 = 64;

/// Encapsulates the IP packet described by `l3` toward `real`.
///
/// The outer source is taken from the configured prefix with its host bits
/// from the flow hash, so a receiver that spreads flows over its queues by
/// outer addresses (RSS) sees different flows as different sources.
#[inline(always)]
pub fn encap(
    ctx: &XdpContext,
    l2: &L2,
    l3: &L3,
    real: &RealDef,
    config: &Config,
    hash: u32,
) -> Result<(), ForwardError> {
    let outer_v6 = real.family == FAMILY_V6;
    if !outer_v6 && l3.family != FAMILY_V4 {
        return Err(ForwardError::Unsupported);
    }
    let outer_len = if outer_v6 { IPV6_LEN } else { IPV4_LEN };
    if config.mtu != 0 && l3.len + outer_len > config.mtu as usize {
        return Err(ForwardError::TooBig);
    }
    // Keep the VLAN tags (bytes 12 .. l3_off - 2); everything before the IP
    // header is rewritten at the new start of the frame.
    let tags: [u8; 8] = match l2.l3_off {
        18 => {
            let t: [u8; 4] = crate::parse::read_at(ctx, 12).ok_or(ForwardError::Failed)?;
            [t[0], t[1], t[2], t[3], 0, 0, 0, 0]
        }
        22 => crate::parse::read_at(ctx, 12).ok_or(ForwardError::Failed)?,
        _ => [0; 8],
    };
    // SAFETY: growing the headroom of the packet this program owns.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(outer_len as i32)) } != 0 {
        return Err(ForwardError::Failed);
    }
    let l3_off = l2.l3_off;
    let mut ok = write_at(ctx, 0, real.mac) && write_at(ctx, 6, config.iface_mac);
    ok &= match l3_off {
        18 => write_at(ctx, 12, [tags[0], tags[1], tags[2], tags[3]]),
        22 => write_at(ctx, 12, tags),
        _ => true,
    };
    let ethertype = if outer_v6 { ETH_P_IPV6 } else { ETH_P_IP };
    ok &= write_at(ctx, l3_off - 2, ethertype);
    if outer_v6 {
        ok &= write_at(ctx, l3_off, outer_v6_header(l3, real, config, hash));
    } else {
        ok &= write_at(ctx, l3_off, outer_v4_header(l3, real, config, hash));
    }
    if ok {
        Ok(())
    } else {
        Err(ForwardError::Failed)
    }
}

#[inline(always)]
fn outer_v4_header(l3: &L3, real: &RealDef, config: &Config, hash: u32) -> [u8; 20] {
    let src = (u32::from_be_bytes(config.tun_src_v4) | (hash & config.tun_host_v4)).to_be_bytes();
    let total = ((l3.len + IPV4_LEN) as u16).to_be_bytes();
    // DF is copied from the inner header (RFC 2003, 3.1) so path MTU discovery
    // keeps working through the tunnel.
    let frags = if l3.df { 0x40 } else { 0 };
    let mut h = [
        0x45,
        l3.tos,
        total[0],
        total[1],
        0,
        0,
        frags,
        0,
        TTL,
        PROTO_IPIP,
        0,
        0,
        src[0],
        src[1],
        src[2],
        src[3],
        real.addr[0],
        real.addr[1],
        real.addr[2],
        real.addr[3],
    ];
    let c = csum::ipv4_header(&h).to_be_bytes();
    h[10] = c[0];
    h[11] = c[1];
    h
}

#[inline(always)]
fn outer_v6_header(l3: &L3, real: &RealDef, config: &Config, hash: u32) -> [u8; 40] {
    let mut h = [0u8; 40];
    // Version 6, traffic class copied from the inner packet, flow label from
    // the flow hash (ECMP and RSS on the path hash it).
    let label = hash & 0x000f_ffff;
    h[0] = 0x60 | (l3.tos >> 4);
    h[1] = (l3.tos << 4) | ((label >> 16) as u8 & 0x0f);
    h[2] = (label >> 8) as u8;
    h[3] = label as u8;
    let payload = (l3.len as u16).to_be_bytes();
    h[4] = payload[0];
    h[5] = payload[1];
    h[6] = if l3.family == FAMILY_V4 {
        PROTO_IPIP
    } else {
        PROTO_IPV6
    };
    h[7] = TTL;
    let mut i = 0;
    while i < 12 {
        h[8 + i] = config.tun_src_v6[i];
        i += 1;
    }
    let low = u32::from_be_bytes([
        config.tun_src_v6[12],
        config.tun_src_v6[13],
        config.tun_src_v6[14],
        config.tun_src_v6[15],
    ]) | (hash & config.tun_host_v6);
    let low = low.to_be_bytes();
    h[20] = low[0];
    h[21] = low[1];
    h[22] = low[2];
    h[23] = low[3];
    i = 0;
    while i < 16 {
        h[24 + i] = real.addr[i];
        i += 1;
    }
    h
}
