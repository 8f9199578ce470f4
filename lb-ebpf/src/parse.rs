//! Bounds-checked access to packet bytes (the one idiom every header read
//! uses) and the header walk shared by the balancer and the decapsulator.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use lb_common::{FAMILY_V4, FAMILY_V6};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

/// A pointer to a `T` at `offset` bytes into the packet, or `None` when the
/// packet is too short to hold it.
///
/// Use it for types of two bytes or more: for a one-byte `T`, LLVM rewrites
/// the check as `ptr >= end`, which the verifier does not take as a bound.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Copies a `T` out of the packet at `offset`.
#[inline(always)]
pub fn read_at<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: ptr_at checked that the packet holds size_of::<T>() bytes there;
    // read_unaligned because packet fields have no alignment guarantee.
    ptr_at::<T>(ctx, offset).map(|p| unsafe { p.read_unaligned() })
}

/// Writes a `T` into the packet at `offset`; false when it does not fit.
#[inline(always)]
pub fn write_at<T>(ctx: &XdpContext, offset: usize, value: T) -> bool {
    match ptr_at::<T>(ctx, offset) {
        // SAFETY: bounds checked by ptr_at; unaligned for the same reason as read_at.
        Some(p) => {
            unsafe { p.write_unaligned(value) };
            true
        }
        None => false,
    }
}

/// Ethertypes, as the two wire bytes read into a native u16.
pub const ETH_P_IP: u16 = 0x0800u16.to_be();
/// IPv6.
pub const ETH_P_IPV6: u16 = 0x86ddu16.to_be();
/// 802.1Q VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100u16.to_be();
/// 802.1ad service tag (QinQ outer tag).
pub const ETH_P_8021AD: u16 = 0x88a8u16.to_be();

/// Ethernet header length without tags.
pub const ETH_LEN: usize = 14;

/// Where the network header starts and what it is.
#[derive(Clone, Copy)]
pub struct L2 {
    /// Offset of the IP header (14, 18 or 22).
    pub l3_off: usize,
    /// The ethertype after any VLAN tags (wire bytes in a native u16).
    pub ethertype: u16,
}

/// Walks Ethernet and up to two VLAN tags (802.1ad/802.1Q), which are kept as they are.
#[inline(always)]
pub fn l2(ctx: &XdpContext) -> Option<L2> {
    let mut ethertype: u16 = read_at(ctx, 12)?;
    let mut l3_off = ETH_LEN;
    if ethertype == ETH_P_8021AD || ethertype == ETH_P_8021Q {
        ethertype = read_at(ctx, l3_off + 2)?;
        l3_off += 4;
        if ethertype == ETH_P_8021Q {
            ethertype = read_at(ctx, l3_off + 2)?;
            l3_off += 4;
        }
    }
    Some(L2 { l3_off, ethertype })
}

/// IPv6 extension headers skipped on the way to the transport header.
const NH_HOP_BY_HOP: u8 = 0;
const NH_ROUTING: u8 = 43;
const NH_FRAGMENT: u8 = 44;
const NH_AH: u8 = 51;
const NH_DEST_OPTS: u8 = 60;
/// How many extension headers we walk before giving up (a bounded loop).
const MAX_EXT_HEADERS: usize = 4;
/// The transport header must start within this many bytes of the IP header.
const MAX_L3_LEN: usize = 256;

/// The network layer of a packet: addresses, transport protocol and offsets.
#[derive(Clone, Copy)]
pub struct L3 {
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Source address (IPv4 in the first 4 bytes).
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Transport protocol (after IPv6 extension headers).
    pub proto: u8,
    /// Offset of the transport header.
    pub l4_off: usize,
    /// Length of the IP packet from its own header (not counting L2 padding).
    pub len: usize,
    /// IPv4 TOS / IPv6 traffic class (DSCP and ECN).
    pub tos: u8,
    /// A fragment (IPv4 MF or offset set; an IPv6 fragment header).
    pub fragment: bool,
    /// A fragment other than the first (offset set): no transport header.
    pub later_fragment: bool,
    /// IPv4 "don't fragment" (copied to an outer IPv4 header, RFC 2003).
    pub df: bool,
}

