//! ICMP to a VIP address and ICMP the balancer sends.
//!
//! - Echo requests are answered here.
//! - "Packet too big" errors about a VIP flow are steered to that flow's real,
//!   whose reply triggered them (it needs them for path MTU discovery).
//! - A client packet too big to encapsulate is answered with "fragmentation
//!   needed" / "packet too big" from the VIP ([`too_big_reply`]), so the
//!   client's path MTU discovery works through the tunnel.

use aya_ebpf::{
    helpers::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{FAMILY_V4, FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, VipKey};

use crate::{
    csum,
    parse::{
        self, Addr, Aligned, ETH_P_IP, ETH_P_IPV6, L2, L3, Mac, ptr_at, read_at, read_mac,
        write_at, write_mac,
    },
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
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
/// Most bytes of the offending packet an ICMP error quotes: IPv4, the whole
/// error within 576 bytes (RFC 1812 4.3.2.3; RFC 792's minimum is the header
/// and 8 bytes); ICMPv6, as much as fits in the minimum MTU of 1280 (RFC 4443
/// 2.4 (c)).
const QUOTE_MAX_V4: usize = 576 - IPV4_LEN - ICMP_ERR_HDR;
const QUOTE_MAX_V6: usize = 1280 - IPV6_LEN - ICMP_ERR_HDR;
/// The quote is summed in chunks of this many bytes (one helper call each),
/// then 4 bytes at a time.
const CHUNK: usize = 64;
const MAX_CHUNKS: usize = QUOTE_MAX_V6 / CHUNK + 1;

/// What to do with an ICMP message to a VIP address.
pub enum IcmpAction {
    /// The packet was turned into an echo reply in place: XDP_TX.
    Echo,
    /// A too-big error about this VIP flow: forward it to the flow's real.
    Steer {
        vip: Aligned<VipKey>,
        flow: Aligned<FlowKey>,
    },
    /// Not ours to handle: pass to the kernel.
    Pass,
    /// Cut short: drop.
    Malformed,
    /// A helper that cannot fail did (adjust_head): abort.
    Failed,
}

/// Handles ICMP (IPv4) or ICMPv6 (IPv6) at `l3.l4_off`.
#[inline(always)]
pub fn handle(ctx: &XdpContext, l3: &L3, l2: &L2, iface_mac: Mac) -> IcmpAction {
    let Some(head) = read_at::<[u8; 4]>(ctx, l3.l4_off) else {
        return IcmpAction::Malformed;
    };
    let (ty, code) = (head[0], head[1]);
    let check = u16::from_be_bytes([head[2], head[3]]);
    let v4 = l3.family == FAMILY_V4;
    if (v4 && ty == ICMP_ECHO_REQUEST && code == 0) || (!v4 && ty == ICMPV6_ECHO_REQUEST) {
        return echo_reply(ctx, l3, l2, iface_mac, ty, code, check);
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
    // A quoted later fragment has no transport header: what sits there is
    // payload, not ports. Not steerable; the kernel decides.
    if inner.later_fragment {
        return IcmpAction::Pass;
    }
    let Some(ports) = read_at::<[u8; 4]>(ctx, inner.l4_off) else {
        return IcmpAction::Malformed;
    };
    IcmpAction::Steer {
        vip: Aligned(VipKey {
            addr: inner.src.0,
            port_be: u16::from_ne_bytes([ports[0], ports[1]]),
            proto: inner.proto,
            family: l3.family,
        }),
        // The flow as the client sent it: client → VIP.
        flow: Aligned(FlowKey {
            src: inner.dst.0,
            dst: inner.src.0,
            ports: u32::from_be_bytes([ports[2], ports[3], ports[0], ports[1]]),
            proto: inner.proto,
            family: l3.family,
            _pad: [0; 2],
        }),
    }
}

/// The VLAN tags between the MACs and the ethertype (bytes 12 .. l3_off - 2),
/// saved before the front of the frame moves: wire bytes in one word (a
/// byte array is kept on the stack byte by byte).
#[inline(always)]
fn read_tags(ctx: &XdpContext, l2: &L2) -> Option<u64> {
    match l2.l3_off {
        18 => read_at::<u32>(ctx, 12).map(u64::from),
        22 => read_at(ctx, 12),
        _ => Some(0),
    }
}

/// Writes the Ethernet header (MACs, saved tags, ethertype) at the frame start.
#[inline(always)]
fn write_l2(ctx: &XdpContext, l2: &L2, dst: Mac, src: Mac, tags: u64, ethertype: u16) -> bool {
    let mut ok = write_mac(ctx, 0, dst) && write_mac(ctx, 6, src);
    ok &= match l2.l3_off {
        18 => write_at(ctx, 12, tags as u32),
        22 => write_at(ctx, 12, tags),
        _ => true,
    };
    ok && write_at(ctx, l2.l3_off - 2, ethertype)
}

/// Turns an echo request into its reply in place.
///
/// An ICMPv6 reply is a new packet of the responder (RFC 4443 4.2 returns
/// the echo *data*; extension headers belong to the request's hop-by-hop
/// journey): the request's extension headers are removed.
#[inline(always)]
fn echo_reply(
    ctx: &XdpContext,
    l3: &L3,
    l2: &L2,
    iface_mac: Mac,
    ty: u8,
    code: u8,
    check: u16,
) -> IcmpAction {
    let l3_off = l2.l3_off;
    let Some(client_mac) = read_mac(ctx, 6) else {
        return IcmpAction::Malformed;
    };
    let v4 = l3.family == FAMILY_V4;
    let reply = if v4 {
        ICMP_ECHO_REPLY
    } else {
        ICMPV6_ECHO_REPLY
    };
    // Only the type changes in the ICMP message. Swapping the addresses leaves
    // the ICMPv6 pseudo-header sum unchanged, and so does dropping extension
    // headers (the upper-layer length stays).
    let new_check = csum::replace16(
        check,
        u16::from_be_bytes([ty, code]),
        u16::from_be_bytes([reply, code]),
    );
    let mut l4_off = l3.l4_off;
    if v4 {
        let mut ok = write_mac(ctx, 0, client_mac) && write_mac(ctx, 6, iface_mac);
        ok &= write_at(ctx, l3_off + 12, l3.dst.word32())
            && write_at(ctx, l3_off + 16, l3.src.word32());
        // TTL changes; the address swap does not change the header checksum.
        let Some(ttl_proto) = read_at::<[u8; 2]>(ctx, l3_off + 8) else {
            return IcmpAction::Malformed;
        };
        let Some(hc) = read_at::<[u8; 2]>(ctx, l3_off + 10) else {
            return IcmpAction::Malformed;
        };
        let hc = csum::replace16(
            u16::from_be_bytes(hc),
            u16::from_be_bytes(ttl_proto),
            u16::from_be_bytes([REPLY_TTL, ttl_proto[1]]),
        );
        ok &= write_at(ctx, l3_off + 8, [REPLY_TTL, ttl_proto[1]])
            && write_at(ctx, l3_off + 10, hc.to_be_bytes());
        if !ok {
            return IcmpAction::Malformed;
        }
    } else {
        let Some(vcf) = read_at::<[u8; 4]>(ctx, l3_off) else {
            return IcmpAction::Malformed;
        };
        let Some(tags) = read_tags(ctx, l2) else {
            return IcmpAction::Malformed;
        };
        // Extension headers between the IPv6 header and ICMPv6 (bounded by the parser).
        let ext = (l3.l4_off - l3_off - IPV6_LEN) & 0x1ff;
        let icmp_len = l3.len.saturating_sub(IPV6_LEN + ext) as u16;
        if ext != 0 {
            // SAFETY: shrinking the front of the packet this program owns by
            // the extension headers, which the parser found inside it.
            if unsafe { bpf_xdp_adjust_head(ctx.ctx, ext as i32) } != 0 {
                return IcmpAction::Failed;
            }
            l4_off = l3_off + IPV6_LEN;
        }
        let ok = write_l2(ctx, l2, client_mac, iface_mac, tags, ETH_P_IPV6)
            && write_ipv6_header(ctx, l3_off, vcf, icmp_len, PROTO_ICMPV6, &l3.dst, &l3.src);
        if !ok {
            return IcmpAction::Failed;
        }
    }
    // Two-byte accesses: LLVM turns a one-byte bounds check into a form the
    // verifier does not credit.
    if write_at(ctx, l4_off, [reply, code]) && write_at(ctx, l4_off + 2, new_check.to_be_bytes()) {
        IcmpAction::Echo
    } else {
        IcmpAction::Failed
    }
}

/// Writes an IPv6 header at `off`: version/class/label from `vcf`, hop
/// limit 64. Piecewise: a 40-byte array per use would overflow the stack of
/// the one inlined BPF function.
#[inline(always)]
fn write_ipv6_header(
    ctx: &XdpContext,
    off: usize,
    vcf: [u8; 4],
    payload: u16,
    next: u8,
    src: &Addr,
    dst: &Addr,
) -> bool {
    let p = payload.to_be_bytes();
    write_at(ctx, off, [0x60 | (vcf[0] & 0x0f), vcf[1], vcf[2], vcf[3]])
        && write_at(ctx, off + 4, [p[0], p[1], next, REPLY_TTL])
        && write_at(ctx, off + 8, src.0)
        && write_at(ctx, off + 24, dst.0)
}

/// Sum of the 16-bit words of `b` as loaded from memory (native order: the
/// one's-complement sum is byte-order independent, RFC 1071).
#[inline(always)]
fn sum_ne<const N: usize>(b: &[u8; N]) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i + 1 < N {
        sum += u64::from(u16::from_ne_bytes([b[i], b[i + 1]]));
        i += 2;
    }
    sum
}

/// Rewrites the packet (a client's, `l3`) into an ICMP "fragmentation needed"
/// (IPv4) or ICMPv6 "packet too big" from the destination (the VIP) back to
/// the source, announcing `mtu`, and turns the frame around toward the
/// sender's MAC. It quotes as much of the packet as the RFCs allow (rounded
/// down to 4 bytes). False when a helper failed (the packet is then unusable).
// Not inlined: its header arrays get a stack frame of their own instead of
// adding to the balancer's (one BPF function has 512 bytes). It runs only for
// packets too big to forward, within the reply rate limit.
#[inline(never)]
pub fn too_big_reply(ctx: &XdpContext, l2: &L2, l3: &L3, iface_mac: &[u8; 6], mtu: u32) -> bool {
    let l3_off = l2.l3_off;
    let v4 = l3.family == FAMILY_V4;
    let (ip_len, quote_max) = if v4 {
        (IPV4_LEN, QUOTE_MAX_V4)
    } else {
        (IPV6_LEN, QUOTE_MAX_V6)
    };
    let grow = ip_len + ICMP_ERR_HDR;
    // The offending packet's bytes: its IP length, but never past the frame.
    let in_frame = (ctx.data_end() - ctx.data()).saturating_sub(l3_off);
    let quote = l3.len.min(in_frame).min(quote_max) & !3;
    // SAFETY: growing the headroom of the packet this program owns.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) } != 0 {
        return false;
    }
    // The old L2 header now starts `grow` bytes in: copy it to the front at
    // once, turned around (few values live across the helper calls, which
    // the verifier needs here).
    let Some(sender_mac) = read_mac(ctx, grow + 6) else {
        return false;
    };
    let ethertype = if v4 { ETH_P_IP } else { ETH_P_IPV6 };
    let mut ok = write_mac(ctx, 0, sender_mac) && write_mac(ctx, 6, Mac::of(iface_mac));
    ok &= match l3_off {
        18 => read_at::<u32>(ctx, grow + 12).is_some_and(|t| write_at(ctx, 12, t)),
        22 => read_at::<u64>(ctx, grow + 12).is_some_and(|t| write_at(ctx, 12, t)),
        _ => true,
    };
    if !(ok && write_at(ctx, l3_off - 2, ethertype)) {
        return false;
    }
    // Cut the frame after the quote: the quote is at most what the frame
    // held, so this only shrinks it (or leaves it).
    let want = l3_off + grow + quote;
    let have = ctx.data_end() - ctx.data();
    let delta = want as i64 - have as i64;
    // SAFETY: shrinking the tail of the packet this program owns.
    if delta > 0 || unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta as i32) } != 0 {
        return false;
    }
    let icmp_len = (ICMP_ERR_HDR + quote) as u16;
    // ICMP header with a zero checksum; the sum covers it and the quote
    // (and, for ICMPv6, the pseudo-header).
    let (icmp_hdr, pseudo) = if v4 {
        // The reply goes from the VIP (the packet's destination) back to its source.
        let src = l3.dst.word32().to_ne_bytes();
        let dst = l3.src.word32().to_ne_bytes();
        let total = ((IPV4_LEN as u16) + icmp_len).to_be_bytes();
        let head = [0x45, 0, total[0], total[1], 0, 0, 0, 0];
        let ttl_proto = [REPLY_TTL, PROTO_ICMP];
        // Written piecewise: the stack of this (called) function adds to the
        // balancer's, and the kernel allows 512 bytes for both.
        let c = csum::ipv4_parts(&head, ttl_proto, src, dst).to_be_bytes();
        let ok = write_at(ctx, l3_off, head)
            && write_at(ctx, l3_off + 8, [ttl_proto[0], ttl_proto[1], c[0], c[1]])
            && write_at(ctx, l3_off + 12, src)
            && write_at(ctx, l3_off + 16, dst);
        if !ok {
            return false;
        }
        // Next-hop MTU in the low 16 bits of the second word (RFC 1191).
        let m = (mtu.min(0xffff) as u16).to_be_bytes();
        let hdr = [ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, 0, 0, 0, 0, m[0], m[1]];
        (hdr, 0)
    } else {
        let vcf = [0x60, 0, 0, 0];
        if !write_ipv6_header(ctx, l3_off, vcf, icmp_len, PROTO_ICMPV6, &l3.dst, &l3.src) {
            return false;
        }
        let m = mtu.to_be_bytes();
        let hdr = [ICMPV6_PACKET_TOO_BIG, 0, 0, 0, m[0], m[1], m[2], m[3]];
        // Pseudo-header: source, destination, upper-layer length, next header.
        let pseudo = sum_ne(&l3.dst.0)
            + sum_ne(&l3.src.0)
            + sum_ne(&u32::from(icmp_len).to_be_bytes())
            + sum_ne(&u32::from(PROTO_ICMPV6).to_be_bytes());
        (hdr, pseudo)
    };
    let mut sum = pseudo;
    let icmp_off = l3_off + ip_len;
    if !write_at(ctx, icmp_off, icmp_hdr) {
        return false;
    }
    sum += sum_ne(&icmp_hdr);
    // The quote: 64-byte chunks through bpf_csum_diff, then 4 bytes at a time.
    let quote_off = icmp_off + ICMP_ERR_HDR;
    let mut done = 0usize;
    for _ in 0..MAX_CHUNKS {
        if done + CHUNK > quote {
            break;
        }
        let Some(p) = ptr_at::<[u8; CHUNK]>(ctx, quote_off + done) else {
            return false;
        };
        // SAFETY: p points at CHUNK bytes inside the packet (checked above).
        let part = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, p.cast(), CHUNK as u32, 0) };
        if part < 0 {
            return false;
        }
        sum += part as u64 & 0xffff_ffff;
        done += CHUNK;
    }
    for _ in 0..CHUNK / 4 {
        if done + 4 > quote {
            break;
        }
        let Some(w) = read_at::<[u8; 4]>(ctx, quote_off + done) else {
            return false;
        };
        sum += sum_ne(&w);
        done += 4;
    }
    let check = !csum::fold(sum);
    write_at(ctx, icmp_off + 2, check.to_ne_bytes())
}
