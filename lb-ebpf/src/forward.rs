//! Forwarding modes. DR: the frame goes to the real's MAC unchanged otherwise.

use network_types::eth::EthHdr;

/// Rewrites the Ethernet header for direct return: destination = the real's
/// MAC, source = the balancer interface's MAC. The IP packet is untouched, so
/// no checksum changes.
#[inline(always)]
pub fn dr_rewrite(eth: *mut EthHdr, real_mac: &[u8; 6], iface_mac: &[u8; 6]) {
    // SAFETY: the caller obtained `eth` from ptr_at, which checked its bounds.
    unsafe {
        (*eth).dst_addr = *real_mac;
        (*eth).src_addr = *iface_mac;
    }
}
