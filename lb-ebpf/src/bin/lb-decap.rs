//! The real-server program for TUN mode: strips IPIP, IP6IP6 and IPv4-in-IPv6
//! headers addressed to one of this host's tunnel endpoints and passes the
//! inner packet to the kernel, which delivers it to the VIP held on `lo`.
//! Everything else passes untouched. (This kernel has no ipip/ip6_tunnel
//! modules; XDP decapsulation is also faster than a tunnel device.)
//!
//! - The tunnel endpoints and the balancers' source prefixes are a read-only
//!   global (`XLB_DECAP_SET`, a `lb_common::DecapSet`) that `xlb decap` sets
//!   at load: the kernel freezes it, so the verifier knows the counts, and a
//!   new set is a new program swapped in on the link (no map read, no window
//!   where a half-written entry could be seen).
//! - Only tunnels from the balancers' source prefixes are accepted; others to
//!   a local endpoint are dropped, so nobody else can inject packets with a
//!   forged inner source. `xlb decap` without `--allow-src` stores a /0 of
//!   each family (accept all) and warns.
//! - ECN (RFC 6040, normal mode): an outer CE mark is copied to an ECN-capable
//!   inner header (IPv4 checksum updated). A Not-ECT inner is left as it is:
//!   the balancer copies the inner ECN field to the outer header, so a
//!   compliant path never marks CE on such a packet.
//!
//! A separate object from the balancer so real servers load only this.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
#[path = "../parse.rs"]
#[expect(dead_code, reason = "shared with the balancer, which reads more of it")]
mod parse;

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{
        bindings::xdp_action,
        helpers::bpf_xdp_adjust_head,
        macros::{map, xdp},
        maps::PerCpuArray,
        programs::XdpContext,
    };
    use core::ptr::{addr_of, read_volatile};
    use lb_common::{
        Counter, DecapSet, MAX_DECAP_ADDRS, MAX_DECAP_SRCS, PROTO_IPIP, PROTO_IPV6, decap_stat,
    };

    use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

    use crate::parse::{self, Addr, ETH_P_IP, ETH_P_IPV6, ptr_at, read_at, write_at};

    /// This host's tunnel endpoints and the accepted tunnel sources, set by
    /// `xlb decap` at load (`.rodata`, frozen). Read only through
    /// `read_volatile`, so the compiler never folds the placeholder in.
    #[unsafe(no_mangle)]
    static XLB_DECAP_SET: DecapSet = DecapSet::EMPTY;

    /// ECN field values (the low two bits of the TOS / traffic class).
    const ECN_MASK: u8 = 0x03;
    const ECN_CE: u8 = 0x03;

    /// One counter per outcome, indexed by `lb_common::decap_stat`.
    #[map(name = "XLB_DECAP_STATS")]
    static DECAP_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(decap_stat::COUNT, 0);

    /// Decapsulates tunnel packets for this host.
    #[xdp]
    pub fn xlb_decap(ctx: XdpContext) -> u32 {
        let bytes = (ctx.data_end() - ctx.data()) as u64;
        let (action, stat) = process(&ctx);
        if let Some(c) = DECAP_STATS.get_ptr_mut(stat) {
            // SAFETY: this CPU's element of a per-CPU array.
            unsafe {
                (*c).packets += 1;
                (*c).bytes += bytes;
            }
        }
        action
    }

    #[inline(always)]
    fn process(ctx: &XdpContext) -> (u32, u32) {
        let pass = xdp_action::XDP_PASS;
        let Some((l2, _)) = parse::l2(ctx) else {
            return (pass, decap_stat::PASS_MALFORMED);
        };
        // The outer header is read field by field, in the order the checks
        // need them (no whole header copied, no 16-byte addresses built).
        let off = l2.l3_off;
        let (inner_v4, l4_off, tos, stat) = match l2.ethertype {
            ETH_P_IP => {
                let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, off) else {
                    return (pass, decap_stat::PASS_MALFORMED);
                };
                // SAFETY: ptr_at checked the header's 20 bytes; unaligned as
                // in read_at (every field here is a byte array).
                let ip = unsafe { &*ip };
                let Ok((ihl, _)) = parse::ipv4_lengths(ip.vihl, ip.tot_len) else {
                    return (pass, decap_stat::PASS_MALFORMED);
                };
                if ip.proto != PROTO_IPIP {
                    return (pass, decap_stat::PASS_NOT_TUNNEL);
                }
                // MF flag or a non-zero offset: a fragment.
                if u16::from_be_bytes(ip.frags) & 0x3fff != 0
                    || !is_local_v4(u32::from_ne_bytes(ip.dst_addr))
                {
                    return (pass, decap_stat::PASS_NOT_LOCAL);
                }
                let l4_off = off + ihl;
                if !inner_ok(ctx, l4_off, true) {
                    return (pass, decap_stat::PASS_MALFORMED);
                }
                if !is_allowed_src_v4(u32::from_ne_bytes(ip.src_addr)) {
                    return (xdp_action::XDP_DROP, decap_stat::DROP_NOT_ALLOWED_SRC);
                }
                (true, l4_off, ip.tos, decap_stat::DECAP_IPIP)
            }
            ETH_P_IPV6 => {
                let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, off) else {
                    return (pass, decap_stat::PASS_MALFORMED);
                };
                // SAFETY: ptr_at checked the header's 40 bytes; unaligned as
                // in read_at (the addresses are read as words by Addr::read).
                let ip = unsafe { &*ip };
                if ip.vcf[0] >> 4 != 6 {
                    return (pass, decap_stat::PASS_MALFORMED);
                }
                let Ok(walk) = parse::ipv6_walk(ctx, off, ip.next_hdr) else {
                    return (pass, decap_stat::PASS_MALFORMED);
                };
                let (inner_v4, stat) = match walk.proto {
                    PROTO_IPIP => (true, decap_stat::DECAP_4IN6),
                    PROTO_IPV6 => (false, decap_stat::DECAP_IP6IP6),
                    _ => return (pass, decap_stat::PASS_NOT_TUNNEL),
                };
                // SAFETY: inside the header ptr_at checked.
                if walk.fragment || !is_local_v6(unsafe { Addr::read(&raw const ip.dst_addr) }) {
                    return (pass, decap_stat::PASS_NOT_LOCAL);
                }
                if !inner_ok(ctx, walk.l4_off, inner_v4) {
                    return (pass, decap_stat::PASS_MALFORMED);
                }
                // SAFETY: as for the destination.
                if !is_allowed_src_v6(unsafe { Addr::read(&raw const ip.src_addr) }) {
                    return (xdp_action::XDP_DROP, decap_stat::DROP_NOT_ALLOWED_SRC);
                }
                // The traffic class's low bits (ECN) are bits 4-5 of the second byte.
                (inner_v4, walk.l4_off, ip.vcf[1] >> 4, stat)
            }
            _ => return (pass, decap_stat::PASS_NOT_TUNNEL),
        };
        let inner_type = if inner_v4 { ETH_P_IP } else { ETH_P_IPV6 };
        if tos & ECN_MASK == ECN_CE && !mark_ce(ctx, l4_off, inner_v4) {
            return (pass, decap_stat::PASS_MALFORMED);
        }
        let outer_len = l4_off - off;
        // The L2 header (addresses, VLAN tags) and the inner ethertype are
        // written just before the inner header, over the end of the outer
        // one, so that moving the head leaves them in place and nothing is
        // written after the helper call. Each range is checked once (22
        // bytes, the longest L2 header; past a shorter one they reach into
        // the inner header, which is there), and all of the old header is
        // read, as words, before any of the new one is written: they overlap
        // when a 20-byte IPv4 header follows two VLAN tags.
        let (Some(old), Some(new)) = (
            ptr_at::<[u8; 22]>(ctx, 0),
            ptr_at::<[u8; 22]>(ctx, outer_len),
        ) else {
            return (xdp_action::XDP_ABORTED, decap_stat::ABORTED);
        };
        // SAFETY: both ranges checked by ptr_at; unaligned as in read_at.
        unsafe {
            let (old, new) = (old.cast::<u8>(), new.cast::<u8>());
            let macs_head = old.cast::<u64>().read_unaligned();
            let macs_tail = old.add(8).cast::<u32>().read_unaligned();
            match off {
                22 => {
                    let tags = old.add(12).cast::<u64>().read_unaligned();
                    new.add(12).cast::<u64>().write_unaligned(tags);
                    new.add(20).cast::<u16>().write_unaligned(inner_type);
                }
                18 => {
                    let tags = old.add(12).cast::<u32>().read_unaligned();
                    new.add(12).cast::<u32>().write_unaligned(tags);
                    new.add(16).cast::<u16>().write_unaligned(inner_type);
                }
                _ => new.add(12).cast::<u16>().write_unaligned(inner_type),
            }
            new.cast::<u64>().write_unaligned(macs_head);
            new.add(8).cast::<u32>().write_unaligned(macs_tail);
        }
        // SAFETY: shrinking the packet this program owns by the outer header,
        // which the checks above proved is inside it.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
            return (xdp_action::XDP_ABORTED, decap_stat::ABORTED);
        }
        (pass, stat)
    }

    /// Whether the inner IP header at `off` is there, of the version the
    /// outer protocol names (IPv4 when `v4`), before we commit to stripping.
    #[inline(always)]
    fn inner_ok(ctx: &XdpContext, off: usize, v4: bool) -> bool {
        if v4 {
            ptr_at::<Ipv4Hdr>(ctx, off).is_some_and(|h| {
                // SAFETY: ptr_at checked the header's 20 bytes.
                unsafe { (*h).vihl >> 4 == 4 }
            })
        } else {
            ptr_at::<Ipv6Hdr>(ctx, off).is_some_and(|h| {
                // SAFETY: ptr_at checked the header's 40 bytes.
                unsafe { (*h).vcf[0] >> 4 == 6 }
            })
        }
    }

    /// Whether the IPv4 address `dst` (a word in wire order) is one of this
    /// host's tunnel endpoints.
    #[inline(always)]
    fn is_local_v4(dst: u32) -> bool {
        let set = addr_of!(XLB_DECAP_SET);
        // SAFETY: reads of a static; the loop stops at the count and at the
        // array's length (every index is < MAX_DECAP_ADDRS).
        unsafe {
            let n = read_volatile(addr_of!((*set).v4_addr_count)) as usize;
            for i in 0..MAX_DECAP_ADDRS {
                if i >= n {
                    break;
                }
                if read_volatile(addr_of!((*set).v4_addrs[i])) == dst {
                    return true;
                }
            }
        }
        false
    }

    /// Whether the IPv6 address `dst` is one of this host's tunnel endpoints.
    #[inline(always)]
    fn is_local_v6(dst: Addr) -> bool {
        let set = addr_of!(XLB_DECAP_SET);
        // Two native words: the order [`DecapSet`] stores them in.
        let d = dst.words();
        // SAFETY: as in is_local_v4.
        unsafe {
            let n = read_volatile(addr_of!((*set).v6_addr_count)) as usize;
            for i in 0..MAX_DECAP_ADDRS {
                if i >= n {
                    break;
                }
                if read_volatile(addr_of!((*set).v6_addrs[i][0])) == d[0]
                    && read_volatile(addr_of!((*set).v6_addrs[i][1])) == d[1]
                {
                    return true;
                }
            }
        }
        false
    }

    /// Whether the IPv4 address `src` (a word in wire order) is in one of
    /// the allowed source prefixes.
    #[inline(always)]
    fn is_allowed_src_v4(src: u32) -> bool {
        let set = addr_of!(XLB_DECAP_SET);
        // SAFETY: as in is_local_v4 (every index is < MAX_DECAP_SRCS).
        unsafe {
            let n = read_volatile(addr_of!((*set).v4_src_count)) as usize;
            for i in 0..MAX_DECAP_SRCS {
                if i >= n {
                    break;
                }
                let net = read_volatile(addr_of!((*set).v4_srcs[i][0]));
                let mask = read_volatile(addr_of!((*set).v4_srcs[i][1]));
                if src & mask == net {
                    return true;
                }
            }
        }
        false
    }

    /// Whether the IPv6 address `src` is in one of the allowed source prefixes.
    #[inline(always)]
    fn is_allowed_src_v6(src: Addr) -> bool {
        let set = addr_of!(XLB_DECAP_SET);
        let s = src.words();
        // SAFETY: as in is_local_v4 (every index is < MAX_DECAP_SRCS).
        unsafe {
            let n = read_volatile(addr_of!((*set).v6_src_count)) as usize;
            for i in 0..MAX_DECAP_SRCS {
                if i >= n {
                    break;
                }
                let p = addr_of!((*set).v6_srcs[i]);
                if s[0] & read_volatile(addr_of!((*p)[2])) == read_volatile(addr_of!((*p)[0]))
                    && s[1] & read_volatile(addr_of!((*p)[3])) == read_volatile(addr_of!((*p)[1]))
                {
                    return true;
                }
            }
        }
        false
    }

    /// Sets CE on the inner header at `off` when it is ECN-capable (ECT(0) or
    /// ECT(1)); false when the header cannot be read or written.
    #[inline(always)]
    fn mark_ce(ctx: &XdpContext, off: usize, v4: bool) -> bool {
        let Some(h) = read_at::<[u8; 2]>(ctx, off) else {
            return false;
        };
        if v4 {
            // TOS is the second byte; its low two bits are ECN.
            if h[1] & ECN_MASK == 0 || h[1] & ECN_MASK == ECN_CE {
                return true;
            }
            let Some(c) = read_at::<[u8; 2]>(ctx, off + 10) else {
                return false;
            };
            let new = [h[0], h[1] | ECN_CE];
            // RFC 1624 incremental update of the header checksum.
            let sum = u32::from(!u16::from_be_bytes(c))
                + u32::from(!u16::from_be_bytes(h))
                + u32::from(u16::from_be_bytes(new));
            let sum = (sum & 0xffff) + (sum >> 16);
            let sum = (sum & 0xffff) + (sum >> 16);
            write_at(ctx, off, new) && write_at(ctx, off + 10, (!(sum as u16)).to_be_bytes())
        } else {
            // Traffic class spans the two bytes; ECN is bits 4-5 of the second.
            let ecn = (h[1] >> 4) & ECN_MASK;
            if ecn == 0 || ecn == ECN_CE {
                return true;
            }
            write_at(ctx, off, [h[0], h[1] | (ECN_CE << 4)])
        }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        // The verifier rejects any program that could reach this.
        loop {}
    }

    #[unsafe(link_section = "license")]
    #[unsafe(no_mangle)]
    static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
}

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("lb-decap holds an XDP program; it is built for BPF by lb-userspace's build.rs");
}
