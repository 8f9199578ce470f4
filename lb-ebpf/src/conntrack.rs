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
//! - Flow sync (`Config::sync`): the first hit of an entry (the flow's second
//!   packet: a lone SYN or datagram never is one, so a flood sends nothing)
//!   reports the flow as confirmed, a FIN or RST from the client reports its
//!   end, each once (`FlowState::flags`; a report the full ring lost is tried
//!   again on the next packet). A non-SYN packet that misses takes the real a
//!   peer reported for its flow, when that real is still the one in this
//!   node's slot, and the entry is promoted into the conntrack table.

use core::{mem::size_of, ptr::addr_of_mut};

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
};
use lb_common::{
    Config, FLOW_EVENT_END, FLOW_EVENT_NEW, FLOW_F_ENDED, FLOW_F_REPORTED, FlowEvent, FlowKey,
    FlowState, PROTO_UDP, RealDef, TCP_STAMP_GRAIN_NS, VIP_F_HASH_SRC_ONLY, VipMeta,
    WINDOW_NEW_FLOWS, flow_hash, src_hash, stat, udp_stamp_grain_ns,
};

use crate::{
    maps::{CLOCK, FLOW_EVENTS, FLOWS, PEER_FLOWS},
    parse::Aligned,
    select, stats,
};

/// TCP flag bits (the header's 14th byte).
pub const TCP_FIN: u8 = 0x01;
/// SYN.
pub const TCP_SYN: u8 = 0x02;
/// RST.
pub const TCP_RST: u8 = 0x04;
/// ACK.
pub const TCP_ACK: u8 = 0x10;

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

/// Now, CLOCK_MONOTONIC at tick resolution (a few ms): the kernel's cached
/// time (`bpf_ktime_get_coarse_ns`), which every tracked packet can afford.
/// Stamps, idle timeouts and rate windows need no better.
///
/// That time only moves at a tick, when the jiffies counter does, so it is
/// read once per tick and CPU and kept in [`CLOCK`] with the jiffies it was
/// read at: a packet in the same tick reads the jiffies (one load, the
/// verifier inlines `bpf_jiffies64` on 64-bit JITs) and this CPU's element
/// (inlined too), and calls no helper. A CPU whose first packet of a tick
/// came between the jiffies' increment and the timekeeping update keeps the
/// previous tick's time for that tick: up to one tick behind, as any
/// coarse reading may be.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: helpers without arguments or side effects.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(cache) = CLOCK.get_ptr_mut(0) else {
        // SAFETY: as above.
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: this CPU's element of a per-CPU array; nothing else on this
    // CPU runs the program while it does.
    let cache = unsafe { &mut *cache };
    // A zero time is an element never written (it starts zeroed).
    if cache.jiffies == jiffies && cache.ns != 0 {
        return cache.ns;
    }
    // SAFETY: as above.
    let ns = unsafe { bpf_ktime_get_coarse_ns() };
    cache.jiffies = jiffies;
    cache.ns = ns;
    ns
}

/// The real for `flow`: from the conntrack table, else from a peer's report,
/// else from the VIP's table (then recorded for [`Track::Packet`]). `None`
/// when the VIP has no usable real. The flow hash is only computed when the
/// table is consulted. `tcp_flags`: the TCP header's flags (0 for UDP).
#[inline(always)]
pub fn choose(
    meta: &VipMeta,
    held: &Aligned<FlowKey>,
    tcp_flags: u8,
    track: Track,
    config: &Config,
) -> Option<Choice> {
    let flow = &held.0;
    let syn = tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
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
                        if config.sync != 0 {
                            report(held, state, tcp_flags, stamp);
                        }
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
                    if config.sync != 0
                        && let Some(choice) = from_peer(flow)
                    {
                        return Some(choice);
                    }
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
            flags: 0,
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

// `report` copies a held key as five 8-byte words.
const _: () = assert!(size_of::<Aligned<FlowKey>>() == size_of::<[u64; 5]>());

/// Flow sync: reports a tracked flow's confirmation (its first hit) or its
/// end (a FIN or RST), each once; marks the entry only when the report got
/// into the ring.
#[inline(always)]
fn report(flow: &Aligned<FlowKey>, state: &mut FlowState, tcp_flags: u8, stamp: u64) {
    let flags = state.flags;
    if flags & FLOW_F_REPORTED == 0 && tcp_flags & TCP_RST != 0 {
        // Reset before it was confirmed (a client refusing a spoofed
        // handshake's SYN-ACK): nothing worth a peer's memory.
        state.flags = FLOW_F_REPORTED | FLOW_F_ENDED;
        return;
    }
    let (kind, mark) = if flags & FLOW_F_REPORTED == 0 {
        (FLOW_EVENT_NEW, FLOW_F_REPORTED)
    } else if tcp_flags & (TCP_FIN | TCP_RST) != 0 && flags & FLOW_F_ENDED == 0 {
        (FLOW_EVENT_END, FLOW_F_ENDED)
    } else {
        return;
    };
    let Some(mut slot) = FLOW_EVENTS.reserve::<FlowEvent>(0) else {
        stats::event(stat::SYNC_LOST);
        return;
    };
    let event = slot.as_mut_ptr();
    // SAFETY: `event` is the reserved record, written whole before the submit.
    // The key is copied as five words from its 8-aligned holder (a 40-byte
    // struct copy is a memmove call in BPF).
    unsafe {
        let key = (flow as *const Aligned<FlowKey>).cast::<[u64; 5]>().read();
        addr_of_mut!((*event).flow).cast::<[u64; 5]>().write(key);
        addr_of_mut!((*event).real_id).write(state.real_id);
        addr_of_mut!((*event).generation).write(state.generation);
        addr_of_mut!((*event).kind).write(kind);
        addr_of_mut!((*event)._pad).write(0);
        addr_of_mut!((*event).at_ns).write(stamp);
    }
    slot.submit(0);
    state.flags = flags | mark;
}

/// A flow another balancer reported, if its real is still the one in this
/// node's slot: promoted into the conntrack table (already known to the
/// peers, so not reported again) and forwarded there.
#[inline(always)]
fn from_peer(flow: &FlowKey) -> Option<Choice> {
    // SAFETY: a lookup in a map only this program and the daemon touch.
    let peer = unsafe { PEER_FLOWS.get(flow) }?;
    let real = select::real(peer.real_id)?;
    if real.generation != peer.generation {
        return None;
    }
    let state = FlowState {
        real_id: peer.real_id,
        generation: peer.generation,
        last_seen_ns: now(),
        hash: peer.hash,
        flags: FLOW_F_REPORTED,
    };
    if FLOWS.insert(flow, &state, u64::from(BPF_ANY)).is_err() {
        stats::event(stat::CT_INSERT_FAILED);
    }
    stats::event(stat::CT_PEER_HIT);
    Some(Choice {
        real_id: state.real_id,
        real,
        new_flow: false,
        hash: state.hash,
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
