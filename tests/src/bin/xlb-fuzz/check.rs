//! The invariants, checked on every frame: an independent reading of the
//! input (which service, if any, it is for) and of the output (which kind of
//! frame was sent, and is it well formed).
//!
//! The reading here is deliberately simple and written apart from the data
//! path's parser: where the two disagree, the report says so.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_userspace::model::Forward;
use xlb_tests::packet::LB_MAC;

use crate::world::{MTU, Service, TUN_SRC_V4, TUN_SRC_V6, World};

pub const XDP_ABORTED: u32 = 0;
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

/// A broken invariant: its name (the report groups by it) and what was seen.
#[derive(Debug)]
pub struct Violation {
    pub invariant: &'static str,
    /// Which kind of input broke it, when the invariant covers several.
    pub case: &'static str,
    pub detail: String,
}

impl Violation {
    /// The report's grouping key.
    pub fn key(&self) -> String {
        if self.case.is_empty() {
            self.invariant.to_owned()
        } else {
            format!("{} ({})", self.invariant, self.case)
        }
    }
}

type Check = Result<(), Violation>;

fn fail(invariant: &'static str, detail: impl Into<String>) -> Check {
    fail_case(invariant, "", detail)
}

fn fail_case(invariant: &'static str, case: &'static str, detail: impl Into<String>) -> Check {
    Err(Violation {
        invariant,
        case,
        detail: detail.into(),
    })
}

/// The Internet checksum (RFC 1071) of the concatenated parts (each of even
/// length except the last).
pub fn checksum(parts: &[&[u8]]) -> u16 {
    !fold(parts.iter().map(|p| sum(p)).sum())
}

/// Whether the parts, checksum field included, add up to all ones.
fn checksum_ok(parts: &[&[u8]]) -> bool {
    fold(parts.iter().map(|p| sum(p)).sum()) == 0xffff
}

fn sum(data: &[u8]) -> u64 {
    let (pairs, rest) = data.as_chunks::<2>();
    let mut s: u64 = pairs
        .iter()
        .map(|c| u64::from(u16::from_be_bytes(*c)))
        .sum();
    if let [last] = rest {
        s += u64::from(*last) << 8;
    }
    s
}

fn fold(mut s: u64) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

const ETH_IPV4: u16 = 0x0800;
const ETH_IPV6: u16 = 0x86dd;

/// Where the IP header starts: after Ethernet and up to three VLAN tags of
/// either kind (a superset of what the data path walks).
pub fn l3_offset(f: &[u8]) -> Option<(usize, u16)> {
    let mut off = 14;
    let mut et = be16(f, 12)?;
    for _ in 0..3 {
        if et != 0x8100 && et != 0x88a8 {
            break;
        }
        et = be16(f, off + 2)?;
        off += 4;
    }
    Some((off, et))
}

/// Fragment state of an IP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frag {
    No,
    /// Offset 0 with more fragments: has the transport header.
    First,
    /// Offset above 0: carries no transport header.
    Later,
}

/// What this reading makes of an IP header.
#[derive(Debug)]
pub struct Ip {
    pub off: usize,
    pub v6: bool,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Version right, IPv4 header length >= 20 and <= total length.
    pub sane: bool,
    /// The transport protocol after extension headers; None when the chain
    /// is cut short or longer than this reading follows.
    pub proto: Option<u8>,
    pub l4: usize,
    pub frag: Frag,
    /// The declared length of the whole IP packet.
    pub len: usize,
    /// IPv6 fragment headers in the chain (more than one is never sent).
    pub frag_headers: u8,
}

