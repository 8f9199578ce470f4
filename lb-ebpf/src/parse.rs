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

    /// Reads a 16-byte address from the packet as two 8-byte words (a
    /// `[u8; 16]` copy may be made a byte at a time).
    ///
    /// # Safety
    ///
    /// `p` points at 16 bytes inside the packet, bounds-checked.
    #[inline(always)]
    pub unsafe fn read(p: *const [u8; 16]) -> Self {
        // SAFETY: the caller's promise; unaligned as in read_at.
        let words = unsafe {
            [
                p.cast::<u64>().read_unaligned(),
                p.cast::<u8>().add(8).cast::<u64>().read_unaligned(),
            ]
        };
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

/// Walks Ethernet and up to two VLAN tags (802.1ad/802.1Q), which are kept
/// as they are. Also returns the destination MAC address, read under the same
/// bounds check as the ethertype.
#[inline(always)]
pub fn l2(ctx: &XdpContext) -> Option<(L2, Mac)> {
    let eth = ptr_at::<[u8; ETH_LEN]>(ctx, 0)?;
    // SAFETY: ptr_at checked the 14 bytes; unaligned as in read_at.
    let (dst, mut ethertype) = unsafe {
        let p = eth.cast::<u8>();
        let dst = Mac {
            head: p.cast::<u32>().read_unaligned(),
            tail: p.add(4).cast::<u16>().read_unaligned(),
        };
        (dst, p.add(12).cast::<u16>().read_unaligned())
    };
    let mut l3_off = ETH_LEN;
    if ethertype == ETH_P_8021AD || ethertype == ETH_P_8021Q {
        ethertype = read_at(ctx, l3_off + 2)?;
        l3_off += 4;
        if ethertype == ETH_P_8021Q {
            ethertype = read_at(ctx, l3_off + 2)?;
            l3_off += 4;
        }
    }
    Some((L2 { l3_off, ethertype }, dst))
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

/// Parses the IPv4 header at `off`: the whole header read at once (the
/// balancer's own packets take [`ipv4_header`], which reads less).
#[inline(always)]
pub fn ipv4(ctx: &XdpContext, off: usize) -> Result<L3, L3Error> {
    let ip: Ipv4Hdr = read_at(ctx, off).ok_or(L3Error::Malformed)?;
    let (ihl, len) = ipv4_lengths(ip.vihl, ip.tot_len)?;
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

/// The IPv4 header length and total length, checked against each other and
/// the version.
#[inline(always)]
pub fn ipv4_lengths(vihl: u8, tot_len: [u8; 2]) -> Result<(usize, usize), L3Error> {
    // Header length in bytes; the mask keeps the verifier's bound at 60.
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(L3Error::Malformed);
    }
    let len = u16::from_be_bytes(tot_len) as usize;
    if len < ihl {
        return Err(L3Error::Malformed);
    }
    Ok((ihl, len))
}

/// An IPv4 header in the packet that passed the checks (version, header
/// length, total length). Its fields are read from the packet when asked, so
/// a caller that stops after the destination reads nothing else. Valid until
/// the packet's head or tail moves.
#[derive(Clone, Copy)]
pub struct Ipv4 {
    hdr: *const Ipv4Hdr,
    off: usize,
    ihl: usize,
    len: usize,
}

/// Checks the IPv4 header at `off`.
#[inline(always)]
pub fn ipv4_header(ctx: &XdpContext, off: usize) -> Result<Ipv4, L3Error> {
    let hdr = ptr_at::<Ipv4Hdr>(ctx, off).ok_or(L3Error::Malformed)?;
    // SAFETY: ptr_at checked the header's 20 bytes; unaligned as in read_at.
    let (vihl, tot_len) = unsafe { ((*hdr).vihl, (*hdr).tot_len) };
    let (ihl, len) = ipv4_lengths(vihl, tot_len)?;
    Ok(Ipv4 { hdr, off, ihl, len })
}

impl Ipv4 {
    /// The destination address.
    #[inline(always)]
    pub fn dst(&self) -> Addr {
        // SAFETY: checked by ipv4_header (see the type's note).
        Addr::v4(unsafe { (*self.hdr).dst_addr })
    }

    /// The transport protocol.
    #[inline(always)]
    pub fn proto(&self) -> u8 {
        // SAFETY: as in dst.
        unsafe { (*self.hdr).proto }
    }

    /// Offset of the transport header.
    #[inline(always)]
    pub fn l4_off(&self) -> usize {
        self.off + self.ihl
    }

    /// The flags and fragment offset, host order.
    #[inline(always)]
    fn frags(&self) -> u16 {
        // SAFETY: as in dst.
        u16::from_be_bytes(unsafe { (*self.hdr).frags })
    }

    /// A fragment other than the first: no transport header.
    #[inline(always)]
    pub fn later_fragment(&self) -> bool {
        self.frags() & 0x1fff != 0
    }

    /// The whole network layer.
    #[inline(always)]
    pub fn l3(&self) -> L3 {
        // SAFETY: as in dst. The whole header by value, as one set of loads.
        let ip = unsafe { self.hdr.read_unaligned() };
        let frags = u16::from_be_bytes(ip.frags);
        L3 {
            family: FAMILY_V4,
            src: Addr::v4(ip.src_addr),
            dst: Addr::v4(ip.dst_addr),
            proto: ip.proto,
            l4_off: self.l4_off(),
            len: self.len,
            tos: ip.tos,
            // MF flag or a non-zero offset.
            fragment: frags & 0x3fff != 0,
            later_fragment: frags & 0x1fff != 0,
            df: frags & 0x4000 != 0,
        }
    }
}

/// Parses the IPv6 header at `off`, skipping hop-by-hop, routing, destination
/// options and AH headers. A fragment header marks the packet as a fragment.
#[inline(always)]
pub fn ipv6(ctx: &XdpContext, off: usize) -> Result<L3, L3Error> {
    let ip: Ipv6Hdr = read_at(ctx, off).ok_or(L3Error::Malformed)?;
    if ip.vcf[0] >> 4 != 6 {
        return Err(L3Error::Malformed);
    }
    let walk = ipv6_walk(ctx, off, ip.next_hdr)?;
    Ok(L3 {
        family: FAMILY_V6,
        src: Addr(ip.src_addr),
        dst: Addr(ip.dst_addr),
        proto: walk.proto,
        l4_off: walk.l4_off,
        len: Ipv6Hdr::LEN + u16::from_be_bytes(ip.payload_len) as usize,
        tos: (ip.vcf[0] << 4) | (ip.vcf[1] >> 4),
        fragment: walk.fragment,
        later_fragment: walk.later_fragment,
        df: false,
    })
}

/// An IPv6 header in the packet and its extension headers walked to the
/// transport protocol; the addresses, traffic class and length are read from
/// the packet when asked. Valid until the packet's head or tail moves.
#[derive(Clone, Copy)]
pub struct Ipv6 {
    hdr: *const Ipv6Hdr,
    /// The extension headers walked.
    pub walk: Ipv6Walk,
}

/// Checks the IPv6 header at `off` and walks its extension headers (see [`ipv6`]).
#[inline(always)]
pub fn ipv6_header(ctx: &XdpContext, off: usize) -> Result<Ipv6, L3Error> {
    let hdr = ptr_at::<Ipv6Hdr>(ctx, off).ok_or(L3Error::Malformed)?;
    // SAFETY: ptr_at checked the header's 40 bytes; unaligned as in read_at.
    let (version, next_hdr) = unsafe { ((*hdr).vcf[0] >> 4, (*hdr).next_hdr) };
    if version != 6 {
        return Err(L3Error::Malformed);
    }
    Ok(Ipv6 {
        hdr,
        walk: ipv6_walk(ctx, off, next_hdr)?,
    })
}

/// What the walk over an IPv6 header's extension headers found.
#[derive(Clone, Copy)]
pub struct Ipv6Walk {
    /// Transport protocol (after the extension headers).
    pub proto: u8,
    /// Offset of the transport header.
    pub l4_off: usize,
    /// A fragment header says this is a fragment.
    pub fragment: bool,
    /// A fragment other than the first: no transport header.
    pub later_fragment: bool,
}

/// Walks the extension headers of the IPv6 header at `off`, whose next
/// header is `proto`.
#[inline(always)]
pub fn ipv6_walk(ctx: &XdpContext, off: usize, mut proto: u8) -> Result<Ipv6Walk, L3Error> {
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
    Ok(Ipv6Walk {
        proto,
        l4_off: off + Ipv6Hdr::LEN + (ext & 0x1ff),
        fragment,
        later_fragment,
    })
}

impl Ipv6 {
    /// The destination address.
    #[inline(always)]
    pub fn dst(&self) -> Addr {
        // SAFETY: checked by ipv6_header (see the type's note).
        unsafe { Addr::read(&raw const (*self.hdr).dst_addr) }
    }

    /// The whole network layer.
    #[inline(always)]
    pub fn l3(&self) -> L3 {
        // SAFETY: as in dst. The whole header by value, as one set of loads.
        let ip = unsafe { self.hdr.read_unaligned() };
        L3 {
            family: FAMILY_V6,
            src: Addr(ip.src_addr),
            dst: Addr(ip.dst_addr),
            proto: self.walk.proto,
            l4_off: self.walk.l4_off,
            len: Ipv6Hdr::LEN + u16::from_be_bytes(ip.payload_len) as usize,
            tos: (ip.vcf[0] << 4) | (ip.vcf[1] >> 4),
            fragment: self.walk.fragment,
            later_fragment: self.walk.later_fragment,
            df: false,
        }
    }
}
