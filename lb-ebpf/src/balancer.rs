//! The balancer's packet path: parse, classify, pick a real, forward.
//!
//! Every packet ends in exactly one [`Verdict`], and [`run`] maps it to an XDP
//! action and a counter in one place.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    AddrKey, Config, FAMILY_V4, FAMILY_V6, FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
    VIP_F_TUNNEL, VipKey, VipMeta, flow_hash, stat,
};

use crate::{
    conntrack,
    forward::{self, ForwardError},
    icmp::{self, IcmpAction},
    maps::{CONFIG, VIP_ADDRS, VIPS},
    parse::{self, ETH_P_IP, ETH_P_IPV6, L2, L3, L3Error, read_at},
    select, stats,
};

/// How a packet's processing ended.
enum Verdict {
    /// Not for us: hand to the kernel untouched, counting `stat`.
    Pass(u32),
    /// For one of our VIP addresses but cannot be forwarded: drop, counting `stat`.
    Drop(u32),
    /// Rewritten and sent back out: XDP_TX, counting `stat`.
    Tx(u32),
    /// Something that cannot happen did (a fixed map entry missing, no headroom).
    Aborted,
}

/// Offset of the TCP data-offset/flags pair in the TCP header (read as two
/// bytes: one-byte bounds checks compile to a form the verifier rejects), and
/// the SYN / ACK bits of the second.
const TCP_FLAGS_OFF: usize = 12;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Entry point body: runs the packet path and records the verdict.
#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    let (action, stat) = match process(ctx, bytes) {
        Verdict::Pass(stat) => (xdp_action::XDP_PASS, stat),
        Verdict::Drop(stat) => (xdp_action::XDP_DROP, stat),
        Verdict::Tx(stat) => (xdp_action::XDP_TX, stat),
        Verdict::Aborted => {
            // Never on the fast path: only when a helper that cannot fail did.
            aya_log_ebpf::debug!(ctx, "xlb: aborted a {} byte frame", bytes);
            (xdp_action::XDP_ABORTED, stat::ABORTED)
        }
    };
    stats::verdict(stat, bytes);
    action
}

#[inline(always)]
fn process(ctx: &XdpContext, bytes: u64) -> Verdict {
    let Some(l2) = parse::l2(ctx) else {
        return Verdict::Pass(stat::PASS_MALFORMED);
    };
    let l3 = match l2.ethertype {
        ETH_P_IP => parse::ipv4(ctx, l2.l3_off),
        ETH_P_IPV6 => parse::ipv6(ctx, l2.l3_off),
        _ => return Verdict::Pass(stat::PASS_NOT_IP),
    };
    let l3 = match l3 {
        Ok(l3) => l3,
        // Either way we cannot tell what it is: the kernel decides.
        Err(L3Error::Malformed | L3Error::Unsupported) => {
            return Verdict::Pass(stat::PASS_MALFORMED);
        }
    };
    // The common case first: a whole TCP/UDP header, not a fragment. One
    // lookup of the full service key decides; nothing else is needed for a
    // packet that is not ours.
    let transport = l3.proto == PROTO_TCP || l3.proto == PROTO_UDP;
    if transport
        && !l3.fragment
        && let Some(ports) = transport_ports(ctx, l3.l4_off, l3.proto == PROTO_TCP)
    {
        let vip = VipKey {
            addr: l3.dst,
            port_be: u16::from_ne_bytes([ports[2], ports[3]]),
            proto: l3.proto,
            family: l3.family,
        };
        // SAFETY: a lookup in a map only this program and the daemon touch.
        let Some(meta) = (unsafe { VIPS.get(&vip) }) else {
            return Verdict::Pass(stat::PASS_NOT_VIP);
        };
        let Some(config) = CONFIG.get(0) else {
            return Verdict::Aborted;
        };
        return service(ctx, &l2, &l3, meta, ports, config, bytes);
    }
    // Everything else is ours only when its address carries a VIP.
    let addr_key = AddrKey {
        addr: l3.dst,
        family: l3.family,
        _pad: [0; 3],
    };
    // SAFETY: as above.
    if unsafe { VIP_ADDRS.get(&addr_key) }.is_none() {
        return Verdict::Pass(stat::PASS_NOT_VIP);
    }
    if l3.fragment {
        return Verdict::Drop(stat::DROP_FRAGMENT);
    }
    if transport {
        // To a VIP address, but the transport header is cut short.
        return Verdict::Drop(stat::DROP_MALFORMED);
    }
    let Some(config) = CONFIG.get(0) else {
        return Verdict::Aborted;
    };
    match l3.proto {
        PROTO_ICMP if l3.family == FAMILY_V4 => icmp(ctx, &l2, &l3, config, bytes),
        PROTO_ICMPV6 if l3.family == FAMILY_V6 => icmp(ctx, &l2, &l3, config, bytes),
        _ => Verdict::Pass(stat::PASS_NOT_VIP),
    }
}

