//! The xlb XDP programs: the balancer (`xlb`) and a pass-through (`xlb_pass`).
//!
//! Only the entry points live here; each concern has its own module:
//! `parse` (bounds-checked header walk), `maps`, `conntrack`, `select`
//! (Maglev lookup), `forward` (DR rewrite, TUN encapsulation), `icmp`, `csum`
//! and `stats` (per-CPU counters). The real-server decapsulator is a separate
//! object (`src/bin/lb-decap.rs`).
//!
//! Built for the host (e.g. by `cargo clippy --workspace`) this is an empty
//! binary; the real object is built for `bpfel-unknown-none` by aya-build.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// `core::intrinsics::atomic_cxchg`: the conntrack table claims a way with a
// compare-and-swap (BPF_CMPXCHG), which core's atomics do not offer on BPF.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod balancer;
#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod csum;
#[cfg(target_arch = "bpf")]
mod forward;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod select;
#[cfg(target_arch = "bpf")]
mod stats;

#[cfg(target_arch = "bpf")]
use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("lb-ebpf holds XDP programs; it is built for BPF by lb-userspace's build.rs");
}

#[cfg(target_arch = "bpf")]
/// The balancer: forwards packets for virtual services, passes everything else.
#[xdp]
pub fn xlb(ctx: XdpContext) -> u32 {
    balancer::run(&ctx)
}

#[cfg(target_arch = "bpf")]
/// Passes every packet. Attached to veth peers that must receive XDP_TX frames
/// (a veth only delivers XDP_TX frames to a peer that runs an XDP program).
#[xdp]
pub fn xlb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
