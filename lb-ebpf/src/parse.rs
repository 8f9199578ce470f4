//! Bounds-checked access to packet bytes: the one idiom every header read uses.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;

/// A pointer to a `T` at `offset` bytes into the packet, or `None` when the
/// packet is too short to hold it.
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
