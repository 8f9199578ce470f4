//! Internet checksums (RFC 1071) and their incremental update (RFC 1624).

/// Folds a 32-bit-or-wider one's-complement sum to 16 bits.
#[inline(always)]
pub fn fold(mut sum: u64) -> u16 {
    // Four folds always suffice for a u64; a fixed count keeps the verifier happy.
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum of an IPv4 header given as its first 8 bytes, TTL and
/// protocol, source and destination (options none, checksum field zero).
#[inline(always)]
pub fn ipv4_parts(head: &[u8; 8], ttl_proto: [u8; 2], src: [u8; 4], dst: [u8; 4]) -> u16 {
    let w = |a: u8, b: u8| u64::from(u16::from_be_bytes([a, b]));
    let sum = w(head[0], head[1])
        + w(head[2], head[3])
        + w(head[4], head[5])
        + w(head[6], head[7])
        + w(ttl_proto[0], ttl_proto[1])
        + w(src[0], src[1])
        + w(src[2], src[3])
        + w(dst[0], dst[1])
        + w(dst[2], dst[3]);
    !fold(sum)
}

/// Updates checksum `check` (host order) for one 16-bit word changing from
/// `old` to `new` (host order): HC' = ~(~HC + ~m + m').
#[inline(always)]
pub fn replace16(check: u16, old: u16, new: u16) -> u16 {
    let sum = u64::from(!check) + u64::from(!old) + u64::from(new);
    !fold(sum)
}