/// The source and destination port bytes when the whole fixed transport
/// header (20 bytes TCP, 8 UDP) is in the packet.
#[inline(always)]
fn transport_ports(ctx: &XdpContext, l4_off: usize, tcp: bool) -> Option<[u8; 4]> {
    let complete = if tcp {
        read_at::<[u8; 20]>(ctx, l4_off).is_some()
    } else {
        read_at::<[u8; 8]>(ctx, l4_off).is_some()
    };
    if !complete {
        return None;
    }
    read_at::<[u8; 4]>(ctx, l4_off)
}

/// TCP or UDP to a configured service.
#[inline(always)]
fn service(
    ctx: &XdpContext,
    l2: &L2,
    l3: &L3,
    meta: &VipMeta,
    ports: [u8; 4],
    config: &Config,
    bytes: u64,
) -> Verdict {
    let syn = l3.proto == PROTO_TCP
        && read_at::<[u8; 2]>(ctx, l3.l4_off + TCP_FLAGS_OFF)
            .is_some_and(|f| f[1] & (TCP_SYN | TCP_ACK) == TCP_SYN);
    let flow = FlowKey {
        src: l3.src,
        dst: l3.dst,
        ports: u32::from_be_bytes(ports),
        proto: l3.proto,
        family: l3.family,
        _pad: [0; 2],
    };
    let Some(choice) = conntrack::choose(meta, &flow, syn, true, config) else {
        return Verdict::Drop(stat::DROP_NO_REAL);
    };
    send(
        ctx,
        l2,
        l3,
        meta,
        &flow,
        choice.real_id,
        config,
        bytes,
        choice.new_flow,
        None,
    )
}

/// ICMP / ICMPv6 to a VIP address.
#[inline(always)]
fn icmp(ctx: &XdpContext, l2: &L2, l3: &L3, config: &Config, bytes: u64) -> Verdict {
    match icmp::handle(ctx, l3, l2.l3_off, &config.iface_mac) {
        IcmpAction::Echo => Verdict::Tx(stat::TX_ICMP_ECHO),
        IcmpAction::Pass => Verdict::Pass(stat::PASS_ICMP),
        IcmpAction::Malformed => Verdict::Drop(stat::DROP_MALFORMED),
        IcmpAction::Steer { vip, flow } => {
            // SAFETY: as above.
            let Some(meta) = (unsafe { VIPS.get(&vip) }) else {
                return Verdict::Pass(stat::PASS_ICMP);
            };
            // Never create a flow for an error message: look up, else Maglev.
            let Some(choice) = conntrack::choose(meta, &flow, false, false, config) else {
                return Verdict::Drop(stat::DROP_NO_REAL);
            };
            send(
                ctx,
                l2,
                l3,
                meta,
                &flow,
                choice.real_id,
                config,
                bytes,
                false,
                Some(stat::TX_ICMP_TOO_BIG),
            )
        }
    }
}

/// Forwards the packet to real `real_id` in the VIP's mode and counts it.
#[expect(
    clippy::too_many_arguments,
    reason = "all inlined into one BPF function"
)]
#[inline(always)]
fn send(
    ctx: &XdpContext,
    l2: &L2,
    l3: &L3,
    meta: &VipMeta,
    flow: &FlowKey,
    real_id: u32,
    config: &Config,
    bytes: u64,
    new_flow: bool,
    stat_override: Option<u32>,
) -> Verdict {
    let Some(real) = select::real(real_id) else {
        return Verdict::Drop(stat::DROP_NO_REAL);
    };
    let result = if meta.flags & VIP_F_TUNNEL == 0 {
        forward::dr(ctx, &real.mac, &config.iface_mac).map(|()| stat::TX_DR)
    } else {
        // The outer source spreads by the 5-tuple even for maglev-src VIPs.
        let spread = flow_hash(&flow.src, &flow.dst, flow.ports, flow.proto);
        forward::encap(ctx, l2, l3, real, config, spread).map(|()| stat::TX_TUN)
    };
    match result {
        Ok(tx) => {
            stats::forwarded(meta.vip_id, real_id, bytes, new_flow);
            Verdict::Tx(stat_override.unwrap_or(tx))
        }
        Err(ForwardError::TooBig) => Verdict::Drop(stat::DROP_TOO_BIG),
        Err(ForwardError::Unsupported) => Verdict::Drop(stat::DROP_UNSUPPORTED),
        Err(ForwardError::Failed) => Verdict::Aborted,
    }
}
