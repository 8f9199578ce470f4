//! The balancer's packet path: parse, classify, pick a real, forward.
//!
//! Every packet ends in exactly one [`Verdict`], and [`run`] maps it to an XDP
//! action and a counter in one place.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    AddrKey, Config, FAMILY_V4, FAMILY_V6, FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
    RealDef, VIP_F_TUNNEL, VipKey, VipMeta, WINDOW_ICMP_TOO_BIG, stat,
};

use crate::{
    conntrack::{self, Choice, Track},
    forward::{self, ForwardError},
    icmp::{self, IcmpAction},
    maps::{CONFIG, VIP_ADDRS, maybe_vip, vip_meta},
    parse::{self, Addr, Aligned, ETH_P_IP, ETH_P_IPV6, L2, L3, Mac, ptr_at, read_at},
    stats,
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

/// Offset of the TCP data-offset/flags pair in the TCP header.
const TCP_FLAGS_OFF: usize = 12;

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
    // The settings first: to the compiler the lookup is a call (the verifier
    // inlines it), so nothing read from the packet is kept across it.
    let Some(config) = CONFIG.get(0) else {
        return Verdict::Aborted;
    };
    let Some((l2, to)) = parse::l2(ctx) else {
        return Verdict::Pass(stat::PASS_MALFORMED);
    };
    if l2.ethertype != ETH_P_IP && l2.ethertype != ETH_P_IPV6 {
        return Verdict::Pass(stat::PASS_NOT_IP);
    }
    // Only frames sent to us: a promiscuous NIC or a flooding switch hands us
    // frames for other stations, and broadcast/multicast is nobody's service.
    if to != Mac::of(&config.iface_mac) {
        return Verdict::Pass(stat::PASS_NOT_OUR_MAC);
    }
    // The VIP filter runs on what each family's header says before the rest
    // of it is read: most packets that are not for a service stop here.
    let l3 = if l2.ethertype == ETH_P_IP {
        let Ok(ip) = parse::ipv4_header(ctx, l2.l3_off) else {
            return Verdict::Pass(stat::PASS_MALFORMED);
        };
        if let Some(verdict) = screen(ctx, &ip.dst(), ip.proto(), ip.l4_off(), ip.later_fragment())
        {
            return verdict;
        }
        ip.l3()
    } else {
        // Either error: we cannot tell what it is, the kernel decides.
        let Ok(ip) = parse::ipv6_header(ctx, l2.l3_off) else {
            return Verdict::Pass(stat::PASS_MALFORMED);
        };
        if let Some(verdict) = screen(
            ctx,
            &ip.dst(),
            ip.walk.proto,
            ip.walk.l4_off,
            ip.walk.later_fragment,
        ) {
            return verdict;
        }
        ip.l3()
    };
    // TCP/UDP with its ports (not a later fragment): one lookup of the full
    // service key decides, and only a service's packets are ever dropped.
    if (l3.proto == PROTO_TCP || l3.proto == PROTO_UDP) && !l3.later_fragment {
        // screen() read them already.
        let Some(ports) = read_at::<[u8; 4]>(ctx, l3.l4_off) else {
            return Verdict::Pass(stat::PASS_MALFORMED);
        };
        let vip = Aligned(VipKey {
            addr: l3.dst.0,
            port_be: u16::from_ne_bytes([ports[2], ports[3]]),
            proto: l3.proto,
            family: l3.family,
        });
        let Some(meta) = vip_meta(&vip) else {
            return Verdict::Pass(stat::PASS_NOT_VIP);
        };
        // A service's first fragment: the later ones cannot follow it.
        if l3.fragment {
            return Verdict::Drop(stat::DROP_FRAGMENT);
        }
        let Some(tcp_flags) = whole_transport_header(ctx, l3.l4_off, l3.proto == PROTO_TCP) else {
            return Verdict::Drop(stat::DROP_MALFORMED);
        };
        return service(ctx, &l2, &l3, &meta.0, ports, tcp_flags, config, bytes);
    }
    // Everything else is ours only when its address carries a VIP.
    let addr_key = addr_key(&l3.dst, l3.family);
    // SAFETY: a lookup in a map only this program and the daemon touch.
    if unsafe { VIP_ADDRS.get(&addr_key.0) }.is_none() {
        return Verdict::Pass(stat::PASS_NOT_VIP);
    }
    // Later fragments carry no ports, so they cannot be told from the host's
    // own traffic to this address (e.g. fragmented DNS answers): the kernel
    // gets them. A service's datagram never reassembles there, because its
    // first fragment was dropped above; the kernel's reassembly timeout and
    // memory limit clean up.
    if l3.fragment {
        return Verdict::Pass(stat::PASS_FRAGMENT);
    }
    match l3.proto {
        PROTO_ICMP if l3.family == FAMILY_V4 => icmp(ctx, &l2, &l3, config, bytes),
        PROTO_ICMPV6 if l3.family == FAMILY_V6 => icmp(ctx, &l2, &l3, config, bytes),
        _ => Verdict::Pass(stat::PASS_NOT_VIP),
    }
}