/// Reads the IP header at `off` (IPv4 when `ethertype` says so, else IPv6).
pub fn ip_at(f: &[u8], off: usize, v6: bool) -> Option<Ip> {
    if !v6 {
        let h = f.get(off..off + 20)?;
        let ihl = usize::from(h[0] & 0x0f) * 4;
        let len = usize::from(u16::from_be_bytes([h[2], h[3]]));
        let frags = u16::from_be_bytes([h[6], h[7]]);
        let frag = if frags & 0x1fff != 0 {
            Frag::Later
        } else if frags & 0x2000 != 0 {
            Frag::First
        } else {
            Frag::No
        };
        return Some(Ip {
            off,
            v6,
            src: IpAddr::V4(Ipv4Addr::new(h[12], h[13], h[14], h[15])),
            dst: IpAddr::V4(Ipv4Addr::new(h[16], h[17], h[18], h[19])),
            sane: h[0] >> 4 == 4 && ihl >= 20 && len >= ihl,
            proto: Some(h[9]),
            l4: off + ihl.max(20),
            frag,
            len,
            frag_headers: 0,
        });
    }
    let h = f.get(off..off + 40)?;
    let addr = |at: usize| {
        let b: [u8; 16] = h[at..at + 16].try_into().expect("16 bytes");
        IpAddr::V6(Ipv6Addr::from(b))
    };
    let mut nh = h[6];
    let mut at = off + 40;
    let mut frag = Frag::No;
    let mut frag_headers = 0;
    let mut proto = None;
    for _ in 0..16 {
        match nh {
            0 | 43 | 60 | 51 | 44 => {
                let Some(e) = f.get(at..at + 2) else { break };
                let len = match nh {
                    44 => 8,
                    51 => (usize::from(e[1]) + 2) * 4,
                    _ => (usize::from(e[1]) + 1) * 8,
                };
                if nh == 44 {
                    frag_headers += 1;
                    let Some(field) = be16(f, at + 2) else { break };
                    if field >> 3 != 0 {
                        frag = Frag::Later;
                    } else if field & 1 != 0 && frag == Frag::No {
                        frag = Frag::First;
                    }
                }
                nh = e[0];
                at += len;
            }
            _ => {
                proto = Some(nh);
                break;
            }
        }
    }
    Some(Ip {
        off,
        v6,
        src: addr(8),
        dst: addr(24),
        sane: h[0] >> 4 == 6,
        proto,
        l4: at,
        frag,
        len: 40 + usize::from(u16::from_be_bytes([h[4], h[5]])),
        frag_headers,
    })
}

/// The IP header of a frame, by its ethertype.
fn ip_of(f: &[u8]) -> Option<Ip> {
    let (off, et) = l3_offset(f)?;
    match et {
        ETH_IPV4 => ip_at(f, off, false),
        ETH_IPV6 => ip_at(f, off, true),
        _ => None,
    }
}

/// What the balancer may do with an input frame.
enum Class<'w> {
    /// Not for a configured service or VIP address: must pass untouched.
    NotOurs(&'static str),
    /// TCP/UDP to this service.
    Service(&'w Service),
    /// ICMP to a VIP address.
    IcmpToVip,
    /// For a VIP address, but this reading cannot tell more (cut, fragment).
    Unknown,
}

fn classify<'w>(world: &'w World, f: &[u8]) -> Class<'w> {
    if f[..6] != LB_MAC {
        return Class::NotOurs("not to the interface MAC");
    }
    let Some(ip) = ip_of(f) else {
        return Class::NotOurs("not IP");
    };
    if !world.is_vip_addr(ip.dst) {
        return Class::NotOurs("not to a VIP address");
    }
    if !ip.sane {
        return Class::Unknown;
    }
    let Some(proto) = ip.proto else {
        return Class::Unknown;
    };
    match proto {
        6 | 17 => {
            if ip.frag != Frag::Later
                && let Some(dport) = be16(f, ip.l4 + 2)
            {
                return match world.service(ip.dst, dport, proto) {
                    Some(s) => Class::Service(s),
                    None => Class::NotOurs("to a VIP address, not a service port"),
                };
            }
            if world.has_proto(ip.dst, proto) {
                Class::Unknown
            } else {
                Class::NotOurs("to a VIP address, no service of the protocol")
            }
        }
        1 if !ip.v6 => Class::IcmpToVip,
        58 if ip.v6 => Class::IcmpToVip,
        _ => Class::NotOurs("to a VIP address, a protocol without services"),
    }
}

