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

/// The checksum of a 20-byte IPv4 header whose checksum field is zero.
#[inline(always)]
pub fn ipv4_header(hdr: &[u8; 20]) -> u16 {
    let mut sum = 0u64;
    let mut i = 0;
    while i < 20 {
        sum += u64::from(u16::from_be_bytes([hdr[i], hdr[i + 1]]));
        i += 2;
    }
    !fold(sum)
}

/// Updates checksum `check` (host order) for one 16-bit word changing from
/// `old` to `new` (host order): HC' = ~(~HC + ~m + m').
#[inline(always)]
pub fn replace16(check: u16, old: u16, new: u16) -> u16 {
    let sum = u64::from(!check) + u64::from(!old) + u64::from(new);
    !fold(sum)
}
