//! Benchmark-only XDP programs (`./x bench`), never attached by the daemon:
//!
//! - `xlb_floor_pass` and `xlb_floor_tx`: the floors every per-packet figure is
//!   a ratio to. One returns XDP_PASS; the other swaps the Ethernet addresses
//!   and returns XDP_TX, the least a forwarding XDP program can do.
//! - `xlb_floor_drop`: the sink on the veth peer in live-frames runs (a veth
//!   only delivers XDP_TX frames to a peer that runs an XDP program).
//! - `xlb_live_restore`: the live-frames driver. Live mode recycles frame
//!   pages without copying the input again, so a program that rewrote or
//!   encapsulated a frame would next see its own output. This program first
//!   writes the pristine frame (`XLB_BENCH_FRAME`) back over the frame, then
//!   tail-calls the program under test (`XLB_BENCH_NEXT[0]`), so every case,
//!   the floor included, pays the same small restore.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{
        bindings::xdp_action,
        macros::{map, xdp},
        maps::{Array, ProgramArray},
        programs::XdpContext,
    };

    /// Length of the frames live runs use (a TCP segment padded to 64 bytes).
    const FRAME_LEN: usize = 64;

    /// The pristine frame of the running live case, written by the bench.
    #[map(name = "XLB_BENCH_FRAME")]
    static FRAME: Array<[u64; FRAME_LEN / 8]> = Array::with_max_entries(1, 0);

    /// Slot 0: the program under test.
    #[map(name = "XLB_BENCH_NEXT")]
    static NEXT: ProgramArray = ProgramArray::with_max_entries(1, 0);

    /// Returns XDP_PASS.
    #[xdp]
    pub fn xlb_floor_pass(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_PASS
    }

    /// Returns XDP_DROP.
    #[xdp]
    pub fn xlb_floor_drop(_ctx: XdpContext) -> u32 {
        xdp_action::XDP_DROP
    }

    /// Swaps destination and source MAC and returns XDP_TX.
    #[xdp]
    pub fn xlb_floor_tx(ctx: XdpContext) -> u32 {
        let start = ctx.data();
        if start + 12 > ctx.data_end() {
            return xdp_action::XDP_PASS;
        }
        let p = start as *mut [u8; 6];
        // SAFETY: the 12 bytes were bounds-checked above; unaligned accesses.
        unsafe {
            let dst = p.read_unaligned();
            let src = p.add(1).read_unaligned();
            p.write_unaligned(src);
            p.add(1).write_unaligned(dst);
        }
        xdp_action::XDP_TX
    }

    /// Restores the pristine frame, then runs the program under test.
    #[xdp]
    pub fn xlb_live_restore(ctx: XdpContext) -> u32 {
        let start = ctx.data();
        if start + FRAME_LEN > ctx.data_end() {
            return xdp_action::XDP_ABORTED;
        }
        let Some(frame) = FRAME.get(0) else {
            return xdp_action::XDP_ABORTED;
        };
        let p = start as *mut u64;
        let mut i = 0;
        while i < FRAME_LEN / 8 {
            // SAFETY: FRAME_LEN bytes were bounds-checked above; i < FRAME_LEN / 8.
            unsafe { p.add(i).write_unaligned(frame[i]) };
            i += 1;
        }
        // SAFETY: a tail call into the program the bench put in slot 0; it
        // only returns here when the slot is empty.
        unsafe { NEXT.tail_call(&ctx, 0) };
        xdp_action::XDP_ABORTED
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
    eprintln!(
        "lb-floor holds benchmark XDP programs; it is built for BPF by lb-userspace's build.rs"
    );
}