/// Checks one balancer run: `inp` in, `verdict` and `out` back.
pub fn balancer(world: &World, inp: &[u8], verdict: u32, out: &[u8]) -> Check {
    if !matches!(verdict, XDP_PASS | XDP_DROP | XDP_TX) {
        return fail("verdict-is-pass-drop-or-tx", format!("verdict {verdict}"));
    }
    if verdict == XDP_PASS && out != inp {
        return fail(
            "pass-leaves-bytes-unchanged",
            format!("output {}", hex(out)),
        );
    }
    let class = classify(world, inp);
    if let Class::NotOurs(why) = class {
        if verdict != XDP_PASS {
            return fail_case(
                "not-ours-passes-untouched",
                why,
                format!("{why}: verdict {}", verdict_name(verdict)),
            );
        }
        return Ok(());
    }
    if verdict != XDP_TX {
        return Ok(());
    }
    tx(world, &class, inp, out)
}

pub fn verdict_name(v: u32) -> &'static str {
    match v {
        XDP_ABORTED => "ABORTED",
        XDP_DROP => "DROP",
        XDP_PASS => "PASS",
        XDP_TX => "TX",
        _ => "OTHER",
    }
}

/// Which kind of frame a TX is, and whether it is one the input allows.
fn tx(world: &World, class: &Class<'_>, inp: &[u8], out: &[u8]) -> Check {
    let Some((l3, _)) = l3_offset(inp) else {
        return fail("tx-is-a-known-form", "TX of a frame without an IP header");
    };
    let ip = ip_of(inp).expect("classified as ours, so IP");
    // DR: only the MAC addresses differ.
    if out.len() == inp.len() && out[12..] == inp[12..] {
        let service = steered_service(world, class, inp, &ip)?;
        if service.forward != Forward::Dr {
            return fail(
                "dr-only-for-dr-services",
                format!("{} is {:?}", service.vip, service.forward),
            );
        }
        if out[6..12] != LB_MAC {
            return fail(
                "dr-frame-from-interface-mac",
                format!("source MAC {}", hex(&out[6..12])),
            );
        }
        if !service.reals.iter().any(|(_, mac)| out[..6] == *mac) {
            return fail(
                "dr-frame-to-a-real-of-the-service",
                format!("MAC {} is no real of {}", hex(&out[..6]), service.vip),
            );
        }
        return Ok(());
    }
    // TUN: an outer header pushed in front of the untouched IP packet (bytes
    // past its IP length, such as Ethernet padding, are not carried).
    if let Some(packet) = inp.get(l3..l3 + ip.len)
        && let Some(outer) = out.len().checked_sub(l3 + ip.len)
        && (outer == 20 || outer == 40)
        && out.get(l3 + outer..) == Some(packet)
    {
        let service = steered_service(world, class, inp, &ip)?;
        return tunnel(service, inp, out, l3, outer == 40, &ip);
    }
    // Answers to the sender: an echo reply or an ICMP error.
    if out.len() >= 12 && out[..6] == inp[6..12] {
        let reply_ty = if ip.v6 { 129 } else { 0 };
        let is_reply = ip_at(out, ip.off, ip.v6).is_some_and(|r| out.get(r.l4) == Some(&reply_ty));
        if matches!(class, Class::IcmpToVip) && is_reply {
            return echo_reply(inp, out, &ip);
        }
        return icmp_error_to_source(class, inp, out, &ip);
    }
    fail(
        "tx-is-a-known-form",
        format!(
            "neither DR, tunnel, echo reply nor ICMP error: output {}",
            hex(out)
        ),
    )
}