/// Why an IP header could not be parsed.
pub enum L3Error {
    /// Cut short or inconsistent.
    Malformed,
    /// A well-formed packet we do not look into (too many extension headers, ESP).
    Unsupported,
}

/// Parses the IPv4 header at `off`.
#[inline(always)]
pub fn ipv4(ctx: &XdpContext, off: usize) -> Result<L3, L3Error> {
    let ip: Ipv4Hdr = read_at(ctx, off).ok_or(L3Error::Malformed)?;
    // Header length in bytes; the mask keeps the verifier's bound at 60.
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(L3Error::Malformed);
    }
    let len = u16::from_be_bytes(ip.tot_len) as usize;
    if len < ihl {
        return Err(L3Error::Malformed);
    }
    let mut src = [0u8; 16];
    src[..4].copy_from_slice(&ip.src_addr);
    let mut dst = [0u8; 16];
    dst[..4].copy_from_slice(&ip.dst_addr);
    Ok(L3 {
        family: FAMILY_V4,
        src,
        dst,
        proto: ip.proto,
        l4_off: off + ihl,
        len,
        tos: ip.tos,
        // MF flag or a non-zero offset.
        fragment: u16::from_be_bytes(ip.frags) & 0x3fff != 0,
        later_fragment: u16::from_be_bytes(ip.frags) & 0x1fff != 0,
        df: u16::from_be_bytes(ip.frags) & 0x4000 != 0,
    })
}

/// Parses the IPv6 header at `off`, skipping hop-by-hop, routing, destination
/// options and AH headers. A fragment header marks the packet as a fragment.
#[inline(always)]
pub fn ipv6(ctx: &XdpContext, off: usize) -> Result<L3, L3Error> {
    let ip: Ipv6Hdr = read_at(ctx, off).ok_or(L3Error::Malformed)?;
    if ip.vcf[0] >> 4 != 6 {
        return Err(L3Error::Malformed);
    }
    let mut proto = ip.next_hdr;
    let mut ext = 0usize;
    let mut fragment = false;
    let mut later_fragment = false;
    for _ in 0..MAX_EXT_HEADERS {
        match proto {
            NH_HOP_BY_HOP | NH_ROUTING | NH_DEST_OPTS => {
                let h: [u8; 2] =
                    read_at(ctx, off + Ipv6Hdr::LEN + ext).ok_or(L3Error::Malformed)?;
                proto = h[0];
                ext += (h[1] as usize + 1) * 8;
            }
            NH_AH => {
                let h: [u8; 2] =
                    read_at(ctx, off + Ipv6Hdr::LEN + ext).ok_or(L3Error::Malformed)?;
                proto = h[0];
                ext += (h[1] as usize + 2) * 4;
            }
            NH_FRAGMENT => {
                let h: [u8; 4] =
                    read_at(ctx, off + Ipv6Hdr::LEN + ext).ok_or(L3Error::Malformed)?;
                proto = h[0];
                ext += 8;
                // Offset or M flag set: a real fragment (an atomic fragment
                // header with both clear carries a whole packet). A packet
                // is a fragment if any of its fragment headers says so, and
                // past a later fragment's header comes fragment data, not
                // headers.
                let frag = u16::from_be_bytes([h[2], h[3]]);
                fragment |= frag & 0xfff9 != 0;
                if frag & 0xfff8 != 0 {
                    later_fragment = true;
                    break;
                }
            }
            _ => break,
        }
        // Keeps the offset bounded for the verifier and refuses absurd chains.
        if ext > MAX_L3_LEN {
            return Err(L3Error::Unsupported);
        }
    }
    if !later_fragment
        && matches!(
            proto,
            NH_HOP_BY_HOP | NH_ROUTING | NH_DEST_OPTS | NH_AH | NH_FRAGMENT
        )
    {
        return Err(L3Error::Unsupported);
    }
    Ok(L3 {
        family: FAMILY_V6,
        src: ip.src_addr,
        dst: ip.dst_addr,
        proto,
        l4_off: off + Ipv6Hdr::LEN + (ext & 0x1ff),
        len: Ipv6Hdr::LEN + u16::from_be_bytes(ip.payload_len) as usize,
        tos: (ip.vcf[0] << 4) | (ip.vcf[1] >> 4),
        fragment,
        later_fragment,
        df: false,
    })
}
