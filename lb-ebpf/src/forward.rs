//! Forwarding modes.
//!
//! - DR: only the Ethernet addresses change (destination = the real, source =
//!   the balancer); the IP packet and any VLAN tags are untouched.
//! - TUN: an outer IPv4 (IPIP) or IPv6 (IP6IP6, 4in6) header is pushed in front
//!   of the IP packet; VLAN tags stay in front of the new header.

use aya_ebpf::{
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{Config, FAMILY_V4, FAMILY_V6, PROTO_IPIP, PROTO_IPV6, RealDef};

use crate::{
    csum,
    parse::{ETH_P_IP, ETH_P_IPV6, L2, L3, Mac, write_addr, write_at, write_mac},
};

/// Why a packet could not be forwarded.
pub enum ForwardError {
    /// The encapsulated packet would exceed the MTU.
    TooBig,
    /// IPv6 inside IPv4 is not a mode xlb offers.
    Unsupported,
    /// No tunnel source of the outer family is configured (all-zero prefix).
    NoSource,
    /// The frame carries less than the IP header's length: a cut packet.
    Cut,
    /// A helper failed (no headroom) or a write fell outside the packet.
    Failed,
}

/// Rewrites the Ethernet addresses for direct return.
#[inline(always)]
pub fn dr(ctx: &XdpContext, real_mac: &[u8; 6], iface_mac: &[u8; 6]) -> Result<(), ForwardError> {
    if write_mac(ctx, 0, Mac::of(real_mac)) && write_mac(ctx, 6, Mac::of(iface_mac)) {
        Ok(())
    } else {
        Err(ForwardError::Failed)
    }
}

const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;

/// Bytes the outer header adds for a real of this family.
#[inline(always)]
pub fn outer_len(real: &RealDef) -> usize {
    if real.family == FAMILY_V6 {
        IPV6_LEN
    } else {
        IPV4_LEN
    }
}

/// Whether [`encap`] toward `real` takes anything from the flow hash: an
/// IPv6 outer header always does (its flow label), an IPv4 one only for the
/// host bits of a tunnel source prefix (none from a single address).
#[inline(always)]
pub fn uses_hash(real: &RealDef, config: &Config) -> bool {
    real.family == FAMILY_V6 || config.tun_host_v4 != 0
}

/// Whether the configured tunnel source of the outer family is all-zero
/// (0.0.0.0 or ::): a packet must not leave from an unspecified address.
#[inline(always)]
fn no_source(config: &Config, outer_v6: bool) -> bool {
    if outer_v6 {
        let s = &config.tun_src_v6;
        let hi = u64::from_ne_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]);
        let lo = u64::from_ne_bytes([s[8], s[9], s[10], s[11], s[12], s[13], s[14], s[15]]);
        hi | lo == 0
    } else {
        u32::from_ne_bytes(config.tun_src_v4) == 0
    }
}
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
    if no_source(config, outer_v6) {
        return Err(ForwardError::NoSource);
    }
    // The tunnel carries exactly the IP packet: a frame cut short of its IP
    // length is refused, bytes past it (the padding of small Ethernet frames)
    // are trimmed.
    let carried = (ctx.data_end() - ctx.data()).saturating_sub(l2.l3_off);
    if carried < l3.len {
        return Err(ForwardError::Cut);
    }
    if carried > l3.len {
        let extra = (carried - l3.len) as i32;
        // SAFETY: shrinking the tail of the packet this program owns.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -extra) } != 0 {
            return Err(ForwardError::Failed);
        }
    }
    let outer_len = outer_len(real);
    if config.mtu != 0 && l3.len + outer_len > config.mtu as usize {
        return Err(ForwardError::TooBig);
    }
    // Keep the VLAN tags (bytes 12 .. l3_off - 2); everything before the IP
    // header is rewritten at the new start of the frame.
    // Held as one integer: a byte array is kept (and spilled) byte by byte.
    let tags: u64 = match l2.l3_off {
        18 => u64::from(crate::parse::read_at::<u32>(ctx, 12).ok_or(ForwardError::Failed)?),
        22 => crate::parse::read_at::<u64>(ctx, 12).ok_or(ForwardError::Failed)?,
        _ => 0,
    };
    // SAFETY: growing the headroom of the packet this program owns.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(outer_len as i32)) } != 0 {
        return Err(ForwardError::Failed);
    }
    let l3_off = l2.l3_off;
    let mut ok =
        write_mac(ctx, 0, Mac::of(&real.mac)) && write_mac(ctx, 6, Mac::of(&config.iface_mac));
    ok &= match l3_off {
        18 => write_at(ctx, 12, tags as u32),
        22 => write_at(ctx, 12, tags),
        _ => true,
    };
    let ethertype = if outer_v6 { ETH_P_IPV6 } else { ETH_P_IP };
    ok &= write_at(ctx, l3_off - 2, ethertype);
    // Header fields written piecewise, not as one array: the balancer's stack
    // frame must leave room for the too-big reply's (512 bytes for both).
    ok &= if outer_v6 {
        write_outer_v6(ctx, l3_off, l3, real, config, hash)
    } else {
        write_outer_v4(ctx, l3_off, l3, real, config, hash)
    };
    if ok {
        Ok(())
    } else {
        Err(ForwardError::Failed)
    }
}