/// The service a forwarded frame belongs to: its own (TCP/UDP) or, for an
/// ICMP error, the one of the flow it quotes.
fn steered_service<'w>(
    world: &'w World,
    class: &Class<'w>,
    inp: &[u8],
    ip: &Ip,
) -> Result<&'w Service, Violation> {
    match class {
        Class::Service(s) => Ok(s),
        Class::IcmpToVip => {
            let ty = inp.get(ip.l4).copied().unwrap_or(0);
            let error = if ip.v6 {
                (1..=4).contains(&ty)
            } else {
                matches!(ty, 3 | 11 | 12)
            };
            if !error || ip.frag != Frag::No {
                return Err(Violation {
                    invariant: "forwarded-icmp-is-an-error-about-a-service-flow",
                    case: "not an error, or a fragment",
                    detail: format!("ICMP type {ty}, fragment {:?}", ip.frag),
                });
            }
            let q = ip_at(inp, ip.l4 + 8, ip.v6).filter(|q| q.sane);
            let Some(q) = q else {
                return Err(Violation {
                    invariant: "forwarded-icmp-is-an-error-about-a-service-flow",
                    case: "quoted header cut or broken",
                    detail: "the quoted IP header is cut or broken".into(),
                });
            };
            let sport = if q.frag == Frag::Later {
                None
            } else {
                be16(inp, q.l4)
            };
            let service = q
                .proto
                .zip(sport)
                .and_then(|(proto, sport)| world.service(q.src, sport, proto))
                .filter(|_| q.src == ip.dst);
            let case = match (q.frag, sport) {
                (Frag::Later, _) => "quoted a later fragment",
                (_, None) => "quoted ports cut",
                _ => "quoted flow of no service",
            };
            service.ok_or_else(|| Violation {
                invariant: "forwarded-icmp-is-an-error-about-a-service-flow",
                case,
                detail: format!(
                    "quoted {} -> {} proto {:?} fragment {:?} source port {:?}: no service",
                    q.src, q.dst, q.proto, q.frag, sport
                ),
            })
        }
        _ => Err(Violation {
            invariant: "forwarded-frame-is-for-a-service",
            case: twice_fragmented(ip),
            detail: "forwarded, but not a whole TCP/UDP header to a service".into(),
        }),
    }
}

/// The case name of an IPv6 fragment whose chain has a second fragment
/// header (the data path reads the fragment state from the last one).
fn twice_fragmented(ip: &Ip) -> &'static str {
    if ip.frag_headers > 1 {
        "a fragment with a second fragment header"
    } else {
        ""
    }
}

fn in_prefix(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(a) => a.octets()[..3] == TUN_SRC_V4.octets()[..3] && !a.is_unspecified(),
        IpAddr::V6(a) => a.octets()[..12] == TUN_SRC_V6.octets()[..12],
    }
}

/// A tunnel frame: outer header valid and toward a real of the service.
fn tunnel(service: &Service, inp: &[u8], out: &[u8], l3: usize, outer_v6: bool, ip: &Ip) -> Check {
    const INV: &str = "tunnel-is-well-formed-to-a-real";
    if service.forward != Forward::Tun {
        return fail(
            "tunnel-only-for-tun-services",
            format!("{} is {:?}", service.vip, service.forward),
        );
    }
    if out[6..12] != LB_MAC || out[12..l3 - 2] != inp[12..l3 - 2] {
        return fail(INV, "Ethernet source or VLAN tags changed");
    }
    let et = if outer_v6 { ETH_IPV6 } else { ETH_IPV4 };
    if be16(out, l3 - 2) != Some(et) {
        return fail(INV, format!("ethertype {:04x?}", be16(out, l3 - 2)));
    }
    let Some(o) = ip_at(out, l3, outer_v6) else {
        return fail(INV, "no outer header");
    };
    let inner_v6 = inp[l3] >> 4 == 6;
    let inner_len = ip.len;
    let outer_len = if outer_v6 { 40 } else { 20 };
    let Some((real, mac)) = service.reals.iter().find(|(a, _)| *a == o.dst) else {
        return fail(
            INV,
            format!("outer destination {} is no real of {}", o.dst, service.vip),
        );
    };
    if out[..6] != *mac {
        return fail(
            INV,
            format!(
                "destination MAC {} is not the next hop of {real}",
                hex(&out[..6])
            ),
        );
    }
    if !in_prefix(o.src) {
        return fail(
            INV,
            format!("outer source {} outside the tunnel source prefix", o.src),
        );
    }
    if !outer_v6 {
        let h = &out[l3..l3 + 20];
        if h[0] != 0x45 || h[8] == 0 || h[9] != 4 || o.frag != Frag::No {
            return fail(INV, format!("outer IPv4 header {}", hex(h)));
        }
        if !checksum_ok(&[h]) {
            return fail(
                "tx-checksums-valid",
                format!("outer IPv4 header checksum: {}", hex(h)),
            );
        }
        if inner_v6 {
            return fail(INV, "IPv6 inside IPv4");
        }
    } else {
        let h = &out[l3..l3 + 40];
        let want_nh = if inner_v6 { 41 } else { 4 };
        if h[0] >> 4 != 6 || h[6] != want_nh || h[7] == 0 {
            return fail(INV, format!("outer IPv6 header {}", hex(h)));
        }
    }
    if o.len != outer_len + inner_len {
        return fail(
            INV,
            format!("outer length {} for an inner packet of {inner_len}", o.len),
        );
    }
    let carried = out.len() - l3;
    if o.len > carried {
        return fail(
            "tunnel-length-matches-the-frame",
            format!(
                "outer header says {} bytes, the frame carries {carried}",
                o.len
            ),
        );
    }
    if carried > MTU as usize {
        return fail(
            "tunnel-fits-the-mtu",
            format!(
                "{carried} bytes of IP leave an interface of MTU {MTU} (inner length field says {inner_len})"
            ),
        );
    }
    Ok(())
}

