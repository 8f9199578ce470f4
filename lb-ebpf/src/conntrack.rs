//! Connection tracking: a flow keeps its real across changes of the real set.
//!
//! - A TCP SYN always takes a fresh Maglev choice and (re)writes the entry, so a
//!   reused 5-tuple never inherits a stale real.
//! - Any other packet uses its entry when there is one and its real still
//!   exists: the real's slot is in use and has the generation the entry
//!   recorded (a slot given to another real has another generation); UDP
//!   entries idle longer than `Config::udp_idle_ns` (plus the stamp's grain,
//!   `lb_common::udp_stamp_grain_ns`) are ignored.
//! - A hit writes nothing but a `last_seen_ns` older than its grain, and
//!   takes the flow hash from the entry (a tunnel's outer source needs it).
//! - New entries are rate-limited per CPU (flood guard): above the limit the
//!   flow is forwarded by Maglev alone, which still gives a consistent answer
//!   while the real set is unchanged.
//! - Only an entry that did not exist (or had expired) counts as a new flow: a
//!   SYN retransmit, a flood-guard bypass or an ICMP error is no new flow.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::bpf_ktime_get_coarse_ns,
};
use lb_common::{
    Config, FlowKey, FlowState, PROTO_UDP, RealDef, TCP_STAMP_GRAIN_NS, VIP_F_HASH_SRC_ONLY,
    VipMeta, WINDOW_NEW_FLOWS, flow_hash, src_hash, stat, udp_stamp_grain_ns,
};

use crate::{maps::FLOWS, select, stats};

/// The real chosen for a flow and whether the flow is new.
pub struct Choice {
    pub real_id: u32,
    /// The real's definition (looked up once, used to forward).
    pub real: &'static RealDef,
    /// A conntrack entry was created for the flow (counted as a new flow).
    pub new_flow: bool,
    /// The flow's 5-tuple [`flow_hash`] (from the entry on a hit).
    pub hash: u32,
}

/// What the caller does with the flow.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Track {
    /// A packet of the flow: refresh its entry, record it when new, count events.
    Packet,
    /// An ICMP error about the flow: read the entry only (no stamp refresh, no
    /// new entry, no conntrack events).
    ErrorAbout,
}

/// Now, CLOCK_MONOTONIC at tick resolution (a few ms): reads the kernel's
/// cached time instead of the clock source, which every tracked packet can
/// afford. Stamps, idle timeouts and rate windows need no better.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// The real for `flow`: from the conntrack table, else from the VIP's table
/// (then recorded for [`Track::Packet`]). `None` when the VIP has no usable
/// real. The flow hash is only computed when the table is consulted.
#[inline(always)]
pub fn choose(
    meta: &VipMeta,
    flow: &FlowKey,
    syn: bool,
    track: Track,
    config: &Config,
) -> Option<Choice> {
    let packet = track == Track::Packet;
    let udp = flow.proto == PROTO_UDP;
    let mut stamp = 0u64;
    if !syn {
        // SAFETY: a lookup in a map only this program and the daemon touch.
        match FLOWS.get_ptr_mut(flow) {
            Some(entry) => {
                // SAFETY: the pointer is a live map value; racing updates from
                // another CPU only move last_seen, which is advisory.
                let state = unsafe { &mut *entry };
                stamp = now();
                let age = stamp.saturating_sub(state.last_seen_ns);
                let grain = if udp {
                    udp_stamp_grain_ns(config.udp_idle_ns)
                } else {
                    TCP_STAMP_GRAIN_NS
                };
                let fresh = !udp || age <= config.udp_idle_ns.saturating_add(grain);
                if fresh
                    && let Some(real) = select::real(state.real_id)
                    && real.generation == state.generation
                {
                    if packet {
                        // Coarsely, so that most packets write nothing (a
                        // written line must leave every other CPU's cache).
                        if age >= grain {
                            state.last_seen_ns = stamp;
                        }
                        stats::event(stat::CT_HIT);
                    }
                    return Some(Choice {
                        real_id: state.real_id,
                        real,
                        new_flow: false,
                        hash: state.hash,
                    });
                }
                // An idle UDP entry is as good as gone: only a live entry
                // whose real is gone is stale.
                if fresh && packet {
                    stats::event(stat::CT_STALE);
                }
            }
            None => {
                if packet {
                    stats::event(stat::CT_MISS);
                }
            }
        }
    }
    let hash = flow_hash(&flow.src, &flow.dst, flow.ports, flow.proto);
    let maglev = if meta.flags & VIP_F_HASH_SRC_ONLY != 0 {
        src_hash(&flow.src)
    } else {
        hash
    };
    let real_id = select::pick(meta, maglev)?;
    let real = select::real(real_id)?;
    let mut new_flow = false;
    if packet && admit_new_flow(config) {
        if stamp == 0 {
            stamp = now();
        }
        let state = FlowState {
            real_id,
            generation: real.generation,
            last_seen_ns: stamp,
            hash,
            _pad: 0,
        };
        // A SYN did not look: it inserts only-if-absent, and a SYN whose
        // tuple has an entry (a retransmit, or a reused tuple) re-pins it
        // without counting a new flow. Any other packet got here without a
        // usable entry (none, idle or stale): a new flow for its real.
        let flags = if syn { BPF_NOEXIST } else { BPF_ANY };
        if FLOWS.insert(flow, &state, u64::from(flags)).is_ok() {
            new_flow = true;
            stats::event(stat::CT_NEW);
        } else if !(syn && FLOWS.insert(flow, &state, u64::from(BPF_ANY)).is_ok()) {
            stats::event(stat::CT_INSERT_FAILED);
        }
    }
    Some(Choice {
        real_id,
        real,
        new_flow,
        hash,
    })
}

/// The flood guard: may this CPU track one more new flow in this second?
#[inline(always)]
fn admit_new_flow(config: &Config) -> bool {
    let ok = stats::admit(WINDOW_NEW_FLOWS, config.new_flow_limit);
    if !ok {
        stats::event(stat::CT_FLOOD_BYPASS);
    }
    ok
}