#[inline(always)]
fn write_outer_v4(
    ctx: &XdpContext,
    off: usize,
    l3: &L3,
    real: &RealDef,
    config: &Config,
    hash: u32,
) -> bool {
    let src = (u32::from_be_bytes(config.tun_src_v4) | (hash & config.tun_host_v4)).to_be_bytes();
    let dst = [real.addr[0], real.addr[1], real.addr[2], real.addr[3]];
    let total = ((l3.len + IPV4_LEN) as u16).to_be_bytes();
    // DF is copied from the inner header (RFC 2003, 3.1) so path MTU discovery
    // keeps working through the tunnel.
    let frags = if l3.df { 0x40 } else { 0 };
    let head = [0x45, l3.tos, total[0], total[1], 0, 0, frags, 0];
    let ttl_proto = [TTL, PROTO_IPIP];
    let c = csum::ipv4_parts(&head, ttl_proto, src, dst).to_be_bytes();
    write_at(ctx, off, head)
        && write_at(ctx, off + 8, [TTL, PROTO_IPIP, c[0], c[1]])
        && write_at(ctx, off + 12, src)
        && write_at(ctx, off + 16, dst)
}

#[inline(always)]
fn write_outer_v6(
    ctx: &XdpContext,
    off: usize,
    l3: &L3,
    real: &RealDef,
    config: &Config,
    hash: u32,
) -> bool {
    // Version 6, traffic class copied from the inner packet, flow label from
    // the flow hash (ECMP and RSS on the path hash it).
    let label = hash & 0x000f_ffff;
    let vcf = [
        0x60 | (l3.tos >> 4),
        (l3.tos << 4) | ((label >> 16) as u8 & 0x0f),
        (label >> 8) as u8,
        label as u8,
    ];
    let payload = (l3.len as u16).to_be_bytes();
    let next = if l3.family == FAMILY_V4 {
        PROTO_IPIP
    } else {
        PROTO_IPV6
    };
    let s = &config.tun_src_v6;
    let low = (u32::from_be_bytes([s[12], s[13], s[14], s[15]]) | (hash & config.tun_host_v6))
        .to_be_bytes();
    let high = [s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]];
    let mid = [s[8], s[9], s[10], s[11]];
    write_at(ctx, off, vcf)
        && write_at(ctx, off + 4, [payload[0], payload[1], next, TTL])
        && write_at(ctx, off + 8, high)
        && write_at(ctx, off + 16, mid)
        && write_at(ctx, off + 20, low)
        && write_addr(ctx, off + 24, &real.addr)
}