/// The ICMP/ICMPv6 checksum of the message at `l4` of the IP packet `ip` in `f`.
fn icmp_checksum_ok(f: &[u8], ip: &Ip) -> bool {
    let end = (ip.off + ip.len).min(f.len());
    let Some(msg) = f.get(ip.l4..end) else {
        return false;
    };
    if !ip.v6 {
        return checksum_ok(&[msg]);
    }
    let (IpAddr::V6(s), IpAddr::V6(d)) = (ip.src, ip.dst) else {
        return false;
    };
    let len = (msg.len() as u32).to_be_bytes();
    checksum_ok(&[&s.octets(), &d.octets(), &len, &[0, 0, 0, 58], msg])
}

/// An echo reply: the request with addresses swapped, from the VIP (IPv6
/// extension headers may be kept or dropped).
fn echo_reply(inp: &[u8], out: &[u8], ip: &Ip) -> Check {
    const INV: &str = "echo-reply-answers-an-echo-request";
    let ty = inp.get(ip.l4).copied();
    let request = if ip.v6 {
        ty == Some(128)
    } else {
        ty == Some(8) && inp.get(ip.l4 + 1) == Some(&0)
    };
    if !request || ip.frag != Frag::No {
        return fail_case(
            INV,
            twice_fragmented(ip),
            format!("answered ICMP type {ty:?} fragment {:?}", ip.frag),
        );
    }
    let l3 = ip.off;
    if out[6..12] != LB_MAC || out[12..l3] != inp[12..l3] {
        return fail(INV, "Ethernet source or VLAN tags wrong");
    }
    let r = ip_at(out, l3, ip.v6).expect("read before");
    if r.src != ip.dst || r.dst != ip.src {
        return fail(
            INV,
            format!(
                "reply {} -> {} to a request {} -> {}",
                r.src, r.dst, ip.src, ip.dst
            ),
        );
    }
    if out.get(r.l4 + 1) != inp.get(ip.l4 + 1) || out.get(r.l4 + 4..) != inp.get(ip.l4 + 4..) {
        return fail(INV, "code, identifier, sequence or data changed");
    }
    if !ip.v6 {
        // Only TTL, checksum and the addresses change in the IPv4 header.
        let (a, b) = (&inp[l3..ip.l4], &out[l3..r.l4]);
        if a.len() != b.len() || a[..8] != b[..8] || a[9] != b[9] || b[8] == 0 || a[20..] != b[20..]
        {
            return fail(INV, format!("reply IPv4 header {}", hex(b)));
        }
        if checksum_ok(&[a]) && !checksum_ok(&[b]) {
            return fail(
                "tx-checksums-valid",
                format!("reply IPv4 header checksum: {}", hex(b)),
            );
        }
    } else {
        if out[l3..l3 + 4] != inp[l3..l3 + 4] || out[l3 + 7] == 0 || r.proto != Some(58) {
            return fail(INV, format!("reply IPv6 header {}", hex(&out[l3..l3 + 8])));
        }
        let consistent = |f: &[u8], x: &Ip| x.len == f.len() - x.off;
        if consistent(inp, ip) && !consistent(out, &r) {
            return fail(
                INV,
                format!(
                    "reply payload length {} for {} bytes",
                    r.len - 40,
                    out.len() - l3 - 40
                ),
            );
        }
    }
    if icmp_checksum_ok(inp, ip) && !icmp_checksum_ok(out, &r) {
        return fail(
            "tx-checksums-valid",
            "echo reply ICMP checksum wrong (the request's was right)",
        );
    }
    Ok(())
}