/// The VIP filter's first look at a packet, from its destination, transport
/// protocol and ports (TCP/UDP that is not a later fragment) or its
/// destination alone (anything else): `Some` ends the packet here (not for a
/// VIP, or its ports cut off), `None` means it may be for one and the VIP maps
/// decide. Called in each family's branch, so that a packet that stops here
/// never builds the whole [`L3`].
#[inline(always)]
fn screen(
    ctx: &XdpContext,
    dst: &Addr,
    proto: u8,
    l4_off: usize,
    later_fragment: bool,
) -> Option<Verdict> {
    let (port_be, key_proto) = if (proto == PROTO_TCP || proto == PROTO_UDP) && !later_fragment {
        // Ports cut off: we cannot tell whose it is; the kernel drops what is broken.
        let Some(ports) = read_at::<[u8; 4]>(ctx, l4_off) else {
            return Some(Verdict::Pass(stat::PASS_MALFORMED));
        };
        (u16::from_ne_bytes([ports[2], ports[3]]), proto)
    } else {
        (0, 0)
    };
    (!maybe_vip(dst, port_be, key_proto)).then_some(Verdict::Pass(stat::PASS_NOT_VIP))
}

/// The key of `XLB_VIP_ADDRS`, built from words: a zeroed `_pad` of three
/// bytes is a `memset` call in BPF.
#[inline(always)]
fn addr_key(addr: &Addr, family: u8) -> Aligned<AddrKey> {
    let [hi, lo] = addr.words();
    let tail = u64::from_ne_bytes([family, 0, 0, 0, 0, 0, 0, 0]);
    // SAFETY: AddrKey is 20 bytes of plain integers (size asserted in
    // lb-common), the address then the family and three zero bytes; its
    // 8-aligned holder is 24 bytes, the last 4 padding.
    unsafe { core::mem::transmute::<[u64; 3], Aligned<AddrKey>>([hi, lo, tail]) }
}

/// `Some(flags)` when the whole fixed transport header (20 bytes TCP, 8 UDP)
/// is in the packet: the TCP flags (0 for UDP).
#[inline(always)]
fn whole_transport_header(ctx: &XdpContext, l4_off: usize, tcp: bool) -> Option<u8> {
    if tcp {
        let h = ptr_at::<[u8; 20]>(ctx, l4_off)?;
        // SAFETY: ptr_at checked the 20 bytes; the flags are read through the
        // checked pointer (a separately computed one is not credited).
        Some(unsafe { (*h)[TCP_FLAGS_OFF + 1] })
    } else {
        ptr_at::<[u8; 8]>(ctx, l4_off).map(|_| 0)
    }
}

/// TCP or UDP to a configured service.
#[expect(
    clippy::too_many_arguments,
    reason = "all inlined into one BPF function"
)]
#[inline(always)]
fn service(
    ctx: &XdpContext,
    l2: &L2,
    l3: &L3,
    meta: &VipMeta,
    ports: [u8; 4],
    tcp_flags: u8,
    config: &Config,
    bytes: u64,
) -> Verdict {
    let flow = Aligned(FlowKey {
        src: l3.src.0,
        dst: l3.dst.0,
        ports: u32::from_be_bytes(ports),
        proto: l3.proto,
        family: l3.family,
        _pad: [0; 2],
    });
    let Some(choice) = conntrack::choose(meta, &flow, tcp_flags, Track::Packet, config) else {
        return Verdict::Drop(stat::DROP_NO_REAL);
    };
    send(ctx, l2, l3, meta, &choice, config, bytes, None)
}

