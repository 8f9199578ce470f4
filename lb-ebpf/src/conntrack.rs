//! Connection tracking: a flow keeps its real across changes of the real set.
//!
//! - A TCP SYN always takes a fresh Maglev choice and (re)writes the entry, so a
//!   reused 5-tuple never inherits a stale real.
//! - Any other packet uses its entry when there is one and its real still
//!   exists; UDP entries idle longer than `Config::udp_idle_ns` are ignored.
//! - New entries are rate-limited per CPU (flood guard): above the limit the
//!   flow is forwarded by Maglev alone, which still gives a consistent answer
//!   while the real set is unchanged.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    Config, FlowKey, FlowState, PROTO_UDP, VIP_F_HASH_SRC_ONLY, VipMeta, flow_hash, src_hash, stat,
};

use crate::{
    maps::{FLOOD, FLOWS},
    select, stats,
};

/// The real chosen for a flow and whether the flow is new.
pub struct Choice {
    pub real_id: u32,
    pub new_flow: bool,
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: a helper without arguments or side effects.
    unsafe { bpf_ktime_get_ns() }
}

/// The Maglev hash of `flow` for this VIP's scheduler.
#[inline(always)]
fn hash(meta: &VipMeta, flow: &FlowKey) -> u32 {
    if meta.flags & VIP_F_HASH_SRC_ONLY != 0 {
        src_hash(&flow.src)
    } else {
        flow_hash(&flow.src, &flow.dst, flow.ports, flow.proto)
    }
}

/// The real for `flow`: from the conntrack table, else from the VIP's table
/// (then recorded when `track`). `None` when the VIP has no usable real. The
/// flow hash is only computed when the table is consulted.
#[inline(always)]
pub fn choose(
    meta: &VipMeta,
    flow: &FlowKey,
    syn: bool,
    track: bool,
    config: &Config,
) -> Option<Choice> {
    let udp = flow.proto == PROTO_UDP;
    let mut stamp = 0u64;
    if !syn {
        // SAFETY: a lookup in a map only this program and the daemon touch.
        match FLOWS.get_ptr_mut(flow) {
            Some(entry) => {
                // SAFETY: the pointer is a live map value; racing updates from
                // another CPU only move last_seen, which is advisory.
                let state = unsafe { &mut *entry };
                let mut fresh = true;
                if udp {
                    stamp = now();
                    fresh = stamp.saturating_sub(state.last_seen_ns) <= config.udp_idle_ns;
                    if fresh {
                        state.last_seen_ns = stamp;
                    }
                }
                if fresh {
                    if select::real(state.real_id).is_some() {
                        stats::event(stat::CT_HIT);
                        return Some(Choice {
                            real_id: state.real_id,
                            new_flow: false,
                        });
                    }
                    stats::event(stat::CT_STALE);
                }
            }
            None => stats::event(stat::CT_MISS),
        }
    }
    let real_id = select::pick(meta, hash(meta, flow))?;
    if track && admit(config) {
        if udp && stamp == 0 {
            stamp = now();
        }
        let state = FlowState {
            real_id,
            _pad: 0,
            last_seen_ns: if udp { stamp } else { 0 },
        };
        if FLOWS.insert(flow, &state, 0).is_ok() {
            stats::event(stat::CT_NEW);
        } else {
            stats::event(stat::CT_INSERT_FAILED);
        }
    }
    Some(Choice {
        real_id,
        new_flow: true,
    })
}

/// The flood guard: may this CPU track one more new flow in this second?
#[inline(always)]
fn admit(config: &Config) -> bool {
    if config.new_flow_limit == 0 {
        return true;
    }
    let Some(window) = FLOOD.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: this CPU's element of a per-CPU array.
    let window = unsafe { &mut *window };
    let t = now();
    if t.saturating_sub(window.start_ns) >= 1_000_000_000 {
        window.start_ns = t;
        window.count = 0;
    }
    if window.count >= u64::from(config.new_flow_limit) {
        stats::event(stat::CT_FLOOD_BYPASS);
        return false;
    }
    window.count += 1;
    true
}