/// An ICMP error the balancer generated, to the sender of the frame.
fn icmp_error_to_source(class: &Class<'_>, inp: &[u8], out: &[u8], ip: &Ip) -> Check {
    const INV: &str = "icmp-error-to-the-source-is-well-formed";
    if !matches!(class, Class::Service(_)) {
        return fail_case(
            INV,
            twice_fragmented(ip),
            "an ICMP error about a frame that is not for a service",
        );
    }
    let l3 = ip.off;
    if out[6..12] != LB_MAC || out.get(12..l3) != inp.get(12..l3) {
        return fail(INV, "Ethernet source or VLAN tags wrong");
    }
    let Some(e) = ip_at(out, l3, ip.v6) else {
        return fail(INV, "no IP header");
    };
    if e.dst != ip.src || e.src != ip.dst || !e.sane || e.frag != Frag::No {
        return fail(
            INV,
            format!(
                "error {} -> {} about {} -> {}",
                e.src, e.dst, ip.src, ip.dst
            ),
        );
    }
    if e.len != out.len() - l3 {
        return fail(
            INV,
            format!("IP length {} for {} bytes", e.len, out.len() - l3),
        );
    }
    let ty = out.get(e.l4).copied().unwrap_or(0);
    let ok_type = if ip.v6 {
        e.proto == Some(58) && (1..=4).contains(&ty)
    } else {
        e.proto == Some(1) && matches!(ty, 3 | 11 | 12)
    };
    if !ok_type {
        return fail(INV, format!("protocol {:?} type {ty}", e.proto));
    }
    let quote = out.get(e.l4 + 8..).unwrap_or(&[]);
    if quote.is_empty() || inp.get(l3..l3 + quote.len()) != Some(quote) {
        return fail(INV, "the quote is not the start of the packet");
    }
    if !ip.v6 && !checksum_ok(&[&out[l3..e.l4]]) {
        return fail("tx-checksums-valid", "ICMP error IPv4 header checksum");
    }
    if !icmp_checksum_ok(out, &e) {
        return fail("tx-checksums-valid", "ICMP error checksum");
    }
    Ok(())
}