/// ICMP / ICMPv6 to a VIP address.
#[inline(always)]
fn icmp(ctx: &XdpContext, l2: &L2, l3: &L3, config: &Config, bytes: u64) -> Verdict {
    match icmp::handle(ctx, l3, l2, Mac::of(&config.iface_mac)) {
        IcmpAction::Echo => Verdict::Tx(stat::TX_ICMP_ECHO),
        IcmpAction::Pass => Verdict::Pass(stat::PASS_ICMP),
        IcmpAction::Malformed => Verdict::Drop(stat::DROP_MALFORMED),
        IcmpAction::Failed => Verdict::Aborted,
        IcmpAction::Steer { vip, flow } => {
            let Some(meta) = vip_meta(&vip) else {
                return Verdict::Pass(stat::PASS_ICMP);
            };
            let meta = &meta.0;
            // An error message is no packet of the flow: look up, else Maglev;
            // no new entry, no refresh, no conntrack events.
            let Some(choice) = conntrack::choose(meta, &flow, 0, Track::ErrorAbout, config) else {
                return Verdict::Drop(stat::DROP_NO_REAL);
            };
            send(
                ctx,
                l2,
                l3,
                meta,
                &choice,
                config,
                bytes,
                Some(stat::TX_ICMP_TOO_BIG),
            )
        }
    }
}

/// Forwards the packet to the chosen real in the VIP's mode and counts it.
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
    choice: &Choice,
    config: &Config,
    bytes: u64,
    stat_override: Option<u32>,
) -> Verdict {
    let real = choice.real;
    let result = if meta.flags & VIP_F_TUNNEL == 0 {
        forward::dr(ctx, &real.mac, &config.iface_mac).map(|()| stat::TX_DR)
    } else {
        // The outer source spreads by the 5-tuple even for maglev-src VIPs
        // (conntrack computes the flow hash for a tunnel VIP's hit too,
        // unless the outer header has no use for it).
        forward::encap(ctx, l2, l3, real, config, choice.hash).map(|()| stat::TX_TUN)
    };
    match result {
        Ok(tx) => {
            stats::forwarded(meta.vip_id, choice.real_id, bytes, choice.new_flow);
            Verdict::Tx(stat_override.unwrap_or(tx))
        }
        // Never an ICMP error about an ICMP error (RFC 1122 3.2.2, RFC 4443 2.4).
        Err(ForwardError::TooBig) if stat_override.is_some() => Verdict::Drop(stat::DROP_TOO_BIG),
        Err(ForwardError::TooBig) => too_big(ctx, l2, l3, real, config),
        Err(ForwardError::Unsupported) => Verdict::Drop(stat::DROP_UNSUPPORTED),
        Err(ForwardError::NoSource) => Verdict::Drop(stat::DROP_NO_TUNNEL_SOURCE),
        Err(ForwardError::Cut) => Verdict::Drop(stat::DROP_MALFORMED),
        Err(ForwardError::Failed) => Verdict::Aborted,
    }
}

/// A packet too big to encapsulate: tell the client the size that fits
/// (ICMP fragmentation needed / ICMPv6 packet too big from the VIP), within
/// the per-CPU reply limit; drop it either way.
#[inline(always)]
fn too_big(ctx: &XdpContext, l2: &L2, l3: &L3, real: &RealDef, config: &Config) -> Verdict {
    if config.icmp_too_big_limit == 0
        || !stats::admit(WINDOW_ICMP_TOO_BIG, config.icmp_too_big_limit)
    {
        return Verdict::Drop(stat::DROP_TOO_BIG);
    }
    let mtu = config.mtu.saturating_sub(forward::outer_len(real) as u32);
    if icmp::too_big_reply(ctx, l2, l3, &config.iface_mac, mtu) {
        Verdict::Tx(stat::TX_ICMP_TOO_BIG_REPLY)
    } else {
        Verdict::Aborted
    }
}
