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
        Counter, DecapSet, FAMILY_V4, MAX_DECAP_ADDRS, MAX_DECAP_SRCS, PROTO_IPIP, PROTO_IPV6,
        decap_stat,
    };

    use crate::parse::{self, Addr, ETH_P_IP, ETH_P_IPV6, read_at, write_at};

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
        let outer = match l2.ethertype {
            ETH_P_IP => parse::ipv4(ctx, l2.l3_off),
            ETH_P_IPV6 => parse::ipv6(ctx, l2.l3_off),
            _ => return (pass, decap_stat::PASS_NOT_TUNNEL),
        };
        let Ok(outer) = outer else {
            return (pass, decap_stat::PASS_MALFORMED);
        };
        let v4_outer = outer.family == FAMILY_V4;
        let (inner_type, stat) = match outer.proto {
            PROTO_IPIP if v4_outer => (ETH_P_IP, decap_stat::DECAP_IPIP),
            PROTO_IPIP => (ETH_P_IP, decap_stat::DECAP_4IN6),
            PROTO_IPV6 if !v4_outer => (ETH_P_IPV6, decap_stat::DECAP_IP6IP6),
            _ => return (pass, decap_stat::PASS_NOT_TUNNEL),
        };
        if outer.fragment || !is_local(v4_outer, &outer.dst) {
            return (pass, decap_stat::PASS_NOT_LOCAL);
        }
        // The inner IP header must be there, of the version the outer
        // protocol names, before we commit to stripping.
        let inner_ok = if inner_type == ETH_P_IP {
            read_at::<[u8; 20]>(ctx, outer.l4_off).is_some_and(|h| h[0] >> 4 == 4)
        } else {
            read_at::<[u8; 40]>(ctx, outer.l4_off).is_some_and(|h| h[0] >> 4 == 6)
        };
        if !inner_ok {
            return (pass, decap_stat::PASS_MALFORMED);
        }
        if !is_allowed_src(v4_outer, &outer.src) {
            return (xdp_action::XDP_DROP, decap_stat::DROP_NOT_ALLOWED_SRC);
        }
        if outer.tos & ECN_MASK == ECN_CE && !mark_ce(ctx, outer.l4_off, inner_type == ETH_P_IP) {
            return (pass, decap_stat::PASS_MALFORMED);
        }
        let outer_len = outer.l4_off - l2.l3_off;
        // Save the L2 header (addresses and VLAN tags) before it is
        // overwritten, as words (byte arrays are kept on the stack byte by
        // byte; see docs/development.md, "Data-path code").
        let (Some(macs_head), Some(macs_tail)) = (read_at::<u64>(ctx, 0), read_at::<u32>(ctx, 8))
        else {
            return (pass, decap_stat::PASS_MALFORMED);
        };
        let tags: u64 = match l2.l3_off {
            18 => match read_at::<u32>(ctx, 12) {
                Some(t) => u64::from(t),
                None => return (pass, decap_stat::PASS_MALFORMED),
            },
            22 => match read_at(ctx, 12) {
                Some(t) => t,
                None => return (pass, decap_stat::PASS_MALFORMED),
            },
            _ => 0,
        };
        // SAFETY: shrinking the packet this program owns by the outer header,
        // which the checks above proved is inside it.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
            return (xdp_action::XDP_ABORTED, decap_stat::ABORTED);
        }
        let mut ok = write_at(ctx, 0, macs_head) && write_at(ctx, 8, macs_tail);
        ok &= match l2.l3_off {
            18 => write_at(ctx, 12, tags as u32),
            22 => write_at(ctx, 12, tags),
            _ => true,
        };
        ok &= write_at(ctx, l2.l3_off - 2, inner_type);
        if ok {
            (pass, stat)
        } else {
            (xdp_action::XDP_ABORTED, decap_stat::ABORTED)
        }
    }

    /// Whether `dst` is one of this host's tunnel endpoints.
    #[inline(always)]
    fn is_local(v4: bool, dst: &Addr) -> bool {
        let set = addr_of!(XLB_DECAP_SET);
        // SAFETY: reads of a static; the loops stop at the count and at the
        // arrays' length (every index is < MAX_DECAP_ADDRS).
        unsafe {
            if v4 {
                let n = read_volatile(addr_of!((*set).v4_addr_count)) as usize;
                let d = dst.word32();
                for i in 0..MAX_DECAP_ADDRS {
                    if i >= n {
                        break;
                    }
                    if read_volatile(addr_of!((*set).v4_addrs[i])) == d {
                        return true;
                    }
                }
            } else {
                let n = read_volatile(addr_of!((*set).v6_addr_count)) as usize;
                // Two native words: the order [`DecapSet`] stores them in.
                let d = dst.words();
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
        }
        false
    }

    /// Whether `src` is in one of the allowed source prefixes.
    #[inline(always)]
    fn is_allowed_src(v4: bool, src: &Addr) -> bool {
        let set = addr_of!(XLB_DECAP_SET);
        // SAFETY: as in is_local (every index is < MAX_DECAP_SRCS).
        unsafe {
            if v4 {
                let n = read_volatile(addr_of!((*set).v4_src_count)) as usize;
                let s = src.word32();
                for i in 0..MAX_DECAP_SRCS {
                    if i >= n {
                        break;
                    }
                    let net = read_volatile(addr_of!((*set).v4_srcs[i][0]));
                    let mask = read_volatile(addr_of!((*set).v4_srcs[i][1]));
                    if s & mask == net {
                        return true;
                    }
                }
            } else {
                let n = read_volatile(addr_of!((*set).v6_src_count)) as usize;
                let s = src.words();
                for i in 0..MAX_DECAP_SRCS {
                    if i >= n {
                        break;
                    }
                    let p = addr_of!((*set).v6_srcs[i]);
                    if s[0] & read_volatile(addr_of!((*p)[2])) == read_volatile(addr_of!((*p)[0]))
                        && s[1] & read_volatile(addr_of!((*p)[3]))
                            == read_volatile(addr_of!((*p)[1]))
                    {
                        return true;
                    }
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