/// Checks one decapsulator run.
pub fn decap(world: &World, inp: &[u8], verdict: u32, out: &[u8]) -> Check {
    const INV: &str = "decap-output-is-input-or-its-inner-packet";
    if !matches!(verdict, XDP_PASS | XDP_DROP | XDP_TX) {
        return fail(
            "decap-verdict-is-pass-drop-or-tx",
            format!("verdict {verdict}"),
        );
    }
    if out == inp || verdict == XDP_DROP {
        return Ok(());
    }
    let Some(o) = ip_of(inp) else {
        return fail(
            INV,
            format!("changed a frame with no IP header: {}", hex(out)),
        );
    };
    let case = if !world.decap_addrs.contains(&o.dst) {
        "not to a local address"
    } else if o.frag != Frag::No {
        "outer fragment"
    } else if !o.sane {
        "broken outer header"
    } else {
        ""
    };
    if !case.is_empty() {
        return fail_case(
            "decap-only-whole-tunnels-to-local-addresses",
            case,
            format!("outer {} -> {} fragment {:?}", o.src, o.dst, o.frag),
        );
    }
    let et = match o.proto {
        Some(4) => ETH_IPV4,
        Some(41) if o.v6 => ETH_IPV6,
        p => {
            return fail(
                "decap-only-whole-tunnels-to-local-addresses",
                format!("outer protocol {p:?}"),
            );
        }
    };
    let l3 = o.off;
    let mut want = inp[..l3 - 2].to_vec();
    want.extend_from_slice(&et.to_be_bytes());
    want.extend_from_slice(inp.get(o.l4..).unwrap_or(&[]));
    if out != want {
        return fail(INV, format!("output {}\n  want   {}", hex(out), hex(&want)));
    }
    if verdict != XDP_PASS {
        return fail(INV, "decapsulated but not passed to the kernel");
    }
    let version = inp.get(o.l4).map(|b| b >> 4);
    let want_version = if et == ETH_IPV4 { 4 } else { 6 };
    if version != Some(want_version) {
        return fail(
            "decap-ethertype-matches-the-inner-packet",
            format!("ethertype {et:04x} for an inner packet of version {version:?}"),
        );
    }
    Ok(())
}

/// The tunnel round trip: the decapsulator turns the balancer's tunnel frame
/// back into the client's frame (addresses of the tunnel's Ethernet header).
pub fn roundtrip(client: &[u8], tunnelled: &[u8], verdict: u32, out: &[u8]) -> Check {
    let (l3, _) = l3_offset(client).expect("a forwarded frame has an IP header");
    let len = ip_of(client).map_or(0, |ip| ip.len);
    if verdict != XDP_PASS || out.get(l3..) != client.get(l3..l3 + len) {
        return fail(
            "tunnel-decapsulates-to-the-original-packet",
            format!(
                "decap {} of {}: {}",
                verdict_name(verdict),
                hex(tunnelled),
                hex(out)
            ),
        );
    }
    Ok(())
}

