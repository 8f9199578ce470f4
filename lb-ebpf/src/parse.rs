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

/// A value held on the stack at an 8-byte boundary.
///
/// The objects are built with LLVM's `allows-misaligned-mem-access`, which
/// lets the backend read and write a wider word wherever it likes. The
/// verifier accepts that in the packet but never on the stack, so every value
/// the data path keeps on the stack must be naturally aligned: a map key of
/// byte arrays (2- or 4-byte aligned by its fields) goes through this wrapper,
/// so that a 16-byte address in it is copied as two aligned 8-byte words.
/// The wrapper never crosses the map boundary: the key is `&held.0`.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub struct Aligned<T>(pub T);

/// An IP address as the data path keeps it: 16 bytes (IPv4 in the first 4,
/// the rest zero), 8-byte aligned (see [`Aligned`]).
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C, align(8))]
pub struct Addr(pub [u8; 16]);

impl Addr {
    /// An IPv4 address, zero-extended.
    #[inline(always)]
    pub fn v4(a: [u8; 4]) -> Self {
        // Built from two 8-byte words: a zeroed byte array costs a `memset`
        // call in BPF, and 4-byte words let LLVM merge the middle two zero
        // words into one misaligned 8-byte store.
        let words = [u64::from_ne_bytes([a[0], a[1], a[2], a[3], 0, 0, 0, 0]), 0];
        // SAFETY: [u64; 2] and [u8; 16] have the same size and any bytes are valid.
        Self(unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(words) })
    }

    /// The address as two 8-byte words (wire bytes in native words).
    #[inline(always)]
    pub fn words(&self) -> [u64; 2] {
        // SAFETY: same size; any bytes are a valid [u64; 2].
        unsafe { core::mem::transmute::<[u8; 16], [u64; 2]>(self.0) }
    }

    /// The first four bytes (an IPv4 address) as one word in wire order.
    #[inline(always)]
    pub fn word32(&self) -> u32 {
        u32::from_ne_bytes([self.0[0], self.0[1], self.0[2], self.0[3]])
    }
}

/// Writes a 16-byte address (from a map value or an [`Addr`]) at `offset`
/// in the packet as two 8-byte words: a `[u8; 16]` copy is a `memmove` call
/// in BPF. False when it does not fit.
#[inline(always)]
pub fn write_addr(ctx: &XdpContext, offset: usize, a: &[u8; 16]) -> bool {
    let hi = u64::from_ne_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]);
    let lo = u64::from_ne_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]);
    let Some(p) = ptr_at::<[u8; 16]>(ctx, offset) else {
        return false;
    };
    // SAFETY: ptr_at checked the 16 bytes; unaligned as in write_at.
    unsafe {
        p.cast::<u64>().write_unaligned(hi);
        p.cast::<u8>().add(8).cast::<u64>().write_unaligned(lo);
    }
    true
}

/// A MAC address held as a 4-byte and a 2-byte word (wire bytes in native
/// words): copied with two loads and two stores, where a `[u8; 6]` is a
/// `memmove` call in BPF.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Mac {
    head: u32,
    tail: u16,
}

impl Mac {
    /// The MAC address stored as bytes (in a map value).
    #[inline(always)]
    pub fn of(b: &[u8; 6]) -> Self {
        Self {
            head: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            tail: u16::from_ne_bytes([b[4], b[5]]),
        }
    }
}

/// Reads the MAC address at `offset` in the packet.
#[inline(always)]
pub fn read_mac(ctx: &XdpContext, offset: usize) -> Option<Mac> {
    let p = ptr_at::<[u8; 6]>(ctx, offset)?;
    // SAFETY: ptr_at checked the 6 bytes; unaligned as in read_at.
    unsafe {
        Some(Mac {
            head: p.cast::<u32>().read_unaligned(),
            tail: p.cast::<u8>().add(4).cast::<u16>().read_unaligned(),
        })
    }
}

/// Writes a MAC address at `offset` in the packet; false when it does not fit.
#[inline(always)]
pub fn write_mac(ctx: &XdpContext, offset: usize, mac: Mac) -> bool {
    let Some(p) = ptr_at::<[u8; 6]>(ctx, offset) else {
        return false;
    };
    // SAFETY: ptr_at checked the 6 bytes; unaligned as in write_at.
    unsafe {
        p.cast::<u32>().write_unaligned(mac.head);
        p.cast::<u8>()
            .add(4)
            .cast::<u16>()
            .write_unaligned(mac.tail);
    }
    true
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
    pub src: Addr,
    /// Destination address.
    pub dst: Addr,
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
    Ok(L3 {
        family: FAMILY_V4,
        src: Addr::v4(ip.src_addr),
        dst: Addr::v4(ip.dst_addr),
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
        src: Addr(ip.src_addr),
        dst: Addr(ip.dst_addr),
        proto,
        l4_off: off + Ipv6Hdr::LEN + (ext & 0x1ff),
        len: Ipv6Hdr::LEN + u16::from_be_bytes(ip.payload_len) as usize,
        tos: (ip.vcf[0] << 4) | (ip.vcf[1] >> 4),
        fragment,
        later_fragment,
        df: false,
    })
}