/// The checker must be able to fail: hand-made right and wrong outputs.
#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use xlb_tests::packet::{self, CLIENT_MAC, L2};

    use super::*;
    use crate::world::ROUTER_MAC;

    const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
    const VIP_DR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
    const VIP_TUN: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);

    fn key(r: Check) -> String {
        r.err().map(|v| v.key()).unwrap_or_default()
    }

    #[test]
    fn pass_with_changed_bytes_is_reported() {
        let w = World::new();
        let inp = packet::tcp(CLIENT, 40000, Ipv4Addr::new(203, 0, 113, 99), 80, true, &[]);
        assert_eq!(key(balancer(&w, &inp, XDP_PASS, &inp)), "");
        let mut out = inp.clone();
        out[40] ^= 1;
        assert_eq!(
            key(balancer(&w, &inp, XDP_PASS, &out)),
            "pass-leaves-bytes-unchanged"
        );
        assert_eq!(
            key(balancer(&w, &inp, XDP_ABORTED, &inp)),
            "verdict-is-pass-drop-or-tx"
        );
    }

    #[test]
    fn dropped_or_forwarded_frame_not_ours_is_reported() {
        let w = World::new();
        let other = packet::tcp(CLIENT, 40000, Ipv4Addr::new(203, 0, 113, 99), 80, true, &[]);
        assert_eq!(
            key(balancer(&w, &other, XDP_DROP, &other)),
            "not-ours-passes-untouched (not to a VIP address)"
        );
        let mut not_our_mac = packet::tcp(CLIENT, 40000, VIP_DR, 80, true, &[]);
        not_our_mac[..6].copy_from_slice(&[0xff; 6]);
        assert_eq!(
            key(balancer(&w, &not_our_mac, XDP_TX, &not_our_mac)),
            "not-ours-passes-untouched (not to the interface MAC)"
        );
    }

    #[test]
    fn dr_frame_to_another_mac_is_reported() {
        let w = World::new();
        let inp = packet::tcp(CLIENT, 40000, VIP_DR, 80, true, &[]);
        let mut out = inp.clone();
        out[..6].copy_from_slice(&[0x02, 0, 0, 0, 1, 11]);
        out[6..12].copy_from_slice(&LB_MAC);
        assert_eq!(key(balancer(&w, &inp, XDP_TX, &out)), "");
        // 198.51.100.14 serves the UDP service of the address, not this one.
        out[5] = 14;
        assert_eq!(
            key(balancer(&w, &inp, XDP_TX, &out)),
            "dr-frame-to-a-real-of-the-service"
        );
        out[5] = 11;
        out[11] ^= 1;
        assert_eq!(
            key(balancer(&w, &inp, XDP_TX, &out)),
            "dr-frame-from-interface-mac"
        );
    }

    #[test]
    fn tunnel_with_a_wrong_outer_checksum_or_real_is_reported() {
        let w = World::new();
        let inp = packet::tcp(CLIENT, 40000, VIP_TUN, 80, true, b"x");
        let real = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 21));
        let src = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 5));
        let good = packet::tunnel(src, real, L2::default(), ROUTER_MAC, 0, &inp[14..]);
        assert_eq!(key(balancer(&w, &inp, XDP_TX, &good)), "");
        let mut bad = good.clone();
        bad[24] ^= 0x10; // the outer header checksum
        assert_eq!(key(balancer(&w, &inp, XDP_TX, &bad)), "tx-checksums-valid");
        let elsewhere = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 99));
        let wrong = packet::tunnel(src, elsewhere, L2::default(), ROUTER_MAC, 0, &inp[14..]);
        assert_eq!(
            key(balancer(&w, &inp, XDP_TX, &wrong)),
            "tunnel-is-well-formed-to-a-real"
        );
        // DR-style output for a TUN service.
        let mut dr = inp.clone();
        dr[..6].copy_from_slice(&ROUTER_MAC);
        dr[6..12].copy_from_slice(&LB_MAC);
        assert_eq!(
            key(balancer(&w, &inp, XDP_TX, &dr)),
            "dr-only-for-dr-services"
        );
    }

    #[test]
    fn echo_reply_with_a_broken_checksum_is_reported() {
        let w = World::new();
        let inp = packet::icmp_echo_v4(CLIENT_MAC, LB_MAC, CLIENT, VIP_DR, false);
        let good = packet::icmp_echo_v4(LB_MAC, CLIENT_MAC, VIP_DR, CLIENT, true);
        assert_eq!(key(balancer(&w, &inp, XDP_TX, &good)), "");
        let mut bad = good.clone();
        bad[36] ^= 1; // the ICMP checksum
        assert_eq!(key(balancer(&w, &inp, XDP_TX, &bad)), "tx-checksums-valid");
        let mut bad_ip = good.clone();
        bad_ip[24] ^= 1; // the IPv4 header checksum
        assert_eq!(
            key(balancer(&w, &inp, XDP_TX, &bad_ip)),
            "tx-checksums-valid"
        );
    }

    #[test]
    fn decap_output_other_than_the_inner_packet_is_reported() {
        let w = World::new();
        let inner = packet::tcp(CLIENT, 40000, VIP_TUN, 80, true, b"x");
        let real = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 21));
        let src = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 5));
        let tun = packet::tunnel(src, real, L2::default(), LB_MAC, 0, &inner[14..]);
        let mut want = tun[..14].to_vec();
        want.extend_from_slice(&inner[14..]);
        assert_eq!(key(decap(&w, &tun, XDP_PASS, &want)), "");
        assert_eq!(key(decap(&w, &tun, XDP_PASS, &tun)), "");
        let mut cut = want.clone();
        cut.pop();
        assert_eq!(
            key(decap(&w, &tun, XDP_PASS, &cut)),
            "decap-output-is-input-or-its-inner-packet"
        );
        let elsewhere = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 99));
        let other = packet::tunnel(src, elsewhere, L2::default(), LB_MAC, 0, &inner[14..]);
        assert_eq!(
            key(decap(&w, &other, XDP_PASS, &want)),
            "decap-only-whole-tunnels-to-local-addresses (not to a local address)"
        );
    }
}
